//! The control API of a running VM: HTTP/1.1 with JSON bodies over a Unix socket
//! (Firecracker's API socket is the model). A small server, because the protocol
//! needed is tiny: one request per connection, bounded sizes, `Connection: close`.
//!
//! | method | path        | body               | answer                        |
//! |--------|-------------|--------------------|-------------------------------|
//! | GET    | /status     |                    | role, mode, icount, epoch...  |
//! | PUT    | /pause      |                    | {"state":"paused"}            |
//! | PUT    | /resume     |                    | {"state":"running"}           |
//! | PUT    | /snapshot   | {"path": "FILE"}   | {"path":..., "bytes":...}     |
//! | PUT    | /stop       |                    | {"state":"stopped"}           |
//! | GET    | /metrics    |                    | Prometheus text (not JSON)    |
//! | PUT    | /protect    | {"to": "HOST:PORT", "key": "FILE", "epoch_ms": N, "on_backup_loss": "continue"\|"hold"} | {"state":"protecting",...} |
//! | PUT    | /unprotect  |                    | {"state":"unprotected",...}   |
//! | PUT    | /migrate    | {"to": "HOST:PORT", "key": "FILE", "epoch_ms": N} | {"state":"migrated","migration":{...}} once handed over |
//! | PUT    | /rejuvenate |                    | {"handover": N,...} (`--resilient`) |
//! | PUT    | /upgrade    | {"binary": "PATH"} | {"handover": N,...} (`--resilient`) |
//!
//! Requests reach the VM's driver as [`HostEvent::Control`] and are answered between
//! two run slices, so a reply always describes a consistent machine. `/metrics` renders
//! the typed status ([`vmm::status::Status`]) as Prometheus text ([`vmm::metrics`]); the
//! same text is served over TCP by `--metrics-listen` ([`crate::metrics_http`]).

use crate::accept::Open;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::time::Duration;
use vmm::host::HostEvent;

/// Limits on what a client may send.
const MAX_HEADER_BYTES: usize = 8 * 1024;
const MAX_BODY_BYTES: usize = 64 * 1024;
/// How long a client may take to send its request, and the VM to answer.
pub(crate) const IO_TIMEOUT: Duration = Duration::from_secs(10);
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);
/// Requests served at once; more are closed at accept (see [`crate::accept`]).
const MAX_CONNECTIONS: usize = 64;

pub use vmm::control::{Command, ControlRequest, HandoverRequest, MigrateRequest, ProtectMode, ProtectRequest, Reply};

/// The epoch lengths `protect` accepts, as `ftvm run --epoch-ms`.
pub const EPOCH_MS_RANGE: std::ops::RangeInclusive<u64> = 1..=10_000;
/// The longest lockstep digest interval `protect` accepts (an hour; 0 turns the check off).
pub const MAX_LOCKSTEP_DIGEST_MS: u64 = 3_600_000;

/// The listening socket; removed when dropped, once the answers being written (say,
/// to the `stop` that ends the VM) have gone out.
pub struct ApiServer {
    /// The socket's path, removed on drop (None: a keeper owns it, `--resilient`).
    path: Option<PathBuf>,
    in_flight: Open,
}

/// How long dropping the server waits for answers still being written.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

impl Drop for ApiServer {
    fn drop(&mut self) {
        let deadline = std::time::Instant::now() + DRAIN_TIMEOUT;
        while self.in_flight.count() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Bind `path` and answer requests on a thread, forwarding them to `events`.
pub fn serve(path: &Path, events: Sender<HostEvent>) -> Result<ApiServer> {
    let listener = bind(path)?;
    Ok(serve_listener(listener, Some(path.to_path_buf()), events))
}

/// Bind the API socket at `path` (a stale socket file is replaced; a live one refused).
pub fn bind(path: &Path) -> Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            bail!("API socket {} is in use by another running VM", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("cannot remove stale API socket {}", path.display()))?;
    }
    UnixListener::bind(path).with_context(|| format!("cannot create API socket {}", path.display()))
}

