//! Guest RAM with 4 KiB dirty-page tracking.
//!
//! Every write — by the hart or by a device doing DMA — goes through this type and
//! marks its page dirty, so the layer above can take exactly the pages written since
//! its last take (the basis of incremental checkpoints).
//!
//! The same door keeps the hart's decoded-code cache honest: a page the hart has
//! decoded instructions from is watched, and any write to it (a hart store, a page-
//! table A/D update, DMA, a restored page) moves that page's code generation, which
//! the cached blocks compare before they run.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

pub const PAGE_SIZE: u64 = 4096;
pub const PAGE_SHIFT: u32 = 12;

/// Source of [`GuestRam::id`]: every instance (new or cloned) gets its own.
static NEXT_RAM_ID: AtomicU64 = AtomicU64::new(1);

/// See [`GuestRam::jit_view`].
pub(crate) struct RamView {
    pub(crate) bytes: *mut u8,
    pub(crate) direct_store: *const u8,
    pub(crate) code_gen: *const u64,
}

/// Memory that guest RAM can live in instead of an allocation of its own: a mapping the
/// caller made ([`GuestRam::over`]; a resilient monitor maps its recovery region's RAM
/// image copy-on-write, so that taking a VM over copies no RAM: docs/microreboot.md).
///
/// # Safety
/// `as_mut_ptr` returns the same pointer every time, to `len` bytes (a multiple of the
/// page size) that are readable and writable, stay valid and in place while the value
/// lives, and that nothing else in this process reads or writes meanwhile.
pub unsafe trait RamMapping: Send {
    fn as_mut_ptr(&mut self) -> *mut u8;
    fn len(&self) -> usize;
}

/// RAM's bytes: an allocation of its own, or a caller's mapping. A pointer and a length
/// (not an enum to match on), so that every access is a plain slice access.
struct Bytes {
    ptr: NonNull<u8>,
    len: usize,
    _owner: Owner,
}

