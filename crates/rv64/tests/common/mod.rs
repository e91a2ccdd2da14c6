//! Shared harness for the rv64 integration tests: a test bus (1 MiB of RAM plus one
//! recording MMIO register bank), a `Machine` that owns a hart and that bus, and an
//! instruction encoder written from the ISA manual's encoding tables (never from the
//! hart's own decoder, so that a decoding mistake cannot hide in both).
#![allow(dead_code)]

use rv64::{Bus, BusFault, Exit, GuestRam, Hart, HartConfig, PrivMode};

// ---------------------------------------------------------------- memory map

pub const RAM_BASE: u64 = 0x8000_0000;
pub const RAM_SIZE: u64 = 1 << 20;
/// Where `Machine::new` places code.
pub const CODE: u64 = RAM_BASE;
/// M-mode trap vector: a `jal x0, 0` loop, so a trapped run parks here.
pub const M_HANDLER: u64 = RAM_BASE + 0x4000;
/// S-mode trap vector: a `jal x0, 0` loop.
pub const S_HANDLER: u64 = RAM_BASE + 0x5000;
/// Scratch data.
pub const DATA: u64 = RAM_BASE + 0x1_0000;
/// The fake device: a bank of byte-addressed registers that records every access.
pub const MMIO_BASE: u64 = 0x1000_0000;
pub const MMIO_SIZE: u64 = 0x100;
/// Writing this register drives the external interrupt lines: bit 0 = machine
/// (MEIP), bit 1 = supervisor (SEIP).
pub const MMIO_IRQ: u64 = MMIO_BASE + 0xf0;
/// Writing a nonzero value here asks the hart to stop.
pub const MMIO_STOP: u64 = MMIO_BASE + 0xf8;

// ---------------------------------------------------------------- test bus

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmioAccess {
    Load { paddr: u64, size: u8 },
    Store { paddr: u64, size: u8, value: u64 },
}

pub struct TestBus {
    pub ram: GuestRam,
    pub mmio: [u8; MMIO_SIZE as usize],
    pub accesses: Vec<MmioAccess>,
    pub irq_m: bool,
    pub irq_s: bool,
    pub stop: bool,
}

impl TestBus {
    pub fn new() -> TestBus {
        TestBus {
            ram: GuestRam::new(RAM_BASE, RAM_SIZE),
            mmio: [0; MMIO_SIZE as usize],
            accesses: Vec::new(),
            irq_m: false,
            irq_s: false,
            stop: false,
        }
    }

    fn mmio_offset(paddr: u64, size: u8) -> Result<usize, BusFault> {
        let off = paddr.wrapping_sub(MMIO_BASE);
        if off < MMIO_SIZE && off + size as u64 <= MMIO_SIZE {
            Ok(off as usize)
        } else {
            Err(BusFault)
        }
    }
}

impl Bus for TestBus {
    fn ram(&mut self) -> &mut GuestRam {
        &mut self.ram
    }

    fn load(&mut self, paddr: u64, size: u8) -> Result<u64, BusFault> {
        let off = Self::mmio_offset(paddr, size)?;
        self.accesses.push(MmioAccess::Load { paddr, size });
        let mut bytes = [0u8; 8];
        bytes[..size as usize].copy_from_slice(&self.mmio[off..off + size as usize]);
        Ok(u64::from_le_bytes(bytes))
    }

    fn store(&mut self, paddr: u64, size: u8, value: u64) -> Result<(), BusFault> {
        let off = Self::mmio_offset(paddr, size)?;
        // A device sees only the bytes on the bus.
        let value = if size == 8 { value } else { value & ((1u64 << (8 * size)) - 1) };
        self.accesses.push(MmioAccess::Store { paddr, size, value });
        self.mmio[off..off + size as usize].copy_from_slice(&value.to_le_bytes()[..size as usize]);
        if paddr == MMIO_IRQ {
            self.irq_m = value & 1 != 0;
            self.irq_s = value & 2 != 0;
        }
        if paddr == MMIO_STOP {
            self.stop = value != 0;
        }
        Ok(())
    }

    fn external_irq(&self) -> (bool, bool) {
        (self.irq_m, self.irq_s)
    }

    fn stop_requested(&self) -> bool {
        self.stop
    }
}

// ---------------------------------------------------------------- machine

/// A hart in M-mode at `CODE`, with `mtvec`/`stvec` pointing at parking loops.
pub struct Machine {
    pub hart: Hart,
    pub bus: TestBus,
}

impl Machine {
    pub fn new() -> Machine {
        Machine::with_config(HartConfig { icount_per_tick: 10, sbi_in_monitor: false, ..HartConfig::default() })
    }

    pub fn with_config(config: HartConfig) -> Machine {
        let mut m = Machine { hart: Hart::new(config, CODE), bus: TestBus::new() };
        m.load(M_HANDLER, &[jal(0, 0)]);
        m.load(S_HANDLER, &[jal(0, 0)]);
        m.hart.state.mtvec = M_HANDLER;
        m.hart.state.stvec = S_HANDLER;
        // The reset value of mtimecmp is unspecified; "never" keeps MTIP clear.
        m.hart.set_mtimecmp(u64::MAX);
        m
    }

    /// A machine with `words` loaded at `CODE`.
    pub fn with_code(words: &[u32]) -> Machine {
        let mut m = Machine::new();
        m.load(CODE, words);
        m
    }

    /// Write 32-bit instruction words (or data words) at `addr`.
    pub fn load(&mut self, addr: u64, words: &[u32]) {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        self.bus.ram.write(addr, &bytes).expect("code inside RAM");
    }

    /// Write 16-bit parcels (compressed instructions) at `addr`.
    pub fn load_halves(&mut self, addr: u64, halves: &[u16]) {
        let bytes: Vec<u8> = halves.iter().flat_map(|h| h.to_le_bytes()).collect();
        self.bus.ram.write(addr, &bytes).expect("code inside RAM");
    }

    pub fn write_u64(&mut self, addr: u64, v: u64) {
        self.bus.ram.write_u64(addr, v).expect("inside RAM");
    }

