//! The compiler tier: hot decoded blocks become host code, with the interpreter kept as
//! the reference and the fallback.
//!
//! **Tiering.** Every block starts interpreted; the block cache counts its runs, and the
//! run after the [`JitConfig::hot_threshold`]th compiles it. Boot code that runs a few
//! times never pays for compiling.
//!
//! **The same guest, exactly.** A compiled block is the interpreter's block (the same
//! decoded instructions, the same validity rule: start address, RAM page, page code
//! generation) turned into one host function. It retires what the interpreter would:
//! - it is entered only when the remaining budget covers all of it, so it never runs past
//!   the budget or a timer deadline, and the run loop checks interrupts exactly where it
//!   would between interpreted blocks;
//! - an instruction that may trap or touch a device, or that the translator does not
//!   inline (CSRs, privileged instructions, A, F/D), runs through the interpreter's own
//!   code in a helper call, with the guest registers written back first;
//! - after a store into a page that holds decoded code, a device access, or a helper that
//!   may have changed either, it leaves the block exactly where the interpreter would, so
//!   self-modifying code and DMA are seen at the next instruction.
//!
//! Leaving a block early is always allowed (the run loop then does what it would have
//! done between two interpreted instructions, which is nothing); continuing where the
//! interpreter would have stopped never is. The differential tests
//! (`tests/differential.rs`) hold the two engines to the same registers, memory and
//! instruction counts over random programs in every privilege mode.
//!
//! **Fast paths.** Within a block the guest's integer registers live in host registers
//! (Cranelift variables); loads and stores that hit the TLB are inlined (tag compare,
//! addend, access, dirty bit); taken branches and jumps return the next pc to the
//! dispatcher in [`crate::block`], which goes straight on to the next block.
//!
//! **Why Cranelift.** It is a well-kept code generator written in Rust (the one under
//! Wasmtime), it builds with cargo and nothing else, and it compiles fast: a typical
//! block takes tens of microseconds (measured by the compile-time share in `JitStats`
//! over a boot; see README), where LLVM takes milliseconds. Its limits shape the design:
//! it has no dynamic rounding modes and no floating-point flags (so F/D stay in the
//! interpreter's exact code through helper calls), and its own JIT module frees code only
//! a module at a time; so the compiled code goes into one bounded region ([`code`]) that
//! is flushed whole when full, along with every pointer into it.
//!
//! Host time is read only to measure compile time for the statistics; it never reaches
//! the guest.

mod code;
mod emit;

use crate::block::MicroOp;
use crate::bus::Bus;
use crate::exec::Flow;
use crate::hart::Hart;
use crate::mmu::TlbEntry;
use cranelift_codegen::isa::OwnedTargetIsa;
use cranelift_codegen::settings::{self, Configurable};
use std::time::Instant;

/// Whether this build can compile for the host it runs on.
pub const HOST_SUPPORTED: bool = cfg!(all(target_arch = "x86_64", unix));

/// How the compiler tier behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JitConfig {
    /// Interpreted runs of a block before it is compiled (0: compile at first sight).
    pub hot_threshold: u32,
    /// Bytes of host code kept at most; when full, all compiled code is dropped.
    pub code_cache_bytes: usize,
}

impl Default for JitConfig {
    fn default() -> Self {
        JitConfig { hot_threshold: 64, code_cache_bytes: 64 << 20 }
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
    /// Host time spent compiling, in nanoseconds.
    pub compile_ns: u64,
    /// Host code generated, in bytes (over all flushes).
    pub code_bytes: u64,
    /// Times the code cache was emptied because it was full.
    pub flushes: u64,
}

/// A compiled block: takes the context, returns an [`ExitCode`].
pub(crate) type BlockFn = unsafe extern "C" fn(*mut JitCtx) -> u32;

/// How a compiled block ended.
pub(crate) mod exit_code {
    /// pc holds the next block's address; the chain may go on.
    pub(crate) const CONTINUE: u32 = 0;
    /// pc holds the next instruction; the run loop must look at the hart first.
    pub(crate) const RETURN: u32 = 1;
    /// The instruction at pc did not retire; `Hart::step_end` says why.
    pub(crate) const END: u32 = 2;
    /// The instruction at pc did not run: the interpreter must run it first (a TLB miss,
    /// a device, a store into a page holding decoded code).
    pub(crate) const BAIL: u32 = 3;
}

/// What compiled code reaches, laid out for it (`repr(C)`, offsets below). Built by the
/// dispatcher once per chain; every pointer stays valid for the chain's length (guest
/// RAM never moves, the hart is borrowed by the dispatcher).
#[repr(C)]
pub(crate) struct JitCtx {
    hart: *mut Hart,
    bus: *mut u8,
    ram: *mut u8,
    dirty: *mut u64,
    code_watch: *mut u64,
    code_gen: *const u64,
    tlb: *const TlbEntry,
    rare: unsafe extern "C" fn(*mut JitCtx, *const MicroOp, u64) -> u64,
}

/// Byte offsets of the fields compiled code touches.
pub(crate) mod offsets {
    use super::JitCtx;
    use crate::hart::Hart;
    use std::mem::offset_of;

