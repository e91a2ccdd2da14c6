//! A `--resilient` checkpoint backup (issue 11 item 1, `ftvm backup --resilient`): its
//! monitor is SIGKILLed while Debian's redis-cli counts with INCR over one TCP session
//! through the primary's TAP. The keeper restarts the monitor, which takes the checkpoint
//! it last applied up again from the shared region, on the listening socket the keeper
//! holds: the primary reconnects and continues with the incremental checkpoints it kept
//! (no full checkpoint), stays protected (the ownership generation does not move) and the
//! count goes on. Then the whole primary is killed, and the restarted backup takes over
//! with every reply consecutive. Every fault is struck on observed progress (a reply count,
//! a status field). Root (network namespaces). Prints the time to protection and to the
//! first reply after the monitor's kill.

mod common;

use common::cluster::{Cluster, Options, BOOT_LIMIT};
use common::keeper::{binary_copy, handover, monitor_of, sigkill};
use common::redis::{kill_primary_and_count_on, redis_image, wait_pong, Session, SERVER};
use std::process::Command;
use std::time::{Duration, Instant};

const FAILOVER_TIMEOUT_MS: u64 = 1000;
/// The primary holds outputs this long for a lost backup before it runs unprotected: longer
/// than the backup's microreboot, so that the primary stays protected across it.
const BACKUP_LOSS_GRACE_MS: u64 = 10_000;
const PROTECTED_LIMIT: Duration = Duration::from_secs(60);
/// Replies the session must get between two faults, and after the last.
const REPLIES_BETWEEN: usize = 40;

