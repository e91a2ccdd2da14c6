//! Address translation (Sv39, with hardware A/D updates), the software TLB, and
//! the load/store paths: RAM through cached page offsets, everything else through
//! the bus. Misaligned accesses are carried out (split at page boundaries), as the
//! spec permits; only LR/SC/AMO require natural alignment.

use crate::bus::Bus;
use crate::csr::{MSTATUS_MPP, MSTATUS_MPP_SHIFT, MSTATUS_MPRV, MSTATUS_MXR, MSTATUS_SUM};
use crate::exec::Flow;
use crate::hart::{Hart, PrivMode};
use crate::trap::Exception;

pub(crate) const TLB_ENTRIES: usize = 1024;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    Fetch = 0,
    Load = 1,
    Store = 2,
}

/// Laid out for compiled code, which checks tags inline (see `crate::jit::emit`).
#[derive(Clone, Copy, Default)]
#[repr(C)]
pub(crate) struct TlbEntry {
    /// See [`tag`]; zero means empty.
    tag: u64,
    /// Added to a virtual address in the page, gives its offset in guest RAM.
    addend: u64,
}

impl TlbEntry {
    fn new(tag: u64, vaddr: u64, page_ram_offset: usize) -> TlbEntry {
        TlbEntry { tag, addend: (page_ram_offset as u64).wrapping_sub(vaddr & !0xfff) }
    }

    /// The RAM offset of `vaddr`, which lies in the entry's page.
    #[inline(always)]
    fn ram_offset(self, vaddr: u64) -> usize {
        vaddr.wrapping_add(self.addend) as usize
    }
}

/// Direct-mapped translations per access kind, only for pages backed by RAM and
/// only once the access has passed every permission check.
#[repr(C)]
pub(crate) struct Tlb {
    entries: [[TlbEntry; TLB_ENTRIES]; 3],
}

impl Default for Tlb {
    fn default() -> Self {
        Tlb { entries: [[TlbEntry::default(); TLB_ENTRIES]; 3] }
    }
}

impl Tlb {
    pub(crate) fn flush(&mut self) {
        *self = Tlb::default();
    }

    /// The low bits of a fetch's TLB tag at `privilege` (see [`tag`]).
    pub(crate) fn fetch_tag_bits(privilege: PrivMode) -> u64 {
        tag(0, privilege, 0)
    }

    /// The first entry: the tables follow one another, one per [`Access`] in order.
    pub(crate) fn entries_ptr(&self) -> *const TlbEntry {
        self.entries.as_ptr().cast()
    }
}

/// A TLB tag: the virtual page (the address's bits above the page offset), the
/// privilege, and (for data) mstatus.SUM and MXR, so that changing any of them needs
/// no flush.
#[inline]
fn tag(vaddr: u64, privilege: PrivMode, sum_mxr: u64) -> u64 {
    (vaddr & !0xfff) | sum_mxr | ((privilege as u64) << 1) | 1
}

/// mstatus.SUM (bit 18) and MXR (bit 19) moved to tag bits 3 and 4.
#[inline]
fn sum_mxr_bits(mstatus: u64) -> u64 {
    (mstatus >> 15) & 0x18
}

const PTE_V: u64 = 1 << 0;
const PTE_R: u64 = 1 << 1;
const PTE_W: u64 = 1 << 2;
const PTE_X: u64 = 1 << 3;
const PTE_U: u64 = 1 << 4;
const PTE_A: u64 = 1 << 6;
const PTE_D: u64 = 1 << 7;
/// Bits 63:54 (PBMT, N and reserved): no extension that gives them meaning is
/// implemented, so a leaf with any of them set is a page fault.
const PTE_RESERVED: u64 = 0x3ff << 54;

impl Hart {
    /// The privilege that data accesses use (mstatus.MPRV lets M-mode borrow MPP's).
    #[inline]
    fn data_privilege(&self) -> PrivMode {
        let s = &self.state;
        if s.privilege == PrivMode::Machine && s.mstatus & MSTATUS_MPRV != 0 {
            PrivMode::from_bits((s.mstatus & MSTATUS_MPP) >> MSTATUS_MPP_SHIFT)
        } else {
            s.privilege
        }
    }

