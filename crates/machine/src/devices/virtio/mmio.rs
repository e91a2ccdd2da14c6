//! The virtio-mmio transport (virtio v1.2 §4.2), modern interface only (Version = 2):
//! the register window in front of one device, feature negotiation, the device status
//! state machine, queue setup, notifications and the interrupt line.
//!
//! Control registers take 32-bit aligned accesses only; anything else, and any offset
//! outside the register map, is refused with [`AccessError`] (a bus error for the
//! hart). The device configuration space at 0x100 takes 8/16/32/64-bit reads; bytes
//! past the device's structure read as zero and writes are ignored, since none of
//! our devices offers a writable configuration field.

use super::queue::{Queue, QueueError, QUEUE_SIZE_MAX};
use super::{VirtioDevice, VirtioDeviceState, VirtioError, VIRTIO_F_VERSION_1};
use crate::devices::{AccessError, DeviceCtx};

/// "virt" in little-endian ASCII.
pub const MAGIC: u32 = 0x7472_6976;
/// The modern (non-legacy) virtio-mmio interface.
pub const VERSION: u32 = 2;
/// "FTVM" read as a little-endian u32, the same way QEMU spells "QEMU" (0x554d4551).
/// Linux only prints it; drivers match on the device id.
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"FTVM");
/// Size of one device's MMIO window.
pub const WINDOW_SIZE_BYTES: u64 = 0x1000;

/// Device status bits (§2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
    pub const ALL: u32 = ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK | DEVICE_NEEDS_RESET | FAILED;
}

/// InterruptStatus bits (§4.2.2).
pub const INT_USED_BUFFER: u32 = 1;
pub const INT_CONFIG_CHANGE: u32 = 2;

/// Register offsets (§4.2.2, table "MMIO Device Register Layout").
pub mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device-specific configuration space.
    pub const CONFIG: u64 = 0x100;
}

/// A virtio-mmio window with its device.
#[derive(Debug)]
pub struct VirtioMmio {
    device: VirtioDevice,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    interrupt_status: u32,
    queues: Vec<Queue>,
    /// Why the device last entered DEVICE_NEEDS_RESET (diagnostics; not snapshotted).
    fault: Option<QueueError>,
}

/// The transport's registers, its queues and its device's state, as plain data.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VirtioMmioState {
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub queues: Vec<Queue>,
    pub device: VirtioDeviceState,
}

fn set_low(reg: &mut u64, v: u32) {
    *reg = (*reg & !0xffff_ffff) | u64::from(v);
}

fn set_high(reg: &mut u64, v: u32) {
    *reg = (*reg & 0xffff_ffff) | (u64::from(v) << 32);
}

impl VirtioMmio {
    pub fn new(device: VirtioDevice) -> VirtioMmio {
        let queues = vec![Queue::default(); device.queue_count()];
        VirtioMmio {
            device,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            interrupt_status: 0,
            queues,
            fault: None,
        }
    }

    pub fn device(&self) -> &VirtioDevice {
        &self.device
    }

    pub fn device_mut(&mut self) -> &mut VirtioDevice {
        &mut self.device
    }

    /// The Status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The features the driver accepted (meaningful once FEATURES_OK is set).
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    pub fn queue(&self, index: usize) -> Option<&Queue> {
        self.queues.get(index)
    }

    /// Why the device entered DEVICE_NEEDS_RESET, if it did since the last reset.
    pub fn fault(&self) -> Option<&QueueError> {
        self.fault.as_ref()
    }

    /// Level of the interrupt line: InterruptStatus != 0.
    pub fn irq_level(&self) -> bool {
        self.interrupt_status != 0
    }

    /// The driver finished negotiation and set DRIVER_OK, and the device is not broken.
    fn live(&self) -> bool {
        let needed = status::FEATURES_OK | status::DRIVER_OK;
        self.status & needed == needed && self.status & (status::DEVICE_NEEDS_RESET | status::FAILED) == 0
    }

