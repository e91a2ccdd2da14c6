//! Seeded simulations of a primary and a backup over a faulty network.
//!
//! The network works on bytes, so the wire layer's checks are exercised: it drops, delays,
//! duplicates, reorders, splits and corrupts segments, replays segments of old connections,
//! cuts and partitions the connection; processes crash, freeze and restart; the lease store
//! answers late or not at all; the backup's machine applies slowly or fails to apply.
//!
//! Invariants, checked at every step:
//! 1. the backup's machine only ever holds exactly a whole checkpoint some primary took;
//! 2. no output is released before the backup's machine has applied its epoch;
//! 3. at most one replica is live (the primary by its own lease reckoning, the backup once
//!    it has gone live), and a backup goes live from a whole checkpoint that covers every
//!    output its primary run released.
//!
//! `FTVR_SIM_SEEDS=N` runs N seeds instead of the default; `FTVR_SIM_SEED=S` runs seed S
//! alone. A failing run prints its seed.

use std::collections::{BTreeMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};

use replica::{
    AcquireOutcome, Backup, BackupAction, BackupConfig, BackupEvent, CheckpointKind, Lease, LeaseError, LeaseGrant,
    MemoryLease, OutputBuffer, PresharedKey, Primary, PrimaryAction, PrimaryConfig, PrimaryEvent, ProtocolError,
};

const DEFAULT_SEEDS: u64 = 80;
const STEPS: u64 = 2500;
const PAGES: usize = 16;
const PAGE_BYTES: usize = 8;
const EPOCH_MS: u64 = 25;
const LEASE_TTL_MS: u64 = 400;
const DIGEST: [u8; 32] = [0x5a; 32];

/// SplitMix64: small, fast, and the same on every platform.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    fn chance(&mut self, p: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    fn nonce(&mut self) -> [u8; 16] {
        let mut nonce = [0; 16];
        nonce[..8].copy_from_slice(&self.next().to_le_bytes());
        nonce[8..].copy_from_slice(&self.next().to_le_bytes());
        nonce
    }
}

/// Fault rates of one run; a seed picks how hostile its world is.
#[derive(Debug, Clone, Copy)]
struct Faults {
    /// Per segment.
    drop: f64,
    corrupt: f64,
    duplicate: f64,
    reorder: f64,
    long_delay: f64,
    replay_old: f64,
    /// Per step.
    cut: f64,
    partition: f64,
    crash_primary: f64,
    crash_backup: f64,
    freeze: f64,
    lease_cut: f64,
    /// Per operation.
    lease_error: f64,
    apply_fail: f64,
    ignore_advice: f64,
}

impl Faults {
    fn scaled(k: f64) -> Faults {
        Faults {
            drop: 0.002 * k,
            corrupt: 0.002 * k,
            duplicate: 0.002 * k,
            reorder: 0.002 * k,
            long_delay: 0.005 * k,
            replay_old: 0.001 * k,
            cut: 0.0005 * k,
            partition: 0.0004 * k,
            crash_primary: 0.0003 * k,
            crash_backup: 0.0004 * k,
            freeze: 0.0003 * k,
            lease_cut: 0.0003 * k,
            lease_error: 0.01 * k,
            apply_fail: 0.002 * k,
            ignore_advice: 0.01 * k,
        }
    }
}

type Pages = Vec<[u8; PAGE_BYTES]>;

#[derive(Debug)]
enum Segment {
    Data(Vec<u8>),
    Eof,
}

#[derive(Default)]
struct Pipe {
    /// (delivery time, segment), in delivery order.
    queue: VecDeque<(u64, Segment)>,
    open: bool,
}

struct Connection {
    to_backup: Pipe,
    to_primary: Pipe,
}

struct PrimaryNode {
    core: Primary,
    holder: String,
    run_id: u64,
    pages: Pages,
    dirty: Vec<bool>,
    outputs: OutputBuffer<(u64, u64)>,
    next_epoch_ms: u64,
    frozen_until: u64,
}

struct BackupNode {
    core: Backup,
    /// The machine: (run, epoch) and pages, or None when it holds no whole checkpoint.
    machine: Option<((u64, u64), Pages)>,
    /// The apply the machine is working on: (report time, epoch, fails).
    applying: Option<(u64, u64, bool)>,
    frozen_until: u64,
}

enum LeaseCall {
    Renew { term: u64, holder: String },
    Acquire,
}

struct PendingLease {
    /// Which process incarnation asked: a dead one's call still reaches the store, but its
    /// answer goes nowhere.
    incarnation: u64,
    perform_at: u64,
    answer_at: u64,
    call: LeaseCall,
    result: Option<Result<LeaseAnswer, LeaseError>>,
}

