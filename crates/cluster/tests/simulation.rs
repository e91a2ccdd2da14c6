//! A seeded simulation of the control loop. Hosts, agents and replica processes are modelled
//! in memory; the ownership records live in a real [`store::MemoryStore`], swapped by the
//! same compare-and-swap the replicas use. Each run starts from an arbitrary state — garbage
//! keys, reports of hosts that never existed or have long gone, ownership records at odd
//! generations or owned by a host that runs nothing, orphan replicas, replicas of an earlier
//! declaration, two replicas both claiming primary, half-finished placements — then injects
//! faults for a while (host crashes, partitions, agents crashing in the middle of their
//! actions, clocks far off), then heals everything. It asserts:
//! - never two live copies of a VM (two running primaries holding the record's generation),
//!   at every step, faults included;
//! - convergence to the declared state within [`CONVERGE_ROUNDS`] rounds after healing, a
//!   rule's request to move a backup elsewhere (made during the faults or at healing) carried
//!   out and removed.
//!
//! The seed is printed; `FTVM_SIM_SEED=N` replays one run.

use seeded::SeededRng;
use std::collections::BTreeMap;

use cluster::observed::HOST_FORGET_MS;
use cluster::{
    round, Action, ClaimFrom, Declared, DeclaredVm, HostReport, HostView, Observed, ReplicaReport, ReplicaRole,
};
use store::{MemoryStore, OwnershipRecord, OwnershipStore, SwapOutcome, VmState};

/// Simulated milliseconds per step (one round of every agent, then the processes move).
const STEP_MS: u64 = 500;
/// Rounds after healing within which the cluster must match what is declared.
const CONVERGE_ROUNDS: u64 = 30;
const FAULT_STEPS: u64 = 60;
/// How often a replica's reported status is the one from before the last moves.
const STATUS_LAG_PERCENT: u64 = 25;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Intent {
    Primary,
    Backup,
}

#[derive(Debug, Clone)]
struct Process {
    vm: String,
    uid: u64,
    host: String,
    /// None: a primary or backup once started; Some: still starting.
    starting: Option<Intent>,
    role: ReplicaRole,
    listen: Option<String>,
    backup_to: Option<String>,
    protected: bool,
    generation: Option<u64>,
    /// A primary being started again: the record it may take (the round's `claim_from`).
    claim_from: Option<ClaimFrom>,
}

#[derive(Debug, Clone, Default)]
struct Host {
    up: bool,
    agent_up: bool,
    /// Cut off from the store and from every other host; its processes keep running.
    partitioned: bool,
    clock_offset_ms: i64,
    seq: u64,
}

struct World {
    rng: SeededRng,
    step: u64,
    hosts: BTreeMap<String, Host>,
    processes: BTreeMap<u32, Process>,
    next_pid: u32,
    records: MemoryStore,
    declared: Declared,
    /// Reports in the store, with the step each last changed.
    reports: BTreeMap<String, (HostReport, u64)>,
    garbage_keys: Vec<String>,
    /// The processes as they were before the last moves: an agent reads its replicas' status
    /// before it reads the records, so what it reports may lag a takeover the record shows.
    before_moves: BTreeMap<u32, Process>,
}

fn record_id(vm: &str, uid: u64) -> String {
    cluster::keys::ownership_id(vm, uid)
}

impl World {
    fn new(seed: u64) -> World {
        let mut rng = SeededRng::new(seed);
        let host_count = 3 + rng.below(3);
        let hosts = (0..host_count)
            .map(|i| (format!("h{i}"), Host { up: true, agent_up: true, ..Default::default() }))
            .collect();
        let mut declared = Declared::default();
        for i in 0..1 + rng.below(4) {
            let protection = if rng.percent(70) { "checkpoint" } else { "none" };
            let spec: cluster::VmSpec =
                serde_json::from_value(serde_json::json!({"name": format!("vm{i}"), "protection": protection}))
                    .unwrap();
            let uid = 10 + i;
            declared.vms.insert(spec.name.clone(), DeclaredVm { spec: spec.checked().unwrap(), uid, created_ms: 0 });
        }
        let mut world = World {
            rng,
            step: 0,
            hosts,
            processes: BTreeMap::new(),
            next_pid: 100,
            records: MemoryStore::new(),
            declared,
            reports: BTreeMap::new(),
            garbage_keys: Vec::new(),
            before_moves: BTreeMap::new(),
        };
        world.scramble();
        world
    }