    /// MMIO read at `offset` within the device's 0x1000-byte window.
    pub fn read(&mut self, offset: u64, size: u8, _ctx: &mut DeviceCtx) -> Result<u64, AccessError> {
        if offset >= WINDOW_SIZE_BYTES {
            return Err(AccessError);
        }
        if offset >= reg::CONFIG {
            return self.read_config(offset - reg::CONFIG, size);
        }
        if size != 4 || !offset.is_multiple_of(4) {
            return Err(AccessError);
        }
        let selected = self.queues.get(self.queue_sel as usize);
        let value = match offset {
            reg::MAGIC_VALUE => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_id(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => selected.map_or(0, |_| u32::from(QUEUE_SIZE_MAX)),
            reg::QUEUE_READY => selected.map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            // No shared memory regions: a length of -1 says "no such region".
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => u32::MAX,
            // The configuration never changes, so its generation stays 0.
            reg::CONFIG_GENERATION => 0,
            _ => return Err(AccessError),
        };
        Ok(u64::from(value))
    }

    fn read_config(&self, offset: u64, size: u8) -> Result<u64, AccessError> {
        if !matches!(size, 1 | 2 | 4 | 8) {
            return Err(AccessError);
        }
        let config = self.device.config();
        let value = (0..u64::from(size)).rev().fold(0u64, |acc, i| {
            let byte = usize::try_from(offset + i).ok().and_then(|at| config.get(at)).copied();
            (acc << 8) | u64::from(byte.unwrap_or(0))
        });
        Ok(value)
    }

    /// MMIO write at `offset` within the device's 0x1000-byte window. A QueueNotify
    /// processes the queue before returning.
    pub fn write(&mut self, offset: u64, size: u8, value: u64, ctx: &mut DeviceCtx) -> Result<(), AccessError> {
        if offset >= WINDOW_SIZE_BYTES {
            return Err(AccessError);
        }
        if offset >= reg::CONFIG {
            return if matches!(size, 1 | 2 | 4 | 8) { Ok(()) } else { Err(AccessError) };
        }
        if size != 4 || !offset.is_multiple_of(4) {
            return Err(AccessError);
        }
        let v = value as u32;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES => self.write_driver_features(v),
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => self.write_queue_setup(|q| q.size = v),
            reg::QUEUE_READY => self.write_queue_ready(v & 1 != 0, ctx),
            reg::QUEUE_NOTIFY => self.notify(v, ctx),
            reg::INTERRUPT_ACK => self.interrupt_status &= !v,
            reg::STATUS => self.write_status(v),
            reg::QUEUE_DESC_LOW => self.write_queue_setup(|q| set_low(&mut q.desc_addr, v)),
            reg::QUEUE_DESC_HIGH => self.write_queue_setup(|q| set_high(&mut q.desc_addr, v)),
            reg::QUEUE_DRIVER_LOW => self.write_queue_setup(|q| set_low(&mut q.avail_addr, v)),
            reg::QUEUE_DRIVER_HIGH => self.write_queue_setup(|q| set_high(&mut q.avail_addr, v)),
            reg::QUEUE_DEVICE_LOW => self.write_queue_setup(|q| set_low(&mut q.used_addr, v)),
            reg::QUEUE_DEVICE_HIGH => self.write_queue_setup(|q| set_high(&mut q.used_addr, v)),
            reg::SHM_SEL => {}
            _ => return Err(AccessError),
        }
        Ok(())
    }

    fn write_driver_features(&mut self, v: u32) {
        // Features are fixed once the driver has set FEATURES_OK.
        if self.status & status::FEATURES_OK != 0 {
            return;
        }
        match self.driver_features_sel {
            0 => set_low(&mut self.driver_features, v),
            1 => set_high(&mut self.driver_features, v),
            _ => {}
        }
    }

    /// Queue layout registers of the selected queue; ignored while it is ready.
    fn write_queue_setup(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(queue) = self.queues.get_mut(self.queue_sel as usize) {
            if !queue.ready {
                f(queue);
            }
        }
    }

