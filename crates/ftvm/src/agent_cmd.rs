//! `ftvm agent`: one per host. Every round it reads its replica processes (their typed
//! status through their API sockets), writes its heartbeat to the store, reads what is
//! declared and what every host reports, runs the pure round of the control loop
//! ([`cluster::round`]) and carries out its own share: starting backups and primaries
//! (`ftvm run` / `ftvm backup` as child processes in its process group), `ctl protect`,
//! stopping replicas, TAP devices on its bridge. It keeps nothing across rounds that it does
//! not read again: a replica is known by its directory under `--work-dir` and a live PID
//! whose command line names that directory, so the agent can re-execute itself at any time
//! (it does every `--reexec-s`, and when its watchdog sees a round stuck) and carry on.
//!
//! The /v1 API and the dashboard are served by [`crate::agent_api`] from the same store.

use anyhow::{bail, Context, Result};
use cluster::keys::{self, Event, EventKind};
use cluster::observed::{HostReport, HostView, Observed, ReplicaReport, ReplicaRole, MAX_REPLICAS_PER_HOST};
use cluster::{Action, Declared, DeclaredVm, HostState};
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use store::{KvStore, OwnershipStore};

#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "Example (three agents on one machine, one file store):\n  \
    echo secret > /tmp/token\n  \
    ftvm agent --store file:/tmp/ftvm-store --host-name h1 --listen 127.0.0.1:7781 --token-file /tmp/token &\n  \
    ftvm vm --api http://127.0.0.1:7781 --token-file /tmp/token create web --protection checkpoint")]
pub struct AgentArgs {
    /// The store every agent shares: file:DIR (one machine) or etcd:http://HOST:PORT[,...]
    #[arg(long, value_name = "STORE")]
    pub store: String,
    /// This host's name in the cluster
    #[arg(long, value_name = "NAME")]
    pub host_name: String,
    /// Labels placement rules match (k=v,k=v)
    #[arg(long, value_name = "K=V,...", default_value = "")]
    pub labels: String,
    /// Where the /v1 API, /metrics and the dashboard listen (port 0: any free port)
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7780")]
    pub listen: String,
    /// The bridge the VMs' TAP devices join (VMs that name a bridge need it; root)
    #[arg(long, value_name = "BR")]
    pub bridge: Option<String>,
    /// The address this host's backups listen on (other hosts' primaries reach it)
    #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
    pub address: String,
    /// Where replicas keep their sockets, logs and pid records (default: a directory per host in /tmp)
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// The API token: the file's first line (else the FTVM_TOKEN environment variable)
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// A rules file (conditions over observed facts → actions); without it the default rules
    #[arg(long, value_name = "FILE")]
    pub rules: Option<PathBuf>,
    /// Memory this host offers to VMs
    #[arg(long, value_name = "MIB", default_value_t = 4096)]
    pub memory_mib: u64,
    /// Milliseconds between rounds of the control loop
    #[arg(long, value_name = "MS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(50..=60_000))]
    pub round_ms: u64,
    /// The agent re-executes its own binary this often (a periodic reset; 0: never)
    #[arg(long, value_name = "S", default_value_t = 600)]
    pub reexec_s: u64,
    /// --failover-timeout-ms of the backups this agent starts
    #[arg(long, value_name = "MS", default_value_t = 500, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub failover_timeout_ms: u64,
    /// Checkpoint epoch of the primaries this agent protects
    #[arg(long, value_name = "MS", default_value_t = 25, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub epoch_ms: u64,
}

/// The longest token accepted.
const MAX_TOKEN_BYTES: usize = 256;
/// A round that has not finished after this long is stuck: the watchdog re-executes the agent.
const WATCHDOG_MS: u64 = 30_000;
/// A protect request is taken as in flight this long (a full checkpoint's pre-copy runs first,
/// seconds on a loaded host; asking again sooner would restart it).
const PROTECT_PENDING_MS: u64 = 30_000;
/// Protect requests being carried out on threads: the periodic re-execution waits for them.
static PROTECTS_IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
/// How long the agent waits for a replica's status.
const STATUS_TIMEOUT: Duration = Duration::from_millis(800);
/// Where the pre-shared replication key of the cluster lives in the store.
const KEY_KEY: &str = "/ftvm/replication-key";
/// Set on re-execution: the address the API was bound to (so that port 0 keeps its port).
const REEXEC_LISTEN_ENV: &str = "FTVM_AGENT_LISTEN";
/// Set on re-execution: the observation of every host's heartbeat (seq, ms silent), so that the
/// new image judges liveness as the old one did (see [`silent_ms`]).
const REEXEC_SEEN_ENV: &str = "FTVM_AGENT_SEEN";
/// The latest observation, kept for a re-execution (from the loop or the watchdog).
static SEEN_FOR_REEXEC: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());
/// The most hosts an inherited observation may name.
const MAX_SEEN_HOSTS: usize = 4096;

