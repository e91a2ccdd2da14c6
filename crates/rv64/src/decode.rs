//! Decoding: a 32-bit instruction word (compressed ones are expanded first by
//! [`crate::rvc`]) becomes an [`Insn`]: an operation and its operands. Decoding is a
//! pure function of the bits, which is what lets the hart cache it by raw value.

/// Base integer operations (RV64I and Zifencei).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseOp {
    Lui,
    Auipc,
    Jal,
    Jalr,
    Beq,
    Bne,
    Blt,
    Bge,
    Bltu,
    Bgeu,
    Lb,
    Lh,
    Lw,
    Ld,
    Lbu,
    Lhu,
    Lwu,
    Sb,
    Sh,
    Sw,
    Sd,
    Addi,
    Slti,
    Sltiu,
    Xori,
    Ori,
    Andi,
    Slli,
    Srli,
    Srai,
    Add,
    Sub,
    Sll,
    Slt,
    Sltu,
    Xor,
    Srl,
    Sra,
    Or,
    And,
    Addiw,
    Slliw,
    Srliw,
    Sraiw,
    Addw,
    Subw,
    Sllw,
    Srlw,
    Sraw,
    Fence,
    FenceI,
}

/// The M extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MulOp {
    Mul,
    Mulh,
    Mulhsu,
    Mulhu,
    Div,
    Divu,
    Rem,
    Remu,
    Mulw,
    Divw,
    Divuw,
    Remw,
    Remuw,
}

/// The A extension. `W` operate on 32 bits (sign-extended), `D` on 64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AmoOp {
    LrW,
    ScW,
    SwapW,
    AddW,
    XorW,
    AndW,
    OrW,
    MinW,
    MaxW,
    MinuW,
    MaxuW,
    LrD,
    ScD,
    SwapD,
    AddD,
    XorD,
    AndD,
    OrD,
    MinD,
    MaxD,
    MinuD,
    MaxuD,
}

/// Zicsr. The CSR number is in `imm`; the `I` forms take `rs1` as a 5-bit immediate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CsrOp {
    Rw,
    Rs,
    Rc,
    Rwi,
    Rsi,
    Rci,
}

/// Privileged instructions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SysOp {
    Ecall,
    Ebreak,
    Sret,
    Mret,
    Wfi,
    SfenceVma,
}

/// Floating-point precision of an F/D operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fmt {
    S,
    D,
}

/// The F and D extensions. The precision is in the `Fmt`; the rounding mode of an
/// arithmetic operation is in `Insn::rm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FpOp {
    Load(Fmt),
    Store(Fmt),
    Madd(Fmt),
    Msub(Fmt),
    Nmsub(Fmt),
    Nmadd(Fmt),
    Add(Fmt),
    Sub(Fmt),
    Mul(Fmt),
    Div(Fmt),
    Sqrt(Fmt),
    Sgnj(Fmt),
    Sgnjn(Fmt),
    Sgnjx(Fmt),
    Min(Fmt),
    Max(Fmt),
    /// float → signed 32-bit integer
    CvtWF(Fmt),
    CvtWuF(Fmt),
    CvtLF(Fmt),
    CvtLuF(Fmt),
    /// integer → float
    CvtFW(Fmt),
    CvtFWu(Fmt),
    CvtFL(Fmt),
    CvtFLu(Fmt),
    /// double → single
    CvtSD,
    /// single → double
    CvtDS,
    /// move bits float register → integer register (fmv.x.w / fmv.x.d)
    MvXF(Fmt),
    /// move bits integer register → float register (fmv.w.x / fmv.d.x)
    MvFX(Fmt),
    Eq(Fmt),
    Lt(Fmt),
    Le(Fmt),
    Class(Fmt),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Base(BaseOp),
    Mul(MulOp),
    Amo(AmoOp),
    Csr(CsrOp),
    Sys(SysOp),
    Fp(FpOp),
    /// Not a valid RV64GC encoding: raises an illegal-instruction exception.
    Illegal,
}

