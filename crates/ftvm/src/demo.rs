//! `ftvm demo`: checkpoint replication and failover, live, on one machine.
//!
//! A backup and a primary run in their own network namespaces ("hosts"), joined with
//! a client by a bridge; the guest serves an HTTP counter kept in its memory. The
//! client counts; midway the primary is killed with SIGKILL; the backup takes over
//! from the last checkpoint the primary's outputs depended on, announces the guest's
//! MAC, and the client carries on — the counter never going backwards. Every verdict
//! comes from the client's answers and the replicas' typed status ([`Status`], as
//! `ctl status` prints it), never from log wording.

use crate::netns::Topology;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use vmm::status::{Role, Status, Takeover};

pub(crate) const HTTP_ADDR: &str = "10.0.2.15:80";
const SESSION_ADDR: &str = "10.0.2.15:7001";
const REPLICATION_PORT: u16 = 7000;
/// The backup's detection timeout in a partition: well beyond the primary's 450 ms.
const PARTITION_FAILOVER_TIMEOUT_MS: u64 = 1500;

/// Run the replication demo (needs root: it creates network namespaces).
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Milliseconds of client traffic before the primary is killed (or cut off)
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    pub before_kill_ms: u64,
    /// Seconds of client traffic after the kill
    #[arg(long, value_name = "S", default_value_t = 10)]
    pub after_kill_s: u64,
    /// Checkpoint interval
    #[arg(long, value_name = "MS", default_value_t = 25)]
    pub epoch_ms: u64,
    /// Replicate by checkpoints, or in lockstep (the backup executes behind the primary, only
    /// the inputs crossing the wire)
    #[arg(long, value_enum, default_value = "checkpoint", conflicts_with = "cluster")]
    pub mode: crate::replication_args::ReplicationMode,
    /// Instead of killing the primary, cut the replication link both ways: exactly one
    /// side must stay live (the primary, which swaps the ownership generation forward
    /// before it serves unprotected), and the backup must catch up once the link is back
    #[arg(long)]
    pub partition: bool,
    /// The backup's detection timeout [default: the backup's own; 1500 with --partition,
    /// longer than the primary needs to give up on a lost backup (500 ms of silence plus
    /// 200 ms of grace), so that a partition leaves the primary live and the backup stale]
    #[arg(long, value_name = "MS")]
    pub failover_timeout_ms: Option<u64>,
    /// Keep the logs of both replicas in this directory [default: a temporary one]
    #[arg(long, value_name = "DIR")]
    pub logs: Option<PathBuf>,
    /// Also write the verdict, field by field, as JSON to this file (tests read it)
    #[arg(long, value_name = "FILE")]
    pub summary: Option<PathBuf>,
    /// The many-host story instead: agents sharing a file store (as root: in namespaces, with a
    /// client counting; else on loopback), a protected VM declared through the API, its
    /// primary's host killed twice, the dashboard's address printed first
    #[arg(long, conflicts_with = "partition")]
    pub cluster: bool,
    /// With --cluster: how many host agents (besides the console agent that serves the dashboard)
    #[arg(long, value_name = "N", default_value_t = 3, requires = "cluster")]
    pub hosts: usize,
    /// With --cluster: keep the hosts on loopback, without namespaces or a client, even as root
    #[arg(long, requires = "cluster")]
    pub loopback: bool,
    /// With --cluster: seconds the agents and the dashboard stay up after the story
    #[arg(long, value_name = "S", default_value_t = 30, requires = "cluster")]
    pub linger_s: u64,
}

/// A child process killed on drop.
pub(crate) struct Proc {
    pub(crate) child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn spawn_in(ns: &str, args: &[String], log: &Path, name: &str) -> Result<Proc> {
    let exe = std::env::current_exe().context("cannot find the ftvm binary")?;
    let file = std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let child = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("cannot start the {name}"))?;
    Ok(Proc { child })
}

