//! RV64I: one test per behaviour the unprivileged spec defines for the base integer
//! instructions, including the sign-extension, shift-amount and W-form edge cases.
//! Expected values are worked out from the spec, not taken from the hart.

mod common;
use common::*;

/// Run one instruction with `a1 = x`, `a2 = y`; return a0.
fn alu(insn: u32, x: u64, y: u64) -> u64 {
    run_code(&[insn], &[(A1, x), (A2, y)]).x(A0)
}

/// Run one branch with `a0 = x`, `a1 = y`; return where it went, relative to it.
fn branch_offset(insn: u32, x: u64, y: u64) -> u64 {
    run_code(&[insn], &[(A0, x), (A1, y)]).pc().wrapping_sub(CODE)
}

// ---------------------------------------------------------------- LUI, AUIPC

#[test]
fn lui_places_the_immediate_in_bits_31_to_12_and_zeroes_the_low_bits() {
    let m = run_code(&[lui(A0, 0x12345)], &[(A0, u64::MAX)]);
    assert_eq!(m.x(A0), 0x1234_5000);
}

#[test]
fn lui_sign_extends_bit_31_into_the_upper_32_bits() {
    let m = run_code(&[lui(A0, 0x80000)], &[]);
    assert_eq!(m.x(A0), 0xffff_ffff_8000_0000);
}

#[test]
fn auipc_adds_the_upper_immediate_to_its_own_address() {
    let m = run_code(&[nop(), auipc(A0, 0x1)], &[]);
    assert_eq!(m.x(A0), CODE + 4 + 0x1000);
}

#[test]
fn auipc_with_bit_31_set_adds_a_negative_offset() {
    let m = run_code(&[auipc(A0, 0xfffff)], &[]);
    assert_eq!(m.x(A0), CODE - 0x1000);
}

// ---------------------------------------------------------------- JAL, JALR

#[test]
fn jal_links_the_next_address_and_jumps_relative_to_itself() {
    let m = run_code(&[nop(), jal(RA, 0x100)], &[]);
    assert_eq!(m.x(RA), CODE + 8);
    assert_eq!(m.pc(), CODE + 4 + 0x100);
}

#[test]
fn jal_jumps_backwards_with_a_negative_offset() {
    let mut m = Machine::new();
    m.load(CODE + 0x800, &[jal(RA, -0x800)]);
    m.hart.state.pc = CODE + 0x800;
    m.run(1);
    assert_eq!(m.pc(), CODE);
    assert_eq!(m.x(RA), CODE + 0x804);
}

#[test]
fn jalr_jumps_to_rs1_plus_the_offset_and_links() {
    let m = run_code(&[jalr(RA, A1, -16)], &[(A1, CODE + 0x210)]);
    assert_eq!(m.pc(), CODE + 0x200);
    assert_eq!(m.x(RA), CODE + 4);
}

#[test]
fn jalr_clears_bit_0_of_the_target() {
    let m = run_code(&[jalr(RA, A1, 0x11)], &[(A1, CODE + 0x100)]);
    assert_eq!(m.pc(), CODE + 0x110);
}

#[test]
fn jalr_with_rd_equal_to_rs1_jumps_to_the_old_value() {
    let m = run_code(&[jalr(A1, A1, 0)], &[(A1, CODE + 0x40)]);
    assert_eq!(m.pc(), CODE + 0x40);
    assert_eq!(m.x(A1), CODE + 4);
}

// ---------------------------------------------------------------- branches

#[test]
fn beq_is_taken_only_when_equal() {
    assert_eq!(branch_offset(beq(A0, A1, 0x40), 5, 5), 0x40);
    assert_eq!(branch_offset(beq(A0, A1, 0x40), 5, 6), 4);
}

#[test]
fn bne_is_taken_only_when_different() {
    assert_eq!(branch_offset(bne(A0, A1, 0x40), 5, 6), 0x40);
    assert_eq!(branch_offset(bne(A0, A1, 0x40), 5, 5), 4);
}

#[test]
fn blt_compares_as_signed() {
    assert_eq!(branch_offset(blt(A0, A1, 0x40), -1i64 as u64, 1), 0x40);
    assert_eq!(branch_offset(blt(A0, A1, 0x40), 1, -1i64 as u64), 4);
    assert_eq!(branch_offset(blt(A0, A1, 0x40), 7, 7), 4);
}

#[test]
fn bge_compares_as_signed_and_is_taken_when_equal() {
    assert_eq!(branch_offset(bge(A0, A1, 0x40), 1, -1i64 as u64), 0x40);
    assert_eq!(branch_offset(bge(A0, A1, 0x40), 7, 7), 0x40);
    assert_eq!(branch_offset(bge(A0, A1, 0x40), -1i64 as u64, 1), 4);
}

