//! The primary's side of lockstep, pure: it collects the inputs as the machine takes them,
//! cuts them into epochs (batches), holds each output until the backup acknowledged the
//! epoch that covers it, counts what left (the release mark the backup keeps outputs after)
//! and says when a digest is due. The caller hands each batch to the replication protocol
//! as the payload of its epoch and reports the protocol's releases back.

use super::batch::{Batch, StampedInput, Start};
use crate::output_commit::OutputBuffer;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaderConfig {
    /// Outputs that may wait for the backup's acknowledgement before the guest must pause.
    pub max_held_outputs: usize,
    /// A batch carries the machine's digest this often (0: never).
    pub digest_every_ms: u64,
    /// Inputs alone (no output waits) go out at most this often, gathered into one batch:
    /// a busy guest's clock-rate inputs come every slice, and each batch costs framing, an
    /// acknowledgement and a hand-over on the backup. Outputs never wait for it.
    pub min_batch_ms: u64,
    /// With no input and no output, a batch still goes out this often while the guest runs,
    /// so that the backup follows closely (its lag is what a failover must execute).
    pub max_lag_ms: u64,
    /// Batches cut but not yet released beyond which the guest pauses ([`Leader::lagging`]):
    /// a backup acknowledges a batch only while its machine runs at most
    /// [`super::follower::MAX_LAG_ICOUNT`] behind it, so a backup that cannot keep up slows
    /// the primary down to its pace instead of falling ever further behind (and its queue,
    /// 64 checkpoints at most, never overflows).
    pub max_unreleased_batches: u64,
    /// Instructions executed past the last released batch's end beyond which the guest
    /// pauses too: with the backup's own bound, what a failover must execute is bounded.
    pub max_unreleased_icount: u64,
}

impl Default for LeaderConfig {
    fn default() -> Self {
        LeaderConfig {
            max_held_outputs: 4096,
            digest_every_ms: 250,
            min_batch_ms: 10,
            max_lag_ms: 50,
            max_unreleased_batches: 48,
            max_unreleased_icount: 2 * super::follower::MAX_LAG_ICOUNT,
        }
    }
}

/// Totals for status and benchmarks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LeaderTotals {
    pub batches: u64,
    pub inputs: u64,
    pub input_bytes: u64,
    pub digests: u64,
    pub states: u64,
}

#[derive(Debug)]
pub struct Leader<O> {
    config: LeaderConfig,
    /// The last epoch cut (0: none yet).
    epoch: u64,
    /// Inputs since the last cut.
    pending: Vec<StampedInput>,
    /// Inputs the machine took since the start (the primary's numbering).
    inputs_stamped: u64,
    held: OutputBuffer<O>,
    outputs_produced: u64,
    outputs_released: u64,
    /// Outputs held in the running (not yet cut) epoch.
    outputs_this_epoch: bool,
    last_cut_ms: u64,
    last_cut_icount: Option<u64>,
    last_digest_ms: u64,
    /// The newest epoch released, and the end icount of each epoch cut after it.
    released_epoch: u64,
    unreleased_ends: std::collections::VecDeque<(u64, u64)>,
    totals: LeaderTotals,
}

impl<O> Leader<O> {
    pub fn new(config: LeaderConfig, now_ms: u64) -> Leader<O> {
        Leader {
            config,
            epoch: 0,
            pending: Vec::new(),
            inputs_stamped: 0,
            held: OutputBuffer::new(usize::MAX),
            outputs_produced: 0,
            outputs_released: 0,
            outputs_this_epoch: false,
            last_cut_ms: now_ms,
            last_cut_icount: None,
            last_digest_ms: now_ms,
            released_epoch: 0,
            unreleased_ends: std::collections::VecDeque::new(),
            totals: LeaderTotals::default(),
        }
    }

    /// The machine took this input (stamped `icount`, encoded by the caller).
    pub fn input(&mut self, icount: u64, bytes: Vec<u8>) {
        assert!(self.pending.last().is_none_or(|last| icount >= last.icount), "inputs are stamped in order");
        assert!(self.last_cut_icount.is_none_or(|cut| icount >= cut), "an input stamped before the last cut");
        self.inputs_stamped += 1;
        self.totals.inputs += 1;
        self.totals.input_bytes += bytes.len() as u64;
        self.pending.push(StampedInput { icount, bytes });
    }

