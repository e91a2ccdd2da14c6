//! Live migration, the source's side (`ftvm ctl migrate`), as a [`Mode`]: checkpoint
//! replication to the destination (an `ftvm backup`) does the pre-copy — a full checkpoint
//! copied while the guest runs, then every epoch's dirty pages and sectors — and once the
//! destination holds every checkpoint taken, the guest pauses, the final checkpoint (one
//! short epoch) goes out, and the replication thread hands the VM over
//! ([`replica::PrimaryEvent::Switchover`]): the destination takes the ownership record and
//! runs; this replica stops, or, when the switchover is called off, runs on alone.
//!
//! While it migrates the VM is protected by its destination, so a source that dies during
//! the pre-copy (once the destination holds a whole checkpoint) or the stop-and-copy is
//! taken over by it, as in any failover. Fault points (feature `failpoints`):
//! `migrate::caught-up`, once, when the destination first holds every checkpoint taken (the
//! end of the pre-copy; the guest waits while the point sleeps), and
//! `migrate::final-checkpoint`, after the final checkpoint was taken, before the switchover.

use super::checkpoint::CheckpointPrimary;
use super::{EndProgress, Mode, ModeError, ModeEvent, Verdict};
use crate::control::Reply;
use crate::log::{self, Source};
use crate::status::{Migration, MigrationPhase, Status};
use crate::vm::Vm;
use machine::{Input, Output};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

/// How long the pre-copy may take to catch up before the migration is called off.
pub const MAX_PRECOPY: Duration = Duration::from_secs(100);
/// How long the destination may be unreachable during the pre-copy before the migration is
/// called off.
pub const DESTINATION_LOST: Duration = Duration::from_secs(3);
/// The final checkpoint carries what the guest dirtied since the last one was taken: the
/// guest pauses once the destination holds a checkpoint taken at most this long ago...
pub const FINAL_AGE: Duration = Duration::from_millis(4);
/// ...or, when acknowledgements are slower (a loaded host), after this many short rounds (a
/// checkpoint taken at once when the destination caught up, each carrying only what was
/// dirtied while the last was acknowledged), whatever the age.
pub const MAX_SHORT_ROUNDS: u32 = 3;

/// The source of a live migration.
pub struct MigrationSource<V: Vm> {
    inner: CheckpointPrimary<V>,
    to: String,
    started: Instant,
    phase: MigrationPhase,
    /// When the guest paused for the stop-and-copy.
    paused_at: Option<Instant>,
    /// From the pause to the handover (or to now).
    paused_ms: Option<f64>,
    total_ms: Option<f64>,
    final_epoch: Option<u64>,
    /// The final checkpoint's bytes and dirty pages.
    final_size: Option<(u64, u64)>,
    error: Option<String>,
    /// `ctl migrate`'s answer, owed until the migration is over.
    reply: Option<Sender<Reply>>,
    /// The log said the destination caught up.
    said_caught_up: bool,
    /// Since when no destination is connected (during the pre-copy).
    unheard_since: Option<Instant>,
    /// The epoch of the last checkpoint taken, and when it was taken.
    taken: (u64, Instant),
    /// Short rounds taken so far to shrink the final checkpoint.
    short_rounds: u32,
}

impl<V: Vm> MigrationSource<V> {
    /// Migrate over `inner`, a checkpoint replication to the destination just started;
    /// `reply` is answered once the VM is handed over or the migration called off.
    pub fn new(inner: CheckpointPrimary<V>, to: String, reply: Sender<Reply>) -> MigrationSource<V> {
        log::line(Source::Replication, format_args!("migration to {to}: pre-copy"));
        MigrationSource {
            inner,
            to,
            started: Instant::now(),
            phase: MigrationPhase::Precopy,
            paused_at: None,
            paused_ms: None,
            total_ms: None,
            final_epoch: None,
            final_size: None,
            error: None,
            reply: Some(reply),
            said_caught_up: false,
            unheard_since: None,
            taken: (0, Instant::now()),
            short_rounds: 0,
        }
    }

    fn figures(&self) -> Migration {
        Migration {
            phase: self.phase,
            to: self.to.clone(),
            total_ms: self.total_ms.unwrap_or_else(|| self.started.elapsed().as_secs_f64() * 1e3),
            bytes_sent: self.inner.bytes_sent(),
            checkpoints: self.inner.checkpoints_taken(),
            paused_ms: self.paused_ms.or_else(|| self.paused_at.map(|p| p.elapsed().as_secs_f64() * 1e3)),
            final_epoch: self.final_epoch,
            final_bytes: self.final_size.map(|s| s.0),
            final_pages: self.final_size.map(|s| s.1),
            error: self.error.clone(),
        }
    }

