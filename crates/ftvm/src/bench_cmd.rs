//! `ftvm bench replication`: the figures of merit of hypervisor-based fault tolerance,
//! side by side in one run — a guest workload's time unreplicated and replicated at
//! several epoch lengths (normalized performance), checkpoint pause times, bytes per
//! second on the replication link, the response latency output commit adds, and the
//! failover time from SIGKILL to the first answered request.

use crate::demo::{count_once, spawn_in, Proc, HTTP_ADDR};
use crate::netns::Topology;
use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A guest workload: CPU work and memory writes (what checkpoints must carry), then the
/// counter service for the latency and failover measurements.
const WORKLOAD: &str = "echo bench: start; i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; \
    dd if=/dev/zero of=/tmp/w bs=64k count=256 2>/dev/null; md5sum /tmp/w >/dev/null; rm /tmp/w; \
    echo bench: end; exec /usr/share/ftvm/counter-httpd";

#[derive(clap::Subcommand, Debug)]
pub enum BenchKind {
    /// Replication overhead, latency and failover time (root: network namespaces)
    Replication(ReplicationBench),
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
    /// noisy); the table shows medians
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Pass --verify-every N to the primaries (end-to-end digest checks; costs pauses)
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub verify_every: u64,
    /// Keep the replicas' logs here [default: a temporary directory]
    #[arg(long, value_name = "DIR")]
    pub logs: Option<PathBuf>,
}

#[derive(Debug, Default)]
struct Figures {
    workload_s: f64,
    pause_avg_ms: Option<f64>,
    pause_max_ms: Option<f64>,
    link_mb_s: Option<f64>,
    latency_ms: f64,
    failover_s: Option<f64>,
}

pub fn run(kind: BenchKind) -> Result<i32> {
    let BenchKind::Replication(args) = kind;
    crate::netns::require_root()?;
    crate::guest_image::ensure()?;
    let dir =
        args.logs.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("ftvm-bench-{}", std::process::id())));
    std::fs::create_dir_all(&dir)?;
    let topo = Topology::create(&format!("ftvm-bench-{}", std::process::id()))?;
    let configs: Vec<Option<u64>> = std::iter::once(None).chain(args.epochs.iter().copied().map(Some)).collect();
    let mut samples: Vec<Vec<Figures>> = configs.iter().map(|_| Vec::new()).collect();
    for round in 1..=args.runs.max(1) {
        for (i, &config) in configs.iter().enumerate() {
            eprintln!("bench: round {round}/{}: {}", args.runs.max(1), label(config));
            samples[i].push(measure(&topo, &dir, config, args.requests, args.verify_every)?);
        }
    }
    let rows: Vec<(String, Figures)> = configs.iter().zip(samples).map(|(&c, s)| (label(c), median(s))).collect();
    print_table(&rows);
    drop(topo);
    if args.logs.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(0)
}

fn label(config: Option<u64>) -> String {
    config.map_or("unreplicated".into(), |e| format!("epoch {e} ms"))
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
    Figures {
        workload_s: mid(samples.iter().map(|f| f.workload_s).collect()),
        pause_avg_ms: opt(&|f| f.pause_avg_ms),
        pause_max_ms: opt(&|f| f.pause_max_ms),
        link_mb_s: opt(&|f| f.link_mb_s),
        latency_ms: mid(samples.iter().map(|f| f.latency_ms).collect()),
        failover_s: opt(&|f| f.failover_s),
    }
}

