//! The backup's side: answer the handshake, reassemble checkpoints and hand each one to the
//! machine only once it is whole and its digest matches, acknowledge what the machine has
//! applied, and take over (lease first) when the primary falls silent.

use std::collections::VecDeque;

use sha2::{Digest, Sha256};

use super::{goodbye, worth_a_goodbye, Link, ProtocolError};
use crate::lease::{AcquireOutcome, LeaseError};
use crate::messages::{CheckpointId, ConfigDigest, Message, Role, PROTOCOL_VERSION};
use crate::wire::{Decoder, Direction, Encoder, Nonce, PresharedKey};

/// Never reserve more than this for a checkpoint before its bytes arrive.
const MAX_RESERVE_BYTES: u64 = 64 << 20;

/// The backup's settings. [`BackupConfig::new`] fills in sensible values.
#[derive(Debug, Clone)]
pub struct BackupConfig {
    pub key: PresharedKey,
    pub config_digest: ConfigDigest,
    pub heartbeat_interval_ms: u64,
    pub handshake_timeout_ms: u64,
    /// Silence from the primary for this long makes the backup try to take over.
    pub failover_timeout_ms: u64,
    /// After losing a lease race (or failing to reach the lease), try again this much later.
    pub lease_retry_ms: u64,
    /// The largest checkpoint accepted: set it above RAM + disk + device state.
    pub max_checkpoint_bytes: u64,
    /// Whole checkpoints waiting for the machine to apply them; more closes the connection.
    pub max_queued_checkpoints: usize,
}

impl BackupConfig {
    pub fn new(key: PresharedKey, config_digest: ConfigDigest, max_checkpoint_bytes: u64) -> Self {
        BackupConfig {
            key,
            config_digest,
            heartbeat_interval_ms: 50,
            handshake_timeout_ms: 2000,
            failover_timeout_ms: 1000,
            lease_retry_ms: 250,
            max_checkpoint_bytes,
            max_queued_checkpoints: 8,
        }
    }
}

/// What happens to a backup.
#[derive(Debug)]
pub enum BackupEvent<'a> {
    /// Time has passed: feed one every few milliseconds.
    Tick { now_ms: u64 },
    /// A primary connected; `nonce` is fresh random bytes.
    Connected { nonce: Nonce },
    /// Bytes arrived on the connection, cut anywhere.
    Received(&'a [u8]),
    /// The connection ended (end of stream or an I/O error).
    Disconnected,
    /// The machine applied the checkpoint of the last `ApplyCheckpoint` action.
    CheckpointApplied { epoch: u64 },
    /// The machine could not apply it; its state is no longer a whole checkpoint.
    ApplyFailed { epoch: u64, reason: String },
    /// The answer to an `AcquireLease` action.
    LeaseAcquisition(Result<AcquireOutcome, &'a LeaseError>),
}

/// What a backup asks its caller to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupAction {
    /// Write these bytes to the connection.
    Send(Vec<u8>),
    /// Apply this whole, verified checkpoint to the stopped machine (on top of `base_epoch`,
    /// or replacing everything when it is None), then report `CheckpointApplied` or
    /// `ApplyFailed`. No other ApplyCheckpoint comes before that report.
    /// `run_id` names the primary run that took it (for logs; the machine needs only the rest).
    ApplyCheckpoint { run_id: u64, epoch: u64, base_epoch: Option<u64>, icount: u64, payload: Vec<u8> },
    /// Close the connection; keep listening for a primary.
    Close { error: ProtocolError },
    /// The primary has been silent for the failover timeout: call
    /// `Lease::try_acquire(holder, now_ms, ttl_ms)` and report the answer.
    AcquireLease,
    /// This replica holds the lease (term `term`): resume the machine, which holds the
    /// checkpoint of `epoch`, and run it as the new primary: a fresh [`super::Primary`] with
    /// a new run id and `LeaseGrant { term, acquired_at_ms }`, where `acquired_at_ms` is the
    /// `now_ms` that was passed to the winning `try_acquire`. Outputs the old primary held
    /// for later epochs are lost with it; the guest produces them again.
    GoLive { epoch: u64, icount: u64, term: u64 },
}

