//! What a replicated `--resilient` primary sent (issue 11, docs/microreboot.md): a small
//! memfd the keeper holds, in which the monitor records, before each checkpoint leaves,
//! the pages its replication took, so that a monitor restarted after a crash can take the
//! run up again ([`replica::Primary::resume`]) and bring the backup up to date with one
//! incremental checkpoint of those pages and the ones it writes itself, instead of a full
//! checkpoint of the written RAM.
//!
//! Layout: a header page of u64s (magic, the run id, the highest epoch the run may have
//! taken, the epoch the record starts after, the rotation point, the local checkpoint's
//! epoch, which bitmap is the newer), then two bitmaps of the RAM's pages. The record
//! covers every page taken in the epochs after `since` (the union of both bitmaps). The
//! older bitmap is cleared only once `since` has moved past every epoch it alone covers,
//! so a monitor killed at any instruction leaves a record that covers at least what it says.
//!
//! Which epochs the record must cover: the backup holds some epoch B of the run at or after
//! `since`, and the new monitor's machine restarts at the local checkpoint (epoch K) and
//! replays. Their states differ only in pages the old monitor wrote after min(B, K) and
//! those the new one writes after K, so `since` may move up to the acknowledged epoch and
//! the local checkpoint's epoch, whichever is lower.

use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU64, Ordering};

const MAGIC: u64 = u64::from_le_bytes(*b"FTVMSENT");
const PAGE: usize = 4096;

/// Header words.
const W_MAGIC: usize = 0;
/// The run id (0: nothing recorded: the next monitor sends a full checkpoint).
const W_RUN: usize = 1;
/// The highest epoch the run may have taken (recorded before each take).
const W_LAST: usize = 2;
/// The record covers every page taken after this epoch.
const W_SINCE: usize = 3;
/// The older bitmap covers epochs up to this one; the newer one the epochs after it.
const W_SPLIT: usize = 4;
/// The epoch of the replication checkpoint the last local checkpoint was taken after.
const W_LOCAL: usize = 5;
/// Which bitmap (0 or 1) is the newer.
const W_NEWER: usize = 6;

