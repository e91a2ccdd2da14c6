//! Snapshot files: the whole machine — RAM, the disk's contents, the hart's and the
//! devices' state, the inputs queued for later — in one versioned, checksummed file,
//! and a machine rebuilt from it that continues exactly (DESIGN.md §6).
//!
//! # Format, version 4 (every integer little-endian)
//!
//! A 140-byte header, then a body of sections.
//!
//! | offset | bytes | header field |
//! |---:|---:|---|
//! | 0 | 8 | magic `FTVMSNAP` |
//! | 8 | 4 | format version, 4 |
//! | 12 | 4 | header length, 140 (its checksum included) |
//! | 16 | 8 | body length |
//! | 24 | 4 | CRC32C of the body |
//! | 28 | 4 | devices: bit 0 disk, bit 1 disk read-only, bit 2 network card |
//! | 32 | 8 | icount |
//! | 40 | 8 | RAM size in bytes |
//! | 48 | 8 | instructions per timer tick, as configured (the rate now is in `STAT`) |
//! | 56 | 8 | disk size in 512-byte sectors (0 without a disk) |
//! | 64 | 8 | network card's MAC, then two zero bytes (all zero without a card) |
//! | 72 | 8 | RAM pages saved (the non-zero ones) |
//! | 80 | 8 | disk sectors saved (the non-zero ones) |
//! | 88 | 32 | configuration digest ([`config_digest`]) |
//! | 120 | 16 | machine digest ([`Machine::digest`]) when the snapshot was taken |
//! | 136 | 4 | CRC32C of header bytes 0..136 |
//!
//! In every version the header starts with the magic, the version and the header's
//! length, and ends with a CRC32C of the rest: so any later file is recognised and
//! refused (or converted) by version, naming both versions.
//!
//! | body section | payload |
//! |---|---|
//! | `STAT` | the [`MachineState`]: hart, UART, PLIC, RTC (its base time: the boot time), clock rate, reboots and the kernel command line a reboot boots with, virtio transports and devices, pending inputs, end of run |
//! | `RAM\0` | unit size u32 = 4096, unit count u64 = RAM pages, then extents |
//! | `DISK` | (with a disk only) unit size u32 = 512, unit count u64 = disk sectors, then extents |
//!
//! Each section is `tag u32 | payload length u64 | payload | CRC32C u32` (the checksum
//! covers tag, length and payload), in the order above. An extent is `first unit u64 |
//! count u32 | count × unit bytes`, for runs of at most [`MAX_EXTENT_UNITS`] non-zero
//! units in ascending order; units in no extent are zero.
//!
//! # Decisions
//!
//! - Reading trusts nothing: every length is checked against a cap and against what is
//!   left before anything is allocated (the state section grows its buffer only as
//!   bytes arrive); any problem is a typed error naming it, with the byte offset.
//! - Restoring writes the snapshot's disk contents into the disk image the
//!   configuration names: disk contents are state (DESIGN.md §2), so a machine cannot
//!   continue exactly on any other contents. A disk of another size is refused.
//! - Reading makes two passes, so it needs `Seek`: the first reads and checks the whole
//!   file (every checksum, every structure, the state decoded) and builds nothing; only
//!   then is the machine built and the file read again for RAM and the disk. So a
//!   damaged or truncated file never touches the disk. Disk sectors that already
//!   match are not rewritten; a read-only disk must already hold the snapshot's
//!   contents. The restored machine is checked against the header's machine digest;
//!   a file whose checksums hold but whose contents disagree with that digest (a bug
//!   or a forgery: damage cannot do it) is refused only after its disk was written.
//! - Not saved: outputs not yet drained (drain them first: they belong to the outside
//!   world), the dirty page and sector sets (a restored machine starts with none, like a
//!   new one), and the kernel and initrd, which shaped the RAM that the snapshot carries
//!   and which a reboot loads from the configuration it was restored with. The command
//!   line is saved: a restored VM reboots into the command it ran (`ftvm restore` is
//!   not given it). Restoring builds a machine from a configuration with the same RAM
//!   size, timer rate and devices, as [`config_digest`] covers.
//! - Writing needs `Seek` too: the header, which carries the body's length and
//!   checksum, is written last. [`save_to_path`] writes a temporary file, syncs it and
//!   renames it, so a crash never leaves a torn snapshot at the final path.