    pub(crate) const CTX_HART: i32 = offset_of!(JitCtx, hart) as i32;
    pub(crate) const CTX_RAM: i32 = offset_of!(JitCtx, ram) as i32;
    pub(crate) const CTX_DIRTY: i32 = offset_of!(JitCtx, dirty) as i32;
    pub(crate) const CTX_CODE_WATCH: i32 = offset_of!(JitCtx, code_watch) as i32;
    pub(crate) const CTX_CODE_GEN: i32 = offset_of!(JitCtx, code_gen) as i32;
    pub(crate) const CTX_TLB: i32 = offset_of!(JitCtx, tlb) as i32;
    pub(crate) const CTX_RARE: i32 = offset_of!(JitCtx, rare) as i32;
    pub(crate) const HART_X: i32 = offset_of!(Hart, state.x) as i32;
    pub(crate) const HART_PC: i32 = offset_of!(Hart, state.pc) as i32;
    pub(crate) const HART_ICOUNT: i32 = offset_of!(Hart, state.icount) as i32;
    pub(crate) const HART_IRQ_DIRTY: i32 = offset_of!(Hart, irq_dirty) as i32;
    pub(crate) const HART_NEXT_PC: i32 = offset_of!(Hart, next_pc) as i32;
    pub(crate) const HART_DATA_TAG_BITS: i32 = offset_of!(Hart, data_tag_bits) as i32;
}

/// Most decoded instructions kept for helper calls from compiled code; when full, the
/// code cache is flushed with them.
const RARE_OPS: usize = 1 << 16;

/// The compiler and its code cache.
pub(crate) struct Jit {
    config: JitConfig,
    isa: OwnedTargetIsa,
    emitter: emit::Emitter,
    region: code::CodeRegion,
    /// The decoded instructions that compiled code passes to helpers (by address: the
    /// vector never grows past its capacity, so they never move).
    rare_ops: Vec<MicroOp>,
    stats: JitStats,
}

impl Jit {
    /// A compiler for the host, or `None` where there is none (the hart interprets).
    pub(crate) fn new(config: JitConfig) -> Option<Jit> {
        Jit::with_settings(config, "none", "backtracking")
    }

    /// A compiler with Cranelift's `opt_level` and `regalloc_algorithm` set so.
    fn with_settings(config: JitConfig, opt_level: &str, regalloc: &str) -> Option<Jit> {
        if !HOST_SUPPORTED {
            return None;
        }
        let mut flags = settings::builder();
        flags.set("opt_level", opt_level).ok()?;
        flags.set("regalloc_algorithm", regalloc).ok()?;
        flags.set("enable_verifier", "false").ok()?;
        let isa_builder = cranelift_native::builder().ok()?;
        let isa = isa_builder.finish(settings::Flags::new(flags)).ok()?;
        let region = code::CodeRegion::new(config.code_cache_bytes)?;
        let emitter = emit::Emitter::new(isa.default_call_conv());
        Some(Jit {
            config,
            isa,
            emitter,
            region,
            rare_ops: Vec::with_capacity(RARE_OPS),
            stats: JitStats { active: true, ..JitStats::default() },
        })
    }

    pub(crate) fn hot_threshold(&self) -> u32 {
        self.config.hot_threshold
    }

    pub(crate) fn stats(&self) -> JitStats {
        self.stats
    }

    pub(crate) fn count_compiled(&mut self, instructions: u64) {
        self.stats.compiled_instructions += instructions;
    }

