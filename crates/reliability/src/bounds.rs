//! Lower bounds from the paper: how reliable the hypervisor (R_V) or a function moved into it
//! (R_F) must be, and how many replicas (n) reach a target. Each bound on a reliability is
//! computed as the largest tolerable *unreliability*, from forms without cancellation, so that
//! "R_V must exceed 0.999999999" keeps its digits and "no R_V < 1 works" is decided exactly.

use serde::Serialize;

use crate::error::Result;
use crate::models::{self, check_count, k_of_n_identical};
use crate::prob::{ln_1m_exp, ln_add, ln_pow, Reliability};

/// What a component's reliability must be for a configuration to pay off.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Threshold {
    /// Any value strictly above `min` works (its unreliability strictly below `min`'s Q).
    Above { min: Reliability },
    /// Any value at or above `min` works.
    AtLeast { min: Reliability },
    /// No value below 1 works: the bound is 1 or more, and the comparison is strict.
    Unreachable,
}

/// The smallest n of parallel VMs that reaches a target, or why none does.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ReplicaBound {
    /// n VMs reach the target and n − 1 do not.
    Reaches { n: u64 },
    /// The formula asks for more VMs than a u64 holds (R_M is tiny); `approx` is its value.
    Astronomical { approx: f64 },
    /// Even infinitely many VMs cannot: the target is at or above R_H · R_V, or R_M = 0.
    Unreachable { ceiling: Reliability },
}

/// Model 2's condition: n parallel VMs beat the non-virtualized node (R_H cancels) when
/// R_V · (1 − (1 − R_M)^n) > R_M, i.e. R_V > R_M / (1 − (1 − R_M)^n).
///
/// Computed as the largest tolerable hypervisor unreliability
/// Q_V < (Q_M − Q_M^n) / (1 − Q_M^n), which is exactly 0 for n = 1 (so no R_V < 1 helps a
/// single VM), for R_M = 1 (nothing beats a perfect VM) and for R_M = 0 (both fail surely).
pub fn min_rv_parallel(m: Reliability, n: u64) -> Result<Threshold> {
    check_count(n, "n (the number of VMs)")?;
    let ln_q = m.ln_q();
    if ln_q == 0.0 || ln_q == f64::NEG_INFINITY {
        return Ok(Threshold::Unreachable);
    }
    // Q_M − Q_M^n = Q_M (1 − Q_M^(n−1)),  1 − Q_M^n  (both ≥ 0)
    let ln_num = ln_q + ln_1m_exp(ln_pow(ln_q, n - 1));
    let ln_den = ln_1m_exp(ln_pow(ln_q, n));
    Ok(strict(ln_num - ln_den))
}

/// Model 4's condition: k-of-n voting beats the non-virtualized node when
/// R_V > R_M / Σ_{i=k..n} C(n, i) R_M^i (1 − R_M)^(n−i); for 2-of-3, R_V > 1 / (3R_M − 2R_M²).
///
/// The tolerable Q_V is (Q_M − Q_kofn) / R_kofn. For a majority (2k > n) and R_M ≤ 0.5 no
/// R_V < 1 works: the k-of-n reliability function crosses the diagonal only once in (0, 1)
/// (Moore and Shannon, 1956), and at R_M = 0.5 it is P(Bin(n, ½) ≥ k) ≤ ½, so it lies at or
/// below R_M on all of [0, 0.5]. That is decided before any rounding can blur the tie.
pub fn min_rv_vote(m: Reliability, k: u64, n: u64) -> Result<Threshold> {
    let voted = k_of_n_identical(m, k, n)?;
    if 2 * u128::from(k) > u128::from(n) && m.r() <= 0.5 {
        return Ok(Threshold::Unreachable);
    }
    if (k, n) == (2, 3) {
        // (2R − 1)(1 − R) / (R (3 − 2R)) with 2R − 1 = 1 − 2Q and 3 − 2R = 1 + 2Q.
        let q = m.q();
        let ln_qv = (-2.0 * q).ln_1p() + m.ln_q() - m.ln_r() - (2.0 * q).ln_1p();
        return Ok(strict(ln_qv));
    }
    if voted.ln_q() >= m.ln_q() {
        return Ok(Threshold::Unreachable);
    }
    let ln_num = m.ln_q() + ln_1m_exp(voted.ln_q() - m.ln_q());
    Ok(strict(ln_num - voted.ln_r()))
}

