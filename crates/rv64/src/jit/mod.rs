//! The compiler tier: hot code becomes host code, with the interpreter kept as the
//! reference and the fallback.
//!
//! **Tiering.** Every block starts interpreted; the block cache counts its runs, and the
//! run after the [`JitConfig::hot_threshold`]th (4096; for user code
//! [`JitConfig::user_hot_threshold`], 512) sends it to the compiler, on a
//! thread of its own by default, while the hart goes on interpreting (when that thread has
//! fallen 16 requests behind, as on a busy host where it waits for a core, the hart
//! compiles the block itself: the boot spent 8% less CPU and wall time, three alternating
//! runs at load 19). What is compiled
//! is a *region*: the hot block and the warm blocks reachable from it by fixed branches
//! and jumps within its page (at most 8 blocks, 128 instructions), so that a loop within
//! a page runs as a host loop. A block that has code already, or is with the compiler,
//! is not compiled into the region again (the exit to it links to its code), and the
//! blocks taken into a region count their runs from zero again, so that only runs
//! entered from elsewhere make them hot on their own: without both, the boot compiled
//! each instruction 2.9 times over (50,700 translated for 17,800 distinct); with them
//! 1.4 times, and the boot spent 20% less CPU, md5 14% less (three alternating runs
//! each at load 15). Guest registers live in host registers within a block;
//! each block loads a register from the hart where it first reads it (the stores before it
//! make those loads hits in the host's L1, forwarded from the store buffer). Loading all
//! that a region reads at its entry instead, to keep them in host registers across the
//! region, made Cranelift spill most of them to the host stack at every entry: the
//! per-block loads spend 4-7% less CPU on md5 and the shell loop (three alternating runs
//! each), the same on gzip, and compile faster. Boot code that runs a few times never
//! pays for compiling.
//!
//! **The same guest, exactly.** Compiled code is the interpreter's decoded blocks (the
//! same instructions, the same validity rule: start address, RAM page, page code
//! generation) turned into one host function. It retires what the interpreter would:
//! - each block runs only when the budget left covers all of it, so compiled code never
//!   runs past the budget or a timer deadline, and the run loop checks interrupts exactly
//!   where it would between interpreted blocks;
//! - an instruction the translator does not inline (CSRs, privileged instructions, A,
//!   F/D with their rounding modes and flags) runs through the interpreter's own code in a
//!   helper call, with the guest registers written back first; so does a load or store
//!   that misses the TLB, reaches a device, crosses a page, or writes a page that is not
//!   dirty yet or holds decoded code (then the function leaves after it);
//! - after a store into a page that holds decoded code, a device access, or a helper that
//!   may have changed either, it leaves exactly where the interpreter would, so
//!   self-modifying code and DMA are seen at the next instruction.
//!
//! Leaving early is always allowed (the run loop then does what it would have done
//! between two interpreted instructions, which is nothing); going on where the
//! interpreter would have stopped never is. The differential tests
//! (`tests/differential.rs`) hold the two engines to the same registers, memory, device
//! accesses and instruction counts over random programs in every privilege mode, and the
//! machine's tests to the same Debian boot.
//!
//! **Fast paths.** Loads and stores that hit the TLB are inlined (tag compare, addend,
//! access; for stores, one byte saying the page is dirty already and holds no code). An
//! exit to a fixed address in the same page becomes a tail call once the dispatcher has
//! linked it (a link slot per exit); an exit known only at run time (returns, indirect
//! jumps) or to another page goes through the jump cache, after checking the fetch
//! translation in the TLB and the target page's code generation, so it tail-calls too
//! when the dispatcher would have found the same code. Compiled code is kept by block
//! identity, so a block pushed out of its slot finds its code again.
//!
//! **Why Cranelift.** It is a well-kept code generator written in Rust (the one under
//! Wasmtime), it builds with cargo alone, and it has the tail calls that chaining needs.
//! Its compile time is what shapes the tiering. Measured with `cargo test -p rv64
//! --release --lib compile_time_per_block -- --ignored --nocapture` (CPU time per block
//! on the shared 2-core development machine): one ALU instruction 35 µs, eight 52 µs,
//! eight with three loads and stores 206 µs, 32 mixed 830 µs; over a boot, a region takes
//! about 1 ms. Cranelift's `opt_level = "none"` compiles 1.3-1.5x faster (27, 44, 138 and
//! 630 µs); on a quiet host the code of `"speed"` ran the gzip workload 8% faster (the
//! boot, md5 and the shell loop the same), and it was the choice until the host got busy.
//! With the 2 cores shared by other work (load 4-4.5), the compiler's thread waits for a
//! core, and code that comes sooner matters more than code a little faster: whole runs of
//! `ftvm run --stats`, two each, `"none"` against `"speed"`: the boot 2.66/2.84 s against
//! 3.44/4.47 s, md5 4.09/4.14 against 4.28/4.53, gzip 5.59/5.70 against 5.74/5.52, the
//! shell loop 5.82 against 6.02. `"none"` is the choice now. The single-pass register allocator compiles twice as
//! fast but made the md5 workload a third slower. Hence regions only for code that ran
//! 4096 times (256 and 1024 compiled so much that the compiler fell behind and the boot
//! was slower; 16384 left too much interpreted), and compiling off the hart's thread.
//!
//! Its limits shape the rest: it has no dynamic rounding modes and no floating-point
//! flags (so F/D stay in the interpreter's exact code), and its own JIT module frees code
//! only a module at a time and gives each finalised function fresh pages; so the code
//! goes into one bounded region of our own ([`code`]), flushed whole when full, with
//! every pointer into it.
//!
//! Host time is read only to measure compile time for the statistics; it never reaches
//! the guest.

