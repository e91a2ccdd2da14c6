//! ftvm processes on this host, and their status through `ftvm ctl status`.

use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// The ftvm binary under test.
pub fn ftvm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ftvm"))
}

/// A child killed (by its PID) when dropped, so that a failing test leaves nothing running.
pub struct Proc(pub Child);

impl Proc {
    /// Its exit code, once it exited within `limit` (None: still running, or killed by a signal).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `ftvm ctl status` of the VM serving `socket`, once it answers.
pub fn status(socket: &Path) -> Option<Value> {
    let out = ftvm().arg("ctl").arg("--api").arg(socket).arg("status").output().ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// Poll `socket`'s status until `done` holds; the last status seen.
pub fn wait_status(socket: &Path, limit: Duration, done: impl Fn(&Value) -> bool) -> Option<Value> {
    let deadline = Instant::now() + limit;
    let mut last = None;
    while Instant::now() < deadline {
        if let Some(s) = status(socket) {
            if done(&s) {
                return Some(s);
            }
            last = Some(s);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    last
}