    pub fn write_bytes(&mut self, addr: u64, bytes: &[u8]) {
        self.bus.ram.write(addr, bytes).expect("inside RAM");
    }

    pub fn read_u64(&self, addr: u64) -> u64 {
        self.bus.ram.read_u64(addr).expect("inside RAM")
    }

    pub fn read_u32(&self, addr: u64) -> u32 {
        self.bus.ram.read_u32(addr).expect("inside RAM")
    }

    pub fn read_bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.bus.ram.read(addr, &mut buf).expect("inside RAM");
        buf
    }

    /// Run until `n` more instructions have retired (or the hart exits earlier).
    pub fn run(&mut self, n: u64) -> Exit {
        let until = self.hart.state.icount + n;
        self.hart.run(&mut self.bus, until)
    }

    pub fn x(&self, r: u32) -> u64 {
        self.hart.state.x[r as usize]
    }

    pub fn set_x(&mut self, r: u32, v: u64) {
        self.hart.state.x[r as usize] = v;
    }

    pub fn pc(&self) -> u64 {
        self.hart.state.pc
    }

    pub fn set_privilege(&mut self, p: PrivMode) {
        self.hart.state.privilege = p;
    }

    pub fn privilege(&self) -> PrivMode {
        self.hart.state.privilege
    }

    pub fn mcause(&self) -> u64 {
        self.hart.state.mcause
    }

    pub fn mtval(&self) -> u64 {
        self.hart.state.mtval
    }

    pub fn mepc(&self) -> u64 {
        self.hart.state.mepc
    }

    pub fn scause(&self) -> u64 {
        self.hart.state.scause
    }

    pub fn stval(&self) -> u64 {
        self.hart.state.stval
    }

    pub fn sepc(&self) -> u64 {
        self.hart.state.sepc
    }
}

/// Run `words` from `CODE` in M-mode with the given registers preset, for exactly
/// `words.len()` retired instructions.
pub fn run_code(words: &[u32], regs: &[(u32, u64)]) -> Machine {
    let mut m = Machine::with_code(words);
    for &(r, v) in regs {
        m.set_x(r, v);
    }
    m.run(words.len() as u64);
    m
}

/// Run one instruction that is expected to trap to M-mode; returns the machine parked
/// in the M handler.
pub fn trap_m(words: &[u32], regs: &[(u32, u64)]) -> Machine {
    let mut m = Machine::with_code(words);
    for &(r, v) in regs {
        m.set_x(r, v);
    }
    m.run(words.len() as u64 + 2);
    m
}

// ---------------------------------------------------------------- trap causes

pub const CAUSE_MISALIGNED_FETCH: u64 = 0;
pub const CAUSE_FETCH_ACCESS: u64 = 1;
pub const CAUSE_ILLEGAL_INSTRUCTION: u64 = 2;
pub const CAUSE_BREAKPOINT: u64 = 3;
pub const CAUSE_MISALIGNED_LOAD: u64 = 4;
pub const CAUSE_LOAD_ACCESS: u64 = 5;
pub const CAUSE_MISALIGNED_STORE: u64 = 6;
pub const CAUSE_STORE_ACCESS: u64 = 7;
pub const CAUSE_USER_ECALL: u64 = 8;
pub const CAUSE_SUPERVISOR_ECALL: u64 = 9;
pub const CAUSE_MACHINE_ECALL: u64 = 11;
pub const CAUSE_FETCH_PAGE_FAULT: u64 = 12;
pub const CAUSE_LOAD_PAGE_FAULT: u64 = 13;
pub const CAUSE_STORE_PAGE_FAULT: u64 = 15;

pub const INTERRUPT: u64 = 1 << 63;
pub const IRQ_SSI: u64 = 1;
pub const IRQ_MSI: u64 = 3;
pub const IRQ_STI: u64 = 5;
pub const IRQ_MTI: u64 = 7;
pub const IRQ_SEI: u64 = 9;
pub const IRQ_MEI: u64 = 11;

// ---------------------------------------------------------------- CSRs and fields

pub const FFLAGS: u32 = 0x001;
pub const FRM: u32 = 0x002;
pub const FCSR: u32 = 0x003;
pub const CYCLE: u32 = 0xc00;
pub const TIME: u32 = 0xc01;
pub const INSTRET: u32 = 0xc02;
pub const HPMCOUNTER3: u32 = 0xc03;
pub const SSTATUS: u32 = 0x100;
pub const SIE: u32 = 0x104;
pub const STVEC: u32 = 0x105;
pub const SCOUNTEREN: u32 = 0x106;
pub const SENVCFG: u32 = 0x10a;
pub const SSCRATCH: u32 = 0x140;
pub const SEPC: u32 = 0x141;
pub const SCAUSE: u32 = 0x142;
pub const STVAL: u32 = 0x143;
pub const SIP: u32 = 0x144;
pub const STIMECMP: u32 = 0x14d;
pub const SATP: u32 = 0x180;
pub const MVENDORID: u32 = 0xf11;
pub const MARCHID: u32 = 0xf12;
pub const MIMPID: u32 = 0xf13;
pub const MHARTID: u32 = 0xf14;
pub const MSTATUS: u32 = 0x300;
pub const MISA: u32 = 0x301;
pub const MEDELEG: u32 = 0x302;
pub const MIDELEG: u32 = 0x303;
pub const MIE: u32 = 0x304;
pub const MTVEC: u32 = 0x305;
pub const MCOUNTEREN: u32 = 0x306;
pub const MENVCFG: u32 = 0x30a;
pub const MSCRATCH: u32 = 0x340;
pub const MEPC: u32 = 0x341;
pub const MCAUSE: u32 = 0x342;
pub const MTVAL: u32 = 0x343;
pub const MIP: u32 = 0x344;
pub const MCYCLE: u32 = 0xb00;
pub const MINSTRET: u32 = 0xb02;

