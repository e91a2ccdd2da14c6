//! Writing: the body with its checksums, then the header last, once the body's length
//! and checksum are known.

use super::config::BoardShape;
use super::extents::is_zero;
use super::header::encode_header;
use super::state::encode_state;
use super::{
    io_error, Result, SnapshotDisk, SnapshotError, SnapshotInfo, EXTENT_HEADER_BYTES, FORMAT_VERSION, HEADER_BYTES,
    MAX_EXTENT_UNITS, PAGE_BYTES, SECTOR_BYTES, TAG_DISK, TAG_RAM, TAG_STATE,
};
use crate::devices::virtio::blk::Blk;
use crate::machine::{Machine, RestoreError};
use std::io::{Seek, SeekFrom, Write};

/// Writes body bytes, counting them and keeping the checksums.
pub(super) struct Sink<'w, W: Write> {
    pub(super) out: &'w mut W,
    pub(super) written: u64,
    pub(super) body_crc: u32,
    pub(super) section_crc: u32,
    pub(super) section_end: u64,
}

impl<'w, W: Write> Sink<'w, W> {
    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes).map_err(io_error("writing the snapshot"))?;
        self.written += bytes.len() as u64;
        self.body_crc = crc32c::crc32c_append(self.body_crc, bytes);
        self.section_crc = crc32c::crc32c_append(self.section_crc, bytes);
        Ok(())
    }

    fn begin_section(&mut self, tag: u32, len: u64) -> Result<()> {
        self.section_crc = 0;
        self.put(&tag.to_le_bytes())?;
        self.put(&len.to_le_bytes())?;
        self.section_end = self.written + len;
        Ok(())
    }

    fn end_section(&mut self) -> Result<()> {
        assert_eq!(self.written, self.section_end, "a section's length is computed before it is written");
        let crc = self.section_crc.to_le_bytes();
        self.put(&crc)
    }
}

/// Runs of non-zero units, at most MAX_EXTENT_UNITS long: (first unit, count).
#[derive(Default)]
pub(super) struct Extents {
    pub(super) runs: Vec<(u64, u32)>,
    pub(super) units: u64,
}

impl Extents {
    fn push(&mut self, index: u64, nonzero: bool) {
        if !nonzero {
            return;
        }
        self.units += 1;
        match self.runs.last_mut() {
            Some((first, count)) if *first + u64::from(*count) == index && *count < MAX_EXTENT_UNITS => *count += 1,
            _ => self.runs.push((index, 1)),
        }
    }

    fn section_bytes(&self, unit_bytes: usize) -> u64 {
        12 + self.runs.iter().map(|&(_, count)| EXTENT_HEADER_BYTES + u64::from(count) * unit_bytes as u64).sum::<u64>()
    }
}

fn ram_extents(ram: &[u8]) -> Extents {
    let mut extents = Extents::default();
    for (index, page) in ram.chunks_exact(PAGE_BYTES).enumerate() {
        extents.push(index as u64, !is_zero(page));
    }
    extents
}

fn disk_extents(blk: &Blk) -> Result<Extents> {
    let mut extents = Extents::default();
    let mut buf = vec![0u8; MAX_EXTENT_UNITS as usize * SECTOR_BYTES];
    let total = blk.capacity_sectors();
    let mut at = 0;
    while at < total {
        let n = (total - at).min(u64::from(MAX_EXTENT_UNITS)) as usize;
        let chunk = &mut buf[..n * SECTOR_BYTES];
        blk.read_sectors(at, chunk).map_err(|e| SnapshotError::Restore(RestoreError::Disk(e)))?;
        for (i, sector) in chunk.chunks_exact(SECTOR_BYTES).enumerate() {
            extents.push(at + i as u64, !is_zero(sector));
        }
        at += n as u64;
    }
    Ok(extents)
}

