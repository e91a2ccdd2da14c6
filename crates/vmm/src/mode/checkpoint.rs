//! Checkpoint mode's primary as a [`Mode`]: the schedule (epochs, the kind of each
//! checkpoint, pre-copy, held outputs, back-pressure) is `replica`'s pure
//! [`replica::CheckpointSchedule`]; this applies its decisions to the machine and hands the
//! checkpoints to the replication thread ([`crate::replicate::primary`]), whose output
//! releases and verdicts come back as [`ModeEvent`]s.

use super::{EndProgress, Mode, ModeError, ModeEvent, Verdict};
use crate::control::Reply;
use crate::host::HostEvent;
use crate::replicate::primary::{PrimaryHandle, PrimaryOptions, ToRepl};
use crate::replicate::Ownership;
use crate::vm::Vm;
use machine::Output;
use replica::{CheckpointKind, CheckpointSchedule, ScheduleConfig, SliceAction};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

/// Shorter slices while replicating, so that epochs end close to their time.
pub const SLICE_ICOUNT: u64 = 250_000;
/// Pages a full checkpoint's pre-copy scans per run slice, while the guest runs.
const PRECOPY_PAGES_PER_SLICE: usize = 8192;

/// How to replicate: the replication thread's options and the checkpoint schedule's.
pub struct ReplicationOptions {
    pub primary: PrimaryOptions,
    pub epoch_ms: u64,
    /// Put the machine's digest in every N-th checkpoint (0: never).
    pub verify_every: u64,
}

/// The primary's side of checkpoint replication.
pub struct CheckpointPrimary<V: Vm> {
    handle: PrimaryHandle,
    schedule: CheckpointSchedule<Output>,
    /// Outputs released, not yet taken by the driver.
    released: Vec<Output>,
    last: Option<CheckpointStats>,
    totals: CheckpointTotals,
    /// A full checkpoint being copied while the guest runs.
    precopy: Option<V::PreCopy>,
    started: Instant,
    verify_every: u64,
    /// The answer owed to an `unprotect` under way.
    unprotecting: Option<Sender<Reply>>,
    /// Set once the replication thread settled the VM's end.
    finished: Option<(u32, bool)>,
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

/// Totals since the start, for `status` and benchmarks.
#[derive(Debug, Default, Clone, Copy)]
struct CheckpointTotals {
    count: u64,
    pause_us: u64,
    max_pause_us: u64,
    bytes: u64,
    pages: u64,
}

impl<V: Vm> CheckpointPrimary<V> {
    /// Start replicating `vm` (at boot, or `ctl protect` while it runs): the ownership record
    /// goes to a new replication thread, and the backup's first checkpoint is a full one,
    /// pre-copied while the guest runs.
    pub fn start(
        options: ReplicationOptions,
        ownership: Ownership,
        events: Sender<HostEvent>,
        vm: &mut V,
    ) -> Result<CheckpointPrimary<V>, crate::replicate::ReplicationError> {
        let primary = Self::start_run(options, ownership, events, None)?;
        // The backup starts from a full checkpoint: what was written before needs no second
        // copy in the pre-copy's final pass (it could be everything since boot).
        vm.take_dirty_pages();
        vm.take_dirty_sectors();
        Ok(primary)
    }

    /// Take run `run_id` up again after a restart of this process (a `--resilient` primary,
    /// [`replica::Primary::resume`]): the epochs go on after `at.last_epoch`, and the first
    /// checkpoint is an incremental on `at.since_epoch`, so `vm`'s next incremental
    /// checkpoint must hold every page written since that epoch (`keeper::replicated::Watched`
    /// adds those its record kept to what its dirty log holds).
    pub fn resume(
        options: ReplicationOptions,
        ownership: Ownership,
        events: Sender<HostEvent>,
        run_id: u64,
        at: replica::ResumeRun,
    ) -> Result<CheckpointPrimary<V>, crate::replicate::ReplicationError> {
        Self::start_run(options, ownership, events, Some((run_id, at)))
    }

