//! Checkpoint mode's policy on the primary, as pure code: when an epoch ends, which kind of
//! checkpoint closes it, when a full checkpoint is pre-copied while the guest runs, which
//! outputs are held for output commit and when they leave, and when the guest must wait for
//! acknowledgements (back-pressure). The runtime (`crates/vmm`) applies its decisions to a
//! machine; the seeded simulation drives the same code without one.
//!
//! Time is the caller's, in milliseconds, passed in with every call; nothing here reads a
//! clock, takes a checkpoint or touches a socket.

use crate::output_commit::OutputBuffer;
use crate::protocol::CheckpointKind;

/// The schedule's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduleConfig {
    /// An epoch lasts this long.
    pub epoch_ms: u64,
    /// A guest that idles with outputs waiting ends its epoch early, but not sooner than this
    /// after the last checkpoint (so that output commit does not wait for the full epoch).
    pub min_epoch_ms: u64,
    /// Outputs held beyond which the guest waits for acknowledgements.
    pub max_held_outputs: usize,
}

impl ScheduleConfig {
    pub fn new(epoch_ms: u64) -> Self {
        ScheduleConfig { epoch_ms, min_epoch_ms: 2.min(epoch_ms), max_held_outputs: 65_536 }
    }
}

/// What the runtime does at the end of a run slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SliceAction {
    /// Nothing: the epoch goes on.
    Continue,
    /// Begin pre-copying a full checkpoint while the guest runs.
    StartPrecopy,
    /// Copy the next part of the pre-copy; finish it (and report the checkpoint) if done.
    StepPrecopy,
    /// The backup no longer wants the full checkpoint being pre-copied: drop it.
    AbandonPrecopy,
    /// Take the checkpoint of `epoch` (of `kind`) now and report it.
    Take { epoch: u64, kind: CheckpointKind },
}

/// Checkpoint mode's schedule: epochs, pre-copy and held outputs.
#[derive(Debug, Clone)]
pub struct CheckpointSchedule<O> {
    config: ScheduleConfig,
    /// The epoch of the last checkpoint taken (0: none yet).
    epoch: u64,
    epoch_started_ms: u64,
    outputs_this_epoch: bool,
    precopying: bool,
    held: OutputBuffer<O>,
}

impl<O> CheckpointSchedule<O> {
    pub fn new(config: ScheduleConfig, now_ms: u64) -> Self {
        CheckpointSchedule {
            config,
            epoch: 0,
            epoch_started_ms: now_ms,
            outputs_this_epoch: false,
            precopying: false,
            // No hard limit: memory is bounded by the guest waiting at max_held_outputs
            // (must_wait) plus what one slice can make.
            held: OutputBuffer::new(usize::MAX),
        }
    }