/// Answer requests on a socket already bound (by a keeper, when `path` is None: requests
/// wait in its backlog while no monitor runs).
pub fn serve_listener(listener: UnixListener, path: Option<PathBuf>, events: Sender<HostEvent>) -> ApiServer {
    let in_flight = Open::default();
    let open = in_flight.clone();
    std::thread::spawn(move || {
        crate::accept::serve(listener.incoming(), MAX_CONNECTIONS, open, move |stream| {
            let _ = handle_connection(stream, &events);
        })
    });
    ApiServer { path, in_flight }
}

fn handle_connection(mut stream: UnixStream, events: &Sender<HostEvent>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let answer = match read_request(&mut stream) {
        Ok(r) if r.target == "/metrics" && r.method == "GET" => metrics(events),
        Ok(r) => match route(&r.method, &r.target, &r.body) {
            Ok(command) => Answer::from(ask_vm(command, events)),
            Err(reply) => Answer::from(reply),
        },
        Err(message) => Answer::from(Reply::error(400, message)),
    };
    answer.write(&mut stream)
}

/// An answer as it goes on the wire.
pub(crate) struct Answer {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// The methods a 405 answer allows.
    pub allow: Option<&'static str>,
}

impl From<Reply> for Answer {
    fn from(reply: Reply) -> Answer {
        let body = serde_json::to_vec(&reply.body).expect("JSON values serialize");
        Answer { status: reply.status, content_type: "application/json", body, allow: None }
    }
}

impl Answer {
    pub fn text(status: u16, text: impl Into<String>) -> Answer {
        let body = text.into().into_bytes();
        Answer { status, content_type: "text/plain; charset=utf-8", body, allow: None }
    }

    pub fn write(&self, stream: &mut impl Write) -> std::io::Result<()> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            409 => "Conflict",
            500 => "Internal Server Error",
            503 => "Service Unavailable",
            504 => "Gateway Timeout",
            _ => "Error",
        };
        let allow = self.allow.map(|a| format!("Allow: {a}\r\n")).unwrap_or_default();
        write!(
            stream,
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
            self.status,
            self.content_type,
            self.body.len()
        )?;
        stream.write_all(&self.body)?;
        stream.flush()
    }
}

/// `GET /metrics`: the VM's status as Prometheus text.
pub(crate) fn metrics(events: &Sender<HostEvent>) -> Answer {
    let reply = ask_vm(Command::Status, events);
    if reply.status != 200 {
        return Answer::from(reply);
    }
    match serde_json::from_value::<vmm::status::Status>(reply.body) {
        Ok(status) => Answer {
            status: 200,
            content_type: vmm::metrics::CONTENT_TYPE,
            body: vmm::metrics::render(&status).into_bytes(),
            allow: None,
        },
        Err(e) => Answer::from(Reply::error(500, format!("the VM's status does not parse: {e}"))),
    }
}

fn ask_vm(command: Command, events: &Sender<HostEvent>) -> Reply {
    let (tx, rx) = mpsc::channel();
    if events.send(HostEvent::Control(ControlRequest { command, reply: tx })).is_err() {
        return Reply::error(503, "the VM has stopped");
    }
    rx.recv_timeout(REPLY_TIMEOUT).unwrap_or_else(|_| Reply::error(504, "the VM did not answer in time"))
}

/// One request as read from a client.
pub(crate) struct Request {
    pub method: String,
    pub target: String,
    /// Header names as sent; look them up with [`Request::header`].
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// The value of header `name` (case-insensitive), trimmed.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A socket whose reads can be bounded in time (TCP and Unix streams alike).
pub(crate) trait TimedRead: Read {
    fn set_read_deadline_in(&self, timeout: Duration) -> std::io::Result<()>;
}

impl TimedRead for &mut UnixStream {
    fn set_read_deadline_in(&self, timeout: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(timeout))
    }
}