mod code;
mod emit;
mod worker;

use crate::block::MicroOp;
use crate::bus::Bus;
use crate::exec::Flow;
use crate::hart::Hart;
use crate::mmu::TlbEntry;
use std::collections::{HashMap, HashSet};
use std::ptr::NonNull;

pub(crate) use worker::{BlockKey, Compiled, Request};

/// Whether this build can compile for the host it runs on.
pub const HOST_SUPPORTED: bool = cfg!(all(target_arch = "x86_64", unix));

/// How the compiler tier behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JitConfig {
    /// Interpreted runs of a block before it is compiled (0: compile at first sight).
    pub hot_threshold: u32,
    /// The same for a block run in U-mode, when lower (see [`JitConfig::threshold`]).
    /// A guest workload's loop is user code that runs for long once it starts, while
    /// most of the boot is kernel code run a few thousand times and never again: the
    /// shell loop of `bench/workloads-vs-qemu` interpreted 26 M instructions before
    /// its blocks reached 4096 runs, ~0.18 s at the interpreter's 7 ns each. With 512,
    /// the hart's thread spent 4-10% less CPU from the loop's start on (four runs side
    /// by side with 4096, at load 12-13), the boot 3% less, md5 and fork/exec the same.
    pub user_hot_threshold: u32,
    /// Bytes of host code kept at most; when full, all compiled code is dropped.
    pub code_cache_bytes: usize,
    /// Compile on a thread of its own while the hart goes on interpreting, rather than
    /// stopping the hart for each block. Either way the guest is the same; only when a
    /// block starts to run compiled differs.
    pub background: bool,
}

impl Default for JitConfig {
    fn default() -> Self {
        JitConfig { hot_threshold: 4096, user_hot_threshold: 512, code_cache_bytes: 64 << 20, background: true }
    }
}

impl JitConfig {
    /// The hot threshold for a block run at `privilege`: `user_hot_threshold` in U-mode
    /// (never above `hot_threshold`, so that a configuration asking for early compiling
    /// gets it everywhere), `hot_threshold` elsewhere.
    pub fn threshold(&self, privilege: crate::hart::PrivMode) -> u32 {
        if privilege == crate::hart::PrivMode::User {
            self.user_hot_threshold.min(self.hot_threshold)
        } else {
            self.hot_threshold
        }
    }
}

