//! Restoring: the configuration checked, the whole body checked in a first pass, then
//! the machine built and the file read again for RAM and the disk.

use super::config::BoardShape;
use super::extents::{read_extents, Discard, DiskSink, ExtentSpec, RamSink};
use super::read::{read_header_from, Source};
use super::state::decode_state;
use super::{
    hex, io_error, mac_text, malformed, Result, SnapshotDisk, SnapshotError, SnapshotInfo, HEADER_BYTES,
    MAX_STATE_BYTES, PAGE_BYTES, SECTOR_BYTES, TAG_DISK, TAG_RAM, TAG_STATE,
};
use crate::devices::virtio::blk::SECTOR_SIZE_BYTES;
use crate::machine::{Machine, MachineConfig, MachineState};
use bounded_reader::Reader;
use std::io::{Read, Seek, SeekFrom};

fn check_config(info: &SnapshotInfo, config: &MachineConfig) -> Result<()> {
    let (saved, wanted) = (info.shape(), BoardShape::of_config(config));
    let mismatch =
        |what, snapshot: String, configured: String| Err(SnapshotError::ConfigMismatch { what, snapshot, configured });
    let bytes = |b: u64| format!("{b} bytes ({} MiB)", b >> 20);
    if saved.ram_bytes != wanted.ram_bytes {
        return mismatch("RAM size", bytes(saved.ram_bytes), bytes(wanted.ram_bytes));
    }
    if saved.icount_per_tick != wanted.icount_per_tick {
        let rate = |n: u64| format!("{n} instructions per timer tick");
        return mismatch("timer rate", rate(saved.icount_per_tick), rate(wanted.icount_per_tick));
    }
    let disk = |d: Option<bool>| match d {
        None => "no disk".to_string(),
        Some(false) => "a writable disk".to_string(),
        Some(true) => "a read-only disk".to_string(),
    };
    if saved.disk_read_only != wanted.disk_read_only {
        return mismatch("disk", disk(saved.disk_read_only), disk(wanted.disk_read_only));
    }
    let net = |m: Option<[u8; 6]>| {
        m.map_or("no network card".to_string(), |mac| format!("a network card with MAC {}", mac_text(&mac)))
    };
    if saved.net_mac != wanted.net_mac {
        return mismatch("network card", net(saved.net_mac), net(wanted.net_mac));
    }
    let wanted_digest = wanted.digest();
    if info.config_digest != wanted_digest {
        return mismatch("configuration digest", hex(&info.config_digest), hex(&wanted_digest));
    }
    Ok(())
}

/// What checking the whole body found out.
struct CheckedBody {
    state: MachineState,
    /// Offset of the RAM section, where applying starts.
    ram_section_at: u64,
}

fn ram_spec(info: &SnapshotInfo) -> ExtentSpec {
    ExtentSpec { tag: TAG_RAM, unit_bytes: PAGE_BYTES, unit_count: info.ram_bytes / PAGE_BYTES as u64 }
}

fn disk_spec(disk: SnapshotDisk) -> ExtentSpec {
    ExtentSpec { tag: TAG_DISK, unit_bytes: SECTOR_BYTES, unit_count: disk.sectors }
}

/// The first pass: reads and checks the whole body, changing nothing anywhere.
fn check_body<R: Read>(src: &mut Source<R>, info: &SnapshotInfo) -> Result<CheckedBody> {
    let body_end =
        src.offset.checked_add(info.body_bytes).ok_or_else(|| malformed(16, "the body's length overflows"))?;
    src.body_crc = 0;

    let len = src.section_start(TAG_STATE, body_end)?;
    if len > MAX_STATE_BYTES {
        return Err(malformed(src.offset - 8, format!("a state section of {len} bytes, at most {MAX_STATE_BYTES}")));
    }
    let state_at = src.offset;
    let state_bytes = src.vec(len, "the state section")?;
    src.section_end(TAG_STATE)?;
    let state = decode_state(&mut Reader::at_offset(&state_bytes, state_at))?;
    drop(state_bytes);
    if state.hart.icount != info.icount {
        return Err(malformed(
            state_at,
            format!("the hart is at icount {}, the header says {}", state.hart.icount, info.icount),
        ));
    }

    let mut buf = Vec::new();
    let ram_section_at = src.offset;
    let saved = read_extents(src, ram_spec(info), body_end, &mut buf, &mut Discard)?;
    if saved != info.ram_pages_saved {
        return Err(malformed(
            ram_section_at,
            format!("{saved} pages saved, the header says {}", info.ram_pages_saved),
        ));
    }
    if let Some(disk) = info.disk {
        let at = src.offset;
        let saved = read_extents(src, disk_spec(disk), body_end, &mut buf, &mut Discard)?;
        if saved != info.disk_sectors_saved {
            return Err(malformed(
                at,
                format!("{saved} disk sectors saved, the header says {}", info.disk_sectors_saved),
            ));
        }
    }
    if src.offset != body_end {
        return Err(malformed(src.offset, format!("{} bytes after the last section", body_end - src.offset)));
    }
    if src.body_crc != info.body_crc32c {
        return Err(SnapshotError::Checksum {
            what: "body",
            offset: 24,
            stored: info.body_crc32c,
            computed: src.body_crc,
        });
    }
    let mut probe = [0u8; 1];
    if src.inner.read(&mut probe).map_err(io_error("reading the snapshot"))? != 0 {
        return Err(malformed(body_end, "bytes after the body's end"));
    }
    Ok(CheckedBody { state, ram_section_at })
}

