//! The A extension: LR/SC reservations and the AMOs, 32- and 64-bit. An AMO returns
//! the old memory value in rd (sign-extended for .W) and stores op(old, rs2); a
//! misaligned or faulting LR raises a load exception, an SC or AMO a store/AMO one.

mod common;
use common::*;

const NEG1: u64 = u64::MAX;

/// Run `insn` with `a1 = DATA`, `a2 = src`, and the doubleword at DATA = `mem`;
/// return (a0, the doubleword at DATA afterwards).
fn amo_on(insn: u32, mem: u64, src: u64) -> (u64, u64) {
    let mut m = Machine::with_code(&[insn]);
    m.write_u64(DATA, mem);
    m.set_x(A1, DATA);
    m.set_x(A2, src);
    m.run(1);
    (m.x(A0), m.read_u64(DATA))
}

// ---------------------------------------------------------------- LR/SC

#[test]
fn lr_w_sign_extends_the_loaded_word() {
    let (rd, _) = amo_on(lr_w(A0, A1), 0x1234_5678_8000_0001, 0);
    assert_eq!(rd, 0xffff_ffff_8000_0001);
}

#[test]
fn sc_w_after_lr_w_to_the_same_address_stores_and_writes_zero() {
    let mut m = Machine::with_code(&[lr_w(A0, A1), sc_w(A3, A2, A1)]);
    m.write_u64(DATA, 0xaaaa_aaaa_0000_0001);
    m.set_x(A1, DATA);
    m.set_x(A2, 0x1111_2222_3333_4444);
    m.set_x(A3, 99);
    m.run(2);
    assert_eq!(m.x(A3), 0);
    assert_eq!(m.read_u64(DATA), 0xaaaa_aaaa_3333_4444);
}

#[test]
fn sc_d_after_lr_d_stores_the_doubleword() {
    let mut m = Machine::with_code(&[lr_d(A0, A1), sc_d(A3, A2, A1)]);
    m.write_u64(DATA, 5);
    m.set_x(A1, DATA);
    m.set_x(A2, 0x1111_2222_3333_4444);
    m.run(2);
    assert_eq!(m.x(A0), 5);
    assert_eq!(m.x(A3), 0);
    assert_eq!(m.read_u64(DATA), 0x1111_2222_3333_4444);
}

#[test]
fn sc_without_a_reservation_fails_with_nonzero_and_does_not_store() {
    let (rd, mem) = amo_on(sc_w(A0, A2, A1), 7, 0x55);
    assert_eq!(rd, 1);
    assert_eq!(mem, 7);
}

#[test]
fn sc_to_another_address_than_the_reserved_one_fails() {
    let mut m = Machine::with_code(&[lr_d(A0, A1), sc_d(A3, A2, A4)]);
    m.write_u64(DATA, 1);
    m.write_u64(DATA + 8, 2);
    m.set_x(A1, DATA);
    m.set_x(A4, DATA + 8);
    m.set_x(A2, 0x77);
    m.run(2);
    assert_eq!(m.x(A3), 1);
    assert_eq!(m.read_u64(DATA + 8), 2);
}

#[test]
fn a_successful_sc_consumes_the_reservation() {
    let mut m = Machine::with_code(&[lr_w(A0, A1), sc_w(A3, A2, A1), sc_w(A4, A5, A1)]);
    m.set_x(A1, DATA);
    m.set_x(A2, 0x11);
    m.set_x(A5, 0x22);
    m.run(3);
    assert_eq!(m.x(A3), 0);
    assert_eq!(m.x(A4), 1);
    assert_eq!(m.read_u64(DATA), 0x11);
}

#[test]
fn a_failed_sc_also_clears_the_reservation() {
    let mut m = Machine::with_code(&[lr_w(A0, A1), sc_w(A3, A2, A4), sc_w(A5, A2, A1)]);
    m.set_x(A1, DATA);
    m.set_x(A4, DATA + 8);
    m.set_x(A2, 0x11);
    m.run(3);
    assert_eq!(m.x(A3), 1);
    assert_eq!(m.x(A5), 1);
    assert_eq!(m.read_u64(DATA), 0);
}

