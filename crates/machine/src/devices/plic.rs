//! The platform-level interrupt controller (SiFive PLIC layout, as on QEMU's virt
//! board): 31 sources, two contexts for hart 0 (0 = M-mode, 1 = S-mode).
//! Sources are level-sensitive: a raised line becomes pending once; after a claim it
//! becomes pending again only when the guest completes it and the line is still high.

use super::AccessError;

pub const NUM_SOURCES: usize = 32; // source 0 does not exist
pub const NUM_CONTEXTS: usize = 2;
pub const SIZE: u64 = 0x60_0000;

#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct PlicState {
    pub priority: [u32; NUM_SOURCES],
    pub pending: u32,
    pub in_service: u32,
    pub level: u32,
    pub enable: [u32; NUM_CONTEXTS],
    pub threshold: [u32; NUM_CONTEXTS],
}

#[derive(Debug, Default)]
pub struct Plic {
    pub state: PlicState,
}

impl Plic {
    pub fn new() -> Plic {
        Plic::default()
    }

    /// Drive source `source`'s line.
    pub fn set_level(&mut self, source: usize, high: bool) {
        debug_assert!(source > 0 && source < NUM_SOURCES);
        let bit = 1u32 << source;
        let s = &mut self.state;
        if high {
            s.level |= bit;
            if s.in_service & bit == 0 {
                s.pending |= bit;
            }
        } else {
            s.level &= !bit;
        }
    }

    /// The highest-priority pending source enabled for `context` above its
    /// threshold (ties go to the lowest source number).
    fn best(&self, context: usize) -> Option<usize> {
        let s = &self.state;
        let candidates = s.pending & s.enable[context] & !s.in_service;
        let mut best: Option<(u32, usize)> = None;
        for source in 1..NUM_SOURCES {
            let priority = s.priority[source];
            if candidates & (1 << source) != 0
                && priority > s.threshold[context]
                && best.is_none_or(|(p, _)| priority > p)
            {
                best = Some((priority, source));
            }
        }
        best.map(|(_, source)| source)
    }

    /// Interrupt outputs to the hart: (machine external, supervisor external).
    pub fn outputs(&self) -> (bool, bool) {
        (self.best(0).is_some(), self.best(1).is_some())
    }

    pub fn read(&mut self, offset: u64, size: u8) -> Result<u64, AccessError> {
        if size != 4 || !offset.is_multiple_of(4) {
            return Err(AccessError);
        }
        let s = &self.state;
        Ok(match offset {
            0..=0x7f => s.priority[(offset / 4) as usize] as u64,
            0x1000 => s.pending as u64,
            0x1004..=0x107f => 0,
            0x2000..=0x1f_ffff => {
                let (context, word) = (((offset - 0x2000) / 0x80) as usize, (offset - 0x2000) % 0x80);
                match (context < NUM_CONTEXTS, word) {
                    (true, 0) => s.enable[context] as u64,
                    _ => 0,
                }
            }
            0x20_0000..=0x5f_ffff => {
                let (context, reg) = (((offset - 0x20_0000) / 0x1000) as usize, (offset - 0x20_0000) % 0x1000);
                match (context < NUM_CONTEXTS, reg) {
                    (true, 0) => s.threshold[context] as u64,
                    (true, 4) => self.claim(context) as u64,
                    _ => 0,
                }
            }
            _ => 0,
        })
    }

    fn claim(&mut self, context: usize) -> u32 {
        match self.best(context) {
            Some(source) => {
                let bit = 1 << source;
                self.state.pending &= !bit;
                self.state.in_service |= bit;
                source as u32
            }
            None => 0,
        }
    }

    fn complete(&mut self, source: u32) {
        if source == 0 || source as usize >= NUM_SOURCES {
            return;
        }
        let bit = 1 << source;
        let s = &mut self.state;
        s.in_service &= !bit;
        if s.level & bit != 0 {
            s.pending |= bit;
        }
    }

    pub fn write(&mut self, offset: u64, size: u8, value: u64) -> Result<(), AccessError> {
        if size != 4 || !offset.is_multiple_of(4) {
            return Err(AccessError);
        }
        let v = value as u32;
        match offset {
            0x4..=0x7f => self.state.priority[(offset / 4) as usize] = v & 7,
            0x2000..=0x1f_ffff => {
                let (context, word) = (((offset - 0x2000) / 0x80) as usize, (offset - 0x2000) % 0x80);
                if context < NUM_CONTEXTS && word == 0 {
                    self.state.enable[context] = v & !1;
                }
            }
            0x20_0000..=0x5f_ffff => {
                let (context, reg) = (((offset - 0x20_0000) / 0x1000) as usize, (offset - 0x20_0000) % 0x1000);
                match (context < NUM_CONTEXTS, reg) {
                    (true, 0) => self.state.threshold[context] = v & 7,
                    (true, 4) => self.complete(v),
                    _ => {}
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enabled(source: usize) -> Plic {
        let mut plic = Plic::new();
        plic.write(source as u64 * 4, 4, 1).unwrap();
        plic.write(0x2080, 4, 1 << source).unwrap(); // context 1 (S-mode)
        plic
    }

    #[test]
    fn a_raised_enabled_line_interrupts_the_supervisor_context() {
        let mut plic = enabled(10);
        assert_eq!(plic.outputs(), (false, false));
        plic.set_level(10, true);
        assert_eq!(plic.outputs(), (false, true));
    }

    #[test]
    fn claim_returns_the_source_and_complete_re_arms_a_still_high_line() {
        let mut plic = enabled(10);
        plic.set_level(10, true);
        assert_eq!(plic.read(0x20_1004, 4).unwrap(), 10);
        assert_eq!(plic.outputs(), (false, false), "claimed: no longer pending");
        assert_eq!(plic.read(0x20_1004, 4).unwrap(), 0, "nothing left to claim");
        plic.write(0x20_1004, 4, 10).unwrap();
        assert_eq!(plic.outputs(), (false, true), "line still high after completion");
        plic.set_level(10, false);
        assert_eq!(plic.read(0x20_1004, 4).unwrap(), 10);
        plic.write(0x20_1004, 4, 10).unwrap();
        assert_eq!(plic.outputs(), (false, false));
    }

    #[test]
    fn threshold_masks_sources_at_or_below_it() {
        let mut plic = enabled(3);
        plic.set_level(3, true);
        plic.write(0x20_1000, 4, 1).unwrap();
        assert_eq!(plic.outputs(), (false, false));
        plic.write(0x20_1000, 4, 0).unwrap();
        assert_eq!(plic.outputs(), (false, true));
    }

    #[test]
    fn higher_priority_wins_and_ties_go_to_the_lower_source() {
        let mut plic = enabled(5);
        plic.write(0x2080, 4, (1 << 5) | (1 << 6) | (1 << 7)).unwrap();
        plic.write(6 * 4, 4, 1).unwrap();
        plic.write(7 * 4, 4, 2).unwrap();
        for source in [5, 6, 7] {
            plic.set_level(source, true);
        }
        assert_eq!(plic.read(0x20_1004, 4).unwrap(), 7);
        assert_eq!(plic.read(0x20_1004, 4).unwrap(), 5);
        assert_eq!(plic.read(0x20_1004, 4).unwrap(), 6);
    }

    #[test]
    fn byte_accesses_are_refused() {
        let mut plic = Plic::new();
        assert_eq!(plic.read(0, 1), Err(AccessError));
        assert_eq!(plic.write(2, 4, 0), Err(AccessError));
    }
}
