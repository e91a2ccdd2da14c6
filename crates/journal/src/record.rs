//! The records' payloads.
//!
//! | record | payload |
//! |---|---|
//! | header | start u8 (0 boot, 1 snapshot: the next record is the start state) · start icount u64 · RAM bytes u64 · instructions per tick u64 · boot time ns u64 · reboot on reset u8 · MAC flag u8 + 6 bytes · seed flag u8 + u64 · command line (u32 length + bytes) · kernel · initrd flag u8 + initrd · disk flag u8 + disk |
//! | image file | path (u32 length + UTF-8) · size u64 · SHA-256 (32 bytes) |
//! | disk | path of the start contents (u32 length + UTF-8; relative paths are beside the log) · read-only u8 · sectors u64 · XXH3-128 of the contents (16 bytes) |
//! | input | icount u64 · tag u8 (1 console, 2 frame, 3 entropy: then the bytes; 4 idle skip: ticks u64; 5 clock rate: instructions per tick u64) |
//! | digest | icount u64 · machine digest u128 ([`machine::Machine::digest`]) · output digest u128 ([`crate::OutputDigest`]: of the outputs since the previous digest or snapshot record) · the region digests whose root the machine digest is (`regions.rs`: those changed since the previous digest record) |
//! | snapshot | icount u64 · a machine snapshot file (`machine::snapshot`, its own format) |
//! | delta | icount u64 · a `machine::checkpoint` payload (not full, with a digest record): the pages, disk sectors and state that differ from the previous snapshot or delta |
//! | end | the digest record's fields (region digests included) · reason u8 (0 power-off, 1 reset, 2 stopped) · exit code u32 |

use crate::error::{JournalError, Result};
use bounded_reader::Reader;
use machine::digest::RegionDigests;
use machine::{Input, InputKind, MachineConfig};
use sha2::{Digest as _, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

const MAX_PATH_BYTES: usize = 4096;
const MAX_BOOTARGS_BYTES: usize = machine::machine::MAX_BOOTARGS_BYTES;

/// How a recorded run starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The machine boots from the images.
    Boot,
    /// From the state of the snapshot record that follows the header, at this icount.
    Snapshot { icount: u64 },
}

/// A file the machine loads, with its digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFile {
    pub path: String,
    pub size_bytes: u64,
    pub sha256: [u8; 32],
}

/// The disk as it was at the start of the recording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskImage {
    /// Where the start contents are kept (a copy beside the log, `ftvm run --record`):
    /// a relative path is relative to the log's directory.
    pub path: String,
    pub read_only: bool,
    pub sectors: u64,
    /// XXH3-128 of the contents ([`file_digest`]).
    pub digest: u128,
}

/// The log's first record: what the machine is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogHeader {
    pub start: Start,
    pub ram_size: u64,
    pub icount_per_tick: u64,
    /// The guest's real-time clock at boot (state: a replay boots at the same time).
    pub boot_unix_ns: u64,
    pub reboot_on_reset: bool,
    pub net_mac: Option<[u8; 6]>,
    /// `--seed`, when the run drew its entropy from a seeded generator (information only:
    /// the entropy itself is logged).
    pub seed: Option<u64>,
    pub bootargs: String,
    pub kernel: ImageFile,
    pub initrd: Option<ImageFile>,
    pub disk: Option<DiskImage>,
}

/// A digest of the machine and of everything it output, at an instruction count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateDigest {
    pub icount: u64,
    pub machine: u128,
    pub outputs: u128,
}

/// Why the recorded run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    PowerOff {
        code: u32,
    },
    Reset,
    /// The run was stopped from outside (quit, `ctl stop`, a hung guest).
    Stopped,
}

