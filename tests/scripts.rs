//! Every shell script in the repository passes `shellcheck` at every
//! severity: the rules script operators run as root, CI's own script and
//! the bench helpers. Without shellcheck installed the test says so and
//! skips, except with `CI=true`, where a skip is a failure.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

/// Files that are shell: a `.sh` name, or a first line naming a shell.
fn scripts(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path.is_dir() {
            if !matches!(name.as_ref(), "target" | ".git" | "corpus" | "artifacts") {
                scripts(&path, out);
            }
            continue;
        }
        let shebang = std::fs::read(&path)
            .ok()
            .and_then(|b| b.split(|&c| c == b'\n').next().map(<[u8]>::to_vec))
            .map(|l| String::from_utf8_lossy(&l).into_owned())
            .unwrap_or_default();
        let shell = shebang.starts_with("#!")
            && ["/sh", "bash", "env sh"]
                .iter()
                .any(|s| shebang.contains(s));
        if name.ends_with(".sh") || shell {
            out.push(path);
        }
    }
}

#[test]
fn every_shell_script_passes_shellcheck() {
    if !support::have_tool(
        "shellcheck",
        "--version",
        "every_shell_script_passes_shellcheck",
    ) {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    scripts(root, &mut files);
    files.sort();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.strip_prefix(root).unwrap().display().to_string())
        .collect();
    for expected in [
        "iptables/sluice-gateway.sh",
        ".ci/run",
        "benches/load/profile.sh",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} not found among {names:?}"
        );
    }
    let out = Command::new("shellcheck")
        .args(["--severity=style", "--external-sources"])
        .args(&files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "shellcheck on {names:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
