//! Live migration end to end in network namespaces (root): a VM started alone (with the
//! ownership store) serves the counter workload in one host; `ftvm ctl migrate` hands it to
//! an `ftvm backup --listen` in the other host, through a relay of the test's own (so that
//! the link can be cut). A client records every value the guest's counter tells it, over
//! HTTP and over one long-lived TCP session: whatever happens to the migration, exactly one
//! VM runs afterwards, nothing it was told is lost, and the session survives.
//!
//! A protected VM migrates too: its backup is released first, and a fresh backup protects
//! it at the destination afterwards (then the destination's SIGKILL is survived). And a VM
//! whose ownership record is on etcd (a real one, on loopback) migrates, counted in the
//! destination's status and metrics.
//!
//! The interrupted migrations strike at the stage they test through fault points (feature
//! `failpoints`: `migrate::final-checkpoint` on the source, `migrate::dest-claim` and
//! `migrate::dest-claimed` on the destination) or on observed progress (a status field, a
//! log line), never after a guessed sleep.

mod common;
#[path = "../../store/tests/etcd_server.rs"]
mod etcd_server;

use common::client::Client;
use common::cluster::{is_protected, tail, Cluster, Options, BACKUP_PORT, BOOT_LIMIT, RELAY_PORT};
use common::netns::Topology;
use common::relay::Mode;
use common::strangers::{Kind, Strangers};
use serde_json::Value;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const ANSWERS_BEFORE: usize = 20;
/// Answers the client must get on each way in after the migration (or its fault).
const ANSWERS_AFTER: usize = 3;
const SETTLE_LIMIT: Duration = Duration::from_secs(60);

/// The source alone in the primary's host, the destination waiting in the backup's, the
/// client counting.
fn start(name: &str, primary_failpoints: Option<&str>, backup_failpoints: Option<&str>) -> (Cluster, Client) {
    let options = Options {
        primary_failpoints: primary_failpoints.map(String::from),
        backup_failpoints: backup_failpoints.map(String::from),
        ..Options::counter(common::seed())
    };
    start_with(name, options)
}

/// [`start`] with these options (the source always starts alone).
fn start_with(name: &str, options: Options) -> (Cluster, Client) {
    let options = Options { replicate: false, ..options };
    let cluster = Cluster::start(name, &options);
    let client = Client::start(&cluster.topo.client_ns());
    if !client.wait_for_answers(ANSWERS_BEFORE, BOOT_LIMIT) {
        panic!("the guest's counter never answered {ANSWERS_BEFORE} times\n{}", cluster.explain());
    }
    (cluster, client)
}

/// `ftvm ctl migrate` to the destination (through the relay), on a thread: it waits until
/// the migration is over. Its exit code and answer.
fn migrate(cluster: &Cluster) -> std::thread::JoinHandle<(i32, Result<Value, String>)> {
    let to = format!("{}:{RELAY_PORT}", Topology::BACKUP_REPL_ADDR);
    let key = cluster.key_file().display().to_string();
    let api = cluster.primary_api.clone();
    std::thread::spawn(move || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ftvm"))
            .args(["ctl", "--api"])
            .arg(api)
            .args(["migrate", "--to", &to, "--key", &key])
            .output()
            .expect("run ftvm ctl");
        let answer = serde_json::from_slice(&out.stdout).map_err(|_| String::from_utf8_lossy(&out.stderr).into());
        (out.status.code().unwrap_or(-1), answer)
    })
}

/// Wait until `file` has a line containing `text`.
fn wait_for_line(cluster: &Cluster, file: &std::path::Path, text: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if std::fs::read_to_string(file).unwrap_or_default().contains(text) {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("no line {text:?} in {} within {limit:?}\n{}", file.display(), cluster.explain());
}

/// Exactly one VM runs: the source (it kept the VM) or the destination (it went live), and
/// the other has exited; the client lost nothing across the fault at `fault`.
fn check_one_vm(cluster: &mut Cluster, client: &Client, fault: Instant, expect_destination: Option<bool>) -> Value {
    let deadline = Instant::now() + SETTLE_LIMIT;
    let (live_destination, status) = loop {
        let source = cluster.primary.exited().is_none().then(|| cluster.primary_status()).flatten();
        let destination = cluster.backup.exited().is_none().then(|| cluster.backup_status()).flatten();
        let source_runs = source.as_ref().is_some_and(|s| s["state"] == "running" && s["migration"].is_null());
        let destination_runs = destination.as_ref().is_some_and(|s| s["role"] == "primary");
        match (source_runs, destination_runs) {
            (true, false)
                if cluster.backup.exited().is_some() || destination.as_ref().is_some_and(|d| d["stale"] == true) =>
            {
                break (false, source.expect("runs"));
            }
            (false, true) if cluster.primary.exited().is_some() => break (true, destination.expect("runs")),
            (true, true) => panic!("two live VMs\n{}", cluster.explain()),
            _ => {}
        }
        assert!(Instant::now() < deadline, "no single live VM within {SETTLE_LIMIT:?}\n{}", cluster.explain());
        std::thread::sleep(Duration::from_millis(50));
    };
    if let Some(expected) = expect_destination {
        assert_eq!(live_destination, expected, "which replica runs the VM\n{}", cluster.explain());
    }
    let verdict = client
        .check_nothing_lost(fault, ANSWERS_AFTER, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.explain()));
    println!("live: {}; {}", if live_destination { "destination" } else { "source" }, verdict.describe());
    status
}

