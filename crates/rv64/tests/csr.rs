//! Zicsr and the CSR access rules of the privileged spec: read-modify-write
//! semantics, which accesses trap (privilege, read-only numbers, counter enables,
//! TVM, Sstc), WARL fields, and the supervisor CSRs as views of the machine ones.

mod common;
use common::*;
use rv64::PrivMode;

/// Run `words` from CODE at privilege `p` for `words.len()` retired-or-trapped steps.
fn run_as(p: PrivMode, words: &[u32], regs: &[(u32, u64)]) -> Machine {
    let mut m = Machine::with_code(words);
    m.set_privilege(p);
    for &(r, v) in regs {
        m.set_x(r, v);
    }
    m.run(words.len() as u64);
    m
}

fn assert_illegal(m: &Machine, insn: u32) {
    assert_eq!(m.mcause(), CAUSE_ILLEGAL_INSTRUCTION, "mcause for {insn:#010x}");
    assert_eq!(m.mtval(), insn as u64, "mtval for {insn:#010x}");
    assert_eq!(m.pc(), M_HANDLER);
}

// ---------------------------------------------------------------- Zicsr

#[test]
fn csrrw_returns_the_old_value_and_writes_rs1() {
    let m = run_as(PrivMode::Machine, &[csrrw(A0, MSCRATCH, A1), csrrw(A2, MSCRATCH, A3)], &[(A1, 0x1234), (A3, 7)]);
    assert_eq!(m.x(A0), 0);
    assert_eq!(m.x(A2), 0x1234);
    assert_eq!(m.hart.state.mscratch, 7);
}

#[test]
fn csrrw_with_rd_equal_to_rs1_swaps() {
    let mut m = Machine::with_code(&[csrrw(A0, MSCRATCH, A0)]);
    m.hart.state.mscratch = 5;
    m.set_x(A0, 9);
    m.run(1);
    assert_eq!((m.x(A0), m.hart.state.mscratch), (5, 9));
}

#[test]
fn csrrs_sets_the_bits_of_rs1_and_returns_the_old_value() {
    let mut m = Machine::with_code(&[csrrs(A0, MSCRATCH, A1)]);
    m.hart.state.mscratch = 0xf0;
    m.set_x(A1, 0x0f);
    m.run(1);
    assert_eq!((m.x(A0), m.hart.state.mscratch), (0xf0, 0xff));
}

#[test]
fn csrrc_clears_the_bits_of_rs1_and_returns_the_old_value() {
    let mut m = Machine::with_code(&[csrrc(A0, MSCRATCH, A1)]);
    m.hart.state.mscratch = 0xff;
    m.set_x(A1, 0x0f);
    m.run(1);
    assert_eq!((m.x(A0), m.hart.state.mscratch), (0xff, 0xf0));
}

#[test]
fn the_immediate_forms_use_a_zero_extended_5_bit_value() {
    let m = run_as(
        PrivMode::Machine,
        &[csrrwi(A0, MSCRATCH, 31), csrrsi(A1, MSCRATCH, 0), csrrci(A2, MSCRATCH, 0b101)],
        &[],
    );
    assert_eq!(m.x(A0), 0);
    assert_eq!(m.x(A1), 31);
    assert_eq!(m.x(A2), 31);
    assert_eq!(m.hart.state.mscratch, 0b11010);
}

#[test]
fn csrrsi_sets_bits_from_the_immediate() {
    let mut m = Machine::with_code(&[csrrsi(A0, MSCRATCH, 0b10001)]);
    m.hart.state.mscratch = 0x100;
    m.run(1);
    assert_eq!((m.x(A0), m.hart.state.mscratch), (0x100, 0x111));
}

#[test]
fn reading_a_read_only_csr_with_csrrs_x0_does_not_trap() {
    let m = run_as(PrivMode::Machine, &[csrr(A0, MHARTID), csrrs(A1, MVENDORID, ZERO), csrrc(A2, MARCHID, ZERO)], &[]);
    assert_eq!(m.x(A0), 0);
    assert_eq!(m.pc(), CODE + 12);
}