pub fn run(args: AgentArgs) -> Result<i32> {
    cluster::spec::check_name(&args.host_name).context("--host-name")?;
    let labels = parse_labels(&args.labels)?;
    let token = load_token(args.token_file.as_deref())?;
    let work_dir =
        args.work_dir.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("ftvm-agent-{}", args.host_name)));
    std::fs::create_dir_all(work_dir.join("replicas"))
        .with_context(|| format!("cannot create {}", work_dir.display()))?;
    let mut kv = store::open_kv(&args.store).with_context(|| format!("--store {}", args.store))?;
    let key_path = work_dir.join("replication.key");
    // The store may be away (an outage, a partition) when the agent starts or re-executes
    // itself: the key kept from an earlier start serves; a first start waits for the store.
    if let Err(error) = ensure_replication_key(&mut kv, &key_path) {
        match key_path.exists() {
            true => eprintln!("ftvm agent: {error:#}; using the replication key kept in {}", key_path.display()),
            false => {
                eprintln!("ftvm agent: {error:#}; waiting for the store");
                while ensure_replication_key(&mut kv, &key_path).is_err() {
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }
    let reexecuted = std::env::var(REEXEC_LISTEN_ENV).is_ok();
    let rules = crate::agent_rules::load(args.rules.as_deref(), &work_dir.join("rules.good"), reexecuted)?;
    let listen = std::env::var(REEXEC_LISTEN_ENV).unwrap_or_else(|_| args.listen.clone());
    let api = crate::agent_api::serve(&listen, &args.store, &args.host_name, token, &work_dir)?;
    eprintln!("ftvm agent: API on http://{}/v1 (host {})", api.addr, args.host_name);
    let progress = Arc::new(AtomicU64::new(now_ms()));
    spawn_watchdog(progress.clone(), api.addr.to_string());
    let mut agent = Agent {
        args: args.clone(),
        labels,
        kv,
        owners: store::open(&args.store)?,
        work_dir,
        key_path,
        api_url: format!("http://{}", api.addr),
        seen: inherited_seen(),
        seq: now_ms(),
        rules,
    };
    let started = Instant::now();
    loop {
        let round_start = Instant::now();
        if let Err(error) = agent.tick() {
            // A store outage: the replicas keep serving; try again next round.
            eprintln!("ftvm agent: round skipped: {error:#}");
        }
        progress.store(now_ms(), Ordering::Release);
        *SEEN_FOR_REEXEC.lock().unwrap_or_else(|p| p.into_inner()) = seen_to_text(&agent.seen);
        let idle = PROTECTS_IN_FLIGHT.load(Ordering::Acquire) == 0;
        if args.reexec_s > 0 && started.elapsed() >= Duration::from_secs(args.reexec_s) && idle {
            reexec(&api.addr.to_string(), "periodic reset");
        }
        let spent = round_start.elapsed();
        std::thread::sleep(Duration::from_millis(args.round_ms).saturating_sub(spent));
    }
}

/// Replaces this process by a fresh copy of its binary, same arguments; its children (the
/// replicas) stay its children, and the new image finds them in the work directory.
fn reexec(listen: &str, why: &str) -> ! {
    use std::os::unix::process::CommandExt;
    eprintln!("ftvm agent: re-executing ({why})");
    let seen = SEEN_FOR_REEXEC.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let error = Command::new("/proc/self/exe")
        .args(std::env::args_os().skip(1))
        .env(REEXEC_LISTEN_ENV, listen)
        .env(REEXEC_SEEN_ENV, seen)
        .exec();
    eprintln!("ftvm agent: cannot re-execute: {error}");
    std::process::exit(crate::EXIT_FTVM_ERROR);
}

fn spawn_watchdog(progress: Arc<AtomicU64>, listen: String) {
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(1));
        if now_ms().saturating_sub(progress.load(Ordering::Acquire)) > WATCHDOG_MS {
            reexec(&listen, "a round was stuck for 30 s");
        }
    });
}

pub fn now_ms() -> u64 {
    vmm::replicate::now_ms()
}

fn parse_labels(text: &str) -> Result<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    for pair in text.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').with_context(|| format!("--labels: {pair:?} is not k=v"))?;
        labels.insert(k.to_string(), v.to_string());
    }
    cluster::spec::check_labels(&labels).context("--labels")?;
    Ok(labels)
}

pub fn load_token(file: Option<&Path>) -> Result<String> {
    let token = match file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --token-file {}", path.display()))?
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string(),
        None => std::env::var("FTVM_TOKEN")
            .map_err(|_| anyhow::anyhow!("no API token: give --token-file FILE or set FTVM_TOKEN"))?
            .trim()
            .to_string(),
    };
    if token.is_empty() || token.len() > MAX_TOKEN_BYTES || !token.bytes().all(|b| b.is_ascii_graphic()) {
        bail!("the API token must be 1 to {MAX_TOKEN_BYTES} printable characters without spaces");
    }
    Ok(token)
}