pub const MSTATUS_SIE: u64 = 1 << 1;
pub const MSTATUS_MIE: u64 = 1 << 3;
pub const MSTATUS_SPIE: u64 = 1 << 5;
pub const MSTATUS_MPIE: u64 = 1 << 7;
pub const MSTATUS_SPP: u64 = 1 << 8;
pub const MSTATUS_MPP_SHIFT: u32 = 11;
pub const MSTATUS_MPP: u64 = 3 << 11;
pub const MSTATUS_FS: u64 = 3 << 13;
pub const MSTATUS_MPRV: u64 = 1 << 17;
pub const MSTATUS_SUM: u64 = 1 << 18;
pub const MSTATUS_MXR: u64 = 1 << 19;
pub const MSTATUS_TVM: u64 = 1 << 20;
pub const MSTATUS_TW: u64 = 1 << 21;
pub const MSTATUS_TSR: u64 = 1 << 22;
pub const MSTATUS_UXL: u64 = 3 << 32;
pub const MSTATUS_SXL: u64 = 3 << 34;
pub const MSTATUS_SD: u64 = 1 << 63;

pub const MENVCFG_STCE: u64 = 1 << 63;

// ---------------------------------------------------------------- registers

pub const ZERO: u32 = 0;
pub const RA: u32 = 1;
pub const SP: u32 = 2;
pub const GP: u32 = 3;
pub const TP: u32 = 4;
pub const T0: u32 = 5;
pub const T1: u32 = 6;
pub const T2: u32 = 7;
pub const S0: u32 = 8;
pub const S1: u32 = 9;
pub const A0: u32 = 10;
pub const A1: u32 = 11;
pub const A2: u32 = 12;
pub const A3: u32 = 13;
pub const A4: u32 = 14;
pub const A5: u32 = 15;
pub const A6: u32 = 16;
pub const A7: u32 = 17;
pub const S2: u32 = 18;
pub const T3: u32 = 28;
pub const T4: u32 = 29;
pub const T5: u32 = 30;
pub const T6: u32 = 31;

// ---------------------------------------------------------------- 32-bit formats

pub fn r_type(funct7: u32, rs2: u32, rs1: u32, funct3: u32, rd: u32, opcode: u32) -> u32 {
    assert!(funct7 < 128 && rs2 < 32 && rs1 < 32 && funct3 < 8 && rd < 32 && opcode < 128);
    (funct7 << 25) | (rs2 << 20) | (rs1 << 15) | (funct3 << 12) | (rd << 7) | opcode
}

pub fn i_type(imm: i64, rs1: u32, funct3: u32, rd: u32, opcode: u32) -> u32 {
    assert!((-2048..4096).contains(&imm), "I-immediate {imm} out of range");
    (((imm as u32) & 0xfff) << 20) | (rs1 << 15) | (funct3 << 12) | (rd << 7) | opcode
}

pub fn s_type(imm: i64, rs2: u32, rs1: u32, funct3: u32, opcode: u32) -> u32 {
    assert!((-2048..2048).contains(&imm), "S-immediate {imm} out of range");
    let imm = imm as u32;
    (((imm >> 5) & 0x7f) << 25) | (rs2 << 20) | (rs1 << 15) | (funct3 << 12) | ((imm & 0x1f) << 7) | opcode
}

pub fn b_type(imm: i64, rs2: u32, rs1: u32, funct3: u32, opcode: u32) -> u32 {
    assert!((-4096..4096).contains(&imm) && imm & 1 == 0, "B-immediate {imm} out of range");
    let imm = imm as u32;
    (((imm >> 12) & 1) << 31)
        | (((imm >> 5) & 0x3f) << 25)
        | (rs2 << 20)
        | (rs1 << 15)
        | (funct3 << 12)
        | (((imm >> 1) & 0xf) << 8)
        | (((imm >> 11) & 1) << 7)
        | opcode
}

/// `imm` is the value of bits 31:12 (the upper immediate), as a 20-bit field.
pub fn u_type(imm20: u32, rd: u32, opcode: u32) -> u32 {
    assert!(imm20 < (1 << 20));
    (imm20 << 12) | (rd << 7) | opcode
}

pub fn j_type(imm: i64, rd: u32, opcode: u32) -> u32 {
    assert!((-(1 << 20)..(1 << 20)).contains(&imm) && imm & 1 == 0, "J-immediate {imm} out of range");
    let imm = imm as u32;
    (((imm >> 20) & 1) << 31)
        | (((imm >> 1) & 0x3ff) << 21)
        | (((imm >> 11) & 1) << 20)
        | (((imm >> 12) & 0xff) << 12)
        | (rd << 7)
        | opcode
}

pub const OP_LOAD: u32 = 0b000_0011;
pub const OP_LOAD_FP: u32 = 0b000_0111;
pub const OP_MISC_MEM: u32 = 0b000_1111;
pub const OP_IMM: u32 = 0b001_0011;
pub const OP_AUIPC: u32 = 0b001_0111;
pub const OP_IMM_32: u32 = 0b001_1011;
pub const OP_STORE: u32 = 0b010_0011;
pub const OP_STORE_FP: u32 = 0b010_0111;
pub const OP_AMO: u32 = 0b010_1111;
pub const OP_OP: u32 = 0b011_0011;
pub const OP_LUI: u32 = 0b011_0111;
pub const OP_OP_32: u32 = 0b011_1011;
pub const OP_BRANCH: u32 = 0b110_0011;
pub const OP_JALR: u32 = 0b110_0111;
pub const OP_JAL: u32 = 0b110_1111;
pub const OP_SYSTEM: u32 = 0b111_0011;

// ---------------------------------------------------------------- RV64I

