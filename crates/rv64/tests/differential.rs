//! Differential testing of the compiler tier against the interpreter.
//!
//! Each case is a random program (every extension, compressed and not, loads and
//! stores of every size and alignment through pages of every permission, device
//! accesses, self-modifying stores, CSRs, traps, interrupts, timers) that runs in M, S
//! and U mode under Sv39, with trap handlers that switch mode and restart it at random
//! entry points. The same case runs on the interpreter and on the compiler (hot at once
//! or after a few runs, with a roomy or a tiny code cache), split into the same random
//! budgets; after every budget the two harts must agree on every architectural bit
//! (registers, CSRs, pc, privilege, instruction count), on the exit, and on every device
//! access; at the end, on every byte of RAM. A third run, on the compiler with other
//! budgets, must end in the same state (how a run is split never matters).
//!
//! A failure names its seed: `DIFF_SEED=<seed> cargo nextest run -p rv64 --release -E
//! 'test(differential)'` reruns just that case; `DIFF_CASES=<n>` runs more cases.

mod common;
mod fp_common;

use common::*;
use rv64::{Cpu, Exit, Hart, HartConfig, JitConfig, PrivMode};

// ---------------------------------------------------------------- randomness

/// xorshift64*: small, fixed, and enough to pick instructions.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + self.below((hi - lo + 1) as u64) as i64
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

// ---------------------------------------------------------------- memory map

/// Handler bookkeeping: counters, the mode table and the entry table.
const HD: u64 = RAM_BASE + 0x6000;
const PROGRAM: u64 = RAM_BASE + 0x8000;
const PROGRAM_PAGES: u64 = 4;
/// The data base register (x2) points in the middle of four data pages.
const DATA_BASE: u64 = RAM_BASE + 0x1_4000;
const DATA_FIRST: u64 = DATA_BASE - 0x2000;
const DATA_PAGES: u64 = 4;
const TABLES: u64 = RAM_BASE + 0x2_0000;
/// Where U mode sees the program (the same physical pages, with the U bit).
const USER_ALIAS: u64 = 0x4000_0000;

/// Registers the handlers use freely; random code reads and writes them too.
const SCRATCH: [u32; 5] = [27, 28, 29, 30, 31];
const X_DATA: u32 = 2;
const X_MMIO: u32 = 3;
const X_CODE: u32 = 4;

// ---------------------------------------------------------------- program generation

/// One instruction of a random program, some with a target to resolve once every
/// instruction's address is known.
#[derive(Clone, Copy)]
enum Item {
    Word(u32),
    Half(u16),
    Branch {
        funct3: u32,
        rs1: u32,
        rs2: u32,
        target: usize,
    },
    CBranch {
        nonzero: bool,
        rs1: u32,
        target: usize,
    },
    Jal {
        rd: u32,
        target: usize,
    },
    CJ {
        target: usize,
    },
    /// `auipc rt, 0` then (as the next item) `jalr rd, offset(rt)`.
    Auipc {
        rt: u32,
    },
    Jalr {
        rt: u32,
        rd: u32,
        target: usize,
        auipc: usize,
    },
}

impl Item {
    fn size(self) -> u64 {
        match self {
            Item::Half(_) | Item::CBranch { .. } | Item::CJ { .. } => 2,
            _ => 4,
        }
    }
}

struct Gen<'a> {
    rng: &'a mut Rng,
    items: Vec<Item>,
    /// How many items the program will have (targets are chosen among them).
    len: usize,
}

const BRANCH_F3: [u32; 6] = [0, 1, 4, 5, 6, 7];

/// `gen.word(w)` with `w` computed first (it may draw from the generator too).
macro_rules! emit {
    ($gen:expr, $w:expr) => {{
        let w = $w;
        $gen.word(w);
    }};
}