#[test]
fn reading_a_read_only_csr_with_a_zero_immediate_does_not_trap() {
    let m = run_as(PrivMode::Machine, &[csrrsi(A0, MIMPID, 0), csrrci(A1, MHARTID, 0)], &[]);
    assert_eq!(m.pc(), CODE + 8);
}

#[test]
fn csrrs_with_a_nonzero_rs1_is_a_write_even_if_the_register_holds_zero() {
    let insn = csrrs(A0, MHARTID, A1);
    let m = run_as(PrivMode::Machine, &[insn], &[(A0, 77), (A1, 0)]);
    assert_illegal(&m, insn);
    assert_eq!(m.x(A0), 77);
}

#[test]
fn writing_a_read_only_csr_is_illegal_and_leaves_rd_unwritten() {
    let insn = csrrw(A0, MVENDORID, A1);
    let m = run_as(PrivMode::Machine, &[insn], &[(A0, 77)]);
    assert_illegal(&m, insn);
    assert_eq!(m.x(A0), 77);
}

#[test]
fn csrw_to_cycle_is_illegal_even_in_machine_mode() {
    let insn = csrw(CYCLE, A1);
    assert_illegal(&run_as(PrivMode::Machine, &[insn], &[]), insn);
}

#[test]
fn an_unimplemented_csr_is_illegal() {
    let insn = csrr(A0, 0x8ff);
    assert_illegal(&run_as(PrivMode::Machine, &[insn], &[]), insn);
}

// ---------------------------------------------------------------- privilege

#[test]
fn supervisor_mode_cannot_access_machine_csrs() {
    let insn = csrr(A0, MSTATUS);
    assert_illegal(&run_as(PrivMode::Supervisor, &[insn], &[]), insn);
    let insn = csrw(MSCRATCH, A1);
    assert_illegal(&run_as(PrivMode::Supervisor, &[insn], &[]), insn);
}

#[test]
fn user_mode_cannot_access_supervisor_csrs() {
    let insn = csrr(A0, SSTATUS);
    assert_illegal(&run_as(PrivMode::User, &[insn], &[]), insn);
    let insn = csrw(SSCRATCH, A1);
    assert_illegal(&run_as(PrivMode::User, &[insn], &[]), insn);
}

#[test]
fn supervisor_mode_can_use_supervisor_csrs() {
    let m = run_as(PrivMode::Supervisor, &[csrw(SSCRATCH, A1), csrr(A0, SSCRATCH)], &[(A1, 0xabc)]);
    assert_eq!(m.x(A0), 0xabc);
    assert_eq!(m.pc(), CODE + 8);
}

// ---------------------------------------------------------------- counters

#[test]
fn minstret_counts_retired_instructions() {
    let m = run_as(PrivMode::Machine, &[nop(), nop(), nop(), csrr(A0, MINSTRET), csrr(A1, INSTRET)], &[]);
    assert_eq!(m.x(A0), 3);
    assert_eq!(m.x(A1), 4);
}

#[test]
fn mcycle_advances_with_execution() {
    let m = run_as(PrivMode::Machine, &[csrr(A0, MCYCLE), nop(), nop(), csrr(A1, CYCLE)], &[]);
    assert!(m.x(A1) > m.x(A0));
}

#[test]
fn a_value_written_to_minstret_is_the_value_the_next_instruction_reads() {
    // "If a CSR access instruction writes such a CSR, the write is done instead of the
    // increment": the writer does not count itself.
    let m = run_as(PrivMode::Machine, &[nop(), csrw(MINSTRET, A1), csrr(A0, MINSTRET)], &[(A1, 1000)]);
    assert_eq!(m.x(A0), 1000);
}

#[test]
fn writing_mcycle_does_not_change_minstret() {
    let m = run_as(PrivMode::Machine, &[nop(), nop(), csrw(MCYCLE, A1), csrr(A0, MINSTRET)], &[(A1, 1_000_000)]);
    assert_eq!(m.x(A0), 3);
}

