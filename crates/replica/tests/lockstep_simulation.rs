//! Seeded simulations of lockstep replication: the real protocol cores ([`Primary`],
//! [`Backup`]) carrying the real lockstep cores ([`Leader`], [`Follower`]) over a faulty
//! byte link, with a small deterministic machine on each side (its state a hash chain of
//! its inputs, its outputs a function of that state, idling until an input wakes it).
//!
//! Faults: segments corrupted in transit (repaired by resend), connections cut, the link
//! partitioned for a while, the backup's process crashed and restarted with nothing, the
//! primary's process crashed for good, an input altered on the backup's side (a provoked
//! divergence). Invariants, checked as they happen:
//! 1. output rule: no output leaves the primary before some backup held every input the
//!    primary's machine took before producing it;
//! 2. nothing lost, never two stories: the outputs the world saw, numbered as the guest
//!    produced them, have no gap and each number one content (a takeover sends some again,
//!    identical);
//! 3. after a partition (and after a primary crash) exactly one side is live;
//! 4. a divergence is caught by the next digest and repaired by a state resynchronization,
//!    and the backup's machine then matches the primary's again.
//!
//! `LOCKSTEP_SIM_SEEDS=N` runs N seeds; `LOCKSTEP_SIM_SEED=S` runs seed S alone. A failing run
//! prints its seed.

use seeded::SeededRng;
use std::collections::{BTreeMap, VecDeque};

use replica::lockstep::{Batch, Divergence, Follower, Leader, LeaderConfig, Next, RunEnd, Start};
use replica::{
    Backup, BackupAction, BackupConfig, BackupEvent, BackupLossPolicy, CheckpointKind, ConnId, PresharedKey, Primary,
    PrimaryAction, PrimaryConfig, PrimaryEvent, RecordView, SwapAnswer,
};

const DIGEST: [u8; 32] = [0x17; 32];
const SLICE_ICOUNT: u64 = 40;
const FAILOVER_MS: u64 = 100;

fn mix(a: u64, b: u64) -> u64 {
    (a ^ b).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29) ^ 0x5bd1_e995
}

/// The toy machine: deterministic, inputs applied exactly at their stamps.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Toy {
    icount: u64,
    acc: u64,
    waiting: bool,
    pending: VecDeque<(u64, Vec<u8>)>,
    outputs: Vec<(u64, u64)>,
}

impl Toy {
    fn boot() -> Toy {
        Toy { icount: 0, acc: 1, waiting: false, pending: VecDeque::new(), outputs: Vec::new() }
    }

    fn push(&mut self, icount: u64, bytes: Vec<u8>) {
        assert!(icount >= self.icount, "an input stamped in the past");
        self.pending.push_back((icount, bytes));
        self.apply_due();
    }

    fn apply_due(&mut self) {
        while self.pending.front().is_some_and(|(stamp, _)| *stamp == self.icount) {
            let (_, bytes) = self.pending.pop_front().expect("checked");
            self.acc = bytes.iter().fold(self.acc, |acc, b| mix(acc, u64::from(*b)));
            self.waiting = false;
        }
    }

    fn run(&mut self, until: u64) -> RunEnd {
        while self.icount < until && !self.waiting {
            self.icount += 1;
            self.acc = mix(self.acc, self.icount);
            if self.acc.is_multiple_of(7) {
                self.outputs.push((self.icount, self.acc));
            }
            self.waiting = self.acc.is_multiple_of(13);
            self.apply_due();
        }
        if self.waiting {
            RunEnd::Idle
        } else {
            RunEnd::Ran
        }
    }

    fn digest(&self) -> u128 {
        (u128::from(self.acc) << 64) | u128::from(self.icount) ^ (self.pending.len() as u128) << 60
    }

