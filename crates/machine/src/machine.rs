//! The machine: hart + board, and the verbs the layers above build everything from
//! (DESIGN.md §6): run until an instruction count, push stamped inputs, drain stamped
//! outputs, take dirty pages, digest.
//!
//! Determinism: the machine's behaviour is a function of its initial state and the
//! inputs with their stamps only, however `run` calls are split (the hart checks its
//! budget before anything else in each step, so a split never reorders events).

use crate::board::{Board, RAM_BASE, VIRTIO_SLOTS};
use crate::devices::clint::HartRequest;
use crate::devices::virtio::{blk::Blk, net::Net, rng::Rng, VirtioDevice, VirtioMmio};
use crate::digest::{Bitmap, RegionDigests, RegionTree, SECTORS_PER_LEAF, SECTORS_PER_REGION};
use crate::io::{Input, InputKind, Output, OutputKind};
use crate::loader::{self, LoadError};
use crate::{fdt, sbi};
use rv64::{Exit, Hart, HartConfig, PrivMode};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use thiserror::Error;

/// The smallest RAM ftvm accepts (the kernel alone needs tens of MiB).
pub const MIN_RAM_BYTES: u64 = 16 << 20;
/// The largest (the address space above RAM_BASE that Sv39 kernels map easily).
pub const MAX_RAM_BYTES: u64 = 64 << 30;
/// The counter-enable bits for `cycle`, `time` and `instret` (mcounteren/scounteren).
const COUNTERS_CY_TM_IR: u64 = 0x7;
/// Inputs waiting to be applied, beyond which pushes are refused.
pub const MAX_PENDING_INPUTS: usize = 1 << 16;
/// The slowest guest clock a [`InputKind::ClockRate`] may set: one tick per this many
/// instructions (with a 10 MHz timebase, 10 thousand instructions per guest second).
pub const MAX_ICOUNT_PER_TICK: u64 = 1_000_000;
/// The longest kernel command line a machine boots with (it must fit the device tree's
/// room, [`loader::FDT_RESERVE`], with the rest of the tree).
pub const MAX_BOOTARGS_BYTES: usize = 16 << 10;
// The rest of the device tree takes a few KiB.
const _: () = assert!(2 * MAX_BOOTARGS_BYTES as u64 <= loader::FDT_RESERVE);

#[derive(Debug, Clone)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

/// What a machine is built from.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    pub ram_size: u64,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub bootargs: String,
    pub disk: Option<DiskConfig>,
    /// MAC address of the network card; `None` for no network card.
    pub net_mac: Option<[u8; 6]>,
    /// Instructions per timer tick (10 MHz timebase) at boot: the nominal guest speed.
    /// A [`InputKind::ClockRate`] input changes it while the machine runs.
    pub icount_per_tick: u64,
    /// The real-time clock's value at boot, in ns since the Unix epoch: the guest's
    /// wall-clock time is this plus guest time. `ftvm` sets the host's time at start;
    /// 0 (the default) starts the guest in 1970. Not part of the configuration digest:
    /// replicas built at different moments are the same VM, and a snapshot or checkpoint
    /// carries the clock (the RTC's state) with it.
    pub boot_unix_ns: u64,
    /// The engine that runs guest code (the same guest either way; a matter of speed).
    pub cpu: rv64::Cpu,
    /// A guest reset (the test device's RESET, SBI system reset) reboots the machine at
    /// that instruction: the kernel, initrd and device tree are loaded again and the hart
    /// starts over, with the disk, the network card's MAC and the clock kept (see
    /// [`Machine::run`]). When false the machine ends with [`RunExit::Reset`] instead
    /// (`ftvm --no-reboot`, as QEMU's `-no-reboot`). Not part of the configuration
    /// digest: it is the monitor's policy, like the kernel file a reboot loads.
    pub reboot_on_reset: bool,
    /// The disk image is only read: writes go to a copy-on-write overlay that vanishes
    /// with the machine ([`Machine::start_disk_overlay`] from the start, so that restoring
    /// a snapshot writes the overlay too). A replay runs so over a recording's start
    /// contents. Not part of the configuration digest: the guest sees the same disk.
    pub disk_overlay: bool,
}

impl MachineConfig {
    pub fn new(kernel: impl Into<PathBuf>) -> MachineConfig {
        MachineConfig {
            ram_size: 512 << 20,
            kernel: kernel.into(),
            initrd: None,
            bootargs: String::new(),
            disk: None,
            net_mac: None,
            icount_per_tick: 10,
            boot_unix_ns: 0,
            cpu: rv64::Cpu::host_default(),
            reboot_on_reset: true,
            disk_overlay: false,
        }
    }
}

