//! Sealed credentials on the real path: a sandbox namespace whose TCP the
//! project's rules send to sluice, an upstream namespace with nginx
//! (HTTP/1.1 and HTTP/2, a certificate from a test CA only the gateway
//! trusts) logging the headers it receives. The sandbox holds a
//! placeholder; the upstream must see the secret, and only where it
//! belongs. Needs root; skips (failing under CI=true) without it.

#![allow(clippy::unwrap_used)]

mod netns;
mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use netns::{CurlOut, Lab, sh};

const UP: &str = "198.18.1.10";
const BAD: &str = "198.18.1.11";
/// The gRPC upstream's address (added to the upstream namespace).
const GRPC: &str = "198.18.1.12";
/// git's secret: sent as `Basic base64(x-access-token:GIT_SECRET)`.
const GIT_SECRET: &str = "g1t-S3CRET-0a1b2c";
/// The package index's secret: `Basic base64(__token__:PIP_SECRET)`.
const PIP_SECRET: &str = "p1p-S3CRET-77aa";
/// The WebSocket upstream's address (added to the upstream namespace).
const WS: &str = "198.18.1.13";
/// The secret the gateway holds: it must reach nginx, and nothing else.
const SECRET: &str = "s3cr3t-VALUE-9f8e7d6c";

/// A test root, a certificate it signs for the upstream's names, and a
/// self-signed one for the upstream that must fail verification.
fn make_pki(dir: &Path) {
    let d = dir.display();
    sh(&format!(
        "cd {d}
         ec='-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes'
         openssl req -x509 $ec -days 2 -subj /CN=sluice-test-root -keyout ca.key -out ca.crt \
           -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
         openssl req $ec -subj /CN=api.cred.test -keyout srv.key -out srv.csr 2>/dev/null
         printf 'subjectAltName=DNS:api.cred.test,DNS:plain.test,DNS:git.cred.test,DNS:grpc.cred.test,DNS:pypi.cred.test,DNS:ws.cred.test,DNS:rules.test\\nextendedKeyUsage=serverAuth\\n' > srv.ext
         openssl x509 -req -in srv.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
           -extfile srv.ext -out srv.crt 2>/dev/null
         openssl req -x509 $ec -days 2 -subj /CN=bad.cred.test -keyout bad.key -out bad.crt \
           -addext subjectAltName=DNS:bad.cred.test 2>/dev/null
         head -c 20000000 /dev/zero > big.bin
         git init -q src && git -C src -c user.email=t@t.test -c user.name=t commit -q --allow-empty -m sealed
         git clone -q --bare src repo.git && git -C repo.git update-server-info
         printf 'x-access-token:{{PLAIN}}{GIT_SECRET}\\n' > htpasswd
         printf '__token__:{{PLAIN}}{PIP_SECRET}\\n' > htpasswd-pypi"
    ));
    // A package index with one wheel, behind the index's secret.
    sh(&format!(
        r#"cd {d} && mkdir -p simple/sealedpkg packages && /usr/bin/python3 - <<'PY'
import zipfile
with zipfile.ZipFile("packages/sealedpkg-1.0-py3-none-any.whl", "w") as z:
    z.writestr("sealedpkg/__init__.py", "VALUE = 42\n")
    z.writestr("sealedpkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: sealedpkg\nVersion: 1.0\n")
    z.writestr("sealedpkg-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    z.writestr("sealedpkg-1.0.dist-info/RECORD", "sealedpkg/__init__.py,,\nsealedpkg-1.0.dist-info/METADATA,,\nsealedpkg-1.0.dist-info/WHEEL,,\nsealedpkg-1.0.dist-info/RECORD,,\n")
PY
printf '<a href="../../packages/sealedpkg-1.0-py3-none-any.whl">sealedpkg-1.0-py3-none-any.whl</a>\n' > simple/sealedpkg/index.html"#
    ));
}

/// nginx in the upstream namespace: 443 (TLS, HTTP/1.1 and HTTP/2) and 80,
/// each request logged as `protocol|method|uri|authorization|x-leak|n`,
/// `n` the number nginx gives the connection it came on.
fn start_nginx(lab: &mut Lab) {
    let dir = lab.dir.path().to_owned();
    let d = dir.display();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "user root; worker_processes 1; daemon off; pid {d}/nginx.pid; error_log {d}/nginx.err;
events {{}}
http {{
  log_format hdrs '$server_protocol|$request_method|$request_uri|$http_authorization|$http_x_leak|$connection';
  client_body_temp_path {d}/ngx-body; proxy_temp_path {d}/ngx-proxy;
  fastcgi_temp_path {d}/ngx-fcgi; uwsgi_temp_path {d}/ngx-uwsgi; scgi_temp_path {d}/ngx-scgi;
  server {{
    listen {UP}:443 ssl http2;
    ssl_certificate {d}/srv.crt; ssl_certificate_key {d}/srv.key;
    access_log {d}/access443.log hdrs;
    location = /big {{ default_type application/octet-stream; limit_rate 100k; alias {d}/big.bin; }}
    location /repo.git/ {{ auth_basic git; auth_basic_user_file {d}/htpasswd; alias {d}/repo.git/; }}
    location /simple/ {{ auth_basic pypi; auth_basic_user_file {d}/htpasswd-pypi; root {d}; index index.html; }}
    location /packages/ {{ auth_basic pypi; auth_basic_user_file {d}/htpasswd-pypi; root {d}; }}
    location / {{ default_type text/plain; return 200 'ok $server_protocol\\n'; }}
  }}
  server {{
    listen {UP}:80;
    access_log {d}/access80.log hdrs;
    location / {{ default_type text/plain; return 200 'plain\\n'; }}
  }}
}}
"
        ),
    )
    .unwrap();
    let up = lab.up.clone();
    let log = dir.join("nginx.out");
    lab.spawn(
        &up,
        &[
            "nginx",
            "-c",
            conf.to_str().unwrap(),
            "-e",
            &format!("{d}/nginx.err"),
        ],
        Some(&log),
    );
    // gRPC (Python grpcio), logging the authorization it receives and
    // answering with a trailer.
    let grpc = dir.join("grpc_server.py");
    std::fs::write(
        &grpc,
        format!(
            r#"import grpc
from concurrent import futures
def call(req, ctx):
    md = dict(ctx.invocation_metadata())
    with open("{d}/grpc.log", "a") as f:
        f.write(md.get("authorization", "") + "\n")
    ctx.set_trailing_metadata((("x-seen", "yes"),))
    return b"pong:" + req
server = grpc.server(futures.ThreadPoolExecutor(2))
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
    "sealed.Echo", {{"Call": grpc.unary_unary_rpc_method_handler(call)}}),))
