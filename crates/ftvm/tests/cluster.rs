//! The cluster end to end, in network namespaces (root): three hosts, each running
//! `ftvm agent` against a real etcd (Debian's etcd-server, started by the test in a namespace
//! of its own and stopped by PID), and a client namespace counting on the guest.
//!
//! ```text
//!   switch ns: br0 192.168.78.254 (etcd :2379)
//!     ├── host h1: br0 192.168.78.1 ── TAPs of its replicas
//!     ├── host h2: br0 192.168.78.2 ── ...
//!     ├── host h3: br0 192.168.78.3 ── ...
//!     └── client: 10.0.2.100 (the counter client), 192.168.78.100 (the API client)
//! ```
//!
//! A protected VM is declared through the API; the client drives the guest's counter; the
//! primary's whole host is killed (its agent and every process it started, at once, and its
//! uplink cut): the backup takes over, the control loop re-protects the VM onto the third
//! host; then that primary's host is killed too and the last host carries on. Nothing the
//! client was told is lost at any point (judged from the client's record, and from typed
//! fields of the API, never from log wording).

mod common;
#[path = "../../store/tests/etcd_server.rs"]
mod etcd_server;

use common::client::Client;
use common::netns::ip;
use etcd_server::{in_netns, EtcdServer};
use serde_json::{json, Value};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const HOSTS: [&str; 3] = ["h1", "h2", "h3"];
const ETCD_ADDR: &str = "192.168.78.254";
const API_CLIENT_ADDR: &str = "192.168.78.100";
const TOKEN: &str = "cluster-test-token";
/// Booting the guest and protecting it, on a loaded 2-core machine.
const BOOT_LIMIT: Duration = Duration::from_secs(180);
/// A failover plus placing, booting and protecting a new backup.
const REPROTECT_LIMIT: Duration = Duration::from_secs(90);

struct Net {
    prefix: String,
    namespaces: Vec<String>,
}

impl Net {
    fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    fn exec(&self, name: &str, args: &[&str]) {
        let ns = self.ns(name);
        let mut full = vec!["netns", "exec", ns.as_str()];
        full.extend_from_slice(args);
        ip(&full).unwrap_or_else(|e| panic!("{e:#}"));
    }

    fn create(tag: &str) -> Net {
        let mut net = Net { prefix: format!("ftc{}{tag}", std::process::id()), namespaces: Vec::new() };
        for name in ["sw", "h1", "h2", "h3", "cl"] {
            let ns = net.ns(name);
            let _ = ip(&["netns", "del", &ns]);
            ip(&["netns", "add", &ns]).unwrap();
            net.namespaces.push(ns);
            net.exec(name, &["ip", "link", "set", "lo", "up"]);
        }
        net.exec("sw", &["ip", "link", "add", "br0", "type", "bridge"]);
        net.exec("sw", &["ip", "addr", "add", &format!("{ETCD_ADDR}/24"), "dev", "br0"]);
        net.exec("sw", &["ip", "link", "set", "br0", "up"]);
        for (i, host) in HOSTS.iter().enumerate() {
            net.uplink(host);
            net.exec(host, &["ip", "link", "add", "br0", "type", "bridge"]);
            net.exec(host, &["ip", "link", "set", "dev", "uplink", "master", "br0"]);
            net.exec(host, &["ip", "addr", "add", &format!("192.168.78.{}/24", i + 1), "dev", "br0"]);
            net.exec(host, &["ip", "link", "set", "br0", "up"]);
        }
        net.uplink("cl");
        net.exec("cl", &["ip", "addr", "add", "10.0.2.100/24", "dev", "uplink"]);
        net.exec("cl", &["ip", "addr", "add", &format!("{API_CLIENT_ADDR}/24"), "dev", "uplink"]);
        net
    }

