//! Re-protection: how long a replica that took over runs alone before a fresh backup
//! holds its state — from `ftvm ctl protect` to the first epoch the backup acknowledged
//! (status: `replication.acked_epoch`), and to protection (`replication.protected`). The
//! first checkpoint is full and pre-copied while the guest runs (RAM, then the disk), so
//! the figure is mostly the time to scan, send and apply the VM's state.
//!
//! One boot per guest: the pair boots replicated, the primary is killed and the backup
//! takes over; then each round starts a fresh backup in the dead primary's host, protects
//! the live VM, times it, and unprotects it again (the fresh backup stands down).

use super::{first_answer, in_namespace, spawn_in, start_pair, wait_protected, Proc, SpuriousTakeover};
use crate::api::{self, Command, ProtectRequest};
use crate::netns::Topology;
use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vmm::status::Status;

/// A round may take this long (a large disk on a loaded machine).
const ROUND_LIMIT: Duration = Duration::from_secs(300);
const EPOCH_MS: u64 = 25;
/// The fresh backups' detection timeout: not the figure measured here, so long enough that
/// a loaded host does not make one take over from the live primary.
const FRESH_FAILOVER_TIMEOUT_MS: u64 = 500;

/// One re-protection.
#[derive(Debug, Clone, Copy)]
pub(super) struct Round {
    first_ack_ms: f64,
    protected_ms: f64,
    /// Bytes sent on the link up to the first acknowledgement (the full checkpoint, mostly).
    sent_bytes: u64,
    /// The longest checkpoint pause until protected (the pre-copy's final stage, mostly).
    worst_pause_ms: f64,
}

pub(super) fn label(disk_bytes: Option<u64>) -> String {
    match disk_bytes {
        None => "default guest".into(),
        Some(bytes) => format!("with a {} sparse disk", size(bytes)),
    }
}

fn size(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b => format!("{} MiB", b >> 20),
    }
}

/// Boot, fail over, then time `rounds` re-protections of the replica that took over.
pub(super) fn measure(topo: &Topology, dir: &Path, disk_bytes: Option<u64>, rounds: usize) -> Result<Vec<Round>> {
    let disks = match disk_bytes {
        Some(bytes) => Some([sparse(dir, "disk-a.img", bytes)?, sparse(dir, "disk-b.img", bytes)?]),
        None => None,
    };
    let fresh_disk = disk_bytes.map(|bytes| sparse(dir, "disk-fresh.img", bytes)).transpose()?;
    let command = "exec /usr/share/ftvm/counter-httpd";
    let mut pair = start_pair(topo, dir, Some(EPOCH_MS), 0, command, disks.as_ref().map(|[a, b]| (&**a, &**b)))?;
    in_namespace(&topo.client_ns(), || first_answer(Duration::from_secs(300)).map(|_| ()))
        .map_err(|e| pair.explain(e))?;
    wait_protected(&pair.sock, &mut pair.primary, Duration::from_secs(120)).map_err(|e| pair.explain(e))?;
    let _ = pair.primary.child.kill();
    let _ = pair.primary.child.wait();
    let live = pair.backup_sock.clone();
    wait_status(&live, Duration::from_secs(30), "the backup's takeover", |s| s.took_over.is_some())?;
    in_namespace(&topo.client_ns(), || first_answer(Duration::from_secs(60)).map(|_| ()))?;
    (0..rounds).map(|round| one_round(topo, dir, &live, fresh_disk.as_deref(), round)).collect()
}

/// A sparse raw disk image of `bytes`.
fn sparse(dir: &Path, name: &str, bytes: u64) -> Result<PathBuf> {
    let path = dir.join(name);
    let file = std::fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
    file.set_len(bytes).with_context(|| format!("cannot size {}", path.display()))?;
    Ok(path)
}

