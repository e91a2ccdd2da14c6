//! A replicated primary under a keeper (`ftvm run --resilient --replicate-to`, issue 11,
//! docs/microreboot.md): the keeper's [`Monitor`] and checkpoint mode's
//! [`CheckpointPrimary`] as one mode, so that a monitor that dies is replaced, recovers from
//! the shared region and replicates on to the same backup, which does not take over.
//!
//! - Outputs pass the monitor's exactly-once filter (what left before a restart is not sent
//!   again), then wait for output commit in the checkpoint primary; a network frame counts
//!   as sent only when it is released. Outputs a recovery replays that had not left are held
//!   for the new run's first acknowledged epoch.
//! - The machine's dirty logs have two consumers, the replication's checkpoints and the
//!   local checkpoints. [`Watched`] remembers what the replication took; a local checkpoint
//!   is taken right after a replication checkpoint (the machine's own logs are then empty)
//!   from what it remembers.
//! - A local checkpoint keeps the outputs output commit still holds (those of the epoch
//!   just closed, at least): they are counted in its marks as produced, and a monitor that
//!   recovers from it sends them before what its replay produces. Without them, a monitor
//!   that died before the backup acknowledged that epoch lost its console bytes.
//! - A planned handover (rejuvenate, upgrade): the pre-copy round is a local checkpoint
//!   after a replication checkpoint, as usual. For the final one the guest stops, the epoch
//!   is closed at once, and the monitor waits until the backup acknowledged it and every
//!   output it held has left; only then does it take the final local checkpoint and end. The
//!   next monitor takes the run up again ([`super::sent`]) with nothing held and nothing
//!   lost, and the backup sees a reconnection, as after a restart, never a takeover.

use super::monitor::{Monitor, HEARTBEAT_WAIT};
use super::region::HandoverState;
use super::sent::{Resumable, SentRecord};
use crate::control::Reply;
use crate::mode::checkpoint::CheckpointPrimary;
use crate::mode::{EndProgress, Mode, ModeError, ModeEvent, Verdict};
use crate::replicate::Ownership;
use crate::status::Status;
use crate::vm::{MachineVmError, ReadSeek, Vm, WriteSeek};
use machine::{Digest, Input, Machine, Output, OutputKind, RunExit};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

/// A resilient primary's machine: every take of its dirty logs (the replication's
/// checkpoints, pre-copies and discarded epochs) is remembered for the next local checkpoint.
pub struct Watched {
    pub machine: Machine,
    /// Pages and sectors the replication took since the last local checkpoint.
    pages: BTreeSet<usize>,
    sectors: BTreeSet<u64>,
    /// The replication took the dirty logs since this was last cleared.
    taken: bool,
    /// The keeper's record of the pages the replication took (for a restarted monitor to
    /// take the run up again: [`super::sent`]).
    sent: Option<SentRecord>,
    /// A resumed run: pages its first incremental checkpoint carries besides the dirty log.
    resume_pages: Option<Vec<usize>>,
}

impl Watched {
    pub fn new(machine: Machine) -> Watched {
        Watched {
            machine,
            pages: BTreeSet::new(),
            sectors: BTreeSet::new(),
            taken: false,
            sent: None,
            resume_pages: None,
        }
    }

    /// Record every page the replication takes in `sent` (before it leaves).
    pub fn record_into(&mut self, sent: SentRecord) {
        self.sent = Some(sent);
    }

    /// A resumed run ([`CheckpointPrimary::resume`]): its first incremental checkpoint also
    /// carries `pages` (what the record says the run took since the epoch it resumes on).
    pub fn resume_with(&mut self, pages: Vec<usize>) {
        self.resume_pages = Some(pages);
    }

    /// Remember what a checkpoint just taken carries.
    fn note(&mut self, payload: &[u8]) {
        let (pages, sectors) =
            machine::checkpoint::written(payload).expect("a checkpoint the machine just took is well-formed");
        if let Some(sent) = &self.sent {
            sent.taken(pages.iter().copied());
        }
        self.pages.extend(pages);
        self.sectors.extend(sectors);
        self.taken = true;
    }
}