    fn save(&self) -> Vec<u8> {
        assert!(self.pending.is_empty(), "inputs are pushed at the current icount: none waits");
        let mut bytes = self.icount.to_le_bytes().to_vec();
        bytes.extend_from_slice(&self.acc.to_le_bytes());
        bytes.push(self.waiting as u8);
        bytes
    }

    fn restore(bytes: &[u8]) -> Toy {
        let icount = u64::from_le_bytes(bytes[0..8].try_into().unwrap());
        let acc = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
        Toy { icount, acc, waiting: bytes[16] == 1, pending: VecDeque::new(), outputs: Vec::new() }
    }
}

/// An output as the primary holds it: its number, what it says, and how many inputs the
/// machine had taken when it was produced.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Out {
    seq: u64,
    content: (u64, u64),
    inputs_before: u64,
}

#[derive(Debug, Clone, Copy)]
struct Faults {
    corrupt: f64,
    cut: f64,
    partition: f64,
    crash_backup: f64,
    crash_primary: f64,
    input: f64,
}

impl Faults {
    fn none() -> Faults {
        Faults { corrupt: 0.0, cut: 0.0, partition: 0.0, crash_backup: 0.0, crash_primary: 0.0, input: 0.02 }
    }
    fn random(rng: &mut SeededRng) -> Faults {
        let k = [0.0, 0.5, 1.0, 2.0][rng.below(4) as usize];
        Faults {
            corrupt: 0.002 * k,
            cut: 0.0005 * k,
            partition: 0.0003 * k,
            crash_backup: 0.0002 * k,
            crash_primary: 0.00005 * k,
            input: [0.005, 0.02, 0.1][rng.below(3) as usize],
        }
    }
}

struct Link {
    backup_conn: ConnId,
    to_backup: VecDeque<(u64, Vec<u8>)>,
    to_primary: VecDeque<(u64, Vec<u8>)>,
}

struct PrimaryHost {
    core: Primary,
    leader: Leader<Out>,
    machine: Toy,
    outputs_produced: u64,
    stopped: bool,
    crashed: bool,
}

struct BackupHost {
    core: Backup,
    follower: Follower<(u64, u64)>,
    machine: Toy,
    /// Went live: runs on alone, its outputs leaving at once.
    live: bool,
    /// Alter the input pushed when this many inputs have been pushed (a provoked divergence).
    alter_at: Option<u64>,
    /// Holds a start (can follow) since the last restart.
    started: bool,
}

struct Store {
    generation: u64,
    owner: &'static str,
}

struct Sim {
    rng: SeededRng,
    now_ms: u64,
    faults: Faults,
    primary: PrimaryHost,
    backup: Option<BackupHost>,
    backup_restart_at: Option<u64>,
    link: Option<Link>,
    partitioned_until: u64,
    next_conn: ConnId,
    store: Store,
    /// What the world saw: output number → content.
    world: BTreeMap<u64, (u64, u64)>,
    /// The most inputs any backup ever held (the primary's numbering).
    inputs_held_max: u64,
    /// For each epoch a backup held: how many inputs it then held.
    held_epochs: BTreeMap<u64, u64>,
    divergences_caught: u64,
    resyncs: u64,
    partitions: u64,
    key: PresharedKey,
}

impl Sim {
    fn new(seed: u64, faults: Faults) -> Sim {
        let mut rng = SeededRng::new(seed);
        let key = PresharedKey::new(b"lockstep simulation key").unwrap();
        let mut config = PrimaryConfig::new(key.clone(), DIGEST, rng.next_u64());
        config.on_backup_loss = BackupLossPolicy::Hold;
        config.peer_timeout_ms = 60;
        config.ownership_check_ms = 50;
        let primary = PrimaryHost {
            core: Primary::new(config, 1, 0),
            leader: Leader::new(
                LeaderConfig {
                    max_held_outputs: 64,
                    digest_every_ms: 30,
                    min_batch_ms: 3,
                    max_lag_ms: 5,
                    ..LeaderConfig::default()
                },
                0,
            ),
            machine: Toy::boot(),
            outputs_produced: 0,
            stopped: false,
            crashed: false,
        };
        let mut sim = Sim {
            rng,
            now_ms: 0,
            faults,
            primary,
            backup: None,
            backup_restart_at: None,
            link: None,
            partitioned_until: 0,
            next_conn: 0,
            store: Store { generation: 1, owner: "primary" },
            world: BTreeMap::new(),
            inputs_held_max: 0,
            held_epochs: BTreeMap::new(),
            divergences_caught: 0,
            resyncs: 0,
            partitions: 0,
            key,
        };
        sim.start_backup();
        sim
    }

