//! Snapshot files: the whole machine — RAM, the disk's contents, the hart's and the
//! devices' state, the inputs queued for later — in one versioned, checksummed file,
//! and a machine rebuilt from it that continues exactly (DESIGN.md §6).
//!
//! # Format, version 1 (every integer little-endian)
//!
//! A 140-byte header, then a body of sections.
//!
//! | offset | bytes | header field |
//! |---:|---:|---|
//! | 0 | 8 | magic `FTVMSNAP` |
//! | 8 | 4 | format version, 1 |
//! | 12 | 4 | header length, 140 (its checksum included) |
//! | 16 | 8 | body length |
//! | 24 | 4 | CRC32C of the body |
//! | 28 | 4 | devices: bit 0 disk, bit 1 disk read-only, bit 2 network card |
//! | 32 | 8 | icount |
//! | 40 | 8 | RAM size in bytes |
//! | 48 | 8 | instructions per timer tick |
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
//! | `STAT` | the [`MachineState`]: hart, UART, PLIC, virtio transports and devices, pending inputs, end of run |
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
//!   new one), and the kernel, initrd and command line, which only shaped the initial
//!   RAM that the snapshot carries. Restoring builds a machine from a configuration
//!   with the same RAM size, timer rate and devices, as [`config_digest`] covers.
//! - Writing needs `Seek` too: the header, which carries the body's length and
//!   checksum, is written last. [`save_to_path`] writes a temporary file, syncs it and
//!   renames it, so a crash never leaves a torn snapshot at the final path.

use crate::board::VIRTIO_SLOTS;
use crate::devices::plic::{PlicState, NUM_CONTEXTS, NUM_SOURCES};
use crate::devices::uart::{UartState, RX_QUEUE_CAP};
use crate::devices::virtio::blk::{Blk, BlkState, SECTOR_SIZE_BYTES};
use crate::devices::virtio::net::{NetState, NetStats, MAX_FRAME_BYTES, RX_PENDING_MAX_FRAMES};
use crate::devices::virtio::rng::{RngState, POOL_MAX_BYTES};
use crate::devices::virtio::{Queue, VirtioDeviceState, VirtioMmioState, DEVICE_ID_BLK, DEVICE_ID_NET, DEVICE_ID_RNG};
use crate::io::{Input, InputKind};
use crate::machine::{
    Digest, Machine, MachineConfig, MachineError, MachineState, RestoreError, RunExit, MAX_PENDING_INPUTS,
    MAX_RAM_BYTES, MIN_RAM_BYTES,
};
use rv64::{HartState, PrivMode};
use std::fmt;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use thiserror::Error;

