//! virtio block device (virtio v1.2 §5.2) over a raw disk image file.
//!
//! The image is machine state, like RAM (DESIGN.md §2): requests read and write it
//! in place with positioned I/O, and every sector a request writes is remembered
//! until [`Blk::take_dirty_sectors`], so that checkpoints can carry disk writes the
//! way they carry dirty pages.
//!
//! A copy-on-write overlay ([`Blk::start_overlay`]) keeps the image as it is: from then
//! on writes go to an anonymous sparse file of the image's size, a bitmap telling which
//! sectors it holds, and reads take each sector from wherever it is now. A replay runs
//! over one, so that the recording's start contents serve every replay.

use super::queue::{Chain, Queue, QueueError, QUEUE_SIZE_MAX};
use super::VirtioError;
use rv64::GuestRam;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub const SECTOR_SIZE_BYTES: u64 = 512;

/// Feature bits (§5.2.3).
pub const FEATURE_SEG_MAX: u64 = 1 << 2;
pub const FEATURE_RO: u64 = 1 << 5;
pub const FEATURE_BLK_SIZE: u64 = 1 << 6;
pub const FEATURE_FLUSH: u64 = 1 << 9;

/// Most data segments per request: without INDIRECT a request is header + data
/// segments + status in one chain, which must fit the queue. Without SEG_MAX Linux
/// would send one segment per request.
pub const SEG_MAX: u32 = QUEUE_SIZE_MAX as u32 - 2;

/// The serial number GET_ID returns: 20 bytes, NUL-padded.
pub const DISK_ID: [u8; 20] = *b"ftvm-disk\0\0\0\0\0\0\0\0\0\0\0";

const REQUEST_HEADER_BYTES: u64 = 16;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// Data moves between the image and guest RAM in pieces of this size, so a request
/// never makes the VMM allocate what the guest asked for.
const CHUNK_BYTES: usize = 64 * 1024;

/// A block device backed by a raw image file.
#[derive(Debug)]
pub struct Blk {
    file: File,
    path: PathBuf,
    capacity_sectors: u64,
    read_only: bool,
    /// One bit per sector written since the last take; sized for the whole disk up front.
    dirty: Vec<u64>,
    /// Requests still to fail with IOERR (injected host disk errors).
    injected_errors: u32,
    scratch: Vec<u8>,
    overlay: Option<Overlay>,
}

/// The sectors written since the overlay started: in `file` (sparse, the image's size),
/// those whose bit is set in `present` (sized for the whole disk up front).
#[derive(Debug)]
struct Overlay {
    file: File,
    present: Vec<u64>,
}

impl Overlay {
    fn has(&self, sector: u64) -> bool {
        self.present[(sector / 64) as usize] & (1 << (sector % 64)) != 0
    }

    /// How many sectors from `sector` (at most `max`) are alike: all in the overlay, or
    /// all in the image.
    fn run(&self, sector: u64, max: u64) -> (bool, u64) {
        let here = self.has(sector);
        let mut n = 1;
        while n < max && self.has(sector + n) == here {
            n += 1;
        }
        (here, n)
    }

    /// The first sector at or after `sector` (below `end`) that the overlay holds, a
    /// word of the bitmap at a time.
    fn next_present(&self, sector: u64, end: u64) -> Option<u64> {
        let mut word = (sector / 64) as usize;
        let mut bits = *self.present.get(word)? & (u64::MAX << (sector % 64));
        loop {
            if bits != 0 {
                let found = word as u64 * 64 + u64::from(bits.trailing_zeros());
                return (found < end).then_some(found);
            }
            word += 1;
            bits = *self.present.get(word)?;
        }
    }

    fn mark(&mut self, sector: u64, count: u64) {
        for s in sector..sector + count {
            self.present[(s / 64) as usize] |= 1 << (s % 64);
        }
    }
}

/// The block device's state beyond the image's contents, as plain data.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlkState {
    pub capacity_sectors: u64,
    pub read_only: bool,
    pub injected_errors: u32,
}

/// A finished request: its status byte, and how many data bytes went into the
/// writable buffers.
struct Outcome {
    status: u8,
    written: u64,
}

fn status_only(status: u8) -> Result<Outcome, QueueError> {
    Ok(Outcome { status, written: 0 })
}