/// The second pass, over a body already checked: RAM into the machine, then the
/// snapshot's contents into its disk.
fn apply_body<R: Read>(src: &mut Source<R>, info: &SnapshotInfo, machine: &mut Machine) -> Result<()> {
    let body_end = HEADER_BYTES as u64 + info.body_bytes;
    let mut buf = Vec::new();
    read_extents(src, ram_spec(info), body_end, &mut buf, &mut RamSink { machine })?;
    if let Some(disk) = info.disk {
        let path = machine.disk().map(|b| b.path().to_path_buf()).unwrap_or_default();
        let mut sink = DiskSink { machine, path, read_only: disk.read_only, scratch: Vec::new() };
        read_extents(src, disk_spec(disk), body_end, &mut buf, &mut sink)?;
    }
    Ok(())
}

fn check_disk_size(info: &SnapshotInfo, machine: &Machine) -> Result<()> {
    if let (Some(saved), Some(blk)) = (info.disk, machine.disk()) {
        if saved.sectors != blk.capacity_sectors() {
            let sectors = |n: u64| format!("{n} sectors ({} bytes)", n * SECTOR_SIZE_BYTES);
            let configured = format!("{} in {}", sectors(blk.capacity_sectors()), blk.path().display());
            return Err(SnapshotError::ConfigMismatch {
                what: "disk size",
                snapshot: sectors(saved.sectors),
                configured,
            });
        }
    }
    Ok(())
}

/// Rebuilds a machine from a snapshot. Reads and checks the whole snapshot first; then
/// builds the machine from `config` (which must have the snapshot's RAM size, timer
/// rate and devices), puts in the state, reads the file again for RAM and writes the
/// snapshot's disk contents into the disk image `config` names.
pub fn read_snapshot<R: Read + Seek>(input: &mut R, config: &MachineConfig) -> Result<Machine> {
    let base = input.stream_position().map_err(io_error("finding the snapshot's start"))?;
    let mut src = Source::new(input, 0);
    let info = read_header_from(&mut src)?;
    check_config(&info, config)?;
    let checked = check_body(&mut src, &info)?;

    let mut machine = Machine::new(config)?;
    check_disk_size(&info, &machine)?;
    machine.restore_state(checked.state)?;
    input.seek(SeekFrom::Start(base + checked.ram_section_at)).map_err(io_error("seeking to the RAM section"))?;
    let mut src = Source::new(input, checked.ram_section_at);
    match apply_body(&mut src, &info, &mut machine) {
        Ok(()) => {}
        Err(e @ (SnapshotError::ReadOnlyDiskDiffers { .. } | SnapshotError::Restore(_) | SnapshotError::Io { .. })) => {
            return Err(e)
        }
        // What was checked a moment ago no longer reads the same.
        Err(_) => {
            return Err(SnapshotError::ChangedWhileReading {
                path: config.disk.as_ref().map(|d| d.path.clone()).unwrap_or_default(),
            })
        }
    }
    machine.take_dirty_pages();
    machine.take_dirty_sectors();
    let restored = machine.digest();
    if restored != info.machine_digest {
        return Err(SnapshotError::DigestMismatch { saved: info.machine_digest, restored });
    }
    Ok(machine)
}
