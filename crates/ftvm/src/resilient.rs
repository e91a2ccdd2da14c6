//! `ftvm run --resilient`: the keeper, and the monitor it runs (this binary again, told
//! by the environment which descriptors it inherited). The logic is in `vmm::keeper`;
//! this wires the terminal, the TAP device and the API socket to it, answers the keeper's
//! part of the control API (rejuvenate, upgrade, the keeper's status), and re-executes the
//! keeper for an upgrade.

use crate::api::{Command, ControlRequest, HandoverRequest, Reply};
use crate::backup_cmd::BackupArgs;
use crate::run_cmd::{self, CommandConsole, RunArgs, TerminalConsole};
use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::sync::mpsc::{Receiver, Sender};
use std::time::Duration;
use vmm::driver::{ConsoleSink, Driver};
use vmm::host::{console, tap::Tap, HostEvent};
use vmm::keeper::region::{self, HandoverKind, HandoverState, Live, Region, Verdict};
use vmm::keeper::replicated::{ReplicatedMonitor, Watched};
use vmm::keeper::stream::Parser;
use vmm::keeper::supervisor::{self, End, Hooks, Inherit, MonitorProc, NoHooks, Restart, Upgrade};
use vmm::keeper::{disk::DiskJournal, monitor, stream::StreamSink, Inherited};

/// How a keeper supervises its monitors (`ftvm run --resilient`, `ftvm backup --resilient`).
#[derive(clap::Args, Debug, Clone)]
pub struct KeeperArgs {
    /// With --resilient: a monitor whose heartbeat stands still this long is restarted
    #[arg(long, value_name = "MS", default_value_t = 1000, requires = "resilient")]
    pub hang_ms: u64,
    /// With --resilient: stop once the monitor failed this many times in a row at the same
    /// instruction (a poison input; a backup's: as it applies a checkpoint)
    #[arg(long, value_name = "N", default_value_t = 3, requires = "resilient",
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub poison_attempts: u32,
    /// With --resilient: write the keeper's report (each restart, how the run ended) as JSON to FILE
    #[arg(long, value_name = "FILE", requires = "resilient")]
    pub keeper_report: Option<std::path::PathBuf>,
    /// With --resilient: hand the VM to a fresh monitor this often (rejuvenation, as `ftvm ctl
    /// rejuvenate`), e.g. 30s, 10m, 500ms
    #[arg(long, value_name = "DURATION", requires = "resilient", value_parser = parse_duration)]
    pub rejuvenate_every: Option<Duration>,
    /// With --resilient: start each monitor only when it is needed, not one ahead with its
    /// machine built (a restart then also builds the machine; less memory)
    #[arg(long, requires = "resilient")]
    pub no_spare: bool,
}

impl KeeperArgs {
    fn options(&self) -> supervisor::Options {
        supervisor::Options {
            hang_ms: self.hang_ms,
            poison_attempts: self.poison_attempts,
            rejuvenate_every: self.rejuvenate_every,
            spare: !self.no_spare,
            ..supervisor::Options::default()
        }
    }

    /// Write the keeper's report if asked, then the keeper's exit status.
    fn end(&self, (end, restarts, handovers): (End, Vec<Restart>, u64)) -> Result<i32> {
        if let Some(path) = &self.keeper_report {
            write_report(path, &end, &restarts, handovers)?;
        }
        match end {
            End::Exited(code) => Ok(code),
            other => bail!("{other}"),
        }
    }
}

pub fn run(args: RunArgs) -> Result<i32> {
    refuse_unsupported(&args)?;
    if let Some(inherited) = vmm::keeper::inherited()? {
        return run_monitor(&args, inherited);
    }
    let resume = Resume::from_env()?;
    let mut sink: Box<dyn KeptConsole> = match (args.command.is_empty(), &resume) {
        (true, _) => Box::new(TerminalConsole),
        (false, Some(resume)) => Box::new(CommandConsole::from_state(args.boot_log, &resume.console)),
        (false, None) => Box::new(CommandConsole::new(args.boot_log)),
    };
    let monitor_args = std::env::args_os().skip(1).collect();
    let keeping = Keeping::of(&args);
    args.keeper.end(keep_with(&keeping, monitor_args, &mut *sink, &mut NoHooks, resume)?)
}

fn refuse_unsupported(args: &RunArgs) -> Result<()> {
    if args.replication.replicate_to.is_none() && args.replication.ownership.store.is_some() {
        bail!("--resilient takes --store only with --replicate-to for now (docs/microreboot.md)");
    }
    Ok(())
}

/// A keeper's console, whose state a keeper re-executed for an upgrade takes on.
pub trait KeptConsole: ConsoleSink {
    fn state(&self) -> String {
        String::new()
    }
}

impl KeptConsole for TerminalConsole {}