creds = grpc.ssl_server_credentials([(open("{d}/srv.key", "rb").read(), open("{d}/srv.crt", "rb").read())])
server.add_secure_port("{GRPC}:443", creds)
server.start()
server.wait_for_termination()
"#
        ),
    )
    .unwrap();
    sh(&format!("ip -n {up} addr add {GRPC}/24 dev sl{}ug", lab.id));
    lab.spawn(
        &up,
        &["/usr/bin/python3", grpc.to_str().unwrap()],
        Some(&dir.join("grpc.out")),
    );
    // A WebSocket server: the upgrade answered, then every byte echoed;
    // the authorization it received logged.
    let ws = dir.join("ws_server.py");
    std::fs::write(
        &ws,
        format!(
            r#"import base64, hashlib, socket, ssl, threading
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain("{d}/srv.crt", "{d}/srv.key")
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("{WS}", 443))
srv.listen(8)
def serve(c):
    try:
        c = ctx.wrap_socket(c, server_side=True)
        data = b""
        while b"\r\n\r\n" not in data:
            more = c.recv(4096)
            if not more:
                return
            data += more
        head, rest = data.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")[1:]
        h = {{l.split(":", 1)[0].strip().lower(): l.split(":", 1)[1].strip() for l in lines if ":" in l}}
        with open("{d}/ws.log", "a") as f:
            f.write(h.get("authorization", "") + "\n")
        key = h.get("sec-websocket-key", "") + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
        accept = base64.b64encode(hashlib.sha1(key.encode()).digest()).decode()
        c.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " + accept + "\r\n\r\n").encode())
        if rest:
            c.sendall(rest)
        while True:
            b = c.recv(4096)
            if not b:
                break
            c.sendall(b)
    except Exception:
        pass
    finally:
        c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#
        ),
    )
    .unwrap();
    sh(&format!("ip -n {up} addr add {WS}/24 dev sl{}ug", lab.id));
    lab.spawn(
        &up,
        &["/usr/bin/python3", ws.to_str().unwrap()],
        Some(&dir.join("ws.out")),
    );
    // The one with the bad certificate, for bad.cred.test.
    lab.spawn(
        &up,
        &[
            "openssl",
            "s_server",
            "-accept",
            &format!("{BAD}:443"),
            "-cert",
            dir.join("bad.crt").to_str().unwrap(),
            "-key",
            dir.join("bad.key").to_str().unwrap(),
            "-www",
            "-quiet",
        ],
        None,
    );
    let ok = Lab::in_ns(&up, || {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if [
                format!("{UP}:443"),
                format!("{UP}:80"),
                format!("{BAD}:443"),
            ]
            .iter()
            .all(|a| std::net::TcpStream::connect(a).is_ok())
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    });
    assert!(
        ok,
        "nginx did not start: {}",
        std::fs::read_to_string(dir.join("nginx.err")).unwrap_or_default()
    );
}

