//! The primary's replication thread: it owns the protocol state machine, the TCP
//! connection to the backup and the lease. The VM's driver hands it checkpoints; it
//! hands back output releases (output commit) and, if the lease is lost, the order to
//! stop. The guest never waits for the network: checkpoints are sent here, in the
//! background, while the next epoch runs.

use super::{nonce, now_ms};
use crate::host::HostEvent;
use anyhow::{bail, Context, Result};
use replica::{
    AcquireOutcome, CheckpointKind, ConfigDigest, FileLease, Lease, LeaseGrant, PresharedKey, Primary, PrimaryAction,
    PrimaryConfig, PrimaryEvent,
};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often the protocol hears the time (heartbeats and timeouts are multiples).
const TICK: Duration = Duration::from_millis(10);
/// Wait between connection attempts to the backup.
const RECONNECT_MS: u64 = 300;
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Messages into the replication thread.
pub enum ToRepl {
    Checkpoint { epoch: u64, icount: u64, kind: CheckpointKind, payload: Vec<u8> },
    Bytes { conn: u64, bytes: Vec<u8> },
    Closed { conn: u64 },
    Shutdown,
}

/// What the driver may read of the replication state at any time.
#[derive(Debug, Clone)]
pub struct Shared {
    /// The kind of checkpoint the protocol wants next.
    pub next_kind: CheckpointKind,
    /// A backup is connected and holds (or is receiving) our checkpoints.
    pub streaming: bool,
    pub acked_epoch: Option<u64>,
    pub bytes_sent: u64,
    pub last_error: Option<String>,
    pub lease_term: u64,
}

pub struct PrimaryOptions {
    pub backup: SocketAddr,
    pub key: PresharedKey,
    pub lease_path: PathBuf,
    pub holder: String,
    pub config_digest: ConfigDigest,
    pub lease_ttl_ms: u64,
}