impl Gen<'_> {
    fn dst(&mut self) -> u32 {
        if self.rng.chance(3) {
            return 0; // writes to x0 must vanish
        }
        let r = self.rng.range(5, 26) as u32;
        if self.rng.chance(10) {
            1
        } else {
            r
        }
    }

    fn src(&mut self) -> u32 {
        self.rng.below(32) as u32
    }

    /// A compressed-instruction register (x8..x15).
    fn creg(&mut self) -> u32 {
        self.rng.range(8, 15) as u32
    }

    fn imm12(&mut self) -> i64 {
        match self.rng.below(4) {
            0 => self.rng.range(-2048, 2047),
            1 => self.rng.range(-16, 16),
            2 => self.rng.pick(&[0, 1, -1, 2047, -2048, 0x7ff, 31, 32, 63]),
            _ => self.rng.range(-256, 256),
        }
    }

    fn target(&mut self, here: usize, reach: i64) -> usize {
        let lo = (here as i64 - reach).max(0);
        let hi = (here as i64 + reach).min(self.len as i64 - 1);
        self.rng.range(lo, hi) as usize
    }

    fn push(&mut self, item: Item) {
        self.items.push(item);
    }

    fn word(&mut self, w: u32) {
        self.push(Item::Word(w));
    }

    fn generate(&mut self) {
        while self.items.len() < self.len - 1 {
            let roll = self.rng.below(100);
            match roll {
                0..=27 => self.alu(),
                28..=34 => self.muldiv(),
                35..=49 => self.data_access(),
                50..=52 => self.mmio_access(),
                53..=54 => self.code_access(),
                55..=64 => self.branch(),
                65..=68 => self.jump(),
                69..=75 => self.fp(),
                76..=79 => self.amo(),
                80..=85 => self.csr(),
                86..=88 => self.system(),
                89 => self.illegal(),
                _ => self.compressed(),
            }
        }
        self.items.truncate(self.len - 1);
        // The last instruction loops back to the start.
        self.push(Item::Jal { rd: 0, target: 0 });
    }

    fn alu(&mut self) {
        let (rd, a, b) = (self.dst(), self.src(), self.src());
        let imm = self.imm12();
        let sh = self.rng.below(64) as u32;
        let w = match self.rng.below(30) {
            0 => lui(rd, self.rng.below(1 << 20) as u32),
            1 => auipc(rd, self.rng.below(1 << 20) as u32),
            2 => addi(rd, a, imm),
            3 => slti(rd, a, imm),
            4 => sltiu(rd, a, imm),
            5 => xori(rd, a, imm),
            6 => ori(rd, a, imm),
            7 => andi(rd, a, imm),
            8 => slli(rd, a, sh),
            9 => srli(rd, a, sh),
            10 => srai(rd, a, sh),
            11 => add(rd, a, b),
            12 => sub(rd, a, b),
            13 => sll(rd, a, b),
            14 => slt(rd, a, b),
            15 => sltu(rd, a, b),
            16 => xor(rd, a, b),
            17 => srl(rd, a, b),
            18 => sra(rd, a, b),
            19 => or(rd, a, b),
            20 => and(rd, a, b),
            21 => addiw(rd, a, imm),
            22 => slliw(rd, a, sh & 31),
            23 => srliw(rd, a, sh & 31),
            24 => sraiw(rd, a, sh & 31),
            25 => addw(rd, a, b),
            26 => subw(rd, a, b),
            27 => sllw(rd, a, b),
            28 => srlw(rd, a, b),
            _ => sraw(rd, a, b),
        };
        emit!(self, w);
    }

    fn muldiv(&mut self) {
        let (rd, a, b) = (self.dst(), self.src(), self.src());
        let ops: [fn(u32, u32, u32) -> u32; 13] =
            [mul, mulh, mulhsu, mulhu, div, divu, rem, remu, mulw, divw, divuw, remw, remuw];
        if self.rng.chance(15) {
            // Divisor zero and signed overflow: set up the operands first.
            let v = self.rng.pick(&[0i64, -1]);
            emit!(self, addi(b.max(5), 0, v));
            let op = self.rng.pick(&ops);
            emit!(self, op(rd, a, b.max(5)));
            return;
        }
        let op = self.rng.pick(&ops);
        emit!(self, op(rd, a, b));
    }

    /// A data offset from x2: anywhere in ±2 KiB, often near the page boundary at 0
    /// (where accesses cross pages) or misaligned.
    fn data_offset(&mut self, size: i64) -> i64 {
        match self.rng.below(4) {
            0 => self.rng.range(-size, 0),
            1 => self.rng.range(-64, 64) & !(size - 1),
            2 => self.rng.range(-2048, 2047 - 8),
            _ => self.rng.range(-2048, 2047 - 8) & !(size - 1),
        }
    }

    fn data_access(&mut self) {
        let base = if self.rng.chance(15) {
            // Another data page: x2 ± 2 KiB first.
            let t = self.dst().max(5);
            let step = self.rng.pick(&[-2047, 2047, -1024, 1024]);
            emit!(self, addi(t, X_DATA, step));
            t
        } else if self.rng.chance(5) {
            self.src() // whatever the register holds
        } else {
            X_DATA
        };
        let size = self.rng.pick(&[1i64, 2, 4, 8]);
        let off = self.data_offset(size);
        let rd = self.dst();
        let v = self.src();
        let w = if self.rng.chance(55) {
            match (size, self.rng.chance(50)) {
                (1, true) => lb(rd, base, off),
                (1, false) => lbu(rd, base, off),
                (2, true) => lh(rd, base, off),
                (2, false) => lhu(rd, base, off),
                (4, true) => lw(rd, base, off),
                (4, false) => lwu(rd, base, off),
                _ => ld(rd, base, off),
            }
        } else {
            match size {
                1 => sb(v, base, off),
                2 => sh(v, base, off),
                4 => sw(v, base, off),
                _ => sd(v, base, off),
            }
        };
        emit!(self, w);
    }

    fn mmio_access(&mut self) {
        let size = self.rng.pick(&[1i64, 2, 4, 8]);
        let off = match self.rng.below(6) {
            0 => (MMIO_IRQ - MMIO_BASE) as i64,
            1 => (MMIO_STOP - MMIO_BASE) as i64,
            2 => self.rng.range(0, 0x100), // maybe misaligned or past the bank
            _ => self.rng.range(0, 0xf0) & !(size - 1),
        };
        let (rd, v) = (self.dst(), self.src());
        let w = match (self.rng.chance(50), size) {
            (true, 1) => lbu(rd, X_MMIO, off),
            (true, 2) => lh(rd, X_MMIO, off),
            (true, 4) => lw(rd, X_MMIO, off),
            (true, _) => ld(rd, X_MMIO, off),
            (false, 1) => sb(v, X_MMIO, off),
            (false, 2) => sh(v, X_MMIO, off),
            (false, 4) => sw(v, X_MMIO, off),
            (false, _) => sd(v, X_MMIO, off),
        };
        emit!(self, w);
    }

    /// Loads and stores into the program itself: self-modifying code.
    fn code_access(&mut self) {
        let off = self.rng.range(0, 2040) & !self.rng.pick(&[0, 1, 3]);
        let v = self.src();
        let w = match self.rng.below(4) {
            0 => lw(self.dst(), X_CODE, off),
            1 => sh(v, X_CODE, off),
            2 => sw(v, X_CODE, off),
            _ => {
                // Write a plausible instruction (an addi) over the program.
                let t = self.dst().max(5);
                let insn = addi(self.rng.range(5, 26) as u32, self.src(), self.imm12());
                emit!(self, lui(t, ((insn >> 12) + ((insn >> 11) & 1)) & 0xfffff));
                emit!(self, addiw(t, t, ((insn & 0xfff) as i64) << 52 >> 52));
                sw(t, X_CODE, off & !3)
            }
        };
        emit!(self, w);
    }

    fn branch(&mut self) {
        let here = self.items.len();
        let target = self.target(here, 48);
        let (rs1, rs2) = (self.src(), self.src());
        let funct3 = self.rng.pick(&BRANCH_F3);
        self.push(Item::Branch { funct3, rs1, rs2, target });
    }

    fn jump(&mut self) {
        let here = self.items.len();
        match self.rng.below(5) {
            0 | 1 => {
                let target = self.target(here, 200);
                let rd = if self.rng.chance(50) { 0 } else { 1 };
                self.push(Item::Jal { rd, target });
            }
            2 => {
                let target = self.target(here, 40);
                self.push(Item::CJ { target });
            }
            3 => {
                let rt = self.dst().max(5);
                let target = self.target(here, 300);
                let rd = self.rng.pick(&[0, 1, 5]);
                self.push(Item::Auipc { rt });
                self.push(Item::Jalr { rt, rd, target, auipc: here });
            }
            _ => {
                // Return through whatever ra holds (often a real return address).
                let rs1 = if self.rng.chance(70) { 1 } else { self.src() };
                emit!(self, jalr(self.dst(), rs1, self.rng.range(-8, 8) & !1));
            }
        }
    }

    fn rm(&mut self) -> u32 {
        match self.rng.below(20) {
            0 => self.rng.pick(&[5, 6]), // reserved: illegal
            1..=9 => 7,                  // dynamic: fcsr.frm
            _ => self.rng.below(5) as u32,
        }
    }

    fn fp(&mut self) {
        use fp_common as f;
        let fmt = self.rng.pick(&[f::S, f::D]);
        let [fd, fa, fb, fc] = [0; 4].map(|_| self.rng.below(32) as u32);
        let rm = self.rm();
        let w = match self.rng.below(24) {
            0 => f::fadd(fmt, fd, fa, fb, rm),
            1 => f::fsub(fmt, fd, fa, fb, rm),
            2 => f::fmul(fmt, fd, fa, fb, rm),
            3 => f::fdiv(fmt, fd, fa, fb, rm),
            4 => f::fsqrt(fmt, fd, fa, rm),
            5 => {
                let op = self.rng.pick(&[f::MADD, f::MSUB, f::NMSUB, f::NMADD]);
                f::fma(op, fmt, fd, fa, fb, fc, rm)
            }
            6 => f::fsgnj(fmt, fd, fa, fb),
            7 => f::fsgnjn(fmt, fd, fa, fb),
            8 => f::fsgnjx(fmt, fd, fa, fb),
            9 => f::fmin(fmt, fd, fa, fb),
            10 => f::fmax(fmt, fd, fa, fb),
            11 => f::feq(fmt, self.dst(), fa, fb),
            12 => f::flt(fmt, self.dst(), fa, fb),
            13 => f::fle(fmt, self.dst(), fa, fb),
            14 => f::fclass(fmt, self.dst(), fa),
            15 => f::fmv_x_f(fmt, self.dst(), fa),
            16 => f::fmv_f_x(fmt, fd, self.src()),
            17 => f::fcvt_int_f(self.rng.below(4) as u32, fmt, self.dst(), fa, rm),
            18 => f::fcvt_f_int(fmt, self.rng.below(4) as u32, fd, self.src(), rm),
            19 => f::fcvt_s_d(fd, fa, rm),
            20 => f::fcvt_d_s(fd, fa, rm),
            21 | 22 => {
                let off = self.data_offset(8) as i32;
                if fmt == f::S {
                    f::flw(fd, X_DATA, off)
                } else {
                    f::fld(fd, X_DATA, off)
                }
            }
            _ => {
                let off = self.data_offset(8) as i32;
                if fmt == f::S {
                    f::fsw(fa, X_DATA, off)
                } else {
                    f::fsd(fa, X_DATA, off)
                }
            }
        };
        emit!(self, w);
    }

    fn amo(&mut self) {
        let t = self.dst().max(5);
        let word = self.rng.chance(50);
        let size = if word { 4 } else { 8 };
        let off = if self.rng.chance(10) { self.rng.range(-64, 64) } else { self.rng.range(-64, 64) & !(size - 1) };
        emit!(self, addi(t, X_DATA, off));
        let (rd, v) = (self.dst(), self.src());
        let w: [fn(u32, u32, u32) -> u32; 9] =
            [amoswap_w, amoadd_w, amoxor_w, amoand_w, amoor_w, amomin_w, amomax_w, amominu_w, amomaxu_w];
        let d: [fn(u32, u32, u32) -> u32; 9] =
            [amoswap_d, amoadd_d, amoxor_d, amoand_d, amoor_d, amomin_d, amomax_d, amominu_d, amomaxu_d];
        match self.rng.below(4) {
            0 => {
                // lr; something; sc to the same address (or not)
                emit!(self, if word { lr_w(rd, t) } else { lr_d(rd, t) });
                if self.rng.chance(50) {
                    self.alu();
                }
                let at = if self.rng.chance(80) { t } else { X_DATA };
                let rd2 = self.dst();
                emit!(self, if word { sc_w(rd2, v, at) } else { sc_d(rd2, v, at) });
            }
            1 => emit!(self, if word { sc_w(rd, v, t) } else { sc_d(rd, v, t) }),
            _ => {
                let op = if word { self.rng.pick(&w) } else { self.rng.pick(&d) };
                emit!(self, op(rd, v, t));
            }
        }
    }

    /// A mask of mstatus bits worth flipping, into register `t`.
    fn mstatus_mask(&mut self, t: u32) {
        let bits = [1u64, 3, 5, 7, 8, 11, 12, 13, 14, 17, 18, 19, 20, 21, 22];
        let mut mask = 0u64;
        for _ in 0..self.rng.range(1, 3) {
            mask |= 1 << self.rng.pick(&bits);
        }
        self.load_constant(t, mask);
    }

    /// `t` = `value` (below 2^31) with lui + addi.
    fn load_constant(&mut self, t: u32, value: u64) {
        let lo = ((value & 0xfff) as i64) << 52 >> 52;
        let hi = ((value as i64 - lo) >> 12) as u32 & 0xfffff;
        emit!(self, lui(t, hi));
        emit!(self, addiw(t, t, lo));
    }

    fn csr(&mut self) {
        let t = self.dst().max(5);
        let rd = self.dst();
        match self.rng.below(16) {
            0 => {
                let csr = self.rng.pick(&[MSCRATCH, SSCRATCH, MEPC, SEPC, MTVAL, STVAL, MCAUSE, SCAUSE]);
                let w = match self.rng.below(3) {
                    0 => csrrw(rd, csr, self.src()),
                    1 => csrrs(rd, csr, self.src()),
                    _ => csrrc(rd, csr, 0),
                };
                emit!(self, w);
            }
            1 | 2 => {
                self.mstatus_mask(t);
                let csr = self.rng.pick(&[MSTATUS, SSTATUS]);
                let w = if self.rng.chance(50) { csrrs(rd, csr, t) } else { csrrc(rd, csr, t) };
                emit!(self, w);
            }
            3 => {
                let mask = [1u64, 3, 5, 7, 9, 11].iter().filter(|_| self.rng.chance(40)).fold(0, |m, b| m | 1 << b);
                self.load_constant(t, mask);
                let csr = self.rng.pick(&[MIE, SIE]);
                let w = if self.rng.chance(60) { csrrs(rd, csr, t) } else { csrrc(rd, csr, t) };
                emit!(self, w);
            }
            4 => {
                // Raise or clear a software-writable pending bit: an interrupt now.
                let bit = self.rng.pick(&[1u32, 5, 9]);
                self.load_constant(t, 1 << bit);
                let csr = self.rng.pick(&[MIP, SIP]);
                let w = if self.rng.chance(60) { csrrs(rd, csr, t) } else { csrrc(rd, csr, t) };
                emit!(self, w);
            }
            5 | 6 => {
                let csr = self.rng.pick(&[FCSR, FRM, FFLAGS]);
                let w = match self.rng.below(3) {
                    0 => csrrwi(rd, csr, self.rng.below(8) as u32),
                    1 => csrrsi(rd, csr, self.rng.below(32) as u32),
                    _ => csrrw(rd, csr, self.src()),
                };
                emit!(self, w);
            }
            7 | 8 => {
                let csr = self.rng.pick(&[CYCLE, TIME, INSTRET, MCYCLE, MINSTRET, HPMCOUNTER3]);
                emit!(self, csrr(rd, csr));
            }
            9 => {
                let csr = self.rng.pick(&[MCYCLE, MINSTRET]);
                emit!(self, csrrw(rd, csr, self.src()));
            }
            10 | 11 => {
                // A supervisor timer a few ticks ahead.
                emit!(self, csrr(t, TIME));
                emit!(self, addi(t, t, self.rng.range(0, 40)));
                emit!(self, csrw(STIMECMP, t));
            }
            12 => {
                emit!(self, addi(t, 0, -1));
                emit!(self, slli(t, t, 63));
                emit!(self, if self.rng.chance(70) { csrs(MENVCFG, t) } else { csrc(MENVCFG, t) });
            }
            13 => emit!(self, csrr(rd, self.rng.pick(&[SATP, MISA, MHARTID, MSTATUS, MIP, SIP, MIDELEG]))),
            14 => emit!(self, csrrw(rd, self.rng.pick(&[0x7c0, 0x5c0, 0xfff]), self.src())), // no such CSR
            _ => {
                let csr = self.rng.pick(&[MCOUNTEREN, SCOUNTEREN]);
                emit!(self, csrrwi(rd, csr, self.rng.below(8) as u32));
            }
        }
    }

    fn system(&mut self) {
        let w = match self.rng.below(10) {
            0..=2 => ecall(),
            3 => ebreak(),
            4 => wfi(),
            5 => mret(),
            6 => sret(),
            7 => sfence_vma(0, 0),
            8 => fence(),
            _ => fence_i(),
        };
        emit!(self, w);
    }

    fn illegal(&mut self) {
        let w = match self.rng.below(3) {
            0 => 0,
            1 => 0xffff_ffff,
            _ => self.rng.next() as u32,
        };
        emit!(self, w);
    }

    fn compressed(&mut self) {
        let c = self.creg();
        let c2 = self.creg();
        let rd = self.dst().max(1);
        let imm6 = self.rng.range(-32, 31) as i32;
        let nz6 = if imm6 == 0 { 1 } else { imm6 };
        let here = self.items.len();
        let h = match self.rng.below(24) {
            0 => c_addi(rd, nz6),
            1 => c_li(rd, imm6),
            2 => c_mv(rd, self.src().max(1)),
            3 => c_add(rd, self.src().max(1)),
            4 => c_addiw(rd, imm6),
            5 => c_lui(if rd == 2 { 5 } else { rd }, nz6),
            6 => c_srli(c, self.rng.below(64) as u32),
            7 => c_srai(c, self.rng.below(64) as u32),
            8 => c_andi(c, imm6),
            9 => c_slli(rd, self.rng.below(64) as u32),
            10 => [c_sub, c_xor, c_or, c_and, c_subw, c_addw][self.rng.below(6) as usize](c, c2),
            11 => c_addi4spn(c, (self.rng.range(1, 255) * 4) as u32),
            12 => c_lwsp(rd, (self.rng.below(64) * 4) as u32),
            13 => c_ldsp(rd, (self.rng.below(64) * 8) as u32),
            14 => c_swsp(self.src(), (self.rng.below(64) * 4) as u32),
            15 => c_sdsp(self.src(), (self.rng.below(64) * 8) as u32),
            16 => c_lw(c, c2, (self.rng.below(32) * 4) as u32),
            17 => c_ld(c, c2, (self.rng.below(32) * 8) as u32),
            18 => c_sw(c, c2, (self.rng.below(32) * 4) as u32),
            19 => c_sd(c, c2, (self.rng.below(32) * 8) as u32),
            20 => {
                let target = self.target(here, 30);
                let nonzero = self.rng.chance(50);
                self.push(Item::CBranch { nonzero, rs1: c, target });
                return;
            }
            21 => c_jr(self.src().max(1)),
            22 => c_jalr(self.src().max(1)),
            _ => c_nop(),
        };
        self.push(Item::Half(h));
    }
}