#[test]
fn bltu_compares_as_unsigned() {
    assert_eq!(branch_offset(bltu(A0, A1, 0x40), 1, u64::MAX), 0x40);
    assert_eq!(branch_offset(bltu(A0, A1, 0x40), u64::MAX, 1), 4);
    assert_eq!(branch_offset(bltu(A0, A1, 0x40), 7, 7), 4);
}

#[test]
fn bgeu_compares_as_unsigned_and_is_taken_when_equal() {
    assert_eq!(branch_offset(bgeu(A0, A1, 0x40), u64::MAX, 1), 0x40);
    assert_eq!(branch_offset(bgeu(A0, A1, 0x40), 7, 7), 0x40);
    assert_eq!(branch_offset(bgeu(A0, A1, 0x40), 1, u64::MAX), 4);
}

#[test]
fn branches_reach_backwards_with_a_negative_offset() {
    let mut m = Machine::new();
    m.load(CODE + 0x1000, &[beq(ZERO, ZERO, -0x1000)]);
    m.hart.state.pc = CODE + 0x1000;
    m.run(1);
    assert_eq!(m.pc(), CODE);
}

#[test]
fn a_branch_does_not_write_any_register() {
    let m = run_code(&[beq(A0, A1, 8)], &[(A0, 3), (A1, 3)]);
    let mut expected = [0u64; 32];
    expected[A0 as usize] = 3;
    expected[A1 as usize] = 3;
    assert_eq!(m.hart.state.x, expected);
}

// ---------------------------------------------------------------- loads

fn load_from_data(insn: u32) -> u64 {
    let mut m = Machine::with_code(&[insn]);
    m.write_bytes(DATA, &[0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88]);
    m.set_x(A1, DATA);
    m.run(1);
    m.x(A0)
}

#[test]
fn lb_sign_extends_the_byte() {
    assert_eq!(load_from_data(lb(A0, A1, 0)), 0xffff_ffff_ffff_ff81);
}

#[test]
fn lbu_zero_extends_the_byte() {
    assert_eq!(load_from_data(lbu(A0, A1, 0)), 0x81);
}

#[test]
fn lh_sign_extends_the_little_endian_halfword() {
    assert_eq!(load_from_data(lh(A0, A1, 2)), 0xffff_ffff_ffff_8483);
}

#[test]
fn lhu_zero_extends_the_halfword() {
    assert_eq!(load_from_data(lhu(A0, A1, 2)), 0x8483);
}

#[test]
fn lw_sign_extends_the_word() {
    assert_eq!(load_from_data(lw(A0, A1, 4)), 0xffff_ffff_8887_8685);
}

#[test]
fn lwu_zero_extends_the_word() {
    assert_eq!(load_from_data(lwu(A0, A1, 4)), 0x8887_8685);
}

#[test]
fn ld_loads_the_little_endian_doubleword() {
    assert_eq!(load_from_data(ld(A0, A1, 0)), 0x8887_8685_8483_8281);
}

#[test]
fn loads_add_a_sign_extended_offset_to_the_base() {
    let mut m = Machine::with_code(&[lbu(A0, A1, -1), lbu(A2, A1, 2047)]);
    m.write_bytes(DATA - 1, &[0x5a]);
    m.write_bytes(DATA + 0x100 + 2047, &[0xa5]);
    m.set_x(A1, DATA);
    m.run(1);
    m.set_x(A1, DATA + 0x100);
    m.run(1);
    assert_eq!(m.x(A0), 0x5a);
    assert_eq!(m.x(A2), 0xa5);
}

#[test]
fn a_load_from_a_device_goes_to_the_bus_with_its_size() {
    let mut m = Machine::with_code(&[lw(A0, A1, 4)]);
    m.bus.mmio[4..8].copy_from_slice(&[0x11, 0x22, 0x33, 0xc4]);
    m.set_x(A1, MMIO_BASE);
    m.run(1);
    assert_eq!(m.x(A0), 0xffff_ffff_c433_2211);
    assert_eq!(m.bus.accesses, vec![MmioAccess::Load { paddr: MMIO_BASE + 4, size: 4 }]);
}

#[test]
fn a_load_from_an_address_nothing_answers_raises_a_load_access_fault() {
    let m = trap_m(&[ld(A0, A1, 8)], &[(A0, 7), (A1, 0x2000_0000)]);
    assert_eq!(m.mcause(), CAUSE_LOAD_ACCESS);
    assert_eq!(m.mtval(), 0x2000_0008);
    assert_eq!(m.mepc(), CODE);
    assert_eq!(m.x(A0), 7);
}

