//! Series/parallel/k-of-n block diagrams and their evaluation (model 5).
//!
//! A diagram is a tree. A leaf is a named block or a literal probability; every occurrence of a
//! leaf is an independent instance (two `M`s are two VMs with the same R_M, not one VM drawn
//! twice), which is what the paper's models assume.

use std::collections::BTreeMap;

use crate::error::{ModelError, Result};
use crate::prob::{ln_add, ln_any_of, Reliability};

/// The most inputs one k-of-n gate takes once copies are expanded: the evaluation is
/// O(inputs²).
pub const MAX_KOFN_INPUTS: u64 = 4096;

/// A node of a block diagram.
#[derive(Clone, Debug, PartialEq)]
pub enum Block {
    /// A named block, whose reliability comes from the environment.
    Named(String),
    /// A literal reliability written in the expression.
    Literal(Reliability),
    /// Works when every input works.
    Series(Vec<Operand>),
    /// Works when at least one input works.
    Parallel(Vec<Operand>),
    /// Works when at least `k` of the inputs work.
    KofN { k: u64, inputs: Vec<Operand> },
}

/// An input of a gate: `copies` independent instances of `block`.
#[derive(Clone, Debug, PartialEq)]
pub struct Operand {
    pub block: Block,
    pub copies: u64,
}

impl Operand {
    /// One instance of `block`.
    pub fn one(block: Block) -> Self {
        Self { block, copies: 1 }
    }
}

/// The reliabilities of named blocks.
pub type Env = BTreeMap<String, Reliability>;

impl Block {
    /// Parses an expression; see [`crate::parse`] for the grammar.
    pub fn parse(text: &str) -> Result<Block> {
        crate::parse::parse(text)
    }

    /// The reliability of the diagram, every block failing independently.
    pub fn evaluate(&self, env: &Env) -> Result<Reliability> {
        match self {
            Block::Named(name) => env.get(name).copied().ok_or_else(|| unknown(name, env)),
            Block::Literal(r) => Ok(*r),
            Block::Series(inputs) => Ok(series(&collapse(inputs, env, Gate::Series)?)),
            Block::Parallel(inputs) => Ok(series(&swap_all(&collapse(inputs, env, Gate::Parallel)?)).complement()),
            Block::KofN { k, inputs } => k_of_n(*k, inputs, env),
        }
    }

    /// Every block name the diagram refers to, each once, in order of first use.
    pub fn names(&self) -> Vec<&str> {
        let mut names = Vec::new();
        self.collect_names(&mut names);
        names
    }

