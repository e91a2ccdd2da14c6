//! The closed forms of the paper's models (1–4 in the crate docs), each written out from its
//! formula. The general evaluator in [`crate::diagram`] computes the same numbers by walking a
//! block diagram; the tests check that the two agree.

use crate::error::{ModelError, Result};
use crate::prob::{ln_1m_exp, ln_add, ln_any_of, ln_pow, Reliability};

/// The largest n accepted by [`vote`]: its sum has n + 1 terms.
pub const MAX_VOTERS: u64 = 1_000_000;

/// Model 1, the non-virtualized node: R = R_H · R_M.
pub fn non_virtualized(h: Reliability, m: Reliability) -> Reliability {
    in_series_with_hardware(h, Reliability::PERFECT, m)
}

/// Model 2, n identical VMs in parallel on one hypervisor: R = R_H · R_V · (1 − (1 − R_M)^n).
pub fn parallel(h: Reliability, v: Reliability, m: Reliability, n: u64) -> Result<Reliability> {
    check_count(n, "n (the number of VMs)")?;
    // All n VMs fail with probability Q_M^n; at least one works with 1 − Q_M^n.
    let vms = Reliability::from_logs(ln_any_of(m.ln_r(), m.ln_q(), n), ln_pow(m.ln_q(), n));
    Ok(in_series_with_hardware(h, v, vms))
}

/// Model 2 with a different R_Mi per VM: R = R_H · R_V · (1 − Π (1 − R_Mi)).
pub fn parallel_mixed(h: Reliability, v: Reliability, ms: &[Reliability]) -> Result<Reliability> {
    if ms.is_empty() {
        return Err(ModelError::ZeroCount { what: "the number of VMs" });
    }
    let ln_all_fail: f64 = ms.iter().map(|m| m.ln_q()).sum();
    Ok(in_series_with_hardware(h, v, Reliability::from_ln_q(ln_all_fail)))
}

/// Model 3: the two placements of a function f, for n VMs.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Placement {
    /// f inside every VM: R_H · R_V · (1 − (1 − R_f · R_M′)^n).
    pub in_guest: Reliability,
    /// f moved into the hypervisor as F: R_H · R_V · R_F · (1 − (1 − R_M′)^n).
    pub in_monitor: Reliability,
}

/// Model 3, moving f out of every VM into the hypervisor: each VM is f in series with the rest
/// M′ (`rest`); in the monitor the function is one block F (`f_monitor`) in series with V.
pub fn move_function(
    h: Reliability,
    v: Reliability,
    f_guest: Reliability,
    rest: Reliability,
    f_monitor: Reliability,
    n: u64,
) -> Result<Placement> {
    let vm_with_f = non_virtualized(f_guest, rest);
    let in_guest = parallel(h, v, vm_with_f, n)?;
    let monitor = non_virtualized(v, f_monitor);
    let in_monitor = parallel(h, monitor, rest, n)?;
    Ok(Placement { in_guest, in_monitor })
}

/// Model 4, k-of-n voting in the monitor:
/// R = R_H · R_V · Σ_{i=k..n} C(n, i) R_M^i (1 − R_M)^(n−i).
pub fn vote(h: Reliability, v: Reliability, m: Reliability, k: u64, n: u64) -> Result<Reliability> {
    Ok(in_series_with_hardware(h, v, k_of_n_identical(m, k, n)?))
}

/// Model 4 for 2-of-3, in the factored form R_2of3 = R_M² (3 − 2R_M) = R_M² (1 + 2Q_M) and
/// Q_2of3 = Q_M² (1 + 2R_M), exact on both sides.
pub fn vote_2of3(h: Reliability, v: Reliability, m: Reliability) -> Reliability {
    let ln_r = 2.0 * m.ln_r() + (2.0 * m.q()).ln_1p();
    let ln_q = 2.0 * m.ln_q() + (2.0 * m.r()).ln_1p();
    in_series_with_hardware(h, v, Reliability::from_logs(ln_r, ln_q))
}

/// The probability that at least k of n identical, independent blocks work, and its
/// complement, each as a sum of binomial terms C(n, i) R^i Q^(n−i) (no cancellation).
pub fn k_of_n_identical(m: Reliability, k: u64, n: u64) -> Result<Reliability> {
    check_count(n, "n (the number of voters)")?;
    if k == 0 || k > n {
        return Err(ModelError::KOutOfRange { k, n });
    }
    if n > MAX_VOTERS {
        return Err(ModelError::TooLarge { what: "the number of voters", value: n, max: MAX_VOTERS });
    }
    let (mut ln_r, mut ln_q) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let mut ln_choose = 0.0; // ln C(n, i), updated as C(n, i+1) = C(n, i)·(n − i)/(i + 1)
    for i in 0..=n {
        let term = ln_choose + ln_pow(m.ln_r(), i) + ln_pow(m.ln_q(), n - i);
        if i >= k {
            ln_r = ln_add(ln_r, term);
        } else {
            ln_q = ln_add(ln_q, term);
        }
        ln_choose += ((n - i) as f64).ln() - ((i + 1) as f64).ln();
    }
    Ok(Reliability::from_logs(ln_r, ln_q))
}

