//! The F and D extensions. (Being written: until then every FP instruction raises
//! illegal-instruction, as on a hart without F/D.)

use crate::bus::Bus;
use crate::decode::{FpOp, Insn};
use crate::hart::Hart;
use crate::trap::Exception;

impl Hart {
    pub(crate) fn exec_fp(&mut self, _bus: &mut impl Bus, _op: FpOp, _i: &Insn, raw: u32) -> Result<(), Exception> {
        self.require_fp(raw)?;
        Err(Exception::IllegalInstruction(raw as u64))
    }
}
