//! The shared recovery region: one memfd that the keeper creates and every monitor maps.
//! It holds what a new monitor needs to take the VM over where the last one died: a
//! local checkpoint (guest RAM as an image, the hart and device state), the inputs logged
//! since it, and the marks of what already left (docs/microreboot.md explains the choices).
//!
//! Layout (little-endian; every part starts on a page):
//!
//! | part     | size                      | contents                                                       |
//! |----------|---------------------------|----------------------------------------------------------------|
//! | header   | 1 page                    | magic `FTVMKEEP`, version, the layout below, CRC32C            |
//! | live     | 1 page                    | counters as atomic u64s (heartbeat, marks, verdict) + a message |
//! | state    | [`STATE_CAP`]             | the committed checkpoint's machine state, seq, marks, CRC32C   |
//! | crcs     | 4 × RAM pages             | CRC32C of each page of the image                               |
//! | bitmap   | RAM pages / 8             | pages of the image that were ever written                      |
//! | image    | RAM                       | guest RAM as of the committed checkpoint                       |
//! | staging  | see [`Layout::new`]       | the next checkpoint, written whole before it is applied (redo) |
//! | log      | [`LOG_CAP`]               | base seq, then CRC-framed input records since the checkpoint   |
//!
//! A checkpoint is committed by one aligned store (the staging header's seq) after its
//! body and CRC are in place; applying it to the image and the state part is idempotent,
//! so a monitor killed at any instruction leaves either the old checkpoint or the new one.

use super::disk::{DiskError, DiskJournal, DiskStaged};
use crc32c::{crc32c, crc32c_append};
use machine::{Input, InputKind};
use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use thiserror::Error;

pub const PAGE: usize = 4096;
pub const MAGIC: [u8; 8] = *b"FTVMKEEP";
/// The handover state's format version (a binary that reads another refuses to take the
/// VM over). 1: the layout above; 2: a staged checkpoint names the disk journal's part.
pub const VERSION: u32 = 2;
/// Room for the encoded machine state (a few KiB in practice: registers, device queues,
/// pending inputs).
pub const STATE_CAP: usize = 4 << 20;
/// Room for the inputs since a checkpoint; a full log forces a checkpoint.
pub const LOG_CAP: usize = 16 << 20;
/// The largest input record (a jumbo frame is 64 KiB).
pub const MAX_RECORD: usize = 128 << 10;
/// The live page's text areas: a handover request's argument (the new binary), the last
/// handover's outcome, and the message of a monitor that gave up.
const REQUEST_OFF: usize = 512;
pub const REQUEST_CAP: usize = 1024;
const OUTCOME_OFF: usize = REQUEST_OFF + REQUEST_CAP;
const OUTCOME_CAP: usize = 1024;
const MESSAGE_OFF: usize = OUTCOME_OFF + OUTCOME_CAP;
const MESSAGE_CAP: usize = PAGE - MESSAGE_OFF - 8;
const _: () = assert!(Live::COUNT * 8 <= REQUEST_OFF && MESSAGE_CAP >= 1024);

/// Long work (copying a checkpoint's pages, laying the image) bumps the heartbeat every
/// this many pages (16 MiB), so that the keeper does not take it for a hang.
pub const BEAT_PAGES: u64 = 4096;

/// The live page's counters (index into the page's atomic u64s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Live {
    /// Bumped by the monitor's run loop at each slice end, during recovery and while idle.
    Heartbeat = 0,
    /// The instruction count at the last heartbeat.
    Icount = 1,
    /// The running monitor's pid.
    MonitorPid = 2,
    /// How many monitors were started (1 for the first).
    Attempt = 3,
    /// The committed checkpoint's seq (informative: the state part is what counts).
    CheckpointSeq = 4,
    /// Bytes of input records committed in the log.
    LogBytes = 5,
    /// Network frames the monitors sent, since boot.
    FramesSent = 6,
    /// Console bytes the keeper wrote to the terminal, since boot (written by the keeper).
    ConsoleDelivered = 7,
    /// Reboot markers the keeper passed on, since boot (written by the keeper).
    ResetsDelivered = 8,
    /// What the monitor found: a [`Verdict`] as u64.
    Verdict = 9,
    /// [`Phase`] as u64.
    Phase = 10,
    /// Wall clock (ns since the epoch) at which the monitor ran the guest again after a recovery.
    RunningNs = 11,
    /// Inputs the last recovery replayed.
    ReplayedInputs = 12,
    /// Instructions the last recovery executed to catch up.
    ReplayedIcount = 13,
    /// Checkpoints taken since the start, and their total and longest pause (µs).
    Checkpoints = 14,
    CheckpointPauseUs = 15,
    CheckpointMaxPauseUs = 16,
    /// Bytes of the last message written ([`Region::set_message`]).
    MessageLen = 17,
    /// The planned handover under way or last done ([`Handover`]): its number (1 for the
    /// first), [`HandoverKind`], [`HandoverState`].
    HandoverSeq = 18,
    HandoverKind = 19,
    HandoverState = 20,
    /// Wall clock (ns since the epoch) at which the old monitor stopped the guest for its
    /// final checkpoint; the guest's pause (µs) until the new monitor ran it; the final
    /// checkpoint's part of it (µs).
    HandoverStopNs = 21,
    HandoverPauseUs = 22,
    HandoverCheckpointUs = 23,
    /// Planned handovers completed since the start.
    Handovers = 24,
    /// Bytes of the request's and the outcome's text.
    RequestLen = 25,
    OutcomeLen = 26,
    /// A recovery's steps, wall clock (ns since the epoch), written by the monitor: it began
    /// (a spare: woken), its machine was built, the image laid, the state restored and the
    /// log read. [`Live::RunningNs`] follows, once the replay is done. The keeper zeroes them
    /// as it starts or wakes a monitor.
    BegunNs = 27,
    BuiltNs = 28,
    LaidNs = 29,
    RestoredNs = 30,
    /// 1 while a backup's monitor waits between two checkpoints (nothing it could die of
    /// again when restarted: not a poison input); 0 otherwise (the keeper zeroes it too).
    Waiting = 31,
}

