//! F and D: one test per behaviour the spec defines, each run on the hart. (The
//! arithmetic itself is checked bit for bit against Berkeley SoftFloat in
//! fp_vectors.rs.)

mod fp_common;

use fp_common::*;

/// A boxed single.
fn s(x: f32) -> u64 {
    box_s(x.to_bits())
}

fn d(x: f64) -> u64 {
    x.to_bits()
}

const QNAN_S_PAYLOAD: u32 = 0x7fc0_1234;
const SNAN_S: u32 = 0x7f80_0001;
const QNAN_D_PAYLOAD: u64 = 0x7ff8_0000_0000_1234;
const SNAN_D: u64 = 0x7ff0_0000_0000_0001;

/// Run one instruction that must not trap.
fn exec(m: &mut Machine, insn: u32) {
    m.run(&[insn]);
    assert_eq!(m.trapped(), None, "instruction {insn:#010x} trapped");
}

/// f1 = op(f2, f3) for the given register values; returns (f1, fflags).
fn binary(insn: u32, a: u64, b: u64) -> (u64, u64) {
    let mut m = Machine::new();
    m.hart.state.f[2] = a;
    m.hart.state.f[3] = b;
    exec(&mut m, insn);
    (m.hart.state.f[1], m.fflags())
}

/// x1 = op(f2, f3); returns (x1, fflags).
fn to_x(insn: u32, a: u64, b: u64) -> (u64, u64) {
    let mut m = Machine::new();
    m.hart.state.f[2] = a;
    m.hart.state.f[3] = b;
    exec(&mut m, insn);
    (m.hart.state.x[1], m.fflags())
}

/// fcvt.<int>.<fmt> with a static rounding mode: (x1, fflags).
fn cvt_to_int(int: u32, fmt: u32, value: u64, rm: u32) -> (u64, u64) {
    to_x(fcvt_int_f(int, fmt, 1, 2, rm), value, 0)
}

// ---- NaN boxing and canonical NaNs ----

#[test]
fn unboxed_single_operand_reads_as_canonical_nan() {
    let unboxed_one = 0x3f80_0000u64;
    let upper_half_boxed = 0xffff_fffe_3f80_0000u64;
    assert_eq!(binary(fadd(S, 1, 2, 3, RNE), unboxed_one, s(1.0)), (CANONICAL_NAN_S, 0));
    assert_eq!(binary(fadd(S, 1, 2, 3, RNE), s(1.0), upper_half_boxed), (CANONICAL_NAN_S, 0));
}

#[test]
fn single_results_are_nan_boxed() {
    assert_eq!(binary(fadd(S, 1, 2, 3, RNE), s(1.0), s(2.0)), (0xffff_ffff_4040_0000, 0));
    assert_eq!(binary(fcvt_s_d(1, 2, RNE), d(0.5), 0), (s(0.5), 0));
}

#[test]
fn arithmetic_nan_results_are_canonical() {
    let qnan_s = box_s(QNAN_S_PAYLOAD);
    assert_eq!(binary(fadd(S, 1, 2, 3, RNE), qnan_s, s(1.0)), (CANONICAL_NAN_S, 0));
    assert_eq!(binary(fmul(D, 1, 2, 3, RNE), d(1.0), QNAN_D_PAYLOAD), (CANONICAL_NAN_D, 0));
    assert_eq!(binary(fsub(D, 1, 2, 3, RNE), d(f64::INFINITY), d(f64::INFINITY)), (CANONICAL_NAN_D, NV));
    assert_eq!(binary(fsqrt(S, 1, 2, RNE), qnan_s, 0), (CANONICAL_NAN_S, 0));
}

#[test]
fn signaling_nan_operand_raises_invalid_and_gives_canonical_nan() {
    assert_eq!(binary(fadd(S, 1, 2, 3, RNE), box_s(SNAN_S), s(1.0)), (CANONICAL_NAN_S, NV));
    assert_eq!(binary(fdiv(D, 1, 2, 3, RNE), d(1.0), SNAN_D), (CANONICAL_NAN_D, NV));
}

