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
//!
//! With the compiler tier (see [`crate::jit`]) this is also the dispatcher: a block that
//! ran often enough is sent to the compiler, and once its code is back (kept by block
//! identity, so it survives the block leaving its slot) the block runs compiled whenever
//! the budget left covers it, under the same rules.

use crate::bus::Bus;
use crate::decode::{Insn, Kind};
use crate::exec::Flow;
use crate::hart::{decode_any, Cpu, Hart, HartConfig, PrivMode, StepEnd};
use crate::jit::{exit_code, BlockFn, BlockKey, Compiled, Jit, JitCtx, JitStats, Request};
use crate::mem::{GuestRam, PAGE_SHIFT, PAGE_SIZE};

/// Most instructions in one block. Longer straight-line code continues in the next
/// block.
const MAX_BLOCK_OPS: usize = 32;
/// Direct-mapped block slots, indexed by the start address.
const BLOCK_SLOTS: usize = 1 << 17;
/// Decoded instructions kept at most; when full, every block is dropped.
const ARENA_OPS: usize = 1 << 20;

/// One decoded instruction, ready to execute.
#[derive(Clone, Copy)]
pub(crate) struct MicroOp {
    pub(crate) kind: Kind,
    pub(crate) insn: Insn,
    /// The instruction's bits (16 for a compressed one), for `xtval`.
    pub(crate) raw: u32,
}

impl MicroOp {
    pub(crate) fn new(raw: u32) -> MicroOp {
        let insn = decode_any(raw);
        MicroOp { kind: Kind::of(&insn), insn, raw }
    }
}

/// A block: up to [`MAX_BLOCK_OPS`] consecutive instructions from `pc` on, all in
/// one page, decoded into `BlockCache::ops[start..start + len]`.
#[derive(Clone, Copy)]
struct Block {
    /// Virtual address of the first instruction; odd (never a pc) when empty.
    pc: u64,
    /// RAM offset of the page the instructions were decoded from.
    page_ram_offset: usize,
    /// That page's code generation when they were.
    code_gen: u64,
    start: u32,
    /// Zero when the first instruction crosses the page end.
    len: u32,
    /// Interpreted runs so far ([`REFUSED`]: the compiler cannot take it).
    hits: u32,
    /// The block compiled to host code, once hot.
    code: Option<BlockFn>,
}

const EMPTY: Block = Block { pc: 1, page_ram_offset: 0, code_gen: 0, start: 0, len: 0, hits: 0, code: None };
const REFUSED: u32 = u32::MAX;
/// Sent to the compiler, not back yet.
const PENDING: u32 = u32::MAX - 1;

/// The cache of blocks. Not part of the architectural state: it starts empty and may
/// be dropped at any time. Memory is taken when the hart first runs.
pub(crate) struct BlockCache {
    slots: Vec<Block>,
    /// The decoded instructions of every block built since the last flush.
    ops: Vec<MicroOp>,
    /// [`GuestRam::id`] of the RAM the blocks were decoded from.
    ram_id: u64,
    /// The compiler, when the configuration asks for one and the host has one.
    jit: Option<Box<Jit>>,
}

impl BlockCache {
    pub(crate) fn new() -> BlockCache {
        BlockCache { slots: Vec::new(), ops: Vec::new(), ram_id: 0, jit: None }
    }

    /// Make the cache ready for running on `ram`: allocated, and empty unless its
    /// blocks were decoded from this very RAM. True when they were not (the hart's
    /// other RAM-derived caches must go too).
    pub(crate) fn bind(&mut self, ram: &GuestRam, config: &HartConfig) -> bool {
        if self.slots.is_empty() {
            self.slots = vec![EMPTY; BLOCK_SLOTS];
            self.ops = Vec::with_capacity(ARENA_OPS);
            if config.cpu == Cpu::Jit {
                self.jit = Jit::new(config.jit).map(Box::new);
            }
        }
        let other_ram = self.ram_id != ram.id();
        if other_ram {
            self.flush();
            if let Some(jit) = &mut self.jit {
                jit.flush();
            }
            self.ram_id = ram.id();
        }
        other_ram
    }

