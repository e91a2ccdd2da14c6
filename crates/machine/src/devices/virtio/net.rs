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

    pub(super) fn notify(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        ctx: &mut DeviceCtx,
    ) -> Result<bool, QueueError> {
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
        self.check_state(&state)?;
        self.rx_pending = state.rx_pending.into();
        self.stats = state.stats;
        Ok(())
    }

    /// Whether `state` is of a device with this MAC and within the bounds.
    pub fn check_state(&self, state: &NetState) -> Result<(), VirtioError> {
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
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::mmio::{VirtioMmio, INT_USED_BUFFER};
    use crate::devices::virtio::testing::*;
    use crate::devices::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};
    use crate::io::Output;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const TX_BUF: u64 = DATA;
    const RX_BUF: u64 = DATA + 0x1_0000;
    const RX_BUF_BYTES: u32 = 1526;

    fn net_driver() -> Driver {
        Driver::setup(VirtioDevice::Net(Net::new(MAC)))
    }

    fn net(driver: &Driver) -> &Net {
        match driver.mmio.device() {
            VirtioDevice::Net(net) => net,
            _ => unreachable!(),
        }
    }

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| seed.wrapping_add(i as u8)).collect()
    }

    fn receive(driver: &mut Driver, frame: &[u8]) -> bool {
        let mut ctx =
            crate::devices::DeviceCtx { ram: &mut driver.ram, outputs: &mut driver.outputs, icount: driver.icount };
        driver.mmio.receive_frame(frame, &mut ctx)
    }

    fn post_rx(driver: &mut Driver, slot: u64) -> u16 {
        let head = driver.post(RX_QUEUE, &[writable(RX_BUF + slot * 0x800, RX_BUF_BYTES)]);
        driver.notify(RX_QUEUE);
        head
    }

    #[test]
    fn offers_version_1_and_mac_with_the_mac_in_config() {
        let mut driver = Driver::new(VirtioDevice::Net(Net::new(MAC)));
        assert_eq!(driver.read(reg::DEVICE_ID), 1);
        assert_eq!(driver.device_features(), VIRTIO_F_VERSION_1 | FEATURE_MAC);
        let mac: Vec<u8> = (0..6).map(|i| driver.try_read(reg::CONFIG + i, 1).unwrap() as u8).collect();
        assert_eq!(mac, MAC);
    }

    #[test]
    fn transmit_outputs_the_frame_without_the_virtio_header() {
        let mut driver = net_driver();
        driver.icount = 4242;
        let payload = frame(60, 1);
        driver.fill(TX_BUF, &[0xaa; NET_HDR_BYTES]);
        driver.fill(TX_BUF + 0x100, &payload[..20]);
        driver.fill(TX_BUF + 0x200, &payload[20..]);
        let bufs = [readable(TX_BUF, 12), readable(TX_BUF + 0x100, 20), readable(TX_BUF + 0x200, 40)];
        let head = driver.post(TX_QUEUE, &bufs);
        driver.notify(TX_QUEUE);
        assert_eq!(driver.used(TX_QUEUE), vec![(u32::from(head), 0)]);
        let expected = Output { icount: 4242, kind: OutputKind::NetFrame(payload) };
        assert_eq!(driver.take_outputs(), vec![expected]);
        assert!(driver.mmio.irq_level());
    }

    #[test]
    fn receive_delivers_the_frame_after_a_header_and_raises_the_interrupt() {
        let mut driver = net_driver();
        let head = post_rx(&mut driver, 0);
        assert!(!driver.mmio.irq_level());
        let payload = frame(100, 9);
        assert!(receive(&mut driver, &payload));
        assert_eq!(driver.used(RX_QUEUE), vec![(u32::from(head), 112)]);
        assert_eq!(driver.bytes(RX_BUF, 12), rx_header());
        assert_eq!(driver.bytes(RX_BUF + 12, 100), payload);
        assert!(driver.mmio.irq_level());
        assert_eq!(driver.ack_interrupt(), INT_USED_BUFFER);
        assert!(!driver.mmio.irq_level());
    }

    #[test]
    fn frames_without_buffers_wait_and_arrive_in_order_when_buffers_come() {
        let mut driver = net_driver();
        assert!(receive(&mut driver, &frame(60, 1)));
        assert!(receive(&mut driver, &frame(70, 2)));
        assert_eq!(net(&driver).rx_pending_frames(), 2);
        assert!(!driver.mmio.irq_level());
        post_rx(&mut driver, 0);
        assert_eq!(driver.used(RX_QUEUE), vec![(0, 72)]);
        assert_eq!(driver.bytes(RX_BUF + 12, 60), frame(60, 1));
        post_rx(&mut driver, 1);
        assert_eq!(driver.used(RX_QUEUE), vec![(1, 82)]);
        assert_eq!(driver.bytes(RX_BUF + 0x800 + 12, 70), frame(70, 2));
        assert_eq!(net(&driver).rx_pending_frames(), 0);
    }

    #[test]
    fn the_waiting_queue_is_bounded_and_counts_drops() {
        let mut driver = net_driver();
        for _ in 0..RX_PENDING_MAX_FRAMES {
            assert!(receive(&mut driver, &frame(60, 0)));
        }
        assert!(!receive(&mut driver, &frame(60, 0)));
        assert_eq!(net(&driver).stats().rx_dropped_queue_full, 1);
        assert_eq!(net(&driver).rx_pending_frames(), RX_PENDING_MAX_FRAMES);
    }

    #[test]
    fn oversize_frames_and_frames_before_driver_ok_are_dropped_and_counted() {
        let mut driver = net_driver();
        assert!(!receive(&mut driver, &vec![0; MAX_FRAME_BYTES + 1]));
        let mut idle = Driver::new(VirtioDevice::Net(Net::new(MAC)));
        assert!(!receive(&mut idle, &frame(60, 0)));
        assert_eq!(net(&driver).stats().rx_dropped_oversize, 1);
        assert_eq!(net(&idle).stats().rx_dropped_not_ready, 1);
    }

    #[test]
    fn a_frame_larger_than_the_buffer_is_dropped_and_the_buffer_kept() {
        let mut driver = net_driver();
        post_rx(&mut driver, 0);
        assert!(receive(&mut driver, &frame(RX_BUF_BYTES as usize, 0)));
        assert!(driver.used(RX_QUEUE).is_empty());
        assert_eq!(net(&driver).stats().rx_dropped_buffer_too_small, 1);
        assert!(receive(&mut driver, &frame(64, 0)));
        assert_eq!(driver.used(RX_QUEUE), vec![(0, 76)]);
    }

    #[test]
    fn a_transmit_shorter_than_the_header_is_dropped_and_returned() {
        let mut driver = net_driver();
        let head = driver.post(TX_QUEUE, &[readable(TX_BUF, 8)]);
        driver.notify(TX_QUEUE);
        assert_eq!(driver.used(TX_QUEUE), vec![(u32::from(head), 0)]);
        assert!(driver.take_outputs().is_empty());
        assert_eq!(net(&driver).stats().tx_dropped_malformed, 1);
    }

    #[test]
    fn no_interrupt_flag_in_the_available_ring_suppresses_the_interrupt() {
        let mut driver = net_driver();
        post_rx(&mut driver, 0);
        let (_, avail, _) = rings(RX_QUEUE);
        driver.fill(avail, &1u16.to_le_bytes());
        assert!(receive(&mut driver, &frame(60, 0)));
        assert_eq!(driver.used(RX_QUEUE).len(), 1);
        assert!(!driver.mmio.irq_level());
    }

    #[test]
    fn reset_drops_waiting_frames() {
        let mut driver = net_driver();
        receive(&mut driver, &frame(60, 0));
        driver.write(reg::STATUS, 0);
        assert_eq!(net(&driver).rx_pending_frames(), 0);
    }

    #[test]
    fn restored_device_behaves_identically() {
        let mut driver = net_driver();
        post_rx(&mut driver, 0);
        receive(&mut driver, &frame(60, 1));
        receive(&mut driver, &frame(61, 2));
        receive(&mut driver, &frame(62, 3));
        let mut twin = driver.restored_copy(VirtioDevice::Net(Net::new(MAC)));
        for d in [&mut driver, &mut twin] {
            post_rx(d, 1);
            receive(d, &frame(63, 4));
            post_rx(d, 2);
            post_rx(d, 3);
            d.fill(TX_BUF + 12, &frame(50, 5));
            d.post(TX_QUEUE, &[readable(TX_BUF, 62)]);
            d.notify(TX_QUEUE);
        }
        assert_eq!(driver.mmio.state(), twin.mmio.state());
        assert_eq!(driver.ram.as_slice(), twin.ram.as_slice());
        assert_eq!(driver.take_outputs(), twin.take_outputs());
        assert_eq!(driver.used(RX_QUEUE), twin.used(RX_QUEUE));
    }

    #[test]
    fn restore_refuses_another_mac_and_another_device_kind() {
        let driver = net_driver();
        let mut other_mac = VirtioMmio::new(VirtioDevice::Net(Net::new([2; 6])));
        assert!(other_mac.restore(driver.mmio.state()).is_err());
        let mut rng = VirtioMmio::new(VirtioDevice::Rng(crate::devices::virtio::rng::Rng::new()));
        let error = rng.restore(driver.mmio.state()).unwrap_err().to_string();
        assert!(error.contains("network") && error.contains("entropy"), "{error}");
    }
}