/// Calls `$callback! { base: [..], mul: [..] }` with every base-integer and M operation:
/// the one list from which the flat [`Kind`] and the executor's dispatch are both made.
macro_rules! with_flat_ops {
    ($callback:ident) => {
        $callback! {
            base: [
                Lui, Auipc, Jal, Jalr,
                Beq, Bne, Blt, Bge, Bltu, Bgeu,
                Lb, Lh, Lw, Ld, Lbu, Lhu, Lwu,
                Sb, Sh, Sw, Sd,
                Addi, Slti, Sltiu, Xori, Ori, Andi, Slli, Srli, Srai,
                Add, Sub, Sll, Slt, Sltu, Xor, Srl, Sra, Or, And,
                Addiw, Slliw, Srliw, Sraiw,
                Addw, Subw, Sllw, Srlw, Sraw,
                Fence, FenceI
            ],
            mul: [Mul, Mulh, Mulhsu, Mulhu, Div, Divu, Rem, Remu, Mulw, Divw, Divuw, Remw, Remuw]
        }
    };
}
pub(crate) use with_flat_ops;

macro_rules! define_kind {
    (base: [$($b:ident),*], mul: [$($m:ident),*]) => {
        /// An instruction's operation as one flat byte, so that executing it takes a
        /// single indirect jump: every base-integer and M operation has its own kind;
        /// the rarer extensions (A, Zicsr, privileged, F/D) dispatch again on
        /// [`Insn::op`]. `Nop` stands for an operation whose only effect would be a
        /// write to x0.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(u8)]
        pub(crate) enum Kind {
            Nop,
            $($b,)*
            $($m,)*
            Amo,
            Csr,
            Sys,
            Fp,
            Illegal,
        }

        impl Kind {
            /// The flat kind of a decoded instruction.
            pub(crate) fn of(insn: &Insn) -> Kind {
                let to_x0 = insn.rd == 0;
                match insn.op {
                    Op::Base(op) if to_x0 && op.only_writes_rd() => Kind::Nop,
                    Op::Base(op) => match op {
                        $(BaseOp::$b => Kind::$b,)*
                    },
                    Op::Mul(_) if to_x0 => Kind::Nop,
                    Op::Mul(op) => match op {
                        $(MulOp::$m => Kind::$m,)*
                    },
                    Op::Amo(_) => Kind::Amo,
                    Op::Csr(_) => Kind::Csr,
                    Op::Sys(_) => Kind::Sys,
                    Op::Fp(_) => Kind::Fp,
                    Op::Illegal => Kind::Illegal,
                }
            }
        }
    };
}
with_flat_ops!(define_kind);

impl Kind {
    /// Whether a straight-line block of decoded instructions must end after this one:
    /// it always transfers control, or it may change what the following instructions
    /// mean (privilege, translation, interrupt enables, counters), or it always traps.
    pub(crate) fn ends_block(self) -> bool {
        matches!(self, Kind::Jal | Kind::Jalr | Kind::Csr | Kind::Sys | Kind::Illegal)
    }
}

impl BaseOp {
    /// Computes a value into rd and does nothing else (cannot trap, touches no
    /// memory, does not transfer control).
    fn only_writes_rd(self) -> bool {
        use BaseOp::*;
        !matches!(
            self,
            Jal | Jalr | Beq | Bne | Blt | Bge | Bltu | Bgeu | Lb | Lh | Lw | Ld | Lbu | Lhu | Lwu | Sb | Sh | Sw | Sd
        )
    }
}

/// A decoded instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub op: Op,
    pub rd: u8,
    pub rs1: u8,
    pub rs2: u8,
    /// Third source register of the fused multiply-add forms.
    pub rs3: u8,
    /// Rounding-mode field (funct3) of floating-point operations.
    pub rm: u8,
    /// Length in bytes: 2 for compressed instructions, else 4.
    pub len: u8,
    /// Sign-extended immediate (CSR number for Zicsr; shift amount for shifts).
    pub imm: i32,
}

