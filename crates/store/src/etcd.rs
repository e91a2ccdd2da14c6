//! A [`KvStore`] on etcd, through etcd's v3 JSON gateway (`POST /v3/kv/range`, `/put`,
//! `/txn`, `/deleterange`; keys and values in base64) over plain HTTP on the client port.
//!
//! Why the gateway and not the etcd-client crate (measured 2026-12-01 on a shared 2-core
//! host, etcd 3.4.23 from Debian):
//! - etcd-client 0.14 generates its gRPC code in its build script with tonic-build, which
//!   runs `protoc`. protoc-bin-vendored ships one, but a dependency's build script sees only
//!   the `PROTOC` environment variable, which our crate cannot set for it: every user would
//!   have to export PROTOC (or we would commit a machine-specific `.cargo/config.toml`), and
//!   "the README's first command builds with nothing but Rust" would no longer hold.
//! - Size: etcd-client + tokio is 135 crates and a 51 s clean release build
//!   (`PROTOC=… cargo build --release -j2` of a crate depending on etcd-client 0.14, tokio and
//!   protoc-bin-vendored 3); this whole crate, gateway included, is 26 crates and 26 s
//!   (`CARGO_TARGET_DIR=fresh cargo build --release -p store -j2`); the gateway adds base64.
//! - Takeover cost (a read, then a compare-and-swap): 0.7 ms with etcd-client over one kept
//!   gRPC connection, 2.4 ms here (three requests, each on a new loopback connection; test
//!   `takeover_store_work_is_timed` prints it). Both are far below failure detection
//!   (≥ 60 ms), so the smaller, synchronous client wins.
//!
//! Several endpoints may be given (`etcd:http://a:2379,http://b:2379`): a request goes to the
//! endpoint that answered last and moves on to the next one only when a connection cannot be
//! made (so a request is never sent twice to two members).

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde_json::{json, Value};

use crate::http::{self, HttpError};
use crate::kv::{validate_key, Expect, KvEntry, KvStore, MAX_LIST_KEYS, MAX_VALUE_BYTES};
use crate::StoreError;

/// How long to wait for a TCP connection to an endpoint.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a request may take once connected.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// At most this many endpoints in one spec.
pub const MAX_ENDPOINTS: usize = 16;

/// An etcd cluster reached through its JSON gateway.
#[derive(Debug, Clone)]
pub struct EtcdKv {
    /// HOST:PORT of each member's client URL.
    endpoints: Vec<String>,
    /// The one that answered last.
    current: usize,
}

