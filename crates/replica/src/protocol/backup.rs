//! The backup's side: answer handshakes (a few at a time, each with a deadline, so that
//! strangers cannot disturb the primary's connection), reassemble checkpoints and hand each
//! one to the machine only once it is whole and its digest matches, keep a checkpoint cut
//! off by a broken connection so that the primary can resume it, acknowledge what the
//! machine has applied, and take over — by swapping the ownership generation its state
//! belongs to — when the primary falls silent.
//!
//! Connections: every connection the caller accepts gets a [`ConnId`]. Until it has proved
//! it knows the key *and* is fresh (a valid Hello, then a first frame under the session keys
//! derived from both sides' nonces), it is *pending*: it cannot touch the checkpoint being
//! received, does not count as a sign of life, and is dropped at its handshake deadline or
//! when too many others wait (the oldest goes first). Only then does it replace the
//! connection the backup had.
//!
//! Live migration: a `Switchover` from the primary (paused, sent right behind its final
//! checkpoint) makes the backup swap the record from the generation its state counts for —
//! while the machine still applies that checkpoint — and answer `SwitchedOver` once both are
//! done (the answer says it holds the final state, so the primary releases that epoch's
//! outputs on it); it goes live (`GoLive`) only on the primary's `HandedOver`,
//! its promise never to run the VM again. Without that promise in time (or with the link
//! gone) it swaps the record once more before running, so that a primary which took the VM
//! back meanwhile wins or loses by the record alone (the backup then stands down). See
//! [`Backup::handover`].

use std::collections::VecDeque;

use sha2::{Digest, Sha256};

use super::{goodbye, worth_a_goodbye, Link, ProtocolError, RecordView, Repairs, SwapAnswer};
use crate::messages::{CheckpointId, ConfigDigest, Message, Role, PROTOCOL_VERSION};
use crate::wire::{Decoder, Direction, Encoder, Nonce, PresharedKey};

/// Never reserve more than this for a checkpoint before its bytes arrive.
const MAX_RESERVE_BYTES: u64 = 64 << 20;

/// The caller's name for one accepted connection (unique for the backup's lifetime).
pub type ConnId = u64;

/// The backup's settings. [`BackupConfig::new`] fills in sensible values.
#[derive(Debug, Clone)]
pub struct BackupConfig {
    pub key: PresharedKey,
    pub config_digest: ConfigDigest,
    pub heartbeat_interval_ms: u64,
    /// A connection that has not authenticated within this long is dropped.
    pub handshake_timeout_ms: u64,
    /// Connections waiting for their handshake at once; a newer one pushes out the oldest.
    pub max_pending_handshakes: usize,
    /// Silence from the primary for this long makes the backup try to take over.
    pub failover_timeout_ms: u64,
    /// After the store could not be reached, try again this much later.
    pub store_retry_ms: u64,
    /// How often a backup that cannot take over reads the record while the primary is silent.
    pub ownership_check_ms: u64,
    /// The largest checkpoint accepted: set it above RAM + disk + device state.
    pub max_checkpoint_bytes: u64,
    /// Whole checkpoints waiting for the machine to apply them; more closes the connection.
    pub max_queued_checkpoints: usize,
    /// Live migration: how long to wait for `HandedOver` after answering `SwitchedOver`.
    pub handover_timeout_ms: u64,
}

impl BackupConfig {
    pub fn new(key: PresharedKey, config_digest: ConfigDigest, max_checkpoint_bytes: u64) -> Self {
        BackupConfig {
            key,
            config_digest,
            heartbeat_interval_ms: 10,
            handshake_timeout_ms: 500,
            max_pending_handshakes: 16,
            failover_timeout_ms: 60,
            store_retry_ms: 100,
            ownership_check_ms: 1000,
            max_checkpoint_bytes,
            max_queued_checkpoints: 64,
            handover_timeout_ms: 1000,
        }
    }
}

/// What happens to a backup.
#[derive(Debug)]
pub enum BackupEvent<'a> {
    /// Time has passed: feed one every few milliseconds.
    Tick { now_ms: u64 },
    /// A connection was accepted; `nonce` is fresh random bytes.
    Connected { conn: ConnId, nonce: Nonce },
    /// Bytes arrived on a connection, cut anywhere.
    Received { conn: ConnId, bytes: &'a [u8] },
    /// A connection ended (end of stream or an I/O error).
    Disconnected { conn: ConnId },
    /// The machine applied the checkpoint of the last `ApplyCheckpoint` action.
    CheckpointApplied { epoch: u64 },
    /// The machine could not apply it; its state is no longer a whole checkpoint.
    ApplyFailed { epoch: u64, reason: String },
    /// The machine's state is no longer what the primary's checkpoints made it (a lockstep backup found a divergence after it acknowledged the epoch), so it
    /// holds nothing whole, as after `ApplyFailed`: the connection closes and the primary
    /// sends a full checkpoint (lockstep: a state) on the next.
    StateLost { reason: String },
    /// The answer to a `ClaimOwnership` action (`Err`: the store could not be reached).
    Claim(Result<SwapAnswer, String>),
    /// The answer to a `ReadOwnership` action.
    Ownership(Result<Option<RecordView>, String>),
}

/// What a backup asks its caller to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupAction {
    /// Write these bytes to connection `conn`.
    Send { conn: ConnId, bytes: Vec<u8> },
    /// Apply this whole, verified checkpoint to the stopped machine (on top of `base_epoch`,
    /// or replacing everything when it is None), then report `CheckpointApplied` or
    /// `ApplyFailed`. No other ApplyCheckpoint comes before that report.
    /// `run_id` names the primary run that took it (for logs; the machine needs only the rest).
    ApplyCheckpoint { run_id: u64, epoch: u64, base_epoch: Option<u64>, icount: u64, payload: Vec<u8> },
    /// Close connection `conn`, for this reason (log it for the primary's connection).
    Close { conn: ConnId, error: ProtocolError },
    /// The primary has been silent for the failover timeout: compare-and-swap the VM's
    /// ownership record from `generation` to `generation + 1`, owned by this replica, and
    /// report `Claim`.
    ClaimOwnership { generation: u64 },
    /// The primary is silent but this backup cannot take over (log it once): its state
    /// belongs to an older generation than the one the primary released outputs under.
    CannotTakeOver { reason: String },
    /// This replica owns the VM at `generation`: resume the machine, which holds the
    /// checkpoint of `epoch`, and run it as the new primary. Outputs the old primary held
    /// for later epochs are lost with it; the guest produces them again.
    GoLive { epoch: u64, icount: u64, generation: u64 },
    /// The VM ended on the primary with `exit_code`: exit with it, never take over.
    Exit { exit_code: u32 },
    /// Read the ownership record and report `Ownership` (a backup that cannot take over
    /// looks now and then whether the VM ended).
    ReadOwnership,
    /// The primary stopped replicating to this backup (and made its state stale first): exit,
    /// never take over.
    StandDown,
}

