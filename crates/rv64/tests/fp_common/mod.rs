//! A minimal machine for the F/D tests: 64 KiB of RAM at 0x8000_0000, no devices,
//! and instruction encoders. A test writes a few instructions at the start of RAM,
//! sets up registers and runs them in M-mode; a trap lands on a `j .` at `TRAP_VECTOR`
//! and leaves its cause in mcause.

#![allow(dead_code)]

use rv64::{Bus, BusFault, Exit, GuestRam, Hart, HartConfig};

pub const RAM_BASE: u64 = 0x8000_0000;
pub const RAM_SIZE: u64 = 64 * 1024;
pub const TRAP_VECTOR: u64 = RAM_BASE + 0x100;
/// Scratch memory for loads and stores.
pub const DATA: u64 = RAM_BASE + 0x1000;

/// mstatus.FS values.
pub const FS_SHIFT: u32 = 13;
pub const FS_OFF: u64 = 0;
pub const FS_INITIAL: u64 = 1;
pub const FS_DIRTY: u64 = 3;

/// fflags bits.
pub const NV: u64 = 0x10;
pub const DZ: u64 = 0x08;
pub const OF: u64 = 0x04;
pub const UF: u64 = 0x02;
pub const NX: u64 = 0x01;

/// Rounding modes (the rm field and fcsr.frm).
pub const RNE: u32 = 0;
pub const RTZ: u32 = 1;
pub const RDN: u32 = 2;
pub const RUP: u32 = 3;
pub const RMM: u32 = 4;
pub const DYN: u32 = 7;

pub const CANONICAL_NAN_S: u64 = 0xffff_ffff_7fc0_0000;
pub const CANONICAL_NAN_D: u64 = 0x7ff8_0000_0000_0000;

pub struct TestBus {
    ram: GuestRam,
}

impl Bus for TestBus {
    fn ram(&mut self) -> &mut GuestRam {
        &mut self.ram
    }
    fn load(&mut self, _paddr: u64, _size: u8) -> Result<u64, BusFault> {
        Err(BusFault)
    }
    fn store(&mut self, _paddr: u64, _size: u8, _value: u64) -> Result<(), BusFault> {
        Err(BusFault)
    }
    fn external_irq(&self) -> (bool, bool) {
        (false, false)
    }
    fn stop_requested(&self) -> bool {
        false
    }
}

pub struct Machine {
    pub hart: Hart,
    pub bus: TestBus,
}

impl Machine {
    /// A hart in M-mode with FS = Initial and fcsr = 0.
    pub fn new() -> Machine {
        let mut bus = TestBus { ram: GuestRam::new(RAM_BASE, RAM_SIZE) };
        bus.ram.write(TRAP_VECTOR, &0x0000_006fu32.to_le_bytes()).expect("in RAM"); // j .
        let mut hart = Hart::new(HartConfig::default(), RAM_BASE);
        hart.state.mtvec = TRAP_VECTOR;
        hart.state.mstatus |= FS_INITIAL << FS_SHIFT;
        Machine { hart, bus }
    }

    /// Run `program` from the start of RAM: one step per instruction. A trap ends it
    /// at the trap vector (the rest of the budget spins there).
    pub fn run(&mut self, program: &[u32]) {
        let mut bytes = Vec::new();
        for word in program {
            bytes.extend_from_slice(&word.to_le_bytes());
        }
        self.bus.ram.write(RAM_BASE, &bytes).expect("program fits in RAM");
        self.hart.state.pc = RAM_BASE;
        let until = self.hart.state.icount + program.len() as u64;
        assert_eq!(self.hart.run(&mut self.bus, until), Exit::Budget);
    }

    /// Whether the last run ended in a trap, and with which mcause.
    pub fn trapped(&self) -> Option<u64> {
        (self.hart.state.pc == TRAP_VECTOR).then_some(self.hart.state.mcause)
    }

    pub fn fs(&self) -> u64 {
        (self.hart.state.mstatus >> FS_SHIFT) & 3
    }