impl Insn {
    const ILLEGAL: Insn = Insn { op: Op::Illegal, rd: 0, rs1: 0, rs2: 0, rs3: 0, rm: 0, len: 4, imm: 0 };
}

#[inline]
fn bits(v: u32, hi: u32, lo: u32) -> u32 {
    (v >> lo) & ((1u32 << (hi - lo + 1)) - 1)
}

fn imm_i(w: u32) -> i32 {
    (w as i32) >> 20
}

fn imm_s(w: u32) -> i32 {
    (((w & 0xfe00_0000) as i32) >> 20) | bits(w, 11, 7) as i32
}

fn imm_b(w: u32) -> i32 {
    (((w & 0x8000_0000) as i32) >> 19) | ((bits(w, 7, 7) << 11) | (bits(w, 30, 25) << 5) | (bits(w, 11, 8) << 1)) as i32
}

fn imm_u(w: u32) -> i32 {
    (w & 0xffff_f000) as i32
}

fn imm_j(w: u32) -> i32 {
    (((w & 0x8000_0000) as i32) >> 11)
        | ((bits(w, 19, 12) << 12) | (bits(w, 20, 20) << 11) | (bits(w, 30, 21) << 1)) as i32
}

/// Decode a 32-bit instruction word.
pub fn decode(w: u32) -> Insn {
    let rd = bits(w, 11, 7) as u8;
    let rs1 = bits(w, 19, 15) as u8;
    let rs2 = bits(w, 24, 20) as u8;
    let f3 = bits(w, 14, 12);
    let f7 = bits(w, 31, 25);
    let mk = |op: Op, imm: i32| Insn { op, rd, rs1, rs2, rs3: bits(w, 31, 27) as u8, rm: f3 as u8, len: 4, imm };
    if w & 3 != 3 {
        return Insn::ILLEGAL;
    }
    use BaseOp::*;
    let op = match bits(w, 6, 2) {
        0b01101 => return mk(Op::Base(Lui), imm_u(w)),
        0b00101 => return mk(Op::Base(Auipc), imm_u(w)),
        0b11011 => return mk(Op::Base(Jal), imm_j(w)),
        0b11001 if f3 == 0 => return mk(Op::Base(Jalr), imm_i(w)),
        0b11000 => {
            let op = match f3 {
                0 => Beq,
                1 => Bne,
                4 => Blt,
                5 => Bge,
                6 => Bltu,
                7 => Bgeu,
                _ => return Insn::ILLEGAL,
            };
            return mk(Op::Base(op), imm_b(w));
        }
        0b00000 => {
            let op = match f3 {
                0 => Lb,
                1 => Lh,
                2 => Lw,
                3 => Ld,
                4 => Lbu,
                5 => Lhu,
                6 => Lwu,
                _ => return Insn::ILLEGAL,
            };
            return mk(Op::Base(op), imm_i(w));
        }
        0b01000 => {
            let op = match f3 {
                0 => Sb,
                1 => Sh,
                2 => Sw,
                3 => Sd,
                _ => return Insn::ILLEGAL,
            };
            return mk(Op::Base(op), imm_s(w));
        }
        0b00100 => return decode_op_imm(w, f3, mk),
        0b00110 => return decode_op_imm32(w, f3, mk),
        0b01100 => return decode_op(f3, f7, mk),
        0b01110 => return decode_op32(f3, f7, mk),
        0b00011 => match f3 {
            0 => Op::Base(Fence),
            1 => Op::Base(FenceI),
            _ => return Insn::ILLEGAL,
        },
        0b11100 => return decode_system(w, rd, rs1, f3, mk),
        0b01011 => return decode_amo(w, f3, mk),
        0b00001 => match f3 {
            2 => return mk(Op::Fp(FpOp::Load(Fmt::S)), imm_i(w)),
            3 => return mk(Op::Fp(FpOp::Load(Fmt::D)), imm_i(w)),
            _ => return Insn::ILLEGAL,
        },
        0b01001 => match f3 {
            2 => return mk(Op::Fp(FpOp::Store(Fmt::S)), imm_s(w)),
            3 => return mk(Op::Fp(FpOp::Store(Fmt::D)), imm_s(w)),
            _ => return Insn::ILLEGAL,
        },
        0b10000..=0b10011 => {
            let fmt = match bits(w, 26, 25) {
                0 => Fmt::S,
                1 => Fmt::D,
                _ => return Insn::ILLEGAL,
            };
            let op = match bits(w, 6, 2) {
                0b10000 => FpOp::Madd(fmt),
                0b10001 => FpOp::Msub(fmt),
                0b10010 => FpOp::Nmsub(fmt),
                _ => FpOp::Nmadd(fmt),
            };
            if !valid_rm(f3) {
                return Insn::ILLEGAL;
            }
            Op::Fp(op)
        }
        0b10100 => return decode_op_fp(w, rs2, f3, f7, mk),
        _ => return Insn::ILLEGAL,
    };
    mk(op, 0)
}