#[derive(Debug, Clone)]
enum Incoming {
    Receiving {
        id: CheckpointId,
        base_epoch: Option<u64>,
        icount: u64,
        total_bytes: u64,
        bytes: Vec<u8>,
        hasher: Sha256,
    },
    /// An incremental checkpoint that does not fit this backup's state: skipped.
    Discarding { epoch: u64 },
}

#[derive(Debug, Clone)]
struct BackupLink {
    conn: ConnId,
    link: Link,
    nonce: Nonce,
    /// The primary's run and generation, once its Hello checked out.
    hello: Option<(u64, u64)>,
}

#[derive(Debug, Clone)]
struct WholeCheckpoint {
    id: CheckpointId,
    base_epoch: Option<u64>,
    icount: u64,
    payload: Vec<u8>,
}

/// Live migration, on the destination: how far the switchover got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Switchover {
    /// Swapping the record from the generation the state counts for; `epoch` is the final
    /// checkpoint's (whole here, perhaps still being applied).
    Claiming { generation: u64, epoch: u64 },
    /// The record is ours at `generation`; the final checkpoint, `epoch`, is still being applied.
    Claimed { generation: u64, epoch: u64 },
    /// The record is ours at `generation`; `SwitchedOver` sent, waiting for `HandedOver`.
    Confirmed { generation: u64, since_ms: u64 },
    /// No `HandedOver`: swapping again, from `generation`, before running.
    Fencing { generation: u64 },
}

/// How a switchover ended, once this backup went live by one (for status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handover {
    /// When the primary paused the guest, on its clock.
    pub paused_at_unix_us: u64,
    /// The primary confirmed with `HandedOver` (false: this backup swapped again without it).
    pub confirmed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Applied {
    id: CheckpointId,
    icount: u64,
}

/// What the primary said this backup's state counts for: generation `generation` once it
/// holds epoch `from_epoch` of run `run_id`, or later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimRight {
    pub run_id: u64,
    pub generation: u64,
    pub from_epoch: u64,
}

/// What a backup keeps across a restart of its process (a `--resilient` backup keeps it in
/// its keeper's region, committed with the machine state of `applied` before that epoch is
/// acknowledged): the checkpoint its machine holds, what the primary said it counts for,
/// and the newest generation heard of. [`Backup::resume`] starts from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupKept {
    pub applied: CheckpointId,
    pub icount: u64,
    pub right: Option<ClaimRight>,
    pub newest_generation: u64,
}

/// What `status` reports of a backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupStatus {
    pub primary_connected: bool,
    pub applied_epoch: Option<u64>,
    /// The generation the applied state counts for (it may take over by swapping it).
    pub state_generation: Option<u64>,
    /// The newest generation heard of (from a primary's Hello or the store).
    pub newest_generation: u64,
    /// The state is older than outputs that left: this backup cannot take over.
    pub stale: bool,
    pub pending_handshakes: usize,
    pub refused_connections: u64,
    pub partial_bytes: u64,
    pub live_generation: Option<u64>,
    /// When the primary was last heard (an authenticated frame, or a checkpoint of its
    /// applied), on the clock of the `now_ms` the core is given; None: never.
    pub last_heard_ms: Option<u64>,
    /// Frames that arrived damaged and were asked for again (the connection kept), over this
    /// backup's lifetime.
    pub damaged_frames: u64,
    /// The primary's requests to resend frames that reached it damaged, served.
    pub resends_served: u64,
    /// What the primary said the state counts for (kept across a restart: [`BackupKept`]).
    pub right: Option<ClaimRight>,
}

/// The backup's protocol state machine.
#[derive(Debug, Clone)]
pub struct Backup {
    config: BackupConfig,
    now_ms: u64,
    /// The authenticated primary's connection.
    link: Option<BackupLink>,
    /// Connections still in their handshake, oldest first.
    pending: VecDeque<BackupLink>,
    /// The checkpoint being received; kept across a broken connection for resuming.
    incoming: Option<Incoming>,
    /// `incoming` came over an earlier connection: the new one resumes it or starts afresh.
    incoming_from_old_link: bool,
    /// What the machine holds once every queued and pending checkpoint is applied.
    latest: Option<CheckpointId>,
    /// What the machine is known to hold.
    applied: Option<Applied>,
    /// Handed to the machine, not yet reported.
    applying: Option<Applied>,
    ready: VecDeque<WholeCheckpoint>,
    right: Option<ClaimRight>,
    newest_generation: u64,
    last_heard_ms: Option<u64>,
    claim_outstanding: bool,
    next_claim_attempt_ms: u64,
    read_outstanding: bool,
    next_read_ms: u64,
    /// The record as this backup first read it, before any primary was heard: an end
    /// recorded then belongs to an earlier run of the VM, which a new primary may start
    /// again (None: not read yet).
    baseline: Option<Baseline>,
    /// Said that it cannot take over, for this silence.
    said_cannot: bool,
    live_generation: Option<u64>,
    exited: bool,
    switchover: Option<Switchover>,
    handover: Option<Handover>,
    refused_connections: u64,
    repairs: Repairs,
}

/// See [`Backup::baseline`].
#[derive(Debug, Clone, Copy)]
struct Baseline {
    /// The record's generation then (None: no record).
    generation: Option<u64>,
}

