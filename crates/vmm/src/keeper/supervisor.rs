//! The keeper's loop: start a monitor (this binary again, with the descriptors it must
//! inherit), pass its console stream to the terminal counting what left, watch its
//! heartbeat, and start another when it dies or hangs — unless the region is corrupt, or
//! the monitor keeps dying at the same instruction (a poison input).
//! It holds no VM logic: what it knows of the VM is in the region's live page.

use super::region::{describe, HandoverKind, HandoverState, Live, Phase, Region, Verdict};
use super::stream::{Event, Parser};
use super::ENV_FDS;
use crate::driver::ConsoleSink;
use anyhow::{Context, Result};
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use std::ffi::OsString;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

/// How often the keeper looks at the heartbeat when the stream is quiet.
const TICK_MS: u16 = 5;

#[derive(Debug, Clone)]
pub struct Options {
    /// A heartbeat that stands still this long is a hang.
    pub hang_ms: u64,
    /// A monitor that dies this many times in a row at the same instruction count is not
    /// restarted again.
    pub poison_attempts: u32,
    /// At most this many restarts in all.
    pub max_restarts: u32,
    /// While a monitor starts or recovers (builds the machine, lays the image, replays),
    /// its heartbeat may stand still this long (at least `hang_ms`).
    pub start_grace_ms: u64,
    /// Hand the VM to a fresh monitor this often (`--rejuvenate-every`).
    pub rejuvenate_every: Option<Duration>,
    /// Keep a spare monitor started ahead, its machine built, for the next restart or
    /// handover (it then only lays the image, restores and replays).
    pub spare: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            hang_ms: 1000,
            poison_attempts: 3,
            max_restarts: 10_000,
            start_grace_ms: 5000,
            rejuvenate_every: None,
            spare: true,
        }
    }
}

/// What the keeper passes to every monitor.
pub struct Inherit {
    pub exe: std::path::PathBuf,
    pub args: Vec<OsString>,
    /// Descriptors by name (`tap`, `api`), besides the region and the stream.
    pub fds: Vec<(&'static str, OwnedFd)>,
}

/// How a monitor failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    Signal(String),
    Exit(i32),
    Hang,
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cause::Signal(s) => write!(f, "killed by {s}"),
            Cause::Exit(code) => write!(f, "exited with status {code}"),
            Cause::Hang => write!(f, "hung (no heartbeat)"),
        }
    }
}

/// One restart, as measured by the keeper.
#[derive(Debug, Clone)]
pub struct Restart {
    /// The monitor that failed (1 for the first).
    pub attempt: u32,
    pub cause: Cause,
    /// The instruction count at its last heartbeat.
    pub icount: u64,
    /// Wall clock (ns since the epoch): the failure seen; the new monitor running the guest.
    pub detected_ns: u64,
    pub running_ns: Option<u64>,
    /// The first console byte from the new monitor (ns since the epoch).
    pub first_output_ns: Option<u64>,
    pub replayed_inputs: u64,
    pub replayed_icount: u64,
    /// The recovery's steps (ns since the epoch; None when the new monitor did not reach
    /// them): the keeper started or woke the new monitor; it began (after its process
    /// start, or woken as a spare); built its machine; laid the image; restored the state.
    pub steps: Steps,
}

/// When a recovery reached each step (ns since the epoch), see [`Restart::steps`].
#[derive(Debug, Clone, Default)]
pub struct Steps {
    /// Whether the new monitor was a spare, started ahead.
    pub spare: bool,
    pub handed_ns: u64,
    pub begun_ns: Option<u64>,
    pub built_ns: Option<u64>,
    pub laid_ns: Option<u64>,
    pub restored_ns: Option<u64>,
}

/// How supervision ended.
#[derive(Debug)]
pub enum End {
    /// The VM ended; the monitor's exit status.
    Exited(i32),
    /// A monitor found it cannot recover the VM.
    CannotRecover {
        verdict: Verdict,
        message: String,
    },
    /// The monitor died `attempts` times at the same instruction count.
    Poison {
        attempts: u32,
        icount: u64,
        input: String,
    },
    TooManyRestarts(u32),
    /// The hooks asked to stop.
    Stopped,
    /// `ctl upgrade`: the new binary can read the handover state; the keeper re-executes
    /// itself with it, keeping the running monitor.
    Upgrade(Box<Upgrade>),
}