    /// The guest produced `output`: it leaves once the epoch about to be cut is acknowledged.
    pub fn hold(&mut self, output: O) {
        self.held.push(self.epoch + 1, output).unwrap_or_else(|_| unreachable!("the buffer has no limit"));
        self.outputs_produced += 1;
        self.outputs_this_epoch = true;
    }

    /// Whether a batch should be cut at this slice end (the machine stands at `icount`):
    /// outputs wait for it, or inputs have for `min_batch_ms`, or the backup has not been
    /// told of progress for `max_lag_ms`, or the protocol wants a stream started
    /// (`start_wanted`: it asks for a full checkpoint). The first cut (the start) is always due.
    pub fn cut_due(&self, icount: u64, now_ms: u64, start_wanted: bool) -> bool {
        let Some(cut) = self.last_cut_icount else { return true };
        let since_ms = now_ms.saturating_sub(self.last_cut_ms);
        start_wanted
            || self.outputs_this_epoch
            || (!self.pending.is_empty() && since_ms >= self.config.min_batch_ms)
            || (icount > cut && since_ms >= self.config.max_lag_ms)
    }

    /// Whether the next batch should carry the machine's digest.
    pub fn digest_due(&self, now_ms: u64) -> bool {
        self.config.digest_every_ms > 0 && now_ms.saturating_sub(self.last_digest_ms) >= self.config.digest_every_ms
    }

    /// The start of a stream from the whole machine at `icount` (a full checkpoint's bytes):
    /// the inputs not yet cut are inside it.
    pub fn state_start(&self, icount: u64, bytes: Vec<u8>) -> Start {
        Start::State { icount, inputs: self.inputs_stamped, outputs: self.outputs_produced, bytes }
    }

    /// Cut the next epoch at `icount`: its batch holds the inputs since the last cut (none
    /// when it starts from a state, which holds them), the release mark and `digest`.
    pub fn cut(&mut self, icount: u64, now_ms: u64, start: Option<Start>, digest: Option<u128>) -> (u64, Batch) {
        assert!(self.last_cut_icount.is_none_or(|cut| icount >= cut), "cuts go forward");
        let inputs = match start {
            Some(Start::State { .. }) => {
                self.pending.clear();
                Vec::new()
            }
            _ => std::mem::take(&mut self.pending),
        };
        if digest.is_some() {
            self.last_digest_ms = now_ms;
            self.totals.digests += 1;
        }
        if matches!(start, Some(Start::State { .. })) {
            self.totals.states += 1;
        }
        self.totals.batches += 1;
        let batch = Batch { start, inputs, end_icount: icount, released_outputs: self.outputs_released, digest };
        (self.end_epoch(icount, now_ms), batch)
    }

    /// No backup will ever use this epoch (the protocol said Discard): its inputs are dropped;
    /// a stream that starts again starts from a state.
    pub fn discard(&mut self, icount: u64, now_ms: u64) -> u64 {
        self.pending.clear();
        self.end_epoch(icount, now_ms)
    }

    fn end_epoch(&mut self, icount: u64, now_ms: u64) -> u64 {
        self.epoch += 1;
        self.unreleased_ends.push_back((self.epoch, icount));
        self.last_cut_icount = Some(icount);
        self.last_cut_ms = now_ms;
        self.outputs_this_epoch = false;
        self.epoch
    }

    /// Output commit: the backup holds every epoch up to `up_to_epoch` (or no backup can
    /// take over any more): their outputs leave, in order.
    pub fn release(&mut self, up_to_epoch: u64) -> Vec<O> {
        self.released_epoch = self.released_epoch.max(up_to_epoch.min(self.epoch));
        while self.unreleased_ends.front().is_some_and(|&(epoch, _)| epoch <= self.released_epoch) {
            self.unreleased_ends.pop_front();
        }
        let released = self.held.release(up_to_epoch);
        self.outputs_released += released.len() as u64;
        released
    }

    /// Back-pressure: the guest pauses while this many outputs wait.
    pub fn must_wait(&self) -> bool {
        self.held.len() >= self.config.max_held_outputs
    }

    /// Bounded lag: the backup has not acknowledged the last `max_unreleased_batches`
    /// batches, or the machine (at `icount`) ran `max_unreleased_icount` past the end of the
    /// oldest unreleased one (the guest should pause until it does; the caller applies this
    /// only while a backup follows).
    pub fn lagging(&self, icount: u64) -> bool {
        let oldest_end = self.unreleased_ends.front().map(|&(_, end)| end);
        self.unreleased_batches() >= self.config.max_unreleased_batches
            || oldest_end.is_some_and(|end| icount.saturating_sub(end) >= self.config.max_unreleased_icount)
    }

