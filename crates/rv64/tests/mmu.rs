//! Sv39 address translation, per the privileged spec's "Virtual Address Translation
//! Process": 4 KiB pages and 2 MiB / 1 GiB superpages, every permission rule (R/W/X,
//! U with SUM, MXR, W-without-R), canonical addresses, hardware A/D updates, accesses
//! that cross pages, sfence.vma, and MPRV.

mod common;
use common::*;
use rv64::PrivMode;

/// Page-table pages are allocated from here.
const TABLES: u64 = RAM_BASE + 0x8_0000;
/// The virtual region most tests map (root index 1).
const VA: u64 = 0x4000_0000;
/// Physical pages that test mappings point at.
const PAGE_A: u64 = RAM_BASE + 0x2_0000;
const PAGE_B: u64 = RAM_BASE + 0x2_1000;

const RW: u64 = PTE_V | PTE_R | PTE_W | PTE_A | PTE_D;
const RWX: u64 = RW | PTE_X;

/// Sv39 on, with RAM identity-mapped by one gigapage carrying `code_flags` (so code,
/// handlers and the page tables are reachable); the hart is at privilege `p`.
fn sv39(p: PrivMode, code_flags: u64) -> (Machine, PageTables) {
    let mut m = Machine::new();
    let mut pt = PageTables::new(&mut m, TABLES);
    pt.map(&mut m, RAM_BASE, RAM_BASE, 2, code_flags);
    m.hart.state.satp = pt.satp();
    m.set_privilege(p);
    m.write_u64(PAGE_A, 0xaaaa_0000_0000_0000);
    m.write_u64(PAGE_A + 0x10, 0xaaaa_0000_0000_0010);
    m.write_u64(PAGE_B, 0xbbbb_0000_0000_0000);
    (m, pt)
}

/// Supervisor mode, Sv39, code in a supervisor gigapage.
fn supervisor() -> (Machine, PageTables) {
    sv39(PrivMode::Supervisor, RWX)
}

fn run(m: &mut Machine, words: &[u32], regs: &[(u32, u64)]) {
    m.load(CODE, words);
    for &(r, v) in regs {
        m.set_x(r, v);
    }
    m.run(words.len() as u64);
}

/// Jump to `target` and attempt one instruction there.
fn jump_to(m: &mut Machine, target: u64) {
    run(m, &[jalr(ZERO, A1, 0)], &[(A1, target)]);
    m.run(1);
}

fn assert_fault(m: &Machine, cause: u64, tval: u64) {
    assert_eq!(m.mcause(), cause, "mcause");
    assert_eq!(m.mtval(), tval, "mtval");
    assert_eq!(m.pc(), M_HANDLER);
}

// ---------------------------------------------------------------- page sizes

#[test]
fn a_4k_page_maps_a_virtual_page_to_its_physical_page() {
    let (mut m, mut pt) = supervisor();
    pt.map(&mut m, VA + 0x5000, PAGE_A, 0, RW);
    run(&mut m, &[ld(A0, A1, 0x10)], &[(A1, VA + 0x5000)]);
    assert_eq!(m.x(A0), 0xaaaa_0000_0000_0010);
}

#[test]
fn a_store_through_a_4k_page_writes_the_physical_page() {
    let (mut m, mut pt) = supervisor();
    pt.map(&mut m, VA, PAGE_B, 0, RW);
    run(&mut m, &[sd(A2, A1, 0x18)], &[(A1, VA), (A2, 0x1234)]);
    assert_eq!(m.read_u64(PAGE_B + 0x18), 0x1234);
}

#[test]
fn a_2m_megapage_passes_the_low_21_bits_through() {
    let (mut m, mut pt) = supervisor();
    pt.map(&mut m, VA + 0x20_0000, RAM_BASE, 1, RW);
    run(&mut m, &[ld(A0, A1, 0)], &[(A1, VA + 0x20_0000 + (PAGE_A - RAM_BASE) + 0x10)]);
    assert_eq!(m.x(A0), 0xaaaa_0000_0000_0010);
}

