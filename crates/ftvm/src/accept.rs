//! One accept loop for the binary's small servers (the control API's Unix socket,
//! `--metrics-listen`, the agent's cloud API): each connection gets a thread, at most
//! `limit` at once. A stranger who opens connections and sends nothing holds a slot only
//! until the server's read timeout, and never more than `limit` descriptors: connections
//! beyond it are closed at accept, so the monitor keeps the descriptors its VM needs (a
//! flood of idle connections once made a backup exit with "Too many open files").

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Connections being served, shared by the loop and the handlers' guards.
#[derive(Clone, Default)]
pub struct Open(Arc<AtomicUsize>);

impl Open {
    /// How many connections are being served now.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }

    /// A slot, if fewer than `limit` are taken; given back when the guard drops.
    fn take(&self, limit: usize) -> Option<Slot> {
        let mut now = self.0.load(Ordering::Acquire);
        loop {
            if now >= limit {
                return None;
            }
            match self.0.compare_exchange_weak(now, now + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(Slot(self.0.clone())),
                Err(seen) => now = seen,
            }
        }
    }
}

struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves each connection of `incoming` with `handle` on a thread of its own, at most
/// `limit` at once (counted in `open`); runs until `incoming` ends. An accept that fails
/// (out of descriptors, say) is retried after a short pause rather than ending the loop.
pub fn serve<S, I, F>(incoming: I, limit: usize, open: Open, handle: F)
where
    I: Iterator<Item = std::io::Result<S>>,
    S: Send + 'static,
    F: Fn(S) + Send + Sync + 'static,
{
    let handle = Arc::new(handle);
    for stream in incoming {
        let Ok(stream) = stream else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        // Over the limit: dropping the stream closes it at once.
        let Some(slot) = open.take(limit) else { continue };
        let handle = handle.clone();
        // A thread that cannot start drops its closure, and the stream and slot with it.
        let _ = std::thread::Builder::new().spawn(move || {
            handle(stream);
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};

    #[test]
    fn connections_beyond_the_limit_are_closed_and_slots_come_back() {
        let path = std::env::temp_dir().join(format!("ftvm-accept-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let open = Open::default();
        let seen = open.clone();
        std::thread::spawn(move || {
            serve(listener.incoming(), 2, seen, |mut s: UnixStream| {
                let mut byte = [0u8; 1];
                // Held until the client speaks, like an idle stranger.
                if s.read_exact(&mut byte).is_ok() {
                    let _ = s.write_all(b"ok");
                }
            })
        });
        let idle: Vec<UnixStream> = (0..2).map(|_| UnixStream::connect(&path).unwrap()).collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while open.count() < 2 {
            assert!(std::time::Instant::now() < deadline, "the two idle connections were never served");
            std::thread::sleep(Duration::from_millis(5));
        }
        // A third is closed at once: its read sees the end, not an answer.
        let mut third = UnixStream::connect(&path).unwrap();
        third.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = third.write_all(b"x");
        let mut got = Vec::new();
        let _ = third.read_to_end(&mut got);
        assert_eq!(got, b"", "a connection over the limit was served");
        // Once the idle ones leave, a newcomer is served.
        drop(idle);
        while open.count() > 0 {
            assert!(std::time::Instant::now() < deadline, "slots were not given back");
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut fourth = UnixStream::connect(&path).unwrap();
        fourth.write_all(b"x").unwrap();
        let mut answer = Vec::new();
        fourth.read_to_end(&mut answer).unwrap();
        assert_eq!(answer, b"ok");
        let _ = std::fs::remove_file(&path);
    }
}