/// H, V and a stage in series: R = R_H · R_V · R_S, and the node fails when H fails, or H works
/// and V fails, or both work and the stage fails: Q = Q_H + R_H·Q_V + R_H·R_V·Q_S.
fn in_series_with_hardware(h: Reliability, v: Reliability, stage: Reliability) -> Reliability {
    let ln_r = h.ln_r() + v.ln_r() + stage.ln_r();
    let ln_q = ln_add(ln_add(h.ln_q(), h.ln_r() + v.ln_q()), h.ln_r() + v.ln_r() + stage.ln_q());
    if ln_q == f64::NEG_INFINITY && ln_r == f64::NEG_INFINITY {
        // Unreachable for valid inputs; keep the invariant rather than return 0 + 0.
        return Reliability::from_logs(ln_r, ln_1m_exp(ln_r));
    }
    Reliability::from_logs(ln_r, ln_q)
}

pub(crate) fn check_count(n: u64, what: &'static str) -> Result<()> {
    if n == 0 {
        Err(ModelError::ZeroCount { what })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(r: f64) -> Reliability {
        Reliability::from_r(r).unwrap()
    }

    #[test]
    fn non_virtualized_multiplies() {
        let got = non_virtualized(p(0.99), p(0.9));
        assert!((got.r() - 0.891).abs() < 1e-15);
        assert!((got.q() - 0.109).abs() < 1e-15);
    }

    #[test]
    fn parallel_matches_the_paper_formula() {
        let got = parallel(p(0.999), p(0.9999), p(0.9), 3).unwrap();
        let want = 0.999 * 0.9999 * (1.0 - 0.1f64.powi(3));
        assert!((got.r() - want).abs() < 1e-15);
        assert!((got.q() - (1.0 - want)).abs() < 1e-14);
    }

    #[test]
    fn parallel_rejects_zero_vms() {
        assert_eq!(parallel(p(1.0), p(1.0), p(0.9), 0), Err(ModelError::ZeroCount { what: "n (the number of VMs)" }));
        assert!(parallel_mixed(p(1.0), p(1.0), &[]).is_err());
    }

    #[test]
    fn parallel_unreliability_survives_underflow() {
        // (1 − 0.9)^400 = 1e-400 is below f64's range; its log is not.
        let got = parallel(Reliability::PERFECT, Reliability::PERFECT, p(0.9), 400).unwrap();
        assert_eq!(got.r(), 1.0);
        assert!((got.log10_q() + 400.0).abs() < 1e-9, "{}", got.log10_q());
    }

    #[test]
    fn parallel_is_accurate_when_r_is_close_to_one() {
        let h = Reliability::from_q(1e-12).unwrap();
        let got = parallel(h, Reliability::PERFECT, p(0.5), 60).unwrap();
        // Q = 1e-12 + (1 − 1e-12)·2^-60 ≈ 1e-12 + 8.67e-19
        let want = 1e-12 + (1.0 - 1e-12) * 0.5f64.powi(60);
        assert!(((got.q() - want) / want).abs() < 1e-13, "{} vs {want}", got.q());
    }

    #[test]
    fn vote_2of3_matches_the_binomial_sum() {
        for r in [0.0, 0.1, 0.5, 0.7, 0.999, 1.0] {
            let closed = vote_2of3(p(0.99), p(0.999), p(r));
            let sum = vote(p(0.99), p(0.999), p(r), 2, 3).unwrap();
            assert!((closed.r() - sum.r()).abs() < 1e-15, "r = {r}");
            assert!((closed.q() - sum.q()).abs() < 1e-15, "r = {r}");
        }
    }

    #[test]
    fn vote_at_r_half_is_a_fair_coin() {
        let got = k_of_n_identical(p(0.5), 3, 5).unwrap();
        assert!((got.r() - 0.5).abs() < 1e-15);
    }

    #[test]
    fn vote_rejects_bad_k() {
        assert_eq!(k_of_n_identical(p(0.9), 4, 3), Err(ModelError::KOutOfRange { k: 4, n: 3 }));
        assert_eq!(k_of_n_identical(p(0.9), 0, 3), Err(ModelError::KOutOfRange { k: 0, n: 3 }));
        assert!(k_of_n_identical(p(0.9), 1, MAX_VOTERS + 1).is_err());
    }

    #[test]
    fn move_function_compares_both_placements() {
        let got = move_function(p(1.0), p(1.0), p(0.9), p(0.9), p(0.99), 2).unwrap();
        let guest = 1.0 - (1.0 - 0.81f64).powi(2);
        let monitor = 0.99 * (1.0 - 0.01);
        assert!((got.in_guest.r() - guest).abs() < 1e-15);
        assert!((got.in_monitor.r() - monitor).abs() < 1e-15);
    }
}