    fn host_names(&self) -> Vec<String> {
        self.hosts.keys().cloned().collect()
    }

    fn spawn(&mut self, process: Process) -> u32 {
        self.next_pid += 1;
        self.processes.insert(self.next_pid, process);
        self.next_pid
    }

    fn process(&self, vm: &str, uid: u64, host: &str, role: ReplicaRole) -> Process {
        Process {
            vm: vm.into(),
            uid,
            host: host.into(),
            starting: None,
            role,
            listen: (role == ReplicaRole::Backup).then(|| format!("{host}:{}", self.next_pid + 1)),
            backup_to: None,
            protected: false,
            generation: None,
            claim_from: None,
        }
    }

    /// The arbitrary starting state.
    fn scramble(&mut self) {
        let names = self.host_names();
        let vms: Vec<(String, u64)> = self.declared.vms.values().map(|d| (d.spec.name.clone(), d.uid)).collect();
        for _ in 0..self.rng.below(4) {
            let key = format!("/ftvm/hosts/garbage{}", self.rng.below(1000));
            self.garbage_keys.push(key);
        }
        // A report of a host that left long ago, still claiming a primary.
        if self.rng.percent(50) {
            let (vm, uid) = self.rng.pick(&vms);
            let ghost = self.process(&vm, uid, "ghost", ReplicaRole::Primary);
            let report = report_of("ghost", 1, 0, vec![replica_report(0, &ghost)]);
            self.reports.insert("ghost".into(), (report, 0));
            self.step = HOST_FORGET_MS / STEP_MS + 1;
        }
        for (vm, uid) in &vms {
            // Stale ownership: an odd generation, owned by a host that may run nothing.
            if self.rng.percent(40) {
                let owner = self.rng.pick(&names);
                let record = OwnershipRecord { generation: 1 + self.rng.below(9), owner, state: VmState::Active };
                let generation = record.generation;
                let _ = self.records.compare_and_swap(
                    &record_id(vm, *uid),
                    None,
                    &OwnershipRecord { generation: 1, ..record.clone() },
                );
                for g in 1..generation {
                    let _ = self.records.compare_and_swap(
                        &record_id(vm, *uid),
                        Some(g),
                        &OwnershipRecord { generation: g + 1, ..record.clone() },
                    );
                }
            }
            // Two replicas claiming primary, one of them maybe holding the record.
            if self.rng.percent(30) {
                let current = self.records.read(&record_id(vm, *uid)).unwrap();
                // At most one process can have won the current generation; the other holds
                // an older one (or none).
                // an older one (or none) and holds its outputs, its backup gone: it is not live.
                let claims =
                    [current.as_ref().map(|r| r.generation), current.and_then(|r| r.generation.checked_sub(1))];
                for (i, generation) in claims.into_iter().enumerate() {
                    let host = self.rng.pick(&names);
                    let mut p = self.process(vm, *uid, &host, ReplicaRole::Primary);
                    p.generation = generation;
                    if i == 1 {
                        p.backup_to = Some("gone:1".into());
                        p.protected = true;
                    }
                    self.spawn(p);
                }
            }
            // Half-finished placement: a backup nobody replicates to, or one still starting.
            if self.rng.percent(40) {
                let host = self.rng.pick(&names);
                let mut p = self.process(vm, *uid, &host, ReplicaRole::Backup);
                if self.rng.percent(50) {
                    p.starting = Some(Intent::Backup);
                    p.role = ReplicaRole::Starting;
                    p.listen = None;
                }
                self.spawn(p);
            }
            // A replica of an earlier declaration of the same name.
            if self.rng.percent(20) {
                let host = self.rng.pick(&names);
                let p = self.process(vm, uid - 5, &host, ReplicaRole::Backup);
                self.spawn(p);
            }
        }
        // Only one replica per VM may be live at the start (else the state is not one the
        // system could be in): any other primary is a holder like the one above.
        let mut seen = std::collections::BTreeSet::new();
        // A live primary owns the record, at its generation: one the system could have reached.
        let live: Vec<u32> = self.processes.iter().filter(|(_, p)| self.is_live(p)).map(|(pid, _)| *pid).collect();
        for pid in live {
            let p = self.processes[&pid].clone();
            let record = self.records.read(&record_id(&p.vm, p.uid)).unwrap();
            let owns = record.is_some_and(|r| r.owner == name(pid, &p) && Some(r.generation) == p.generation);
            let p = self.processes.get_mut(&pid).unwrap();
            if !owns || !seen.insert((p.vm.clone(), p.uid)) {
                p.backup_to = Some("gone:1".into());
                p.protected = true;
            }
        }
        // Orphans: replicas of VMs nobody declared.
        for _ in 0..self.rng.below(3) {
            let host = self.rng.pick(&names);
            let p = self.process("orphan", 1, &host, ReplicaRole::Primary);
            self.spawn(p);
        }
        // A clock far off on one host.
        let skewed = self.rng.pick(&names);
        if let Some(host) = self.hosts.get_mut(&skewed) {
            host.clock_offset_ms = 3_600_000 * 24 * 365;
        }
    }