pub const MAGIC: [u8; 8] = *b"FTVMSNAP";
/// The format this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The version 1 header's length.
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
const _: () =
    assert!((MAX_STATE_BYTES as usize) > RX_PENDING_MAX_FRAMES * (MAX_FRAME_BYTES + 4) + RX_QUEUE_CAP + POOL_MAX_BYTES);

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
    #[error("cannot snapshot this machine: {what} is {found}, more than the {max} a snapshot holds")]
    TooLarge { what: String, found: u64, max: u64 },
    #[error("the snapshot does not fit this configuration: {what}: the snapshot has {snapshot}, the configuration has {configured}")]
    ConfigMismatch { what: &'static str, snapshot: String, configured: String },
    #[error("cannot build the machine to restore into: {0}")]
    Machine(#[from] MachineError),
    #[error("cannot restore the snapshot: {0}")]
    Restore(#[from] RestoreError),
    #[error("disk image {path} is attached read-only and differs from the snapshot's disk at sector {sector}")]
    ReadOnlyDiskDiffers { path: PathBuf, sector: u64 },
    #[error("the snapshot changed while it was read (a section no longer matches what was checked); disk image {path} may be partly restored")]
    ChangedWhileReading { path: PathBuf },
    #[error("the restored machine's digest {restored} differs from the saved machine's {saved}")]
    DigestMismatch { saved: Digest, restored: Digest },
    #[error("refusing to write the snapshot over the machine's own disk image {0}")]
    OverDisk(PathBuf),
    #[error("snapshot I/O error ({op}): {source}")]
    Io { op: &'static str, source: std::io::Error },
    #[error("{path}: {source}")]
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

// ---------------------------------------------------------------------------------------
// The configuration digest.

/// What a snapshot needs of the machine it is restored into, beyond what it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BoardShape {
    ram_bytes: u64,
    icount_per_tick: u64,
    /// `Some(read_only)` with a disk.
    disk_read_only: Option<bool>,
    net_mac: Option<[u8; 6]>,
}

impl BoardShape {
    fn of_config(config: &MachineConfig) -> BoardShape {
        BoardShape {
            ram_bytes: config.ram_size,
            // Machine::new runs a rate of 0 as 1.
            icount_per_tick: config.icount_per_tick.max(1),
            disk_read_only: config.disk.as_ref().map(|d| d.read_only),
            net_mac: config.net_mac,
        }
    }

    fn of_machine(machine: &Machine, state: &MachineState) -> BoardShape {
        let blk = state.virtio.iter().find_map(|d| match &d.device {
            VirtioDeviceState::Blk(b) => Some(b),
            _ => None,
        });
        let net = state.virtio.iter().find_map(|d| match &d.device {
            VirtioDeviceState::Net(n) => Some(n.mac),
            _ => None,
        });
        BoardShape {
            ram_bytes: machine.ram().size(),
            icount_per_tick: machine.hart().config.icount_per_tick,
            disk_read_only: blk.map(|b| b.read_only),
            net_mac: net,
        }
    }

    fn digest(&self) -> [u8; 32] {
        use sha2::{Digest as _, Sha256};
        let mut h = Sha256::new();
        h.update(b"ftvm machine configuration v1\0");
        h.update(self.ram_bytes.to_le_bytes());
        h.update(self.icount_per_tick.to_le_bytes());
        h.update([match self.disk_read_only {
            None => 0,
            Some(false) => 1,
            Some(true) => 2,
        }]);
        match self.net_mac {
            Some(mac) => h.update([[1].as_slice(), &mac].concat()),
            None => h.update([0]),
        }
        h.finalize().into()
    }
}

/// A digest of the parts of a configuration that shape the machine after boot: RAM
/// size, timer rate, and the devices (disk and whether it is read-only, network card
/// and its MAC). Not the kernel, initrd or command line: they only shape the initial
/// RAM, which a snapshot or a full checkpoint carries; a peer that needs the same
/// initial image (lockstep from boot) must compare the image as well.
pub fn config_digest(config: &MachineConfig) -> [u8; 32] {
    BoardShape::of_config(config).digest()
}

// ---------------------------------------------------------------------------------------
// Encoding primitives.

/// Appends little-endian fields to a buffer.
#[derive(Default)]
struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    fn bool(&mut self, v: bool) {
        self.u8(u8::from(v));
    }
    fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn raw(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// A count, refused (as the reader would refuse it) above `max`.
    fn count(&mut self, n: usize, max: usize, what: &str) -> Result<()> {
        if n > max {
            return Err(SnapshotError::TooLarge { what: what.to_string(), found: n as u64, max: max as u64 });
        }
        self.u32(n as u32);
        Ok(())
    }

    fn bytes(&mut self, data: &[u8], max: usize, what: &str) -> Result<()> {
        self.count(data.len(), max, what)?;
        self.raw(data);
        Ok(())
    }
}

/// Reads little-endian fields from a checked section, every read bounded by what is
/// left; errors carry the file offset.
struct Decoder<'a> {
    buf: &'a [u8],
    pos: usize,
    /// File offset of `buf[0]`.
    base: u64,
}

impl<'a> Decoder<'a> {
    fn new(buf: &'a [u8], base: u64) -> Decoder<'a> {
        Decoder { buf, pos: 0, base }
    }

    fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    fn error(&self, problem: impl Into<String>) -> SnapshotError {
        malformed(self.offset(), problem)
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.error(format!("the state ends inside {what}")));
        }
        let bytes = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N, what)?.try_into().expect("took N bytes"))
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn bool(&mut self, what: &str) -> Result<bool> {
        let at = self.offset();
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(malformed(at, format!("{what} is {other}, not 0 or 1"))),
        }
    }

    /// A count of items of at least `min_item_bytes` each: at most `max`, and no more
    /// than the bytes left could hold, so allocating for it is safe.
    fn count(&mut self, max: usize, min_item_bytes: usize, what: &str) -> Result<usize> {
        let at = self.offset();
        let n = self.u32(what)? as usize;
        if n > max {
            return Err(malformed(at, format!("{what}: {n}, at most {max}")));
        }
        if n.saturating_mul(min_item_bytes) > self.remaining() {
            return Err(malformed(at, format!("{what}: {n}, but only {} bytes of state are left", self.remaining())));
        }
        Ok(n)
    }

    fn bytes(&mut self, max: usize, what: &str) -> Result<Vec<u8>> {
        let n = self.count(max, 1, what)?;
        Ok(self.take(n, what)?.to_vec())
    }

    fn u32s<const N: usize>(&mut self, what: &str) -> Result<[u32; N]> {
        let mut out = [0; N];
        for v in &mut out {
            *v = self.u32(what)?;
        }
        Ok(out)
    }

    fn u64s<const N: usize>(&mut self, what: &str) -> Result<[u64; N]> {
        let mut out = [0; N];
        for v in &mut out {
            *v = self.u64(what)?;
        }
        Ok(out)
    }

    fn finish(&self) -> Result<()> {
        if self.remaining() != 0 {
            return Err(self.error(format!("{} bytes after the end of the state", self.remaining())));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// The state section. Structs are destructured whole, so that a field added to any of
// them fails to compile here until the format (and FORMAT_VERSION) takes it in.

fn encode_state(state: &MachineState) -> Result<Vec<u8>> {
    let MachineState { hart, uart, plic, virtio, pending_inputs, ended } = state;
    let mut e = Encoder::default();
    encode_hart(&mut e, hart);
    encode_uart(&mut e, uart)?;
    encode_plic(&mut e, plic);
    e.count(virtio.len(), VIRTIO_SLOTS, "virtio devices")?;
    for device in virtio {
        encode_virtio(&mut e, device)?;
    }
    e.count(pending_inputs.len(), MAX_PENDING_INPUTS, "pending inputs")?;
    for input in pending_inputs {
        encode_input(&mut e, input)?;
    }
    encode_ended(&mut e, ended);
    if e.buf.len() as u64 > MAX_STATE_BYTES {
        return Err(SnapshotError::TooLarge {
            what: "the machine state".into(),
            found: e.buf.len() as u64,
            max: MAX_STATE_BYTES,
        });
    }
    Ok(e.buf)
}

fn decode_state(d: &mut Decoder) -> Result<MachineState> {
    let hart = decode_hart(d)?;
    let uart = decode_uart(d)?;
    let plic = decode_plic(d)?;
    let count = d.count(VIRTIO_SLOTS, 1, "virtio devices")?;
    let virtio = (0..count).map(|_| decode_virtio(d)).collect::<Result<Vec<_>>>()?;
    let count = d.count(MAX_PENDING_INPUTS, 9, "pending inputs")?;
    let mut pending_inputs = Vec::with_capacity(count);
    let mut earliest = hart.icount;
    for _ in 0..count {
        let at = d.offset();
        let input = decode_input(d)?;
        // The machine's queue is in stamp order and never holds the past.
        if input.icount < earliest {
            return Err(malformed(
                at,
                format!("pending input stamped {} comes before icount {earliest}", input.icount),
            ));
        }
        earliest = input.icount;
        pending_inputs.push(input);
    }
    let ended = decode_ended(d)?;
    d.finish()?;
    Ok(MachineState { hart, uart, plic, virtio, pending_inputs, ended })
}

fn encode_hart(e: &mut Encoder, hart: &HartState) {
    let HartState {
        x,
        f,
        pc,
        privilege,
        icount,
        time_offset_ticks,
        cycle_offset,
        instret_offset,
        mtimecmp,
        stimecmp,
        reservation,
        wfi,
        hart_id,
        fcsr,
        mstatus,
        medeleg,
        mideleg,
        mie,
        mip,
        mtvec,
        mscratch,
        mepc,
        mcause,
        mtval,
        mcounteren,
        menvcfg,
        stvec,
        sscratch,
        sepc,
        scause,
        stval,
        satp,
        scounteren,
        senvcfg,
    } = hart;
    for v in x.iter().chain(f.iter()) {
        e.u64(*v);
    }
    e.u64(*pc);
    e.u8(*privilege as u8);
    for v in [icount, time_offset_ticks, cycle_offset, instret_offset, mtimecmp, stimecmp] {
        e.u64(*v);
    }
    e.bool(reservation.is_some());
    e.u64(reservation.unwrap_or(0));
    e.bool(*wfi);
    let csrs = [
        hart_id, fcsr, mstatus, medeleg, mideleg, mie, mip, mtvec, mscratch, mepc, mcause, mtval, mcounteren, menvcfg,
        stvec, sscratch, sepc, scause, stval, satp, scounteren, senvcfg,
    ];
    for v in csrs {
        e.u64(*v);
    }
}

fn decode_hart(d: &mut Decoder) -> Result<HartState> {
    let x: [u64; 32] = d.u64s("the integer registers")?;
    if x[0] != 0 {
        return Err(d.error(format!("register x0 holds {:#x}, not 0", x[0])));
    }
    let f = d.u64s("the floating-point registers")?;
    let pc = d.u64("pc")?;
    let at = d.offset();
    let privilege = match d.u8("the privilege mode")? {
        0 => PrivMode::User,
        1 => PrivMode::Supervisor,
        3 => PrivMode::Machine,
        other => return Err(malformed(at, format!("privilege mode {other} does not exist"))),
    };
    let [icount, time_offset_ticks, cycle_offset, instret_offset, mtimecmp, stimecmp] =
        d.u64s("the hart's counters")?;
    let reserved = d.bool("the reservation flag")?;
    let address = d.u64("the reservation address")?;
    let reservation = reserved.then_some(address);
    let wfi = d.bool("the WFI flag")?;
    let [hart_id, fcsr, mstatus, medeleg, mideleg, mie, mip, mtvec, mscratch, mepc, mcause, mtval, mcounteren, menvcfg, stvec, sscratch, sepc, scause, stval, satp, scounteren, senvcfg] =
        d.u64s("the CSRs")?;
    Ok(HartState {
        x,
        f,
        pc,
        privilege,
        icount,
        time_offset_ticks,
        cycle_offset,
        instret_offset,
        mtimecmp,
        stimecmp,
        reservation,
        wfi,
        hart_id,
        fcsr,
        mstatus,
        medeleg,
        mideleg,
        mie,
        mip,
        mtvec,
        mscratch,
        mepc,
        mcause,
        mtval,
        mcounteren,
        menvcfg,
        stvec,
        sscratch,
        sepc,
        scause,
        stval,
        satp,
        scounteren,
        senvcfg,
    })
}

fn encode_uart(e: &mut Encoder, uart: &UartState) -> Result<()> {
    let UartState { ier, lcr, mcr, scr, dll, dlm, fcr, thre_pending, rx, rx_dropped } = uart;
    e.raw(&[*ier, *lcr, *mcr, *scr, *dll, *dlm, *fcr]);
    e.bool(*thre_pending);
    let (a, b) = rx.as_slices();
    e.count(rx.len(), RX_QUEUE_CAP, "UART receive queue bytes")?;
    e.raw(a);
    e.raw(b);
    e.u64(*rx_dropped);
    Ok(())
}

fn decode_uart(d: &mut Decoder) -> Result<UartState> {
    let [ier, lcr, mcr, scr, dll, dlm, fcr] = d.array("the UART registers")?;
    let thre_pending = d.bool("the UART's THR-empty flag")?;
    let rx = d.bytes(RX_QUEUE_CAP, "UART receive queue bytes")?.into();
    let rx_dropped = d.u64("the UART's dropped count")?;
    Ok(UartState { ier, lcr, mcr, scr, dll, dlm, fcr, thre_pending, rx, rx_dropped })
}

fn encode_plic(e: &mut Encoder, plic: &PlicState) {
    let PlicState { priority, pending, in_service, level, enable, threshold } = plic;
    for v in priority.iter().chain([pending, in_service, level]).chain(enable).chain(threshold) {
        e.u32(*v);
    }
}

fn decode_plic(d: &mut Decoder) -> Result<PlicState> {
    let priority: [u32; NUM_SOURCES] = d.u32s("the PLIC priorities")?;
    let [pending, in_service, level] = d.u32s("the PLIC lines")?;
    let enable: [u32; NUM_CONTEXTS] = d.u32s("the PLIC enables")?;
    let threshold: [u32; NUM_CONTEXTS] = d.u32s("the PLIC thresholds")?;
    Ok(PlicState { priority, pending, in_service, level, enable, threshold })
}

fn encode_virtio(e: &mut Encoder, state: &VirtioMmioState) -> Result<()> {
    let VirtioMmioState {
        status,
        device_features_sel,
        driver_features_sel,
        driver_features,
        queue_sel,
        interrupt_status,
        queues,
        device,
    } = state;
    for v in [status, device_features_sel, driver_features_sel] {
        e.u32(*v);
    }
    e.u64(*driver_features);
    e.u32(*queue_sel);
    e.u32(*interrupt_status);
    e.count(queues.len(), MAX_QUEUES, "virtio queues")?;
    for queue in queues {
        let Queue { size, ready, desc_addr, avail_addr, used_addr, next_avail, next_used } = queue;
        e.u32(*size);
        e.bool(*ready);
        for v in [desc_addr, avail_addr, used_addr] {
            e.u64(*v);
        }
        e.u16(*next_avail);
        e.u16(*next_used);
    }
    match device {
        VirtioDeviceState::Blk(BlkState { capacity_sectors, read_only, injected_errors }) => {
            e.u32(DEVICE_ID_BLK);
            e.u64(*capacity_sectors);
            e.bool(*read_only);
            e.u32(*injected_errors);
        }
        VirtioDeviceState::Net(NetState { mac, rx_pending, stats }) => {
            e.u32(DEVICE_ID_NET);
            e.raw(mac);
            e.count(rx_pending.len(), RX_PENDING_MAX_FRAMES, "received frames waiting")?;
            for frame in rx_pending {
                e.bytes(frame, MAX_FRAME_BYTES, "a waiting received frame's bytes")?;
            }
            let NetStats {
                rx_frames,
                tx_frames,
                rx_dropped_oversize,
                rx_dropped_not_ready,
                rx_dropped_queue_full,
                rx_dropped_buffer_too_small,
                tx_dropped_malformed,
            } = stats;
            for v in [
                rx_frames,
                tx_frames,
                rx_dropped_oversize,
                rx_dropped_not_ready,
                rx_dropped_queue_full,
                rx_dropped_buffer_too_small,
                tx_dropped_malformed,
            ] {
                e.u64(*v);
            }
        }
        VirtioDeviceState::Rng(RngState { pool, starved }) => {
            e.u32(DEVICE_ID_RNG);
            e.bytes(pool, POOL_MAX_BYTES, "entropy pool bytes")?;
            e.bool(*starved);
        }
    }
    Ok(())
}

fn decode_virtio(d: &mut Decoder) -> Result<VirtioMmioState> {
    let [status, device_features_sel, driver_features_sel] = d.u32s("the virtio transport registers")?;
    let driver_features = d.u64("the driver features")?;
    let [queue_sel, interrupt_status] = d.u32s("the virtio transport registers")?;
    let count = d.count(MAX_QUEUES, 33, "virtio queues")?;
    let mut queues = Vec::with_capacity(count);
    for _ in 0..count {
        let size = d.u32("a queue's size")?;
        let ready = d.bool("a queue's ready flag")?;
        let [desc_addr, avail_addr, used_addr] = d.u64s("a queue's ring addresses")?;
        let next_avail = d.u16("a queue's next available index")?;
        let next_used = d.u16("a queue's next used index")?;
        queues.push(Queue { size, ready, desc_addr, avail_addr, used_addr, next_avail, next_used });
    }
    let at = d.offset();
    let device = match d.u32("the virtio device id")? {
        DEVICE_ID_BLK => {
            let capacity_sectors = d.u64("the disk's size")?;
            let read_only = d.bool("the disk's read-only flag")?;
            let injected_errors = d.u32("the disk's injected error count")?;
            VirtioDeviceState::Blk(BlkState { capacity_sectors, read_only, injected_errors })
        }
        DEVICE_ID_NET => {
            let mac = d.array("the MAC address")?;
            let count = d.count(RX_PENDING_MAX_FRAMES, 4, "received frames waiting")?;
            let rx_pending = (0..count)
                .map(|_| d.bytes(MAX_FRAME_BYTES, "a waiting received frame's bytes"))
                .collect::<Result<_>>()?;
            let [rx_frames, tx_frames, rx_dropped_oversize, rx_dropped_not_ready, rx_dropped_queue_full, rx_dropped_buffer_too_small, tx_dropped_malformed] =
                d.u64s("the network card's counters")?;
            let stats = NetStats {
                rx_frames,
                tx_frames,
                rx_dropped_oversize,
                rx_dropped_not_ready,
                rx_dropped_queue_full,
                rx_dropped_buffer_too_small,
                tx_dropped_malformed,
            };
            VirtioDeviceState::Net(NetState { mac, rx_pending, stats })
        }
        DEVICE_ID_RNG => {
            let pool = d.bytes(POOL_MAX_BYTES, "entropy pool bytes")?;
            let starved = d.bool("the entropy device's starved flag")?;
            VirtioDeviceState::Rng(RngState { pool, starved })
        }
        other => return Err(malformed(at, format!("virtio device id {other} is none of block, network, entropy"))),
    };
    Ok(VirtioMmioState {
        status,
        device_features_sel,
        driver_features_sel,
        driver_features,
        queue_sel,
        interrupt_status,
        queues,
        device,
    })
}

const INPUT_CONSOLE: u8 = 1;
const INPUT_NET_FRAME: u8 = 2;
const INPUT_ENTROPY: u8 = 3;
const INPUT_IDLE_SKIP: u8 = 4;

fn encode_input(e: &mut Encoder, input: &Input) -> Result<()> {
    let Input { icount, kind } = input;
    e.u64(*icount);
    let what = || format!("the input stamped {icount}");
    match kind {
        InputKind::Console(bytes) => {
            e.u8(INPUT_CONSOLE);
            e.bytes(bytes, MAX_INPUT_BYTES, &what())
        }
        InputKind::NetFrame(bytes) => {
            e.u8(INPUT_NET_FRAME);
            e.bytes(bytes, MAX_INPUT_BYTES, &what())
        }
        InputKind::Entropy(bytes) => {
            e.u8(INPUT_ENTROPY);
            e.bytes(bytes, MAX_INPUT_BYTES, &what())
        }
        InputKind::IdleSkip { ticks } => {
            e.u8(INPUT_IDLE_SKIP);
            e.u64(*ticks);
            Ok(())
        }
    }
}

fn decode_input(d: &mut Decoder) -> Result<Input> {
    let icount = d.u64("an input's stamp")?;
    let at = d.offset();
    let kind = match d.u8("an input's kind")? {
        INPUT_CONSOLE => InputKind::Console(d.bytes(MAX_INPUT_BYTES, "an input's bytes")?),
        INPUT_NET_FRAME => InputKind::NetFrame(d.bytes(MAX_INPUT_BYTES, "an input's bytes")?),
        INPUT_ENTROPY => InputKind::Entropy(d.bytes(MAX_INPUT_BYTES, "an input's bytes")?),
        INPUT_IDLE_SKIP => InputKind::IdleSkip { ticks: d.u64("an idle skip")? },
        other => return Err(malformed(at, format!("input kind {other} does not exist"))),
    };
    Ok(Input { icount, kind })
}

fn encode_ended(e: &mut Encoder, ended: &Option<RunExit>) {
    match ended {
        None => e.u8(0),
        Some(RunExit::PowerOff { code }) => {
            e.u8(1);
            e.u32(*code);
        }
        Some(RunExit::Reset) => e.u8(2),
        Some(RunExit::Budget) => e.u8(3),
        Some(RunExit::Idle { next_deadline_ticks }) => {
            e.u8(4);
            e.bool(next_deadline_ticks.is_some());
            e.u64(next_deadline_ticks.unwrap_or(0));
        }
    }
}

fn decode_ended(d: &mut Decoder) -> Result<Option<RunExit>> {
    let at = d.offset();
    Ok(match d.u8("the end of the run")? {
        0 => None,
        1 => Some(RunExit::PowerOff { code: d.u32("the exit code")? }),
        2 => Some(RunExit::Reset),
        3 => Some(RunExit::Budget),
        4 => {
            let some = d.bool("the idle deadline flag")?;
            let ticks = d.u64("the idle deadline")?;
            Some(RunExit::Idle { next_deadline_ticks: some.then_some(ticks) })
        }
        other => return Err(malformed(at, format!("end-of-run kind {other} does not exist"))),
    })
}

// ---------------------------------------------------------------------------------------
// The header.

fn encode_header(info: &SnapshotInfo) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    let mut put = |at: usize, bytes: &[u8]| h[at..at + bytes.len()].copy_from_slice(bytes);
    put(0, &MAGIC);
    put(8, &info.format_version.to_le_bytes());
    put(12, &(HEADER_BYTES as u32).to_le_bytes());
    put(16, &info.body_bytes.to_le_bytes());
    put(24, &info.body_crc32c.to_le_bytes());
    let devices = match info.disk {
        None => 0,
        Some(SnapshotDisk { read_only: false, .. }) => DEVICE_DISK,
        Some(SnapshotDisk { read_only: true, .. }) => DEVICE_DISK | DEVICE_DISK_READ_ONLY,
    } | if info.net_mac.is_some() { DEVICE_NET } else { 0 };
    put(28, &devices.to_le_bytes());
    put(32, &info.icount.to_le_bytes());
    put(40, &info.ram_bytes.to_le_bytes());
    put(48, &info.icount_per_tick.to_le_bytes());
    put(56, &info.disk.map_or(0, |d| d.sectors).to_le_bytes());
    put(64, &info.net_mac.unwrap_or_default());
    put(72, &info.ram_pages_saved.to_le_bytes());
    put(80, &info.disk_sectors_saved.to_le_bytes());
    put(88, &info.config_digest);
    put(120, &info.machine_digest.0.to_le_bytes());
    let crc = crc32c::crc32c(&h[..HEADER_CRC_AT]);
    h[HEADER_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Parses a version 1 header whose checksum has been checked.
fn decode_header(h: &[u8]) -> Result<SnapshotInfo> {
    debug_assert_eq!(h.len(), HEADER_BYTES);
    let u32_at = |at: usize| u32::from_le_bytes(h[at..at + 4].try_into().expect("4 bytes"));
    let u64_at = |at: usize| u64::from_le_bytes(h[at..at + 8].try_into().expect("8 bytes"));
    let devices = u32_at(28);
    if devices & !(DEVICE_DISK | DEVICE_DISK_READ_ONLY | DEVICE_NET) != 0
        || devices & (DEVICE_DISK | DEVICE_DISK_READ_ONLY) == DEVICE_DISK_READ_ONLY
    {
        return Err(malformed(28, format!("device bits {devices:#x} are not a device set")));
    }
    let ram_bytes = u64_at(40);
    if !(MIN_RAM_BYTES..=MAX_RAM_BYTES).contains(&ram_bytes) || ram_bytes % PAGE_BYTES as u64 != 0 {
        return Err(malformed(
            40,
            format!("RAM size {ram_bytes} is not a multiple of 4 KiB from {MIN_RAM_BYTES} to {MAX_RAM_BYTES}"),
        ));
    }
    let icount_per_tick = u64_at(48);
    if icount_per_tick == 0 {
        return Err(malformed(48, "0 instructions per timer tick"));
    }
    let sectors = u64_at(56);
    let disk = (devices & DEVICE_DISK != 0)
        .then_some(SnapshotDisk { sectors, read_only: devices & DEVICE_DISK_READ_ONLY != 0 });
    if disk.is_none() && sectors != 0 {
        return Err(malformed(56, format!("a disk size of {sectors} sectors without a disk")));
    }
    let mac: [u8; 6] = h[64..70].try_into().expect("6 bytes");
    let net_mac = (devices & DEVICE_NET != 0).then_some(mac);
    if (net_mac.is_none() && mac != [0; 6]) || h[70..72] != [0, 0] {
        return Err(malformed(64, "stray bytes in the MAC field"));
    }
    let ram_pages_saved = u64_at(72);
    if ram_pages_saved > ram_bytes / PAGE_BYTES as u64 {
        return Err(malformed(
            72,
            format!("{ram_pages_saved} pages saved of a RAM of {} pages", ram_bytes / PAGE_BYTES as u64),
        ));
    }
    let disk_sectors_saved = u64_at(80);
    if disk_sectors_saved > sectors {
        return Err(malformed(80, format!("{disk_sectors_saved} disk sectors saved of a disk of {sectors}")));
    }
    let info = SnapshotInfo {
        format_version: u32_at(8),
        icount: u64_at(32),
        ram_bytes,
        icount_per_tick,
        disk,
        net_mac,
        ram_pages_saved,
        disk_sectors_saved,
        config_digest: h[88..120].try_into().expect("32 bytes"),
        machine_digest: Digest(u128::from_le_bytes(h[120..136].try_into().expect("16 bytes"))),
        body_bytes: u64_at(16),
        body_crc32c: u32_at(24),
    };
    if info.config_digest != info.shape().digest() {
        return Err(malformed(88, "the configuration digest does not match the header's own fields"));
    }
    Ok(info)
}

// ---------------------------------------------------------------------------------------
// Reading: a byte source that counts offsets and keeps the checksums.

struct Source<'r, R: Read> {
    inner: &'r mut R,
    /// Bytes from the snapshot's start.
    offset: u64,
    body_crc: u32,
    section_crc: u32,
}

impl<'r, R: Read> Source<'r, R> {
    fn new(inner: &'r mut R, offset: u64) -> Self {
        Source { inner, offset, body_crc: 0, section_crc: 0 }
    }

    /// Reads exactly `buf.len()` bytes, without checksumming them.
    fn fill_raw(&mut self, buf: &mut [u8], what: &'static str) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.inner.read(&mut buf[done..]) {
                Ok(0) => return Err(SnapshotError::Truncated { offset: self.offset + done as u64, what }),
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => return Err(SnapshotError::Io { op: "reading the snapshot", source }),
            }
        }
        self.offset += buf.len() as u64;
        Ok(())
    }

    /// Body bytes inside a section: both checksums cover them.
    fn fill(&mut self, buf: &mut [u8], what: &'static str) -> Result<()> {
        self.fill_raw(buf, what)?;
        self.body_crc = crc32c::crc32c_append(self.body_crc, buf);
        self.section_crc = crc32c::crc32c_append(self.section_crc, buf);
        Ok(())
    }

    fn u32(&mut self, what: &'static str) -> Result<u32> {
        let mut b = [0; 4];
        self.fill(&mut b, what)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64> {
        let mut b = [0; 8];
        self.fill(&mut b, what)?;
        Ok(u64::from_le_bytes(b))
    }

    /// A section's tag and length, checked against the expected tag and the body's end.
    fn section_start(&mut self, tag: u32, body_end: u64) -> Result<u64> {
        let at = self.offset;
        if body_end.saturating_sub(at) < SECTION_HEADER_BYTES + 4 {
            return Err(malformed(at, format!("the body ends at byte {body_end} before section {}", tag_name(tag))));
        }
        self.section_crc = 0;
        let found = self.u32("a section tag")?;
        if found != tag {
            return Err(malformed(at, format!("expected section {}, found tag {}", tag_name(tag), tag_name(found))));
        }
        let len = self.u64("a section length")?;
        let room = body_end - self.offset - 4;
        if len > room {
            return Err(malformed(
                at + 4,
                format!("section {} of {len} bytes runs past the body's end at byte {body_end}", tag_name(tag)),
            ));
        }
        Ok(len)
    }

    /// Reads and checks the section's checksum.
    fn section_end(&mut self, tag: u32) -> Result<()> {
        let computed = self.section_crc;
        let at = self.offset;
        let mut b = [0; 4];
        self.fill_raw(&mut b, "a section checksum")?;
        self.body_crc = crc32c::crc32c_append(self.body_crc, &b);
        let stored = u32::from_le_bytes(b);
        if stored != computed {
            let what = match tag {
                TAG_STATE => "state section",
                TAG_RAM => "RAM section",
                _ => "disk section",
            };
            return Err(SnapshotError::Checksum { what, offset: at, stored, computed });
        }
        Ok(())
    }

    /// `len` bytes into a buffer that grows only as they arrive (a lying length in a
    /// short file allocates nothing beyond the file).
    fn vec(&mut self, len: u64, what: &'static str) -> Result<Vec<u8>> {
        const CHUNK: usize = 1 << 20;
        let mut out = Vec::new();
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            let start = out.len();
            out.resize(start + n, 0);
            self.fill(&mut out[start..], what)?;
            left -= n as u64;
        }
        Ok(out)
    }
}

