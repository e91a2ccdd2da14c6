//! The messages of the replication protocol and their payload encoding: little-endian
//! fields read with the workspace's one bounded reader (`bounded-reader`: every read checked
//! against what is left, every error naming the field and its offset), lengths capped, and no
//! trailing bytes allowed. A frame's type byte says which message its payload holds.

use bounded_reader::{ReadError, Reader};
use thiserror::Error;

use crate::wire::{Frame, Nonce, NONCE_BYTES};

/// The version of the protocol's messages and rules (the frame format has its own).
pub const PROTOCOL_VERSION: u16 = 3;
/// The longest reason a Goodbye may carry.
pub const MAX_REASON_BYTES: usize = 1024;

/// A digest of the VM's configuration (image, RAM size, devices): both sides must run the
/// same machine for a checkpoint to mean anything.
pub type ConfigDigest = [u8; 32];
/// SHA-256 of a checkpoint's payload.
pub type PayloadDigest = [u8; 32];

/// Which side a peer says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Backup,
}

/// A checkpoint's identity: the primary run that took it (chosen at random when a primary
/// starts) and its epoch. Epoch numbers alone would be ambiguous across primary restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CheckpointId {
    pub run_id: u64,
    pub epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Primary → backup, the first frame of a connection (under the hello key).
    /// `generation` is the ownership generation the primary holds.
    Hello { protocol_version: u16, role: Role, config_digest: ConfigDigest, nonce: Nonce, run_id: u64, generation: u64 },
    /// Backup → primary, the answer to Hello (under the hello key). `latest` is the checkpoint
    /// the backup's machine holds (or will, once its pending applies are done); `partial` the
    /// checkpoint it was receiving when the last connection broke, and how many of its bytes
    /// it holds, so that the primary resumes it instead of starting again.
    HelloAck {
        protocol_version: u16,
        role: Role,
        config_digest: ConfigDigest,
        nonce: Nonce,
        primary_nonce: Nonce,
        latest: Option<CheckpointId>,
        partial: Option<(CheckpointId, u64)>,
    },
    /// Either way, every heartbeat interval: "I am alive". `epoch` is the sender's latest.
    Heartbeat { now_ms: u64, epoch: u64 },
    /// Primary → backup: a checkpoint follows. `base_epoch` is None for a full checkpoint, or
    /// the epoch an incremental one applies on top of.
    CheckpointBegin { epoch: u64, base_epoch: Option<u64>, icount: u64, total_bytes: u64 },
    /// Primary → backup: the checkpoint of `epoch` the backup holds part of (its HelloAck said
    /// how much) continues at `offset`.
    CheckpointResume { epoch: u64, offset: u64 },
    /// Primary → backup: the payload bytes at `offset`; chunks come in order.
    CheckpointChunk { epoch: u64, offset: u64, bytes: Vec<u8> },
    /// Primary → backup: the checkpoint is whole; its payload hashes to `digest`.
    CheckpointEnd { epoch: u64, digest: PayloadDigest },
    /// Backup → primary: the checkpoint of `epoch` is applied (and so are all before it).
    Ack { epoch: u64 },
    /// Backup → primary: the incremental checkpoint of `epoch` does not apply on what this
    /// backup holds (`latest`), so it was dropped; send a full one.
    NeedFull { epoch: u64, latest: Option<CheckpointId> },
    /// Primary → backup: once the backup holds epoch `from_epoch` of this run (or later), its
    /// state covers every output the primary released under `generation`, so it may take over
    /// by swapping that generation. Sent when the primary becomes protected.
    Protected { generation: u64, from_epoch: u64 },
    /// Primary → backup: the VM ended with this exit code; the backup must not take over.
    End { exit_code: u32 },
    /// Primary → backup: replication stopped (`ftvm ctl unprotect`); the primary has already
    /// made this backup's state stale, and the backup stands down.
    StandDown,
    /// Either way: the sender closes the connection, for this reason.
    Goodbye { reason: String },
    /// Either way, after the handshake: frame `from_seq` arrived damaged and was skipped, and
    /// so were the frames after it; send them all again, as they were (go-back-N, see
    /// [`crate::wire`]). Handled by the link itself, never shown to the protocol's rules.
    Resend { from_seq: u64 },
    /// Primary → backup, live migration (`ftvm ctl migrate`): the primary is paused, its final
    /// state is the acknowledged checkpoint of `epoch`, and every output it made has left.
    /// Take the VM over by swapping `generation` (the one that state counts for), then answer
    /// `SwitchedOver`. `paused_at_unix_us`: when the guest paused, on the primary's clock (for the
    /// backup's downtime figure: exact on one host, off by the clocks' offset across hosts).
    Switchover { epoch: u64, generation: u64, paused_at_unix_us: u64 },
    /// Backup → primary: the record is at `generation`, owned by this backup, which goes live
    /// once the primary confirms (`HandedOver`) that it never runs the VM again.
    SwitchedOver { generation: u64 },
    /// Primary → backup: the primary has stopped for good; the VM is the backup's.
    HandedOver,
}