impl Backup {
    pub fn new(config: BackupConfig, now_ms: u64) -> Self {
        Backup {
            config,
            now_ms,
            link: None,
            pending: VecDeque::new(),
            incoming: None,
            incoming_from_old_link: false,
            latest: None,
            applied: None,
            applying: None,
            ready: VecDeque::new(),
            right: None,
            newest_generation: 0,
            last_heard_ms: None,
            claim_outstanding: false,
            next_claim_attempt_ms: 0,
            read_outstanding: false,
            next_read_ms: 0,
            baseline: None,
            said_cannot: false,
            live_generation: None,
            exited: false,
            switchover: None,
            handover: None,
            refused_connections: 0,
            repairs: Repairs::default(),
        }
    }

    /// A backup whose process restarted, its machine holding `kept.applied` again (restored
    /// from what it kept): it answers the next Hello with that checkpoint, so that the
    /// primary continues its chain with the incremental checkpoints it kept rather than a
    /// full one, and it may take over with that state as before, for the generation the
    /// primary said it counts for. The primary counts as heard now: a primary that died
    /// meanwhile is taken over after the failover timeout from here.
    pub fn resume(config: BackupConfig, now_ms: u64, kept: BackupKept) -> Self {
        let mut backup = Backup::new(config, now_ms);
        let applied = Applied { id: kept.applied, icount: kept.icount };
        backup.applied = Some(applied);
        backup.latest = Some(kept.applied);
        backup.right = kept.right;
        backup.newest_generation = kept.newest_generation;
        backup.last_heard_ms = Some(now_ms);
        backup
    }

    /// Feeds one event; returns the actions to carry out, in order.
    pub fn step(&mut self, event: BackupEvent<'_>) -> Vec<BackupAction> {
        let mut actions = Vec::new();
        match event {
            BackupEvent::Tick { now_ms } => self.on_tick(now_ms, &mut actions),
            BackupEvent::Connected { conn, nonce } => self.on_connected(conn, nonce, &mut actions),
            BackupEvent::Received { conn, bytes } => self.on_received(conn, bytes, &mut actions),
            BackupEvent::Disconnected { conn } => self.on_disconnected(conn, &mut actions),
            BackupEvent::CheckpointApplied { epoch } => self.on_applied(epoch, &mut actions),
            BackupEvent::ApplyFailed { epoch, reason } => self.on_apply_failed(epoch, reason, &mut actions),
            BackupEvent::StateLost { reason } => self.on_state_lost(reason, &mut actions),
            BackupEvent::Claim(answer) => self.on_claim(answer, &mut actions),
            BackupEvent::Ownership(answer) => self.on_ownership(answer, &mut actions),
        }
        actions
    }

    /// The checkpoint the machine is known to hold.
    pub fn applied(&self) -> Option<CheckpointId> {
        self.applied.map(|a| a.id)
    }

    /// What a restarted process needs to resume as this backup ([`Backup::resume`]): None
    /// while the machine holds no whole checkpoint.
    pub fn kept(&self) -> Option<BackupKept> {
        let applied = self.applied?;
        Some(BackupKept {
            applied: applied.id,
            icount: applied.icount,
            right: self.right,
            newest_generation: self.newest_generation,
        })
    }

    /// Whether this backup has gone live (it then refuses primaries).
    pub fn is_live(&self) -> bool {
        self.live_generation.is_some()
    }

    /// Live migration: how the switchover this backup went live by ended (None: it went
    /// live by a takeover, or not at all).
    pub fn handover(&self) -> Option<Handover> {
        self.handover.filter(|_| self.is_live())
    }

    /// Whether a switchover (live migration) is under way.
    pub fn switching_over(&self) -> bool {
        self.switchover.is_some()
    }

    /// Whether a primary is connected and past the handshake.
    pub fn is_streaming(&self) -> bool {
        self.link.is_some()
    }

    /// The connection the authenticated primary talks on.
    pub fn primary_conn(&self) -> Option<ConnId> {
        self.link.as_ref().map(|bl| bl.conn)
    }

    /// The generation the applied state counts for, if any.
    pub fn state_generation(&self) -> Option<u64> {
        let (applied, right) = (self.applied?, self.right?);
        (applied.id.run_id == right.run_id && applied.id.epoch >= right.from_epoch).then_some(right.generation)
    }

    pub fn status(&self) -> BackupStatus {
        let state_generation = self.state_generation();
        BackupStatus {
            primary_connected: self.is_streaming(),
            applied_epoch: self.applied.map(|a| a.id.epoch),
            state_generation,
            newest_generation: self.newest_generation,
            stale: self.applied.is_some() && state_generation.is_none_or(|g| g < self.newest_generation),
            pending_handshakes: self.pending.len(),
            refused_connections: self.refused_connections,
            partial_bytes: match &self.incoming {
                Some(Incoming::Receiving { bytes, .. }) => bytes.len() as u64,
                _ => 0,
            },
            live_generation: self.live_generation,
            last_heard_ms: self.last_heard_ms,
            damaged_frames: self.repairs.damaged_frames,
            resends_served: self.repairs.resends_served,
            right: self.right,
        }
    }

    fn on_tick(&mut self, now_ms: u64, actions: &mut Vec<BackupAction>) {
        self.now_ms = self.now_ms.max(now_ms);
        let now = self.now_ms;
        if self.is_live() || self.exited {
            return;
        }
        while let Some(p) = self.pending.front() {
            if now - p.link.opened_ms.min(now) < self.config.handshake_timeout_ms {
                break;
            }
            let p = self.pending.pop_front().expect("checked");
            let waited_ms = now - p.link.opened_ms.min(now);
            self.refused_connections += 1;
            actions.push(BackupAction::Close { conn: p.conn, error: ProtocolError::HandshakeTimeout { waited_ms } });
        }
        if let Some(bl) = &mut self.link {
            if bl.link.tick(now) {
                self.last_heard_ms = Some(now);
            }
            if let Some(bytes) = bl.link.retry_resend(now) {
                actions.push(BackupAction::Send { conn: bl.conn, bytes });
            }
            if now - bl.link.last_sent_ms >= self.config.heartbeat_interval_ms {
                let epoch = self.latest.map_or(0, |id| id.epoch);
                let bytes = bl.link.frame(&Message::Heartbeat { now_ms: now, epoch }, now);
                actions.push(BackupAction::Send { conn: bl.conn, bytes });
            }
        }
        if self.switchover.is_some() {
            return self.advance_switchover(actions);
        }
        self.maybe_suspect(actions);
    }