#[derive(Debug, Error)]
pub enum MachineError {
    #[error("cannot read kernel {path}")]
    ReadKernel { path: PathBuf, source: std::io::Error },
    #[error("cannot read initrd {path}")]
    ReadInitrd { path: PathBuf, source: std::io::Error },
    #[error("cannot load kernel {path}")]
    Kernel { path: PathBuf, source: LoadError },
    #[error("cannot load initrd {path}")]
    Initrd { path: PathBuf, source: LoadError },
    /// The disk image cannot be attached (its error names the file).
    #[error(transparent)]
    Disk(crate::devices::virtio::VirtioError),
    #[error("memory size {size} bytes is too small: at least {min} bytes (16M) are needed")]
    RamTooSmall { size: u64, min: u64 },
    #[error("memory size {size} bytes is too large: at most {max} bytes (64G)")]
    RamTooLarge { size: u64, max: u64 },
    #[error("memory size {size} bytes is not a multiple of 4 KiB")]
    RamUnaligned { size: u64 },
    #[error("the mapping given as RAM is {bytes} bytes, the machine has {ram_bytes}")]
    RamMapping { bytes: u64, ram_bytes: u64 },
    #[error("cannot allocate {size} bytes of guest memory: the host refused (ask for less with --mem)")]
    RamUnavailable { size: u64 },
    #[error("cannot build the device tree")]
    Fdt(#[source] vm_fdt::Error),
    #[error("the kernel command line is {len} bytes, more than the {MAX_BOOTARGS_BYTES} a machine boots with")]
    BootargsTooLong { len: usize },
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum InputError {
    #[error("input stamped at icount {stamp} is in the past: the machine is at icount {now}")]
    InPast { stamp: u64, now: u64 },
    #[error("too many inputs waiting ({MAX_PENDING_INPUTS})")]
    QueueFull,
    #[error("the machine has no {0} device")]
    NoDevice(&'static str),
    #[error("clock rate of {0} instructions per tick is outside 1..={MAX_ICOUNT_PER_TICK}")]
    ClockRate(u64),
}

/// Why [`Machine::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunExit {
    /// Reached the requested instruction count.
    Budget,
    /// The guest waits for an interrupt; nothing will happen until an input arrives
    /// (an idle skip to `next_deadline_ticks`, or a frame, a key...).
    Idle {
        next_deadline_ticks: Option<u64>,
    },
    PowerOff {
        code: u32,
    },
    /// The guest asked for a reset and the machine does not reboot
    /// ([`MachineConfig::reboot_on_reset`] is off).
    Reset,
}

/// The machine's state apart from RAM and the disk's contents, as plain data: what
/// a checkpoint carries besides dirty pages and sectors, and a snapshot besides all
/// pages. Cheap to take (no RAM copy).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MachineState {
    pub hart: rv64::HartState,
    pub uart: crate::devices::uart::UartState,
    pub plic: crate::devices::plic::PlicState,
    /// The real-time clock, its base (the boot time) included.
    pub rtc: crate::devices::rtc::RtcState,
    /// Instructions per timer tick now: the guest clock's rate (see
    /// [`InputKind::ClockRate`]); guest time is `icount / icount_per_tick +
    /// hart.time_offset_ticks`.
    pub icount_per_tick: u64,
    /// Reboots since the machine was built (each at a guest reset).
    pub reboots: u64,
    /// The kernel command line a reboot boots with (in the device tree it rebuilds):
    /// state, so that a restored or taken-over VM reboots into the same command.
    pub bootargs: String,
    pub virtio: Vec<crate::devices::virtio::VirtioMmioState>,
    /// Inputs queued for later instruction counts.
    pub pending_inputs: Vec<Input>,
    /// Set once the guest powered off, or reset without a reboot.
    pub ended: Option<RunExit>,
}

#[derive(Debug, Error)]
pub enum RestoreError {
    #[error("saved state has {saved} virtio devices but this machine's configuration has {configured}")]
    DeviceCount { saved: usize, configured: usize },
    #[error("virtio device {slot}")]
    Virtio { slot: usize, source: crate::devices::virtio::VirtioError },
    #[error("page {index} is outside RAM ({pages} pages) or not {size} bytes", size = rv64::mem::PAGE_SIZE)]
    Page { index: usize, pages: usize },
    /// The host failed a disk read or write (its error names the file and sector).
    #[error(transparent)]
    Disk(crate::devices::virtio::VirtioError),
    #[error("the machine has no disk")]
    NoDisk,
    #[error("the saved kernel command line cannot boot this machine")]
    Bootargs(#[source] Box<MachineError>),
    #[error("saved {component} state does not fit this machine: {problem}")]
    Invalid { component: &'static str, problem: String },
}

/// A digest of the whole machine state (RAM, hart, devices, disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest(pub u128);

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

pub struct Machine {
    hart: Hart,
    board: Board,
    pending: VecDeque<Input>,
    /// Set once the guest powered off, or reset without a reboot: the machine runs no
    /// further.
    ended: Option<RunExit>,
    /// The configuration's clock rate (the rate now is the hart's).
    boot_icount_per_tick: u64,
    /// What a reboot loads again.
    boot: BootImage,
    reboot_on_reset: bool,
    reboots: u64,
    bootargs: String,
    /// The region digests of RAM and disk, brought up to date by each digest.
    digests: Mutex<DigestCache>,
    /// Pages and sectors written before a digest looked at them and moved out of the
    /// RAM's and disk's own dirty logs since (see [`Machine::fold_digest_view`]): the
    /// next [`Machine::take_dirty_pages`] / [`Machine::take_dirty_sectors`] returns them.
    owed_pages: Bitmap,
    owed_sectors: Bitmap,
}

/// What incremental digests keep between two digests.
///
/// The RAM's and the disk's dirty logs belong to checkpoints (`take_dirty_*`). A digest
/// reads them without taking them, plus `*_pending`: what checkpoints took since the last
/// digest. Every page or disk leaf written since the last digest is in one of the two, so
/// the digest rehashes exactly those. Afterwards the logs still hold pages the digest has
/// now seen: `fold_due` says so, and the next `&mut` verb that could write RAM or the disk
/// first moves them to `owed_*` (still owed to checkpoints, no longer new to digests).
#[derive(Debug)]
struct DigestCache {
    /// None until the first digest (which hashes everything), or after a change that
    /// bypassed dirty tracking.
    trees: Option<Trees>,
    ram_pending: Bitmap,
    /// Disk leaves (8 sectors) taken by checkpoints since the last digest.
    disk_pending: Bitmap,
    fold_due: bool,
    last_work: DigestWork,
}

/// What the last digest hashed (for benchmarks and status).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DigestWork {
    /// It hashed everything (the first digest, or one after [`Machine::forget_digests`]).
    pub from_scratch: bool,
    /// RAM pages and disk leaves (8 sectors) hashed.
    pub ram_leaves: usize,
    pub disk_leaves: usize,
}

#[derive(Debug)]
struct Trees {
    ram: RegionTree,
    disk: Option<RegionTree>,
}

/// The kernel and initrd as read when the machine was built, and where they go. Kept in
/// memory, as QEMU keeps its ROM blobs: a reboot must load the very bytes every replica
/// and every replay loads, whatever happens to the files meanwhile.
struct BootImage {
    kernel: Vec<u8>,
    initrd: Option<Vec<u8>>,
    layout: loader::BootLayout,
    /// The device tree's parts that come from the configuration.
    ram_size: u64,
    virtio_slots: usize,
}

impl BootImage {
    /// The device tree booting with `bootargs` (one within [`MAX_BOOTARGS_BYTES`] leaves
    /// the tree well inside its room).
    fn fdt(&self, bootargs: &str) -> Result<Vec<u8>, MachineError> {
        if bootargs.len() > MAX_BOOTARGS_BYTES {
            return Err(MachineError::BootargsTooLong { len: bootargs.len() });
        }
        let fdt_config = fdt::FdtConfig {
            ram_size: self.ram_size,
            bootargs,
            initrd: self.layout.initrd,
            virtio_slots: self.virtio_slots,
        };
        fdt::build(&fdt_config).map_err(MachineError::Fdt)
    }