    fn write_queue_ready(&mut self, ready: bool, ctx: &mut DeviceCtx) {
        let Some(queue) = self.queues.get_mut(self.queue_sel as usize) else { return };
        if ready == queue.ready {
            return;
        }
        if !ready {
            // The driver takes the queue away; a later setup starts fresh rings.
            queue.ready = false;
            queue.next_avail = 0;
            queue.next_used = 0;
            return;
        }
        match queue.validate(ctx.ram) {
            Ok(()) => queue.ready = true,
            Err(error) => self.fail(error),
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // Bits the spec does not define are dropped; DEVICE_NEEDS_RESET is the
        // device's to set, and only a reset clears it.
        let mut new = (v & status::ALL & !status::DEVICE_NEEDS_RESET) | (self.status & status::DEVICE_NEEDS_RESET);
        let features_ok_now = new & status::FEATURES_OK != 0 && self.status & status::FEATURES_OK == 0;
        if features_ok_now && !self.features_acceptable(self.driver_features) {
            // The driver reads Status back and gives up (§3.1.1 step 6).
            new &= !status::FEATURES_OK;
        }
        self.status = new;
    }

    /// A modern device needs VERSION_1, and a driver may accept only offered features.
    fn features_acceptable(&self, driver_features: u64) -> bool {
        driver_features & !self.device.features() == 0 && driver_features & VIRTIO_F_VERSION_1 != 0
    }

    /// The transport at power-on (a reboot): as after the driver's reset.
    pub fn power_on(&mut self) {
        self.reset();
    }

    /// Status = 0: the device forgets the driver — features, queues, interrupts.
    fn reset(&mut self) {
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.queues.fill(Queue::default());
        self.fault = None;
        self.device.reset();
    }

    /// The device cannot go on until the driver resets it (§2.1.2).
    fn fail(&mut self, error: QueueError) {
        self.status |= status::DEVICE_NEEDS_RESET;
        if self.status & status::DRIVER_OK != 0 {
            // Config change tells the driver to look at Status; the used-buffer bit
            // makes it collect whatever was completed before the failure.
            self.interrupt_status |= INT_CONFIG_CHANGE | INT_USED_BUFFER;
        }
        self.fault = Some(error);
    }

    fn finish(&mut self, result: Result<bool, QueueError>) {
        match result {
            Ok(true) => self.interrupt_status |= INT_USED_BUFFER,
            Ok(false) => {}
            Err(error) => self.fail(error),
        }
    }

    fn notify(&mut self, v: u32, ctx: &mut DeviceCtx) {
        let index = v as usize;
        if !self.live() || !self.queues.get(index).is_some_and(|q| q.ready) {
            return;
        }
        let result = self.device.notify(index, &mut self.queues, ctx);
        self.finish(result);
    }

    /// Delivers a received Ethernet frame (network device only; otherwise false).
    /// Returns whether the device took the frame (delivered it or queued it for a
    /// later rx buffer); see [`super::net`] for the bounds and drop counters.
    pub fn receive_frame(&mut self, frame: &[u8], ctx: &mut DeviceCtx) -> bool {
        let live = self.live();
        let VirtioDevice::Net(net) = &mut self.device else { return false };
        let (accepted, result) = net.receive(frame, live, &mut self.queues, ctx);
        self.finish(result);
        accepted
    }

    /// Gives the entropy device bytes (entropy device only). Waiting requests are
    /// filled at once.
    pub fn add_entropy(&mut self, bytes: &[u8], ctx: &mut DeviceCtx) {
        let live = self.live();
        let VirtioDevice::Rng(rng) = &mut self.device else { return };
        rng.add_entropy(bytes);
        if live && self.queues[0].ready {
            let result = rng.process(&mut self.queues[0], ctx.ram);
            self.finish(result);
        }
    }

    /// True when the entropy device holds a request it cannot fill from its pool.
    pub fn wants_entropy(&self) -> bool {
        match &self.device {
            VirtioDevice::Rng(rng) => self.live() && rng.starved(),
            _ => false,
        }
    }

    pub fn state(&self) -> VirtioMmioState {
        VirtioMmioState {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            queues: self.queues.clone(),
            device: self.device.state(),
        }
    }

    /// Adopts `state` after checking it against this device; on an error nothing
    /// changes. Ring addresses are checked against RAM again when next used.
    pub fn restore(&mut self, state: VirtioMmioState) -> Result<(), VirtioError> {
        self.check_state(&state)?;
        self.device.restore(state.device)?;
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.interrupt_status = state.interrupt_status;
        self.queues = state.queues;
        self.fault = None;
        Ok(())
    }

    /// Whether [`VirtioMmio::restore`] would accept `state` (transport and device);
    /// changes nothing.
    pub fn check_state(&self, state: &VirtioMmioState) -> Result<(), VirtioError> {
        self.check_transport_state(state)?;
        self.device.check_state(&state.device)
    }

    fn check_transport_state(&self, state: &VirtioMmioState) -> Result<(), VirtioError> {
        if state.device.kind() != self.device.kind() {
            return Err(VirtioError::DeviceMismatch { expected: self.device.kind(), found: state.device.kind() });
        }
        let invalid = |problem: String| VirtioError::InvalidState { device: "mmio transport", problem };
        if state.queues.len() != self.device.queue_count() {
            let (found, expected) = (state.queues.len(), self.device.queue_count());
            return Err(invalid(format!("{found} queues, the {} device has {expected}", self.device.kind())));
        }
        if state.status & !status::ALL != 0 {
            return Err(invalid(format!("unknown status bits {:#x}", state.status)));
        }
        if state.interrupt_status & !(INT_USED_BUFFER | INT_CONFIG_CHANGE) != 0 {
            return Err(invalid(format!("unknown interrupt bits {:#x}", state.interrupt_status)));
        }
        if state.status & status::FEATURES_OK != 0 && !self.features_acceptable(state.driver_features) {
            return Err(invalid(format!("driver features {:#x} were never offered", state.driver_features)));
        }
        for (index, queue) in state.queues.iter().enumerate() {
            if queue.ready {
                queue.check_layout().map_err(|e| invalid(format!("queue {index}: {e}")))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::rng::Rng;
    use crate::devices::virtio::testing::*;

    const BUF: u64 = DATA;

    fn rng_device() -> VirtioDevice {
        VirtioDevice::Rng(Rng::new())
    }

    fn add_entropy(driver: &mut Driver, bytes: &[u8]) {
        let mut ctx = DeviceCtx { ram: &mut driver.ram, outputs: &mut driver.outputs, icount: driver.icount };
        driver.mmio.add_entropy(bytes, &mut ctx);
    }

    fn needs_reset(driver: &mut Driver) -> bool {
        driver.status() & status::DEVICE_NEEDS_RESET != 0
    }

    #[test]
    fn identification_registers_read_as_the_spec_says() {
        let mut driver = Driver::new(rng_device());
        assert_eq!(driver.read(reg::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(driver.read(reg::VERSION), 2);
        assert_eq!(driver.read(reg::VENDOR_ID), 0x4d56_5446);
        assert_eq!(driver.read(reg::STATUS), 0);
        assert_eq!(driver.read(reg::SHM_LEN_LOW), u32::MAX);
        assert_eq!(driver.read(reg::CONFIG_GENERATION), 0);
    }

    #[test]
    fn control_registers_refuse_other_widths_and_unknown_offsets() {
        let mut driver = Driver::new(rng_device());
        assert_eq!(driver.try_read(reg::MAGIC_VALUE, 2), Err(AccessError));
        assert_eq!(driver.try_read(reg::MAGIC_VALUE + 1, 4), Err(AccessError));
        assert_eq!(driver.try_read(0x0f0, 4), Err(AccessError));
        assert_eq!(driver.try_read(reg::QUEUE_NOTIFY, 4), Err(AccessError));
        assert_eq!(driver.try_write(reg::MAGIC_VALUE, 4, 0), Err(AccessError));
        assert_eq!(driver.try_write(reg::STATUS, 8, 1), Err(AccessError));
        assert_eq!(driver.try_read(WINDOW_SIZE_BYTES, 4), Err(AccessError));
        assert_eq!(driver.try_read(reg::CONFIG, 3), Err(AccessError));
        assert_eq!(driver.try_read(reg::CONFIG + 0x10, 4), Ok(0));
    }

    #[test]
    fn negotiation_refuses_features_never_offered() {
        let mut driver = Driver::new(rng_device());
        driver.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        driver.write(reg::DRIVER_FEATURES_SEL, 1);
        driver.write(reg::DRIVER_FEATURES, 1 | 1 << 2); // VERSION_1 | RING_PACKED
        driver.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_eq!(driver.status() & status::FEATURES_OK, 0);
    }

    #[test]
    fn negotiation_refuses_a_driver_without_version_1() {
        let mut driver = Driver::new(rng_device());
        driver.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        driver.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_eq!(driver.status() & status::FEATURES_OK, 0);
    }

    #[test]
    fn features_are_frozen_once_features_ok_is_set() {
        let mut driver = Driver::setup(rng_device());
        driver.write(reg::DRIVER_FEATURES_SEL, 1);
        driver.write(reg::DRIVER_FEATURES, 0);
        assert_eq!(driver.mmio.driver_features(), VIRTIO_F_VERSION_1);
    }

    #[test]
    fn a_queue_size_that_is_not_a_power_of_two_needs_reset() {
        let mut driver = Driver::new(rng_device());
        driver.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        driver.setup_queue(0, 3);
        assert!(needs_reset(&mut driver));
        assert_eq!(driver.read(reg::QUEUE_READY), 0);
        assert_eq!(driver.mmio.fault(), Some(&QueueError::BadSize { size: 3 }));
    }

    #[test]
    fn a_queue_larger_than_the_maximum_or_outside_ram_needs_reset() {
        let mut driver = Driver::new(rng_device());
        driver.setup_queue(0, 512);
        assert!(needs_reset(&mut driver));
        let mut driver = Driver::new(rng_device());
        driver.write(reg::QUEUE_NUM, 16);
        driver.write(reg::QUEUE_DESC_HIGH, 0x10);
        driver.write(reg::QUEUE_READY, 1);
        assert!(matches!(driver.mmio.fault(), Some(QueueError::BadRing { .. })));
    }

    #[test]
    fn a_descriptor_index_out_of_range_needs_reset_and_tells_the_driver() {
        let mut driver = Driver::setup(rng_device());
        add_entropy(&mut driver, &[1; 8]);
        driver.make_available(0, QUEUE_SIZE + 3);
        driver.notify(0);
        assert!(needs_reset(&mut driver));
        assert_eq!(driver.mmio.fault(), Some(&QueueError::DescriptorOutOfRange { index: 19, size: QUEUE_SIZE }));
        assert_ne!(driver.ack_interrupt() & INT_CONFIG_CHANGE, 0);
    }

    #[test]
    fn a_descriptor_loop_needs_reset() {
        let mut driver = Driver::setup(rng_device());
        add_entropy(&mut driver, &[1; 8]);
        driver.put_desc(0, 0, writable(BUF, 1), Some(1));
        driver.put_desc(0, 1, writable(BUF, 1), Some(0));
        driver.make_available(0, 0);
        driver.notify(0);
        assert!(needs_reset(&mut driver));
        assert_eq!(driver.mmio.fault(), Some(&QueueError::ChainTooLong { head: 0 }));
    }

    #[test]
    fn a_buffer_outside_ram_needs_reset_and_ram_is_untouched() {
        let mut driver = Driver::setup(rng_device());
        add_entropy(&mut driver, &[1; 8]);
        driver.ram.take_dirty_pages();
        driver.put_desc(0, 0, writable(RAM_BASE + RAM_SIZE - 4, 8), None);
        driver.make_available(0, 0);
        driver.ram.take_dirty_pages();
        driver.notify(0);
        assert!(needs_reset(&mut driver));
        assert!(matches!(driver.mmio.fault(), Some(QueueError::BufferOutsideRam { .. })));
        assert!(driver.ram.take_dirty_pages().is_empty());
    }

    #[test]
    fn a_device_needing_reset_ignores_notifications_until_reset() {
        let mut driver = Driver::setup(rng_device());
        add_entropy(&mut driver, &[1; 8]);
        driver.make_available(0, 99);
        driver.notify(0);
        driver.post(0, &[writable(BUF, 4)]);
        driver.notify(0);
        assert!(driver.used(0).is_empty());
        driver.write(reg::STATUS, 0);
        assert_eq!(driver.status(), 0);
        assert_eq!(driver.mmio.fault(), None);
        let mmio = std::mem::replace(&mut driver.mmio, VirtioMmio::new(rng_device()));
        let mut fresh = Driver::with_parts(rv64::GuestRam::new(RAM_BASE, RAM_SIZE), mmio);
        fresh.init(None);
        fresh.post(0, &[writable(BUF, 4)]);
        fresh.notify(0);
        assert_eq!(fresh.used(0), vec![(0, 4)]);
    }

    #[test]
    fn notifications_before_driver_ok_are_ignored() {
        let mut driver = Driver::new(rng_device());
        driver.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        driver.setup_queue(0, u32::from(QUEUE_SIZE));
        add_entropy(&mut driver, &[1; 8]);
        driver.post(0, &[writable(BUF, 4)]);
        driver.notify(0);
        assert!(driver.used(0).is_empty());
    }

    #[test]
    fn status_zero_resets_features_queues_and_interrupts() {
        let mut driver = Driver::setup(rng_device());
        add_entropy(&mut driver, &[1; 8]);
        driver.post(0, &[writable(BUF, 4)]);
        driver.notify(0);
        assert!(driver.mmio.irq_level());
        driver.write(reg::STATUS, 0);
        assert!(!driver.mmio.irq_level());
        assert_eq!(driver.mmio.driver_features(), 0);
        assert_eq!(driver.mmio.queue(0), Some(&Queue::default()));
        assert_eq!(driver.read(reg::QUEUE_READY), 0);
    }

    #[test]
    fn interrupt_ack_lowers_the_line() {
        let mut driver = Driver::setup(rng_device());
        add_entropy(&mut driver, &[1; 8]);
        driver.post(0, &[writable(BUF, 4)]);
        driver.notify(0);
        assert_eq!(driver.read(reg::INTERRUPT_STATUS), INT_USED_BUFFER);
        driver.write(reg::INTERRUPT_ACK, INT_USED_BUFFER);
        assert!(!driver.mmio.irq_level());
    }

    #[test]
    fn queue_layout_cannot_change_while_the_queue_is_ready() {
        let mut driver = Driver::setup(rng_device());
        driver.write(reg::QUEUE_SEL, 0);
        driver.write(reg::QUEUE_NUM, 2);
        driver.write(reg::QUEUE_DESC_LOW, 0);
        assert_eq!(driver.mmio.queue(0).map(|q| (q.size, q.desc_addr)), Some((16, rings(0).0)));
    }

    #[test]
    fn restore_refuses_unknown_bits_and_bad_ready_queues_and_changes_nothing() {
        let driver = Driver::setup(rng_device());
        let mut target = VirtioMmio::new(rng_device());
        let mut bad_status = driver.mmio.state();
        bad_status.status |= 0x20;
        assert!(target.restore(bad_status).is_err());
        let mut bad_queue = driver.mmio.state();
        bad_queue.queues[0].size = 12;
        assert!(target.restore(bad_queue).is_err());
        let mut missing_queue = driver.mmio.state();
        missing_queue.queues.clear();
        assert!(target.restore(missing_queue).is_err());
        assert_eq!(target.state(), VirtioMmio::new(rng_device()).state());
    }

    /// xorshift64*: a tiny deterministic generator for the hostile-driver test.
    struct Xorshift(u64);
    impl Xorshift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// One step of a driver doing anything at all: register writes, scribbles over
    /// the rings, plausible and implausible chains, notifications and inputs.
    fn hostile_step(driver: &mut Driver, rng: &mut Xorshift) {
        const WRITABLE: [u64; 16] = [
            reg::DEVICE_FEATURES_SEL,
            reg::DRIVER_FEATURES,
            reg::DRIVER_FEATURES_SEL,
            reg::QUEUE_SEL,
            reg::QUEUE_NUM,
            reg::QUEUE_READY,
            reg::QUEUE_NOTIFY,
            reg::INTERRUPT_ACK,
            reg::STATUS,
            reg::QUEUE_DESC_LOW,
            reg::QUEUE_DESC_HIGH,
            reg::QUEUE_DRIVER_LOW,
            reg::QUEUE_DRIVER_HIGH,
            reg::QUEUE_DEVICE_LOW,
            reg::QUEUE_DEVICE_HIGH,
            reg::CONFIG,
        ];
        let small = |rng: &mut Xorshift| if rng.below(2) == 0 { rng.below(20) } else { rng.next() };
        match rng.below(16) {
            0 => {
                let offset = WRITABLE[rng.below(WRITABLE.len() as u64) as usize];
                let value = small(rng);
                let _ = driver.try_write(offset, 4, value);
            }
            1 => {
                let _ = driver.try_read(rng.below(0x1100), [1, 2, 4, 8][rng.below(4) as usize]);
            }
            2 => {
                let addr = RAM_BASE + rng.below(0xc000);
                let _ = driver.ram.write(addr, &small(rng).to_le_bytes()[..1 << rng.below(4)]);
            }
            3..=8 => {
                let q = rng.below(3) as usize;
                let count = 1 + rng.below(4);
                let mut bufs: Vec<Buf> = (0..count)
                    .map(|_| {
                        let addr = if rng.below(16) == 0 { small(rng) } else { DATA + rng.below(0x8000) };
                        let len = if rng.below(16) == 0 { small(rng) as u32 } else { rng.below(0x3000) as u32 };
                        (addr, len, rng.below(2) == 0)
                    })
                    .collect();
                if rng.below(8) != 0 {
                    bufs.sort_by_key(|&(_, _, writable)| writable);
                }
                driver.post(q, &bufs);
                driver.notify(q);
            }
            9 | 10 => driver.notify(rng.below(4) as usize),
            11 | 12 => {
                let frame = vec![rng.next() as u8; rng.below(2000) as usize];
                let mut ctx = DeviceCtx { ram: &mut driver.ram, outputs: &mut driver.outputs, icount: driver.icount };
                driver.mmio.receive_frame(&frame, &mut ctx);
            }
            13 | 14 => add_entropy(driver, &vec![rng.next() as u8; rng.below(64) as usize]),
            _ => {
                driver.mmio.restore(driver.mmio.state()).expect("a device's own state restores");
            }
        }
        if !driver.mmio.live() && rng.below(4) == 0 {
            driver.restart();
        }
    }

    #[test]
    fn a_hostile_driver_never_panics_the_device_and_state_stays_valid() {
        let image = TempImage::new("hostile", &[0; 8 * 512]);
        for seed in 1..=300u64 {
            let device = match seed % 3 {
                0 => VirtioDevice::Blk(crate::devices::virtio::blk::Blk::open(&image.path, false).unwrap()),
                1 => VirtioDevice::Net(crate::devices::virtio::net::Net::new([2; 6])),
                _ => rng_device(),
            };
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let mut driver = Driver::setup(device);
                let mut rng = Xorshift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
                for _ in 0..300 {
                    hostile_step(&mut driver, &mut rng);
                }
                let state = driver.mmio.state();
                assert_eq!(state.status & !status::ALL, 0);
                assert!(state.queues.iter().filter(|q| q.ready).all(|q| q.check_layout().is_ok()));
            }));
            assert!(outcome.is_ok(), "hostile driver test failed with seed {seed}");
        }
    }
}
