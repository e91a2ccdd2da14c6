//! The primary's side: handshake, streaming checkpoints in frames, output commit on acks,
//! heartbeats, and keeping the takeover lease (stopping when it is lost or expires).

use sha2::{Digest, Sha256};

use super::{goodbye, worth_a_goodbye, Link, ProtocolError};
use crate::lease::{LeaseError, RenewOutcome};
use crate::messages::{ConfigDigest, Message, Role, PROTOCOL_VERSION};
use crate::wire::{Decoder, Direction, Encoder, Nonce, PresharedKey, MAX_PAYLOAD_BYTES};

/// Bytes a CheckpointChunk spends on its own fields.
const CHUNK_OVERHEAD_BYTES: usize = 16;

/// What a checkpoint holds: the whole state, or what changed since the previous epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointKind {
    Full,
    Incremental,
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
    /// The lease's time to live, as passed to [`crate::lease::Lease::renew`].
    pub lease_ttl_ms: u64,
    /// How often to renew; well under `lease_ttl_ms`, so that a slow renewal or two are survived.
    pub lease_renew_interval_ms: u64,
}

impl PrimaryConfig {
    pub fn new(key: PresharedKey, config_digest: ConfigDigest, run_id: u64) -> Self {
        PrimaryConfig {
            key,
            config_digest,
            run_id,
            heartbeat_interval_ms: 50,
            peer_timeout_ms: 1000,
            handshake_timeout_ms: 2000,
            chunk_bytes: 1 << 20,
            lease_ttl_ms: 3000,
            lease_renew_interval_ms: 500,
        }
    }
}

/// The lease as the primary was granted it before starting the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseGrant {
    pub term: u64,
    /// The `now_ms` passed to the acquisition that granted it.
    pub acquired_at_ms: u64,
}

