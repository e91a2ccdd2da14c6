//! Checkpoint replication under faults of the link and of strangers, end to end in
//! network namespaces (root). A primary and a backup run the counter service; a client
//! in its own namespace records every value it is told; the replication link runs
//! through an impairment relay. After each fault the primary is killed with SIGKILL and
//! the client checks that the guest that carries on continues strictly above every
//! value it was ever told. Verdicts come from the replicas' typed status
//! (`ftvm ctl status` JSON) and the client's record, never from log wording.
//!
//! Detection timeout 500 ms, so that a loaded machine does not cause spurious takeovers;
//! 1500 ms where the link is cut, so that the primary (which gives up on a silent backup
//! after 500 ms and a 200 ms grace) is surely the side that stays live.
//! A failing run prints FTVM_TEST_SEED (the relay's damage and the strangers' bytes).

mod common;

use common::capture::{self, Capture};
use common::client::{Client, Verdict};
use common::cluster::{
    is_live, is_protected, sample_lag, status_within, Cluster, Options, BACKUP_PORT, BOOT_LIMIT, GUEST_MAC,
};
use common::netns::Topology;
use common::relay::Mode;
use common::seed;
use common::strangers::{Kind, Strangers};
use serde_json::Value;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The backup's acknowledged epoch may trail by one second of epochs.
const ONE_SECOND_OF_EPOCHS: u64 = 1000 / 25;
const PROTECTED_LIMIT: Duration = Duration::from_secs(60);
const TAKEOVER_LIMIT: Duration = Duration::from_secs(30);
/// Where the link is cut: the backup's detection timeout, well beyond the 450 ms the
/// primary takes to swap the generation forward and serve unprotected.
const CUT_FAILOVER_TIMEOUT_MS: u64 = 1500;
/// The backup's cap on pending handshakes (replica's BackupConfig default).
const MAX_PENDING_HANDSHAKES: u64 = 16;
/// The first MAC announcement reaches the client this soon after the takeover...
const ANNOUNCE_WITHIN: Duration = Duration::from_millis(300);
/// ...and the takeover comes this soon after the detection timeout (one swap of the
/// ownership record, on a loaded machine).
const TAKEOVER_SLACK: Duration = Duration::from_millis(400);
/// Answers the client must get on each way in (HTTP and the session) after a takeover.
const ANSWERS_AFTER: usize = 3;

/// The counter, with the detection timeout of the tests that cut the link.
fn cut_options(seed: u64) -> Options {
    Options { failover_timeout_ms: CUT_FAILOVER_TIMEOUT_MS, ..Options::counter(seed) }
}

/// Boot the counter replicated; return once the client has been answered and the
/// primary is protected.
fn started(name: &str, options: Options) -> (Cluster, Client) {
    let mut cluster = Cluster::start(name, &options);
    let client = Client::start(&cluster.topo.client_ns());
    if !client.wait_for_answers(20, BOOT_LIMIT) {
        panic!("the guest's counter never answered 20 times\n{}", cluster.explain());
    }
    cluster.wait_protected(PROTECTED_LIMIT);
    (cluster, client)
}

/// SIGKILL the primary; the backup must take over and the client must be told only
/// values above every value told before.
fn kill_and_check(cluster: &mut Cluster, client: &Client, seed: u64) -> Verdict {
    let killed = cluster.kill_primary();
    let live = cluster.wait_takeover(TAKEOVER_LIMIT);
    let verdict = client
        .check_nothing_lost(killed, ANSWERS_AFTER, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("seed {seed}: {e}\n{}", cluster.explain()));
    assert!(live["took_over"]["generation"].is_u64(), "a takeover names its generation: {live}");
    verdict
}

fn replication(status: &Value, field: &str) -> Value {
    status["replication"][field].clone()
}

fn backup_port() -> SocketAddr {
    format!("{}:{BACKUP_PORT}", Topology::BACKUP_REPL_ADDR).parse().unwrap()
}