    /// Live migration: without `HandedOver` in time, or with the link gone, swap again.
    fn advance_switchover(&mut self, actions: &mut Vec<BackupAction>) {
        let now = self.now_ms;
        match self.switchover {
            Some(Switchover::Confirmed { generation, since_ms })
                if self.link.is_none() || now - since_ms.min(now) >= self.config.handover_timeout_ms =>
            {
                if let Some(bl) = self.link.take() {
                    let silent_ms = now - since_ms.min(now);
                    self.close_link(bl, ProtocolError::PeerSilent { silent_ms }, actions);
                }
                self.switchover = Some(Switchover::Fencing { generation });
                self.claim(generation, actions);
            }
            Some(Switchover::Claiming { generation, .. } | Switchover::Fencing { generation })
                if !self.claim_outstanding && now >= self.next_claim_attempt_ms =>
            {
                self.claim(generation, actions)
            }
            _ => {}
        }
    }

    fn claim(&mut self, generation: u64, actions: &mut Vec<BackupAction>) {
        self.claim_outstanding = true;
        actions.push(BackupAction::ClaimOwnership { generation });
    }

    /// Whether the swap asked for last is a switchover's first: the backup acts on it only
    /// once the primary's `HandedOver` arrives, so the caller may answer from a swap every
    /// reader sees and make it durable meanwhile (before the next event it gives the core).
    pub fn claim_awaits_handover(&self) -> bool {
        self.claim_outstanding && matches!(self.switchover, Some(Switchover::Claiming { .. }))
    }

    /// The primary's `Switchover`: valid only for the checkpoint this backup received last,
    /// whole (applied, or still being applied), continuing a state counted for the
    /// generation named.
    fn on_switchover(
        &mut self,
        run_id: u64,
        epoch: u64,
        generation: u64,
        paused_at_unix_us: u64,
        actions: &mut Vec<BackupAction>,
    ) -> Result<(), ProtocolError> {
        let holds = self.latest == Some(CheckpointId { run_id, epoch }) && self.incoming.is_none();
        let counts = self.state_generation() == Some(generation) && generation >= self.newest_generation;
        if !holds || !counts || self.switchover.is_some() || self.claim_outstanding {
            return Err(ProtocolError::UnexpectedMessage {
                message: "Switchover",
                context: "for a state this backup does not hold whole, or that does not count for that generation",
            });
        }
        self.handover = Some(Handover { paused_at_unix_us, confirmed: false });
        self.switchover = Some(Switchover::Claiming { generation, epoch });
        self.claim(generation, actions);
        Ok(())
    }

    /// The answer to a swap of a switchover.
    fn on_switchover_claim(&mut self, answer: Result<SwapAnswer, String>, actions: &mut Vec<BackupAction>) {
        match (self.switchover, answer) {
            (Some(Switchover::Claiming { epoch, .. }), Ok(SwapAnswer::Swapped { generation })) => {
                self.switchover = Some(Switchover::Claimed { generation, epoch });
                self.maybe_switched_over(actions);
                self.pump(actions);
            }
            (Some(Switchover::Fencing { .. }), Ok(SwapAnswer::Swapped { generation })) => {
                self.go_live_by_handover(generation, actions)
            }
            (_, Ok(SwapAnswer::Conflict { ended: Some(exit_code), .. })) => self.exit(exit_code, actions),
            (_, Ok(SwapAnswer::Conflict { generation, owner, .. })) => {
                self.switchover = None;
                self.exited = true;
                self.close_all(ProtocolError::TakenBack { generation, owner }, actions);
                actions.push(BackupAction::StandDown);
            }
            (_, Err(_)) => self.next_claim_attempt_ms = self.now_ms + self.config.store_retry_ms,
            (_, Ok(SwapAnswer::Swapped { .. })) => unreachable!("a swap outside a switchover step"),
        }
    }

    /// Once the record is ours and the final checkpoint applied: `SwitchedOver`.
    fn maybe_switched_over(&mut self, actions: &mut Vec<BackupAction>) {
        let Some(Switchover::Claimed { generation, epoch }) = self.switchover else { return };
        if self.applied.map(|a| a.id.epoch) != Some(epoch) {
            return;
        }
        let now = self.now_ms;
        self.switchover = Some(Switchover::Confirmed { generation, since_ms: now });
        if let Some(bl) = self.link.as_mut() {
            let bytes = bl.link.frame(&Message::SwitchedOver { generation }, now);
            actions.push(BackupAction::Send { conn: bl.conn, bytes });
        }
    }

    fn go_live_by_handover(&mut self, generation: u64, actions: &mut Vec<BackupAction>) {
        let applied = self.applied.expect("a switchover starts with a whole checkpoint applied");
        self.switchover = None;
        self.close_all(ProtocolError::AlreadyLive, actions);
        self.live_generation = Some(generation);
        actions.push(BackupAction::GoLive { epoch: applied.id.epoch, icount: applied.icount, generation });
    }

    /// Failover rule: silent primary + a whole checkpoint applied + nothing left to apply
    /// → claim the ownership record for the generation the state belongs to.
    fn maybe_suspect(&mut self, actions: &mut Vec<BackupAction>) {
        let now = self.now_ms;
        let Some(heard_ms) = self.last_heard_ms else {
            // No primary heard yet: watch the record, so that a VM that ends before its
            // primary ever got through (a protection cut short, say) does not leave this
            // backup waiting for ever.
            return self.maybe_read_ownership(actions);
        };
        let silent_ms = now - heard_ms.min(now);
        let quiet = self.applying.is_none() && self.ready.is_empty();
        let usable = self.state_generation().is_some_and(|g| g >= self.newest_generation);
        if silent_ms >= self.config.failover_timeout_ms && !usable {
            self.maybe_read_ownership(actions);
        }
        if silent_ms < self.config.failover_timeout_ms
            || self.applied.is_none()
            || !quiet
            || self.claim_outstanding
            || now < self.next_claim_attempt_ms
        {
            return;
        }
        let Some(generation) = self.state_generation().filter(|g| *g >= self.newest_generation) else {
            if !self.said_cannot {
                self.said_cannot = true;
                let reason = match self.state_generation() {
                    None => format!(
                        "the primary has been silent for {silent_ms} ms, but this backup's state was never \
                         declared protected (it was still catching up): it cannot take over"
                    ),
                    Some(g) => format!(
                        "the primary has been silent for {silent_ms} ms, but this backup's state belongs to \
                         generation {g} and the VM is at generation {} (outputs left without this backup): \
                         it cannot take over, and waits for a primary to resynchronize it",
                        self.newest_generation
                    ),
                };
                actions.push(BackupAction::CannotTakeOver { reason });
            }
            return;
        };
        if let Some(bl) = self.link.take() {
            self.close_link(bl, ProtocolError::PeerSilent { silent_ms }, actions);
        }
        self.claim_outstanding = true;
        actions.push(BackupAction::ClaimOwnership { generation });
    }