/// Lay the items out and resolve their targets; returns the code bytes and each
/// item's byte offset.
fn assemble(items: &[Item]) -> (Vec<u8>, Vec<u64>) {
    let mut offsets = Vec::with_capacity(items.len());
    let mut at = 0;
    for item in items {
        offsets.push(at);
        at += item.size();
    }
    let mut bytes = Vec::with_capacity(at as usize);
    for (i, item) in items.iter().enumerate() {
        let rel = |target: usize| offsets[target] as i64 - offsets[i] as i64;
        match *item {
            Item::Word(w) => bytes.extend(w.to_le_bytes()),
            Item::Half(h) => bytes.extend(h.to_le_bytes()),
            Item::Branch { funct3, rs1, rs2, target } => {
                bytes.extend(b_type(rel(target), rs2, rs1, funct3, OP_BRANCH).to_le_bytes())
            }
            Item::CBranch { nonzero, rs1, target } => {
                let h = if nonzero { c_bnez(rs1, rel(target) as i32) } else { c_beqz(rs1, rel(target) as i32) };
                bytes.extend(h.to_le_bytes())
            }
            Item::Jal { rd, target } => bytes.extend(jal(rd, rel(target)).to_le_bytes()),
            Item::CJ { target } => bytes.extend(c_j(rel(target) as i32).to_le_bytes()),
            Item::Auipc { rt } => bytes.extend(auipc(rt, 0).to_le_bytes()),
            Item::Jalr { rt, rd, target, auipc } => {
                let off = offsets[target] as i64 - offsets[auipc] as i64;
                bytes.extend(jalr(rd, rt, off).to_le_bytes())
            }
        }
    }
    (bytes, offsets)
}

