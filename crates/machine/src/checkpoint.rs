//! Checkpoints for replication: what changed in a machine since the last one (or all
//! of it), as one payload, and applying a payload to a stopped machine.
//!
//! Layout (little-endian):
//!
//! | field          | size          | meaning                                            |
//! |----------------|---------------|----------------------------------------------------|
//! | magic          | 4             | `FTCK`                                             |
//! | version        | 2             | [`VERSION`]                                        |
//! | flags          | 2             | bit 0: full (RAM and disk are zero but for these); |
//! |                |               | bit 1: a 16-byte machine digest follows            |
//! | digest         | 0 or 16       | the whole machine's digest after the checkpoint    |
//! | state length   | 4             | then the state, encoded as in snapshots            |
//! | page count     | 4             | then (index u32, 4096 bytes) per page              |
//! | sector count   | 4             | then (sector u64, 512 bytes) per sector            |
//!
//! A payload is decoded and checked whole before anything in the machine changes, so a
//! malformed one leaves the backup's last whole checkpoint untouched. A page or a sector
//! may appear more than once (pre-copy, see [`PreCopy`]): the last copy wins.

use crate::machine::{Machine, MachineState, RestoreError};
use crate::snapshot::{decode_machine_state, encode_machine_state, MAX_STATE_BYTES};
use bounded_reader::{ReadError, Reader};
use thiserror::Error;

const MAGIC: [u8; 4] = *b"FTCK";
/// Version 2: the state (as in snapshot format 2) carries the RTC and the clock rate;
/// version 3 (snapshot format 3) the reboot count and the kernel command line.
pub const VERSION: u16 = 3;
const PAGE_BYTES: usize = 4096;
const SECTOR_BYTES: usize = 512;
/// A pre-copy step's budget is counted in pages; a page's worth of disk is this many sectors.
const SECTORS_PER_PAGE: usize = PAGE_BYTES / SECTOR_BYTES;
/// Sectors read from the disk at once (scans and runs of dirty sectors).
const SECTORS_PER_READ: usize = 256;
const FLAG_FULL: u16 = 1;
const FLAG_DIGEST: u16 = 2;