    /// Batches cut and not yet released.
    pub fn unreleased_batches(&self) -> u64 {
        self.epoch - self.released_epoch
    }

    pub fn held_outputs(&self) -> usize {
        self.held.len()
    }

    /// Outputs wait in an epoch not yet cut or not yet acknowledged.
    pub fn holds_outputs(&self) -> bool {
        !self.held.is_empty()
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn outputs_released(&self) -> u64 {
        self.outputs_released
    }

    pub fn inputs_stamped(&self) -> u64 {
        self.inputs_stamped
    }

    pub fn totals(&self) -> LeaderTotals {
        self.totals
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_output_leaves_only_with_the_epoch_that_carries_the_inputs_before_it() {
        let mut leader = Leader::new(LeaderConfig::default(), 0);
        let (epoch, start) = leader.cut(0, 0, Some(Start::Boot { digest: 1, params: vec![] }), None);
        assert_eq!((epoch, start.end_icount), (1, 0));
        leader.input(10, b"key".to_vec());
        leader.hold("echo");
        assert!(leader.cut_due(12, 1, false));
        assert!(leader.release(1).is_empty(), "epoch 1 did not carry the input");
        let (epoch, batch) = leader.cut(12, 1, None, None);
        assert_eq!(batch.inputs, vec![StampedInput { icount: 10, bytes: b"key".to_vec() }]);
        assert_eq!(leader.release(epoch), vec!["echo"]);
        leader.hold("next");
        let (_, batch) = leader.cut(20, 2, None, None);
        assert_eq!(batch.released_outputs, 1, "the release mark counts what left");
    }

    #[test]
    fn a_backup_that_does_not_acknowledge_makes_the_leader_lag() {
        let config = LeaderConfig { max_unreleased_batches: 4, max_unreleased_icount: 1000, ..LeaderConfig::default() };
        let mut leader: Leader<()> = Leader::new(config, 0);
        for icount in [0, 10, 20] {
            leader.cut(icount, icount, None, None);
            assert!(!leader.lagging(icount), "{icount}");
        }
        leader.cut(30, 30, None, None);
        assert!(leader.lagging(30), "four batches unreleased, fewer than four allowed");
        leader.release(2);
        assert_eq!(leader.unreleased_batches(), 2);
        assert!(!leader.lagging(30));
        assert!(!leader.lagging(20 + 999));
        assert!(leader.lagging(20 + 1000), "1000 instructions past the oldest unreleased batch's end");
        leader.release(u64::MAX);
        assert_eq!(leader.unreleased_batches(), 0);
        assert!(!leader.lagging(1_000_000));
    }

    #[test]
    fn a_quiet_guest_cuts_only_to_report_progress() {
        let config = LeaderConfig { min_batch_ms: 10, max_lag_ms: 50, ..LeaderConfig::default() };
        let mut leader: Leader<()> = Leader::new(config, 0);
        leader.cut(0, 0, None, None);
        leader.input(0, vec![1]);
        assert!(!leader.cut_due(0, 9, false), "inputs alone gather for a while");
        assert!(leader.cut_due(0, 10, false));
        leader.cut(0, 10, None, None);
        leader.hold(());
        assert!(leader.cut_due(0, 10, false), "an output never waits");
        leader.cut(0, 10, None, None);
        let mut leader: Leader<()> = Leader::new(config, 0);
        leader.cut(0, 0, None, None);
        assert!(!leader.cut_due(0, 500, false), "no progress, nothing to say");
        assert!(leader.cut_due(0, 500, true), "a backup waits for a start");
        assert!(!leader.cut_due(100, 49, false));
        assert!(leader.cut_due(100, 50, false));
    }

    #[test]
    fn a_state_start_holds_the_inputs_not_yet_cut() {
        let mut leader: Leader<()> = Leader::new(LeaderConfig::default(), 0);
        leader.cut(0, 0, Some(Start::Boot { digest: 0, params: vec![] }), None);
        leader.input(5, vec![1]);
        let start = leader.state_start(8, vec![7; 4]);
        let (_, batch) = leader.cut(8, 1, Some(start), Some(9));
        assert!(batch.inputs.is_empty());
        assert_eq!(batch.start, Some(Start::State { icount: 8, inputs: 1, outputs: 0, bytes: vec![7; 4] }));
        assert_eq!(leader.totals().states, 1);
    }
}
