//! Checkpoint payloads (the replication layer's unit of state): a full checkpoint
//! pre-copied while the guest runs, then incremental ones, carry a second machine to
//! exactly the first one's state; a malformed payload changes nothing.

mod common;
use common::drive;
use machine::checkpoint::{self, PreCopy};
use machine::Machine;

fn config() -> machine::MachineConfig {
    common::debian_config(None)
}

#[test]
fn a_pre_copied_full_checkpoint_then_incrementals_keep_a_backup_exact() {
    let mut primary = Machine::new(&config()).unwrap();
    let mut backup = Machine::new(&config()).unwrap();
    drive(&mut primary, 30_000_000);
    // Pre-copy while the guest keeps running (and writing) between steps.
    let mut precopy = PreCopy::start(&mut primary);
    let mut at = primary.icount();
    while !precopy.step(&primary, 2048) {
        at += 1_000_000;
        drive(&mut primary, at);
    }
    let full = precopy.finish(&mut primary).unwrap();
    checkpoint::apply(&mut backup, &full).unwrap();
    assert_eq!(backup.digest(), primary.digest(), "the full checkpoint is the state at finish");
    for epoch in 1..=3u64 {
        drive(&mut primary, at + epoch * 5_000_000);
        let delta = checkpoint::take(&mut primary, false).unwrap();
        assert!(delta.len() < full.len(), "an incremental checkpoint carries only what changed");
        checkpoint::apply(&mut backup, &delta).unwrap();
        assert_eq!(backup.digest(), primary.digest(), "after incremental {epoch}");
    }
}

#[test]
fn a_malformed_payload_is_refused_and_changes_nothing() {
    let mut primary = Machine::new(&config()).unwrap();
    drive(&mut primary, 10_000_000);
    let good = checkpoint::take(&mut primary, true).unwrap();
    let mut backup = Machine::new(&config()).unwrap();
    let before = backup.digest();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("bad magic", [b"XXXX".as_slice(), &good[4..]].concat()),
        ("other version", [&good[..4], &[9, 0], &good[6..]].concat()),
        ("truncated", good[..good.len() / 2].to_vec()),
        ("trailing bytes", [good.as_slice(), &[0]].concat()),
    ];
    for (what, payload) in cases {
        assert!(checkpoint::apply(&mut backup, &payload).is_err(), "{what} must be refused");
        assert_eq!(backup.digest(), before, "{what} changed the machine");
    }
    let version_error = checkpoint::apply(&mut backup, &[&good[..4], &[9, 0], &good[6..]].concat()).unwrap_err();
    assert!(version_error.to_string().contains("version 9"), "{version_error}");
}
