//! The live driver: runs a machine against the real world. It stamps host events
//! (keys, frames, entropy, idle skips) with the instruction count at which they
//! enter, keeps them as the input log, and routes the machine's outputs to the
//! terminal and the TAP device.
//!
//! Replication is started and stopped while the VM runs (`ftvm ctl protect`, `unprotect`):
//! the driver holds the VM's ownership record while it runs alone, hands it to a new
//! replication thread on protect, and takes it back once replication stopped; whoever holds
//! it at the end marks it ended.
//!
//! Clock policy: guest time follows wall-clock time. When the guest idles until a timer
//! deadline, the driver waits until the wall clock reaches it (or a host event arrives
//! first) and then skips guest time forward; while it computes, the pacer (`pacer.rs`)
//! sets the guest clock's rate to the measured speed, within `pacer::BOUND_MS` — unless
//! the clock is `Fast`, which skips idle time at once and paces nothing (for tests and
//! benchmarks without outside peers).

use crate::control::{Command, ControlRequest, ProtectRequest, Reply};
use crate::host::tap::Tap;
use crate::host::{self, HostEvent};
use anyhow::{Context, Result};
use machine::board::TIMEBASE_HZ;
use machine::{Input, InputKind, Machine, OutputKind, RunExit};
use std::io::Write;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::time::{Duration, Instant};

/// Instructions per run slice between looks at the host (about 10-20 ms of guest work).
const SLICE_ICOUNT: u64 = 2_000_000;
/// Shorter slices while replicating, so that epochs end close to their time.
const REPLICATING_SLICE_ICOUNT: u64 = 250_000;
/// Pages a full checkpoint's pre-copy scans per run slice, while the guest runs.
const PRECOPY_PAGES_PER_SLICE: usize = 8192;
/// Bytes of entropy handed to the guest's RNG device per request.
const ENTROPY_CHUNK: usize = 64;
/// How long the end of a replicated VM may take to settle (the protocol's own timeouts are
/// far shorter; this only guards against a replication thread that died).
const END_WAIT: Duration = Duration::from_secs(30);
/// What `ctl protect` does not set, as `ftvm run`'s defaults.
const PROTECT_HEARTBEAT_MS: u64 = 10;
const PROTECT_BACKUP_LOSS_GRACE_MS: u64 = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clock {
    /// Guest time follows the wall clock when the guest idles.
    Realtime,
    /// Idle time is skipped at once.
    Fast,
}

/// How the run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    PowerOff {
        code: u32,
    },
    Reset,
    /// The user pressed Ctrl-A x.
    Quit,
    /// The control API asked the VM to stop.
    Stopped,
    /// The replication layer fenced this replica off (another replica owns the VM).
    Fenced(String),
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
    /// The guest rebooted (the machine boots again by itself): what follows is a new boot.
    fn rebooted(&mut self) -> std::io::Result<()> {
        Ok(())
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
    /// Outputs released by acknowledgements, not yet sent.
    released: Vec<machine::Output>,
    /// Set when this VM is a replicated primary.
    pub replication: Option<Replication>,
    /// Set once the replication thread settled the VM's end: (exit code, outputs released).
    finished: Option<(u32, bool)>,
    /// What `status` reports of a takeover, when this VM is a backup that took over.
    pub took_over: Option<crate::status::Takeover>,
    /// What `status` reports as the role.
    pub role: crate::status::Role,
    /// What `status` reports as the VM's name in the ownership store.
    pub vm_id: Option<String>,
    /// The VM's ownership record while no replication thread holds it (None: the VM was
    /// started without a store).
    pub ownership: Option<crate::replicate::Ownership>,
    /// The sender of the driver's own events, for a replication thread started later
    /// (`ctl protect`); set when a control API can ask for it.
    pub events_tx: Option<Sender<HostEvent>>,
    /// Keeps a busy guest's clock at the wall clock's pace.
    pacer: crate::pacer::Pacer,
    /// Where the guest's entropy comes from (`--seed`: a seeded generator).
    pub entropy: host::EntropySource,
}