/// One HTTP request to the guest's counter (a new TCP connection each time).
pub(crate) fn count_once(addr: SocketAddr, timeout: Duration) -> Result<u64> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(b"GET /cgi-bin/count HTTP/1.0\r\nHost: guest\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let body = response.split("\r\n\r\n").nth(1).context("no HTTP body")?;
    body.trim().parse().with_context(|| format!("unexpected answer {body:?}"))
}

/// A long-lived TCP session with the counter: one line out, the next value back.
struct Session {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Session {
    fn open(addr: SocketAddr) -> Result<Session> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        // Long enough for a takeover plus TCP's retransmission backoff.
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Session { reader: BufReader::new(stream.try_clone()?), writer: stream })
    }

    fn count(&mut self) -> Result<u64> {
        self.writer.write_all(b"inc\n")?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("the guest closed the session");
        }
        line.trim().parse().with_context(|| format!("unexpected answer {line:?}"))
    }
}

enum ClientEvent {
    Answer {
        at: Duration,
        /// When the answer came (one read after the fault may have come before it).
        answered: Instant,
        counter: u64,
        latency: Duration,
        session: bool,
    },
    Failure,
    SessionOpened,
    /// The long-lived TCP connection broke: what the demo exists to show cannot happen.
    SessionBroken(String),
}

/// The client: a thread that enters the client namespace and counts, over HTTP and
/// over one long-lived session, until told to stop. It is sequential, so every answer
/// must be larger than the one before.
fn spawn_client(
    ns: &str,
    events: mpsc::Sender<ClientEvent>,
    stop: mpsc::Receiver<()>,
) -> Result<std::thread::JoinHandle<()>> {
    let netns =
        std::fs::File::open(format!("/var/run/netns/{ns}")).with_context(|| format!("cannot open namespace {ns}"))?;
    Ok(std::thread::spawn(move || {
        // setns changes only this thread's namespace.
        if nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).is_err() {
            return;
        }
        let http: SocketAddr = HTTP_ADDR.parse().expect("valid address");
        let session_addr: SocketAddr = SESSION_ADDR.parse().expect("valid address");
        let start = Instant::now();
        let mut session: Option<Session> = None;
        while stop.try_recv().is_err() {
            let asked = Instant::now();
            let event = match count_once(http, Duration::from_secs(5)) {
                Ok(counter) => {
                    let (at, latency) = (start.elapsed(), asked.elapsed());
                    ClientEvent::Answer { at, answered: Instant::now(), counter, latency, session: false }
                }
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(100));
                    ClientEvent::Failure
                }
            };
            let answered = matches!(event, ClientEvent::Answer { .. });
            if events.send(event).is_err() {
                return;
            }
            if session.is_none() && answered {
                if let Ok(s) = Session::open(session_addr) {
                    session = Some(s);
                    let _ = events.send(ClientEvent::SessionOpened);
                }
            }
            if let Some(s) = &mut session {
                let asked = Instant::now();
                let event = match s.count() {
                    Ok(counter) => {
                        let (at, latency) = (start.elapsed(), asked.elapsed());
                        ClientEvent::Answer { at, answered: Instant::now(), counter, latency, session: true }
                    }
                    Err(e) => ClientEvent::SessionBroken(format!("{e:#}")),
                };
                let broken = matches!(event, ClientEvent::SessionBroken(_));
                if events.send(event).is_err() || broken {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }))
}