/// What a keeper re-executed for an upgrade takes on: the binary, and the monitor that
/// runs the guest meanwhile.
#[derive(Debug)]
pub struct Upgrade {
    pub binary: std::path::PathBuf,
    pub monitor: MonitorProc,
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Exited(code) => write!(f, "the VM ended (status {code})"),
            End::CannotRecover { verdict: Verdict::RegionCorrupt, message } => {
                write!(f, "the VM cannot be recovered: {message}")
            }
            End::CannotRecover { verdict: Verdict::Superseded, message } => write!(f, "{message}"),
            End::CannotRecover { message, .. } => write!(f, "the VM cannot be recovered: {message}"),
            End::Poison { attempts, icount, input } => write!(
                f,
                "the monitor failed {attempts} times in a row at icount {icount}, after {input}: a poison input; \
                 it is not restarted again"
            ),
            End::TooManyRestarts(n) => write!(f, "the monitor was restarted {n} times; giving up"),
            End::Stopped => write!(f, "stopped"),
            End::Upgrade(up) => write!(f, "upgrading to {}", up.binary.display()),
        }
    }
}

/// What a caller (a benchmark) may add to supervision.
pub trait Hooks {
    /// Extra environment for monitor `attempt` (1 for the first), e.g. `FAILPOINTS`.
    fn env(&mut self, _attempt: u32) -> Vec<(String, String)> {
        Vec::new()
    }
    /// A restart is complete (the new monitor ran the guest and produced output, or died).
    fn restarted(&mut self, _restart: &Restart) {}
    /// Looked at every tick: true stops supervision (the monitor is killed).
    fn stop(&mut self) -> bool {
        false
    }
    /// Console bytes as they leave.
    fn console(&mut self, _bytes: &[u8]) {}
    /// Looked at every tick: true kills the monitor now (SIGKILL from outside).
    fn kill_now(&mut self) -> bool {
        false
    }
    /// Monitor `attempt` runs the VM from now on (started for it, or a spare woken).
    fn started(&mut self, _attempt: u32) {}
}

pub struct NoHooks;
impl Hooks for NoHooks {}

pub fn now_ns() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
}

fn inheritable(fd: &impl AsRawFd) -> Result<()> {
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty())).context("cannot pass a descriptor to the monitor")?;
    Ok(())
}

/// The running state of supervision.
struct Keeper<'a> {
    region: &'a Region,
    sink: &'a mut dyn ConsoleSink,
    hooks: &'a mut dyn Hooks,
    restarts: Vec<Restart>,
    /// The last restart waits for the new monitor's first output.
    pending: bool,
    ended: Option<i32>,
    /// The last monitor started (1 for the first).
    attempt: u32,
    /// When the last handover ended (or supervision began), for `rejuvenate_every`.
    last_handover: Instant,
    /// A monitor started ahead, waiting to be woken (`Options::spare`).
    spare: Option<Spare>,
    spare_wanted: bool,
    /// The restart under way: how its new monitor was started.
    handed: Steps,
}

/// A spare monitor: it built its machine and waits for one byte on its wake pipe.
struct Spare {
    monitor: MonitorProc,
    wake: std::fs::File,
}

impl Drop for Keeper<'_> {
    fn drop(&mut self) {
        if let Some(spare) = self.spare.take() {
            spare.monitor.kill();
            let _ = spare.monitor.wait();
        }
    }
}