/// A frame whose payload is not a well-formed message. The frame was authenticated, so this
/// means a bug or an incompatible peer, never line noise.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MessageError {
    #[error("frame type {frame_type} is not a message this ftvm knows")]
    UnknownType { frame_type: u8 },
    /// A field ends early, a presence byte is neither 0 nor 1, or bytes follow the last field.
    #[error("a {message} message is malformed: {problem}")]
    Malformed { message: &'static str, problem: ReadError },
    #[error("a {message} message has an invalid {field} ({value})")]
    InvalidField { message: &'static str, field: &'static str, value: u64 },
    #[error("a Goodbye reason of {length} bytes is longer than {MAX_REASON_BYTES}")]
    ReasonTooLong { length: usize },
}

mod frame_type {
    pub const HELLO: u8 = 1;
    pub const HELLO_ACK: u8 = 2;
    pub const HEARTBEAT: u8 = 3;
    pub const CHECKPOINT_BEGIN: u8 = 4;
    pub const CHECKPOINT_CHUNK: u8 = 5;
    pub const CHECKPOINT_END: u8 = 6;
    pub const ACK: u8 = 7;
    pub const NEED_FULL: u8 = 8;
    pub const GOODBYE: u8 = 9;
    pub const CHECKPOINT_RESUME: u8 = 10;
    pub const PROTECTED: u8 = 11;
    pub const END: u8 = 12;
    pub const STAND_DOWN: u8 = 13;
    pub const RESEND: u8 = 14;
    // Live migration (32..=39; lockstep's messages take other numbers).
    pub const SWITCHOVER: u8 = 32;
    pub const SWITCHED_OVER: u8 = 33;
    pub const HANDED_OVER: u8 = 34;
}

