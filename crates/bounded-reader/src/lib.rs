//! A reader for bytes that came from outside the process (snapshot files, checkpoints,
//! network frames): little-endian fields read off a slice, every read bounded by what is
//! left, every length and count checked against a cap and against the bytes left before
//! the caller allocates for it, and every error naming the field and its byte offset.
//!
//! It reads a slice, not a stream: a format reads (or receives) a bounded chunk first,
//! then parses it here. `untrusted` (ring's reader) and `bytes::Buf` come close, but the
//! first reports only "end of input" and the second panics on short input; neither caps
//! counts or names fields.

use thiserror::Error;

/// What was wrong with the bytes. Every variant names the field being read and the
/// offset where it starts (counted from the offset the reader was given, so a format
/// can report file offsets).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReadError {
    #[error("{field} at byte {offset}: the data ends {missing} bytes short")]
    Truncated { field: &'static str, offset: u64, missing: u64 },
    #[error("{field} at byte {offset}: {count}, more than the {max} allowed")]
    OverLimit { field: &'static str, offset: u64, count: u64, max: u64 },
    #[error(
        "{field} at byte {offset}: {count} of at least {item_bytes} bytes each cannot fit in the {left} bytes left"
    )]
    DoesNotFit { field: &'static str, offset: u64, count: u64, item_bytes: u64, left: u64 },
    #[error("{field} at byte {offset} is {value}, not 0 or 1")]
    NotABool { field: &'static str, offset: u64, value: u8 },
    #[error("{extra} unexpected bytes at byte {offset}, after the last field")]
    TrailingBytes { offset: u64, extra: u64 },
}

pub type Result<T, E = ReadError> = std::result::Result<T, E>;

/// Reads fields off the front of a slice.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Offset of `bytes[0]` in whatever the caller reports offsets in.
    base: u64,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader::at_offset(bytes, 0)
    }

    /// A reader whose errors count offsets from `base` (the slice's place in a file).
    pub fn at_offset(bytes: &'a [u8], base: u64) -> Reader<'a> {
        Reader { bytes, pos: 0, base }
    }

    /// The offset of the next byte to read.
    pub fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(ReadError::Truncated { field, offset: self.offset(), missing: (n - self.remaining()) as u64 });
        }
        let bytes = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        let bytes = &self.bytes[self.pos..];
        self.pos = self.bytes.len();
        bytes
    }

    pub fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N]> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    pub fn u8(&mut self, field: &'static str) -> Result<u8> {
        Ok(self.array::<1>(field)?[0])
    }

    pub fn u16(&mut self, field: &'static str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    pub fn u32(&mut self, field: &'static str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    pub fn u64(&mut self, field: &'static str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    pub fn u128(&mut self, field: &'static str) -> Result<u128> {
        Ok(u128::from_le_bytes(self.array(field)?))
    }

    /// `N` u32s in a row (a truncation names the whole run's start).
    pub fn u32s<const N: usize>(&mut self, field: &'static str) -> Result<[u32; N]> {
        let bytes = self.take(N * 4, field)?;
        Ok(std::array::from_fn(|i| u32::from_le_bytes(bytes[i * 4..i * 4 + 4].try_into().expect("4 bytes"))))
    }

    /// `N` u64s in a row.
    pub fn u64s<const N: usize>(&mut self, field: &'static str) -> Result<[u64; N]> {
        let bytes = self.take(N * 8, field)?;
        Ok(std::array::from_fn(|i| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8 bytes"))))
    }

    /// One byte, 0 or 1.
    pub fn bool(&mut self, field: &'static str) -> Result<bool> {
        let offset = self.offset();
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(ReadError::NotABool { field, offset, value }),
        }
    }

    /// A u32 count of items of at least `min_item_bytes` each: at most `max`, and no
    /// more than the bytes left could hold, so that allocating for it is safe.
    pub fn count(&mut self, field: &'static str, max: usize, min_item_bytes: usize) -> Result<usize> {
        let offset = self.offset();
        let count = self.u32(field)?;
        self.check_count(field, offset, u64::from(count), max, min_item_bytes)
    }

    /// As [`Reader::count`], for a format that counts in u16.
    pub fn count_u16(&mut self, field: &'static str, max: usize, min_item_bytes: usize) -> Result<usize> {
        let offset = self.offset();
        let count = self.u16(field)?;
        self.check_count(field, offset, u64::from(count), max, min_item_bytes)
    }

    fn check_count(
        &self,
        field: &'static str,
        offset: u64,
        count: u64,
        max: usize,
        item_bytes: usize,
    ) -> Result<usize> {
        if count > max as u64 {
            return Err(ReadError::OverLimit { field, offset, count, max: max as u64 });
        }
        let left = self.remaining() as u64;
        if count.saturating_mul(item_bytes as u64) > left {
            return Err(ReadError::DoesNotFit { field, offset, count, item_bytes: item_bytes as u64, left });
        }
        Ok(count as usize)
    }

    /// A u32 length, at most `max`, then that many bytes.
    pub fn bytes(&mut self, field: &'static str, max: usize) -> Result<&'a [u8]> {
        let n = self.count(field, max, 1)?;
        self.take(n, field)
    }

    /// As [`Reader::bytes`], with a u16 length.
    pub fn bytes_u16(&mut self, field: &'static str, max: usize) -> Result<&'a [u8]> {
        let n = self.count_u16(field, max, 1)?;
        self.take(n, field)
    }

    /// Checks that every byte was read.
    pub fn finish(&self) -> Result<()> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(ReadError::TrailingBytes { offset: self.offset(), extra: extra as u64 }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fields_read_little_endian_in_order() {
        let bytes = [1, 2, 0, 3, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 1];
        let mut r = Reader::new(&bytes);
        assert_eq!(r.u8("a").unwrap(), 1);
        assert_eq!(r.u16("b").unwrap(), 2);
        assert_eq!(r.u32("c").unwrap(), 3);
        assert_eq!(r.u64("d").unwrap(), 4);
        assert!(r.bool("e").unwrap());
        r.finish().unwrap();
        assert_eq!(Reader::new(&[0x11; 16]).u128("f").unwrap(), 0x1111_1111_1111_1111_1111_1111_1111_1111);
        let mut r = Reader::new(&[1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(r.u32s::<2>("g").unwrap(), [1, 2]);
        assert_eq!(r.u64s::<1>("h").unwrap(), [3]);
        assert!(matches!(
            Reader::new(&[0; 15]).u64s::<2>("i"),
            Err(ReadError::Truncated { offset: 0, missing: 1, .. })
        ));
    }

    #[test]
    fn a_short_field_names_itself_its_offset_and_what_is_missing() {
        let mut r = Reader::at_offset(&[1, 2, 3], 100);
        r.u8("the tag").unwrap();
        let err = r.u32("the length").unwrap_err();
        assert_eq!(err, ReadError::Truncated { field: "the length", offset: 101, missing: 2 });
        assert_eq!(err.to_string(), "the length at byte 101: the data ends 2 bytes short");
        // A failed read consumes nothing.
        assert_eq!(r.remaining(), 2);
    }

    #[test]
    fn a_count_over_its_cap_is_refused() {
        let bytes = [0xff, 0xff, 0xff, 0xff];
        let err = Reader::at_offset(&bytes, 8).count("pages", 1024, 1).unwrap_err();
        assert_eq!(err.to_string(), "pages at byte 8: 4294967295, more than the 1024 allowed");
    }

    #[test]
    fn a_count_the_bytes_left_cannot_hold_is_refused_before_allocating() {
        let mut bytes = 3u32.to_le_bytes().to_vec();
        bytes.extend([0; 10]);
        let err = Reader::new(&bytes).count("sectors", 1000, 4).unwrap_err();
        assert_eq!(err.to_string(), "sectors at byte 0: 3 of at least 4 bytes each cannot fit in the 10 bytes left");
        assert_eq!(Reader::new(&bytes).count("sectors", 1000, 3), Ok(3));
    }

    #[test]
    fn length_prefixed_bytes_are_capped() {
        let mut bytes = 2u32.to_le_bytes().to_vec();
        bytes.extend(b"hi");
        assert_eq!(Reader::new(&bytes).bytes("name", 2).unwrap(), b"hi");
        assert!(matches!(Reader::new(&bytes).bytes("name", 1), Err(ReadError::OverLimit { count: 2, max: 1, .. })));
        let short = [5, 0, b'h'];
        assert!(matches!(Reader::new(&short).bytes_u16("reason", 64), Err(ReadError::DoesNotFit { count: 5, .. })));
    }

    #[test]
    fn a_bool_is_0_or_1() {
        let err = Reader::at_offset(&[2], 7).bool("wfi").unwrap_err();
        assert_eq!(err.to_string(), "wfi at byte 7 is 2, not 0 or 1");
    }

    #[test]
    fn bytes_left_over_are_refused_by_finish() {
        let mut r = Reader::at_offset(&[0; 5], 10);
        r.u16("x").unwrap();
        assert_eq!(r.finish().unwrap_err().to_string(), "3 unexpected bytes at byte 12, after the last field");
        assert_eq!(r.rest(), &[0, 0, 0]);
        r.finish().unwrap();
    }

    proptest! {
        #[test]
        fn reading_random_bytes_never_panics_and_never_reads_past_the_end(
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
            ops in proptest::collection::vec(0u8..8, 0..32),
        ) {
            let mut r = Reader::new(&bytes);
            for op in ops {
                let before = r.remaining();
                let _ = match op {
                    0 => r.u8("f").map(drop),
                    1 => r.u16("f").map(drop),
                    2 => r.u32("f").map(drop),
                    3 => r.u64("f").map(drop),
                    4 => r.bool("f").map(drop),
                    5 => r.count("f", 16, 2).map(drop),
                    6 => r.bytes("f", 16).map(drop),
                    _ => r.bytes_u16("f", usize::MAX).map(drop),
                };
                prop_assert!(r.remaining() <= before);
                prop_assert_eq!(r.offset() as usize + r.remaining(), bytes.len());
            }
        }
    }
}
