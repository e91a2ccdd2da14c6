//! Translation of one decoded block into a Cranelift function `fn(ctx) -> exit word`
//! (Cranelift's `tail` convention, so that a block can jump straight into the next one),
//! and of the trampoline through which Rust enters compiled code.
//!
//! The block is straight-line code with side exits (taken branches, misses, checks).
//! Guest registers are Cranelift variables: those a block reads are loaded where it starts;
//! a register written is stored back to the hart on the way to the next point where the
//! block may leave, so every exit is the same few instructions (pc, instruction count,
//! exit word), shared by all. The instruction count is `icount at entry + instructions
//! retired`, a constant at every exit.
//!
//! A block first checks that the budget left (`JitCtx::stop_icount`) covers all of it,
//! since it may be entered from another block rather than from the dispatcher. An exit to
//! a fixed address in the same page goes through a link slot: once the dispatcher has
//! filled it with the next block's code, the exit is a tail call.

use super::exit_code::{CONTINUE, END, RETURN};
use super::offsets::*;
use super::{Link, JUMP_ENTRIES};
use crate::block::MicroOp;
use crate::decode::Kind;
use crate::mem::PAGE_SIZE;
use crate::mmu::{Access, TLB_ENTRIES};
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{
    types, AbiParam, Block, Function, InstBuilder, MemFlags, SigRef, Signature, UserFuncName, Value,
};
use cranelift_codegen::isa::{CallConv, TargetIsa};
use cranelift_codegen::{control::ControlPlane, Context};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};

const I64: types::Type = types::I64;
const I32: types::Type = types::I32;

/// Whether an instruction always runs through the interpreter in a helper call.
fn is_rare(op: &MicroOp) -> bool {
    matches!(op.kind, Kind::Amo | Kind::Csr | Kind::Sys | Kind::Fp | Kind::Illegal)
}

/// Whether an instruction may run through the interpreter (always, or when it misses
/// the TLB): the compiler keeps a copy of it for the helper.
pub(super) fn is_kept(op: &MicroOp) -> bool {
    is_rare(op) || is_load(op.kind) || is_store(op.kind)
}

/// What to compile: a region of blocks of one page, entered at the first. A jump from
/// one to another inside the region stays inside the function (with the budget check
/// every block makes), so a loop within a page runs without returning to the
/// dispatcher.
pub(super) struct BlockSpec<'a> {
    /// Each block's start and decoded instructions; the entry first.
    pub(super) blocks: &'a [(u64, &'a [MicroOp])],
    pub(super) pc: u64,
    /// RAM page index the instructions were decoded from, and its code generation then.
    pub(super) page: usize,
    pub(super) code_gen: u64,
    /// For each kept instruction of `ops` (see [`is_kept`]), in order, where the
    /// compiler keeps it.
    pub(super) kept_ops: &'a [*const MicroOp],
}

/// Where the translator gets link slots: a new slot's address, or `None` when there are
/// no more (the exit then always returns to the dispatcher).
pub(super) type LinkAlloc<'a> = &'a mut dyn FnMut() -> Option<*const Link>;

/// The reusable parts of compiling (Cranelift's contexts keep their allocations).
pub(super) struct Emitter {
    host_call_conv: CallConv,
    ctx: Context,
    builder_ctx: FunctionBuilderContext,
}

fn block_signature() -> Signature {
    let mut sig = Signature::new(CallConv::Tail);
    sig.params.push(AbiParam::new(I64));
    sig.returns.push(AbiParam::new(I64));
    sig
}

impl Emitter {
    pub(super) fn new(host_call_conv: CallConv) -> Emitter {
        Emitter { host_call_conv, ctx: Context::new(), builder_ctx: FunctionBuilderContext::new() }
    }

    /// Host code for `block`, or `None` if Cranelift refused it or it would need
    /// relocation (compiled code refers to nothing outside itself but through the
    /// context and constant addresses).
    pub(super) fn compile(&mut self, isa: &dyn TargetIsa, block: &BlockSpec, links: LinkAlloc) -> Option<&[u8]> {
        self.ctx.clear();
        self.ctx.func = Function::with_name_signature(UserFuncName::default(), block_signature());
        let builder = FunctionBuilder::new(&mut self.ctx.func, &mut self.builder_ctx);
        Translator::new(builder, self.host_call_conv, block, links).translate();
        self.finish(isa)
    }

    /// The trampoline `extern "C" fn(ctx, block) -> exit word`: calls a block function
    /// (which has the `tail` convention Rust cannot call) and returns what it returns.
    pub(super) fn trampoline(&mut self, isa: &dyn TargetIsa) -> Option<&[u8]> {
        self.ctx.clear();
        let mut sig = Signature::new(self.host_call_conv);
        sig.params.extend([AbiParam::new(I64), AbiParam::new(I64)]);
        sig.returns.push(AbiParam::new(I64));
        self.ctx.func = Function::with_name_signature(UserFuncName::default(), sig);
        let mut b = FunctionBuilder::new(&mut self.ctx.func, &mut self.builder_ctx);
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let (ctx, callee) = (b.block_params(entry)[0], b.block_params(entry)[1]);
        let sig = b.import_signature(block_signature());
        let call = b.ins().call_indirect(sig, callee, &[ctx]);
        let word = b.inst_results(call)[0];
        b.ins().return_(&[word]);
        b.seal_all_blocks();
        b.finalize();
        self.finish(isa)
    }