#[test]
fn a_vm_migrates_under_load_and_its_client_loses_nothing() {
    let (mut cluster, client) = start("migrate", None, None);
    let (code, answer) = migrate(&cluster).join().expect("ctl thread");
    let migrated = Instant::now();
    let answer = answer.unwrap_or_else(|e| panic!("ctl migrate: {e}\n{}", cluster.explain()));
    assert_eq!((code, &answer["state"]), (0, &"migrated".into()), "{answer}\n{}", cluster.explain());
    let figures = &answer["migration"];
    assert_eq!(figures["phase"], "handed_over", "{answer}");
    assert!(figures["bytes_sent"].as_u64().unwrap_or(0) > 1 << 20, "a full checkpoint went out: {answer}");
    let source_exit = cluster.primary.wait_exit(Duration::from_secs(30));
    assert!(source_exit.is_some_and(|s| s.success()), "the source exits 0: {source_exit:?}\n{}", cluster.explain());
    assert!(tail(&cluster.primary.log, 5).contains("migrated to"), "it says where the VM went\n{}", cluster.explain());
    let live = cluster.wait_backup("the destination live", SETTLE_LIMIT, |s| s["role"] == "primary");
    let arrival = &live["took_over"]["migration"];
    assert_eq!(arrival["confirmed"], true, "{live}");
    assert_eq!(live["took_over"]["generation"], answer["generation"], "{live}");
    println!(
        "migrated: total {} ms, {} bytes, source paused {} ms, downtime {} ms (destination's clock)",
        figures["total_ms"], figures["bytes_sent"], figures["paused_ms"], arrival["downtime_ms"]
    );
    let verdict = client
        .check_nothing_lost(migrated, ANSWERS_AFTER, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.explain()));
    println!("{}", verdict.describe());
    client.check_no_value_lost_or_repeated().unwrap_or_else(|e| panic!("{e}\n{}", cluster.explain()));
}

/// A protected VM migrates: its backup is released first (the record's generation swapped
/// forward, so that it can never take over, then told to stand down), the destination — a
/// third replica — is the VM's backup during the pre-copy, and once it runs a fresh backup
/// in the source's host protects it again; the destination's SIGKILL is then survived. The
/// client, judged from its side, loses nothing and sees no value twice throughout.
#[test]
fn a_protected_vm_migrates_and_is_protected_again_at_the_destination() {
    let options = Options { replicate: true, ..Options::counter(common::seed()) };
    let mut cluster = Cluster::start("migrate-protected", &options);
    let client = Client::start(&cluster.topo.client_ns());
    if !client.wait_for_answers(ANSWERS_BEFORE, BOOT_LIMIT) {
        panic!("the guest's counter never answered {ANSWERS_BEFORE} times\n{}", cluster.explain());
    }
    cluster.wait_protected(SETTLE_LIMIT);
    let (destination, destination_api, to) = cluster.spare_backup_in_backup_host("destination");
    let key = cluster.key_file().display().to_string();
    let (code, answer) = cluster.ctl_primary(&["migrate", "--to", &to, "--key", &key]);
    let migrated = Instant::now();
    let answer = answer.unwrap_or_else(|e| panic!("ctl migrate: {e}\n{}", cluster.explain()));
    assert_eq!((code, &answer["state"]), (0, &"migrated".into()), "{answer}\n{}", cluster.explain());
    // The old backup never runs again: it stood down (exit 0), or — when the stand-down did
    // not reach it (a link the loaded backup had just closed) — its state is stale (it belongs
    // to a generation the record has left), so it can never take over.
    let deadline = Instant::now() + SETTLE_LIMIT;
    loop {
        if let Some(exit) = cluster.backup.exited() {
            assert!(exit.success(), "the old backup stands down: {exit}\n{}", cluster.explain());
            break;
        }
        if cluster.backup_status().is_some_and(|s| s["stale"] == true && s["role"] == "backup") {
            cluster.kill_backup();
            break;
        }
        assert!(Instant::now() < deadline, "the old backup neither stood down nor is stale\n{}", cluster.explain());
        std::thread::sleep(Duration::from_millis(50));
    }
    let source_exit = cluster.primary.wait_exit(SETTLE_LIMIT);
    assert!(source_exit.is_some_and(|s| s.success()), "the source exits 0: {source_exit:?}\n{}", cluster.explain());
    // The destination runs the VM; a fresh backup in the source's host protects it.
    cluster.backup = destination;
    cluster.backup_api = destination_api;
    let live = cluster.wait_backup("the destination live", SETTLE_LIMIT, |s| s["role"] == "primary");
    assert_eq!(live["took_over"]["migration"]["confirmed"], true, "{live}");
    assert_eq!(live["took_over"]["generation"], answer["generation"], "{live}");
    client
        .check_nothing_lost(migrated, ANSWERS_AFTER, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.explain()));
    let backup = cluster.fresh_backup_in_primary_host(options.failover_timeout_ms);
    let (code, answer) = cluster.ctl_primary(&["protect", "--to", &backup, "--key", &key]);
    assert_eq!(code, 0, "ctl protect at the destination: {answer:?}\n{}", cluster.explain());
    let protected = cluster.wait_protected(SETTLE_LIMIT);
    assert!(is_protected(&protected), "{protected}");
    let fault = cluster.kill_primary();
    cluster.wait_takeover(SETTLE_LIMIT);
    let verdict = client
        .check_nothing_lost(fault, ANSWERS_AFTER, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.explain()));
    println!("{}", verdict.describe());
    client.check_no_value_lost_or_repeated().unwrap_or_else(|e| panic!("{e}\n{}", cluster.explain()));
}

