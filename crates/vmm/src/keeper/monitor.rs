//! The monitor's side of the keeper: it keeps its recovery state in the shared region
//! (a [`crate::mode::Mode`]), and a new monitor takes the VM over from it.
//!
//! The recovery state: guest RAM as of the last local checkpoint (an image in the
//! region), the machine state at that checkpoint, the inputs since, and the marks of
//! what had been produced when it was taken. Recovery builds the machine from the
//! configuration, lays the image over its RAM, restores the state and replays the inputs:
//! the machine is deterministic, so it reaches the very instruction where the old monitor
//! died, producing the same outputs, of which those that already left are held back.

use super::disk::{DiskJournal, DiskStaged};
use super::region::{self, HandoverState, Live, Marks, Phase, Region, RegionError, Verdict, BEAT_PAGES};
use crate::driver::ConsoleSink;
use crate::host::tap::Tap;
use crate::mode::{Mode, ModeError};
use anyhow::{Context, Result};
use machine::{Input, Machine, MachineConfig, Output, OutputKind, RunExit};
use std::time::{Duration, Instant};

/// How often the monitor takes a local checkpoint: recovery replays at most this much of
/// the guest's life, and each checkpoint costs a pause of its dirty pages' copy.
pub const CHECKPOINT_MS: u64 = 100;
/// The longest the run loop waits between heartbeats.
pub const HEARTBEAT_WAIT: Duration = Duration::from_millis(50);

/// The state part of a checkpoint taken while output commit held outputs starts with this,
/// then the held outputs ([`encode_held`]), then the machine state.
const HELD_MAGIC: [u8; 8] = *b"FTVMHELD";
/// The most bytes of held outputs a local checkpoint keeps (more: it waits for the next one).
pub const HELD_CAP: usize = 1 << 20;

/// Held outputs as the state part keeps them: magic, count, then each as tag, icount,
/// length, bytes (tag 0 console, 1 frame, 2 reset, 3 power-off with its code as the bytes).
fn encode_held(held: &[Output], machine_state: Vec<u8>) -> Vec<u8> {
    if held.is_empty() {
        return machine_state;
    }
    let mut out = HELD_MAGIC.to_vec();
    out.extend_from_slice(&(held.len() as u64).to_le_bytes());
    for output in held {
        let (tag, bytes): (u8, &[u8]) = match &output.kind {
            OutputKind::Console(b) => (0, b),
            OutputKind::NetFrame(b) => (1, b),
            OutputKind::Reset => (2, &[]),
            OutputKind::PowerOff { code } => (3, &code.to_le_bytes()[..]),
        };
        out.push(tag);
        out.extend_from_slice(&output.icount.to_le_bytes());
        out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        out.extend_from_slice(bytes);
    }
    out.extend_from_slice(&machine_state);
    out
}

/// The held outputs and the machine state of a state part (its CRC was checked as it was read).
fn split_held(state: &[u8]) -> Result<(Vec<Output>, &[u8]), RecoverError> {
    if state.len() < 16 || state[..8] != HELD_MAGIC {
        return Ok((Vec::new(), state));
    }
    let bad = || RecoverError::Held;
    let word = |at: usize| -> Result<u64, RecoverError> {
        Ok(u64::from_le_bytes(state.get(at..at + 8).ok_or_else(bad)?.try_into().expect("8 bytes")))
    };
    let count = word(8)?;
    let mut at = 16;
    let mut held = Vec::new();
    for _ in 0..count {
        let tag = *state.get(at).ok_or_else(bad)?;
        let icount = word(at + 1)?;
        let len = usize::try_from(word(at + 9)?).map_err(|_| bad())?;
        let bytes = state.get(at + 17..at.checked_add(17 + len).ok_or_else(bad)?).ok_or_else(bad)?;
        let kind = match tag {
            0 => OutputKind::Console(bytes.to_vec()),
            1 => OutputKind::NetFrame(bytes.to_vec()),
            2 => OutputKind::Reset,
            3 => OutputKind::PowerOff { code: u32::from_le_bytes(bytes.try_into().map_err(|_| bad())?) },
            _ => return Err(bad()),
        };
        held.push(Output { icount, kind });
        at += 17 + len;
    }
    Ok((held, &state[at..]))
}

/// A checkpoint's marks (what was produced up to it) less what it held: where the count
/// stands before its held outputs pass the filter again.
fn marks_before(marks: Marks, held: &[Output]) -> Marks {
    let mut m = marks;
    for output in held {
        match &output.kind {
            OutputKind::Console(b) => m.console_bytes = m.console_bytes.saturating_sub(b.len() as u64),
            OutputKind::NetFrame(_) => m.frames = m.frames.saturating_sub(1),
            OutputKind::Reset => m.resets = m.resets.saturating_sub(1),
            OutputKind::PowerOff { .. } => {}
        }
    }
    m
}

