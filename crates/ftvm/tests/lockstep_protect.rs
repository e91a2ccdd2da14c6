//! `ftvm ctl protect --mode lockstep` end to end, in network namespaces (root): a VM started
//! alone with `--store` is given a lockstep backup while it runs — its whole state first, then
//! the inputs — and the promise is tried the way an outsider would break it, with faults in
//! the middle of the transition:
//!
//! - strangers on the backup's port before the primary connects, then SIGKILL of the primary
//!   at a random point: nothing the client was told is lost, its TCP session survives, the
//!   digests agreed all along; the survivor is protected in lockstep again;
//! - the backup killed in the middle of the whole state: the primary serves on, unprotected,
//!   and says so; a new backup protects it again. Then the link cut in the middle of the
//!   state: the backup (holding no whole state) never goes live, the healed link protects the
//!   VM again, and a SIGKILL loses nothing;
//! - the primary killed just after `protect` returns: the backup, which never held a whole
//!   state, is never brought live;
//! - `protect` while protected is refused; `unprotect` lets the backup stand down and
//!   `protect` works again; then the guest powers off in the middle of the state: both sides
//!   end with its status and the backup never resurrects it;
//! - `unprotect` while the state is cut off mid-way: answered, the VM serves on alone, the
//!   backup never goes live;
//! - the whole state carries the disk (the backup's image held stale bytes): after more
//!   writes and the end, both images are byte-identical.
//!
//! The link runs through the impairment relay, whose `cut_after` stops it after a given number
//! of bytes: a cut, or a kill, lands inside the state's transfer whatever the machine's speed.
//! Every wait is for a sign (a status field, the relay's cut, a line of output) with a
//! deadline; verdicts come from typed status, exit statuses and the client's record. A failing
//! run prints FTVM_TEST_SEED (which places the kills).

mod common;

use common::client::Client;
use common::cluster::{Cluster, Options, BOOT_LIMIT, RELAY_PORT};
use common::netns::Topology;
use common::relay::Mode as Link;
use common::seed;
use common::strangers::{Kind, Strangers};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

/// The whole state (tens of MB) and the first acknowledgements, on a loaded 2-core machine.
const PROTECTED_LIMIT: Duration = Duration::from_secs(120);
const TAKEOVER_LIMIT: Duration = Duration::from_secs(30);
/// Answers the client must get on each way in after a fault.
const ANSWERS_AFTER: usize = 3;
/// Bytes the relay passes before it cuts: the handshake and the state's first megabytes, far
/// short of the whole state (tens of MB).
const CUT_AFTER_BYTES: u64 = 4 << 20;
/// Digests the backup must have checked, all equal, to count as in step.
const DIGESTS_IN_STEP: u64 = 3;

/// Where the primary reaches the backup (through the relay).
fn relay_addr() -> String {
    format!("{}:{RELAY_PORT}", Topology::BACKUP_REPL_ADDR)
}

/// The backup's own port, not through the relay (where strangers knock).
fn backup_port() -> SocketAddr {
    format!("{}:{}", Topology::BACKUP_REPL_ADDR, common::cluster::BACKUP_PORT).parse().expect("an address")
}