/// The primary's side of checkpoint replication in the driver: the schedule (epochs, the
/// kind of each checkpoint, pre-copy, held outputs) is replica's pure policy; this applies
/// its decisions to the machine and hands checkpoints to the replication thread.
pub struct Replication {
    pub handle: crate::replicate::primary::PrimaryHandle,
    schedule: replica::CheckpointSchedule<machine::Output>,
    last: Option<CheckpointStats>,
    /// Totals since the start, for `status` and benchmarks.
    totals: CheckpointTotals,
    /// A full checkpoint being copied while the guest runs.
    precopy: Option<machine::checkpoint::PreCopy>,
    started: Instant,
    /// Put the machine's digest in every N-th checkpoint (0: never).
    pub verify_every: u64,
    /// The answer owed to an `unprotect` under way.
    unprotecting: Option<Sender<Reply>>,
    /// The role to report again once replication stops.
    role_before: crate::status::Role,
}

/// How to replicate: the replication thread's options and the checkpoint schedule's.
pub struct ReplicationOptions {
    pub primary: crate::replicate::primary::PrimaryOptions,
    pub epoch_ms: u64,
    /// Put the machine's digest in every N-th checkpoint (0: never).
    pub verify_every: u64,
}

#[derive(Debug, Default, Clone, Copy)]
struct CheckpointTotals {
    count: u64,
    pause_us: u64,
    max_pause_us: u64,
    bytes: u64,
    pages: u64,
}

impl Replication {
    /// The kind of checkpoint the protocol wants next, as far as it can know: until it has
    /// seen the checkpoint last handed over, its advice predates that one (it may still say
    /// Full for a full checkpoint just taken, and a second one would be pre-copied and sent
    /// for nothing), so the chain is taken to continue — an incremental it cannot use is
    /// dropped, never sent, and its next advice says Full again.
    fn wanted(&self) -> replica::CheckpointKind {
        let shared = self.handle.shared.lock().expect("not poisoned");
        if shared.taken_epoch.unwrap_or(0) == self.schedule.epoch() {
            shared.next_kind
        } else {
            replica::CheckpointKind::Incremental
        }
    }

    /// The schedule's clock: milliseconds since replication started.
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub fn new(handle: crate::replicate::primary::PrimaryHandle, epoch_ms: u64) -> Replication {
        Replication {
            handle,
            schedule: replica::CheckpointSchedule::new(replica::ScheduleConfig::new(epoch_ms), 0),
            last: None,
            totals: CheckpointTotals::default(),
            started: Instant::now(),
            precopy: None,
            verify_every: 0,
            unprotecting: None,
            role_before: crate::status::Role::Standalone,
        }
    }
}

/// What the last checkpoint cost.
#[derive(Debug, Clone, Copy)]
struct CheckpointStats {
    epoch: u64,
    full: bool,
    pause_us: u64,
    bytes: usize,
    pages: usize,
}

/// How the driver saves a snapshot (the snapshot format lives in the machine crate).
pub type Snapshotter = Box<dyn Fn(&Machine, &std::path::Path) -> Result<u64>>;

