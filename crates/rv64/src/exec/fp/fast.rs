//! The fast path: round-to-nearest-even arithmetic computed with host floats, taken
//! only when error-free transformations prove the flags. It covers finite operands
//! whose result is normal and clear of the underflow boundary (so NX is the only
//! possible flag, and exactly decidable); anything else returns `None` and goes to
//! the soft-float path. Host floats never leak a NaN: such cases are refused.

use super::format::{Format, HostFloat};
use super::soft::{Arith, Rounded, NX};

/// The unbiased exponent of a normal value.
fn exponent<F: Format>(bits: u64) -> i32 {
    F::exp_field(bits) as i32 - F::BIAS
}

fn is_normal<F: Format>(bits: u64) -> bool {
    let e = F::exp_field(bits);
    e != 0 && e != F::EXP_MAX
}

fn is_finite<F: Format>(bits: u64) -> bool {
    F::exp_field(bits) != F::EXP_MAX
}

/// A result the fast path may return: normal and at least 2^(emin+1) in magnitude,
/// so it is neither tiny nor the rounded-up ±2^emin that may hide tininess. (A
/// finite result of round-to-nearest never overflowed.)
fn is_clear_result<F: Format>(bits: u64) -> bool {
    F::exp_field(bits) >= 2 && is_finite::<F>(bits)
}

/// Below 2^(emax-1): sums of a few such values cannot overflow.
fn is_far_from_overflow<F: Format>(bits: u64) -> bool {
    F::exp_field(bits) <= F::EXP_MAX - 3
}

/// The exponents of a product's (or quotient check's) factors are large enough that
/// the exact residual, a multiple of the product of their ulps, is at least the
/// smallest subnormal: a nonzero residual cannot round to zero.
fn residual_representable<F: Format>(e1: i32, e2: i32) -> bool {
    e1 + e2 >= F::EMIN + F::PRECISION - 1
}

/// Knuth's TwoSum: s + err == a + b exactly (for any order of magnitudes).
fn two_sum<H: HostFloat>(a: H, b: H) -> (H, H) {
    let s = a + b;
    let bb = s - a;
    let err = (a - (s - bb)) + (b - bb);
    (s, err)
}

/// Whether four values sum to exactly zero: Shewchuk's Grow-Expansion makes them a
/// nonoverlapping expansion, which is zero only if every component is.
fn sum_is_zero<H: HostFloat>(terms: [H; 4]) -> bool {
    let mut expansion = [H::ZERO; 4];
    for (n, &term) in terms.iter().enumerate() {
        let mut q = term;
        for component in expansion.iter_mut().take(n) {
            let (s, err) = two_sum(q, *component);
            *component = err;
            q = s;
        }
        expansion[n] = q;
    }
    expansion.iter().all(|&v| v == H::ZERO)
}

/// `a op b` (op c) rounded to nearest even, when the host can prove the flags.
pub(super) fn arith<F: Format>(op: Arith, a: u64, b: u64, c: u64) -> Option<Rounded> {
    let (x, y, z) = (F::Host::from_raw(a), F::Host::from_raw(b), F::Host::from_raw(c));
    let (result, inexact) = match op {
        Arith::Add | Arith::Sub => {
            if !is_finite::<F>(a) || !is_finite::<F>(b) {
                return None;
            }
            let y = if op == Arith::Sub { -y } else { y };
            let (s, err) = two_sum(x, y);
            (s, err != F::Host::ZERO)
        }
        Arith::Mul => {
            if !is_normal::<F>(a)
                || !is_normal::<F>(b)
                || !residual_representable::<F>(exponent::<F>(a), exponent::<F>(b))
            {
                return None;
            }
            let p = x * y;
            (p, x.fused(y, -p) != F::Host::ZERO)
        }
        Arith::Div => {
            if !is_normal::<F>(a) || !is_normal::<F>(b) {
                return None;
            }
            let q = x / y;
            let q_bits = q.to_raw();
            if !is_clear_result::<F>(q_bits) || !residual_representable::<F>(exponent::<F>(q_bits), exponent::<F>(b)) {
                return None;
            }
            (q, q.fused(y, -x) != F::Host::ZERO)
        }
        Arith::Sqrt => {
            if !is_normal::<F>(a) || F::is_negative(a) {
                return None;
            }
            let r = x.square_root();
            let e = exponent::<F>(r.to_raw());
            if !residual_representable::<F>(e, e) {
                return None;
            }
            (r, r.fused(r, -x) != F::Host::ZERO)
        }
        Arith::MulAdd => return mul_add::<F>(a, b, c, x, y, z),
    };
    finish::<F>(result, inexact)
}

