//! `ftvm backup`: the options, the wiring (TAP, API server, ownership store) and what
//! follows the waiting — standing down, or running the VM as the new primary. The waiting
//! itself is the runtime's ([`vmm::replicate::backup::wait`]).

use crate::replication_args::OwnershipArgs;
use crate::run_cmd::{machine_config, open_tap, run_driver, VmArgs};
use anyhow::{Context, Result};
use machine::Machine;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use vmm::driver::Driver;
use vmm::host::announce::spawn_announcer;
use vmm::host::HostEvent;
use vmm::replicate::backup::{wait, BackupOptions, Ending};
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
}

pub fn run(args: BackupArgs) -> Result<i32> {
    // Fault points named in FAILPOINTS (with the `failpoints` feature; the migration's too).
    let _faults = vmm::keeper::fault::setup();
    let config = machine_config(&args.vm, &[])?;
    // Attached now and kept: a TAP attached only at takeover may not forward at once.
    let tap = open_tap(&args.vm)?;
    let machine = Machine::new(&config)?;
    let key = load_key(&args.key)?;
    let mut ownership = Ownership::open(&args.ownership.spec(), &config, "backup")?
        .context("ftvm backup needs --store (the ownership store the primary uses)")?;
    let addr = resolve(&args.listen)?;
    let listener = TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    // The API answers as a backup now, and as the live VM after a takeover.
    let (api_tx, api_rx) = mpsc::channel::<HostEvent>();
    // The metrics port stays across a takeover: it asks the live VM from then on.
    let metrics = crate::metrics_http::bind(&args.vm, &api_tx)?;
    let api_server = match &args.vm.api {
        Some(path) => Some(crate::api::serve(path, api_tx)?),
        None => None,
    };
    // The API socket stays across a takeover too: requests go to the backup's loop while it
    // waits, to the live VM's driver once it runs (a request in flight at the takeover is
    // answered by one or the other, never left hanging).
    let (control_tx, control_rx) = mpsc::channel();
    let live: Arc<Mutex<Option<mpsc::Sender<HostEvent>>>> = Arc::default();
    let route = live.clone();
    std::thread::spawn(move || {
        for event in api_rx {
            if let Some(driver) = route.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                let _ = driver.send(event);
                continue;
            }
            if let HostEvent::Control(request) = event {
                let _ = control_tx.send(request);
            }
        }
    });
    eprintln!("ftvm backup: waiting for a primary on {addr} (VM {})", ownership.vm_id);
    let options = BackupOptions {
        listener,
        key,
        config_digest: replication_digest(&config, &ownership.vm_id),
        failover_timeout_ms: args.failover_timeout_ms,
        heartbeat_ms: args.heartbeat_ms,
    };
    match wait(options, machine, &mut ownership, control_rx)? {
        Ending::Exit(code) => {
            eprintln!("ftvm backup: the VM ended on the primary with exit status {code}; this backup stands down");
            Ok(code as i32)
        }
        Ending::Stopped => {
            eprintln!("ftvm backup: stopped through the control API");
            Ok(0)
        }
        Ending::StoodDown => {
            eprintln!(
                "ftvm backup: the primary stopped replicating to this backup (unprotect); it can never take over \
                 now, so it stands down"
            );
            Ok(0)
        }
        Ending::GoLive { machine, takeover } => {
            if let Some(tap) = &tap {
                tap.discard_pending().context("cannot empty the TAP device's queue")?;
                spawn_announcer(tap.clone_handle()?, args.vm.mac);
            }
            let (tx, rx) = mpsc::channel();
            if let Some(metrics) = &metrics {
                metrics.route_to(tx.clone());
            }
            *live.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx.clone());
            let mut driver = Driver::new(*machine, rx, args.vm.clock.into());
            driver.role = vmm::status::Role::Primary;
            driver.vm_id = Some(ownership.vm_id.clone());
            driver.took_over = Some(takeover);
            driver.ownership = Some(ownership);
            if args.vm.api.is_some() {
                driver.events_tx = Some(tx.clone()); // `ctl protect` starts replication later
            }
            // The socket is served already (above): the live VM must not bind it again.
            let vm = VmArgs { api: None, ..args.vm.clone() };
            let code = run_driver(driver, &vm, tap, tx, &[], false);
            drop(api_server);
            code
        }
    }
}
