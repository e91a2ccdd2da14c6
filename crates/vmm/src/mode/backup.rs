//! Checkpoint mode's backup as a [`Mode`]: the machine stays stopped ([`Mode::must_wait`])
//! and takes no inputs of its own ([`Mode::stamps_inputs`]) while the protocol thread
//! ([`crate::replicate::backup`]) hears the primary; each whole checkpoint it hands over is
//! applied here, on the driver's thread, which owns the machine. When the thread took the VM
//! over, the mode answers [`Verdict::GoLive`] and the same driver runs the machine on as the
//! primary ([`crate::mode::Standalone`], which `ctl protect` can protect again); when the VM
//! ended on the primary, or the primary unprotected it, [`Verdict::StandDown`].

use super::{EndProgress, Mode, ModeError, ModeEvent, StandDown, Verdict};
use crate::control::{Command, Reply};
use crate::host::HostEvent;
use crate::replicate::backup::{self as edge, ApplyFailed, BackupHandle, BackupOptions, ToBackup};
use crate::replicate::{chain, now_ms, Ownership, ReplicationError};
use crate::status::{BackupSide, Role, State, Status, Takeover};
use crate::vm::Vm;
use machine::Output;
use replica::BackupKept;
use std::marker::PhantomData;
use std::sync::mpsc::Sender;

/// What a backup refuses through the control API: everything but status and stop.
pub const REFUSAL: &str = "this replica is a backup: it holds a checkpoint and does not run until it takes over";

/// The backup's side of checkpoint replication.
pub struct CheckpointBackup<V: Vm> {
    handle: Option<BackupHandle>,
    vm_id: String,
    /// What the machine made of the checkpoints it was handed.
    applies: Applies,
    _vm: PhantomData<fn(&mut V)>,
}

/// What the mode counts of the checkpoints it applied, for status and the takeover.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applies {
    pub applied: u64,
    pub diverged: u64,
    /// The epoch of the last checkpoint applied whole: the state the machine holds.
    pub last_epoch: Option<u64>,
}

impl<V: Vm> CheckpointBackup<V> {
    /// Start waiting for a primary with `ownership` (the record the backup may swap to take
    /// over); the protocol thread hands checkpoints for `vm` to the driver through `events`
    /// (the driver's own channel).
    pub fn start(
        options: BackupOptions,
        ownership: Ownership,
        events: Sender<HostEvent>,
        vm: &V,
    ) -> Result<CheckpointBackup<V>, ReplicationError> {
        Self::resume(options, ownership, events, vm, None)
    }

    /// [`CheckpointBackup::start`] for a backup whose process restarted with `vm` holding
    /// the checkpoint `kept` names again (`ftvm backup --resilient`, restored from its
    /// keeper's region): the protocol answers the primary with that checkpoint and may take
    /// over with it ([`replica::Backup::resume`]).
    pub fn resume(
        options: BackupOptions,
        ownership: Ownership,
        events: Sender<HostEvent>,
        vm: &V,
        kept: Option<BackupKept>,
    ) -> Result<CheckpointBackup<V>, ReplicationError> {
        let vm_id = ownership.vm_id.clone();
        let limit = edge::checkpoint_limit_bytes(vm.page_count(), vm.disk_sectors());
        let handle = edge::start_from(options, ownership, events, limit, kept)?;
        let applies = Applies { last_epoch: kept.map(|k| k.applied.epoch), ..Applies::default() };
        Ok(CheckpointBackup { handle: Some(handle), vm_id, applies, _vm: PhantomData })
    }

    /// The protocol's state as last published (None once the thread was shut down).
    pub fn protocol_status(&self) -> Option<replica::BackupStatus> {
        let handle = self.handle.as_ref()?;
        Some(handle.shared.lock().unwrap_or_else(|p| p.into_inner()).status.clone())
    }

    /// Apply one whole checkpoint to the stopped machine, and tell the protocol how it went.
    fn apply(&mut self, vm: &mut V, epoch: u64, payload: &[u8]) {
        self.apply_then(vm, epoch, payload, &mut |_| Ok(()))
    }

    /// Apply one whole checkpoint to the stopped machine, then `keep` it (a resilient backup
    /// commits it to its keeper's region), and only then tell the protocol how it went: an
    /// epoch is acknowledged once kept. A `keep` that fails counts as a failed apply (the
    /// backup then waits for a full checkpoint).
    pub fn apply_then(
        &mut self,
        vm: &mut V,
        epoch: u64,
        payload: &[u8],
        keep: &mut dyn FnMut(&mut V) -> Result<(), String>,
    ) {
        let result = vm
            .apply_checkpoint(payload)
            .map_err(|e| ApplyFailed { diverged: V::diverged(&e), reason: chain(&e) })
            .and_then(|()| keep(vm).map_err(|reason| ApplyFailed { diverged: false, reason }));
        match &result {
            Ok(()) => {
                self.applies.applied += 1;
                self.applies.last_epoch = Some(epoch);
            }
            Err(failed) => self.applies.diverged += failed.diverged as u64,
        }
        if let Some(handle) = &self.handle {
            let _ = handle.tx.send(ToBackup::Applied { epoch, result });
        }
    }