impl KeptConsole for CommandConsole {
    fn state(&self) -> String {
        self.encode_state()
    }
}

/// Supervise monitors started as `ftvm MONITOR_ARGS` (a `run --resilient` command line).
pub fn keep(
    args: &RunArgs,
    monitor_args: Vec<OsString>,
    sink: &mut dyn KeptConsole,
    hooks: &mut dyn Hooks,
) -> Result<(End, Vec<Restart>)> {
    keep_with(&Keeping::of(args), monitor_args, sink, hooks, None).map(|(end, restarts, _)| (end, restarts))
}

/// What a keeper keeps: the VM, the guest's command, how monitors are supervised, and for
/// a backup the address it listens on (the socket is the keeper's).
struct Keeping<'a> {
    vm: &'a run_cmd::VmArgs,
    command: &'a [String],
    options: supervisor::Options,
    listen: Option<&'a str>,
    /// A replicated primary: its monitors record what they sent (`vmm::keeper::sent`).
    replicated: bool,
}

impl Keeping<'_> {
    fn of(args: &RunArgs) -> Keeping<'_> {
        Keeping {
            vm: &args.vm,
            command: &args.command,
            options: args.keeper.options(),
            listen: None,
            replicated: args.replication.replicate_to.is_some(),
        }
    }
}

/// The keeper: own the region, the terminal, the TAP device, the disk journal, the API
/// socket and a backup's listening socket (or take them on from the keeper this one was
/// before an upgrade); run monitors until the VM ends. Also returns the planned handovers done.
fn keep_with(
    keeping: &Keeping,
    monitor_args: Vec<OsString>,
    sink: &mut dyn KeptConsole,
    hooks: &mut dyn Hooks,
    resume: Option<Resume>,
) -> Result<(End, Vec<Restart>, u64)> {
    let vm = keeping.vm;
    run_cmd::machine_config(vm, keeping.command)?; // a missing kernel is refused before anything starts
    let (region, fds, mut adopted) = match resume {
        Some(resume) => (Region::open(resume.region, vm.mem)?, resume.fds, Some(resume.monitor)),
        None => {
            let region = Region::create(vm.mem)?;
            let mut fds = Vec::new();
            if let Some(tap) = run_cmd::open_tap(vm)? {
                fds.push(("tap", tap.into_fd()));
            }
            if written_disk(vm).is_some() {
                fds.push(("disk", vmm::keeper::disk::create_journal()?));
            }
            if let Some(path) = &vm.api {
                fds.push(("api", OwnedFd::from(crate::api::bind(path)?)));
            }
            if let Some(listen) = keeping.listen {
                let addr = vmm::replicate::resolve(listen)?;
                let listener = std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
                eprintln!("ftvm backup: waiting for a primary on {addr} (a resilient backup's keeper)");
                fds.push(("listen", OwnedFd::from(listener)));
            }
            if keeping.replicated {
                fds.push(("sent", vmm::keeper::sent::create(vm.mem)?));
            }
            (region, fds, None)
        }
    };
    let _api = vm.api.clone().map(RemoveOnDrop);
    // A backup's terminal stays as it is (its monitor attaches the console when it takes over).
    let interactive = keeping.command.is_empty() && keeping.listen.is_none();
    let mut raw = interactive.then(console::RawMode::enter);
    let inherit = Inherit {
        exe: std::env::current_exe().context("cannot find this ftvm binary to start the monitor")?,
        args: monitor_args.clone(),
        fds,
    };
    loop {
        let (end, restarts) = supervisor::supervise(&region, &inherit, sink, &keeping.options, hooks, adopted.take())?;
        let End::Upgrade(up) = end else { return Ok((end, restarts, region.live(Live::Handovers))) };
        drop(raw.take()); // the terminal as it was: the new keeper enters raw mode again
        let err = exec_keeper(&up, &region, &inherit, &monitor_args, sink.state());
        // Still here: the exec failed; the running monitor carries on under this keeper.
        raw = interactive.then(console::RawMode::enter);
        supervisor::fail_handover(&region, &format!("cannot execute {}: {err}", up.binary.display()));
        adopted = Some(up.monitor);
    }
}

/// The environment variable carrying a command-mode console's state across an upgrade.
const ENV_CONSOLE: &str = "FTVM_KEEPER_CONSOLE";

/// Become the new binary's keeper (exec keeps the descriptors and the running monitor,
/// our child); returns only if that fails.
fn exec_keeper(up: &Upgrade, region: &Region, inherit: &Inherit, args: &[OsString], console: String) -> std::io::Error {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let m = &up.monitor;
    if let Err(e) = fcntl(m.pipe.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty())) {
        return e.into();
    }
    let mut spec = format!(
        "region={},monitor={},pipe={},attempt={},parser={}",
        region.fd().as_raw_fd(),
        m.pid,
        m.pipe.as_raw_fd(),
        m.attempt,
        m.parser.encode()
    );
    for (name, fd) in &inherit.fds {
        spec.push_str(&format!(",{name}={}", fd.as_raw_fd()));
    }
    let err = std::process::Command::new(&up.binary)
        .args(args)
        .env(supervisor::ENV_RESUME, spec)
        .env(ENV_CONSOLE, console)
        .exec();
    let _ = fcntl(m.pipe.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    err
}