    /// The epoch of the last checkpoint taken (0: none yet).
    /// A schedule whose epochs go on after `epoch` (a primary that took its run up again:
    /// [`crate::Primary::resume`]).
    pub fn resumed(config: ScheduleConfig, now_ms: u64, epoch: u64) -> Self {
        CheckpointSchedule { epoch, ..CheckpointSchedule::new(config, now_ms) }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn epoch_ms(&self) -> u64 {
        self.config.epoch_ms
    }

    pub fn is_precopying(&self) -> bool {
        self.precopying
    }

    pub fn held_outputs(&self) -> usize {
        self.held.len()
    }

    /// The kind to ask for at a slice's end, from the protocol's advice
    /// ([`crate::Primary::next_checkpoint_kind`]) and the newest epoch the protocol had been
    /// given when it advised ([`crate::Primary::last_taken_epoch`]). Advice read across a
    /// thread may predate the checkpoint handed over last (it may still say Full for a full
    /// checkpoint just taken, and a second one would be pre-copied and sent for nothing), so
    /// until the protocol has seen that checkpoint the chain is taken to continue: an
    /// incremental it cannot use is dropped, never sent, and its next advice says Full again.
    pub fn wanted(&self, advice: CheckpointKind, advised_after_epoch: Option<u64>) -> CheckpointKind {
        if advised_after_epoch.unwrap_or(0) == self.epoch {
            advice
        } else {
            CheckpointKind::Incremental
        }
    }

    /// The guest produced `output`: it belongs to the running epoch and waits for its release.
    pub fn hold(&mut self, output: O) {
        self.held.push(self.epoch + 1, output).unwrap_or_else(|_| unreachable!("the buffer has no limit"));
        self.outputs_this_epoch = true;
    }

    /// A run slice ended at `now_ms` (`idle`: the guest waits for an interrupt); `wanted` is
    /// the kind the protocol asks for next ([`crate::Primary::next_checkpoint_kind`]).
    pub fn on_slice_end(&mut self, now_ms: u64, idle: bool, wanted: CheckpointKind) -> SliceAction {
        if self.precopying {
            if wanted != CheckpointKind::Full {
                self.precopying = false;
                return SliceAction::AbandonPrecopy;
            }
            return SliceAction::StepPrecopy;
        }
        let elapsed = now_ms.saturating_sub(self.epoch_started_ms);
        let early = idle && self.outputs_this_epoch && elapsed >= self.config.min_epoch_ms;
        if elapsed < self.config.epoch_ms && !early {
            return SliceAction::Continue;
        }
        if wanted == CheckpointKind::Full {
            self.precopying = true;
            return SliceAction::StartPrecopy;
        }
        SliceAction::Take { epoch: self.epoch + 1, kind: wanted }
    }

    /// The checkpoint of the next epoch was taken at `now_ms` (a pre-copy finished, or a
    /// `Take`): returns its epoch. Outputs produced from now on belong to the epoch after.
    pub fn checkpoint_taken(&mut self, now_ms: u64) -> u64 {
        self.precopying = false;
        self.epoch += 1;
        self.epoch_started_ms = now_ms;
        self.outputs_this_epoch = false;
        self.epoch
    }

    /// The VM ends: the final checkpoint closes the running epoch whatever its length; the
    /// kind to take (a pre-copy in progress is dropped and taken whole at once).
    pub fn final_checkpoint(&mut self, wanted: CheckpointKind) -> (u64, CheckpointKind) {
        self.precopying = false;
        (self.epoch + 1, wanted)
    }

    /// Output commit: the outputs of `up_to_epoch` and earlier leave, in order.
    pub fn release(&mut self, up_to_epoch: u64) -> Vec<O> {
        self.held.release(up_to_epoch)
    }

    /// Back-pressure: the guest must not run on until outputs are released.
    pub fn must_wait(&self) -> bool {
        self.held.len() >= self.config.max_held_outputs
    }

    /// How long a guest that idles may wait before the slice must end: outputs held for
    /// output commit never wait on a guest timer, and neither does a pre-copy (the guest's
    /// idle time is the copy's: an idle guest would otherwise copy one step per timer tick).
    /// None: no limit.
    pub fn idle_wait_limit_ms(&self, now_ms: u64) -> Option<u64> {
        if self.precopying {
            return Some(0);
        }
        if !self.outputs_this_epoch {
            return None;
        }
        let elapsed = now_ms.saturating_sub(self.epoch_started_ms);
        Some(self.config.min_epoch_ms.saturating_sub(elapsed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use CheckpointKind::{Full, Incremental};

    fn schedule() -> CheckpointSchedule<&'static str> {
        CheckpointSchedule::new(ScheduleConfig::new(25), 0)
    }

    #[test]
    fn an_epoch_ends_after_its_length_with_the_kind_the_protocol_wants() {
        let mut s = schedule();
        assert_eq!(s.on_slice_end(24, false, Incremental), SliceAction::Continue);
        assert_eq!(s.on_slice_end(25, false, Incremental), SliceAction::Take { epoch: 1, kind: Incremental });
        assert_eq!(s.checkpoint_taken(25), 1);
        assert_eq!(s.on_slice_end(49, false, Incremental), SliceAction::Continue);
        assert_eq!(s.on_slice_end(50, false, Incremental), SliceAction::Take { epoch: 2, kind: Incremental });
    }

    #[test]
    fn an_idle_guest_with_outputs_waiting_ends_its_epoch_early_but_not_before_the_minimum() {
        let mut s = schedule();
        assert_eq!(s.on_slice_end(5, true, Incremental), SliceAction::Continue, "no outputs: no hurry");
        s.hold("reply");
        assert_eq!(s.on_slice_end(1, true, Incremental), SliceAction::Continue, "within the minimum epoch");
        assert_eq!(s.on_slice_end(2, false, Incremental), SliceAction::Continue, "busy: the epoch runs on");
        assert_eq!(s.on_slice_end(2, true, Incremental), SliceAction::Take { epoch: 1, kind: Incremental });
    }

    #[test]
    fn outputs_leave_only_when_their_epoch_is_released() {
        let mut s = schedule();
        s.hold("a");
        s.checkpoint_taken(25);
        s.hold("b");
        assert_eq!(s.release(0), Vec::<&str>::new());
        assert_eq!(s.release(1), vec!["a"]);
        s.checkpoint_taken(50);
        assert_eq!(s.release(2), vec!["b"]);
    }

    #[test]
    fn a_full_checkpoint_is_precopied_and_abandoned_when_no_longer_wanted() {
        let mut s = schedule();
        assert_eq!(s.on_slice_end(25, false, Full), SliceAction::StartPrecopy);
        assert_eq!(s.on_slice_end(26, false, Full), SliceAction::StepPrecopy);
        assert_eq!(s.on_slice_end(27, false, CheckpointKind::Discard), SliceAction::AbandonPrecopy);
        assert!(!s.is_precopying());
        assert_eq!(s.on_slice_end(28, false, Full), SliceAction::StartPrecopy);
        assert_eq!(s.checkpoint_taken(30), 1);
        assert!(!s.is_precopying());
    }

    #[test]
    fn advice_older_than_the_last_checkpoint_is_taken_to_continue_the_chain() {
        let mut s = schedule();
        assert_eq!(s.wanted(Full, None), Full);
        s.checkpoint_taken(25);
        assert_eq!(s.wanted(Full, None), Incremental, "the protocol has not seen epoch 1 yet");
        assert_eq!(s.wanted(Full, Some(1)), Full);
        assert_eq!(s.wanted(CheckpointKind::Discard, Some(1)), CheckpointKind::Discard);
    }

    #[test]
    fn the_guest_waits_once_too_many_outputs_are_held() {
        let mut s = CheckpointSchedule::new(ScheduleConfig { max_held_outputs: 2, ..ScheduleConfig::new(25) }, 0);
        s.hold(1);
        assert!(!s.must_wait());
        s.hold(2);
        assert!(s.must_wait());
        s.checkpoint_taken(25);
        s.release(1);
        assert!(!s.must_wait());
    }

    #[test]
    fn held_outputs_cap_the_idle_wait_at_the_minimum_epoch() {
        let mut s = schedule();
        assert_eq!(s.idle_wait_limit_ms(0), None);
        s.hold("reply");
        assert_eq!(s.idle_wait_limit_ms(1), Some(1));
        assert_eq!(s.idle_wait_limit_ms(10), Some(0));
        s.checkpoint_taken(10);
        assert_eq!(s.idle_wait_limit_ms(11), None);
    }

    #[test]
    fn an_idle_guest_does_not_wait_while_a_full_checkpoint_is_pre_copied() {
        let mut s = schedule();
        assert_eq!(s.on_slice_end(25, true, Full), SliceAction::StartPrecopy);
        assert_eq!(s.idle_wait_limit_ms(26), Some(0));
        assert_eq!(s.on_slice_end(26, true, Full), SliceAction::StepPrecopy);
        s.checkpoint_taken(27);
        assert_eq!(s.idle_wait_limit_ms(28), None);
    }
}
