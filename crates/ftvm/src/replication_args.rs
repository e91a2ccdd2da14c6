//! The replication options of `ftvm run` and the ownership options every replica shares,
//! turned into what the runtime (`vmm`) takes.

use anyhow::{Context, Result};
use vmm::mode::checkpoint::ReplicationOptions;
use vmm::replicate::primary::PrimaryOptions;
use vmm::replicate::OwnershipSpec;

/// Where a VM's ownership record lives, and under which id.
#[derive(clap::Args, Debug, Clone)]
pub struct OwnershipArgs {
    /// Ownership store both replicas of the VM see: file:DIR. It holds one record per VM
    /// (generation, owner, running or ended), changed only by compare-and-swap; whoever holds
    /// the current generation runs the VM
    #[arg(long, value_name = "STORE", help_heading = "Replication")]
    pub store: Option<String>,
    /// The VM's name in the store [default: vm-<16 hex digits of the VM configuration's digest>]
    #[arg(long, value_name = "ID", help_heading = "Replication")]
    pub vm_id: Option<String>,
    /// This replica's name in the record [default: <role>-<hostname>-<pid>]
    #[arg(long, value_name = "NAME", help_heading = "Replication")]
    pub replica_name: Option<String>,
}

impl OwnershipArgs {
    pub fn spec(&self) -> OwnershipSpec {
        OwnershipSpec { store: self.store.clone(), vm_id: self.vm_id.clone(), replica_name: self.replica_name.clone() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnBackupLoss {
    /// Keep serving unprotected (after making the backup's state stale for good)
    Continue,
    /// Hold outputs until a backup is back
    Hold,
}

impl From<OnBackupLoss> for replica::BackupLossPolicy {
    fn from(policy: OnBackupLoss) -> Self {
        match policy {
            OnBackupLoss::Continue => replica::BackupLossPolicy::Continue,
            OnBackupLoss::Hold => replica::BackupLossPolicy::Hold,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReplicationMode {
    /// Every epoch the changed pages, sectors and device state go to the backup
    Checkpoint,
    /// The backup executes the same instruction stream; only the inputs cross the wire
    Lockstep,
}

/// `ftvm run`'s replication options.
#[derive(clap::Args, Debug, Clone)]
pub struct ReplicationArgs {
    /// Replicate to a backup (`ftvm backup --listen HOST:PORT`): every epoch, the pages,
    /// disk sectors and device state changed since the last one go to the backup, and
    /// the guest's outputs leave only once the backup holds the epoch that made them
    #[arg(long, value_name = "HOST:PORT", requires_all = ["key", "store"], help_heading = "Replication")]
    pub replicate_to: Option<String>,
    /// File holding the pre-shared key that authenticates the replication channel
    #[arg(long, value_name = "FILE", help_heading = "Replication")]
    pub key: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub ownership: OwnershipArgs,
    /// Start even though the VM's record is active at GENERATION, owned by replica OWNER, whose
    /// process is known to be gone (the agent starting a primary again passes this): exactly
    /// that record is taken; one that moved on since is refused
    #[arg(long, value_name = "GENERATION:OWNER", value_parser = parse_claim_from, requires = "store", help_heading = "Replication")]
    pub claim_from: Option<(u64, String)>,
    /// Checkpoint interval
    #[arg(long, value_name = "MS", default_value_t = 25, value_parser = clap::value_parser!(u64).range(1..=10_000), help_heading = "Replication")]
    pub epoch_ms: u64,
    /// Heartbeat interval on the replication link
    #[arg(long, value_name = "MS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=10_000), help_heading = "Replication")]
    pub heartbeat_ms: u64,
    /// With the backup gone: continue serving unprotected, or hold outputs until it is back
    #[arg(long, value_enum, default_value = "continue", help_heading = "Replication")]
    pub on_backup_loss: OnBackupLoss,
    /// How long outputs wait for a lost backup to come back before the VM runs unprotected
    #[arg(long, value_name = "MS", default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=600_000), help_heading = "Replication")]
    pub backup_loss_grace_ms: u64,
    /// End-to-end check: every N epochs (and every full checkpoint) the checkpoint
    /// carries the whole machine's digest, which the backup recomputes after applying;
    /// a mismatch makes it ask for a full checkpoint. Costs a pass over RAM per check.
    /// 0: off
    #[arg(long, value_name = "N", default_value_t = 0, help_heading = "Replication")]
    pub verify_every: u64,
    /// Checkpoint replication, or lockstep: the backup (the same `ftvm backup`, which learns
    /// the mode from the stream) boots from the same images and executes behind the primary,
    /// only the inputs crossing the wire; an output leaves once the backup holds every input
    /// before it
    #[arg(long, value_enum, default_value = "checkpoint", help_heading = "Replication")]
    pub mode: ReplicationMode,
    /// Lockstep: how often the backup compares its machine's digest with the primary's
    /// (a divergence stops lockstep and resynchronizes the backup with a full checkpoint).
    /// The digest is incremental (per 1 MiB region, from the pages written since the last
    /// one), so a check costs what the guest wrote meanwhile. 0: never
    #[arg(long, value_name = "MS", default_value_t = 250, help_heading = "Replication")]
    pub lockstep_digest_ms: u64,
}

/// `--claim-from GENERATION:OWNER`.
fn parse_claim_from(text: &str) -> Result<(u64, String), String> {
    let parsed = text.split_once(':').and_then(|(generation, owner)| {
        let generation = generation.parse::<u64>().ok().filter(|g| *g > 0)?;
        (!owner.is_empty()).then(|| (generation, owner.to_string()))
    });
    parsed.ok_or_else(|| format!("{text:?} is not GENERATION:OWNER (a generation from 1, then the owner's name)"))
}

/// What `--replicate-to --mode lockstep` and its companions ask for.
pub fn lockstep_options(
    args: &ReplicationArgs,
    config: &machine::MachineConfig,
) -> Result<vmm::mode::lockstep::LockstepOptions> {
    let ReplicationOptions { primary, .. } = options(args)?;
    let leader = replica::lockstep::LeaderConfig {
        digest_every_ms: args.lockstep_digest_ms,
        ..replica::lockstep::LeaderConfig::default()
    };
    let boot = vmm::mode::lockstep::BootParams::of(config);
    Ok(vmm::mode::lockstep::LockstepOptions { primary, leader, boot })
}

/// What `--replicate-to` and its companions ask for.
pub fn options(args: &ReplicationArgs) -> Result<ReplicationOptions> {
    let addr = args.replicate_to.as_deref().context("replication needs --replicate-to")?;
    let key_path = args.key.as_ref().context("--replicate-to needs --key")?;
    let primary = PrimaryOptions {
        backup: vmm::replicate::resolve(addr)?,
        key: vmm::replicate::load_key(key_path)?,
        heartbeat_ms: args.heartbeat_ms,
        on_backup_loss: args.on_backup_loss.into(),
        backup_loss_grace_ms: args.backup_loss_grace_ms,
    };
    Ok(ReplicationOptions { primary, epoch_ms: args.epoch_ms, verify_every: args.verify_every })
}