    /// A veth `up` in `name`, its peer on the switch's bridge.
    fn uplink(&self, name: &str) {
        let (ns, sw) = (self.ns(name), self.ns("sw"));
        ip(&["link", "add", "uplink", "netns", &ns, "type", "veth", "peer", "name", name, "netns", &sw]).unwrap();
        self.exec("sw", &["ip", "link", "set", name, "master", "br0", "up"]);
        self.exec(name, &["ip", "link", "set", "dev", "uplink", "up"]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.namespaces.drain(..).rev() {
            let _ = ip(&["netns", "del", &ns]);
        }
    }
}

/// An agent, leader of its own process group (its replicas stay in it): killing the group
/// kills the whole host at once.
struct Agent {
    child: Child,
    log: std::path::PathBuf,
}

impl Agent {
    fn kill_host(&mut self) {
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill_host();
    }
}

fn start_agent(net: &Net, host: &str, index: usize, store: &str, dir: &std::path::Path) -> Agent {
    let log = dir.join(format!("{host}.log"));
    let address = format!("192.168.78.{}", index + 1);
    let child = Command::new("ip")
        .args(["netns", "exec", &net.ns(host)])
        .arg(env!("CARGO_BIN_EXE_ftvm"))
        .args(["agent", "--store", store, "--host-name", host, "--bridge", "br0"])
        .args(["--address", &address, "--listen", &format!("{address}:7780")])
        .arg("--work-dir")
        .arg(dir.join(host))
        .arg("--token-file")
        .arg(dir.join("token"))
        // Every agent resets itself (re-executes) every few seconds all through the test.
        .args(["--reexec-s", "4"])
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start an agent");
    Agent { child, log }
}

/// One API request from the client namespace to host `index`'s agent.
fn api(net: &Net, index: usize, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let (method, path) = (method.to_string(), path.to_string());
    in_netns(&net.ns("cl"), move || {
        let authority = format!("192.168.78.{}:7780", index + 1);
        let body = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let auth = vec![format!("Authorization: Bearer {TOKEN}")];
        let timeout = Duration::from_secs(5);
        match store::http::request(&authority, &method, &path, &auth, &body, timeout, timeout) {
            Ok((status, answer)) => (status, serde_json::from_slice(&answer).unwrap_or(Value::Null)),
            Err(_) => (0, Value::Null),
        }
    })
}

/// Polls the VM through host `index`'s API until `done` holds; the last answer.
fn wait_vm(net: &Net, index: usize, limit: Duration, done: impl Fn(&Value) -> bool) -> Result<Value, Value> {
    let deadline = Instant::now() + limit;
    let mut last = Value::Null;
    while Instant::now() < deadline {
        let (status, vm) = api(net, index, "GET", "/v1/vms/web", None);
        if status == 200 {
            if done(&vm) {
                return Ok(vm);
            }
            last = vm;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Err(last)
}

fn replica_hosts(vm: &Value, role: &str) -> Vec<String> {
    let replicas = vm["replicas"].as_array().cloned().unwrap_or_default();
    replicas.iter().filter(|r| r["role"] == role).filter_map(|r| r["host"].as_str().map(String::from)).collect()
}

/// The kinds of the VM's events on the timeline, asked until an agent answers (one may be
/// re-executing, or slow on a loaded host: an unanswered request once read as no events).
fn event_kinds(net: &Net, index: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let events = loop {
        match api(net, index, "GET", "/v1/events", None) {
            (200, events) => break events,
            (status, answer) if Instant::now() >= deadline => panic!("no timeline: {status} {answer}"),
            _ => std::thread::sleep(Duration::from_millis(250)),
        }
    };
    let events = events["events"].as_array().cloned().unwrap_or_default();
    events.iter().filter(|e| e["vm"] == "web").filter_map(|e| e["kind"].as_str().map(String::from)).collect()
}

fn logs(net: &Net, agents: &[Option<Agent>], dir: &std::path::Path) -> String {
    let mut text = String::new();
    // The timeline, from the first agent that answers (stops and their reasons are on it).
    for (index, _) in agents.iter().enumerate().filter(|(_, a)| a.is_some()) {
        let (status, events) = api(net, index, "GET", "/v1/events", None);
        if status == 200 {
            for event in events["events"].as_array().into_iter().flatten() {
                text += &format!("event {} {} {}: {}\n", event["seq"], event["kind"], event["host"], event["message"]);
            }
            break;
        }
    }
    for agent in agents.iter().flatten() {
        text += &format!("--- {}\n{}\n", agent.log.display(), std::fs::read_to_string(&agent.log).unwrap_or_default());
    }
    for host in HOSTS {
        for entry in std::fs::read_dir(dir.join(host).join("replicas")).into_iter().flatten().flatten() {
            let log = std::fs::read_to_string(entry.path().join("log")).unwrap_or_default();
            let tail: String =
                log.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
            text += &format!("--- {}\n{tail}\n", entry.path().display());
        }
    }
    text
}

/// Which store the agents share.
enum StoreKind {
    Etcd,
    File,
}

#[test]
fn a_vm_declared_through_the_api_stays_protected_through_two_host_kills_on_etcd() {
    scenario(StoreKind::Etcd);
}

#[test]
fn a_vm_declared_through_the_api_stays_protected_through_two_host_kills_on_the_file_store() {
    scenario(StoreKind::File);
}

fn scenario(kind: StoreKind) {
    let tag = match kind {
        StoreKind::Etcd => "etcd",
        StoreKind::File => "file",
    };
    let dir = std::env::temp_dir().join(format!("ftvm-cluster-e2e-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("token"), TOKEN).unwrap();
    let net = Net::create(tag);
    let mut etcd = match kind {
        StoreKind::Etcd => {
            Some(EtcdServer::start_in_netns(&net.ns("sw"), ETCD_ADDR, &format!("cluster-e2e-{}", std::process::id())))
        }
        StoreKind::File => None,
    };
    let store = match &etcd {
        Some(etcd) => etcd.spec(),
        None => format!("file:{}", dir.join("store").display()),
    };
    let mut agents: Vec<Option<Agent>> =
        HOSTS.iter().enumerate().map(|(i, host)| Some(start_agent(&net, host, i, &store, &dir))).collect();

    // Unauthenticated requests are refused, saying so.
    std::thread::sleep(Duration::from_secs(1));
    let refused = in_netns(&net.ns("cl"), || {
        let timeout = Duration::from_secs(5);
        store::http::request("192.168.78.1:7780", "GET", "/v1/vms", &[], b"", timeout, timeout).map(|(s, _)| s).ok()
    });
    assert_eq!(refused, Some(401));

    let spec = json!({
        "name": "web", "protection": "checkpoint", "bridge": "br0",
        "command": ["/usr/share/ftvm/counter-httpd"],
    });
    let (status, created) = api(&net, 0, "POST", "/v1/vms", Some(spec));
    assert_eq!(status, 201, "{created}");
    // (Listed with its backup: an agent that has just re-executed sees a host alive only
    // once its report changes.)
    let protected = |vm: &Value| vm["state"] == "protected" && replica_hosts(vm, "backup").len() == 1;
    wait_vm(&net, 1, BOOT_LIMIT, protected)
        .unwrap_or_else(|last| panic!("not protected in time: {last}\n{}", logs(&net, &agents, &dir)));
    let client = Client::start(&net.ns("cl"));
    assert!(
        client.wait_for_answers(20, Duration::from_secs(60)),
        "the counter never answered\n{}",
        logs(&net, &agents, &dir)
    );

    // An agent killed alone (its replicas keep running) and started again finds its replicas
    // and starts nothing new.
    let backup_host = replica_hosts(&wait_vm(&net, 0, BOOT_LIMIT, protected).unwrap(), "backup")[0].clone();
    let index = HOSTS.iter().position(|h| *h == backup_host).unwrap();
    let placed_before = event_kinds(&net, 0).iter().filter(|k| *k == "placed").count();
    let agent = agents[index].as_mut().unwrap();
    let _ =
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent.child.id() as i32), nix::sys::signal::Signal::SIGKILL);
    let _ = agent.child.wait();
    std::thread::sleep(Duration::from_secs(2));
    // Its replicas stay in the old process group: the new agent's group is another, so the
    // old one is killed with the host later, by hand.
    let orphans = agents[index].take().unwrap();
    agents[index] = Some(start_agent(&net, &backup_host, index, &store, &dir));
    std::thread::sleep(Duration::from_secs(3));
    wait_vm(&net, 0, Duration::from_secs(10), protected).unwrap_or_else(|last| {
        panic!("not protected after the agent's restart: {last}\n{}", logs(&net, &agents, &dir))
    });
    let placed_after = event_kinds(&net, 0).iter().filter(|k| *k == "placed").count();
    assert_eq!(placed_before, placed_after, "the restarted agent placed nothing new");

    if let Some(etcd) = &mut etcd {
        // etcd restarted mid-run: the protected pair keeps serving through the outage.
        let outage = Instant::now();
        etcd.restart();
        client.check_nothing_lost(outage, 5, Duration::from_secs(30)).unwrap_or_else(|e| panic!("etcd restart: {e}"));
        wait_vm(&net, 0, Duration::from_secs(20), protected)
            .unwrap_or_else(|last| panic!("after etcd's restart: {last}"));
    }

    let mut orphans = Some(orphans);
    let mut alive: Vec<usize> = vec![0, 1, 2];
    for round in 1..=2 {
        let owner = vm_owner(&net, alive[0]);
        let victim = HOSTS.iter().position(|h| *h == owner).expect("an owner among the hosts");
        let failovers_before = wait_vm(&net, alive[0], Duration::from_secs(20), |vm| vm["failovers"].is_u64())
            .map(|vm| vm["failovers"].as_u64().unwrap_or(0))
            .unwrap_or_else(|last| panic!("no failover count: {last}"));
        let started = Instant::now();
        // The whole host at once: its agent and every replica, and its uplink.
        agents[victim].take().expect("alive").kill_host();
        if victim == index {
            orphans.take().expect("once").kill_host();
        }
        let _ = ip(&["netns", "exec", &net.ns(HOSTS[victim]), "ip", "link", "set", "dev", "uplink", "down"]);
        alive.retain(|i| *i != victim);
        let verdict = client
            .check_nothing_lost(started, 5, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("round {round}: {e}\n{}", logs(&net, &agents, &dir)));
        println!("{tag} round {round}: killed {owner}; {}", verdict.describe());
        let remaining: Vec<String> = alive.iter().map(|i| HOSTS[*i].to_string()).collect();
        let expected_state = if alive.len() >= 2 { "protected" } else { "running" };
        let settled = |vm: &Value| {
            let on_remaining = vm["owner"].as_str().is_some_and(|o| remaining.iter().any(|h| h == o));
            vm["state"] == expected_state
                && on_remaining
                && vm["replicas"].as_array().map(Vec::len) == Some(alive.len())
                && vm["failovers"].as_u64() > Some(failovers_before)
        };
        let vm = wait_vm(&net, alive[0], REPROTECT_LIMIT, settled)
            .unwrap_or_else(|last| panic!("round {round}: not settled: {last}\n{}", logs(&net, &agents, &dir)));
        println!(
            "{tag} round {round}: {} after {:.1} s: primary on {:?}, backup on {:?}",
            expected_state,
            started.elapsed().as_secs_f64(),
            replica_hosts(&vm, "primary"),
            replica_hosts(&vm, "backup")
        );
        if alive.len() >= 2 {
            assert_ne!(replica_hosts(&vm, "primary"), replica_hosts(&vm, "backup"), "distinct hosts: {vm}");
        }
    }
    let (_, events) = api(&net, alive[0], "GET", "/v1/events", None);
    for event in events["events"].as_array().into_iter().flatten().filter(|e| e["kind"] == "failover") {
        println!("{tag}: {}", event["message"]);
    }
    // Each kill was followed by its failover (checked as each round settled). A backup may also
    // take over a primary starved past the detection timeout on a loaded host (it cannot tell
    // one from a dead primary): safe, and counted here, so at least two.
    let kinds = event_kinds(&net, alive[0]);
    let failovers = kinds.iter().filter(|k| *k == "failover").count();
    assert!(failovers >= 2, "{kinds:?}");
    println!("{tag}: {failovers} failovers ({} besides the two kills)", failovers - 2);
    assert!(kinds.iter().any(|k| k == "reprotect"), "{kinds:?}");
    client.check_no_value_lost_or_repeated().unwrap();
    drop(client);
    drop(orphans);
    drop(agents);
    drop(etcd);
    drop(net);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A partition and a store outage, on etcd (a `file:` store cannot be cut off from a host).
/// First the outage: etcd is stopped; the protected pair keeps serving; then the backup's
/// whole host is killed, and the primary, unable to swap the generation, holds its outputs
/// (its released epoch stands still and the client is told nothing) until etcd is back; then
/// it runs on, re-protected onto the third host. Then the partition: the primary's host is cut
/// off (its uplink down); its backup takes over and is re-protected onto the host killed
/// before (its agent started again); the link comes back, and the old primary, which held
/// its outputs all along, stands down (its process ends) and only one copy serves. Nothing
/// the client was told is lost or repeated at any point.
#[test]
fn a_store_outage_holds_a_primary_that_lost_its_backup_and_a_partitioned_primary_stands_down_on_rejoining() {
    let dir = std::env::temp_dir().join(format!("ftvm-cluster-partition-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("token"), TOKEN).unwrap();
    let net = Net::create("part");
    let mut etcd =
        EtcdServer::start_in_netns(&net.ns("sw"), ETCD_ADDR, &format!("cluster-part-{}", std::process::id()));
    let store = etcd.spec();
    let mut agents: Vec<Option<Agent>> =
        HOSTS.iter().enumerate().map(|(i, host)| Some(start_agent(&net, host, i, &store, &dir))).collect();
    let spec = json!({
        "name": "web", "protection": "checkpoint", "bridge": "br0",
        "command": ["/usr/share/ftvm/counter-httpd"],
    });
    // Asked again until the agent listens (0: no answer yet).
    let deadline = Instant::now() + Duration::from_secs(30);
    let (status, created) = loop {
        let (status, created) = api(&net, 0, "POST", "/v1/vms", Some(spec.clone()));
        if status != 0 || Instant::now() >= deadline {
            break (status, created);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status, 201, "{created}");
    // (Listed with its backup: an agent that has just re-executed sees a host alive only
    // once its report changes.)
    let protected = |vm: &Value| vm["state"] == "protected" && replica_hosts(vm, "backup").len() == 1;
    let vm = wait_vm(&net, 0, BOOT_LIMIT, protected)
        .unwrap_or_else(|last| panic!("not protected in time: {last}\n{}", logs(&net, &agents, &dir)));
    let client = Client::start(&net.ns("cl"));
    assert!(client.wait_for_answers(20, Duration::from_secs(60)), "no answers\n{}", logs(&net, &agents, &dir));
    let index_of = |host: &str| HOSTS.iter().position(|h| *h == host).expect("a host");
    let primary = index_of(vm["owner"].as_str().expect("an owner"));
    let backup = index_of(&replica_hosts(&vm, "backup")[0]);
    let third = (0..3).find(|i| *i != primary && *i != backup).expect("a third host");

    // The store goes away: the protected pair keeps serving.
    let outage = Instant::now();
    etcd.kill();
    client.check_nothing_lost(outage, 5, Duration::from_secs(30)).unwrap_or_else(|e| panic!("store outage: {e}"));
    // The backup's host dies while the store is away: the primary cannot swap the generation
    // forward to run alone, so it releases nothing.
    let status_socket = primary_socket(&dir, HOSTS[primary]).expect("the primary's API socket");
    agents[backup].take().expect("alive").kill_host();
    let lost = poll_status(&status_socket, Duration::from_secs(30), |s| s["replication"]["backup_connected"] == false)
        .unwrap_or_else(|| panic!("the primary never noticed its backup gone\n{}", logs(&net, &agents, &dir)));
    let released = lost["replication"]["released_epoch"].clone();
    let told_before = client.answers().len();
    // Held, not fenced, for as long as the store is away (here: 3 s of it).
    let hold_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < hold_until {
        let now = read_status(&status_socket)
            .unwrap_or_else(|| panic!("the primary died while holding\n{}", logs(&net, &agents, &dir)));
        assert_eq!(now["replication"]["released_epoch"], released, "released while unprotected: {now}");
        assert_eq!(now["replication"]["protected"], false, "{now}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let held = read_status(&status_socket).expect("the primary's status");
    assert!(held["replication"]["held_outputs"].as_u64() > Some(0), "the client's requests are held: {held}");
    assert!(client.answers().len() <= told_before + 2, "the client was told nothing while held");
    // The store is back: the primary swaps forward and releases what it held; the control loop
    // re-protects it onto the third host.
    let back = Instant::now();
    etcd.start_again();
    client.check_nothing_lost(back, 5, Duration::from_secs(60)).unwrap_or_else(|e| panic!("after the outage: {e}"));
    let reprotected =
        |vm: &Value| protected(vm) && vm["owner"] == HOSTS[primary] && replica_hosts(vm, "backup") == [HOSTS[third]];
    wait_vm(&net, primary, REPROTECT_LIMIT, reprotected)
        .unwrap_or_else(|last| panic!("not re-protected after the outage: {last}\n{}", logs(&net, &agents, &dir)));
    println!(
        "outage: held {:.1} s, protected again {:.1} s after etcd came back",
        back.duration_since(outage).as_secs_f64(),
        back.elapsed().as_secs_f64()
    );

    // The killed host comes back empty; then the primary's host is cut off.
    agents[backup] = Some(start_agent(&net, HOSTS[backup], backup, &store, &dir));
    let old_pid =
        read_status(&status_socket).and_then(|_| primary_pid(&dir, HOSTS[primary])).expect("the primary's PID");
    let cut = Instant::now();
    net.exec(HOSTS[primary], &["ip", "link", "set", "dev", "uplink", "down"]);
    let verdict = client
        .check_nothing_lost(cut, 5, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("partition: {e}\n{}", logs(&net, &agents, &dir)));
    println!("partition: {}", verdict.describe());
    let cut_off =
        poll_status(&status_socket, Duration::from_secs(30), |s| s["replication"]["backup_connected"] == false)
            .unwrap_or_else(|| panic!("the cut-off primary never noticed\n{}", logs(&net, &agents, &dir)));
    let cut_released = cut_off["replication"]["released_epoch"].clone();
    let taken_over =
        |vm: &Value| protected(vm) && vm["owner"] == HOSTS[third] && replica_hosts(vm, "backup") == [HOSTS[backup]];
    wait_vm(&net, third, REPROTECT_LIMIT, taken_over)
        .unwrap_or_else(|last| panic!("not taken over and re-protected: {last}\n{}", logs(&net, &agents, &dir)));
    // The link comes back: the old primary stands down, having released nothing since.
    if let Some(status) = read_status(&status_socket) {
        assert_eq!(status["replication"]["released_epoch"], cut_released, "released while cut off: {status}");
    }
    net.exec(HOSTS[primary], &["ip", "link", "set", "dev", "uplink", "up"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while process_runs(old_pid) {
        assert!(Instant::now() < deadline, "the old primary {old_pid} still runs\n{}", logs(&net, &agents, &dir));
        if let Some(status) = read_status(&status_socket) {
            assert_eq!(status["replication"]["released_epoch"], cut_released, "released after rejoining: {status}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let one_copy = |vm: &Value| {
        taken_over(vm)
            && replica_hosts(vm, "primary") == [HOSTS[third]]
            && vm["replicas"].as_array().map(Vec::len) == Some(2)
    };
    let vm = wait_vm(&net, primary, Duration::from_secs(30), one_copy)
        .unwrap_or_else(|last| panic!("not one copy after rejoining: {last}\n{}", logs(&net, &agents, &dir)));
    assert_eq!(vm["failovers"], 1, "{vm}");
    let rejoined = Instant::now();
    client.check_nothing_lost(rejoined, 5, Duration::from_secs(30)).unwrap_or_else(|e| panic!("after rejoining: {e}"));
    client.check_no_value_lost_or_repeated().unwrap();
    drop(client);
    drop(agents);
    drop(etcd);
    drop(net);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The API socket of the replica of `host` whose status says primary.
fn primary_socket(dir: &std::path::Path, host: &str) -> Option<std::path::PathBuf> {
    let entries = std::fs::read_dir(dir.join(host).join("replicas")).ok()?;
    entries
        .flatten()
        .map(|e| e.path().join("api.sock"))
        .find(|s| read_status(s).is_some_and(|v| v["role"] == "primary"))
}

/// The PID of `host`'s primary (its agent's record beside the replica).
fn primary_pid(dir: &std::path::Path, host: &str) -> Option<u32> {
    let socket = primary_socket(dir, host)?;
    let meta: Value = serde_json::from_slice(&std::fs::read(socket.with_file_name("replica.json")).ok()?).ok()?;
    meta["pid"].as_u64().and_then(|p| u32::try_from(p).ok())
}

/// Whether `pid` runs (a zombie does not).
fn process_runs(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty() && !stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z'))
}

/// A replica's typed status through its API socket (None: no answer, or not a status).
fn read_status(socket: &std::path::Path) -> Option<Value> {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.write_all(b"GET /status HTTP/1.1\r\nHost: localhost\r\n\r\n").ok()?;
    let mut answer = Vec::new();
    stream.take(1 << 20).read_to_end(&mut answer).ok()?;
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n")?;
    // A status, not an error answer (a VM that is ending says so).
    serde_json::from_slice::<Value>(&answer[split + 4..]).ok().filter(|status| status.get("role").is_some())
}

/// Polls a replica's status until `done` holds; that status.
fn poll_status(socket: &std::path::Path, limit: Duration, done: impl Fn(&Value) -> bool) -> Option<Value> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = read_status(socket).filter(&done) {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// The host owning the VM's record (asked until an agent answers: one may be re-executing,
/// or the store restarting).
fn vm_owner(net: &Net, index: usize) -> String {
    let vm = wait_vm(net, index, Duration::from_secs(20), |vm| vm["owner"].is_string())
        .unwrap_or_else(|last| panic!("no owner: {last}"));
    vm["owner"].as_str().unwrap_or_default().to_string()
}

/// `ftvm agent` with its store in a temporary directory and `extra` arguments: exit code, stderr.
fn agent_refusal(name: &str, extra: &[&str], token: Option<&str>) -> (Option<i32>, String) {
    let dir = std::env::temp_dir().join(format!("ftvm-cluster-refusal-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_ftvm"));
    command
        .args(["agent", "--host-name", "h1", "--listen", "127.0.0.1:0", "--store"])
        .arg(format!("file:{}", dir.join("store").display()))
        .arg("--work-dir")
        .arg(dir.join("work"))
        .args(extra)
        .env_remove("FTVM_TOKEN");
    if let Some(token) = token {
        command.env("FTVM_TOKEN", token);
    }
    let out = command.output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (out.status.code(), String::from_utf8_lossy(&out.stderr).trim().to_string())
}

#[test]
fn an_agent_refuses_a_bad_rules_file_naming_the_line() {
    let rules = std::env::temp_dir().join(format!("ftvm-cluster-bad-{}.rules", std::process::id()));
    std::fs::write(&rules, "# fine\nrule drain: when host.missed_heartbeats >= 3 then drain_host\nrule x: when host.cpu > 1 then drain_host\n")
        .unwrap();
    let (code, stderr) = agent_refusal("rules", &["--rules", rules.to_str().unwrap()], Some("t0ken"));
    let _ = std::fs::remove_file(&rules);
    assert_eq!(code, Some(125));
    assert_eq!(
        stderr,
        format!(
            "ftvm: error: --rules {}: line 3: unknown fact \"host.cpu\"; facts: host.missed_heartbeats, host.replicas, \
             host.memory_mib_free, replica.lag_epochs, replica.failovers, replica.role, host.label.KEY",
            rules.display()
        )
    );
}

#[test]
fn an_agent_without_a_token_refuses_to_start() {
    let (code, stderr) = agent_refusal("token", &[], None);
    assert_eq!(
        (code, stderr.as_str()),
        (Some(125), "ftvm: error: no API token: give --token-file FILE or set FTVM_TOKEN")
    );
    let (code, stderr) = agent_refusal("spaces", &[], Some("two words"));
    assert_eq!(
        (code, stderr.as_str()),
        (Some(125), "ftvm: error: the API token must be 1 to 256 printable characters without spaces")
    );
}
