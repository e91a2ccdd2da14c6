//! The operations that need no rounding, on raw bits: sign injection, minimum and
//! maximum (IEEE 754-2019 minimumNumber/maximumNumber), comparisons and fclass.

use super::format::Format;
use super::soft::{Rounded, NV};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SignInjection {
    /// fsgnj: the sign of b.
    Copy,
    /// fsgnjn: the opposite of b's sign.
    Negate,
    /// fsgnjx: the sign of a xor the sign of b.
    Xor,
}

pub(super) fn sign_inject<F: Format>(a: u64, b: u64, how: SignInjection) -> u64 {
    let magnitude = a & !F::SIGN;
    let sign = match how {
        SignInjection::Copy => b & F::SIGN,
        SignInjection::Negate => !b & F::SIGN,
        SignInjection::Xor => (a ^ b) & F::SIGN,
    };
    magnitude | sign
}

/// A key that orders non-NaN values numerically, with -0 == +0.
fn numeric_key<F: Format>(bits: u64) -> i64 {
    let magnitude = (bits & !F::SIGN) as i64;
    if F::is_negative(bits) {
        -magnitude
    } else {
        magnitude
    }
}

/// fmin/fmax: a NaN operand gives way to the other; two NaNs give the canonical NaN;
/// -0 is below +0; a signaling NaN raises NV.
pub(super) fn min_max<F: Format>(a: u64, b: u64, max: bool) -> Rounded {
    let flags = if F::is_signaling_nan(a) || F::is_signaling_nan(b) { NV } else { 0 };
    let bits = match (F::is_nan(a), F::is_nan(b)) {
        (true, true) => F::CANONICAL_NAN,
        (true, false) => b,
        (false, true) => a,
        (false, false) => {
            let (ka, kb) = (numeric_key::<F>(a), numeric_key::<F>(b));
            if ka == kb {
                // Equal values are bitwise equal, except for zeros of opposite signs.
                if max {
                    a & b
                } else {
                    a | b
                }
            } else if (ka < kb) != max {
                a
            } else {
                b
            }
        }
    };
    Rounded { bits, flags }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Comparison {
    /// feq: quiet, NV only for a signaling NaN.
    Eq,
    /// flt: signaling, NV for any NaN.
    Lt,
    /// fle: signaling, NV for any NaN.
    Le,
}

/// Returns the integer result (0 or 1) and the flags.
pub(super) fn compare<F: Format>(a: u64, b: u64, how: Comparison) -> (u64, u64) {
    if F::is_nan(a) || F::is_nan(b) {
        let signaling = F::is_signaling_nan(a) || F::is_signaling_nan(b);
        let flags = if how != Comparison::Eq || signaling { NV } else { 0 };
        return (0, flags);
    }
    let (ka, kb) = (numeric_key::<F>(a), numeric_key::<F>(b));
    let result = match how {
        Comparison::Eq => ka == kb,
        Comparison::Lt => ka < kb,
        Comparison::Le => ka <= kb,
    };
    (result as u64, 0)
}

/// fclass: exactly one of ten bits.
pub(super) fn classify<F: Format>(a: u64) -> u64 {
    let negative = F::is_negative(a);
    let exp = F::exp_field(a);
    let bit = if F::is_nan(a) {
        if F::is_signaling_nan(a) {
            8
        } else {
            9
        }
    } else if exp == F::EXP_MAX {
        if negative {
            0
        } else {
            7
        }
    } else if exp != 0 {
        if negative {
            1
        } else {
            6
        }
    } else if F::frac(a) != 0 {
        if negative {
            2
        } else {
            5
        }
    } else if negative {
        3
    } else {
        4
    };
    1 << bit
}
