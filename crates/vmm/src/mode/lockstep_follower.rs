//! Lockstep's backup: the same `ftvm backup` as checkpoint mode ([`CheckpointBackup`], whose
//! protocol thread, status and stand-down it shares), which turns follower when the stream
//! it receives is lockstep's (the first batch's [`Start`]: the mode comes with the stream).
//! From then on the driver runs the machine behind the primary — to the next input's stamp
//! or the held batches' end, never further ([`Mode::next_slice_end`]); the machine waits when
//! it has executed everything it holds — and the inputs, digests and starts are `replica`'s
//! pure [`Follower`]'s. The backup's own outputs do not leave; those after the primary's
//! release mark are kept. A divergence is logged, counted and refuses the batches after it
//! (the protocol then reconnects and the primary sends its whole state). On a takeover the
//! machine executes the rest of what it holds, the kept outputs leave (again, perhaps: sent
//! twice, never lost), and the driver runs it on as the primary.

use super::backup::CheckpointBackup;
use super::lockstep::BootParams;
use super::{EndProgress, Mode, ModeError, ModeEvent, Verdict};
use crate::control::{Command, Reply};
use crate::log::{self, Source};
use crate::replicate::backup::ToBackup;
use crate::replicate::{now_ms, Ownership};
use crate::status::{Status, Takeover};
use crate::vm::Vm;
use machine::{Output, RunExit};
use replica::lockstep::{is_lockstep, Batch, Divergence, Follower, Next, RunEnd};
use std::sync::mpsc::Sender;
use std::time::Duration;

/// Builds the backup's machine afresh from its images with the primary's boot parameters.
pub type Rebuild<V> = Box<dyn FnMut(&BootParams) -> Result<V, String> + Send>;

/// The backup's mode: checkpoint backup until the stream turns out to be lockstep's.
pub struct LockstepBackup<V: Vm> {
    inner: CheckpointBackup<V>,
    tx: Sender<ToBackup>,
    rebuild: Rebuild<V>,
    following: Option<Following>,
}

/// The follower's part.
struct Following {
    follower: Follower<Output>,
    /// Where the machine runs to next (None: it has executed all it holds).
    target: Option<u64>,
    /// Outputs of the slice under way, reported to the follower at its end.
    produced: Vec<Output>,
    /// Outputs to leave now (a takeover's re-sent ones).
    released: Vec<Output>,
    /// The last epoch held (a takeover goes live from it).
    epoch: u64,
    /// The divergence was logged.
    said_diverged: bool,
    /// The protocol was told the state is lost (since the last start).
    said_lost: bool,
    /// The icount last reported to the protocol thread ([`ToBackup::Executed`]).
    reported_icount: Option<u64>,
}

/// The follower tells the protocol thread how far its machine got at least this often (in
/// instructions), and whenever it has executed all it holds.
const REPORT_EVERY_ICOUNT: u64 = 1_000_000;

impl<V: Vm> LockstepBackup<V> {
    /// Wrap the checkpoint backup `inner`; `rebuild` makes the machine a lockstep start
    /// boots (from the images, with the primary's boot parameters).
    pub fn new(inner: CheckpointBackup<V>, rebuild: Rebuild<V>) -> Option<LockstepBackup<V>> {
        let tx = inner.sender()?;
        Some(LockstepBackup { inner, tx, rebuild, following: None })
    }

    /// A lockstep batch, whole and verified by the protocol, which acknowledged it as it
    /// handed it over (this process holds it). A batch the follower refuses (it diverged, or
    /// holds no start) makes the protocol drop its state, once: the primary then sends a
    /// state, and the stream starts again from it.
    fn hold(&mut self, vm: &mut V, epoch: u64, payload: &[u8]) {
        let following = self.following.get_or_insert_with(|| {
            log::line(Source::Backup, "the primary replicates in lockstep: following it");
            Following {
                follower: Follower::new(),
                target: None,
                produced: Vec::new(),
                released: Vec::new(),
                epoch: 0,
                said_diverged: false,
                said_lost: false,
                reported_icount: None,
            }
        });
        let held =
            Batch::decode(payload).map_err(|e| format!("lockstep batch {epoch} is malformed: {e}")).and_then(|batch| {
                let start = batch.start.is_some();
                following.follower.hold(batch).map(|()| start).map_err(|refused| refused.to_string())
            });
        match held {
            Ok(start) => {
                following.epoch = epoch;
                if start {
                    following.said_diverged = false;
                    following.said_lost = false;
                }
            }
            Err(reason) if !following.said_lost => {
                following.said_lost = true;
                let _ = self.tx.send(ToBackup::StateLost { reason });
            }
            Err(_) => {}
        }
        following.advance(vm, &mut self.rebuild, &self.tx);
    }
}