impl Keeper<'_> {
    fn on_event(&mut self, event: Event<'_>) -> std::io::Result<()> {
        match event {
            Event::Console(bytes) => {
                self.sink.write(bytes)?;
                self.sink.flush()?;
                let delivered = self.region.live(Live::ConsoleDelivered) + bytes.len() as u64;
                self.region.set_live(Live::ConsoleDelivered, delivered);
                self.hooks.console(bytes);
                if self.pending {
                    self.complete(Some(now_ns()));
                }
            }
            Event::Reset => {
                self.sink.rebooted()?;
                self.region.set_live(Live::ResetsDelivered, self.region.live(Live::ResetsDelivered) + 1);
            }
            Event::End(code) => self.ended = Some(code),
        }
        Ok(())
    }

    /// The last restart is over: the new monitor produced output (at `first_output_ns`) or died.
    fn complete(&mut self, first_output_ns: Option<u64>) {
        self.pending = false;
        let running_ns = self.running_ns();
        let (inputs, icount) = (self.region.live(Live::ReplayedInputs), self.region.live(Live::ReplayedIcount));
        let r = self.region;
        let step = |field: Live| Some(r.live(field)).filter(|&ns| ns != 0);
        let steps = Steps {
            begun_ns: step(Live::BegunNs),
            built_ns: step(Live::BuiltNs),
            laid_ns: step(Live::LaidNs),
            restored_ns: step(Live::RestoredNs),
            ..self.handed.clone()
        };
        let Some(restart) = self.restarts.last_mut() else { return };
        restart.first_output_ns = first_output_ns;
        restart.running_ns = running_ns;
        (restart.replayed_inputs, restart.replayed_icount) = (inputs, icount);
        restart.steps = steps;
        self.hooks.restarted(restart);
    }

    /// Monitor `attempt` runs the VM from now on: the live page's per-monitor fields are
    /// its (set before it can write them).
    fn activate(&mut self, attempt: u32, spare: bool) {
        let r = self.region;
        r.set_live(Live::Attempt, u64::from(attempt));
        r.set_live(Live::Phase, Phase::Starting as u64);
        r.set_live(Live::Verdict, Verdict::None as u64);
        r.set_live(Live::MessageLen, 0);
        for field in [Live::BegunNs, Live::BuiltNs, Live::LaidNs, Live::RestoredNs, Live::Waiting] {
            r.set_live(field, 0);
        }
        self.handed = Steps { spare, handed_ns: now_ns(), ..Steps::default() };
        self.hooks.started(attempt);
    }

    /// Wake the spare, if there is one and it is alive: `word` says what it does
    /// ([`WAKE_RECOVER`]: take the VM over; [`WAKE_HANDOVER`]: a planned handover's successor).
    fn wake_spare(&mut self, word: u8) -> Option<MonitorProc> {
        use std::io::Write as _;
        let mut spare = self.spare.take()?;
        if word == WAKE_RECOVER {
            self.activate(spare.monitor.attempt, true);
        }
        match spare.wake.write_all(&[word]) {
            Ok(()) => Some(spare.monitor),
            Err(e) => {
                // It died while it waited (its error is above): start one as before.
                eprintln!("ftvm: keeper: the spare monitor is gone ({e}); starting another");
                spare.monitor.kill();
                let _ = spare.monitor.wait();
                None
            }
        }
    }

    /// Start a spare if one is wanted and none waits: once the VM runs and no handover is
    /// under way, so that it does not slow a recovery down.
    fn keep_spare(&mut self, inherit: &Inherit, state: HandoverState) {
        let running = self.region.live(Live::Phase) == Phase::Running as u64;
        if !self.spare_wanted || self.spare.is_some() || !running || !state.settled() {
            return;
        }
        match spawn(self, inherit, Role::Spare) {
            Ok(spare) => self.spare = Some(spare.into_spare()),
            Err(e) => {
                eprintln!("ftvm: keeper: cannot start a spare monitor ({e:#}); monitors start when needed");
                self.spare_wanted = false;
            }
        }
    }

    fn running_ns(&self) -> Option<u64> {
        let phase = self.region.live(Live::Phase);
        (phase == Phase::Running as u64 || phase == Phase::Resuming as u64).then(|| self.region.live(Live::RunningNs))
    }
}

/// A monitor process: a child of this keeper (or of the binary this keeper was before an
/// upgrade re-executed it: exec keeps children), and its console stream.
#[derive(Debug)]
pub struct MonitorProc {
    pub pid: Pid,
    pub pipe: std::fs::File,
    pub parser: Parser,
    pub attempt: u32,
}

impl MonitorProc {
    fn kill(&self) {
        let _ = nix::sys::signal::kill(self.pid, nix::sys::signal::Signal::SIGKILL);
    }

    /// Reap it: how it ended.
    fn wait(&self) -> Result<Cause> {
        loop {
            match nix::sys::wait::waitpid(self.pid, None) {
                Ok(WaitStatus::Exited(_, code)) => return Ok(Cause::Exit(code)),
                Ok(WaitStatus::Signaled(_, signal, _)) => return Ok(Cause::Signal(signal.to_string())),
                Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e).context("cannot wait for the monitor"),
            }
        }
    }
}

