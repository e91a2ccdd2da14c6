//! The control API of a running VM (`ftvm run --api PATH`, `ftvm ctl`): status, pause,
//! resume, stop, Prometheus metrics (on the socket and over TCP with `--metrics-listen`),
//! and bad requests answered with clear errors.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn ftvm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ftvm"))
}

struct Vm {
    child: Child,
    socket: PathBuf,
}

impl Vm {
    fn start(name: &str) -> Vm {
        Vm::start_with(name, &[])
    }

    fn start_with(name: &str, options: &[&str]) -> Vm {
        let socket = std::env::temp_dir().join(format!("ftvm-api-{name}-{}.sock", std::process::id()));
        let child = ftvm()
            .args(["run", "--clock", "fast", "--api"])
            .arg(&socket)
            .args(options)
            .args(["--", "sleep", "1000"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        // Connect, not just see the file: it exists from bind(), before listen().
        while UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "the API socket never appeared");
            std::thread::sleep(Duration::from_millis(20));
        }
        Vm { child, socket }
    }

    fn ctl(&self, args: &[&str]) -> (i32, serde_json::Value, String) {
        let out = ftvm().arg("ctl").arg("--api").arg(&self.socket).args(args).output().unwrap();
        let body = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        (out.status.code().unwrap(), body, String::from_utf8_lossy(&out.stderr).to_string())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn icount(body: &serde_json::Value) -> u64 {
    body["icount"].as_u64().unwrap()
}

#[test]
fn pause_freezes_the_guest_and_resume_continues_it() {
    let vm = Vm::start("pause");
    let (code, status, _) = vm.ctl(&["status"]);
    assert_eq!(code, 0);
    assert_eq!(status["state"], "running");
    assert_eq!(status["role"], "standalone");
    let (_, paused, _) = vm.ctl(&["pause"]);
    assert_eq!(paused["state"], "paused");
    std::thread::sleep(Duration::from_millis(300));
    let (_, still, _) = vm.ctl(&["status"]);
    assert_eq!(still["state"], "paused");
    assert_eq!(icount(&still), icount(&paused), "a paused guest executes nothing");
    vm.ctl(&["resume"]);
    std::thread::sleep(Duration::from_millis(300));
    let (_, later, _) = vm.ctl(&["status"]);
    assert!(icount(&later) > icount(&paused), "a resumed guest runs");
}

#[test]
fn stop_ends_the_vm_and_removes_the_socket() {
    let mut vm = Vm::start("stop");
    let (code, body, _) = vm.ctl(&["stop"]);
    assert_eq!((code, body["state"].as_str()), (0, Some("stopped")));
    let status = vm.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(!vm.socket.exists());
    let (code, _, stderr) = vm.ctl(&["status"]);
    assert_eq!(code, 125);
    assert!(stderr.contains("cannot connect to the API socket"), "{stderr}");
}

fn raw(socket: &Path, request: &[u8]) -> String {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.write_all(request).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

#[test]
fn bad_requests_get_clear_http_errors() {
    let vm = Vm::start("bad");
    let not_found = raw(&vm.socket, b"GET /nope HTTP/1.1\r\n\r\n");
    assert!(not_found.starts_with("HTTP/1.1 404") && not_found.contains("no such resource /nope"), "{not_found}");
    let wrong_method = raw(&vm.socket, b"GET /pause HTTP/1.1\r\n\r\n");
    assert!(wrong_method.starts_with("HTTP/1.1 405"), "{wrong_method}");
    let garbage = raw(&vm.socket, b"hello\r\n\r\n");
    assert!(garbage.starts_with("HTTP/1.1 400") && garbage.contains("malformed request line"), "{garbage}");
    let huge = raw(&vm.socket, b"PUT /snapshot HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n");
    assert!(huge.starts_with("HTTP/1.1 400") && huge.contains("exceeds"), "{huge}");
    let bad_json = raw(&vm.socket, b"PUT /snapshot HTTP/1.1\r\nContent-Length: 1\r\n\r\n{");
    assert!(bad_json.starts_with("HTTP/1.1 400") && bad_json.contains("not JSON"), "{bad_json}");
    let (code, _, _) = vm.ctl(&["status"]);
    assert_eq!(code, 0, "the VM still answers after bad requests");
}

#[test]
fn a_second_vm_cannot_take_a_socket_in_use() {
    let vm = Vm::start("busy");
    let out = ftvm().args(["run", "--clock", "fast", "--api"]).arg(&vm.socket).args(["--", "true"]).output().unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by another running VM"));
}

#[test]
fn a_backup_answers_status_and_stop_and_refuses_what_needs_a_running_vm() {
    let dir = std::env::temp_dir().join(format!("ftvm-api-backup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (key, socket) = (dir.join("key"), dir.join("api.sock"));
    let store = format!("file:{}", dir.join("store").display());
    std::fs::write(&key, "0123456789abcdef0123456789abcdef").unwrap();
    let mut child = ftvm()
        .args(["backup", "--listen", "127.0.0.1:0", "--key"])
        .arg(&key)
        .arg("--store")
        .arg(&store)
        .arg("--api")
        .arg(&socket)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "the backup's API socket never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    let ctl = |verb: &str| ftvm().arg("ctl").arg("--api").arg(&socket).arg(verb).output().unwrap();
    let status = ctl("status");
    let body: serde_json::Value = serde_json::from_slice(&status.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&status.stderr)));
    assert_eq!((body["role"].as_str(), body["primary_connected"].as_bool()), (Some("backup"), Some(false)));
    assert!(body["applied_epoch"].is_null(), "no checkpoint yet");
    assert_eq!(body["stale"].as_bool(), Some(false));
    assert_eq!(body["pending_handshakes"].as_u64(), Some(0));
    let counts = (body["applied_checkpoints"].as_u64(), body["diverged_checkpoints"].as_u64(), body["epoch"].as_u64());
    assert_eq!(counts, (Some(0), Some(0), Some(0)), "{body}");
    let labels = format!("role=\"backup\",vm_id=\"{}\"", body["vm_id"].as_str().expect("a backup names its VM"));
    let metrics = Http::parse(&raw(&socket, b"GET /metrics HTTP/1.1\r\n\r\n"));
    assert_eq!(metrics.sample(&format!("ftvm_state{{{labels},state=\"waiting\"}}")), Some(1.0), "{}", metrics.body);
    assert_eq!(metrics.sample(&format!("ftvm_peer_connected{{{labels}}}")), Some(0.0), "{}", metrics.body);
    assert_eq!(metrics.sample(&format!("ftvm_diverged_checkpoints_total{{{labels}}}")), Some(0.0));
    let pause = ctl("pause");
    assert_eq!(pause.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&pause.stderr).contains("this replica is a backup"));
    assert!(ctl("stop").status.success());
    assert_eq!(child.wait().unwrap().code(), Some(0));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An HTTP answer: status line, headers, body.
struct Http {
    head: String,
    body: String,
}

impl Http {
    fn parse(answer: &str) -> Http {
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((answer, ""));
        Http { head: head.to_string(), body: body.to_string() }
    }

    fn code(&self) -> &str {
        self.head.split_whitespace().nth(1).unwrap_or("")
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| l.split_once(": ").filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v))
    }

    /// The value of the sample `name{labels}`.
    fn sample(&self, name_and_labels: &str) -> Option<f64> {
        self.body.lines().find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' ')?.parse().ok())
    }
}

