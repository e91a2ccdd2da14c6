//! `ftvm model`: reliability models of virtualized nodes (the `reliability` crate) on the
//! command line: the paper's closed forms, the bounds, any block diagram, availability with
//! measured coverage, and SVG figures. Text by default, `--json` for scripts.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use reliability::availability::{self, AvailabilityInputs, MeasuredCoverage};
use reliability::bounds::{self, ReplicaBound, Threshold};
use reliability::curves::{self, Grid};
use reliability::{models, plot, Block, ModelSpec, Reliability};
use serde_json::{json, Value};

/// The largest model or results file read.
const MAX_FILE_BYTES: u64 = 1 << 20;

const MODELS_HELP: &str = "\
Models (blocks fail independently, so every R is an upper bound; H = hardware,
V = hypervisor, M = one VM's software stack; probabilities in [0, 1], and
1-1e-9 means one minus 1e-9, kept exact):
  nv            R = R_H·R_M
  parallel      R = R_H·R_V·(1 − (1 − R_M)^n)   (or 1 − Π(1 − R_Mi) per VM)
  move          f in each VM:  R_H·R_V·(1 − (1 − R_f·R_M′)^n)
                F in monitor:  R_H·R_V·R_F·(1 − (1 − R_M′)^n)
  vote          R = R_H·R_V·Σ_{i=k..n} C(n,i)·R_M^i·(1 − R_M)^(n−i)
  eval          any series (a * b), parallel (a | b), kofn(k, ...) diagram
  availability  A = MTTF / (MTTF + c·T_rec + (1 − c)·T_rep), downtime per year
  bound rv      parallel beats one bare VM iff R_V > R_M / (1 − (1 − R_M)^n);
                for n = 1 the bound is 1: no R_V < 1 helps
  bound rv-vote voting beats one bare VM iff R_V > R_M / Σ_{i≥k}...;
                2-of-3: R_V > 1/(3R_M − 2R_M²), impossible for R_M ≤ 0.5
  bound rf      moving f pays iff R_F ≥ (1 − (1 − R_f·R_M′)^n) / (1 − (1 − R_M′)^n)
  bound n       n ≥ log(1 − R/(R_H·R_V)) / log(1 − R_M), impossible if R ≥ R_H·R_V
  plot rv|n|vote  the paper's figures as SVG

Examples:
  ftvm model parallel --rh 0.999 --rv 0.9999 --rm 0.9 --n 3
  ftvm model bound n --rh 0.9999 --rv 0.99999 --rm 0.9 --target 0.9995
  ftvm model eval 'H * V * kofn(2, M[3])' --block H=0.999 --block V=0.9999 --block M=0.9
  ftvm model availability --mttf 10000h --results campaign.json --repair-time 4h
  ftvm model plot rv --n 1,2,3,5 --out rv.svg";

/// Reliability models of virtualized nodes: is the hypervisor worth it, how many replicas,
/// guest or monitor?
#[derive(Args, Debug)]
#[command(after_help = MODELS_HELP)]
pub struct ModelArgs {
    /// Print the answer as JSON (for scripts) instead of text
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: ModelCommand,
}

#[derive(Subcommand, Debug)]
enum ModelCommand {
    /// Non-virtualized node: R = R_H·R_M
    Nv(NvArgs),
    /// n VMs serving the same requests in parallel on one hypervisor: R = R_H·R_V·(1 − (1 − R_M)^n)
    Parallel(ParallelArgs),
    /// Function f inside every VM, or moved into the hypervisor as F: which is more reliable
    Move(MoveArgs),
    /// k-of-n voting in the monitor: R = R_H·R_V·Σ_{i=k..n} C(n,i)·R_M^i·(1 − R_M)^(n−i)
    Vote(VoteArgs),
    /// Any series/parallel/k-of-n block diagram, from an expression or a TOML/JSON model file
    #[command(after_help = EVAL_HELP)]
    Eval(EvalArgs),
    /// Steady-state availability and downtime per year, with repair and imperfect coverage
    #[command(after_help = AVAILABILITY_HELP)]
    Availability(AvailabilityArgs),
    /// Lower bounds on R_V (parallel or voting), on R_F, and on the number of VMs
    Bound(BoundArgs),
    /// Draw the paper's figures as SVG (axes, ticks, labels, legend)
    Plot(PlotArgs),
}

