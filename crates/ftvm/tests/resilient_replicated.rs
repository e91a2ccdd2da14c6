//! A replicated `--resilient` primary (issue 11 item 1): its monitor is SIGKILLed twice
//! while Debian's redis-cli counts with INCR over one TCP session through the VM's TAP.
//! The keeper restarts the monitor, which recovers from the shared region and replicates
//! on to the same backup: no takeover (the backup stays a backup, the ownership generation
//! does not move), every reply 1, 2, 3, ..., the session survives, and the VM is protected
//! again. Then the monitor is handed over to a fresh one (`ctl rejuvenate`) and to another
//! binary (`ctl upgrade`) under the same session: a reconnection for the backup, never a
//! takeover, protected all along. Then the whole primary (keeper and monitor) is killed,
//! and the backup takes over with nothing lost. Every fault is struck on observed progress (a reply count). Root
//! (network namespaces). Prints the backup's longest silence per restart against its
//! detection timeout.

mod common;

use common::cluster::{is_live, Cluster, Options, BOOT_LIMIT};
use common::keeper::{binary_copy, handover, monitor_of, sigkill};
use common::redis::{kill_primary_and_count_on, redis_image, wait_pong, Session, SERVER};
use std::time::{Duration, Instant};

/// The backup's detection timeout: above the microreboot's p99 (382 ms on a loaded host,
/// docs/microreboot.md) plus the new monitor's reconnection, with room for a loaded CI
/// machine.
const FAILOVER_TIMEOUT_MS: u64 = 2000;
const PROTECTED_LIMIT: Duration = Duration::from_secs(60);
/// Replies the session must get between two faults, and after the last.
const REPLIES_BETWEEN: usize = 40;