/// What the compiler tier did since the hart was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JitStats {
    /// Whether compiled code can run at all (a compiler for this host, memory for code).
    pub active: bool,
    /// Instructions retired by compiled code.
    pub compiled_instructions: u64,
    pub blocks_compiled: u64,
    /// Blocks the translator refused (they stay interpreted).
    pub blocks_refused: u64,
    /// CPU time spent compiling, in nanoseconds (of the compiler's thread when it has one).
    pub compile_ns: u64,
    /// Host code generated, in bytes (over all flushes).
    pub code_bytes: u64,
    /// Guest instructions translated, over all compiled regions (an instruction in two
    /// regions counts twice).
    pub instructions_translated: u64,
    /// Times the code cache was emptied because it was full.
    pub flushes: u64,
    /// Entries into compiled code from the dispatcher (each may run many linked blocks).
    pub entries: u64,
}

/// A compiled block (a function of Cranelift's `tail` convention, entered through the
/// trampoline): valid until the code cache is flushed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct BlockFn(NonNull<u8>);

// SAFETY: a code address, only called through the compiler that owns the code, on the
// thread that runs the hart at the time; nothing in it belongs to a thread.
unsafe impl Send for BlockFn {}

type Trampoline = unsafe extern "C" fn(*mut JitCtx, *const u8) -> u64;

/// A link from an exit of one compiled block to the block at its (fixed) target, in
/// the same page: once filled, the exit is a tail call. `repr(C)` and 8-byte aligned:
/// compiled code reads `target` (0: not linked yet), and an exit word carries the
/// link's address in its upper bits.
#[repr(C, align(8))]
pub(crate) struct Link {
    target: usize,
    /// The RAM page and code generation of the block the exit belongs to: the target
    /// must have been decoded from the same.
    page: usize,
    code_gen: u64,
}

/// How a compiled block ended: the low two bits of the exit word it returns. For
/// CONTINUE, the rest is the address of the link the exit would have taken (0: none).
pub(crate) mod exit_code {
    /// pc holds the next block's address; the chain may go on.
    pub(crate) const CONTINUE: u64 = 0;
    /// pc holds the next instruction; the run loop must look at the hart first.
    pub(crate) const RETURN: u64 = 1;
    /// The instruction at pc did not retire; `Hart::step_end` says why.
    pub(crate) const END: u64 = 2;
    pub(crate) const MASK: u64 = 3;
}

/// What compiled code reaches, laid out for it (`repr(C)`, offsets below). Built by the
/// dispatcher once per chain; every pointer stays valid for the chain's length (guest
/// RAM never moves, the hart is borrowed by the dispatcher).
#[repr(C)]
pub(crate) struct JitCtx {
    hart: *mut Hart,
    bus: *mut u8,
    ram: *mut u8,
    direct_store: *const u8,
    code_gen: *const u64,
    tlb: *const TlbEntry,
    /// The instruction count compiled code must not pass: a block runs only if the
    /// whole of it fits below.
    stop_icount: u64,
    /// The low bits of a fetch's TLB tag at the current privilege (fixed for a chain).
    fetch_tag_bits: u64,
    /// The compiler's jump cache.
    jumps: *const JumpEntry,
    rare: unsafe extern "C" fn(*mut JitCtx, *const MicroOp, u64) -> u64,
}

/// Byte offsets of the fields compiled code touches.
pub(crate) mod offsets {
    use super::JitCtx;
    use crate::hart::Hart;
    use std::mem::offset_of;

