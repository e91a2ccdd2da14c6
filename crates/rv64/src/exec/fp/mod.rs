//! The F and D extensions: operands and results in the f registers (singles are
//! NaN-boxed), rounding-mode resolution, fflags accrual and mstatus.FS. The values
//! themselves are computed on raw bits by `soft` (exact, every rounding mode), `fast`
//! (host floats where the flags can be proved) and `compare` (no rounding).
//!
//! Every instruction computes its whole outcome before it changes any state, so an
//! instruction that traps leaves registers, fflags and FS as they were.

mod compare;
mod fast;
mod format;
mod soft;

use rustc_apfloat::Round;

use self::compare::{Comparison, SignInjection};
use self::format::{Format, F32, F64};
use self::soft::{Arith, IntKind, Rounded};
use crate::bus::Bus;
use crate::decode::{Fmt, FpOp, Insn};
use crate::hart::Hart;
use crate::trap::Exception;

/// Where an instruction's result goes.
enum Dest {
    F,
    X,
}

/// The complete effect of an FP instruction that computes (everything but loads and
/// stores): the value for `rd` and the flags to accrue.
struct Outcome {
    dest: Dest,
    value: u64,
    flags: u64,
}

impl Outcome {
    fn f<F: Format>(r: Rounded) -> Outcome {
        Outcome { dest: Dest::F, value: F::to_register(r.bits), flags: r.flags }
    }

    fn x(value: u64, flags: u64) -> Outcome {
        Outcome { dest: Dest::X, value, flags }
    }
}

/// The precision an operation works in (for conversions: its floating-point side).
fn format_of(op: FpOp) -> Fmt {
    use FpOp::*;
    match op {
        Load(f) | Store(f) | Madd(f) | Msub(f) | Nmsub(f) | Nmadd(f) | Add(f) | Sub(f) | Mul(f) | Div(f) | Sqrt(f)
        | Sgnj(f) | Sgnjn(f) | Sgnjx(f) | Min(f) | Max(f) | CvtWF(f) | CvtWuF(f) | CvtLF(f) | CvtLuF(f) | CvtFW(f)
        | CvtFWu(f) | CvtFL(f) | CvtFLu(f) | MvXF(f) | MvFX(f) | Eq(f) | Lt(f) | Le(f) | Class(f) => f,
        CvtSD => Fmt::S,
        CvtDS => Fmt::D,
    }
}

impl Hart {
    pub(crate) fn exec_fp(&mut self, bus: &mut impl Bus, op: FpOp, i: &Insn, raw: u32) -> Result<(), Exception> {
        self.require_fp(raw)?;
        let outcome = match op {
            FpOp::Load(fmt) => return self.fp_load(bus, fmt, i),
            FpOp::Store(fmt) => return self.fp_store(bus, fmt, i),
            FpOp::CvtSD => {
                let rm = self.rounding(i.rm, raw)?;
                Outcome::f::<F32>(soft::double_to_single(self.operand::<F64>(i.rs1), rm))
            }
            FpOp::CvtDS => {
                // Exact, but the rm field is still checked like any other.
                self.rounding(i.rm, raw)?;
                Outcome::f::<F64>(soft::single_to_double(self.operand::<F32>(i.rs1)))
            }
            _ => match format_of(op) {
                Fmt::S => self.fp_compute::<F32>(op, i, raw)?,
                Fmt::D => self.fp_compute::<F64>(op, i, raw)?,
            },
        };
        self.fp_retire(i.rd, outcome);
        Ok(())
    }

    /// An operand of format `F` from an f register.
    fn operand<F: Format>(&self, r: u8) -> u64 {
        F::from_register(self.state.f[r as usize])
    }

    /// The rounding mode of an instruction's rm field; DYN (7) takes fcsr.frm, and a
    /// reserved mode either way is an illegal instruction.
    fn rounding(&self, rm: u8, raw: u32) -> Result<Round, Exception> {
        let rm = if rm == 7 { ((self.state.fcsr >> 5) & 7) as u8 } else { rm };
        Ok(match rm {
            0 => Round::NearestTiesToEven,
            1 => Round::TowardZero,
            2 => Round::TowardNegative,
            3 => Round::TowardPositive,
            4 => Round::NearestTiesToAway,
            _ => return Err(Exception::IllegalInstruction(raw as u64)),
        })
    }

    /// Write the result and accrue the flags. FS becomes Dirty when an f register or
    /// fflags is written.
    fn fp_retire(&mut self, rd: u8, outcome: Outcome) {
        match outcome.dest {
            Dest::F => {
                self.state.f[rd as usize] = outcome.value;
                self.set_fs_dirty();
            }
            Dest::X => self.set_x(rd, outcome.value),
        }
        if outcome.flags != 0 {
            self.state.fcsr |= outcome.flags;
            self.set_fs_dirty();
        }
    }

    /// flw/fld: the bits move unchanged (a single is NaN-boxed). Misaligned addresses
    /// are carried out by the load path.
    fn fp_load(&mut self, bus: &mut impl Bus, fmt: Fmt, i: &Insn) -> Result<(), Exception> {
        let addr = self.x(i.rs1).wrapping_add(i.imm as i64 as u64);
        let value = match fmt {
            Fmt::S => F32::to_register(self.load(bus, addr, 4)?),
            Fmt::D => self.load(bus, addr, 8)?,
        };
        self.state.f[i.rd as usize] = value;
        self.set_fs_dirty();
        Ok(())
    }

