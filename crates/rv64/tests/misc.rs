//! Cross-cutting behaviours: x0, misaligned data accesses, self-modifying code,
//! instruction fetch faults, and illegal encodings (mtval holds the raw instruction).

mod common;
use common::*;

const RAM_END: u64 = RAM_BASE + RAM_SIZE;

// ---------------------------------------------------------------- x0

#[test]
fn writes_to_x0_are_discarded() {
    let words = [
        addi(ZERO, ZERO, 5),
        lui(ZERO, 0x12345),
        auipc(ZERO, 1),
        jal(ZERO, 4),
        ld(ZERO, A1, 0),
        csrrw(ZERO, MSCRATCH, A2),
        amoadd_d(ZERO, A2, A1),
        mul(ZERO, A2, A2),
        add(A0, ZERO, ZERO),
    ];
    let m = run_code(&words, &[(A0, 99), (A1, DATA), (A2, 3)]);
    assert_eq!(m.x(ZERO), 0);
    assert_eq!(m.x(A0), 0);
    assert_eq!(m.pc(), CODE + 4 * words.len() as u64);
}

#[test]
fn a_load_into_x0_still_reaches_the_device() {
    let m = run_code(&[lw(ZERO, A1, 0)], &[(A1, MMIO_BASE + 8)]);
    assert_eq!(m.bus.accesses, vec![MmioAccess::Load { paddr: MMIO_BASE + 8, size: 4 }]);
    assert_eq!(m.x(ZERO), 0);
}

#[test]
fn a_load_into_x0_from_nowhere_still_faults() {
    let m = trap_m(&[ld(ZERO, A1, 0)], &[(A1, 0x2000_0000)]);
    assert_eq!((m.mcause(), m.mtval()), (CAUSE_LOAD_ACCESS, 0x2000_0000));
}

// ---------------------------------------------------------------- misaligned data

#[test]
fn misaligned_loads_within_ram_read_the_right_bytes() {
    let mut m = Machine::with_code(&[lh(A0, A1, 1), lw(A2, A1, 3), ld(A3, A1, 5), lhu(A4, A1, 7)]);
    m.write_bytes(DATA, &[0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd]);
    m.set_x(A1, DATA);
    m.run(4);
    assert_eq!(m.x(A0), 0x2211);
    assert_eq!(m.x(A2), 0x6655_4433);
    assert_eq!(m.x(A3), 0xccbb_aa99_8877_6655);
    assert_eq!(m.x(A4), 0x8877);
    assert_eq!(m.mcause(), 0);
}

#[test]
fn misaligned_stores_within_ram_write_the_right_bytes() {
    let m = run_code(&[sd(A2, A1, 3), sh(A3, A1, 13)], &[(A1, DATA), (A2, 0x8877_6655_4433_2211), (A3, 0xbbaa)]);
    assert_eq!(m.read_bytes(DATA, 16), [0, 0, 0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0, 0, 0xaa, 0xbb, 0]);
}

#[test]
fn misaligned_accesses_across_a_page_boundary_work_without_translation() {
    let m = run_code(&[sd(A2, A1, 0), ld(A0, A1, 0)], &[(A1, DATA + 0xffb), (A2, 0x0102_0304_0506_0708)]);
    assert_eq!(m.x(A0), 0x0102_0304_0506_0708);
    assert_eq!(m.read_u64(DATA + 0xffb), 0x0102_0304_0506_0708);
}

#[test]
fn a_misaligned_load_running_off_the_end_of_ram_faults_without_writing_rd() {
    let m = trap_m(&[ld(A0, A1, 0)], &[(A0, 0x77), (A1, RAM_END - 4)]);
    assert_eq!(m.mcause(), CAUSE_LOAD_ACCESS);
    assert_eq!(m.x(A0), 0x77);
}

#[test]
fn a_misaligned_store_running_off_the_end_of_ram_faults_without_writing_memory() {
    let mut m = Machine::with_code(&[sd(A2, A1, 0)]);
    m.write_bytes(RAM_END - 4, &[0xee; 4]);
    m.set_x(A1, RAM_END - 4);
    m.set_x(A2, u64::MAX);
    m.run(2);
    assert_eq!(m.mcause(), CAUSE_STORE_ACCESS);
    assert_eq!(m.read_bytes(RAM_END - 4, 4), [0xee; 4]);
}