/// Why the record cannot be made or mapped.
#[derive(Debug, thiserror::Error)]
pub enum SentError {
    #[error("cannot create the record of what was sent")]
    Create(#[source] nix::Error),
    #[error("cannot size the record of what was sent ({bytes} bytes)")]
    Size { bytes: u64, source: nix::Error },
    #[error("cannot map the record of what was sent")]
    Map(#[source] nix::Error),
    #[error("the record of what was sent is {found} bytes, not {expected}")]
    WrongSize { found: u64, expected: u64 },
}

/// A resumed run, read from the record: take it up with [`replica::Primary::resume`] and
/// send `pages` (with what the machine writes itself) in its first checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resumable {
    pub run_id: u64,
    pub last_epoch: u64,
    pub since_epoch: u64,
    pub pages: Vec<usize>,
}

/// The record, mapped.
pub struct SentRecord {
    _fd: OwnedFd,
    base: NonNull<u8>,
    ram_pages: usize,
}

// SAFETY: the mapping is plain shared memory, written through &mut self by one thread.
unsafe impl Send for SentRecord {}

impl Drop for SentRecord {
    fn drop(&mut self) {
        // SAFETY: base and length are the mapping made in `open`, unmapped once here.
        let _ = unsafe { nix::sys::mman::munmap(self.base.cast(), total_bytes(self.ram_pages)) };
    }
}

fn bitmap_bytes(ram_pages: usize) -> usize {
    ram_pages.div_ceil(64) * 8
}

fn total_bytes(ram_pages: usize) -> usize {
    PAGE + 2 * bitmap_bytes(ram_pages).next_multiple_of(PAGE)
}

/// The keeper's side: a zeroed record (nothing recorded) for a VM of `ram_bytes`.
pub fn create(ram_bytes: u64) -> Result<OwnedFd, SentError> {
    let ram_pages = ram_bytes.div_ceil(PAGE as u64) as usize;
    let fd = nix::sys::memfd::memfd_create(c"ftvm-sent", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
        .map_err(SentError::Create)?;
    let bytes = total_bytes(ram_pages) as u64;
    nix::unistd::ftruncate(&fd, bytes as i64).map_err(|source| SentError::Size { bytes, source })?;
    Ok(fd)
}

impl SentRecord {
    /// Map the record the keeper made (the monitor's side).
    pub fn open(fd: OwnedFd, ram_bytes: u64) -> Result<SentRecord, SentError> {
        let ram_pages = ram_bytes.div_ceil(PAGE as u64) as usize;
        let expected = total_bytes(ram_pages) as u64;
        let found = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(SentError::Map)?.st_size as u64;
        if found != expected {
            return Err(SentError::WrongSize { found, expected });
        }
        let len = std::num::NonZeroUsize::new(expected as usize).expect("a record is never empty");
        // SAFETY: a fresh shared mapping of the whole memfd (its size checked above); no
        // other mapping in this process aliases it.
        let base = unsafe {
            nix::sys::mman::mmap(
                None,
                len,
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED,
                &fd,
                0,
            )
        }
        .map_err(SentError::Map)?;
        Ok(SentRecord { _fd: fd, base: base.cast(), ram_pages })
    }

    fn word(&self, index: usize) -> &AtomicU64 {
        assert!(index * 8 < PAGE);
        // SAFETY: within the header page of the mapping, 8-aligned (the mapping is
        // page-aligned); AtomicU64 has u64's layout.
        unsafe { &*(self.base.as_ptr().add(index * 8) as *const AtomicU64) }
    }

    fn get(&self, index: usize) -> u64 {
        self.word(index).load(Ordering::Acquire)
    }

    fn set(&self, index: usize, value: u64) {
        self.word(index).store(value, Ordering::Release);
    }

    fn bitmap(&self, which: u64) -> &[AtomicU64] {
        let words = bitmap_bytes(self.ram_pages) / 8;
        let off = PAGE + which as usize * bitmap_bytes(self.ram_pages).next_multiple_of(PAGE);
        // SAFETY: the bitmap lies within the mapping (see `total_bytes`), 8-aligned.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr().add(off) as *const AtomicU64, words) }
    }

    /// A new run starts (its first checkpoint is full): forget what another run sent.
    pub fn begin(&mut self, run_id: u64) {
        self.set(W_RUN, 0);
        fence(Ordering::SeqCst);
        for which in 0..2 {
            self.bitmap(which).iter().for_each(|w| w.store(0, Ordering::Relaxed));
        }
        for w in [W_LAST, W_SINCE, W_SPLIT, W_LOCAL, W_NEWER] {
            self.set(w, 0);
        }
        self.set(W_MAGIC, MAGIC);
        fence(Ordering::SeqCst);
        self.set(W_RUN, run_id);
    }

    /// The run is taken up again by a restarted monitor: the record goes on as it is.
    pub fn resumed(&self) -> bool {
        self.get(W_MAGIC) == MAGIC && self.get(W_RUN) != 0
    }

    /// A checkpoint of at most `epoch` may be taken now: recorded first.
    pub fn will_take(&self, epoch: u64) {
        if epoch > self.get(W_LAST) {
            self.set(W_LAST, epoch);
        }
    }

    /// The replication took these pages from the machine's dirty log (before they leave).
    pub fn taken(&self, pages: impl IntoIterator<Item = usize>) {
        let newer = self.bitmap(self.get(W_NEWER) & 1);
        for page in pages {
            if let Some(word) = newer.get(page / 64) {
                word.fetch_or(1 << (page % 64), Ordering::Relaxed);
            }
        }
        fence(Ordering::Release);
    }

    /// A local checkpoint was taken right after the checkpoint of `epoch`.
    pub fn local_checkpoint(&self, epoch: u64) {
        self.set(W_LOCAL, epoch);
    }

    /// The backup acknowledged `epoch`: the record may let go of what it no longer needs.
    pub fn acknowledged(&self, epoch: u64) {
        let may_forget = epoch.min(self.get(W_LOCAL));
        let split = self.get(W_SPLIT);
        if may_forget < split {
            return;
        }
        // The older bitmap covers (since, split]: move `since` past it, then clear it, then
        // make it the newer one (the other now covers (split, last]).
        self.set(W_SINCE, split);
        fence(Ordering::SeqCst);
        let newer = self.get(W_NEWER) & 1;
        let older = 1 - newer;
        self.bitmap(older).iter().for_each(|w| w.store(0, Ordering::Relaxed));
        fence(Ordering::SeqCst);
        self.set(W_SPLIT, self.get(W_LAST));
        self.set(W_NEWER, older);
    }

    /// What a restarted monitor needs to take the run up, if a run was recorded.
    pub fn resumable(&self) -> Option<Resumable> {
        if !self.resumed() {
            return None;
        }
        let (a, b) = (self.bitmap(0), self.bitmap(1));
        let mut pages = Vec::new();
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            let mut bits = x.load(Ordering::Acquire) | y.load(Ordering::Acquire);
            while bits != 0 {
                let bit = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let page = i * 64 + bit;
                if page < self.ram_pages {
                    pages.push(page);
                }
            }
        }
        Some(Resumable { run_id: self.get(W_RUN), last_epoch: self.get(W_LAST), since_epoch: self.get(W_SINCE), pages })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> SentRecord {
        SentRecord::open(create(1 << 20).unwrap(), 1 << 20).unwrap()
    }

    #[test]
    fn a_fresh_record_resumes_nothing() {
        assert_eq!(record().resumable(), None);
    }

    /// Takes `pages` as the checkpoint of `epoch`.
    fn take(r: &SentRecord, epoch: u64, pages: &[usize]) {
        r.will_take(epoch);
        r.taken(pages.iter().copied());
    }

    #[test]
    fn every_page_taken_after_the_acknowledged_and_local_epochs_is_kept() {
        let mut r = record();
        r.begin(9);
        take(&r, 1, &[1, 2]);
        r.local_checkpoint(1);
        r.acknowledged(1);
        take(&r, 2, &[3]);
        take(&r, 3, &[200]);
        r.acknowledged(3); // the local checkpoint is at 1: epochs 2 and 3 stay
        let got = r.resumable().unwrap();
        assert_eq!((got.run_id, got.last_epoch), (9, 3));
        assert!(got.since_epoch <= 1 && got.pages.contains(&3) && got.pages.contains(&200), "{got:?}");
        r.local_checkpoint(3);
        take(&r, 4, &[7]);
        r.acknowledged(3);
        r.acknowledged(3);
        let got = r.resumable().unwrap();
        assert_eq!(got.since_epoch, 3, "{got:?}");
        assert_eq!(got.pages, vec![7], "what epochs up to 3 took is forgotten, epoch 4's kept");
        assert_eq!(got.last_epoch, 4);
    }

    #[test]
    fn a_new_run_forgets_the_old_one() {
        let mut r = record();
        r.begin(1);
        r.will_take(5);
        r.taken([4]);
        r.begin(2);
        let got = r.resumable().unwrap();
        assert_eq!(got, Resumable { run_id: 2, last_epoch: 0, since_epoch: 0, pages: vec![] });
    }
}