#[test]
fn a_1g_gigapage_passes_the_low_30_bits_through() {
    let (mut m, mut pt) = supervisor();
    pt.map(&mut m, 0xc000_0000, RAM_BASE, 2, RW);
    run(&mut m, &[ld(A0, A1, 0)], &[(A1, 0xc000_0000 + (PAGE_B - RAM_BASE))]);
    assert_eq!(m.x(A0), 0xbbbb_0000_0000_0000);
}

#[test]
fn a_megapage_whose_physical_page_number_is_not_2m_aligned_faults() {
    let (mut m, mut pt) = supervisor();
    pt.map(&mut m, VA, RAM_BASE + 0x1000, 1, RW);
    run(&mut m, &[ld(A0, A1, 0)], &[(A1, VA + 8)]);
    assert_fault(&m, CAUSE_LOAD_PAGE_FAULT, VA + 8);
}

#[test]
fn a_gigapage_whose_physical_page_number_is_not_1g_aligned_faults() {
    let (mut m, mut pt) = supervisor();
    pt.map(&mut m, 0xc000_0000, RAM_BASE + 0x20_0000, 2, RW);
    run(&mut m, &[sd(A0, A1, 0)], &[(A1, 0xc000_0000)]);
    assert_fault(&m, CAUSE_STORE_PAGE_FAULT, 0xc000_0000);
}

#[test]
fn the_canonical_upper_half_translates_through_the_upper_root_entries() {
    let (mut m, mut pt) = supervisor();
    let high = 0xffff_ffc0_0000_0000;
    pt.map(&mut m, high, PAGE_A, 0, RW);
    run(&mut m, &[ld(A0, A1, 0)], &[(A1, high)]);
    assert_eq!(m.x(A0), 0xaaaa_0000_0000_0000);
}

// ---------------------------------------------------------------- invalid and reserved PTEs

#[test]
fn an_invalid_pte_raises_the_page_fault_of_the_access_type() {
    let (mut m, mut pt) = supervisor();
    pt.map(&mut m, VA, PAGE_A, 0, RWX & !PTE_V);
    run(&mut m, &[ld(A0, A1, 0)], &[(A1, VA + 3)]);
    assert_fault(&m, CAUSE_LOAD_PAGE_FAULT, VA + 3);

    let (mut m, mut pt) = supervisor();
    pt.map(&mut m, VA, PAGE_A, 0, RWX & !PTE_V);
    run(&mut m, &[sb(A0, A1, 0)], &[(A1, VA + 5)]);
    assert_fault(&m, CAUSE_STORE_PAGE_FAULT, VA + 5);

    let (mut m, mut pt) = supervisor();
    pt.map(&mut m, VA, PAGE_A, 0, RWX & !PTE_V);
    jump_to(&mut m, VA + 0x40);
    assert_fault(&m, CAUSE_FETCH_PAGE_FAULT, VA + 0x40);
    assert_eq!(m.mepc(), VA + 0x40);
}

#[test]
fn a_writable_page_that_is_not_readable_is_reserved_and_faults() {
    let (mut m, mut pt) = supervisor();
    pt.map(&mut m, VA, PAGE_A, 0, PTE_V | PTE_W | PTE_A | PTE_D);
    run(&mut m, &[sd(A0, A1, 0)], &[(A1, VA)]);
    assert_fault(&m, CAUSE_STORE_PAGE_FAULT, VA);

    let (mut m, mut pt) = supervisor();
    pt.map(&mut m, VA, PAGE_A, 0, PTE_V | PTE_W | PTE_X | PTE_A | PTE_D);
    run(&mut m, &[ld(A0, A1, 0)], &[(A1, VA)]);
    assert_fault(&m, CAUSE_LOAD_PAGE_FAULT, VA);
}

#[test]
fn a_leaf_with_reserved_high_bits_set_faults() {
    let (mut m, mut pt) = supervisor();
    pt.map(&mut m, VA, PAGE_A, 0, RW | (1 << 54));
    run(&mut m, &[ld(A0, A1, 0)], &[(A1, VA)]);
    assert_fault(&m, CAUSE_LOAD_PAGE_FAULT, VA);
}

#[test]
fn a_pointer_pte_at_the_last_level_faults() {
    let (mut m, mut pt) = supervisor();
    pt.map(&mut m, VA, TABLES, 0, PTE_V);
    run(&mut m, &[ld(A0, A1, 0)], &[(A1, VA)]);
    assert_fault(&m, CAUSE_LOAD_PAGE_FAULT, VA);
}

