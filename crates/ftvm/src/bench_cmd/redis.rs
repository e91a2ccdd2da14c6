//! `ftvm bench replication`'s real service: Debian's redis-server in the guest (the Debian
//! test image, guest/debian-test/out/redis-initrd.cpio.gz), driven from the client's
//! namespace by the host's redis-benchmark, unreplicated, with checkpoints every 25 ms and
//! in lockstep. Two loads, as issue 10 names them: `-t set,get,incr -n 2000 -c 4` (the
//! request rate) and `-t incr -n 500 -c 1` (one client: its rate and its latency, p50 and
//! p99, which is what output commit adds to). The rates are also given relative to the
//! unreplicated run of the same round.

use super::{start_with, wait_protected, Config, Pair, Tuning};
use crate::netns::Topology;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The guest's address (guest/init) and its redis-server: no persistence (the VM's memory
/// is the state replication keeps), reachable from the client's namespace.
const GUEST: &str = "10.0.2.15";
const SERVER: &str = "exec redis-server --save '' --appendonly no --protected-mode no";
/// Booting the larger image, and redis-benchmark's own run, each within this.
const LIMIT: Duration = Duration::from_secs(300);

/// One configuration's figures.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct RedisFigures {
    set_rps: f64,
    get_rps: f64,
    incr_rps: f64,
    /// `-t incr -n 500 -c 1`.
    incr1_rps: f64,
    incr1_p50_ms: f64,
    incr1_p99_ms: f64,
}

/// The redis image, if it was built (`bash guest/build-debian-test.sh`).
pub(super) fn image() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    // target/release/ftvm → the checkout's guest/debian-test/out.
    let root = exe.ancestors().nth(3)?;
    let image = root.join("guest/debian-test/out/redis-initrd.cpio.gz");
    image.exists().then_some(image)
}

/// Boot redis-server under `config`, wait for its PONG (and for protection), and run both
/// loads against it.
pub(super) fn measure(
    topo: &Topology,
    dir: &Path,
    config: Config,
    tuning: Tuning,
    initrd: &Path,
) -> Result<RedisFigures> {
    let mut pair: Pair = start_with(topo, dir, config, tuning, SERVER, None, Some(initrd))?;
    let ns = topo.client_ns();
    let deadline = Instant::now() + LIMIT;
    while cli(&ns, &["PING"]).as_deref() != Some("PONG") {
        if let Some(status) = pair.primary.child.try_wait()? {
            let error = anyhow::anyhow!("the primary exited ({status}) before redis-server answered PING");
            return Err(pair.explain(error.context(format!("log: {}", pair.log.display()))));
        }
        if Instant::now() >= deadline {
            bail!("redis-server did not answer PING within {} s (log: {})", LIMIT.as_secs(), pair.log.display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if config.replicated() {
        wait_protected(&pair.sock, &mut pair.primary, Duration::from_secs(120)).map_err(|e| pair.explain(e))?;
    }
    let many = benchmark(&ns, &["-t", "set,get,incr", "-n", "2000", "-c", "4"]).map_err(|e| pair.explain(e))?;
    let one = benchmark(&ns, &["-t", "incr", "-n", "500", "-c", "1"]).map_err(|e| pair.explain(e))?;
    let rate = |rows: &[Row], test: &str| rows.iter().find(|r| r.test == test).map(|r| r.rps);
    let incr1 = one.iter().find(|r| r.test == "INCR").context("redis-benchmark gave no INCR row")?;
    Ok(RedisFigures {
        set_rps: rate(&many, "SET").context("redis-benchmark gave no SET row")?,
        get_rps: rate(&many, "GET").context("redis-benchmark gave no GET row")?,
        incr_rps: rate(&many, "INCR").context("redis-benchmark gave no INCR row")?,
        incr1_rps: incr1.rps,
        incr1_p50_ms: incr1.p50_ms,
        incr1_p99_ms: incr1.p99_ms,
    })
}

/// `redis-cli -h GUEST ARGS` in `ns`; its output if it succeeded.
fn cli(ns: &str, args: &[&str]) -> Option<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "redis-cli", "-h", GUEST])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// One row of `redis-benchmark --csv`.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    test: String,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Run redis-benchmark with `args` in `ns` (bounded by [`LIMIT`]) and read its CSV.
fn benchmark(ns: &str, args: &[&str]) -> Result<Vec<Row>> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "redis-benchmark", "-h", GUEST, "--csv"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot run redis-benchmark (install redis-tools)")?;
    let deadline = Instant::now() + LIMIT;
    while child.try_wait()?.is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("redis-benchmark {} did not finish within {} s", args.join(" "), LIMIT.as_secs());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("redis-benchmark {} failed ({})", args.join(" "), out.status);
    }
    parse_csv(&String::from_utf8_lossy(&out.stdout))
}