// ---------------------------------------------------------------- handlers

/// The M-mode handler: count the trap, silence every interrupt source it may have
/// come from, pick the next mode and an entry point from the counter, and mret there.
fn m_handler() -> Vec<u32> {
    let [t0, t1, t2, t3, t4] = SCRATCH;
    vec![
        auipc(t4, 2),  // t4 = HD
        lui(t2, 0x20), // MPRV: the handler's own accesses are physical
        csrc(MSTATUS, t2),
        ld(t3, t4, 0),
        addi(t3, t3, 1),
        sd(t3, t4, 0),
        csrrci(0, MIP, 2), // SSIP
        addi(t2, 0, -1),
        csrw(STIMECMP, t2), // STIP
        lui(t2, 0x10000),
        sw(0, t2, (MMIO_IRQ - MMIO_BASE) as i64), // the external lines
        addi(t2, 0, 0x80),
        csrc(MIE, t2),   // MTIP cannot be cleared from here: stop listening
        andi(t2, t3, 3), // mode table index
        slli(t2, t2, 4),
        add(t2, t2, t4),
        ld(t1, t2, 16), // MPP bits
        ld(t0, t2, 24), // the program's base in that mode
        addi(t2, 0, 3),
        slli(t2, t2, 11),
        csrc(MSTATUS, t2),
        csrs(MSTATUS, t1),
        addi(X_CODE, t0, 0),
        srli(t3, t3, 2),
        andi(t3, t3, 15), // entry index
        slli(t3, t3, 3),
        add(t3, t3, t4),
        ld(t3, t3, 80),
        add(t3, t3, t0),
        csrw(MEPC, t3),
        mret(),
    ]
}