    fn finish(&mut self, isa: &dyn TargetIsa) -> Option<&[u8]> {
        let compiled = self.ctx.compile(isa, &mut ControlPlane::default()).ok()?;
        if !compiled.buffer.relocs().is_empty() {
            return None;
        }
        Some(compiled.code_buffer())
    }
}

struct Translator<'a, 'b, 'c> {
    b: FunctionBuilder<'a>,
    host_call_conv: CallConv,
    block: &'b BlockSpec<'b>,
    links: LinkAlloc<'c>,
    regs: [Variable; 32],
    /// Registers written since they were last stored to the hart (bit per register).
    dirty: u32,
    /// Registers whose value in the current block is in their variable (read from the
    /// hart or written since the block started).
    avail: u32,
    ctx: Value,
    hart: Value,
    /// The instruction count at the start of the current block (a value), and as a
    /// variable carried from block to block.
    icount0: Value,
    icount: Variable,
    stop: Value,
    /// The function block of each region block, by start address.
    region: Vec<(u64, Block)>,
    /// Loaded at entry when the block touches memory.
    mem: Option<MemBase>,
    /// The exit every way out goes through: (pc, retired, exit word).
    exit: Block,
    /// The tail call into a linked block: (function).
    chain: Block,
    chain_sig: SigRef,
    /// Index of the next kept instruction in `block.kept_ops`.
    next_kept: usize,
    /// Where loads and stores go to run through the interpreter: (instruction, pc, next
    /// pc, index in the block).
    slow: Block,
    has_slow_path: bool,
}

#[derive(Clone, Copy)]
struct MemBase {
    ram: Value,
    tlb: Value,
    tag_bits: Value,
    direct_store: Value,
}

fn trusted() -> MemFlags {
    MemFlags::trusted()
}

/// Guest memory: always in bounds (the TLB only holds RAM pages), maybe misaligned.
fn guest() -> MemFlags {
    MemFlags::new().with_notrap()
}

fn is_load(kind: Kind) -> bool {
    matches!(kind, Kind::Lb | Kind::Lh | Kind::Lw | Kind::Ld | Kind::Lbu | Kind::Lhu | Kind::Lwu)
}

fn is_store(kind: Kind) -> bool {
    matches!(kind, Kind::Sb | Kind::Sh | Kind::Sw | Kind::Sd)
}

/// A kept instruction where it stands: the helper's copy, its index in its block, its
/// address and the next instruction's.
#[derive(Clone, Copy)]
struct At {
    op: *const MicroOp,
    i: u64,
    pc: u64,
    next: u64,
}

/// Where an exit sends pc.
#[derive(Clone, Copy)]
enum Target {
    Const(u64),
    Value(Value),
}

impl<'a, 'b, 'c> Translator<'a, 'b, 'c> {
    fn new(
        mut b: FunctionBuilder<'a>,
        host_call_conv: CallConv,
        block: &'b BlockSpec<'b>,
        links: LinkAlloc<'c>,
    ) -> Self {
        let regs = std::array::from_fn(|_| b.declare_var(I64));
        let icount = b.declare_var(I64);
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let ctx = b.block_params(entry)[0];
        let hart = b.ins().load(I64, trusted(), ctx, CTX_HART);
        let icount0 = b.ins().load(I64, trusted(), hart, HART_ICOUNT);
        b.def_var(icount, icount0);
        let stop = b.ins().load(I64, trusted(), ctx, CTX_STOP_ICOUNT);
        let region = block.blocks.iter().map(|&(pc, _)| (pc, b.create_block())).collect();

        let exit = b.create_block();
        b.set_cold_block(exit);
        for _ in 0..3 {
            b.append_block_param(exit, I64);
        }
        let chain = b.create_block();
        b.append_block_param(chain, I64);
        let chain_sig = b.import_signature(block_signature());
        let slow = b.create_block();
        b.set_cold_block(slow);
        for _ in 0..4 {
            b.append_block_param(slow, I64);
        }
        let mut t = Translator {
            b,
            host_call_conv,
            block,
            links,
            regs,
            dirty: 0,
            avail: 0,
            ctx,
            hart,
            icount0,
            icount,
            stop,
            region,
            mem: None,
            exit,
            chain,
            chain_sig,
            next_kept: 0,
            slow,
            has_slow_path: false,
        };

        let all_ops = || block.blocks.iter().flat_map(|(_, ops)| ops.iter());
        if all_ops().any(|op| is_load(op.kind) || is_store(op.kind)) {
            let ram = t.b.ins().load(I64, trusted(), ctx, CTX_RAM);
            let tlb = t.b.ins().load(I64, trusted(), ctx, CTX_TLB);
            let tag_bits = t.b.ins().load(I64, trusted(), hart, HART_DATA_TAG_BITS);
            let direct_store = t.b.ins().load(I64, trusted(), ctx, CTX_DIRECT_STORE);
            t.mem = Some(MemBase { ram, tlb, tag_bits, direct_store });
        }
        t
    }

