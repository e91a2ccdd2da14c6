//! `ftvm backup`: hold the last whole checkpoint of a primary's VM and take over when
//! the primary falls silent — by swapping the VM's ownership record from the generation
//! its state belongs to, so that a backup whose state is older than an output that left
//! can never go live — then announce the guest's MAC address and run the VM from that
//! checkpoint.
//!
//! The edge keeps every accepted connection apart (its own id, reader thread and socket):
//! the protocol core decides which one is the primary's, and a stranger's connection can
//! neither close the primary's nor count as a sign of its life.

use super::{nonce, now_ms, Ownership, ReplicationError};
use crate::control::{Command, ControlRequest, Reply};
use crate::log::{self, Source};
use crate::status::{BackupSide, Mode, Role, State, Status, Takeover};
use crate::vm::Vm;
type Result<T, E = ReplicationError> = std::result::Result<T, E>;
use replica::{Backup, BackupAction, BackupConfig, BackupEvent, ConnId, PresharedKey};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::time::{Duration, Instant};

const TICK: Duration = Duration::from_millis(5);
/// Room for device state and framing beyond RAM and disk in a full checkpoint.
const CHECKPOINT_SLACK_BYTES: u64 = 64 << 20;
/// Connections open at once beyond which new ones are closed at accept: the protocol
/// core keeps a few pending handshakes and drops the rest; this bounds threads and
/// descriptors even before it has seen them.
const MAX_OPEN_CONNECTIONS: usize = 64;
/// After accept fails (descriptors exhausted, say), wait this long before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// What a backup needs to wait for its primary.
pub struct BackupOptions {
    /// Bound already, so that a busy port is the caller's error, at start.
    pub listener: TcpListener,
    pub key: PresharedKey,
    /// What the handshake checks ([`super::replication_digest`]).
    pub config_digest: replica::ConfigDigest,
    pub failover_timeout_ms: u64,
    pub heartbeat_ms: u64,
}

/// How the waiting ended.
pub enum Ending<V = machine::Machine> {
    /// The VM ended on the primary with this exit code: the backup stands down.
    Exit(u32),
    /// Stopped through the control API.
    Stopped,
    /// The primary stopped replicating to this backup (`ftvm ctl unprotect`), after making
    /// its state stale: the backup stands down.
    StoodDown,
    /// This replica owns the VM now: run `machine`, which holds the checkpoint the
    /// takeover names, as the new primary.
    GoLive { machine: Box<V>, takeover: Takeover },
}

enum ToBackup {
    Accepted(TcpStream),
    /// The machine thread applied a checkpoint (or could not).
    Applied {
        epoch: u64,
        result: Result<(), ApplyFailed>,
        /// The machine's guest time after it.
        time_ticks: u64,
    },
    Bytes {
        conn: ConnId,
        bytes: Vec<u8>,
    },
    Closed {
        conn: ConnId,
    },
    Control(ControlRequest),
}

/// Why the machine thread could not apply a checkpoint.
struct ApplyFailed {
    reason: String,
    /// The digest check after applying failed: the replicas diverged.
    diverged: bool,
}

/// What the edge counts of the checkpoints it applied, for status.
#[derive(Debug, Default, Clone, Copy)]
struct Applies {
    applied: u64,
    diverged: u64,
}

/// The backup's status: what the core says, what the machine holds, what the edge counted.
fn status<V: Vm>(backup: &Backup, machine: &MachineThread<V>, applies: Applies, vm_id: &str) -> Status {
    let s = backup.status();
    Status {
        state: State::Waiting,
        role: Role::Backup,
        mode: Mode::Checkpoint,
        vm_id: Some(vm_id.to_string()),
        icount: machine.icount,
        guest_time_s: machine.time_ticks as f64 / machine::board::TIMEBASE_HZ as f64,
        reboots: None,
        epoch: s.applied_epoch.unwrap_or(0),
        replication: None,
        backup: Some(BackupSide {
            primary_connected: s.primary_connected,
            applied_epoch: s.applied_epoch,
            state_generation: s.state_generation,
            newest_generation: s.newest_generation,
            stale: s.stale,
            pending_handshakes: s.pending_handshakes as u64,
            refused_connections: s.refused_connections,
            partial_checkpoint_bytes: s.partial_bytes,
            applied_checkpoints: applies.applied,
            diverged_checkpoints: applies.diverged,
            silence_ms: s.last_heard_ms.map(|heard| now_ms().saturating_sub(heard)),
        }),
        took_over: None,
        lockstep: None,
        migration: None,
    }
}

