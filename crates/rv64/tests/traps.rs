//! Exceptions, interrupts and the run loop: where a trap goes (delegation), what it
//! records (xepc, xcause, xtval), how it stacks and unstacks the status bits, vectored
//! interrupts, priority and enables per privilege, WFI, the timers (mtimecmp, Sstc),
//! and why `Hart::run` returns.

mod common;
use common::*;
use rv64::{Cpu, Exit, HartConfig, Interrupt, JitConfig, PrivMode};

fn nops(n: usize) -> Vec<u32> {
    vec![nop(); n]
}

/// A machine running `words` at privilege `p`.
fn machine_as(p: PrivMode, words: &[u32]) -> Machine {
    let mut m = Machine::with_code(words);
    m.set_privilege(p);
    m
}

// ---------------------------------------------------------------- ecall, ebreak

#[test]
fn ecall_from_machine_mode_raises_cause_11() {
    let mut m = machine_as(PrivMode::Machine, &[nop(), ecall()]);
    m.run(2);
    assert_eq!((m.mcause(), m.mepc(), m.mtval()), (CAUSE_MACHINE_ECALL, CODE + 4, 0));
    assert_eq!(m.pc(), M_HANDLER);
}

#[test]
fn ecall_from_supervisor_mode_raises_cause_9() {
    let mut m = machine_as(PrivMode::Supervisor, &[ecall()]);
    m.run(1);
    assert_eq!((m.mcause(), m.mepc(), m.mtval()), (CAUSE_SUPERVISOR_ECALL, CODE, 0));
    assert_eq!(m.privilege(), PrivMode::Machine);
}

#[test]
fn ecall_from_user_mode_raises_cause_8() {
    let mut m = machine_as(PrivMode::User, &[ecall()]);
    m.run(1);
    assert_eq!((m.mcause(), m.mepc(), m.mtval()), (CAUSE_USER_ECALL, CODE, 0));
    assert_eq!(m.privilege(), PrivMode::Machine);
}

#[test]
fn ebreak_raises_a_breakpoint_at_its_own_address() {
    let mut m = machine_as(PrivMode::Supervisor, &[nop(), ebreak()]);
    m.run(2);
    assert_eq!((m.mcause(), m.mepc()), (CAUSE_BREAKPOINT, CODE + 4));
}

#[test]
fn an_instruction_that_traps_does_not_retire() {
    let mut m = machine_as(PrivMode::Machine, &[ecall()]);
    m.run(1);
    // The one step is the trap's entry: nothing retired, minstret did not move.
    assert_eq!(m.hart.state.icount, 1);
    assert_eq!(m.hart.state.icount.wrapping_add(m.hart.state.instret_offset), 0);
    assert_eq!((m.pc(), m.mepc()), (M_HANDLER, CODE));
}

// ---------------------------------------------------------------- trap entry into M

#[test]
fn a_trap_into_machine_mode_records_the_previous_privilege_in_mpp() {
    for (p, mpp) in [(PrivMode::User, 0), (PrivMode::Supervisor, 1), (PrivMode::Machine, 3)] {
        let mut m = machine_as(p, &[ecall()]);
        m.hart.state.mstatus = 2 << 11; // a value no trap would leave
        m.run(1);
        assert_eq!((m.hart.state.mstatus & MSTATUS_MPP) >> 11, mpp, "from {p:?}");
    }
}

#[test]
fn a_trap_into_machine_mode_moves_mie_to_mpie_and_clears_mie() {
    let mut m = machine_as(PrivMode::Machine, &[ecall()]);
    m.hart.state.mstatus = MSTATUS_MIE;
    m.run(1);
    assert_eq!(m.hart.state.mstatus & (MSTATUS_MIE | MSTATUS_MPIE), MSTATUS_MPIE);

    let mut m = machine_as(PrivMode::Machine, &[ecall()]);
    m.hart.state.mstatus = MSTATUS_MPIE;
    m.run(1);
    assert_eq!(m.hart.state.mstatus & (MSTATUS_MIE | MSTATUS_MPIE), 0);
}

// ---------------------------------------------------------------- delegation

#[test]
fn a_delegated_exception_from_user_mode_goes_to_supervisor_mode() {
    let mut m = machine_as(PrivMode::User, &[nop(), ecall()]);
    m.hart.state.medeleg = 1 << CAUSE_USER_ECALL;
    m.hart.state.mstatus = MSTATUS_SIE | MSTATUS_SPP;
    m.run(2);
    assert_eq!(m.privilege(), PrivMode::Supervisor);
    assert_eq!(m.pc(), S_HANDLER);
    assert_eq!((m.scause(), m.sepc(), m.stval()), (CAUSE_USER_ECALL, CODE + 4, 0));
    // SPP = U, SPIE = old SIE, SIE = 0.
    assert_eq!(m.hart.state.mstatus & (MSTATUS_SPP | MSTATUS_SPIE | MSTATUS_SIE), MSTATUS_SPIE);
    assert_eq!((m.mcause(), m.mepc()), (0, 0));
}