/// A side of the migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Source,
    Destination,
}

/// How a test interrupts a migration.
enum Strike {
    /// A fault point aborts this side's process: the fault is its death.
    Abort(Side),
    /// Once the source logs this line (it waits at a fault point then), the destination is
    /// SIGKILLed.
    KillDestination(&'static str),
    /// Once this side logs this line (it waits at a fault point then), the link is cut.
    Cut(Side, &'static str),
    /// Once the destination logs this line (it waits at a fault point then), the source is
    /// SIGKILLed.
    KillSource(&'static str),
}

/// A migration with fault points (`FAILPOINTS` of the source and of the destination),
/// interrupted by `strike`: exactly one VM runs afterwards — on the side `live`, when the
/// stage decides it — and the client lost nothing. A migration the source survives is
/// answered with an error (called off).
fn interrupted(name: &str, failpoints: (Option<&str>, Option<&str>), strike: Strike, live: Option<Side>) {
    let (mut cluster, client) = start(name, failpoints.0, failpoints.1);
    let ctl = migrate(&cluster);
    let (source_log, destination_log) = (cluster.primary.log.clone(), cluster.backup.log.clone());
    let log = |side| match side {
        Side::Source => &source_log,
        Side::Destination => &destination_log,
    };
    match strike {
        Strike::Abort(Side::Source) => drop(cluster.primary.wait_exit(SETTLE_LIMIT)),
        Strike::Abort(Side::Destination) => drop(cluster.backup.wait_exit(SETTLE_LIMIT)),
        Strike::KillDestination(line) => {
            wait_for_line(&cluster, log(Side::Source), line, SETTLE_LIMIT);
            let _ = cluster.backup.child.kill();
            let _ = cluster.backup.child.wait();
        }
        Strike::Cut(side, line) => {
            wait_for_line(&cluster, log(side), line, SETTLE_LIMIT);
            cluster.relay.set(Mode::Cut);
        }
        Strike::KillSource(line) => {
            wait_for_line(&cluster, log(Side::Destination), line, SETTLE_LIMIT);
            let _ = cluster.primary.child.kill();
            let _ = cluster.primary.child.wait();
        }
    }
    let fault = Instant::now();
    let (code, answer) = ctl.join().expect("ctl thread");
    if live == Some(Side::Source) {
        assert_ne!(code, 0, "the migration is called off: {answer:?}");
    }
    check_one_vm(&mut cluster, &client, fault, live.map(|side| side == Side::Destination));
    cluster.relay.set(Mode::Pass);
}

/// The source dies during the stop-and-copy (right after its final checkpoint): the
/// destination, its backup meanwhile, takes over from what it holds.
#[test]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs fault points: --features failpoints")]
fn a_source_killed_at_the_stop_and_copy_leaves_the_destination_running() {
    let failpoints = (Some("migrate::final-checkpoint=return(abort)"), None);
    interrupted("migrate-src-stop", failpoints, Strike::Abort(Side::Source), Some(Side::Destination));
}

/// The source dies at the end of the pre-copy (the destination holds every checkpoint
/// taken): the destination takes over.
#[test]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs fault points: --features failpoints")]
fn a_source_killed_during_the_precopy_leaves_the_destination_running() {
    let failpoints = (Some("migrate::caught-up=return(abort)"), None);
    interrupted("migrate-src-pre", failpoints, Strike::Abort(Side::Source), Some(Side::Destination));
}

/// The destination dies during the pre-copy (the source holds at its end, at a fault point):
/// the migration is called off, the source runs on.
#[test]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs fault points: --features failpoints")]
fn a_destination_killed_during_the_precopy_leaves_the_source_running() {
    let failpoints = (Some("migrate::caught-up=sleep(2000)"), None);
    interrupted("migrate-dst-pre", failpoints, Strike::KillDestination("caught up"), Some(Side::Source));
}

/// The link is cut during the pre-copy: the destination, the source's backup meanwhile,
/// takes over, or the source goes on unprotected first; exactly one VM runs.
#[test]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs fault points: --features failpoints")]
fn a_link_cut_during_the_precopy_leaves_exactly_one_vm() {
    let failpoints = (Some("migrate::caught-up=sleep(2000)"), None);
    interrupted("migrate-cut-pre", failpoints, Strike::Cut(Side::Source, "caught up"), None);
}

/// The destination dies during the stop-and-copy (the source holds there, at a fault
/// point, with its final checkpoint sent): the source takes the VM back and runs on.
#[test]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs fault points: --features failpoints")]
fn a_destination_killed_at_the_stop_and_copy_leaves_the_source_running() {
    let failpoints = (Some("migrate::final-checkpoint=sleep(2000)"), None);
    interrupted("migrate-dst-stop", failpoints, Strike::KillDestination("stop-and-copy"), Some(Side::Source));
}

/// The link is cut during the stop-and-copy: the destination takes over from what it holds,
/// or the source keeps the VM; exactly one VM runs.
#[test]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs fault points: --features failpoints")]
fn a_link_cut_at_the_stop_and_copy_leaves_exactly_one_vm() {
    let failpoints = (Some("migrate::final-checkpoint=sleep(2000)"), None);
    interrupted("migrate-cut-stop", failpoints, Strike::Cut(Side::Source, "stop-and-copy"), None);
}

/// The destination dies after the switchover message, before it took the record: the
/// source takes the VM back.
#[test]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs fault points: --features failpoints")]
fn a_destination_killed_before_it_takes_the_record_leaves_the_source_running() {
    let failpoints = (None, Some("migrate::dest-claim=return(abort)"));
    interrupted("migrate-dst-claim", failpoints, Strike::Abort(Side::Destination), Some(Side::Source));
}

/// The destination dies after it took the record, before it confirmed: it never ran, so
/// the source takes the VM back by swapping the record once more.
#[test]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs fault points: --features failpoints")]
fn a_destination_killed_after_it_took_the_record_leaves_the_source_running() {
    let failpoints = (None, Some("migrate::dest-claimed=return(abort)"));
    interrupted("migrate-dst-claimed", failpoints, Strike::Abort(Side::Destination), Some(Side::Source));
}

/// The link is cut after the switchover message, while the destination holds the record
/// unconfirmed (it waits at a fault point): both sides time out and race to swap the
/// record; whichever wins runs, the other stops.
#[test]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs fault points: --features failpoints")]
fn a_link_cut_after_the_switchover_message_leaves_exactly_one_vm() {
    let failpoints = (None, Some("migrate::dest-claimed=sleep(1500)"));
    let strike = Strike::Cut(Side::Destination, "the ownership record is this replica's");
    interrupted("migrate-cut", failpoints, strike, None);
}

/// The source dies in the middle of the switchover: the destination has swapped the record
/// (it waits at a fault point before it answers `SwitchedOver`) and the source is SIGKILLed
/// before its `HandedOver`. The destination, without the source's word, swaps the record once
/// more after its handover timeout and runs; nothing the client was told is lost.
#[test]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs fault points: --features failpoints")]
fn a_source_killed_after_the_destination_took_the_record_leaves_the_destination_running() {
    let failpoints = (None, Some("migrate::dest-claimed=sleep(1500)"));
    let strike = Strike::KillSource("the ownership record is this replica's");
    interrupted("migrate-src-switch", failpoints, strike, Some(Side::Destination));
}

/// The destination's replication address, where strangers knock (not through the relay).
fn destination_port() -> SocketAddr {
    format!("{}:{BACKUP_PORT}", Topology::BACKUP_REPL_ADDR).parse().expect("an address")
}

/// Wait until `done`, polling; panics with `what` after `limit`.
fn wait_until(cluster: &Cluster, what: &str, limit: Duration, done: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}\n{}", cluster.explain());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Strangers on the destination's port before, during and after a migration: first a flood
/// (100 connections each of idle, garbage, slow-header and wrong-key strangers, and
/// hang-ups), then one of each kind every 50 ms throughout the migration and after it. A
/// second `ctl migrate` while the first is under way is refused. The migration completes,
/// the client loses nothing, the destination logs the strangers it refused (naming the wrong
/// key) and never panics.
#[test]
fn strangers_on_the_destinations_port_before_during_and_after_a_migration_disturb_nothing() {
    let seed = common::seed();
    let (mut cluster, client) = start("migrate-strangers", None, None);
    let ns = cluster.topo.primary_ns();
    let kinds = [Kind::Idle, Kind::Garbage, Kind::SlowHeader, Kind::WrongKey, Kind::Hangup];
    let flood = Strangers::flood(&ns, destination_port(), &kinds, 100, seed);
    wait_until(&cluster, "the flood", SETTLE_LIMIT, || flood.opened() + flood.refused() >= 500);
    let waiting = cluster.wait_backup("the destination waiting, strangers refused", SETTLE_LIMIT, |s| {
        s["refused_connections"].as_u64() >= Some(100)
    });
    assert_eq!(waiting["role"], "backup", "{waiting}");
    let during = Strangers::every(&ns, destination_port(), &kinds, Duration::from_millis(50), seed + 1);
    let ctl = migrate(&cluster);
    cluster.wait_primary("the migration under way", SETTLE_LIMIT, |s| s["migration"]["phase"] == "precopy");
    let key = cluster.key_file().display().to_string();
    let elsewhere = format!("{}:{BACKUP_PORT}", Topology::PRIMARY_REPL_ADDR);
    let (code, second) = cluster.ctl_primary(&["migrate", "--to", &elsewhere, "--key", &key]);
    assert!(code != 0 && format!("{second:?}").contains("under way already"), "a second migrate: {code} {second:?}");
    let (code, answer) = ctl.join().expect("ctl thread");
    let migrated = Instant::now();
    assert_eq!(code, 0, "the migration through the strangers: {answer:?}\n{}", cluster.explain());
    let exit = cluster.primary.wait_exit(SETTLE_LIMIT);
    assert!(exit.is_some_and(|s| s.success()), "the source exits 0: {exit:?}\n{}", cluster.explain());
    let live = cluster.wait_backup("the destination live", SETTLE_LIMIT, |s| s["role"] == "primary");
    assert_eq!(live["took_over"]["migration"]["confirmed"], true, "{live}");
    let knocked = during.opened() + during.refused();
    wait_until(&cluster, "strangers after the migration", SETTLE_LIMIT, || {
        during.opened() + during.refused() >= knocked + 50
    });
    let verdict = client
        .check_nothing_lost(migrated, ANSWERS_AFTER, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.explain()));
    client.check_no_value_lost_or_repeated().unwrap_or_else(|e| panic!("{e}\n{}", cluster.explain()));
    assert!(cluster.backup.exited().is_none(), "the destination runs\n{}", cluster.explain());
    let log = std::fs::read_to_string(&cluster.backup.log).unwrap_or_default();
    assert!(!log.contains("panicked"), "{}", tail(&cluster.backup.log, 40));
    let wrong_key =
        "refused: bad frame from the peer: the peer's first frame failed authentication: the two sides use \
                     different pre-shared keys (give both the same --key FILE)";
    assert!(log.contains(wrong_key), "the wrong key is named\n{}", tail(&cluster.backup.log, 40));
    println!(
        "strangers: flood {} opened / {} refused, then {} opened / {} refused; {}",
        flood.opened(),
        flood.refused(),
        during.opened(),
        during.refused(),
        verdict.describe()
    );
}

/// An operator's mistake, from the destination's view a stranger with the wrong key:
/// `ctl migrate --key` with another key is called off with an error that names the keys, the
/// VM runs on at the source, and the destination then takes the migration with the right key.
#[test]
fn a_migrate_with_the_wrong_key_is_called_off_saying_so_and_the_right_key_then_migrates() {
    let (mut cluster, client) = start("migrate-key", None, None);
    let wrong = cluster.dir.join("wrong-key");
    std::fs::write(&wrong, "ffeeddccbbaa99887766554433221100").expect("key file");
    let to = format!("{}:{RELAY_PORT}", Topology::BACKUP_REPL_ADDR);
    let (code, answer) = cluster.ctl_primary(&["migrate", "--to", &to, "--key", &wrong.display().to_string()]);
    let refused = Instant::now();
    assert!(
        code != 0 && format!("{answer:?}").contains("pre-shared keys"),
        "the wrong key is named: {code} {answer:?}\n{}",
        cluster.explain()
    );
    // The source runs on; the destination, which never heard an authenticated frame, waits.
    let source = cluster.primary_now();
    let destination = cluster.backup_now();
    assert!(
        source["state"] == "running" && source["migration"].is_null() && destination["role"] == "backup",
        "{source}\n{destination}"
    );
    client
        .check_nothing_lost(refused, ANSWERS_AFTER, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.explain()));
    let (code, answer) = migrate(&cluster).join().expect("ctl thread");
    let migrated = Instant::now();
    assert_eq!(code, 0, "with the right key: {answer:?}\n{}", cluster.explain());
    cluster.wait_backup("the destination live", SETTLE_LIMIT, |s| s["role"] == "primary");
    let verdict = client
        .check_nothing_lost(migrated, ANSWERS_AFTER, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.explain()));
    client.check_no_value_lost_or_repeated().unwrap_or_else(|e| panic!("{e}\n{}", cluster.explain()));
    println!("{}", verdict.describe());
}

