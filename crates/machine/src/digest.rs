//! Region digests of RAM and disk, kept up to date from the pages and sectors written
//! since the previous digest, so that a periodic digest costs about what changed (the
//! whole 512 MiB of RAM takes about 50 ms to hash; a light guest writes a few hundred
//! pages between digests).
//!
//! Shape (Merkle-style, two levels under the root):
//! - a *leaf* is 4 KiB: a RAM page, or 8 disk sectors (the disk's last leaf may be
//!   shorter). Its hash is 0 when all its bytes are zero, else XXH3-64 of the bytes (1 if
//!   that is 0);
//! - a *region* is [`REGION_BYTES`] (256 leaves; the disk's last region may be shorter).
//!   An *empty* region (all leaves 0) has digest 0; any other has the XXH3-128 of its
//!   leaf hashes (little-endian u64s, in order);
//! - the machine digest ([`RegionDigests::root`]) is the XXH3-128 of a version tag, the
//!   state digest (hart and devices), and the index and digest of every non-empty RAM
//!   region, then of every non-empty disk region.
//!
//! So the value is a pure function of the machine's state, whatever digests were taken
//! before: [`Machine::digest_from_scratch`](crate::Machine::digest_from_scratch) computes
//! it with no cache, and tests compare the two. Equal regions on two replicas have equal
//! digests, which is how lockstep locates a divergence and voting repairs a minority
//! replica region by region.

use bounded_reader::{ReadError, Reader};
use std::ops::Range;
use thiserror::Error;
use xxhash_rust::xxh3::{xxh3_128, xxh3_64, Xxh3};

/// The bytes a region covers, in RAM and on the disk.
pub const REGION_BYTES: u64 = 1 << 20;
/// The bytes a leaf covers: a page.
pub const LEAF_BYTES: usize = 4096;
/// Leaves per region.
pub const LEAVES_PER_REGION: usize = (REGION_BYTES / LEAF_BYTES as u64) as usize;
/// RAM pages per region.
pub const PAGES_PER_REGION: usize = LEAVES_PER_REGION;
/// Disk sectors per leaf and per region.
pub const SECTORS_PER_LEAF: u64 = LEAF_BYTES as u64 / SECTOR_BYTES;
pub const SECTORS_PER_REGION: u64 = REGION_BYTES / SECTOR_BYTES;
const SECTOR_BYTES: u64 = crate::devices::virtio::blk::SECTOR_SIZE_BYTES;
/// Names the definition above in every root: a later change of shape gives other values.
const ROOT_TAG: &[u8] = b"ftvm machine digest v2\0";
/// Leaves read from the disk at once when runs of them are rehashed.
const LEAVES_PER_READ: usize = 64;
/// The leaf hash of an unreadable leaf (a host disk error): never a hash of bytes.
const UNREADABLE_LEAF: u64 = u64::MAX;

const _: () = assert!(LEAF_BYTES as u64 == rv64::mem::PAGE_SIZE);
const _: () = assert!(REGION_BYTES.is_multiple_of(LEAF_BYTES as u64) && LEAVES_PER_REGION <= 1 << 16);

/// The pages of RAM region `index`.
pub fn ram_region_pages(index: usize) -> Range<usize> {
    index * PAGES_PER_REGION..(index + 1) * PAGES_PER_REGION
}

/// Where one machine's digest comes from: the state digest and every region's digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionDigests {
    /// The hart's and the devices' state (pending inputs left out: they are the future).
    pub state: u128,
    /// One per [`REGION_BYTES`] of RAM, in address order (0 for an empty region).
    pub ram: Vec<u128>,
    /// One per [`REGION_BYTES`] of the disk (the last one may be shorter); empty without
    /// a disk.
    pub disk: Vec<u128>,
}

/// Every leaf's hash (RAM pages; disk leaves of 8 sectors), for finding exactly which pages
/// and sectors differ between two states of one machine (a recording's snapshot deltas).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafHashes {
    pub ram: Vec<u64>,
    pub disk: Vec<u64>,
}

impl LeafHashes {
    /// The RAM pages and disk sectors (of a disk of `disk_sectors`) whose leaves differ
    /// from `earlier`'s, ascending. Equal hashes are taken for equal bytes (64-bit hashes:
    /// a caller that must be sure checks a digest after using the difference).
    pub fn changed_since(&self, earlier: &LeafHashes, disk_sectors: u64) -> (Vec<usize>, Vec<u64>) {
        let differ = |a: &[u64], b: &[u64]| -> Vec<usize> {
            (0..a.len().max(b.len())).filter(|&i| a.get(i) != b.get(i)).collect()
        };
        let pages = differ(&self.ram, &earlier.ram);
        let sectors = differ(&self.disk, &earlier.disk)
            .into_iter()
            .flat_map(|leaf| {
                let first = leaf as u64 * SECTORS_PER_LEAF;
                first..(first + SECTORS_PER_LEAF).min(disk_sectors)
            })
            .collect();
        (pages, sectors)
    }
}