#[test]
fn a_delegated_exception_from_supervisor_mode_sets_spp() {
    let insn = 0xffff_ffff;
    let mut m = machine_as(PrivMode::Supervisor, &[insn]);
    m.hart.state.medeleg = 1 << CAUSE_ILLEGAL_INSTRUCTION;
    m.run(1);
    assert_eq!(m.privilege(), PrivMode::Supervisor);
    assert_eq!((m.scause(), m.sepc(), m.stval()), (CAUSE_ILLEGAL_INSTRUCTION, CODE, insn as u64));
    assert_eq!(m.hart.state.mstatus & (MSTATUS_SPP | MSTATUS_SPIE | MSTATUS_SIE), MSTATUS_SPP);
}

#[test]
fn a_delegated_trap_leaves_the_machine_trap_state_alone() {
    let mut m = machine_as(PrivMode::User, &[ecall()]);
    m.hart.state.medeleg = 1 << CAUSE_USER_ECALL;
    m.hart.state.mstatus = MSTATUS_MIE | (1 << 11);
    m.run(1);
    assert_eq!(m.hart.state.mstatus & (MSTATUS_MIE | MSTATUS_MPIE | MSTATUS_MPP), MSTATUS_MIE | (1 << 11));
}

#[test]
fn exceptions_in_machine_mode_are_never_delegated() {
    let mut m = machine_as(PrivMode::Machine, &[ebreak()]);
    m.hart.state.medeleg = 1 << CAUSE_BREAKPOINT;
    m.run(1);
    assert_eq!(m.privilege(), PrivMode::Machine);
    assert_eq!(m.mcause(), CAUSE_BREAKPOINT);
    assert_eq!(m.scause(), 0);
}

#[test]
fn an_exception_not_delegated_goes_to_machine_mode_from_supervisor_mode() {
    let mut m = machine_as(PrivMode::Supervisor, &[ebreak()]);
    m.hart.state.medeleg = 1 << CAUSE_USER_ECALL;
    m.run(1);
    assert_eq!(m.privilege(), PrivMode::Machine);
    assert_eq!(m.mcause(), CAUSE_BREAKPOINT);
}

// ---------------------------------------------------------------- mret, sret

#[test]
fn mret_returns_to_mpp_at_mepc_and_restores_mie_from_mpie() {
    let mut m = machine_as(PrivMode::Machine, &[mret()]);
    m.hart.state.mepc = CODE + 0x100;
    m.hart.state.mstatus = MSTATUS_MPIE | (1 << 11);
    m.run(1);
    assert_eq!(m.privilege(), PrivMode::Supervisor);
    assert_eq!(m.pc(), CODE + 0x100);
    // MIE = old MPIE, MPIE = 1, MPP = U (the least-privileged mode).
    assert_eq!(m.hart.state.mstatus & (MSTATUS_MIE | MSTATUS_MPIE | MSTATUS_MPP), MSTATUS_MIE | MSTATUS_MPIE);
}

#[test]
fn mret_with_mpie_clear_leaves_mie_clear() {
    let mut m = machine_as(PrivMode::Machine, &[mret()]);
    m.hart.state.mepc = CODE + 0x100;
    m.hart.state.mstatus = MSTATUS_MIE;
    m.run(1);
    assert_eq!(m.privilege(), PrivMode::User);
    assert_eq!(m.hart.state.mstatus & (MSTATUS_MIE | MSTATUS_MPIE), MSTATUS_MPIE);
}

#[test]
fn mret_to_a_lower_mode_clears_mprv() {
    let mut m = machine_as(PrivMode::Machine, &[mret()]);
    m.hart.state.mepc = CODE + 0x100;
    m.hart.state.mstatus = MSTATUS_MPRV | (1 << 11);
    m.run(1);
    assert_eq!(m.hart.state.mstatus & MSTATUS_MPRV, 0);
}

#[test]
fn mret_to_machine_mode_keeps_mprv() {
    let mut m = machine_as(PrivMode::Machine, &[mret()]);
    m.hart.state.mepc = CODE + 0x100;
    m.hart.state.mstatus = MSTATUS_MPRV | (3 << 11);
    m.run(1);
    assert_eq!(m.privilege(), PrivMode::Machine);
    assert_eq!(m.hart.state.mstatus & MSTATUS_MPRV, MSTATUS_MPRV);
}

#[test]
fn sret_returns_to_spp_at_sepc_and_restores_sie_from_spie() {
    let mut m = machine_as(PrivMode::Supervisor, &[sret()]);
    m.hart.state.sepc = CODE + 0x200;
    m.hart.state.mstatus = MSTATUS_SPIE;
    m.run(1);
    assert_eq!(m.privilege(), PrivMode::User);
    assert_eq!(m.pc(), CODE + 0x200);
    assert_eq!(m.hart.state.mstatus & (MSTATUS_SIE | MSTATUS_SPIE | MSTATUS_SPP), MSTATUS_SIE | MSTATUS_SPIE);
}

#[test]
fn sret_with_spp_set_returns_to_supervisor_mode_and_sets_spp_to_user() {
    let mut m = machine_as(PrivMode::Supervisor, &[sret()]);
    m.hart.state.sepc = CODE + 0x200;
    m.hart.state.mstatus = MSTATUS_SPP | MSTATUS_SIE;
    m.run(1);
    assert_eq!(m.privilege(), PrivMode::Supervisor);
    assert_eq!(m.hart.state.mstatus & (MSTATUS_SIE | MSTATUS_SPIE | MSTATUS_SPP), MSTATUS_SPIE);
}

