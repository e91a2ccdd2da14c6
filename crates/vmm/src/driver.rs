//! The live driver: runs a [`Vm`] against the real world. It stamps host events (keys,
//! frames, entropy, idle skips) with the instruction count at which they enter, shows each
//! input, output and slice boundary to the replication mode ([`crate::mode`]), which
//! decides what is held, released and when the machine waits, and routes the outputs that
//! leave to the terminal and the TAP device. It keeps no input log: a mode or an observer
//! that needs one keeps its own (a recorder streams it to disk).
//!
//! A backup runs in the same driver: its mode keeps the machine stopped while it applies
//! checkpoints, and a takeover is a change of mode ([`Verdict::GoLive`]): the driver runs
//! the machine on as the primary, standalone, and calls the go-live hooks (TAP, terminal,
//! the MAC announcement).
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

use crate::control::{Command, ControlRequest, ProtectMode, ProtectRequest, Reply};
use crate::host::tap::Tap;
use crate::host::{self, HostEvent};
use crate::mode::checkpoint::{CheckpointPrimary, ReplicationOptions};
use crate::mode::ModeError;
use crate::mode::{EndProgress, Mode, Observer, StandDown, Standalone, Verdict};
use crate::replicate::{chain, ReplicationError};
use crate::vm::Vm;
use machine::board::TIMEBASE_HZ;
use machine::{Input, InputKind, OutputKind, RunExit};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::time::{Duration, Instant};