impl TimedRead for &mut std::net::TcpStream {
    fn set_read_deadline_in(&self, timeout: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(timeout))
    }
}

/// Reads from `stream` until a fixed instant: each read gets the time that is left, so that
/// a client sending a byte now and then (a slowloris) cannot hold its slot past
/// [`IO_TIMEOUT`] in all, where a timeout per read alone would let it hold the slot forever.
struct Deadline<S> {
    stream: S,
    until: std::time::Instant,
    limit: Duration,
}

impl<S: TimedRead> Read for Deadline<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let late = || {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the request was not complete within {} ms", self.limit.as_millis()),
            )
        };
        let left = self.until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(late());
        }
        self.stream.set_read_deadline_in(left)?;
        // A socket's read timeout shows as EAGAIN ("Resource temporarily unavailable").
        self.stream.read(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => late(),
            _ => e,
        })
    }
}

/// Read one request, all of it within [`IO_TIMEOUT`]. Errors are messages for a 400 answer.
/// Nothing past the body is read (a console upgrade's pipe starts right after it only once
/// the answer has gone out, so a buffered read-ahead loses nothing).
pub(crate) fn read_request(stream: impl TimedRead) -> Result<Request, String> {
    read_request_within(stream, IO_TIMEOUT)
}

fn read_request_within(stream: impl TimedRead, limit: Duration) -> Result<Request, String> {
    let deadline = Deadline { stream, until: std::time::Instant::now() + limit, limit };
    let mut reader = BufReader::new(deadline.take((MAX_HEADER_BYTES + MAX_BODY_BYTES) as u64));
    let mut header_bytes = 0;
    let mut line = String::new();
    let mut next_line = |reader: &mut BufReader<_>, line: &mut String| -> Result<(), String> {
        line.clear();
        let n = reader.read_line(line).map_err(|e| format!("cannot read request: {e}"))?;
        header_bytes += n;
        if n == 0 {
            return Err("connection closed before the request was complete".into());
        }
        if header_bytes > MAX_HEADER_BYTES {
            return Err(format!("request headers exceed {MAX_HEADER_BYTES} bytes"));
        }
        Ok(())
    };
    next_line(&mut reader, &mut line)?;
    let mut parts = line.split_whitespace();
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    let (Some(method), Some(target), Some(version)) = (method, target, version) else {
        return Err(format!("malformed request line {:?}", line.trim_end()));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(format!("unsupported protocol {version:?}; HTTP/1.1 expected"));
    }
    let (method, target) = (method.to_string(), target.to_string());
    let mut headers = Vec::new();
    loop {
        next_line(&mut reader, &mut line)?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let Some((name, value)) = header.split_once(':') else {
            return Err(format!("malformed header line {header:?}"));
        };
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    let mut request = Request { method, target, headers, body: Vec::new() };
    let content_length = match request.header("content-length") {
        None => 0,
        Some(value) => value.parse::<usize>().map_err(|_| format!("bad Content-Length {value:?}"))?,
    };
    if content_length > MAX_BODY_BYTES {
        return Err(format!("request body of {content_length} bytes exceeds {MAX_BODY_BYTES}"));
    }
    request.body = vec![0; content_length];
    reader.read_exact(&mut request.body).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => "request body shorter than its Content-Length".to_string(),
        _ => format!("cannot read the request body: {e}"),
    })?;
    Ok(request)
}