    fn answer(&mut self, reply: Reply) {
        if let Some(tx) = self.reply.take() {
            let _ = tx.send(reply);
        }
    }

    /// The migration is over without a handover: the VM runs on here.
    fn called_off(&mut self, why: String) {
        self.phase = MigrationPhase::CalledOff;
        self.total_ms = Some(self.started.elapsed().as_secs_f64() * 1e3);
        log::line(Source::Replication, format_args!("migration to {} called off: {why}; the VM runs on here", self.to));
        self.error = Some(why.clone());
        let body = serde_json::json!({ "error": format!("migration called off: {why}; the VM runs on here"),
            "migration": self.figures() });
        self.answer(Reply { status: 409, body });
    }

    /// Once the destination holds every checkpoint: pause, take the final one, hand over.
    fn maybe_switch_over(&mut self, vm: &mut V) -> Result<(), ModeError> {
        if self.phase != MigrationPhase::Precopy {
            return Ok(());
        }
        // A destination that drops the link now and then (one that applies too slowly closes
        // it) comes back and catches up; one gone for DESTINATION_LOST is given up.
        let lost = match (self.inner.backup_streaming(), self.unheard_since) {
            (true, _) => {
                self.unheard_since = None;
                false
            }
            (false, None) => {
                self.unheard_since = Some(Instant::now());
                false
            }
            (false, Some(since)) => since.elapsed() >= DESTINATION_LOST,
        };
        if lost || self.started.elapsed() >= MAX_PRECOPY {
            // Why the link went (a wrong key, a refusal) is the operator's clue: say it.
            let last = self.inner.last_error().map(|e| format!("; its last connection ended: {e}")).unwrap_or_default();
            self.error = Some(match lost {
                true => format!(
                    "the destination was lost during the pre-copy (no link for {} s{last})",
                    DESTINATION_LOST.as_secs()
                ),
                false => format!("the pre-copy did not catch up within {} s", MAX_PRECOPY.as_secs()),
            });
            let (tx, _rx) = std::sync::mpsc::channel();
            if let Some(refused) = self.inner.unprotect(tx) {
                self.error = refused.body["error"].as_str().map(String::from);
            }
            self.phase = MigrationPhase::CalledOff; // the Detached that follows answers
            return Ok(());
        }
        if !self.inner.caught_up() {
            return Ok(());
        }
        if !self.said_caught_up {
            self.said_caught_up = true;
            log::line(Source::Replication, format_args!("migration to {}: caught up", self.to));
            crate::keeper::fault::point("migrate::caught-up");
            if !self.inner.caught_up() {
                return Ok(()); // lost meanwhile (the fault point's wait)
            }
        }
        // Shrink the final copy: a checkpoint acknowledged slowly left much dirtied since; a
        // short round now carries that while the guest runs, and the next catch-up comes sooner.
        if self.taken.1.elapsed() > FINAL_AGE && self.short_rounds < MAX_SHORT_ROUNDS {
            self.short_rounds += 1;
            self.inner.checkpoint_now(vm)?;
            self.taken = (self.inner.epoch(), Instant::now());
            return Ok(());
        }
        self.paused_at = Some(Instant::now());
        let paused_at_unix_us =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
        self.phase = MigrationPhase::Switchover;
        let epoch = self.inner.checkpoint_now(vm)?;
        self.final_epoch = Some(epoch);
        self.final_size = self.inner.last_checkpoint_size();
        let (bytes, pages) = self.final_size.unwrap_or_default();
        log::line(
            Source::Replication,
            format_args!(
                "migration to {}: stop-and-copy: the guest is paused, final checkpoint {epoch} ({bytes} bytes, {pages} \
                 pages; after {} short rounds)",
                self.to, self.short_rounds
            ),
        );
        crate::keeper::fault::point("migrate::final-checkpoint");
        self.inner.switch_over(paused_at_unix_us);
        Ok(())
    }
}

impl<V: Vm> Mode<V> for MigrationSource<V> {
    fn kind(&self) -> crate::status::Mode {
        crate::status::Mode::Checkpoint
    }