    fn start_backup(&mut self) {
        let mut config = BackupConfig::new(self.key.clone(), DIGEST, 1 << 20);
        config.failover_timeout_ms = FAILOVER_MS;
        self.backup = Some(BackupHost {
            core: Backup::new(config, self.now_ms),
            follower: Follower::new(),
            machine: Toy::boot(),
            live: false,
            alter_at: None,
            started: false,
        });
    }

    fn link_up(&self) -> bool {
        self.now_ms >= self.partitioned_until
    }

    fn step(&mut self) {
        self.now_ms += 1;
        self.inject_faults();
        self.connect();
        self.deliver();
        if !self.primary.crashed {
            let actions = self.primary.core.step(PrimaryEvent::Tick { now_ms: self.now_ms });
            self.primary_actions(actions);
            self.run_primary();
        }
        if let Some(b) = self.backup.as_mut() {
            let actions = b.core.step(BackupEvent::Tick { now_ms: self.now_ms });
            self.backup_actions(actions);
            self.run_backup();
        } else if self.backup_restart_at.is_some_and(|at| self.now_ms >= at) {
            self.backup_restart_at = None;
            self.start_backup();
        }
    }

    fn inject_faults(&mut self) {
        let f = self.faults;
        if self.link.is_some() && self.rng.chance(f.cut) {
            self.cut_link();
        }
        if self.link_up() && self.rng.chance(f.partition) {
            self.partitioned_until = self.now_ms + [20, 80, 300, 1000][self.rng.below(4) as usize];
            self.partitions += 1;
        }
        if self.backup.as_ref().is_some_and(|b| !b.live) && self.rng.chance(f.crash_backup) {
            self.crash_backup();
        }
        if !self.primary.crashed && self.rng.chance(f.crash_primary) {
            self.crash_primary();
        }
    }

    fn crash_backup(&mut self) {
        self.backup = None;
        self.backup_restart_at = Some(self.now_ms + 50 + self.rng.below(300));
        if let Some(link) = self.link.take() {
            let _ = link;
            if !self.primary.crashed {
                let actions = self.primary.core.step(PrimaryEvent::Disconnected);
                self.primary_actions(actions);
            }
        }
    }

    fn crash_primary(&mut self) {
        self.primary.crashed = true;
        if let Some(link) = self.link.take() {
            if let Some(b) = self.backup.as_mut() {
                let actions = b.core.step(BackupEvent::Disconnected { conn: link.backup_conn });
                self.backup_actions(actions);
            }
        }
    }

    fn cut_link(&mut self) {
        let Some(link) = self.link.take() else { return };
        if !self.primary.crashed {
            let actions = self.primary.core.step(PrimaryEvent::Disconnected);
            self.primary_actions(actions);
        }
        if let Some(b) = self.backup.as_mut() {
            let actions = b.core.step(BackupEvent::Disconnected { conn: link.backup_conn });
            self.backup_actions(actions);
        }
    }

