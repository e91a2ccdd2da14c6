//! The machine's contract (DESIGN.md §6) as a trait: the few verbs the runtime and every
//! replication mode are built from. [`Driver`](crate::driver::Driver), the checkpoint
//! modes and the backup's waiting loop are generic over it; `machine::Machine` is its
//! first implementation, a hardware-assisted backend (KVM) would be the next.
//!
//! The trait lives here, in the runtime, not in `machine`: it is what the runtime asks of
//! a backend, and the board crate stays ignorant of who drives it (DESIGN.md §3: a layer
//! never reaches up). Its vocabulary (inputs, outputs, run exits, digests) is the board's
//! plain-data types, which any backend can produce; the checkpoint payload is opaque bytes
//! in the backend's own format, as it is to `replica`.

use machine::{Digest, Input, Machine, Output, RunExit};
use std::io::{Read, Seek, Write};
use std::path::Path;

/// A sink a whole-state save can seek in (the header of a snapshot is written last).
pub trait WriteSeek: Write + Seek {}
impl<T: Write + Seek> WriteSeek for T {}

/// A source a whole-state restore can seek in (it checks the whole file before it builds).
pub trait ReadSeek: Read + Seek {}
impl<T: Read + Seek> ReadSeek for T {}

/// A virtual machine the runtime can drive: run, feed, drain, checkpoint, save.
///
/// Guest time derives from the instruction count (DESIGN.md §2): a machine given the same
/// state and the same inputs at the same stamps produces the same outputs at the same
/// stamps and the same digest.
pub trait Vm {
    /// Why a verb failed (the machine is as it was unless the verb says otherwise).
    type Error: std::error::Error + Send + Sync + 'static;
    /// What a machine is built from (image, RAM size, devices).
    type Config;
    /// The machine's state apart from RAM and disk (CPU, devices, queued inputs).
    type State;
    /// A full checkpoint being copied while the guest runs.
    type PreCopy: Send;

    // --- running ---

    /// Run until `until_icount`, an idle wait (with the next timer deadline), a power-off
    /// or a reset that does not reboot, whichever comes first.
    fn run(&mut self, until_icount: u64) -> RunExit;
    fn icount(&self) -> u64;
    /// Guest time in timer ticks ([`machine::board::TIMEBASE_HZ`]).
    fn time_ticks(&self) -> u64;
    /// Instructions per timer tick now, and the fewest a clock-rate input may ask for.
    fn icount_per_tick(&self) -> u64;
    fn min_icount_per_tick(&self) -> u64;
    /// The guest's real-time clock, in ns since the Unix epoch.
    fn rtc_unix_ns(&self) -> u64;
    /// Times the guest rebooted.
    fn reboots(&self) -> u64;

    // --- the doors ---

    /// Queue an input stamped at or after the current icount.
    fn push_input(&mut self, input: Input) -> Result<(), Self::Error>;
    /// The guest waits for entropy (feed it an `Entropy` input).
    fn wants_entropy(&self) -> bool;
    /// Outputs produced since the last call, in order, each stamped with its icount.
    fn take_outputs(&mut self) -> Vec<Output>;

    // --- what changed, and reading it ---

    /// RAM pages written since the last take (indices from RAM base).
    fn take_dirty_pages(&mut self) -> Vec<usize>;
    /// Disk sectors written since the last take.
    fn take_dirty_sectors(&mut self) -> Vec<u64>;
    fn page_count(&self) -> usize;
    fn page(&self, index: usize) -> Option<&[u8]>;
    /// The disk's size in 512-byte sectors (None: no disk).
    fn disk_sectors(&self) -> Option<u64>;
    fn read_sectors(&self, sector: u64, buf: &mut [u8]) -> Result<(), Self::Error>;

    // --- writing into a stopped machine (a backup, a repair) ---

    fn write_page(&mut self, index: usize, data: &[u8]) -> Result<(), Self::Error>;
    fn write_sectors(&mut self, sector: u64, data: &[u8]) -> Result<(), Self::Error>;
    fn save_state(&self) -> Self::State;
    fn restore_state(&mut self, state: Self::State) -> Result<(), Self::Error>;

    // --- the whole state ---

    /// Save everything (RAM, disk, state, queued inputs) as one self-checking blob; its size
    /// in bytes. Dirty logs are left alone (a replicating primary keeps its own).
    fn save(&self, out: &mut dyn WriteSeek) -> Result<u64, Self::Error>;
    /// [`Vm::save`] to a file, atomically (a crash never leaves a torn file at `path`).
    fn save_to_path(&self, path: &Path) -> Result<u64, Self::Error>;
    /// A machine rebuilt from a save and the same configuration, continuing exactly.
    fn restore(config: &Self::Config, input: &mut dyn ReadSeek) -> Result<Self, Self::Error>
    where
        Self: Sized;
    fn digest(&self) -> Digest;

    // --- checkpoints: the verbs above, in the backend's payload format ---

    /// Everything (`full`) or what changed since the last checkpoint; resets the dirty logs.
    fn take_checkpoint(&mut self, full: bool) -> Result<Vec<u8>, Self::Error>;
    /// Begin a full checkpoint copied while the guest runs (nothing else may take the dirty
    /// logs until it is finished or dropped; a dropped one loses nothing).
    fn precopy_start(&self) -> Self::PreCopy;
    /// Copy up to `max_pages` more; true once everything was scanned.
    fn precopy_step(&self, precopy: &mut Self::PreCopy, max_pages: usize) -> bool;
    /// Complete it (the guest stopped): what the steps missed or what changed since.
    fn precopy_finish(&mut self, precopy: Self::PreCopy) -> Result<Vec<u8>, Self::Error>;
    /// Append the machine's digest, for the receiver to check after applying.
    fn add_digest(&self, payload: &mut Vec<u8>);
    /// Apply a checkpoint to this stopped machine; a malformed one changes nothing.
    fn apply_checkpoint(&mut self, payload: &[u8]) -> Result<(), Self::Error>;
    /// The error says the machine's digest disagreed after applying: the replicas diverged.
    fn diverged(error: &Self::Error) -> bool
    where
        Self: Sized;
    /// RAM pages a payload carries (for status).
    fn checkpoint_pages(payload: &[u8]) -> usize
    where
        Self: Sized;
}

