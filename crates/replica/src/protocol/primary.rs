//! The primary's side: handshake, streaming checkpoints in frames (resuming where a broken
//! connection stopped), output commit, heartbeats, and the ownership rule that keeps
//! acknowledged work (DESIGN.md §5):
//!
//! - While *protected*, an output leaves only once the backup has acknowledged the epoch that
//!   made it.
//! - To release outputs the backup has not acknowledged (*unprotected*, after the backup has
//!   been lost for `backup_loss_grace_ms`), the primary first swaps the ownership generation
//!   forward. Every state the backup holds then belongs to an older generation, and a backup
//!   can take over only by swapping *its* generation: it never goes live with a state older
//!   than an output that left.
//! - Once a backup is back and has caught up, the primary stops releasing early, waits for
//!   the acknowledgement of the last epoch it released unprotected, and tells the backup
//!   (`Protected { generation, from_epoch }`) that its state now counts for the new
//!   generation: the VM is protected again.
//! - With [`BackupLossPolicy::Hold`] the primary never runs unprotected: outputs wait until a
//!   backup acknowledges them.
//! - A VM that ends ends on both sides: the last outputs leave once the backup acknowledged
//!   the final epoch (then the backup is told, with the exit code), or, with no backup, only
//!   after the ownership record was marked ended.
//! - Replication stopped on purpose ([`PrimaryEvent::Unprotect`], `ftvm ctl unprotect`) is
//!   going unprotected for good: the primary first swaps the generation forward (when a
//!   backup may hold a state that counts for the current one), so that the backup can never
//!   take over, told or not; then it releases everything, tells the backup to stand down,
//!   and reports [`PrimaryAction::Detached`]. The VM runs on alone, owning the record.
//! - Live migration ([`PrimaryEvent::Switchover`], `ftvm ctl migrate`) hands the VM to the
//!   backup: with the machine paused at its final checkpoint, the primary sends `Switchover`
//!   right behind that checkpoint's frames; the backup swaps the record while it applies the
//!   checkpoint and, once both are done, answers `SwitchedOver` (which says it holds the final
//!   state: the final epoch's outputs are released, if its Ack did not release them already);
//!   the primary answers `HandedOver` and stops
//!   ([`ProtocolError::HandedOver`]). Without an answer in time the switchover is called off:
//!   before `Switchover` was sent, as an unprotect (`Detached`); after it, the primary reads
//!   the record and takes the VM back by swapping whatever generation it finds at most one
//!   past its own (the backup does not run before `HandedOver`, and swaps again before it
//!   runs without one, so a record one past ours names a backup that never ran), or concedes
//!   when the record moved further.

use std::collections::VecDeque;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::{goodbye, worth_a_goodbye, Link, ProtocolError, RecordView, Repairs, SwapAnswer};
use crate::messages::{CheckpointId, ConfigDigest, Message, Role, PROTOCOL_VERSION};
use crate::wire::{Decoder, Direction, Encoder, Nonce, PresharedKey, MAX_PAYLOAD_BYTES};

/// Bytes a CheckpointChunk spends on its own fields.
const CHUNK_OVERHEAD_BYTES: usize = 16;
/// Payload bytes framed per step at most: a large checkpoint goes out over many steps, so
/// that heartbeats and decisions never wait for it.
const MAX_FRAMED_BYTES_PER_STEP: usize = 4 << 20;
/// A backup whose acknowledgements trail the newest epoch by at most this many epochs has
/// caught up: the primary stops releasing early and waits for it.
const CATCH_UP_LAG_EPOCHS: u64 = 4;

/// What a checkpoint holds: the whole state, what changed since the previous epoch, or
/// nothing kept (the dirty logs are emptied and the epoch ends, with no backup to send it to).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointKind {
    Full,
    Incremental,
    Discard,
}

/// What a primary does when it has no backup that can acknowledge its outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupLossPolicy {
    /// Keep serving unprotected (after swapping the generation forward), as VMware FT does.
    Continue,
    /// Hold outputs until a backup acknowledges them: no acknowledged work ever depends on
    /// one replica alone.
    Hold,
}

/// Whether the backup's state covers every output that left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    /// Outputs leave on the backup's acknowledgements; the backup may take over.
    Protected,
    /// Outputs are held until a backup catches up and acknowledges the last epoch released
    /// early (`None`: nothing released early yet).
    CatchingUp { released_up_to: Option<u64> },
    /// Outputs leave one epoch late without acknowledgement; the backup's state is stale.
    Unprotected,
}

/// The primary's settings. [`PrimaryConfig::new`] fills in sensible timings.
#[derive(Debug, Clone)]
pub struct PrimaryConfig {
    pub key: PresharedKey,
    pub config_digest: ConfigDigest,
    /// Chosen at random when the primary starts; names this run's checkpoints, so a backup's
    /// state from another run is never taken for ours.
    pub run_id: u64,
    pub heartbeat_interval_ms: u64,
    /// A connection on which the backup has said nothing for this long is closed.
    pub peer_timeout_ms: u64,
    pub handshake_timeout_ms: u64,
    /// Payload bytes per CheckpointChunk frame.
    pub chunk_bytes: usize,
    pub on_backup_loss: BackupLossPolicy,
    /// With no backup streaming for this long, outputs are released unprotected (Continue).
    pub backup_loss_grace_ms: u64,
    /// How often a primary with no backup checks that it still owns the VM.
    pub ownership_check_ms: u64,
    /// Retry a store operation that failed this much later.
    pub store_retry_ms: u64,
    /// At the end of the VM, how long to wait for the backup's acknowledgement of the final
    /// epoch before marking the record ended without it.
    pub end_timeout_ms: u64,
    /// Checkpoints kept for resending after a broken connection; past this the log is
    /// dropped and the next connection starts with a full checkpoint.
    pub max_log_bytes: u64,
    /// Live migration: how long each step of a switchover (the acknowledgement of the final
    /// checkpoint, then `SwitchedOver`) may take before it is called off.
    pub switchover_timeout_ms: u64,
    /// This run took up a generation an earlier run of this replica held (a `--resilient`
    /// primary's restarted monitor): a backup may hold that run's state, which counts for
    /// this generation, so releasing outputs without a backup swaps the generation first,
    /// even before this run's backup was declared protected.
    pub earlier_run_protected: bool,
}

impl PrimaryConfig {
    pub fn new(key: PresharedKey, config_digest: ConfigDigest, run_id: u64) -> Self {
        PrimaryConfig {
            key,
            config_digest,
            run_id,
            heartbeat_interval_ms: 10,
            peer_timeout_ms: 500,
            handshake_timeout_ms: 500,
            // Small enough that a frame damaged in transit costs little to resend (a resume
            // starts at a frame boundary), large enough that framing costs nothing.
            chunk_bytes: 64 << 10,
            on_backup_loss: BackupLossPolicy::Continue,
            backup_loss_grace_ms: 200,
            ownership_check_ms: 500,
            store_retry_ms: 100,
            end_timeout_ms: 1000,
            max_log_bytes: 1 << 30,
            switchover_timeout_ms: 1000,
            earlier_run_protected: false,
        }
    }
}