    fn start_run(
        options: ReplicationOptions,
        ownership: Ownership,
        events: Sender<HostEvent>,
        resume: Option<(u64, replica::ResumeRun)>,
    ) -> Result<CheckpointPrimary<V>, crate::replicate::ReplicationError> {
        let handle = crate::replicate::primary::start_run(options.primary, ownership, events, resume)?;
        let config = ScheduleConfig::new(options.epoch_ms);
        let schedule = match resume {
            Some((_, at)) => CheckpointSchedule::resumed(config, 0, at.last_epoch),
            None => CheckpointSchedule::new(config, 0),
        };
        Ok(CheckpointPrimary {
            handle,
            schedule,
            released: Vec::new(),
            last: None,
            totals: CheckpointTotals::default(),
            precopy: None,
            started: Instant::now(),
            verify_every: options.verify_every,
            unprotecting: None,
            finished: None,
        })
    }

    /// This run's id (it names its checkpoints).
    pub fn run_id(&self) -> u64 {
        self.handle.run_id
    }

    /// The epoch of the last checkpoint taken (0: none yet).
    pub fn epoch(&self) -> u64 {
        self.schedule.epoch()
    }

    /// The kind of checkpoint the protocol wants next, as far as it can know from the
    /// advice the replication thread last published ([`CheckpointSchedule::wanted`]).
    fn wanted(&self) -> CheckpointKind {
        let shared = self.handle.shared.lock().expect("not poisoned");
        self.schedule.wanted(shared.next_kind, shared.taken_epoch)
    }

    /// The schedule's clock: milliseconds since replication started.
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Take the checkpoint of the next epoch (unless `kind` is Full and `payload` came from
    /// a pre-copy) and hand it to the replication thread.
    fn send_checkpoint(
        &mut self,
        vm: &mut V,
        kind: CheckpointKind,
        payload: Vec<u8>,
        started: Instant,
    ) -> Result<(), ModeError> {
        let epoch = self.schedule.epoch() + 1;
        let cannot = |e| ModeError::new("cannot take a checkpoint", e);
        let mut payload = match kind {
            CheckpointKind::Full if payload.is_empty() => vm.take_checkpoint(true).map_err(cannot)?,
            CheckpointKind::Full => payload,
            CheckpointKind::Incremental => vm.take_checkpoint(false).map_err(cannot)?,
            CheckpointKind::Discard => {
                // No backup to send it to: keep the dirty logs short; a full one follows later.
                vm.take_dirty_pages();
                vm.take_dirty_sectors();
                Vec::new()
            }
        };
        let full = kind == CheckpointKind::Full;
        if !payload.is_empty() && self.verify_every > 0 && (full || epoch.is_multiple_of(self.verify_every)) {
            vm.add_digest(&mut payload);
        }
        let pause_us = started.elapsed().as_micros() as u64;
        let pages = V::checkpoint_pages(&payload);
        self.last = Some(CheckpointStats { epoch, full, pause_us, bytes: payload.len(), pages });
        if kind != CheckpointKind::Discard {
            let t = &mut self.totals;
            t.count += 1;
            t.pause_us += pause_us;
            t.max_pause_us = t.max_pause_us.max(pause_us);
            t.bytes += payload.len() as u64;
            t.pages += pages as u64;
        }
        let icount = vm.icount();
        let _ = self.handle.tx.send(ToRepl::Checkpoint { epoch, icount, kind, payload });
        let now_ms = self.now_ms();
        assert_eq!(self.schedule.checkpoint_taken(now_ms), epoch);
        Ok(())
    }
}

/// What live migration ([`crate::mode::migrate`]) asks of checkpoint replication.
impl<V: Vm> CheckpointPrimary<V> {
    /// The backup holds every checkpoint taken and the VM counts as protected: a final
    /// checkpoint now copies one short epoch.
    pub fn caught_up(&self) -> bool {
        let shared = self.handle.shared.lock().expect("not poisoned");
        let s = &shared.status;
        let epoch = self.schedule.epoch();
        self.precopy.is_none()
            && epoch > 0
            && s.streaming
            && s.protection == replica::Protection::Protected
            && s.acked_epoch == Some(epoch)
    }

    /// Outputs held for output commit (not yet released).
    pub fn held_outputs(&self) -> usize {
        self.schedule.held_outputs()
    }

    /// Whether a backup is connected and past the handshake.
    pub fn backup_streaming(&self) -> bool {
        self.handle.shared.lock().expect("not poisoned").status.streaming
    }