    /// A backup that cannot take over still watches the record now and then while the
    /// primary is silent: a VM that ended meanwhile makes it exit, not wait forever.
    fn maybe_read_ownership(&mut self, actions: &mut Vec<BackupAction>) {
        if self.read_outstanding || self.now_ms < self.next_read_ms || self.exited || self.is_live() {
            return;
        }
        self.read_outstanding = true;
        self.next_read_ms = self.now_ms + self.config.ownership_check_ms;
        actions.push(BackupAction::ReadOwnership);
    }

    fn on_ownership(&mut self, answer: Result<Option<RecordView>, String>, actions: &mut Vec<BackupAction>) {
        self.read_outstanding = false;
        let Ok(record) = answer else { return };
        let first_read = self.baseline.is_none();
        if first_read {
            self.baseline = Some(Baseline { generation: record.as_ref().map(|r| r.generation) });
        }
        match record {
            // Once a primary was heard, any end is this run's (the primary held the record
            // active); before, only one recorded after this backup's first read.
            Some(RecordView { ended: Some(exit_code), generation, .. })
                if self.last_heard_ms.is_some()
                    || (!first_read && self.baseline.is_some_and(|b| b.generation.is_none_or(|g| generation > g))) =>
            {
                self.exit(exit_code, actions)
            }
            Some(record) => self.newest_generation = self.newest_generation.max(record.generation),
            None => {}
        }
    }

    fn on_claim(&mut self, answer: Result<SwapAnswer, String>, actions: &mut Vec<BackupAction>) {
        if !self.claim_outstanding || self.is_live() {
            return;
        }
        self.claim_outstanding = false;
        if self.switchover.is_some() {
            return self.on_switchover_claim(answer, actions);
        }
        match answer {
            Ok(SwapAnswer::Swapped { generation }) => {
                // A switchover's claim whose state was lost meanwhile (its apply failed): the
                // record names this backup, which never ran and cannot; the primary takes the
                // VM back by swapping it once more.
                let Some(applied) = self.applied else { return };
                self.close_all(ProtocolError::AlreadyLive, actions);
                // Whole checkpoints that arrived meanwhile are newer but not needed: the
                // primary released outputs only up to what this backup acknowledged.
                self.ready.clear();
                self.incoming = None;
                self.live_generation = Some(generation);
                actions.push(BackupAction::GoLive { epoch: applied.id.epoch, icount: applied.icount, generation });
            }
            Ok(SwapAnswer::Conflict { ended: Some(exit_code), .. }) => self.exit(exit_code, actions),
            Ok(SwapAnswer::Conflict { generation, owner, .. }) => {
                self.newest_generation = self.newest_generation.max(generation.unwrap_or(0));
                let ours = self.state_generation().unwrap_or(0);
                actions.push(BackupAction::CannotTakeOver {
                    reason: format!(
                        "the ownership record is at generation {generation:?}, owned by {owner}, and this backup's \
                         state belongs to generation {ours}: another replica went on without it, so it cannot \
                         take over; it waits for a primary to resynchronize it"
                    ),
                });
                self.said_cannot = true;
                // Checkpoints that arrived during the claim wait for the machine.
                self.pump(actions);
            }
            Err(_) => {
                self.next_claim_attempt_ms = self.now_ms + self.config.store_retry_ms;
                self.pump(actions);
            }
        }
    }

    fn on_connected(&mut self, conn: ConnId, nonce: Nonce, actions: &mut Vec<BackupAction>) {
        if self.is_live() || self.exited {
            self.refused_connections += 1;
            return actions.push(BackupAction::Close { conn, error: ProtocolError::AlreadyLive });
        }
        let key = &self.config.key;
        let link = Link::new(
            Encoder::new(key.hello_key(Direction::BackupToPrimary)),
            Decoder::new(key.hello_key(Direction::PrimaryToBackup)),
            self.now_ms,
        );
        if self.pending.len() >= self.config.max_pending_handshakes.max(1) {
            let oldest = self.pending.pop_front().expect("the queue is full");
            self.refused_connections += 1;
            actions.push(BackupAction::Close { conn: oldest.conn, error: ProtocolError::TooManyHandshakes });
        }
        self.pending.push_back(BackupLink { conn, link, nonce, hello: None });
    }

    fn on_disconnected(&mut self, conn: ConnId, actions: &mut Vec<BackupAction>) {
        if let Some(bl) = self.link.take_if(|bl| bl.conn == conn) {
            let error = match bl.link.decoder.finish() {
                Err(truncated) => truncated.into(),
                Ok(()) => ProtocolError::ConnectionLost,
            };
            actions.push(BackupAction::Close { conn, error });
        } else if let Some(index) = self.pending.iter().position(|p| p.conn == conn) {
            self.pending.remove(index);
            actions.push(BackupAction::Close { conn, error: ProtocolError::ConnectionLost });
        }
    }