const EVAL_HELP: &str = "\
Expression: a * b (series), a | b (parallel), series(..), parallel(..),
kofn(k, ..), M[3] (three independent copies, inside a gate), literals like 0.99.
'*' binds tighter than '|'. Each use of a name is an independent instance.

Model file (TOML; the JSON form has the same keys):
  system = \"H * V * parallel(vm[3])\"
  [blocks]
  H = 0.999
  V = \"1-1e-6\"
  vm = \"f * rest\"      # a block defined over other blocks
  f = 0.99
  rest = 0.95

Examples:
  ftvm model eval 'H * V * (M | M | M)' --block H=0.999 --block V=0.9999 --block M=0.9
  ftvm model eval --file node.toml --block M=0.95";

const AVAILABILITY_HELP: &str = "\
A = MTTF / (MTTF + c·T_rec + (1 − c)·T_rep): covered failures cost the recovery
time, uncovered ones the repair time. Durations take a unit: ms, s, min, h, d, y.

Results file (JSON, from a fault-injection campaign; flags override it):
  {\"format\": \"ftvm-coverage/1\", \"campaign\": \"name\",
   \"injected\": 1000, \"recovered\": 970, \"recovery_time_s\": 0.8}
With injected/recovered counts, the one-sided Clopper-Pearson lower bound on the
coverage (at --confidence) is also reported, with the availability it implies.

Example:
  ftvm model availability --mttf 10000h --coverage 0.97 --recovery-time 0.8s --repair-time 4h";

#[derive(Args, Debug)]
struct NvArgs {
    /// Reliability of the hardware, R_H
    #[arg(long, value_name = "P", allow_negative_numbers = true, value_parser = prob)]
    rh: Reliability,
    /// Reliability of the software stack (OS + application), R_M
    #[arg(long, value_name = "P", allow_negative_numbers = true, value_parser = prob)]
    rm: Reliability,
}

#[derive(Args, Debug)]
struct ParallelArgs {
    /// Reliability of the hardware, R_H
    #[arg(long, value_name = "P", allow_negative_numbers = true, value_parser = prob)]
    rh: Reliability,
    /// Reliability of the hypervisor, R_V
    #[arg(long, value_name = "P", allow_negative_numbers = true, value_parser = prob)]
    rv: Reliability,
    /// Reliability of one VM, R_M; or one per VM, comma-separated (then --n is optional)
    #[arg(long, value_name = "P[,P...]", allow_negative_numbers = true, value_parser = prob, value_delimiter = ',', required = true)]
    rm: Vec<Reliability>,
    /// Number of identical VMs
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = count)]
    n: Option<u64>,
}

#[derive(Args, Debug)]
struct MoveArgs {
    /// Reliability of the hardware, R_H
    #[arg(long, value_name = "P", allow_negative_numbers = true, value_parser = prob)]
    rh: Reliability,
    /// Reliability of the hypervisor without the function, R_V
    #[arg(long, value_name = "P", allow_negative_numbers = true, value_parser = prob)]
    rv: Reliability,
    /// Number of VMs
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = count)]
    n: u64,
    /// Reliability of the function inside one VM, R_f
    #[arg(long, value_name = "P", allow_negative_numbers = true, value_parser = prob)]
    rf_guest: Reliability,
    /// Reliability of the rest of one VM's stack, R_M′
    #[arg(long, value_name = "P", allow_negative_numbers = true, value_parser = prob)]
    rm_rest: Reliability,
    /// Reliability of the function in the hypervisor, R_F [default: the bound, printed]
    #[arg(long, value_name = "P", allow_negative_numbers = true, value_parser = prob)]
    rf_monitor: Option<Reliability>,
}

