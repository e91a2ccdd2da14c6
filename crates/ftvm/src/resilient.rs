//! `ftvm run --resilient`: the keeper, and the monitor it runs (this binary again, told
//! by the environment which descriptors it inherited). The logic is in `vmm::keeper`;
//! this wires the terminal, the TAP device and the API socket to it.

use crate::run_cmd::{self, CommandConsole, RunArgs, TerminalConsole};
use anyhow::{bail, Context, Result};
use std::os::unix::net::UnixListener;
use vmm::driver::{ConsoleSink, Driver};
use vmm::host::{console, tap::Tap};
use vmm::keeper::region::{Region, Verdict};
use vmm::keeper::supervisor::{self, End, Hooks, Inherit, NoHooks, Restart};
use vmm::keeper::{disk::DiskJournal, monitor, stream::StreamSink, Inherited};

pub fn run(args: RunArgs) -> Result<i32> {
    refuse_unsupported(&args)?;
    match vmm::keeper::inherited()? {
        Some(inherited) => run_monitor(&args, inherited),
        None => {
            let (end, restarts) = keep(&args, std::env::args_os().skip(1).collect(), &mut *sink(&args), &mut NoHooks)?;
            if let Some(path) = &args.keeper_report {
                write_report(path, &end, &restarts)?;
            }
            match end {
                End::Exited(code) => Ok(code),
                other => bail!("{other}"),
            }
        }
    }
}

fn refuse_unsupported(args: &RunArgs) -> Result<()> {
    if args.replication.replicate_to.is_some() || args.replication.ownership.store.is_some() {
        bail!("--resilient does not work with replication or an ownership store yet (docs/microreboot.md)");
    }
    Ok(())
}

/// The keeper: own the region, the terminal, the TAP device and the API socket; run
/// monitors until the VM ends.
/// The console of a keeper that shows the VM on this terminal (a benchmark keeps its own).
pub fn sink(args: &RunArgs) -> Box<dyn ConsoleSink> {
    if args.command.is_empty() {
        Box::new(TerminalConsole)
    } else {
        Box::new(CommandConsole::new(args.boot_log))
    }
}

/// Supervise monitors started as `ftvm MONITOR_ARGS` (a `run --resilient` command line).
pub fn keep(
    args: &RunArgs,
    monitor_args: Vec<std::ffi::OsString>,
    sink: &mut dyn ConsoleSink,
    hooks: &mut dyn Hooks,
) -> Result<(End, Vec<Restart>)> {
    let vm = &args.vm;
    run_cmd::machine_config(vm, &args.command)?; // a missing kernel is refused before anything starts
    let region = Region::create(vm.mem)?;
    let mut fds = Vec::new();
    if let Some(tap) = run_cmd::open_tap(vm)? {
        fds.push(("tap", tap.into_fd()));
    }
    if written_disk(vm).is_some() {
        fds.push(("disk", vmm::keeper::disk::create_journal()?));
    }
    let _api = match &vm.api {
        Some(path) => {
            let listener = crate::api::bind(path)?;
            fds.push(("api", std::os::fd::OwnedFd::from(listener)));
            Some(RemoveOnDrop(path.clone()))
        }
        None => None,
    };
    let interactive = args.command.is_empty();
    let _raw = interactive.then(console::RawMode::enter);
    let inherit = Inherit {
        exe: std::env::current_exe().context("cannot find this ftvm binary to start the monitor")?,
        args: monitor_args,
        fds,
    };
    let options = supervisor::Options {
        hang_ms: args.hang_ms,
        poison_attempts: args.poison_attempts,
        ..supervisor::Options::default()
    };
    refuse_unsupported(args)?;
    supervisor::supervise(&region, &inherit, sink, &options, hooks)
}

