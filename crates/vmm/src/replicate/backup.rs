//! The checkpoint backup's protocol thread: it owns the protocol core
//! ([`replica::Backup`]), the listening socket, every accepted connection and the VM's
//! ownership record while the backup waits. Whole checkpoints go to the driver's thread,
//! which owns the stopped machine and applies them ([`crate::mode::backup::CheckpointBackup`]
//! answers [`ModeEvent::Apply`] and sends [`ToBackup::Applied`] back); the protocol keeps
//! hearing and answering the primary meanwhile, so a long apply never looks like a failure.
//! When the primary falls silent the thread takes over — by swapping the VM's ownership
//! record from the generation its state belongs to, so that a backup whose state is older
//! than an output that left can never go live — and tells the driver to go live
//! ([`ModeEvent::TookOver`], after every apply it handed over); or it tells it to stand
//! down ([`ModeEvent::EndedOnPrimary`], [`ModeEvent::Unprotected`]). Either way it hands the
//! record back as it ends ([`BackupHandle::finish`]).
//!
//! The edge keeps every accepted connection apart (its own id, reader thread and socket):
//! the protocol core decides which one is the primary's, and a stranger's connection can
//! neither close the primary's nor count as a sign of its life.

use super::{nonce, now_ms, Ownership, ReplicationError};
use crate::host::HostEvent;
use crate::log::{self, Source};
use crate::mode::ModeEvent;
type Result<T, E = ReplicationError> = std::result::Result<T, E>;
use replica::{Backup, BackupAction, BackupConfig, BackupEvent, BackupKept, BackupStatus, ConnId, PresharedKey};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
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
/// Refused connections are logged one line each, up to this many a second for each reason
/// and this many a second in all; the rest of the second's are counted in one line (a flood
/// must not flood the log, nor hide that it happened, nor hide one kind behind another).
const REFUSAL_LINES_PER_REASON: u32 = 3;
const REFUSAL_LINES_PER_S: u32 = 16;

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

/// Messages into the protocol thread.
pub enum ToBackup {
    Accepted(TcpStream),
    /// The driver applied the checkpoint of `epoch` to the machine (or could not).
    Applied {
        epoch: u64,
        result: std::result::Result<(), ApplyFailed>,
    },
    Bytes {
        conn: ConnId,
        bytes: Vec<u8>,
    },
    Closed {
        conn: ConnId,
    },
    /// The machine no longer holds the primary's state (a lockstep backup diverged after it
    /// acknowledged): the protocol drops it and gets a full checkpoint on the next connection.
    StateLost {
        reason: String,
    },
    /// A lockstep backup's machine has executed up to `icount`: a batch whose
    /// acknowledgement waits for it to catch up ([`replica::lockstep::follower::ack_now`])
    /// may be acknowledged.
    Executed {
        icount: u64,
    },
    /// Stop waiting (the backup was stopped): close every connection, hand the record back.
    Shutdown,
}

/// Why the machine could not apply a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyFailed {
    pub reason: String,
    /// The digest check after applying failed: the replicas diverged.
    pub diverged: bool,
}

/// What the driver may read of the protocol at any time (for status).
#[derive(Debug, Clone)]
pub struct Shared {
    pub status: BackupStatus,
    /// The icount of the last checkpoint handed over to be applied.
    pub handed_icount: Option<u64>,
}

/// The protocol thread, seen from the mode.
pub struct BackupHandle {
    pub tx: Sender<ToBackup>,
    pub shared: Arc<Mutex<Shared>>,
    thread: Option<std::thread::JoinHandle<Ownership>>,
}

impl BackupHandle {
    /// Shut the thread down (if it still waits) and take the ownership record back (None if
    /// the thread died).
    pub fn finish(mut self) -> Option<Ownership> {
        let _ = self.tx.send(ToBackup::Shutdown);
        self.thread.take().and_then(|thread| thread.join().ok())
    }
}