/// Map a request onto a command, or answer it with an error.
pub fn route(method: &str, target: &str, body: &[u8]) -> Result<Command, Reply> {
    let command = match target {
        // GET /metrics is answered before routing (its answer is text, not a reply).
        "/" | "/status" | "/metrics" => Command::Status,
        "/pause" => Command::Pause,
        "/resume" => Command::Resume,
        "/stop" => Command::Stop,
        "/unprotect" => Command::Unprotect,
        "/protect" => Command::Protect(protect_request(body)?),
        "/migrate" => {
            let p = protect_request(body)?;
            Command::Migrate(MigrateRequest { to: p.to, key: p.key, epoch_ms: p.epoch_ms })
        }
        "/rejuvenate" => Command::Handover(HandoverRequest::Rejuvenate),
        "/upgrade" => {
            let value: Value =
                serde_json::from_slice(body).map_err(|e| Reply::error(400, format!("body is not JSON: {e}")))?;
            let binary = value
                .get("binary")
                .and_then(Value::as_str)
                .ok_or_else(|| Reply::error(400, "body needs {\"binary\": \"PATH\"}"))?;
            Command::Handover(HandoverRequest::Upgrade { binary: PathBuf::from(binary) })
        }
        "/snapshot" => {
            let value: Value =
                serde_json::from_slice(body).map_err(|e| Reply::error(400, format!("body is not JSON: {e}")))?;
            let path = value
                .get("path")
                .and_then(Value::as_str)
                .ok_or_else(|| Reply::error(400, "body needs {\"path\": \"FILE\"}"))?;
            Command::Snapshot { path: PathBuf::from(path) }
        }
        _ => return Err(Reply::error(404, format!("no such resource {target}; see `ftvm ctl --help`"))),
    };
    let expected = if command == Command::Status { "GET" } else { "PUT" };
    if method != expected {
        return Err(Reply::error(405, format!("{target} takes {expected}, not {method}")));
    }
    Ok(command)
}

/// The body of `PUT /protect`.
fn protect_request(body: &[u8]) -> Result<ProtectRequest, Reply> {
    let value: Value = serde_json::from_slice(body).map_err(|e| Reply::error(400, format!("body is not JSON: {e}")))?;
    let text = |field: &str| value.get(field).and_then(Value::as_str);
    let usage = "body needs {\"to\": \"HOST:PORT\", \"key\": \"FILE\"} (optional: \"epoch_ms\", \"on_backup_loss\", \
                 \"mode\", \"lockstep_digest_ms\")";
    let (Some(to), Some(key)) = (text("to"), text("key")) else {
        return Err(Reply::error(400, usage));
    };
    let epoch_ms = match value.get("epoch_ms") {
        None => 25,
        Some(v) => v.as_u64().filter(|ms| EPOCH_MS_RANGE.contains(ms)).ok_or_else(|| {
            Reply::error(400, format!("epoch_ms must be a whole number of milliseconds in {EPOCH_MS_RANGE:?}"))
        })?,
    };
    let on_backup_loss = match value.get("on_backup_loss") {
        None => replica::BackupLossPolicy::Continue,
        Some(v) if v == "continue" => replica::BackupLossPolicy::Continue,
        Some(v) if v == "hold" => replica::BackupLossPolicy::Hold,
        Some(v) => return Err(Reply::error(400, format!("on_backup_loss must be \"continue\" or \"hold\", not {v}"))),
    };
    let digest_every_ms = match value.get("lockstep_digest_ms") {
        None => replica::lockstep::LeaderConfig::default().digest_every_ms,
        Some(v) => v.as_u64().filter(|ms| *ms <= MAX_LOCKSTEP_DIGEST_MS).ok_or_else(|| {
            Reply::error(
                400,
                format!("lockstep_digest_ms must be a whole number of milliseconds up to {MAX_LOCKSTEP_DIGEST_MS}"),
            )
        })?,
    };
    let mode = match value.get("mode") {
        None => ProtectMode::Checkpoint,
        Some(v) if v == "checkpoint" => ProtectMode::Checkpoint,
        Some(v) if v == "lockstep" => ProtectMode::Lockstep { digest_every_ms },
        Some(v) => return Err(Reply::error(400, format!("mode must be \"checkpoint\" or \"lockstep\", not {v}"))),
    };
    Ok(ProtectRequest { to: to.to_string(), key: PathBuf::from(key), epoch_ms, on_backup_loss, mode })
}

