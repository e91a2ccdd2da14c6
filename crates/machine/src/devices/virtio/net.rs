//! virtio network device (virtio v1.2 §5.1): one receive and one transmit queue, a
//! fixed MAC, no offloads. Transmitted frames leave through the output door; received
//! frames come in as inputs and wait in a bounded queue until the driver posts a
//! receive buffer.
//!
//! Bounds: frames longer than [`MAX_FRAME_BYTES`] are dropped either way; at most
//! [`RX_PENDING_MAX_FRAMES`] received frames wait for buffers, and frames beyond that
//! are dropped, as a real NIC drops when its ring is full. Every drop is counted in
//! [`NetStats`]; all of this is a function of the inputs, so it replays exactly.

use super::queue::{Queue, QueueError};
use super::VirtioError;
use crate::devices::DeviceCtx;
use crate::io::OutputKind;
use rv64::GuestRam;
use std::collections::VecDeque;

/// The device has a fixed MAC address in its configuration space.
pub const FEATURE_MAC: u64 = 1 << 5;
/// Device-specific features offered (VERSION_1 is added by the transport).
pub const FEATURES: u64 = FEATURE_MAC;

pub const QUEUE_COUNT: usize = 2;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;

/// struct virtio_net_hdr_v1: the header before every frame in both directions.
pub const NET_HDR_BYTES: usize = 12;
/// Largest frame carried (Linux's 64 KiB GSO frames plus an Ethernet and VLAN header),
/// without the virtio header.
pub const MAX_FRAME_BYTES: usize = 65550;
/// Received frames that may wait for receive buffers.
pub const RX_PENDING_MAX_FRAMES: usize = 256;

/// Frame and drop counts since the device was created.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct NetStats {
    pub rx_frames: u64,
    pub tx_frames: u64,
    /// Received frames longer than MAX_FRAME_BYTES.
    pub rx_dropped_oversize: u64,
    /// Received while the driver had not set up the device.
    pub rx_dropped_not_ready: u64,
    /// Received while RX_PENDING_MAX_FRAMES frames were already waiting.
    pub rx_dropped_queue_full: u64,
    /// Larger than the receive buffer the driver posted.
    pub rx_dropped_buffer_too_small: u64,
    /// Transmit requests shorter than the header or longer than the largest frame.
    pub tx_dropped_malformed: u64,
}

#[derive(Debug)]
pub struct Net {
    mac: [u8; 6],
    rx_pending: VecDeque<Vec<u8>>,
    stats: NetStats,
}

/// The network device's state, as plain data.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NetState {
    pub mac: [u8; 6],
    pub rx_pending: Vec<Vec<u8>>,
    pub stats: NetStats,
}

/// The header on a received frame: no offloads, one buffer.
fn rx_header() -> [u8; NET_HDR_BYTES] {
    let mut header = [0u8; NET_HDR_BYTES];
    header[10..12].copy_from_slice(&1u16.to_le_bytes()); // num_buffers
    header
}

