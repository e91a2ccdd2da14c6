//! `ftvm bench replication`: the figures of merit of hypervisor-based fault tolerance,
//! side by side in one run — a guest workload's time unreplicated and replicated at
//! several epoch lengths (normalized performance), checkpoint pause times, bytes per
//! second on the replication link, the response latency output commit adds, and the
//! takeover time from SIGKILL to the first answered request (min, median and max over at
//! least `--kills` kills, with the backup's default detection timeout).
//!
//! Lockstep (`--mode lockstep`) is a row beside the epochs (`--lockstep false` to skip it),
//! and [`redis`] measures a real service the same three ways (unreplicated, epoch 25 ms,
//! lockstep): Debian's redis-server driven by the host's redis-benchmark.
//!
//! It also times re-protections ([`reprotect`]): `ftvm ctl protect` from a replica that
//! took over to a fresh backup, until the first acknowledged epoch, for the default guest
//! and for one with a large (sparse) disk.
//!
//! The takeover is measured by a probe that opens a new connection every 10 ms and
//! abandons any connection attempt unanswered after 50 ms, so that TCP's own
//! retransmission timers (1 s for a lost SYN) never hide what ftvm does; a connection the
//! guest accepted then gets its HTTP answer (the guest's CGI alone takes tens of ms).

use crate::demo::{count_once, spawn_in, Proc, HTTP_ADDR};
use crate::netns::Topology;
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod microreboot;
mod migrate;
mod redis;
mod reprotect;

/// The takeover probe: a new connection this often...
const PROBE_EVERY: Duration = Duration::from_millis(10);
/// ...each abandoned when the guest has not accepted it by then...
const PROBE_ABANDON: Duration = Duration::from_millis(50);
/// ...and, once accepted, given this long for its HTTP answer.
const PROBE_ANSWER: Duration = Duration::from_secs(2);
/// Epoch length of the extra kill rounds (the default of `ftvm run`).
const KILL_EPOCH_MS: u64 = 25;
/// Runs of one configuration, at most, when spurious takeovers cut them short.
const MAX_ATTEMPTS: usize = 3;

/// The backup took over while the primary was alive (a loaded host starved the link for
/// longer than the default detection timeout): safe — the primary stops, the backup
/// carries on — but that run's figures are lost, so it is counted and run again.
#[derive(Debug)]
struct SpuriousTakeover;

impl std::fmt::Display for SpuriousTakeover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the backup took over while the primary was alive (a spurious takeover)")
    }
}

impl std::error::Error for SpuriousTakeover {}

/// The guest's workloads, timed one after the other: a light one (a shell loop: CPU work,
/// few memory writes) and a memory-heavy one (32 MiB written to tmpfs and read back: what
/// checkpoints must carry); then the counter service for the latency and failover figures.
/// They start when the bench connects to port 9: only once the primary is protected, so
/// that neither of the lines timed waits behind the first full checkpoint (outputs are held
/// until the backup has it).
/// Each phase is timed by the guest's own clock (its uptime at each line): a line that marks
/// a phase is an output, which replication may hold back for a while (output commit), so
/// the moment the host sees it is not the moment the guest reached it.
const WORKLOAD: &str = "nc -l -p 9 >/dev/null; echo bench: start $(cut -d' ' -f1 /proc/uptime); \
    i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo bench: heavy $(cut -d' ' -f1 /proc/uptime); \
    dd if=/dev/zero of=/tmp/w bs=64k count=512 2>/dev/null; md5sum /tmp/w >/dev/null; rm /tmp/w; \
    echo bench: end $(cut -d' ' -f1 /proc/uptime); exec /usr/share/ftvm/counter-httpd";

#[derive(clap::Subcommand, Debug)]
pub enum BenchKind {
    /// Replication overhead, latency and failover time (root: network namespaces)
    Replication(ReplicationBench),
    /// Monitor microreboots: fault injections into a --resilient VM's monitor, coverage and recovery time
    Microreboot(microreboot::MicrorebootBench),
    /// Live migrations of the default guest under load: total time, bytes sent, downtime (loopback)
    Migrate(migrate::MigrateBench),
}

