//! The hart: architectural state ([`HartState`], plain data), the caches that make it
//! fast (decoded blocks, TLB — never part of the state), the run loop, traps,
//! interrupts and timers.
//!
//! Time is a function of the instruction count: `time = icount / icount_per_tick +
//! time_offset_ticks`. The layer above advances `time_offset_ticks` when the hart idles
//! (an idle skip, which it logs as an input), so guest time roughly tracks wall-clock
//! time and still replays exactly.

use crate::block::BlockCache;
use crate::bus::Bus;
use crate::csr::*;
use crate::decode::{self, Insn, Op};
use crate::jit::{JitConfig, JitStats};
use crate::mmu::Tlb;
use crate::rvc;
use crate::trap::{Exception, Interrupt, Trap};

/// Privilege modes, encoded as in `mstatus.MPP`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(u8)]
pub enum PrivMode {
    User = 0,
    Supervisor = 1,
    #[default]
    Machine = 3,
}

impl PrivMode {
    pub fn from_bits(bits: u64) -> PrivMode {
        match bits & 3 {
            0 => PrivMode::User,
            1 => PrivMode::Supervisor,
            _ => PrivMode::Machine,
        }
    }
}

/// Every architectural bit of the hart, as plain data: saving a hart is cloning this,
/// restoring is [`Hart::from_state`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct HartState {
    pub x: [u64; 32],
    pub f: [u64; 32],
    pub pc: u64,
    pub privilege: PrivMode,
    /// The machine's timeline: steps since reset, a step being an instruction retired or
    /// a trap taken (exception or interrupt). Counting trap entries makes a guest that
    /// traps forever without retiring anything (a trap vector on an unmapped page) still
    /// reach every budget and timer deadline, the same way on every engine; `minstret`
    /// counts the instructions alone (each trap moves `instret_offset` back by one).
    pub icount: u64,
    /// Guest time added by idle skips, in timer ticks.
    pub time_offset_ticks: u64,
    /// mcycle = icount + cycle_offset (a write to mcycle moves this).
    pub cycle_offset: u64,
    /// minstret = icount + instret_offset (a write to minstret moves this). The two
    /// counters are separate CSRs: writing one must not move the other.
    pub instret_offset: u64,
    /// The CLINT's compare register for this hart (raises MTIP).
    pub mtimecmp: u64,
    /// Sstc's compare register (raises STIP while menvcfg.STCE is set).
    pub stimecmp: u64,
    /// Address reserved by LR, if any.
    pub reservation: Option<u64>,
    /// Stopped in WFI, waiting for an interrupt.
    pub wfi: bool,
    pub hart_id: u64,
    pub fcsr: u64,
    pub mstatus: u64,
    pub medeleg: u64,
    pub mideleg: u64,
    pub mie: u64,
    /// The software-writable bits of mip (SSIP, STIP, SEIP, MSIP).
    pub mip: u64,
    pub mtvec: u64,
    pub mscratch: u64,
    pub mepc: u64,
    pub mcause: u64,
    pub mtval: u64,
    pub mcounteren: u64,
    pub menvcfg: u64,
    pub stvec: u64,
    pub sscratch: u64,
    pub sepc: u64,
    pub scause: u64,
    pub stval: u64,
    pub satp: u64,
    pub scounteren: u64,
    pub senvcfg: u64,
}

/// Which engine runs guest code. Both give the same guest, bit for bit and at the
/// same instruction counts: the choice is one of speed only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cpu {
    /// Decoded blocks, interpreted: the reference.
    Interpreter,
    /// Interpret first, and compile a block to host code once it is hot (see
    /// [`crate::jit`]). Where the host has no compiler, the interpreter runs.
    Jit,
}

impl Cpu {
    /// The compiler where it is built and tested (x86-64), the interpreter elsewhere.
    pub const fn host_default() -> Cpu {
        if crate::jit::HOST_SUPPORTED {
            Cpu::Jit
        } else {
            Cpu::Interpreter
        }
    }
}

