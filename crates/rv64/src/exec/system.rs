//! Privileged instructions: ecall, ebreak, mret, sret, wfi, sfence.vma.

use crate::csr::*;
use crate::decode::{Insn, SysOp};
use crate::hart::{Hart, PrivMode, StepEnd};
use crate::trap::Exception;

impl Hart {
    pub(crate) fn exec_system(&mut self, op: SysOp, _i: &Insn, raw: u32) -> Result<(), StepEnd> {
        let illegal = StepEnd::Trap(Exception::IllegalInstruction(raw as u64));
        let privilege = self.state.privilege;
        match op {
            SysOp::Ecall => {
                return Err(StepEnd::Trap(match privilege {
                    PrivMode::User => Exception::EcallFromU,
                    PrivMode::Supervisor if self.config.sbi_in_monitor => return Err(StepEnd::Sbi),
                    PrivMode::Supervisor => Exception::EcallFromS,
                    PrivMode::Machine => Exception::EcallFromM,
                }));
            }
            SysOp::Ebreak => return Err(StepEnd::Trap(Exception::Breakpoint(self.state.pc))),
            SysOp::Mret => {
                if privilege != PrivMode::Machine {
                    return Err(illegal);
                }
                let s = &mut self.state;
                let mpp = PrivMode::from_bits((s.mstatus & MSTATUS_MPP) >> MSTATUS_MPP_SHIFT);
                let mpie = s.mstatus & MSTATUS_MPIE != 0;
                s.mstatus &= !(MSTATUS_MIE | MSTATUS_MPP);
                s.mstatus |= MSTATUS_MPIE | if mpie { MSTATUS_MIE } else { 0 };
                if mpp != PrivMode::Machine {
                    s.mstatus &= !MSTATUS_MPRV;
                }
                s.privilege = mpp;
                self.next_pc = s.mepc;
                self.irq_dirty = true;
            }
            SysOp::Sret => {
                if privilege == PrivMode::User
                    || (privilege == PrivMode::Supervisor && self.state.mstatus & MSTATUS_TSR != 0)
                {
                    return Err(illegal);
                }
                let s = &mut self.state;
                let spp = if s.mstatus & MSTATUS_SPP != 0 { PrivMode::Supervisor } else { PrivMode::User };
                let spie = s.mstatus & MSTATUS_SPIE != 0;
                s.mstatus &= !(MSTATUS_SIE | MSTATUS_SPP | MSTATUS_MPRV);
                s.mstatus |= MSTATUS_SPIE | if spie { MSTATUS_SIE } else { 0 };
                s.privilege = spp;
                self.next_pc = s.sepc;
                self.irq_dirty = true;
            }
            SysOp::Wfi => {
                if privilege == PrivMode::User
                    || (privilege == PrivMode::Supervisor && self.state.mstatus & MSTATUS_TW != 0)
                {
                    return Err(illegal);
                }
                self.state.wfi = true;
                self.irq_dirty = true;
            }
            SysOp::SfenceVma => {
                if privilege == PrivMode::User
                    || (privilege == PrivMode::Supervisor && self.state.mstatus & MSTATUS_TVM != 0)
                {
                    return Err(illegal);
                }
                self.flush_tlb();
            }
        }
        Ok(())
    }
}