enum LeaseAnswer {
    Renew(replica::RenewOutcome),
    Acquire(AcquireOutcome),
}

#[derive(Debug, Default, Clone)]
struct Stats {
    epochs_taken: u64,
    epochs_released: u64,
    applies: u64,
    go_lives: u64,
    primary_stops: u64,
    closes: u64,
    crashes: u64,
    /// Why connections closed, by error kind.
    close_reasons: BTreeMap<String, u64>,
}

struct Sim {
    rng: Rng,
    faults: Faults,
    now: u64,
    primary: Option<PrimaryNode>,
    backup: Option<BackupNode>,
    primary_restart_at: Option<u64>,
    backup_restart_at: Option<u64>,
    primaries_started: u64,
    backups_started: u64,
    conn: Option<Connection>,
    next_connect_at: u64,
    old_segments: Vec<Vec<u8>>,
    partitioned_until: u64,
    primary_lease_cut_until: u64,
    backup_lease_cut_until: u64,
    lease: MemoryLease,
    lease_calls_primary: Vec<PendingLease>,
    lease_calls_backup: Vec<PendingLease>,
    /// Every checkpoint taken: (run, epoch) → the primary's pages.
    history: BTreeMap<(u64, u64), Pages>,
    /// Per run: the highest epoch a backup's machine has reported applied.
    applied_reported: BTreeMap<u64, u64>,
    /// Per run: the highest epoch whose outputs were released.
    released: BTreeMap<u64, u64>,
    stats: Stats,
}

fn psk() -> PresharedKey {
    PresharedKey::new(b"simulation pre-shared key, 32 b").unwrap()
}

fn primary_config(run_id: u64) -> PrimaryConfig {
    PrimaryConfig {
        heartbeat_interval_ms: 20,
        peer_timeout_ms: 200,
        handshake_timeout_ms: 200,
        chunk_bytes: 40,
        lease_ttl_ms: LEASE_TTL_MS,
        lease_renew_interval_ms: 100,
        ..PrimaryConfig::new(psk(), DIGEST, run_id)
    }
}

fn backup_config() -> BackupConfig {
    BackupConfig {
        heartbeat_interval_ms: 20,
        handshake_timeout_ms: 200,
        failover_timeout_ms: 300,
        lease_retry_ms: 50,
        max_queued_checkpoints: 4,
        ..BackupConfig::new(psk(), DIGEST, 10_000)
    }
}

fn encode_pages(pages: &Pages, which: impl Iterator<Item = usize>) -> Vec<u8> {
    let mut payload = Vec::new();
    for index in which {
        payload.push(index as u8);
        payload.extend_from_slice(&pages[index]);
    }
    payload
}

fn apply_pages(pages: &mut Pages, payload: &[u8]) {
    for record in payload.chunks(1 + PAGE_BYTES) {
        pages[usize::from(record[0])].copy_from_slice(&record[1..]);
    }
}

