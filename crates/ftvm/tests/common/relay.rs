//! An impairment relay for the replication link (the kernel here has no netem): a TCP
//! proxy the primary connects to, forwarding to the backup, switched at run time between
//!
//! - `Pass`: forward both ways;
//! - `Cut`: a silent partition — stop forwarding both ways but keep every socket open, so
//!   that each side sees a dead link (no FIN, no RST, bytes wait in the kernel's buffers,
//!   as TCP would retransmit them), and new connections wait unanswered; `Pass` resumes;
//! - `Damage`: forward, but alter one byte of a read chunk with probability `p`, from a
//!   seeded generator (the seed is printed by the tests);
//! - [`Relay::cut_after`]: pass a given number of bytes more, then cut — a cut that lands
//!   in the middle of a transfer (a full checkpoint) whatever the machine's speed.
//!
//! It runs on threads that enter a network namespace first (setns changes only the
//! calling thread, and the threads it starts inherit it), so that it can sit in the
//! backup's "host".

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How the relay treats the link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Pass,
    Cut,
    /// Alter one byte of a read chunk with this probability.
    Damage(f64),
}

/// What went through, for the tests to check that the impairment happened.
#[derive(Debug, Default, Clone, Copy)]
pub struct RelayStats {
    pub connections: u64,
    pub chunks: u64,
    pub damaged_chunks: u64,
    pub bytes: u64,
}

/// Largest chunk read at once: frames are cut anywhere, as on a real link.
const CHUNK_BYTES: usize = 16 * 1024;
/// How often a waiting thread looks at the mode and the stop flag.
const POLL: Duration = Duration::from_millis(5);

struct Shared {
    mode: Mutex<Mode>,
    stop: AtomicBool,
    /// Bumped by [`Relay::reset`]: pumps of an older value close their connection.
    resets: AtomicU64,
    rng: Mutex<SplitMix64>,
    connections: AtomicU64,
    chunks: AtomicU64,
    damaged_chunks: AtomicU64,
    bytes: AtomicU64,
    /// Cut once `bytes` reaches this (u64::MAX: never).
    cut_at: AtomicU64,
}

impl Shared {
    fn mode(&self) -> Mode {
        *self.mode.lock().expect("not poisoned")
    }

    /// Wait while the link is cut; false once the relay stops.
    fn wait_while_cut(&self) -> bool {
        while self.mode() == Mode::Cut {
            if self.stop.load(Ordering::Relaxed) {
                return false;
            }
            std::thread::sleep(POLL);
        }
        !self.stop.load(Ordering::Relaxed)
    }
}

