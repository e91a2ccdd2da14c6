//! Translation of one decoded block into a Cranelift function, `fn(ctx) -> exit code`.
//!
//! The block is straight-line code with side exits (taken branches, traps, checks). Guest
//! registers are Cranelift variables: loaded once at entry, written back at each exit and
//! before each helper call, only those written since the last write-back. The
//! instruction count is `icount at entry + instructions retired`, a constant at every
//! exit.

use super::exit_code::{BAIL, CONTINUE, END, RETURN};
use super::offsets::*;
use crate::block::MicroOp;
use crate::decode::Kind;
use crate::mmu::{Access, TLB_ENTRIES};
use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::{types, AbiParam, Function, InstBuilder, MemFlags, Signature, UserFuncName, Value};
use cranelift_codegen::isa::{CallConv, TargetIsa};
use cranelift_codegen::{control::ControlPlane, Context};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext, Variable};

const I64: types::Type = types::I64;
const I32: types::Type = types::I32;

/// Whether an instruction runs through the interpreter in a helper call.
pub(super) fn is_rare(op: &MicroOp) -> bool {
    matches!(op.kind, Kind::Amo | Kind::Csr | Kind::Sys | Kind::Fp | Kind::Illegal)
}

/// What to compile.
pub(super) struct BlockSpec<'a> {
    pub(super) ops: &'a [MicroOp],
    pub(super) pc: u64,
    /// RAM page index the instructions were decoded from, and its code generation then.
    pub(super) page: usize,
    pub(super) code_gen: u64,
    /// For each rare instruction of `ops`, in order, where the compiler keeps it.
    pub(super) rare_ops: &'a [*const MicroOp],
}

/// The reusable parts of compiling (Cranelift's contexts keep their allocations).
pub(super) struct Emitter {
    call_conv: CallConv,
    ctx: Context,
    builder_ctx: FunctionBuilderContext,
}

impl Emitter {
    pub(super) fn new(call_conv: CallConv) -> Emitter {
        Emitter { call_conv, ctx: Context::new(), builder_ctx: FunctionBuilderContext::new() }
    }

    /// Host code for `block`, or `None` if Cranelift refused it or it would need
    /// relocation (compiled code refers to nothing outside itself but through the
    /// context).
    pub(super) fn compile(&mut self, isa: &dyn TargetIsa, block: &BlockSpec) -> Option<&[u8]> {
        self.ctx.clear();
        let mut sig = Signature::new(self.call_conv);
        sig.params.push(AbiParam::new(I64));
        sig.returns.push(AbiParam::new(I32));
        self.ctx.func = Function::with_name_signature(UserFuncName::default(), sig);
        let builder = FunctionBuilder::new(&mut self.ctx.func, &mut self.builder_ctx);
        Translator::new(builder, self.call_conv, block).translate();
        let compiled = self.ctx.compile(isa, &mut ControlPlane::default()).ok()?;
        if !compiled.buffer.relocs().is_empty() {
            return None;
        }
        Some(compiled.code_buffer())
    }
}

/// Where an exit sends pc.
#[derive(Clone, Copy)]
enum Target {
    Const(u64),
    Value(Value),
}

struct Translator<'a, 'b> {
    b: FunctionBuilder<'a>,
    call_conv: CallConv,
    block: &'b BlockSpec<'b>,
    regs: [Variable; 32],
    /// Registers written since they were last stored to the hart (bit per register).
    dirty: u32,
    ctx: Value,
    hart: Value,
    icount0: Value,
    /// Loaded at entry when the block touches memory.
    mem: Option<MemBase>,
    /// Index of the next rare instruction in `block.rare_ops`.
    next_rare: usize,
}

