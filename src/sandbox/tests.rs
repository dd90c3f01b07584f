use super::netns::peer_veth_name;
use super::*;
use std::path::Path;

fn config(rootfs: &Path) -> Config {
    let mut c = Config::default();
    c.sandbox.rootfs = rootfs.to_path_buf();
    c
}

fn spec() -> LaunchSpec {
    LaunchSpec {
        container_id: "sb-0011223344556677".into(),
        user_id: "alice".into(),
        source_ip: Ipv4Addr::new(198, 18, 8, 2),
        gateway_ip: Ipv4Addr::new(198, 18, 8, 1),
        command: vec!["sleep".into(), "600".into()],
        env: sandbox_env(
            "sb-0011223344556677",
            "tok",
            Ipv4Addr::new(198, 18, 8, 1),
            8443,
        ),
        memory_bytes: 256 << 20,
        cpu_millis: 500,
        pids_limit: 64,
        trust: None,
        limits: Default::default(),
    }
}

#[test]
fn a_limited_sandbox_link_is_shaped_a_quarter_above_its_rates() {
    let record = crate::identity::LaunchRecord {
        netns: "sl-0011223344".into(),
        host_veth: "slh0011223344".into(),
        bundle: "/tmp/b".into(),
        gateway_ip: Ipv4Addr::new(198, 18, 8, 1),
    };
    let limits = crate::limits::Limits {
        egress_bytes_per_s: Some(1 << 20),
        ..Default::default()
    };
    let lines: Vec<(String, bool)> = runsc::shaping(&record, &limits)
        .into_iter()
        .map(|(c, must)| (c.join(" "), must))
        .collect();
    assert_eq!(
        lines,
        vec![
            (
                "tc -n sl-0011223344 qdisc replace dev eth0 root tbf rate 10485760bit burst 262144 latency 200ms".to_owned(),
                true
            ),
            ("tc qdisc del dev slh0011223344 root".to_owned(), false),
        ]
    );
}

#[test]
fn the_bundle_is_hardened() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.sandbox.capabilities = vec!["CAP_NET_BIND_SERVICE".into()];
    let json: serde_json::Value =
        serde_json::from_slice(&bundle_config(&c, &spec(), &[]).unwrap()).unwrap();
    if let Ok(out) = std::env::var("SLUICE_DUMP_BUNDLE") {
        std::fs::write(out, serde_json::to_vec_pretty(&json).unwrap()).unwrap();
    }
    assert_eq!(json["root"]["readonly"], true);
    assert_eq!(json["process"]["noNewPrivileges"], true);
    assert_eq!(json["process"]["user"]["uid"], 65534);
    for set in [
        "bounding",
        "effective",
        "permitted",
        "inheritable",
        "ambient",
    ] {
        assert_eq!(
            json["process"]["capabilities"][set],
            serde_json::json!(["CAP_NET_BIND_SERVICE"]),
            "{set}"
        );
    }
    let env: Vec<&str> = json["process"]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(env.contains(&"CONTAINER_ID=sb-0011223344556677"));
    assert!(
        env.contains(&"HTTP_PROXY=http://container_sb-0011223344556677:jwt_tok@198.18.8.1:8443")
    );
    assert!(env.contains(&"NO_PROXY=localhost,127.0.0.1"));
    let tmp = json["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["destination"] == "/tmp")
        .unwrap();
    assert!(
        tmp["options"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o == "size=67108864")
    );
    let res = &json["linux"]["resources"];
    assert_eq!(res["memory"]["limit"], 256 << 20);
    assert_eq!(res["cpu"]["quota"], 50_000);
    assert_eq!(res["pids"]["limit"], 64 + GVISOR_PIDS_ALLOWANCE);
    let namespaces: Vec<&str> = json["linux"]["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["type"].as_str().unwrap())
        .collect();
    assert!(!namespaces.contains(&"network"), "{namespaces:?}");
    assert!(namespaces.contains(&"pid") && namespaces.contains(&"mount"));
}

#[test]
fn user_mounts_are_read_only_uploads_and_writable_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let json: serde_json::Value = serde_json::from_slice(
        &bundle_config(
            &config(dir.path()),
            &spec(),
            &[
                (dir.path().join("u"), "/mnt/user-data/uploads", false),
                (dir.path().join("o"), "/mnt/user-data/outputs", true),
            ],
        )
        .unwrap(),
    )
    .unwrap();
    let mounts = json["mounts"].as_array().unwrap();
    let find = |d: &str| {
        mounts
            .iter()
            .find(|m| m["destination"] == d)
            .unwrap()
            .clone()
    };
    assert!(
        find("/mnt/user-data/uploads")["options"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o == "ro")
    );
    assert!(
        find("/mnt/user-data/outputs")["options"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o == "rw")
    );
}

#[test]
fn names_fit_interface_limits() {
    assert_eq!(netns_name("sb-0011223344556677"), "sl-0011223344");
    assert!(host_veth_name("sb-0011223344556677").len() <= 15);
    assert!(peer_veth_name("sb-0011223344556677").len() <= 15);
}
