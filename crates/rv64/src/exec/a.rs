//! The A extension: LR/SC and the AMOs. One hart, so aq/rl need nothing; a
//! reservation is broken by any SC and by traps.

use crate::bus::Bus;
use crate::decode::{AmoOp, Insn};
use crate::hart::Hart;
use crate::trap::Exception;

impl Hart {
    pub(crate) fn exec_amo(&mut self, bus: &mut impl Bus, op: AmoOp, i: &Insn) -> Result<(), Exception> {
        use AmoOp::*;
        let addr = self.x(i.rs1);
        let src = self.x(i.rs2);
        let word = matches!(op, LrW | ScW | SwapW | AddW | XorW | AndW | OrW | MinW | MaxW | MinuW | MaxuW);
        let n = if word { 4 } else { 8 };
        let sext = |v: u64| if word { v as i32 as i64 as u64 } else { v };
        match op {
            LrW | LrD => {
                if !addr.is_multiple_of(n as u64) {
                    return Err(Exception::LoadMisaligned(addr));
                }
                let v = self.load(bus, addr, n)?;
                self.state.reservation = Some(addr);
                self.set_x(i.rd, sext(v));
                return Ok(());
            }
            ScW | ScD => {
                self.check_amo_address(bus, addr, n)?;
                let ok = self.state.reservation.take() == Some(addr);
                if ok {
                    self.store(bus, addr, n, src)?;
                }
                self.set_x(i.rd, (!ok) as u64);
                return Ok(());
            }
            _ => {}
        }
        self.check_amo_address(bus, addr, n)?;
        let old = self.load(bus, addr, n).map_err(|e| match e {
            Exception::LoadAccessFault(a) => Exception::StoreAccessFault(a),
            Exception::LoadPageFault(a) => Exception::StorePageFault(a),
            other => other,
        })?;
        let old_s = sext(old);
        let src_s = sext(src);
        let new = match op {
            SwapW | SwapD => src,
            AddW | AddD => old.wrapping_add(src),
            XorW | XorD => old ^ src,
            AndW | AndD => old & src,
            OrW | OrD => old | src,
            MinW | MinD => (old_s as i64).min(src_s as i64) as u64,
            MaxW | MaxD => (old_s as i64).max(src_s as i64) as u64,
            MinuW | MinuD => {
                if word {
                    (old as u32).min(src as u32) as u64
                } else {
                    old.min(src)
                }
            }
            MaxuW | MaxuD => {
                if word {
                    (old as u32).max(src as u32) as u64
                } else {
                    old.max(src)
                }
            }
            LrW | LrD | ScW | ScD => unreachable!("handled above"),
        };
        self.store(bus, addr, n, new)?;
        self.set_x(i.rd, old_s);
        Ok(())
    }
}