impl Drop for BackupHandle {
    fn drop(&mut self) {
        let _ = self.tx.send(ToBackup::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// How much a checkpoint may hold for a machine of `page_count` pages and a disk of
/// `disk_sectors` (the protocol refuses a larger one before it allocates).
pub fn checkpoint_limit_bytes(page_count: usize, disk_sectors: Option<u64>) -> u64 {
    page_count as u64 * 4096 + disk_sectors.unwrap_or(0) * 512 + CHECKPOINT_SLACK_BYTES
}

/// Start waiting for a primary (`ftvm run --replicate-to`, `ctl protect`) on the listener
/// of `options`, holding `ownership`; checkpoints of at most `limit_bytes` go to the driver
/// through `events`.
pub fn start(
    options: BackupOptions,
    ownership: Ownership,
    events: Sender<HostEvent>,
    limit_bytes: u64,
) -> Result<BackupHandle> {
    start_from(options, ownership, events, limit_bytes, None)
}

/// [`start`], for a backup whose process restarted with its machine holding `kept.applied`
/// again (`ftvm backup --resilient`): the protocol resumes from what it kept
/// ([`Backup::resume`]).
pub fn start_from(
    options: BackupOptions,
    ownership: Ownership,
    events: Sender<HostEvent>,
    limit_bytes: u64,
    kept: Option<BackupKept>,
) -> Result<BackupHandle> {
    let mut backup_config = BackupConfig::new(options.key, options.config_digest, limit_bytes);
    backup_config.failover_timeout_ms = options.failover_timeout_ms;
    backup_config.heartbeat_interval_ms = options.heartbeat_ms;
    let backup = match kept {
        Some(kept) => Backup::resume(backup_config, now_ms(), kept),
        None => Backup::new(backup_config, now_ms()),
    };
    let shared = Arc::new(Mutex::new(Shared { status: backup.status(), handed_icount: None }));
    let (tx, rx) = mpsc::channel();
    spawn_acceptor(options.listener, tx.clone());
    let mut waiting = Waiting {
        backup,
        rx,
        tx: tx.clone(),
        events,
        shared: shared.clone(),
        ownership,
        conns: Connections { streams: HashMap::new(), next_id: 0, primary: None },
        handed_icount: None,
        executed_icount: 0,
        deferred_ack: None,
        timeline: super::migrate::Timeline::default(),
        refusals: RefusalLog::new(),
    };
    let thread = std::thread::Builder::new()
        .name("backup".into())
        .spawn(move || {
            if let Err(e) = waiting.run() {
                // The driver stops with this message (the mode fences itself off).
                let _ = waiting.events.send(HostEvent::Mode(ModeEvent::Stopped(super::chain(&e))));
            }
            waiting.close_all();
            waiting.ownership
        })
        .map_err(ReplicationError::Thread)?;
    Ok(BackupHandle { tx, shared, thread: Some(thread) })
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

/// The log of refused connections (strangers, mostly): one line each, naming the peer and
/// the reason, up to [`REFUSAL_LINES_PER_REASON`] a second for each reason and
/// [`REFUSAL_LINES_PER_S`] in all; then one line a second counting the rest (status
/// `refused_connections` counts them all).
struct RefusalLog {
    since: Instant,
    lines: u32,
    by_reason: HashMap<Reason, u32>,
    unlogged: u64,
}

/// Which kind of refusal a line is (the error's variant, and the wire error's within it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Reason {
    AtAccept,
    Protocol(std::mem::Discriminant<replica::ProtocolError>, Option<std::mem::Discriminant<replica::WireError>>),
}

impl Reason {
    fn of(error: &replica::ProtocolError) -> Reason {
        let wire = match error {
            replica::ProtocolError::Wire(w) => Some(std::mem::discriminant(w)),
            _ => None,
        };
        Reason::Protocol(std::mem::discriminant(error), wire)
    }
}

impl RefusalLog {
    fn new() -> RefusalLog {
        RefusalLog { since: Instant::now(), lines: 0, by_reason: HashMap::new(), unlogged: 0 }
    }

    /// A connection from `peer` was refused (or closed before it authenticated) for `why`.
    fn refused(
        &mut self,
        conn: ConnId,
        peer: Option<std::net::SocketAddr>,
        reason: Reason,
        why: &dyn std::fmt::Display,
    ) {
        self.roll();
        let of_reason = self.by_reason.entry(reason).or_default();
        if self.lines >= REFUSAL_LINES_PER_S || *of_reason >= REFUSAL_LINES_PER_REASON {
            self.unlogged += 1;
            return;
        }
        *of_reason += 1;
        self.lines += 1;
        let peer = peer.map_or_else(|| "an unknown peer".to_string(), |p| p.to_string());
        log::line(Source::Backup, format_args!("connection {conn} from {peer} refused: {why}"));
    }

    /// A new second: say how many went unlogged in the last.
    fn roll(&mut self) {
        if self.since.elapsed() < Duration::from_secs(1) {
            return;
        }
        if self.unlogged > 0 {
            log::line(
                Source::Backup,
                format_args!(
                    "{} more connections refused in the last {:.1} s (not logged one by one)",
                    self.unlogged,
                    self.since.elapsed().as_secs_f64()
                ),
            );
        }
        *self = RefusalLog::new();
    }
}

/// The protocol thread's state.
struct Waiting {
    backup: Backup,
    rx: Receiver<ToBackup>,
    tx: Sender<ToBackup>,
    /// The driver's event channel.
    events: Sender<HostEvent>,
    shared: Arc<Mutex<Shared>>,
    ownership: Ownership,
    conns: Connections,
    handed_icount: Option<u64>,
    /// Lockstep: how far the follower's machine has executed, and the batch (epoch, end
    /// icount) whose acknowledgement waits for it to catch up (bounded lag).
    executed_icount: u64,
    deferred_ack: Option<(u64, u64)>,
    /// A switchover's steps, for the downtime's breakdown.
    timeline: super::migrate::Timeline,
    refusals: RefusalLog,
}

/// What ends the waiting, as the core decided it (or the driver asked).
enum Decided {
    Exit(u32),
    StoodDown,
    GoLive { epoch: u64, generation: u64 },
}

impl Waiting {
    /// Hear the primary, keep its last whole checkpoint (applied on the driver's thread),
    /// and take the VM over when it stops being heard; until the waiting ends.
    fn run(&mut self) -> Result<()> {
        let mut last_report = Instant::now();
        let mut last_tick = Instant::now();
        loop {
            // Everything already queued goes in before the clock does: a tick must never find
            // the primary silent while its frames wait in the queue. Only once the primary was
            // heard may a long stream of its frames (a full checkpoint of a large VM) be cut for
            // a tick, so that this side's heartbeats keep going out meanwhile.
            let mut actions = Vec::new();
            let mut message = self.rx.recv_timeout(TICK);
            loop {
                let heard_primary = match message {
                    Ok(ToBackup::Shutdown) => return Ok(()),
                    Ok(message) => {
                        let (more, heard) = self.on_message(message)?;
                        actions.extend(more);
                        heard
                    }
                    Err(RecvTimeoutError::Timeout) => false,
                    Err(RecvTimeoutError::Disconnected) => return Err(ReplicationError::ListenerStopped),
                };
                // Handle what the last message led to before taking the next one (an apply
                // may take a while; the queue keeps meanwhile).
                if let Some(decided) = self.carry_out(&mut actions)? {
                    return self.end(decided);
                }
                if heard_primary && last_tick.elapsed() >= TICK {
                    break;
                }
                message = match self.rx.try_recv() {
                    Ok(m) => Ok(m),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => Err(RecvTimeoutError::Disconnected),
                };
            }
            last_tick = Instant::now();
            actions.extend(self.backup.step(BackupEvent::Tick { now_ms: now_ms() }));
            if let Some(decided) = self.carry_out(&mut actions)? {
                return self.end(decided);
            }
            self.publish();
            self.refusals.roll();
            if last_report.elapsed() >= Duration::from_secs(5) {
                last_report = Instant::now();
                self.report();
            }
        }
    }

    /// One message in: the core's actions, and whether it was the primary's frame.
    fn on_message(&mut self, message: ToBackup) -> Result<(Vec<BackupAction>, bool)> {
        Ok(match message {
            ToBackup::Accepted(stream) => (self.accept(stream)?, false),
            ToBackup::Bytes { conn, bytes } => {
                let actions = self.backup.step(BackupEvent::Received { conn, bytes: &bytes });
                let primary = self.backup.primary_conn();
                if primary.is_some() {
                    self.conns.primary = primary;
                }
                (actions, primary == Some(conn))
            }
            ToBackup::Closed { conn } => {
                self.conns.close(conn);
                (self.backup.step(BackupEvent::Disconnected { conn }), false)
            }
            ToBackup::Applied { epoch, result } => {
                let event = match result {
                    Ok(()) => {
                        self.timeline.applied();
                        BackupEvent::CheckpointApplied { epoch }
                    }
                    Err(ApplyFailed { reason, .. }) => {
                        log::line(
                            Source::Backup,
                            format_args!("checkpoint {epoch} not applied: {reason}; asking for a full checkpoint"),
                        );
                        BackupEvent::ApplyFailed { epoch, reason }
                    }
                };
                (self.backup.step(event), false)
            }
            // A batch whose acknowledgement waited is not held any more: as a failed apply.
            ToBackup::StateLost { reason } => match self.deferred_ack.take() {
                Some((epoch, _)) => (self.backup.step(BackupEvent::ApplyFailed { epoch, reason }), false),
                None => (self.backup.step(BackupEvent::StateLost { reason }), false),
            },
            ToBackup::Executed { icount } => {
                self.executed_icount = icount;
                match self.deferred_ack {
                    Some((epoch, end)) if replica::lockstep::follower::ack_now(end, icount) => {
                        self.deferred_ack = None;
                        (self.backup.step(BackupEvent::CheckpointApplied { epoch }), false)
                    }
                    _ => (Vec::new(), false),
                }
            }
            ToBackup::Shutdown => (Vec::new(), false), // taken in `run`
        })
    }

    /// The status the driver reads.
    fn publish(&self) {
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        shared.status = self.backup.status();
        shared.handed_icount = self.handed_icount;
    }

    fn report(&self) {
        let s = self.backup.status();
        match s.applied_epoch {
            Some(epoch) => log::line(
                Source::Backup,
                format_args!(
                    "holding epoch {epoch} (icount {}), generation {:?}{}",
                    self.handed_icount.unwrap_or(0),
                    s.state_generation,
                    if s.stale { ", stale" } else { "" }
                ),
            ),
            None => log::line(Source::Backup, "no checkpoint yet"),
        }
    }

    /// The waiting is over: tell the driver (after every apply handed over, which go the same
    /// way and so come first).
    fn end(&mut self, decided: Decided) -> Result<()> {
        self.publish();
        let event = match decided {
            Decided::Exit(exit_code) => ModeEvent::EndedOnPrimary { exit_code },
            Decided::StoodDown => ModeEvent::Unprotected,
            Decided::GoLive { epoch, generation } => ModeEvent::TookOver {
                epoch,
                generation,
                last_heard_ms: self.backup.status().last_heard_ms,
                migration: super::migrate::arrival(self.backup.handover(), &self.timeline),
            },
        };
        let _ = self.events.send(HostEvent::Mode(event));
        Ok(())
    }

    fn close_all(&mut self) {
        for conn in self.conns.streams.keys().copied().collect::<Vec<_>>() {
            self.conns.close(conn);
        }
    }

    fn accept(&mut self, stream: TcpStream) -> Result<Vec<BackupAction>> {
        self.conns.next_id += 1;
        let conn = self.conns.next_id;
        if self.conns.streams.len() >= MAX_OPEN_CONNECTIONS {
            let why = format_args!("{MAX_OPEN_CONNECTIONS} connections are open already");
            self.refusals.refused(conn, stream.peer_addr().ok(), Reason::AtAccept, &why);
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return Ok(Vec::new());
        }
        let reader = match stream.try_clone() {
            Ok(reader) => reader,
            Err(e) => {
                // Out of descriptors: refuse this one, keep the rest.
                let why = format_args!("cannot read it: {e}");
                self.refusals.refused(conn, stream.peer_addr().ok(), Reason::AtAccept, &why);
                let _ = stream.shutdown(std::net::Shutdown::Both);
                return Ok(Vec::new());
            }
        };
        super::tune_link(&stream);
        spawn_reader(reader, conn, self.tx.clone());
        self.conns.streams.insert(conn, stream);
        Ok(self.backup.step(BackupEvent::Connected { conn, nonce: nonce()? }))
    }

    /// Carry out the core's actions and those they lead to; `Some` when the waiting is over.
    fn carry_out(&mut self, actions: &mut Vec<BackupAction>) -> Result<Option<Decided>> {
        let mut queue: std::collections::VecDeque<BackupAction> = std::mem::take(actions).into();
        // A switchover's swap, answered before it was durable: made durable once what it led
        // to (`SwitchedOver`) is on its way, before any later event (`HandedOver`) comes in.
        let mut unsynced = false;
        while let Some(action) = queue.pop_front() {
            match action {
                BackupAction::Send { conn, bytes } => {
                    let failed = self.conns.streams.get_mut(&conn).is_some_and(|s| s.write_all(&bytes).is_err());
                    if failed {
                        self.conns.close(conn);
                        queue.extend(self.backup.step(BackupEvent::Disconnected { conn }));
                    }
                }
                BackupAction::ApplyCheckpoint { run_id, epoch, icount, payload, .. } => {
                    self.handed_icount = Some(icount);
                    self.timeline.handed();
                    // A lockstep batch is held once this process has it (its follower answers
                    // a divergence with StateLost): acknowledged now, without waiting for the
                    // driver, which runs the machine meanwhile.
                    let lockstep = replica::lockstep::is_lockstep(&payload);
                    let apply = ModeEvent::Apply { run_id, epoch, icount, payload };
                    if self.events.send(HostEvent::Mode(apply)).is_err() {
                        return Err(ReplicationError::DriverGone);
                    }
                    if lockstep && !replica::lockstep::follower::ack_now(icount, self.executed_icount) {
                        // Bounded lag: acknowledged once the follower's machine catches up.
                        self.deferred_ack = Some((epoch, icount));
                    } else if lockstep {
                        queue.extend(self.backup.step(BackupEvent::CheckpointApplied { epoch }));
                    }
                }
                BackupAction::Close { conn, error } => {
                    // Strangers come and go by the hundred: each gets a line, up to a few a
                    // second (status refused_connections counts them all).
                    match self.conns.primary == Some(conn) {
                        true => log::line(Source::Backup, format_args!("connection {conn} closed: {error}")),
                        false => {
                            let peer = self.conns.streams.get(&conn).and_then(|s| s.peer_addr().ok());
                            self.refusals.refused(conn, peer, Reason::of(&error), &error);
                        }
                    }
                    self.conns.close(conn);
                }
                BackupAction::ClaimOwnership { generation } => {
                    super::migrate::before_claim(&self.backup, &mut self.timeline);
                    // Safe to answer before the swap is durable: every replica reads the new
                    // record from now on, and this one runs only after the sync below.
                    let visible = self.backup.claim_awaits_handover();
                    let answer = match visible {
                        true => self.ownership.swap_visible(generation),
                        false => self.ownership.swap(generation, None),
                    };
                    unsynced |= visible && matches!(answer, Ok(replica::SwapAnswer::Swapped { .. }));
                    super::migrate::after_claim(&self.backup, &answer, &mut self.timeline);
                    queue.extend(self.backup.step(BackupEvent::Claim(answer)));
                }
                BackupAction::CannotTakeOver { reason } => log::line(Source::Backup, reason),
                BackupAction::ReadOwnership => {
                    let answer = self.ownership.read();
                    queue.extend(self.backup.step(BackupEvent::Ownership(answer)));
                }
                BackupAction::GoLive { epoch, icount, generation } => {
                    match self.backup.handover() {
                        Some(handover) => super::migrate::log_arrival(epoch, icount, generation, handover),
                        None => log::line(
                            Source::Backup,
                            format_args!(
                                "the primary fell silent; taking over at epoch {epoch} (icount {icount}), ownership \
                                 generation {generation}"
                            ),
                        ),
                    }
                    self.close_all();
                    return Ok(Some(Decided::GoLive { epoch, generation }));
                }
                BackupAction::Exit { exit_code } => {
                    self.close_all();
                    return Ok(Some(Decided::Exit(exit_code)));
                }
                BackupAction::StandDown => {
                    self.close_all();
                    return Ok(Some(Decided::StoodDown));
                }
            }
        }
        if unsynced {
            let started = Instant::now();
            if let Err(e) = self.ownership.sync() {
                // Every replica sees the swap; only a crash of the store's host could undo it.
                log::warn(format_args!(
                    "the switchover's swap may not survive a crash of the store: {}",
                    super::chain(&e)
                ));
            }
            self.timeline.synced(started.elapsed().as_micros() as u64);
        }
        Ok(None)
    }
}

fn spawn_acceptor(listener: TcpListener, tx: Sender<ToBackup>) {
    std::thread::spawn(move || {
        let mut said: Option<Instant> = None;
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    // Once the waiting is over the stream is dropped (closed) and so is the
                    // listener: later connections are refused by the kernel.
                    if tx.send(ToBackup::Accepted(stream)).is_err() {
                        return;
                    }
                }
                // Out of descriptors (EMFILE) or a connection reset before accept: the backup
                // refuses new connections for a moment and keeps the link it has.
                Err(e) => {
                    if said.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                        said = Some(Instant::now());
                        log::line(Source::Backup, format_args!("cannot accept a connection: {e}; retrying"));
                    }
                    std::thread::sleep(ACCEPT_BACKOFF);
                }
            }
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