/// Rounding-mode encodings 5 and 6 are reserved; 7 means "dynamic" (from frm).
fn valid_rm(rm: u32) -> bool {
    rm != 5 && rm != 6
}

fn decode_op_imm(w: u32, f3: u32, mk: impl Fn(Op, i32) -> Insn) -> Insn {
    use BaseOp::*;
    let shamt = bits(w, 25, 20) as i32;
    let top6 = bits(w, 31, 26);
    let op = match f3 {
        0 => Addi,
        2 => Slti,
        3 => Sltiu,
        4 => Xori,
        6 => Ori,
        7 => Andi,
        1 if top6 == 0 => return mk(Op::Base(Slli), shamt),
        5 if top6 == 0 => return mk(Op::Base(Srli), shamt),
        5 if top6 == 0b010000 => return mk(Op::Base(Srai), shamt),
        _ => return Insn::ILLEGAL,
    };
    mk(Op::Base(op), imm_i(w))
}

fn decode_op_imm32(w: u32, f3: u32, mk: impl Fn(Op, i32) -> Insn) -> Insn {
    use BaseOp::*;
    let shamt = bits(w, 24, 20) as i32;
    let f7 = bits(w, 31, 25);
    match (f3, f7) {
        (0, _) => mk(Op::Base(Addiw), imm_i(w)),
        (1, 0) => mk(Op::Base(Slliw), shamt),
        (5, 0) => mk(Op::Base(Srliw), shamt),
        (5, 0b0100000) => mk(Op::Base(Sraiw), shamt),
        _ => Insn::ILLEGAL,
    }
}

fn decode_op(f3: u32, f7: u32, mk: impl Fn(Op, i32) -> Insn) -> Insn {
    use BaseOp::*;
    use MulOp::*;
    let op = match (f7, f3) {
        (0, 0) => Op::Base(Add),
        (0x20, 0) => Op::Base(Sub),
        (0, 1) => Op::Base(Sll),
        (0, 2) => Op::Base(Slt),
        (0, 3) => Op::Base(Sltu),
        (0, 4) => Op::Base(Xor),
        (0, 5) => Op::Base(Srl),
        (0x20, 5) => Op::Base(Sra),
        (0, 6) => Op::Base(Or),
        (0, 7) => Op::Base(And),
        (1, 0) => Op::Mul(Mul),
        (1, 1) => Op::Mul(Mulh),
        (1, 2) => Op::Mul(Mulhsu),
        (1, 3) => Op::Mul(Mulhu),
        (1, 4) => Op::Mul(Div),
        (1, 5) => Op::Mul(Divu),
        (1, 6) => Op::Mul(Rem),
        (1, 7) => Op::Mul(Remu),
        _ => return Insn::ILLEGAL,
    };
    mk(op, 0)
}

