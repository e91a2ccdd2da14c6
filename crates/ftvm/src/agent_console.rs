//! A VM's console, through any agent, two ways:
//! - `POST /v1/vms/NAME/console` with `Upgrade: ftvm-console` (`ftvm vm console`): the agent
//!   answers `101 Switching Protocols` and the connection becomes a raw byte pipe both ways
//!   (as `docker attach` hijacks its HTTP connection);
//! - `GET /v1/vms/NAME/console` as a WebSocket (RFC 6455; the dashboard's console pane: a
//!   browser can send neither that Upgrade nor an Authorization header on a WebSocket, so the
//!   token may come as `?access_token=`, RFC 6750 §2.3): each binary or text message is typed,
//!   what the guest prints comes back as binary messages.
//!
//! Either way, what the client sends is typed on the guest's console and what the guest prints
//! comes back. The agent that runs the VM's primary connects it to that replica's
//! `--console-socket`; any other agent passes the request on to that host's agent as a raw
//! pipe, once (a request already passed on is never passed again, so two agents that disagree
//! about where the primary is cannot bounce it between them). A WebSocket ends at the agent the
//! browser reached, which frames the raw bytes.

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// The protocol named in `Upgrade:`.
pub const UPGRADE: &str = "ftvm-console";
/// The longest WebSocket message (and frame) taken from a browser: keystrokes and pastes.
const MAX_WS_MESSAGE_BYTES: usize = 64 << 10;
/// How long the WebSocket pump waits for the browser before it looks at the guest's output.
const WS_POLL: Duration = Duration::from_millis(20);
/// A browser that takes no output for this long is dropped.
const WS_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Marks a request one agent passed on to another.
pub const HOP_HEADER: &str = "X-Ftvm-Console-Hop";
/// Names the host whose replica the console belongs to, in the 101 answer.
pub const HOST_HEADER: &str = "X-Ftvm-Host";
/// Consoles attached through one agent at once (beside the API's own connection limit).
const MAX_SESSIONS: usize = 16;
/// The longest answer head read from another agent.
const MAX_HEAD_BYTES: usize = 8192;
/// Connecting to, and hearing back from, the agent that runs the primary.
const HOP_TIMEOUT: Duration = Duration::from_secs(5);

static SESSIONS: AtomicUsize = AtomicUsize::new(0);

/// Where the VM's primary runs, as the store says.
pub struct Target {
    pub vm: String,
    pub uid: u64,
    pub host: String,
    /// `http://HOST:PORT` of that host's agent.
    pub api: String,
    /// The primary's process on that host, if reported.
    pub pid: Option<u32>,
}

/// How a console request wants its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protocol {
    /// `Upgrade: ftvm-console`: raw bytes both ways.
    Raw,
    /// A WebSocket; its `Sec-WebSocket-Key`.
    WebSocket { key: String },
}

/// A console request's VM and protocol: `POST /v1/vms/NAME/console` (raw), or a WebSocket
/// handshake (`GET`, `Upgrade: websocket`, version 13, a key) on that path. `upgrade`,
/// `version` and `key` are the request's `Upgrade`, `Sec-WebSocket-Version` and
/// `Sec-WebSocket-Key` headers.
pub fn console_request(
    method: &str,
    target: &str,
    upgrade: Option<&str>,
    version: Option<&str>,
    key: Option<&str>,
) -> Option<(String, Protocol)> {
    let path = target.split('?').next().unwrap_or_default();
    let name = path.strip_prefix("/v1/vms/")?.strip_suffix("/console")?;
    if name.contains('/') {
        return None;
    }
    let websocket = upgrade.is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
    match (method, key) {
        ("POST", _) => Some((name.to_string(), Protocol::Raw)),
        ("GET", Some(key)) if websocket && version == Some("13") => {
            Some((name.to_string(), Protocol::WebSocket { key: key.to_string() }))
        }
        _ => None,
    }
}