#[derive(Args, Debug)]
struct VoteArgs {
    /// Reliability of the hardware, R_H
    #[arg(long, value_name = "P", allow_negative_numbers = true, value_parser = prob)]
    rh: Reliability,
    /// Reliability of the hypervisor with its voter, R_V
    #[arg(long, value_name = "P", allow_negative_numbers = true, value_parser = prob)]
    rv: Reliability,
    /// Reliability of one VM, R_M
    #[arg(long, value_name = "P", allow_negative_numbers = true, value_parser = prob)]
    rm: Reliability,
    /// Number of voting VMs
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = count, default_value = "3")]
    n: u64,
    /// Votes needed [default: a majority, n/2 + 1]
    #[arg(long, value_name = "K", allow_negative_numbers = true, value_parser = count)]
    k: Option<u64>,
}

#[derive(Args, Debug)]
struct EvalArgs {
    /// The system's diagram, e.g. 'H * V * kofn(2, M[3])' [default: `system` in --file]
    #[arg(value_name = "EXPR")]
    expr: Option<String>,
    /// Model file with named blocks (TOML, or JSON if the name ends in .json)
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,
    /// A named block: a probability (M=0.9, V=1-1e-6) or an expression (VM='f * rest');
    /// overrides the file
    #[arg(long = "block", short = 'b', value_name = "NAME=VALUE")]
    blocks: Vec<String>,
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("failures").required(true).args(["mttf", "failure_rate"])))]
struct AvailabilityArgs {
    /// Mean time to failure, e.g. 10000h or 2y
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    mttf: Option<f64>,
    /// Failure rate instead of MTTF, e.g. 1e-4/h, 2/y or 500fit
    #[arg(long, value_name = "RATE", value_parser = rate)]
    failure_rate: Option<f64>,
    /// Coverage c, the share of failures that recovery handles [default: from --results]
    #[arg(long, value_name = "P", allow_negative_numbers = true, value_parser = unit_interval)]
    coverage: Option<f64>,
    /// Mean downtime of a covered failure, e.g. 0.8s [default: from --results]
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    recovery_time: Option<f64>,
    /// Mean downtime of an uncovered failure (needed when coverage < 1), e.g. 4h
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    repair_time: Option<f64>,
    /// Fault-injection results (JSON) giving coverage and recovery time
    #[arg(long, value_name = "FILE")]
    results: Option<PathBuf>,
    /// Confidence of the lower bound on coverage from counts in --results
    #[arg(long, value_name = "P", default_value = "0.95", value_parser = unit_interval)]
    confidence: f64,
}

#[derive(Args, Debug)]
struct BoundArgs {
    #[command(subcommand)]
    bound: BoundCommand,
}

#[derive(Subcommand, Debug)]
enum BoundCommand {
    /// Least R_V for n parallel VMs to beat one bare VM: R_V > R_M / (1 − (1 − R_M)^n)
    Rv {
        /// Reliability of one VM, R_M
        #[arg(long, value_name = "P", allow_negative_numbers = true, value_parser = prob)]
        rm: Reliability,
        /// Number of VMs
        #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = count)]
        n: u64,
    },
    /// Least R_V for k-of-n voting to beat one bare VM; 2-of-3: R_V > 1 / (3R_M − 2R_M²)
    RvVote {
        /// Reliability of one VM, R_M
        #[arg(long, value_name = "P", allow_negative_numbers = true, value_parser = prob)]
        rm: Reliability,
        /// Number of voting VMs
        #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = count, default_value = "3")]
        n: u64,
        /// Votes needed [default: a majority, n/2 + 1]
        #[arg(long, value_name = "K", allow_negative_numbers = true, value_parser = count)]
        k: Option<u64>,
    },
    /// Least R_F for moving f into the monitor: R_F ≥ (1 − (1 − R_f·R_M′)^n) / (1 − (1 − R_M′)^n)
    Rf {
        /// Reliability of the function inside one VM, R_f
        #[arg(long, value_name = "P", allow_negative_numbers = true, value_parser = prob)]
        rf_guest: Reliability,
        /// Reliability of the rest of one VM's stack, R_M′
        #[arg(long, value_name = "P", allow_negative_numbers = true, value_parser = prob)]
        rm_rest: Reliability,
        /// Number of VMs
        #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = count)]
        n: u64,
    },
    /// Least number of parallel VMs reaching a target R: n ≥ log(1 − R/(R_H·R_V)) / log(1 − R_M)
    N {
        /// Reliability of the hardware, R_H
        #[arg(long, value_name = "P", allow_negative_numbers = true, value_parser = prob)]
        rh: Reliability,
        /// Reliability of the hypervisor, R_V
        #[arg(long, value_name = "P", allow_negative_numbers = true, value_parser = prob)]
        rv: Reliability,
        /// Reliability of one VM, R_M
        #[arg(long, value_name = "P", allow_negative_numbers = true, value_parser = prob)]
        rm: Reliability,
        /// Target node reliability R (e.g. 0.9999 or 1-1e-6)
        #[arg(long, value_name = "P", allow_negative_numbers = true, value_parser = prob)]
        target: Reliability,
    },
}