    fn connected(&self, host: &str) -> bool {
        self.hosts.get(host).is_some_and(|h| h.up && !h.partitioned)
    }

    /// Each agent up and connected writes its report, observes, runs a round and acts.
    fn agents_round(&mut self, crashes: bool) {
        let mut order = self.host_names();
        for i in (1..order.len()).rev() {
            let j = self.rng.below(i as u64 + 1) as usize;
            order.swap(i, j);
        }
        for me in order {
            let host = &self.hosts[&me];
            if !host.agent_up || !self.connected(&me) {
                continue;
            }
            self.write_report(&me);
            let observed = self.observe();
            let actions = round(&me, &self.declared, &observed);
            // An agent crashing in the middle of its actions does only a prefix of them.
            let crash_at = (crashes && self.rng.percent(5)).then(|| self.rng.below(actions.len() as u64 + 1) as usize);
            for (i, action) in actions.into_iter().enumerate() {
                if crash_at == Some(i) {
                    break;
                }
                self.act(&me, action);
            }
            if crash_at.is_some() {
                self.hosts.get_mut(&me).unwrap().agent_up = false;
            }
        }
    }

    fn write_report(&mut self, me: &str) {
        let host = self.hosts.get_mut(me).unwrap();
        host.seq += 1;
        let (seq, offset) = (host.seq, host.clock_offset_ms);
        let mine: Vec<u32> = self.processes.iter().filter(|(_, p)| p.host == me).map(|(pid, _)| *pid).collect();
        let mut replicas = Vec::new();
        for pid in mine {
            // A status read just before the process moved (a takeover, a start settling).
            let lagging = self.rng.percent(STATUS_LAG_PERCENT);
            let p = self.before_moves.get(&pid).filter(|_| lagging).unwrap_or(&self.processes[&pid]);
            replicas.push(replica_report(pid, p));
        }
        let time_ms = (self.step * STEP_MS) as i64 + offset;
        let report = report_of(me, seq, time_ms.max(0) as u64, replicas);
        self.reports.insert(me.to_string(), (report, self.step));
    }

