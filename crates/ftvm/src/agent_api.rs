//! The cloud API every agent serves (HTTP/1.1 + JSON over TCP; the shapes are in
//! /work/wt/notes/CLUSTER-API.md and the README): `POST/GET/DELETE /v1/vms`, `GET /v1/hosts`,
//! `GET /v1/events`, Prometheus text at `/metrics`, the dashboard's files at `/`. Everything
//! but the dashboard's files needs `Authorization: Bearer TOKEN` (401 otherwise, saying so).
//! Answers come from the store, so any agent answers for the whole cluster. One request per
//! connection, bounded sizes and time (the control API's reader).

use anyhow::{Context, Result};
use cluster::keys::{self, Event, EventKind};
use cluster::observed::{HostReport, HOST_TIMEOUT_MS};
use cluster::{DeclaredVm, ReplicaRole, VmSpec};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use store::{KvStore, OwnershipStore};

/// Connections served at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 64;
/// Events in one answer.
const MAX_EVENTS_PER_ANSWER: usize = 500;

pub struct ApiHandle {
    pub addr: SocketAddr,
}

struct Shared {
    kv: Box<dyn KvStore>,
    owners: Box<dyn OwnershipStore>,
    token: String,
    host_name: String,
    /// The agent's --work-dir (its replicas' directories, for their console sockets).
    work_dir: std::path::PathBuf,
    /// Per host: last seq seen and when it changed (this server's own observation).
    seen: HashMap<String, (u64, Instant)>,
}

pub fn serve(listen: &str, store_spec: &str, host_name: &str, token: String, work_dir: &Path) -> Result<ApiHandle> {
    let addr = vmm::replicate::resolve(listen).context("--listen")?;
    let listener = TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    let addr = listener.local_addr()?;
    let shared = Shared {
        kv: store::open_kv(store_spec)?,
        owners: store::open(store_spec)?,
        token,
        host_name: host_name.to_string(),
        work_dir: work_dir.to_path_buf(),
        seen: crate::agent_cmd::inherited_seen(),
    };
    let shared = Arc::new(Mutex::new(shared));
    std::thread::Builder::new().name("api".into()).spawn(move || accept_loop(listener, shared))?;
    Ok(ApiHandle { addr })
}

fn accept_loop(listener: TcpListener, shared: Arc<Mutex<Shared>>) {
    crate::accept::serve(listener.incoming(), MAX_CONNECTIONS, crate::accept::Open::default(), move |stream| {
        let _ = handle(stream, &shared);
    })
}

/// An answer on the wire.
pub struct Answer {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
}

impl Answer {
    fn json(status: u16, body: Value) -> Answer {
        Answer { status, content_type: "application/json", body: body.to_string().into_bytes(), headers: Vec::new() }
    }

    fn error(status: u16, message: impl Into<String>) -> Answer {
        Answer::json(status, json!({ "error": message.into() }))
    }

    fn write(&self, stream: &mut impl Write) -> std::io::Result<()> {
        let reason = match self.status {
            200 => "OK",
            201 => "Created",
            202 => "Accepted",
            400 => "Bad Request",
            401 => "Unauthorized",
            404 => "Not Found",
            405 => "Method Not Allowed",
            409 => "Conflict",
            502 => "Bad Gateway",
            503 => "Service Unavailable",
            _ => "Error",
        };
        let mut head = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            self.content_type,
            self.body.len()
        );
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes())?;
        stream.write_all(&self.body)?;
        stream.flush()
    }
}

fn handle(mut stream: TcpStream, shared: &Mutex<Shared>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(crate::api::IO_TIMEOUT))?;
    stream.set_write_timeout(Some(crate::api::IO_TIMEOUT))?;
    let request = read_request_with_auth(&mut stream);
    let answer = match request {
        Err(message) => Answer::error(400, message),
        Ok(request) => match console_request(&request) {
            Some((vm, protocol)) => match console(&stream, shared, &vm, &request, &protocol) {
                Ok(()) => return Ok(()),
                Err(answer) => answer,
            },
            None => {
                let mut shared = shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                let authorization = request.authorization.as_deref();
                answer(&mut shared, &request.method, &request.target, authorization, &request.body)
            }
        },
    };
    answer.write(&mut stream)
}