/// Supervise monitors until the VM ends (or cannot go on). `adopted`: a monitor already
/// running (the one a keeper re-executed for an upgrade kept).
pub fn supervise(
    region: &Region,
    inherit: &Inherit,
    sink: &mut dyn ConsoleSink,
    options: &Options,
    hooks: &mut dyn Hooks,
    adopted: Option<MonitorProc>,
) -> Result<(End, Vec<Restart>)> {
    inheritable(region.fd())?;
    for (_, fd) in &inherit.fds {
        inheritable(fd)?;
    }
    let attempt = adopted.as_ref().map_or(0, |m| m.attempt);
    let mut keeper = Keeper {
        region,
        sink,
        hooks,
        restarts: Vec::new(),
        pending: false,
        ended: None,
        attempt,
        last_handover: Instant::now(),
        spare: None,
        spare_wanted: options.spare,
        handed: Steps::default(),
    };
    let mut same_point = (0u32, u64::MAX); // (failures in a row, at this icount)
    let mut unrestored = 0u32; // failures in a row before the state was restored
    let mut next = adopted;
    loop {
        let monitor = match next.take().or_else(|| keeper.wake_spare(WAKE_RECOVER)) {
            Some(monitor) => monitor,
            None => spawn(&mut keeper, inherit, Role::Active)?.monitor,
        };
        let step = run_one(&mut keeper, inherit, options, monitor)?;
        if keeper.pending {
            keeper.complete(None); // the new monitor ended or died before any output
        }
        let restarts = std::mem::take(&mut keeper.restarts);
        if let Some(code) = keeper.ended {
            keeper.sink.finish().context("cannot write console output")?;
            return Ok((End::Exited(code), restarts));
        }
        let (died, cause) = match step {
            Step::Died(died, cause) => (died, cause),
            Step::Stopped => return Ok((End::Stopped, restarts)),
            Step::Upgrade(up) => return Ok((End::Upgrade(up), restarts)),
        };
        keeper.restarts = restarts;
        let restarts = &keeper.restarts;
        let verdict = Verdict::from_u64(region.live(Live::Verdict));
        if verdict != Verdict::None || cause == Cause::Exit(super::monitor::EXIT_CANNOT_RECOVER) {
            let message = match region.message() {
                m if m.is_empty() => format!("the monitor {cause} (its error is above)"),
                m => m,
            };
            return Ok((End::CannotRecover { verdict, message }, std::mem::take(&mut keeper.restarts)));
        }
        let icount = region.live(Live::Icount);
        // A poison input fails the machine at the very same instruction every time (it is
        // deterministic); other faults strike wherever the monitor happens to be. Only a
        // monitor that got as far as the machine (restored, replaying, running; a backup
        // applying a checkpoint) can meet one: one killed while it recovers, or a backup
        // killed while it waits, stands at the checkpoint's icount too, and is no sign of one.
        let phase = region.live(Live::Phase);
        let restored =
            region.live(Live::RestoredNs) != 0 || phase == Phase::Running as u64 || phase == Phase::Resuming as u64;
        if !restored {
            unrestored += 1;
        } else {
            unrestored = 0;
        }
        if restored && region.live(Live::Waiting) == 0 {
            same_point = if icount == same_point.1 { (same_point.0 + 1, icount) } else { (1, icount) };
        }
        if unrestored >= UNRESTORED_LIMIT {
            let message = format!(
                "{unrestored} monitors in a row died before they restored the VM's state (the last {cause}, its error \
                 is above); it is not restarted again"
            );
            return Ok((End::CannotRecover { verdict, message }, std::mem::take(&mut keeper.restarts)));
        }
        if same_point.0 >= options.poison_attempts {
            let input = last_input(region, icount);
            return Ok((
                End::Poison { attempts: same_point.0, icount: same_point.1, input },
                std::mem::take(&mut keeper.restarts),
            ));
        }
        if restarts.len() as u32 >= options.max_restarts {
            let n = restarts.len() as u32;
            return Ok((End::TooManyRestarts(n), std::mem::take(&mut keeper.restarts)));
        }
        let restart = Restart {
            attempt: region.live(Live::Attempt) as u32, // the monitor that failed (a spare may be started since)
            cause,
            icount,
            detected_ns: died,
            running_ns: None,
            first_output_ns: None,
            replayed_inputs: 0,
            replayed_icount: 0,
            steps: Steps::default(),
        };
        eprintln!("ftvm: keeper: the monitor {} at icount {icount}; starting another", restart.cause);
        keeper.restarts.push(restart);
        keeper.pending = true;
    }
}

