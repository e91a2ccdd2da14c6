//! The dashboard, end to end, in a real headless Chromium (crates/cdp): three `ftvm agent`s on
//! loopback share a store (a file store, and a real etcd: Debian's etcd-server, started by the
//! test on free loopback ports and stopped by PID); a checkpoint-protected VM running the
//! guest's shell is declared through the API; the page is opened on a host that runs no
//! replica of it, and a command is typed in its console pane (a WebSocket through that agent,
//! passed on to the primary's); then the whole host of its primary is killed (agent and
//! replicas, one SIGKILL to the process group). Verdicts come from the page's DOM — the
//! failover appears on the timeline, the old backup is shown as primary, the console pane
//! attaches again by itself and answers from the new primary — and a screenshot is kept under
//! target/ for people to look at.

#[path = "support/agents.rs"]
mod agents;
#[path = "../../store/tests/etcd_server.rs"]
mod etcd_server;

use agents::{get, poll, request, Agents};
use cdp::Browser;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Booting the guest and its first full checkpoint to the backup, on a loaded 2-core machine.
const PROTECT_LIMIT: Duration = Duration::from_secs(180);
/// Detecting the lost primary, taking over and showing it.
const FAILOVER_LIMIT: Duration = Duration::from_secs(60);
/// A command's answer in the console pane (the shell may still be starting, or the pane
/// attaching again: the command is typed again every few seconds until it answers).
const CONSOLE_LIMIT: Duration = Duration::from_secs(90);

/// The VM's replicas as (host, role), from the API.
fn replicas(vm: &Value) -> Vec<(String, String)> {
    let list = vm["replicas"].as_array().cloned().unwrap_or_default();
    let pair = |r: &Value| (r["host"].as_str().unwrap_or("").to_owned(), r["role"].as_str().unwrap_or("").to_owned());
    list.iter().map(pair).collect()
}

/// Types `command` in the page's console pane until `answer` shows in it (the evaluated form,
/// never the echo of the typed line).
fn console_answers(browser: &mut Browser, command: &str, answer: &str) -> Result<(), String> {
    let deadline = Instant::now() + CONSOLE_LIMIT;
    let typed = format!(
        "(() => {{ document.querySelector('#console-input').value = {}; \
         document.querySelector('#console-form').requestSubmit(); return true; }})()",
        json!(command)
    );
    let answered = format!("document.querySelector('#console-output').textContent.includes({})", json!(answer));
    loop {
        browser.evaluate(&typed).map_err(|e| format!("typing: {e:#}"))?;
        if browser.wait_for(&answered, Duration::from_secs(4)).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let shown = browser.evaluate(
                "[window.ftvmDashboard.console, document.querySelector('#console-output').textContent.slice(-2000)]",
            );
            return Err(format!("no {answer:?} in the console pane within {CONSOLE_LIMIT:?}: {shown:?}"));
        }
    }
}

#[test]
fn a_failover_appears_on_the_dashboard_timeline_and_its_console_follows_the_primary_in_chromium() {
    failover_scenario(Agents::start("dashboard", &["h1", "h2", "h3"]), "file");
}

#[test]
fn a_failover_appears_on_the_dashboard_of_agents_on_etcd_in_chromium() {
    let etcd = etcd_server::EtcdServer::start("dashboard");
    failover_scenario(Agents::start_on("dashboard-etcd", &["h1", "h2", "h3"], Some(&etcd.spec())), "etcd");
    drop(etcd);
}

fn failover_scenario(mut cluster: Agents, tag: &str) {
    let token = cluster.token.clone();
    let api = cluster.agents[0].api.clone();
    let spec = json!({ "name": "web", "protection": "checkpoint", "replicas": 2 });
    let (status, answer) = request(&api, "POST", "/v1/vms", &token, Some(&spec)).expect("POST /v1/vms");
    assert_eq!(status, 201, "{answer}");

    let protected = poll(PROTECT_LIMIT, || {
        let vm = get(&api, "/v1/vms/web", &token).ok()?;
        (vm["state"] == "protected").then_some(vm)
    });
    let vm = protected.unwrap_or_else(|| panic!("web not protected within {PROTECT_LIMIT:?}\n{}", cluster.logs()));
    let primary = vm["owner"].as_str().expect("an owner").to_owned();
    let (backup, _) = replicas(&vm).into_iter().find(|(_, role)| role == "backup").expect("a backup");
    let watcher = ["h1", "h2", "h3"].into_iter().find(|h| *h != primary && *h != backup).expect("a free host");

    // The page, from the host that will survive, before anything fails.
    let mut browser = Browser::launch().expect("launch chromium");
    let page = dashboard::page_url(&cluster.agent(watcher).api, &token);
    browser.navigate(&page).expect("open the dashboard");
    let shows_primary =
        format!("document.querySelector('#vms tr[data-vm=web][data-role=primary][data-host={primary}]')");
    browser.wait_for(&shows_primary, Duration::from_secs(15)).expect("the page shows the primary");
    // The console pane, through the watcher's agent (which passes it on to the primary's).
    browser.evaluate("document.querySelector('#vms button[data-console=web]').click()").expect("open the console");
    console_answers(&mut browser, "echo before-$((6*7))", "before-42")
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));

    cluster.agent(&primary).kill();
    let failover = "document.querySelector('#timeline li[data-kind=failover][data-vm=web]')";
    let seen = browser.wait_for(failover, FAILOVER_LIMIT);
    seen.unwrap_or_else(|e| panic!("no failover on the timeline: {e}\n{}", cluster.logs()));
    let shows_new_primary =
        format!("document.querySelector('#vms tr[data-vm=web][data-role=primary][data-host={backup}]')");
    browser.wait_for(&shows_new_primary, FAILOVER_LIMIT).expect("the page shows the backup as the primary");
    let host_down = format!("document.querySelector('#hosts tr[data-host={primary}]').dataset.alive == 'false'");
    browser.wait_for(&host_down, FAILOVER_LIMIT).expect("the page shows the killed host down");
    // The pane lost its primary with the host and attached again by itself: the new one answers.
    console_answers(&mut browser, "echo after-$((6*7))", "after-42")
        .unwrap_or_else(|e| panic!("after the failover: {e}\n{}", cluster.logs()));
    let opened = browser.evaluate("window.ftvmDashboard.console.opened").expect("the console's state");
    assert!(opened.as_u64() >= Some(2), "attached again after the failover: {opened}");

    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("dashboard-failover-{tag}.png"));
    browser.screenshot(&path).expect("screenshot");
    println!("screenshot of the dashboard after the failover: {}", path.display());
    assert_eq!(browser.exceptions(), &[] as &[String], "the page threw");
}