fn decode_op32(f3: u32, f7: u32, mk: impl Fn(Op, i32) -> Insn) -> Insn {
    use BaseOp::*;
    use MulOp::*;
    let op = match (f7, f3) {
        (0, 0) => Op::Base(Addw),
        (0x20, 0) => Op::Base(Subw),
        (0, 1) => Op::Base(Sllw),
        (0, 5) => Op::Base(Srlw),
        (0x20, 5) => Op::Base(Sraw),
        (1, 0) => Op::Mul(Mulw),
        (1, 4) => Op::Mul(Divw),
        (1, 5) => Op::Mul(Divuw),
        (1, 6) => Op::Mul(Remw),
        (1, 7) => Op::Mul(Remuw),
        _ => return Insn::ILLEGAL,
    };
    mk(op, 0)
}

fn decode_system(w: u32, rd: u8, rs1: u8, f3: u32, mk: impl Fn(Op, i32) -> Insn) -> Insn {
    let csr = bits(w, 31, 20) as i32;
    let op = match f3 {
        0 => {
            let f7 = bits(w, 31, 25);
            if f7 == 0b0001001 && rd == 0 {
                return mk(Op::Sys(SysOp::SfenceVma), 0);
            }
            if rd != 0 || rs1 != 0 {
                return Insn::ILLEGAL;
            }
            match bits(w, 31, 20) {
                0x000 => SysOp::Ecall,
                0x001 => SysOp::Ebreak,
                0x102 => SysOp::Sret,
                0x302 => SysOp::Mret,
                0x105 => SysOp::Wfi,
                _ => return Insn::ILLEGAL,
            }
        }
        1 => return mk(Op::Csr(CsrOp::Rw), csr),
        2 => return mk(Op::Csr(CsrOp::Rs), csr),
        3 => return mk(Op::Csr(CsrOp::Rc), csr),
        5 => return mk(Op::Csr(CsrOp::Rwi), csr),
        6 => return mk(Op::Csr(CsrOp::Rsi), csr),
        7 => return mk(Op::Csr(CsrOp::Rci), csr),
        _ => return Insn::ILLEGAL,
    };
    mk(Op::Sys(op), 0)
}

fn decode_amo(w: u32, f3: u32, mk: impl Fn(Op, i32) -> Insn) -> Insn {
    use AmoOp::*;
    let f5 = bits(w, 31, 27);
    let rs2 = bits(w, 24, 20);
    let op = match (f3, f5) {
        (2, 0b00010) if rs2 == 0 => LrW,
        (2, 0b00011) => ScW,
        (2, 0b00001) => SwapW,
        (2, 0b00000) => AddW,
        (2, 0b00100) => XorW,
        (2, 0b01100) => AndW,
        (2, 0b01000) => OrW,
        (2, 0b10000) => MinW,
        (2, 0b10100) => MaxW,
        (2, 0b11000) => MinuW,
        (2, 0b11100) => MaxuW,
        (3, 0b00010) if rs2 == 0 => LrD,
        (3, 0b00011) => ScD,
        (3, 0b00001) => SwapD,
        (3, 0b00000) => AddD,
        (3, 0b00100) => XorD,
        (3, 0b01100) => AndD,
        (3, 0b01000) => OrD,
        (3, 0b10000) => MinD,
        (3, 0b10100) => MaxD,
        (3, 0b11000) => MinuD,
        (3, 0b11100) => MaxuD,
        _ => return Insn::ILLEGAL,
    };
    mk(Op::Amo(op), 0)
}

