//! A replicated VM in network namespaces, for the end-to-end tests: a backup and a
//! primary in their own "hosts", the replication link running through an impairment
//! relay in the backup's host, and helpers to read both replicas' typed status.
//!
//! ```text
//!   primary ──► 192.168.77.2:7100 (relay, in the backup's host) ──► 192.168.77.2:7000 (backup)
//! ```

use super::netns::Topology;
use super::relay::Relay;
use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Where the backup listens, and where the relay listens for the primary.
pub const BACKUP_PORT: u16 = 7000;
pub const RELAY_PORT: u16 = 7100;
/// The guest's MAC address (ftvm's default).
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// Booting the guest and sending the first full checkpoint, on a loaded 2-core machine.
pub const BOOT_LIMIT: Duration = Duration::from_secs(180);

/// How the replicas are started.
pub struct Options {
    /// The command the guest runs.
    pub command: Vec<String>,
    pub epoch_ms: u64,
    /// `--failover-timeout-ms` of the backup.
    pub failover_timeout_ms: u64,
    /// Run the backup with this limit on open descriptors (`ulimit -n`).
    pub backup_max_files: Option<u32>,
    /// Seed of the relay's damage.
    pub seed: u64,
    /// `--initrd` of the primary (the backup gets the machine from it); the default image if None.
    pub initrd: Option<PathBuf>,
    /// Start the primary replicating to the backup (false: alone, with --store; the backup
    /// waits, as a migration's destination does).
    pub replicate: bool,
    /// Fault points of the primary's and the backup's processes (`FAILPOINTS`; needs the
    /// `failpoints` feature).
    pub primary_failpoints: Option<String>,
    pub backup_failpoints: Option<String>,
    /// More options of the primary's `ftvm run` (e.g. `--resilient`).
    pub primary_args: Vec<String>,
    /// More options of the backup's `ftvm backup` (e.g. `--resilient`).
    pub backup_args: Vec<String>,
}

impl Options {
    /// The counter service, 25 ms epochs, and the tests' detection timeout of 500 ms
    /// (so that a loaded CI machine does not cause spurious takeovers).
    pub fn counter(seed: u64) -> Options {
        Options {
            command: vec!["/usr/share/ftvm/counter-httpd".into()],
            epoch_ms: 25,
            failover_timeout_ms: 500,
            backup_max_files: None,
            seed,
            initrd: None,
            replicate: true,
            primary_failpoints: None,
            backup_failpoints: None,
            primary_args: Vec::new(),
            backup_args: Vec::new(),
        }
    }
}

