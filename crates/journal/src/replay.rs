//! Replay: feed a log's records to a machine built from its header (or restored from one
//! of its snapshots) and check every digest on the way. No host I/O: the outputs go to
//! the caller, idle time passes at once (idle skips are inputs like any other).

use crate::output_digest::OutputDigest;
use crate::record::{EndReason, Record, StateDigest};
use machine::{Machine, Output, RunExit};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ReplayError {
    #[error(
        "divergence at icount {icount}: the replay's {what} digest is {replayed:032x}, the recording's {recorded:032x}"
    )]
    Diverged { icount: u64, what: &'static str, recorded: u128, replayed: u128 },
    #[error(
        "divergence at icount {icount}: the guest idles there, but the recording's next record is at icount {next}"
    )]
    IdledEarly { icount: u64, next: u64 },
    #[error(
        "divergence at icount {icount}: the guest ended there ({how}), but the recording's next record is at icount {next}"
    )]
    EndedEarly { icount: u64, how: String, next: u64 },
    #[error("divergence at icount {icount}: the recording ended with {recorded:?}, the replay with {replayed}")]
    OtherEnd { icount: u64, recorded: EndReason, replayed: String },
    #[error("cannot deliver the input stamped at icount {icount}")]
    Input {
        icount: u64,
        #[source]
        source: machine::InputError,
    },
}

/// What applying a record led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Continue,
    /// The machine stands at the `until` instruction count.
    ReachedUntil,
    /// The end record: the run ended as recorded, every digest matching.
    Ended(EndReason),
}

pub struct Replayer {
    pub machine: Machine,
    outputs: OutputDigest,
    ended: Option<RunExit>,
    /// Digest records checked so far (the end record's included).
    pub digests_checked: u64,
    pub inputs_applied: u64,
}

impl Replayer {
    /// Replays into `machine`, which must be in the state the log's records start from:
    /// built from the header, or restored from a snapshot record (then feed the records
    /// after it).
    pub fn new(machine: Machine) -> Replayer {
        Replayer { machine, outputs: OutputDigest::new(), ended: None, digests_checked: 0, inputs_applied: 0 }
    }

    /// Applies one record; the outputs the machine produces on the way go to `on_output`.
    /// With `until`, stops at that icount instead of applying a record stamped after it.
    pub fn apply(
        &mut self,
        record: &Record,
        until: Option<u64>,
        on_output: &mut dyn FnMut(&Output),
    ) -> Result<Step, ReplayError> {
        let icount = record.icount();
        if let Some(until) = until.filter(|&u| icount > u) {
            self.run_to(until, icount, on_output)?;
            return Ok(Step::ReachedUntil);
        }
        self.run_to(icount, icount, on_output)?;
        match record {
            Record::Input(input) => {
                self.machine.push_input(input.clone()).map_err(|source| ReplayError::Input { icount, source })?;
                self.inputs_applied += 1;
            }
            Record::Digest(recorded) => self.check(recorded)?,
            Record::Snapshot { .. } | Record::Delta { .. } => {
                // A recorder starts a new interval of outputs at a snapshot.
                self.outputs = OutputDigest::new();
            }
            Record::End { state, reason } => {
                self.finish_end(*reason, on_output);
                self.check(state)?;
                self.check_end(icount, *reason)?;
                return Ok(Step::Ended(*reason));
            }
        }
        Ok(Step::Continue)
    }

    /// The digest of the machine now and of the outputs since the last digest (taken:
    /// the next one starts afresh).
    pub fn take_state_digest(&mut self) -> StateDigest {
        StateDigest { icount: self.machine.icount(), machine: self.machine.digest().0, outputs: self.outputs.take() }
    }

    fn check(&mut self, recorded: &StateDigest) -> Result<(), ReplayError> {
        let replayed = self.take_state_digest();
        self.digests_checked += 1;
        let icount = recorded.icount;
        if replayed.machine != recorded.machine {
            let (recorded, replayed) = (recorded.machine, replayed.machine);
            return Err(ReplayError::Diverged { icount, what: "state", recorded, replayed });
        }
        if replayed.outputs != recorded.outputs {
            let (recorded, replayed) = (recorded.outputs, replayed.outputs);
            return Err(ReplayError::Diverged { icount, what: "output", recorded, replayed });
        }
        Ok(())
    }

    /// A recorded power-off or reset is the exit of the last run: make sure the replay's
    /// machine has seen it too (it may stand at the icount with the exit not yet taken).
    fn finish_end(&mut self, reason: EndReason, on_output: &mut dyn FnMut(&Output)) {
        if self.ended.is_none() && matches!(reason, EndReason::PowerOff { .. } | EndReason::Reset) {
            let exit = self.machine.run(self.machine.icount());
            self.drain(on_output);
            if matches!(exit, RunExit::PowerOff { .. } | RunExit::Reset) {
                self.ended = Some(exit);
            }
        }
    }

    fn check_end(&self, icount: u64, recorded: EndReason) -> Result<(), ReplayError> {
        let replayed = match (recorded, self.ended) {
            (EndReason::PowerOff { code }, Some(RunExit::PowerOff { code: c })) if code == c => return Ok(()),
            (EndReason::Reset, Some(RunExit::Reset)) | (EndReason::Stopped, None) => return Ok(()),
            (_, Some(exit)) => format!("{exit:?}"),
            (_, None) => "the guest still running".to_string(),
        };
        Err(ReplayError::OtherEnd { icount, recorded, replayed })
    }

    fn drain(&mut self, on_output: &mut dyn FnMut(&Output)) {
        for output in self.machine.take_outputs() {
            self.outputs.add(&output);
            on_output(&output);
        }
    }

    /// Runs the machine to `target` exactly (the icount of the next record, `next`).
    fn run_to(&mut self, target: u64, next: u64, on_output: &mut dyn FnMut(&Output)) -> Result<(), ReplayError> {
        while self.machine.icount() < target {
            let exit = self.machine.run(target);
            self.drain(on_output);
            let icount = self.machine.icount();
            match exit {
                RunExit::Budget => {}
                RunExit::Idle { .. } if icount < target => return Err(ReplayError::IdledEarly { icount, next }),
                RunExit::Idle { .. } => {}
                RunExit::PowerOff { .. } | RunExit::Reset => {
                    self.ended = Some(exit);
                    if icount < target {
                        return Err(ReplayError::EndedEarly { icount, how: format!("{exit:?}"), next });
                    }
                }
            }
        }
        Ok(())
    }
}