#[test]
fn a_page_table_outside_memory_raises_an_access_fault_of_the_access_type() {
    // Fetch: the root itself is unreachable.
    let (mut m, _) = supervisor();
    m.hart.state.satp = SATP_SV39 | (0x2000_0000 >> 12);
    m.run(1);
    assert_fault(&m, CAUSE_FETCH_ACCESS, CODE);
    // Load, from M-mode code borrowing S through MPRV.
    let (mut m, _) = supervisor();
    m.hart.state.satp = SATP_SV39 | (0x2000_0000 >> 12);
    m.set_privilege(PrivMode::Machine);
    m.hart.state.mstatus = MSTATUS_MPRV | (1 << 11);
    run(&mut m, &[ld(A0, A1, 0)], &[(A1, VA)]);
    assert_fault(&m, CAUSE_LOAD_ACCESS, VA);
}

// ---------------------------------------------------------------- R/W/X

#[test]
fn a_store_to_a_read_only_page_faults_and_leaves_memory_alone() {
    let (mut m, mut pt) = supervisor();
    pt.map(&mut m, VA, PAGE_A, 0, PTE_V | PTE_R | PTE_A | PTE_D);
    run(&mut m, &[ld(A0, A1, 0), sd(A2, A1, 0)], &[(A1, VA), (A2, 1)]);
    assert_eq!(m.x(A0), 0xaaaa_0000_0000_0000);
    assert_fault(&m, CAUSE_STORE_PAGE_FAULT, VA);
    assert_eq!(m.read_u64(PAGE_A), 0xaaaa_0000_0000_0000);
}

#[test]
fn a_load_from_an_execute_only_page_faults_unless_mxr_is_set() {
    let (mut m, mut pt) = supervisor();
    pt.map(&mut m, VA, PAGE_A, 0, PTE_V | PTE_X | PTE_A);
    run(&mut m, &[ld(A0, A1, 0)], &[(A1, VA)]);
    assert_fault(&m, CAUSE_LOAD_PAGE_FAULT, VA);

    let (mut m, mut pt) = supervisor();
    pt.map(&mut m, VA, PAGE_A, 0, PTE_V | PTE_X | PTE_A);
    m.hart.state.mstatus = MSTATUS_MXR;
    run(&mut m, &[ld(A0, A1, 0)], &[(A1, VA)]);
    assert_eq!(m.x(A0), 0xaaaa_0000_0000_0000);
}

#[test]
fn mxr_does_not_make_an_execute_only_page_writable() {
    let (mut m, mut pt) = supervisor();
    pt.map(&mut m, VA, PAGE_A, 0, PTE_V | PTE_X | PTE_A | PTE_D);
    m.hart.state.mstatus = MSTATUS_MXR;
    run(&mut m, &[sd(A0, A1, 0)], &[(A1, VA)]);
    assert_fault(&m, CAUSE_STORE_PAGE_FAULT, VA);
}

#[test]
fn fetching_from_a_page_without_x_faults_at_the_target() {
    let (mut m, mut pt) = supervisor();
    pt.map(&mut m, VA, PAGE_A, 0, RW);
    jump_to(&mut m, VA + 0x80);
    assert_fault(&m, CAUSE_FETCH_PAGE_FAULT, VA + 0x80);
    assert_eq!(m.mepc(), VA + 0x80);
}

#[test]
fn code_runs_from_an_executable_page_at_its_virtual_address() {
    let (mut m, mut pt) = supervisor();
    pt.map(&mut m, VA, PAGE_A, 0, PTE_V | PTE_X | PTE_A);
    m.load(PAGE_A + 0x100, &[auipc(A0, 0), addi(A2, ZERO, 7)]);
    run(&mut m, &[jalr(ZERO, A1, 0x100), nop(), nop()], &[(A1, VA)]);
    assert_eq!(m.x(A0), VA + 0x100);
    assert_eq!(m.x(A2), 7);
    assert_eq!(m.pc(), VA + 0x108);
}

// ---------------------------------------------------------------- U and SUM

