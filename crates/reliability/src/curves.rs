//! The data of the paper's figures, as plain numbers (drawing is in `plot`, behind the `plot`
//! feature): the least R_V against R_M for several n, the least n against R_M, and the
//! break-even R_V of voting.

use serde::Serialize;

use crate::bounds::{min_replicas, min_rv_parallel, min_rv_vote, ReplicaBound, Threshold};
use crate::error::{ModelError, Result};
use crate::prob::Reliability;

/// The most points per curve.
pub const MAX_POINTS: usize = 10_000;
/// The most curves per figure.
pub const MAX_CURVES: usize = 16;

/// One labelled line, possibly broken where it is undefined.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Curve {
    pub label: String,
    /// Unbroken runs of (x, y) points.
    pub segments: Vec<Vec<(f64, f64)>>,
}

/// Everything a figure shows.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Figure {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub x_range: (f64, f64),
    pub y_range: (f64, f64),
    pub curves: Vec<Curve>,
    /// Where the legend goes: the corner the curves leave free.
    pub legend: Corner,
}

/// A corner of the plotting area.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Corner {
    UpperRight,
    LowerRight,
}

/// Evenly spaced R_M values from `lo` to `hi` inclusive.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Grid {
    pub lo: f64,
    pub hi: f64,
    pub points: usize,
}

impl Grid {
    /// Checks 0 ≤ lo < hi ≤ 1 and 2 ≤ points ≤ [`MAX_POINTS`].
    pub fn new(lo: f64, hi: f64, points: usize) -> Result<Grid> {
        Reliability::from_r(lo)?;
        Reliability::from_r(hi)?;
        if lo >= hi {
            return Err(ModelError::Mismatch { what: format!("the R_M range needs min < max, got {lo} .. {hi}") });
        }
        if !(2..=MAX_POINTS).contains(&points) {
            return Err(ModelError::Mismatch {
                what: format!("points must be between 2 and {MAX_POINTS}, got {points}"),
            });
        }
        Ok(Grid { lo, hi, points })
    }

    fn values(self) -> impl Iterator<Item = f64> {
        let step = (self.hi - self.lo) / (self.points - 1) as f64;
        (0..self.points).map(move |i| if i + 1 == self.points { self.hi } else { self.lo + step * i as f64 })
    }
}

fn check_curves(count: usize) -> Result<()> {
    if count == 0 {
        return Err(ModelError::ZeroCount { what: "the number of curves" });
    }
    if count > MAX_CURVES {
        return Err(ModelError::TooLarge { what: "the number of curves", value: count as u64, max: MAX_CURVES as u64 });
    }
    Ok(())
}

