//! Extent sections (RAM and disk): reading them into a sink that checks, fills RAM or
//! brings the disk to the snapshot's contents.

use super::read::{tag_name, Source};
use super::{malformed, Result, SnapshotError, EXTENT_HEADER_BYTES, MAX_EXTENT_UNITS, PAGE_BYTES, SECTOR_BYTES};
use crate::machine::Machine;
use std::io::Read;
use std::path::PathBuf;

/// Where the units of an extent section go.
pub(super) trait ExtentSink {
    /// Units `first..first + count` are zero.
    fn gap(&mut self, first: u64, count: u64) -> Result<()>;
    /// Units from `first` hold `data` (whole units).
    fn extent(&mut self, first: u64, data: &[u8]) -> Result<()>;
}

/// Checks the structure only.
pub(super) struct Discard;

impl ExtentSink for Discard {
    fn gap(&mut self, _: u64, _: u64) -> Result<()> {
        Ok(())
    }
    fn extent(&mut self, _: u64, _: &[u8]) -> Result<()> {
        Ok(())
    }
}

#[derive(Clone, Copy)]
pub(super) struct ExtentSpec {
    pub(super) tag: u32,
    pub(super) unit_bytes: usize,
    pub(super) unit_count: u64,
}

/// Reads an extent section into `sink`; returns how many units it held.
pub(super) fn read_extents<R: Read>(
    src: &mut Source<R>,
    spec: ExtentSpec,
    body_end: u64,
    buf: &mut Vec<u8>,
    sink: &mut impl ExtentSink,
) -> Result<u64> {
    let len = src.section_start(spec.tag, body_end)?;
    let end = src.offset + len;
    if len < 12 {
        return Err(malformed(src.offset, format!("section {} of {len} bytes", tag_name(spec.tag))));
    }
    let at = src.offset;
    let unit_bytes = src.u32("a unit size")?;
    let unit_count = src.u64("a unit count")?;
    if (unit_bytes as usize, unit_count) != (spec.unit_bytes, spec.unit_count) {
        let problem =
            format!("{unit_count} units of {unit_bytes} bytes, expected {} of {}", spec.unit_count, spec.unit_bytes);
        return Err(malformed(at, problem));
    }
    let (mut next, mut saved) = (0u64, 0u64);
    while src.offset < end {
        let at = src.offset;
        if end - at < EXTENT_HEADER_BYTES {
            return Err(malformed(at, "an extent header crosses the section's end"));
        }
        let first = src.u64("an extent's first unit")?;
        let count = src.u32("an extent's length")?;
        if count == 0 || count > MAX_EXTENT_UNITS {
            return Err(malformed(at + 8, format!("an extent of {count} units, not 1 to {MAX_EXTENT_UNITS}")));
        }
        match first.checked_add(u64::from(count)) {
            Some(end_unit) if first >= next && end_unit <= unit_count => {}
            _ => {
                return Err(malformed(
                    at,
                    format!("extent {first}..+{count} is out of order or beyond {unit_count} units"),
                ))
            }
        }
        let data_bytes = count as usize * spec.unit_bytes;
        if (end - src.offset) < data_bytes as u64 {
            return Err(malformed(at, "an extent's data crosses the section's end"));
        }
        buf.resize(data_bytes, 0);
        src.fill(buf, "an extent's data")?;
        sink.gap(next, first - next)?;
        sink.extent(first, buf)?;
        next = first + u64::from(count);
        saved += u64::from(count);
    }
    sink.gap(next, unit_count - next)?;
    src.section_end(spec.tag)?;
    Ok(saved)
}

/// Puts RAM pages into the machine being restored.
pub(super) struct RamSink<'m> {
    pub(super) machine: &'m mut Machine,
}

impl ExtentSink for RamSink<'_> {
    fn gap(&mut self, first: u64, count: u64) -> Result<()> {
        const ZERO: [u8; PAGE_BYTES] = [0; PAGE_BYTES];
        for index in first..first + count {
            let index = index as usize;
            if self.machine.page(index).is_some_and(|p| !is_zero(p)) {
                self.machine.write_page(index, &ZERO)?;
            }
        }
        Ok(())
    }

    fn extent(&mut self, first: u64, data: &[u8]) -> Result<()> {
        for (i, page) in data.chunks_exact(PAGE_BYTES).enumerate() {
            self.machine.write_page(first as usize + i, page)?;
        }
        Ok(())
    }
}

/// Makes the machine's disk hold the snapshot's contents, writing only sectors that
/// differ (none when the disk is read-only: then any difference is an error).
pub(super) struct DiskSink<'m> {
    pub(super) machine: &'m mut Machine,
    pub(super) path: PathBuf,
    pub(super) read_only: bool,
    pub(super) scratch: Vec<u8>,
}

impl DiskSink<'_> {
    /// Refuses a read-only disk that differs from `expected` (whole sectors from
    /// `first`), naming the first sector that differs.
    fn refuse(&self, first: u64, expected: impl Fn(usize, &[u8]) -> bool) -> SnapshotError {
        let differing =
            self.scratch.chunks_exact(SECTOR_BYTES).enumerate().position(|(i, sector)| !expected(i, sector));
        SnapshotError::ReadOnlyDiskDiffers { path: self.path.clone(), sector: first + differing.unwrap_or(0) as u64 }
    }
}