/// The S-mode handler: the same in S, choosing U or S.
fn s_handler() -> Vec<u32> {
    let [t0, _t1, t2, t3, t4] = SCRATCH;
    vec![
        auipc(t4, 1), // t4 = HD
        ld(t3, t4, 8),
        addi(t3, t3, 1),
        sd(t3, t4, 8),
        csrrci(0, SIP, 2),
        addi(t2, 0, 0x220), // STIE, SEIE
        csrc(SIE, t2),      // (the device page may be out of its reach: leave the lines alone)
        andi(t2, t3, 1),    // 0: U, 1: S
        slli(t0, t2, 4),
        add(t0, t0, t4),
        ld(t0, t0, 24),  // the program's base in that mode
        slli(t2, t2, 8), // SPP
        addi(_t1, 0, 0x100),
        csrc(SSTATUS, _t1),
        csrs(SSTATUS, t2),
        addi(X_CODE, t0, 0),
        srli(t3, t3, 1),
        andi(t3, t3, 15),
        slli(t3, t3, 3),
        add(t3, t3, t4),
        ld(t3, t3, 80),
        add(t3, t3, t0),
        csrw(SEPC, t3),
        sret(),
    ]
}

// ---------------------------------------------------------------- a case

/// Everything a case is made of, so that each engine starts from the same machine.
struct Case {
    seed: u64,
    ram_image: Vec<u8>,
    state: rv64::HartState,
    mtimecmp: u64,
    sbi_in_monitor: bool,
    /// Budgets to run, in order (their sum is the case's length).
    budgets: Vec<u64>,
    other_budgets: Vec<u64>,
    hot_threshold: u32,
    user_hot_threshold: u32,
    code_cache_bytes: usize,
    /// Compile on the compiler's own thread (when a block starts to run compiled then
    /// varies from run to run; the guest must not).
    background: bool,
}