    fn page_fault(access: Access, vaddr: u64) -> Exception {
        match access {
            Access::Fetch => Exception::InstructionPageFault(vaddr),
            Access::Load => Exception::LoadPageFault(vaddr),
            Access::Store => Exception::StorePageFault(vaddr),
        }
    }

    fn access_fault(access: Access, vaddr: u64) -> Exception {
        match access {
            Access::Fetch => Exception::InstructionAccessFault(vaddr),
            Access::Load => Exception::LoadAccessFault(vaddr),
            Access::Store => Exception::StoreAccessFault(vaddr),
        }
    }

    /// Translate a virtual address for `access` at privilege `privilege`.
    pub(crate) fn translate(
        &mut self,
        bus: &mut impl Bus,
        vaddr: u64,
        access: Access,
        privilege: PrivMode,
    ) -> Result<u64, Exception> {
        let satp = self.state.satp;
        if privilege == PrivMode::Machine || satp >> 60 == 0 {
            return Ok(vaddr);
        }
        // Sv39: bits 63..39 must all equal bit 38.
        if ((vaddr as i64) << 25 >> 25) as u64 != vaddr {
            return Err(Self::page_fault(access, vaddr));
        }
        let mut table = (satp & ((1 << 44) - 1)) << 12;
        for level in (0..3).rev() {
            let vpn = (vaddr >> (12 + 9 * level)) & 0x1ff;
            let pte_addr = table + vpn * 8;
            let pte = bus.ram().read_u64(pte_addr).ok_or(Self::access_fault(access, vaddr))?;
            if pte & PTE_V == 0 || (pte & PTE_R == 0 && pte & PTE_W != 0) {
                return Err(Self::page_fault(access, vaddr));
            }
            if pte & (PTE_R | PTE_X) == 0 {
                if pte & (PTE_U | PTE_A | PTE_D | PTE_RESERVED) != 0 {
                    return Err(Self::page_fault(access, vaddr));
                }
                table = ((pte >> 10) & ((1 << 44) - 1)) << 12;
                continue;
            }
            return self.leaf(bus, vaddr, access, privilege, pte, pte_addr, level);
        }
        Err(Self::page_fault(access, vaddr))
    }

    #[allow(clippy::too_many_arguments)]
    fn leaf(
        &mut self,
        bus: &mut impl Bus,
        vaddr: u64,
        access: Access,
        privilege: PrivMode,
        pte: u64,
        pte_addr: u64,
        level: u32,
    ) -> Result<u64, Exception> {
        let fault = Self::page_fault(access, vaddr);
        if pte & PTE_RESERVED != 0 {
            return Err(fault);
        }
        let mstatus = self.state.mstatus;
        let user_page = pte & PTE_U != 0;
        match privilege {
            PrivMode::User if !user_page => return Err(fault),
            PrivMode::Supervisor if user_page && (access == Access::Fetch || mstatus & MSTATUS_SUM == 0) => {
                return Err(fault)
            }
            _ => {}
        }
        let allowed = match access {
            Access::Fetch => pte & PTE_X != 0,
            Access::Load => pte & PTE_R != 0 || (mstatus & MSTATUS_MXR != 0 && pte & PTE_X != 0),
            Access::Store => pte & PTE_W != 0,
        };
        if !allowed {
            return Err(fault);
        }
        let ppn = (pte >> 10) & ((1 << 44) - 1);
        let low_ppn_mask = (1u64 << (9 * level)) - 1;
        if ppn & low_ppn_mask != 0 {
            return Err(fault); // misaligned superpage
        }
        let mut new_pte = pte | PTE_A;
        if access == Access::Store {
            new_pte |= PTE_D;
        }
        if new_pte != pte {
            bus.ram().write_u64(pte_addr, new_pte).ok_or(Self::access_fault(access, vaddr))?;
        }
        let page_offset_mask = (1u64 << (12 + 9 * level)) - 1;
        Ok((ppn << 12) & !page_offset_mask | (vaddr & page_offset_mask))
    }

