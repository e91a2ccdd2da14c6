//! The code cache's memory: one region mapped once, filled front to back, and emptied
//! whole. Cranelift's own JIT module frees code only a module at a time and finalizes
//! each function onto fresh pages; a bump allocator over one mapping gives a hard bound
//! on memory, no waste between small functions, and a flush that costs nothing.
//!
//! Pages are never writable and executable at once: a function is copied in while its
//! pages are read-write, then they become read-execute.

use std::ptr::NonNull;

/// Alignment of each function's start (what compilers use for hot code on x86-64).
const FUNCTION_ALIGN: usize = 16;

pub(super) struct CodeRegion {
    base: NonNull<u8>,
    size: usize,
    /// Bytes in use from `base` on.
    used: usize,
    page: usize,
    /// During a batch: the start of the pages made writable for it (up to the end).
    batch_from: Option<usize>,
}

// SAFETY: the region is owned by one `CodeRegion` and only reached through it (or
// through code pointers that the owner hands out and invalidates on flush); nothing
// about it is tied to the thread that mapped it.
unsafe impl Send for CodeRegion {}

impl CodeRegion {
    /// Map `size` bytes (rounded up to pages), inaccessible until filled.
    pub(super) fn new(size: usize) -> Option<CodeRegion> {
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let page = usize::try_from(page).ok().filter(|p| p.is_power_of_two())?;
        let size = size.checked_next_multiple_of(page)?.max(page);
        // SAFETY: an anonymous private mapping at an address the kernel chooses: it
        // touches no existing memory.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        Some(CodeRegion { base: NonNull::new(ptr.cast())?, size, used: 0, page, batch_from: None })
    }

    /// Copy `code` in and make it executable; its address, or `None` when the region
    /// is full (the caller flushes and tries again).
    pub(super) fn add(&mut self, code: &[u8]) -> Option<*const u8> {
        let start = self.used.next_multiple_of(FUNCTION_ALIGN);
        let end = start.checked_add(code.len())?;
        if end > self.size || code.is_empty() {
            return None;
        }
        if self.batch_from.is_some() {
            // SAFETY: [start, end) lies inside the batch's writable pages (end <= size).
            unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), self.base.as_ptr().add(start), code.len()) };
            self.used = end;
            // SAFETY: start < size, inside the mapping.
            return Some(unsafe { self.base.as_ptr().add(start) });
        }
        let first_page = start & !(self.page - 1);
        let span = end.next_multiple_of(self.page) - first_page;
        // SAFETY: [first_page, first_page + span) lies inside the mapping (end <= size
        // and size is a multiple of the page size). The pages may hold other functions,
        // which are not running: the hart is single-threaded and compiles between
        // blocks, never while compiled code runs.
        unsafe {
            let pages = self.base.as_ptr().add(first_page);
            if libc::mprotect(pages.cast(), span, libc::PROT_READ | libc::PROT_WRITE) != 0 {
                return None;
            }
            std::ptr::copy_nonoverlapping(code.as_ptr(), self.base.as_ptr().add(start), code.len());
            if libc::mprotect(pages.cast(), span, libc::PROT_READ | libc::PROT_EXEC) != 0 {
                return None;
            }
        }
        self.used = end;
        // SAFETY: start < size, inside the mapping.
        Some(unsafe { self.base.as_ptr().add(start) })
    }

    /// Start adding several functions with two page-protection changes in all, not two
    /// each (each is a TLB shootdown across the process's threads). Until
    /// [`CodeRegion::end_batch`], nothing added may run.
    pub(super) fn begin_batch(&mut self) -> bool {
        let from = self.used & !(self.page - 1);
        // SAFETY: [from, size) lies inside the mapping; its pages hold functions that do
        // not run until the batch ends (the hart's thread installs between blocks).
        let ok = unsafe {
            libc::mprotect(self.base.as_ptr().add(from).cast(), self.size - from, libc::PROT_READ | libc::PROT_WRITE)
        } == 0;
        if ok {
            self.batch_from = Some(from);
        }
        ok
    }

    /// Make what the batch added executable.
    pub(super) fn end_batch(&mut self) {
        let Some(from) = self.batch_from.take() else {
            return;
        };
        let end = self.used.next_multiple_of(self.page);
        if end > from {
            // SAFETY: [from, end) lies inside the mapping (used <= size, size is a
            // multiple of the page size). Should this fail, the pages stay writable and
            // not executable: running them faults rather than running anything else.
            unsafe {
                libc::mprotect(self.base.as_ptr().add(from).cast(), end - from, libc::PROT_READ | libc::PROT_EXEC);
            }
        }
    }

    /// Forget every function. The caller must drop every pointer `add` returned.
    pub(super) fn flush(&mut self) {
        self.batch_from = None;
        if self.used > 0 {
            // SAFETY: the range is the mapping itself; making it inaccessible and
            // dropping its pages (MADV_DONTNEED) only affects code nobody may call now.
            unsafe {
                libc::mprotect(self.base.as_ptr().cast(), self.size, libc::PROT_NONE);
                libc::madvise(self.base.as_ptr().cast(), self.size, libc::MADV_DONTNEED);
            }
        }
        self.used = 0;
    }
}

impl Drop for CodeRegion {
    fn drop(&mut self) {
        // SAFETY: unmapping the region this value mapped; no code in it can run any more
        // (its owner, the compiler, is going away with the block cache).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.size);
        }
    }
}
