//! The C extension: each 16-bit instruction expands to the 32-bit instruction it
//! stands for, which is then decoded as usual. Reserved and illegal 16-bit encodings
//! expand to `None`.

#[inline]
fn b(v: u16, hi: u32, lo: u32) -> u32 {
    ((v as u32) >> lo) & ((1u32 << (hi - lo + 1)) - 1)
}

/// Register number of the 3-bit compressed register fields (x8–x15).
fn creg(v: u32) -> u32 {
    v + 8
}

fn r_type(f7: u32, rs2: u32, rs1: u32, f3: u32, rd: u32, opcode: u32) -> u32 {
    (f7 << 25) | (rs2 << 20) | (rs1 << 15) | (f3 << 12) | (rd << 7) | opcode
}

fn i_type(imm: i32, rs1: u32, f3: u32, rd: u32, opcode: u32) -> u32 {
    (((imm as u32) & 0xfff) << 20) | (rs1 << 15) | (f3 << 12) | (rd << 7) | opcode
}

fn s_type(imm: i32, rs2: u32, rs1: u32, f3: u32, opcode: u32) -> u32 {
    let imm = imm as u32;
    (((imm >> 5) & 0x7f) << 25) | (rs2 << 20) | (rs1 << 15) | (f3 << 12) | ((imm & 0x1f) << 7) | opcode
}

fn b_type(imm: i32, rs2: u32, rs1: u32, f3: u32) -> u32 {
    let imm = imm as u32;
    (((imm >> 12) & 1) << 31)
        | (((imm >> 5) & 0x3f) << 25)
        | (rs2 << 20)
        | (rs1 << 15)
        | (f3 << 12)
        | (((imm >> 1) & 0xf) << 8)
        | (((imm >> 11) & 1) << 7)
        | 0b1100011
}

fn j_type(imm: i32, rd: u32) -> u32 {
    let imm = imm as u32;
    (((imm >> 20) & 1) << 31)
        | (((imm >> 1) & 0x3ff) << 21)
        | (((imm >> 11) & 1) << 20)
        | (((imm >> 12) & 0xff) << 12)
        | (rd << 7)
        | 0b1101111
}

fn sext(v: u32, bits: u32) -> i32 {
    ((v << (32 - bits)) as i32) >> (32 - bits)
}

const LOAD: u32 = 0b0000011;
const LOAD_FP: u32 = 0b0000111;
const STORE: u32 = 0b0100011;
const STORE_FP: u32 = 0b0100111;
const OP_IMM: u32 = 0b0010011;
const OP_IMM32: u32 = 0b0011011;
const OP: u32 = 0b0110011;
const OP32: u32 = 0b0111011;
const LUI: u32 = 0b0110111;
const JALR: u32 = 0b1100111;
const SYSTEM: u32 = 0b1110011;

/// Expand a 16-bit compressed instruction (`h & 3 != 3`) to its 32-bit equivalent.
pub fn expand(h: u16) -> Option<u32> {
    match (h & 3, b(h, 15, 13)) {
        (0, f3) => expand_q0(h, f3),
        (1, f3) => expand_q1(h, f3),
        (2, f3) => expand_q2(h, f3),
        _ => None,
    }
}

fn expand_q0(h: u16, f3: u32) -> Option<u32> {
    let rd = creg(b(h, 4, 2));
    let rs1 = creg(b(h, 9, 7));
    // offsets scaled by 4 (lw/sw) and 8 (ld/sd/fld/fsd)
    let off_w = (b(h, 5, 5) << 6) | (b(h, 12, 10) << 3) | (b(h, 6, 6) << 2);
    let off_d = (b(h, 6, 5) << 6) | (b(h, 12, 10) << 3);
    Some(match f3 {
        0 => {
            // c.addi4spn
            let imm = (b(h, 10, 7) << 6) | (b(h, 12, 11) << 4) | (b(h, 5, 5) << 3) | (b(h, 6, 6) << 2);
            if imm == 0 {
                return None; // includes the all-zero illegal instruction
            }
            i_type(imm as i32, 2, 0, rd, OP_IMM)
        }
        1 => i_type(off_d as i32, rs1, 3, rd, LOAD_FP),  // c.fld
        2 => i_type(off_w as i32, rs1, 2, rd, LOAD),     // c.lw
        3 => i_type(off_d as i32, rs1, 3, rd, LOAD),     // c.ld
        5 => s_type(off_d as i32, rd, rs1, 3, STORE_FP), // c.fsd
        6 => s_type(off_w as i32, rd, rs1, 2, STORE),    // c.sw
        7 => s_type(off_d as i32, rd, rs1, 3, STORE),    // c.sd
        _ => return None,
    })
}

fn expand_q1(h: u16, f3: u32) -> Option<u32> {
    let rd = b(h, 11, 7);
    let imm6 = sext((b(h, 12, 12) << 5) | b(h, 6, 2), 6);
    Some(match f3 {
        0 => i_type(imm6, rd, 0, rd, OP_IMM), // c.addi (c.nop when rd = 0)
        1 => {
            // c.addiw
            if rd == 0 {
                return None;
            }
            i_type(imm6, rd, 0, rd, OP_IMM32)
        }
        2 => i_type(imm6, 0, 0, rd, OP_IMM), // c.li
        3 => {
            if rd == 2 {
                // c.addi16sp
                let imm =
                    (b(h, 12, 12) << 9) | (b(h, 4, 3) << 7) | (b(h, 5, 5) << 6) | (b(h, 2, 2) << 5) | (b(h, 6, 6) << 4);
                if imm == 0 {
                    return None;
                }
                i_type(sext(imm, 10), 2, 0, 2, OP_IMM)
            } else {
                // c.lui
                if imm6 == 0 {
                    return None;
                }
                ((imm6 as u32) << 12) | (rd << 7) | LUI
            }
        }
        4 => return expand_q1_alu(h),
        5 => {
            // c.j
            let imm = (b(h, 12, 12) << 11)
                | (b(h, 8, 8) << 10)
                | (b(h, 10, 9) << 8)
                | (b(h, 6, 6) << 7)
                | (b(h, 7, 7) << 6)
                | (b(h, 2, 2) << 5)
                | (b(h, 11, 11) << 4)
                | (b(h, 5, 3) << 1);
            j_type(sext(imm, 12), 0)
        }
        6 | 7 => {
            // c.beqz / c.bnez
            let imm =
                (b(h, 12, 12) << 8) | (b(h, 6, 5) << 6) | (b(h, 2, 2) << 5) | (b(h, 11, 10) << 3) | (b(h, 4, 3) << 1);
            b_type(sext(imm, 9), 0, creg(b(h, 9, 7)), if f3 == 6 { 0 } else { 1 })
        }
        _ => unreachable!("funct3 is three bits"),
    })
}

