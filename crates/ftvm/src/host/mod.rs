//! The host side of the machine's doors: the terminal, TAP devices, entropy. Each
//! source runs on its own thread and sends [`HostEvent`]s to the driver, which stamps
//! them with the instruction count at which they enter the machine.

pub mod announce;
pub mod console;
pub mod tap;

/// Something from the outside world for the guest.
#[derive(Debug)]
pub enum HostEvent {
    Console(Vec<u8>),
    /// The user pressed Ctrl-A x.
    Quit,
    NetFrame(Vec<u8>),
    /// A request from the control API.
    Control(crate::api::ControlRequest),
    /// Output commit: the backup holds every epoch up to this one.
    Released {
        up_to_epoch: u64,
    },
    /// The replication layer says this replica must stop (it lost the lease).
    ReplicationStopped(String),
}

/// Host entropy for the guest's RNG device (logged as an input like any other).
pub fn entropy(len: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = vec![0; len];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf)
}
