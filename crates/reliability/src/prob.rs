//! `Reliability`: a probability that keeps its complement exactly.
//!
//! A node with unreliability 1e-12 has reliability 0.999999999999, and `1.0 - r` in `f64`
//! recovers only 4 significant digits of the 1e-12; after a few hundred parallel replicas the
//! unreliability (1 − R_M)^n is below the smallest `f64` (about 1e-308) and becomes 0. So every
//! value is stored as the pair (ln R, ln(1 − R)), and each operation computes both logarithms
//! from sums of non-negative terms, never as a difference of nearly equal numbers.

use std::fmt;
use std::str::FromStr;

use serde::ser::{Serialize, SerializeStruct, Serializer};

use crate::error::{ModelError, Result};

/// A probability of working, R, together with its complement Q = 1 − R (the unreliability),
/// both held as natural logarithms so that neither loses precision or underflows.
///
/// Invariant: `ln_r` and `ln_q` are in [−∞, 0], never NaN, and exp(ln_r) + exp(ln_q) = 1 up to
/// rounding.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reliability {
    ln_r: f64,
    ln_q: f64,
}

impl Reliability {
    /// A block that never fails (R = 1).
    pub const PERFECT: Reliability = Reliability { ln_r: 0.0, ln_q: f64::NEG_INFINITY };
    /// A block that always fails (R = 0).
    pub const FAILED: Reliability = Reliability { ln_r: f64::NEG_INFINITY, ln_q: 0.0 };

    /// From a reliability R in [0, 1].
    pub fn from_r(r: f64) -> Result<Self> {
        check_unit(r)?;
        Ok(Self { ln_r: r.ln(), ln_q: (-r).ln_1p() })
    }

    /// From an unreliability Q = 1 − R in [0, 1]; use this when R is close to 1.
    pub fn from_q(q: f64) -> Result<Self> {
        check_unit(q)?;
        Ok(Self { ln_r: (-q).ln_1p(), ln_q: q.ln() })
    }

    /// From the two logarithms as an operation computed them.
    ///
    /// The smaller of R and Q was summed from small non-negative terms and has full relative
    /// precision. The larger, near 1, may have come from a sum of terms close to 1, whose log
    /// is then only accurate to an absolute ~1e-16: useless once Q itself is 1e-11 and later
    /// operations derive 1 − R from it. So the larger is re-derived from the smaller.
    pub(crate) fn from_logs(ln_r: f64, ln_q: f64) -> Self {
        debug_assert!(!ln_r.is_nan() && !ln_q.is_nan(), "NaN log: {ln_r} {ln_q}");
        // Rounding may push a log a hair above 0; a probability never exceeds 1.
        let (ln_r, ln_q) = (ln_r.min(0.0), ln_q.min(0.0));
        if ln_q < ln_r {
            Self { ln_r: ln_1m_exp(ln_q), ln_q }
        } else {
            Self { ln_r, ln_q: ln_1m_exp(ln_r) }
        }
    }

    /// From ln Q alone (ln R is derived accurately from it).
    pub(crate) fn from_ln_q(ln_q: f64) -> Self {
        let ln_q = ln_q.min(0.0);
        Self { ln_r: ln_1m_exp(ln_q), ln_q }
    }

    /// R, the probability of working.
    pub fn r(self) -> f64 {
        self.ln_r.exp()
    }

    /// Q = 1 − R, the unreliability, accurate even when R rounds to 1. It is 0 only when Q is
    /// below about 1e-308; [`Reliability::log10_q`] still holds its size then.
    pub fn q(self) -> f64 {
        self.ln_q.exp()
    }

    /// ln R.
    pub fn ln_r(self) -> f64 {
        self.ln_r
    }

    /// ln Q.
    pub fn ln_q(self) -> f64 {
        self.ln_q
    }

    /// log10 Q, finite for any Q > 0 however small (−∞ when Q = 0).
    pub fn log10_q(self) -> f64 {
        self.ln_q / std::f64::consts::LN_10
    }

    /// The "number of nines", −log10 Q (e.g. 3 for R = 0.999).
    pub fn nines(self) -> f64 {
        -self.log10_q()
    }

    /// The complementary event: swaps R and Q.
    pub fn complement(self) -> Self {
        Self { ln_r: self.ln_q, ln_q: self.ln_r }
    }

    /// Whether this is at least as reliable as `other` (compared on the more precise side).
    pub fn at_least(self, other: Reliability) -> bool {
        if self.ln_q < -std::f64::consts::LN_2 || other.ln_q < -std::f64::consts::LN_2 {
            self.ln_q <= other.ln_q
        } else {
            self.ln_r >= other.ln_r
        }
    }

