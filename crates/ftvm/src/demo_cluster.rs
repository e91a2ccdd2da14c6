//! `ftvm demo --cluster`: the many-host story, live on one machine. Agents for hosts h1..hN
//! share a `file:` store, plus a "console" agent on loopback that hosts no VM (its label keeps
//! replicas off it) and serves the dashboard whose address is printed first. A
//! checkpoint-protected VM is declared through the API; the whole host of its primary is
//! killed (agent and replicas: one SIGKILL to its process group), the backup takes over, the
//! control loop re-protects the VM on a remaining host, and then that new primary's host is
//! killed too. Every verdict is read from the API's typed fields (state, owner, generation,
//! replicas, the event timeline) and from a client's answers, never from log wording;
//! `--summary` writes them as JSON.
//!
//! As root, each host is a network namespace whose bridge joins a switch, the VM runs the
//! guest's HTTP counter on it, and a client in its own namespace counts throughout: the
//! counter must never go backwards and must answer after each kill. Without root the hosts
//! share loopback and the VM has no network (the story is told by the API alone).
//!
//! ```text
//!   <p>-h1: ftvm-br0 10.0.2.1 ─┐                       console agent: 127.0.0.1 (dashboard)
//!   <p>-h2: ftvm-br0 10.0.2.2 ─┼─ <p>-sw: br0 ─ <p>-client 10.0.2.100 → guest 10.0.2.15:80
//!   <p>-h3: ftvm-br0 10.0.2.3 ─┘
//! ```

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The VM the story is about.
const VM: &str = "counter";
/// The console agent's label; the VM's placement avoids it.
const CONSOLE_LABEL: (&str, &str) = ("demo", "console");
/// The bridge of every host namespace (the VM's TAP joins it) and the guest's counter.
const BRIDGE: &str = "ftvm-br0";
const COUNTER_COMMAND: &str = "/usr/share/ftvm/counter-httpd";
/// At most this many host namespaces (addresses 10.0.2.1..=9; the guest is .15).
const MAX_NETNS_HOSTS: usize = 9;
/// The largest API answer read.
const MAX_ANSWER_BYTES: u64 = 4 << 20;
/// An agent names its API address within this long.
const AGENT_START_LIMIT: Duration = Duration::from_secs(30);
/// Booting the guest and its first full checkpoint, on a loaded machine.
const PROTECT_LIMIT: Duration = Duration::from_secs(300);
/// A failover, or a re-protection, seen through the API.
const RECOVERY_LIMIT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(200);

/// The `/v1` API of one agent, with the token (a minimal HTTP/1.1 client for loopback:
/// one request per connection, bounded reads, timeouts).
#[derive(Clone)]
pub(crate) struct Api {
    pub base: String,
    token: String,
}

impl Api {
    fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value)> {
        let authority = self.base.trim_start_matches("http://");
        let mut stream =
            TcpStream::connect(authority).with_context(|| format!("cannot reach the API at {authority}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        let payload = body.map(Value::to_string).unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nAuthorization: Bearer {}\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.token,
            payload.len()
        );
        stream.write_all(head.as_bytes())?;
        stream.write_all(payload.as_bytes())?;
        let mut answer = Vec::new();
        stream.take(MAX_ANSWER_BYTES).read_to_end(&mut answer).with_context(|| format!("{method} {path}"))?;
        parse_answer(&answer).with_context(|| format!("{method} {path}: a malformed answer"))
    }

    fn get(&self, path: &str) -> Result<Value> {
        match self.request("GET", path, None)? {
            (200, value) => Ok(value),
            (status, value) => bail!("GET {path}: {status} {}", value["error"].as_str().unwrap_or("")),
        }
    }

    fn post(&self, path: &str, body: &Value) -> Result<Value> {
        match self.request("POST", path, Some(body))? {
            (200..=202, value) => Ok(value),
            (status, value) => bail!("POST {path}: {status} {}", value["error"].as_str().unwrap_or("")),
        }
    }
}