fn tag_name(tag: u32) -> String {
    let bytes = tag.to_le_bytes();
    if bytes.iter().all(|&b| b.is_ascii_alphanumeric() || b == 0) {
        format!("\"{}\"", String::from_utf8_lossy(&bytes).trim_end_matches('\0'))
    } else {
        format!("{tag:#010x}")
    }
}

/// Reads and checks the header of any version, then parses version 1's.
fn read_header_from<R: Read>(src: &mut Source<R>) -> Result<SnapshotInfo> {
    let mut prefix = [0u8; 16];
    let mut got = 0;
    while got < MAGIC.len() {
        match src.inner.read(&mut prefix[got..MAGIC.len()]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => return Err(SnapshotError::Io { op: "reading the snapshot", source }),
        }
    }
    if prefix[..got] != MAGIC[..got] {
        return Err(SnapshotError::NotASnapshot { found: prefix[..got].to_vec() });
    }
    src.offset += got as u64;
    if got < MAGIC.len() {
        return Err(SnapshotError::Truncated { offset: src.offset, what: "the magic" });
    }
    src.fill_raw(&mut prefix[8..16], "the header")?;
    let version = u32::from_le_bytes(prefix[8..12].try_into().expect("4 bytes"));
    let header_bytes = u32::from_le_bytes(prefix[12..16].try_into().expect("4 bytes"));
    let unsupported =
        |header_intact| SnapshotError::UnsupportedVersion { found: version, supported: FORMAT_VERSION, header_intact };
    if !(MIN_HEADER_BYTES..=MAX_HEADER_BYTES).contains(&header_bytes) {
        if version != FORMAT_VERSION {
            return Err(unsupported(false));
        }
        return Err(malformed(12, format!("a header of {header_bytes} bytes")));
    }
    let mut header = prefix.to_vec();
    header.resize(header_bytes as usize, 0);
    src.fill_raw(&mut header[16..], "the header")?;
    let crc_at = header.len() - 4;
    let stored = u32::from_le_bytes(header[crc_at..].try_into().expect("4 bytes"));
    let computed = crc32c::crc32c(&header[..crc_at]);
    if stored != computed {
        if version != FORMAT_VERSION {
            return Err(unsupported(false));
        }
        return Err(SnapshotError::Checksum { what: "header", offset: crc_at as u64, stored, computed });
    }
    // Where a converter from an older version would go; none exists yet.
    if version != FORMAT_VERSION {
        return Err(unsupported(true));
    }
    if header.len() != HEADER_BYTES {
        return Err(malformed(
            12,
            format!("a version {FORMAT_VERSION} header of {} bytes, not {HEADER_BYTES}", header.len()),
        ));
    }
    decode_header(&header)
}