impl Message {
    /// The message's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::HelloAck { .. } => "HelloAck",
            Message::Heartbeat { .. } => "Heartbeat",
            Message::CheckpointBegin { .. } => "CheckpointBegin",
            Message::CheckpointChunk { .. } => "CheckpointChunk",
            Message::CheckpointEnd { .. } => "CheckpointEnd",
            Message::Ack { .. } => "Ack",
            Message::NeedFull { .. } => "NeedFull",
            Message::Goodbye { .. } => "Goodbye",
            Message::CheckpointResume { .. } => "CheckpointResume",
            Message::Protected { .. } => "Protected",
            Message::End { .. } => "End",
            Message::StandDown => "StandDown",
            Message::Resend { .. } => "Resend",
            Message::Switchover { .. } => "Switchover",
            Message::SwitchedOver { .. } => "SwitchedOver",
            Message::HandedOver => "HandedOver",
        }
    }

    /// The frame type and payload of this message.
    pub fn encode(&self) -> (u8, Vec<u8>) {
        let mut w = Vec::new();
        let frame_type = match self {
            Message::Hello { protocol_version, role, config_digest, nonce, run_id, generation } => {
                w.extend_from_slice(&protocol_version.to_le_bytes());
                w.push(role_byte(*role));
                w.extend_from_slice(config_digest);
                w.extend_from_slice(nonce);
                w.extend_from_slice(&run_id.to_le_bytes());
                w.extend_from_slice(&generation.to_le_bytes());
                frame_type::HELLO
            }
            Message::HelloAck { protocol_version, role, config_digest, nonce, primary_nonce, latest, partial } => {
                w.extend_from_slice(&protocol_version.to_le_bytes());
                w.push(role_byte(*role));
                w.extend_from_slice(config_digest);
                w.extend_from_slice(nonce);
                w.extend_from_slice(primary_nonce);
                put_checkpoint_id(&mut w, *latest);
                put_checkpoint_id(&mut w, partial.map(|(id, _)| id));
                if let Some((_, offset)) = partial {
                    w.extend_from_slice(&offset.to_le_bytes());
                }
                frame_type::HELLO_ACK
            }
            Message::CheckpointResume { epoch, offset } => {
                w.extend_from_slice(&epoch.to_le_bytes());
                w.extend_from_slice(&offset.to_le_bytes());
                frame_type::CHECKPOINT_RESUME
            }
            Message::Protected { generation, from_epoch } => {
                w.extend_from_slice(&generation.to_le_bytes());
                w.extend_from_slice(&from_epoch.to_le_bytes());
                frame_type::PROTECTED
            }
            Message::End { exit_code } => {
                w.extend_from_slice(&exit_code.to_le_bytes());
                frame_type::END
            }
            Message::StandDown => frame_type::STAND_DOWN,
            Message::Resend { from_seq } => {
                w.extend_from_slice(&from_seq.to_le_bytes());
                frame_type::RESEND
            }
            Message::Switchover { epoch, generation, paused_at_unix_us } => {
                w.extend_from_slice(&epoch.to_le_bytes());
                w.extend_from_slice(&generation.to_le_bytes());
                w.extend_from_slice(&paused_at_unix_us.to_le_bytes());
                frame_type::SWITCHOVER
            }
            Message::SwitchedOver { generation } => {
                w.extend_from_slice(&generation.to_le_bytes());
                frame_type::SWITCHED_OVER
            }
            Message::HandedOver => frame_type::HANDED_OVER,
            Message::Heartbeat { now_ms, epoch } => {
                w.extend_from_slice(&now_ms.to_le_bytes());
                w.extend_from_slice(&epoch.to_le_bytes());
                frame_type::HEARTBEAT
            }
            Message::CheckpointBegin { epoch, base_epoch, icount, total_bytes } => {
                w.extend_from_slice(&epoch.to_le_bytes());
                put_option_u64(&mut w, *base_epoch);
                w.extend_from_slice(&icount.to_le_bytes());
                w.extend_from_slice(&total_bytes.to_le_bytes());
                frame_type::CHECKPOINT_BEGIN
            }
            Message::CheckpointChunk { epoch, offset, bytes } => {
                w.reserve(16 + bytes.len());
                w.extend_from_slice(&epoch.to_le_bytes());
                w.extend_from_slice(&offset.to_le_bytes());
                w.extend_from_slice(bytes);
                frame_type::CHECKPOINT_CHUNK
            }
            Message::CheckpointEnd { epoch, digest } => {
                w.extend_from_slice(&epoch.to_le_bytes());
                w.extend_from_slice(digest);
                frame_type::CHECKPOINT_END
            }
            Message::Ack { epoch } => {
                w.extend_from_slice(&epoch.to_le_bytes());
                frame_type::ACK
            }
            Message::NeedFull { epoch, latest } => {
                w.extend_from_slice(&epoch.to_le_bytes());
                put_checkpoint_id(&mut w, *latest);
                frame_type::NEED_FULL
            }
            Message::Goodbye { reason } => {
                let reason = truncate_utf8(reason, MAX_REASON_BYTES);
                w.extend_from_slice(&(reason.len() as u16).to_le_bytes());
                w.extend_from_slice(reason.as_bytes());
                frame_type::GOODBYE
            }
        };
        (frame_type, w)
    }

    /// The message a verified frame holds.
    pub fn decode(frame: &Frame) -> Result<Message, MessageError> {
        let name = match frame.frame_type {
            frame_type::HELLO => "Hello",
            frame_type::HELLO_ACK => "HelloAck",
            frame_type::HEARTBEAT => "Heartbeat",
            frame_type::CHECKPOINT_BEGIN => "CheckpointBegin",
            frame_type::CHECKPOINT_CHUNK => "CheckpointChunk",
            frame_type::CHECKPOINT_END => "CheckpointEnd",
            frame_type::ACK => "Ack",
            frame_type::NEED_FULL => "NeedFull",
            frame_type::GOODBYE => "Goodbye",
            frame_type::CHECKPOINT_RESUME => "CheckpointResume",
            frame_type::PROTECTED => "Protected",
            frame_type::END => "End",
            frame_type::STAND_DOWN => "StandDown",
            frame_type::RESEND => "Resend",
            frame_type::SWITCHOVER => "Switchover",
            frame_type::SWITCHED_OVER => "SwitchedOver",
            frame_type::HANDED_OVER => "HandedOver",
            frame_type => return Err(MessageError::UnknownType { frame_type }),
        };
        let malformed = |problem| MessageError::Malformed { message: name, problem };
        let mut r = Reader::new(&frame.payload);
        let message = Self::decode_fields(frame.frame_type, name, &mut r).map_err(|e| match e {
            Decode::Read(problem) => malformed(problem),
            Decode::Message(e) => e,
        })?;
        r.finish().map_err(malformed)?;
        Ok(message)
    }

    fn decode_fields(frame_type: u8, name: &'static str, r: &mut Reader<'_>) -> Result<Message, Decode> {
        Ok(match frame_type {
            frame_type::HELLO => Message::Hello {
                protocol_version: r.u16("protocol version")?,
                role: role(r, name)?,
                config_digest: r.array("configuration digest")?,
                nonce: r.array::<NONCE_BYTES>("nonce")?,
                run_id: r.u64("run id")?,
                generation: r.u64("generation")?,
            },
            frame_type::HELLO_ACK => Message::HelloAck {
                protocol_version: r.u16("protocol version")?,
                role: role(r, name)?,
                config_digest: r.array("configuration digest")?,
                nonce: r.array("nonce")?,
                primary_nonce: r.array("primary nonce")?,
                latest: checkpoint_id(r, "latest")?,
                partial: match checkpoint_id(r, "partial")? {
                    None => None,
                    Some(id) => Some((id, r.u64("partial offset")?)),
                },
            },
            frame_type::CHECKPOINT_RESUME => {
                Message::CheckpointResume { epoch: r.u64("epoch")?, offset: r.u64("offset")? }
            }
            frame_type::PROTECTED => {
                Message::Protected { generation: r.u64("generation")?, from_epoch: r.u64("from epoch")? }
            }
            frame_type::END => Message::End { exit_code: r.u32("exit code")? },
            frame_type::STAND_DOWN => Message::StandDown,
            frame_type::RESEND => Message::Resend { from_seq: r.u64("from seq")? },
            frame_type::SWITCHOVER => Message::Switchover {
                epoch: r.u64("epoch")?,
                generation: r.u64("generation")?,
                paused_at_unix_us: r.u64("pause time")?,
            },
            frame_type::SWITCHED_OVER => Message::SwitchedOver { generation: r.u64("generation")? },
            frame_type::HANDED_OVER => Message::HandedOver,
            frame_type::HEARTBEAT => Message::Heartbeat { now_ms: r.u64("time")?, epoch: r.u64("epoch")? },
            frame_type::CHECKPOINT_BEGIN => Message::CheckpointBegin {
                epoch: r.u64("epoch")?,
                base_epoch: option_u64(r, "base epoch")?,
                icount: r.u64("icount")?,
                total_bytes: r.u64("total bytes")?,
            },
            frame_type::CHECKPOINT_CHUNK => {
                Message::CheckpointChunk { epoch: r.u64("epoch")?, offset: r.u64("offset")?, bytes: r.rest().to_vec() }
            }
            frame_type::CHECKPOINT_END => {
                Message::CheckpointEnd { epoch: r.u64("epoch")?, digest: r.array("payload digest")? }
            }
            frame_type::ACK => Message::Ack { epoch: r.u64("epoch")? },
            frame_type::NEED_FULL => Message::NeedFull { epoch: r.u64("epoch")?, latest: checkpoint_id(r, "latest")? },
            frame_type::GOODBYE => {
                let length = usize::from(r.u16("reason length")?);
                if length > MAX_REASON_BYTES {
                    return Err(Decode::Message(MessageError::ReasonTooLong { length }));
                }
                // A reason is only shown to a person: invalid UTF-8 is replaced, not refused.
                Message::Goodbye { reason: String::from_utf8_lossy(r.take(length, "reason")?).into_owned() }
            }
            _ => unreachable!("frame type checked by the caller"),
        })
    }
}