#[test]
fn lr_w_at_a_misaligned_address_raises_a_load_misaligned_exception() {
    let m = trap_m(&[lr_w(A0, A1)], &[(A1, DATA + 2)]);
    assert_eq!(m.mcause(), CAUSE_MISALIGNED_LOAD);
    assert_eq!(m.mtval(), DATA + 2);
    assert_eq!(m.mepc(), CODE);
}

#[test]
fn sc_d_at_a_misaligned_address_raises_a_store_misaligned_exception() {
    let m = trap_m(&[sc_d(A0, A2, A1)], &[(A1, DATA + 4)]);
    assert_eq!(m.mcause(), CAUSE_MISALIGNED_STORE);
    assert_eq!(m.mtval(), DATA + 4);
}

#[test]
fn lr_from_an_address_nothing_answers_raises_a_load_access_fault() {
    let m = trap_m(&[lr_d(A0, A1)], &[(A1, 0x2000_0000)]);
    assert_eq!(m.mcause(), CAUSE_LOAD_ACCESS);
    assert_eq!(m.mtval(), 0x2000_0000);
}

// ---------------------------------------------------------------- AMO .W

#[test]
fn amoswap_w_returns_the_old_word_and_stores_rs2() {
    let (rd, mem) = amo_on(amoswap_w(A0, A2, A1), 0xdddd_dddd_8000_0000, 0x9999_9999_1234_5678);
    assert_eq!(rd, 0xffff_ffff_8000_0000);
    assert_eq!(mem, 0xdddd_dddd_1234_5678);
}

#[test]
fn amoadd_w_wraps_at_32_bits_and_leaves_the_next_word_alone() {
    let (rd, mem) = amo_on(amoadd_w(A0, A2, A1), 0x0000_0005_ffff_ffff, 2);
    assert_eq!(rd, NEG1);
    assert_eq!(mem, 0x0000_0005_0000_0001);
}

#[test]
fn amoxor_w_amoand_w_amoor_w_are_bitwise_on_the_word() {
    assert_eq!(amo_on(amoxor_w(A0, A2, A1), 0xff00_ff00, 0x0ff0_0ff0), (0xffff_ffff_ff00_ff00, 0xf0f0_f0f0));
    assert_eq!(amo_on(amoand_w(A0, A2, A1), 0xff00_ff00, 0x0ff0_0ff0), (0xffff_ffff_ff00_ff00, 0x0f00_0f00));
    assert_eq!(amo_on(amoor_w(A0, A2, A1), 0xff00_ff00, 0x0ff0_0ff0), (0xffff_ffff_ff00_ff00, 0xfff0_fff0));
}

#[test]
fn amomin_w_and_amomax_w_compare_the_words_as_signed() {
    // Memory holds -1 as a word; rs2's upper half must not matter.
    assert_eq!(amo_on(amomin_w(A0, A2, A1), 0xffff_ffff, 0xffff_ffff_0000_0001), (NEG1, 0xffff_ffff));
    assert_eq!(amo_on(amomax_w(A0, A2, A1), 0xffff_ffff, 0xffff_ffff_0000_0001), (NEG1, 1));
}

#[test]
fn amominu_w_and_amomaxu_w_compare_the_words_as_unsigned() {
    assert_eq!(amo_on(amominu_w(A0, A2, A1), 0xffff_ffff, 0x7fff_ffff_0000_0001), (NEG1, 1));
    assert_eq!(amo_on(amomaxu_w(A0, A2, A1), 0xffff_ffff, 0x7fff_ffff_0000_0001), (NEG1, 0xffff_ffff));
}

// ---------------------------------------------------------------- AMO .D

#[test]
fn amoswap_d_returns_the_old_doubleword_and_stores_rs2() {
    assert_eq!(amo_on(amoswap_d(A0, A2, A1), 0x8000_0000_0000_0001, 42), (0x8000_0000_0000_0001, 42));
}

#[test]
fn amoadd_d_wraps_at_64_bits() {
    assert_eq!(amo_on(amoadd_d(A0, A2, A1), NEG1, 2), (NEG1, 1));
}

