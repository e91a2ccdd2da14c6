//! The backup's side of lockstep, pure: it holds the batches the protocol delivered, tells
//! the caller what to do with its machine next (start it, push the next input when its
//! stamp is reached, run to the next stamp or the batch's end — never past the last input it
//! holds —, check a digest), keeps the outputs produced after the primary's release mark
//! (to send again if it takes over) and stops at the first divergence, refusing every
//! batch until one starts afresh from a state (the resynchronization).

use super::batch::{Batch, Start};
use std::collections::VecDeque;
use thiserror::Error;

/// Outputs kept after the release mark beyond which the oldest are dropped (a primary holds
/// far fewer: its back-pressure stops the guest first).
pub const MAX_KEPT_OUTPUTS: usize = 1 << 16;

/// A backup acknowledges a batch only while its machine runs at most this many instructions
/// behind the batch's end (about 0.1 s of guest work); past that it acknowledges as it
/// catches up, and the primary, which pauses with too much unacknowledged
/// ([`super::leader::LeaderConfig::max_unreleased_icount`]), slows to its pace. So the lag a
/// failover must execute stays bounded.
pub const MAX_LAG_ICOUNT: u64 = 20_000_000;

/// Whether a batch ending at `end_icount` may be acknowledged now, the backup's machine
/// standing at `executed_icount`.
pub fn ack_now(end_icount: u64, executed_icount: u64) -> bool {
    end_icount.saturating_sub(executed_icount) <= MAX_LAG_ICOUNT
}

/// What the caller does with its machine next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Nothing held to execute: wait for the next batch.
    Wait,
    /// Build the machine from the images with these boot parameters (the primary's, opaque
    /// here): then `Check` its digest.
    Boot { params: Vec<u8> },
    /// Replace the machine by this whole state, at `icount`.
    Restore { icount: u64, bytes: Vec<u8> },
    /// Push this input (stamped at the machine's icount, which has reached it).
    Push { icount: u64, bytes: Vec<u8> },
    /// Run the machine to exactly `until`, then report [`Follower::ran`].
    Run { until: u64 },
    /// Report the machine's digest ([`Follower::check`]); the primary's was `digest`.
    Check { icount: u64, digest: u128 },
}

/// Why the backup's machine is no longer the primary's.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Divergence {
    #[error("divergence at icount {icount}: the backup's digest is {actual:032x}, the primary's {expected:032x}")]
    Digest { icount: u64, expected: u128, actual: u128 },
    #[error("divergence at icount {icount}: the backup's guest idles there, but the primary's ran on to {until}")]
    IdledEarly { icount: u64, until: u64 },
    #[error("divergence at icount {icount}: the backup's guest ended there, but the primary's ran on to {until}")]
    EndedEarly { icount: u64, until: u64 },
    #[error("divergence at icount {icount}: the backup's machine is past the input stamped at {stamp}")]
    PassedStamp { icount: u64, stamp: u64 },
    #[error("the backup's machine refused the input stamped at icount {icount}: {reason}")]
    InputRefused { icount: u64, reason: String },
    #[error("the backup's machine could not start: {reason}")]
    StartFailed { reason: String },
}

/// Why a batch was not held (the protocol then treats the epoch as not applied, and the
/// primary sends a state: the resynchronization).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Refused {
    #[error("{0}; waiting for a full checkpoint to resynchronize")]
    Diverged(Divergence),
    #[error("a lockstep batch that continues a stream this backup does not hold")]
    NoStart,
}

/// How a run slice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// At the icount asked for (or short of it, to be run again).
    Ran,
    /// The guest waits for an interrupt at this icount.
    Idle,
    /// The guest powered off or reset.
    Ended,
}

/// Counters for status.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FollowerStatus {
    pub batches_held: u64,
    pub inputs_held: u64,
    pub inputs_pushed: u64,
    pub digests_checked: u64,
    pub divergences: u64,
    pub resyncs: u64,
    pub kept_outputs: u64,
    pub kept_dropped: u64,
    /// The icount up to which the held batches let the machine run.
    pub held_to_icount: Option<u64>,
}