/// Fixed properties of the hart, set when the machine is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HartConfig {
    /// Instructions per timer tick (with a 10 MHz timebase, 10 means a nominal
    /// 100 million instructions per guest second).
    pub icount_per_tick: u64,
    /// When set, `ecall` from S-mode is not a trap into M-mode but an [`Exit::Sbi`]
    /// for the monitor, which implements the SBI itself (no firmware image needed).
    pub sbi_in_monitor: bool,
    /// The engine that runs guest code.
    pub cpu: Cpu,
    /// How the compiler tier behaves when `cpu` is [`Cpu::Jit`].
    pub jit: JitConfig,
}

impl Default for HartConfig {
    fn default() -> Self {
        HartConfig { icount_per_tick: 10, sbi_in_monitor: false, cpu: Cpu::host_default(), jit: JitConfig::default() }
    }
}

/// Why [`Hart::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The instruction count reached the requested limit.
    Budget,
    /// The hart waits for an interrupt (WFI) and none is pending; the next timer
    /// deadline, in ticks, is [`Hart::next_timer_deadline`].
    Idle,
    /// S-mode called the SBI (`ecall`); `pc` still points at the ecall. Answer with
    /// [`Hart::complete_sbi`].
    Sbi,
    /// A device asked to stop (see [`Bus::stop_requested`]).
    Stop,
}

/// What ends a single step early.
pub(crate) enum StepEnd {
    Trap(Exception),
    Sbi,
}

impl From<Exception> for StepEnd {
    fn from(e: Exception) -> Self {
        StepEnd::Trap(e)
    }
}

/// A RISC-V hart.
pub struct Hart {
    pub state: HartState,
    pub config: HartConfig,
    /// The icount at which a timer compare next fires (recomputed on every change).
    timer_deadline_icount: u64,
    /// MTIP/STIP as raised by the timers.
    timer_mip: u64,
    /// MEIP/SEIP as driven by the interrupt controller on the bus.
    ext_mip: u64,
    /// A device asked to stop during the current instruction.
    stop_pending: bool,
    /// Something that can change which interrupt is deliverable happened (a CSR
    /// write, a trap, an xRET, a device access, a timer or time change): check
    /// before the next instruction. Checking only then is exactly equivalent to
    /// checking before every instruction, and much cheaper.
    pub(crate) irq_dirty: bool,
    /// Where a taken branch, a jump or an xRET goes (see [`crate::exec::Flow`]).
    pub(crate) next_pc: u64,
    /// `data_tag_bits()` for the block being run.
    pub(crate) data_tag_bits: u64,
    /// Why the instruction just executed did not retire ([`crate::exec::Flow::End`]).
    pub(crate) step_end: Option<StepEnd>,
    pub(crate) tlb: Box<Tlb>,
    /// Decoded instructions, in blocks (see [`crate::block`]).
    blocks: BlockCache,
}

impl Hart {
    /// A hart at reset: M-mode, pc = `reset_pc`.
    pub fn new(config: HartConfig, reset_pc: u64) -> Hart {
        // Compare registers reset to "never", so no timer interrupt is pending at reset.
        let state = HartState { pc: reset_pc, mtimecmp: u64::MAX, stimecmp: u64::MAX, ..HartState::default() };
        Hart::from_state(config, state)
    }

    /// Rebuild a hart from saved state (caches start empty).
    pub fn from_state(config: HartConfig, state: HartState) -> Hart {
        assert!(config.icount_per_tick > 0, "icount_per_tick must be positive");
        let mut hart = Hart {
            state,
            config,
            timer_deadline_icount: 0,
            timer_mip: 0,
            ext_mip: 0,
            stop_pending: false,
            irq_dirty: true,
            next_pc: 0,
            data_tag_bits: 0,
            step_end: None,
            tlb: Box::default(),
            blocks: BlockCache::new(),
        };
        hart.timer_changed();
        hart
    }

    /// What the compiler tier did so far (all zero when the hart only interprets).
    pub fn jit_stats(&self) -> JitStats {
        self.blocks.jit_stats()
    }

    /// Current guest time in ticks (it stops at the end of time rather than wrap).
    pub fn time(&self) -> u64 {
        (self.state.icount / self.config.icount_per_tick).saturating_add(self.state.time_offset_ticks)
    }