#[test]
fn supervisor_counter_reads_need_the_mcounteren_bit() {
    let insn = csrr(A0, CYCLE);
    assert_illegal(&run_as(PrivMode::Supervisor, &[insn], &[]), insn);
    let mut m = Machine::with_code(&[csrr(A0, CYCLE), csrr(A1, TIME), csrr(A2, INSTRET)]);
    m.hart.state.mcounteren = 0b111;
    m.set_privilege(PrivMode::Supervisor);
    m.run(3);
    assert_eq!(m.pc(), CODE + 12);
    assert_eq!(m.x(A2), 2);
}

#[test]
fn each_mcounteren_bit_enables_only_its_own_counter() {
    let insn = csrr(A0, INSTRET);
    let mut m = Machine::with_code(&[csrr(A1, CYCLE), csrr(A2, TIME), insn]);
    m.hart.state.mcounteren = 0b011;
    m.set_privilege(PrivMode::Supervisor);
    m.run(3);
    assert_illegal(&m, insn);
    assert_eq!(m.mepc(), CODE + 8);
}

#[test]
fn user_counter_reads_need_both_mcounteren_and_scounteren() {
    let insn = csrr(A0, TIME);
    let mut m = Machine::with_code(&[insn]);
    m.hart.state.mcounteren = 0b010;
    m.set_privilege(PrivMode::User);
    m.run(1);
    assert_illegal(&m, insn);

    let mut m = Machine::with_code(&[insn]);
    m.hart.state.scounteren = 0b010;
    m.set_privilege(PrivMode::User);
    m.run(1);
    assert_illegal(&m, insn);

    let mut m = Machine::with_code(&[insn]);
    m.hart.state.mcounteren = 0b010;
    m.hart.state.scounteren = 0b010;
    m.set_privilege(PrivMode::User);
    m.run(1);
    assert_eq!(m.pc(), CODE + 4);
}

#[test]
fn hpmcounter_reads_follow_their_counteren_bit() {
    let insn = csrr(A0, HPMCOUNTER3);
    assert_illegal(&run_as(PrivMode::Supervisor, &[insn], &[]), insn);
    let mut m = Machine::with_code(&[insn]);
    m.hart.state.mcounteren = 1 << 3;
    m.set_privilege(PrivMode::Supervisor);
    m.run(1);
    assert_eq!(m.pc(), CODE + 4);
}

#[test]
fn the_rv32_high_half_counters_do_not_exist_on_rv64() {
    for csr in [0xc80, 0xc81, 0xc82, 0xb80, 0xb82] {
        let insn = csrr(A0, csr);
        assert_illegal(&run_as(PrivMode::Machine, &[insn], &[]), insn);
    }
}

// ---------------------------------------------------------------- mstatus

fn mstatus_after_writing(value: u64) -> u64 {
    let m = run_as(PrivMode::Machine, &[csrw(MSTATUS, A1), csrr(A0, MSTATUS)], &[(A1, value)]);
    m.x(A0)
}

#[test]
fn mstatus_mpp_keeps_the_modes_that_exist() {
    assert_eq!(mstatus_after_writing(3 << 11) & MSTATUS_MPP, 3 << 11);
    assert_eq!(mstatus_after_writing(1 << 11) & MSTATUS_MPP, 1 << 11);
    assert_eq!(mstatus_after_writing(0) & MSTATUS_MPP, 0);
}

#[test]
fn mstatus_mpp_is_warl_and_turns_the_reserved_value_2_into_user() {
    assert_eq!(mstatus_after_writing(2 << 11) & MSTATUS_MPP, 0);
}

#[test]
fn mstatus_uxl_and_sxl_read_as_64_bit_and_ignore_writes() {
    assert_eq!(mstatus_after_writing(0) & (MSTATUS_UXL | MSTATUS_SXL), (2 << 32) | (2 << 34));
    assert_eq!(mstatus_after_writing(u64::MAX) & (MSTATUS_UXL | MSTATUS_SXL), (2 << 32) | (2 << 34));
}