/// Why decoding a message's fields stopped.
enum Decode {
    Read(ReadError),
    Message(MessageError),
}

impl From<ReadError> for Decode {
    fn from(e: ReadError) -> Decode {
        Decode::Read(e)
    }
}

fn option_u64(r: &mut Reader<'_>, field: &'static str) -> Result<Option<u64>, Decode> {
    Ok(match r.bool(field)? {
        false => None,
        true => Some(r.u64(field)?),
    })
}

fn checkpoint_id(r: &mut Reader<'_>, field: &'static str) -> Result<Option<CheckpointId>, Decode> {
    Ok(match r.bool(field)? {
        false => None,
        true => Some(CheckpointId { run_id: r.u64(field)?, epoch: r.u64(field)? }),
    })
}

fn role(r: &mut Reader<'_>, message: &'static str) -> Result<Role, Decode> {
    match r.u8("role")? {
        1 => Ok(Role::Primary),
        2 => Ok(Role::Backup),
        value => Err(Decode::Message(MessageError::InvalidField { message, field: "role", value: value.into() })),
    }
}

fn role_byte(role: Role) -> u8 {
    match role {
        Role::Primary => 1,
        Role::Backup => 2,
    }
}

fn put_option_u64(w: &mut Vec<u8>, value: Option<u64>) {
    match value {
        None => w.push(0),
        Some(v) => {
            w.push(1);
            w.extend_from_slice(&v.to_le_bytes());
        }
    }
}