#[test]
fn sret_clears_mprv() {
    let mut m = machine_as(PrivMode::Machine, &[sret()]);
    m.hart.state.sepc = CODE + 0x200;
    m.hart.state.mstatus = MSTATUS_MPRV | MSTATUS_SPP;
    m.run(1);
    assert_eq!(m.privilege(), PrivMode::Supervisor);
    assert_eq!(m.hart.state.mstatus & MSTATUS_MPRV, 0);
}

#[test]
fn a_trap_and_its_return_round_trip_from_user_mode() {
    // U: ecall -> M handler at CODE+0x40: csrr mepc; addi 4; csrw mepc; mret -> U.
    let mut m = machine_as(PrivMode::User, &[ecall(), addi(A1, ZERO, 9)]);
    m.load(CODE + 0x40, &[csrr(A0, MEPC), addi(A0, A0, 4), csrw(MEPC, A0), mret()]);
    m.hart.state.mtvec = CODE + 0x40;
    // Five instructions retire; the trap entry is a step of its own.
    m.run(6);
    assert_eq!(m.privilege(), PrivMode::User);
    assert_eq!(m.x(A1), 9);
    assert_eq!(m.pc(), CODE + 8);
}

fn assert_illegal(m: &Machine, insn: u32) {
    assert_eq!(m.mcause(), CAUSE_ILLEGAL_INSTRUCTION, "mcause for {insn:#010x}");
    assert_eq!(m.mtval(), insn as u64, "mtval for {insn:#010x}");
    assert_eq!(m.mepc(), CODE);
}

#[test]
fn mret_below_machine_mode_is_illegal() {
    let mut m = machine_as(PrivMode::Supervisor, &[mret()]);
    m.run(1);
    assert_illegal(&m, mret());
    let mut m = machine_as(PrivMode::User, &[mret()]);
    m.run(1);
    assert_illegal(&m, mret());
}

#[test]
fn sret_in_user_mode_is_illegal() {
    let mut m = machine_as(PrivMode::User, &[sret()]);
    m.run(1);
    assert_illegal(&m, sret());
}

#[test]
fn sret_in_supervisor_mode_is_illegal_when_tsr_is_set() {
    let mut m = machine_as(PrivMode::Supervisor, &[sret()]);
    m.hart.state.mstatus = MSTATUS_TSR;
    m.run(1);
    assert_illegal(&m, sret());
}

#[test]
fn tsr_does_not_affect_machine_mode() {
    let mut m = machine_as(PrivMode::Machine, &[sret()]);
    m.hart.state.mstatus = MSTATUS_TSR;
    m.hart.state.sepc = CODE + 0x200;
    m.run(1);
    assert_eq!(m.pc(), CODE + 0x200);
}

#[test]
fn wfi_in_supervisor_mode_is_illegal_when_tw_is_set() {
    let mut m = machine_as(PrivMode::Supervisor, &[wfi()]);
    m.hart.state.mstatus = MSTATUS_TW;
    m.run(1);
    assert_illegal(&m, wfi());
}

#[test]
fn wfi_in_user_mode_is_illegal() {
    let mut m = machine_as(PrivMode::User, &[wfi()]);
    m.run(1);
    assert_illegal(&m, wfi());
}

#[test]
fn sfence_vma_in_supervisor_mode_is_illegal_when_tvm_is_set() {
    let mut m = machine_as(PrivMode::Supervisor, &[sfence_vma(0, 0)]);
    m.hart.state.mstatus = MSTATUS_TVM;
    m.run(1);
    assert_illegal(&m, sfence_vma(0, 0));
}

#[test]
fn sfence_vma_in_user_mode_is_illegal() {
    let mut m = machine_as(PrivMode::User, &[sfence_vma(0, 0)]);
    m.run(1);
    assert_illegal(&m, sfence_vma(0, 0));
}

// ---------------------------------------------------------------- interrupts

const ALL_IRQS: u64 =
    (1 << IRQ_SSI) | (1 << IRQ_MSI) | (1 << IRQ_STI) | (1 << IRQ_MTI) | (1 << IRQ_SEI) | (1 << IRQ_MEI);
const S_IRQS: u64 = (1 << IRQ_SSI) | (1 << IRQ_STI) | (1 << IRQ_SEI);

fn raise(m: &mut Machine, irq: Interrupt) {
    match irq {
        Interrupt::MachineExternal => m.bus.irq_m = true,
        Interrupt::SupervisorExternal => m.bus.irq_s = true,
        Interrupt::MachineTimer => m.hart.set_mtimecmp(0),
        Interrupt::MachineSoftware => m.hart.set_msip(true),
        other => m.hart.set_pending(other, true),
    }
}

/// A machine at privilege `p` running nops, with every interrupt enabled in mie.
fn interrupt_machine(p: PrivMode, mstatus: u64, mideleg: u64, pending: &[Interrupt]) -> Machine {
    let mut m = machine_as(p, &nops(8));
    m.hart.state.mie = ALL_IRQS;
    m.hart.state.mstatus = mstatus;
    m.hart.state.mideleg = mideleg;
    for &irq in pending {
        raise(&mut m, irq);
    }
    m
}

