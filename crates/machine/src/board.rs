//! The board: the physical memory map and the bus that routes each access to RAM or
//! to a device. Mirrors QEMU's `virt` machine where Linux expects it.

use crate::devices::clint::{self, ClintView, HartRequest};
use crate::devices::plic::{self, Plic};
use crate::devices::rtc::{self, Rtc};
use crate::devices::test_device;
use crate::devices::uart::Uart;
use crate::devices::virtio::VirtioMmio;
use crate::devices::{AccessError, DeviceCtx};
use crate::io::{OutputKind, Outputs};
use rv64::{Bus, BusFault, GuestRam};

pub const TEST_BASE: u64 = 0x0010_0000;
/// The Goldfish RTC, where QEMU's virt board has it, with its interrupt.
pub const RTC_BASE: u64 = 0x0010_1000;
pub const RTC_IRQ: usize = 11;
pub const CLINT_BASE: u64 = 0x0200_0000;
pub const PLIC_BASE: u64 = 0x0c00_0000;
pub const UART_BASE: u64 = 0x1000_0000;
pub const UART_SIZE: u64 = 0x100;
pub const UART_IRQ: usize = 10;
pub const VIRTIO_BASE: u64 = 0x1000_1000;
pub const VIRTIO_STRIDE: u64 = 0x1000;
/// Virtio slot `i` uses PLIC source `VIRTIO_IRQ_BASE + i`.
pub const VIRTIO_IRQ_BASE: usize = 1;
pub const VIRTIO_SLOTS: usize = 8;
pub const RAM_BASE: u64 = 0x8000_0000;
/// Timer ticks per guest second (the device tree's timebase-frequency).
pub const TIMEBASE_HZ: u64 = 10_000_000;

/// Everything on the bus except the hart.
pub struct Board {
    pub ram: GuestRam,
    pub uart: Uart,
    pub plic: Plic,
    pub rtc: Rtc,
    pub virtio: Vec<VirtioMmio>,
    pub outputs: Outputs,
    /// The hart's CLINT registers as of the last sync (reads come from here).
    pub clint: ClintView,
    /// CLINT writes waiting to be applied to the hart.
    pub hart_requests: Vec<HartRequest>,
    icount: u64,
    /// The guest wrote the test device or otherwise asked to stop.
    stop: bool,
    /// The power event the guest wrote to the test device (its output is recorded).
    power_request: Option<OutputKind>,
}

impl Board {
    /// A board whose RTC reads `boot_unix_ns` at guest time 0.
    pub fn new(ram: GuestRam, virtio: Vec<VirtioMmio>, boot_unix_ns: u64) -> Board {
        assert!(virtio.len() <= VIRTIO_SLOTS, "at most {VIRTIO_SLOTS} virtio devices");
        Board {
            ram,
            uart: Uart::new(),
            plic: Plic::new(),
            rtc: Rtc::new(boot_unix_ns),
            virtio,
            outputs: Outputs::default(),
            clint: ClintView::default(),
            hart_requests: Vec::new(),
            icount: 0,
            stop: false,
            power_request: None,
        }
    }

    /// Every device at power-on, as a reboot finds them: the UART, the PLIC, the CLINT's
    /// view, the RTC's alarm (its time goes on) and each virtio transport (the guest
    /// negotiates again; the disk keeps its contents, the network card its MAC). RAM and
    /// the outputs not yet taken are the machine's to handle.
    pub fn power_on_devices(&mut self) {
        self.uart = Uart::new();
        self.plic = Plic::new();
        self.rtc.power_on();
        for dev in &mut self.virtio {
            dev.power_on();
        }
        self.clint = ClintView::default();
        self.hart_requests.clear();
        self.stop = false;
        self.power_request = None;
        self.update_irqs();
    }

    /// The power event the guest asked for through the test device, once.
    pub fn take_power_request(&mut self) -> Option<OutputKind> {
        self.power_request.take()
    }

    pub fn set_icount(&mut self, icount: u64) {
        self.icount = icount;
    }

    /// Clear the stop request after the machine has looked at it.
    pub fn clear_stop(&mut self) {
        self.stop = false;
    }