pub fn lui(rd: u32, imm20: u32) -> u32 {
    u_type(imm20, rd, OP_LUI)
}
pub fn auipc(rd: u32, imm20: u32) -> u32 {
    u_type(imm20, rd, OP_AUIPC)
}
pub fn jal(rd: u32, offset: i64) -> u32 {
    j_type(offset, rd, OP_JAL)
}
pub fn jalr(rd: u32, rs1: u32, offset: i64) -> u32 {
    i_type(offset, rs1, 0, rd, OP_JALR)
}
pub fn beq(rs1: u32, rs2: u32, offset: i64) -> u32 {
    b_type(offset, rs2, rs1, 0, OP_BRANCH)
}
pub fn bne(rs1: u32, rs2: u32, offset: i64) -> u32 {
    b_type(offset, rs2, rs1, 1, OP_BRANCH)
}
pub fn blt(rs1: u32, rs2: u32, offset: i64) -> u32 {
    b_type(offset, rs2, rs1, 4, OP_BRANCH)
}
pub fn bge(rs1: u32, rs2: u32, offset: i64) -> u32 {
    b_type(offset, rs2, rs1, 5, OP_BRANCH)
}
pub fn bltu(rs1: u32, rs2: u32, offset: i64) -> u32 {
    b_type(offset, rs2, rs1, 6, OP_BRANCH)
}
pub fn bgeu(rs1: u32, rs2: u32, offset: i64) -> u32 {
    b_type(offset, rs2, rs1, 7, OP_BRANCH)
}
pub fn lb(rd: u32, rs1: u32, offset: i64) -> u32 {
    i_type(offset, rs1, 0, rd, OP_LOAD)
}
pub fn lh(rd: u32, rs1: u32, offset: i64) -> u32 {
    i_type(offset, rs1, 1, rd, OP_LOAD)
}
pub fn lw(rd: u32, rs1: u32, offset: i64) -> u32 {
    i_type(offset, rs1, 2, rd, OP_LOAD)
}
pub fn ld(rd: u32, rs1: u32, offset: i64) -> u32 {
    i_type(offset, rs1, 3, rd, OP_LOAD)
}
pub fn lbu(rd: u32, rs1: u32, offset: i64) -> u32 {
    i_type(offset, rs1, 4, rd, OP_LOAD)
}
pub fn lhu(rd: u32, rs1: u32, offset: i64) -> u32 {
    i_type(offset, rs1, 5, rd, OP_LOAD)
}
pub fn lwu(rd: u32, rs1: u32, offset: i64) -> u32 {
    i_type(offset, rs1, 6, rd, OP_LOAD)
}
pub fn sb(rs2: u32, rs1: u32, offset: i64) -> u32 {
    s_type(offset, rs2, rs1, 0, OP_STORE)
}
pub fn sh(rs2: u32, rs1: u32, offset: i64) -> u32 {
    s_type(offset, rs2, rs1, 1, OP_STORE)
}
pub fn sw(rs2: u32, rs1: u32, offset: i64) -> u32 {
    s_type(offset, rs2, rs1, 2, OP_STORE)
}
pub fn sd(rs2: u32, rs1: u32, offset: i64) -> u32 {
    s_type(offset, rs2, rs1, 3, OP_STORE)
}
pub fn addi(rd: u32, rs1: u32, imm: i64) -> u32 {
    i_type(imm, rs1, 0, rd, OP_IMM)
}
pub fn slti(rd: u32, rs1: u32, imm: i64) -> u32 {
    i_type(imm, rs1, 2, rd, OP_IMM)
}
pub fn sltiu(rd: u32, rs1: u32, imm: i64) -> u32 {
    i_type(imm, rs1, 3, rd, OP_IMM)
}
pub fn xori(rd: u32, rs1: u32, imm: i64) -> u32 {
    i_type(imm, rs1, 4, rd, OP_IMM)
}
pub fn ori(rd: u32, rs1: u32, imm: i64) -> u32 {
    i_type(imm, rs1, 6, rd, OP_IMM)
}
pub fn andi(rd: u32, rs1: u32, imm: i64) -> u32 {
    i_type(imm, rs1, 7, rd, OP_IMM)
}
pub fn slli(rd: u32, rs1: u32, shamt: u32) -> u32 {
    assert!(shamt < 64);
    i_type(shamt as i64, rs1, 1, rd, OP_IMM)
}
pub fn srli(rd: u32, rs1: u32, shamt: u32) -> u32 {
    assert!(shamt < 64);
    i_type(shamt as i64, rs1, 5, rd, OP_IMM)
}
pub fn srai(rd: u32, rs1: u32, shamt: u32) -> u32 {
    assert!(shamt < 64);
    i_type((0x400 | shamt) as i64, rs1, 5, rd, OP_IMM)
}
pub fn add(rd: u32, rs1: u32, rs2: u32) -> u32 {
    r_type(0, rs2, rs1, 0, rd, OP_OP)
}
pub fn sub(rd: u32, rs1: u32, rs2: u32) -> u32 {
    r_type(0x20, rs2, rs1, 0, rd, OP_OP)
}
pub fn sll(rd: u32, rs1: u32, rs2: u32) -> u32 {
    r_type(0, rs2, rs1, 1, rd, OP_OP)
}
pub fn slt(rd: u32, rs1: u32, rs2: u32) -> u32 {
    r_type(0, rs2, rs1, 2, rd, OP_OP)
}
pub fn sltu(rd: u32, rs1: u32, rs2: u32) -> u32 {
    r_type(0, rs2, rs1, 3, rd, OP_OP)
}
pub fn xor(rd: u32, rs1: u32, rs2: u32) -> u32 {
    r_type(0, rs2, rs1, 4, rd, OP_OP)
}
pub fn srl(rd: u32, rs1: u32, rs2: u32) -> u32 {
    r_type(0, rs2, rs1, 5, rd, OP_OP)
}
pub fn sra(rd: u32, rs1: u32, rs2: u32) -> u32 {
    r_type(0x20, rs2, rs1, 5, rd, OP_OP)
}
pub fn or(rd: u32, rs1: u32, rs2: u32) -> u32 {
    r_type(0, rs2, rs1, 6, rd, OP_OP)
}
pub fn and(rd: u32, rs1: u32, rs2: u32) -> u32 {
    r_type(0, rs2, rs1, 7, rd, OP_OP)
}
pub fn addiw(rd: u32, rs1: u32, imm: i64) -> u32 {
    i_type(imm, rs1, 0, rd, OP_IMM_32)
}
pub fn slliw(rd: u32, rs1: u32, shamt: u32) -> u32 {
    assert!(shamt < 32);
    i_type(shamt as i64, rs1, 1, rd, OP_IMM_32)
}
pub fn srliw(rd: u32, rs1: u32, shamt: u32) -> u32 {
    assert!(shamt < 32);
    i_type(shamt as i64, rs1, 5, rd, OP_IMM_32)
}
pub fn sraiw(rd: u32, rs1: u32, shamt: u32) -> u32 {
    assert!(shamt < 32);
    i_type((0x400 | shamt) as i64, rs1, 5, rd, OP_IMM_32)
}
pub fn addw(rd: u32, rs1: u32, rs2: u32) -> u32 {
    r_type(0, rs2, rs1, 0, rd, OP_OP_32)
}
pub fn subw(rd: u32, rs1: u32, rs2: u32) -> u32 {
    r_type(0x20, rs2, rs1, 0, rd, OP_OP_32)
}
pub fn sllw(rd: u32, rs1: u32, rs2: u32) -> u32 {
    r_type(0, rs2, rs1, 1, rd, OP_OP_32)
}
pub fn srlw(rd: u32, rs1: u32, rs2: u32) -> u32 {
    r_type(0, rs2, rs1, 5, rd, OP_OP_32)
}
pub fn sraw(rd: u32, rs1: u32, rs2: u32) -> u32 {
    r_type(0x20, rs2, rs1, 5, rd, OP_OP_32)
}
/// `fence iorw, iorw`
pub fn fence() -> u32 {
    i_type(0x0ff, 0, 0, 0, OP_MISC_MEM)
}
pub fn fence_i() -> u32 {
    i_type(0, 0, 1, 0, OP_MISC_MEM)
}
pub fn nop() -> u32 {
    addi(0, 0, 0)
}