#[derive(Clone, Copy)]
struct MemBase {
    ram: Value,
    tlb: Value,
    tag_bits: Value,
    dirty: Value,
    code_watch: Value,
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

/// The registers an inlined instruction reads (rare ones read the hart's copy).
fn reads(op: &MicroOp) -> u32 {
    use Kind::*;
    let (rs1, rs2) = (1u32 << op.insn.rs1, 1u32 << op.insn.rs2);
    let both = rs1 | rs2;
    let mask = match op.kind {
        Nop | Lui | Auipc | Jal | Fence | FenceI | Amo | Csr | Sys | Fp | Illegal => 0,
        Jalr | Lb | Lh | Lw | Ld | Lbu | Lhu | Lwu | Addi | Slti | Sltiu | Xori | Ori | Andi | Slli | Srli | Srai
        | Addiw | Slliw | Srliw | Sraiw => rs1,
        _ => both,
    };
    mask & !1
}

impl<'a, 'b> Translator<'a, 'b> {
    fn new(mut b: FunctionBuilder<'a>, call_conv: CallConv, block: &'b BlockSpec<'b>) -> Self {
        let regs = std::array::from_fn(|_| b.declare_var(I64));
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        b.seal_block(entry);
        let ctx = b.block_params(entry)[0];
        let hart = b.ins().load(I64, trusted(), ctx, CTX_HART);
        let icount0 = b.ins().load(I64, trusted(), hart, HART_ICOUNT);
        let mut t = Translator { b, call_conv, block, regs, dirty: 0, ctx, hart, icount0, mem: None, next_rare: 0 };
        if block.ops.iter().any(|op| is_load(op.kind) || is_store(op.kind)) {
            let load = |t: &mut Self, base: Value, offset: i32| t.ins().load(I64, trusted(), base, offset);
            let ram = load(&mut t, ctx, CTX_RAM);
            let tlb = load(&mut t, ctx, CTX_TLB);
            let tag_bits = load(&mut t, hart, HART_DATA_TAG_BITS);
            let dirty = load(&mut t, ctx, CTX_DIRTY);
            let code_watch = load(&mut t, ctx, CTX_CODE_WATCH);
            t.mem = Some(MemBase { ram, tlb, tag_bits, dirty, code_watch });
        }
        let read = block.ops.iter().fold(0u32, |m, op| m | reads(op));
        for r in 1..32 {
            if read & (1 << r) != 0 {
                let v = t.b.ins().load(I64, trusted(), hart, HART_X + 8 * r);
                t.b.def_var(t.regs[r as usize], v);
            }
        }
        t
    }

    fn translate(mut self) {
        let mut pc = self.block.pc;
        let mut ended = false;
        for (i, op) in self.block.ops.iter().enumerate() {
            let next = pc.wrapping_add(op.insn.len as u64);
            if self.op(op, i as u64, pc, next) {
                ended = true;
                break;
            }
            pc = next;
        }
        if !ended {
            let n = self.block.ops.len() as u64;
            self.exit(Target::Const(pc), n, CONTINUE);
        }
        self.b.seal_all_blocks();
        self.b.finalize();
    }

    // ------------------------------------------------------------ registers and exits

    fn ins(&mut self) -> cranelift_frontend::FuncInstBuilder<'_, 'a> {
        self.b.ins()
    }

    fn reg(&mut self, r: u8) -> Value {
        if r == 0 {
            self.b.ins().iconst(I64, 0)
        } else {
            self.b.use_var(self.regs[r as usize])
        }
    }

    fn set(&mut self, r: u8, v: Value) {
        if r != 0 {
            self.b.def_var(self.regs[r as usize], v);
            self.dirty |= 1 << r;
        }
    }

    /// Store the registers written since the last write-back.
    fn write_back(&mut self) {
        for r in 1..32u8 {
            if self.dirty & (1 << r) != 0 {
                let v = self.b.use_var(self.regs[r as usize]);
                self.b.ins().store(trusted(), v, self.hart, HART_X + 8 * r as i32);
            }
        }
    }

    fn store_icount(&mut self, retired: u64) {
        let icount = self.b.ins().iadd_imm(self.icount0, retired as i64);
        self.b.ins().store(trusted(), icount, self.hart, HART_ICOUNT);
    }