macro_rules! check {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!($($msg)+));
        }
    };
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = Rng(seed);
        let scale = [0.0, 0.3, 1.0, 1.0, 3.0, 8.0][rng.below(6) as usize];
        let mut sim = Sim {
            faults: Faults::scaled(scale),
            rng,
            now: 0,
            primary: None,
            backup: None,
            primary_restart_at: Some(0),
            backup_restart_at: Some(0),
            primaries_started: 0,
            backups_started: 0,
            conn: None,
            next_connect_at: 0,
            old_segments: Vec::new(),
            partitioned_until: 0,
            primary_lease_cut_until: 0,
            backup_lease_cut_until: 0,
            lease: MemoryLease::new(),
            lease_calls_primary: Vec::new(),
            lease_calls_backup: Vec::new(),
            history: BTreeMap::new(),
            applied_reported: BTreeMap::new(),
            released: BTreeMap::new(),
            stats: Stats::default(),
        };
        sim.restart_processes();
        sim
    }

    fn backup_live(&self) -> bool {
        self.backup.as_ref().is_some_and(|b| b.core.is_live())
    }

    fn run(&mut self) -> Result<Stats, String> {
        for _ in 0..STEPS {
            self.step()?;
        }
        Ok(self.stats.clone())
    }

    fn step(&mut self) -> Result<(), String> {
        self.now += self.rng.range(1, 4);
        self.inject_faults();
        self.restart_processes();
        self.tick()?;
        self.lease_answers()?;
        self.deliver()?;
        self.finish_applies()?;
        self.take_checkpoint()?;
        self.connect()?;
        self.check_one_live()
    }

    fn inject_faults(&mut self) {
        let f = self.faults;
        let now = self.now;
        if self.rng.chance(f.crash_primary) && self.primary.is_some() {
            self.crash(true);
            if !self.backup_live() && self.rng.chance(0.5) {
                self.primary_restart_at = Some(now + self.rng.range(50, 800));
            }
        }
        if self.rng.chance(f.crash_backup) && self.backup.is_some() && !self.backup_live() {
            self.crash(false);
            self.backup_restart_at = Some(now + self.rng.range(20, 500));
        }
        if self.rng.chance(f.cut) && self.conn.is_some() {
            self.cut_connection();
        }
        if self.rng.chance(f.partition) {
            self.partitioned_until = now + self.rng.range(50, 1500);
        }
        if self.rng.chance(f.freeze) {
            let until = now + self.rng.range(20, 900);
            match self.rng.chance(0.5) {
                true => self.primary.iter_mut().for_each(|p| p.frozen_until = until),
                false => self.backup.iter_mut().for_each(|b| b.frozen_until = until),
            }
        }
        if self.rng.chance(f.lease_cut) {
            let until = now + self.rng.range(50, 1500);
            match self.rng.chance(0.5) {
                true => self.primary_lease_cut_until = until,
                false => self.backup_lease_cut_until = until,
            }
        }
    }

    /// A process dies (kill -9): what it had not yet sent is lost, possibly mid-frame.
    fn crash(&mut self, primary_side: bool) {
        self.stats.crashes += 1;
        match primary_side {
            true => self.primary = None,
            false => self.backup = None,
        }
        if let Some(conn) = &mut self.conn {
            let outgoing = match primary_side {
                true => &mut conn.to_backup,
                false => &mut conn.to_primary,
            };
            let keep = self.rng.below(outgoing.queue.len() as u64 + 1) as usize;
            outgoing.queue.truncate(keep);
            if let Some((_, Segment::Data(bytes))) = outgoing.queue.back_mut() {
                let cut = self.rng.below(bytes.len() as u64 + 1) as usize;
                bytes.truncate(cut);
            }
        }
        self.end_of(primary_side);
    }

    /// One side's end is closed: the peer reads what is in flight, then end of stream.
    fn end_of(&mut self, primary_side: bool) {
        let now = self.now;
        if let Some(conn) = &mut self.conn {
            let (mine, theirs) = match primary_side {
                true => (&mut conn.to_primary, &mut conn.to_backup),
                false => (&mut conn.to_backup, &mut conn.to_primary),
            };
            mine.open = false;
            mine.queue.clear();
            if theirs.open {
                let at = theirs.queue.back().map_or(now, |(t, _)| *t).max(now) + 1;
                theirs.queue.push_back((at, Segment::Eof));
            }
            if !conn.to_primary.open && !conn.to_backup.open {
                self.conn = None;
                self.next_connect_at = now + self.rng.range(10, 60);
            }
        }
    }

    fn cut_connection(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        self.next_connect_at = self.now + self.rng.range(10, 60);
        if conn.to_primary.open {
            if let Some(p) = &mut self.primary {
                let actions = p.core.step(PrimaryEvent::Disconnected);
                self.stats.closes += actions.len() as u64;
            }
        }
        if conn.to_backup.open {
            if let Some(b) = &mut self.backup {
                let actions = b.core.step(BackupEvent::Disconnected);
                self.stats.closes += actions.len() as u64;
            }
        }
    }

    fn restart_processes(&mut self) {
        let now = self.now;
        if self.primary_restart_at.is_some_and(|at| now >= at) && !self.backup_live() {
            if now < self.primary_lease_cut_until {
                self.primary_restart_at = Some(now + 50);
            } else {
                let holder = format!("primary-{}", self.primaries_started + 1);
                match self.lease.try_acquire(&holder, now, LEASE_TTL_MS).unwrap() {
                    AcquireOutcome::Acquired(record) => {
                        self.primaries_started += 1;
                        let run_id = self.rng.next();
                        let grant = LeaseGrant { term: record.term, acquired_at_ms: now };
                        self.primary = Some(PrimaryNode {
                            core: Primary::new(primary_config(run_id), grant),
                            holder,
                            run_id,
                            pages: vec![[0; PAGE_BYTES]; PAGES],
                            dirty: vec![true; PAGES],
                            outputs: OutputBuffer::new(10_000),
                            next_epoch_ms: now + EPOCH_MS,
                            frozen_until: 0,
                        });
                        self.primary_restart_at = None;
                    }
                    AcquireOutcome::Busy(_) => self.primary_restart_at = Some(now + 50),
                }
            }
        }
        if self.backup_restart_at.is_some_and(|at| now >= at) {
            self.backups_started += 1;
            self.backup = Some(BackupNode {
                core: Backup::new(backup_config(), now),
                machine: None,
                applying: None,
                frozen_until: 0,
            });
            self.backup_restart_at = None;
        }
    }

    fn tick(&mut self) -> Result<(), String> {
        let now = self.now;
        if let Some(p) = self.primary.as_mut().filter(|p| now >= p.frozen_until) {
            let actions = p.core.step(PrimaryEvent::Tick { now_ms: now });
            self.on_primary(actions)?;
        }
        if let Some(b) = self.backup.as_mut().filter(|b| now >= b.frozen_until) {
            let actions = b.core.step(BackupEvent::Tick { now_ms: now });
            self.on_backup(actions)?;
        }
        Ok(())
    }

    fn lease_delay(&mut self) -> (u64, u64) {
        let perform_at = self.now + self.rng.range(0, 15);
        (perform_at, perform_at + self.rng.range(0, 15))
    }

    fn lease_answers(&mut self) -> Result<(), String> {
        let now = self.now;
        // Perform the calls that reach the store now (unless that side cannot reach it).
        for primary_side in [true, false] {
            let cut = match primary_side {
                true => now < self.primary_lease_cut_until,
                false => now < self.backup_lease_cut_until,
            };
            let inject = self.rng.chance(self.faults.lease_error);
            let mut lease = self.lease.clone();
            let calls = match primary_side {
                true => &mut self.lease_calls_primary,
                false => &mut self.lease_calls_backup,
            };
            for call in calls.iter_mut().filter(|c| c.result.is_none() && now >= c.perform_at) {
                call.result = Some(if cut || inject {
                    let source = std::io::Error::other("injected: lease store unreachable");
                    Err(LeaseError::Io { path: "sim.lease".into(), action: "reach it", source })
                } else {
                    match &call.call {
                        LeaseCall::Renew { term, holder } => {
                            lease.renew(holder, *term, now, LEASE_TTL_MS).map(LeaseAnswer::Renew)
                        }
                        LeaseCall::Acquire => lease.try_acquire("backup", now, LEASE_TTL_MS).map(LeaseAnswer::Acquire),
                    }
                });
            }
        }
        // Deliver the answers that are due.
        let due = |c: &PendingLease| c.result.is_some() && now >= c.answer_at;
        let primary_calls: Vec<_> = drain_where(&mut self.lease_calls_primary, due);
        for call in primary_calls {
            let Some(p) = self.primary.as_mut().filter(|_| call.incarnation == self.primaries_started) else {
                continue;
            };
            let answer = match call.result.expect("due") {
                Ok(LeaseAnswer::Renew(outcome)) => p.core.step(PrimaryEvent::LeaseRenewal(Ok(outcome))),
                Ok(LeaseAnswer::Acquire(_)) => unreachable!("the primary only renews"),
                Err(error) => p.core.step(PrimaryEvent::LeaseRenewal(Err(&error))),
            };
            self.on_primary(answer)?;
        }
        let backup_calls: Vec<_> = drain_where(&mut self.lease_calls_backup, due);
        for call in backup_calls {
            let Some(b) = self.backup.as_mut().filter(|_| call.incarnation == self.backups_started) else { continue };
            let answer = match call.result.expect("due") {
                Ok(LeaseAnswer::Acquire(outcome)) => b.core.step(BackupEvent::LeaseAcquisition(Ok(outcome))),
                Ok(LeaseAnswer::Renew(_)) => unreachable!("the backup only acquires"),
                Err(error) => b.core.step(BackupEvent::LeaseAcquisition(Err(&error))),
            };
            self.on_backup(answer)?;
        }
        Ok(())
    }

    fn send(&mut self, to_backup: bool, bytes: Vec<u8>) {
        let f = self.faults;
        let now = self.now;
        let partitioned = now < self.partitioned_until;
        if self.old_segments.len() < 64 && self.rng.chance(0.05) {
            self.old_segments.push(bytes.clone());
        }
        let Some(conn) = &mut self.conn else { return };
        let pipe = match to_backup {
            true => &mut conn.to_backup,
            false => &mut conn.to_primary,
        };
        if !pipe.open || partitioned || self.rng.chance(f.drop) {
            return;
        }
        let mut segments = vec![bytes];
        if self.rng.chance(f.corrupt) {
            let segment = &mut segments[0];
            let bit = self.rng.below(segment.len() as u64 * 8);
            segment[(bit / 8) as usize] ^= 1 << (bit % 8);
        }
        if self.rng.chance(f.duplicate) {
            segments.push(segments[0].clone());
        }
        if self.rng.chance(f.replay_old) && !self.old_segments.is_empty() {
            let old = self.old_segments[self.rng.below(self.old_segments.len() as u64) as usize].clone();
            segments.insert(0, old);
        }
        for segment in segments {
            let last = pipe.queue.back().map_or(0, |(t, _)| *t);
            let latency = match self.rng.chance(f.long_delay) {
                true => self.rng.range(20, 250),
                false => self.rng.range(0, 4),
            };
            if self.rng.chance(f.reorder) && !pipe.queue.is_empty() {
                // Overtakes the segment before it.
                let at = pipe.queue.back().map_or(now, |(t, _)| *t);
                let position = pipe.queue.len() - 1;
                pipe.queue.insert(position, (at, Segment::Data(segment)));
            } else {
                pipe.queue.push_back(((now + latency).max(last), Segment::Data(segment)));
            }
        }
    }

    fn deliver(&mut self) -> Result<(), String> {
        for to_backup in [true, false] {
            loop {
                let now = self.now;
                let partitioned = now < self.partitioned_until;
                let receiver_frozen = match to_backup {
                    true => self.backup.as_ref().is_none_or(|b| now < b.frozen_until),
                    false => self.primary.as_ref().is_none_or(|p| now < p.frozen_until),
                };
                let Some(conn) = &mut self.conn else { break };
                let pipe = match to_backup {
                    true => &mut conn.to_backup,
                    false => &mut conn.to_primary,
                };
                let due = pipe.queue.front().is_some_and(|(t, _)| *t <= now);
                if !pipe.open || !due || receiver_frozen {
                    break;
                }
                let (_, segment) = pipe.queue.pop_front().expect("due");
                match segment {
                    Segment::Data(_) if partitioned => continue,
                    Segment::Eof if partitioned => {
                        pipe.queue.push_front((now + 1, Segment::Eof));
                        break;
                    }
                    Segment::Eof => {
                        pipe.open = false;
                        if !conn.to_backup.open && !conn.to_primary.open {
                            self.conn = None;
                            self.next_connect_at = now + self.rng.range(10, 60);
                        }
                        match to_backup {
                            true => {
                                let b = self.backup.as_mut().expect("not frozen, so present");
                                let actions = b.core.step(BackupEvent::Disconnected);
                                self.on_backup(actions)?;
                            }
                            false => {
                                let p = self.primary.as_mut().expect("not frozen, so present");
                                let actions = p.core.step(PrimaryEvent::Disconnected);
                                self.on_primary(actions)?;
                            }
                        }
                    }
                    Segment::Data(bytes) => {
                        // Cut anywhere: the decoder must reassemble.
                        let cut = self.rng.below(bytes.len() as u64 + 1) as usize;
                        for piece in [&bytes[..cut], &bytes[cut..]] {
                            if to_backup {
                                let Some(b) = self.backup.as_mut() else { break };
                                let actions = b.core.step(BackupEvent::Received(piece));
                                self.on_backup(actions)?;
                            } else {
                                let Some(p) = self.primary.as_mut() else { break };
                                let actions = p.core.step(PrimaryEvent::Received(piece));
                                self.on_primary(actions)?;
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// A side closed its end: the peer reads what is in flight, then end of stream.
    fn closed_by(&mut self, primary_side: bool, error: &ProtocolError) {
        self.stats.closes += 1;
        let kind = match error {
            ProtocolError::Wire(wire) => format!("Wire::{wire:?}"),
            other => format!("{other:?}"),
        };
        let kind = kind.split([' ', '(', '{']).next().unwrap_or_default().to_string();
        *self.stats.close_reasons.entry(kind).or_default() += 1;
        self.end_of(primary_side);
    }

    fn on_primary(&mut self, actions: Vec<PrimaryAction>) -> Result<(), String> {
        for action in actions {
            match action {
                PrimaryAction::Send(bytes) => self.send(true, bytes),
                PrimaryAction::ReleaseOutputs { up_to_epoch } => {
                    let p = self.primary.as_mut().expect("actions come from a live process");
                    let run = p.run_id;
                    let applied = self.applied_reported.get(&run).copied();
                    check!(
                        applied.is_some_and(|a| a >= up_to_epoch),
                        "outputs of epoch {up_to_epoch} released, but the backup reported only {applied:?} applied"
                    );
                    let released = p.outputs.release(up_to_epoch);
                    check!(released.iter().all(|(_, epoch)| *epoch <= up_to_epoch), "released a later epoch");
                    self.stats.epochs_released += 1;
                    let entry = self.released.entry(run).or_default();
                    *entry = (*entry).max(up_to_epoch);
                }
                PrimaryAction::RenewLease { term } => {
                    let holder = self.primary.as_ref().expect("present").holder.clone();
                    let (perform_at, answer_at) = self.lease_delay();
                    let call = LeaseCall::Renew { term, holder };
                    let incarnation = self.primaries_started;
                    self.lease_calls_primary.push(PendingLease {
                        incarnation,
                        perform_at,
                        answer_at,
                        call,
                        result: None,
                    });
                }
                PrimaryAction::Close { error } => self.closed_by(true, &error),
                PrimaryAction::Stop { error } => {
                    check!(
                        matches!(error, ProtocolError::LeaseLost { .. } | ProtocolError::LeaseExpired { .. }),
                        "the primary stopped for {error}"
                    );
                    self.stats.primary_stops += 1;
                    // The process exits; an operator may start a new primary later.
                    self.primary = None;
                    self.end_of(true);
                    if !self.backup_live() && self.rng.chance(0.5) {
                        self.primary_restart_at = Some(self.now + self.rng.range(50, 800));
                    }
                }
            }
        }
        Ok(())
    }

    fn on_backup(&mut self, actions: Vec<BackupAction>) -> Result<(), String> {
        for action in actions {
            match action {
                BackupAction::Send(bytes) => self.send(false, bytes),
                BackupAction::ApplyCheckpoint { run_id, epoch, base_epoch, payload, .. } => {
                    self.apply(run_id, epoch, base_epoch, &payload)?
                }
                BackupAction::Close { error } => self.closed_by(false, &error),
                BackupAction::AcquireLease => {
                    let (perform_at, answer_at) = self.lease_delay();
                    let call = LeaseCall::Acquire;
                    let incarnation = self.backups_started;
                    self.lease_calls_backup.push(PendingLease {
                        incarnation,
                        perform_at,
                        answer_at,
                        call,
                        result: None,
                    });
                }
                BackupAction::GoLive { epoch, .. } => self.go_live(epoch)?,
            }
        }
        Ok(())
    }

    fn apply(&mut self, run: u64, epoch: u64, base_epoch: Option<u64>, payload: &[u8]) -> Result<(), String> {
        let now = self.now;
        let fails = self.rng.chance(self.faults.apply_fail);
        let report_at = now + self.rng.range(0, 10);
        let b = self.backup.as_mut().expect("actions come from a live process");
        check!(b.applying.is_none(), "a second ApplyCheckpoint before the first was reported");
        let mut pages = match (base_epoch, b.machine.take()) {
            (None, _) => vec![[0; PAGE_BYTES]; PAGES],
            (Some(base), Some((id, pages))) if id == (run, base) => pages,
            (Some(base), held) => {
                return Err(format!(
                    "incremental ({run:x}, {epoch}) on base {base} handed to a machine holding {:?}",
                    held.map(|(id, _)| id)
                ))
            }
        };
        apply_pages(&mut pages, payload);
        let taken = self.history.get(&(run, epoch));
        check!(taken == Some(&pages), "the backup's machine at ({run:x}, {epoch}) is not the checkpoint taken");
        b.machine = if fails { None } else { Some(((run, epoch), pages)) };
        b.applying = Some((report_at, epoch, fails));
        self.stats.applies += 1;
        Ok(())
    }

    fn finish_applies(&mut self) -> Result<(), String> {
        let now = self.now;
        let Some(b) = self.backup.as_mut().filter(|b| now >= b.frozen_until) else { return Ok(()) };
        let Some((report_at, epoch, fails)) = b.applying.filter(|(at, ..)| now >= *at) else { return Ok(()) };
        let _ = report_at;
        b.applying = None;
        let actions = if fails {
            b.core.step(BackupEvent::ApplyFailed { epoch, reason: "injected".into() })
        } else {
            let (run, _) = b.machine.as_ref().expect("applied").0;
            let entry = self.applied_reported.entry(run).or_default();
            *entry = (*entry).max(epoch);
            b.core.step(BackupEvent::CheckpointApplied { epoch })
        };
        self.on_backup(actions)
    }

    fn go_live(&mut self, epoch: u64) -> Result<(), String> {
        let b = self.backup.as_ref().expect("present");
        let Some(((run, held), pages)) = &b.machine else {
            return Err("the backup went live without a whole checkpoint".into());
        };
        check!(*held == epoch, "GoLive from epoch {epoch} but the machine holds {held}");
        check!(self.history.get(&(*run, epoch)) == Some(pages), "went live from a state no primary took");
        let released = self.released.get(run).copied();
        check!(
            released.is_none_or(|r| r <= epoch),
            "went live from epoch {epoch}, but outputs up to {released:?} had left"
        );
        self.stats.go_lives += 1;
        // The new primary would run on from here; stop restarting the old one.
        self.primary_restart_at = None;
        Ok(())
    }

    fn take_checkpoint(&mut self) -> Result<(), String> {
        let now = self.now;
        let ignore_advice = self.rng.chance(self.faults.ignore_advice);
        let Some(p) = self.primary.as_mut() else { return Ok(()) };
        if now < p.next_epoch_ms || now < p.frozen_until || !p.core.is_live(now) {
            return Ok(());
        }
        p.next_epoch_ms = now + EPOCH_MS;
        let epoch = p.core.last_taken_epoch().map_or(1, |e| e + 1);
        // The guest runs the epoch: changes a few pages and produces an output.
        for _ in 0..self.rng.range(0, 3) {
            let index = self.rng.below(PAGES as u64) as usize;
            p.pages[index] = self.rng.next().to_le_bytes();
            p.dirty[index] = true;
        }
        p.outputs.push(epoch, (p.run_id, epoch)).map_err(|e| e.to_string())?;
        let mut kind = p.core.next_checkpoint_kind();
        if ignore_advice {
            kind = match kind {
                CheckpointKind::Full => CheckpointKind::Incremental,
                CheckpointKind::Incremental => CheckpointKind::Full,
            };
        }
        let payload = match kind {
            CheckpointKind::Full => encode_pages(&p.pages, 0..PAGES),
            CheckpointKind::Incremental => encode_pages(&p.pages, (0..PAGES).filter(|&i| p.dirty[i])),
        };
        p.dirty.iter_mut().for_each(|d| *d = false);
        self.history.insert((p.run_id, epoch), p.pages.clone());
        self.stats.epochs_taken += 1;
        let actions =
            p.core.step(PrimaryEvent::CheckpointTaken { epoch, icount: epoch * 1000, kind, payload: &payload });
        self.on_primary(actions)
    }

    fn connect(&mut self) -> Result<(), String> {
        let now = self.now;
        if self.conn.is_some() || now < self.next_connect_at {
            return Ok(());
        }
        let (Some(p), Some(b)) = (&self.primary, &self.backup) else { return Ok(()) };
        if now < p.frozen_until || now < b.frozen_until || p.core.stopped().is_some() || b.core.is_live() {
            return Ok(());
        }
        self.conn = Some(Connection {
            to_backup: Pipe { queue: VecDeque::new(), open: true },
            to_primary: Pipe { queue: VecDeque::new(), open: true },
        });
        let backup_nonce = self.rng.nonce();
        let primary_nonce = self.rng.nonce();
        let actions = self.backup.as_mut().expect("present").core.step(BackupEvent::Connected { nonce: backup_nonce });
        self.on_backup(actions)?;
        let actions =
            self.primary.as_mut().expect("present").core.step(PrimaryEvent::Connected { nonce: primary_nonce });
        self.on_primary(actions)
    }

    fn check_one_live(&self) -> Result<(), String> {
        // A primary counts as live by its own lease reckoning, and also whenever it runs
        // (not frozen) without having stopped: it must stop itself, not merely lapse.
        let now = self.now;
        let primary_live = self
            .primary
            .as_ref()
            .is_some_and(|p| p.core.is_live(now) || (p.core.stopped().is_none() && now >= p.frozen_until));
        check!(!(primary_live && self.backup_live()), "the primary and the backup are both live at {now} ms");
        Ok(())
    }
}

fn drain_where<T>(items: &mut Vec<T>, mut due: impl FnMut(&T) -> bool) -> Vec<T> {
    let mut taken = Vec::new();
    let mut index = 0;
    while index < items.len() {
        if due(&items[index]) {
            taken.push(items.remove(index));
        } else {
            index += 1;
        }
    }
    taken
}

fn run_seed(seed: u64) -> Stats {
    let outcome = catch_unwind(AssertUnwindSafe(|| Sim::new(seed).run()));
    match outcome {
        Ok(Ok(stats)) => stats,
        Ok(Err(violation)) => panic!("simulation seed {seed} failed: {violation}\n  rerun: FTVR_SIM_SEED={seed} cargo test -p replica --test simulation"),
        Err(_) => panic!("simulation seed {seed} panicked (see above)\n  rerun: FTVR_SIM_SEED={seed} cargo test -p replica --test simulation"),
    }
}

fn seeds() -> Vec<u64> {
    if let Ok(seed) = std::env::var("FTVR_SIM_SEED") {
        return vec![seed.parse().expect("FTVR_SIM_SEED is a number")];
    }
    let count =
        std::env::var("FTVR_SIM_SEEDS").map_or(DEFAULT_SEEDS, |n| n.parse().expect("FTVR_SIM_SEEDS is a number"));
    (0..count).map(|i| 0xf7f7_0000 + i).collect()
}

#[test]
fn seeded_runs_keep_every_invariant() {
    let mut total = Stats::default();
    for seed in seeds() {
        let stats = run_seed(seed);
        total.epochs_taken += stats.epochs_taken;
        total.epochs_released += stats.epochs_released;
        total.applies += stats.applies;
        total.go_lives += stats.go_lives;
        total.primary_stops += stats.primary_stops;
        total.closes += stats.closes;
        total.crashes += stats.crashes;
        for (kind, count) in stats.close_reasons {
            *total.close_reasons.entry(kind).or_default() += count;
        }
    }
    eprintln!("simulation totals: {total:?}");
    // The runs must not be vacuous: checkpoints flow, outputs leave, takeovers happen.
    assert!(total.applies > 0 && total.epochs_released > 0, "{total:?}");
}

#[test]
fn a_fault_free_run_releases_nearly_every_epoch() {
    let mut sim = Sim::new(1);
    sim.faults = Faults::scaled(0.0);
    let stats = sim.run().unwrap();
    assert_eq!(stats.go_lives + stats.primary_stops + stats.crashes, 0, "{stats:?}");
    assert!(stats.epochs_released + 2 >= stats.epochs_taken, "{stats:?}");
}

#[test]
fn a_crashed_primary_is_replaced_by_the_backup() {
    let mut sim = Sim::new(2);
    sim.faults = Faults::scaled(0.0);
    for _ in 0..400 {
        sim.step().unwrap();
    }
    sim.crash(true);
    for _ in 0..800 {
        sim.step().unwrap();
    }
    assert_eq!(sim.stats.go_lives, 1, "{:?}", sim.stats);
}

/// Kills one side at each step of a fault-free run in turn (every `STRIDE`th step, to keep
/// the test quick), then lets the survivors run on: the invariants hold throughout, and a
/// backup with a whole checkpoint replaces a dead primary.
#[test]
fn crashing_either_side_at_every_step_keeps_the_invariants() {
    const STRIDE: usize = 5;
    for primary_side in [true, false] {
        for crash_step in (0..400).step_by(STRIDE) {
            let seed = 0xc0de_0000 + crash_step as u64 + if primary_side { 1 << 20 } else { 0 };
            let outcome = catch_unwind(AssertUnwindSafe(|| -> Result<Stats, String> {
                let mut sim = Sim::new(seed);
                sim.faults = Faults::scaled(0.0);
                for _ in 0..crash_step {
                    sim.step()?;
                }
                let backup_held_a_checkpoint = sim.backup.as_ref().is_some_and(|b| b.core.applied().is_some());
                sim.crash(primary_side);
                if primary_side && backup_held_a_checkpoint {
                    for _ in 0..700 {
                        sim.step()?;
                    }
                    check!(sim.stats.go_lives == 1, "the backup did not take over: {:?}", sim.stats);
                    return Ok(sim.stats.clone());
                }
                if !primary_side {
                    sim.backup_restart_at = Some(sim.now + 30);
                }
                for _ in 0..700 {
                    sim.step()?;
                }
                Ok(sim.stats.clone())
            }));
            let side = if primary_side { "primary" } else { "backup" };
            let stats = match outcome {
                Ok(Ok(stats)) => stats,
                Ok(Err(violation)) => panic!("{side} crashed at step {crash_step} (seed {seed}): {violation}"),
                Err(_) => panic!("{side} crashed at step {crash_step} (seed {seed}) panicked (see above)"),
            };
            if !primary_side {
                // The primary carries on and the new backup catches up.
                assert!(stats.epochs_released > 0, "{side} crashed at step {crash_step}: {stats:?}");
            }
        }
    }
}