/// A part of the machine that region digests tell apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Region {
    /// The hart's and devices' state ([`Machine::save_state`](crate::Machine::save_state)).
    State,
    /// RAM region i: pages [`ram_region_pages`]`(i)`.
    Ram(usize),
    /// Disk region i: sectors [`Machine::disk_region_sectors`](crate::Machine::disk_region_sectors)`(i)`.
    Disk(usize),
}

#[derive(Debug, Error)]
pub enum DigestError {
    #[error("malformed region digests")]
    Malformed(#[from] ReadError),
    #[error("region digests list {found} regions, at most {max} are accepted")]
    TooMany { found: u64, max: u64 },
}

impl RegionDigests {
    /// The machine digest these regions make ([`Machine::digest`](crate::Machine::digest)).
    pub fn root(&self) -> crate::Digest {
        root(self.state, &self.ram, &self.disk)
    }

    /// The regions whose digests differ from `other`'s. Where the two have different
    /// numbers of regions (machines of different shapes), every region of the larger.
    pub fn differing(&self, other: &RegionDigests) -> Vec<Region> {
        let mut out = Vec::new();
        if self.state != other.state {
            out.push(Region::State);
        }
        let mut compare = |a: &[u128], b: &[u128], region: fn(usize) -> Region| {
            if a.len() != b.len() {
                out.extend((0..a.len().max(b.len())).map(region));
                return;
            }
            out.extend(a.iter().zip(b).enumerate().filter(|(_, (x, y))| x != y).map(|(i, _)| region(i)));
        };
        compare(&self.ram, &other.ram, Region::Ram);
        compare(&self.disk, &other.disk, Region::Disk);
        out
    }

    /// For the wire: state u128, RAM region count u32, disk region count u32, then each
    /// region's digest u128 (little-endian).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24 + 16 * (self.ram.len() + self.disk.len()));
        out.extend_from_slice(&self.state.to_le_bytes());
        out.extend_from_slice(&(self.ram.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.disk.len() as u32).to_le_bytes());
        for d in self.ram.iter().chain(&self.disk) {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out
    }

    /// Read [`RegionDigests::encode`]'s bytes, accepting at most `max_regions` regions in
    /// all (checked before anything is allocated), and nothing after them.
    pub fn decode(bytes: &[u8], max_regions: usize) -> Result<RegionDigests, DigestError> {
        let mut r = Reader::new(bytes);
        let state = r.u128("the state digest")?;
        let ram_count = r.u32("the RAM region count")?;
        let disk_count = r.u32("the disk region count")?;
        let found = u64::from(ram_count) + u64::from(disk_count);
        if found > max_regions as u64 {
            return Err(DigestError::TooMany { found, max: max_regions as u64 });
        }
        if found * 16 != r.remaining() as u64 {
            // Checked before allocating: the counts must match the bytes there are.
            r.take(found.saturating_mul(16).min(usize::MAX as u64) as usize, "the region digests")?;
            r.finish()?;
        }
        let (ram_count, disk_count) = (ram_count as usize, disk_count as usize);
        let mut read = |n: usize, what| (0..n).map(|_| r.u128(what)).collect::<Result<Vec<_>, _>>();
        let ram = read(ram_count, "a RAM region digest")?;
        let disk = read(disk_count, "a disk region digest")?;
        r.finish()?;
        Ok(RegionDigests { state, ram, disk })
    }
}

pub(crate) fn root(state: u128, ram: &[u128], disk: &[u128]) -> crate::Digest {
    let mut h = Xxh3::new();
    h.update(ROOT_TAG);
    h.update(&state.to_le_bytes());
    for (tag, regions) in [(b"RAM\0", ram), (b"DISK", disk)] {
        h.update(tag);
        h.update(&(regions.len() as u64).to_le_bytes());
        for (index, digest) in regions.iter().enumerate().filter(|(_, d)| **d != 0) {
            h.update(&(index as u64).to_le_bytes());
            h.update(&digest.to_le_bytes());
        }
    }
    crate::Digest(h.digest128())
}

/// The hash of one leaf's bytes.
pub(crate) fn leaf_hash(bytes: &[u8]) -> u64 {
    if is_zero(bytes) {
        return 0;
    }
    match xxh3_64(bytes) {
        0 => 1,
        h => h,
    }
}

/// The digest of a region with these leaf hashes.
pub(crate) fn region_digest(leaves: &[u64]) -> u128 {
    if leaves.iter().all(|&l| l == 0) {
        return 0;
    }
    let mut bytes = [0u8; LEAVES_PER_REGION * 8];
    for (chunk, leaf) in bytes.chunks_exact_mut(8).zip(leaves) {
        chunk.copy_from_slice(&leaf.to_le_bytes());
    }
    match xxh3_128(&bytes[..leaves.len() * 8]) {
        0 => 1,
        d => d,
    }
}

fn is_zero(bytes: &[u8]) -> bool {
    bytes.chunks(64).all(|block| block.iter().fold(0u8, |acc, b| acc | b) == 0)
}

/// The digests of one address space (RAM or the disk) cut in regions, with each non-empty
/// region's leaf hashes kept, so that rehashing a written leaf costs the leaf and its
/// region's 2 KiB of leaf hashes.
#[derive(Debug)]
pub(crate) struct RegionTree {
    leaf_count: usize,
    /// Per region: its leaf hashes, None while every leaf is zero.
    leaves: Vec<Option<Box<[u64]>>>,
    digests: Vec<u128>,
}

impl RegionTree {
    /// A tree of `leaf_count` leaves, all zero.
    pub(crate) fn zero(leaf_count: usize) -> RegionTree {
        let regions = leaf_count.div_ceil(LEAVES_PER_REGION);
        RegionTree { leaf_count, leaves: vec![None; regions], digests: vec![0; regions] }
    }