    /// Copy kernel, initrd and device tree into RAM.
    fn place(&self, ram: &mut rv64::GuestRam, fdt: &[u8]) -> Result<(), LoadError> {
        loader::place(ram, &self.layout, &self.kernel, self.initrd.as_deref(), fdt)
    }
}

fn read_file(path: &Path) -> std::io::Result<Vec<u8>> {
    std::fs::read(path)
}

/// Fault point `machine::input` (with the `failpoints` feature): `return(KIND)` makes
/// applying an input of that kind (`console`, `frame`, `entropy`, `idle`, `rate`) panic,
/// every time — a poison input, as a bug in device emulation would make one.
#[cfg(feature = "failpoints")]
fn poison_point(kind: &InputKind) {
    let name = match kind {
        InputKind::Console(_) => "console",
        InputKind::NetFrame(_) => "frame",
        InputKind::Entropy(_) => "entropy",
        InputKind::IdleSkip { .. } => "idle",
        InputKind::ClockRate { .. } => "rate",
    };
    if fail::eval("machine::input", |arg| arg).flatten().is_some_and(|k| k == name) {
        panic!("fault point machine::input: a poisoned {name} input");
    }
}

#[cfg(not(feature = "failpoints"))]
fn poison_point(_kind: &InputKind) {}

impl Machine {
    /// Build a machine and load the kernel, initrd and device tree; the hart starts
    /// in S-mode at the kernel's entry, as firmware would leave it.
    pub fn new(config: &MachineConfig) -> Result<Machine, MachineError> {
        Machine::build(config, None).map(|(machine, _)| machine)
    }

    /// [`Machine::new`] with its RAM in `mapping` (of the configuration's RAM size; a
    /// resilient monitor maps its recovery region's RAM image, docs/microreboot.md): the
    /// boot image is laid over what the mapping holds. Also returns the pages the boot
    /// image was laid on.
    pub fn new_over(
        config: &MachineConfig,
        mapping: Box<dyn rv64::RamMapping>,
    ) -> Result<(Machine, Vec<usize>), MachineError> {
        Machine::build(config, Some(mapping))
    }

    fn build(
        config: &MachineConfig,
        mapping: Option<Box<dyn rv64::RamMapping>>,
    ) -> Result<(Machine, Vec<usize>), MachineError> {
        let size = config.ram_size;
        if size < MIN_RAM_BYTES {
            return Err(MachineError::RamTooSmall { size, min: MIN_RAM_BYTES });
        }
        if size > MAX_RAM_BYTES {
            return Err(MachineError::RamTooLarge { size, max: MAX_RAM_BYTES });
        }
        if !size.is_multiple_of(4096) {
            return Err(MachineError::RamUnaligned { size });
        }
        let kernel_path = &config.kernel;
        let kernel =
            read_file(kernel_path).map_err(|source| MachineError::ReadKernel { path: kernel_path.clone(), source })?;
        let header = loader::parse_header(&kernel)
            .map_err(|source| MachineError::Kernel { path: kernel_path.clone(), source })?;
        let initrd = match &config.initrd {
            Some(path) => {
                Some(read_file(path).map_err(|source| MachineError::ReadInitrd { path: path.clone(), source })?)
            }
            None => None,
        };
        let layout =
            loader::layout(&header, initrd.as_ref().map(|i| i.len() as u64), size).map_err(|source| match source {
                LoadError::InitrdTooLarge { .. } => {
                    MachineError::Initrd { path: config.initrd.clone().unwrap_or_default(), source }
                }
                _ => MachineError::Kernel { path: kernel_path.clone(), source },
            })?;
        let virtio = Self::build_virtio(config)?;
        let boot = BootImage { kernel, initrd, layout, ram_size: size, virtio_slots: virtio.len() };
        let blob = boot.fdt(&config.bootargs)?;
        let mut ram = match mapping {
            Some(mapping) if mapping.len() as u64 != size => {
                return Err(MachineError::RamMapping { bytes: mapping.len() as u64, ram_bytes: size })
            }
            Some(mapping) => rv64::GuestRam::over(RAM_BASE, mapping),
            None => rv64::GuestRam::try_new(RAM_BASE, size).ok_or(MachineError::RamUnavailable { size })?,
        };
        boot.place(&mut ram, &blob).map_err(|source| MachineError::Kernel { path: kernel_path.clone(), source })?;
        let boot_pages = ram.take_dirty_pages(); // the initial image is the baseline, not a change

        let icount_per_tick = config.icount_per_tick.clamp(1, MAX_ICOUNT_PER_TICK);
        let hart_config =
            HartConfig { icount_per_tick, sbi_in_monitor: true, cpu: config.cpu, ..HartConfig::default() };
        let mut hart = Hart::new(hart_config, layout.entry);
        boot_state(&mut hart, layout.fdt_addr);
        let board = Board::new(ram, virtio, config.boot_unix_ns);
        let pages = board.ram.page_count();
        let sectors = board.virtio.iter().find_map(|d| match d.device() {
            VirtioDevice::Blk(blk) => Some(blk.capacity_sectors() as usize),
            _ => None,
        });
        let digests = DigestCache {
            trees: None,
            ram_pending: Bitmap::new(pages),
            disk_pending: Bitmap::new(sectors.unwrap_or(0).div_ceil(SECTORS_PER_LEAF as usize)),
            fold_due: false,
            last_work: DigestWork::default(),
        };
        let machine = Machine {
            hart,
            board,
            pending: VecDeque::new(),
            ended: None,
            boot_icount_per_tick: icount_per_tick,
            boot,
            reboot_on_reset: config.reboot_on_reset,
            reboots: 0,
            bootargs: config.bootargs.clone(),
            digests: Mutex::new(digests),
            owed_pages: Bitmap::new(pages),
            owed_sectors: Bitmap::new(sectors.unwrap_or(0)),
        };
        Ok((machine, boot_pages))
    }

    fn build_virtio(config: &MachineConfig) -> Result<Vec<VirtioMmio>, MachineError> {
        let mut devices = Vec::new();
        if let Some(disk) = &config.disk {
            let mut blk = Blk::open(&disk.path, disk.read_only).map_err(MachineError::Disk)?;
            if config.disk_overlay {
                blk.start_overlay().map_err(MachineError::Disk)?;
            }
            devices.push(VirtioMmio::new(VirtioDevice::Blk(blk)));
        }
        if let Some(mac) = config.net_mac {
            devices.push(VirtioMmio::new(VirtioDevice::Net(Net::new(mac))));
        }
        devices.push(VirtioMmio::new(VirtioDevice::Rng(Rng::new())));
        debug_assert!(devices.len() <= VIRTIO_SLOTS);
        Ok(devices)
    }

    pub fn icount(&self) -> u64 {
        self.hart.state.icount
    }

    /// Guest time in timer ticks (10 MHz).
    pub fn time_ticks(&self) -> u64 {
        self.hart.time()
    }

    /// Instructions per timer tick now (the last [`InputKind::ClockRate`], or the
    /// configuration's).
    pub fn icount_per_tick(&self) -> u64 {
        self.hart.config.icount_per_tick
    }