pub struct PrimaryHandle {
    pub tx: Sender<ToRepl>,
    pub shared: Arc<Mutex<Shared>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for PrimaryHandle {
    fn drop(&mut self) {
        let _ = self.tx.send(ToRepl::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Take the lease (refusing to start when another replica holds it) and start the
/// replication thread.
pub fn start(options: PrimaryOptions, events: Sender<HostEvent>) -> Result<PrimaryHandle> {
    let mut lease = FileLease::new(&options.lease_path);
    let now = now_ms();
    let grant = match lease
        .try_acquire(&options.holder, now, options.lease_ttl_ms)
        .context("cannot take the takeover lease")?
    {
        AcquireOutcome::Acquired(record) => LeaseGrant { term: record.term, acquired_at_ms: now },
        AcquireOutcome::Busy(record) => bail!(
            "the takeover lease {} is held by {} (term {}) for another {} ms: another replica of this VM is live",
            options.lease_path.display(),
            record.holder,
            record.term,
            record.expires_ms.saturating_sub(now)
        ),
    };
    let run_id = u64::from_le_bytes(super::random()?);
    let mut config = PrimaryConfig::new(options.key.clone(), options.config_digest, run_id);
    config.lease_ttl_ms = options.lease_ttl_ms;
    config.lease_renew_interval_ms = (options.lease_ttl_ms / 5).max(1);
    let primary = Primary::new(config, grant);
    let shared = Arc::new(Mutex::new(Shared {
        next_kind: CheckpointKind::Full,
        streaming: false,
        acked_epoch: None,
        bytes_sent: 0,
        last_error: None,
        lease_term: grant.term,
    }));
    let (tx, rx) = mpsc::channel();
    let mut thread = ReplThread {
        primary,
        rx,
        tx: tx.clone(),
        events,
        shared: shared.clone(),
        lease,
        options,
        conn: None,
        conn_id: 0,
        next_connect_ms: 0,
    };
    let handle = std::thread::Builder::new()
        .name("replication".into())
        .spawn(move || thread.run())
        .context("cannot start the replication thread")?;
    Ok(PrimaryHandle { tx, shared, thread: Some(handle) })
}

struct ReplThread {
    primary: Primary,
    rx: Receiver<ToRepl>,
    tx: Sender<ToRepl>,
    events: Sender<HostEvent>,
    shared: Arc<Mutex<Shared>>,
    lease: FileLease,
    options: PrimaryOptions,
    conn: Option<Connection>,
    conn_id: u64,
    next_connect_ms: u64,
}

/// A connection to the backup: writes go through a writer thread, so that sending a
/// large checkpoint never keeps the protocol thread from its heartbeats and, above
/// all, from renewing the lease.
struct Connection {
    stream: TcpStream,
    writer: Sender<Vec<u8>>,
}

impl Connection {
    fn new(stream: TcpStream, conn: u64, events: Sender<ToRepl>) -> std::io::Result<Connection> {
        let mut out = stream.try_clone()?;
        let (writer, queue) = mpsc::channel::<Vec<u8>>();
        std::thread::spawn(move || {
            for bytes in queue {
                if out.write_all(&bytes).is_err() {
                    let _ = out.shutdown(std::net::Shutdown::Both);
                    let _ = events.send(ToRepl::Closed { conn });
                    return;
                }
            }
        });
        Ok(Connection { stream, writer })
    }
}

impl ReplThread {
    fn run(&mut self) {
        loop {
            let message = self.rx.recv_timeout(TICK);
            let now = now_ms();
            let mut actions = match message {
                Ok(ToRepl::Shutdown) | Err(RecvTimeoutError::Disconnected) => return,
                Ok(ToRepl::Checkpoint { epoch, icount, kind, payload }) => {
                    self.primary.step(PrimaryEvent::CheckpointTaken { epoch, icount, kind, payload: &payload })
                }
                Ok(ToRepl::Bytes { conn, bytes }) if conn == self.conn_id && self.conn.is_some() => {
                    self.primary.step(PrimaryEvent::Received(&bytes))
                }
                Ok(ToRepl::Closed { conn }) if conn == self.conn_id && self.conn.is_some() => {
                    self.conn = None;
                    self.next_connect_ms = now + RECONNECT_MS;
                    self.primary.step(PrimaryEvent::Disconnected)
                }
                Ok(_) | Err(RecvTimeoutError::Timeout) => Vec::new(),
            };
            actions.extend(self.primary.step(PrimaryEvent::Tick { now_ms: now }));
            if self.conn.is_none() && now >= self.next_connect_ms {
                actions.extend(self.connect(now));
            }
            if self.carry_out(actions) {
                return;
            }
            self.publish();
        }
    }

    fn connect(&mut self, now: u64) -> Vec<PrimaryAction> {
        self.next_connect_ms = now + RECONNECT_MS;
        let Ok(stream) = TcpStream::connect_timeout(&self.options.backup, CONNECT_TIMEOUT) else {
            return Vec::new();
        };
        let _ = stream.set_nodelay(true);
        let Ok(reader) = stream.try_clone() else {
            return Vec::new();
        };
        let Ok(nonce) = nonce() else {
            return Vec::new();
        };
        self.conn_id += 1;
        let Ok(connection) = Connection::new(stream, self.conn_id, self.tx.clone()) else {
            return Vec::new();
        };
        spawn_reader(reader, self.conn_id, self.tx.clone());
        self.conn = Some(connection);
        self.primary.step(PrimaryEvent::Connected { nonce })
    }

    /// Carry out actions (and those they lead to); true when the VM must stop.
    fn carry_out(&mut self, mut actions: Vec<PrimaryAction>) -> bool {
        let mut queue: std::collections::VecDeque<PrimaryAction> = actions.drain(..).collect();
        while let Some(action) = queue.pop_front() {
            match action {
                PrimaryAction::Send(bytes) => {
                    if let Some(c) = &self.conn {
                        let len = bytes.len() as u64;
                        // A failed write comes back as ToRepl::Closed from the writer.
                        if c.writer.send(bytes).is_ok() {
                            self.shared.lock().expect("not poisoned").bytes_sent += len;
                        }
                    }
                }
                PrimaryAction::ReleaseOutputs { up_to_epoch } => {
                    let _ = self.events.send(HostEvent::Released { up_to_epoch });
                }
                PrimaryAction::RenewLease { term } => {
                    let now = now_ms();
                    let answer = self.lease.renew(&self.options.holder, term, now, self.options.lease_ttl_ms);
                    let event = match &answer {
                        Ok(outcome) => PrimaryEvent::LeaseRenewal(Ok(outcome.clone())),
                        Err(e) => PrimaryEvent::LeaseRenewal(Err(e)),
                    };
                    queue.extend(self.primary.step(event));
                }
                PrimaryAction::Close { error } => {
                    self.shared.lock().expect("not poisoned").last_error = Some(error.to_string());
                    self.drop_connection();
                }
                PrimaryAction::Stop { error } => {
                    self.drop_connection();
                    let _ = self.events.send(HostEvent::ReplicationStopped(error.to_string()));
                    return true;
                }
            }
        }
        false
    }

    fn drop_connection(&mut self) {
        if let Some(conn) = self.conn.take() {
            let _ = conn.stream.shutdown(std::net::Shutdown::Both);
        }
        self.next_connect_ms = now_ms() + RECONNECT_MS;
    }

    fn publish(&self) {
        let mut shared = self.shared.lock().expect("not poisoned");
        shared.next_kind = self.primary.next_checkpoint_kind();
        shared.streaming = self.primary.is_streaming();
        shared.acked_epoch = self.primary.acked_epoch();
        shared.lease_term = self.primary.lease_term();
    }
}

/// Read the connection on a thread, forwarding bytes to the replication thread.
pub fn spawn_reader(mut stream: TcpStream, conn: u64, tx: Sender<ToRepl>) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(ToRepl::Closed { conn });
                    return;
                }
                Ok(n) => {
                    if tx.send(ToRepl::Bytes { conn, bytes: buf[..n].to_vec() }).is_err() {
                        return;
                    }
                }
            }
        }
    });
}