#[test]
fn mstatus_sd_summarises_a_dirty_fs() {
    assert_eq!(mstatus_after_writing(3 << 13) & MSTATUS_SD, MSTATUS_SD);
    assert_eq!(mstatus_after_writing(2 << 13) & MSTATUS_SD, 0);
    assert_eq!(mstatus_after_writing(1 << 13) & MSTATUS_SD, 0);
}

#[test]
fn mstatus_sd_is_read_only() {
    assert_eq!(mstatus_after_writing(MSTATUS_SD) & MSTATUS_SD, 0);
}

#[test]
fn mstatus_keeps_its_writable_fields() {
    let fields = MSTATUS_SIE
        | MSTATUS_MIE
        | MSTATUS_SPIE
        | MSTATUS_MPIE
        | MSTATUS_SPP
        | MSTATUS_MPRV
        | MSTATUS_SUM
        | MSTATUS_MXR
        | MSTATUS_TVM
        | MSTATUS_TW
        | MSTATUS_TSR
        | (1 << 13);
    assert_eq!(mstatus_after_writing(fields) & fields, fields);
}

#[test]
fn the_float_csrs_are_illegal_while_fs_is_off() {
    let insn = csrr(A0, FCSR);
    assert_illegal(&run_as(PrivMode::Machine, &[insn], &[]), insn);
    let insn = csrw(FFLAGS, A1);
    assert_illegal(&run_as(PrivMode::Machine, &[insn], &[]), insn);
}

#[test]
fn writing_fflags_marks_the_float_state_dirty() {
    let mut m = Machine::with_code(&[csrw(FFLAGS, A1), csrr(A0, MSTATUS)]);
    m.hart.state.mstatus = 1 << 13; // FS = Initial
    m.set_x(A1, 1);
    m.run(2);
    assert_eq!(m.x(A0) & MSTATUS_FS, MSTATUS_FS);
    assert_eq!(m.x(A0) & MSTATUS_SD, MSTATUS_SD);
}

#[test]
fn fflags_and_frm_are_fields_of_fcsr() {
    let mut m = Machine::with_code(&[csrw(FCSR, A1), csrr(A2, FFLAGS), csrr(A3, FRM), csrwi_frm(2), csrr(A4, FCSR)]);
    m.hart.state.mstatus = 1 << 13;
    m.set_x(A1, 0xff);
    m.run(5);
    assert_eq!((m.x(A2), m.x(A3), m.x(A4)), (0x1f, 7, 0x5f));
}

fn csrwi_frm(v: u32) -> u32 {
    csrrwi(ZERO, FRM, v)
}

// ---------------------------------------------------------------- sstatus

#[test]
fn sstatus_shows_only_the_supervisor_fields_of_mstatus() {
    let mut m = Machine::with_code(&[csrr(A0, SSTATUS)]);
    m.hart.state.mstatus = MSTATUS_MIE
        | MSTATUS_MPIE
        | MSTATUS_MPP
        | MSTATUS_TVM
        | MSTATUS_TW
        | MSTATUS_TSR
        | MSTATUS_MPRV
        | MSTATUS_SIE
        | MSTATUS_SPP
        | MSTATUS_SUM
        | MSTATUS_FS;
    m.run(1);
    assert_eq!(m.x(A0), MSTATUS_SIE | MSTATUS_SPP | MSTATUS_SUM | MSTATUS_FS | MSTATUS_SD | (2 << 32));
}

#[test]
fn writing_sstatus_changes_only_the_supervisor_fields_of_mstatus() {
    let mut m = Machine::with_code(&[csrw(SSTATUS, A1), csrr(A0, MSTATUS)]);
    m.hart.state.mstatus = MSTATUS_MIE | (3 << 11);
    m.set_x(A1, u64::MAX);
    m.run(2);
    let s_fields = MSTATUS_SIE | MSTATUS_SPIE | MSTATUS_SPP | MSTATUS_SUM | MSTATUS_MXR | MSTATUS_FS;
    assert_eq!(m.x(A0), MSTATUS_MIE | (3 << 11) | s_fields | MSTATUS_SD | (2 << 32) | (2 << 34));
}

