//! A minimal virtio driver for the tests: it sets devices up through the registers
//! as Linux does, lays out queues in a small guest RAM, posts descriptor chains and
//! reads the used rings back.

use super::mmio::{status, VirtioMmio};
use super::queue::QUEUE_SIZE_MAX;
use super::VirtioDevice;
use crate::devices::DeviceCtx;
use crate::io::{Output, Outputs};
use rv64::GuestRam;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

pub const RAM_BASE: u64 = 0x8000_0000;
pub const RAM_SIZE: u64 = 1 << 20;
pub const QUEUE_SIZE: u16 = 16;
/// Where test buffers go: past the queues' rings.
pub const DATA: u64 = RAM_BASE + 0x4_0000;

pub use super::mmio::reg;

/// Queue `q`'s rings: descriptor table, available ring, used ring.
pub fn rings(q: usize) -> (u64, u64, u64) {
    let base = RAM_BASE + 0x4000 * q as u64;
    (base, base + 0x1000, base + 0x2000)
}

/// A buffer of a chain: guest address, length, device-writable.
pub type Buf = (u64, u32, bool);

pub fn readable(addr: u64, len: u32) -> Buf {
    (addr, len, false)
}

pub fn writable(addr: u64, len: u32) -> Buf {
    (addr, len, true)
}

pub struct Driver {
    pub ram: GuestRam,
    pub outputs: Outputs,
    pub mmio: VirtioMmio,
    pub icount: u64,
    next_desc: Vec<u16>,
    avail_idx: Vec<u16>,
    used_seen: Vec<u16>,
}

impl Driver {
    /// A device fresh from reset, not yet touched by the driver.
    pub fn new(device: VirtioDevice) -> Driver {
        Driver::with_parts(GuestRam::new(RAM_BASE, RAM_SIZE), VirtioMmio::new(device))
    }

    pub fn with_parts(ram: GuestRam, mmio: VirtioMmio) -> Driver {
        let queues = 3;
        Driver {
            ram,
            outputs: Outputs::default(),
            mmio,
            icount: 1000,
            next_desc: vec![0; queues],
            avail_idx: vec![0; queues],
            used_seen: vec![0; queues],
        }
    }

    /// Runs the whole initialisation sequence (§3.1.1) accepting all offered features.
    pub fn setup(device: VirtioDevice) -> Driver {
        let mut driver = Driver::new(device);
        driver.init(None);
        driver
    }

