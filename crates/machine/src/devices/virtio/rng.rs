//! virtio entropy device (virtio v1.2 §5.4). The machine has no randomness of its own
//! (DESIGN.md §2): entropy arrives as a logged input into a bounded pool, and the
//! driver's requests are filled from the pool. A request that finds the pool empty
//! waits, and [`Rng::starved`] tells the layer above to feed more.

use super::queue::{Queue, QueueError};
use super::VirtioError;
use rv64::GuestRam;
use std::collections::VecDeque;

/// Most entropy bytes the device holds; bytes offered beyond it are discarded.
pub const POOL_MAX_BYTES: usize = 4096;

#[derive(Debug, Default)]
pub struct Rng {
    pool: VecDeque<u8>,
    /// A request is waiting that the pool could not fill.
    starved: bool,
}

/// The entropy device's state, as plain data.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RngState {
    pub pool: Vec<u8>,
    pub starved: bool,
}

impl Rng {
    pub fn new() -> Rng {
        Rng { pool: VecDeque::with_capacity(POOL_MAX_BYTES), starved: false }
    }

    pub fn pool_len(&self) -> usize {
        self.pool.len()
    }

    /// A driver request is waiting for entropy.
    pub fn starved(&self) -> bool {
        self.starved
    }

    /// Adds to the pool as much of `bytes` as fits under [`POOL_MAX_BYTES`].
    pub fn add_entropy(&mut self, bytes: &[u8]) {
        let room = POOL_MAX_BYTES - self.pool.len();
        self.pool.extend(&bytes[..bytes.len().min(room)]);
    }

    pub(super) fn reset(&mut self) {
        self.starved = false;
    }

    /// Fills waiting requests from the pool, each with as many bytes as it has room
    /// for and the pool holds. Returns whether to interrupt the driver.
    pub(super) fn process(&mut self, queue: &mut Queue, ram: &mut GuestRam) -> Result<bool, QueueError> {
        let mut used = false;
        loop {
            if self.pool.is_empty() {
                self.starved = queue.pending(ram)? > 0;
                break;
            }
            let Some(chain) = queue.pop(ram)? else {
                self.starved = false;
                break;
            };
            let n = usize::try_from(chain.writable_len()).map_or(self.pool.len(), |room| room.min(self.pool.len()));
            let bytes: Vec<u8> = self.pool.drain(..n).collect();
            chain.write_at(ram, 0, &bytes)?;
            queue.push_used(ram, chain.head, n as u32)?;
            used = true;
        }
        Ok(used && queue.interrupt_wanted(ram)?)
    }

    pub fn state(&self) -> RngState {
        RngState { pool: self.pool.iter().copied().collect(), starved: self.starved }
    }

    pub fn restore(&mut self, state: RngState) -> Result<(), VirtioError> {
        self.check_state(&state)?;
        self.pool = state.pool.into();
        self.starved = state.starved;
        Ok(())
    }

    /// Whether `state` is within the bounds.
    pub fn check_state(&self, state: &RngState) -> Result<(), VirtioError> {
        if state.pool.len() > POOL_MAX_BYTES {
            let problem = format!("pool of {} bytes, at most {POOL_MAX_BYTES}", state.pool.len());
            return Err(VirtioError::InvalidState { device: "entropy", problem });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::*;
    use crate::devices::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};

    const BUF: u64 = DATA;

    fn rng_driver() -> Driver {
        Driver::setup(VirtioDevice::Rng(Rng::new()))
    }

    fn add_entropy(driver: &mut Driver, bytes: &[u8]) {
        let mut ctx =
            crate::devices::DeviceCtx { ram: &mut driver.ram, outputs: &mut driver.outputs, icount: driver.icount };
        driver.mmio.add_entropy(bytes, &mut ctx);
    }

    fn pool_len(driver: &Driver) -> usize {
        match driver.mmio.device() {
            VirtioDevice::Rng(rng) => rng.pool_len(),
            _ => unreachable!(),
        }
    }

    #[test]
    fn offers_only_version_1() {
        let mut driver = Driver::new(VirtioDevice::Rng(Rng::new()));
        assert_eq!(driver.read(reg::DEVICE_ID), 4);
        assert_eq!(driver.device_features(), VIRTIO_F_VERSION_1);
    }

    #[test]
    fn requests_are_filled_from_the_pool() {
        let mut driver = rng_driver();
        add_entropy(&mut driver, &[1, 2, 3, 4, 5, 6]);
        let head = driver.post(0, &[writable(BUF, 4)]);
        driver.notify(0);
        assert_eq!(driver.used(0), vec![(u32::from(head), 4)]);
        assert_eq!(driver.bytes(BUF, 4), [1, 2, 3, 4]);
        assert_eq!(pool_len(&driver), 2);
        assert!(driver.mmio.irq_level());
        assert!(!driver.mmio.wants_entropy());
    }

    #[test]
    fn a_request_finding_the_pool_empty_waits_and_asks_for_entropy() {
        let mut driver = rng_driver();
        let head = driver.post(0, &[writable(BUF, 16)]);
        driver.notify(0);
        assert!(driver.used(0).is_empty());
        assert!(driver.mmio.wants_entropy());
        add_entropy(&mut driver, &[7; 10]);
        assert_eq!(driver.used(0), vec![(u32::from(head), 10)]);
        assert_eq!(driver.bytes(BUF, 16), [[7u8; 10].as_slice(), &[0; 6]].concat());
        assert!(!driver.mmio.wants_entropy());
    }

    #[test]
    fn the_pool_is_capped() {
        let mut driver = rng_driver();
        add_entropy(&mut driver, &vec![1; POOL_MAX_BYTES - 1]);
        add_entropy(&mut driver, &[2; 10]);
        assert_eq!(pool_len(&driver), POOL_MAX_BYTES);
    }

    #[test]
    fn restored_device_behaves_identically() {
        let mut driver = rng_driver();
        add_entropy(&mut driver, &[1, 2, 3]);
        driver.post(0, &[writable(BUF, 2)]);
        driver.post(0, &[writable(BUF + 2, 2)]);
        driver.post(0, &[writable(BUF + 4, 2)]);
        driver.notify(0);
        let mut twin = driver.restored_copy(VirtioDevice::Rng(Rng::new()));
        assert!(twin.mmio.wants_entropy());
        for d in [&mut driver, &mut twin] {
            add_entropy(d, &[4, 5, 6]);
            d.post(0, &[writable(BUF + 8, 8)]);
            d.notify(0);
        }
        assert_eq!(driver.mmio.state(), twin.mmio.state());
        assert_eq!(driver.ram.as_slice(), twin.ram.as_slice());
        assert_eq!(driver.used(0), twin.used(0));
    }
}