    fn translate(mut self) {
        let first = self.region[0].1;
        self.b.ins().jump(first, &[]);
        for (n, &(start, ops)) in self.block.blocks.iter().enumerate() {
            let head = self.region[n].1;
            self.b.switch_to_block(head);
            self.icount0 = self.b.use_var(self.icount);
            // Run only if the budget left covers the whole block (else the dispatcher
            // interprets it, up to the budget).
            let left = self.b.ins().isub(self.stop, self.icount0);
            let short = self.b.ins().icmp_imm(IntCC::UnsignedLessThan, left, ops.len() as i64);
            self.exit_if(short, Target::Const(start), 0, CONTINUE);
            // Registers are loaded from the hart where the block first reads them (see
            // `reg`).
            debug_assert_eq!(self.dirty, 0, "the hart's registers are current where a block starts");
            self.avail = 0;
            let mut pc = start;
            let mut ended = false;
            for (i, op) in ops.iter().enumerate() {
                let next = pc.wrapping_add(op.insn.len as u64);
                if self.op(op, i as u64, pc, next) {
                    ended = true;
                    break;
                }
                pc = next;
            }
            if !ended {
                self.leave_to(pc, ops.len() as u64);
            }
        }
        self.emit_slow_path();
        self.emit_shared_exits();
        self.b.seal_all_blocks();
        self.b.finalize();
    }

    /// The slow path of loads and stores (a TLB miss, a device, a page crossing, a page
    /// not yet dirty or holding decoded code): the interpreter's code runs the
    /// instruction, and the block leaves after it: for the dispatcher to go on (as the
    /// interpreter would after `Flow::Check`) or for the run loop (when an interrupt
    /// may be deliverable or this block's code moved), or as it trapped.
    fn emit_slow_path(&mut self) {
        if !self.has_slow_path {
            return;
        }
        self.b.switch_to_block(self.slow);
        let [op, pc, next, i] = [0, 1, 2, 3].map(|n| self.b.block_params(self.slow)[n]);
        let icount = i;
        let hart = self.hart;
        self.b.ins().store(trusted(), icount, hart, HART_ICOUNT);
        let ctx = self.ctx;
        let outcome = self.call(CTX_RARE, &[ctx, op, pc]);
        // 2: not retired (pc and the reason are set).
        let ended = self.b.ins().icmp_imm(IntCC::Equal, outcome, 2);
        let end_word = self.b.ins().iconst(I64, END as i64);
        let cont = self.b.create_block();
        self.b.ins().brif(ended, self.exit, &[pc.into(), i.into(), end_word.into()], cont, &[]);
        self.b.switch_to_block(cont);
        // 1: retired, leave for the run loop at next_pc.
        let retired = self.b.ins().iadd_imm(i, 1);
        let leave = self.b.ins().icmp_imm(IntCC::Equal, outcome, 1);
        let next_pc = self.b.ins().load(I64, trusted(), hart, HART_NEXT_PC);
        let return_word = self.b.ins().iconst(I64, RETURN as i64);
        let cont = self.b.create_block();
        self.b.ins().brif(leave, self.exit, &[next_pc.into(), retired.into(), return_word.into()], cont, &[]);
        self.b.switch_to_block(cont);
        // 0: retired; leave if an interrupt may be deliverable or this block's code moved.
        let irq = self.b.ins().uload8(I64, trusted(), hart, HART_IRQ_DIRTY);
        let code_gen_base = self.b.ins().load(I64, trusted(), ctx, CTX_CODE_GEN);
        let gen = self.b.ins().load(I64, trusted(), code_gen_base, (self.block.page * 8) as i32);
        let moved = self.b.ins().icmp_imm(IntCC::NotEqual, gen, self.block.code_gen as i64);
        let pending = self.b.ins().icmp_imm(IntCC::NotEqual, irq, 0);
        let stop = self.b.ins().bor(moved, pending);
        let continue_word = self.b.ins().iconst(I64, CONTINUE as i64);
        let word = self.b.ins().select(stop, return_word, continue_word);
        self.b.ins().jump(self.exit, &[next.into(), retired.into(), word.into()]);
    }

    /// Send kept instruction `i` at `pc` to the slow path if `cond`; go on in a new
    /// block otherwise.
    fn slow_path_if(&mut self, cond: Value, at: At) {
        let At { op, i, pc, next } = at;
        debug_assert_eq!(self.dirty, 0, "registers are written back before the slow path");
        self.has_slow_path = true;
        // The arguments are made in a cold stub of their own: made before the branch,
        // they would cost four instructions and four host registers on the hot path
        // (Cranelift's `opt_level = "none"` does not sink them).
        let stub = self.b.create_block();
        self.b.set_cold_block(stub);
        let cont = self.b.create_block();
        self.b.ins().brif(cond, stub, &[], cont, &[]);
        self.b.switch_to_block(stub);
        let icount = self.b.ins().iadd_imm(self.icount0, i as i64);
        let [op, pc, next] = [op as i64, pc as i64, next as i64].map(|v| self.b.ins().iconst(I64, v));
        let args = [op.into(), pc.into(), next.into(), icount.into()];
        self.b.ins().jump(self.slow, &args);
        self.b.switch_to_block(cont);
    }