/// What happens to a primary.
#[derive(Debug)]
pub enum PrimaryEvent<'a> {
    /// Time has passed: feed one every few milliseconds (heartbeats, timeouts, lease).
    Tick { now_ms: u64 },
    /// A new connection to the backup is up; `nonce` is fresh random bytes.
    Connected { nonce: Nonce },
    /// Bytes arrived on the connection, cut anywhere.
    Received(&'a [u8]),
    /// The connection ended (end of stream or an I/O error).
    Disconnected,
    /// The machine took the checkpoint of `epoch` (epochs go up by one). Ask
    /// [`Primary::next_checkpoint_kind`] which kind to take. The outputs the guest produced
    /// in this epoch belong to `epoch`: hold them until a `ReleaseOutputs` covers it.
    CheckpointTaken { epoch: u64, icount: u64, kind: CheckpointKind, payload: &'a [u8] },
    /// The answer to a `RenewLease` action.
    LeaseRenewal(Result<RenewOutcome, &'a LeaseError>),
}

/// What a primary asks its caller to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrimaryAction {
    /// Write these bytes to the connection.
    Send(Vec<u8>),
    /// Output commit: the backup holds the checkpoint of `up_to_epoch`, so every output of
    /// that epoch and earlier ones may now leave.
    ReleaseOutputs { up_to_epoch: u64 },
    /// Call `Lease::renew(holder, term, now_ms, lease_ttl_ms)` and report the answer.
    RenewLease { term: u64 },
    /// Close the connection (the primary runs on; connect again after a pause).
    Close { error: ProtocolError },
    /// Stop the VM now, with this message: another replica may be live.
    Stop { error: ProtocolError },
}

#[derive(Debug)]
struct PrimaryLink {
    link: Link,
    nonce: Nonce,
    streaming: bool,
    /// The epoch the backup will hold once it has applied everything sent to it.
    chain_head: Option<u64>,
    /// The highest epoch the backup may acknowledge on this connection.
    ackable: Option<u64>,
    last_full_sent: Option<u64>,
}

#[derive(Debug)]
struct LeaseState {
    term: u64,
    /// Our own conservative view of the expiry: the time we *asked* plus the TTL.
    valid_until_ms: u64,
    oldest_renewal_asked_ms: Option<u64>,
    last_renewal_asked_ms: u64,
    last_error: String,
}

/// The primary's protocol state machine.
#[derive(Debug)]
pub struct Primary {
    config: PrimaryConfig,
    now_ms: u64,
    link: Option<PrimaryLink>,
    last_taken: Option<u64>,
    acked: Option<u64>,
    lease: LeaseState,
    stopped: Option<ProtocolError>,
}

impl Primary {
    /// A primary that holds the lease `grant` (acquire it before starting the VM).
    pub fn new(config: PrimaryConfig, grant: LeaseGrant) -> Self {
        assert!(
            (1..=MAX_PAYLOAD_BYTES as usize - CHUNK_OVERHEAD_BYTES).contains(&config.chunk_bytes),
            "chunk_bytes must be 1..={}",
            MAX_PAYLOAD_BYTES as usize - CHUNK_OVERHEAD_BYTES
        );
        assert!(config.lease_renew_interval_ms < config.lease_ttl_ms, "renew the lease more often than it expires");
        let lease = LeaseState {
            term: grant.term,
            valid_until_ms: grant.acquired_at_ms.saturating_add(config.lease_ttl_ms),
            oldest_renewal_asked_ms: None,
            last_renewal_asked_ms: grant.acquired_at_ms,
            last_error: "none".into(),
        };
        Primary {
            config,
            now_ms: grant.acquired_at_ms,
            link: None,
            last_taken: None,
            acked: None,
            lease,
            stopped: None,
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
                }
            }
            PrimaryEvent::CheckpointTaken { epoch, icount, kind, payload } => {
                self.on_checkpoint(epoch, icount, kind, payload, &mut actions)
            }
            PrimaryEvent::LeaseRenewal(answer) => self.on_lease_renewal(answer, &mut actions),
        }
        actions
    }

    /// The kind of checkpoint to take next: incremental only while a connected backup holds
    /// (or will hold) the previous epoch. While no backup is connected, incremental ones are
    /// taken (to keep the dirty log short) and dropped; a full one follows the next handshake.
    pub fn next_checkpoint_kind(&self) -> CheckpointKind {
        match &self.link {
            Some(pl) if pl.streaming => match (pl.chain_head, self.last_taken) {
                (Some(head), Some(last)) if head == last => CheckpointKind::Incremental,
                _ => CheckpointKind::Full,
            },
            _ => CheckpointKind::Incremental,
        }
    }

    /// Whether this primary may run the VM at `now_ms`: not stopped, and its lease not
    /// expired by its own reckoning.
    pub fn is_live(&self, now_ms: u64) -> bool {
        self.stopped.is_none() && now_ms < self.lease.valid_until_ms
    }

    /// The highest epoch the backup acknowledged: outputs up to it are released.
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

    pub fn lease_term(&self) -> u64 {
        self.lease.term
    }

    /// Why this primary stopped, once it has.
    pub fn stopped(&self) -> Option<&ProtocolError> {
        self.stopped.as_ref()
    }

    fn on_tick(&mut self, now_ms: u64, actions: &mut Vec<PrimaryAction>) {
        self.now_ms = self.now_ms.max(now_ms);
        let now = self.now_ms;
        if now >= self.lease.valid_until_ms {
            let last_error = self.lease.last_error.clone();
            return self.stop(ProtocolError::LeaseExpired { last_error }, actions);
        }
        if now >= self.lease.last_renewal_asked_ms + self.config.lease_renew_interval_ms {
            self.lease.last_renewal_asked_ms = now;
            self.lease.oldest_renewal_asked_ms.get_or_insert(now);
            actions.push(PrimaryAction::RenewLease { term: self.lease.term });
        }
        let Some(pl) = &mut self.link else { return };
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

    fn on_connected(&mut self, nonce: Nonce, actions: &mut Vec<PrimaryAction>) {
        let key = &self.config.key;
        let mut link = Link {
            encoder: Encoder::new(key.hello_key(Direction::PrimaryToBackup)),
            decoder: Decoder::new(key.hello_key(Direction::BackupToPrimary)),
            opened_ms: self.now_ms,
            last_heard_ms: self.now_ms,
            last_sent_ms: self.now_ms,
        };
        let hello = Message::Hello {
            protocol_version: PROTOCOL_VERSION,
            role: Role::Primary,
            config_digest: self.config.config_digest,
            nonce,
            run_id: self.config.run_id,
            term: self.lease.term,
        };
        actions.push(PrimaryAction::Send(link.frame(&hello, self.now_ms)));
        self.link =
            Some(PrimaryLink { link, nonce, streaming: false, chain_head: None, ackable: None, last_full_sent: None });
    }

    fn on_received(&mut self, bytes: &[u8], actions: &mut Vec<PrimaryAction>) {
        let Some(pl) = &mut self.link else { return };
        pl.link.decoder.push(bytes);
        loop {
            let Some(pl) = &mut self.link else { return };
            let result = match pl.link.next_message(self.now_ms) {
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
            Message::HelloAck { protocol_version, role, config_digest, nonce, primary_nonce, latest }
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
                pl.link.encoder.set_key(key.session_key(Direction::PrimaryToBackup, &pl.nonce, &nonce));
                pl.link.decoder.set_key(key.session_key(Direction::BackupToPrimary, &pl.nonce, &nonce));
                pl.streaming = true;
                // The backup's state continues our chain only if it is one of our own epochs.
                pl.chain_head = latest
                    .filter(|id| id.run_id == self.config.run_id && Some(id.epoch) <= self.last_taken)
                    .map(|id| id.epoch);
                pl.ackable = pl.chain_head;
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
                if Some(epoch) > self.acked {
                    self.acked = Some(epoch);
                    actions.push(PrimaryAction::ReleaseOutputs { up_to_epoch: epoch });
                }
                Ok(())
            }
            Message::NeedFull { epoch, .. } => {
                // A full checkpoint sent after the refused one already repairs the chain.
                if pl.last_full_sent.is_none_or(|full| full < epoch) {
                    pl.chain_head = None;
                }
                Ok(())
            }
            message => Err(ProtocolError::UnexpectedMessage { message: message.name(), context: "to a primary" }),
        }
    }

    fn on_checkpoint(
        &mut self,
        epoch: u64,
        icount: u64,
        kind: CheckpointKind,
        payload: &[u8],
        actions: &mut Vec<PrimaryAction>,
    ) {
        if let Some(last) = self.last_taken {
            assert_eq!(epoch, last + 1, "checkpoint epochs must go up by one");
        }
        self.last_taken = Some(epoch);
        let now = self.now_ms;
        let Some(pl) = self.link.as_mut().filter(|pl| pl.streaming) else { return };
        let base_epoch = match kind {
            CheckpointKind::Full => None,
            // An incremental checkpoint that does not continue the backup's chain is useless
            // to it: drop it; next_checkpoint_kind now says Full.
            CheckpointKind::Incremental if pl.chain_head.is_some_and(|head| head + 1 == epoch) => pl.chain_head,
            CheckpointKind::Incremental => return,
        };
        let total_bytes = payload.len() as u64;
        let begin = Message::CheckpointBegin { epoch, base_epoch, icount, total_bytes };
        actions.push(PrimaryAction::Send(pl.link.frame(&begin, now)));
        for (index, chunk) in payload.chunks(self.config.chunk_bytes).enumerate() {
            let offset = (index * self.config.chunk_bytes) as u64;
            let message = Message::CheckpointChunk { epoch, offset, bytes: chunk.to_vec() };
            actions.push(PrimaryAction::Send(pl.link.frame(&message, now)));
        }
        let digest = Sha256::digest(payload).into();
        actions.push(PrimaryAction::Send(pl.link.frame(&Message::CheckpointEnd { epoch, digest }, now)));
        pl.chain_head = Some(epoch);
        pl.ackable = Some(epoch);
        if base_epoch.is_none() {
            pl.last_full_sent = Some(epoch);
        }
    }

    fn on_lease_renewal(&mut self, answer: Result<RenewOutcome, &LeaseError>, actions: &mut Vec<PrimaryAction>) {
        let asked_ms = self.lease.oldest_renewal_asked_ms.take();
        match answer {
            Ok(RenewOutcome::Renewed(record)) => {
                if let Some(asked_ms) = asked_ms {
                    let until = asked_ms.saturating_add(self.config.lease_ttl_ms).min(record.expires_ms);
                    self.lease.valid_until_ms = self.lease.valid_until_ms.max(until);
                }
            }
            Ok(RenewOutcome::Lost(record)) => {
                let (holder, term) = record.map_or(("nobody".into(), 0), |r| (r.holder, r.term));
                let our_term = self.lease.term;
                self.stop(ProtocolError::LeaseLost { holder, term, our_term }, actions);
            }
            Err(error) => self.lease.last_error = error.to_string(),
        }
    }

    fn close(&mut self, error: ProtocolError, actions: &mut Vec<PrimaryAction>) {
        if let Some(mut pl) = self.link.take() {
            if worth_a_goodbye(&error) {
                actions.push(PrimaryAction::Send(pl.link.frame(&goodbye(&error), self.now_ms)));
            }
            actions.push(PrimaryAction::Close { error });
        }
    }

    fn stop(&mut self, error: ProtocolError, actions: &mut Vec<PrimaryAction>) {
        self.close(error.clone(), actions);
        actions.push(PrimaryAction::Stop { error: error.clone() });
        self.stopped = Some(error);
    }
}
