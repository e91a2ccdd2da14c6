//! A lockstep epoch's payload: the inputs the primary stamped since the last epoch, how far
//! the backup may now execute, the primary's release mark, and now and then the digest the
//! backup's machine must have at the end. It travels as the opaque payload of one epoch of
//! the replication protocol (a "checkpoint" of kind Incremental), so the protocol's
//! handshake, resend, acknowledgements and ownership rules carry lockstep unchanged; a
//! batch that starts the stream (kind Full) also says what the backup's machine starts from.
//!
//! Layout (little-endian): `"FTLS" | version u16 | end icount u64 | released outputs u64 |
//! digest (bool, u128) | input count u32 | inputs (icount u64, length u32, bytes) |
//! start tag u8 | start fields`, a state's bytes running to the end of the payload.

use bounded_reader::{ReadError, Reader};
use thiserror::Error;

/// The first bytes of every lockstep payload: how a backup tells lockstep from checkpoints.
pub const MAGIC: [u8; 4] = *b"FTLS";
pub const BATCH_VERSION: u16 = 1;
/// Inputs one batch may carry (a batch covers at most a few ms of guest work).
pub const MAX_INPUTS_PER_BATCH: usize = 1 << 16;
/// The largest input (a network frame is far smaller; the journal's cap is the same).
pub const MAX_INPUT_BYTES: usize = 1 << 20;
/// The largest boot parameters (a kernel command line and a clock).
pub const MAX_BOOT_PARAMS_BYTES: usize = 64 << 10;

/// An input as the primary's machine took it: the icount at which it takes effect and its
/// encoding (opaque here: `replica` does not know the machine).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StampedInput {
    pub icount: u64,
    pub bytes: Vec<u8>,
}

/// What the backup's machine starts from (only in the batch that starts a stream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// Booted from the backup's own images (the same as the primary's) with the primary's
    /// boot parameters (`params`, opaque here: what the images do not say, such as the
    /// kernel command line and the clock's start): its machine's digest before the first
    /// instruction must be `digest`.
    Boot { digest: u128, params: Vec<u8> },
    /// The whole machine at `icount`, in the machine's own format (a full checkpoint): a
    /// backup joining a running primary, or resynchronizing after a divergence. `inputs` and
    /// `outputs` are how many the primary had stamped and produced by then.
    State { icount: u64, inputs: u64, outputs: u64, bytes: Vec<u8> },
}