#[derive(clap::Args, Debug)]
pub struct ReplicationBench {
    /// Epoch lengths to measure, in ms
    #[arg(long, value_delimiter = ',', default_value = "10,25,50,100")]
    pub epochs: Vec<u64>,
    /// Sequential HTTP requests per configuration for the latency figures
    #[arg(long, default_value_t = 40)]
    pub requests: usize,
    /// Rounds: every configuration runs once per round, in alternation (this machine is
    /// noisy); the table shows medians (0: no table, e.g. to time only re-protections)
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Kills at least: rounds that only kill a primary (epoch 25 ms) are added when the
    /// configurations above give fewer
    #[arg(long, default_value_t = 5)]
    pub kills: usize,
    /// Re-protections timed per guest (0: none)
    #[arg(long, default_value_t = 3)]
    pub reprotects: usize,
    /// The disk of the second re-protected guest: a sparse raw file of this size (0: only
    /// the default guest)
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = crate::run_cmd::parse_size)]
    pub reprotect_disk: u64,
    /// Pass --verify-every N to the primaries (end-to-end digest checks; costs pauses)
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub verify_every: u64,
    /// Keep the replicas' logs here [default: a temporary directory]
    #[arg(long, value_name = "DIR")]
    pub logs: Option<PathBuf>,
    /// Also measure lockstep replication (`--mode lockstep`), beside the checkpoint epochs
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub lockstep: bool,
    /// Rounds of the real-service figures: Debian's redis-server in the guest (the Debian test
    /// image, `bash guest/build-debian-test.sh`; skipped when it is missing) driven by the
    /// host's redis-benchmark, unreplicated, at epoch 25 ms and in lockstep (0: none)
    #[arg(long, default_value_t = 1)]
    pub redis_runs: usize,
    /// The backups' detection timeout, in ms [default: the backup's own]. On a loaded host
    /// the default takes over spuriously (the run is repeated, three times at most); a longer
    /// one keeps the runs, and the takeover figures include it
    #[arg(long, value_name = "MS")]
    pub failover_timeout_ms: Option<u64>,
}

/// What every replicated run of the table is started with.
#[derive(Debug, Clone, Copy, Default)]
struct Tuning {
    verify_every: u64,
    failover_timeout_ms: Option<u64>,
}

/// One configuration of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Config {
    Unreplicated,
    /// Checkpoint replication with this epoch length (ms).
    Checkpoint(u64),
    /// Lockstep replication.
    Lockstep,
}

impl Config {
    fn replicated(self) -> bool {
        self != Config::Unreplicated
    }
}

#[derive(Debug, Default)]
struct Figures {
    /// The light workload's time and the memory-heavy one's, and the primary process's CPU
    /// time over each (all its threads): apart from the host's contention, which on one
    /// host includes a lockstep backup executing the same instructions.
    light_s: f64,
    heavy_s: f64,
    light_cpu_s: Option<f64>,
    heavy_cpu_s: Option<f64>,
    pause_avg_ms: Option<f64>,
    pause_max_ms: Option<f64>,
    /// The link during the workloads (busy) and with the guest idle (the counter waiting).
    busy: Option<Link>,
    idle: Option<Link>,
    /// Lockstep: how long the guest paused in all for a lagging backup during the workloads.
    throttled_ms: Option<f64>,
    latency_ms: f64,
    takeover: Option<Takeover>,
}

/// Bytes on the replication link over a window, in Mbit/s: the replication itself
/// (checkpoints, or lockstep's batches with their framing and acknowledgements) and,
/// lockstep only, the heartbeats of both sides apart (checkpoint: included).
#[derive(Debug, Clone, Copy, Default)]
struct Link {
    mbit_s: f64,
    heartbeat_mbit_s: Option<f64>,
}

/// One kill: from SIGKILL to the first connection the backup's guest accepted, and to the
/// first HTTP answer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Takeover {
    pub(crate) accepted_ms: f64,
    pub(crate) answered_ms: f64,
}

pub fn run(kind: BenchKind) -> Result<i32> {
    let args = match kind {
        BenchKind::Replication(args) => args,
        BenchKind::Microreboot(args) => return microreboot::run(args),
        BenchKind::Migrate(args) => return migrate::run(args),
    };
    crate::netns::require_root()?;
    crate::guest_image::ensure()?;
    let dir =
        args.logs.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("ftvm-bench-{}", std::process::id())));
    std::fs::create_dir_all(&dir)?;
    let topo = Topology::create(&format!("ftvm-bench-{}", std::process::id()))?;
    let configs: Vec<Config> = std::iter::once(Config::Unreplicated)
        .chain(args.epochs.iter().copied().map(Config::Checkpoint))
        .chain(args.lockstep.then_some(Config::Lockstep))
        .collect();
    let mut samples: Vec<Vec<Figures>> = configs.iter().map(|_| Vec::new()).collect();
    let mut spurious = 0;
    let tuning = Tuning { verify_every: args.verify_every, failover_timeout_ms: args.failover_timeout_ms };
    for round in 1..=args.runs {
        for (i, &config) in configs.iter().enumerate() {
            eprintln!("bench: round {round}/{}: {}", args.runs, label(config));
            let figures = attempt(&mut spurious, || measure(&topo, &dir, config, args.requests, tuning))?;
            samples[i].extend(figures);
        }
    }
    let mut kills: Vec<Takeover> = samples.iter().flatten().filter_map(|f| f.takeover).collect();
    // Bounded: on a host that starves every run, the bench ends with what it has.
    for _ in 0..args.kills.saturating_sub(kills.len()) * 2 {
        if kills.len() >= args.kills {
            break;
        }
        eprintln!("bench: kill {}/{}", kills.len() + 1, args.kills);
        kills.extend(attempt(&mut spurious, || kill_once(&topo, &dir, KILL_EPOCH_MS))?);
    }
    let mut reprotections = Vec::new();
    if args.reprotects > 0 {
        let disks = std::iter::once(None).chain((args.reprotect_disk > 0).then_some(Some(args.reprotect_disk)));
        for disk_bytes in disks {
            eprintln!("bench: re-protection, {}", reprotect::label(disk_bytes));
            if let Some(rounds) =
                attempt(&mut spurious, || reprotect::measure(&topo, &dir, disk_bytes, args.reprotects))?
            {
                reprotections.push((disk_bytes, rounds));
            }
        }
    }
    let rows: Vec<(String, Figures)> =
        configs.iter().zip(samples).filter(|(_, s)| !s.is_empty()).map(|(&c, s)| (label(c), median(s))).collect();
    if !rows.is_empty() {
        print_table(&rows);
    }
    redis_rounds(&topo, &dir, &args, &mut spurious)?;
    print_takeover(&kills, args.failover_timeout_ms);
    reprotect::print(&reprotections);
    println!(
        "spurious takeovers (the backup went live while the primary was alive; the primary then stopped; the run was repeated, {MAX_ATTEMPTS} times at most): {spurious}"
    );
    drop(topo);
    if args.logs.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(0)
}

