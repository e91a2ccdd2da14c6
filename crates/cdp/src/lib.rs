//! A headless Chromium for tests, driven through the DevTools protocol (CDP): launch it on a
//! scratch profile, open a page, navigate, evaluate JavaScript to read the DOM, take a
//! screenshot, and stop it by its process group when dropped.
//!
//! Why not a crate such as headless_chrome or chromiumoxide: they download a browser build of
//! their own or bring an async runtime, and the few commands a test needs are a page of code
//! over one websocket (tungstenite). The protocol: <https://chromedevtools.github.io/devtools-protocol/>.
//!
//! The browser is Debian's `chromium` (scripts/test installs it), or the program named by
//! `$CHROMIUM`. Every wait has a deadline, and every failure says what Chromium said last.

use base64::Engine as _;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::{self, Read as _};
use std::net::TcpStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

/// The environment variable that names the browser program, when it is not `chromium` on PATH.
pub const PROGRAM_VAR: &str = "CHROMIUM";
/// The largest DevTools message read (a full-page screenshot of a large window is a few MiB).
const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// Events kept while waiting for a reply (the oldest go first); exceptions kept for the test.
const MAX_QUEUED_EVENTS: usize = 1024;
const MAX_EXCEPTIONS: usize = 64;
/// The last bytes of Chromium's stderr quoted in an error.
const STDERR_TAIL_BYTES: u64 = 4096;
/// How often a wait looks again.
const POLL: Duration = Duration::from_millis(50);