/// Monitors that die in a row before they restore the VM's state (a fault in the recovery
/// itself, not one a replay meets again): then the keeper stops.
const UNRESTORED_LIMIT: u32 = 10;

/// The input the monitor died after, named for the poison message.
fn last_input(region: &Region, icount: u64) -> String {
    let seq = region.live(Live::CheckpointSeq);
    match region.inputs(seq) {
        Ok(inputs) => match inputs.iter().enumerate().rev().find(|(_, i)| i.icount <= icount) {
            Some((n, input)) => format!("input {} since the local checkpoint ({})", n + 1, describe(input)),
            None => "no input since the local checkpoint".to_string(),
        },
        Err(e) => format!("an input in a log that cannot be read ({e})"),
    }
}

/// The environment variable that makes a monitor a planned handover's successor
/// ([`super::monitor::prepare`]).
pub const ENV_HANDOVER: &str = "FTVM_KEEPER_HANDOVER";
/// The environment variable by which a keeper re-executed for an upgrade finds what it
/// keeps (see `ftvm run --resilient`).
pub const ENV_RESUME: &str = "FTVM_KEEPER_RESUME";
/// What a spare monitor reads from its `wake` descriptor: take the VM over from the region
/// (after a monitor died), or be a planned handover's successor. The end of the pipe (the
/// keeper gone, or the spare not needed) ends it.
pub const WAKE_RECOVER: u8 = b'r';
pub const WAKE_HANDOVER: u8 = b'h';
/// A spare's argv[0], and the name (`/proc/PID/comm`) it takes once woken: a child of the
/// keeper started as `SPARE_ARG0` and not named `SPARE_AWAKE_NAME` is a spare that waits.
pub const SPARE_ARG0: &str = "ftvm-spare";
pub const SPARE_AWAKE_NAME: &std::ffi::CStr = c"ftvm-monitor";

/// What a monitor is started as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// It runs the VM (recovering it, or booting it) at once.
    Active,
    /// A planned handover's successor: it prepares while the running monitor carries on.
    Successor,
    /// It builds its machine and waits to be woken ([`WAKE_RECOVER`], [`WAKE_HANDOVER`]).
    Spare,
}

/// A monitor just started, and the wake pipe of a spare.
struct Spawned {
    monitor: MonitorProc,
    wake: Option<std::fs::File>,
}

impl Spawned {
    fn into_spare(self) -> Spare {
        Spare { monitor: self.monitor, wake: self.wake.expect("a spare has a wake pipe") }
    }
}

/// Start the next monitor as `role`.
fn spawn(keeper: &mut Keeper<'_>, inherit: &Inherit, role: Role) -> Result<Spawned> {
    let region = keeper.region;
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("cannot create the console pipe")?;
    inheritable(&write)?;
    let mut fds = format!("region={},stream={}", region.fd().as_raw_fd(), write.as_raw_fd());
    for (name, fd) in &inherit.fds {
        fds.push_str(&format!(",{name}={}", fd.as_raw_fd()));
    }
    let wake = match role {
        Role::Spare => {
            let (wake_read, wake_write) =
                nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("cannot create the spare's wake pipe")?;
            inheritable(&wake_read)?;
            fds.push_str(&format!(",wake={}", wake_read.as_raw_fd()));
            Some((wake_read, std::fs::File::from(wake_write)))
        }
        _ => None,
    };
    keeper.attempt += 1;
    let attempt = keeper.attempt;
    if role == Role::Active {
        keeper.activate(attempt, false);
    }
    let mut command = Command::new(&inherit.exe);
    if role == Role::Spare {
        // How tools and tests tell a spare from the running monitor: its argv[0] says it
        // started as one, and it names itself SPARE_AWAKE_NAME once woken.
        std::os::unix::process::CommandExt::arg0(&mut command, SPARE_ARG0);
    }
    command.args(&inherit.args).env(ENV_FDS, fds).env(super::ENV_ATTEMPT, attempt.to_string()).env_remove(ENV_RESUME);
    if role == Role::Successor {
        command.env(ENV_HANDOVER, "1");
    } else {
        command.env_remove(ENV_HANDOVER);
    }
    for (k, v) in keeper.hooks.env(attempt) {
        command.env(k, v);
    }
    let child = command.spawn().context("cannot start the monitor")?;
    let pid = Pid::from_raw(child.id() as i32);
    drop(child); // reaped by pid (a keeper re-executed for an upgrade has no Child)
    drop(write);
    let monitor = MonitorProc { pid, pipe: std::fs::File::from(read), parser: Parser::default(), attempt };
    Ok(Spawned { monitor, wake: wake.map(|(_read, write)| write) }) // our copy of the read end closes here
}