    fn observe(&self) -> Observed {
        let hosts = self
            .reports
            .iter()
            .map(|(name, (report, changed))| {
                (name.clone(), HostView { report: report.clone(), silent_ms: (self.step - changed) * STEP_MS })
            })
            .collect();
        let owners = self
            .declared
            .vms
            .values()
            .map(|d| (d.spec.name.clone(), self.records.clone().read(&record_id(&d.spec.name, d.uid)).unwrap()))
            .collect();
        Observed { hosts, owners, garbage_keys: self.garbage_keys.clone() }
    }

    fn act(&mut self, me: &str, action: Action) {
        match action {
            Action::StartPrimary { vm, uid, claim_from } => {
                let mut p = self.process(&vm, uid, me, ReplicaRole::Starting);
                p.starting = Some(Intent::Primary);
                p.claim_from = claim_from;
                self.spawn(p);
            }
            Action::StartBackup { vm, uid } => {
                let mut p = self.process(&vm, uid, me, ReplicaRole::Starting);
                p.starting = Some(Intent::Backup);
                self.spawn(p);
            }
            Action::Protect { vm, uid, to } => {
                if let Some(p) = self
                    .processes
                    .values_mut()
                    .find(|p| p.host == me && p.vm == vm && p.uid == uid && p.role == ReplicaRole::Primary)
                {
                    p.backup_to = Some(to);
                    p.protected = false;
                }
            }
            Action::Stop { pid, .. } => {
                if let Some(pid) = pid {
                    if self.processes.get(&pid).is_some_and(|p| p.host == me) {
                        self.processes.remove(&pid);
                    }
                }
            }
            Action::ForgetHost { host } => {
                self.reports.remove(&host);
            }
            Action::RemoveKey { key } => {
                self.garbage_keys.retain(|k| *k != key);
                self.declared.replacing.retain(|vm, _| cluster::keys::replace(vm) != key);
            }
        }
    }

    /// Swap `vm`'s record forward to `owner`; whether it won.
    fn swap(&mut self, vm: &str, uid: u64, expected: Option<u64>, owner: &str) -> Option<u64> {
        let new =
            OwnershipRecord { generation: expected.map_or(1, |g| g + 1), owner: owner.into(), state: VmState::Active };
        match self.records.compare_and_swap(&record_id(vm, uid), expected, &new).unwrap() {
            SwapOutcome::Swapped(record) => Some(record.generation),
            SwapOutcome::Conflict(_) => None,
        }
    }

    fn link_up(&self, a: &str, b: &str) -> bool {
        self.connected(a) && self.connected(b)
    }

    /// The replica processes move: starts resolve, protection, takeovers (the runtime's rules).
    fn physics(&mut self) {
        self.before_moves = self.processes.clone();
        let pids: Vec<u32> = self.processes.keys().copied().collect();
        for pid in pids {
            let Some(p) = self.processes.get(&pid).cloned() else { continue };
            if !self.hosts[&p.host].up {
                self.processes.remove(&pid);
                continue;
            }
            let store_reachable = self.connected(&p.host);
            let id = record_id(&p.vm, p.uid);
            match (p.starting, p.role) {
                (Some(Intent::Backup), _) => {
                    let p = self.processes.get_mut(&pid).unwrap();
                    p.starting = None;
                    p.role = ReplicaRole::Backup;
                    p.listen = Some(format!("{}:{pid}", p.host));
                }
                (Some(Intent::Primary), _) if store_reachable => {
                    // claim_for_start: refused when another owner holds an active record, unless
                    // it is exactly the one the round said to take.
                    let current = self.records.read(&id).unwrap();
                    let me = name(pid, &p);
                    let taken = |r: &OwnershipRecord| {
                        p.claim_from.as_ref().is_some_and(|c| c.generation == r.generation && c.owner == r.owner)
                    };
                    let refused =
                        current.as_ref().is_some_and(|r| r.state != VmState::Active || (r.owner != me && !taken(r)));
                    let won = match refused {
                        true => None,
                        false => self.swap(&p.vm, p.uid, current.map(|r| r.generation), &me),
                    };
                    match won {
                        Some(generation) => {
                            let p = self.processes.get_mut(&pid).unwrap();
                            p.starting = None;
                            p.role = ReplicaRole::Primary;
                            p.generation = Some(generation);
                        }
                        None => {
                            self.processes.remove(&pid);
                        }
                    }
                }
                (None, ReplicaRole::Primary) => self.primary_moves(pid, &p, store_reachable),
                (None, ReplicaRole::Backup) => self.backup_moves(pid, &p, store_reachable),
                _ => {}
            }
        }
    }