/// A console request's VM and protocol (see [`crate::agent_console::console_request`]).
fn console_request(request: &Request) -> Option<(String, crate::agent_console::Protocol)> {
    let header =
        |name: &str| request.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str());
    crate::agent_console::console_request(
        &request.method,
        &request.target,
        header("upgrade"),
        header("sec-websocket-version"),
        header("sec-websocket-key"),
    )
}

/// `POST /v1/vms/NAME/console` (raw) or a WebSocket on `GET`: the connection becomes the VM's
/// console (or an error answer). A WebSocket may carry the token in its query instead.
fn console(
    stream: &TcpStream,
    shared: &Mutex<Shared>,
    vm: &str,
    request: &Request,
    protocol: &crate::agent_console::Protocol,
) -> Result<(), Answer> {
    let authorization = match protocol {
        crate::agent_console::Protocol::WebSocket { .. } if request.authorization.is_none() => {
            crate::agent_console::query_authorization(&request.target)
        }
        _ => request.authorization.clone(),
    };
    let (target, me, work_dir) = {
        let mut shared = shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(refusal) = unauthorized(&shared, authorization.as_deref()) {
            return Err(refusal);
        }
        let target = console_target(&mut shared, vm)?;
        (target, shared.host_name.clone(), shared.work_dir.clone())
    };
    let authorization = authorization.unwrap_or_default();
    crate::agent_console::attach(stream, &me, &work_dir, &target, &authorization, request.hopped, protocol)
        .map_err(|(status, message)| Answer::error(status, message))
}

/// Where `vm`'s primary runs: the record's owner, its API and the primary's PID there.
fn console_target(shared: &mut Shared, vm: &str) -> Result<crate::agent_console::Target, Answer> {
    let unreachable = |error: anyhow::Error| Answer::error(503, format!("the store did not answer: {error:#}"));
    let view = view(shared).map_err(unreachable)?;
    let Some(dv) = view.declared.vms.get(vm) else { return Err(Answer::error(404, format!("no VM named {vm:?}"))) };
    let record = shared.owners.read(&keys::ownership_id(vm, dv.uid)).map_err(|e| unreachable(e.into()))?;
    let Some(record) = record else { return Err(Answer::error(409, format!("{vm} is not running yet"))) };
    // Not judged by liveness: a host that is gone refuses the connection, and a fresh observer
    // (an agent just re-executed) would otherwise take a live host for silent.
    let host = keys::owner_host(&record.owner);
    let report = view.reports.iter().find(|(r, _)| r.name == host);
    let Some((report, _)) = report else {
        return Err(Answer::error(503, format!("{vm}'s host {host} is not answering")));
    };
    let named = report.replicas.iter().find(|r| r.name.as_ref() == Some(&record.owner));
    let primary = named
        .or_else(|| report.replicas.iter().find(|r| r.vm == vm && r.uid == dv.uid && r.role == ReplicaRole::Primary));
    Ok(crate::agent_console::Target {
        vm: vm.to_string(),
        uid: dv.uid,
        host: host.to_string(),
        api: report.api.clone(),
        pid: primary.and_then(|r| r.pid),
    })
}

