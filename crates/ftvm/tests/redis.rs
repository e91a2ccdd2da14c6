//! A real service with a real client, judged from the client's side: Debian's
//! redis-server (trixie, riscv64, in guest/debian-test/out/redis-initrd.cpio.gz) runs in a
//! checkpoint-replicated VM, and Debian's redis-cli on the host (bookworm's redis-tools,
//! installed by scripts/test) counts with INCR over one long-lived TCP session while the
//! primary is killed with SIGKILL. Every reply the client got is acknowledged work: the
//! replies must run 1, 2, 3, ... with no value twice and none skipped, across the takeover,
//! and the session must survive it. Root (network namespaces).
//! A failing run prints FTVM_TEST_SEED (where in the epoch the kill lands).

mod common;

use common::cluster::{Cluster, Options, BOOT_LIMIT};
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const GUEST: &str = "10.0.2.15";
const PROTECTED_LIMIT: Duration = Duration::from_secs(60);
const TAKEOVER_LIMIT: Duration = Duration::from_secs(30);
/// Replies the session must get after the kill.
const REPLIES_AFTER: usize = 30;

fn seed() -> u64 {
    let seed = std::env::var("FTVM_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64
    });
    println!("FTVM_TEST_SEED={seed}");
    seed
}

fn redis_image() -> PathBuf {
    let image = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../guest/debian-test/out/redis-initrd.cpio.gz");
    assert!(image.exists(), "{} missing: run `bash guest/build-debian-test.sh` (scripts/test does)", image.display());
    let cli = Command::new("redis-cli").arg("--version").output();
    assert!(cli.is_ok_and(|o| o.status.success()), "no redis-cli on the host: install redis-tools (scripts/test does)");
    image
}

/// `redis-cli -h GUEST ARGS...` in the client's namespace, once.
fn redis_cli(ns: &str, args: &[&str]) -> Option<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "redis-cli", "-h", GUEST])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// One redis-cli repeating INCR on a single connection, every reply recorded as it comes.
struct Session {
    child: Child,
    replies: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Session {
    fn start(ns: &str) -> Session {
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

    fn count(&self) -> usize {
        self.replies.lock().unwrap().len()
    }

    fn count_after(&self, t: Instant) -> usize {
        self.replies.lock().unwrap().iter().filter(|(at, _)| *at > t).count()
    }

    /// Waits for `n` replies in all; false if the session ended or `limit` passed first.
    fn wait_for(&mut self, n: usize, limit: Duration, after: Option<Instant>) -> bool {
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
    fn stop(mut self) -> String {
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
fn check_consecutive(replies: &[(Instant, String)]) -> Result<(), String> {
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

#[test]
fn debians_redis_cli_counts_on_through_a_sigkill_of_the_primary_with_nothing_lost() {
    let seed = seed();
    let image = redis_image();
    let command = ["redis-server", "--save", "", "--appendonly", "no", "--protected-mode", "no"];
    let options = Options {
        command: command.map(String::from).to_vec(),
        initrd: Some(image),
        // Twice the other tests' detection timeout: redis' larger image boots with more
        // pauses, and a spurious takeover on a loaded machine (correctly refused to the
        // primary by the ownership record) would end the test before its kill.
        failover_timeout_ms: 1000,
        ..Options::counter(seed)
    };
    let mut cluster = Cluster::start("redis", &options);
    let ns = cluster.topo.client_ns();
    let deadline = Instant::now() + BOOT_LIMIT;
    while redis_cli(&ns, &["PING"]).as_deref() != Some("PONG") {
        assert!(Instant::now() < deadline, "redis-server never answered PING\n{}", cluster.explain());
        std::thread::sleep(Duration::from_millis(200));
    }
    cluster.wait_protected(PROTECTED_LIMIT);

    let mut session = Session::start(&ns);
    assert!(session.wait_for(50, Duration::from_secs(60), None), "the session got {} replies", session.count());
    // Anywhere within a few epochs, so that across runs the kill lands at every phase of a
    // checkpoint.
    std::thread::sleep(Duration::from_millis(seed % 200));
    let killed = cluster.kill_primary();
    let live = cluster.wait_takeover(TAKEOVER_LIMIT);
    let answered = session.wait_for(REPLIES_AFTER, Duration::from_secs(60), Some(killed));
    let replies = session.replies.lock().unwrap().clone();
    let after = session.count_after(killed);
    let stderr = session.stop();
    assert!(
        answered,
        "seed {seed}: the session got {after} replies after the kill (redis-cli said {stderr:?}); \
         the backup's status: {live}\n{}",
        cluster.explain()
    );
    check_consecutive(&replies).unwrap_or_else(|e| panic!("seed {seed}: {e}\n{}", cluster.explain()));
    // A new connection to the VM that carries on sees the count the session last saw.
    let last = replies.last().map(|(_, r)| r.clone()).unwrap();
    assert_eq!(redis_cli(&ns, &["GET", "n"]), Some(last), "seed {seed}\n{}", cluster.explain());
    println!("{} replies, {after} after the kill", replies.len());
}