    fn next_kept_op(&mut self) -> *const MicroOp {
        let op = self.block.kept_ops[self.next_kept];
        self.next_kept += 1;
        op
    }

    fn emit_shared_exits(&mut self) {
        self.b.switch_to_block(self.exit);
        let [pc, icount, word] = [0, 1, 2].map(|i| self.b.block_params(self.exit)[i]);
        self.b.ins().store(trusted(), pc, self.hart, HART_PC);
        self.b.ins().store(trusted(), icount, self.hart, HART_ICOUNT);
        self.b.ins().return_(&[word]);

        self.b.switch_to_block(self.chain);
        let callee = self.b.block_params(self.chain)[0];
        let ctx = self.ctx;
        self.b.ins().return_call_indirect(self.chain_sig, callee, &[ctx]);
    }

    // ------------------------------------------------------------ registers and exits

    /// Guest register `r`'s value. A register the block has not read or written yet is
    /// loaded from the hart here, at its first read: every register written is stored
    /// back before a block starts (its budget check may leave), so the hart's copy is
    /// current. Loading at the first read, per block, loads only what is used (a load
    /// at the block's start of a register written before it is read was dead code that
    /// Cranelift at `opt_level = "none"` keeps) and keeps few values live across a
    /// region, so nothing spills the hart's registers onto the host stack.
    fn reg(&mut self, r: u8) -> Value {
        if r == 0 {
            return self.b.ins().iconst(I64, 0);
        }
        if self.avail & (1 << r) == 0 {
            let v = self.b.ins().load(I64, trusted(), self.hart, HART_X + 8 * r as i32);
            self.b.def_var(self.regs[r as usize], v);
            self.avail |= 1 << r;
            return v;
        }
        self.b.use_var(self.regs[r as usize])
    }

    fn set(&mut self, r: u8, v: Value) {
        if r != 0 {
            self.b.def_var(self.regs[r as usize], v);
            self.dirty |= 1 << r;
            self.avail |= 1 << r;
        }
    }

    /// Store the registers written since the last write-back: done on the main path
    /// before anything that may leave, so that no exit has to.
    fn write_back(&mut self) {
        for r in 1..32u8 {
            if self.dirty & (1 << r) != 0 {
                let v = self.b.use_var(self.regs[r as usize]);
                let hart = self.hart;
                self.b.ins().store(trusted(), v, hart, HART_X + 8 * r as i32);
            }
        }
        self.dirty = 0;
    }

    fn exit_args(&mut self, target: Target, retired: u64, word: u64) -> [cranelift_codegen::ir::BlockArg; 3] {
        let pc = match target {
            Target::Const(pc) => self.b.ins().iconst(I64, pc as i64),
            Target::Value(v) => v,
        };
        let retired = self.b.ins().iadd_imm(self.icount0, retired as i64);
        let word = self.b.ins().iconst(I64, word as i64);
        [pc.into(), retired.into(), word.into()]
    }

    /// Leave if `cond` holds (registers must have been written back); go on in a new
    /// block otherwise.
    fn exit_if(&mut self, cond: Value, target: Target, retired: u64, word: u64) {
        debug_assert_eq!(self.dirty, 0, "registers are written back before a possible exit");
        // The exit's arguments are made in a cold stub (see `slow_path_if`).
        let stub = self.b.create_block();
        self.b.set_cold_block(stub);
        let cont = self.b.create_block();
        self.b.ins().brif(cond, stub, &[], cont, &[]);
        self.b.switch_to_block(stub);
        let args = self.exit_args(target, retired, word);
        self.b.ins().jump(self.exit, &args);
        self.b.switch_to_block(cont);
    }

    /// Leave the current block for the exit (registers written back).
    fn exit_now(&mut self, target: Target, retired: u64, word: u64) {
        debug_assert_eq!(self.dirty, 0, "registers are written back before an exit");
        let args = self.exit_args(target, retired, word);
        self.b.ins().jump(self.exit, &args);
    }

