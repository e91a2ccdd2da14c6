//! `ftvm backup`: hold the last whole checkpoint of a primary's VM and take over when
//! the primary falls silent — first winning the takeover lease, so that two live
//! replicas can never exist — then attach the TAP device, announce the guest's MAC
//! address, and run the VM from that checkpoint.

use super::{load_key, nonce, now_ms, resolve};
use crate::driver::Driver;
use crate::host::announce::rarp_announce;
use crate::host::tap::Tap;
use crate::host::HostEvent;
use crate::run_cmd::{machine_config, open_tap, run_driver, VmArgs};
use anyhow::{Context, Result};
use machine::Machine;
use replica::{AcquireOutcome, Backup, BackupAction, BackupConfig, BackupEvent, FileLease, Lease, RenewOutcome};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

const TICK: Duration = Duration::from_millis(10);
/// Room for device state and framing beyond RAM and disk in a full checkpoint.
const CHECKPOINT_SLACK_BYTES: u64 = 64 << 20;
/// How many announcements a takeover sends (switches may miss one).
const ANNOUNCEMENTS: usize = 3;

/// Wait for a primary (`ftvm run --replicate-to`), keep its last whole checkpoint, and
/// take the VM over when the primary stops being heard.
#[derive(clap::Args, Debug)]
#[command(after_help = "Example:\n  ftvm backup --listen 0.0.0.0:7000 --key k --lease /shared/lease --net tap:tap0")]
pub struct BackupArgs {
    #[command(flatten)]
    pub vm: VmArgs,
    /// Address to listen on for the primary
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: String,
    /// File holding the pre-shared key (the same as the primary's)
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// Takeover lease file, on a path both replicas can see
    #[arg(long, value_name = "FILE")]
    pub lease: PathBuf,
    /// Silence from the primary after which this backup tries to take over
    #[arg(long, value_name = "MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..=600_000))]
    pub failover_timeout_ms: u64,
    /// How long the lease lasts without renewal once this replica is live
    #[arg(long, value_name = "MS", default_value_t = 1500, value_parser = clap::value_parser!(u64).range(100..=600_000))]
    pub lease_ttl_ms: u64,
    /// This replica's name in the lease [default: backup-<hostname>-<pid>]
    #[arg(long, value_name = "NAME")]
    pub replica_name: Option<String>,
}

enum ToBackup {
    Accepted(TcpStream),
    Bytes { conn: u64, bytes: Vec<u8> },
    Closed { conn: u64 },
    Control(crate::api::ControlRequest),
}

/// Answer the control API while this replica is a backup: it holds a checkpoint and
/// does not run, so only status and stop apply.
fn answer_as_backup(request: crate::api::ControlRequest, backup: &Backup, machine: &Machine, connected: bool) -> bool {
    use crate::api::{Command, Reply};
    let (reply, stop) = match request.command {
        Command::Status => (
            Reply::ok(serde_json::json!({
                "state": "waiting",
                "role": "backup",
                "mode": "checkpoint",
                "primary_connected": connected,
                "applied_epoch": backup.applied().map(|id| id.epoch),
                "icount": machine.icount(),
            })),
            false,
        ),
        Command::Stop => (Reply::ok(serde_json::json!({ "state": "stopped" })), true),
        _ => (
            Reply::error(409, "this replica is a backup: it holds a checkpoint and does not run until it takes over"),
            false,
        ),
    };
    let _ = request.reply.send(reply);
    stop
}