/// The guest's command for the power-off tests: the counter service, and a listener on port
/// 7002 whose first connection, once closed, ends the command (and so the VM) with status 7.
fn counter_until_knocked() -> Vec<String> {
    let script = "/usr/share/ftvm/counter-httpd & nc -l -p 7002 >/dev/null; exit 7";
    ["sh", "-c", script].map(String::from).to_vec()
}

/// Knock on the guest's port 7002 from the client's host (waiting out a switchover: the SYN is
/// sent again), on a thread: the guest powers off.
fn knock(cluster: &Cluster) -> std::thread::JoinHandle<bool> {
    let netns = std::fs::File::open(format!("/var/run/netns/{}", cluster.topo.client_ns())).expect("namespace");
    std::thread::spawn(move || {
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns into the client's host");
        let addr: SocketAddr = "10.0.2.15:7002".parse().expect("an address");
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(30)).is_ok()
    })
}

/// The VM's record in the test's file store.
fn record(cluster: &Cluster, vm_id: &str) -> store::OwnershipRecord {
    let spec = format!("file:{}", cluster.dir.join("store").display());
    let mut store = store::open(&spec).expect("the file store opens");
    store.read(vm_id).expect("the store answers").expect("the VM has a record")
}

/// The guest powers off during the pre-copy, as a fault in sequence: the link stalls while
/// the full checkpoint is on its way (so the pre-copy cannot finish first), then the guest is
/// told to power off. The source ends the VM and answers `ctl migrate` with an error; the
/// destination, which never held a whole checkpoint, exits with the VM's status and never
/// goes live; the record says the VM ended.
#[test]
fn a_guest_that_powers_off_during_the_precopy_ends_once_and_never_runs_at_the_destination() {
    let options = Options { command: counter_until_knocked(), ..Options::counter(common::seed()) };
    let (mut cluster, _client) = start_with("migrate-off-pre", options);
    let vm_id = cluster.primary_now()["vm_id"].as_str().expect("a vm_id").to_string();
    let ctl = migrate(&cluster);
    cluster.wait_backup("the full checkpoint on its way", SETTLE_LIMIT, |s| {
        s["partial_checkpoint_bytes"].as_u64() > Some(0)
    });
    cluster.relay.set(Mode::Cut);
    assert!(knock(&cluster).join().expect("knock thread"), "the guest's port 7002 answered\n{}", cluster.explain());
    let (code, answer) = ctl.join().expect("ctl thread");
    assert_ne!(code, 0, "the migration of an ended VM is not answered as done: {answer:?}");
    let source = cluster.primary.wait_exit(SETTLE_LIMIT);
    let (destination, roles) = cluster.wait_backup_exit(SETTLE_LIMIT);
    cluster.relay.set(Mode::Pass);
    assert!(
        source.and_then(|s| s.code()) == Some(7)
            && destination.and_then(|s| s.code()) == Some(7)
            && roles.iter().all(|r| r == "backup"),
        "source exit {source:?}, destination exit {destination:?}, roles seen {roles:?}\n{}",
        cluster.explain()
    );
    let ended = record(&cluster, &vm_id);
    assert_eq!(ended.state, store::VmState::Ended { exit_code: 7 }, "{ended:?}");
}