/// The cluster's replication key: made once by the first agent (compare-and-swap on its
/// absence), copied to a file here for the replicas.
fn ensure_replication_key(kv: &mut Box<dyn KvStore>, path: &Path) -> Result<()> {
    let fresh: String = vmm::host::entropy(32)?.iter().map(|b| format!("{b:02x}")).collect();
    kv.put_if(KEY_KEY, store::Expect::Absent, fresh.as_bytes()).context("cannot store the replication key")?;
    let key = kv.get(KEY_KEY)?.context("the replication key vanished from the store")?;
    std::fs::write(path, &key.value).with_context(|| format!("cannot write {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// An observation as text: `HOST=SEQ:SILENT_MS,...`.
fn seen_to_text(seen: &HashMap<String, (u64, Instant)>) -> String {
    let entries: Vec<String> =
        seen.iter().map(|(host, (seq, at))| format!("{host}={seq}:{}", at.elapsed().as_millis())).collect();
    entries.join(",")
}

/// The observation the previous image of this agent handed over (empty on a first start, or
/// if it does not parse: then every host is judged afresh).
pub fn inherited_seen() -> HashMap<String, (u64, Instant)> {
    let text = std::env::var(REEXEC_SEEN_ENV).unwrap_or_default();
    let now = Instant::now();
    let mut seen = HashMap::new();
    for entry in text.split(',').filter(|e| !e.is_empty()).take(MAX_SEEN_HOSTS) {
        let parsed = entry.split_once('=').and_then(|(host, rest)| {
            let (seq, silent) = rest.split_once(':')?;
            let at = now.checked_sub(Duration::from_millis(silent.parse().ok()?))?;
            Some((host.to_string(), (seq.parse().ok()?, at)))
        });
        match parsed {
            Some((host, observation)) => {
                seen.insert(host, observation);
            }
            None => return HashMap::new(),
        }
    }
    seen
}

/// How long `report` has not changed, by this observer's monotonic clock. A report seen for the
/// first time (by a fresh observer: after a start) counts as silent for the whole timeout, not as
/// just changed: a host that died before the observer started must not look alive to it. A live
/// host's next heartbeat (one round later) shows it alive. A re-execution hands its observation
/// over ([`inherited_seen`]), so that it judges no host afresh.
pub fn silent_ms(seen: &mut HashMap<String, (u64, Instant)>, report: &HostReport) -> u64 {
    let now = Instant::now();
    let unseen = now.checked_sub(Duration::from_millis(cluster::observed::HOST_TIMEOUT_MS)).unwrap_or(now);
    let entry = seen.entry(report.name.clone()).or_insert((report.seq, unseen));
    if entry.0 != report.seq {
        *entry = (report.seq, now);
    }
    entry.1.elapsed().as_millis() as u64
}

/// What the agent writes beside each replica it starts (`replica.json` in its directory).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct ReplicaMeta {
    vm: String,
    uid: u64,
    /// "primary" or "backup": how it was started.
    started_as: String,
    pid: u32,
    listen: Option<String>,
    tap: Option<String>,
    memory_mib: u64,
    /// Where the agent last told it to protect to.
    protect_to: Option<String>,
    /// When the agent sent that (its own clock).
    #[serde(default)]
    protect_sent_ms: Option<u64>,
    /// Its disk: the declared image (a primary placed first), else its own copy in its directory.
    #[serde(default)]
    disk: Option<PathBuf>,
}

/// A replica process of this host, found in the work directory.
struct Local {
    dir: PathBuf,
    meta: ReplicaMeta,
    status: Option<vmm::status::Status>,
}

struct Agent {
    args: AgentArgs,
    labels: BTreeMap<String, String>,
    kv: Box<dyn KvStore>,
    owners: Box<dyn OwnershipStore>,
    work_dir: PathBuf,
    key_path: PathBuf,
    api_url: String,
    /// Per host: the last report seq seen and when it changed, by this agent's monotonic
    /// clock (an observation, rebuilt from nothing after a re-execution).
    seen: HashMap<String, (u64, Instant)>,
    seq: u64,
    rules: cluster::rules::RuleSet,
}

impl Agent {
    fn tick(&mut self) -> Result<()> {
        reap_children();
        let mut locals = self.scan_locals();
        for local in &mut locals {
            local.status = replica_status(&local.dir.join("api.sock"));
        }
        self.report_events(&locals);
        self.write_report(&locals)?;
        let (declared, observed) = self.observe()?;
        self.drop_stale_disks(&declared, &observed);
        let actions = cluster::round(&self.args.host_name, &declared, &observed);
        self.run_rules(&declared, &observed);
        for action in actions {
            if let Err(error) = self.act(&action, &declared, &observed, &locals) {
                eprintln!("ftvm agent: {action:?} failed: {error:#}");
                self.event(&format!("error-{}", now_ms()), EventKind::Error, None, format!("{error:#}"));
            }
        }
        Ok(())
    }

    fn scan_locals(&mut self) -> Vec<Local> {
        let dir = self.work_dir.join("replicas");
        let mut locals = Vec::new();
        let Ok(entries) = std::fs::read_dir(&dir) else { return locals };
        for entry in entries.flatten() {
            let path = entry.path();
            let meta = std::fs::read(path.join("replica.json"))
                .ok()
                .and_then(|bytes| serde_json::from_slice::<ReplicaMeta>(&bytes).ok());
            let alive = meta.as_ref().is_some_and(|m| process_runs_in(m.pid, &path));
            match (meta, alive) {
                (Some(meta), true) => locals.push(Local { dir: path, meta, status: None }),
                (meta, _) => {
                    // Gone (or never fully started): its TAP and directory go with it, unless
                    // it is still being started (no record yet, a fresh directory).
                    let fresh = entry.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok())
                        < Some(Duration::from_secs(5));
                    if meta.is_none() && fresh {
                        continue;
                    }
                    if let Some(tap) = meta.as_ref().and_then(|m| m.tap.as_ref()) {
                        remove_tap(tap);
                    }
                    // The owner's own disk copy is the VM's newest disk: it stays on this host.
                    if let Some(meta) = &meta {
                        if let Err(error) = self.keep_owners_disk(&path, meta) {
                            eprintln!("ftvm agent: keeping {} for now: {error:#}", path.display());
                            continue;
                        }
                    }
                    // Its log goes with its directory: its last lines stay in the agent's.
                    if let Some(meta) = &meta {
                        eprintln!(
                            "ftvm agent: the {} of {} (pid {}) is gone; its log ended with:\n{}",
                            meta.started_as,
                            meta.vm,
                            meta.pid,
                            log_tail(&path.join("log"), GONE_LOG_LINES)
                        );
                    }
                    // (Any other disk copy goes with it; a declared image is never in there.)
                    let _ = std::fs::remove_dir_all(&path);
                }
            }
        }
        locals.truncate(MAX_REPLICAS_PER_HOST);
        locals
    }

    /// Where this host keeps the disk of VM `vm` (declaration `uid`) whose owner's process
    /// ended here: the disk a primary started again here runs on.
    fn kept_disk(&self, vm: &str, uid: u64) -> PathBuf {
        self.work_dir.join("disks").join(format!("{vm}.{uid}.img"))
    }

    /// A replica that is gone and that owned its VM's record, with its own disk copy in its
    /// directory (a backup that took over): that copy holds every write the VM acknowledged, so
    /// it is moved out to [`Self::kept_disk`] before the directory goes. Err: the record could
    /// not be read (the directory stays until it can).
    fn keep_owners_disk(&mut self, dir: &Path, meta: &ReplicaMeta) -> Result<()> {
        let Some(disk) = meta.disk.as_ref().filter(|d| d.starts_with(dir) && d.exists()) else { return Ok(()) };
        let record = self.owners.read(&keys::ownership_id(&meta.vm, meta.uid))?;
        let name = keys::replica_name(&self.args.host_name, &dir.file_name().unwrap_or_default().to_string_lossy());
        if record.is_some_and(|r| r.state == store::VmState::Active && r.owner == name) {
            let kept = self.kept_disk(&meta.vm, meta.uid);
            std::fs::create_dir_all(kept.parent().unwrap_or(&self.work_dir))?;
            std::fs::rename(disk, &kept)
                .with_context(|| format!("cannot keep {} as {}", disk.display(), kept.display()))?;
            eprintln!("ftvm agent: {} owned {}: its disk is kept as {}", name, meta.vm, kept.display());
        }
        Ok(())
    }

    /// Kept disks of VMs no longer declared, ended, or owned by a replica on another host (whose
    /// disk is newer) go.
    fn drop_stale_disks(&self, declared: &Declared, observed: &Observed) {
        let Ok(entries) = std::fs::read_dir(self.work_dir.join("disks")) else { return };
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let parsed = file.strip_suffix(".img").and_then(|stem| stem.rsplit_once('.'));
            let Some((vm, uid)) = parsed else { continue };
            let owned_here = declared.vms.get(vm).filter(|dv| dv.uid.to_string() == uid).is_some_and(|_| {
                let record = observed.owners.get(vm).cloned().flatten();
                record.is_some_and(|r| {
                    r.state == store::VmState::Active && keys::owner_host(&r.owner) == self.args.host_name
                })
            });
            if !owned_here {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    fn replica_report(host_name: &str, local: &Local) -> ReplicaReport {
        use vmm::status::Role;
        let status = local.status.as_ref();
        let role = match status.map(|s| s.role) {
            Some(Role::Primary | Role::Standalone) => ReplicaRole::Primary,
            Some(Role::Backup) => ReplicaRole::Backup,
            None => ReplicaRole::Starting,
        };
        let replication = status.and_then(|s| s.replication.as_ref());
        let backup_side = status.and_then(|s| s.backup.as_ref());
        ReplicaReport {
            vm: local.meta.vm.clone(),
            uid: local.meta.uid,
            role,
            pid: Some(local.meta.pid),
            listen: (role == ReplicaRole::Backup).then(|| local.meta.listen.clone()).flatten(),
            // Where the agent told it to protect to, while that protects it or the request is in
            // flight; a primary unprotected long after (its backup gone, or the request lost
            // with a crashed agent) protects to nothing, and the round asks again.
            backup_to: match (role, replication) {
                (ReplicaRole::Primary, Some(r)) if r.protected => local.meta.protect_to.clone(),
                (ReplicaRole::Primary, _)
                    if local.meta.protect_sent_ms.is_some_and(|t| now_ms() < t + PROTECT_PENDING_MS) =>
                {
                    local.meta.protect_to.clone()
                }
                _ => None,
            },
            protected: replication.map(|r| r.protected),
            generation: replication.map(|r| r.generation).or_else(|| backup_side.and_then(|b| b.state_generation)),
            epoch: status.map(|s| s.epoch),
            lag_epochs: replication.and_then(|r| r.lag_epochs),
            took_over_generation: status.and_then(|s| s.took_over.as_ref()).map(|t| t.generation),
            disk_bytes: local.meta.disk.as_ref().and_then(|d| std::fs::metadata(d).ok()).map(|m| m.len()),
            name: Some(keys::replica_name(host_name, &local.dir.file_name().unwrap_or_default().to_string_lossy())),
        }
    }

    fn write_report(&mut self, locals: &[Local]) -> Result<()> {
        self.seq += 1;
        let used: u64 = locals.iter().map(|l| l.meta.memory_mib).sum();
        let report = HostReport {
            name: self.args.host_name.clone(),
            labels: self.labels.clone(),
            address: self.args.address.clone(),
            api: self.api_url.clone(),
            memory_mib_free: self.args.memory_mib.saturating_sub(used),
            seq: self.seq,
            time_ms: now_ms(),
            replicas: locals.iter().map(|local| Self::replica_report(&self.args.host_name, local)).collect(),
        };
        let bytes = serde_json::to_vec(&report)?;
        self.kv.put(&keys::host(&self.args.host_name), &bytes).context("cannot write this host's heartbeat")?;
        Ok(())
    }

    fn observe(&mut self) -> Result<(Declared, Observed)> {
        let (declared, mut garbage_keys) = read_declared(&mut self.kv)?;
        let mut observed = Observed::default();
        for (key, entry) in self.kv.list(keys::HOSTS)? {
            let Ok(report) = serde_json::from_slice::<HostReport>(&entry.value) else {
                garbage_keys.push(key);
                continue;
            };
            if keys::host(&report.name) != key {
                garbage_keys.push(key);
                continue;
            }
            let silent_ms = silent_ms(&mut self.seen, &report);
            observed.hosts.insert(report.name.clone(), HostView { report, silent_ms });
        }
        for (name, dv) in &declared.vms {
            let record = self.owners.read(&keys::ownership_id(name, dv.uid))?;
            observed.owners.insert(name.clone(), record);
        }
        observed.garbage_keys = garbage_keys;
        Ok((declared, observed))
    }

    fn run_rules(&mut self, declared: &Declared, observed: &Observed) {
        for decision in self.rules.evaluate(&self.args.host_name, declared, observed) {
            let identity = format!("rule-{}-{}", decision.rule, decision.identity);
            let fresh = self.event(&identity, EventKind::Rule, decision.vm.clone(), decision.message.clone());
            if fresh {
                if let Err(error) = crate::agent_rules::carry_out(&mut self.kv, &decision, observed) {
                    eprintln!("ftvm agent: rule {}: {error:#}", decision.rule);
                }
            }
        }
    }

    /// Writes an event once per identity; whether it was new.
    fn event(&mut self, identity: &str, kind: EventKind, vm: Option<String>, message: String) -> bool {
        write_event(&mut self.kv, identity, kind, vm, Some(self.args.host_name.clone()), message)
    }

    /// Failovers and re-protections this host's replicas show.
    fn report_events(&mut self, locals: &[Local]) {
        for local in locals {
            let Some(status) = &local.status else { continue };
            let (vm, uid) = (&local.meta.vm, local.meta.uid);
            if let Some(took_over) = &status.took_over {
                let message = format!(
                    "{} took over {vm} at generation {} ({} ms from its primary's last frame)",
                    self.args.host_name, took_over.generation, took_over.last_frame_to_live_ms
                );
                self.event(
                    &keys::failover_event(vm, uid, took_over.generation),
                    EventKind::Failover,
                    Some(vm.clone()),
                    message,
                );
                if status.replication.as_ref().is_some_and(|r| r.protected) {
                    let to = local.meta.protect_to.clone().unwrap_or_default();
                    let message = format!("{vm} protected again after its failover: backup at {to}");
                    self.event(
                        &format!("reprotect-{vm}-{uid}-{}", took_over.generation),
                        EventKind::Reprotect,
                        Some(vm.clone()),
                        message,
                    );
                }
            } else if status.replication.as_ref().is_some_and(|r| r.protected) {
                let to = local.meta.protect_to.clone().unwrap_or_default();
                let identity = format!("protected-{vm}-{uid}-{}", to.replace([':', '.'], "_"));
                self.event(
                    &identity,
                    EventKind::Protected,
                    Some(vm.clone()),
                    format!("{vm} protected: backup at {to}"),
                );
            }
        }
    }

    fn act(&mut self, action: &Action, declared: &Declared, observed: &Observed, locals: &[Local]) -> Result<()> {
        match action {
            Action::StartPrimary { vm, uid, .. } | Action::StartBackup { vm, uid } => {
                let dv = declared.vms.get(vm).context("the VM is no longer declared")?;
                anyhow::ensure!(dv.uid == *uid, "the VM was declared again");
                let (disk, claim_from) = match action {
                    Action::StartPrimary { claim_from, .. } => {
                        match primary_disk(dv, claim_from.as_ref(), self.kept_disk(&dv.spec.name, dv.uid)) {
                            Ok(disk) => (disk, Some(claim_from.clone())),
                            Err(refusal) => {
                                let generation = claim_from.as_ref().map_or(0, |c| c.generation);
                                let identity = format!("disk-lost-{vm}-{uid}-{generation}");
                                if self.event(&identity, EventKind::Error, Some(vm.clone()), refusal.clone()) {
                                    eprintln!("ftvm agent: {refusal}");
                                }
                                return Ok(());
                            }
                        }
                    }
                    _ => (backup_disk(dv, observed)?.map(Disk::Empty), None),
                };
                self.start(dv, claim_from, disk)
            }
            Action::Protect { vm, uid, to } => {
                let local = find_local(locals, vm, *uid, |l| l.status.is_some()).context("no such primary here")?;
                self.protect(local, to)
            }
            Action::Stop { vm, uid, pid, reason } => {
                let Some(local) = find_local(locals, vm, *uid, |l| Some(l.meta.pid) == *pid) else { return Ok(()) };
                stop_replica(local, *reason);
                let message =
                    format!("stopped the {} of {vm} on {} ({reason:?})", local.meta.started_as, self.args.host_name);
                eprintln!("ftvm agent: {message}, pid {}", local.meta.pid);
                self.event(
                    &format!("stopped-{vm}-{uid}-{}", local.meta.pid),
                    EventKind::ReplicaStopped,
                    Some(vm.clone()),
                    message,
                );
                Ok(())
            }
            Action::ForgetHost { host } => {
                self.kv.delete(&keys::host(host))?;
                self.event(
                    &format!("forgot-{host}-{}", now_ms()),
                    EventKind::HostDown,
                    None,
                    format!("forgot host {host}"),
                );
                Ok(())
            }
            Action::RemoveKey { key } => Ok(self.kv.delete(key)?),
        }
    }

    /// Starts a replica: a primary (`primary`: the record it may take from a gone owner, if
    /// any) or a backup.
    fn start(
        &mut self,
        dv: &DeclaredVm,
        primary: Option<Option<cluster::ClaimFrom>>,
        disk: Option<Disk>,
    ) -> Result<()> {
        let spec = &dv.spec;
        let role = if primary.is_some() { "primary" } else { "backup" };
        let id = format!("{}.{}.{role}.{}", spec.name, dv.uid, now_ms());
        let dir = self.work_dir.join("replicas").join(&id);
        std::fs::create_dir_all(&dir)?;
        let tap = match &spec.bridge {
            Some(bridge) => {
                let wanted = self.args.bridge.as_deref().unwrap_or(bridge.as_str());
                Some(create_tap(&dir, wanted)?)
            }
            None => None,
        };
        let listen = match primary {
            Some(_) => None,
            None => Some(format!("{}:{}", self.args.address, free_port(&self.args.address)?)),
        };
        let mut command = Command::new("/proc/self/exe");
        command.arg(if primary.is_some() { "run" } else { "backup" });
        command.arg("--mem").arg(format!("{}M", spec.memory_mib));
        for (flag, value) in [("--kernel", &spec.kernel), ("--initrd", &spec.initrd), ("--append", &spec.append)] {
            if let Some(value) = value {
                command.arg(flag).arg(value);
            }
        }
        let disk = match disk {
            Some(Disk::Declared(path)) => Some(PathBuf::from(path)),
            Some(Disk::Kept(path)) => Some(path),
            Some(Disk::Empty(size_bytes)) => {
                let path = dir.join("disk.img");
                let file = std::fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
                file.set_len(size_bytes).with_context(|| format!("cannot size {}", path.display()))?;
                Some(path)
            }
            None => None,
        };
        if let Some(disk) = &disk {
            command.arg("--disk").arg(disk);
        }
        if let Some(mac) = &spec.mac {
            command.arg("--mac").arg(mac);
        }
        if let Some(tap) = &tap {
            command.arg("--net").arg(format!("tap:{tap}"));
        }
        command.arg("--api").arg(dir.join("api.sock"));
        // `ftvm vm console` attaches here (a backup binds it when it takes over).
        command.arg("--console-socket").arg(dir.join("console.sock"));
        command.arg("--store").arg(&self.args.store);
        command.arg("--vm-id").arg(keys::ownership_id(&spec.name, dv.uid));
        // The record names this very process (see keys::replica_name).
        command.arg("--replica-name").arg(keys::replica_name(&self.args.host_name, &id));
        if let Some(Some(from)) = &primary {
            command.arg("--claim-from").arg(format!("{}:{}", from.generation, from.owner));
        }
        if let Some(listen) = &listen {
            command.arg("--listen").arg(listen).arg("--key").arg(&self.key_path);
            command.arg("--failover-timeout-ms").arg(self.args.failover_timeout_ms.to_string());
        }
        if primary.is_some() && !spec.command.is_empty() {
            command.arg("--").args(&spec.command);
        }
        let log = std::fs::File::create(dir.join("log"))?;
        command.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        let child = command.spawn().context("cannot start a replica")?;
        let meta = ReplicaMeta {
            vm: spec.name.clone(),
            uid: dv.uid,
            started_as: role.to_string(),
            pid: child.id(),
            listen: listen.clone(),
            tap,
            memory_mib: spec.memory_mib,
            protect_to: None,
            protect_sent_ms: None,
            disk,
        };
        write_meta(&dir, &meta)?;
        let where_ = listen.map(|l| format!(", listening on {l}")).unwrap_or_default();
        let message = format!("{} of {} started on {}{where_}", role, spec.name, self.args.host_name);
        self.event(
            &format!("placed-{}-{}-{role}-{}", spec.name, dv.uid, child.id()),
            EventKind::Placed,
            Some(spec.name.clone()),
            message,
        );
        // The child is reaped by reap_children (in this image or the next).
        std::mem::forget(child);
        Ok(())
    }

    fn protect(&mut self, local: &Local, to: &str) -> Result<()> {
        let mut meta = local.meta.clone();
        meta.protect_to = Some(to.to_string());
        meta.protect_sent_ms = Some(now_ms());
        write_meta(&local.dir, &meta)?;
        let request = crate::api::ProtectRequest {
            to: to.to_string(),
            key: self.key_path.clone(),
            epoch_ms: self.args.epoch_ms,
            on_backup_loss: replica::BackupLossPolicy::Continue,
            mode: crate::api::ProtectMode::Checkpoint,
        };
        let socket = local.dir.join("api.sock");
        // Still replicating towards a backup that is gone (its host died: the primary runs on
        // unprotected, trying to reach it again): it stops that first (unprotect swaps the
        // generation forward, so the lost backup can never take over), then protects anew. A
        // primary its backup protects keeps it (the protect is refused), whatever a round saw.
        let lost_backup = local
            .status
            .as_ref()
            .is_some_and(|s| s.mode != vmm::status::Mode::None && s.replication.as_ref().is_some_and(|r| !r.protected));
        // Answered between two slices; a slow answer must not stall the round.
        let dir = local.dir.clone();
        PROTECTS_IN_FLIGHT.fetch_add(1, Ordering::AcqRel);
        std::thread::spawn(move || {
            if lost_backup {
                match crate::api::request(&socket, &crate::api::Command::Unprotect) {
                    Ok(reply) if reply.status == 200 || reply.status == 409 => {}
                    outcome => eprintln!("ftvm agent: unprotect {}: {outcome:?}", dir.display()),
                }
            }
            protect_now(&socket, &dir, &request);
            PROTECTS_IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
        });
        Ok(())
    }
}

/// `ctl protect`; on failure the agent forgets the target, to try again next round.
fn protect_now(socket: &Path, dir: &Path, request: &crate::api::ProtectRequest) {
    match crate::api::request(socket, &crate::api::Command::Protect(request.clone())) {
        Ok(reply) if reply.status == 200 => {}
        outcome => {
            eprintln!("ftvm agent: protect {}: {outcome:?}", dir.display());
            // Try again next round.
            if let Some(mut meta) = read_meta(dir) {
                meta.protect_to = None;
                let _ = write_meta(dir, &meta);
            }
        }
    }
}

/// Where a new replica's disk comes from.
enum Disk {
    /// The declared image, used in place (the VM's first primary, or one started again after a
    /// primary that ran on it).
    Declared(String),
    /// The disk kept from the gone owner's own copy ([`Agent::kept_disk`]), used in place.
    Kept(PathBuf),
    /// A fresh empty disk of this size, filled by the primary's first full checkpoint.
    Empty(u64),
}

/// The size of the disk a new backup of `dv` needs: its primary's, as its host reports it.
fn backup_disk(dv: &DeclaredVm, observed: &Observed) -> Result<Option<u64>> {
    if dv.spec.disk.is_none() {
        return Ok(None);
    }
    let primary = observed.live_replicas().find(|(_, r)| {
        r.vm == dv.spec.name && r.uid == dv.uid && r.role == ReplicaRole::Primary && r.disk_bytes.is_some()
    });
    let (_, primary) = primary.context("its primary's disk size is not reported yet (next round)")?;
    Ok(primary.disk_bytes)
}

/// The disk a primary of `dv` starting on a host runs on: the disk `kept` there from its gone
/// owner's own copy, else the declared image. Err when the owner was a former backup (its disk
/// its own copy) and that copy is not kept: starting from the declared image would lose the
/// writes the VM acknowledged, so the VM waits instead (README: "Both replicas lost at once").
fn primary_disk(
    dv: &DeclaredVm,
    claim_from: Option<&cluster::ClaimFrom>,
    kept: PathBuf,
) -> Result<Option<Disk>, String> {
    let Some(declared) = &dv.spec.disk else { return Ok(None) };
    match claim_from {
        Some(_) if kept.exists() => Ok(Some(Disk::Kept(kept))),
        Some(from) if started_as(&from.owner) == Some("backup") => Err(format!(
            "{}'s newest disk was the own copy of {}, which is gone: not starting it from its declared image \
             {declared} (that would lose the writes it acknowledged); delete it and declare it again to start afresh",
            dv.spec.name, from.owner
        )),
        _ => Ok(Some(Disk::Declared(declared.clone()))),
    }
}

/// How a replica named `owner` ([`keys::replica_name`]: HOST/VM.UID.ROLE.MS) was started:
/// "primary" or "backup" (None: not a name this agent gives).
fn started_as(owner: &str) -> Option<&str> {
    let (_, id) = owner.split_once('/')?;
    let mut parts = id.rsplitn(3, '.');
    let (_ms, role) = (parts.next()?, parts.next()?);
    matches!(role, "primary" | "backup").then_some(role)
}

fn find_local<'a>(locals: &'a [Local], vm: &str, uid: u64, pick: impl Fn(&Local) -> bool) -> Option<&'a Local> {
    locals.iter().find(|l| l.meta.vm == vm && l.meta.uid == uid && pick(l))
}

pub fn write_event(
    kv: &mut Box<dyn KvStore>,
    identity: &str,
    kind: EventKind,
    vm: Option<String>,
    host: Option<String>,
    message: String,
) -> bool {
    let event = Event { kind, vm, host, message, time_ms: now_ms() };
    let Ok(bytes) = serde_json::to_vec(&event) else { return false };
    kv.put_if(&keys::event(identity), store::Expect::Absent, &bytes).unwrap_or(false)
}

/// Everything declared, and the keys under the declared prefixes that do not parse.
pub fn read_declared(kv: &mut Box<dyn KvStore>) -> Result<(Declared, Vec<String>)> {
    let mut declared = Declared::default();
    let mut garbage = Vec::new();
    for (key, entry) in kv.list(keys::VMS)? {
        let parsed = serde_json::from_slice::<DeclaredVm>(&entry.value)
            .ok()
            .and_then(|dv| Some(DeclaredVm { spec: dv.spec.checked().ok()?, ..dv }))
            .filter(|dv| keys::vm(&dv.spec.name) == key);
        match parsed {
            Some(dv) => {
                declared.vms.insert(dv.spec.name.clone(), dv);
            }
            None => garbage.push(key),
        }
    }
    for (key, entry) in kv.list(keys::HOSTCTL)? {
        match serde_json::from_slice::<HostState>(&entry.value) {
            Ok(state) => {
                declared.host_states.insert(key[keys::HOSTCTL.len()..].to_string(), state);
            }
            Err(_) => garbage.push(key),
        }
    }
    for (key, entry) in kv.list(keys::REPLACE)? {
        let vm = &key[keys::REPLACE.len()..];
        match serde_json::from_slice::<cluster::spec::Replacement>(&entry.value) {
            Ok(replacement) if cluster::spec::check_name(vm).is_ok() => {
                declared.replacing.insert(vm.to_string(), replacement);
            }
            _ => garbage.push(key),
        }
    }
    Ok((declared, garbage))
}

fn write_meta(dir: &Path, meta: &ReplicaMeta) -> Result<()> {
    let temp = dir.join("replica.json.tmp");
    std::fs::write(&temp, serde_json::to_vec(meta)?)?;
    std::fs::rename(&temp, dir.join("replica.json"))?;
    Ok(())
}

fn read_meta(dir: &Path) -> Option<ReplicaMeta> {
    serde_json::from_slice(&std::fs::read(dir.join("replica.json")).ok()?).ok()
}

/// Whether `pid` runs (not a zombie) with `dir` in its command line: a PID reused by another
/// process is not taken for the replica.
fn process_runs_in(pid: u32, dir: &Path) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z'));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let needle = dir.as_os_str().as_encoded_bytes();
    !zombie && cmdline.windows(needle.len().max(1)).any(|w| w == needle)
}

