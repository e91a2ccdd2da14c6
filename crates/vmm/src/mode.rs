//! The replication-mode seam (DESIGN.md §3): the driver runs the machine and talks to the
//! world; a [`Mode`] sees each input as it is stamped, each output as it is produced and
//! each slice boundary, and decides what is held, what is released and when the machine
//! must stop. [`Standalone`] holds nothing; [`checkpoint::CheckpointPrimary`] is checkpoint
//! mode's primary, applying `replica`'s pure schedule; [`backup::CheckpointBackup`] is its
//! backup, which keeps the machine stopped while it applies whole checkpoints and, on a
//! takeover, hands the same driver over to [`Standalone`] ([`Verdict::GoLive`]). An
//! [`Observer`] only watches (a recorder, the keeper's log): it sees the same inputs and
//! the outputs as they leave.
//!
//! Modes and observers run on the driver's thread between run slices: whatever they do
//! with sockets or files goes through their own threads, which talk back through
//! [`ModeEvent`]s on the driver's event channel.

pub mod backup;
pub mod checkpoint;
pub mod lockstep;
pub mod lockstep_follower;
pub mod migrate;

use crate::control::{Command, Reply};
use crate::status::Status;
use crate::vm::Vm;
use machine::{Input, Output};
use std::sync::mpsc::Sender;
use std::time::Duration;

/// Instructions per run slice between looks at the host (about 10-20 ms of guest work).
pub const SLICE_ICOUNT: u64 = 2_000_000;

/// A boxed error from a mode's edge (a checkpoint the machine could not take, a log that
/// could not be written).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a mode could not do what a slice boundary asked of it: the run stops.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct ModeError {
    what: String,
    #[source]
    source: Option<BoxError>,
}

impl ModeError {
    pub fn new(what: impl Into<String>, source: impl Into<BoxError>) -> ModeError {
        ModeError { what: what.into(), source: Some(source.into()) }
    }

    pub fn message(what: impl Into<String>) -> ModeError {
        ModeError { what: what.into(), source: None }
    }
}

/// Something a mode's own thread tells the driver (through the driver's event channel, as
/// [`crate::host::HostEvent::Mode`]). New modes add their variants here.
#[derive(Debug)]
pub enum ModeEvent {
    /// Checkpoint mode, output commit: the backup holds every epoch up to this one.
    Released { up_to_epoch: u64 },
    /// Checkpoint mode: this replica must stop (another replica owns the VM).
    Stopped(String),
    /// Checkpoint mode: the VM's end is settled (the backup told, or the ownership record
    /// marked ended); `released`: whether the last outputs were released.
    Finished { exit_code: u32, released: bool },
    /// Checkpoint mode: replication stopped (unprotect); no backup can take over at or
    /// after `generation`; the thread hands the ownership record back when shut down.
    Detached { generation: u64 },
    /// Live migration: the destination owns the VM at `generation`; this replica stops.
    HandedOver { generation: u64 },
    /// Checkpoint backup: apply this whole checkpoint (the machine's format) to the stopped
    /// machine, then tell the protocol thread how it went. `run_id`: the primary run that
    /// took it (with `epoch`, what a resilient backup keeps: [`replica::BackupKept`]).
    Apply { run_id: u64, epoch: u64, icount: u64, payload: Vec<u8> },
    /// Checkpoint backup: the primary fell silent and the ownership record is this
    /// replica's now (swapped to `generation`): go live from the checkpoint of `epoch`,
    /// the last one handed over (every [`ModeEvent::Apply`] before this event was delivered
    /// first). `last_heard_ms`: when the old primary's last authenticated frame came
    /// ([`crate::replicate::now_ms`]'s clock).
    /// `migration`: how a planned switchover (live migration) went, if it was one.
    TookOver { epoch: u64, generation: u64, last_heard_ms: Option<u64>, migration: Option<crate::status::Arrival> },
    /// Checkpoint backup: the VM ended on the primary with this exit code.
    EndedOnPrimary { exit_code: u32 },
    /// Checkpoint backup: the primary stopped replicating to this backup (unprotect) after
    /// making its state stale: it can never take over.
    Unprotected,
}

/// What the driver does after a mode heard its event.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Run on (released outputs, if any, are taken with [`Mode::take_released`]).
    Continue,
    /// This replica is fenced off: stop at once, nothing more leaves.
    Fenced(String),
    /// The mode stopped protecting the VM: the driver takes its released outputs, shuts it
    /// down ([`Mode::finish`]) and runs on standalone.
    Detached,
    /// The VM's end is settled ([`Mode::begin_end`] answered [`EndProgress::Pending`]).
    Settled,
    /// Live migration: the VM went elsewhere (the message says where); stop at once,
    /// nothing more leaves, and leave the ownership record alone.
    Migrated(String),
    /// This replica owns the VM now (a backup took over): the driver shuts the mode down
    /// ([`Mode::finish`] hands the ownership record back), runs the machine as it stands
    /// under [`Standalone`] as the primary (which `ctl protect` can protect again), and
    /// calls the go-live hooks ([`crate::driver::Driver::on_go_live`]).
    GoLive(crate::status::Takeover),
    /// This replica stops without running the VM (a backup whose VM ended elsewhere, or
    /// that can never take over): the run ends with [`crate::driver::Outcome::StoodDown`],
    /// and the ownership record is not touched.
    StandDown(StandDown),
}

/// Why a backup stood down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StandDown {
    /// The VM ended on the primary with this exit code.
    EndedOnPrimary { exit_code: u32 },
    /// The primary stopped replicating to this backup (`ctl unprotect`).
    Unprotected,
}

/// How far a mode got with the VM's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndProgress {
    /// Nothing more to wait for.
    Settled,
    /// The driver waits for events until [`Verdict::Settled`] (or a timeout).
    Pending,
}