    fn collect_names<'a>(&'a self, names: &mut Vec<&'a str>) {
        match self {
            Block::Named(name) => {
                if !names.contains(&name.as_str()) {
                    names.push(name);
                }
            }
            Block::Literal(_) => {}
            Block::Series(inputs) | Block::Parallel(inputs) | Block::KofN { inputs, .. } => {
                inputs.iter().for_each(|op| op.block.collect_names(names));
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Gate {
    Series,
    Parallel,
}

/// Evaluates each operand and folds its copies: c copies in series work with R^c and fail with
/// 1 − (1 − Q)^c; in parallel the roles of R and Q swap.
fn collapse(inputs: &[Operand], env: &Env, gate: Gate) -> Result<Vec<Reliability>> {
    inputs
        .iter()
        .map(|op| {
            let r = op.block.evaluate(env)?;
            let c = op.copies;
            Ok(match gate {
                Gate::Series => Reliability::from_logs(c as f64 * r.ln_r(), ln_any_of(r.ln_q(), r.ln_r(), c)),
                Gate::Parallel => Reliability::from_logs(ln_any_of(r.ln_r(), r.ln_q(), c), c as f64 * r.ln_q()),
            })
        })
        .collect()
}

fn swap_all(rs: &[Reliability]) -> Vec<Reliability> {
    rs.iter().map(|r| r.complement()).collect()
}

/// Series of independent blocks: R = Π R_i, and Q = Σ_i Q_i · Π_{j<i} R_j (the first failing
/// block is block i), a sum of non-negative terms. Parallel is its dual: swap R and Q.
fn series(rs: &[Reliability]) -> Reliability {
    let mut ln_r = 0.0;
    let mut ln_q = f64::NEG_INFINITY;
    for r in rs {
        ln_q = ln_add(ln_q, ln_r + r.ln_q());
        ln_r += r.ln_r();
    }
    Reliability::from_logs(ln_r, ln_q)
}

/// k-of-n over blocks that may differ, by dynamic programming over the number that work:
/// after each block, P(j work) = P(j work before)·Q_b + P(j − 1 work before)·R_b.
fn k_of_n(k: u64, inputs: &[Operand], env: &Env) -> Result<Reliability> {
    let n = inputs.iter().try_fold(0u64, |acc, op| acc.checked_add(op.copies)).unwrap_or(u64::MAX);
    if n > MAX_KOFN_INPUTS {
        return Err(ModelError::TooLarge { what: "the number of k-of-n inputs", value: n, max: MAX_KOFN_INPUTS });
    }
    if k == 0 || k > n {
        return Err(ModelError::KOutOfRange { k, n });
    }
    // n ≤ MAX_KOFN_INPUTS, so these fit in usize.
    let (k, n) = (k as usize, n as usize);
    let mut ln_p = vec![f64::NEG_INFINITY; n + 1];
    ln_p[0] = 0.0;
    let mut seen = 0usize;
    for op in inputs {
        let r = op.block.evaluate(env)?;
        for _ in 0..op.copies {
            seen += 1;
            for j in (1..=seen).rev() {
                ln_p[j] = ln_add(ln_p[j] + r.ln_q(), ln_p[j - 1] + r.ln_r());
            }
            ln_p[0] += r.ln_q();
        }
    }
    let ln_q = ln_p[..k].iter().fold(f64::NEG_INFINITY, |acc, &x| ln_add(acc, x));
    let ln_r = ln_p[k..].iter().fold(f64::NEG_INFINITY, |acc, &x| ln_add(acc, x));
    Ok(Reliability::from_logs(ln_r, ln_q))
}

fn unknown(name: &str, env: &Env) -> ModelError {
    let known = if env.is_empty() {
        "none; give values with --block NAME=R or a model file".to_string()
    } else {
        env.keys().map(String::as_str).collect::<Vec<_>>().join(", ")
    };
    ModelError::UnknownBlock { name: name.to_string(), known }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(r: f64) -> Reliability {
        Reliability::from_r(r).unwrap()
    }

    fn env(pairs: &[(&str, f64)]) -> Env {
        pairs.iter().map(|&(n, r)| (n.to_string(), p(r))).collect()
    }

    fn eval(expr: &str, pairs: &[(&str, f64)]) -> Reliability {
        Block::parse(expr).unwrap().evaluate(&env(pairs)).unwrap()
    }

    #[test]
    fn series_multiplies_and_parallel_complements() {
        assert!((eval("a * b", &[("a", 0.9), ("b", 0.8)]).r() - 0.72).abs() < 1e-15);
        assert!((eval("a | b", &[("a", 0.9), ("b", 0.8)]).q() - 0.02).abs() < 1e-15);
    }

    #[test]
    fn copies_equal_written_out_operands() {
        let e = [("m", 0.7)];
        let a = eval("parallel(m[3])", &e);
        let b = eval("m | m | m", &e);
        assert!((a.ln_q() - b.ln_q()).abs() < 1e-14);
        let s = eval("series(m[4])", &e);
        assert!((s.r() - 0.7f64.powi(4)).abs() < 1e-15);
    }

    #[test]
    fn k_of_n_with_different_inputs() {
        // 2-of-3 over a, b, c: ab + ac + bc − 2abc
        let (a, b, c) = (0.9, 0.8, 0.7);
        let want = a * b + a * c + b * c - 2.0 * a * b * c;
        let got = eval("kofn(2, a, b, c)", &[("a", a), ("b", b), ("c", c)]);
        assert!((got.r() - want).abs() < 1e-15);
    }

    #[test]
    fn k_of_n_extremes_are_series_and_parallel() {
        let e = [("a", 0.9), ("b", 0.6)];
        assert!((eval("kofn(1, a, b)", &e).r() - eval("a | b", &e).r()).abs() < 1e-15);
        assert!((eval("kofn(2, a, b)", &e).r() - eval("a * b", &e).r()).abs() < 1e-15);
    }

    #[test]
    fn unknown_block_is_named() {
        let err = Block::parse("H * X").unwrap().evaluate(&env(&[("H", 0.9)])).unwrap_err();
        assert_eq!(err.to_string(), "unknown block `X` (defined: H)");
    }

    #[test]
    fn k_of_n_rejects_bad_k_and_too_many_inputs() {
        let e = env(&[("m", 0.9)]);
        assert_eq!(Block::parse("kofn(4, m[3])").unwrap().evaluate(&e), Err(ModelError::KOutOfRange { k: 4, n: 3 }));
        assert!(matches!(Block::parse("kofn(1, m[5000])").unwrap().evaluate(&e), Err(ModelError::TooLarge { .. })));
    }

    #[test]
    fn huge_copy_counts_stay_finite() {
        let got = eval("parallel(m[1000000])", &[("m", 0.5)]);
        assert!((got.log10_q() - 1e6 * 0.5f64.log10()).abs() < 1e-6);
    }

    #[test]
    fn names_are_listed_once() {
        assert_eq!(Block::parse("H * V * (M | M | N)").unwrap().names(), vec!["H", "V", "M", "N"]);
    }
}