pub fn run(args: BackupArgs) -> Result<i32> {
    let config = machine_config(&args.vm, &[])?;
    drop(open_tap(&args.vm)?); // a missing TAP device is an error now, not at takeover
    let mut machine = Machine::new(&config)?;
    let key = load_key(&args.key)?;
    let digest = machine::snapshot::config_digest(&config);
    let addr = resolve(&args.listen)?;
    let listener = TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    let disk_bytes = machine.disk_sectors().unwrap_or(0) * 512;
    let mut backup_config = BackupConfig::new(key, digest, config.ram_size + disk_bytes + CHECKPOINT_SLACK_BYTES);
    backup_config.failover_timeout_ms = args.failover_timeout_ms;
    let mut backup = Backup::new(backup_config, now_ms());
    let holder = args.replica_name.clone().unwrap_or_else(|| super::primary::default_holder("backup"));
    let mut lease = FileLease::new(&args.lease);
    let (tx, rx) = mpsc::channel();
    spawn_acceptor(listener, tx.clone());
    // The API answers as a backup now, and as the live VM after a takeover.
    let (api_tx, api_rx) = mpsc::channel::<HostEvent>();
    let api_server = match &args.vm.api {
        Some(path) => Some(crate::api::serve(path, api_tx.clone())?),
        None => None,
    };
    let forward = tx.clone();
    std::thread::spawn(move || {
        for event in api_rx {
            if let HostEvent::Control(request) = event {
                if forward.send(ToBackup::Control(request)).is_err() {
                    return;
                }
            }
        }
    });
    eprintln!("ftvm backup: waiting for a primary on {addr}");

    let mut conn: Option<TcpStream> = None;
    let mut conn_id = 0u64;
    let mut last_heard = Instant::now();
    let mut last_report = Instant::now();
    // Said once per holder and term, not at every retry.
    let mut last_busy: Option<(String, u64)> = None;
    loop {
        let message = rx.recv_timeout(TICK);
        let now = now_ms();
        let mut actions = match message {
            Ok(ToBackup::Accepted(stream)) => {
                let mut actions = Vec::new();
                if conn.take().is_some() {
                    actions.extend(backup.step(BackupEvent::Disconnected));
                }
                conn_id += 1;
                let _ = stream.set_nodelay(true);
                let reader = stream.try_clone().context("cannot duplicate a socket")?;
                spawn_reader(reader, conn_id, tx.clone());
                conn = Some(stream);
                last_heard = Instant::now();
                actions.extend(backup.step(BackupEvent::Connected { nonce: nonce()? }));
                actions
            }
            Ok(ToBackup::Bytes { conn: id, bytes }) if id == conn_id && conn.is_some() => {
                last_heard = Instant::now();
                backup.step(BackupEvent::Received(&bytes))
            }
            Ok(ToBackup::Closed { conn: id }) if id == conn_id && conn.is_some() => {
                conn = None;
                backup.step(BackupEvent::Disconnected)
            }
            Ok(ToBackup::Control(request)) => {
                if answer_as_backup(request, &backup, &machine, conn.is_some()) {
                    eprintln!("ftvm backup: stopped through the control API");
                    return Ok(0);
                }
                Vec::new()
            }
            Ok(_) | Err(RecvTimeoutError::Timeout) => Vec::new(),
            Err(RecvTimeoutError::Disconnected) => anyhow::bail!("the listener stopped"),
        };
        actions.extend(backup.step(BackupEvent::Tick { now_ms: now }));
        let mut queue: std::collections::VecDeque<BackupAction> = actions.into();
        while let Some(action) = queue.pop_front() {
            match action {
                BackupAction::Send(bytes) => {
                    if let Some(c) = conn.as_mut() {
                        if c.write_all(&bytes).is_err() {
                            conn = None;
                            queue.extend(backup.step(BackupEvent::Disconnected));
                        }
                    }
                }
                BackupAction::ApplyCheckpoint { epoch, payload, .. } => {
                    let event = match machine::checkpoint::apply(&mut machine, &payload) {
                        Ok(()) => BackupEvent::CheckpointApplied { epoch },
                        Err(e) => {
                            eprintln!("ftvm backup: checkpoint {epoch} not applied: {e}; asking for a full checkpoint");
                            BackupEvent::ApplyFailed { epoch, reason: e.to_string() }
                        }
                    };
                    queue.extend(backup.step(event));
                }
                BackupAction::Close { error } => {
                    eprintln!("ftvm backup: connection closed: {error}");
                    if let Some(c) = conn.take() {
                        let _ = c.shutdown(std::net::Shutdown::Both);
                    }
                }
                BackupAction::AcquireLease => {
                    let answer = lease.try_acquire(&holder, now_ms(), args.lease_ttl_ms);
                    let event = match &answer {
                        Ok(outcome) => BackupEvent::LeaseAcquisition(Ok(outcome.clone())),
                        Err(e) => BackupEvent::LeaseAcquisition(Err(e)),
                    };
                    if let Ok(AcquireOutcome::Busy(record)) = &answer {
                        let seen = Some((record.holder.clone(), record.term));
                        if last_busy != seen {
                            eprintln!("ftvm backup: the primary is silent but the lease is held by {} (term {}): it is alive somewhere, so this backup waits", record.holder, record.term);
                            last_busy = seen;
                        }
                    }
                    queue.extend(backup.step(event));
                }
                BackupAction::GoLive { epoch, icount, term } => {
                    let silent_ms = last_heard.elapsed().as_millis();
                    eprintln!("ftvm backup: the primary has been silent for {silent_ms} ms; taking over at epoch {epoch} (icount {icount}), lease term {term}");
                    if let Some(c) = conn.take() {
                        let _ = c.shutdown(std::net::Shutdown::Both);
                    }
                    drop(api_server); // the live VM serves the API from here on
                    return go_live(machine, &args, lease, holder, term);
                }
            }
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            match backup.applied() {
                Some(id) => eprintln!("ftvm backup: holding epoch {} (icount {})", id.epoch, machine.icount()),
                None => eprintln!("ftvm backup: no checkpoint yet"),
            }
        }
    }
}

