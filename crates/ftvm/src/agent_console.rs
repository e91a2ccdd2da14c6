//! `POST /v1/vms/NAME/console` with `Upgrade: ftvm-console`: a VM's console, through any
//! agent. The agent answers `101 Switching Protocols` and the connection becomes a raw byte
//! pipe both ways (as `docker attach` hijacks its HTTP connection): what the client sends is
//! typed on the guest's console, what the guest prints comes back. The agent that runs the
//! VM's primary connects it to that replica's `--console-socket`; any other agent passes the
//! request on to that host's agent, once (a request already passed on is never passed again,
//! so two agents that disagree about where the primary is cannot bounce it between them).

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// The protocol named in `Upgrade:`.
pub const UPGRADE: &str = "ftvm-console";
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

/// The console path's VM name, for `POST /v1/vms/NAME/console`.
pub fn console_vm(method: &str, path: &str) -> Option<String> {
    let name = path.strip_prefix("/v1/vms/")?.strip_suffix("/console")?;
    (method == "POST" && !name.contains('/')).then(|| name.to_string())
}

/// The answer head that hands the connection over.
fn switching(host: &str) -> String {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: {UPGRADE}\r\nConnection: Upgrade\r\n{HOST_HEADER}: {host}\r\n\r\n"
    )
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
) -> Result<(), (u16, String)> {
    let mut client = client.try_clone().map_err(|e| (500, e.to_string()))?;
    let Some(_session) = Session::take() else {
        return Err((503, format!("{MAX_SESSIONS} consoles are attached through this agent already")));
    };
    if target.host == me {
        let socket = local_socket(work_dir, target).map_err(|e| (503, format!("{e:#}")))?;
        let head = switching(me);
        client.write_all(head.as_bytes()).map_err(|e| (500, e.to_string()))?;
        let (socket_in, socket_out) = (socket.try_clone().map_err(|e| (500, e.to_string()))?, socket);
        splice(client, socket_in, socket_out, |s| {
            let _ = s.shutdown(std::net::Shutdown::Both);
        });
        return Ok(());
    }
    if hopped {
        return Err((503, format!("{} runs on {}, not here: ask again", target.vm, target.host)));
    }
    let (upstream, head) = hop(target, authorization).map_err(|e| (502, format!("{e:#}")))?;
    client.write_all(&head).map_err(|e| (500, e.to_string()))?;
    let upstream_in = upstream.try_clone().map_err(|e| (500, e.to_string()))?;
    splice(client, upstream_in, upstream, |s| {
        let _ = s.shutdown(std::net::Shutdown::Both);
    });
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

/// Copies both ways between the client and the other end until either side hangs up, then
/// closes both (`close` shuts the other end).
fn splice<S: Read + Write + Send + 'static>(client: TcpStream, mut from_other: S, mut to_other: S, close: fn(&S)) {
    let _ = client.set_read_timeout(None);
    let _ = client.set_write_timeout(None);
    let Ok(mut client_out) = client.try_clone() else { return };
    let mut client_in = client;
    let upward = std::thread::spawn(move || {
        let _ = std::io::copy(&mut from_other, &mut client_out);
        let _ = client_out.shutdown(std::net::Shutdown::Both);
    });
    let _ = std::io::copy(&mut client_in, &mut to_other);
    close(&to_other);
    let _ = client_in.shutdown(std::net::Shutdown::Both);
    let _ = upward.join();
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
    fn only_post_to_a_vms_console_path_is_a_console_request() {
        assert_eq!(console_vm("POST", "/v1/vms/web/console").as_deref(), Some("web"));
        assert_eq!(console_vm("GET", "/v1/vms/web/console"), None);
        assert_eq!(console_vm("POST", "/v1/vms/web"), None);
        assert_eq!(console_vm("POST", "/v1/vms/a/b/console"), None);
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
