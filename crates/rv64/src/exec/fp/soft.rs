//! Exact arithmetic for every rounding mode, on rustc_apfloat, with the RISC-V rules
//! on top: NaN results are canonical, underflow is tininess after rounding, and
//! float-to-integer conversions saturate.

use rustc_apfloat::ieee;
use rustc_apfloat::{Float, FloatConvert, Round, Status, StatusAnd};

use super::format::{below_normal_range, Format, SingleUnbounded, F32, F64};

/// fflags bits.
pub(super) const NV: u64 = 1 << 4;
pub(super) const DZ: u64 = 1 << 3;
pub(super) const OF: u64 = 1 << 2;
pub(super) const UF: u64 = 1 << 1;
pub(super) const NX: u64 = 1 << 0;

/// A floating-point result (raw bits, not boxed) and the flags it raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Rounded {
    pub(super) bits: u64,
    pub(super) flags: u64,
}

/// The rounded arithmetic operations. Negations (fmsub, fnmadd, fnmsub) are applied
/// to the operands beforehand, which is exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Arith {
    Add,
    Sub,
    Mul,
    Div,
    Sqrt,
    /// a * b + c, rounded once.
    MulAdd,
}

fn flags_of(status: Status) -> u64 {
    let mut flags = 0;
    for (s, f) in [
        (Status::INVALID_OP, NV),
        (Status::DIV_BY_ZERO, DZ),
        (Status::OVERFLOW, OF),
        (Status::UNDERFLOW, UF),
        (Status::INEXACT, NX),
    ] {
        if status.contains(s) {
            flags |= f;
        }
    }
    flags
}

/// Bits and flags of a soft-float result, with any NaN made canonical.
fn finish<F: Format>(r: StatusAnd<F::Soft>) -> Rounded {
    let bits = if r.value.is_nan() { F::CANONICAL_NAN } else { r.value.to_bits() as u64 };
    Rounded { bits, flags: flags_of(r.status) }
}

/// APFloat decides underflow and overflow on the result in the format's own range,
/// where IEEE 754 (and RISC-V, which detects tininess after rounding) decides them on
/// the result rounded with an unbounded exponent. The two differ only for an inexact
/// result that landed on ±2^emin (rounded up from a value that is tiny when rounded
/// without bounds: UF missing) or on ±largest (rounded down from a value beyond it
/// in a directed mode: OF missing). Those results get a second look in `Unbounded`.
fn needs_unbounded_look<T: Float>(r: &StatusAnd<T>) -> bool {
    r.status.contains(Status::INEXACT)
        && !r.status.intersects(Status::UNDERFLOW | Status::OVERFLOW)
        && (r.value.is_smallest_normalized() || r.value.is_largest())
}

/// UF or OF as decided by the result rounded with an unbounded exponent.
fn unbounded_flags<F: Format>(unbounded: impl Float) -> u64 {
    if below_normal_range::<F>(unbounded) {
        UF
    } else if unbounded.ilogb() > F::BIAS {
        OF
    } else {
        0
    }
}

fn apply<T: Float>(op: Arith, a: T, b: T, c: T, rm: Round) -> StatusAnd<T> {
    match op {
        Arith::Add => a.add_r(b, rm),
        Arith::Sub => a.sub_r(b, rm),
        Arith::Mul => a.mul_r(b, rm),
        Arith::Div => a.div_r(b, rm),
        Arith::MulAdd => a.mul_add_r(b, c, rm),
        Arith::Sqrt => unreachable!("sqrt is computed by `sqrt`"),
    }
}

/// A rounded operation on raw operands (`c` is used by `MulAdd` only).
pub(super) fn arith<F: Format>(op: Arith, a: u64, b: u64, c: u64, rm: Round) -> Rounded {
    if op == Arith::Sqrt {
        return sqrt::<F>(a, rm);
    }
    let [x, y, z] = [a, b, c].map(F::soft);
    let r = apply(op, x, y, z, rm);
    let mut out = finish::<F>(r);
    if needs_unbounded_look(&r) {
        // Widening to the unbounded format is exact.
        let [x, y, z] = [x, y, z].map(|v| v.convert(&mut false).value);
        out.flags |= unbounded_flags::<F>(apply::<F::Unbounded>(op, x, y, z, rm).value);
    }
    out
}