#[test]
fn an_interrupt_records_its_cause_with_the_interrupt_bit_and_the_next_pc() {
    let mut m = interrupt_machine(PrivMode::Supervisor, 0, 0, &[]);
    m.run(2);
    raise(&mut m, Interrupt::MachineExternal);
    m.run(1);
    assert_eq!(m.mcause(), INTERRUPT | IRQ_MEI);
    assert_eq!(m.mepc(), CODE + 8);
    assert_eq!(m.mtval(), 0);
    assert_eq!(m.pc(), M_HANDLER);
}

#[test]
fn interrupts_are_taken_in_the_spec_priority_order() {
    use Interrupt::*;
    // Each pair: the first wins. Chained, they fix MEI > MSI > MTI > SEI > SSI > STI.
    let pairs = [
        (MachineExternal, MachineSoftware),
        (MachineSoftware, MachineTimer),
        (MachineTimer, SupervisorExternal),
        (SupervisorExternal, SupervisorSoftware),
        (SupervisorSoftware, SupervisorTimer),
    ];
    for (winner, loser) in pairs {
        let mut m = interrupt_machine(PrivMode::User, 0, 0, &[loser, winner]);
        m.run(1);
        assert_eq!(m.mcause(), INTERRUPT | winner as u64, "{winner:?} over {loser:?}");
    }
}

#[test]
fn machine_interrupts_come_before_delegated_supervisor_interrupts() {
    use Interrupt::*;
    let mut m = interrupt_machine(PrivMode::User, 0, S_IRQS, &[SupervisorExternal, MachineTimer]);
    m.run(1);
    assert_eq!(m.privilege(), PrivMode::Machine);
    assert_eq!(m.mcause(), INTERRUPT | IRQ_MTI);
}

#[test]
fn machine_mode_takes_machine_interrupts_only_when_mie_is_set() {
    let mut m = interrupt_machine(PrivMode::Machine, 0, 0, &[Interrupt::MachineTimer]);
    m.run(1);
    assert_eq!((m.pc(), m.mcause()), (CODE + 4, 0));

    let mut m = interrupt_machine(PrivMode::Machine, MSTATUS_MIE, 0, &[Interrupt::MachineTimer]);
    m.run(1);
    assert_eq!(m.mcause(), INTERRUPT | IRQ_MTI);
}

#[test]
fn lower_modes_take_machine_interrupts_even_with_mie_clear() {
    for p in [PrivMode::Supervisor, PrivMode::User] {
        let mut m = interrupt_machine(p, 0, 0, &[Interrupt::MachineSoftware]);
        m.run(1);
        assert_eq!(m.mcause(), INTERRUPT | IRQ_MSI, "in {p:?}");
        assert_eq!(m.privilege(), PrivMode::Machine);
    }
}

#[test]
fn an_interrupt_disabled_in_mie_is_not_taken() {
    let mut m = interrupt_machine(PrivMode::User, 0, 0, &[Interrupt::MachineExternal]);
    m.hart.state.mie = ALL_IRQS & !(1 << IRQ_MEI);
    m.run(1);
    assert_eq!((m.pc(), m.mcause()), (CODE + 4, 0));
}

#[test]
fn a_supervisor_interrupt_not_delegated_is_taken_in_machine_mode() {
    let mut m = interrupt_machine(PrivMode::Supervisor, 0, 0, &[Interrupt::SupervisorSoftware]);
    m.run(1);
    assert_eq!(m.privilege(), PrivMode::Machine);
    assert_eq!(m.mcause(), INTERRUPT | IRQ_SSI);
}

#[test]
fn a_delegated_interrupt_is_never_taken_in_machine_mode() {
    let mut m =
        interrupt_machine(PrivMode::Machine, MSTATUS_MIE | MSTATUS_SIE, S_IRQS, &[Interrupt::SupervisorSoftware]);
    m.run(1);
    assert_eq!((m.pc(), m.mcause(), m.scause()), (CODE + 4, 0, 0));
}

#[test]
fn supervisor_mode_takes_delegated_interrupts_only_when_sie_is_set() {
    let mut m = interrupt_machine(PrivMode::Supervisor, 0, S_IRQS, &[Interrupt::SupervisorTimer]);
    m.run(1);
    assert_eq!((m.pc(), m.scause()), (CODE + 4, 0));

    let mut m = interrupt_machine(PrivMode::Supervisor, MSTATUS_SIE, S_IRQS, &[Interrupt::SupervisorTimer]);
    m.run(1);
    assert_eq!(m.privilege(), PrivMode::Supervisor);
    assert_eq!((m.scause(), m.sepc()), (INTERRUPT | IRQ_STI, CODE));
    assert_eq!(m.hart.state.mstatus & (MSTATUS_SIE | MSTATUS_SPIE | MSTATUS_SPP), MSTATUS_SPIE | MSTATUS_SPP);
}

