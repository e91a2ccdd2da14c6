//! `ftvm vm console`, end to end with real agents on loopback (no root): two hosts share a
//! file store; a checkpoint-protected VM running the guest's shell is declared through the
//! API. The console is attached through the agent of the backup's host (which passes it on to
//! the primary's); a command typed there runs in the guest and its output comes back. Then
//! the primary's whole host is killed: the backup takes over, the same `vm console` attaches
//! again by itself (now served by its own agent), and a second command runs in the VM where
//! it runs now. Verdicts: the commands' evaluated output, the client's exit status.

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
fn vm_console_runs_a_typed_command_in_the_guest_and_follows_the_vm_through_a_failover() {
    let mut cluster = Agents::start("console", &["h1", "h2"]);
    let token = cluster.token.clone();
    let api = cluster.agents[0].api.clone();
    let spec = json!({ "name": "shell", "protection": "checkpoint" });
    let (status, answer) = request(&api, "POST", "/v1/vms", &token, Some(&spec)).expect("POST /v1/vms");
    assert_eq!(status, 201, "{answer}");
    let protected = poll(PROTECT_LIMIT, || {
        let vm = get(&api, "/v1/vms/shell", &token).ok()?;
        (vm["state"] == "protected").then_some(vm)
    });
    let vm = protected.unwrap_or_else(|| panic!("not protected within {PROTECT_LIMIT:?}\n{}", cluster.logs()));
    let primary = vm["owner"].as_str().expect("an owner").to_owned();
    let survivor = if primary == "h1" { "h2" } else { "h1" };
    let survivor_api = cluster.agent(survivor).api.clone();

    // Through the agent of the host that does not run the primary: passed on to the one that does.
    let mut console = Console::attach(&survivor_api, &token, "shell");
    console.run("echo first-$((6*7))", "first-42").unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));

    cluster.agent(&primary).kill();
    let taken_over = poll(Duration::from_secs(60), || {
        let vm: Value = get(&survivor_api, "/v1/vms/shell", &token).ok()?;
        (vm["owner"] == survivor && vm["state"] == "running").then_some(vm)
    });
    taken_over.unwrap_or_else(|| panic!("{survivor} did not take over\n{}", cluster.logs()));
    console
        .run("echo second-$((6*8))", "second-48")
        .unwrap_or_else(|e| panic!("after the failover: {e}\n{}", cluster.logs()));

    // Ctrl-A x detaches: the client ends by itself, with status 0.
    console.stdin.write_all(&[0x01, b'x']).expect("type Ctrl-A x");
    let ended = poll(Duration::from_secs(10), || console.child.try_wait().ok().flatten());
    assert_eq!(ended.expect("vm console ended after Ctrl-A x").code(), Some(0));
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