    /// Go on at `target`, known only now or in another page, with `retired` instructions
    /// retired: a tail call through the jump cache when it has the block and the fetch
    /// translation is in the TLB (as the dispatcher would find them, with no page walk),
    /// else back to the dispatcher.
    fn leave_through_jump_cache(&mut self, target: Value, retired: u64) {
        self.write_back();
        let hart = self.hart;
        let ctx = self.ctx;
        let icount = self.b.ins().iadd_imm(self.icount0, retired as i64);
        self.b.ins().store(trusted(), icount, hart, HART_ICOUNT);
        let to_dispatcher = self.b.create_block();
        self.b.set_cold_block(to_dispatcher);
        // The fetch translation: the TLB's fetch entry for the target's page.
        let tlb = self.b.ins().load(I64, trusted(), ctx, CTX_TLB);
        let shifted = self.b.ins().ushr_imm(target, 12 - 4);
        let scaled = self.b.ins().band_imm(shifted, (TLB_ENTRIES as i64 - 1) << 4);
        let entry = self.b.ins().iadd(tlb, scaled);
        let table = (Access::Fetch as usize * TLB_ENTRIES * 16) as i32;
        let tag = self.b.ins().load(I64, trusted(), entry, table);
        let fetch_bits = self.b.ins().load(I64, trusted(), ctx, CTX_FETCH_TAG_BITS);
        let page = self.b.ins().band_imm(target, !0xfff);
        let want = self.b.ins().bor(page, fetch_bits);
        let miss = self.b.ins().icmp(IntCC::NotEqual, tag, want);
        let cont = self.b.create_block();
        self.b.ins().brif(miss, to_dispatcher, &[], cont, &[]);
        self.b.switch_to_block(cont);
        let addend = self.b.ins().load(I64, trusted(), entry, table + 8);
        let offset = self.b.ins().iadd(target, addend);
        let page_offset = self.b.ins().band_imm(offset, !0xfff);
        // The jump cache entry: the same start, page and code generation.
        let jumps = self.b.ins().load(I64, trusted(), ctx, CTX_JUMPS);
        let half = self.b.ins().ushr_imm(target, 1);
        let index = self.b.ins().band_imm(half, JUMP_ENTRIES as i64 - 1);
        let scaled = self.b.ins().ishl_imm(index, 5);
        let slot = self.b.ins().iadd(jumps, scaled);
        let pc = self.b.ins().load(I64, trusted(), slot, 0);
        let same_pc = self.b.ins().icmp(IntCC::Equal, pc, target);
        let cached_page = self.b.ins().load(I64, trusted(), slot, 8);
        let same_page = self.b.ins().icmp(IntCC::Equal, cached_page, page_offset);
        let both = self.b.ins().band(same_pc, same_page);
        let cont = self.b.create_block();
        self.b.ins().brif(both, cont, &[], to_dispatcher, &[]);
        self.b.switch_to_block(cont);
        let code_gen_base = self.b.ins().load(I64, trusted(), ctx, CTX_CODE_GEN);
        let page_index = self.b.ins().ushr_imm(page_offset, 12);
        let gen_offset = self.b.ins().ishl_imm(page_index, 3);
        let gen_addr = self.b.ins().iadd(code_gen_base, gen_offset);
        let gen = self.b.ins().load(I64, trusted(), gen_addr, 0);
        let cached_gen = self.b.ins().load(I64, trusted(), slot, 16);
        let same_gen = self.b.ins().icmp(IntCC::Equal, gen, cached_gen);
        let callee = self.b.ins().load(I64, trusted(), slot, 24);
        let cont = self.b.create_block();
        self.b.ins().brif(same_gen, cont, &[], to_dispatcher, &[]);
        self.b.switch_to_block(cont);
        self.b.ins().jump(self.chain, &[callee.into()]);
        self.b.switch_to_block(to_dispatcher);
        self.exit_now(Target::Value(target), retired, CONTINUE);
    }

    /// Go on at `target` with `retired` instructions retired: a tail call into the next
    /// block once the dispatcher has linked it (same page only, where the translation and
    /// code generation cannot differ), else back to the dispatcher.
    fn leave_to(&mut self, target: u64, retired: u64) {
        self.write_back();
        if let Some(&(_, head)) = self.region.iter().find(|(pc, _)| *pc == target) {
            let icount = self.b.ins().iadd_imm(self.icount0, retired as i64);
            self.b.def_var(self.icount, icount);
            self.b.ins().jump(head, &[]);
            return;
        }
        let same_page = target & !(PAGE_SIZE - 1) == self.block.pc & !(PAGE_SIZE - 1);
        if !same_page {
            let target = self.b.ins().iconst(I64, target as i64);
            self.leave_through_jump_cache(target, retired);
            return;
        }
        let Some(slot) = (self.links)() else {
            self.exit_now(Target::Const(target), retired, CONTINUE);
            return;
        };
        let icount = self.b.ins().iadd_imm(self.icount0, retired as i64);
        let hart = self.hart;
        self.b.ins().store(trusted(), icount, hart, HART_ICOUNT);
        let slot_v = self.b.ins().iconst(I64, slot as i64);
        let callee = self.b.ins().load(I64, trusted(), slot_v, 0);
        let miss = self.b.create_block();
        self.b.ins().brif(callee, self.chain, &[callee.into()], miss, &[]);
        self.b.switch_to_block(miss);
        self.exit_now(Target::Const(target), retired, CONTINUE | slot as u64);
    }

    // ------------------------------------------------------------ instructions