mod codec;
mod config;
mod extents;
mod files;
mod header;
mod read;
mod restore;
mod state;
mod write;

pub use config::config_digest;
pub use files::{load_from_path, read_header_from_path, save_to_path};
pub use read::read_header;
pub use restore::read_snapshot;
pub use state::{decode_machine_state, encode_machine_state};
pub use write::write_snapshot;

use crate::devices::uart::RX_QUEUE_CAP;
use crate::devices::virtio::blk::SECTOR_SIZE_BYTES;
use crate::devices::virtio::net::{MAX_FRAME_BYTES, RX_PENDING_MAX_FRAMES};
use crate::devices::virtio::rng::POOL_MAX_BYTES;
use crate::machine::{Digest, MachineError, RestoreError, MAX_BOOTARGS_BYTES};
use bounded_reader::ReadError;
use config::BoardShape;
use std::fmt;
use std::path::PathBuf;
use thiserror::Error;

pub const MAGIC: [u8; 8] = *b"FTVMSNAP";
/// The format this code writes and reads. Version 2 added the RTC and the clock rate
/// to the state section, version 3 the reboot count and the kernel command line, version
/// 4 changed nothing in the layout but the machine digest's definition (region digests,
/// [`crate::digest`]); the header is version 1's.
pub const FORMAT_VERSION: u32 = 4;
/// The header's length (versions 1 to 4).
pub const HEADER_BYTES: usize = 140;
/// The longest header any version may have (read before its checksum can be checked).
pub const MAX_HEADER_BYTES: u32 = 64 * 1024;
/// The largest state section (hart, devices, pending inputs): the network card's
/// pending frames alone may take 17 MB.
pub const MAX_STATE_BYTES: u64 = 64 << 20;
/// The largest payload of one pending input (a network frame is at most 64 KiB plus
/// headers; console and entropy inputs are far smaller).
pub const MAX_INPUT_BYTES: usize = 128 << 10;
/// The most units (pages or sectors) in one extent: the reader's buffer is this many
/// pages, 1 MiB.
pub const MAX_EXTENT_UNITS: u32 = 256;

const PAGE_BYTES: usize = 4096;
const SECTOR_BYTES: usize = SECTOR_SIZE_BYTES as usize;
/// The most queues a transport's state may list (the devices have one or two).
const MAX_QUEUES: usize = 8;
/// The smallest header of any version: magic, version, length, checksum.
const MIN_HEADER_BYTES: u32 = 20;
/// Header bytes covered by the header checksum.
const HEADER_CRC_AT: usize = HEADER_BYTES - 4;
const SECTION_HEADER_BYTES: u64 = 12;
const EXTENT_HEADER_BYTES: u64 = 12;

const TAG_STATE: u32 = u32::from_le_bytes(*b"STAT");
const TAG_RAM: u32 = u32::from_le_bytes(*b"RAM\0");
const TAG_DISK: u32 = u32::from_le_bytes(*b"DISK");

const DEVICE_DISK: u32 = 1 << 0;
const DEVICE_DISK_READ_ONLY: u32 = 1 << 1;
const DEVICE_NET: u32 = 1 << 2;

const _: () = assert!(PAGE_BYTES as u64 == rv64::mem::PAGE_SIZE);
const _: () = assert!(MAX_HEADER_BYTES as usize >= HEADER_BYTES && MIN_HEADER_BYTES as usize <= HEADER_BYTES);
const _: () = assert!(MAX_INPUT_BYTES >= MAX_FRAME_BYTES + 64);
const _: () = assert!(
    (MAX_STATE_BYTES as usize)
        > RX_PENDING_MAX_FRAMES * (MAX_FRAME_BYTES + 4) + RX_QUEUE_CAP + POOL_MAX_BYTES + MAX_BOOTARGS_BYTES
);