impl Following {
    /// Do what needs no running (starts, inputs, digests) until the machine must run or wait.
    fn advance<V: Vm>(&mut self, vm: &mut V, rebuild: &mut Rebuild<V>, tx: &Sender<ToBackup>) {
        self.target = None;
        loop {
            match self.follower.next(vm.icount()) {
                Next::Wait => break,
                Next::Run { until } => {
                    self.target = Some(until);
                    break;
                }
                Next::Boot { params } => {
                    let built = BootParams::decode(&params).and_then(|params| rebuild(&params));
                    match built {
                        Ok(fresh) => *vm = fresh,
                        Err(reason) => self.follower.failed(Divergence::StartFailed { reason }),
                    }
                }
                Next::Restore { bytes, .. } => {
                    if let Err(e) = vm.apply_checkpoint(&bytes) {
                        let reason = crate::replicate::chain(&e);
                        self.follower.failed(Divergence::StartFailed { reason });
                    }
                }
                Next::Push { icount, mut bytes } => {
                    // A test's provoked divergence: the input altered on this side only.
                    if crate::keeper::fault::corrupts("lockstep::alter-input") {
                        alter(&mut bytes);
                    }
                    let pushed = journal::decode_input(&bytes, 0)
                        .map_err(|e| crate::replicate::chain(&e))
                        .and_then(|input| vm.push_input(input).map_err(|e| crate::replicate::chain(&e)));
                    if let Err(reason) = pushed {
                        self.follower.failed(Divergence::InputRefused { icount, reason });
                    }
                }
                Next::Check { icount, .. } => {
                    let _ = self.follower.check(icount, vm.digest().0);
                }
            }
        }
        self.say_divergence(tx);
        self.report_executed(vm.icount(), tx);
    }

    /// Bounded lag: the protocol thread acknowledges a batch far ahead of the machine only
    /// once the machine catches up with it.
    fn report_executed(&mut self, icount: u64, tx: &Sender<ToBackup>) {
        let due = self.reported_icount.is_none_or(|last| {
            icount < last || icount - last >= REPORT_EVERY_ICOUNT || (self.target.is_none() && icount != last)
        });
        if due {
            self.reported_icount = Some(icount);
            let _ = tx.send(ToBackup::Executed { icount });
        }
    }

    /// A slice ended: tell the follower how far it got and what it produced.
    fn ran<V: Vm>(&mut self, vm: &mut V, idle: bool, ended: bool, rebuild: &mut Rebuild<V>, tx: &Sender<ToBackup>) {
        let Some(until) = self.target else { return };
        let end = if ended {
            RunEnd::Ended
        } else if idle {
            RunEnd::Idle
        } else {
            RunEnd::Ran
        };
        let outputs = std::mem::take(&mut self.produced);
        let _ = self.follower.ran(vm.icount(), until, end, outputs);
        self.advance(vm, rebuild, tx);
    }

    /// A divergence stops lockstep loudly: logged, counted (status, metrics), and the
    /// protocol drops the state, so that the primary sends its whole machine.
    fn say_divergence(&mut self, tx: &Sender<ToBackup>) {
        if let (Some(divergence), false) = (self.follower.diverged(), self.said_diverged) {
            self.said_diverged = true;
            log::line(
                Source::Backup,
                format_args!("LOCKSTEP DIVERGED: {divergence}; this backup waits for the primary's whole state"),
            );
            if !self.said_lost {
                self.said_lost = true;
                let _ = tx.send(ToBackup::StateLost { reason: divergence.to_string() });
            }
        }
    }

    /// A takeover: execute everything held, then the outputs after the release mark leave.
    fn run_rest<V: Vm>(&mut self, vm: &mut V, rebuild: &mut Rebuild<V>, tx: &Sender<ToBackup>) {
        self.advance(vm, rebuild, tx);
        while let Some(until) = self.target {
            let exit = vm.run(until);
            self.produced.extend(vm.take_outputs());
            let ended = matches!(exit, RunExit::PowerOff { .. } | RunExit::Reset);
            self.ran(vm, matches!(exit, RunExit::Idle { .. }), ended, rebuild, tx);
            if ended {
                break;
            }
        }
        self.released.extend(self.follower.take_unreleased());
    }
}

/// Change an encoded input (`journal::encode_input`: icount, tag, fields) so that the
/// machine still takes it: the low bit of an idle skip's or a clock rate's value, else the
/// last byte of a key, a frame or entropy.
fn alter(bytes: &mut [u8]) {
    let at = match bytes.get(8) {
        Some(4 | 5) if bytes.len() > 9 => 9,
        _ => bytes.len().saturating_sub(1),
    };
    if let Some(byte) = bytes.get_mut(at) {
        *byte ^= 0x01;
    }
}

impl<V: Vm> Mode<V> for LockstepBackup<V> {
    fn kind(&self) -> crate::status::Mode {
        match self.following {
            Some(_) => crate::status::Mode::Lockstep,
            None => self.inner.kind(),
        }
    }