    fn connect(&mut self) {
        let can = self.link.is_none()
            && self.link_up()
            && !self.primary.crashed
            && !self.primary.stopped
            && self.backup.as_ref().is_some_and(|b| !b.live)
            && self.now_ms.is_multiple_of(5);
        if !can {
            return;
        }
        self.next_conn += 1;
        let conn = self.next_conn;
        self.link = Some(Link { backup_conn: conn, to_backup: VecDeque::new(), to_primary: VecDeque::new() });
        let nonce = self.rng.nonce();
        let actions = self.primary.core.step(PrimaryEvent::Connected { nonce });
        self.primary_actions(actions);
        let nonce = self.rng.nonce();
        let b = self.backup.as_mut().expect("checked");
        let actions = b.core.step(BackupEvent::Connected { conn, nonce });
        self.backup_actions(actions);
    }

    fn deliver(&mut self) {
        if !self.link_up() {
            return;
        }
        loop {
            let now = self.now_ms;
            let Some(link) = self.link.as_mut() else { return };
            let conn = link.backup_conn;
            if link.to_backup.front().is_some_and(|(at, _)| *at <= now) {
                let (_, bytes) = link.to_backup.pop_front().expect("checked");
                if let Some(b) = self.backup.as_mut() {
                    let actions = b.core.step(BackupEvent::Received { conn, bytes: &bytes });
                    self.backup_actions(actions);
                }
            } else if link.to_primary.front().is_some_and(|(at, _)| *at <= now) {
                let (_, bytes) = link.to_primary.pop_front().expect("checked");
                if !self.primary.crashed {
                    let actions = self.primary.core.step(PrimaryEvent::Received(&bytes));
                    self.primary_actions(actions);
                }
            } else {
                return;
            }
        }
    }

    fn send(&mut self, to_backup: bool, mut bytes: Vec<u8>) {
        if self.rng.chance(self.faults.corrupt) && !bytes.is_empty() {
            let at = self.rng.below(bytes.len() as u64) as usize;
            bytes[at] ^= 1 << self.rng.below(8);
        }
        let at = self.now_ms + 1 + self.rng.below(4);
        if let Some(link) = self.link.as_mut() {
            match to_backup {
                true => link.to_backup.push_back((at, bytes)),
                false => link.to_primary.push_back((at, bytes)),
            }
        }
    }

    /// The primary's slice: maybe an input, run, hold the outputs, cut a batch when due.
    fn run_primary(&mut self) {
        let p = &mut self.primary;
        if p.stopped {
            return;
        }
        if p.leader.epoch() > 0 && !p.leader.must_wait() {
            let wake = p.machine.waiting && self.rng.chance(0.3);
            if wake || self.rng.chance(self.faults.input) {
                let bytes = self.rng.next_u64().to_le_bytes()[..1 + self.rng.below(7) as usize].to_vec();
                let p = &mut self.primary;
                p.machine.push(p.machine.icount, bytes.clone());
                p.leader.input(p.machine.icount, bytes);
            }
            let p = &mut self.primary;
            p.machine.run(p.machine.icount + SLICE_ICOUNT);
            for content in std::mem::take(&mut p.machine.outputs) {
                let out = Out { seq: p.outputs_produced, content, inputs_before: p.leader.inputs_stamped() };
                p.outputs_produced += 1;
                p.leader.hold(out);
            }
        }
        let (icount, now) = (self.primary.machine.icount, self.now_ms);
        let p = &mut self.primary;
        let start_wanted = p.core.next_checkpoint_kind() == CheckpointKind::Full;
        if !p.leader.cut_due(icount, now, start_wanted) {
            return;
        }
        // The first batch starts the stream from the boot, and is kept for a backup that
        // connects later (the protocol logs a full checkpoint even with no backup).
        let kind = if p.leader.epoch() == 0 { CheckpointKind::Full } else { p.core.next_checkpoint_kind() };
        let (epoch, payload) = match kind {
            CheckpointKind::Discard => (p.leader.discard(icount, now), Vec::new()),
            CheckpointKind::Full | CheckpointKind::Incremental => {
                let start = match kind {
                    CheckpointKind::Full if icount == 0 => {
                        Some(Start::Boot { digest: p.machine.digest(), params: vec![] })
                    }
                    CheckpointKind::Full => Some(p.leader.state_start(icount, p.machine.save())),
                    _ => None,
                };
                let digest = p.leader.digest_due(now).then(|| p.machine.digest());
                let (epoch, batch) = p.leader.cut(icount, now, start, digest);
                (epoch, batch.encode())
            }
        };
        let actions = p.core.step(PrimaryEvent::CheckpointTaken { epoch, icount, kind, payload });
        self.primary_actions(actions);
    }

