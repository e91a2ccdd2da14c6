//! Checkpoint replication end to end, in network namespaces (root): a primary and a
//! backup, the guest serving a counter in its memory, a client counting over HTTP and
//! over one long-lived TCP session (`ftvm demo` is the scenario; it exits non-zero when
//! any check fails).
//!
//! - SIGKILL of the primary at a random point (seeded; the seed is printed), often in
//!   the middle of a checkpoint: every answer the client got is reflected in the counter
//!   after takeover, and the client's TCP session survives.
//! - A partition of the replication link both ways: exactly one side stays live.

use std::process::Command;

fn demo(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ftvm")).arg("demo").args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// A seed from FTVM_TEST_SEED or the clock, printed so that a failure can be replayed.
fn seed() -> u64 {
    let seed = std::env::var("FTVM_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64
    });
    println!("FTVM_TEST_SEED={seed}");
    seed
}

#[test]
fn sigkill_of_the_primary_at_a_random_point_loses_nothing_and_keeps_tcp_alive() {
    let seed = seed();
    // 2 to 8 s of traffic, to the millisecond: epochs are 25 ms, so the kill lands at
    // every phase of a checkpoint across runs.
    let before = 2000 + (seed.wrapping_mul(6364136223846793005) >> 33) % 6000;
    // A detection timeout a loaded CI machine cannot trip by accident.
    let (ok, text) =
        demo(&["--before-kill-ms", &before.to_string(), "--after-kill-s", "4", "--failover-timeout-ms", "500"]);
    assert!(ok, "seed {seed}, kill after {before} ms:\n{text}");
    assert!(text.contains("counter never went backwards"), "{text}");
    assert!(text.contains("TCP session survived"), "{text}");
    assert!(text.contains("takeover:"), "{text}");
}

#[test]
fn a_partitioned_replication_link_leaves_exactly_one_side_live() {
    let (ok, text) = demo(&["--partition", "--before-kill-ms", "3000", "--after-kill-s", "4"]);
    assert!(ok, "{text}");
    assert!(text.contains("exactly one side stayed live"), "{text}");
    assert!(text.contains("caught up"), "{text}");
}
