//! `sluice rules` against `iptables/sluice-gateway.sh`: the binary and the
//! script, run in a network namespace this test makes, leave exactly the
//! same rules (IPv4, IPv6 and ARP, as `*-save` prints them) for every shape
//! of options; each is idempotent, each removes what the other applied,
//! and neither touches rules that are not its own.
//!
//! Needs root; without it the test skips with a reason (a failure with
//! `CI=true`).

#![allow(clippy::unwrap_used)]

mod netns;
mod support;

use std::process::Command;

use netns::require_root;

const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/iptables/sluice-gateway.sh");

/// A network namespace with a veth and a bridge, removed on drop.
struct Ns(String);

impl Ns {
    fn new(tag: &str) -> Ns {
        let ns = Ns(format!("sl-rules-{tag}-{}", std::process::id() % 100_000));
        let ok = Command::new("ip")
            .args(["netns", "add", &ns.0])
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip netns add {}", ns.0);
        ns.sh("ip link add veth-r type veth peer name veth-p && ip link add br-r type bridge");
        ns
    }

    /// Runs `script` with bash in the namespace: exit code, stdout, stderr.
    fn sh(&self, script: &str) -> (i32, String, String) {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.0))
            .args(["bash", "-c", script])
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn binary(&self, args: &str) -> (i32, String, String) {
        self.sh(&format!("{SLUICE} rules {args}"))
    }

    fn script(&self, args: &str) -> (i32, String, String) {
        self.sh(&format!("bash {SCRIPT} {args}"))
    }

    /// Every rule in the namespace, without comments or counters, and
    /// without tables that hold nothing (a table once used stays listed).
    fn saved(&self) -> String {
        let (code, out, err) = self.sh("iptables-save; ip6tables-save; arptables-save");
        assert_eq!(code, 0, "{err}");
        let mut tables: Vec<Vec<&str>> = Vec::new();
        for line in out
            .lines()
            .filter(|l| !l.starts_with('#') && *l != "COMMIT")
        {
            if line.starts_with('*') {
                tables.push(vec![line]);
            } else if let Some(t) = tables.last_mut() {
                t.push(match line.find(" [") {
                    Some(i) if line.starts_with(':') => &line[..i],
                    _ => line,
                });
            }
        }
        tables
            .into_iter()
            .filter(|t| {
                t.iter()
                    .any(|l| l.starts_with("-A") || (l.starts_with(':') && !l.ends_with(" ACCEPT")))
            })
            .map(|t| t.join("\n"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ok((code, out, err): (i32, String, String), what: &str) -> String {
    assert_eq!(code, 0, "{what}: {out}{err}");
    out
}

#[test]
fn the_binary_and_the_script_make_the_same_rules() {
    if !require_root("the_binary_and_the_script_make_the_same_rules") {
        return;
    }
    let ns = Ns::new("same");
    // An operator's own rule, which neither may touch.
    ok(
        ns.sh("iptables -A INPUT -p tcp --dport 22 -j ACCEPT"),
        "own rule",
    );
    let clean = ns.saved();
    let shapes = [
        (
            "--iface veth-r",
            "--port 15001 --proxy-port 8443 --dns-port 15053 --source 198.18.0.2 --bind 198.18.0.2=02:53:c6:12:00:02",
        ),
        ("--iface veth-r", "--port 15002"),
        (
            "--subnet 198.18.0.0/24",
            "--dns-port 15053 --bind 198.18.0.2=02:53:c6:12:00:02 --bind 198.18.0.3=02:53:c6:12:00:03",
        ),
        ("--iface br-r", "--proxy-port 8443 --bind-dynamic"),
        ("--subnet 198.18.2.0/24", "--l2-trusted --proxy-port 8443"),
    ];
    for (target, opts) in shapes {
        let args = format!("{target} {opts}");
        ok(ns.script(&format!("apply {args}")), "script apply");
        let by_script = ns.saved();
        assert_ne!(by_script, clean, "{args}: the script applied nothing");
        ok(ns.script(&format!("remove {target}")), "script remove");
        assert_eq!(ns.saved(), clean, "{args}: the script's remove");

        ok(ns.binary(&format!("apply {args}")), "binary apply");
        assert_eq!(ns.saved(), by_script, "{args}: binary vs script");
        ok(ns.binary(&format!("apply {args}")), "binary apply again");
        assert_eq!(ns.saved(), by_script, "{args}: apply twice, one set");
        let status = ns.binary(&format!("status {target}"));
        assert_eq!(status.0, 0, "{args}: status {status:?}");
        assert!(status.1.starts_with("applied\n"), "{status:?}");

        // Each takes over, and removes, what the other applied.
        ok(ns.script(&format!("apply {args}")), "script over binary");
        assert_eq!(ns.saved(), by_script, "{args}: script over binary");
        ok(ns.binary(&format!("remove {target}")), "binary remove");
        assert_eq!(ns.saved(), clean, "{args}: binary remove of the script's");
        ok(ns.binary(&format!("apply {args}")), "binary apply");
        ok(ns.script(&format!("remove {target}")), "script remove");
        assert_eq!(ns.saved(), clean, "{args}: script remove of the binary's");

        // Remove on a clean namespace does nothing, and says so by status.
        ok(ns.binary(&format!("remove {target}")), "remove on clean");
        assert_eq!(ns.saved(), clean);
        let status = ns.binary(&format!("status {target}"));
        assert_eq!(status.0, 1, "{status:?}");
        assert!(status.1.starts_with("not applied\n"), "{status:?}");
    }
}

#[test]
fn a_reapply_with_other_options_leaves_only_the_new_set() {
    if !require_root("a_reapply_with_other_options_leaves_only_the_new_set") {
        return;
    }
    let ns = Ns::new("reapply");
    let wide = "--iface veth-r --proxy-port 8443 --dns-port 15053 --source 198.18.0.2 --bind 198.18.0.2=02:53:c6:12:00:02";
    let narrow = "--iface veth-r --port 15009";
    ok(ns.script(&format!("apply {narrow}")), "script");
    let want = ns.saved();
    ok(ns.script("remove --iface veth-r"), "script remove");
    ok(ns.binary(&format!("apply {wide}")), "wide");
    ok(ns.binary(&format!("apply {narrow}")), "narrow over wide");
    assert_eq!(ns.saved(), want, "the wide set's chains are gone");
}

#[test]
fn bindings_come_and_go_one_by_one_and_shared_links_need_them() {
    if !require_root("bindings_come_and_go_one_by_one_and_shared_links_need_them") {
        return;
    }
    let ns = Ns::new("bind");
    let clean = ns.saved();
    for who in ["binary", "script"] {
        let run = |args: &str| {
            if who == "binary" {
                ns.binary(args)
            } else {
                ns.script(args)
            }
        };
        // A bridge or a subnet without a binding: refused (exit 2), nothing
        // applied.
        for target in ["--iface br-r", "--subnet 198.18.0.0/24"] {
            let (code, _, err) = run(&format!("apply {target}"));
            assert_eq!(code, 2, "{who} {target}: {err}");
            assert!(err.contains("no --bind IP=MAC"), "{who}: {err}");
        }
        assert_eq!(ns.saved(), clean, "{who}: a refusal applies nothing");
        // Bad options: exit 2.
        for bad in [
            "apply --iface veth-r --port 0",
            "apply --iface 'a b'",
            "apply --subnet 198.18.0.0/24 --source 198.18.0.2 --l2-trusted",
            "apply --iface veth-r --bind 198.18.0.2",
        ] {
            assert_eq!(run(bad).0, 2, "{who}: {bad}");
        }
        assert_eq!(ns.saved(), clean, "{who}: bad options apply nothing");
    }

    let bind = "--bind 198.18.0.4=02:53:c6:12:00:04";
    // Binding before L2 chains exist is an error, not a silent no-op.
    assert_eq!(ns.binary(&format!("bind --iface br-r {bind}")).0, 1);
    ok(ns.binary("apply --iface br-r --bind-dynamic"), "dynamic");
    let unbound = ns.saved();
    ok(ns.binary(&format!("bind --iface br-r {bind}")), "bind");
    let bound = ns.saved();
    assert_ne!(bound, unbound);
    assert_eq!(
        bound.matches("198.18.0.4").count(),
        2,
        "IPv4 and ARP:\n{bound}"
    );
    // Twice, or once by each: one binding.
    ok(
        ns.binary(&format!("bind --iface br-r {bind}")),
        "bind again",
    );
    ok(
        ns.script(&format!("bind --iface br-r {bind}")),
        "script bind",
    );
    assert_eq!(ns.saved(), bound);
    ok(
        ns.script(&format!("unbind --iface br-r {bind}")),
        "script unbind",
    );
    assert_eq!(ns.saved(), unbound);
    ok(ns.binary(&format!("bind --iface br-r {bind}")), "bind");
    ok(ns.binary(&format!("unbind --iface br-r {bind}")), "unbind");
    ok(
        ns.binary(&format!("unbind --iface br-r {bind}")),
        "unbind again",
    );
    assert_eq!(ns.saved(), unbound);
    // A guard left by an ARP apply that broke off (ARP from the target
    // dropped, fail closed) goes with the next apply, or with remove.
    ok(
        ns.sh("arptables -I INPUT 1 -i br-r -j DROP"),
        "a left guard",
    );
    ok(
        ns.binary("apply --iface br-r --bind-dynamic"),
        "apply over it",
    );
    assert_eq!(ns.saved(), unbound, "the guard is gone after an apply");
    ok(
        ns.sh("arptables -I INPUT 1 -i br-r -j DROP"),
        "a left guard",
    );
    ok(ns.binary("remove --iface br-r"), "remove");
    assert_eq!(ns.saved(), clean);
}