#[derive(Debug)]
pub struct Follower<O> {
    /// Held, not yet executed to their end; the front is executing.
    batches: VecDeque<Batch>,
    /// Inputs of the front batch already pushed.
    pushed_in_front: usize,
    /// The front batch's digest was checked.
    checked_front: bool,
    diverged: Option<Divergence>,
    ended: bool,
    /// Outputs produced since the start (the primary's numbering).
    outputs_produced: u64,
    /// The newest release mark heard.
    release_mark: u64,
    /// Outputs after the release mark, with their number.
    kept: VecDeque<(u64, O)>,
    status: FollowerStatus,
}

impl<O> Default for Follower<O> {
    fn default() -> Self {
        Follower {
            batches: VecDeque::new(),
            pushed_in_front: 0,
            checked_front: false,
            diverged: None,
            ended: false,
            outputs_produced: 0,
            release_mark: 0,
            kept: VecDeque::new(),
            status: FollowerStatus::default(),
        }
    }
}

impl<O> Follower<O> {
    pub fn new() -> Follower<O> {
        Follower::default()
    }

    /// A batch the protocol delivered whole, in epoch order. Held: the protocol may
    /// acknowledge it at once (the backup now holds its inputs). A batch that starts a
    /// stream replaces whatever was held (and clears a divergence).
    pub fn hold(&mut self, batch: Batch) -> Result<(), Refused> {
        match &batch.start {
            Some(start) => {
                if self.diverged.take().is_some() {
                    self.status.resyncs += 1;
                }
                let (inputs, outputs) = match start {
                    Start::Boot { .. } => (0, 0),
                    Start::State { inputs, outputs, .. } => (*inputs, *outputs),
                };
                self.batches.clear();
                self.kept.clear();
                self.pushed_in_front = 0;
                self.checked_front = false;
                self.ended = false;
                self.outputs_produced = outputs;
                self.status.inputs_held = inputs;
                self.status.inputs_pushed = inputs;
            }
            None if self.diverged.is_some() => {
                return Err(Refused::Diverged(self.diverged.clone().expect("checked")));
            }
            None if self.batches.is_empty() && self.status.held_to_icount.is_none() => return Err(Refused::NoStart),
            None => {}
        }
        self.release_mark = self.release_mark.max(batch.released_outputs);
        if batch.start.is_some() {
            self.release_mark = batch.released_outputs;
        }
        let mark = self.release_mark;
        while self.kept.front().is_some_and(|(seq, _)| *seq < mark) {
            self.kept.pop_front();
        }
        self.status.batches_held += 1;
        self.status.inputs_held += batch.inputs.len() as u64;
        self.status.held_to_icount = Some(batch.end_icount);
        self.batches.push_back(batch);
        Ok(())
    }

    /// What to do next with a machine that stands at `icount`.
    pub fn next(&mut self, icount: u64) -> Next {
        loop {
            if self.diverged.is_some() || self.ended {
                return Next::Wait;
            }
            let Some(front) = self.batches.front_mut() else { return Next::Wait };
            match front.start.take() {
                Some(Start::Boot { digest, params }) => {
                    // The boot's digest is checked before the first instruction (the boot's
                    // batch ends at icount 0, so its own digest would be the same).
                    front.digest = Some(digest);
                    return Next::Boot { params };
                }
                Some(Start::State { icount, bytes, .. }) => return Next::Restore { icount, bytes },
                None => {}
            }
            if let Some(input) = front.inputs.get(self.pushed_in_front) {
                if input.icount < icount {
                    let stamp = input.icount;
                    return self.diverge(Divergence::PassedStamp { icount, stamp });
                }
                if input.icount > icount {
                    return Next::Run { until: input.icount };
                }
                let bytes = std::mem::take(&mut front.inputs[self.pushed_in_front].bytes);
                self.pushed_in_front += 1;
                self.status.inputs_pushed += 1;
                return Next::Push { icount, bytes };
            }
            if icount < front.end_icount {
                return Next::Run { until: front.end_icount };
            }
            if icount > front.end_icount {
                let until = front.end_icount;
                return self.diverge(Divergence::PassedStamp { icount, stamp: until });
            }
            if let (Some(digest), false) = (front.digest, self.checked_front) {
                return Next::Check { icount, digest };
            }
            self.batches.pop_front();
            self.pushed_in_front = 0;
            self.checked_front = false;
        }
    }