/// How one monitor's run ended.
enum Step {
    /// It died (seen at this wall clock, ns since the epoch).
    Died(u64, Cause),
    /// The hooks stopped supervision.
    Stopped,
    Upgrade(Box<Upgrade>),
}

/// Read what `monitor` wrote to its stream and pass it on; false at its end (EOF).
fn drain(keeper: &mut Keeper<'_>, monitor: &mut MonitorProc, buf: &mut [u8]) -> Result<bool> {
    match monitor.pipe.read(buf) {
        Ok(0) => Ok(false), // every writer is gone: the monitor ended or died
        Ok(n) => {
            let mut failed = None;
            monitor
                .parser
                .feed(&buf[..n], &mut |e| {
                    if let Err(err) = keeper.on_event(e) {
                        failed.get_or_insert(err);
                    }
                })
                .context("cannot read the monitor's console stream")?;
            if let Some(err) = failed {
                monitor.kill();
                let _ = monitor.wait();
                return Err(err).context("cannot write console output");
            }
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(true),
        Err(e) => Err(e).context("cannot read the monitor's console stream"),
    }
}

fn readable(fd: &PollFd<'_>) -> bool {
    fd.revents().is_some_and(|r| !r.is_empty())
}

/// Run `monitor` until it ends or dies, handing the VM over to a successor when asked.
fn run_one(keeper: &mut Keeper<'_>, inherit: &Inherit, options: &Options, mut monitor: MonitorProc) -> Result<Step> {
    let region = keeper.region;
    let mut successor: Option<(MonitorProc, Instant)> = None;
    let mut buf = vec![0u8; 64 << 10];
    let (mut beat, mut beat_at) = (region.live(Live::Heartbeat), Instant::now());
    let mut waited_at_beat = waited_ns(monitor.pid);
    let mut hung = false;
    loop {
        let state = HandoverState::from_u64(region.live(Live::HandoverState));
        // Once the final checkpoint is committed the successor runs the guest: its output
        // waits in its pipe until the old monitor's stream is read to its end.
        let watch_successor = !matches!(state, HandoverState::Committed | HandoverState::Done);
        let (now_ready, next_ready) = {
            let mut fds = vec![PollFd::new(monitor.pipe.as_fd(), PollFlags::POLLIN)];
            if let (Some((next, _)), true) = (&successor, watch_successor) {
                fds.push(PollFd::new(next.pipe.as_fd(), PollFlags::POLLIN));
            }
            let _ = poll(&mut fds, PollTimeout::from(TICK_MS));
            (readable(&fds[0]), fds.get(1).is_some_and(readable))
        };
        if now_ready && !drain(keeper, &mut monitor, &mut buf)? {
            let detected = now_ns();
            let cause = if hung { Cause::Hang } else { monitor.wait()? };
            if hung {
                let _ = monitor.wait();
            }
            let state = HandoverState::from_u64(region.live(Live::HandoverState));
            match successor.take() {
                Some((next, _)) if !hung && matches!(state, HandoverState::Committed | HandoverState::Done) => {
                    monitor = next;
                    region.set_live(Live::Attempt, u64::from(monitor.attempt));
                    keeper.last_handover = Instant::now();
                    (beat, beat_at) = (region.live(Live::Heartbeat), Instant::now());
                    waited_at_beat = waited_ns(monitor.pid);
                    continue;
                }
                Some((next, _)) => {
                    next.kill();
                    let _ = next.wait();
                    fail_handover(region, &format!("the running monitor {cause} during the handover"));
                }
                None => {}
            }
            return Ok(Step::Died(detected, cause));
        }
        if next_ready {
            let (mut next, _) = successor.take().expect("polled");
            if drain(keeper, &mut next, &mut buf)? {
                successor = Some((next, Instant::now())); // (it writes nothing before it takes over)
            } else {
                let cause = next.wait()?;
                fail_handover(region, &format!("the new monitor {cause} before it took over (its error is above)"));
            }
        }
        if keeper.hooks.stop() {
            monitor.kill();
            let _ = monitor.wait();
            if let Some((next, _)) = successor.take() {
                next.kill();
                let _ = next.wait();
            }
            return Ok(Step::Stopped);
        }
        if !hung && keeper.hooks.kill_now() {
            monitor.kill();
        }
        let now = region.live(Live::Heartbeat);
        if now != beat {
            (beat, beat_at) = (now, Instant::now());
            waited_at_beat = waited_ns(monitor.pid);
        } else if !hung
            && stalled(beat_at, waited_at_beat, monitor.pid) >= hang_limit(region, options)
            && !exiting(monitor.pid)
        {
            hung = true;
            monitor.kill(); // the pipe closes with it
        }
        if hung {
            continue;
        }
        if let Some(up) = handover_tick(keeper, inherit, options, &mut successor)? {
            return Ok(Step::Upgrade(Box::new(Upgrade { binary: up, monitor })));
        }
        if successor.is_none() {
            keeper.keep_spare(inherit, HandoverState::from_u64(region.live(Live::HandoverState)));
        }
    }
}

/// How long a successor may take to be ready.
const PREPARE_LIMIT: Duration = Duration::from_secs(30);

/// Move a planned handover on: start the successor, or (upgrade) check the new binary and
/// say where to re-execute. Returns the binary of an upgrade that can go ahead.
fn handover_tick(
    keeper: &mut Keeper<'_>,
    inherit: &Inherit,
    options: &Options,
    successor: &mut Option<(MonitorProc, Instant)>,
) -> Result<Option<std::path::PathBuf>> {
    let region = keeper.region;
    let state = HandoverState::from_u64(region.live(Live::HandoverState));
    match state {
        HandoverState::Requested | HandoverState::Exec if successor.is_none() => {
            let kind = HandoverKind::from_u64(region.live(Live::HandoverKind));
            if state == HandoverState::Requested && kind == HandoverKind::Upgrade {
                let binary = std::path::PathBuf::from(region.request_text());
                return match check_binary(&binary) {
                    Ok(()) => {
                        region.set_live(Live::HandoverState, HandoverState::Exec as u64);
                        Ok(Some(binary))
                    }
                    Err(why) => {
                        fail_handover(region, &why);
                        Ok(None)
                    }
                };
            }
            region.set_live(Live::HandoverState, HandoverState::Preparing as u64);
            let next = match keeper.wake_spare(WAKE_HANDOVER) {
                Some(spare) => Ok(spare),
                None => spawn(keeper, inherit, Role::Successor).map(|s| s.monitor),
            };
            match next {
                Ok(next) => *successor = Some((next, Instant::now())),
                Err(e) => fail_handover(region, &format!("{e:#}")),
            }
        }
        HandoverState::Preparing | HandoverState::Ready | HandoverState::Delta | HandoverState::Synced => {
            if let Some((next, _)) = successor.as_ref().filter(|(_, at)| at.elapsed() > PREPARE_LIMIT) {
                next.kill();
                let _ = next.wait();
                *successor = None;
                fail_handover(region, &format!("the new monitor was not ready within {PREPARE_LIMIT:?}"));
            }
        }
        _ => {}
    }
    let running = region.live(Live::Phase) == Phase::Running as u64;
    if let Some(every) = options.rejuvenate_every {
        if running && state.settled() && successor.is_none() && keeper.last_handover.elapsed() >= every {
            keeper.last_handover = Instant::now();
            request_handover(region, HandoverKind::Rejuvenate, "");
        }
    }
    Ok(None)
}

/// Ask for a planned handover (the API's thread in the monitor, or the keeper's timer);
/// its number, or None while another is under way.
pub fn request_handover(region: &Region, kind: HandoverKind, text: &str) -> Option<u64> {
    let state = HandoverState::from_u64(region.live(Live::HandoverState));
    if !state.settled() {
        return None;
    }
    let seq = region.live(Live::HandoverSeq) + 1;
    region.set_request_text(text);
    region.set_outcome("");
    region.set_live(Live::HandoverKind, kind as u64);
    region.set_live(Live::HandoverSeq, seq);
    region.swap_live(Live::HandoverState, state as u64, HandoverState::Requested as u64).then_some(seq)
}

/// The handover did not happen: say why; the running monitor carries on.
pub fn fail_handover(region: &Region, why: &str) {
    eprintln!("ftvm: keeper: the handover failed: {why}; the running monitor carries on");
    region.set_outcome(why);
    region.set_live(Live::HandoverState, HandoverState::Failed as u64);
}

/// What `ftvm handover-check --version N` prints when it reads version N (then ` N`): a
/// binary that exits 0 without saying so (not an ftvm) is refused.
pub const HANDOVER_CHECK_ANSWER: &str = "ftvm reads handover state version";

/// The longest answer to the check read (a stranger binary may print anything).
const CHECK_ANSWER_CAP: u64 = 4096;

/// Ask the new binary whether it reads this handover state (`ftvm handover-check`): its
/// refusal, if it refuses, names both versions; a binary that does not answer as an ftvm
/// does is refused too.
fn check_binary(binary: &std::path::Path) -> Result<(), String> {
    let version = super::region::VERSION;
    let mut child = Command::new(binary)
        .args(["handover-check", "--version", &version.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .env_remove(ENV_FDS)
        .env_remove(ENV_RESUME)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
    let deadline = Instant::now() + CHECK_LIMIT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{} did not answer within {CHECK_LIMIT:?}", binary.display()));
            }
        }
    };
    if status.success() {
        let mut answer = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = out.take(CHECK_ANSWER_CAP).read_to_string(&mut answer);
        }
        let expected = format!("{HANDOVER_CHECK_ANSWER} {version}");
        if answer.lines().any(|line| line.trim_end() == expected) {
            return Ok(());
        }
        return Err(format!(
            "{} is not an ftvm binary that can take this VM over: it did not answer the handover check",
            binary.display()
        ));
    }
    let mut stderr = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut stderr);
    }
    let said = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
    let said = said.strip_prefix("ftvm: error: ").unwrap_or(said);
    Err(format!("{} refused: {}", binary.display(), if said.is_empty() { "no reason given" } else { said }))
}