// ---------------------------------------------------------------- stores

fn store_to_data(insn: u32) -> Vec<u8> {
    let mut m = Machine::with_code(&[insn]);
    m.write_bytes(DATA, &[0xee; 10]);
    m.set_x(A1, DATA);
    m.set_x(A2, 0x8877_6655_4433_2211);
    m.run(1);
    m.read_bytes(DATA, 10)
}

#[test]
fn sb_writes_only_the_low_byte() {
    assert_eq!(store_to_data(sb(A2, A1, 1)), [0xee, 0x11, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee]);
}

#[test]
fn sh_writes_only_the_low_halfword() {
    assert_eq!(store_to_data(sh(A2, A1, 2)), [0xee, 0xee, 0x11, 0x22, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee]);
}

#[test]
fn sw_writes_only_the_low_word() {
    assert_eq!(store_to_data(sw(A2, A1, 4)), [0xee, 0xee, 0xee, 0xee, 0x11, 0x22, 0x33, 0x44, 0xee, 0xee]);
}

#[test]
fn sd_writes_the_doubleword_little_endian() {
    assert_eq!(store_to_data(sd(A2, A1, 0)), [0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0xee, 0xee]);
}

#[test]
fn stores_add_a_sign_extended_offset_to_the_base() {
    let m = run_code(&[sb(A2, A1, -2048)], &[(A1, DATA + 2048), (A2, 0x7f)]);
    assert_eq!(m.read_bytes(DATA, 1), [0x7f]);
}

#[test]
fn a_store_to_a_device_goes_to_the_bus_with_its_size_and_low_bytes() {
    let m = run_code(&[sh(A2, A1, 6)], &[(A1, MMIO_BASE), (A2, 0x1234_5678)]);
    assert_eq!(m.bus.accesses, vec![MmioAccess::Store { paddr: MMIO_BASE + 6, size: 2, value: 0x5678 }]);
}

#[test]
fn a_store_to_an_address_nothing_answers_raises_a_store_access_fault() {
    let m = trap_m(&[sw(A2, A1, -4)], &[(A1, 0x2000_0000)]);
    assert_eq!(m.mcause(), CAUSE_STORE_ACCESS);
    assert_eq!(m.mtval(), 0x1fff_fffc);
    assert_eq!(m.mepc(), CODE);
}

// ---------------------------------------------------------------- OP-IMM

#[test]
fn addi_adds_a_sign_extended_immediate() {
    assert_eq!(alu(addi(A0, A1, -2048), 0x1000, 0), 0x800);
    assert_eq!(alu(addi(A0, A1, 2047), 1, 0), 2048);
}

#[test]
fn addi_wraps_around_on_overflow() {
    assert_eq!(alu(addi(A0, A1, 1), u64::MAX, 0), 0);
    assert_eq!(alu(addi(A0, A1, -1), 0, 0), u64::MAX);
}

#[test]
fn slti_compares_as_signed_with_a_sign_extended_immediate() {
    assert_eq!(alu(slti(A0, A1, 0), -1i64 as u64, 0), 1);
    assert_eq!(alu(slti(A0, A1, -1), 0, 0), 0);
    assert_eq!(alu(slti(A0, A1, 5), 5, 0), 0);
}

#[test]
fn sltiu_sign_extends_the_immediate_then_compares_as_unsigned() {
    // -1 becomes 2^64-1: every value but the maximum is below it.
    assert_eq!(alu(sltiu(A0, A1, -1), u64::MAX - 1, 0), 1);
    assert_eq!(alu(sltiu(A0, A1, -1), u64::MAX, 0), 0);
    // sltiu rd, rs, 1 is "seqz".
    assert_eq!(alu(sltiu(A0, A1, 1), 0, 0), 1);
    assert_eq!(alu(sltiu(A0, A1, 1), 2, 0), 0);
}

#[test]
fn xori_with_minus_one_is_bitwise_not() {
    assert_eq!(alu(xori(A0, A1, -1), 0x0123_4567_89ab_cdef, 0), 0xfedc_ba98_7654_3210);
    assert_eq!(alu(xori(A0, A1, 0x555), 0xfff, 0), 0xaaa);
}

#[test]
fn ori_uses_the_sign_extended_immediate() {
    assert_eq!(alu(ori(A0, A1, -0x800), 0x12, 0), 0xffff_ffff_ffff_f812);
}