    /// The fastest clock rate an [`InputKind::ClockRate`] takes now: the fewest
    /// instructions per tick that keep guest time from going back (`icount / rate` must
    /// not exceed guest time). A faster request is raised to this.
    pub fn min_icount_per_tick(&self) -> u64 {
        self.icount() / (self.hart.time() + 1) + 1
    }

    /// Instructions per timer tick at boot, as configured (a snapshot is restored into a
    /// machine configured the same).
    pub fn boot_icount_per_tick(&self) -> u64 {
        self.boot_icount_per_tick
    }

    /// The real-time clock's registers and alarm.
    pub fn rtc(&self) -> &crate::devices::rtc::RtcState {
        &self.board.rtc.state
    }

    /// The guest's real-time clock now, in ns since the Unix epoch.
    pub fn rtc_unix_ns(&self) -> u64 {
        self.board.rtc.now_ns(self.hart.time())
    }

    pub fn hart(&self) -> &Hart {
        &self.hart
    }

    pub fn ram(&self) -> &rv64::GuestRam {
        &self.board.ram
    }

    /// The block device, if the machine has one (snapshots read its sectors).
    pub fn disk(&self) -> Option<&crate::devices::virtio::blk::Blk> {
        self.board.virtio.iter().find_map(|d| match d.device() {
            VirtioDevice::Blk(blk) => Some(blk),
            _ => None,
        })
    }

    /// Queue an input. Its stamp must not be in the past; inputs with equal stamps
    /// apply in the order they were pushed. An input stamped where the machine stands takes
    /// effect at once: so the state at an icount is that of every input stamped up to it,
    /// however many runs stopped there (a live driver runs an idle guest between its idle
    /// skips; a replay or a lockstep backup pushes them back to back), and digests agree.
    pub fn push_input(&mut self, input: Input) -> Result<(), InputError> {
        let now = self.icount();
        if input.icount < now {
            return Err(InputError::InPast { stamp: input.icount, now });
        }
        if self.pending.len() >= MAX_PENDING_INPUTS {
            return Err(InputError::QueueFull);
        }
        let needed = match input.kind {
            InputKind::NetFrame(_) => Some(("network", self.has(|d| matches!(d, VirtioDevice::Net(_))))),
            InputKind::ClockRate { icount_per_tick } if !(1..=MAX_ICOUNT_PER_TICK).contains(&icount_per_tick) => {
                return Err(InputError::ClockRate(icount_per_tick));
            }
            _ => None,
        };
        if let Some((name, false)) = needed {
            return Err(InputError::NoDevice(name));
        }
        let due = input.icount == now && self.ended.is_none();
        let at = self.pending.partition_point(|queued| queued.icount <= input.icount);
        self.pending.insert(at, input);
        if due {
            self.fold_digest_view();
            self.apply_due_inputs();
            self.update_rtc();
        }
        Ok(())
    }

    fn has(&self, f: impl Fn(&VirtioDevice) -> bool) -> bool {
        self.board.virtio.iter().any(|d| f(d.device()))
    }

    /// True when the entropy device waits for bytes (feed it with an Entropy input).
    pub fn wants_entropy(&self) -> bool {
        self.board.virtio.iter().any(|d| d.wants_entropy())
    }

    /// Outputs produced since the last call, in order.
    pub fn take_outputs(&mut self) -> Vec<Output> {
        self.board.outputs.take()
    }

    /// RAM pages (indices from RAM base) written since the last call, ascending (digests
    /// taken meanwhile change nothing here).
    pub fn take_dirty_pages(&mut self) -> Vec<usize> {
        self.fold_digest_view();
        let taken = self.board.ram.take_dirty_pages();
        let cache = self.digests.get_mut().unwrap_or_else(PoisonError::into_inner);
        if cache.trees.is_some() {
            taken.iter().for_each(|&p| cache.ram_pending.set(p));
        }
        if self.owed_pages.is_empty() {
            return taken;
        }
        taken.into_iter().for_each(|p| self.owed_pages.set(p));
        self.owed_pages.drain()
    }

    fn apply_due_inputs(&mut self) {
        let now = self.icount();
        while self.pending.front().is_some_and(|i| i.icount <= now) {
            let input = self.pending.pop_front().expect("checked non-empty");
            self.apply(input.kind);
        }
        self.board.update_irqs();
    }

    fn apply(&mut self, kind: InputKind) {
        poison_point(&kind);
        let icount = self.icount();
        let board = &mut self.board;
        let mut ctx = crate::devices::DeviceCtx { ram: &mut board.ram, outputs: &mut board.outputs, icount };
        match kind {
            InputKind::Console(bytes) => board.uart.receive(&bytes),
            InputKind::NetFrame(frame) => {
                if let Some(dev) = board.virtio.iter_mut().find(|d| matches!(d.device(), VirtioDevice::Net(_))) {
                    dev.receive_frame(&frame, &mut ctx);
                }
            }
            InputKind::Entropy(bytes) => {
                if let Some(dev) = board.virtio.iter_mut().find(|d| matches!(d.device(), VirtioDevice::Rng(_))) {
                    dev.add_entropy(&bytes, &mut ctx);
                }
            }
            InputKind::IdleSkip { ticks } => self.hart.skip_time(ticks),
            InputKind::ClockRate { icount_per_tick } => self.set_clock_rate(icount_per_tick),
        }
    }

    /// From now on one tick per `icount_per_tick` instructions, guest time itself not
    /// moving: `time = icount / icount_per_tick + time_offset_ticks` (the hart's
    /// formula) with the offset chosen to keep `time` where it is. Time never goes back,
    /// so the offset cannot be negative: a rate faster than the average since boot
    /// allows is raised to the fastest allowed one (the driver's next catch-up skip
    /// makes up the rest). The same input always has the same effect, so replay holds.
    fn set_clock_rate(&mut self, requested: u64) {
        let icount = self.icount();
        let now = self.hart.time();
        let ipt = requested.clamp(1, MAX_ICOUNT_PER_TICK).max(self.min_icount_per_tick());
        if ipt > MAX_ICOUNT_PER_TICK {
            return; // guest time is so far behind icount that no allowed rate keeps it
        }
        self.hart.config.icount_per_tick = ipt;
        self.hart.state.time_offset_ticks = now - icount / ipt;
        self.hart.timer_changed();
        debug_assert_eq!(self.hart.time(), now);
    }

    /// The instruction count at which guest time reaches `ticks` at the current rate
    /// (now, if it already has).
    fn icount_at_ticks(&self, ticks: u64) -> u64 {
        if ticks <= self.hart.time() {
            return self.icount();
        }
        let offset = self.hart.state.time_offset_ticks;
        ticks.saturating_sub(offset).saturating_mul(self.hart.config.icount_per_tick)
    }

