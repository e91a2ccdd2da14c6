//! `ftvm run --resilient` judged from a network client's side: Debian's redis-server in the
//! guest, Debian's redis-cli counting with INCR over one TCP session from the far end of the
//! VM's TAP, while the monitor is killed (SIGKILL, SIGSEGV) and hung (SIGSTOP) under it.
//! The keeper holds the TAP across each restart; frames sent meanwhile wait in the kernel's
//! queue. Every reply is acknowledged work: they must run 1, 2, 3, ... with none twice and
//! none skipped, on a session that survives every restart. Root (a network namespace).

mod common;

use common::redis::{check_consecutive, redis_image, wait_pong, Session, SERVER};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?} failed");
}

/// A namespace whose tap0 (10.0.2.2, the guest's gateway) is the VM's network: the client
/// runs on the other end of the TAP.
struct TapNet {
    ns: String,
}

impl TapNet {
    fn new() -> TapNet {
        let ns = format!("ftvm-resnet-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &ns]).stderr(Stdio::null()).status();
        ip(&["netns", "add", &ns]);
        let net = TapNet { ns };
        for args in [
            &["tuntap", "add", "tap0", "mode", "tap"][..],
            &["addr", "add", "10.0.2.2/24", "dev", "tap0"],
            &["link", "set", "tap0", "up"],
            &["link", "set", "lo", "up"],
        ] {
            ip(&[&["netns", "exec", &net.ns, "ip"][..], args].concat());
        }
        net
    }
}

impl Drop for TapNet {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

struct Keeper {
    child: Child,
    report: PathBuf,
}

impl Drop for Keeper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.report);
    }
}

impl Keeper {
    /// The keeper's running monitor (not its spare).
    fn monitor(&self) -> u32 {
        let keeper = self.child.id();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(&pid) = common::keeper::monitors(keeper).first() {
                return pid;
            }
            assert!(Instant::now() < deadline, "the keeper {keeper} has no monitor");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn report(&self) -> serde_json::Value {
        let bytes = std::fs::read(&self.report).unwrap_or_default();
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null)
    }
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status().unwrap();
    assert!(status.success(), "kill -{sig} {pid}");
}

#[test]
fn debians_redis_cli_session_survives_its_monitor_killed_and_hung_with_nothing_lost() {
    let image = redis_image();
    let net = TapNet::new();
    let report = std::env::temp_dir().join(format!("ftvm-resnet-{}.json", std::process::id()));
    let api = std::env::temp_dir().join(format!("ftvm-resnet-{}.sock", std::process::id()));
    let child = Command::new("ip")
        .args(["netns", "exec", &net.ns])
        .arg(env!("CARGO_BIN_EXE_ftvm"))
        .args(["run", "--resilient", "--net", "tap:tap0", "--keeper-report"])
        .arg(&report)
        .arg("--api")
        .arg(&api)
        .arg("--initrd")
        .arg(&image)
        .arg("--")
        .args(SERVER)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ftvm");
    let keeper = Keeper { child, report };
    assert!(wait_pong(&net.ns, Duration::from_secs(180)), "redis-server never answered PING");
    let mut session = Session::start(&net.ns);
    let mut struck = Vec::new();
    // Each fault once the session has had 40 more replies: struck while the client counts.
    for sig in ["KILL", "SEGV", "STOP"] {
        let want = session.count() + 40;
        assert!(
            session.wait_for(want, Duration::from_secs(60), None),
            "the session got {} replies, waiting for {want}, after faults {struck:?}; keeper report: {}",
            session.count(),
            keeper.report()
        );
        let monitor = keeper.monitor();
        signal(monitor, sig);
        if sig == "SEGV" {
            // Rust's handler takes the first SIGSEGV and puts the default action back.
            std::thread::sleep(Duration::from_millis(50));
            signal(monitor, sig);
        }
        struck.push(sig);
    }
    let want = session.count() + 40;
    let answered = session.wait_for(want, Duration::from_secs(60), None);
    let got = session.stop();
    assert!(
        answered,
        "the session stopped at {} replies after {struck:?}: redis-cli said {:?}",
        got.replies.len(),
        got.stderr
    );
    check_consecutive(&got.replies).unwrap();
    got.check_count(&net.ns).unwrap();
    // Stopped through its API, the keeper reports each restart's cause.
    let stop = Command::new(env!("CARGO_BIN_EXE_ftvm")).arg("ctl").arg("--api").arg(&api).arg("stop").output().unwrap();
    assert!(stop.status.success(), "ctl stop: {}", String::from_utf8_lossy(&stop.stderr));
    let mut keeper = keeper;
    let status = keeper.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    let report = keeper.report();
    let causes: Vec<&str> =
        report["restarts"].as_array().unwrap().iter().map(|r| r["cause"].as_str().unwrap()).collect();
    assert_eq!(causes, ["killed by SIGKILL", "killed by SIGSEGV", "hung (no heartbeat)"], "{report}");
    let _ = std::fs::remove_file(&api);
}