#[derive(Debug, Error)]
pub enum CheckpointError {
    #[error("malformed checkpoint: {0}")]
    Malformed(String),
    #[error("malformed checkpoint")]
    Payload(#[from] ReadError),
    #[error("checkpoint format version {found}, this ftvm reads version {VERSION}")]
    Version { found: u16 },
    #[error("checkpoint")]
    State(#[from] crate::snapshot::SnapshotError),
    #[error("the checkpoint does not fit this machine")]
    DoesNotFit(#[source] RestoreError),
    #[error("cannot apply the checkpoint")]
    Apply(#[from] RestoreError),
    #[error("after applying the checkpoint the machine's digest is {found}, the primary's was {expected}: the replicas diverged")]
    DigestMismatch { expected: crate::Digest, found: crate::Digest },
}

impl CheckpointError {
    /// True when [`apply`] refused the payload before changing anything.
    pub fn left_machine_unchanged(&self) -> bool {
        !matches!(self, CheckpointError::Apply(_) | CheckpointError::DigestMismatch { .. })
    }
}

/// Add the machine's digest to a payload just taken from it (end-to-end verification:
/// the backup recomputes it after applying). Costs a pass over RAM.
pub fn add_digest(payload: &mut Vec<u8>, machine: &Machine) {
    if payload.len() < 8 {
        return;
    }
    let flags = u16::from_le_bytes([payload[6], payload[7]]) | FLAG_DIGEST;
    payload[6..8].copy_from_slice(&flags.to_le_bytes());
    let digest = machine.digest().0.to_le_bytes();
    payload.splice(8..8, digest);
}

/// Take a checkpoint: every non-zero page and sector and the state when `full`, else
/// what was written since the last checkpoint. Resets the dirty logs either way.
pub fn take(machine: &mut Machine, full: bool) -> Result<Vec<u8>, CheckpointError> {
    if full {
        let mut precopy = PreCopy::start(machine);
        while !precopy.step(machine, usize::MAX) {}
        return precopy.finish(machine);
    }
    let pages = machine.take_dirty_pages();
    let sectors = machine.take_dirty_sectors();
    let mut entries = Vec::with_capacity(pages.len() * (4 + PAGE_BYTES));
    for &index in &pages {
        push_page(&mut entries, machine, index);
    }
    let mut sector_entries = Vec::with_capacity(sectors.len() * (8 + SECTOR_BYTES));
    push_sectors(&mut sector_entries, machine, &sectors)?;
    let sector_count = sectors.len();
    encode(machine, false, &entries, pages.len(), &sector_entries, sector_count)
}

fn push_page(entries: &mut Vec<u8>, machine: &Machine, index: usize) {
    entries.extend_from_slice(&(index as u32).to_le_bytes());
    entries.extend_from_slice(machine.page(index).expect("a page index from the machine"));
}

/// A full checkpoint built while the guest runs (pre-copy), so that a large VM does not
/// stall: [`PreCopy::step`] copies RAM pages, then disk sectors, a chunk at a time between
/// run slices, with dirty tracking on; [`PreCopy::finish`], with the guest stopped, copies
/// again the pages and sectors written since the last checkpoint (which includes all
/// written since the copy began), plus the state. Every page or sector changed after it
/// was copied is in that final set, and the later copy wins when applied, so the result is
/// the machine exactly as it was at `finish` — and the final pause costs only what was
/// written meanwhile, not a pass over RAM or the disk.
///
/// Starting a pre-copy does not touch the dirty logs: a pre-copy that is abandoned (the
/// backup went away, or turned out to need only an incremental checkpoint) must leave
/// the next incremental checkpoint every page and sector written since the last one.
/// (So the final pass also carries what was written between the last checkpoint and the
/// start: a caller that has not taken a checkpoint for a long time empties the logs first,
/// when it knows the next checkpoint will be full.)
pub struct PreCopy {
    next_page: usize,
    entries: Vec<u8>,
    count: usize,
    next_sector: u64,
    sector_entries: Vec<u8>,
    sector_count: usize,
    /// A disk read that failed during a step: `finish` reports it.
    error: Option<RestoreError>,
}

impl PreCopy {
    /// Begin (nothing else may take the dirty logs until `finish` or abandonment).
    pub fn start(_machine: &Machine) -> PreCopy {
        PreCopy {
            next_page: 0,
            entries: Vec::new(),
            count: 0,
            next_sector: 0,
            sector_entries: Vec::new(),
            sector_count: 0,
            error: None,
        }
    }

    /// Scan up to `max_pages` more pages, copying the non-zero ones, and with what is left
    /// of that budget (a page's worth is 8 sectors) the disk's next sectors; true when
    /// the whole of RAM and the disk has been scanned.
    pub fn step(&mut self, machine: &Machine, max_pages: usize) -> bool {
        let page_total = machine.ram().page_count();
        let end = self.next_page.saturating_add(max_pages).min(page_total);
        for index in self.next_page..end {
            if machine.page(index).is_some_and(|p| !is_zero(p)) {
                push_page(&mut self.entries, machine, index);
                self.count += 1;
            }
        }
        let budget = max_pages - (end - self.next_page);
        self.next_page = end;
        if budget > 0 {
            self.step_disk(machine, budget.saturating_mul(SECTORS_PER_PAGE));
        }
        self.next_page == page_total && self.next_sector >= machine.disk_sectors().unwrap_or(0)
    }

    /// Scan up to `max_sectors` more sectors of the disk, copying the non-zero ones.
    fn step_disk(&mut self, machine: &Machine, max_sectors: usize) {
        let capacity = machine.disk_sectors().unwrap_or(0);
        let mut budget = max_sectors as u64;
        let mut chunk = vec![0u8; SECTORS_PER_READ * SECTOR_BYTES];
        while self.next_sector < capacity && budget > 0 {
            let n = (capacity - self.next_sector).min(budget).min(SECTORS_PER_READ as u64);
            let buf = &mut chunk[..n as usize * SECTOR_BYTES];
            if let Err(e) = machine.read_sectors(self.next_sector, buf) {
                self.error = Some(e);
                self.next_sector = capacity; // nothing more to scan: finish reports it
                return;
            }
            for (i, sector) in buf.chunks(SECTOR_BYTES).enumerate() {
                if !is_zero(sector) {
                    self.sector_entries.extend_from_slice(&(self.next_sector + i as u64).to_le_bytes());
                    self.sector_entries.extend_from_slice(sector);
                    self.sector_count += 1;
                }
            }
            self.next_sector += n;
            budget -= n;
        }
    }

    /// Complete the checkpoint (the guest must be stopped: between two run slices). What
    /// the steps have not scanned yet is scanned now.
    pub fn finish(mut self, machine: &mut Machine) -> Result<Vec<u8>, CheckpointError> {
        while !self.step(machine, usize::MAX) {}
        if let Some(e) = self.error.take() {
            return Err(e.into());
        }
        for index in machine.take_dirty_pages() {
            push_page(&mut self.entries, machine, index);
            self.count += 1;
        }
        let dirty = machine.take_dirty_sectors();
        push_sectors(&mut self.sector_entries, machine, &dirty)?;
        let sector_count = self.sector_count + dirty.len();
        encode(machine, true, &self.entries, self.count, &self.sector_entries, sector_count)
    }
}

/// Whether a page or sector holds only zero bytes (in blocks the compiler vectorizes).
fn is_zero(bytes: &[u8]) -> bool {
    bytes.chunks(64).all(|block| block.iter().fold(0u8, |acc, b| acc | b) == 0)
}

/// Append (sector u64, 512 bytes) for each of `sectors` (ascending), reading runs of
/// consecutive sectors at once.
fn push_sectors(entries: &mut Vec<u8>, machine: &Machine, sectors: &[u64]) -> Result<(), CheckpointError> {
    let mut buf = vec![0u8; SECTORS_PER_READ * SECTOR_BYTES];
    let mut rest = sectors;
    while let Some(&first) = rest.first() {
        let run = rest.iter().take(SECTORS_PER_READ).enumerate().take_while(|&(i, &s)| s == first + i as u64).count();
        let bytes = &mut buf[..run * SECTOR_BYTES];
        machine.read_sectors(first, bytes)?;
        for (i, sector) in bytes.chunks(SECTOR_BYTES).enumerate() {
            entries.extend_from_slice(&(first + i as u64).to_le_bytes());
            entries.extend_from_slice(sector);
        }
        rest = &rest[run..];
    }
    Ok(())
}

/// Lay out a payload: header, state, page entries and sector entries (already encoded).
fn encode(
    machine: &mut Machine,
    full: bool,
    page_entries: &[u8],
    page_count: usize,
    sector_entries: &[u8],
    sector_count: usize,
) -> Result<Vec<u8>, CheckpointError> {
    let state = encode_machine_state(&machine.save_state())?;
    let mut out = Vec::with_capacity(20 + state.len() + page_entries.len() + sector_entries.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(if full { FLAG_FULL } else { 0 }).to_le_bytes());
    out.extend_from_slice(&(state.len() as u32).to_le_bytes());
    out.extend_from_slice(&state);
    out.extend_from_slice(&(page_count as u32).to_le_bytes());
    out.extend_from_slice(page_entries);
    out.extend_from_slice(&(sector_count as u32).to_le_bytes());
    out.extend_from_slice(sector_entries);
    Ok(out)
}

/// The number of pages a payload carries (0 for an empty or malformed one): for
/// statistics, without decoding the rest.
pub fn page_count(payload: &[u8]) -> usize {
    let mut r = Reader::new(payload);
    let header = (|| {
        r.take(6, "the magic and version")?;
        if r.u16("the flags")? & FLAG_DIGEST != 0 {
            r.take(16, "the digest")?;
        }
        r.bytes("the state", MAX_STATE_BYTES as usize)?;
        r.u32("the page count")
    })();
    header.map_or(0, |n| n as usize)
}

/// A decoded payload, not yet applied.
struct Decoded<'a> {
    full: bool,
    digest: Option<crate::Digest>,
    state: MachineState,
    pages: Vec<(usize, &'a [u8])>,
    sectors: Vec<(u64, &'a [u8])>,
}

fn decode<'a>(payload: &'a [u8], ram_pages: usize, disk_sectors: Option<u64>) -> Result<Decoded<'a>, CheckpointError> {
    let mut r = Reader::new(payload);
    if r.array::<4>("the magic")? != MAGIC {
        return Err(CheckpointError::Malformed("not a checkpoint (bad magic)".into()));
    }
    let version = r.u16("the version")?;
    if version != VERSION {
        return Err(CheckpointError::Version { found: version });
    }
    let flags = r.u16("the flags")?;
    if flags & !(FLAG_FULL | FLAG_DIGEST) != 0 {
        return Err(CheckpointError::Malformed(format!("unknown flags {flags:#x}")));
    }
    let digest = match flags & FLAG_DIGEST {
        0 => None,
        _ => Some(crate::Digest(r.u128("the digest")?)),
    };
    let state = decode_machine_state(r.bytes("the state", MAX_STATE_BYTES as usize)?)?;
    // Pre-copy may carry a page twice: once from the scan, once written since.
    let n = r.count("pages", ram_pages.saturating_mul(2), 4 + PAGE_BYTES)?;
    let mut pages = Vec::with_capacity(n);
    for _ in 0..n {
        let index = r.u32("a page index")? as usize;
        if index >= ram_pages {
            return Err(CheckpointError::Malformed(format!("page {index} is outside RAM ({ram_pages} pages)")));
        }
        pages.push((index, r.take(PAGE_BYTES, "a page")?));
    }
    let capacity = disk_sectors.unwrap_or(0);
    // Likewise a sector: once from the disk's scan, once written since.
    let n = r.count("sectors", (capacity.min(usize::MAX as u64) as usize).saturating_mul(2), 8 + SECTOR_BYTES)?;
    let mut sectors = Vec::with_capacity(n);
    for _ in 0..n {
        let sector = r.u64("a sector number")?;
        if sector >= capacity {
            return Err(CheckpointError::Malformed(format!("sector {sector} is beyond the disk ({capacity} sectors)")));
        }
        sectors.push((sector, r.take(SECTOR_BYTES, "a sector")?));
    }
    r.finish()?;
    Ok(Decoded { full: flags & FLAG_FULL != 0, digest, state, pages, sectors })
}

/// Apply a payload to a stopped machine built from the same configuration.
///
/// Everything that can be checked is checked before anything changes: the payload's
/// structure, every page and sector number, and the state against each of this
/// machine's components ([`Machine::check_state`]). So a malformed payload, or one
/// from a machine of another shape, leaves the machine as it was. Two errors come
/// later, with the machine changed ([`CheckpointError::left_machine_unchanged`] tells
/// them apart): the host failing a disk write midway, and a digest that disagrees
/// after applying (the replicas diverged). Either way the machine no longer holds a
/// whole checkpoint: only a full checkpoint repairs it.
pub fn apply(machine: &mut Machine, payload: &[u8]) -> Result<(), CheckpointError> {
    let decoded = decode(payload, machine.ram().page_count(), machine.disk_sectors())?;
    machine.check_state(&decoded.state).map_err(CheckpointError::DoesNotFit)?;
    if decoded.full {
        machine.clear_ram();
        machine.clear_disk()?;
    }
    for (index, bytes) in decoded.pages {
        machine.write_page(index, bytes)?;
    }
    for (sector, bytes) in decoded.sectors {
        machine.write_sectors(sector, bytes)?;
    }
    machine.restore_state(decoded.state)?;
    // The backup's own writes are not changes to send anywhere.
    machine.take_dirty_pages();
    machine.take_dirty_sectors();
    if let Some(expected) = decoded.digest {
        let found = machine.digest();
        if found != expected {
            return Err(CheckpointError::DigestMismatch { expected, found });
        }
    }
    Ok(())
}