/// One epoch of lockstep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub start: Option<Start>,
    /// In stamp order; every stamp at or before `end_icount`.
    pub inputs: Vec<StampedInput>,
    /// The backup may execute up to this icount: the primary has stamped no other input at
    /// or before it (inputs stamped at this very icount later come in the next batch, and
    /// the backup takes them before it executes on).
    pub end_icount: u64,
    /// How many outputs had left the primary when it cut this batch (its release mark):
    /// the backup keeps the outputs after it, to send again should it take over.
    pub released_outputs: u64,
    /// The digest of the primary's machine at `end_icount`, every few epochs.
    pub digest: Option<u128>,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BatchError {
    #[error("not a lockstep batch (no FTLS magic)")]
    NotLockstep,
    #[error("lockstep batch version {found}, this ftvm reads version {BATCH_VERSION}")]
    OtherVersion { found: u16 },
    #[error("a lockstep batch is malformed: {0}")]
    Malformed(#[from] ReadError),
    #[error("a lockstep batch's input {index} is stamped at icount {icount}, {problem}")]
    BadStamp { index: usize, icount: u64, problem: &'static str },
    #[error("a lockstep batch's start tag is {0}, not 0, 1 or 2")]
    BadStart(u8),
}

/// Whether `payload` is a lockstep batch (rather than a checkpoint).
pub fn is_lockstep(payload: &[u8]) -> bool {
    payload.starts_with(&MAGIC)
}

impl Batch {
    pub fn encode(&self) -> Vec<u8> {
        let input_bytes: usize = self.inputs.iter().map(|i| 12 + i.bytes.len()).sum();
        let state_bytes = match &self.start {
            Some(Start::State { bytes, .. }) => bytes.len(),
            _ => 0,
        };
        let mut w = Vec::with_capacity(64 + input_bytes + state_bytes);
        w.extend_from_slice(&MAGIC);
        w.extend_from_slice(&BATCH_VERSION.to_le_bytes());
        w.extend_from_slice(&self.end_icount.to_le_bytes());
        w.extend_from_slice(&self.released_outputs.to_le_bytes());
        match self.digest {
            None => w.push(0),
            Some(digest) => {
                w.push(1);
                w.extend_from_slice(&digest.to_le_bytes());
            }
        }
        w.extend_from_slice(&(self.inputs.len() as u32).to_le_bytes());
        for input in &self.inputs {
            w.extend_from_slice(&input.icount.to_le_bytes());
            w.extend_from_slice(&(input.bytes.len() as u32).to_le_bytes());
            w.extend_from_slice(&input.bytes);
        }
        match &self.start {
            None => w.push(0),
            Some(Start::Boot { digest, params }) => {
                w.push(1);
                w.extend_from_slice(&digest.to_le_bytes());
                w.extend_from_slice(&(params.len() as u32).to_le_bytes());
                w.extend_from_slice(params);
            }
            Some(Start::State { icount, inputs, outputs, bytes }) => {
                w.push(2);
                w.extend_from_slice(&icount.to_le_bytes());
                w.extend_from_slice(&inputs.to_le_bytes());
                w.extend_from_slice(&outputs.to_le_bytes());
                w.extend_from_slice(bytes);
            }
        }
        w
    }

    /// Reads a batch, checking every length against what is there and every stamp's order.
    pub fn decode(payload: &[u8]) -> Result<Batch, BatchError> {
        if !is_lockstep(payload) {
            return Err(BatchError::NotLockstep);
        }
        let mut r = Reader::new(payload);
        r.take(MAGIC.len(), "magic")?;
        let found = r.u16("version")?;
        if found != BATCH_VERSION {
            return Err(BatchError::OtherVersion { found });
        }
        let end_icount = r.u64("end icount")?;
        let released_outputs = r.u64("released outputs")?;
        let digest = if r.bool("digest")? { Some(r.u128("digest")?) } else { None };
        let count = r.count("input count", MAX_INPUTS_PER_BATCH, 12)?;
        let mut inputs = Vec::with_capacity(count);
        for index in 0..count {
            let icount = r.u64("input icount")?;
            let bytes = r.bytes("input", MAX_INPUT_BYTES)?.to_vec();
            if icount > end_icount {
                return Err(BatchError::BadStamp { index, icount, problem: "after the batch's end" });
            }
            if inputs.last().is_some_and(|last: &StampedInput| icount < last.icount) {
                return Err(BatchError::BadStamp { index, icount, problem: "before the input ahead of it" });
            }
            inputs.push(StampedInput { icount, bytes });
        }
        let start = match r.u8("start")? {
            0 => None,
            1 => Some(Start::Boot {
                digest: r.u128("boot digest")?,
                params: r.bytes("boot parameters", MAX_BOOT_PARAMS_BYTES)?.to_vec(),
            }),
            2 => Some(Start::State {
                icount: r.u64("state icount")?,
                inputs: r.u64("state inputs")?,
                outputs: r.u64("state outputs")?,
                bytes: r.rest().to_vec(),
            }),
            tag => return Err(BatchError::BadStart(tag)),
        };
        r.finish()?;
        if let (Some(Start::State { icount: start, .. }), Some(first)) = (&start, inputs.first()) {
            if first.icount < *start {
                return Err(BatchError::BadStamp {
                    index: 0,
                    icount: first.icount,
                    problem: "before the state's icount",
                });
            }
        }
        Ok(Batch { start, inputs, end_icount, released_outputs, digest })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Batch> {
        let input = |icount, bytes: &[u8]| StampedInput { icount, bytes: bytes.to_vec() };
        vec![
            Batch { start: None, inputs: vec![], end_icount: 7, released_outputs: 0, digest: None },
            Batch {
                start: Some(Start::Boot { digest: 0xfeed, params: b"console=ttyS0".to_vec() }),
                inputs: vec![input(0, b"a")],
                end_icount: 0,
                released_outputs: 0,
                digest: Some(3),
            },
            Batch {
                start: Some(Start::State { icount: 10, inputs: 4, outputs: 2, bytes: vec![9; 100] }),
                inputs: vec![input(10, b""), input(12, b"xyz")],
                end_icount: 20,
                released_outputs: 2,
                digest: None,
            },
        ]
    }

    #[test]
    fn batches_round_trip() {
        for batch in samples() {
            assert_eq!(Batch::decode(&batch.encode()), Ok(batch));
        }
    }

    #[test]
    fn every_cut_of_a_batch_without_a_state_is_refused() {
        for batch in samples().into_iter().filter(|b| !matches!(b.start, Some(Start::State { .. }))) {
            let bytes = batch.encode();
            for cut in 0..bytes.len() {
                assert!(Batch::decode(&bytes[..cut]).is_err(), "{batch:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn stamps_out_of_order_or_past_the_end_are_refused() {
        let input = |icount| StampedInput { icount, bytes: vec![] };
        let late = Batch { start: None, inputs: vec![input(9)], end_icount: 8, released_outputs: 0, digest: None };
        assert_eq!(
            Batch::decode(&late.encode()).unwrap_err().to_string(),
            "a lockstep batch's input 0 is stamped at icount 9, after the batch's end"
        );
        let back = Batch { inputs: vec![input(5), input(4)], end_icount: 9, ..late };
        assert_eq!(
            Batch::decode(&back.encode()),
            Err(BatchError::BadStamp { index: 1, icount: 4, problem: "before the input ahead of it" })
        );
    }

    #[test]
    fn a_checkpoint_or_another_version_is_not_read_as_a_batch() {
        assert_eq!(Batch::decode(b"FTVMCKPT...."), Err(BatchError::NotLockstep));
        let mut bytes = samples()[0].encode();
        bytes[4] = 9;
        assert_eq!(Batch::decode(&bytes), Err(BatchError::OtherVersion { found: 9 }));
        let mut bytes = samples()[0].encode();
        *bytes.last_mut().unwrap() = 7;
        assert_eq!(Batch::decode(&bytes), Err(BatchError::BadStart(7)));
    }
}