impl Vm for Watched {
    type Error = MachineVmError;
    type Config = machine::MachineConfig;
    type State = machine::MachineState;
    type PreCopy = machine::checkpoint::PreCopy;

    fn run(&mut self, until_icount: u64) -> RunExit {
        self.machine.run(until_icount)
    }
    fn icount(&self) -> u64 {
        self.machine.icount()
    }
    fn time_ticks(&self) -> u64 {
        Vm::time_ticks(&self.machine)
    }
    fn icount_per_tick(&self) -> u64 {
        Vm::icount_per_tick(&self.machine)
    }
    fn min_icount_per_tick(&self) -> u64 {
        Vm::min_icount_per_tick(&self.machine)
    }
    fn rtc_unix_ns(&self) -> u64 {
        Vm::rtc_unix_ns(&self.machine)
    }
    fn reboots(&self) -> u64 {
        Vm::reboots(&self.machine)
    }
    fn push_input(&mut self, input: Input) -> Result<(), MachineVmError> {
        Vm::push_input(&mut self.machine, input)
    }
    fn wants_entropy(&self) -> bool {
        Vm::wants_entropy(&self.machine)
    }
    fn take_outputs(&mut self) -> Vec<Output> {
        self.machine.take_outputs()
    }
    fn take_dirty_pages(&mut self) -> Vec<usize> {
        let pages = self.machine.take_dirty_pages();
        if let Some(sent) = &self.sent {
            sent.taken(pages.iter().copied());
        }
        self.pages.extend(&pages);
        self.taken = true;
        pages
    }
    fn take_dirty_sectors(&mut self) -> Vec<u64> {
        let sectors = self.machine.take_dirty_sectors();
        self.sectors.extend(&sectors);
        self.taken = true;
        sectors
    }
    fn page_count(&self) -> usize {
        Vm::page_count(&self.machine)
    }
    fn page(&self, index: usize) -> Option<&[u8]> {
        self.machine.page(index)
    }
    fn disk_sectors(&self) -> Option<u64> {
        self.machine.disk_sectors()
    }
    fn read_sectors(&self, sector: u64, buf: &mut [u8]) -> Result<(), MachineVmError> {
        Vm::read_sectors(&self.machine, sector, buf)
    }
    fn write_page(&mut self, index: usize, data: &[u8]) -> Result<(), MachineVmError> {
        Vm::write_page(&mut self.machine, index, data)
    }
    fn write_sectors(&mut self, sector: u64, data: &[u8]) -> Result<(), MachineVmError> {
        Vm::write_sectors(&mut self.machine, sector, data)
    }
    fn save_state(&self) -> machine::MachineState {
        self.machine.save_state()
    }
    fn restore_state(&mut self, state: machine::MachineState) -> Result<(), MachineVmError> {
        Vm::restore_state(&mut self.machine, state)
    }
    fn save(&self, out: &mut dyn WriteSeek) -> Result<u64, MachineVmError> {
        Vm::save(&self.machine, out)
    }
    fn save_to_path(&self, path: &Path) -> Result<u64, MachineVmError> {
        Vm::save_to_path(&self.machine, path)
    }
    fn restore(config: &machine::MachineConfig, input: &mut dyn ReadSeek) -> Result<Watched, MachineVmError> {
        <Machine as Vm>::restore(config, input).map(Watched::new)
    }
    fn digest(&self) -> Digest {
        self.machine.digest()
    }
    fn take_checkpoint(&mut self, full: bool) -> Result<Vec<u8>, MachineVmError> {
        let payload = match self.resume_pages.take() {
            Some(kept) if !full => {
                let dirty = self.machine.take_dirty_pages();
                let sectors = self.machine.take_dirty_sectors();
                let pages: BTreeSet<usize> = kept.into_iter().chain(dirty).collect();
                let pages: Vec<usize> = pages.into_iter().collect();
                machine::checkpoint::take_these(&self.machine, &pages, &sectors)?
            }
            _ => Vm::take_checkpoint(&mut self.machine, full)?,
        };
        self.note(&payload);
        Ok(payload)
    }
    fn precopy_start(&self) -> machine::checkpoint::PreCopy {
        Vm::precopy_start(&self.machine)
    }
    fn precopy_step(&self, precopy: &mut machine::checkpoint::PreCopy, max_pages: usize) -> bool {
        Vm::precopy_step(&self.machine, precopy, max_pages)
    }
    fn precopy_finish(&mut self, precopy: machine::checkpoint::PreCopy) -> Result<Vec<u8>, MachineVmError> {
        let payload = Vm::precopy_finish(&mut self.machine, precopy)?;
        self.note(&payload);
        Ok(payload)
    }
    fn add_digest(&self, payload: &mut Vec<u8>) {
        Vm::add_digest(&self.machine, payload)
    }
    fn apply_checkpoint(&mut self, payload: &[u8]) -> Result<(), MachineVmError> {
        Vm::apply_checkpoint(&mut self.machine, payload)
    }
    fn diverged(error: &MachineVmError) -> bool {
        <Machine as Vm>::diverged(error)
    }
    fn checkpoint_pages(payload: &[u8]) -> usize {
        <Machine as Vm>::checkpoint_pages(payload)
    }
}