// ---------------------------------------------------------------- sie, sip, mie, mip

const S_IRQS: u64 = (1 << IRQ_SSI) | (1 << IRQ_STI) | (1 << IRQ_SEI);
const ALL_IRQS: u64 = S_IRQS | (1 << IRQ_MSI) | (1 << IRQ_MTI) | (1 << IRQ_MEI);

#[test]
fn mie_keeps_exactly_the_implemented_interrupt_bits() {
    let m = run_as(PrivMode::Machine, &[csrw(MIE, A1), csrr(A0, MIE)], &[(A1, u64::MAX)]);
    assert_eq!(m.x(A0), ALL_IRQS);
}

#[test]
fn mideleg_can_delegate_the_supervisor_interrupts() {
    let m = run_as(PrivMode::Machine, &[csrw(MIDELEG, A1), csrr(A0, MIDELEG)], &[(A1, S_IRQS)]);
    assert_eq!(m.x(A0), S_IRQS);
}

#[test]
fn medeleg_cannot_delegate_ecall_from_machine_mode() {
    let m = run_as(PrivMode::Machine, &[csrw(MEDELEG, A1), csrr(A0, MEDELEG)], &[(A1, u64::MAX)]);
    assert_eq!(m.x(A0) & (1 << CAUSE_MACHINE_ECALL), 0);
    let delegable = (1 << CAUSE_BREAKPOINT)
        | (1 << CAUSE_USER_ECALL)
        | (1 << CAUSE_ILLEGAL_INSTRUCTION)
        | (1 << CAUSE_FETCH_PAGE_FAULT)
        | (1 << CAUSE_LOAD_PAGE_FAULT)
        | (1 << CAUSE_STORE_PAGE_FAULT);
    assert_eq!(m.x(A0) & delegable, delegable);
}

#[test]
fn sie_is_read_only_zero_for_interrupts_not_delegated() {
    let mut m = Machine::with_code(&[csrw(SIE, A1), csrr(A0, SIE)]);
    m.hart.state.mie = 1 << IRQ_STI;
    m.set_x(A1, u64::MAX);
    m.run(2);
    assert_eq!(m.x(A0), 0);
    assert_eq!(m.hart.state.mie, 1 << IRQ_STI);
}

#[test]
fn sie_writes_through_to_mie_for_delegated_interrupts() {
    let mut m = Machine::with_code(&[csrw(SIE, A1), csrr(A0, SIE), csrr(A2, MIE)]);
    m.hart.state.mideleg = 1 << IRQ_SSI;
    m.set_x(A1, u64::MAX);
    m.run(3);
    assert_eq!(m.x(A0), 1 << IRQ_SSI);
    assert_eq!(m.x(A2), 1 << IRQ_SSI);
}

#[test]
fn sip_shows_only_delegated_pending_bits() {
    let mut m = Machine::with_code(&[csrr(A0, SIP)]);
    m.hart.state.mip = (1 << IRQ_SSI) | (1 << IRQ_STI) | (1 << IRQ_MSI);
    m.hart.state.mideleg = 1 << IRQ_STI;
    m.run(1);
    assert_eq!(m.x(A0), 1 << IRQ_STI);
}

#[test]
fn sip_ssip_is_writable_only_when_delegated() {
    let mut m = Machine::with_code(&[csrw(SIP, A1)]);
    m.set_x(A1, 1 << IRQ_SSI);
    m.run(1);
    assert_eq!(m.hart.state.mip, 0);

    let mut m = Machine::with_code(&[csrw(SIP, A1)]);
    m.hart.state.mideleg = S_IRQS;
    m.set_x(A1, 1 << IRQ_SSI);
    m.run(1);
    assert_eq!(m.hart.state.mip, 1 << IRQ_SSI);
}