fn budgets(rng: &mut Rng, total: u64) -> Vec<u64> {
    let mut out = Vec::new();
    let mut left = total;
    while left > 0 {
        let b = match rng.below(4) {
            0 => rng.range(1, 8) as u64,
            1 => rng.range(1, 200) as u64,
            _ => rng.range(1, 4000) as u64,
        }
        .min(left);
        out.push(b);
        left -= b;
    }
    out
}

fn make_case(seed: u64, instructions: u64) -> Case {
    let mut rng = Rng::new(seed);
    let mut m = Machine::new();
    let len = rng.range(200, 1400) as usize;
    let mut gen = Gen { rng: &mut rng, items: Vec::new(), len };
    gen.generate();
    let items = std::mem::take(&mut gen.items);
    let (code, offsets) = assemble(&items);
    assert!(code.len() as u64 <= PROGRAM_PAGES * 4096, "program fits its pages");
    m.write_bytes(PROGRAM, &code);
    m.load(M_HANDLER, &m_handler());
    m.load(S_HANDLER, &s_handler());
    // Random data, random FP values included.
    let data: Vec<u8> = (0..DATA_PAGES * 4096).map(|_| rng.next() as u8).collect();
    m.write_bytes(DATA_FIRST, &data);

    // The mode table: (MPP bits, program base) for U, S, S, M; then the entry table.
    let modes = [(0u64, USER_ALIAS + (PROGRAM - RAM_BASE)), (1 << 11, PROGRAM), (1 << 11, PROGRAM), (3 << 11, PROGRAM)];
    for (i, (mpp, base)) in modes.iter().enumerate() {
        m.write_u64(HD + 16 + 16 * i as u64, *mpp);
        m.write_u64(HD + 24 + 16 * i as u64, *base);
    }
    let mut entries = Vec::new();
    for i in 0..16u64 {
        let entry = if i == 0 { 0 } else { offsets[rng.below(offsets.len() as u64) as usize] };
        entries.push(entry);
        m.write_u64(HD + 80 + 8 * i, entry);
    }

    // Page tables: RAM identity-mapped page by page, the program again for U mode,
    // the device page.
    let mut pt = PageTables::new(&mut m, TABLES);
    let ad = |rng: &mut Rng| if rng.chance(80) { PTE_A | PTE_D } else { 0 };
    let code_writable = if rng.chance(50) { PTE_W } else { 0 };
    for page in 0..(RAM_SIZE / 4096) {
        let pa = RAM_BASE + page * 4096;
        let flags = if (PROGRAM..PROGRAM + PROGRAM_PAGES * 4096).contains(&pa) {
            PTE_V | PTE_R | PTE_X | code_writable | PTE_A | PTE_D
        } else if (DATA_FIRST..DATA_FIRST + DATA_PAGES * 4096).contains(&pa) {
            let perms = rng.pick(&[
                PTE_R | PTE_W,
                PTE_R | PTE_W,
                PTE_R | PTE_W | PTE_U,
                PTE_R | PTE_W | PTE_U,
                PTE_R,
                PTE_R | PTE_U,
                PTE_X,
                PTE_W, // reserved combination: a page fault
                0,
            ]);
            if perms == 0 {
                0
            } else {
                PTE_V | perms | ad(&mut rng)
            }
        } else if pa == M_HANDLER || pa == S_HANDLER {
            PTE_V | PTE_R | PTE_X | PTE_A
        } else if pa == HD {
            PTE_V | PTE_R | PTE_W | PTE_A | PTE_D
        } else {
            continue;
        };
        pt.map(&mut m, pa, pa, 0, flags);
    }
    for page in 0..PROGRAM_PAGES {
        let pa = PROGRAM + page * 4096;
        let va = USER_ALIAS + (pa - RAM_BASE);
        pt.map(&mut m, va, pa, 0, PTE_V | PTE_R | PTE_X | PTE_U | code_writable | ad(&mut rng));
    }
    let mmio_user = if rng.chance(50) { PTE_U } else { 0 };
    pt.map(&mut m, MMIO_BASE, MMIO_BASE, 0, PTE_V | PTE_R | PTE_W | mmio_user | PTE_A | PTE_D);

    let s = &mut m.hart.state;
    for r in 1..32 {
        s.x[r] = match rng.below(4) {
            0 => rng.next(),
            1 => rng.range(-16, 16) as u64,
            2 => DATA_BASE.wrapping_add(rng.range(-4096, 4096) as u64),
            _ => rng.next() & 0xffff,
        };
    }
    for f in s.f.iter_mut() {
        *f = match rng.below(3) {
            0 => rng.next(),
            1 => 0xffff_ffff_0000_0000 | (rng.next() & 0xffff_ffff),
            _ => (rng.range(-1000, 1000) as f64 / 7.0).to_bits(),
        };
    }
    let mode = rng.pick(&[PrivMode::User, PrivMode::Supervisor, PrivMode::Machine]);
    let base = match mode {
        PrivMode::User => modes[0].1,
        _ => PROGRAM,
    };
    s.x[X_DATA as usize] = DATA_BASE;
    s.x[X_MMIO as usize] = MMIO_BASE;
    s.x[X_CODE as usize] = base;
    s.pc = base + entries[0];
    s.privilege = mode;
    s.satp = pt.satp();
    s.fcsr = rng.below(256);
    s.mstatus = (rng.below(4) << 13) // FS
        | if rng.chance(30) { MSTATUS_SUM } else { 0 }
        | if rng.chance(20) { MSTATUS_MXR } else { 0 }
        | if rng.chance(50) { MSTATUS_MIE } else { 0 }
        | if rng.chance(50) { MSTATUS_SIE } else { 0 }
        | (2 << 32) | (2 << 34); // UXL, SXL
    s.medeleg = [3u64, 4, 5, 6, 7, 8, 13, 15].iter().filter(|_| rng.chance(40)).fold(0, |m, c| m | 1 << c);
    s.mideleg = [1u64, 5, 9].iter().filter(|_| rng.chance(50)).fold(0, |m, c| m | 1 << c);
    s.mie = [1u64, 3, 5, 7, 9, 11].iter().filter(|_| rng.chance(50)).fold(0, |m, c| m | 1 << c);
    s.menvcfg = if rng.chance(60) { 1 << 63 } else { 0 };
    s.mcounteren = rng.below(8) | 2;
    s.scounteren = rng.below(8);
    s.stimecmp = if rng.chance(50) { rng.below(instructions / 10 + 1) } else { u64::MAX };
    let mtimecmp = if rng.chance(50) { rng.below(instructions / 10 + 1) } else { u64::MAX };
    let state = s.clone();

    Case {
        seed,
        ram_image: m.bus.ram.as_slice().to_vec(),
        state,
        mtimecmp,
        sbi_in_monitor: rng.chance(30),
        budgets: budgets(&mut rng, instructions),
        other_budgets: budgets(&mut rng, instructions),
        hot_threshold: rng.pick(&[0, 0, 1, 3, 8, 30]),
        code_cache_bytes: if rng.chance(25) { 1 << 14 } else { 16 << 20 },
        background: rng.chance(25),
        // U-mode code compiled sooner than the rest, or not (the lower of the two holds).
        user_hot_threshold: rng.pick(&[0, 3, u32::MAX]),
    }
}

