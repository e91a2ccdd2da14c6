//! Replay: feed a log's records to a machine built from its header (or restored from one
//! of its snapshots) and check every digest on the way. No host I/O: the outputs go to
//! the caller, idle time passes at once (idle skips are inputs like any other).

use crate::output_digest::OutputDigest;
use crate::record::{EndReason, Record, StateDigest};
use machine::digest::{Region, RegionDigests};
use machine::{Machine, Output, RunExit};
use std::ops::Range;
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ReplayError {
    /// `parts`: where the states differ, as the region digests tell (empty for outputs,
    /// or where the log holds no region digests).
    #[error(
        "divergence at icount {icount}: the replay's {what} digest is {replayed:032x}, the recording's {recorded:032x}{parts}"
    )]
    Diverged { icount: u64, what: &'static str, recorded: u128, replayed: u128, parts: Parts },
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

/// A part of the machine whose region digests differ between the recording and the replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// The hart's and the devices' state.
    State,
    /// Guest-physical RAM addresses (whole regions of `machine::digest::REGION_BYTES`).
    Ram { addresses: Range<u64> },
    /// Byte offsets on the disk.
    Disk { bytes: Range<u64> },
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Part::State => write!(f, "the hart's and devices' state"),
            Part::Ram { addresses } => write!(f, "RAM {:#x}..{:#x}", addresses.start, addresses.end),
            Part::Disk { bytes } => write!(f, "disk bytes {:#x}..{:#x}", bytes.start, bytes.end),
        }
    }
}

/// The parts that differ, adjacent regions merged; shown as "; they differ in A, B and C".
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Parts(pub Vec<Part>);

/// At most this many parts are named in an error line.
const PARTS_SHOWN: usize = 8;

impl Parts {
    /// The parts of `machine` whose regions differ from `recorded`'s.
    pub fn between(machine: &Machine, recorded: &RegionDigests) -> Parts {
        let regions = machine.region_digests().differing(recorded);
        let region_bytes = machine::digest::REGION_BYTES;
        let mut parts: Vec<Part> = Vec::new();
        for region in regions {
            let part = match region {
                Region::State => Part::State,
                Region::Ram(i) => {
                    let start = machine::board::RAM_BASE + i as u64 * region_bytes;
                    Part::Ram { addresses: start..start + region_bytes }
                }
                Region::Disk(i) => {
                    let sectors = machine.disk_region_sectors(i);
                    let bytes = sectors
                        .map_or(i as u64 * region_bytes..(i as u64 + 1) * region_bytes, |s| s.start * 512..s.end * 512);
                    Part::Disk { bytes }
                }
            };
            match (parts.last_mut(), &part) {
                (Some(Part::Ram { addresses: last }), Part::Ram { addresses }) if last.end == addresses.start => {
                    last.end = addresses.end
                }
                (Some(Part::Disk { bytes: last }), Part::Disk { bytes }) if last.end == bytes.start => {
                    last.end = bytes.end
                }
                _ => parts.push(part),
            }
        }
        Parts(parts)
    }
}

impl std::fmt::Display for Parts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Some((last, rest)) = self.0.split_last() else { return Ok(()) };
        write!(f, "; they differ in ")?;
        if self.0.len() > PARTS_SHOWN {
            for part in &self.0[..PARTS_SHOWN] {
                write!(f, "{part}, ")?;
            }
            return write!(f, "and {} more parts", self.0.len() - PARTS_SHOWN);
        }
        for (i, part) in rest.iter().enumerate() {
            write!(f, "{}{part}", if i == 0 { "" } else { ", " })?;
        }
        if !rest.is_empty() {
            write!(f, " and ")?;
        }
        write!(f, "{last}")
    }
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
            Record::Digest { state, regions } => self.check(state, regions.as_ref())?,
            Record::Snapshot { .. } | Record::Delta { .. } => {
                // A recorder starts a new interval of outputs at a snapshot.
                self.outputs = OutputDigest::new();
            }
            Record::End { state, regions, reason } => {
                self.finish_end(*reason, on_output);
                self.check(state, regions.as_ref())?;
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

    /// Checks a digest record (`regions`: the recorded region digests, to name the parts
    /// that differ).
    fn check(&mut self, recorded: &StateDigest, regions: Option<&RegionDigests>) -> Result<(), ReplayError> {
        let replayed = self.take_state_digest();
        self.digests_checked += 1;
        let icount = recorded.icount;
        if replayed.machine != recorded.machine {
            let parts = regions.map(|r| Parts::between(&self.machine, r)).unwrap_or_default();
            let (recorded, replayed) = (recorded.machine, replayed.machine);
            return Err(ReplayError::Diverged { icount, what: "state", recorded, replayed, parts });
        }
        if replayed.outputs != recorded.outputs {
            let (recorded, replayed) = (recorded.outputs, replayed.outputs);
            return Err(ReplayError::Diverged { icount, what: "output", recorded, replayed, parts: Parts::default() });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_read_as_a_list_and_a_long_one_is_cut_after_eight() {
        let ram = |i: u64| Part::Ram { addresses: 0x8000_0000 + 2 * i * 0x10_0000..0x8010_0000 + 2 * i * 0x10_0000 };
        assert_eq!(Parts::default().to_string(), "");
        assert_eq!(Parts(vec![Part::State]).to_string(), "; they differ in the hart's and devices' state");
        let two = Parts(vec![ram(0), Part::Disk { bytes: 0..512 }]);
        assert_eq!(two.to_string(), "; they differ in RAM 0x80000000..0x80100000 and disk bytes 0x0..0x200");
        let many = Parts((0..11).map(ram).collect());
        let line = many.to_string();
        assert!(line.ends_with(", RAM 0x80e00000..0x80f00000, and 3 more parts"), "{line}");
        assert_eq!(line.matches("RAM ").count(), 8, "{line}");
    }
}