    /// Advance guest time by `ticks` without executing (an idle skip).
    pub fn skip_time(&mut self, ticks: u64) {
        self.state.time_offset_ticks = self.state.time_offset_ticks.saturating_add(ticks);
        self.timer_changed();
    }

    /// The earliest enabled timer compare value still in the future, in ticks. A
    /// compare register at the last tick (all ones) is a timer switched off, as Linux
    /// uses it: it is no deadline to skip time to.
    pub fn next_timer_deadline(&self) -> Option<u64> {
        let now = self.time();
        let mut next: Option<u64> = None;
        for cmp in self.enabled_comparators().into_iter().flatten() {
            if cmp > now && cmp != u64::MAX {
                next = Some(next.map_or(cmp, |n| n.min(cmp)));
            }
        }
        next
    }

    fn enabled_comparators(&self) -> [Option<u64>; 2] {
        let stce = self.state.menvcfg & MENVCFG_STCE != 0;
        [Some(self.state.mtimecmp), stce.then_some(self.state.stimecmp)]
    }

    /// Recompute the timer interrupt bits and the next deadline after any change to
    /// time, a compare register or menvcfg.
    pub fn timer_changed(&mut self) {
        self.irq_dirty = true;
        let now = self.time();
        let [m, s] = self.enabled_comparators();
        self.timer_mip = 0;
        if m.is_some_and(|c| now >= c) {
            self.timer_mip |= Interrupt::MachineTimer.bit();
        }
        if s.is_some_and(|c| now >= c) {
            self.timer_mip |= Interrupt::SupervisorTimer.bit();
        }
        let offset = self.state.time_offset_ticks;
        let ipt = self.config.icount_per_tick;
        self.timer_deadline_icount = u64::MAX;
        for cmp in [m, s].into_iter().flatten() {
            if cmp > now {
                let at = cmp.saturating_sub(offset).saturating_mul(ipt);
                self.timer_deadline_icount = self.timer_deadline_icount.min(at);
            }
        }
    }

    /// Set the CLINT compare register.
    pub fn set_mtimecmp(&mut self, value: u64) {
        self.state.mtimecmp = value;
        self.timer_changed();
    }

    /// Set the Sstc compare register (the SBI timer call uses this too).
    pub fn set_stimecmp(&mut self, value: u64) {
        self.state.stimecmp = value;
        self.timer_changed();
    }

    /// Set or clear the machine software interrupt (the CLINT's msip register).
    pub fn set_msip(&mut self, on: bool) {
        self.irq_dirty = true;
        let bit = Interrupt::MachineSoftware.bit();
        self.state.mip = if on { self.state.mip | bit } else { self.state.mip & !bit };
    }

    /// Set or clear a software-visible pending bit in mip (used by the SBI for IPIs).
    pub fn set_pending(&mut self, irq: Interrupt, on: bool) {
        self.irq_dirty = true;
        let bit = irq.bit();
        self.state.mip = if on { self.state.mip | bit } else { self.state.mip & !bit };
    }

    /// mip as software reads it: software bits, timer bits and external lines.
    pub(crate) fn mip_read(&self) -> u64 {
        let mut software = self.state.mip;
        if self.state.menvcfg & MENVCFG_STCE != 0 {
            // Sstc: while STCE is set, STIP reflects only the stimecmp comparison.
            software &= !Interrupt::SupervisorTimer.bit();
        }
        software | self.timer_mip | self.ext_mip
    }

    /// Poll the interrupt controller's lines.
    pub fn refresh_external_irq(&mut self, bus: &impl Bus) {
        self.irq_dirty = true;
        let (m, s) = bus.external_irq();
        self.ext_mip = if m { Interrupt::MachineExternal.bit() } else { 0 }
            | if s { Interrupt::SupervisorExternal.bit() } else { 0 };
    }