/// A record after the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Input(Input),
    /// A digest, with the region digests whose root `state.machine` is (checked by the
    /// reader). `regions` is None only after [`crate::LogReader::seek_to_record`] to a
    /// record after which the log lists regions against a digest record not read.
    Digest {
        state: StateDigest,
        regions: Option<RegionDigests>,
    },
    /// A machine snapshot at `icount`; its bytes lie in the log at `section`.
    Snapshot {
        icount: u64,
        section: crate::Section,
    },
    /// What changed since the previous snapshot or delta, at `icount`: applied in order to
    /// the machine restored from the last snapshot before it, it gives the state at `icount`.
    Delta {
        icount: u64,
        section: crate::Section,
    },
    End {
        state: StateDigest,
        regions: Option<RegionDigests>,
        reason: EndReason,
    },
}

impl Record {
    pub fn icount(&self) -> u64 {
        match self {
            Record::Input(input) => input.icount,
            Record::Digest { state, .. } | Record::End { state, .. } => state.icount,
            Record::Snapshot { icount, .. } | Record::Delta { icount, .. } => *icount,
        }
    }
}

/// Where a recording at `log` keeps the disk's start contents: `<log>.disk`.
pub fn disk_copy_path(log: &Path) -> PathBuf {
    let mut name = log.file_name().unwrap_or_default().to_os_string();
    name.push(".disk");
    log.with_file_name(name)
}