    /// fsw/fsd: the low 32 or all 64 bits of the register, unchanged (fsw does not
    /// check the boxing).
    fn fp_store(&mut self, bus: &mut impl Bus, fmt: Fmt, i: &Insn) -> Result<(), Exception> {
        let addr = self.x(i.rs1).wrapping_add(i.imm as i64 as u64);
        let size = match fmt {
            Fmt::S => 4,
            Fmt::D => 8,
        };
        self.store(bus, addr, size, self.state.f[i.rs2 as usize])
    }

    /// Everything but loads, stores and the s/d conversions, in format `F`.
    fn fp_compute<F: Format>(&self, op: FpOp, i: &Insn, raw: u32) -> Result<Outcome, Exception> {
        use FpOp::*;
        let [a, b, c] = [i.rs1, i.rs2, i.rs3].map(|r| self.operand::<F>(r));
        let neg = F::SIGN;
        let arith = |op: Arith, a: u64, b: u64, c: u64| -> Result<Outcome, Exception> {
            let rm = self.rounding(i.rm, raw)?;
            Ok(Outcome::f::<F>(rounded::<F>(op, a, b, c, rm)))
        };
        let to_int = |kind: IntKind| -> Result<Outcome, Exception> {
            let (value, flags) = soft::to_int::<F>(a, kind, self.rounding(i.rm, raw)?);
            Ok(Outcome::x(value, flags))
        };
        let from_int = |kind: IntKind| -> Result<Outcome, Exception> {
            Ok(Outcome::f::<F>(soft::from_int::<F>(self.x(i.rs1), kind, self.rounding(i.rm, raw)?)))
        };
        let exact = |bits: u64| Outcome::f::<F>(Rounded { bits, flags: 0 });
        let cmp = |how: Comparison| {
            let (value, flags) = compare::compare::<F>(a, b, how);
            Outcome::x(value, flags)
        };
        Ok(match op {
            Add(_) => arith(Arith::Add, a, b, 0)?,
            Sub(_) => arith(Arith::Sub, a, b, 0)?,
            Mul(_) => arith(Arith::Mul, a, b, 0)?,
            Div(_) => arith(Arith::Div, a, b, 0)?,
            Sqrt(_) => arith(Arith::Sqrt, a, 0, 0)?,
            // Negating an operand is exact, so each form is one fused operation.
            Madd(_) => arith(Arith::MulAdd, a, b, c)?,
            Msub(_) => arith(Arith::MulAdd, a, b, c ^ neg)?,
            Nmsub(_) => arith(Arith::MulAdd, a ^ neg, b, c)?,
            Nmadd(_) => arith(Arith::MulAdd, a ^ neg, b, c ^ neg)?,
            Sgnj(_) => exact(compare::sign_inject::<F>(a, b, SignInjection::Copy)),
            Sgnjn(_) => exact(compare::sign_inject::<F>(a, b, SignInjection::Negate)),
            Sgnjx(_) => exact(compare::sign_inject::<F>(a, b, SignInjection::Xor)),
            Min(_) => Outcome::f::<F>(compare::min_max::<F>(a, b, false)),
            Max(_) => Outcome::f::<F>(compare::min_max::<F>(a, b, true)),
            CvtWF(_) => to_int(IntKind::W)?,
            CvtWuF(_) => to_int(IntKind::Wu)?,
            CvtLF(_) => to_int(IntKind::L)?,
            CvtLuF(_) => to_int(IntKind::Lu)?,
            CvtFW(_) => from_int(IntKind::W)?,
            CvtFWu(_) => from_int(IntKind::Wu)?,
            CvtFL(_) => from_int(IntKind::L)?,
            CvtFLu(_) => from_int(IntKind::Lu)?,
            // fmv.x.w takes the register's low 32 bits as they are, boxed or not.
            MvXF(_) => Outcome::x(sign_extend::<F>(self.state.f[i.rs1 as usize]), 0),
            MvFX(_) => exact(self.x(i.rs1) & (u64::MAX >> (64 - F::BITS))),
            Eq(_) => cmp(Comparison::Eq),
            Lt(_) => cmp(Comparison::Lt),
            Le(_) => cmp(Comparison::Le),
            Class(_) => Outcome::x(compare::classify::<F>(a), 0),
            Load(_) | Store(_) | CvtSD | CvtDS => unreachable!("handled by exec_fp"),
        })
    }
}

/// A rounded operation: the host fast path when it applies, else exact soft-float.
fn rounded<F: Format>(op: Arith, a: u64, b: u64, c: u64, rm: Round) -> Rounded {
    if rm == Round::NearestTiesToEven {
        if let Some(r) = fast::arith::<F>(op, a, b, c) {
            return r;
        }
    }
    soft::arith::<F>(op, a, b, c, rm)
}

/// The low `F::BITS` bits of a register, sign-extended (fmv.x.w).
fn sign_extend<F: Format>(reg: u64) -> u64 {
    let shift = 64 - F::BITS;
    (((reg << shift) as i64) >> shift) as u64
}
