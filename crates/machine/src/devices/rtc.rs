//! The Goldfish real-time clock (QEMU virt's, at 0x101000; Linux's `rtc-goldfish`,
//! compatible "google,goldfish-rtc"): nanoseconds since the Unix epoch in two 32-bit
//! halves, and one alarm with an interrupt.
//!
//! Its time is a function of guest time only: `base_ns + guest time`, where `base_ns` is
//! the host's wall-clock time when the machine was built (`MachineConfig::boot_unix_ns`)
//! and moves only when the guest sets the clock. So it replays exactly, and a snapshot,
//! a checkpoint and a replay all carry the same clock (the base is in [`RtcState`]).
//! Registers, offsets and the latch of the high half follow QEMU's hw/rtc/goldfish_rtc.c:
//! reading TIME_LOW latches the high half that TIME_HIGH then returns; writing TIME_HIGH
//! then TIME_LOW sets the time. Accesses are 32-bit only, as QEMU's are.

use super::AccessError;

pub const SIZE: u64 = 0x1000;
/// Nanoseconds per timer tick (the 10 MHz timebase).
pub const NS_PER_TICK: u64 = 1_000_000_000 / crate::board::TIMEBASE_HZ;
const _: () = assert!(NS_PER_TICK * crate::board::TIMEBASE_HZ == 1_000_000_000);

const TIME_LOW: u64 = 0x00;
const TIME_HIGH: u64 = 0x04;
const ALARM_LOW: u64 = 0x08;
const ALARM_HIGH: u64 = 0x0c;
const IRQ_ENABLED: u64 = 0x10;
const CLEAR_ALARM: u64 = 0x14;
const ALARM_STATUS: u64 = 0x18;
const CLEAR_INTERRUPT: u64 = 0x1c;

/// Everything the RTC holds, as plain data.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct RtcState {
    /// The clock's value, in ns since the Unix epoch, at guest time 0. The clock reads
    /// `base_ns + guest time` (wrapping, as a 64-bit counter does).
    pub base_ns: u64,
    /// The high half latched by the last TIME_LOW read, or written to TIME_HIGH.
    pub time_high: u32,
    /// When the alarm fires, in the clock's ns.
    pub alarm_ns: u64,
    /// An alarm is set and has not fired.
    pub alarm_running: bool,
    pub irq_enabled: bool,
    /// The alarm fired and the guest has not cleared the interrupt.
    pub irq_pending: bool,
}

#[derive(Debug, Default)]
pub struct Rtc {
    pub state: RtcState,
}

/// Guest time in the clock's nanoseconds (wrapping: u64 ns reach the year 2554).
fn ticks_to_ns(ticks: u64) -> u64 {
    ticks.wrapping_mul(NS_PER_TICK)
}

impl Rtc {
    /// A clock that reads `boot_unix_ns` at guest time 0.
    pub fn new(boot_unix_ns: u64) -> Rtc {
        Rtc { state: RtcState { base_ns: boot_unix_ns, ..RtcState::default() } }
    }

    /// As at power-on, but still telling the time: a reboot keeps the clock's base (the
    /// boot time, or what the guest set), while the alarm and its interrupt are gone.
    pub fn power_on(&mut self) {
        self.state = RtcState { base_ns: self.state.base_ns, ..RtcState::default() };
    }

    /// The clock's value at guest time `now_ticks`.
    pub fn now_ns(&self, now_ticks: u64) -> u64 {
        self.state.base_ns.wrapping_add(ticks_to_ns(now_ticks))
    }

    pub fn irq_level(&self) -> bool {
        self.state.irq_pending && self.state.irq_enabled
    }

    /// The guest time (ticks) at which the running alarm fires: the first tick at which
    /// the clock has reached it, `now_ticks` if it already has; `None` with no alarm.
    pub fn alarm_deadline_ticks(&self, now_ticks: u64) -> Option<u64> {
        if !self.state.alarm_running {
            return None;
        }
        let now = self.now_ns(now_ticks);
        // Both are values of a wrapping counter: an alarm "behind" the clock by less
        // than half its range is due (as QEMU's signed comparison has it).
        let ahead = self.state.alarm_ns.wrapping_sub(now);
        if ahead == 0 || ahead > u64::MAX / 2 {
            return Some(now_ticks);
        }
        Some(now_ticks.saturating_add(ahead.div_ceil(NS_PER_TICK)))
    }