    /// Leave the function from the current block.
    fn exit(&mut self, target: Target, retired: u64, code: u32) {
        self.write_back();
        let pc = match target {
            Target::Const(pc) => self.b.ins().iconst(I64, pc as i64),
            Target::Value(v) => v,
        };
        self.b.ins().store(trusted(), pc, self.hart, HART_PC);
        self.store_icount(retired);
        let code = self.b.ins().iconst(I32, code as i64);
        self.b.ins().return_(&[code]);
    }

    /// Leave if `cond` holds; go on in a new block otherwise.
    fn exit_if(&mut self, cond: Value, target: Target, retired: u64, code: u32) {
        let out = self.b.create_block();
        let cont = self.b.create_block();
        self.b.set_cold_block(out);
        self.b.ins().brif(cond, out, &[], cont, &[]);
        self.b.switch_to_block(out);
        self.exit(target, retired, code);
        self.b.switch_to_block(cont);
    }

    /// After something that may have made an interrupt deliverable or written this
    /// block's code: leave (with the instruction retired) if so, as the interpreter does
    /// after `Flow::Check`.
    fn check(&mut self, retired: u64, next: u64) {
        let irq = self.b.ins().uload8(I64, trusted(), self.hart, HART_IRQ_DIRTY);
        let code_gen_base = self.b.ins().load(I64, trusted(), self.ctx, CTX_CODE_GEN);
        let gen = self.b.ins().load(I64, trusted(), code_gen_base, (self.block.page * 8) as i32);
        let moved = self.b.ins().icmp_imm(IntCC::NotEqual, gen, self.block.code_gen as i64);
        let pending = self.b.ins().icmp_imm(IntCC::NotEqual, irq, 0);
        let stop = self.b.ins().bor(moved, pending);
        self.exit_if(stop, Target::Const(next), retired, RETURN);
    }