/// The real-service figures ([`redis`]), each configuration once per round, in alternation.
fn redis_rounds(topo: &Topology, dir: &Path, args: &ReplicationBench, spurious: &mut usize) -> Result<()> {
    if args.redis_runs == 0 {
        return Ok(());
    }
    let Some(initrd) = redis::image() else {
        println!("redis: no guest/debian-test/out/redis-initrd.cpio.gz (bash guest/build-debian-test.sh): skipped");
        return Ok(());
    };
    let configs: Vec<Config> = [Config::Unreplicated, Config::Checkpoint(KILL_EPOCH_MS)]
        .into_iter()
        .chain(args.lockstep.then_some(Config::Lockstep))
        .collect();
    let mut rows: Vec<(String, Vec<redis::RedisFigures>)> = configs.iter().map(|&c| (label(c), Vec::new())).collect();
    let load_start = redis::load_average();
    for round in 1..=args.redis_runs {
        for (i, &config) in configs.iter().enumerate() {
            eprintln!("bench: redis round {round}/{}: {}", args.redis_runs, label(config));
            let tuning = Tuning { verify_every: 0, failover_timeout_ms: args.failover_timeout_ms };
            rows[i].1.extend(attempt(spurious, || redis::measure(topo, dir, config, tuning, &initrd))?);
        }
    }
    redis::print(&rows, (load_start, redis::load_average()));
    Ok(())
}

/// Run `f` again (up to [`MAX_ATTEMPTS`] in all) when a spurious takeover cut it short;
/// None when every attempt was (that run is left out of the figures, and counted).
fn attempt<T>(spurious: &mut usize, mut f: impl FnMut() -> Result<T>) -> Result<Option<T>> {
    for _ in 0..MAX_ATTEMPTS {
        match f() {
            Err(e) if e.is::<SpuriousTakeover>() => {
                *spurious += 1;
                eprintln!("bench: {e}");
            }
            other => return other.map(Some),
        }
    }
    eprintln!("bench: {MAX_ATTEMPTS} spurious takeovers in a row: this run is left out");
    Ok(None)
}

fn label(config: Config) -> String {
    match config {
        Config::Unreplicated => "unreplicated".into(),
        Config::Checkpoint(e) => format!("epoch {e} ms"),
        Config::Lockstep => "lockstep".into(),
    }
}

/// The median of each figure over the rounds.
fn median(samples: Vec<Figures>) -> Figures {
    fn mid(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }
    let opt = |f: &dyn Fn(&Figures) -> Option<f64>| {
        let v: Vec<f64> = samples.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| mid(v))
    };
    let link = |f: &dyn Fn(&Figures) -> Option<Link>| {
        opt(&|s| f(s).map(|l| l.mbit_s))
            .map(|mbit_s| Link { mbit_s, heartbeat_mbit_s: opt(&|s| f(s).and_then(|l| l.heartbeat_mbit_s)) })
    };
    Figures {
        light_s: mid(samples.iter().map(|f| f.light_s).collect()),
        heavy_s: mid(samples.iter().map(|f| f.heavy_s).collect()),
        light_cpu_s: opt(&|f| f.light_cpu_s),
        heavy_cpu_s: opt(&|f| f.heavy_cpu_s),
        pause_avg_ms: opt(&|f| f.pause_avg_ms),
        pause_max_ms: opt(&|f| f.pause_max_ms),
        busy: link(&|f| f.busy),
        idle: link(&|f| f.idle),
        throttled_ms: opt(&|f| f.throttled_ms),
        latency_ms: mid(samples.iter().map(|f| f.latency_ms).collect()),
        takeover: opt(&|f| f.takeover.map(|t| t.answered_ms))
            .zip(opt(&|f| f.takeover.map(|t| t.accepted_ms)))
            .map(|(answered_ms, accepted_ms)| Takeover { accepted_ms, answered_ms }),
    }
}