    pub fn fflags(&self) -> u64 {
        self.hart.state.fcsr & 0x1f
    }

    pub fn set_frm(&mut self, rm: u32) {
        self.hart.state.fcsr = (self.hart.state.fcsr & 0x1f) | ((rm as u64) << 5);
    }

    /// Put a single into an f register, NaN-boxed.
    pub fn set_s(&mut self, r: usize, value: f32) {
        self.hart.state.f[r] = box_s(value.to_bits());
    }

    pub fn set_d(&mut self, r: usize, value: f64) {
        self.hart.state.f[r] = value.to_bits();
    }

    pub fn write_mem(&mut self, addr: u64, bytes: &[u8]) {
        self.bus.ram.write(addr, bytes).expect("in RAM");
    }

    pub fn read_mem(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.bus.ram.read(addr, &mut buf).expect("in RAM");
        buf
    }
}

pub fn box_s(bits: u32) -> u64 {
    0xffff_ffff_0000_0000 | bits as u64
}

// ---- encoders ----

pub const OP_FP: u32 = 0b1010011;
pub const LOAD_FP: u32 = 0b0000111;
pub const STORE_FP: u32 = 0b0100111;
pub const MADD: u32 = 0b1000011;
pub const MSUB: u32 = 0b1000111;
pub const NMSUB: u32 = 0b1001011;
pub const NMADD: u32 = 0b1001111;

/// Format field: 0 = S, 1 = D.
pub const S: u32 = 0;
pub const D: u32 = 1;

pub fn r_type(funct7: u32, rs2: u32, rs1: u32, funct3: u32, rd: u32, opcode: u32) -> u32 {
    (funct7 << 25) | (rs2 << 20) | (rs1 << 15) | (funct3 << 12) | (rd << 7) | opcode
}

pub fn i_type(imm: i32, rs1: u32, funct3: u32, rd: u32, opcode: u32) -> u32 {
    ((imm as u32 & 0xfff) << 20) | (rs1 << 15) | (funct3 << 12) | (rd << 7) | opcode
}

pub fn s_type(imm: i32, rs2: u32, rs1: u32, funct3: u32, opcode: u32) -> u32 {
    let imm = imm as u32 & 0xfff;
    ((imm >> 5) << 25) | (rs2 << 20) | (rs1 << 15) | (funct3 << 12) | ((imm & 0x1f) << 7) | opcode
}

pub fn r4_type(rs3: u32, fmt: u32, rs2: u32, rs1: u32, rm: u32, rd: u32, opcode: u32) -> u32 {
    (rs3 << 27) | (fmt << 25) | (rs2 << 20) | (rs1 << 15) | (rm << 12) | (rd << 7) | opcode
}

/// An OP-FP instruction: funct5, format, rs2 (or sub-op), rs1, rm (or funct3), rd.
pub fn op_fp(funct5: u32, fmt: u32, rs2: u32, rs1: u32, rm: u32, rd: u32) -> u32 {
    r_type((funct5 << 2) | fmt, rs2, rs1, rm, rd, OP_FP)
}