    fn on_received(&mut self, conn: ConnId, bytes: &[u8], actions: &mut Vec<BackupAction>) {
        if let Some(bl) = self.link.as_mut().filter(|bl| bl.conn == conn) {
            bl.link.decoder.push(bytes);
            return self.drain_link(conn, actions);
        }
        let Some(index) = self.pending.iter().position(|p| p.conn == conn) else { return };
        self.pending[index].link.decoder.push(bytes);
        let mut sends = Vec::new();
        loop {
            let Some(index) = self.pending.iter().position(|p| p.conn == conn) else { return };
            let next = self.pending[index].link.next_message(self.now_ms, &mut sends, &mut self.repairs);
            actions.extend(sends.drain(..).map(|bytes| BackupAction::Send { conn, bytes }));
            let result = match next {
                Ok(None) => return,
                Ok(Some(message)) => self.on_pending_message(index, message, actions),
                Err(error) => Err(error),
            };
            match result {
                // Promoted: what else it sent is the primary's.
                Ok(true) => return self.drain_link(conn, actions),
                Ok(false) => {}
                Err(error) => {
                    let p = self.pending.remove(index).expect("index checked");
                    self.refused_connections += 1;
                    return self.close_conn(p, error, actions);
                }
            }
        }
    }

    /// Handle every whole message buffered on the primary's connection.
    fn drain_link(&mut self, conn: ConnId, actions: &mut Vec<BackupAction>) {
        let mut sends = Vec::new();
        loop {
            let Some(bl) = self.link.as_mut().filter(|bl| bl.conn == conn) else { return };
            let next = bl.link.next_message(self.now_ms, &mut sends, &mut self.repairs);
            actions.extend(sends.drain(..).map(|bytes| BackupAction::Send { conn, bytes }));
            let result = match next {
                Ok(None) => return,
                Ok(Some(message)) => self.on_message(message, actions),
                Err(error) => Err(error),
            };
            if let Err(error) = result {
                let bl = self.link.take().expect("a link reported the error");
                return self.close_link(bl, error, actions);
            }
        }
    }

    /// A message on a connection still in its handshake: a Hello is answered; the first
    /// frame under the session keys promotes it (returns true).
    fn on_pending_message(
        &mut self,
        index: usize,
        message: Message,
        actions: &mut Vec<BackupAction>,
    ) -> Result<bool, ProtocolError> {
        let p = &mut self.pending[index];
        match (p.hello, message) {
            (None, Message::Hello { protocol_version, role, config_digest, nonce, run_id, generation }) => {
                if protocol_version != PROTOCOL_VERSION {
                    return Err(ProtocolError::ProtocolVersionMismatch {
                        ours: PROTOCOL_VERSION,
                        theirs: protocol_version,
                    });
                }
                if role != Role::Primary {
                    return Err(ProtocolError::RoleMismatch { expected: "primary", theirs: "backup" });
                }
                if config_digest != self.config.config_digest {
                    return Err(ProtocolError::ConfigMismatch {
                        ours: self.config.config_digest,
                        theirs: config_digest,
                    });
                }
                if generation < self.newest_generation {
                    return Err(ProtocolError::StaleGeneration { seen: self.newest_generation, theirs: generation });
                }
                let partial = match &self.incoming {
                    Some(Incoming::Receiving { id, bytes, .. }) if id.run_id == run_id => {
                        Some((*id, bytes.len() as u64))
                    }
                    _ => None,
                };
                let ack = Message::HelloAck {
                    protocol_version: PROTOCOL_VERSION,
                    role: Role::Backup,
                    config_digest: self.config.config_digest,
                    nonce: p.nonce,
                    primary_nonce: nonce,
                    latest: self.latest,
                    partial,
                };
                let bytes = p.link.frame(&ack, self.now_ms);
                actions.push(BackupAction::Send { conn: p.conn, bytes });
                let key = &self.config.key;
                p.link.secure(
                    key.session_key(Direction::BackupToPrimary, &nonce, &p.nonce),
                    key.session_key(Direction::PrimaryToBackup, &nonce, &p.nonce),
                );
                p.hello = Some((run_id, generation));
                Ok(false)
            }
            (None, Message::Goodbye { reason }) => Err(ProtocolError::PeerClosed { reason }),
            (None, message) => Err(ProtocolError::UnexpectedMessage {
                message: message.name(),
                context: "before the handshake completed",
            }),
            (Some((run_id, generation)), message) => {
                // A frame under the session keys: this connection is the primary, now.
                let p = self.pending.remove(index).expect("index checked");
                if let Some(old) = self.link.take() {
                    self.close_link(old, ProtocolError::ConnectionReplaced, actions);
                }
                // Earlier handshakes of the same run are attempts the primary gave up: their
                // HelloAck described an older state, and their late frames must not displace
                // this connection.
                let mut older = index;
                while let Some(stale) =
                    self.pending.iter().take(older).position(|o| o.hello.is_some_and(|h| h.0 == run_id))
                {
                    let stale = self.pending.remove(stale).expect("position checked");
                    older -= 1;
                    actions.push(BackupAction::Close { conn: stale.conn, error: ProtocolError::ConnectionReplaced });
                }
                self.newest_generation = self.newest_generation.max(generation);
                self.last_heard_ms = Some(self.now_ms);
                self.said_cannot = false;
                if let Some(Incoming::Receiving { id, .. }) = &self.incoming {
                    if id.run_id != run_id {
                        self.incoming = None;
                    }
                }
                if let Some(Incoming::Discarding { .. }) = &self.incoming {
                    self.incoming = None;
                }
                self.incoming_from_old_link = self.incoming.is_some();
                self.link = Some(BackupLink { hello: Some((run_id, generation)), ..p });
                if let Err(error) = self.on_message(message, actions) {
                    // Promoted already: the error closes the primary's connection, not a pending one.
                    let bl = self.link.take().expect("just set");
                    self.close_link(bl, error, actions);
                }
                Ok(true)
            }
        }
    }