impl Blk {
    /// Opens the raw image at `path`. Its size must be a whole number of 512-byte
    /// sectors: a partial last sector could be neither read nor written by the
    /// guest, so such an image is refused rather than silently cut short.
    pub fn open(path: &Path, read_only: bool) -> Result<Blk, VirtioError> {
        let open_error = |source| VirtioError::Open { path: path.to_path_buf(), source };
        let mut file = OpenOptions::new().read(true).write(!read_only).open(path).map_err(open_error)?;
        // Seeking to the end also sizes block devices, whose metadata length is 0.
        let size_bytes = file.seek(SeekFrom::End(0)).map_err(open_error)?;
        if size_bytes % SECTOR_SIZE_BYTES != 0 {
            return Err(VirtioError::SizeNotSectorMultiple { path: path.to_path_buf(), size_bytes });
        }
        let capacity_sectors = size_bytes / SECTOR_SIZE_BYTES;
        let dirty_words = usize::try_from(capacity_sectors.div_ceil(64))
            .map_err(|_| open_error(std::io::Error::new(std::io::ErrorKind::InvalidInput, "image too large")))?;
        Ok(Blk {
            file,
            path: path.to_path_buf(),
            capacity_sectors,
            read_only,
            dirty: vec![0; dirty_words],
            injected_errors: 0,
            scratch: vec![0; CHUNK_BYTES],
            overlay: None,
        })
    }

    /// From now on the image file is only read: writes go to a copy-on-write overlay (an
    /// anonymous temporary file, gone with the device), and reads see them.
    pub fn start_overlay(&mut self) -> Result<(), VirtioError> {
        if self.overlay.is_some() {
            return Ok(());
        }
        let io = |source| VirtioError::Io { path: self.path.clone(), sector: 0, source };
        let file = tempfile_in_tmp().map_err(io)?;
        file.set_len(self.capacity_sectors * SECTOR_SIZE_BYTES).map_err(io)?;
        // The image is reopened read-only: nothing can write it by mistake.
        self.file = File::open(&self.path).map_err(io)?;
        self.overlay = Some(Overlay { file, present: vec![0; self.dirty.len()] });
        Ok(())
    }

    /// Whether writes go to an overlay.
    pub fn has_overlay(&self) -> bool {
        self.overlay.is_some()
    }

    /// The image now holds every sector the overlay holds (they were folded into it from
    /// outside: a resilient monitor's disk journal): empty the overlay, so that it holds
    /// only what is written from here on and its file gives its space back.
    pub fn overlay_folded(&mut self) -> Result<(), VirtioError> {
        let len = self.capacity_sectors * SECTOR_SIZE_BYTES;
        let path = self.path.clone();
        let Some(overlay) = &mut self.overlay else { return Ok(()) };
        let io = |source| VirtioError::Io { path: path.clone(), sector: 0, source };
        overlay.present.fill(0);
        overlay.file.set_len(0).map_err(io)?;
        overlay.file.set_len(len).map_err(io)
    }

    /// How many sectors the overlay holds (None without one).
    pub fn overlay_sectors(&self) -> Option<u64> {
        let overlay = self.overlay.as_ref()?;
        Some(overlay.present.iter().map(|w| u64::from(w.count_ones())).sum())
    }