#[test]
fn supervisor_loads_from_a_user_page_fault_unless_sum_is_set() {
    let (mut m, mut pt) = supervisor();
    pt.map(&mut m, VA, PAGE_A, 0, RW | PTE_U);
    run(&mut m, &[ld(A0, A1, 0)], &[(A1, VA)]);
    assert_fault(&m, CAUSE_LOAD_PAGE_FAULT, VA);

    let (mut m, mut pt) = supervisor();
    pt.map(&mut m, VA, PAGE_A, 0, RW | PTE_U);
    m.hart.state.mstatus = MSTATUS_SUM;
    run(&mut m, &[ld(A0, A1, 0), sd(A0, A1, 8)], &[(A1, VA)]);
    assert_eq!(m.x(A0), 0xaaaa_0000_0000_0000);
    assert_eq!(m.read_u64(PAGE_A + 8), 0xaaaa_0000_0000_0000);
}

#[test]
fn supervisor_stores_to_a_user_page_fault_without_sum() {
    let (mut m, mut pt) = supervisor();
    pt.map(&mut m, VA, PAGE_A, 0, RW | PTE_U);
    run(&mut m, &[sd(A0, A1, 0)], &[(A1, VA)]);
    assert_fault(&m, CAUSE_STORE_PAGE_FAULT, VA);
}

#[test]
fn supervisor_never_executes_from_a_user_page_even_with_sum() {
    let (mut m, mut pt) = supervisor();
    pt.map(&mut m, VA, PAGE_A, 0, RWX | PTE_U);
    m.hart.state.mstatus = MSTATUS_SUM;
    jump_to(&mut m, VA);
    assert_fault(&m, CAUSE_FETCH_PAGE_FAULT, VA);
}

#[test]
fn user_mode_accesses_user_pages() {
    let (mut m, mut pt) = sv39(PrivMode::User, RWX | PTE_U);
    pt.map(&mut m, VA, PAGE_A, 0, RW | PTE_U);
    run(&mut m, &[ld(A0, A1, 0x10), sd(A0, A1, 0x20)], &[(A1, VA)]);
    assert_eq!(m.x(A0), 0xaaaa_0000_0000_0010);
    assert_eq!(m.read_u64(PAGE_A + 0x20), 0xaaaa_0000_0000_0010);
}

#[test]
fn user_mode_cannot_access_supervisor_pages() {
    let (mut m, mut pt) = sv39(PrivMode::User, RWX | PTE_U);
    pt.map(&mut m, VA, PAGE_A, 0, RW);
    run(&mut m, &[ld(A0, A1, 0)], &[(A1, VA)]);
    assert_fault(&m, CAUSE_LOAD_PAGE_FAULT, VA);
}

#[test]
fn sum_does_not_let_user_mode_access_supervisor_pages() {
    let (mut m, mut pt) = sv39(PrivMode::User, RWX | PTE_U);
    pt.map(&mut m, VA, PAGE_A, 0, RW);
    m.hart.state.mstatus = MSTATUS_SUM;
    run(&mut m, &[ld(A0, A1, 0)], &[(A1, VA)]);
    assert_fault(&m, CAUSE_LOAD_PAGE_FAULT, VA);
}

#[test]
fn user_mode_cannot_execute_from_a_supervisor_page() {
    let (mut m, _) = sv39(PrivMode::User, RWX);
    m.run(1);
    assert_fault(&m, CAUSE_FETCH_PAGE_FAULT, CODE);
}

// ---------------------------------------------------------------- canonical addresses

#[test]
fn a_load_from_a_non_canonical_address_faults() {
    let (mut m, _) = supervisor();
    run(&mut m, &[ld(A0, A1, 0)], &[(A1, 0x0000_0080_0000_0000)]);
    assert_fault(&m, CAUSE_LOAD_PAGE_FAULT, 0x0000_0080_0000_0000);
}

#[test]
fn a_store_to_a_non_canonical_address_faults() {
    let (mut m, _) = supervisor();
    run(&mut m, &[sd(A0, A1, 0)], &[(A1, 0xffff_ff00_0000_0000)]);
    assert_fault(&m, CAUSE_STORE_PAGE_FAULT, 0xffff_ff00_0000_0000);
}

