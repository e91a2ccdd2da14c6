//! Control and status registers: numbers, field masks, and the access rules
//! (privilege, read-only ranges, counter enables, WARL fields).

use crate::hart::{Hart, PrivMode};
use crate::trap::Exception;

pub const FFLAGS: u16 = 0x001;
pub const FRM: u16 = 0x002;
pub const FCSR: u16 = 0x003;
pub const CYCLE: u16 = 0xc00;
pub const TIME: u16 = 0xc01;
pub const INSTRET: u16 = 0xc02;
pub const SSTATUS: u16 = 0x100;
pub const SIE: u16 = 0x104;
pub const STVEC: u16 = 0x105;
pub const SCOUNTEREN: u16 = 0x106;
pub const SENVCFG: u16 = 0x10a;
pub const SSCRATCH: u16 = 0x140;
pub const SEPC: u16 = 0x141;
pub const SCAUSE: u16 = 0x142;
pub const STVAL: u16 = 0x143;
pub const SIP: u16 = 0x144;
pub const STIMECMP: u16 = 0x14d;
pub const SATP: u16 = 0x180;
pub const MVENDORID: u16 = 0xf11;
pub const MARCHID: u16 = 0xf12;
pub const MIMPID: u16 = 0xf13;
pub const MHARTID: u16 = 0xf14;
pub const MCONFIGPTR: u16 = 0xf15;
pub const MSTATUS: u16 = 0x300;
pub const MISA: u16 = 0x301;
pub const MEDELEG: u16 = 0x302;
pub const MIDELEG: u16 = 0x303;
pub const MIE: u16 = 0x304;
pub const MTVEC: u16 = 0x305;
pub const MCOUNTEREN: u16 = 0x306;
pub const MENVCFG: u16 = 0x30a;
pub const MCOUNTINHIBIT: u16 = 0x320;
pub const MSCRATCH: u16 = 0x340;
pub const MEPC: u16 = 0x341;
pub const MCAUSE: u16 = 0x342;
pub const MTVAL: u16 = 0x343;
pub const MIP: u16 = 0x344;
pub const MCYCLE: u16 = 0xb00;
pub const MINSTRET: u16 = 0xb02;

// mstatus fields
pub const MSTATUS_SIE: u64 = 1 << 1;
pub const MSTATUS_MIE: u64 = 1 << 3;
pub const MSTATUS_SPIE: u64 = 1 << 5;
pub const MSTATUS_MPIE: u64 = 1 << 7;
pub const MSTATUS_SPP: u64 = 1 << 8;
pub const MSTATUS_MPP_SHIFT: u32 = 11;
pub const MSTATUS_MPP: u64 = 3 << MSTATUS_MPP_SHIFT;
pub const MSTATUS_FS_SHIFT: u32 = 13;
pub const MSTATUS_FS: u64 = 3 << MSTATUS_FS_SHIFT;
pub const MSTATUS_MPRV: u64 = 1 << 17;
pub const MSTATUS_SUM: u64 = 1 << 18;
pub const MSTATUS_MXR: u64 = 1 << 19;
pub const MSTATUS_TVM: u64 = 1 << 20;
pub const MSTATUS_TW: u64 = 1 << 21;
pub const MSTATUS_TSR: u64 = 1 << 22;
pub const MSTATUS_UXL: u64 = 3 << 32;
pub const MSTATUS_SXL: u64 = 3 << 34;
pub const MSTATUS_SD: u64 = 1 << 63;
/// UXL = SXL = 2 (64-bit): read-only.
pub const MSTATUS_XLEN64: u64 = (2 << 32) | (2 << 34);

/// The bits of mstatus that M-mode may write.
const MSTATUS_WRITABLE: u64 = MSTATUS_SIE
    | MSTATUS_MIE
    | MSTATUS_SPIE
    | MSTATUS_MPIE
    | MSTATUS_SPP
    | MSTATUS_MPP
    | MSTATUS_FS
    | MSTATUS_MPRV
    | MSTATUS_SUM
    | MSTATUS_MXR
    | MSTATUS_TVM
    | MSTATUS_TW
    | MSTATUS_TSR;
/// The bits of mstatus visible through sstatus.
pub const SSTATUS_MASK: u64 =
    MSTATUS_SIE | MSTATUS_SPIE | MSTATUS_SPP | MSTATUS_FS | MSTATUS_SUM | MSTATUS_MXR | MSTATUS_UXL | MSTATUS_SD;

