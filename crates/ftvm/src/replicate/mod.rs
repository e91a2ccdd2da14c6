//! Checkpoint replication at the edges: sockets, threads, clocks and the lease file
//! around the pure protocol core of the `replica` crate.
//!
//! - [`primary`]: the replication thread of a running VM (`ftvm run --replicate-to`).
//! - [`backup`]: `ftvm backup`, which holds the last whole checkpoint and takes over.

pub mod backup;
pub mod primary;

use anyhow::{bail, Context, Result};
use replica::{Nonce, PresharedKey};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock milliseconds: the lease file is shared between hosts' views of time, and
/// the protocol's timeouts use the same clock as the lease.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Fresh random bytes for nonces and run ids.
pub fn random<const N: usize>() -> Result<[u8; N]> {
    let bytes = crate::host::entropy(N).context("cannot read host randomness")?;
    Ok(bytes.try_into().expect("asked for N bytes"))
}

pub fn nonce() -> Result<Nonce> {
    random()
}

/// The pre-shared key from a file (its bytes, trailing newline removed).
pub fn load_key(path: &Path) -> Result<PresharedKey> {
    let mut bytes = std::fs::read(path).with_context(|| format!("cannot read key file {}", path.display()))?;
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    PresharedKey::new(&bytes).with_context(|| format!("key file {}", path.display()))
}

/// A `host:port` address, resolved.
pub fn resolve(addr: &str) -> Result<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    let mut addrs = addr.to_socket_addrs().with_context(|| format!("{addr:?} is not an address (HOST:PORT)"))?;
    match addrs.next() {
        Some(a) => Ok(a),
        None => bail!("{addr:?} resolves to no address"),
    }
}