#[test]
fn a_cut_link_that_heals_resynchronizes_under_a_new_generation_and_a_later_sigkill_loses_nothing() {
    let seed = seed();
    let (mut cluster, client) = started("cut-heal", cut_options(seed));
    let before = cluster.primary_now();
    let generation = replication(&before, "generation").as_u64().unwrap();
    let unprotected = replication(&before, "unprotected_count").as_u64().unwrap();

    cluster.relay.set(Mode::Cut);
    let cut = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    // The primary kept serving (--on-backup-loss continue), unprotected; the backup's
    // state is stale: it may not go live from it.
    let primary = cluster.primary_now();
    let backup = cluster.backup_now();
    let served = client.answers_after(cut).len();
    assert!(served >= 10, "the primary served {served} answers during the cut\n{}", cluster.explain());
    assert!(!is_protected(&primary), "protected without its backup: {primary}");
    assert_eq!((&backup["role"], &backup["stale"]), (&Value::from("backup"), &Value::from(true)), "{backup}");

    cluster.relay.set(Mode::Pass);
    let healed = cluster.wait_protected(Duration::from_secs(30));
    assert!(replication(&healed, "generation").as_u64().unwrap() > generation, "{healed}");
    assert!(replication(&healed, "unprotected_count").as_u64().unwrap() > unprotected, "{healed}");
    cluster.wait_backup("the backup resynchronized", Duration::from_secs(10), |s| s["stale"] == false);
    client.check_no_value_lost_or_repeated().unwrap_or_else(|e| panic!("seed {seed}: {e}\n{}", cluster.explain()));
    let verdict = kill_and_check(&mut cluster, &client, seed);
    println!("{}", verdict.describe());
}

#[test]
fn a_primary_killed_while_cut_off_is_never_brought_back_from_an_older_state() {
    let seed = seed();
    let (mut cluster, client) = started("cut-kill", cut_options(seed));
    cluster.relay.set(Mode::Cut);
    let cut = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let served = client.answers_after(cut).len();
    assert!(served >= 10, "the primary served {served} answers during the cut\n{}", cluster.explain());
    let killed = cluster.kill_primary();
    cluster.relay.set(Mode::Pass);
    // Long past the detection timeout (and TCP's backoff): a backup allowed to go live
    // would have, and the client would have been answered.
    let mut roles = Vec::new();
    while killed.elapsed() < Duration::from_secs(8) {
        let backup = cluster.backup_status();
        roles.push(backup.as_ref().map(|s| (s["role"].clone(), s["stale"].clone())));
        std::thread::sleep(Duration::from_millis(200));
    }
    client.check_no_value_lost_or_repeated().unwrap_or_else(|e| panic!("seed {seed}: {e}\n{}", cluster.explain()));
    let after = client.answers_after(killed).len();
    assert_eq!(after, 0, "the client was answered {after} times with no primary\n{}", cluster.explain());
    let waiting_stale = Some((Value::from("backup"), Value::from(true)));
    assert!(
        roles.iter().all(|r| *r == waiting_stale),
        "the backup's (role, stale) after the kill: {roles:?}\n{}",
        cluster.explain()
    );
}

#[test]
fn a_link_damaging_one_chunk_in_a_hundred_keeps_the_backup_within_a_second_and_loses_nothing() {
    let seed = seed();
    let (mut cluster, client) = started("damage", Options::counter(seed));
    let connections_before = cluster.relay.stats().connections;
    cluster.relay.set(Mode::Damage(0.01));
    let lag = sample_lag(&cluster, Duration::from_secs(12), ONE_SECOND_OF_EPOCHS);
    let stats = cluster.relay.stats();
    let damaged = stats.damaged_chunks;
    assert!(damaged >= 5, "the relay damaged only {damaged} chunks: {stats:?}");
    let advanced = lag.last_acked.unwrap_or(0).saturating_sub(lag.first_acked.unwrap_or(0));
    // The aim: within a second for 90% of the run. A frame damaged in its payload is
    // sent again on the same connection; only damage to a header (a small part of the bytes)
    // costs a reconnect. Seen with the host loaded (load 5-10 on 2 cores): 100% of samples
    // within a second, the worst lag 2-14 epochs, 10-16 connections through the relay in the
    // whole test; before the in-connection repair, every damaged frame cost a reconnect (337
    // connections, a quarter of the samples without a backup) and loaded runs fell to 11-42%.
    println!("damage: {:.0}% of samples within one second of epochs: {lag:?}", lag.share_within() * 100.0);
    assert!(
        lag.share_within() >= 0.9 && advanced >= 12 * 1000 / 25 / 2,
        "seed {seed}: with {damaged} damaged chunks the acknowledged epoch advanced by {advanced} and trailed by at most one second in {:.0}% of the run: {lag:?}\n{}",
        lag.share_within() * 100.0,
        cluster.explain()
    );
    let reconnects = stats.connections - connections_before;
    assert!(
        reconnects <= 50,
        "seed {seed}: {reconnects} new connections during the damage ({damaged} damaged chunks): frames damaged in their payload must be sent again within the connection\n{}",
        cluster.explain()
    );
    cluster.relay.set(Mode::Pass);
    cluster.wait_protected(Duration::from_secs(30));
    let verdict = kill_and_check(&mut cluster, &client, seed);
    println!("damaged chunks {damaged}, relay {:?}, {lag:?}; {}", cluster.relay.stats(), verdict.describe());
}

