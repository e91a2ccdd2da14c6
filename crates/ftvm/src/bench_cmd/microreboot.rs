//! `ftvm bench microreboot`: fault injections into the monitor of a `--resilient` VM
//! running the counter workload (the guest prints 1, 2, 3, ... on its console). Each
//! monitor gets one fault at a random point (a fault point of the `fail` crate, a random
//! number of passes in, with a random action: panic, abort, SIGSEGV, hang); the keeper
//! restarts it and the next one gets the next fault. At the end the console must hold
//! every number once, in order. Prints the seed, the share recovered with nothing lost,
//! and the recovery time (failure seen → guest running again → its first output) as
//! median, p99 and max. A benchmark: it prints figures and never fails on them.

use crate::resilient;
use crate::run_cmd::RunArgs;
use anyhow::{bail, Result};
use clap::Parser;
use seeded::SeededRng;
use std::ffi::OsString;
use vmm::driver::ConsoleSink;
use vmm::keeper::supervisor::{End, Hooks, Restart};

#[derive(clap::Args, Debug)]
pub struct MicrorebootBench {
    /// Faults to inject (one per monitor)
    #[arg(long, default_value_t = 1000)]
    pub injections: usize,
    /// Seed of the fault schedule [default: from the clock; printed]
    #[arg(long)]
    pub seed: Option<u64>,
    /// The hang detection limit (--hang-ms of the keeper)
    #[arg(long, default_value_t = 1000)]
    pub hang_ms: u64,
    /// Guest RAM
    #[arg(long, default_value = "512M")]
    pub mem: String,
    /// Start each monitor when it is needed, without a spare (--no-spare of the keeper)
    #[arg(long)]
    pub no_spare: bool,
}

/// Where faults go, and how many passes of each point a monitor makes before it (at most).
const POINTS: [(&str, u64); 4] = [
    ("driver::slice", 40),
    ("keeper::checkpoint-take", 4),
    ("keeper::checkpoint-commit", 4),
    ("keeper::checkpoint-apply", 4),
];
const ACTIONS: [&str; 4] = ["panic", "return(abort)", "return(segv)", "return(hang)"];

struct Campaign {
    rng: SeededRng,
    injections: usize,
    /// The fault given to each monitor (index: attempt - 1).
    faults: Vec<String>,
    restarts: Vec<Restart>,
    console: Vec<u8>,
    /// A SIGKILL from outside due at this time, for the running monitor.
    kill_at: Option<std::time::Instant>,
    /// The SIGKILLs planned (ms after the first output), by the attempt that gets one.
    kill_plan: std::collections::HashMap<u32, u64>,
    /// A SIGKILL from outside due this long after the new monitor's first output (counted
    /// from then, so that a slow recovery on a loaded host is not struck again and again
    /// before the guest runs, which the keeper would take for a poison input).
    kill_after_ms: Option<u64>,
    /// Numbers printed since the guest's userspace came up (the first monitor is killed
    /// once the counter runs: the campaign measures a running service, not a boot).
    counting: bool,
    printed: usize,
}

impl Hooks for Campaign {
    fn env(&mut self, attempt: u32) -> Vec<(String, String)> {
        // (Called as monitor `attempt` starts, which may be ahead, as a spare.)
        if attempt == 1 || attempt as usize > self.injections + 1 {
            return Vec::new(); // the first boots the guest; the last runs on until the end
        }
        if self.rng.below(5) == 0 {
            // A kill from outside (an operator's kill -9, the OOM killer), once it recovered.
            let after_ms = 100 + self.rng.below(400);
            self.kill_plan.insert(attempt, after_ms);
            self.faults.push(format!("SIGKILL {after_ms} ms after its first output"));
            return Vec::new();
        }
        let (point, passes) = POINTS[self.rng.below(POINTS.len() as u64) as usize];
        let action = ACTIONS[self.rng.below(ACTIONS.len() as u64) as usize];
        // A few slices (a checkpoint) at least, so that every monitor gets past its recovery:
        // on a loaded host a recovery outlasts the checkpoint interval, and a monitor struck
        // at its first checkpoint dies at the same icount as the one before it (the keeper
        // would call three of those a poison input).
        let skip = if point == "driver::slice" { 3 + self.rng.below(passes) } else { 1 + self.rng.below(passes) };
        let spec = format!("{point}={skip}*off->1*{action}");
        self.faults.push(spec.clone());
        vec![("FAILPOINTS".to_string(), spec)]
    }