/// Interrupts a supervisor can see and delegate.
pub const S_INTERRUPTS: u64 = (1 << 1) | (1 << 5) | (1 << 9);
pub const ALL_INTERRUPTS: u64 = S_INTERRUPTS | (1 << 3) | (1 << 7) | (1 << 11);
/// mip bits that software may write directly (SSIP, STIP, SEIP); STIP only while
/// Sstc is off (menvcfg.STCE = 0).
const MIP_WRITABLE: u64 = (1 << 1) | (1 << 5) | (1 << 9);
/// Exceptions that may be delegated (everything but ecall from M).
const MEDELEG_WRITABLE: u64 = 0xb3ff;

pub const MENVCFG_STCE: u64 = 1 << 63;
const MENVCFG_WRITABLE: u64 = MENVCFG_STCE | 1 /* FIOM */;

/// misa for RV64IMAFDC with S and U modes.
pub const MISA_VALUE: u64 = (2 << 62)
    | (1 << 0)  // A
    | (1 << 2)  // C
    | (1 << 3)  // D
    | (1 << 5)  // F
    | (1 << 8)  // I
    | (1 << 12) // M
    | (1 << 18) // S
    | (1 << 20); // U

impl Hart {
    fn counter_enabled(&self, csr: u16) -> bool {
        let bit = 1u64 << (csr & 0x1f);
        match self.state.privilege {
            PrivMode::Machine => true,
            PrivMode::Supervisor => self.state.mcounteren & bit != 0,
            PrivMode::User => self.state.mcounteren & bit != 0 && self.state.scounteren & bit != 0,
        }
    }

    /// Check that the current privilege may access `csr` (writing if `write`).
    fn check_csr_access(&self, csr: u16, write: bool, raw: u32) -> Result<(), Exception> {
        let illegal = Exception::IllegalInstruction(raw as u64);
        let required = (csr >> 8) & 3;
        if (self.state.privilege as u16) < required {
            return Err(illegal);
        }
        if write && (csr >> 10) & 3 == 3 {
            return Err(illegal);
        }
        if (FFLAGS..=FCSR).contains(&csr) && self.state.mstatus & MSTATUS_FS == 0 {
            return Err(illegal);
        }
        if (CYCLE..=0xc1f).contains(&csr) && !self.counter_enabled(csr) {
            return Err(illegal);
        }
        if csr == SATP && self.state.privilege == PrivMode::Supervisor && self.state.mstatus & MSTATUS_TVM != 0 {
            return Err(illegal);
        }
        if csr == STIMECMP
            && self.state.privilege == PrivMode::Supervisor
            && (self.state.menvcfg & MENVCFG_STCE == 0 || self.state.mcounteren & 2 == 0)
        {
            return Err(illegal);
        }
        Ok(())
    }

    /// Read a CSR as the current privilege level (raises illegal instruction where
    /// the spec says so). `raw` is the instruction word, for `xtval`.
    pub(crate) fn csr_read(&mut self, csr: u16, will_write: bool, raw: u32) -> Result<u64, Exception> {
        self.check_csr_access(csr, will_write, raw)?;
        let s = &self.state;
        Ok(match csr {
            FFLAGS => s.fcsr & 0x1f,
            FRM => (s.fcsr >> 5) & 7,
            FCSR => s.fcsr & 0xff,
            CYCLE | MCYCLE => s.icount.wrapping_add(s.cycle_offset),
            INSTRET | MINSTRET => s.icount.wrapping_add(s.instret_offset),
            TIME => self.time(),
            0xc03..=0xc1f | 0xb03..=0xb1f | 0x323..=0x33f => 0, // hpm counters: hard-wired zero
            SSTATUS => self.mstatus_read() & SSTATUS_MASK,
            SIE => s.mie & s.mideleg,
            STVEC => s.stvec,
            SCOUNTEREN => s.scounteren,
            SENVCFG => s.senvcfg,
            SSCRATCH => s.sscratch,
            SEPC => s.sepc,
            SCAUSE => s.scause,
            STVAL => s.stval,
            SIP => self.mip_read() & s.mideleg,
            STIMECMP => s.stimecmp,
            SATP => s.satp,
            MVENDORID | MARCHID | MIMPID | MCONFIGPTR => 0,
            MHARTID => s.hart_id,
            MSTATUS => self.mstatus_read(),
            MISA => MISA_VALUE,
            MEDELEG => s.medeleg,
            MIDELEG => s.mideleg,
            MIE => s.mie,
            MTVEC => s.mtvec,
            MCOUNTEREN => s.mcounteren,
            MENVCFG => s.menvcfg,
            MCOUNTINHIBIT => 0,
            MSCRATCH => s.mscratch,
            MEPC => s.mepc,
            MCAUSE => s.mcause,
            MTVAL => s.mtval,
            MIP => self.mip_read(),
            // PMP: no physical memory protection is implemented; the registers read as
            // zero and ignore writes (WARL), which the spec allows.
            0x3a0..=0x3ef => 0,
            // Debug/trigger registers: tselect reads back a value that no trigger takes.
            0x7a0 => 1,
            0x7a1..=0x7a3 => 0,
            _ => return Err(Exception::IllegalInstruction(raw as u64)),
        })
    }

