//! The protocol core: [`Primary`] and [`Backup`] are pure state machines. Each takes an event
//! (bytes received, a clock tick, a checkpoint taken, a lease answer...) through `step` and
//! returns the actions the caller must carry out, in order. They do no I/O, read no clock,
//! start no thread and draw no random number: the caller passes time and nonces in.

mod backup;
mod primary;
#[cfg(test)]
mod tests;

pub use backup::{
    Backup, BackupAction, BackupConfig, BackupEvent, BackupKept, BackupStatus, ClaimRight, ConnId, Handover,
};
pub use primary::{
    BackupLossPolicy, CheckpointKind, Primary, PrimaryAction, PrimaryConfig, PrimaryEvent, PrimaryStatus, Protection,
    ResumeRun,
};

/// The answer of the ownership store to a compare-and-swap of a VM's record: the caller
/// (which owns the store) reports it back to the state machine that asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwapAnswer {
    /// The record now holds `generation`, owned by this replica.
    Swapped { generation: u64 },
    /// The record was not at the expected generation: it holds `generation` (None: no record),
    /// owned by `owner`; `ended` when the VM ended with that exit code.
    Conflict { generation: Option<u64>, owner: String, ended: Option<u32> },
}

/// The ownership record as read (for a primary's periodic check that it still owns the VM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordView {
    pub generation: u64,
    pub owner: String,
    pub ended: Option<u32>,
}

use thiserror::Error;

use crate::messages::{ConfigDigest, Message, MessageError};
use crate::wire::{Decoded, Decoder, Encoder, FrameKey, WireError, RESEND_WINDOW_BYTES};

/// Why a connection was closed, or why a replica must stop. Every message says what happened
/// and, where there is one, what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtocolError {
    #[error("bad frame from the peer: {0}")]
    Wire(#[from] WireError),
    #[error("malformed message from the peer (a bug or an incompatible ftvm): {0}")]
    Message(#[from] MessageError),
    #[error(
        "protocol version mismatch: this side speaks version {ours}, the peer version {theirs}; \
         run the same ftvm release on both sides"
    )]
    ProtocolVersionMismatch { ours: u16, theirs: u16 },
    #[error(
        "VM configuration mismatch: this side runs configuration {}, the peer {}; start both \
         with the same image, RAM size and devices",
        hex(ours),
        hex(theirs)
    )]
    ConfigMismatch { ours: ConfigDigest, theirs: ConfigDigest },
    #[error("the peer says it is a {theirs}, but a {expected} was expected: is the address right?")]
    RoleMismatch { expected: &'static str, theirs: &'static str },
    #[error("the peer's HelloAck answers another Hello (a replayed handshake?)")]
    HandshakeReplay,
    #[error(
        "a primary of generation {theirs} connected, but this backup has seen generation {seen}: \
         that primary has been superseded and must stop"
    )]
    StaleGeneration { seen: u64, theirs: u64 },
    #[error("another connection from the primary replaced this one")]
    ConnectionReplaced,
    #[error("too many connections are waiting for their handshake; the oldest was dropped")]
    TooManyHandshakes,
    #[error("the peer sent {message} {context}")]
    UnexpectedMessage { message: &'static str, context: &'static str },
    #[error("checkpoint {epoch} announces {total_bytes} bytes, more than this backup's limit of {limit} bytes")]
    CheckpointTooLarge { epoch: u64, total_bytes: u64, limit: u64 },
    #[error("checkpoint {epoch} arrived malformed: {detail}")]
    MalformedCheckpoint { epoch: u64, detail: String },
    #[error("checkpoint {epoch} does not match its digest: not applied")]
    CheckpointDigestMismatch { epoch: u64 },
    #[error("epoch {got} does not follow epoch {latest}: epochs must increase")]
    EpochNotIncreasing { latest: u64, got: u64 },
    #[error("the backup acknowledged epoch {epoch}, which was never sent to it (latest sent: {sent:?})")]
    AckOfUnsentEpoch { epoch: u64, sent: Option<u64> },
    #[error("the backup is {queued} checkpoints behind, more than its limit: it applies too slowly")]
    BackupOverloaded { queued: usize },
    #[error("no handshake within {waited_ms} ms")]
    HandshakeTimeout { waited_ms: u64 },
    #[error("nothing heard from the peer for {silent_ms} ms")]
    PeerSilent { silent_ms: u64 },
    #[error("the peer closed the connection: {reason}")]
    PeerClosed { reason: String },
    #[error("the connection was lost")]
    ConnectionLost,
    #[error("applying checkpoint {epoch} failed: {reason}; this backup waits for a full checkpoint")]
    ApplyFailed { epoch: u64, reason: String },
    #[error("the backup's machine no longer holds the primary's state ({reason}); it waits for a full checkpoint")]
    StateLost { reason: String },
    #[error(
        "this replica no longer owns the VM: the ownership record is at generation {generation:?}, \
         owned by {owner} (this replica held generation {ours}); another replica may be live, so this one stops"
    )]
    OwnershipLost { generation: Option<u64>, owner: String, ours: u64 },
    #[error("the VM ended with exit code {exit_code}")]
    VmEnded { exit_code: u32 },
    #[error("this replica has taken over and no longer accepts a primary")]
    AlreadyLive,
    #[error("replication was stopped on the primary (unprotect): the VM runs on without a backup")]
    Detached,
    #[error("the primary stopped replicating to this backup (unprotect): it stands down")]
    StoodDown,
    #[error("this primary has stopped: {0}")]
    Stopped(Box<ProtocolError>),
    /// Live migration: the backup owns the VM now (the switchover is done, or the backup
    /// moved the record past it): this replica never runs it again.
    #[error("the VM was handed over to the destination, which owns it at generation {generation}")]
    HandedOver { generation: u64 },
    /// Live migration: the switchover was called off before the backup took the record.
    #[error("the switchover was called off: {reason}")]
    SwitchoverCalledOff { reason: String },
    /// Live migration, the destination: the source took the VM back before handing it over.
    #[error("the source took the VM back (generation {generation:?}, owned by {owner}): the migration was called off")]
    TakenBack { generation: Option<u64>, owner: String },
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The per-connection codec both roles share.
#[derive(Debug, Clone)]
struct Link {
    encoder: Encoder,
    decoder: Decoder,
    opened_ms: u64,
    last_heard_ms: u64,
    last_sent_ms: u64,
    /// A frame was decoded since the last tick. The caller may feed many queued frames
    /// between ticks (after a long apply, say) while the state machine's clock stands still;
    /// the next tick then counts them as heard at its own time.
    heard_since_tick: bool,
    /// Past the handshake: frames are kept for resending and damaged ones asked for again.
    secured: bool,
    /// The last request to resend: from which frame, when, and how long to wait before asking
    /// again (the request itself may arrive damaged while the peer waits for a resend too).
    resend_asked: Option<ResendAsked>,
}

