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
    Control(crate::control::ControlRequest),
    /// Output commit: the backup holds every epoch up to this one.
    Released {
        up_to_epoch: u64,
    },
    /// The replication layer says this replica must stop (another replica owns the VM).
    ReplicationStopped(String),
    /// The replication layer settled the VM's end (the backup told, or the ownership record
    /// marked ended): exit with `exit_code`; `released` whether the last outputs were released.
    Finished {
        exit_code: u32,
        released: bool,
    },
    /// Replication stopped (unprotect): no backup can take over at or after `generation`;
    /// the replication thread hands the ownership record back when it is shut down.
    Detached {
        generation: u64,
    },
}

/// Host entropy for the guest's RNG device (logged as an input like any other).
///
/// getrandom(2) rather than /dev/urandom: it needs no file descriptor, so a process whose
/// descriptors ran out (a flood of connections) still gets its randomness.
pub fn entropy(len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0; len];
    getrandom::fill(&mut buf).map_err(std::io::Error::other)?;
    Ok(buf)
}