#[test]
fn user_mode_takes_delegated_interrupts_even_with_sie_clear() {
    let mut m = interrupt_machine(PrivMode::User, 0, S_IRQS, &[Interrupt::SupervisorExternal]);
    m.run(1);
    assert_eq!(m.privilege(), PrivMode::Supervisor);
    assert_eq!(m.scause(), INTERRUPT | IRQ_SEI);
    assert_eq!(m.pc(), S_HANDLER);
}

#[test]
fn vectored_mtvec_sends_interrupts_to_base_plus_four_times_cause() {
    let mut m = interrupt_machine(PrivMode::User, 0, 0, &[Interrupt::MachineTimer]);
    m.hart.state.mtvec = M_HANDLER | 1;
    m.load(M_HANDLER + 4 * IRQ_MTI, &[jal(0, 0)]);
    m.run(1);
    assert_eq!(m.pc(), M_HANDLER + 4 * IRQ_MTI);
}

#[test]
fn vectored_mtvec_sends_exceptions_to_the_base() {
    let mut m = machine_as(PrivMode::User, &[ecall()]);
    m.hart.state.mtvec = M_HANDLER | 1;
    m.run(1);
    assert_eq!(m.pc(), M_HANDLER);
}

#[test]
fn vectored_stvec_sends_delegated_interrupts_to_base_plus_four_times_cause() {
    let mut m = interrupt_machine(PrivMode::User, 0, S_IRQS, &[Interrupt::SupervisorSoftware]);
    m.hart.state.stvec = S_HANDLER | 1;
    m.load(S_HANDLER + 4 * IRQ_SSI, &[jal(0, 0)]);
    m.run(1);
    assert_eq!(m.pc(), S_HANDLER + 4 * IRQ_SSI);
}

#[test]
fn a_device_store_that_raises_the_external_line_interrupts_before_the_next_instruction() {
    let mut m = Machine::with_code(&[sw(A1, A2, 0), nop(), nop()]);
    m.hart.state.mstatus = MSTATUS_MIE;
    m.hart.state.mie = 1 << IRQ_MEI;
    m.set_x(A1, 1);
    m.set_x(A2, MMIO_IRQ);
    m.run(2);
    assert_eq!(m.mcause(), INTERRUPT | IRQ_MEI);
    assert_eq!(m.mepc(), CODE + 4);
}

#[test]
fn setting_mstatus_mie_with_an_interrupt_pending_traps_before_the_next_instruction() {
    let mut m = Machine::with_code(&[csrsi_mie(), nop(), nop()]);
    m.hart.state.mie = 1 << IRQ_MSI;
    m.hart.set_msip(true);
    m.run(2);
    assert_eq!(m.mcause(), INTERRUPT | IRQ_MSI);
    assert_eq!(m.mepc(), CODE + 4);
}

fn csrsi_mie() -> u32 {
    csrrsi(ZERO, MSTATUS, MSTATUS_MIE as u32)
}

#[test]
fn mret_into_a_mode_where_a_pending_interrupt_is_enabled_takes_it_at_mepc() {
    // In M with MIE = 0 the supervisor-level SSIP (not delegated) waits; after mret to
    // S, machine-level enables no longer gate it.
    let mut m = Machine::with_code(&[mret()]);
    m.hart.state.mepc = CODE + 0x100;
    m.hart.state.mstatus = 1 << 11;
    m.hart.state.mie = 1 << IRQ_SSI;
    m.hart.set_pending(Interrupt::SupervisorSoftware, true);
    m.run(2);
    assert_eq!(m.mcause(), INTERRUPT | IRQ_SSI);
    assert_eq!(m.mepc(), CODE + 0x100);
    assert_eq!((m.hart.state.mstatus & MSTATUS_MPP) >> 11, 1);
}

// ---------------------------------------------------------------- WFI

#[test]
fn wfi_with_nothing_pending_returns_idle_after_retiring() {
    let mut m = machine_as(PrivMode::Machine, &[wfi(), nop()]);
    assert_eq!(m.run(10), Exit::Idle);
    assert_eq!(m.pc(), CODE + 4);
    assert_eq!(m.hart.state.icount, 1);
    assert_eq!(m.run(10), Exit::Idle);
    assert_eq!(m.pc(), CODE + 4);
}

#[test]
fn wfi_resumes_on_an_interrupt_pending_in_mie_even_if_globally_disabled() {
    let mut m = machine_as(PrivMode::Machine, &[wfi(), addi(A0, ZERO, 1)]);
    m.hart.state.mie = 1 << IRQ_MEI;
    assert_eq!(m.run(10), Exit::Idle);
    m.bus.irq_m = true;
    m.run(1);
    assert_eq!(m.x(A0), 1);
    assert_eq!(m.mcause(), 0);
    assert_eq!(m.pc(), CODE + 8);
}

#[test]
fn wfi_stays_idle_for_an_interrupt_disabled_in_mie() {
    let mut m = machine_as(PrivMode::Machine, &[wfi(), nop()]);
    m.hart.state.mie = 1 << IRQ_MTI;
    m.bus.irq_m = true;
    assert_eq!(m.run(10), Exit::Idle);
}

