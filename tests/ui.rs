//! The operator page (`/ui/`) in headless Chromium (Debian's `chromium`
//! and `chromedriver`, driven by Selenium), at a narrow window: without
//! the admin token it shows nothing; signed in, it lists the registered
//! sandboxes, shows a denial live (made while the page is open) without a
//! reload, opens a sandbox's destinations and its suggested allowlist,
//! and runs an explain. Screenshots are saved in
//! `$CARGO_TARGET_TMPDIR/ui-screenshots/`.

#![allow(clippy::unwrap_used)]

mod support;

use support::*;
use tokio::io::AsyncWriteExt;

const DRIVER: &str = r##"
import socket, sys
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

admin, token, transparent, shots, cid = sys.argv[1:6]
opts = webdriver.ChromeOptions()
for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
          "--no-first-run", "--disable-background-networking",
          "--disable-component-update", "--disable-sync",
          "--window-size=420,1000", "--user-data-dir=" + shots + "/profile"]:
    opts.add_argument(a)
opts.binary_location = "/usr/bin/chromium"
d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
w = WebDriverWait(d, 20)
body = lambda: d.find_element(By.TAG_NAME, "body").text
try:
    d.get(admin + "/ui/")
    # Without the token: the sign-in form, nothing else.
    assert not d.find_element(By.ID, "app").is_displayed()
    assert cid not in body(), body()
    d.save_screenshot(shots + "/1-signin.png")
    d.find_element(By.ID, "token").send_keys("not-the-token")
    d.find_element(By.CSS_SELECTOR, "#signin-form button").click()
    w.until(lambda _: "refused" in d.find_element(By.ID, "signin-error").text)
    assert not d.find_element(By.ID, "app").is_displayed()
    assert cid not in body(), body()

    d.find_element(By.ID, "token").send_keys(token)
    d.find_element(By.CSS_SELECTOR, "#signin-form button").click()
    w.until(lambda _: cid in d.find_element(By.ID, "sandboxes").text)
    assert "REPORT ONLY" not in d.find_element(By.ID, "sandboxes").text
    w.until(lambda _: d.find_element(By.ID, "live").text == "connected")
    d.save_screenshot(shots + "/2-sandboxes.png")

    # A denial while the page is open: it appears without a reload.
    host, port = transparent.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), source_address=("127.0.0.1", 0))
    s.sendall(b"GET / HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n")
    assert b"host_not_allowed" in s.recv(4096)
    s.close()
    w.until(lambda _: "host_not_allowed" in d.find_element(By.ID, "denials").text)
    assert "DENIED" in d.find_element(By.ID, "denials").text
    d.save_screenshot(shots + "/3-denial-live.png")

    # The sandbox's destinations and its suggestion.
    d.find_element(By.CSS_SELECTOR, "button[data-id='" + cid + "']").click()
    w.until(lambda _: "other.test" in d.find_element(By.ID, "destinations").text)
    assert "api.test" in d.find_element(By.ID, "destinations").text
    limits = d.find_element(By.ID, "limits").text
    assert "at most 64 live connections" in limits and "of 10485760 bytes today" in limits, limits
    d.find_element(By.ID, "suggest").click()
    w.until(lambda _: "allowed_hosts:" in d.find_element(By.ID, "suggestion").text)
    suggestion = d.find_element(By.ID, "suggestion").text
    assert "api.test" in suggestion and "other.test" not in suggestion.split("\n")[0], suggestion
    d.save_screenshot(shots + "/4-destinations.png")

    # Explain.
    d.find_element(By.ID, "x-host").send_keys("other.test")
    d.find_element(By.CSS_SELECTOR, "#explain-form button").click()
    w.until(lambda _: "host_not_allowed" in d.find_element(By.ID, "explain-result").text)
    d.save_screenshot(shots + "/5-explain.png")

    # Signed out: nothing left on the page.
    d.find_element(By.ID, "signout").click()
    assert not d.find_element(By.ID, "app").is_displayed()
    assert cid not in body(), body()
    print("UI OK")
finally:
    d.quit()
"##;

fn have_browser(test: &str) -> bool {
    let ok = std::path::Path::new("/usr/bin/chromium").exists()
        && std::path::Path::new("/usr/bin/chromedriver").exists()
        && std::process::Command::new("python3")
            .args(["-c", "import selenium"])
            .output()
            .is_ok_and(|o| o.status.success());
    if ok {
        return true;
    }
    let reason = format!("{test}: needs chromium, chromium-driver and python3 with selenium");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{reason} (CI=true: a skip is a failure)");
    }
    eprintln!("SKIPPED {reason}");
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_page_shows_sandboxes_denials_destinations_and_explain() {
    let test = "the_operator_page_shows_sandboxes_denials_destinations_and_explain";
    if !have_browser(test) {
        return;
    }
    let up = http_upstream().await;
    let p = up.addr.port();
    let gw = start(up.addr, |_| {}).await;
    let (status, minted) = gw
        .admin(
            "POST",
            "/v1/tokens",
            Some(
                serde_json::json!({"container_id": "ui-sb-1", "user_id": "u",
                "allowed_hosts": [format!("api.test:{p}")], "ttl_seconds": 600,
                "limits": {"max_connections": 64, "bytes_per_day": 10_485_760}}),
            ),
        )
        .await;
    assert_eq!(status, 201, "{minted}");
    let (status, body) = gw
        .admin(
            "POST",
            "/v1/sandboxes",
            Some(serde_json::json!({"source_ip": "127.0.0.1", "token": minted["token"]})),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    // Something reached before the page opens.
    let mut s = gw.connect_from("127.0.0.1").await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n")
        .await
        .unwrap();
    let answer = read_response(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(s);

    // The page's own answer: one document, nothing from outside.
    let (status, page) = raw_http(
        gw.running.admin_addr,
        "GET /ui/ HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200);
    assert!(!page.contains("http://") && !page.contains("https://"));
    assert!(!page.contains("ui-sb-1"));

    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots");
    let _ = std::fs::remove_dir_all(&shots);
    std::fs::create_dir_all(&shots).unwrap();
    let script = shots.join("driver.py");
    std::fs::write(&script, DRIVER).unwrap();
    let run = tokio::process::Command::new("python3")
        .arg(&script)
        .arg(format!("http://{}", gw.running.admin_addr))
        .arg(&gw.running.admin_token)
        .arg(gw.running.transparent_addr.to_string())
        .arg(&shots)
        .arg("ui-sb-1")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(180), run)
        .await
        .expect("the browser test within 180 s")
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.contains("UI OK"), "{text}");
    for shot in [
        "1-signin",
        "2-sandboxes",
        "3-denial-live",
        "4-destinations",
        "5-explain",
    ] {
        let png = std::fs::read(shots.join(format!("{shot}.png"))).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "{shot}");
    }
    let _ = std::fs::remove_dir_all(shots.join("profile"));
}