/// The bytes [`encode_held`] takes for `held`.
pub fn held_bytes(held: &[Output]) -> usize {
    let len = |o: &Output| match &o.kind {
        OutputKind::Console(b) | OutputKind::NetFrame(b) => b.len(),
        OutputKind::Reset => 0,
        OutputKind::PowerOff { .. } => 4,
    };
    16 + held.iter().map(|o| 17 + len(o)).sum::<usize>()
}

/// Exit status of a monitor that found it cannot recover the VM (the verdict and the
/// message are in the live page).
pub const EXIT_CANNOT_RECOVER: i32 = 86;

/// The mode a resilient VM's driver runs with: standalone as to outputs (each leaves at
/// once, unless it left before a restart), it logs each input into the region, bumps the
/// heartbeat and takes a local checkpoint at slice ends.
pub struct Monitor {
    region: Region,
    seq: u64,
    /// Produced since boot (replays count again what they produce).
    console_bytes: u64,
    resets: u64,
    frames: u64,
    /// What had left before this monitor started: not sent again.
    console_mark: u64,
    resets_mark: u64,
    frames_mark: u64,
    last_checkpoint: Instant,
    checkpoint_every: Duration,
    /// The log filled up: checkpoint before the next input.
    log_full: bool,
    /// A written disk: its sectors go to the journal at each checkpoint.
    disk: Option<DiskJournal>,
    /// Outputs are held after this filter (a replicated primary's output commit): a frame
    /// is counted as sent when it is released ([`Monitor::frame_released`]), not here.
    frames_counted_on_release: bool,
}

/// A machine ready to run: fresh (booting) or recovered (to replay `inputs` first).
pub struct Started {
    pub machine: Machine,
    pub monitor: Monitor,
    pub inputs: Vec<Input>,
    pub recovered: bool,
    /// Outputs the checkpoint was taken with that output commit still held (a replicated
    /// primary): they come before what the replay produces, through [`Monitor::pass_held`].
    pub held: Vec<Output>,
}

fn now_ns() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
}

impl Monitor {
    fn new(region: Region, marks: Marks, disk: Option<DiskJournal>) -> Monitor {
        let console_mark = region.live(Live::ConsoleDelivered);
        let resets_mark = region.live(Live::ResetsDelivered);
        let frames_mark = region.live(Live::FramesSent);
        Monitor {
            region,
            seq: marks.seq,
            console_bytes: marks.console_bytes,
            resets: marks.resets,
            frames: marks.frames,
            console_mark,
            resets_mark,
            frames_mark,
            last_checkpoint: Instant::now(),
            checkpoint_every: Duration::from_millis(CHECKPOINT_MS),
            log_full: false,
            disk,
            frames_counted_on_release: false,
        }
    }

    /// The monitor of a machine that stands at the region's committed checkpoint already,
    /// `marks` being that checkpoint's (a resilient backup that took the VM over:
    /// `keeper::resilient_backup`).
    pub fn adopt(region: Region, marks: Marks, disk: Option<DiskJournal>) -> Monitor {
        Monitor::new(region, marks, disk)
    }

    /// Take a local checkpoint: the pages written since the last one and the state go to
    /// the staging part, are committed, then applied to the image; the log starts again.
    pub fn checkpoint(&mut self, machine: &mut Machine) -> Result<()> {
        let started = Instant::now();
        super::fault::point("keeper::checkpoint-take");
        let pages = machine.take_dirty_pages();
        let sectors = machine.take_dirty_sectors();
        self.checkpoint_of(machine, &pages, &sectors, started)
    }

    /// A local checkpoint of `pages` and `sectors` (ascending, each once), the pages and
    /// sectors written since the last one, which another consumer of the dirty logs took
    /// from the machine (a replicated primary's checkpoints: `keeper::replicated`).
    pub fn checkpoint_of(
        &mut self,
        machine: &mut Machine,
        pages: &[usize],
        sectors: &[u64],
        started: Instant,
    ) -> Result<()> {
        self.checkpoint_holding(machine, pages, sectors, started, &[])
    }

