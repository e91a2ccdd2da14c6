//! Just enough of an HTTP/1.1 client to POST JSON to etcd's v3 gateway: one request per
//! connection (`Connection: close`), bounded answer sizes, timeouts on connect and on every
//! read and write. The body is delimited by Content-Length, chunked encoding or the end of
//! the connection, whichever the server uses.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// An answer larger than this is refused (the largest etcd answer ftvm asks for is a listing
/// of at most [`crate::kv::MAX_LIST_KEYS`] small values).
pub const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;
const MAX_HEADER_BYTES: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot {action}")]
    Io {
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed answer: {0}")]
    Malformed(&'static str),
    #[error("answer larger than {MAX_ANSWER_BYTES} bytes")]
    TooLarge,
}

impl HttpError {
    /// Whether the server could not be reached at all (so another endpoint may be tried and
    /// nothing was done).
    pub fn is_connect(&self) -> bool {
        matches!(self, HttpError::Io { action: "connect" | "resolve the address", .. })
    }
}

/// `POST path` with a JSON body to `authority` (HOST:PORT); returns the status and the body.
pub fn post_json(
    authority: &str,
    path: &str,
    body: &[u8],
    connect_timeout: Duration,
    io_timeout: Duration,
) -> Result<(u16, Vec<u8>), HttpError> {
    request(authority, "POST", path, &[], body, connect_timeout, io_timeout)
}

/// One request with extra header lines (`Name: value`); returns the status and the body.
pub fn request(
    authority: &str,
    method: &str,
    path: &str,
    headers: &[String],
    body: &[u8],
    connect_timeout: Duration,
    io_timeout: Duration,
) -> Result<(u16, Vec<u8>), HttpError> {
    let io = |action| move |source| HttpError::Io { action, source };
    let addrs: Vec<SocketAddr> = authority.to_socket_addrs().map_err(io("resolve the address"))?.collect();
    let addr = addrs.first().ok_or(HttpError::Malformed("the address resolves to nothing"))?;
    let mut stream = TcpStream::connect_timeout(addr, connect_timeout).map_err(io("connect"))?;
    stream.set_read_timeout(Some(io_timeout)).map_err(io("set a read timeout"))?;
    stream.set_write_timeout(Some(io_timeout)).map_err(io("set a write timeout"))?;
    let _ = stream.set_nodelay(true);
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n",
        body.len()
    );
    for header in headers {
        head.push_str(header);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    stream.write_all(&request).map_err(io("send the request"))?;
    read_answer(&mut stream)
}

fn read_answer(stream: &mut impl Read) -> Result<(u16, Vec<u8>), HttpError> {
    let mut buffer = Vec::with_capacity(4096);
    let header_end = loop {
        if let Some(end) = find(&buffer, b"\r\n\r\n") {
            break end;
        }
        if buffer.len() > MAX_HEADER_BYTES {
            return Err(HttpError::Malformed("header longer than 16 KiB"));
        }
        if read_some(stream, &mut buffer)? == 0 {
            return Err(HttpError::Malformed("the connection closed before the header ended"));
        }
    };
    let head = std::str::from_utf8(&buffer[..header_end]).map_err(|_| HttpError::Malformed("header not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or(HttpError::Malformed("no status line"))?;
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(value.parse::<usize>().map_err(|_| HttpError::Malformed("bad Content-Length"))?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked") {
            chunked = true;
        }
    }
    let mut body = buffer.split_off(header_end + 4);
    if chunked {
        while read_some(stream, &mut body)? > 0 {}
        return dechunk(&body).map(|body| (status, body));
    }
    match content_length {
        Some(length) if length > MAX_ANSWER_BYTES => return Err(HttpError::TooLarge),
        Some(length) => {
            while body.len() < length {
                if read_some(stream, &mut body)? == 0 {
                    return Err(HttpError::Malformed("the connection closed inside the body"));
                }
            }
            body.truncate(length);
        }
        None => while read_some(stream, &mut body)? > 0 {},
    }
    Ok((status, body))
}

/// Reads what is there into `buffer`, refusing to grow it past [`MAX_ANSWER_BYTES`].
fn read_some(stream: &mut impl Read, buffer: &mut Vec<u8>) -> Result<usize, HttpError> {
    let mut chunk = [0u8; 16 * 1024];
    let n = loop {
        match stream.read(&mut chunk) {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(HttpError::Io { action: "read the answer", source }),
        }
    };
    if buffer.len() + n > MAX_ANSWER_BYTES {
        return Err(HttpError::TooLarge);
    }
    buffer.extend_from_slice(&chunk[..n]);
    Ok(n)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|window| window == needle)
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, HttpError> {
    let mut body = Vec::new();
    loop {
        let line_end = find(data, b"\r\n").ok_or(HttpError::Malformed("chunk size line without an end"))?;
        let size_text = std::str::from_utf8(&data[..line_end]).map_err(|_| HttpError::Malformed("chunk size"))?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| HttpError::Malformed("chunk size not hex"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        if data.len() < size + 2 {
            return Err(HttpError::Malformed("chunk shorter than its size"));
        }
        body.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_by_length_chunks_or_close() {
        let by_length = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello and more";
        assert_eq!(read_answer(&mut &by_length[..]).unwrap(), (200, b"hello".to_vec()));
        let chunked = b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        assert_eq!(read_answer(&mut &chunked[..]).unwrap(), (201, b"abcde".to_vec()));
        let by_close = b"HTTP/1.0 404 Not Found\r\n\r\nnothing";
        assert_eq!(read_answer(&mut &by_close[..]).unwrap(), (404, b"nothing".to_vec()));
    }

    #[test]
    fn malformed_answers_are_refused() {
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"garbage\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno end of header",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n",
        ] {
            assert!(read_answer(&mut &bad[..]).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
