//! Lockstep's primary as a [`Mode`]: every input the machine takes is encoded (the input
//! log's format, `journal::encode_input`) and given to `replica`'s pure [`Leader`], which
//! cuts them into epochs at slice ends; each epoch's batch goes to the replication thread
//! ([`crate::replicate::primary`], the checkpoint protocol's, unchanged) as the epoch's
//! payload. An output leaves when the thread releases the epoch cut after it, i.e. once the
//! backup holds every input taken before it. The first batch starts the backup's machine
//! from its own images (checked by digest); a batch the protocol wants full (a new backup,
//! a resynchronization after a divergence) carries the whole machine instead.

use super::{EndProgress, Mode, ModeError, ModeEvent, Verdict};
use crate::control::Reply;
use crate::host::HostEvent;
use crate::replicate::primary::{PrimaryHandle, PrimaryOptions, ToRepl};
use crate::replicate::Ownership;
use crate::vm::Vm;
use machine::{Input, Output, OutputKind};
use replica::lockstep::{Leader, LeaderConfig, Start};
use replica::CheckpointKind;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

/// Slices while in lockstep: outputs are cut into an epoch at each slice end, so a short
/// slice is a short wait for an output (about 2 ms of guest work).
pub const SLICE_ICOUNT: u64 = 250_000;
/// An idle guest's slice ends at least this often: a backup that connects gets its start
/// without waiting for the guest's next timer.
const IDLE_WAIT_LIMIT: Duration = Duration::from_millis(20);

/// How to run lockstep: the replication thread's options and the leader's.
pub struct LockstepOptions {
    pub primary: PrimaryOptions,
    pub leader: LeaderConfig,
    /// What a backup booting from the same images needs besides them ([`BootParams`]).
    pub boot: BootParams,
}

/// What makes two machines built from the same images (the board shape the handshake checks)
/// the same machine at icount 0: the kernel command line (it carries the guest's command)
/// and the real-time clock's start. A lockstep backup builds its machine with the primary's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootParams {
    pub bootargs: String,
    pub boot_unix_ns: u64,
}

impl BootParams {
    pub fn of(config: &machine::MachineConfig) -> BootParams {
        BootParams { bootargs: config.bootargs.clone(), boot_unix_ns: config.boot_unix_ns }
    }

    /// `config` with these parameters.
    pub fn apply(&self, config: &machine::MachineConfig) -> machine::MachineConfig {
        let mut config = config.clone();
        config.bootargs = self.bootargs.clone();
        config.boot_unix_ns = self.boot_unix_ns;
        config
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = self.boot_unix_ns.to_le_bytes().to_vec();
        bytes.extend_from_slice(self.bootargs.as_bytes());
        bytes
    }

    pub fn decode(bytes: &[u8]) -> Result<BootParams, String> {
        let (time, bootargs) = bytes.split_at_checked(8).ok_or("the boot parameters end before the boot time")?;
        let boot_unix_ns = u64::from_le_bytes(time.try_into().expect("8 bytes"));
        let bootargs = std::str::from_utf8(bootargs).map_err(|_| "the kernel command line is not UTF-8")?;
        Ok(BootParams { bootargs: bootargs.to_string(), boot_unix_ns })
    }
}

/// The primary's side of lockstep replication.
pub struct LockstepPrimary<V: Vm> {
    handle: PrimaryHandle,
    leader: Leader<Output>,
    released: Vec<Output>,
    started: Instant,
    unprotecting: Option<Sender<Reply>>,
    finished: Option<(u32, bool)>,
    /// The time the digests took (a full digest reads all of RAM and disk).
    digest_us: u64,
    boot: BootParams,
    /// Bytes of the batches handed over.
    batch_bytes: u64,
    /// The guest powered off or reset (no more digests).
    ended: bool,
    /// Where the machine stood at the last slice end (for the lag bound).
    icount: u64,
    /// Bounded lag: the guest paused because the backup lagged — since when, how often,
    /// for how long in all (kept in cells: `must_wait` only looks).
    throttled_since: std::cell::Cell<Option<Instant>>,
    throttles: std::cell::Cell<u64>,
    throttled_us: std::cell::Cell<u64>,
    _vm: std::marker::PhantomData<fn(&mut V)>,
}

