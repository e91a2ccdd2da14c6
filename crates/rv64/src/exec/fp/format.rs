//! The two binary formats of F and D, seen as raw bits (held in a u64), and the types
//! that compute in each: rustc_apfloat's exact soft-float, the same precision with an
//! unbounded exponent (to detect tininess after rounding), and the host's float.

use core::ops::{Add, Div, Mul, Neg, Sub};

use rustc_apfloat::ieee::{self, IeeeFloat, Semantics};
use rustc_apfloat::{ExpInt, Float, FloatConvert};

/// An IEEE 754 binary format, with bit-level helpers. Values are raw bits in the low
/// `BITS` bits of a u64 (a single is already unboxed here).
pub(super) trait Format {
    /// Exact arithmetic in this format.
    type Soft: Float + FloatConvert<Self::Unbounded>;
    /// The same precision with a far wider exponent range: rounding there is rounding
    /// "as if the exponent range were unbounded", which defines tininess.
    type Unbounded: Float;
    /// The host type of this format, for the fast path.
    type Host: HostFloat;

    const EXP_BITS: u32;
    const FRAC_BITS: u32;
    const BITS: u32 = 1 + Self::EXP_BITS + Self::FRAC_BITS;
    /// Significand bits, including the implicit one.
    const PRECISION: i32 = Self::FRAC_BITS as i32 + 1;
    const SIGN: u64 = 1 << (Self::BITS - 1);
    const EXP_MAX: u64 = (1 << Self::EXP_BITS) - 1;
    const BIAS: i32 = (1 << (Self::EXP_BITS - 1)) - 1;
    /// The exponent of the smallest normal number.
    const EMIN: i32 = 1 - Self::BIAS;
    /// The one NaN that arithmetic produces.
    const CANONICAL_NAN: u64 = (Self::EXP_MAX << Self::FRAC_BITS) | (1 << (Self::FRAC_BITS - 1));

    /// The biased exponent field.
    fn exp_field(bits: u64) -> u64 {
        (bits >> Self::FRAC_BITS) & Self::EXP_MAX
    }

    fn frac(bits: u64) -> u64 {
        bits & ((1 << Self::FRAC_BITS) - 1)
    }

    fn is_negative(bits: u64) -> bool {
        bits & Self::SIGN != 0
    }

    fn is_nan(bits: u64) -> bool {
        Self::exp_field(bits) == Self::EXP_MAX && Self::frac(bits) != 0
    }

    fn is_signaling_nan(bits: u64) -> bool {
        Self::is_nan(bits) && bits & (1 << (Self::FRAC_BITS - 1)) == 0
    }

    fn soft(bits: u64) -> Self::Soft {
        Self::Soft::from_bits(bits as u128)
    }

    /// The operand held in a 64-bit f register (a single must be NaN-boxed, or it
    /// reads as the canonical NaN).
    fn from_register(reg: u64) -> u64;
    /// The f register value holding a result (a single is NaN-boxed).
    fn to_register(bits: u64) -> u64;
}

/// Single precision (F).
pub(super) enum F32 {}
/// Double precision (D).
pub(super) enum F64 {}

/// A single's precision with a 16-bit exponent.
pub(super) enum SingleUnboundedS {}
/// A double's precision with a 16-bit exponent.
pub(super) enum DoubleUnboundedS {}

impl Semantics for SingleUnboundedS {
    const BITS: usize = 24 + 16;
    const EXP_BITS: usize = 16;
}

impl Semantics for DoubleUnboundedS {
    const BITS: usize = 53 + 16;
    const EXP_BITS: usize = 16;
}

pub(super) type SingleUnbounded = IeeeFloat<SingleUnboundedS>;
pub(super) type DoubleUnbounded = IeeeFloat<DoubleUnboundedS>;

impl Format for F32 {
    type Soft = ieee::Single;
    type Unbounded = SingleUnbounded;
    type Host = f32;
    const EXP_BITS: u32 = 8;
    const FRAC_BITS: u32 = 23;

    fn from_register(reg: u64) -> u64 {
        if reg >> 32 == 0xffff_ffff {
            reg & 0xffff_ffff
        } else {
            Self::CANONICAL_NAN
        }
    }

    fn to_register(bits: u64) -> u64 {
        0xffff_ffff_0000_0000 | bits
    }
}

impl Format for F64 {
    type Soft = ieee::Double;
    type Unbounded = DoubleUnbounded;
    type Host = f64;
    const EXP_BITS: u32 = 11;
    const FRAC_BITS: u32 = 52;

    fn from_register(reg: u64) -> u64 {
        reg
    }

    fn to_register(bits: u64) -> u64 {
        bits
    }
}

const _: () = assert!(F32::CANONICAL_NAN == 0x7fc0_0000);
const _: () = assert!(F64::CANONICAL_NAN == 0x7ff8_0000_0000_0000);
const _: () = assert!(F32::BITS == 32 && F64::BITS == 64);
const _: () = assert!(F32::EMIN == -126 && F64::EMIN == -1022);
// The unbounded formats must keep the precision and hold every exponent that a
// product or quotient of two finite values can have.
const _: () = assert!(SingleUnboundedS::BITS - SingleUnboundedS::EXP_BITS == 24);
const _: () = assert!(DoubleUnboundedS::BITS - DoubleUnboundedS::EXP_BITS == 53);

/// `x` has an exponent below the normal range of `F` (or is zero): tiny.
pub(super) fn below_normal_range<F: Format>(x: impl Float) -> bool {
    x.is_zero() || (x.is_finite() && x.ilogb() < F::EMIN as ExpInt)
}

/// What the fast path needs of a host float type. Host arithmetic rounds to nearest
/// even and is correctly rounded (IEEE 754 on every target Rust supports).
pub(super) trait HostFloat:
    Copy
    + PartialEq
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
{
    const ZERO: Self;
    fn from_raw(bits: u64) -> Self;
    fn to_raw(self) -> u64;
    /// a * b + c with a single rounding.
    fn fused(self, b: Self, c: Self) -> Self;
    fn square_root(self) -> Self;
}

impl HostFloat for f32 {
    const ZERO: f32 = 0.0;
    fn from_raw(bits: u64) -> f32 {
        f32::from_bits(bits as u32)
    }
    fn to_raw(self) -> u64 {
        self.to_bits() as u64
    }
    fn fused(self, b: f32, c: f32) -> f32 {
        self.mul_add(b, c)
    }
    fn square_root(self) -> f32 {
        self.sqrt()
    }
}

impl HostFloat for f64 {
    const ZERO: f64 = 0.0;
    fn from_raw(bits: u64) -> f64 {
        f64::from_bits(bits)
    }
    fn to_raw(self) -> u64 {
        self.to_bits()
    }
    fn fused(self, b: f64, c: f64) -> f64 {
        self.mul_add(b, c)
    }
    fn square_root(self) -> f64 {
        self.sqrt()
    }
}
