//! Split virtqueues (virtio v1.2 §2.7): the descriptor table, the available ring and
//! the used ring, walked over guest RAM. INDIRECT_DESC and EVENT_IDX are not offered,
//! so a chain is a plain list of descriptors linked by NEXT.
//!
//! Why not rust-vmm's virtio-queue: it works over vm-memory's GuestMemory abstraction,
//! and ours must not have a second path into guest RAM. Every DMA write here goes
//! through `GuestRam::write`, so dirty-page tracking (and thus checkpoints) sees device
//! writes exactly as it sees the hart's. Every read and write is bounds-checked by
//! `GuestRam` and every index the guest supplies is checked here: a hostile driver gets
//! a [`QueueError`], never a panic.

use rv64::GuestRam;

/// The largest queue the transport offers (QueueNumMax).
pub const QUEUE_SIZE_MAX: u16 = 256;

const DESC_SIZE_BYTES: u64 = 16;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
/// avail.flags bit: the driver asks not to be interrupted for used buffers.
const AVAIL_F_NO_INTERRUPT: u16 = 1;

// A queue of the largest size has descriptor ids that fit in the u16 `next` field.
const _: () = assert!(QUEUE_SIZE_MAX.is_power_of_two());

/// Why a queue or a request on it is unusable. The transport answers with
/// DEVICE_NEEDS_RESET: the spec leaves the device's behaviour undefined here, and
/// refusing to go on is the one answer that cannot corrupt guest memory.
#[derive(Debug, Clone, PartialEq, Eq, Hash, thiserror::Error)]
pub enum QueueError {
    #[error("queue size {size} is not a power of two in 1..={QUEUE_SIZE_MAX}")]
    BadSize { size: u32 },
    #[error("{ring} of a queue of size {size} at {addr:#x} is misaligned or outside guest RAM")]
    BadRing { ring: &'static str, addr: u64, size: u16 },
    #[error("ring access at {addr:#x} is outside guest RAM")]
    RingOutsideRam { addr: u64 },
    #[error("available index jumped from {next_avail} to {avail_idx} on a queue of size {size}")]
    AvailIndexJump { next_avail: u16, avail_idx: u16, size: u16 },
    #[error("descriptor index {index} is out of range for a queue of size {size}")]
    DescriptorOutOfRange { index: u16, size: u16 },
    #[error("descriptor chain from head {head} is longer than the queue (a loop)")]
    ChainTooLong { head: u16 },
    #[error("descriptor {index} has the INDIRECT flag, which was not offered")]
    IndirectNotOffered { index: u16 },
    #[error("descriptor {index} is device-readable but follows a device-writable one")]
    ReadableAfterWritable { index: u16 },
    #[error("descriptor {index} buffer [{addr:#x}, +{len:#x}) is outside guest RAM")]
    BufferOutsideRam { index: u16, addr: u64, len: u32 },
    #[error("request from head {head} is malformed: {problem}")]
    MalformedRequest { head: u16, problem: &'static str },
}

/// One split virtqueue's registers and the device's position in its rings. Plain
/// data: this is also what a snapshot saves.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Queue {
    /// QueueNum as the driver wrote it; validated when the queue is made ready.
    pub size: u32,
    pub ready: bool,
    pub desc_addr: u64,
    /// The available ring ("driver area").
    pub avail_addr: u64,
    /// The used ring ("device area").
    pub used_addr: u64,
    /// Next available-ring entry the device will take.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill (= used.idx as last published).
    pub next_used: u16,
}

impl Default for Queue {
    fn default() -> Self {
        Queue {
            size: u32::from(QUEUE_SIZE_MAX),
            ready: false,
            desc_addr: 0,
            avail_addr: 0,
            used_addr: 0,
            next_avail: 0,
            next_used: 0,
        }
    }
}

/// A guest buffer: one descriptor, known to lie wholly inside guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub addr: u64,
    pub len: u32,
}

/// A descriptor chain taken from the available ring: its device-readable buffers,
/// then its device-writable ones, each side seen as one contiguous byte stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub head: u16,
    pub readable: Vec<Segment>,
    pub writable: Vec<Segment>,
}

impl Queue {
    fn size_u16(&self) -> u16 {
        // Ready queues have size <= QUEUE_SIZE_MAX (checked in `validate`).
        u16::try_from(self.size).unwrap_or(QUEUE_SIZE_MAX)
    }

    /// Checks what the driver set up before the queue is used (at QueueReady = 1):
    /// [`Queue::check_layout`], and rings that lie inside guest RAM.
    pub fn validate(&self, ram: &GuestRam) -> Result<(), QueueError> {
        self.check_layout()?;
        for (ring, addr, len) in self.rings() {
            if ram.offset_of(addr, len).is_none() {
                return Err(QueueError::BadRing { ring, addr, size: self.size_u16() });
            }
        }
        Ok(())
    }