/// A running relay; it stops (and closes every socket) when dropped.
pub struct Relay {
    pub listen: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl Relay {
    /// Listen on `listen` inside namespace `ns` and forward each connection to `upstream`.
    pub fn start(ns: &str, listen: SocketAddr, upstream: SocketAddr, seed: u64) -> Relay {
        let netns = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("the namespace exists");
        let shared = Arc::new(Shared {
            mode: Mutex::new(Mode::Pass),
            stop: AtomicBool::new(false),
            resets: AtomicU64::new(0),
            rng: Mutex::new(SplitMix64(seed)),
            connections: AtomicU64::new(0),
            chunks: AtomicU64::new(0),
            damaged_chunks: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            cut_at: AtomicU64::new(u64::MAX),
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let s = shared.clone();
        let acceptor = std::thread::spawn(move || {
            nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns into the backup's host");
            let listener = TcpListener::bind(listen).expect("the relay binds its port");
            listener.set_nonblocking(true).expect("nonblocking listener");
            ready_tx.send(()).expect("the test waits");
            accept_loop(&listener, upstream, &s);
        });
        ready_rx.recv().expect("the relay started");
        Relay { listen, shared, acceptor: Some(acceptor) }
    }

    pub fn set(&self, mode: Mode) {
        self.shared.cut_at.store(u64::MAX, Ordering::Relaxed);
        *self.shared.mode.lock().expect("not poisoned") = mode;
    }

    /// Pass `bytes` more (both ways counted), then cut: the chunk that crosses the mark waits
    /// for the cut's end like the rest. [`Relay::mode`] says when the cut has come.
    pub fn cut_after(&self, bytes: u64) {
        let now = self.shared.bytes.load(Ordering::Relaxed);
        self.shared.cut_at.store(now.saturating_add(bytes), Ordering::Relaxed);
    }

    pub fn mode(&self) -> Mode {
        self.shared.mode()
    }

    /// Close every connection going through now (both sides see it end), as a link
    /// that fails loudly would; new connections pass.
    pub fn reset(&self) {
        self.shared.resets.fetch_add(1, Ordering::Relaxed);
    }

    pub fn stats(&self) -> RelayStats {
        let s = &self.shared;
        RelayStats {
            connections: s.connections.load(Ordering::Relaxed),
            chunks: s.chunks.load(Ordering::Relaxed),
            damaged_chunks: s.damaged_chunks.load(Ordering::Relaxed),
            bytes: s.bytes.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, upstream: SocketAddr, shared: &Arc<Shared>) {
    let mut pairs: Vec<JoinHandle<()>> = Vec::new();
    while !shared.stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((downstream, _)) => {
                shared.connections.fetch_add(1, Ordering::Relaxed);
                let s = shared.clone();
                pairs.push(std::thread::spawn(move || connect_pair(downstream, upstream, &s)));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(_) => std::thread::sleep(POLL),
        }
        pairs.retain(|p| !p.is_finished());
    }
    for pair in pairs {
        let _ = pair.join();
    }
}

/// One connection: wait out a cut (a dead link answers nothing), connect onward, pump.
fn connect_pair(downstream: TcpStream, upstream: SocketAddr, shared: &Arc<Shared>) {
    let _ = downstream.set_nonblocking(false);
    if !shared.wait_while_cut() {
        return;
    }
    let Ok(up) = TcpStream::connect_timeout(&upstream, Duration::from_secs(2)) else {
        return;
    };
    let _ = up.set_nodelay(true);
    let _ = downstream.set_nodelay(true);
    let (Ok(down2), Ok(up2)) = (downstream.try_clone(), up.try_clone()) else {
        return;
    };
    let s = shared.clone();
    let forward = std::thread::spawn(move || pump(down2, up2, &s));
    pump(up, downstream, shared);
    let _ = forward.join();
}

/// Copy `from` → `to` in chunks, honouring the mode, until either side ends; then close
/// both sides, so that the other direction's pump ends too.
fn pump(mut from: TcpStream, mut to: TcpStream, shared: &Shared) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(20)));
    let mut buf = vec![0u8; CHUNK_BYTES];
    let resets = shared.resets.load(Ordering::Relaxed);
    loop {
        if !shared.wait_while_cut() || shared.resets.load(Ordering::Relaxed) != resets {
            break;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {
                continue
            }
            Err(_) => break,
        };
        shared.chunks.fetch_add(1, Ordering::Relaxed);
        let total = shared.bytes.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if total >= shared.cut_at.load(Ordering::Relaxed) {
            shared.cut_at.store(u64::MAX, Ordering::Relaxed);
            *shared.mode.lock().expect("not poisoned") = Mode::Cut;
        }
        if let Mode::Damage(p) = shared.mode() {
            let mut rng = shared.rng.lock().expect("not poisoned");
            if rng.unit() < p {
                let at = (rng.next() % n as u64) as usize;
                // A non-zero XOR always changes the byte.
                buf[at] ^= (rng.next() % 255 + 1) as u8;
                shared.damaged_chunks.fetch_add(1, Ordering::Relaxed);
            }
        }
        // A chunk read just as a cut began waits for its end, like the rest.
        if !shared.wait_while_cut() || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// A small seeded generator (splitmix64): the tests need reproducible damage, not
/// cryptographic quality.
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}
