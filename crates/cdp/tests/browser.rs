//! The harness against a real headless Chromium (scripts/test installs Debian's), on a page
//! this test serves itself on loopback; and its failures: no browser, a browser that dies at
//! start, a refused connection, a throwing expression.

use cdp::{Browser, Error, Options};
use nix::sys::signal::killpg;
use nix::unistd::Pid;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;

/// The page: its list fills in 300 ms after load, as a live page's would.
const PAGE: &str = r#"<!doctype html>
<html><head><title>cdp test page</title></head>
<body><h1 id="heading">hello</h1><ul id="events"></ul>
<script>
setTimeout(() => {
  for (const kind of ["placed", "failover"]) {
    const li = document.createElement("li");
    li.className = "event";
    li.dataset.kind = kind;
    li.textContent = kind;
    document.getElementById("events").appendChild(li);
  }
}, 300);
setTimeout(() => { throw new Error("late trouble"); }, 50);
</script></body></html>"#;

/// Serve [`PAGE`] at `/` (404 elsewhere) on a loopback port, from a thread that lives as long
/// as the test process.
fn serve_page() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request_line = String::new();
            let mut reader = BufReader::new(&stream);
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut header = String::new();
            while reader.read_line(&mut header).is_ok_and(|n| n > 2) {
                header.clear();
            }
            let (status, body) = match request_line.split_whitespace().nth(1) {
                Some("/") => ("200 OK", PAGE),
                _ => ("404 Not Found", "not here"),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes());
        }
    });
    format!("http://{addr}/")
}

fn screenshot_path(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    dir.join(name)
}

#[test]
fn reads_the_dom_of_a_page_it_serves_and_keeps_a_screenshot() {
    let url = serve_page();
    let mut browser = Browser::launch().expect("launch chromium");
    browser.navigate(&url).expect("navigate");
    assert_eq!(browser.evaluate("document.title").expect("title"), "cdp test page");
    let kinds = browser
        .wait_for(
            "document.querySelectorAll('#events li').length == 2 && \
             [...document.querySelectorAll('#events li')].map(li => li.dataset.kind)",
            Duration::from_secs(10),
        )
        .expect("the list fills in");
    assert_eq!(kinds, serde_json::json!(["placed", "failover"]));
    let path = screenshot_path("cdp-test-page.png");
    let png = browser.screenshot(&path).expect("screenshot");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(std::fs::read(&path).expect("the file"), png);
    println!("screenshot: {}", path.display());
    // The page's uncaught exception was reported while the harness waited.
    assert!(browser.exceptions().iter().any(|e| e.contains("late trouble")), "{:?}", browser.exceptions());
}

#[test]
fn dropping_the_browser_stops_its_whole_process_group() {
    let browser = Browser::launch().expect("launch chromium");
    let group = Pid::from_raw(i32::try_from(browser.pid()).expect("pid"));
    assert!(killpg(group, None).is_ok(), "the group runs");
    drop(browser);
    let mut gone = false;
    for _ in 0..100 {
        gone = killpg(group, None).is_err();
        if gone {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(gone, "a process of the browser's group outlived it");
}

#[test]
fn a_missing_browser_is_named_with_how_to_install_it() {
    let options = Options { program: "/nonexistent/chromium".into(), ..Options::default() };
    let error = Browser::launch_with(options).err().expect("no browser there");
    assert_eq!(
        error.to_string(),
        "/nonexistent/chromium not found: install Debian's chromium (scripts/test does) or set $CHROMIUM to a Chromium"
    );
}

#[test]
fn a_browser_that_dies_at_start_is_reported_with_its_stderr() {
    let script = std::env::temp_dir().join(format!("cdp-dying-browser-{}", std::process::id()));
    std::fs::write(&script, "#!/bin/sh\necho 'cannot open display: none' >&2\nexit 3\n").expect("script");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let options = Options { program: script.clone(), ..Options::default() };
    let error = Browser::launch_with(options).err().expect("it dies");
    let _ = std::fs::remove_file(&script);
    assert!(matches!(error, Error::Exited { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("exited (exit status: 3) before it opened its DevTools port"), "{message}");
    assert!(message.ends_with("cannot open display: none\n"), "{message}");
}

#[test]
fn a_refused_page_and_a_throwing_expression_are_errors() {
    let closed = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let mut browser = Browser::launch().expect("launch chromium");
    let error = browser.navigate(&format!("http://{closed}/")).expect_err("nothing listens there");
    assert_eq!(error.to_string(), format!("navigating to http://{closed}/: net::ERR_CONNECTION_REFUSED"));
    let error = browser.evaluate("no_such_thing.length").expect_err("it throws");
    assert!(error.to_string().starts_with("the page threw: ReferenceError: no_such_thing is not defined"), "{error}");
    // The browser still answers afterwards.
    assert_eq!(browser.evaluate("6 * 7").expect("evaluate"), 42);
}
