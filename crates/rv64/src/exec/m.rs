//! The M extension: multiplication and division, with the spec's results for
//! division by zero (quotient all ones, remainder the dividend) and signed overflow
//! (quotient the dividend, remainder zero) — no exceptions.

use super::sext32;
use crate::decode::{Insn, MulOp};
use crate::hart::Hart;

impl Hart {
    /// Inlined with a constant `op` into each arm of the dispatch.
    #[inline(always)]
    pub(crate) fn exec_mul(&mut self, op: MulOp, i: &Insn) {
        use MulOp::*;
        let a = self.x(i.rs1);
        let b = self.x(i.rs2);
        let v = match op {
            Mul => a.wrapping_mul(b),
            Mulh => (((a as i64 as i128) * (b as i64 as i128)) >> 64) as u64,
            Mulhsu => (((a as i64 as i128) * (b as u128 as i128)) >> 64) as u64,
            Mulhu => (((a as u128) * (b as u128)) >> 64) as u64,
            Div => match (a as i64, b as i64) {
                (_, 0) => u64::MAX,
                (i64::MIN, -1) => a,
                (x, y) => (x / y) as u64,
            },
            Divu => a.checked_div(b).unwrap_or(u64::MAX),
            Rem => match (a as i64, b as i64) {
                (_, 0) => a,
                (i64::MIN, -1) => 0,
                (x, y) => (x % y) as u64,
            },
            Remu => a.checked_rem(b).unwrap_or(a),
            Mulw => sext32(a.wrapping_mul(b)),
            Divw => match (a as i32, b as i32) {
                (_, 0) => u64::MAX,
                (i32::MIN, -1) => sext32(a),
                (x, y) => (x / y) as i64 as u64,
            },
            Divuw => match (a as u32).checked_div(b as u32) {
                Some(q) => sext32(q as u64),
                None => u64::MAX,
            },
            Remw => match (a as i32, b as i32) {
                (_, 0) => sext32(a),
                (i32::MIN, -1) => 0,
                (x, y) => (x % y) as i64 as u64,
            },
            Remuw => match (a as u32).checked_rem(b as u32) {
                Some(r) => sext32(r as u64),
                None => sext32(a),
            },
        };
        self.set_x(i.rd, v);
    }
}
