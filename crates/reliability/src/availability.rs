//! Availability with repair and imperfect coverage (model 6), and the results file through
//! which fault-injection campaigns supply the measured coverage and recovery time.
//!
//! The node alternates between up periods (mean MTTF = 1/λ) and down periods. A failure is
//! covered with probability c and then costs the recovery time T_rec (failover, restore from a
//! checkpoint); an uncovered failure costs the repair time T_rep (a person, a reboot). By the
//! renewal-reward theorem, whatever the distributions,
//!
//! ```text
//! D = c·T_rec + (1 − c)·T_rep          mean downtime per failure
//! A = MTTF / (MTTF + D)                steady-state availability
//! U = 1 − A = D / (MTTF + D)           computed in this form, so it keeps its digits
//! downtime per year = U · 365.25 d
//! ```

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::models::{k_of_n_identical, MAX_VOTERS};
use crate::prob::Reliability;

/// Seconds in a year of 365.25 days.
pub const YEAR_S: f64 = 365.25 * 86_400.0;

/// What the availability model needs, all times in seconds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct AvailabilityInputs {
    /// Mean time to failure of the node.
    pub mttf_s: f64,
    /// The share of failures that recovery handles, in [0, 1].
    pub coverage: f64,
    /// Mean downtime of a covered failure.
    pub recovery_time_s: f64,
    /// Mean downtime of an uncovered failure; needed when coverage < 1.
    pub repair_time_s: Option<f64>,
}

/// The steady state of the alternating up/down process.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Availability {
    pub availability: f64,
    pub unavailability: f64,
    /// −log10 U.
    pub nines: f64,
    pub downtime_s_per_year: f64,
    /// The part of the yearly downtime spent recovering from covered failures.
    pub covered_downtime_s_per_year: f64,
    /// The part spent repairing uncovered failures.
    pub uncovered_downtime_s_per_year: f64,
    pub failures_per_year: f64,
}

/// Steady-state availability and yearly downtime (formulas in the module docs).
pub fn steady_state(inputs: &AvailabilityInputs) -> Result<Availability> {
    let AvailabilityInputs { mttf_s, coverage, recovery_time_s, repair_time_s } = *inputs;
    if !(mttf_s > 0.0 && mttf_s.is_finite()) {
        return Err(avail(format!("MTTF must be a positive, finite time, got {mttf_s} s")));
    }
    Reliability::from_r(coverage).map_err(|e| avail(format!("coverage: {e}")))?;
    check_time("recovery time", recovery_time_s)?;
    let repair_s = match repair_time_s {
        Some(t) => check_time("repair time", t)?,
        None if coverage < 1.0 => {
            return Err(avail(format!(
                "coverage {coverage} leaves {}% of failures uncovered: give their repair time (--repair-time, e.g. 4h)",
                crate::prob::trim_zeros(format!("{:.3}", (1.0 - coverage) * 100.0))
            )))
        }
        None => 0.0,
    };
    let covered_s = coverage * recovery_time_s;
    let uncovered_s = (1.0 - coverage) * repair_s;
    let cycle_s = mttf_s + covered_s + uncovered_s;
    let unavailability = (covered_s + uncovered_s) / cycle_s;
    Ok(Availability {
        availability: mttf_s / cycle_s,
        unavailability,
        nines: -unavailability.log10(),
        downtime_s_per_year: unavailability * YEAR_S,
        covered_downtime_s_per_year: covered_s / cycle_s * YEAR_S,
        uncovered_downtime_s_per_year: uncovered_s / cycle_s * YEAR_S,
        failures_per_year: YEAR_S / cycle_s,
    })
}

fn check_time(what: &str, t: f64) -> Result<f64> {
    if t >= 0.0 && t.is_finite() {
        Ok(t)
    } else {
        Err(avail(format!("{what} must be a finite time of 0 or more, got {t} s")))
    }
}

fn avail(message: String) -> ModelError {
    ModelError::Availability { message }
}

/// The `format` value a results file may carry.
pub const RESULTS_FORMAT: &str = "ftvm-coverage/1";