fn reap_children() {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    while let Ok(status) = waitpid(nix::unistd::Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
        if status == WaitStatus::StillAlive {
            break;
        }
    }
}

/// Stops a replica. A primary whose VM the stop ends (`reason`: the user deleted or declared
/// it anew, or it ended) is stopped through its API first, so that the VM ends on both sides
/// and its record says ended. Any other replica is killed: its record stays as it is, so that
/// a judgement made on a stale observation can cost a replica, never the VM.
fn stop_replica(local: &Local, reason: cluster::StopReason) {
    let pid = nix::unistd::Pid::from_raw(local.meta.pid as i32);
    let socket = local.dir.join("api.sock");
    let is_primary = local.status.as_ref().is_some_and(|s| s.role != vmm::status::Role::Backup);
    std::thread::spawn(move || {
        if is_primary && reason.ends_the_vm() {
            let _ = crate::api::request(&socket, &crate::api::Command::Stop);
            std::thread::sleep(Duration::from_secs(2));
        }
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    });
}

/// How many of a gone replica's last log lines the agent keeps in its own log.
const GONE_LOG_LINES: usize = 12;

/// The last `lines` lines of a log file (at most 64 KiB of its end are read), indented.
fn log_tail(path: &Path, lines: usize) -> String {
    use std::io::{Seek, SeekFrom};
    const MAX_TAIL_BYTES: u64 = 64 << 10;
    let mut text = Vec::new();
    if let Ok(mut file) = std::fs::File::open(path) {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(MAX_TAIL_BYTES)));
        let _ = file.take(MAX_TAIL_BYTES).read_to_end(&mut text);
    }
    let text = String::from_utf8_lossy(&text);
    let tail: Vec<&str> = text.lines().rev().take(lines).collect();
    tail.iter().rev().map(|l| format!("  | {l}")).collect::<Vec<_>>().join("\n")
}