/// Why a verb of `machine::Machine` failed: the board's own errors, unchanged (each says
/// its cause; this adds nothing to the message).
#[derive(Debug, thiserror::Error)]
pub enum MachineVmError {
    #[error(transparent)]
    Input(#[from] machine::InputError),
    #[error(transparent)]
    Restore(#[from] machine::RestoreError),
    #[error(transparent)]
    Checkpoint(#[from] machine::checkpoint::CheckpointError),
    #[error(transparent)]
    Snapshot(#[from] machine::snapshot::SnapshotError),
}

impl Vm for Machine {
    type Error = MachineVmError;
    type Config = machine::MachineConfig;
    type State = machine::MachineState;
    type PreCopy = machine::checkpoint::PreCopy;

    fn run(&mut self, until_icount: u64) -> RunExit {
        Machine::run(self, until_icount)
    }
    fn icount(&self) -> u64 {
        Machine::icount(self)
    }
    fn time_ticks(&self) -> u64 {
        Machine::time_ticks(self)
    }
    fn icount_per_tick(&self) -> u64 {
        Machine::icount_per_tick(self)
    }
    fn min_icount_per_tick(&self) -> u64 {
        Machine::min_icount_per_tick(self)
    }
    fn rtc_unix_ns(&self) -> u64 {
        Machine::rtc_unix_ns(self)
    }
    fn reboots(&self) -> u64 {
        Machine::reboots(self)
    }

    fn push_input(&mut self, input: Input) -> Result<(), MachineVmError> {
        Ok(Machine::push_input(self, input)?)
    }
    fn wants_entropy(&self) -> bool {
        Machine::wants_entropy(self)
    }
    fn take_outputs(&mut self) -> Vec<Output> {
        Machine::take_outputs(self)
    }

    fn take_dirty_pages(&mut self) -> Vec<usize> {
        Machine::take_dirty_pages(self)
    }
    fn take_dirty_sectors(&mut self) -> Vec<u64> {
        Machine::take_dirty_sectors(self)
    }
    fn page_count(&self) -> usize {
        self.ram().page_count()
    }
    fn page(&self, index: usize) -> Option<&[u8]> {
        Machine::page(self, index)
    }
    fn disk_sectors(&self) -> Option<u64> {
        Machine::disk_sectors(self)
    }
    fn read_sectors(&self, sector: u64, buf: &mut [u8]) -> Result<(), MachineVmError> {
        Ok(Machine::read_sectors(self, sector, buf)?)
    }

    fn write_page(&mut self, index: usize, data: &[u8]) -> Result<(), MachineVmError> {
        Ok(Machine::write_page(self, index, data)?)
    }
    fn write_sectors(&mut self, sector: u64, data: &[u8]) -> Result<(), MachineVmError> {
        Ok(Machine::write_sectors(self, sector, data)?)
    }
    fn save_state(&self) -> machine::MachineState {
        Machine::save_state(self)
    }
    fn restore_state(&mut self, state: machine::MachineState) -> Result<(), MachineVmError> {
        Machine::check_state(self, &state)?;
        Ok(Machine::restore_state(self, state)?)
    }

    fn save(&self, mut out: &mut dyn WriteSeek) -> Result<u64, MachineVmError> {
        Ok(machine::snapshot::write_snapshot(self, &mut out)?.file_bytes())
    }
    fn save_to_path(&self, path: &Path) -> Result<u64, MachineVmError> {
        Ok(machine::snapshot::save_to_path(self, path)?.file_bytes())
    }
    fn restore(config: &machine::MachineConfig, mut input: &mut dyn ReadSeek) -> Result<Machine, MachineVmError> {
        Ok(machine::snapshot::read_snapshot(&mut input, config)?)
    }
    fn digest(&self) -> Digest {
        Machine::digest(self)
    }

    fn take_checkpoint(&mut self, full: bool) -> Result<Vec<u8>, MachineVmError> {
        Ok(machine::checkpoint::take(self, full)?)
    }
    fn precopy_start(&self) -> machine::checkpoint::PreCopy {
        machine::checkpoint::PreCopy::start(self)
    }
    fn precopy_step(&self, precopy: &mut machine::checkpoint::PreCopy, max_pages: usize) -> bool {
        precopy.step(self, max_pages)
    }
    fn precopy_finish(&mut self, precopy: machine::checkpoint::PreCopy) -> Result<Vec<u8>, MachineVmError> {
        Ok(precopy.finish(self)?)
    }
    fn add_digest(&self, payload: &mut Vec<u8>) {
        machine::checkpoint::add_digest(payload, self)
    }
    fn apply_checkpoint(&mut self, payload: &[u8]) -> Result<(), MachineVmError> {
        Ok(machine::checkpoint::apply(self, payload)?)
    }
    fn diverged(error: &MachineVmError) -> bool {
        matches!(error, MachineVmError::Checkpoint(machine::checkpoint::CheckpointError::DigestMismatch { .. }))
    }
    fn checkpoint_pages(payload: &[u8]) -> usize {
        machine::checkpoint::page_count(payload)
    }
}