    fn flush(&mut self) {
        self.slots.fill(EMPTY);
        self.ops.clear();
    }

    pub(crate) fn jit_stats(&self) -> JitStats {
        self.jit.as_ref().map(|jit| jit.stats()).unwrap_or_default()
    }

    /// The compiled code of the block in `slot`; a block that just became hot is sent
    /// to the compiler (and, compiling inline, comes back compiled); `None` while it is
    /// interpreted.
    #[inline]
    fn compiled(&mut self, slot: usize, ram: &GuestRam, privilege: PrivMode) -> Option<BlockFn> {
        let jit = self.jit.as_mut()?;
        let block = &mut self.slots[slot];
        if block.code.is_some() {
            return block.code;
        }
        if block.hits < jit.hot_threshold(privilege) {
            block.hits += 1;
            return None;
        }
        if block.hits >= PENDING {
            return None;
        }
        self.request(slot, ram, privilege)
    }

    #[cold]
    fn request(&mut self, slot: usize, ram: &GuestRam, privilege: PrivMode) -> Option<BlockFn> {
        let jit = self.jit.as_mut().expect("called with a compiler");
        if !jit.can_request() {
            return None; // the next run asks again
        }
        let block = self.slots[slot];
        let key = BlockKey {
            slot,
            pc: block.pc,
            page_ram_offset: block.page_ram_offset,
            code_gen: block.code_gen,
            ram_id: self.ram_id,
        };
        self.slots[slot].hits = PENDING;
        if jit.is_pending(&key) {
            return None; // asked for before it left its slot: the result will come
        }
        let ops = &self.ops[block.start as usize..(block.start + block.len) as usize];
        let page = &ram.as_slice()[block.page_ram_offset..block.page_ram_offset + PAGE_SIZE as usize];
        // A successor joins when its slot holds it (same page and generation) and it ran
        // a quarter of the way to hot, unless it has code already or is with the
        // compiler: the exit to it then links to that code. Compiling such blocks again
        // inside every region that reaches them made the boot compile each instruction
        // about three times over.
        let warm_after = jit.hot_threshold(privilege) / 4;
        let slots = &self.slots;
        let is_warm = |pc: u64| {
            let b = &slots[(pc >> 1) as usize % BLOCK_SLOTS];
            b.pc == pc
                && b.page_ram_offset == block.page_ram_offset
                && b.code_gen == block.code_gen
                && b.code.is_none()
                && (warm_after..PENDING).contains(&b.hits)
        };
        let blocks = region(page, block.pc, ops, is_warm);
        // The other blocks of the region start counting again: what runs through the
        // entry runs them compiled too, so only runs from elsewhere make one of them hot
        // (else each soon asked to be compiled once more, on its own).
        for &(pc, _) in &blocks[1..] {
            let member = &mut self.slots[(pc >> 1) as usize % BLOCK_SLOTS];
            if member.pc == pc && member.code.is_none() && member.hits < PENDING {
                member.hits = 0;
            }
        }
        let done = jit.request(Request { key, blocks })?;
        self.install(done);
        self.slots[slot].code
    }

    /// Install what the compiler's thread has finished.
    #[inline]
    fn install_finished(&mut self) {
        let Some(jit) = &mut self.jit else {
            return;
        };
        let done = jit.finished();
        if done.is_empty() {
            return;
        }
        jit.begin_batch();
        for done in done {
            self.install(done);
        }
        self.jit.as_mut().expect("checked above").end_batch();
    }

    /// Put a compiled block into the code cache, and into its slot if the slot still
    /// holds that very block.
    fn install(&mut self, done: Compiled) {
        let jit = self.jit.as_mut().expect("called with a compiler");
        let key = done.key;
        if key.ram_id != self.ram_id {
            jit.discard(done);
            return;
        }
        let mut flushed = false;
        let code = jit.install(done, &mut flushed);
        if flushed {
            // The code cache was full and is empty now, with every pointer into it. What
            // had code starts counting again, to be compiled anew once hot (left marked as
            // sent, it would never be asked for again).
            for block in &mut self.slots {
                if block.code.take().is_some() {
                    block.hits = 0;
                }
            }
        }
        let block = &mut self.slots[key.slot];
        if block.pc == key.pc && block.page_ram_offset == key.page_ram_offset && block.code_gen == key.code_gen {
            block.code = code;
            if code.is_none() {
                block.hits = REFUSED;
            }
        }
    }