/// The replicas of one run: the backup (when replicated) and the primary running `command`.
struct Pair {
    backup: Option<Proc>,
    primary: Proc,
    sock: PathBuf,
    backup_sock: PathBuf,
    log: PathBuf,
}

impl Pair {
    /// `error` unless the primary ended because its backup took over: then a spurious takeover.
    fn explain(&mut self, error: anyhow::Error) -> anyhow::Error {
        let primary_ended = self.primary.child.try_wait().ok().flatten().is_some();
        let backup_live = crate::api::request(&self.backup_sock, &crate::api::Command::Status)
            .is_ok_and(|r| r.body["took_over"].is_object());
        if primary_ended && backup_live {
            SpuriousTakeover.into()
        } else {
            error
        }
    }
}

/// Start a backup (when `epoch_ms` is given) and a primary; `disks` gives each its disk image
/// (primary's, backup's).
fn start_pair(
    topo: &Topology,
    dir: &Path,
    epoch_ms: Option<u64>,
    verify_every: u64,
    command: &str,
    disks: Option<(&Path, &Path)>,
) -> Result<Pair> {
    let config = epoch_ms.map_or(Config::Unreplicated, Config::Checkpoint);
    let tuning = Tuning { verify_every, failover_timeout_ms: None };
    start_with(topo, dir, config, tuning, command, disks, None)
}

/// Start a backup (when `config` is replicated) and a primary, both with another initial
/// ramdisk when `initrd` is given.
fn start_with(
    topo: &Topology,
    dir: &Path,
    config: Config,
    tuning: Tuning,
    command: &str,
    disks: Option<(&Path, &Path)>,
    initrd: Option<&Path>,
) -> Result<Pair> {
    let initrd_args: Vec<String> =
        initrd.map(|p| vec!["--initrd".to_string(), p.display().to_string()]).unwrap_or_default();
    let key = dir.join("key");
    std::fs::write(&key, "0123456789abcdef0123456789abcdef")?;
    let store = dir.join("store");
    let _ = std::fs::remove_dir_all(&store);
    let tag = match config {
        Config::Unreplicated => "0".to_string(),
        Config::Checkpoint(e) => e.to_string(),
        Config::Lockstep => "lockstep".to_string(),
    };
    let log = dir.join(format!("primary-{tag}.log"));
    let sock = dir.join("primary.sock");
    let backup_sock = dir.join("backup.sock");
    let listen = format!("{}:7000", Topology::BACKUP_REPL_ADDR);
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<String>>();
    let key_s = key.display().to_string();
    let store_s = format!("file:{}", store.display());
    // The backup keeps its default detection timeout unless told (that is the figure to measure).
    let backup = match config.replicated() {
        true => {
            let mut args =
                strings(&["backup", "--listen", &listen, "--key", &key_s, "--store", &store_s, "--net", "tap:tap0"]);
            args.extend(strings(&["--api", &backup_sock.display().to_string()]));
            if let Some(ms) = tuning.failover_timeout_ms {
                args.extend(strings(&["--failover-timeout-ms", &ms.to_string()]));
            }
            if let Some((_, disk)) = disks {
                args.extend(strings(&["--disk", &disk.display().to_string()]));
            }
            args.extend(initrd_args.iter().cloned());
            Some(spawn_in(&topo.backup_ns(), &args, &dir.join(format!("backup-{tag}.log")), "backup")?)
        }
        false => None,
    };
    let mut args = strings(&["run", "--net", "tap:tap0", "--api", &sock.display().to_string()]);
    if config.replicated() {
        args.extend(strings(&["--replicate-to", &listen, "--key", &key_s, "--store", &store_s]));
    }
    match config {
        Config::Unreplicated => {}
        Config::Checkpoint(e) => {
            args.extend(strings(&["--epoch-ms", &e.to_string(), "--verify-every", &tuning.verify_every.to_string()]))
        }
        Config::Lockstep => args.extend(strings(&["--mode", "lockstep"])),
    }
    if let Some((disk, _)) = disks {
        args.extend(strings(&["--disk", &disk.display().to_string()]));
    }
    args.extend(initrd_args);
    args.extend(strings(&["--", "sh", "-c", command]));
    let primary = spawn_in(&topo.primary_ns(), &args, &log, "primary")?;
    Ok(Pair { backup, primary, sock, backup_sock, log })
}

