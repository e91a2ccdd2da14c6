//! The region digests a digest or end record carries (`machine::digest`: the state digest
//! and one digest per MiB of RAM and of the disk), so that a replay's divergence names the
//! RAM addresses or disk bytes that differ, not only that the root does.
//!
//! A record lists the regions whose digests changed since the previous digest record, or
//! since "every region empty" for the first digest record after the header and after each
//! snapshot or delta record (where a seek starts reading): a light guest changes a few
//! regions between two digests, and 512 MiB of RAM has 512 regions.
//!
//! | field | bytes |
//! |---|---|
//! | base: 0 every region empty, 1 the previous digest record's regions | 1 |
//! | state digest | 16 |
//! | RAM regions, disk regions (the machine's shape) | 4 + 4 |
//! | listed RAM regions, then each: index u32 (ascending, below the RAM regions) · digest u128 | 4 + 20 each |
//! | listed disk regions, likewise | 4 + 20 each |

use crate::error::{JournalError, Result};
use bounded_reader::Reader;
use machine::digest::{RegionDigests, REGION_BYTES, SECTORS_PER_REGION};

/// The bytes of the region digests' fixed fields, and of one listed region.
pub const REGIONS_FIXED_BYTES: u64 = 1 + 16 + 8 + 8;
pub const REGION_ENTRY_BYTES: u64 = 4 + 16;

const BASE_EMPTY: u8 = 0;
const BASE_PREVIOUS: u8 = 1;

/// How many regions a machine with this RAM and disk has at most (the reader's cap on a
/// record's shape, from the log's header: a hostile header is capped by the frame's limit).
pub fn max_regions(ram_bytes: u64, disk_sectors: u64) -> u64 {
    ram_bytes.div_ceil(REGION_BYTES).saturating_add(disk_sectors.div_ceil(SECTORS_PER_REGION))
}

/// Appends `now`, listed against `base` (the previous digest record's regions; None or
/// another shape: against every region empty).
pub fn encode(now: &RegionDigests, base: Option<&RegionDigests>, out: &mut Vec<u8>) {
    let base = base.filter(|b| b.ram.len() == now.ram.len() && b.disk.len() == now.disk.len());
    out.push(if base.is_some() { BASE_PREVIOUS } else { BASE_EMPTY });
    out.extend_from_slice(&now.state.to_le_bytes());
    out.extend_from_slice(&(now.ram.len() as u32).to_le_bytes());
    out.extend_from_slice(&(now.disk.len() as u32).to_le_bytes());
    let lists = [(&now.ram, base.map(|b| &b.ram)), (&now.disk, base.map(|b| &b.disk))];
    for (regions, earlier) in lists {
        let changed: Vec<(usize, u128)> =
            regions.iter().copied().enumerate().filter(|&(i, d)| earlier.map_or(d != 0, |e| e[i] != d)).collect();
        out.extend_from_slice(&(changed.len() as u32).to_le_bytes());
        for (index, digest) in changed {
            out.extend_from_slice(&(index as u32).to_le_bytes());
            out.extend_from_slice(&digest.to_le_bytes());
        }
    }
}

/// Reads what [`encode`] wrote, at record offset `offset`. `base` is the previous digest
/// record's regions as this reader knows them (None after a seek to a later record: then a
/// record listed against them is read and checked but gives None). `max_regions` caps the
/// shape before anything is allocated.
pub fn decode(
    r: &mut Reader,
    base: Option<&RegionDigests>,
    max_regions: u64,
    offset: u64,
    what: &'static str,
) -> Result<Option<RegionDigests>> {
    let malformed = |source| JournalError::Malformed { offset, what, source };
    let corrupt = |problem: String| JournalError::Corrupt { offset, problem };
    let listed_against = r.u8("region digests' base").map_err(malformed)?;
    let state = r.u128("state digest").map_err(malformed)?;
    let ram_count = r.u32("RAM region count").map_err(malformed)?;
    let disk_count = r.u32("disk region count").map_err(malformed)?;
    let shape = u64::from(ram_count) + u64::from(disk_count);
    if shape > max_regions {
        let problem = format!(
            "its region digests list {ram_count} RAM and {disk_count} disk regions, more than the {max_regions} \
             the log's RAM and disk have"
        );
        return Err(corrupt(problem));
    }
    let start: Option<(Vec<u128>, Vec<u128>)> = match listed_against {
        BASE_EMPTY => Some((vec![0; ram_count as usize], vec![0; disk_count as usize])),
        BASE_PREVIOUS => match base {
            Some(b) if b.ram.len() == ram_count as usize && b.disk.len() == disk_count as usize => {
                Some((b.ram.clone(), b.disk.clone()))
            }
            Some(b) => {
                let problem = format!(
                    "its region digests are listed against the previous digest record's {} RAM and {} disk \
                     regions, but list {ram_count} and {disk_count}",
                    b.ram.len(),
                    b.disk.len()
                );
                return Err(corrupt(problem));
            }
            None => None,
        },
        other => return Err(corrupt(format!("unknown region digests' base {other}"))),
    };
    let (mut ram, mut disk) = start.unzip();
    for (part, count, mut regions) in [("RAM", ram_count, ram.as_mut()), ("disk", disk_count, disk.as_mut())] {
        let listed = r.count("listed regions", count as usize, REGION_ENTRY_BYTES as usize).map_err(malformed)?;
        let mut next = 0u64;
        for _ in 0..listed {
            let index = r.u32("region index").map_err(malformed)?;
            let digest = r.u128("region digest").map_err(malformed)?;
            if u64::from(index) < next || index >= count {
                let problem = format!("its {part} region {index} is out of order or past the {count} regions");
                return Err(corrupt(problem));
            }
            next = u64::from(index) + 1;
            if let Some(regions) = regions.as_deref_mut() {
                regions[index as usize] = digest;
            }
        }
    }
    Ok(ram.zip(disk).map(|(ram, disk)| RegionDigests { state, ram, disk }))
}

/// The most bytes a digest or end record of a log whose machine has at most `max_regions`
/// regions can hold (`fixed`: the record's other fields).
pub fn max_record_bytes(fixed: u64, max_regions: u64) -> u64 {
    fixed.saturating_add(REGIONS_FIXED_BYTES).saturating_add(max_regions.saturating_mul(REGION_ENTRY_BYTES))
}