/// What goes wrong with the browser; each says its cause once.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{program} not found: install Debian's chromium (scripts/test does) or set ${PROGRAM_VAR} to a Chromium")]
    NotFound { program: PathBuf },
    #[error("starting {program}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{program} exited ({status}) before it opened its DevTools port; its stderr ends:\n{stderr_tail}")]
    Exited { program: PathBuf, status: ExitStatus, stderr_tail: String },
    #[error("{program} opened no DevTools port within {timeout_ms} ms; its stderr ends:\n{stderr_tail}")]
    NoPort { program: PathBuf, timeout_ms: u64, stderr_tail: String },
    #[error("the browser's scratch directory {path}")]
    Scratch {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("connecting to the DevTools websocket {url}")]
    Connect {
        url: String,
        #[source]
        source: io::Error,
    },
    #[error("the DevTools websocket")]
    Websocket(#[source] tungstenite::Error),
    #[error("{method}: no answer within {timeout_ms} ms")]
    Timeout { method: String, timeout_ms: u64 },
    #[error("{method} failed: {message} (code {code})")]
    Protocol { method: String, code: i64, message: String },
    #[error("a DevTools message that does not follow the protocol: {0}")]
    Malformed(String),
    #[error("navigating to {url}: {error_text}")]
    Navigate { url: String, error_text: String },
    #[error("the page threw: {0}")]
    Exception(String),
    #[error("`{expression}` did not hold within {timeout_ms} ms; it last gave {last}")]
    WaitTimeout { expression: String, timeout_ms: u64, last: Value },
    #[error("the screenshot's data is not base64")]
    ScreenshotData(#[source] base64::DecodeError),
    #[error("writing the screenshot to {path}")]
    ScreenshotWrite {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// How the browser is started.
#[derive(Clone, Debug)]
pub struct Options {
    /// The program: `$CHROMIUM`, else `chromium` (found on PATH).
    pub program: PathBuf,
    /// The window (and so the screenshot) in CSS pixels.
    pub window: (u32, u32),
    /// From start to the DevTools port being open (a cold start on a loaded machine takes seconds).
    pub start_timeout: Duration,
    /// Any one command's reply.
    pub command_timeout: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            program: std::env::var_os(PROGRAM_VAR).map_or_else(|| PathBuf::from("chromium"), PathBuf::from),
            window: (1280, 900),
            start_timeout: Duration::from_secs(60),
            command_timeout: Duration::from_secs(30),
        }
    }
}

/// A running headless Chromium with one page attached. Dropping it kills the browser's process
/// group (it is the group's leader) and removes its profile directory.
pub struct Browser {
    child: Child,
    dir: PathBuf,
    ws: WebSocket<TcpStream>,
    /// The flattened session of the one page.
    session: String,
    next_id: u64,
    events: VecDeque<Value>,
    exceptions: Vec<String>,
    command_timeout: Duration,
}

impl Browser {
    /// Start Chromium with the default [`Options`].
    pub fn launch() -> Result<Browser> {
        Browser::launch_with(Options::default())
    }

    /// Start Chromium, connect to its DevTools websocket and open a blank page.
    pub fn launch_with(options: Options) -> Result<Browser> {
        let dir = scratch_dir()?;
        let child = match spawn(&options, &dir) {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        // From here the guard stops the process and removes the directory on any error.
        let mut guard = Launched { child: Some(child), dir: dir.clone() };
        let (port, path) = wait_for_port(&options, guard.child_mut(), &dir)?;
        let url = format!("ws://127.0.0.1:{port}{path}");
        let ws = connect(&url)?;
        let child = guard.child.take().expect("the child is still held");
        let mut browser = Browser {
            child,
            dir,
            ws,
            session: String::new(),
            next_id: 0,
            events: VecDeque::new(),
            exceptions: Vec::new(),
            command_timeout: options.command_timeout,
        };
        browser.attach_page()?;
        Ok(browser)
    }

    /// The browser's process id (also its process group's).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Open `url` in the page and wait for its load event (none when only the #fragment
    /// changes). A network failure (connection refused, a bad host) is an error naming
    /// Chromium's reason.
    pub fn navigate(&mut self, url: &str) -> Result<()> {
        self.events.clear();
        let reply = self.page_command("Page.navigate", json!({ "url": url }))?;
        if let Some(error_text) = reply.get("errorText").and_then(Value::as_str) {
            return Err(Error::Navigate { url: url.to_owned(), error_text: error_text.to_owned() });
        }
        // A same-document navigation (only the #fragment changes) has no loader and no load event.
        if reply.get("loaderId").is_some() {
            self.wait_event("Page.loadEventFired", self.command_timeout)?;
        }
        Ok(())
    }

    /// Evaluate `expression` in the page (awaiting it if it is a promise) and return its value
    /// as JSON (`null` for undefined). An exception thrown by it is an error.
    pub fn evaluate(&mut self, expression: &str) -> Result<Value> {
        let params = json!({ "expression": expression, "returnByValue": true, "awaitPromise": true });
        let reply = self.page_command("Runtime.evaluate", params)?;
        if let Some(details) = reply.get("exceptionDetails") {
            return Err(Error::Exception(exception_text(details)));
        }
        let result = reply.get("result").ok_or_else(|| Error::Malformed(format!("no result: {reply}")))?;
        Ok(result.get("value").cloned().unwrap_or(Value::Null))
    }

    /// Evaluate `expression` until it gives a truthy value (not null, false, 0 or ""), and
    /// return that value; an error if it does not within `timeout`.
    pub fn wait_for(&mut self, expression: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.evaluate(expression)?;
            if truthy(&value) {
                return Ok(value);
            }
            if Instant::now() >= deadline {
                let timeout_ms = millis(timeout);
                return Err(Error::WaitTimeout { expression: expression.to_owned(), timeout_ms, last: value });
            }
            std::thread::sleep(POLL * 2);
        }
    }

    /// A PNG of the page's viewport, also written to `path`.
    pub fn screenshot(&mut self, path: &Path) -> Result<Vec<u8>> {
        let reply = self.page_command("Page.captureScreenshot", json!({ "format": "png" }))?;
        let data = reply.get("data").and_then(Value::as_str).ok_or_else(|| Error::Malformed(format!("{reply}")))?;
        let png = base64::engine::general_purpose::STANDARD.decode(data).map_err(Error::ScreenshotData)?;
        std::fs::write(path, &png).map_err(|source| Error::ScreenshotWrite { path: path.to_owned(), source })?;
        Ok(png)
    }

    /// The uncaught exceptions the page reported so far (read as replies are awaited).
    pub fn exceptions(&self) -> &[String] {
        &self.exceptions
    }

    fn attach_page(&mut self) -> Result<()> {
        let target = self.command(None, "Target.createTarget", json!({ "url": "about:blank" }))?;
        let target_id = str_field(&target, "targetId")?;
        let params = json!({ "targetId": target_id, "flatten": true });
        let attached = self.command(None, "Target.attachToTarget", params)?;
        self.session = str_field(&attached, "sessionId")?;
        self.page_command("Page.enable", json!({}))?;
        self.page_command("Runtime.enable", json!({}))?;
        Ok(())
    }

    fn page_command(&mut self, method: &str, params: Value) -> Result<Value> {
        let session = self.session.clone();
        self.command(Some(&session), method, params)
    }

    /// Send one command and read until its reply, queueing the events that come first.
    fn command(&mut self, session: Option<&str>, method: &str, params: Value) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        self.ws.send(Message::text(message.to_string())).map_err(Error::Websocket)?;
        let deadline = Instant::now() + self.command_timeout;
        loop {
            let Some(message) = self.read_until(deadline)? else {
                return Err(Error::Timeout { method: method.to_owned(), timeout_ms: millis(self.command_timeout) });
            };
            if message.get("id").and_then(Value::as_u64) != Some(id) {
                self.keep_event(message);
                continue;
            }
            if let Some(error) = message.get("error") {
                let code = error.get("code").and_then(Value::as_i64).unwrap_or(0);
                let text = error.get("message").and_then(Value::as_str).unwrap_or("(no message)");
                return Err(Error::Protocol { method: method.to_owned(), code, message: text.to_owned() });
            }
            return Ok(message.get("result").cloned().unwrap_or(Value::Null));
        }
    }

    /// Wait for an event of this page named `method` (one already queued counts).
    fn wait_event(&mut self, method: &str, timeout: Duration) -> Result<Value> {
        let is_it = |event: &Value, session: &str| {
            event.get("method").and_then(Value::as_str) == Some(method)
                && event.get("sessionId").and_then(Value::as_str) == Some(session)
        };
        if let Some(at) = self.events.iter().position(|e| is_it(e, &self.session)) {
            return Ok(self.events.remove(at).expect("the position is in the queue"));
        }
        let deadline = Instant::now() + timeout;
        while let Some(message) = self.read_until(deadline)? {
            if is_it(&message, &self.session) {
                return Ok(message);
            }
            self.keep_event(message);
        }
        Err(Error::Timeout { method: method.to_owned(), timeout_ms: millis(timeout) })
    }

    fn keep_event(&mut self, event: Value) {
        if event.get("method").and_then(Value::as_str) == Some("Runtime.exceptionThrown") {
            if self.exceptions.len() < MAX_EXCEPTIONS {
                let details = &event["params"]["exceptionDetails"];
                self.exceptions.push(exception_text(details));
            }
            return;
        }
        if self.events.len() == MAX_QUEUED_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    /// The next JSON message, or `None` at the deadline.
    fn read_until(&mut self, deadline: Instant) -> Result<Option<Value>> {
        loop {
            match self.ws.read() {
                Ok(Message::Text(text)) => {
                    let value = serde_json::from_str(text.as_str()).map_err(|e| Error::Malformed(e.to_string()))?;
                    return Ok(Some(value));
                }
                Ok(_) => continue, // pings are answered by tungstenite; nothing else is expected
                Err(tungstenite::Error::Io(e)) if timed_out(&e) => {
                    if Instant::now() >= deadline {
                        return Ok(None);
                    }
                }
                Err(e) => return Err(Error::Websocket(e)),
            }
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        stop(&mut self.child, &self.dir);
    }
}

/// A started browser not yet connected: stopped and cleaned up if the launch fails.
struct Launched {
    child: Option<Child>,
    dir: PathBuf,
}

impl Launched {
    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("the child is held until the launch succeeds")
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop(&mut child, &self.dir);
        }
    }
}