/// The least R_V for which n parallel VMs beat one non-virtualized VM, against R_M; drawn at 1
/// where no R_V < 1 works (n = 1 everywhere).
pub fn min_rv_figure(ns: &[u64], grid: Grid) -> Result<Figure> {
    check_curves(ns.len())?;
    let curves = ns
        .iter()
        .map(|&n| {
            let points = grid
                .values()
                .map(|rm| Ok((rm, threshold_y(min_rv_parallel(Reliability::from_r(rm)?, n)?))))
                .collect::<Result<Vec<_>>>()?;
            let label = if n == 1 { "n = 1 (never helps)".to_string() } else { format!("n = {n}") };
            Ok(Curve { label, segments: vec![points] })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Figure {
        title: "Least hypervisor reliability for n VMs to beat one bare VM".into(),
        x_label: "R_M (reliability of one VM's software stack)".into(),
        y_label: "least R_V".into(),
        x_range: (grid.lo, grid.hi),
        y_range: y_span(&curves, 0.0),
        curves,
        legend: Corner::LowerRight,
    })
}

/// The least number of parallel VMs that reaches each target node reliability, against R_M;
/// broken where no n reaches it.
pub fn min_n_figure(h: Reliability, v: Reliability, targets: &[Reliability], grid: Grid) -> Result<Figure> {
    check_curves(targets.len())?;
    let mut curves = Vec::new();
    for &target in targets {
        let mut segments: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
        for rm in grid.values() {
            match min_replicas(h, v, Reliability::from_r(rm)?, target)? {
                ReplicaBound::Reaches { n } => push_point(&mut segments, (rm, n as f64)),
                _ => segments.push(Vec::new()),
            }
        }
        segments.retain(|s| !s.is_empty());
        curves.push(Curve { label: format!("R = {}", target.display_r()), segments });
    }
    let top = curves.iter().flat_map(|c| c.segments.iter().flatten()).map(|p| p.1).fold(1.0, f64::max);
    Ok(Figure {
        title: format!("Least number of VMs to reach R (R_H = {}, R_V = {})", h.display_r(), v.display_r()),
        x_label: "R_M (reliability of one VM's software stack)".into(),
        y_label: "least n".into(),
        x_range: (grid.lo, grid.hi),
        y_range: (0.0, top.ceil() + 1.0),
        curves,
        legend: Corner::UpperRight,
    })
}

/// A step function drawn as a staircase: a new level starts at the x where it changes.
fn push_point(segments: &mut [Vec<(f64, f64)>], point: (f64, f64)) {
    if let Some(run) = segments.last_mut() {
        if let Some(&(_, y_prev)) = run.last() {
            if y_prev != point.1 {
                run.push((point.0, y_prev));
            }
        }
        run.push(point);
    }
}

/// The break-even R_V of k-of-n voting against R_M: voting beats one bare VM above the curve;
/// drawn at 1 where no R_V < 1 works (R_M ≤ 0.5 for a majority).
pub fn vote_figure(votes: &[(u64, u64)], grid: Grid) -> Result<Figure> {
    check_curves(votes.len())?;
    let curves = votes
        .iter()
        .map(|&(k, n)| {
            let points = grid
                .values()
                .map(|rm| Ok((rm, threshold_y(min_rv_vote(Reliability::from_r(rm)?, k, n)?))))
                .collect::<Result<Vec<_>>>()?;
            Ok(Curve { label: format!("{k}-of-{n} voting"), segments: vec![points] })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Figure {
        title: "Break-even hypervisor reliability for voting in the monitor".into(),
        x_label: "R_M (reliability of one VM's software stack)".into(),
        y_label: "least R_V".into(),
        x_range: (grid.lo, grid.hi),
        y_range: y_span(&curves, 0.0),
        curves,
        legend: Corner::LowerRight,
    })
}

fn threshold_y(t: Threshold) -> f64 {
    match t {
        Threshold::Above { min } | Threshold::AtLeast { min } => min.r(),
        Threshold::Unreachable => 1.0,
    }
}

/// The y range of a reliability: from a little below the lowest point (rounded down to a
/// tenth) to a little above 1, so that a curve at 1 ("no R_V < 1 works") stays visible.
fn y_span(curves: &[Curve], floor: f64) -> (f64, f64) {
    let lowest = curves.iter().flat_map(|c| c.segments.iter().flatten()).map(|p| p.1).fold(1.0, f64::min);
    (((lowest - 0.02) * 10.0).floor().max(floor * 10.0) / 10.0, 1.02)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_checks_its_range() {
        assert!(Grid::new(0.5, 0.4, 10).is_err());
        assert!(Grid::new(0.1, 1.1, 10).is_err());
        assert!(Grid::new(0.1, 0.9, 1).is_err());
        let g = Grid::new(0.0, 1.0, 5).unwrap();
        assert_eq!(g.values().collect::<Vec<_>>(), vec![0.0, 0.25, 0.5, 0.75, 1.0]);
    }

    #[test]
    fn n_one_is_flat_at_one() {
        let fig = min_rv_figure(&[1, 3], Grid::new(0.1, 0.9, 9).unwrap()).unwrap();
        assert!(fig.curves[0].segments[0].iter().all(|p| p.1 == 1.0));
        assert!(fig.curves[1].segments[0].iter().all(|p| p.1 < 1.0));
    }

    #[test]
    fn min_n_is_a_non_increasing_staircase() {
        let fig = min_n_figure(
            Reliability::PERFECT,
            Reliability::from_r(0.99999).unwrap(),
            &[Reliability::from_r(0.9999).unwrap()],
            Grid::new(0.5, 0.99, 50).unwrap(),
        )
        .unwrap();
        let pts = &fig.curves[0].segments[0];
        assert!(pts.windows(2).all(|w| w[1].1 <= w[0].1 && w[1].0 >= w[0].0));
    }

    #[test]
    fn unreachable_targets_leave_no_segment() {
        let fig = min_n_figure(
            Reliability::from_r(0.99).unwrap(),
            Reliability::PERFECT,
            &[Reliability::from_r(0.999).unwrap()],
            Grid::new(0.5, 0.99, 10).unwrap(),
        )
        .unwrap();
        assert!(fig.curves[0].segments.is_empty());
    }

    #[test]
    fn vote_figure_has_its_dip_at_three_quarters() {
        let fig = vote_figure(&[(2, 3)], Grid::new(0.5, 1.0, 101).unwrap()).unwrap();
        let lowest = fig.curves[0].segments[0].iter().copied().fold((0.0, 2.0), |a, p| if p.1 < a.1 { p } else { a });
        assert!((lowest.0 - 0.75).abs() < 1e-9 && (lowest.1 - 1.0 / 1.125).abs() < 1e-12, "{lowest:?}");
    }
}
