//! `ftvm run --record FILE`: an [`Observer`] of the driver that streams the run's input log
//! (crates/journal) to a file — every input as it is stamped, a digest of the machine and
//! of its outputs every `digest_every` of wall time (and at least every
//! `journal::DIGEST_AT_LEAST_EVERY_ICOUNT` instructions), a snapshot every `snapshot_every`
//! (for `ftvm replay --until` to seek), and the end.
//!
//! Periodic snapshots are mostly deltas: the pages, disk sectors and state that differ from
//! the previous snapshot, found by comparing leaf hashes of the region digests (no dirty
//! log is taken, so a replicating primary's checkpoints are not disturbed). Every
//! [`FULL_SNAPSHOT_EVERY`]th is whole, so a seek restores one and applies at most
//! `FULL_SNAPSHOT_EVERY - 1` deltas.
//!
//! A recording starts from boot ([`Recording::start`]) or from a machine restored from a
//! snapshot ([`Recording::start_from`]): then the header says so and the log's first record
//! is that state, as a snapshot record.
//!
//! The disk is machine state written in place, so the recording keeps its contents at the
//! start in a copy beside the log (`FILE.disk`, holes kept), which a replay reads through
//! a copy-on-write overlay. A copy rather than an overlay under the live run: the user's
//! image keeps every write of the run, as without --record.

use crate::mode::{ModeError, Observer};
use anyhow::{Context, Result};
use journal::{EndReason, LogHeader, LogWriter, OutputDigest, RegionDigests, Start, StateDigest};
use machine::{Input, Machine, MachineConfig, Output};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub struct RecordOptions {
    pub path: PathBuf,
    /// A state digest this often (wall time; zero: at every slice's end). Digests are
    /// incremental (`machine::digest`): each costs what the guest wrote since the last.
    pub digest_every: Duration,
    /// A snapshot this often (wall time), for seeking.
    pub snapshot_every: Option<Duration>,
    pub seed: Option<u64>,
}

/// One snapshot in this many is whole; the others are deltas.
pub const FULL_SNAPSHOT_EVERY: u64 = 8;

pub struct Recording {
    writer: LogWriter<std::fs::File>,
    /// The leaf hashes at the last snapshot or delta, and deltas since the last whole one.
    last_leaves: Option<machine::digest::LeafHashes>,
    deltas_since_full: u64,
    /// Bytes of whole snapshots and of deltas written.
    pub snapshot_bytes: u64,
    pub delta_bytes: u64,
    outputs: OutputDigest,
    digest_every: Duration,
    snapshot_every: Option<Duration>,
    last_digest: Instant,
    last_snapshot: Instant,
    /// Figures for the end of the run.
    pub digests: u64,
    pub snapshots: u64,
}

pub use journal::disk_copy_path;

impl Recording {
    /// Starts recording a machine built from `config` (not run yet): copies the disk's
    /// contents and writes the log's header.
    pub fn start(config: &MachineConfig, options: &RecordOptions) -> Result<Recording> {
        Self::begin(config, options, Start::Boot)
    }

    /// Starts recording `machine`, restored from a snapshot with `config` and not run since:
    /// copies the disk's contents as they are now (the snapshot's), writes a header that
    /// starts from a snapshot at the machine's icount, and the machine's whole state as the
    /// log's first record. `ftvm replay` restores from that record.
    pub fn start_from(config: &MachineConfig, machine: &Machine, options: &RecordOptions) -> Result<Recording> {
        let mut recording = Self::begin(config, options, Start::Snapshot { icount: machine.icount() })?;
        recording.snapshot(machine)?;
        Ok(recording)
    }

    fn begin(config: &MachineConfig, options: &RecordOptions, start: Start) -> Result<Recording> {
        let mut inputs = vec![("kernel", config.kernel.as_path())];
        inputs.extend(config.initrd.as_deref().map(|initrd| ("initrd", initrd)));
        inputs.extend(config.disk.as_ref().map(|disk| ("disk image", disk.path.as_path())));
        refuse_overwriting(&options.path, &inputs)?;
        let disk = match &config.disk {
            Some(disk) => {
                let copy = disk_copy_path(&options.path);
                copy_sparse(&disk.path, &copy)
                    .with_context(|| format!("cannot keep the disk's start contents in {}", copy.display()))?;
                let name = copy.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                Some((name, copy))
            }
            None => None,
        };
        let mut header =
            LogHeader::for_boot(config, disk.as_ref().map(|(name, file)| (name.as_str(), file.as_path())))?;
        header.seed = options.seed;
        header.start = start;
        let writer = LogWriter::create(&options.path, &header)
            .with_context(|| format!("cannot create the input log {}", options.path.display()))?;
        Ok(Recording {
            writer,
            last_leaves: None,
            deltas_since_full: 0,
            snapshot_bytes: 0,
            delta_bytes: 0,
            outputs: OutputDigest::new(),
            digest_every: options.digest_every,
            snapshot_every: options.snapshot_every,
            last_digest: Instant::now(),
            last_snapshot: Instant::now(),
            digests: 0,
            snapshots: 0,
        })
    }

    /// The digest of the machine and of the outputs since the last one, with the region
    /// digests the machine digest is the root of (a replay's divergence names the regions).
    fn state_digest(&mut self, machine: &Machine) -> (StateDigest, RegionDigests) {
        let regions = machine.region_digests();
        let state = StateDigest { icount: machine.icount(), machine: regions.root().0, outputs: self.outputs.take() };
        (state, regions)
    }

