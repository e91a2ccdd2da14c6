//! The input log (DESIGN.md §2): a machine is a pure function of its initial state and
//! its stamped inputs, so a file holding the configuration, every input with its
//! instruction count, and a state digest now and then is a recording that replays
//! exactly (`ftvm run --record`, `ftvm replay`; the microreboot keeper reads it too).
//!
//! # Format, version 3 (every integer little-endian)
//!
//! A 16-byte preamble, then records.
//!
//! | offset | bytes | preamble field |
//! |---:|---:|---|
//! | 0 | 8 | magic `FTVMILOG` |
//! | 8 | 4 | format version, 3 |
//! | 12 | 4 | CRC32C of bytes 0..12 |
//!
//! Every record is framed alike: a 20-byte frame header, then its payload.
//!
//! | offset | bytes | frame field |
//! |---:|---:|---|
//! | 0 | 4 | record type ([`RecordType`]) |
//! | 4 | 8 | payload length (capped per type before anything is allocated) |
//! | 12 | 4 | CRC32C of the payload |
//! | 16 | 4 | CRC32C of frame bytes 0..16 (checked before the length is trusted) |
//!
//! The first record is the header ([`LogHeader`]: the configuration, the digests of the
//! kernel, initrd and disk, how the run starts); then inputs, digests, snapshots and
//! snapshot deltas in the order they were written (instruction counts never go back); a finished recording
//! ends with an end record. See `record.rs` for each payload.
//!
//! # Decisions
//!
//! - A log cut short (a crash while recording) replays up to its last whole record: the
//!   reader reports the partial record as [`JournalError::Truncated`] with its offset,
//!   after handing out every whole record before it. Damage inside a record is
//!   [`JournalError::Corrupt`], naming the record's offset.
//! - Snapshot payloads (a machine snapshot file, `machine::snapshot`) are never read into
//!   memory by the reader: it checks their checksum as they stream past and hands out
//!   where they lie, so that a replay can restore from the file section ([`Section`]).
//! - A recording's periodic snapshots after the first are deltas (record type 6): the pages,
//!   disk sectors and state that differ from the previous one, found by comparing region
//!   digests (`machine::digest`), with a full snapshot every so often to bound how many
//!   deltas a seek applies. A delta carries the machine digest after it, so a seek that
//!   applies it checks the state it reached.
//! - Digest records carry the region digests their machine digest is the root of (one per
//!   MiB of RAM and of the disk, `machine::digest`), listed as the regions changed since
//!   the previous digest record (all non-empty ones after the header and after each
//!   snapshot or delta record), so that a replay's divergence names the RAM addresses and
//!   disk bytes that differ at the cost of a few regions per record. The reader rebuilds
//!   every region and checks that they make the recorded root.
//! - Two records are at most [`MAX_RECORD_GAP_ICOUNT`] apart (a recorder writes a digest
//!   record at least every [`DIGEST_AT_LEAST_EVERY_ICOUNT`]): a reader refuses a record
//!   further on, so that a hostile log cannot make a replay run the machine arbitrarily far.
//!   A header's RAM size and disk are checked against what a machine can have before any
//!   region digests are sized by them.
//! - Console output is hashed as a byte stream and frames one by one
//!   ([`OutputDigest`]), so that how a run was cut into slices does not matter.

mod error;
mod frame;
mod output_digest;
mod reader;
mod record;
mod regions;
pub mod replay;
mod writer;

pub use error::JournalError;
pub use frame::{RecordType, FRAME_HEADER_BYTES, MAX_DIGEST_BYTES, PREAMBLE_BYTES};
pub use machine::digest::RegionDigests;
pub use output_digest::OutputDigest;
pub use reader::{LogReader, Section};
pub use record::{
    decode_input, disk_copy_path, encode_input, file_digest, DiskImage, EndReason, ImageFile, LogHeader, Record, Start,
    StateDigest,
};
pub use writer::{LogWriter, WRITE_BUFFER_BYTES};

/// The magic that starts every input log.
pub const MAGIC: [u8; 8] = *b"FTVMILOG";
/// The format version this crate writes and reads. Version 2: machine digests as
/// `machine::digest` defines them since its region digests (a version 1 log would replay to
/// other digest values, which must not read as a divergence). Version 3: digest and end
/// records carry the region digests (a version 2 reader would take them for trailing bytes).
pub const FORMAT_VERSION: u32 = 3;

/// The most instructions between two records of a log (a run starting from a snapshot counts
/// from its icount, one from boot from 0). A recorder writes a digest record at the first slice
/// end [`DIGEST_AT_LEAST_EVERY_ICOUNT`] past its last record (`vmm::record`), so an honest log
/// never comes near; a writer refuses a record past it, a reader refuses one as corrupt. It is
/// what keeps a hostile log from making a replay run the machine far beyond what its records
/// vouch for: a replay runs at most this far per record it reads.
pub const MAX_RECORD_GAP_ICOUNT: u64 = 1 << 30;
/// A recorder writes a record at least this often, in instructions (a quarter of the gap a
/// reader allows, so that slices of any length a mode runs stay far inside it).
pub const DIGEST_AT_LEAST_EVERY_ICOUNT: u64 = MAX_RECORD_GAP_ICOUNT / 4;
/// The largest disk a log may name (its region digests, 16 bytes per MiB, are held in memory).
pub const MAX_DISK_BYTES: u64 = 4 << 40;