#[test]
fn stranger_connections_to_the_backup_port_never_disturb_replication_nor_the_takeover() {
    let seed = seed();
    let (mut cluster, client) = started("strangers", Options::counter(seed));
    let before = cluster.primary_now();
    let unprotected = replication(&before, "unprotected_count");
    // From the primary's host, as the real primary: an idle connection and a garbage
    // sender every 0.5 s, plus slow headers and hang-ups.
    let kinds = [Kind::Idle, Kind::Garbage, Kind::SlowHeader, Kind::Hangup];
    let strangers =
        Strangers::every(&cluster.topo.primary_ns(), backup_port(), &kinds, Duration::from_millis(500), seed);
    let lag = sample_lag(&cluster, Duration::from_secs(8), ONE_SECOND_OF_EPOCHS);
    let after = cluster.primary_now();
    assert!(strangers.opened() >= 20, "only {} stranger connections opened", strangers.opened());
    assert!(
        lag.share_within() >= 0.9 && lag.disconnected == 0 && replication(&after, "unprotected_count") == unprotected,
        "seed {seed}: strangers disturbed the link: {lag:?}, status {after}\n{}",
        cluster.explain()
    );
    let verdict = kill_and_check(&mut cluster, &client, seed);
    drop(strangers);
    println!("{lag:?}; {}", verdict.describe());
}

/// Faults in sequence, from outside, during a transition: the backup is SIGKILLed while its
/// first full checkpoint is on its way (or just after, if it was quicker than the poll), with
/// strangers on its port; a new backup starts in its place, and the primary (which served on,
/// unprotected) protects the VM with it; then the primary is SIGKILLed and the new backup
/// takes over with nothing the client was told lost.
#[test]
fn a_backup_killed_during_its_first_full_checkpoint_is_replaced_and_a_later_sigkill_loses_nothing() {
    let seed = seed();
    let mut cluster = Cluster::start("full-kill", &Options::counter(seed));
    let receiving = cluster.wait_backup("the first full checkpoint under way", BOOT_LIMIT, |s| {
        s["partial_checkpoint_bytes"].as_u64() > Some(0) || !s["applied_epoch"].is_null()
    });
    cluster.kill_backup();
    let during = receiving["applied_epoch"].is_null();
    let kinds = [Kind::Idle, Kind::Garbage, Kind::Hangup];
    let strangers =
        Strangers::every(&cluster.topo.primary_ns(), backup_port(), &kinds, Duration::from_millis(300), seed);
    let client = Client::start(&cluster.topo.client_ns());
    if !client.wait_for_answers(20, BOOT_LIMIT) {
        panic!("the guest's counter never answered 20 times\n{}", cluster.explain());
    }
    cluster.restart_backup();
    let protected = cluster.wait_protected(PROTECTED_LIMIT);
    let generation = replication(&protected, "generation");
    let backup = cluster.backup_now();
    assert_eq!((&backup["role"], &backup["state_generation"]), (&"backup".into(), &generation), "{backup}");
    client.check_no_value_lost_or_repeated().unwrap_or_else(|e| panic!("seed {seed}: {e}\n{}", cluster.explain()));
    let verdict = kill_and_check(&mut cluster, &client, seed);
    drop(strangers);
    println!(
        "backup killed {} its first full checkpoint ({} bytes of it received); {}",
        if during { "during" } else { "just after" },
        receiving["partial_checkpoint_bytes"],
        verdict.describe()
    );
}