    /// A power-of-two size no larger than the maximum, and aligned rings (§2.7).
    pub fn check_layout(&self) -> Result<(), QueueError> {
        if self.size == 0 || self.size > u32::from(QUEUE_SIZE_MAX) || !self.size.is_power_of_two() {
            return Err(QueueError::BadSize { size: self.size });
        }
        let aligns = [16, 2, 4];
        for ((ring, addr, _), align) in self.rings().into_iter().zip(aligns) {
            if addr % align != 0 {
                return Err(QueueError::BadRing { ring, addr, size: self.size_u16() });
            }
        }
        Ok(())
    }

    /// Each ring's name, guest address and length in bytes.
    fn rings(&self) -> [(&'static str, u64, u64); 3] {
        let n = u64::from(self.size_u16());
        [
            ("descriptor table", self.desc_addr, DESC_SIZE_BYTES * n),
            ("available ring", self.avail_addr, 6 + 2 * n),
            ("used ring", self.used_addr, 6 + 8 * n),
        ]
    }

    fn read_u16(ram: &GuestRam, addr: u64) -> Result<u16, QueueError> {
        let mut b = [0; 2];
        ram.read(addr, &mut b).ok_or(QueueError::RingOutsideRam { addr })?;
        Ok(u16::from_le_bytes(b))
    }

    fn avail_idx(&self, ram: &GuestRam) -> Result<u16, QueueError> {
        Self::read_u16(ram, self.avail_addr.wrapping_add(2))
    }

    /// Number of chains the driver has made available and the device not yet taken.
    pub fn pending(&self, ram: &GuestRam) -> Result<u16, QueueError> {
        let avail_idx = self.avail_idx(ram)?;
        let pending = avail_idx.wrapping_sub(self.next_avail);
        if pending > self.size_u16() {
            return Err(QueueError::AvailIndexJump { next_avail: self.next_avail, avail_idx, size: self.size_u16() });
        }
        Ok(pending)
    }

    /// Takes the next available chain, or None when the driver has made none.
    pub fn pop(&mut self, ram: &GuestRam) -> Result<Option<Chain>, QueueError> {
        if self.pending(ram)? == 0 {
            return Ok(None);
        }
        let size = self.size_u16();
        let slot = u64::from(self.next_avail % size);
        let head = Self::read_u16(ram, self.avail_addr.wrapping_add(4 + 2 * slot))?;
        let chain = self.walk_chain(ram, head)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(Some(chain))
    }

    /// Gives back the chain just taken by `pop`, so that the next `pop` returns it
    /// again (a device that cannot use a buffer yet leaves it to the driver).
    pub fn unpop(&mut self) {
        self.next_avail = self.next_avail.wrapping_sub(1);
    }

    fn walk_chain(&self, ram: &GuestRam, head: u16) -> Result<Chain, QueueError> {
        let size = self.size_u16();
        let mut chain = Chain { head, readable: Vec::new(), writable: Vec::new() };
        let mut index = head;
        for _ in 0..size {
            if index >= size {
                return Err(QueueError::DescriptorOutOfRange { index, size });
            }
            let addr = self.desc_addr.wrapping_add(DESC_SIZE_BYTES * u64::from(index));
            let mut raw = [0u8; DESC_SIZE_BYTES as usize];
            ram.read(addr, &mut raw).ok_or(QueueError::RingOutsideRam { addr })?;
            let buf_addr = u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes"));
            let len = u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes"));
            let flags = u16::from_le_bytes(raw[12..14].try_into().expect("2 bytes"));
            let next = u16::from_le_bytes(raw[14..16].try_into().expect("2 bytes"));
            if flags & DESC_F_INDIRECT != 0 {
                return Err(QueueError::IndirectNotOffered { index });
            }
            if len > 0 && ram.offset_of(buf_addr, u64::from(len)).is_none() {
                return Err(QueueError::BufferOutsideRam { index, addr: buf_addr, len });
            }
            let segment = Segment { addr: buf_addr, len };
            if flags & DESC_F_WRITE != 0 {
                chain.writable.push(segment);
            } else if !chain.writable.is_empty() {
                return Err(QueueError::ReadableAfterWritable { index });
            } else {
                chain.readable.push(segment);
            }
            if flags & DESC_F_NEXT == 0 {
                return Ok(chain);
            }
            index = next;
        }
        Err(QueueError::ChainTooLong { head })
    }

    /// Returns chain `head` to the driver with `len` bytes written into it.
    pub fn push_used(&mut self, ram: &mut GuestRam, head: u16, len: u32) -> Result<(), QueueError> {
        let slot = u64::from(self.next_used % self.size_u16());
        let elem_addr = self.used_addr.wrapping_add(4 + 8 * slot);
        let mut elem = [0u8; 8];
        elem[0..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..8].copy_from_slice(&len.to_le_bytes());
        ram.write(elem_addr, &elem).ok_or(QueueError::RingOutsideRam { addr: elem_addr })?;
        self.next_used = self.next_used.wrapping_add(1);
        let idx_addr = self.used_addr.wrapping_add(2);
        ram.write(idx_addr, &self.next_used.to_le_bytes()).ok_or(QueueError::RingOutsideRam { addr: idx_addr })
    }

    /// Whether the driver wants an interrupt for used buffers (avail.flags).
    pub fn interrupt_wanted(&self, ram: &GuestRam) -> Result<bool, QueueError> {
        Ok(Self::read_u16(ram, self.avail_addr)? & AVAIL_F_NO_INTERRUPT == 0)
    }
}

fn total_len(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| u64::from(s.len)).sum()
}