/// Model 3's condition: moving f into the hypervisor as F is at least as reliable when
/// R_F ≥ (1 − (1 − R_f·R_M′)^n) / (1 − (1 − R_M′)^n).
///
/// With A = 1 − R_f·R_M′ (a VM with f fails) and B = 1 − R_M′ (one without f fails), the
/// tolerable Q_F is (A^n − B^n) / (1 − B^n), computed as A^n (1 − (B/A)^n) / (1 − B^n).
pub fn min_rf(f_guest: Reliability, rest: Reliability, n: u64) -> Result<Threshold> {
    check_count(n, "n (the number of VMs)")?;
    let ln_b = rest.ln_q();
    if ln_b == 0.0 {
        // M′ never works: both placements fail surely, whatever F is.
        return Ok(Threshold::AtLeast { min: Reliability::FAILED });
    }
    let ln_a = ln_add(f_guest.ln_q(), f_guest.ln_r() + rest.ln_q());
    if ln_b >= ln_a {
        // f is perfect (A = B): only a perfect F is as good.
        return Ok(Threshold::AtLeast { min: Reliability::PERFECT });
    }
    let ln_num = ln_pow(ln_a, n) + ln_1m_exp(ln_pow(ln_b - ln_a, n));
    let ln_den = ln_1m_exp(ln_pow(ln_b, n));
    Ok(Threshold::AtLeast { min: Reliability::from_ln_q((ln_num - ln_den).min(0.0)) })
}

/// The largest n accepted before the answer is reported as astronomical.
const MAX_REPLICAS: f64 = 1e18;

/// Model 2's replica count: the least n with R_H · R_V · (1 − (1 − R_M)^n) ≥ R, from
/// n ≥ log(1 − R / (R_H·R_V)) / log(1 − R_M); unreachable when R ≥ R_H·R_V (unless R_M = 1).
///
/// 1 − R/(R_H·R_V) is computed as (Q − Q_HV) / R_HV from the unreliabilities, and the rounded
/// n is then checked against the model itself, so that n − 1 falls short and n reaches R.
pub fn min_replicas(h: Reliability, v: Reliability, m: Reliability, target: Reliability) -> Result<ReplicaBound> {
    let ceiling = models::non_virtualized(h, v);
    if m.ln_q() == f64::NEG_INFINITY || target.ln_r() == f64::NEG_INFINITY {
        // A perfect VM, or a target of 0: one VM is as good as any number.
        return Ok(if ceiling.at_least(target) {
            ReplicaBound::Reaches { n: 1 }
        } else {
            ReplicaBound::Unreachable { ceiling }
        });
    }
    if ceiling.ln_q() >= target.ln_q() || m.ln_q() == 0.0 {
        return Ok(ReplicaBound::Unreachable { ceiling });
    }
    let ln_gap = target.ln_q() + ln_1m_exp(ceiling.ln_q() - target.ln_q()) - ceiling.ln_r();
    let exact = ln_gap / m.ln_q();
    if exact.is_nan() || exact >= MAX_REPLICAS {
        return Ok(ReplicaBound::Astronomical { approx: exact });
    }
    let mut n = (exact.ceil() as u64).max(1);
    // The division and ceil can land one off an integer; the model decides.
    while !models::parallel(h, v, m, n)?.at_least(target) {
        n += 1;
    }
    while n > 1 && models::parallel(h, v, m, n - 1)?.at_least(target) {
        n -= 1;
    }
    Ok(ReplicaBound::Reaches { n })
}