    pub(crate) fn digests(&self) -> &[u128] {
        &self.digests
    }

    /// Every leaf's hash, in order (0 for the leaves of empty regions).
    pub(crate) fn leaf_hashes(&self) -> Vec<u64> {
        let mut out = Vec::with_capacity(self.leaf_count);
        for (region, leaves) in self.leaves.iter().enumerate() {
            match leaves {
                Some(leaves) => out.extend_from_slice(leaves),
                None => out.resize(out.len() + self.region_len(region), 0),
            }
        }
        out
    }

    /// Leaves in region `region`.
    fn region_len(&self, region: usize) -> usize {
        (self.leaf_count - region * LEAVES_PER_REGION).min(LEAVES_PER_REGION)
    }

    /// Set leaf `leaf`'s hash (its region's digest is brought up to date by `seal`).
    pub(crate) fn set_leaf(&mut self, leaf: usize, hash: u64) {
        let (region, at) = (leaf / LEAVES_PER_REGION, leaf % LEAVES_PER_REGION);
        let len = self.region_len(region);
        match &mut self.leaves[region] {
            Some(leaves) => leaves[at] = hash,
            None if hash == 0 => {}
            slot @ None => {
                let mut leaves = vec![0u64; len].into_boxed_slice();
                leaves[at] = hash;
                *slot = Some(leaves);
            }
        }
    }

    /// Recompute region `region`'s digest from its leaves (and drop them if all are zero).
    pub(crate) fn seal(&mut self, region: usize) {
        let digest = self.leaves[region].as_deref().map_or(0, region_digest);
        if digest == 0 {
            self.leaves[region] = None;
        }
        self.digests[region] = digest;
    }

    /// Rehash the leaves whose bit is set in `dirty` (a leaf bitmap) of a space of
    /// `total_bytes` (its last leaf may be short), reading each run of consecutive ones at
    /// once from `source`. Returns how many leaves were rehashed.
    pub(crate) fn update(&mut self, dirty: &[u64], total_bytes: u64, source: &mut dyn LeafSource) -> usize {
        let mut buf = Vec::new();
        let mut last_region = None;
        let mut rehashed = 0;
        let mut leaf = next_set(dirty, 0, self.leaf_count);
        while let Some(first) = leaf {
            let mut n = 1;
            while n < LEAVES_PER_READ && first + n < self.leaf_count && bit(dirty, first + n) {
                n += 1;
            }
            let start = first as u64 * LEAF_BYTES as u64;
            let len = (total_bytes - start).min((n * LEAF_BYTES) as u64) as usize;
            let bytes = source.read(start, len, &mut buf);
            for i in 0..n {
                let hash = match bytes {
                    Some(bytes) => leaf_hash(&bytes[i * LEAF_BYTES..((i + 1) * LEAF_BYTES).min(len)]),
                    None => UNREADABLE_LEAF,
                };
                let region = (first + i) / LEAVES_PER_REGION;
                if last_region.is_some_and(|r| r != region) {
                    self.seal(last_region.expect("checked"));
                }
                last_region = Some(region);
                self.set_leaf(first + i, hash);
            }
            rehashed += n;
            leaf = next_set(dirty, first + n, self.leaf_count);
        }
        if let Some(region) = last_region {
            self.seal(region);
        }
        rehashed
    }
}

/// Where leaves' bytes come from: RAM lends them, a disk reads them into `buf`.
pub(crate) trait LeafSource {
    /// `len` bytes at byte `offset`, or None if they cannot be read.
    fn read<'a>(&'a mut self, offset: u64, len: usize, buf: &'a mut Vec<u8>) -> Option<&'a [u8]>;
}

impl LeafSource for &[u8] {
    fn read<'a>(&'a mut self, offset: u64, len: usize, _buf: &'a mut Vec<u8>) -> Option<&'a [u8]> {
        self.get(offset as usize..offset as usize + len)
    }
}

fn bit(bitmap: &[u64], index: usize) -> bool {
    bitmap[index / 64] & (1 << (index % 64)) != 0
}

/// The first set bit at or after `from`, below `end`.
fn next_set(bitmap: &[u64], from: usize, end: usize) -> Option<usize> {
    let mut word = from / 64;
    let mut bits = *bitmap.get(word)? & (u64::MAX << (from % 64));
    loop {
        if bits != 0 {
            let found = word * 64 + bits.trailing_zeros() as usize;
            return (found < end).then_some(found);
        }
        word += 1;
        bits = *bitmap.get(word)?;
    }
}

/// A growable set of indices as a bitmap, sized up front.
#[derive(Debug, Clone, Default)]
pub(crate) struct Bitmap {
    words: Vec<u64>,
}

impl Bitmap {
    pub(crate) fn new(bits: usize) -> Bitmap {
        Bitmap { words: vec![0; bits.div_ceil(64)] }
    }