/// The client side: send one request and return the reply.
pub fn request(socket: &Path, command: &Command) -> Result<Reply> {
    let stream = UnixStream::connect(socket).with_context(|| {
        format!("cannot connect to the API socket {} (is the VM running with --api?)", socket.display())
    })?;
    stream.set_read_timeout(Some(REPLY_TIMEOUT + IO_TIMEOUT))?;
    let (method, target, body) = match command {
        Command::Status => ("GET", "/status", Vec::new()),
        Command::Pause => ("PUT", "/pause", Vec::new()),
        Command::Resume => ("PUT", "/resume", Vec::new()),
        Command::Stop => ("PUT", "/stop", Vec::new()),
        Command::Unprotect => ("PUT", "/unprotect", Vec::new()),
        Command::Handover(HandoverRequest::Rejuvenate) => ("PUT", "/rejuvenate", Vec::new()),
        Command::Handover(HandoverRequest::Upgrade { binary }) => {
            ("PUT", "/upgrade", serde_json::to_vec(&json!({ "binary": binary })).expect("serializes"))
        }
        Command::Snapshot { path } => {
            ("PUT", "/snapshot", serde_json::to_vec(&json!({ "path": path })).expect("serializes"))
        }
        Command::Migrate(m) => {
            let body = json!({ "to": m.to, "key": m.key, "epoch_ms": m.epoch_ms });
            ("PUT", "/migrate", serde_json::to_vec(&body).expect("serializes"))
        }
        Command::Protect(p) => {
            let on_backup_loss = match p.on_backup_loss {
                replica::BackupLossPolicy::Continue => "continue",
                replica::BackupLossPolicy::Hold => "hold",
            };
            let mut body =
                json!({ "to": p.to, "key": p.key, "epoch_ms": p.epoch_ms, "on_backup_loss": on_backup_loss });
            body["mode"] = p.mode.name().into();
            if let ProtectMode::Lockstep { digest_every_ms } = p.mode {
                body["lockstep_digest_ms"] = digest_every_ms.into();
            }
            ("PUT", "/protect", serde_json::to_vec(&body).expect("serializes"))
        }
    };
    let mut request = format!(
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    parse_response(&exchange(stream, &request)?)
}

/// Sends `request` and reads the whole answer. A server that closes without a word has
/// every slot taken ([`MAX_CONNECTIONS`]) or has just stopped: said so, rather than as a
/// bare reset.
fn exchange(mut stream: UnixStream, request: &[u8]) -> Result<Vec<u8>> {
    let busy = || {
        anyhow::anyhow!(
            "the VM's API closed the connection without answering: either {MAX_CONNECTIONS} requests, its limit, \
             are open at once (retry, or look for a client holding connections), or the VM has just stopped"
        )
    };
    let closed =
        |e: &std::io::Error| matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe);
    match stream.write_all(request) {
        Err(e) if closed(&e) => return Err(busy()),
        other => other.context("cannot send the request to the API")?,
    }
    let mut response = Vec::new();
    match stream.read_to_end(&mut response) {
        Err(e) if closed(&e) => return Err(busy()),
        other => other.context("cannot read the API's answer")?,
    };
    if response.is_empty() {
        return Err(busy());
    }
    Ok(response)
}