    /// Fire the alarm if guest time has reached it. Returns true when it fired.
    pub fn update(&mut self, now_ticks: u64) -> bool {
        if self.alarm_deadline_ticks(now_ticks).is_some_and(|at| at <= now_ticks) {
            self.state.alarm_running = false;
            self.state.irq_pending = true;
            return true;
        }
        false
    }

    pub fn read(&mut self, offset: u64, size: u8, now_ticks: u64) -> Result<u64, AccessError> {
        if size != 4 || !offset.is_multiple_of(4) {
            return Err(AccessError);
        }
        let s = &mut self.state;
        let value = match offset {
            TIME_LOW => {
                let now = s.base_ns.wrapping_add(ticks_to_ns(now_ticks));
                s.time_high = (now >> 32) as u32;
                now as u32
            }
            TIME_HIGH => s.time_high,
            ALARM_LOW => s.alarm_ns as u32,
            ALARM_HIGH => (s.alarm_ns >> 32) as u32,
            IRQ_ENABLED => s.irq_enabled as u32,
            ALARM_STATUS => s.alarm_running as u32,
            _ => 0, // write-only and unassigned registers read zero, as on QEMU
        };
        Ok(value as u64)
    }

    pub fn write(&mut self, offset: u64, size: u8, value: u64, now_ticks: u64) -> Result<(), AccessError> {
        if size != 4 || !offset.is_multiple_of(4) {
            return Err(AccessError);
        }
        let value = value as u32 as u64;
        match offset {
            TIME_LOW => {
                // The new time is TIME_HIGH (as written or latched) : value.
                let now = self.now_ns(now_ticks);
                let wanted = (self.state.time_high as u64) << 32 | value;
                self.state.base_ns = self.state.base_ns.wrapping_add(wanted.wrapping_sub(now));
            }
            TIME_HIGH => self.state.time_high = value as u32,
            ALARM_LOW => {
                self.state.alarm_ns = (self.state.alarm_ns & !0xffff_ffff) | value;
                self.state.alarm_running = true;
                self.update(now_ticks); // an alarm already due fires at once
            }
            ALARM_HIGH => self.state.alarm_ns = (self.state.alarm_ns & 0xffff_ffff) | value << 32,
            IRQ_ENABLED => self.state.irq_enabled = value & 1 != 0,
            CLEAR_ALARM => self.state.alarm_running = false,
            CLEAR_INTERRUPT => self.state.irq_pending = false,
            _ => {} // read-only and unassigned registers ignore writes
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOT_NS: u64 = 1_764_000_000_123_456_789; // 2025-11-24

    fn read_time(rtc: &mut Rtc, ticks: u64) -> u64 {
        let low = rtc.read(TIME_LOW, 4, ticks).unwrap();
        let high = rtc.read(TIME_HIGH, 4, ticks + 1_000_000).unwrap();
        high << 32 | low
    }

    #[test]
    fn the_clock_reads_boot_time_plus_guest_time() {
        let mut rtc = Rtc::new(BOOT_NS);
        assert_eq!(read_time(&mut rtc, 0), BOOT_NS);
        assert_eq!(read_time(&mut rtc, 25_000_000), BOOT_NS + 2_500_000_000);
    }

    #[test]
    fn reading_the_low_half_latches_the_high_half() {
        // The low half is just below a 2^32 ns boundary: a later high half must not be
        // mixed with it.
        let base = (5u64 << 32) - 50;
        let mut rtc = Rtc::new(base);
        let low = rtc.read(TIME_LOW, 4, 0).unwrap();
        let high = rtc.read(TIME_HIGH, 4, 100).unwrap();
        assert_eq!(high << 32 | low, base);
    }

    #[test]
    fn the_guest_sets_the_time_high_half_first() {
        let mut rtc = Rtc::new(BOOT_NS);
        let wanted = 1_000_000_000_000_000_000u64;
        rtc.write(TIME_HIGH, 4, wanted >> 32, 10).unwrap();
        rtc.write(TIME_LOW, 4, wanted & 0xffff_ffff, 10).unwrap();
        assert_eq!(read_time(&mut rtc, 10), wanted);
        assert_eq!(read_time(&mut rtc, 30), wanted + 20 * NS_PER_TICK, "and it keeps running");
    }

    fn set_alarm(rtc: &mut Rtc, at_ns: u64, now_ticks: u64) {
        rtc.write(ALARM_HIGH, 4, at_ns >> 32, now_ticks).unwrap();
        rtc.write(ALARM_LOW, 4, at_ns & 0xffff_ffff, now_ticks).unwrap();
        rtc.write(IRQ_ENABLED, 4, 1, now_ticks).unwrap();
    }

    #[test]
    fn an_alarm_fires_at_its_tick_and_raises_the_line_until_cleared() {
        let mut rtc = Rtc::new(BOOT_NS);
        set_alarm(&mut rtc, BOOT_NS + 1_000_001, 0);
        assert_eq!(rtc.alarm_deadline_ticks(0), Some(10_001), "rounded up to a whole tick");
        assert_eq!(rtc.read(ALARM_STATUS, 4, 0).unwrap(), 1);
        assert!(!rtc.update(10_000));
        assert!(!rtc.irq_level());
        assert!(rtc.update(10_001));
        assert!(rtc.irq_level());
        assert_eq!(rtc.read(ALARM_STATUS, 4, 10_001).unwrap(), 0);
        assert_eq!(rtc.alarm_deadline_ticks(10_001), None);
        rtc.write(CLEAR_INTERRUPT, 4, 1, 10_002).unwrap();
        assert!(!rtc.irq_level());
    }

    #[test]
    fn an_alarm_in_the_past_fires_at_once_and_a_cleared_one_never() {
        let mut rtc = Rtc::new(BOOT_NS);
        set_alarm(&mut rtc, BOOT_NS - 5, 0);
        assert!(rtc.irq_level());
        rtc.write(CLEAR_INTERRUPT, 4, 1, 0).unwrap();
        set_alarm(&mut rtc, BOOT_NS + 10_000, 0);
        rtc.write(CLEAR_ALARM, 4, 1, 0).unwrap();
        assert!(!rtc.update(u64::MAX / NS_PER_TICK));
        assert!(!rtc.irq_level());
    }

    #[test]
    fn a_disabled_interrupt_keeps_the_line_low_but_the_alarm_still_fires() {
        let mut rtc = Rtc::new(BOOT_NS);
        set_alarm(&mut rtc, BOOT_NS + 100, 0);
        rtc.write(IRQ_ENABLED, 4, 0, 0).unwrap();
        assert!(rtc.update(1));
        assert!(!rtc.irq_level());
        rtc.write(IRQ_ENABLED, 4, 1, 1).unwrap();
        assert!(rtc.irq_level(), "pending until cleared");
    }

    #[test]
    fn only_aligned_32_bit_accesses_are_taken() {
        let mut rtc = Rtc::new(BOOT_NS);
        assert_eq!(rtc.read(TIME_LOW, 8, 0), Err(AccessError));
        assert_eq!(rtc.read(TIME_LOW + 2, 4, 0), Err(AccessError));
        assert_eq!(rtc.write(ALARM_LOW, 1, 0, 0), Err(AccessError));
        assert_eq!(rtc.read(0x800, 4, 0), Ok(0), "unassigned registers read zero");
        assert_eq!(rtc.write(0x800, 4, 7, 0), Ok(()));
    }

    #[test]
    fn a_restored_copy_behaves_the_same() {
        let mut rtc = Rtc::new(BOOT_NS);
        set_alarm(&mut rtc, BOOT_NS + 3_000, 0);
        rtc.read(TIME_LOW, 4, 5).unwrap();
        let mut copy = Rtc { state: rtc.state.clone() };
        for ticks in [10, 200, 300, 400] {
            assert_eq!(copy.update(ticks), rtc.update(ticks));
            assert_eq!(copy.read(TIME_HIGH, 4, ticks), rtc.read(TIME_HIGH, 4, ticks));
            assert_eq!(read_time(&mut copy, ticks), read_time(&mut rtc, ticks));
        }
        assert_eq!(copy.state, rtc.state);
    }
}