impl Net {
    pub fn new(mac: [u8; 6]) -> Net {
        Net { mac, rx_pending: VecDeque::with_capacity(RX_PENDING_MAX_FRAMES), stats: NetStats::default() }
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub fn stats(&self) -> &NetStats {
        &self.stats
    }

    /// Received frames waiting for a receive buffer.
    pub fn rx_pending_frames(&self) -> usize {
        self.rx_pending.len()
    }

    /// struct virtio_net_config up to the MAC (no STATUS, MQ or MTU offered).
    pub(super) fn config(&self) -> Vec<u8> {
        self.mac.to_vec()
    }

    pub(super) fn reset(&mut self) {
        self.rx_pending.clear();
    }

    pub(super) fn notify(&mut self, index: usize, queues: &mut [Queue], ctx: &mut DeviceCtx) -> Result<bool, QueueError> {
        match index {
            RX_QUEUE => self.flush_rx(&mut queues[RX_QUEUE], ctx.ram),
            TX_QUEUE => self.transmit(&mut queues[TX_QUEUE], ctx),
            _ => Ok(false),
        }
    }

    /// Takes a received frame; `live` says the driver has the device running.
    /// Returns whether the frame was taken (delivered or queued) and the queue result.
    pub(super) fn receive(
        &mut self,
        frame: &[u8],
        live: bool,
        queues: &mut [Queue],
        ctx: &mut DeviceCtx,
    ) -> (bool, Result<bool, QueueError>) {
        let drop_counter = if frame.len() > MAX_FRAME_BYTES {
            Some(&mut self.stats.rx_dropped_oversize)
        } else if !live || !queues[RX_QUEUE].ready {
            Some(&mut self.stats.rx_dropped_not_ready)
        } else if self.rx_pending.len() >= RX_PENDING_MAX_FRAMES {
            Some(&mut self.stats.rx_dropped_queue_full)
        } else {
            None
        };
        if let Some(counter) = drop_counter {
            *counter += 1;
            return (false, Ok(false));
        }
        self.rx_pending.push_back(frame.to_vec());
        (true, self.flush_rx(&mut queues[RX_QUEUE], ctx.ram))
    }

    /// Moves waiting frames into the driver's receive buffers, in arrival order.
    fn flush_rx(&mut self, queue: &mut Queue, ram: &mut GuestRam) -> Result<bool, QueueError> {
        let mut used = false;
        while let Some(frame) = self.rx_pending.front() {
            let Some(chain) = queue.pop(ram)? else { break };
            let len = NET_HDR_BYTES + frame.len();
            if chain.writable_len() < len as u64 {
                // Without MRG_RXBUF a frame must fit one buffer; the buffer stays
                // with the device for the next frame.
                queue.unpop();
                self.rx_pending.pop_front();
                self.stats.rx_dropped_buffer_too_small += 1;
                continue;
            }
            chain.write_at(ram, 0, &rx_header())?;
            chain.write_at(ram, NET_HDR_BYTES as u64, frame)?;
            queue.push_used(ram, chain.head, len as u32)?;
            self.rx_pending.pop_front();
            self.stats.rx_frames += 1;
            used = true;
        }
        Ok(used && queue.interrupt_wanted(ram)?)
    }

    /// Sends every frame the driver has queued, without its virtio header.
    fn transmit(&mut self, queue: &mut Queue, ctx: &mut DeviceCtx) -> Result<bool, QueueError> {
        let mut used = false;
        while let Some(chain) = queue.pop(ctx.ram)? {
            let len = chain.readable_len();
            let frame_len = len.checked_sub(NET_HDR_BYTES as u64).filter(|&n| n <= MAX_FRAME_BYTES as u64);
            match frame_len {
                Some(frame_len) => {
                    let mut frame = vec![0u8; frame_len as usize];
                    chain.read_at(ctx.ram, NET_HDR_BYTES as u64, &mut frame)?;
                    ctx.outputs.push(ctx.icount, OutputKind::NetFrame(frame));
                    self.stats.tx_frames += 1;
                }
                None => self.stats.tx_dropped_malformed += 1,
            }
            queue.push_used(ctx.ram, chain.head, 0)?;
            used = true;
        }
        Ok(used && queue.interrupt_wanted(ctx.ram)?)
    }

    pub fn state(&self) -> NetState {
        NetState { mac: self.mac, rx_pending: self.rx_pending.iter().cloned().collect(), stats: self.stats.clone() }
    }

    /// Adopts `state` if it is of a device with this MAC and within the bounds.
    pub fn restore(&mut self, state: NetState) -> Result<(), VirtioError> {
        let invalid = |problem: String| Err(VirtioError::InvalidState { device: "network", problem });
        if state.mac != self.mac {
            return invalid(format!("snapshot MAC {:02x?} differs from the configured {:02x?}", state.mac, self.mac));
        }
        if state.rx_pending.len() > RX_PENDING_MAX_FRAMES {
            return invalid(format!("{} frames pending, at most {RX_PENDING_MAX_FRAMES}", state.rx_pending.len()));
        }
        if let Some(frame) = state.rx_pending.iter().find(|f| f.len() > MAX_FRAME_BYTES) {
            return invalid(format!("a pending frame of {} bytes, at most {MAX_FRAME_BYTES}", frame.len()));
        }
        self.rx_pending = state.rx_pending.into();
        self.stats = state.stats;
        Ok(())
    }
}
