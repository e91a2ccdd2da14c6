//! Requests from the control API (served by the binary over a Unix socket), as the driver
//! receives them: a command and the channel for its answer. The driver answers between two
//! run slices, so a reply always describes a consistent machine.

use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::mpsc::Sender;

/// What a client asks of the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Status,
    Pause,
    Resume,
    Snapshot {
        path: PathBuf,
    },
    Stop,
    /// Start replicating this running, unprotected VM to a waiting backup.
    Protect(ProtectRequest),
    /// Stop replicating: the VM runs on alone, and its backup can never take over.
    Unprotect,
    /// Live migration: hand this running, unprotected VM to a waiting backup elsewhere.
    Migrate(MigrateRequest),
    /// Hand the VM to a fresh monitor (`ctl rejuvenate`, `ctl upgrade`): a `--resilient`
    /// VM's keeper does it; the driver alone refuses.
    Handover(HandoverRequest),
}

/// Where to migrate (`ftvm ctl migrate`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateRequest {
    /// The destination's address (`ftvm backup --listen`), `HOST:PORT`.
    pub to: String,
    /// The file holding the pre-shared key, as the VM's process sees it.
    pub key: PathBuf,
    /// The pre-copy's checkpoint interval.
    pub epoch_ms: u64,
}

/// A planned handover to another monitor process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandoverRequest {
    /// A fresh monitor of the same binary.
    Rejuvenate,
    /// A monitor (and keeper) of the ftvm binary at this path, as the VM's process sees it.
    Upgrade { binary: PathBuf },
}

/// Where to replicate, and how (`ftvm ctl protect`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtectRequest {
    /// The backup's address (`ftvm backup --listen`), `HOST:PORT`.
    pub to: String,
    /// The file holding the pre-shared key, as the VM's process sees it.
    pub key: PathBuf,
    /// Checkpoint mode's epoch (lockstep cuts its batches by its own rules).
    pub epoch_ms: u64,
    pub on_backup_loss: replica::BackupLossPolicy,
    pub mode: ProtectMode,
}

/// How `ctl protect` replicates the running VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProtectMode {
    /// Checkpoints: the first a full one, pre-copied while the guest runs.
    #[default]
    Checkpoint,
    /// Lockstep: the backup starts from the whole state (one stop-and-copy) and then follows
    /// the input stream; its digest is compared with the primary's this often (0: never).
    Lockstep { digest_every_ms: u64 },
}

impl ProtectMode {
    /// Its name, as `--mode` and the API spell it.
    pub fn name(self) -> &'static str {
        match self {
            ProtectMode::Checkpoint => "checkpoint",
            ProtectMode::Lockstep { .. } => "lockstep",
        }
    }
}

/// An HTTP status and a JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Reply {
    pub fn ok(body: Value) -> Reply {
        Reply { status: 200, body }
    }

    pub fn error(status: u16, message: impl Into<String>) -> Reply {
        Reply { status, body: json!({ "error": message.into() }) }
    }
}

/// A request on its way to the driver, with the channel for its answer.
#[derive(Debug)]
pub struct ControlRequest {
    pub command: Command,
    pub reply: Sender<Reply>,
}