fn access(lab: &Lab, port: u16) -> String {
    std::fs::read_to_string(lab.dir.path().join(format!("access{port}.log"))).unwrap_or_default()
}

/// Everything a sandbox needs: its placeholder and a CA bundle that is the
/// system's roots plus its CA.
struct Sandbox {
    placeholder: String,
    git_placeholder: String,
    pip_placeholder: String,
    token: String,
    bundle: String,
    ca: String,
    jti: String,
}

fn setup(lab: &mut Lab) -> Sandbox {
    make_pki(lab.dir.path());
    start_nginx(lab);
    let d = lab.dir.path().display().to_string();
    std::fs::write(lab.dir.path().join("gh.secret"), format!("{SECRET}\n")).unwrap();
    std::fs::write(lab.dir.path().join("git.secret"), GIT_SECRET).unwrap();
    std::fs::write(lab.dir.path().join("pypi.secret"), PIP_SECRET).unwrap();
    lab.start_sluice(&format!(
        r#"[gateway.resolve]
"api.cred.test" = ["{UP}"]
"plain.test" = ["{UP}"]
"bad.cred.test" = ["{BAD}"]
"git.cred.test" = ["{UP}"]
"grpc.cred.test" = ["{GRPC}"]
"pypi.cred.test" = ["{UP}"]
"ws.cred.test" = ["{WS}"]
"rules.test" = ["{UP}"]
[inspect]
upstream_ca_file = "{d}/ca.crt"
[credentials.git]
hosts = ["git.cred.test"]
secret_file = "{d}/git.secret"
header = "authorization"
format = "Basic {{basic:x-access-token}}"
env = "GIT_TOKEN"
[credentials.pypi]
hosts = ["pypi.cred.test"]
secret_file = "{d}/pypi.secret"
header = "authorization"
format = "Basic {{basic:__token__}}"
env = "PIP_TOKEN"
[credentials.gh]
hosts = ["api.cred.test", "bad.cred.test", "grpc.cred.test", "ws.cred.test"]
secret_file = "{d}/gh.secret"
header = "authorization"
format = "Bearer {{secret}}"
env = "GH_TOKEN"
"#
    ));
    let minted = lab.admin(
        "POST",
        "/v1/tokens",
        &serde_json::json!({"container_id": "sealed-1", "user_id": "e2e",
            "allowed_hosts": ["api.cred.test", "plain.test", "bad.cred.test", "git.cred.test",
                              "grpc.cred.test POST /sealed.Echo/Call", "pypi.cred.test", "ws.cred.test",
                              "*.wild.test", "rules.test GET|HEAD /ok/**"],
            "credentials": ["gh", "git", "pypi"], "ttl_seconds": 600}),
    );
    let token = minted["token"].as_str().unwrap().to_owned();
    let registered = lab.admin(
        "POST",
        "/v1/sandboxes",
        &serde_json::json!({"source_ip": "198.18.0.2", "token": token}),
    );
    let placeholder = registered["credentials"]["gh"]
        .as_str()
        .unwrap_or_else(|| panic!("{registered}"))
        .to_owned();
    assert!(
        placeholder.starts_with("sluice-sealed-gh-"),
        "{placeholder}"
    );
    let shown = lab.admin("GET", "/v1/sandboxes/sealed-1", &serde_json::Value::Null);
    assert_eq!(shown["credentials"]["gh"], placeholder.as_str());
    let (status, ca) = lab.admin_text("/v1/sandboxes/sealed-1/ca.pem");
    assert_eq!(status, 200, "{ca}");
    assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"), "{ca}");
    let ca_path = lab.dir.path().join("sandbox-ca.pem");
    std::fs::write(&ca_path, &ca).unwrap();
    let bundle = lab.dir.path().join("bundle.pem");
    let system = std::fs::read_to_string("/etc/ssl/certs/ca-certificates.crt").unwrap_or_default();
    std::fs::write(&bundle, format!("{system}\n{ca}")).unwrap();
    // Names for clients that resolve them (`ip netns exec` binds this
    // over /etc/hosts); the address is beside the point: the rules send
    // every connection to sluice, which resolves the name itself.
    let etc = Path::new("/etc/netns").join(&lab.sb);
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(
        etc.join("hosts"),
        format!("{UP} api.cred.test plain.test git.cred.test pypi.cred.test\n{BAD} bad.cred.test\n{GRPC} grpc.cred.test\n{WS} ws.cred.test\n"),
    )
    .unwrap();
    Sandbox {
        pip_placeholder: registered["credentials"]["pypi"]
            .as_str()
            .unwrap()
            .to_owned(),
        git_placeholder: registered["credentials"]["git"]
            .as_str()
            .unwrap()
            .to_owned(),
        token: token.clone(),
        placeholder,
        bundle: bundle.to_str().unwrap().to_owned(),
        ca: ca_path.to_str().unwrap().to_owned(),
        jti: minted["jti"].as_str().unwrap().to_owned(),
    }
}