    fn primary_actions(&mut self, actions: Vec<PrimaryAction>) {
        let mut queue: VecDeque<PrimaryAction> = actions.into();
        while let Some(action) = queue.pop_front() {
            match action {
                PrimaryAction::Send(bytes) => self.send(true, bytes),
                PrimaryAction::ReleaseOutputs { up_to_epoch } => {
                    let held = self.held_epochs.get(&up_to_epoch).copied();
                    for out in self.primary.leader.release(up_to_epoch) {
                        assert!(
                            held.is_some_and(|held| held >= out.inputs_before),
                            "output {} left with epoch {up_to_epoch} before a backup held its {} inputs (the \
                             backup held {held:?} with that epoch)",
                            out.seq,
                            out.inputs_before,
                        );
                        self.emit(out.seq, out.content, "primary");
                    }
                }
                PrimaryAction::SwapGeneration { expected, ended } => {
                    let answer = self.swap(expected, "primary", ended);
                    queue.extend(self.primary.core.step(PrimaryEvent::Swap(answer)));
                }
                PrimaryAction::ReadOwnership => {
                    let view =
                        RecordView { generation: self.store.generation, owner: self.store.owner.into(), ended: None };
                    queue.extend(self.primary.core.step(PrimaryEvent::Ownership(Ok(Some(view)))));
                }
                PrimaryAction::Close { .. } => self.cut_link(),
                PrimaryAction::Stop { .. } => {
                    self.primary.stopped = true;
                    self.cut_link();
                }
                PrimaryAction::ProtectionChanged { .. } | PrimaryAction::Finished { .. } => {}
                PrimaryAction::Detached { .. } => unreachable!("never unprotected here"),
            }
        }
    }

    fn swap(&mut self, expected: u64, owner: &'static str, _ended: Option<u32>) -> Result<SwapAnswer, String> {
        if self.store.generation != expected {
            let (generation, owner) = (Some(self.store.generation), self.store.owner.to_string());
            return Ok(SwapAnswer::Conflict { generation, owner, ended: None });
        }
        self.store = Store { generation: expected + 1, owner };
        Ok(SwapAnswer::Swapped { generation: expected + 1 })
    }

    fn emit(&mut self, seq: u64, content: (u64, u64), by: &str) {
        if let Some(seen) = self.world.insert(seq, content) {
            assert_eq!(seen, content, "output {seq} left twice with different contents (the second from the {by})");
        }
    }