/// One configuration: boot, time the workload, measure latency and the idle link, then
/// (replicated) kill the primary and time the takeover.
fn measure(topo: &Topology, dir: &Path, config: Config, requests: usize, tuning: Tuning) -> Result<Figures> {
    let mut pair = start_with(topo, dir, config, tuning, WORKLOAD, None, None)?;
    let mut figures = run_workload(topo, &mut pair, config, requests).map_err(|e| pair.explain(e))?;
    if config.replicated() {
        figures.idle = Some(idle_link(&pair.sock).map_err(|e| pair.explain(e))?);
        figures.takeover = match kill_and_time(topo, &mut pair) {
            Ok(takeover) => Some(takeover),
            // A lockstep backup that diverged just before the kill refuses to go live (its
            // log says so): that row has no takeover figure, the rest of the bench goes on.
            Err(e) if config == Config::Lockstep => {
                eprintln!("bench: lockstep: no takeover after the kill: {e:#}");
                None
            }
            Err(e) => return Err(e),
        };
    }
    Ok(figures)
}

/// How long the idle link is measured (the guest's counter waits for a request).
const IDLE_WINDOW: Duration = Duration::from_secs(3);
/// Bytes of the frames that carry one lockstep epoch besides its batch (CheckpointBegin,
/// CheckpointChunk and CheckpointEnd: each a 24-byte header, a 16-byte tag and a CRC32C,
/// with 33, 16 and 40 bytes of fields), and of the backup's Ack of it (8 bytes of fields).
const LOCKSTEP_EPOCH_FRAMING_BYTES: u64 = 3 * 44 + 33 + 16 + 40;
const ACK_FRAME_BYTES: u64 = 44 + 8;

/// What the link counters said at one moment.
struct LinkSample {
    at: Instant,
    sent: u64,
    lockstep: Option<vmm::status::Lockstep>,
}

impl LinkSample {
    fn read(sock: &Path) -> Result<LinkSample> {
        let reply = crate::api::request(sock, &crate::api::Command::Status)?;
        let status: vmm::status::Status = serde_json::from_value(reply.body).context("the status does not parse")?;
        let sent = status.replication.map_or(0, |r| r.bytes_sent);
        Ok(LinkSample { at: Instant::now(), sent, lockstep: status.lockstep })
    }

    /// The link from `self` to `later`: what the primary sent, plus (lockstep) the backup's
    /// acknowledgements; lockstep's heartbeats are the rest of what the primary sent, and as
    /// many again from the backup (each side beats when it sent nothing for an interval).
    fn to(&self, later: &LinkSample) -> Link {
        let mbit = |bytes: u64| bytes as f64 * 8.0 / (later.at - self.at).as_secs_f64().max(1e-6) / 1e6;
        let sent = later.sent.saturating_sub(self.sent);
        match (&self.lockstep, &later.lockstep) {
            (Some(a), Some(b)) => {
                let epochs = b.batches.saturating_sub(a.batches);
                let batches = b.batch_bytes.saturating_sub(a.batch_bytes) + epochs * LOCKSTEP_EPOCH_FRAMING_BYTES;
                let heartbeats = sent.saturating_sub(batches);
                Link { mbit_s: mbit(batches + epochs * ACK_FRAME_BYTES), heartbeat_mbit_s: Some(mbit(2 * heartbeats)) }
            }
            _ => Link { mbit_s: mbit(sent), heartbeat_mbit_s: None },
        }
    }
}

/// The link while the guest idles, over [`IDLE_WINDOW`].
fn idle_link(sock: &Path) -> Result<Link> {
    let before = LinkSample::read(sock)?;
    std::thread::sleep(IDLE_WINDOW);
    Ok(before.to(&LinkSample::read(sock)?))
}

/// The workloads' times, the checkpoint figures, the link during the workloads and the latency.
fn run_workload(topo: &Topology, pair: &mut Pair, config: Config, requests: usize) -> Result<Figures> {
    if config.replicated() {
        wait_protected(&pair.sock, &mut pair.primary, Duration::from_secs(300))?;
    }
    wait_quiet(&pair.sock, &mut pair.primary)?;
    in_namespace(&topo.client_ns(), || start_workload(Duration::from_secs(300)))?;
    let limit = Duration::from_secs(300);
    let pid = pair.primary.child.id();
    let start = wait_for_line(&pair.log, "bench: start", limit, &mut pair.primary)?;
    let cpu_start = cpu_s(pid);
    let before = config.replicated().then(|| LinkSample::read(&pair.sock)).transpose()?;
    let heavy = wait_for_line(&pair.log, "bench: heavy", limit, &mut pair.primary)?;
    let cpu_heavy = cpu_s(pid);
    let end = wait_for_line(&pair.log, "bench: end", limit, &mut pair.primary)?;
    let cpu_end = cpu_s(pid);
    let spent = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| b - a);
    let log = std::fs::read_to_string(&pair.log).unwrap_or_default();
    let guest = |needle: &str| guest_uptime_s(&log, needle);
    let guest_or_host = |a: &str, b: &str, host: Duration| spent(guest(a), guest(b)).unwrap_or(host.as_secs_f64());
    let mut figures = Figures {
        light_s: guest_or_host("bench: start", "bench: heavy", heavy - start),
        heavy_s: guest_or_host("bench: heavy", "bench: end", end - heavy),
        light_cpu_s: spent(cpu_start, cpu_heavy),
        heavy_cpu_s: spent(cpu_heavy, cpu_end),
        ..Figures::default()
    };
    if let Some(before) = before {
        let after = LinkSample::read(&pair.sock)?;
        figures.busy = Some(before.to(&after));
        let reply = crate::api::request(&pair.sock, &crate::api::Command::Status)?;
        let status: vmm::status::Status =
            serde_json::from_value(reply.body).context("the primary's status does not parse")?;
        match (status.lockstep, status.replication) {
            (Some(lockstep), _) => {
                let earlier = before.lockstep.as_ref().map_or(0.0, |l| l.throttled_ms);
                figures.throttled_ms = Some(lockstep.throttled_ms - earlier);
            }
            (None, Some(r)) => {
                figures.pause_avg_ms = Some(r.checkpoints.pause_avg_ms);
                figures.pause_max_ms = Some(r.checkpoints.pause_max_ms);
            }
            (None, None) => {}
        }
    }
    figures.latency_ms = in_namespace(&topo.client_ns(), move || latency(requests))?;
    Ok(figures)
}