/// A fault-injection results file (JSON); see the crate README for the format. Fields other
/// than these are ignored, so campaigns may record more.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct CampaignResults {
    /// If present, must be [`RESULTS_FORMAT`].
    pub format: Option<String>,
    /// A free-form label.
    pub campaign: Option<String>,
    /// Faults injected that caused a failure of the guest or node.
    pub injected: Option<u64>,
    /// Of those, the ones recovery handled.
    pub recovered: Option<u64>,
    /// The coverage, if given directly (must agree with recovered/injected when both are given).
    pub coverage: Option<f64>,
    /// Mean time from the failure to service restored, in seconds.
    pub recovery_time_s: Option<f64>,
}

/// Coverage and recovery time as measured by a campaign.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MeasuredCoverage {
    pub campaign: Option<String>,
    /// The point estimate, if the file gives coverage or counts.
    pub coverage: Option<f64>,
    /// With counts: the one-sided Clopper–Pearson lower confidence bound on the coverage.
    pub coverage_lower_bound: Option<f64>,
    /// The confidence of that bound.
    pub confidence: f64,
    pub recovery_time_s: Option<f64>,
}

/// Reads and checks a results file.
pub fn read_results(text: &str, confidence: f64) -> Result<MeasuredCoverage> {
    let results: CampaignResults =
        serde_json::from_str(text).map_err(|e| ModelError::ResultsFile { message: e.to_string() })?;
    let bad = |message: String| ModelError::ResultsFile { message };
    if let Some(format) = results.format.as_deref().filter(|f| *f != RESULTS_FORMAT) {
        return Err(bad(format!("format is `{format}`, this version reads `{RESULTS_FORMAT}`")));
    }
    if !(confidence > 0.0 && confidence < 1.0) {
        return Err(avail(format!("confidence must be strictly between 0 and 1, got {confidence}")));
    }
    let counted = match (results.injected, results.recovered) {
        (Some(n), Some(x)) => Some(check_counts(n, x)?),
        (None, None) => None,
        _ => return Err(bad("give both `injected` and `recovered`, or neither".into())),
    };
    if let Some(c) = results.coverage {
        Reliability::from_r(c).map_err(|e| bad(format!("coverage: {e}")))?;
    }
    if let (Some(c), Some((n, x))) = (results.coverage, counted) {
        let ratio = x as f64 / n as f64;
        if (c - ratio).abs() > 1e-6 {
            return Err(bad(format!("coverage {c} disagrees with recovered/injected = {x}/{n} = {ratio}")));
        }
    }
    if let Some(t) = results.recovery_time_s {
        check_time("recovery_time_s", t).map_err(|e| bad(e.to_string()))?;
    }
    if results.coverage.is_none() && counted.is_none() && results.recovery_time_s.is_none() {
        return Err(bad("it gives neither coverage, injected/recovered counts nor recovery_time_s".into()));
    }
    let coverage = results.coverage.or(counted.map(|(n, x)| x as f64 / n as f64));
    let coverage_lower_bound = counted.map(|(n, x)| clopper_pearson_lower(x, n, confidence)).transpose()?;
    Ok(MeasuredCoverage {
        campaign: results.campaign,
        coverage,
        coverage_lower_bound,
        confidence,
        recovery_time_s: results.recovery_time_s,
    })
}

fn check_counts(injected: u64, recovered: u64) -> Result<(u64, u64)> {
    let bad = |message: String| ModelError::ResultsFile { message };
    if injected == 0 {
        return Err(bad("`injected` is 0: no fault, no coverage".into()));
    }
    if recovered > injected {
        return Err(bad(format!("`recovered` ({recovered}) exceeds `injected` ({injected})")));
    }
    if injected > MAX_VOTERS {
        return Err(ModelError::TooLarge { what: "`injected`", value: injected, max: MAX_VOTERS });
    }
    Ok((injected, recovered))
}

