//! The live driver: runs a machine against the real world. It stamps host events
//! (keys, frames, entropy, idle skips) with the instruction count at which they
//! enter, keeps them as the input log, and routes the machine's outputs to the
//! terminal and the TAP device.
//!
//! Clock policy: guest time never runs ahead of wall-clock time. When the guest idles
//! until a timer deadline, the driver waits until the wall clock reaches it (or a host
//! event arrives first) and then skips guest time forward — unless the clock is
//! `Fast`, which skips at once (for tests and benchmarks without outside peers).

use crate::api::{Command, ControlRequest, Reply};
use crate::host::tap::Tap;
use crate::host::{self, HostEvent};
use anyhow::{Context, Result};
use machine::board::TIMEBASE_HZ;
use machine::{Input, InputKind, Machine, OutputKind, RunExit};
use std::io::Write;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

/// Instructions per run slice between looks at the host (about 10-20 ms of guest work).
const SLICE_ICOUNT: u64 = 2_000_000;
/// Bytes of entropy handed to the guest's RNG device per request.
const ENTROPY_CHUNK: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Clock {
    /// Guest time follows the wall clock when the guest idles.
    Realtime,
    /// Idle time is skipped at once.
    Fast,
}

/// How the run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    PowerOff { code: u32 },
    Reset,
    /// The user pressed Ctrl-A x.
    Quit,
    /// The control API asked the VM to stop.
    Stopped,
    /// The guest idles with no timer set and nothing can wake it.
    Hung,
}

/// Where console output goes.
pub trait ConsoleSink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()>;
    fn flush(&mut self) -> std::io::Result<()>;
    /// The run is over: write out anything held back.
    fn finish(&mut self) -> std::io::Result<()> {
        self.flush()
    }
}

pub struct Driver {
    pub machine: Machine,
    events: Receiver<HostEvent>,
    /// False when no host source can ever send an event (stdin closed, no TAP).
    pub events_possible: bool,
    pub tap: Option<Tap>,
    pub clock: Clock,
    pub input_log: Vec<Input>,
    started: Instant,
    /// Guest ticks at start, so that wall time maps onto guest time.
    start_ticks: u64,
    /// Paused through the control API: the machine does not run.
    paused: bool,
    /// Writes a snapshot of the machine to a file; returns its size in bytes.
    pub snapshotter: Option<Snapshotter>,
}

/// How the driver saves a snapshot (the snapshot format lives in the machine crate).
pub type Snapshotter = Box<dyn Fn(&Machine, &std::path::Path) -> Result<u64>>;

impl Driver {
    pub fn new(machine: Machine, events: Receiver<HostEvent>, clock: Clock) -> Driver {
        let start_ticks = machine.time_ticks();
        Driver {
            machine,
            events,
            events_possible: true,
            tap: None,
            clock,
            input_log: Vec::new(),
            started: Instant::now(),
            start_ticks,
            paused: false,
            snapshotter: None,
        }
    }

    fn push(&mut self, kind: InputKind) -> Result<()> {
        let input = Input { icount: self.machine.icount(), kind };
        self.machine.push_input(input.clone()).context("cannot deliver input to the machine")?;
        self.input_log.push(input);
        Ok(())
    }

    fn wall_ticks(&self) -> u64 {
        self.start_ticks + (self.started.elapsed().as_nanos() * TIMEBASE_HZ as u128 / 1_000_000_000) as u64
    }

    /// Run until the guest powers off or the user quits.
    pub fn run(&mut self, console: &mut dyn ConsoleSink) -> Result<Outcome> {
        loop {
            if self.paused {
                match self.events.recv() {
                    Ok(event) => {
                        if let Some(outcome) = self.deliver(event)? {
                            return Ok(outcome);
                        }
                    }
                    Err(_) => self.paused = false, // nobody can resume us: carry on
                }
                continue;
            }
            let target = self.machine.icount() + SLICE_ICOUNT;
            let exit = self.machine.run(target);
            self.route_outputs(console)?;
            match exit {
                RunExit::PowerOff { code } => return Ok(Outcome::PowerOff { code }),
                RunExit::Reset => return Ok(Outcome::Reset),
                RunExit::Budget => {
                    if let Some(outcome) = self.poll_events()? {
                        return Ok(outcome);
                    }
                }
                RunExit::Idle { next_deadline_ticks } => {
                    if let Some(outcome) = self.idle(next_deadline_ticks)? {
                        return Ok(outcome);
                    }
                }
            }
            if self.machine.wants_entropy() {
                let bytes = host::entropy(ENTROPY_CHUNK).context("cannot read host entropy")?;
                self.push(InputKind::Entropy(bytes))?;
            }
        }
    }

    fn deliver(&mut self, event: HostEvent) -> Result<Option<Outcome>> {
        match event {
            HostEvent::Console(bytes) => self.push(InputKind::Console(bytes))?,
            HostEvent::NetFrame(frame) => self.push(InputKind::NetFrame(frame))?,
            HostEvent::Quit => return Ok(Some(Outcome::Quit)),
            HostEvent::Control(request) => return Ok(self.control(request)),
        }
        Ok(None)
    }

