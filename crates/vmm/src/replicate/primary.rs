//! The primary's replication thread: it owns the protocol state machine, the TCP
//! connection to the backup and the VM's ownership record. The VM's driver hands it
//! checkpoints; it hands back output releases (output commit) and, if another replica
//! took the VM over, the order to stop. The guest never waits for the network: checkpoints
//! are sent here, in the background, while the next epoch runs; connecting happens on a
//! thread of its own, so that a dead link never holds up a decision. Once replication is
//! stopped (unprotect, [`ToRepl::Unprotect`]), the thread hands the ownership record back
//! when it is shut down ([`PrimaryHandle::finish`]).

use super::{nonce, now_ms, Ownership, ReplicationError};
use crate::host::HostEvent;
use crate::log::{self, Source::Replication};
use crate::mode::ModeEvent;
use replica::{
    BackupLossPolicy, CheckpointKind, ConfigDigest, PresharedKey, Primary, PrimaryAction, PrimaryConfig, PrimaryEvent,
    PrimaryStatus, ProtocolError,
};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often the protocol hears the time (heartbeats and timeouts are multiples).
const TICK: Duration = Duration::from_millis(5);
/// Waits between connection attempts to the backup: the first at once, then doubling.
const RECONNECT_FIRST_MS: u64 = 5;
const RECONNECT_MAX_MS: u64 = 300;
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a connection closed after its last writes (StandDown, End) may go without sending
/// anything before it is cut: its last writes may queue behind a large checkpoint, and a
/// loaded host sends slowly. A bound on the silence of the writes, not on their total time:
/// with 5 s in all, a StandDown behind a backlog of checkpoints was cut off at load 20, and
/// the backup, never told, waited for ever.
const LINGER: Duration = Duration::from_secs(5);

/// Messages into the replication thread.
pub enum ToRepl {
    Checkpoint {
        epoch: u64,
        icount: u64,
        kind: CheckpointKind,
        payload: Vec<u8>,
    },
    VmEnded {
        epoch: u64,
        exit_code: u32,
    },
    /// Live migration: hand the VM to the backup (the machine is paused at its final checkpoint).
    Switchover {
        paused_at_unix_us: u64,
    },
    /// Stop replicating; `ModeEvent::Detached` answers once no backup can take over.
    Unprotect,
    Connected {
        stream: TcpStream,
    },
    ConnectFailed,
    Bytes {
        conn: u64,
        bytes: Vec<u8>,
    },
    Closed {
        conn: u64,
    },
    Shutdown,
}

/// What the driver may read of the replication state at any time.
#[derive(Debug, Clone)]
pub struct Shared {
    /// The kind of checkpoint the protocol wants next.
    pub next_kind: CheckpointKind,
    /// The newest checkpoint epoch the protocol had been given when it said `next_kind`.
    pub taken_epoch: Option<u64>,
    pub status: PrimaryStatus,
    pub bytes_sent: u64,
    pub last_error: Option<String>,
}

pub struct PrimaryOptions {
    pub backup: SocketAddr,
    pub key: PresharedKey,
    pub heartbeat_ms: u64,
    pub on_backup_loss: BackupLossPolicy,
    pub backup_loss_grace_ms: u64,
}

pub struct PrimaryHandle {
    pub tx: Sender<ToRepl>,
    pub shared: Arc<Mutex<Shared>>,
    /// Where the backup is.
    pub backup: SocketAddr,
    /// This run's id (it names its checkpoints).
    pub run_id: u64,
    thread: Option<std::thread::JoinHandle<Ownership>>,
}

impl PrimaryHandle {
    /// Shut the thread down and take the ownership record back (None if the thread died).
    pub fn finish(mut self) -> Option<Ownership> {
        let _ = self.tx.send(ToRepl::Shutdown);
        self.thread.take().and_then(|thread| thread.join().ok())
    }
}