    /// Fire the RTC's alarm once guest time has reached it.
    fn update_rtc(&mut self) {
        if self.board.rtc.update(self.hart.time()) {
            self.board.update_irqs();
        }
    }

    /// The earliest timer deadline: the hart's comparators or the RTC's alarm.
    fn next_deadline_ticks(&self) -> Option<u64> {
        let hart = self.hart.next_timer_deadline();
        let rtc = self.board.rtc.alarm_deadline_ticks(self.hart.time());
        match (hart, rtc) {
            (Some(h), Some(r)) => Some(h.min(r)),
            (h, r) => h.or(r),
        }
    }

    /// Run until the instruction count reaches `until_icount`, the guest idles with
    /// no input due, or it powers off (or resets, without `reboot_on_reset`).
    ///
    /// A reset with `reboot_on_reset` is not an exit: the machine reboots itself at the
    /// icount of the request ([`Machine::reboot`]) and runs on, so a reboot needs no
    /// input and replays, replicates and restores exactly like any other instruction.
    pub fn run(&mut self, until_icount: u64) -> RunExit {
        self.fold_digest_view();
        loop {
            if let Some(end) = self.ended {
                return end;
            }
            self.apply_due_inputs();
            self.update_rtc();
            let next_input = self.pending.front().map_or(u64::MAX, |i| i.icount);
            // Stop where the RTC's alarm falls due, so that it fires at the same icount
            // however the runs are split.
            let alarm = self.board.rtc.alarm_deadline_ticks(self.hart.time()).map(|t| self.icount_at_ticks(t));
            let limit = until_icount.min(next_input).min(alarm.unwrap_or(u64::MAX));
            self.sync_clint_view();
            match self.hart.run(&mut self.board, limit) {
                Exit::Budget => {
                    if self.icount() >= until_icount && next_input > self.icount() {
                        return RunExit::Budget;
                    }
                }
                Exit::Idle => {
                    if next_input > self.icount() {
                        return RunExit::Idle { next_deadline_ticks: self.next_deadline_ticks() };
                    }
                }
                Exit::Sbi => {
                    if let Some(power) = sbi::handle(&mut self.hart, &mut self.board) {
                        self.board.outputs.push(self.icount(), power.clone());
                        self.power_event(power);
                    }
                }
                Exit::Stop => self.handle_stop(),
            }
        }
    }

    fn sync_clint_view(&mut self) {
        let s = &self.hart.state;
        self.board.clint.msip = s.mip & rv64::Interrupt::MachineSoftware.bit() != 0;
        self.board.clint.mtimecmp = s.mtimecmp;
        self.board.clint.time = self.hart.time();
        self.board.set_icount(s.icount);
    }

    fn handle_stop(&mut self) {
        self.board.clear_stop();
        for request in std::mem::take(&mut self.board.hart_requests) {
            match request {
                HartRequest::SetMsip(on) => self.hart.set_msip(on),
                HartRequest::SetMtimecmp(v) => self.hart.set_mtimecmp(v),
                HartRequest::SetTime(t) => {
                    // Writing mtime moves guest time; only forward, keeping time monotonic.
                    let now = self.hart.time();
                    self.hart.skip_time(t.saturating_sub(now));
                }
            }
        }
        // The test device recorded its power event as an output already.
        if let Some(power) = self.board.take_power_request() {
            self.power_event(power);
        }
    }

    /// The guest asked to power off or reset (the output is recorded): end the run, or
    /// reboot.
    fn power_event(&mut self, kind: OutputKind) {
        match kind {
            OutputKind::Reset if self.reboot_on_reset => self.reboot(),
            OutputKind::Reset => self.ended = Some(RunExit::Reset),
            OutputKind::PowerOff { code } => self.ended = Some(RunExit::PowerOff { code }),
            OutputKind::Console(_) | OutputKind::NetFrame(_) => unreachable!("not a power event"),
        }
    }

    /// Boot again, as a power cycle would, at this icount: RAM cleared and the kernel,
    /// initrd and device tree loaded again (every page written counts as dirty, so the
    /// next checkpoint carries it); the hart in its boot state; the UART, PLIC, CLINT,
    /// the RTC's alarm and every virtio transport at power-on (the guest probes them
    /// again). Kept: the disk's contents, the network card's MAC and counters, the
    /// inputs queued, and the timeline — icount, and guest time, which goes on from where
    /// it was at the rate it had, so the RTC (boot time base plus guest time) still reads
    /// the wall clock and the driver's pacing holds. `cycle` and `instret` start from 0.
    fn reboot(&mut self) {
        let ram_size = self.board.ram.size();
        debug_assert_eq!(ram_size, self.boot.ram_size);
        self.clear_ram();
        let fdt = self.boot.fdt(&self.bootargs).expect("the command line was checked when it was set");
        self.boot.place(&mut self.board.ram, &fdt).expect("the boot image fitted when the machine was built");
        let before = &self.hart.state;
        let (icount, time_offset_ticks, time) = (before.icount, before.time_offset_ticks, self.hart.time());
        let mut hart = Hart::new(self.hart.config, self.boot.layout.entry);
        hart.state.icount = icount;
        hart.state.time_offset_ticks = time_offset_ticks;
        hart.state.cycle_offset = icount.wrapping_neg();
        hart.state.instret_offset = icount.wrapping_neg();
        boot_state(&mut hart, self.boot.layout.fdt_addr);
        self.hart = hart;
        debug_assert_eq!(self.hart.time(), time, "guest time goes on through a reboot");
        self.board.power_on_devices();
        self.reboots += 1;
    }

    /// Reboots since the machine was built.
    pub fn reboots(&self) -> u64 {
        self.reboots
    }

    /// The state apart from RAM and disk contents (see [`MachineState`]).
    pub fn save_state(&self) -> MachineState {
        MachineState {
            hart: self.hart.state.clone(),
            uart: self.board.uart.state.clone(),
            plic: self.board.plic.state.clone(),
            rtc: self.board.rtc.state.clone(),
            icount_per_tick: self.hart.config.icount_per_tick,
            reboots: self.reboots,
            bootargs: self.bootargs.clone(),
            virtio: self.board.virtio.iter().map(|d| d.state()).collect(),
            pending_inputs: self.pending.iter().cloned().collect(),
            ended: self.ended,
        }
    }