/// One request, with the headers the API looks at.
struct Request {
    method: String,
    target: String,
    authorization: Option<String>,
    /// Passed on by another agent (a console request).
    hopped: bool,
    /// The headers a console request looks at (Upgrade, Sec-WebSocket-*), as sent.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// The control API's bounded reader, keeping the headers the API needs. (This once peeked
/// at the first segment for the headers: a client whose Authorization header came in a
/// later segment was refused with 401.)
fn read_request_with_auth(stream: &mut TcpStream) -> Result<Request, String> {
    let request = crate::api::read_request(&mut *stream)?;
    let authorization = request.header("authorization").map(String::from);
    let hopped = request.header(crate::agent_console::HOP_HEADER).is_some();
    let headers = ["upgrade", "sec-websocket-version", "sec-websocket-key"]
        .into_iter()
        .filter_map(|name| Some((name.to_string(), request.header(name)?.to_string())))
        .collect();
    let crate::api::Request { method, target, body, .. } = request;
    Ok(Request { method, target, authorization, hopped, headers, body })
}

/// The 401 answer, unless `authorization` carries the token.
fn unauthorized(shared: &Shared, authorization: Option<&str>) -> Option<Answer> {
    let expected = format!("Bearer {}", shared.token);
    if authorization.map(str::as_bytes) == Some(expected.as_bytes()) {
        return None;
    }
    let mut answer = Answer::error(401, "unauthorized: send Authorization: Bearer <token>");
    answer.headers.push(("WWW-Authenticate", "Bearer realm=\"ftvm\"".into()));
    Some(answer)
}

/// The answer to one request (no I/O but the store).
fn answer(shared: &mut Shared, method: &str, target: &str, authorization: Option<&str>, body: &[u8]) -> Answer {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let protected = path.starts_with("/v1/") || path == "/v1" || path == "/metrics";
    if !protected {
        return match (method, dashboard::asset(path)) {
            ("GET", Some(asset)) => Answer {
                status: 200,
                content_type: asset.content_type,
                body: asset.body.to_vec(),
                headers: dashboard::HEADERS.iter().map(|(n, v)| (*n, v.to_string())).collect(),
            },
            _ => Answer::error(404, format!("no such resource {path}; the API is under /v1/")),
        };
    }
    if let Some(refusal) = unauthorized(shared, authorization) {
        return refusal;
    }
    let result = match (method, path) {
        ("GET", "/v1/vms") => list_vms(shared),
        ("POST", "/v1/vms") => create_vm(shared, body),
        ("GET", "/v1/hosts") => hosts(shared),
        ("GET", "/v1/events") => events(shared, query),
        ("GET", "/metrics") => metrics(shared),
        (_, "/v1/vms" | "/v1/hosts" | "/v1/events" | "/metrics") => {
            let allow = if path == "/v1/vms" { "GET, POST" } else { "GET" };
            let mut answer = Answer::error(405, format!("{path} takes {allow}, not {method}"));
            answer.headers.push(("Allow", allow.into()));
            Ok(answer)
        }
        (_, _) if path.starts_with("/v1/vms/") => {
            let name = &path["/v1/vms/".len()..];
            match method {
                "GET" => show_vm(shared, name),
                "DELETE" => delete_vm(shared, name),
                _ => {
                    let mut answer = Answer::error(405, format!("{path} takes GET or DELETE, not {method}"));
                    answer.headers.push(("Allow", "GET, DELETE".into()));
                    Ok(answer)
                }
            }
        }
        _ => Ok(Answer::error(404, format!("no such resource {path}"))),
    };
    result.unwrap_or_else(|error: anyhow::Error| Answer::error(503, format!("the store did not answer: {error:#}")))
}

struct View {
    declared: cluster::Declared,
    reports: Vec<(HostReport, u64)>,
}

/// The declared VMs and every host's report with its silence, as this server sees them.
fn view(shared: &mut Shared) -> Result<View> {
    let (declared, _) = crate::agent_cmd::read_declared(&mut shared.kv)?;
    let mut reports = Vec::new();
    for (_, entry) in shared.kv.list(keys::HOSTS)? {
        let Ok(report) = serde_json::from_slice::<HostReport>(&entry.value) else { continue };
        let silent_ms = crate::agent_cmd::silent_ms(&mut shared.seen, &report);
        reports.push((report, silent_ms));
    }
    Ok(View { declared, reports })
}

fn vm_json(shared: &mut Shared, view: &View, dv: &DeclaredVm) -> Result<Value> {
    let name = &dv.spec.name;
    let record = shared.owners.read(&keys::ownership_id(name, dv.uid))?;
    let mut replicas = Vec::new();
    let (mut primary_protected, mut has_primary, mut has_backup) = (false, false, false);
    for (report, silent_ms) in &view.reports {
        if *silent_ms >= HOST_TIMEOUT_MS {
            continue;
        }
        for r in report.replicas.iter().filter(|r| &r.vm == name && r.uid == dv.uid) {
            let role = match r.role {
                ReplicaRole::Primary => "primary",
                ReplicaRole::Backup => "backup",
                ReplicaRole::Starting => "starting",
            };
            if r.role == ReplicaRole::Primary && record.as_ref().is_some_and(|rec| Some(&rec.owner) == r.name.as_ref())
            {
                has_primary = true;
                primary_protected = r.protected == Some(true);
            }
            has_backup |= r.role == ReplicaRole::Backup;
            replicas.push(json!({
                "host": report.name, "role": role, "pid": r.pid, "listen": r.listen,
                "lag_epochs": r.lag_epochs, "epoch": r.epoch,
                "protected": (r.role == ReplicaRole::Primary).then_some(r.protected).flatten(),
                "generation": r.generation, "status_age_ms": silent_ms,
            }));
        }
    }
    let failovers = count_failovers(shared, dv)?;
    let exit_code = record.as_ref().and_then(|r| match r.state {
        store::VmState::Ended { exit_code } => Some(exit_code),
        store::VmState::Active => None,
    });
    let ended = exit_code.is_some();
    let state = match () {
        _ if ended => "ended",
        _ if has_primary && primary_protected => "protected",
        _ if has_primary && has_backup && dv.spec.protection == cluster::Protection::Checkpoint => "protecting",
        _ if has_primary => "running",
        _ if record.is_some() => "failed_over",
        _ => "pending",
    };
    Ok(json!({
        "name": name,
        "spec": dv.spec,
        "uid": dv.uid,
        "state": state,
        "generation": record.as_ref().map(|r| r.generation),
        // The host of the replica owning the record.
        "owner": record.as_ref().map(|r| keys::owner_host(&r.owner).to_string()),
        "replicas": replicas,
        "failovers": failovers,
        // How the VM ended (its record's exit code), or null while it runs.
        "exit_code": exit_code,
        "created_ms": dv.created_ms,
    }))
}

/// Failovers of this declaration: its failover events on the timeline (one per takeover; the
/// replicas running now show only the last one they took part in).
fn count_failovers(shared: &mut Shared, dv: &DeclaredVm) -> Result<u64> {
    let prefix = keys::event(&keys::failover_event_prefix(&dv.spec.name, dv.uid));
    let entries = shared.kv.list(&prefix)?;
    let of_this_vm = |value: &[u8]| {
        serde_json::from_slice::<Event>(value)
            .is_ok_and(|e| e.kind == EventKind::Failover && e.vm.as_deref() == Some(dv.spec.name.as_str()))
    };
    Ok(entries.iter().filter(|(_, entry)| of_this_vm(&entry.value)).count() as u64)
}

fn list_vms(shared: &mut Shared) -> Result<Answer> {
    let view = view(shared)?;
    let vms: Vec<Value> = view.declared.vms.values().map(|dv| vm_json(shared, &view, dv)).collect::<Result<_>>()?;
    Ok(Answer::json(200, json!({ "vms": vms })))
}

fn show_vm(shared: &mut Shared, name: &str) -> Result<Answer> {
    let view = view(shared)?;
    match view.declared.vms.get(name) {
        Some(dv) => Ok(Answer::json(200, vm_json(shared, &view, dv)?)),
        None => Ok(Answer::error(404, format!("no VM named {name:?}"))),
    }
}

fn create_vm(shared: &mut Shared, body: &[u8]) -> Result<Answer> {
    let spec = match serde_json::from_slice::<VmSpec>(body) {
        Ok(spec) => spec,
        Err(e) => return Ok(Answer::error(400, format!("bad VM spec: {e}"))),
    };
    let spec = match spec.checked() {
        Ok(spec) => spec,
        Err(e) => return Ok(Answer::error(400, format!("bad VM spec: {e}"))),
    };
    // Unique per declaration: a VM deleted and declared again gets a fresh ownership record.
    let random: [u8; 4] = vmm::replicate::random()?;
    let uid = (crate::agent_cmd::now_ms() << 12) ^ u64::from(u32::from_le_bytes(random) & 0xfff);
    let dv = DeclaredVm { spec: spec.clone(), uid, created_ms: crate::agent_cmd::now_ms() };
    let bytes = serde_json::to_vec(&dv)?;
    if !shared.kv.put_if(&keys::vm(&spec.name), store::Expect::Absent, &bytes)? {
        return Ok(Answer::error(409, format!("a VM named {:?} is declared already", spec.name)));
    }
    let host = Some(shared.host_name.clone());
    let message = format!("{} declared ({:?} protection)", spec.name, spec.protection);
    crate::agent_cmd::write_event(
        &mut shared.kv,
        &format!("created-{}-{uid}", spec.name),
        EventKind::VmCreated,
        Some(spec.name.clone()),
        host,
        message,
    );
    let view = view(shared)?;
    Ok(Answer::json(201, vm_json(shared, &view, &dv)?))
}

fn delete_vm(shared: &mut Shared, name: &str) -> Result<Answer> {
    let key = keys::vm(name);
    let Ok(()) = cluster::spec::check_name(name) else {
        return Ok(Answer::error(404, format!("no VM named {name:?}")));
    };
    let Some(entry) = shared.kv.get(&key)? else { return Ok(Answer::error(404, format!("no VM named {name:?}"))) };
    shared.kv.delete_if(&key, entry.mod_revision)?;
    let uid = serde_json::from_slice::<DeclaredVm>(&entry.value).map(|dv| dv.uid).unwrap_or(0);
    let host = Some(shared.host_name.clone());
    crate::agent_cmd::write_event(
        &mut shared.kv,
        &format!("deleted-{name}-{uid}"),
        EventKind::VmDeleted,
        Some(name.into()),
        host,
        format!("{name} deleted"),
    );
    Ok(Answer::json(202, json!({ "name": name, "state": "deleting" })))
}

fn hosts(shared: &mut Shared) -> Result<Answer> {
    let view = view(shared)?;
    let hosts: Vec<Value> = view
        .reports
        .iter()
        .map(|(report, silent_ms)| {
            let alive = *silent_ms < HOST_TIMEOUT_MS;
            let state = match (alive, view.declared.host_states.get(&report.name)) {
                (false, _) => "down",
                (true, Some(cluster::HostState::Draining)) => "draining",
                (true, Some(cluster::HostState::Quarantined)) => "quarantined",
                (true, _) => "active",
            };
            let replicas: Vec<String> = report
                .replicas
                .iter()
                .map(|r| {
                    format!(
                        "{}/{}",
                        r.vm,
                        serde_json::to_value(r.role)
                            .ok()
                            .and_then(|v| v.as_str().map(String::from))
                            .unwrap_or_default()
                    )
                })
                .collect();
            json!({
                "name": report.name, "labels": report.labels, "api": report.api, "address": report.address,
                "alive": alive, "last_heartbeat_ms_ago": silent_ms, "missed_heartbeats": silent_ms / 1000,
                "state": state, "memory_mib_free": report.memory_mib_free, "replicas": replicas,
            })
        })
        .collect();
    Ok(Answer::json(200, json!({ "hosts": hosts })))
}

/// The timeline, oldest first: its order is the store revision that wrote each event.
fn read_events(shared: &mut Shared) -> Result<Vec<(u64, Event)>> {
    let mut events: Vec<(u64, Event)> = shared
        .kv
        .list(keys::EVENTS)?
        .into_iter()
        .filter_map(|(_, entry)| Some((entry.mod_revision, serde_json::from_slice(&entry.value).ok()?)))
        .collect();
    events.sort_by_key(|(seq, _)| *seq);
    Ok(events)
}

fn events(shared: &mut Shared, query: &str) -> Result<Answer> {
    let since =
        query.split('&').find_map(|pair| pair.strip_prefix("since=")).map(|value| value.parse::<u64>()).transpose();
    let Ok(since) = since else { return Ok(Answer::error(400, "since= takes a number (the last seq seen)")) };
    let since = since.unwrap_or(0);
    let all = read_events(shared)?;
    let last_seq = all.last().map_or(0, |(seq, _)| *seq);
    let events: Vec<Value> = all
        .into_iter()
        .filter(|(seq, _)| *seq > since)
        .take(MAX_EVENTS_PER_ANSWER)
        .map(|(seq, e)| {
            json!({
                "seq": seq, "time": rfc3339_ms(e.time_ms), "time_ms": e.time_ms, "kind": e.kind,
                "vm": e.vm, "host": e.host, "message": e.message,
            })
        })
        .collect();
    Ok(Answer::json(200, json!({ "events": events, "last_seq": last_seq })))
}

fn metrics(shared: &mut Shared) -> Result<Answer> {
    let view = view(shared)?;
    let alive = view.reports.iter().filter(|(_, s)| *s < HOST_TIMEOUT_MS).count();
    let mut protected = 0;
    for dv in view.declared.vms.values() {
        if vm_json(shared, &view, dv)?["state"] == "protected" {
            protected += 1;
        }
    }
    let events = read_events(shared)?;
    let count = |kind: EventKind| events.iter().filter(|(_, e)| e.kind == kind).count();
    let text = format!(
        "# HELP ftvm_cluster_hosts Hosts with a report in the store.\n# TYPE ftvm_cluster_hosts gauge\nftvm_cluster_hosts {}\n\
         # HELP ftvm_cluster_hosts_alive Hosts whose heartbeat is fresh.\n# TYPE ftvm_cluster_hosts_alive gauge\nftvm_cluster_hosts_alive {alive}\n\
         # HELP ftvm_cluster_vms Declared VMs.\n# TYPE ftvm_cluster_vms gauge\nftvm_cluster_vms {}\n\
         # HELP ftvm_cluster_vms_protected Declared VMs whose primary is protected.\n# TYPE ftvm_cluster_vms_protected gauge\nftvm_cluster_vms_protected {protected}\n\
         # HELP ftvm_cluster_failovers_total Failovers on the timeline.\n# TYPE ftvm_cluster_failovers_total counter\nftvm_cluster_failovers_total {}\n\
         # HELP ftvm_cluster_reprotections_total Re-protections on the timeline.\n# TYPE ftvm_cluster_reprotections_total counter\nftvm_cluster_reprotections_total {}\n",
        view.reports.len(),
        view.declared.vms.len(),
        count(EventKind::Failover),
        count(EventKind::Reprotect),
    );
    Ok(Answer { status: 200, content_type: vmm::metrics::CONTENT_TYPE, body: text.into_bytes(), headers: Vec::new() })
}

/// `2026-12-01T13:41:02.120Z` from Unix milliseconds (UTC; civil-from-days, H. Hinnant).
pub fn rfc3339_ms(ms: u64) -> String {
    let (days, rem) = ((ms / 86_400_000) as i64, ms % 86_400_000);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s, milli) = (rem / 3_600_000, rem / 60_000 % 60, rem / 1000 % 60, rem % 1000);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{milli:03}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Shared {
        Shared {
            kv: Box::new(store::MemoryKv::new()),
            owners: Box::new(store::MemoryStore::new()),
            token: "sekrit".into(),
            host_name: "h1".into(),
            work_dir: std::env::temp_dir(),
            seen: HashMap::new(),
        }
    }