    fn primary_moves(&mut self, pid: u32, p: &Process, store_reachable: bool) {
        let Some(to) = &p.backup_to else { return };
        let backup = self
            .processes
            .iter()
            .find(|(_, b)| {
                b.listen.as_ref() == Some(to) && b.vm == p.vm && b.uid == p.uid && b.role == ReplicaRole::Backup
            })
            .map(|(bpid, b)| (*bpid, b.host.clone()));
        match backup {
            Some((bpid, bhost)) if self.link_up(&p.host, &bhost) => {
                if !p.protected {
                    // Protect swaps the generation forward before anything unacknowledged leaves.
                    match self.swap(&p.vm, p.uid, p.generation, &name(pid, p)) {
                        Some(generation) => {
                            let me = self.processes.get_mut(&pid).unwrap();
                            me.generation = Some(generation);
                            me.protected = true;
                        }
                        None => {
                            self.processes.remove(&pid);
                            return;
                        }
                    }
                }
                let generation = self.processes[&pid].generation;
                self.processes.get_mut(&bpid).unwrap().generation = generation;
            }
            // The backup is gone: run on alone, swapping forward first (or hold, cut off).
            _ if store_reachable => match self.swap(&p.vm, p.uid, p.generation, &name(pid, p)) {
                Some(generation) => {
                    let me = self.processes.get_mut(&pid).unwrap();
                    me.generation = Some(generation);
                    me.backup_to = None;
                    me.protected = false;
                }
                None => {
                    self.processes.remove(&pid);
                }
            },
            _ => {}
        }
    }

    fn backup_moves(&mut self, pid: u32, b: &Process, store_reachable: bool) {
        let Some(state_generation) = b.generation else { return };
        let primary_heard = self.processes.values().any(|p| {
            p.role == ReplicaRole::Primary && p.protected && p.backup_to == b.listen && self.link_up(&p.host, &b.host)
        });
        if primary_heard || !store_reachable {
            return;
        }
        // Silence: take over by swapping the generation the state belongs to.
        let won = self.swap(&b.vm, b.uid, Some(state_generation), &name(pid, b));
        let me = self.processes.get_mut(&pid).unwrap();
        match won {
            Some(generation) => {
                me.role = ReplicaRole::Primary;
                me.generation = Some(generation);
                me.listen = None;
            }
            // Its state is stale for good: it waits, never live, until stopped.
            None => me.generation = None,
        }
    }

    /// Whether `p` releases outputs: a primary running alone (it swapped the generation forward
    /// when it lost its backup, or never had one), or one whose backup acknowledges it.
    fn is_live(&self, p: &Process) -> bool {
        if p.role != ReplicaRole::Primary || !self.hosts[&p.host].up {
            return false;
        }
        match &p.backup_to {
            None => true,
            Some(to) => {
                p.protected
                    && self.processes.values().any(|b| {
                        b.role == ReplicaRole::Backup && b.listen.as_ref() == Some(to) && self.link_up(&p.host, &b.host)
                    })
            }
        }
    }

