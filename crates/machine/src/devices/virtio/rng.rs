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
        if state.pool.len() > POOL_MAX_BYTES {
            let problem = format!("pool of {} bytes, at most {POOL_MAX_BYTES}", state.pool.len());
            return Err(VirtioError::InvalidState { device: "entropy", problem });
        }
        self.pool = state.pool.into();
        self.starved = state.starved;
        Ok(())
    }
}
