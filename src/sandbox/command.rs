//! Subprocess helpers for the launcher: a command run to completion with a
//! bound on time, output read with a bound on size, a temporary file
//! removed when dropped.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;

use super::{LaunchError, MAX_EXEC_OUTPUT};

/// Deletes a file when dropped.
pub(super) struct RemoveOnDrop(pub(super) PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub(super) async fn read_capped(mut pipe: impl tokio::io::AsyncRead + Unpin) -> String {
    let mut buf = Vec::new();
    let _ = (&mut pipe)
        .take(MAX_EXEC_OUTPUT as u64)
        .read_to_end(&mut buf)
        .await;
    String::from_utf8_lossy(&buf).into_owned()
}

pub(super) fn tail(s: &str) -> String {
    let t: String = s
        .chars()
        .rev()
        .take(500)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    t.trim().to_owned()
}

pub(super) fn on_path(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).is_file();
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

pub(super) async fn run(args: &[String]) -> Result<(), LaunchError> {
    let (program, rest) = args
        .split_first()
        .ok_or_else(|| LaunchError::Failed("empty command".into()))?;
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new(program)
            .args(rest)
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .map_err(|_| LaunchError::Failed(format!("{} timed out", args.join(" "))))?
    .map_err(|e| LaunchError::io(program, e))?;
    if !out.status.success() {
        return Err(LaunchError::Failed(format!(
            "{} failed: {}",
            args.join(" "),
            tail(&String::from_utf8_lossy(&out.stderr))
        )));
    }
    Ok(())
}