    /// Decode the block at `pc` from RAM page `page_ram_offset` into `slot`.
    fn build(&mut self, slot: usize, ram: &mut GuestRam, pc: u64, page_ram_offset: usize) {
        if self.ops.len() + MAX_BLOCK_OPS > ARENA_OPS {
            self.flush();
        }
        let code_gen = ram.watch_code_page(page_ram_offset >> PAGE_SHIFT);
        let page = &ram.as_slice()[page_ram_offset..page_ram_offset + PAGE_SIZE as usize];
        let start = self.ops.len();
        decode_block(page, pc, &mut self.ops);
        let len = (self.ops.len() - start) as u32;
        // Compiled code outlives a block pushed out of its slot or a flush of the decoded
        // instructions: the compiler keeps it by the block's identity.
        let code = self.jit.as_ref().and_then(|jit| jit.lookup(pc, page_ram_offset, code_gen));
        self.slots[slot] = Block { pc, page_ram_offset, code_gen, start: start as u32, len, hits: 0, code };
    }
}

/// Decode the block at `pc` from its page's bytes onto `ops`: up to [`MAX_BLOCK_OPS`]
/// instructions, ending after one that ends blocks, before one that crosses the page end.
fn decode_block(page: &[u8], pc: u64, ops: &mut Vec<MicroOp>) {
    let start = ops.len();
    let mut offset = (pc % PAGE_SIZE) as usize;
    while ops.len() - start < MAX_BLOCK_OPS && offset + 2 <= page.len() {
        let low = u16::from_le_bytes([page[offset], page[offset + 1]]) as u32;
        let raw = if low & 3 != 3 {
            low
        } else if offset + 4 <= page.len() {
            low | (u16::from_le_bytes([page[offset + 2], page[offset + 3]]) as u32) << 16
        } else {
            break; // crosses into the next page: fetched on its own
        };
        let op = MicroOp::new(raw);
        ops.push(op);
        offset += op.insn.len as usize;
        if op.kind.ends_block() {
            break;
        }
    }
}

/// Blocks in a compiled region at most, and instructions in all.
const REGION_BLOCKS: usize = 8;
const REGION_OPS: usize = 128;

/// The region to compile for the block at `pc` (whose instructions are `ops`): it and
/// the warm blocks (`is_warm`: run often lately) reachable from it by fixed jumps and
/// branches within its page, decoded
/// from the page's bytes (the page's code generation is the block's: nothing wrote it
/// since the block was checked).
fn region(page: &[u8], pc: u64, ops: &[MicroOp], is_warm: impl Fn(u64) -> bool) -> Vec<(u64, Vec<MicroOp>)> {
    let vpage = pc & !(PAGE_SIZE - 1);
    let mut blocks = vec![(pc, ops.to_vec())];
    let mut total = ops.len();
    let mut next = 0;
    while next < blocks.len() && blocks.len() < REGION_BLOCKS {
        let mut targets = Vec::new();
        let mut at = blocks[next].0;
        let mut falls_through = true;
        for op in &blocks[next].1 {
            let imm = op.insn.imm as i64 as u64;
            match op.kind {
                Kind::Beq | Kind::Bne | Kind::Blt | Kind::Bge | Kind::Bltu | Kind::Bgeu => {
                    targets.push(at.wrapping_add(imm))
                }
                Kind::Jal => targets.push(at.wrapping_add(imm)),
                _ => {}
            }
            falls_through = !op.kind.ends_block();
            at = at.wrapping_add(op.insn.len as u64);
        }
        if falls_through {
            targets.push(at);
        }
        for target in targets {
            if target & !(PAGE_SIZE - 1) != vpage || !is_warm(target) || blocks.iter().any(|(p, _)| *p == target) {
                continue;
            }
            let mut ops = Vec::new();
            decode_block(page, target, &mut ops);
            if ops.is_empty() || total + ops.len() > REGION_OPS || blocks.len() == REGION_BLOCKS {
                continue;
            }
            total += ops.len();
            blocks.push((target, ops));
        }
        next += 1;
    }
    blocks
}