/// The guest's uptime (s) printed after `needle` in the guest's console log.
fn guest_uptime_s(log: &str, needle: &str) -> Option<f64> {
    let line = log.lines().find(|l| l.starts_with(needle))?;
    line[needle.len()..].trim().parse().ok()
}

/// The CPU time process `pid` has used (user and system, all threads), in s.
fn cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command's closing parenthesis, from the state (field 3) on.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    // In USER_HZ units: 100 per second on Linux (the ABI of /proc, whatever the kernel's HZ).
    Some((ticks(11)? + ticks(12)?) as f64 / 100.0)
}

/// A guest at rest executes fewer instructions than this per [`QUIET_EVERY`], [`QUIET_TIMES`]
/// times in a row...
const QUIET_ICOUNT: u64 = 2_000_000;
const QUIET_EVERY: Duration = Duration::from_millis(250);
const QUIET_TIMES: usize = 4;
/// ...and one still busy after this long is timed anyway.
const QUIET_LIMIT: Duration = Duration::from_secs(60);

/// Wait until the guest is at rest before its workloads: a replicated run waits for its
/// protection, which takes long enough for the guest's own after-boot work to end, and an
/// unreplicated one must start from the same rest (else that work is timed with the loop).
fn wait_quiet(sock: &Path, primary: &mut Proc) -> Result<()> {
    let icount = || -> Result<u64> {
        let reply = crate::api::request(sock, &crate::api::Command::Status)?;
        Ok(serde_json::from_value::<vmm::status::Status>(reply.body).context("the status does not parse")?.icount)
    };
    let deadline = Instant::now() + QUIET_LIMIT;
    let (mut last, mut quiet) = (None, 0);
    while Instant::now() < deadline {
        if let Some(status) = primary.child.try_wait()? {
            bail!("the primary exited ({status}) before its workloads");
        }
        let now = icount().ok();
        match (last, now) {
            (Some(a), Some(b)) if b.saturating_sub(a) < QUIET_ICOUNT => quiet += 1,
            _ => quiet = 0,
        }
        if quiet >= QUIET_TIMES {
            return Ok(());
        }
        last = now;
        std::thread::sleep(QUIET_EVERY);
    }
    eprintln!("bench: the guest was still busy after {} s; timing it anyway", QUIET_LIMIT.as_secs());
    Ok(())
}

/// A round that only kills: boot the counter replicated, wait until it is protected, kill.
fn kill_once(topo: &Topology, dir: &Path, epoch_ms: u64) -> Result<Takeover> {
    let mut pair = start_pair(topo, dir, Some(epoch_ms), 0, "exec /usr/share/ftvm/counter-httpd", None)?;
    in_namespace(&topo.client_ns(), || first_answer(Duration::from_secs(300)).map(|_| ()))
        .map_err(|e| pair.explain(e))?;
    kill_and_time(topo, &mut pair)
}

/// Wait until the primary is protected, SIGKILL it, and time the backup's takeover.
fn kill_and_time(topo: &Topology, pair: &mut Pair) -> Result<Takeover> {
    wait_protected(&pair.sock, &mut pair.primary, Duration::from_secs(60)).map_err(|e| pair.explain(e))?;
    // The probe's thread is in the client's namespace before the kill; it starts at once.
    let (killed_tx, killed_rx) = mpsc::channel();
    let probe = in_namespace_spawn(&topo.client_ns(), move || {
        let killed: Instant = killed_rx.recv().context("the kill never came")?;
        probe(killed, Duration::from_secs(30))
    })?;
    let _ = pair.primary.child.kill();
    let killed = Instant::now();
    let _ = pair.primary.child.wait();
    killed_tx.send(killed).context("the probe thread ended early")?;
    let takeover = probe.join().map_err(|_| anyhow::anyhow!("the probe thread panicked"))??;
    if let Some(backup) = &mut pair.backup {
        let _ = backup.child.kill();
        let _ = backup.child.wait();
    }
    Ok(takeover)
}