#[test]
fn sip_stip_and_seip_are_read_only() {
    let mut m = Machine::with_code(&[csrw(SIP, A1), csrr(A0, MIP)]);
    m.hart.state.mideleg = S_IRQS;
    m.set_x(A1, (1 << IRQ_STI) | (1 << IRQ_SEI));
    m.run(2);
    assert_eq!(m.x(A0), 0);
}

#[test]
fn mip_machine_bits_are_read_only_and_supervisor_bits_are_writable() {
    let m = run_as(PrivMode::Machine, &[csrw(MIP, A1), csrr(A0, MIP)], &[(A1, u64::MAX)]);
    assert_eq!(m.x(A0), S_IRQS);
}

#[test]
fn mip_stip_is_read_only_while_sstc_is_enabled() {
    let mut m = Machine::with_code(&[csrw(MIP, A1), csrr(A0, MIP)]);
    m.hart.state.menvcfg = MENVCFG_STCE;
    m.hart.set_stimecmp(u64::MAX);
    m.set_x(A1, 1 << IRQ_STI);
    m.run(2);
    assert_eq!(m.x(A0), 0);
}

#[test]
fn enabling_sstc_hides_a_stip_written_by_software() {
    // With STCE = 1, STIP reflects only the stimecmp comparison.
    let mut m = Machine::with_code(&[csrw(MIP, A1), csrw(MENVCFG, A2), csrr(A0, MIP)]);
    m.hart.set_stimecmp(u64::MAX);
    m.set_x(A1, 1 << IRQ_STI);
    m.set_x(A2, MENVCFG_STCE);
    m.run(3);
    assert_eq!(m.x(A0), 0);
}

#[test]
fn mip_seip_reads_as_the_software_bit_or_the_external_line() {
    let mut m = Machine::with_code(&[csrr(A0, MIP)]);
    m.bus.irq_s = true;
    m.run(1);
    assert_eq!(m.x(A0), 1 << IRQ_SEI);
}

#[test]
fn a_read_modify_write_of_mip_does_not_latch_the_external_seip_line() {
    // "Only the software-writable SEIP bit is used by read-modify-write instructions."
    let mut m = Machine::with_code(&[csrs(MIP, A1), sw(A2, A3, 0), csrr(A0, MIP)]);
    m.bus.irq_s = true;
    m.set_x(A1, 1 << IRQ_SSI);
    m.set_x(A2, 0); // drop both external lines
    m.set_x(A3, MMIO_IRQ);
    m.run(3);
    assert_eq!(m.x(A0), 1 << IRQ_SSI);
}

// ---------------------------------------------------------------- xepc, xtvec

#[test]
fn mepc_and_sepc_bit_0_is_always_zero() {
    let m = run_as(
        PrivMode::Machine,
        &[csrw(MEPC, A1), csrr(A0, MEPC), csrw(SEPC, A1), csrr(A2, SEPC)],
        &[(A1, 0x8000_1235)],
    );
    assert_eq!(m.x(A0), 0x8000_1234);
    assert_eq!(m.x(A2), 0x8000_1234);
}

#[test]
fn mtvec_and_stvec_keep_a_direct_or_vectored_mode() {
    let m = run_as(
        PrivMode::Machine,
        &[csrw(MTVEC, A1), csrr(A0, MTVEC), csrw(STVEC, A2), csrr(A3, STVEC)],
        &[(A1, 0x8000_4001), (A2, 0x8000_5000)],
    );
    assert_eq!(m.x(A0), 0x8000_4001);
    assert_eq!(m.x(A3), 0x8000_5000);
}

// ---------------------------------------------------------------- satp

#[test]
fn satp_accepts_sv39() {
    let value = SATP_SV39 | 0x8_0123;
    let m = run_as(PrivMode::Machine, &[csrw(SATP, A1), csrr(A0, SATP)], &[(A1, value)]);
    assert_eq!(m.x(A0), value);
}