/// The backup's longest silence (ms since it last heard the primary) until the restarted
/// primary is connected and heard again, sampled every 10 ms; panics if it took over.
fn longest_silence(cluster: &mut Cluster, killed: Instant) -> u64 {
    let mut longest = 0;
    let mut seen_gone = false;
    while killed.elapsed() < Duration::from_secs(30) {
        let status = cluster.backup_now();
        assert!(!is_live(&status), "the backup took over after a monitor's restart: {status}\n{}", cluster.explain());
        let silence = status["silence_ms"].as_u64().unwrap_or(0);
        longest = longest.max(silence);
        seen_gone |= status["primary_connected"] == false;
        if seen_gone && silence < 50 && status["primary_connected"] == true {
            return longest;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("the backup never heard the restarted primary (longest silence {longest} ms)\n{}", cluster.explain());
}

#[test]
fn a_replicated_resilient_primary_survives_two_monitor_kills_without_a_takeover_then_fails_over() {
    let options = Options {
        command: SERVER.map(String::from).to_vec(),
        initrd: Some(redis_image()),
        failover_timeout_ms: FAILOVER_TIMEOUT_MS,
        primary_args: vec!["--resilient".into()],
        ..Options::counter(0)
    };
    let mut cluster = Cluster::start("resrep", &options);
    let ns = cluster.topo.client_ns();
    assert!(wait_pong(&ns, BOOT_LIMIT), "redis-server never answered PING\n{}", cluster.explain());
    cluster.wait_protected(PROTECTED_LIMIT);
    let generation = cluster.backup_now()["state_generation"].clone();
    assert!(generation.is_u64(), "{}", cluster.backup_now());

    // The first run's full checkpoint of the written RAM is most of what it sent.
    let full_bytes = cluster.primary_now()["replication"]["bytes_sent"].as_u64().unwrap();
    let keeper = cluster.primary.child.id();
    let mut session = Session::start(&ns);
    let mut monitor = monitor_of(keeper, None);
    for kill in 1..=2 {
        let want = session.count() + REPLIES_BETWEEN;
        assert!(
            session.wait_for(want, Duration::from_secs(60), None),
            "before kill {kill}: {} replies, waiting for {want}\n{}",
            session.count(),
            cluster.explain()
        );
        sigkill(monitor);
        let killed = Instant::now();
        let silence = longest_silence(&mut cluster, killed);
        let answered = session.wait_for(1, Duration::from_secs(60), Some(killed));
        let first_reply_ms = session.first_after(killed).map(|at| (at - killed).as_millis());
        assert!(answered, "no reply after kill {kill}\n{}", cluster.explain());
        println!(
            "kill {kill}: the backup's longest silence {silence} ms (detection timeout {FAILOVER_TIMEOUT_MS} ms); \
             first reply {first_reply_ms:?} ms after the kill"
        );
        monitor = monitor_of(keeper, Some(monitor));
        let backup = cluster.backup_now();
        assert_eq!(backup["role"], "backup", "{backup}");
        assert_eq!(backup["state_generation"], generation, "the generation moved: {backup}");
        // The restarted monitor took the run up again: an incremental checkpoint of what was
        // written since the backup's state, not a full one.
        let status = cluster.wait_protected(PROTECTED_LIMIT);
        let sent = status["replication"]["bytes_sent"].as_u64().unwrap();
        assert!(
            sent < full_bytes / 4,
            "kill {kill}: the new monitor sent {sent} bytes (a full checkpoint: {full_bytes})"
        );
        println!(
            "kill {kill}: the new monitor sent {sent} bytes until protected (the first full checkpoint: {full_bytes})"
        );
    }
    // Planned handovers under the session: a fresh monitor, then another binary.
    let copy = common::scratch("resrep", "ftvm-copy");
    let copy = binary_copy(&copy);
    for args in [vec!["rejuvenate"], vec!["upgrade", "--binary", &copy]] {
        let want = session.count() + REPLIES_BETWEEN;
        assert!(session.wait_for(want, Duration::from_secs(60), None), "before {args:?}\n{}", cluster.explain());
        let asked = Instant::now();
        let done = handover(&cluster.primary_api, &args, &|| cluster.explain());
        let answered = session.wait_for(1, Duration::from_secs(60), Some(asked));
        let first_reply_ms = session.first_after(asked).map(|at| (at - asked).as_millis());
        assert!(answered, "no reply after {args:?}\n{}", cluster.explain());
        monitor = monitor_of(keeper, Some(monitor));
        let backup = cluster.backup_now();
        assert_eq!(backup["role"], "backup", "{backup}");
        assert_eq!(backup["state_generation"], generation, "the generation moved: {backup}");
        // The new monitor took the run up again: nothing was held, nothing is sent twice.
        let status = cluster.wait_protected(PROTECTED_LIMIT);
        assert_eq!(status["replication"]["unprotected_count"], 0, "{status}");
        let sent = status["replication"]["bytes_sent"].as_u64().unwrap();
        assert!(sent < full_bytes / 4, "{args:?}: the new monitor sent {sent} bytes (a full checkpoint: {full_bytes})");
        println!(
            "{}: the guest paused {} ms (the final epoch acknowledged and checkpointed in {} ms); first reply {:?} ms \
             after the request; {sent} bytes sent until protected",
            args[0], done["pause_ms"], done["final_checkpoint_ms"], first_reply_ms
        );
    }
    let want = session.count() + REPLIES_BETWEEN;
    assert!(session.wait_for(want, Duration::from_secs(60), None), "after the handovers\n{}", cluster.explain());
    let status = cluster.wait_protected(PROTECTED_LIMIT);
    assert_eq!(status["replication"]["generation"], generation, "{status}");
    assert_eq!(status["replication"]["unprotected_count"], 0, "{status}");
    let backup = cluster.wait_backup("the backup's state counting for the generation", PROTECTED_LIMIT, |b| {
        b["state_generation"] == generation && b["stale"] == false
    });
    assert_eq!(backup["role"], "backup", "{backup}");

    // Now the whole primary: the backup takes over, and the count goes on.
    kill_primary_and_count_on(&mut cluster, session, &ns, REPLIES_BETWEEN);
}

#[test]
fn a_replicated_resilient_primarys_console_comes_out_once_when_its_monitors_die_holding_outputs() {
    // Each monitor aborts as it applies its 11th local checkpoint: the epoch that
    // checkpoint follows is not acknowledged yet, so its console output is held by output
    // commit when the monitor dies. The next monitor must send it (once): the checkpoint's
    // marks count it as produced.
    let n = 300;
    let script = format!(
        "i=0; while [ $i -lt {n} ]; do i=$((i+1)); j=0; while [ $j -lt 300 ]; do j=$((j+1)); done; echo $i; \
         sleep 0.01; done; exit 3"
    );
    let report = common::scratch("resrep-console", "keeper.json");
    let options = Options {
        command: vec!["sh".into(), "-c".into(), script],
        failover_timeout_ms: FAILOVER_TIMEOUT_MS,
        primary_args: ["--resilient", "--hang-ms", "5000", "--keeper-report", &report.display().to_string()]
            .map(String::from)
            .to_vec(),
        primary_failpoints: Some("keeper::checkpoint-apply=10*off->1*return(abort)".into()),
        ..Options::counter(0)
    };
    let mut cluster = Cluster::start("resrep-console", &options);
    let status = cluster.primary.wait_exit(Duration::from_secs(240));
    assert_eq!(status.and_then(|s| s.code()), Some(3), "{}", cluster.explain());
    let out = std::fs::read_to_string(&cluster.primary_stdout).unwrap();
    let numbers: Vec<&str> = out.lines().map(|l| l.trim_end_matches('\r')).filter(|l| !l.is_empty()).collect();
    let want: Vec<String> = (1..=n).map(|i| i.to_string()).collect();
    assert_eq!(numbers, want, "every line once, in order\n{}", cluster.explain());
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&*report).unwrap()).unwrap();
    let restarts = report["restarts"].as_array().unwrap();
    assert!(restarts.len() >= 2, "{report}");
    assert!(restarts.iter().all(|r| r["cause"] == "killed by SIGABRT"), "{report}");
    assert_eq!(report["end"], serde_json::json!({ "kind": "exited", "code": 3 }), "{report}");
}
