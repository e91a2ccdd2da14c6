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

/// Wait until redis-server in the guest answers PING from namespace `ns`; false once
/// `limit` has passed without an answer.
pub fn wait_pong(ns: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while redis_cli(ns, &["PING"]).as_deref() != Some("PONG") {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    true
}

/// One redis-cli repeating INCR on a single connection, every reply recorded as it comes.
pub struct Session {
    child: Child,
    replies: Arc<Mutex<Vec<(Instant, String)>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

/// What a stopped session got: every reply with when it came, and redis-cli's stderr.
pub struct Stopped {
    pub replies: Vec<(Instant, String)>,
    pub stderr: String,
}

impl Stopped {
    /// The last reply, as a number (0 before any).
    pub fn last(&self) -> u64 {
        self.replies.last().and_then(|(_, r)| r.parse().ok()).unwrap_or(0)
    }

    pub fn count_after(&self, t: Instant) -> usize {
        self.replies.iter().filter(|(at, _)| *at > t).count()
    }

    /// What a new connection reads as the count must be the last reply, or one more: the
    /// INCR in flight when the session was stopped may have been applied, its reply lost.
    pub fn check_count(&self, ns: &str) -> Result<(), String> {
        let count = redis_cli(ns, &["GET", "n"]).ok_or("GET n failed")?;
        let last = self.last();
        match count.parse::<u64>() {
            Ok(n) if n == last || n == last + 1 => Ok(()),
            _ => Err(format!("a new connection reads the count as {count:?}; the session's last reply was {last}")),
        }
    }
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
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                record.lock().unwrap().push((Instant::now(), line));
            }
        });
        Session { child, replies, reader: Some(reader) }
    }

    pub fn count(&self) -> usize {
        self.replies.lock().unwrap().len()
    }

    pub fn count_after(&self, t: Instant) -> usize {
        self.replies.lock().unwrap().iter().filter(|(at, _)| *at > t).count()
    }

    /// When the first reply after `t` came.
    pub fn first_after(&self, t: Instant) -> Option<Instant> {
        self.replies.lock().unwrap().iter().map(|(at, _)| *at).find(|at| *at > t)
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

    /// Stops redis-cli and returns all it got, read to the end of its output.
    pub fn stop(mut self) -> Stopped {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
        }
        let replies = std::mem::take(&mut *self.replies.lock().unwrap());
        Stopped { replies, stderr }
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

/// Cut `cluster`'s replication link until the backup says its state is stale, check that the
/// primary serves `session` on alone (unprotected), then heal the link until the primary is
/// protected again under a newer generation and the backup is no longer stale (checked by
/// `resynced` too, e.g. a lockstep backup in step again). The replies served while cut off.
pub fn cut_and_heal(
    cluster: &mut super::cluster::Cluster,
    session: &mut Session,
    seed: u64,
    protected_limit: Duration,
    resynced: impl Fn(&serde_json::Value) -> bool,
) -> usize {
    use super::cluster::is_protected;
    use super::relay::Mode;
    let protected = cluster.wait_protected(protected_limit);
    let generation = protected["replication"]["generation"].as_u64().expect("a generation");
    cluster.relay.set(Mode::Cut);
    let cut = Instant::now();
    let stale =
        cluster.wait_backup("the backup marked stale by the cut", Duration::from_secs(30), |s| s["stale"] == true);
    assert_eq!(stale["role"], "backup", "{stale}");
    let during = session.count();
    assert!(
        session.wait_for(during + 10, Duration::from_secs(30), None),
        "seed {seed}: the primary stopped serving while cut off (--on-backup-loss continue)\n{}",
        cluster.explain()
    );
    assert!(!is_protected(&cluster.primary_now()), "protected without its backup: {}", cluster.primary_now());
    let served = session.count_after(cut);
    cluster.relay.set(Mode::Pass);
    let healed = cluster.wait_protected(protected_limit);
    assert!(healed["replication"]["generation"].as_u64() > Some(generation), "{healed}");
    let back = cluster
        .wait_backup("the backup resynchronized", Duration::from_secs(60), |s| s["stale"] == false && resynced(s));
    assert_eq!(back["role"], "backup", "{back}");
    served
}

/// Kill the whole primary (keeper and monitor, if resilient) under `session`: the backup
/// takes over and the count goes on for `replies` more; every reply consecutive and the
/// server's count the last one. Panics with the cluster's explanation otherwise. Prints the
/// replies and the takeover's silence.
pub fn kill_primary_and_count_on(
    cluster: &mut super::cluster::Cluster,
    mut session: Session,
    ns: &str,
    replies: usize,
) {
    let killed = cluster.kill_primary();
    let live = cluster.wait_takeover(Duration::from_secs(30));
    let answered = session.wait_for(replies, Duration::from_secs(60), Some(killed));
    let got = session.stop();
    assert!(
        answered,
        "{} replies after the primary's kill (redis-cli said {:?}); the backup: {live}\n{}",
        got.count_after(killed),
        got.stderr,
        cluster.explain()
    );
    check_consecutive(&got.replies).unwrap_or_else(|e| panic!("{e}\n{}", cluster.explain()));
    got.check_count(ns).unwrap_or_else(|e| panic!("{e}\n{}", cluster.explain()));
    println!(
        "{} replies, the takeover after {} ms of silence",
        got.replies.len(),
        live["took_over"]["last_frame_to_live_ms"]
    );
}

/// redis `SHUTDOWN NOSAVE` from the client under `session`: the guest powers off, the primary
/// and the backup both exit with status 0, and the backup never reports a role but "backup"
/// (an ended VM stays ended); every reply before it consecutive. Panics with the cluster's
/// explanation otherwise. Prints the replies and how often the backup's status was read.
pub fn shutdown_ends_both_sides(cluster: &mut super::cluster::Cluster, session: Session, seed: u64) {
    let ns = cluster.topo.client_ns();
    // redis-cli gets no reply to SHUTDOWN: the server closes the connection as it exits.
    let _ = redis_cli(&ns, &["SHUTDOWN", "NOSAVE"]);
    let primary = cluster.primary.wait_exit(Duration::from_secs(60));
    let (backup, roles) = cluster.wait_backup_exit(Duration::from_secs(30));
    let got = session.stop();
    assert!(
        primary.and_then(|s| s.code()) == Some(0)
            && backup.and_then(|s| s.code()) == Some(0)
            && roles.iter().all(|r| r == "backup"),
        "seed {seed}: primary exit {primary:?}, backup exit {backup:?}, roles seen {roles:?}\n{}",
        cluster.explain()
    );
    check_consecutive(&got.replies).unwrap_or_else(|e| panic!("seed {seed}: {e}\n{}", cluster.explain()));
    println!(
        "{} replies before the shutdown; the backup's status read {} times before it exited",
        got.replies.len(),
        roles.len()
    );
}
