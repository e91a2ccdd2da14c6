//! The C extension (RV64C): every compressed instruction has exactly the effect of
//! the 32-bit instruction it expands to (checked for each bit of its scattered
//! immediate, against the expansion encoded by the test encoder), except that it is
//! two bytes long; and the reserved encodings raise illegal-instruction with the
//! 16-bit parcel in mtval.

mod common;
use common::*;

/// Registers x8-x15 (the ones compressed forms can name) and sp get distinct values;
/// DATA holds distinct doublewords.
fn prepared(start: u64) -> Machine {
    let mut m = Machine::new();
    for k in 0..512u64 {
        m.write_u64(DATA + 8 * k, 0x8123_4567_0000_0000 ^ (k * 0x0001_0203_0405_0607) ^ (k << 56));
    }
    let values = [
        0x8000_0000_0000_0000u64,
        0x7fff_ffff,
        0x1234_5678_9abc_def0,
        u64::MAX,
        5,
        0xffff_ffff_8000_0001,
        0x10,
        0x0f0f_0f0f_0f0f_0f0f,
    ];
    for (i, v) in values.into_iter().enumerate() {
        m.set_x(8 + i as u32, v);
    }
    m.set_x(SP, DATA);
    m.hart.state.pc = start;
    m
}

/// Run one compressed instruction at CODE on a prepared machine.
fn run_c(h: u16, regs: &[(u32, u64)]) -> Machine {
    let mut m = prepared(CODE);
    m.load_halves(CODE, &[h]);
    for &(r, v) in regs {
        m.set_x(r, v);
    }
    m.run(1);
    m
}

/// Run one 32-bit instruction at CODE on a prepared machine.
fn run_w(w: u32, regs: &[(u32, u64)]) -> Machine {
    let mut m = prepared(CODE);
    m.load(CODE, &[w]);
    for &(r, v) in regs {
        m.set_x(r, v);
    }
    m.run(1);
    m
}

/// A non-control-transfer compressed instruction does what its expansion does to the
/// registers and memory, and is 2 bytes long.
fn assert_same_effect(h: u16, w: u32, regs: &[(u32, u64)]) {
    let c = run_c(h, regs);
    let e = run_w(w, regs);
    assert_eq!(c.hart.state.x, e.hart.state.x, "registers: {h:#06x} vs {w:#010x}");
    assert_eq!(c.read_bytes(DATA, 4096), e.read_bytes(DATA, 4096), "memory: {h:#06x} vs {w:#010x}");
    assert_eq!((c.pc(), e.pc()), (CODE + 2, CODE + 4), "pc: {h:#06x} vs {w:#010x}");
}

/// Run one compressed control transfer placed at CODE + 0x800; return the machine.
fn jump_c(h: u16, regs: &[(u32, u64)]) -> Machine {
    let mut m = prepared(CODE + 0x800);
    m.load_halves(CODE + 0x800, &[h]);
    for &(r, v) in regs {
        m.set_x(r, v);
    }
    m.run(1);
    m
}

/// Run a 16-bit parcel expected to be illegal; it is followed by 0xffff so that a
/// 32-bit reading of it would show in mtval.
fn illegal_c(h: u16) -> Machine {
    let mut m = prepared(CODE);
    m.load_halves(CODE, &[h, 0xffff]);
    m.run(2);
    m
}

// ---------------------------------------------------------------- quadrant 0

#[test]
fn c_addi4spn_adds_a_zero_extended_scaled_immediate_to_sp() {
    for imm in [4, 8, 16, 32, 64, 128, 256, 512, 1020] {
        assert_same_effect(c_addi4spn(A0, imm), addi(A0, SP, imm as i64), &[]);
    }
    assert_eq!(run_c(c_addi4spn(S1, 1020), &[]).x(S1), DATA + 1020);
}

#[test]
fn c_lw_loads_a_sign_extended_word_at_a_zero_extended_scaled_offset() {
    for off in [0, 4, 8, 16, 32, 64, 124] {
        assert_same_effect(c_lw(A0, A5, off), lw(A0, A5, off as i64), &[(A5, DATA)]);
    }
    let m = run_c(c_lw(A0, A5, 4), &[(A5, DATA)]);
    assert_eq!(m.x(A0), m.read_u32(DATA + 4) as i32 as i64 as u64);
}

