//! ftvm's checkpoint-replication core (DESIGN.md §5): the frame format, the messages, the
//! primary's and the backup's protocol state machines, output commit, and the ownership rule.
//!
//! Nothing here does I/O. [`Primary`] and [`Backup`] are pure state
//! machines in the manner of raft-rs's `RawNode`: the caller feeds events (`step`) and carries
//! out the actions returned, in order. Sockets, threads, clocks, random nonces and the machine
//! live with the caller; this is what lets `tests/simulation.rs` drive both sides through
//! seeded faults.
//!
//! # Roles and connection
//!
//! The backup listens, the primary connects. On every new connection the caller passes fresh
//! random bytes (`Connected { nonce }`); bytes read go in as `Received` cut anywhere, and the
//! end of the stream as `Disconnected`. `Send` actions are written in order. `Close { error }`
//! means: close this connection and report `error` (the primary connects again; the backup
//! keeps listening). Feed `Tick { now_ms }` every few ms. The backup names each accepted
//! connection ([`ConnId`]) and keeps up to `max_pending_handshakes` strangers apart from the
//! primary's connection until they prove they know the key and are fresh.
//!
//! # Frames ([`wire`])
//!
//! `"FTVR" | version u16 | type u8 | flags u8 | seq u64 | length u32 | (nonce) | ciphertext | tag | CRC32C`,
//! little-endian (wire version 3: the header carries a CRC32C of its own, checked before its
//! length is trusted). Every payload is sealed with ChaCha20-Poly1305, the header as
//! associated data; the CRC32C covers all before it, so corruption in transit
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
//! Damage in transit is repaired within the connection: a frame whose header checks out but
//! whose payload fails its CRC32C or its tag is skipped unused, and the receiver sends
//! `Resend { from_seq }`; the sender, which keeps what it sent (up to
//! [`wire::RESEND_WINDOW_BYTES`]), sends everything from there again, byte for byte
//! (go-back-N). The link does this by itself: the protocol's rules never see a damaged frame
//! nor a `Resend`. Only a damaged header, which loses the framing, costs the connection.
//!
//! # Message flow
//!
//! ```text
//!   primary                                   backup
//!   Hello{version, config digest, nonce, run id, generation}  ──►  checks all four
//!        ◄──  HelloAck{version, digest, nonce, echo of primary nonce, latest, partial}
//!   (both switch to session keys)
//!   Heartbeat (the first session frame: the backup now takes this connection as the primary's)
//!   kept checkpoints the backup lacks: CheckpointResume{N, offset} for a cut-off one, or Begin...
//!   every epoch N:
//!   CheckpointBegin{N, base: None | Some(N-1), icount, total bytes}  ──►
//!   CheckpointChunk{N, offset, bytes} ...                             ──►  reassembled
//!   CheckpointEnd{N, SHA-256 of payload}                              ──►  digest checked
//!                                                 ApplyCheckpoint → machine → CheckpointApplied
//!        ◄──  Ack{N}
//!   ReleaseOutputs{up_to_epoch: N}
//!   Protected{generation, from_epoch}  ──►  the backup's state counts for that generation
//!   End{exit code}  ──►  the VM ended: the backup exits, never takes over
//!   StandDown  ──►  replication stopped (unprotect), the generation already swapped: the backup exits
//!   Heartbeat{now, epoch} both ways every heartbeat interval; NeedFull; Goodbye{reason}
//!   Resend{from_seq} either way: a frame arrived damaged; everything from it again
//! ```
//!
//! # Epochs and the checkpoint chain
//!
//! Epochs go up by one. A checkpoint is *full* (the whole machine) or *incremental* (what
//! changed since the epoch before: `base = N-1`). A backup applies an incremental only on top
//! of exactly its base; anything else it skips and answers `NeedFull`. The primary tracks what
//! the backup will hold and asks the caller, through [`Primary::next_checkpoint_kind`], for a
//! full checkpoint whenever the chain is broken: the first checkpoint of a backup that holds
//! nothing of this run, after `NeedFull`, after the kept log overflowed. Checkpoints the
//! backup has not acknowledged are kept (up to `max_log_bytes`) and resent after a reconnect,
//! so epochs taken while disconnected continue the chain. An incremental taken against that
//! advice is dropped, not sent; with the chain broken and no backup, `Discard` is asked for. Checkpoints are named by ([`CheckpointId`]) run id + epoch, the run id
//! chosen at random when a primary starts, so a backup's state from another run is never
//! mistaken for a base. A primary whose process restarted may take its run up again
//! ([`Primary::resume`]): the epochs go on past any it took, and its first checkpoint is an
//! incremental on an older epoch of the run (`base < N-1`) that holds every page the run
//! wrote since that epoch, so it fits any state of the run from that epoch on.
//!
//! # The backup applies only whole checkpoints
//!
//! A checkpoint is handed to the machine (`ApplyCheckpoint`) only once every chunk has
//! arrived, in order, with the announced length and the matching digest. A connection lost,
//! or any bad frame, mid-checkpoint keeps the partial one aside (never applied) for the next
//! connection to resume: the machine keeps the last whole checkpoint. One apply at a time: the caller reports `CheckpointApplied` (then the backup
//! acks) or `ApplyFailed` (then the machine holds nothing whole: the backup closes the
//! connection, reports no checkpoint in its next HelloAck, and gets a full one).
//!
//! # Output commit
//!
//! Outputs the guest produces during epoch N (transmitted frames, console bytes) belong to N
//! and are held ([`OutputBuffer`]) until the primary emits `ReleaseOutputs { up_to_epoch }`
//! with `up_to_epoch >= N`, which happens only when the backup has acknowledged that its
//! machine applied epoch `up_to_epoch` (an ack covers all earlier epochs) — or, unprotected,
//! as each checkpoint is taken, after the generation was swapped (below).
//!
//! # Ownership and failover
//!
//! One record per VM in a store both replicas see holds a generation, changed only by
//! compare-and-swap (the caller carries out `SwapGeneration`, `ReadOwnership` and
//! `ClaimOwnership` and reports the answers). The rule: **a backup may go live only by
//! swapping the generation its state belongs to, and a primary releases an output the backup
//! has not acknowledged only after swapping the generation forward** — so no replica ever
//! goes live with a state older than an output that left, and no lease is waited out.
//!
//! The primary starts owning the record ([`Primary::new`] takes its generation). With the
//! backup lost for `backup_loss_grace_ms` it swaps (Continue) or keeps holding (Hold); once a
//! returning backup holds the last epoch released without it, the primary sends `Protected`,
//! and the backup's state counts for the current generation. A backup that hears no
//! authenticated frame for `failover_timeout_ms`, holds a whole checkpoint that counts for the
//! newest generation it knows, and has nothing left to apply, claims the record; on success it
//! emits `GoLive { epoch, icount, generation }`. A claim that finds another generation leaves it
//! a stale backup (`CannotTakeOver`); one that finds the VM ended makes it `Exit`. A primary
//! whose swap or periodic read finds another owner stops (`Stop`), releasing nothing more.
//!
//! Replication starts and stops while the VM runs (`ftvm ctl protect`, `unprotect`): a new
//! [`Primary`] owns the record at the generation the running VM holds (it took it at start,
//! or by a takeover); [`PrimaryEvent::Unprotect`] is going unprotected for good — the swap
//! first if a backup may hold a state of the current generation, then every output released,
//! `StandDown` to the backup, and `Detached`.

