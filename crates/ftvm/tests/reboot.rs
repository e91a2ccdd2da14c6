//! End to end: a guest reboot boots the same VM again. The guest's command writes a
//! marker to its disk and reboots; the default guest's init runs the command again at the
//! second boot, which finds the marker and exits 7 — so status 7 proves both the reboot
//! and the disk surviving it. `--no-reboot` ends the run at the reboot (status 0). A
//! replicated VM reboots on the primary and stays one VM: protected after the reboot, and
//! the backup stands down with the VM's status. Needs the guest image; no root (the
//! replication link is on loopback).

mod common;

use common::local::{ftvm, wait_status, Proc};
use serde_json::Value;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

/// First boot: mark the disk and reboot. Later boots: `then` (which ends with `exit 7`).
fn reboot_once(then: &str) -> String {
    format!(
        "if [ \"$(head -c 11 /dev/vda)\" = booted-once ]; then {then}; fi; \
         echo booted-once > /dev/vda; sync; echo first boot; reboot -f"
    )
}

/// A directory for one test's files, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../guest/out");
        assert!(out.join("Image").exists(), "guest image missing: run `bash guest/build.sh` (scripts/test does)");
        let dir = std::env::temp_dir().join(format!("ftvm-reboot-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// A blank 1 MiB disk image.
    fn disk(&self, name: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn marked(disk: &Path) -> bool {
    std::fs::read(disk).unwrap().starts_with(b"booted-once\n")
}

fn run_reboot_once(disk: &Path, extra: &[&str]) -> Output {
    ftvm()
        .args(["run", "--clock", "fast", "--mem", "128M", "--disk"])
        .arg(disk)
        .args(extra)
        .args(["--", "sh", "-c", &reboot_once("echo second boot; exit 7")])
        .output()
        .unwrap()
}

#[test]
fn a_guest_reboot_boots_the_vm_again_with_its_disk() {
    let dir = Scratch::new("run");
    let disk = dir.disk("disk.img");
    let out = run_reboot_once(&disk, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let explain = format!("stdout:\n{stdout}\nstderr:\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(7), "the second boot found the disk marker: {explain}");
    assert!(stdout.starts_with("first boot\n") && stdout.ends_with("second boot\n"), "{explain}");
    assert!(!stdout.contains("userspace up"), "the second boot's messages stay hidden: {explain}");
    assert!(marked(&disk));
}

#[test]
fn with_no_reboot_a_guest_reboot_ends_the_run() {
    let dir = Scratch::new("no-reboot");
    let disk = dir.disk("disk.img");
    let out = run_reboot_once(&disk, &["--no-reboot"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("first boot\n") && !stdout.contains("second boot"), "{stdout}");
    assert!(marked(&disk), "the first boot ran");
}

#[test]
fn the_status_counts_reboots() {
    let dir = Scratch::new("status");
    let disk = dir.disk("disk.img");
    let socket = dir.0.join("api.sock");
    let child = ftvm()
        .args(["run", "--mem", "128M", "--disk"])
        .arg(&disk)
        .arg("--api")
        .arg(&socket)
        .args(["--", "sh", "-c", &reboot_once("sleep 600; exit 7")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut vm = Proc(child);
    let seen = wait_status(&socket, Duration::from_secs(240), |s| s["reboots"] == 1);
    assert_eq!(seen.as_ref().map(|s| s["reboots"].clone()), Some(Value::from(1)), "last status: {seen:?}");
    assert!(ftvm().arg("ctl").arg("--api").arg(&socket).arg("stop").status().unwrap().success());
    assert_eq!(vm.wait_exit(Duration::from_secs(30)), Some(0));
}

#[test]
fn a_replicated_vm_reboots_as_one_vm_protected_after_and_both_sides_end_with_its_status() {
    let dir = Scratch::new("replicated");
    let (primary_disk, backup_disk) = (dir.disk("primary.img"), dir.disk("backup.img"));
    let key = dir.0.join("key");
    std::fs::write(&key, "0123456789abcdef0123456789abcdef").unwrap();
    let store = format!("file:{}", dir.0.join("store").display());
    let socket = dir.0.join("primary.sock");
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let (key, store) = (key.display().to_string(), store.as_str());
    let spawn = |name: &str, args: Vec<String>| {
        let log = |kind: &str| std::fs::File::create(dir.0.join(format!("{name}.{kind}"))).unwrap();
        Proc(ftvm().args(args).stdout(log("out")).stderr(log("err")).spawn().unwrap())
    };
    let vm_args = |disk: &Path| {
        let disk = disk.display().to_string();
        ["--mem", "128M", "--disk", &disk, "--key", &key, "--store", store].map(String::from).to_vec()
    };
    let backup_args = ["backup", "--listen", &addr, "--failover-timeout-ms", "3000"].map(String::from);
    let mut backup = spawn("backup", [backup_args.to_vec(), vm_args(&backup_disk)].concat());
    std::thread::sleep(Duration::from_millis(500)); // the backup listens before the primary dials
    let socket_arg = socket.display().to_string();
    let primary_args = ["run", "--replicate-to", &addr, "--api", &socket_arg].map(String::from);
    let command = ["--", "sh", "-c", &reboot_once("sleep 5; echo second boot; exit 7")].map(String::from);
    let mut primary = spawn("primary", [primary_args.to_vec(), vm_args(&primary_disk), command.to_vec()].concat());

    let protected = |s: &Value| s["reboots"] == 1 && s["replication"]["protected"] == true;
    let after = wait_status(&socket, Duration::from_secs(240), protected);
    let primary_code = primary.wait_exit(Duration::from_secs(120));
    let backup_code = backup.wait_exit(Duration::from_secs(30));
    let logs = |name: &str| {
        let read = |kind: &str| std::fs::read_to_string(dir.0.join(format!("{name}.{kind}"))).unwrap_or_default();
        format!("{name} stdout:\n{}\n{name} stderr:\n{}", read("out"), read("err"))
    };
    let explain = format!("{}\n{}\nlast primary status: {after:?}", logs("primary"), logs("backup"));
    assert!(after.as_ref().is_some_and(protected), "protected again after the reboot: {explain}");
    assert_eq!((primary_code, backup_code), (Some(7), Some(7)), "{explain}");
    let primary_out = std::fs::read_to_string(dir.0.join("primary.out")).unwrap();
    assert!(primary_out.starts_with("first boot\n") && primary_out.ends_with("second boot\n"), "{explain}");
    assert!(marked(&primary_disk) && marked(&backup_disk), "the marker reached the backup's disk: {explain}");
}