    /// Translate one instruction; true when it ends the function.
    fn op(&mut self, op: &MicroOp, i: u64, pc: u64, next: u64) -> bool {
        use Kind::*;
        let insn = op.insn;
        let imm = insn.imm as i64;
        let rd = insn.rd;
        match op.kind {
            Nop | Fence | FenceI => {}
            Lui => {
                let v = self.b.ins().iconst(I64, imm);
                self.set(rd, v);
            }
            Auipc => {
                let v = self.b.ins().iconst(I64, pc.wrapping_add(imm as u64) as i64);
                self.set(rd, v);
            }
            Jal => {
                let link = self.b.ins().iconst(I64, next as i64);
                self.set(rd, link);
                self.leave_to(pc.wrapping_add(imm as u64), i + 1);
                return true;
            }
            Jalr => {
                let base = self.reg(insn.rs1);
                let sum = self.b.ins().iadd_imm(base, imm);
                let target = self.b.ins().band_imm(sum, !1);
                let link = self.b.ins().iconst(I64, next as i64);
                self.set(rd, link);
                self.leave_through_jump_cache(target, i + 1);
                return true;
            }
            Beq | Bne | Blt | Bge | Bltu | Bgeu => {
                let cc = match op.kind {
                    Beq => IntCC::Equal,
                    Bne => IntCC::NotEqual,
                    Blt => IntCC::SignedLessThan,
                    Bge => IntCC::SignedGreaterThanOrEqual,
                    Bltu => IntCC::UnsignedLessThan,
                    _ => IntCC::UnsignedGreaterThanOrEqual,
                };
                let (a, b) = (self.reg(insn.rs1), self.reg(insn.rs2));
                let taken = self.b.ins().icmp(cc, a, b);
                self.write_back();
                let out = self.b.create_block();
                let cont = self.b.create_block();
                self.b.ins().brif(taken, out, &[], cont, &[]);
                self.b.switch_to_block(out);
                self.leave_to(pc.wrapping_add(imm as u64), i + 1);
                self.b.switch_to_block(cont);
            }
            Lb | Lh | Lw | Ld | Lbu | Lhu | Lwu => self.load(op, i, pc, next),
            Sb | Sh | Sw | Sd => self.store(op, i, pc, next),
            Amo | Csr | Sys | Fp | Illegal => return self.rare(i, pc, next, rd),
            _ => self.alu(op),
        }
        false
    }

    fn alu(&mut self, op: &MicroOp) {
        use Kind::*;
        let insn = op.insn;
        let imm = insn.imm as i64;
        let a = self.reg(insn.rs1);
        let v = match op.kind {
            Addi => self.b.ins().iadd_imm(a, imm),
            Slti => {
                let c = self.b.ins().icmp_imm(IntCC::SignedLessThan, a, imm);
                self.b.ins().uextend(I64, c)
            }
            Sltiu => {
                let c = self.b.ins().icmp_imm(IntCC::UnsignedLessThan, a, imm);
                self.b.ins().uextend(I64, c)
            }
            Xori => self.b.ins().bxor_imm(a, imm),
            Ori => self.b.ins().bor_imm(a, imm),
            Andi => self.b.ins().band_imm(a, imm),
            Slli => self.b.ins().ishl_imm(a, imm & 63),
            Srli => self.b.ins().ushr_imm(a, imm & 63),
            Srai => self.b.ins().sshr_imm(a, imm & 63),
            Addiw => {
                let s = self.b.ins().iadd_imm(a, imm);
                self.sext32(s)
            }
            Slliw | Srliw | Sraiw => {
                let a32 = self.b.ins().ireduce(I32, a);
                let s = imm & 31;
                let r = match op.kind {
                    Slliw => self.b.ins().ishl_imm(a32, s),
                    Srliw => self.b.ins().ushr_imm(a32, s),
                    _ => self.b.ins().sshr_imm(a32, s),
                };
                self.b.ins().sextend(I64, r)
            }
            _ => {
                let b = self.reg(insn.rs2);
                self.alu_rr(op.kind, a, b)
            }
        };
        self.set(insn.rd, v);
    }

    fn sext32(&mut self, v: Value) -> Value {
        let low = self.b.ins().ireduce(I32, v);
        self.b.ins().sextend(I64, low)
    }

    fn alu_rr(&mut self, kind: Kind, a: Value, b: Value) -> Value {
        use Kind::*;
        match kind {
            Add => self.b.ins().iadd(a, b),
            Sub => self.b.ins().isub(a, b),
            Sll => self.b.ins().ishl(a, b),
            Slt | Sltu => {
                let cc = if kind == Slt { IntCC::SignedLessThan } else { IntCC::UnsignedLessThan };
                let c = self.b.ins().icmp(cc, a, b);
                self.b.ins().uextend(I64, c)
            }
            Xor => self.b.ins().bxor(a, b),
            Srl => self.b.ins().ushr(a, b),
            Sra => self.b.ins().sshr(a, b),
            Or => self.b.ins().bor(a, b),
            And => self.b.ins().band(a, b),
            Addw => {
                let s = self.b.ins().iadd(a, b);
                self.sext32(s)
            }
            Subw => {
                let s = self.b.ins().isub(a, b);
                self.sext32(s)
            }
            Sllw | Srlw | Sraw => {
                let a32 = self.b.ins().ireduce(I32, a);
                let b32 = self.b.ins().ireduce(I32, b);
                let r = match kind {
                    Sllw => self.b.ins().ishl(a32, b32),
                    Srlw => self.b.ins().ushr(a32, b32),
                    _ => self.b.ins().sshr(a32, b32),
                };
                self.b.ins().sextend(I64, r)
            }
            Mul => self.b.ins().imul(a, b),
            Mulh => self.b.ins().smulhi(a, b),
            Mulhu => self.b.ins().umulhi(a, b),
            Mulhsu => {
                // a signed, b unsigned: the unsigned high part, less b when a < 0.
                let hi = self.b.ins().umulhi(a, b);
                let sign = self.b.ins().sshr_imm(a, 63);
                let fix = self.b.ins().band(sign, b);
                self.b.ins().isub(hi, fix)
            }
            Mulw => {
                let p = self.b.ins().imul(a, b);
                self.sext32(p)
            }
            Div | Rem => self.div_signed(I64, a, b, kind == Div),
            Divu | Remu => self.div_unsigned(I64, a, b, kind == Divu),
            Divw | Remw => {
                let (a32, b32) = (self.b.ins().ireduce(I32, a), self.b.ins().ireduce(I32, b));
                let r = self.div_signed(I32, a32, b32, kind == Divw);
                self.b.ins().sextend(I64, r)
            }
            Divuw | Remuw => {
                let (a32, b32) = (self.b.ins().ireduce(I32, a), self.b.ins().ireduce(I32, b));
                let r = self.div_unsigned(I32, a32, b32, kind == Divuw);
                self.b.ins().sextend(I64, r)
            }
            other => unreachable!("{other:?} is not a register-register operation"),
        }
    }