//! # Errors
//!
//! Any [`WireError`] or [`ProtocolError`] closes the connection and leaves the backup's last
//! whole checkpoint untouched (a damaged payload is not an error: it is asked for again); the
//! side that detects it tries to send a `Goodbye` with the reason, so both logs say the same
//! thing. In short: *BadMagic* — not an ftvm peer; *UnsupportedVersion*/
//! *ProtocolVersionMismatch* — different ftvm releases; *ConfigMismatch* — the two VMs are
//! configured differently; *WrongKey* — the keys differ (the first frame failed
//! authentication); *BadHeaderChecksum* — a header corrupted in transit (the framing is lost);
//! *BadChecksum* — corruption in transit (of a connection's first frame, or of one frame again
//! and again); *BadAuthentication* — a forged or replayed
//! frame; *OutOfOrder* — a lost, duplicated or reordered frame;
//! *ResendUnavailable*, *ResendOverdue* — more was in flight when a frame arrived damaged than
//! the resend window holds; *ResendOfUnsentFrame* — a peer that breaks the protocol;
//! *Oversized*, *CheckpointTooLarge* — a length over the limit; *Truncated* — the connection
//! ended mid-frame; *MalformedCheckpoint*, *CheckpointDigestMismatch*, *EpochNotIncreasing*,
//! *UnexpectedMessage*, *AckOfUnsentEpoch* — a peer that breaks the protocol (a bug);
//! *StaleGeneration* — a superseded primary; *ConnectionReplaced*, *TooManyHandshakes* — the
//! backup's connection bookkeeping; *HandshakeTimeout*, *PeerSilent* — the peer stopped
//! talking; *BackupOverloaded* — the machine applies more slowly than checkpoints arrive;
//! *OwnershipLost* — the replica must stop (another replica may be live); *VmEnded* — the VM
//! ended.

pub mod lockstep;
pub mod messages;
pub mod output_commit;
pub mod protocol;
pub mod schedule;
pub mod wire;

pub use messages::{CheckpointId, ConfigDigest, Message, MessageError, Role, PROTOCOL_VERSION};
pub use output_commit::{OutputBuffer, OutputBufferFull};
pub use protocol::{
    Backup, BackupAction, BackupConfig, BackupEvent, BackupKept, BackupLossPolicy, BackupStatus, CheckpointKind,
    ClaimRight, ConnId, Handover, Primary, PrimaryAction, PrimaryConfig, PrimaryEvent, PrimaryStatus, Protection,
    ProtocolError, RecordView, ResumeRun, SwapAnswer,
};
pub use schedule::{CheckpointSchedule, ScheduleConfig, SliceAction};
pub use wire::{Decoded, Decoder, Encoder, Frame, KeyError, Nonce, PresharedKey, WireError};