    pub(crate) const CTX_HART: i32 = offset_of!(JitCtx, hart) as i32;
    pub(crate) const CTX_RAM: i32 = offset_of!(JitCtx, ram) as i32;
    pub(crate) const CTX_DIRECT_STORE: i32 = offset_of!(JitCtx, direct_store) as i32;
    pub(crate) const CTX_CODE_GEN: i32 = offset_of!(JitCtx, code_gen) as i32;
    pub(crate) const CTX_TLB: i32 = offset_of!(JitCtx, tlb) as i32;
    pub(crate) const CTX_STOP_ICOUNT: i32 = offset_of!(JitCtx, stop_icount) as i32;
    pub(crate) const CTX_FETCH_TAG_BITS: i32 = offset_of!(JitCtx, fetch_tag_bits) as i32;
    pub(crate) const CTX_JUMPS: i32 = offset_of!(JitCtx, jumps) as i32;
    pub(crate) const CTX_RARE: i32 = offset_of!(JitCtx, rare) as i32;
    pub(crate) const HART_X: i32 = offset_of!(Hart, state.x) as i32;
    pub(crate) const HART_PC: i32 = offset_of!(Hart, state.pc) as i32;
    pub(crate) const HART_ICOUNT: i32 = offset_of!(Hart, state.icount) as i32;
    pub(crate) const HART_IRQ_DIRTY: i32 = offset_of!(Hart, irq_dirty) as i32;
    pub(crate) const HART_NEXT_PC: i32 = offset_of!(Hart, next_pc) as i32;
    pub(crate) const HART_DATA_TAG_BITS: i32 = offset_of!(Hart, data_tag_bits) as i32;
}

/// A jump cache entry: compiled code for the block that starts at `pc`, decoded from RAM
/// page offset `page_ram_offset` at `code_gen`. Compiled code jumps through it when the
/// target is known only at run time (returns, indirect jumps) or lies in another page,
/// after checking the fetch translation in the TLB and the page's code generation.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct JumpEntry {
    pc: u64,
    page_ram_offset: u64,
    code_gen: u64,
    code: usize,
}

/// Jump cache entries (direct-mapped by pc).
pub(crate) const JUMP_ENTRIES: usize = 1 << 12;
const NO_JUMP: JumpEntry = JumpEntry { pc: 1, page_ram_offset: 0, code_gen: 0, code: 0 };

/// Compile requests in flight at most (each holds a copy of its block's instructions).
const MAX_IN_FLIGHT: usize = 256;
/// Requests in flight past which the hart compiles a block itself.
const COMPILE_HERE_AFTER: usize = 16;

/// The compiler and its code cache.
pub(crate) struct Jit {
    config: JitConfig,
    compiler: worker::Compiler,
    region: code::CodeRegion,
    /// The trampoline's code, put back at the start of the region after each flush.
    trampoline_code: Vec<u8>,
    trampoline: Trampoline,
    /// What the code in the region points into: each installed block's link slots and
    /// kept instructions (boxed, so they never move), dropped with the code on flush.
    kept: Vec<Compiled>,
    /// Every block in the cache, by identity (pc, RAM page offset, code generation).
    by_key: HashMap<(u64, usize, u64), BlockFn>,
    /// Blocks sent to the compiler's thread and not back yet.
    pending: HashSet<(u64, usize, u64)>,
    /// Moves on every flush: a link address from before one is stale.
    epoch: u64,
    jumps: Box<[JumpEntry]>,
    in_flight: usize,
    stats: JitStats,
}

impl Jit {
    /// A compiler for the host, or `None` where there is none (the hart interprets).
    pub(crate) fn new(config: JitConfig) -> Option<Jit> {
        if !HOST_SUPPORTED {
            return None;
        }
        let mut compiler = worker::Compiler::new(config.background)?;
        let trampoline_code = compiler.trampoline()?;
        let mut region = code::CodeRegion::new(config.code_cache_bytes)?;
        let trampoline = Self::place_trampoline(&mut region, &trampoline_code)?;
        Some(Jit {
            config,
            compiler,
            region,
            trampoline_code,
            trampoline,
            kept: Vec::new(),
            by_key: HashMap::new(),
            pending: HashSet::new(),
            epoch: 0,
            jumps: vec![NO_JUMP; JUMP_ENTRIES].into_boxed_slice(),
            in_flight: 0,
            stats: JitStats { active: true, ..JitStats::default() },
        })
    }

    fn place_trampoline(region: &mut code::CodeRegion, code: &[u8]) -> Option<Trampoline> {
        let ptr = region.add(code)?;
        // SAFETY: the bytes are the trampoline compiled for the host, with this signature
        // in the host's C calling convention (see `Emitter::trampoline`); it stays until
        // the next flush, which puts it back.
        Some(unsafe { std::mem::transmute::<*const u8, Trampoline>(ptr) })
    }