/// The disk image, if the guest writes it (then it is kept as of the local checkpoint).
fn written_disk(vm: &run_cmd::VmArgs) -> Option<&std::path::Path> {
    vm.disk.as_deref().filter(|_| !vm.disk_read_only)
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A monitor: take the VM over from the region (or boot it), run it, tell the keeper its end.
fn run_monitor(args: &RunArgs, inherited: Inherited) -> Result<i32> {
    let t0 = std::time::Instant::now();
    let _faults = vmm::keeper::fault::setup();
    let vm = &args.vm;
    let mut config = run_cmd::machine_config(vm, &args.command)?;
    let disk = match (inherited.disk, written_disk(vm)) {
        (Some(journal), Some(path)) => Some(DiskJournal::open(journal, path)?),
        (None, Some(_)) => bail!("the keeper passed no disk journal for a written disk"),
        _ => None,
    };
    // The guest's writes since the local checkpoint stay in an overlay that dies with
    // this monitor; each checkpoint folds them into the image.
    config.disk_overlay = disk.is_some();
    let t1 = t0.elapsed();
    let region_fd = inherited.region.try_clone().context("cannot duplicate the region's descriptor")?;
    let region = Region::open(inherited.region, vm.mem);
    let started = match region.map_err(monitor::RecoverError::from).and_then(|r| monitor::start(r, &config, disk)) {
        Ok(started) => started,
        Err(e) => {
            let verdict = e.verdict();
            let text = format!("{:#}", anyhow::Error::new(e));
            eprintln!("ftvm: monitor: cannot take the VM over: {text}");
            return Ok(monitor::give_up(&region_fd, vm.mem, verdict, &text));
        }
    };
    if std::env::var_os("FTVM_KEEPER_TIMING").is_some() {
        eprintln!("ftvm: monitor: config {t1:?}, started {:?} (recovered {})", t0.elapsed(), started.recovered);
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let interactive = args.command.is_empty();
    let mut tap = match (inherited.tap, &vm.net) {
        (Some(fd), Some(spec)) => Some(Tap::from_fd(fd, run_cmd::tap_name(spec)?)),
        _ => None,
    };
    let mut sink = StreamSink::new(inherited.stream);
    let (mut machine, mut mode) = (started.machine, started.monitor);
    if started.recovered {
        // Keys, frames and requests that arrive meanwhile wait in the terminal, the TAP
        // queue, the API backlog: no reader runs yet.
        if let Err(e) = mode.replay(&mut machine, started.inputs, &mut sink, tap.as_mut()) {
            let text = format!("{e:#}");
            eprintln!("ftvm: monitor: cannot take the VM over: {text}");
            return Ok(monitor::give_up(&region_fd, vm.mem, Verdict::ReplayDiverged, &text));
        }
    }
    let mut driver = Driver::new(machine, rx, vm.clock.into());
    driver.set_mode(Box::new(mode));
    if interactive {
        console::spawn_reader(tx.clone());
    }
    if let Some(tap) = &tap {
        tap.spawn_reader(tx.clone()).context("cannot start the TAP reader")?;
    }
    let _api = inherited.api.map(|fd| crate::api::serve_listener(UnixListener::from(fd), None, tx.clone()));
    driver.events_possible = interactive || tap.is_some() || vm.api.is_some();
    if vm.api.is_some() {
        driver.events_tx = Some(tx.clone());
    }
    driver.tap = tap.take();
    if let Some(seed) = vm.seed {
        driver.entropy = vmm::host::EntropySource::seeded(seed);
    }
    drop(tx);
    let outcome = driver.run(&mut sink)?;
    let code = run_cmd::exit_status(outcome)?;
    sink.end(code).context("cannot tell the keeper that the VM ended")?;
    Ok(code)
}

/// The keeper's report: each restart, and how the run ended (typed, for tests and tools).
fn write_report(path: &std::path::Path, end: &End, restarts: &[Restart]) -> Result<()> {
    let restarts: Vec<_> = restarts.iter().map(restart_json).collect();
    let end = match end {
        End::Exited(code) => serde_json::json!({ "kind": "exited", "code": code }),
        End::CannotRecover { verdict, message } => serde_json::json!({
            "kind": match verdict { Verdict::RegionCorrupt => "region_corrupt", Verdict::ReplayDiverged => "replay_diverged", Verdict::None => "cannot_recover" },
            "message": message,
        }),
        End::Poison { attempts, icount, input } => {
            serde_json::json!({ "kind": "poison", "attempts": attempts, "icount": icount, "input": input })
        }
        End::TooManyRestarts(n) => serde_json::json!({ "kind": "too_many_restarts", "restarts": n }),
        End::Stopped => serde_json::json!({ "kind": "stopped" }),
    };
    let report = serde_json::json!({ "end": end, "restarts": restarts });
    std::fs::write(path, serde_json::to_vec_pretty(&report).expect("JSON values serialize"))
        .with_context(|| format!("cannot write the keeper's report to {}", path.display()))
}

pub fn restart_json(r: &Restart) -> serde_json::Value {
    let ms = |ns: Option<u64>| ns.map(|ns| ns.saturating_sub(r.detected_ns) as f64 / 1e6);
    serde_json::json!({
        "attempt": r.attempt,
        "cause": r.cause.to_string(),
        "icount": r.icount,
        "running_ms": ms(r.running_ns),
        "first_output_ms": ms(r.first_output_ns),
        "replayed_inputs": r.replayed_inputs,
        "replayed_icount": r.replayed_icount,
    })
}