    /// Initialises the device, accepting `features` (all offered ones when None).
    pub fn init(&mut self, features: Option<u64>) {
        assert_eq!(self.read(reg::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(self.read(reg::VERSION), 2);
        assert_ne!(self.read(reg::DEVICE_ID), 0);
        self.write(reg::STATUS, status::ACKNOWLEDGE);
        self.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        let features = features.unwrap_or_else(|| self.device_features());
        self.write(reg::DRIVER_FEATURES_SEL, 0);
        self.write(reg::DRIVER_FEATURES, features as u32);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, (features >> 32) as u32);
        self.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_ne!(self.read(reg::STATUS) & status::FEATURES_OK, 0, "device refused features {features:#x}");
        for q in 0..self.mmio.device().queue_count() {
            self.setup_queue(q, u32::from(QUEUE_SIZE));
        }
        self.write(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
    }

    /// Resets the device and starts over with zeroed rings, as a driver recovering
    /// from DEVICE_NEEDS_RESET would.
    pub fn restart(&mut self) {
        self.write(reg::STATUS, 0);
        for q in 0..self.next_desc.len() {
            self.ram.write(rings(q).0, &[0; 0x4000]).unwrap();
        }
        self.next_desc.fill(0);
        self.avail_idx.fill(0);
        self.used_seen.fill(0);
        self.init(None);
    }

    pub fn device_features(&mut self) -> u64 {
        self.write(reg::DEVICE_FEATURES_SEL, 0);
        let low = u64::from(self.read(reg::DEVICE_FEATURES));
        self.write(reg::DEVICE_FEATURES_SEL, 1);
        low | (u64::from(self.read(reg::DEVICE_FEATURES)) << 32)
    }

    pub fn setup_queue(&mut self, q: usize, size: u32) {
        self.write(reg::QUEUE_SEL, q as u32);
        assert_eq!(self.read(reg::QUEUE_READY), 0);
        assert_eq!(self.read(reg::QUEUE_NUM_MAX), u32::from(QUEUE_SIZE_MAX));
        self.write(reg::QUEUE_NUM, size);
        let (desc, avail, used) = rings(q);
        for (low, high, addr) in [
            (reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, desc),
            (reg::QUEUE_DRIVER_LOW, reg::QUEUE_DRIVER_HIGH, avail),
            (reg::QUEUE_DEVICE_LOW, reg::QUEUE_DEVICE_HIGH, used),
        ] {
            self.write(low, addr as u32);
            self.write(high, (addr >> 32) as u32);
        }
        self.write(reg::QUEUE_READY, 1);
    }

    pub fn read(&mut self, offset: u64) -> u32 {
        self.try_read(offset, 4).expect("register read") as u32
    }

    pub fn try_read(&mut self, offset: u64, size: u8) -> Result<u64, crate::devices::AccessError> {
        let mut ctx = DeviceCtx { ram: &mut self.ram, outputs: &mut self.outputs, icount: self.icount };
        self.mmio.read(offset, size, &mut ctx)
    }

    pub fn write(&mut self, offset: u64, value: u32) {
        self.try_write(offset, 4, u64::from(value)).expect("register write");
    }

    pub fn try_write(&mut self, offset: u64, size: u8, value: u64) -> Result<(), crate::devices::AccessError> {
        let mut ctx = DeviceCtx { ram: &mut self.ram, outputs: &mut self.outputs, icount: self.icount };
        self.mmio.write(offset, size, value, &mut ctx)
    }

    pub fn status(&mut self) -> u32 {
        self.read(reg::STATUS)
    }

    /// Writes a raw descriptor into queue `q`'s table.
    pub fn put_desc(&mut self, q: usize, index: u16, buf: Buf, next: Option<u16>) {
        let (addr, len, write) = buf;
        let flags = u16::from(next.is_some()) | (u16::from(write) << 1);
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.unwrap_or(0).to_le_bytes());
        self.ram.write(rings(q).0 + 16 * u64::from(index), &raw).unwrap();
    }

    /// Puts `head` in queue `q`'s available ring and publishes it.
    pub fn make_available(&mut self, q: usize, head: u16) {
        let (_, avail, _) = rings(q);
        let idx = self.avail_idx[q];
        self.ram.write(avail + 4 + 2 * u64::from(idx % QUEUE_SIZE), &head.to_le_bytes()).unwrap();
        self.avail_idx[q] = idx.wrapping_add(1);
        self.ram.write(avail + 2, &self.avail_idx[q].to_le_bytes()).unwrap();
    }

    /// Posts a chain of `bufs` on queue `q` (not notifying); returns its head.
    pub fn post(&mut self, q: usize, bufs: &[Buf]) -> u16 {
        let head = self.next_desc[q];
        for (i, &buf) in bufs.iter().enumerate() {
            let index = (head + i as u16) % QUEUE_SIZE;
            let next = (i + 1 < bufs.len()).then_some((index + 1) % QUEUE_SIZE);
            self.put_desc(q, index, buf, next);
        }
        self.next_desc[q] = (head + bufs.len() as u16) % QUEUE_SIZE;
        self.make_available(q, head);
        head
    }

    pub fn notify(&mut self, q: usize) {
        self.write(reg::QUEUE_NOTIFY, q as u32);
    }

    /// Used-ring entries (id, len) published on queue `q` since the last call.
    pub fn used(&mut self, q: usize) -> Vec<(u32, u32)> {
        let (_, _, used) = rings(q);
        let mut idx = [0u8; 2];
        self.ram.read(used + 2, &mut idx).unwrap();
        let idx = u16::from_le_bytes(idx);
        let mut entries = Vec::new();
        while self.used_seen[q] != idx {
            let slot = u64::from(self.used_seen[q] % QUEUE_SIZE);
            let id = self.ram.read_u32(used + 4 + 8 * slot).unwrap();
            let len = self.ram.read_u32(used + 8 + 8 * slot).unwrap();
            entries.push((id, len));
            self.used_seen[q] = self.used_seen[q].wrapping_add(1);
        }
        entries
    }

    /// Reads the interrupt status and acknowledges all of it.
    pub fn ack_interrupt(&mut self) -> u32 {
        let pending = self.read(reg::INTERRUPT_STATUS);
        self.write(reg::INTERRUPT_ACK, pending);
        pending
    }

    pub fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.ram.read(addr, &mut buf).unwrap();
        buf
    }

    pub fn fill(&mut self, addr: u64, data: &[u8]) {
        self.ram.write(addr, data).unwrap();
    }

    pub fn take_outputs(&mut self) -> Vec<Output> {
        self.outputs.take()
    }

    /// A second driver whose device and RAM are rebuilt from this one's state: the
    /// snapshot → restore path. `device` must be built from the same configuration.
    pub fn restored_copy(&self, device: VirtioDevice) -> Driver {
        let mut mmio = VirtioMmio::new(device);
        mmio.restore(self.mmio.state()).expect("restore");
        let mut copy = Driver::with_parts(self.ram.clone(), mmio);
        copy.icount = self.icount;
        copy.next_desc.clone_from(&self.next_desc);
        copy.avail_idx.clone_from(&self.avail_idx);
        copy.used_seen.clone_from(&self.used_seen);
        copy
    }
}

/// A disk image in the temp directory, removed on drop.
pub struct TempImage {
    pub path: PathBuf,
}

impl TempImage {
    pub fn new(name: &str, contents: &[u8]) -> TempImage {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("ftvm-virtio-{}-{n}-{name}.img", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        TempImage { path }
    }

    /// A same-content copy (for a restored twin that must not share the file).
    pub fn copy(&self, name: &str) -> TempImage {
        TempImage::new(name, &std::fs::read(&self.path).unwrap())
    }

    pub fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