impl Drop for PrimaryHandle {
    fn drop(&mut self) {
        let _ = self.tx.send(ToRepl::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Start the replication thread of a primary that owns the VM's record (at the
/// generation it holds now).
pub fn start(
    options: PrimaryOptions,
    ownership: Ownership,
    events: Sender<HostEvent>,
) -> Result<PrimaryHandle, ReplicationError> {
    start_run(options, ownership, events, None)
}

/// [`start`]; with `resume`, take up run `.0` again where [`replica::ResumeRun`] says (a
/// restarted `--resilient` primary: [`replica::Primary::resume`]), rather than a new run.
pub fn start_run(
    options: PrimaryOptions,
    ownership: Ownership,
    events: Sender<HostEvent>,
    resume: Option<(u64, replica::ResumeRun)>,
) -> Result<PrimaryHandle, ReplicationError> {
    let run_id = match resume {
        Some((run_id, _)) => run_id,
        None => u64::from_le_bytes(super::random()?),
    };
    let config_digest: ConfigDigest = ownership.replication_digest;
    let mut config = PrimaryConfig::new(options.key.clone(), config_digest, run_id);
    config.heartbeat_interval_ms = options.heartbeat_ms;
    config.on_backup_loss = options.on_backup_loss;
    config.backup_loss_grace_ms = options.backup_loss_grace_ms;
    config.earlier_run_protected = ownership.resumed;
    let primary = match resume {
        Some((_, at)) => Primary::resume(config, ownership.generation, now_ms(), at),
        None => Primary::new(config, ownership.generation, now_ms()),
    };
    let shared = Arc::new(Mutex::new(Shared {
        next_kind: primary.next_checkpoint_kind(),
        taken_epoch: None,
        status: primary.status(),
        bytes_sent: 0,
        last_error: None,
    }));
    let (tx, rx) = mpsc::channel();
    let backup = options.backup;
    let mut thread = ReplThread {
        primary,
        rx,
        tx: tx.clone(),
        events,
        shared: shared.clone(),
        ownership,
        options,
        conn: None,
        conn_id: 0,
        connecting: false,
        next_connect_ms: 0,
        reconnect_wait_ms: RECONNECT_FIRST_MS,
        stopped: false,
    };
    let handle = std::thread::Builder::new()
        .name("replication".into())
        .spawn(move || {
            thread.run();
            thread.ownership
        })
        .map_err(ReplicationError::Thread)?;
    Ok(PrimaryHandle { tx, shared, backup, run_id, thread: Some(handle) })
}

struct ReplThread {
    primary: Primary,
    rx: Receiver<ToRepl>,
    tx: Sender<ToRepl>,
    events: Sender<HostEvent>,
    shared: Arc<Mutex<Shared>>,
    ownership: Ownership,
    options: PrimaryOptions,
    conn: Option<Connection>,
    conn_id: u64,
    connecting: bool,
    next_connect_ms: u64,
    reconnect_wait_ms: u64,
    stopped: bool,
}

/// A connection to the backup: writes go through a writer thread, so that sending a
/// large checkpoint never keeps the protocol thread from its heartbeats and decisions.
struct Connection {
    stream: TcpStream,
    writer: Sender<Vec<u8>>,
    progress: Arc<WriteProgress>,
}

impl Connection {
    fn new(stream: TcpStream, conn: u64, events: Sender<ToRepl>) -> std::io::Result<Connection> {
        let mut out = stream.try_clone()?;
        let (writer, queue) = mpsc::channel::<Vec<u8>>();
        let progress = Arc::new(WriteProgress::default());
        let written = progress.clone();
        std::thread::spawn(move || {
            // Done (or failed) however the loop ends.
            let _done = DoneOnDrop(written.clone());
            for mut bytes in queue {
                // Fault injection (`--features failpoints`): the send panics, aborts, hangs,
                // or corrupts the frame it sends (the backup must refuse it).
                if crate::keeper::fault::corrupts("replicate::send") {
                    if let Some(byte) = bytes.last_mut() {
                        *byte ^= 0x5a;
                    }
                }
                if out.write_all(&bytes).is_err() {
                    let _ = out.shutdown(std::net::Shutdown::Both);
                    let _ = events.send(ToRepl::Closed { conn });
                    return;
                }
                written.writes.fetch_add(1, Ordering::Release);
            }
            // The queue ended: the connection was closed after its last writes.
            let _ = out.shutdown(std::net::Shutdown::Both);
        });
        Ok(Connection { stream, writer, progress })
    }

    /// Close once the writes already queued are out (the writer thread shuts the socket
    /// down when its queue ends), or once no write has gone out for [`LINGER`] (a stuck link).
    fn close_after_writes(self) {
        let Connection { stream, writer, progress } = self;
        drop(writer);
        std::thread::spawn(move || {
            const POLL: Duration = Duration::from_millis(100);
            let (mut seen, mut still) = (progress.writes.load(Ordering::Acquire), Duration::ZERO);
            while !progress.done.load(Ordering::Acquire) && still < LINGER {
                std::thread::sleep(POLL);
                let now = progress.writes.load(Ordering::Acquire);
                still = if now == seen { still + POLL } else { Duration::ZERO };
                seen = now;
            }
            let _ = stream.shutdown(std::net::Shutdown::Both);
        });
    }
}

/// How far a connection's writer thread got: frames written, and whether it has finished.
#[derive(Default)]
struct WriteProgress {
    writes: AtomicU64,
    done: AtomicBool,
}

struct DoneOnDrop(Arc<WriteProgress>);

impl Drop for DoneOnDrop {
    fn drop(&mut self) {
        self.0.done.store(true, Ordering::Release);
    }
}

impl ReplThread {
    /// Everything already queued goes in before the clock does: a tick must never find the
    /// backup silent while its frames wait in the queue (behind, say, the steps that frame
    /// a large full checkpoint). Once the backup was heard, a long queue may be cut for a
    /// tick, so that heartbeats and timeouts keep their pace.
    fn run(&mut self) {
        let mut last_tick = std::time::Instant::now();
        loop {
            let mut message = self.rx.recv_timeout(TICK);
            loop {
                let heard = matches!(&message, Ok(ToRepl::Bytes { conn, .. }) if *conn == self.conn_id);
                let actions = match message {
                    Ok(ToRepl::Shutdown) | Err(RecvTimeoutError::Disconnected) => return,
                    Ok(message) => self.on_message(message),
                    Err(RecvTimeoutError::Timeout) => break,
                };
                self.carry_out(actions);
                if heard && last_tick.elapsed() >= TICK {
                    break;
                }
                message = match self.rx.try_recv() {
                    Ok(m) => Ok(m),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => Err(RecvTimeoutError::Disconnected),
                };
            }
            last_tick = std::time::Instant::now();
            let now = now_ms();
            let actions = self.primary.step(PrimaryEvent::Tick { now_ms: now });
            if self.primary.is_streaming() {
                self.reconnect_wait_ms = RECONNECT_FIRST_MS;
            }
            if self.conn.is_none() && !self.connecting && !self.stopped && now >= self.next_connect_ms {
                self.connect(now);
            }
            self.carry_out(actions);
            self.publish();
        }
    }

    fn on_message(&mut self, message: ToRepl) -> Vec<PrimaryAction> {
        match message {
            ToRepl::Checkpoint { epoch, icount, kind, payload } => {
                self.primary.step(PrimaryEvent::CheckpointTaken { epoch, icount, kind, payload })
            }
            ToRepl::VmEnded { epoch, exit_code } => self.primary.step(PrimaryEvent::VmEnded { epoch, exit_code }),
            ToRepl::Unprotect => self.primary.step(PrimaryEvent::Unprotect),
            ToRepl::Switchover { paused_at_unix_us } => {
                self.primary.step(PrimaryEvent::Switchover { paused_at_unix_us })
            }
            ToRepl::Connected { stream } => {
                self.connecting = false;
                self.attach(stream)
            }
            ToRepl::ConnectFailed => {
                self.connecting = false;
                Vec::new()
            }
            ToRepl::Bytes { conn, bytes } if conn == self.conn_id && self.conn.is_some() => {
                self.primary.step(PrimaryEvent::Received(&bytes))
            }
            ToRepl::Closed { conn } if conn == self.conn_id && self.conn.is_some() => {
                self.drop_connection();
                self.primary.step(PrimaryEvent::Disconnected)
            }
            ToRepl::Bytes { .. } | ToRepl::Closed { .. } | ToRepl::Shutdown => Vec::new(),
        }
    }

    /// Connect on a thread of its own: a dead link can take CONNECT_TIMEOUT to say so.
    fn connect(&mut self, now: u64) {
        self.connecting = true;
        self.next_connect_ms = now + self.reconnect_wait_ms;
        self.reconnect_wait_ms = (self.reconnect_wait_ms * 2).min(RECONNECT_MAX_MS);
        let addr = self.options.backup;
        let tx = self.tx.clone();
        std::thread::spawn(move || {
            let message = match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                Ok(stream) => ToRepl::Connected { stream },
                Err(_) => ToRepl::ConnectFailed,
            };
            let _ = tx.send(message);
        });
    }

    fn attach(&mut self, stream: TcpStream) -> Vec<PrimaryAction> {
        if self.conn.is_some() || self.stopped {
            return Vec::new();
        }
        super::tune_link(&stream);
        let (Ok(reader), Ok(nonce)) = (stream.try_clone(), nonce()) else {
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

    /// Carry out actions (and those they lead to).
    fn carry_out(&mut self, actions: Vec<PrimaryAction>) {
        let mut queue: std::collections::VecDeque<PrimaryAction> = actions.into();
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
                    let _ = self.events.send(HostEvent::Mode(ModeEvent::Released { up_to_epoch }));
                }
                PrimaryAction::SwapGeneration { expected, ended } => {
                    let answer = self.ownership.swap(expected, ended);
                    queue.extend(self.primary.step(PrimaryEvent::Swap(answer)));
                }
                PrimaryAction::ReadOwnership => {
                    let answer = self.ownership.read();
                    queue.extend(self.primary.step(PrimaryEvent::Ownership(answer)));
                }
                PrimaryAction::ProtectionChanged { protected: false, generation } => log::line(
                    Replication,
                    format_args!(
                        "running unprotected at generation {generation}: the backup is gone, so outputs leave \
                         without it (--on-backup-loss continue)"
                    ),
                ),
                PrimaryAction::ProtectionChanged { protected: true, generation } => log::line(
                    Replication,
                    format_args!("protected again at generation {generation}: the backup caught up"),
                ),
                PrimaryAction::Close {
                    error:
                        error @ (ProtocolError::Detached | ProtocolError::VmEnded { .. } | ProtocolError::HandedOver { .. }),
                } => {
                    // The backup must still read the StandDown, End or HandedOver just queued.
                    self.shared.lock().expect("not poisoned").last_error = Some(error.to_string());
                    if let Some(conn) = self.conn.take() {
                        conn.close_after_writes();
                    }
                }
                PrimaryAction::Close { error } => {
                    self.shared.lock().expect("not poisoned").last_error = Some(error.to_string());
                    self.drop_connection();
                }
                PrimaryAction::Stop { error: ProtocolError::HandedOver { generation } } => {
                    self.stopped = true;
                    let _ = self.events.send(HostEvent::Mode(ModeEvent::HandedOver { generation }));
                }
                PrimaryAction::Stop { error } => {
                    self.drop_connection();
                    self.stopped = true;
                    let _ = self.events.send(HostEvent::Mode(ModeEvent::Stopped(error.to_string())));
                }
                PrimaryAction::Finished { exit_code, released } => {
                    let _ = self.events.send(HostEvent::Mode(ModeEvent::Finished { exit_code, released }));
                }
                PrimaryAction::Detached { generation } => {
                    self.stopped = true; // no more connections
                    log::line(
                        Replication,
                        format_args!(
                            "stopped (unprotect) at generation {generation}: the backup can no longer take over; \
                             the VM runs on alone"
                        ),
                    );
                    let _ = self.events.send(HostEvent::Mode(ModeEvent::Detached { generation }));
                }
            }
        }
    }

    fn drop_connection(&mut self) {
        if let Some(conn) = self.conn.take() {
            let _ = conn.stream.shutdown(std::net::Shutdown::Both);
        }
    }

    fn publish(&self) {
        let mut shared = self.shared.lock().expect("not poisoned");
        shared.next_kind = self.primary.next_checkpoint_kind();
        shared.taken_epoch = self.primary.last_taken_epoch();
        shared.status = self.primary.status();
    }
}

/// Read the connection on a thread, forwarding bytes to the replication thread.
fn spawn_reader(mut stream: TcpStream, conn: u64, tx: Sender<ToRepl>) {
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