    /// The machine's digest for the last `Check`: a mismatch is a divergence.
    pub fn check(&mut self, icount: u64, actual: u128) -> Result<(), Divergence> {
        let Some(front) = self.batches.front() else { return Ok(()) };
        let expected = front.digest.expect("Check is asked only for a batch with a digest");
        self.checked_front = true;
        self.status.digests_checked += 1;
        if actual != expected {
            let divergence = Divergence::Digest { icount, expected, actual };
            self.diverge(divergence.clone());
            return Err(divergence);
        }
        Ok(())
    }

    /// The machine could not do what was asked (start, take an input): a divergence.
    pub fn failed(&mut self, divergence: Divergence) {
        self.diverge(divergence);
    }

    /// A run slice asked for by `Run { until }` ended at `icount`, producing `outputs`.
    pub fn ran(&mut self, icount: u64, until: u64, end: RunEnd, outputs: Vec<O>) -> Result<(), Divergence> {
        for output in outputs {
            let seq = self.outputs_produced;
            self.outputs_produced += 1;
            if seq >= self.release_mark {
                if self.kept.len() >= MAX_KEPT_OUTPUTS {
                    self.kept.pop_front();
                    self.status.kept_dropped += 1;
                }
                self.kept.push_back((seq, output));
            }
        }
        let divergence = match end {
            RunEnd::Idle if icount < until => Divergence::IdledEarly { icount, until },
            RunEnd::Ended => {
                // The primary's guest ended at this very point too if all is well; the
                // primary's End message settles it. Ending short of a later input is not well.
                let more = self.batches.iter().any(|b| b.end_icount > icount);
                if !more {
                    self.ended = true;
                    return Ok(());
                }
                Divergence::EndedEarly { icount, until }
            }
            _ => return Ok(()),
        };
        self.diverge(divergence.clone());
        Err(divergence)
    }

    fn diverge(&mut self, divergence: Divergence) -> Next {
        if self.diverged.is_none() {
            self.status.divergences += 1;
            self.diverged = Some(divergence);
        }
        Next::Wait
    }

    /// The divergence this backup stopped at, until a state resynchronizes it.
    pub fn diverged(&self) -> Option<&Divergence> {
        self.diverged.as_ref()
    }

    /// The guest ended where the held batches end.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// Everything held has been executed (a takeover may go live).
    pub fn caught_up(&self) -> bool {
        self.batches.is_empty()
    }

    /// Taking over: the outputs produced after the primary's last release mark, in order —
    /// some may have left already (sent twice, never lost).
    pub fn take_unreleased(&mut self) -> Vec<O> {
        self.kept.drain(..).map(|(_, output)| output).collect()
    }

    /// The release mark heard last and the number of outputs produced.
    pub fn outputs(&self) -> (u64, u64) {
        (self.release_mark, self.outputs_produced)
    }