/// SHA-256 of a file.
fn sha256_file(path: &Path) -> Result<(u64, [u8; 32])> {
    let mut file = std::fs::File::open(path).map_err(read_error(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(read_error(path))?;
        if n == 0 {
            return Ok((size, h.finalize().into()));
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
}

/// XXH3-128 of a disk image's contents: each 1 MiB piece that is not all zero, with its
/// index (holes skipped unread, as `Machine::digest` does), so that a sparse disk of
/// gigabytes costs what it holds and the value does not depend on where the file has holes.
pub fn file_digest(path: &Path) -> Result<u128> {
    use machine::devices::virtio::blk::Blk;
    const PIECE_SECTORS: u64 = 2048;
    let blk = Blk::open(path, true)
        .map_err(|e| JournalError::Read { what: path.display().to_string(), source: std::io::Error::other(e) })?;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0; PIECE_SECTORS as usize * 512];
    let sectors = blk.capacity_sectors();
    let mut next = 0;
    while let Some(data) = blk.next_data_sector(next).filter(|&s| s < sectors) {
        let piece_index = data / PIECE_SECTORS;
        let first = piece_index * PIECE_SECTORS;
        let n = (sectors - first).min(PIECE_SECTORS);
        let piece = &mut buf[..n as usize * 512];
        blk.read_sectors(first, piece)
            .map_err(|e| JournalError::Read { what: path.display().to_string(), source: std::io::Error::other(e) })?;
        if piece.iter().any(|&b| b != 0) {
            h.update(&piece_index.to_le_bytes());
            h.update(piece);
        }
        next = first + n;
    }
    h.update(&sectors.to_le_bytes());
    Ok(h.digest128())
}

fn read_error(path: &Path) -> impl Fn(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Read { what: path.display().to_string(), source }
}

fn image_file(path: &Path) -> Result<ImageFile> {
    let (size_bytes, sha256) = sha256_file(path)?;
    let path = path.to_str().ok_or_else(|| JournalError::Unrecordable(format!("{} is not UTF-8", path.display())))?;
    Ok(ImageFile { path: path.to_string(), size_bytes, sha256 })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl LogHeader {
    /// The header of a run of `config` from boot. `disk_start` is where the disk's
    /// contents at the start are kept (as it will be written in the header) and
    /// `disk_file` the file holding them now (they differ when the path is relative).
    pub fn for_boot(config: &MachineConfig, disk_start: Option<(&str, &Path)>) -> Result<LogHeader> {
        let kernel = image_file(&config.kernel)?;
        let initrd = config.initrd.as_deref().map(image_file).transpose()?;
        let disk = match (&config.disk, disk_start) {
            (None, _) => None,
            (Some(_), None) => return Err(JournalError::Unrecordable("the disk's start contents are not kept".into())),
            (Some(disk), Some((name, file))) => {
                let len = std::fs::metadata(file).map_err(read_error(file))?.len();
                Some(DiskImage {
                    path: name.to_string(),
                    read_only: disk.read_only,
                    sectors: len / 512,
                    digest: file_digest(file)?,
                })
            }
        };
        Ok(LogHeader {
            start: Start::Boot,
            ram_size: config.ram_size,
            icount_per_tick: config.icount_per_tick,
            boot_unix_ns: config.boot_unix_ns,
            reboot_on_reset: config.reboot_on_reset,
            net_mac: config.net_mac,
            seed: None,
            bootargs: config.bootargs.clone(),
            kernel,
            initrd,
            disk,
        })
    }

    /// Where the disk's start contents are, for a log at `log_path`: `<log>.disk` beside
    /// it if there is one (so that a log and its disk copy can be moved and renamed
    /// together), else the header's path (a relative one relative to the log's directory).
    pub fn disk_path(&self, log_path: &Path) -> Option<PathBuf> {
        let disk = self.disk.as_ref()?;
        let beside = disk_copy_path(log_path);
        if beside.exists() {
            return Some(beside);
        }
        let path = Path::new(&disk.path);
        Some(if path.is_absolute() {
            path.to_path_buf()
        } else {
            log_path.parent().unwrap_or(Path::new(".")).join(path)
        })
    }

    /// The configuration to replay with: the recorded images (or `kernel`/`initrd`
    /// given instead), the disk at `disk` (an overlay over the start contents, say).
    pub fn machine_config(
        &self,
        kernel: Option<PathBuf>,
        initrd: Option<PathBuf>,
        disk: Option<PathBuf>,
    ) -> MachineConfig {
        let mut config = MachineConfig::new(kernel.unwrap_or_else(|| PathBuf::from(&self.kernel.path)));
        config.initrd = initrd.or_else(|| self.initrd.as_ref().map(|i| PathBuf::from(&i.path)));
        config.ram_size = self.ram_size;
        config.icount_per_tick = self.icount_per_tick;
        config.boot_unix_ns = self.boot_unix_ns;
        config.reboot_on_reset = self.reboot_on_reset;
        config.net_mac = self.net_mac;
        config.bootargs = self.bootargs.clone();
        let read_only = self.disk.as_ref().is_some_and(|d| d.read_only);
        config.disk = disk.map(|path| machine::DiskConfig { path, read_only });
        config
    }

    /// Checks that the kernel and initrd of `config` are the recorded ones, and that the
    /// disk's start contents at `disk_start` are.
    pub fn check_images(&self, config: &MachineConfig, disk_start: Option<&Path>) -> Result<()> {
        let (size, sha) = sha256_file(&config.kernel)?;
        if sha != self.kernel.sha256 {
            let problem = format!(
                "{} ({size} bytes) has SHA-256 {}, the recording's kernel {} ({} bytes) had {}",
                config.kernel.display(),
                hex(&sha),
                self.kernel.path,
                self.kernel.size_bytes,
                hex(&self.kernel.sha256)
            );
            return Err(JournalError::OtherImage { image: "kernel", problem });
        }
        match (&self.initrd, &config.initrd) {
            (None, None) => {}
            (Some(recorded), Some(path)) => {
                let (size, sha) = sha256_file(path)?;
                if sha != recorded.sha256 {
                    let problem = format!(
                        "{} ({size} bytes) has SHA-256 {}, the recording's initrd {} ({} bytes) had {}",
                        path.display(),
                        hex(&sha),
                        recorded.path,
                        recorded.size_bytes,
                        hex(&recorded.sha256)
                    );
                    return Err(JournalError::OtherImage { image: "initrd", problem });
                }
            }
            (Some(_), None) | (None, Some(_)) => {
                let problem = "one run has an initrd and the other none".to_string();
                return Err(JournalError::OtherImage { image: "initrd", problem });
            }
        }
        if let (Some(recorded), Some(path)) = (&self.disk, disk_start) {
            // The digest covers the size too; the header's sector count (which sizes what a
            // reader holds) must be the same size.
            let sectors = std::fs::metadata(path).map_err(read_error(path))?.len() / 512;
            if sectors != recorded.sectors {
                let problem = format!(
                    "{} has {sectors} sectors, the header says the disk at the recording's start had {}",
                    path.display(),
                    recorded.sectors
                );
                return Err(JournalError::OtherImage { image: "disk", problem });
            }
            let digest = file_digest(path)?;
            if digest != recorded.digest {
                let problem = format!(
                    "{} has digest {digest:032x}, the disk at the recording's start had {:032x}",
                    path.display(),
                    recorded.digest
                );
                return Err(JournalError::OtherImage { image: "disk", problem });
            }
        }
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let (start, start_icount) = match self.start {
            Start::Boot => (0u8, 0),
            Start::Snapshot { icount } => (1, icount),
        };
        out.push(start);
        put_u64(&mut out, start_icount);
        put_u64(&mut out, self.ram_size);
        put_u64(&mut out, self.icount_per_tick);
        put_u64(&mut out, self.boot_unix_ns);
        out.push(u8::from(self.reboot_on_reset));
        out.push(u8::from(self.net_mac.is_some()));
        out.extend_from_slice(&self.net_mac.unwrap_or_default());
        out.push(u8::from(self.seed.is_some()));
        put_u64(&mut out, self.seed.unwrap_or(0));
        put_bytes(&mut out, self.bootargs.as_bytes());
        put_image(&mut out, &self.kernel);
        out.push(u8::from(self.initrd.is_some()));
        if let Some(initrd) = &self.initrd {
            put_image(&mut out, initrd);
        }
        out.push(u8::from(self.disk.is_some()));
        if let Some(disk) = &self.disk {
            put_bytes(&mut out, disk.path.as_bytes());
            out.push(u8::from(disk.read_only));
            put_u64(&mut out, disk.sectors);
            out.extend_from_slice(&disk.digest.to_le_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8], offset: u64) -> Result<LogHeader> {
        let malformed = |source| JournalError::Malformed { offset, what: "header", source };
        let mut r = Reader::at_offset(bytes, offset + crate::FRAME_HEADER_BYTES as u64);
        let header = (|| {
            let start = r.u8("start")?;
            let start_icount = r.u64("start icount")?;
            let ram_size = r.u64("RAM size")?;
            let icount_per_tick = r.u64("instructions per tick")?;
            let boot_unix_ns = r.u64("boot time")?;
            let reboot_on_reset = r.bool("reboot on reset")?;
            let has_mac = r.bool("MAC flag")?;
            let mac: [u8; 6] = r.array("MAC")?;
            let has_seed = r.bool("seed flag")?;
            let seed = r.u64("seed")?;
            let bootargs = string(&mut r, "command line", MAX_BOOTARGS_BYTES)?;
            let kernel = get_image(&mut r, "kernel")?;
            let initrd = if r.bool("initrd flag")? { Some(get_image(&mut r, "initrd")?) } else { None };
            let disk = if r.bool("disk flag")? {
                Some(DiskImage {
                    path: string(&mut r, "disk path", MAX_PATH_BYTES)?,
                    read_only: r.bool("disk read-only")?,
                    sectors: r.u64("disk sectors")?,
                    digest: r.u128("disk digest")?,
                })
            } else {
                None
            };
            r.finish()?;
            Ok((
                start,
                LogHeader {
                    start: if start == 0 { Start::Boot } else { Start::Snapshot { icount: start_icount } },
                    ram_size,
                    icount_per_tick,
                    boot_unix_ns,
                    reboot_on_reset,
                    net_mac: has_mac.then_some(mac),
                    seed: has_seed.then_some(seed),
                    bootargs,
                    kernel,
                    initrd,
                    disk,
                },
            ))
        })();
        let (start, header) = header.map_err(malformed)?;
        header.check_shape(start).map_err(|problem| JournalError::Corrupt { offset, problem })?;
        Ok(header)
    }

    /// What a header must say for the reader to trust its sizes (a machine of that RAM and
    /// disk, whose region digests a reader holds): the machine's RAM limits, a disk of at most
    /// [`crate::MAX_DISK_BYTES`].
    fn check_shape(&self, start: u8) -> std::result::Result<(), String> {
        use machine::machine::{MAX_RAM_BYTES, MIN_RAM_BYTES};
        if start > 1 {
            return Err(format!("the header's start is {start}, neither 0 (boot) nor 1 (a snapshot)"));
        }
        let ram = self.ram_size;
        if !(MIN_RAM_BYTES..=MAX_RAM_BYTES).contains(&ram) || !ram.is_multiple_of(4096) {
            return Err(format!(
                "the header's RAM size {ram} is not a multiple of 4 KiB from {MIN_RAM_BYTES} to {MAX_RAM_BYTES}"
            ));
        }
        if let Some(disk) = self.disk.as_ref().filter(|d| d.sectors > crate::MAX_DISK_BYTES / 512) {
            return Err(format!(
                "the header's disk of {} sectors is larger than the {} bytes a log may name",
                disk.sectors,
                crate::MAX_DISK_BYTES
            ));
        }
        Ok(())
    }
}

/// A UTF-8 string; invalid UTF-8 is replaced (paths and command lines are shown, and the
/// images are checked by digest, not by name).
fn string(r: &mut Reader, field: &'static str, max: usize) -> bounded_reader::Result<String> {
    Ok(String::from_utf8_lossy(r.bytes(field, max)?).into_owned())
}

fn get_image(r: &mut Reader, field: &'static str) -> bounded_reader::Result<ImageFile> {
    Ok(ImageFile { path: string(r, field, MAX_PATH_BYTES)?, size_bytes: r.u64(field)?, sha256: r.array(field)? })
}

fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn put_image(out: &mut Vec<u8>, image: &ImageFile) {
    put_bytes(out, image.path.as_bytes());
    put_u64(out, image.size_bytes);
    out.extend_from_slice(&image.sha256);
}

/// An input's encoding in the log (icount, tag, fields); lockstep ships inputs the same way.
pub fn encode_input(input: &Input, out: &mut Vec<u8>) {
    put_u64(out, input.icount);
    match &input.kind {
        InputKind::Console(bytes) => {
            out.push(1);
            out.extend_from_slice(bytes);
        }
        InputKind::NetFrame(bytes) => {
            out.push(2);
            out.extend_from_slice(bytes);
        }
        InputKind::Entropy(bytes) => {
            out.push(3);
            out.extend_from_slice(bytes);
        }
        InputKind::IdleSkip { ticks } => {
            out.push(4);
            put_u64(out, *ticks);
        }
        InputKind::ClockRate { icount_per_tick } => {
            out.push(5);
            put_u64(out, *icount_per_tick);
        }
    }
}

/// An input from its encoding ([`encode_input`]); `offset` names where it was found in errors.
pub fn decode_input(bytes: &[u8], offset: u64) -> Result<Input> {
    let base = offset + crate::FRAME_HEADER_BYTES as u64;
    let mut r = Reader::at_offset(bytes, base);
    let malformed = |source| JournalError::Malformed { offset, what: "input", source };
    let icount = r.u64("icount").map_err(malformed)?;
    let tag = r.u8("input tag").map_err(malformed)?;
    let kind = match tag {
        1 => InputKind::Console(r.rest().to_vec()),
        2 => InputKind::NetFrame(r.rest().to_vec()),
        3 => InputKind::Entropy(r.rest().to_vec()),
        4 => InputKind::IdleSkip { ticks: r.u64("ticks").map_err(malformed)? },
        5 => InputKind::ClockRate { icount_per_tick: r.u64("instructions per tick").map_err(malformed)? },
        _ => return Err(JournalError::Corrupt { offset, problem: format!("unknown input tag {tag}") }),
    };
    r.finish().map_err(malformed)?;
    Ok(Input { icount, kind })
}

/// The fixed bytes of a digest record, and of an end record, before the region digests.
pub(crate) const DIGEST_FIXED_BYTES: u64 = 8 + 16 + 16;
pub(crate) const END_FIXED_BYTES: u64 = DIGEST_FIXED_BYTES + 1 + 4;

/// A digest record's payload: `d`, then `regions` listed against `base` (the previous
/// digest record's regions, if the log lists against them here).
pub(crate) fn encode_digest(d: &StateDigest, regions: &RegionDigests, base: Option<&RegionDigests>, out: &mut Vec<u8>) {
    put_u64(out, d.icount);
    out.extend_from_slice(&d.machine.to_le_bytes());
    out.extend_from_slice(&d.outputs.to_le_bytes());
    crate::regions::encode(regions, base, out);
}

fn get_digest(r: &mut Reader) -> bounded_reader::Result<StateDigest> {
    Ok(StateDigest { icount: r.u64("icount")?, machine: r.u128("machine digest")?, outputs: r.u128("output digest")? })
}

/// The digest fields and the region digests, checked: their root must be the machine digest.
fn get_digest_and_regions(
    r: &mut Reader,
    base: Option<&RegionDigests>,
    max_regions: u64,
    offset: u64,
    what: &'static str,
) -> Result<(StateDigest, Option<RegionDigests>)> {
    let state = get_digest(r).map_err(|source| JournalError::Malformed { offset, what, source })?;
    let regions = crate::regions::decode(r, base, max_regions, offset, what)?;
    if let Some(root) = regions.as_ref().map(|r| r.root().0).filter(|&root| root != state.machine) {
        let problem =
            format!("its region digests make the machine digest {root:032x}, but it records {:032x}", state.machine);
        return Err(JournalError::Corrupt { offset, problem });
    }
    Ok((state, regions))
}

pub(crate) fn decode_digest(
    bytes: &[u8],
    offset: u64,
    base: Option<&RegionDigests>,
    max_regions: u64,
) -> Result<(StateDigest, Option<RegionDigests>)> {
    let mut r = Reader::at_offset(bytes, offset + crate::FRAME_HEADER_BYTES as u64);
    let digest = get_digest_and_regions(&mut r, base, max_regions, offset, "digest")?;
    r.finish().map_err(|source| JournalError::Malformed { offset, what: "digest", source })?;
    Ok(digest)
}

pub(crate) fn encode_end(
    state: &StateDigest,
    regions: &RegionDigests,
    base: Option<&RegionDigests>,
    reason: EndReason,
    out: &mut Vec<u8>,
) {
    encode_digest(state, regions, base, out);
    let (tag, code) = match reason {
        EndReason::PowerOff { code } => (0u8, code),
        EndReason::Reset => (1, 0),
        EndReason::Stopped => (2, 0),
    };
    out.push(tag);
    out.extend_from_slice(&code.to_le_bytes());
}

/// What an end record holds: the last digest, its regions and why the run ended.
pub(crate) type End = (StateDigest, Option<RegionDigests>, EndReason);

pub(crate) fn decode_end(bytes: &[u8], offset: u64, base: Option<&RegionDigests>, max_regions: u64) -> Result<End> {
    let mut r = Reader::at_offset(bytes, offset + crate::FRAME_HEADER_BYTES as u64);
    let (state, regions) = get_digest_and_regions(&mut r, base, max_regions, offset, "end")?;
    let end = (|| {
        let tag = r.u8("end reason")?;
        let code = r.u32("exit code")?;
        r.finish()?;
        Ok((tag, code))
    })();
    let (tag, code) = end.map_err(|source| JournalError::Malformed { offset, what: "end", source })?;
    let reason = match tag {
        0 => EndReason::PowerOff { code },
        1 => EndReason::Reset,
        2 => EndReason::Stopped,
        _ => return Err(JournalError::Corrupt { offset, problem: format!("unknown end reason {tag}") }),
    };
    Ok((state, regions, reason))
}