pub fn run(args: DemoArgs) -> Result<i32> {
    if args.cluster {
        return crate::demo_cluster::run(&args);
    }
    crate::netns::require_root()?;
    crate::guest_image::ensure()?;
    let dir = match &args.logs {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("ftvm-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let key = dir.join("key");
    std::fs::write(&key, vmm::host::entropy(32)?.iter().map(|b| format!("{b:02x}")).collect::<String>())?;
    let store = dir.join("store");
    let _ = std::fs::remove_dir_all(&store);

    println!("ftvm demo: building three hosts (network namespaces) joined by a bridge");
    // Unique per run, so that tests may run while a demo is up.
    let topo = Topology::create(&format!("ftvm-demo-{}", std::process::id()))?;
    let common = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        v.extend(["--net", "tap:tap0", "--key"].map(String::from));
        v.push(key.display().to_string());
        v.push("--store".into());
        v.push(format!("file:{}", store.display()));
        v
    };
    let listen = format!("{}:{REPLICATION_PORT}", Topology::BACKUP_REPL_ADDR);
    let backup_sock = dir.join("backup.sock").display().to_string();
    let mut backup_args = common(&["backup", "--listen", &listen, "--api", &backup_sock]);
    let timeout = args.failover_timeout_ms.or(args.partition.then_some(PARTITION_FAILOVER_TIMEOUT_MS));
    if let Some(ms) = timeout {
        backup_args.extend(["--failover-timeout-ms".into(), ms.to_string()]);
    }
    let backup = spawn_in(&topo.backup_ns(), &backup_args, &dir.join("backup.log"), "backup")?;
    println!("ftvm demo: backup waiting on {listen} (log: {})", dir.join("backup.log").display());
    let mut primary_args = common(&["run", "--replicate-to", &listen, "--epoch-ms"]);
    primary_args.insert(4, args.epoch_ms.to_string());
    // A whole-machine digest check about once a second: a backup that ever diverges
    // says so in its log, and the demo fails.
    match args.mode {
        crate::replication_args::ReplicationMode::Checkpoint => {
            primary_args.extend(["--verify-every".into(), "40".into()])
        }
        crate::replication_args::ReplicationMode::Lockstep => {
            primary_args.extend(["--mode", "lockstep", "--lockstep-digest-ms", "1000"].map(String::from))
        }
    }
    primary_args.extend([
        "--api".into(),
        dir.join("primary.sock").display().to_string(),
        "--".into(),
        "/usr/share/ftvm/counter-httpd".into(),
    ]);
    let mut primary = spawn_in(&topo.primary_ns(), &primary_args, &dir.join("primary.log"), "primary")?;
    println!(
        "ftvm demo: primary booting Debian with counter-httpd, replicating every {} ms (log: {})",
        args.epoch_ms,
        dir.join("primary.log").display()
    );

    let (tx, rx) = mpsc::channel();
    let (stop_tx, stop_rx) = mpsc::channel();
    let client = spawn_client(&topo.client_ns(), tx, stop_rx)?;
    let result = drive(&args, &rx, &mut primary, &topo, &dir);
    let _ = stop_tx.send(());
    let _ = client.join();
    drop(backup);
    drop(primary);
    drop(topo);
    let summary = result.inspect_err(|_| eprintln!("ftvm demo: the replicas' logs are in {}", dir.display()))?;
    println!("{}", summary.report());
    if let Some(path) = &args.summary {
        let json = serde_json::to_string_pretty(&summary.verdicts()).expect("a summary serializes");
        std::fs::write(path, json).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if !summary.passed() {
        println!("ftvm demo: the replicas' logs are in {}", dir.display());
        return Ok(1);
    }
    // A passing run's logs go with it, unless they were asked for.
    if args.logs.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(0)
}

/// What the demo saw.
#[derive(Debug, Default)]
struct Summary {
    partition: bool,
    answers: u64,
    last: u64,
    went_backwards: Option<(u64, u64)>,
    session_opened: bool,
    session_answers_after_fault: u64,
    session_broken: Option<String>,
    answers_after_fault: u64,
    takeover: Option<Duration>,
    /// Kill mode: the takeover as a probe saw it (a new connection every 10 ms, each
    /// abandoned after 50 ms), free of the client's TCP retransmission timers.
    probe: Option<crate::bench_cmd::Takeover>,
    /// Kill mode: how the backup took the VM over (its status says).
    took_over: Option<Takeover>,
    /// Partition mode: the backup took over although the primary was alive.
    backup_went_live: bool,
    /// Partition mode: at the end of the cut the primary said it was unprotected and the
    /// backup that its state was stale (so it could not go live).
    cut_seen: bool,
    /// Partition mode: the backup caught up after the link came back.
    resynchronized: bool,
    /// Checkpoints whose digest check failed on the backup (None: its status did not say).
    diverged: Option<u64>,
}

impl Summary {
    /// The client got `counter` (on the long-lived session when `session`) at `answered`;
    /// `fault`: when the primary was killed or cut off. Only an answer that came after the
    /// fault counts as one after it (the channel may hand over an earlier one late). The
    /// takeover as the client saw it, at the first answer after a kill.
    fn answer(&mut self, counter: u64, session: bool, answered: Instant, fault: Option<Instant>) -> Option<Duration> {
        if counter <= self.last && self.went_backwards.is_none() {
            self.went_backwards = Some((counter, self.last));
        }
        self.last = counter;
        self.answers += 1;
        let fault = fault.filter(|&fault| answered > fault)?;
        self.answers_after_fault += 1;
        self.session_answers_after_fault += session as u64;
        if self.takeover.is_some() || self.partition {
            return None;
        }
        self.takeover = Some(answered - fault);
        self.takeover
    }

    /// After a kill, the run may end once the backup answered on a new connection and on the
    /// session that outlived the primary too: a request in flight at the kill waits for the
    /// client's TCP retransmissions, whose backoff can outlast `--after-kill-s` (a session
    /// that broke ends the run by itself).
    fn settled(&self) -> bool {
        self.partition || (self.takeover.is_some() && self.session_answers_after_fault > 0)
    }

    fn passed(&self) -> bool {
        let common = self.diverged == Some(0)
            && self.went_backwards.is_none()
            && self.session_broken.is_none()
            && self.session_answers_after_fault > 0
            && self.answers_after_fault > 0;
        match self.partition {
            false => common && self.takeover.is_some() && self.took_over.is_some(),
            true => common && !self.backup_went_live && self.cut_seen && self.resynchronized,
        }
    }

    /// What `--summary` writes: every check's own field, for tests to judge.
    fn verdicts(&self) -> serde_json::Value {
        serde_json::json!({
            "passed": self.passed(),
            "partition": self.partition,
            "answers": self.answers,
            "last_counter": self.last,
            "counter_went_backwards": self.went_backwards.is_some(),
            "answers_after_fault": self.answers_after_fault,
            "session_answers_after_fault": self.session_answers_after_fault,
            "session_broken": self.session_broken,
            "diverged_checkpoints": self.diverged,
            "client_takeover_s": self.takeover.map(|t| t.as_secs_f64()),
            "probe": self.probe.map(|p| serde_json::json!({ "accepted_ms": p.accepted_ms, "answered_ms": p.answered_ms })),
            "took_over": self.took_over,
            "backup_went_live": self.backup_went_live,
            "cut_seen": self.cut_seen,
            "resynchronized": self.resynchronized,
        })
    }

    fn report(&self) -> String {
        let mut lines = vec![format!("ftvm demo: {} answers, last counter {}", self.answers, self.last)];
        lines.push(match self.went_backwards {
            None => {
                "  counter never went backwards: every answer the client got is reflected in the guest that carried on"
                    .into()
            }
            Some((after, before)) => format!("  FAILED: the counter went backwards ({after} after {before})"),
        });
        lines.push(match (&self.session_broken, self.session_answers_after_fault) {
            (None, n) if n > 0 => format!("  the client's TCP session survived ({n} answers on it after the fault)"),
            (None, _) => "  FAILED: the TCP session gave no answer after the fault".into(),
            (Some(e), _) => format!("  FAILED: the client's TCP session broke: {e}"),
        });
        lines.push(match self.diverged {
            Some(0) => "  every verified checkpoint matched the primary's digest".into(),
            Some(n) => format!("  FAILED: {n} checkpoints failed their digest check on the backup (see its log)"),
            None => "  FAILED: the backup's status did not say whether its checkpoints matched".into(),
        });
        if self.partition {
            lines.push(if self.backup_went_live {
                "  FAILED: the backup went live while the primary was alive".into()
            } else {
                "  exactly one side stayed live: the primary (it swapped the ownership generation first)".into()
            });
            lines.push(if self.cut_seen {
                "  during the cut the primary ran unprotected and the backup knew its state was stale".into()
            } else {
                "  FAILED: during the cut the primary did not say it was unprotected, or the backup that it was stale"
                    .into()
            });
            lines.push(if self.resynchronized {
                "  the backup caught up once the link was back".into()
            } else {
                "  FAILED: the backup did not catch up after the link came back".into()
            });
        } else {
            lines.push(match self.takeover {
                Some(t) => format!(
                    "  the client's next answer came {:.2} s after SIGKILL (its requests in flight wait for TCP's retransmissions)",
                    t.as_secs_f64()
                ),
                None => "  FAILED: the backup never answered".into(),
            });
            if let Some(p) = &self.probe {
                lines.push(format!(
                    "  takeover: the backup's guest accepted a new connection {:.0} ms after SIGKILL and answered one {:.0} ms after",
                    p.accepted_ms, p.answered_ms
                ));
            }
            lines.push(match &self.took_over {
                Some(t) => format!(
                    "  the backup took the VM over as generation {} from epoch {}, {} ms after the primary's last frame",
                    t.generation, t.epoch, t.last_frame_to_live_ms
                ),
                None => "  FAILED: the backup's status does not say it took the VM over".into(),
            });
        }
        lines.push(format!("ftvm demo: {}", if self.passed() { "PASSED" } else { "FAILED" }));
        lines.join("\n")
    }
}

/// Watch the client; kill (or cut off) the primary midway; report.
fn drive(
    args: &DemoArgs,
    rx: &mpsc::Receiver<ClientEvent>,
    primary: &mut Proc,
    topo: &Topology,
    dir: &Path,
) -> Result<Summary> {
    let mut summary = Summary { partition: args.partition, ..Summary::default() };
    let (primary_api, backup_api) = (dir.join("primary.sock"), dir.join("backup.sock"));
    let boot_deadline = Instant::now() + Duration::from_secs(300);
    let mut first_answer: Option<Instant> = None;
    let mut fault_at: Option<Instant> = None;
    let mut last_print = Instant::now();
    let mut probe = None;
    loop {
        if let Some(status) = primary.child.try_wait().ok().flatten() {
            if fault_at.is_none() || args.partition {
                bail!("the primary exited by itself ({status}); see {}", dir.join("primary.log").display());
            }
        }
        let event = match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(e) => Some(e),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        match event {
            Some(ClientEvent::Answer { at, answered, counter, latency, session }) => {
                if first_answer.is_none() {
                    println!("ftvm demo: the guest answers; counting for {:.1} s", args.before_kill_ms as f64 / 1e3);
                    first_answer = Some(Instant::now());
                }
                let last = summary.last;
                if counter <= last && summary.went_backwards.is_none() {
                    println!("ftvm demo: COUNTER WENT BACKWARDS: {counter} after {last}");
                }
                if let Some(takeover) = summary.answer(counter, session, answered, fault_at) {
                    println!(
                        "ftvm demo: the backup answers: counter {counter} (last before: {last}) — takeover took {:.2} s",
                        takeover.as_secs_f64()
                    );
                }
                if last_print.elapsed() >= Duration::from_secs(1) {
                    last_print = Instant::now();
                    println!(
                        "  t={:5.1}s  counter {counter:5}  ({} ms per request)",
                        at.as_secs_f64(),
                        latency.as_millis()
                    );
                }
            }
            Some(ClientEvent::SessionOpened) => {
                summary.session_opened = true;
                println!("ftvm demo: the client holds a TCP session with the guest (port 7001) and counts on it too");
            }
            Some(ClientEvent::SessionBroken(e)) => {
                summary.session_broken = Some(e);
                break;
            }
            Some(ClientEvent::Failure) | None => {
                if first_answer.is_none() && Instant::now() > boot_deadline {
                    bail!("the guest never answered; see {}", dir.join("primary.log").display());
                }
                if let (Some(fault), None, false) = (fault_at, summary.takeover, args.partition) {
                    if last_print.elapsed() >= Duration::from_secs(1) {
                        last_print = Instant::now();
                        println!(
                            "  ... waiting for the backup ({:.1} s since the kill)",
                            fault.elapsed().as_secs_f64()
                        );
                    }
                }
            }
        }
        if let (Some(first), None) = (first_answer, fault_at) {
            if first.elapsed() >= Duration::from_millis(args.before_kill_ms) && summary.session_opened {
                if args.partition {
                    println!("ftvm demo: cutting the replication link both ways at counter {}", summary.last);
                    topo.set_replication_link(false)?;
                } else {
                    println!(
                        "ftvm demo: killing the primary (SIGKILL, pid {}) at counter {}",
                        primary.child.id(),
                        summary.last
                    );
                    let (killed_tx, killed_rx) = mpsc::channel();
                    probe = Some(crate::bench_cmd::in_namespace_spawn(&topo.client_ns(), move || {
                        let killed: Instant = killed_rx.recv().context("the kill never came")?;
                        crate::bench_cmd::probe(killed, Duration::from_secs(30))
                    })?);
                    let _ = primary.child.kill();
                    let _ = killed_tx.send(Instant::now());
                    let _ = primary.child.wait();
                }
                fault_at = Some(Instant::now());
            }
        }
        if let (Some(_), true) = (fault_at, args.partition) {
            // Exactly one side live: the backup must never serve the VM during the cut.
            summary.backup_went_live |= status(&backup_api).is_some_and(|s| s.role == Role::Primary);
        }
        if let Some(fault) = fault_at {
            let enough = fault.elapsed() >= Duration::from_secs(args.after_kill_s);
            if enough && summary.settled() {
                break;
            }
            if fault.elapsed() >= Duration::from_secs(args.after_kill_s + 30) {
                break;
            }
        }
    }
    // The backup counts failed digest checks, and a backup that took over still says them.
    summary.diverged = status(&backup_api).and_then(|s| s.diverged_checkpoints());
    if args.partition {
        let primary_unprotected = status(&primary_api).is_some_and(|s| s.replication.is_some_and(|r| !r.protected));
        let backup_stale = status(&backup_api).is_some_and(|s| s.backup.is_some_and(|b| b.stale));
        summary.cut_seen = primary_unprotected && backup_stale;
        println!("ftvm demo: restoring the replication link");
        topo.set_replication_link(true)?;
        summary.resynchronized = wait_for_protection(&primary_api, Duration::from_secs(30));
    } else {
        summary.took_over = status(&backup_api).and_then(|s| s.took_over);
        summary.probe = probe.and_then(|p| p.join().ok()).and_then(|r| r.ok());
    }
    Ok(summary)
}

/// A replica's status (`ctl status`), None when it does not answer.
fn status(api: &Path) -> Option<Status> {
    let reply = crate::api::request(api, &crate::api::Command::Status).ok().filter(|r| r.status == 200)?;
    serde_json::from_value(reply.body).ok()
}

/// Wait until the primary reports that its backup holds everything it released again.
fn wait_for_protection(api: &Path, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if status(api).is_some_and(|s| s.replication.is_some_and(|r| r.protected)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kill_run_is_settled_only_once_the_session_answered_after_the_kill() {
        let t0 = Instant::now();
        let fault = t0 + Duration::from_millis(100);
        let mut summary = Summary::default();
        assert_eq!(summary.answer(1, false, t0, None), None);
        // Read after the kill, but it came before: not an answer after the fault.
        assert_eq!(summary.answer(2, true, t0 + Duration::from_millis(50), Some(fault)), None);
        assert_eq!(summary.session_answers_after_fault, 0);
        let takeover = summary.answer(3, false, fault + Duration::from_millis(900), Some(fault));
        assert_eq!(takeover, Some(Duration::from_millis(900)), "the first answer after the kill");
        assert!(!summary.settled(), "the session that outlived the primary has not answered yet");
        assert_eq!(summary.answer(4, true, fault + Duration::from_millis(3100), Some(fault)), None);
        assert!(summary.settled());
        assert_eq!((summary.answers, summary.answers_after_fault, summary.session_answers_after_fault), (4, 2, 1));
        assert!(summary.went_backwards.is_none());
        summary.answer(4, false, fault + Duration::from_secs(4), Some(fault));
        assert_eq!(summary.went_backwards, Some((4, 4)), "an answer not above the last one");
    }
}