impl Live {
    const COUNT: usize = 32;
}

/// What a planned handover does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandoverKind {
    None = 0,
    /// A fresh monitor of the same binary (`ctl rejuvenate`, `--rejuvenate-every`).
    Rejuvenate = 1,
    /// A monitor of another binary, the keeper re-executed first (`ctl upgrade`).
    Upgrade = 2,
}

impl HandoverKind {
    pub fn from_u64(v: u64) -> HandoverKind {
        match v {
            1 => HandoverKind::Rejuvenate,
            2 => HandoverKind::Upgrade,
            _ => HandoverKind::None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            HandoverKind::None => "none",
            HandoverKind::Rejuvenate => "rejuvenate",
            HandoverKind::Upgrade => "upgrade",
        }
    }
}

/// Where a planned handover is. The new monitor lays the image while the old one runs the
/// guest (`Preparing`); one round of pre-copy (`Ready`: the old takes a checkpoint, `Delta`:
/// the new lays its pages, `Synced`) leaves little for the final checkpoint, which the old
/// monitor takes with the guest stopped (`Committed`); the new one runs the guest from there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandoverState {
    None = 0,
    /// Asked for (through the API or by the keeper's timer); the keeper acts on it.
    Requested = 1,
    /// Upgrade: the new binary can read this state; the keeper re-executes itself with it.
    Exec = 2,
    /// The new monitor builds its machine and lays the image; the old one takes no checkpoint.
    Preparing = 3,
    /// The new monitor laid the image: the old one takes a checkpoint at its next slice end.
    Ready = 4,
    /// The new monitor lays that checkpoint's pages; the old one takes no checkpoint.
    Delta = 5,
    /// The new monitor is in step: the old one takes its final checkpoint at its next slice end.
    Synced = 6,
    /// The final checkpoint is committed: the old monitor is gone, the new one takes over.
    Committed = 7,
    Done = 8,
    /// Refused or failed (the outcome says why); the old monitor carries on.
    Failed = 9,
}

impl HandoverState {
    pub fn from_u64(v: u64) -> HandoverState {
        match v {
            1 => HandoverState::Requested,
            2 => HandoverState::Exec,
            3 => HandoverState::Preparing,
            4 => HandoverState::Ready,
            5 => HandoverState::Delta,
            6 => HandoverState::Synced,
            7 => HandoverState::Committed,
            8 => HandoverState::Done,
            9 => HandoverState::Failed,
            _ => HandoverState::None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            HandoverState::None => "none",
            HandoverState::Requested => "requested",
            HandoverState::Exec => "exec",
            HandoverState::Preparing => "preparing",
            HandoverState::Ready => "ready",
            HandoverState::Delta => "delta",
            HandoverState::Synced => "synced",
            HandoverState::Committed => "committed",
            HandoverState::Done => "done",
            HandoverState::Failed => "failed",
        }
    }

    /// Whether a new handover may start.
    pub fn settled(self) -> bool {
        matches!(self, HandoverState::None | HandoverState::Done | HandoverState::Failed)
    }
}

/// What a monitor reports through the live page before it gives up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    None = 0,
    /// The region failed a check: recovery is impossible (the message says which part).
    RegionCorrupt = 1,
    /// Replaying the log did not reach the logged instruction counts.
    ReplayDiverged = 2,
    /// A replicated primary's monitor found that another replica owns the VM now (its
    /// backup took over while no monitor ran): it stops, and is not restarted.
    Superseded = 3,
}

impl Verdict {
    pub fn from_u64(v: u64) -> Verdict {
        match v {
            1 => Verdict::RegionCorrupt,
            2 => Verdict::ReplayDiverged,
            3 => Verdict::Superseded,
            _ => Verdict::None,
        }
    }
}

/// Where a monitor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Starting = 0,
    Recovering = 1,
    /// Past its first slice (a sign of life from the run loop): the hang limit applies.
    Running = 2,
    /// The guest runs (booting, or recovered), its first slice not over yet: the start
    /// grace still covers the monitor's threads starting, the first slice's cold code and
    /// a first checkpoint, which under load outlast a short hang limit.
    Resuming = 3,
}