/// Reads a snapshot's header: what the file holds, without reading the rest.
pub fn read_header(input: &mut impl Read) -> Result<SnapshotInfo> {
    read_header_from(&mut Source::new(input, 0))
}

// ---------------------------------------------------------------------------------------
// Extent sections (RAM and disk).

/// Where the units of an extent section go.
trait ExtentSink {
    /// Units `first..first + count` are zero.
    fn gap(&mut self, first: u64, count: u64) -> Result<()>;
    /// Units from `first` hold `data` (whole units).
    fn extent(&mut self, first: u64, data: &[u8]) -> Result<()>;
}

/// Checks the structure only.
struct Discard;

impl ExtentSink for Discard {
    fn gap(&mut self, _: u64, _: u64) -> Result<()> {
        Ok(())
    }
    fn extent(&mut self, _: u64, _: &[u8]) -> Result<()> {
        Ok(())
    }
}

#[derive(Clone, Copy)]
struct ExtentSpec {
    tag: u32,
    unit_bytes: usize,
    unit_count: u64,
}

/// Reads an extent section into `sink`; returns how many units it held.
fn read_extents<R: Read>(
    src: &mut Source<R>,
    spec: ExtentSpec,
    body_end: u64,
    buf: &mut Vec<u8>,
    sink: &mut impl ExtentSink,
) -> Result<u64> {
    let len = src.section_start(spec.tag, body_end)?;
    let end = src.offset + len;
    if len < 12 {
        return Err(malformed(src.offset, format!("section {} of {len} bytes", tag_name(spec.tag))));
    }
    let at = src.offset;
    let unit_bytes = src.u32("a unit size")?;
    let unit_count = src.u64("a unit count")?;
    if (unit_bytes as usize, unit_count) != (spec.unit_bytes, spec.unit_count) {
        let problem =
            format!("{unit_count} units of {unit_bytes} bytes, expected {} of {}", spec.unit_count, spec.unit_bytes);
        return Err(malformed(at, problem));
    }
    let (mut next, mut saved) = (0u64, 0u64);
    while src.offset < end {
        let at = src.offset;
        if end - at < EXTENT_HEADER_BYTES {
            return Err(malformed(at, "an extent header crosses the section's end"));
        }
        let first = src.u64("an extent's first unit")?;
        let count = src.u32("an extent's length")?;
        if count == 0 || count > MAX_EXTENT_UNITS {
            return Err(malformed(at + 8, format!("an extent of {count} units, not 1 to {MAX_EXTENT_UNITS}")));
        }
        match first.checked_add(u64::from(count)) {
            Some(end_unit) if first >= next && end_unit <= unit_count => {}
            _ => {
                return Err(malformed(
                    at,
                    format!("extent {first}..+{count} is out of order or beyond {unit_count} units"),
                ))
            }
        }
        let data_bytes = count as usize * spec.unit_bytes;
        if (end - src.offset) < data_bytes as u64 {
            return Err(malformed(at, "an extent's data crosses the section's end"));
        }
        buf.resize(data_bytes, 0);
        src.fill(buf, "an extent's data")?;
        sink.gap(next, first - next)?;
        sink.extent(first, buf)?;
        next = first + u64::from(count);
        saved += u64::from(count);
    }
    sink.gap(next, unit_count - next)?;
    src.section_end(spec.tag)?;
    Ok(saved)
}