/// Answer the control API while this replica is a backup: it holds a checkpoint and
/// does not run, so only status and stop apply.
fn answer_as_backup(request: ControlRequest, status: impl FnOnce() -> Status) -> bool {
    let (reply, stop) = match request.command {
        Command::Status => (Reply::ok(serde_json::to_value(status()).expect("a status serializes")), false),
        Command::Stop => (Reply::ok(serde_json::json!({ "state": "stopped" })), true),
        _ => (
            Reply::error(409, "this replica is a backup: it holds a checkpoint and does not run until it takes over"),
            false,
        ),
    };
    let _ = request.reply.send(reply);
    stop
}

/// The backup's machine lives on a thread of its own: applying a full checkpoint of a large
/// VM takes a while, and meanwhile the protocol must keep hearing and answering the primary
/// (heartbeats), or either side would take the pause for a failure.
struct MachineThread<V> {
    jobs: Sender<MachineJob<V>>,
    /// The icount of the last checkpoint handed over (for status).
    icount: u64,
    /// The guest time of the last checkpoint applied (for status).
    time_ticks: u64,
}

enum MachineJob<V> {
    Apply {
        epoch: u64,
        payload: Vec<u8>,
    },
    /// Stop applying and hand the machine back (to go live from it).
    GiveBack(Sender<V>),
}

impl<V: Vm + Send + 'static> MachineThread<V> {
    fn start(mut machine: V, events: Sender<ToBackup>) -> MachineThread<V> {
        let (jobs, queue) = mpsc::channel::<MachineJob<V>>();
        let (icount, time_ticks) = (machine.icount(), machine.time_ticks());
        std::thread::spawn(move || {
            for job in queue {
                match job {
                    MachineJob::Apply { epoch, payload, .. } => {
                        let result = machine
                            .apply_checkpoint(&payload)
                            .map_err(|e| ApplyFailed { diverged: V::diverged(&e), reason: super::chain(&e) });
                        let time_ticks = machine.time_ticks();
                        if events.send(ToBackup::Applied { epoch, result, time_ticks }).is_err() {
                            return;
                        }
                    }
                    MachineJob::GiveBack(reply) => {
                        let _ = reply.send(machine);
                        return;
                    }
                }
            }
        });
        MachineThread { jobs, icount, time_ticks }
    }

    fn apply(&mut self, epoch: u64, icount: u64, payload: Vec<u8>) {
        self.icount = icount;
        let _ = self.jobs.send(MachineJob::Apply { epoch, payload });
    }

    /// The machine, once every apply handed over before is done.
    fn give_back(self) -> Result<V> {
        let (reply, answer) = mpsc::channel();
        self.jobs.send(MachineJob::GiveBack(reply)).map_err(|_| ReplicationError::MachineThreadDied)?;
        answer.recv().map_err(|_| ReplicationError::MachineThreadDied)
    }
}

/// The accepted connections: the socket each action goes to.
struct Connections {
    streams: HashMap<ConnId, TcpStream>,
    next_id: ConnId,
    /// The connection the last authenticated frame came on (for logging only).
    primary: Option<ConnId>,
}