fn decode_op_fp(w: u32, rs2: u8, f3: u32, f7: u32, mk: impl Fn(Op, i32) -> Insn) -> Insn {
    use FpOp::*;
    let fmt = match f7 & 3 {
        0 => Fmt::S,
        1 => Fmt::D,
        _ => return Insn::ILLEGAL,
    };
    let needs_rm = |op: FpOp| if valid_rm(f3) { mk(Op::Fp(op), 0) } else { Insn::ILLEGAL };
    let _ = w;
    match f7 >> 2 {
        0b00000 => needs_rm(Add(fmt)),
        0b00001 => needs_rm(Sub(fmt)),
        0b00010 => needs_rm(Mul(fmt)),
        0b00011 => needs_rm(Div(fmt)),
        0b01011 if rs2 == 0 => needs_rm(Sqrt(fmt)),
        0b00100 => match f3 {
            0 => mk(Op::Fp(Sgnj(fmt)), 0),
            1 => mk(Op::Fp(Sgnjn(fmt)), 0),
            2 => mk(Op::Fp(Sgnjx(fmt)), 0),
            _ => Insn::ILLEGAL,
        },
        0b00101 => match f3 {
            0 => mk(Op::Fp(Min(fmt)), 0),
            1 => mk(Op::Fp(Max(fmt)), 0),
            _ => Insn::ILLEGAL,
        },
        0b01000 => match (fmt, rs2) {
            (Fmt::S, 1) => needs_rm(CvtSD),
            (Fmt::D, 0) => needs_rm(CvtDS),
            _ => Insn::ILLEGAL,
        },
        0b11000 => match rs2 {
            0 => needs_rm(CvtWF(fmt)),
            1 => needs_rm(CvtWuF(fmt)),
            2 => needs_rm(CvtLF(fmt)),
            3 => needs_rm(CvtLuF(fmt)),
            _ => Insn::ILLEGAL,
        },
        0b11010 => match rs2 {
            0 => needs_rm(CvtFW(fmt)),
            1 => needs_rm(CvtFWu(fmt)),
            2 => needs_rm(CvtFL(fmt)),
            3 => needs_rm(CvtFLu(fmt)),
            _ => Insn::ILLEGAL,
        },
        0b10100 => match f3 {
            2 => mk(Op::Fp(Eq(fmt)), 0),
            1 => mk(Op::Fp(Lt(fmt)), 0),
            0 => mk(Op::Fp(Le(fmt)), 0),
            _ => Insn::ILLEGAL,
        },
        0b11100 if rs2 == 0 => match f3 {
            0 => mk(Op::Fp(MvXF(fmt)), 0),
            1 => mk(Op::Fp(Class(fmt)), 0),
            _ => Insn::ILLEGAL,
        },
        0b11110 if rs2 == 0 && f3 == 0 => mk(Op::Fp(MvFX(fmt)), 0),
        _ => Insn::ILLEGAL,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn immediates_are_sign_extended_per_format() {
        // addi x1, x0, -1
        let i = decode(0xfff0_0093);
        assert_eq!((i.op, i.rd, i.imm), (Op::Base(BaseOp::Addi), 1, -1));
        // sd x2, -8(x3)
        let s = decode(0xfe21_bc23);
        assert_eq!((s.op, s.rs1, s.rs2, s.imm), (Op::Base(BaseOp::Sd), 3, 2, -8));
        // beq x0, x0, -4
        let b = decode(0xfe00_0ee3);
        assert_eq!((b.op, b.imm), (Op::Base(BaseOp::Beq), -4));
        // jal x1, -2048
        let j = decode(0x801f_f0ef);
        assert_eq!((j.op, j.imm), (Op::Base(BaseOp::Jal), -2048));
        // lui x5, 0x80000 (sign-extends on RV64)
        let u = decode(0x8000_02b7);
        assert_eq!((u.op, u.imm), (Op::Base(BaseOp::Lui), i32::MIN));
    }

    #[test]
    fn reserved_encodings_are_illegal() {
        assert_eq!(decode(0).op, Op::Illegal);
        assert_eq!(decode(0xffff_ffff).op, Op::Illegal);
        // slli with shamt bit 6 set in funct6 position (0x04..) is reserved
        assert_eq!(decode(0x0410_1093).op, Op::Illegal);
        // fadd.s with reserved rounding mode 5
        assert_eq!(decode(0x0020_d0d3).op, Op::Illegal);
        // lr.w with rs2 != 0
        assert_eq!(decode(0x1011_a0af).op, Op::Illegal);
        // ecall with rd != 0
        assert_eq!(decode(0x0000_00f3).op, Op::Illegal);
    }
}