#[test]
fn an_enabled_interrupt_during_wfi_traps_with_mepc_after_the_wfi() {
    let mut m = machine_as(PrivMode::Machine, &[wfi(), nop()]);
    m.hart.state.mie = 1 << IRQ_MEI;
    m.hart.state.mstatus = MSTATUS_MIE;
    assert_eq!(m.run(10), Exit::Idle);
    m.bus.irq_m = true;
    m.run(1);
    assert_eq!(m.mcause(), INTERRUPT | IRQ_MEI);
    assert_eq!(m.mepc(), CODE + 4);
    assert!(!m.hart.state.wfi);
}

#[test]
fn tw_does_not_affect_wfi_in_machine_mode() {
    let mut m = machine_as(PrivMode::Machine, &[wfi()]);
    m.hart.state.mstatus = MSTATUS_TW;
    assert_eq!(m.run(10), Exit::Idle);
    assert_eq!(m.mcause(), 0);
}

#[test]
fn an_idle_hart_wakes_when_skipped_time_reaches_its_timer_deadline() {
    let mut m = machine_as(PrivMode::Machine, &[wfi(), nop()]);
    m.hart.state.mstatus = MSTATUS_MIE;
    m.hart.state.mie = 1 << IRQ_MTI;
    m.hart.set_mtimecmp(500);
    assert_eq!(m.run(10), Exit::Idle);
    let deadline = m.hart.next_timer_deadline().expect("mtimecmp is in the future");
    assert_eq!(deadline, 500);
    m.hart.skip_time(deadline - m.hart.time());
    m.run(1);
    assert_eq!(m.mcause(), INTERRUPT | IRQ_MTI);
    assert_eq!(m.mepc(), CODE + 4);
}

// ---------------------------------------------------------------- time and timers

#[test]
fn time_is_icount_divided_by_icount_per_tick() {
    let mut words = nops(25);
    words.push(csrr(A0, TIME));
    let mut m = Machine::with_code(&words);
    m.run(26);
    assert_eq!(m.x(A0), 2);
    assert_eq!(m.hart.time(), 2);
}

#[test]
fn time_includes_skipped_ticks() {
    let mut m = Machine::with_config(HartConfig { icount_per_tick: 3, sbi_in_monitor: false, ..HartConfig::default() });
    let mut words = nops(7);
    words.push(csrr(A0, TIME));
    m.load(CODE, &words);
    m.hart.skip_time(100);
    m.run(8);
    assert_eq!(m.x(A0), 102);
}

#[test]
fn mtip_is_pending_once_time_reaches_mtimecmp() {
    let mut words = nops(29);
    words.push(csrr(A0, MIP));
    words.extend(nops(10));
    words.push(csrr(A1, MIP));
    let mut m = Machine::with_code(&words);
    m.hart.set_mtimecmp(3);
    m.run(41);
    assert_eq!(m.x(A0) & (1 << IRQ_MTI), 0, "time 2.9");
    assert_eq!(m.x(A1) & (1 << IRQ_MTI), 1 << IRQ_MTI, "time 4");
}

#[test]
fn mtimecmp_raises_a_timer_interrupt_at_the_first_instruction_of_its_tick() {
    let mut m = Machine::with_code(&nops(40));
    m.hart.state.mstatus = MSTATUS_MIE;
    m.hart.state.mie = 1 << IRQ_MTI;
    m.hart.set_mtimecmp(3);
    m.run(30);
    assert_eq!((m.pc(), m.mcause()), (CODE + 120, 0));
    m.run(1);
    assert_eq!(m.mcause(), INTERRUPT | IRQ_MTI);
    assert_eq!(m.mepc(), CODE + 120);
}

#[test]
fn moving_mtimecmp_into_the_future_clears_mtip() {
    let mut m = Machine::with_code(&[csrr(A0, MIP), csrr(A1, MIP)]);
    m.hart.set_mtimecmp(0);
    m.run(1);
    m.hart.set_mtimecmp(1000);
    m.run(1);
    assert_eq!(m.x(A0) & (1 << IRQ_MTI), 1 << IRQ_MTI);
    assert_eq!(m.x(A1) & (1 << IRQ_MTI), 0);
}

#[test]
fn skipping_time_past_mtimecmp_makes_the_timer_interrupt_pending() {
    let mut m = Machine::with_code(&nops(4));
    m.hart.state.mstatus = MSTATUS_MIE;
    m.hart.state.mie = 1 << IRQ_MTI;
    m.hart.set_mtimecmp(1000);
    m.run(1);
    m.hart.skip_time(1000);
    m.run(1);
    assert_eq!(m.mcause(), INTERRUPT | IRQ_MTI);
    assert_eq!(m.mepc(), CODE + 4);
}

#[test]
fn next_timer_deadline_is_the_earliest_enabled_future_compare() {
    let mut m = Machine::new();
    m.hart.set_mtimecmp(500);
    m.hart.set_stimecmp(200);
    assert_eq!(m.hart.next_timer_deadline(), Some(500));
    m.hart.state.menvcfg = MENVCFG_STCE;
    m.hart.timer_changed();
    assert_eq!(m.hart.next_timer_deadline(), Some(200));
}

