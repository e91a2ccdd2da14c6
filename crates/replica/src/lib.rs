//! ftvm's checkpoint replication core (placeholder docs, rewritten below).

pub mod lease;
pub mod messages;
pub mod output_commit;
pub mod protocol;
pub mod wire;

pub use lease::{AcquireOutcome, FileLease, Lease, LeaseError, LeaseRecord, MemoryLease, RenewOutcome};
pub use messages::{CheckpointId, ConfigDigest, Message, MessageError, Role, PROTOCOL_VERSION};
pub use output_commit::{OutputBuffer, OutputBufferFull};
pub use protocol::{
    Backup, BackupAction, BackupConfig, BackupEvent, CheckpointKind, LeaseGrant, Primary, PrimaryAction,
    PrimaryConfig, PrimaryEvent, ProtocolError,
};
pub use wire::{Decoder, Encoder, Frame, KeyError, Nonce, PresharedKey, WireError};
