//! Launched sandboxes end to end, as root: sluice (in a gateway namespace)
//! launches gVisor sandboxes from a busybox root filesystem the test makes,
//! each in a namespace of its own behind a veth and the rules. Shown:
//! allowed and denied requests from inside, UDP and the admin port going
//! nowhere, spoofing a neighbour's address failing, a SIGKILLed sluice
//! coming back with the sandbox still working, revocation, destruction
//! removing every piece and freeing the address without its permissions,
//! and hostile launch requests refused.

#![allow(clippy::unwrap_used)]

mod netns;
mod support;

use std::net::UdpSocket;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use netns::{Lab, require_root};
use serde_json::{Value, json};

const UP: &str = "198.18.1.10";
const DECOY: &str = "198.18.1.11";

/// A read-only-friendly busybox root: the applets the test uses, names in
/// /etc/hosts (any address: sluice resolves names itself), nobody.
fn make_rootfs(dir: &Path) {
    for d in ["bin", "etc", "proc", "dev", "sys", "tmp", "mnt/user-data"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).unwrap();
    for applet in [
        "sh", "sleep", "wget", "echo", "cat", "id", "ls", "nc", "touch", "printf", "sed", "base64",
        "tr",
    ] {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet)).unwrap();
    }
    std::fs::write(
        dir.join("etc/hosts"),
        format!("127.0.0.1 localhost\n{UP} api.test secure.test\n{DECOY} other.test\n"),
    )
    .unwrap();
    std::fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0::/:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(dir.join("etc/group"), "root:x:0:\nnobody:x:65534:\n").unwrap();
    for d in [dir.to_path_buf(), dir.join("tmp")] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

fn serve_http(listener: std::net::TcpListener, count: Arc<AtomicUsize>) {
    use std::io::{Read, Write};
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            count.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf);
                let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
                let body = format!("hello from {UP} {path}\n");
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
}

struct Exec {
    code: i64,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Exec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {} stdout {:?} stderr {:?}",
            self.code, self.stdout, self.stderr
        )
    }
}

fn exec(lab: &Lab, id: &str, cmd: &[&str]) -> Exec {
    let (status, v) = lab.admin_status(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        &json!({"command": cmd, "timeout_ms": 20000}),
    );
    assert_eq!(status, 200, "exec {cmd:?}: {v}");
    Exec {
        code: v["exit_code"].as_i64().unwrap(),
        stdout: v["stdout"].as_str().unwrap().to_owned(),
        stderr: v["stderr"].as_str().unwrap().to_owned(),
    }
}

/// An HTTP/1.0 GET from inside the sandbox with busybox nc (busybox wget
/// fails on gVisor's host network with EAGAIN, whatever the path). `proxy`:
/// through `$HTTP_PROXY` (credentials taken from it), else direct (the
/// transparent path).
fn get(lab: &Lab, id: &str, host: &str, path: &str, proxy: bool) -> Exec {
    let script = if proxy {
        format!(
            "creds=$(echo \"$HTTP_PROXY\" | sed -e 's|^http://||' -e 's|@.*$||'); \
             auth=$(printf %s \"$creds\" | base64 | tr -d '\\n'); \
             addr=$(echo \"$HTTP_PROXY\" | sed -e 's|^.*@||' -e 's|:| |'); \
             printf 'GET http://{host}{path} HTTP/1.0\\r\\nHost: {host}\\r\\nProxy-Authorization: Basic %s\\r\\n\\r\\n' \"$auth\" | nc -w 10 $addr"
        )
    } else {
        format!("printf 'GET {path} HTTP/1.0\\r\\nHost: {host}\\r\\n\\r\\n' | nc -w 10 {host} 80")
    };
    exec(lab, id, &["sh", "-c", &script])
}

fn launch(lab: &Lab, hosts: &[&str]) -> Value {
    let (status, v) = lab.admin_status(
        "POST",
        "/v1/sandboxes/launch",
        &json!({"user_id": "alice", "allowed_hosts": hosts, "command": ["sleep", "600"], "ttl_seconds": 600,
                "memory_bytes": 256u64 << 20, "cpu_millis": 500, "pids_limit": 64}),
    );
    assert_eq!(status, 201, "{v}\n{}", lab.sluice_log());
    v
}

/// The rate (bytes a second) of a `tbf` at the root of `dev` (in `netns`,
/// else in the gateway's namespace, where the launcher's veth ends are).
fn tbf_rate(netns: Option<&str>, dev: &str) -> Option<u64> {
    let mut cmd = std::process::Command::new("tc");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    let out = cmd
        .args(["-j", "qdisc", "show", "dev", dev])
        .output()
        .unwrap();
    let qdiscs: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    qdiscs
        .as_array()?
        .iter()
        .find(|q| q["kind"] == "tbf" && q["root"] == true)
        .and_then(|q| q["options"]["rate"].as_u64())
}