    fn on_message(&mut self, message: Message, actions: &mut Vec<BackupAction>) -> Result<(), ProtocolError> {
        let bl = self.link.as_ref().expect("a message arrives on the link");
        let (run_id, _) = bl.hello.expect("the link is authenticated");
        self.last_heard_ms = Some(self.now_ms);
        match message {
            Message::Heartbeat { .. } => Ok(()),
            Message::CheckpointBegin { epoch, base_epoch, icount, total_bytes } => {
                self.on_begin(run_id, epoch, base_epoch, icount, total_bytes, actions)
            }
            Message::CheckpointResume { epoch, offset } => self.on_resume(run_id, epoch, offset),
            Message::CheckpointChunk { epoch, offset, bytes } => self.on_chunk(epoch, offset, &bytes),
            Message::CheckpointEnd { epoch, digest } => self.on_end(run_id, epoch, digest, actions),
            Message::Protected { generation, from_epoch } => {
                self.newest_generation = self.newest_generation.max(generation);
                self.right = Some(ClaimRight { run_id, generation, from_epoch });
                self.said_cannot = false;
                Ok(())
            }
            Message::End { exit_code } => {
                self.exit(exit_code, actions);
                Ok(())
            }
            Message::Switchover { epoch, generation, paused_at_unix_us } => {
                self.on_switchover(run_id, epoch, generation, paused_at_unix_us, actions)
            }
            Message::HandedOver => match self.switchover {
                Some(Switchover::Confirmed { generation, .. }) => {
                    if let Some(handover) = &mut self.handover {
                        handover.confirmed = true;
                    }
                    self.go_live_by_handover(generation, actions);
                    Ok(())
                }
                _ => Err(ProtocolError::UnexpectedMessage { message: "HandedOver", context: "outside a switchover" }),
            },
            Message::StandDown => {
                self.exited = true;
                self.close_all(ProtocolError::StoodDown, actions);
                actions.push(BackupAction::StandDown);
                Ok(())
            }
            Message::Goodbye { reason } => Err(ProtocolError::PeerClosed { reason }),
            message => Err(ProtocolError::UnexpectedMessage { message: message.name(), context: "to a backup" }),
        }
    }

    fn on_begin(
        &mut self,
        run_id: u64,
        epoch: u64,
        base_epoch: Option<u64>,
        icount: u64,
        total_bytes: u64,
        actions: &mut Vec<BackupAction>,
    ) -> Result<(), ProtocolError> {
        let latest = self.latest;
        if std::mem::take(&mut self.incoming_from_old_link) {
            // The primary starts afresh rather than resume the part we hold.
            self.incoming = None;
        }
        if self.incoming.is_some() {
            return Err(ProtocolError::UnexpectedMessage {
                message: "CheckpointBegin",
                context: "before the previous checkpoint ended",
            });
        }
        if total_bytes > self.config.max_checkpoint_bytes {
            let limit = self.config.max_checkpoint_bytes;
            return Err(ProtocolError::CheckpointTooLarge { epoch, total_bytes, limit });
        }
        if let Some(latest) = latest.filter(|l| l.run_id == run_id && epoch <= l.epoch) {
            return Err(ProtocolError::EpochNotIncreasing { latest: latest.epoch, got: epoch });
        }
        if base_epoch.is_some_and(|base| base >= epoch) {
            let detail = format!("base epoch {base_epoch:?} is not an epoch before it");
            return Err(ProtocolError::MalformedCheckpoint { epoch, detail });
        }
        // An incremental on the epoch before holds what changed since it, so it fits that
        // state alone. One on an older epoch (a restarted primary resuming its run) holds
        // every page written since that epoch, in whatever this run did after it: it fits
        // any state of the run from that epoch on.
        let fits = match base_epoch {
            None => true,
            Some(base) if base + 1 == epoch => latest == Some(CheckpointId { run_id, epoch: base }),
            Some(base) => latest.is_some_and(|l| l.run_id == run_id && base <= l.epoch),
        };
        if !fits {
            let bl = self.link.as_mut().expect("checked by the caller");
            let need_full = Message::NeedFull { epoch, latest };
            actions.push(BackupAction::Send { conn: bl.conn, bytes: bl.link.frame(&need_full, self.now_ms) });
            self.incoming = Some(Incoming::Discarding { epoch });
            return Ok(());
        }
        let reserve = total_bytes.min(MAX_RESERVE_BYTES) as usize;
        let id = CheckpointId { run_id, epoch };
        let bytes = Vec::with_capacity(reserve);
        self.incoming = Some(Incoming::Receiving { id, base_epoch, icount, total_bytes, bytes, hasher: Sha256::new() });
        Ok(())
    }

    fn on_resume(&mut self, run_id: u64, epoch: u64, offset: u64) -> Result<(), ProtocolError> {
        let from_old_link = std::mem::take(&mut self.incoming_from_old_link);
        match &self.incoming {
            Some(Incoming::Receiving { id, bytes, .. })
                if from_old_link && *id == (CheckpointId { run_id, epoch }) && bytes.len() as u64 == offset =>
            {
                Ok(())
            }
            _ => Err(ProtocolError::MalformedCheckpoint {
                epoch,
                detail: format!("a resume at offset {offset} of a checkpoint this backup does not hold that much of"),
            }),
        }
    }

    fn on_chunk(&mut self, chunk_epoch: u64, offset: u64, chunk: &[u8]) -> Result<(), ProtocolError> {
        match &mut self.incoming {
            None => {
                Err(ProtocolError::UnexpectedMessage { message: "CheckpointChunk", context: "outside a checkpoint" })
            }
            Some(Incoming::Discarding { epoch }) if *epoch == chunk_epoch => Ok(()),
            Some(Incoming::Receiving { id, total_bytes, bytes, hasher, .. }) if id.epoch == chunk_epoch => {
                let have = bytes.len() as u64;
                if offset != have || have + chunk.len() as u64 > *total_bytes {
                    let detail =
                        format!("a {}-byte chunk at offset {offset} after {have} of {total_bytes} bytes", chunk.len());
                    return Err(ProtocolError::MalformedCheckpoint { epoch: id.epoch, detail });
                }
                bytes.extend_from_slice(chunk);
                hasher.update(chunk);
                Ok(())
            }
            Some(Incoming::Receiving { id: CheckpointId { epoch, .. }, .. } | Incoming::Discarding { epoch }) => {
                let detail = format!("a chunk of epoch {chunk_epoch} inside it");
                Err(ProtocolError::MalformedCheckpoint { epoch: *epoch, detail })
            }
        }
    }

