//! `ftvm vm console` and disks under the agent, end to end with real agents on loopback (no
//! root): three hosts share a file store; a checkpoint-protected VM with a disk, running the
//! guest's shell, is declared through the API. The console is attached through the agent of
//! the host that runs no replica (which passes it on to the primary's), and a command typed
//! there writes a sector of the disk. The primary's whole host is killed and the declared
//! image removed: the backup takes over and is re-protected onto the third host, whose disk
//! starts empty and is filled by the replication stream; `vm console` attaches again by
//! itself, and the sector reads back (O_DIRECT, from the disk, not the guest's cache). Then
//! the second host is killed and the third reads it too. Last, the one replica left (a former
//! backup, its disk its own copy) is killed alone, its agent alive: every replica is lost at
//! once; the agent keeps that copy and starts the VM again on it (a reboot: RAM is gone, the
//! disk's acknowledged writes are not), and the sector reads back once more. Verdicts: the
//! commands' evaluated output, the API's typed fields, the client's exit status.

#[path = "support/agents.rs"]
mod agents;

use agents::{get, poll, request, Agents};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Booting the guest and protecting it, on a loaded 2-core machine.
const PROTECT_LIMIT: Duration = Duration::from_secs(180);
/// A failover, then placing, booting and protecting a new backup.
const REPROTECT_LIMIT: Duration = Duration::from_secs(90);
/// A command's output coming back (the shell may still be starting: the command is typed again
/// every few seconds until it does).
const ANSWER_LIMIT: Duration = Duration::from_secs(90);