/// What a keeper re-executed for an upgrade takes on from its former self.
struct Resume {
    region: OwnedFd,
    fds: Vec<(&'static str, OwnedFd)>,
    monitor: MonitorProc,
    console: String,
}

impl Resume {
    fn from_env() -> Result<Option<Resume>> {
        let Ok(spec) = std::env::var(supervisor::ENV_RESUME) else { return Ok(None) };
        let console = std::env::var(ENV_CONSOLE).unwrap_or_default();
        let bad = || anyhow::anyhow!("{}={spec:?} is malformed", supervisor::ENV_RESUME);
        let (mut region, mut pid, mut pipe, mut attempt, mut parser, mut fds) = (None, None, None, 1, None, Vec::new());
        for part in spec.split(',') {
            let (name, value) = part.split_once('=').ok_or_else(bad)?;
            match name {
                "region" => region = Some(adopt_fd(value)?),
                "pipe" => pipe = Some(adopt_fd(value)?),
                "monitor" => pid = Some(nix::unistd::Pid::from_raw(value.parse().map_err(|_| bad())?)),
                "attempt" => attempt = value.parse().map_err(|_| bad())?,
                "parser" => parser = Some(Parser::decode(value).ok_or_else(bad)?),
                "tap" => fds.push(("tap", adopt_fd(value)?)),
                "api" => fds.push(("api", adopt_fd(value)?)),
                "disk" => fds.push(("disk", adopt_fd(value)?)),
                "listen" => fds.push(("listen", adopt_fd(value)?)),
                "sent" => fds.push(("sent", adopt_fd(value)?)),
                _ => return Err(bad()),
            }
        }
        let pipe = std::fs::File::from(pipe.ok_or_else(bad)?);
        nix::fcntl::fcntl(pipe.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))?;
        let monitor = MonitorProc { pid: pid.ok_or_else(bad)?, pipe, parser: parser.unwrap_or_default(), attempt };
        Ok(Some(Resume { region: region.ok_or_else(bad)?, fds, monitor, console }))
    }
}

/// A descriptor a former keeper passed on by number.
fn adopt_fd(text: &str) -> Result<OwnedFd> {
    let fd: i32 = text.parse().with_context(|| format!("{text:?} is not a descriptor"))?;
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).with_context(|| format!("descriptor {fd} is not open"))?;
    // SAFETY: the keeper this process was before exec passed this open descriptor (checked
    // just above) to it alone; nothing else here owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `ftvm handover-check --version N`: whether this binary reads handover state version N
/// (`FTVM_TEST_HANDOVER_VERSION` makes it claim another version, for tests).
pub fn handover_check(version: u32) -> Result<()> {
    let reads =
        std::env::var("FTVM_TEST_HANDOVER_VERSION").ok().and_then(|v| v.parse().ok()).unwrap_or(region::VERSION);
    if reads != version {
        bail!("this ftvm reads handover state version {reads}; the running VM's handover state is version {version}");
    }
    println!("{} {version}", supervisor::HANDOVER_CHECK_ANSWER);
    Ok(())
}

/// A duration as `--rejuvenate-every` takes it: `500ms`, `30s`, `10m`, `2h` (seconds without a unit).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().map_err(|_| format!("{text:?} is not a duration (e.g. 500ms, 30s, 10m)"))?;
    let seconds = match unit {
        "ms" => number / 1e3,
        "" | "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return Err(format!("{text:?}: the unit must be ms, s, m or h")),
    };
    if !(0.1..=1e7).contains(&seconds) {
        return Err(format!("{text:?}: between 100ms and 10000000s"));
    }
    Ok(Duration::from_secs_f64(seconds))
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