/// A strict threshold from the log of the largest tolerable unreliability.
fn strict(ln_q_max: f64) -> Threshold {
    if ln_q_max.is_nan() || ln_q_max == f64::NEG_INFINITY {
        Threshold::Unreachable
    } else {
        Threshold::Above { min: Reliability::from_ln_q(ln_q_max.min(0.0)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(r: f64) -> Reliability {
        Reliability::from_r(r).unwrap()
    }

    fn min_of(t: Threshold) -> f64 {
        match t {
            Threshold::Above { min } | Threshold::AtLeast { min } => min.r(),
            Threshold::Unreachable => f64::INFINITY,
        }
    }

    #[test]
    fn one_vm_never_helps() {
        for r in [0.0, 1e-9, 0.3, 0.5, 0.9, 0.999_999, 1.0] {
            assert_eq!(min_rv_parallel(p(r), 1).unwrap(), Threshold::Unreachable, "R_M = {r}");
        }
    }

    #[test]
    fn rv_bound_matches_the_paper_formula() {
        for (r, n) in [(0.9f64, 2u64), (0.5, 3), (0.99, 5)] {
            let want = r / (1.0 - (1.0 - r).powi(n as i32));
            assert!((min_of(min_rv_parallel(p(r), n).unwrap()) - want).abs() < 1e-15);
        }
    }

    #[test]
    fn rv_bound_is_the_break_even_point() {
        let (m, n) = (p(0.9), 3);
        let Threshold::Above { min } = min_rv_parallel(m, n).unwrap() else { panic!("reachable") };
        let h = Reliability::PERFECT;
        let at = models::parallel(h, min, m, n).unwrap();
        assert!((at.r() - 0.9).abs() < 1e-15);
    }

    #[test]
    fn voting_never_helps_at_or_below_one_half() {
        for r in [0.0, 0.1, 0.3, 0.49, 0.5] {
            assert_eq!(min_rv_vote(p(r), 2, 3).unwrap(), Threshold::Unreachable, "2-of-3, R_M = {r}");
            assert_eq!(min_rv_vote(p(r), 3, 5).unwrap(), Threshold::Unreachable, "3-of-5, R_M = {r}");
        }
    }

    #[test]
    fn voting_bound_2of3_matches_the_paper_formula() {
        for r in [0.51, 0.6, 0.75, 0.9, 0.999] {
            let want = 1.0 / (3.0 * r - 2.0 * r * r);
            assert!((min_of(min_rv_vote(p(r), 2, 3).unwrap()) - want).abs() < 1e-14, "R_M = {r}");
        }
    }

    #[test]
    fn voting_bound_general_matches_direct_division() {
        for r in [0.55, 0.8, 0.95] {
            let voted = k_of_n_identical(p(r), 3, 5).unwrap().r();
            assert!((min_of(min_rv_vote(p(r), 3, 5).unwrap()) - r / voted).abs() < 1e-14);
        }
    }

    #[test]
    fn perfect_vm_cannot_be_beaten_by_voting() {
        assert_eq!(min_rv_vote(p(1.0), 2, 3).unwrap(), Threshold::Unreachable);
        assert_eq!(min_rv_vote(p(1.0), 3, 5).unwrap(), Threshold::Unreachable);
    }

    #[test]
    fn rf_bound_matches_the_paper_formula() {
        let (rf, rest, n) = (0.95f64, 0.9f64, 3);
        let want = (1.0 - (1.0 - rf * rest).powi(n)) / (1.0 - (1.0 - rest).powi(n));
        let got = min_of(min_rf(p(rf), p(rest), n as u64).unwrap());
        assert!((got - want).abs() < 1e-15, "{got} vs {want}");
    }

    #[test]
    fn rf_bound_edges() {
        assert_eq!(min_rf(p(1.0), p(0.9), 2).unwrap(), Threshold::AtLeast { min: Reliability::PERFECT });
        assert_eq!(min_rf(p(0.9), p(0.0), 2).unwrap(), Threshold::AtLeast { min: Reliability::FAILED });
    }

    #[test]
    fn replica_bound_is_tight() {
        let (h, v, m, target) = (p(0.9999), p(0.99999), p(0.9), p(0.9995));
        let ReplicaBound::Reaches { n } = min_replicas(h, v, m, target).unwrap() else { panic!("reachable") };
        assert_eq!(n, 4);
        assert!(models::parallel(h, v, m, n).unwrap().at_least(target));
        assert!(!models::parallel(h, v, m, n - 1).unwrap().at_least(target));
    }

    #[test]
    fn replica_bound_matches_the_paper_formula() {
        let (rh, rv, rm, r) = (0.999f64, 0.9999f64, 0.7f64, 0.998f64);
        let want = ((1.0 - r / (rh * rv)).ln() / (1.0 - rm).ln()).ceil() as u64;
        let got = min_replicas(p(rh), p(rv), p(rm), p(r)).unwrap();
        assert_eq!(got, ReplicaBound::Reaches { n: want });
    }

    #[test]
    fn replica_bound_is_unreachable_above_the_ceiling() {
        let got = min_replicas(p(0.999), p(0.999), p(0.9), p(0.9985)).unwrap();
        assert!(matches!(got, ReplicaBound::Unreachable { .. }));
        let zero_vm = min_replicas(p(1.0), p(1.0), p(0.0), p(0.5)).unwrap();
        assert!(matches!(zero_vm, ReplicaBound::Unreachable { .. }));
    }

    #[test]
    fn replica_bound_edges() {
        assert_eq!(min_replicas(p(1.0), p(1.0), p(1.0), p(1.0)).unwrap(), ReplicaBound::Reaches { n: 1 });
        assert_eq!(min_replicas(p(0.9), p(0.9), p(0.5), p(0.0)).unwrap(), ReplicaBound::Reaches { n: 1 });
        let tiny = min_replicas(p(1.0), p(1.0), p(1e-30), p(0.5)).unwrap();
        assert!(matches!(tiny, ReplicaBound::Astronomical { .. }), "{tiny:?}");
    }

    #[test]
    fn replica_bound_reaches_twelve_nines() {
        // 0.1^11 = 1e-11 falls short of Q = 2e-12; 0.1^12 reaches it.
        let target = Reliability::from_q(2e-12).unwrap();
        let got = min_replicas(Reliability::PERFECT, Reliability::PERFECT, p(0.9), target).unwrap();
        assert_eq!(got, ReplicaBound::Reaches { n: 12 });
    }
}