#[test]
fn sign_injection_moves_nan_bits_unchanged() {
    let negated_payload = QNAN_D_PAYLOAD | 1 << 63;
    assert_eq!(binary(fsgnjn(D, 1, 2, 3), QNAN_D_PAYLOAD, QNAN_D_PAYLOAD), (negated_payload, 0));
    assert_eq!(binary(fsgnj(S, 1, 2, 3), box_s(SNAN_S), s(-1.0)), (box_s(SNAN_S | 0x8000_0000), 0));
}

#[test]
fn sign_injection_of_unboxed_single_uses_canonical_nan() {
    let unboxed = 0x0000_0000_bf80_0000u64;
    assert_eq!(binary(fsgnjn(S, 1, 2, 3), unboxed, unboxed), (0xffff_ffff_ffc0_0000, 0));
}

#[test]
fn fsgnjx_xors_the_signs() {
    assert_eq!(binary(fsgnjx(S, 1, 2, 3), s(-2.0), s(-3.0)), (s(2.0), 0));
    assert_eq!(binary(fsgnjx(S, 1, 2, 3), s(2.0), s(-3.0)), (s(-2.0), 0));
    assert_eq!(binary(fsgnjx(D, 1, 2, 3), d(-2.0), d(3.0)), (d(-2.0), 0));
}

// ---- fmin / fmax ----

#[test]
fn fmin_fmax_return_the_other_operand_of_a_quiet_nan() {
    let qnan = box_s(QNAN_S_PAYLOAD);
    assert_eq!(binary(fmin(S, 1, 2, 3), qnan, s(1.0)), (s(1.0), 0));
    assert_eq!(binary(fmax(S, 1, 2, 3), s(-1.0), qnan), (s(-1.0), 0));
    assert_eq!(binary(fmax(D, 1, 2, 3), QNAN_D_PAYLOAD, d(2.0)), (d(2.0), 0));
}

#[test]
fn fmin_fmax_of_two_nans_is_canonical_nan() {
    assert_eq!(binary(fmin(S, 1, 2, 3), box_s(QNAN_S_PAYLOAD), box_s(SNAN_S)), (CANONICAL_NAN_S, NV));
    assert_eq!(binary(fmax(D, 1, 2, 3), QNAN_D_PAYLOAD, QNAN_D_PAYLOAD), (CANONICAL_NAN_D, 0));
}

#[test]
fn fmin_fmax_signaling_nan_raises_invalid_and_returns_the_other() {
    assert_eq!(binary(fmin(S, 1, 2, 3), box_s(SNAN_S), s(3.0)), (s(3.0), NV));
    assert_eq!(binary(fmax(D, 1, 2, 3), d(-3.0), SNAN_D), (d(-3.0), NV));
}

#[test]
fn fmin_fmax_order_negative_zero_below_positive_zero() {
    assert_eq!(binary(fmin(S, 1, 2, 3), s(0.0), s(-0.0)), (s(-0.0), 0));
    assert_eq!(binary(fmin(S, 1, 2, 3), s(-0.0), s(0.0)), (s(-0.0), 0));
    assert_eq!(binary(fmax(D, 1, 2, 3), d(-0.0), d(0.0)), (d(0.0), 0));
    assert_eq!(binary(fmax(D, 1, 2, 3), d(0.0), d(-0.0)), (d(0.0), 0));
}

#[test]
fn fmin_fmax_compare_numerically() {
    assert_eq!(binary(fmin(D, 1, 2, 3), d(-5.0), d(2.0)), (d(-5.0), 0));
    assert_eq!(binary(fmax(S, 1, 2, 3), s(f32::NEG_INFINITY), s(-1e30)), (s(-1e30), 0));
}

// ---- conversions to integers: saturation and NV ----