/// A monitor: take the VM over from the region (or boot it; or, a planned handover's
/// successor, from the old monitor), run it, tell the keeper its end.
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
    let live = Region::open(region_fd.try_clone()?, vm.mem)?; // the API thread's view of the live page
    let region = Region::open(inherited.region, vm.mem);
    let Some((built, woken_for_handover)) = wait_as_spare(inherited.wake, &live, &config)? else { return Ok(0) };
    let handover = woken_for_handover || std::env::var_os(supervisor::ENV_HANDOVER).is_some();
    let started = if handover {
        match region.map_err(monitor::RecoverError::from).map_err(monitor::HandoverError::from) {
            Ok(r) => match monitor::prepare(r, &config, disk, built) {
                Ok(started) => started,
                Err(e) => bail!("cannot take the VM over in the handover: {:#}", anyhow::Error::new(e)),
            },
            Err(e) => bail!("cannot take the VM over in the handover: {:#}", anyhow::Error::new(e)),
        }
    } else {
        match region.map_err(monitor::RecoverError::from).and_then(|r| monitor::start(r, &config, disk, built)) {
            Ok(started) => started,
            Err(e) => {
                let verdict = e.verdict();
                let text = format!("{:#}", anyhow::Error::new(e));
                eprintln!("ftvm: monitor: cannot take the VM over: {text}");
                return Ok(monitor::give_up(&region_fd, vm.mem, verdict, &text));
            }
        }
    };
    if std::env::var_os("FTVM_KEEPER_TIMING").is_some() {
        eprintln!("ftvm: monitor: config {t1:?}, started {:?} (recovered {})", t0.elapsed(), started.recovered);
    }
    let mut tap = match (inherited.tap, &vm.net) {
        (Some(fd), Some(spec)) => Some(Tap::from_fd(fd, run_cmd::tap_name(spec)?)),
        _ => None,
    };
    let mut sink = StreamSink::new(inherited.stream);
    if args.replication.replicate_to.is_some() {
        let host = Host { tap, api: inherited.api, live };
        return run_replicated(args, &config, started, sink, host, (&region_fd, inherited.sent));
    }
    let attached = Attached { vm, command: &args.command, attach: run_cmd::Attach::Now };
    let (tx, rx) = std::sync::mpsc::channel();
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
    let outcome = run_attached(driver, &attached, tap, inherited.api, live, tx, &mut sink)?;
    end_monitor(outcome, sink, &region_fd, vm.mem)
}

/// A spare (`wake`, its wake pipe): build the machine now, touching nothing in the region,
/// and wait until the keeper needs it. None: not needed after all (the keeper let it go);
/// else the machine (None when not a spare) and whether it was woken as a planned
/// handover's successor (else to recover).
fn wait_as_spare(
    wake: Option<std::fs::File>,
    live: &Region,
    config: &machine::MachineConfig,
) -> Result<Option<(Option<monitor::Built>, bool)>> {
    let Some(mut wake) = wake else { return Ok(Some((None, false))) };
    let built = monitor::build(live, config).context("the spare monitor cannot build its machine")?;
    let handover = match vmm::keeper::wait_to_be_woken(&mut wake)? {
        Some(vmm::keeper::Wake::Recover) => false,
        Some(vmm::keeper::Wake::Handover) => true,
        None => return Ok(None),
    };
    let _ = nix::sys::prctl::set_name(supervisor::SPARE_AWAKE_NAME); // no longer a spare that waits
    Ok(Some((Some(built), handover)))
}

/// How a monitor's driver meets the host: the VM's options, the guest's command, and when
/// the terminal and the TAP device start reaching it.
struct Attached<'a> {
    vm: &'a run_cmd::VmArgs,
    command: &'a [String],
    attach: run_cmd::Attach,
}

/// Attach the inherited terminal, TAP device and API socket to a monitor's driver (only
/// now: what arrived during a recovery waited in their queues; a backup's terminal and
/// TAP device when it takes over) and run it.
fn run_attached<V: vmm::vm::Vm + 'static>(
    mut driver: Driver<V>,
    attached: &Attached,
    tap: Option<Tap>,
    api: Option<std::os::fd::OwnedFd>,
    live: Region,
    tx: std::sync::mpsc::Sender<vmm::host::HostEvent>,
    sink: &mut StreamSink,
) -> Result<vmm::driver::Outcome> {
    let vm = attached.vm;
    let interactive = attached.command.is_empty();
    match attached.attach {
        run_cmd::Attach::Now => {
            if interactive {
                console::spawn_reader(tx.clone());
            }
            if let Some(tap) = &tap {
                tap.spawn_reader(tx.clone()).context("cannot start the TAP reader")?;
            }
        }
        run_cmd::Attach::AtGoLive { mac } => {
            // The TAP's frames meanwhile were meant for the primary's guest: thrown away.
            let tap = tap.as_ref().map(Tap::clone_handle).transpose()?;
            let events = tx.clone();
            driver.on_go_live(Box::new(move |_| {
                if interactive {
                    console::spawn_reader(events.clone());
                }
                let Some(tap) = &tap else { return };
                let attached = tap
                    .discard_pending()
                    .context("cannot empty the TAP device's queue")
                    .and_then(|_| tap.spawn_reader(events.clone()).context("cannot start the TAP reader"))
                    .and_then(|()| tap.clone_handle().context("cannot announce the MAC"));
                match attached {
                    Ok(announce) => vmm::host::announce::spawn_announcer(announce, mac),
                    Err(e) => vmm::log::warn(format_args!("{e:#}")),
                }
            }));
        }
    }
    let replicated = driver.replicating();
    let _api = api.map(|fd| {
        let (api_tx, api_rx) = std::sync::mpsc::channel();
        let driver_tx = tx.clone();
        std::thread::spawn(move || answer_keeper_part(api_rx, driver_tx, live));
        crate::api::serve_listener(UnixListener::from(fd), None, api_tx)
    });
    driver.events_possible = interactive || tap.is_some() || vm.api.is_some() || replicated;
    if vm.api.is_some() {
        driver.events_tx = Some(tx.clone());
    }
    driver.tap = tap;
    if let Some(seed) = vm.seed {
        driver.entropy = vmm::host::EntropySource::seeded(seed);
    }
    drop(tx);
    Ok(driver.run(sink)?)
}

