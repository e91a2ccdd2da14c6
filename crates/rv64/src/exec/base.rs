//! RV64I: integer computation, loads, stores, control transfer, fences.

use super::sext32;
use crate::bus::Bus;
use crate::decode::{BaseOp, Insn};
use crate::hart::Hart;
use crate::trap::Exception;

impl Hart {
    #[inline]
    pub(crate) fn exec_base(&mut self, bus: &mut impl Bus, op: BaseOp, i: &Insn, pc: u64) -> Result<(), Exception> {
        use BaseOp::*;
        let a = self.x(i.rs1);
        let b = self.x(i.rs2);
        let imm = i.imm as i64 as u64;
        let rd = i.rd;
        let v = match op {
            Lui => imm,
            Auipc => pc.wrapping_add(imm),
            Jal => {
                self.next_pc = pc.wrapping_add(imm);
                pc.wrapping_add(i.len as u64)
            }
            Jalr => {
                self.next_pc = a.wrapping_add(imm) & !1;
                pc.wrapping_add(i.len as u64)
            }
            Beq | Bne | Blt | Bge | Bltu | Bgeu => {
                let taken = match op {
                    Beq => a == b,
                    Bne => a != b,
                    Blt => (a as i64) < (b as i64),
                    Bge => (a as i64) >= (b as i64),
                    Bltu => a < b,
                    _ => a >= b,
                };
                if taken {
                    self.next_pc = pc.wrapping_add(imm);
                }
                return Ok(());
            }
            Lb => self.load(bus, a.wrapping_add(imm), 1)? as i8 as i64 as u64,
            Lh => self.load(bus, a.wrapping_add(imm), 2)? as i16 as i64 as u64,
            Lw => self.load(bus, a.wrapping_add(imm), 4)? as i32 as i64 as u64,
            Ld => self.load(bus, a.wrapping_add(imm), 8)?,
            Lbu => self.load(bus, a.wrapping_add(imm), 1)?,
            Lhu => self.load(bus, a.wrapping_add(imm), 2)?,
            Lwu => self.load(bus, a.wrapping_add(imm), 4)?,
            Sb | Sh | Sw | Sd => {
                let n = match op {
                    Sb => 1,
                    Sh => 2,
                    Sw => 4,
                    _ => 8,
                };
                return self.store(bus, a.wrapping_add(imm), n, b);
            }
            Addi => a.wrapping_add(imm),
            Slti => ((a as i64) < (imm as i64)) as u64,
            Sltiu => (a < imm) as u64,
            Xori => a ^ imm,
            Ori => a | imm,
            Andi => a & imm,
            Slli => a << (imm & 63),
            Srli => a >> (imm & 63),
            Srai => ((a as i64) >> (imm & 63)) as u64,
            Add => a.wrapping_add(b),
            Sub => a.wrapping_sub(b),
            Sll => a << (b & 63),
            Slt => ((a as i64) < (b as i64)) as u64,
            Sltu => (a < b) as u64,
            Xor => a ^ b,
            Srl => a >> (b & 63),
            Sra => ((a as i64) >> (b & 63)) as u64,
            Or => a | b,
            And => a & b,
            Addiw => sext32(a.wrapping_add(imm)),
            Slliw => sext32(((a as u32) << (imm & 31)) as u64),
            Srliw => sext32(((a as u32) >> (imm & 31)) as u64),
            Sraiw => ((a as i32) >> (imm & 31)) as i64 as u64,
            Addw => sext32(a.wrapping_add(b)),
            Subw => sext32(a.wrapping_sub(b)),
            Sllw => sext32(((a as u32) << (b & 31)) as u64),
            Srlw => sext32(((a as u32) >> (b & 31)) as u64),
            Sraw => ((a as i32) >> (b & 31)) as i64 as u64,
            // One hart and no caches: memory is always coherent, and the decode cache
            // is checked against the raw instruction bits, so fences have nothing to do.
            Fence | FenceI => return Ok(()),
        };
        self.set_x(rd, v);
        Ok(())
    }
}