    fn started(&mut self, attempt: u32) {
        self.kill_at = None; // a kill due was for the monitor that died
        self.kill_after_ms = self.kill_plan.remove(&attempt);
    }

    fn restarted(&mut self, restart: &Restart) {
        if let (Some(after_ms), Some(_)) = (self.kill_after_ms.take(), restart.first_output_ns) {
            self.kill_at = Some(std::time::Instant::now() + std::time::Duration::from_millis(after_ms));
        }
        self.restarts.push(restart.clone());
        let n = self.restarts.len();
        if n.is_multiple_of(50) {
            eprintln!("bench: {n}/{} injections", self.injections);
        }
    }

    fn stop(&mut self) -> bool {
        // Done once the last fault's monitor was replaced and the guest printed again (the
        // first restart is the campaign's start).
        self.restarts.len() > self.injections
    }

    fn console(&mut self, bytes: &[u8]) {
        self.console.extend_from_slice(bytes);
        if !self.counting {
            self.counting = self.console.windows(18).any(|w| w == b"ftvm: userspace up");
        } else if self.printed < 10 {
            self.printed += bytes.iter().filter(|&&b| b == b'\n').count();
            if self.printed >= 10 {
                self.kill_at = Some(std::time::Instant::now());
            }
        }
    }

    fn kill_now(&mut self) -> bool {
        match self.kill_at {
            Some(at) if std::time::Instant::now() >= at => {
                self.kill_at = None;
                true
            }
            _ => false,
        }
    }
}

/// The keeper's console for the campaign: nothing shown.
struct Quiet;
impl resilient::KeptConsole for Quiet {}

impl ConsoleSink for Quiet {
    fn write(&mut self, _bytes: &[u8]) -> std::io::Result<()> {
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Parser)]
struct RunLine {
    #[command(flatten)]
    run: RunArgs,
}

const COUNTER: &str = "i=0; while true; do i=$((i+1)); echo $i; done";

pub fn run(args: MicrorebootBench) -> Result<i32> {
    if !vmm::keeper::fault::ENABLED {
        bail!("this ftvm has no fault points: build it with `cargo build --release --features ftvm/failpoints`");
    }
    crate::guest_image::ensure()?;
    let seed = args.seed.unwrap_or_else(vmm::keeper::supervisor::now_ns);
    eprintln!("bench: microreboot, {} injections, seed {seed} (--seed {seed} repeats the schedule)", args.injections);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    let hang = args.hang_ms.to_string();
    let spare: &[&str] = if args.no_spare { &["--no-spare"] } else { &[] };
    let line: Vec<OsString> = ["run", "--resilient", "--clock", "fast", "--mem", &args.mem, "--hang-ms", &hang]
        .iter()
        .chain(spare)
        .map(OsString::from)
        .chain(["--", "sh", "-c", COUNTER].iter().map(OsString::from))
        .collect();
    let run_args =
        RunLine::try_parse_from(std::iter::once(OsString::from("ftvm")).chain(line.iter().skip(1).cloned()))?.run;
    let mut campaign = Campaign {
        rng: SeededRng::new(seed),
        injections: args.injections,
        faults: Vec::new(),
        restarts: Vec::new(),
        console: Vec::new(),
        kill_at: None,
        kill_plan: Default::default(),
        kill_after_ms: None,
        counting: false,
        printed: 0,
    };
    let started = std::time::Instant::now();
    let (end, _) = resilient::keep(&run_args, line, &mut Quiet, &mut campaign)?;
    let seconds = started.elapsed().as_secs_f64();
    report(&campaign, &end, seconds, args.hang_ms, seed);
    let after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let after: Vec<&str> = after.split_whitespace().take(3).collect();
    println!(
        "  host load average (1, 5, 15 min): {} at the start, {} at the end; spare monitors {}",
        load.join(" "),
        after.join(" "),
        if args.no_spare { "off" } else { "on" }
    );
    Ok(0)
}

