//! The front from outside, over loopback: what needs the token and what does not, each limit,
//! and strangers on the port (garbage, stalls, too many connections).

use http_front::{serve, Options, Request, Response, Server};
use serde_json::{json, Value};
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

const TOKEN: &str = "s3cret-token";

/// The handler echoes what it was given.
fn start(options: Options) -> Server {
    let handler = |request: &Request| {
        Response::json(
            200,
            &json!({ "method": request.method, "path": request.path, "since": request.query_param("since"),
                     "body_bytes": request.body.len() }),
        )
    };
    serve("127.0.0.1:0", options, Arc::new(handler)).expect("serve")
}

struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<String> {
        let prefix = format!("{}:", name.to_ascii_lowercase());
        let line = self.head.lines().find(|l| l.to_ascii_lowercase().starts_with(&prefix))?;
        Some(line[prefix.len()..].trim().to_owned())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

fn send(addr: SocketAddr, raw: &[u8]) -> Answer {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    stream.write_all(raw).expect("write");
    read_answer(&mut stream)
}

fn read_answer(stream: &mut TcpStream) -> Answer {
    let mut bytes = Vec::new();
    let _ = stream.read_to_end(&mut bytes);
    let split = bytes.windows(4).position(|w| w == b"\r\n\r\n").expect("a whole head");
    let head = String::from_utf8_lossy(&bytes[..split]).into_owned();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("a status");
    Answer { status, head, body: bytes[split + 4..].to_vec() }
}

fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> Answer {
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    send(addr, format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n").as_bytes())
}

#[test]
fn the_dashboard_needs_no_token_and_comes_with_its_headers() {
    let server = start(Options::new(TOKEN));
    let answer = get(server.addr(), "/", None);
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("content-type").as_deref(), Some("text/html; charset=utf-8"));
    assert_eq!(answer.header("cache-control").as_deref(), Some("no-store"));
    assert!(answer.header("content-security-policy").is_some_and(|c| c.contains("script-src 'self'")));
    assert_eq!(answer.body, dashboard::asset("/").expect("page").body);
    assert_eq!(get(server.addr(), "/dashboard.js", None).status, 200);
    let head = send(server.addr(), b"HEAD / HTTP/1.1\r\n\r\n");
    assert_eq!((head.status, head.body.len()), (200, 0));
}

#[test]
fn the_api_and_metrics_need_the_token_and_say_so() {
    let server = start(Options::new(TOKEN));
    for path in ["/v1/vms", "/v1", "/metrics"] {
        for token in [None, Some("wrong"), Some("s3cret-toke"), Some("s3cret-token2")] {
            let answer = get(server.addr(), path, token);
            assert_eq!(answer.status, 401, "{path} {token:?}");
            assert_eq!(answer.header("www-authenticate").as_deref(), Some("Bearer realm=\"ftvm\""));
            assert_eq!(answer.json(), json!({ "error": "unauthorized: send Authorization: Bearer <token>" }));
        }
    }
    let answer = get(server.addr(), "/v1/events?since=17", Some(TOKEN));
    assert_eq!(answer.status, 200);
    assert_eq!(answer.json(), json!({ "method": "GET", "path": "/v1/events", "since": "17", "body_bytes": 0 }));
}

#[test]
fn a_body_reaches_the_handler_within_its_limit_and_is_refused_over_it() {
    let server = start(Options::new(TOKEN));
    let body = vec![b'x'; 64 << 10];
    let mut raw =
        format!("POST /v1/vms HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {}\r\n\r\n", body.len())
            .into_bytes();
    raw.extend_from_slice(&body);
    let answer = send(server.addr(), &raw);
    assert_eq!((answer.status, answer.json()["body_bytes"].clone()), (200, json!(65536)));
    // Over the limit: refused from the header alone, the body never read.
    let over = format!("POST /v1/vms HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 65537\r\n\r\n");
    let answer = send(server.addr(), over.as_bytes());
    assert_eq!((answer.status, answer.json()), (413, json!({ "error": "the body is over 65536 bytes" })));
    // ... also when the client sends that body all the same: the answer is not lost to a reset.
    let mut raw = over.into_bytes();
    raw.extend(std::iter::repeat_n(b'y', 200_000));
    let mut stream = TcpStream::connect(server.addr()).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let _ = stream.write_all(&raw);
    assert_eq!(read_answer(&mut stream).status, 413);
    let chunked = "POST /v1/vms HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    assert_eq!(send(server.addr(), chunked.as_bytes()).status, 411);
}

#[test]
fn pages_that_are_not_there_and_methods_that_are_not_allowed() {
    let server = start(Options::new(TOKEN));
    let answer = get(server.addr(), "/nothing", None);
    assert_eq!((answer.status, answer.json()), (404, json!({ "error": "no such page: /nothing" })));
    let answer = send(server.addr(), b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!((answer.status, answer.header("allow")), (405, Some("GET, HEAD".into())));
}

#[test]
fn strangers_get_a_clear_refusal_and_the_server_carries_on() {
    let server = start(Options::new(TOKEN));
    let cases: [(&[u8], u16); 6] = [
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400), // a TLS hello, more or less
        (b"GET\r\n\r\n", 400),
        (b"GET http://elsewhere/ HTTP/1.1\r\n\r\n", 400),
        (b"get / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    ];
    for (raw, status) in cases {
        assert_eq!(send(server.addr(), raw).status, status, "{:?}", String::from_utf8_lossy(raw));
    }
    let mut huge = b"GET / HTTP/1.1\r\n".to_vec();
    huge.extend(
        std::iter::repeat_n(b"X-Filler: 0123456789012345678901234567890123456789\r\n".as_slice(), 400).flatten(),
    );
    huge.extend_from_slice(b"\r\n");
    assert_eq!(send(server.addr(), &huge).status, 431);
    drop(TcpStream::connect(server.addr()).expect("connect and leave"));
    assert_eq!(get(server.addr(), "/", None).status, 200);
}

#[test]
fn a_stalled_request_is_cut_off_at_its_deadline() {
    let options = Options { request_timeout: Duration::from_millis(300), ..Options::new(TOKEN) };
    let server = start(options);
    let mut stream = TcpStream::connect(server.addr()).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let started = Instant::now();
    // A trickle: one byte at a time, never the end of the head.
    for byte in b"GET / HTTP/1.1\r\nX-Slow: " {
        if stream.write_all(&[*byte]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let answer = read_answer(&mut stream);
    assert_eq!(answer.status, 408);
    assert!(started.elapsed() < Duration::from_secs(3), "cut off after {:?}", started.elapsed());
}

#[test]
fn connections_beyond_the_cap_are_refused_until_one_closes() {
    let options = Options { max_connections: 2, request_timeout: Duration::from_millis(800), ..Options::new(TOKEN) };
    let server = start(options);
    let idle: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(server.addr()).expect("connect")).collect();
    std::thread::sleep(Duration::from_millis(100));
    let answer = get(server.addr(), "/", None);
    assert_eq!((answer.status, answer.json()), (503, json!({ "error": "too many connections; try again" })));
    // The idle ones are cut off at their deadline, and the slots come back.
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(get(server.addr(), "/", None).status, 200);
    drop(idle);
}

#[test]
fn stopping_the_server_closes_its_port() {
    let mut server = start(Options::new(TOKEN));
    let addr = server.addr();
    assert_eq!(get(addr, "/", None).status, 200);
    server.stop();
    assert!(TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err(), "still listening");
}
