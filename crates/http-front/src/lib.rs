//! The agent's HTTP/1.1 front: a small bounded server on a std `TcpListener`, a thread per
//! connection and one request per connection. The API (`/v1/...` and `/metrics`) needs
//! `Authorization: Bearer TOKEN`, refused with 401 and saying so; the dashboard's page (every
//! other GET) is served without a token, since it holds no data. Everything from outside is
//! bounded: connections at once, the request head, the body, and the time to send them.
//!
//! Why not hyper or tiny_http: the API is a few JSON routes on loopback or a LAN, one request
//! per connection is plenty for a dashboard polling once a second, and the limits and the
//! auth rule are easier to see (and test) in this page than around a framework.

use serde_json::{json, Value};
use std::io::{self, BufRead as _, BufReader, Read, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One request, as the handler sees it (already authenticated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// What follows `?`, or "".
    pub query: String,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The first `name=value` of the query (not percent-decoded: the API's values need none).
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query.split('&').filter_map(|pair| pair.split_once('=')).find(|(n, _)| *n == name).map(|(_, v)| v)
    }
}

/// What the handler answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(status: u16, value: &Value) -> Response {
        let mut body = value.to_string().into_bytes();
        body.push(b'\n');
        Response { status, content_type: "application/json".into(), headers: Vec::new(), body }
    }

    /// `{"error": message}`, the API's shape for every non-2xx answer.
    pub fn error(status: u16, message: &str) -> Response {
        Response::json(status, &json!({ "error": message }))
    }

    pub fn text(status: u16, content_type: &str, body: String) -> Response {
        Response { status, content_type: content_type.into(), headers: Vec::new(), body: body.into_bytes() }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Response {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// The API behind the front: called only for authenticated requests to `/v1...` and `/metrics`.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, request: &Request) -> Response;
}

impl<F: Fn(&Request) -> Response + Send + Sync + 'static> Handler for F {
    fn handle(&self, request: &Request) -> Response {
        self(request)
    }
}

/// The limits and the token.
#[derive(Clone, Debug)]
pub struct Options {
    /// The API token (compared in constant time).
    pub token: String,
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// The request line and headers together.
    pub max_head_bytes: usize,
    /// A request body; a larger Content-Length is answered 413 without reading it.
    pub max_body_bytes: usize,
    /// From accepting a connection to having its whole request.
    pub request_timeout: Duration,
}