/// What a monitor attaches once the VM runs: the TAP device, the API socket, the live page.
struct Host {
    tap: Option<Tap>,
    api: Option<std::os::fd::OwnedFd>,
    live: Region,
}

/// This keeper's name in the VM's ownership record (`role` primary or backup): the same
/// for each of its monitors, so that a restarted one knows the record it finds as its own.
fn keeper_replica_name(role: &str) -> String {
    let host = nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "host".into());
    format!("{role}-{host}-{}", nix::unistd::getppid())
}

/// A replicated primary's monitor: take the VM's ownership record up (claimed by a fresh
/// VM; resumed at the generation it holds by a restarted monitor, which stops if another
/// replica took the VM over meanwhile), recover, and replicate on to the backup with the
/// outputs the recovery replayed held for output commit.
fn run_replicated(
    args: &RunArgs,
    config: &machine::MachineConfig,
    started: monitor::Started,
    mut sink: StreamSink,
    host: Host,
    (region_fd, sent): (&std::os::fd::OwnedFd, Option<OwnedFd>),
) -> Result<i32> {
    let Host { tap, api, live } = host;
    use vmm::replicate::Ownership;
    let mem = args.vm.mem;
    let options = crate::replication_args::options(&args.replication)?;
    let mut spec = args.replication.ownership.spec();
    spec.replica_name.get_or_insert_with(|| keeper_replica_name("primary"));
    let mut ownership = Ownership::open(&spec, config, "primary")?.context("--replicate-to needs --store")?;
    let taken_up = if started.recovered { ownership.resume() } else { ownership.claim_for_start() };
    if let Some(code) = superseded(taken_up, region_fd, mem)? {
        return Ok(code);
    }
    let (mut machine, mut monitor) = (started.machine, started.monitor);
    monitor.count_frames_on_release();
    // What the checkpoint held for output commit comes first (what of it had not left).
    let mut held = monitor.pass_held(started.held);
    if started.recovered {
        let replayed = monitor.replay_into(&mut machine, started.inputs, &mut |output| {
            held.push(output);
            Ok(())
        });
        match replayed {
            Ok((inputs, icount)) => monitor.running(inputs, icount),
            Err(e) => {
                let text = format!("{e:#}");
                eprintln!("ftvm: monitor: cannot take the VM over: {text}");
                return Ok(monitor::give_up(region_fd, mem, Verdict::ReplayDiverged, &text));
            }
        }
    }
    let (tx, rx) = std::sync::mpsc::channel();
    // What the run sent is recorded for a monitor restarted after this one: it takes the
    // run up again with one incremental checkpoint. Not with a written disk (its sectors are
    // not recorded): a restart then sends a full checkpoint.
    let record = sent.map(|fd| vmm::keeper::sent::SentRecord::open(fd, mem)).transpose()?;
    let resume = match (&record, started.recovered && written_disk(&args.vm).is_none()) {
        (Some(record), true) => record.resumable(),
        _ => None,
    };
    if let Some(r) = &resume {
        eprintln!(
            "ftvm: monitor: taking run {:x} up again after epoch {} ({} pages since epoch {})",
            r.run_id,
            r.last_epoch,
            r.pages.len(),
            r.since_epoch
        );
    }
    let mut vm = Watched::new(machine);
    if let Some(record) = record {
        vm.record_into(record);
    }
    let vm_id = ownership.vm_id.clone();
    let mode = ReplicatedMonitor::start(monitor, &mut vm, held, options, ownership, tx.clone(), resume)?;
    let mut driver = Driver::new(vm, rx, args.vm.clock.into());
    driver.vm_id = Some(vm_id);
    driver.set_mode(Box::new(mode));
    let attached = Attached { vm: &args.vm, command: &args.command, attach: run_cmd::Attach::Now };
    let outcome = run_attached(driver, &attached, tap, api, live, tx, &mut sink)?;
    end_monitor(outcome, sink, region_fd, mem)
}

/// Why `ctl protect` is refused on a `--resilient` VM.
pub const PROTECT_REFUSED: &str = "a --resilient VM cannot be protected yet: its keeper does not keep a replication \
     connection across monitor restarts (docs/microreboot.md); give it its backup when it starts (--replicate-to)";

