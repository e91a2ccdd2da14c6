//! The preamble and the frame every record sits in: type, length, the payload's CRC32C,
//! and the frame header's own CRC32C, checked before its length is trusted.

use crate::error::{JournalError, Result};
use crate::{FORMAT_VERSION, MAGIC};

pub const PREAMBLE_BYTES: usize = 16;
pub const FRAME_HEADER_BYTES: usize = 20;

/// The kinds of record, and the most payload bytes each may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordType {
    Header = 1,
    Input = 2,
    Digest = 3,
    Snapshot = 4,
    End = 5,
    /// What changed since the previous snapshot or delta (a `machine::checkpoint` payload).
    Delta = 6,
}

/// The largest input payload: an icount, a tag and the input's bytes (frames are at most
/// 64 KiB; console and entropy inputs are small).
pub const MAX_INPUT_BYTES: u64 = 1 << 20;
/// The largest header: the kernel command line (16 KiB at most) and three paths.
pub const MAX_HEADER_BYTES: u64 = 128 << 10;
/// The largest digest or end record: the region digests of a machine whose RAM and disk
/// hold up to about 3 TiB that is not zero (a reader caps each log's records tighter, by
/// the RAM and disk its header names).
pub const MAX_DIGEST_BYTES: u64 = 64 << 20;
/// The largest snapshot: a machine snapshot holds at most all of RAM (64 GiB) and a disk.
pub const MAX_SNAPSHOT_BYTES: u64 = 1 << 42;

impl RecordType {
    pub fn from_u32(value: u32) -> Option<RecordType> {
        Some(match value {
            1 => RecordType::Header,
            2 => RecordType::Input,
            3 => RecordType::Digest,
            4 => RecordType::Snapshot,
            5 => RecordType::End,
            6 => RecordType::Delta,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            RecordType::Header => "header",
            RecordType::Input => "input",
            RecordType::Digest => "digest",
            RecordType::Snapshot => "snapshot",
            RecordType::End => "end",
            RecordType::Delta => "snapshot delta",
        }
    }

    pub fn max_payload_bytes(self) -> u64 {
        match self {
            RecordType::Header => MAX_HEADER_BYTES,
            RecordType::Input => MAX_INPUT_BYTES,
            RecordType::Digest => MAX_DIGEST_BYTES,
            RecordType::Snapshot => MAX_SNAPSHOT_BYTES,
            RecordType::End => MAX_DIGEST_BYTES,
            RecordType::Delta => MAX_SNAPSHOT_BYTES,
        }
    }
}

pub fn preamble() -> [u8; PREAMBLE_BYTES] {
    let mut bytes = [0; PREAMBLE_BYTES];
    bytes[..8].copy_from_slice(&MAGIC);
    bytes[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    let crc = crc32c::crc32c(&bytes[..12]);
    bytes[12..].copy_from_slice(&crc.to_le_bytes());
    bytes
}

/// Checks a preamble: the magic, then the version (so that another version is named as
/// such even if its preamble differs), then the checksum.
pub fn check_preamble(bytes: &[u8; PREAMBLE_BYTES]) -> Result<()> {
    if bytes[..8] != MAGIC {
        return Err(JournalError::NotALog { found: bytes[..8].to_vec() });
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(JournalError::OtherVersion { found: version, supported: FORMAT_VERSION });
    }
    let stored = u32::from_le_bytes(bytes[12..].try_into().expect("4 bytes"));
    let computed = crc32c::crc32c(&bytes[..12]);
    if stored != computed {
        let problem = format!("the preamble's checksum is {stored:#010x}, its bytes' {computed:#010x}");
        return Err(JournalError::Corrupt { offset: 0, problem });
    }
    Ok(())
}

/// A frame header for `payload_len` bytes whose CRC32C is `payload_crc`.
pub fn frame_header(record: RecordType, payload_len: u64, payload_crc: u32) -> [u8; FRAME_HEADER_BYTES] {
    debug_assert!(payload_len <= record.max_payload_bytes());
    let mut bytes = [0; FRAME_HEADER_BYTES];
    bytes[..4].copy_from_slice(&(record as u32).to_le_bytes());
    bytes[4..12].copy_from_slice(&payload_len.to_le_bytes());
    bytes[12..16].copy_from_slice(&payload_crc.to_le_bytes());
    let crc = crc32c::crc32c(&bytes[..16]);
    bytes[16..].copy_from_slice(&crc.to_le_bytes());
    bytes
}

/// A frame header, checked: its own checksum first, then its type and its length's cap.
#[derive(Debug, Clone, Copy)]
pub struct Frame {
    pub record: RecordType,
    pub payload_len: u64,
    pub payload_crc: u32,
}

pub fn parse_frame_header(bytes: &[u8; FRAME_HEADER_BYTES], offset: u64) -> Result<Frame> {
    let stored = u32::from_le_bytes(bytes[16..].try_into().expect("4 bytes"));
    let computed = crc32c::crc32c(&bytes[..16]);
    if stored != computed {
        let problem = format!("the frame header's checksum is {stored:#010x}, its bytes' {computed:#010x}");
        return Err(JournalError::Corrupt { offset, problem });
    }
    let kind = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"));
    let payload_len = u64::from_le_bytes(bytes[4..12].try_into().expect("8 bytes"));
    let payload_crc = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
    let record = RecordType::from_u32(kind)
        .ok_or_else(|| JournalError::Corrupt { offset, problem: format!("unknown record type {kind}") })?;
    if payload_len > record.max_payload_bytes() {
        let max = record.max_payload_bytes();
        let problem = format!("a {} record of {payload_len} bytes, more than the {max} allowed", record.name());
        return Err(JournalError::Corrupt { offset, problem });
    }
    Ok(Frame { record, payload_len, payload_crc })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_header_round_trips_and_any_flipped_bit_is_caught() {
        let header = frame_header(RecordType::Input, 42, 0xdead_beef);
        let frame = parse_frame_header(&header, 0).unwrap();
        assert_eq!((frame.record, frame.payload_len, frame.payload_crc), (RecordType::Input, 42, 0xdead_beef));
        for bit in 0..FRAME_HEADER_BYTES * 8 {
            let mut damaged = header;
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(matches!(parse_frame_header(&damaged, 7), Err(JournalError::Corrupt { offset: 7, .. })));
        }
    }

    #[test]
    fn an_oversized_length_is_refused_before_it_is_trusted() {
        let header = frame_header(RecordType::Header, 0, 0);
        let mut big = header;
        big[4..12].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let crc = crc32c::crc32c(&big[..16]);
        big[16..].copy_from_slice(&crc.to_le_bytes());
        let err = parse_frame_header(&big, 3).unwrap_err();
        assert_eq!(
            err.to_string(),
            "corrupt record at byte 3: a header record of 1099511627776 bytes, more than the 131072 allowed"
        );
    }

    #[test]
    fn the_preamble_names_another_version() {
        let mut bytes = preamble();
        check_preamble(&bytes).unwrap();
        bytes[8] = 2;
        assert_eq!(
            check_preamble(&bytes).unwrap_err().to_string(),
            "input log format version 2; this ftvm reads version 3"
        );
        bytes[0] = b'X';
        assert!(matches!(check_preamble(&bytes), Err(JournalError::NotALog { .. })));
    }
}
