//! The board's devices. Each has the same parts: its register model, a plain-data
//! state struct (what a snapshot saves and a digest hashes), and tests beside it.

pub mod clint;
pub mod plic;
pub mod rtc;
pub mod test_device;
pub mod uart;
pub mod virtio;

use crate::io::Outputs;
use rv64::GuestRam;

/// What a device may touch while it handles an access or an input: guest RAM (for
/// DMA; every write marks pages dirty) and the output door.
pub struct DeviceCtx<'a> {
    pub ram: &'a mut GuestRam,
    pub outputs: &'a mut Outputs,
    /// Instruction count now: the stamp for any output produced.
    pub icount: u64,
}

/// A device access that the device refuses (bad offset or size): the hart turns it
/// into an access fault, as a bus error would on hardware.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessError;