#[test]
fn satp_write_with_an_unsupported_mode_has_no_effect() {
    let mut m = Machine::with_code(&[csrw(SATP, A1), csrr(A0, SATP)]);
    m.hart.state.satp = SATP_SV39 | 0x8_0001;
    m.set_x(A1, (9 << 60) | 0x8_0002); // Sv48
    m.run(2);
    assert_eq!(m.x(A0), SATP_SV39 | 0x8_0001);
}

#[test]
fn satp_accepts_bare() {
    let mut m = Machine::with_code(&[csrw(SATP, ZERO), csrr(A0, SATP)]);
    m.hart.state.satp = SATP_SV39 | 0x8_0001;
    m.run(2);
    assert_eq!(m.x(A0), 0);
}

#[test]
fn satp_is_illegal_in_supervisor_mode_when_tvm_is_set() {
    let insn = csrr(A0, SATP);
    let mut m = Machine::with_code(&[insn]);
    m.hart.state.mstatus = MSTATUS_TVM;
    m.set_privilege(PrivMode::Supervisor);
    m.run(1);
    assert_illegal(&m, insn);
}

#[test]
fn satp_is_accessible_in_supervisor_mode_when_tvm_is_clear_and_in_machine_mode_always() {
    let m = run_as(PrivMode::Supervisor, &[csrw(SATP, ZERO), csrr(A0, SATP)], &[]);
    assert_eq!(m.pc(), CODE + 8);
    let mut m = Machine::with_code(&[csrr(A0, SATP)]);
    m.hart.state.mstatus = MSTATUS_TVM;
    m.run(1);
    assert_eq!(m.pc(), CODE + 4);
}

// ---------------------------------------------------------------- identification

#[test]
fn misa_reports_rv64_with_imafdc_and_s_and_u_modes() {
    let m = run_as(PrivMode::Machine, &[csrr(A0, MISA)], &[]);
    let letters = |s: &str| s.bytes().fold(0u64, |acc, c| acc | 1 << (c - b'A'));
    assert_eq!(m.x(A0) >> 62, 2);
    assert_eq!(m.x(A0) & letters("IMAFDCSU"), letters("IMAFDCSU"));
}

#[test]
fn mhartid_reads_the_hart_id() {
    let mut m = Machine::with_code(&[csrr(A0, MHARTID)]);
    m.hart.state.hart_id = 3;
    m.run(1);
    assert_eq!(m.x(A0), 3);
}

// ---------------------------------------------------------------- Sstc access

#[test]
fn stimecmp_is_illegal_in_supervisor_mode_while_menvcfg_stce_is_clear() {
    let insn = csrr(A0, STIMECMP);
    let mut m = Machine::with_code(&[insn]);
    m.hart.state.mcounteren = 0b010;
    m.set_privilege(PrivMode::Supervisor);
    m.run(1);
    assert_illegal(&m, insn);
}

#[test]
fn stimecmp_is_illegal_in_supervisor_mode_while_mcounteren_tm_is_clear() {
    let insn = csrw(STIMECMP, A1);
    let mut m = Machine::with_code(&[insn]);
    m.hart.state.menvcfg = MENVCFG_STCE;
    m.set_privilege(PrivMode::Supervisor);
    m.run(1);
    assert_illegal(&m, insn);
}

#[test]
fn stimecmp_is_accessible_in_supervisor_mode_with_stce_and_tm() {
    let mut m = Machine::with_code(&[csrw(STIMECMP, A1), csrr(A0, STIMECMP)]);
    m.hart.state.menvcfg = MENVCFG_STCE;
    m.hart.state.mcounteren = 0b010;
    m.set_privilege(PrivMode::Supervisor);
    m.set_x(A1, 12345);
    m.run(2);
    assert_eq!(m.x(A0), 12345);
}

#[test]
fn menvcfg_stce_is_writable() {
    let m = run_as(PrivMode::Machine, &[csrw(MENVCFG, A1), csrr(A0, MENVCFG)], &[(A1, MENVCFG_STCE)]);
    assert_eq!(m.x(A0) & MENVCFG_STCE, MENVCFG_STCE);
}
