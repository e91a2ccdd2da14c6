//! Checkpoints for replication: what changed in a machine since the last one (or all
//! of it), as one payload, and applying a payload to a stopped machine.
//!
//! Layout (little-endian): a header, then records to the end of the payload, each a tag
//! byte and its body.
//!
//! | field / record | size                   | meaning                                           |
//! |----------------|------------------------|---------------------------------------------------|
//! | magic          | 4                      | `FTCK`                                            |
//! | version        | 2                      | [`VERSION`]                                       |
//! | flags          | 2                      | bit 0: full (RAM and disk are zero but for these) |
//! | 1: page        | 4 + 4096               | page index u32, the page                          |
//! | 2: sectors     | 8 + 2 + 512 × count    | first sector u64, count u16 (1..=256), the sectors|
//! | 3: state       | 4 + length             | length u32, the state encoded as in snapshots; once |
//! | 4: digest      | 16                     | the whole machine's digest after the checkpoint; at most once |
//!
//! Records come in any order, so that a pre-copy ([`PreCopy`]) lays its payload out as it
//! scans and finishes by appending, never by copying what it gathered. A page or a sector
//! may appear more than once (pre-copy): the last copy wins; the state applies last.
//!
//! A payload is decoded and checked whole before anything in the machine changes, so a
//! malformed one leaves the backup's last whole checkpoint untouched.

use crate::machine::{Machine, MachineState, RestoreError};
use crate::snapshot::{decode_machine_state, encode_machine_state, MAX_STATE_BYTES};
use bounded_reader::{ReadError, Reader};
use thiserror::Error;

const MAGIC: [u8; 4] = *b"FTCK";
/// Version 2: the state (as in snapshot format 2) carries the RTC and the clock rate;
/// version 3 (snapshot format 3) the reboot count and the kernel command line; version 4:
/// records in any order, a pre-copy's payload laid out as it scans (before, counts came
/// up front); version 5: the digest record holds the region digests' root
/// ([`crate::digest`]).
pub const VERSION: u16 = 5;
const PAGE_BYTES: usize = 4096;
const SECTOR_BYTES: usize = 512;
/// A pre-copy step's budget is counted in pages; a page's worth of disk is this many sectors.
const SECTORS_PER_PAGE: usize = PAGE_BYTES / SECTOR_BYTES;
/// Sectors read from the disk at once (scans and runs of dirty sectors), and the most a
/// sectors record holds.
const SECTORS_PER_READ: usize = 256;
const FLAG_FULL: u16 = 1;
const TAG_PAGE: u8 = 1;
const TAG_SECTORS: u8 = 2;
const TAG_STATE: u8 = 3;
const TAG_DIGEST: u8 = 4;
const HEADER_BYTES: usize = 8;
const _: () = assert!(SECTORS_PER_READ <= u16::MAX as usize);

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
    if payload.len() < HEADER_BYTES {
        return;
    }
    payload.push(TAG_DIGEST);
    payload.extend_from_slice(&machine.digest().0.to_le_bytes());
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
    let mut out = header(false, pages.len() * (5 + PAGE_BYTES) + sectors.len() * (11 + SECTOR_BYTES));
    for &index in &pages {
        push_page(&mut out, machine, index);
    }
    push_sectors(&mut out, machine, &sectors)?;
    push_state(&mut out, machine)?;
    Ok(out)
}

/// A checkpoint (not full) of exactly these pages and sectors (ascending) and the state,
/// leaving the dirty logs alone: what differs from an earlier state the caller knows by
/// other means (region digests; a recording's snapshot deltas).
pub fn take_these(machine: &Machine, pages: &[usize], sectors: &[u64]) -> Result<Vec<u8>, CheckpointError> {
    let mut out = header(false, pages.len() * (5 + PAGE_BYTES) + sectors.len() * (11 + SECTOR_BYTES));
    for &index in pages {
        push_page(&mut out, machine, index);
    }
    push_sectors(&mut out, machine, sectors)?;
    push_state(&mut out, machine)?;
    Ok(out)
}

fn header(full: bool, capacity: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + capacity);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(if full { FLAG_FULL } else { 0 }).to_le_bytes());
    out
}