/// Calls `f(addr, start, n)` for each piece of the byte range `[offset, offset+len)`
/// of the stream formed by `segments`: `n` bytes at guest `addr`, which are bytes
/// `start..start+n` of the range. The caller has checked the range fits.
fn for_each_piece(segments: &[Segment], offset: u64, len: u64, mut f: impl FnMut(u64, usize, usize)) {
    let (mut skip, mut done) = (offset, 0u64);
    for segment in segments {
        if done == len {
            break;
        }
        let seg_len = u64::from(segment.len);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let n = (seg_len - skip).min(len - done);
        f(segment.addr + skip, done as usize, n as usize);
        done += n;
        skip = 0;
    }
}

impl Chain {
    pub fn readable_len(&self) -> u64 {
        total_len(&self.readable)
    }

    pub fn writable_len(&self) -> u64 {
        total_len(&self.writable)
    }

    /// Copies bytes `[offset, offset+buf.len())` of the readable stream into `buf`.
    pub fn read_at(&self, ram: &GuestRam, offset: u64, buf: &mut [u8]) -> Result<(), QueueError> {
        self.check_range(offset, buf.len(), self.readable_len(), "read past the readable buffers")?;
        let mut result = Ok(());
        for_each_piece(&self.readable, offset, buf.len() as u64, |addr, start, n| {
            if ram.read(addr, &mut buf[start..start + n]).is_none() {
                result = Err(QueueError::RingOutsideRam { addr });
            }
        });
        result
    }

    /// Copies `data` into bytes `[offset, offset+data.len())` of the writable stream.
    pub fn write_at(&self, ram: &mut GuestRam, offset: u64, data: &[u8]) -> Result<(), QueueError> {
        self.check_range(offset, data.len(), self.writable_len(), "write past the writable buffers")?;
        let mut result = Ok(());
        for_each_piece(&self.writable, offset, data.len() as u64, |addr, start, n| {
            if ram.write(addr, &data[start..start + n]).is_none() {
                result = Err(QueueError::RingOutsideRam { addr });
            }
        });
        result
    }