    /// What the machine made of the checkpoints so far.
    pub fn applies(&self) -> Applies {
        self.applies
    }

    /// The way to the protocol thread, for a mode that answers applies itself (lockstep's
    /// follower); None once the thread was shut down.
    pub fn sender(&self) -> Option<Sender<ToBackup>> {
        self.handle.as_ref().map(|h| h.tx.clone())
    }
}

impl<V: Vm> Mode<V> for CheckpointBackup<V> {
    fn kind(&self) -> crate::status::Mode {
        crate::status::Mode::Checkpoint
    }

    /// The primary's VM takes the inputs; keys and frames that reach a backup are dropped.
    fn stamps_inputs(&self) -> bool {
        false
    }

    /// A backup's machine never runs, so it produces nothing; were it to, nothing would leave.
    fn on_outputs(&mut self, outputs: Vec<Output>) -> Vec<Output> {
        drop(outputs);
        Vec::new()
    }

    /// Until it takes over (then the driver runs the machine under another mode).
    fn must_wait(&self) -> bool {
        true
    }

    fn on_event(&mut self, vm: &mut V, event: ModeEvent) -> Verdict {
        match event {
            ModeEvent::Apply { epoch, payload, .. } => {
                self.apply(vm, epoch, &payload);
                Verdict::Continue
            }
            ModeEvent::TookOver { epoch, generation, last_heard_ms, migration } => {
                // Every apply handed over came first; one that failed left the state of the
                // checkpoint before it.
                let epoch = self.applies.last_epoch.map_or(epoch, |applied| applied.min(epoch));
                Verdict::GoLive(Takeover {
                    epoch,
                    generation,
                    last_frame_to_live_ms: last_heard_ms.map_or(0, |heard| now_ms().saturating_sub(heard)),
                    diverged_checkpoints: self.applies.diverged,
                    // A switchover's downtime ends as the machine first runs (the driver).
                    migration,
                })
            }
            ModeEvent::EndedOnPrimary { exit_code } => Verdict::StandDown(StandDown::EndedOnPrimary { exit_code }),
            ModeEvent::Unprotected => Verdict::StandDown(StandDown::Unprotected),
            ModeEvent::Stopped(message) => Verdict::Fenced(message),
            // A primary's events: none come to a backup.
            ModeEvent::Released { .. }
            | ModeEvent::Finished { .. }
            | ModeEvent::Detached { .. }
            | ModeEvent::HandedOver { .. } => Verdict::Continue,
        }
    }

    /// Status and stop are the driver's; the rest needs a running VM.
    fn control(&mut self, command: &Command) -> Option<Reply> {
        match command {
            Command::Status | Command::Stop => None,
            _ => Some(Reply::error(409, REFUSAL)),
        }
    }

    /// Stopped (or quit) while waiting: the protocol thread stops, the record untouched.
    fn begin_end(&mut self, _vm: &mut V, _exit_code: u32) -> Result<EndProgress, ModeError> {
        if let Some(handle) = self.handle.take() {
            drop(handle.finish());
        }
        Ok(EndProgress::Settled)
    }

    fn report(&self, status: &mut Status) {
        let Some(handle) = &self.handle else { return };
        let s = handle.shared.lock().unwrap_or_else(|p| p.into_inner()).status.clone();
        status.state = State::Waiting;
        status.role = Role::Backup;
        status.mode = crate::status::Mode::Checkpoint;
        status.vm_id = Some(self.vm_id.clone());
        status.reboots = None;
        status.epoch = s.applied_epoch.unwrap_or(0);
        status.replication = None;
        status.backup = Some(BackupSide {
            primary_connected: s.primary_connected,
            applied_epoch: s.applied_epoch,
            state_generation: s.state_generation,
            newest_generation: s.newest_generation,
            stale: s.stale,
            pending_handshakes: s.pending_handshakes as u64,
            refused_connections: s.refused_connections,
            partial_checkpoint_bytes: s.partial_bytes,
            applied_checkpoints: self.applies.applied,
            diverged_checkpoints: self.applies.diverged,
            silence_ms: s.last_heard_ms.map(|heard| now_ms().saturating_sub(heard)),
        });
        status.took_over = None;
    }

    fn finish(mut self: Box<Self>) -> Option<Ownership> {
        let ownership = self.handle.take()?.finish();
        if ownership.is_none() {
            crate::log::warn("the backup's protocol thread died: its ownership record is lost");
        }
        ownership
    }
}