    #[inline]
    pub(crate) fn hot_threshold(&self, privilege: crate::hart::PrivMode) -> u32 {
        self.config.threshold(privilege)
    }

    pub(crate) fn stats(&self) -> JitStats {
        self.stats
    }

    #[inline]
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    #[inline]
    pub(crate) fn count_compiled(&mut self, instructions: u64) {
        self.stats.compiled_instructions += instructions;
        self.stats.entries += 1;
    }

    /// Whether another request may be sent.
    pub(crate) fn can_request(&self) -> bool {
        self.in_flight < MAX_IN_FLIGHT
    }

    /// Ask for a block to be compiled: at once (the result is returned) or on the
    /// compiler's thread (the result comes from [`Jit::finished`] later).
    pub(crate) fn request(&mut self, request: Request) -> Option<Compiled> {
        let key = request.key.identity();
        // With this many waiting, the compiler's thread has fallen behind (on a busy host
        // it waits for a core): the hart compiles the block itself rather than go on
        // interpreting it, and everything hot after it, for longer.
        let here = self.in_flight >= COMPILE_HERE_AFTER;
        let done = self.compiler.submit(request, here);
        if done.is_none() {
            self.in_flight += 1;
            self.pending.insert(key);
        }
        done
    }

    /// Whether the block is with the compiler's thread already.
    pub(crate) fn is_pending(&self, key: &BlockKey) -> bool {
        self.pending.contains(&key.identity())
    }

    /// The compiled code of the block with this identity, if the cache has it.
    #[inline]
    pub(crate) fn lookup(&self, pc: u64, page_ram_offset: usize, code_gen: u64) -> Option<BlockFn> {
        if self.by_key.is_empty() {
            return None;
        }
        self.by_key.get(&(pc, page_ram_offset, code_gen)).copied()
    }

    /// Results the compiler's thread has finished.
    #[inline]
    pub(crate) fn finished(&mut self) -> Vec<Compiled> {
        if self.in_flight == 0 {
            return Vec::new();
        }
        let done = self.compiler.finished();
        self.in_flight -= done.len();
        for d in &done {
            self.pending.remove(&d.key.identity());
        }
        done
    }

    /// See [`code::CodeRegion::begin_batch`]: installs until `end_batch` cost one
    /// protection change in all.
    pub(crate) fn begin_batch(&mut self) {
        self.region.begin_batch();
    }

    pub(crate) fn end_batch(&mut self) {
        self.region.end_batch();
    }

    /// Drop all compiled code (the caller forgets every `BlockFn` it holds).
    pub(crate) fn flush(&mut self) {
        self.region.flush();
        self.kept.clear();
        self.by_key.clear();
        self.jumps.fill(NO_JUMP);
        self.epoch += 1;
        // The trampoline is a few bytes in a region just emptied: it always fits.
        self.trampoline = Self::place_trampoline(&mut self.region, &self.trampoline_code)
            .expect("the trampoline fits into an empty code cache");
    }

    /// A result whose block is gone (rebuilt, or other RAM): only its time counts.
    pub(crate) fn discard(&mut self, compiled: Compiled) {
        self.stats.compile_ns += compiled.compile_ns;
    }

    /// Put a compiled block's code into the cache; `None` when the translator refused
    /// it. A full cache is flushed first (`flushed` is then set: the caller drops every
    /// `BlockFn` it holds).
    pub(crate) fn install(&mut self, compiled: Compiled, flushed: &mut bool) -> Option<BlockFn> {
        self.stats.compile_ns += compiled.compile_ns;
        let Some(code) = compiled.code.as_deref() else {
            self.stats.blocks_refused += 1;
            return None;
        };
        let ptr = match self.region.add(code) {
            Some(ptr) => ptr,
            None => {
                self.stats.flushes += 1;
                self.flush();
                *flushed = true;
                self.region.add(code)?
            }
        };
        self.stats.blocks_compiled += 1;
        self.stats.code_bytes += code.len() as u64;
        self.stats.instructions_translated += compiled.instructions;
        let key = compiled.key.identity();
        self.kept.push(compiled);
        let code = BlockFn(NonNull::new(ptr.cast_mut()).expect("code has an address"));
        self.by_key.insert(key, code);
        Some(code)
    }