#[test]
fn andi_uses_the_sign_extended_immediate() {
    assert_eq!(alu(andi(A0, A1, -16), 0x1234_5678_9abc_def7, 0), 0x1234_5678_9abc_def0);
    assert_eq!(alu(andi(A0, A1, 0x7ff), u64::MAX, 0), 0x7ff);
}

#[test]
fn slli_shifts_left_by_up_to_63() {
    assert_eq!(alu(slli(A0, A1, 63), 3, 0), 1 << 63);
    assert_eq!(alu(slli(A0, A1, 32), 0x1_8000_0001, 0), 0x8000_0001_0000_0000);
    assert_eq!(alu(slli(A0, A1, 0), 0xabc, 0), 0xabc);
}

#[test]
fn srli_shifts_in_zeros() {
    assert_eq!(alu(srli(A0, A1, 63), 1 << 63, 0), 1);
    assert_eq!(alu(srli(A0, A1, 4), 0xf000_0000_0000_00ff, 0), 0x0f00_0000_0000_000f);
}

#[test]
fn srai_shifts_in_copies_of_the_sign_bit() {
    assert_eq!(alu(srai(A0, A1, 63), 1 << 63, 0), u64::MAX);
    assert_eq!(alu(srai(A0, A1, 4), 0xf000_0000_0000_00ff, 0), 0xff00_0000_0000_000f);
    assert_eq!(alu(srai(A0, A1, 4), 0x7000_0000_0000_00ff, 0), 0x0700_0000_0000_000f);
}

// ---------------------------------------------------------------- OP

#[test]
fn add_wraps_around_on_overflow() {
    assert_eq!(alu(add(A0, A1, A2), u64::MAX, 2), 1);
    assert_eq!(alu(add(A0, A1, A2), i64::MAX as u64, 1), 1 << 63);
}

#[test]
fn sub_wraps_around_on_underflow() {
    assert_eq!(alu(sub(A0, A1, A2), 1, 2), u64::MAX);
    assert_eq!(alu(sub(A0, A1, A2), 1 << 63, 1), i64::MAX as u64);
}

#[test]
fn slt_compares_as_signed() {
    assert_eq!(alu(slt(A0, A1, A2), -5i64 as u64, 3), 1);
    assert_eq!(alu(slt(A0, A1, A2), 3, -5i64 as u64), 0);
    assert_eq!(alu(slt(A0, A1, A2), 3, 3), 0);
}

#[test]
fn sltu_compares_as_unsigned() {
    assert_eq!(alu(sltu(A0, A1, A2), 3, -5i64 as u64), 1);
    assert_eq!(alu(sltu(A0, A1, A2), -5i64 as u64, 3), 0);
    // sltu rd, x0, rs is "snez".
    assert_eq!(run_code(&[sltu(A0, ZERO, A2)], &[(A2, 9)]).x(A0), 1);
}

#[test]
fn xor_or_and_are_bitwise() {
    let x = 0xff00_ff00_f0f0_cccc;
    let y = 0x0ff0_0ff0_ff00_aaaa;
    assert_eq!(alu(xor(A0, A1, A2), x, y), 0xf0f0_f0f0_0ff0_6666);
    assert_eq!(alu(or(A0, A1, A2), x, y), 0xfff0_fff0_fff0_eeee);
    assert_eq!(alu(and(A0, A1, A2), x, y), 0x0f00_0f00_f000_8888);
}

#[test]
fn sll_uses_only_the_low_6_bits_of_rs2() {
    assert_eq!(alu(sll(A0, A1, A2), 1, 64 + 3), 8);
    assert_eq!(alu(sll(A0, A1, A2), 1, u64::MAX), 1 << 63);
    assert_eq!(alu(sll(A0, A1, A2), 5, 64), 5);
}

#[test]
fn srl_uses_only_the_low_6_bits_of_rs2_and_shifts_in_zeros() {
    assert_eq!(alu(srl(A0, A1, A2), 1 << 63, 0x100 + 63), 1);
    assert_eq!(alu(srl(A0, A1, A2), u64::MAX, 64 + 60), 0xf);
}

#[test]
fn sra_uses_only_the_low_6_bits_of_rs2_and_shifts_in_the_sign() {
    assert_eq!(alu(sra(A0, A1, A2), 1 << 63, 0x100 + 63), u64::MAX);
    assert_eq!(alu(sra(A0, A1, A2), 0x8000_0000_0000_0010, 64 + 4), 0xf800_0000_0000_0001);
}

// ---------------------------------------------------------------- W forms