    pub fn status(&self) -> FollowerStatus {
        FollowerStatus { kept_outputs: self.kept.len() as u64, ..self.status }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lockstep::batch::StampedInput;

    fn batch(end_icount: u64, inputs: &[(u64, u8)], released: u64, digest: Option<u128>) -> Batch {
        let inputs = inputs.iter().map(|&(icount, b)| StampedInput { icount, bytes: vec![b] }).collect();
        Batch { start: None, inputs, end_icount, released_outputs: released, digest }
    }

    fn boot() -> Batch {
        Batch { start: Some(Start::Boot { digest: 7, params: vec![] }), ..batch(0, &[], 0, None) }
    }

    #[test]
    fn the_backup_never_runs_past_the_last_input_it_holds() {
        let mut follower: Follower<&str> = Follower::new();
        follower.hold(boot()).unwrap();
        assert_eq!(follower.next(0), Next::Boot { params: vec![] });
        assert_eq!(follower.next(0), Next::Check { icount: 0, digest: 7 });
        follower.check(0, 7).unwrap();
        assert_eq!(follower.next(0), Next::Wait, "nothing held beyond icount 0");
        follower.hold(batch(100, &[(40, 1), (40, 2)], 0, Some(9))).unwrap();
        assert_eq!(follower.next(0), Next::Run { until: 40 });
        follower.ran(40, 40, RunEnd::Ran, vec!["a"]).unwrap();
        assert_eq!(follower.next(40), Next::Push { icount: 40, bytes: vec![1] });
        assert_eq!(follower.next(40), Next::Push { icount: 40, bytes: vec![2] });
        assert_eq!(follower.next(40), Next::Run { until: 100 });
        follower.ran(100, 100, RunEnd::Idle, vec!["b"]).unwrap();
        assert_eq!(follower.next(100), Next::Check { icount: 100, digest: 9 });
        follower.check(100, 9).unwrap();
        assert_eq!(follower.next(100), Next::Wait);
        assert_eq!(follower.take_unreleased(), vec!["a", "b"]);
    }

    #[test]
    fn outputs_before_the_release_mark_are_not_kept() {
        let mut follower: Follower<u32> = Follower::new();
        follower.hold(boot()).unwrap();
        follower.hold(batch(10, &[], 0, None)).unwrap();
        follower.next(0);
        follower.check(0, 7).unwrap();
        assert_eq!(follower.next(0), Next::Run { until: 10 });
        follower.ran(10, 10, RunEnd::Ran, vec![0, 1, 2]).unwrap();
        follower.hold(batch(20, &[], 2, None)).unwrap();
        assert_eq!(follower.take_unreleased(), vec![2]);
        assert_eq!(follower.outputs(), (2, 3));
    }

    #[test]
    fn a_divergence_refuses_batches_until_a_state_resynchronizes() {
        let mut follower: Follower<()> = Follower::new();
        follower.hold(boot()).unwrap();
        follower.next(0);
        let error = follower.check(0, 8).unwrap_err();
        assert_eq!(
            error.to_string(),
            "divergence at icount 0: the backup's digest is 00000000000000000000000000000008, the primary's \
             00000000000000000000000000000007"
        );
        assert_eq!(follower.next(0), Next::Wait);
        assert!(matches!(follower.hold(batch(5, &[], 0, None)), Err(Refused::Diverged(_))));
        let state = Start::State { icount: 50, inputs: 3, outputs: 1, bytes: vec![1, 2] };
        follower.hold(Batch { start: Some(state), ..batch(50, &[], 1, None) }).unwrap();
        assert_eq!(follower.next(0), Next::Restore { icount: 50, bytes: vec![1, 2] });
        assert_eq!(follower.next(50), Next::Wait);
        let status = follower.status();
        assert_eq!((status.divergences, status.resyncs, status.inputs_held), (1, 1, 3));
    }

    #[test]
    fn idling_or_ending_short_of_the_primary_is_a_divergence() {
        let mut follower: Follower<()> = Follower::new();
        follower.hold(boot()).unwrap();
        follower.hold(batch(10, &[], 0, None)).unwrap();
        follower.next(0);
        follower.check(0, 7).unwrap();
        assert_eq!(follower.ran(4, 10, RunEnd::Idle, vec![]), Err(Divergence::IdledEarly { icount: 4, until: 10 }));
        let mut follower: Follower<()> = Follower::new();
        follower.hold(boot()).unwrap();
        follower.hold(batch(10, &[], 0, None)).unwrap();
        follower.next(0);
        follower.check(0, 7).unwrap();
        follower.ran(10, 10, RunEnd::Ended, vec![]).unwrap();
        assert!(follower.ended());
    }

    #[test]
    fn a_batch_without_a_start_is_refused_by_a_fresh_backup() {
        let mut follower: Follower<()> = Follower::new();
        assert_eq!(follower.hold(batch(10, &[], 0, None)), Err(Refused::NoStart));
    }
}