/// Square root. rustc_apfloat has none, so: an exact integer square root of the
/// scaled significand, with a sticky bit for the remainder, rounded by the
/// soft-float integer conversion. A root is never tiny and never overflows.
pub(super) fn sqrt<F: Format>(a: u64, rm: Round) -> Rounded {
    let x = F::soft(a);
    if x.is_nan() {
        let flags = if x.is_signaling() { NV } else { 0 };
        return Rounded { bits: F::CANONICAL_NAN, flags };
    }
    if x.is_zero() || x.is_pos_infinity() {
        return Rounded { bits: a, flags: 0 };
    }
    if x.is_negative() {
        return Rounded { bits: F::CANONICAL_NAN, flags: NV };
    }
    // x = m * 2^e with m an integer.
    let (mut m, mut e) = if F::exp_field(a) == 0 {
        (F::frac(a), F::EMIN - F::PRECISION + 1)
    } else {
        (F::frac(a) | (1 << F::FRAC_BITS), F::exp_field(a) as i32 - F::BIAS - F::PRECISION + 1)
    };
    if e & 1 != 0 {
        m <<= 1;
        e -= 1;
    }
    // m < 2^55, so m * 2^64 fits, and its root has at least 32 bits even for the
    // smallest subnormal: far more than the precision plus a rounding bit.
    const SCALE: i32 = 64;
    let (root, inexact) = isqrt((m as u128) << SCALE);
    assert!(root >= 1 << 31, "root must carry the precision and a rounding bit");
    // The remainder becomes a sticky bit below the root's last bit.
    let doubled = (root << 1) | inexact as u128;
    let r = F::Soft::from_u128_r(doubled, rm);
    // Scaling by a power of two is exact here: the root lies well inside the normal range.
    let value = r.value.scalbn_r((e - SCALE) / 2 - 1, rm);
    Rounded { bits: value.to_bits() as u64, flags: flags_of(r.status) }
}

/// The integer square root of `n` and whether it was inexact (bit by bit).
fn isqrt(n: u128) -> (u128, bool) {
    let mut rem = n;
    let mut root = 0u128;
    let mut bit = 1u128 << 126;
    while bit > n {
        bit >>= 2;
    }
    while bit != 0 {
        if rem >= root + bit {
            rem -= root + bit;
            root = (root >> 1) + bit;
        } else {
            root >>= 1;
        }
        bit >>= 2;
    }
    (root, rem != 0)
}

/// fcvt.s.d
pub(super) fn double_to_single(a: u64, rm: Round) -> Rounded {
    let x = F64::soft(a);
    let r: StatusAnd<ieee::Single> = x.convert_r(rm, &mut false);
    let mut out = finish::<F32>(r);
    if needs_unbounded_look(&r) {
        let wide: StatusAnd<SingleUnbounded> = x.convert_r(rm, &mut false);
        out.flags |= unbounded_flags::<F32>(wide.value);
    }
    out
}

/// fcvt.d.s: exact, but a signaling NaN still raises NV.
pub(super) fn single_to_double(a: u64) -> Rounded {
    let r: StatusAnd<ieee::Double> = F32::soft(a).convert(&mut false);
    finish::<F64>(r)
}

/// The integer types of the conversions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum IntKind {
    W,
    Wu,
    L,
    Lu,
}

impl IntKind {
    fn range(self) -> (i128, i128) {
        match self {
            IntKind::W => (i32::MIN as i128, i32::MAX as i128),
            IntKind::Wu => (0, u32::MAX as i128),
            IntKind::L => (i64::MIN as i128, i64::MAX as i128),
            IntKind::Lu => (0, u64::MAX as i128),
        }
    }

