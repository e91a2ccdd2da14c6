//! The terminal as the guest's console: raw mode while the VM runs (restored on
//! exit, even on error), a reader thread, and the QEMU-style escape: Ctrl-A x quits,
//! Ctrl-A Ctrl-A sends a literal Ctrl-A.

use super::HostEvent;
use nix::sys::termios::{self, SetArg, Termios};
use std::io::Read;
use std::os::fd::AsFd;
use std::sync::mpsc::Sender;

const CTRL_A: u8 = 0x01;

/// Puts stdin in raw mode for as long as it lives.
pub struct RawMode {
    saved: Option<Termios>,
}

impl RawMode {
    /// Raw mode if stdin is a terminal; otherwise nothing to do.
    pub fn enter() -> RawMode {
        let stdin = std::io::stdin();
        let Ok(saved) = termios::tcgetattr(stdin.as_fd()) else {
            return RawMode { saved: None };
        };
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        // Keep output post-processing so that "\n" from the guest still returns the carriage.
        raw.output_flags |= termios::OutputFlags::OPOST | termios::OutputFlags::ONLCR;
        if termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).is_err() {
            return RawMode { saved: None };
        }
        RawMode { saved: Some(saved) }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, saved);
        }
    }
}

/// Read stdin on a thread, translating the Ctrl-A escape, until stdin closes.
pub fn spawn_reader(events: Sender<HostEvent>) {
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 256];
        let mut escape = Escape::default();
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let (bytes, quit) = escape.filter(&buf[..n]);
            if !bytes.is_empty() && events.send(HostEvent::Console(bytes)).is_err() {
                return;
            }
            if quit {
                let _ = events.send(HostEvent::Quit);
                return;
            }
        }
    });
}

/// The Ctrl-A escape state machine.
#[derive(Default)]
pub struct Escape {
    after_ctrl_a: bool,
}

impl Escape {
    /// Bytes for the guest, and whether the user asked to quit.
    pub fn filter(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len());
        for &b in input {
            if self.after_ctrl_a {
                self.after_ctrl_a = false;
                match b {
                    b'x' | b'X' => return (out, true),
                    CTRL_A => out.push(CTRL_A),
                    _ => {} // unknown escape: swallowed, as QEMU does
                }
            } else if b == CTRL_A {
                self.after_ctrl_a = true;
            } else {
                out.push(b);
            }
        }
        (out, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_a_x_quits_and_ctrl_a_ctrl_a_is_literal() {
        let mut e = Escape::default();
        assert_eq!(e.filter(b"ls\r"), (b"ls\r".to_vec(), false));
        assert_eq!(e.filter(&[b'a', CTRL_A, CTRL_A, b'b']), (vec![b'a', CTRL_A, b'b'], false));
        assert_eq!(e.filter(&[b'q', CTRL_A]), (vec![b'q'], false));
        assert_eq!(e.filter(b"x"), (vec![], true), "the escape spans reads");
    }
}
