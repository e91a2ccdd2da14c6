//! `--console-socket PATH`: the guest's console on a Unix socket, beside the terminal or the
//! log, so that `ftvm vm console` can attach to a VM that an agent started with no terminal.
//! Every client gets the console output from the moment it attaches (what the VM releases:
//! under output commit, only what the backup acknowledged), and what a client writes is typed
//! on the guest's console, as an input like any other (stamped, logged and replicated).
//! A client that does not keep up with the output is dropped rather than slowing the VM.

use crate::accept;
use anyhow::{Context, Result};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc::{self, Sender, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use vmm::driver::ConsoleSink;
use vmm::host::HostEvent;

/// Clients attached at once; more are closed at accept.
const MAX_CLIENTS: usize = 8;
/// Output chunks queued for one client before it counts as stuck and is dropped.
const CLIENT_QUEUE: usize = 1024;
/// The most typed bytes taken in one read.
const MAX_INPUT_CHUNK: usize = 1024;

/// The attached clients' output queues.
#[derive(Clone, Default)]
pub struct ConsoleHub {
    clients: Arc<Mutex<Vec<SyncSender<Vec<u8>>>>>,
}

impl ConsoleHub {
    fn broadcast(&self, bytes: &[u8]) {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        clients.retain(|client| match client.try_send(bytes.to_vec()) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        });
    }

    fn attach(&self) -> mpsc::Receiver<Vec<u8>> {
        let (tx, rx) = mpsc::sync_channel(CLIENT_QUEUE);
        self.clients.lock().unwrap_or_else(|p| p.into_inner()).push(tx);
        rx
    }
}

/// Binds `path` (mode 0600, a stale socket file replaced) and serves clients on a thread:
/// their typed bytes go to `events` as console input.
pub fn serve(path: &Path, events: Sender<HostEvent>) -> Result<ConsoleHub> {
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot bind --console-socket {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let hub = ConsoleHub::default();
    let served = hub.clone();
    std::thread::Builder::new().name("console".into()).spawn(move || {
        accept::serve(listener.incoming(), MAX_CLIENTS, accept::Open::default(), move |stream: UnixStream| {
            serve_client(stream, &served, &events);
        });
    })?;
    Ok(hub)
}

/// One client: its output on a writer thread, its input read here until it hangs up.
fn serve_client(mut stream: UnixStream, hub: &ConsoleHub, events: &Sender<HostEvent>) {
    let Ok(mut out) = stream.try_clone() else { return };
    let output = hub.attach();
    std::thread::spawn(move || {
        for chunk in output {
            if out.write_all(&chunk).is_err() {
                break;
            }
        }
        // Dropped (stuck) or gone: hang up both ways.
        let _ = out.shutdown(std::net::Shutdown::Both);
    });
    let mut buf = [0u8; MAX_INPUT_CHUNK];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if events.send(HostEvent::Console(buf[..n].to_vec())).is_err() {
                    return;
                }
            }
        }
    }
}

/// A console sink that also copies everything to the attached clients.
pub struct TeeConsole {
    pub inner: Box<dyn ConsoleSink>,
    pub hub: ConsoleHub,
}

impl ConsoleSink for TeeConsole {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.hub.broadcast(bytes);
        self.inner.write(bytes)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }

    fn finish(&mut self) -> std::io::Result<()> {
        self.inner.finish()
    }

    fn rebooted(&mut self) -> std::io::Result<()> {
        self.inner.rebooted()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Null;
    impl ConsoleSink for Null {
        fn write(&mut self, _: &[u8]) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_client_sees_the_output_and_its_typing_becomes_console_input() {
        let path = std::env::temp_dir().join(format!("ftvm-console-test-{}.sock", std::process::id()));
        let (tx, rx) = mpsc::channel();
        let hub = serve(&path, tx).unwrap();
        let mut client = UnixStream::connect(&path).unwrap();
        client.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        client.write_all(b"ls\n").unwrap();
        let typed = rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        assert!(matches!(typed, HostEvent::Console(bytes) if bytes == b"ls\n"));
        // Attached by now (it was served its input): the output reaches it.
        let mut tee = TeeConsole { inner: Box::new(Null), hub };
        tee.write(b"bin etc\n").unwrap();
        let mut seen = [0u8; 8];
        client.read_exact(&mut seen).unwrap();
        assert_eq!(&seen, b"bin etc\n");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_client_that_stops_reading_is_dropped_not_waited_for() {
        let hub = ConsoleHub::default();
        let stuck = hub.attach();
        let mut tee = TeeConsole { inner: Box::new(Null), hub: hub.clone() };
        for _ in 0..=CLIENT_QUEUE {
            tee.write(b"x").unwrap();
        }
        assert!(hub.clients.lock().unwrap().is_empty(), "the stuck client was dropped");
        drop(stuck);
    }
}