/// Why `ctl migrate` is refused on a `--resilient` VM.
pub const MIGRATE_REFUSED: &str = "a --resilient VM cannot be migrated yet: its keeper would take the monitor's end \
     after the switchover for a crash (docs/microreboot.md); start the VM without --resilient to migrate it";

/// Between the API and the driver: answer what is the keeper's (handovers, the keeper's part
/// of the status, the refusal of protect), pass the rest on.
fn answer_keeper_part(api: Receiver<HostEvent>, driver: Sender<HostEvent>, live: Region) {
    for event in api {
        let HostEvent::Control(request) = event else {
            if driver.send(event).is_err() {
                return;
            }
            continue;
        };
        let reply = match &request.command {
            Command::Protect(_) => Reply::error(409, PROTECT_REFUSED),
            // The monitor would end after handing the VM away, and the keeper would start it again.
            Command::Migrate(_) => Reply::error(409, MIGRATE_REFUSED),
            Command::Handover(handover) => ask_handover(&live, handover),
            Command::Status => {
                let (tx, rx) = std::sync::mpsc::channel();
                if driver.send(HostEvent::Control(ControlRequest { command: Command::Status, reply: tx })).is_err() {
                    return;
                }
                match rx.recv_timeout(Duration::from_secs(30)) {
                    Ok(mut reply) => {
                        if let Some(body) = reply.body.as_object_mut() {
                            body.insert("keeper".to_string(), keeper_status(&live));
                        }
                        reply
                    }
                    Err(_) => Reply::error(503, "the VM did not answer"),
                }
            }
            _ => {
                if driver.send(HostEvent::Control(request)).is_err() {
                    return;
                }
                continue;
            }
        };
        let _ = request.reply.send(reply);
    }
}

/// `rejuvenate` / `upgrade`: asked of the keeper through the live page.
fn ask_handover(live: &Region, handover: &HandoverRequest) -> Reply {
    let (kind, text) = match handover {
        HandoverRequest::Rejuvenate => (HandoverKind::Rejuvenate, String::new()),
        HandoverRequest::Upgrade { binary } => {
            if !binary.is_absolute() || !binary.is_file() {
                return Reply::error(400, format!("{} is not an ftvm binary's absolute path", binary.display()));
            }
            let text = binary.to_string_lossy().into_owned();
            if text.len() > region::REQUEST_CAP {
                return Reply::error(400, format!("the binary's path is longer than {} bytes", region::REQUEST_CAP));
            }
            (HandoverKind::Upgrade, text)
        }
    };
    match supervisor::request_handover(live, kind, &text) {
        Some(seq) => Reply::ok(serde_json::json!({ "handover": seq, "kind": kind.name(), "state": "requested" })),
        None => Reply::error(409, "a handover is already under way"),
    }
}

/// The keeper's part of `GET /status`.
fn keeper_status(live: &Region) -> serde_json::Value {
    let state = HandoverState::from_u64(live.live(Live::HandoverState));
    serde_json::json!({
        "monitor": live.live(Live::Attempt),
        "handovers": live.live(Live::Handovers),
        "handover": {
            "seq": live.live(Live::HandoverSeq),
            "kind": HandoverKind::from_u64(live.live(Live::HandoverKind)).name(),
            "state": state.name(),
            "pause_ms": live.live(Live::HandoverPauseUs) as f64 / 1e3,
            "final_checkpoint_ms": live.live(Live::HandoverCheckpointUs) as f64 / 1e3,
            "outcome": live.outcome(),
        },
    })
}