#[derive(Args, Debug)]
struct PlotArgs {
    #[command(subcommand)]
    figure: PlotCommand,
    /// The SVG file to write
    #[arg(long, value_name = "FILE", global = true)]
    out: Option<PathBuf>,
    /// Smallest R_M on the x axis [default: 0.01, or 0.5 for n and vote]
    #[arg(long, value_name = "P", allow_negative_numbers = true, value_parser = unit_interval, global = true)]
    rm_min: Option<f64>,
    /// Largest R_M on the x axis
    #[arg(long, value_name = "P", allow_negative_numbers = true, value_parser = unit_interval, global = true, default_value = "0.99")]
    rm_max: f64,
    /// Points per curve
    #[arg(long, value_name = "N", global = true, default_value = "400")]
    points: usize,
    /// Picture width in pixels
    #[arg(long, value_name = "PX", global = true, default_value = "900")]
    width: u32,
    /// Picture height in pixels
    #[arg(long, value_name = "PX", global = true, default_value = "560")]
    height: u32,
}

#[derive(Subcommand, Debug)]
enum PlotCommand {
    /// Least R_V against R_M, one curve per n
    Rv {
        /// Numbers of VMs, comma-separated
        #[arg(long, value_name = "N,...", allow_negative_numbers = true, value_parser = count, value_delimiter = ',', default_value = "1,2,3,5")]
        n: Vec<u64>,
    },
    /// Least number of VMs against R_M, one curve per target R
    N {
        /// Reliability of the hardware, R_H
        #[arg(long, value_name = "P", allow_negative_numbers = true, value_parser = prob)]
        rh: Reliability,
        /// Reliability of the hypervisor, R_V
        #[arg(long, value_name = "P", allow_negative_numbers = true, value_parser = prob)]
        rv: Reliability,
        /// Target node reliabilities, comma-separated
        #[arg(long, value_name = "P,...", allow_negative_numbers = true, value_parser = prob, value_delimiter = ',', required = true)]
        target: Vec<Reliability>,
    },
    /// Break-even R_V of k-of-n voting against R_M, one curve per vote
    Vote {
        /// Votes as K/N, comma-separated
        #[arg(long, value_name = "K/N,...", value_parser = vote_spec, value_delimiter = ',', default_value = "2/3,3/5,4/7")]
        vote: Vec<(u64, u64)>,
    },
}

/// Runs `ftvm model`.
pub fn run(args: ModelArgs) -> Result<()> {
    let json = args.json;
    let (text, value) = match args.command {
        ModelCommand::Nv(a) => nv(&a),
        ModelCommand::Parallel(a) => parallel(&a)?,
        ModelCommand::Move(a) => move_function(&a)?,
        ModelCommand::Vote(a) => vote(&a)?,
        ModelCommand::Eval(a) => eval(&a)?,
        ModelCommand::Availability(a) => availability(&a)?,
        ModelCommand::Bound(a) => bound(&a.bound)?,
        ModelCommand::Plot(a) => plot_figure(&a)?,
    };
    let mut out = if json { serde_json::to_string_pretty(&value)? } else { text.trim_end().to_string() };
    out.push('\n');
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(out.as_bytes()).and_then(|()| stdout.flush()).context("writing the answer")
}

type Answer = (String, Value);

fn nv(a: &NvArgs) -> Answer {
    let node = models::non_virtualized(a.rh, a.rm);
    let mut text = String::from("Non-virtualized node: R = R_H·R_M\n");
    push_reliability(&mut text, "node", node);
    (text, json!({"model": "nv", "inputs": {"rh": a.rh.r(), "rm": a.rm.r()}, "node": node}))
}

