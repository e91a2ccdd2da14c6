//! Zicsr: atomic read-modify-write of CSRs. A CSRRS/CSRRC with rs1 = x0 (or a zero
//! immediate) does not write, so it may read read-only CSRs.

use crate::csr::MIP;
use crate::decode::{CsrOp, Insn};
use crate::hart::Hart;
use crate::trap::{Exception, Interrupt};

const SEIP: u64 = Interrupt::SupervisorExternal.bit();

impl Hart {
    pub(crate) fn exec_csr(&mut self, op: CsrOp, i: &Insn, raw: u32) -> Result<(), Exception> {
        use CsrOp::*;
        let csr = (i.imm as u32 & 0xfff) as u16;
        let operand = match op {
            Rw | Rs | Rc => self.x(i.rs1),
            Rwi | Rsi | Rci => i.rs1 as u64,
        };
        let writes = match op {
            Rw | Rwi => true,
            Rs | Rc | Rsi | Rci => i.rs1 != 0,
        };
        // CSRRW with rd = x0 must not read (no read side effects); ours have none, but
        // the access check still applies.
        let old = self.csr_read(csr, writes, raw)?;
        if writes {
            // Only the software-writable SEIP bit takes part in a read-modify-write of
            // mip; the interrupt controller's line is ORed in for reading only.
            let base = if csr == MIP { (old & !SEIP) | (self.state.mip & SEIP) } else { old };
            let new = match op {
                Rw | Rwi => operand,
                Rs | Rsi => base | operand,
                Rc | Rci => base & !operand,
            };
            self.csr_write(csr, new, raw)?;
            self.irq_dirty = true;
        }
        self.set_x(i.rd, old);
        Ok(())
    }
}