    /// R in decimal, with enough digits that the distance to 1 shows; when R rounds to 1 in
    /// `f64`, written as `1 - Q`.
    pub fn display_r(self) -> String {
        if self.ln_q == f64::NEG_INFINITY {
            return "1".to_string();
        }
        if self.ln_r == f64::NEG_INFINITY {
            return "0".to_string();
        }
        let nines = self.nines();
        // Past 12 nines, 4 digits of Q need more than the 16 that an f64 R holds.
        if nines >= 12.0 {
            return format!("1 - {}", sci(self.ln_q));
        }
        if self.r() < 1e-3 {
            return sci(self.ln_r);
        }
        // Four significant digits of Q after the leading nines.
        let digits = ((nines + 1e-9).floor() as usize + 4).clamp(4, 17);
        trim_zeros(format!("{:.*}", digits, self.r()))
    }

    /// Q in scientific notation (`1.000e-12`), exact in exponent even below 1e-308.
    pub fn display_q(self) -> String {
        sci(self.ln_q)
    }
}

/// Drops trailing zeros after a decimal point: `0.9990000` → `0.999`, `1.000` → `1`.
pub fn trim_zeros(text: String) -> String {
    if !text.contains('.') {
        return text;
    }
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Writes exp(ln_x) as `m.mmme-N`, taking the exponent from the logarithm so that numbers
/// below the `f64` range still print.
pub fn sci(ln_x: f64) -> String {
    if ln_x == f64::NEG_INFINITY {
        return "0".to_string();
    }
    let x = ln_x.exp();
    if x.is_normal() {
        return format!("{x:.3e}");
    }
    let log10 = ln_x / std::f64::consts::LN_10;
    let mut exponent = log10.floor();
    let mut mantissa = 10f64.powf(log10 - exponent);
    if mantissa >= 9.9995 {
        mantissa /= 10.0;
        exponent += 1.0;
    }
    format!("{mantissa:.3}e{exponent}")
}

impl fmt::Display for Reliability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (1 - R = {})", self.display_r(), self.display_q())
    }
}

/// Serialized as `{"reliability": R, "unreliability": Q, "log10_unreliability": log10 Q}`;
/// JSON has no −∞, so log10 of Q = 0 is written as `null`.
impl Serialize for Reliability {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("Reliability", 3)?;
        s.serialize_field("reliability", &self.r())?;
        s.serialize_field("unreliability", &self.q())?;
        let log10 = self.log10_q();
        s.serialize_field("log10_unreliability", &log10.is_finite().then_some(log10))?;
        s.end()
    }
}

/// Reads `0.999`, `1`, `0`, or `1-1e-9` (one minus an unreliability, kept exact).
impl FromStr for Reliability {
    type Err = ModelError;

    fn from_str(text: &str) -> Result<Self> {
        let trimmed = text.trim();
        let not_a_prob = || ModelError::NotAProbability { text: text.to_string() };
        if let Some(rest) = trimmed.strip_prefix('1') {
            let rest = rest.trim_start();
            if let Some(q_text) = rest.strip_prefix('-') {
                let q: f64 = q_text.trim().parse().map_err(|_| not_a_prob())?;
                return Reliability::from_q(q);
            }
        }
        let r: f64 = trimmed.parse().map_err(|_| not_a_prob())?;
        Reliability::from_r(r)
    }
}

fn check_unit(p: f64) -> Result<()> {
    if (0.0..=1.0).contains(&p) {
        Ok(())
    } else {
        Err(ModelError::ProbabilityOutOfRange { value: p })
    }
}

/// ln(e^a + e^b) without overflow or underflow; −∞ is the log of 0.
pub(crate) fn ln_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a >= b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

/// ln(1 − e^x) for x ≤ 0, accurate on both sides of x = −ln 2 (Mächler's log1mexp).
pub(crate) fn ln_1m_exp(x: f64) -> f64 {
    debug_assert!(x <= 0.0 || x.is_nan(), "ln_1m_exp({x})");
    if x > -std::f64::consts::LN_2 {
        (-x.exp_m1()).ln()
    } else {
        (-x.exp()).ln_1p()
    }
}

/// n · ln x with the convention x^0 = 1 even for x = 0 (ln x = −∞).
pub(crate) fn ln_pow(ln_x: f64, n: u64) -> f64 {
    if n == 0 {
        0.0
    } else {
        n as f64 * ln_x
    }
}