    fn backup_actions(&mut self, actions: Vec<BackupAction>) {
        let mut queue: VecDeque<BackupAction> = actions.into();
        while let Some(action) = queue.pop_front() {
            let Some(b) = self.backup.as_mut() else { return };
            match action {
                BackupAction::Send { conn, bytes } => {
                    if self.link.as_ref().is_some_and(|l| l.backup_conn == conn) {
                        self.send(false, bytes);
                    }
                }
                BackupAction::ApplyCheckpoint { epoch, payload, .. } => {
                    let batch = Batch::decode(&payload).expect("the primary sends lockstep batches");
                    let resync = batch.start.is_some() && b.follower.diverged().is_some();
                    let event = match b.follower.hold(batch) {
                        Ok(()) => {
                            b.started = true;
                            self.resyncs += resync as u64;
                            let inputs_held = b.follower.status().inputs_held;
                            self.inputs_held_max = self.inputs_held_max.max(inputs_held);
                            self.held_epochs.insert(epoch, inputs_held);
                            BackupEvent::CheckpointApplied { epoch }
                        }
                        Err(refused) => BackupEvent::ApplyFailed { epoch, reason: refused.to_string() },
                    };
                    queue.extend(b.core.step(event));
                }
                BackupAction::Close { conn, .. } => {
                    if self.link.as_ref().is_some_and(|l| l.backup_conn == conn) {
                        self.cut_link();
                    }
                }
                BackupAction::ClaimOwnership { generation } => {
                    let answer = self.swap(generation, "backup", None);
                    let b = self.backup.as_mut().expect("checked");
                    queue.extend(b.core.step(BackupEvent::Claim(answer)));
                }
                BackupAction::ReadOwnership => {
                    let view =
                        RecordView { generation: self.store.generation, owner: self.store.owner.into(), ended: None };
                    queue.extend(b.core.step(BackupEvent::Ownership(Ok(Some(view)))));
                }
                BackupAction::GoLive { .. } => self.go_live(),
                BackupAction::CannotTakeOver { .. } => {}
                BackupAction::Exit { .. } | BackupAction::StandDown => unreachable!("the VM never ends here"),
            }
        }
    }

    /// The takeover: execute everything held, send again what may not have left, go live.
    fn go_live(&mut self) {
        while self.follow(u64::MAX) {}
        let b = self.backup.as_mut().expect("the backup goes live");
        assert!(b.follower.diverged().is_none(), "went live from a diverged state");
        assert!(b.follower.caught_up());
        b.live = true;
        let (_, produced) = b.follower.outputs();
        let unreleased = b.follower.take_unreleased();
        let first = produced - unreleased.len() as u64;
        for (i, content) in unreleased.into_iter().enumerate() {
            self.emit(first + i as u64, content, "backup");
        }
        self.cut_link();
    }

    /// One step of the follower's machine; false when it waits.
    fn follow(&mut self, budget: u64) -> bool {
        let Some(b) = self.backup.as_mut() else { return false };
        let icount = b.machine.icount;
        match b.follower.next(icount) {
            Next::Wait => return false,
            Next::Boot { .. } => b.machine = Toy::boot(),
            Next::Restore { bytes, .. } => b.machine = Toy::restore(&bytes),
            Next::Push { icount, mut bytes } => {
                if b.alter_at == Some(b.follower.status().inputs_pushed) {
                    bytes.push(0xff);
                    b.alter_at = None;
                }
                b.machine.push(icount, bytes);
            }
            Next::Check { icount, .. } => {
                if let Err(Divergence::Digest { .. }) = b.follower.check(icount, b.machine.digest()) {
                    self.divergences_caught += 1;
                    let b = self.backup.as_mut().expect("checked");
                    let actions = b.core.step(BackupEvent::StateLost { reason: "digest".into() });
                    self.backup_actions(actions);
                }
            }
            Next::Run { until } => {
                let until = until.min(icount.saturating_add(budget));
                let end = b.machine.run(until);
                let outputs = std::mem::take(&mut b.machine.outputs);
                let at = b.machine.icount;
                if b.follower.ran(at, until, end, outputs).is_err() {
                    self.divergences_caught += 1;
                    let b = self.backup.as_mut().expect("checked");
                    let actions = b.core.step(BackupEvent::StateLost { reason: "run".into() });
                    self.backup_actions(actions);
                }
            }
        }
        true
    }

