//! The dashboard page in a real headless Chromium (crates/cdp), against a stand-in for the
//! agent's `/v1` API that this test serves on loopback with the contract's shapes
//! (notes/CLUSTER-API.md) and the page's own headers (its content security policy included).
//! The verdicts come from the page's DOM: its rows and timeline items carry data-* attributes.

use cdp::Browser;
use serde_json::{json, Value};
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const TOKEN: &str = "t0k3n/with spaces&#";
const WAIT: Duration = Duration::from_secs(15);

/// What the stand-in API answers; the test changes it while the page polls.
#[derive(Default)]
struct Cluster {
    hosts: Vec<Value>,
    vms: Vec<Value>,
    events: Vec<Value>,
    /// Answer every /v1 request with 503, as an agent whose store is down does.
    store_down: bool,
    /// The Authorization headers received, to check what the page sent.
    authorizations: Vec<String>,
}

type Shared = Arc<Mutex<Cluster>>;

fn host(name: &str, alive: bool, replicas: &[&str]) -> Value {
    json!({ "name": name, "labels": { "zone": "a" }, "api": "http://127.0.0.1:1", "alive": alive,
            "last_heartbeat_ms_ago": if alive { 300 } else { 4200 }, "missed_heartbeats": if alive { 0 } else { 4 },
            "state": if alive { "active" } else { "down" }, "memory_mib_free": 3000, "replicas": replicas })
}

fn replica(host: &str, role: &str, epoch: u64, lag_epochs: Option<u64>) -> Value {
    let protected = if role == "primary" { json!(true) } else { Value::Null };
    json!({ "host": host, "role": role, "pid": 100, "listen": null, "lag_epochs": lag_epochs, "epoch": epoch,
            "protected": protected, "status_age_ms": 120 })
}

fn vm(state: &str, generation: u64, failovers: u64, replicas: Vec<Value>) -> Value {
    json!({ "name": "web", "spec": { "name": "web", "protection": "checkpoint", "replicas": 2 }, "state": state,
            "generation": generation, "owner": replicas[0]["host"], "replicas": replicas, "failovers": failovers,
            "created_at": "2026-12-01T13:40:00Z" })
}

fn event(seq: u64, kind: &str, host: &str, message: &str) -> Value {
    json!({ "seq": seq, "time": format!("2026-12-01T13:41:{seq:02}.000Z"), "kind": kind, "vm": "web", "host": host,
            "message": message })
}

/// Three hosts; `web` protected on h1 (primary) and h2 (backup).
fn protected_cluster() -> Cluster {
    Cluster {
        hosts: vec![host("h1", true, &["web/primary"]), host("h2", true, &["web/backup"]), host("h3", true, &[])],
        vms: vec![vm(
            "protected",
            3,
            0,
            vec![replica("h1", "primary", 812, Some(1)), replica("h2", "backup", 809, None)],
        )],
        events: vec![
            event(1, "vm_created", "h1", "web declared"),
            event(2, "placed", "h1", "web primary on h1"),
            event(3, "placed", "h2", "web backup on h2"),
            event(4, "protected", "h2", "web protected: backup on h2"),
        ],
        ..Cluster::default()
    }
}

/// h1 died: h2 took over, then h3 became the new backup.
fn fail_over(cluster: &mut Cluster) {
    let h1 = host("h1", false, &["web/primary"]); // its last report, from before it died
    cluster.hosts = vec![h1, host("h2", true, &["web/primary"]), host("h3", true, &["web/backup"])];
    cluster.vms =
        vec![vm("protected", 4, 1, vec![replica("h2", "primary", 830, Some(0)), replica("h3", "backup", 830, None)])];
    cluster.events.push(event(5, "host_down", "h1", "h1 missed 3 heartbeats"));
    cluster.events.push(event(6, "failover", "h2", "h2 took over web at generation 4 (h1 silent)"));
    cluster.events.push(event(7, "reprotect", "h3", "web protected again: backup on h3"));
}

/// Serve the page's assets and the stand-in API on a loopback port, a thread per connection.
fn serve(cluster: Shared) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let cluster = cluster.clone();
            std::thread::spawn(move || answer(stream, &cluster));
        }
    });
    format!("http://{addr}")
}

fn answer(mut stream: TcpStream, cluster: &Shared) {
    let mut reader = BufReader::new(&stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut authorization = String::new();
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("authorization") {
                authorization = value.trim().to_owned();
            }
        }
        line.clear();
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let (status, content_type, headers, body) = route(&target, &authorization, cluster);
    let mut response =
        format!("HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n", body.len());
    for (name, value) in headers {
        response.push_str(&format!("{name}: {value}\r\n"));
    }
    response.push_str("Connection: close\r\n\r\n");
    let _ = stream.write_all(response.as_bytes()).and_then(|()| stream.write_all(&body));
}