#[test]
fn a_fetch_from_a_non_canonical_address_faults() {
    let (mut m, _) = supervisor();
    jump_to(&mut m, 0x0000_0040_0000_0000);
    assert_fault(&m, CAUSE_FETCH_PAGE_FAULT, 0x0000_0040_0000_0000);
}

// ---------------------------------------------------------------- A and D

#[test]
fn a_load_sets_the_accessed_bit_but_not_the_dirty_bit() {
    let (mut m, mut pt) = supervisor();
    let slot = pt.map(&mut m, VA, PAGE_A, 0, PTE_V | PTE_R | PTE_W);
    run(&mut m, &[ld(A0, A1, 0)], &[(A1, VA)]);
    assert_eq!(m.read_u64(slot), pte(PAGE_A, PTE_V | PTE_R | PTE_W | PTE_A));
}

#[test]
fn a_store_sets_the_accessed_and_dirty_bits() {
    let (mut m, mut pt) = supervisor();
    let slot = pt.map(&mut m, VA, PAGE_A, 0, PTE_V | PTE_R | PTE_W);
    run(&mut m, &[sd(A0, A1, 0)], &[(A1, VA)]);
    assert_eq!(m.read_u64(slot), pte(PAGE_A, PTE_V | PTE_R | PTE_W | PTE_A | PTE_D));
}

#[test]
fn a_store_after_a_load_to_the_same_page_still_sets_the_dirty_bit() {
    let (mut m, mut pt) = supervisor();
    let slot = pt.map(&mut m, VA, PAGE_A, 0, PTE_V | PTE_R | PTE_W);
    run(&mut m, &[ld(A0, A1, 0), sd(A0, A1, 8)], &[(A1, VA)]);
    assert_eq!(m.read_u64(slot), pte(PAGE_A, PTE_V | PTE_R | PTE_W | PTE_A | PTE_D));
}

#[test]
fn a_fetch_sets_the_accessed_bit() {
    let (mut m, mut pt) = supervisor();
    let slot = pt.map(&mut m, VA, PAGE_A, 0, PTE_V | PTE_X);
    m.load(PAGE_A, &[nop()]);
    jump_to(&mut m, VA);
    assert_eq!(m.pc(), VA + 4);
    assert_eq!(m.read_u64(slot), pte(PAGE_A, PTE_V | PTE_X | PTE_A));
}

#[test]
fn an_access_that_faults_sets_neither_accessed_nor_dirty() {
    let (mut m, mut pt) = supervisor();
    let slot = pt.map(&mut m, VA, PAGE_A, 0, PTE_V | PTE_R);
    run(&mut m, &[sd(A0, A1, 0)], &[(A1, VA)]);
    assert_eq!(m.mcause(), CAUSE_STORE_PAGE_FAULT);
    assert_eq!(m.read_u64(slot), pte(PAGE_A, PTE_V | PTE_R));
}

// ---------------------------------------------------------------- crossing pages

#[test]
fn a_misaligned_load_across_two_pages_gathers_bytes_from_both_physical_pages() {
    let (mut m, mut pt) = supervisor();
    pt.map(&mut m, VA, PAGE_B, 0, RW);
    pt.map(&mut m, VA + 0x1000, PAGE_A, 0, RW);
    m.write_bytes(PAGE_B + 0xffc, &[1, 2, 3, 4]);
    m.write_bytes(PAGE_A, &[5, 6, 7, 8]);
    run(&mut m, &[ld(A0, A1, 0)], &[(A1, VA + 0xffc)]);
    assert_eq!(m.x(A0), 0x0807_0605_0403_0201);
}

#[test]
fn a_misaligned_store_across_two_pages_scatters_bytes_to_both_physical_pages() {
    let (mut m, mut pt) = supervisor();
    pt.map(&mut m, VA, PAGE_B, 0, RW);
    pt.map(&mut m, VA + 0x1000, PAGE_A, 0, RW);
    run(&mut m, &[sw(A2, A1, 0)], &[(A1, VA + 0xffe), (A2, 0x4433_2211)]);
    assert_eq!(m.read_bytes(PAGE_B + 0xffe, 2), [0x11, 0x22]);
    assert_eq!(m.read_bytes(PAGE_A, 2), [0x33, 0x44]);
}

