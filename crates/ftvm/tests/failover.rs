//! Checkpoint replication end to end, in network namespaces (root): a primary and a
//! backup, the guest serving a counter in its memory, a client counting over HTTP and
//! over one long-lived TCP session (`ftvm demo` is the scenario; it exits non-zero when
//! any check fails, and `--summary` writes each check's field, which these tests judge).
//!
//! - SIGKILL of the primary at a random point (seeded; the seed is printed), often in
//!   the middle of a checkpoint: every answer the client got is reflected in the counter
//!   after takeover, and the client's TCP session survives.
//! - A partition of the replication link both ways: exactly one side stays live.

use serde_json::Value;
use std::process::Command;

/// Run the demo; its success, its output, and its summary (Null when it wrote none).
fn demo(name: &str, args: &[&str]) -> (bool, String, Value) {
    let summary = std::env::temp_dir().join(format!("ftvm-failover-{name}-{}.json", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_ftvm"))
        .arg("demo")
        .arg("--summary")
        .arg(&summary)
        .args(args)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let verdicts = std::fs::read(&summary).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or(Value::Null);
    let _ = std::fs::remove_file(&summary);
    (out.status.success(), text, verdicts)
}

/// A seed from FTVM_TEST_SEED or the clock, printed so that a failure can be replayed.
fn seed() -> u64 {
    let seed = std::env::var("FTVM_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64
    });
    println!("FTVM_TEST_SEED={seed}");
    seed
}

/// The checks both scenarios share: nothing the client was told is lost, the session
/// lives, and every verified checkpoint matched.
fn assert_nothing_lost(v: &Value, text: &str) {
    assert_eq!(v["passed"], true, "{v}\n{text}");
    assert_eq!(v["counter_went_backwards"], false, "{v}");
    assert!(v["session_broken"].is_null(), "{v}");
    assert!(v["answers_after_fault"].as_u64() > Some(0), "{v}");
    assert!(v["session_answers_after_fault"].as_u64() > Some(0), "{v}");
    assert_eq!(v["diverged_checkpoints"], 0, "{v}");
}

#[test]
fn sigkill_of_the_primary_at_a_random_point_loses_nothing_and_keeps_tcp_alive() {
    let seed = seed();
    // 2 to 8 s of traffic, to the millisecond: epochs are 25 ms, so the kill lands at
    // every phase of a checkpoint across runs.
    let before = 2000 + (seed.wrapping_mul(6364136223846793005) >> 33) % 6000;
    // A detection timeout a loaded CI machine cannot trip by accident.
    let failover_timeout_ms = 500;
    let args = ["--before-kill-ms", &before.to_string(), "--after-kill-s", "4"];
    let (ok, text, v) =
        demo("kill", &[&args[..], &["--failover-timeout-ms", &failover_timeout_ms.to_string()]].concat());
    assert!(ok, "seed {seed}, kill after {before} ms:\n{text}");
    assert_nothing_lost(&v, &text);
    let took_over = &v["took_over"];
    assert!(took_over["generation"].as_u64() > Some(1), "a takeover swaps the generation forward: {v}");
    // The backup goes live only after the primary's silence outlasts its timeout.
    assert!(took_over["last_frame_to_live_ms"].as_u64() >= Some(failover_timeout_ms), "{v}");
    assert!(v["probe"]["accepted_ms"].is_f64(), "the probe saw the takeover: {v}");
}

#[test]
fn a_partitioned_replication_link_leaves_exactly_one_side_live() {
    let (ok, text, v) = demo("partition", &["--partition", "--before-kill-ms", "3000", "--after-kill-s", "4"]);
    assert!(ok, "{text}");
    assert_nothing_lost(&v, &text);
    assert_eq!(
        (&v["backup_went_live"], &v["cut_seen"], &v["resynchronized"]),
        (&false.into(), &true.into(), &true.into()),
        "{v}"
    );
}