    pub(crate) fn csr_write(&mut self, csr: u16, value: u64, raw: u32) -> Result<(), Exception> {
        let s = &mut self.state;
        match csr {
            // Writing the float CSRs modifies float state: FS becomes Dirty.
            FFLAGS => {
                s.fcsr = (s.fcsr & !0x1f) | (value & 0x1f);
                self.set_fs_dirty();
            }
            FRM => {
                s.fcsr = (s.fcsr & 0x1f) | ((value & 7) << 5);
                self.set_fs_dirty();
            }
            FCSR => {
                s.fcsr = value & 0xff;
                self.set_fs_dirty();
            }
            SSTATUS => {
                let v = (s.mstatus & !SSTATUS_MASK) | (value & SSTATUS_MASK);
                self.mstatus_write(v);
            }
            SIE => s.mie = (s.mie & !s.mideleg) | (value & s.mideleg),
            STVEC => s.stvec = value & !2,
            SCOUNTEREN => s.scounteren = value & 0xffff_ffff,
            SENVCFG => s.senvcfg = value & 1,
            SSCRATCH => s.sscratch = value,
            SEPC => s.sepc = value & !1,
            SCAUSE => s.scause = value,
            STVAL => s.stval = value,
            SIP => {
                // only SSIP is writable through sip
                let mask = s.mideleg & (1 << 1);
                s.mip = (s.mip & !mask) | (value & mask);
            }
            STIMECMP => {
                s.stimecmp = value;
                self.timer_changed();
            }
            SATP => {
                // Bare (0) and Sv39 (8) are supported; other modes leave satp unchanged (WARL).
                let mode = value >> 60;
                if mode == 0 || mode == 8 {
                    s.satp = value & ((0xf << 60) | ((1 << 44) - 1)); // ASID hard-wired to zero
                    self.flush_tlb();
                }
            }
            MSTATUS => self.mstatus_write(value),
            MISA => {} // WARL: the extensions cannot be switched off
            MEDELEG => s.medeleg = value & MEDELEG_WRITABLE,
            MIDELEG => s.mideleg = value & S_INTERRUPTS,
            MIE => s.mie = value & ALL_INTERRUPTS,
            MTVEC => s.mtvec = value & !2,
            MCOUNTEREN => s.mcounteren = value & 0xffff_ffff,
            MENVCFG => {
                s.menvcfg = value & MENVCFG_WRITABLE;
                self.timer_changed();
            }
            MSCRATCH => s.mscratch = value,
            MEPC => s.mepc = value & !1,
            MCAUSE => s.mcause = value,
            MTVAL => s.mtval = value,
            MIP => {
                let mut mask = MIP_WRITABLE;
                if s.menvcfg & MENVCFG_STCE != 0 {
                    mask &= !(1 << 5);
                }
                s.mip = (s.mip & !mask) | (value & mask);
            }
            // The counters are a view of icount plus an offset: writing them must not move
            // icount itself, which is the machine's timeline for inputs.
            // A write replaces the writing instruction's own increment (unprivileged spec,
            // Zicsr): the next instruction reads exactly `value`.
            MCYCLE => s.cycle_offset = value.wrapping_sub(s.icount.wrapping_add(1)),
            MINSTRET => s.instret_offset = value.wrapping_sub(s.icount.wrapping_add(1)),
            MCOUNTINHIBIT | 0xb03..=0xb1f | 0x323..=0x33f | 0x3a0..=0x3af | 0x3b0..=0x3ef | 0x7a0..=0x7a3 => {}
            _ => return Err(Exception::IllegalInstruction(raw as u64)),
        }
        Ok(())
    }

    /// mstatus with the read-only fields filled in (SD, UXL, SXL).
    pub(crate) fn mstatus_read(&self) -> u64 {
        let mut v = self.state.mstatus | MSTATUS_XLEN64;
        if v & MSTATUS_FS == MSTATUS_FS {
            v |= MSTATUS_SD;
        }
        v
    }

    pub(crate) fn mstatus_write(&mut self, value: u64) {
        let mut v = value & MSTATUS_WRITABLE;
        // MPP is WARL: the reserved encoding 2 becomes U.
        if (v & MSTATUS_MPP) >> MSTATUS_MPP_SHIFT == 2 {
            v &= !MSTATUS_MPP;
        }
        // No TLB flush: SUM and MXR are part of every TLB tag, and MPRV/MPP only
        // choose which privilege's entries a data access uses.
        self.state.mstatus = v;
    }
}