#[test]
fn the_agent_serves_the_page_without_a_token_and_the_api_only_with_it() {
    let cluster = Agents::start("dashboard-auth", &["h1"]);
    let api = &cluster.agents[0].api;
    let mut browser = Browser::launch().expect("launch chromium");
    browser.navigate(&format!("{api}/")).expect("open the dashboard");
    browser.wait_for("document.body.dataset.state == 'login'", Duration::from_secs(15)).expect("it asks for the token");
    let (status, answer) = request(api, "GET", "/v1/vms", "wrong", None).expect("GET /v1/vms");
    assert_eq!(status, 401, "{answer}");
    browser.navigate(&dashboard::page_url(api, &cluster.token)).expect("open with the token");
    browser.wait_for("document.body.dataset.state == 'live'", Duration::from_secs(15)).expect("it goes live");
    let hosts = browser.evaluate("[...document.querySelectorAll('#hosts tbody tr')].map(tr => tr.dataset.host)");
    assert_eq!(hosts.expect("hosts"), json!(["h1"]));
}

/// `ftvm demo --cluster`, watched in Chromium from the address it prints first: the story
/// passes by its own typed verdicts, and the page it pointed at shows both failovers and the
/// re-protection between them (the page keeps what it saw after the demo's agents are gone).
#[test]
fn the_cluster_demo_passes_and_its_dashboard_shows_both_failovers() {
    use std::io::BufRead as _;
    let dir = std::env::temp_dir().join(format!("ftvm-dashboard-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let summary_path = dir.join("summary.json");
    let mut demo = std::process::Command::new(env!("CARGO_BIN_EXE_ftvm"))
        .args(["demo", "--cluster", "--linger-s", "3", "--before-kill-ms", "3000", "--logs"])
        .arg(dir.join("logs"))
        .arg("--summary")
        .arg(&summary_path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("start ftvm demo --cluster");
    let mut lines = std::io::BufReader::new(demo.stdout.take().expect("stdout")).lines();
    let mut printed = Vec::new();
    let dashboard = loop {
        let line = lines.next().expect("the demo printed its dashboard's address").expect("a line");
        printed.push(line.clone());
        if let Some(url) = line.strip_prefix("ftvm demo: dashboard on ") {
            break url.to_owned();
        }
    };
    let mut browser = Browser::launch().expect("launch chromium");
    browser.navigate(&dashboard).expect("open the dashboard");
    browser.wait_for("document.body.dataset.state == 'live'", Duration::from_secs(15)).expect("the page is live");
    printed.extend(lines.map_while(Result::ok));
    let status = demo.wait().expect("the demo ends");
    let output = printed.join("\n");
    assert!(status.success(), "ftvm demo --cluster: {status}\n{output}");
    let summary: Value = serde_json::from_slice(&std::fs::read(&summary_path).expect("summary")).expect("JSON");
    assert_eq!(summary["passed"], true, "{summary:#}");
    assert_eq!(summary["two_primaries_seen"], 0, "{summary:#}");
    assert_eq!(summary["failovers"].as_array().map(Vec::len), Some(2), "{summary:#}");

    let kinds = "[...document.querySelectorAll('#timeline li[data-vm=counter]')].map(li => li.dataset.kind).reverse()";
    let failovers = format!("{kinds}.filter(k => k == 'failover').length >= 2 && {kinds}");
    let timeline = browser.wait_for(&failovers, Duration::from_secs(10)).expect("both failovers on the page");
    let timeline: Vec<&str> = timeline.as_array().expect("a list").iter().filter_map(Value::as_str).collect();
    let first = timeline.iter().position(|k| *k == "failover").expect("a failover");
    let reprotect = timeline.iter().position(|k| *k == "reprotect").expect("a re-protection");
    let second = timeline.iter().rposition(|k| *k == "failover").expect("a second failover");
    assert!(first < reprotect && reprotect < second, "{timeline:?}");
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-demo-cluster.png");
    browser.screenshot(&path).expect("screenshot");
    println!("screenshot of the demo's dashboard: {}", path.display());
    let _ = std::fs::remove_dir_all(&dir);
}