impl Connections {
    fn close(&mut self, conn: ConnId) {
        if let Some(stream) = self.streams.remove(&conn) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Wait for a primary (`ftvm run --replicate-to`), keep its last whole checkpoint, and
/// take the VM over when the primary stops being heard. Control requests (status, stop)
/// are answered as a backup meanwhile.
pub fn wait<V: Vm + Send + 'static>(
    options: BackupOptions,
    machine: V,
    ownership: &mut Ownership,
    control: Receiver<ControlRequest>,
) -> Result<Ending<V>> {
    let disk_bytes = machine.disk_sectors().unwrap_or(0) * 512;
    let limit = machine.page_count() as u64 * 4096 + disk_bytes + CHECKPOINT_SLACK_BYTES;
    let mut backup_config = BackupConfig::new(options.key, options.config_digest, limit);
    backup_config.failover_timeout_ms = options.failover_timeout_ms;
    backup_config.heartbeat_interval_ms = options.heartbeat_ms;
    let mut backup = Backup::new(backup_config, now_ms());
    let (tx, rx) = mpsc::channel();
    spawn_acceptor(options.listener, tx.clone());
    let mut machine = MachineThread::start(machine, tx.clone());
    let forward = tx.clone();
    std::thread::spawn(move || {
        for request in control {
            if forward.send(ToBackup::Control(request)).is_err() {
                return;
            }
        }
    });

    let mut conns = Connections { streams: HashMap::new(), next_id: 0, primary: None };
    let mut applies = Applies::default();
    let mut last_report = Instant::now();
    let mut last_tick = Instant::now();
    loop {
        // Everything already queued goes in before the clock does: a tick must never find
        // the primary silent while its frames wait in the queue. Only once the primary was
        // heard may a long stream of its frames (a full checkpoint of a large VM) be cut for
        // a tick, so that this side's heartbeats keep going out meanwhile.
        let mut actions = Vec::new();
        let mut message = rx.recv_timeout(TICK);
        loop {
            let mut heard_primary = false;
            match message {
                Ok(ToBackup::Accepted(stream)) => actions.extend(accept(&mut backup, &mut conns, stream, &tx)?),
                Ok(ToBackup::Bytes { conn, bytes }) => {
                    actions.extend(backup.step(BackupEvent::Received { conn, bytes: &bytes }));
                    if let Some(primary) = backup.primary_conn() {
                        conns.primary = Some(primary);
                        heard_primary = primary == conn;
                    }
                }
                Ok(ToBackup::Closed { conn }) => {
                    conns.close(conn);
                    actions.extend(backup.step(BackupEvent::Disconnected { conn }));
                }
                Ok(ToBackup::Applied { epoch, result, time_ticks }) => {
                    machine.time_ticks = time_ticks;
                    let event = match result {
                        Ok(()) => {
                            applies.applied += 1;
                            BackupEvent::CheckpointApplied { epoch }
                        }
                        Err(ApplyFailed { reason, diverged }) => {
                            applies.diverged += diverged as u64;
                            log::line(
                                Source::Backup,
                                format_args!("checkpoint {epoch} not applied: {reason}; asking for a full checkpoint"),
                            );
                            BackupEvent::ApplyFailed { epoch, reason }
                        }
                    };
                    actions.extend(backup.step(event));
                }
                Ok(ToBackup::Control(request)) => {
                    if answer_as_backup(request, || status(&backup, &machine, applies, &ownership.vm_id)) {
                        return Ok(Ending::Stopped);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(ReplicationError::ListenerStopped),
            }
            // Handle what the last message led to before taking the next one (an apply
            // may take a while; the queue keeps meanwhile).
            if let Some(ending) = carry_out(&mut backup, &mut conns, &mut machine, ownership, &mut actions)? {
                return finish(ending, &backup, applies, machine);
            }
            if heard_primary && last_tick.elapsed() >= TICK {
                break;
            }
            message = match rx.try_recv() {
                Ok(m) => Ok(m),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => Err(RecvTimeoutError::Disconnected),
            };
        }
        last_tick = Instant::now();
        actions.extend(backup.step(BackupEvent::Tick { now_ms: now_ms() }));
        if let Some(ending) = carry_out(&mut backup, &mut conns, &mut machine, ownership, &mut actions)? {
            return finish(ending, &backup, applies, machine);
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            let s = backup.status();
            match s.applied_epoch {
                Some(epoch) => log::line(
                    Source::Backup,
                    format_args!(
                        "holding epoch {epoch} (icount {}), generation {:?}{}",
                        machine.icount,
                        s.state_generation,
                        if s.stale { ", stale" } else { "" }
                    ),
                ),
                None => log::line(Source::Backup, "no checkpoint yet"),
            }
        }
    }
}

/// What ends the waiting, as the core decided it.
enum Decided {
    Exit(u32),
    StoodDown,
    GoLive { epoch: u64, generation: u64 },
}

/// The machine is ready (every checkpoint handed over applied) when a takeover goes live:
/// its time counts from the old primary's last authenticated frame to here.
fn finish<V: Vm + Send + 'static>(
    decided: Decided,
    backup: &Backup,
    applies: Applies,
    machine: MachineThread<V>,
) -> Result<Ending<V>> {
    Ok(match decided {
        Decided::Exit(code) => Ending::Exit(code),
        Decided::StoodDown => Ending::StoodDown,
        Decided::GoLive { epoch, generation } => {
            let machine = Box::new(machine.give_back()?);
            let heard_ms = backup.status().last_heard_ms;
            let takeover = Takeover {
                epoch,
                generation,
                last_frame_to_live_ms: heard_ms.map_or(0, |heard| now_ms().saturating_sub(heard)),
                diverged_checkpoints: applies.diverged,
                migration: super::migrate::arrival(backup.handover()),
            };
            Ending::GoLive { machine, takeover }
        }
    })
}

fn accept(
    backup: &mut Backup,
    conns: &mut Connections,
    stream: TcpStream,
    tx: &Sender<ToBackup>,
) -> Result<Vec<BackupAction>> {
    if conns.streams.len() >= MAX_OPEN_CONNECTIONS {
        let _ = stream.shutdown(std::net::Shutdown::Both);
        return Ok(Vec::new());
    }
    let Ok(reader) = stream.try_clone() else {
        return Ok(Vec::new()); // out of descriptors: refuse this one, keep the rest
    };
    super::tune_link(&stream);
    conns.next_id += 1;
    let conn = conns.next_id;
    spawn_reader(reader, conn, tx.clone());
    conns.streams.insert(conn, stream);
    Ok(backup.step(BackupEvent::Connected { conn, nonce: nonce()? }))
}

/// Carry out the core's actions and those they lead to; `Some` when the waiting is over.
fn carry_out<V: Vm + Send + 'static>(
    backup: &mut Backup,
    conns: &mut Connections,
    machine: &mut MachineThread<V>,
    ownership: &mut Ownership,
    actions: &mut Vec<BackupAction>,
) -> Result<Option<Decided>> {
    let mut queue: std::collections::VecDeque<BackupAction> = std::mem::take(actions).into();
    while let Some(action) = queue.pop_front() {
        match action {
            BackupAction::Send { conn, bytes } => {
                let failed = conns.streams.get_mut(&conn).is_some_and(|s| s.write_all(&bytes).is_err());
                if failed {
                    conns.close(conn);
                    queue.extend(backup.step(BackupEvent::Disconnected { conn }));
                }
            }
            BackupAction::ApplyCheckpoint { epoch, icount, payload, .. } => machine.apply(epoch, icount, payload),
            BackupAction::Close { conn, error } => {
                // Strangers come and go by the hundred: their refusals are counted in the
                // status (refused_connections), not logged one by one.
                use replica::ProtocolError as E;
                let stranger = matches!(error, E::HandshakeTimeout { .. } | E::TooManyHandshakes | E::Wire(_));
                if !stranger || conns.primary == Some(conn) {
                    log::line(Source::Backup, format_args!("connection {conn} closed: {error}"));
                }
                conns.close(conn);
            }
            BackupAction::ClaimOwnership { generation } => {
                super::migrate::before_claim(backup);
                let answer = ownership.swap(generation, None);
                super::migrate::after_claim(backup, &answer);
                queue.extend(backup.step(BackupEvent::Claim(answer)));
            }
            BackupAction::CannotTakeOver { reason } => log::line(Source::Backup, reason),
            BackupAction::ReadOwnership => {
                let answer = ownership.read();
                queue.extend(backup.step(BackupEvent::Ownership(answer)));
            }
            BackupAction::GoLive { epoch, icount, generation } => {
                match backup.handover() {
                    Some(handover) => super::migrate::log_arrival(epoch, icount, generation, handover),
                    None => log::line(
                        Source::Backup,
                        format_args!(
                            "the primary fell silent; taking over at epoch {epoch} (icount {icount}), ownership \
                             generation {generation}"
                        ),
                    ),
                }
                for conn in conns.streams.keys().copied().collect::<Vec<_>>() {
                    conns.close(conn);
                }
                return Ok(Some(Decided::GoLive { epoch, generation }));
            }
            BackupAction::Exit { exit_code } => {
                for conn in conns.streams.keys().copied().collect::<Vec<_>>() {
                    conns.close(conn);
                }
                return Ok(Some(Decided::Exit(exit_code)));
            }
            BackupAction::StandDown => {
                for conn in conns.streams.keys().copied().collect::<Vec<_>>() {
                    conns.close(conn);
                }
                return Ok(Some(Decided::StoodDown));
            }
        }
    }
    Ok(None)
}

fn spawn_acceptor(listener: TcpListener, tx: Sender<ToBackup>) {
    std::thread::spawn(move || loop {
        match listener.accept() {
            Ok((stream, _)) => {
                if tx.send(ToBackup::Accepted(stream)).is_err() {
                    return;
                }
            }
            // Out of descriptors (EMFILE) or a connection reset before accept: the backup
            // refuses new connections for a moment and keeps the link it has.
            Err(_) => std::thread::sleep(ACCEPT_BACKOFF),
        }
    });
}

fn spawn_reader(mut stream: TcpStream, conn: ConnId, tx: Sender<ToBackup>) {
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