    /// Signed division or remainder with the spec's results for a zero divisor
    /// (quotient -1, remainder the dividend) and overflow (quotient the dividend,
    /// remainder 0), never a host trap: the host divides by 1 in those cases.
    fn div_signed(&mut self, ty: types::Type, a: Value, b: Value, quotient: bool) -> Value {
        let min = if ty == I64 { i64::MIN } else { i32::MIN as i64 };
        let zero = self.b.ins().icmp_imm(IntCC::Equal, b, 0);
        let a_min = self.b.ins().icmp_imm(IntCC::Equal, a, min);
        let b_neg1 = self.b.ins().icmp_imm(IntCC::Equal, b, -1);
        let overflow = self.b.ins().band(a_min, b_neg1);
        let bad = self.b.ins().bor(zero, overflow);
        let one = self.b.ins().iconst(ty, 1);
        let divisor = self.b.ins().select(bad, one, b);
        if quotient {
            let q = self.b.ins().sdiv(a, divisor);
            let all_ones = self.b.ins().iconst(ty, -1);
            self.b.ins().select(zero, all_ones, q)
        } else {
            let r = self.b.ins().srem(a, divisor);
            self.b.ins().select(zero, a, r)
        }
    }

    fn div_unsigned(&mut self, ty: types::Type, a: Value, b: Value, quotient: bool) -> Value {
        let zero = self.b.ins().icmp_imm(IntCC::Equal, b, 0);
        let one = self.b.ins().iconst(ty, 1);
        let divisor = self.b.ins().select(zero, one, b);
        if quotient {
            let q = self.b.ins().udiv(a, divisor);
            let all_ones = self.b.ins().iconst(ty, -1);
            self.b.ins().select(zero, all_ones, q)
        } else {
            let r = self.b.ins().urem(a, divisor);
            self.b.ins().select(zero, a, r)
        }
    }

    // ------------------------------------------------------------ memory

    /// The inline TLB check for `[vaddr, vaddr + size)`; on a miss, instruction `i`
    /// runs through the slow path. Returns the access's RAM offset (in the block where
    /// the check passed).
    fn tlb_lookup(&mut self, vaddr: Value, size: u64, access: Access, at: At) -> Value {
        let m = self.mem.expect("memory bases are loaded for blocks with loads and stores");
        // The entry for vaddr's page: ((vaddr >> 12) % entries) * 16.
        let shifted = self.b.ins().ushr_imm(vaddr, 12 - 4);
        let scaled = self.b.ins().band_imm(shifted, (TLB_ENTRIES as i64 - 1) << 4);
        let entry = self.b.ins().iadd(m.tlb, scaled);
        let table = (access as usize * TLB_ENTRIES * 16) as i32;
        let tag = self.b.ins().load(I64, trusted(), entry, table);
        // The tag is made from the access's last byte, so a page crossing misses.
        let last = if size == 1 { vaddr } else { self.b.ins().iadd_imm(vaddr, size as i64 - 1) };
        let page = self.b.ins().band_imm(last, !0xfff);
        let want = self.b.ins().bor(page, m.tag_bits);
        let miss = self.b.ins().icmp(IntCC::NotEqual, tag, want);
        self.slow_path_if(miss, at);
        let addend = self.b.ins().load(I64, trusted(), entry, table + 8);
        self.b.ins().iadd(vaddr, addend)
    }