#[derive(Debug)]
enum Incoming {
    Receiving {
        epoch: u64,
        base_epoch: Option<u64>,
        icount: u64,
        total_bytes: u64,
        bytes: Vec<u8>,
        hasher: Sha256,
    },
    /// An incremental checkpoint that does not fit this backup's state: skipped.
    Discarding {
        epoch: u64,
    },
}

#[derive(Debug)]
struct BackupLink {
    link: Link,
    nonce: Nonce,
    /// The primary's run, once the handshake is done.
    run_id: Option<u64>,
    incoming: Option<Incoming>,
}

#[derive(Debug)]
struct WholeCheckpoint {
    id: CheckpointId,
    base_epoch: Option<u64>,
    icount: u64,
    payload: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Applied {
    id: CheckpointId,
    icount: u64,
}

/// The backup's protocol state machine.
#[derive(Debug)]
pub struct Backup {
    config: BackupConfig,
    now_ms: u64,
    link: Option<BackupLink>,
    /// What the machine holds once every queued and pending checkpoint is applied.
    latest: Option<CheckpointId>,
    /// What the machine is known to hold.
    applied: Option<Applied>,
    /// Handed to the machine, not yet reported.
    pending: Option<Applied>,
    ready: VecDeque<WholeCheckpoint>,
    highest_term: u64,
    last_heard_ms: Option<u64>,
    lease_outstanding: bool,
    next_lease_attempt_ms: u64,
    live_term: Option<u64>,
}

impl Backup {
    pub fn new(config: BackupConfig, now_ms: u64) -> Self {
        Backup {
            config,
            now_ms,
            link: None,
            latest: None,
            applied: None,
            pending: None,
            ready: VecDeque::new(),
            highest_term: 0,
            last_heard_ms: None,
            lease_outstanding: false,
            next_lease_attempt_ms: 0,
            live_term: None,
        }
    }

    /// Feeds one event; returns the actions to carry out, in order.
    pub fn step(&mut self, event: BackupEvent<'_>) -> Vec<BackupAction> {
        let mut actions = Vec::new();
        match event {
            BackupEvent::Tick { now_ms } => self.on_tick(now_ms, &mut actions),
            BackupEvent::Connected { nonce } => self.on_connected(nonce, &mut actions),
            BackupEvent::Received(bytes) => self.on_received(bytes, &mut actions),
            BackupEvent::Disconnected => {
                if let Some(bl) = self.link.take() {
                    let error = match bl.link.decoder.finish() {
                        Err(truncated) => truncated.into(),
                        Ok(()) => ProtocolError::ConnectionLost,
                    };
                    actions.push(BackupAction::Close { error });
                }
            }
            BackupEvent::CheckpointApplied { epoch } => self.on_applied(epoch, &mut actions),
            BackupEvent::ApplyFailed { epoch, reason } => self.on_apply_failed(epoch, reason, &mut actions),
            BackupEvent::LeaseAcquisition(answer) => self.on_lease(answer, &mut actions),
        }
        actions
    }

    /// The checkpoint the machine is known to hold.
    pub fn applied(&self) -> Option<CheckpointId> {
        self.applied.map(|a| a.id)
    }

    /// Whether this backup has gone live (it then ignores primaries).
    pub fn is_live(&self) -> bool {
        self.live_term.is_some()
    }

    /// Whether a primary is connected and past the handshake.
    pub fn is_streaming(&self) -> bool {
        self.link.as_ref().is_some_and(|bl| bl.run_id.is_some())
    }

    fn on_tick(&mut self, now_ms: u64, actions: &mut Vec<BackupAction>) {
        self.now_ms = self.now_ms.max(now_ms);
        let now = self.now_ms;
        if self.is_live() {
            return;
        }
        if let Some(bl) = &mut self.link {
            let link = &mut bl.link;
            if bl.run_id.is_none() && now - link.opened_ms >= self.config.handshake_timeout_ms {
                let waited_ms = now - link.opened_ms;
                self.close(ProtocolError::HandshakeTimeout { waited_ms }, actions);
            } else if bl.run_id.is_some() && now - link.last_sent_ms >= self.config.heartbeat_interval_ms {
                let epoch = self.latest.map_or(0, |id| id.epoch);
                actions.push(BackupAction::Send(link.frame(&Message::Heartbeat { now_ms: now, epoch }, now)));
            }
        }
        self.maybe_suspect(actions);
    }