#[derive(Debug, Error)]
pub enum RegionError {
    #[error("cannot create the shared recovery region")]
    Create(#[source] nix::Error),
    #[error("cannot size the shared recovery region to {bytes} bytes")]
    Size { bytes: u64, source: nix::Error },
    #[error("cannot map the shared recovery region")]
    Map(#[source] nix::Error),
    #[error("the shared recovery region's {part} is corrupt: {problem}")]
    Corrupt { part: &'static str, problem: String },
    #[error("the shared recovery region has format version {found}, this ftvm reads version {VERSION}")]
    Version { found: u32 },
    #[error("the shared recovery region was laid out for {found} pages of RAM, this VM has {expected}")]
    RamSize { found: u64, expected: u64 },
    #[error("the input record of {bytes} bytes is larger than {MAX_RECORD}")]
    RecordTooLarge { bytes: usize },
    #[error(transparent)]
    Disk(#[from] DiskError),
}

impl RegionError {
    fn corrupt(part: &'static str, problem: impl Into<String>) -> RegionError {
        RegionError::Corrupt { part, problem: problem.into() }
    }
}

/// Offsets of the parts, derived from the RAM size alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub ram_pages: u64,
    pub state_off: u64,
    pub crcs_off: u64,
    pub bitmap_off: u64,
    pub image_off: u64,
    pub staging_off: u64,
    pub staging_cap: u64,
    pub log_off: u64,
    pub total: u64,
}

fn round_up(n: u64) -> u64 {
    n.div_ceil(PAGE as u64) * PAGE as u64
}

impl Layout {
    pub fn new(ram_pages: u64) -> Layout {
        let state_off = 2 * PAGE as u64;
        let crcs_off = state_off + STATE_CAP as u64;
        let bitmap_off = crcs_off + round_up(ram_pages * 4);
        let image_off = bitmap_off + round_up(ram_pages.div_ceil(8));
        let staging_off = image_off + ram_pages * PAGE as u64;
        // Header page, then page indices and CRCs, the pages, and the state.
        let staging_cap = PAGE as u64 + round_up(ram_pages * 8) + ram_pages * PAGE as u64 + STATE_CAP as u64;
        let log_off = staging_off + staging_cap;
        let total = log_off + LOG_CAP as u64;
        Layout { ram_pages, state_off, crcs_off, bitmap_off, image_off, staging_off, staging_cap, log_off, total }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(96);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        for v in [
            self.ram_pages,
            self.state_off,
            self.crcs_off,
            self.bitmap_off,
            self.image_off,
            self.staging_off,
            self.staging_cap,
            self.log_off,
            self.total,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        let crc = crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }
}

/// The committed checkpoint's marks: what had been produced when it was taken.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Marks {
    pub seq: u64,
    pub icount: u64,
    /// Console bytes, reboot markers and network frames the guest produced up to the checkpoint.
    pub console_bytes: u64,
    pub resets: u64,
    pub frames: u64,
}

const MARKS_BYTES: usize = 40;

impl Marks {
    fn encode(&self) -> [u8; MARKS_BYTES] {
        let mut out = [0u8; MARKS_BYTES];
        for (i, v) in [self.seq, self.icount, self.console_bytes, self.resets, self.frames].iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    fn decode(b: &[u8]) -> Marks {
        let v = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        Marks { seq: v(0), icount: v(1), console_bytes: v(2), resets: v(3), frames: v(4) }
    }
}

/// A checkpoint read back: the marks, the machine state's encoding, and the image's pages.
pub struct Committed {
    pub marks: Marks,
    pub state: Vec<u8>,
}

/// The region, mapped.
pub struct Region {
    fd: OwnedFd,
    base: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the mapping is plain shared memory; the region's methods take &mut self for
// every write outside the live page's atomics, so one thread at a time writes it.
unsafe impl Send for Region {}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: base and length are the mapping made in `map`, unmapped once here.
        let _ = unsafe { nix::sys::mman::munmap(self.base.cast(), self.layout.total as usize) };
    }
}

impl Region {
    /// Create a region for a VM with `ram_bytes` of RAM (the keeper's side). The memfd is
    /// sparse: only what monitors write takes memory.
    pub fn create(ram_bytes: u64) -> Result<Region, RegionError> {
        let layout = Layout::new(ram_bytes.div_ceil(PAGE as u64));
        let fd = nix::sys::memfd::memfd_create(c"ftvm-keeper", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
            .map_err(RegionError::Create)?;
        nix::unistd::ftruncate(&fd, layout.total as i64)
            .map_err(|source| RegionError::Size { bytes: layout.total, source })?;
        let mut region = Region::map(fd, layout)?;
        let header = layout.encode();
        region.bytes_mut(0, header.len()).copy_from_slice(&header);
        Ok(region)
    }

    /// Map a region a keeper created (the monitor's side), checking its header against
    /// this VM's RAM size.
    pub fn open(fd: OwnedFd, ram_bytes: u64) -> Result<Region, RegionError> {
        let expected = Layout::new(ram_bytes.div_ceil(PAGE as u64));
        let size = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(RegionError::Map)?.st_size as u64;
        if size < PAGE as u64 {
            return Err(RegionError::corrupt("header", format!("the region is {size} bytes")));
        }
        let header_only = Layout { total: PAGE as u64, ..expected };
        let probe = Region::map(fd, header_only)?;
        let layout = probe.check_header(expected)?;
        if size != layout.total {
            return Err(RegionError::corrupt(
                "header",
                format!("the region is {size} bytes, its header says {}", layout.total),
            ));
        }
        let fd =
            probe.fd.try_clone().map_err(|e| RegionError::Map(nix::Error::from_raw(e.raw_os_error().unwrap_or(0))))?;
        drop(probe);
        Region::map(fd, layout)
    }

    fn check_header(&self, expected: Layout) -> Result<Layout, RegionError> {
        let encoded = expected.encode();
        let h = self.bytes(0, encoded.len());
        if h[..8] != MAGIC {
            return Err(RegionError::corrupt("header", "bad magic"));
        }
        let version = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
        let crc_at = encoded.len() - 4;
        let crc = u32::from_le_bytes(h[crc_at..].try_into().expect("4 bytes"));
        if crc32c(&h[..crc_at]) != crc {
            return Err(RegionError::corrupt("header", "CRC mismatch"));
        }
        if version != VERSION {
            return Err(RegionError::Version { found: version });
        }
        let ram_pages = u64::from_le_bytes(h[16..24].try_into().expect("8 bytes"));
        if ram_pages != expected.ram_pages {
            return Err(RegionError::RamSize { found: ram_pages, expected: expected.ram_pages });
        }
        if h != encoded.as_slice() {
            return Err(RegionError::corrupt("header", "the layout does not follow from the RAM size"));
        }
        Ok(expected)
    }

    fn map(fd: OwnedFd, layout: Layout) -> Result<Region, RegionError> {
        use nix::sys::mman::{MapFlags, ProtFlags};
        let len = std::num::NonZeroUsize::new(layout.total as usize).expect("a region is never empty");
        // SAFETY: a fresh shared mapping of a file we hold; nothing else in this process
        // refers to the range, and Drop unmaps exactly it.
        let base = unsafe {
            nix::sys::mman::mmap(None, len, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_SHARED, &fd, 0)
        }
        .map_err(RegionError::Map)?;
        Ok(Region { fd, base: base.cast(), layout })
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    fn bytes(&self, off: u64, len: usize) -> &[u8] {
        assert!(off + len as u64 <= self.layout.total, "a region access within the mapping");
        // SAFETY: within the mapping (checked above); u8 has no invalid values.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr().add(off as usize), len) }
    }

    fn bytes_mut(&mut self, off: u64, len: usize) -> &mut [u8] {
        assert!(off + len as u64 <= self.layout.total, "a region access within the mapping");
        // SAFETY: within the mapping; &mut self makes this the only reference into it
        // from this process (the live page's atomics are never reached this way).
        unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr().add(off as usize), len) }
    }

    fn atomic(&self, off: u64) -> &AtomicU64 {
        assert!(off.is_multiple_of(8) && off + 8 <= self.layout.total);
        // SAFETY: aligned (the mapping is page-aligned, off a multiple of 8) and within it;
        // other processes touch these words only through atomics too.
        unsafe { &*(self.base.as_ptr().add(off as usize) as *const AtomicU64) }
    }

    pub fn live(&self, field: Live) -> u64 {
        self.atomic(PAGE as u64 + field as u64 * 8).load(Ordering::Acquire)
    }

    pub fn set_live(&self, field: Live, value: u64) {
        self.atomic(PAGE as u64 + field as u64 * 8).store(value, Ordering::Release);
    }

    /// Set `field` to `to` if it is `from` (the handover's states change hands so).
    pub fn swap_live(&self, field: Live, from: u64, to: u64) -> bool {
        self.atomic(PAGE as u64 + field as u64 * 8)
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    pub fn bump_heartbeat(&self, icount: u64) {
        self.set_live(Live::Icount, icount);
        self.beat();
    }

    /// A sign of life from inside long work (the icount stays the last heartbeat's).
    pub fn beat(&self) {
        self.atomic(PAGE as u64).fetch_add(1, Ordering::AcqRel);
    }

    /// Leave a message for the keeper (why the monitor gave up).
    pub fn set_message(&mut self, message: &str) {
        let bytes = &message.as_bytes()[..message.len().min(MESSAGE_CAP)];
        self.bytes_mut((PAGE + MESSAGE_OFF) as u64, bytes.len()).copy_from_slice(bytes);
        self.set_live(Live::MessageLen, bytes.len() as u64);
    }

    pub fn message(&self) -> String {
        let len = (self.live(Live::MessageLen) as usize).min(MESSAGE_CAP);
        String::from_utf8_lossy(self.bytes((PAGE + MESSAGE_OFF) as u64, len)).into_owned()
    }

    /// The live page's text at `off` (capped at `cap`), its length in `len`. Written by
    /// one process at a time: the API thread asks while no handover is under way, the
    /// keeper answers.
    fn text(&self, off: usize, cap: usize, len: Live) -> String {
        let len = (self.live(len) as usize).min(cap);
        String::from_utf8_lossy(self.bytes((PAGE + off) as u64, len)).into_owned()
    }

    fn set_text(&self, off: usize, cap: usize, len: Live, text: &str) {
        let bytes = &text.as_bytes()[..text.len().min(cap)];
        // SAFETY: within the live page (off + cap ≤ PAGE, checked by the constants' layout);
        // a text area is written by one party at a time (see `text`), and read only after
        // its length is published below.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.as_ptr().add(PAGE + off), bytes.len());
        }
        self.set_live(len, bytes.len() as u64);
    }

    /// A handover request's argument (the new binary's path).
    pub fn request_text(&self) -> String {
        self.text(REQUEST_OFF, REQUEST_CAP, Live::RequestLen)
    }

    pub fn set_request_text(&self, text: &str) {
        self.set_text(REQUEST_OFF, REQUEST_CAP, Live::RequestLen, text)
    }

    /// Why the last handover failed.
    pub fn outcome(&self) -> String {
        self.text(OUTCOME_OFF, OUTCOME_CAP, Live::OutcomeLen)
    }

    pub fn set_outcome(&self, text: &str) {
        self.set_text(OUTCOME_OFF, OUTCOME_CAP, Live::OutcomeLen, text)
    }

    /// The staged checkpoint's pages (index, bytes), each CRC checked: after a handover's
    /// final checkpoint, the pages written since the image the new monitor laid.
    pub fn staged_pages(&self, seq: u64) -> Result<Vec<(u64, &[u8])>, RegionError> {
        let s = self.layout.staging_off;
        if self.atomic(s + STAGING_SEQ).load(Ordering::Acquire) != seq {
            return Err(RegionError::corrupt("staged checkpoint", format!("it is not checkpoint {seq}")));
        }
        let count = u64::from(self.u32_at(s + STAGING_COUNT)).min(self.layout.ram_pages);
        let indices = s + PAGE as u64;
        let pages = indices + round_up(self.layout.ram_pages * 8);
        let mut out = Vec::with_capacity(count as usize);
        for i in 0..count {
            let index = u64::from(self.u32_at(indices + i * 8));
            let page = self.bytes(pages + i * PAGE as u64, PAGE);
            if index >= self.layout.ram_pages || crc32c(page) != self.u32_at(indices + i * 8 + 4) {
                return Err(RegionError::corrupt("staged checkpoint", format!("page {index}: CRC mismatch")));
            }
            out.push((index, page));
        }
        Ok(out)
    }

    fn u64_at(&self, off: u64) -> u64 {
        u64::from_le_bytes(self.bytes(off, 8).try_into().expect("8 bytes"))
    }

    fn u32_at(&self, off: u64) -> u32 {
        u32::from_le_bytes(self.bytes(off, 4).try_into().expect("4 bytes"))
    }

    fn put_u32(&mut self, off: u64, v: u32) {
        self.bytes_mut(off, 4).copy_from_slice(&v.to_le_bytes());
    }

    fn image_page(&self, index: u64) -> &[u8] {
        self.bytes(self.layout.image_off + index * PAGE as u64, PAGE)
    }

    fn bit(&self, index: u64) -> bool {
        self.bytes(self.layout.bitmap_off + index / 8, 1)[0] & (1 << (index % 8)) != 0
    }

    /// The pages of the image ever written (the rest are zero).
    pub fn written_pages(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.layout.ram_pages).filter(|&i| self.bit(i))
    }
}

/// The region's RAM image mapped copy-on-write (`MAP_PRIVATE`), as a monitor's guest RAM:
/// taking the VM over copies no RAM. A page reads as the image until the guest (or the
/// boot image, or a laid page) writes it; from then on it is this process's own copy,
/// which later checkpoints applied to the image do not change (they only carry pages this
/// monitor's guest wrote, which it holds already).
pub struct ImageMapping {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: a private mapping owned by this value alone; moving it moves that ownership.
unsafe impl Send for ImageMapping {}

// SAFETY: `base` and `len` are the mapping made in `Region::private_image`, fixed until
// Drop unmaps it, and nothing else in this process refers to it (it is private).
unsafe impl machine::RamMapping for ImageMapping {
    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.base.as_ptr()
    }
    fn len(&self) -> usize {
        self.len
    }
}

impl Drop for ImageMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `private_image`, unmapped once here.
        let _ = unsafe { nix::sys::mman::munmap(self.base.cast(), self.len) };
    }
}