// ---------------------------------------------------------------- M

pub fn mul(rd: u32, rs1: u32, rs2: u32) -> u32 {
    r_type(1, rs2, rs1, 0, rd, OP_OP)
}
pub fn mulh(rd: u32, rs1: u32, rs2: u32) -> u32 {
    r_type(1, rs2, rs1, 1, rd, OP_OP)
}
pub fn mulhsu(rd: u32, rs1: u32, rs2: u32) -> u32 {
    r_type(1, rs2, rs1, 2, rd, OP_OP)
}
pub fn mulhu(rd: u32, rs1: u32, rs2: u32) -> u32 {
    r_type(1, rs2, rs1, 3, rd, OP_OP)
}
pub fn div(rd: u32, rs1: u32, rs2: u32) -> u32 {
    r_type(1, rs2, rs1, 4, rd, OP_OP)
}
pub fn divu(rd: u32, rs1: u32, rs2: u32) -> u32 {
    r_type(1, rs2, rs1, 5, rd, OP_OP)
}
pub fn rem(rd: u32, rs1: u32, rs2: u32) -> u32 {
    r_type(1, rs2, rs1, 6, rd, OP_OP)
}
pub fn remu(rd: u32, rs1: u32, rs2: u32) -> u32 {
    r_type(1, rs2, rs1, 7, rd, OP_OP)
}
pub fn mulw(rd: u32, rs1: u32, rs2: u32) -> u32 {
    r_type(1, rs2, rs1, 0, rd, OP_OP_32)
}
pub fn divw(rd: u32, rs1: u32, rs2: u32) -> u32 {
    r_type(1, rs2, rs1, 4, rd, OP_OP_32)
}
pub fn divuw(rd: u32, rs1: u32, rs2: u32) -> u32 {
    r_type(1, rs2, rs1, 5, rd, OP_OP_32)
}
pub fn remw(rd: u32, rs1: u32, rs2: u32) -> u32 {
    r_type(1, rs2, rs1, 6, rd, OP_OP_32)
}
pub fn remuw(rd: u32, rs1: u32, rs2: u32) -> u32 {
    r_type(1, rs2, rs1, 7, rd, OP_OP_32)
}

// ---------------------------------------------------------------- A

/// An AMO with funct5 `f5`, width funct3 `f3` (2 = W, 3 = D), and aq/rl clear.
pub fn amo(f5: u32, f3: u32, rd: u32, rs1: u32, rs2: u32) -> u32 {
    r_type(f5 << 2, rs2, rs1, f3, rd, OP_AMO)
}
pub fn lr_w(rd: u32, rs1: u32) -> u32 {
    amo(0b00010, 2, rd, rs1, 0)
}
pub fn sc_w(rd: u32, rs2: u32, rs1: u32) -> u32 {
    amo(0b00011, 2, rd, rs1, rs2)
}
pub fn lr_d(rd: u32, rs1: u32) -> u32 {
    amo(0b00010, 3, rd, rs1, 0)
}
pub fn sc_d(rd: u32, rs2: u32, rs1: u32) -> u32 {
    amo(0b00011, 3, rd, rs1, rs2)
}
pub fn amoswap_w(rd: u32, rs2: u32, rs1: u32) -> u32 {
    amo(0b00001, 2, rd, rs1, rs2)
}
pub fn amoadd_w(rd: u32, rs2: u32, rs1: u32) -> u32 {
    amo(0b00000, 2, rd, rs1, rs2)
}
pub fn amoxor_w(rd: u32, rs2: u32, rs1: u32) -> u32 {
    amo(0b00100, 2, rd, rs1, rs2)
}
pub fn amoand_w(rd: u32, rs2: u32, rs1: u32) -> u32 {
    amo(0b01100, 2, rd, rs1, rs2)
}
pub fn amoor_w(rd: u32, rs2: u32, rs1: u32) -> u32 {
    amo(0b01000, 2, rd, rs1, rs2)
}
pub fn amomin_w(rd: u32, rs2: u32, rs1: u32) -> u32 {
    amo(0b10000, 2, rd, rs1, rs2)
}
pub fn amomax_w(rd: u32, rs2: u32, rs1: u32) -> u32 {
    amo(0b10100, 2, rd, rs1, rs2)
}
pub fn amominu_w(rd: u32, rs2: u32, rs1: u32) -> u32 {
    amo(0b11000, 2, rd, rs1, rs2)
}
pub fn amomaxu_w(rd: u32, rs2: u32, rs1: u32) -> u32 {
    amo(0b11100, 2, rd, rs1, rs2)
}
pub fn amoswap_d(rd: u32, rs2: u32, rs1: u32) -> u32 {
    amo(0b00001, 3, rd, rs1, rs2)
}
pub fn amoadd_d(rd: u32, rs2: u32, rs1: u32) -> u32 {
    amo(0b00000, 3, rd, rs1, rs2)
}
pub fn amoxor_d(rd: u32, rs2: u32, rs1: u32) -> u32 {
    amo(0b00100, 3, rd, rs1, rs2)
}
pub fn amoand_d(rd: u32, rs2: u32, rs1: u32) -> u32 {
    amo(0b01100, 3, rd, rs1, rs2)
}
pub fn amoor_d(rd: u32, rs2: u32, rs1: u32) -> u32 {
    amo(0b01000, 3, rd, rs1, rs2)
}
pub fn amomin_d(rd: u32, rs2: u32, rs1: u32) -> u32 {
    amo(0b10000, 3, rd, rs1, rs2)
}
pub fn amomax_d(rd: u32, rs2: u32, rs1: u32) -> u32 {
    amo(0b10100, 3, rd, rs1, rs2)
}
pub fn amominu_d(rd: u32, rs2: u32, rs1: u32) -> u32 {
    amo(0b11000, 3, rd, rs1, rs2)
}
pub fn amomaxu_d(rd: u32, rs2: u32, rs1: u32) -> u32 {
    amo(0b11100, 3, rd, rs1, rs2)
}

