//! The decoded-code cache: straight-line runs of instructions within one page
//! (blocks), decoded once and then executed in a tight loop.
//!
//! A block is found by its virtual start address and is valid while (1) that address
//! still translates, for fetch at the current privilege, to the same RAM page, and
//! (2) the page's code generation has not moved: [`GuestRam`] moves it on any write to
//! a page that code was decoded from (hart stores, A/D updates, DMA, restored pages).
//! A write into the running block's own page ends the block after the writing
//! instruction, so self-modifying code is seen from the very next instruction, as
//! before blocks existed.
//!
//! Running a block changes nothing about what happens at a given icount: the run loop
//! checks the budget, timers and interrupts before each block exactly as it would
//! before each instruction, runs no more instructions than the budget or the next
//! timer deadline allows, and a block stops after any instruction that may have made
//! an interrupt deliverable or asked the hart to stop (a memory access that reached a
//! device, a CSR write, a trap, an xRET).

use crate::bus::Bus;
use crate::decode::{Insn, Kind};
use crate::exec::Flow;
use crate::hart::{decode_any, Hart, StepEnd};
use crate::mem::{GuestRam, PAGE_SHIFT, PAGE_SIZE};

/// Most instructions in one block. Longer straight-line code continues in the next
/// block.
const MAX_BLOCK_OPS: usize = 32;
/// Direct-mapped slots, indexed by the start address.
const BLOCK_SLOTS: usize = 1 << 13;

/// One decoded instruction, ready to execute.
#[derive(Clone, Copy)]
pub(crate) struct MicroOp {
    pub(crate) kind: Kind,
    /// Offset of the instruction in its page.
    pub(crate) page_offset: u16,
    pub(crate) insn: Insn,
    /// The instruction's bits (16 for a compressed one), for `xtval`.
    pub(crate) raw: u32,
}

impl MicroOp {
    pub(crate) fn new(raw: u32, page_offset: u16) -> MicroOp {
        let insn = decode_any(raw);
        MicroOp { kind: Kind::of(&insn), page_offset, insn, raw }
    }
}

/// A block: up to [`MAX_BLOCK_OPS`] instructions from `pc` on, all in one page.
#[derive(Clone)]
struct Block {
    /// Virtual address of the first instruction; odd (never a pc) when empty.
    pc: u64,
    /// RAM offset of the page the instructions were decoded from.
    page_ram_offset: usize,
    /// That page's code generation when they were.
    code_gen: u64,
    /// Instructions in `ops`; zero when the first one crosses the page end.
    len: usize,
    ops: [MicroOp; MAX_BLOCK_OPS],
}

impl Block {
    /// Decode from RAM page `page_ram_offset` starting at `pc`.
    fn build(&mut self, ram: &mut GuestRam, pc: u64, page_ram_offset: usize) {
        self.code_gen = ram.watch_code_page(page_ram_offset >> PAGE_SHIFT);
        self.pc = pc;
        self.page_ram_offset = page_ram_offset;
        let page = &ram.as_slice()[page_ram_offset..page_ram_offset + PAGE_SIZE as usize];
        let mut offset = (pc % PAGE_SIZE) as usize;
        let mut len = 0;
        while len < MAX_BLOCK_OPS && offset + 2 <= page.len() {
            let low = u16::from_le_bytes([page[offset], page[offset + 1]]) as u32;
            let raw = if low & 3 != 3 {
                low
            } else if offset + 4 <= page.len() {
                low | (u16::from_le_bytes([page[offset + 2], page[offset + 3]]) as u32) << 16
            } else {
                break; // crosses into the next page: fetched on its own
            };
            let op = MicroOp::new(raw, offset as u16);
            self.ops[len] = op;
            len += 1;
            offset += op.insn.len as usize;
            if op.kind.ends_block() {
                break;
            }
        }
        self.len = len;
    }
}