    fn load(&mut self, op: &MicroOp, i: u64, pc: u64, next: u64) {
        use Kind::*;
        let insn = op.insn;
        let (size, signed): (u64, bool) = match op.kind {
            Lb => (1, true),
            Lbu => (1, false),
            Lh => (2, true),
            Lhu => (2, false),
            Lw => (4, true),
            Lwu => (4, false),
            _ => (8, false),
        };
        let base = self.reg(insn.rs1);
        self.write_back();
        let vaddr = self.b.ins().iadd_imm(base, insn.imm as i64);
        let op_ptr = self.next_kept_op();
        let at = At { op: op_ptr, i, pc, next };
        let offset = self.tlb_lookup(vaddr, size, Access::Load, at);
        let ram = self.mem.expect("loaded").ram;
        let host = self.b.ins().iadd(ram, offset);
        let v = match (size, signed) {
            (1, true) => self.b.ins().sload8(I64, guest(), host, 0),
            (1, false) => self.b.ins().uload8(I64, guest(), host, 0),
            (2, true) => self.b.ins().sload16(I64, guest(), host, 0),
            (2, false) => self.b.ins().uload16(I64, guest(), host, 0),
            (4, true) => self.b.ins().sload32(guest(), host, 0),
            (4, false) => self.b.ins().uload32(guest(), host, 0),
            _ => self.b.ins().load(I64, guest(), host, 0),
        };
        self.set(insn.rd, v);
    }

    fn store(&mut self, op: &MicroOp, i: u64, pc: u64, next: u64) {
        use Kind::*;
        let insn = op.insn;
        let size: u64 = match op.kind {
            Sb => 1,
            Sh => 2,
            Sw => 4,
            _ => 8,
        };
        let base = self.reg(insn.rs1);
        let value = self.reg(insn.rs2);
        self.write_back();
        let vaddr = self.b.ins().iadd_imm(base, insn.imm as i64);
        let op_ptr = self.next_kept_op();
        let at = At { op: op_ptr, i, pc, next };
        let offset = self.tlb_lookup(vaddr, size, Access::Store, at);
        let m = self.mem.expect("loaded");
        // Straight in only if the page is already dirty and holds no decoded code; the
        // interpreter does the rest (marking, moving the code generation).
        let page = self.b.ins().ushr_imm(offset, 12);
        let flag = self.b.ins().iadd(m.direct_store, page);
        let direct = self.b.ins().uload8(I32, trusted(), flag, 0);
        let not_direct = self.b.ins().icmp_imm(IntCC::Equal, direct, 0);
        self.slow_path_if(not_direct, at);
        let host = self.b.ins().iadd(m.ram, offset);
        match size {
            1 => self.b.ins().istore8(guest(), value, host, 0),
            2 => self.b.ins().istore16(guest(), value, host, 0),
            4 => self.b.ins().istore32(guest(), value, host, 0),
            _ => self.b.ins().store(guest(), value, host, 0),
        };
    }

    // ------------------------------------------------------------ through the interpreter

    fn call(&mut self, ctx_offset: i32, args: &[Value]) -> Value {
        let mut sig = Signature::new(self.host_call_conv);
        sig.params.extend(args.iter().map(|_| AbiParam::new(I64)));
        sig.returns.push(AbiParam::new(I64));
        let sig = self.b.import_signature(sig);
        let ctx = self.ctx;
        let callee = self.b.ins().load(I64, trusted(), ctx, ctx_offset);
        let call = self.b.ins().call_indirect(sig, callee, args);
        self.b.inst_results(call)[0]
    }

    /// A rare instruction, run by the interpreter's code in a helper call; true when it
    /// ends the function.
    fn rare(&mut self, i: u64, pc: u64, next: u64, rd: u8) -> bool {
        let op = self.next_kept_op();
        self.write_back();
        let icount = self.b.ins().iadd_imm(self.icount0, i as i64);
        let hart = self.hart;
        self.b.ins().store(trusted(), icount, hart, HART_ICOUNT);
        let op = self.b.ins().iconst(I64, op as i64);
        let pc_v = self.b.ins().iconst(I64, pc as i64);
        let ctx = self.ctx;
        let outcome = self.call(CTX_RARE, &[ctx, op, pc_v]);
        if rd != 0 {
            // The helper may have written rd (in the hart: read it from there again).
            self.avail &= !(1 << rd);
        }
        // 2: not retired (pc and the reason are set).
        let ended = self.b.ins().icmp_imm(IntCC::Equal, outcome, 2);
        self.exit_if(ended, Target::Const(pc), i, END);
        // 1: retired, leave for the run loop at next_pc.
        let leave = self.b.ins().icmp_imm(IntCC::Equal, outcome, 1);
        let next_pc = self.b.ins().load(I64, trusted(), hart, HART_NEXT_PC);
        self.exit_if(leave, Target::Value(next_pc), i + 1, RETURN);
        // 0: retired; leave if an interrupt may be deliverable or this block's code
        // moved, as the interpreter does after `Flow::Check`.
        let irq = self.b.ins().uload8(I64, trusted(), hart, HART_IRQ_DIRTY);
        let code_gen_base = self.b.ins().load(I64, trusted(), ctx, CTX_CODE_GEN);
        let gen = self.b.ins().load(I64, trusted(), code_gen_base, (self.block.page * 8) as i32);
        let moved = self.b.ins().icmp_imm(IntCC::NotEqual, gen, self.block.code_gen as i64);
        let pending = self.b.ins().icmp_imm(IntCC::NotEqual, irq, 0);
        let stop = self.b.ins().bor(moved, pending);
        self.exit_if(stop, Target::Const(next), i + 1, RETURN);
        false
    }
}
