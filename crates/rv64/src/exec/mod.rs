//! Execution: one file per ISA extension. Each takes a decoded [`Insn`], updates the
//! hart, and sets `next_pc` for control transfers.

mod a;
mod base;
mod fp;
mod m;
mod system;
mod zicsr;

use crate::bus::Bus;
use crate::decode::{Insn, Op};
use crate::hart::{Hart, StepEnd};
use crate::trap::Exception;

impl Hart {
    #[inline]
    pub(crate) fn execute(&mut self, bus: &mut impl Bus, insn: &Insn, raw: u32, pc: u64) -> Result<(), StepEnd> {
        match insn.op {
            Op::Base(op) => self.exec_base(bus, op, insn, pc).map_err(StepEnd::Trap),
            Op::Mul(op) => {
                self.exec_mul(op, insn);
                Ok(())
            }
            Op::Amo(op) => self.exec_amo(bus, op, insn).map_err(StepEnd::Trap),
            Op::Csr(op) => self.exec_csr(op, insn, raw).map_err(StepEnd::Trap),
            Op::Sys(op) => self.exec_system(op, insn, raw),
            Op::Fp(op) => self.exec_fp(bus, op, insn, raw).map_err(StepEnd::Trap),
            Op::Illegal => Err(StepEnd::Trap(Exception::IllegalInstruction(raw as u64))),
        }
    }

    #[inline]
    pub(crate) fn x(&self, r: u8) -> u64 {
        self.state.x[r as usize]
    }

    /// Write an integer register (x0 is re-zeroed after every instruction).
    #[inline]
    pub(crate) fn set_x(&mut self, r: u8, v: u64) {
        self.state.x[r as usize] = v;
    }
}

#[inline]
pub(crate) fn sext32(v: u64) -> u64 {
    v as i32 as i64 as u64
}
