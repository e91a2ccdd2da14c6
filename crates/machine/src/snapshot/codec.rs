//! Encoding primitives: little-endian fields appended to a buffer, and read back from a
//! checked section with every read bounded by what is left.

use super::{malformed, Result, SnapshotError};

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

/// Reads little-endian fields from a checked section, every read bounded by what is
/// left; errors carry the file offset.
pub(super) struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
    /// File offset of `buf[0]`.
    base: u64,
}

impl<'a> Decoder<'a> {
    pub(super) fn new(buf: &'a [u8], base: u64) -> Decoder<'a> {
        Decoder { buf, pos: 0, base }
    }

    pub(super) fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    pub(super) fn error(&self, problem: impl Into<String>) -> SnapshotError {
        malformed(self.offset(), problem)
    }

    pub(super) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(super) fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.error(format!("the state ends inside {what}")));
        }
        let bytes = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    pub(super) fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N, what)?.try_into().expect("took N bytes"))
    }
    pub(super) fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }
    pub(super) fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    pub(super) fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    pub(super) fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    pub(super) fn bool(&mut self, what: &str) -> Result<bool> {
        let at = self.offset();
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(malformed(at, format!("{what} is {other}, not 0 or 1"))),
        }
    }

    /// A count of items of at least `min_item_bytes` each: at most `max`, and no more
    /// than the bytes left could hold, so allocating for it is safe.
    pub(super) fn count(&mut self, max: usize, min_item_bytes: usize, what: &str) -> Result<usize> {
        let at = self.offset();
        let n = self.u32(what)? as usize;
        if n > max {
            return Err(malformed(at, format!("{what}: {n}, at most {max}")));
        }
        if n.saturating_mul(min_item_bytes) > self.remaining() {
            return Err(malformed(at, format!("{what}: {n}, but only {} bytes of state are left", self.remaining())));
        }
        Ok(n)
    }

    pub(super) fn bytes(&mut self, max: usize, what: &str) -> Result<Vec<u8>> {
        let n = self.count(max, 1, what)?;
        Ok(self.take(n, what)?.to_vec())
    }

    pub(super) fn u32s<const N: usize>(&mut self, what: &str) -> Result<[u32; N]> {
        let mut out = [0; N];
        for v in &mut out {
            *v = self.u32(what)?;
        }
        Ok(out)
    }

    pub(super) fn u64s<const N: usize>(&mut self, what: &str) -> Result<[u64; N]> {
        let mut out = [0; N];
        for v in &mut out {
            *v = self.u64(what)?;
        }
        Ok(out)
    }

    pub(super) fn finish(&self) -> Result<()> {
        if self.remaining() != 0 {
            return Err(self.error(format!("{} bytes after the end of the state", self.remaining())));
        }
        Ok(())
    }
}