/// A replica's status through its API socket, within [`STATUS_TIMEOUT`] (None: no answer).
fn replica_status(socket: &Path) -> Option<vmm::status::Status> {
    let mut stream = UnixStream::connect(socket).ok()?;
    stream.set_read_timeout(Some(STATUS_TIMEOUT)).ok()?;
    stream.set_write_timeout(Some(STATUS_TIMEOUT)).ok()?;
    stream.write_all(b"GET /status HTTP/1.1\r\nHost: localhost\r\n\r\n").ok()?;
    let mut answer = Vec::new();
    stream.take(1 << 20).read_to_end(&mut answer).ok()?;
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n")?;
    if !answer.starts_with(b"HTTP/1.1 200") {
        return None;
    }
    serde_json::from_slice(&answer[split + 4..]).ok()
}

fn free_port(address: &str) -> Result<u16> {
    let listener = std::net::TcpListener::bind((address, 0)).with_context(|| format!("no free port on {address}"))?;
    Ok(listener.local_addr()?.port())
}

/// A TAP device for a replica, joined to `bridge`: `ft` and 8 hex digits of its directory.
fn create_tap(dir: &Path, bridge: &str) -> Result<String> {
    let hash = dir
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193));
    let name = format!("ft{hash:08x}");
    crate::netns::ip(&["tuntap", "add", "dev", &name, "mode", "tap"]).context("cannot create a TAP device (root?)")?;
    if let Err(error) = crate::netns::ip(&["link", "set", &name, "master", bridge, "up"]) {
        remove_tap(&name);
        return Err(error.context(format!("cannot join TAP {name} to bridge {bridge}")));
    }
    Ok(name)
}

