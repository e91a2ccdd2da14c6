//! Execution: one file per ISA extension. Each takes a decoded instruction, updates the
//! hart, and says how control goes on ([`Flow`]). [`Hart::exec_op`] is the one
//! dispatch over the flat [`Kind`] of a decoded instruction.

mod a;
mod base;
mod fp;
mod m;
mod system;
mod zicsr;

use crate::block::MicroOp;
use crate::bus::Bus;
use crate::decode::{with_flat_ops, BaseOp, Kind, MulOp, Op};
use crate::hart::{Hart, StepEnd};
use crate::trap::Exception;

/// How execution goes on after an instruction that did not trap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    /// With the next instruction in sequence; nothing but registers changed.
    Next,
    /// At `Hart::next_pc`: a taken branch or a jump.
    Jump,
    /// At `Hart::next_pc`, once the run loop has looked at the hart again: after a CSR
    /// or privileged instruction, which may change privilege, translation, interrupt
    /// enables or timers.
    Leave,
    /// With the next instruction in sequence, once the caller has checked what a memory
    /// access may have changed: interrupt lines, a stop request, the code being run.
    Check,
    /// Not at all: the instruction did not retire (a trap, or an SBI call), and
    /// `Hart::step_end` says why.
    End,
}

macro_rules! define_exec_op {
    (base: [$($b:ident),*], mul: [$($m:ident),*]) => {
        impl Hart {
            /// Execute one decoded instruction at `pc`; `next_pc` must hold the address
            /// of the next instruction in sequence. Every base and M operation is its
            /// own arm, specialised by inlining its extension's code with a constant
            /// operation.
            #[inline(always)]
            pub(crate) fn exec_op(&mut self, bus: &mut impl Bus, op: &MicroOp, pc: u64) -> Flow {
                let insn = &op.insn;
                match op.kind {
                    Kind::Nop => Flow::Next,
                    $(Kind::$b => match self.exec_base(bus, BaseOp::$b, insn, pc) {
                        Ok(flow) => flow,
                        Err(e) => self.end_step(StepEnd::Trap(e)),
                    },)*
                    $(Kind::$m => {
                        self.exec_mul(MulOp::$m, insn);
                        Flow::Next
                    })*
                    Kind::Amo | Kind::Csr | Kind::Sys | Kind::Fp | Kind::Illegal => self.exec_rare(bus, op, pc),
                }
            }
        }
    };
}
with_flat_ops!(define_exec_op);

impl Hart {
    /// Record why the current instruction does not retire.
    #[cold]
    fn end_step(&mut self, end: StepEnd) -> Flow {
        self.step_end = Some(end);
        Flow::End
    }

    /// The extensions that dispatch a second time on the decoded operation.
    #[inline(never)]
    fn exec_rare(&mut self, bus: &mut impl Bus, op: &MicroOp, pc: u64) -> Flow {
        match self.exec_rare_op(bus, op, pc) {
            Ok(flow) => flow,
            Err(end) => self.end_step(end),
        }
    }

    #[inline(always)]
    fn exec_rare_op(&mut self, bus: &mut impl Bus, op: &MicroOp, pc: u64) -> Result<Flow, StepEnd> {
        let (insn, raw) = (&op.insn, op.raw);
        self.next_pc = pc.wrapping_add(insn.len as u64);
        match insn.op {
            Op::Amo(amo) => self.exec_amo(bus, amo, insn).map_err(StepEnd::Trap).map(|()| Flow::Check),
            Op::Fp(fp) => self.exec_fp(bus, fp, insn, raw).map_err(StepEnd::Trap).map(|()| Flow::Check),
            Op::Csr(csr) => self.exec_csr(csr, insn, raw).map_err(StepEnd::Trap).map(|()| Flow::Leave),
            Op::Sys(sys) => {
                // ebreak reports its own address.
                self.state.pc = pc;
                self.exec_system(sys, insn, raw).map(|()| Flow::Leave)
            }
            Op::Base(_) | Op::Mul(_) | Op::Illegal => Err(StepEnd::Trap(Exception::IllegalInstruction(raw as u64))),
        }
    }

    #[inline(always)]
    pub(crate) fn x(&self, r: u8) -> u64 {
        self.state.x[r as usize & 31]
    }

    /// Write an integer register. A write to x0 lands, and is undone before the next
    /// instruction reads registers (see `Hart::retire`); operations that only compute
    /// into rd never write x0 at all (they decode to [`Kind::Nop`]).
    #[inline(always)]
    pub(crate) fn set_x(&mut self, r: u8, v: u64) {
        self.state.x[r as usize & 31] = v;
    }
}

#[inline]
pub(crate) fn sext32(v: u64) -> u64 {
    v as i32 as i64 as u64
}