/// Wait until the primary reports that its backup holds everything it released.
fn wait_protected(sock: &Path, primary: &mut Proc, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(reply) = crate::api::request(sock, &crate::api::Command::Status) {
            let status = serde_json::from_value::<vmm::status::Status>(reply.body).ok();
            if status.and_then(|s| s.replication).is_some_and(|r| r.protected) {
                return Ok(());
            }
        }
        if let Some(status) = primary.child.try_wait()? {
            bail!("the primary exited ({status}) before its backup protected it");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("the primary was not protected by its backup within {} s", limit.as_secs())
}

/// From `killed` on, a new connection every [`PROBE_EVERY`], each abandoned when not
/// accepted within [`PROBE_ABANDON`]; the first accepted and the first answered.
pub(crate) fn probe(killed: Instant, limit: Duration) -> Result<Takeover> {
    let addr: SocketAddr = HTTP_ADDR.parse().expect("valid");
    let (tx, rx) = mpsc::channel::<(Instant, bool)>();
    let mut accepted: Option<Instant> = None;
    let mut next = Instant::now();
    while killed.elapsed() < limit {
        if Instant::now() >= next {
            next += PROBE_EVERY;
            let tx = tx.clone();
            std::thread::spawn(move || probe_once(addr, &tx));
        }
        while let Ok((at, answered)) = rx.try_recv() {
            if at <= killed {
                continue; // the old primary's answer, in flight at the kill
            }
            let accepted_at = *accepted.get_or_insert(at);
            if answered {
                let ms = |t: Instant| (t - killed).as_secs_f64() * 1e3;
                return Ok(Takeover { accepted_ms: ms(accepted_at), answered_ms: ms(at) });
            }
        }
        std::thread::sleep(next.saturating_duration_since(Instant::now()).min(Duration::from_millis(2)));
    }
    bail!("the backup's guest did not answer within {} s of the kill", limit.as_secs())
}

/// One probe: report when the guest accepted the connection, then when it answered.
fn probe_once(addr: SocketAddr, tx: &mpsc::Sender<(Instant, bool)>) {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, PROBE_ABANDON) else { return };
    let _ = tx.send((Instant::now(), false));
    let _ = stream.set_read_timeout(Some(PROBE_ANSWER));
    let _ = stream.set_write_timeout(Some(PROBE_ANSWER));
    if stream.write_all(b"GET /cgi-bin/peek HTTP/1.0\r\nHost: guest\r\n\r\n").is_err() {
        return;
    }
    let mut response = Vec::new();
    if stream.take(4096).read_to_end(&mut response).is_ok() && response.starts_with(b"HTTP/1.") {
        let _ = tx.send((Instant::now(), true));
    }
}

fn print_takeover(kills: &[Takeover], failover_timeout_ms: Option<u64>) {
    if kills.is_empty() {
        return;
    }
    let spread = |f: &dyn Fn(&Takeover) -> f64| {
        let mut v: Vec<f64> = kills.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        format!("min {:6.0}  median {:6.0}  max {:6.0}", v[0], v[v.len() / 2], v[v.len() - 1])
    };
    println!();
    println!(
        "takeover over {} kills (SIGKILL -> the backup's guest; a new connection every {} ms, abandoned after {} ms unaccepted; detection timeout {}):",
        kills.len(),
        PROBE_EVERY.as_millis(),
        PROBE_ABANDON.as_millis(),
        failover_timeout_ms.map_or("the backup's default".to_string(), |ms| format!("{ms} ms")),
    );
    println!("  first connection accepted  ms: {}", spread(&|t| t.accepted_ms));
    println!("  first request answered     ms: {}", spread(&|t| t.answered_ms));
}