impl EtcdKv {
    /// Parses `http://HOST:PORT[,http://HOST:PORT...]` (the part after `etcd:`).
    pub fn new(urls: &str) -> Result<EtcdKv, StoreError> {
        let bad = |problem| StoreError::BadSpec { spec: format!("etcd:{urls}"), problem };
        let mut endpoints = Vec::new();
        for url in urls.split(',') {
            let authority = url.trim().strip_prefix("http://").ok_or(bad("each etcd URL starts with http://"))?;
            let authority = authority.trim_end_matches('/');
            if authority.is_empty() || authority.contains('/') || !authority.contains(':') {
                return Err(bad("each etcd URL is http://HOST:PORT"));
            }
            endpoints.push(authority.to_string());
        }
        if endpoints.len() > MAX_ENDPOINTS {
            return Err(bad("at most 16 etcd endpoints"));
        }
        Ok(EtcdKv { endpoints, current: 0 })
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// POSTs `body` to `path` on the first endpoint that accepts a connection.
    fn call(&mut self, path: &str, body: Value) -> Result<Value, StoreError> {
        let bytes = body.to_string().into_bytes();
        let count = self.endpoints.len();
        let mut last_error = None;
        for attempt in 0..count {
            let index = (self.current + attempt) % count;
            let endpoint = &self.endpoints[index];
            match http::post_json(endpoint, path, &bytes, CONNECT_TIMEOUT, REQUEST_TIMEOUT) {
                Ok((status, answer)) => {
                    self.current = index;
                    return parse_answer(endpoint, status, &answer);
                }
                Err(error) if error.is_connect() => last_error = Some((endpoint.clone(), error)),
                Err(source) => return Err(StoreError::EtcdRequest { endpoint: endpoint.clone(), source }),
            }
        }
        let (endpoint, source) =
            last_error.unwrap_or_else(|| ("(no endpoint)".to_string(), HttpError::Malformed("no etcd endpoint given")));
        Err(StoreError::EtcdRequest { endpoint, source })
    }

    fn endpoint(&self) -> String {
        self.endpoints.get(self.current).cloned().unwrap_or_default()
    }

    fn malformed(&self, what: impl Into<String>) -> StoreError {
        StoreError::EtcdAnswer { endpoint: self.endpoint(), problem: what.into() }
    }

    fn decode_kv(&self, kv: &Value) -> Result<(String, KvEntry), StoreError> {
        let key = decode_b64(kv.get("key")).ok_or_else(|| self.malformed("a key that is not base64"))?;
        let key = String::from_utf8(key).map_err(|_| self.malformed("a key that is not UTF-8"))?;
        let value = decode_b64(kv.get("value")).unwrap_or_default();
        if value.len() > MAX_VALUE_BYTES {
            return Err(self.malformed(format!("key {key} holds more than {MAX_VALUE_BYTES} bytes")));
        }
        let mod_revision = int64(kv.get("mod_revision")).ok_or_else(|| self.malformed("no mod_revision"))?;
        Ok((key, KvEntry { value, mod_revision }))
    }

    fn range(&mut self, key: &str, range_end: Option<Vec<u8>>) -> Result<Vec<(String, KvEntry)>, StoreError> {
        let mut body = json!({ "key": BASE64.encode(key), "limit": (MAX_LIST_KEYS + 1).to_string() });
        if let Some(end) = range_end {
            body["range_end"] = json!(BASE64.encode(end));
        }
        let answer = self.call("/v3/kv/range", body)?;
        let kvs = match answer.get("kvs") {
            None => return Ok(Vec::new()),
            Some(Value::Array(kvs)) => kvs,
            Some(_) => return Err(self.malformed("kvs is not a list")),
        };
        if kvs.len() > MAX_LIST_KEYS {
            return Err(StoreError::TooManyKeys { prefix: key.to_string() });
        }
        kvs.iter().map(|kv| self.decode_kv(kv)).collect()
    }

    fn txn(&mut self, compare: Value, success: Value) -> Result<bool, StoreError> {
        let answer = self.call("/v3/kv/txn", json!({ "compare": [compare], "success": [success] }))?;
        // proto3 JSON leaves out a false bool.
        Ok(answer.get("succeeded").and_then(Value::as_bool).unwrap_or(false))
    }
}

/// The compare of a transaction that holds when the key is as `expect` says.
fn compare(key: &str, expect: Expect) -> Value {
    match expect {
        Expect::Absent => {
            json!({"result": "EQUAL", "target": "CREATE", "key": BASE64.encode(key), "create_revision": "0"})
        }
        Expect::ModRevision(revision) => {
            json!({"result": "EQUAL", "target": "MOD", "key": BASE64.encode(key), "mod_revision": revision.to_string()})
        }
    }
}

/// The end of the range of keys starting with `prefix`: the prefix with its last byte raised.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    // Keys are ASCII, so the last byte is below 0x7f and raising it cannot overflow.
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

fn decode_b64(value: Option<&Value>) -> Option<Vec<u8>> {
    BASE64.decode(value?.as_str()?).ok()
}

/// proto3 JSON writes an int64 as a string; accept a number too.
fn int64(value: Option<&Value>) -> Option<u64> {
    match value? {
        Value::String(text) => text.parse().ok(),
        Value::Number(number) => number.as_u64(),
        _ => None,
    }
}

fn parse_answer(endpoint: &str, status: u16, body: &[u8]) -> Result<Value, StoreError> {
    let answer: Value = serde_json::from_slice(body).map_err(|e| StoreError::EtcdAnswer {
        endpoint: endpoint.to_string(),
        problem: format!("HTTP {status} with a body that is not JSON ({e})"),
    })?;
    if status != 200 {
        let message = answer.get("message").or(answer.get("error")).and_then(Value::as_str).unwrap_or("no message");
        return Err(StoreError::EtcdAnswer {
            endpoint: endpoint.to_string(),
            problem: format!("HTTP {status}: {message}"),
        });
    }
    Ok(answer)
}

impl KvStore for EtcdKv {
    fn get(&mut self, key: &str) -> Result<Option<KvEntry>, StoreError> {
        validate_key(key)?;
        let mut found = self.range(key, None)?;
        match found.pop() {
            Some((found_key, entry)) if found_key == key => Ok(Some(entry)),
            Some((found_key, _)) => Err(self.malformed(format!("asked for {key}, got {found_key}"))),
            None => Ok(None),
        }
    }