/// A delay of 0 to 2 s drawn from `seed` and `round`, so that across runs the kill lands at
/// every phase of the input stream.
fn delay(seed: u64, round: u64) -> Duration {
    let x = (seed ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_mul(6364136223846793005);
    Duration::from_millis((x >> 33) % 2000)
}

/// The counter service started alone (with `--store`; the backup waits), and a client that
/// has been answered.
fn counter_alone(name: &str, seed: u64) -> (Cluster, Client) {
    let options = Options { replicate: false, ..Options::counter(seed) };
    let cluster = Cluster::start(name, &options);
    let client = Client::start(&cluster.topo.client_ns());
    if !client.wait_for_answers(20, BOOT_LIMIT) {
        panic!("the guest's counter never answered 20 times\n{}", cluster.explain());
    }
    (cluster, client)
}

/// `ftvm ctl protect --to <relay> --mode MODE` on the cluster's primary: its exit code and
/// answer (or error line).
fn protect(cluster: &Cluster, mode: &str) -> (i32, Result<Value, String>) {
    let key = cluster.key_file().display().to_string();
    let to = relay_addr();
    cluster.ctl_primary(&["protect", "--to", &to, "--key", &key, "--mode", mode, "--lockstep-digest-ms", "100"])
}

fn protect_in_lockstep(cluster: &Cluster) {
    let (code, answer) = protect(cluster, "lockstep");
    let answer = answer.unwrap_or_else(|e| panic!("protect failed ({code}): {e}\n{}", cluster.explain()));
    assert_eq!((code, &answer["state"], &answer["mode"]), (0, &"protecting".into(), &"lockstep".into()), "{answer}");
}

/// Wait until the primary is protected in lockstep and the backup has checked
/// [`DIGESTS_IN_STEP`] more digests than `checked_before`, none differing; the backup's status.
fn wait_in_step(cluster: &mut Cluster, what: &str) -> Value {
    let primary = cluster.wait_protected(PROTECTED_LIMIT);
    assert_eq!((&primary["mode"], &primary["role"]), (&"lockstep".into(), &"primary".into()), "{what}: {primary}");
    let backup = cluster.wait_backup(&format!("{what}: digests checked"), PROTECTED_LIMIT, |s| {
        s["lockstep"]["digests_checked"].as_u64() >= Some(DIGESTS_IN_STEP) || s["lockstep"]["divergences"] != 0
    });
    let explain = cluster.explain();
    assert_eq!((&backup["mode"], &backup["role"]), (&"lockstep".into(), &"backup".into()), "{what}: {explain}");
    assert_eq!(backup["lockstep"]["divergences"], 0, "{what}: the digests differed: {backup}\n{explain}");
    assert!(backup["lockstep"]["diverged"].is_null(), "{what}: {backup}");
    backup
}

/// Wait until the relay has cut the link (its `cut_after` mark passed).
fn wait_cut(cluster: &Cluster, what: &str) {
    let deadline = Instant::now() + PROTECTED_LIMIT;
    while cluster.relay.mode() != Link::Cut {
        assert!(Instant::now() < deadline, "{what}: the state never reached the cut\n{}", cluster.explain());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The primary runs on unprotected and says so (status: not protected, unprotected at least
/// once, outputs no longer held for the backup).
fn wait_unprotected(cluster: &mut Cluster, what: &str) -> Value {
    cluster.wait_primary(what, Duration::from_secs(60), |s| {
        let r = &s["replication"];
        r["protected"] == false && r["protection"] == "unprotected" && r["unprotected_count"].as_u64() >= Some(1)
    })
}

/// SIGKILL the primary after `wait`; the backup takes over in lockstep and the client loses
/// nothing; the live replica's status.
fn kill_and_check(cluster: &mut Cluster, client: &Client, wait: Duration, seed: u64) -> Value {
    std::thread::sleep(wait);
    let killed = cluster.kill_primary();
    let live = cluster.wait_takeover(TAKEOVER_LIMIT);
    let verdict = client
        .check_nothing_lost(killed, ANSWERS_AFTER, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("seed {seed}, killed after {wait:?}: {e}\n{}", cluster.explain()));
    println!("killed after {wait:?}: {}", verdict.describe());
    assert_eq!(live["took_over"]["diverged_checkpoints"], 0, "{live}");
    live
}

fn metrics(api: &Path) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ftvm"))
        .arg("ctl")
        .arg("--api")
        .arg(api)
        .arg("metrics")
        .output()
        .expect("run ftvm ctl metrics");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_running_vm_protected_in_lockstep_stays_in_step_and_a_sigkill_of_the_primary_loses_nothing() {
    let seed = seed();
    let (mut cluster, client) = counter_alone("basic", seed);
    assert_eq!(cluster.primary_now()["mode"], "none");
    // Strangers hold connections to the backup's port before the primary ever connects.
    let kinds = [Kind::Idle, Kind::Garbage, Kind::Hangup];
    let strangers =
        Strangers::every(&cluster.topo.primary_ns(), backup_port(), &kinds, Duration::from_millis(300), seed);
    let deadline = Instant::now() + Duration::from_secs(30);
    while strangers.opened() < 3 {
        assert!(Instant::now() < deadline, "no stranger connected to the backup\n{}", cluster.explain());
        std::thread::sleep(Duration::from_millis(20));
    }

    protect_in_lockstep(&cluster);
    let backup = wait_in_step(&mut cluster, "protected in lockstep");
    assert!(backup["refused_connections"].as_u64() >= Some(1), "the strangers were refused: {backup}");
    let primary = cluster.primary_now();
    assert_eq!(primary["lockstep"]["states"], 1, "the backup started from one whole state: {primary}");
    assert!(metrics(&cluster.primary_api).contains(r#"mode="lockstep""#), "the metrics say the mode");
    assert!(metrics(&cluster.backup_api).contains(r#"mode="lockstep""#), "the backup's metrics too");
    client.check_no_value_lost_or_repeated().unwrap_or_else(|e| panic!("seed {seed}: {e}\n{}", cluster.explain()));

    let live = kill_and_check(&mut cluster, &client, delay(seed, 1), seed);
    drop(strangers);
    let generation = live["took_over"]["generation"].as_u64().expect("a takeover names its generation");

    // The survivor runs alone; protected in lockstep to a fresh backup in the dead primary's host.
    let to = cluster.fresh_backup_in_primary_host(500);
    let key = cluster.key_file().display().to_string();
    let (code, answer) = cluster.ctl_primary(&["protect", "--to", &to, "--key", &key, "--mode", "lockstep"]);
    assert_eq!(code, 0, "protect the survivor: {answer:?}\n{}", cluster.explain());
    let again = wait_in_step(&mut cluster, "the survivor protected in lockstep");
    assert_eq!(again["state_generation"], generation, "{again}");
    client.check_no_value_lost_or_repeated().unwrap_or_else(|e| panic!("seed {seed}: {e}\n{}", cluster.explain()));
}

#[test]
fn the_backup_killed_or_the_link_cut_in_the_middle_of_the_state_leaves_the_primary_serving_until_protected_again() {
    let seed = seed();
    let started = Instant::now();
    let phase = |what: &str| println!("{:>7.1} s  {what}", started.elapsed().as_secs_f64());
    let (mut cluster, client) = counter_alone("mid-state", seed);
    phase("booted");

    // 1. The backup killed in the middle of the whole state.
    cluster.relay.cut_after(CUT_AFTER_BYTES);
    protect_in_lockstep(&cluster);
    wait_cut(&cluster, "the backup killed mid-state");
    cluster.kill_backup();
    let killed = Instant::now();
    phase("the state cut, the backup killed");
    cluster.relay.set(Link::Pass);
    let alone = wait_unprotected(&mut cluster, "the primary unprotected after its backup died mid-state");
    assert_eq!(alone["mode"], "lockstep", "it keeps trying to reach a backup: {alone}");
    client
        .check_nothing_lost(killed, ANSWERS_AFTER, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("seed {seed}: served on after the backup died: {e}\n{}", cluster.explain()));
    cluster.restart_backup();
    wait_in_step(&mut cluster, "protected again by a new backup");
    phase("protected again by a new backup");

    // 2. Unprotect, then the link cut in the middle of the state sent to a new backup.
    let (code, answer) = cluster.ctl_primary(&["unprotect"]);
    assert_eq!(code, 0, "unprotect: {answer:?}\n{}", cluster.explain());
    let (exit, roles) = cluster.wait_backup_exit(Duration::from_secs(30));
    assert_eq!(exit.and_then(|s| s.code()), Some(0), "the backup stands down: {roles:?}\n{}", cluster.explain());
    cluster.restart_backup();
    cluster.relay.cut_after(CUT_AFTER_BYTES);
    protect_in_lockstep(&cluster);
    wait_cut(&cluster, "the link cut mid-state");
    phase("the link cut mid-state");
    wait_unprotected(&mut cluster, "the primary unprotected while the link is cut mid-state");
    // The backup holds no whole state: however long the silence, it stays a backup.
    let silent = cluster.wait_backup("the backup hears the silence", Duration::from_secs(60), |s| {
        s["silence_ms"].as_u64() >= Some(1500) || s["role"] != "backup"
    });
    assert_eq!((&silent["role"], &silent["applied_epoch"]), (&"backup".into(), &Value::Null), "{silent}");
    cluster.relay.set(Link::Pass);
    wait_in_step(&mut cluster, "protected again once the link healed");
    phase("protected again once the link healed");
    client.check_no_value_lost_or_repeated().unwrap_or_else(|e| panic!("seed {seed}: {e}\n{}", cluster.explain()));

    kill_and_check(&mut cluster, &client, delay(seed, 2), seed);
}

#[test]
fn the_primary_killed_just_after_protect_returns_is_never_brought_back_from_a_partial_state() {
    let seed = seed();
    let (mut cluster, client) = counter_alone("kill-at-protect", seed);
    // The state stops at the cut: the backup cannot hold it whole, whenever the kill lands.
    cluster.relay.cut_after(CUT_AFTER_BYTES);
    protect_in_lockstep(&cluster);
    cluster.kill_primary();
    cluster.relay.set(Link::Pass);
    let silent = cluster.wait_backup("the backup hears its primary gone", Duration::from_secs(60), |s| {
        s["silence_ms"].as_u64() >= Some(3000) || s["role"] != "backup"
    });
    assert_eq!((&silent["role"], &silent["applied_epoch"]), (&"backup".into(), &Value::Null), "{silent}");
    assert_eq!(silent["state_generation"], Value::Null, "{silent}");
    assert!(cluster.backup.exited().is_none(), "the backup waits for a primary\n{}", cluster.explain());
    drop(client);
}

#[test]
fn protect_twice_is_refused_unprotect_then_protect_works_and_a_power_off_mid_state_ends_both_sides() {
    let seed = seed();
    let console = std::env::temp_dir().join(format!("ftvm-lsp-{}-console.sock", std::process::id()));
    let _ = std::fs::remove_file(&console);
    let options = Options {
        command: vec!["sh".into(), "-c".into(), "echo ready; read line; echo bye; exit 7".into()],
        replicate: false,
        primary_args: vec!["--console-socket".into(), console.display().to_string()],
        ..Options::counter(seed)
    };
    let mut cluster = Cluster::start("power-off", &options);
    wait_output(&cluster, "ready");

    // Protected in lockstep; a second protect, in either mode, is refused saying why.
    protect_in_lockstep(&cluster);
    wait_in_step(&mut cluster, "protected in lockstep");
    let refusal = format!(
        "ftvm: error: the VM refused: this VM is already protected: it replicates to {} (unprotect first) (HTTP 409)",
        relay_addr()
    );
    for mode in ["lockstep", "checkpoint"] {
        let (code, answer) = protect(&cluster, mode);
        let error = answer.expect_err("an error line, not an answer");
        assert_eq!((code, error.trim()), (125, refusal.as_str()), "protect --mode {mode} while protected");
    }

    // Unprotect: the backup stands down for good; a new one protects the VM again.
    let (code, answer) = cluster.ctl_primary(&["unprotect"]);
    let answer = answer.unwrap_or_else(|e| panic!("unprotect: {e}\n{}", cluster.explain()));
    assert_eq!((code, &answer["state"]), (0, &"unprotected".into()), "{answer}");
    let (exit, roles) = cluster.wait_backup_exit(Duration::from_secs(30));
    assert_eq!(exit.and_then(|s| s.code()), Some(0), "stands down: {roles:?}\n{}", cluster.explain());
    assert_eq!(cluster.primary_now()["replication"], Value::Null);
    cluster.restart_backup();

    // The guest powers off while its state is cut off mid-way to the new backup.
    cluster.relay.cut_after(CUT_AFTER_BYTES);
    protect_in_lockstep(&cluster);
    wait_cut(&cluster, "the state cut mid-way");
    type_on(&console, b"go\n");
    let primary_exit = cluster.primary.wait_exit(Duration::from_secs(60));
    assert_eq!(primary_exit.and_then(|s| s.code()), Some(7), "the VM's status\n{}", cluster.explain());
    cluster.relay.set(Link::Pass);
    let (exit, roles) = cluster.wait_backup_exit(Duration::from_secs(60));
    assert!(
        exit.and_then(|s| s.code()) == Some(7) && roles.iter().all(|r| r == "backup"),
        "the backup ends with the VM's status, never live: exit {exit:?}, roles {roles:?}\n{}",
        cluster.explain()
    );
    let _ = std::fs::remove_file(&console);
}

/// Wait for `line` in the guest command's output (the primary's standard output).
fn wait_output(cluster: &Cluster, line: &str) {
    let deadline = Instant::now() + BOOT_LIMIT;
    loop {
        let out = std::fs::read_to_string(&cluster.primary_stdout).unwrap_or_default();
        if out.lines().any(|l| l.trim() == line) {
            return;
        }
        assert!(Instant::now() < deadline, "the guest never printed {line:?}\n{}", cluster.explain());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Type `bytes` on the guest's console through `--console-socket`.
fn type_on(console: &Path, bytes: &[u8]) {
    use std::io::Write;
    let mut stream = std::os::unix::net::UnixStream::connect(console).expect("the console socket answers");
    stream.write_all(bytes).expect("typed on the console");
}

/// The whole state carries the disk: a VM that wrote its disk alone is protected in lockstep
/// by a backup whose image holds stale bytes everywhere (an old copy, say), writes more, and
/// ends; both images are then byte-identical, and no digest differed on the way.
#[test]
fn the_whole_state_carries_the_disk_and_both_images_end_byte_identical() {
    let seed = seed();
    let scratch = std::env::temp_dir().join(format!("ftvm-lsp-{}-disk", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let (primary_disk, backup_disk) = (scratch.join("primary.img"), scratch.join("backup.img"));
    std::fs::write(&primary_disk, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&backup_disk, vec![0xa5u8; 1 << 20]).unwrap();
    let console = scratch.join("console.sock");
    let command = "dd if=/dev/urandom of=/dev/vda bs=4k count=32 conv=fsync 2>/dev/null; echo ready; read line; \
                   printf lockstep | dd of=/dev/vda bs=1 seek=600000 conv=fsync 2>/dev/null; \
                   dd if=/dev/urandom of=/dev/vda bs=4k seek=100 count=16 conv=fsync 2>/dev/null; echo written";
    let options = Options {
        command: vec!["sh".into(), "-c".into(), command.into()],
        replicate: false,
        primary_args: vec![
            "--console-socket".into(),
            console.display().to_string(),
            "--disk".into(),
            primary_disk.display().to_string(),
        ],
        backup_args: vec!["--disk".into(), backup_disk.display().to_string()],
        ..Options::counter(seed)
    };
    let mut cluster = Cluster::start("disk", &options);
    wait_output(&cluster, "ready");
    protect_in_lockstep(&cluster);
    wait_in_step(&mut cluster, "protected in lockstep with a disk");
    type_on(&console, b"go\n");
    let primary_exit = cluster.primary.wait_exit(Duration::from_secs(120));
    let (backup_exit, roles) = cluster.wait_backup_exit(Duration::from_secs(60));
    let explain = cluster.explain();
    assert_eq!(primary_exit.and_then(|s| s.code()), Some(0), "{explain}");
    assert!(
        backup_exit.and_then(|s| s.code()) == Some(0) && roles.iter().all(|r| r == "backup"),
        "{roles:?}\n{explain}"
    );
    wait_output(&cluster, "written");
    let (primary, backup) = (std::fs::read(&primary_disk).unwrap(), std::fs::read(&backup_disk).unwrap());
    assert_eq!(&primary[600000..600008], b"lockstep", "the guest wrote the primary's disk after the join");
    let first_difference = primary.iter().zip(&backup).position(|(a, b)| a != b);
    assert_eq!(first_difference, None, "the disk images differ from byte {first_difference:?}\n{explain}");
    drop(cluster);
    let _ = std::fs::remove_dir_all(&scratch);
}

/// `unprotect` while the whole state is cut off mid-way: answered at once (the generation
/// moves forward first), the VM runs on alone and serves; the backup, which never held the
/// state, never goes live when the link heals.
#[test]
fn unprotect_while_the_state_is_cut_off_mid_way_is_answered_and_the_vm_serves_on_alone() {
    let seed = seed();
    let (mut cluster, client) = counter_alone("unprotect-mid-state", seed);
    cluster.relay.cut_after(CUT_AFTER_BYTES);
    protect_in_lockstep(&cluster);
    wait_cut(&cluster, "the state cut mid-way");
    let asked = Instant::now();
    let (code, answer) = cluster.ctl_primary(&["unprotect"]);
    let answer = answer.unwrap_or_else(|e| panic!("unprotect ({code}): {e}\n{}", cluster.explain()));
    assert_eq!((code, &answer["state"]), (0, &"unprotected".into()), "{answer}");
    println!("unprotect answered in {:?}", asked.elapsed());
    let alone = cluster.primary_now();
    assert_eq!((&alone["mode"], &alone["replication"]), (&"none".into(), &Value::Null), "{alone}");
    client
        .check_nothing_lost(asked, ANSWERS_AFTER, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("seed {seed}: served on alone: {e}\n{}", cluster.explain()));
    cluster.relay.set(Link::Pass);
    let silent = cluster.wait_backup("the backup hears the silence", Duration::from_secs(60), |s| {
        s["silence_ms"].as_u64() >= Some(1500) || s["role"] != "backup"
    });
    assert_eq!((&silent["role"], &silent["applied_epoch"]), (&"backup".into(), &Value::Null), "{silent}");
    client.check_no_value_lost_or_repeated().unwrap_or_else(|e| panic!("seed {seed}: {e}\n{}", cluster.explain()));
}