#[test]
fn a_compare_register_of_all_ones_is_a_timer_switched_off() {
    // Linux writes -1 to stimecmp to stop its timer; idling then must not skip guest
    // time to the end of time.
    let mut m = Machine::new();
    m.hart.state.menvcfg = MENVCFG_STCE;
    m.hart.set_mtimecmp(u64::MAX);
    m.hart.set_stimecmp(u64::MAX);
    assert_eq!(m.hart.next_timer_deadline(), None);
    m.hart.set_stimecmp(300);
    assert_eq!(m.hart.next_timer_deadline(), Some(300));
}

#[test]
fn guest_time_stops_at_the_end_of_time_and_the_hart_keeps_its_budget() {
    // A time skip past the last tick once wrapped time around to the past, left a timer
    // deadline behind the instruction count, and the next run never returned.
    let mut m = Machine::with_code(&[jal(ZERO, 0)]);
    m.hart.set_mtimecmp(5);
    m.hart.skip_time(u64::MAX - 3);
    assert_eq!(m.hart.time(), u64::MAX - 3);
    m.hart.skip_time(10);
    assert_eq!(m.hart.time(), u64::MAX);
    assert_eq!(m.run(100), Exit::Budget);
    assert_eq!(m.hart.state.icount, 100);
}

#[test]
fn stimecmp_raises_stip_while_menvcfg_stce_is_set() {
    let mut words = nops(19);
    words.push(csrr(A0, MIP));
    words.push(csrr(A1, MIP));
    let mut m = Machine::with_code(&words);
    m.hart.state.menvcfg = MENVCFG_STCE;
    m.hart.set_stimecmp(2);
    m.run(21);
    assert_eq!(m.x(A0) & (1 << IRQ_STI), 0);
    assert_eq!(m.x(A1) & (1 << IRQ_STI), 1 << IRQ_STI);
}

#[test]
fn stimecmp_does_nothing_while_menvcfg_stce_is_clear() {
    let mut words = nops(30);
    words.push(csrr(A0, MIP));
    let mut m = Machine::with_code(&words);
    m.hart.set_stimecmp(2);
    m.run(31);
    assert_eq!(m.x(A0) & (1 << IRQ_STI), 0);
}

#[test]
fn an_sstc_timer_interrupt_is_delivered_to_supervisor_mode() {
    let mut m = machine_as(PrivMode::Supervisor, &nops(40));
    m.hart.state.menvcfg = MENVCFG_STCE;
    m.hart.state.mideleg = 1 << IRQ_STI;
    m.hart.state.mie = 1 << IRQ_STI;
    m.hart.state.mstatus = MSTATUS_SIE;
    m.hart.set_stimecmp(2);
    m.run(21);
    assert_eq!(m.privilege(), PrivMode::Supervisor);
    assert_eq!((m.scause(), m.sepc()), (INTERRUPT | IRQ_STI, CODE + 80));
}

#[test]
fn supervisor_writing_stimecmp_into_the_future_clears_stip() {
    let mut m = machine_as(PrivMode::Supervisor, &[csrr(A0, SIP), csrw(STIMECMP, A1), csrr(A2, SIP)]);
    m.hart.state.menvcfg = MENVCFG_STCE;
    m.hart.state.mcounteren = 0b010;
    m.hart.state.mideleg = 1 << IRQ_STI;
    m.hart.set_stimecmp(0);
    m.set_x(A1, 1_000_000);
    m.run(3);
    assert_eq!(m.x(A0), 1 << IRQ_STI);
    assert_eq!(m.x(A2), 0);
}

#[test]
fn msip_raises_a_machine_software_interrupt() {
    let mut m = interrupt_machine(PrivMode::Machine, MSTATUS_MIE, 0, &[]);
    m.hart.set_msip(true);
    m.run(1);
    assert_eq!(m.mcause(), INTERRUPT | IRQ_MSI);
}

// ---------------------------------------------------------------- why run returns

#[test]
fn run_returns_budget_when_icount_reaches_the_limit() {
    let mut m = Machine::with_code(&nops(10));
    assert_eq!(m.hart.run(&mut m.bus, 7), Exit::Budget);
    assert_eq!(m.hart.state.icount, 7);
    assert_eq!(m.pc(), CODE + 28);
}

#[test]
fn run_returns_stop_right_after_the_device_access_that_asked_for_it() {
    let mut m = Machine::with_code(&[nop(), sb(A1, A2, 0), nop(), nop()]);
    m.set_x(A1, 1);
    m.set_x(A2, MMIO_STOP);
    assert_eq!(m.run(10), Exit::Stop);
    assert_eq!(m.pc(), CODE + 8);
    assert_eq!(m.hart.state.icount, 2);
}

#[test]
fn supervisor_ecall_returns_sbi_to_the_monitor_without_retiring() {
    let mut m = Machine::with_config(HartConfig { icount_per_tick: 10, sbi_in_monitor: true, ..HartConfig::default() });
    m.load(CODE, &[nop(), ecall(), nop()]);
    m.set_privilege(PrivMode::Supervisor);
    assert_eq!(m.run(10), Exit::Sbi);
    assert_eq!(m.pc(), CODE + 4);
    assert_eq!(m.hart.state.icount, 1);
    assert_eq!(m.mcause(), 0);
}