    /// The interrupt to take now, if any, by the privileged spec's enable and
    /// priority rules.
    fn pending_interrupt(&self) -> Option<Interrupt> {
        let pending = self.mip_read() & self.state.mie;
        if pending == 0 {
            return None;
        }
        let privilege = self.state.privilege;
        let m_enabled = privilege < PrivMode::Machine || self.state.mstatus & MSTATUS_MIE != 0;
        let s_enabled = privilege < PrivMode::Supervisor
            || (privilege == PrivMode::Supervisor && self.state.mstatus & MSTATUS_SIE != 0);
        let m_pending = if m_enabled { pending & !self.state.mideleg } else { 0 };
        let s_pending = if s_enabled { pending & self.state.mideleg } else { 0 };
        for set in [m_pending, s_pending] {
            if let Some(irq) = Interrupt::PRIORITY.into_iter().find(|i| set & i.bit() != 0) {
                return Some(irq);
            }
        }
        None
    }

    /// Run until the instruction count reaches `until_icount`, the hart idles, the
    /// guest calls the SBI, or a device asks to stop.
    pub fn run(&mut self, bus: &mut impl Bus, until_icount: u64) -> Exit {
        self.refresh_external_irq(bus);
        // The cache is lent to the loop, which then holds decoded instructions while the
        // hart changes.
        let mut blocks = std::mem::replace(&mut self.blocks, BlockCache::new());
        if blocks.bind(bus.ram(), &self.config) {
            // TLB entries hold offsets into the RAM they were filled for.
            self.tlb.flush();
        }
        let exit = self.run_blocks(bus, &mut blocks, until_icount);
        self.blocks = blocks;
        exit
    }

    fn run_blocks(&mut self, bus: &mut impl Bus, blocks: &mut BlockCache, until_icount: u64) -> Exit {
        loop {
            // The budget is checked first: each iteration below (interrupt check, then
            // instructions up to the budget, stopping after any that could make an
            // interrupt deliverable) behaves exactly as if the interrupt check ran
            // before every instruction, so how a run is split into `run` calls can
            // never change what happens at a given icount.
            if self.state.icount >= until_icount {
                return Exit::Budget;
            }
            if self.state.icount >= self.timer_deadline_icount {
                self.timer_changed();
            }
            if self.irq_dirty {
                self.irq_dirty = false;
                if let Some(irq) = self.pending_interrupt() {
                    // A step of its own: the budget and the deadline are looked at again.
                    self.take_trap(Trap::Interrupt(irq));
                    continue;
                }
                if self.state.wfi {
                    if self.mip_read() & self.state.mie == 0 {
                        // Still dirty: the next run must look again.
                        self.irq_dirty = true;
                        return Exit::Idle;
                    }
                    self.state.wfi = false;
                }
            }
            // Neither the budget nor a timer deadline may fall inside what runs now (the
            // deadline, when due, was handled above, so it lies ahead).
            let limit = until_icount.min(self.timer_deadline_icount) - self.state.icount;
            match self.run_chain(bus, blocks, limit) {
                Ok(()) => {}
                Err(StepEnd::Trap(e)) => self.take_trap(Trap::Exception(e)),
                Err(StepEnd::Sbi) => return Exit::Sbi,
            }
            if self.stop_pending {
                self.stop_pending = false;
                return Exit::Stop;
            }
        }
    }

    /// Called after the monitor handled an [`Exit::Sbi`]: a0/a1 get the SBI's error
    /// and value, and the ecall retires.
    pub fn complete_sbi(&mut self, error: i64, value: u64) {
        self.state.x[10] = error as u64;
        self.state.x[11] = value;
        self.state.pc = self.state.pc.wrapping_add(4);
        self.state.icount += 1;
    }

    /// Note, during an instruction, that a device asked to stop; and re-poll the
    /// interrupt lines, which a device access may have changed.
    pub(crate) fn after_device_access(&mut self, bus: &impl Bus) {
        self.refresh_external_irq(bus);
        if bus.stop_requested() {
            self.stop_pending = true;
        }
    }