    /// [`Monitor::checkpoint_of`] while output commit holds `held` (produced, counted in the
    /// marks, not yet left): the checkpoint keeps them, and a monitor that recovers from it
    /// sends them first. (Without them, what a replicated primary held at its last local
    /// checkpoint was lost when it died: the replay starts after it.)
    pub fn checkpoint_holding(
        &mut self,
        machine: &mut Machine,
        pages: &[usize],
        sectors: &[u64],
        started: Instant,
        held: &[Output],
    ) -> Result<()> {
        let state = machine::snapshot::encode_machine_state(&machine.save_state())
            .context("cannot encode the machine state for the local checkpoint")?;
        let state = encode_held(held, state);
        let disk = match &mut self.disk {
            Some(disk) => disk.stage(machine, sectors)?,
            None => DiskStaged::default(),
        };
        let seq = self.seq + 1;
        let marks = Marks {
            seq,
            icount: machine.icount(),
            console_bytes: self.console_bytes,
            resets: self.resets,
            frames: self.frames,
        };
        let mut staging = self.region.stage();
        for (n, &index) in pages.iter().enumerate() {
            staging.page(index as u64, machine.page(index).expect("a dirty page is within RAM"));
            if n as u64 % BEAT_PAGES == BEAT_PAGES - 1 {
                staging.beat();
            }
        }
        staging.commit(marks, &state, disk)?;
        self.region.apply_staged(self.disk.as_mut())?;
        if self.disk.is_some() {
            // The image holds the overlay's sectors now: they were all staged, at this or an
            // earlier checkpoint (the dirty log was taken with the guest stopped here).
            machine.disk_overlay_folded().context("cannot empty the disk's overlay after folding it")?;
        }
        if super::fault::corrupts("keeper::checkpoint-corrupt") {
            self.region.corrupt_committed();
            std::process::abort();
        }
        self.region.reset_log(seq);
        self.seq = seq;
        self.last_checkpoint = Instant::now();
        self.log_full = false;
        let pause_us = started.elapsed().as_micros() as u64;
        let r = &self.region;
        r.set_live(Live::Checkpoints, r.live(Live::Checkpoints) + 1);
        r.set_live(Live::CheckpointPauseUs, r.live(Live::CheckpointPauseUs) + pause_us);
        r.set_live(Live::CheckpointMaxPauseUs, r.live(Live::CheckpointMaxPauseUs).max(pause_us));
        Ok(())
    }

    /// Whether a local checkpoint is due (its interval passed, or the log is half full).
    pub fn checkpoint_due(&self) -> bool {
        self.log_full || self.last_checkpoint.elapsed() >= self.checkpoint_every
    }

    /// A sign of life for the keeper, at a slice end. The first says the run loop runs:
    /// from then on the hang limit applies ([`Phase::Resuming`] before).
    pub fn heartbeat(&self, icount: u64) {
        self.region.bump_heartbeat(icount);
        if self.region.live(Live::Phase) == Phase::Resuming as u64 {
            self.region.set_live(Live::Phase, Phase::Running as u64);
        }
    }

    /// Outputs are held after this monitor's filter (see [`Monitor::frame_released`]).
    pub fn count_frames_on_release(&mut self) {
        self.frames_counted_on_release = true;
    }

    /// A network frame that passed the filter is released now (the driver writes it next):
    /// counted as sent, as [`Monitor::pass`] counts it when nothing holds outputs.
    pub fn frame_released(&self) {
        self.region.set_live(Live::FramesSent, self.region.live(Live::FramesSent) + 1);
    }

    /// The first checkpoint of a fresh machine: its state alone. A new monitor builds the
    /// machine from the same configuration, which lays out the same boot image, so the
    /// region needs only the pages written since (scanning 512 MiB for non-zero pages
    /// took half a second).
    fn first_checkpoint(&mut self, machine: &mut Machine) -> Result<(), RecoverError> {
        machine.take_dirty_pages();
        machine.take_dirty_sectors(); // none yet: the image is the disk as it boots
        let state = machine::snapshot::encode_machine_state(&machine.save_state()).map_err(RecoverError::State)?;
        let marks = Marks { seq: 1, icount: machine.icount(), ..Marks::default() };
        self.region.stage().commit(marks, &state, DiskStaged::default())?;
        self.region.apply_staged(self.disk.as_mut())?;
        self.region.reset_log(1);
        self.seq = 1;
        Ok(())
    }

    /// A planned handover: the next monitor is ready. Stop the guest here, at a slice end,
    /// with a final checkpoint (the log empty: the next monitor replays nothing), say so,
    /// and end this process at once, so that nothing more of it reaches the keeper.
    fn hand_over(&mut self, machine: &mut Machine) -> Result<(), ModeError> {
        super::fault::point("keeper::handover-final");
        let started = self.handover_stopped();
        self.checkpoint(machine)
            .map_err(|e| ModeError::message(format!("cannot take the handover's final checkpoint: {e:#}")))?;
        self.commit_handover(started);
        Ok(()) // called off meanwhile: that was an ordinary checkpoint, and this monitor carries on
    }

    /// Where a planned handover stands (the keeper and the next monitor move it on).
    pub fn handover_state(&self) -> HandoverState {
        HandoverState::from_u64(self.region.live(Live::HandoverState))
    }

    /// Move a planned handover from `from` to `to` (false: it moved elsewhere meanwhile).
    pub fn swap_handover(&self, from: HandoverState, to: HandoverState) -> bool {
        self.region.swap_live(Live::HandoverState, from as u64, to as u64)
    }