pub(super) fn write_extents<W: Write>(
    sink: &mut Sink<W>,
    tag: u32,
    unit_bytes: usize,
    unit_count: u64,
    extents: &Extents,
    mut read: impl FnMut(u64, &mut [u8]) -> Result<()>,
) -> Result<()> {
    sink.begin_section(tag, extents.section_bytes(unit_bytes))?;
    sink.put(&(unit_bytes as u32).to_le_bytes())?;
    sink.put(&unit_count.to_le_bytes())?;
    let mut buf = vec![0u8; MAX_EXTENT_UNITS as usize * unit_bytes];
    for &(first, count) in &extents.runs {
        sink.put(&first.to_le_bytes())?;
        sink.put(&count.to_le_bytes())?;
        let data = &mut buf[..count as usize * unit_bytes];
        read(first, data)?;
        sink.put(data)?;
    }
    sink.end_section()
}

/// Writes a snapshot of `machine` (stopped between runs) to `out`, from its current
/// position. The header goes last, once the body's length and checksum are known.
pub fn write_snapshot<W: Write + Seek>(machine: &Machine, out: &mut W) -> Result<SnapshotInfo> {
    let state = machine.save_state();
    let shape = BoardShape::of_machine(machine, &state);
    let state_bytes = encode_state(&state)?;
    let ram = machine.ram().as_slice();
    let pages = ram_extents(ram);
    let disk = machine.disk();
    let sectors = disk.map(disk_extents).transpose()?;
    let machine_digest = machine.digest();

    let start = out.stream_position().map_err(io_error("finding the write position"))?;
    // A placeholder: until the real header is in place the file is no snapshot at all.
    out.write_all(&[0u8; HEADER_BYTES]).map_err(io_error("writing the snapshot"))?;
    let mut sink = Sink { out, written: 0, body_crc: 0, section_crc: 0, section_end: 0 };
    sink.begin_section(TAG_STATE, state_bytes.len() as u64)?;
    sink.put(&state_bytes)?;
    sink.end_section()?;
    write_extents(&mut sink, TAG_RAM, PAGE_BYTES, ram.len() as u64 / PAGE_BYTES as u64, &pages, |first, buf| {
        let at = first as usize * PAGE_BYTES;
        buf.copy_from_slice(&ram[at..at + buf.len()]);
        Ok(())
    })?;
    if let (Some(blk), Some(sectors)) = (disk, &sectors) {
        write_extents(&mut sink, TAG_DISK, SECTOR_BYTES, blk.capacity_sectors(), sectors, |first, buf| {
            blk.read_sectors(first, buf).map_err(|e| SnapshotError::Restore(RestoreError::Disk(e)))
        })?;
    }
    let (body_bytes, body_crc32c) = (sink.written, sink.body_crc);

    let info = SnapshotInfo {
        format_version: FORMAT_VERSION,
        icount: machine.icount(),
        ram_bytes: shape.ram_bytes,
        icount_per_tick: shape.icount_per_tick,
        disk: disk.map(|b| SnapshotDisk { sectors: b.capacity_sectors(), read_only: b.read_only() }),
        net_mac: shape.net_mac,
        ram_pages_saved: pages.units,
        disk_sectors_saved: sectors.as_ref().map_or(0, |s| s.units),
        config_digest: shape.digest(),
        machine_digest,
        body_bytes,
        body_crc32c,
    };
    out.seek(SeekFrom::Start(start)).map_err(io_error("seeking to the header"))?;
    out.write_all(&encode_header(&info)).map_err(io_error("writing the header"))?;
    out.seek(SeekFrom::Start(start + info.file_bytes())).map_err(io_error("seeking to the end"))?;
    out.flush().map_err(io_error("writing the snapshot"))?;
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_merge_neighbours_up_to_the_cap() {
        let mut e = Extents::default();
        for i in 0..600u64 {
            e.push(i, i != 5 && i != 6);
        }
        assert_eq!(e.runs, vec![(0, 5), (7, 256), (263, 256), (519, 81)]);
        assert_eq!(e.units, 598);
        assert_eq!(e.section_bytes(512), 12 + 4 * 12 + 598 * 512);
    }
}