/// The guest is told to power off while the source is paused for the stop-and-copy (it waits
/// at a fault point): the switchover goes on, the destination runs the VM, which gets the
/// request and ends there. Exactly one side reports the end: the source exits 0 saying the VM
/// migrated, the destination exits with the VM's status 7, and the record says it ended.
#[test]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs fault points: --features failpoints")]
fn a_guest_told_to_power_off_during_the_stop_and_copy_ends_at_the_destination_only() {
    let options = Options {
        command: counter_until_knocked(),
        primary_failpoints: Some("migrate::final-checkpoint=sleep(1500)".into()),
        ..Options::counter(common::seed())
    };
    let (mut cluster, _client) = start_with("migrate-off-stop", options);
    let vm_id = cluster.primary_now()["vm_id"].as_str().expect("a vm_id").to_string();
    let ctl = migrate(&cluster);
    wait_for_line(&cluster, &cluster.primary.log.clone(), "stop-and-copy", SETTLE_LIMIT);
    let knocked = knock(&cluster);
    let (code, answer) = ctl.join().expect("ctl thread");
    assert_eq!(code, 0, "the migration completes: {answer:?}\n{}", cluster.explain());
    assert!(knocked.join().expect("knock thread"), "the guest's port 7002 answered\n{}", cluster.explain());
    let source = cluster.primary.wait_exit(SETTLE_LIMIT);
    let destination = cluster.backup.wait_exit(SETTLE_LIMIT);
    assert!(
        source.and_then(|s| s.code()) == Some(0) && destination.and_then(|s| s.code()) == Some(7),
        "source exit {source:?}, destination exit {destination:?}\n{}",
        cluster.explain()
    );
    assert!(tail(&cluster.primary.log, 5).contains("migrated to"), "{}", cluster.explain());
    let ended = record(&cluster, &vm_id);
    assert_eq!(ended.state, store::VmState::Ended { exit_code: 7 }, "{ended:?}");
}