/// Kill the browser's whole process group (renderers, GPU process, crash handler) by its
/// leader's PID, reap the leader, and remove the profile.
fn stop(child: &mut Child, dir: &Path) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let _ = child.wait();
    // The children die with the group; their last writes into the profile may race the removal.
    for _ in 0..20 {
        if std::fs::remove_dir_all(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(POLL);
    }
}

fn scratch_dir() -> Result<PathBuf> {
    static COUNT: AtomicU32 = AtomicU32::new(0);
    let n = COUNT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("cdp-chromium-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("home")).map_err(|source| Error::Scratch { path: dir.clone(), source })?;
    Ok(dir)
}

/// Chromium in its own process group, its profile and HOME in `dir`, its stderr in a file there.
/// The flags keep it headless, unsandboxed (the tests run as root, and the page is our own) and
/// quiet on the network: no component updates, sync, metrics or other background requests, and
/// no host name resolved.
fn spawn(options: &Options, dir: &Path) -> Result<Child> {
    let stderr_path = dir.join("stderr.log");
    let stderr = std::fs::File::create(&stderr_path).map_err(|source| Error::Scratch { path: stderr_path, source })?;
    let (width, height) = options.window;
    let mut command = Command::new(&options.program);
    command
        .arg("--headless=new")
        .arg("--remote-debugging-port=0")
        .arg("--remote-debugging-address=127.0.0.1")
        .arg(format!("--user-data-dir={}", dir.join("profile").display()))
        .arg(format!("--window-size={width},{height}"))
        .args([
            "--no-sandbox",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-domain-reliability",
            "--disable-breakpad",
            "--metrics-recording-only",
            "--no-pings",
            "--mute-audio",
            // It still asks for component updates (clients2.google.com, update.googleapis.com)
            // despite the flags above: no name but loopback resolves, so it sends nothing off the machine.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
            "about:blank",
        ])
        .env("HOME", dir.join("home"))
        .env("XDG_CONFIG_HOME", dir.join("home"))
        .env("XDG_CACHE_HOME", dir.join("home"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .process_group(0);
    command.spawn().map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => Error::NotFound { program: options.program.clone() },
        _ => Error::Spawn { program: options.program.clone(), source },
    })
}

/// Chromium writes the port it chose, and the browser target's path, to DevToolsActivePort
/// in its profile once it listens.
fn wait_for_port(options: &Options, child: &mut Child, dir: &Path) -> Result<(u16, String)> {
    let file = dir.join("profile").join("DevToolsActivePort");
    let deadline = Instant::now() + options.start_timeout;
    loop {
        if let Ok(text) = std::fs::read_to_string(&file) {
            let mut lines = text.lines();
            let port = lines.next().and_then(|l| l.trim().parse::<u16>().ok());
            let path = lines.next().map(str::trim).filter(|p| p.starts_with("/devtools/"));
            if let (Some(port), Some(path)) = (port, path) {
                return Ok((port, path.to_owned()));
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            let stderr_tail = stderr_tail(dir);
            return Err(Error::Exited { program: options.program.clone(), status, stderr_tail });
        }
        if Instant::now() >= deadline {
            let timeout_ms = millis(options.start_timeout);
            return Err(Error::NoPort { program: options.program.clone(), timeout_ms, stderr_tail: stderr_tail(dir) });
        }
        std::thread::sleep(POLL);
    }
}

fn connect(url: &str) -> Result<WebSocket<TcpStream>> {
    let connect_error = |source| Error::Connect { url: url.to_owned(), source };
    let authority = url.trim_start_matches("ws://").split('/').next().unwrap_or_default();
    let stream = TcpStream::connect(authority).map_err(connect_error)?;
    // A short read timeout lets every wait check its own deadline.
    stream.set_read_timeout(Some(POLL)).map_err(connect_error)?;
    stream.set_nodelay(true).map_err(connect_error)?;
    let config = WebSocketConfig::default().max_message_size(Some(MAX_MESSAGE_BYTES));
    let mut pending = tungstenite::client::client_with_config(url, stream, Some(config));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match pending {
            Ok((ws, _response)) => return Ok(ws),
            Err(tungstenite::HandshakeError::Failure(e)) => return Err(Error::Websocket(e)),
            Err(tungstenite::HandshakeError::Interrupted(mid)) => {
                if Instant::now() >= deadline {
                    return Err(Error::Timeout { method: "the websocket handshake".into(), timeout_ms: 10_000 });
                }
                pending = mid.handshake();
            }
        }
    }
}

fn stderr_tail(dir: &Path) -> String {
    use std::io::{Seek as _, SeekFrom};
    let Ok(mut file) = std::fs::File::open(dir.join("stderr.log")) else { return String::new() };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(STDERR_TAIL_BYTES)));
    let mut tail = Vec::new();
    let _ = file.take(STDERR_TAIL_BYTES).read_to_end(&mut tail);
    String::from_utf8_lossy(&tail).into_owned()
}

fn exception_text(details: &Value) -> String {
    let description = details.get("exception").and_then(|e| e.get("description")).and_then(Value::as_str);
    let text = details.get("text").and_then(Value::as_str);
    description.or(text).unwrap_or("(no description)").to_owned()
}

fn str_field(value: &Value, name: &str) -> Result<String> {
    let field = value.get(name).and_then(Value::as_str);
    field.map(str::to_owned).ok_or_else(|| Error::Malformed(format!("no {name} in {value}")))
}

fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}

fn timed_out(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truthiness_follows_javascript() {
        assert!(!truthy(&json!(null)) && !truthy(&json!(false)) && !truthy(&json!(0)) && !truthy(&json!("")));
        assert!(truthy(&json!(true)) && truthy(&json!(2)) && truthy(&json!("x")) && truthy(&json!([])));
    }

    #[test]
    fn an_exception_is_told_by_its_description() {
        let details = json!({ "text": "Uncaught", "exception": { "description": "ReferenceError: x is not defined" } });
        assert_eq!(exception_text(&details), "ReferenceError: x is not defined");
        assert_eq!(exception_text(&json!({ "text": "Uncaught" })), "Uncaught");
    }
}