    /// The next stamp or the held batches' end, in slices short enough that the primary's
    /// batches are taken (and acknowledged) while the machine catches up.
    fn next_slice_end(&self, icount: u64) -> u64 {
        let target = self.following.as_ref().and_then(|f| f.target).unwrap_or(icount);
        target.min(icount + super::lockstep::SLICE_ICOUNT)
    }

    fn stamps_inputs(&self) -> bool {
        false
    }

    /// A follower's outputs never leave while it follows; the follower keeps those after the
    /// primary's release mark.
    fn on_outputs(&mut self, outputs: Vec<Output>) -> Vec<Output> {
        if let Some(following) = &mut self.following {
            following.produced.extend(outputs);
        }
        Vec::new()
    }

    fn on_slice_end(&mut self, vm: &mut V, idle: bool) -> Result<(), ModeError> {
        if let Some(following) = &mut self.following {
            following.ran(vm, idle, false, &mut self.rebuild, &self.tx);
        }
        Ok(())
    }

    fn take_released(&mut self) -> Vec<Output> {
        self.following.as_mut().map(|f| std::mem::take(&mut f.released)).unwrap_or_default()
    }

    fn must_wait(&self) -> bool {
        self.following.as_ref().is_none_or(|f| f.target.is_none())
    }

    /// A follower never waits on its guest's timers: the primary's idle skips are inputs.
    fn idle_wait_limit(&self) -> Option<Duration> {
        self.following.as_ref().map(|_| Duration::ZERO)
    }

    fn on_event(&mut self, vm: &mut V, event: ModeEvent) -> Verdict {
        match event {
            ModeEvent::Apply { epoch, payload, .. } if is_lockstep(&payload) => {
                self.hold(vm, epoch, &payload);
                Verdict::Continue
            }
            ModeEvent::Apply { run_id, epoch, icount, payload } => {
                // A checkpoint stream (again): whatever was followed is replaced.
                self.following = None;
                self.inner.on_event(vm, ModeEvent::Apply { run_id, epoch, icount, payload })
            }
            ModeEvent::TookOver { generation, last_heard_ms, .. } if self.following.is_some() => {
                let following = self.following.as_mut().expect("checked");
                let (started, from_icount) = (std::time::Instant::now(), vm.icount());
                following.run_rest(vm, &mut self.rebuild, &self.tx);
                let rest = (vm.icount() - from_icount, started.elapsed().as_secs_f64() * 1e3);
                if let Some(divergence) = following.follower.diverged() {
                    return Verdict::Fenced(format!(
                        "this lockstep backup won the ownership record but its machine diverged from the \
                         primary's ({divergence}): it cannot go live"
                    ));
                }
                let status = following.follower.status();
                log::line(
                    Source::Backup,
                    format_args!(
                        "taking over in lockstep at icount {} (epoch {}), after executing the {} instructions it \
                         held in {:.1} ms: {} outputs sent again",
                        vm.icount(),
                        following.epoch,
                        rest.0,
                        rest.1,
                        following.released.len()
                    ),
                );
                Verdict::GoLive(Takeover {
                    epoch: following.epoch,
                    generation,
                    last_frame_to_live_ms: last_heard_ms.map_or(0, |heard| now_ms().saturating_sub(heard)),
                    diverged_checkpoints: status.divergences,
                    migration: None,
                })
            }
            ModeEvent::EndedOnPrimary { exit_code } => {
                // The primary's last batches are held: this side's machine (its disk) ends
                // where the primary's did before the backup stands down.
                if let Some(following) = &mut self.following {
                    following.run_rest(vm, &mut self.rebuild, &self.tx);
                    following.released.clear();
                }
                self.inner.on_event(vm, ModeEvent::EndedOnPrimary { exit_code })
            }
            event => self.inner.on_event(vm, event),
        }
    }

    fn control(&mut self, command: &Command) -> Option<Reply> {
        self.inner.control(command)
    }

    fn begin_end(&mut self, vm: &mut V, exit_code: u32) -> Result<EndProgress, ModeError> {
        self.inner.begin_end(vm, exit_code)
    }

    fn report(&self, status: &mut Status) {
        self.inner.report(status);
        let Some(following) = &self.following else { return };
        let s = following.follower.status();
        status.mode = crate::status::Mode::Lockstep;
        if let Some(backup) = &mut status.backup {
            backup.diverged_checkpoints = s.divergences;
        }
        status.lockstep = Some(crate::status::Lockstep {
            inputs_held: s.inputs_held,
            inputs_pushed: s.inputs_pushed,
            digests_checked: s.digests_checked,
            divergences: s.divergences,
            resyncs: s.resyncs,
            kept_outputs: s.kept_outputs,
            released_outputs: following.follower.outputs().0,
            lag_icount: s.held_to_icount.map(|held| held.saturating_sub(status.icount)),
            diverged: following.follower.diverged().map(|d| d.to_string()),
            ..crate::status::Lockstep::default()
        });
    }

    fn finish(self: Box<Self>) -> Option<Ownership> {
        Box::new(self.inner).finish()
    }
}
