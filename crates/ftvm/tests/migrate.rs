//! Live migration end to end in network namespaces (root): a VM started alone (with the
//! ownership store) serves the counter workload in one host; `ftvm ctl migrate` hands it to
//! an `ftvm backup --listen` in the other host, through a relay of the test's own (so that
//! the link can be cut). A client records every value the guest's counter tells it, over
//! HTTP and over one long-lived TCP session: whatever happens to the migration, exactly one
//! VM runs afterwards, nothing it was told is lost, and the session survives.
//!
//! The interrupted migrations strike at the stage they test through fault points (feature
//! `failpoints`: `migrate::final-checkpoint` on the source, `migrate::dest-claim` and
//! `migrate::dest-claimed` on the destination) or on observed progress (a status field, a
//! log line), never after a guessed sleep.

mod common;

use common::client::Client;
use common::cluster::{tail, Cluster, Options, BOOT_LIMIT, RELAY_PORT};
use common::netns::Topology;
use common::relay::Mode;
use serde_json::Value;
use std::time::{Duration, Instant};

const ANSWERS_BEFORE: usize = 20;
/// Answers the client must get on each way in after the migration (or its fault).
const ANSWERS_AFTER: usize = 3;
const SETTLE_LIMIT: Duration = Duration::from_secs(60);