/// Wait until `needle` appears in the log; the moment it was seen.
fn wait_for_line(log: &Path, needle: &str, limit: Duration, primary: &mut Proc) -> Result<Instant> {
    let deadline = Instant::now() + limit;
    loop {
        if std::fs::read_to_string(log).unwrap_or_default().contains(needle) {
            return Ok(Instant::now());
        }
        if let Some(status) = primary.child.try_wait()? {
            bail!("the primary exited ({status}) before printing {needle:?}; see {}", log.display());
        }
        if Instant::now() > deadline {
            bail!("no {needle:?} in {} after {} s", log.display(), limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Run `f` on a thread inside namespace `ns` (setns changes only that thread).
fn in_namespace<T: Send + 'static>(ns: &str, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    in_namespace_spawn(ns, f)?.join().map_err(|_| anyhow::anyhow!("the client thread panicked"))?
}

/// Start `f` on a thread inside namespace `ns`; join it for the result.
pub(crate) fn in_namespace_spawn<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<std::thread::JoinHandle<Result<T>>> {
    let netns =
        std::fs::File::open(format!("/var/run/netns/{ns}")).with_context(|| format!("cannot open namespace {ns}"))?;
    Ok(std::thread::spawn(move || -> Result<T> {
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).context("cannot enter the client namespace")?;
        f()
    }))
}

/// Median latency of `n` sequential requests, in ms (after the service answers once).
fn latency(n: usize) -> Result<f64> {
    let addr: SocketAddr = HTTP_ADDR.parse().expect("valid");
    first_answer(Duration::from_secs(120))?;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        count_once(addr, Duration::from_secs(10))?;
        samples.push(t.elapsed().as_secs_f64() * 1e3);
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[samples.len() / 2])
}

/// Tell the guest to start the workload: a connection to its port 9, closed at once.
fn start_workload(limit: Duration) -> Result<()> {
    let addr: SocketAddr = "10.0.2.15:9".parse().expect("valid");
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("the guest did not listen on port 9 within {} s", limit.as_secs())
}

/// Wait for the counter to answer; when it did.
fn first_answer(limit: Duration) -> Result<Instant> {
    let addr: SocketAddr = HTTP_ADDR.parse().expect("valid");
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if count_once(addr, Duration::from_secs(2)).is_ok() {
            return Ok(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("the guest's counter did not answer within {} s", limit.as_secs())
}

/// Normalized performance by the primary's CPU time, light / heavy.
fn cpu_norm(base: &Figures, f: &Figures) -> String {
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "-".to_string(),
    };
    format!("{}/{}", ratio(base.light_cpu_s, f.light_cpu_s), ratio(base.heavy_cpu_s, f.heavy_cpu_s))
}

fn print_table(rows: &[(String, Figures)]) {
    let base = &rows[0].1;
    let opt = |v: Option<f64>, prec: usize| v.map_or("-".to_string(), |v| format!("{v:.prec$}"));
    let header = [
        ["config", "light", "normalized", "heavy", "normalized", "cpu-norm", "pause_avg", "pause_max"],
        ["", "s", "perf", "s", "perf", "lt / hv", "ms", "ms"],
    ];
    let header2 = [
        ["link busy", "heartbeat", "link idle", "heartbeat", "latency", "added", "takeover", "throttled"],
        ["Mbit/s", "Mbit/s", "Mbit/s", "Mbit/s", "ms (p50)", "ms", "ms", "ms"],
    ];
    for (h, h2) in header.iter().zip(&header2) {
        println!(
            "{:<14} {:>7} {:>10} {:>7} {:>10} {:>11} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>8} {:>9}",
            h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], h2[0], h2[1], h2[2], h2[3], h2[4], h2[5], h2[6], h2[7]
        );
    }
    for (name, f) in rows {
        println!(
            "{:<14} {:>7.2} {:>10.2} {:>7.2} {:>10.2} {:>11} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9.1} {:>7.1} {:>8} {:>9}",
            name,
            f.light_s,
            base.light_s / f.light_s,
            f.heavy_s,
            base.heavy_s / f.heavy_s,
            cpu_norm(base, f),
            opt(f.pause_avg_ms, 3),
            opt(f.pause_max_ms, 1),
            opt(f.busy.map(|l| l.mbit_s), 3),
            opt(f.busy.and_then(|l| l.heartbeat_mbit_s), 3),
            opt(f.idle.map(|l| l.mbit_s), 3),
            opt(f.idle.and_then(|l| l.heartbeat_mbit_s), 3),
            f.latency_ms,
            f.latency_ms - base.latency_ms,
            opt(f.takeover.map(|t| t.answered_ms), 0),
            opt(f.throttled_ms, 0),
        );
    }
    println!(
        "light: a shell loop; heavy: 32 MiB written to tmpfs and read back; normalized perf: unreplicated time / \
         this time (cpu-norm: by the primary process's CPU time, light/heavy). link: what replication sent during the workloads (busy) and with the guest idle; checkpoint: \
         all the primary sent, heartbeats included; lockstep: batches, their framing and acknowledgements, \
         heartbeats of both sides apart. latency: the counter's HTTP request, p50. takeover: SIGKILL to the \
         first answer. throttled: lockstep's pauses for a lagging backup during the workloads."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_phase_is_timed_by_the_uptime_the_guest_printed() {
        let log = "ftvm: userspace up\nbench: start 12.50\nbench: heavy 14.75\nbench: end x\n";
        assert_eq!(guest_uptime_s(log, "bench: start"), Some(12.5));
        assert_eq!(guest_uptime_s(log, "bench: heavy"), Some(14.75));
        assert_eq!(guest_uptime_s(log, "bench: end"), None, "not a number");
        assert_eq!(guest_uptime_s(log, "bench: gone"), None);
    }
}