#[test]
fn fcvt_w_saturates_and_raises_invalid() {
    let max = i32::MAX as u64;
    let min = i32::MIN as i64 as u64;
    assert_eq!(cvt_to_int(W, S, CANONICAL_NAN_S, RTZ), (max, NV));
    assert_eq!(cvt_to_int(W, D, SNAN_D, RTZ), (max, NV));
    assert_eq!(cvt_to_int(W, S, s(f32::INFINITY), RTZ), (max, NV));
    assert_eq!(cvt_to_int(W, S, s(f32::NEG_INFINITY), RTZ), (min, NV));
    assert_eq!(cvt_to_int(W, D, d(3e9), RTZ), (max, NV));
    assert_eq!(cvt_to_int(W, D, d(-3e9), RTZ), (min, NV));
    // -2^31 - 0.5 rounds (RTZ) into range; 2^31 - 0.5 rounds (RUP) out of it.
    assert_eq!(cvt_to_int(W, D, d(-2147483648.5), RTZ), (min, NX));
    assert_eq!(cvt_to_int(W, D, d(2147483647.5), RUP), (max, NV));
}

#[test]
fn fcvt_wu_saturates_and_raises_invalid() {
    let max = u64::MAX; // 0xffff_ffff, sign-extended
    assert_eq!(cvt_to_int(WU, S, CANONICAL_NAN_S, RTZ), (max, NV));
    assert_eq!(cvt_to_int(WU, S, s(f32::INFINITY), RTZ), (max, NV));
    assert_eq!(cvt_to_int(WU, S, s(f32::NEG_INFINITY), RTZ), (0, NV));
    assert_eq!(cvt_to_int(WU, D, d(5e9), RTZ), (max, NV));
    assert_eq!(cvt_to_int(WU, D, d(-1.0), RTZ), (0, NV));
    // -0.5 rounds to zero, which is in range: inexact, not invalid.
    assert_eq!(cvt_to_int(WU, D, d(-0.5), RTZ), (0, NX));
    assert_eq!(cvt_to_int(WU, D, d(-0.5), RDN), (0, NV));
}

#[test]
fn fcvt_wu_sign_extends_its_32_bit_result() {
    assert_eq!(cvt_to_int(WU, D, d(3e9), RTZ), (0xffff_ffff_b2d0_5e00, 0));
}

#[test]
fn fcvt_l_saturates_and_raises_invalid() {
    assert_eq!(cvt_to_int(L, D, CANONICAL_NAN_D, RTZ), (i64::MAX as u64, NV));
    assert_eq!(cvt_to_int(L, D, d(f64::INFINITY), RTZ), (i64::MAX as u64, NV));
    assert_eq!(cvt_to_int(L, S, s(f32::NEG_INFINITY), RTZ), (i64::MIN as u64, NV));
    assert_eq!(cvt_to_int(L, D, d(1e19), RTZ), (i64::MAX as u64, NV));
    assert_eq!(cvt_to_int(L, S, s(-1e19), RTZ), (i64::MIN as u64, NV));
    assert_eq!(cvt_to_int(L, D, d(-(2f64.powi(63))), RTZ), (i64::MIN as u64, 0));
}

#[test]
fn fcvt_lu_saturates_and_raises_invalid() {
    assert_eq!(cvt_to_int(LU, S, box_s(SNAN_S), RTZ), (u64::MAX, NV));
    assert_eq!(cvt_to_int(LU, D, d(f64::INFINITY), RTZ), (u64::MAX, NV));
    assert_eq!(cvt_to_int(LU, D, d(f64::NEG_INFINITY), RTZ), (0, NV));
    assert_eq!(cvt_to_int(LU, D, d(2e19), RTZ), (u64::MAX, NV));
    assert_eq!(cvt_to_int(LU, D, d(-1.0), RTZ), (0, NV));
    assert_eq!(cvt_to_int(LU, D, d(2f64.powi(64) - 2048.0), RTZ), (u64::MAX - 2047, 0));
}