    /// Take the checkpoint that closes the running epoch now, whatever its length; its epoch.
    pub fn checkpoint_now(&mut self, vm: &mut V) -> Result<u64, ModeError> {
        self.precopy = None;
        let wanted = self.wanted();
        let (_, kind) = self.schedule.final_checkpoint(wanted);
        self.send_checkpoint(vm, kind, Vec::new(), Instant::now())?;
        Ok(self.schedule.epoch())
    }

    /// Hand the VM to the backup: the machine is paused at the checkpoint just taken
    /// ([`replica::PrimaryEvent::Switchover`]).
    pub fn switch_over(&self, paused_at_unix_us: u64) {
        let _ = self.handle.tx.send(ToRepl::Switchover { paused_at_unix_us });
    }

    /// The size and dirty pages of the last checkpoint taken.
    pub fn last_checkpoint_size(&self) -> Option<(u64, u64)> {
        self.last.map(|c| (c.bytes as u64, c.pages as u64))
    }

    /// Bytes written to the backup so far.
    pub fn bytes_sent(&self) -> u64 {
        self.handle.shared.lock().expect("not poisoned").bytes_sent
    }

    /// Checkpoints taken (and handed to the replication thread) so far.
    pub fn checkpoints_taken(&self) -> u64 {
        self.totals.count
    }

    /// The last error the replication thread reported, if any.
    pub fn last_error(&self) -> Option<String> {
        self.handle.shared.lock().expect("not poisoned").last_error.clone()
    }
}

impl<V: Vm> Mode<V> for CheckpointPrimary<V> {
    fn kind(&self) -> crate::status::Mode {
        crate::status::Mode::Checkpoint
    }

    fn next_slice_end(&self, icount: u64) -> u64 {
        icount + SLICE_ICOUNT
    }

    /// A replicated primary holds every output until the backup acknowledges the epoch
    /// that made it (or, with no backup connected, until that epoch's checkpoint is taken).
    fn on_outputs(&mut self, outputs: Vec<Output>) -> Vec<Output> {
        for output in outputs {
            self.schedule.hold(output);
        }
        Vec::new()
    }

    /// Do what the schedule says: nothing, pre-copy a full checkpoint, or take the
    /// checkpoint that ends the epoch and hand it over.
    fn on_slice_end(&mut self, vm: &mut V, idle: bool) -> Result<(), ModeError> {
        let wanted = self.wanted();
        let now_ms = self.now_ms();
        match self.schedule.on_slice_end(now_ms, idle, wanted) {
            SliceAction::Continue => Ok(()),
            SliceAction::StartPrecopy => {
                self.precopy = Some(vm.precopy_start());
                Ok(())
            }
            SliceAction::AbandonPrecopy => {
                self.precopy = None; // the backup went away: nothing to copy for
                Ok(())
            }
            SliceAction::StepPrecopy => {
                let precopy = self.precopy.as_mut().expect("the schedule pre-copies only what was started");
                if !vm.precopy_step(precopy, PRECOPY_PAGES_PER_SLICE) {
                    return Ok(());
                }
                let precopy = self.precopy.take().expect("checked above");
                let started = Instant::now();
                let payload = vm.precopy_finish(precopy).map_err(|e| ModeError::new("cannot take a checkpoint", e))?;
                self.send_checkpoint(vm, CheckpointKind::Full, payload, started)
            }
            SliceAction::Take { kind, .. } => self.send_checkpoint(vm, kind, Vec::new(), Instant::now()),
        }
    }

    fn take_released(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.released)
    }

    /// Output commit's back-pressure: a guest that outputs faster than the backup
    /// acknowledges waits.
    fn must_wait(&self) -> bool {
        self.schedule.must_wait()
    }

    /// Outputs held for output commit never wait on a guest timer: the epoch must end (and
    /// the backup acknowledge it) as soon as the minimum epoch allows. Nor does a pre-copy:
    /// an idle guest's time is the copy's.
    fn idle_wait_limit(&self) -> Option<Duration> {
        self.schedule.idle_wait_limit_ms(self.now_ms()).map(Duration::from_millis)
    }