#[test]
fn a_misaligned_load_whose_second_page_faults_reports_the_second_page_and_writes_no_register() {
    let (mut m, mut pt) = supervisor();
    pt.map(&mut m, VA, PAGE_B, 0, RW);
    run(&mut m, &[ld(A0, A1, 0)], &[(A0, 0x77), (A1, VA + 0xffc)]);
    assert_fault(&m, CAUSE_LOAD_PAGE_FAULT, VA + 0x1000);
    assert_eq!(m.mepc(), CODE);
    assert_eq!(m.x(A0), 0x77);
}

#[test]
fn a_misaligned_store_whose_second_page_faults_leaves_the_first_page_unchanged() {
    let (mut m, mut pt) = supervisor();
    pt.map(&mut m, VA, PAGE_B, 0, RW);
    pt.map(&mut m, VA + 0x1000, PAGE_A, 0, PTE_V | PTE_R | PTE_A);
    m.write_bytes(PAGE_B + 0xffc, &[0xee; 4]);
    run(&mut m, &[sd(A2, A1, 0)], &[(A1, VA + 0xffc), (A2, u64::MAX)]);
    assert_eq!(m.mcause(), CAUSE_STORE_PAGE_FAULT);
    // mtval names the part of the access that faulted: an address in the second page.
    assert_eq!(m.mtval() & !0xfff, VA + 0x1000);
    assert_eq!(m.read_bytes(PAGE_B + 0xffc, 4), [0xee; 4]);
    assert_eq!(m.read_u64(PAGE_A), 0xaaaa_0000_0000_0000);
}

#[test]
fn a_32_bit_instruction_whose_second_half_is_on_an_unmapped_page_faults_there() {
    let (mut m, mut pt) = supervisor();
    pt.map(&mut m, VA, PAGE_A, 0, PTE_V | PTE_X | PTE_A);
    let insn = addi(A0, ZERO, 1);
    m.load_halves(PAGE_A + 0xffe, &[insn as u16]);
    jump_to(&mut m, VA + 0xffe);
    assert_fault(&m, CAUSE_FETCH_PAGE_FAULT, VA + 0x1000);
    assert_eq!(m.mepc(), VA + 0xffe);
}

// ---------------------------------------------------------------- sfence.vma, satp

#[test]
fn sfence_vma_makes_a_changed_pte_take_effect() {
    let (mut m, mut pt) = supervisor();
    let slot = pt.map(&mut m, VA, PAGE_A, 0, RW);
    let words = [ld(A0, A1, 0), sd(A3, A4, 0), sfence_vma(0, 0), ld(A2, A1, 0)];
    run(&mut m, &words, &[(A1, VA), (A3, pte(PAGE_B, RW)), (A4, slot)]);
    assert_eq!(m.x(A0), 0xaaaa_0000_0000_0000);
    assert_eq!(m.x(A2), 0xbbbb_0000_0000_0000);
}

#[test]
fn sfence_vma_makes_a_removed_mapping_fault() {
    let (mut m, mut pt) = supervisor();
    let slot = pt.map(&mut m, VA, PAGE_A, 0, RW);
    let words = [ld(A0, A1, 0), sd(ZERO, A4, 0), sfence_vma(A1, 0), ld(A2, A1, 0)];
    run(&mut m, &words, &[(A1, VA), (A4, slot)]);
    assert_fault(&m, CAUSE_LOAD_PAGE_FAULT, VA);
    assert_eq!(m.mepc(), CODE + 12);
}

#[test]
fn writing_satp_switches_the_page_table() {
    let (mut m, mut pt) = supervisor();
    pt.map(&mut m, VA, PAGE_A, 0, RW);
    // A second root: the same identity gigapage, VA mapped to PAGE_B.
    let mut other = PageTables::new(&mut m, TABLES + 0x4_0000);
    other.map(&mut m, RAM_BASE, RAM_BASE, 2, RWX);
    other.map(&mut m, VA, PAGE_B, 0, RW);
    let words = [ld(A0, A1, 0), csrw(SATP, A3), sfence_vma(0, 0), ld(A2, A1, 0)];
    run(&mut m, &words, &[(A1, VA), (A3, other.satp())]);
    assert_eq!(m.x(A0), 0xaaaa_0000_0000_0000);
    assert_eq!(m.x(A2), 0xbbbb_0000_0000_0000);
}

