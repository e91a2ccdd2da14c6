//! `ftvm demo`: checkpoint replication and failover, live, on one machine.
//!
//! A backup and a primary run in their own network namespaces ("hosts"), joined with
//! a client by a bridge; the guest serves an HTTP counter kept in its memory. The
//! client counts; midway the primary is killed with SIGKILL; the backup takes over
//! from the last checkpoint the primary's outputs depended on, announces the guest's
//! MAC, and the client carries on — the counter never going backwards.

use crate::netns::Topology;
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const GUEST_ADDR: &str = "10.0.2.15:80";
const REPLICATION_PORT: u16 = 7000;

/// Run the replication demo (needs root: it creates network namespaces).
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Seconds of client traffic before the primary is killed
    #[arg(long, default_value_t = 10)]
    pub before_kill_s: u64,
    /// Seconds of client traffic after the kill
    #[arg(long, default_value_t = 10)]
    pub after_kill_s: u64,
    /// Checkpoint interval
    #[arg(long, default_value_t = 25)]
    pub epoch_ms: u64,
    /// Keep the logs of both replicas in this directory [default: a temporary one]
    #[arg(long, value_name = "DIR")]
    pub logs: Option<PathBuf>,
}

/// A child process killed on drop.
struct Proc {
    child: Child,
    name: &'static str,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_in(ns: &str, args: &[String], log: &Path, name: &'static str) -> Result<Proc> {
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
    Ok(Proc { child, name })
}

/// One HTTP request to the guest's counter, from inside the client's namespace.
fn count_once(addr: SocketAddr, timeout: Duration) -> Result<u64> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(b"GET /cgi-bin/count HTTP/1.0\r\nHost: guest\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let body = response.split("\r\n\r\n").nth(1).context("no HTTP body")?;
    body.trim().parse().with_context(|| format!("unexpected answer {body:?}"))
}

/// Results of the client's requests: (time since start, counter or error).
enum ClientEvent {
    Answer { at: Duration, counter: u64, latency: Duration },
    Failure,
}

/// The client: a thread that enters the client namespace and counts until told to stop.
fn spawn_client(ns: &str, events: mpsc::Sender<ClientEvent>, stop: mpsc::Receiver<()>) -> Result<std::thread::JoinHandle<()>> {
    let netns = std::fs::File::open(format!("/var/run/netns/{ns}")).with_context(|| format!("cannot open namespace {ns}"))?;
    let addr: SocketAddr = GUEST_ADDR.parse().expect("valid address");
    Ok(std::thread::spawn(move || {
        // setns changes only this thread's namespace.
        if nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).is_err() {
            return;
        }
        let start = Instant::now();
        while stop.try_recv().is_err() {
            let asked = Instant::now();
            let event = match count_once(addr, Duration::from_secs(5)) {
                Ok(counter) => ClientEvent::Answer { at: start.elapsed(), counter, latency: asked.elapsed() },
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(100));
                    ClientEvent::Failure
                }
            };
            if events.send(event).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }))
}

