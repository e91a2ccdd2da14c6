//! `ftvm backup`: the options and the wiring (TAP, API server, ownership store). The backup
//! is a mode of the runtime's driver ([`vmm::mode::backup::CheckpointBackup`]): the same
//! driver waits, and after a takeover runs the VM as the new primary.

use crate::replication_args::OwnershipArgs;
use crate::run_cmd::{machine_config, open_tap, run_driver, Attach, VmArgs};
use anyhow::{Context, Result};
use machine::Machine;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::mpsc;
use vmm::driver::Driver;
use vmm::mode::backup::CheckpointBackup;
use vmm::replicate::backup::BackupOptions;
use vmm::replicate::{load_key, replication_digest, resolve, Ownership};

/// Wait for a primary (`ftvm run --replicate-to`), keep its last whole checkpoint, and
/// take the VM over when the primary stops being heard.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example:\n  ftvm backup --listen 0.0.0.0:7000 --key k --store file:/shared/ftvm --net tap:tap0\n\n\
Exit status: the VM's own exit status when it ended on the primary (the backup never takes\n\
over an ended VM); otherwise as `ftvm run` after a takeover; 0 when stopped through the API\n\
or told to stand down by `ftvm ctl unprotect` on the primary.\n\n\
After a takeover this replica runs the VM alone; `ftvm ctl --api SOCK protect --to HOST:PORT\n\
--key FILE` gives it a new backup."
)]
pub struct BackupArgs {
    #[command(flatten)]
    pub vm: VmArgs,
    /// Address to listen on for the primary
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: String,
    /// File holding the pre-shared key (the same as the primary's)
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    #[command(flatten)]
    pub ownership: OwnershipArgs,
    /// Silence from the primary (authenticated frames only) after which this backup takes over
    #[arg(long, value_name = "MS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub failover_timeout_ms: u64,
    /// Heartbeat interval on the replication link
    #[arg(long, value_name = "MS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub heartbeat_ms: u64,
    /// Keep the backup across crashes and hangs of its monitor: a small keeper process owns
    /// the listening socket, the TAP device and the API socket, and restarts the monitor,
    /// which takes the checkpoint it last applied up again, so that the primary stays
    /// protected (docs/microreboot.md)
    #[arg(long)]
    pub resilient: bool,
    #[command(flatten)]
    pub keeper: crate::resilient::KeeperArgs,
}

pub fn run(args: BackupArgs) -> Result<i32> {
    if args.resilient {
        return crate::resilient::run_backup(args);
    }
    // Fault points named in FAILPOINTS (with the `failpoints` feature; the migration's and
    // lockstep's provoked divergence too).
    let _faults = vmm::keeper::fault::setup();
    let config = machine_config(&args.vm, &[])?;
    // Attached now and kept: a TAP attached only at takeover may not forward at once.
    let tap = open_tap(&args.vm)?;
    let machine = Machine::new(&config)?;
    let key = load_key(&args.key)?;
    let ownership = Ownership::open(&args.ownership.spec(), &config, "backup")?
        .context("ftvm backup needs --store (the ownership store the primary uses)")?;
    let addr = resolve(&args.listen)?;
    let listener = TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    // One driver for the whole life of this replica: the API and the metrics port answer
    // as a backup now, and as the live VM after a takeover.
    let (tx, rx) = mpsc::channel();
    let _metrics = crate::metrics_http::bind(&args.vm, &tx)?;
    eprintln!("ftvm backup: waiting for a primary on {addr} (VM {})", ownership.vm_id);
    let options = BackupOptions {
        listener,
        key,
        config_digest: replication_digest(&config, &ownership.vm_id),
        failover_timeout_ms: args.failover_timeout_ms,
        heartbeat_ms: args.heartbeat_ms,
    };
    let vm_id = ownership.vm_id.clone();
    let mode = CheckpointBackup::start(options, ownership, tx.clone(), &machine)?;
    // The same backup follows a lockstep primary: the stream says which (a lockstep start
    // boots a machine from these images with the primary's boot parameters).
    let images = config.clone();
    let rebuild: vmm::mode::lockstep_follower::Rebuild<Machine> =
        Box::new(move |boot| Machine::new(&boot.apply(&images)).map_err(|e| vmm::replicate::chain(&e)));
    let mode = vmm::mode::lockstep_follower::LockstepBackup::new(mode, rebuild)
        .context("the backup's protocol thread stopped at once")?;
    let mut driver = Driver::new(machine, rx, args.vm.clock.into());
    driver.vm_id = Some(vm_id);
    driver.set_mode(Box::new(mode));
    run_driver(driver, &args.vm, tap, tx, &[], false, Attach::AtGoLive { mac: args.vm.mac })
}