    /// Never two live copies of a VM, at any step.
    fn check_safety(&self, seed: u64) {
        for dv in self.declared.vms.values() {
            let live: Vec<&Process> = self
                .processes
                .values()
                .filter(|p| p.vm == dv.spec.name && p.uid == dv.uid && self.is_live(p))
                .collect();
            assert!(live.len() <= 1, "seed {seed} step {}: two live copies of {}: {live:?}", self.step, dv.spec.name);
        }
    }

    /// Whether the processes match the declared state exactly.
    fn converged(&self) -> Result<(), String> {
        for dv in self.declared.vms.values() {
            let name = &dv.spec.name;
            let record =
                self.records.clone().read(&record_id(name, dv.uid)).unwrap().ok_or(format!("{name}: no record"))?;
            let mine: Vec<(&u32, &Process)> =
                self.processes.iter().filter(|(_, p)| &p.vm == name && p.uid == dv.uid).collect();
            let primaries: Vec<&(&u32, &Process)> =
                mine.iter().filter(|(_, p)| p.role == ReplicaRole::Primary).collect();
            let [&(primary_pid, primary)] = primaries[..] else {
                return Err(format!("{name}: primaries {primaries:?}"));
            };
            // The record names the primary; a protected one holds its current generation (checked
            // below).
            if self::name(*primary_pid, primary) != record.owner {
                return Err(format!("{name}: primary {primary:?} does not hold record {record:?}"));
            }
            let backups: Vec<&Process> =
                mine.iter().map(|(_, p)| *p).filter(|p| p.role != ReplicaRole::Primary).collect();
            let wanted = dv.spec.replica_count() as usize - 1;
            if backups.len() != wanted {
                return Err(format!("{name}: {} backups, {wanted} wanted: {backups:?}", backups.len()));
            }
            if let [backup] = backups[..] {
                let ok = backup.role == ReplicaRole::Backup
                    && backup.host != primary.host
                    && primary.protected
                    && primary.backup_to == backup.listen
                    && backup.generation == primary.generation
                    && primary.generation == Some(record.generation);
                if !ok {
                    return Err(format!("{name}: not protected: {primary:?} / {backup:?}"));
                }
            }
        }
        let strays: Vec<&Process> =
            self.processes.values().filter(|p| self.declared.vms.get(&p.vm).is_none_or(|d| d.uid != p.uid)).collect();
        if !strays.is_empty() {
            return Err(format!("stray replicas: {strays:?}"));
        }
        if !self.declared.replacing.is_empty() {
            return Err(format!("replacements left: {:?}", self.declared.replacing));
        }
        if !self.garbage_keys.is_empty() || self.reports.contains_key("ghost") {
            return Err(format!("garbage left: {:?}", self.garbage_keys));
        }
        Ok(())
    }

    fn inject_fault(&mut self) {
        let names = self.host_names();
        let name = self.rng.pick(&names);
        let up_hosts = self.hosts.values().filter(|h| h.up && !h.partitioned).count();
        let host = self.hosts.get_mut(&name).unwrap();
        match self.rng.below(10) {
            // Keep at least two hosts serving, so that checkpoint VMs can be protected.
            0 if up_hosts > 2 => {
                host.up = false;
                host.agent_up = false;
            }
            1 if up_hosts > 2 => host.partitioned = true,
            2 => host.agent_up = false,
            3 => {
                host.up = true;
                host.agent_up = true;
                host.partitioned = false;
            }
            _ => {}
        }
        // A rule asks a VM's backup elsewhere (naming any host: the backup's, or a stale one).
        if self.rng.percent(5) {
            self.ask_backup_elsewhere();
        }
        // Crashed agents come back (their own watchdog re-executes them).
        for host in self.hosts.values_mut() {
            if host.up && !host.agent_up && self.rng.percent(30) {
                host.agent_up = true;
            }
        }
    }

    fn heal(&mut self) {
        for host in self.hosts.values_mut() {
            host.up = true;
            host.agent_up = true;
            host.partitioned = false;
        }
        if self.rng.percent(50) {
            self.ask_backup_elsewhere();
        }
    }