fn tcp(addr: &str, request: &[u8]) -> Http {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream.write_all(request).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    Http::parse(&answer)
}

/// A port nobody listens on: bound by the kernel's choice, then let go.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn metrics_on_the_api_socket_are_prometheus_text_whose_icount_moves() {
    let vm = Vm::start("metrics");
    let first = Http::parse(&raw(&vm.socket, b"GET /metrics HTTP/1.1\r\n\r\n"));
    assert_eq!(first.code(), "200", "{}", first.head);
    assert_eq!(first.header("Content-Type"), Some("text/plain; version=0.0.4"));
    assert!(first.body.contains("# TYPE ftvm_icount gauge\n"), "{}", first.body);
    assert_eq!(first.sample("ftvm_state{role=\"standalone\",state=\"running\"}"), Some(1.0), "{}", first.body);
    let before = first.sample("ftvm_icount{role=\"standalone\"}").expect("an icount sample");
    std::thread::sleep(Duration::from_millis(300));
    let second = Http::parse(&raw(&vm.socket, b"GET /metrics HTTP/1.1\r\n\r\n"));
    let after = second.sample("ftvm_icount{role=\"standalone\"}").expect("an icount sample");
    assert!(after > before, "icount {before} then {after}");
    let put = Http::parse(&raw(&vm.socket, b"PUT /metrics HTTP/1.1\r\n\r\n"));
    assert_eq!(put.code(), "405");
    let out = ftvm().arg("ctl").arg("--api").arg(&vm.socket).arg("metrics").output().unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("# HELP ftvm_"));
}