/// A child process, killed (SIGKILL) on drop.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Wait up to `limit` for it to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.exited()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A primary, a backup, the relay between them, and the hosts they live in. Dropping it
/// stops everything (by PID) and removes the namespaces and files.
pub struct Cluster {
    pub primary: Proc,
    pub backup: Proc,
    pub relay: Relay,
    pub topo: Topology,
    pub dir: PathBuf,
    pub primary_api: PathBuf,
    pub backup_api: PathBuf,
    /// The primary's standard output alone (the guest command's output).
    pub primary_stdout: PathBuf,
    pub backup_stdout: PathBuf,
    pub epoch_ms: u64,
    /// Fresh backups started so far (`fresh_backup_in_primary_host`).
    replaced: u32,
    /// How the first backup was started (`restart_backup` starts another the same way).
    backup_args: Vec<String>,
    backup_max_files: Option<u32>,
    restarted: u32,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.primary.child.kill();
        let _ = self.backup.child.kill();
        let _ = self.primary.child.wait();
        let _ = self.backup.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

static CLUSTERS: AtomicU32 = AtomicU32::new(0);

/// The ownership options, the same on both sides (`--store file:DIR`).
fn ownership(dir: &Path) -> Vec<String> {
    vec!["--store".into(), format!("file:{}", dir.join("store").display())]
}

impl Cluster {
    /// Start the backup, the relay and the primary (which begins to boot).
    pub fn start(name: &str, options: &Options) -> Cluster {
        let n = CLUSTERS.fetch_add(1, Ordering::Relaxed);
        let tag = format!("fte-{}-{n}", std::process::id());
        let dir = std::env::temp_dir().join(format!("ftvm-e2e-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("store")).expect("scratch directory");
        let topo = Topology::create(&tag).expect("network namespaces (root)");
        let key = dir.join("key");
        std::fs::write(&key, "00112233445566778899aabbccddeeff").expect("key file");
        let key_s = key.display().to_string();
        let backup_api = dir.join("backup.sock");
        let primary_api = dir.join("primary.sock");

        let listen = format!("{}:{BACKUP_PORT}", Topology::BACKUP_REPL_ADDR);
        let mut backup_args: Vec<String> =
            ["backup", "--listen", &listen, "--key", &key_s, "--net", "tap:tap0"].map(String::from).to_vec();
        backup_args.extend(ownership(&dir));
        backup_args.extend(["--failover-timeout-ms".into(), options.failover_timeout_ms.to_string()]);
        backup_args.extend(["--api".into(), backup_api.display().to_string()]);
        backup_args.extend(options.backup_args.iter().cloned());
        let backup = spawn_in_with(
            &topo.backup_ns(),
            &backup_args,
            &dir,
            "backup",
            options.backup_max_files,
            options.backup_failpoints.as_deref(),
        );
        wait_for_socket(&backup_api, Duration::from_secs(30));

        let relay_addr = format!("{}:{RELAY_PORT}", Topology::BACKUP_REPL_ADDR);
        let relay = Relay::start(
            &topo.backup_ns(),
            relay_addr.parse().expect("valid address"),
            listen.parse().expect("valid address"),
            options.seed,
        );

        let mut primary_args: Vec<String> = ["run", "--net", "tap:tap0"].map(String::from).to_vec();
        if options.replicate {
            primary_args.extend(["--replicate-to", &relay_addr, "--key", &key_s].map(String::from));
        }
        primary_args.extend(ownership(&dir));
        primary_args.extend(["--epoch-ms".into(), options.epoch_ms.to_string()]);
        if let Some(initrd) = &options.initrd {
            primary_args.extend(["--initrd".into(), initrd.display().to_string()]);
        }
        primary_args.extend(options.primary_args.iter().cloned());
        primary_args.extend(["--api".into(), primary_api.display().to_string(), "--".into()]);
        primary_args.extend(options.command.iter().cloned());
        let primary = spawn_in_with(
            &topo.primary_ns(),
            &primary_args,
            &dir,
            "primary",
            None,
            options.primary_failpoints.as_deref(),
        );
        Cluster {
            primary_stdout: dir.join("primary.out"),
            backup_stdout: dir.join("backup.out"),
            primary,
            backup,
            relay,
            topo,
            primary_api,
            backup_api,
            dir,
            epoch_ms: options.epoch_ms,
            replaced: 0,
            backup_args,
            backup_max_files: options.backup_max_files,
            restarted: 0,
        }
    }

    /// SIGKILL the backup.
    pub fn kill_backup(&mut self) {
        let _ = self.backup.child.kill();
        let _ = self.backup.child.wait();
    }

    /// Start a new backup in the backup's host as the first one was (same address, TAP and
    /// API socket), once the old one is dead: the primary, which keeps connecting, finds it.
    pub fn restart_backup(&mut self) {
        assert!(self.backup.exited().is_some(), "the old backup still runs");
        self.restarted += 1;
        let name = format!("backup-{}", self.restarted);
        let _ = std::fs::remove_file(&self.backup_api);
        self.backup = spawn_in(&self.topo.backup_ns(), &self.backup_args, &self.dir, &name, self.backup_max_files);
        self.backup_stdout = self.dir.join(format!("{name}.out"));
        wait_for_socket(&self.backup_api, Duration::from_secs(30));
    }

    /// After a takeover, the replica that took over is the primary: start a fresh backup in
    /// the dead primary's host (its TAP is free again), listening on that host's replication
    /// address (not through the relay), and swap the roles. Returns the address to `protect` to.
    pub fn fresh_backup_in_primary_host(&mut self, failover_timeout_ms: u64) -> String {
        assert!(self.primary.exited().is_some(), "the old primary still runs");
        let n = self.replaced;
        self.replaced += 1;
        let name = format!("fresh-backup-{n}");
        let api = self.dir.join(format!("{name}.sock"));
        // The primaries alternate between the two hosts.
        let (ns, addr) = match n % 2 {
            0 => (self.topo.primary_ns(), Topology::PRIMARY_REPL_ADDR),
            _ => (self.topo.backup_ns(), Topology::BACKUP_REPL_ADDR),
        };
        let listen = format!("{addr}:{BACKUP_PORT}");
        let key = self.dir.join("key").display().to_string();
        let mut args: Vec<String> =
            ["backup", "--listen", &listen, "--key", &key, "--net", "tap:tap0"].map(String::from).to_vec();
        args.extend(ownership(&self.dir));
        args.extend(["--failover-timeout-ms".into(), failover_timeout_ms.to_string()]);
        args.extend(["--api".into(), api.display().to_string()]);
        let fresh = spawn_in(&ns, &args, &self.dir, &name, None);
        wait_for_socket(&api, Duration::from_secs(30));
        self.primary = std::mem::replace(&mut self.backup, fresh);
        self.primary_api = std::mem::replace(&mut self.backup_api, api);
        self.primary_stdout = std::mem::replace(&mut self.backup_stdout, self.dir.join(format!("{name}.out")));
        listen
    }

    /// A third replica waiting in the backup's host, on a TAP device of its own (`tap1`, made
    /// here) and port `BACKUP_PORT + 1` (not through the relay): a migration's destination
    /// while the backup still runs. Its process, API socket and the address to migrate to.
    pub fn spare_backup_in_backup_host(&self, name: &str) -> (Proc, PathBuf, String) {
        let ns = self.topo.backup_ns();
        for args in
            [&["ip", "tuntap", "add", "tap1", "mode", "tap"][..], &["ip", "link", "set", "tap1", "master", "br0", "up"]]
        {
            self.topo.exec(&ns, args).expect("a second TAP device in the backup's host");
        }
        let api = self.dir.join(format!("{name}.sock"));
        let listen = format!("{}:{}", Topology::BACKUP_REPL_ADDR, BACKUP_PORT + 1);
        let key = self.dir.join("key").display().to_string();
        let mut args: Vec<String> =
            ["backup", "--listen", &listen, "--key", &key, "--net", "tap:tap1"].map(String::from).to_vec();
        args.extend(ownership(&self.dir));
        args.extend(["--failover-timeout-ms".into(), "500".into(), "--api".into(), api.display().to_string()]);
        let spare = spawn_in(&ns, &args, &self.dir, name, None);
        wait_for_socket(&api, Duration::from_secs(30));
        (spare, api, listen)
    }

    /// `ftvm ctl --api <the primary's socket> ARGS`: its exit code and its answer (JSON),
    /// or its error line.
    pub fn ctl_primary(&self, args: &[&str]) -> (i32, Result<Value, String>) {
        let out = Command::new(env!("CARGO_BIN_EXE_ftvm"))
            .arg("ctl")
            .arg("--api")
            .arg(&self.primary_api)
            .args(args)
            .output()
            .expect("run ftvm ctl");
        let answer = serde_json::from_slice(&out.stdout).map_err(|_| String::from_utf8_lossy(&out.stderr).into());
        (out.status.code().unwrap_or(-1), answer)
    }

    /// The pre-shared key file both replicas use.
    pub fn key_file(&self) -> PathBuf {
        self.dir.join("key")
    }

    pub fn primary_status(&self) -> Option<Value> {
        status(&self.primary_api)
    }

    pub fn backup_status(&self) -> Option<Value> {
        status(&self.backup_api)
    }

    /// The primary's status now; panics (with both logs) when it does not answer.
    pub fn primary_now(&self) -> Value {
        self.primary_status().unwrap_or_else(|| panic!("the primary's API does not answer\n{}", self.explain()))
    }

    pub fn backup_now(&self) -> Value {
        self.backup_status().unwrap_or_else(|| panic!("the backup's API does not answer\n{}", self.explain()))
    }

    /// Wait until the primary's status satisfies `ok`; panics (with both logs) after `limit`.
    pub fn wait_primary(&mut self, what: &str, limit: Duration, ok: impl Fn(&Value) -> bool) -> Value {
        self.wait_status(what, limit, true, ok)
    }

    pub fn wait_backup(&mut self, what: &str, limit: Duration, ok: impl Fn(&Value) -> bool) -> Value {
        self.wait_status(what, limit, false, ok)
    }

    fn wait_status(&mut self, what: &str, limit: Duration, primary: bool, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + limit;
        let mut last = None;
        while Instant::now() < deadline {
            let s = if primary { self.primary_status() } else { self.backup_status() };
            if let Some(s) = s {
                if ok(&s) {
                    return s;
                }
                last = Some(s);
            }
            let proc = if primary { &mut self.primary } else { &mut self.backup };
            if let Some(code) = proc.exited() {
                panic!(
                    "waiting for {what}: the {} exited ({code})\n{}",
                    if primary { "primary" } else { "backup" },
                    self.explain()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{what}: not within {} s; last status {}\n{}", limit.as_secs(), json(&last), self.explain());
    }

    /// Wait until the primary is protected (its backup holds every output released).
    /// Wait up to `limit` for the backup to exit, reading its role meanwhile: its exit status
    /// (None: still running) and every role it reported (a backup that stays down reports
    /// only "backup").
    pub fn wait_backup_exit(&mut self, limit: Duration) -> (Option<ExitStatus>, Vec<Value>) {
        let mut roles = Vec::new();
        let deadline = Instant::now() + limit;
        while self.backup.exited().is_none() && Instant::now() < deadline {
            if let Some(s) = self.backup_status() {
                roles.push(s["role"].clone());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (self.backup.exited(), roles)
    }

    pub fn wait_protected(&mut self, limit: Duration) -> Value {
        self.wait_primary("the primary protected by its backup", limit, is_protected)
    }

    /// SIGKILL the primary; the moment it was certainly dead.
    pub fn kill_primary(&mut self) -> Instant {
        let _ = self.primary.child.kill();
        let _ = self.primary.child.wait();
        Instant::now()
    }

    /// Wait for the backup to serve the live VM.
    pub fn wait_takeover(&mut self, limit: Duration) -> Value {
        self.wait_backup("the backup's takeover", limit, is_live)
    }

    /// Both logs' tails, for failure messages.
    pub fn explain(&self) -> String {
        format!(
            "--- primary status: {}\n--- backup status: {}\n--- primary log:\n{}\n--- backup log:\n{}",
            json(&self.primary_status()),
            json(&self.backup_status()),
            tail(&self.primary.log, 40),
            tail(&self.backup.log, 40)
        )
    }
}

/// Protected: the backup holds a checkpoint of the current generation covering every
/// output released.
pub fn is_protected(status: &Value) -> bool {
    status["replication"]["protected"] == true
}

/// The replica serves the live VM (a backup that took over says role "primary").
pub fn is_live(status: &Value) -> bool {
    status["role"] == "primary"
}

fn json(v: &Option<Value>) -> String {
    v.as_ref().map_or("(none)".into(), |v| v.to_string())
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Start `ftvm ARGS` in namespace `ns`: standard output (the guest command's output) to
/// DIR/NAME.out, standard error (the monitor's messages) to DIR/NAME.log.
fn spawn_in(ns: &str, args: &[String], dir: &Path, name: &str, max_files: Option<u32>) -> Proc {
    spawn_in_with(ns, args, dir, name, max_files, None)
}

/// [`spawn_in`], with fault points (`FAILPOINTS`).
fn spawn_in_with(
    ns: &str,
    args: &[String],
    dir: &Path,
    name: &str,
    max_files: Option<u32>,
    failpoints: Option<&str>,
) -> Proc {
    let log = dir.join(format!("{name}.log"));
    let out = std::fs::File::create(dir.join(format!("{name}.out"))).expect("output file");
    let err = std::fs::File::create(&log).expect("log file");
    let mut command = Command::new("ip");
    command.args(["netns", "exec", ns]);
    if let Some(n) = max_files {
        // `exec` keeps the PID: killing the child kills ftvm itself.
        command.args(["sh", "-c", &format!("ulimit -n {n} && exec \"$0\" \"$@\"")]);
    }
    if let Some(failpoints) = failpoints {
        command.env("FAILPOINTS", failpoints);
    }
    let child = command
        .arg(env!("CARGO_BIN_EXE_ftvm"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("start ftvm");
    Proc { child, log }
}

/// Until the API answers: the socket's file appears at bind, a moment before it listens.
fn wait_for_socket(path: &Path, limit: Duration) {
    let deadline = Instant::now() + limit;
    while std::os::unix::net::UnixStream::connect(path).is_err() {
        assert!(Instant::now() < deadline, "{} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `GET /status` on a VM's control socket; None when nothing answers.
pub fn status(api: &Path) -> Option<Value> {
    status_within(api, Duration::from_secs(5))
}

/// `GET /status`, giving up after `limit`.
pub fn status_within(api: &Path, limit: Duration) -> Option<Value> {
    let mut stream = UnixStream::connect(api).ok()?;
    stream.set_read_timeout(Some(limit)).ok()?;
    stream.write_all(b"GET /status HTTP/1.1\r\nHost: ftvm\r\nConnection: close\r\n\r\n").ok()?;
    let mut reply = Vec::new();
    stream.take(1 << 20).read_to_end(&mut reply).ok()?;
    let reply = String::from_utf8_lossy(&reply);
    let (head, body) = reply.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    serde_json::from_str(body).ok()
}

/// The backup's acknowledged epoch against the primary's epoch (the primary's status),
/// sampled every 100 ms for a while: how many samples trailed by at most `max_lag` epochs.
#[derive(Debug, Default)]
pub struct LagSamples {
    pub samples: usize,
    pub within: usize,
    pub first_acked: Option<u64>,
    pub last_acked: Option<u64>,
    pub worst_lag: Option<u64>,
    pub disconnected: usize,
    pub unprotected: usize,
}

impl LagSamples {
    pub fn share_within(&self) -> f64 {
        self.within as f64 / self.samples.max(1) as f64
    }
}

/// Sample the primary's status every 100 ms for `span`.
pub fn sample_lag(cluster: &Cluster, span: Duration, max_lag: u64) -> LagSamples {
    let mut s = LagSamples::default();
    let end = Instant::now() + span;
    while Instant::now() < end {
        if let Some(status) = cluster.primary_status() {
            let r = &status["replication"];
            let epoch = status["epoch"].as_u64().unwrap_or(0);
            let acked = r["acked_epoch"].as_u64();
            s.samples += 1;
            if let Some(a) = acked {
                let lag = epoch.saturating_sub(a);
                s.within += (lag <= max_lag) as usize;
                s.worst_lag = Some(s.worst_lag.unwrap_or(0).max(lag));
                s.first_acked.get_or_insert(a);
                s.last_acked = Some(a);
            }
            s.disconnected += (r["backup_connected"] != true) as usize;
            s.unprotected += (!is_protected(&status)) as usize;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    s
}