/// Start a fresh backup, protect the live VM to it, time it, and unprotect.
fn one_round(topo: &Topology, dir: &Path, live: &Path, disk: Option<&Path>, round: usize) -> Result<Round> {
    let sock = dir.join("fresh.sock");
    let listen = format!("{}:7000", Topology::PRIMARY_REPL_ADDR);
    let key = dir.join("key");
    let store = format!("file:{}", dir.join("store").display());
    let mut args: Vec<String> = ["backup", "--listen", &listen, "--key", &key.display().to_string(), "--store", &store]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(
        ["--net", "tap:tap0", "--failover-timeout-ms", &FRESH_FAILOVER_TIMEOUT_MS.to_string()].map(String::from),
    );
    args.extend(["--api".to_string(), sock.display().to_string()]);
    if let Some(disk) = disk {
        args.extend(["--disk".to_string(), disk.display().to_string()]);
    }
    let mut fresh =
        spawn_in(&topo.primary_ns(), &args, &dir.join(format!("fresh-backup-{round}.log")), "fresh backup")?;
    wait_status(&sock, Duration::from_secs(30), "the fresh backup's API", |_| true)?;
    let request = ProtectRequest {
        to: listen,
        key,
        epoch_ms: EPOCH_MS,
        on_backup_loss: replica::BackupLossPolicy::Continue,
        mode: vmm::control::ProtectMode::Checkpoint,
    };
    let started = Instant::now();
    let reply = api::request(live, &Command::Protect(request))?;
    ensure!(reply.status == 200, "protect was refused: {}", reply.body);
    let mut first_ack: Option<(Duration, u64)> = None;
    let mut last_error = None;
    let protected = loop {
        let status = match typed_status(live) {
            Ok(status) => status,
            Err(e) => return Err(spurious_or(e, &sock)),
        };
        let replication = status.replication.as_ref().context("the live VM reports no replication after protect")?;
        if replication.last_error != last_error {
            last_error.clone_from(&replication.last_error);
            let at = started.elapsed().as_millis();
            eprintln!("bench: round {round}: {at} ms after protect the link broke: {}", json_or_none(&last_error));
        }
        if first_ack.is_none() && replication.acked_epoch.is_some() {
            first_ack = Some((started.elapsed(), replication.bytes_sent));
        }
        if replication.protected {
            break status;
        }
        if started.elapsed() > ROUND_LIMIT {
            bail!("not protected within {} s of protect", ROUND_LIMIT.as_secs());
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let protected_ms = started.elapsed().as_secs_f64() * 1e3;
    let (first_ack, sent_bytes) = first_ack.unwrap_or((started.elapsed(), 0));
    let worst_pause_ms = protected.replication.map_or(0.0, |r| r.checkpoints.pause_max_ms);
    let reply = api::request(live, &Command::Unprotect)?;
    ensure!(reply.status == 200, "unprotect was refused: {}", reply.body);
    wait_exit(&mut fresh, Duration::from_secs(10)).context("the fresh backup did not stand down after unprotect")?;
    Ok(Round { first_ack_ms: first_ack.as_secs_f64() * 1e3, protected_ms, sent_bytes, worst_pause_ms })
}

fn json_or_none(text: &Option<String>) -> &str {
    text.as_deref().unwrap_or("(no error)")
}

/// The live VM stopped answering: a spurious takeover if the fresh backup went live.
fn spurious_or(error: anyhow::Error, fresh_sock: &Path) -> anyhow::Error {
    match typed_status(fresh_sock) {
        Ok(status) if status.took_over.is_some() => SpuriousTakeover.into(),
        _ => error,
    }
}

fn typed_status(sock: &Path) -> Result<Status> {
    let reply = api::request(sock, &Command::Status)?;
    serde_json::from_value(reply.body).context("the status does not parse")
}

fn wait_status(sock: &Path, limit: Duration, what: &str, ok: impl Fn(&Status) -> bool) -> Result<Status> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(status) = typed_status(sock) {
            if ok(&status) {
                return Ok(status);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("{what}: not within {} s", limit.as_secs())
}

fn wait_exit(proc: &mut Proc, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if proc.child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("still running after {} s", limit.as_secs())
}

pub(super) fn print(results: &[(Option<u64>, Vec<Round>)]) {
    if results.is_empty() {
        return;
    }
    let spread = |rounds: &[Round], f: &dyn Fn(&Round) -> f64, precision: usize| {
        let mut v: Vec<f64> = rounds.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        let (min, mid, max) = (v[0], v[v.len() / 2], v[v.len() - 1]);
        format!("{mid:.precision$} [{min:.precision$}-{max:.precision$}]")
    };
    println!();
    println!(
        "re-protection after a takeover (ctl protect to a fresh backup -> its first acknowledged epoch, and -> protected; \
         median [min-max] over {} rounds; epoch {EPOCH_MS} ms):",
        results[0].1.len()
    );
    println!(
        "  {:<28} {:>22} {:>22} {:>18} {:>18}",
        "guest", "first ack ms", "protected ms", "sent MB", "worst pause ms"
    );
    for (disk_bytes, rounds) in results {
        println!(
            "  {:<28} {:>22} {:>22} {:>18} {:>18}",
            label(*disk_bytes),
            spread(rounds, &|r| r.first_ack_ms, 0),
            spread(rounds, &|r| r.protected_ms, 0),
            spread(rounds, &|r| r.sent_bytes as f64 / 1e6, 1),
            spread(rounds, &|r| r.worst_pause_ms, 1),
        );
    }
}