/// The status and JSON body of an HTTP answer (a chunked body is joined).
fn parse_answer(answer: &[u8]) -> Result<(u16, Value)> {
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").context("no end of headers")?;
    let head = String::from_utf8_lossy(&answer[..split]);
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("no status")?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked { unchunk(&answer[split + 4..])? } else { answer[split + 4..].to_vec() };
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok((status, Value::Null));
    }
    Ok((status, serde_json::from_slice(&body).context("the body is not JSON")?))
}

fn unchunk(mut rest: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let end = rest.windows(2).position(|w| w == b"\r\n").context("a chunk size without its line end")?;
        let size_text = String::from_utf8_lossy(&rest[..end]).into_owned();
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).with_context(|| format!("a bad chunk size {size_text:?}"))?;
        rest = &rest[end + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(rest.get(..size).context("a chunk cut short")?);
        rest = rest.get(size + 2..).context("a chunk without its line end")?;
    }
}

/// One host's agent: the leader of its own process group, so that the replicas it starts
/// die with it when the host is killed.
struct Agent {
    name: String,
    api: Api,
    child: Option<Child>,
}

impl Agent {
    /// Start the agent of host `name`: on loopback, or in its namespace (`net`) on its bridge.
    fn start(
        dir: &Path,
        store: &Path,
        token: &str,
        name: &str,
        labels: Option<&str>,
        net: Option<&HostNet>,
    ) -> Result<Agent> {
        let exe = std::env::current_exe().context("cannot find the ftvm binary")?;
        let work_dir = dir.join(name);
        std::fs::create_dir_all(&work_dir).with_context(|| format!("cannot create {}", work_dir.display()))?;
        let log_path = dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).with_context(|| format!("cannot create {}", log_path.display()))?;
        let mut command = match net {
            // `ip netns exec` enters the namespace and execs the agent: the same process.
            Some(net) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", &net.ns]).arg(exe);
                command
            }
            None => Command::new(exe),
        };
        let listen = net.map_or_else(|| "127.0.0.1:0".to_owned(), |n| format!("{}:7780", n.address));
        command
            .arg("agent")
            .arg("--store")
            .arg(format!("file:{}", store.display()))
            .args(["--host-name", name, "--listen", &listen])
            .arg("--token-file")
            .arg(dir.join("token"))
            .arg("--work-dir")
            .arg(&work_dir);
        if let Some(labels) = labels {
            command.args(["--labels", labels]);
        }
        if let Some(net) = net {
            command.args(["--address", &net.address, "--bridge", BRIDGE]);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start the agent of {name}"))?;
        let mut agent = Agent {
            name: name.to_owned(),
            api: Api { base: String::new(), token: token.to_owned() },
            child: Some(child),
        };
        agent.api.base = agent.wait_for_api(&log_path)?;
        Ok(agent)
    }

    /// The agent's first line names its API: `ftvm agent: API on http://127.0.0.1:PORT/v1 (host h1)`.
    fn wait_for_api(&mut self, log: &Path) -> Result<String> {
        let deadline = Instant::now() + AGENT_START_LIMIT;
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if let Some(at) = text.find("API on http://") {
                let url: String = text[at + "API on ".len()..].chars().take_while(|c| !c.is_whitespace()).collect();
                return Ok(url.trim_end_matches('/').trim_end_matches("/v1").to_owned());
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!(
                    "the agent of {} exited ({status}) before serving its API; its log ({}):\n{text}",
                    self.name,
                    log.display()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "the agent of {} named no API address within {AGENT_START_LIMIT:?} (log: {})",
                    self.name,
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kill the whole host at once: SIGKILL to the agent's process group.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
            let _ = child.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A host's place on the demo's network.
struct HostNet {
    ns: String,
    address: String,
}

/// The namespaces of the networked story; removed on drop.
struct Network {
    prefix: String,
    created: Vec<String>,
}

impl Network {
    fn host_ns(&self, i: usize) -> String {
        format!("{}-h{i}", self.prefix)
    }
    fn client_ns(&self) -> String {
        format!("{}-client", self.prefix)
    }

    fn create(prefix: &str, hosts: usize) -> Result<Network> {
        let mut net = Network { prefix: prefix.to_owned(), created: Vec::new() };
        net.build(hosts).inspect_err(|_| net.destroy())?;
        Ok(net)
    }

    fn exec(ns: &str, args: &[&str]) -> Result<()> {
        let mut full = vec!["netns", "exec", ns];
        full.extend_from_slice(args);
        crate::netns::ip(&full)
    }

    fn add_ns(&mut self, ns: &str) -> Result<()> {
        let _ = crate::netns::ip(&["netns", "del", ns]); // a leftover of a killed run
        crate::netns::ip(&["netns", "add", ns])?;
        self.created.push(ns.to_owned());
        Network::exec(ns, &["ip", "link", "set", "lo", "up"])
    }

    /// `ns` joined to the switch by a veth pair: `inner` in `ns`, `outer` in the switch's bridge.
    fn join_switch(&self, ns: &str, inner: &str, outer: &str) -> Result<()> {
        let switch = format!("{}-sw", self.prefix);
        crate::netns::ip(&[
            "link", "add", inner, "netns", ns, "type", "veth", "peer", "name", outer, "netns", &switch,
        ])?;
        Network::exec(&switch, &["ip", "link", "set", outer, "master", "br0", "up"])?;
        Network::exec(ns, &["ip", "link", "set", inner, "up"])
    }

    fn build(&mut self, hosts: usize) -> Result<()> {
        let switch = format!("{}-sw", self.prefix);
        self.add_ns(&switch)?;
        Network::exec(&switch, &["ip", "link", "add", "br0", "type", "bridge"])?;
        Network::exec(&switch, &["ip", "link", "set", "br0", "up"])?;
        for i in 1..=hosts {
            let ns = self.host_ns(i);
            self.add_ns(&ns)?;
            Network::exec(&ns, &["ip", "link", "add", BRIDGE, "type", "bridge"])?;
            Network::exec(&ns, &["ip", "link", "set", BRIDGE, "up"])?;
            Network::exec(&ns, &["ip", "addr", "add", &format!("10.0.2.{i}/24"), "dev", BRIDGE])?;
            self.join_switch(&ns, "uplink", &format!("h{i}"))?;
            Network::exec(&ns, &["ip", "link", "set", "uplink", "master", BRIDGE])?;
        }
        let client = self.client_ns();
        self.add_ns(&client)?;
        self.join_switch(&client, "eth0", "client")?;
        Network::exec(&client, &["ip", "addr", "add", "10.0.2.100/24", "dev", "eth0"])
    }

    fn destroy(&mut self) {
        for ns in self.created.drain(..).rev() {
            let _ = crate::netns::ip(&["netns", "del", &ns]);
        }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.destroy();
    }
}

/// What the client saw: each answer's time and value.
#[derive(Default)]
struct Counted {
    answers: Vec<(Instant, u64)>,
    failures: u64,
}

/// A client in `ns` that counts once every 50 ms (a new HTTP connection each time) until
/// `stop`; sequential, so each answer must be larger than the one before.
fn spawn_client(
    ns: &str,
    counted: std::sync::Arc<std::sync::Mutex<Counted>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<std::thread::JoinHandle<()>> {
    let netns =
        std::fs::File::open(format!("/var/run/netns/{ns}")).with_context(|| format!("cannot open namespace {ns}"))?;
    Ok(std::thread::spawn(move || {
        // setns changes only this thread's namespace.
        if nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).is_err() {
            return;
        }
        let addr = crate::demo::HTTP_ADDR.parse().expect("a valid address");
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let answer = crate::demo::count_once(addr, Duration::from_secs(2));
            let mut counted = counted.lock().expect("the client's record");
            match answer {
                Ok(value) => counted.answers.push((Instant::now(), value)),
                Err(_) => counted.failures += 1,
            }
            drop(counted);
            std::thread::sleep(Duration::from_millis(50));
        }
    }))
}

/// Wait for the client's first answers (the guest boots and starts its service after the VM is
/// protected).
fn wait_for_answers(counted: &std::sync::Mutex<Counted>, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while counted.lock().expect("the client's record").answers.len() < 3 {
        if Instant::now() >= deadline {
            bail!("the guest's counter did not answer the client within {limit:?}");
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

/// One failover of the story, as the API showed it.
#[derive(Debug, Default, Clone)]
struct Failover {
    killed: String,
    new_owner: Option<String>,
    generation_before: Option<u64>,
    generation_after: Option<u64>,
    /// From the kill to the API naming a new owner.
    failover_ms: Option<u64>,
    /// From the kill to `protected` again, with a backup on a live host (None: not asked, or never).
    reprotected_ms: Option<u64>,
    reprotected_on: Option<String>,
}

impl Failover {
    fn to_json(&self) -> Value {
        json!({ "killed": self.killed, "new_owner": self.new_owner, "generation_before": self.generation_before,
                "generation_after": self.generation_after, "failover_ms": self.failover_ms,
                "reprotected_ms": self.reprotected_ms, "reprotected_on": self.reprotected_on })
    }
}

/// What the demo saw.
#[derive(Debug, Default)]
struct Summary {
    dashboard: String,
    protected_ms: Option<u64>,
    failovers: Vec<Failover>,
    /// Polls at which two replicas on live hosts both said they were primary.
    two_primaries_seen: u64,
    /// The timeline's kinds for the VM, oldest first.
    timeline: Vec<String>,
    /// The networked story's client (None on loopback).
    client: Option<ClientVerdict>,
}

/// The client's answers, judged.
#[derive(Debug, Default, Clone)]
struct ClientVerdict {
    answers: u64,
    last_counter: u64,
    /// An answer smaller than or equal to the one before: acknowledged work lost.
    went_backwards: Option<(u64, u64)>,
    /// Answers before the first kill, and after each kill.
    answers_before_kill: u64,
    answers_after_kill: Vec<u64>,
    /// From each kill to the client's next answer.
    answer_gap_ms: Vec<Option<u64>>,
}

impl ClientVerdict {
    fn judge(counted: &Counted, kills: &[Instant]) -> ClientVerdict {
        let mut verdict = ClientVerdict { answers: counted.answers.len() as u64, ..ClientVerdict::default() };
        for pair in counted.answers.windows(2) {
            if pair[1].1 <= pair[0].1 && verdict.went_backwards.is_none() {
                verdict.went_backwards = Some((pair[1].1, pair[0].1));
            }
        }
        verdict.last_counter = counted.answers.last().map_or(0, |a| a.1);
        let first_kill = kills.first().copied();
        verdict.answers_before_kill =
            counted.answers.iter().filter(|a| first_kill.is_some_and(|k| a.0 < k)).count() as u64;
        for kill in kills {
            let after: Vec<&(Instant, u64)> = counted.answers.iter().filter(|a| a.0 > *kill).collect();
            verdict.answers_after_kill.push(after.len() as u64);
            verdict.answer_gap_ms.push(after.first().map(|a| millis(a.0 - *kill)));
        }
        verdict
    }

    fn passed(&self) -> bool {
        self.answers_before_kill > 0
            && self.went_backwards.is_none()
            && self.answers_after_kill.len() == 2
            && self.answers_after_kill.iter().all(|n| *n > 0)
    }

    fn to_json(&self) -> Value {
        json!({ "answers": self.answers, "last_counter": self.last_counter,
                "counter_went_backwards": self.went_backwards.is_some(), "answers_before_kill": self.answers_before_kill,
                "answers_after_kill": self.answers_after_kill, "answer_gap_ms": self.answer_gap_ms })
    }
}

impl Summary {
    fn passed(&self) -> bool {
        let first = self.failovers.first();
        let second = self.failovers.get(1);
        let moved =
            |f: Option<&Failover>| f.is_some_and(|f| f.new_owner.is_some() && f.generation_after > f.generation_before);
        self.protected_ms.is_some()
            && moved(first)
            && first.is_some_and(|f| f.reprotected_ms.is_some())
            && moved(second)
            && self.two_primaries_seen == 0
            && self.timeline.iter().filter(|k| *k == "failover").count() >= 2
            && self.client.as_ref().is_none_or(ClientVerdict::passed)
    }

    fn report(&self) -> String {
        let mut lines = vec![format!("ftvm demo: timeline of {VM}: {}", self.timeline.join(" → "))];
        if self.two_primaries_seen > 0 {
            lines
                .push(format!("  FAILED: two running hosts both showed a primary ({} polls)", self.two_primaries_seen));
        } else {
            lines.push("  never two primaries on running hosts".into());
        }
        if let Some(client) = &self.client {
            lines.push(match client.went_backwards {
                None => format!(
                    "  the client's counter never went backwards: {} answers ({} before the first kill), last {}",
                    client.answers, client.answers_before_kill, client.last_counter
                ),
                Some((after, before)) => format!("  FAILED: the counter went backwards ({after} after {before})"),
            });
            for (i, (n, gap)) in client.answers_after_kill.iter().zip(&client.answer_gap_ms).enumerate() {
                lines.push(match gap {
                    Some(ms) => {
                        format!("  after kill {}: the client's next answer came {ms} ms later ({n} answers)", i + 1)
                    }
                    None => format!("  FAILED: no answer after kill {}", i + 1),
                });
            }
        }
        lines.push(format!("ftvm demo: {}", if self.passed() { "PASSED" } else { "FAILED" }));
        lines.join("\n")
    }

    fn verdicts(&self) -> Value {
        json!({ "passed": self.passed(), "dashboard": self.dashboard, "protected_ms": self.protected_ms,
                "failovers": self.failovers.iter().map(Failover::to_json).collect::<Vec<_>>(),
                "two_primaries_seen": self.two_primaries_seen, "timeline": self.timeline,
                "networked": self.client.is_some(), "client": self.client.as_ref().map(ClientVerdict::to_json) })
    }
}

pub fn run(args: &crate::demo::DemoArgs) -> Result<i32> {
    crate::guest_image::ensure()?;
    if args.hosts < 3 {
        bail!("--hosts {}: the story kills two hosts and re-protects once, so it needs at least 3", args.hosts);
    }
    let networked = !args.loopback && nix::unistd::Uid::effective().is_root();
    if networked && args.hosts > MAX_NETNS_HOSTS {
        bail!("--hosts {}: at most {MAX_NETNS_HOSTS} host namespaces", args.hosts);
    }
    let dir = match &args.logs {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("ftvm-demo-cluster-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let token: String = vmm::host::entropy(16)?.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(dir.join("token"), format!("{token}\n")).context("cannot write the token file")?;
    let store = dir.join("store");
    let _ = std::fs::remove_dir_all(&store);

    let network = match networked {
        true => {
            crate::netns::require_root()?;
            println!("ftvm demo: building {} hosts (network namespaces, a bridge each) joined by a switch", args.hosts);
            Some(Network::create(&format!("fc{}", std::process::id()), args.hosts)?)
        }
        false => {
            println!(
                "ftvm demo: the hosts share loopback and the VM has no network (root builds namespaces and a client)"
            );
            None
        }
    };
    println!("ftvm demo: starting the console agent (it serves the dashboard and hosts no VM)");
    let labels = format!("{}={}", CONSOLE_LABEL.0, CONSOLE_LABEL.1);
    let console = Agent::start(&dir, &store, &token, "console", Some(&labels), None)?;
    let dashboard = dashboard::page_url(&console.api.base, &token);
    println!("ftvm demo: dashboard on {dashboard}");
    println!("ftvm demo:   (open it now: the story waits {} ms before the first kill)", args.before_kill_ms);
    let mut hosts = Vec::new();
    for i in 1..=args.hosts {
        let net = network.as_ref().map(|n| HostNet { ns: n.host_ns(i), address: format!("10.0.2.{i}") });
        hosts.push(Agent::start(&dir, &store, &token, &format!("h{i}"), None, net.as_ref())?);
    }
    let names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
    println!("ftvm demo: {} host agents sharing file:{} — {}", hosts.len(), store.display(), names.join(", "));

    let mut summary = Summary { dashboard, ..Summary::default() };
    let counted = std::sync::Arc::new(std::sync::Mutex::new(Counted::default()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = match &network {
        Some(net) => Some(spawn_client(&net.client_ns(), counted.clone(), stop.clone())?),
        None => None,
    };
    let mut kills = Vec::new();
    let result = story(args, &console.api, &mut hosts, &mut summary, networked.then_some(&*counted), &mut kills);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(client) = client {
        let _ = client.join();
        summary.client = Some(ClientVerdict::judge(&counted.lock().expect("the client's record"), &kills));
    }
    if result.is_ok() && args.linger_s > 0 {
        println!("ftvm demo: the dashboard stays up for {} s more", args.linger_s);
        std::thread::sleep(Duration::from_secs(args.linger_s));
    }
    drop(hosts);
    drop(console);
    drop(network);
    if let Some(path) = &args.summary {
        let text = serde_json::to_string_pretty(&summary.verdicts()).expect("a summary serializes");
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Err(e) = result {
        eprintln!("ftvm demo: the agents' logs are in {}", dir.display());
        return Err(e);
    }
    println!("{}", summary.report());
    if !summary.passed() {
        println!("ftvm demo: the agents' logs are in {}", dir.display());
        return Ok(1);
    }
    if args.logs.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(0)
}

/// Declare, wait for protection, kill the primary's host, wait for the failover and the
/// re-protection, kill the new primary's host, wait for the second failover.
fn story(
    args: &crate::demo::DemoArgs,
    api: &Api,
    hosts: &mut [Agent],
    summary: &mut Summary,
    counted: Option<&std::sync::Mutex<Counted>>,
    kills: &mut Vec<Instant>,
) -> Result<()> {
    let networked = counted.is_some();
    let mut spec = json!({ "name": VM, "protection": "checkpoint", "replicas": 2,
                           "placement": { "distinct_hosts": true, "avoid_labels": { CONSOLE_LABEL.0: CONSOLE_LABEL.1 } } });
    if networked {
        spec["bridge"] = json!(BRIDGE);
        spec["command"] = json!([COUNTER_COMMAND]);
    }
    let declared = Instant::now();
    api.post("/v1/vms", &spec)?;
    let what = if networked { format!(", running {COUNTER_COMMAND} on {BRIDGE}") } else { String::new() };
    println!("ftvm demo: declared {VM} (checkpoint protection, 2 replicas{what}) through POST /v1/vms");
    let vm = wait_vm(api, PROTECT_LIMIT, summary, &running(hosts), |vm| vm["state"] == "protected")
        .with_context(|| format!("{VM} was not protected within {PROTECT_LIMIT:?}"))?;
    summary.protected_ms = Some(millis(declared.elapsed()));
    println!("ftvm demo: {VM} protected after {:.1} s: {}", declared.elapsed().as_secs_f64(), placement(&vm));
    if let Some(counted) = counted {
        wait_for_answers(counted, PROTECT_LIMIT)?;
        println!("ftvm demo: the client counts: the guest's counter answers at {}", crate::demo::HTTP_ADDR);
    }
    std::thread::sleep(Duration::from_millis(args.before_kill_ms));

    kills.push(Instant::now());
    let first = kill_primary(api, hosts, &vm, summary, true)?;
    println!("ftvm demo: {}", describe(&first));
    summary.failovers.push(first);
    let vm = api.get(&format!("/v1/vms/{VM}"))?;
    std::thread::sleep(Duration::from_millis(args.before_kill_ms.min(5_000)));
    kills.push(Instant::now());
    let second = kill_primary(api, hosts, &vm, summary, false)?;
    println!("ftvm demo: {}", describe(&second));
    summary.failovers.push(second);
    wait_failover_events(api, 2, summary)?;
    // The client's answers after the second takeover.
    std::thread::sleep(Duration::from_secs(2));
    Ok(())
}

fn kill_primary(
    api: &Api,
    hosts: &mut [Agent],
    vm: &Value,
    summary: &mut Summary,
    reprotect: bool,
) -> Result<Failover> {
    let owner = vm["owner"].as_str().context("the VM has no owner to kill")?.to_owned();
    let mut failover =
        Failover { killed: owner.clone(), generation_before: vm["generation"].as_u64(), ..Failover::default() };
    let host = hosts.iter_mut().find(|h| h.name == owner).with_context(|| format!("no agent {owner} to kill"))?;
    println!("ftvm demo: killing host {owner} (its agent and its replicas, SIGKILL to the process group)");
    let killed = Instant::now();
    host.kill();
    let live = running(hosts);
    let taken = wait_vm(api, RECOVERY_LIMIT, summary, &live, |vm| vm["owner"].as_str().is_some_and(|o| o != owner))
        .with_context(|| format!("no replica took {VM} over within {RECOVERY_LIMIT:?} of killing {owner}"))?;
    failover.failover_ms = Some(millis(killed.elapsed()));
    failover.new_owner = taken["owner"].as_str().map(str::to_owned);
    failover.generation_after = taken["generation"].as_u64();
    if reprotect {
        let again = wait_vm(api, RECOVERY_LIMIT, summary, &live, |vm| {
            vm["state"] == "protected" && backup_host(vm).is_some_and(|b| live.contains(&b))
        })
        .with_context(|| format!("{VM} was not protected again within {RECOVERY_LIMIT:?} of killing {owner}"))?;
        failover.reprotected_ms = Some(millis(killed.elapsed()));
        failover.reprotected_on = backup_host(&again);
    }
    Ok(failover)
}

/// Poll the VM until `done`, counting any moment with two primaries on hosts still running
/// (a killed host's last report may name its primary until the cluster judges it down).
fn wait_vm(
    api: &Api,
    limit: Duration,
    summary: &mut Summary,
    running: &[String],
    done: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let deadline = Instant::now() + limit;
    let mut last_error = None;
    loop {
        match api.get(&format!("/v1/vms/{VM}")) {
            Ok(vm) => {
                let live_primary =
                    |r: &&Value| r["role"] == "primary" && running.iter().any(|h| r["host"] == h.as_str());
                let primaries = vm["replicas"].as_array().map_or(0, |r| r.iter().filter(live_primary).count());
                if primaries > 1 {
                    summary.two_primaries_seen += 1;
                }
                if done(&vm) {
                    return Ok(vm);
                }
            }
            Err(e) => last_error = Some(e),
        }
        if Instant::now() >= deadline {
            return Err(last_error.unwrap_or_else(|| anyhow::anyhow!("the wait ran out")));
        }
        std::thread::sleep(POLL);
    }
}

/// The hosts whose agents the demo has not killed.
fn running(hosts: &[Agent]) -> Vec<String> {
    hosts.iter().filter(|h| h.child.is_some()).map(|h| h.name.clone()).collect()
}

/// Wait for the timeline to show `n` failovers of the VM (the new primary's agent writes the
/// event in its next round, after the API already names it owner).
fn wait_failover_events(api: &Api, n: usize, summary: &mut Summary) -> Result<()> {
    let deadline = Instant::now() + RECOVERY_LIMIT;
    loop {
        summary.timeline = vm_kinds(&api.get("/v1/events?since=0")?);
        if summary.timeline.iter().filter(|k| *k == "failover").count() >= n {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("the timeline shows fewer than {n} failovers of {VM} within {RECOVERY_LIMIT:?}");
        }
        std::thread::sleep(POLL);
    }
}

fn backup_host(vm: &Value) -> Option<String> {
    let replicas = vm["replicas"].as_array()?;
    let backup = replicas.iter().find(|r| r["role"] == "backup")?;
    backup["host"].as_str().map(str::to_owned)
}

fn placement(vm: &Value) -> String {
    let replicas = vm["replicas"].as_array().cloned().unwrap_or_default();
    let parts: Vec<String> = replicas
        .iter()
        .map(|r| format!("{} on {}", r["role"].as_str().unwrap_or("?"), r["host"].as_str().unwrap_or("?")))
        .collect();
    format!("{} (generation {})", parts.join(", "), vm["generation"])
}

fn describe(f: &Failover) -> String {
    let mut text = format!(
        "{} took {VM} over {} ms after {} was killed (generation {} → {})",
        f.new_owner.as_deref().unwrap_or("?"),
        f.failover_ms.map_or("?".into(), |ms| ms.to_string()),
        f.killed,
        f.generation_before.map_or("?".into(), |g| g.to_string()),
        f.generation_after.map_or("?".into(), |g| g.to_string()),
    );
    if let (Some(ms), Some(on)) = (f.reprotected_ms, &f.reprotected_on) {
        text.push_str(&format!("; protected again with a backup on {on} {ms} ms after the kill"));
    }
    text
}

/// The kinds of the timeline's events about the demo's VM, oldest first.
fn vm_kinds(events: &Value) -> Vec<String> {
    let list = events["events"].as_array().cloned().unwrap_or_default();
    list.iter().filter(|e| e["vm"] == VM).filter_map(|e| e["kind"].as_str().map(str::to_owned)).collect()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_read_with_or_without_chunks() {
        let plain = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\n{\"a\":1}\n";
        assert_eq!(parse_answer(plain).expect("plain"), (200, json!({ "a": 1 })));
        let chunked =
            b"HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n:2}\r\n0\r\n\r\n";
        assert_eq!(parse_answer(chunked).expect("chunked"), (401, json!({ "a": 2 })));
        assert_eq!(parse_answer(b"HTTP/1.1 202 Accepted\r\n\r\n").expect("empty"), (202, Value::Null));
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err());
    }

    #[test]
    fn the_client_is_judged_by_every_answer_and_by_answers_after_each_kill() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let counted = |values: &[(u64, u64)]| Counted {
            answers: values.iter().map(|(ms, v)| (at(*ms), *v)).collect(),
            failures: 0,
        };
        let kills = [at(100), at(300)];
        let good = ClientVerdict::judge(&counted(&[(50, 1), (150, 2), (350, 3)]), &kills);
        assert!(good.passed(), "{good:?}");
        assert_eq!((good.answers_before_kill, good.answers_after_kill.clone()), (1, vec![2, 1]));
        assert_eq!(good.answer_gap_ms, vec![Some(50), Some(50)]);
        let lost = ClientVerdict::judge(&counted(&[(50, 1), (150, 2), (350, 2)]), &kills);
        assert_eq!(lost.went_backwards, Some((2, 2)));
        assert!(!lost.passed());
        let silent = ClientVerdict::judge(&counted(&[(50, 1), (150, 2)]), &kills);
        assert_eq!(silent.answer_gap_ms, vec![Some(50), None]);
        assert!(!silent.passed());
        assert!(!ClientVerdict::judge(&counted(&[(150, 2), (350, 3)]), &kills).passed(), "nothing before the kill");
    }

    #[test]
    fn the_story_passes_only_with_two_failovers_a_reprotection_and_never_two_primaries() {
        let moved = |killed: &str, to: &str, reprotected: bool| Failover {
            killed: killed.into(),
            new_owner: Some(to.into()),
            generation_before: Some(3),
            generation_after: Some(4),
            failover_ms: Some(900),
            reprotected_ms: reprotected.then_some(2500),
            reprotected_on: reprotected.then(|| "h3".into()),
        };
        let mut summary = Summary {
            protected_ms: Some(20_000),
            failovers: vec![moved("h1", "h2", true), moved("h2", "h3", false)],
            timeline: vec!["failover".into(), "reprotect".into(), "failover".into()],
            ..Summary::default()
        };
        assert!(summary.passed());
        summary.two_primaries_seen = 1;
        assert!(!summary.passed());
        summary.two_primaries_seen = 0;
        summary.failovers[0].reprotected_ms = None;
        assert!(!summary.passed());
    }
}