    /// Put a saved state into this machine (built from the same configuration).
    /// Checked before anything changes: on error the machine is untouched.
    pub fn restore_state(&mut self, state: MachineState) -> Result<(), RestoreError> {
        self.check_state(&state)?;
        for (dev, saved) in self.board.virtio.iter_mut().zip(state.virtio) {
            dev.restore(saved).expect("a device state that check_state accepted restores");
        }
        let config = HartConfig { icount_per_tick: state.icount_per_tick, ..self.hart.config };
        self.hart = Hart::from_state(config, state.hart);
        self.board.uart.state = state.uart;
        self.board.plic.state = state.plic;
        self.board.rtc.state = state.rtc;
        self.pending = state.pending_inputs.into();
        self.ended = state.ended;
        self.reboots = state.reboots;
        self.bootargs = state.bootargs;
        self.board.outputs.take();
        self.board.update_irqs();
        Ok(())
    }

    /// The bytes of RAM page `index` (from RAM base).
    pub fn page(&self, index: usize) -> Option<&[u8]> {
        self.board.ram.page(index)
    }

    /// Overwrite RAM page `index` (the backup's side of a checkpoint).
    pub fn write_page(&mut self, index: usize, data: &[u8]) -> Result<(), RestoreError> {
        self.fold_digest_view();
        let pages = self.board.ram.page_count();
        self.board.ram.write_page(index, data).ok_or(RestoreError::Page { index, pages })
    }

    fn blk(&mut self) -> Result<&mut crate::devices::virtio::blk::Blk, RestoreError> {
        self.board
            .virtio
            .iter_mut()
            .find_map(|d| match d.device_mut() {
                VirtioDevice::Blk(blk) => Some(blk),
                _ => None,
            })
            .ok_or(RestoreError::NoDisk)
    }

    /// Check that a saved state fits this machine, changing nothing: every component
    /// [`Machine::restore_state`] would adopt (the hart, the UART, each virtio transport
    /// and device against the configured one, the pending inputs), so that restoring a
    /// state this accepts cannot fail.
    pub fn check_state(&self, state: &MachineState) -> Result<(), RestoreError> {
        let invalid = |component, problem: String| Err(RestoreError::Invalid { component, problem });
        if state.hart.x[0] != 0 {
            return invalid("hart", format!("register x0 holds {:#x}, not 0", state.hart.x[0]));
        }
        if state.uart.rx.len() > crate::devices::uart::RX_QUEUE_CAP {
            let cap = crate::devices::uart::RX_QUEUE_CAP;
            return invalid("UART", format!("{} bytes waiting to be received, at most {cap}", state.uart.rx.len()));
        }
        if !(1..=MAX_ICOUNT_PER_TICK).contains(&state.icount_per_tick) {
            let rate = state.icount_per_tick;
            return invalid(
                "clock",
                format!("a rate of {rate} instructions per tick, not within 1..={MAX_ICOUNT_PER_TICK}"),
            );
        }
        if state.reboots > state.hart.icount {
            // Each reboot follows the instruction that asked for it.
            let (reboots, icount) = (state.reboots, state.hart.icount);
            return invalid("reboot count", format!("{reboots} reboots by icount {icount}"));
        }
        self.boot.fdt(&state.bootargs).map_err(|e| RestoreError::Bootargs(Box::new(e)))?;
        let configured = self.board.virtio.len();
        if state.virtio.len() != configured {
            return Err(RestoreError::DeviceCount { saved: state.virtio.len(), configured });
        }
        for (slot, (dev, saved)) in self.board.virtio.iter().zip(&state.virtio).enumerate() {
            dev.check_state(saved).map_err(|source| RestoreError::Virtio { slot, source })?;
        }
        let inputs = &state.pending_inputs;
        if inputs.len() > MAX_PENDING_INPUTS {
            return invalid("input queue", format!("{} inputs pending, at most {MAX_PENDING_INPUTS}", inputs.len()));
        }
        let mut earliest = state.hart.icount;
        for input in inputs {
            // The queue is in stamp order and never holds the past (as push_input keeps it).
            if input.icount < earliest {
                return invalid("input queue", format!("an input stamped {} before icount {earliest}", input.icount));
            }
            earliest = input.icount;
            if matches!(input.kind, InputKind::NetFrame(_)) && !self.has(|d| matches!(d, VirtioDevice::Net(_))) {
                return invalid("input queue", "a network frame is pending, and there is no network card".into());
            }
            if let InputKind::ClockRate { icount_per_tick: rate } = input.kind {
                if !(1..=MAX_ICOUNT_PER_TICK).contains(&rate) {
                    let problem =
                        format!("a clock rate of {rate} instructions per tick, not within 1..={MAX_ICOUNT_PER_TICK}");
                    return invalid("input queue", problem);
                }
            }
        }
        Ok(())
    }

    /// Zero all of RAM (the base of a full checkpoint).
    pub fn clear_ram(&mut self) {
        self.fold_digest_view();
        let zero = [0u8; rv64::mem::PAGE_SIZE as usize];
        for index in 0..self.board.ram.page_count() {
            if self.board.ram.page(index).is_some_and(|p| p.iter().any(|&b| b != 0)) {
                self.board.ram.write_page(index, &zero).expect("index within RAM");
            }
        }
    }

