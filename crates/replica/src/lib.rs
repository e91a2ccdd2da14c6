//! ftvm's checkpoint-replication core (DESIGN.md §5): the frame format, the messages, the
//! primary's and the backup's protocol state machines, output commit, and the takeover lease.
//!
//! Nothing here does I/O except [`FileLease`]. [`Primary`] and [`Backup`] are pure state
//! machines in the manner of raft-rs's `RawNode`: the caller feeds events (`step`) and carries
//! out the actions returned, in order. Sockets, threads, clocks, random nonces and the machine
//! live with the caller; this is what lets `tests/simulation.rs` drive both sides through
//! seeded faults.
//!
//! # Roles and connection
//!
//! The backup listens, the primary connects. On every new connection the caller passes fresh
//! random bytes (`Connected { nonce }`); bytes read go in as `Received(&[u8])` cut anywhere,
//! and the end of the stream as `Disconnected`. `Send(bytes)` actions are written in order.
//! `Close { error }` means: close this connection and report `error` (the primary connects
//! again after a pause; the backup keeps listening). Feed `Tick { now_ms }` every few ms.
//!
//! # Frames ([`wire`])
//!
//! `"FTVR" | version u16 | type u8 | flags u8 | seq u64 | length u32 | (nonce) | ciphertext | tag | CRC32C`,
//! little-endian (wire version 2). Every payload is sealed with ChaCha20-Poly1305, the header
//! as associated data; the CRC32C covers all before it, so corruption in transit
//! (*BadChecksum*) and forgery (*BadAuthentication*, *WrongKey*) stay distinct. The length is
//! capped at [`wire::MAX_PAYLOAD_BYTES`] (at [`wire::MAX_FIRST_PAYLOAD_BYTES`] for a
//! connection's first, not yet authenticated frame) before anything is allocated. Sequence
//! numbers start at 0 per connection and direction and rise by one. The keys are derived from
//! the pre-shared key: for each side's first frame (Hello, HelloAck) from the key and the
//! direction, with a synthetic nonce carried in the frame since that key serves every
//! connection; for all later frames also from both sides' nonces, with the nonce taken from
//! the direction and sequence number, so no nonce repeats under a key, a frame recorded on
//! one connection fails on any other, and none can be reflected back.
//!
//! # Message flow
//!
//! ```text
//!   primary                                   backup
//!   Hello{version, config digest, nonce, run id, lease term}  ──►  checks all four
//!        ◄──  HelloAck{version, digest, nonce, echo of primary nonce, latest checkpoint id}
//!   (both switch to session keys)
//!   every epoch N:
//!   CheckpointBegin{N, base: None | Some(N-1), icount, total bytes}  ──►
//!   CheckpointChunk{N, offset, bytes} ...                             ──►  reassembled
//!   CheckpointEnd{N, SHA-256 of payload}                              ──►  digest checked
//!                                                 ApplyCheckpoint → machine → CheckpointApplied
//!        ◄──  Ack{N}
//!   ReleaseOutputs{up_to_epoch: N}
//!   Heartbeat{now, epoch} both ways every heartbeat interval; NeedFull; Goodbye{reason}
//! ```
//!
//! # Epochs and the checkpoint chain
//!
//! Epochs go up by one. A checkpoint is *full* (the whole machine) or *incremental* (what
//! changed since the epoch before: `base = N-1`). A backup applies an incremental only on top
//! of exactly its base; anything else it skips and answers `NeedFull`. The primary tracks what
//! the backup will hold and asks the caller, through [`Primary::next_checkpoint_kind`], for a
//! full checkpoint whenever the chain is broken: the first checkpoint on a connection
//! (unless the backup's HelloAck reports it holds this run's latest epoch), after an epoch
//! taken while disconnected, after `NeedFull`. An incremental taken against that advice is
//! dropped, not sent. Checkpoints are named by ([`CheckpointId`]) run id + epoch, the run id
//! chosen at random when a primary starts, so a backup's state from another run is never
//! mistaken for a base.
//!
//! # The backup applies only whole checkpoints
//!
//! A checkpoint is handed to the machine (`ApplyCheckpoint`) only once every chunk has
//! arrived, in order, with the announced length and the matching digest. A connection lost,
//! or any bad frame, mid-checkpoint discards the partial one: the machine keeps the last whole
//! checkpoint. One apply at a time: the caller reports `CheckpointApplied` (then the backup
//! acks) or `ApplyFailed` (then the machine holds nothing whole: the backup closes the
//! connection, reports no checkpoint in its next HelloAck, and gets a full one).
//!
//! # Output commit
//!
//! Outputs the guest produces during epoch N (transmitted frames, console bytes) belong to N
//! and are held ([`OutputBuffer`]) until the primary emits `ReleaseOutputs { up_to_epoch }`
//! with `up_to_epoch >= N`, which happens only when the backup has acknowledged that its
//! machine applied epoch `up_to_epoch` (an ack covers all earlier epochs). While no backup is
//! connected nothing is released.
//!
//! # Failover and the lease
//!
//! The primary acquires the lease (via [`Lease::try_acquire`]) before it starts and passes the
//! grant to [`Primary::new`]. It asks to renew it (`RenewLease`) every
//! `lease_renew_interval_ms`, counts its validity from the time it *asked*, and stops
//! (`Stop { error }`) when a renewal says the lease is lost or when its validity runs out
//! unrenewed: a primary never outlives its lease, so it is gone before a backup can win it.
//!
//! A backup that has heard nothing from the primary for `failover_timeout_ms`, and holds a
//! whole checkpoint with nothing left to apply, closes the connection and asks to acquire
//! the lease (`AcquireLease`, retried every `lease_retry_ms`). Once it wins, it emits
//! `GoLive { epoch, icount, term }`: resume the machine from that last whole checkpoint as
//! the new primary. Every output the old primary released is covered by it. The lease's
//! term rises at every acquisition; a backup refuses a Hello with a term older than one it
//! has seen. Time: the lease stores expiry times of the caller's clock (wall-clock ms), so
//! the replicas' clocks must agree to well within the lease TTL.
//!
//! # Errors
//!
//! Any [`WireError`] or [`ProtocolError`] closes the connection and leaves the backup's last
//! whole checkpoint untouched; the side that detects it tries to send a `Goodbye` with the
//! reason, so both logs say the same thing. In short: *BadMagic* — not an ftvm peer;
//! *UnsupportedVersion*/*ProtocolVersionMismatch* — different ftvm releases; *ConfigMismatch*
//! — the two VMs are configured differently; *WrongKey* — the keys differ (the first frame
//! failed authentication); *BadChecksum* — corruption in transit; *BadAuthentication* — a
//! forged or replayed frame; *OutOfOrder* — a lost, duplicated or reordered frame;
//! *Oversized*, *CheckpointTooLarge* — a length over the limit; *Truncated* — the connection
//! ended mid-frame; *MalformedCheckpoint*, *CheckpointDigestMismatch*, *EpochNotIncreasing*,
//! *UnexpectedMessage*, *AckOfUnsentEpoch* — a peer that breaks the protocol (a bug);
//! *StaleTerm* — a superseded primary; *HandshakeTimeout*, *PeerSilent* — the peer stopped
//! talking; *BackupOverloaded* — the machine applies more slowly than checkpoints arrive;
//! *LeaseLost*, *LeaseExpired* — the primary must stop (another replica may be live).

pub mod messages;
pub mod output_commit;
pub mod protocol;
pub mod wire;

pub use messages::{CheckpointId, ConfigDigest, Message, MessageError, Role, PROTOCOL_VERSION};
pub use output_commit::{OutputBuffer, OutputBufferFull};
pub use protocol::{
    Backup, BackupAction, BackupConfig, BackupEvent, BackupLossPolicy, BackupStatus, CheckpointKind, ConnId, Primary,
    PrimaryAction, PrimaryConfig, PrimaryEvent, PrimaryStatus, Protection, ProtocolError, RecordView, SwapAnswer,
};
pub use wire::{Decoder, Encoder, Frame, KeyError, Nonce, PresharedKey, WireError};