// ---------------------------------------------------------------- Zicsr and privileged

pub fn csrrw(rd: u32, csr: u32, rs1: u32) -> u32 {
    assert!(csr < 4096);
    (csr << 20) | (rs1 << 15) | (1 << 12) | (rd << 7) | OP_SYSTEM
}
pub fn csrrs(rd: u32, csr: u32, rs1: u32) -> u32 {
    assert!(csr < 4096);
    (csr << 20) | (rs1 << 15) | (2 << 12) | (rd << 7) | OP_SYSTEM
}
pub fn csrrc(rd: u32, csr: u32, rs1: u32) -> u32 {
    assert!(csr < 4096);
    (csr << 20) | (rs1 << 15) | (3 << 12) | (rd << 7) | OP_SYSTEM
}
pub fn csrrwi(rd: u32, csr: u32, uimm: u32) -> u32 {
    assert!(csr < 4096 && uimm < 32);
    (csr << 20) | (uimm << 15) | (5 << 12) | (rd << 7) | OP_SYSTEM
}
pub fn csrrsi(rd: u32, csr: u32, uimm: u32) -> u32 {
    assert!(csr < 4096 && uimm < 32);
    (csr << 20) | (uimm << 15) | (6 << 12) | (rd << 7) | OP_SYSTEM
}
pub fn csrrci(rd: u32, csr: u32, uimm: u32) -> u32 {
    assert!(csr < 4096 && uimm < 32);
    (csr << 20) | (uimm << 15) | (7 << 12) | (rd << 7) | OP_SYSTEM
}
/// `csrr rd, csr` = `csrrs rd, csr, x0`
pub fn csrr(rd: u32, csr: u32) -> u32 {
    csrrs(rd, csr, 0)
}
/// `csrw csr, rs` = `csrrw x0, csr, rs`
pub fn csrw(csr: u32, rs1: u32) -> u32 {
    csrrw(0, csr, rs1)
}
/// `csrs csr, rs` = `csrrs x0, csr, rs`
pub fn csrs(csr: u32, rs1: u32) -> u32 {
    csrrs(0, csr, rs1)
}
/// `csrc csr, rs` = `csrrc x0, csr, rs`
pub fn csrc(csr: u32, rs1: u32) -> u32 {
    csrrc(0, csr, rs1)
}
pub fn ecall() -> u32 {
    0x0000_0073
}
pub fn ebreak() -> u32 {
    0x0010_0073
}
pub fn sret() -> u32 {
    0x1020_0073
}
pub fn mret() -> u32 {
    0x3020_0073
}
pub fn wfi() -> u32 {
    0x1050_0073
}
pub fn sfence_vma(rs1: u32, rs2: u32) -> u32 {
    r_type(0b000_1001, rs2, rs1, 0, 0, OP_SYSTEM)
}

// ---------------------------------------------------------------- C (RV64C)

fn creg(r: u32) -> u32 {
    assert!((8..16).contains(&r), "x{r} is not a compressed register (x8-x15)");
    r - 8
}

fn bit(v: u32, i: u32) -> u32 {
    (v >> i) & 1
}

fn bits(v: u32, hi: u32, lo: u32) -> u32 {
    (v >> lo) & ((1 << (hi - lo + 1)) - 1)
}

fn ci(funct3: u32, imm: u32, rd: u32, op: u32) -> u16 {
    // CI: funct3 | imm[5] | rd | imm[4:0] | op
    ((funct3 << 13) | (bit(imm, 5) << 12) | (rd << 7) | (bits(imm, 4, 0) << 2) | op) as u16
}

/// `c.addi4spn rd', nzuimm` — nzuimm[5:4|9:6|2|3] in bits 12:5.
pub fn c_addi4spn(rd: u32, nzuimm: u32) -> u16 {
    assert!(nzuimm < 1024 && nzuimm & 3 == 0);
    let f = (bits(nzuimm, 5, 4) << 6) | (bits(nzuimm, 9, 6) << 2) | (bit(nzuimm, 2) << 1) | bit(nzuimm, 3);
    ((f << 5) | (creg(rd) << 2)) as u16
}

/// CL/CS with a doubleword offset: uimm[5:3] in 12:10, uimm[7:6] in 6:5.
fn cls_d(funct3: u32, r_low: u32, rs1: u32, uimm: u32) -> u16 {
    assert!(uimm < 256 && uimm & 7 == 0);
    ((funct3 << 13) | (bits(uimm, 5, 3) << 10) | (creg(rs1) << 7) | (bits(uimm, 7, 6) << 5) | (creg(r_low) << 2)) as u16
}