/// What happens to a primary.
#[derive(Debug)]
pub enum PrimaryEvent<'a> {
    /// Time has passed: feed one every few milliseconds (heartbeats, timeouts).
    Tick { now_ms: u64 },
    /// A new connection to the backup is up; `nonce` is fresh random bytes.
    Connected { nonce: Nonce },
    /// Bytes arrived on the connection, cut anywhere.
    Received(&'a [u8]),
    /// The connection ended (end of stream or an I/O error).
    Disconnected,
    /// The machine took the checkpoint of `epoch` (epochs go up by one), of the kind
    /// [`Primary::next_checkpoint_kind`] asked for (an empty payload for `Discard`). The
    /// outputs the guest produced in this epoch belong to `epoch`: hold them until a
    /// `ReleaseOutputs` covers it.
    CheckpointTaken { epoch: u64, icount: u64, kind: CheckpointKind, payload: Vec<u8> },
    /// The guest ended (powered off, or the VM was stopped) and the checkpoint of `epoch`,
    /// already reported, holds its final state.
    VmEnded { epoch: u64, exit_code: u32 },
    /// Stop replicating: the VM runs on alone. Answered by `Detached` once no backup can take
    /// over any more (or by `Stop`, should another replica own the VM); ignored once the VM
    /// is ending (its end settles it).
    Unprotect,
    /// Live migration: the machine is paused, and the checkpoint last taken holds its final
    /// state. Hand the VM to the backup (see the module's doc); ends with `Stop` of
    /// [`ProtocolError::HandedOver`] when the backup has it, or `Detached` when this replica
    /// keeps it. `paused_at_unix_us` (the pause, on this host's clock) goes to the backup for
    /// its downtime figure.
    Switchover { paused_at_unix_us: u64 },
    /// The answer to a `SwapGeneration` action (`Err`: the store could not be reached).
    Swap(Result<SwapAnswer, String>),
    /// The answer to a `ReadOwnership` action.
    Ownership(Result<Option<RecordView>, String>),
}

/// What a primary asks its caller to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrimaryAction {
    /// Write these bytes to the connection.
    Send(Vec<u8>),
    /// Output commit: every output of `up_to_epoch` and earlier epochs may now leave.
    ReleaseOutputs { up_to_epoch: u64 },
    /// Compare-and-swap the VM's ownership record from `expected` to `expected + 1`, owned by
    /// this replica (marked ended with `ended`'s exit code when given), and report `Swap`.
    SwapGeneration { expected: u64, ended: Option<u32> },
    /// Read the ownership record and report `Ownership`.
    ReadOwnership,
    /// Close the connection (the primary runs on and connects again).
    Close { error: ProtocolError },
    /// Stop the VM now, releasing nothing more: another replica may be live.
    Stop { error: ProtocolError },
    /// The protection changed (log it): `protected` false when outputs start leaving without
    /// the backup, true when a backup covers them again.
    ProtectionChanged { protected: bool, generation: u64 },
    /// The VM's end is settled: exit with `exit_code`. `released` says whether the final
    /// outputs were released (false only when the store refused or could not be reached).
    Finished { exit_code: u32, released: bool },
    /// Replication stopped (after `Unprotect`): no backup may take over at or after
    /// `generation`, which this replica owns; every output taken so far, and every output
    /// from now on, may leave at once. The primary does nothing more.
    Detached { generation: u64 },
}

/// A checkpoint kept for resending.
#[derive(Debug, Clone)]
struct Logged {
    epoch: u64,
    base_epoch: Option<u64>,
    icount: u64,
    payload: Arc<Vec<u8>>,
}

/// A checkpoint being framed onto the connection, a step at a time.
#[derive(Debug, Clone)]
struct Outgoing {
    logged: Logged,
    /// Where to start: 0, or a resume offset.
    start: usize,
    /// Payload bytes framed so far.
    offset: usize,
    /// Payload bytes hashed so far (the digest covers the whole payload).
    hashed: usize,
    hasher: Sha256,
    begun: bool,
}

#[derive(Debug, Clone)]
struct PrimaryLink {
    link: Link,
    nonce: Nonce,
    streaming: bool,
    outbox: VecDeque<Outgoing>,
    /// The last epoch sent whole on this connection (the backup holds it once applied).
    sent_up_to: Option<u64>,
    /// The highest epoch the backup may acknowledge on this connection.
    ackable: Option<u64>,
}

/// Why a swap of the ownership record was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SwapPurpose {
    /// To release outputs without the backup.
    Unprotect,
    /// To mark the VM ended.
    End,
    /// To stop replicating (`Unprotect`).
    Detach,
    /// To take the VM back after an unanswered switchover (from the generation read).
    Reclaim,
}

/// Live migration: how far the switchover got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Switchover {
    /// Waiting for the final checkpoint, `epoch`, to be framed (or acknowledged).
    AwaitingAck { epoch: u64, since_ms: u64 },
    /// `Switchover` sent behind the final checkpoint, `epoch`: waiting for `SwitchedOver`.
    Sent { epoch: u64, since_ms: u64 },
    /// No answer: reading the record (then swapping it) to take the VM back, unless the
    /// backup moved it past `base + 1`. `base` is the generation this replica held.
    Reclaiming { base: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Waiting for the acknowledgement of the final epoch.
    AwaitingAck {
        epoch: u64,
        exit_code: u32,
        since_ms: u64,
    },
    /// Marking the record ended; `released` whether the final outputs already left.
    Marking {
        epoch: u64,
        exit_code: u32,
        released: bool,
        since_ms: u64,
    },
    Done,
}

/// What `status` reports of a primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrimaryStatus {
    pub generation: u64,
    pub protection: Protection,
    pub streaming: bool,
    pub acked_epoch: Option<u64>,
    pub last_taken_epoch: Option<u64>,
    pub released_up_to: Option<u64>,
    pub unprotected_count: u64,
    pub log_bytes: u64,
    pub resumed_checkpoints: u64,
    /// Frames of the backup that arrived damaged and were asked for again (the connection
    /// kept), over this primary's lifetime.
    pub damaged_frames: u64,
    /// The backup's requests to resend frames that reached it damaged, served.
    pub resends_served: u64,
}