    /// Fill the link whose address an exit word carries (taken at `epoch`) with `code`,
    /// the compiled block at the exit's target, decoded from RAM page `page` at
    /// generation `code_gen`, if that is where the exit's own block came from.
    #[inline]
    pub(crate) fn link(&mut self, word: u64, epoch: u64, code: BlockFn, page: usize, code_gen: u64) {
        let link = (word & !exit_code::MASK) as *mut Link;
        if link.is_null() || epoch != self.epoch {
            return;
        }
        // SAFETY: a non-zero link address in an exit word of the current epoch points at
        // a link slot kept (boxed, in `kept`) until the next flush, which moves the epoch.
        let link = unsafe { &mut *link };
        if link.page == page && link.code_gen == code_gen {
            link.target = code.0.as_ptr() as usize;
        }
    }

    /// The compiled code the jump cache holds for the block at `pc`, decoded from RAM page
    /// offset `page_ram_offset` at `code_gen`.
    #[inline]
    pub(crate) fn jump_target(&self, pc: u64, page_ram_offset: usize, code_gen: u64) -> Option<BlockFn> {
        let entry = &self.jumps[(pc >> 1) as usize % JUMP_ENTRIES];
        if entry.pc != pc || entry.page_ram_offset != page_ram_offset as u64 || entry.code_gen != code_gen {
            return None;
        }
        NonNull::new(entry.code as *mut u8).map(BlockFn)
    }

    /// Remember compiled `code` for the block at `pc` (decoded from RAM page offset
    /// `page_ram_offset` at `code_gen`) for compiled code's indirect jumps.
    #[inline]
    pub(crate) fn remember_jump(&mut self, pc: u64, page_ram_offset: usize, code_gen: u64, code: BlockFn) {
        let entry = &mut self.jumps[(pc >> 1) as usize % JUMP_ENTRIES];
        *entry = JumpEntry { pc, page_ram_offset: page_ram_offset as u64, code_gen, code: code.0.as_ptr() as usize };
    }

    /// Run compiled block `code` (and the blocks it links to); returns the exit word.
    ///
    /// # Safety
    /// `ctx` was built by [`JitCtx::new`] for this very hart and bus (and re-pointed at
    /// them with [`JitCtx::rebind`] since they were last used otherwise), and `code` came
    /// from this compiler, whose cache has not been flushed since.
    #[inline]
    pub(crate) unsafe fn run(&self, code: BlockFn, ctx: &mut JitCtx) -> u64 {
        // SAFETY: as promised by the caller; the trampoline is current (put back on flush).
        unsafe { (self.trampoline)(ctx, code.0.as_ptr()) }
    }
}

impl JitCtx {
    /// The context for running compiled code on `hart` and `bus`, up to `stop_icount`.
    pub(crate) fn new<B: Bus>(hart: &mut Hart, bus: &mut B, jit: &Jit, stop_icount: u64) -> JitCtx {
        let tlb = hart.tlb.entries_ptr();
        let fetch_tag_bits = crate::mmu::Tlb::fetch_tag_bits(hart.state.privilege);
        let ram = bus.ram().jit_view();
        JitCtx {
            fetch_tag_bits,
            jumps: jit.jumps.as_ptr(),
            hart,
            bus: (bus as *mut B).cast(),
            ram: ram.bytes,
            direct_store: ram.direct_store,
            code_gen: ram.code_gen,
            tlb,
            stop_icount,
            rare: rare::<B>,
        }
    }

    /// Point the context at the hart and bus again (the same ones it was made for).
    #[inline]
    pub(crate) fn rebind<B: Bus>(&mut self, hart: &mut Hart, bus: &mut B) {
        self.hart = hart;
        self.bus = (bus as *mut B).cast();
    }
}