/// The cache of blocks. Not part of the architectural state: it starts empty and may
/// be dropped at any time.
pub(crate) struct BlockCache {
    slots: Box<[Block]>,
    /// [`GuestRam::id`] of the RAM the blocks were decoded from.
    ram_id: u64,
}

impl BlockCache {
    pub(crate) fn new() -> BlockCache {
        let empty_op = MicroOp::new(0, 0);
        let empty = Block { pc: 1, page_ram_offset: 0, code_gen: 0, len: 0, ops: [empty_op; MAX_BLOCK_OPS] };
        BlockCache { slots: vec![empty; BLOCK_SLOTS].into_boxed_slice(), ram_id: 0 }
    }

    /// An empty stand-in, for while the real cache is lent out (allocates nothing).
    pub(crate) fn placeholder() -> BlockCache {
        BlockCache { slots: Box::new([]), ram_id: 0 }
    }

    /// Forget every block when the RAM is not the one they were decoded from.
    pub(crate) fn bind(&mut self, ram: &GuestRam) {
        if self.ram_id != ram.id() {
            for slot in self.slots.iter_mut() {
                slot.pc = 1;
            }
            self.ram_id = ram.id();
        }
    }
}

impl Hart {
    /// Run the block at pc: at most `limit` (at least 1) instructions, fewer when one
    /// transfers control, traps, or needs the run loop to look at the hart again.
    #[inline(always)]
    pub(crate) fn run_block(&mut self, bus: &mut impl Bus, cache: &mut BlockCache, limit: u64) -> Result<(), StepEnd> {
        let pc = self.state.pc;
        let page_ram_offset = self.fetch_page_offset(bus, pc)? & !(PAGE_SIZE as usize - 1);
        let block = &mut cache.slots[(pc >> 1) as usize % BLOCK_SLOTS];
        let page = page_ram_offset >> PAGE_SHIFT;
        let ram = bus.ram();
        if block.pc != pc || block.page_ram_offset != page_ram_offset || block.code_gen != ram.code_gen(page) {
            block.build(ram, pc, page_ram_offset);
        }
        if block.len == 0 {
            return self.step(bus);
        }
        let code_gen = block.code_gen;
        let count = block.len.min(usize::try_from(limit).unwrap_or(usize::MAX));
        let page_base = pc & !(PAGE_SIZE - 1);
        let mut next_pc = pc;
        for op in &block.ops[..count] {
            let pc = page_base | op.page_offset as u64;
            next_pc = pc.wrapping_add(op.insn.len as u64);
            match self.exec_op(bus, op, pc) {
                Ok(Flow::Next) => self.state.icount += 1,
                Ok(Flow::Jump) => {
                    self.state.x[0] = 0;
                    self.state.icount += 1;
                    self.state.pc = self.next_pc;
                    return Ok(());
                }
                Ok(Flow::Check) => {
                    self.state.x[0] = 0;
                    self.state.icount += 1;
                    if self.irq_dirty || bus.ram().code_gen(page) != code_gen {
                        break;
                    }
                }
                Err(end) => {
                    self.state.x[0] = 0;
                    self.state.pc = pc;
                    return Err(end);
                }
            }
        }
        self.state.pc = next_pc;
        Ok(())
    }

    /// Execute one instruction outside any block: a 32-bit instruction that crosses
    /// a page boundary.
    #[inline(never)]
    fn step(&mut self, bus: &mut impl Bus) -> Result<(), StepEnd> {
        let pc = self.state.pc;
        let raw = self.fetch(bus, pc)?;
        let op = MicroOp::new(raw, (pc % PAGE_SIZE) as u16);
        let fall_through = pc.wrapping_add(op.insn.len as u64);
        let flow = self.exec_op(bus, &op, pc);
        self.state.x[0] = 0;
        self.state.pc = match flow? {
            Flow::Jump => self.next_pc,
            Flow::Next | Flow::Check => fall_through,
        };
        self.state.icount += 1;
        Ok(())
    }
}