/// How long the new binary may take to answer the check.
const CHECK_LIMIT: Duration = Duration::from_secs(10);

/// How long the monitor's run loop (its main thread) has waited for a CPU on a run queue
/// since it started (ns; `/proc/PID/schedstat`), if the kernel says.
fn waited_ns(pid: Pid) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).ok()?;
    text.split_whitespace().nth(1)?.parse().ok()
}

/// Whether the monitor is dying already (the kernel's PF_EXITING, `/proc/PID/stat`): it
/// runs no more code of its own, and its pipe closes once the kernel has torn it down. A
/// dying process with a large RAM took over a second for that on a loaded host, and the
/// keeper took a monitor killed by SIGSEGV for hung (seen once in 1000 injections).
fn exiting(pid: Pid) -> bool {
    const PF_EXITING: u64 = 0x4;
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let after_comm = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    // state, ppid, pgrp, session, tty_nr, tpgid, flags
    after_comm
        .split_whitespace()
        .nth(6)
        .and_then(|f| f.parse::<u64>().ok())
        .is_some_and(|flags| flags & PF_EXITING != 0)
}

/// How long the heartbeat has stood still, less the time the monitor could not run for
/// want of a CPU: on a loaded host a monitor that waits its turn is not hung.
fn stalled(beat_at: Instant, waited_at_beat: Option<u64>, pid: Pid) -> Duration {
    let elapsed = beat_at.elapsed();
    match (waited_at_beat, waited_ns(pid)) {
        (Some(then), Some(now)) => elapsed.saturating_sub(Duration::from_nanos(now.saturating_sub(then))),
        _ => elapsed,
    }
}

/// The hang limit, or the start grace while the monitor starts, recovers, or has not yet
/// finished its first slice ([`Phase::Resuming`]).
fn hang_limit(region: &Region, options: &Options) -> Duration {
    let running = region.live(Live::Phase) == Phase::Running as u64;
    Duration::from_millis(if running { options.hang_ms } else { options.hang_ms.max(options.start_grace_ms) })
}