    fn next_slice_end(&self, icount: u64) -> u64 {
        Mode::<V>::next_slice_end(&self.inner, icount)
    }

    fn on_input(&mut self, input: &Input) -> Result<(), ModeError> {
        self.inner.on_input(input)
    }

    fn on_outputs(&mut self, outputs: Vec<Output>) -> Vec<Output> {
        Mode::<V>::on_outputs(&mut self.inner, outputs)
    }

    fn on_slice_end(&mut self, vm: &mut V, idle: bool) -> Result<(), ModeError> {
        if self.phase == MigrationPhase::Switchover {
            return Ok(()); // paused: nothing to checkpoint until the switchover is settled
        }
        self.inner.on_slice_end(vm, idle)?;
        if self.inner.epoch() != self.taken.0 {
            self.taken = (self.inner.epoch(), Instant::now());
        }
        self.maybe_switch_over(vm)
    }

    fn take_released(&mut self) -> Vec<Output> {
        Mode::<V>::take_released(&mut self.inner)
    }

    fn must_wait(&self) -> bool {
        self.phase == MigrationPhase::Switchover || Mode::<V>::must_wait(&self.inner)
    }

    fn idle_wait_limit(&self) -> Option<Duration> {
        Mode::<V>::idle_wait_limit(&self.inner)
    }

    fn on_event(&mut self, vm: &mut V, event: ModeEvent) -> Verdict {
        match event {
            ModeEvent::HandedOver { generation } => {
                self.phase = MigrationPhase::HandedOver;
                self.paused_ms = self.paused_at.map(|p| p.elapsed().as_secs_f64() * 1e3);
                self.total_ms = Some(self.started.elapsed().as_secs_f64() * 1e3);
                let figures = self.figures();
                log::line(
                    Source::Replication,
                    format_args!(
                        "migration to {}: handed over at generation {generation}: total {:.1} ms, {} bytes sent, \
                         guest paused {:.2} ms here",
                        self.to,
                        figures.total_ms,
                        figures.bytes_sent,
                        figures.paused_ms.unwrap_or(0.0)
                    ),
                );
                let body = serde_json::json!({ "state": "migrated", "to": self.to, "generation": generation,
                    "migration": figures });
                self.answer(Reply::ok(body));
                Verdict::Migrated(format!(
                    "the VM migrated to {}, which owns it at generation {generation}; this replica stops",
                    self.to
                ))
            }
            ModeEvent::Stopped(message) => {
                // Fenced: the destination took the VM over (a failover during the migration).
                self.phase = MigrationPhase::HandedOver;
                self.total_ms = Some(self.started.elapsed().as_secs_f64() * 1e3);
                self.error = Some(message.clone());
                let body = serde_json::json!({
                    "error": format!("the migration was interrupted and the destination {} took the VM over: {message}", self.to),
                    "migration": self.figures() });
                self.answer(Reply { status: 409, body });
                Verdict::Migrated(format!(
                    "the VM is at {}, which took it over ({message}); this replica stops",
                    self.to
                ))
            }
            ModeEvent::Detached { generation } => {
                let why = self.error.clone().or_else(|| self.inner.last_error()).unwrap_or_else(|| {
                    "the destination did not take the VM (no acknowledgement or switchover answer in time)".into()
                });
                self.called_off(format!("{why} (ownership generation {generation} stays here)"));
                self.inner.on_event(vm, ModeEvent::Detached { generation })
            }
            event => self.inner.on_event(vm, event),
        }
    }

    fn begin_end(&mut self, vm: &mut V, exit_code: u32) -> Result<EndProgress, ModeError> {
        if self.reply.is_some() {
            self.called_off(format!("the VM ended (exit code {exit_code})"));
        }
        self.inner.begin_end(vm, exit_code)
    }

    fn protected_to(&self) -> Option<String> {
        Some(self.to.clone())
    }

    fn unprotect(&mut self, reply: Sender<Reply>) -> Option<Reply> {
        if self.phase == MigrationPhase::Switchover {
            return Some(Reply::error(409, "a switchover is under way: it settles the migration"));
        }
        self.error = Some("called off by unprotect".into());
        self.inner.unprotect(reply)
    }

    fn report(&self, status: &mut Status) {
        self.inner.report(status);
        status.migration = Some(self.figures());
    }

    fn finish(self: Box<Self>) -> Option<crate::replicate::Ownership> {
        Box::new(self.inner).finish()
    }
}