#[test]
fn fcvt_to_int_inexact_raises_nx() {
    assert_eq!(cvt_to_int(W, S, s(1.25), RTZ), (1, NX));
    assert_eq!(cvt_to_int(L, D, d(-0.0), RTZ), (0, 0));
}

#[test]
fn fcvt_from_int_rounds_and_raises_nx() {
    let mut m = Machine::new();
    m.hart.state.x[2] = 16_777_217; // 2^24 + 1: a tie between two singles
    exec(&mut m, fcvt_f_int(S, W, 1, 2, RNE));
    assert_eq!((m.hart.state.f[1], m.fflags()), (s(16_777_216.0), NX));
    // fcvt.s.wu reads only the low 32 bits.
    m.hart.state.x[2] = 0xdead_beef_0000_0003;
    exec(&mut m, fcvt_f_int(S, WU, 1, 2, RNE));
    assert_eq!(m.hart.state.f[1], s(3.0));
}

// ---- rounding modes ----

#[test]
fn each_rounding_mode_rounds_halves_its_own_way() {
    let cases = [(RNE, 2, -2), (RTZ, 2, -2), (RDN, 2, -3), (RUP, 3, -2), (RMM, 3, -3)];
    for (rm, up, down) in cases {
        assert_eq!(cvt_to_int(W, S, s(2.5), rm), (up as u64, NX), "rm {rm}");
        assert_eq!(cvt_to_int(W, S, s(-2.5), rm), (down as i64 as u64, NX), "rm {rm}");
    }
    assert_eq!(cvt_to_int(W, D, d(3.5), RNE), (4, NX));
}

#[test]
fn fadd_halfway_results_follow_the_rounding_mode() {
    let half_ulp = 2f32.powi(-24);
    let next = 1.0 + f32::EPSILON;
    let cases = [(RNE, 1.0, -1.0), (RTZ, 1.0, -1.0), (RDN, 1.0, -next), (RUP, next, -1.0), (RMM, next, -next)];
    for (rm, pos, neg) in cases {
        assert_eq!(binary(fadd(S, 1, 2, 3, rm), s(1.0), s(half_ulp)), (s(pos), NX), "rm {rm}");
        assert_eq!(binary(fadd(S, 1, 2, 3, rm), s(-1.0), s(-half_ulp)), (s(neg), NX), "rm {rm}");
    }
}

#[test]
fn exact_zero_sum_is_negative_only_rounding_down() {
    assert_eq!(binary(fsub(D, 1, 2, 3, RNE), d(1.5), d(1.5)), (d(0.0), 0));
    assert_eq!(binary(fsub(D, 1, 2, 3, RDN), d(1.5), d(1.5)), (d(-0.0), 0));
}

#[test]
fn dynamic_rounding_mode_uses_frm() {
    let mut m = Machine::new();
    m.set_frm(RUP);
    m.set_s(2, 2.5);
    exec(&mut m, fcvt_int_f(W, S, 1, 2, DYN));
    assert_eq!(m.hart.state.x[1], 3);
}

#[test]
fn dynamic_rounding_mode_with_invalid_frm_is_illegal() {
    for frm in [5, 6, 7] {
        let mut m = Machine::new();
        m.set_frm(frm);
        m.set_d(2, 1.0);
        m.set_d(3, 1e-30);
        m.hart.state.f[1] = 0x1234;
        m.run(&[fadd(D, 1, 2, 3, DYN)]);
        assert_eq!(m.trapped(), Some(2), "frm {frm}");
        assert_eq!((m.hart.state.f[1], m.fflags(), m.fs()), (0x1234, 0, FS_INITIAL));
    }
}

#[test]
fn widening_conversions_check_the_rounding_mode_too() {
    let mut m = Machine::new();
    m.set_frm(6);
    m.run(&[fcvt_d_s(1, 2, DYN)]);
    assert_eq!(m.trapped(), Some(2));
}