    /// Answer a control request; `Some` when it ends the run.
    fn control(&mut self, request: ControlRequest) -> Option<Outcome> {
        let (reply, outcome) = match &request.command {
            Command::Status => (Reply::ok(self.status()), None),
            Command::Pause => {
                self.paused = true;
                (Reply::ok(serde_json::json!({ "state": "paused", "icount": self.machine.icount() })), None)
            }
            Command::Resume => {
                self.paused = false;
                (Reply::ok(serde_json::json!({ "state": "running", "icount": self.machine.icount() })), None)
            }
            Command::Stop => (Reply::ok(serde_json::json!({ "state": "stopped", "icount": self.machine.icount() })), Some(Outcome::Stopped)),
            Command::Snapshot { path } => (self.snapshot(path), None),
        };
        let _ = request.reply.send(reply);
        outcome
    }

    fn snapshot(&self, path: &std::path::Path) -> Reply {
        let Some(save) = &self.snapshotter else {
            return Reply::error(409, "this VM cannot take snapshots");
        };
        let started = Instant::now();
        match save(&self.machine, path) {
            Ok(bytes) => Reply::ok(serde_json::json!({
                "path": path,
                "bytes": bytes,
                "icount": self.machine.icount(),
                "pause_ms": started.elapsed().as_secs_f64() * 1e3,
            })),
            Err(e) => Reply::error(500, format!("snapshot to {} failed: {e:#}", path.display())),
        }
    }

    /// What `GET /status` answers.
    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "state": if self.paused { "paused" } else { "running" },
            "role": "standalone",
            "mode": "none",
            "icount": self.machine.icount(),
            "guest_time_s": self.machine.time_ticks() as f64 / TIMEBASE_HZ as f64,
            "epoch": 0,
            "last_checkpoint": null,
            "replication_lag_ms": null,
        })
    }

    fn poll_events(&mut self) -> Result<Option<Outcome>> {
        loop {
            match self.events.try_recv() {
                Ok(event) => {
                    if let Some(outcome) = self.deliver(event)? {
                        return Ok(Some(outcome));
                    }
                }
                Err(TryRecvError::Empty) => return Ok(None),
                Err(TryRecvError::Disconnected) => {
                    self.events_possible = false;
                    return Ok(None);
                }
            }
        }
    }

    /// The guest waits for an interrupt: move guest time forward to the next
    /// deadline, or to the moment a host event arrives.
    fn idle(&mut self, deadline: Option<u64>) -> Result<Option<Outcome>> {
        let guest_now = self.machine.time_ticks();
        let wait = match (self.clock, deadline) {
            (Clock::Fast, Some(_)) => Some(Duration::ZERO),
            (Clock::Realtime, Some(d)) => {
                let wall = self.wall_ticks();
                Some(Duration::from_nanos((d.saturating_sub(wall) as u128 * 1_000_000_000 / TIMEBASE_HZ as u128) as u64))
            }
            (_, None) if !self.events_possible => return Ok(Some(Outcome::Hung)),
            (_, None) => None,
        };
        let event = match wait {
            Some(w) if w.is_zero() => self.events.try_recv().ok(),
            Some(w) => match self.events.recv_timeout(w) {
                Ok(e) => Some(e),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    self.events_possible = false;
                    None
                }
            },
            None => match self.events.recv() {
                Ok(e) => Some(e),
                Err(_) => {
                    self.events_possible = false;
                    return Ok(Some(Outcome::Hung));
                }
            },
        };
        let skip_to = match (&event, deadline) {
            // An event woke us: guest time catches up with the wall clock, no further.
            (Some(_), d) => {
                let wall = if self.clock == Clock::Fast { guest_now } else { self.wall_ticks() };
                d.map_or(wall, |d| d.min(wall))
            }
            (None, Some(d)) => d,
            (None, None) => guest_now,
        };
        if skip_to > guest_now {
            self.push(InputKind::IdleSkip { ticks: skip_to - guest_now })?;
        }
        match event {
            Some(e) => {
                let outcome = self.deliver(e)?;
                if outcome.is_none() {
                    return self.poll_events();
                }
                Ok(outcome)
            }
            None => Ok(None),
        }
    }

    fn route_outputs(&mut self, console: &mut dyn ConsoleSink) -> Result<()> {
        let outputs = self.machine.take_outputs();
        if outputs.is_empty() {
            return Ok(());
        }
        for output in outputs {
            match output.kind {
                OutputKind::Console(bytes) => console.write(&bytes).context("cannot write console output")?,
                OutputKind::NetFrame(frame) => {
                    if let Some(tap) = &mut self.tap {
                        // A frame the host cannot take is lost, as on a wire; TCP recovers.
                        if let Err(e) = tap.send(&frame) {
                            tracing_warn(&format!("TAP {}: frame dropped: {e}", tap.name));
                        }
                    }
                }
                OutputKind::PowerOff { .. } | OutputKind::Reset => {}
            }
        }
        console.flush().context("cannot write console output")
    }
}

fn tracing_warn(message: &str) {
    let _ = writeln!(std::io::stderr(), "ftvm: warning: {message}");
}