#[test]
fn complete_sbi_returns_error_and_value_in_a0_a1_and_retires_the_ecall() {
    let mut m = Machine::with_config(HartConfig { icount_per_tick: 10, sbi_in_monitor: true, ..HartConfig::default() });
    m.load(CODE, &[ecall(), nop()]);
    m.set_privilege(PrivMode::Supervisor);
    m.run(10);
    m.hart.complete_sbi(-2, 42);
    assert_eq!((m.x(A0), m.x(A1)), (-2i64 as u64, 42));
    assert_eq!(m.pc(), CODE + 4);
    assert_eq!(m.hart.state.icount, 1);
}

#[test]
fn user_and_machine_ecalls_still_trap_when_the_monitor_implements_the_sbi() {
    for (p, cause) in [(PrivMode::User, CAUSE_USER_ECALL), (PrivMode::Machine, CAUSE_MACHINE_ECALL)] {
        let mut m =
            Machine::with_config(HartConfig { icount_per_tick: 10, sbi_in_monitor: true, ..HartConfig::default() });
        m.load(CODE, &[ecall()]);
        m.set_privilege(p);
        assert_eq!(m.run(2), Exit::Budget);
        assert_eq!(m.mcause(), cause, "{p:?}");
    }
}

// ---------------------------------------------------------------- trap loops

/// A supervisor guest on `cpu` (the compiler taking each block at first sight) that counts
/// to 100 in a loop and then jumps to an unmapped page, with stvec on that page too: every
/// fetch there faults into another fetch there, and no instruction retires again.
fn trap_loop_guest(cpu: Cpu) -> Machine {
    let jit = JitConfig { hot_threshold: 0, background: false, ..JitConfig::default() };
    let mut m = Machine::with_config(HartConfig { icount_per_tick: 10, sbi_in_monitor: false, cpu, jit });
    let mut pt = PageTables::new(&mut m, RAM_BASE + 0x8_0000);
    pt.map(&mut m, RAM_BASE, RAM_BASE, 2, PTE_V | PTE_R | PTE_W | PTE_X | PTE_A | PTE_D);
    m.hart.state.satp = pt.satp();
    m.load(CODE, &[addi(A0, A0, 1), blt(A0, A2, -4), jalr(ZERO, A1, 0)]);
    m.set_x(A1, UNMAPPED);
    m.set_x(A2, 100);
    m.hart.state.stvec = UNMAPPED;
    m.hart.state.medeleg = 1 << CAUSE_FETCH_PAGE_FAULT;
    m.set_privilege(PrivMode::Supervisor);
    m
}

const UNMAPPED: u64 = 0x4000_0000;

#[test]
fn a_trap_loop_that_retires_nothing_still_returns_at_every_budget_on_both_engines() {
    let mut states = Vec::new();
    for cpu in [Cpu::Interpreter, Cpu::Jit] {
        let mut m = trap_loop_guest(cpu);
        // Each trap entry is a step: the run returns at its budget, again and again.
        for round in 1..=3 {
            assert_eq!(m.run(1_000), Exit::Budget, "{cpu:?} round {round}");
            assert_eq!(m.hart.state.icount, 1_000 * round, "{cpu:?}");
        }
        assert_eq!((m.scause(), m.sepc(), m.stval()), (CAUSE_FETCH_PAGE_FAULT, UNMAPPED, UNMAPPED), "{cpu:?}");
        // minstret counts the 201 instructions that retired, not the traps.
        let s = &m.hart.state;
        assert_eq!(s.icount.wrapping_add(s.instret_offset), 201, "{cpu:?}");
        states.push(m.hart.state.clone());
    }
    assert_eq!(states[0], states[1], "the engines take the same traps at the same counts");
}

#[test]
fn the_monitor_still_reaches_a_guest_in_a_trap_loop() {
    for cpu in [Cpu::Interpreter, Cpu::Jit] {
        let mut m = trap_loop_guest(cpu);
        assert_eq!(m.run(5_000), Exit::Budget, "{cpu:?}");
        // Between two runs the monitor raises a machine software interrupt, which S-mode
        // cannot mask: the next run takes it, and the machine handler runs.
        m.hart.state.mie = 1 << IRQ_MSI;
        m.hart.set_msip(true);
        assert_eq!(m.run(10), Exit::Budget, "{cpu:?}");
        assert_eq!((m.mcause(), m.mepc(), m.pc()), (INTERRUPT | IRQ_MSI, UNMAPPED, M_HANDLER), "{cpu:?}");
        assert_eq!(m.privilege(), PrivMode::Machine, "{cpu:?}");
    }
}

#[test]
fn how_a_trap_loop_is_split_into_runs_never_changes_the_state_at_an_icount() {
    for cpu in [Cpu::Interpreter, Cpu::Jit] {
        let mut straight = trap_loop_guest(cpu);
        straight.run(3_001);
        let mut split = trap_loop_guest(cpu);
        for budget in [1, 7, 150, 51, 199, 1, 2_592] {
            assert_eq!(split.run(budget), Exit::Budget, "{cpu:?}");
        }
        assert_eq!(split.hart.state, straight.hart.state, "{cpu:?}");
    }
}