    /// Reads whole sectors at byte `offset` (sector-aligned), each from the overlay or
    /// the image.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let Some(overlay) = &self.overlay else { return self.file.read_exact_at(buf, offset) };
        let first = offset / SECTOR_SIZE_BYTES;
        let count = buf.len() as u64 / SECTOR_SIZE_BYTES;
        let mut done = 0;
        while done < count {
            let (in_overlay, n) = overlay.run(first + done, count - done);
            let range = (done * SECTOR_SIZE_BYTES) as usize..((done + n) * SECTOR_SIZE_BYTES) as usize;
            let file = if in_overlay { &overlay.file } else { &self.file };
            file.read_exact_at(&mut buf[range], (first + done) * SECTOR_SIZE_BYTES)?;
            done += n;
        }
        Ok(())
    }

    /// Writes whole sectors at byte `offset` (sector-aligned): into the overlay if there
    /// is one, else into the image.
    fn write_at(&mut self, data: &[u8], offset: u64) -> std::io::Result<()> {
        let Some(overlay) = &mut self.overlay else { return self.file.write_all_at(data, offset) };
        overlay.mark(offset / SECTOR_SIZE_BYTES, data.len() as u64 / SECTOR_SIZE_BYTES);
        overlay.file.write_all_at(data, offset)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Make every sector zero at once (a full checkpoint's base on a backup): the
    /// file is truncated and re-extended, which leaves it sparse.
    pub fn zero_all(&mut self) -> Result<(), VirtioError> {
        let len = self.capacity_sectors * SECTOR_SIZE_BYTES;
        let path = self.path.clone();
        let io = |source| VirtioError::Io { path: path.clone(), sector: 0, source };
        if let Some(overlay) = &mut self.overlay {
            // Every sector is the overlay's now, and zero.
            overlay.present.fill(u64::MAX);
            overlay.file.set_len(0).map_err(io)?;
            return overlay.file.set_len(len).map_err(io);
        }
        self.file.set_len(0).map_err(io)?;
        self.file.set_len(len).map_err(io)
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub(super) fn features(&self) -> u64 {
        let ro = if self.read_only { FEATURE_RO } else { 0 };
        FEATURE_SEG_MAX | FEATURE_BLK_SIZE | FEATURE_FLUSH | ro
    }

    /// struct virtio_blk_config up to blk_size: capacity, size_max (unused),
    /// seg_max, geometry (unused), blk_size.
    pub(super) fn config(&self) -> Vec<u8> {
        let mut config = Vec::with_capacity(24);
        config.extend_from_slice(&self.capacity_sectors.to_le_bytes());
        config.extend_from_slice(&0u32.to_le_bytes());
        config.extend_from_slice(&SEG_MAX.to_le_bytes());
        config.extend_from_slice(&0u32.to_le_bytes());
        config.extend_from_slice(&(SECTOR_SIZE_BYTES as u32).to_le_bytes());
        config
    }

    /// Makes the next request that touches the disk (IN, OUT, FLUSH) fail with
    /// IOERR, as a failing host disk would (fault injection).
    pub fn inject_io_error(&mut self) {
        self.injected_errors = self.injected_errors.saturating_add(1);
    }

    /// Sector numbers written since the last call, ascending; clears the set.
    pub fn take_dirty_sectors(&mut self) -> Vec<u64> {
        let mut sectors = Vec::new();
        for (word_index, word) in self.dirty.iter_mut().enumerate() {
            let mut bits = std::mem::take(word);
            while bits != 0 {
                sectors.push(word_index as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
        sectors
    }

    /// The dirty-sector bitmap as it is (bit `s % 64` of word `s / 64`), read without
    /// taking it (incremental digests look at what checkpoints have not taken yet).
    pub(crate) fn dirty_bitmap(&self) -> &[u64] {
        &self.dirty
    }

    fn mark_dirty(&mut self, sector: u64, count: u64) {
        for s in sector..sector + count {
            self.dirty[(s / 64) as usize] |= 1 << (s % 64);
        }
    }

    fn check_range(&self, sector: u64, len_bytes: usize) -> Result<u64, VirtioError> {
        let count = len_bytes as u64 / SECTOR_SIZE_BYTES;
        if self.transfer_range(sector, len_bytes as u64).is_none() {
            let (path, capacity_sectors) = (self.path.clone(), self.capacity_sectors);
            return Err(VirtioError::SectorOutOfRange { path, sector, count, capacity_sectors });
        }
        Ok(count)
    }

    /// Reads whole sectors from `sector` into `buf` (checkpoints read dirty sectors).
    pub fn read_sectors(&self, sector: u64, buf: &mut [u8]) -> Result<(), VirtioError> {
        self.check_range(sector, buf.len())?;
        self.read_at(buf, sector * SECTOR_SIZE_BYTES).map_err(|source| VirtioError::Io {
            path: self.path.clone(),
            sector,
            source,
        })
    }

    /// The first sector at or after `sector` that may hold data, skipping the holes of a
    /// sparse image (lseek's SEEK_DATA), so that a scan of a large, mostly empty disk reads
    /// only what was written; None when only holes follow. An image whose file system
    /// cannot tell (or a block device) may hold data anywhere.
    pub fn next_data_sector(&self, sector: u64) -> Option<u64> {
        let Some(overlay) = &self.overlay else { return next_data_sector(&self.file, sector) };
        // With an overlay: the first sector that either file may hold data in (a sector the
        // overlay holds may be zero, like any written sector).
        let in_overlay = overlay.next_present(sector, self.capacity_sectors);
        match (next_data_sector(&self.file, sector), in_overlay) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Writes whole sectors at `sector` (the backup's side of a checkpoint); they
    /// count as dirty like the guest's own writes.
    pub fn write_sectors(&mut self, sector: u64, data: &[u8]) -> Result<(), VirtioError> {
        if self.read_only {
            return Err(VirtioError::ReadOnly { path: self.path.clone() });
        }
        let count = self.check_range(sector, data.len())?;
        self.mark_dirty(sector, count);
        self.write_at(data, sector * SECTOR_SIZE_BYTES).map_err(|source| VirtioError::Io {
            path: self.path.clone(),
            sector,
            source,
        })
    }

    /// Serves every request the driver has made available. Returns whether to
    /// interrupt the driver.
    pub(super) fn process(&mut self, queue: &mut Queue, ram: &mut GuestRam) -> Result<bool, QueueError> {
        let mut used = false;
        while let Some(chain) = queue.pop(ram)? {
            let len = self.serve(&chain, ram)?;
            queue.push_used(ram, chain.head, len)?;
            used = true;
        }
        Ok(used && queue.interrupt_wanted(ram)?)
    }

    /// Serves one request; returns the used length (data bytes written + status).
    fn serve(&mut self, chain: &Chain, ram: &mut GuestRam) -> Result<u32, QueueError> {
        let Some(status_at) = chain.writable_len().checked_sub(1) else {
            let problem = "no writable status byte";
            return Err(QueueError::MalformedRequest { head: chain.head, problem });
        };
        let Outcome { status, written } = self.execute(chain, ram, status_at)?;
        chain.write_at(ram, status_at, &[status])?;
        Ok(u32::try_from(written + 1).unwrap_or(u32::MAX))
    }

    /// Runs the request; `data_in_bytes` is the room for data before the status byte.
    fn execute(&mut self, chain: &Chain, ram: &mut GuestRam, data_in_bytes: u64) -> Result<Outcome, QueueError> {
        if chain.readable_len() < REQUEST_HEADER_BYTES {
            return status_only(S_IOERR);
        }
        let mut header = [0u8; REQUEST_HEADER_BYTES as usize];
        chain.read_at(ram, 0, &mut header)?;
        let request_type = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        let touches_disk = matches!(request_type, T_IN | T_OUT | T_FLUSH);
        if touches_disk && self.injected_errors > 0 {
            self.injected_errors -= 1;
            return status_only(S_IOERR);
        }
        match request_type {
            T_IN => self.read_request(chain, ram, sector, data_in_bytes),
            T_OUT => self.write_request(chain, ram, sector),
            T_FLUSH => status_only(self.flush()),
            T_GET_ID => {
                let n = data_in_bytes.min(DISK_ID.len() as u64);
                chain.write_at(ram, 0, &DISK_ID[..n as usize])?;
                Ok(Outcome { status: S_OK, written: n })
            }
            _ => status_only(S_UNSUPP),
        }
    }

    /// The first sector and byte length of a data transfer, if it lies on the disk.
    fn transfer_range(&self, sector: u64, len_bytes: u64) -> Option<(u64, u64)> {
        let count = len_bytes / SECTOR_SIZE_BYTES;
        let on_disk = sector.checked_add(count).is_some_and(|end| end <= self.capacity_sectors);
        (len_bytes.is_multiple_of(SECTOR_SIZE_BYTES) && on_disk).then(|| (sector * SECTOR_SIZE_BYTES, len_bytes))
    }

    fn read_request(
        &mut self,
        chain: &Chain,
        ram: &mut GuestRam,
        sector: u64,
        len: u64,
    ) -> Result<Outcome, QueueError> {
        let Some((start, len)) = self.transfer_range(sector, len) else { return status_only(S_IOERR) };
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK_BYTES as u64) as usize;
            let mut scratch = std::mem::take(&mut self.scratch);
            let read = self.read_at(&mut scratch[..n], start + done);
            self.scratch = scratch;
            if read.is_err() {
                return Ok(Outcome { status: S_IOERR, written: done });
            }
            chain.write_at(ram, done, &self.scratch[..n])?;
            done += n as u64;
        }
        Ok(Outcome { status: S_OK, written: len })
    }

    fn write_request(&mut self, chain: &Chain, ram: &GuestRam, sector: u64) -> Result<Outcome, QueueError> {
        if self.read_only {
            return status_only(S_IOERR);
        }
        let data_len = chain.readable_len() - REQUEST_HEADER_BYTES;
        let Some((start, len)) = self.transfer_range(sector, data_len) else { return status_only(S_IOERR) };
        // Marked before writing: a write that fails halfway may still have changed
        // some sectors, and a checkpoint must carry them.
        self.mark_dirty(sector, len / SECTOR_SIZE_BYTES);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK_BYTES as u64) as usize;
            chain.read_at(ram, REQUEST_HEADER_BYTES + done, &mut self.scratch[..n])?;
            let scratch = std::mem::take(&mut self.scratch);
            let written = self.write_at(&scratch[..n], start + done);
            self.scratch = scratch;
            if written.is_err() {
                return status_only(S_IOERR);
            }
            done += n as u64;
        }
        status_only(S_OK)
    }

    fn flush(&mut self) -> u8 {
        if self.read_only {
            return S_OK;
        }
        let file = self.overlay.as_ref().map_or(&self.file, |o| &o.file);
        match file.sync_data() {
            Ok(()) => S_OK,
            Err(_) => S_IOERR,
        }
    }

    pub fn state(&self) -> BlkState {
        BlkState {
            capacity_sectors: self.capacity_sectors,
            read_only: self.read_only,
            injected_errors: self.injected_errors,
        }
    }

    /// Adopts `state` if it was taken from a device with this image's geometry.
    pub fn restore(&mut self, state: BlkState) -> Result<(), VirtioError> {
        self.check_state(&state)?;
        self.injected_errors = state.injected_errors;
        Ok(())
    }

    /// Whether `state` was taken from a device with this image's geometry.
    pub fn check_state(&self, state: &BlkState) -> Result<(), VirtioError> {
        if state.capacity_sectors != self.capacity_sectors || state.read_only != self.read_only {
            let problem = format!(
                "the saved state is of a {} disk of {} sectors, {} is a {} disk of {} sectors",
                if state.read_only { "read-only" } else { "writable" },
                state.capacity_sectors,
                self.path.display(),
                if self.read_only { "read-only" } else { "writable" },
                self.capacity_sectors,
            );
            return Err(VirtioError::InvalidState { device: "block", problem });
        }
        Ok(())
    }
}

/// The first sector at or after `sector` of `file` that may hold data (SEEK_DATA).
fn next_data_sector(file: &File, sector: u64) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let Ok(offset) = i64::try_from(sector * SECTOR_SIZE_BYTES) else { return Some(sector) };
    match nix::unistd::lseek(file.as_raw_fd(), offset, nix::unistd::Whence::SeekData) {
        Ok(data) => Some((data as u64 / SECTOR_SIZE_BYTES).max(sector)),
        Err(nix::errno::Errno::ENXIO) => None,
        Err(_) => Some(sector),
    }
}

/// An anonymous file in the temporary directory: created, then unlinked at once, so it is
/// gone when the device is, whatever happens to the process.
fn tempfile_in_tmp() -> std::io::Result<File> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!(".ftvm-overlay-{}-{n}", std::process::id()));
    let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::mmio::status;
    use crate::devices::virtio::testing::*;
    use crate::devices::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};

    const HEADER: u64 = DATA;
    const BUFFER: u64 = DATA + 0x1000;
    const STATUS: u64 = DATA + 0x8000;
    /// Four sectors, each filled with its own number.
    const IMAGE_SECTORS: usize = 4;

    fn image(name: &str) -> TempImage {
        let contents: Vec<u8> = (0..IMAGE_SECTORS).flat_map(|s| [s as u8 + 1; 512]).collect();
        TempImage::new(name, &contents)
    }

    fn blk_driver(image: &TempImage, read_only: bool) -> Driver {
        Driver::setup(VirtioDevice::Blk(Blk::open(&image.path, read_only).unwrap()))
    }

    fn blk(driver: &mut Driver) -> &mut Blk {
        match driver.mmio.device_mut() {
            VirtioDevice::Blk(blk) => blk,
            _ => unreachable!(),
        }
    }

    fn header(driver: &mut Driver, request_type: u32, sector: u64) {
        let mut raw = [0u8; 16];
        raw[0..4].copy_from_slice(&request_type.to_le_bytes());
        raw[8..16].copy_from_slice(&sector.to_le_bytes());
        driver.fill(HEADER, &raw);
        driver.fill(STATUS, &[0xff]);
    }

    /// Sends one request and returns (status byte, used length).
    fn submit(driver: &mut Driver, bufs: &[Buf]) -> (u8, u32) {
        let head = driver.post(0, bufs);
        driver.notify(0);
        let used = driver.used(0);
        assert_eq!(used.len(), 1);
        assert_eq!(used[0].0, u32::from(head));
        (driver.bytes(STATUS, 1)[0], used[0].1)
    }

    fn read_sectors(driver: &mut Driver, sector: u64, len: u32) -> (u8, u32) {
        header(driver, T_IN, sector);
        submit(driver, &[readable(HEADER, 16), writable(BUFFER, len), writable(STATUS, 1)])
    }

    fn write_sectors(driver: &mut Driver, sector: u64, data: &[u8]) -> (u8, u32) {
        header(driver, T_OUT, sector);
        driver.fill(BUFFER, data);
        submit(driver, &[readable(HEADER, 16), readable(BUFFER, data.len() as u32), writable(STATUS, 1)])
    }

    #[test]
    fn offers_version_1_flush_seg_max_and_capacity_in_config() {
        let image = image("features");
        let mut driver = Driver::new(VirtioDevice::Blk(Blk::open(&image.path, false).unwrap()));
        assert_eq!(driver.read(reg::DEVICE_ID), 2);
        let features = driver.device_features();
        assert_eq!(features, VIRTIO_F_VERSION_1 | FEATURE_FLUSH | FEATURE_SEG_MAX | FEATURE_BLK_SIZE);
        assert_eq!(driver.try_read(reg::CONFIG, 8), Ok(IMAGE_SECTORS as u64));
        assert_eq!(driver.read(reg::CONFIG + 12), SEG_MAX);
        assert_eq!(driver.read(reg::CONFIG + 20), 512);
    }

    #[test]
    fn read_request_copies_sectors_into_guest_ram() {
        let image = image("read");
        let mut driver = blk_driver(&image, false);
        assert_eq!(read_sectors(&mut driver, 1, 1024), (S_OK, 1025));
        assert_eq!(driver.bytes(BUFFER, 1024), [[2u8; 512], [3u8; 512]].concat());
        assert_ne!(driver.ack_interrupt(), 0);
    }

    #[test]
    fn write_then_read_round_trips_through_the_image_file() {
        let image = image("roundtrip");
        let mut driver = blk_driver(&image, false);
        let data: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
        assert_eq!(write_sectors(&mut driver, 2, &data), (S_OK, 1));
        assert_eq!(image.contents()[1024..2048], data[..]);
        driver.fill(BUFFER, &[0; 1024]);
        assert_eq!(read_sectors(&mut driver, 2, 1024), (S_OK, 1025));
        assert_eq!(driver.bytes(BUFFER, 1024), data);
    }

    #[test]
    fn header_and_data_may_share_and_split_descriptors() {
        let image = image("split");
        let mut driver = blk_driver(&image, false);
        header(&mut driver, T_IN, 3);
        // Header split over two descriptors; data and status in one buffer.
        driver.fill(HEADER + 0x100, &driver.bytes(HEADER + 8, 8));
        let bufs = [readable(HEADER, 8), readable(HEADER + 0x100, 8), writable(BUFFER, 513)];
        let head = driver.post(0, &bufs);
        driver.notify(0);
        assert_eq!(driver.used(0), vec![(u32::from(head), 513)]);
        assert_eq!(driver.bytes(BUFFER, 513), [vec![4u8; 512], vec![S_OK]].concat());
    }

    #[test]
    fn out_of_range_sector_completes_with_ioerr() {
        let image = image("range");
        let mut driver = blk_driver(&image, false);
        assert_eq!(read_sectors(&mut driver, IMAGE_SECTORS as u64 - 1, 1024).0, S_IOERR);
        assert_eq!(read_sectors(&mut driver, u64::MAX, 512).0, S_IOERR);
        assert_eq!(write_sectors(&mut driver, IMAGE_SECTORS as u64, &[0; 512]).0, S_IOERR);
        assert_eq!(driver.status() & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn data_not_a_whole_number_of_sectors_completes_with_ioerr() {
        let image = image("partial");
        let mut driver = blk_driver(&image, false);
        assert_eq!(read_sectors(&mut driver, 0, 100).0, S_IOERR);
        assert_eq!(write_sectors(&mut driver, 0, &[9; 700]).0, S_IOERR);
        assert_eq!(image.contents()[0..512], [1u8; 512]);
    }

    #[test]
    fn read_only_disk_offers_ro_and_rejects_writes_with_ioerr() {
        let image = image("readonly");
        let mut driver = blk_driver(&image, true);
        assert_ne!(driver.mmio.driver_features() & FEATURE_RO, 0);
        assert_eq!(write_sectors(&mut driver, 0, &[9; 512]), (S_IOERR, 1));
        assert_eq!(image.contents()[0..512], [1u8; 512]);
        assert!(blk(&mut driver).take_dirty_sectors().is_empty());
        assert_eq!(read_sectors(&mut driver, 0, 512).0, S_OK);
    }

    #[test]
    fn written_sectors_are_tracked_until_taken() {
        let image = image("dirty");
        let mut driver = blk_driver(&image, false);
        write_sectors(&mut driver, 3, &[1; 512]);
        write_sectors(&mut driver, 0, &[2; 1024]);
        write_sectors(&mut driver, 1, &[3; 512]);
        read_sectors(&mut driver, 2, 512);
        assert_eq!(blk(&mut driver).take_dirty_sectors(), vec![0, 1, 3]);
        assert!(blk(&mut driver).take_dirty_sectors().is_empty());
    }

    #[test]
    fn flush_get_id_and_unknown_requests_answer_as_the_spec_says() {
        let image = image("misc");
        let mut driver = blk_driver(&image, false);
        header(&mut driver, T_FLUSH, 0);
        assert_eq!(submit(&mut driver, &[readable(HEADER, 16), writable(STATUS, 1)]), (S_OK, 1));
        header(&mut driver, T_GET_ID, 0);
        let id = submit(&mut driver, &[readable(HEADER, 16), writable(BUFFER, 20), writable(STATUS, 1)]);
        assert_eq!(id, (S_OK, 21));
        assert_eq!(driver.bytes(BUFFER, 20), DISK_ID);
        header(&mut driver, 11, 0); // DISCARD, not offered
        assert_eq!(submit(&mut driver, &[readable(HEADER, 16), writable(STATUS, 1)]).0, S_UNSUPP);
    }

    #[test]
    fn a_short_header_completes_with_ioerr() {
        let image = image("short");
        let mut driver = blk_driver(&image, false);
        header(&mut driver, T_IN, 0);
        assert_eq!(submit(&mut driver, &[readable(HEADER, 8), writable(STATUS, 1)]).0, S_IOERR);
    }

    #[test]
    fn a_request_without_a_status_byte_needs_reset() {
        let image = image("nostatus");
        let mut driver = blk_driver(&image, false);
        header(&mut driver, T_IN, 0);
        driver.post(0, &[readable(HEADER, 16)]);
        driver.notify(0);
        assert_ne!(driver.status() & status::DEVICE_NEEDS_RESET, 0);
        assert!(matches!(driver.mmio.fault(), Some(QueueError::MalformedRequest { .. })));
    }

    #[test]
    fn an_injected_host_error_fails_the_next_disk_request_only() {
        let image = image("inject");
        let mut driver = blk_driver(&image, false);
        blk(&mut driver).inject_io_error();
        assert_eq!(read_sectors(&mut driver, 0, 512).0, S_IOERR);
        assert_eq!(read_sectors(&mut driver, 0, 512).0, S_OK);
    }

    #[test]
    fn dma_marks_exactly_the_written_ram_pages_dirty() {
        let image = image("dma");
        let mut driver = blk_driver(&image, false);
        header(&mut driver, T_IN, 0);
        driver.ram.take_dirty_pages();
        let data_page = BUFFER + 0x1f00; // 512 bytes crossing into the next page
        let head = driver.post(0, &[readable(HEADER, 16), writable(data_page, 512), writable(STATUS, 1)]);
        let (_, _, used) = rings(0);
        driver.ram.take_dirty_pages(); // forget the driver's own ring writes
        driver.notify(0);
        assert_eq!(driver.used(0), vec![(u32::from(head), 513)]);
        let page = |addr: u64| ((addr - RAM_BASE) / 4096) as usize;
        let mut expected = vec![page(data_page), page(data_page) + 1, page(STATUS), page(used)];
        expected.sort_unstable();
        assert_eq!(driver.ram.take_dirty_pages(), expected);
    }

    #[test]
    fn open_refuses_missing_files_and_partial_sectors_naming_the_file() {
        let odd = TempImage::new("odd", &[0; 1000]);
        let error = Blk::open(&odd.path, false).unwrap_err().to_string();
        assert!(error.contains(&odd.path.display().to_string()) && error.contains("1000 bytes"), "{error}");
        let missing = std::env::temp_dir().join("ftvm-virtio-no-such-image.img");
        let error = Blk::open(&missing, true).unwrap_err().to_string();
        assert!(error.starts_with("cannot open disk image") && error.contains("no-such-image"), "{error}");
    }

    #[test]
    fn sector_access_for_checkpoints_reads_and_writes_whole_sectors() {
        let image = image("sectors");
        let mut blk = Blk::open(&image.path, false).unwrap();
        let mut buf = [0u8; 512];
        blk.read_sectors(2, &mut buf).unwrap();
        assert_eq!(buf, [3u8; 512]);
        blk.write_sectors(1, &[7; 512]).unwrap();
        assert_eq!(blk.take_dirty_sectors(), vec![1]);
        assert!(blk.read_sectors(4, &mut buf).is_err());
        assert!(blk.write_sectors(0, &[0; 100]).is_err());
    }

    #[test]
    fn an_overlay_takes_the_guests_writes_and_leaves_the_image_as_it_was() {
        let image = image("overlay");
        let before = image.contents();
        let mut driver = blk_driver(&image, false);
        blk(&mut driver).start_overlay().unwrap();
        assert!(blk(&mut driver).has_overlay());
        // Sectors 1 and 2 written, then a read across all four mixes overlay and image.
        assert_eq!(write_sectors(&mut driver, 1, &[[0xa1u8; 512], [0xa2; 512]].concat()).0, S_OK);
        assert_eq!(read_sectors(&mut driver, 0, 2048), (S_OK, 2049));
        let expected: Vec<u8> = [[1u8; 512], [0xa1; 512], [0xa2; 512], [4; 512]].concat();
        assert_eq!(driver.bytes(BUFFER, 2048), expected);
        assert_eq!(image.contents(), before, "the image is never written");
        // Checkpoint access and the flush go through the overlay as well.
        let mut buf = [0u8; 512];
        blk(&mut driver).write_sectors(3, &[0xa3; 512]).unwrap();
        blk(&mut driver).read_sectors(3, &mut buf).unwrap();
        assert_eq!(buf, [0xa3; 512]);
        assert_eq!(blk(&mut driver).flush(), S_OK);
        assert_eq!(image.contents(), before);
    }

    #[test]
    fn an_overlay_zeroed_reads_zero_and_tells_where_data_may_be() {
        let image = image("overlay-zero");
        let mut blk = Blk::open(&image.path, false).unwrap();
        blk.start_overlay().unwrap();
        blk.zero_all().unwrap();
        let mut buf = [0xffu8; 2048];
        blk.read_sectors(0, &mut buf).unwrap();
        assert_eq!(buf, [0u8; 2048]);
        assert_eq!(blk.next_data_sector(2), Some(2), "every sector is the overlay's");
        assert_eq!(image.contents()[..512], [1u8; 512]);
    }

    #[test]
    fn restored_device_behaves_identically() {
        let image = image("snap");
        let mut driver = blk_driver(&image, false);
        write_sectors(&mut driver, 0, &[5; 512]);
        blk(&mut driver).inject_io_error();
        let twin_image = image.copy("snap-twin");
        let mut twin = driver.restored_copy(VirtioDevice::Blk(Blk::open(&twin_image.path, false).unwrap()));
        for d in [&mut driver, &mut twin] {
            assert_eq!(read_sectors(d, 0, 512).0, S_IOERR);
            assert_eq!(read_sectors(d, 0, 1024), (S_OK, 1025));
            assert_eq!(write_sectors(d, 3, &[8; 512]), (S_OK, 1));
        }
        assert_eq!(driver.mmio.state(), twin.mmio.state());
        assert_eq!(driver.ram.as_slice(), twin.ram.as_slice());
        assert_eq!(image.contents(), twin_image.contents());
    }

    #[test]
    fn restore_refuses_a_disk_of_another_size() {
        let image = image("size-a");
        let other = TempImage::new("size-b", &[0; 512]);
        let driver = blk_driver(&image, false);
        let mut mmio =
            crate::devices::virtio::VirtioMmio::new(VirtioDevice::Blk(Blk::open(&other.path, false).unwrap()));
        let error = mmio.restore(driver.mmio.state()).unwrap_err().to_string();
        assert!(error.contains("4 sectors"), "{error}");
    }
}