    /// What a `reprotect_elsewhere` rule writes: move a VM's backup off its host (or off a
    /// random host). Converged means the request was carried out and removed (the round removes
    /// it only once the primary is protected by a backup elsewhere).
    fn ask_backup_elsewhere(&mut self) {
        let vms: Vec<(String, u64)> = self.declared.vms.values().map(|d| (d.spec.name.clone(), d.uid)).collect();
        let (vm, uid) = self.rng.pick(&vms);
        let backup_host = self
            .processes
            .values()
            .find(|p| p.vm == vm && p.uid == uid && p.role == ReplicaRole::Backup)
            .map(|p| p.host.clone());
        let host = match backup_host {
            Some(host) => host,
            None => self.rng.pick(&self.host_names()),
        };
        self.declared.replacing.insert(vm, cluster::spec::Replacement { uid, host });
    }

    fn step(&mut self, faults: bool, seed: u64) {
        if faults {
            self.inject_fault();
        }
        self.agents_round(faults);
        self.physics();
        self.step += 1;
        self.check_safety(seed);
    }
}

/// A process's name in ownership records.
fn name(pid: u32, p: &Process) -> String {
    cluster::keys::replica_name(&p.host, &pid.to_string())
}

fn replica_report(pid: u32, p: &Process) -> ReplicaReport {
    ReplicaReport {
        vm: p.vm.clone(),
        uid: p.uid,
        role: p.role,
        pid: Some(pid),
        listen: p.listen.clone(),
        backup_to: p.backup_to.clone(),
        protected: Some(p.protected),
        generation: p.generation,
        epoch: None,
        lag_epochs: None,
        took_over_generation: None,
        disk_bytes: None,
        name: Some(name(pid, p)),
    }
}

fn report_of(name: &str, seq: u64, time_ms: u64, replicas: Vec<ReplicaReport>) -> HostReport {
    HostReport {
        name: name.into(),
        labels: BTreeMap::new(),
        address: name.into(),
        api: String::new(),
        memory_mib_free: 8192,
        seq,
        time_ms,
        replicas,
    }
}

/// One run: arbitrary state, faults, healing; returns the rounds it took to converge.
fn run(seed: u64) -> u64 {
    let mut world = World::new(seed);
    for _ in 0..FAULT_STEPS {
        world.step(true, seed);
    }
    world.heal();
    for rounds in 1..=CONVERGE_ROUNDS {
        world.step(false, seed);
        if world.converged().is_ok() {
            return rounds;
        }
    }
    let records: Vec<_> =
        world.declared.vms.values().map(|d| world.records.read(&record_id(&d.spec.name, d.uid)).unwrap()).collect();
    let observed = world.observe();
    let actions = round("h0", &world.declared, &observed);
    panic!(
        "seed {seed}: not converged after {CONVERGE_ROUNDS} rounds: {}\nprocesses: {:#?}\nrecords: {records:?}\nobserved by h0: {:?}",
        world.converged().unwrap_err(),
        world.processes,
        (actions, observed.hosts.keys().collect::<Vec<_>>()),
    );
}

#[test]
fn the_control_loop_converges_from_arbitrary_states_and_never_runs_two_live_copies() {
    let base = std::env::var("FTVM_SIM_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    let runs = if std::env::var("FTVM_SIM_SEED").is_ok() { 1 } else { 300 };
    println!("FTVM_SIM_SEED={base} ({runs} runs from it)");
    let mut worst = 0;
    for i in 0..runs {
        let seed = base.wrapping_add(i);
        let rounds = std::panic::catch_unwind(|| run(seed)).unwrap_or_else(|_| panic!("failed: FTVM_SIM_SEED={seed}"));
        worst = worst.max(rounds);
    }
    println!("converged within {worst} rounds at worst (bound {CONVERGE_ROUNDS})");
}
