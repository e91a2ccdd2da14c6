//! virtio devices on the virtio-mmio transport (virtio v1.2, modern only): block (§5.2),
//! network (§5.1) and entropy (§5.4). [`mmio`] is the register model, [`queue`] the
//! split virtqueues over guest RAM, and each device lives in its own file.
//!
//! The guest driver is untrusted: anything malformed it puts in a queue leaves the
//! device in DEVICE_NEEDS_RESET (or completes the request with an error status where
//! the device's section of the spec defines one); nothing it does can panic the VMM.

pub mod blk;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod rng;

#[cfg(test)]
mod testing;

pub use mmio::{VirtioMmio, VirtioMmioState};
pub use queue::{Queue, QueueError};

use crate::devices::DeviceCtx;
use std::path::PathBuf;

/// Feature bit every modern device offers and every modern driver must accept.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device type numbers (virtio v1.2 §5).
pub const DEVICE_ID_NET: u32 = 1;
pub const DEVICE_ID_BLK: u32 = 2;
pub const DEVICE_ID_RNG: u32 = 4;

/// Errors from building a device, using its backing file, or restoring its state.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error("cannot open disk image {path}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("disk image {path} is {size_bytes} bytes, not a multiple of 512-byte sectors; resize it (e.g. `truncate -s` to a multiple of 512)")]
    SizeNotSectorMultiple { path: PathBuf, size_bytes: u64 },
    #[error("disk image {path}: I/O error at sector {sector}")]
    Io { path: PathBuf, sector: u64, source: std::io::Error },
    #[error("disk image {path}: sectors {sector}..+{count} are beyond its {capacity_sectors} sectors")]
    SectorOutOfRange { path: PathBuf, sector: u64, count: u64, capacity_sectors: u64 },
    #[error("disk image {path} is read-only")]
    ReadOnly { path: PathBuf },
    #[error("the saved virtio state is of the {found} device, this one is the {expected} device")]
    DeviceMismatch { expected: &'static str, found: &'static str },
    #[error("invalid virtio {device} state: {problem}")]
    InvalidState { device: &'static str, problem: String },
}

/// The device behind a virtio-mmio transport.
#[derive(Debug)]
pub enum VirtioDevice {
    Blk(blk::Blk),
    Net(net::Net),
    Rng(rng::Rng),
}

/// A device's own state (beyond the transport's), as plain data.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum VirtioDeviceState {
    Blk(blk::BlkState),
    Net(net::NetState),
    Rng(rng::RngState),
}

impl VirtioDeviceState {
    pub fn kind(&self) -> &'static str {
        match self {
            VirtioDeviceState::Blk(_) => "block",
            VirtioDeviceState::Net(_) => "network",
            VirtioDeviceState::Rng(_) => "entropy",
        }
    }
}

impl VirtioDevice {
    pub fn kind(&self) -> &'static str {
        match self {
            VirtioDevice::Blk(_) => "block",
            VirtioDevice::Net(_) => "network",
            VirtioDevice::Rng(_) => "entropy",
        }
    }

    pub fn device_id(&self) -> u32 {
        match self {
            VirtioDevice::Blk(_) => DEVICE_ID_BLK,
            VirtioDevice::Net(_) => DEVICE_ID_NET,
            VirtioDevice::Rng(_) => DEVICE_ID_RNG,
        }
    }

    /// The feature bits offered to the driver.
    pub fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | match self {
                VirtioDevice::Blk(blk) => blk.features(),
                VirtioDevice::Net(_) => net::FEATURES,
                VirtioDevice::Rng(_) => 0,
            }
    }

    pub fn queue_count(&self) -> usize {
        match self {
            VirtioDevice::Blk(_) => 1,
            VirtioDevice::Net(_) => net::QUEUE_COUNT,
            VirtioDevice::Rng(_) => 1,
        }
    }

    /// The device-specific configuration space (at 0x100 of the window).
    pub fn config(&self) -> Vec<u8> {
        match self {
            VirtioDevice::Blk(blk) => blk.config(),
            VirtioDevice::Net(net) => net.config(),
            VirtioDevice::Rng(_) => Vec::new(),
        }
    }

    /// The driver notified queue `index`: process it. Returns whether to raise the
    /// used-buffer interrupt.
    fn notify(&mut self, index: usize, queues: &mut [Queue], ctx: &mut DeviceCtx) -> Result<bool, QueueError> {
        match self {
            VirtioDevice::Blk(blk) => blk.process(&mut queues[0], ctx.ram),
            VirtioDevice::Net(net) => net.notify(index, queues, ctx),
            VirtioDevice::Rng(rng) => rng.process(&mut queues[0], ctx.ram),
        }
    }

    /// The driver wrote Status = 0: forget everything tied to the driver's session.
    fn reset(&mut self) {
        match self {
            VirtioDevice::Blk(_) => {}
            VirtioDevice::Net(net) => net.reset(),
            VirtioDevice::Rng(rng) => rng.reset(),
        }
    }

    pub fn state(&self) -> VirtioDeviceState {
        match self {
            VirtioDevice::Blk(blk) => VirtioDeviceState::Blk(blk.state()),
            VirtioDevice::Net(net) => VirtioDeviceState::Net(net.state()),
            VirtioDevice::Rng(rng) => VirtioDeviceState::Rng(rng.state()),
        }
    }

    /// Validates `state` against this device's configuration, then adopts it; on an
    /// error nothing has changed.
    fn restore(&mut self, state: VirtioDeviceState) -> Result<(), VirtioError> {
        match (self, state) {
            (VirtioDevice::Blk(blk), VirtioDeviceState::Blk(s)) => blk.restore(s),
            (VirtioDevice::Net(net), VirtioDeviceState::Net(s)) => net.restore(s),
            (VirtioDevice::Rng(rng), VirtioDeviceState::Rng(s)) => rng.restore(s),
            (device, state) => Err(VirtioError::DeviceMismatch { expected: device.kind(), found: state.kind() }),
        }
    }

    /// Whether [`VirtioDevice::restore`] would accept `state`; changes nothing.
    fn check_state(&self, state: &VirtioDeviceState) -> Result<(), VirtioError> {
        match (self, state) {
            (VirtioDevice::Blk(blk), VirtioDeviceState::Blk(s)) => blk.check_state(s),
            (VirtioDevice::Net(net), VirtioDeviceState::Net(s)) => net.check_state(s),
            (VirtioDevice::Rng(rng), VirtioDeviceState::Rng(s)) => rng.check_state(s),
            (device, state) => Err(VirtioError::DeviceMismatch { expected: device.kind(), found: state.kind() }),
        }
    }
}
