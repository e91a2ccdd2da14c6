//! A 16550A UART (register shift 0, byte registers), the console.
//!
//! Transmission is instant: a byte written to THR leaves at once as a console output
//! stamped with the current instruction count, so THR is always empty. Received
//! bytes come only from console inputs. The interrupt output is a level, as the PLIC
//! expects. (rust-vmm's vm-superio Serial signals edges through an eventfd-style
//! trigger and feeds input from the host directly; a level-sensitive PLIC and the
//! single input door want this small model instead.)

use super::{AccessError, DeviceCtx};
use std::collections::VecDeque;

/// Received bytes waiting for the guest, beyond which console input is dropped.
pub const RX_QUEUE_CAP: usize = 64 * 1024;

const IER_RDA: u8 = 1 << 0;
const IER_THRE: u8 = 1 << 1;
const LCR_DLAB: u8 = 1 << 7;
const LSR_DR: u8 = 1 << 0;
const LSR_THRE: u8 = 1 << 5;
const LSR_TEMT: u8 = 1 << 6;
const IIR_NONE: u8 = 0x01;
const IIR_THRE: u8 = 0x02;
const IIR_RDA: u8 = 0x04;
const IIR_FIFO_ENABLED: u8 = 0xc0;
const MSR_DCD_DSR_CTS: u8 = 0xb0;

/// Everything the UART holds, as plain data.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct UartState {
    pub ier: u8,
    pub lcr: u8,
    pub mcr: u8,
    pub scr: u8,
    pub dll: u8,
    pub dlm: u8,
    pub fcr: u8,
    /// A THR-empty interrupt is pending (cleared by reading IIR or writing THR).
    pub thre_pending: bool,
    pub rx: VecDeque<u8>,
    /// Console bytes dropped because the receive queue was full.
    pub rx_dropped: u64,
}

#[derive(Debug, Default)]
pub struct Uart {
    pub state: UartState,
}

impl Uart {
    pub fn new() -> Uart {
        Uart::default()
    }