#[test]
fn c_ld_loads_a_doubleword_at_a_zero_extended_scaled_offset() {
    for off in [0, 8, 16, 32, 64, 128, 248] {
        assert_same_effect(c_ld(S0, A5, off), ld(S0, A5, off as i64), &[(A5, DATA)]);
    }
    let m = run_c(c_ld(S0, A5, 248), &[(A5, DATA)]);
    assert_eq!(m.x(S0), m.read_u64(DATA + 248));
}

#[test]
fn c_sw_stores_the_low_word_at_a_zero_extended_scaled_offset() {
    for off in [0, 4, 8, 16, 32, 64, 124] {
        assert_same_effect(c_sw(A2, A5, off), sw(A2, A5, off as i64), &[(A5, DATA)]);
    }
    let m = run_c(c_sw(A2, A5, 124), &[(A5, DATA), (A2, 0x1111_2222_3333_4444)]);
    assert_eq!(m.read_u32(DATA + 124), 0x3333_4444);
}

#[test]
fn c_sd_stores_a_doubleword_at_a_zero_extended_scaled_offset() {
    for off in [0, 8, 16, 32, 64, 128, 248] {
        assert_same_effect(c_sd(A2, A5, off), sd(A2, A5, off as i64), &[(A5, DATA)]);
    }
    let m = run_c(c_sd(A2, A5, 248), &[(A5, DATA), (A2, 0x1111_2222_3333_4444)]);
    assert_eq!(m.read_u64(DATA + 248), 0x1111_2222_3333_4444);
}

#[test]
fn c_fld_loads_a_double_into_a_float_register() {
    let mut m = prepared(CODE);
    m.hart.state.mstatus |= 1 << 13; // FS = Initial
    m.load_halves(CODE, &[c_fld(A0, A5, 136)]);
    m.set_x(A5, DATA);
    m.run(1);
    assert_eq!(m.hart.state.f[A0 as usize], m.read_u64(DATA + 136));
    assert_eq!(m.pc(), CODE + 2);
}

#[test]
fn c_fsd_stores_a_float_register() {
    let mut m = prepared(CODE);
    m.hart.state.mstatus |= 1 << 13;
    m.hart.state.f[S1 as usize] = 0x4009_21fb_5444_2d18;
    m.load_halves(CODE, &[c_fsd(S1, A5, 200)]);
    m.set_x(A5, DATA);
    m.run(1);
    assert_eq!(m.read_u64(DATA + 200), 0x4009_21fb_5444_2d18);
}

// ---------------------------------------------------------------- quadrant 1

#[test]
fn c_nop_changes_nothing_but_the_pc() {
    let before = prepared(CODE).hart.state.x;
    let m = run_c(c_nop(), &[]);
    assert_eq!(m.hart.state.x, before);
    assert_eq!(m.pc(), CODE + 2);
}

#[test]
fn c_addi_adds_a_sign_extended_6_bit_immediate() {
    for imm in [1, 2, 4, 8, 16, -32, 31, -1] {
        assert_same_effect(c_addi(T0, imm), addi(T0, T0, imm as i64), &[(T0, 100)]);
    }
    assert_eq!(run_c(c_addi(T0, -32), &[(T0, 100)]).x(T0), 68);
}

#[test]
fn c_addiw_adds_then_sign_extends_the_low_word() {
    for imm in [1, 2, 4, 8, 16, -32, 0] {
        assert_same_effect(c_addiw(A0, imm), addiw(A0, A0, imm as i64), &[(A0, 0x1234_5678_7fff_fff0)]);
    }
    assert_eq!(run_c(c_addiw(A0, 16), &[(A0, 0x7fff_fff0)]).x(A0), 0xffff_ffff_8000_0000);
    // c.addiw rd, 0 is sext.w.
    assert_eq!(run_c(c_addiw(A0, 0), &[(A0, 0x1_ffff_fffe)]).x(A0), -2i64 as u64);
}

#[test]
fn c_li_loads_a_sign_extended_6_bit_immediate() {
    for imm in [1, 2, 4, 8, 16, -32, 31] {
        assert_same_effect(c_li(T1, imm), addi(T1, ZERO, imm as i64), &[]);
    }
    assert_eq!(run_c(c_li(T1, -32), &[]).x(T1), -32i64 as u64);
}