    /// Failover rule: silent primary + a whole checkpoint applied + nothing left to apply
    /// → try the lease (again after `lease_retry_ms` if it was refused).
    fn maybe_suspect(&mut self, actions: &mut Vec<BackupAction>) {
        let now = self.now_ms;
        let Some(heard_ms) = self.last_heard_ms else { return };
        let silent_ms = now - heard_ms.min(now);
        let quiet = self.pending.is_none() && self.ready.is_empty();
        if silent_ms < self.config.failover_timeout_ms
            || self.applied.is_none()
            || !quiet
            || self.lease_outstanding
            || now < self.next_lease_attempt_ms
        {
            return;
        }
        if self.is_streaming() {
            self.close(ProtocolError::PeerSilent { silent_ms }, actions);
        }
        self.lease_outstanding = true;
        actions.push(BackupAction::AcquireLease);
    }

    fn on_lease(&mut self, answer: Result<AcquireOutcome, &LeaseError>, actions: &mut Vec<BackupAction>) {
        if !self.lease_outstanding || self.is_live() {
            return;
        }
        self.lease_outstanding = false;
        match answer {
            Ok(AcquireOutcome::Acquired(record)) => {
                let applied = self.applied.expect("the lease is only sought with a whole checkpoint applied");
                self.close(ProtocolError::AlreadyLive, actions);
                // Whole checkpoints that arrived meanwhile are newer but not needed: the
                // primary released outputs only up to what this backup acknowledged.
                self.ready.clear();
                self.live_term = Some(record.term);
                actions.push(BackupAction::GoLive {
                    epoch: applied.id.epoch,
                    icount: applied.icount,
                    term: record.term,
                });
            }
            Ok(AcquireOutcome::Busy(_)) | Err(_) => {
                self.next_lease_attempt_ms = self.now_ms + self.config.lease_retry_ms;
                self.pump(actions);
            }
        }
    }

    fn on_connected(&mut self, nonce: Nonce, actions: &mut Vec<BackupAction>) {
        let key = &self.config.key;
        let link = Link {
            encoder: Encoder::new(key.hello_key(Direction::BackupToPrimary)),
            decoder: Decoder::new(key.hello_key(Direction::PrimaryToBackup)),
            opened_ms: self.now_ms,
            last_heard_ms: self.now_ms,
            last_sent_ms: self.now_ms,
        };
        // A new connection replaces the old one, whose partial checkpoint is dropped.
        self.link = Some(BackupLink { link, nonce, run_id: None, incoming: None });
        if self.is_live() {
            self.close(ProtocolError::AlreadyLive, actions);
        }
    }

    fn on_received(&mut self, bytes: &[u8], actions: &mut Vec<BackupAction>) {
        let Some(bl) = &mut self.link else { return };
        bl.link.decoder.push(bytes);
        loop {
            let Some(bl) = &mut self.link else { return };
            let result = match bl.link.next_message(self.now_ms) {
                Ok(None) => return,
                Ok(Some(message)) => self.on_message(message, actions),
                Err(error) => Err(error),
            };
            if let Err(error) = result {
                return self.close(error, actions);
            }
        }
    }

    fn on_message(&mut self, message: Message, actions: &mut Vec<BackupAction>) -> Result<(), ProtocolError> {
        let bl = self.link.as_mut().expect("a message arrives on a link");
        let Some(run_id) = bl.run_id else {
            return match message {
                Message::Hello { protocol_version, role, config_digest, nonce, run_id, term } => {
                    self.on_hello(protocol_version, role, config_digest, nonce, run_id, term, actions)
                }
                Message::Goodbye { reason } => Err(ProtocolError::PeerClosed { reason }),
                message => Err(ProtocolError::UnexpectedMessage {
                    message: message.name(),
                    context: "before the handshake completed",
                }),
            };
        };
        self.last_heard_ms = Some(self.now_ms);
        match message {
            Message::Heartbeat { .. } => Ok(()),
            Message::CheckpointBegin { epoch, base_epoch, icount, total_bytes } => {
                self.on_begin(run_id, epoch, base_epoch, icount, total_bytes, actions)
            }
            Message::CheckpointChunk { epoch, offset, bytes } => self.on_chunk(epoch, offset, &bytes),
            Message::CheckpointEnd { epoch, digest } => self.on_end(run_id, epoch, digest, actions),
            Message::Goodbye { reason } => Err(ProtocolError::PeerClosed { reason }),
            message => Err(ProtocolError::UnexpectedMessage { message: message.name(), context: "to a backup" }),
        }
    }