impl Hart {
    /// Run blocks from pc on, at most `limit` (at least 1) instructions in all: one
    /// block after another while they end in a branch or jump, until an instruction
    /// needs the run loop to look at the hart again (a CSR or privileged instruction,
    /// a trap, a memory access that reached a device or wrote code in the block's
    /// page). Between two blocks there is nothing for the run loop to do: the budget
    /// and timer deadline are in `limit`, and nothing that could make an interrupt
    /// deliverable has happened. Nothing that could change a translation has either,
    /// so the page of the last fetch is translated again only when pc leaves it.
    #[inline(always)]
    pub(crate) fn run_chain(&mut self, bus: &mut impl Bus, cache: &mut BlockCache, limit: u64) -> Result<(), StepEnd> {
        self.data_tag_bits = self.data_tag_bits();
        let stop_icount = self.state.icount + limit;
        let mut pc = self.state.pc;
        // The virtual page last fetched from (odd: none yet) and its RAM offset.
        let mut fetch_vpage = 1;
        let mut page_ram_offset = 0;
        // What compiled code reaches, made when the chain first needs it.
        let mut jit_ctx: Option<JitCtx> = None;
        // The link of the compiled exit that led here (exit word, compiler epoch), to
        // fill with this block.
        let mut pending_link: Option<(u64, u64)> = None;
        cache.install_finished();
        loop {
            if pc & !(PAGE_SIZE - 1) != fetch_vpage {
                self.state.pc = pc;
                page_ram_offset = self.fetch_page_offset(bus, pc)? & !(PAGE_SIZE as usize - 1);
                fetch_vpage = pc & !(PAGE_SIZE - 1);
            }
            let slot = (pc >> 1) as usize % BLOCK_SLOTS;
            let page = page_ram_offset >> PAGE_SHIFT;
            // Compiled code that the jump cache knows runs without the block slot, whose
            // table (6 MiB) costs a cache miss at most dispatches.
            let code_gen = bus.ram().code_gen(page);
            if let Some(code) = cache.jit.as_ref().and_then(|jit| jit.jump_target(pc, page_ram_offset, code_gen)) {
                let jit = cache.jit.as_mut().expect("checked above");
                if let Some((word, epoch)) = pending_link.take() {
                    jit.link(word, epoch, code, page, code_gen);
                }
                let before = self.state.icount;
                let word = self.run_compiled(bus, jit, &mut jit_ctx, code, stop_icount);
                // Nothing retired and on at the same pc: the block did not fit in what is
                // left of the budget, and is interpreted below.
                if self.state.icount != before || word & exit_code::MASK != exit_code::CONTINUE {
                    jit.count_compiled(self.state.icount - before);
                    match word & exit_code::MASK {
                        exit_code::CONTINUE => {
                            pc = self.state.pc;
                            pending_link = Some((word, jit.epoch()));
                            if self.state.icount == stop_icount {
                                return Ok(());
                            }
                            continue;
                        }
                        exit_code::RETURN => return Ok(()),
                        _ => return Err(self.take_step_end()),
                    }
                }
            }
            let ram = bus.ram();
            let block = cache.slots[slot];
            let block =
                if block.pc == pc && block.page_ram_offset == page_ram_offset && block.code_gen == ram.code_gen(page) {
                    block
                } else {
                    cache.build(slot, ram, pc, page_ram_offset);
                    cache.slots[slot]
                };
            if block.len == 0 {
                self.state.pc = pc;
                return self.step(bus);
            }
            // A link is for the block right after the exit, and only that one.
            let link = pending_link.take();
            if let Some(code) = cache.compiled(slot, bus.ram(), self.state.privilege) {
                let jit = cache.jit.as_mut().expect("compiled code comes from the compiler");
                if let Some((word, epoch)) = link {
                    jit.link(word, epoch, code, page, block.code_gen);
                }
                // Only a block that fits in what is left of the budget runs compiled, so
                // that it cannot run past it; else it is interpreted, up to the budget.
                if block.len as u64 <= stop_icount - self.state.icount {
                    jit.remember_jump(pc, page_ram_offset, block.code_gen, code);
                    let before = self.state.icount;
                    let word = self.run_compiled(bus, jit, &mut jit_ctx, code, stop_icount);
                    jit.count_compiled(self.state.icount - before);
                    match word & exit_code::MASK {
                        exit_code::CONTINUE => {
                            pc = self.state.pc;
                            pending_link = Some((word, jit.epoch()));
                            if self.state.icount == stop_icount {
                                return Ok(());
                            }
                            continue;
                        }
                        exit_code::RETURN => return Ok(()),
                        _ => return Err(self.take_step_end()),
                    }
                }
            }
            let count = (block.len as usize).min((stop_icount - self.state.icount) as usize);
            let start = block.start as usize;
            let mut ops = cache.ops[start..start + count].iter();
            pc = loop {
                let Some(op) = ops.next() else {
                    break pc;
                };
                let next_pc = pc.wrapping_add(op.insn.len as u64);
                match self.exec_op(bus, op, pc) {
                    Flow::Next => self.state.icount += 1,
                    Flow::Jump => {
                        self.state.x[0] = 0;
                        self.state.icount += 1;
                        break self.next_pc;
                    }
                    Flow::Leave => {
                        self.state.x[0] = 0;
                        self.state.icount += 1;
                        self.state.pc = self.next_pc;
                        return Ok(());
                    }
                    Flow::Check => {
                        self.state.x[0] = 0;
                        self.state.icount += 1;
                        if self.irq_dirty || bus.ram().code_gen(page) != block.code_gen {
                            self.state.pc = next_pc;
                            return Ok(());
                        }
                    }
                    Flow::End => {
                        self.state.x[0] = 0;
                        self.state.pc = pc;
                        return Err(self.take_step_end());
                    }
                }
                pc = next_pc;
            };
            if self.state.icount == stop_icount {
                self.state.pc = pc;
                return Ok(());
            }
        }
    }