#[test]
fn c_addi16sp_adds_a_sign_extended_multiple_of_16_to_sp() {
    for imm in [16, 32, 64, 128, 256, -512, 496] {
        assert_same_effect(c_addi16sp(imm), addi(SP, SP, imm as i64), &[]);
    }
    assert_eq!(run_c(c_addi16sp(-512), &[]).x(SP), DATA - 512);
}

#[test]
fn c_lui_loads_a_sign_extended_upper_immediate() {
    for (imm6, imm20) in [(1, 0x1), (2, 0x2), (4, 0x4), (8, 0x8), (16, 0x10), (-32, 0xfffe0), (-1, 0xfffff)] {
        assert_same_effect(c_lui(A1, imm6), lui(A1, imm20), &[]);
    }
    assert_eq!(run_c(c_lui(A1, -32), &[]).x(A1), 0xffff_ffff_fffe_0000);
    assert_eq!(run_c(c_lui(A1, 31), &[]).x(A1), 0x1_f000);
}

#[test]
fn c_srli_shifts_right_logically_by_up_to_63() {
    for shamt in [1, 2, 4, 8, 16, 32, 63] {
        assert_same_effect(c_srli(S0, shamt), srli(S0, S0, shamt), &[]);
    }
    assert_eq!(run_c(c_srli(S0, 63), &[(S0, 1 << 63)]).x(S0), 1);
}

#[test]
fn c_srai_shifts_right_arithmetically_by_up_to_63() {
    for shamt in [1, 2, 4, 8, 16, 32, 63] {
        assert_same_effect(c_srai(S0, shamt), srai(S0, S0, shamt), &[]);
    }
    assert_eq!(run_c(c_srai(S0, 63), &[(S0, 1 << 63)]).x(S0), u64::MAX);
}

#[test]
fn c_andi_ands_with_a_sign_extended_6_bit_immediate() {
    for imm in [1, 2, 4, 8, 16, -32, -1] {
        assert_same_effect(c_andi(A2, imm), andi(A2, A2, imm as i64), &[]);
    }
    assert_eq!(run_c(c_andi(A2, -32), &[(A2, 0xff)]).x(A2), 0xe0);
}

#[test]
fn c_sub_c_xor_c_or_c_and_match_their_register_forms() {
    assert_same_effect(c_sub(A0, A1), sub(A0, A0, A1), &[]);
    assert_same_effect(c_xor(S0, A5), xor(S0, S0, A5), &[]);
    assert_same_effect(c_or(A3, A2), or(A3, A3, A2), &[]);
    assert_same_effect(c_and(A4, S1), and(A4, A4, S1), &[]);
    assert_eq!(run_c(c_sub(A0, A1), &[(A0, 1), (A1, 2)]).x(A0), u64::MAX);
}

#[test]
fn c_subw_and_c_addw_sign_extend_their_32_bit_results() {
    assert_same_effect(c_subw(A0, A1), subw(A0, A0, A1), &[]);
    assert_same_effect(c_addw(S1, A2), addw(S1, S1, A2), &[]);
    assert_eq!(run_c(c_addw(A0, A1), &[(A0, 0x7fff_ffff), (A1, 1)]).x(A0), 0xffff_ffff_8000_0000);
    assert_eq!(run_c(c_subw(A0, A1), &[(A0, 0), (A1, 1)]).x(A0), u64::MAX);
}

#[test]
fn c_j_jumps_relative_without_linking() {
    for off in [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, -2048, 2046] {
        let m = jump_c(c_j(off), &[]);
        assert_eq!(m.pc(), (CODE + 0x800).wrapping_add(off as i64 as u64), "c.j {off}");
        assert_eq!(m.hart.state.x, prepared(CODE).hart.state.x, "c.j {off} wrote a register");
    }
}

#[test]
fn c_beqz_branches_when_the_register_is_zero() {
    for off in [2, 4, 8, 16, 32, 64, 128, -256, 254] {
        let m = jump_c(c_beqz(A4, off), &[(A4, 0)]);
        assert_eq!(m.pc(), (CODE + 0x800).wrapping_add(off as i64 as u64), "c.beqz {off}");
    }
    assert_eq!(jump_c(c_beqz(A4, 64), &[(A4, 1 << 63)]).pc(), CODE + 0x802);
}

