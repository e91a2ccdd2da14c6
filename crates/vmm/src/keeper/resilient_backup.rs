//! A checkpoint backup under a keeper (`ftvm backup --resilient`, issue 11,
//! docs/microreboot.md): a monitor that dies is replaced by one that takes the backup's
//! state up from the shared region, so that the primary stays protected (or is protected
//! again by the incremental checkpoints it kept, not a full one) and the backup may still
//! take over.
//!
//! - Every checkpoint the machine applies is committed to the region (its pages and the
//!   machine state, with what the protocol keeps: [`replica::BackupKept`]) *before* its
//!   epoch is acknowledged, so the region always holds an epoch the primary still keeps or
//!   the one it was last told of. A new monitor restores that machine and resumes the
//!   protocol from it ([`replica::Backup::resume`]); its listening socket, TAP device and
//!   API socket are the keeper's, so the primary reconnects to the same address.
//! - A takeover turns the region into a running VM's: the keeper's [`Monitor`] runs the VM
//!   from the checkpoint the backup went live from (the region holds it already), and a
//!   monitor that dies afterwards recovers as any `--resilient` VM's does.
//! - A planned handover (rejuvenate, upgrade) of a waiting backup: the next monitor builds
//!   its machine while this one applies checkpoints on; then this one stops between two
//!   checkpoints (each applied one is in the region already) and ends, and the next takes
//!   the state up from the region as after a restart. The primary sees a reconnection.

use super::monitor::{Built, HandoverError, Monitor, HEARTBEAT_WAIT};
use super::region::{HandoverState, Live, Marks, Phase, Region, RegionError};
use crate::control::{Command, Reply};
use crate::host::HostEvent;
use crate::mode::backup::CheckpointBackup;
use crate::mode::{EndProgress, Mode, ModeError, ModeEvent, Verdict};
use crate::replicate::backup::BackupOptions;
use crate::replicate::{Ownership, ReplicationError};
use crate::status::{Status, Takeover};
use machine::{Machine, MachineConfig, Output};
use replica::{BackupKept, CheckpointId, ClaimRight};
use std::collections::BTreeSet;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

/// The region's state part of a waiting backup starts with this (a running VM's holds a
/// machine state alone, which starts with the snapshot format's own magic).
const KEPT_MAGIC: [u8; 8] = *b"FTVMBKUP";
/// Magic, run id, epoch, icount, newest generation, whether a right follows, the right.
const KEPT_BYTES: usize = 8 + 4 * 8 + 1 + 3 * 8;

/// The region's state part for a waiting backup: what the protocol keeps, then the machine
/// state's encoding.
pub fn encode_kept(kept: &BackupKept, machine_state: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(KEPT_BYTES + machine_state.len());
    out.extend_from_slice(&KEPT_MAGIC);
    for v in [kept.applied.run_id, kept.applied.epoch, kept.icount, kept.newest_generation] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.push(kept.right.is_some() as u8);
    let right = kept.right.unwrap_or(ClaimRight { run_id: 0, generation: 0, from_epoch: 0 });
    for v in [right.run_id, right.generation, right.from_epoch] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(machine_state);
    out
}

/// The protocol's kept state and the machine state's encoding, if `state` is a waiting
/// backup's (None: a running VM's, after a takeover). The state part's CRC was checked
/// when it was read.
pub fn decode_kept(state: &[u8]) -> Option<(BackupKept, &[u8])> {
    if state.len() < KEPT_BYTES || state[..8] != KEPT_MAGIC {
        return None;
    }
    let v = |i: usize| u64::from_le_bytes(state[8 + i * 8..16 + i * 8].try_into().expect("8 bytes"));
    let w = |i: usize| u64::from_le_bytes(state[41 + i * 8..49 + i * 8].try_into().expect("8 bytes"));
    let right = (state[40] != 0).then(|| ClaimRight { run_id: w(0), generation: w(1), from_epoch: w(2) });
    let kept = BackupKept {
        applied: CheckpointId { run_id: v(0), epoch: v(1) },
        icount: v(2),
        right,
        newest_generation: v(3),
    };
    Some((kept, &state[KEPT_BYTES..]))
}