/// Numbers the guest printed: (count, gaps or repeats).
fn check_counter(console: &[u8]) -> (u64, u64) {
    let text = String::from_utf8_lossy(console);
    let mut after_up = text.split("ftvm: userspace up").nth(1).unwrap_or("").lines();
    after_up.next(); // the rest of the marker's line
    let (mut expected, mut bad) = (1u64, 0u64);
    let numbers: Vec<u64> = after_up.filter_map(|l| l.trim_end_matches('\r').parse().ok()).collect();
    // The last line may be cut off by the end of the campaign.
    for &n in &numbers[..numbers.len().saturating_sub(1)] {
        if n != expected {
            bad += 1;
        }
        expected = n + 1;
    }
    (numbers.len() as u64, bad)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn report(c: &Campaign, end: &End, seconds: f64, hang_ms: u64, seed: u64) {
    let (numbers, bad) = check_counter(&c.console);
    // The first restart (the kill that starts the campaign) is not an injection.
    let restarts = &c.restarts[c.restarts.len().min(1)..];
    // Recovered: the next monitor ran the guest again (the fault after it may strike
    // before the guest printed anything).
    let recovered = restarts.iter().filter(|r| r.running_ns.is_some() || r.first_output_ns.is_some()).count();
    let n = restarts.len().max(1);
    println!("microreboot: {} injections in {seconds:.0} s, seed {seed}", restarts.len());
    println!("  ended: {end}");
    println!("  counter: {numbers} numbers printed, {bad} gaps or repeats");
    let lost_nothing = if bad == 0 { recovered } else { 0 };
    println!(
        "  recovered with nothing lost: {lost_nothing}/{} ({:.2}%)",
        restarts.len(),
        100.0 * lost_nothing as f64 / n as f64
    );
    let ms = |f: &dyn Fn(&Restart) -> Option<u64>, hang: bool| -> Vec<f64> {
        let mut v: Vec<f64> = restarts
            .iter()
            .filter(|r| (r.cause == vmm::keeper::supervisor::Cause::Hang) == hang)
            .filter_map(|r| f(r).map(|t| t.saturating_sub(r.detected_ns) as f64 / 1e6))
            .collect();
        v.sort_by(f64::total_cmp);
        v
    };
    for (hang, what) in [(false, "crashes"), (true, "hangs")] {
        let running = ms(&|r| r.running_ns, hang);
        let output = ms(&|r| r.first_output_ns, hang);
        let line = |v: &[f64]| {
            format!(
                "median {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                percentile(v, 0.5),
                percentile(v, 0.99),
                v.last().copied().unwrap_or(f64::NAN)
            )
        };
        println!("  {what} ({}): failure seen -> guest running: {}", running.len(), line(&running));
        println!("  {what} ({}): failure seen -> first output:  {}", output.len(), line(&output));
    }
    println!("  (a hang is seen {hang_ms} ms after the last heartbeat: --hang-ms)");
    report_steps(restarts);
    let mut by_kind: std::collections::BTreeMap<String, usize> = Default::default();
    for r in restarts {
        *by_kind.entry(r.cause.to_string()).or_default() += 1;
    }
    for (kind, count) in by_kind {
        println!("  {count:5} {kind}");
    }
}

/// The recovery's steps after a crash (a hang adds the wait before it is seen), median and
/// p99 of each, over the restarts whose new monitor reached the guest running.
fn report_steps(restarts: &[Restart]) {
    use vmm::keeper::supervisor::Cause;
    let done: Vec<&Restart> = restarts.iter().filter(|r| r.cause != Cause::Hang && r.running_ns.is_some()).collect();
    let spares = done.iter().filter(|r| r.steps.spare).count();
    println!("  crashes, failure seen -> guest running, by step ({} restarts, {spares} by a spare):", done.len());
    type Step<'a> = (&'a str, &'a dyn Fn(&Restart) -> Option<(u64, u64)>);
    let steps: [Step; 7] = [
        ("reap + hand over", &|r| Some((r.detected_ns, r.steps.handed_ns))),
        ("process start / wake", &|r| Some((r.steps.handed_ns, r.steps.begun_ns?))),
        ("build the machine", &|r| Some((r.steps.begun_ns?, r.steps.built_ns?))),
        ("lay the RAM image", &|r| Some((r.steps.built_ns?, r.steps.laid_ns?))),
        ("restore the state", &|r| Some((r.steps.laid_ns?, r.steps.restored_ns?))),
        ("replay the log", &|r| Some((r.steps.restored_ns?, r.running_ns?))),
        ("then: first output", &|r| Some((r.running_ns?, r.first_output_ns?))),
    ];
    for (name, step) in steps {
        let mut v: Vec<f64> =
            done.iter().filter_map(|r| step(r)).map(|(a, b)| b.saturating_sub(a) as f64 / 1e6).collect();
        v.sort_by(f64::total_cmp);
        println!(
            "    {name:22} median {:7.1} ms, p99 {:7.1} ms ({} samples)",
            percentile(&v, 0.5),
            percentile(&v, 0.99),
            v.len()
        );
    }
}