fn put_checkpoint_id(w: &mut Vec<u8>, id: Option<CheckpointId>) {
    match id {
        None => w.push(0),
        Some(id) => {
            w.push(1);
            w.extend_from_slice(&id.run_id.to_le_bytes());
            w.extend_from_slice(&id.epoch.to_le_bytes());
        }
    }
}

fn truncate_utf8(text: &str, max_bytes: usize) -> &str {
    let mut end = text.len().min(max_bytes);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn samples() -> Vec<Message> {
        vec![
            Message::Hello {
                protocol_version: 1,
                role: Role::Primary,
                config_digest: [3; 32],
                nonce: [4; NONCE_BYTES],
                run_id: 5,
                generation: 6,
            },
            Message::HelloAck {
                protocol_version: 1,
                role: Role::Backup,
                config_digest: [3; 32],
                nonce: [7; NONCE_BYTES],
                primary_nonce: [4; NONCE_BYTES],
                latest: Some(CheckpointId { run_id: 5, epoch: 9 }),
                partial: Some((CheckpointId { run_id: 5, epoch: 10 }, 4096)),
            },
            Message::HelloAck {
                protocol_version: 1,
                role: Role::Backup,
                config_digest: [3; 32],
                nonce: [7; NONCE_BYTES],
                primary_nonce: [4; NONCE_BYTES],
                latest: None,
                partial: None,
            },
            Message::Heartbeat { now_ms: 1234, epoch: 8 },
            Message::CheckpointBegin { epoch: 2, base_epoch: Some(1), icount: 99, total_bytes: 10 },
            Message::CheckpointBegin { epoch: 1, base_epoch: None, icount: 9, total_bytes: 0 },
            Message::CheckpointChunk { epoch: 2, offset: 4, bytes: vec![1, 2, 3] },
            Message::CheckpointEnd { epoch: 2, digest: [8; 32] },
            Message::Ack { epoch: 2 },
            Message::NeedFull { epoch: 3, latest: Some(CheckpointId { run_id: 5, epoch: 1 }) },
            Message::NeedFull { epoch: 3, latest: None },
            Message::CheckpointResume { epoch: 10, offset: 4096 },
            Message::Protected { generation: 7, from_epoch: 12 },
            Message::End { exit_code: 3 },
            Message::StandDown,
            Message::Resend { from_seq: 41 },
            Message::Switchover { epoch: 12, generation: 3, paused_at_unix_us: 1_700_000_000_000_870 },
            Message::SwitchedOver { generation: 4 },
            Message::HandedOver,
            Message::Goodbye { reason: "configuration mismatch".into() },
        ]
    }

    fn frame_of(message: &Message) -> Frame {
        let (frame_type, payload) = message.encode();
        Frame { frame_type, seq: 0, payload }
    }

    #[test]
    fn every_message_round_trips() {
        for message in samples() {
            assert_eq!(Message::decode(&frame_of(&message)), Ok(message));
        }
    }

    #[test]
    fn every_proper_prefix_of_a_fixed_size_message_is_short() {
        for message in samples() {
            if matches!(message, Message::CheckpointChunk { .. }) {
                continue; // its bytes run to the end of the payload
            }
            let frame = frame_of(&message);
            for cut in 0..frame.payload.len() {
                let short = Frame { payload: frame.payload[..cut].to_vec(), ..frame.clone() };
                let truncated = matches!(
                    Message::decode(&short),
                    Err(MessageError::Malformed { problem: ReadError::Truncated { .. }, .. })
                );
                assert!(truncated, "{message:?} cut at {cut}");
            }
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut frame = frame_of(&Message::Ack { epoch: 1 });
        frame.payload.push(0);
        let error = Message::decode(&frame).unwrap_err();
        assert_eq!(error.to_string(), "a Ack message is malformed: 1 unexpected bytes at byte 8, after the last field");
    }

    #[test]
    fn unknown_types_and_invalid_tags_are_refused() {
        assert_eq!(
            Message::decode(&Frame { frame_type: 200, seq: 0, payload: vec![] }),
            Err(MessageError::UnknownType { frame_type: 200 })
        );
        let mut frame = frame_of(&Message::NeedFull { epoch: 1, latest: None });
        frame.payload[8] = 2;
        let error = Message::decode(&frame).unwrap_err();
        assert_eq!(error.to_string(), "a NeedFull message is malformed: latest at byte 8 is 2, not 0 or 1");
        let mut frame = frame_of(&Message::Hello {
            protocol_version: 1,
            role: Role::Primary,
            config_digest: [0; 32],
            nonce: [0; NONCE_BYTES],
            run_id: 0,
            generation: 0,
        });
        frame.payload[2] = 9;
        assert_eq!(
            Message::decode(&frame),
            Err(MessageError::InvalidField { message: "Hello", field: "role", value: 9 })
        );
    }

    #[test]
    fn a_long_goodbye_reason_is_cut_on_a_character_boundary() {
        let reason = "é".repeat(MAX_REASON_BYTES);
        let decoded = Message::decode(&frame_of(&Message::Goodbye { reason })).unwrap();
        let Message::Goodbye { reason } = decoded else { panic!("not a Goodbye") };
        assert_eq!(reason.len(), MAX_REASON_BYTES);
    }

    #[test]
    fn an_overlong_goodbye_length_is_refused() {
        let mut payload = ((MAX_REASON_BYTES + 1) as u16).to_le_bytes().to_vec();
        payload.extend(vec![b'a'; MAX_REASON_BYTES + 1]);
        let frame = Frame { frame_type: frame_type::GOODBYE, seq: 0, payload };
        assert_eq!(Message::decode(&frame), Err(MessageError::ReasonTooLong { length: MAX_REASON_BYTES + 1 }));
    }
}