/// The one-sided Clopper–Pearson lower bound: the p at which seeing `successes` or more of
/// `trials` has probability 1 − confidence. The binomial tail is increasing in p, so bisection
/// finds it; it is exact (conservative), unlike the normal approximation, near coverage 1.
pub fn clopper_pearson_lower(successes: u64, trials: u64, confidence: f64) -> Result<f64> {
    if successes == 0 {
        return Ok(0.0);
    }
    let ln_alpha = (1.0 - confidence).ln();
    let (mut lo, mut hi) = (0.0f64, successes as f64 / trials as f64);
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        let tail = k_of_n_identical(Reliability::from_r(mid)?, successes, trials)?;
        if tail.ln_r() < ln_alpha {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

/// Reads a duration with its unit: `800ms`, `0.8s`, `5min`, `4h`, `2d`, `1y` (365.25 d).
/// Returns seconds.
pub fn parse_duration(text: &str) -> Result<f64> {
    let bad = || ModelError::BadQuantity {
        text: text.to_string(),
        what: "duration",
        hint: "a number and a unit: ms, s, min, h, d or y, e.g. 0.8s or 10000h",
    };
    let t = text.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).ok_or_else(bad)?;
    let (number, unit) = t.split_at(split);
    let value: f64 = number.trim().parse().map_err(|_| bad())?;
    let scale = unit_seconds(unit.trim()).ok_or_else(bad)?;
    let seconds = value * scale;
    if seconds >= 0.0 && seconds.is_finite() {
        Ok(seconds)
    } else {
        Err(bad())
    }
}

/// Reads a failure rate: `1e-4/h`, `2/y`, or `500fit` (failures per 1e9 hours). Returns
/// failures per second.
pub fn parse_rate(text: &str) -> Result<f64> {
    let bad = || ModelError::BadQuantity {
        text: text.to_string(),
        what: "failure rate",
        hint: "failures per unit time, e.g. 1e-4/h or 2/y, or in FIT, e.g. 500fit",
    };
    let t = text.trim();
    let rate = if let Some(fit) = t.strip_suffix("fit").or_else(|| t.strip_suffix("FIT")) {
        fit.trim().parse::<f64>().map_err(|_| bad())? / (1e9 * 3600.0)
    } else {
        let (number, unit) = t.split_once('/').ok_or_else(bad)?;
        let value: f64 = number.trim().parse().map_err(|_| bad())?;
        value / unit_seconds(unit.trim()).ok_or_else(bad)?
    };
    if rate > 0.0 && rate.is_finite() {
        Ok(rate)
    } else {
        Err(bad())
    }
}

fn unit_seconds(unit: &str) -> Option<f64> {
    Some(match unit {
        "ms" => 1e-3,
        "s" => 1.0,
        "min" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        "y" => YEAR_S,
        _ => return None,
    })
}

/// A duration in the unit a person would use: `31.6 ms`, `5.26 min`, `8.77 h`, `3.65 d`.
pub fn format_duration(seconds: f64) -> String {
    let (value, unit) = match seconds {
        s if s < 1.0 => (s * 1e3, "ms"),
        s if s < 120.0 => (s, "s"),
        s if s < 2.0 * 3600.0 => (s / 60.0, "min"),
        s if s < 2.0 * 86_400.0 => (s / 3600.0, "h"),
        s => (s / 86_400.0, "d"),
    };
    format!("{} {unit}", crate::prob::trim_zeros(format!("{value:.3}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(mttf_h: f64, coverage: f64, recovery_s: f64, repair_h: Option<f64>) -> AvailabilityInputs {
        AvailabilityInputs {
            mttf_s: mttf_h * 3600.0,
            coverage,
            recovery_time_s: recovery_s,
            repair_time_s: repair_h.map(|h| h * 3600.0),
        }
    }

    #[test]
    fn perfect_coverage_costs_only_recovery() {
        let a = steady_state(&inputs(1000.0, 1.0, 36.0, None)).unwrap();
        // D = 36 s, MTTF = 3.6e6 s: U = 36 / 3_600_036
        assert!((a.unavailability - 36.0 / 3_600_036.0).abs() < 1e-18);
        assert_eq!(a.uncovered_downtime_s_per_year, 0.0);
    }

    #[test]
    fn uncovered_failures_dominate() {
        let a = steady_state(&inputs(10_000.0, 0.99, 1.0, Some(4.0))).unwrap();
        let d = 0.99 * 1.0 + 0.01 * 4.0 * 3600.0;
        let u = d / (3.6e7 + d);
        assert!((a.unavailability - u).abs() < 1e-18);
        assert!((a.availability + a.unavailability - 1.0).abs() < 1e-15);
        assert!(a.uncovered_downtime_s_per_year > 100.0 * a.covered_downtime_s_per_year);
        assert!((a.downtime_s_per_year - a.covered_downtime_s_per_year - a.uncovered_downtime_s_per_year).abs() < 1e-9);
    }

    #[test]
    fn missing_repair_time_is_an_error_when_coverage_is_imperfect() {
        let err = steady_state(&inputs(1000.0, 0.97, 1.0, None)).unwrap_err().to_string();
        assert!(err.contains("--repair-time"), "{err}");
    }

    #[test]
    fn bad_inputs_are_rejected() {
        assert!(steady_state(&inputs(0.0, 1.0, 1.0, None)).is_err());
        assert!(steady_state(&inputs(1.0, 1.2, 1.0, None)).is_err());
        assert!(steady_state(&inputs(1.0, 1.0, -1.0, None)).is_err());
    }

    #[test]
    fn durations_and_rates() {
        assert_eq!(parse_duration("0.8s").unwrap(), 0.8);
        assert_eq!(parse_duration("800 ms").unwrap(), 0.8);
        assert_eq!(parse_duration("4h").unwrap(), 14_400.0);
        assert_eq!(parse_duration("1y").unwrap(), YEAR_S);
        assert!(parse_duration("4").is_err());
        assert!(parse_duration("4 weeks").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!((parse_rate("1e-4/h").unwrap() - 1e-4 / 3600.0).abs() < 1e-24);
        assert!((parse_rate("1000fit").unwrap() - 1e-6 / 3600.0).abs() < 1e-24);
        assert!(parse_rate("0/h").is_err());
        assert!(parse_rate("3").is_err());
    }

    #[test]
    fn results_file_with_counts_has_a_lower_bound() {
        let m =
            read_results(r#"{"format":"ftvm-coverage/1","injected":1000,"recovered":970,"recovery_time_s":0.8}"#, 0.95)
                .unwrap();
        assert_eq!(m.coverage, Some(0.97));
        let lower = m.coverage_lower_bound.unwrap();
        // Checked independently: bisection on Python's exact sum of math.comb terms gives
        // 0.9595277627 for P(X >= 970 | n = 1000, p) = 0.05.
        assert!((lower - 0.959_527_762_7).abs() < 1e-9, "{lower}");
        assert_eq!(m.recovery_time_s, Some(0.8));
    }

    #[test]
    fn clopper_pearson_all_successes_has_a_closed_form() {
        // x = n: the bound is (1 − confidence)^(1/n).
        let got = clopper_pearson_lower(50, 50, 0.95).unwrap();
        assert!((got - 0.05f64.powf(1.0 / 50.0)).abs() < 1e-12);
        assert_eq!(clopper_pearson_lower(0, 10, 0.95).unwrap(), 0.0);
    }

    #[test]
    fn results_file_errors() {
        let cases = [
            (r#"{"injected":10}"#, "give both"),
            (r#"{"injected":10,"recovered":11}"#, "exceeds"),
            (r#"{"injected":0,"recovered":0}"#, "no fault"),
            (r#"{"coverage":0.5,"injected":10,"recovered":9}"#, "disagrees"),
            (r#"{"coverage":1.5}"#, "outside [0, 1]"),
            (r#"{"format":"v9","coverage":0.5}"#, "format is `v9`"),
            (r#"{"campaign":"x"}"#, "neither"),
            (r#"{"coverage":"high"}"#, "invalid type"),
            (r#"{"recovery_time_s":-2}"#, "recovery_time_s"),
        ];
        for (text, want) in cases {
            let err = read_results(text, 0.95).unwrap_err().to_string();
            assert!(err.starts_with("results file: ") && err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn formats_durations() {
        assert_eq!(format_duration(0.0316), "31.6 ms");
        assert_eq!(format_duration(315.6), "5.26 min");
        assert_eq!(format_duration(3.0 * 86_400.0), "3 d");
        assert_eq!(format_duration(0.0), "0 ms");
    }
}