// ---------------------------------------------------------------- MPRV

/// M-mode with page tables that map only VA (no code mapping): if fetches were
/// translated, the first one would fault.
fn machine_with_mprv(mpp: u64, flags: u64) -> Machine {
    let mut m = Machine::new();
    let mut pt = PageTables::new(&mut m, TABLES);
    pt.map(&mut m, VA, PAGE_A, 0, flags);
    m.write_u64(PAGE_A, 0xaaaa_0000_0000_0000);
    m.hart.state.satp = pt.satp();
    m.hart.state.mstatus = MSTATUS_MPRV | (mpp << 11);
    m
}

#[test]
fn mprv_translates_machine_mode_loads_and_stores_as_mpp() {
    let mut m = machine_with_mprv(1, RW);
    run(&mut m, &[ld(A0, A1, 0), sd(A0, A1, 8)], &[(A1, VA)]);
    assert_eq!(m.x(A0), 0xaaaa_0000_0000_0000);
    assert_eq!(m.read_u64(PAGE_A + 8), 0xaaaa_0000_0000_0000);
    assert_eq!(m.pc(), CODE + 8);
}

#[test]
fn mprv_applies_the_user_permission_check_when_mpp_is_user() {
    let mut m = machine_with_mprv(0, RW);
    run(&mut m, &[ld(A0, A1, 0)], &[(A1, VA)]);
    assert_fault(&m, CAUSE_LOAD_PAGE_FAULT, VA);
    let mut m = machine_with_mprv(0, RW | PTE_U);
    run(&mut m, &[ld(A0, A1, 0)], &[(A1, VA)]);
    assert_eq!(m.x(A0), 0xaaaa_0000_0000_0000);
}

#[test]
fn mprv_with_mpp_machine_does_not_translate() {
    let mut m = machine_with_mprv(3, RW);
    m.write_u64(DATA, 0xd00d);
    run(&mut m, &[ld(A0, A1, 0)], &[(A1, DATA)]);
    assert_eq!(m.x(A0), 0xd00d);
}

#[test]
fn machine_mode_without_mprv_ignores_satp() {
    let mut m = machine_with_mprv(1, RW);
    m.hart.state.mstatus = 1 << 11;
    m.write_u64(DATA, 0xd00d);
    run(&mut m, &[ld(A0, A1, 0)], &[(A1, DATA)]);
    assert_eq!(m.x(A0), 0xd00d);
}

// ---------------------------------------------------------------- delegation, AMOs

#[test]
fn a_delegated_page_fault_reports_the_address_in_stval() {
    let (mut m, _) = supervisor();
    m.hart.state.medeleg = 1 << CAUSE_LOAD_PAGE_FAULT;
    run(&mut m, &[nop(), lw(A0, A1, 4)], &[(A1, VA)]);
    assert_eq!(m.privilege(), PrivMode::Supervisor);
    assert_eq!((m.scause(), m.stval(), m.sepc()), (CAUSE_LOAD_PAGE_FAULT, VA + 4, CODE + 4));
    assert_eq!(m.pc(), S_HANDLER);
}

#[test]
fn an_amo_on_a_read_only_page_raises_a_store_page_fault() {
    let (mut m, mut pt) = supervisor();
    pt.map(&mut m, VA, PAGE_A, 0, PTE_V | PTE_R | PTE_A);
    run(&mut m, &[lr_d(A0, A1), amoadd_d(A2, A3, A1)], &[(A1, VA), (A3, 1)]);
    assert_eq!(m.x(A0), 0xaaaa_0000_0000_0000);
    assert_fault(&m, CAUSE_STORE_PAGE_FAULT, VA);
    assert_eq!(m.read_u64(PAGE_A), 0xaaaa_0000_0000_0000);
}

#[test]
fn an_amo_on_an_unmapped_page_raises_a_store_page_fault() {
    let (mut m, _) = supervisor();
    run(&mut m, &[amoswap_w(A2, A3, A1)], &[(A1, VA)]);
    assert_fault(&m, CAUSE_STORE_PAGE_FAULT, VA);
}