/// The token a WebSocket request carries in its query (`access_token=`, percent-decoded), as an
/// `Authorization` value.
pub fn query_authorization(target: &str) -> Option<String> {
    let query = target.split_once('?')?.1;
    let value = query.split('&').find_map(|pair| pair.strip_prefix("access_token="))?;
    Some(format!("Bearer {}", percent_decode(value)?))
}

/// `%XX` escapes (and `+` as a space) decoded; None if malformed or not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The answer head that hands the connection over.
fn switching(host: &str) -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: {UPGRADE}\r\nConnection: Upgrade\r\n{HOST_HEADER}: {host}\r\n\r\n"
    )
}

/// The answer head that makes the connection a WebSocket.
fn websocket_switching(key: &str, host: &str) -> String {
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n{HOST_HEADER}: {host}\r\n\r\n"
    )
}

/// The other end of a console: the replica's console socket here, or the primary's host's
/// agent (a raw pipe).
enum Console {
    Local(UnixStream),
    Hop(TcpStream),
}

impl Console {
    fn try_clone(&self) -> std::io::Result<Console> {
        Ok(match self {
            Console::Local(s) => Console::Local(s.try_clone()?),
            Console::Hop(s) => Console::Hop(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Console::Local(s) => s.shutdown(std::net::Shutdown::Both),
            Console::Hop(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl Read for Console {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Console::Local(s) => s.read(buf),
            Console::Hop(s) => s.read(buf),
        }
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Console::Local(s) => s.write(buf),
            Console::Hop(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Console::Local(s) => s.flush(),
            Console::Hop(s) => s.flush(),
        }
    }
}

/// Serves an authenticated console request on `client`: locally when this host runs the
/// primary, else through the primary's host (unless `hopped`). Errors before the switch are
/// the caller's to answer; after it, the pipe just ends.
pub fn attach(
    client: &TcpStream,
    me: &str,
    work_dir: &Path,
    target: &Target,
    authorization: &str,
    hopped: bool,
    protocol: &Protocol,
) -> Result<(), (u16, String)> {
    let internal = |e: std::io::Error| (500, e.to_string());
    let mut client = client.try_clone().map_err(internal)?;
    let Some(_session) = Session::take() else {
        return Err((503, format!("{MAX_SESSIONS} consoles are attached through this agent already")));
    };
    let (console, raw_head) = if target.host == me {
        let socket = local_socket(work_dir, target).map_err(|e| (503, format!("{e:#}")))?;
        (Console::Local(socket), switching(me).into_bytes())
    } else if hopped {
        return Err((503, format!("{} runs on {}, not here: ask again", target.vm, target.host)));
    } else {
        let (upstream, head) = hop(target, authorization).map_err(|e| (502, format!("{e:#}")))?;
        (Console::Hop(upstream), head)
    };
    let console_in = console.try_clone().map_err(internal)?;
    match protocol {
        Protocol::Raw => {
            client.write_all(&raw_head).map_err(internal)?;
            splice(client, console_in, console);
        }
        Protocol::WebSocket { key } => {
            client.write_all(websocket_switching(key, &target.host).as_bytes()).map_err(internal)?;
            websocket_pump(client, console_in, console);
        }
    }
    Ok(())
}

/// The `--console-socket` of this host's replica of the VM that answers: the reported
/// primary's, else any that accepts (a backup has none until it takes over).
fn local_socket(work_dir: &Path, target: &Target) -> Result<UnixStream> {
    let mut dirs: Vec<(bool, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(work_dir.join("replicas")).context("no replicas here")?.flatten() {
        let Ok(bytes) = std::fs::read(entry.path().join("replica.json")) else { continue };
        let Ok(meta) = serde_json::from_slice::<serde_json::Value>(&bytes) else { continue };
        if meta["vm"] == target.vm.as_str() && meta["uid"] == target.uid {
            let reported = target.pid.is_some() && meta["pid"].as_u64() == target.pid.map(u64::from);
            dirs.push((reported, entry.path()));
        }
    }
    dirs.sort_by_key(|(reported, _)| !reported);
    for (_, dir) in dirs {
        if let Ok(stream) = UnixStream::connect(dir.join("console.sock")) {
            return Ok(stream);
        }
    }
    bail!("{}'s primary on {} has no console to attach to (is it still starting?)", target.vm, target.host)
}

/// Passes the request on to the primary's host; the connection and its 101 head.
fn hop(target: &Target, authorization: &str) -> Result<(TcpStream, Vec<u8>)> {
    let authority = target.api.strip_prefix("http://").context("the primary's host reports no http:// API")?;
    let addr = vmm::replicate::resolve(authority)?;
    let mut upstream = TcpStream::connect_timeout(&addr, HOP_TIMEOUT)
        .with_context(|| format!("cannot reach {}'s agent at {authority}", target.host))?;
    upstream.set_read_timeout(Some(HOP_TIMEOUT))?;
    let request = format!(
        "POST /v1/vms/{}/console HTTP/1.1\r\nHost: {authority}\r\nAuthorization: {authorization}\r\n\
         Upgrade: {UPGRADE}\r\nConnection: Upgrade\r\n{HOP_HEADER}: 1\r\nContent-Length: 0\r\n\r\n",
        target.vm
    );
    upstream.write_all(request.as_bytes())?;
    let head = read_head(&mut upstream)?;
    let text = String::from_utf8_lossy(&head);
    if !text.starts_with("HTTP/1.1 101") {
        // Its error, passed on: the status line and the JSON message.
        let mut body = Vec::new();
        let _ = (&mut upstream).take(64 * 1024).read_to_end(&mut body);
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(String::from))
            .unwrap_or_else(|| text.lines().next().unwrap_or("no answer").to_string());
        bail!("{}'s agent refused the console: {message}", target.host);
    }
    upstream.set_read_timeout(None)?;
    Ok((upstream, head))
}

/// An answer's head, through its blank line, read a byte at a time (nothing after it is
/// taken: it belongs to the pipe).
pub fn read_head(stream: &mut impl Read) -> Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        anyhow::ensure!(head.len() < MAX_HEAD_BYTES, "an answer head longer than {MAX_HEAD_BYTES} bytes");
        match stream.read(&mut byte)? {
            0 => bail!("the connection closed before the answer's head ended"),
            _ => head.push(byte[0]),
        }
    }
    Ok(head)
}

/// Copies both ways between the client and the console until either side hangs up, then
/// closes both.
fn splice(client: TcpStream, mut from_console: Console, mut to_console: Console) {
    let _ = client.set_read_timeout(None);
    let _ = client.set_write_timeout(None);
    let Ok(mut client_out) = client.try_clone() else { return };
    let mut client_in = client;
    let upward = std::thread::spawn(move || {
        let _ = std::io::copy(&mut from_console, &mut client_out);
        let _ = client_out.shutdown(std::net::Shutdown::Both);
    });
    let _ = std::io::copy(&mut client_in, &mut to_console);
    to_console.shutdown();
    let _ = client_in.shutdown(std::net::Shutdown::Both);
    let _ = upward.join();
}

/// The console as a WebSocket, until either side hangs up: the guest's output (read on a thread)
/// goes out as binary messages; each message from the browser, binary or text, is typed. The
/// WebSocket lives on this thread, which waits for the browser [`WS_POLL`] at a time.
fn websocket_pump(client: TcpStream, mut from_console: Console, mut to_console: Console) {
    use std::sync::mpsc::{sync_channel, TryRecvError};
    use tungstenite::{protocol::Role, Message, WebSocket};
    if client.set_read_timeout(Some(WS_POLL)).is_err() || client.set_write_timeout(Some(WS_WRITE_TIMEOUT)).is_err() {
        return;
    }
    let config = tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(MAX_WS_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_WS_MESSAGE_BYTES));
    let mut socket = WebSocket::from_raw_socket(client, Role::Server, Some(config));
    // Bounded: a browser slower than the guest holds the guest's console back, no more.
    let (output_tx, output) = sync_channel::<Vec<u8>>(64);
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = from_console.read(&mut buf) {
            if output_tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    'pump: loop {
        loop {
            match output.try_recv() {
                Ok(bytes) => {
                    if socket.send(Message::binary(bytes)).is_err() {
                        break 'pump;
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    let _ = socket.close(None);
                    let _ = socket.flush();
                    break 'pump;
                }
            }
        }
        match socket.read() {
            Ok(Message::Binary(bytes)) if to_console.write_all(&bytes).is_err() => break,
            Ok(Message::Text(text)) if to_console.write_all(text.as_bytes()).is_err() => break,
            Ok(Message::Close(_)) => break,
            // Pings are answered by the library on the next write or flush.
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
            {
                if socket.flush().is_err() {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    to_console.shutdown();
    let _ = socket.get_mut().shutdown(std::net::Shutdown::Both);
    drop(output);
    let _ = reader.join();
}

/// One of [`MAX_SESSIONS`], given back on drop.
struct Session;

impl Session {
    fn take() -> Option<Session> {
        let now = SESSIONS.fetch_add(1, Ordering::AcqRel);
        if now >= MAX_SESSIONS {
            SESSIONS.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Session)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        SESSIONS.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_console_request_is_a_post_or_a_websocket_handshake_on_a_vms_console_path() {
        let raw = |method, target| console_request(method, target, Some(UPGRADE), None, None);
        assert_eq!(raw("POST", "/v1/vms/web/console"), Some(("web".into(), Protocol::Raw)));
        assert_eq!(raw("GET", "/v1/vms/web/console"), None);
        assert_eq!(raw("POST", "/v1/vms/web"), None);
        assert_eq!(raw("POST", "/v1/vms/a/b/console"), None);
        let ws = |upgrade, version, key| {
            console_request("GET", "/v1/vms/web/console?access_token=t", Some(upgrade), Some(version), key)
        };
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        assert_eq!(ws("websocket", "13", Some(key)), Some(("web".into(), Protocol::WebSocket { key: key.into() })));
        assert_eq!(ws("WebSocket", "13", Some(key)).map(|(vm, _)| vm).as_deref(), Some("web"));
        assert_eq!(ws("websocket", "8", Some(key)), None, "only RFC 6455's version");
        assert_eq!(ws("websocket", "13", None), None, "no key");
        assert_eq!(ws("h2c", "13", Some(key)), None);
    }

    #[test]
    fn a_websocket_handshake_is_answered_with_rfc_6455s_accept_key() {
        // RFC 6455 §1.3's example.
        let head = websocket_switching("dGhlIHNhbXBsZSBub25jZQ==", "h1");
        assert!(head.starts_with("HTTP/1.1 101 Switching Protocols\r\n"), "{head}");
        assert!(head.contains("\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"), "{head}");
        assert!(head.ends_with("X-Ftvm-Host: h1\r\n\r\n"), "{head}");
    }

    #[test]
    fn the_token_of_a_websocket_comes_from_its_query() {
        assert_eq!(query_authorization("/v1/vms/web/console?access_token=s3cret").as_deref(), Some("Bearer s3cret"));
        assert_eq!(
            query_authorization("/v1/vms/web/console?x=1&access_token=a%2Fb%25").as_deref(),
            Some("Bearer a/b%")
        );
        assert_eq!(query_authorization("/v1/vms/web/console"), None);
        assert_eq!(query_authorization("/v1/vms/web/console?access_token=%zz"), None);
    }

    #[test]
    fn a_head_is_read_to_its_blank_line_and_no_further() {
        let mut wire: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: ftvm-console\r\n\r\n~ # ";
        let head = read_head(&mut wire).unwrap();
        assert!(head.ends_with(b"ftvm-console\r\n\r\n"));
        assert_eq!(wire, b"~ # ");
        let mut cut: &[u8] = b"HTTP/1.1 101\r\n";
        assert_eq!(
            read_head(&mut cut).unwrap_err().to_string(),
            "the connection closed before the answer's head ended"
        );
    }
}