impl Driver {
    pub fn new(machine: Machine, events: Receiver<HostEvent>, clock: Clock) -> Driver {
        let start_ticks = machine.time_ticks() + start_lag_ticks(&machine);
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
            released: Vec::new(),
            replication: None,
            finished: None,
            took_over: None,
            role: crate::status::Role::Standalone,
            vm_id: None,
            ownership: None,
            events_tx: None,
            pacer: crate::pacer::Pacer::new(),
            entropy: host::EntropySource::Host,
        }
    }

    /// Start replicating to a backup (at boot, or `ctl protect` while the VM runs): the VM's
    /// ownership record goes to a new replication thread, and the backup's first checkpoint
    /// is a full one, pre-copied while the guest runs.
    pub fn start_replication(&mut self, options: ReplicationOptions, events: Sender<HostEvent>) -> Result<()> {
        anyhow::ensure!(self.replication.is_none(), "this VM is already replicating");
        let ownership = self.ownership.take().context("replication needs the VM's ownership record (--store)")?;
        let handle = crate::replicate::primary::start(options.primary, ownership, events)?;
        // The backup starts from a full checkpoint: what was written before needs no second
        // copy in the pre-copy's final pass (it could be everything since boot).
        self.machine.take_dirty_pages();
        self.machine.take_dirty_sectors();
        let mut replication = Replication::new(handle, options.epoch_ms);
        replication.verify_every = options.verify_every;
        replication.role_before = self.role;
        self.role = crate::status::Role::Primary;
        self.replication = Some(replication);
        Ok(())
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

    /// Run until the guest powers off or the user quits. A replicated VM ends on both
    /// sides: its last outputs leave once the backup holds the final epoch (or once the
    /// ownership record says the VM ended), and the backup is told to stand down.
    pub fn run(&mut self, console: &mut dyn ConsoleSink) -> Result<Outcome> {
        let outcome = self.run_until_end(console)?;
        let exit_code = match &outcome {
            Outcome::PowerOff { code } => *code,
            Outcome::Reset | Outcome::Quit | Outcome::Stopped => 0,
            Outcome::Hung => 1,
            Outcome::Fenced(_) => return Ok(outcome),
        };
        if let Some(fenced) = self.end_replicated(exit_code, console)? {
            return Ok(fenced);
        }
        if self.replication.is_none() {
            // Running alone: mark the record ended, so that no other replica ever brings
            // the VM back (a replication thread does this itself).
            if let Some(ownership) = &mut self.ownership {
                if let Err(e) = ownership.mark_ended(exit_code) {
                    tracing_warn(&format!("{e:#}"));
                }
            }
        }
        Ok(outcome)
    }

    fn run_until_end(&mut self, console: &mut dyn ConsoleSink) -> Result<Outcome> {
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
            let slice = if self.replication.is_some() { REPLICATING_SLICE_ICOUNT } else { SLICE_ICOUNT };
            let target = self.machine.icount() + slice;
            let exit = self.run_slice(target)?;
            self.route_outputs(console)?;
            self.maybe_checkpoint(console, matches!(exit, RunExit::Idle { .. }))?;
            if let Some(outcome) = self.wait_while_outputs_pile_up(console)? {
                return Ok(outcome);
            }
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
                let bytes = self.entropy.draw(ENTROPY_CHUNK).context("cannot read host entropy")?;
                self.push(InputKind::Entropy(bytes))?;
            }
        }
    }

    /// Run one slice; with the real-time clock, pace guest time after it (the pacer's
    /// inputs enter the log like any other).
    fn run_slice(&mut self, target: u64) -> Result<RunExit> {
        let (icount, started) = (self.machine.icount(), Instant::now());
        let exit = self.machine.run(target);
        if self.clock == Clock::Realtime && !matches!(exit, RunExit::PowerOff { .. } | RunExit::Reset) {
            let slice = crate::pacer::Slice {
                instructions: self.machine.icount() - icount,
                busy: started.elapsed(),
                guest_ticks: self.machine.time_ticks(),
                wall_ticks: self.wall_ticks(),
                icount_per_tick: self.machine.icount_per_tick(),
                min_icount_per_tick: self.machine.min_icount_per_tick(),
            };
            for input in self.pacer.after_slice(&slice) {
                self.push(input)?;
            }
        }
        Ok(exit)
    }

    fn deliver(&mut self, event: HostEvent) -> Result<Option<Outcome>> {
        match event {
            HostEvent::Console(bytes) => self.push(InputKind::Console(bytes))?,
            HostEvent::NetFrame(frame) => self.push(InputKind::NetFrame(frame))?,
            HostEvent::Quit => return Ok(Some(Outcome::Quit)),
            HostEvent::Control(request) => return Ok(self.control(request)),
            HostEvent::Released { up_to_epoch } => self.release_held(up_to_epoch),
            HostEvent::ReplicationStopped(message) => {
                if let Some(reply) = self.replication.as_mut().and_then(|r| r.unprotecting.take()) {
                    let _ = reply.send(Reply::error(409, format!("replication stopped: {message}")));
                }
                return Ok(Some(Outcome::Fenced(message)));
            }
            HostEvent::Finished { exit_code, released } => self.finished = Some((exit_code, released)),
            HostEvent::Detached { generation } => self.detached(generation),
        }
        Ok(None)
    }

    /// Replication stopped (unprotect): no backup can take over any more, so everything
    /// held may leave; the record comes back from the replication thread.
    fn detached(&mut self, generation: u64) {
        let Some(mut r) = self.replication.take() else { return };
        let held = r.schedule.release(u64::MAX);
        self.released.extend(held);
        self.ownership = r.handle.finish();
        if self.ownership.is_none() {
            tracing_warn("the replication thread died: the VM's ownership record is not marked ended at its end");
        }
        self.role = r.role_before;
        if let Some(reply) = r.unprotecting.take() {
            let body = serde_json::json!({ "state": "unprotected", "generation": generation });
            let _ = reply.send(Reply::ok(body));
        }
    }

    /// At the end of a run slice, do what the schedule says: nothing, pre-copy a full
    /// checkpoint, or take the checkpoint that ends the epoch and hand it over.
    fn maybe_checkpoint(&mut self, console: &mut dyn ConsoleSink, idle: bool) -> Result<()> {
        let _ = console;
        let Some(r) = &mut self.replication else { return Ok(()) };
        let wanted = r.wanted();
        let now_ms = r.now_ms();
        match r.schedule.on_slice_end(now_ms, idle, wanted) {
            replica::SliceAction::Continue => Ok(()),
            replica::SliceAction::StartPrecopy => {
                r.precopy = Some(machine::checkpoint::PreCopy::start(&self.machine));
                Ok(())
            }
            replica::SliceAction::AbandonPrecopy => {
                r.precopy = None; // the backup went away: nothing to copy for
                Ok(())
            }
            replica::SliceAction::StepPrecopy => {
                let precopy = r.precopy.as_mut().expect("the schedule pre-copies only what was started");
                if !precopy.step(&self.machine, PRECOPY_PAGES_PER_SLICE) {
                    return Ok(());
                }
                let precopy = r.precopy.take().expect("checked above");
                let started = Instant::now();
                let payload = precopy.finish(&mut self.machine).context("cannot take a checkpoint")?;
                self.send_checkpoint(replica::CheckpointKind::Full, payload, started)
            }
            replica::SliceAction::Take { kind, .. } => self.send_checkpoint(kind, Vec::new(), Instant::now()),
        }
    }

    /// Take the checkpoint of the next epoch (unless `kind` is Full, whose payload was
    /// built by a pre-copy) and hand it to the replication thread.
    fn send_checkpoint(&mut self, kind: replica::CheckpointKind, payload: Vec<u8>, started: Instant) -> Result<()> {
        use replica::CheckpointKind;
        let Some(r) = &mut self.replication else { return Ok(()) };
        let epoch = r.schedule.epoch() + 1;
        let mut payload = match kind {
            CheckpointKind::Full if payload.is_empty() => {
                machine::checkpoint::take(&mut self.machine, true).context("cannot take a checkpoint")?
            }
            CheckpointKind::Full => payload,
            CheckpointKind::Incremental => {
                machine::checkpoint::take(&mut self.machine, false).context("cannot take a checkpoint")?
            }
            CheckpointKind::Discard => {
                // No backup to send it to: keep the dirty logs short; a full one follows later.
                self.machine.take_dirty_pages();
                self.machine.take_dirty_sectors();
                Vec::new()
            }
        };
        let full = kind == CheckpointKind::Full;
        if !payload.is_empty() && r.verify_every > 0 && (full || epoch % r.verify_every == 0) {
            machine::checkpoint::add_digest(&mut payload, &self.machine);
        }
        let pause_us = started.elapsed().as_micros() as u64;
        let pages = machine::checkpoint::page_count(&payload);
        r.last = Some(CheckpointStats { epoch, full, pause_us, bytes: payload.len(), pages });
        if kind != CheckpointKind::Discard {
            let t = &mut r.totals;
            t.count += 1;
            t.pause_us += pause_us;
            t.max_pause_us = t.max_pause_us.max(pause_us);
            t.bytes += payload.len() as u64;
            t.pages += pages as u64;
        }
        let icount = self.machine.icount();
        let _ = r.handle.tx.send(crate::replicate::primary::ToRepl::Checkpoint { epoch, icount, kind, payload });
        let now_ms = r.now_ms();
        assert_eq!(r.schedule.checkpoint_taken(now_ms), epoch);
        Ok(())
    }

    /// The VM ended: take the final checkpoint, let the replication thread settle the end
    /// with the backup and the ownership record, and send what it releases. `Some` when the
    /// replica turned out to be fenced (then nothing more leaves).
    fn end_replicated(&mut self, exit_code: u32, console: &mut dyn ConsoleSink) -> Result<Option<Outcome>> {
        let Some(r) = &mut self.replication else { return Ok(None) };
        r.precopy = None;
        if let Some(reply) = r.unprotecting.take() {
            let _ = reply.send(Reply::error(409, "the VM is ending: its end settles the replication"));
        }
        let wanted = r.wanted();
        let (_, kind) = r.schedule.final_checkpoint(wanted);
        self.route_outputs(console)?;
        self.send_checkpoint(kind, Vec::new(), Instant::now())?;
        let r = self.replication.as_ref().expect("checked above");
        let epoch = r.schedule.epoch();
        let _ = r.handle.tx.send(crate::replicate::primary::ToRepl::VmEnded { epoch, exit_code });
        let deadline = Instant::now() + END_WAIT;
        while self.finished.is_none() {
            let wait = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(wait) {
                Ok(HostEvent::Released { up_to_epoch }) => {
                    self.release_held(up_to_epoch);
                    self.flush_released(console)?;
                }
                Ok(HostEvent::Finished { exit_code, released }) => self.finished = Some((exit_code, released)),
                Ok(HostEvent::ReplicationStopped(message)) => return Ok(Some(Outcome::Fenced(message))),
                Ok(HostEvent::Detached { generation }) => {
                    // Replication stopped just before the end: the VM ends alone.
                    self.detached(generation);
                    self.flush_released(console)?;
                    return Ok(None);
                }
                Ok(HostEvent::Control(request)) => {
                    let _ = request.reply.send(Reply::error(409, "the VM is ending"));
                }
                Ok(_) => {} // the guest has ended: keys and frames have nowhere to go
                Err(_) => {
                    tracing_warn(
                        "the replication thread did not settle the VM's end in time; its last outputs are not sent",
                    );
                    return Ok(None);
                }
            }
        }
        self.flush_released(console)?;
        Ok(None)
    }

    /// Output commit's back-pressure: a guest that outputs faster than the backup
    /// acknowledges waits.
    fn wait_while_outputs_pile_up(&mut self, console: &mut dyn ConsoleSink) -> Result<Option<Outcome>> {
        while self.replication.as_ref().is_some_and(|r| r.schedule.must_wait()) {
            match self.events.recv_timeout(Duration::from_millis(100)) {
                Ok(event) => {
                    if let Some(outcome) = self.deliver(event)? {
                        return Ok(Some(outcome));
                    }
                    self.flush_released(console)?;
                }
                Err(_) => self.maybe_checkpoint(console, false)?,
            }
            self.flush_released(console)?;
        }
        Ok(None)
    }

    fn release_held(&mut self, up_to_epoch: u64) {
        if let Some(r) = &mut self.replication {
            let released = r.schedule.release(up_to_epoch);
            self.released.extend(released);
        }
    }

    fn flush_released(&mut self, console: &mut dyn ConsoleSink) -> Result<()> {
        let released = std::mem::take(&mut self.released);
        self.send_outputs(released, console)
    }

    /// Answer a control request; `Some` when it ends the run.
    fn control(&mut self, request: ControlRequest) -> Option<Outcome> {
        if request.command == Command::Unprotect {
            if let Some(reply) = self.unprotect(request.reply.clone()) {
                let _ = request.reply.send(reply);
            }
            return None;
        }
        let (reply, outcome) = match &request.command {
            Command::Status => (Reply::ok(serde_json::to_value(self.status()).expect("a status serializes")), None),
            Command::Pause => {
                self.paused = true;
                (Reply::ok(serde_json::json!({ "state": "paused", "icount": self.machine.icount() })), None)
            }
            Command::Resume => {
                self.paused = false;
                (Reply::ok(serde_json::json!({ "state": "running", "icount": self.machine.icount() })), None)
            }
            Command::Stop => (
                Reply::ok(serde_json::json!({ "state": "stopped", "icount": self.machine.icount() })),
                Some(Outcome::Stopped),
            ),
            Command::Snapshot { path } => (self.snapshot(path), None),
            Command::Protect(protect) => (self.protect(protect), None),
            Command::Unprotect => unreachable!("answered above"),
        };
        let _ = request.reply.send(reply);
        outcome
    }

    /// `ctl protect`: replicate this running VM to a waiting backup.
    fn protect(&mut self, request: &ProtectRequest) -> Reply {
        if let Some(r) = &self.replication {
            let backup = r.handle.backup;
            return Reply::error(
                409,
                format!("this VM is already protected: it replicates to {backup} (unprotect first)"),
            );
        }
        if self.ownership.is_none() {
            return Reply::error(
                409,
                "this VM holds no ownership record, without which a backup could never take over safely: start it \
                 with --store file:DIR (the store its backup uses) to protect it",
            );
        }
        let Some(events) = self.events_tx.clone() else {
            return Reply::error(409, "this VM cannot start replicating (it has no control API)");
        };
        let backup = match crate::replicate::resolve(&request.to) {
            Ok(backup) => backup,
            Err(e) => return Reply::error(400, format!("{e:#}")),
        };
        let key = match crate::replicate::load_key(&request.key) {
            Ok(key) => key,
            Err(e) => return Reply::error(400, format!("{e:#}")),
        };
        let options = ReplicationOptions {
            primary: crate::replicate::primary::PrimaryOptions {
                backup,
                key,
                heartbeat_ms: PROTECT_HEARTBEAT_MS,
                on_backup_loss: request.on_backup_loss,
                backup_loss_grace_ms: PROTECT_BACKUP_LOSS_GRACE_MS,
            },
            epoch_ms: request.epoch_ms,
            verify_every: 0,
        };
        let generation = self.ownership.as_ref().map_or(0, |o| o.generation);
        match self.start_replication(options, events) {
            Ok(()) => Reply::ok(serde_json::json!({
                "state": "protecting",
                "backup": backup.to_string(),
                "generation": generation,
                "epoch_ms": request.epoch_ms,
            })),
            Err(e) => Reply::error(500, format!("cannot start replicating: {e:#}")),
        }
    }

    /// `ctl unprotect`: the answer now when refused, or later (`reply` is kept) once the
    /// replication thread has made the backup's state stale and stopped.
    fn unprotect(&mut self, reply: Sender<Reply>) -> Option<Reply> {
        let Some(r) = &mut self.replication else {
            return Some(Reply::error(409, "this VM is not protected: it replicates to no backup"));
        };
        if r.unprotecting.is_some() {
            return Some(Reply::error(409, "an unprotect is already under way"));
        }
        let _ = r.handle.tx.send(crate::replicate::primary::ToRepl::Unprotect);
        r.unprotecting = Some(reply);
        None
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
            Err(e) => Reply::error(500, format!("snapshot failed: {e:#}")),
        }
    }

    /// What `GET /status` answers.
    pub fn status(&self) -> crate::status::Status {
        use crate::status::{CheckpointTotals, LastCheckpoint, Mode, Replication, State, Status};
        let replication = self.replication.as_ref().map(|r| {
            let shared = r.handle.shared.lock().expect("not poisoned").clone();
            let s = &shared.status;
            let lag_epochs = s.acked_epoch.map(|a| r.schedule.epoch().saturating_sub(a));
            let t = &r.totals;
            Replication {
                protected: s.protection == replica::Protection::Protected && s.streaming,
                protection: (&s.protection).into(),
                generation: s.generation,
                backup_connected: s.streaming,
                acked_epoch: s.acked_epoch,
                lag_epochs,
                lag_ms: lag_epochs.map(|l| l * r.schedule.epoch_ms()),
                released_epoch: s.released_up_to,
                unprotected_count: s.unprotected_count,
                resumed_checkpoints: s.resumed_checkpoints,
                log_bytes: s.log_bytes,
                bytes_sent: shared.bytes_sent,
                held_outputs: r.schedule.held_outputs() as u64,
                last_error: shared.last_error,
                last_checkpoint: r.last.map(|c| LastCheckpoint {
                    epoch: c.epoch,
                    full: c.full,
                    pause_ms: c.pause_us as f64 / 1e3,
                    bytes: c.bytes as u64,
                    pages: c.pages as u64,
                }),
                checkpoints: CheckpointTotals {
                    count: t.count,
                    pause_total_ms: t.pause_us as f64 / 1e3,
                    pause_avg_ms: if t.count == 0 { 0.0 } else { t.pause_us as f64 / t.count as f64 / 1e3 },
                    pause_max_ms: t.max_pause_us as f64 / 1e3,
                    bytes: t.bytes,
                    pages: t.pages,
                    bytes_per_s: t.bytes as f64 / r.started.elapsed().as_secs_f64().max(1e-9),
                },
            }
        });
        Status {
            state: if self.paused { State::Paused } else { State::Running },
            role: self.role,
            mode: if self.replication.is_some() { Mode::Checkpoint } else { Mode::None },
            vm_id: self.vm_id.clone(),
            icount: self.machine.icount(),
            guest_time_s: self.machine.time_ticks() as f64 / TIMEBASE_HZ as f64,
            reboots: Some(self.machine.reboots()),
            epoch: self.replication.as_ref().map_or(0, |r| r.schedule.epoch()),
            replication,
            backup: None,
            took_over: self.took_over.clone(),
        }
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
    ///
    /// A guest that waits for entropy is fed at once (the run loop does it on return),
    /// never after a guest timer: a program blocked in `getrandom` before the kernel's
    /// pool is ready would otherwise wait for the next timer, which in a tickless guest
    /// may be seconds away.
    fn idle(&mut self, deadline: Option<u64>) -> Result<Option<Outcome>> {
        if self.machine.wants_entropy() {
            return self.poll_events();
        }
        let guest_now = self.machine.time_ticks();
        let wait = match (self.clock, deadline) {
            (Clock::Fast, Some(_)) => Some(Duration::ZERO),
            (Clock::Realtime, Some(d)) => {
                let wall = self.wall_ticks();
                Some(Duration::from_nanos(
                    (d.saturating_sub(wall) as u128 * 1_000_000_000 / TIMEBASE_HZ as u128) as u64,
                ))
            }
            (_, None) if !self.events_possible => return Ok(Some(Outcome::Hung)),
            (_, None) => None,
        };
        // Outputs held for output commit never wait on a guest timer: the epoch must end
        // (and the backup acknowledge it) as soon as the minimum epoch allows. Nor does a
        // pre-copy: an idle guest's time is the copy's.
        let limit = self.replication.as_ref().and_then(|r| r.schedule.idle_wait_limit_ms(r.now_ms()));
        let limit = limit.map(Duration::from_millis);
        let capped = limit.is_some_and(|l| wait.is_none_or(|w| l < w));
        let wait = if capped { limit } else { wait };
        let event = match wait {
            Some(w) if w.is_zero() => self.events.try_recv().ok(),
            Some(w) => match self.events.recv_timeout(w) {
                Ok(e) => Some(e),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    // Nothing can wake us early any more: the wall clock still rules.
                    self.events_possible = false;
                    std::thread::sleep(w);
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
            // Cut short for output commit: guest time goes as far as the wall clock, no further.
            (None, d) if capped => {
                let wall = if self.clock == Clock::Fast { guest_now } else { self.wall_ticks() };
                d.map_or(guest_now, |d| d.min(wall)).max(guest_now)
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

    /// Outputs produced by the last slice: a replicated primary holds them until the
    /// backup acknowledges the epoch that made them (or, with no backup connected, until
    /// that epoch's checkpoint is taken); otherwise they leave at once.
    fn route_outputs(&mut self, console: &mut dyn ConsoleSink) -> Result<()> {
        let outputs = self.machine.take_outputs();
        self.flush_released(console)?;
        let Some(r) = &mut self.replication else {
            return self.send_outputs(outputs, console);
        };
        for output in outputs {
            r.schedule.hold(output);
        }
        Ok(())
    }

    fn send_outputs(&mut self, outputs: Vec<machine::Output>, console: &mut dyn ConsoleSink) -> Result<()> {
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
                OutputKind::Reset => console.rebooted().context("cannot write console output")?,
                OutputKind::PowerOff { .. } => {}
            }
        }
        console.flush().context("cannot write console output")
    }
}

/// How far the guest's clock is behind the host's as the driver starts (a fresh boot:
/// the time to build the machine; a takeover: the failover's), to be caught up.
fn start_lag_ticks(machine: &Machine) -> u64 {
    let host = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    crate::pacer::start_lag_ticks(u64::try_from(host.as_nanos()).unwrap_or(u64::MAX), machine.rtc_unix_ns())
}

fn tracing_warn(message: &str) {
    let _ = writeln!(std::io::stderr(), "ftvm: warning: {message}");
}