/// The primary's protocol state machine.
#[derive(Debug, Clone)]
pub struct Primary {
    config: PrimaryConfig,
    now_ms: u64,
    generation: u64,
    protection: Protection,
    link: Option<PrimaryLink>,
    log: VecDeque<Logged>,
    log_bytes: u64,
    /// The epoch the backup is known to hold (from its HelloAck or its acks), this run's.
    backup_holds: Option<u64>,
    last_taken: Option<u64>,
    acked: Option<u64>,
    released_up_to: Option<u64>,
    /// Since when no backup has been streaming (None while one is).
    backup_lost_since_ms: Option<u64>,
    swap_outstanding: Option<SwapPurpose>,
    next_store_attempt_ms: u64,
    /// A `ProtectionChanged { protected: false }` was said and not yet taken back.
    said_unprotected: bool,
    end_sent: bool,
    read_outstanding: bool,
    next_ownership_check_ms: u64,
    ending: Option<Ending>,
    /// `Unprotect` was asked for and is not done yet.
    detaching: bool,
    stopped: Option<ProtocolError>,
    switchover: Option<Switchover>,
    paused_at_unix_us: u64,
    unprotected_count: u64,
    resumed_checkpoints: u64,
    repairs: Repairs,
    /// A resumed run ([`Primary::resume`]): its first checkpoint is an incremental on this
    /// epoch, holding every page written since it.
    resume_base: Option<u64>,
}

/// Where a restarted primary takes its run up ([`Primary::resume`]): the run went up to
/// epoch `last_epoch` at most, and every page it wrote after epoch `since_epoch` (at or
/// before the backup's last acknowledgement) is known, so the first checkpoint of the
/// resumed run can bring any state of the run from `since_epoch` on up to date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumeRun {
    pub last_epoch: u64,
    pub since_epoch: u64,
}

impl Primary {
    /// A primary whose process restarted (a `--resilient` primary's new monitor) and takes
    /// its run up again (`config.run_id` is that run's): epochs go on from
    /// `resume.last_epoch`, and the first checkpoint, an incremental on `resume.since_epoch`
    /// that the caller fills with every page written since then, fits whatever state of
    /// the run the backup holds from that epoch on, so that no full checkpoint is needed.
    /// A backup that holds less gets a full checkpoint as usual.
    pub fn resume(config: PrimaryConfig, generation: u64, now_ms: u64, resume: ResumeRun) -> Self {
        assert!(resume.since_epoch <= resume.last_epoch, "the run's known writes start at or before its last epoch");
        let mut primary = Primary::new(config, generation, now_ms);
        primary.last_taken = Some(resume.last_epoch);
        primary.resume_base = Some(resume.since_epoch);
        primary
    }

    /// The epoch the first checkpoint of a resumed run is based on, until it is taken.
    pub fn resume_base(&self) -> Option<u64> {
        self.resume_base
    }

    /// A primary that owns the VM's record at `generation` (claim it before starting the VM).
    pub fn new(config: PrimaryConfig, generation: u64, now_ms: u64) -> Self {
        assert!(
            (1..=MAX_PAYLOAD_BYTES as usize - CHUNK_OVERHEAD_BYTES).contains(&config.chunk_bytes),
            "chunk_bytes must be 1..={}",
            MAX_PAYLOAD_BYTES as usize - CHUNK_OVERHEAD_BYTES
        );
        Primary {
            config,
            now_ms,
            generation,
            protection: Protection::CatchingUp { released_up_to: None },
            link: None,
            log: VecDeque::new(),
            log_bytes: 0,
            backup_holds: None,
            last_taken: None,
            acked: None,
            released_up_to: None,
            backup_lost_since_ms: Some(now_ms),
            swap_outstanding: None,
            next_store_attempt_ms: 0,
            said_unprotected: false,
            end_sent: false,
            read_outstanding: false,
            next_ownership_check_ms: now_ms,
            ending: None,
            detaching: false,
            stopped: None,
            switchover: None,
            paused_at_unix_us: 0,
            unprotected_count: 0,
            resumed_checkpoints: 0,
            repairs: Repairs::default(),
            resume_base: None,
        }
    }

    /// Feeds one event; returns the actions to carry out, in order.
    pub fn step(&mut self, event: PrimaryEvent<'_>) -> Vec<PrimaryAction> {
        let mut actions = Vec::new();
        if let Some(error) = &self.stopped {
            if let PrimaryEvent::Connected { .. } = event {
                actions.push(PrimaryAction::Close { error: ProtocolError::Stopped(Box::new(error.clone())) });
            }
            return actions;
        }
        match event {
            PrimaryEvent::Tick { now_ms } => self.on_tick(now_ms, &mut actions),
            PrimaryEvent::Connected { nonce } => self.on_connected(nonce, &mut actions),
            PrimaryEvent::Received(bytes) => self.on_received(bytes, &mut actions),
            PrimaryEvent::Disconnected => {
                if let Some(pl) = self.link.take() {
                    let error = match pl.link.decoder.finish() {
                        Err(truncated) => truncated.into(),
                        Ok(()) => ProtocolError::ConnectionLost,
                    };
                    actions.push(PrimaryAction::Close { error });
                    self.lost_backup();
                }
            }
            PrimaryEvent::CheckpointTaken { epoch, icount, kind, payload } => {
                self.on_checkpoint(epoch, icount, kind, payload, &mut actions)
            }
            PrimaryEvent::VmEnded { epoch, exit_code } => self.on_vm_ended(epoch, exit_code, &mut actions),
            PrimaryEvent::Swap(answer) => self.on_swap(answer, &mut actions),
            PrimaryEvent::Ownership(answer) => self.on_ownership(answer, &mut actions),
            PrimaryEvent::Switchover { paused_at_unix_us } => {
                if self.ending.is_none() && self.switchover.is_none() && !self.detaching {
                    let epoch = self.last_taken.unwrap_or(0);
                    self.paused_at_unix_us = paused_at_unix_us;
                    self.switchover = Some(Switchover::AwaitingAck { epoch, since_ms: self.now_ms });
                    self.advance_switchover(&mut actions);
                }
            }
            PrimaryEvent::Unprotect => {
                if self.ending.is_none() && self.switchover.is_none() {
                    self.detaching = true;
                    self.advance_detach(&mut actions);
                }
            }
        }
        if self.stopped.is_none() {
            self.pump_outbox(&mut actions);
            // The final checkpoint just framed: `Switchover` goes right behind it.
            if matches!(self.switchover, Some(Switchover::AwaitingAck { .. })) {
                self.advance_switchover(&mut actions);
            }
        }
        actions
    }

    /// The kind of checkpoint to take next: incremental while the checkpoints kept continue
    /// what the backup holds; full when that chain is broken and a backup is streaming;
    /// nothing kept when it is broken and no backup is there to take a full one.
    pub fn next_checkpoint_kind(&self) -> CheckpointKind {
        if self.chain_continues() {
            CheckpointKind::Incremental
        } else if self.is_streaming() {
            CheckpointKind::Full
        } else {
            CheckpointKind::Discard
        }
    }