/// CL/CS with a word offset: uimm[5:3] in 12:10, uimm[2] in 6, uimm[6] in 5.
fn cls_w(funct3: u32, r_low: u32, rs1: u32, uimm: u32) -> u16 {
    assert!(uimm < 128 && uimm & 3 == 0);
    ((funct3 << 13)
        | (bits(uimm, 5, 3) << 10)
        | (creg(rs1) << 7)
        | (bit(uimm, 2) << 6)
        | (bit(uimm, 6) << 5)
        | (creg(r_low) << 2)) as u16
}

pub fn c_fld(rd: u32, rs1: u32, uimm: u32) -> u16 {
    cls_d(0b001, rd, rs1, uimm)
}
pub fn c_lw(rd: u32, rs1: u32, uimm: u32) -> u16 {
    cls_w(0b010, rd, rs1, uimm)
}
pub fn c_ld(rd: u32, rs1: u32, uimm: u32) -> u16 {
    cls_d(0b011, rd, rs1, uimm)
}
pub fn c_fsd(rs2: u32, rs1: u32, uimm: u32) -> u16 {
    cls_d(0b101, rs2, rs1, uimm)
}
pub fn c_sw(rs2: u32, rs1: u32, uimm: u32) -> u16 {
    cls_w(0b110, rs2, rs1, uimm)
}
pub fn c_sd(rs2: u32, rs1: u32, uimm: u32) -> u16 {
    cls_d(0b111, rs2, rs1, uimm)
}

pub fn c_nop() -> u16 {
    ci(0b000, 0, 0, 0b01)
}
pub fn c_addi(rd: u32, imm: i32) -> u16 {
    assert!((-32..32).contains(&imm));
    ci(0b000, imm as u32 & 0x3f, rd, 0b01)
}
pub fn c_addiw(rd: u32, imm: i32) -> u16 {
    assert!((-32..32).contains(&imm));
    ci(0b001, imm as u32 & 0x3f, rd, 0b01)
}
pub fn c_li(rd: u32, imm: i32) -> u16 {
    assert!((-32..32).contains(&imm));
    ci(0b010, imm as u32 & 0x3f, rd, 0b01)
}

/// `c.addi16sp nzimm` — nzimm[9] in 12, nzimm[4|6|8:7|5] in 6:2.
pub fn c_addi16sp(nzimm: i32) -> u16 {
    assert!((-512..512).contains(&nzimm) && nzimm & 15 == 0);
    let v = nzimm as u32;
    let low = (bit(v, 4) << 4) | (bit(v, 6) << 3) | (bits(v, 8, 7) << 1) | bit(v, 5);
    ((0b011 << 13) | (bit(v, 9) << 12) | (2 << 7) | (low << 2) | 0b01) as u16
}

/// `c.lui rd, nzimm` where `nzimm` is the 6-bit signed value of imm[17:12].
pub fn c_lui(rd: u32, nzimm6: i32) -> u16 {
    assert!((-32..32).contains(&nzimm6));
    ci(0b011, nzimm6 as u32 & 0x3f, rd, 0b01)
}

fn cb_alu(funct2: u32, rd: u32, imm6: u32) -> u16 {
    ((0b100 << 13) | (bit(imm6, 5) << 12) | (funct2 << 10) | (creg(rd) << 7) | (bits(imm6, 4, 0) << 2) | 0b01) as u16
}

pub fn c_srli(rd: u32, shamt: u32) -> u16 {
    assert!(shamt < 64);
    cb_alu(0b00, rd, shamt)
}
pub fn c_srai(rd: u32, shamt: u32) -> u16 {
    assert!(shamt < 64);
    cb_alu(0b01, rd, shamt)
}
pub fn c_andi(rd: u32, imm: i32) -> u16 {
    assert!((-32..32).contains(&imm));
    cb_alu(0b10, rd, imm as u32 & 0x3f)
}

fn ca(bit12: u32, funct2: u32, rd: u32, rs2: u32) -> u16 {
    ((0b100 << 13) | (bit12 << 12) | (0b11 << 10) | (creg(rd) << 7) | (funct2 << 5) | (creg(rs2) << 2) | 0b01) as u16
}

pub fn c_sub(rd: u32, rs2: u32) -> u16 {
    ca(0, 0b00, rd, rs2)
}
pub fn c_xor(rd: u32, rs2: u32) -> u16 {
    ca(0, 0b01, rd, rs2)
}
pub fn c_or(rd: u32, rs2: u32) -> u16 {
    ca(0, 0b10, rd, rs2)
}
pub fn c_and(rd: u32, rs2: u32) -> u16 {
    ca(0, 0b11, rd, rs2)
}
pub fn c_subw(rd: u32, rs2: u32) -> u16 {
    ca(1, 0b00, rd, rs2)
}
pub fn c_addw(rd: u32, rs2: u32) -> u16 {
    ca(1, 0b01, rd, rs2)
}

/// `c.j offset` — offset[11|4|9:8|10|6|7|3:1|5] in bits 12:2.
pub fn c_j(offset: i32) -> u16 {
    assert!((-2048..2048).contains(&offset) && offset & 1 == 0);
    let v = offset as u32;
    let f = (bit(v, 11) << 10)
        | (bit(v, 4) << 9)
        | (bits(v, 9, 8) << 7)
        | (bit(v, 10) << 6)
        | (bit(v, 6) << 5)
        | (bit(v, 7) << 4)
        | (bits(v, 3, 1) << 1)
        | bit(v, 5);
    ((0b101 << 13) | (f << 2) | 0b01) as u16
}

/// `c.beqz`/`c.bnez` — offset[8|4:3] in 12:10, offset[7:6|2:1|5] in 6:2.
fn cb_branch(funct3: u32, rs1: u32, offset: i32) -> u16 {
    assert!((-256..256).contains(&offset) && offset & 1 == 0);
    let v = offset as u32;
    let hi = (bit(v, 8) << 2) | bits(v, 4, 3);
    let lo = (bits(v, 7, 6) << 3) | (bits(v, 2, 1) << 1) | bit(v, 5);
    ((funct3 << 13) | (hi << 10) | (creg(rs1) << 7) | (lo << 2) | 0b01) as u16
}

