//! End-to-end: the guest's wall clock. The RTC starts at the host's time, so `date` in
//! the guest prints the host's date; guest time keeps pace with the host's clock while
//! the guest computes (the driver's clock-rate inputs), within the documented bound.
//! These need the guest image (scripts/test builds it).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
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
    // Whole seconds, read between the host's two readings — within a second: Linux sets its
    // clock from the RTC in whole seconds at boot and rounds by half a second, so the guest's
    // wall clock may run up to a second from the host's (a full run of the suite saw +0.23 s).
    assert!(guest >= before.floor() - 1.0 && guest <= after + 1.0, "guest {guest}, host {before}..{after}");
}

/// Guest time against the host's clock, at the start and at the end of a computation of
/// a few seconds: the guest prints its uptime (in hundredths of a second) and the host
/// notes when the line arrives. Over the computation the two must advance alike, within
/// twice the bound (the error may swing from one side of it to the other) plus what the
/// host's readings may be late by (printing, the console, scheduling). And the guest is
/// never ahead: its uptime, which starts a little after guest time 0 (the kernel's
/// timekeeping starts after early boot), never exceeds the time since ftvm started by
/// more than the bound.
///
/// (The guest's wall clock is guest time plus the RTC's boot time, which is the host's;
/// Linux sets its system clock from the RTC in whole seconds plus half a second, so that
/// is within ±0.5 s of the host's and then keeps this pace.)
#[test]
fn a_busy_guests_clock_keeps_pace_with_the_hosts() {
    const BOUND_S: f64 = 0.050; // pacer::BOUND_MS
    const LATENCY_S: f64 = 0.250;
    guest_out();
    // Busy for three seconds of guest time, however fast the engine runs the loop.
    let script = "cat /proc/uptime; read u _ </proc/uptime; end=$((${u%.*} + 3)); \
                  while read u _ </proc/uptime; [ ${u%.*} -lt $end ]; do :; done; cat /proc/uptime";
    let spawned = host_unix_s();
    let mut vm = ftvm().args(["run", "--", "sh", "-c", script]).stdout(Stdio::piped()).spawn().unwrap();
    let mut readings = Vec::new(); // (guest, host) in seconds, the host's since ftvm started
    for line in BufReader::new(vm.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        let host = host_unix_s() - spawned;
        let uptime = line.split_whitespace().next().and_then(|w| w.parse::<f64>().ok());
        readings.push((uptime.unwrap_or_else(|| panic!("not an uptime: {line:?}")), host));
    }
    assert!(vm.wait().unwrap().success());
    let [(guest_start, host_start), (guest_end, host_end)] = readings[..] else { panic!("two readings: {readings:?}") };
    assert!(host_end - host_start > 1.0, "a computation of seconds, not {:.3} s", host_end - host_start);
    for (what, ahead) in [("start", guest_start - host_start), ("end", guest_end - host_end)] {
        assert!(ahead <= BOUND_S, "at the {what} the guest is {ahead:+.3} s ahead of the host");
    }
    let drift = (guest_end - guest_start) - (host_end - host_start);
    assert!(drift.abs() <= 2.0 * BOUND_S + LATENCY_S, "over the computation the guest's clock drifted {drift:+.3} s");
    eprintln!(
        "guest - host over {:.1} s of computation: {:+.0} ms (uptime {:.2} s at {:.2} s after ftvm started)",
        host_end - host_start,
        drift * 1e3,
        guest_start,
        host_start,
    );
}

/// A guest that waits for entropy and idles meanwhile is fed at once, not when its next
/// timer falls due: reading 16 KiB from the hardware RNG (many small requests to the
/// entropy device) took 2.4 s of guest and wall time when each waited for a timer, and
/// takes about 0.1 s now.
#[test]
fn an_idle_guest_waiting_for_entropy_is_fed_at_once() {
    guest_out();
    let script =
        "t0=$(cut -d' ' -f1 /proc/uptime); head -c 16384 /dev/hwrng >/dev/null; cut -d' ' -f1 /proc/uptime; echo $t0";
    let out = ftvm().args(["run", "--", "sh", "-c", script]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let text = stdout(&out);
    let times: Vec<f64> = text.lines().map(|l| l.trim().parse().unwrap()).collect();
    let took = times[0] - times[1];
    assert!(took < 0.6, "16 KiB from /dev/hwrng took {took:.2} s of guest time");
}