// ---------------------------------------------------------------- self-modifying code

#[test]
fn a_modified_instruction_is_seen_without_fence_i() {
    // 0: addi a0, a0, 1        <- rewritten to addi a0, a0, 100 after its first run
    // 4: bne a2, x0, 16        -> 20 on the second pass
    // 8: sw a3, 0(a4)
    // 12: addi a2, x0, 1
    // 16: jal x0, -16          -> 0
    let words = [addi(A0, A0, 1), bne(A2, ZERO, 16), sw(A3, A4, 0), addi(A2, ZERO, 1), jal(ZERO, -16)];
    let new = addi(A0, A0, 100);
    let mut m = run_code(&words, &[(A3, new as u64), (A4, CODE)]);
    // Second pass: the rewritten addi, then bne (taken) to 20.
    m.run(2);
    assert_eq!(m.x(A0), 101);
    assert_eq!(m.pc(), CODE + 20);
}

#[test]
fn rewriting_a_32_bit_instruction_as_two_compressed_ones_is_seen() {
    // The first pass runs a 32-bit addi at 0; the rewrite puts c.li a0,7 ; c.addi a0,1
    // there; the second pass must decode 16-bit instructions at 0 and 2.
    let words = [addi(A0, ZERO, 1), bne(A2, ZERO, 16), sw(A3, A4, 0), addi(A2, ZERO, 1), jal(ZERO, -16)];
    let pair = (c_li(A0, 7) as u64) | ((c_addi(A0, 1) as u64) << 16);
    let mut m = run_code(&words, &[(A3, pair), (A4, CODE)]);
    // Second pass: c.li, c.addi, then bne at 4 (taken) to 20.
    m.run(3);
    assert_eq!(m.x(A0), 8);
    assert_eq!(m.pc(), CODE + 20);
}

#[test]
fn code_written_by_a_device_style_host_write_is_seen() {
    let mut m = Machine::with_code(&[addi(A0, ZERO, 1), jal(ZERO, -4)]);
    m.run(2);
    m.load(CODE, &[addi(A0, ZERO, 2)]);
    m.run(1);
    assert_eq!(m.x(A0), 2);
}

#[test]
fn a_store_to_the_very_next_instruction_is_seen_by_it() {
    // 0: sw zero, 256(a4)      a store to the code page, so the next one is a fast one
    // 4: sw a3, 8(a4)          rewrites 8 before it runs
    // 8: addi a0, zero, 1      -> addi a0, zero, 7
    let mut m = Machine::with_code(&[sw(ZERO, A4, 256), sw(A3, A4, 8), addi(A0, ZERO, 1)]);
    m.set_x(A3, addi(A0, ZERO, 7) as u64);
    m.set_x(A4, CODE);
    m.run(3);
    assert_eq!(m.x(A0), 7);
}

#[test]
fn a_store_ahead_in_straight_line_code_is_seen_when_execution_gets_there() {
    // The rewritten instruction is three instructions after the store, with no branch
    // in between: a decoder that looked ahead must look again.
    let words =
        [sw(ZERO, A4, 256), sw(A3, A4, 20), addi(A1, ZERO, 1), addi(A1, A1, 1), addi(A1, A1, 1), addi(A0, ZERO, 1)];
    let mut m = Machine::with_code(&words);
    m.set_x(A3, addi(A0, ZERO, 42) as u64);
    m.set_x(A4, CODE);
    m.run(6);
    assert_eq!((m.x(A0), m.x(A1)), (42, 3));
}

#[test]
fn code_in_ram_put_in_place_of_the_old_is_seen() {
    let mut m = Machine::with_code(&[addi(A0, ZERO, 1), jal(ZERO, -4)]);
    m.run(2);
    let mut other = rv64::GuestRam::new(RAM_BASE, RAM_SIZE);
    other.write(CODE, &addi(A0, ZERO, 2).to_le_bytes()).unwrap();
    m.bus.ram = other;
    m.run(1);
    assert_eq!(m.x(A0), 2);
}