/// The source alone in the primary's host, the destination waiting in the backup's, the
/// client counting.
fn start(name: &str, primary_failpoints: Option<&str>, backup_failpoints: Option<&str>) -> (Cluster, Client) {
    let options = Options {
        replicate: false,
        primary_failpoints: primary_failpoints.map(String::from),
        backup_failpoints: backup_failpoints.map(String::from),
        ..Options::counter(common::seed())
    };
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

/// The source dies during the stop-and-copy (right after its final checkpoint): the
/// destination, its backup meanwhile, takes over from what it holds.
#[test]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs fault points: --features failpoints")]
fn a_source_killed_at_the_stop_and_copy_leaves_the_destination_running() {
    let (mut cluster, client) = start("migrate-src-stop", Some("migrate::final-checkpoint=return(abort)"), None);
    let ctl = migrate(&cluster);
    let _ = cluster.primary.wait_exit(SETTLE_LIMIT);
    let fault = Instant::now();
    let _ = ctl.join();
    check_one_vm(&mut cluster, &client, fault, Some(true));
}

/// The source dies at the end of the pre-copy (the destination holds every checkpoint
/// taken): the destination takes over.
#[test]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs fault points: --features failpoints")]
fn a_source_killed_during_the_precopy_leaves_the_destination_running() {
    let (mut cluster, client) = start("migrate-src-pre", Some("migrate::caught-up=return(abort)"), None);
    let ctl = migrate(&cluster);
    let _ = cluster.primary.wait_exit(SETTLE_LIMIT);
    let fault = Instant::now();
    let _ = ctl.join();
    check_one_vm(&mut cluster, &client, fault, Some(true));
}

/// The destination dies during the pre-copy (the source holds at its end, at a fault point):
/// the migration is called off, the source runs on.
#[test]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs fault points: --features failpoints")]
fn a_destination_killed_during_the_precopy_leaves_the_source_running() {
    let (mut cluster, client) = start("migrate-dst-pre", Some("migrate::caught-up=sleep(2000)"), None);
    let ctl = migrate(&cluster);
    let log = cluster.primary.log.clone();
    wait_for_line(&cluster, &log, "caught up", SETTLE_LIMIT);
    let _ = cluster.backup.child.kill();
    let _ = cluster.backup.child.wait();
    let fault = Instant::now();
    let (code, answer) = ctl.join().expect("ctl thread");
    assert_ne!(code, 0, "the migration is called off: {answer:?}");
    check_one_vm(&mut cluster, &client, fault, Some(false));
}

/// The link is cut during the pre-copy: the destination, the source's backup meanwhile,
/// takes over, or the source goes on unprotected first; exactly one VM runs.
#[test]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs fault points: --features failpoints")]
fn a_link_cut_during_the_precopy_leaves_exactly_one_vm() {
    let (mut cluster, client) = start("migrate-cut-pre", Some("migrate::caught-up=sleep(2000)"), None);
    let ctl = migrate(&cluster);
    let log = cluster.primary.log.clone();
    wait_for_line(&cluster, &log, "caught up", SETTLE_LIMIT);
    cluster.relay.set(Mode::Cut);
    let fault = Instant::now();
    let _ = ctl.join();
    check_one_vm(&mut cluster, &client, fault, None);
    cluster.relay.set(Mode::Pass);
}

/// The destination dies during the stop-and-copy (the source holds there, at a fault
/// point, with its final checkpoint sent): the source takes the VM back and runs on.
#[test]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs fault points: --features failpoints")]
fn a_destination_killed_at_the_stop_and_copy_leaves_the_source_running() {
    let (mut cluster, client) = start("migrate-dst-stop", Some("migrate::final-checkpoint=sleep(2000)"), None);
    let ctl = migrate(&cluster);
    let log = cluster.primary.log.clone();
    wait_for_line(&cluster, &log, "stop-and-copy", SETTLE_LIMIT);
    let _ = cluster.backup.child.kill();
    let _ = cluster.backup.child.wait();
    let fault = Instant::now();
    let (code, answer) = ctl.join().expect("ctl thread");
    assert_ne!(code, 0, "the migration is called off: {answer:?}");
    check_one_vm(&mut cluster, &client, fault, Some(false));
}

/// The link is cut during the stop-and-copy: the destination takes over from what it holds,
/// or the source keeps the VM; exactly one VM runs.
#[test]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs fault points: --features failpoints")]
fn a_link_cut_at_the_stop_and_copy_leaves_exactly_one_vm() {
    let (mut cluster, client) = start("migrate-cut-stop", Some("migrate::final-checkpoint=sleep(2000)"), None);
    let ctl = migrate(&cluster);
    let log = cluster.primary.log.clone();
    wait_for_line(&cluster, &log, "stop-and-copy", SETTLE_LIMIT);
    cluster.relay.set(Mode::Cut);
    let fault = Instant::now();
    let _ = ctl.join();
    check_one_vm(&mut cluster, &client, fault, None);
    cluster.relay.set(Mode::Pass);
}

/// The destination dies after the switchover message, before it took the record: the
/// source takes the VM back.
#[test]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs fault points: --features failpoints")]
fn a_destination_killed_before_it_takes_the_record_leaves_the_source_running() {
    let (mut cluster, client) = start("migrate-dst-claim", None, Some("migrate::dest-claim=return(abort)"));
    let ctl = migrate(&cluster);
    let _ = cluster.backup.wait_exit(SETTLE_LIMIT);
    let fault = Instant::now();
    let (code, answer) = ctl.join().expect("ctl thread");
    assert_ne!(code, 0, "the migration is called off: {answer:?}");
    check_one_vm(&mut cluster, &client, fault, Some(false));
}

/// The destination dies after it took the record, before it confirmed: it never ran, so
/// the source takes the VM back by swapping the record once more.
#[test]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs fault points: --features failpoints")]
fn a_destination_killed_after_it_took_the_record_leaves_the_source_running() {
    let (mut cluster, client) = start("migrate-dst-claimed", None, Some("migrate::dest-claimed=return(abort)"));
    let ctl = migrate(&cluster);
    let _ = cluster.backup.wait_exit(SETTLE_LIMIT);
    let fault = Instant::now();
    let (code, answer) = ctl.join().expect("ctl thread");
    assert_ne!(code, 0, "the migration is called off: {answer:?}");
    let status = check_one_vm(&mut cluster, &client, fault, Some(false));
    println!("source after taking the VM back: generation {:?}", status["took_over"]);
}

/// The link is cut after the switchover message, while the destination holds the record
/// unconfirmed (it waits at a fault point): both sides time out and race to swap the
/// record; whichever wins runs, the other stops.
#[test]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs fault points: --features failpoints")]
fn a_link_cut_after_the_switchover_message_leaves_exactly_one_vm() {
    let (mut cluster, client) = start("migrate-cut", None, Some("migrate::dest-claimed=sleep(1500)"));
    let ctl = migrate(&cluster);
    let log = cluster.backup.log.clone();
    wait_for_line(&cluster, &log, "the ownership record is this replica's", SETTLE_LIMIT);
    cluster.relay.set(Mode::Cut);
    let fault = Instant::now();
    let _ = ctl.join();
    check_one_vm(&mut cluster, &client, fault, None);
    cluster.relay.set(Mode::Pass);
}