/// The replication-mode seam. Every method but [`Mode::kind`] has the standalone answer as
/// its default, so a mode states only where it differs.
///
/// The driver's loop, per slice: run to [`Mode::next_slice_end`] (each input the driver
/// stamps meanwhile — pacing, idle skips, keys, frames, entropy — goes to
/// [`Mode::on_input`] right after the machine took it); the slice's outputs go through
/// [`Mode::on_outputs`] (what it returns leaves now, the rest it holds); then
/// [`Mode::on_slice_end`]; then, while [`Mode::must_wait`], the machine does not run (the
/// driver delivers events and calls `on_slice_end` again every [`WAIT_TICK`]). Events of
/// the mode's own thread come back through [`Mode::on_event`]; outputs it releases later
/// leave through [`Mode::take_released`], which the driver calls after every event and
/// slice.
pub trait Mode<V: Vm> {
    /// What status reports as the replication mode.
    fn kind(&self) -> crate::status::Mode;

    /// Where the next slice ends when the machine is at `icount` (a lockstep follower:
    /// never past the last input it holds).
    fn next_slice_end(&self, icount: u64) -> u64 {
        icount + SLICE_ICOUNT
    }

    /// Whether the driver stamps inputs of its own (host events, pacing, idle skips,
    /// entropy). A replay says no: its inputs come from the log it pushes itself; a backup
    /// says no: the primary's VM takes the inputs (keys and frames meanwhile are dropped).
    fn stamps_inputs(&self) -> bool {
        true
    }

    /// An input the driver stamped, after the machine accepted it.
    fn on_input(&mut self, input: &Input) -> Result<(), ModeError> {
        let _ = input;
        Ok(())
    }

    /// The outputs of the last slice, in order: return those that leave now.
    fn on_outputs(&mut self, outputs: Vec<Output>) -> Vec<Output> {
        outputs
    }

    /// A slice ended (`idle`: the guest waits for an interrupt). The machine is stopped:
    /// the mode may read it, checkpoint it or push inputs into it.
    fn on_slice_end(&mut self, vm: &mut V, idle: bool) -> Result<(), ModeError> {
        let _ = (vm, idle);
        Ok(())
    }

    /// Outputs released since the last call, in order.
    fn take_released(&mut self) -> Vec<Output> {
        Vec::new()
    }

    /// The machine must not run on yet (back-pressure; a backup, until it takes over). The
    /// driver asks before every slice, the first one included.
    fn must_wait(&self) -> bool {
        false
    }

    /// How long an idle guest may wait before its slice must end (None: until its timer or
    /// a host event).
    fn idle_wait_limit(&self) -> Option<Duration> {
        None
    }

    /// An event from the mode's own thread; the machine is stopped (a backup applies its
    /// checkpoints here).
    fn on_event(&mut self, vm: &mut V, event: ModeEvent) -> Verdict {
        let _ = (vm, event);
        Verdict::Continue
    }

    /// A control request the mode answers itself (a backup refuses what needs a running
    /// VM); None: the driver answers it.
    fn control(&mut self, command: &Command) -> Option<Reply> {
        let _ = command;
        None
    }

    /// The VM ended with `exit_code` (its last outputs went through [`Mode::on_outputs`]).
    fn begin_end(&mut self, vm: &mut V, exit_code: u32) -> Result<EndProgress, ModeError> {
        let _ = (vm, exit_code);
        Ok(EndProgress::Settled)
    }

    /// Where the VM is protected to, if it is (`ctl protect` refuses a second backup).
    fn protected_to(&self) -> Option<String> {
        None
    }

    /// `ctl unprotect`: the answer now, or None when the mode answers `reply` later (then
    /// it ends with [`Verdict::Detached`]).
    fn unprotect(&mut self, reply: Sender<Reply>) -> Option<Reply> {
        let _ = reply;
        Some(Reply::error(409, "this VM is not protected: it replicates to no backup"))
    }

    /// Fill in the mode's part of the status (mode, role, epoch, replication).
    fn report(&self, status: &mut Status) {
        let _ = status;
    }

    /// Shut the mode down; the VM's ownership record comes back if the mode held it.
    fn finish(self: Box<Self>) -> Option<crate::replicate::Ownership> {
        None
    }
}

/// How often the driver looks at a mode that makes the machine wait.
pub const WAIT_TICK: Duration = Duration::from_millis(100);

/// No replication: every output leaves at once.
#[derive(Debug, Default, Clone, Copy)]
pub struct Standalone;

impl<V: Vm> Mode<V> for Standalone {
    fn kind(&self) -> crate::status::Mode {
        crate::status::Mode::None
    }
}

/// Watches a running VM without deciding anything: a recorder, the keeper's log. Sees the
/// inputs as the mode does, the outputs as produced and as they leave (after output commit).
pub trait Observer<V: Vm> {
    /// An input the driver stamped, after the machine took it.
    fn on_input(&mut self, input: &Input) -> Result<(), ModeError> {
        let _ = input;
        Ok(())
    }

    /// Outputs the last slice produced, in order, before the mode holds any (a recorder
    /// digests these: what the machine did, whenever it leaves).
    fn on_outputs_produced(&mut self, outputs: &[Output]) {
        let _ = outputs;
    }

    /// An output left for the outside world (after output commit).
    fn on_output_left(&mut self, output: &Output) {
        let _ = output;
    }

    /// A slice ended; the machine is stopped.
    fn on_slice_end(&mut self, vm: &V) -> Result<(), ModeError> {
        let _ = vm;
        Ok(())
    }

    /// The run is over (`exit_code` as the VM ended).
    fn on_end(&mut self, vm: &V, exit_code: u32) {
        let _ = (vm, exit_code);
    }
}
