//! The files under `deploy/` that sluice reads pass its own check, as an
//! operator would run it: `sluice check --config FILE` for every
//! `deploy/*.toml`.

#![allow(clippy::unwrap_used)]

mod support;

use std::process::Command;

/// `sluice check --config path` passes, or the test fails with what it said.
fn assert_sluice_accepts(path: &std::path::Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["check", "--config"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_deploy_config_passes_sluice_check() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            assert_sluice_accepts(&path);
            checked.push(path);
        }
    }
    assert!(checked.len() >= 2, "checked only {checked:?}");
}

fn manifests() -> Vec<std::path::PathBuf> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// The Kubernetes manifests against the API's schemas, strictly (unknown
/// fields fail), offline.
#[test]
fn the_kubernetes_manifests_pass_kubernetes_validate_strict() {
    // CI puts its Python tools' venv first on PATH.
    if !support::have_tool(
        "kubernetes-validate",
        "--help",
        "the_kubernetes_manifests_pass_kubernetes_validate_strict",
    ) {
        return;
    }
    let files = manifests();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in [
        "namespace.yaml",
        "configmap.yaml",
        "daemonset.yaml",
        "networkpolicy.yaml",
    ] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing");
    }
    let out = Command::new("kubernetes-validate")
        .arg("--strict")
        .args(&files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// checkov finds nothing beyond the checks `deploy/checkov.yaml` skips,
/// each with its reason.
#[test]
fn the_kubernetes_manifests_pass_checkov() {
    if !support::have_tool("checkov", "--help", "the_kubernetes_manifests_pass_checkov") {
        return;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("checkov")
        .args([
            "--config-file",
            "deploy/checkov.yaml",
            "-d",
            "deploy/kubernetes",
        ])
        .current_dir(root)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "checkov:\n{said}");
    assert!(said.contains("Failed checks: 0"), "checkov:\n{said}");
    // Every skip has its reason written above it.
    let config = std::fs::read_to_string(format!("{root}/deploy/checkov.yaml")).unwrap();
    let lines: Vec<&str> = config.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.trim_start().starts_with("- CKV") {
            let reasoned = lines[..i]
                .iter()
                .rev()
                .take_while(|l| !l.trim().is_empty() && !l.contains("skip-check"))
                .any(|l| l.trim_start().starts_with('#'));
            assert!(reasoned, "{line} is skipped without a reason");
        }
    }
}

/// The ConfigMap's sluice.toml passes `sluice check`, and its DaemonSet
/// mounts that ConfigMap where `serve` reads it.
#[test]
fn the_configmap_holds_a_config_sluice_accepts() {
    let root = env!("CARGO_MANIFEST_DIR");
    let map = std::fs::read_to_string(format!("{root}/deploy/kubernetes/configmap.yaml")).unwrap();
    let body: String = map
        .lines()
        .skip_while(|l| l.trim() != "sluice.toml: |")
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    assert!(
        body.contains("[gateway]"),
        "no sluice.toml in the ConfigMap"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, &body).unwrap();
    assert_sluice_accepts(&path);
    let ds = std::fs::read_to_string(format!("{root}/deploy/kubernetes/daemonset.yaml")).unwrap();
    assert!(
        ds.contains("name: sluice-config"),
        "the DaemonSet does not mount the ConfigMap"
    );
    assert!(ds.contains("mountPath: /etc/sluice"));
    assert!(ds.contains("\"/etc/sluice/sluice.toml\""));
}
