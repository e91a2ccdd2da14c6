//! Encoding primitives: little-endian fields appended to a buffer, each count refused
//! above the cap the reader ([`bounded_reader::Reader`]) will hold it to.

use super::{Result, SnapshotError};

/// Appends little-endian fields to a buffer.
#[derive(Default)]
pub(super) struct Encoder {
    pub(super) buf: Vec<u8>,
}

impl Encoder {
    pub(super) fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub(super) fn bool(&mut self, v: bool) {
        self.u8(u8::from(v));
    }
    pub(super) fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(super) fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(super) fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub(super) fn raw(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// A count, refused (as the reader would refuse it) above `max`.
    pub(super) fn count(&mut self, n: usize, max: usize, what: &str) -> Result<()> {
        if n > max {
            return Err(SnapshotError::TooLarge { what: what.to_string(), found: n as u64, max: max as u64 });
        }
        self.u32(n as u32);
        Ok(())
    }

    pub(super) fn bytes(&mut self, data: &[u8], max: usize, what: &str) -> Result<()> {
        self.count(data.len(), max, what)?;
        self.raw(data);
        Ok(())
    }
}