#[derive(Debug, Clone, Copy)]
struct ResendAsked {
    seq: u64,
    at_ms: u64,
    wait_ms: u64,
}

/// A request to resend that brought nothing is repeated this much later, then twice as late
/// each time, up to [`RESEND_RETRY_MAX_MS`]. Copies that come twice are dropped unread.
const RESEND_RETRY_FIRST_MS: u64 = 20;
const RESEND_RETRY_MAX_MS: u64 = 320;

/// What the links of a replica repaired in place, over its lifetime.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Repairs {
    /// Frames of the peer that arrived damaged, each asked for again.
    damaged_frames: u64,
    /// The peer's requests to resend, served.
    resends_served: u64,
}

impl Link {
    fn new(encoder: Encoder, decoder: Decoder, now_ms: u64) -> Link {
        Link {
            encoder,
            decoder,
            opened_ms: now_ms,
            last_heard_ms: now_ms,
            last_sent_ms: now_ms,
            heard_since_tick: false,
            secured: false,
            resend_asked: None,
        }
    }

    /// The handshake is done: switch to the session keys, and from now on keep what is sent
    /// for resending and ask for what arrives damaged (see [`crate::wire`]).
    fn secure(&mut self, send_key: FrameKey, receive_key: FrameKey) {
        self.encoder.set_key(send_key);
        self.decoder.set_key(receive_key);
        self.encoder.keep_for_resend(RESEND_WINDOW_BYTES);
        self.decoder.recover_damaged_frames(RESEND_WINDOW_BYTES);
        self.secured = true;
    }