#[test]
fn reserved_static_rounding_modes_are_illegal() {
    for rm in [5, 6] {
        let mut m = Machine::new();
        m.run(&[fmul(S, 1, 2, 3, rm)]);
        assert_eq!(m.trapped(), Some(2), "rm {rm}");
    }
}

// ---- mstatus.FS ----

#[test]
fn fp_instructions_are_illegal_when_fs_is_off() {
    for insn in [fadd(S, 1, 2, 3, RNE), flw(1, 0, 0), fsd(1, 0, 0), fmv_x_f(D, 1, 2), feq(S, 1, 2, 3)] {
        let mut m = Machine::new();
        m.hart.state.mstatus &= !(3 << FS_SHIFT);
        m.run(&[insn]);
        assert_eq!(m.trapped(), Some(2), "insn {insn:#010x}");
        assert_eq!(m.hart.state.mtval, insn as u64);
    }
}

#[test]
fn writing_an_f_register_makes_fs_dirty() {
    let mut m = Machine::new();
    m.set_s(2, 1.0);
    m.set_s(3, 2.0);
    exec(&mut m, fadd(S, 1, 2, 3, RNE));
    assert_eq!((m.fs(), m.fflags()), (FS_DIRTY, 0));
}

#[test]
fn accruing_flags_makes_fs_dirty() {
    let mut m = Machine::new();
    m.hart.state.f[2] = CANONICAL_NAN_D;
    exec(&mut m, flt(D, 1, 2, 2));
    assert_eq!((m.fs(), m.fflags()), (FS_DIRTY, NV));
}

#[test]
fn writing_only_an_integer_register_leaves_fs_clean() {
    let mut m = Machine::new();
    m.set_d(2, 1.0);
    exec(&mut m, fmv_x_f(D, 1, 2));
    exec(&mut m, feq(D, 1, 2, 2));
    assert_eq!(m.fs(), FS_INITIAL);
}

#[test]
fn flags_accrue_across_instructions() {
    let mut m = Machine::new();
    m.set_d(2, 1.0);
    m.set_d(3, 0.0);
    m.set_d(4, 3.0);
    m.run(&[fdiv(D, 1, 2, 3, RNE), fdiv(D, 1, 2, 4, RNE)]);
    assert_eq!(m.fflags(), DZ | NX);
}

// ---- exception flags ----

#[test]
fn division_by_zero_raises_dz() {
    assert_eq!(binary(fdiv(S, 1, 2, 3, RNE), s(1.0), s(0.0)), (s(f32::INFINITY), DZ));
    assert_eq!(binary(fdiv(D, 1, 2, 3, RNE), d(-1.0), d(0.0)), (d(f64::NEG_INFINITY), DZ));
    assert_eq!(binary(fdiv(D, 1, 2, 3, RNE), d(0.0), d(0.0)), (CANONICAL_NAN_D, NV));
}

#[test]
fn overflow_raises_of_and_nx() {
    assert_eq!(binary(fmul(S, 1, 2, 3, RNE), s(f32::MAX), s(2.0)), (s(f32::INFINITY), OF | NX));
    assert_eq!(binary(fmul(D, 1, 2, 3, RTZ), d(f64::MAX), d(2.0)), (d(f64::MAX), OF | NX));
    assert_eq!(binary(fadd(D, 1, 2, 3, RDN), d(f64::MAX), d(f64::MAX)), (d(f64::MAX), OF | NX));
    assert_eq!(binary(fcvt_s_d(1, 2, RNE), d(1e300), 0), (s(f32::INFINITY), OF | NX));
}

#[test]
fn tiny_inexact_results_raise_uf_and_nx() {
    let min_sub_s = f32::from_bits(1);
    assert_eq!(binary(fmul(S, 1, 2, 3, RNE), s(min_sub_s), s(0.5)), (s(0.0), UF | NX));
    assert_eq!(binary(fdiv(D, 1, 2, 3, RNE), d(f64::MIN_POSITIVE), d(3.0)), (d(f64::MIN_POSITIVE / 3.0), UF | NX));
}