/// Faults in sequence: the link is cut loudly during the full checkpoint (the pre-copy goes
/// on over a new connection), then silently at the end of the pre-copy for longer than the
/// source waits (the destination's detection timeout is longer still): the migration is
/// called off and the source runs on. Retried to the same destination, it completes; then the
/// VM migrates on to a third replica back in the first host (A → B → A). One VM throughout,
/// and the client, counting all along, loses nothing and sees no value twice.
#[test]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs fault points: --features failpoints")]
fn a_migration_cut_twice_and_called_off_is_retried_to_the_same_destination_then_moves_on() {
    let options = Options {
        failover_timeout_ms: 10_000,
        primary_failpoints: Some("migrate::caught-up=1*sleep(1500)".into()),
        ..Options::counter(common::seed())
    };
    let (mut cluster, client) = start_with("migrate-retry", options);
    let ctl = migrate(&cluster);
    cluster.wait_backup("the full checkpoint on its way", SETTLE_LIMIT, |s| {
        s["partial_checkpoint_bytes"].as_u64() > Some(0) || !s["applied_epoch"].is_null()
    });
    let connections = cluster.relay.stats().connections;
    cluster.relay.reset();
    wait_for_line(&cluster, &cluster.primary.log.clone(), "caught up", SETTLE_LIMIT);
    assert!(cluster.relay.stats().connections > connections, "the source came back after the first cut");
    cluster.relay.set(Mode::Cut);
    let cut = Instant::now();
    let (code, answer) = ctl.join().expect("ctl thread");
    assert_ne!(code, 0, "the migration is called off: {answer:?}\n{}", cluster.explain());
    cluster.relay.set(Mode::Pass);
    check_one_vm(&mut cluster, &client, cut, Some(false));
    let (code, answer) = migrate(&cluster).join().expect("ctl thread");
    let migrated = Instant::now();
    assert_eq!(code, 0, "retried to the same destination: {answer:?}\n{}", cluster.explain());
    let exit = cluster.primary.wait_exit(SETTLE_LIMIT);
    assert!(exit.is_some_and(|s| s.success()), "the source exits 0: {exit:?}\n{}", cluster.explain());
    cluster.wait_backup("B live", SETTLE_LIMIT, |s| s["role"] == "primary");
    client
        .check_nothing_lost(migrated, ANSWERS_AFTER, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.explain()));
    // B → a third replica in A's host.
    let to = cluster.fresh_backup_in_primary_host(500);
    let key = cluster.key_file().display().to_string();
    let (code, answer) = cluster.ctl_primary(&["migrate", "--to", &to, "--key", &key]);
    let moved = Instant::now();
    assert_eq!(code, 0, "migrated on to A's host: {answer:?}\n{}", cluster.explain());
    let exit = cluster.primary.wait_exit(SETTLE_LIMIT);
    assert!(exit.is_some_and(|s| s.success()), "B exits 0: {exit:?}\n{}", cluster.explain());
    let live = cluster.wait_backup("the third replica live", SETTLE_LIMIT, |s| s["role"] == "primary");
    assert_eq!(live["took_over"]["migration"]["confirmed"], true, "{live}");
    let verdict = client
        .check_nothing_lost(moved, ANSWERS_AFTER, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.explain()));
    client.check_no_value_lost_or_repeated().unwrap_or_else(|e| panic!("{e}\n{}", cluster.explain()));
    println!("A -> B (cut twice, called off) -> B -> A: {}", verdict.describe());
}