    fn call(&mut self, ctx_offset: i32, args: &[Value], returns: bool) -> Option<Value> {
        let mut sig = Signature::new(self.call_conv);
        sig.params.extend(args.iter().map(|_| AbiParam::new(I64)));
        if returns {
            sig.returns.push(AbiParam::new(I64));
        }
        let sig = self.b.import_signature(sig);
        let callee = self.b.ins().load(I64, trusted(), self.ctx, ctx_offset);
        let call = self.b.ins().call_indirect(sig, callee, args);
        self.b.inst_results(call).first().copied()
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
                self.exit(Target::Const(pc.wrapping_add(imm as u64)), i + 1, CONTINUE);
                return true;
            }
            Jalr => {
                let base = self.reg(insn.rs1);
                let sum = self.b.ins().iadd_imm(base, imm);
                let target = self.b.ins().band_imm(sum, !1);
                let link = self.b.ins().iconst(I64, next as i64);
                self.set(rd, link);
                self.exit(Target::Value(target), i + 1, CONTINUE);
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
                self.exit_if_hot(taken, Target::Const(pc.wrapping_add(imm as u64)), i + 1);
            }
            Lb | Lh | Lw | Ld | Lbu | Lhu | Lwu => self.load(op, i, pc),
            Sb | Sh | Sw | Sd => self.store(op, i, pc),
            Amo | Csr | Sys | Fp | Illegal => return self.rare(i, pc, next, rd),
            _ => self.alu(op, pc),
        }
        false
    }

    /// A taken branch: a side exit that is not cold (loops take it most of the time).
    fn exit_if_hot(&mut self, cond: Value, target: Target, retired: u64) {
        let out = self.b.create_block();
        let cont = self.b.create_block();
        self.b.ins().brif(cond, out, &[], cont, &[]);
        self.b.switch_to_block(out);
        self.exit(target, retired, CONTINUE);
        self.b.switch_to_block(cont);
    }

    fn alu(&mut self, op: &MicroOp, _pc: u64) {
        use Kind::*;
        let insn = op.insn;
        let imm = insn.imm as i64;
        let a = self.reg(insn.rs1);
        let v = match op.kind {
            Addi => self.ins().iadd_imm(a, imm),
            Slti => {
                let c = self.ins().icmp_imm(IntCC::SignedLessThan, a, imm);
                self.ins().uextend(I64, c)
            }
            Sltiu => {
                let c = self.ins().icmp_imm(IntCC::UnsignedLessThan, a, imm);
                self.ins().uextend(I64, c)
            }
            Xori => self.ins().bxor_imm(a, imm),
            Ori => self.ins().bor_imm(a, imm),
            Andi => self.ins().band_imm(a, imm),
            Slli => self.ins().ishl_imm(a, imm & 63),
            Srli => self.ins().ushr_imm(a, imm & 63),
            Srai => self.ins().sshr_imm(a, imm & 63),
            Addiw => {
                let s = self.ins().iadd_imm(a, imm);
                self.sext32(s)
            }
            Slliw | Srliw | Sraiw => {
                let a32 = self.ins().ireduce(I32, a);
                let s = imm & 31;
                let r = match op.kind {
                    Slliw => self.ins().ishl_imm(a32, s),
                    Srliw => self.ins().ushr_imm(a32, s),
                    _ => self.ins().sshr_imm(a32, s),
                };
                self.ins().sextend(I64, r)
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
            Add => self.ins().iadd(a, b),
            Sub => self.ins().isub(a, b),
            Sll => self.ins().ishl(a, b),
            Slt | Sltu => {
                let cc = if kind == Slt { IntCC::SignedLessThan } else { IntCC::UnsignedLessThan };
                let c = self.ins().icmp(cc, a, b);
                self.ins().uextend(I64, c)
            }
            Xor => self.ins().bxor(a, b),
            Srl => self.ins().ushr(a, b),
            Sra => self.ins().sshr(a, b),
            Or => self.ins().bor(a, b),
            And => self.ins().band(a, b),
            Addw => {
                let s = self.ins().iadd(a, b);
                self.sext32(s)
            }
            Subw => {
                let s = self.ins().isub(a, b);
                self.sext32(s)
            }
            Sllw | Srlw | Sraw => {
                let a32 = self.ins().ireduce(I32, a);
                let b32 = self.ins().ireduce(I32, b);
                let r = match kind {
                    Sllw => self.ins().ishl(a32, b32),
                    Srlw => self.ins().ushr(a32, b32),
                    _ => self.ins().sshr(a32, b32),
                };
                self.ins().sextend(I64, r)
            }
            Mul => self.ins().imul(a, b),
            Mulh => self.ins().smulhi(a, b),
            Mulhu => self.ins().umulhi(a, b),
            Mulhsu => {
                // a signed, b unsigned: the unsigned high part, less b when a < 0.
                let hi = self.ins().umulhi(a, b);
                let sign = self.ins().sshr_imm(a, 63);
                let fix = self.ins().band(sign, b);
                self.ins().isub(hi, fix)
            }
            Mulw => {
                let p = self.ins().imul(a, b);
                self.sext32(p)
            }
            Div | Rem => self.div_signed(I64, a, b, kind == Div),
            Divu | Remu => self.div_unsigned(I64, a, b, kind == Divu),
            Divw | Remw => {
                let (a32, b32) = (self.ins().ireduce(I32, a), self.ins().ireduce(I32, b));
                let r = self.div_signed(I32, a32, b32, kind == Divw);
                self.ins().sextend(I64, r)
            }
            Divuw | Remuw => {
                let (a32, b32) = (self.ins().ireduce(I32, a), self.ins().ireduce(I32, b));
                let r = self.div_unsigned(I32, a32, b32, kind == Divuw);
                self.ins().sextend(I64, r)
            }
            other => unreachable!("{other:?} is not a register-register operation"),
        }
    }

    /// Signed division or remainder with the spec's results for a zero divisor
    /// (quotient -1, remainder the dividend) and overflow (quotient the dividend,
    /// remainder 0), never a host trap: the host divides by 1 in those cases.
    fn div_signed(&mut self, ty: types::Type, a: Value, b: Value, quotient: bool) -> Value {
        let min = if ty == I64 { i64::MIN } else { i32::MIN as i64 };
        let zero = self.ins().icmp_imm(IntCC::Equal, b, 0);
        let a_min = self.ins().icmp_imm(IntCC::Equal, a, min);
        let b_neg1 = self.ins().icmp_imm(IntCC::Equal, b, -1);
        let overflow = self.ins().band(a_min, b_neg1);
        let bad = self.ins().bor(zero, overflow);
        let one = self.ins().iconst(ty, 1);
        let divisor = self.ins().select(bad, one, b);
        if quotient {
            let q = self.ins().sdiv(a, divisor);
            let all_ones = self.ins().iconst(ty, -1);
            self.ins().select(zero, all_ones, q)
        } else {
            let r = self.ins().srem(a, divisor);
            self.ins().select(zero, a, r)
        }
    }

    fn div_unsigned(&mut self, ty: types::Type, a: Value, b: Value, quotient: bool) -> Value {
        let zero = self.ins().icmp_imm(IntCC::Equal, b, 0);
        let one = self.ins().iconst(ty, 1);
        let divisor = self.ins().select(zero, one, b);
        if quotient {
            let q = self.ins().udiv(a, divisor);
            let all_ones = self.ins().iconst(ty, -1);
            self.ins().select(zero, all_ones, q)
        } else {
            let r = self.ins().urem(a, divisor);
            self.ins().select(zero, a, r)
        }
    }

    // ------------------------------------------------------------ memory

    /// The inline TLB check for `[vaddr, vaddr + size)`: branches to a new cold block
    /// (returned second, not yet filled) on a miss; in the current block on a hit, the
    /// access's RAM offset is returned first.
    fn tlb_lookup(&mut self, vaddr: Value, size: u64, access: Access) -> (Value, cranelift_codegen::ir::Block) {
        let m = self.mem.expect("memory bases are loaded for blocks with loads and stores");
        let vpn = self.ins().ushr_imm(vaddr, 12);
        let index = self.ins().band_imm(vpn, TLB_ENTRIES as i64 - 1);
        let scaled = self.ins().ishl_imm(index, 4);
        let entry = self.ins().iadd(m.tlb, scaled);
        let table = (access as usize * TLB_ENTRIES * 16) as i32;
        let tag = self.ins().load(I64, trusted(), entry, table);
        let last = if size == 1 { vaddr } else { self.ins().iadd_imm(vaddr, size as i64 - 1) };
        let page = self.ins().band_imm(last, !0xfff);
        let want = self.ins().bor(page, m.tag_bits);
        let hit = self.ins().icmp(IntCC::Equal, tag, want);
        let fast = self.b.create_block();
        let slow = self.b.create_block();
        self.b.set_cold_block(slow);
        self.b.ins().brif(hit, fast, &[], slow, &[]);
        self.b.switch_to_block(fast);
        let addend = self.b.ins().load(I64, trusted(), entry, table + 8);
        let offset = self.b.ins().iadd(vaddr, addend);
        (offset, slow)
    }

    /// Leave before instruction `i` (at `pc`), for the interpreter to run it: a TLB miss,
    /// a device, a page crossing, a store into a page with decoded code.
    fn bail(&mut self, slow: cranelift_codegen::ir::Block, i: u64, pc: u64) {
        let cont = self.b.current_block().expect("in a block");
        self.b.switch_to_block(slow);
        self.exit(Target::Const(pc), i, BAIL);
        self.b.switch_to_block(cont);
    }

    fn load(&mut self, op: &MicroOp, i: u64, pc: u64) {
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
        let vaddr = self.b.ins().iadd_imm(base, insn.imm as i64);
        let (offset, slow) = self.tlb_lookup(vaddr, size, Access::Load);
        self.bail(slow, i, pc);
        let ram = self.mem.expect("loaded").ram;
        let host = self.b.ins().iadd(ram, offset);
        let v = match (size, signed) {
            (1, true) => self.ins().sload8(I64, guest(), host, 0),
            (1, false) => self.ins().uload8(I64, guest(), host, 0),
            (2, true) => self.ins().sload16(I64, guest(), host, 0),
            (2, false) => self.ins().uload16(I64, guest(), host, 0),
            (4, true) => self.ins().sload32(guest(), host, 0),
            (4, false) => self.ins().uload32(guest(), host, 0),
            _ => self.ins().load(I64, guest(), host, 0),
        };
        self.set(insn.rd, v);
    }

    fn store(&mut self, op: &MicroOp, i: u64, pc: u64) {
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
        let vaddr = self.b.ins().iadd_imm(base, insn.imm as i64);
        let (offset, slow) = self.tlb_lookup(vaddr, size, Access::Store);
        let m = self.mem.expect("loaded");
        // A page with decoded code: the interpreter stores (and moves its generation).
        let page = self.ins().ushr_imm(offset, 12);
        let word_index = self.ins().ushr_imm(page, 6);
        let word_offset = self.ins().ishl_imm(word_index, 3);
        let one = self.ins().iconst(I64, 1);
        let bit = self.ins().ishl(one, page);
        let watch_word = self.ins().iadd(m.code_watch, word_offset);
        let watch = self.ins().load(I64, trusted(), watch_word, 0);
        let watched = self.ins().band(watch, bit);
        let store = self.b.create_block();
        self.b.ins().brif(watched, slow, &[], store, &[]);
        self.b.switch_to_block(store);
        self.bail(slow, i, pc);
        let host = self.ins().iadd(m.ram, offset);
        match size {
            1 => self.ins().istore8(guest(), value, host, 0),
            2 => self.ins().istore16(guest(), value, host, 0),
            4 => self.ins().istore32(guest(), value, host, 0),
            _ => self.ins().store(guest(), value, host, 0),
        };
        let dirty_word = self.ins().iadd(m.dirty, word_offset);
        let dirty = self.ins().load(I64, trusted(), dirty_word, 0);
        let dirty = self.ins().bor(dirty, bit);
        self.ins().store(trusted(), dirty, dirty_word, 0);
    }

    // ------------------------------------------------------------ through the interpreter

    /// A rare instruction, run by the interpreter's code; true when it ends the function.
    fn rare(&mut self, i: u64, pc: u64, next: u64, rd: u8) -> bool {
        let op = self.block.rare_ops[self.next_rare];
        self.next_rare += 1;
        self.write_back();
        self.dirty = 0;
        self.store_icount(i);
        let op = self.b.ins().iconst(I64, op as i64);
        let pc_v = self.b.ins().iconst(I64, pc as i64);
        let outcome = self.call(CTX_RARE, &[self.ctx, op, pc_v], true).expect("returns a value");
        if rd != 0 {
            // The helper may have written rd (in the hart: reload it).
            let v = self.b.ins().load(I64, trusted(), self.hart, HART_X + 8 * rd as i32);
            self.b.def_var(self.regs[rd as usize], v);
        }
        // 2: not retired (pc and the reason are set).
        let ended = self.b.ins().icmp_imm(IntCC::Equal, outcome, 2);
        let out = self.b.create_block();
        let cont = self.b.create_block();
        self.b.set_cold_block(out);
        self.b.ins().brif(ended, out, &[], cont, &[]);
        self.b.switch_to_block(out);
        self.store_icount(i);
        let code = self.b.ins().iconst(I32, END as i64);
        self.b.ins().return_(&[code]);
        self.b.switch_to_block(cont);
        // 1: retired, leave for the run loop at next_pc.
        let leave = self.b.ins().icmp_imm(IntCC::Equal, outcome, 1);
        let next_pc = self.b.ins().load(I64, trusted(), self.hart, HART_NEXT_PC);
        self.exit_if(leave, Target::Value(next_pc), i + 1, RETURN);
        // 0: retired, go on after the usual checks.
        self.check(i + 1, next);
        false
    }
}