#[test]
fn tiny_exact_results_do_not_raise_uf() {
    assert_eq!(binary(fmul(S, 1, 2, 3, RNE), s(f32::MIN_POSITIVE), s(0.5)), (s(f32::MIN_POSITIVE / 2.0), 0));
}

#[test]
fn underflow_is_detected_after_rounding() {
    // (1 - 3000 * 2^-24) * 2^-126 (1 + 1500 * 2^-23) rounds up to 2^-126 on the subnormal
    // grid, but stays below 2^-126 when rounded with an unbounded exponent: tiny.
    let a = box_s(0x3f7f_f448);
    let b = box_s(0x0080_05dc);
    assert_eq!(binary(fmul(S, 1, 2, 3, RNE), a, b), (s(f32::MIN_POSITIVE), UF | NX));
    assert_eq!(binary(fmul(S, 1, 2, 3, RUP), a, b), (s(f32::MIN_POSITIVE), NX));
}

#[test]
fn fsqrt_of_negative_is_invalid_but_of_negative_zero_is_negative_zero() {
    assert_eq!(binary(fsqrt(D, 1, 2, RNE), d(-1.0), 0), (CANONICAL_NAN_D, NV));
    assert_eq!(binary(fsqrt(D, 1, 2, RNE), d(-0.0), 0), (d(-0.0), 0));
    assert_eq!(binary(fsqrt(S, 1, 2, RNE), s(6.25), 0), (s(2.5), 0));
}

// ---- comparisons and fclass ----

#[test]
fn feq_is_quiet_and_flt_fle_signal_on_quiet_nan() {
    let qnan = box_s(QNAN_S_PAYLOAD);
    assert_eq!(to_x(feq(S, 1, 2, 3), qnan, s(1.0)), (0, 0));
    assert_eq!(to_x(flt(S, 1, 2, 3), qnan, s(1.0)), (0, NV));
    assert_eq!(to_x(fle(S, 1, 2, 3), s(1.0), qnan), (0, NV));
    assert_eq!(to_x(feq(D, 1, 2, 3), SNAN_D, d(1.0)), (0, NV));
}

#[test]
fn comparisons_treat_zeros_as_equal() {
    assert_eq!(to_x(feq(D, 1, 2, 3), d(-0.0), d(0.0)), (1, 0));
    assert_eq!(to_x(flt(D, 1, 2, 3), d(-0.0), d(0.0)), (0, 0));
    assert_eq!(to_x(fle(S, 1, 2, 3), s(0.0), s(-0.0)), (1, 0));
    assert_eq!(to_x(flt(S, 1, 2, 3), s(-2.0), s(-1.0)), (1, 0));
}

#[test]
fn fclass_sets_one_bit_per_class() {
    let cases: [(u64, u64); 10] = [
        (d(f64::NEG_INFINITY), 1 << 0),
        (d(-1.0), 1 << 1),
        (d(-f64::from_bits(1)), 1 << 2),
        (d(-0.0), 1 << 3),
        (d(0.0), 1 << 4),
        (d(f64::from_bits(0x000f_ffff_ffff_ffff)), 1 << 5),
        (d(f64::MAX), 1 << 6),
        (d(f64::INFINITY), 1 << 7),
        (SNAN_D, 1 << 8),
        (QNAN_D_PAYLOAD, 1 << 9),
    ];
    for (value, class) in cases {
        assert_eq!(to_x(fclass(D, 1, 2), value, 0), (class, 0), "value {value:#x}");
    }
    assert_eq!(to_x(fclass(S, 1, 2), box_s(0x8000_0001), 0), (1 << 2, 0));
    assert_eq!(to_x(fclass(S, 1, 2), box_s(SNAN_S), 0), (1 << 8, 0));
    // An unboxed single is the canonical (quiet) NaN.
    assert_eq!(to_x(fclass(S, 1, 2), 0x3f80_0000, 0), (1 << 9, 0));
}

