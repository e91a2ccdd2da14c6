//! Debian's redis-server in the guest and Debian's redis-cli on the host: a real service
//! and a real client, for tests that judge a promise from the client's side.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The guest's address (guest/init).
pub const GUEST: &str = "10.0.2.15";

/// redis-server as the guest's command: no persistence (the VM's memory is the state
/// that replication and recovery keep), reachable from other hosts.
pub const SERVER: [&str; 7] = ["redis-server", "--save", "", "--appendonly", "no", "--protected-mode", "no"];

/// The guest image with redis-server; checks that the host has its redis-cli too.
pub fn redis_image() -> PathBuf {
    let image = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../guest/debian-test/out/redis-initrd.cpio.gz");
    assert!(image.exists(), "{} missing: run `bash guest/build-debian-test.sh` (scripts/test does)", image.display());
    let cli = Command::new("redis-cli").arg("--version").output();
    assert!(cli.is_ok_and(|o| o.status.success()), "no redis-cli on the host: install redis-tools (scripts/test does)");
    image
}

/// `redis-cli -h GUEST ARGS...` in the namespace `ns`, once; its output if it succeeded.
pub fn redis_cli(ns: &str, args: &[&str]) -> Option<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "redis-cli", "-h", GUEST])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// One redis-cli repeating INCR on a single connection, every reply recorded as it comes.
pub struct Session {
    child: Child,
    pub replies: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Session {
    pub fn start(ns: &str) -> Session {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "redis-cli", "-h", GUEST, "-r", "1000000", "-i", "0.01", "INCR", "n"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start redis-cli");
        let replies = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().expect("piped");
        let record = replies.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                record.lock().unwrap().push((Instant::now(), line));
            }
        });
        Session { child, replies }
    }

    pub fn count(&self) -> usize {
        self.replies.lock().unwrap().len()
    }

    pub fn count_after(&self, t: Instant) -> usize {
        self.replies.lock().unwrap().iter().filter(|(at, _)| *at > t).count()
    }

    /// Waits for `n` replies in all; false if the session ended or `limit` passed first.
    pub fn wait_for(&mut self, n: usize, limit: Duration, after: Option<Instant>) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let got = after.map_or_else(|| self.count(), |t| self.count_after(t));
            if got >= n {
                return true;
            }
            if Instant::now() > deadline || self.child.try_wait().ok().flatten().is_some() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What redis-cli printed on stderr, once stopped.
    pub fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        err
    }
}

/// The replies must be 1, 2, 3, ...: a value twice is acknowledged work lost (a backup
/// went live from an older state), a value skipped is an INCR applied but never answered
/// on this session (which the one client never sends).
pub fn check_consecutive(replies: &[(Instant, String)]) -> Result<(), String> {
    for (i, (_, reply)) in replies.iter().enumerate() {
        let want = (i + 1).to_string();
        if *reply != want {
            let around: Vec<&str> =
                replies[i.saturating_sub(5)..(i + 5).min(replies.len())].iter().map(|(_, r)| r.as_str()).collect();
            return Err(format!("reply {} was {reply:?}, not {want} (around it: {around:?})", i + 1));
        }
    }
    Ok(())
}