    fn run_backup(&mut self) {
        let Some(b) = self.backup.as_mut() else { return };
        if b.live {
            if b.machine.waiting || self.rng.chance(self.faults.input) {
                let icount = b.machine.icount;
                b.machine.push(icount, vec![self.rng.below(256) as u8]);
            }
            b.machine.run(b.machine.icount + SLICE_ICOUNT);
            let (_, base) = b.follower.outputs();
            let outputs = std::mem::take(&mut b.machine.outputs);
            for (i, content) in outputs.iter().enumerate() {
                self.emit(base + i as u64, *content, "backup");
            }
            let b = self.backup.as_mut().expect("checked");
            b.follower.ran(b.machine.icount, b.machine.icount, RunEnd::Ran, outputs).ok();
            let _ = b.follower.take_unreleased();
            return;
        }
        // The follower runs faster than the primary (it never waits for the wall clock).
        let mut steps = 0;
        while steps < 16 && self.follow(SLICE_ICOUNT * 2) {
            steps += 1;
        }
    }

    /// Nothing lost: the world's outputs are numbered without a gap.
    fn check_no_gap(&self) {
        for (expected, seq) in self.world.keys().enumerate() {
            assert_eq!(*seq, expected as u64, "output {expected} never left (a gap before {seq})");
        }
    }

    fn live_sides(&self) -> usize {
        let primary = !self.primary.crashed && !self.primary.stopped;
        let backup = self.backup.as_ref().is_some_and(|b| b.live);
        primary as usize + backup as usize
    }
}

fn run_checked(seed: u64, what: &str, run: impl FnOnce(u64) + std::panic::UnwindSafe) {
    if let Err(panic) = std::panic::catch_unwind(move || run(seed)) {
        eprintln!("lockstep simulation failed: {what}, seed {seed} (rerun with LOCKSTEP_SIM_SEED={seed})");
        std::panic::resume_unwind(panic);
    }
}

