//! The keeper's loop: start a monitor (this binary again, with the descriptors it must
//! inherit), pass its console stream to the terminal counting what left, watch its
//! heartbeat, and start another when it dies or hangs — unless the region is corrupt, or
//! the monitor keeps dying at the same instruction (a poison input).
//! It holds no VM logic: what it knows of the VM is in the region's live page.

use super::region::{describe, Live, Phase, Region, Verdict};
use super::stream::{Event, Parser};
use super::ENV_FDS;
use crate::driver::ConsoleSink;
use anyhow::{Context, Result};
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::ffi::OsString;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command};
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
}

impl Default for Options {
    fn default() -> Options {
        Options { hang_ms: 1000, poison_attempts: 3, max_restarts: 10_000, start_grace_ms: 5000 }
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
}

/// How supervision ended.
#[derive(Debug, Clone, PartialEq, Eq)]
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
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Exited(code) => write!(f, "the VM ended (status {code})"),
            End::CannotRecover { verdict: Verdict::RegionCorrupt, message } => {
                write!(f, "the VM cannot be recovered: {message}")
            }
            End::CannotRecover { message, .. } => write!(f, "the VM cannot be recovered: {message}"),
            End::Poison { attempts, icount, input } => write!(
                f,
                "the monitor failed {attempts} times in a row at icount {icount}, after {input}: a poison input; \
                 it is not restarted again"
            ),
            End::TooManyRestarts(n) => write!(f, "the monitor was restarted {n} times; giving up"),
            End::Stopped => write!(f, "stopped"),
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
        let Some(restart) = self.restarts.last_mut() else { return };
        restart.first_output_ns = first_output_ns;
        restart.running_ns = running_ns;
        (restart.replayed_inputs, restart.replayed_icount) = (inputs, icount);
        self.hooks.restarted(restart);
    }

    fn running_ns(&self) -> Option<u64> {
        (self.region.live(Live::Phase) == Phase::Running as u64).then(|| self.region.live(Live::RunningNs))
    }
}

/// Supervise monitors until the VM ends (or cannot go on).
pub fn supervise(
    region: &Region,
    inherit: &Inherit,
    sink: &mut dyn ConsoleSink,
    options: &Options,
    hooks: &mut dyn Hooks,
) -> Result<(End, Vec<Restart>)> {
    inheritable(region.fd())?;
    for (_, fd) in &inherit.fds {
        inheritable(fd)?;
    }
    let mut keeper = Keeper { region, sink, hooks, restarts: Vec::new(), pending: false, ended: None };
    let mut same_point = (0u32, u64::MAX); // (failures in a row, at this icount)
    for attempt in 1.. {
        let (died, cause) = run_one(&mut keeper, inherit, options, attempt)?;
        if keeper.pending {
            keeper.complete(None); // the new monitor ended or died before any output
        }
        let restarts = std::mem::take(&mut keeper.restarts);
        if let Some(code) = keeper.ended {
            keeper.sink.finish().context("cannot write console output")?;
            return Ok((End::Exited(code), restarts));
        }
        if died.is_none() {
            return Ok((End::Stopped, restarts));
        }
        keeper.restarts = restarts;
        let restarts = &keeper.restarts;
        let verdict = Verdict::from_u64(region.live(Live::Verdict));
        if verdict != Verdict::None || cause == Cause::Exit(super::monitor::EXIT_CANNOT_RECOVER) {
            let message = match region.message() {
                m if m.is_empty() => format!("the monitor {cause} (its error is above)"),
                m => m,
            };
            return Ok((End::CannotRecover { verdict, message }, keeper.restarts));
        }
        let icount = region.live(Live::Icount);
        // A poison input fails the machine at the very same instruction every time (it is
        // deterministic); other faults strike wherever the monitor happens to be.
        same_point = if icount == same_point.1 { (same_point.0 + 1, icount) } else { (1, icount) };
        if same_point.0 >= options.poison_attempts {
            let input = last_input(region, icount);
            return Ok((End::Poison { attempts: same_point.0, icount: same_point.1, input }, keeper.restarts));
        }
        if restarts.len() as u32 >= options.max_restarts {
            let n = restarts.len() as u32;
            return Ok((End::TooManyRestarts(n), keeper.restarts));
        }
        let restart = Restart {
            attempt,
            cause,
            icount,
            detected_ns: died.expect("checked above"),
            running_ns: None,
            first_output_ns: None,
            replayed_inputs: 0,
            replayed_icount: 0,
        };
        eprintln!("ftvm: keeper: the monitor {} at icount {icount}; starting another", restart.cause);
        keeper.restarts.push(restart);
        keeper.pending = true;
    }
    unreachable!("the loop returns")
}

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