// ---- moves ----

#[test]
fn fmv_x_w_sign_extends_the_low_32_bits() {
    assert_eq!(to_x(fmv_x_f(S, 1, 2), box_s(0x8000_0001), 0), (0xffff_ffff_8000_0001, 0));
    assert_eq!(to_x(fmv_x_f(S, 1, 2), box_s(0x7fff_ffff), 0), (0x7fff_ffff, 0));
    // The bits move as they are, boxed or not.
    assert_eq!(to_x(fmv_x_f(S, 1, 2), 0x1234_5678_8765_4321, 0), (0xffff_ffff_8765_4321, 0));
}

#[test]
fn fmv_w_x_boxes_the_low_32_bits() {
    let mut m = Machine::new();
    m.hart.state.x[2] = 0xdead_beef_7f80_0001;
    exec(&mut m, fmv_f_x(S, 1, 2));
    assert_eq!((m.hart.state.f[1], m.fs()), (box_s(0x7f80_0001), FS_DIRTY));
}

#[test]
fn fmv_d_x_and_fmv_x_d_keep_nan_payloads() {
    let mut m = Machine::new();
    m.hart.state.x[2] = SNAN_D;
    m.run(&[fmv_f_x(D, 1, 2), fmv_x_f(D, 3, 1)]);
    assert_eq!((m.hart.state.f[1], m.hart.state.x[3], m.fflags()), (SNAN_D, SNAN_D, 0));
}

// ---- fused multiply-add ----

#[test]
fn fmadd_rounds_once() {
    // (1 + 2^-23)(1 - 2^-23) - 1 = -2^-46 exactly; a rounded product would be 1.0
    // and give 0.
    let mut m = Machine::new();
    m.set_s(2, 1.0 + f32::EPSILON);
    m.set_s(3, 1.0 - f32::EPSILON);
    m.set_s(4, -1.0);
    exec(&mut m, fma(MADD, S, 1, 2, 3, 4, RNE));
    assert_eq!((m.hart.state.f[1], m.fflags()), (s(-(2f32.powi(-46))), 0));
}

#[test]
fn fused_forms_negate_product_and_addend() {
    let (a, b, c) = (d(2.0), d(3.0), d(1.0));
    let run = |opcode: u32| {
        let mut m = Machine::new();
        m.hart.state.f[2..5].copy_from_slice(&[a, b, c]);
        exec(&mut m, fma(opcode, D, 1, 2, 3, 4, RNE));
        f64::from_bits(m.hart.state.f[1])
    };
    assert_eq!([run(MADD), run(MSUB), run(NMSUB), run(NMADD)], [7.0, 5.0, -5.0, -7.0]);
}

#[test]
fn fmadd_of_infinity_times_zero_is_invalid_even_with_quiet_nan_addend() {
    let mut m = Machine::new();
    m.hart.state.f[2..5].copy_from_slice(&[d(f64::INFINITY), d(0.0), QNAN_D_PAYLOAD]);
    exec(&mut m, fma(MADD, D, 1, 2, 3, 4, RNE));
    assert_eq!((m.hart.state.f[1], m.fflags()), (CANONICAL_NAN_D, NV));
}

// ---- conversions between formats ----

#[test]
fn fcvt_s_d_rounds_per_mode() {
    let x = 1.0 + 2f64.powi(-24) + 2f64.powi(-40); // just above the halfway point
    let up = s(1.0 + f32::EPSILON);
    assert_eq!(binary(fcvt_s_d(1, 2, RNE), d(x), 0), (up, NX));
    assert_eq!(binary(fcvt_s_d(1, 2, RTZ), d(x), 0), (s(1.0), NX));
    assert_eq!(binary(fcvt_s_d(1, 2, RUP), d(x), 0), (up, NX));
    assert_eq!(binary(fcvt_s_d(1, 2, RDN), d(-x), 0), (s(-1.0 - f32::EPSILON), NX));
}