    /// The integer register value: 32-bit results, signed or not, are sign-extended.
    fn register_value(self, v: i128) -> u64 {
        match self {
            IntKind::W | IntKind::Wu => v as u32 as i32 as i64 as u64,
            IntKind::L | IntKind::Lu => v as u64,
        }
    }

    /// The integer register operand as a mathematical integer.
    fn operand_value(self, x: u64) -> i128 {
        match self {
            IntKind::W => x as i32 as i128,
            IntKind::Wu => x as u32 as i128,
            IntKind::L => x as i64 as i128,
            IntKind::Lu => x as i128,
        }
    }
}

/// fcvt.{w,wu,l,lu}.{s,d}: round to an integer; NaN and values out of range (after
/// rounding) give the saturated value of the spec's table and raise NV only.
/// Returns the integer register value and the flags.
pub(super) fn to_int<F: Format>(a: u64, kind: IntKind, rm: Round) -> (u64, u64) {
    let (min, max) = kind.range();
    let x = F::soft(a);
    if x.is_nan() {
        return (kind.register_value(max), NV);
    }
    let r = x.to_i128_r(128, rm, &mut false);
    if r.status.contains(Status::INVALID_OP) || r.value < min || r.value > max {
        let saturated = if x.is_negative() { min } else { max };
        return (kind.register_value(saturated), NV);
    }
    let flags = if r.status.contains(Status::INEXACT) { NX } else { 0 };
    (kind.register_value(r.value), flags)
}

/// fcvt.{s,d}.{w,wu,l,lu}
pub(super) fn from_int<F: Format>(x: u64, kind: IntKind, rm: Round) -> Rounded {
    finish::<F>(F::Soft::from_i128_r(kind.operand_value(x), rm))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isqrt_is_exact_on_squares_and_flags_the_rest() {
        assert_eq!(isqrt(0), (0, false));
        assert_eq!(isqrt(1 << 126), (1 << 63, false));
        assert_eq!(isqrt(99), (9, true));
        assert_eq!(isqrt(u128::MAX), (u64::MAX as u128, true));
    }

    #[test]
    fn sqrt_of_subnormals_and_exact_squares() {
        let rne = Round::NearestTiesToEven;
        // sqrt(2^-1074) = 2^-537
        let r = sqrt::<F64>(1, rne);
        assert_eq!(f64::from_bits(r.bits), 2f64.powi(-537));
        assert_eq!(r.flags, 0);
        let r = sqrt::<F32>(9f32.to_bits() as u64, rne);
        assert_eq!((r.bits, r.flags), (3f32.to_bits() as u64, 0));
        let r = sqrt::<F32>(2f32.to_bits() as u64, rne);
        assert_eq!((r.bits, r.flags), (2f32.sqrt().to_bits() as u64, NX));
    }

    #[test]
    fn tininess_is_detected_after_rounding() {
        // a * b = 2^-126 * (1 - 4_500_000 * 2^-47): rounded to the subnormal grid it is
        // 2^-126, but rounded with an unbounded exponent it stays below 2^-126, so it is
        // tiny (Berkeley SoftFloat agrees: UF and NX). Rounding up, it is not tiny.
        let a = 0x3f7f_f448; // 1 - 3000 * 2^-24
        let b = 0x0080_05dc; // 2^-126 * (1 + 1500 * 2^-23)
        let min_normal = 0x0080_0000;
        let r = arith::<F32>(Arith::Mul, a, b, 0, Round::NearestTiesToEven);
        assert_eq!((r.bits, r.flags), (min_normal, UF | NX));
        let r = arith::<F32>(Arith::Mul, a, b, 0, Round::TowardPositive);
        assert_eq!((r.bits, r.flags), (min_normal, NX));
        let r = arith::<F32>(Arith::Mul, a, b, 0, Round::TowardNegative);
        assert_eq!((r.bits, r.flags), (0x007f_ffff, UF | NX));
    }
}