/// The mode of a replicated `--resilient` primary: the keeper's monitor (input log,
/// heartbeat, local checkpoints, exactly-once filter) and the checkpoint primary (epochs,
/// output commit, the replication thread and the ownership record).
pub struct ReplicatedMonitor {
    monitor: Monitor,
    primary: CheckpointPrimary<Watched>,
    /// The driver's event channel (a planned handover wakes the driver through it).
    events: Sender<crate::host::HostEvent>,
    /// A planned handover's final step under way: the guest is stopped.
    stopping: Option<Stopping>,
    /// What the checkpoint primary holds for output commit, in order (a copy: a local
    /// checkpoint keeps it).
    held: std::collections::VecDeque<Output>,
}

/// The guest stopped for a planned handover's final checkpoint (at `stopped`); `drained`:
/// nothing is held any more and the driver took every released output (it writes them
/// before it calls this mode again).
struct Stopping {
    stopped: Instant,
    drained: bool,
}

impl ReplicatedMonitor {
    /// Replicate `vm` from here on. `held`: the outputs a recovery replayed that had not left,
    /// held for the first epoch the backup acknowledges. The monitor must count frames on
    /// release from before its replay ([`Monitor::count_frames_on_release`]).
    /// With `resume` (a restarted monitor, its record of what was sent read back), the run
    /// it names is taken up again: the backup gets one incremental checkpoint rather than a
    /// full one ([`CheckpointPrimary::resume`]); otherwise a new run starts, and the record
    /// (if `vm` keeps one) starts again with it.
    pub fn start(
        monitor: Monitor,
        vm: &mut Watched,
        held: Vec<Output>,
        options: crate::mode::checkpoint::ReplicationOptions,
        ownership: Ownership,
        events: Sender<crate::host::HostEvent>,
        resume: Option<Resumable>,
    ) -> Result<ReplicatedMonitor, crate::replicate::ReplicationError> {
        let primary_events = events.clone();
        let mut primary = match resume {
            Some(r) => {
                let at = replica::ResumeRun { last_epoch: r.last_epoch, since_epoch: r.since_epoch };
                vm.resume_with(r.pages);
                CheckpointPrimary::resume(options, ownership, primary_events, r.run_id, at)?
            }
            None => {
                let primary = CheckpointPrimary::start(options, ownership, primary_events, vm)?;
                if let Some(sent) = &mut vm.sent {
                    sent.begin(primary.run_id());
                }
                primary
            }
        };
        let kept = held.iter().cloned().collect();
        let released = Mode::<Watched>::on_outputs(&mut primary, held);
        debug_assert!(released.is_empty(), "a replicated primary holds every output");
        Ok(ReplicatedMonitor { monitor, primary, events, stopping: None, held: kept })
    }