    /// A snapshot record, or a delta record after the last one.
    fn snapshot(&mut self, machine: &Machine) -> Result<()> {
        let leaves = machine.leaf_hashes();
        let base = self.last_leaves.take().filter(|_| self.deltas_since_full + 1 < FULL_SNAPSHOT_EVERY);
        if let Some(base) = base {
            let (pages, sectors) = leaves.changed_since(&base, machine.disk_sectors().unwrap_or(0));
            let mut delta = machine::checkpoint::take_these(machine, &pages, &sectors)
                .context("cannot take a snapshot delta for the log")?;
            // The state the delta leads to, checked by a seek that applies it.
            machine::checkpoint::add_digest(&mut delta, machine);
            self.writer.delta(machine.icount(), &delta)?;
            self.delta_bytes += delta.len() as u64;
            self.deltas_since_full += 1;
        } else {
            let mut bytes = std::io::Cursor::new(Vec::new());
            machine::snapshot::write_snapshot(machine, &mut bytes).context("cannot take a snapshot for the log")?;
            self.writer.snapshot(machine.icount(), bytes.get_ref())?;
            self.snapshot_bytes += bytes.get_ref().len() as u64;
            self.deltas_since_full = 0;
        }
        self.last_leaves = Some(leaves);
        self.outputs = OutputDigest::new();
        self.snapshots += 1;
        Ok(())
    }

    /// The log's size so far.
    pub fn bytes_written(&self) -> u64 {
        self.writer.bytes_written()
    }
}

impl Observer<Machine> for Recording {
    fn on_input(&mut self, input: &Input) -> Result<(), ModeError> {
        self.writer.input(input).map_err(|e| ModeError::new("cannot record the run", e))
    }

    fn on_outputs_produced(&mut self, outputs: &[Output]) {
        for output in outputs {
            self.outputs.add(output);
        }
    }

    fn on_slice_end(&mut self, machine: &Machine) -> Result<(), ModeError> {
        // Also by instructions: a reader refuses a record further than
        // journal::MAX_RECORD_GAP_ICOUNT past the one before (a busy guest with no inputs
        // under a long --digest-every-ms would otherwise leave such a gap).
        let far = machine.icount().saturating_sub(self.writer.last_icount()) >= journal::DIGEST_AT_LEAST_EVERY_ICOUNT;
        if far || self.last_digest.elapsed() >= self.digest_every {
            let (digest, regions) = self.state_digest(machine);
            self.writer.digest(digest, &regions).map_err(|e| ModeError::new("cannot record the run", e))?;
            self.digests += 1;
            self.last_digest = Instant::now();
        }
        if self.snapshot_every.is_some_and(|every| self.last_snapshot.elapsed() >= every) {
            self.snapshot(machine).map_err(|e| ModeError::new("cannot record the run", e.into_boxed_dyn_error()))?;
            self.last_snapshot = Instant::now();
        }
        Ok(())
    }

    fn on_end(&mut self, machine: &Machine, _exit_code: u32) {
        // How the machine ended, from its state: a power-off or a reset without reboot,
        // else the run was stopped from outside (quit, stop, a hung guest).
        let reason = match machine.save_state().ended {
            Some(machine::RunExit::PowerOff { code }) => EndReason::PowerOff { code },
            Some(machine::RunExit::Reset) => EndReason::Reset,
            _ => EndReason::Stopped,
        };
        let (digest, regions) = self.state_digest(machine);
        if let Err(e) = self.writer.end(digest, &regions, reason).and_then(|()| self.writer.sync()) {
            crate::log::warn(format_args!("the input log's end was not written: {e}"));
        }
    }
}

/// Refuses a log at `log` whose file, or whose disk copy beside it (`<log>.disk`), is one
/// of the run's `inputs` (what, path): creating them would truncate the user's image (or
/// snapshot) before the run starts.
pub fn refuse_overwriting(log: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    let copy = disk_copy_path(log);
    for &(what, file) in inputs {
        if same_file(log, file) {
            anyhow::bail!(
                "--record {}: that is the {what} this run reads, which recording would overwrite; record to another file",
                log.display()
            );
        }
        if same_file(&copy, file) {
            anyhow::bail!(
                "--record {}: the recording keeps the disk's start contents in {}, which is the {what} this run \
                 reads; record to another file",
                log.display(),
                copy.display()
            );
        }
    }
    Ok(())
}

/// Whether two paths name one existing file (hard links and symbolic links included).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Copies `from` to `to` keeping its holes (SEEK_DATA / SEEK_HOLE): a sparse disk of
/// gigabytes costs only what it holds.
pub fn copy_sparse(from: &Path, to: &Path) -> Result<u64> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let src = std::fs::File::open(from).with_context(|| format!("cannot open {}", from.display()))?;
    let len = src.metadata()?.len();
    let dst = std::fs::File::create(to)?;
    dst.set_len(len)?;
    let mut buf = vec![0; 1 << 20];
    let mut offset = 0u64;
    let mut copied = 0u64;
    while offset < len {
        let seek = |whence, at: u64| nix::unistd::lseek(src.as_raw_fd(), at as i64, whence).map(|o| o as u64);
        let data = match seek(nix::unistd::Whence::SeekData, offset) {
            Ok(d) => d,
            Err(nix::errno::Errno::ENXIO) => break, // only a hole follows
            Err(_) => offset,                       // cannot tell: copy everything
        };
        let hole = seek(nix::unistd::Whence::SeekHole, data).unwrap_or(len).min(len);
        let mut at = data;
        while at < hole {
            let n = ((hole - at) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], at)?;
            dst.write_all_at(&buf[..n], at)?;
            at += n as u64;
            copied += n as u64;
        }
        offset = hole;
    }
    dst.sync_all()?;
    Ok(copied)
}