impl Region {
    /// Map the RAM image copy-on-write, as guest RAM ([`ImageMapping`]).
    pub fn private_image(&self) -> Result<ImageMapping, RegionError> {
        use nix::sys::mman::{MapFlags, ProtFlags};
        let len = (self.layout.ram_pages * PAGE as u64) as usize;
        let size = std::num::NonZeroUsize::new(len).expect("RAM is never empty");
        let flags = MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE;
        // SAFETY: a fresh private mapping of part of a file we hold (its offset is
        // page-aligned); nothing else refers to the range, and ImageMapping unmaps it.
        let base = unsafe {
            nix::sys::mman::mmap(
                None,
                size,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                flags,
                &self.fd,
                self.layout.image_off as i64,
            )
        }
        .map_err(RegionError::Map)?;
        Ok(ImageMapping { base: base.cast(), len })
    }
}

/// The staging header: seq (the commit store, last), count, state length, CRC, marks, the
/// disk journal's part (runs, CRC, bytes).
const STAGING_SEQ: u64 = 0;
const STAGING_COUNT: u64 = 8;
const STAGING_STATE_LEN: u64 = 12;
const STAGING_CRC: u64 = 16;
const STAGING_MARKS: u64 = 24;
const STAGING_DISK: u64 = STAGING_MARKS + MARKS_BYTES as u64;
const DISK_BYTES: usize = 16;