    fn on_end(
        &mut self,
        run_id: u64,
        end_epoch: u64,
        digest: [u8; 32],
        actions: &mut Vec<BackupAction>,
    ) -> Result<(), ProtocolError> {
        let (id, base_epoch, icount, total_bytes, payload, hasher) = match self.incoming.take() {
            None => {
                return Err(ProtocolError::UnexpectedMessage {
                    message: "CheckpointEnd",
                    context: "outside a checkpoint",
                })
            }
            Some(Incoming::Discarding { epoch }) if epoch == end_epoch => return Ok(()),
            Some(Incoming::Receiving { id, base_epoch, icount, total_bytes, bytes, hasher })
                if id.epoch == end_epoch && id.run_id == run_id =>
            {
                (id, base_epoch, icount, total_bytes, bytes, hasher)
            }
            Some(Incoming::Receiving { id: CheckpointId { epoch, .. }, .. } | Incoming::Discarding { epoch }) => {
                let detail = format!("it was ended as epoch {end_epoch}");
                return Err(ProtocolError::MalformedCheckpoint { epoch, detail });
            }
        };
        let epoch = id.epoch;
        if payload.len() as u64 != total_bytes {
            let detail = format!("it ended after {} of its {total_bytes} bytes", payload.len());
            return Err(ProtocolError::MalformedCheckpoint { epoch, detail });
        }
        if <[u8; 32]>::from(hasher.finalize()) != digest {
            return Err(ProtocolError::CheckpointDigestMismatch { epoch });
        }
        let queued = self.ready.len() + usize::from(self.applying.is_some());
        if queued >= self.config.max_queued_checkpoints {
            return Err(ProtocolError::BackupOverloaded { queued });
        }
        self.ready.push_back(WholeCheckpoint { id, base_epoch, icount, payload });
        self.latest = Some(id);
        self.pump(actions);
        Ok(())
    }

    /// Hands the next whole checkpoint to the machine, one at a time, and none while a
    /// takeover is being decided (a switchover's claim goes with the final checkpoint's apply).
    fn pump(&mut self, actions: &mut Vec<BackupAction>) {
        let deciding = self.claim_outstanding && self.switchover.is_none();
        if self.applying.is_some() || deciding || self.is_live() || self.exited {
            return;
        }
        if let Some(checkpoint) = self.ready.pop_front() {
            let WholeCheckpoint { id, base_epoch, icount, payload } = checkpoint;
            self.applying = Some(Applied { id, icount });
            let run_id = id.run_id;
            actions.push(BackupAction::ApplyCheckpoint { run_id, epoch: id.epoch, base_epoch, icount, payload });
        }
    }

    fn on_applied(&mut self, epoch: u64, actions: &mut Vec<BackupAction>) {
        let applied = self.applying.take().expect("CheckpointApplied follows an ApplyCheckpoint");
        assert_eq!(applied.id.epoch, epoch, "CheckpointApplied names the epoch of the last ApplyCheckpoint");
        self.applied = Some(applied);
        // Applying takes the machine's time, not the primary's: silence counts from here.
        if self.link.is_some() {
            self.last_heard_ms = Some(self.now_ms);
        }
        let now = self.now_ms;
        if let Some(bl) = self.link.as_mut().filter(|bl| bl.hello.map(|h| h.0) == Some(applied.id.run_id)) {
            actions.push(BackupAction::Send { conn: bl.conn, bytes: bl.link.frame(&Message::Ack { epoch }, now) });
        }
        self.maybe_switched_over(actions);
        self.pump(actions);
    }

    fn on_apply_failed(&mut self, epoch: u64, reason: String, actions: &mut Vec<BackupAction>) {
        let failed = self.applying.take().expect("ApplyFailed follows an ApplyCheckpoint");
        assert_eq!(failed.id.epoch, epoch, "ApplyFailed names the epoch of the last ApplyCheckpoint");
        // The machine no longer holds a whole checkpoint: nothing to build on or go live from
        // (a switchover under way is abandoned: the primary takes the VM back).
        self.switchover = None;
        self.applied = None;
        self.latest = None;
        self.ready.clear();
        self.incoming = None;
        self.incoming_from_old_link = false;
        if let Some(bl) = self.link.take() {
            self.close_link(bl, ProtocolError::ApplyFailed { epoch, reason }, actions);
        }
    }

    fn on_state_lost(&mut self, reason: String, actions: &mut Vec<BackupAction>) {
        // An apply handed over meanwhile is reported as it went (a lockstep backup refuses
        // every batch but a state once diverged, and a state replaces what was lost).
        self.switchover = None;
        self.applied = None;
        self.latest = None;
        self.ready.clear();
        self.incoming = None;
        self.incoming_from_old_link = false;
        if let Some(bl) = self.link.take() {
            self.close_link(bl, ProtocolError::StateLost { reason }, actions);
        }
    }

    fn exit(&mut self, exit_code: u32, actions: &mut Vec<BackupAction>) {
        if self.exited {
            return;
        }
        self.exited = true;
        self.close_all(ProtocolError::VmEnded { exit_code }, actions);
        actions.push(BackupAction::Exit { exit_code });
    }

    fn close_all(&mut self, error: ProtocolError, actions: &mut Vec<BackupAction>) {
        if let Some(bl) = self.link.take() {
            self.close_link(bl, error.clone(), actions);
        }
        while let Some(p) = self.pending.pop_front() {
            actions.push(BackupAction::Close { conn: p.conn, error: error.clone() });
        }
    }

    /// Closes the primary's connection, and with it what was tied to that connection.
    fn close_link(&mut self, bl: BackupLink, error: ProtocolError, actions: &mut Vec<BackupAction>) {
        if let Some(Incoming::Discarding { .. }) = &self.incoming {
            self.incoming = None;
        }
        self.incoming_from_old_link = false;
        self.close_conn(bl, error, actions);
    }

    /// Closes one connection, telling the peer why (best effort). A pending connection is
    /// closed with this alone: it must not touch the state of the primary's connection.
    fn close_conn(&self, mut bl: BackupLink, error: ProtocolError, actions: &mut Vec<BackupAction>) {
        if worth_a_goodbye(&error) {
            let bytes = bl.link.frame(&goodbye(&error), self.now_ms);
            actions.push(BackupAction::Send { conn: bl.conn, bytes });
        }
        actions.push(BackupAction::Close { conn: bl.conn, error });
    }
}