pub fn c_beqz(rs1: u32, offset: i32) -> u16 {
    cb_branch(0b110, rs1, offset)
}
pub fn c_bnez(rs1: u32, offset: i32) -> u16 {
    cb_branch(0b111, rs1, offset)
}

pub fn c_slli(rd: u32, shamt: u32) -> u16 {
    assert!(shamt < 64);
    ci(0b000, shamt, rd, 0b10)
}

/// `c.fldsp`/`c.ldsp` — uimm[5] in 12, uimm[4:3|8:6] in 6:2.
fn ci_sp_d(funct3: u32, rd: u32, uimm: u32) -> u16 {
    assert!(uimm < 512 && uimm & 7 == 0);
    let low = (bits(uimm, 4, 3) << 3) | bits(uimm, 8, 6);
    ((funct3 << 13) | (bit(uimm, 5) << 12) | (rd << 7) | (low << 2) | 0b10) as u16
}

pub fn c_fldsp(rd: u32, uimm: u32) -> u16 {
    ci_sp_d(0b001, rd, uimm)
}
pub fn c_ldsp(rd: u32, uimm: u32) -> u16 {
    ci_sp_d(0b011, rd, uimm)
}

/// `c.lwsp` — uimm[5] in 12, uimm[4:2|7:6] in 6:2.
pub fn c_lwsp(rd: u32, uimm: u32) -> u16 {
    assert!(uimm < 256 && uimm & 3 == 0);
    let low = (bits(uimm, 4, 2) << 2) | bits(uimm, 7, 6);
    ((0b010 << 13) | (bit(uimm, 5) << 12) | (rd << 7) | (low << 2) | 0b10) as u16
}

fn cr(bit12: u32, r1: u32, r2: u32) -> u16 {
    ((0b100 << 13) | (bit12 << 12) | (r1 << 7) | (r2 << 2) | 0b10) as u16
}

pub fn c_jr(rs1: u32) -> u16 {
    cr(0, rs1, 0)
}
pub fn c_mv(rd: u32, rs2: u32) -> u16 {
    cr(0, rd, rs2)
}
pub fn c_ebreak() -> u16 {
    cr(1, 0, 0)
}
pub fn c_jalr(rs1: u32) -> u16 {
    cr(1, rs1, 0)
}
pub fn c_add(rd: u32, rs2: u32) -> u16 {
    cr(1, rd, rs2)
}

/// `c.fsdsp`/`c.sdsp` — uimm[5:3|8:6] in 12:7.
fn css_d(funct3: u32, rs2: u32, uimm: u32) -> u16 {
    assert!(uimm < 512 && uimm & 7 == 0);
    let f = (bits(uimm, 5, 3) << 3) | bits(uimm, 8, 6);
    ((funct3 << 13) | (f << 7) | (rs2 << 2) | 0b10) as u16
}

pub fn c_fsdsp(rs2: u32, uimm: u32) -> u16 {
    css_d(0b101, rs2, uimm)
}
pub fn c_sdsp(rs2: u32, uimm: u32) -> u16 {
    css_d(0b111, rs2, uimm)
}

/// `c.swsp` — uimm[5:2|7:6] in 12:7.
pub fn c_swsp(rs2: u32, uimm: u32) -> u16 {
    assert!(uimm < 256 && uimm & 3 == 0);
    let f = (bits(uimm, 5, 2) << 2) | bits(uimm, 7, 6);
    ((0b110 << 13) | (f << 7) | (rs2 << 2) | 0b10) as u16
}

// ---------------------------------------------------------------- Sv39 page tables

pub const PTE_V: u64 = 1 << 0;
pub const PTE_R: u64 = 1 << 1;
pub const PTE_W: u64 = 1 << 2;
pub const PTE_X: u64 = 1 << 3;
pub const PTE_U: u64 = 1 << 4;
pub const PTE_G: u64 = 1 << 5;
pub const PTE_A: u64 = 1 << 6;
pub const PTE_D: u64 = 1 << 7;

/// satp.MODE for Sv39.
pub const SATP_SV39: u64 = 8 << 60;

/// A PTE pointing at physical address `paddr` with `flags`.
pub fn pte(paddr: u64, flags: u64) -> u64 {
    ((paddr >> 12) << 10) | flags
}

/// Builds Sv39 page tables in guest RAM from a bump allocator of table pages.
pub struct PageTables {
    pub root: u64,
    next_table: u64,
}

impl PageTables {
    /// Tables are allocated from `[first_table, ...)`, one 4 KiB page each.
    pub fn new(m: &mut Machine, first_table: u64) -> PageTables {
        m.write_bytes(first_table, &[0; 4096]);
        PageTables { root: first_table, next_table: first_table + 4096 }
    }

    pub fn satp(&self) -> u64 {
        SATP_SV39 | (self.root >> 12)
    }

    fn vpn(va: u64, level: u32) -> u64 {
        (va >> (12 + 9 * level)) & 0x1ff
    }

    /// Map `va` to `pa` with a leaf at `level` (0 = 4 KiB, 1 = 2 MiB, 2 = 1 GiB),
    /// creating intermediate tables as needed. Returns the leaf PTE's address.
    pub fn map(&mut self, m: &mut Machine, va: u64, pa: u64, level: u32, flags: u64) -> u64 {
        let mut table = self.root;
        for l in (level + 1..3).rev() {
            let slot = table + Self::vpn(va, l) * 8;
            let entry = m.read_u64(slot);
            table = if entry & PTE_V != 0 {
                (entry >> 10) << 12
            } else {
                let t = self.next_table;
                self.next_table += 4096;
                m.write_bytes(t, &[0; 4096]);
                m.write_u64(slot, pte(t, PTE_V));
                t
            };
        }
        let slot = table + Self::vpn(va, level) * 8;
        m.write_u64(slot, pte(pa, flags));
        slot
    }
}