    /// Run a compiled block (and those it links to); returns the exit word, with pc and
    /// icount set.
    #[inline]
    fn run_compiled(
        &mut self,
        bus: &mut impl Bus,
        jit: &Jit,
        ctx: &mut Option<JitCtx>,
        code: BlockFn,
        stop_icount: u64,
    ) -> u64 {
        let ctx = match ctx {
            Some(ctx) => {
                ctx.rebind(self, bus);
                ctx
            }
            None => ctx.insert(JitCtx::new(self, bus, jit, stop_icount)),
        };
        // SAFETY: the context was made for this hart and bus (and re-pointed at them just
        // now), which nothing else uses while the block runs; `code` is in the compiler's
        // cache, which is flushed only between blocks, dropping every pointer to it.
        unsafe { jit.run(code, ctx) }
    }

    /// Execute one instruction outside any block: a 32-bit instruction that crosses
    /// a page boundary.
    #[inline(never)]
    fn step(&mut self, bus: &mut impl Bus) -> Result<(), StepEnd> {
        let pc = self.state.pc;
        let raw = self.fetch(bus, pc)?;
        let op = MicroOp::new(raw);
        let fall_through = pc.wrapping_add(op.insn.len as u64);
        let flow = self.exec_op(bus, &op, pc);
        self.state.x[0] = 0;
        self.state.pc = match flow {
            Flow::Jump | Flow::Leave => self.next_pc,
            Flow::Next | Flow::Check => fall_through,
            Flow::End => return Err(self.take_step_end()),
        };
        self.state.icount += 1;
        Ok(())
    }

    fn take_step_end(&mut self) -> StepEnd {
        self.step_end.take().expect("Flow::End comes with the reason")
    }
}
