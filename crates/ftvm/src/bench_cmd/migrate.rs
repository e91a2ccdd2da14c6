//! `ftvm bench migrate`: live migrations of the default guest under load, on this host
//! (loopback, no root): the VM boots once, then is migrated back and forth between two
//! ports, each time to a fresh `ftvm backup --listen`. Per migration: the total time (from
//! `ctl migrate` to the handover), the bytes sent, the checkpoints sent, the guest's pause
//! as the source saw it, and the downtime — from the guest's pause on the source to it
//! running on the destination — which the destination reports (both processes share this
//! host's clock, so the figure is exact), broken down by phase: the final checkpoint's copy
//! (taken, sent, applied), the ownership record's swap (what of it the copy did not hide),
//! the `SwitchedOver`/`HandedOver` round trip, and the destination's start.
//!
//! The load: the guest writes 4 MiB of files and deletes them, over and over, so every
//! pre-copy round and the final stop-and-copy carry dirty pages.

use crate::api::{self, Command, MigrateRequest};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use vmm::status::{DowntimePhases, Status};

const WORKLOAD: &str = "while true; do dd if=/dev/zero of=/tmp/w bs=64k count=64 2>/dev/null; rm /tmp/w; done";
const BASE_PORT: u16 = 7740;
const BOOT_LIMIT: Duration = Duration::from_secs(300);
/// The destinations' detection timeout: not the figure measured here.
const FAILOVER_TIMEOUT_MS: u64 = 500;

#[derive(clap::Args, Debug)]
pub struct MigrateBench {
    /// Migrations to time
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Checkpoint interval of the pre-copy
    #[arg(long, value_name = "MS", default_value_t = 25)]
    pub epoch_ms: u64,
    /// The ownership store's directory (its compare-and-swap fsyncs twice: on tmpfs the
    /// figure leaves the disk out) [default: in the logs' directory]
    #[arg(long, value_name = "DIR")]
    pub store_dir: Option<PathBuf>,
    /// Keep the processes' logs here [default: a temporary directory]
    #[arg(long, value_name = "DIR")]
    pub logs: Option<PathBuf>,
}

/// One migration's figures.
#[derive(Debug, Clone, Copy)]
struct Round {
    total_ms: f64,
    bytes: u64,
    checkpoints: u64,
    source_paused_ms: f64,
    downtime_ms: f64,
    /// The final checkpoint's size.
    final_bytes: u64,
    phases: Option<DowntimePhases>,
}

/// An ftvm process, killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(dir: &Path, name: &str, args: &[String]) -> Result<Proc> {
    let exe = std::env::current_exe().context("cannot find the ftvm binary")?;
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let child = std::process::Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("cannot start ftvm")?;
    Ok(Proc(child))
}