/// Run the VM from the checkpoint the machine holds, as the new primary.
fn go_live(machine: Machine, args: &BackupArgs, lease: FileLease, holder: String, term: u64) -> Result<i32> {
    let tap: Option<Tap> = open_tap(&args.vm)?;
    if let (Some(tap), Some(_)) = (&tap, &args.vm.net) {
        let frame = rarp_announce(args.vm.mac);
        for _ in 0..ANNOUNCEMENTS {
            let mut t = tap.clone_handle()?;
            t.send(&frame).context("cannot announce the guest's MAC address")?;
        }
    }
    let (tx, rx) = mpsc::channel();
    keep_lease(lease, holder, term, args.lease_ttl_ms, tx.clone());
    let mut driver = Driver::new(machine, rx, args.vm.clock);
    driver.role = "primary (took over)";
    run_driver(driver, &args.vm, tap, tx, &[], false)
}

/// Renew the lease while live; tell the driver to stop if it is lost.
fn keep_lease(mut lease: FileLease, holder: String, term: u64, ttl_ms: u64, events: Sender<HostEvent>) {
    std::thread::spawn(move || {
        let mut valid_until = now_ms() + ttl_ms;
        loop {
            std::thread::sleep(Duration::from_millis((ttl_ms / 5).max(1)));
            let now = now_ms();
            match lease.renew(&holder, term, now, ttl_ms) {
                Ok(RenewOutcome::Renewed(_)) => valid_until = now + ttl_ms,
                Ok(RenewOutcome::Lost(record)) => {
                    let who = record.map_or("nobody".to_string(), |r| format!("{} (term {})", r.holder, r.term));
                    let _ = events.send(HostEvent::ReplicationStopped(format!(
                        "this replica lost the takeover lease to {who}; another replica is live, so this one stops"
                    )));
                    return;
                }
                Err(e) if now >= valid_until => {
                    let _ = events.send(HostEvent::ReplicationStopped(format!(
                        "the takeover lease expired before it could be renewed ({e}); stopping"
                    )));
                    return;
                }
                Err(_) => {}
            }
        }
    });
}

fn spawn_acceptor(listener: TcpListener, tx: Sender<ToBackup>) {
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            if tx.send(ToBackup::Accepted(stream)).is_err() {
                return;
            }
        }
    });
}

fn spawn_reader(mut stream: TcpStream, conn: u64, tx: Sender<ToBackup>) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(ToBackup::Closed { conn });
                    return;
                }
                Ok(n) => {
                    if tx.send(ToBackup::Bytes { conn, bytes: buf[..n].to_vec() }).is_err() {
                        return;
                    }
                }
            }
        }
    });
}