/// The keeper's report: each restart, and how the run ended (typed, for tests and tools).
fn write_report(path: &std::path::Path, end: &End, restarts: &[Restart], handovers: u64) -> Result<()> {
    let restarts: Vec<_> = restarts.iter().map(restart_json).collect();
    let end = match end {
        End::Exited(code) => serde_json::json!({ "kind": "exited", "code": code }),
        End::CannotRecover { verdict, message } => serde_json::json!({
            "kind": match verdict {
                Verdict::RegionCorrupt => "region_corrupt",
                Verdict::ReplayDiverged => "replay_diverged",
                Verdict::Superseded => "superseded",
                Verdict::None => "cannot_recover",
            },
            "message": message,
        }),
        End::Poison { attempts, icount, input } => {
            serde_json::json!({ "kind": "poison", "attempts": attempts, "icount": icount, "input": input })
        }
        End::TooManyRestarts(n) => serde_json::json!({ "kind": "too_many_restarts", "restarts": n }),
        End::Stopped => serde_json::json!({ "kind": "stopped" }),
        End::Upgrade(up) => serde_json::json!({ "kind": "upgrading", "binary": up.binary }),
    };
    let report = serde_json::json!({ "end": end, "restarts": restarts, "handovers": handovers });
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

/// `ftvm backup --resilient`: the keeper (it owns the listening socket, the TAP device, the
/// API socket and the region), or the backup's monitor it runs.
pub fn run_backup(args: BackupArgs) -> Result<i32> {
    if args.vm.disk.is_some() {
        bail!("ftvm backup --resilient does not take --disk yet (docs/microreboot.md)");
    }
    if let Some(inherited) = vmm::keeper::inherited()? {
        return run_backup_monitor(&args, inherited);
    }
    let resume = Resume::from_env()?;
    let mut sink = TerminalConsole;
    let monitor_args = std::env::args_os().skip(1).collect();
    let keeping = Keeping {
        vm: &args.vm,
        command: &[],
        options: args.keeper.options(),
        listen: Some(&args.listen),
        replicated: false,
    };
    args.keeper.end(keep_with(&keeping, monitor_args, &mut sink, &mut NoHooks, resume)?)
}

/// A backup's monitor: take the backup's state up from the region (or, if this backup took
/// the VM over before, the VM's), and wait for the primary on the keeper's listener.
fn run_backup_monitor(args: &BackupArgs, inherited: Inherited) -> Result<i32> {
    use vmm::keeper::resilient_backup::{self as rb, BackupMonitor, Found};
    let _faults = vmm::keeper::fault::setup();
    let vm = &args.vm;
    let config = run_cmd::machine_config(vm, &[])?;
    let region_fd = inherited.region.try_clone().context("cannot duplicate the region's descriptor")?;
    let live = Region::open(region_fd.try_clone()?, vm.mem)?;
    let mut spec = args.ownership.spec();
    spec.replica_name.get_or_insert_with(|| keeper_replica_name("backup"));
    let ownership = vmm::replicate::Ownership::open(&spec, &config, "backup")?
        .context("ftvm backup needs --store (the ownership store the primary uses)")?;
    let tap = match (inherited.tap, &vm.net) {
        (Some(fd), Some(spec)) => Some(Tap::from_fd(fd, run_cmd::tap_name(spec)?)),
        _ => None,
    };
    let sink = StreamSink::new(inherited.stream);
    // A spare builds its machine now and waits, touching nothing in the region, until the
    // keeper needs it (to recover, or as a planned handover's successor).
    let Some((built, woken_for_handover)) = wait_as_spare(inherited.wake, &live, &config)? else { return Ok(0) };
    let handover = woken_for_handover || std::env::var_os(supervisor::ENV_HANDOVER).is_some();
    let host = Host { tap, api: inherited.api, live };
    let region = Region::open(inherited.region, vm.mem).map_err(rb::BackupRecoverError::from);
    let found = match region {
        // A backup that took the VM over hands it over as any --resilient VM does.
        Ok(region) if handover && rb::holds_live_vm(&region).unwrap_or(false) => {
            let taken = TakenOver { region, handover: true, built };
            return run_taken_over(args, &config, taken, ownership, sink, host, &region_fd);
        }
        Ok(region) if handover => Ok(rb::prepare(region, &config, built).map_err(|e| {
            anyhow::anyhow!("cannot take the backup over in the handover: {:#}", anyhow::Error::new(e))
        })?),
        Ok(region) => rb::recover(region, &config, built),
        Err(e) => Err(e),
    };
    let (machine, kept, keeper) = match found {
        Ok(Found::Waiting { machine, kept, keeper }) => (machine, kept, keeper),
        Ok(Found::Live(region)) => {
            let taken = TakenOver { region, handover: false, built: None };
            return run_taken_over(args, &config, taken, ownership, sink, host, &region_fd);
        }
        Err(e) => {
            let verdict = e.verdict();
            let text = format!("{:#}", anyhow::Error::new(e));
            eprintln!("ftvm: monitor: cannot take the backup's state up: {text}");
            return Ok(monitor::give_up(&region_fd, vm.mem, verdict, &text));
        }
    };
    if let Some(kept) = &kept {
        eprintln!(
            "ftvm backup: resumed with epoch {} of run {:x} (icount {}), generation {:?}",
            kept.applied.epoch,
            kept.applied.run_id,
            kept.icount,
            kept.right.map(|r| r.generation)
        );
    }
    let listener = std::net::TcpListener::from(inherited.listen.context("the keeper passed no listening socket")?);
    let options = vmm::replicate::backup::BackupOptions {
        listener,
        key: vmm::replicate::load_key(&args.key)?,
        config_digest: vmm::replicate::replication_digest(&config, &ownership.vm_id),
        failover_timeout_ms: args.failover_timeout_ms,
        heartbeat_ms: args.heartbeat_ms,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let vm_id = ownership.vm_id.clone();
    let live_region = Region::open(region_fd.try_clone()?, vm.mem)?;
    let mode = BackupMonitor::start(options, ownership, tx.clone(), &machine, kept, keeper)?;
    let mut driver = Driver::new(machine, rx, vm.clock.into());
    driver.vm_id = Some(vm_id);
    driver.set_mode(Box::new(mode));
    driver.run_live_under(BackupMonitor::live_mode(live_region));
    let attached = Attached { vm, command: &[], attach: run_cmd::Attach::AtGoLive { mac: vm.mac } };
    let Host { tap, api, live } = host;
    let mut sink = sink;
    let outcome = run_attached(driver, &attached, tap, api, live, tx, &mut sink)?;
    end_monitor(outcome, sink, &region_fd, vm.mem)
}

/// The region of a VM this backup took over, and how a monitor takes it up: recovered
/// after a restart, or (`handover`) as a planned handover's successor; `built`: a spare's machine.
struct TakenOver {
    region: Region,
    handover: bool,
    built: Option<monitor::Built>,
}

/// How a monitor's taking up of the ownership record went: `Some(exit code)` when the record
/// has moved on (another replica owns it, or it runs elsewhere) — the monitor stops cleanly,
/// leaving that verdict in the region so the keeper does not restart it; None when this
/// replica holds the record.
fn superseded(
    taken_up: Result<u64, vmm::replicate::ReplicationError>,
    region_fd: &OwnedFd,
    mem: u64,
) -> Result<Option<i32>> {
    use vmm::replicate::ReplicationError;
    match taken_up {
        Ok(_) => Ok(None),
        Err(e @ (ReplicationError::Superseded { .. } | ReplicationError::RunningElsewhere { .. })) => {
            let text = e.to_string();
            eprintln!("ftvm: monitor: {text}");
            Ok(Some(monitor::give_up(region_fd, mem, Verdict::Superseded, &text)))
        }
        Err(e) => Err(e.into()),
    }
}

/// A backup's monitor after its backup took the VM over (a monitor before it died there,
/// or handed it over): the record must still be this replica's; the VM recovers from the
/// region and runs on.
fn run_taken_over(
    args: &BackupArgs,
    config: &machine::MachineConfig,
    taken: TakenOver,
    mut ownership: vmm::replicate::Ownership,
    mut sink: StreamSink,
    host: Host,
    region_fd: &OwnedFd,
) -> Result<i32> {
    let mem = args.vm.mem;
    if let Some(code) = superseded(ownership.resume(), region_fd, mem)? {
        return Ok(code);
    }
    let Host { mut tap, api, live } = host;
    let TakenOver { region, handover, built } = taken;
    let started = if handover {
        // A successor that cannot take over says why and ends: the keeper calls the
        // handover off, and the running monitor carries on.
        monitor::prepare(region, config, None, built)
            .map_err(|e| anyhow::anyhow!("cannot take the VM over in the handover: {:#}", anyhow::Error::new(e)))?
    } else {
        match monitor::start(region, config, None, built) {
            Ok(started) => started,
            Err(e) => {
                let verdict = e.verdict();
                let text = format!("{:#}", anyhow::Error::new(e));
                eprintln!("ftvm: monitor: cannot take the VM over: {text}");
                return Ok(monitor::give_up(region_fd, mem, verdict, &text));
            }
        }
    };
    let (mut machine, mut mode) = (started.machine, started.monitor);
    if started.recovered {
        if let Err(e) = mode.replay(&mut machine, started.inputs, &mut sink, tap.as_mut()) {
            let text = format!("{e:#}");
            eprintln!("ftvm: monitor: cannot take the VM over: {text}");
            return Ok(monitor::give_up(region_fd, mem, Verdict::ReplayDiverged, &text));
        }
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let mut driver = Driver::new(machine, rx, args.vm.clock.into());
    driver.vm_id = Some(ownership.vm_id.clone());
    driver.ownership = Some(ownership);
    driver.set_mode(Box::new(mode));
    let attached = Attached { vm: &args.vm, command: &[], attach: run_cmd::Attach::Now };
    let outcome = run_attached(driver, &attached, tap, api, live, tx, &mut sink)?;
    end_monitor(outcome, sink, region_fd, mem)
}

/// A monitor's end: told to the keeper; a monitor fenced off (another replica owns the VM)
/// says so, and the keeper does not start another.
fn end_monitor(outcome: vmm::driver::Outcome, mut sink: StreamSink, region_fd: &OwnedFd, mem: u64) -> Result<i32> {
    if let vmm::driver::Outcome::Fenced(message) = &outcome {
        eprintln!("ftvm: monitor: {message}");
        return Ok(monitor::give_up(region_fd, mem, Verdict::Superseded, message));
    }
    let code = run_cmd::exit_status(outcome)?;
    vmm::keeper::fault::point("keeper::vm-ended");
    sink.end(code).context("cannot tell the keeper that the VM ended")?;
    Ok(code)
}