#[test]
fn metrics_listen_serves_get_metrics_over_tcp_and_refuses_anything_else() {
    let addr = format!("127.0.0.1:{}", free_port());
    let vm = Vm::start_with("metrics-tcp", &["--metrics-listen", &addr]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let scrape = tcp(&addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!((scrape.code(), scrape.header("Content-Type")), ("200", Some("text/plain; version=0.0.4")));
    let before = scrape.sample("ftvm_icount{role=\"standalone\"}").expect("an icount sample");
    std::thread::sleep(Duration::from_millis(300));
    let again = tcp(&addr, b"GET /metrics HTTP/1.1\r\n\r\n");
    assert!(again.sample("ftvm_icount{role=\"standalone\"}").unwrap() > before, "{}", again.body);

    let status = tcp(&addr, b"GET /status HTTP/1.1\r\n\r\n");
    assert_eq!(status.code(), "404", "the metrics port is no control API: {}", status.head);
    let stop = tcp(&addr, b"PUT /stop HTTP/1.1\r\n\r\n");
    assert_eq!(stop.code(), "404");
    let post = tcp(&addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi");
    assert_eq!((post.code(), post.header("Allow")), ("405", Some("GET")));
    let garbage = tcp(&addr, b"hello\r\n\r\n");
    assert_eq!(garbage.code(), "400");
    let huge = tcp(&addr, format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(10_000)).as_bytes());
    assert_eq!(huge.code(), "400", "headers beyond the bound are refused");
    let (code, status, _) = vm.ctl(&["status"]);
    assert_eq!((code, &status["state"]), (0, &serde_json::Value::from("running")), "the VM carried on");
}

#[test]
fn a_busy_metrics_port_is_refused_at_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = ftvm().args(["run", "--clock", "fast", "--metrics-listen", &addr, "--", "true"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains(&format!("cannot listen for metrics on {addr}")), "{stderr}");
}

#[test]
fn strangers_holding_idle_connections_get_a_clear_refusal_and_never_the_vms_descriptors() {
    let vm = Vm::start("strangers");
    // First the VM answers (a request while it starts may get its own error).
    let deadline = Instant::now() + Duration::from_secs(30);
    while vm.ctl(&["status"]).0 != 0 {
        assert!(Instant::now() < deadline, "the VM never answered its API");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Far more than the API serves at once, each sending nothing.
    let idle: Vec<UnixStream> = (0..200).map(|_| UnixStream::connect(&vm.socket).unwrap()).collect();
    let refusal = loop {
        let (code, _, stderr) = vm.ctl(&["status"]);
        if code != 0 {
            break stderr;
        }
        // The server may not have accepted the whole flood yet.
        assert!(Instant::now() < deadline, "the API kept answering with 200 idle connections open");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        refusal.contains("the VM's API closed the connection without answering: either 64 requests, its limit"),
        "{refusal}"
    );
    drop(idle);
    // Slots come back as the strangers leave; the VM ran on throughout.
    let status = loop {
        let (code, status, stderr) = vm.ctl(&["status"]);
        if code == 0 {
            break status;
        }
        assert!(Instant::now() < deadline, "the API never answered again: {stderr}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status["state"], "running");
    let open = std::fs::read_dir(format!("/proc/{}/fd", vm.child.id())).unwrap().count();
    assert!(open < 100, "the monitor holds {open} descriptors after the strangers left");
}