fn u64_of(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn a_resilient_backup_keeps_the_primary_protected_across_its_monitors_kill_then_takes_over() {
    let report = common::scratch("resilient-backup", "keeper.json");
    let options = Options {
        command: SERVER.map(String::from).to_vec(),
        initrd: Some(redis_image()),
        failover_timeout_ms: FAILOVER_TIMEOUT_MS,
        primary_args: vec!["--backup-loss-grace-ms".into(), BACKUP_LOSS_GRACE_MS.to_string()],
        backup_args: vec!["--resilient".into(), "--keeper-report".into(), report.display().to_string()],
        ..Options::counter(0)
    };
    let mut cluster = Cluster::start("resilient-backup", &options);
    let ns = cluster.topo.client_ns();
    assert!(wait_pong(&ns, BOOT_LIMIT), "redis-server never answered PING\n{}", cluster.explain());
    let status = cluster.wait_protected(PROTECTED_LIMIT);
    let generation = status["replication"]["generation"].clone();
    assert!(generation.is_u64(), "{status}");

    let keeper = cluster.backup.child.id();
    let mut session = Session::start(&ns);
    assert!(
        session.wait_for(REPLIES_BETWEEN, Duration::from_secs(60), None),
        "before the kill: {} replies\n{}",
        session.count(),
        cluster.explain()
    );
    let before = cluster.primary_now();
    let sent_before = u64_of(&before["replication"]["bytes_sent"]);
    let epoch_at_kill = u64_of(&before["epoch"]);
    let monitor = monitor_of(keeper, None);
    sigkill(monitor);
    let killed = Instant::now();
    monitor_of(keeper, Some(monitor));
    let backup = cluster.wait_backup("the new monitor holding an epoch after the kill", PROTECTED_LIMIT, |b| {
        b["keeper"]["monitor"] == 2
            && b["primary_connected"] == true
            && b["applied_epoch"].as_u64().is_some_and(|e| e > epoch_at_kill)
    });
    let backup_back_ms = killed.elapsed().as_millis();
    assert_eq!(backup["role"], "backup", "{backup}");
    let status = cluster.wait_protected(PROTECTED_LIMIT);
    let protected_ms = killed.elapsed().as_millis();
    assert!(
        session.wait_for(REPLIES_BETWEEN, Duration::from_secs(60), Some(killed)),
        "after the backup's monitor was killed: {} replies\n{}",
        session.count_after(killed),
        cluster.explain()
    );
    let first_reply_ms = session.first_after(killed).map(|at| (at - killed).as_millis());
    // Protected all along: no swap of the generation, never released without the backup.
    assert_eq!(status["replication"]["generation"], generation, "{status}");
    assert_eq!(status["replication"]["unprotected_count"], 0, "{status}");
    // Resynchronized by the incremental checkpoints the primary kept: far less than the
    // full checkpoint (the written RAM) that made up most of what was sent before.
    let sent_since = u64_of(&cluster.primary_now()["replication"]["bytes_sent"]) - sent_before;
    assert!(
        sent_since < sent_before / 4,
        "{sent_since} bytes sent since the kill, {sent_before} before it: a full checkpoint?"
    );
    let backup = cluster.wait_backup("the backup's state counting for the generation", PROTECTED_LIMIT, |b| {
        b["state_generation"] == generation && b["stale"] == false
    });
    assert_eq!(backup["role"], "backup", "{backup}");
    println!(
        "the backup's monitor killed: its successor held a newer epoch after {backup_back_ms} ms, the primary \
         protected after {protected_ms} ms, first reply after {first_reply_ms:?} ms; {sent_since} bytes sent since \
         (before: {sent_before})"
    );

    // Planned handovers of the backup under the session: a fresh monitor, then another
    // binary. The primary reconnects and stays protected; its incrementals catch the new
    // monitor up.
    let copy = common::scratch("resilient-backup", "ftvm-copy");
    let copy = binary_copy(&copy);
    let mut monitor = monitor_of(keeper, None);
    for args in [vec!["rejuvenate"], vec!["upgrade", "--binary", &copy]] {
        let want = session.count() + REPLIES_BETWEEN;
        assert!(session.wait_for(want, Duration::from_secs(60), None), "before {args:?}\n{}", cluster.explain());
        let sent_before = u64_of(&cluster.primary_now()["replication"]["bytes_sent"]);
        let asked = Instant::now();
        let done = handover(&cluster.backup_api, &args, &|| cluster.explain());
        monitor = monitor_of(keeper, Some(monitor));
        let epoch = u64_of(&cluster.primary_now()["epoch"]);
        let backup = cluster.wait_backup("the new monitor holding an epoch after the handover", PROTECTED_LIMIT, |b| {
            b["primary_connected"] == true && b["applied_epoch"].as_u64().is_some_and(|e| e > epoch)
        });
        assert_eq!(backup["role"], "backup", "{backup}");
        assert_eq!(backup["state_generation"], generation, "{backup}");
        let status = cluster.wait_protected(PROTECTED_LIMIT);
        assert_eq!(status["replication"]["generation"], generation, "{status}");
        assert_eq!(status["replication"]["unprotected_count"], 0, "{status}");
        assert!(
            session.wait_for(REPLIES_BETWEEN, Duration::from_secs(60), Some(asked)),
            "after {args:?}: {} replies\n{}",
            session.count_after(asked),
            cluster.explain()
        );
        let sent_since = u64_of(&cluster.primary_now()["replication"]["bytes_sent"]) - sent_before;
        assert!(sent_since < sent_before / 4, "{args:?}: {sent_since} bytes sent since, {sent_before} before");
        println!(
            "backup {}: stopped {} ms before its successor held the state; first reply {:?} ms after the request; \
             {sent_since} bytes sent since",
            args[0],
            done["pause_ms"],
            session.first_after(asked).map(|at| (at - asked).as_millis())
        );
    }

    // Now the whole primary: the restarted, rejuvenated, upgraded backup takes over, and
    // the count goes on.
    kill_primary_and_count_on(&mut cluster, session, &ns, REPLIES_BETWEEN);

    // Stopped through its API, the keeper reports the two handovers (the restart before
    // them was the keeper's before the upgrade re-executed it: the list starts again).
    let stop = Command::new(env!("CARGO_BIN_EXE_ftvm"))
        .arg("ctl")
        .arg("--api")
        .arg(&cluster.backup_api)
        .arg("stop")
        .output()
        .unwrap();
    assert!(stop.status.success(), "ctl stop: {}", String::from_utf8_lossy(&stop.stderr));
    assert!(cluster.backup.wait_exit(Duration::from_secs(30)).is_some(), "the backup's keeper did not end");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&*report).unwrap()).unwrap();
    let causes: Vec<&str> =
        report["restarts"].as_array().unwrap().iter().map(|r| r["cause"].as_str().unwrap()).collect();
    assert_eq!(causes, Vec::<&str>::new(), "{report}\n{}", common::cluster::tail(&cluster.backup.log, 80));
    assert_eq!(report["handovers"], 2, "{report}");
    assert_eq!(report["end"]["kind"], "exited", "{report}");
}