    #[allow(clippy::too_many_arguments)] // the fields of a Hello
    fn on_hello(
        &mut self,
        protocol_version: u16,
        role: Role,
        config_digest: ConfigDigest,
        primary_nonce: Nonce,
        run_id: u64,
        term: u64,
        actions: &mut Vec<BackupAction>,
    ) -> Result<(), ProtocolError> {
        if protocol_version != PROTOCOL_VERSION {
            return Err(ProtocolError::ProtocolVersionMismatch { ours: PROTOCOL_VERSION, theirs: protocol_version });
        }
        if role != Role::Primary {
            return Err(ProtocolError::RoleMismatch { expected: "primary", theirs: "backup" });
        }
        if config_digest != self.config.config_digest {
            return Err(ProtocolError::ConfigMismatch { ours: self.config.config_digest, theirs: config_digest });
        }
        if term < self.highest_term {
            return Err(ProtocolError::StaleTerm { seen: self.highest_term, theirs: term });
        }
        self.highest_term = term;
        self.last_heard_ms = Some(self.now_ms);
        let bl = self.link.as_mut().expect("a Hello arrives on a link");
        let ack = Message::HelloAck {
            protocol_version: PROTOCOL_VERSION,
            role: Role::Backup,
            config_digest: self.config.config_digest,
            nonce: bl.nonce,
            primary_nonce,
            latest: self.latest,
        };
        actions.push(BackupAction::Send(bl.link.frame(&ack, self.now_ms)));
        let key = &self.config.key;
        bl.link.encoder.set_key(key.session_key(Direction::BackupToPrimary, &primary_nonce, &bl.nonce));
        bl.link.decoder.set_key(key.session_key(Direction::PrimaryToBackup, &primary_nonce, &bl.nonce));
        bl.run_id = Some(run_id);
        Ok(())
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
        let bl = self.link.as_mut().expect("checked by the caller");
        if bl.incoming.is_some() {
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
        if base_epoch.is_some_and(|base| base.checked_add(1) != Some(epoch)) {
            let detail = format!("base epoch {base_epoch:?} is not the epoch before it");
            return Err(ProtocolError::MalformedCheckpoint { epoch, detail });
        }
        let fits = match base_epoch {
            None => true,
            Some(base) => latest == Some(CheckpointId { run_id, epoch: base }),
        };
        if !fits {
            let need_full = Message::NeedFull { epoch, latest };
            actions.push(BackupAction::Send(bl.link.frame(&need_full, self.now_ms)));
            bl.incoming = Some(Incoming::Discarding { epoch });
            return Ok(());
        }
        let reserve = total_bytes.min(MAX_RESERVE_BYTES) as usize;
        let bytes = Vec::with_capacity(reserve);
        bl.incoming =
            Some(Incoming::Receiving { epoch, base_epoch, icount, total_bytes, bytes, hasher: Sha256::new() });
        Ok(())
    }

    fn on_chunk(&mut self, chunk_epoch: u64, offset: u64, chunk: &[u8]) -> Result<(), ProtocolError> {
        let bl = self.link.as_mut().expect("checked by the caller");
        match &mut bl.incoming {
            None => {
                Err(ProtocolError::UnexpectedMessage { message: "CheckpointChunk", context: "outside a checkpoint" })
            }
            Some(Incoming::Discarding { epoch }) if *epoch == chunk_epoch => Ok(()),
            Some(Incoming::Receiving { epoch, total_bytes, bytes, hasher, .. }) if *epoch == chunk_epoch => {
                let have = bytes.len() as u64;
                if offset != have || have + chunk.len() as u64 > *total_bytes {
                    let detail =
                        format!("a {}-byte chunk at offset {offset} after {have} of {total_bytes} bytes", chunk.len());
                    return Err(ProtocolError::MalformedCheckpoint { epoch: *epoch, detail });
                }
                bytes.extend_from_slice(chunk);
                hasher.update(chunk);
                Ok(())
            }
            Some(Incoming::Receiving { epoch, .. } | Incoming::Discarding { epoch }) => {
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
        let bl = self.link.as_mut().expect("checked by the caller");
        let incoming = bl.incoming.take();
        let (epoch, base_epoch, icount, total_bytes, payload, hasher) = match incoming {
            None => {
                return Err(ProtocolError::UnexpectedMessage {
                    message: "CheckpointEnd",
                    context: "outside a checkpoint",
                })
            }
            Some(Incoming::Discarding { epoch }) if epoch == end_epoch => return Ok(()),
            Some(Incoming::Receiving { epoch, base_epoch, icount, total_bytes, bytes, hasher })
                if epoch == end_epoch =>
            {
                (epoch, base_epoch, icount, total_bytes, bytes, hasher)
            }
            Some(Incoming::Receiving { epoch, .. } | Incoming::Discarding { epoch }) => {
                let detail = format!("it was ended as epoch {end_epoch}");
                return Err(ProtocolError::MalformedCheckpoint { epoch, detail });
            }
        };
        if payload.len() as u64 != total_bytes {
            let detail = format!("it ended after {} of its {total_bytes} bytes", payload.len());
            return Err(ProtocolError::MalformedCheckpoint { epoch, detail });
        }
        if <[u8; 32]>::from(hasher.finalize()) != digest {
            return Err(ProtocolError::CheckpointDigestMismatch { epoch });
        }
        let queued = self.ready.len() + usize::from(self.pending.is_some());
        if queued >= self.config.max_queued_checkpoints {
            return Err(ProtocolError::BackupOverloaded { queued });
        }
        let id = CheckpointId { run_id, epoch };
        self.ready.push_back(WholeCheckpoint { id, base_epoch, icount, payload });
        self.latest = Some(id);
        self.pump(actions);
        Ok(())
    }

    /// Hands the next whole checkpoint to the machine, one at a time, and none while a
    /// takeover is being decided.
    fn pump(&mut self, actions: &mut Vec<BackupAction>) {
        if self.pending.is_some() || self.lease_outstanding || self.is_live() {
            return;
        }
        if let Some(checkpoint) = self.ready.pop_front() {
            let WholeCheckpoint { id, base_epoch, icount, payload } = checkpoint;
            self.pending = Some(Applied { id, icount });
            let run_id = id.run_id;
            actions.push(BackupAction::ApplyCheckpoint { run_id, epoch: id.epoch, base_epoch, icount, payload });
        }
    }

    fn on_applied(&mut self, epoch: u64, actions: &mut Vec<BackupAction>) {
        let applied = self.pending.take().expect("CheckpointApplied follows an ApplyCheckpoint");
        assert_eq!(applied.id.epoch, epoch, "CheckpointApplied names the epoch of the last ApplyCheckpoint");
        self.applied = Some(applied);
        let now = self.now_ms;
        if let Some(bl) = self.link.as_mut().filter(|bl| bl.run_id == Some(applied.id.run_id)) {
            actions.push(BackupAction::Send(bl.link.frame(&Message::Ack { epoch }, now)));
        }
        self.pump(actions);
    }

    fn on_apply_failed(&mut self, epoch: u64, reason: String, actions: &mut Vec<BackupAction>) {
        let failed = self.pending.take().expect("ApplyFailed follows an ApplyCheckpoint");
        assert_eq!(failed.id.epoch, epoch, "ApplyFailed names the epoch of the last ApplyCheckpoint");
        // The machine no longer holds a whole checkpoint: nothing to build on or go live from.
        self.applied = None;
        self.latest = None;
        self.ready.clear();
        self.close(ProtocolError::ApplyFailed { epoch, reason }, actions);
    }

    fn close(&mut self, error: ProtocolError, actions: &mut Vec<BackupAction>) {
        if let Some(mut bl) = self.link.take() {
            if worth_a_goodbye(&error) {
                actions.push(BackupAction::Send(bl.link.frame(&goodbye(&error), self.now_ms)));
            }
            actions.push(BackupAction::Close { error });
        }
    }
}
