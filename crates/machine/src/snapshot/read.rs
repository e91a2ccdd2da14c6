//! Reading: a byte source that counts offsets and keeps the checksums, and the header
//! of any version read through it.

use super::header::decode_header;
use super::{
    malformed, Result, SnapshotError, SnapshotInfo, FORMAT_VERSION, HEADER_BYTES, MAGIC, MAX_HEADER_BYTES,
    MIN_HEADER_BYTES, SECTION_HEADER_BYTES, TAG_RAM, TAG_STATE,
};
use std::io::Read;

pub(super) struct Source<'r, R: Read> {
    pub(super) inner: &'r mut R,
    /// Bytes from the snapshot's start.
    pub(super) offset: u64,
    pub(super) body_crc: u32,
    pub(super) section_crc: u32,
}

impl<'r, R: Read> Source<'r, R> {
    pub(super) fn new(inner: &'r mut R, offset: u64) -> Self {
        Source { inner, offset, body_crc: 0, section_crc: 0 }
    }

    /// Reads exactly `buf.len()` bytes, without checksumming them.
    pub(super) fn fill_raw(&mut self, buf: &mut [u8], what: &'static str) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.inner.read(&mut buf[done..]) {
                Ok(0) => return Err(SnapshotError::Truncated { offset: self.offset + done as u64, what }),
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => return Err(SnapshotError::Io { op: "reading the snapshot", source }),
            }
        }
        self.offset += buf.len() as u64;
        Ok(())
    }

    /// Body bytes inside a section: both checksums cover them.
    pub(super) fn fill(&mut self, buf: &mut [u8], what: &'static str) -> Result<()> {
        self.fill_raw(buf, what)?;
        self.body_crc = crc32c::crc32c_append(self.body_crc, buf);
        self.section_crc = crc32c::crc32c_append(self.section_crc, buf);
        Ok(())
    }

    pub(super) fn u32(&mut self, what: &'static str) -> Result<u32> {
        let mut b = [0; 4];
        self.fill(&mut b, what)?;
        Ok(u32::from_le_bytes(b))
    }

    pub(super) fn u64(&mut self, what: &'static str) -> Result<u64> {
        let mut b = [0; 8];
        self.fill(&mut b, what)?;
        Ok(u64::from_le_bytes(b))
    }

    /// A section's tag and length, checked against the expected tag and the body's end.
    pub(super) fn section_start(&mut self, tag: u32, body_end: u64) -> Result<u64> {
        let at = self.offset;
        if body_end.saturating_sub(at) < SECTION_HEADER_BYTES + 4 {
            return Err(malformed(at, format!("the body ends at byte {body_end} before section {}", tag_name(tag))));
        }
        self.section_crc = 0;
        let found = self.u32("a section tag")?;
        if found != tag {
            return Err(malformed(at, format!("expected section {}, found tag {}", tag_name(tag), tag_name(found))));
        }
        let len = self.u64("a section length")?;
        let room = body_end - self.offset - 4;
        if len > room {
            return Err(malformed(
                at + 4,
                format!("section {} of {len} bytes runs past the body's end at byte {body_end}", tag_name(tag)),
            ));
        }
        Ok(len)
    }

    /// Reads and checks the section's checksum.
    pub(super) fn section_end(&mut self, tag: u32) -> Result<()> {
        let computed = self.section_crc;
        let at = self.offset;
        let mut b = [0; 4];
        self.fill_raw(&mut b, "a section checksum")?;
        self.body_crc = crc32c::crc32c_append(self.body_crc, &b);
        let stored = u32::from_le_bytes(b);
        if stored != computed {
            let what = match tag {
                TAG_STATE => "state section",
                TAG_RAM => "RAM section",
                _ => "disk section",
            };
            return Err(SnapshotError::Checksum { what, offset: at, stored, computed });
        }
        Ok(())
    }

    /// `len` bytes into a buffer that grows only as they arrive (a lying length in a
    /// short file allocates nothing beyond the file).
    pub(super) fn vec(&mut self, len: u64, what: &'static str) -> Result<Vec<u8>> {
        const CHUNK: usize = 1 << 20;
        let mut out = Vec::new();
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            let start = out.len();
            out.resize(start + n, 0);
            self.fill(&mut out[start..], what)?;
            left -= n as u64;
        }
        Ok(out)
    }
}

pub(super) fn tag_name(tag: u32) -> String {
    let bytes = tag.to_le_bytes();
    if bytes.iter().all(|&b| b.is_ascii_alphanumeric() || b == 0) {
        format!("\"{}\"", String::from_utf8_lossy(&bytes).trim_end_matches('\0'))
    } else {
        format!("{tag:#010x}")
    }
}

/// Reads and checks the header of any version, then parses this version's.
pub(super) fn read_header_from<R: Read>(src: &mut Source<R>) -> Result<SnapshotInfo> {
    let mut prefix = [0u8; 16];
    let mut got = 0;
    while got < MAGIC.len() {
        match src.inner.read(&mut prefix[got..MAGIC.len()]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => return Err(SnapshotError::Io { op: "reading the snapshot", source }),
        }
    }
    if prefix[..got] != MAGIC[..got] {
        return Err(SnapshotError::NotASnapshot { found: prefix[..got].to_vec() });
    }
    src.offset += got as u64;
    if got < MAGIC.len() {
        return Err(SnapshotError::Truncated { offset: src.offset, what: "the magic" });
    }
    src.fill_raw(&mut prefix[8..16], "the header")?;
    let version = u32::from_le_bytes(prefix[8..12].try_into().expect("4 bytes"));
    let header_bytes = u32::from_le_bytes(prefix[12..16].try_into().expect("4 bytes"));
    let unsupported =
        |header_intact| SnapshotError::UnsupportedVersion { found: version, supported: FORMAT_VERSION, header_intact };
    if !(MIN_HEADER_BYTES..=MAX_HEADER_BYTES).contains(&header_bytes) {
        if version != FORMAT_VERSION {
            return Err(unsupported(false));
        }
        return Err(malformed(12, format!("a header of {header_bytes} bytes")));
    }
    let mut header = prefix.to_vec();
    header.resize(header_bytes as usize, 0);
    src.fill_raw(&mut header[16..], "the header")?;
    let crc_at = header.len() - 4;
    let stored = u32::from_le_bytes(header[crc_at..].try_into().expect("4 bytes"));
    let computed = crc32c::crc32c(&header[..crc_at]);
    if stored != computed {
        if version != FORMAT_VERSION {
            return Err(unsupported(false));
        }
        return Err(SnapshotError::Checksum { what: "header", offset: crc_at as u64, stored, computed });
    }
    // Where a converter from an older version would go; none exists yet.
    if version != FORMAT_VERSION {
        return Err(unsupported(true));
    }
    if header.len() != HEADER_BYTES {
        return Err(malformed(
            12,
            format!("a version {FORMAT_VERSION} header of {} bytes, not {HEADER_BYTES}", header.len()),
        ));
    }
    decode_header(&header)
}

/// Reads a snapshot's header: what the file holds, without reading the rest.
pub fn read_header(input: &mut impl Read) -> Result<SnapshotInfo> {
    read_header_from(&mut Source::new(input, 0))
}