/// Why the run stopped with an error (the guest's own ending is an [`Outcome`]).
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("cannot deliver input to the machine")]
    Input(#[source] crate::mode::BoxError),
    #[error("cannot read host entropy")]
    Entropy(#[source] std::io::Error),
    #[error("cannot write console output")]
    Console(#[source] std::io::Error),
    #[error(transparent)]
    Mode(#[from] ModeError),
    #[error(transparent)]
    Replication(#[from] ReplicationError),
}

type Result<T, E = DriverError> = std::result::Result<T, E>;

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
    /// Live migration: the VM runs elsewhere now (the message says where).
    Migrated(String),
    /// A backup stood down without running the VM (the VM ended on its primary, or the
    /// primary unprotected it); the ownership record is not touched.
    StoodDown(StandDown),
}

/// Called when a backup takes over, before the machine runs (the binary attaches the TAP,
/// the terminal, announces the MAC).
pub type GoLiveHook = Box<dyn FnMut(&crate::status::Takeover)>;
/// The mode a backup that took over runs the VM under, made from the machine as it stands
/// ([`Driver::run_live_under`]; [`Standalone`] when none is given).
pub type LiveMode<V> = Box<dyn FnOnce(&mut V, &crate::status::Takeover) -> Box<dyn Mode<V>>>;

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

pub struct Driver<V: Vm = machine::Machine> {
    pub machine: V,
    events: Receiver<HostEvent>,
    /// False when no host source can ever send an event (stdin closed, no TAP).
    pub events_possible: bool,
    pub tap: Option<Tap>,
    pub clock: Clock,
    started: Instant,
    /// Guest ticks at start, so that wall time maps onto guest time.
    start_ticks: u64,
    /// Paused through the control API: the machine does not run.
    paused: bool,
    /// Outputs released by a mode that was shut down (unprotect), not yet sent.
    released: Vec<machine::Output>,
    /// What decides what is held, released and when the machine stops.
    mode: Box<dyn Mode<V>>,
    /// What watches the inputs and the outputs that leave (recorders, the keeper).
    observers: Vec<Box<dyn Observer<V>>>,
    /// What `status` reports of a takeover, when this VM is a backup that took over.
    pub took_over: Option<crate::status::Takeover>,
    /// What `status` reports as the role when the mode does not say (a backup that took
    /// over is a primary, unprotected).
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
    /// What runs when a backup takes over ([`Driver::on_go_live`]).
    go_live_hooks: Vec<GoLiveHook>,
    /// Arrived by live migration, not run yet: the downtime ends at the first slice.
    arriving: bool,
    /// `ctl migrate` of a protected VM, waiting for its backup to be released (made stale
    /// and told to stand down, as by `ctl unprotect`) before the migration starts.
    pending_migration: Option<(crate::control::MigrateRequest, Sender<Reply>)>,
    /// The migrations out of and into this replica so far (settled ones; status adds the
    /// one under way).
    migrations: crate::status::MigrationTotals,
    /// The mode after a takeover ([`Driver::run_live_under`]).
    live_mode: Option<LiveMode<V>>,
}

impl<V: Vm + 'static> Driver<V> {
    pub fn new(machine: V, events: Receiver<HostEvent>, clock: Clock) -> Driver<V> {
        let start_ticks = machine.time_ticks() + start_lag_ticks(&machine);
        Driver {
            machine,
            events,
            events_possible: true,
            tap: None,
            clock,
            started: Instant::now(),
            start_ticks,
            paused: false,
            released: Vec::new(),
            mode: Box::new(Standalone),
            observers: Vec::new(),
            took_over: None,
            role: crate::status::Role::Standalone,
            vm_id: None,
            ownership: None,
            events_tx: None,
            pacer: crate::pacer::Pacer::new(),
            entropy: host::EntropySource::Host,
            go_live_hooks: Vec::new(),
            arriving: false,
            pending_migration: None,
            migrations: Default::default(),
            live_mode: None,
        }
    }

    /// Call `hook` when a backup mode takes the VM over, before the machine runs.
    pub fn on_go_live(&mut self, hook: GoLiveHook) {
        self.go_live_hooks.push(hook);
    }

    /// After a takeover, run the VM under the mode `make` builds (a resilient backup's
    /// keeper monitor: `vmm::keeper::resilient_backup`), not [`Standalone`].
    pub fn run_live_under(&mut self, make: LiveMode<V>) {
        self.live_mode = Some(make);
    }

    /// A backup took the VM over: its mode hands the ownership record back, and the machine,
    /// holding the checkpoint it went live from, runs on as the primary, standalone (`ctl
    /// protect` gives it a new backup) or under the mode given to [`Driver::run_live_under`];
    /// guest time maps onto the wall clock from here.
    fn go_live(&mut self, takeover: crate::status::Takeover) {
        let mode = match self.live_mode.take() {
            Some(make) => make(&mut self.machine, &takeover),
            None => Box::new(Standalone),
        };
        self.set_mode(mode);
        if self.ownership.is_none() {
            crate::log::warn("the VM was taken over without its ownership record: it cannot be protected again");
        }
        if self.vm_id.is_none() {
            self.vm_id = self.ownership.as_ref().map(|o| o.vm_id.clone());
        }
        self.role = crate::status::Role::Primary;
        self.started = Instant::now();
        self.start_ticks = self.machine.time_ticks() + start_lag_ticks(&self.machine);
        self.pacer = crate::pacer::Pacer::new();
        for hook in &mut self.go_live_hooks {
            hook(&takeover);
        }
        self.arriving = takeover.migration.is_some();
        self.took_over = Some(takeover);
    }

    /// Run under `mode` from now on (the mode in place is shut down; a record it held is
    /// lost, so swap only a [`Standalone`] one).
    pub fn set_mode(&mut self, mode: Box<dyn Mode<V>>) {
        // A migration out ends with its mode: what it sent and, called off, its pause count.
        if let Some(m) = self.status().migration {
            self.migrations.bytes_sent += m.bytes_sent;
            if m.phase == crate::status::MigrationPhase::CalledOff {
                self.migrations.called_off += 1;
                if m.paused_ms.is_some() {
                    self.migrations.last_downtime_ms = m.paused_ms;
                }
            }
        }
        let mut old = std::mem::replace(&mut self.mode, mode);
        self.released.extend(old.take_released());
        if let Some(ownership) = old.finish() {
            self.ownership = Some(ownership);
        }
    }

    /// Watch the run with `observer` from now on.
    pub fn add_observer(&mut self, observer: Box<dyn Observer<V>>) {
        self.observers.push(observer);
    }

    /// Whether a mode other than [`Standalone`] runs the VM.
    pub fn replicating(&self) -> bool {
        self.mode.kind() != crate::status::Mode::None
    }

    /// Start replicating to a backup (at boot, or `ctl protect` while the VM runs): the VM's
    /// ownership record goes to a new replication thread, and the backup's first checkpoint
    /// is a full one, pre-copied while the guest runs.
    pub fn start_replication(
        &mut self,
        options: ReplicationOptions,
        events: Sender<HostEvent>,
    ) -> Result<(), ReplicationError> {
        if self.replicating() {
            return Err(ReplicationError::AlreadyReplicating);
        }
        let ownership = self.ownership.take().ok_or(ReplicationError::NoRecord)?;
        let mode = CheckpointPrimary::start(options, ownership, events, &mut self.machine)?;
        self.set_mode(Box::new(mode));
        Ok(())
    }

    /// Stamp an input at the current icount, show it to the mode and the observers, and
    /// give it to the machine. Shown first: the machine applies an input stamped where it
    /// stands at once, and a log (the keeper's, a recording) must hold an input before it
    /// takes effect (one that crashes the monitor is then replayed, and found poison).
    fn push(&mut self, kind: InputKind) -> Result<()> {
        if !self.mode.stamps_inputs() {
            return Ok(());
        }
        let input = Input { icount: self.machine.icount(), kind };
        self.mode.on_input(&input)?;
        for observer in &mut self.observers {
            observer.on_input(&input)?;
        }
        self.machine.push_input(input).map_err(|e| DriverError::Input(e.into()))?;
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
            // Not this replica's end: the VM lives on elsewhere, or ended there.
            Outcome::Fenced(_) | Outcome::Migrated(_) | Outcome::StoodDown(_) => return Ok(outcome),
        };
        if let Some(fenced) = self.end(exit_code, console)? {
            return Ok(fenced);
        }
        for observer in &mut self.observers {
            observer.on_end(&self.machine, exit_code);
        }
        // The record is the driver's when no mode holds it (running alone, or replication
        // stopped just before the end): mark it ended, so that no other replica ever brings
        // the VM back (a replication thread does this itself).
        if let Some(ownership) = &mut self.ownership {
            if let Err(e) = ownership.mark_ended(exit_code) {
                crate::log::warn(chain(&e));
            }
        }
        Ok(outcome)
    }

    fn run_until_end(&mut self, console: &mut dyn ConsoleSink) -> Result<Outcome> {
        loop {
            if self.paused {
                // A mode that limits idle waits (the keeper's heartbeat) sees slice ends
                // while the VM is paused too.
                let wait = self.mode.idle_wait_limit().unwrap_or(Duration::MAX);
                match self.events.recv_timeout(wait) {
                    Ok(event) => {
                        if let Some(outcome) = self.deliver(event)? {
                            return Ok(outcome);
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => self.slice_end(true)?,
                    Err(RecvTimeoutError::Disconnected) => self.paused = false, // nobody can resume us: carry on
                }
                continue;
            }
            // A backup's machine does not run until it takes over.
            if let Some(outcome) = self.wait_while_the_mode_says(console)? {
                return Ok(outcome);
            }
            let target = self.mode.next_slice_end(self.machine.icount());
            if std::mem::take(&mut self.arriving) {
                if let Some(arrival) = self.took_over.as_mut().and_then(|t| t.migration.as_mut()) {
                    arrival.running(crate::replicate::migrate::unix_us());
                    self.migrations.arrived += 1;
                    self.migrations.last_downtime_ms = Some(arrival.downtime_ms);
                }
            }
            let exit = self.run_slice(target)?;
            self.route_outputs(console)?;
            self.slice_end(matches!(exit, RunExit::Idle { .. }))?;
            if let Some(outcome) = self.wait_while_the_mode_says(console)? {
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
            if self.machine.wants_entropy() && self.mode.stamps_inputs() {
                let bytes = self.entropy.draw(ENTROPY_CHUNK).map_err(DriverError::Entropy)?;
                self.push(InputKind::Entropy(bytes))?;
            }
        }
    }

    /// A slice ended: the mode, then the observers, see the stopped machine.
    fn slice_end(&mut self, idle: bool) -> Result<()> {
        self.mode.on_slice_end(&mut self.machine, idle)?;
        for observer in &mut self.observers {
            observer.on_slice_end(&self.machine)?;
        }
        Ok(())
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
            HostEvent::Mode(event) => match self.mode.on_event(&mut self.machine, event) {
                Verdict::Continue | Verdict::Settled => {}
                Verdict::Fenced(message) => return Ok(Some(Outcome::Fenced(message))),
                Verdict::Migrated(message) => return Ok(Some(Outcome::Migrated(message))),
                Verdict::Detached => {
                    self.detach();
                    self.start_pending_migration();
                }
                Verdict::GoLive(takeover) => self.go_live(takeover),
                Verdict::StandDown(why) => return Ok(Some(Outcome::StoodDown(why))),
            },
        }
        Ok(None)
    }

    /// The mode stopped protecting the VM (unprotect): what it released leaves, the record
    /// comes back from its thread, and the VM runs on standalone.
    fn detach(&mut self) {
        self.set_mode(Box::new(Standalone));
    }

    /// The VM ended: the mode settles its end (checkpoint mode: the final checkpoint, the
    /// backup told, the record marked ended by the replication thread), and what it
    /// releases leaves. `Some` when the replica turned out to be fenced (then nothing more
    /// leaves).
    fn end(&mut self, exit_code: u32, console: &mut dyn ConsoleSink) -> Result<Option<Outcome>> {
        self.route_outputs(console)?;
        if self.mode.begin_end(&mut self.machine, exit_code)? == EndProgress::Pending {
            let deadline = Instant::now() + END_WAIT;
            loop {
                let wait = deadline.saturating_duration_since(Instant::now());
                match self.events.recv_timeout(wait) {
                    Ok(HostEvent::Mode(event)) => match self.mode.on_event(&mut self.machine, event) {
                        Verdict::Continue => self.flush_released(console)?,
                        // A backup's verdicts: its end was settled at once.
                        Verdict::Settled | Verdict::GoLive(_) | Verdict::StandDown(_) => break,
                        Verdict::Fenced(message) => return Ok(Some(Outcome::Fenced(message))),
                        Verdict::Migrated(message) => return Ok(Some(Outcome::Migrated(message))),
                        Verdict::Detached => {
                            // Replication stopped just before the end: the VM ends alone.
                            self.detach();
                            if let Some((_, reply)) = self.pending_migration.take() {
                                let _ = reply.send(Reply::error(409, "the VM ended before it could migrate"));
                            }
                            break;
                        }
                    },
                    Ok(HostEvent::Control(request)) => {
                        let _ = request.reply.send(Reply::error(409, "the VM is ending"));
                    }
                    Ok(_) => {} // the guest has ended: keys and frames have nowhere to go
                    Err(_) => {
                        crate::log::warn(
                            "the replication thread did not settle the VM's end in time; its last outputs are not sent",
                        );
                        return Ok(None);
                    }
                }
            }
        }
        self.flush_released(console)?;
        Ok(None)
    }

    /// While the mode says the machine must wait (output commit's back-pressure), deliver
    /// events and let the mode look again every [`crate::mode::WAIT_TICK`].
    fn wait_while_the_mode_says(&mut self, console: &mut dyn ConsoleSink) -> Result<Option<Outcome>> {
        while self.mode.must_wait() {
            match self.events.recv_timeout(crate::mode::WAIT_TICK) {
                Ok(event) => {
                    if let Some(outcome) = self.deliver(event)? {
                        return Ok(Some(outcome));
                    }
                }
                Err(RecvTimeoutError::Timeout) => self.slice_end(false)?,
                Err(RecvTimeoutError::Disconnected) => {
                    // Nobody can send (the mode's thread is gone too): look again each tick.
                    std::thread::sleep(crate::mode::WAIT_TICK);
                    self.slice_end(false)?;
                }
            }
            self.flush_released(console)?;
        }
        Ok(None)
    }

    fn flush_released(&mut self, console: &mut dyn ConsoleSink) -> Result<()> {
        let mut released = std::mem::take(&mut self.released);
        released.extend(self.mode.take_released());
        self.send_outputs(released, console)
    }

    /// Answer a control request; `Some` when it ends the run.
    fn control(&mut self, request: ControlRequest) -> Option<Outcome> {
        if let Some(reply) = self.mode.control(&request.command) {
            let _ = request.reply.send(reply);
            return None;
        }
        if request.command == Command::Unprotect {
            if let Some(reply) = self.unprotect(request.reply.clone()) {
                let _ = request.reply.send(reply);
            }
            return None;
        }
        if let Command::Migrate(migrate) = &request.command {
            if let Some(reply) = self.migrate(migrate, request.reply.clone()) {
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
            Command::Handover(_) => (
                Reply::error(
                    409,
                    "a handover to a new monitor needs a VM started with --resilient (its keeper starts it)",
                ),
                None,
            ),
            Command::Unprotect | Command::Migrate(_) => unreachable!("answered above"),
        };
        let _ = request.reply.send(reply);
        outcome
    }

    /// `ctl protect`: replicate this running VM to a waiting backup.
    fn protect(&mut self, request: &ProtectRequest) -> Reply {
        if let Some(backup) = self.mode.protected_to() {
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
            Err(e) => return Reply::error(400, chain(&e)),
        };
        let key = match crate::replicate::load_key(&request.key) {
            Ok(key) => key,
            Err(e) => return Reply::error(400, chain(&e)),
        };
        let primary = crate::replicate::primary::PrimaryOptions {
            backup,
            key,
            heartbeat_ms: PROTECT_HEARTBEAT_MS,
            on_backup_loss: request.on_backup_loss,
            backup_loss_grace_ms: PROTECT_BACKUP_LOSS_GRACE_MS,
        };
        let generation = self.ownership.as_ref().map_or(0, |o| o.generation);
        let started = match request.mode {
            ProtectMode::Checkpoint => {
                let options = ReplicationOptions { primary, epoch_ms: request.epoch_ms, verify_every: 0 };
                self.start_replication(options, events).map_err(|e| chain(&e))
            }
            ProtectMode::Lockstep { digest_every_ms } => self.start_lockstep(primary, digest_every_ms, events),
        };
        match started {
            Ok(()) => Reply::ok(serde_json::json!({
                "state": "protecting",
                "mode": request.mode.name(),
                "backup": backup.to_string(),
                "generation": generation,
                "epoch_ms": request.epoch_ms,
            })),
            Err(e) => Reply::error(500, format!("cannot start replicating: {e}")),
        }
    }

    /// `ctl protect --mode lockstep`: the running VM's whole state goes to the backup as the
    /// stream's start (the guest pauses while it is taken), and the inputs follow it. The
    /// boot parameters are never sent: a VM that has run is past icount 0, where only a
    /// backup booting from the same images needs them.
    fn start_lockstep(
        &mut self,
        primary: crate::replicate::primary::PrimaryOptions,
        digest_every_ms: u64,
        events: Sender<HostEvent>,
    ) -> Result<(), String> {
        use crate::mode::lockstep::{BootParams, LockstepOptions, LockstepPrimary};
        if self.machine.icount() == 0 {
            return Err("the VM has not run yet: start it with --replicate-to --mode lockstep instead".into());
        }
        let ownership = self.ownership.take().ok_or_else(|| chain(&ReplicationError::NoRecord))?;
        let leader = replica::lockstep::LeaderConfig { digest_every_ms, ..replica::lockstep::LeaderConfig::default() };
        let boot = BootParams { bootargs: String::new(), boot_unix_ns: 0 };
        let options = LockstepOptions { primary, leader, boot };
        // The state is whole: what was written before needs no second copy in it (the dirty
        // logs of a VM that ran alone hold every page written since it started).
        self.machine.take_dirty_pages();
        self.machine.take_dirty_sectors();
        let mode = LockstepPrimary::start(options, ownership, events, &mut self.machine).map_err(|e| chain(&e))?;
        self.set_mode(Box::new(mode));
        Ok(())
    }

    /// `ctl migrate`: hand this running VM to a waiting backup elsewhere (see
    /// [`crate::mode::migrate`]). The answer now when refused, or later (the mode keeps
    /// `reply`) once the VM was handed over or the migration called off. A protected VM first
    /// releases its backup as `ctl unprotect` does — the record's generation swapped forward,
    /// so that the backup can never take over, then told to stand down — and migrates once
    /// that is done; the destination is its backup during the pre-copy, and `ctl protect` on
    /// the destination protects it again afterwards.
    fn migrate(&mut self, request: &crate::control::MigrateRequest, reply: Sender<Reply>) -> Option<Reply> {
        if self.pending_migration.is_some() || self.status().migration.is_some_and(|m| m.phase.under_way()) {
            return Some(Reply::error(409, "a migration of this VM is under way already"));
        }
        if let Some(backup) = self.mode.protected_to() {
            let (released, _answer) = std::sync::mpsc::channel();
            if let Some(refused) = self.mode.unprotect(released) {
                let why = refused.body["error"].as_str().unwrap_or("refused").to_string();
                return Some(Reply::error(refused.status, format!("cannot release the backup {backup}: {why}")));
            }
            crate::log::line(
                crate::log::Source::Replication,
                format_args!("migration to {}: releasing the backup {backup} first", request.to),
            );
            self.pending_migration = Some((request.clone(), reply));
            return None;
        }
        if self.ownership.is_none() {
            return Some(Reply::error(
                409,
                "this VM holds no ownership record, which a migration hands over: start it with --store (the \
                 store its destination uses)",
            ));
        }
        let Some(events) = self.events_tx.clone() else {
            return Some(Reply::error(409, "this VM cannot migrate (it has no control API)"));
        };
        let (to, key) = match (crate::replicate::resolve(&request.to), crate::replicate::load_key(&request.key)) {
            (Ok(to), Ok(key)) => (to, key),
            (Err(e), _) | (_, Err(e)) => return Some(Reply::error(400, chain(&e))),
        };
        let options = ReplicationOptions {
            primary: crate::replicate::primary::PrimaryOptions {
                backup: to,
                key,
                heartbeat_ms: PROTECT_HEARTBEAT_MS,
                on_backup_loss: replica::BackupLossPolicy::Continue,
                backup_loss_grace_ms: PROTECT_BACKUP_LOSS_GRACE_MS,
            },
            epoch_ms: request.epoch_ms,
            verify_every: 0,
        };
        let ownership = self.ownership.take().expect("checked above");
        match CheckpointPrimary::start(options, ownership, events, &mut self.machine) {
            Ok(inner) => {
                let mode = crate::mode::migrate::MigrationSource::new(inner, to.to_string(), reply);
                self.set_mode(Box::new(mode));
                self.migrations.started += 1;
                None
            }
            Err(e) => Some(Reply::error(500, format!("cannot start migrating: {}", chain(&e)))),
        }
    }

    /// The backup of a VM asked to migrate is released: the migration starts.
    fn start_pending_migration(&mut self) {
        if let Some((request, reply)) = self.pending_migration.take() {
            if let Some(answer) = self.migrate(&request, reply.clone()) {
                let _ = reply.send(answer);
            }
        }
    }

    /// `ctl unprotect`: the answer now when refused, or later (the mode keeps `reply`) once
    /// the replication thread has made the backup's state stale and stopped.
    fn unprotect(&mut self, reply: Sender<Reply>) -> Option<Reply> {
        self.mode.unprotect(reply)
    }

    fn snapshot(&self, path: &std::path::Path) -> Reply {
        let started = Instant::now();
        match self.machine.save_to_path(path) {
            Ok(bytes) => Reply::ok(serde_json::json!({
                "path": path,
                "bytes": bytes,
                "icount": self.machine.icount(),
                "pause_ms": started.elapsed().as_secs_f64() * 1e3,
            })),
            Err(e) => Reply::error(500, format!("snapshot failed: {}", chain(&e))),
        }
    }

    /// What `GET /status` answers: the driver's part, then the mode's.
    pub fn status(&self) -> crate::status::Status {
        use crate::status::{State, Status};
        let mut status = Status {
            state: if self.paused { State::Paused } else { State::Running },
            role: self.role,
            mode: self.mode.kind(),
            vm_id: self.vm_id.clone(),
            icount: self.machine.icount(),
            guest_time_s: self.machine.time_ticks() as f64 / TIMEBASE_HZ as f64,
            reboots: Some(self.machine.reboots()),
            epoch: 0,
            replication: None,
            backup: None,
            took_over: self.took_over.clone(),
            lockstep: None,
            migration: None,
            migrations: None,
        };
        self.mode.report(&mut status);
        let under_way = status.migration.as_ref().filter(|m| m.phase.under_way());
        if self.migrations.started > 0 || self.migrations.arrived > 0 {
            let mut totals = self.migrations.clone();
            totals.bytes_sent += under_way.map_or(0, |m| m.bytes_sent);
            status.migrations = Some(totals);
        }
        status
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
        // The mode may cut the wait short (checkpoint mode: outputs held for output commit,
        // or a pre-copy under way, never wait on a guest timer).
        let limit = self.mode.idle_wait_limit();
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

    /// Outputs produced by the last slice go through the mode: what it returns leaves now,
    /// the rest it holds (checkpoint mode: until the backup acknowledges their epoch).
    fn route_outputs(&mut self, console: &mut dyn ConsoleSink) -> Result<()> {
        let outputs = self.machine.take_outputs();
        for observer in &mut self.observers {
            observer.on_outputs_produced(&outputs);
        }
        self.flush_released(console)?;
        let now = self.mode.on_outputs(outputs);
        self.send_outputs(now, console)
    }

    fn send_outputs(&mut self, outputs: Vec<machine::Output>, console: &mut dyn ConsoleSink) -> Result<()> {
        if outputs.is_empty() {
            return Ok(());
        }
        for output in outputs {
            for observer in &mut self.observers {
                observer.on_output_left(&output);
            }
            match output.kind {
                OutputKind::Console(bytes) => console.write(&bytes).map_err(DriverError::Console)?,
                OutputKind::NetFrame(frame) => {
                    if let Some(tap) = &mut self.tap {
                        // A frame the host cannot take is lost, as on a wire; TCP recovers.
                        if let Err(e) = tap.send(&frame) {
                            crate::log::warn(format_args!("TAP {}: frame dropped: {e}", tap.name));
                        }
                    }
                }
                OutputKind::Reset => console.rebooted().map_err(DriverError::Console)?,
                OutputKind::PowerOff { .. } => {}
            }
        }
        console.flush().map_err(DriverError::Console)
    }
}

/// How far the guest's clock is behind the host's as the driver starts (a fresh boot:
/// the time to build the machine; a takeover: the failover's), to be caught up.
fn start_lag_ticks<V: Vm>(machine: &V) -> u64 {
    let host = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    crate::pacer::start_lag_ticks(u64::try_from(host.as_nanos()).unwrap_or(u64::MAX), machine.rtc_unix_ns())
}