fn parallel(a: &ParallelArgs) -> Result<Answer> {
    let (node, label, n_json) = match (a.rm.as_slice(), a.n) {
        ([rm], Some(n)) => (
            models::parallel(a.rh, a.rv, *rm, n)?,
            format!("{n} identical VMs in parallel on one hypervisor: R = R_H·R_V·(1 − (1 − R_M)^n)"),
            n,
        ),
        ([_], None) => bail!("--n (the number of VMs) is needed with a single --rm; or give one --rm per VM"),
        (rms, n) => {
            if let Some(n) = n.filter(|&n| n != rms.len() as u64) {
                bail!("--n {n} does not match the {} values of --rm", rms.len());
            }
            let label = format!("{} VMs in parallel on one hypervisor: R = R_H·R_V·(1 − Π(1 − R_Mi))", rms.len());
            (models::parallel_mixed(a.rh, a.rv, rms)?, label, rms.len() as u64)
        }
    };
    // The bare node runs the most reliable of the given stacks.
    let best_rm = a.rm.iter().copied().fold(Reliability::FAILED, |b, m| if m.at_least(b) { m } else { b });
    let bare = models::non_virtualized(a.rh, best_rm);
    let mut text = format!("{label}\n");
    push_reliability(&mut text, "node", node);
    push_comparison(&mut text, node, bare);
    let mut value = json!({
        "model": "parallel",
        "inputs": {"rh": a.rh.r(), "rv": a.rv.r(), "rm": a.rm.iter().map(|m| m.r()).collect::<Vec<_>>(), "n": n_json},
        "node": node,
        "non_virtualized": bare,
        "better_than_non_virtualized": beats(node, bare),
    });
    if let [rm] = a.rm.as_slice() {
        let min_rv = bounds::min_rv_parallel(*rm, n_json)?;
        let _ = writeln!(text, "the hypervisor pays off {}", threshold_text("R_V", min_rv));
        value["min_rv"] = json!(min_rv);
    }
    Ok((text, value))
}

fn move_function(a: &MoveArgs) -> Result<Answer> {
    let min_rf = bounds::min_rf(a.rf_guest, a.rm_rest, a.n)?;
    let mut text = format!("Function f in each of {} VMs, or moved into the hypervisor as F\n", a.n);
    let _ = writeln!(text, "moving f into the monitor pays off {}", threshold_text("R_F", min_rf));
    let mut value = json!({
        "model": "move",
        "inputs": {"rh": a.rh.r(), "rv": a.rv.r(), "n": a.n, "rf_guest": a.rf_guest.r(), "rm_rest": a.rm_rest.r()},
        "min_rf": min_rf,
    });
    if let Some(rf_monitor) = a.rf_monitor {
        let placed = models::move_function(a.rh, a.rv, a.rf_guest, a.rm_rest, rf_monitor, a.n)?;
        push_reliability(&mut text, "f in guest", placed.in_guest);
        push_reliability(&mut text, "F in monitor", placed.in_monitor);
        let verdict = if placed.in_monitor.at_least(placed.in_guest) { "the monitor" } else { "the guest" };
        let _ = writeln!(text, "verdict: f belongs in {verdict}");
        value["inputs"]["rf_monitor"] = json!(rf_monitor.r());
        value["in_guest"] = json!(placed.in_guest);
        value["in_monitor"] = json!(placed.in_monitor);
        value["monitor_at_least_as_reliable"] = json!(placed.in_monitor.at_least(placed.in_guest));
    } else {
        let _ = writeln!(text, "(give --rf-monitor to compare the two placements)");
    }
    Ok((text, value))
}