    /// The guest stopped for a planned handover's final checkpoint now (the pause counts from here).
    pub fn handover_stopped(&self) -> Instant {
        self.region.set_live(Live::HandoverStopNs, now_ns());
        Instant::now()
    }

    /// The final checkpoint of a planned handover is committed (the guest stopped at
    /// `stopped`): say so and end this process at once, so that nothing more of it reaches
    /// the keeper. Returns only if the handover was called off meanwhile.
    pub fn commit_handover(&self, stopped: Instant) {
        self.region.set_live(Live::HandoverCheckpointUs, stopped.elapsed().as_micros() as u64);
        if self.swap_handover(HandoverState::Synced, HandoverState::Committed) {
            std::process::exit(0);
        }
    }

    /// The input log is half full: a local checkpoint is due whatever else holds it back.
    pub fn log_full(&self) -> bool {
        self.log_full
    }

    /// The outputs a checkpoint kept as held ([`Started::held`]), through the exactly-once
    /// filter: what is still to leave (the keeper may have delivered some before the death).
    pub fn pass_held(&mut self, held: Vec<Output>) -> Vec<Output> {
        held.into_iter().filter_map(|o| self.pass(o)).collect()
    }

    /// The recovery is over: the guest runs on from here.
    pub fn running(&mut self, replayed_inputs: usize, replayed_icount: u64) {
        running(&self.region, replayed_inputs, replayed_icount);
    }
}

/// Tell the keeper the guest runs (or, a backup, waits) again after a recovery.
pub fn running(r: &Region, replayed_inputs: usize, replayed_icount: u64) {
    r.set_live(Live::ReplayedInputs, replayed_inputs as u64);
    r.set_live(Live::ReplayedIcount, replayed_icount);
    r.set_live(Live::RunningNs, now_ns());
    r.set_live(Live::Phase, Phase::Resuming as u64);
}

impl Monitor {
    /// What of an output is still to leave: None when it left before a restart (console
    /// bytes are counted to the byte, so an output may leave in part).
    fn pass(&mut self, mut output: Output) -> Option<Output> {
        match &mut output.kind {
            OutputKind::Console(bytes) => {
                let start = self.console_bytes;
                self.console_bytes += bytes.len() as u64;
                if self.console_bytes <= self.console_mark {
                    return None;
                }
                let skip = self.console_mark.saturating_sub(start) as usize;
                bytes.drain(..skip);
            }
            OutputKind::Reset => {
                self.resets += 1;
                if self.resets <= self.resets_mark {
                    return None;
                }
            }
            OutputKind::NetFrame(_) => {
                self.frames += 1;
                if self.frames <= self.frames_mark {
                    return None;
                }
                // Counted as it leaves (the driver writes it next): a monitor killed in
                // between loses this frame, never sends it twice; TCP sends it again.
                if !self.frames_counted_on_release {
                    self.region.set_live(Live::FramesSent, self.frames);
                }
            }
            OutputKind::PowerOff { .. } => {}
        }
        Some(output)
    }

    /// Replay the inputs logged since the checkpoint (before the driver runs the machine):
    /// each enters at its stamp; outputs go out as the driver would send them, those that
    /// already left held back. No checkpoint meanwhile (it would drop the inputs not yet
    /// replayed from the log). Host events wait in the driver's channel meanwhile.
    pub fn replay(
        &mut self,
        machine: &mut Machine,
        inputs: Vec<Input>,
        console: &mut dyn ConsoleSink,
        mut tap: Option<&mut Tap>,
    ) -> Result<()> {
        let (count, replayed_icount) = self.replay_into(machine, inputs, &mut |output| {
            match output.kind {
                OutputKind::Console(bytes) => console.write(&bytes)?,
                OutputKind::Reset => console.rebooted()?,
                OutputKind::NetFrame(frame) => {
                    if let Some(tap) = tap.as_mut() {
                        let _ = tap.send(&frame); // lost as on a wire
                    }
                }
                OutputKind::PowerOff { .. } => {}
            }
            Ok(())
        })?;
        console.flush()?;
        self.running(count, replayed_icount);
        Ok(())
    }