    /// Zero the whole disk, if there is one (the base of a full checkpoint).
    pub fn clear_disk(&mut self) -> Result<(), RestoreError> {
        self.fold_digest_view();
        // Zeroing bypasses the dirty log: the digest must not rely on it for the disk.
        self.forget_disk_digests();
        match self.blk() {
            Ok(blk) => blk.zero_all().map_err(RestoreError::Disk),
            Err(RestoreError::NoDisk) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The disk's size in sectors, if there is a disk.
    pub fn disk_sectors(&self) -> Option<u64> {
        self.board.virtio.iter().find_map(|d| match d.device() {
            VirtioDevice::Blk(blk) => Some(blk.capacity_sectors()),
            _ => None,
        })
    }

    /// Disk sectors written since the last call, ascending (empty without a disk; digests
    /// taken meanwhile change nothing here).
    pub fn take_dirty_sectors(&mut self) -> Vec<u64> {
        self.fold_digest_view();
        let taken = self.blk().map(|b| b.take_dirty_sectors()).unwrap_or_default();
        let cache = self.digests.get_mut().unwrap_or_else(PoisonError::into_inner);
        if cache.trees.is_some() {
            taken.iter().for_each(|&s| cache.disk_pending.set((s / SECTORS_PER_LEAF) as usize));
        }
        if self.owed_sectors.is_empty() {
            return taken;
        }
        taken.into_iter().for_each(|s| self.owed_sectors.set(s as usize));
        self.owed_sectors.drain().into_iter().map(|s| s as u64).collect()
    }

    /// Read disk sectors starting at `sector` into `buf` (a multiple of 512 bytes). Reading
    /// changes nothing, so a pre-copy can read the disk between run slices.
    pub fn read_sectors(&self, sector: u64, buf: &mut [u8]) -> Result<(), RestoreError> {
        let blk = self.board.virtio.iter().find_map(|d| match d.device() {
            VirtioDevice::Blk(blk) => Some(blk),
            _ => None,
        });
        blk.ok_or(RestoreError::NoDisk)?.read_sectors(sector, buf).map_err(RestoreError::Disk)
    }

    /// The first disk sector at or after `sector` that may hold data (the holes of a sparse
    /// image are skipped); None when only holes follow, or without a disk.
    pub fn next_data_sector(&self, sector: u64) -> Option<u64> {
        self.board.virtio.iter().find_map(|d| match d.device() {
            VirtioDevice::Blk(blk) => blk.next_data_sector(sector),
            _ => None,
        })
    }

    /// From now on the disk image file is only read: the guest's writes (and restored
    /// sectors) go to a copy-on-write overlay that vanishes with the machine — how a
    /// replay runs over a recording's start contents, again and again.
    pub fn start_disk_overlay(&mut self) -> Result<(), RestoreError> {
        self.blk()?.start_overlay().map_err(RestoreError::Disk)
    }

    /// The disk image holds every sector of the overlay now (folded into it from outside):
    /// the overlay starts again empty (see [`Machine::start_disk_overlay`]).
    pub fn disk_overlay_folded(&mut self) -> Result<(), RestoreError> {
        self.blk()?.overlay_folded().map_err(RestoreError::Disk)
    }

    /// How many sectors the disk's overlay holds (None without a disk or an overlay).
    pub fn disk_overlay_sectors(&self) -> Option<u64> {
        self.board.virtio.iter().find_map(|d| match d.device() {
            VirtioDevice::Blk(blk) => blk.overlay_sectors(),
            _ => None,
        })
    }

    /// Write disk sectors (the backup's side of a checkpoint).
    pub fn write_sectors(&mut self, sector: u64, data: &[u8]) -> Result<(), RestoreError> {
        self.fold_digest_view();
        self.blk()?.write_sectors(sector, data).map_err(RestoreError::Disk)
    }

    /// The machine's digest at this icount: RAM, hart, devices and the disk's contents as
    /// the guest sees them (through an overlay, if any), shaped as [`crate::digest`] says.
    /// Incremental: the first digest hashes everything; each later one only the pages
    /// and disk leaves written since the previous one. The same value as
    /// [`Machine::digest_from_scratch`], whatever digests came before.
    pub fn digest(&self) -> Digest {
        let cache = self.update_digests();
        let trees = cache.trees.as_ref().expect("brought up to date");
        crate::digest::root(self.state_digest(), trees.ram.digests(), trees.disk.as_ref().map_or(&[], |t| t.digests()))
    }

    /// The state digest and every region's digest (see [`crate::digest`]); their
    /// [`RegionDigests::root`] is [`Machine::digest`]. Incremental, as that is.
    pub fn region_digests(&self) -> RegionDigests {
        let cache = self.update_digests();
        let trees = cache.trees.as_ref().expect("brought up to date");
        RegionDigests {
            state: self.state_digest(),
            ram: trees.ram.digests().to_vec(),
            disk: trees.disk.as_ref().map_or_else(Vec::new, |t| t.digests().to_vec()),
        }
    }

    /// [`Machine::digest`] computed from nothing but the state as it is (every page and
    /// every disk sector that may hold data hashed again; no cache read or changed): the
    /// reference the incremental digest is checked against.
    pub fn digest_from_scratch(&self) -> Digest {
        let (trees, _) = self.trees_from_scratch();
        crate::digest::root(self.state_digest(), trees.ram.digests(), trees.disk.as_ref().map_or(&[], |t| t.digests()))
    }

    /// Every page's and disk leaf's hash, brought up to date as a digest is.
    pub fn leaf_hashes(&self) -> crate::digest::LeafHashes {
        let cache = self.update_digests();
        let trees = cache.trees.as_ref().expect("brought up to date");
        crate::digest::LeafHashes {
            ram: trees.ram.leaf_hashes(),
            disk: trees.disk.as_ref().map_or_else(Vec::new, |t| t.leaf_hashes()),
        }
    }

    /// What the last [`Machine::digest`] or [`Machine::region_digests`] hashed.
    pub fn last_digest_work(&self) -> DigestWork {
        self.digests.lock().unwrap_or_else(PoisonError::into_inner).last_work
    }

    /// The sectors of disk region `index` (the last region may be short); None beyond the
    /// disk or without one.
    pub fn disk_region_sectors(&self, index: usize) -> Option<std::ops::Range<u64>> {
        let capacity = self.disk_sectors()?;
        let first = (index as u64).checked_mul(SECTORS_PER_REGION).filter(|&f| f < capacity)?;
        Some(first..(first + SECTORS_PER_REGION).min(capacity))
    }

    /// Forget the region digests (the next digest hashes everything again): for a change to
    /// RAM or the disk that bypassed dirty tracking.
    pub fn forget_digests(&mut self) {
        self.fold_digest_view();
        self.digests.get_mut().unwrap_or_else(PoisonError::into_inner).trees = None;
    }

    /// The disk was made all zero behind the dirty log: its tree becomes the empty one
    /// (exact, and free), the pages' tree stays.
    fn forget_disk_digests(&mut self) {
        let leaves = self.disk_sectors().map(|s| s.div_ceil(SECTORS_PER_LEAF) as usize);
        let cache = self.digests.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let (Some(trees), Some(leaves)) = (&mut cache.trees, leaves) {
            trees.disk = Some(RegionTree::zero(leaves));
        }
    }

    /// The hart's and the devices' state, hashed (cheap: no RAM, no disk).
    fn state_digest(&self) -> u128 {
        use std::hash::{Hash, Hasher};
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        self.hart.state.hash(&mut h);
        self.board.uart.state.hash(&mut h);
        self.board.plic.state.hash(&mut h);
        self.board.rtc.state.hash(&mut h);
        self.hart.config.icount_per_tick.hash(&mut h);
        self.reboots.hash(&mut h);
        self.bootargs.hash(&mut h);
        for dev in &self.board.virtio {
            dev.state().hash(&mut h);
        }
        // Pending inputs are not hashed: they are the future, not the state (a backup
        // holding inputs ahead of its primary is still in the same state at an icount).
        h.write_u8(0);
        h.digest128()
    }

    /// Every RAM page, and every disk leaf that may hold data (holes skipped unread, so a
    /// large sparse disk costs what it holds), hashed into fresh trees.
    fn trees_from_scratch(&self) -> (Trees, DigestWork) {
        let pages = self.board.ram.page_count();
        let mut ram = RegionTree::zero(pages);
        let ram_leaves = self.update_ram_tree(&mut ram, &vec![u64::MAX; pages.div_ceil(64)]);
        let mut disk_leaves = 0;
        let disk = self.disk().map(|blk| {
            let sectors = blk.capacity_sectors();
            let leaves = sectors.div_ceil(SECTORS_PER_LEAF) as usize;
            let mut all = Bitmap::new(leaves);
            let mut next = 0;
            while let Some(data) = blk.next_data_sector(next).filter(|&s| s < sectors) {
                let region = data / SECTORS_PER_REGION;
                let first_leaf = (region * SECTORS_PER_REGION / SECTORS_PER_LEAF) as usize;
                let end_leaf = (first_leaf + crate::digest::LEAVES_PER_REGION).min(leaves);
                (first_leaf..end_leaf).for_each(|l| all.set(l));
                next = (region + 1) * SECTORS_PER_REGION;
            }
            let mut tree = RegionTree::zero(leaves);
            disk_leaves = update_disk_tree(&mut tree, blk, all.words());
            tree
        });
        (Trees { ram, disk }, DigestWork { from_scratch: true, ram_leaves, disk_leaves })
    }

    /// Rehash the RAM pages set in `dirty` (a page bitmap); how many.
    fn update_ram_tree(&self, tree: &mut RegionTree, dirty: &[u64]) -> usize {
        let ram = self.board.ram.as_slice();
        tree.update(dirty, ram.len() as u64, &mut &ram[..])
    }

    /// Bring the region digests up to date (see [`DigestCache`]) and hand them out locked.
    fn update_digests(&self) -> MutexGuard<'_, DigestCache> {
        let mut guard = self.digests.lock().unwrap_or_else(PoisonError::into_inner);
        let cache = &mut *guard;
        match cache.trees.take() {
            None => {
                let (trees, work) = self.trees_from_scratch();
                (cache.trees, cache.last_work) = (Some(trees), work);
            }
            Some(Trees { mut ram, disk }) => {
                let mut dirty = cache.ram_pending.words().to_vec();
                for (d, r) in dirty.iter_mut().zip(self.board.ram.dirty_bitmap()) {
                    *d |= r;
                }
                let ram_leaves = self.update_ram_tree(&mut ram, &dirty);
                let mut disk_leaves = 0;
                let disk = disk.map(|mut tree| {
                    if let Some(blk) = self.disk() {
                        let dirty = disk_leaves_dirty(cache.disk_pending.words(), blk.dirty_bitmap());
                        disk_leaves = update_disk_tree(&mut tree, blk, &dirty);
                    }
                    tree
                });
                cache.trees = Some(Trees { ram, disk });
                cache.last_work = DigestWork { from_scratch: false, ram_leaves, disk_leaves };
            }
        }
        cache.ram_pending.clear();
        cache.disk_pending.clear();
        cache.fold_due = true;
        guard
    }

    /// After a digest, the RAM's and the disk's dirty logs hold pages and sectors the digest
    /// has seen: before anything can write again, move them to `owed_*` (where checkpoints
    /// still find them) so that the next digest does not hash them again.
    fn fold_digest_view(&mut self) {
        let cache = self.digests.get_mut().unwrap_or_else(PoisonError::into_inner);
        if !std::mem::take(&mut cache.fold_due) {
            return;
        }
        self.board.ram.take_dirty_pages().into_iter().for_each(|p| self.owed_pages.set(p));
        let blk = self.board.virtio.iter_mut().find_map(|d| match d.device_mut() {
            VirtioDevice::Blk(blk) => Some(blk),
            _ => None,
        });
        if let Some(blk) = blk {
            blk.take_dirty_sectors().into_iter().for_each(|s| self.owed_sectors.set(s as usize));
        }
    }
}

/// Disk leaves (8 sectors each) to rehash: those in `pending` (a leaf bitmap) and those with
/// any sector in `sectors` (a sector bitmap: a byte of it is a leaf).
fn disk_leaves_dirty(pending: &[u64], sectors: &[u64]) -> Vec<u64> {
    let mut leaves = pending.to_vec();
    for (w, &word) in sectors.iter().enumerate().filter(|(_, &w)| w != 0) {
        for (b, byte) in word.to_le_bytes().into_iter().enumerate().filter(|(_, byte)| *byte != 0) {
            let _ = byte;
            let leaf = w * 8 + b;
            leaves[leaf / 64] |= 1 << (leaf % 64);
        }
    }
    leaves
}

/// Rehash the disk leaves set in `dirty`, reading them through the block device (an
/// unreadable run counts as unreadable leaves, and is read again at the next full digest).
fn update_disk_tree(tree: &mut RegionTree, blk: &Blk, dirty: &[u64]) -> usize {
    let total = blk.capacity_sectors() * crate::devices::virtio::blk::SECTOR_SIZE_BYTES;
    tree.update(dirty, total, &mut DiskLeaves(blk))
}

struct DiskLeaves<'a>(&'a Blk);

impl crate::digest::LeafSource for DiskLeaves<'_> {
    fn read<'a>(&'a mut self, offset: u64, len: usize, buf: &'a mut Vec<u8>) -> Option<&'a [u8]> {
        buf.resize(len, 0);
        let sector = offset / crate::devices::virtio::blk::SECTOR_SIZE_BYTES;
        self.0.read_sectors(sector, buf).ok().map(|()| &buf[..])
    }
}

/// The register state firmware would leave for Linux: S-mode, a0 = hart id,
/// a1 = device tree, every exception but S/M ecalls and all S interrupts delegated,
/// Sstc enabled, counters readable.
///
/// `cycle`, `time` and `instret` are readable from S-mode (mcounteren) and from U-mode
/// (scounteren), as OpenSBI leaves them: glibc's vDSO reads `time` in user mode for
/// every `clock_gettime`, `gettimeofday` and `time()`, and a trap there kills every
/// dynamically linked program. Linux itself writes scounteren only from its SBI PMU
/// driver; ftvm's SBI offers no PMU extension (see `sbi.rs`), so Linux uses its legacy
/// PMU driver, which relies on the firmware's setting made here.
fn boot_state(hart: &mut Hart, fdt_addr: u64) {
    let s = &mut hart.state;
    s.privilege = PrivMode::Supervisor;
    s.x[10] = 0;
    s.x[11] = fdt_addr;
    s.medeleg = 0xb1ff & !(1 << 9);
    s.mideleg = rv64::csr::S_INTERRUPTS;
    s.menvcfg = rv64::csr::MENVCFG_STCE;
    s.mcounteren = COUNTERS_CY_TM_IR;
    s.scounteren = COUNTERS_CY_TM_IR;
    hart.timer_changed();
}
