//! `ftvm ctl`: the client of a running VM's control API.

use crate::api::{self, Command, HandoverRequest, ProtectMode, ProtectRequest};
use crate::replication_args::{OnBackupLoss, ReplicationMode};
use anyhow::{bail, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Talk to a running VM through its control API socket (`ftvm run --api PATH`).
#[derive(clap::Args, Debug)]
pub struct CtlArgs {
    /// The VM's API socket
    #[arg(long, value_name = "PATH")]
    pub api: PathBuf,
    #[command(subcommand)]
    pub verb: Verb,
}

#[derive(clap::Subcommand, Debug)]
pub enum Verb {
    /// Role, state, epoch, replication lag, protection, takeover... (JSON: vmm::status::Status)
    Status,
    /// Stop running the guest (its state stays in memory)
    Pause,
    /// Run the guest again after pause
    Resume,
    /// Save the VM's whole state to FILE (`ftvm restore FILE` continues it)
    Snapshot {
        /// Where to write the snapshot
        file: PathBuf,
    },
    /// Stop the VM
    Stop,
    /// The status as Prometheus metrics (text; `--metrics-listen` serves them over TCP)
    Metrics,
    /// Start replicating this running, unprotected VM to a waiting `ftvm backup` (started
    /// with the VM's --store and --vm-id): a VM started alone with --store, or a backup that
    /// took over. Checkpoint mode: the backup's first checkpoint is pre-copied while the guest
    /// runs. Lockstep (--mode lockstep): the VM's whole state goes to the backup first (the
    /// guest pauses while it is taken), then the backup executes behind the primary on the
    /// inputs it is sent, and an output leaves once the backup holds every input before it.
    /// Status says when it is protected (replication.protected) and in which mode (mode)
    Protect {
        /// The backup's address (its --listen)
        #[arg(long, value_name = "HOST:PORT")]
        to: String,
        /// File holding the pre-shared key (the backup's --key)
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// Checkpoint interval
        #[arg(long, value_name = "MS", default_value_t = 25, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        epoch_ms: u64,
        /// With the backup gone: continue serving unprotected, or hold outputs until it is back
        #[arg(long, value_enum, default_value = "continue")]
        on_backup_loss: OnBackupLoss,
        /// Checkpoint replication, or lockstep (the same `ftvm backup` learns the mode from
        /// the stream); --epoch-ms is checkpoint mode's
        #[arg(long, value_enum, default_value = "checkpoint")]
        mode: ReplicationMode,
        /// Lockstep: how often the backup compares its machine's digest with the primary's (a
        /// divergence resynchronizes it with the whole state). 0: never
        #[arg(long, value_name = "MS", default_value_t = 250,
              value_parser = clap::value_parser!(u64).range(0..=api::MAX_LOCKSTEP_DIGEST_MS))]
        lockstep_digest_ms: u64,
    },
    /// Stop replicating: the VM runs on alone. The ownership generation moves forward first,
    /// so the backup can never take over, told or not; it is told to stand down (it exits)
    Unprotect,
    /// Live-migrate this running, unprotected VM to a waiting `ftvm backup --listen` on
    /// another host (started with the VM's --store and --vm-id): pre-copy while the guest
    /// runs, a short stop-and-copy, then the destination takes the ownership record, runs the
    /// VM and announces its MAC; this VM's process exits 0. Waits until it is done and prints
    /// the figures (total time, bytes sent, the guest's pause). When the migration is called
    /// off (the destination lost), the VM runs on here
    Migrate {
        /// The destination's address (its --listen)
        #[arg(long, value_name = "HOST:PORT")]
        to: String,
        /// File holding the pre-shared key (the destination's --key)
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// Checkpoint interval of the pre-copy
        #[arg(long, value_name = "MS", default_value_t = 25, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        epoch_ms: u64,
    },
    /// A --resilient VM: hand it to a fresh monitor (rejuvenation) through a clean handover;
    /// prints the guest's pause once the new monitor runs it
    Rejuvenate,
    /// A --resilient VM: hand it to a monitor of the ftvm binary at PATH, its keeper
    /// re-executing itself with it; a binary that cannot read the handover state refuses and
    /// the running monitor carries on
    Upgrade {
        /// The new ftvm binary
        #[arg(long, value_name = "PATH")]
        binary: PathBuf,
    },
}