impl Options {
    pub fn new(token: impl Into<String>) -> Options {
        Options {
            token: token.into(),
            max_connections: 64,
            max_head_bytes: 16 << 10,
            max_body_bytes: 64 << 10,
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// A listening server; dropping it (or [`Server::stop`]) stops accepting and joins the loop.
pub struct Server {
    addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    accept_loop: Option<JoinHandle<()>>,
}

impl Server {
    /// Where it listens (the port chosen, when asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(500));
        if let Some(accept_loop) = self.accept_loop.take() {
            let _ = accept_loop.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Listen on `listen` (HOST:PORT) and serve until stopped.
pub fn serve(listen: impl ToSocketAddrs, options: Options, handler: Arc<dyn Handler>) -> io::Result<Server> {
    let listener = TcpListener::bind(listen)?;
    let addr = listener.local_addr()?;
    let stopping = Arc::new(AtomicBool::new(false));
    let flag = stopping.clone();
    let options = Arc::new(options);
    let accept_loop = std::thread::Builder::new()
        .name("http-front".into())
        .spawn(move || accept(&listener, &flag, &options, &handler))?;
    Ok(Server { addr, stopping, accept_loop: Some(accept_loop) })
}

fn accept(listener: &TcpListener, stopping: &AtomicBool, options: &Arc<Options>, handler: &Arc<dyn Handler>) {
    let open = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(mut stream) = stream else { continue };
        if open.fetch_add(1, Ordering::SeqCst) >= options.max_connections {
            open.fetch_sub(1, Ordering::SeqCst);
            let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
            let _ = write_response(&mut stream, &Response::error(503, "too many connections; try again"), false);
            // Drop what already arrived (without waiting), so that closing does not reset the
            // connection before the client reads the answer.
            let _ = stream.shutdown(std::net::Shutdown::Write);
            let _ = stream.set_nonblocking(true);
            let _ = stream.read(&mut [0; 4096]);
            continue;
        }
        let (open, options, handler) = (open.clone(), options.clone(), handler.clone());
        let spawned = std::thread::Builder::new().name("http-front-conn".into()).spawn(move || {
            serve_connection(stream, &options, handler.as_ref());
            open.fetch_sub(1, Ordering::SeqCst);
        });
        if spawned.is_err() {
            // The closure (and its counter decrement) never ran.
            continue;
        }
    }
}

fn serve_connection(mut stream: TcpStream, options: &Options, handler: &dyn Handler) {
    let _ = stream.set_write_timeout(Some(options.request_timeout));
    let deadline = Instant::now() + options.request_timeout;
    let response = match read_request(&stream, options, deadline) {
        Ok(request) => {
            let head_only = request.method == "HEAD";
            let response = route(&request, options, handler);
            let _ = write_response(&mut stream, &response, head_only);
            return;
        }
        Err(Refusal { status, message }) => Response::error(status, &message),
    };
    let _ = write_response(&mut stream, &response, false);
    drain_before_close(&mut stream);
}

/// After refusing a request that may not have been read whole (a body over the limit), read
/// and drop what still comes for a moment: closing with unread data resets the connection,
/// and the client could lose the answer.
fn drain_before_close(stream: &mut TcpStream) {
    const DRAIN_BYTES: u64 = 256 << 10;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let _ = io::copy(&mut stream.take(DRAIN_BYTES), &mut io::sink());
}

/// The API needs the token; anything else is the dashboard's page or 404.
fn route(request: &Request, options: &Options, handler: &dyn Handler) -> Response {
    let is_api = request.path == "/v1" || request.path.starts_with("/v1/") || request.path == "/metrics";
    if !is_api {
        return page(request);
    }
    if !authorized(request.header("authorization"), &options.token) {
        return Response::error(401, "unauthorized: send Authorization: Bearer <token>")
            .with_header("WWW-Authenticate", "Bearer realm=\"ftvm\"");
    }
    handler.handle(request)
}

fn page(request: &Request) -> Response {
    let Some(asset) = dashboard::asset(&request.path) else {
        return Response::error(404, &format!("no such page: {}", request.path));
    };
    if request.method != "GET" && request.method != "HEAD" {
        return Response::error(405, &format!("{} is not allowed here", request.method))
            .with_header("Allow", "GET, HEAD");
    }
    let mut response = Response {
        status: 200,
        content_type: asset.content_type.into(),
        headers: Vec::new(),
        body: asset.body.to_vec(),
    };
    for (name, value) in dashboard::HEADERS {
        response.headers.push(((*name).into(), (*value).into()));
    }
    response
}

/// `Bearer TOKEN`, compared without stopping at the first differing byte.
fn authorized(header: Option<&str>, token: &str) -> bool {
    let Some(given) = header.and_then(|h| h.strip_prefix("Bearer ")) else { return false };
    let (given, token) = (given.trim().as_bytes(), token.as_bytes());
    given.len() == token.len() && given.iter().zip(token).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// Why a request is refused before it reaches the handler.
#[derive(Debug)]
struct Refusal {
    status: u16,
    message: String,
}

fn refuse(status: u16, message: impl Into<String>) -> Refusal {
    Refusal { status, message: message.into() }
}

fn read_request(stream: &TcpStream, options: &Options, deadline: Instant) -> Result<Request, Refusal> {
    let mut reader = BufReader::new(Deadlined { stream, deadline });
    let mut head_bytes = 0;
    let request_line = read_line(&mut reader, &mut head_bytes, options.max_head_bytes)?;
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(refuse(400, "a malformed request line"));
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(refuse(400, "a malformed request line"));
    }
    if !target.starts_with('/') {
        return Err(refuse(400, "the request target must be a path"));
    }
    let mut headers = Vec::new();
    loop {
        let line = read_line(&mut reader, &mut head_bytes, options.max_head_bytes)?;
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').ok_or_else(|| refuse(400, "a malformed header line"))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
    if header("transfer-encoding").is_some() {
        return Err(refuse(411, "send the body with a Content-Length, not chunked"));
    }
    let length = match header("content-length") {
        None => 0,
        Some(text) => text.parse::<usize>().map_err(|_| refuse(400, "a malformed Content-Length"))?,
    };
    if length > options.max_body_bytes {
        return Err(refuse(413, format!("the body is over {} bytes", options.max_body_bytes)));
    }
    let mut body = vec![0; length];
    reader
        .read_exact(&mut body)
        .map_err(|e| refuse(if timed_out(&e) { 408 } else { 400 }, "the body was cut short"))?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let path = path.split('#').next().unwrap_or_default();
    Ok(Request { method: method.into(), path: path.into(), query: query.into(), headers, body })
}

/// One CRLF-terminated line of the head, counted against its limit.
fn read_line(reader: &mut BufReader<Deadlined<'_>>, used: &mut usize, limit: usize) -> Result<String, Refusal> {
    let mut line = Vec::new();
    let remaining = u64::try_from(limit.saturating_sub(*used)).unwrap_or(u64::MAX);
    let read = reader.by_ref().take(remaining.saturating_add(1)).read_until(b'\n', &mut line);
    match read {
        Err(e) if timed_out(&e) => return Err(refuse(408, "the request took too long to arrive")),
        Err(_) => return Err(refuse(400, "the connection failed mid-request")),
        Ok(_) => {}
    }
    *used += line.len();
    if *used > limit {
        return Err(refuse(431, format!("the request line and headers are over {limit} bytes")));
    }
    if line.last() != Some(&b'\n') {
        return Err(refuse(400, "the request ended mid-line"));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| refuse(400, "the request head is not UTF-8"))
}

/// A stream whose every read gets only what is left of the request's time.
struct Deadlined<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
}

impl io::Read for Deadlined<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        let mut stream = self.stream;
        stream.read(buf)
    }
}

fn timed_out(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

fn write_response(stream: &mut TcpStream, response: &Response, head_only: bool) -> io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len()
    );
    for (name, value) in &response.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if !head_only {
        stream.write_all(&response.body)?;
    }
    stream.flush()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_bearer_token_is_authorized() {
        assert!(authorized(Some("Bearer s3cret"), "s3cret"));
        assert!(!authorized(Some("Bearer s3cre"), "s3cret"));
        assert!(!authorized(Some("Bearer s3cretX"), "s3cret"));
        assert!(!authorized(Some("bearer s3cret"), "s3cret"));
        assert!(!authorized(Some("s3cret"), "s3cret"));
        assert!(!authorized(None, "s3cret"));
    }

    #[test]
    fn a_query_parameter_is_found_by_name() {
        let request = Request {
            method: "GET".into(),
            path: "/v1/events".into(),
            query: "x=1&since=17&since=18".into(),
            headers: vec![],
            body: vec![],
        };
        assert_eq!(request.query_param("since"), Some("17"));
        assert_eq!(request.query_param("none"), None);
    }
}