fn remove_tap(name: &str) {
    let _ = crate::netns::ip(&["link", "del", name]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn declared_with_disk(disk: Option<&str>) -> DeclaredVm {
        let spec: cluster::VmSpec =
            serde_json::from_value(serde_json::json!({"name": "web", "protection": "checkpoint", "disk": disk}))
                .unwrap();
        DeclaredVm { spec: spec.checked().unwrap(), uid: 7, created_ms: 0 }
    }

    #[test]
    fn a_replica_name_says_how_it_was_started() {
        assert_eq!(started_as("h2/web.7.backup.1796"), Some("backup"));
        assert_eq!(started_as("h2/my.vm.7.primary.1796"), Some("primary"));
        assert_eq!(started_as("h2"), None);
        assert_eq!(started_as("h2/web"), None);
    }

    #[test]
    fn a_primary_started_again_runs_on_the_kept_disk_else_the_declared_image_unless_that_loses_writes() {
        let dir = std::env::temp_dir().join(format!("ftvm-agent-disk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kept = dir.join("web.7.img");
        let dv = declared_with_disk(Some("/images/web.img"));
        let from = |owner: &str| cluster::ClaimFrom { generation: 3, owner: owner.into() };
        let disk = |claim: Option<&cluster::ClaimFrom>| match primary_disk(&dv, claim, kept.clone()) {
            Ok(Some(Disk::Declared(path))) => Ok(format!("declared {path}")),
            Ok(Some(Disk::Kept(path))) => Ok(format!("kept {}", path.display())),
            Ok(Some(Disk::Empty(_)) | None) => Ok("other".to_string()),
            Err(refusal) => Err(refusal),
        };
        // A first start, and a primary that ran on the declared image: the declared image.
        assert_eq!(disk(None), Ok("declared /images/web.img".into()));
        assert_eq!(disk(Some(&from("h1/web.7.primary.1"))), Ok("declared /images/web.img".into()));
        // A former backup's own copy is gone: refused, saying why.
        assert_eq!(
            disk(Some(&from("h2/web.7.backup.1"))),
            Err("web's newest disk was the own copy of h2/web.7.backup.1, which is gone: not starting it from its \
                 declared image /images/web.img (that would lose the writes it acknowledged); delete it and declare \
                 it again to start afresh"
                .into())
        );
        // Kept here: that disk, whoever owned it.
        std::fs::write(&kept, b"disk").unwrap();
        assert_eq!(disk(Some(&from("h2/web.7.backup.1"))), Ok(format!("kept {}", kept.display())));
        assert_eq!(disk(Some(&from("h2/web.7.primary.2"))), Ok(format!("kept {}", kept.display())));
        // A VM without a disk has none to choose.
        assert!(matches!(primary_disk(&declared_with_disk(None), Some(&from("h2/web.7.backup.1")), kept), Ok(None)));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