/// ln(1 − (1 − x)^c), given ln x and ln(1 − x): the probability that at least one of c
/// independent events of probability x happens. When x is below ~1e-290, ln(1 − x) has
/// rounded to 0, and 1 − (1 − x)^c = c·x to within c·x² (negligible), so that form is used.
pub(crate) fn ln_any_of(ln_x: f64, ln_1mx: f64, c: u64) -> f64 {
    if c == 0 || ln_x == f64::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    if c == 1 {
        return ln_x;
    }
    if ln_1mx > -1e-290 {
        return ln_x + (c as f64).ln();
    }
    ln_1m_exp(ln_pow(ln_1mx, c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_r_keeps_both_sides() {
        let p = Reliability::from_r(0.25).unwrap();
        assert!((p.r() - 0.25).abs() < 1e-16);
        assert!((p.q() - 0.75).abs() < 1e-16);
    }

    #[test]
    fn from_q_is_exact_near_one() {
        let p = Reliability::from_q(1e-12).unwrap();
        // Only the rounding of exp(ln Q) remains: a relative error of about |ln Q|·eps.
        assert!(((p.q() - 1e-12) / 1e-12).abs() < 1e-14);
        assert_eq!(p.display_q(), "1.000e-12");
    }

    #[test]
    fn edge_values_zero_and_one() {
        assert_eq!(Reliability::from_r(1.0).unwrap(), Reliability::PERFECT);
        assert_eq!(Reliability::from_r(0.0).unwrap(), Reliability::FAILED);
        assert_eq!(Reliability::PERFECT.q(), 0.0);
        assert_eq!(Reliability::FAILED.r(), 0.0);
        assert_eq!(Reliability::PERFECT.display_r(), "1");
        assert_eq!(Reliability::FAILED.display_r(), "0");
    }

    #[test]
    fn out_of_range_and_nan_are_rejected() {
        assert_eq!(Reliability::from_r(1.5), Err(ModelError::ProbabilityOutOfRange { value: 1.5 }));
        assert!(Reliability::from_r(-0.1).is_err());
        assert!(Reliability::from_r(f64::NAN).is_err());
        assert!(Reliability::from_q(f64::INFINITY).is_err());
    }

    #[test]
    fn parses_plain_and_one_minus_forms() {
        assert_eq!("0.9".parse::<Reliability>().unwrap(), Reliability::from_r(0.9).unwrap());
        assert_eq!("1 - 1e-9".parse::<Reliability>().unwrap(), Reliability::from_q(1e-9).unwrap());
        assert_eq!("1".parse::<Reliability>().unwrap(), Reliability::PERFECT);
        assert!(matches!("abc".parse::<Reliability>(), Err(ModelError::NotAProbability { .. })));
        assert!(matches!("1-2".parse::<Reliability>(), Err(ModelError::ProbabilityOutOfRange { .. })));
        assert!(matches!("".parse::<Reliability>(), Err(ModelError::NotAProbability { .. })));
    }

    #[test]
    fn sci_prints_below_the_f64_range() {
        let ln_x = -400.0 * std::f64::consts::LN_10;
        assert_eq!(sci(ln_x), "1.000e-400");
        assert_eq!(sci(f64::NEG_INFINITY), "0");
        assert_eq!(sci((2.5e-3f64).ln()), "2.500e-3");
    }

    #[test]
    fn display_r_shows_the_nines() {
        assert_eq!(Reliability::from_r(0.999).unwrap().display_r(), "0.999");
        assert_eq!(Reliability::from_q(2.099e-3).unwrap().display_r(), "0.997901");
        assert_eq!(Reliability::from_q(1e-20).unwrap().display_r(), "1 - 1.000e-20");
    }

    #[test]
    fn ln_add_handles_zero_terms() {
        assert_eq!(ln_add(f64::NEG_INFINITY, f64::NEG_INFINITY), f64::NEG_INFINITY);
        assert_eq!(ln_add(-1.0, f64::NEG_INFINITY), -1.0);
        assert!((ln_add(0.5f64.ln(), 0.25f64.ln()) - 0.75f64.ln()).abs() < 1e-15);
    }

    #[test]
    fn ln_1m_exp_is_accurate_near_zero_and_far() {
        assert!((ln_1m_exp(-1e-20) - (1e-20f64).ln()).abs() < 1e-12);
        assert!((ln_1m_exp(-50.0) - (-(-50.0f64).exp()).ln_1p()).abs() < 1e-30);
        assert_eq!(ln_1m_exp(0.0), f64::NEG_INFINITY);
    }

    #[test]
    fn any_of_survives_underflow_of_x() {
        // x = 1e-400 cannot be an f64; its log can.
        let ln_x = -400.0 * std::f64::consts::LN_10;
        let got = ln_any_of(ln_x, 0.0, 3);
        assert!((got - (ln_x + 3f64.ln())).abs() < 1e-12);
    }

    #[test]
    fn from_logs_rederives_the_larger_side() {
        // A log of R that is only accurate to 1e-17 absolute must not decide Q = 4.7e-11.
        let ln_q = (4.7e-11f64).ln();
        let sloppy_ln_r = -4.7e-11 * (1.0 + 1e-6);
        let p = Reliability::from_logs(sloppy_ln_r, ln_q);
        assert_eq!(p.ln_q(), ln_q);
        assert!((p.ln_r() / (-4.7e-11f64).ln_1p() - 1.0).abs() < 1e-14);
    }

    #[test]
    fn at_least_compares_near_one_exactly() {
        let a = Reliability::from_q(1e-15).unwrap();
        let b = Reliability::from_q(2e-15).unwrap();
        assert!(a.at_least(b));
        assert!(!b.at_least(a));
    }
}