#[test]
fn c_bnez_branches_when_the_register_is_not_zero() {
    for off in [2, 4, 8, 16, 32, 64, 128, -256, 254] {
        let m = jump_c(c_bnez(A4, off), &[(A4, 1 << 63)]);
        assert_eq!(m.pc(), (CODE + 0x800).wrapping_add(off as i64 as u64), "c.bnez {off}");
    }
    assert_eq!(jump_c(c_bnez(A4, 64), &[(A4, 0)]).pc(), CODE + 0x802);
}

// ---------------------------------------------------------------- quadrant 2

#[test]
fn c_slli_shifts_left_by_up_to_63() {
    for shamt in [1, 2, 4, 8, 16, 32, 63] {
        assert_same_effect(c_slli(T2, shamt), slli(T2, T2, shamt), &[(T2, 0x8000_0000_0000_0003)]);
    }
    assert_eq!(run_c(c_slli(T2, 63), &[(T2, 3)]).x(T2), 1 << 63);
}

#[test]
fn c_lwsp_loads_a_sign_extended_word_relative_to_sp() {
    for off in [4, 8, 16, 32, 64, 128, 252] {
        assert_same_effect(c_lwsp(RA, off), lw(RA, SP, off as i64), &[]);
    }
}

#[test]
fn c_ldsp_loads_a_doubleword_relative_to_sp() {
    for off in [8, 16, 32, 64, 128, 256, 504] {
        assert_same_effect(c_ldsp(T6, off), ld(T6, SP, off as i64), &[]);
    }
    let m = run_c(c_ldsp(T6, 504), &[]);
    assert_eq!(m.x(T6), m.read_u64(DATA + 504));
}

#[test]
fn c_swsp_stores_a_word_relative_to_sp() {
    for off in [4, 8, 16, 32, 64, 128, 252] {
        assert_same_effect(c_swsp(A2, off), sw(A2, SP, off as i64), &[]);
    }
}

#[test]
fn c_sdsp_stores_a_doubleword_relative_to_sp() {
    for off in [8, 16, 32, 64, 128, 256, 504] {
        assert_same_effect(c_sdsp(T5, off), sd(T5, SP, off as i64), &[(T5, 0x0102_0304_0506_0708)]);
    }
    let m = run_c(c_sdsp(T5, 504), &[(T5, 0x0102_0304_0506_0708)]);
    assert_eq!(m.read_u64(DATA + 504), 0x0102_0304_0506_0708);
}

#[test]
fn c_fldsp_and_c_fsdsp_move_doubles_relative_to_sp() {
    let mut m = prepared(CODE);
    m.hart.state.mstatus |= 1 << 13;
    m.load_halves(CODE, &[c_fldsp(A3, 336), c_fsdsp(A3, 504)]);
    m.run(2);
    assert_eq!(m.hart.state.f[A3 as usize], m.read_u64(DATA + 336));
    assert_eq!(m.read_u64(DATA + 504), m.read_u64(DATA + 336));
}

#[test]
fn c_jr_jumps_to_the_register_without_linking() {
    let m = jump_c(c_jr(T0), &[(T0, CODE + 0x123)]);
    // jalr clears bit 0 of the target.
    assert_eq!(m.pc(), CODE + 0x122);
    assert_eq!(m.x(RA), 0);
}

#[test]
fn c_jalr_links_the_address_two_bytes_on() {
    let m = jump_c(c_jalr(T0), &[(T0, CODE + 0x40)]);
    assert_eq!(m.pc(), CODE + 0x40);
    assert_eq!(m.x(RA), CODE + 0x802);
}

#[test]
fn c_jalr_through_ra_jumps_to_the_old_ra() {
    let m = jump_c(c_jalr(RA), &[(RA, CODE + 0x40)]);
    assert_eq!(m.pc(), CODE + 0x40);
    assert_eq!(m.x(RA), CODE + 0x802);
}

#[test]
fn c_mv_copies_a_register() {
    assert_same_effect(c_mv(A0, T6), add(A0, ZERO, T6), &[(T6, 0xdead_beef)]);
    assert_eq!(run_c(c_mv(A0, T6), &[(T6, 0xdead_beef)]).x(A0), 0xdead_beef);
}