/// The state part: seq first; then length, CRC, marks, the state.
const STATE_LEN: u64 = 8;
const STATE_CRC: u64 = 12;
const STATE_MARKS: u64 = 16;
const STATE_BODY: u64 = STATE_MARKS + MARKS_BYTES as u64;

/// A checkpoint being written into the staging part.
pub struct Staging<'a> {
    region: &'a mut Region,
    count: u64,
}

impl<'a> Staging<'a> {
    fn indices_off(&self) -> u64 {
        self.region.layout.staging_off + PAGE as u64
    }

    fn pages_off(&self) -> u64 {
        self.indices_off() + round_up(self.region.layout.ram_pages * 8)
    }

    /// A sign of life while the pages are copied.
    pub fn beat(&self) {
        self.region.beat();
    }

    /// Add a page (in ascending or any order; each index once).
    pub fn page(&mut self, index: u64, bytes: &[u8]) {
        assert!(
            index < self.region.layout.ram_pages && bytes.len() == PAGE && self.count < self.region.layout.ram_pages
        );
        let crc = crc32c(bytes);
        let at = self.indices_off() + self.count * 8;
        self.region.put_u32(at, index as u32);
        self.region.put_u32(at + 4, crc);
        let off = self.pages_off() + self.count * PAGE as u64;
        self.region.bytes_mut(off, PAGE).copy_from_slice(bytes);
        self.count += 1;
    }

    /// Write the state and commit: after this returns the new checkpoint stands, and
    /// [`Region::apply_staged`] makes it the image's.
    pub fn commit(self, marks: Marks, state: &[u8], disk: DiskStaged) -> Result<(), RegionError> {
        if state.len() > STATE_CAP - STATE_BODY as usize {
            return Err(RegionError::corrupt("state", format!("a machine state of {} bytes", state.len())));
        }
        let state_off = self.pages_off() + self.count * PAGE as u64;
        self.region.bytes_mut(state_off, state.len()).copy_from_slice(state);
        let s = self.region.layout.staging_off;
        self.region.put_u32(s + STAGING_COUNT, self.count as u32);
        self.region.put_u32(s + STAGING_STATE_LEN, state.len() as u32);
        let m = marks.encode();
        self.region.bytes_mut(s + STAGING_MARKS, MARKS_BYTES).copy_from_slice(&m);
        self.region.put_u32(s + STAGING_DISK, disk.runs);
        self.region.put_u32(s + STAGING_DISK + 4, disk.crc);
        self.region.bytes_mut(s + STAGING_DISK + 8, 8).copy_from_slice(&disk.bytes.to_le_bytes());
        let crc = self.region.staging_crc(self.count, state.len());
        self.region.put_u32(s + STAGING_CRC, crc);
        crate::keeper::fault::point("keeper::checkpoint-commit");
        // The commit point: one aligned store, after everything it covers.
        std::sync::atomic::fence(Ordering::Release);
        self.region.atomic(s + STAGING_SEQ).store(marks.seq, Ordering::Release);
        Ok(())
    }
}