    /// Whether an incremental checkpoint of the next epoch would continue the chain the
    /// backup holds or will be sent.
    fn chain_continues(&self) -> bool {
        let Some(last) = self.last_taken else { return false };
        if let Some(base) = self.resume_base {
            // The resumed run's first checkpoint (see `resume`): kept for a backup not heard
            // yet; useless to one that holds less than its base.
            return !self.is_streaming() || fits_after(Some(base), last + 1, self.backup_holds);
        }
        match self.log.back() {
            Some(logged) => logged.epoch == last,
            None => self.backup_holds == Some(last),
        }
    }

    /// The highest epoch the backup acknowledged.
    pub fn acked_epoch(&self) -> Option<u64> {
        self.acked
    }

    pub fn last_taken_epoch(&self) -> Option<u64> {
        self.last_taken
    }

    /// Whether a backup is connected and past the handshake.
    pub fn is_streaming(&self) -> bool {
        self.link.as_ref().is_some_and(|pl| pl.streaming)
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn protection(&self) -> Protection {
        self.protection
    }

    pub fn status(&self) -> PrimaryStatus {
        PrimaryStatus {
            generation: self.generation,
            protection: self.protection,
            streaming: self.is_streaming(),
            acked_epoch: self.acked,
            last_taken_epoch: self.last_taken,
            released_up_to: self.released_up_to,
            unprotected_count: self.unprotected_count,
            log_bytes: self.log_bytes,
            resumed_checkpoints: self.resumed_checkpoints,
            damaged_frames: self.repairs.damaged_frames,
            resends_served: self.repairs.resends_served,
        }
    }

    /// Why this primary stopped, once it has.
    pub fn stopped(&self) -> Option<&ProtocolError> {
        self.stopped.as_ref()
    }

    fn on_tick(&mut self, now_ms: u64, actions: &mut Vec<PrimaryAction>) {
        self.now_ms = self.now_ms.max(now_ms);
        let now = self.now_ms;
        if let Some(pl) = &mut self.link {
            pl.link.tick(now);
            if let Some(again) = pl.link.retry_resend(now) {
                actions.push(PrimaryAction::Send(again));
            }
            let link = &pl.link;
            if !pl.streaming && now - link.opened_ms >= self.config.handshake_timeout_ms {
                let waited_ms = now - link.opened_ms;
                self.close(ProtocolError::HandshakeTimeout { waited_ms }, actions);
            } else if pl.streaming && now - link.last_heard_ms >= self.config.peer_timeout_ms {
                let silent_ms = now - link.last_heard_ms;
                self.close(ProtocolError::PeerSilent { silent_ms }, actions);
            } else if pl.streaming && now - link.last_sent_ms >= self.config.heartbeat_interval_ms {
                let heartbeat = Message::Heartbeat { now_ms: now, epoch: self.last_taken.unwrap_or(0) };
                actions.push(PrimaryAction::Send(pl.link.frame(&heartbeat, now)));
            }
        }
        self.advance_ending(actions);
        self.advance_detach(actions);
        self.advance_switchover(actions);
        self.maybe_go_unprotected(actions);
        self.maybe_check_ownership(actions);
    }

    /// Whether a switchover (live migration) is under way.
    pub fn switching_over(&self) -> bool {
        self.switchover.is_some()
    }

    /// Live migration: send `Switchover` once the final checkpoint is acknowledged, call the
    /// switchover off when an answer does not come in time, and take the VM back after an
    /// unanswered `Switchover` (see the module's doc).
    fn advance_switchover(&mut self, actions: &mut Vec<PrimaryAction>) {
        let now = self.now_ms;
        let timeout = self.config.switchover_timeout_ms;
        match self.switchover {
            None => {}
            Some(Switchover::AwaitingAck { epoch, since_ms }) => {
                let streaming = self.is_streaming();
                // Every frame of the final checkpoint is out (or it was acknowledged): the
                // backup reads `Switchover` after them, and answers once it applied them.
                let framed = self.acked >= Some(epoch)
                    || self.link.as_ref().is_some_and(|pl| pl.sent_up_to >= Some(epoch) && pl.outbox.is_empty());
                if streaming && self.protection == Protection::Protected && framed {
                    let (generation, paused_at_unix_us) = (self.generation, self.paused_at_unix_us);
                    let message = Message::Switchover { epoch, generation, paused_at_unix_us };
                    let pl = self.link.as_mut().expect("streaming");
                    actions.push(PrimaryAction::Send(pl.link.frame(&message, now)));
                    self.switchover = Some(Switchover::Sent { epoch, since_ms: now });
                } else if !streaming || now - since_ms.min(now) >= timeout {
                    // Nothing was handed over: called off as an unprotect (the backup's state
                    // made stale first, so it can never take over; told to stand down).
                    self.switchover = None;
                    self.detaching = true;
                    self.advance_detach(actions);
                }
            }
            Some(Switchover::Sent { since_ms, .. }) if !self.is_streaming() || now - since_ms.min(now) >= timeout => {
                let reason = format!("no SwitchedOver from the destination within {timeout} ms");
                self.close(ProtocolError::SwitchoverCalledOff { reason }, actions);
                self.switchover = Some(Switchover::Reclaiming { base: self.generation });
                self.advance_switchover(actions);
            }
            Some(Switchover::Reclaiming { .. })
                if !self.read_outstanding && self.swap_outstanding.is_none() && now >= self.next_store_attempt_ms =>
            {
                self.read_outstanding = true;
                actions.push(PrimaryAction::ReadOwnership);
            }
            Some(Switchover::Sent { .. } | Switchover::Reclaiming { .. }) => {}
        }
    }

    /// Taking the VM back: what the record says decides (see [`Switchover::Reclaiming`]).
    fn on_reclaim_read(
        &mut self,
        base: u64,
        answer: Result<Option<RecordView>, String>,
        actions: &mut Vec<PrimaryAction>,
    ) {
        match answer {
            Ok(Some(RecordView { ended: Some(exit_code), .. })) => {
                self.stop(ProtocolError::VmEnded { exit_code }, actions)
            }
            Ok(Some(record)) if record.generation <= base + 1 => {
                self.swap_outstanding = Some(SwapPurpose::Reclaim);
                actions.push(PrimaryAction::SwapGeneration { expected: record.generation, ended: None });
            }
            Ok(Some(record)) => self.stop(ProtocolError::HandedOver { generation: record.generation }, actions),
            Ok(None) => {
                let error = ProtocolError::OwnershipLost { generation: None, owner: "nobody".into(), ours: base };
                self.stop(error, actions)
            }
            Err(_) => self.next_store_attempt_ms = self.now_ms + self.config.store_retry_ms,
        }
    }

    /// Unprotect: fence the backup off first if it may hold a state that counts for this
    /// generation (protected; a swap for going unprotected may be under way already), then
    /// detach. Caught up or unprotected, no backup was told its state counts for this
    /// generation: nothing to fence.
    fn advance_detach(&mut self, actions: &mut Vec<PrimaryAction>) {
        if !self.detaching || self.stopped.is_some() {
            return;
        }
        match self.protection {
            Protection::CatchingUp { released_up_to } if self.earlier_run_fenced_off(released_up_to) => {
                self.detach(actions)
            }
            Protection::Protected | Protection::CatchingUp { .. } => {
                if self.swap_outstanding.is_none() && self.now_ms >= self.next_store_attempt_ms {
                    self.swap_outstanding = Some(SwapPurpose::Detach);
                    actions.push(PrimaryAction::SwapGeneration { expected: self.generation, ended: None });
                }
            }
            Protection::Unprotected => self.detach(actions),
        }
    }

    /// No backup can take over now: release everything, tell the backup to stand down, and
    /// stop replicating.
    fn detach(&mut self, actions: &mut Vec<PrimaryAction>) {
        self.detaching = false;
        self.protection = Protection::Unprotected;
        if let Some(last) = self.last_taken {
            self.release(last, actions);
        }
        let now = self.now_ms;
        if let Some(pl) = self.link.as_mut().filter(|pl| pl.streaming) {
            actions.push(PrimaryAction::Send(pl.link.frame(&Message::StandDown, now)));
        }
        self.close(ProtocolError::Detached, actions);
        self.stopped = Some(ProtocolError::Detached);
        actions.push(PrimaryAction::Detached { generation: self.generation });
    }

    /// Continue: with the backup lost for the grace period, release what is held, swapping
    /// the generation first if a backup may hold a state that counts for the current one.
    fn maybe_go_unprotected(&mut self, actions: &mut Vec<PrimaryAction>) {
        let now = self.now_ms;
        let Some(lost_since) = self.backup_lost_since_ms else { return };
        if self.config.on_backup_loss == BackupLossPolicy::Hold
            || self.ending.is_some()
            || self.switchover.is_some()
            || now - lost_since.min(now) < self.config.backup_loss_grace_ms
        {
            return;
        }
        match self.protection {
            Protection::Unprotected => {}
            // No backup was told its state counts for this generation: nothing to fence.
            Protection::CatchingUp { released_up_to } if self.earlier_run_fenced_off(released_up_to) => {
                self.become_unprotected(actions)
            }
            Protection::Protected | Protection::CatchingUp { .. } => {
                if self.swap_outstanding.is_none() && now >= self.next_store_attempt_ms {
                    self.swap_outstanding = Some(SwapPurpose::Unprotect);
                    actions.push(PrimaryAction::SwapGeneration { expected: self.generation, ended: None });
                }
            }
        }
    }

    /// Whether a backup may still hold a state of an earlier run that counts for this
    /// generation: only before this run released anything early (which swapped it).
    fn earlier_run_fenced_off(&self, released_up_to: Option<u64>) -> bool {
        !self.config.earlier_run_protected || released_up_to.is_some()
    }

    fn become_unprotected(&mut self, actions: &mut Vec<PrimaryAction>) {
        self.protection = Protection::Unprotected;
        if !self.said_unprotected {
            self.said_unprotected = true;
            self.unprotected_count += 1;
            actions.push(PrimaryAction::ProtectionChanged { protected: false, generation: self.generation });
        }
        if let Some(last) = self.last_taken {
            self.release(last, actions);
        }
    }

    /// With no backup streaming, check now and then that nobody took the VM over: a primary
    /// that holds its outputs would otherwise never learn it was fenced.
    fn maybe_check_ownership(&mut self, actions: &mut Vec<PrimaryAction>) {
        if self.backup_lost_since_ms.is_none()
            || self.switchover.is_some()
            || self.read_outstanding
            || self.swap_outstanding.is_some()
            || self.now_ms < self.next_ownership_check_ms
            || matches!(self.ending, Some(Ending::Done))
        {
            return;
        }
        self.read_outstanding = true;
        self.next_ownership_check_ms = self.now_ms + self.config.ownership_check_ms;
        actions.push(PrimaryAction::ReadOwnership);
    }

    fn on_ownership(&mut self, answer: Result<Option<RecordView>, String>, actions: &mut Vec<PrimaryAction>) {
        self.read_outstanding = false;
        if let Some(Switchover::Reclaiming { base }) = self.switchover {
            return self.on_reclaim_read(base, answer, actions);
        }
        // While a swap or the end is under way the record legitimately moves.
        if self.swap_outstanding.is_some() || self.ending.is_some() {
            return;
        }
        match answer {
            Ok(Some(record)) if record.generation == self.generation && record.ended.is_none() => {}
            Ok(record) => {
                let (generation, owner) = record.map_or((None, "nobody".into()), |r| (Some(r.generation), r.owner));
                self.stop(ProtocolError::OwnershipLost { generation, owner, ours: self.generation }, actions);
            }
            Err(_) => {} // the store is unreachable: nothing is released unprotected meanwhile
        }
    }

    fn on_swap(&mut self, answer: Result<SwapAnswer, String>, actions: &mut Vec<PrimaryAction>) {
        let Some(purpose) = self.swap_outstanding.take() else { return };
        if purpose == SwapPurpose::Reclaim {
            return self.on_reclaim_swap(answer, actions);
        }
        match answer {
            Ok(SwapAnswer::Swapped { generation }) => {
                assert_eq!(generation, self.generation + 1, "a swap raises the generation by one");
                self.generation = generation;
                match (purpose, self.ending) {
                    (SwapPurpose::End, Some(Ending::Marking { epoch, exit_code, .. })) => {
                        self.release(epoch, actions);
                        self.finish(exit_code, true, actions);
                    }
                    (SwapPurpose::Detach, None) if self.detaching => self.detach(actions),
                    _ => {
                        self.become_unprotected(actions);
                        self.advance_ending(actions);
                        self.advance_detach(actions);
                    }
                }
            }
            Ok(SwapAnswer::Conflict { generation, owner, ended }) => {
                let ours = self.generation;
                if let Some(Ending::Marking { exit_code, released, .. }) = self.ending {
                    // Someone else owns the VM now: what was not released stays unreleased.
                    self.finish(exit_code, released, actions);
                }
                let error = match ended {
                    Some(exit_code) => ProtocolError::VmEnded { exit_code },
                    None => ProtocolError::OwnershipLost { generation, owner, ours },
                };
                self.stop(error, actions);
            }
            Err(_) => {
                self.next_store_attempt_ms = self.now_ms + self.config.store_retry_ms;
                if let Some(Ending::Marking { exit_code, released, since_ms, .. }) = self.ending {
                    if self.now_ms - since_ms.min(self.now_ms) >= 3 * self.config.end_timeout_ms {
                        self.finish(exit_code, released, actions);
                    }
                }
            }
        }
    }

    /// Taking the VM back: swapped, it is ours again (run on alone, as after an unprotect);
    /// the record moved meanwhile: read it again.
    fn on_reclaim_swap(&mut self, answer: Result<SwapAnswer, String>, actions: &mut Vec<PrimaryAction>) {
        match answer {
            Ok(SwapAnswer::Swapped { generation }) => {
                self.generation = generation;
                self.switchover = None;
                self.detach(actions);
            }
            Ok(SwapAnswer::Conflict { ended: Some(exit_code), .. }) => {
                self.stop(ProtocolError::VmEnded { exit_code }, actions)
            }
            Ok(SwapAnswer::Conflict { .. }) => self.advance_switchover(actions),
            Err(_) => self.next_store_attempt_ms = self.now_ms + self.config.store_retry_ms,
        }
    }

    fn on_connected(&mut self, nonce: Nonce, actions: &mut Vec<PrimaryAction>) {
        let key = &self.config.key;
        let mut link = Link::new(
            Encoder::new(key.hello_key(Direction::PrimaryToBackup)),
            Decoder::new(key.hello_key(Direction::BackupToPrimary)),
            self.now_ms,
        );
        let hello = Message::Hello {
            protocol_version: PROTOCOL_VERSION,
            role: Role::Primary,
            config_digest: self.config.config_digest,
            nonce,
            run_id: self.config.run_id,
            generation: self.generation,
        };
        actions.push(PrimaryAction::Send(link.frame(&hello, self.now_ms)));
        self.link = Some(PrimaryLink {
            link,
            nonce,
            streaming: false,
            outbox: VecDeque::new(),
            sent_up_to: None,
            ackable: None,
        });
    }

    fn on_received(&mut self, bytes: &[u8], actions: &mut Vec<PrimaryAction>) {
        let Some(pl) = &mut self.link else { return };
        pl.link.decoder.push(bytes);
        let mut sends = Vec::new();
        loop {
            let Some(pl) = &mut self.link else { return };
            let next = pl.link.next_message(self.now_ms, &mut sends, &mut self.repairs);
            actions.extend(sends.drain(..).map(PrimaryAction::Send));
            let result = match next {
                Ok(None) => return,
                Ok(Some(message)) => self.on_message(message, actions),
                Err(error) => Err(error),
            };
            if let Err(error) = result {
                return self.close(error, actions);
            }
        }
    }

    fn on_message(&mut self, message: Message, actions: &mut Vec<PrimaryAction>) -> Result<(), ProtocolError> {
        let pl = self.link.as_mut().expect("a message arrives on a link");
        match message {
            Message::Goodbye { reason } => Err(ProtocolError::PeerClosed { reason }),
            Message::HelloAck { protocol_version, role, config_digest, nonce, primary_nonce, latest, partial }
                if !pl.streaming =>
            {
                if protocol_version != PROTOCOL_VERSION {
                    return Err(ProtocolError::ProtocolVersionMismatch {
                        ours: PROTOCOL_VERSION,
                        theirs: protocol_version,
                    });
                }
                if role != Role::Backup {
                    return Err(ProtocolError::RoleMismatch { expected: "backup", theirs: "primary" });
                }
                if config_digest != self.config.config_digest {
                    return Err(ProtocolError::ConfigMismatch {
                        ours: self.config.config_digest,
                        theirs: config_digest,
                    });
                }
                if primary_nonce != pl.nonce {
                    return Err(ProtocolError::HandshakeReplay);
                }
                let key = &self.config.key;
                pl.link.secure(
                    key.session_key(Direction::PrimaryToBackup, &pl.nonce, &nonce),
                    key.session_key(Direction::BackupToPrimary, &pl.nonce, &nonce),
                );
                pl.streaming = true;
                self.backup_lost_since_ms = None;
                self.on_handshake(latest, partial, actions);
                Ok(())
            }
            message if !pl.streaming => Err(ProtocolError::UnexpectedMessage {
                message: message.name(),
                context: "before the handshake completed",
            }),
            Message::Heartbeat { .. } => Ok(()),
            Message::Ack { epoch } => {
                if Some(epoch) > pl.ackable {
                    return Err(ProtocolError::AckOfUnsentEpoch { epoch, sent: pl.ackable });
                }
                self.on_ack(epoch, actions);
                Ok(())
            }
            Message::NeedFull { .. } => {
                // The backup holds no base for what was sent: nothing it holds continues.
                self.backup_holds = None;
                self.clear_log();
                Ok(())
            }
            Message::SwitchedOver { generation }
                if matches!(self.switchover, Some(Switchover::Sent { .. })) && generation == self.generation + 1 =>
            {
                let Some(Switchover::Sent { epoch, .. }) = self.switchover else { unreachable!("matched above") };
                // The promise the backup waits for: this replica never runs the VM again.
                let now = self.now_ms;
                actions.push(PrimaryAction::Send(pl.link.frame(&Message::HandedOver, now)));
                // The backup holds the final state (it answers only once it applied it): the
                // outputs of that epoch may leave, as on its Ack.
                self.release(epoch, actions);
                self.switchover = None;
                self.stop(ProtocolError::HandedOver { generation }, actions);
                Ok(())
            }
            message => Err(ProtocolError::UnexpectedMessage { message: message.name(), context: "to a primary" }),
        }
    }

    /// The backup answered: first a heartbeat under the session keys (which proves to the
    /// backup that this connection is fresh), then whatever it lacks of the kept checkpoints.
    fn on_handshake(
        &mut self,
        latest: Option<CheckpointId>,
        partial: Option<(CheckpointId, u64)>,
        actions: &mut Vec<PrimaryAction>,
    ) {
        let run_id = self.config.run_id;
        let now = self.now_ms;
        let heartbeat = Message::Heartbeat { now_ms: now, epoch: self.last_taken.unwrap_or(0) };
        let pl = self.link.as_mut().expect("handshake on a link");
        actions.push(PrimaryAction::Send(pl.link.frame(&heartbeat, now)));
        let ours = latest.filter(|id| id.run_id == run_id && Some(id.epoch) <= self.last_taken).map(|id| id.epoch);
        self.backup_holds = ours;
        pl.ackable = ours;
        pl.sent_up_to = ours;
        // Drop what the backup already holds; what is left must continue its state, or
        // start with a full checkpoint.
        while self.log.front().is_some_and(|l| Some(l.epoch) <= ours) {
            self.pop_log();
        }
        let continues = match self.log.front() {
            None => true,
            Some(first) => first.base_epoch.is_none() || fits_after(first.base_epoch, first.epoch, ours),
        };
        if !continues {
            // Keep from the newest full checkpoint on, if there is one.
            match self.log.iter().rposition(|l| l.base_epoch.is_none()) {
                Some(full) => (0..full).for_each(|_| self.pop_log()),
                None => self.clear_log(),
            }
        }
        let resume = partial
            .filter(|(id, _)| id.run_id == run_id)
            .and_then(|(id, offset)| self.log.front().filter(|l| l.epoch == id.epoch).map(|_| offset));
        let entries: Vec<Logged> = self.log.iter().cloned().collect();
        for (index, logged) in entries.iter().enumerate() {
            let from = if index == 0 { resume } else { None };
            if from.is_some() {
                self.resumed_checkpoints += 1;
            }
            self.send_checkpoint(logged, from, actions);
        }
        if self.protection == Protection::Protected {
            // The backup holds a state this generation already counts (or will once the log
            // is applied): say so again, in case it never heard.
            let from_epoch = self.released_up_to.unwrap_or(0);
            let generation = self.generation;
            let pl = self.link.as_mut().expect("handshake on a link");
            actions.push(PrimaryAction::Send(pl.link.frame(&Message::Protected { generation, from_epoch }, now)));
        }
    }

    fn on_ack(&mut self, epoch: u64, actions: &mut Vec<PrimaryAction>) {
        if Some(epoch) <= self.acked && Some(epoch) <= self.backup_holds {
            return;
        }
        self.acked = self.acked.max(Some(epoch));
        self.backup_holds = self.backup_holds.max(Some(epoch));
        while self.log.front().is_some_and(|l| l.epoch <= epoch) {
            self.pop_log();
        }
        match self.protection {
            Protection::Protected => self.release(epoch, actions),
            Protection::Unprotected => {
                if self.last_taken.unwrap_or(0) - epoch.min(self.last_taken.unwrap_or(0)) <= CATCH_UP_LAG_EPOCHS {
                    self.protection = Protection::CatchingUp { released_up_to: self.released_up_to };
                }
                self.maybe_protected(epoch, actions);
            }
            Protection::CatchingUp { .. } => self.maybe_protected(epoch, actions),
        }
        if let Some(Ending::AwaitingAck { epoch: last, exit_code, .. }) = self.ending {
            if epoch >= last && self.protection == Protection::Protected {
                self.send_end(exit_code, actions);
                self.mark_ended(last, exit_code, true, actions);
            }
        }
        self.advance_switchover(actions);
    }

    /// Catching up: once the backup holds the last epoch released early, its state covers
    /// every output that left, under the current generation.
    fn maybe_protected(&mut self, acked: u64, actions: &mut Vec<PrimaryAction>) {
        let Protection::CatchingUp { released_up_to } = self.protection else { return };
        if released_up_to.is_some_and(|r| acked < r) {
            return;
        }
        self.protection = Protection::Protected;
        let generation = self.generation;
        let from_epoch = released_up_to.unwrap_or(0);
        let now = self.now_ms;
        if let Some(pl) = self.link.as_mut() {
            actions.push(PrimaryAction::Send(pl.link.frame(&Message::Protected { generation, from_epoch }, now)));
        }
        if self.said_unprotected {
            self.said_unprotected = false;
            actions.push(PrimaryAction::ProtectionChanged { protected: true, generation });
        }
        self.release(acked, actions);
    }

    fn on_checkpoint(
        &mut self,
        epoch: u64,
        icount: u64,
        kind: CheckpointKind,
        payload: Vec<u8>,
        actions: &mut Vec<PrimaryAction>,
    ) {
        if let Some(last) = self.last_taken {
            assert_eq!(epoch, last + 1, "checkpoint epochs must go up by one");
        }
        let continues = self.chain_continues();
        self.last_taken = Some(epoch);
        let base_epoch = match kind {
            CheckpointKind::Full => None,
            // An incremental checkpoint that does not continue the backup's chain is useless
            // to it: dropped; next_checkpoint_kind now says Full (or Discard).
            CheckpointKind::Incremental if continues => Some(self.resume_base.unwrap_or(epoch - 1)),
            CheckpointKind::Incremental | CheckpointKind::Discard => {
                self.resume_base = None;
                self.clear_log();
                return self.after_checkpoint(epoch, actions);
            }
        };
        self.resume_base = None;
        if base_epoch.is_none() {
            self.clear_log(); // a full checkpoint replaces everything before it
        }
        let logged = Logged { epoch, base_epoch, icount, payload: Arc::new(payload) };
        self.log_bytes += logged.payload.len() as u64;
        self.log.push_back(logged.clone());
        let lone_full = self.log.len() == 1 && base_epoch.is_none();
        if self.log_bytes > self.config.max_log_bytes && !lone_full {
            // Too much to keep: the next connection starts again from a full checkpoint.
            self.clear_log();
        } else if self
            .link
            .as_ref()
            .is_some_and(|pl| pl.streaming && (base_epoch.is_none() || fits_after(base_epoch, epoch, pl.sent_up_to)))
        {
            self.send_checkpoint(&logged, None, actions);
        }
        self.after_checkpoint(epoch, actions);
    }

    fn after_checkpoint(&mut self, epoch: u64, actions: &mut Vec<PrimaryAction>) {
        if self.protection == Protection::Unprotected {
            self.release(epoch, actions);
        }
    }

    /// Send a kept checkpoint whole, or from `resume_at` when the backup holds its start:
    /// queued here, framed by [`Primary::pump_outbox`] a few megabytes per step.
    fn send_checkpoint(&mut self, logged: &Logged, resume_at: Option<u64>, _actions: &mut Vec<PrimaryAction>) {
        let Some(pl) = self.link.as_mut().filter(|pl| pl.streaming) else { return };
        let start = resume_at.filter(|o| *o <= logged.payload.len() as u64).map_or(0, |o| o as usize);
        pl.outbox.push_back(Outgoing {
            logged: logged.clone(),
            start,
            offset: start,
            hashed: 0,
            hasher: Sha256::new(),
            begun: false,
        });
        pl.sent_up_to = Some(logged.epoch);
        pl.ackable = Some(logged.epoch);
    }

    /// Frame queued checkpoints, up to a bounded number of bytes for this step.
    fn pump_outbox(&mut self, actions: &mut Vec<PrimaryAction>) {
        let now = self.now_ms;
        let chunk_bytes = self.config.chunk_bytes;
        let Some(pl) = self.link.as_mut().filter(|pl| pl.streaming) else { return };
        let mut budget = MAX_FRAMED_BYTES_PER_STEP;
        while budget > 0 {
            let Some(out) = pl.outbox.front_mut() else { return };
            let epoch = out.logged.epoch;
            let payload = out.logged.payload.clone();
            if !out.begun {
                out.begun = true;
                let message = if out.start > 0 {
                    Message::CheckpointResume { epoch, offset: out.start as u64 }
                } else {
                    let total_bytes = payload.len() as u64;
                    let (base_epoch, icount) = (out.logged.base_epoch, out.logged.icount);
                    Message::CheckpointBegin { epoch, base_epoch, icount, total_bytes }
                };
                actions.push(PrimaryAction::Send(pl.link.frame(&message, now)));
            }
            // The part the backup already holds still counts in the digest.
            if out.hashed < out.start {
                let end = (out.hashed + budget).min(out.start);
                out.hasher.update(&payload[out.hashed..end]);
                budget -= end - out.hashed;
                out.hashed = end;
                continue;
            }
            if out.offset < payload.len() {
                let end = (out.offset + chunk_bytes.min(budget)).min(payload.len());
                let bytes = payload[out.offset..end].to_vec();
                out.hasher.update(&bytes);
                let message = Message::CheckpointChunk { epoch, offset: out.offset as u64, bytes };
                budget = budget.saturating_sub(end - out.offset);
                out.offset = end;
                out.hashed = end;
                actions.push(PrimaryAction::Send(pl.link.frame(&message, now)));
                continue;
            }
            let out = pl.outbox.pop_front().expect("checked above");
            let digest = out.hasher.finalize().into();
            actions.push(PrimaryAction::Send(pl.link.frame(&Message::CheckpointEnd { epoch, digest }, now)));
        }
    }

    fn on_vm_ended(&mut self, epoch: u64, exit_code: u32, actions: &mut Vec<PrimaryAction>) {
        assert_eq!(Some(epoch), self.last_taken, "the VM ends at the last checkpoint taken");
        if self.ending.is_some() {
            return;
        }
        self.detaching = false; // the end settles everything
        match self.protection {
            // Released at the checkpoint already; only the record is left to mark.
            Protection::Unprotected => self.mark_ended(epoch, exit_code, true, actions),
            _ if self.acked >= Some(epoch) && self.protection == Protection::Protected => {
                self.send_end(exit_code, actions);
                self.mark_ended(epoch, exit_code, true, actions);
            }
            _ => {
                self.ending = Some(Ending::AwaitingAck { epoch, exit_code, since_ms: self.now_ms });
                self.advance_ending(actions);
            }
        }
    }

    /// The end waits for the final acknowledgement only so long, and not at all without a
    /// backup that could give it.
    fn advance_ending(&mut self, actions: &mut Vec<PrimaryAction>) {
        match self.ending {
            Some(Ending::AwaitingAck { epoch, exit_code, since_ms }) => {
                let waited = self.now_ms - since_ms.min(self.now_ms);
                let hopeless = self.config.on_backup_loss == BackupLossPolicy::Continue && !self.is_streaming();
                if waited >= self.config.end_timeout_ms || hopeless {
                    self.mark_ended(epoch, exit_code, false, actions);
                }
            }
            Some(Ending::Marking { exit_code, .. })
                if self.swap_outstanding.is_none() && self.now_ms >= self.next_store_attempt_ms =>
            {
                self.swap_outstanding = Some(SwapPurpose::End);
                actions.push(PrimaryAction::SwapGeneration { expected: self.generation, ended: Some(exit_code) });
            }
            _ => {}
        }
    }

    fn mark_ended(&mut self, epoch: u64, exit_code: u32, released: bool, actions: &mut Vec<PrimaryAction>) {
        if released {
            self.release(epoch, actions);
        }
        self.ending = Some(Ending::Marking { epoch, exit_code, released, since_ms: self.now_ms });
        self.advance_ending(actions);
    }

    /// Tell the backup the VM ended (once): it exits with the same code and never takes over.
    fn send_end(&mut self, exit_code: u32, actions: &mut Vec<PrimaryAction>) {
        let now = self.now_ms;
        if let Some(pl) = self.link.as_mut().filter(|pl| pl.streaming && !self.end_sent) {
            self.end_sent = true;
            actions.push(PrimaryAction::Send(pl.link.frame(&Message::End { exit_code }, now)));
        }
    }

    fn finish(&mut self, exit_code: u32, released: bool, actions: &mut Vec<PrimaryAction>) {
        if released {
            self.send_end(exit_code, actions);
        }
        self.ending = Some(Ending::Done);
        actions.push(PrimaryAction::Finished { exit_code, released });
        self.close(ProtocolError::VmEnded { exit_code }, actions);
    }

    fn release(&mut self, up_to_epoch: u64, actions: &mut Vec<PrimaryAction>) {
        if Some(up_to_epoch) > self.released_up_to {
            self.released_up_to = Some(up_to_epoch);
            actions.push(PrimaryAction::ReleaseOutputs { up_to_epoch });
        }
    }

    fn lost_backup(&mut self) {
        self.backup_lost_since_ms.get_or_insert(self.now_ms);
        self.next_ownership_check_ms = self.now_ms + self.config.ownership_check_ms;
    }

    fn pop_log(&mut self) {
        if let Some(logged) = self.log.pop_front() {
            self.log_bytes -= logged.payload.len() as u64;
        }
    }

    fn clear_log(&mut self) {
        self.log.clear();
        self.log_bytes = 0;
    }

    fn close(&mut self, error: ProtocolError, actions: &mut Vec<PrimaryAction>) {
        if let Some(mut pl) = self.link.take() {
            if worth_a_goodbye(&error) {
                actions.push(PrimaryAction::Send(pl.link.frame(&goodbye(&error), self.now_ms)));
            }
            actions.push(PrimaryAction::Close { error });
            self.lost_backup();
        }
    }

    fn stop(&mut self, error: ProtocolError, actions: &mut Vec<PrimaryAction>) {
        self.close(error.clone(), actions);
        actions.push(PrimaryAction::Stop { error: error.clone() });
        self.stopped = Some(error);
    }
}

/// Whether a checkpoint of `epoch` on `base` fits a backup that holds (or will hold) `holds`
/// of this run: the epoch before it exactly, or, a resumed run's first checkpoint (on an
/// older epoch, holding every page written since), any epoch from its base on.
fn fits_after(base: Option<u64>, epoch: u64, holds: Option<u64>) -> bool {
    match (base, holds) {
        (Some(base), Some(holds)) if base + 1 == epoch => holds == base,
        (Some(base), Some(holds)) => base <= holds && holds < epoch,
        _ => false,
    }
}