pub fn run(args: DemoArgs) -> Result<i32> {
    crate::netns::require_root()?;
    crate::guest_image::ensure()?;
    let dir = match &args.logs {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("ftvm-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let key = dir.join("key");
    std::fs::write(&key, crate::host::entropy(32)?.iter().map(|b| format!("{b:02x}")).collect::<String>())?;
    let lease = dir.join("lease");
    let _ = std::fs::remove_file(&lease);

    println!("ftvm demo: building three hosts (network namespaces) joined by a bridge");
    let topo = Topology::create("ftvm-demo")?;
    let common = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        v.extend(["--net", "tap:tap0", "--key"].map(String::from));
        v.push(key.display().to_string());
        v.push("--lease".into());
        v.push(lease.display().to_string());
        v
    };
    let listen = format!("{}:{REPLICATION_PORT}", Topology::BACKUP_REPL_ADDR);
    let backup_args = common(&["backup", "--listen", &listen]);
    let backup = spawn_in(&topo.backup_ns(), &backup_args, &dir.join("backup.log"), "backup")?;
    println!("ftvm demo: backup waiting on {listen} (log: {})", dir.join("backup.log").display());
    let mut primary_args = common(&["run", "--replicate-to", &listen, "--epoch-ms"]);
    primary_args.insert(4, args.epoch_ms.to_string());
    primary_args.extend(["--api".into(), dir.join("primary.sock").display().to_string(), "--".into(), "/usr/share/ftvm/counter-httpd".into()]);
    let mut primary = spawn_in(&topo.primary_ns(), &primary_args, &dir.join("primary.log"), "primary")?;
    println!("ftvm demo: primary booting Debian with counter-httpd, replicating every {} ms (log: {})", args.epoch_ms, dir.join("primary.log").display());

    let (tx, rx) = mpsc::channel();
    let (stop_tx, stop_rx) = mpsc::channel();
    let client = spawn_client(&topo.client_ns(), tx, stop_rx)?;
    let outcome = drive(&args, &rx, &mut primary, &backup);
    let _ = stop_tx.send(());
    let _ = client.join();
    drop(backup);
    drop(primary);
    drop(topo);
    let summary = outcome?;
    println!("{summary}");
    Ok(0)
}

/// Watch the client; kill the primary midway; report.
fn drive(args: &DemoArgs, rx: &mpsc::Receiver<ClientEvent>, primary: &mut Proc, backup: &Proc) -> Result<String> {
    let boot_deadline = Instant::now() + Duration::from_secs(300);
    let mut last = 0u64;
    let mut answers = 0u64;
    let mut first_answer: Option<Instant> = None;
    let mut killed_at: Option<Instant> = None;
    let mut takeover: Option<Duration> = None;
    let mut went_backwards = false;
    let mut last_print = Instant::now();
    loop {
        if let Some(status) = primary_exit(primary) {
            if killed_at.is_none() {
                bail!("the primary exited by itself ({status}) — see its log");
            }
        }
        let event = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(e) => Some(e),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("the client stopped"),
        };
        match event {
            Some(ClientEvent::Answer { at, counter, latency }) => {
                if first_answer.is_none() {
                    println!("ftvm demo: the guest answers; counting for {} s", args.before_kill_s);
                    first_answer = Some(Instant::now());
                }
                if counter <= last {
                    went_backwards = true;
                    println!("ftvm demo: COUNTER WENT BACKWARDS: {counter} after {last}");
                }
                if let (Some(k), None) = (killed_at, takeover) {
                    let t = k.elapsed();
                    takeover = Some(t);
                    println!("ftvm demo: the backup answers: counter {counter} (previous answer {last}) — takeover took {:.2} s", t.as_secs_f64());
                }
                last = counter;
                answers += 1;
                if last_print.elapsed() >= Duration::from_secs(1) {
                    last_print = Instant::now();
                    println!("  t={:5.1}s  counter {counter:5}  ({} ms per request)", at.as_secs_f64(), latency.as_millis());
                }
            }
            Some(ClientEvent::Failure) | None => {
                if first_answer.is_none() && Instant::now() > boot_deadline {
                    bail!("the guest never answered (see the logs)");
                }
                if killed_at.is_some() && takeover.is_none() && last_print.elapsed() >= Duration::from_secs(1) {
                    last_print = Instant::now();
                    println!("  ... waiting for the backup ({:.1} s since the kill)", killed_at.expect("set").elapsed().as_secs_f64());
                }
            }
        }
        if let (Some(first), None) = (first_answer, killed_at) {
            if first.elapsed() >= Duration::from_secs(args.before_kill_s) {
                println!("ftvm demo: killing the primary (SIGKILL, pid {}) at counter {last}", primary.child.id());
                let _ = primary.child.kill();
                let _ = primary.child.wait();
                killed_at = Some(Instant::now());
            }
        }
        if let Some(k) = killed_at {
            if k.elapsed() >= Duration::from_secs(args.after_kill_s) && takeover.is_some() {
                break;
            }
            if k.elapsed() >= Duration::from_secs(args.after_kill_s + 30) {
                bail!("the backup never took over (see {})", backup.name);
            }
        }
    }
    Ok(format!(
        "ftvm demo: done: {answers} answers, last counter {last}; the counter {} went backwards; takeover after SIGKILL: {:.2} s",
        if went_backwards { "DID" } else { "never" },
        takeover.map_or(f64::NAN, |t| t.as_secs_f64())
    ))
}

fn primary_exit(primary: &mut Proc) -> Option<std::process::ExitStatus> {
    primary.child.try_wait().ok().flatten()
}