fn vote(a: &VoteArgs) -> Result<Answer> {
    let k = a.k.unwrap_or(a.n / 2 + 1);
    let node =
        if (k, a.n) == (2, 3) { models::vote_2of3(a.rh, a.rv, a.rm) } else { models::vote(a.rh, a.rv, a.rm, k, a.n)? };
    let bare = models::non_virtualized(a.rh, a.rm);
    let min_rv = bounds::min_rv_vote(a.rm, k, a.n)?;
    let mut text = format!(
        "{k}-of-{} voting in the monitor: R = R_H·R_V·Σ_{{i={k}..{}}} C(n,i)·R_M^i·(1 − R_M)^(n−i)\n",
        a.n, a.n
    );
    push_reliability(&mut text, "node", node);
    push_comparison(&mut text, node, bare);
    let _ = writeln!(text, "voting pays off {}", threshold_text("R_V", min_rv));
    let value = json!({
        "model": "vote",
        "inputs": {"rh": a.rh.r(), "rv": a.rv.r(), "rm": a.rm.r(), "k": k, "n": a.n},
        "node": node,
        "non_virtualized": bare,
        "better_than_non_virtualized": beats(node, bare),
        "min_rv": min_rv,
    });
    Ok((text, value))
}

fn eval(a: &EvalArgs) -> Result<Answer> {
    let mut spec = match &a.file {
        Some(path) => ModelSpec::from_file_text(&path.display().to_string(), &read_limited(path)?)?,
        None => ModelSpec::default(),
    };
    for block in &a.blocks {
        spec.define(block)?;
    }
    let expr = a
        .expr
        .clone()
        .or_else(|| spec.system.clone())
        .ok_or_else(|| anyhow!("no system to evaluate: give an expression, or a --file with `system = \"...\"`"))?;
    let system = Block::parse(&expr)?;
    spec.check_names(&system)?;
    let env = spec.resolve()?;
    let node = system.evaluate(&env)?;
    let mut text = format!("System: {}\n", expr.trim());
    push_reliability(&mut text, "system", node);
    for (name, r) in &env {
        let _ = writeln!(text, "  {name:<12} R = {:<20} 1-R = {}", r.display_r(), r.display_q());
    }
    let blocks: serde_json::Map<String, Value> = env.iter().map(|(n, r)| (n.clone(), json!(r))).collect();
    Ok((text, json!({"model": "eval", "system": expr.trim(), "node": node, "blocks": blocks})))
}

fn availability(a: &AvailabilityArgs) -> Result<Answer> {
    let measured = a
        .results
        .as_ref()
        .map(|path| {
            availability::read_results(&read_limited(path)?, a.confidence).with_context(|| path.display().to_string())
        })
        .transpose()?;
    let from_file = |f: fn(&MeasuredCoverage) -> Option<f64>| measured.as_ref().and_then(f);
    let coverage = a.coverage.or(from_file(|m| m.coverage)).ok_or_else(|| {
        anyhow!("no coverage: give --coverage, or --results with coverage or injected/recovered counts")
    })?;
    let recovery_time_s = a
        .recovery_time
        .or(from_file(|m| m.recovery_time_s))
        .ok_or_else(|| anyhow!("no recovery time: give --recovery-time, or --results with recovery_time_s"))?;
    let mttf_s =
        a.mttf.or(a.failure_rate.map(|rate| 1.0 / rate)).ok_or_else(|| anyhow!("give --mttf or --failure-rate"))?;
    let inputs = AvailabilityInputs { mttf_s, coverage, recovery_time_s, repair_time_s: a.repair_time };
    let result = availability::steady_state(&inputs)?;
    let mut text =
        String::from("Availability with repair and imperfect coverage: A = MTTF / (MTTF + c·T_rec + (1 − c)·T_rep)\n");
    let _ = writeln!(
        text,
        "  MTTF {}, coverage {coverage}, recovery {}, repair {}",
        availability::format_duration(mttf_s),
        availability::format_duration(recovery_time_s),
        a.repair_time.map_or("-".into(), availability::format_duration),
    );
    push_availability(&mut text, "", &result);
    let mut value = json!({"model": "availability", "inputs": inputs, "result": result});
    if let Some(m) = &measured {
        value["measured"] = json!(m);
        let lower = m.coverage_lower_bound.filter(|_| a.coverage.is_none());
        if let Some(lower) = lower {
            let pessimistic = availability::steady_state(&AvailabilityInputs { coverage: lower, ..inputs })?;
            let _ =
                writeln!(text, "at the {}% lower confidence bound on coverage, c = {lower:.6}:", m.confidence * 100.0);
            push_availability(&mut text, "  ", &pessimistic);
            value["at_coverage_lower_bound"] = json!(pessimistic);
        }
    }
    Ok((text, value))
}