#[test]
fn a_flood_of_idle_and_hostile_connections_leaves_the_backup_running_and_the_link_intact() {
    let seed = seed();
    let mut options = Options::counter(seed);
    // Fewer descriptors than strangers: the backup must refuse them, not run out.
    options.backup_max_files = Some(256);
    let (mut cluster, client) = started("flood", options);
    let flood = Strangers::flood(
        &cluster.topo.primary_ns(),
        backup_port(),
        &[Kind::Idle, Kind::Garbage, Kind::SlowHeader],
        100,
        seed,
    );
    let lag = sample_lag(&cluster, Duration::from_secs(6), ONE_SECOND_OF_EPOCHS);
    assert!(cluster.backup.exited().is_none(), "the backup exited under the flood\n{}", cluster.explain());
    assert!(
        lag.share_within() >= 0.9 && lag.disconnected == 0,
        "seed {seed}: the flood ({} opened, {} refused) disturbed the link: {lag:?}\n{}",
        flood.opened(),
        flood.refused(),
        cluster.explain()
    );
    let backup = cluster.backup_now();
    let pending = backup["pending_handshakes"].as_u64();
    assert!(pending.is_some_and(|p| p <= MAX_PENDING_HANDSHAKES), "{pending:?} handshakes pending: {backup}");
    assert_eq!(
        (&backup["role"], &backup["primary_connected"]),
        (&Value::from("backup"), &Value::from(true)),
        "{backup}"
    );
    // The real primary, cut off loudly, gets back in through the flood within a second.
    let connections = cluster.relay.stats().connections;
    cluster.relay.reset();
    let reset = Instant::now();
    while reset.elapsed() < Duration::from_secs(10)
        && !(cluster.relay.stats().connections > connections
            && cluster.primary_status().is_some_and(|s| is_protected(&s)))
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let back = reset.elapsed();
    assert!(
        back <= Duration::from_millis(1500),
        "the primary needed {back:?} to get back in through the flood
{}",
        cluster.explain()
    );
    let verdict = kill_and_check(&mut cluster, &client, seed);
    println!(
        "flood: {} opened, {} refused; back in {back:?}; {lag:?}; {}",
        flood.opened(),
        flood.refused(),
        verdict.describe()
    );
    drop(flood);
}