fn mul_add<F: Format>(a: u64, b: u64, c: u64, x: F::Host, y: F::Host, z: F::Host) -> Option<Rounded> {
    if !is_normal::<F>(a) || !is_normal::<F>(b) || !is_normal::<F>(c) {
        return None;
    }
    if !residual_representable::<F>(exponent::<F>(a), exponent::<F>(b)) {
        return None;
    }
    let p = x * y;
    let r = x.fused(y, z);
    let bounded = [p.to_raw(), c, r.to_raw()].into_iter().all(is_far_from_overflow::<F>);
    if !bounded || !is_clear_result::<F>(r.to_raw()) {
        return None;
    }
    // a*b == p + p_err exactly, so a*b + c - r == p + c - r + p_err.
    let p_err = x.fused(y, -p);
    finish::<F>(r, !sum_is_zero([p, z, -r, p_err]))
}

fn finish<F: Format>(result: F::Host, inexact: bool) -> Option<Rounded> {
    let bits = result.to_raw();
    is_clear_result::<F>(bits).then_some(Rounded { bits, flags: if inexact { NX } else { 0 } })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::fp::format::{F32, F64};
    use crate::exec::fp::soft;
    use rustc_apfloat::Round;

    /// xorshift64*: a fixed sequence, so a failure names its inputs.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    /// Operands that stress the fast path's edges: values near 1 (exact and
    /// near-exact results), near the underflow and overflow ends, and random bits.
    fn operand<F: Format>(rng: &mut Rng) -> u64 {
        let r = rng.next();
        let frac = r & ((1 << F::FRAC_BITS) - 1);
        let sign = if r >> 63 != 0 { F::SIGN } else { 0 };
        let exp = match (r >> 60) & 7 {
            0 => 1 + (r >> 40) % 4,
            1 => F::EXP_MAX - 1 - (r >> 40) % 4,
            2..=4 => F::BIAS as u64 - 2 + (r >> 40) % 4,
            _ => (r >> 40) % F::EXP_MAX,
        };
        let frac = if (r >> 56) & 3 == 0 { frac & !0xffff } else { frac };
        sign | (exp << F::FRAC_BITS) | frac
    }

    fn agrees_with_soft_float<F: Format>(seed: u64) {
        let mut rng = Rng(seed);
        let mut fast_hits = 0;
        for _ in 0..50_000 {
            let [a, b, c] = [0; 3].map(|_| operand::<F>(&mut rng));
            for op in [Arith::Add, Arith::Sub, Arith::Mul, Arith::Div, Arith::Sqrt, Arith::MulAdd] {
                if let Some(fast) = arith::<F>(op, a, b, c) {
                    fast_hits += 1;
                    let exact = soft::arith::<F>(op, a, b, c, Round::NearestTiesToEven);
                    assert_eq!(fast, exact, "{op:?} {a:#x} {b:#x} {c:#x} (seed {seed})");
                }
            }
        }
        // About 70% of these operands take the fast path; most of the rest are NaN, infinite
        // or meant to land near the ends of the range.
        assert!(fast_hits > 150_000, "the fast path should take most cases, took {fast_hits} of 300000");
    }

    #[test]
    fn fast_path_agrees_with_soft_float_single() {
        agrees_with_soft_float::<F32>(0x5eed_0001);
    }

    #[test]
    fn fast_path_agrees_with_soft_float_double() {
        agrees_with_soft_float::<F64>(0x5eed_0002);
    }

    #[test]
    fn fused_multiply_add_inexactness_is_exact() {
        // (1 + 2^-52) * (1 - 2^-52) - 1 = -2^-104: exact in a fused operation.
        let a = 1f64 + f64::EPSILON;
        let b = 1f64 - f64::EPSILON;
        let r = mul_add::<F64>(a.to_bits(), b.to_bits(), (-1f64).to_bits(), a, b, -1.0);
        // The result is tiny-ish but normal: the fast path keeps it and says exact.
        assert_eq!(r, Some(Rounded { bits: (-(2f64.powi(-104))).to_bits(), flags: 0 }));
    }
}