/// One engine running a case.
struct Run {
    hart: Hart,
    bus: TestBus,
    /// Idle exits in a row with nothing to wake the hart.
    stuck_idles: u32,
}

impl Run {
    fn new(case: &Case, cpu: Cpu) -> Run {
        let config = HartConfig {
            icount_per_tick: 10,
            sbi_in_monitor: case.sbi_in_monitor,
            cpu,
            jit: JitConfig {
                hot_threshold: case.hot_threshold,
                user_hot_threshold: case.user_hot_threshold,
                code_cache_bytes: case.code_cache_bytes,
                background: case.background,
            },
        };
        let mut bus = TestBus::new();
        bus.ram.write(RAM_BASE, &case.ram_image).expect("the image is RAM-sized");
        let mut hart = Hart::from_state(config, case.state.clone());
        hart.set_mtimecmp(case.mtimecmp);
        Run { hart, bus, stuck_idles: 0 }
    }

    /// Run `budget` more instructions, reacting to exits the way a monitor would (the
    /// same way for every engine).
    fn run(&mut self, budget: u64) -> Vec<Exit> {
        let until = self.hart.state.icount + budget;
        let mut exits = Vec::new();
        while self.hart.state.icount < until && exits.len() < 64 && self.stuck_idles < 4 {
            if std::env::var("DIFF_TRACE").is_ok() {
                let st = &self.hart.state;
                eprintln!(
                    "run {:?} icount {} until {until} pc {:#x} {:?}",
                    self.hart.config.cpu, st.icount, st.pc, st.privilege
                );
            }
            let exit = self.hart.run(&mut self.bus, until);
            exits.push(exit);
            match exit {
                Exit::Budget => {}
                Exit::Sbi => self.hart.complete_sbi(0, self.hart.state.icount),
                Exit::Stop => self.bus.stop = false,
                Exit::Idle => match self.hart.next_timer_deadline() {
                    Some(deadline) => {
                        let now = self.hart.time();
                        self.hart.skip_time(deadline - now);
                    }
                    None => {
                        // Raise the external lines; if nothing listens, the case ends.
                        self.bus.irq_m = true;
                        self.bus.irq_s = true;
                        self.stuck_idles += 1;
                    }
                },
            }
            if exit != Exit::Idle {
                self.stuck_idles = 0;
            }
        }
        exits
    }
}