    fn body(answer: &Answer) -> Value {
        serde_json::from_slice(&answer.body).unwrap()
    }

    /// A client whose headers arrive in several TCP segments, the token in a later one
    /// (a client writing a header at a time): once refused with 401.
    #[test]
    fn a_token_in_a_later_segment_than_the_request_line_is_honoured() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let _ = handle(stream, &Mutex::new(shared()));
        });
        let mut client = TcpStream::connect(addr).unwrap();
        client.set_nodelay(true).unwrap();
        client.write_all(b"GET /v1/vms HTTP/1.1\r\nHost: h1\r\n").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        client.write_all(b"Authorization: Bearer sekrit\r\n\r\n").unwrap();
        let mut answer = String::new();
        std::io::Read::read_to_string(&mut client, &mut answer).unwrap();
        server.join().unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }

    #[test]
    fn requests_without_the_token_are_refused_with_401_saying_so() {
        let mut shared = shared();
        for auth in [None, Some("Bearer wrong"), Some("sekrit")] {
            let answer = answer(&mut shared, "GET", "/v1/vms", auth, b"");
            assert_eq!(answer.status, 401, "{auth:?}");
            assert_eq!(body(&answer)["error"], "unauthorized: send Authorization: Bearer <token>");
            assert!(answer.headers.iter().any(|(n, _)| *n == "WWW-Authenticate"));
        }
        assert_eq!(answer(&mut shared, "GET", "/metrics", None, b"").status, 401);
        assert_eq!(answer(&mut shared, "GET", "/", None, b"").status, 200, "the dashboard's page needs no token");
        assert_eq!(answer(&mut shared, "GET", "/v1/vms", Some("Bearer sekrit"), b"").status, 200);
    }

    #[test]
    fn vms_are_declared_listed_shown_and_deleted() {
        let mut shared = shared();
        let auth = Some("Bearer sekrit");
        let created = answer(&mut shared, "POST", "/v1/vms", auth, br#"{"name":"web","protection":"checkpoint"}"#);
        assert_eq!(created.status, 201);
        assert_eq!((body(&created)["name"].clone(), body(&created)["state"].clone()), (json!("web"), json!("pending")));
        assert_eq!(answer(&mut shared, "POST", "/v1/vms", auth, br#"{"name":"web"}"#).status, 409);
        let bad = answer(&mut shared, "POST", "/v1/vms", auth, br#"{"name":"web","memory_mib":1}"#);
        assert_eq!(
            (bad.status, body(&bad)["error"].clone()),
            (400, json!("bad VM spec: memory_mib 1 is outside 16..=65536"))
        );
        let list = body(&answer(&mut shared, "GET", "/v1/vms", auth, b""));
        assert_eq!(list["vms"][0]["spec"]["replicas"], 2);
        assert_eq!(answer(&mut shared, "GET", "/v1/vms/web", auth, b"").status, 200);
        assert_eq!(answer(&mut shared, "GET", "/v1/vms/nope", auth, b"").status, 404);
        assert_eq!(answer(&mut shared, "DELETE", "/v1/vms/web", auth, b"").status, 202);
        assert_eq!(answer(&mut shared, "GET", "/v1/vms/web", auth, b"").status, 404);
        let events = body(&answer(&mut shared, "GET", "/v1/events", auth, b""));
        let kinds: Vec<&str> =
            events["events"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["vm_created", "vm_deleted"]);
        let last = events["last_seq"].as_u64().unwrap();
        let later = body(&answer(&mut shared, "GET", &format!("/v1/events?since={last}"), auth, b""));
        assert_eq!(later["events"], json!([]));
        assert_eq!(answer(&mut shared, "PUT", "/v1/vms", auth, b"").status, 405);
    }

    #[test]
    fn failovers_count_every_takeover_on_the_timeline_not_only_the_live_replicas() {
        let mut shared = shared();
        let auth = Some("Bearer sekrit");
        let created = answer(&mut shared, "POST", "/v1/vms", auth, br#"{"name":"web","protection":"checkpoint"}"#);
        let uid = body(&created)["uid"].as_u64().unwrap();
        // Two takeovers (h2 took over at generation 2, then h3 at 3), each reported by two
        // agents; a VM whose name extends this one's has a failover of its own.
        for (generation, host) in [(2, "h2"), (3, "h3"), (3, "h1"), (2, "h2")] {
            let identity = keys::failover_event("web", uid, generation);
            let message = format!("{host} took over web");
            crate::agent_cmd::write_event(
                &mut shared.kv,
                &identity,
                EventKind::Failover,
                Some("web".into()),
                None,
                message,
            );
        }
        let other = keys::failover_event(&format!("web-{uid}"), 7, 2);
        crate::agent_cmd::write_event(
            &mut shared.kv,
            &other,
            EventKind::Failover,
            Some(format!("web-{uid}")),
            None,
            "x".into(),
        );
        // Only the last taker runs now.
        let report = HostReport {
            name: "h3".into(),
            labels: Default::default(),
            address: "127.0.0.1".into(),
            api: String::new(),
            memory_mib_free: 0,
            seq: 1,
            time_ms: 0,
            replicas: vec![cluster::ReplicaReport {
                vm: "web".into(),
                uid,
                role: ReplicaRole::Primary,
                pid: Some(1),
                listen: None,
                backup_to: None,
                protected: Some(false),
                generation: Some(3),
                epoch: Some(1),
                lag_epochs: None,
                took_over_generation: Some(3),
                disk_bytes: None,
                name: Some("h3/web".into()),
            }],
        };
        shared.kv.put(&keys::host("h3"), &serde_json::to_vec(&report).unwrap()).unwrap();
        // First seen, a report is not yet taken for alive: its next heartbeat is.
        assert_eq!(body(&answer(&mut shared, "GET", "/v1/vms/web", auth, b""))["replicas"], json!([]));
        let report = HostReport { seq: 2, ..report };
        shared.kv.put(&keys::host("h3"), &serde_json::to_vec(&report).unwrap()).unwrap();
        let shown = body(&answer(&mut shared, "GET", "/v1/vms/web", auth, b""));
        assert_eq!(shown["failovers"], 2);
        assert_eq!(shown["replicas"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn times_are_rfc3339_in_utc() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_796_132_462_120), "2026-12-01T13:41:02.120Z");
    }
}
