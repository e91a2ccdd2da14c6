//! `ftvm agent`s on loopback for the tests: several "hosts" sharing one store (a `file:` store
//! in a scratch directory, or any store spec given, such as a test's own etcd), each agent the leader of its own process group (its replicas in it), so
//! that killing the group kills the whole host at once. A small HTTP client reads the `/v1`
//! API (notes/CLUSTER-API.md) with the token.

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The largest API answer read.
const MAX_ANSWER_BYTES: u64 = 4 << 20;
/// An agent prints its API address within this long of starting.
const START_LIMIT: Duration = Duration::from_secs(30);

/// One host: its agent process (a process group leader), its API and its log.
pub struct Agent {
    pub name: String,
    pub api: String,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Agent {
    /// Kill the host: its agent and every process it started, at once (SIGKILL to the group).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
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

/// Agents sharing one file store, with one token; everything under `dir`, removed on drop
/// (after the agents are killed).
pub struct Agents {
    pub agents: Vec<Agent>,
    pub token: String,
    pub dir: PathBuf,
}

impl Agents {
    /// Start one agent per name on 127.0.0.1 (a port each, chosen by the agent) and wait for
    /// each to say where its API is; they share a `file:` store.
    pub fn start(suite: &str, names: &[&str]) -> Agents {
        Self::start_on(suite, names, None)
    }

    /// [`Agents::start`] on the store `store` names (`etcd:http://...`; None: a `file:` store in
    /// the scratch directory).
    pub fn start_on(suite: &str, names: &[&str], store: Option<&str>) -> Agents {
        let dir = std::env::temp_dir().join(format!("ftvm-{suite}-{}-agents", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let token = format!("test-token-{}", std::process::id());
        let token_file = dir.join("token");
        std::fs::write(&token_file, format!("{token}\n")).expect("token file");
        let store = store.map_or_else(|| format!("file:{}", dir.join("store").display()), String::from);
        let mut cluster = Agents { agents: Vec::new(), token, dir: dir.clone() };
        for name in names {
            let agent = start_agent(&dir, &store, &token_file, name);
            cluster.agents.push(agent);
        }
        cluster
    }

    pub fn agent(&mut self, name: &str) -> &mut Agent {
        self.agents.iter_mut().find(|a| a.name == name).unwrap_or_else(|| panic!("no agent {name}"))
    }

    /// The logs of every agent, for a failure message.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        for agent in &self.agents {
            let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            text.push_str(&format!("--- {} (last lines)\n", agent.name));
            for line in tail.iter().rev() {
                text.push_str(line);
                text.push('\n');
            }
        }
        text
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        for agent in &mut self.agents {
            agent.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_agent(dir: &Path, store: &str, token_file: &Path, name: &str) -> Agent {
    let work_dir = dir.join(name);
    std::fs::create_dir_all(&work_dir).expect("work dir");
    let log = dir.join(format!("{name}.log"));
    let file = std::fs::File::create(&log).expect("log");
    let child = Command::new(env!("CARGO_BIN_EXE_ftvm"))
        .arg("agent")
        .args(["--store", store])
        .args(["--host-name", name, "--listen", "127.0.0.1:0"])
        .arg("--token-file")
        .arg(token_file)
        .arg("--work-dir")
        .arg(&work_dir)
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log"))
        .stderr(file)
        .process_group(0)
        .spawn()
        .expect("start ftvm agent");
    let mut agent = Agent { name: name.to_owned(), api: String::new(), log, child: Some(child) };
    agent.api = wait_for_api(&mut agent);
    agent
}

/// The agent's first line names its API: `ftvm agent: API on http://127.0.0.1:PORT/v1 (host h1)`.
fn wait_for_api(agent: &mut Agent) -> String {
    let deadline = Instant::now() + START_LIMIT;
    loop {
        let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
        if let Some(at) = log.find("API on http://") {
            let url: String = log[at + "API on ".len()..].chars().take_while(|c| !c.is_whitespace()).collect();
            return url.trim_end_matches('/').trim_end_matches("/v1").to_owned();
        }
        let exited = agent.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
        assert!(exited.is_none(), "agent {} exited ({exited:?}) before serving its API:\n{log}", agent.name);
        assert!(Instant::now() < deadline, "agent {} named no API within {START_LIMIT:?}:\n{log}", agent.name);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One HTTP/1.1 request to `base` (`http://HOST:PORT`) with the token; the status and the
/// JSON body (`null` when the body is empty).
pub fn request(
    base: &str,
    method: &str,
    path: &str,
    token: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), String> {
    let authority = base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(authority).map_err(|e| format!("connect {authority}: {e}"))?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    let payload = body.map(Value::to_string).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nAuthorization: Bearer {token}\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        payload.len()
    );
    stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(payload.as_bytes())).map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    stream.take(MAX_ANSWER_BYTES).read_to_end(&mut answer).map_err(|e| format!("read {method} {path}: {e}"))?;
    parse_answer(&answer).map_err(|e| format!("{method} {path}: {e}"))
}

fn parse_answer(answer: &[u8]) -> Result<(u16, Value), String> {
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").ok_or("no end of headers")?;
    let head = String::from_utf8_lossy(&answer[..split]);
    let mut body = answer[split + 4..].to_vec();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or("no status")?;
    if head.lines().any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.contains("chunked")) {
        body = unchunk(&body)?;
    }
    let value = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(&body).map_err(|e| format!("not JSON ({e}): {}", String::from_utf8_lossy(&body)))?
    };
    Ok((status, value))
}

fn unchunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n").ok_or("a chunk size without its line end")?;
        let size_text = String::from_utf8_lossy(&rest[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("a bad chunk size {size_text:?}"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..size).ok_or("a chunk cut short")?;
        out.extend_from_slice(chunk);
        rest = rest.get(size + 2..).ok_or("a chunk without its line end")?;
    }
}

/// GET a `/v1` path, expecting 200.
pub fn get(base: &str, path: &str, token: &str) -> Result<Value, String> {
    match request(base, "GET", path, token, None)? {
        (200, value) => Ok(value),
        (status, value) => Err(format!("GET {path}: {status} {value}")),
    }
}

/// Ask `f` every 200 ms until it gives `Some`, for at most `limit`.
pub fn poll<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = f() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