    fn check_range(&self, offset: u64, len: usize, total: u64, problem: &'static str) -> Result<(), QueueError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= total => Ok(()),
            _ => Err(QueueError::MalformedRequest { head: self.head, problem }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: u64 = 0x8000_0000;
    const DESC: u64 = BASE;
    const AVAIL: u64 = BASE + 0x1000;
    const USED: u64 = BASE + 0x2000;

    fn ram_and_queue(size: u32) -> (GuestRam, Queue) {
        let ram = GuestRam::new(BASE, 1 << 20);
        let queue =
            Queue { size, ready: true, desc_addr: DESC, avail_addr: AVAIL, used_addr: USED, ..Queue::default() };
        (ram, queue)
    }

    fn put_desc(ram: &mut GuestRam, index: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        ram.write(DESC + 16 * index, &raw).unwrap();
    }

    fn make_available(ram: &mut GuestRam, slot: u64, head: u16, idx: u16) {
        ram.write(AVAIL + 4 + 2 * slot, &head.to_le_bytes()).unwrap();
        ram.write(AVAIL + 2, &idx.to_le_bytes()).unwrap();
    }

    #[test]
    fn pop_walks_a_chain_of_readable_then_writable_buffers() {
        let (mut ram, mut queue) = ram_and_queue(8);
        put_desc(&mut ram, 3, BASE + 0x10000, 16, DESC_F_NEXT, 5);
        put_desc(&mut ram, 5, BASE + 0x11000, 512, DESC_F_NEXT | DESC_F_WRITE, 0);
        put_desc(&mut ram, 0, BASE + 0x12000, 1, DESC_F_WRITE, 0);
        make_available(&mut ram, 0, 3, 1);
        let chain = queue.pop(&ram).unwrap().unwrap();
        assert_eq!(chain.head, 3);
        assert_eq!(chain.readable, vec![Segment { addr: BASE + 0x10000, len: 16 }]);
        assert_eq!(chain.writable_len(), 513);
        assert_eq!(queue.pop(&ram).unwrap(), None);
    }

    #[test]
    fn stream_access_spans_segment_boundaries() {
        let (mut ram, mut queue) = ram_and_queue(8);
        put_desc(&mut ram, 0, BASE + 0x10000, 3, DESC_F_NEXT | DESC_F_WRITE, 1);
        put_desc(&mut ram, 1, BASE + 0x20000, 5, DESC_F_WRITE, 0);
        make_available(&mut ram, 0, 0, 1);
        let chain = queue.pop(&ram).unwrap().unwrap();
        chain.write_at(&mut ram, 1, &[1, 2, 3, 4]).unwrap();
        let mut first = [0u8; 3];
        let mut second = [0u8; 5];
        ram.read(BASE + 0x10000, &mut first).unwrap();
        ram.read(BASE + 0x20000, &mut second).unwrap();
        assert_eq!((first, second), ([0, 1, 2], [3, 4, 0, 0, 0]));
        assert!(chain.write_at(&mut ram, 5, &[0; 4]).is_err());
    }

    #[test]
    fn a_descriptor_loop_is_an_error() {
        let (mut ram, mut queue) = ram_and_queue(4);
        put_desc(&mut ram, 0, BASE + 0x10000, 8, DESC_F_NEXT, 1);
        put_desc(&mut ram, 1, BASE + 0x10000, 8, DESC_F_NEXT, 0);
        make_available(&mut ram, 0, 0, 1);
        assert_eq!(queue.pop(&ram), Err(QueueError::ChainTooLong { head: 0 }));
    }

    #[test]
    fn out_of_range_indices_and_buffers_are_errors() {
        let (mut ram, mut queue) = ram_and_queue(4);
        make_available(&mut ram, 0, 9, 1);
        assert_eq!(queue.pop(&ram), Err(QueueError::DescriptorOutOfRange { index: 9, size: 4 }));
        put_desc(&mut ram, 0, BASE + 0xff000, 0x2000, 0, 0);
        make_available(&mut ram, 0, 0, 1);
        assert!(matches!(queue.pop(&ram), Err(QueueError::BufferOutsideRam { index: 0, .. })));
        put_desc(&mut ram, 0, u64::MAX - 4, 16, 0, 0);
        assert!(matches!(queue.pop(&ram), Err(QueueError::BufferOutsideRam { index: 0, .. })));
    }

    #[test]
    fn avail_index_running_ahead_by_more_than_the_size_is_an_error() {
        let (mut ram, mut queue) = ram_and_queue(4);
        ram.write(AVAIL + 2, &5u16.to_le_bytes()).unwrap();
        assert!(matches!(queue.pop(&ram), Err(QueueError::AvailIndexJump { .. })));
    }

    #[test]
    fn validate_refuses_bad_sizes_and_rings() {
        let (ram, queue) = ram_and_queue(8);
        assert_eq!(queue.validate(&ram), Ok(()));
        for size in [0, 3, 512] {
            let bad = Queue { size, ..queue.clone() };
            assert_eq!(bad.validate(&ram), Err(QueueError::BadSize { size }));
        }
        let misaligned = Queue { used_addr: USED + 2, ..queue.clone() };
        assert!(misaligned.validate(&ram).is_err());
        let outside = Queue { desc_addr: BASE + (1 << 20) - 16, ..queue };
        assert!(outside.validate(&ram).is_err());
    }

    #[test]
    fn push_used_fills_the_used_ring_and_wraps() {
        let (mut ram, mut queue) = ram_and_queue(2);
        queue.next_used = u16::MAX;
        queue.push_used(&mut ram, 1, 77).unwrap();
        queue.push_used(&mut ram, 0, 5).unwrap();
        assert_eq!(ram.read_u32(USED + 4 + 8).unwrap(), 1); // slot 65535 % 2 = 1
        assert_eq!(ram.read_u32(USED + 4 + 12).unwrap(), 77);
        assert_eq!(ram.read_u32(USED + 4 + 4).unwrap(), 5);
        assert_eq!(Queue::read_u16(&ram, USED + 2).unwrap(), 1);
    }
}