    /// Recompute every device's interrupt line into the PLIC.
    pub fn update_irqs(&mut self) {
        let uart = self.uart.irq_level();
        self.plic.set_level(UART_IRQ, uart);
        let rtc = self.rtc.irq_level();
        self.plic.set_level(RTC_IRQ, rtc);
        for (i, dev) in self.virtio.iter().enumerate() {
            let level = dev.irq_level();
            self.plic.set_level(VIRTIO_IRQ_BASE + i, level);
        }
    }

    fn device_load(&mut self, paddr: u64, size: u8) -> Result<u64, AccessError> {
        let icount = self.icount;
        if let Some(off) = offset_in(paddr, UART_BASE, UART_SIZE) {
            return self.uart.read(off, size);
        }
        if let Some(off) = offset_in(paddr, PLIC_BASE, plic::SIZE) {
            return self.plic.read(off, size);
        }
        if let Some(off) = offset_in(paddr, CLINT_BASE, clint::SIZE) {
            return clint::read(&self.clint, off, size);
        }
        if let Some(off) = offset_in(paddr, RTC_BASE, rtc::SIZE) {
            return self.rtc.read(off, size, self.clint.time);
        }
        if let Some((slot, off)) = self.virtio_slot(paddr) {
            let mut ctx = DeviceCtx { ram: &mut self.ram, outputs: &mut self.outputs, icount };
            return self.virtio[slot].read(off, size, &mut ctx);
        }
        if offset_in(paddr, TEST_BASE, test_device::SIZE).is_some() {
            return Ok(0);
        }
        Err(AccessError)
    }

    fn device_store(&mut self, paddr: u64, size: u8, value: u64) -> Result<(), AccessError> {
        let icount = self.icount;
        if let Some(off) = offset_in(paddr, UART_BASE, UART_SIZE) {
            let mut ctx = DeviceCtx { ram: &mut self.ram, outputs: &mut self.outputs, icount };
            return self.uart.write(off, size, value, &mut ctx);
        }
        if let Some(off) = offset_in(paddr, PLIC_BASE, plic::SIZE) {
            return self.plic.write(off, size, value);
        }
        if let Some(off) = offset_in(paddr, CLINT_BASE, clint::SIZE) {
            if let Some(request) = clint::write(&self.clint, off, size, value)? {
                self.hart_requests.push(request);
                self.stop = true;
            }
            return Ok(());
        }
        if let Some(off) = offset_in(paddr, RTC_BASE, rtc::SIZE) {
            return self.rtc.write(off, size, value, self.clint.time);
        }
        if let Some((slot, off)) = self.virtio_slot(paddr) {
            let mut ctx = DeviceCtx { ram: &mut self.ram, outputs: &mut self.outputs, icount };
            return self.virtio[slot].write(off, size, value, &mut ctx);
        }
        if let Some(off) = offset_in(paddr, TEST_BASE, test_device::SIZE) {
            if let Some(kind) = test_device::write(off, size, value)? {
                self.outputs.push(icount, kind.clone());
                self.power_request = Some(kind);
                self.stop = true;
            }
            return Ok(());
        }
        Err(AccessError)
    }

    fn virtio_slot(&self, paddr: u64) -> Option<(usize, u64)> {
        let off = offset_in(paddr, VIRTIO_BASE, VIRTIO_STRIDE * self.virtio.len() as u64)?;
        Some(((off / VIRTIO_STRIDE) as usize, off % VIRTIO_STRIDE))
    }
}

fn offset_in(paddr: u64, base: u64, size: u64) -> Option<u64> {
    let off = paddr.wrapping_sub(base);
    (off < size).then_some(off)
}

impl Bus for Board {
    #[inline]
    fn ram(&mut self) -> &mut GuestRam {
        &mut self.ram
    }

    fn set_clock(&mut self, icount: u64, time_ticks: u64) {
        self.icount = icount;
        self.clint.time = time_ticks;
    }

    fn load(&mut self, paddr: u64, size: u8) -> Result<u64, BusFault> {
        let v = self.device_load(paddr, size).map_err(|_| BusFault)?;
        self.update_irqs();
        Ok(v)
    }

    fn store(&mut self, paddr: u64, size: u8, value: u64) -> Result<(), BusFault> {
        self.device_store(paddr, size, value).map_err(|_| BusFault)?;
        self.update_irqs();
        Ok(())
    }

    fn external_irq(&self) -> (bool, bool) {
        self.plic.outputs()
    }

    fn stop_requested(&self) -> bool {
        self.stop
    }
}