fn bound(command: &BoundCommand) -> Result<Answer> {
    Ok(match *command {
        BoundCommand::Rv { rm, n } => {
            let t = bounds::min_rv_parallel(rm, n)?;
            let text = format!("n = {n} parallel VMs beat one bare VM {}", threshold_text("R_V", t));
            (text, json!({"bound": "rv", "inputs": {"rm": rm.r(), "n": n}, "min_rv": t}))
        }
        BoundCommand::RvVote { rm, n, k } => {
            let k = k.unwrap_or(n / 2 + 1);
            let t = bounds::min_rv_vote(rm, k, n)?;
            let text = format!("{k}-of-{n} voting beats one bare VM {}", threshold_text("R_V", t));
            (text, json!({"bound": "rv_vote", "inputs": {"rm": rm.r(), "k": k, "n": n}, "min_rv": t}))
        }
        BoundCommand::Rf { rf_guest, rm_rest, n } => {
            let t = bounds::min_rf(rf_guest, rm_rest, n)?;
            let text = format!("moving f into the monitor pays off {}", threshold_text("R_F", t));
            let inputs = json!({"rf_guest": rf_guest.r(), "rm_rest": rm_rest.r(), "n": n});
            (text, json!({"bound": "rf", "inputs": inputs, "min_rf": t}))
        }
        BoundCommand::N { rh, rv, rm, target } => {
            let b = bounds::min_replicas(rh, rv, rm, target)?;
            let text = replicas_text(b, rh, rv, rm, target)?;
            let inputs = json!({"rh": rh.r(), "rv": rv.r(), "rm": rm.r(), "target": target.r()});
            (text, json!({"bound": "n", "inputs": inputs, "min_n": b}))
        }
    })
}

fn replicas_text(
    b: ReplicaBound,
    rh: Reliability,
    rv: Reliability,
    rm: Reliability,
    target: Reliability,
) -> Result<String> {
    Ok(match b {
        ReplicaBound::Reaches { n } => {
            let at = models::parallel(rh, rv, rm, n)?;
            let mut text = format!(
                "n = {n} VMs reach R = {} (they give R = {}, 1-R = {})",
                target.display_r(),
                at.display_r(),
                at.display_q()
            );
            if n > 1 {
                let below = models::parallel(rh, rv, rm, n - 1)?;
                let _ = write!(
                    text,
                    "\nn = {} falls short (R = {}, 1-R = {})",
                    n - 1,
                    below.display_r(),
                    below.display_q()
                );
            }
            text
        }
        ReplicaBound::Astronomical { approx } => format!("n ≈ {approx:.3e} VMs: R_M is too small for any practical n"),
        ReplicaBound::Unreachable { ceiling } => format!(
            "impossible: no number of VMs reaches R = {}; the node can do no better than R_H·R_V = {}{}",
            target.display_r(),
            ceiling.display_r(),
            if rm.r() == 0.0 { " and R_M = 0" } else { "" }
        ),
    })
}

fn plot_figure(a: &PlotArgs) -> Result<Answer> {
    let out = a.out.as_ref().ok_or_else(|| anyhow!("--out FILE.svg is needed: where to write the figure"))?;
    let default_min = if matches!(a.figure, PlotCommand::Rv { .. }) { 0.01 } else { 0.5 };
    let grid = Grid::new(a.rm_min.unwrap_or(default_min), a.rm_max, a.points)?;
    let figure = match &a.figure {
        PlotCommand::Rv { n } => curves::min_rv_figure(n, grid)?,
        PlotCommand::N { rh, rv, target } => curves::min_n_figure(*rh, *rv, target, grid)?,
        PlotCommand::Vote { vote } => curves::vote_figure(vote, grid)?,
    };
    let svg = plot::render_svg(&figure, a.width, a.height)?;
    std::fs::write(out, svg).with_context(|| format!("cannot write {}", out.display()))?;
    let labels: Vec<&str> = figure.curves.iter().map(|c| c.label.as_str()).collect();
    let text = format!("wrote {}: {} ({})", out.display(), figure.title, labels.join("; "));
    Ok((text, json!({"out": out.display().to_string(), "figure": figure})))
}