/// A loop of loads, stores and arithmetic, left after 40 rounds.
fn busy_loop() -> Machine {
    let mut m = Machine::new();
    m.load(
        CODE,
        &[
            ld(A1, A0, 0),
            addi(A1, A1, 3),
            sd(A1, A0, 8),
            mul(A2, A1, A1),
            xor(A3, A3, A2),
            sb(A3, A0, 17),
            addi(A0, A0, 8),
            addi(A4, A4, -1),
            bne(A4, ZERO, -32),
            jal(ZERO, 0),
        ],
    );
    m.set_x(A0, DATA);
    m.set_x(A4, 40);
    m
}

#[test]
fn how_a_run_is_split_never_changes_the_state_at_an_icount() {
    let total = 9 * 40 + 5;
    let mut whole = busy_loop();
    whole.run(total);
    for slice in [1, 2, 3, 7, 10, 11] {
        let mut split = busy_loop();
        while split.hart.state.icount < total {
            split.run(slice.min(total - split.hart.state.icount));
        }
        assert_eq!(split.hart.state, whole.hart.state, "runs of {slice}");
        assert_eq!(split.read_bytes(DATA, 512), whole.read_bytes(DATA, 512), "runs of {slice}");
    }
}

// ---------------------------------------------------------------- fetch

#[test]
fn fetching_from_an_address_nothing_answers_raises_an_instruction_access_fault() {
    let m = trap_m(&[jalr(ZERO, A1, 0)], &[(A1, 0x2000_0000)]);
    assert_eq!((m.mcause(), m.mtval(), m.mepc()), (CAUSE_FETCH_ACCESS, 0x2000_0000, 0x2000_0000));
}

#[test]
fn fetching_from_a_device_raises_an_instruction_access_fault() {
    let m = trap_m(&[jalr(ZERO, A1, 0)], &[(A1, MMIO_BASE)]);
    assert_eq!((m.mcause(), m.mtval(), m.mepc()), (CAUSE_FETCH_ACCESS, MMIO_BASE, MMIO_BASE));
    assert!(m.bus.accesses.is_empty());
}

#[test]
fn a_32_bit_instruction_may_straddle_a_page_boundary() {
    let mut m = Machine::new();
    let insn = addi(A0, ZERO, 0x5a);
    m.load_halves(CODE + 0xffe, &[insn as u16, (insn >> 16) as u16]);
    m.hart.state.pc = CODE + 0xffe;
    m.run(1);
    assert_eq!(m.x(A0), 0x5a);
    assert_eq!(m.pc(), CODE + 0x1002);
}

#[test]
fn a_32_bit_instruction_running_off_the_end_of_ram_faults_at_the_missing_half() {
    let mut m = Machine::new();
    m.load_halves(RAM_END - 2, &[addi(A0, ZERO, 1) as u16]);
    m.hart.state.pc = RAM_END - 2;
    m.run(1);
    assert_eq!((m.mcause(), m.mepc(), m.mtval()), (CAUSE_FETCH_ACCESS, RAM_END - 2, RAM_END));
}

#[test]
fn a_compressed_instruction_in_the_last_two_bytes_of_ram_executes() {
    let mut m = Machine::new();
    m.load_halves(RAM_END - 2, &[c_li(A0, 9)]);
    m.hart.state.pc = RAM_END - 2;
    m.run(1);
    assert_eq!(m.x(A0), 9);
}

// ---------------------------------------------------------------- illegal encodings

fn assert_illegal(insn: u32) {
    let m = trap_m(&[insn], &[]);
    assert_eq!(m.mcause(), CAUSE_ILLEGAL_INSTRUCTION, "mcause for {insn:#010x}");
    assert_eq!(m.mtval(), insn as u64, "mtval for {insn:#010x}");
    assert_eq!(m.mepc(), CODE, "mepc for {insn:#010x}");
}

#[test]
fn the_all_zero_instruction_is_illegal() {
    assert_illegal(0x0000_0000);
}

#[test]
fn the_all_ones_instruction_is_illegal() {
    assert_illegal(0xffff_ffff);
}