/// One configuration: boot, time the workload, measure latency, then (replicated) kill
/// the primary and time the takeover.
fn measure(topo: &Topology, dir: &Path, epoch_ms: Option<u64>, requests: usize, verify_every: u64) -> Result<Figures> {
    let key = dir.join("key");
    std::fs::write(&key, "0123456789abcdef0123456789abcdef")?;
    let store = dir.join("store");
    let _ = std::fs::remove_dir_all(&store);
    let log = dir.join(format!("primary-{}.log", epoch_ms.unwrap_or(0)));
    let sock = dir.join("primary.sock");
    let listen = format!("{}:7000", Topology::BACKUP_REPL_ADDR);
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<String>>();
    let key_s = key.display().to_string();
    let store_s = format!("file:{}", store.display());
    let backup = match epoch_ms {
        Some(_) => {
            let args =
                strings(&["backup", "--listen", &listen, "--key", &key_s, "--store", &store_s, "--net", "tap:tap0"]);
            Some(spawn_in(
                &topo.backup_ns(),
                &args,
                &dir.join(format!("backup-{}.log", epoch_ms.unwrap_or(0))),
                "backup",
            )?)
        }
        None => None,
    };
    let mut args = strings(&["run", "--net", "tap:tap0", "--api", &sock.display().to_string()]);
    if let Some(e) = epoch_ms {
        args.extend(strings(&[
            "--replicate-to",
            &listen,
            "--key",
            &key_s,
            "--store",
            &store_s,
            "--epoch-ms",
            &e.to_string(),
        ]));
        args.extend(strings(&["--verify-every", &verify_every.to_string()]));
    }
    args.extend(strings(&["--", "sh", "-c", WORKLOAD]));
    let mut primary = spawn_in(&topo.primary_ns(), &args, &log, "primary")?;
    let start = wait_for_line(&log, "bench: start", Duration::from_secs(300), &mut primary)?;
    let end = wait_for_line(&log, "bench: end", Duration::from_secs(300), &mut primary)?;
    let mut figures = Figures { workload_s: (end - start).as_secs_f64(), ..Figures::default() };
    if epoch_ms.is_some() {
        let status = crate::api::request(&sock, &crate::api::Command::Status)?.body;
        let c = &status["replication"]["checkpoints"];
        figures.pause_avg_ms = c["pause_avg_ms"].as_f64();
        figures.pause_max_ms = c["pause_max_ms"].as_f64();
        figures.link_mb_s = c["bytes_per_s"].as_f64().map(|b| b / 1e6);
    }
    figures.latency_ms = in_namespace(&topo.client_ns(), move || latency(requests))?;
    if epoch_ms.is_some() {
        let _ = primary.child.kill();
        let _ = primary.child.wait();
        let killed = Instant::now();
        let answered = in_namespace(&topo.client_ns(), move || first_answer(Duration::from_secs(60)))?;
        figures.failover_s = Some((answered - killed).as_secs_f64());
    }
    drop(backup);
    drop(primary);
    Ok(figures)
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
    let netns =
        std::fs::File::open(format!("/var/run/netns/{ns}")).with_context(|| format!("cannot open namespace {ns}"))?;
    let handle = std::thread::spawn(move || -> Result<T> {
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).context("cannot enter the client namespace")?;
        f()
    });
    handle.join().map_err(|_| anyhow::anyhow!("the client thread panicked"))?
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

fn print_table(rows: &[(String, Figures)]) {
    let base = &rows[0].1;
    let opt = |v: Option<f64>, prec: usize| v.map_or("-".to_string(), |v| format!("{v:.prec$}"));
    println!(
        "{:<14} {:>10} {:>10} {:>11} {:>11} {:>9} {:>11} {:>9} {:>10}",
        "config", "workload_s", "normalized", "pause_avg", "pause_max", "link", "latency", "added", "failover"
    );
    println!(
        "{:<14} {:>10} {:>10} {:>11} {:>11} {:>9} {:>11} {:>9} {:>10}",
        "", "", "perf", "ms", "ms", "MB/s", "ms (p50)", "ms", "s"
    );
    for (name, f) in rows {
        println!(
            "{:<14} {:>10.2} {:>10.2} {:>11} {:>11} {:>9} {:>11.1} {:>9.1} {:>10}",
            name,
            f.workload_s,
            base.workload_s / f.workload_s,
            opt(f.pause_avg_ms, 3),
            opt(f.pause_max_ms, 1),
            opt(f.link_mb_s, 1),
            f.latency_ms,
            f.latency_ms - base.latency_ms,
            opt(f.failover_s, 2)
        );
    }
}