fn ns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

#[test]
fn launched_sandboxes_end_to_end() {
    if !require_root("launched_sandboxes_end_to_end") {
        return;
    }
    for tool in ["runsc", "/bin/busybox"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .unwrap()
            .status
            .success();
        if !found {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("launched_sandboxes_end_to_end needs {tool} (CI=true: a skip is a failure)");
            }
            eprintln!("SKIPPED launched_sandboxes_end_to_end: needs {tool}");
            return;
        }
    }
    let mut lab = Lab::new("r");
    let hits = Arc::new(AtomicUsize::new(0));
    serve_http(lab.listen_upstream(&format!("{UP}:80")), Arc::clone(&hits));
    let udp: UdpSocket = lab.udp_upstream(&format!("{UP}:5353"));
    let rootfs = lab.dir.path().join("rootfs");
    make_rootfs(&rootfs);
    let users = lab.dir.path().join("users");
    std::fs::create_dir_all(&users).unwrap();
    let secret = lab.dir.path().join("gh.secret");
    std::fs::write(&secret, "launch-S3CRET-42").unwrap();
    lab.start_sluice(&format!(
        r#"
[gateway.resolve]
"api.test" = ["{UP}"]
"secure.test" = ["{UP}"]
"other.test" = ["{DECOY}"]
[sandbox]
runtime = "runsc"
runtime_args = ["--network=host"]
rootfs = "{}"
subnet = "198.18.8.0/29"
user_data_dir = "{}"
[dns]
listen = "0.0.0.0:15053"
[credentials.gh]
hosts = ["secure.test"]
secret_file = "{}"
header = "authorization"
format = "Bearer {{secret}}"
env = "GH_TOKEN"
"#,
        rootfs.display(),
        users.display(),
        secret.display()
    ));

    // Launch one sandbox, allowed api.test.
    let a = launch(&lab, &["api.test"]);
    let id = a["container_id"].as_str().unwrap().to_owned();
    assert_eq!(a["source_ip"], "198.18.8.2");
    let short = &id[3..13];
    assert!(ns_exists(&format!("sl-{short}")));

    // Inside: the hardening, the environment, the user mounts.
    let r = exec(&lab, &id, &["id"]);
    assert!(r.stdout.contains("uid=65534"), "{r:?}");
    let r = exec(&lab, &id, &["touch", "/root-is-read-only"]);
    assert_ne!(r.code, 0, "the root filesystem is writable: {r:?}");
    let r = exec(&lab, &id, &["touch", "/tmp/ok"]);
    assert_eq!(r.code, 0, "{r:?}");
    let r = exec(
        &lab,
        &id,
        &[
            "sh",
            "-c",
            "echo $CONTAINER_ID; echo $HTTP_PROXY; echo $NO_PROXY",
        ],
    );
    assert!(
        r.stdout
            .starts_with(&format!("{id}\nhttp://container_{id}:jwt_")),
        "{r:?}"
    );
    assert!(
        r.stdout.contains("@198.18.8.1:8443\nlocalhost,127.0.0.1"),
        "{r:?}"
    );
    let r = exec(&lab, &id, &["touch", "/mnt/user-data/outputs/result"]);
    assert_eq!(r.code, 0, "outputs not writable: {r:?}");
    let r = exec(&lab, &id, &["touch", "/mnt/user-data/uploads/x"]);
    assert_ne!(r.code, 0, "uploads writable: {r:?}");

    // Names resolve through the gateway's DNS door: a read-only
    // resolv.conf naming the gateway, and an /etc/hosts with localhost
    // only (the rootfs's own, which names api.test, is hidden).
    let r = exec(&lab, &id, &["cat", "/etc/resolv.conf", "/etc/hosts"]);
    assert!(r.stdout.starts_with("nameserver 198.18.8.1\n"), "{r:?}");
    assert!(!r.stdout.contains("api.test"), "{r:?}");
    let r = exec(&lab, &id, &["sh", "-c", "echo x > /etc/resolv.conf"]);
    assert_ne!(r.code, 0, "resolv.conf is writable: {r:?}");

    // The allowed host answers, by name, transparently and through the
    // proxy.
    let r = get(&lab, &id, "api.test", "/direct", false);
    assert!(
        r.stdout.contains(&format!("hello from {UP} /direct")),
        "{r:?}\n{}",
        lab.sluice_log()
    );
    let r = get(&lab, &id, "api.test", "/proxied", true);
    assert!(
        r.stdout.contains(&format!("hello from {UP} /proxied")),
        "{r:?}\n{}",
        lab.sluice_log()
    );
    // Another host: its name does not resolve (NXDOMAIN from the DNS
    // door); named to an allowed host's address, or through the proxy,
    // it is 403.
    let r = get(&lab, &id, "other.test", "/", false);
    assert!(r.stderr.contains("bad address 'other.test'"), "{r:?}");
    let lie = exec(
        &lab,
        &id,
        &[
            "sh",
            "-c",
            &format!(
                "printf 'GET / HTTP/1.0\\r\\nHost: other.test\\r\\n\\r\\n' | nc -w 10 {UP} 80"
            ),
        ],
    );
    let proxied = get(&lab, &id, "other.test", "/", true);
    for r in [lie, proxied] {
        assert!(
            r.stdout.starts_with("HTTP/1.1 403")
                && r.stdout.contains("x-deny-reason: host_not_allowed"),
            "{r:?}"
        );
    }
    // The admin port goes nowhere: 127.0.0.1 is the sandbox's own, and the
    // gateway's address is REDIRECTed to the data plane and refused.
    let r = exec(
        &lab,
        &id,
        &[
            "sh",
            "-c",
            "printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' | nc -w 5 127.0.0.1 9080",
        ],
    );
    assert!(!r.stdout.contains("ok"), "{r:?}");
    let r = exec(
        &lab,
        &id,
        &[
            "sh",
            "-c",
            "printf 'GET /healthz HTTP/1.0\\r\\nHost: 198.18.8.1:9080\\r\\n\\r\\n' | nc -w 5 198.18.8.1 9080",
        ],
    );
    assert!(
        r.stdout.starts_with("HTTP/1.1 403") && !r.stdout.ends_with("ok"),
        "{r:?}"
    );
    // UDP from the sandbox's namespace goes nowhere.
    let ns = format!("--net=/run/netns/sl-{short}");
    let _ = Command::new("nsenter")
        .args([
            ns.as_str(),
            "bash",
            "-c",
            "for i in 1 2 3; do echo x > /dev/udp/198.18.1.10/5353; done",
        ])
        .status();
    udp.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    assert!(
        udp.recv_from(&mut [0u8; 16]).is_err(),
        "UDP crossed the gateway"
    );
    // Spoofing a neighbour's address from the sandbox's namespace fails;
    // its own address works.
    let own = Command::new("nsenter")
        .args([
            ns.as_str(),
            "curl",
            "-s",
            "-m",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--resolve",
            &format!("api.test:80:{UP}"),
            "http://api.test/own",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&own.stdout), "200");
    let _ = Command::new("nsenter")
        .args([
            ns.as_str(),
            "ip",
            "addr",
            "add",
            "198.18.8.3/32",
            "dev",
            "eth0",
        ])
        .status();
    let spoof = Command::new("nsenter")
        .args([
            ns.as_str(),
            "curl",
            "-s",
            "-m",
            "4",
            "--interface",
            "198.18.8.3",
            "--resolve",
            &format!("api.test:80:{UP}"),
            "http://api.test/spoof",
        ])
        .output()
        .unwrap();
    assert!(!spoof.status.success(), "a spoofed source got through");
    let _ = Command::new("nsenter")
        .args([
            ns.as_str(),
            "ip",
            "addr",
            "del",
            "198.18.8.3/32",
            "dev",
            "eth0",
        ])
        .status();

    // Listed; and still there, and working, after sluice is SIGKILLed.
    let list = lab.admin("GET", "/v1/sandboxes", &json!(null));
    assert_eq!(list["sandboxes"][0]["origin"], "launched", "{list}");
    lab.kill_sluice();
    lab.restart_sluice();
    let list = lab.admin("GET", "/v1/sandboxes", &json!(null));
    assert_eq!(list["sandboxes"].as_array().unwrap().len(), 1, "{list}");
    let r = get(&lab, &id, "api.test", "/after-restart", false);
    assert!(
        r.stdout.contains("/after-restart"),
        "{r:?}\n{}",
        lab.sluice_log()
    );

    // Revoked: the next request is denied.
    let jti = lab.admin("GET", &format!("/v1/sandboxes/{id}"), &json!(null))["jti"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, _) = lab.admin_status("POST", "/v1/revocations", &json!({"jti": jti}));
    assert_eq!(status, 204);
    // Its names no longer resolve (the token allows nothing now), and a
    // request to the address it had is refused with the reason.
    let r = get(&lab, &id, "api.test", "/revoked", false);
    assert!(r.stderr.contains("bad address 'api.test'"), "{r:?}");
    let r = exec(
        &lab,
        &id,
        &[
            "sh",
            "-c",
            &format!(
                "printf 'GET /revoked HTTP/1.0\\r\\nHost: api.test\\r\\n\\r\\n' | nc -w 10 {UP} 80"
            ),
        ],
    );
    assert!(r.stdout.contains("x-deny-reason: token_revoked"), "{r:?}");
    let r = get(&lab, &id, "api.test", "/revoked", true);
    assert!(
        r.stdout.starts_with("HTTP/1.1 407") && r.stdout.contains("x-deny-reason: token_revoked"),
        "{r:?}"
    );

    // Destroyed: container, namespace, veth and rules gone.
    let (status, _) = lab.admin_status("DELETE", &format!("/v1/sandboxes/{id}"), &json!(null));
    assert_eq!(status, 204);
    assert!(!ns_exists(&format!("sl-{short}")), "namespace left behind");
    let gw = format!("--net=/run/netns/{}", lab.gw);
    let links = Command::new("nsenter")
        .args([gw.as_str(), "ip", "-o", "link"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains(&format!("slv{short}")),
        "veth left behind"
    );
    let rules = Command::new("nsenter")
        .args([gw.as_str(), "iptables-save"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&rules.stdout).contains(&format!("slv{short}")),
        "rules left behind"
    );
    let runsc = Command::new("runsc")
        .arg("--root")
        .arg(lab.dir.path().join("state/runsc"))
        .args(["list", "-quiet"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&runsc.stdout).contains(&id),
        "container left behind"
    );

    // The address is reused, without the old permissions; this one holds
    // a credential: only its placeholder, and a CA bundle that is the
    // system's roots plus its own CA, named by every variable clients read.
    let (status, b) = lab.admin_status(
        "POST",
        "/v1/sandboxes/launch",
        &json!({"user_id": "alice", "allowed_hosts": ["secure.test"], "command": ["sleep", "600"],
                "ttl_seconds": 600, "memory_bytes": 256u64 << 20, "cpu_millis": 500, "pids_limit": 64,
                "credentials": ["gh"], "limits": {"egress_bytes_per_s": 1048576}}),
    );
    assert_eq!(status, 201, "{b}\n{}", lab.sluice_log());
    assert_eq!(b["source_ip"], "198.18.8.2");
    let id_b = b["container_id"].as_str().unwrap().to_owned();
    // Its link is shaped a quarter above its token's rate (the second
    // layer under the gateway's), and follows a replacement token's.
    let (ns_b, veth_b) = (
        sluice::sandbox::netns_name(&id_b),
        sluice::sandbox::host_veth_name(&id_b),
    );
    assert_eq!(tbf_rate(Some(&ns_b), "eth0"), Some(1_310_720));
    assert_eq!(tbf_rate(Some(&lab.gw), &veth_b), None);
    let swapped = lab.admin(
        "POST",
        "/v1/tokens",
        &json!({"container_id": id_b, "user_id": "alice", "allowed_hosts": ["secure.test"],
                "credentials": ["gh"], "ttl_seconds": 600, "limits": {"ingress_bytes_per_s": 2097152}}),
    );
    let (status, v) = lab.admin_status(
        "PUT",
        &format!("/v1/sandboxes/{id_b}/token"),
        &json!({"token": swapped["token"]}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["credentials"]["gh"], b["credentials"]["gh"], "{v}");
    assert_eq!(tbf_rate(Some(&ns_b), "eth0"), None);
    assert_eq!(tbf_rate(Some(&lab.gw), &veth_b), Some(2_621_440));
    let placeholder = b["credentials"]["gh"].as_str().unwrap().to_owned();
    assert!(placeholder.starts_with("sluice-sealed-gh-"), "{b}");
    let r = exec(
        &lab,
        &id_b,
        &[
            "sh",
            "-c",
            "echo $GH_TOKEN; echo $SSL_CERT_FILE $REQUESTS_CA_BUNDLE $CURL_CA_BUNDLE $NODE_EXTRA_CA_CERTS $PIP_CERT $GIT_SSL_CAINFO $CARGO_HTTP_CAINFO; grep -c 'BEGIN CERTIFICATE' /etc/ssl/certs/ca-certificates.crt; env | grep -c launch-S3CRET",
        ],
    );
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.first(), Some(&placeholder.as_str()), "{r:?}");
    assert_eq!(
        lines.get(1).copied(),
        Some(["/etc/ssl/certs/ca-certificates.crt"; 7].join(" ").as_str()),
        "{r:?}"
    );
    let system = std::fs::read_to_string("/etc/ssl/certs/ca-certificates.crt").unwrap();
    let roots = system.matches("BEGIN CERTIFICATE").count();
    assert_eq!(
        lines.get(2).copied(),
        Some((roots + 1).to_string().as_str()),
        "{r:?}"
    );
    assert_eq!(
        lines.get(3).copied(),
        Some("0"),
        "the secret is in the sandbox: {r:?}"
    );
    let (_, ca) = lab.admin_text(&format!("/v1/sandboxes/{id_b}/ca.pem"));
    let line = ca.lines().nth(1).unwrap();
    let r = exec(
        &lab,
        &id_b,
        &[
            "sh",
            "-c",
            &format!("grep -c -F '{line}' /etc/ssl/certs/ca-certificates.crt"),
        ],
    );
    assert_eq!(
        r.stdout.trim(),
        "1",
        "the sandbox CA is not in its bundle: {r:?}"
    );
    let r = exec(
        &lab,
        &id_b,
        &["sh", "-c", "echo x >> /etc/ssl/certs/ca-certificates.crt"],
    );
    assert_ne!(r.code, 0, "the CA bundle is writable: {r:?}");
    let r = get(&lab, &id_b, "api.test", "/old-permissions", false);
    assert!(r.stderr.contains("bad address 'api.test'"), "{r:?}");
    let r = exec(
        &lab,
        &id_b,
        &[
            "sh",
            "-c",
            &format!(
                "printf 'GET /old-permissions HTTP/1.0\\r\\nHost: api.test\\r\\n\\r\\n' | nc -w 10 {UP} 80"
            ),
        ],
    );
    assert!(
        r.stdout.contains("x-deny-reason: host_not_allowed"),
        "{r:?}"
    );

    // Hostile launch requests: 4xx with reasons, nothing made.
    for (what, body) in [
        (
            "unknown field",
            json!({"user_id": "u", "allowed_hosts": ["a.test"], "command": ["sh"], "privileged": true}),
        ),
        (
            "empty command",
            json!({"user_id": "u", "allowed_hosts": ["a.test"], "command": []}),
        ),
        (
            "huge command",
            json!({"user_id": "u", "allowed_hosts": ["a.test"], "command": vec!["x"; 1000]}),
        ),
        (
            "memory above the maximum",
            json!({"user_id": "u", "allowed_hosts": ["a.test"], "command": ["sh"], "memory_bytes": 1u64 << 50}),
        ),
        (
            "pids above the maximum",
            json!({"user_id": "u", "allowed_hosts": ["a.test"], "command": ["sh"], "pids_limit": 1_000_000}),
        ),
        (
            "path in user_id",
            json!({"user_id": "../../etc", "allowed_hosts": ["a.test"], "command": ["sh"]}),
        ),
        (
            "bare wildcard",
            json!({"user_id": "u", "allowed_hosts": ["*"], "command": ["sh"]}),
        ),
        (
            "ttl too long",
            json!({"user_id": "u", "allowed_hosts": ["a.test"], "command": ["sh"], "ttl_seconds": 99_999_999}),
        ),
    ] {
        let (status, v) = lab.admin_status("POST", "/v1/sandboxes/launch", &body);
        assert_eq!(status, 400, "{what}: {v}");
        assert_eq!(v["error"], "bad_request", "{what}: {v}");
    }
    let (status, v) = lab.admin_status(
        "POST",
        "/v1/sandboxes/nope/exec",
        &json!({"command": ["id"]}),
    );
    assert_eq!((status, v["error"].as_str()), (404, Some("not_found")));

    // The subnet (a /29: five sandbox addresses) runs out cleanly.
    let mut more = Vec::new();
    let exhausted = loop {
        let (status, v) = lab.admin_status(
            "POST",
            "/v1/sandboxes/launch",
            &json!({"user_id": "bob", "allowed_hosts": ["api.test"], "command": ["sleep", "600"]}),
        );
        if status != 201 {
            break (status, v);
        }
        more.push(v["container_id"].as_str().unwrap().to_owned());
        assert!(more.len() < 10, "the subnet never ran out");
    };
    assert_eq!(exhausted.0, 503, "{}", exhausted.1);
    assert_eq!(exhausted.1["error"], "subnet_exhausted");
    assert_eq!(more.len(), 4);

    for id in more.iter().chain([&id_b]) {
        let (status, _) = lab.admin_status("DELETE", &format!("/v1/sandboxes/{id}"), &json!(null));
        assert_eq!(status, 204);
    }
    assert!(hits.load(Ordering::SeqCst) >= 4);
}
