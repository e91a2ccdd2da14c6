//! Strangers on the backup's replication port: connections that never authenticate.
//! Each kind is one way an outsider (or a port scanner, or a confused peer) behaves:
//!
//! - `Idle`: connects and sends nothing, holding the connection open;
//! - `Garbage`: sends random bytes, then holds the connection;
//! - `SlowHeader`: sends a plausible frame header announcing a first frame of the
//!   largest size allowed, then one byte at a time (a slowloris);
//! - `Hangup`: connects and closes at once;
//! - `WrongKey`: sends a well-formed `Hello` framed under another pre-shared key (a peer
//!   given the wrong `--key`, or a forger), then holds the connection.
//!
//! They run on threads inside a namespace (another "host") and stop, closing everything,
//! when dropped.

use super::relay::SplitMix64;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Idle,
    Garbage,
    SlowHeader,
    Hangup,
    WrongKey,
}

/// Connections held open by one stranger thread at most (older ones are closed).
const MAX_HELD: usize = 400;
const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);
/// Connections one flooding thread opens.
const FLOOD_PER_THREAD: usize = 25;

#[derive(Default)]
struct Counters {
    opened: AtomicU64,
    refused: AtomicU64,
}

pub struct Strangers {
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    threads: Vec<JoinHandle<()>>,
}

impl Strangers {
    /// From namespace `ns`, every `every`, open one connection of each of `kinds` to `target`.
    pub fn every(ns: &str, target: SocketAddr, kinds: &[Kind], every: Duration, seed: u64) -> Strangers {
        let mut s = Strangers::none();
        for (i, &kind) in kinds.iter().enumerate() {
            let plan = Plan { kind, target, every, count: usize::MAX, seed: seed.wrapping_add(i as u64) };
            s.spawn(ns, plan);
        }
        s
    }

    /// From namespace `ns`, open `count` connections of each of `kinds` as fast as
    /// possible, and hold them.
    pub fn flood(ns: &str, target: SocketAddr, kinds: &[Kind], count: usize, seed: u64) -> Strangers {
        let mut s = Strangers::none();
        for (i, &kind) in kinds.iter().enumerate() {
            // Several threads per kind: an attempt the backup leaves unanswered costs a
            // connect timeout.
            let mut left = count;
            let mut j = 0u64;
            while left > 0 {
                let n = left.min(FLOOD_PER_THREAD);
                left -= n;
                j += 1;
                let seed = seed.wrapping_add(i as u64).wrapping_mul(1000).wrapping_add(j);
                s.spawn(ns, Plan { kind, target, every: Duration::ZERO, count: n, seed });
            }
        }
        s
    }

    /// Connections opened, and connection attempts that failed (refused or unanswered).
    pub fn opened(&self) -> u64 {
        self.counters.opened.load(Ordering::Relaxed)
    }

    pub fn refused(&self) -> u64 {
        self.counters.refused.load(Ordering::Relaxed)
    }

    fn none() -> Strangers {
        Strangers { stop: Arc::new(AtomicBool::new(false)), counters: Arc::default(), threads: Vec::new() }
    }

    fn spawn(&mut self, ns: &str, plan: Plan) {
        let netns = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("the namespace exists");
        let (stop, counters) = (self.stop.clone(), self.counters.clone());
        self.threads.push(std::thread::spawn(move || {
            nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns for the strangers");
            plan.run(&stop, &counters);
        }));
    }
}

impl Drop for Strangers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

struct Plan {
    kind: Kind,
    target: SocketAddr,
    every: Duration,
    count: usize,
    seed: u64,
}

impl Plan {
    fn run(&self, stop: &AtomicBool, counters: &Counters) {
        let mut rng = SplitMix64(self.seed);
        let mut held: std::collections::VecDeque<TcpStream> = Default::default();
        let mut made = 0;
        let mut next = Instant::now();
        let mut last_drip = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            if made < self.count && Instant::now() >= next {
                made += 1;
                next += self.every;
                match TcpStream::connect_timeout(&self.target, CONNECT_TIMEOUT) {
                    Ok(stream) => {
                        counters.opened.fetch_add(1, Ordering::Relaxed);
                        if let Some(stream) = self.greet(stream, &mut rng) {
                            held.push_back(stream);
                            if held.len() > MAX_HELD {
                                held.pop_front();
                            }
                        }
                    }
                    Err(_) => {
                        counters.refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
                continue;
            }
            if self.kind == Kind::SlowHeader && last_drip.elapsed() >= Duration::from_millis(100) {
                last_drip = Instant::now();
                let byte = [rng.next() as u8];
                held.retain_mut(|s| s.write(&byte).is_ok());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// What this kind of stranger does on connecting; the stream if it keeps it.
    fn greet(&self, mut stream: TcpStream, rng: &mut SplitMix64) -> Option<TcpStream> {
        let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
        match self.kind {
            Kind::Idle => Some(stream),
            Kind::Hangup => None,
            Kind::Garbage => {
                let garbage: Vec<u8> = (0..2048).map(|_| rng.next() as u8).collect();
                let _ = stream.write_all(&garbage);
                Some(stream)
            }
            Kind::SlowHeader => {
                // The wire format's header: magic, version, a type, no flags, sequence 0,
                // and the largest first-frame length, then nothing more for now.
                use replica::wire::{MAGIC, MAX_FIRST_PAYLOAD_BYTES, WIRE_VERSION};
                let mut header = MAGIC.to_vec();
                header.extend_from_slice(&WIRE_VERSION.to_le_bytes());
                header.extend_from_slice(&[1, 0]);
                header.extend_from_slice(&0u64.to_le_bytes());
                header.extend_from_slice(&MAX_FIRST_PAYLOAD_BYTES.to_le_bytes());
                let _ = stream.write_all(&header);
                Some(stream)
            }
            Kind::WrongKey => {
                let _ = stream.write_all(&wrong_key_hello(rng));
                Some(stream)
            }
        }
    }
}

/// A `Hello` as a primary sends it, framed under a random pre-shared key (not the backup's).
fn wrong_key_hello(rng: &mut SplitMix64) -> Vec<u8> {
    use replica::wire::{Direction, Encoder, PresharedKey};
    let secret: Vec<u8> = (0..32).map(|_| rng.next() as u8).collect();
    let key = PresharedKey::new(&secret).expect("32 bytes make a key");
    let mut nonce = [0u8; replica::wire::NONCE_BYTES];
    nonce.iter_mut().for_each(|b| *b = rng.next() as u8);
    let hello = replica::Message::Hello {
        protocol_version: replica::PROTOCOL_VERSION,
        role: replica::Role::Primary,
        config_digest: [0; 32],
        nonce,
        run_id: rng.next(),
        generation: 1,
    };
    let (frame_type, payload) = hello.encode();
    let mut encoder = Encoder::new(key.hello_key(Direction::PrimaryToBackup));
    encoder.encode(frame_type, &payload).expect("a Hello fits in a frame")
}