/// `ftvm run`'s replication options.
#[derive(clap::Args, Debug, Clone)]
pub struct ReplicationArgs {
    /// Replicate to a backup (`ftvm backup --listen HOST:PORT`): every epoch, the pages,
    /// disk sectors and device state changed since the last one go to the backup, and
    /// the guest's outputs leave only once the backup holds the epoch that made them
    #[arg(long, value_name = "HOST:PORT", requires_all = ["key", "lease"], help_heading = "Replication")]
    pub replicate_to: Option<String>,
    /// File holding the pre-shared key that authenticates the replication channel
    #[arg(long, value_name = "FILE", help_heading = "Replication")]
    pub key: Option<PathBuf>,
    /// Takeover lease file, on a path both replicas can see: whoever holds it runs the VM
    #[arg(long, value_name = "FILE", help_heading = "Replication")]
    pub lease: Option<PathBuf>,
    /// Checkpoint interval
    #[arg(long, value_name = "MS", default_value_t = 25, value_parser = clap::value_parser!(u64).range(1..=10_000), help_heading = "Replication")]
    pub epoch_ms: u64,
    /// How long the lease lasts without renewal (a dead primary's backup waits this long at most)
    #[arg(long, value_name = "MS", default_value_t = 1500, value_parser = clap::value_parser!(u64).range(100..=600_000), help_heading = "Replication")]
    pub lease_ttl_ms: u64,
    /// This replica's name in the lease [default: primary-<hostname>-<pid>]
    #[arg(long, value_name = "NAME", help_heading = "Replication")]
    pub replica_name: Option<String>,
    /// End-to-end check: every N epochs (and every full checkpoint) the checkpoint
    /// carries the whole machine's digest, which the backup recomputes after applying;
    /// a mismatch makes it ask for a full checkpoint. Costs a pass over RAM per check.
    /// 0: off
    #[arg(long, value_name = "N", default_value_t = 0, help_heading = "Replication")]
    pub verify_every: u64,
}

/// A name for the lease: unique per process.
pub fn default_holder(role: &str) -> String {
    let host = nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "host".into());
    format!("{role}-{host}-{}", std::process::id())
}

/// Start replication when `--replicate-to` was given.
pub fn from_args(
    args: &ReplicationArgs,
    config: &machine::MachineConfig,
    events: Sender<HostEvent>,
) -> Result<Option<crate::driver::Replication>> {
    let Some(addr) = &args.replicate_to else { return Ok(None) };
    let key_path = args.key.as_ref().context("--replicate-to needs --key")?;
    let lease_path = args.lease.clone().context("--replicate-to needs --lease")?;
    let options = PrimaryOptions {
        backup: super::resolve(addr)?,
        key: super::load_key(key_path)?,
        lease_path,
        holder: args.replica_name.clone().unwrap_or_else(|| default_holder("primary")),
        config_digest: machine::snapshot::config_digest(config),
        lease_ttl_ms: args.lease_ttl_ms,
    };
    let handle = start(options, events)?;
    let mut replication = crate::driver::Replication::new(handle, args.epoch_ms);
    replication.verify_every = args.verify_every;
    Ok(Some(replication))
}