    fn list(&mut self, prefix: &str) -> Result<Vec<(String, KvEntry)>, StoreError> {
        validate_key(prefix)?;
        let found = self.range(prefix, Some(prefix_end(prefix)))?;
        if let Some((key, _)) = found.iter().find(|(key, _)| validate_key(key).is_err()) {
            return Err(self.malformed(format!("a key ftvm does not write: {key:?}")));
        }
        Ok(found)
    }

    fn put(&mut self, key: &str, value: &[u8]) -> Result<u64, StoreError> {
        crate::kv::check_value(key, value)?;
        let answer = self.call("/v3/kv/put", json!({ "key": BASE64.encode(key), "value": BASE64.encode(value) }))?;
        int64(answer.get("header").and_then(|h| h.get("revision"))).ok_or_else(|| self.malformed("no revision"))
    }

    fn put_if(&mut self, key: &str, expect: Expect, value: &[u8]) -> Result<bool, StoreError> {
        crate::kv::check_value(key, value)?;
        let put = json!({"request_put": { "key": BASE64.encode(key), "value": BASE64.encode(value) }});
        self.txn(compare(key, expect), put)
    }

    fn delete(&mut self, key: &str) -> Result<(), StoreError> {
        validate_key(key)?;
        self.call("/v3/kv/deleterange", json!({ "key": BASE64.encode(key) })).map(drop)
    }

    fn delete_if(&mut self, key: &str, mod_revision: u64) -> Result<bool, StoreError> {
        validate_key(key)?;
        let delete = json!({"request_delete_range": { "key": BASE64.encode(key) }});
        self.txn(compare(key, Expect::ModRevision(mod_revision)), delete)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_name_their_problem() {
        assert_eq!(EtcdKv::new("http://a:1,http://b:2").unwrap().endpoints(), ["a:1", "b:2"]);
        assert_eq!(EtcdKv::new("http://127.0.0.1:2379/").unwrap().endpoints(), ["127.0.0.1:2379"]);
        for (bad, problem) in [
            ("https://a:1", "each etcd URL starts with http://"),
            ("a:1", "each etcd URL starts with http://"),
            ("http://a", "each etcd URL is http://HOST:PORT"),
            ("http://a:1/v3", "each etcd URL is http://HOST:PORT"),
        ] {
            let message = EtcdKv::new(bad).unwrap_err().to_string();
            assert_eq!(
                message,
                format!(
                    "ownership store \"etcd:{bad}\": {problem}; accepted forms: file:DIR, etcd:http://HOST:PORT[,...]"
                )
            );
        }
    }

    #[test]
    fn a_prefix_range_ends_after_the_prefix() {
        assert_eq!(prefix_end("/ftvm/vms/"), b"/ftvm/vms0");
    }

    #[test]
    fn an_unreachable_etcd_is_an_error_naming_it() {
        // A port nothing listens on: bind one, learn it, close it.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut kv = EtcdKv::new(&format!("http://127.0.0.1:{port}")).unwrap();
        let error = kv.get("/a").unwrap_err();
        assert!(error.is_unreachable());
        let source = std::error::Error::source(&error).map(ToString::to_string);
        assert_eq!((error.to_string(), source), (format!("etcd 127.0.0.1:{port}"), Some("cannot connect".into())));
    }
}