pub fn fadd(fmt: u32, rd: u32, rs1: u32, rs2: u32, rm: u32) -> u32 {
    op_fp(0b00000, fmt, rs2, rs1, rm, rd)
}
pub fn fsub(fmt: u32, rd: u32, rs1: u32, rs2: u32, rm: u32) -> u32 {
    op_fp(0b00001, fmt, rs2, rs1, rm, rd)
}
pub fn fmul(fmt: u32, rd: u32, rs1: u32, rs2: u32, rm: u32) -> u32 {
    op_fp(0b00010, fmt, rs2, rs1, rm, rd)
}
pub fn fdiv(fmt: u32, rd: u32, rs1: u32, rs2: u32, rm: u32) -> u32 {
    op_fp(0b00011, fmt, rs2, rs1, rm, rd)
}
pub fn fsqrt(fmt: u32, rd: u32, rs1: u32, rm: u32) -> u32 {
    op_fp(0b01011, fmt, 0, rs1, rm, rd)
}
pub fn fsgnj(fmt: u32, rd: u32, rs1: u32, rs2: u32) -> u32 {
    op_fp(0b00100, fmt, rs2, rs1, 0, rd)
}
pub fn fsgnjn(fmt: u32, rd: u32, rs1: u32, rs2: u32) -> u32 {
    op_fp(0b00100, fmt, rs2, rs1, 1, rd)
}
pub fn fsgnjx(fmt: u32, rd: u32, rs1: u32, rs2: u32) -> u32 {
    op_fp(0b00100, fmt, rs2, rs1, 2, rd)
}
pub fn fmin(fmt: u32, rd: u32, rs1: u32, rs2: u32) -> u32 {
    op_fp(0b00101, fmt, rs2, rs1, 0, rd)
}
pub fn fmax(fmt: u32, rd: u32, rs1: u32, rs2: u32) -> u32 {
    op_fp(0b00101, fmt, rs2, rs1, 1, rd)
}
pub fn feq(fmt: u32, rd: u32, rs1: u32, rs2: u32) -> u32 {
    op_fp(0b10100, fmt, rs2, rs1, 2, rd)
}
pub fn flt(fmt: u32, rd: u32, rs1: u32, rs2: u32) -> u32 {
    op_fp(0b10100, fmt, rs2, rs1, 1, rd)
}
pub fn fle(fmt: u32, rd: u32, rs1: u32, rs2: u32) -> u32 {
    op_fp(0b10100, fmt, rs2, rs1, 0, rd)
}
pub fn fclass(fmt: u32, rd: u32, rs1: u32) -> u32 {
    op_fp(0b11100, fmt, 0, rs1, 1, rd)
}
/// fmv.x.w / fmv.x.d
pub fn fmv_x_f(fmt: u32, rd: u32, rs1: u32) -> u32 {
    op_fp(0b11100, fmt, 0, rs1, 0, rd)
}
/// fmv.w.x / fmv.d.x
pub fn fmv_f_x(fmt: u32, rd: u32, rs1: u32) -> u32 {
    op_fp(0b11110, fmt, 0, rs1, 0, rd)
}

/// Integer type selector of the conversions (the rs2 field).
pub const W: u32 = 0;
pub const WU: u32 = 1;
pub const L: u32 = 2;
pub const LU: u32 = 3;

/// fcvt.<int>.<fmt>: float register rs1 to integer register rd.
pub fn fcvt_int_f(int: u32, fmt: u32, rd: u32, rs1: u32, rm: u32) -> u32 {
    op_fp(0b11000, fmt, int, rs1, rm, rd)
}
/// fcvt.<fmt>.<int>: integer register rs1 to float register rd.
pub fn fcvt_f_int(fmt: u32, int: u32, rd: u32, rs1: u32, rm: u32) -> u32 {
    op_fp(0b11010, fmt, int, rs1, rm, rd)
}
pub fn fcvt_s_d(rd: u32, rs1: u32, rm: u32) -> u32 {
    op_fp(0b01000, S, 1, rs1, rm, rd)
}
pub fn fcvt_d_s(rd: u32, rs1: u32, rm: u32) -> u32 {
    op_fp(0b01000, D, 0, rs1, rm, rd)
}
pub fn fma(opcode: u32, fmt: u32, rd: u32, rs1: u32, rs2: u32, rs3: u32, rm: u32) -> u32 {
    r4_type(rs3, fmt, rs2, rs1, rm, rd, opcode)
}
pub fn flw(rd: u32, rs1: u32, imm: i32) -> u32 {
    i_type(imm, rs1, 2, rd, LOAD_FP)
}
pub fn fld(rd: u32, rs1: u32, imm: i32) -> u32 {
    i_type(imm, rs1, 3, rd, LOAD_FP)
}
pub fn fsw(rs2: u32, rs1: u32, imm: i32) -> u32 {
    s_type(imm, rs2, rs1, 2, STORE_FP)
}
pub fn fsd(rs2: u32, rs1: u32, imm: i32) -> u32 {
    s_type(imm, rs2, rs1, 3, STORE_FP)
}