fn push_page(out: &mut Vec<u8>, machine: &Machine, index: usize) {
    out.push(TAG_PAGE);
    out.extend_from_slice(&(index as u32).to_le_bytes());
    out.extend_from_slice(machine.page(index).expect("a page index from the machine"));
}

/// A sectors record: `first` and the sectors in `bytes` (1..=256 of them).
fn push_sector_run(out: &mut Vec<u8>, first: u64, bytes: &[u8]) {
    debug_assert!(!bytes.is_empty() && bytes.len() <= SECTORS_PER_READ * SECTOR_BYTES);
    out.push(TAG_SECTORS);
    out.extend_from_slice(&first.to_le_bytes());
    out.extend_from_slice(&((bytes.len() / SECTOR_BYTES) as u16).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Records for each of `sectors` (ascending), read and written in runs of consecutive ones.
fn push_sectors(out: &mut Vec<u8>, machine: &Machine, sectors: &[u64]) -> Result<(), CheckpointError> {
    let mut buf = vec![0u8; SECTORS_PER_READ * SECTOR_BYTES];
    let mut rest = sectors;
    while let Some(&first) = rest.first() {
        let run = rest.iter().take(SECTORS_PER_READ).enumerate().take_while(|&(i, &s)| s == first + i as u64).count();
        let bytes = &mut buf[..run * SECTOR_BYTES];
        machine.read_sectors(first, bytes)?;
        push_sector_run(out, first, bytes);
        rest = &rest[run..];
    }
    Ok(())
}

/// The state record: taken last, with the guest stopped.
fn push_state(out: &mut Vec<u8>, machine: &Machine) -> Result<(), CheckpointError> {
    let state = encode_machine_state(&machine.save_state())?;
    out.push(TAG_STATE);
    out.extend_from_slice(&(state.len() as u32).to_le_bytes());
    out.extend_from_slice(&state);
    Ok(())
}

/// A full checkpoint built while the guest runs (pre-copy), so that a large VM does not
/// stall: [`PreCopy::step`] copies RAM pages, then disk sectors, a chunk at a time between
/// run slices, with dirty tracking on; [`PreCopy::finish`], with the guest stopped, copies
/// again the pages and sectors written since the last checkpoint (which includes all
/// written since the copy began), plus the state. Every page or sector changed after it
/// was copied is in that final set, and the later copy wins when applied, so the result is
/// the machine exactly as it was at `finish` — and the final pause costs only what was
/// written meanwhile: the payload is laid out as the steps scan, and `finish` appends.
///
/// Starting a pre-copy does not touch the dirty logs: a pre-copy that is abandoned (the
/// backup went away, or turned out to need only an incremental checkpoint) must leave
/// the next incremental checkpoint every page and sector written since the last one.
/// (So the final pass also carries what was written between the last checkpoint and the
/// start: a caller that has not taken a checkpoint for a long time empties the logs first,
/// when it knows the next checkpoint will be full.)
pub struct PreCopy {
    next_page: usize,
    next_sector: u64,
    payload: Vec<u8>,
    /// A disk read that failed during a step: `finish` reports it.
    error: Option<RestoreError>,
}

impl PreCopy {
    /// Begin (nothing else may take the dirty logs until `finish` or abandonment).
    pub fn start(_machine: &Machine) -> PreCopy {
        PreCopy { next_page: 0, next_sector: 0, payload: header(true, 0), error: None }
    }

    /// Scan up to `max_pages` more pages, copying the non-zero ones, and with what is left
    /// of that budget (a page's worth is 8 sectors) the disk's next sectors; true when
    /// the whole of RAM and the disk has been scanned.
    pub fn step(&mut self, machine: &Machine, max_pages: usize) -> bool {
        let page_total = machine.ram().page_count();
        let end = self.next_page.saturating_add(max_pages).min(page_total);
        for index in self.next_page..end {
            if machine.page(index).is_some_and(|p| !is_zero(p)) {
                push_page(&mut self.payload, machine, index);
            }
        }
        let budget = max_pages - (end - self.next_page);
        self.next_page = end;
        if budget > 0 {
            self.step_disk(machine, budget.saturating_mul(SECTORS_PER_PAGE));
        }
        self.next_page == page_total && self.next_sector >= machine.disk_sectors().unwrap_or(0)
    }

    /// Scan up to `max_sectors` more sectors of the disk, copying the non-zero ones in runs.
    fn step_disk(&mut self, machine: &Machine, max_sectors: usize) {
        let capacity = machine.disk_sectors().unwrap_or(0);
        let mut budget = max_sectors as u64;
        let mut chunk = vec![0u8; SECTORS_PER_READ * SECTOR_BYTES];
        while self.next_sector < capacity && budget > 0 {
            // Holes read as zeros: skip them without reading (or filling the page cache).
            match machine.next_data_sector(self.next_sector) {
                None => {
                    self.next_sector = capacity;
                    break;
                }
                Some(data) => self.next_sector = data.min(capacity),
            }
            if self.next_sector == capacity {
                break;
            }
            let n = (capacity - self.next_sector).min(budget).min(SECTORS_PER_READ as u64) as usize;
            let buf = &mut chunk[..n * SECTOR_BYTES];
            if let Err(e) = machine.read_sectors(self.next_sector, buf) {
                self.error = Some(e);
                self.next_sector = capacity; // nothing more to scan: finish reports it
                return;
            }
            let mut i = 0;
            while i < n {
                let nonzero = |s: usize| !is_zero(&buf[s * SECTOR_BYTES..(s + 1) * SECTOR_BYTES]);
                if !nonzero(i) {
                    i += 1;
                    continue;
                }
                let run = (i..n).take_while(|&s| nonzero(s)).count();
                let first = self.next_sector + i as u64;
                push_sector_run(&mut self.payload, first, &buf[i * SECTOR_BYTES..(i + run) * SECTOR_BYTES]);
                i += run;
            }
            self.next_sector += n as u64;
            budget -= n as u64;
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
            push_page(&mut self.payload, machine, index);
        }
        let dirty = machine.take_dirty_sectors();
        push_sectors(&mut self.payload, machine, &dirty)?;
        push_state(&mut self.payload, machine)?;
        Ok(self.payload)
    }
}

/// Whether a page or sector holds only zero bytes (in blocks the compiler vectorizes).
fn is_zero(bytes: &[u8]) -> bool {
    bytes.chunks(64).all(|block| block.iter().fold(0u8, |acc, b| acc | b) == 0)
}

/// How many pages and sectors a payload carries (copies counted as often as they appear):
/// for statistics, without decoding the state. (0, 0) for an empty or malformed payload.
pub fn counts(payload: &[u8]) -> (usize, usize) {
    let mut r = Reader::new(payload);
    let mut walk = || -> Result<(usize, usize), ReadError> {
        r.take(HEADER_BYTES, "the header")?;
        let (mut pages, mut sectors) = (0, 0);
        while !r.is_empty() {
            match r.u8("a record tag")? {
                TAG_PAGE => {
                    r.take(4 + PAGE_BYTES, "a page")?;
                    pages += 1;
                }
                TAG_SECTORS => {
                    r.u64("a sector number")?;
                    let n = usize::from(r.u16("a sector count")?);
                    r.take(n * SECTOR_BYTES, "the sectors")?;
                    sectors += n;
                }
                TAG_STATE => {
                    r.bytes("the state", MAX_STATE_BYTES as usize)?;
                }
                TAG_DIGEST => {
                    r.take(16, "the digest")?;
                }
                _ => return Ok((0, 0)),
            }
        }
        Ok((pages, sectors))
    };
    walk().unwrap_or((0, 0))
}

/// The RAM pages and disk sectors a payload writes (a page or sector copied twice by a
/// pre-copy appears twice), without decoding the state: for a second consumer of the dirty
/// logs (the keeper's local checkpoint of a replicated primary), which must learn what a
/// checkpoint took from them. None for a malformed payload.
pub fn written(payload: &[u8]) -> Option<(Vec<usize>, Vec<u64>)> {
    let mut r = Reader::new(payload);
    type Written = Option<(Vec<usize>, Vec<u64>)>;
    let mut walk = || -> Result<Written, ReadError> {
        r.take(HEADER_BYTES, "the header")?;
        let (mut pages, mut sectors) = (Vec::new(), Vec::new());
        while !r.is_empty() {
            match r.u8("a record tag")? {
                TAG_PAGE => {
                    pages.push(r.u32("a page index")? as usize);
                    r.take(PAGE_BYTES, "a page")?;
                }
                TAG_SECTORS => {
                    let first = r.u64("a sector number")?;
                    let n = r.u16("a sector count")?;
                    r.take(usize::from(n) * SECTOR_BYTES, "the sectors")?;
                    sectors.extend((0..u64::from(n)).map(|i| first.saturating_add(i)));
                }
                TAG_STATE => {
                    r.bytes("the state", MAX_STATE_BYTES as usize)?;
                }
                TAG_DIGEST => {
                    r.take(16, "the digest")?;
                }
                _ => return Ok(None),
            }
        }
        Ok(Some((pages, sectors)))
    };
    walk().ok().flatten()
}

/// Whether a payload is a full checkpoint (applying it zeroes RAM and disk but for what it
/// carries), read from its header alone; false for a malformed one.
pub fn is_full(payload: &[u8]) -> bool {
    payload.len() >= HEADER_BYTES
        && payload[..4] == MAGIC
        && u16::from_le_bytes([payload[6], payload[7]]) & FLAG_FULL != 0
}

/// The number of pages a payload carries (see [`counts`]).
pub fn page_count(payload: &[u8]) -> usize {
    counts(payload).0
}

/// A decoded payload, not yet applied.
struct Decoded<'a> {
    full: bool,
    digest: Option<crate::Digest>,
    state: MachineState,
    pages: Vec<(usize, &'a [u8])>,
    /// Runs of sectors: the first and the bytes of all of them.
    sectors: Vec<(u64, &'a [u8])>,
}

fn malformed(detail: impl Into<String>) -> CheckpointError {
    CheckpointError::Malformed(detail.into())
}

fn decode<'a>(payload: &'a [u8], ram_pages: usize, disk_sectors: Option<u64>) -> Result<Decoded<'a>, CheckpointError> {
    let mut r = Reader::new(payload);
    if r.array::<4>("the magic")? != MAGIC {
        return Err(malformed("not a checkpoint (bad magic)"));
    }
    let version = r.u16("the version")?;
    if version != VERSION {
        return Err(CheckpointError::Version { found: version });
    }
    let flags = r.u16("the flags")?;
    if flags & !FLAG_FULL != 0 {
        return Err(malformed(format!("unknown flags {flags:#x}")));
    }
    let capacity = disk_sectors.unwrap_or(0);
    // Pre-copy may carry a page or a sector twice: once from the scan, once written since.
    let (max_pages, max_sectors) = (ram_pages.saturating_mul(2), capacity.saturating_mul(2));
    let (mut pages, mut sectors, mut sector_total) = (Vec::new(), Vec::new(), 0u64);
    let (mut state, mut digest) = (None, None);
    while !r.is_empty() {
        match r.u8("a record tag")? {
            TAG_PAGE => {
                if pages.len() >= max_pages {
                    return Err(malformed(format!("more than {max_pages} pages")));
                }
                let index = r.u32("a page index")? as usize;
                if index >= ram_pages {
                    return Err(malformed(format!("page {index} is outside RAM ({ram_pages} pages)")));
                }
                pages.push((index, r.take(PAGE_BYTES, "a page")?));
            }
            TAG_SECTORS => {
                let first = r.u64("a sector number")?;
                let n = u64::from(r.u16("a sector count")?);
                if n == 0 || n > SECTORS_PER_READ as u64 {
                    return Err(malformed(format!("a run of {n} sectors (1 to {SECTORS_PER_READ})")));
                }
                if first.checked_add(n).is_none_or(|end| end > capacity) {
                    return Err(malformed(format!(
                        "sectors {first}..{} are beyond the disk ({capacity} sectors)",
                        first.saturating_add(n)
                    )));
                }
                sector_total += n;
                if sector_total > max_sectors {
                    return Err(malformed(format!("more than {max_sectors} sectors")));
                }
                sectors.push((first, r.take(n as usize * SECTOR_BYTES, "the sectors")?));
            }
            TAG_STATE if state.is_none() => {
                state = Some(decode_machine_state(r.bytes("the state", MAX_STATE_BYTES as usize)?)?);
            }
            TAG_DIGEST if digest.is_none() => digest = Some(crate::Digest(r.u128("the digest")?)),
            TAG_STATE | TAG_DIGEST => return Err(malformed("a state or digest record appears twice")),
            tag => return Err(malformed(format!("unknown record tag {tag}"))),
        }
    }
    let state = state.ok_or_else(|| malformed("no state record"))?;
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