impl Region {
    /// Start writing the next checkpoint.
    pub fn stage(&mut self) -> Staging<'_> {
        Staging { region: self, count: 0 }
    }

    /// CRC of the staging part as committed: the marks, counts, indices, page CRCs, state
    /// (the pages themselves carry their own CRCs).
    fn staging_crc(&self, count: u64, state_len: usize) -> u32 {
        let s = self.layout.staging_off;
        let mut crc = crc32c(self.bytes(s + STAGING_COUNT, 8));
        crc = crc32c_append(crc, self.bytes(s + STAGING_MARKS, MARKS_BYTES + DISK_BYTES));
        crc = crc32c_append(crc, self.bytes(s + PAGE as u64, count as usize * 8));
        let state_off = s + PAGE as u64 + round_up(self.layout.ram_pages * 8) + count * PAGE as u64;
        crc32c_append(crc, self.bytes(state_off, state_len))
    }

    fn committed_seq(&self) -> u64 {
        self.u64_at(self.layout.state_off)
    }

    /// If the staging part holds a committed checkpoint newer than the image's, copy it
    /// into the image and the state part, and fold its disk writes into the disk image
    /// (redo; idempotent). Returns whether it did.
    pub fn apply_staged(&mut self, disk: Option<&mut DiskJournal>) -> Result<bool, RegionError> {
        let s = self.layout.staging_off;
        let seq = self.atomic(s + STAGING_SEQ).load(Ordering::Acquire);
        if seq <= self.committed_seq() {
            return Ok(false);
        }
        let count = u64::from(self.u32_at(s + STAGING_COUNT));
        let state_len = self.u32_at(s + STAGING_STATE_LEN) as usize;
        if count > self.layout.ram_pages || state_len > STATE_CAP - STATE_BODY as usize {
            return Err(RegionError::corrupt("staged checkpoint", format!("{count} pages, {state_len} state bytes")));
        }
        if self.staging_crc(count, state_len) != self.u32_at(s + STAGING_CRC) {
            return Err(RegionError::corrupt("staged checkpoint", format!("checkpoint {seq}: CRC mismatch")));
        }
        let marks = Marks::decode(self.bytes(s + STAGING_MARKS, MARKS_BYTES));
        if marks.seq != seq {
            return Err(RegionError::corrupt("staged checkpoint", format!("seq {seq} with marks of {}", marks.seq)));
        }
        let indices = s + PAGE as u64;
        let pages = indices + round_up(self.layout.ram_pages * 8);
        for i in 0..count {
            let index = u64::from(self.u32_at(indices + i * 8));
            let crc = self.u32_at(indices + i * 8 + 4);
            if index >= self.layout.ram_pages {
                return Err(RegionError::corrupt("staged checkpoint", format!("page {index} is outside RAM")));
            }
            let (src, dst) = (pages + i * PAGE as u64, self.layout.image_off + index * PAGE as u64);
            // SAFETY: both ranges are within the mapping (index < ram_pages, i < count ≤
            // ram_pages) and in different parts, so they do not overlap.
            unsafe {
                let base = self.base.as_ptr();
                std::ptr::copy_nonoverlapping(base.add(src as usize), base.add(dst as usize), PAGE);
            }
            self.put_u32(self.layout.crcs_off + index * 4, crc);
            let byte = self.layout.bitmap_off + index / 8;
            self.bytes_mut(byte, 1)[0] |= 1 << (index % 8);
            if i % BEAT_PAGES == BEAT_PAGES - 1 {
                self.beat();
            }
        }
        let staged = DiskStaged {
            runs: self.u32_at(s + STAGING_DISK),
            crc: self.u32_at(s + STAGING_DISK + 4),
            bytes: self.u64_at(s + STAGING_DISK + 8),
        };
        match disk {
            Some(disk) => disk.fold(staged)?,
            None if staged.runs > 0 => {
                return Err(RegionError::corrupt("staged checkpoint", "disk writes, and this VM has no writable disk"))
            }
            None => {}
        }
        crate::keeper::fault::point("keeper::checkpoint-apply");
        let state_off = pages + count * PAGE as u64;
        let state = self.bytes(state_off, state_len).to_vec();
        self.write_state_part(marks, &state);
        Ok(true)
    }

    fn write_state_part(&mut self, marks: Marks, state: &[u8]) {
        let p = self.layout.state_off;
        self.bytes_mut(p + STATE_BODY, state.len()).copy_from_slice(state);
        self.put_u32(p + STATE_LEN, state.len() as u32);
        self.bytes_mut(p + STATE_MARKS, MARKS_BYTES).copy_from_slice(&marks.encode());
        let crc = crc32c_append(crc32c(&marks.encode()), state);
        self.put_u32(p + STATE_CRC, crc);
        std::sync::atomic::fence(Ordering::Release);
        self.atomic(p).store(marks.seq, Ordering::Release);
        self.set_live(Live::CheckpointSeq, marks.seq);
    }

    /// The committed checkpoint (after [`Region::apply_staged`]), its state checked; None
    /// before the first.
    pub fn committed(&self) -> Result<Option<Committed>, RegionError> {
        let p = self.layout.state_off;
        let seq = self.committed_seq();
        if seq == 0 {
            return Ok(None);
        }
        let len = self.u32_at(p + STATE_LEN) as usize;
        if len > STATE_CAP - STATE_BODY as usize {
            return Err(RegionError::corrupt("checkpoint state", format!("a length of {len} bytes")));
        }
        let marks = Marks::decode(self.bytes(p + STATE_MARKS, MARKS_BYTES));
        let state = self.bytes(p + STATE_BODY, len);
        if crc32c_append(crc32c(&marks.encode()), state) != self.u32_at(p + STATE_CRC) || marks.seq != seq {
            return Err(RegionError::corrupt("checkpoint state", format!("checkpoint {seq}: CRC mismatch")));
        }
        Ok(Some(Committed { marks, state: state.to_vec() }))
    }

    /// A page of the committed image, its CRC checked.
    pub fn checked_page(&self, index: u64) -> Result<&[u8], RegionError> {
        let page = self.image_page(index);
        if crc32c(page) != self.u32_at(self.layout.crcs_off + index * 4) {
            return Err(RegionError::corrupt("RAM image", format!("page {index}: CRC mismatch")));
        }
        Ok(page)
    }

    /// Corrupt one byte of the committed checkpoint (fault injection: the monitor's own
    /// data damaged).
    pub fn corrupt_committed(&mut self) {
        let off = self.layout.state_off + STATE_BODY;
        self.bytes_mut(off, 1)[0] ^= 0x5a;
    }
}