/// `GET PATH` on a control socket: the body of a 200 answer.
fn get(api: &std::path::Path, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(api).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: ftvm\r\nConnection: close\r\n\r\n").ok()?;
    let mut reply = String::new();
    stream.take(1 << 20).read_to_string(&mut reply).ok()?;
    let (head, body) = reply.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// `ftvm ARGS` on this host, its standard error to DIR/NAME.log; killed on drop.
fn spawn_here(dir: &std::path::Path, name: &str, args: &[&str]) -> common::cluster::Proc {
    let log = dir.join(format!("{name}.log"));
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_ftvm"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("start ftvm");
    common::cluster::Proc { child, log }
}

/// The VM's record on etcd, read as any replica reads it.
fn record_on(spec: &str, vm_id: &str) -> store::OwnershipRecord {
    let mut store = store::open(spec).expect("the etcd store opens");
    store.read(vm_id).expect("etcd answers").expect("the VM has a record")
}

/// A VM whose ownership record is on etcd (Debian's etcd-server on loopback, stopped by its
/// PID) migrates between two processes on this host while its guest writes memory: the
/// source exits 0, the record on etcd names the destination at the generation `ctl migrate`
/// answered, and the destination counts the arrival and its downtime in status and metrics.
#[test]
fn a_vm_whose_record_is_on_etcd_migrates_and_the_destination_counts_it() {
    let etcd = etcd_server::EtcdServer::start(&format!("migrate-{}", std::process::id()));
    let scratch = common::scratch("migrate", "etcd");
    let dir = scratch.parent().expect("its directory");
    let key = dir.join("key");
    std::fs::write(&key, "00112233445566778899aabbccddeeff").expect("key file");
    let (spec, vm_id) = (etcd.spec(), "migrate-etcd");
    let (source_api, destination_api) = (dir.join("source.sock"), dir.join("destination.sock"));
    let workload = "while true; do dd if=/dev/zero of=/tmp/w bs=64k count=64 2>/dev/null; rm /tmp/w; done";
    let source_api_s = source_api.display().to_string();
    let source_args = ["run", "--store", &spec, "--vm-id", vm_id, "--api", &source_api_s, "--", "sh", "-c", workload];
    let mut source = spawn_here(dir, "source", &source_args);
    let deadline = Instant::now() + BOOT_LIMIT;
    let booted = || common::cluster::status(&source_api).is_some_and(|s| s["icount"].as_u64() > Some(300_000_000));
    while !booted() {
        assert!(source.exited().is_none(), "the source exited:\n{}", tail(&source.log, 20));
        assert!(Instant::now() < deadline, "the guest did not boot within {BOOT_LIMIT:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = record_on(&spec, vm_id);
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
    let listen = format!("127.0.0.1:{port}");
    let api = destination_api.display().to_string();
    let key_s = key.display().to_string();
    let destination_args = [
        "backup",
        "--listen",
        &listen,
        "--key",
        &key_s,
        "--store",
        &spec,
        "--vm-id",
        vm_id,
        "--api",
        &api,
        "--failover-timeout-ms",
        "500",
    ];
    let mut destination = spawn_here(dir, "destination", &destination_args);
    let deadline = Instant::now() + Duration::from_secs(30);
    while common::cluster::status(&destination_api).is_none() {
        assert!(Instant::now() < deadline, "the destination never answered:\n{}", tail(&destination.log, 20));
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ftvm"))
        .args(["ctl", "--api", &source_api_s, "migrate", "--to", &listen, "--key", &key_s])
        .output()
        .expect("run ftvm ctl");
    let answer: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("ctl migrate: {}\n{}", String::from_utf8_lossy(&out.stderr), tail(&source.log, 20)));
    assert_eq!(answer["state"], "migrated", "{answer}\n{}", tail(&source.log, 20));
    let exit = source.wait_exit(SETTLE_LIMIT);
    assert!(exit.is_some_and(|s| s.success()), "the source exits 0: {exit:?}\n{}", tail(&source.log, 20));
    let deadline = Instant::now() + SETTLE_LIMIT;
    let live = loop {
        let status = common::cluster::status(&destination_api);
        if let Some(s) = status.filter(|s| s["role"] == "primary" && !s["migrations"].is_null()) {
            break s;
        }
        assert!(destination.exited().is_none(), "the destination exited:\n{}", tail(&destination.log, 20));
        assert!(Instant::now() < deadline, "the destination never ran:\n{}", tail(&destination.log, 20));
        std::thread::sleep(Duration::from_millis(20));
    };
    let after = record_on(&spec, vm_id);
    assert_eq!(Some(after.generation), answer["generation"].as_u64(), "{answer}");
    assert_eq!(after.generation, before.generation + 1, "one swap: {before:?} -> {after:?}");
    assert_ne!(after.owner, before.owner, "the record names the destination now");
    assert_eq!(live["took_over"]["generation"], answer["generation"], "{live}");
    assert_eq!(live["took_over"]["migration"]["confirmed"], true, "{live}");
    let downtime_ms = live["migrations"]["last_downtime_ms"].as_f64().unwrap_or(0.0);
    assert_eq!(live["migrations"]["arrived"], 1, "{live}");
    assert!(downtime_ms > 0.0, "{live}");
    let metrics = get(&destination_api, "/metrics").expect("the destination's metrics");
    assert!(
        metrics.contains("ftvm_migrations_arrived_total{role=\"primary\",vm_id=\"migrate-etcd\"} 1\n"),
        "{metrics}"
    );
    assert!(metrics.contains("ftvm_migration_last_downtime_seconds{"), "{metrics}");
    println!(
        "on etcd: total {} ms, {} bytes, downtime {downtime_ms:.2} ms, phases {}",
        answer["migration"]["total_ms"], answer["migration"]["bytes_sent"], live["took_over"]["migration"]["phases"]
    );
}