/// The first difference between two runs, if any.
fn difference(a: &Run, b: &Run, full_ram: bool) -> Option<String> {
    if a.hart.state != b.hart.state {
        let (sa, sb) = (format!("{:#?}", a.hart.state), format!("{:#?}", b.hart.state));
        let lines: Vec<String> = sa
            .lines()
            .zip(sb.lines())
            .filter(|(x, y)| x != y)
            .take(12)
            .map(|(x, y)| format!("  interpreter {}\n  compiled    {}", x.trim(), y.trim()))
            .collect();
        return Some(format!("hart state differs:\n{}", lines.join("\n")));
    }
    if a.bus.accesses != b.bus.accesses {
        let first = a.bus.accesses.iter().zip(&b.bus.accesses).position(|(x, y)| x != y);
        return Some(format!(
            "device accesses differ ({} vs {}), first at {first:?}",
            a.bus.accesses.len(),
            b.bus.accesses.len()
        ));
    }
    if (a.bus.irq_m, a.bus.irq_s, a.bus.stop) != (b.bus.irq_m, b.bus.irq_s, b.bus.stop) || a.bus.mmio != b.bus.mmio {
        return Some("device state differs".into());
    }
    if full_ram {
        let (ra, rb) = (a.bus.ram.as_slice(), b.bus.ram.as_slice());
        if let Some(at) = ra.iter().zip(rb).position(|(x, y)| x != y) {
            return Some(format!(
                "RAM differs first at {:#x}: {:#04x} vs {:#04x}",
                RAM_BASE + at as u64,
                ra[at],
                rb[at]
            ));
        }
    }
    None
}

/// Totals over all cases, to check that the cases exercise what they claim to.
#[derive(Default, Debug)]
struct Coverage {
    instructions: u64,
    compiled: u64,
    m_traps: u64,
    s_traps: u64,
    flushes: u64,
    exits: [u64; 4],
}

fn run_case(case: &Case, coverage: &mut Coverage) -> Result<(), String> {
    let mut interp = Run::new(case, Cpu::Interpreter);
    let mut jit = Run::new(case, Cpu::Jit);
    for (i, &budget) in case.budgets.iter().enumerate() {
        let exits_i = interp.run(budget);
        let exits_j = jit.run(budget);
        if exits_i != exits_j {
            return Err(format!("budget {i} ({budget}): exits differ: {exits_i:?} vs {exits_j:?}"));
        }
        for e in exits_i {
            coverage.exits[e as usize] += 1;
        }
        let last = i + 1 == case.budgets.len();
        if let Some(diff) = difference(&interp, &jit, last || i % 16 == 0) {
            return Err(format!("after budget {i} ({budget}), icount {}: {diff}", interp.hart.state.icount));
        }
    }
    let mut other = Run::new(case, Cpu::Jit);
    for &budget in &case.other_budgets {
        other.run(budget);
    }
    if interp.hart.state.icount == other.hart.state.icount {
        if let Some(diff) = difference(&interp, &other, true) {
            return Err(format!("run with other budgets ends elsewhere: {diff}"));
        }
    }
    if std::env::var("DIFF_VERBOSE").is_ok() {
        let st = &interp.hart.state;
        eprintln!(
            "seed {}: pc {:#x} {:?} mcause {:#x} mepc {:#x} scause {:#x} sepc {:#x} m {} s {} stats {:?}",
            case.seed,
            st.pc,
            st.privilege,
            st.mcause,
            st.mepc,
            st.scause,
            st.sepc,
            interp.bus.ram.read_u64(HD).unwrap_or(0),
            interp.bus.ram.read_u64(HD + 8).unwrap_or(0),
            jit.hart.jit_stats()
        );
    }
    let stats = jit.hart.jit_stats();
    coverage.instructions += jit.hart.state.icount;
    coverage.compiled += stats.compiled_instructions;
    coverage.flushes += stats.flushes;
    coverage.m_traps += jit.bus.ram.read_u64(HD).unwrap_or(0);
    coverage.s_traps += jit.bus.ram.read_u64(HD + 8).unwrap_or(0);
    Ok(())
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn compiled_code_agrees_with_the_interpreter_on_random_programs() {
    const INSTRUCTIONS: u64 = 40_000;
    let seeds: Vec<u64> = match env_u64("DIFF_SEED") {
        Some(seed) => vec![seed],
        None => (0..env_u64("DIFF_CASES").unwrap_or(100)).map(|i| 0x5eed_0000 + i).collect(),
    };
    let mut coverage = Coverage::default();
    let mut failures = Vec::new();
    for &seed in &seeds {
        let case = make_case(seed, INSTRUCTIONS);
        if let Err(e) = run_case(&case, &mut coverage) {
            failures.push(format!("seed {seed}: {e}"));
            if failures.len() >= 5 {
                break;
            }
        }
    }
    eprintln!("differential: {} cases, {coverage:?}", seeds.len());
    assert!(
        failures.is_empty(),
        "{} case(s) differ (rerun one with DIFF_SEED=<seed>):\n{}",
        failures.len(),
        failures.join("\n")
    );
    if seeds.len() >= 50 {
        // The cases must reach what they are meant to test.
        assert!(coverage.compiled * 4 > coverage.instructions, "too little ran compiled: {coverage:?}");
        assert!(coverage.m_traps > 1000 && coverage.s_traps > 100, "too few traps: {coverage:?}");
        assert!(coverage.flushes > 0, "the code cache never filled: {coverage:?}");
        assert!(coverage.exits.iter().all(|&n| n > 0), "some exit never happened: {coverage:?}");
    }
}