impl ExtentSink for DiskSink<'_> {
    fn gap(&mut self, first: u64, count: u64) -> Result<()> {
        let chunk = u64::from(MAX_EXTENT_UNITS);
        let mut at = first;
        while at < first + count {
            let n = chunk.min(first + count - at);
            self.scratch.resize(n as usize * SECTOR_BYTES, 0);
            self.machine.read_sectors(at, &mut self.scratch)?;
            if !is_zero(&self.scratch) {
                if self.read_only {
                    return Err(self.refuse(at, |_, sector| is_zero(sector)));
                }
                self.scratch.fill(0);
                self.machine.write_sectors(at, &self.scratch)?;
            }
            at += n;
        }
        Ok(())
    }

    fn extent(&mut self, first: u64, data: &[u8]) -> Result<()> {
        self.scratch.resize(data.len(), 0);
        self.machine.read_sectors(first, &mut self.scratch)?;
        if self.scratch != data {
            if self.read_only {
                return Err(self.refuse(first, |i, sector| *sector == data[i * SECTOR_BYTES..(i + 1) * SECTOR_BYTES]));
            }
            self.machine.write_sectors(first, data)?;
        }
        Ok(())
    }
}

pub(super) fn is_zero(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |acc, &b| acc | b) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::write::{write_extents, Extents, Sink};
    use crate::snapshot::TAG_DISK;
    use std::io::Cursor;

    /// Collects what an extent section holds.
    #[derive(Debug, Default)]
    struct Collect {
        gaps: Vec<(u64, u64)>,
        extents: Vec<(u64, Vec<u8>)>,
    }

    impl ExtentSink for Collect {
        fn gap(&mut self, first: u64, count: u64) -> Result<()> {
            self.gaps.push((first, count));
            Ok(())
        }
        fn extent(&mut self, first: u64, data: &[u8]) -> Result<()> {
            self.extents.push((first, data.to_vec()));
            Ok(())
        }
    }

    const SPEC: ExtentSpec = ExtentSpec { tag: TAG_DISK, unit_bytes: 512, unit_count: 16 };

    fn section(extents: &[(u64, u32)]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut sink = Sink { out: &mut out, written: 0, body_crc: 0, section_crc: 0, section_end: 0 };
        let runs = Extents { runs: extents.to_vec(), units: 0 };
        write_extents(&mut sink, SPEC.tag, 512, SPEC.unit_count, &runs, |first, buf| {
            buf.fill(first as u8 + 1);
            Ok(())
        })
        .unwrap();
        out
    }

    fn parse(bytes: &[u8]) -> Result<Collect> {
        let mut collect = Collect::default();
        let mut cursor = Cursor::new(bytes);
        let mut src = Source::new(&mut cursor, 0);
        read_extents(&mut src, SPEC, bytes.len() as u64, &mut Vec::new(), &mut collect)?;
        Ok(collect)
    }

    #[test]
    fn an_extent_section_reads_back_with_its_gaps() {
        let got = parse(&section(&[(1, 2), (5, 1), (15, 1)])).unwrap();
        assert_eq!(got.gaps, vec![(0, 1), (3, 2), (6, 9), (16, 0)]);
        assert_eq!(got.extents, vec![(1, vec![2; 1024]), (5, vec![6; 512]), (15, vec![16; 512])]);
    }

    /// Rewrites a section's checksum, so that a test reaches the structure checks.
    fn reseal_section(bytes: &mut [u8]) {
        let at = bytes.len() - 4;
        let crc = crc32c::crc32c(&bytes[..at]);
        bytes[at..].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn extents_out_of_order_overlapping_empty_or_beyond_the_end_are_refused() {
        for (extents, problem) in [
            (&[(5, 1), (3, 1)][..], "out of order"),
            (&[(3, 2), (4, 1)][..], "out of order"),
            (&[(15, 2)][..], "beyond 16 units"),
            (&[(u64::MAX, 1)][..], "beyond 16 units"),
            (&[(0, 0)][..], "an extent of 0 units"),
        ] {
            let bytes = if extents[0].1 == 0 {
                let mut b = section(&[]);
                // Splice in an empty extent by hand.
                let len_at = 4;
                let len = u64::from_le_bytes(b[len_at..len_at + 8].try_into().unwrap()) + 12;
                b[len_at..len_at + 8].copy_from_slice(&len.to_le_bytes());
                let end = b.len() - 4;
                b.splice(end..end, [0u8; 12]);
                reseal_section(&mut b);
                b
            } else if extents[0].0 == u64::MAX {
                let mut b = section(&[(0, 1)]);
                b[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
                reseal_section(&mut b);
                b
            } else {
                let mut b = section(&[(0, 1)]);
                // Build the runs ignoring order checks on the writer side.
                let runs = Extents { runs: extents.to_vec(), units: 0 };
                let mut out = Vec::new();
                let mut sink = Sink { out: &mut out, written: 0, body_crc: 0, section_crc: 0, section_end: 0 };
                write_extents(&mut sink, SPEC.tag, 512, SPEC.unit_count, &runs, |_, buf| {
                    buf.fill(1);
                    Ok(())
                })
                .unwrap();
                b.clear();
                b.extend(out);
                b
            };
            let err = parse(&bytes).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(problem), "{extents:?}: {err}");
        }
    }

    #[test]
    fn a_section_with_the_wrong_tag_unit_or_checksum_is_refused() {
        let good = section(&[(2, 1)]);
        let mut tag = good.clone();
        tag[0..4].copy_from_slice(b"RAM\0");
        assert!(parse(&tag).unwrap_err().to_string().contains("expected section \"DISK\", found tag \"RAM\""));
        let mut unit = good.clone();
        unit[12..16].copy_from_slice(&4096u32.to_le_bytes());
        reseal_section(&mut unit);
        assert!(parse(&unit).unwrap_err().to_string().contains("16 units of 4096 bytes, expected 16 of 512"));
        let mut payload = good.clone();
        payload[40] ^= 1;
        assert!(matches!(parse(&payload), Err(SnapshotError::Checksum { what: "disk section", .. })));
        let mut long = good.clone();
        long[4..12].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse(&long).unwrap_err().to_string().contains("runs past the body's end"));
    }
}