#[test]
fn c_add_adds_two_registers() {
    assert_same_effect(c_add(A0, T6), add(A0, A0, T6), &[(T6, 0xdead_beef)]);
    assert_eq!(run_c(c_add(A0, T6), &[(A0, 1), (T6, u64::MAX)]).x(A0), 0);
}

#[test]
fn c_ebreak_raises_a_breakpoint_at_its_own_address() {
    let mut m = prepared(CODE);
    m.load_halves(CODE, &[c_nop(), c_ebreak()]);
    m.run(3);
    assert_eq!(m.mcause(), CAUSE_BREAKPOINT);
    assert_eq!(m.mepc(), CODE + 2);
    assert_eq!(m.pc(), M_HANDLER);
}

// ---------------------------------------------------------------- mixing lengths

#[test]
fn a_32_bit_instruction_may_start_two_bytes_into_a_word() {
    let mut m = prepared(CODE);
    let w = addi(A0, ZERO, 0x123);
    m.load_halves(CODE, &[c_li(A1, 7), w as u16, (w >> 16) as u16, c_addi(A1, 1)]);
    m.run(3);
    assert_eq!(m.x(A0), 0x123);
    assert_eq!(m.x(A1), 8);
    assert_eq!(m.pc(), CODE + 8);
}

#[test]
fn hints_execute_as_no_ops() {
    // c.nop with an immediate, c.addi with imm 0, c.li/c.lui/c.mv/c.add/c.slli to x0.
    let hints = [
        c_addi(ZERO, 5),
        c_addi(A0, 0),
        c_li(ZERO, 3),
        c_lui(ZERO, 1),
        c_mv(ZERO, A1),
        c_add(ZERO, A1),
        c_slli(ZERO, 3),
    ];
    let mut m = prepared(CODE);
    let before = m.hart.state.x;
    m.load_halves(CODE, &hints);
    m.run(hints.len() as u64);
    assert_eq!(m.hart.state.x, before);
    assert_eq!(m.pc(), CODE + 2 * hints.len() as u64);
    assert_eq!(m.hart.state.mcause, 0);
}

// ---------------------------------------------------------------- reserved encodings

fn assert_illegal_c(h: u16) {
    let m = illegal_c(h);
    assert_eq!(m.mcause(), CAUSE_ILLEGAL_INSTRUCTION, "{h:#06x}");
    assert_eq!(m.mtval(), h as u64, "{h:#06x}");
    assert_eq!(m.mepc(), CODE, "{h:#06x}");
}

#[test]
fn the_all_zero_parcel_is_illegal() {
    assert_illegal_c(0x0000);
}

#[test]
fn c_addi4spn_with_a_zero_immediate_is_reserved() {
    assert_illegal_c(0x001c); // rd' = a5, nzuimm = 0
}

#[test]
fn quadrant_0_funct3_100_is_reserved() {
    assert_illegal_c(0x8000);
}

#[test]
fn c_addiw_with_rd_x0_is_reserved() {
    assert_illegal_c(0x2005); // c.addiw x0, 1
}

#[test]
fn c_addi16sp_with_a_zero_immediate_is_reserved() {
    assert_illegal_c(0x6101);
}

#[test]
fn c_lui_with_a_zero_immediate_is_reserved() {
    assert_illegal_c(0x6501); // c.lui a0, 0
}

#[test]
fn the_unassigned_quadrant_1_arithmetic_forms_are_reserved() {
    assert_illegal_c(0x9c41); // 100 1 11 rd' 10 rs2' 01
    assert_illegal_c(0x9c61); // 100 1 11 rd' 11 rs2' 01
}

#[test]
fn c_lwsp_and_c_ldsp_with_rd_x0_are_reserved() {
    assert_illegal_c(0x4002);
    assert_illegal_c(0x6002);
}

#[test]
fn c_jr_with_rs1_x0_is_reserved() {
    assert_illegal_c(0x8002);
}

#[test]
fn a_compressed_float_load_with_the_fpu_off_is_illegal_with_the_parcel_in_mtval() {
    let h = c_fld(A0, A5, 8);
    let mut m = prepared(CODE);
    m.hart.state.mstatus &= !MSTATUS_FS;
    m.load_halves(CODE, &[h, 0xffff]);
    m.set_x(A5, DATA);
    m.run(2);
    assert_eq!(m.mcause(), CAUSE_ILLEGAL_INSTRUCTION);
    assert_eq!(m.mtval(), h as u64);
}