#[test]
fn amoxor_d_amoand_d_amoor_d_are_bitwise_on_the_doubleword() {
    let mem = 0xff00_ff00_0000_ffff;
    let src = 0x0ff0_0ff0_ffff_0000;
    assert_eq!(amo_on(amoxor_d(A0, A2, A1), mem, src), (mem, 0xf0f0_f0f0_ffff_ffff));
    assert_eq!(amo_on(amoand_d(A0, A2, A1), mem, src), (mem, 0x0f00_0f00_0000_0000));
    assert_eq!(amo_on(amoor_d(A0, A2, A1), mem, src), (mem, 0xfff0_fff0_ffff_ffff));
}

#[test]
fn amomin_d_and_amomax_d_compare_as_signed() {
    assert_eq!(amo_on(amomin_d(A0, A2, A1), NEG1, 1), (NEG1, NEG1));
    assert_eq!(amo_on(amomax_d(A0, A2, A1), NEG1, 1), (NEG1, 1));
}

#[test]
fn amominu_d_and_amomaxu_d_compare_as_unsigned() {
    assert_eq!(amo_on(amominu_d(A0, A2, A1), NEG1, 1), (NEG1, 1));
    assert_eq!(amo_on(amomaxu_d(A0, A2, A1), NEG1, 1), (NEG1, NEG1));
}

#[test]
fn an_amo_whose_rd_is_rs2_uses_the_old_rs2_as_its_operand() {
    let mut m = Machine::with_code(&[amoadd_d(A2, A2, A1)]);
    m.write_u64(DATA, 10);
    m.set_x(A1, DATA);
    m.set_x(A2, 5);
    m.run(1);
    assert_eq!(m.x(A2), 10);
    assert_eq!(m.read_u64(DATA), 15);
}

#[test]
fn an_amo_with_rd_x0_still_updates_memory() {
    let (_, mem) = amo_on(amoor_d(ZERO, A2, A1), 0xf0, 0x0f);
    assert_eq!(mem, 0xff);
}

#[test]
fn a_misaligned_amo_raises_a_store_misaligned_exception_and_leaves_memory_alone() {
    let mut m = Machine::with_code(&[amoadd_w(A0, A2, A1)]);
    m.write_u64(DATA, 0x1111_1111_1111_1111);
    m.set_x(A1, DATA + 2);
    m.set_x(A2, 1);
    m.run(3);
    assert_eq!(m.mcause(), CAUSE_MISALIGNED_STORE);
    assert_eq!(m.mtval(), DATA + 2);
    assert_eq!(m.read_u64(DATA), 0x1111_1111_1111_1111);
    assert_eq!(m.x(A0), 0);
}

#[test]
fn an_amo_to_an_address_nothing_answers_raises_a_store_access_fault() {
    let m = trap_m(&[amoswap_d(A0, A2, A1)], &[(A1, 0x2000_0000)]);
    assert_eq!(m.mcause(), CAUSE_STORE_ACCESS);
    assert_eq!(m.mtval(), 0x2000_0000);
}

#[test]
fn lr_with_a_nonzero_rs2_field_is_reserved() {
    let insn = amo(0b00010, 2, A0, A1, A2);
    let m = trap_m(&[insn], &[(A1, DATA)]);
    assert_eq!(m.mcause(), CAUSE_ILLEGAL_INSTRUCTION);
    assert_eq!(m.mtval(), insn as u64);
}

#[test]
fn an_amo_with_an_unassigned_funct5_is_illegal() {
    let insn = amo(0b00101, 3, A0, A1, A2);
    let m = trap_m(&[insn], &[(A1, DATA)]);
    assert_eq!(m.mcause(), CAUSE_ILLEGAL_INSTRUCTION);
    assert_eq!(m.mtval(), insn as u64);
}

#[test]
fn an_amo_with_an_unassigned_width_is_illegal() {
    let insn = amo(0b00000, 1, A0, A1, A2);
    let m = trap_m(&[insn], &[(A1, DATA)]);
    assert_eq!(m.mcause(), CAUSE_ILLEGAL_INSTRUCTION);
    assert_eq!(m.mtval(), insn as u64);
}

#[test]
fn aq_and_rl_bits_do_not_change_the_result() {
    // amoadd.d.aqrl: bits 26 (aq) and 25 (rl) set.
    let insn = amoadd_d(A0, A2, A1) | (1 << 26) | (1 << 25);
    assert_eq!(amo_on(insn, 40, 2), (40, 42));
}
