//! `ftvm ctl protect` and `unprotect` on loopback (no root): a VM started alone with
//! `--store` is given a backup while it runs, then replication is stopped; the backup is
//! told to stand down and the ownership generation has moved past anything it holds.
//! What cannot be done is refused with an error that says why. (The failovers around a
//! re-protection run in namespaces: `tests/reprotect.rs`.)

use serde_json::Value;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Booting (which may overlap the first full checkpoint) on a loaded 2-core machine.
const PROTECTED_LIMIT: Duration = Duration::from_secs(120);
const MEM: &str = "128M";

fn ftvm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ftvm"))
}

/// A scratch directory, removed with everything in it when the test ends.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!("ftvm-protect-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("store")).unwrap();
        std::fs::write(dir.join("key"), "00112233445566778899aabbccddeeff").unwrap();
        Dir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn store(&self) -> String {
        format!("file:{}", self.path("store").display())
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An ftvm process, killed on drop.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(args: &[String], log: PathBuf) -> Proc {
        let err = std::fs::File::create(&log).unwrap();
        let child = ftvm().args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(err).spawn().unwrap();
        Proc { child, log }
    }

    fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A VM running `sleep 1000` (with `--store` when `store` is given), its API socket ready.
fn vm(dir: &Dir, store: bool) -> (Proc, PathBuf) {
    let api = dir.path("vm.sock");
    let mut args: Vec<String> = ["run", "--mem", MEM, "--api"].map(String::from).to_vec();
    args.push(api.display().to_string());
    if store {
        args.extend(["--store".into(), dir.store()]);
    }
    args.extend(["--", "sleep", "1000"].map(String::from));
    let proc = Proc::spawn(&args, dir.path("vm.log"));
    wait_for(&api);
    (proc, api)
}

/// A backup on a free loopback port: it, its address and its API socket.
fn backup(dir: &Dir, name: &str) -> (Proc, String, PathBuf) {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let api = dir.path(&format!("{name}.sock"));
    let key = dir.path("key").display().to_string();
    // A detection timeout of 500 ms, as the other end-to-end tests use, rather than the
    // default 60 ms: on a loaded machine a pause of the primary would take over.
    let args: Vec<String> = [
        "backup",
        "--mem",
        MEM,
        "--listen",
        &listen,
        "--key",
        &key,
        "--store",
        &dir.store(),
        "--failover-timeout-ms",
        "500",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(["--api".into(), api.display().to_string()])
    .collect();
    let proc = Proc::spawn(&args, dir.path(&format!("{name}.log")));
    wait_for(&api);
    (proc, listen, api)
}

/// Until the API answers: the socket's file appears at bind, a moment before it listens.
fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(Instant::now() < deadline, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `ftvm ctl --api API ARGS`: exit code, the JSON answer, standard error.
fn ctl(api: &Path, args: &[&str]) -> (i32, Value, String) {
    let out: Output = ftvm().arg("ctl").arg("--api").arg(api).args(args).output().unwrap();
    let body = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), body, String::from_utf8_lossy(&out.stderr).trim().to_string())
}

fn status(api: &Path) -> Value {
    let (code, body, err) = ctl(api, &["status"]);
    assert_eq!(code, 0, "status failed: {err}");
    body
}

fn protect(api: &Path, dir: &Dir, to: &str) -> (i32, Value, String) {
    let key = dir.path("key").display().to_string();
    ctl(api, &["protect", "--to", to, "--key", &key])
}

/// The VM's ownership record, as the store holds it.
fn record(dir: &Dir) -> Value {
    let entry = std::fs::read_dir(dir.path("store")).unwrap().flatten().find(|e| {
        let name = e.file_name().to_string_lossy().to_string();
        name.starts_with("vm-") && name.ends_with(".json")
    });
    let text = std::fs::read_to_string(entry.expect("a record in the store").path()).unwrap();
    serde_json::from_str::<Value>(&text).unwrap()["record"].clone()
}

#[test]
fn protect_without_a_store_and_unprotect_without_replication_are_refused_saying_why() {
    let dir = Dir::new("refused");
    let (_vm, api) = vm(&dir, false);
    let (code, _, err) = protect(&api, &dir, "127.0.0.1:9");
    assert_eq!(code, 125, "{err}");
    assert_eq!(
        err,
        "ftvm: error: the VM refused: this VM holds no ownership record, without which a backup could never take \
         over safely: start it with --store file:DIR (the store its backup uses) to protect it (HTTP 409)"
    );
    let (code, _, err) = ctl(&api, &["unprotect"]);
    assert_eq!(
        (code, err.as_str()),
        (125, "ftvm: error: the VM refused: this VM is not protected: it replicates to no backup (HTTP 409)")
    );
    assert_eq!(status(&api)["replication"], Value::Null);
}

#[test]
fn a_vm_started_alone_is_protected_then_unprotected_and_its_backup_stands_down_for_good() {
    let dir = Dir::new("cycle");
    let (mut vm, api) = vm(&dir, true);
    let (mut backup, listen, backup_api) = backup(&dir, "backup");
    let before = status(&api);
    assert_eq!((&before["role"], &before["replication"]), (&Value::from("standalone"), &Value::Null), "{before}");

    let (code, answer, err) = protect(&api, &dir, &listen);
    assert_eq!(code, 0, "{err}");
    assert_eq!(answer["state"], "protecting", "{answer}");
    let deadline = Instant::now() + PROTECTED_LIMIT;
    let protected = loop {
        let s = status(&api);
        if s["replication"]["protected"] == true {
            break s;
        }
        assert!(Instant::now() < deadline, "not protected in time: {s}\n{}\n{}", vm.log(), backup.log());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(protected["role"], "primary");
    let generation = protected["replication"]["generation"].as_u64().unwrap();
    // The backup learns that its state counts for this generation from a message the primary
    // sends as it declares itself protected: it may read it a moment later.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let backup_status = status(&backup_api);
        if backup_status["state_generation"] == generation {
            break;
        }
        assert!(Instant::now() < deadline, "the backup never held generation {generation}: {backup_status}");
        std::thread::sleep(Duration::from_millis(20));
    }

    let (code, _, err) = protect(&api, &dir, &listen);
    assert_eq!(code, 125);
    assert_eq!(
        err,
        format!(
            "ftvm: error: the VM refused: this VM is already protected: it replicates to {listen} (unprotect first) \
             (HTTP 409)"
        )
    );

    let (code, answer, err) = ctl(&api, &["unprotect"]);
    assert_eq!(code, 0, "{err}");
    // The generation moved past the one the backup's state counts for, before anything
    // it had not acknowledged left.
    assert_eq!((&answer["state"], &answer["generation"]), (&Value::from("unprotected"), &Value::from(generation + 1)));
    assert_eq!(record(&dir)["generation"], generation + 1);
    let after = status(&api);
    assert_eq!((&after["role"], &after["replication"]), (&Value::from("standalone"), &Value::Null), "{after}");
    let stood_down = backup.wait_exit(Duration::from_secs(10));
    assert_eq!(stood_down.and_then(|s| s.code()), Some(0), "{}\nthe VM's log:\n{}", backup.log(), vm.log());
    assert!(backup.log().contains("stands down"), "{}", backup.log());
    let (code, _, _) = ctl(&api, &["unprotect"]);
    assert_eq!(code, 125, "unprotect twice");

    // Alone again, the VM still holds its record, and marks it ended (one more swap) when
    // it stops.
    let (code, _, err) = ctl(&api, &["stop"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(vm.wait_exit(Duration::from_secs(30)).and_then(|s| s.code()), Some(0), "{}", vm.log());
    let ended = record(&dir);
    assert_eq!((&ended["generation"], &ended["state"]["state"]), (&Value::from(generation + 2), &Value::from("ended")));
}

/// After the VM was stopped: its exit, then the backup's (waiting up to 30 s, reading its
/// role meanwhile), then the record; panics unless both exited 0, the backup stayed a
/// backup, and the record says ended.
fn check_both_ended(dir: &Dir, vm_exit: Option<std::process::ExitStatus>, backup: &mut Proc, backup_api: &Path) {
    let mut roles = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while backup.child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        if let (0, s, _) = ctl(backup_api, &["status"]) {
            roles.push(s["role"].clone());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let backup_exit = backup.wait_exit(Duration::from_millis(1));
    let ended = record(dir);
    let store: Vec<_> = std::fs::read_dir(dir.path("store")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(
        vm_exit.and_then(|s| s.code()) == Some(0)
            && backup_exit.and_then(|s| s.code()) == Some(0)
            && roles.iter().all(|r| r == "backup")
            && ended["state"]["state"] == "ended",
        "VM exit {vm_exit:?}, backup exit {backup_exit:?}, backup roles seen {roles:?}, record {ended}, store \
         {store:?}\nbackup log:\n{}",
        backup.log()
    );
}

/// A VM stopped while `protect` is still copying it to its new backup ends on both sides: the
/// VM exits with its status and marks its record ended, and the backup, which never held a
/// whole state, exits with the same status rather than waiting for a primary that is gone,
/// and never goes live.
#[test]
fn a_vm_stopped_while_being_protected_ends_and_its_backup_exits_rather_than_waiting() {
    let dir = Dir::new("stop-protecting");
    let (mut vm, api) = vm(&dir, true);
    let (mut backup, listen, backup_api) = backup(&dir, "backup");
    let (code, answer, err) = protect(&api, &dir, &listen);
    assert_eq!((code, &answer["state"]), (0, &Value::from("protecting")), "{err}");
    let (code, _, err) = ctl(&api, &["stop"]);
    assert_eq!(code, 0, "{err}");
    let vm_exit = vm.wait_exit(Duration::from_secs(30));
    check_both_ended(&dir, vm_exit, &mut backup, &backup_api);
}

/// The same while the backup is frozen (SIGSTOP) in the middle of the protection: the VM
/// cannot tell it, so it marks the record ended first and exits; the backup, thawed, finds
/// the record ended and exits with the VM's status instead of taking over or waiting for
/// ever (it waited for ever, never having heard its primary, before c7d83fa).
#[test]
fn a_vm_stopped_while_its_new_backup_is_frozen_ends_and_the_thawed_backup_never_goes_live() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let dir = Dir::new("stop-frozen");
    let (mut vm, api) = vm(&dir, true);
    let (mut backup, listen, backup_api) = backup(&dir, "backup");
    let (code, _, err) = protect(&api, &dir, &listen);
    assert_eq!(code, 0, "{err}");
    let pid = Pid::from_raw(backup.child.id() as i32);
    kill(pid, Signal::SIGSTOP).unwrap();
    let (code, _, err) = ctl(&api, &["stop"]);
    assert_eq!(code, 0, "{err}");
    let vm_exit = vm.wait_exit(Duration::from_secs(30));
    kill(pid, Signal::SIGCONT).unwrap();
    check_both_ended(&dir, vm_exit, &mut backup, &backup_api);
}

/// `ftvm ctl status | head -1` (or `grep -q`): the reader goes before the answer is written,
/// and ctl exits 0 without a word (it panicked with a backtrace on the broken pipe).
#[test]
fn ctl_answers_into_a_closed_pipe_without_a_panic() {
    let dir = Dir::new("pipe");
    let (_vm, api) = vm(&dir, false);
    let mut child = ftvm()
        .arg("ctl")
        .arg("--api")
        .arg(&api)
        .arg("status")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader is gone before ctl has connected
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!((out.status.code(), stderr.trim()), (Some(0), ""));
}
