//! Lockstep replication end to end (`ftvm run --mode lockstep` paired with `ftvm backup`,
//! which learns the mode from the stream).
//!
//! - SIGKILL of the primary at a random point (root: network namespaces, the counter over
//!   HTTP and one long-lived TCP session, `ftvm demo --mode lockstep` judged by its summary):
//!   every answer the client got is reflected after the takeover, the TCP session survives,
//!   and no digest ever differed (the guest idles between requests).
//! - A provoked divergence (an input altered on the backup's side by a fault point, with the
//!   `failpoints` feature) is caught by the digests, counted, and repaired by the primary's
//!   whole state; the digests match again after it (loopback, no root).
//! - After a guest that writes its disk ends, the primary's and the backup's disk images are
//!   byte-identical: each wrote its own copy by executing the same instructions (loopback).
//!
//! Every verdict comes from a typed status field or an exit status, and every wait is for a
//! sign of progress (a status field, an exit), with a deadline.

use serde_json::Value;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

mod common;

use common::local::{ftvm, status, wait_status, Proc};

/// A directory for one test's files, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../guest/out");
        assert!(out.join("Image").exists(), "guest image missing: run `bash guest/build.sh` (scripts/test does)");
        let dir = std::env::temp_dir().join(format!("ftvm-lockstep-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn logs(&self, name: &str) -> String {
        let read = |kind: &str| std::fs::read_to_string(self.path(&format!("{name}.{kind}"))).unwrap_or_default();
        format!("{name} stdout:\n{}\n{name} stderr:\n{}", read("out"), read("err"))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A lockstep pair on loopback: the backup (with `backup_env`) and the primary running
/// `command`; each with its own disk when `disks`.
struct Pair {
    backup: Proc,
    primary: Proc,
    backup_sock: PathBuf,
}

fn start_pair(dir: &Scratch, command: &str, disks: bool, backup_env: &[(&str, &str)]) -> Pair {
    let key = dir.path("key");
    std::fs::write(&key, "0123456789abcdef0123456789abcdef").unwrap();
    let store = format!("file:{}", dir.path("store").display());
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let key = key.display().to_string();
    let spawn = |name: &str, args: Vec<String>, env: &[(&str, &str)]| {
        let log = |kind: &str| std::fs::File::create(dir.path(&format!("{name}.{kind}"))).unwrap();
        let mut command = ftvm();
        command.args(args).envs(env.iter().copied()).stdin(Stdio::null()).stdout(log("out")).stderr(log("err"));
        Proc(command.spawn().unwrap())
    };
    let vm_args = |name: &str| {
        let mut args = ["--mem", "128M", "--key", &key, "--store", &store].map(String::from).to_vec();
        if disks {
            let disk = dir.path(&format!("{name}.img"));
            std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
            args.extend(["--disk".to_string(), disk.display().to_string()]);
        }
        args
    };
    let backup_sock = dir.path("backup.sock");
    // A detection timeout a loaded machine cannot trip by accident: no takeover here.
    let backup_args = ["backup", "--listen", &addr, "--failover-timeout-ms", "5000", "--api"].map(String::from);
    let backup_args = [backup_args.to_vec(), vec![backup_sock.display().to_string()], vm_args("backup")].concat();
    let backup = spawn("backup", backup_args, backup_env);
    // The backup listens before the primary dials (the primary would retry anyway).
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(&backup_sock).is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let primary_args = ["run", "--replicate-to", &addr, "--mode", "lockstep", "--on-backup-loss", "hold"];
    let command = ["--", "sh", "-c", command].map(String::from);
    let primary_args = [primary_args.map(String::from).to_vec(), vm_args("primary"), command.to_vec()].concat();
    let primary = spawn("primary", primary_args, &[]);
    Pair { backup, primary, backup_sock }
}

#[test]
fn after_a_disk_writing_workload_both_disk_copies_are_byte_identical() {
    let dir = Scratch::new("disk");
    let command = "dd if=/dev/urandom of=/dev/vda bs=4k count=64 conv=fsync 2>/dev/null; \
                   printf lockstep | dd of=/dev/vda bs=1 seek=300000 conv=fsync 2>/dev/null; echo written";
    let mut pair = start_pair(&dir, command, true, &[]);
    let primary_code = pair.primary.wait_exit(Duration::from_secs(240));
    let backup_code = pair.backup.wait_exit(Duration::from_secs(60));
    let explain = format!("{}\n{}", dir.logs("primary"), dir.logs("backup"));
    assert_eq!((primary_code, backup_code), (Some(0), Some(0)), "both sides end with the VM's status: {explain}");
    let primary_out = std::fs::read_to_string(dir.path("primary.out")).unwrap();
    assert!(primary_out.ends_with("written\n"), "{explain}");
    let (primary_disk, backup_disk) =
        (std::fs::read(dir.path("primary.img")).unwrap(), std::fs::read(dir.path("backup.img")).unwrap());
    assert_eq!(&primary_disk[300000..300008], b"lockstep", "the guest wrote the primary's disk: {explain}");
    assert!(primary_disk[..4096].iter().any(|b| *b != 0), "random bytes at the start: {explain}");
    let first_difference = primary_disk.iter().zip(&backup_disk).position(|(a, b)| a != b);
    assert_eq!(first_difference, None, "the disk copies differ from byte {first_difference:?}: {explain}");
    assert_eq!(primary_disk.len(), backup_disk.len());
}

#[test]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs --features ftvm/failpoints (scripts/test has it)")]
fn an_input_altered_on_the_backup_is_caught_and_resynchronized_by_a_whole_state() {
    let dir = Scratch::new("diverge");
    // The backup alters the first input it pushes into its machine (once).
    let env = [("FAILPOINTS", "lockstep::alter-input=1*return(corrupt)")];
    let pair = start_pair(&dir, "while :; do :; done", false, &env);
    let resynced = |s: &Value| s["lockstep"]["resyncs"].as_u64() >= Some(1) && s["lockstep"]["diverged"].is_null();
    let seen = wait_status(&pair.backup_sock, Duration::from_secs(240), resynced);
    let explain = |s: &Option<Value>| format!("last status: {s:?}\n{}\n{}", dir.logs("primary"), dir.logs("backup"));
    assert!(seen.as_ref().is_some_and(resynced), "caught and resynchronized: {}", explain(&seen));
    let s = seen.unwrap();
    assert_eq!(s["lockstep"]["divergences"], 1, "{}", explain(&Some(s.clone())));
    assert_eq!(s["diverged_checkpoints"], 1, "the status counts it where checkpoint mode does");
    // In step again: later digests are checked and match.
    let checked = s["lockstep"]["digests_checked"].as_u64().unwrap();
    let again = |v: &Value| v["lockstep"]["digests_checked"].as_u64() > Some(checked + 2);
    let later = wait_status(&pair.backup_sock, Duration::from_secs(120), again);
    assert!(later.as_ref().is_some_and(again), "digests checked again: {}", explain(&later));
    let later = later.unwrap();
    assert_eq!(later["lockstep"]["divergences"], 1, "{}", explain(&Some(later.clone())));
    assert!(later["lockstep"]["diverged"].is_null());
    drop(pair);
}

/// Run `ftvm demo --mode lockstep`; its success, its output, and its summary.
fn demo(name: &str, args: &[&str]) -> (bool, String, Value) {
    let summary = std::env::temp_dir().join(format!("ftvm-lockstep-{name}-{}.json", std::process::id()));
    let out = ftvm().args(["demo", "--mode", "lockstep", "--summary"]).arg(&summary).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let verdicts = std::fs::read(&summary).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or(Value::Null);
    let _ = std::fs::remove_file(&summary);
    (out.status.success(), text, verdicts)
}

#[test]
fn lockstep_sigkill_of_the_primary_at_a_random_point_loses_nothing_and_keeps_tcp_alive() {
    let seed = common::seed();
    let before = 1000 + (seed.wrapping_mul(6364136223846793005) >> 33) % 4000;
    let failover_timeout_ms = 500;
    let args = ["--before-kill-ms", &before.to_string(), "--after-kill-s", "3"];
    let (ok, text, v) =
        demo("kill", &[&args[..], &["--failover-timeout-ms", &failover_timeout_ms.to_string()]].concat());
    assert!(ok, "seed {seed}, kill after {before} ms:\n{text}");
    assert_eq!(v["passed"], true, "{v}\n{text}");
    assert_eq!(v["counter_went_backwards"], false, "{v}");
    assert!(v["session_broken"].is_null(), "{v}");
    assert!(v["session_answers_after_fault"].as_u64() > Some(0), "{v}");
    assert_eq!(v["diverged_checkpoints"], 0, "no divergence: {v}");
    let took_over = &v["took_over"];
    assert!(took_over["generation"].as_u64() > Some(1), "a takeover swaps the generation forward: {v}");
    assert!(took_over["last_frame_to_live_ms"].as_u64() >= Some(failover_timeout_ms), "{v}");
}

/// Debian's redis-server in a lockstep pair over the e2e harness's namespaces and relay,
/// judged by Debian's redis-cli counting with INCR on one long-lived session (root).
mod redis_faults {
    use super::common::cluster::{Cluster, Options, BACKUP_PORT, BOOT_LIMIT};
    use super::common::netns::Topology;
    use super::common::redis::{
        check_consecutive, cut_and_heal, redis_cli, redis_image, shutdown_ends_both_sides, wait_pong, Session, SERVER,
    };
    use super::common::relay::Mode;
    use super::common::seed;
    use super::common::strangers::{Kind, Strangers};
    use std::time::{Duration, Instant};

    const PROTECTED_LIMIT: Duration = Duration::from_secs(120);

    fn options(seed: u64, failover_timeout_ms: u64) -> Options {
        Options {
            command: SERVER.map(String::from).to_vec(),
            initrd: Some(redis_image()),
            failover_timeout_ms,
            primary_args: ["--mode", "lockstep"].map(String::from).to_vec(),
            // A lockstep backup boots from its own images (a checkpoint backup gets the
            // machine from the primary): without the same initrd its boot digest differs.
            backup_args: vec!["--initrd".into(), redis_image().display().to_string()],
            ..Options::counter(seed)
        }
    }

    /// Strangers on the backup's port from before the primary's handshake on (idle ones,
    /// garbage, slow headers, hang-ups), the handshake made amid them, then the link cut for
    /// a while (the primary serves on unprotected; the backup is stale) and healed (the
    /// backup resynchronizes from the primary's whole state under a new generation), then a
    /// SIGKILL of the primary: no takeover before the kill, and the session's replies run
    /// 1, 2, 3, ... through all of it.
    #[test]
    fn lockstep_redis_counts_on_through_strangers_at_the_handshake_a_cut_and_a_sigkill() {
        let seed = seed();
        // Beyond the 700 ms the primary takes to give up on a silent backup: a cut leaves
        // the primary live.
        let mut cluster = Cluster::start("ls-redis-seq", &options(seed, 1500));
        // Hold the primary's link until the strangers crowd the backup's port.
        cluster.relay.set(Mode::Cut);
        let backup_port = format!("{}:{BACKUP_PORT}", Topology::BACKUP_REPL_ADDR).parse().unwrap();
        let kinds = [Kind::Idle, Kind::Garbage, Kind::SlowHeader, Kind::Hangup];
        let strangers =
            Strangers::every(&cluster.topo.primary_ns(), backup_port, &kinds, Duration::from_millis(200), seed);
        let deadline = Instant::now() + Duration::from_secs(30);
        while strangers.opened() < 20 {
            assert!(Instant::now() < deadline, "strangers opened only {}", strangers.opened());
            std::thread::sleep(Duration::from_millis(50));
        }
        cluster.relay.set(Mode::Pass);
        let ns = cluster.topo.client_ns();
        assert!(wait_pong(&ns, BOOT_LIMIT), "redis-server never answered PING\n{}", cluster.explain());
        let protected = cluster.wait_protected(PROTECTED_LIMIT);
        assert_eq!(protected["mode"], "lockstep", "{protected}");
        let mut session = Session::start(&ns);
        assert!(session.wait_for(50, Duration::from_secs(60), None), "the session got {} replies", session.count());
        let backup = cluster.wait_backup("the backup's status", Duration::from_secs(10), |_| true);
        assert_eq!(backup["role"], "backup", "strangers made the backup take over: {backup}");
        assert_eq!(backup["lockstep"]["divergences"], 0, "{}", cluster.explain());

        let in_step = |s: &serde_json::Value| s["lockstep"]["diverged"].is_null();
        let served = cut_and_heal(&mut cluster, &mut session, seed, PROTECTED_LIMIT, in_step);
        let replies = session.count();
        assert!(session.wait_for(replies + 20, Duration::from_secs(60), None), "the session stalled after the heal");

        let killed = cluster.kill_primary();
        let live = cluster.wait_takeover(Duration::from_secs(60));
        let answered = session.wait_for(30, Duration::from_secs(60), Some(killed));
        let got = session.stop();
        let after = got.count_after(killed);
        assert!(
            answered,
            "seed {seed}: the session got {after} replies after the kill (redis-cli said {:?}); the backup's status: \
             {live}\n{}",
            got.stderr,
            cluster.explain()
        );
        assert_eq!(live["took_over"]["diverged_checkpoints"], 0, "{live}");
        check_consecutive(&got.replies).unwrap_or_else(|e| panic!("seed {seed}: {e}\n{}", cluster.explain()));
        got.check_count(&ns).unwrap_or_else(|e| panic!("seed {seed}: {e}\n{}", cluster.explain()));
        let opened = strangers.opened();
        drop(strangers);
        println!("{} replies, {served} while cut off, {after} after the kill; {opened} strangers", got.replies.len());
    }

    /// A lockstep VM whose guest powers off ends on both sides: redis-cli shuts the server
    /// down, the guest's command exits, and both replicas exit with status 0; the backup
    /// never goes live (which would bring redis back).
    #[test]
    fn a_lockstep_redis_server_shut_down_by_its_client_ends_both_sides() {
        let seed = seed();
        let mut cluster = Cluster::start("ls-redis-end", &options(seed, 1000));
        let ns = cluster.topo.client_ns();
        assert!(wait_pong(&ns, BOOT_LIMIT), "redis-server never answered PING\n{}", cluster.explain());
        cluster.wait_protected(PROTECTED_LIMIT);
        let mut session = Session::start(&ns);
        assert!(session.wait_for(30, Duration::from_secs(60), None), "the session stalled");
        shutdown_ends_both_sides(&mut cluster, session, seed);
    }
}