/// Puts RAM pages into the machine being restored.
struct RamSink<'m> {
    machine: &'m mut Machine,
}

impl ExtentSink for RamSink<'_> {
    fn gap(&mut self, first: u64, count: u64) -> Result<()> {
        const ZERO: [u8; PAGE_BYTES] = [0; PAGE_BYTES];
        for index in first..first + count {
            let index = index as usize;
            if self.machine.page(index).is_some_and(|p| !is_zero(p)) {
                self.machine.write_page(index, &ZERO)?;
            }
        }
        Ok(())
    }

    fn extent(&mut self, first: u64, data: &[u8]) -> Result<()> {
        for (i, page) in data.chunks_exact(PAGE_BYTES).enumerate() {
            self.machine.write_page(first as usize + i, page)?;
        }
        Ok(())
    }
}

/// Makes the machine's disk hold the snapshot's contents, writing only sectors that
/// differ (none when the disk is read-only: then any difference is an error).
struct DiskSink<'m> {
    machine: &'m mut Machine,
    path: PathBuf,
    read_only: bool,
    scratch: Vec<u8>,
}

impl DiskSink<'_> {
    /// Refuses a read-only disk that differs from `expected` (whole sectors from
    /// `first`), naming the first sector that differs.
    fn refuse(&self, first: u64, expected: impl Fn(usize, &[u8]) -> bool) -> SnapshotError {
        let differing =
            self.scratch.chunks_exact(SECTOR_BYTES).enumerate().position(|(i, sector)| !expected(i, sector));
        SnapshotError::ReadOnlyDiskDiffers { path: self.path.clone(), sector: first + differing.unwrap_or(0) as u64 }
    }
}

impl ExtentSink for DiskSink<'_> {
    fn gap(&mut self, first: u64, count: u64) -> Result<()> {
        let chunk = u64::from(MAX_EXTENT_UNITS);
        let mut at = first;
        while at < first + count {
            let n = chunk.min(first + count - at);
            self.scratch.resize(n as usize * SECTOR_BYTES, 0);
            self.machine.read_sectors(at, &mut self.scratch)?;
            if !is_zero(&self.scratch) {
                if self.read_only {
                    return Err(self.refuse(at, |_, sector| is_zero(sector)));
                }
                self.scratch.fill(0);
                self.machine.write_sectors(at, &self.scratch)?;
            }
            at += n;
        }
        Ok(())
    }

    fn extent(&mut self, first: u64, data: &[u8]) -> Result<()> {
        self.scratch.resize(data.len(), 0);
        self.machine.read_sectors(first, &mut self.scratch)?;
        if self.scratch != data {
            if self.read_only {
                return Err(self.refuse(first, |i, sector| *sector == data[i * SECTOR_BYTES..(i + 1) * SECTOR_BYTES]));
            }
            self.machine.write_sectors(first, data)?;
        }
        Ok(())
    }
}

fn is_zero(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |acc, &b| acc | b) == 0
}

// ---------------------------------------------------------------------------------------
// Restoring.

fn check_config(info: &SnapshotInfo, config: &MachineConfig) -> Result<()> {
    let (saved, wanted) = (info.shape(), BoardShape::of_config(config));
    let mismatch =
        |what, snapshot: String, configured: String| Err(SnapshotError::ConfigMismatch { what, snapshot, configured });
    let bytes = |b: u64| format!("{b} bytes ({} MiB)", b >> 20);
    if saved.ram_bytes != wanted.ram_bytes {
        return mismatch("RAM size", bytes(saved.ram_bytes), bytes(wanted.ram_bytes));
    }
    if saved.icount_per_tick != wanted.icount_per_tick {
        let rate = |n: u64| format!("{n} instructions per timer tick");
        return mismatch("timer rate", rate(saved.icount_per_tick), rate(wanted.icount_per_tick));
    }
    let disk = |d: Option<bool>| match d {
        None => "no disk".to_string(),
        Some(false) => "a writable disk".to_string(),
        Some(true) => "a read-only disk".to_string(),
    };
    if saved.disk_read_only != wanted.disk_read_only {
        return mismatch("disk", disk(saved.disk_read_only), disk(wanted.disk_read_only));
    }
    let net = |m: Option<[u8; 6]>| {
        m.map_or("no network card".to_string(), |mac| format!("a network card with MAC {}", mac_text(&mac)))
    };
    if saved.net_mac != wanted.net_mac {
        return mismatch("network card", net(saved.net_mac), net(wanted.net_mac));
    }
    let wanted_digest = wanted.digest();
    if info.config_digest != wanted_digest {
        return mismatch("configuration digest", hex(&info.config_digest), hex(&wanted_digest));
    }
    Ok(())
}

/// What checking the whole body found out.
struct CheckedBody {
    state: MachineState,
    /// Offset of the RAM section, where applying starts.
    ram_section_at: u64,
}

fn ram_spec(info: &SnapshotInfo) -> ExtentSpec {
    ExtentSpec { tag: TAG_RAM, unit_bytes: PAGE_BYTES, unit_count: info.ram_bytes / PAGE_BYTES as u64 }
}

fn disk_spec(disk: SnapshotDisk) -> ExtentSpec {
    ExtentSpec { tag: TAG_DISK, unit_bytes: SECTOR_BYTES, unit_count: disk.sectors }
}

/// The first pass: reads and checks the whole body, changing nothing anywhere.
fn check_body<R: Read>(src: &mut Source<R>, info: &SnapshotInfo) -> Result<CheckedBody> {
    let body_end =
        src.offset.checked_add(info.body_bytes).ok_or_else(|| malformed(16, "the body's length overflows"))?;
    src.body_crc = 0;

    let len = src.section_start(TAG_STATE, body_end)?;
    if len > MAX_STATE_BYTES {
        return Err(malformed(src.offset - 8, format!("a state section of {len} bytes, at most {MAX_STATE_BYTES}")));
    }
    let state_at = src.offset;
    let state_bytes = src.vec(len, "the state section")?;
    src.section_end(TAG_STATE)?;
    let state = decode_state(&mut Decoder::new(&state_bytes, state_at))?;
    drop(state_bytes);
    if state.hart.icount != info.icount {
        return Err(malformed(
            state_at,
            format!("the hart is at icount {}, the header says {}", state.hart.icount, info.icount),
        ));
    }

    let mut buf = Vec::new();
    let ram_section_at = src.offset;
    let saved = read_extents(src, ram_spec(info), body_end, &mut buf, &mut Discard)?;
    if saved != info.ram_pages_saved {
        return Err(malformed(
            ram_section_at,
            format!("{saved} pages saved, the header says {}", info.ram_pages_saved),
        ));
    }
    if let Some(disk) = info.disk {
        let at = src.offset;
        let saved = read_extents(src, disk_spec(disk), body_end, &mut buf, &mut Discard)?;
        if saved != info.disk_sectors_saved {
            return Err(malformed(
                at,
                format!("{saved} disk sectors saved, the header says {}", info.disk_sectors_saved),
            ));
        }
    }
    if src.offset != body_end {
        return Err(malformed(src.offset, format!("{} bytes after the last section", body_end - src.offset)));
    }
    if src.body_crc != info.body_crc32c {
        return Err(SnapshotError::Checksum {
            what: "body",
            offset: 24,
            stored: info.body_crc32c,
            computed: src.body_crc,
        });
    }
    let mut probe = [0u8; 1];
    if src.inner.read(&mut probe).map_err(io_error("reading the snapshot"))? != 0 {
        return Err(malformed(body_end, "bytes after the body's end"));
    }
    Ok(CheckedBody { state, ram_section_at })
}

/// The second pass, over a body already checked: RAM into the machine, then the
/// snapshot's contents into its disk.
fn apply_body<R: Read>(src: &mut Source<R>, info: &SnapshotInfo, machine: &mut Machine) -> Result<()> {
    let body_end = HEADER_BYTES as u64 + info.body_bytes;
    let mut buf = Vec::new();
    read_extents(src, ram_spec(info), body_end, &mut buf, &mut RamSink { machine })?;
    if let Some(disk) = info.disk {
        let path = machine.disk().map(|b| b.path().to_path_buf()).unwrap_or_default();
        let mut sink = DiskSink { machine, path, read_only: disk.read_only, scratch: Vec::new() };
        read_extents(src, disk_spec(disk), body_end, &mut buf, &mut sink)?;
    }
    Ok(())
}

fn check_disk_size(info: &SnapshotInfo, machine: &Machine) -> Result<()> {
    if let (Some(saved), Some(blk)) = (info.disk, machine.disk()) {
        if saved.sectors != blk.capacity_sectors() {
            let sectors = |n: u64| format!("{n} sectors ({} bytes)", n * SECTOR_SIZE_BYTES);
            let configured = format!("{} in {}", sectors(blk.capacity_sectors()), blk.path().display());
            return Err(SnapshotError::ConfigMismatch {
                what: "disk size",
                snapshot: sectors(saved.sectors),
                configured,
            });
        }
    }
    Ok(())
}