fn resolve(name: &str) -> String {
    let ip = if name.starts_with("bad.") { BAD } else { UP };
    format!("{name}:443:{ip}")
}

fn curl(lab: &Lab, args: &[&str]) -> CurlOut {
    lab.curl(args)
}

#[test]
fn sealed_credentials_reach_only_their_host_and_only_inspected() {
    if !netns::require_root_and(
        "sealed_credentials_reach_only_their_host_and_only_inspected",
        &["nginx", "openssl", "/usr/bin/python3"],
    ) {
        return;
    }
    let mut lab = Lab::new("ins");
    let sb = setup(&mut lab);
    let bearer = format!("Authorization: Bearer {}", sb.placeholder);
    let api = resolve("api.cred.test");

    // curl, HTTP/1.1 and HTTP/2: the upstream receives the secret. A
    // connection per request, one after the other: the second goes on the
    // first one's upstream connection (sluice keeps it for the same
    // sandbox and host; nginx numbers its connections), and carries the
    // secret as every request does.
    for (flag, name, proto) in [
        ("--http1.1", "h1", "HTTP/1.1"),
        ("--http2", "h2", "HTTP/2.0"),
    ] {
        let mut seen = Vec::new();
        for path in [format!("/{name}"), format!("/{name}-again")] {
            let r = curl(
                &lab,
                &[
                    "-sS",
                    flag,
                    "--cacert",
                    &sb.bundle,
                    "--resolve",
                    &api,
                    "-H",
                    &bearer,
                    &format!("https://api.cred.test{path}"),
                ],
            );
            assert_eq!(r.code, 0, "{r:?}\n{}", lab.sluice_log());
            assert_eq!(r.stdout.trim(), format!("ok {proto}"), "{r:?}");
            let log = access(&lab, 443);
            let line = log
                .lines()
                .find(|l| l.contains(&format!("{proto}|GET|{path}|Bearer {SECRET}|")))
                .unwrap_or_else(|| panic!("{path} not seen with the secret:\n{log}"));
            seen.push(line.rsplit('|').next().unwrap_or_default().to_owned());
            // The first connection's end puts its upstream back.
            std::thread::sleep(Duration::from_millis(300));
        }
        assert_eq!(
            seen[0], seen[1],
            "{proto}: not the same upstream connection"
        );
    }
    // Python requests, with only the placeholder in its environment.
    let py = lab.exec_in(
        &lab.sb,
        &[("REQUESTS_CA_BUNDLE", &sb.bundle), ("GH_TOKEN", &sb.placeholder)],
        &["/usr/bin/python3", "-c",
          "import os, requests\n\
           r = requests.get('https://api.cred.test/py', headers={'Authorization': 'Bearer ' + os.environ['GH_TOKEN']}, timeout=20)\n\
           print(r.status_code, r.text.strip())"],
    );
    if py.stderr.contains("No module named 'requests'") {
        assert!(std::env::var("CI").is_err(), "python3-requests is missing");
    } else {
        assert_eq!(py.stdout.trim(), "200 ok HTTP/1.1", "{py:?}");
        assert!(access(&lab, 443).contains(&format!("|GET|/py|Bearer {SECRET}|")));
    }

    // openssl: the sandbox's CA is the issuer, and the upstream's ALPN is
    // what the client gets; a host without a credential is not opened.
    let s = lab.run_in(
        &lab.sb,
        &[],
        &["bash", "-c",
          "echo | openssl s_client -connect 198.18.1.10:443 -servername api.cred.test -alpn h2,http/1.1 2>&1"],
    );
    assert!(
        s.stdout.contains("CN = sluice sandbox CA sealed-1"),
        "{s:?}"
    );
    assert!(s.stdout.contains("ALPN protocol: h2"), "{s:?}");
    let s = lab.run_in(
        &lab.sb,
        &[],
        &["bash", "-c",
          "echo | openssl s_client -connect 198.18.1.10:443 -servername plain.test -alpn h2,http/1.1 2>&1"],
    );
    assert!(s.stdout.contains("CN = sluice-test-root"), "{s:?}");
    assert!(!s.stdout.contains("sluice sandbox CA"), "{s:?}");
    // The CA verifies the leaf, with the system roots beside it.
    let v = lab.run_in(
        &lab.sb,
        &[],
        &["bash", "-c", &format!(
            "echo | openssl s_client -connect 198.18.1.10:443 -servername api.cred.test -CAfile {} -verify_return_error 2>&1 | grep -E 'Verify return code'",
            sb.ca
        )],
    );
    assert!(v.stdout.contains("Verify return code: 0 (ok)"), "{v:?}");

    // A rotated secret applies from the next request after SIGHUP.
    let rotated = "r0tated-S3CRET-5e6f";
    std::fs::write(lab.dir.path().join("gh.secret"), rotated).unwrap();
    lab.reload_sluice();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lab.sluice_log().contains("configuration reloaded") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = curl(
        &lab,
        &[
            "-sS",
            "--cacert",
            &sb.bundle,
            "--resolve",
            &api,
            "-H",
            &bearer,
            "https://api.cred.test/rotated",
        ],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        access(&lab, 443).contains(&format!("|GET|/rotated|Bearer {rotated}|")),
        "{}",
        access(&lab, 443)
    );

    // The placeholder where it does not belong: refused, never forwarded.
    let before80 = access(&lab, 80);
    let leak = format!("X-Leak: {}", sb.placeholder);
    let cases: Vec<(&str, Vec<String>)> = vec![
        (
            "another host, cleartext",
            vec!["-H".into(), bearer.clone(), "http://plain.test/a".into()],
        ),
        (
            "in a header, cleartext",
            vec!["-H".into(), leak.clone(), "http://plain.test/b".into()],
        ),
        (
            "in the request line",
            vec![format!("http://plain.test/c?token={}", sb.placeholder)],
        ),
        (
            "in Basic credentials",
            vec![
                "-u".into(),
                format!("git:{}", sb.placeholder),
                "http://plain.test/d".into(),
            ],
        ),
        (
            "the credential's host in cleartext",
            vec!["http://api.cred.test/e".into()],
        ),
    ];
    for (what, args) in &cases {
        let mut full: Vec<&str> = vec![
            "-sS",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "--resolve",
            "plain.test:80:198.18.1.10",
            "--resolve",
            "api.cred.test:80:198.18.1.10",
        ];
        full.extend(args.iter().map(String::as_str));
        let r = curl(&lab, &full);
        assert!(r.stdout.starts_with("HTTP/1.1 403"), "{what}: {r:?}");
        assert!(
            r.stdout.contains("x-deny-reason: credential_misuse"),
            "{what}: {r:?}"
        );
    }
    assert_eq!(
        access(&lab, 80),
        before80,
        "a refused request reached the upstream"
    );
    // Inspected, but the placeholder in another header than its own.
    let r = curl(
        &lab,
        &[
            "-sS",
            "--http2",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "--cacert",
            &sb.bundle,
            "--resolve",
            &api,
            "-H",
            &leak,
            "https://api.cred.test/leak",
        ],
    );
    assert!(
        r.stdout.contains("x-deny-reason: credential_misuse"),
        "{r:?}"
    );
    assert!(
        !access(&lab, 443).contains("/leak"),
        "the refused request went up"
    );

    // Request rules on a plain HTTP host: a GET under the allowed prefix
    // is served; another method, another path, a climb out of the prefix
    // are refused before the upstream.
    let rules_80 = "rules.test:80:198.18.1.10";
    let before80 = access(&lab, 80);
    let r = curl(
        &lab,
        &["-sS", "--resolve", rules_80, "http://rules.test/ok/a"],
    );
    assert_eq!(r.stdout.trim(), "plain", "{r:?}\n{}", lab.sluice_log());
    for (what, args) in [
        ("POST", vec!["-X", "POST", "http://rules.test/ok/a"]),
        ("another path", vec!["http://rules.test/other"]),
        (
            "a climb",
            vec!["--path-as-is", "http://rules.test/ok/../other"],
        ),
    ] {
        let mut full = vec!["-sS", "-D", "-", "-o", "/dev/null", "--resolve", rules_80];
        full.extend(args);
        let r = curl(&lab, &full);
        assert!(
            r.stdout.contains("x-deny-reason: request_not_allowed"),
            "{what}: {r:?}"
        );
    }
    let after80 = access(&lab, 80);
    assert_eq!(
        after80.matches("/ok/a").count(),
        before80.matches("/ok/a").count() + 1
    );
    assert!(!after80.contains("/other"), "{after80}");
    // Over HTTPS the host's TLS is opened (no credential goes there: the
    // sandbox CA permits it for its rules) and each request judged.
    let rules_443 = "rules.test:443:198.18.1.10";
    let r = curl(
        &lab,
        &[
            "-sS",
            "--cacert",
            &sb.bundle,
            "--resolve",
            rules_443,
            "https://rules.test/ok/tls",
        ],
    );
    assert_eq!(
        r.stdout.trim(),
        "ok HTTP/2.0",
        "{r:?}\n{}",
        lab.sluice_log()
    );
    assert!(
        access(&lab, 443).contains("HTTP/2.0|GET|/ok/tls|-|"),
        "{}",
        access(&lab, 443)
    );
    let r = curl(
        &lab,
        &[
            "-sS",
            "-X",
            "POST",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "--cacert",
            &sb.bundle,
            "--resolve",
            rules_443,
            "https://rules.test/ok/tls-post",
        ],
    );
    assert!(
        r.stdout.contains("x-deny-reason: request_not_allowed"),
        "{r:?}"
    );
    assert!(!access(&lab, 443).contains("/ok/tls-post"));

    // In the name itself, under a wildcard-allowed zone: refused before
    // any dial.
    let sni = format!("{}.wild.test", sb.placeholder);
    let r = curl(
        &lab,
        &[
            "-sS",
            "--resolve",
            &format!("{sni}:443:{UP}"),
            &format!("https://{sni}/"),
        ],
    );
    assert_ne!(r.code, 0, "{r:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !lab
        .sluice_log()
        .contains("a credential placeholder in a host name")
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        lab.sluice_log()
            .contains("a credential placeholder in a host name")
    );

    // An upstream whose certificate fails: refused upstream_certificate.
    let r = curl(
        &lab,
        &[
            "-sS",
            "--cacert",
            &sb.bundle,
            "--resolve",
            &resolve("bad.cred.test"),
            "https://bad.cred.test/",
        ],
    );
    assert_ne!(r.code, 0, "{r:?}");
    // A sandbox without its CA: the handshake fails, and the log says why.
    let r = curl(
        &lab,
        &["-sS", "--resolve", &api, "https://api.cred.test/noca"],
    );
    assert_ne!(r.code, 0, "{r:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline
        && !(lab.sluice_log().contains("upstream_certificate")
            && lab.sluice_log().contains("client_rejected_certificate"))
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = lab.sluice_log();
    assert!(
        log.contains("reason=\"upstream_certificate\"")
            || log.contains("reason=upstream_certificate"),
        "{log}"
    );
    assert!(log.contains("client_rejected_certificate"), "{log}");
    assert!(log.contains("ca.pem"), "the hint names the CA: {log}");

    // Revoking the token closes a live inspected HTTP/2 download within 5 s.
    let sbns = lab.sb.clone();
    let (bundle, api2) = (sb.bundle.clone(), api.clone());
    let download = std::thread::spawn(move || {
        let started = Instant::now();
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{sbns}"))
            .args([
                "curl",
                "-sS",
                "--http2",
                "--max-time",
                "60",
                "--limit-rate",
                "100k",
                "--cacert",
                &bundle,
                "--resolve",
                &api2,
                "-o",
                "/dev/null",
                "https://api.cred.test/big",
            ])
            .output()
            .unwrap();
        (out.status.code(), Instant::now(), started)
    });
    std::thread::sleep(Duration::from_secs(2));
    let revoked_at = Instant::now();
    let (status, _) = lab.admin_status(
        "POST",
        "/v1/revocations",
        &serde_json::json!({"jti": sb.jti}),
    );
    assert!(status < 300, "{status}");
    let (code, ended, _) = download.join().unwrap();
    assert_ne!(code, Some(0), "the download finished although revoked");
    assert!(
        ended.duration_since(revoked_at) < Duration::from_secs(5),
        "still open {:?} after the revocation\n{}",
        ended.duration_since(revoked_at),
        lab.sluice_log()
    );

    // The secret is nowhere but at the upstream: not in the log (audit
    // included), the metrics, or any API answer.
    let metrics = lab.metrics();
    assert!(
        metrics.contains("sluice_credential_injections_total{credential=\"gh\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "sluice_inspected_requests_total{decision=\"deny\",reason=\"credential_misuse\"}"
        ),
        "{metrics}"
    );
    let listed = lab
        .admin("GET", "/v1/sandboxes", &serde_json::Value::Null)
        .to_string();
    let shown = lab
        .admin_status("GET", "/v1/sandboxes/sealed-1", &serde_json::Value::Null)
        .1
        .to_string();
    for (what, text) in [
        ("log", lab.sluice_log()),
        ("metrics", metrics),
        ("list", listed),
        ("show", shown),
    ] {
        assert!(!text.contains(SECRET), "the secret is in the {what}");
    }
    let state = lab.dir.path().join("state");
    let grep = Command::new("grep")
        .args(["-r", "-l", SECRET])
        .arg(&state)
        .output()
        .unwrap();
    assert!(
        grep.stdout.is_empty(),
        "the secret is in the state: {}",
        String::from_utf8_lossy(&grep.stdout)
    );
}

/// What real clients do, each holding only placeholders: git over HTTPS
/// with Basic credentials, Node's fetch, a gRPC call with its trailers, and
/// curl through the proxy door's CONNECT (inspected the same way).
#[test]
fn real_clients_work_with_only_placeholders() {
    if !netns::require_root_and(
        "real_clients_work_with_only_placeholders",
        &["nginx", "openssl", "git", "node", "/usr/bin/python3"],
    ) {
        return;
    }
    let mut lab = Lab::with_rules("inr", "--proxy-port 8443");
    let sb = setup(&mut lab);
    let home = lab.dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let home = home.to_str().unwrap().to_owned();

    // git clone over HTTPS, Basic credentials from the URL.
    let dest = lab.dir.path().join("clone");
    let url = format!(
        "https://x-access-token:{}@git.cred.test/repo.git",
        sb.git_placeholder
    );
    let git = lab.exec_in(
        &lab.sb,
        &[
            ("GIT_SSL_CAINFO", &sb.bundle),
            ("HOME", &home),
            ("GIT_TERMINAL_PROMPT", "0"),
        ],
        &["git", "clone", "-q", &url, dest.to_str().unwrap()],
    );
    assert_eq!(git.code, 0, "{git:?}\n{}", lab.sluice_log());
    let basic = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{GIT_SECRET}"))
    };
    assert!(
        access(&lab, 443).contains(&format!("Basic {basic}")),
        "{}",
        access(&lab, 443)
    );

    // Node's fetch, the CA added with NODE_EXTRA_CA_CERTS.
    let node = lab.exec_in(
        &lab.sb,
        &[("NODE_EXTRA_CA_CERTS", &sb.ca), ("GH_TOKEN", &sb.placeholder)],
        &["node", "-e",
          "fetch('https://api.cred.test/node', {headers: {authorization: 'Bearer ' + process.env.GH_TOKEN}})\n\
             .then(async r => console.log(r.status, (await r.text()).trim()))\n\
             .catch(e => { console.error(e); process.exit(1); })"],
    );
    assert_eq!(node.stdout.trim(), "200 ok HTTP/1.1", "{node:?}");
    assert!(access(&lab, 443).contains(&format!("|GET|/node|Bearer {SECRET}|")));

    // gRPC over HTTP/2: the call and its trailer pass; the server saw the
    // secret.
    let grpc = lab.exec_in(
        &lab.sb,
        &[("BUNDLE", &sb.bundle), ("GH_TOKEN", &sb.placeholder), ("GRPC_DNS_RESOLVER", "native")],
        &["/usr/bin/python3", "-c",
          "import grpc, os\n\
           creds = grpc.ssl_channel_credentials(open(os.environ['BUNDLE'], 'rb').read())\n\
           ch = grpc.secure_channel('grpc.cred.test:443', creds)\n\
           call = ch.unary_unary('/sealed.Echo/Call')\n\
           resp, c = call.with_call(b'ping', metadata=(('authorization', 'Bearer ' + os.environ['GH_TOKEN']),), timeout=20)\n\
           print(resp.decode(), dict(c.trailing_metadata()).get('x-seen'))"],
    );
    assert_eq!(
        grpc.stdout.trim(),
        "pong:ping yes",
        "{grpc:?}\n{}",
        lab.sluice_log()
    );
    let seen = std::fs::read_to_string(lab.dir.path().join("grpc.log")).unwrap_or_default();
    assert_eq!(seen.trim(), format!("Bearer {SECRET}"));
    // A method the host's rule does not name: PERMISSION_DENIED, never
    // sent to the server.
    let denied = lab.exec_in(
        &lab.sb,
        &[("BUNDLE", &sb.bundle), ("GRPC_DNS_RESOLVER", "native")],
        &["/usr/bin/python3", "-c",
          "import grpc, os\n\
           creds = grpc.ssl_channel_credentials(open(os.environ['BUNDLE'], 'rb').read())\n\
           ch = grpc.secure_channel('grpc.cred.test:443', creds)\n\
           try:\n    ch.unary_unary('/sealed.Echo/Other')(b'x', timeout=20)\nexcept grpc.RpcError as e:\n    print(e.code().name, e.details())"],
    );
    assert_eq!(
        denied.stdout.trim(),
        "PERMISSION_DENIED request_not_allowed",
        "{denied:?}"
    );
    let seen = std::fs::read_to_string(lab.dir.path().join("grpc.log")).unwrap_or_default();
    assert_eq!(
        seen.lines().count(),
        1,
        "the refused call reached the server"
    );

    // pip install from an index that requires its token.
    let target = lab.dir.path().join("site");
    let index = format!(
        "https://__token__:{}@pypi.cred.test/simple/",
        sb.pip_placeholder
    );
    let pip = lab.exec_in(
        &lab.sb,
        // Every variable a launched sandbox gets names the same bundle
        // (requests lets REQUESTS_CA_BUNDLE win over pip's own --cert).
        &[
            ("PIP_CERT", &sb.bundle),
            ("REQUESTS_CA_BUNDLE", &sb.bundle),
            ("CURL_CA_BUNDLE", &sb.bundle),
            ("SSL_CERT_FILE", &sb.bundle),
            ("HOME", &home),
        ],
        &[
            "/usr/bin/python3",
            "-m",
            "pip",
            "install",
            "-q",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--break-system-packages",
            "--index-url",
            &index,
            "--target",
            target.to_str().unwrap(),
            "sealedpkg",
        ],
    );
    assert_eq!(pip.code, 0, "{pip:?}\n{}", lab.sluice_log());
    assert!(target.join("sealedpkg/__init__.py").exists(), "{pip:?}");
    let pip_basic = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("__token__:{PIP_SECRET}"))
    };
    assert!(access(&lab, 443).contains(&format!(
        "/packages/sealedpkg-1.0-py3-none-any.whl|Basic {pip_basic}"
    )));

    // A WebSocket upgrade through inspection: 101, then bytes both ways.
    let ws = lab.exec_in(
        &lab.sb,
        &[("BUNDLE", &sb.bundle), ("GH_TOKEN", &sb.placeholder)],
        &["/usr/bin/python3", "-c",
          "import os, socket, ssl\n\
           ctx = ssl.create_default_context(cafile=os.environ['BUNDLE'])\n\
           s = ctx.wrap_socket(socket.create_connection(('ws.cred.test', 443), timeout=20), server_hostname='ws.cred.test')\n\
           s.sendall(b'GET /chat HTTP/1.1\\r\\nHost: ws.cred.test\\r\\nUpgrade: websocket\\r\\nConnection: Upgrade\\r\\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\\r\\nSec-WebSocket-Version: 13\\r\\nAuthorization: Bearer ' + os.environ['GH_TOKEN'].encode() + b'\\r\\n\\r\\n')\n\
           r = b''\n\
           while b'\\r\\n\\r\\n' not in r:\n    r += s.recv(4096)\n\
           print(r.split(b'\\r\\n')[0].decode())\n\
           s.sendall(b'hello-ws')\n\
           got = b''\n\
           while len(got) < 8:\n    got += s.recv(4096)\n\
           print(got.decode())"],
    );
    assert_eq!(
        ws.stdout.trim(),
        "HTTP/1.1 101 Switching Protocols\nhello-ws",
        "{ws:?}\n{}",
        lab.sluice_log()
    );
    let seen = std::fs::read_to_string(lab.dir.path().join("ws.log")).unwrap_or_default();
    assert_eq!(seen.trim(), format!("Bearer {SECRET}"));

    // Through the proxy door: a CONNECT to a credential host is inspected.
    let proxy = format!("http://container_sealed-1:jwt_{}@198.18.0.1:8443", sb.token);
    let bearer = format!("Authorization: Bearer {}", sb.placeholder);
    let r = lab.curl(&[
        "-sS",
        "-x",
        &proxy,
        "--cacert",
        &sb.bundle,
        "-H",
        &bearer,
        "https://api.cred.test/viaproxy",
    ]);
    assert_eq!(
        r.stdout.trim(),
        "ok HTTP/2.0",
        "{r:?}\n{}",
        lab.sluice_log()
    );
    assert!(access(&lab, 443).contains(&format!("|GET|/viaproxy|Bearer {SECRET}|")));
    // ... and the placeholder inside a CONNECT to another host: refused.
    let before = access(&lab, 80);
    let r = lab.curl(&[
        "-sS",
        "-p",
        "-x",
        &proxy,
        "-D",
        "-",
        "-o",
        "/dev/null",
        "-H",
        &bearer,
        "http://plain.test/tunnelled",
    ]);
    assert!(
        r.stdout.contains("x-deny-reason: credential_misuse"),
        "{r:?}"
    );
    assert_eq!(access(&lab, 80), before);

    for (what, text) in [("log", lab.sluice_log()), ("metrics", lab.metrics())] {
        assert!(
            !text.contains(SECRET) && !text.contains(GIT_SECRET) && !text.contains(PIP_SECRET),
            "a secret is in the {what}"
        );
    }
}