fn expand_q1_alu(h: u16) -> Option<u32> {
    let rd = creg(b(h, 9, 7));
    let shamt = (b(h, 12, 12) << 5) | b(h, 6, 2);
    Some(match b(h, 11, 10) {
        0 => i_type(shamt as i32, rd, 5, rd, OP_IMM),           // c.srli
        1 => i_type((shamt | 0x400) as i32, rd, 5, rd, OP_IMM), // c.srai
        2 => i_type(sext((b(h, 12, 12) << 5) | b(h, 6, 2), 6), rd, 7, rd, OP_IMM), // c.andi
        _ => {
            let rs2 = creg(b(h, 4, 2));
            match (b(h, 12, 12), b(h, 6, 5)) {
                (0, 0) => r_type(0x20, rs2, rd, 0, rd, OP),   // c.sub
                (0, 1) => r_type(0, rs2, rd, 4, rd, OP),      // c.xor
                (0, 2) => r_type(0, rs2, rd, 6, rd, OP),      // c.or
                (0, 3) => r_type(0, rs2, rd, 7, rd, OP),      // c.and
                (1, 0) => r_type(0x20, rs2, rd, 0, rd, OP32), // c.subw
                (1, 1) => r_type(0, rs2, rd, 0, rd, OP32),    // c.addw
                _ => return None,
            }
        }
    })
}

fn expand_q2(h: u16, f3: u32) -> Option<u32> {
    let rd = b(h, 11, 7);
    let rs2 = b(h, 6, 2);
    let ldsp = (b(h, 4, 2) << 6) | (b(h, 12, 12) << 5) | (b(h, 6, 5) << 3);
    let lwsp = (b(h, 3, 2) << 6) | (b(h, 12, 12) << 5) | (b(h, 6, 4) << 2);
    let sdsp = (b(h, 9, 7) << 6) | (b(h, 12, 10) << 3);
    let swsp = (b(h, 8, 7) << 6) | (b(h, 12, 9) << 2);
    Some(match f3 {
        0 => i_type(((b(h, 12, 12) << 5) | rs2) as i32, rd, 1, rd, OP_IMM), // c.slli
        1 => i_type(ldsp as i32, 2, 3, rd, LOAD_FP),                        // c.fldsp
        2 => {
            if rd == 0 {
                return None;
            }
            i_type(lwsp as i32, 2, 2, rd, LOAD) // c.lwsp
        }
        3 => {
            if rd == 0 {
                return None;
            }
            i_type(ldsp as i32, 2, 3, rd, LOAD) // c.ldsp
        }
        4 => match (b(h, 12, 12), rd, rs2) {
            (0, 0, 0) => return None,
            (0, rs1, 0) => i_type(0, rs1, 0, 0, JALR),     // c.jr
            (0, rd, rs2) => r_type(0, rs2, 0, 0, rd, OP),  // c.mv
            (1, 0, 0) => 0x0010_0000 | SYSTEM,             // c.ebreak
            (1, rs1, 0) => i_type(0, rs1, 0, 1, JALR),     // c.jalr
            (1, rd, rs2) => r_type(0, rs2, rd, 0, rd, OP), // c.add
            _ => unreachable!("bit 12 is one bit"),
        },
        5 => s_type(sdsp as i32, rs2, 2, 3, STORE_FP), // c.fsdsp
        6 => s_type(swsp as i32, rs2, 2, 2, STORE),    // c.swsp
        7 => s_type(sdsp as i32, rs2, 2, 3, STORE),    // c.sdsp
        _ => unreachable!("funct3 is three bits"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_common_compressed_forms() {
        assert_eq!(expand(0x0001), Some(0x0000_0013)); // c.nop -> addi x0,x0,0
        assert_eq!(expand(0x4501), Some(0x0000_0513)); // c.li a0,0 -> addi a0,x0,0
        assert_eq!(expand(0x8082), Some(0x0000_8067)); // c.ret -> jalr x0,0(ra)
        assert_eq!(expand(0x1141), Some(0xff01_0113)); // c.addi sp,sp,-16
        assert_eq!(expand(0xe406), Some(0x0011_3423)); // c.sdsp ra,8(sp)
        assert_eq!(expand(0x60a2), Some(0x0081_3083)); // c.ldsp ra,8(sp)
        assert_eq!(expand(0x9002), Some(0x0010_0073)); // c.ebreak
    }

    #[test]
    fn reserved_compressed_forms_are_illegal() {
        assert_eq!(expand(0x0000), None); // all zeros
        assert_eq!(expand(0x6101), None); // c.addi16sp with imm 0
        assert_eq!(expand(0x8002), None); // c.jr x0
        assert_eq!(expand(0x4002), None); // c.lwsp x0
    }
}
