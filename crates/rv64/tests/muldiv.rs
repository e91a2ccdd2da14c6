//! The M extension: products (low and high halves, every signedness), quotients that
//! round toward zero, remainders with the dividend's sign, and the spec's fixed results
//! for division by zero and signed overflow — for the 64-bit and the W forms.
//! (Table "Semantics for division by zero and division overflow", unprivileged spec.)

mod common;
use common::*;

const MIN: u64 = 1 << 63;
const NEG1: u64 = u64::MAX;

fn neg(v: i64) -> u64 {
    v as u64
}

/// Run one instruction with `a1 = x`, `a2 = y`; return a0.
fn op(insn: u32, x: u64, y: u64) -> u64 {
    run_code(&[insn], &[(A1, x), (A2, y)]).x(A0)
}

// ---------------------------------------------------------------- multiplication

#[test]
fn mul_returns_the_low_64_bits_of_the_product() {
    assert_eq!(op(mul(A0, A1, A2), 7, neg(-6)), neg(-42));
    assert_eq!(op(mul(A0, A1, A2), 0x1_0000_0001, 0x1_0000_0001), 0x2_0000_0001);
    assert_eq!(op(mul(A0, A1, A2), NEG1, NEG1), 1);
}

#[test]
fn mulh_returns_the_high_bits_of_the_signed_product() {
    assert_eq!(op(mulh(A0, A1, A2), NEG1, NEG1), 0);
    assert_eq!(op(mulh(A0, A1, A2), neg(-2), 3), NEG1);
    // (-2^63)^2 = 2^126: high half 2^62.
    assert_eq!(op(mulh(A0, A1, A2), MIN, MIN), 1 << 62);
    assert_eq!(op(mulh(A0, A1, A2), i64::MAX as u64, i64::MAX as u64), (1 << 62) - 1);
}

#[test]
fn mulhu_returns_the_high_bits_of_the_unsigned_product() {
    // (2^64-1)^2 = 2^128 - 2^65 + 1: high half 2^64 - 2.
    assert_eq!(op(mulhu(A0, A1, A2), NEG1, NEG1), NEG1 - 1);
    assert_eq!(op(mulhu(A0, A1, A2), 1 << 32, 1 << 32), 1);
    assert_eq!(op(mulhu(A0, A1, A2), NEG1, 2), 1);
}

#[test]
fn mulhsu_treats_rs1_as_signed_and_rs2_as_unsigned() {
    // -1 * (2^64-1) = -(2^64) + 1: high half all ones.
    assert_eq!(op(mulhsu(A0, A1, A2), NEG1, NEG1), NEG1);
    // 2 * (2^64-1) = 2^65 - 2: high half 1.
    assert_eq!(op(mulhsu(A0, A1, A2), 2, NEG1), 1);
    // -2^63 * 2^63 = -2^126: high half -2^62.
    assert_eq!(op(mulhsu(A0, A1, A2), MIN, MIN), neg(-(1 << 62)));
}

#[test]
fn mulw_multiplies_the_low_words_and_sign_extends_the_low_32_bits() {
    assert_eq!(op(mulw(A0, A1, A2), 0x7fff_ffff, 2), neg(-2));
    assert_eq!(op(mulw(A0, A1, A2), 0xdead_0000_0000_0003, 0xbeef_0000_0000_0005), 15);
    assert_eq!(op(mulw(A0, A1, A2), 0x1_0000, 0x8000), 0xffff_ffff_8000_0000);
}

// ---------------------------------------------------------------- 64-bit division

#[test]
fn div_rounds_toward_zero() {
    assert_eq!(op(div(A0, A1, A2), neg(-7), 2), neg(-3));
    assert_eq!(op(div(A0, A1, A2), 7, neg(-2)), neg(-3));
    assert_eq!(op(div(A0, A1, A2), neg(-7), neg(-2)), 3);
}

#[test]
fn rem_takes_the_sign_of_the_dividend() {
    assert_eq!(op(rem(A0, A1, A2), neg(-7), 2), neg(-1));
    assert_eq!(op(rem(A0, A1, A2), 7, neg(-2)), 1);
    assert_eq!(op(rem(A0, A1, A2), neg(-7), neg(-2)), neg(-1));
}

#[test]
fn divu_and_remu_treat_operands_as_unsigned() {
    assert_eq!(op(divu(A0, A1, A2), NEG1, 2), i64::MAX as u64);
    assert_eq!(op(remu(A0, A1, A2), NEG1, 2), 1);
    assert_eq!(op(divu(A0, A1, A2), 5, NEG1), 0);
    assert_eq!(op(remu(A0, A1, A2), 5, NEG1), 5);
}

