//! Combinatorial reliability models of virtualized nodes, after Ramasamy and Schunter,
//! "Architecting Dependable Systems Using Virtualization" (IBM Zurich).
//!
//! They answer three questions a user of a fault-tolerant hypervisor asks: does adding the
//! hypervisor layer make the node more or less reliable, how many replicas are needed, and does
//! a function belong inside the guest or inside the monitor.
//!
//! # Notation and assumptions
//!
//! H is the hardware, V the hypervisor (virtual machine monitor), M one VM's software stack
//! (guest OS and application). R_X is the probability that X works for the mission (a
//! reliability, in [0, 1]) and Q_X = 1 − R_X its unreliability.
//!
//! * Blocks fail **independently**. Real replicas share bugs, inputs and environment, so
//!   common-mode failures make the true reliability lower: every figure here is an **upper
//!   bound**, and every bound on R_V, R_F or n is a **lower** bound (necessary, not sufficient).
//! * Identical replicas have the same R but fail independently of each other.
//! * The hardware and the hypervisor are single points of failure (in series).
//! * A voter or failure detector in the monitor is part of V (perfect within V's reliability).
//!
//! # Models
//!
//! 1. **Non-virtualized node** ([`models::non_virtualized`]): R = R_H · R_M.
//! 2. **n VMs in parallel on one hypervisor**, serving the same requests
//!    ([`models::parallel`], [`models::parallel_mixed`]):
//!    R = R_H · R_V · (1 − (1 − R_M)^n), or R_H · R_V · (1 − Π_i (1 − R_Mi)).
//!    * It beats the non-virtualized node when R_V · (1 − (1 − R_M)^n) > R_M, so
//!      ([`bounds::min_rv_parallel`]) R_V > R_M / (1 − (1 − R_M)^n). For n = 1 the bound is
//!      R_M / R_M = 1: **no R_V < 1 helps a single VM**.
//!    * The least n reaching a target R ([`bounds::min_replicas`]):
//!      n ≥ log(1 − R/(R_H·R_V)) / log(1 − R_M), impossible when R ≥ R_H·R_V.
//! 3. **Moving a function f into the monitor** ([`models::move_function`]): in the guest each
//!    VM is f in series with the rest M′, giving R_H·R_V·(1 − (1 − R_f·R_M′)^n); in the monitor
//!    it is one block F in series with V, giving R_H·R_V·R_F·(1 − (1 − R_M′)^n). Moving pays off
//!    ([`bounds::min_rf`]) when R_F ≥ (1 − (1 − R_f·R_M′)^n) / (1 − (1 − R_M′)^n).
//! 4. **k-of-n voting in the monitor** ([`models::vote`], [`models::vote_2of3`]):
//!    R = R_H · R_V · Σ_{i=k..n} C(n,i) R_M^i (1 − R_M)^(n−i). For 2-of-3 the sum is
//!    3R_M² − 2R_M³ and voting beats one bare VM ([`bounds::min_rv_vote`]) when
//!    R_V > 1 / (3R_M − 2R_M²); for R_M ≤ 0.5 that is ≥ 1, so **no R_V < 1 works**, and the
//!    same holds for every majority (k > n/2).
//! 5. **General block diagrams** ([`diagram::Block`], [`spec::ModelSpec`]): series `a * b`,
//!    parallel `a | b`, `series(..)`, `parallel(..)`, `kofn(k, ..)` and copies `M[n]`, over
//!    named blocks given on the command line or in a TOML/JSON file. Models 1–4 are special
//!    cases: `H * M`, `H * V * parallel(M[n])`, `H * V * parallel((f * Mr)[n])` versus
//!    `H * V * F * parallel(Mr[n])`, and `H * V * kofn(k, M[n])`; the tests check that the
//!    closed forms and the evaluator agree.
//! 6. **Availability with repair and imperfect coverage** ([`availability`]): with mean time to
//!    failure MTTF, coverage c (the share of failures recovery handles), recovery time T_rec and
//!    repair time T_rep of an uncovered failure, A = MTTF / (MTTF + c·T_rec + (1 − c)·T_rep),
//!    and the downtime per year is (1 − A) · 365.25 d. Coverage and T_rec may come from a
//!    fault-injection results file ([`availability::read_results`]).
//!
//! # Numerics
//!
//! Values are [`Reliability`]s, which hold ln R and ln(1 − R); every operation forms both from
//! sums of non-negative terms (e.g. series: Q = Σ_i Q_i Π_{j<i} R_j), using `ln_1p` and
//! `exp_m1`. So an unreliability of 1e-12 keeps all its digits, one of 1e-400 (400 parallel
//! VMs at R_M = 0.9) is still reported, and thresholds such as "n = 1 never helps" are decided
//! exactly rather than up to rounding.

pub mod availability;
pub mod bounds;
pub mod curves;
pub mod diagram;
pub mod error;
pub mod models;
pub mod parse;
#[cfg(feature = "plot")]
pub mod plot;
pub mod prob;
pub mod spec;

pub use diagram::{Block, Env};
pub use error::{ModelError, Result};
pub use prob::Reliability;
pub use spec::ModelSpec;