pub fn run(args: CtlArgs) -> Result<i32> {
    let command = match args.verb {
        Verb::Metrics => {
            print_out(&api::metrics_text(&args.api)?)?;
            return Ok(0);
        }
        Verb::Status => Command::Status,
        Verb::Pause => Command::Pause,
        Verb::Resume => Command::Resume,
        Verb::Stop => Command::Stop,
        Verb::Unprotect => Command::Unprotect,
        Verb::Migrate { to, key, epoch_ms } => {
            Command::Migrate(api::MigrateRequest { to, key: std::path::absolute(&key)?, epoch_ms })
        }
        Verb::Rejuvenate => return handover(&args.api, HandoverRequest::Rejuvenate),
        Verb::Upgrade { binary } => {
            return handover(&args.api, HandoverRequest::Upgrade { binary: std::path::absolute(&binary)? })
        }
        // The VM reads the key file itself: make a relative path ours.
        Verb::Protect { to, key, epoch_ms, on_backup_loss, mode, lockstep_digest_ms } => {
            Command::Protect(ProtectRequest {
                to,
                key: std::path::absolute(&key)?,
                epoch_ms,
                on_backup_loss: on_backup_loss.into(),
                mode: match mode {
                    ReplicationMode::Checkpoint => ProtectMode::Checkpoint,
                    ReplicationMode::Lockstep => ProtectMode::Lockstep { digest_every_ms: lockstep_digest_ms },
                },
            })
        }
        // The VM resolves a relative path against its own directory; make it ours.
        Verb::Snapshot { file } => Command::Snapshot { path: std::path::absolute(&file)? },
    };
    let reply = api::request(&args.api, &command)?;
    if reply.status != 200 {
        if reply.body.get("migration").is_some() {
            print_out(&format!("{}\n", serde_json::to_string_pretty(&reply.body)?))?;
            // a called-off migration's figures
        }
        let message = reply.body.get("error").and_then(|e| e.as_str()).unwrap_or("unknown error");
        bail!("the VM refused: {message} (HTTP {})", reply.status);
    }
    print_out(&format!("{}\n", serde_json::to_string_pretty(&reply.body)?))?;
    Ok(0)
}

/// Write the answer to standard output; a reader that has gone (`ftvm ctl status | head -1`,
/// `grep -q`) has what it wanted, so a broken pipe is no error (print! panicked on it).
fn print_out(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// How long `rejuvenate` and `upgrade` wait for the handover's end.
const HANDOVER_WAIT: Duration = Duration::from_secs(60);

/// Ask for a handover, then follow the keeper's status until it is done (print it) or
/// failed (say why). The API may not answer for a moment while monitors change.
fn handover(socket: &Path, request: HandoverRequest) -> Result<i32> {
    let reply = api::request(socket, &Command::Handover(request))?;
    if reply.status != 200 {
        bail!("the VM refused: {} (HTTP {})", error_text(&reply.body), reply.status);
    }
    let seq = reply.body.get("handover").and_then(Value::as_u64).unwrap_or(0);
    let deadline = Instant::now() + HANDOVER_WAIT;
    loop {
        if let Ok(status) = api::request(socket, &Command::Status) {
            let handover = &status.body["keeper"]["handover"];
            let settled = handover["seq"].as_u64() == Some(seq) || handover["seq"].as_u64() > Some(seq);
            match handover["state"].as_str() {
                Some("done") if settled => {
                    print_out(&format!("{}\n", serde_json::to_string_pretty(handover)?))?;
                    return Ok(0);
                }
                Some("failed") if settled => {
                    let kind = handover["kind"].as_str().unwrap_or("handover");
                    bail!("the {kind} did not happen: {}", handover["outcome"].as_str().unwrap_or("no reason given"))
                }
                _ => {}
            }
        }
        if Instant::now() >= deadline {
            bail!("the handover {seq} did not end within {HANDOVER_WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn error_text(body: &Value) -> &str {
    body.get("error").and_then(|e| e.as_str()).unwrap_or("unknown error")
}