#[test]
fn after_a_takeover_the_bridge_forwards_the_mac_announcement_to_the_client_at_once() {
    let seed = seed();
    let options = Options::counter(seed);
    let detection = Duration::from_millis(options.failover_timeout_ms);
    let (mut cluster, client) = started("announce", options);
    let capture = Capture::start(&cluster.topo.client_ns(), "veth-c", capture::ETHERTYPE_RARP);
    let killed = cluster.kill_primary();
    // Watched as a supervisor would: the backup's status, polled.
    let mut live = None;
    while killed.elapsed() < TAKEOVER_LIMIT && live.is_none() {
        if status_within(&cluster.backup_api, Duration::from_millis(200)).is_some_and(|s| is_live(&s)) {
            live = Some(Instant::now() - killed);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let live = live.unwrap_or_else(|| panic!("no takeover\n{}", cluster.explain()));
    std::thread::sleep(Duration::from_millis(700));
    let announcements: Vec<Duration> = capture
        .frames()
        .iter()
        .filter(|(_, f)| capture::announces(f, GUEST_MAC))
        .map(|(at, _)| at.saturating_duration_since(killed))
        .collect();
    let first = announcements.first().copied();
    let in_rounds = first.map_or(0, |f| announcements.iter().filter(|a| **a <= f + Duration::from_millis(400)).count());
    // Takeover is detection plus one swap of the record: the announcement reaches the
    // client within 300 ms of it (generous slack for a loaded machine).
    let budget = detection + ANNOUNCE_WITHIN + TAKEOVER_SLACK;
    assert!(
        first.is_some_and(|f| f <= budget && f <= live + ANNOUNCE_WITHIN) && in_rounds >= 3,
        "seed {seed}: the backup served as the live VM {live:?} after the kill (its status, polled); the client saw \
         announcements at {announcements:?} (the first must come within {budget:?} of the kill, then more in rounds)\n{}",
        cluster.explain()
    );
    let verdict = client
        .check_nothing_lost(killed, ANSWERS_AFTER, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("seed {seed}: {e}\n{}", cluster.explain()));
    println!("live {live:?} after the kill (as seen), announcements at {announcements:?}; {}", verdict.describe());
}

#[test]
fn a_replicated_command_that_exits_ends_on_both_sides_with_all_its_output_and_its_status() {
    let mut options = Options::counter(seed());
    options.command = ["sh", "-c", "echo a; echo last-line; exit 3"].map(String::from).to_vec();
    let mut cluster = Cluster::start("exit", &options);
    let primary = cluster.primary.wait_exit(BOOT_LIMIT);
    let (backup, roles) = cluster.wait_backup_exit(Duration::from_secs(10));
    let out = std::fs::read_to_string(&cluster.primary_stdout).unwrap();
    let backup_out = std::fs::read_to_string(&cluster.backup_stdout).unwrap();
    let last_lines = out.lines().chain(backup_out.lines()).filter(|l| l.trim() == "last-line").count();
    assert!(
        primary.and_then(|s| s.code()) == Some(3)
            && backup.and_then(|s| s.code()) == Some(3)
            && out.lines().next() == Some("a")
            && last_lines == 1
            && roles.iter().all(|r| r == "backup"),
        "primary exit {primary:?}, backup exit {backup:?}, roles seen {roles:?}, last-line printed {last_lines} times\n\
         primary output:\n{out}\nbackup output:\n{backup_out}\n{}",
        cluster.explain()
    );
}

/// A guest that powers off while the replication link is cut ends on both sides: the primary,
/// serving alone since the cut, marks the record ended; the backup, which cannot be told,
/// finds the record ended when it looks and stands down with the guest's status, never going
/// live. The exit is set off from outside once the cut has taken effect (a connection to the
/// guest's port 7002), not after a guessed sleep.
#[test]
fn a_guest_that_powers_off_while_the_link_is_cut_ends_on_both_sides_and_the_backup_never_goes_live() {
    let mut options = cut_options(seed());
    let script = "echo ready; nc -l -p 7002 </dev/null >/dev/null; echo bye; exit 3";
    options.command = ["sh", "-c", script].map(String::from).to_vec();
    let mut cluster = Cluster::start("cut-end", &options);
    cluster.wait_protected(PROTECTED_LIMIT);
    let deadline = Instant::now() + BOOT_LIMIT;
    while !std::fs::read_to_string(&cluster.primary_stdout).unwrap_or_default().lines().any(|l| l.trim() == "ready") {
        assert!(Instant::now() < deadline, "the guest never said ready\n{}", cluster.explain());
        std::thread::sleep(Duration::from_millis(50));
    }
    cluster.relay.set(Mode::Cut);
    cluster.wait_primary("the primary serving alone", Duration::from_secs(30), |s| !is_protected(s));
    connect_from(&cluster.topo.client_ns(), "10.0.2.15:7002".parse().unwrap(), Duration::from_secs(30));
    let primary = cluster.primary.wait_exit(Duration::from_secs(60));
    let (backup, roles) = cluster.wait_backup_exit(Duration::from_secs(30));
    let out = std::fs::read_to_string(&cluster.primary_stdout).unwrap_or_default();
    assert!(
        primary.and_then(|s| s.code()) == Some(3)
            && backup.and_then(|s| s.code()) == Some(3)
            && out.lines().any(|l| l.trim() == "bye")
            && roles.iter().all(|r| r == "backup"),
        "primary exit {primary:?}, backup exit {backup:?}, roles seen {roles:?}\nprimary output:\n{out}\n{}",
        cluster.explain()
    );
}

/// Connect to `addr` from inside namespace `ns`, again and again until it works.
fn connect_from(ns: &str, addr: SocketAddr, limit: Duration) {
    let netns = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("the namespace exists");
    let connected = std::thread::spawn(move || {
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    });
    assert!(connected.join().unwrap(), "no connection to {addr} from {ns} within {limit:?}");
}