#[test]
fn fcvt_between_formats_canonicalizes_nans() {
    assert_eq!(binary(fcvt_s_d(1, 2, RNE), QNAN_D_PAYLOAD, 0), (CANONICAL_NAN_S, 0));
    assert_eq!(binary(fcvt_s_d(1, 2, RNE), SNAN_D, 0), (CANONICAL_NAN_S, NV));
    assert_eq!(binary(fcvt_d_s(1, 2, RNE), box_s(SNAN_S), 0), (CANONICAL_NAN_D, NV));
    assert_eq!(binary(fcvt_d_s(1, 2, RNE), s(-1.5), 0), (d(-1.5), 0));
}

// ---- loads and stores ----

#[test]
fn flw_boxes_and_fsw_stores_the_low_bits_unchanged() {
    let mut m = Machine::new();
    m.hart.state.x[5] = DATA;
    m.write_mem(DATA, &0x7f80_0001u32.to_le_bytes());
    m.hart.state.f[2] = 0x0123_4567_89ab_cdef; // not boxed: fsw stores it as it is
    m.run(&[flw(1, 5, 0), fsw(2, 5, 8)]);
    assert_eq!(m.hart.state.f[1], box_s(0x7f80_0001));
    assert_eq!(m.read_mem(DATA + 8, 4), 0x89ab_cdefu32.to_le_bytes());
    assert_eq!(m.fs(), FS_DIRTY);
}

#[test]
fn fld_and_fsd_move_bits_through_memory() {
    let mut m = Machine::new();
    m.hart.state.x[5] = DATA + 16;
    m.hart.state.f[2] = SNAN_D;
    m.run(&[fsd(2, 5, -8), fld(1, 5, -8)]);
    assert_eq!(m.read_mem(DATA + 8, 8), SNAN_D.to_le_bytes());
    assert_eq!((m.hart.state.f[1], m.fflags()), (SNAN_D, 0));
}

#[test]
fn fp_loads_and_stores_may_be_misaligned() {
    let mut m = Machine::new();
    m.hart.state.x[5] = DATA + 3;
    m.set_d(2, -2.75);
    m.set_s(3, 1.5);
    m.run(&[fsd(2, 5, 0), fld(1, 5, 0), fsw(3, 5, 13), flw(4, 5, 13)]);
    assert_eq!(m.read_mem(DATA + 3, 8), (-2.75f64).to_le_bytes());
    assert_eq!((m.hart.state.f[1], m.hart.state.f[4]), (d(-2.75), s(1.5)));
}

#[test]
fn fp_load_crossing_a_page_boundary_is_carried_out() {
    let mut m = Machine::new();
    let addr = RAM_BASE + 0x2ffc;
    m.write_mem(addr, &0x4010_0000_0000_0000u64.to_le_bytes()); // 4.0
    m.hart.state.x[5] = addr;
    exec(&mut m, fld(1, 5, 0));
    assert_eq!(m.hart.state.f[1], d(4.0));
}

#[test]
fn faulting_fld_leaves_register_and_fs_unchanged() {
    let mut m = Machine::new();
    m.hart.state.x[5] = 0x1000; // no RAM, no device
    m.hart.state.f[1] = 0x1234;
    m.run(&[fld(1, 5, 8)]);
    assert_eq!(m.trapped(), Some(5));
    assert_eq!((m.hart.state.mtval, m.hart.state.mepc), (0x1008, RAM_BASE));
    assert_eq!((m.hart.state.f[1], m.fs()), (0x1234, FS_INITIAL));
}

#[test]
fn faulting_fsw_raises_store_access_fault() {
    let mut m = Machine::new();
    m.hart.state.x[5] = 0x1000;
    m.run(&[fsw(1, 5, 0)]);
    assert_eq!((m.trapped(), m.hart.state.mtval), (Some(7), 0x1000));
}