#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("not an ftvm snapshot: it starts with {found:02x?}, not \"FTVMSNAP\"")]
    NotASnapshot { found: Vec<u8> },
    #[error(
        "snapshot format version {found}, this ftvm reads version {supported}{}",
        if *header_intact { "" } else { " (and the header's checksum does not match: the file may be damaged)" }
    )]
    UnsupportedVersion { found: u32, supported: u32, header_intact: bool },
    #[error("snapshot truncated at byte {offset} (reading {what})")]
    Truncated { offset: u64, what: &'static str },
    #[error(
        "snapshot is damaged: the {what} checksum at byte {offset} is {stored:#010x}, the data's is {computed:#010x}"
    )]
    Checksum { what: &'static str, offset: u64, stored: u32, computed: u32 },
    #[error("malformed snapshot at byte {offset}: {problem}")]
    Malformed { offset: u64, problem: String },
    #[error("malformed machine state")]
    State(#[from] ReadError),
    #[error("cannot snapshot this machine: {what} is {found}, more than the {max} a snapshot holds")]
    TooLarge { what: String, found: u64, max: u64 },
    #[error("the snapshot does not fit this configuration: {what}: the snapshot has {snapshot}, the configuration has {configured}")]
    ConfigMismatch { what: &'static str, snapshot: String, configured: String },
    #[error("cannot build the machine to restore into")]
    Machine(#[from] MachineError),
    #[error("cannot restore the snapshot")]
    Restore(#[from] RestoreError),
    #[error("disk image {path} is attached read-only and differs from the snapshot's disk at sector {sector}")]
    ReadOnlyDiskDiffers { path: PathBuf, sector: u64 },
    #[error("the snapshot changed while it was read (a section no longer matches what was checked); disk image {path} may be partly restored")]
    ChangedWhileReading { path: PathBuf },
    #[error("the restored machine's digest {restored} differs from the saved machine's {saved}")]
    DigestMismatch { saved: Digest, restored: Digest },
    #[error("refusing to write the snapshot over the machine's own disk image {0}")]
    OverDisk(PathBuf),
    #[error("I/O error {op}")]
    Io { op: &'static str, source: std::io::Error },
    #[error("{path}")]
    File { path: PathBuf, source: Box<SnapshotError> },
}

type Result<T, E = SnapshotError> = std::result::Result<T, E>;

fn io_error(op: &'static str) -> impl FnOnce(std::io::Error) -> SnapshotError {
    move |source| SnapshotError::Io { op, source }
}

fn malformed(offset: u64, problem: impl Into<String>) -> SnapshotError {
    SnapshotError::Malformed { offset, problem: problem.into() }
}

/// The disk a snapshot was taken with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotDisk {
    pub sectors: u64,
    pub read_only: bool,
}

/// What a snapshot file holds, from its header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub format_version: u32,
    pub icount: u64,
    pub ram_bytes: u64,
    pub icount_per_tick: u64,
    pub disk: Option<SnapshotDisk>,
    pub net_mac: Option<[u8; 6]>,
    pub ram_pages_saved: u64,
    pub disk_sectors_saved: u64,
    pub config_digest: [u8; 32],
    pub machine_digest: Digest,
    pub body_bytes: u64,
    pub body_crc32c: u32,
}

impl SnapshotInfo {
    /// The file's length: header and body.
    pub fn file_bytes(&self) -> u64 {
        HEADER_BYTES as u64 + self.body_bytes
    }

    fn shape(&self) -> BoardShape {
        BoardShape {
            ram_bytes: self.ram_bytes,
            icount_per_tick: self.icount_per_tick,
            disk_read_only: self.disk.map(|d| d.read_only),
            net_mac: self.net_mac,
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

impl fmt::Display for SnapshotInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "ftvm snapshot, format version {}", self.format_version)?;
        writeln!(f, "icount          {}", self.icount)?;
        writeln!(f, "RAM             {} MiB ({} non-zero pages saved)", self.ram_bytes >> 20, self.ram_pages_saved)?;
        match &self.disk {
            Some(d) => {
                let access = if d.read_only { "read-only" } else { "writable" };
                writeln!(
                    f,
                    "disk            {} sectors, {access} ({} non-zero sectors saved)",
                    d.sectors, self.disk_sectors_saved
                )?
            }
            None => writeln!(f, "disk            none")?,
        }
        match &self.net_mac {
            Some(mac) => writeln!(f, "network card    MAC {}", mac_text(mac))?,
            None => writeln!(f, "network card    none")?,
        }
        writeln!(f, "timer           {} instructions per tick", self.icount_per_tick)?;
        writeln!(f, "config digest   {}", hex(&self.config_digest))?;
        writeln!(f, "machine digest  {}", self.machine_digest)?;
        write!(f, "size            {} bytes", self.file_bytes())
    }
}