    /// Drop all compiled code (the caller forgets every `BlockFn` it holds).
    pub(crate) fn flush(&mut self) {
        self.region.flush();
        self.rare_ops.clear();
    }

    /// Compile the block of `ops` at `pc`, decoded from RAM page `page` at code
    /// generation `code_gen`. `Err(Full)` when the code cache must be flushed first.
    pub(crate) fn compile(&mut self, ops: &[MicroOp], pc: u64, page: usize, code_gen: u64) -> Result<BlockFn, Refused> {
        let started = Instant::now();
        let rare = ops.iter().filter(|op| emit::is_rare(op)).count();
        if self.rare_ops.len() + rare > RARE_OPS {
            return Err(Refused::Full);
        }
        let first_rare = self.rare_ops.len();
        self.rare_ops.extend(ops.iter().filter(|op| emit::is_rare(op)).copied());
        let rare_ptrs: Vec<*const MicroOp> =
            self.rare_ops[first_rare..].iter().map(|op| op as *const MicroOp).collect();
        let block = emit::BlockSpec { ops, pc, page, code_gen, rare_ops: &rare_ptrs };
        let result = self.emitter.compile(&*self.isa, &block);
        let result = match result {
            Some(code) => match self.region.add(code) {
                Some(ptr) => {
                    self.stats.blocks_compiled += 1;
                    self.stats.code_bytes += code.len() as u64;
                    // SAFETY: `ptr` holds a function just compiled for the host with the
                    // signature of `BlockFn` (see `Emitter::compile`), executable until the
                    // region is flushed, which drops every copy of this pointer.
                    Ok(unsafe { std::mem::transmute::<*const u8, BlockFn>(ptr) })
                }
                None => {
                    self.rare_ops.truncate(first_rare);
                    Err(Refused::Full)
                }
            },
            None => {
                self.rare_ops.truncate(first_rare);
                self.stats.blocks_refused += 1;
                Err(Refused::Untranslatable)
            }
        };
        if matches!(result, Err(Refused::Full)) {
            self.stats.flushes += 1;
        }
        self.stats.compile_ns += started.elapsed().as_nanos() as u64;
        result
    }

    /// Bytes of host code in the cache now.
    #[allow(dead_code)]
    pub(crate) fn code_in_use(&self) -> usize {
        self.region.used()
    }
}

/// Why a block was not compiled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The code cache is full: flush it and try again.
    Full,
    /// The translator cannot compile this block (it stays interpreted).
    Untranslatable,
}

impl JitCtx {
    /// The context for running compiled code on `hart` and `bus`.
    pub(crate) fn new<B: Bus>(hart: &mut Hart, bus: &mut B) -> JitCtx {
        let tlb = hart.tlb.entries_ptr();
        let ram = bus.ram().jit_view();
        JitCtx {
            hart,
            bus: (bus as *mut B).cast(),
            ram: ram.bytes,
            dirty: ram.dirty,
            code_watch: ram.code_watch,
            code_gen: ram.code_gen,
            tlb,
            rare: rare::<B>,
        }
    }
}

impl JitCtx {
    /// Point the context at the hart and bus again (the same ones it was made for).
    #[inline]
    pub(crate) fn rebind<B: Bus>(&mut self, hart: &mut Hart, bus: &mut B) {
        self.hart = hart;
        self.bus = (bus as *mut B).cast();
    }
}

/// Run compiled block `code`.
///
/// # Safety
/// `ctx` was built by [`JitCtx::new`] for this very hart and bus, neither of which has
/// moved or been used otherwise since, and `code` came from the compiler whose cache has
/// not been flushed since.
pub(crate) unsafe fn run(code: BlockFn, ctx: &mut JitCtx) -> u32 {
    // SAFETY: as promised by the caller.
    unsafe { code(ctx) }
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
            let mut jit = Jit::with_settings(JitConfig::default(), opt, ra).expect("a compiler for this host");
            for (name, ops) in &shapes {
                let n = 200;
                let started = Instant::now();
                let mut bytes = 0;
                for _ in 0..n {
                    jit.compile(ops, 0x8000_0000, 0, 0).expect("compiles");
                    bytes = jit.stats.code_bytes;
                }
                let us = started.elapsed().as_secs_f64() * 1e6 / n as f64;
                println!("{opt:5} {ra:12} {name:24} {us:7.1} us  {} bytes", bytes / n);
            }
        }
    }
}