fn route(
    target: &str,
    authorization: &str,
    cluster: &Shared,
) -> (&'static str, &'static str, Vec<(&'static str, &'static str)>, Vec<u8>) {
    let json_type = "application/json";
    if !target.starts_with("/v1/") {
        return match dashboard::asset(target) {
            Some(asset) => ("200 OK", asset.content_type, dashboard::HEADERS.to_vec(), asset.body.to_vec()),
            None => ("404 Not Found", json_type, vec![], br#"{"error":"no such page"}"#.to_vec()),
        };
    }
    let mut cluster = cluster.lock().expect("lock");
    cluster.authorizations.push(authorization.to_owned());
    if authorization != format!("Bearer {TOKEN}") {
        let body = br#"{"error":"unauthorized: send Authorization: Bearer <token>"}"#.to_vec();
        return ("401 Unauthorized", json_type, vec![("WWW-Authenticate", "Bearer realm=\"ftvm\"")], body);
    }
    if cluster.store_down {
        return ("503 Service Unavailable", json_type, vec![], br#"{"error":"store unreachable"}"#.to_vec());
    }
    let path = target.split('?').next().unwrap_or_default();
    let body = match path {
        "/v1/hosts" => json!({ "hosts": cluster.hosts }),
        "/v1/vms" => json!({ "vms": cluster.vms }),
        "/v1/events" => {
            let since = target.split_once("since=").and_then(|(_, s)| s.parse::<u64>().ok()).unwrap_or(0);
            let events: Vec<&Value> = cluster.events.iter().filter(|e| e["seq"].as_u64() > Some(since)).collect();
            let last_seq = cluster.events.last().map_or(0, |e| e["seq"].as_u64().unwrap_or(0));
            json!({ "events": events, "last_seq": last_seq })
        }
        _ => return ("404 Not Found", json_type, vec![], br#"{"error":"no such resource"}"#.to_vec()),
    };
    ("200 OK", json_type, vec![], body.to_string().into_bytes())
}

fn screenshot_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name)
}

/// The timeline's (kind, host) pairs, newest first.
const TIMELINE: &str = "[...document.querySelectorAll('#timeline li')].map(li => [li.dataset.kind, li.dataset.host])";

#[test]
fn the_page_shows_hosts_vms_and_replicas_and_a_failover_appears_live_on_the_timeline() {
    let cluster: Shared = Arc::new(Mutex::new(protected_cluster()));
    let base = serve(cluster.clone());
    let mut browser = Browser::launch().expect("launch chromium");
    browser.navigate(&dashboard::page_url(&base, TOKEN)).expect("open the dashboard");
    browser.wait_for("document.body.dataset.state == 'live'", WAIT).expect("the page polls the API");

    // The token went from the address into the Authorization header and left the address bar.
    assert_eq!(browser.evaluate("location.hash").expect("hash"), "");
    assert!(cluster.lock().expect("lock").authorizations.iter().all(|a| a == &format!("Bearer {TOKEN}")));

    let hosts = browser
        .evaluate("[...document.querySelectorAll('#hosts tbody tr')].map(tr => [tr.dataset.host, tr.dataset.alive])");
    assert_eq!(hosts.expect("hosts"), json!([["h1", "true"], ["h2", "true"], ["h3", "true"]]));
    let replicas = "[...document.querySelectorAll('#vms tbody tr')].map(tr => [tr.dataset.vm, tr.dataset.host, tr.dataset.role, tr.querySelector('.lag').textContent])";
    assert_eq!(
        browser.evaluate(replicas).expect("replicas"),
        json!([["web", "h1", "primary", "1 epoch"], ["web", "h2", "backup", "3 behind"]])
    );
    assert_eq!(
        browser.evaluate(TIMELINE).expect("timeline"),
        json!([["protected", "h2"], ["placed", "h2"], ["placed", "h1"], ["vm_created", "h1"]])
    );

    // h1 dies: the next polls show the failover, the re-protection and the new roles.
    fail_over(&mut cluster.lock().expect("lock"));
    browser
        .wait_for("document.querySelector('#timeline li[data-kind=failover][data-vm=web]')", WAIT)
        .expect("the failover appears on the timeline");
    browser.wait_for("document.querySelectorAll('#timeline li').length == 7", WAIT).expect("all events");
    assert_eq!(
        browser.evaluate(TIMELINE).expect("timeline"),
        json!([
            ["reprotect", "h3"],
            ["failover", "h2"],
            ["host_down", "h1"],
            ["protected", "h2"],
            ["placed", "h2"],
            ["placed", "h1"],
            ["vm_created", "h1"]
        ])
    );
    let failover_text = browser.evaluate("document.querySelector('#timeline li[data-kind=failover]').textContent");
    assert_eq!(
        failover_text.expect("text"),
        "13:41:06.000Zfailoverweb @ h2h2 took over web at generation 4 (h1 silent)"
    );
    assert_eq!(
        browser.evaluate(replicas).expect("replicas"),
        json!([["web", "h2", "primary", "0 epochs"], ["web", "h3", "backup", "0 behind"]])
    );
    let h1 = "[document.querySelector('#hosts tr[data-host=h1]').dataset.alive, \
              document.querySelector('#hosts tr[data-host=h1] td:last-child').textContent, \
              document.querySelector('#summary').textContent]";
    assert_eq!(
        browser.evaluate(h1).expect("h1"),
        json!(["false", "last reported: web/primary", "2/3 hosts alive · 1/1 VMs protected"])
    );

    let path = screenshot_path("dashboard-page-failover.png");
    browser.screenshot(&path).expect("screenshot");
    println!("screenshot: {}", path.display());
    assert_eq!(browser.exceptions(), &[] as &[String], "the page threw");
}

#[test]
fn without_a_token_the_page_asks_for_one_and_says_when_the_api_refuses_it() {
    let cluster: Shared = Arc::new(Mutex::new(protected_cluster()));
    let base = serve(cluster.clone());
    let mut browser = Browser::launch().expect("launch chromium");
    browser.navigate(&format!("{base}/")).expect("open the dashboard");
    browser.wait_for("document.body.dataset.state == 'login'", WAIT).expect("the form shows");
    assert!(cluster.lock().expect("lock").authorizations.is_empty(), "the page asked the API without a token");

    let submit = |token: &str| {
        format!(
            "document.getElementById('token').value = {}; document.getElementById('login-form').requestSubmit(); true",
            json!(token)
        )
    };
    browser.evaluate(&submit("wrong")).expect("submit");
    browser
        .wait_for("document.getElementById('login-reason').textContent.includes('refused the token (401)')", WAIT)
        .expect("the refusal is shown");
    assert_eq!(browser.evaluate("document.body.dataset.state").expect("state"), "login");

    browser.evaluate(&submit(TOKEN)).expect("submit");
    browser.wait_for("document.body.dataset.state == 'live'", WAIT).expect("the right token opens the page");
    browser.wait_for("document.querySelectorAll('#timeline li').length == 4", WAIT).expect("the timeline");

    // Forgotten, then given again in the address bar of the same tab (only the fragment changes).
    browser.evaluate("document.getElementById('forget').click(); true").expect("forget");
    assert_eq!(browser.evaluate("document.body.dataset.state").expect("state"), "login");
    browser.navigate(&dashboard::page_url(&base, TOKEN)).expect("the same page with #token=");
    browser.wait_for("document.body.dataset.state == 'live'", WAIT).expect("the new token is taken");
    assert_eq!(browser.evaluate("location.hash").expect("hash"), "");
    assert_eq!(browser.exceptions(), &[] as &[String], "the page threw");
}

#[test]
fn when_the_api_fails_the_page_says_so_and_keeps_what_it_saw() {
    let cluster: Shared = Arc::new(Mutex::new(protected_cluster()));
    let base = serve(cluster.clone());
    let mut browser = Browser::launch().expect("launch chromium");
    browser.navigate(&dashboard::page_url(&base, TOKEN)).expect("open the dashboard");
    browser.wait_for("document.querySelectorAll('#timeline li').length == 4", WAIT).expect("the timeline");

    cluster.lock().expect("lock").store_down = true;
    browser.wait_for("document.body.dataset.state == 'unreachable'", WAIT).expect("the failure shows");
    let status = browser.evaluate("document.getElementById('status').textContent").expect("status");
    assert_eq!(status, "cannot reach the API: /v1/hosts: 503 store unreachable — showing what was seen last");
    assert_eq!(browser.evaluate("document.querySelectorAll('#vms tbody tr').length").expect("rows"), 2);

    // Back again: live, and no event counted twice.
    fail_over(&mut cluster.lock().expect("lock"));
    cluster.lock().expect("lock").store_down = false;
    browser.wait_for("document.body.dataset.state == 'live'", WAIT).expect("live again");
    browser.wait_for("document.querySelectorAll('#timeline li').length == 7", WAIT).expect("the new events");
    let seqs = browser.evaluate("[...document.querySelectorAll('#timeline li')].map(li => Number(li.dataset.seq))");
    assert_eq!(seqs.expect("seqs"), json!([7, 6, 5, 4, 3, 2, 1]));
    assert_eq!(browser.exceptions(), &[] as &[String], "the page threw");
}

#[test]
fn text_from_the_api_is_shown_as_text_never_as_markup() {
    let mut cluster = protected_cluster();
    let markup = "<img src=x id=injected onerror=\"document.body.dataset.owned='yes'\">";
    cluster.events.push(event(5, "rule", "h1", markup));
    cluster.hosts[2]["name"] = json!("<b id=bold>h3</b>");
    let cluster: Shared = Arc::new(Mutex::new(cluster));
    let base = serve(cluster);
    let mut browser = Browser::launch().expect("launch chromium");
    browser.navigate(&dashboard::page_url(&base, TOKEN)).expect("open the dashboard");
    browser.wait_for("document.querySelectorAll('#timeline li').length == 5", WAIT).expect("the timeline");
    let message = browser.evaluate("document.querySelector('#timeline li[data-kind=rule] .message').textContent");
    assert_eq!(message.expect("message"), markup);
    let host = browser.evaluate("document.querySelector('#hosts tbody tr:nth-child(3) td').textContent");
    assert_eq!(host.expect("host"), "<b id=bold>h3</b>");
    let injected = "[!!document.getElementById('injected'), !!document.getElementById('bold'), document.body.dataset.owned ?? null]";
    assert_eq!(browser.evaluate(injected).expect("nothing injected"), json!([false, false, null]));
}