    /// [`Monitor::replay`], each output that passes the filter handed to `emit` (a
    /// replicated primary holds them for output commit); the inputs and instructions
    /// replayed. The caller then says [`Monitor::running`].
    pub fn replay_into(
        &mut self,
        machine: &mut Machine,
        inputs: Vec<Input>,
        emit: &mut dyn FnMut(Output) -> Result<()>,
    ) -> Result<(usize, u64)> {
        let (start, count) = (machine.icount(), inputs.len());
        'replay: for input in inputs {
            while machine.icount() < input.icount {
                let before = machine.icount();
                let exit = machine.run(input.icount);
                for output in machine.take_outputs() {
                    let Some(output) = self.pass(output) else { continue };
                    emit(output)?;
                }
                self.region.bump_heartbeat(machine.icount());
                match exit {
                    RunExit::PowerOff { .. } | RunExit::Reset => break 'replay,
                    RunExit::Idle { .. } if machine.icount() == before => anyhow::bail!(
                        "replay diverged: the guest idles at icount {before}, the log has an input stamped at {}",
                        input.icount
                    ),
                    _ => {}
                }
            }
            anyhow::ensure!(
                machine.icount() == input.icount,
                "replay diverged: the machine ran to icount {}, past an input stamped at {}",
                machine.icount(),
                input.icount
            );
            machine.push_input(input).context("cannot replay an input")?;
        }
        Ok((count, machine.icount() - start))
    }
}

impl Mode<Machine> for Monitor {
    fn kind(&self) -> crate::status::Mode {
        crate::status::Mode::None
    }

    fn next_slice_end(&self, icount: u64) -> u64 {
        super::fault::point("driver::slice");
        icount + crate::mode::SLICE_ICOUNT
    }

    fn on_input(&mut self, input: &Input) -> Result<(), ModeError> {
        // Checkpoints at slice ends keep the log below half full; a log that fills within
        // one slice stops this monitor before the machine runs with the input, as if it
        // had never arrived (the next monitor starts from the last checkpoint).
        match self.region.append(input) {
            Ok(true) => {
                self.log_full = self.region.live(Live::LogBytes) > (super::region::LOG_CAP / 2) as u64;
                Ok(())
            }
            Ok(false) => Err(ModeError::message("the recovery region's input log is full")),
            Err(e) => Err(ModeError::new("cannot log an input in the recovery region", e)),
        }
    }

    fn on_outputs(&mut self, outputs: Vec<Output>) -> Vec<Output> {
        outputs.into_iter().filter_map(|o| self.pass(o)).collect()
    }

    fn on_slice_end(&mut self, machine: &mut Machine, _idle: bool) -> Result<(), ModeError> {
        self.heartbeat(machine.icount());
        let handover = HandoverState::from_u64(self.region.live(Live::HandoverState));
        match handover {
            HandoverState::Ready => {
                // The pre-copy round: a checkpoint whose pages the next monitor lays while
                // the guest runs on.
                self.checkpoint(machine)
                    .map_err(|e| ModeError::message(format!("cannot take a local checkpoint: {e:#}")))?;
                self.region.swap_live(Live::HandoverState, handover as u64, HandoverState::Delta as u64);
                return Ok(());
            }
            HandoverState::Synced => self.hand_over(machine)?,
            _ => {}
        }
        // While the next monitor lays the image or a checkpoint's pages, they stay as they are.
        let preparing = matches!(handover, HandoverState::Preparing | HandoverState::Delta);
        if self.log_full || (!preparing && self.last_checkpoint.elapsed() >= self.checkpoint_every) {
            self.checkpoint(machine)
                .map_err(|e| ModeError::message(format!("cannot take a local checkpoint: {e:#}")))?;
        }
        Ok(())
    }

    fn idle_wait_limit(&self) -> Option<Duration> {
        Some(HEARTBEAT_WAIT)
    }

    /// The VM ended: a last checkpoint folds the disk's last writes into the image.
    fn begin_end(&mut self, machine: &mut Machine, _exit_code: u32) -> Result<crate::mode::EndProgress, ModeError> {
        if self.disk.is_some() {
            self.checkpoint(machine)
                .map_err(|e| ModeError::message(format!("cannot take the last local checkpoint: {e:#}")))?;
        }
        Ok(crate::mode::EndProgress::Settled)
    }
}