    /// RAM offset of the page holding `pc`, for instruction fetch.
    #[inline]
    pub(crate) fn fetch_page_offset(&mut self, bus: &mut impl Bus, pc: u64) -> Result<usize, Exception> {
        let privilege = self.state.privilege;
        let t = tag(pc, privilege, 0);
        let entry = self.tlb.entries[Access::Fetch as usize][(pc >> 12) as usize % TLB_ENTRIES];
        if entry.tag == t {
            return Ok(entry.ram_offset(pc));
        }
        let paddr = self.translate(bus, pc, Access::Fetch, privilege)?;
        let page_off = bus.ram().offset_of(paddr & !0xfff, 4096).ok_or(Exception::InstructionAccessFault(pc))?;
        self.tlb.entries[Access::Fetch as usize][(pc >> 12) as usize % TLB_ENTRIES] = TlbEntry::new(t, pc, page_off);
        Ok(page_off + (pc & 0xfff) as usize)
    }

    /// Translate a data access; `Ok(Some(ram offset))` for RAM, `Ok(None)` with the
    /// physical address in `paddr_out` for a device.
    #[inline]
    fn data_target(&mut self, bus: &mut impl Bus, vaddr: u64, access: Access) -> Result<Target, Exception> {
        let privilege = self.data_privilege();
        let t = tag(vaddr, privilege, sum_mxr_bits(self.state.mstatus));
        let index = (vaddr >> 12) as usize % TLB_ENTRIES;
        let entry = self.tlb.entries[access as usize][index];
        if entry.tag == t {
            return Ok(Target::Ram(entry.ram_offset(vaddr)));
        }
        let paddr = self.translate(bus, vaddr, access, privilege)?;
        match bus.ram().offset_of(paddr & !0xfff, 4096) {
            Some(page_off) => {
                self.tlb.entries[access as usize][index] = TlbEntry::new(t, vaddr, page_off);
                Ok(Target::Ram(page_off + (vaddr & 0xfff) as usize))
            }
            None => Ok(Target::Device(paddr)),
        }
    }

    /// The low bits of the TLB tag of a data access made now (see [`tag`]), for the
    /// fast paths of `load` and `store`. Privilege and mstatus change only at the end
    /// of a block (CSR and privileged instructions, traps), so the run loop computes
    /// this once per block.
    #[inline]
    pub(crate) fn data_tag_bits(&self) -> u64 {
        tag(0, self.data_privilege(), sum_mxr_bits(self.state.mstatus))
    }

    /// The RAM offset of `[vaddr, vaddr + n)` when the TLB holds its page for `access`
    /// (so every permission check has passed) and it does not cross the page end: the
    /// tag is made from the access's last byte and the entry chosen by its first, so an
    /// access that crosses into the next page never matches.
    #[inline(always)]
    fn tlb_hit(&self, vaddr: u64, n: usize, access: Access) -> Option<usize> {
        let entry = self.tlb.entries[access as usize][(vaddr >> 12) as usize % TLB_ENTRIES];
        let last = vaddr.wrapping_add(n as u64 - 1);
        (entry.tag == (last & !0xfff) | self.data_tag_bits).then_some(entry.ram_offset(vaddr))
    }

    /// Load `n` bytes (1, 2, 4 or 8), zero-extended into a u64.
    #[inline(always)]
    pub(crate) fn load(&mut self, bus: &mut impl Bus, vaddr: u64, n: usize) -> Result<u64, Exception> {
        match self.tlb_hit(vaddr, n, Access::Load) {
            Some(off) => Ok(read_ram(bus, off, n)),
            None => self.load_slow(bus, vaddr, n),
        }
    }

    /// Store the low `n` bytes of `value`.
    #[inline(always)]
    pub(crate) fn store(&mut self, bus: &mut impl Bus, vaddr: u64, n: usize, value: u64) -> Result<(), Exception> {
        self.store_flow(bus, vaddr, n, value).map(|_| ())
    }

    /// [`Hart::store`], and how execution may go on: [`Flow::Next`] when the TLB
    /// answered and the page held no decoded code, else [`Flow::Check`].
    #[inline(always)]
    pub(crate) fn store_flow(
        &mut self,
        bus: &mut impl Bus,
        vaddr: u64,
        n: usize,
        value: u64,
    ) -> Result<Flow, Exception> {
        match self.tlb_hit(vaddr, n, Access::Store) {
            Some(off) => Ok(if write_ram(bus, off, n, value) { Flow::Check } else { Flow::Next }),
            None => self.store_slow(bus, vaddr, n, value).map(|()| Flow::Check),
        }
    }