    /// A planned handover's next monitor is in step: stop the guest here and close the
    /// epoch at once; the final local checkpoint waits for the backup's acknowledgement
    /// ([`ReplicatedMonitor::finish_handover`]).
    fn stop_for_handover(&mut self, vm: &mut Watched) -> Result<(), ModeError> {
        let stopped = self.monitor.handover_stopped();
        self.primary.checkpoint_now(vm)?;
        self.stopping = Some(Stopping { stopped, drained: false });
        Ok(())
    }

    /// The handover's final step, once everything held has left: the final local
    /// checkpoint (of what the replication took, the epoch just closed included), then
    /// this monitor ends. Called off meanwhile (the keeper gave up on the next monitor):
    /// the guest runs on.
    fn finish_handover(&mut self, vm: &mut Watched) -> Result<(), ModeError> {
        let Some(stopping) = &self.stopping else { return Ok(()) };
        if self.monitor.handover_state() != HandoverState::Synced {
            self.stopping = None;
            return Ok(());
        }
        if !stopping.drained {
            return Ok(());
        }
        let stopped = stopping.stopped;
        super::fault::point("keeper::handover-final");
        self.local_checkpoint(vm, true)?;
        self.monitor.commit_handover(stopped);
        self.stopping = None; // called off after all: that was an ordinary local checkpoint
        Ok(())
    }

    /// A local checkpoint of what the replication took since the last one, if one is due (or
    /// `now`) and the replication just took the dirty logs (so that the machine's own are empty).
    fn local_checkpoint(&mut self, vm: &mut Watched, now: bool) -> Result<(), ModeError> {
        if !std::mem::take(&mut vm.taken) || !(now || self.monitor.checkpoint_due()) {
            return Ok(());
        }
        if super::monitor::held_bytes(self.held.make_contiguous()) > super::monitor::HELD_CAP {
            return Ok(()); // at a later replication checkpoint, once fewer outputs wait
        }
        let started = Instant::now();
        super::fault::point("keeper::checkpoint-take");
        let pages: Vec<usize> = std::mem::take(&mut vm.pages).into_iter().collect();
        let sectors: Vec<u64> = std::mem::take(&mut vm.sectors).into_iter().collect();
        self.monitor
            .checkpoint_holding(&mut vm.machine, &pages, &sectors, started, self.held.make_contiguous())
            .map_err(|e| ModeError::message(format!("cannot take a local checkpoint: {e:#}")))?;
        if let Some(sent) = &vm.sent {
            sent.local_checkpoint(self.primary.epoch());
        }
        Ok(())
    }
}

impl Mode<Watched> for ReplicatedMonitor {
    fn kind(&self) -> crate::status::Mode {
        Mode::<Watched>::kind(&self.primary)
    }

    fn next_slice_end(&self, icount: u64) -> u64 {
        let monitor = Mode::<Machine>::next_slice_end(&self.monitor, icount); // its fault point
        monitor.min(Mode::<Watched>::next_slice_end(&self.primary, icount))
    }

    fn on_input(&mut self, input: &Input) -> Result<(), ModeError> {
        Mode::<Machine>::on_input(&mut self.monitor, input)?;
        Mode::<Watched>::on_input(&mut self.primary, input)
    }

    fn on_outputs(&mut self, outputs: Vec<Output>) -> Vec<Output> {
        let fresh = Mode::<Machine>::on_outputs(&mut self.monitor, outputs);
        self.held.extend(fresh.iter().cloned());
        let now = Mode::<Watched>::on_outputs(&mut self.primary, fresh);
        debug_assert!(now.is_empty(), "a replicated primary holds every output");
        now
    }

    fn on_slice_end(&mut self, vm: &mut Watched, idle: bool) -> Result<(), ModeError> {
        self.monitor.heartbeat(vm.machine.icount());
        if self.stopping.is_some() {
            return self.finish_handover(vm); // (the machine does not run: the driver's wait ticks)
        }
        if let Some(sent) = &vm.sent {
            sent.will_take(self.primary.epoch() + 1); // recorded before the checkpoint may leave
        }
        vm.taken = false;
        let handover = self.monitor.handover_state();
        if handover == HandoverState::Synced {
            return self.stop_for_handover(vm);
        }
        self.primary.on_slice_end(vm, idle)?;
        match handover {
            // The pre-copy round: a local checkpoint whose pages the next monitor lays while
            // the guest runs on (at the first replication checkpoint from now).
            HandoverState::Ready if vm.taken => {
                self.local_checkpoint(vm, true)?;
                self.monitor.swap_handover(HandoverState::Ready, HandoverState::Delta);
                Ok(())
            }
            // While the next monitor lays the image or a checkpoint's pages, they stay as they
            // are (unless the log fills up: the next monitor then lays the whole image again).
            HandoverState::Preparing | HandoverState::Ready | HandoverState::Delta if !self.monitor.log_full() => {
                Ok(())
            }
            _ => self.local_checkpoint(vm, false),
        }
    }

