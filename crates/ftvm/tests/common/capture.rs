//! A packet capture on one interface of a namespace (an AF_PACKET socket), keeping the
//! frames of one ethertype with the moment each arrived: what the network really saw,
//! as a switch port would.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

pub const ETHERTYPE_RARP: u16 = 0x8035;

/// Frames with the moment each arrived.
type Frames = Arc<Mutex<Vec<(Instant, Vec<u8>)>>>;

pub struct Capture {
    frames: Frames,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Capture {
    /// Start capturing frames of `ethertype` received on `interface` inside `ns`.
    pub fn start(ns: &str, interface: &str, ethertype: u16) -> Capture {
        let netns = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("the namespace exists");
        let frames: Frames = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (f, s) = (frames.clone(), stop.clone());
        let interface = std::ffi::CString::new(interface).expect("an interface name");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns for the capture");
            let socket = open(&interface, ethertype);
            ready_tx.send(()).expect("the test waits");
            let mut buf = vec![0u8; 2048];
            while !s.load(Ordering::Relaxed) {
                // SAFETY: `buf` is valid for writes of its length for the whole call, and the
                // descriptor is an open socket owned by `socket`.
                let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n > 0 {
                    f.lock().expect("not poisoned").push((Instant::now(), buf[..n as usize].to_vec()));
                }
            }
        });
        ready_rx.recv().expect("the capture started");
        Capture { frames, stop, thread: Some(thread) }
    }

    /// The frames seen so far, with their arrival.
    pub fn frames(&self) -> Vec<(Instant, Vec<u8>)> {
        self.frames.lock().expect("not poisoned").clone()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A raw packet socket bound to `interface` for `ethertype`, with a short receive timeout
/// so that the capture thread sees its stop flag.
fn open(interface: &std::ffi::CStr, ethertype: u16) -> OwnedFd {
    let protocol = ethertype.to_be();
    // SAFETY: plain system call with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol)) };
    assert!(fd >= 0, "cannot open a packet socket: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `interface` is a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(interface.as_ptr()) };
    assert!(index != 0, "no interface {interface:?}");
    // SAFETY: sockaddr_ll is plain data, for which all zeroes is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol;
    addr.sll_ifindex = index as i32;
    // SAFETY: `addr` is a valid sockaddr_ll and the length given is its size.
    let bound = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    assert!(bound == 0, "cannot bind the packet socket: {}", std::io::Error::last_os_error());
    let timeout = libc::timeval { tv_sec: 0, tv_usec: 20_000 };
    // SAFETY: `timeout` is a valid timeval and the length given is its size.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    assert!(set == 0, "cannot set the capture's timeout: {}", std::io::Error::last_os_error());
    socket
}

/// Whether `frame` is a RARP announcement of `mac` (sender hardware address).
pub fn announces(frame: &[u8], mac: [u8; 6]) -> bool {
    frame.len() >= 28 && frame[12..14] == ETHERTYPE_RARP.to_be_bytes() && frame[22..28] == mac
}