/// redis-benchmark 7's CSV: a header naming the columns, then one quoted row per test.
fn parse_csv(text: &str) -> Result<Vec<Row>> {
    let fields = |line: &str| line.split(',').map(|f| f.trim().trim_matches('"').to_string()).collect::<Vec<_>>();
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header = fields(lines.next().context("redis-benchmark printed nothing")?);
    let column = |name: &str| header.iter().position(|h| h == name).with_context(|| format!("no {name} column"));
    let (test, rps, p50, p99) = (column("test")?, column("rps")?, column("p50_latency_ms")?, column("p99_latency_ms")?);
    lines
        .map(|line| {
            let f = fields(line);
            let number = |i: usize| -> Result<f64> {
                f.get(i).and_then(|v| v.parse().ok()).with_context(|| format!("a malformed row: {line}"))
            };
            let name = f.get(test).with_context(|| format!("a malformed row: {line}"))?.clone();
            Ok(Row { test: name, rps: number(rps)?, p50_ms: number(p50)?, p99_ms: number(p99)? })
        })
        .collect()
}

/// The table: each configuration's median over the rounds (rates also relative to the
/// unreplicated median).
pub(super) fn print(rows: &[(String, Vec<RedisFigures>)], load: (f64, f64)) {
    let rows: Vec<(&String, RedisFigures)> =
        rows.iter().filter(|(_, s)| !s.is_empty()).map(|(name, s)| (name, median(s))).collect();
    let Some(base) = rows.first().map(|(_, f)| *f) else { return };
    println!();
    println!(
        "redis-server in the guest, redis-benchmark from the client's namespace (load average {:.1} at the start, \
         {:.1} at the end):",
        load.0, load.1
    );
    println!(
        "{:<14} {:>9} {:>9} {:>9} {:>10} | {:>12} {:>10} {:>8} {:>8}",
        "config", "SET", "GET", "INCR", "normalized", "INCR -c 1", "normalized", "p50", "p99"
    );
    println!(
        "{:<14} {:>9} {:>9} {:>9} {:>10} | {:>12} {:>10} {:>8} {:>8}",
        "", "req/s", "req/s", "req/s", "", "req/s", "", "ms", "ms"
    );
    for (name, f) in &rows {
        let all = (f.set_rps + f.get_rps + f.incr_rps) / (base.set_rps + base.get_rps + base.incr_rps);
        println!(
            "{:<14} {:>9.0} {:>9.0} {:>9.0} {:>10.2} | {:>12.0} {:>10.2} {:>8.2} {:>8.2}",
            name,
            f.set_rps,
            f.get_rps,
            f.incr_rps,
            all,
            f.incr1_rps,
            f.incr1_rps / base.incr1_rps,
            f.incr1_p50_ms,
            f.incr1_p99_ms
        );
    }
    println!(
        "loads: redis-benchmark -t set,get,incr -n 2000 -c 4 (normalized: the three rates' sum against \
         unreplicated), and -t incr -n 500 -c 1 (its rate and latency percentiles)"
    );
}

fn median(samples: &[RedisFigures]) -> RedisFigures {
    let mid = |f: &dyn Fn(&RedisFigures) -> f64| {
        let mut v: Vec<f64> = samples.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    RedisFigures {
        set_rps: mid(&|f| f.set_rps),
        get_rps: mid(&|f| f.get_rps),
        incr_rps: mid(&|f| f.incr_rps),
        incr1_rps: mid(&|f| f.incr1_rps),
        incr1_p50_ms: mid(&|f| f.incr1_p50_ms),
        incr1_p99_ms: mid(&|f| f.incr1_p99_ms),
    }
}

/// The host's load average over the last minute.
pub(super) fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_benchmarks_csv_is_read_by_its_header() {
        let csv = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\
                   \"p99_latency_ms\",\"max_latency_ms\"\n\"INCR\",\"1234.57\",\"0.8\",\"0.3\",\"0.703\",\"1.1\",\
                   \"1.423\",\"9.0\"\n";
        let rows = parse_csv(csv).unwrap();
        assert_eq!(rows, vec![Row { test: "INCR".into(), rps: 1234.57, p50_ms: 0.703, p99_ms: 1.423 }]);
        assert_eq!(
            parse_csv("\"test\",\"rps\"\n").unwrap_err().to_string(),
            "no p50_latency_ms column",
            "a redis-benchmark without percentiles is named"
        );
        assert!(
            parse_csv("\"test\",\"rps\",\"p50_latency_ms\",\"p99_latency_ms\"\n\"SET\",\"x\",\"1\",\"2\"\n").is_err()
        );
    }
}
