//! The files under `deploy/` that sluice reads pass its own check, as an
//! operator would run it: `sluice check --config FILE` for every
//! `deploy/*.toml`.

#![allow(clippy::unwrap_used)]

use std::process::Command;

#[test]
fn every_deploy_config_passes_sluice_check() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
                .args(["check", "--config"])
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}{}",
                path.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            checked.push(path);
        }
    }
    assert!(checked.len() >= 2, "checked only {checked:?}");
}