/// Rebuilds a machine from a snapshot. Reads and checks the whole snapshot first; then
/// builds the machine from `config` (which must have the snapshot's RAM size, timer
/// rate and devices), puts in the state, reads the file again for RAM and writes the
/// snapshot's disk contents into the disk image `config` names.
pub fn read_snapshot<R: Read + Seek>(input: &mut R, config: &MachineConfig) -> Result<Machine> {
    let base = input.stream_position().map_err(io_error("finding the snapshot's start"))?;
    let mut src = Source::new(input, 0);
    let info = read_header_from(&mut src)?;
    check_config(&info, config)?;
    let checked = check_body(&mut src, &info)?;

    let mut machine = Machine::new(config)?;
    check_disk_size(&info, &machine)?;
    machine.restore_state(checked.state)?;
    input.seek(SeekFrom::Start(base + checked.ram_section_at)).map_err(io_error("seeking to the RAM section"))?;
    let mut src = Source::new(input, checked.ram_section_at);
    match apply_body(&mut src, &info, &mut machine) {
        Ok(()) => {}
        Err(e @ (SnapshotError::ReadOnlyDiskDiffers { .. } | SnapshotError::Restore(_) | SnapshotError::Io { .. })) => {
            return Err(e)
        }
        // What was checked a moment ago no longer reads the same.
        Err(_) => {
            return Err(SnapshotError::ChangedWhileReading {
                path: config.disk.as_ref().map(|d| d.path.clone()).unwrap_or_default(),
            })
        }
    }
    machine.take_dirty_pages();
    machine.take_dirty_sectors();
    let restored = machine.digest();
    if restored != info.machine_digest {
        return Err(SnapshotError::DigestMismatch { saved: info.machine_digest, restored });
    }
    Ok(machine)
}

// ---------------------------------------------------------------------------------------
// Writing.

/// Writes body bytes, counting them and keeping the checksums.
struct Sink<'w, W: Write> {
    out: &'w mut W,
    written: u64,
    body_crc: u32,
    section_crc: u32,
    section_end: u64,
}

impl<'w, W: Write> Sink<'w, W> {
    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes).map_err(io_error("writing the snapshot"))?;
        self.written += bytes.len() as u64;
        self.body_crc = crc32c::crc32c_append(self.body_crc, bytes);
        self.section_crc = crc32c::crc32c_append(self.section_crc, bytes);
        Ok(())
    }

    fn begin_section(&mut self, tag: u32, len: u64) -> Result<()> {
        self.section_crc = 0;
        self.put(&tag.to_le_bytes())?;
        self.put(&len.to_le_bytes())?;
        self.section_end = self.written + len;
        Ok(())
    }

    fn end_section(&mut self) -> Result<()> {
        assert_eq!(self.written, self.section_end, "a section's length is computed before it is written");
        let crc = self.section_crc.to_le_bytes();
        self.put(&crc)
    }
}

/// Runs of non-zero units, at most MAX_EXTENT_UNITS long: (first unit, count).
#[derive(Default)]
struct Extents {
    runs: Vec<(u64, u32)>,
    units: u64,
}

impl Extents {
    fn push(&mut self, index: u64, nonzero: bool) {
        if !nonzero {
            return;
        }
        self.units += 1;
        match self.runs.last_mut() {
            Some((first, count)) if *first + u64::from(*count) == index && *count < MAX_EXTENT_UNITS => *count += 1,
            _ => self.runs.push((index, 1)),
        }
    }

    fn section_bytes(&self, unit_bytes: usize) -> u64 {
        12 + self.runs.iter().map(|&(_, count)| EXTENT_HEADER_BYTES + u64::from(count) * unit_bytes as u64).sum::<u64>()
    }
}

fn ram_extents(ram: &[u8]) -> Extents {
    let mut extents = Extents::default();
    for (index, page) in ram.chunks_exact(PAGE_BYTES).enumerate() {
        extents.push(index as u64, !is_zero(page));
    }
    extents
}

fn disk_extents(blk: &Blk) -> Result<Extents> {
    let mut extents = Extents::default();
    let mut buf = vec![0u8; MAX_EXTENT_UNITS as usize * SECTOR_BYTES];
    let total = blk.capacity_sectors();
    let mut at = 0;
    while at < total {
        let n = (total - at).min(u64::from(MAX_EXTENT_UNITS)) as usize;
        let chunk = &mut buf[..n * SECTOR_BYTES];
        blk.read_sectors(at, chunk).map_err(|e| SnapshotError::Restore(RestoreError::Disk(e.to_string())))?;
        for (i, sector) in chunk.chunks_exact(SECTOR_BYTES).enumerate() {
            extents.push(at + i as u64, !is_zero(sector));
        }
        at += n as u64;
    }
    Ok(extents)
}

fn write_extents<W: Write>(
    sink: &mut Sink<W>,
    tag: u32,
    unit_bytes: usize,
    unit_count: u64,
    extents: &Extents,
    mut read: impl FnMut(u64, &mut [u8]) -> Result<()>,
) -> Result<()> {
    sink.begin_section(tag, extents.section_bytes(unit_bytes))?;
    sink.put(&(unit_bytes as u32).to_le_bytes())?;
    sink.put(&unit_count.to_le_bytes())?;
    let mut buf = vec![0u8; MAX_EXTENT_UNITS as usize * unit_bytes];
    for &(first, count) in &extents.runs {
        sink.put(&first.to_le_bytes())?;
        sink.put(&count.to_le_bytes())?;
        let data = &mut buf[..count as usize * unit_bytes];
        read(first, data)?;
        sink.put(data)?;
    }
    sink.end_section()
}

/// Writes a snapshot of `machine` (stopped between runs) to `out`, from its current
/// position. The header goes last, once the body's length and checksum are known.
pub fn write_snapshot<W: Write + Seek>(machine: &Machine, out: &mut W) -> Result<SnapshotInfo> {
    let state = machine.save_state();
    let shape = BoardShape::of_machine(machine, &state);
    let state_bytes = encode_state(&state)?;
    let ram = machine.ram().as_slice();
    let pages = ram_extents(ram);
    let disk = machine.disk();
    let sectors = disk.map(disk_extents).transpose()?;
    let machine_digest = machine.digest();

    let start = out.stream_position().map_err(io_error("finding the write position"))?;
    // A placeholder: until the real header is in place the file is no snapshot at all.
    out.write_all(&[0u8; HEADER_BYTES]).map_err(io_error("writing the snapshot"))?;
    let mut sink = Sink { out, written: 0, body_crc: 0, section_crc: 0, section_end: 0 };
    sink.begin_section(TAG_STATE, state_bytes.len() as u64)?;
    sink.put(&state_bytes)?;
    sink.end_section()?;
    write_extents(&mut sink, TAG_RAM, PAGE_BYTES, ram.len() as u64 / PAGE_BYTES as u64, &pages, |first, buf| {
        let at = first as usize * PAGE_BYTES;
        buf.copy_from_slice(&ram[at..at + buf.len()]);
        Ok(())
    })?;
    if let (Some(blk), Some(sectors)) = (disk, &sectors) {
        write_extents(&mut sink, TAG_DISK, SECTOR_BYTES, blk.capacity_sectors(), sectors, |first, buf| {
            blk.read_sectors(first, buf).map_err(|e| SnapshotError::Restore(RestoreError::Disk(e.to_string())))
        })?;
    }
    let (body_bytes, body_crc32c) = (sink.written, sink.body_crc);

    let info = SnapshotInfo {
        format_version: FORMAT_VERSION,
        icount: machine.icount(),
        ram_bytes: shape.ram_bytes,
        icount_per_tick: shape.icount_per_tick,
        disk: disk.map(|b| SnapshotDisk { sectors: b.capacity_sectors(), read_only: b.read_only() }),
        net_mac: shape.net_mac,
        ram_pages_saved: pages.units,
        disk_sectors_saved: sectors.as_ref().map_or(0, |s| s.units),
        config_digest: shape.digest(),
        machine_digest,
        body_bytes,
        body_crc32c,
    };
    out.seek(SeekFrom::Start(start)).map_err(io_error("seeking to the header"))?;
    out.write_all(&encode_header(&info)).map_err(io_error("writing the header"))?;
    out.seek(SeekFrom::Start(start + info.file_bytes())).map_err(io_error("seeking to the end"))?;
    out.flush().map_err(io_error("writing the snapshot"))?;
    Ok(info)
}

// ---------------------------------------------------------------------------------------
// Files.

fn in_file(path: &Path, source: SnapshotError) -> SnapshotError {
    SnapshotError::File { path: path.to_path_buf(), source: Box::new(source) }
}

fn file_io(path: &Path, op: &'static str, source: std::io::Error) -> SnapshotError {
    in_file(path, SnapshotError::Io { op, source })
}

/// Writes a snapshot to `path` through a temporary file beside it, synced and then
/// renamed, so that `path` holds either the old file or the whole new snapshot.
pub fn save_to_path(machine: &Machine, path: &Path) -> Result<SnapshotInfo> {
    if let Some(blk) = machine.disk() {
        let same = |a: &Path, b: &Path| a.canonicalize().ok().zip(b.canonicalize().ok()).is_some_and(|(a, b)| a == b);
        if same(path, blk.path()) {
            return Err(in_file(path, SnapshotError::OverDisk(blk.path().to_path_buf())));
        }
    }
    let name =
        path.file_name().ok_or_else(|| file_io(path, "naming the file", std::io::ErrorKind::InvalidInput.into()))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let written = (|| {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_error("creating the temporary file"))?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        let info = write_snapshot(machine, &mut out)?;
        let file =
            out.into_inner().map_err(|e| SnapshotError::Io { op: "writing the snapshot", source: e.into_error() })?;
        file.sync_all().map_err(io_error("syncing the snapshot"))?;
        std::fs::rename(&tmp, path).map_err(io_error("renaming the temporary file"))?;
        Ok(info)
    })();
    match written {
        Ok(info) => {
            // The rename is durable once the directory is synced.
            std::fs::File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| file_io(path, "syncing the directory", e))?;
            Ok(info)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(in_file(path, e))
        }
    }
}

/// Rebuilds a machine from the snapshot at `path` (see [`read_snapshot`]).
pub fn load_from_path(path: &Path, config: &MachineConfig) -> Result<Machine> {
    let file = std::fs::File::open(path).map_err(|e| file_io(path, "opening", e))?;
    read_snapshot(&mut std::io::BufReader::with_capacity(1 << 20, file), config).map_err(|e| in_file(path, e))
}

/// The header of the snapshot at `path`.
pub fn read_header_from_path(path: &Path) -> Result<SnapshotInfo> {
    let file = std::fs::File::open(path).map_err(|e| file_io(path, "opening", e))?;
    read_header(&mut std::io::BufReader::new(file)).map_err(|e| in_file(path, e))
}