#[test]
fn op_with_a_reserved_funct7_is_illegal() {
    assert_illegal(r_type(0b010_0000, A2, A1, 1, A0, OP_OP)); // "sub" funct7 with sll's funct3
    assert_illegal(r_type(0b000_0010, A2, A1, 0, A0, OP_OP));
    assert_illegal(r_type(0b100_0000, A2, A1, 5, A0, OP_OP));
}

#[test]
fn op_32_with_a_reserved_funct3_or_funct7_is_illegal() {
    assert_illegal(r_type(0, A2, A1, 2, A0, OP_OP_32)); // no sltw
    assert_illegal(r_type(0b010_0000, A2, A1, 1, A0, OP_OP_32));
    assert_illegal(r_type(1, A2, A1, 2, A0, OP_OP_32)); // no mulhw
}

#[test]
fn shift_immediates_with_reserved_upper_bits_are_illegal() {
    assert_illegal(i_type(0b000010 << 6, A1, 1, A0, OP_IMM)); // slli, imm[11:6] = 000010
    assert_illegal(i_type((0b010001 << 6) as i64, A1, 5, A0, OP_IMM)); // srai with a stray funct6 bit
    assert_illegal(i_type(1 << 5, A1, 1, A0, OP_IMM_32)); // slliw with shamt[5] set
    assert_illegal(i_type(0x400 | (1 << 5), A1, 5, A0, OP_IMM_32)); // sraiw with shamt[5] set
}

#[test]
fn op_imm_32_with_a_reserved_funct3_is_illegal() {
    assert_illegal(i_type(0, A1, 2, A0, OP_IMM_32));
    assert_illegal(i_type(0, A1, 7, A0, OP_IMM_32));
}

#[test]
fn branches_with_funct3_2_or_3_are_illegal() {
    assert_illegal(b_type(8, A1, A0, 2, OP_BRANCH));
    assert_illegal(b_type(8, A1, A0, 3, OP_BRANCH));
}

#[test]
fn a_load_with_funct3_7_is_illegal() {
    assert_illegal(i_type(0, A1, 7, A0, OP_LOAD));
}

#[test]
fn stores_with_funct3_4_to_7_are_illegal() {
    assert_illegal(s_type(0, A2, A1, 4, OP_STORE));
    assert_illegal(s_type(0, A2, A1, 7, OP_STORE));
}

#[test]
fn jalr_with_a_nonzero_funct3_is_illegal() {
    assert_illegal(i_type(0, A1, 1, A0, OP_JALR));
}

#[test]
fn misc_mem_with_a_reserved_funct3_is_illegal() {
    assert_illegal(i_type(0, 0, 2, 0, OP_MISC_MEM));
}

#[test]
fn system_with_funct3_4_is_illegal() {
    assert_illegal(i_type(0, 0, 4, 0, OP_SYSTEM));
}

#[test]
fn privileged_instructions_with_nonzero_register_fields_are_illegal() {
    assert_illegal(ecall() | (A0 << 7)); // ecall with rd = a0
    assert_illegal(ebreak() | (A1 << 15)); // ebreak with rs1 = a1
    assert_illegal(mret() | (1 << 15)); // mret with rs1 = x1
    assert_illegal(wfi() | (1 << 7)); // wfi with rd = x1
}

#[test]
fn an_unassigned_system_function_is_illegal() {
    assert_illegal(i_type(0x003, 0, 0, 0, OP_SYSTEM));
    assert_illegal(i_type(0x202, 0, 0, 0, OP_SYSTEM)); // hret does not exist
}

#[test]
fn custom_and_unassigned_major_opcodes_are_illegal() {
    assert_illegal(r_type(0, 0, 0, 0, 0, 0b000_1011)); // custom-0
    assert_illegal(r_type(0, 0, 0, 0, 0, 0b010_1011)); // custom-1
    assert_illegal(r_type(0, 0, 0, 0, 0, 0b101_0111)); // OP-V: no vector unit
}

#[test]
fn a_float_instruction_with_the_fpu_off_is_illegal() {
    // fadd.s fa0, fa1, fa2 with FS = Off.
    assert_illegal(r_type(0, 12, 11, 7, 10, 0b101_0011));
    // fld fa0, 0(a1)
    assert_illegal(i_type(0, A1, 3, 10, OP_LOAD_FP));
}