/// The client side of `GET /metrics`: the Prometheus text.
pub fn metrics_text(socket: &Path) -> Result<String> {
    let stream = UnixStream::connect(socket).with_context(|| {
        format!("cannot connect to the API socket {} (is the VM running with --api?)", socket.display())
    })?;
    stream.set_read_timeout(Some(REPLY_TIMEOUT + IO_TIMEOUT))?;
    let response = exchange(stream, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").context("malformed answer from the API (no header end)")?;
    if !head.starts_with("HTTP/1.1 200") {
        let reply = parse_response(&response)?;
        let message = reply.body.get("error").and_then(|e| e.as_str()).unwrap_or("unknown error").to_string();
        bail!("the VM refused: {message} (HTTP {})", reply.status);
    }
    Ok(body.to_string())
}

fn parse_response(response: &[u8]) -> Result<Reply> {
    let text = String::from_utf8_lossy(response);
    let (head, body) = text.split_once("\r\n\r\n").context("malformed answer from the API (no header end)")?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("malformed answer from the API (no status)")?;
    let body = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).context("the API's answer is not JSON")?
    };
    Ok(Reply { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request written by `client` (on a thread) over a real Unix socket pair, read
    /// with `limit`.
    fn read_written(limit: Duration, client: impl FnOnce(UnixStream) + Send + 'static) -> Result<Request, String> {
        let (mut server, other) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || client(other));
        let request = read_request_within(&mut server, limit);
        drop(server);
        writer.join().unwrap();
        request
    }

    #[test]
    fn a_request_in_pieces_is_read_whole_with_its_headers() {
        let request = read_written(Duration::from_secs(10), |mut c| {
            for piece in
                ["PUT /snap", "shot HTTP/1.1\r\nAuthor", "ization: Bearer x\r\nContent-Length: 4\r\n\r\n", "{}\r\n"]
            {
                c.write_all(piece.as_bytes()).unwrap();
                std::thread::sleep(Duration::from_millis(30));
            }
        })
        .unwrap();
        assert_eq!((request.method.as_str(), request.target.as_str()), ("PUT", "/snapshot"));
        assert_eq!(request.header("AUTHORIZATION"), Some("Bearer x"));
        assert_eq!(request.body, b"{}\r\n");
    }

    #[test]
    fn a_client_trickling_bytes_is_cut_off_at_the_deadline_for_the_whole_request() {
        let started = std::time::Instant::now();
        let error = read_written(Duration::from_millis(400), |mut c| {
            // A byte every 50 ms: each read is quick, the request never ends.
            for byte in b"GET /status HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
                if c.write_all(&[*byte]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
        .err()
        .unwrap();
        assert!(error.contains("the request was not complete within 400 ms"), "{error}");
        assert!(started.elapsed() < Duration::from_secs(2), "held for {:?}", started.elapsed());
    }

    #[test]
    fn malformed_requests_say_what_is_wrong() {
        let read = |text: &'static str| {
            read_written(Duration::from_secs(10), move |mut c| {
                let _ = c.write_all(text.as_bytes());
            })
            .err()
            .unwrap()
        };
        assert_eq!(read("GET /status HTTP/1.1\r\nno colon here\r\n\r\n"), r#"malformed header line "no colon here""#);
        assert_eq!(read("GET /status HTTP/1.1\r\nContent-Length: x\r\n\r\n"), r#"bad Content-Length "x""#);
        assert_eq!(read("GET /status SPDY/3\r\n\r\n"), r#"unsupported protocol "SPDY/3"; HTTP/1.1 expected"#);
        assert_eq!(
            read("PUT /stop HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc"),
            "request body shorter than its Content-Length"
        );
        assert_eq!(read("GET /status HTTP/1.1\r\n"), "connection closed before the request was complete");
    }

    #[test]
    fn routes_map_methods_and_paths() {
        assert_eq!(route("GET", "/status", b""), Ok(Command::Status));
        assert_eq!(route("PUT", "/pause", b""), Ok(Command::Pause));
        assert_eq!(route("PUT", "/snapshot", br#"{"path":"/tmp/s"}"#), Ok(Command::Snapshot { path: "/tmp/s".into() }));
        assert_eq!(route("GET", "/pause", b"").unwrap_err().status, 405);
        assert_eq!(route("GET", "/nope", b"").unwrap_err().status, 404);
        assert_eq!(route("PUT", "/snapshot", b"{").unwrap_err().status, 400);
        assert_eq!(route("PUT", "/snapshot", b"{}").unwrap_err().status, 400);
        assert_eq!(route("PUT", "/unprotect", b""), Ok(Command::Unprotect));
        assert_eq!(route("GET", "/unprotect", b"").unwrap_err().status, 405);
    }

    #[test]
    fn a_protect_request_names_the_backup_and_the_key_and_checks_the_rest() {
        let protect = route("PUT", "/protect", br#"{"to":"10.0.0.2:7000","key":"/k"}"#).unwrap();
        let expected = ProtectRequest {
            to: "10.0.0.2:7000".into(),
            key: "/k".into(),
            epoch_ms: 25,
            on_backup_loss: replica::BackupLossPolicy::Continue,
            mode: ProtectMode::Checkpoint,
        };
        assert_eq!(protect, Command::Protect(expected.clone()));
        let body = br#"{"to":"10.0.0.2:7000","key":"/k","epoch_ms":50,"on_backup_loss":"hold"}"#;
        let hold = ProtectRequest { epoch_ms: 50, on_backup_loss: replica::BackupLossPolicy::Hold, ..expected.clone() };
        assert_eq!(route("PUT", "/protect", body), Ok(Command::Protect(hold)));
        let refused = |body: &[u8]| route("PUT", "/protect", body).unwrap_err();
        assert!(refused(br#"{"key":"/k"}"#).body["error"].as_str().unwrap().contains("HOST:PORT"));
        assert!(refused(br#"{"to":"a:1","key":"/k","epoch_ms":0}"#).body["error"]
            .as_str()
            .unwrap()
            .contains("epoch_ms"));
        let bad_policy = refused(br#"{"to":"a:1","key":"/k","on_backup_loss":"pray"}"#);
        assert_eq!(bad_policy.body["error"], r#"on_backup_loss must be "continue" or "hold", not "pray""#);
        assert_eq!(route("GET", "/protect", br#"{"to":"a:1","key":"/k"}"#).unwrap_err().status, 405);
        let body = br#"{"to":"10.0.0.2:7000","key":"/k","mode":"lockstep","lockstep_digest_ms":100}"#;
        let lockstep = ProtectRequest { mode: ProtectMode::Lockstep { digest_every_ms: 100 }, ..expected.clone() };
        assert_eq!(route("PUT", "/protect", body), Ok(Command::Protect(lockstep)));
        let body = br#"{"to":"10.0.0.2:7000","key":"/k","mode":"lockstep"}"#;
        let default_digest = ProtectRequest { mode: ProtectMode::Lockstep { digest_every_ms: 250 }, ..expected };
        assert_eq!(route("PUT", "/protect", body), Ok(Command::Protect(default_digest)));
        let bad_mode = refused(br#"{"to":"a:1","key":"/k","mode":"voting"}"#);
        assert_eq!(bad_mode.body["error"], r#"mode must be "checkpoint" or "lockstep", not "voting""#);
        let bad_digest = refused(br#"{"to":"a:1","key":"/k","mode":"lockstep","lockstep_digest_ms":-1}"#);
        assert!(bad_digest.body["error"].as_str().unwrap().starts_with("lockstep_digest_ms must be"), "{bad_digest:?}");
    }

    #[test]
    fn a_migrate_request_names_the_destination_and_the_key() {
        let migrate = route("PUT", "/migrate", br#"{"to":"10.0.0.2:7000","key":"/k","epoch_ms":10}"#).unwrap();
        let expected = MigrateRequest { to: "10.0.0.2:7000".into(), key: "/k".into(), epoch_ms: 10 };
        assert_eq!(migrate, Command::Migrate(expected));
        assert_eq!(route("PUT", "/migrate", br#"{"key":"/k"}"#).unwrap_err().status, 400);
        assert_eq!(route("GET", "/migrate", br#"{"to":"a:1","key":"/k"}"#).unwrap_err().status, 405);
    }

    #[test]
    fn responses_are_parsed() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{\"a\":true}\n").unwrap();
        assert_eq!(r, Reply::ok(json!({"a": true})));
        assert!(parse_response(b"garbage").is_err());
    }
}