    /// Released outputs leave next: a frame is counted as sent now.
    fn take_released(&mut self) -> Vec<Output> {
        let released = Mode::<Watched>::take_released(&mut self.primary);
        self.held.drain(..released.len().min(self.held.len())); // released in the order held
        for output in &released {
            if let OutputKind::NetFrame(_) = output.kind {
                self.monitor.frame_released();
            }
        }
        if let Some(stopping) = self.stopping.as_mut().filter(|s| !s.drained) {
            if self.primary.held_outputs() == 0 {
                // The driver writes these now; an event wakes it to call this mode again
                // (a release of nothing: epoch 0).
                stopping.drained = true;
                let _ = self.events.send(crate::host::HostEvent::Mode(ModeEvent::Released { up_to_epoch: 0 }));
            }
        }
        released
    }

    /// Also while a planned handover's final step waits for the backup.
    fn must_wait(&self) -> bool {
        self.stopping.is_some() || Mode::<Watched>::must_wait(&self.primary)
    }

    fn idle_wait_limit(&self) -> Option<Duration> {
        let primary = Mode::<Watched>::idle_wait_limit(&self.primary);
        Some(primary.map_or(HEARTBEAT_WAIT, |p| p.min(HEARTBEAT_WAIT)))
    }

    fn on_event(&mut self, vm: &mut Watched, event: ModeEvent) -> Verdict {
        if let (ModeEvent::Released { up_to_epoch }, Some(sent)) = (&event, &vm.sent) {
            // Released without the backup (unprotected) is no acknowledgement, but the record
            // letting go of it is safe: a resumed run fits only a backup that holds its base.
            if *up_to_epoch > 0 {
                sent.acknowledged(*up_to_epoch);
            }
        }
        let verdict = Mode::<Watched>::on_event(&mut self.primary, vm, event);
        if verdict == Verdict::Continue {
            if let Err(e) = self.finish_handover(vm) {
                // The final local checkpoint failed: this monitor cannot go on keeping the VM.
                crate::log::warn(format_args!("{e:#}"));
                std::process::abort();
            }
        }
        verdict
    }

    fn control(&mut self, command: &crate::control::Command) -> Option<Reply> {
        Mode::<Watched>::control(&mut self.primary, command)
    }

    /// The primary's final checkpoint, then a local one of it (a written disk's last
    /// sectors fold into the image).
    fn begin_end(&mut self, vm: &mut Watched, exit_code: u32) -> Result<EndProgress, ModeError> {
        if let Some(sent) = &vm.sent {
            sent.will_take(self.primary.epoch() + 1);
        }
        vm.taken = false;
        let progress = self.primary.begin_end(vm, exit_code)?;
        self.local_checkpoint(vm, true)?;
        Ok(progress)
    }

    fn protected_to(&self) -> Option<String> {
        Mode::<Watched>::protected_to(&self.primary)
    }

    /// Refused: the driver would run on standalone, without the keeper's monitor (and its
    /// heartbeat), and a restarted monitor would replicate again.
    fn unprotect(&mut self, _reply: Sender<Reply>) -> Option<Reply> {
        Some(Reply::error(409, "a --resilient primary cannot be unprotected yet (docs/microreboot.md)"))
    }

    fn report(&self, status: &mut Status) {
        Mode::<Watched>::report(&self.primary, status)
    }

    fn finish(self: Box<Self>) -> Option<Ownership> {
        Box::new(self.primary).finish()
    }
}