/// Why a monitor cannot take the VM over.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error(transparent)]
    Region(#[from] RegionError),
    #[error("the local checkpoint's machine state does not encode or decode")]
    State(#[source] machine::snapshot::SnapshotError),
    #[error("the local checkpoint does not fit this VM")]
    Restore(#[source] machine::RestoreError),
    #[error("cannot build the machine")]
    Machine(#[source] machine::MachineError),
    #[error("the local checkpoint's held outputs do not decode")]
    Held,
}

impl RecoverError {
    /// The verdict the keeper reports.
    pub fn verdict(&self) -> Verdict {
        match self {
            RecoverError::Region(RegionError::Corrupt { .. }) | RecoverError::State(_) | RecoverError::Held => {
                Verdict::RegionCorrupt
            }
            _ => Verdict::None,
        }
    }
}

/// Start a monitor on `region`: a fresh machine (first checkpoint taken), or the VM
/// recovered from the region's checkpoint with the inputs to replay.
/// A written disk (`disk`) is folded up to the committed checkpoint first, and the machine
/// must write into an overlay (`config.disk_overlay`). `built`: the machine, if this monitor
/// built it ahead (a spare, [`build`]).
pub fn start(
    mut region: Region,
    config: &MachineConfig,
    mut disk: Option<DiskJournal>,
    built: Option<Built>,
) -> Result<Started, RecoverError> {
    assert!(disk.is_none() || config.disk_overlay, "a resilient VM's written disk goes through an overlay");
    region.set_live(Live::BegunNs, now_ns());
    region.set_live(Live::MonitorPid, u64::from(std::process::id()));
    region.bump_heartbeat(0);
    region.apply_staged(disk.as_mut())?;
    let built = match built {
        Some(built) => built,
        None => build(&region, config)?,
    };
    region.set_live(Live::BuiltNs, now_ns());
    let Some(committed) = region.committed()? else {
        region.set_live(Live::Phase, Phase::Starting as u64);
        let mut machine = built.machine;
        let mut monitor = Monitor::new(region, Marks::default(), disk);
        monitor.first_checkpoint(&mut machine)?;
        monitor.running(0, 0);
        return Ok(Started { machine, monitor, inputs: Vec::new(), recovered: false, held: Vec::new() });
    };
    region.set_live(Live::Phase, Phase::Recovering as u64);
    let mut machine = built.machine;
    let written = lay_image(&region, &mut machine, Some(&built.boot_pages))?;
    region.set_live(Live::LaidNs, now_ns());
    super::fault::point("keeper::recover");
    region.bump_heartbeat(committed.marks.icount);
    let (held, state) = split_held(&committed.state)?;
    let state = machine::snapshot::decode_machine_state(state).map_err(RecoverError::State)?;
    machine.restore_state(state).map_err(RecoverError::Restore)?;
    machine.take_dirty_pages();
    machine.take_dirty_sectors();
    let inputs = region.inputs(committed.marks.seq)?;
    region.set_live(Live::RestoredNs, now_ns());
    if std::env::var_os("FTVM_KEEPER_TIMING").is_some() {
        let ms = |a: Live, b: Live| region.live(b).saturating_sub(region.live(a)) as f64 / 1e6;
        eprintln!(
            "ftvm: monitor: machine built in {:.1} ms, {written} pages laid in {:.1} ms, state restored in {:.1} ms",
            ms(Live::BegunNs, Live::BuiltNs),
            ms(Live::BuiltNs, Live::LaidNs),
            ms(Live::LaidNs, Live::RestoredNs)
        );
    }
    let monitor = Monitor::new(region, marks_before(committed.marks, &held), disk);
    Ok(Started { machine, monitor, inputs, recovered: true, held })
}

/// The machine a monitor starts from, its RAM the region's image mapped copy-on-write
/// (nothing copied), the boot image laid over it as every monitor of this VM lays it (a
/// spare does this before it is needed). [`Built::boot_pages`] are then this process's
/// own copies: the image's version of those is laid again before the machine runs.
pub struct Built {
    pub machine: Machine,
    boot_pages: Vec<bool>,
}

impl Built {
    /// The machine, with the region's image laid where this process holds its own copies
    /// (the boot image's pages): RAM then reads as the image, every page CRC-checked.
    pub fn laid(self, region: &Region) -> Result<(Machine, usize), RecoverError> {
        let Built { mut machine, boot_pages } = self;
        let written = lay_image(region, &mut machine, Some(&boot_pages))?;
        Ok((machine, written))
    }
}

pub fn build(region: &Region, config: &MachineConfig) -> Result<Built, RecoverError> {
    let mapping = region.private_image()?;
    let (machine, pages) = Machine::new_over(config, Box::new(mapping)).map_err(RecoverError::Machine)?;
    let mut boot_pages = vec![false; (config.ram_size / region::PAGE as u64) as usize];
    for page in pages {
        boot_pages[page] = true;
    }
    Ok(Built { machine, boot_pages })
}

/// Tell the keeper why this monitor gives up, through the live page (if the region can
/// be mapped at all; the exit status says it either way).
pub fn give_up(region_fd: &std::os::fd::OwnedFd, ram_bytes: u64, verdict: Verdict, message: &str) -> i32 {
    if let Ok(fd) = region_fd.try_clone() {
        if let Ok(mut region) = Region::open(fd, ram_bytes) {
            region.set_message(message);
            region.set_live(Live::Verdict, verdict as u64);
        }
    }
    EXIT_CANNOT_RECOVER
}

/// Why a prepared monitor did not take the VM over.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error(transparent)]
    Recover(#[from] RecoverError),
    #[error("the handover was called off ({0})")]
    CalledOff(&'static str),
    #[error("the old monitor took no final checkpoint within {0:?}")]
    Timeout(Duration),
}

/// How long a prepared monitor waits for the old one's final checkpoint.
pub const HANDOVER_WAIT: Duration = Duration::from_secs(30);

/// Take the VM over in a planned handover: build the machine (unless `built`, a spare's)
/// and lay the image while the old monitor still runs the guest (it takes no checkpoint meanwhile), say `Ready`, wait
/// for its final checkpoint, then lay only the pages that checkpoint carried and restore
/// its state. The guest's pause is the final checkpoint plus that last step.
pub fn prepare(
    region: Region,
    config: &MachineConfig,
    mut disk: Option<DiskJournal>,
    built: Option<Built>,
) -> Result<Started, HandoverError> {
    assert!(disk.is_none() || config.disk_overlay, "a resilient VM's written disk goes through an overlay");
    let seq0 = region.live(Live::CheckpointSeq);
    let Built { mut machine, boot_pages } = match built {
        Some(built) => built,
        None => build(&region, config)?,
    };
    // The image may change under us if the old monitor was inside a checkpoint as the
    // handover began: then the next checkpoint is not seq0 + 1, and we lay it all again
    // at the end.
    let mut in_step = lay_image(&region, &mut machine, Some(&boot_pages)).is_ok();
    super::fault::point("keeper::handover-prepare");
    if !region.swap_live(Live::HandoverState, HandoverState::Preparing as u64, HandoverState::Ready as u64) {
        return Err(HandoverError::CalledOff("by the keeper"));
    }
    let deadline = Instant::now() + HANDOVER_WAIT;
    wait_for(&region, HandoverState::Delta, HandoverState::Ready, deadline)?;
    let seq1 = region.live(Live::CheckpointSeq);
    in_step = in_step && seq1 == seq0 + 1 && lay_staged(&region, seq1, &mut machine).is_ok();
    if !region.swap_live(Live::HandoverState, HandoverState::Delta as u64, HandoverState::Synced as u64) {
        return Err(HandoverError::CalledOff("by the keeper"));
    }
    wait_for(&region, HandoverState::Committed, HandoverState::Synced, deadline)?;
    let mut region = region;
    region.set_live(Live::MonitorPid, u64::from(std::process::id()));
    region.apply_staged(disk.as_mut()).map_err(RecoverError::from)?; // the old monitor applied it; redo if not
    let committed = region.committed().map_err(RecoverError::from)?.ok_or(HandoverError::CalledOff("no checkpoint"))?;
    if !(in_step && committed.marks.seq == seq1 + 1 && lay_staged(&region, committed.marks.seq, &mut machine).is_ok()) {
        lay_image(&region, &mut machine, None)?; // every written page: laid ones may be stale
    }
    let (held, state) = split_held(&committed.state)?;
    let state = machine::snapshot::decode_machine_state(state).map_err(RecoverError::State)?;
    machine.restore_state(state).map_err(RecoverError::Restore)?;
    machine.take_dirty_pages();
    machine.take_dirty_sectors();
    let inputs = region.inputs(committed.marks.seq).map_err(RecoverError::from)?;
    let pause_us = now_ns().saturating_sub(region.live(Live::HandoverStopNs)) / 1000;
    region.set_live(Live::HandoverPauseUs, pause_us);
    region.set_live(Live::Handovers, region.live(Live::Handovers) + 1);
    region.set_live(Live::HandoverState, HandoverState::Done as u64);
    region.bump_heartbeat(committed.marks.icount);
    let monitor = Monitor::new(region, marks_before(committed.marks, &held), disk);
    Ok(Started { machine, monitor, inputs, recovered: true, held })
}

/// Wait until the handover's state is `want` (from `now`): anything else calls it off.
pub(super) fn wait_for(
    region: &Region,
    want: HandoverState,
    now: HandoverState,
    deadline: Instant,
) -> Result<(), HandoverError> {
    loop {
        match HandoverState::from_u64(region.live(Live::HandoverState)) {
            state if state == want => return Ok(()),
            state if state == now => {}
            _ => return Err(HandoverError::CalledOff("by the keeper")),
        }
        if Instant::now() >= deadline {
            return Err(HandoverError::Timeout(HANDOVER_WAIT));
        }
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// Lay the pages of staged checkpoint `seq` over the machine's RAM, CRCs checked.
fn lay_staged(region: &Region, seq: u64, machine: &mut Machine) -> Result<(), RecoverError> {
    for (index, page) in region.staged_pages(seq)? {
        machine.write_page(index as usize, page).map_err(RecoverError::Restore)?;
    }
    Ok(())
}

/// Lay the written pages of the committed image over the machine's RAM, CRCs checked:
/// those of `only` (the pages this process holds copies of: RAM over the image shows the
/// rest as they are), or all.
pub(super) fn lay_image(region: &Region, machine: &mut Machine, only: Option<&[bool]>) -> Result<usize, RecoverError> {
    let own = |index: u64| only.is_none_or(|own| own.get(index as usize).copied().unwrap_or(true));
    let written: Vec<u64> = region.written_pages().filter(|&index| own(index)).collect();
    for (n, &index) in written.iter().enumerate() {
        let page = region.checked_page(index)?;
        machine.write_page(index as usize, page).map_err(RecoverError::Restore)?;
        if n as u64 % BEAT_PAGES == BEAT_PAGES - 1 {
            region.beat();
        }
    }
    Ok(written.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keeper::disk::create_journal;

    const SECTOR: usize = 512;

    /// A 16 MiB machine whose kernel is one instruction (`j .`), with a 64 KiB written disk
    /// of 0xee bytes under an overlay, as a resilient monitor builds it.
    fn machine_config(dir: &std::path::Path) -> MachineConfig {
        let mut image = vec![0u8; 4096];
        image[0..4].copy_from_slice(&0x0000_006fu32.to_le_bytes());
        image[8..16].copy_from_slice(&0x20_0000u64.to_le_bytes());
        image[16..24].copy_from_slice(&4096u64.to_le_bytes());
        image[56..60].copy_from_slice(b"RSC\x05");
        std::fs::write(dir.join("Image"), image).unwrap();
        std::fs::write(dir.join("disk.img"), vec![0xee; 128 * SECTOR]).unwrap();
        let mut config = MachineConfig::new(dir.join("Image"));
        config.ram_size = 16 << 20;
        config.disk = Some(machine::DiskConfig { path: dir.join("disk.img"), read_only: false });
        config.disk_overlay = true;
        config
    }

    #[test]
    fn held_outputs_read_back_as_kept_before_the_machine_state_and_damage_is_refused() {
        let held = vec![
            Output { icount: 5, kind: OutputKind::Console(b"12\n".to_vec()) },
            Output { icount: 6, kind: OutputKind::NetFrame(vec![7; 60]) },
            Output { icount: 7, kind: OutputKind::Reset },
            Output { icount: 8, kind: OutputKind::PowerOff { code: 3 } },
        ];
        let state = encode_held(&held, b"machine state".to_vec());
        assert_eq!(state.len(), held_bytes(&held) + b"machine state".len());
        let (back, rest) = split_held(&state).unwrap();
        assert_eq!((back, rest), (held.clone(), &b"machine state"[..]));
        assert_eq!(encode_held(&[], b"plain".to_vec()), b"plain", "nothing held: the state alone");
        assert_eq!(split_held(b"plain state!!!!!!").unwrap(), (Vec::new(), &b"plain state!!!!!!"[..]));
        assert!(matches!(split_held(&state[..30]), Err(RecoverError::Held)), "cut short");
        let marks = Marks { seq: 4, icount: 9, console_bytes: 10, resets: 1, frames: 2 };
        assert_eq!(marks_before(marks, &held), Marks { console_bytes: 7, resets: 0, frames: 1, ..marks });
    }

    #[test]
    fn each_local_checkpoint_folds_the_disk_into_the_image_and_empties_the_overlay() {
        let dir = std::env::temp_dir().join(format!("ftvm-keeper-overlay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = machine_config(&dir);
        let path = dir.join("disk.img");
        let disk = DiskJournal::open(create_journal().unwrap(), &path).unwrap();
        let region = Region::create(config.ram_size).unwrap();
        let Started { mut machine, mut monitor, .. } = start(region, &config, Some(disk), None).unwrap();
        let sector = |n: usize| std::fs::read(&path).unwrap()[n * SECTOR..(n + 1) * SECTOR].to_vec();

        machine.write_sectors(3, &[7; 2 * SECTOR]).unwrap();
        assert_eq!(
            (machine.disk_overlay_sectors(), sector(3)),
            (Some(2), vec![0xee; SECTOR]),
            "written in the overlay"
        );
        monitor.checkpoint(&mut machine).unwrap();
        assert_eq!(
            (machine.disk_overlay_sectors(), sector(4)),
            (Some(0), vec![7; SECTOR]),
            "folded, the overlay empty"
        );

        machine.write_sectors(4, &[9; SECTOR]).unwrap();
        let mut seen = vec![0u8; 3 * SECTOR];
        machine.read_sectors(3, &mut seen).unwrap();
        assert_eq!(seen, [[7; SECTOR], [9; SECTOR], [0xee; SECTOR]].concat(), "the guest sees image and overlay");
        assert_eq!((machine.disk_overlay_sectors(), sector(4)), (Some(1), vec![7; SECTOR]));
        monitor.checkpoint(&mut machine).unwrap();
        assert_eq!((machine.disk_overlay_sectors(), sector(4)), (Some(0), vec![9; SECTOR]));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