/// The hart and bus behind a context.
///
/// # Safety
/// Called only from compiled code, with the context it was given (see [`run`]); the
/// dispatcher does not touch the hart or bus while compiled code runs.
unsafe fn parts<'a, B: Bus>(ctx: *mut JitCtx) -> (&'a mut JitCtx, &'a mut Hart, &'a mut B) {
    // SAFETY: per the function's contract, the pointers are live and unaliased for the
    // helper's duration.
    unsafe {
        let ctx = &mut *ctx;
        let hart = &mut *ctx.hart;
        let bus = &mut *ctx.bus.cast::<B>();
        (ctx, hart, bus)
    }
}

/// One instruction through the interpreter (CSR, privileged, A, F/D, illegal). Returns
/// 0 when execution goes on with the next instruction after the usual checks (Check),
/// 1 when it must leave with pc = `Hart::next_pc` (Leave), 2 when it did not retire
/// (End; pc and `Hart::step_end` are set).
unsafe extern "C" fn rare<B: Bus>(ctx: *mut JitCtx, op: *const MicroOp, pc: u64) -> u64 {
    // SAFETY: called by compiled code with its context; `op` points into the compiler's
    // kept instructions, which live as long as the code that refers to them.
    let (_, hart, bus) = unsafe { parts::<B>(ctx) };
    // SAFETY: see above.
    let op = unsafe { &*op };
    let flow = hart.exec_op(bus, op, pc);
    hart.state.x[0] = 0;
    match flow {
        Flow::Next | Flow::Check => 0,
        Flow::Jump | Flow::Leave => 1,
        Flow::End => {
            hart.state.pc = pc;
            2
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use worker::thread_cpu_ns;

    /// Compile time per block shape (prints figures; run with --ignored --nocapture).
    #[test]
    #[ignore]
    fn compile_time_per_block() {
        let asm = |words: &[u32]| -> Vec<MicroOp> { words.iter().map(|&w| MicroOp::new(w)).collect() };
        let addi = |rd: u32, rs: u32, imm: u32| (imm << 20) | (rs << 15) | (rd << 7) | 0x13;
        let ld = |rd: u32, rs: u32, imm: u32| (imm << 20) | (rs << 15) | (3 << 12) | (rd << 7) | 0x03;
        let sd = |rs2: u32, rs1: u32| (rs2 << 20) | (rs1 << 15) | (3 << 12) | 0x23;
        let bne = |rs1: u32, rs2: u32| (rs2 << 20) | (rs1 << 15) | (1 << 12) | (8 << 8) | 0x63;
        let shapes: Vec<(&str, Vec<MicroOp>)> = vec![
            ("1 alu", asm(&[addi(5, 5, 1)])),
            ("8 alu", asm(&(0..8).map(|i| addi(5 + i, 6 + i, 3)).collect::<Vec<_>>())),
            (
                "4 alu 2 ld 1 sd 1 bne",
                asm(&[
                    addi(5, 5, 1),
                    ld(6, 10, 8),
                    addi(7, 6, 2),
                    ld(8, 11, 0),
                    addi(9, 8, 1),
                    sd(9, 10),
                    addi(12, 12, 1),
                    bne(12, 13),
                ]),
            ),
            (
                "32 mixed",
                asm(&(0..32)
                    .map(|i| match i % 4 {
                        0 => ld(5 + i % 7, 10, 8),
                        1 => sd(6, 11),
                        2 => bne(5, 6),
                        _ => addi(7, 7, 1),
                    })
                    .collect::<Vec<_>>()),
            ),
        ];
        for (opt, ra) in [("speed", "backtracking"), ("none", "backtracking"), ("none", "single_pass")] {
            let mut translator = worker::Translator::with_settings(opt, ra).expect("a compiler for this host");
            for (name, ops) in &shapes {
                let n = 200;
                let started = thread_cpu_ns();
                let mut bytes = 0;
                for _ in 0..n {
                    let key = BlockKey { slot: 0, pc: 0x8000_0000, page_ram_offset: 0, code_gen: 0, ram_id: 0 };
                    let done = translator.compile(Request { key, blocks: vec![(key.pc, ops.clone())] });
                    bytes += done.code.expect("compiles").len();
                }
                let us = (thread_cpu_ns() - started) as f64 / 1e3 / n as f64;
                println!("{opt:5} {ra:12} {name:24} {us:7.1} us  {} bytes", bytes / n);
            }
        }
    }
}