    pub(crate) fn set(&mut self, index: usize) {
        self.words[index / 64] |= 1 << (index % 64);
    }

    pub(crate) fn words(&self) -> &[u64] {
        &self.words
    }

    pub(crate) fn clear(&mut self) {
        self.words.fill(0);
    }

    /// The indices set, ascending; clears the set.
    pub(crate) fn drain(&mut self) -> Vec<usize> {
        let mut out = Vec::new();
        for (w, word) in self.words.iter_mut().enumerate() {
            let mut bits = std::mem::take(word);
            while bits != 0 {
                out.push(w * 64 + bits.trailing_zeros() as usize);
                bits &= bits - 1;
            }
        }
        out
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zero_leaf_hashes_to_zero_and_any_other_does_not() {
        assert_eq!(leaf_hash(&[0; LEAF_BYTES]), 0);
        let mut page = [0u8; LEAF_BYTES];
        page[LEAF_BYTES - 1] = 1;
        assert_ne!(leaf_hash(&page), 0);
        assert_eq!(region_digest(&[0; 7]), 0);
        assert_ne!(region_digest(&[0, 0, 3]), 0);
    }

    #[test]
    fn a_tree_rehashes_only_the_dirty_leaves_and_agrees_with_a_fresh_one() {
        let leaves = 3 * LEAVES_PER_REGION + 5; // a short last region
        let total = leaves as u64 * LEAF_BYTES as u64 - 1000; // and a short last leaf
        let mut space = vec![0u8; total as usize];
        let all = {
            let mut b = Bitmap::new(leaves);
            (0..leaves).for_each(|l| b.set(l));
            b
        };
        let mut tree = RegionTree::zero(leaves);
        for (i, at) in [5usize, 300_000, total as usize - 1, 2 * REGION_BYTES as usize + 77].into_iter().enumerate() {
            space[at] = i as u8 + 1;
            let mut dirty = Bitmap::new(leaves);
            dirty.set(at / LEAF_BYTES);
            assert_eq!(tree.update(dirty.words(), total, &mut &space[..]), 1);
            let mut fresh = RegionTree::zero(leaves);
            fresh.update(all.words(), total, &mut &space[..]);
            assert_eq!(tree.digests(), fresh.digests(), "after write {i}");
        }
        // Written back to zero: the regions are empty again.
        space.fill(0);
        tree.update(all.words(), total, &mut &space[..]);
        assert!(tree.digests().iter().all(|&d| d == 0));
        assert!(tree.leaves.iter().all(Option::is_none));
    }

    #[test]
    fn region_digests_tell_which_regions_differ_and_cross_the_wire_intact() {
        let a = RegionDigests { state: 1, ram: vec![0, 5, 6], disk: vec![7] };
        let mut b = a.clone();
        b.ram[2] = 9;
        b.disk[0] = 0;
        assert_eq!(a.differing(&b), vec![Region::Ram(2), Region::Disk(0)]);
        assert_ne!(a.root(), b.root());
        b.state = 2;
        b.ram.pop();
        assert_eq!(
            a.differing(&b),
            vec![Region::State, Region::Ram(0), Region::Ram(1), Region::Ram(2), Region::Disk(0)]
        );
        let bytes = a.encode();
        assert_eq!(RegionDigests::decode(&bytes, 4).unwrap(), a);
        assert!(matches!(RegionDigests::decode(&bytes, 3), Err(DigestError::TooMany { found: 4, max: 3 })));
        assert!(RegionDigests::decode(&bytes[..bytes.len() - 1], 4).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(RegionDigests::decode(&longer, 4).is_err());
    }
}