/// The log: base seq at its start, records from the next page, its length in the live page.
impl Region {
    fn log_records_off(&self) -> u64 {
        self.layout.log_off + PAGE as u64
    }

    /// Empty the log for checkpoint `seq` (length first, so a kill between the two stores
    /// leaves an empty log either way).
    pub fn reset_log(&mut self, seq: u64) {
        self.set_live(Live::LogBytes, 0);
        let off = self.layout.log_off;
        self.atomic(off).store(seq, Ordering::Release);
    }

    /// Append an input; false when the log is full (take a checkpoint, then append again).
    pub fn append(&mut self, input: &Input) -> Result<bool, RegionError> {
        let body = encode_input(input);
        if body.len() > MAX_RECORD {
            return Err(RegionError::RecordTooLarge { bytes: body.len() });
        }
        let used = self.live(Live::LogBytes);
        let len = 8 + body.len() as u64;
        if used + len > (LOG_CAP - PAGE) as u64 {
            return Ok(false);
        }
        let at = self.log_records_off() + used;
        self.put_u32(at, body.len() as u32);
        self.put_u32(at + 4, crc32c_append(crc32c(&(body.len() as u32).to_le_bytes()), &body));
        self.bytes_mut(at + 8, body.len()).copy_from_slice(&body);
        self.set_live(Live::LogBytes, used + len);
        Ok(true)
    }

    /// The inputs logged since checkpoint `seq` (empty if the log belongs to an earlier
    /// one: the monitor died between committing a checkpoint and emptying the log).
    pub fn inputs(&self, seq: u64) -> Result<Vec<Input>, RegionError> {
        let base = self.atomic(self.layout.log_off).load(Ordering::Acquire);
        if base != seq {
            return Ok(Vec::new());
        }
        let used = self.live(Live::LogBytes).min((LOG_CAP - PAGE) as u64);
        let mut inputs = Vec::new();
        let mut at = 0u64;
        while at < used {
            if used - at < 8 {
                return Err(RegionError::corrupt("input log", format!("a torn record at byte {at}")));
            }
            let off = self.log_records_off() + at;
            let len = self.u32_at(off) as usize;
            if len > MAX_RECORD || at + 8 + len as u64 > used {
                return Err(RegionError::corrupt(
                    "input log",
                    format!("record {} has a length of {len}", inputs.len()),
                ));
            }
            let body = self.bytes(off + 8, len);
            if crc32c_append(crc32c(&(len as u32).to_le_bytes()), body) != self.u32_at(off + 4) {
                return Err(RegionError::corrupt("input log", format!("record {}: CRC mismatch", inputs.len())));
            }
            let input = decode_input(body)
                .ok_or_else(|| RegionError::corrupt("input log", format!("record {} is malformed", inputs.len())))?;
            inputs.push(input);
            at += 8 + len as u64;
        }
        Ok(inputs)
    }
}

const KIND_CONSOLE: u8 = 1;
const KIND_FRAME: u8 = 2;
const KIND_ENTROPY: u8 = 3;
const KIND_IDLE: u8 = 4;
const KIND_RATE: u8 = 5;

/// An input's record body: icount, kind, payload. (The input-log format of record/replay
/// replaces this once it lands; the framing stays.)
fn encode_input(input: &Input) -> Vec<u8> {
    let mut out = Vec::with_capacity(17);
    out.extend_from_slice(&input.icount.to_le_bytes());
    match &input.kind {
        InputKind::Console(b) => {
            out.push(KIND_CONSOLE);
            out.extend_from_slice(b);
        }
        InputKind::NetFrame(b) => {
            out.push(KIND_FRAME);
            out.extend_from_slice(b);
        }
        InputKind::Entropy(b) => {
            out.push(KIND_ENTROPY);
            out.extend_from_slice(b);
        }
        InputKind::IdleSkip { ticks } => {
            out.push(KIND_IDLE);
            out.extend_from_slice(&ticks.to_le_bytes());
        }
        InputKind::ClockRate { icount_per_tick } => {
            out.push(KIND_RATE);
            out.extend_from_slice(&icount_per_tick.to_le_bytes());
        }
    }
    out
}

fn decode_input(body: &[u8]) -> Option<Input> {
    let icount = u64::from_le_bytes(body.get(..8)?.try_into().ok()?);
    let kind = *body.get(8)?;
    let rest = &body[9..];
    let word = || rest.try_into().ok().map(u64::from_le_bytes);
    let kind = match kind {
        KIND_CONSOLE => InputKind::Console(rest.to_vec()),
        KIND_FRAME => InputKind::NetFrame(rest.to_vec()),
        KIND_ENTROPY => InputKind::Entropy(rest.to_vec()),
        KIND_IDLE => InputKind::IdleSkip { ticks: word()? },
        KIND_RATE => InputKind::ClockRate { icount_per_tick: word()? },
        _ => return None,
    };
    Some(Input { icount, kind })
}