    /// Console input: queue bytes for the guest to read.
    pub fn receive(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.state.rx.len() >= RX_QUEUE_CAP {
                self.state.rx_dropped += 1;
            } else {
                self.state.rx.push_back(b);
            }
        }
    }

    pub fn irq_level(&self) -> bool {
        let s = &self.state;
        (s.ier & IER_RDA != 0 && !s.rx.is_empty()) || (s.ier & IER_THRE != 0 && s.thre_pending)
    }

    fn iir(&self) -> u8 {
        let s = &self.state;
        let id = if s.ier & IER_RDA != 0 && !s.rx.is_empty() {
            IIR_RDA
        } else if s.ier & IER_THRE != 0 && s.thre_pending {
            IIR_THRE
        } else {
            IIR_NONE
        };
        let fifo = if s.fcr & 1 != 0 { IIR_FIFO_ENABLED } else { 0 };
        id | fifo
    }

    pub fn read(&mut self, offset: u64, size: u8) -> Result<u64, AccessError> {
        if size != 1 || offset > 7 {
            return Err(AccessError);
        }
        let dlab = self.state.lcr & LCR_DLAB != 0;
        let s = &mut self.state;
        Ok(match offset {
            0 if dlab => s.dll,
            0 => s.rx.pop_front().unwrap_or(0),
            1 if dlab => s.dlm,
            1 => s.ier,
            2 => {
                let iir = self.iir();
                if iir & 0x0f == IIR_THRE {
                    self.state.thre_pending = false;
                }
                iir
            }
            3 => s.lcr,
            4 => s.mcr,
            5 => LSR_THRE | LSR_TEMT | if s.rx.is_empty() { 0 } else { LSR_DR },
            6 => MSR_DCD_DSR_CTS,
            _ => s.scr,
        } as u64)
    }

    pub fn write(&mut self, offset: u64, size: u8, value: u64, ctx: &mut DeviceCtx) -> Result<(), AccessError> {
        if size != 1 || offset > 7 {
            return Err(AccessError);
        }
        let v = value as u8;
        let dlab = self.state.lcr & LCR_DLAB != 0;
        let s = &mut self.state;
        match offset {
            0 if dlab => s.dll = v,
            0 => {
                ctx.outputs.console(ctx.icount, &[v]);
                // The byte left at once: THR is empty again.
                s.thre_pending = true;
            }
            1 if dlab => s.dlm = v,
            1 => {
                // Enabling the THR-empty interrupt while THR is empty raises it.
                if v & IER_THRE != 0 && s.ier & IER_THRE == 0 {
                    s.thre_pending = true;
                }
                s.ier = v & 0x0f;
            }
            2 => {
                s.fcr = v & 0xc9;
                if v & 0x02 != 0 {
                    s.rx.clear();
                }
            }
            3 => s.lcr = v,
            4 => s.mcr = v & 0x1f,
            5 | 6 => {} // LSR and MSR are read-only
            _ => s.scr = v,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{OutputKind, Outputs};
    use rv64::GuestRam;

    fn ctx<'a>(ram: &'a mut GuestRam, outputs: &'a mut Outputs) -> DeviceCtx<'a> {
        DeviceCtx { ram, outputs, icount: 42 }
    }

    #[test]
    fn transmitted_bytes_leave_as_console_output_stamped_with_icount() {
        let (mut ram, mut out) = (GuestRam::new(0x8000_0000, 4096), Outputs::default());
        let mut uart = Uart::new();
        uart.write(0, 1, b'h' as u64, &mut ctx(&mut ram, &mut out)).unwrap();
        uart.write(0, 1, b'i' as u64, &mut ctx(&mut ram, &mut out)).unwrap();
        let outputs = out.take();
        assert_eq!(outputs.len(), 1);
        assert_eq!(outputs[0].icount, 42);
        assert_eq!(outputs[0].kind, OutputKind::Console(b"hi".to_vec()));
    }

    #[test]
    fn received_bytes_raise_the_line_until_read() {
        let (mut ram, mut out) = (GuestRam::new(0x8000_0000, 4096), Outputs::default());
        let mut uart = Uart::new();
        uart.write(1, 1, IER_RDA as u64, &mut ctx(&mut ram, &mut out)).unwrap();
        assert!(!uart.irq_level());
        uart.receive(b"x");
        assert!(uart.irq_level());
        assert_eq!(uart.read(5, 1).unwrap() as u8 & LSR_DR, LSR_DR);
        assert_eq!(uart.read(2, 1).unwrap() as u8 & 0x0f, IIR_RDA);
        assert_eq!(uart.read(0, 1).unwrap(), b'x' as u64);
        assert!(!uart.irq_level());
        assert_eq!(uart.read(5, 1).unwrap() as u8 & LSR_DR, 0);
    }

    #[test]
    fn thr_empty_interrupt_is_cleared_by_reading_iir() {
        let (mut ram, mut out) = (GuestRam::new(0x8000_0000, 4096), Outputs::default());
        let mut uart = Uart::new();
        uart.write(1, 1, IER_THRE as u64, &mut ctx(&mut ram, &mut out)).unwrap();
        assert!(uart.irq_level());
        assert_eq!(uart.read(2, 1).unwrap() as u8 & 0x0f, IIR_THRE);
        assert!(!uart.irq_level());
        assert_eq!(uart.read(2, 1).unwrap() as u8 & 0x0f, IIR_NONE);
    }

    #[test]
    fn divisor_latch_is_reached_through_dlab() {
        let (mut ram, mut out) = (GuestRam::new(0x8000_0000, 4096), Outputs::default());
        let mut uart = Uart::new();
        uart.write(3, 1, LCR_DLAB as u64, &mut ctx(&mut ram, &mut out)).unwrap();
        uart.write(0, 1, 0x12, &mut ctx(&mut ram, &mut out)).unwrap();
        uart.write(1, 1, 0x34, &mut ctx(&mut ram, &mut out)).unwrap();
        assert!(out.is_empty(), "a DLL write is not a transmitted byte");
        assert_eq!((uart.read(0, 1).unwrap(), uart.read(1, 1).unwrap()), (0x12, 0x34));
        uart.write(3, 1, 0x03, &mut ctx(&mut ram, &mut out)).unwrap();
        assert_eq!(uart.read(1, 1).unwrap(), 0, "IER is untouched by DLM writes");
    }

    #[test]
    fn wide_or_out_of_range_accesses_are_refused() {
        let mut uart = Uart::new();
        assert_eq!(uart.read(0, 4), Err(AccessError));
        assert_eq!(uart.read(8, 1), Err(AccessError));
    }

    #[test]
    fn console_input_beyond_the_cap_is_dropped_and_counted() {
        let mut uart = Uart::new();
        uart.receive(&vec![b'a'; RX_QUEUE_CAP + 3]);
        assert_eq!(uart.state.rx.len(), RX_QUEUE_CAP);
        assert_eq!(uart.state.rx_dropped, 3);
    }
}