    /// Encodes `message` into the next frame. Messages always fit: chunk sizes are bounded
    /// by the configuration and every other message is small.
    fn frame(&mut self, message: &Message, now_ms: u64) -> Vec<u8> {
        let (frame_type, payload) = message.encode();
        self.last_sent_ms = now_ms;
        self.encoder.encode(frame_type, &payload).expect("a message always fits in a frame")
    }

    /// At a tick: frames decoded since the last one count as heard now.
    fn tick(&mut self, now_ms: u64) -> bool {
        let heard = std::mem::take(&mut self.heard_since_tick);
        if heard {
            self.last_heard_ms = self.last_heard_ms.max(now_ms);
        }
        heard
    }

    fn heard(&mut self, now_ms: u64) {
        self.last_heard_ms = now_ms;
        self.heard_since_tick = true;
    }

    fn ask_resend(&mut self, seq: u64, wait_ms: u64, now_ms: u64, sends: &mut Vec<Vec<u8>>) {
        sends.push(self.frame(&Message::Resend { from_seq: seq }, now_ms));
        self.resend_asked = Some(ResendAsked { seq, at_ms: now_ms, wait_ms });
    }

    fn serve_resend(
        &mut self,
        from_seq: u64,
        now_ms: u64,
        sends: &mut Vec<Vec<u8>>,
        repairs: &mut Repairs,
    ) -> Result<(), ProtocolError> {
        repairs.resends_served += 1;
        sends.extend(self.encoder.resend_from(from_seq)?);
        self.last_sent_ms = now_ms;
        Ok(())
    }

    /// At a tick: ask again for a resend that has not come.
    fn retry_resend(&mut self, now_ms: u64) -> Option<Vec<u8>> {
        let asked = self.resend_asked?;
        if self.decoder.awaiting_resend() != Some(asked.seq) {
            self.resend_asked = None;
            return None;
        }
        if now_ms < asked.at_ms + asked.wait_ms {
            return None;
        }
        let mut sends = Vec::new();
        self.ask_resend(asked.seq, (asked.wait_ms * 2).min(RESEND_RETRY_MAX_MS), now_ms, &mut sends);
        sends.pop()
    }

    /// The next whole message received, if any. The link repairs damage itself: a frame
    /// that arrived damaged is asked for again, and the peer's requests to resend are served,
    /// with the frames to write in `sends` (in order, before anything the message leads to).
    fn next_message(
        &mut self,
        now_ms: u64,
        sends: &mut Vec<Vec<u8>>,
        repairs: &mut Repairs,
    ) -> Result<Option<Message>, ProtocolError> {
        loop {
            match self.decoder.next_decoded()? {
                None => return Ok(None),
                Some(Decoded::Damaged { seq, .. }) => {
                    repairs.damaged_frames += 1;
                    self.ask_resend(seq, RESEND_RETRY_FIRST_MS, now_ms, sends);
                }
                Some(Decoded::Ahead(frame)) => {
                    // Authentic: a sign of life. A request to resend is served now (it is
                    // served again when it comes in its turn; the copies are dropped).
                    self.heard(now_ms);
                    if let Ok(Message::Resend { from_seq }) = Message::decode(&frame) {
                        self.serve_resend(from_seq, now_ms, sends, repairs)?;
                    }
                }
                Some(Decoded::Frame(frame)) => {
                    self.heard(now_ms);
                    if self.decoder.awaiting_resend().is_none() {
                        self.resend_asked = None;
                    }
                    match Message::decode(&frame)? {
                        Message::Resend { from_seq } if self.secured => {
                            self.serve_resend(from_seq, now_ms, sends, repairs)?
                        }
                        message => return Ok(Some(message)),
                    }
                }
            }
        }
    }
}

/// The Goodbye that tells the peer why this side closes (best effort: it may never arrive).
fn goodbye(error: &ProtocolError) -> Message {
    Message::Goodbye { reason: error.to_string() }
}

/// Whether to bother telling the peer: not when the peer left or cannot read us anyway.
fn worth_a_goodbye(error: &ProtocolError) -> bool {
    !matches!(
        error,
        ProtocolError::PeerClosed { .. }
            | ProtocolError::ConnectionLost
            | ProtocolError::Detached
            | ProtocolError::StoodDown
            | ProtocolError::HandedOver { .. }
            | ProtocolError::Wire(WireError::Truncated { .. })
    )
}