fn status(api: &Path) -> Option<Status> {
    let reply = api::request(api, &Command::Status).ok()?;
    serde_json::from_value(reply.body).ok()
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !ok() {
        if Instant::now() > deadline {
            bail!("{what}: not within {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

pub fn run(args: MigrateBench) -> Result<i32> {
    crate::guest_image::ensure()?;
    let dir = args
        .logs
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("ftvm-bench-migrate-{}", std::process::id())));
    std::fs::create_dir_all(&dir)?;
    let key = dir.join("key");
    std::fs::write(&key, "00112233445566778899aabbccddeeff")?;
    let store_dir = args.store_dir.clone().unwrap_or_else(|| dir.join("store"));
    let _ = std::fs::remove_file(store_dir.join("bench.json")); // a record of an earlier run
    let store = format!("file:{}", store_dir.display());
    let ownership = |v: &mut Vec<String>| v.extend(["--store".into(), store.clone(), "--vm-id".into(), "bench".into()]);
    let api_of = |n: usize| dir.join(format!("vm-{n}.sock"));
    let mut run_args: Vec<String> = vec!["run".into(), "--api".into(), api_of(0).display().to_string()];
    ownership(&mut run_args);
    run_args.extend(["--".into(), "sh".into(), "-c".into(), WORKLOAD.into()]);
    let mut vm = spawn(&dir, "vm-0", &run_args)?;
    eprintln!("bench: booting the default guest");
    wait_for("the guest running", BOOT_LIMIT, || status(&api_of(0)).is_some_and(|s| s.icount > 500_000_000))?;
    let mut rounds = Vec::new();
    for n in 1..=args.runs {
        let port = BASE_PORT + (n % 2) as u16;
        let mut backup_args: Vec<String> = vec!["backup".into(), "--listen".into(), format!("127.0.0.1:{port}")];
        // A loaded host must not make the destination take over during the pre-copy.
        backup_args.extend(["--failover-timeout-ms".into(), FAILOVER_TIMEOUT_MS.to_string()]);
        backup_args.extend(["--key".into(), key.display().to_string(), "--api".into()]);
        backup_args.push(api_of(n).display().to_string());
        ownership(&mut backup_args);
        let destination = spawn(&dir, &format!("vm-{n}"), &backup_args)?;
        wait_for("the destination listening", Duration::from_secs(30), || status(&api_of(n)).is_some())?;
        let request = MigrateRequest { to: format!("127.0.0.1:{port}"), key: key.clone(), epoch_ms: args.epoch_ms };
        let reply = api::request(&api_of(n - 1), &Command::Migrate(request))?;
        if reply.status != 200 {
            bail!("migration {n} failed: {} (logs in {})", reply.body, dir.display());
        }
        let figures = &reply.body["migration"];
        let mut arrival = None;
        wait_for("the destination live", Duration::from_secs(30), || {
            arrival = status(&api_of(n)).and_then(|s| s.took_over).and_then(|t| t.migration);
            arrival.is_some()
        })?;
        let round = Round {
            total_ms: figures["total_ms"].as_f64().unwrap_or(0.0),
            bytes: figures["bytes_sent"].as_u64().unwrap_or(0),
            checkpoints: figures["checkpoints"].as_u64().unwrap_or(0),
            source_paused_ms: figures["paused_ms"].as_f64().unwrap_or(0.0),
            downtime_ms: arrival.as_ref().map_or(0.0, |a| a.downtime_ms),
            final_bytes: figures["final_bytes"].as_u64().unwrap_or(0),
            phases: arrival.as_ref().and_then(|a| a.phases),
        };
        eprintln!(
            "bench: migration {n}: total {:.0} ms, {:.1} MiB, {} checkpoints, downtime {:.2} ms",
            round.total_ms,
            round.bytes as f64 / (1 << 20) as f64,
            round.checkpoints,
            round.downtime_ms
        );
        rounds.push(round);
        let _ = vm.0.wait(); // the source exits once it handed the VM over
        vm = destination;
    }
    print(&rounds, args.epoch_ms);
    drop(vm);
    if args.logs.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(0)
}

fn print(rounds: &[Round], epoch_ms: u64) {
    println!("live migration of the default guest under load (loopback, pre-copy epochs of {epoch_ms} ms):");
    println!(
        "{:>4} {:>10} {:>10} {:>12} {:>10} {:>16} {:>12}",
        "run", "total ms", "MiB sent", "checkpoints", "final KiB", "source paused ms", "downtime ms"
    );
    for (i, r) in rounds.iter().enumerate() {
        println!(
            "{:>4} {:>10.0} {:>10.1} {:>12} {:>10.0} {:>16.2} {:>12.2}",
            i + 1,
            r.total_ms,
            r.bytes as f64 / (1 << 20) as f64,
            r.checkpoints,
            r.final_bytes as f64 / 1024.0,
            r.source_paused_ms,
            r.downtime_ms
        );
    }
    println!(
        "where the downtime went (ms; the first four add up to it; swap, sync and transfer are parts measured alone):"
    );
    println!(
        "{:>4} {:>11} {:>8} {:>9} {:>7} {:>7} {:>7} {:>9}",
        "run", "final copy", "record", "handover", "start", "swap", "sync", "transfer"
    );
    for (i, r) in rounds.iter().enumerate() {
        let Some(p) = r.phases else { continue };
        println!(
            "{:>4} {:>11.2} {:>8.2} {:>9.2} {:>7.2} {:>7.2} {:>7.2} {:>9.2}",
            i + 1,
            p.final_copy_ms,
            p.record_ms,
            p.handover_ms,
            p.start_ms,
            p.swap_ms,
            p.sync_ms,
            p.transfer_ms
        );
    }
    let median = |f: fn(&DowntimePhases) -> f64| {
        let mut v: Vec<f64> = rounds.iter().filter_map(|r| r.phases.as_ref().map(f)).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    println!(
        "median {:>11.2} {:>8.2} {:>9.2} {:>7.2} {:>7.2} {:>7.2} {:>9.2}",
        median(|p| p.final_copy_ms),
        median(|p| p.record_ms),
        median(|p| p.handover_ms),
        median(|p| p.start_ms),
        median(|p| p.swap_ms),
        median(|p| p.sync_ms),
        median(|p| p.transfer_ms)
    );
    let mut downtimes: Vec<f64> = rounds.iter().map(|r| r.downtime_ms).collect();
    downtimes.sort_by(f64::total_cmp);
    if let (Some(min), Some(max)) = (downtimes.first(), downtimes.last()) {
        let median = downtimes[downtimes.len() / 2];
        println!("downtime (guest paused on the source -> running on the destination): min {min:.2} ms, median {median:.2} ms, max {max:.2} ms (aim: under 10 ms; QEMU's default limit is 300 ms)");
    }
}