enum Owner {
    Vec(#[allow(dead_code)] Vec<u8>),
    Mapping(#[allow(dead_code)] Box<dyn RamMapping>),
}

// SAFETY: Bytes owns what `ptr` points at (a Vec's buffer, or a mapping whose contract
// says nothing else touches it), like a Vec<u8>: moving it between threads moves the
// owner, and `&Bytes` only ever reads.
unsafe impl Send for Bytes {}
// SAFETY: as above: shared references only read.
unsafe impl Sync for Bytes {}

impl Bytes {
    fn owned(mut bytes: Vec<u8>) -> Bytes {
        let (ptr, len) = (NonNull::new(bytes.as_mut_ptr()).expect("a Vec's buffer is never null"), bytes.len());
        Bytes { ptr, len, _owner: Owner::Vec(bytes) } // moving the Vec leaves its buffer in place
    }

    fn mapped(mut mapping: Box<dyn RamMapping>) -> Bytes {
        let (ptr, len) = (NonNull::new(mapping.as_mut_ptr()).expect("a mapping is never null"), mapping.len());
        Bytes { ptr, len, _owner: Owner::Mapping(mapping) }
    }
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    #[inline(always)]
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points at `len` valid bytes owned by `_owner` (a Vec's buffer, or a
        // mapping by its contract) for as long as self lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for Bytes {
    #[inline(always)]
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref; &mut self makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

/// Guest RAM: one contiguous region starting at `base`, allocated up front (or a mapping
/// the caller made, [`GuestRam::over`]).
pub struct GuestRam {
    base: u64,
    bytes: Bytes,
    dirty: Vec<u64>,
    /// Pages the hart has decoded code from since their last write (one bit each).
    code_watch: Vec<u64>,
    /// Per page: moves whenever a watched page is written.
    code_gen: Vec<u64>,
    /// Per page: 1 when a store may go straight in (the page is dirty already and holds
    /// no decoded code), so compiled code need not mark it; 0 sends it to the slow path.
    direct_store: Vec<u8>,
    /// Unique per instance, so that a hart can tell that its caches belong to other RAM.
    id: u64,
}

/// `len` zero bytes, or None when the allocator refuses them. `vec![0; len]` aborts the
/// process instead; this asks for zeroed memory the same way (calloc: the pages stay the
/// kernel's zero page until written) but hears the refusal.
fn zeroed_bytes(len: usize) -> Option<Vec<u8>> {
    if len == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<u8>(len).ok()?;
    // SAFETY: the layout is non-zero in size; a non-null pointer is `len` zeroed bytes from the
    // global allocator with the layout Vec<u8> of capacity `len` frees with.
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout);
        (!ptr.is_null()).then(|| Vec::from_raw_parts(ptr, len, len))
    }
}

impl Clone for GuestRam {
    fn clone(&self) -> Self {
        GuestRam {
            base: self.base,
            bytes: Bytes::owned(self.bytes.to_vec()),
            dirty: self.dirty.clone(),
            code_watch: self.code_watch.clone(),
            code_gen: self.code_gen.clone(),
            direct_store: self.direct_store.clone(),
            id: NEXT_RAM_ID.fetch_add(1, Ordering::Relaxed),
        }
    }
}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GuestRam {{ base: {:#x}, size: {:#x} }}", self.base, self.bytes.len())
    }
}

impl GuestRam {
    /// RAM of `size_bytes` (a multiple of the page size) at physical `base`.
    ///
    /// Panics if the host cannot give that much memory: see [`GuestRam::try_new`].
    pub fn new(base: u64, size_bytes: u64) -> Self {
        Self::try_new(base, size_bytes).expect("the host gives the guest's RAM")
    }

    /// As [`GuestRam::new`], but None when the host cannot give `size_bytes` of memory, so that
    /// a user asking for more RAM than the host has gets an error, not an abort.
    pub fn try_new(base: u64, size_bytes: u64) -> Option<Self> {
        assert!(size_bytes.is_multiple_of(PAGE_SIZE), "RAM size must be page aligned");
        let bytes = zeroed_bytes(usize::try_from(size_bytes).ok()?)?;
        Some(GuestRam::with_bytes(base, Bytes::owned(bytes)))
    }

    /// RAM at physical `base` in `mapping` (its length a multiple of the page size), holding
    /// what the mapping holds; no page is dirty.
    pub fn over(base: u64, mapping: Box<dyn RamMapping>) -> Self {
        assert!((mapping.len() as u64).is_multiple_of(PAGE_SIZE), "RAM size must be page aligned");
        GuestRam::with_bytes(base, Bytes::mapped(mapping))
    }

    fn with_bytes(base: u64, bytes: Bytes) -> Self {
        assert!(base.is_multiple_of(PAGE_SIZE), "RAM base must be page aligned");
        let pages = bytes.len() / PAGE_SIZE as usize;
        GuestRam {
            base,
            bytes,
            dirty: vec![0; pages.div_ceil(64)],
            code_watch: vec![0; pages.div_ceil(64)],
            code_gen: vec![0; pages],
            direct_store: vec![0; pages],
            id: NEXT_RAM_ID.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Identifies this instance among all `GuestRam`s of the process (a clone gets a
    /// new one).
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn base(&self) -> u64 {
        self.base
    }

    pub fn size(&self) -> u64 {
        self.bytes.len() as u64
    }

    pub fn page_count(&self) -> usize {
        self.bytes.len() / PAGE_SIZE as usize
    }

    /// Offset of `[paddr, paddr+len)` in RAM when it lies wholly inside RAM.
    #[inline]
    pub fn offset_of(&self, paddr: u64, len: u64) -> Option<usize> {
        let off = paddr.wrapping_sub(self.base);
        (off < self.bytes.len() as u64 && len <= self.bytes.len() as u64 - off).then_some(off as usize)
    }

    #[inline]
    pub fn contains(&self, paddr: u64) -> bool {
        paddr.wrapping_sub(self.base) < self.bytes.len() as u64
    }

    /// Page `page` was written: mark it dirty, and move its code generation if the
    /// hart has code decoded from it (then say so).
    #[inline(always)]
    fn mark_page_written(&mut self, page: usize) -> bool {
        let (word, bit) = (page >> 6, 1u64 << (page & 63));
        self.dirty[word] |= bit;
        let watched = self.code_watch[word] & bit != 0;
        if watched {
            self.code_page_written(page);
        }
        self.direct_store[page] = 1;
        watched
    }

    #[cold]
    fn code_page_written(&mut self, page: usize) {
        self.code_watch[page >> 6] &= !(1u64 << (page & 63));
        self.code_gen[page] += 1;
    }

    /// Start watching page `page` (relative to `base`) for writes because code is
    /// being decoded from it; returns its current code generation.
    #[inline]
    pub(crate) fn watch_code_page(&mut self, page: usize) -> u64 {
        self.code_watch[page >> 6] |= 1u64 << (page & 63);
        self.direct_store[page] = 0;
        self.code_gen[page]
    }

    /// The code generation of page `page`: it moves on every write to the page made
    /// while the page was watched.
    #[inline]
    pub(crate) fn code_gen(&self, page: usize) -> u64 {
        self.code_gen[page]
    }

    /// Raw views for compiled code, which reads and writes RAM and marks pages inline
    /// (see `crate::jit`). Valid while this RAM lives: nothing here ever reallocates.
    pub(crate) fn jit_view(&mut self) -> RamView {
        RamView {
            bytes: self.bytes.as_mut_ptr(),
            direct_store: self.direct_store.as_ptr(),
            code_gen: self.code_gen.as_ptr(),
        }
    }

    /// Read-only view of all of RAM (for digests and snapshots).
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes
    }

    /// Load `N` bytes at a RAM offset known to be in range.
    #[inline]
    pub(crate) fn read_at<const N: usize>(&self, off: usize) -> [u8; N] {
        self.bytes[off..off + N].try_into().expect("length is N")
    }

    /// Store `N` bytes at a RAM offset known to be in range; true when the page held
    /// decoded code (its code generation moved).
    #[inline(always)]
    pub(crate) fn write_at<const N: usize>(&mut self, off: usize, v: [u8; N]) -> bool {
        self.bytes[off..off + N].copy_from_slice(&v);
        self.mark_page_written(off >> PAGE_SHIFT)
    }

    /// Copy out `buf.len()` bytes at physical `paddr` (device DMA, loaders).
    pub fn read(&self, paddr: u64, buf: &mut [u8]) -> Option<()> {
        let off = self.offset_of(paddr, buf.len() as u64)?;
        buf.copy_from_slice(&self.bytes[off..off + buf.len()]);
        Some(())
    }

    /// Copy `data` into RAM at physical `paddr`, marking every touched page dirty.
    pub fn write(&mut self, paddr: u64, data: &[u8]) -> Option<()> {
        let off = self.offset_of(paddr, data.len() as u64)?;
        self.bytes[off..off + data.len()].copy_from_slice(data);
        if !data.is_empty() {
            let first = off >> PAGE_SHIFT;
            let last = (off + data.len() - 1) >> PAGE_SHIFT;
            for page in first..=last {
                self.mark_page_written(page);
            }
        }
        Some(())
    }

    pub fn read_u32(&self, paddr: u64) -> Option<u32> {
        let mut b = [0; 4];
        self.read(paddr, &mut b)?;
        Some(u32::from_le_bytes(b))
    }

    pub fn read_u64(&self, paddr: u64) -> Option<u64> {
        let mut b = [0; 8];
        self.read(paddr, &mut b)?;
        Some(u64::from_le_bytes(b))
    }

    pub fn write_u64(&mut self, paddr: u64, v: u64) -> Option<()> {
        self.write(paddr, &v.to_le_bytes())
    }

    /// Page indices (relative to `base`) written since the last call; clears the set.
    pub fn take_dirty_pages(&mut self) -> Vec<usize> {
        let mut pages = Vec::new();
        for (word_index, word) in self.dirty.iter_mut().enumerate() {
            let mut bits = std::mem::take(word);
            while bits != 0 {
                let bit = bits.trailing_zeros() as usize;
                let page = word_index * 64 + bit;
                pages.push(page);
                self.direct_store[page] = 0;
                bits &= bits - 1;
            }
        }
        pages
    }

    /// The dirty-page bitmap as it is (bit `p % 64` of word `p / 64`: page `p` written
    /// since the last take), read without taking it: a second consumer (incremental
    /// digests) looks at what the first has not taken yet.
    pub fn dirty_bitmap(&self) -> &[u64] {
        &self.dirty
    }

    /// The bytes of page `index` (relative to `base`).
    pub fn page(&self, index: usize) -> Option<&[u8]> {
        let start = index.checked_mul(PAGE_SIZE as usize)?;
        self.bytes.get(start..start + PAGE_SIZE as usize)
    }

    /// Overwrite page `index` (the backup's side of a checkpoint). Marks it dirty.
    pub fn write_page(&mut self, index: usize, data: &[u8]) -> Option<()> {
        if data.len() != PAGE_SIZE as usize {
            return None;
        }
        let start = index.checked_mul(PAGE_SIZE as usize)?;
        self.bytes.get_mut(start..start + PAGE_SIZE as usize)?.copy_from_slice(data);
        self.mark_page_written(index);
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A caller's memory (here a Vec of the test's) as RAM.
    struct Outside(Vec<u8>);
    // SAFETY: the Vec's buffer, fixed while the value lives, touched by nothing else.
    unsafe impl RamMapping for Outside {
        fn as_mut_ptr(&mut self) -> *mut u8 {
            self.0.as_mut_ptr()
        }
        fn len(&self) -> usize {
            self.0.len()
        }
    }

    #[test]
    fn ram_over_a_callers_mapping_holds_its_bytes_and_tracks_writes_as_its_own_would() {
        let mut bytes = vec![0u8; 4 * PAGE_SIZE as usize];
        bytes[PAGE_SIZE as usize] = 0x5a;
        let mut ram = GuestRam::over(0x8000_0000, Box::new(Outside(bytes)));
        assert_eq!((ram.size(), ram.read_u32(0x8000_1000)), (4 * PAGE_SIZE, Some(0x5a)));
        assert!(ram.take_dirty_pages().is_empty(), "what the mapping held is no write");
        ram.write_u64(0x8000_2008, 7).unwrap();
        assert_eq!(ram.take_dirty_pages(), vec![2]);
        let copy = ram.clone(); // a clone has RAM of its own
        ram.write_u64(0x8000_2008, 8).unwrap();
        assert_eq!((copy.read_u64(0x8000_2008), ram.read_u64(0x8000_2008)), (Some(7), Some(8)));
    }

    #[test]
    fn writes_mark_exactly_the_touched_pages_dirty() {
        let mut ram = GuestRam::new(0x8000_0000, 16 * PAGE_SIZE);
        ram.write(0x8000_0ffe, &[1, 2, 3, 4]).unwrap(); // crosses pages 0 and 1
        ram.write_u64(0x8000_5000, 7).unwrap();
        assert_eq!(ram.take_dirty_pages(), vec![0, 1, 5]);
        assert_eq!(ram.take_dirty_pages(), Vec::<usize>::new());
    }

    #[test]
    fn every_kind_of_write_to_a_watched_code_page_moves_its_generation() {
        let mut ram = GuestRam::new(0x8000_0000, 4 * PAGE_SIZE);
        let gen = ram.watch_code_page(1);
        ram.write_u64(0x8000_0000, 1).unwrap(); // another page
        assert_eq!(ram.code_gen(1), gen);
        ram.write_at(PAGE_SIZE as usize + 8, [1u8; 4]); // a hart store
        assert_eq!(ram.code_gen(1), gen + 1);
        ram.write(0x8000_1000, &[2]).unwrap(); // unwatched since the last write
        assert_eq!(ram.code_gen(1), gen + 1);
        let gen = ram.watch_code_page(1);
        ram.write(0x8000_0ffc, &[0; 8]).unwrap(); // DMA crossing into the page
        assert_eq!(ram.code_gen(1), gen + 1);
        let gen = ram.watch_code_page(1);
        ram.write_page(1, &[0; PAGE_SIZE as usize]).unwrap(); // a restored page
        assert_eq!(ram.code_gen(1), gen + 1);
    }

    #[test]
    fn a_clone_is_a_different_ram() {
        let ram = GuestRam::new(0x8000_0000, PAGE_SIZE);
        assert_ne!(ram.clone().id(), ram.id());
    }

    #[test]
    fn accesses_outside_ram_are_refused() {
        let mut ram = GuestRam::new(0x8000_0000, PAGE_SIZE);
        assert!(ram.write(0x7fff_ffff, &[0]).is_none());
        assert!(ram.write(0x8000_0ffc, &[0; 8]).is_none());
        assert!(ram.read_u64(0x8000_1000).is_none());
        assert!(ram.read_u64(u64::MAX - 3).is_none());
        assert!(ram.take_dirty_pages().is_empty());
    }
}