    fn on_event(&mut self, _vm: &mut V, event: ModeEvent) -> Verdict {
        match event {
            ModeEvent::Released { up_to_epoch } => {
                let released = self.schedule.release(up_to_epoch);
                self.released.extend(released);
                Verdict::Continue
            }
            ModeEvent::Stopped(message) => {
                if let Some(reply) = self.unprotecting.take() {
                    let _ = reply.send(Reply::error(409, format!("replication stopped: {message}")));
                }
                Verdict::Fenced(message)
            }
            ModeEvent::Finished { exit_code, released } => {
                self.finished = Some((exit_code, released));
                Verdict::Settled
            }
            ModeEvent::HandedOver { generation } => Verdict::Migrated(format!(
                "the VM was handed over to {}, which owns it at generation {generation}",
                self.handle.backup
            )),
            ModeEvent::Detached { generation } => {
                // No backup can take over any more: everything held may leave.
                let held = self.schedule.release(u64::MAX);
                self.released.extend(held);
                if let Some(reply) = self.unprotecting.take() {
                    let body = serde_json::json!({ "state": "unprotected", "generation": generation });
                    let _ = reply.send(Reply::ok(body));
                }
                Verdict::Detached
            }
            // A backup's events: none come to a primary.
            ModeEvent::Apply { .. }
            | ModeEvent::TookOver { .. }
            | ModeEvent::EndedOnPrimary { .. }
            | ModeEvent::Unprotected => Verdict::Continue,
        }
    }

    /// The VM ended: take the final checkpoint (closing the running epoch whatever its
    /// length; a pre-copy in progress is dropped and taken whole at once) and let the
    /// replication thread settle the end with the backup and the ownership record.
    fn begin_end(&mut self, vm: &mut V, exit_code: u32) -> Result<EndProgress, ModeError> {
        self.precopy = None;
        if let Some(reply) = self.unprotecting.take() {
            let _ = reply.send(Reply::error(409, "the VM is ending: its end settles the replication"));
        }
        let wanted = self.wanted();
        let (_, kind) = self.schedule.final_checkpoint(wanted);
        self.send_checkpoint(vm, kind, Vec::new(), Instant::now())?;
        let epoch = self.schedule.epoch();
        let _ = self.handle.tx.send(ToRepl::VmEnded { epoch, exit_code });
        Ok(if self.finished.is_some() { EndProgress::Settled } else { EndProgress::Pending })
    }

    fn protected_to(&self) -> Option<String> {
        Some(self.handle.backup.to_string())
    }

    fn unprotect(&mut self, reply: Sender<Reply>) -> Option<Reply> {
        if self.unprotecting.is_some() {
            return Some(Reply::error(409, "an unprotect is already under way"));
        }
        let _ = self.handle.tx.send(ToRepl::Unprotect);
        self.unprotecting = Some(reply);
        None
    }

    fn report(&self, status: &mut crate::status::Status) {
        use crate::status::{CheckpointTotals, LastCheckpoint, Replication, Role};
        let shared = self.handle.shared.lock().expect("not poisoned").clone();
        let s = &shared.status;
        let lag_epochs = s.acked_epoch.map(|a| self.schedule.epoch().saturating_sub(a));
        let t = &self.totals;
        status.mode = crate::status::Mode::Checkpoint;
        status.role = Role::Primary;
        status.epoch = self.schedule.epoch();
        status.replication = Some(Replication {
            protected: s.protection == replica::Protection::Protected && s.streaming,
            protection: (&s.protection).into(),
            generation: s.generation,
            backup_connected: s.streaming,
            acked_epoch: s.acked_epoch,
            lag_epochs,
            lag_ms: lag_epochs.map(|l| l * self.schedule.epoch_ms()),
            released_epoch: s.released_up_to,
            unprotected_count: s.unprotected_count,
            resumed_checkpoints: s.resumed_checkpoints,
            log_bytes: s.log_bytes,
            bytes_sent: shared.bytes_sent,
            held_outputs: self.schedule.held_outputs() as u64,
            last_error: shared.last_error,
            last_checkpoint: self.last.map(|c| LastCheckpoint {
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
                bytes_per_s: t.bytes as f64 / self.started.elapsed().as_secs_f64().max(1e-9),
            },
        });
    }

    fn finish(self: Box<Self>) -> Option<Ownership> {
        let ownership = self.handle.finish();
        if ownership.is_none() {
            crate::log::warn("the replication thread died: the VM's ownership record is not marked ended at its end");
        }
        ownership
    }
}