#[test]
fn div_by_zero_returns_all_ones() {
    assert_eq!(op(div(A0, A1, A2), 42, 0), NEG1);
    assert_eq!(op(div(A0, A1, A2), neg(-42), 0), NEG1);
}

#[test]
fn divu_by_zero_returns_all_ones() {
    assert_eq!(op(divu(A0, A1, A2), 42, 0), NEG1);
}

#[test]
fn rem_by_zero_returns_the_dividend() {
    assert_eq!(op(rem(A0, A1, A2), neg(-42), 0), neg(-42));
}

#[test]
fn remu_by_zero_returns_the_dividend() {
    assert_eq!(op(remu(A0, A1, A2), NEG1 - 1, 0), NEG1 - 1);
}

#[test]
fn div_of_the_most_negative_value_by_minus_one_returns_the_dividend() {
    assert_eq!(op(div(A0, A1, A2), MIN, NEG1), MIN);
}

#[test]
fn rem_of_the_most_negative_value_by_minus_one_returns_zero() {
    assert_eq!(op(rem(A0, A1, A2), MIN, NEG1), 0);
}

#[test]
fn division_by_zero_does_not_trap() {
    let m = run_code(&[div(A0, A1, A2), addi(A3, ZERO, 1)], &[(A1, 1)]);
    assert_eq!(m.x(A3), 1);
    assert_eq!(m.pc(), CODE + 8);
}

// ---------------------------------------------------------------- W division

#[test]
fn divw_divides_the_low_words_rounding_toward_zero() {
    assert_eq!(op(divw(A0, A1, A2), 0xffff_ffff_ffff_fff9, 2), neg(-3));
    // The upper 32 bits of both operands are ignored.
    assert_eq!(op(divw(A0, A1, A2), 0x1_0000_0006, 0xffff_ffff_0000_0003), 2);
}

#[test]
fn remw_takes_the_sign_of_the_low_word_of_the_dividend() {
    assert_eq!(op(remw(A0, A1, A2), 0x0000_0000_ffff_fff9, 2), neg(-1));
    assert_eq!(op(remw(A0, A1, A2), 0xffff_ffff_0000_0007, neg(-2)), 1);
}

#[test]
fn divuw_sign_extends_its_32_bit_quotient() {
    assert_eq!(op(divuw(A0, A1, A2), 0xffff_ffff, 1), NEG1);
    assert_eq!(op(divuw(A0, A1, A2), 0x1_ffff_fffe, 2), 0x7fff_ffff);
    assert_eq!(op(divuw(A0, A1, A2), 0x8000_0000, 1), 0xffff_ffff_8000_0000);
}

#[test]
fn remuw_sign_extends_its_32_bit_remainder() {
    assert_eq!(op(remuw(A0, A1, A2), 0xffff_ffff, 0x8000_0000), 0x7fff_ffff);
    assert_eq!(op(remuw(A0, A1, A2), 0x8000_0001, 0xc000_0000), 0xffff_ffff_8000_0001);
}

#[test]
fn divw_by_zero_returns_all_ones() {
    assert_eq!(op(divw(A0, A1, A2), 42, 0x1_0000_0000), NEG1);
}

#[test]
fn divuw_by_zero_returns_all_ones() {
    assert_eq!(op(divuw(A0, A1, A2), 42, 0xffff_ffff_0000_0000), NEG1);
}

#[test]
fn remw_by_zero_returns_the_sign_extended_low_word_of_the_dividend() {
    assert_eq!(op(remw(A0, A1, A2), 0x1_8000_0001, 0), 0xffff_ffff_8000_0001);
    assert_eq!(op(remw(A0, A1, A2), 0xffff_ffff_0000_0005, 0x7_0000_0000), 5);
}

#[test]
fn remuw_by_zero_returns_the_sign_extended_low_word_of_the_dividend() {
    assert_eq!(op(remuw(A0, A1, A2), 0x1_8000_0000, 0), 0xffff_ffff_8000_0000);
}

#[test]
fn divw_of_the_most_negative_word_by_minus_one_returns_the_dividend() {
    assert_eq!(op(divw(A0, A1, A2), 0x8000_0000, 0xffff_ffff), 0xffff_ffff_8000_0000);
}

#[test]
fn remw_of_the_most_negative_word_by_minus_one_returns_zero() {
    assert_eq!(op(remw(A0, A1, A2), 0x8000_0000, 0xffff_ffff), 0);
}
