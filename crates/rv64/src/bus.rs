//! The hart's view of everything that is not RAM: memory-mapped devices.

use crate::mem::GuestRam;

/// A bus access that no device answered, or that a device refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusFault;

/// What the hart sees outside itself. RAM is reached directly through [`Bus::ram`]
/// (the fast path); every other physical address goes through `load`/`store`.
pub trait Bus {
    /// Guest RAM, with its dirty-page bitmap.
    fn ram(&mut self) -> &mut GuestRam;
    /// Told before every device access: the instruction count (the stamp for any
    /// output the access produces) and the guest time in ticks (for timer registers).
    fn set_clock(&mut self, _icount: u64, _time_ticks: u64) {}
    /// Read `size` (1, 2, 4 or 8) bytes from a non-RAM physical address.
    fn load(&mut self, paddr: u64, size: u8) -> Result<u64, BusFault>;
    /// Write `size` bytes to a non-RAM physical address.
    fn store(&mut self, paddr: u64, size: u8, value: u64) -> Result<(), BusFault>;
    /// External interrupt lines into this hart: (machine-level, supervisor-level).
    /// Polled after every device access and at the start of every run.
    fn external_irq(&self) -> (bool, bool);
    /// True when a device asked the hart to stop (power-off, reset, a pending output
    /// that the layer above wants to see at once).
    fn stop_requested(&self) -> bool;
}