/// Why lockstep could not start.
#[derive(Debug, thiserror::Error)]
pub enum LockstepStartError {
    #[error(transparent)]
    Replication(#[from] crate::replicate::ReplicationError),
    #[error("cannot start lockstep")]
    Start(#[source] ModeError),
}

impl<V: Vm> LockstepPrimary<V> {
    /// Start lockstep for `vm`: at boot (icount 0) the backup boots from its own images, and
    /// the first batch says so with the machine's digest; a running VM (`ctl protect`) sends
    /// its whole state first.
    pub fn start(
        options: LockstepOptions,
        ownership: Ownership,
        events: Sender<HostEvent>,
        vm: &mut V,
    ) -> Result<LockstepPrimary<V>, LockstepStartError> {
        let handle = crate::replicate::primary::start(options.primary, ownership, events)?;
        let mut primary = LockstepPrimary {
            handle,
            leader: Leader::new(options.leader, 0),
            released: Vec::new(),
            started: Instant::now(),
            unprotecting: None,
            finished: None,
            digest_us: 0,
            batch_bytes: 0,
            ended: false,
            icount: vm.icount(),
            throttled_since: std::cell::Cell::new(None),
            throttles: std::cell::Cell::new(0),
            throttled_us: std::cell::Cell::new(0),
            boot: options.boot,
            _vm: std::marker::PhantomData,
        };
        // The start is full whatever the protocol advises: it keeps a full epoch for a backup
        // that connects later, and the inputs after it continue its chain.
        primary.cut(vm, Some(CheckpointKind::Full), false).map_err(LockstepStartError::Start)?;
        Ok(primary)
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The kind the protocol wants next, as far as its last advice can tell (advice that
    /// predates the last epoch handed over says nothing about the next).
    fn wanted(&self) -> CheckpointKind {
        let shared = self.handle.shared.lock().expect("not poisoned");
        if shared.taken_epoch.unwrap_or(0) == self.leader.epoch() {
            shared.next_kind
        } else {
            CheckpointKind::Incremental
        }
    }

    /// Cut the next epoch (of kind `force`, or as the protocol wants) and hand it over;
    /// `last`: the guest ended, and its machine stands past an exit the backup's, at the same
    /// icount, may not have taken yet (so no digest: the end itself is compared).
    fn cut(&mut self, vm: &mut V, force: Option<CheckpointKind>, last: bool) -> Result<(), ModeError> {
        let kind = force.unwrap_or_else(|| self.wanted());
        let (icount, now_ms) = (vm.icount(), self.now_ms());
        let (epoch, payload) = match kind {
            CheckpointKind::Discard => (self.leader.discard(icount, now_ms), Vec::new()),
            CheckpointKind::Full | CheckpointKind::Incremental => {
                let start = match kind {
                    CheckpointKind::Full if self.leader.epoch() == 0 && icount == 0 => {
                        Some(Start::Boot { digest: self.digest(vm), params: self.boot.encode() })
                    }
                    CheckpointKind::Full => {
                        let state = vm.take_checkpoint(true).map_err(|e| ModeError::new("cannot take a state", e))?;
                        Some(self.leader.state_start(icount, state))
                    }
                    _ => None,
                };
                let digest = match start {
                    None if !last && !self.ended && self.leader.digest_due(now_ms) => Some(self.digest(vm)),
                    _ => None,
                };
                let (epoch, batch) = self.leader.cut(icount, now_ms, start, digest);
                (epoch, batch.encode())
            }
        };
        self.batch_bytes += payload.len() as u64;
        let _ = self.handle.tx.send(ToRepl::Checkpoint { epoch, icount, kind, payload });
        Ok(())
    }

    fn digest(&mut self, vm: &V) -> u128 {
        let started = Instant::now();
        let digest = vm.digest().0;
        self.digest_us += started.elapsed().as_micros() as u64;
        digest
    }
}

impl<V: Vm> Mode<V> for LockstepPrimary<V> {
    fn kind(&self) -> crate::status::Mode {
        crate::status::Mode::Lockstep
    }

    fn next_slice_end(&self, icount: u64) -> u64 {
        icount + SLICE_ICOUNT
    }

    fn on_input(&mut self, input: &Input) -> Result<(), ModeError> {
        let mut bytes = Vec::with_capacity(16);
        journal::encode_input(input, &mut bytes);
        self.leader.input(input.icount, bytes);
        Ok(())
    }

    /// Every output waits for the epoch cut after it.
    fn on_outputs(&mut self, outputs: Vec<Output>) -> Vec<Output> {
        for output in outputs {
            // Past the guest's end its machine stands past an exit the backup's may not have
            // taken at the same icount: no more digests.
            self.ended |= matches!(output.kind, OutputKind::PowerOff { .. } | OutputKind::Reset);
            self.leader.hold(output);
        }
        Vec::new()
    }

    fn on_slice_end(&mut self, vm: &mut V, _idle: bool) -> Result<(), ModeError> {
        self.icount = vm.icount();
        let wanted = self.wanted();
        if self.leader.cut_due(vm.icount(), self.now_ms(), wanted == CheckpointKind::Full) {
            self.cut(vm, Some(wanted), false)?;
        }
        Ok(())
    }

    fn take_released(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.released)
    }

    /// Output commit's back-pressure, and bounded lag: while a backup follows, the guest
    /// pauses when the backup has not acknowledged the last batches (it acknowledges only
    /// what its machine nearly caught up with), until it catches up.
    fn must_wait(&self) -> bool {
        if self.leader.must_wait() {
            return true;
        }
        let lagging =
            self.leader.lagging(self.icount) && self.handle.shared.lock().expect("not poisoned").status.streaming;
        match (lagging, self.throttled_since.get()) {
            (true, None) => {
                self.throttled_since.set(Some(Instant::now()));
                self.throttles.set(self.throttles.get() + 1);
            }
            (false, Some(since)) => {
                self.throttled_since.set(None);
                self.throttled_us.set(self.throttled_us.get() + since.elapsed().as_micros() as u64);
            }
            _ => {}
        }
        lagging
    }

    /// Only while no backup follows (or one waits for its start): a wait cut short is an idle
    /// skip more to log and ship, and a following backup needs none (the protocol's events
    /// wake the wait; an idle guest with nothing to say costs heartbeats only).
    fn idle_wait_limit(&self) -> Option<Duration> {
        let streaming = self.handle.shared.lock().expect("not poisoned").status.streaming;
        (!streaming || self.wanted() == CheckpointKind::Full).then_some(IDLE_WAIT_LIMIT)
    }

    fn on_event(&mut self, _vm: &mut V, event: ModeEvent) -> Verdict {
        match event {
            ModeEvent::Released { up_to_epoch } => {
                let released = self.leader.release(up_to_epoch);
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
            // Live migration's (checkpoint replication only): never asked for here.
            ModeEvent::HandedOver { generation } => {
                Verdict::Migrated(format!("the VM was handed over at generation {generation}"))
            }
            ModeEvent::Detached { generation } => {
                let held = self.leader.release(u64::MAX);
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

    /// The VM ended: the last epoch carries the last inputs; the replication thread settles
    /// the end with the backup and the ownership record.
    fn begin_end(&mut self, vm: &mut V, exit_code: u32) -> Result<EndProgress, ModeError> {
        if let Some(reply) = self.unprotecting.take() {
            let _ = reply.send(Reply::error(409, "the VM is ending: its end settles the replication"));
        }
        self.cut(vm, None, true)?;
        let epoch = self.leader.epoch();
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
        use crate::status::{CheckpointTotals, Lockstep, Replication, Role};
        let shared = self.handle.shared.lock().expect("not poisoned").clone();
        let s = &shared.status;
        let epoch = self.leader.epoch();
        let lag_epochs = s.acked_epoch.map(|a| epoch.saturating_sub(a));
        let totals = self.leader.totals();
        status.mode = crate::status::Mode::Lockstep;
        status.role = Role::Primary;
        status.epoch = epoch;
        status.replication = Some(Replication {
            protected: s.protection == replica::Protection::Protected && s.streaming,
            protection: (&s.protection).into(),
            generation: s.generation,
            backup_connected: s.streaming,
            acked_epoch: s.acked_epoch,
            lag_epochs,
            lag_ms: None,
            released_epoch: s.released_up_to,
            unprotected_count: s.unprotected_count,
            resumed_checkpoints: s.resumed_checkpoints,
            log_bytes: s.log_bytes,
            bytes_sent: shared.bytes_sent,
            held_outputs: self.leader.held_outputs() as u64,
            last_error: shared.last_error,
            last_checkpoint: None,
            checkpoints: CheckpointTotals {
                count: totals.batches,
                pause_total_ms: self.digest_us as f64 / 1e3,
                pause_avg_ms: 0.0,
                pause_max_ms: 0.0,
                bytes: totals.input_bytes,
                pages: 0,
                bytes_per_s: shared.bytes_sent as f64 / self.started.elapsed().as_secs_f64().max(1e-9),
            },
        });
        status.lockstep = Some(Lockstep {
            batches: totals.batches,
            batch_bytes: self.batch_bytes,
            inputs: totals.inputs,
            input_bytes: totals.input_bytes,
            digests: totals.digests,
            states: totals.states,
            released_outputs: self.leader.outputs_released(),
            unreleased_batches: Some(self.leader.unreleased_batches()),
            throttles: self.throttles.get(),
            throttled_ms: (self.throttled_us.get()
                + self.throttled_since.get().map_or(0, |since| since.elapsed().as_micros() as u64))
                as f64
                / 1e3,
            ..Lockstep::default()
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