    /// A load the TLB does not answer at once: translation, devices, page crossing.
    #[inline(never)]
    fn load_slow(&mut self, bus: &mut impl Bus, vaddr: u64, n: usize) -> Result<u64, Exception> {
        if (vaddr & 0xfff) as usize + n > 4096 {
            return self.load_split(bus, vaddr, n);
        }
        match self.data_target(bus, vaddr, Access::Load)? {
            Target::Ram(off) => Ok(read_ram(bus, off, n)),
            Target::Device(paddr) => {
                if paddr % n as u64 != 0 {
                    return Err(Exception::LoadAccessFault(vaddr));
                }
                bus.set_clock(self.state.icount, self.time());
                let v = bus.load(paddr, n as u8).map_err(|_| Exception::LoadAccessFault(vaddr))?;
                self.after_device_access(bus);
                Ok(v)
            }
        }
    }

    /// A load that crosses a page boundary: byte by byte, each translated.
    fn load_split(&mut self, bus: &mut impl Bus, vaddr: u64, n: usize) -> Result<u64, Exception> {
        let mut v = 0u64;
        for i in 0..n {
            v |= self.load(bus, vaddr.wrapping_add(i as u64), 1)? << (8 * i);
        }
        Ok(v)
    }

    /// A store the TLB does not answer at once: translation, devices, page crossing.
    #[inline(never)]
    fn store_slow(&mut self, bus: &mut impl Bus, vaddr: u64, n: usize, value: u64) -> Result<(), Exception> {
        if (vaddr & 0xfff) as usize + n > 4096 {
            // Check both pages first so that a fault leaves memory unchanged. A page-
            // crossing store is misaligned, and a misaligned device store is an access
            // fault (below), so both parts must be RAM: a device part is refused here,
            // before any byte is written, not after the RAM part.
            for part in [vaddr, vaddr.wrapping_add(n as u64 - 1)] {
                if let Target::Device(_) = self.data_target(bus, part, Access::Store)? {
                    return Err(Exception::StoreAccessFault(part));
                }
            }
            for i in 0..n {
                self.store(bus, vaddr.wrapping_add(i as u64), 1, value >> (8 * i))?;
            }
            return Ok(());
        }
        match self.data_target(bus, vaddr, Access::Store)? {
            Target::Ram(off) => {
                write_ram(bus, off, n, value);
                Ok(())
            }
            Target::Device(paddr) => {
                if paddr % n as u64 != 0 {
                    return Err(Exception::StoreAccessFault(vaddr));
                }
                bus.set_clock(self.state.icount, self.time());
                bus.store(paddr, n as u8, value).map_err(|_| Exception::StoreAccessFault(vaddr))?;
                self.after_device_access(bus);
                Ok(())
            }
        }
    }

    /// Translate for an AMO/SC (store permission, natural alignment required).
    pub(crate) fn check_amo_address(&mut self, bus: &mut impl Bus, vaddr: u64, n: usize) -> Result<(), Exception> {
        if !vaddr.is_multiple_of(n as u64) {
            return Err(Exception::StoreMisaligned(vaddr));
        }
        self.data_target(bus, vaddr, Access::Store).map(|_| ())
    }
}

enum Target {
    Ram(usize),
    Device(u64),
}

#[inline(always)]
fn read_ram(bus: &mut impl Bus, off: usize, n: usize) -> u64 {
    let ram = bus.ram();
    match n {
        1 => u8::from_le_bytes(ram.read_at(off)) as u64,
        2 => u16::from_le_bytes(ram.read_at(off)) as u64,
        4 => u32::from_le_bytes(ram.read_at(off)) as u64,
        _ => u64::from_le_bytes(ram.read_at(off)),
    }
}

/// True when the page held decoded code.
#[inline(always)]
fn write_ram(bus: &mut impl Bus, off: usize, n: usize, value: u64) -> bool {
    let ram = bus.ram();
    match n {
        1 => ram.write_at(off, (value as u8).to_le_bytes()),
        2 => ram.write_at(off, (value as u16).to_le_bytes()),
        4 => ram.write_at(off, (value as u32).to_le_bytes()),
        _ => ram.write_at(off, value.to_le_bytes()),
    }
}
