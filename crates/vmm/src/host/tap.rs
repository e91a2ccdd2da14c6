//! An existing TAP device as the guest's network card. ftvm attaches to a TAP device
//! that the administrator (or a test) created; it never creates one, because a typo
//! would otherwise silently make a new, unconnected device.

use super::HostEvent;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::mpsc::Sender;

const IFF_TAP: libc_short = 0x0002;
const IFF_NO_PI: libc_short = 0x1000;
/// Largest frame read from the TAP device (jumbo frames are not configured).
const MAX_FRAME: usize = 65_536;
#[allow(non_camel_case_types)]
type libc_short = i16;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc_short,
    _pad: [u8; 22],
}

nix::ioctl_write_ptr_bad!(tunsetiff, 0x4004_54ca, IfReq);

/// Why a TAP device could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP device name {0:?} is not a valid interface name (1 to 15 characters, no '/')")]
    BadName(String),
    #[error("TAP device {0} does not exist (create it first, e.g. `ip tuntap add {0} mode tap`)")]
    Missing(String),
    #[error("network device {0} is not a TAP device")]
    NotATap(String),
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] std::io::Error),
    #[error("cannot attach to TAP device {name} (is it in use or owned by another user?)")]
    Attach { name: String, source: nix::Error },
    #[error("cannot duplicate the TAP file descriptor")]
    Duplicate(#[source] std::io::Error),
    #[error("cannot {what}")]
    Flags { what: &'static str, source: nix::Error },
}

type Result<T, E = TapError> = std::result::Result<T, E>;

pub struct Tap {
    file: File,
    pub name: String,
}

impl Tap {
    /// Attach to the existing TAP device `name`.
    pub fn open(name: &str) -> Result<Tap> {
        if name.is_empty() || name.len() > 15 || name.contains('/') {
            return Err(TapError::BadName(name.to_string()));
        }
        let sys = Path::new("/sys/class/net").join(name);
        if !sys.exists() {
            return Err(TapError::Missing(name.to_string()));
        }
        if !sys.join("tun_flags").exists() {
            return Err(TapError::NotATap(name.to_string()));
        }
        let file = OpenOptions::new().read(true).write(true).open("/dev/net/tun").map_err(TapError::OpenTun)?;
        let mut req = IfReq { name: [0; 16], flags: IFF_TAP | IFF_NO_PI, _pad: [0; 22] };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads a struct ifreq; IfReq has ifreq's layout (16-byte name,
        // short flags, padding to 40 bytes) and lives for the whole call.
        unsafe { tunsetiff(file.as_raw_fd(), &req) }
            .map_err(|source| TapError::Attach { name: name.to_string(), source })?;
        Ok(Tap { file, name: name.to_string() })
    }

    /// A TAP device attached by another process (a keeper, `--resilient`), by descriptor.
    pub fn from_fd(fd: std::os::fd::OwnedFd, name: &str) -> Tap {
        Tap { file: File::from(fd), name: name.to_string() }
    }

    /// The descriptor, for a process that passes it on (a keeper to its monitors).
    pub fn into_fd(self) -> std::os::fd::OwnedFd {
        self.file.into()
    }

    /// Read frames on a thread and send them to the driver.
    pub fn spawn_reader(&self, events: Sender<HostEvent>) -> Result<()> {
        let mut file = self.file.try_clone().map_err(TapError::Duplicate)?;
        std::thread::spawn(move || {
            let mut buf = vec![0u8; MAX_FRAME];
            loop {
                match file.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if events.send(HostEvent::NetFrame(buf[..n].to_vec())).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(())
    }

    /// A second handle on the same device (for a sender apart from the driver's).
    pub fn clone_handle(&self) -> Result<Tap> {
        Ok(Tap { file: self.file.try_clone().map_err(TapError::Duplicate)?, name: self.name.clone() })
    }

    /// Throw away the frames queued on the device: a backup keeps its TAP attached while it
    /// waits (so that the kernel has its carrier up when the backup takes over), and what
    /// arrived meanwhile was meant for the old primary's guest.
    pub fn discard_pending(&self) -> Result<usize> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let fd = self.file.as_raw_fd();
        let flags_error = |what| move |source| TapError::Flags { what, source };
        let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(flags_error("read the TAP's flags"))?;
        let flags = OFlag::from_bits_truncate(flags);
        fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map_err(flags_error("set the TAP non-blocking"))?;
        let mut buf = vec![0u8; MAX_FRAME];
        let mut discarded = 0;
        let mut file = &self.file;
        while let Ok(n) = file.read(&mut buf) {
            if n == 0 {
                break;
            }
            discarded += 1;
        }
        fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(flags_error("set the TAP back to blocking"))?;
        Ok(discarded)
    }

    /// Send a frame the guest transmitted.
    pub fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.file.write_all(frame)
    }
}

const _: () = assert!(std::mem::size_of::<IfReq>() == 40);