/// A `ftvm vm console` process, its stdout collected.
struct Console {
    child: Child,
    stdin: ChildStdin,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl Console {
    fn attach(api: &str, token: &str, vm: &str) -> Console {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ftvm"))
            .args(["vm", "--api", api, "console", vm])
            .env("FTVM_TOKEN", token)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start ftvm vm console");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = child.stdout.take().expect("stdout");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stdout.read(&mut buf) {
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Console { child, stdin, seen }
    }

    /// Types `command` until `answer` shows in the output (its evaluated form, never the echo
    /// of the typed line), within [`ANSWER_LIMIT`].
    fn run(&mut self, command: &str, answer: &str) -> Result<(), String> {
        let deadline = Instant::now() + ANSWER_LIMIT;
        let mut typed_at = Instant::now() - Duration::from_secs(60);
        loop {
            if String::from_utf8_lossy(&self.seen.lock().unwrap()).contains(answer) {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("vm console exited ({status}) before {answer:?} came back"));
            }
            if Instant::now() >= deadline {
                let tail =
                    String::from_utf8_lossy(&self.seen.lock().unwrap()).chars().rev().take(2000).collect::<String>();
                return Err(format!(
                    "no {answer:?} within {ANSWER_LIMIT:?}; the console showed (reversed tail): {tail}"
                ));
            }
            if typed_at.elapsed() >= Duration::from_secs(4) {
                let _ = self.stdin.write_all(format!("{command}\n").as_bytes());
                typed_at = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_disk_write_typed_through_vm_console_survives_two_host_kills_on_disks_sent_by_the_stream() {
    let mut cluster = Agents::start("console", &["h1", "h2", "h3"]);
    let token = cluster.token.clone();
    let api = cluster.agents[0].api.clone();
    let image = cluster.dir.join("declared-disk.img");
    let mut bytes = b"ftvm-disk-start".to_vec();
    bytes.resize(1 << 20, 0);
    std::fs::write(&image, bytes).expect("disk image");
    let spec = json!({ "name": "shell", "protection": "checkpoint", "disk": image });
    let (status, answer) = request(&api, "POST", "/v1/vms", &token, Some(&spec)).expect("POST /v1/vms");
    assert_eq!(status, 201, "{answer}");
    let vm = wait_vm(&cluster, &api, PROTECT_LIMIT, |vm| vm["state"] == "protected");
    let first = vm["owner"].as_str().expect("an owner").to_owned();
    let second = host_of(&vm, "backup");
    let third = ["h1", "h2", "h3"].into_iter().find(|h| *h != first && *h != second).expect("a third host").to_owned();
    let third_api = cluster.agent(&third).api.clone();

    // Through the agent of a host that runs no replica: passed on to the primary's.
    let mut console = Console::attach(&third_api, &token, "shell");
    let write = "printf disk-before-kill | dd of=/dev/vda bs=512 seek=8 conv=sync,fsync oflag=direct 2>/dev/null \
                 && echo wrote-$((6*7))";
    console.run(write, "wrote-42").unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));

    // The primary's whole host goes, and with it the declared image: the replicas left have
    // only their own disks, filled by the replication stream.
    cluster.agent(&first).kill();
    std::fs::remove_file(&image).expect("remove the declared image");
    let reprotected = |vm: &Value| vm["owner"] == second.as_str() && vm["state"] == "protected";
    let vm = wait_vm(&cluster, &third_api, REPROTECT_LIMIT, reprotected);
    assert_eq!(host_of(&vm, "backup"), third, "re-protected onto the third host: {vm}");
    let read = "echo read-$(dd if=/dev/vda bs=512 skip=8 count=1 iflag=direct 2>/dev/null | head -c 16)";
    console.run(read, "read-disk-before-kill").unwrap_or_else(|e| panic!("on {second}: {e}\n{}", cluster.logs()));

    // Then the host that took over: the third host's disk, sent whole by the second, has it.
    cluster.agent(&second).kill();
    let vm =
        wait_vm(&cluster, &third_api, REPROTECT_LIMIT, |vm| vm["owner"] == third.as_str() && vm["state"] == "running");
    assert_eq!(vm["failovers"], 2, "{vm}");
    let again = "echo again-$(dd if=/dev/vda bs=512 skip=8 count=1 iflag=direct 2>/dev/null | head -c 16)";
    console.run(again, "again-disk-before-kill").unwrap_or_else(|e| panic!("on {third}: {e}\n{}", cluster.logs()));

    // Every replica lost at once: the last one, killed alone (its host's agent lives on). The VM
    // starts again there from the disk copy that replica wrote, not from the declared image
    // (which is gone anyway): nothing the disk acknowledged is lost.
    let replicas = vm["replicas"].as_array().cloned().unwrap_or_default();
    let last = replicas.iter().find(|r| r["host"] == third.as_str() && r["role"] == "primary").expect("the primary");
    let pid = last["pid"].as_u64().and_then(|p| i32::try_from(p).ok()).expect("the primary's PID");
    let generation = vm["generation"].as_u64().expect("a generation");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).expect("kill it");
    let gone = poll(Duration::from_secs(10), || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        (stat.is_empty() || stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z'))).then_some(())
    });
    assert!(gone.is_some(), "replica {pid} still runs: {:?}", std::fs::read_to_string(format!("/proc/{pid}/status")));
    let restarted = |vm: &Value| {
        vm["owner"] == third.as_str() && vm["state"] == "running" && vm["generation"].as_u64() > Some(generation)
    };
    wait_vm(&cluster, &third_api, REPROTECT_LIMIT, restarted);
    let kept = "echo kept-$(dd if=/dev/vda bs=512 skip=8 count=1 iflag=direct 2>/dev/null | head -c 16)";
    console.run(kept, "kept-disk-before-kill").unwrap_or_else(|e| panic!("restarted: {e}\n{}", cluster.logs()));

    // Ctrl-A x detaches: the client ends by itself, with status 0.
    console.stdin.write_all(&[0x01, b'x']).expect("type Ctrl-A x");
    let ended = poll(Duration::from_secs(10), || console.child.try_wait().ok().flatten());
    assert_eq!(ended.expect("vm console ended after Ctrl-A x").code(), Some(0));
}

/// Polls the VM through `api` until `done` holds (the last answer in the panic otherwise).
fn wait_vm(cluster: &Agents, api: &str, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let found = poll(limit, || {
        let vm = get(api, "/v1/vms/shell", &cluster.token).ok()?;
        if done(&vm) {
            return Some(vm);
        }
        last = vm;
        None
    });
    found.unwrap_or_else(|| panic!("not reached within {limit:?}: {last}\n{}", cluster.logs()))
}

/// The host of the VM's replica in `role`.
fn host_of(vm: &Value, role: &str) -> String {
    let replicas = vm["replicas"].as_array().cloned().unwrap_or_default();
    let replica = replicas.iter().find(|r| r["role"] == role).unwrap_or_else(|| panic!("no {role}: {vm}"));
    replica["host"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn vm_console_of_an_unknown_vm_or_without_the_token_is_refused() {
    let cluster = Agents::start("console-refusals", &["h1"]);
    let api = &cluster.agents[0].api;
    let refused = |token: &str, vm: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_ftvm"))
            .args(["vm", "--api", api, "console", vm])
            .env("FTVM_TOKEN", token)
            .stdin(Stdio::null())
            .output()
            .expect("run ftvm vm console");
        (out.status.code(), String::from_utf8_lossy(&out.stderr).trim().to_string())
    };
    assert_eq!(
        refused(&cluster.token, "nope"),
        (Some(125), "ftvm: error: the agent refused: no VM named \"nope\" (HTTP 404)".to_string())
    );
    assert_eq!(
        refused("wrong", "nope"),
        (
            Some(125),
            "ftvm: error: the agent refused: unauthorized: send Authorization: Bearer <token> (HTTP 401)".to_string()
        )
    );
}