    /// Enter a trap: choose M or S by delegation, save pc/cause/tval, switch mode. The
    /// entry is one step of the timeline (see [`HartState::icount`]); callers take a trap
    /// only below the budget and the next timer deadline, so it never passes either.
    pub(crate) fn take_trap(&mut self, trap: Trap) {
        self.irq_dirty = true;
        self.state.icount += 1;
        self.state.instret_offset = self.state.instret_offset.wrapping_sub(1);
        let (cause, tval, interrupt) = match trap {
            Trap::Exception(e) => (e.cause(), e.tval(), false),
            Trap::Interrupt(i) => (i as u64, 0, true),
        };
        let deleg = if interrupt { self.state.mideleg } else { self.state.medeleg };
        let s = &mut self.state;
        s.wfi = false;
        let cause_value = cause | ((interrupt as u64) << 63);
        let old = s.privilege;
        if old <= PrivMode::Supervisor && (deleg >> cause) & 1 != 0 {
            s.sepc = s.pc;
            s.scause = cause_value;
            s.stval = tval;
            let sie = s.mstatus & MSTATUS_SIE != 0;
            s.mstatus &= !(MSTATUS_SPIE | MSTATUS_SIE | MSTATUS_SPP);
            s.mstatus |= if sie { MSTATUS_SPIE } else { 0 } | if old == PrivMode::Supervisor { MSTATUS_SPP } else { 0 };
            s.privilege = PrivMode::Supervisor;
            s.pc = trap_vector(s.stvec, cause, interrupt);
        } else {
            s.mepc = s.pc;
            s.mcause = cause_value;
            s.mtval = tval;
            let mie = s.mstatus & MSTATUS_MIE != 0;
            s.mstatus &= !(MSTATUS_MPIE | MSTATUS_MIE | MSTATUS_MPP);
            s.mstatus |= if mie { MSTATUS_MPIE } else { 0 } | ((old as u64) << MSTATUS_MPP_SHIFT);
            s.privilege = PrivMode::Machine;
            s.pc = trap_vector(s.mtvec, cause, interrupt);
        }
    }

    /// Fetch the raw instruction at `pc`: 16 bits for a compressed instruction, else
    /// 32 (whose second half may sit on the next page).
    pub(crate) fn fetch(&mut self, bus: &mut impl Bus, pc: u64) -> Result<u32, Exception> {
        if pc & 0xfff <= 0xffc {
            let off = self.fetch_page_offset(bus, pc)?;
            let bytes: [u8; 4] = bus.ram().read_at(off);
            let word = u32::from_le_bytes(bytes);
            return Ok(if word & 3 == 3 { word } else { word & 0xffff });
        }
        let off = self.fetch_page_offset(bus, pc)?;
        let lo = u16::from_le_bytes(bus.ram().read_at(off)) as u32;
        if lo & 3 != 3 {
            return Ok(lo);
        }
        let off_hi = self.fetch_page_offset(bus, pc.wrapping_add(2))?;
        let hi = u16::from_le_bytes(bus.ram().read_at(off_hi)) as u32;
        Ok(lo | (hi << 16))
    }

    /// Discard cached translations (satp, SUM/MXR/MPRV changes, sfence.vma).
    pub fn flush_tlb(&mut self) {
        self.tlb.flush();
    }

    /// Mark the floating-point state dirty (mstatus.FS = Dirty).
    pub(crate) fn set_fs_dirty(&mut self) {
        self.state.mstatus |= MSTATUS_FS;
    }

    /// Check mstatus.FS != Off for a floating-point instruction.
    pub(crate) fn require_fp(&self, raw: u32) -> Result<(), Exception> {
        if self.state.mstatus & MSTATUS_FS == 0 {
            Err(Exception::IllegalInstruction(raw as u64))
        } else {
            Ok(())
        }
    }
}

fn trap_vector(tvec: u64, cause: u64, interrupt: bool) -> u64 {
    let base = tvec & !3;
    if interrupt && tvec & 3 == 1 {
        base.wrapping_add(4 * cause)
    } else {
        base
    }
}

/// Decode a raw instruction (16-bit compressed or 32-bit).
pub fn decode_any(raw: u32) -> Insn {
    if raw & 3 == 3 {
        return decode::decode(raw);
    }
    let mut insn = match rvc::expand(raw as u16) {
        Some(word) => decode::decode(word),
        None => decode::decode(0),
    };
    insn.len = 2;
    if insn.op == Op::Illegal {
        insn.len = 2;
    }
    insn
}