// ---------------------------------------------------------------------------------------
// The state section on its own, for checkpoints (crate::checkpoint): one encoding of the
// machine state for snapshots and replication alike.

/// Encode a machine state (no RAM, no disk) as the snapshot's state section does.
pub fn encode_machine_state(state: &MachineState) -> Result<Vec<u8>> {
    encode_state(state)
}

/// Decode a state encoded by [`encode_machine_state`], with the same limits and checks.
pub fn decode_machine_state(bytes: &[u8]) -> Result<MachineState> {
    let mut d = Decoder::new(bytes, 0);
    decode_state(&mut d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Cursor;

    fn queue(seed: u64) -> Queue {
        Queue {
            size: 256,
            ready: seed & 1 == 0,
            desc_addr: seed << 12,
            avail_addr: (seed << 12) + 0x1000,
            used_addr: (seed << 12) + 0x2000,
            next_avail: seed as u16,
            next_used: !seed as u16,
        }
    }

    fn transport(device: VirtioDeviceState, queues: usize) -> VirtioMmioState {
        VirtioMmioState {
            status: 0xf,
            device_features_sel: 1,
            driver_features_sel: 0,
            driver_features: 1 << 32 | 1 << 5,
            queue_sel: 1,
            interrupt_status: 1,
            queues: (0..queues as u64).map(queue).collect(),
            device,
        }
    }

    /// A state with a distinct value in every field.
    fn sample_state() -> MachineState {
        let mut hart = HartState::default();
        for (i, r) in hart.x.iter_mut().enumerate().skip(1) {
            *r = 0x1000 + i as u64;
        }
        for (i, r) in hart.f.iter_mut().enumerate() {
            *r = 0xffff_0000_0000_0000 | i as u64;
        }
        hart.pc = 0x8020_0000;
        hart.privilege = PrivMode::Supervisor;
        hart.icount = 1_000;
        hart.time_offset_ticks = 7;
        hart.cycle_offset = 8;
        hart.instret_offset = 9;
        hart.mtimecmp = u64::MAX;
        hart.stimecmp = 12345;
        hart.reservation = Some(0x8000_1000);
        hart.wfi = true;
        hart.mstatus = 0xa_0000_0000;
        hart.satp = 8 << 60 | 0x1234;
        hart.senvcfg = 1;
        let uart = UartState {
            ier: 1,
            lcr: 3,
            mcr: 8,
            scr: 0x55,
            dll: 1,
            dlm: 0,
            fcr: 0xc1,
            thre_pending: true,
            rx: b"typed".to_vec().into(),
            rx_dropped: 2,
        };
        let mut plic = PlicState::default();
        plic.priority[1] = 1;
        plic.priority[3] = 7;
        plic.pending = 1 << 3;
        plic.enable = [0, 0xe];
        plic.threshold = [7, 0];
        let net = NetState {
            mac: [2, 0, 0, 0, 0, 1],
            rx_pending: vec![vec![0xab; 60], vec![]],
            stats: NetStats { rx_frames: 3, tx_dropped_malformed: 1, ..NetStats::default() },
        };
        let virtio = vec![
            transport(
                VirtioDeviceState::Blk(BlkState { capacity_sectors: 2048, read_only: false, injected_errors: 1 }),
                1,
            ),
            transport(VirtioDeviceState::Net(net), 2),
            transport(VirtioDeviceState::Rng(RngState { pool: vec![9; 100], starved: true }), 1),
        ];
        let pending_inputs = vec![
            Input { icount: 1_000, kind: InputKind::Console(b"ls\n".to_vec()) },
            Input { icount: 2_000, kind: InputKind::NetFrame(vec![0xff; 64]) },
            Input { icount: 2_000, kind: InputKind::Entropy(vec![1; 32]) },
            Input { icount: 3_000, kind: InputKind::IdleSkip { ticks: 99 } },
        ];
        MachineState { hart, uart, plic, virtio, pending_inputs, ended: Some(RunExit::PowerOff { code: 3 }) }
    }

    fn decode(bytes: &[u8]) -> Result<MachineState> {
        decode_state(&mut Decoder::new(bytes, 0))
    }

    #[test]
    fn the_state_round_trips_through_its_encoding() {
        let state = sample_state();
        assert_eq!(decode(&encode_state(&state).unwrap()).unwrap(), state);
        for ended in
            [None, Some(RunExit::Reset), Some(RunExit::Budget), Some(RunExit::Idle { next_deadline_ticks: Some(5) })]
        {
            let state = MachineState { ended, ..sample_state() };
            assert_eq!(decode(&encode_state(&state).unwrap()).unwrap(), state);
        }
    }

    #[test]
    fn every_truncation_of_the_state_is_refused() {
        let bytes = encode_state(&sample_state()).unwrap();
        for len in 0..bytes.len() {
            let err = decode(&bytes[..len]).unwrap_err();
            assert!(matches!(err, SnapshotError::Malformed { .. }), "at {len}: {err}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode(&longer).unwrap_err().to_string().contains("1 bytes after the end of the state"));
    }

    /// Offset of the pending-input count in the sample state's encoding.
    fn pending_count_at(bytes: &[u8]) -> usize {
        // The inputs and the end-of-run marker follow the count.
        let tail = {
            let mut e = Encoder::default();
            for input in &sample_state().pending_inputs {
                encode_input(&mut e, input).unwrap();
            }
            encode_ended(&mut e, &sample_state().ended);
            e.buf.len()
        };
        bytes.len() - tail - 4
    }

    #[test]
    fn counts_beyond_their_caps_or_the_bytes_left_are_refused_before_allocating() {
        let bytes = encode_state(&sample_state()).unwrap();
        let at = pending_count_at(&bytes);
        assert_eq!(bytes[at..at + 4], 4u32.to_le_bytes());
        let mut huge = bytes.clone();
        huge[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = decode(&huge).unwrap_err().to_string();
        assert!(err.contains(&format!("pending inputs: 4294967295, at most {MAX_PENDING_INPUTS}")), "{err}");
        let mut more_than_left = bytes.clone();
        more_than_left[at..at + 4].copy_from_slice(&60_000u32.to_le_bytes());
        let err = decode(&more_than_left).unwrap_err().to_string();
        assert!(err.contains("bytes of state are left"), "{err}");
    }

    #[test]
    fn values_outside_their_domain_are_refused() {
        let bytes = encode_state(&sample_state()).unwrap();
        let mut x0 = bytes.clone();
        x0[0] = 1;
        assert!(decode(&x0).unwrap_err().to_string().contains("x0"));
        let mut privilege = bytes.clone();
        privilege[64 * 8 + 8] = 2;
        assert!(decode(&privilege).unwrap_err().to_string().contains("privilege mode 2"));
        let mut past = sample_state();
        past.pending_inputs[0].icount = 999;
        let err = decode(&encode_state(&past).unwrap()).unwrap_err().to_string();
        assert!(err.contains("stamped 999 comes before icount 1000"), "{err}");
        let mut out_of_order = sample_state();
        out_of_order.pending_inputs.swap(0, 3);
        out_of_order.pending_inputs[3].icount = 1_000;
        assert!(decode(&encode_state(&out_of_order).unwrap()).is_err());
    }

    #[test]
    fn the_writer_refuses_what_the_reader_would_refuse() {
        let mut big_input = sample_state();
        big_input
            .pending_inputs
            .push(Input { icount: 5_000, kind: InputKind::Console(vec![b'x'; MAX_INPUT_BYTES + 1]) });
        let err = encode_state(&big_input).unwrap_err();
        assert!(
            matches!(err, SnapshotError::TooLarge { found, max, .. } if found == MAX_INPUT_BYTES as u64 + 1 && max == MAX_INPUT_BYTES as u64)
        );
        let mut big_pool = sample_state();
        big_pool.virtio[2].device =
            VirtioDeviceState::Rng(RngState { pool: vec![0; POOL_MAX_BYTES + 1], starved: false });
        assert!(matches!(encode_state(&big_pool), Err(SnapshotError::TooLarge { .. })));
        let mut many = sample_state();
        many.pending_inputs =
            vec![Input { icount: 1_000, kind: InputKind::IdleSkip { ticks: 1 } }; MAX_PENDING_INPUTS + 1];
        assert!(matches!(encode_state(&many), Err(SnapshotError::TooLarge { .. })));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn the_state_decoder_never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn the_state_decoder_never_panics_on_a_mutated_state(edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
            let mut bytes = encode_state(&sample_state()).unwrap();
            for (at, value) in edits {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            if let Ok(state) = decode(&bytes) {
                // Whatever decodes re-encodes to the same bytes: the encoding is canonical.
                prop_assert_eq!(encode_state(&state).unwrap(), bytes);
            }
        }
    }

    fn sample_info() -> SnapshotInfo {
        let shape = BoardShape {
            ram_bytes: 64 << 20,
            icount_per_tick: 10,
            disk_read_only: Some(true),
            net_mac: Some([2, 0, 0, 0, 0, 9]),
        };
        SnapshotInfo {
            format_version: FORMAT_VERSION,
            icount: 123,
            ram_bytes: shape.ram_bytes,
            icount_per_tick: 10,
            disk: Some(SnapshotDisk { sectors: 4096, read_only: true }),
            net_mac: shape.net_mac,
            ram_pages_saved: 17,
            disk_sectors_saved: 3,
            config_digest: shape.digest(),
            machine_digest: Digest(0x0123_4567_89ab_cdef_0011_2233_4455_6677),
            body_bytes: 9999,
            body_crc32c: 0xdead_beef,
        }
    }

    fn reseal(header: &mut [u8]) {
        let at = header.len() - 4;
        let crc = crc32c::crc32c(&header[..at]);
        header[at..].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn the_header_round_trips_and_names_what_the_file_holds() {
        let info = sample_info();
        let bytes = encode_header(&info);
        assert_eq!(read_header(&mut &bytes[..]).unwrap(), info);
        let text = info.to_string();
        assert!(
            text.contains("format version 1")
                && text.contains("02:00:00:00:00:09")
                && text.contains("4096 sectors, read-only"),
            "{text}"
        );
    }

    #[test]
    fn another_format_version_is_refused_naming_both() {
        let mut bytes = encode_header(&sample_info());
        bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
        let damaged = read_header(&mut &bytes[..]).unwrap_err();
        assert!(matches!(damaged, SnapshotError::UnsupportedVersion { found: 2, supported: 1, header_intact: false }));
        reseal(&mut bytes);
        let err = read_header(&mut &bytes[..]).unwrap_err();
        assert_eq!(err.to_string(), "snapshot format version 2, this ftvm reads version 1");
        // A later version with a longer header is still recognised by its version.
        let mut longer = bytes[..HEADER_BYTES - 4].to_vec();
        longer[12..16].copy_from_slice(&300u32.to_le_bytes());
        longer.resize(300, 7);
        reseal(&mut longer);
        assert!(matches!(read_header(&mut &longer[..]), Err(SnapshotError::UnsupportedVersion { found: 2, .. })));
    }

    #[test]
    fn a_damaged_or_foreign_header_is_refused() {
        let bytes = encode_header(&sample_info());
        for i in 0..HEADER_BYTES {
            let mut damaged = bytes;
            damaged[i] ^= 0x10;
            let err = read_header(&mut &damaged[..]).unwrap_err();
            let expected = match i {
                0..=7 => matches!(err, SnapshotError::NotASnapshot { .. }),
                8..=11 => matches!(err, SnapshotError::UnsupportedVersion { header_intact: false, .. }),
                12..=15 => matches!(
                    err,
                    SnapshotError::Checksum { .. }
                        | SnapshotError::Truncated { .. }
                        | SnapshotError::Malformed { offset: 12, .. }
                ),
                _ => matches!(err, SnapshotError::Checksum { what: "header", .. }),
            };
            assert!(expected, "byte {i}: {err}");
        }
        for len in 0..HEADER_BYTES {
            let err = read_header(&mut &bytes[..len]).unwrap_err();
            assert!(matches!(err, SnapshotError::Truncated { offset, .. } if offset == len as u64), "{len}: {err}");
        }
        let err = read_header(&mut &b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0"[..]).unwrap_err();
        assert!(err.to_string().starts_with("not an ftvm snapshot"), "{err}");
    }

    #[test]
    fn header_fields_that_contradict_each_other_are_refused() {
        let cases: [(usize, &[u8]); 5] = [
            (28, &[0x2, 0, 0, 0]),              // read-only without a disk
            (40, &[0, 0x10, 0, 0, 0, 0, 0, 0]), // RAM not page aligned... and too small
            (48, &[0; 8]),                      // no timer rate
            (72, &[0xff; 8]),                   // more pages saved than RAM has
            (88, &[0; 32]),                     // a digest of other fields
        ];
        for (at, bytes) in cases {
            let mut header = encode_header(&sample_info());
            header[at..at + bytes.len()].copy_from_slice(bytes);
            reseal(&mut header);
            let err = read_header(&mut &header[..]).unwrap_err();
            assert!(matches!(err, SnapshotError::Malformed { offset, .. } if offset == at as u64), "{at}: {err}");
        }
    }

    #[test]
    fn the_config_digest_covers_every_part_of_the_board_shape() {
        let mut config = MachineConfig::new("kernel");
        let mut seen = vec![config_digest(&config)];
        config.ram_size *= 2;
        seen.push(config_digest(&config));
        config.icount_per_tick = 20;
        seen.push(config_digest(&config));
        config.disk = Some(crate::DiskConfig { path: "a.img".into(), read_only: false });
        seen.push(config_digest(&config));
        config.disk = Some(crate::DiskConfig { path: "b.img".into(), read_only: true });
        seen.push(config_digest(&config));
        config.net_mac = Some([2, 0, 0, 0, 0, 1]);
        seen.push(config_digest(&config));
        config.net_mac = Some([2, 0, 0, 0, 0, 2]);
        seen.push(config_digest(&config));
        let unique: std::collections::HashSet<_> = seen.iter().collect();
        assert_eq!(unique.len(), seen.len());
        // Not the kernel, initrd or command line: they only shape the initial RAM.
        let mut other = config.clone();
        other.kernel = "other".into();
        other.bootargs = "console=ttyS0".into();
        other.disk = Some(crate::DiskConfig { path: "elsewhere.img".into(), read_only: true });
        assert_eq!(config_digest(&other), config_digest(&config));
    }

    #[test]
    fn extents_merge_neighbours_up_to_the_cap() {
        let mut e = Extents::default();
        for i in 0..600u64 {
            e.push(i, i != 5 && i != 6);
        }
        assert_eq!(e.runs, vec![(0, 5), (7, 256), (263, 256), (519, 81)]);
        assert_eq!(e.units, 598);
        assert_eq!(e.section_bytes(512), 12 + 4 * 12 + 598 * 512);
    }

    /// Collects what an extent section holds.
    #[derive(Debug, Default)]
    struct Collect {
        gaps: Vec<(u64, u64)>,
        extents: Vec<(u64, Vec<u8>)>,
    }

    impl ExtentSink for Collect {
        fn gap(&mut self, first: u64, count: u64) -> Result<()> {
            self.gaps.push((first, count));
            Ok(())
        }
        fn extent(&mut self, first: u64, data: &[u8]) -> Result<()> {
            self.extents.push((first, data.to_vec()));
            Ok(())
        }
    }

    const SPEC: ExtentSpec = ExtentSpec { tag: TAG_DISK, unit_bytes: 512, unit_count: 16 };

    fn section(extents: &[(u64, u32)]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut sink = Sink { out: &mut out, written: 0, body_crc: 0, section_crc: 0, section_end: 0 };
        let runs = Extents { runs: extents.to_vec(), units: 0 };
        write_extents(&mut sink, SPEC.tag, 512, SPEC.unit_count, &runs, |first, buf| {
            buf.fill(first as u8 + 1);
            Ok(())
        })
        .unwrap();
        out
    }

    fn parse(bytes: &[u8]) -> Result<Collect> {
        let mut collect = Collect::default();
        let mut cursor = Cursor::new(bytes);
        let mut src = Source::new(&mut cursor, 0);
        read_extents(&mut src, SPEC, bytes.len() as u64, &mut Vec::new(), &mut collect)?;
        Ok(collect)
    }

    #[test]
    fn an_extent_section_reads_back_with_its_gaps() {
        let got = parse(&section(&[(1, 2), (5, 1), (15, 1)])).unwrap();
        assert_eq!(got.gaps, vec![(0, 1), (3, 2), (6, 9), (16, 0)]);
        assert_eq!(got.extents, vec![(1, vec![2; 1024]), (5, vec![6; 512]), (15, vec![16; 512])]);
    }

    /// Rewrites a section's checksum, so that a test reaches the structure checks.
    fn reseal_section(bytes: &mut [u8]) {
        let at = bytes.len() - 4;
        let crc = crc32c::crc32c(&bytes[..at]);
        bytes[at..].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn extents_out_of_order_overlapping_empty_or_beyond_the_end_are_refused() {
        for (extents, problem) in [
            (&[(5, 1), (3, 1)][..], "out of order"),
            (&[(3, 2), (4, 1)][..], "out of order"),
            (&[(15, 2)][..], "beyond 16 units"),
            (&[(u64::MAX, 1)][..], "beyond 16 units"),
            (&[(0, 0)][..], "an extent of 0 units"),
        ] {
            let bytes = if extents[0].1 == 0 {
                let mut b = section(&[]);
                // Splice in an empty extent by hand.
                let len_at = 4;
                let len = u64::from_le_bytes(b[len_at..len_at + 8].try_into().unwrap()) + 12;
                b[len_at..len_at + 8].copy_from_slice(&len.to_le_bytes());
                let end = b.len() - 4;
                b.splice(end..end, [0u8; 12]);
                reseal_section(&mut b);
                b
            } else if extents[0].0 == u64::MAX {
                let mut b = section(&[(0, 1)]);
                b[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
                reseal_section(&mut b);
                b
            } else {
                let mut b = section(&[(0, 1)]);
                // Build the runs ignoring order checks on the writer side.
                let runs = Extents { runs: extents.to_vec(), units: 0 };
                let mut out = Vec::new();
                let mut sink = Sink { out: &mut out, written: 0, body_crc: 0, section_crc: 0, section_end: 0 };
                write_extents(&mut sink, SPEC.tag, 512, SPEC.unit_count, &runs, |_, buf| {
                    buf.fill(1);
                    Ok(())
                })
                .unwrap();
                b.clear();
                b.extend(out);
                b
            };
            let err = parse(&bytes).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(problem), "{extents:?}: {err}");
        }
    }

    #[test]
    fn a_section_with_the_wrong_tag_unit_or_checksum_is_refused() {
        let good = section(&[(2, 1)]);
        let mut tag = good.clone();
        tag[0..4].copy_from_slice(b"RAM\0");
        assert!(parse(&tag).unwrap_err().to_string().contains("expected section \"DISK\", found tag \"RAM\""));
        let mut unit = good.clone();
        unit[12..16].copy_from_slice(&4096u32.to_le_bytes());
        reseal_section(&mut unit);
        assert!(parse(&unit).unwrap_err().to_string().contains("16 units of 4096 bytes, expected 16 of 512"));
        let mut payload = good.clone();
        payload[40] ^= 1;
        assert!(matches!(parse(&payload), Err(SnapshotError::Checksum { what: "disk section", .. })));
        let mut long = good.clone();
        long[4..12].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse(&long).unwrap_err().to_string().contains("runs past the body's end"));
    }
}