/// One line naming an input, for messages.
pub fn describe(input: &Input) -> String {
    let what = match &input.kind {
        InputKind::Console(b) => format!("console, {} bytes", b.len()),
        InputKind::NetFrame(b) => format!("network frame, {} bytes", b.len()),
        InputKind::Entropy(b) => format!("entropy, {} bytes", b.len()),
        InputKind::IdleSkip { ticks } => format!("idle skip of {ticks} ticks"),
        InputKind::ClockRate { icount_per_tick } => format!("clock rate of {icount_per_tick} instructions per tick"),
    };
    format!("{what}, stamped at icount {}", input.icount)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(icount: u64, kind: InputKind) -> Input {
        Input { icount, kind }
    }

    #[test]
    fn a_region_opens_with_its_own_ram_size_only() {
        let region = Region::create(64 << 20).unwrap();
        let fd = region.fd().try_clone().unwrap();
        assert!(Region::open(fd.try_clone().unwrap(), 64 << 20).is_ok());
        let err = Region::open(fd, 32 << 20).err().unwrap();
        assert_eq!(err.to_string(), "the shared recovery region was laid out for 16384 pages of RAM, this VM has 8192");
    }

    #[test]
    fn a_checkpoint_commits_whole_and_applies_once() {
        let mut region = Region::create(1 << 20).unwrap();
        assert!(region.committed().unwrap().is_none());
        let page = vec![7u8; PAGE];
        let mut staging = region.stage();
        staging.page(3, &page);
        let marks = Marks { seq: 1, icount: 100, console_bytes: 5, resets: 0, frames: 2 };
        staging.commit(marks, b"state", DiskStaged::default()).unwrap();
        assert!(region.apply_staged(None).unwrap());
        assert!(!region.apply_staged(None).unwrap(), "applying again changes nothing");
        let committed = region.committed().unwrap().unwrap();
        assert_eq!((committed.marks, committed.state.as_slice()), (marks, &b"state"[..]));
        assert_eq!(region.written_pages().collect::<Vec<_>>(), vec![3]);
        assert_eq!(region.checked_page(3).unwrap(), page.as_slice());
    }

    #[test]
    fn applying_a_large_checkpoint_is_a_sign_of_life() {
        let mut region = Region::create(64 << 20).unwrap();
        let mut staging = region.stage();
        for index in 0..3 * BEAT_PAGES {
            staging.page(index, &[1u8; PAGE]);
        }
        staging.commit(Marks { seq: 1, ..Marks::default() }, b"state", DiskStaged::default()).unwrap();
        let before = region.live(Live::Heartbeat);
        assert!(region.apply_staged(None).unwrap());
        assert_eq!(region.live(Live::Heartbeat) - before, 3, "a beat every {BEAT_PAGES} pages");
    }

    #[test]
    fn an_uncommitted_staging_leaves_the_old_checkpoint() {
        let mut region = Region::create(1 << 20).unwrap();
        let mut staging = region.stage();
        staging.page(1, &[1u8; PAGE]);
        let _ = staging; // the monitor died before committing
        assert!(!region.apply_staged(None).unwrap());
        assert!(region.committed().unwrap().is_none());
    }

    #[test]
    fn corruption_is_reported_naming_the_part() {
        let mut region = Region::create(1 << 20).unwrap();
        let mut staging = region.stage();
        staging.page(2, &[9u8; PAGE]);
        staging.commit(Marks { seq: 1, ..Marks::default() }, b"state", DiskStaged::default()).unwrap();
        region.apply_staged(None).unwrap();
        region.corrupt_committed();
        let err = region.committed().err().unwrap();
        assert_eq!(
            err.to_string(),
            "the shared recovery region's checkpoint state is corrupt: checkpoint 1: CRC mismatch"
        );
        let off = region.layout.image_off + 2 * PAGE as u64;
        region.bytes_mut(off, 1)[0] = 0;
        let err = region.checked_page(2).err().unwrap();
        assert_eq!(err.to_string(), "the shared recovery region's RAM image is corrupt: page 2: CRC mismatch");
    }

    #[test]
    fn the_log_replays_what_was_appended_for_its_checkpoint() {
        let mut region = Region::create(1 << 20).unwrap();
        region.reset_log(4);
        let inputs = vec![
            input(10, InputKind::Console(b"ls\n".to_vec())),
            input(11, InputKind::IdleSkip { ticks: 99 }),
            input(12, InputKind::ClockRate { icount_per_tick: 50 }),
            input(13, InputKind::Entropy(vec![1; 64])),
            input(14, InputKind::NetFrame(vec![2; 60])),
        ];
        for i in &inputs {
            assert!(region.append(i).unwrap());
        }
        assert_eq!(region.inputs(4).unwrap(), inputs);
        assert!(region.inputs(5).unwrap().is_empty(), "a log of another checkpoint is not replayed");
        let off = region.log_records_off() + 12;
        region.bytes_mut(off, 1)[0] ^= 1;
        let err = region.inputs(4).err().unwrap();
        assert_eq!(err.to_string(), "the shared recovery region's input log is corrupt: record 0: CRC mismatch");
    }

    #[test]
    fn a_full_log_says_so() {
        let mut region = Region::create(1 << 20).unwrap();
        region.reset_log(1);
        let frame = input(1, InputKind::NetFrame(vec![0; 60_000]));
        let mut appended = 0;
        while region.append(&frame).unwrap() {
            appended += 1;
        }
        assert_eq!(appended, (LOG_CAP - PAGE) / (60_000 + 8 + 9));
    }
}