fn seeds(default: u64) -> Vec<u64> {
    if let Some(seed) = std::env::var("LOCKSTEP_SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        return vec![seed];
    }
    let n = std::env::var("LOCKSTEP_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(default);
    (0..n).collect()
}

#[test]
fn a_fault_free_pair_releases_outputs_as_the_backup_acknowledges_their_inputs() {
    let mut sim = Sim::new(1, Faults::none());
    for _ in 0..3000 {
        sim.step();
    }
    sim.check_no_gap();
    let released = sim.world.len() as u64;
    assert!(released > 50, "only {released} outputs left in 3 s");
    assert!(
        sim.primary.outputs_produced - released < 64,
        "outputs stuck: {} of {}",
        released,
        sim.primary.outputs_produced
    );
    let b = sim.backup.as_ref().unwrap();
    assert!(b.follower.status().digests_checked > 20);
    assert_eq!(b.follower.status().divergences, 0);
    // The backup follows closely: its machine is within a few batches of the primary's.
    assert!(sim.primary.machine.icount - b.machine.icount < 2000, "backup lags");
}

#[test]
fn a_seeded_run_with_faults_keeps_the_output_rule_and_loses_nothing() {
    for seed in seeds(60) {
        run_checked(seed, "faults", |seed| {
            let mut rng = SeededRng::new(seed ^ 0xfa17);
            let mut sim = Sim::new(seed, Faults::random(&mut rng));
            for _ in 0..4000 {
                sim.step();
            }
            // Quiet: the link heals; whoever is live carries on.
            sim.faults = Faults { input: sim.faults.input, ..Faults::none() };
            sim.partitioned_until = sim.partitioned_until.min(sim.now_ms);
            for _ in 0..1500 {
                sim.step();
            }
            sim.check_no_gap();
            let backup_holds = sim.backup.as_ref().is_some_and(|b| b.started);
            if !sim.primary.crashed || backup_holds {
                assert_eq!(sim.live_sides(), 1, "after the faults, {} sides are live", sim.live_sides());
            }
        });
    }
}

#[test]
fn a_primary_crash_at_every_step_fails_over_with_nothing_lost() {
    for crash_at in 0..400u64 {
        run_checked(crash_at, "primary crash at this step", |crash_at| {
            let mut sim = Sim::new(crash_at + 7, Faults::none());
            for _ in 0..crash_at {
                sim.step();
            }
            let acknowledged = sim.world.len();
            sim.crash_primary();
            for _ in 0..(FAILOVER_MS * 3) {
                sim.step();
            }
            let b = sim.backup.as_ref().unwrap();
            // Until the primary first became protected the backup's state counts for no
            // generation (nothing left unprotected either: outputs were held).
            if b.core.status().state_generation.is_some() || crash_at >= 100 {
                assert!(
                    b.live,
                    "the backup did not take over (crash at step {crash_at}): {:?} {:?}",
                    b.core.status(),
                    b.follower.status()
                );
                assert!(sim.world.len() >= acknowledged);
            }
            sim.check_no_gap();
            assert!(sim.live_sides() <= 1);
        });
    }
}

#[test]
fn a_backup_crash_at_every_step_is_repaired_by_a_state_and_the_pair_runs_on() {
    for crash_at in 0..400u64 {
        run_checked(crash_at, "backup crash at this step", |crash_at| {
            let mut sim = Sim::new(crash_at + 11, Faults::none());
            for _ in 0..crash_at {
                sim.step();
            }
            sim.crash_backup();
            for _ in 0..1500 {
                sim.step();
            }
            sim.check_no_gap();
            let b = sim.backup.as_ref().expect("the backup restarted");
            assert!(
                b.started && !b.live,
                "the restarted backup follows: {:?} {:?} {:?}",
                b.core.status(),
                sim.primary.core.status(),
                b.follower.status()
            );
            // Protected again: every output but the newest left.
            let waiting = sim.primary.outputs_produced - sim.world.len() as u64;
            assert!(waiting < 64, "{waiting} outputs still held after the backup came back");
            let lag = sim.primary.machine.icount.saturating_sub(b.machine.icount);
            assert!(lag < 4000, "the backup lags {lag} instructions behind");
        });
    }
}

#[test]
fn a_partition_longer_than_the_failover_timeout_leaves_exactly_one_side_live() {
    for seed in seeds(20) {
        run_checked(seed, "partition", |seed| {
            let mut sim = Sim::new(seed, Faults::none());
            for _ in 0..(200 + seed * 37 % 500) {
                sim.step();
            }
            sim.partitioned_until = sim.now_ms + FAILOVER_MS * 5;
            for _ in 0..(FAILOVER_MS * 5 + 500) {
                sim.step();
            }
            sim.check_no_gap();
            assert_eq!(sim.live_sides(), 1);
            assert!(sim.backup.as_ref().unwrap().live, "the backup took over");
            assert!(sim.primary.stopped, "the old primary found the record swapped and stopped");
        });
    }
}

#[test]
fn an_input_altered_on_the_backup_is_caught_by_the_next_digest_and_resynchronized() {
    for seed in seeds(20) {
        run_checked(seed, "divergence", |seed| {
            let mut sim = Sim::new(seed, Faults::none());
            for _ in 0..300 {
                sim.step();
            }
            let b = sim.backup.as_mut().unwrap();
            b.alter_at = Some(b.follower.status().inputs_pushed + 1);
            for _ in 0..1000 {
                sim.step();
            }
            assert!(
                sim.divergences_caught >= 1,
                "the altered input was not caught: {:?}",
                sim.backup.as_ref().unwrap().follower.status()
            );
            assert!(sim.resyncs >= 1, "no resynchronization");
            let b = sim.backup.as_ref().unwrap();
            assert!(b.follower.diverged().is_none(), "still diverged: {:?}", b.follower.diverged());
            // In step again: the next digests match.
            let checked = b.follower.status().digests_checked;
            for _ in 0..300 {
                sim.step();
            }
            let b = sim.backup.as_ref().unwrap();
            assert!(b.follower.status().digests_checked > checked);
            assert_eq!(b.follower.status().divergences, 1);
            sim.check_no_gap();
        });
    }
}