/// Run one monitor until it ends or dies: the time it was seen to die (None when the
/// hooks stopped supervision) and how.
fn run_one(
    keeper: &mut Keeper<'_>,
    inherit: &Inherit,
    options: &Options,
    attempt: u32,
) -> Result<(Option<u64>, Cause)> {
    let region = keeper.region;
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("cannot create the console pipe")?;
    inheritable(&write)?;
    let mut fds = format!("region={},stream={}", region.fd().as_raw_fd(), write.as_raw_fd());
    for (name, fd) in &inherit.fds {
        fds.push_str(&format!(",{name}={}", fd.as_raw_fd()));
    }
    region.set_live(Live::Attempt, u64::from(attempt));
    region.set_live(Live::Phase, Phase::Starting as u64);
    region.set_live(Live::Verdict, Verdict::None as u64);
    region.set_live(Live::MessageLen, 0);
    let mut command = Command::new(&inherit.exe);
    command.args(&inherit.args).env(ENV_FDS, fds).env(super::ENV_ATTEMPT, attempt.to_string());
    for (k, v) in keeper.hooks.env(attempt) {
        command.env(k, v);
    }
    let mut child = command.spawn().context("cannot start the monitor")?;
    drop(write);
    let mut pipe = std::fs::File::from(read);
    let mut parser = Parser::default();
    let mut buf = vec![0u8; 64 << 10];
    let (mut beat, mut beat_at) = (region.live(Live::Heartbeat), Instant::now());
    let mut hung = false;
    loop {
        let mut fds = [PollFd::new(pipe.as_fd(), PollFlags::POLLIN)];
        let ready = poll(&mut fds, PollTimeout::from(TICK_MS)).unwrap_or(0);
        if ready > 0 {
            match pipe.read(&mut buf) {
                Ok(0) => break, // every writer is gone: the monitor ended or died
                Ok(n) => {
                    let mut failed = None;
                    parser
                        .feed(&buf[..n], &mut |e| {
                            if let Err(err) = keeper.on_event(e) {
                                failed.get_or_insert(err);
                            }
                        })
                        .context("cannot read the monitor's console stream")?;
                    if let Some(err) = failed {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(err).context("cannot write console output");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("cannot read the monitor's console stream"),
            }
        }
        if keeper.hooks.stop() {
            let _ = child.kill();
            let _ = child.wait();
            return Ok((None, Cause::Exit(0)));
        }
        if !hung && keeper.hooks.kill_now() {
            let _ = child.kill();
        }
        let now = region.live(Live::Heartbeat);
        if now != beat {
            (beat, beat_at) = (now, Instant::now());
        } else if !hung && beat_at.elapsed() >= hang_limit(region, options) {
            hung = true;
            let _ = child.kill(); // the pipe closes with it
        }
    }
    let detected = now_ns();
    let status = reap(&mut child)?;
    let cause = if hung {
        Cause::Hang
    } else if let Some(signal) = status.signal() {
        Cause::Signal(nix::sys::signal::Signal::try_from(signal).map_or(format!("signal {signal}"), |s| s.to_string()))
    } else {
        Cause::Exit(status.code().unwrap_or(-1))
    };
    Ok((Some(detected), cause))
}

fn hang_limit(region: &Region, options: &Options) -> Duration {
    let running = region.live(Live::Phase) == Phase::Running as u64;
    Duration::from_millis(if running { options.hang_ms } else { options.hang_ms.max(options.start_grace_ms) })
}

fn reap(child: &mut Child) -> Result<std::process::ExitStatus> {
    child.wait().context("cannot wait for the monitor")
}