#[test]
fn addiw_sign_extends_the_32_bit_sum() {
    assert_eq!(alu(addiw(A0, A1, 1), 0x7fff_ffff, 0), 0xffff_ffff_8000_0000);
    assert_eq!(alu(addiw(A0, A1, -1), 0, 0), u64::MAX);
}

#[test]
fn addiw_ignores_the_upper_32_bits_of_rs1() {
    // addiw rd, rs, 0 is "sext.w".
    assert_eq!(alu(addiw(A0, A1, 0), 0x1234_5678_0000_0005, 0), 5);
    assert_eq!(alu(addiw(A0, A1, 0), 0x0000_0000_ffff_fffe, 0), -2i64 as u64);
}

#[test]
fn slliw_shifts_the_low_word_and_sign_extends() {
    assert_eq!(alu(slliw(A0, A1, 31), 0xffff_ffff_0000_0001, 0), 0xffff_ffff_8000_0000);
    assert_eq!(alu(slliw(A0, A1, 4), 0x1_1000_0001, 0), 0x10);
}

#[test]
fn srliw_shifts_zeros_into_bit_31_then_sign_extends() {
    assert_eq!(alu(srliw(A0, A1, 31), 0x8000_0000, 0), 1);
    assert_eq!(alu(srliw(A0, A1, 4), 0xffff_ffff_8000_0000, 0), 0x0800_0000);
    // A shift by zero still sign-extends the word.
    assert_eq!(alu(srliw(A0, A1, 0), 0x8000_0000, 0), 0xffff_ffff_8000_0000);
}

#[test]
fn sraiw_shifts_in_bit_31_and_ignores_the_upper_word() {
    assert_eq!(alu(sraiw(A0, A1, 31), 0x8000_0000, 0), u64::MAX);
    assert_eq!(alu(sraiw(A0, A1, 4), 0x0000_0001_7000_0000, 0), 0x0700_0000);
}

#[test]
fn addw_sign_extends_the_32_bit_sum() {
    assert_eq!(alu(addw(A0, A1, A2), 0x7fff_ffff, 1), 0xffff_ffff_8000_0000);
    assert_eq!(alu(addw(A0, A1, A2), 0xffff_ffff_0000_0002, 0x1_0000_0003), 5);
}

#[test]
fn subw_sign_extends_the_32_bit_difference() {
    assert_eq!(alu(subw(A0, A1, A2), 0, 1), u64::MAX);
    assert_eq!(alu(subw(A0, A1, A2), 0x8000_0000, 1), 0x7fff_ffff);
}

#[test]
fn sllw_uses_only_the_low_5_bits_of_rs2() {
    assert_eq!(alu(sllw(A0, A1, A2), 1, 32 + 31), 0xffff_ffff_8000_0000);
    assert_eq!(alu(sllw(A0, A1, A2), 3, 32), 3);
}

#[test]
fn srlw_uses_only_the_low_5_bits_of_rs2() {
    assert_eq!(alu(srlw(A0, A1, A2), 0xffff_ffff_8000_0000, 32 + 31), 1);
    assert_eq!(alu(srlw(A0, A1, A2), 0x8000_0000, 32), 0xffff_ffff_8000_0000);
}

#[test]
fn sraw_uses_only_the_low_5_bits_of_rs2() {
    assert_eq!(alu(sraw(A0, A1, A2), 0x8000_0000, 32 + 31), u64::MAX);
    assert_eq!(alu(sraw(A0, A1, A2), 0x0000_0001_4000_0000, 64 + 30), 1);
}

// ---------------------------------------------------------------- fences

#[test]
fn fence_and_fence_i_only_advance_the_pc() {
    let m = run_code(&[fence(), fence_i()], &[(A0, 1)]);
    let mut expected = [0u64; 32];
    expected[A0 as usize] = 1;
    assert_eq!(m.hart.state.x, expected);
    assert_eq!(m.pc(), CODE + 8);
    assert_eq!(m.hart.state.icount, 2);
}

#[test]
fn fence_tso_pause_and_any_predecessor_successor_sets_execute_as_fences() {
    let fence_tso = i_type(0x833, 0, 0, 0, OP_MISC_MEM); // fm = 1000, pred = succ = rw
    let pause = i_type(0x010, 0, 0, 0, OP_MISC_MEM); // fence w, 0 (Zihintpause)
    let fence_io = i_type(0x0c0, 0, 0, 0, OP_MISC_MEM); // fence io, 0
    let m = run_code(&[fence_tso, pause, fence_io], &[]);
    assert_eq!(m.pc(), CODE + 12);
    assert_eq!(m.mcause(), 0);
}
