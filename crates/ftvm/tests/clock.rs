//! End-to-end: the guest's wall clock. The RTC starts at the host's time, so `date` in
//! the guest prints the host's date; guest time keeps pace with the host's clock while
//! the guest computes (the driver's clock-rate inputs), within the documented bound.
//! These need the guest image (scripts/test builds it).

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{SystemTime, UNIX_EPOCH};

fn ftvm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ftvm"))
}

fn guest_out() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../guest/out");
    assert!(dir.join("Image").exists(), "guest image missing: run `bash guest/build.sh` (scripts/test does)");
    dir
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn host_unix_s() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

#[test]
fn date_in_the_guest_prints_the_hosts_date_and_time() {
    guest_out();
    let before = host_unix_s();
    let out = ftvm().args(["run", "--", "date", "-u", "+%s"]).output().unwrap();
    let after = host_unix_s();
    assert_eq!(out.status.code(), Some(0), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let guest: f64 = stdout(&out).trim().parse().expect("date prints seconds since the epoch");
    // Whole seconds, read between the host's two readings (1 s for date's truncation).
    assert!(guest >= before.floor() - 1.0 && guest <= after + 10.0, "guest {guest}, host {before}..{after}");
}