fn push_reliability(text: &mut String, what: &str, r: Reliability) {
    let _ = writeln!(text, "{what:<16}R   = {}", r.display_r());
    let nines = if r.ln_q() == f64::NEG_INFINITY { "perfect".to_string() } else { format!("{:.2} nines", r.nines()) };
    let _ = writeln!(text, "{:<16}1-R = {}  ({nines})", "", r.display_q());
}

fn push_comparison(text: &mut String, node: Reliability, bare: Reliability) {
    let _ =
        writeln!(text, "{:<16}R   = {}  (R_H·R_M; 1-R = {})", "non-virtualized", bare.display_r(), bare.display_q());
    let verdict = if beats(node, bare) {
        "the virtualized node is more reliable"
    } else if node == bare {
        "the same reliability"
    } else {
        "the virtualized node is LESS reliable"
    };
    // How many times smaller (or larger) the unreliability is than the bare node's.
    let ratio = (bare.ln_q() - node.ln_q()).abs().exp();
    let direction = if node.ln_q() <= bare.ln_q() { "smaller" } else { "larger" };
    if ratio.is_finite() && node != bare {
        let times = if ratio < 1e4 { format!("{ratio:.3}") } else { format!("{ratio:.3e}") };
        let _ = writeln!(text, "verdict: {verdict} (unreliability {times} times {direction})");
    } else {
        let _ = writeln!(text, "verdict: {verdict}");
    }
}

fn push_availability(text: &mut String, indent: &str, a: &availability::Availability) {
    let q = Reliability::from_q(a.unavailability).unwrap_or(Reliability::FAILED);
    let _ = writeln!(text, "{indent}availability        A = {}", q.display_r());
    let _ = writeln!(text, "{indent}unavailability    1-A = {}  ({:.2} nines)", q.display_q(), a.nines);
    let _ = writeln!(
        text,
        "{indent}downtime per year     = {}  (covered {}, uncovered {})",
        availability::format_duration(a.downtime_s_per_year),
        availability::format_duration(a.covered_downtime_s_per_year),
        availability::format_duration(a.uncovered_downtime_s_per_year),
    );
    let _ = writeln!(text, "{indent}failures per year     = {:.4}", a.failures_per_year);
}

fn beats(node: Reliability, bare: Reliability) -> bool {
    node.at_least(bare) && node != bare
}

/// "when R_V > 0.9009 (...)", or "only if R_V > 1, i.e. never" when no value below 1 works.
fn threshold_text(name: &str, t: Threshold) -> String {
    match t {
        Threshold::Above { min } => {
            format!("when {name} > {}  (its unreliability below {})", min.display_r(), min.display_q())
        }
        Threshold::AtLeast { min } => {
            format!("when {name} ≥ {}  (its unreliability at most {})", min.display_r(), min.display_q())
        }
        Threshold::Unreachable => format!("only if {name} > 1, i.e. never: no {name} < 1 works"),
    }
}

/// Reads a file of at most [`MAX_FILE_BYTES`].
fn read_limited(path: &Path) -> Result<String> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut text = String::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if text.len() as u64 > MAX_FILE_BYTES {
        bail!("{} is larger than {MAX_FILE_BYTES} bytes", path.display());
    }
    Ok(text)
}

fn prob(text: &str) -> Result<Reliability, String> {
    text.parse::<Reliability>().map_err(|e| e.to_string())
}

fn count(text: &str) -> Result<u64, String> {
    match text.trim().parse::<u64>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{text}` is not a whole number")),
    }
}

fn unit_interval(text: &str) -> Result<f64, String> {
    prob(text).map(|r| r.r())
}

fn duration(text: &str) -> Result<f64, String> {
    availability::parse_duration(text).map_err(|e| e.to_string())
}

fn rate(text: &str) -> Result<f64, String> {
    availability::parse_rate(text).map_err(|e| e.to_string())
}

fn vote_spec(text: &str) -> Result<(u64, u64), String> {
    let (k, n) = text.split_once('/').ok_or_else(|| format!("`{text}` is not a vote: write K/N, e.g. 2/3"))?;
    let (k, n) = (count(k)?, count(n)?);
    if k > n {
        return Err(format!("{k}/{n}: k must not exceed n"));
    }
    Ok((k, n))
}