/// Why a backup's monitor cannot take its state up from the region.
#[derive(Debug, thiserror::Error)]
pub enum BackupRecoverError {
    #[error(transparent)]
    Region(#[from] RegionError),
    #[error("the kept checkpoint's machine state does not decode")]
    State(#[source] machine::snapshot::SnapshotError),
    #[error("the kept checkpoint does not fit this VM")]
    Restore(#[source] machine::RestoreError),
    #[error(transparent)]
    Build(#[from] super::monitor::RecoverError),
    #[error(transparent)]
    Handover(#[from] HandoverError),
}

impl BackupRecoverError {
    /// The verdict the keeper reports.
    pub fn verdict(&self) -> super::region::Verdict {
        match self {
            BackupRecoverError::Region(RegionError::Corrupt { .. }) | BackupRecoverError::State(_) => {
                super::region::Verdict::RegionCorrupt
            }
            BackupRecoverError::Build(e) => e.verdict(),
            _ => super::region::Verdict::None,
        }
    }
}

/// What a backup's monitor finds in the region (one value per monitor start: its size does not matter).
#[allow(clippy::large_enum_variant)]
pub enum Found {
    /// A backup, fresh (`kept` None: nothing applied yet) or restarted with its machine
    /// holding the kept checkpoint again.
    Waiting { machine: Machine, kept: Option<BackupKept>, keeper: Keeper },
    /// This backup took the VM over before: recover it as any `--resilient` VM
    /// ([`super::monitor::start`] with the region).
    Live(Region),
}

/// Whether the region holds a VM this backup took over (not a waiting backup's state).
pub fn holds_live_vm(region: &Region) -> Result<bool, BackupRecoverError> {
    Ok(region.committed()?.is_some_and(|c| decode_kept(&c.state).is_none()))
}

/// Take the backup's state up from `region`: build the machine (unless `built`, a spare's
/// or a handover successor's: RAM is the region's image mapped copy-on-write), and if a
/// checkpoint was kept, lay what this process holds copies of and restore its state.
pub fn recover(mut region: Region, config: &MachineConfig, built: Option<Built>) -> Result<Found, BackupRecoverError> {
    region.set_live(super::region::Live::MonitorPid, u64::from(std::process::id()));
    region.bump_heartbeat(0);
    region.apply_staged(None)?;
    let committed = region.committed()?;
    let kept = match &committed {
        None => None,
        Some(c) => match decode_kept(&c.state) {
            None => return Ok(Found::Live(region)),
            Some((kept, state)) => Some((kept, state.to_vec(), c.marks.seq)),
        },
    };
    region.set_live(super::region::Live::Phase, super::region::Phase::Recovering as u64);
    let built = match built {
        Some(built) => built,
        None => super::monitor::build(&region, config)?,
    };
    region.set_live(Live::BuiltNs, super::supervisor::now_ns());
    let (mut machine, _laid) = built.laid(&region)?;
    region.set_live(Live::LaidNs, super::supervisor::now_ns());
    let seq = match &kept {
        None => 0,
        Some((kept, state, seq)) => {
            region.bump_heartbeat(kept.icount);
            let state = machine::snapshot::decode_machine_state(state).map_err(BackupRecoverError::State)?;
            machine.restore_state(state).map_err(BackupRecoverError::Restore)?;
            *seq
        }
    };
    machine.take_dirty_pages();
    machine.take_dirty_sectors();
    region.set_live(Live::RestoredNs, super::supervisor::now_ns());
    super::monitor::running(&region, 0, 0);
    let fd =
        region.fd().try_clone().map_err(|e| RegionError::Map(nix::Error::from_raw(e.raw_os_error().unwrap_or(0))))?;
    let live = Region::open(fd, region.layout().ram_pages * super::region::PAGE as u64)?;
    Ok(Found::Waiting { machine, kept: kept.map(|k| k.0), keeper: Keeper { region, live, seq } })
}

/// A planned handover's successor for a waiting backup: build the machine while the old
/// monitor applies checkpoints on, say `Ready`, wait until it stopped (`Committed`), then
/// take the state up as after a restart. (A backup that took the VM over hands it over as
/// any `--resilient` VM: [`holds_live_vm`], then [`super::monitor::prepare`].)
pub fn prepare(region: Region, config: &MachineConfig, built: Option<Built>) -> Result<Found, BackupRecoverError> {
    let built = match built {
        Some(built) => built,
        None => super::monitor::build(&region, config)?,
    };
    super::fault::point("keeper::handover-prepare");
    if !region.swap_live(Live::HandoverState, HandoverState::Preparing as u64, HandoverState::Ready as u64) {
        return Err(HandoverError::CalledOff("by the keeper").into());
    }
    let deadline = Instant::now() + super::monitor::HANDOVER_WAIT;
    super::monitor::wait_for(&region, HandoverState::Committed, HandoverState::Ready, deadline)?;
    let found = recover(region, config, Some(built))?;
    if let Found::Waiting { keeper, .. } = &found {
        let r = &keeper.live;
        let pause_us = super::supervisor::now_ns().saturating_sub(r.live(Live::HandoverStopNs)) / 1000;
        r.set_live(Live::HandoverPauseUs, pause_us);
        r.set_live(Live::Handovers, r.live(Live::Handovers) + 1);
        r.set_live(Live::HandoverState, HandoverState::Done as u64);
    }
    Ok(found)
}

/// The backup's side of the region: commits each applied checkpoint.
pub struct Keeper {
    region: Region,
    /// The same region mapped again, for heartbeats while `region` is being written.
    live: Region,
    /// The committed checkpoint's seq (0: none).
    seq: u64,
}

impl Keeper {
    /// Commit the machine as it stands after applying checkpoint `applied` (its `payload`):
    /// the pages it wrote, the state, and what the protocol keeps. `zeroed`: pages a full
    /// checkpoint cleared (non-zero before it, absent from it), which the image must hold
    /// as zeros, since a new monitor lays the image over a freshly built machine.
    fn commit(&mut self, machine: &Machine, payload: &[u8], zeroed: &[usize], kept: BackupKept) -> Result<(), String> {
        let (pages, _sectors) =
            machine::checkpoint::written(payload).ok_or("the checkpoint applied does not list its pages")?;
        let pages: BTreeSet<usize> = pages.into_iter().chain(zeroed.iter().copied()).collect();
        let state = machine::snapshot::encode_machine_state(&machine.save_state())
            .map_err(|e| format!("cannot encode the machine state: {}", crate::replicate::chain(&e)))?;
        let seq = self.seq + 1;
        let marks = Marks { seq, icount: machine.icount(), ..Marks::default() };
        let mut staging = self.region.stage();
        for (n, &index) in pages.iter().enumerate() {
            staging.page(index as u64, machine.page(index).ok_or("a checkpoint's page is outside RAM")?);
            if n % 4096 == 4095 {
                self.live.bump_heartbeat(machine.icount());
            }
        }
        let committed = staging
            .commit(marks, &encode_kept(&kept, &state), super::disk::DiskStaged::default())
            .and_then(|()| self.region.apply_staged(None));
        committed.map_err(|e| format!("cannot keep it in the keeper's region: {}", crate::replicate::chain(&e)))?;
        self.region.reset_log(seq);
        self.seq = seq;
        Ok(())
    }
}

/// The mode of a backup under a keeper: the checkpoint backup, each applied checkpoint
/// committed to the region before it is acknowledged, and a heartbeat.
pub struct BackupMonitor {
    backup: CheckpointBackup<Machine>,
    keeper: Keeper,
}

impl BackupMonitor {
    /// Wait for the primary (from the kept checkpoint, if any) on `options`' listener.
    pub fn start(
        options: BackupOptions,
        ownership: Ownership,
        events: Sender<HostEvent>,
        machine: &Machine,
        kept: Option<BackupKept>,
        keeper: Keeper,
    ) -> Result<BackupMonitor, ReplicationError> {
        let backup = CheckpointBackup::resume(options, ownership, events, machine, kept)?;
        Ok(BackupMonitor { backup, keeper })
    }

    /// The mode the VM runs under once this backup took it over: the keeper's monitor, from
    /// the checkpoint it went live from. The region holds that checkpoint's pages already;
    /// its state part becomes a running VM's (the machine state alone), so that a monitor
    /// that dies from here recovers the VM rather than a backup.
    pub fn live_mode(region: Region) -> crate::driver::LiveMode<Machine> {
        Box::new(move |machine: &mut Machine, _takeover: &Takeover| -> Box<dyn Mode<Machine>> {
            region.set_live(Live::Waiting, 0);
            let seq = region.committed().ok().flatten().map_or(0, |c| c.marks.seq);
            let marks = Marks { seq, icount: machine.icount(), ..Marks::default() };
            let mut monitor = Monitor::adopt(region, marks, None);
            if let Err(e) = monitor.checkpoint_of(machine, &[], &[], Instant::now()) {
                // The region would still say "backup": a new monitor must not wait as one
                // with the VM running here. The keeper starts one that finds this out.
                crate::log::warn(format_args!("cannot turn the keeper's region into the live VM's: {e:#}"));
                std::process::abort();
            }
            Box::new(monitor)
        })
    }
}

impl Mode<Machine> for BackupMonitor {
    fn kind(&self) -> crate::status::Mode {
        Mode::<Machine>::kind(&self.backup)
    }

    fn stamps_inputs(&self) -> bool {
        false
    }

    fn on_outputs(&mut self, outputs: Vec<Output>) -> Vec<Output> {
        self.backup.on_outputs(outputs)
    }

    /// The driver asks at every turn of its wait, events or not: the heartbeat goes with
    /// it. (Slice ends come only when no event arrived for a wait tick, and a client asking
    /// for the status more often than that kept the heartbeat still: the keeper took the
    /// backup for hung.)
    /// A planned handover's successor is ready: this monitor stops here, between two
    /// checkpoints (every one it applied is in the region), and ends.
    fn must_wait(&self) -> bool {
        let live = &self.keeper.live;
        live.bump_heartbeat(self.keeper.region.live(Live::Icount));
        if live.live(Live::Phase) == Phase::Resuming as u64 {
            // It waits for the primary as it should: the hang limit applies from now on
            // (the start grace before), and the keeper may start a spare.
            live.set_live(Live::Phase, Phase::Running as u64);
        }
        live.set_live(Live::Waiting, 1); // (a kill now is no poison checkpoint)
        if live.live(Live::HandoverState) == HandoverState::Ready as u64 {
            super::fault::point("keeper::handover-final");
            live.set_live(Live::HandoverStopNs, super::supervisor::now_ns());
            live.set_live(Live::HandoverCheckpointUs, 0);
            if live.swap_live(Live::HandoverState, HandoverState::Ready as u64, HandoverState::Committed as u64) {
                std::process::exit(0);
            }
        }
        true
    }

    fn on_slice_end(&mut self, machine: &mut Machine, _idle: bool) -> Result<(), ModeError> {
        self.keeper.region.bump_heartbeat(machine.icount());
        Ok(())
    }

    fn idle_wait_limit(&self) -> Option<Duration> {
        Some(HEARTBEAT_WAIT)
    }

    fn on_event(&mut self, machine: &mut Machine, event: ModeEvent) -> Verdict {
        self.keeper.region.bump_heartbeat(machine.icount());
        let ModeEvent::Apply { run_id, epoch, icount, payload } = event else {
            return self.backup.on_event(machine, event);
        };
        self.keeper.live.set_live(Live::Waiting, 0); // a death from here may be the checkpoint's
        super::fault::point("keeper::backup-apply");
        let full = machine::checkpoint::is_full(&payload);
        if full {
            // Applying and keeping a whole RAM takes a while without a heartbeat: the keeper
            // allows it the time it allows a recovery.
            self.keeper.region.set_live(Live::Phase, Phase::Recovering as u64);
        }
        // A full checkpoint zeroes what it does not carry: those pages must go to the image too.
        let zeroed: Vec<usize> = if full {
            (0..Vm::page_count(machine)).filter(|&i| machine.page(i).is_some_and(|p| !is_zero(p))).collect()
        } else {
            Vec::new()
        };
        let status = self.backup.protocol_status();
        let kept = BackupKept {
            applied: CheckpointId { run_id, epoch },
            icount,
            right: status.as_ref().and_then(|s| s.right),
            newest_generation: status.map_or(0, |s| s.newest_generation),
        };
        let keeper = &mut self.keeper;
        let started = Instant::now();
        let mut applied = Duration::ZERO;
        self.backup.apply_then(machine, epoch, &payload, &mut |m: &mut Machine| {
            applied = started.elapsed();
            keeper.commit(m, &payload, &zeroed, kept)
        });
        if full && std::env::var_os("FTVM_KEEPER_TIMING").is_some() {
            eprintln!(
                "ftvm: backup monitor: full checkpoint {epoch} ({} pages, {} zeroed) applied in {applied:?}, kept by {:?}",
                machine::checkpoint::page_count(&payload),
                zeroed.len(),
                started.elapsed()
            );
        }
        self.keeper.region.bump_heartbeat(icount);
        if full {
            self.keeper.region.set_live(Live::Phase, Phase::Running as u64);
        }
        Verdict::Continue
    }

    fn control(&mut self, command: &Command) -> Option<Reply> {
        Mode::<Machine>::control(&mut self.backup, command)
    }

    fn begin_end(&mut self, machine: &mut Machine, exit_code: u32) -> Result<EndProgress, ModeError> {
        self.backup.begin_end(machine, exit_code)
    }

    fn report(&self, status: &mut Status) {
        Mode::<Machine>::report(&self.backup, status)
    }

    fn finish(self: Box<Self>) -> Option<Ownership> {
        Box::new(self.backup).finish()
    }
}

use crate::vm::Vm;

/// Whether a page holds only zero bytes (in blocks the compiler vectorizes).
fn is_zero(bytes: &[u8]) -> bool {
    bytes.chunks(64).all(|block| block.iter().fold(0u8, |acc, b| acc | b) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kept_state_reads_back_as_written_and_a_machine_state_is_not_taken_for_it() {
        let kept = BackupKept {
            applied: CheckpointId { run_id: 7, epoch: 42 },
            icount: 1_000_000,
            right: Some(ClaimRight { run_id: 7, generation: 3, from_epoch: 40 }),
            newest_generation: 3,
        };
        let encoded = encode_kept(&kept, b"machine state");
        assert_eq!(decode_kept(&encoded), Some((kept, &b"machine state"[..])));
        let no_right = BackupKept { right: None, ..kept };
        assert_eq!(decode_kept(&encode_kept(&no_right, b"")), Some((no_right, &b""[..])));
        assert_eq!(decode_kept(b"FTSNAP.. a machine state"), None);
        assert_eq!(decode_kept(&encoded[..KEPT_BYTES - 1]), None);
    }
}
