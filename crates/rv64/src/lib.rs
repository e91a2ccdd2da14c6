//! A deterministic RISC-V hart (RV64IMAFDC, Zicsr, Zifencei, Sstc; M/S/U; Sv39).
//!
//! The hart knows nothing of devices: it sees guest RAM (with dirty tracking) and a
//! [`Bus`] for everything else. It never reads host time or host randomness, so its
//! behaviour is a pure function of its state, RAM and the values the bus returns.
//! Decoding ([`decode`], [`rvc`]) is kept apart from execution (`exec/`, one file per
//! ISA extension).

mod block;
pub mod bus;
pub mod csr;
pub mod decode;
mod exec;
pub mod hart;
pub mod jit;
pub mod mem;
mod mmu;
pub mod rvc;
pub mod trap;

pub use bus::{Bus, BusFault};
pub use hart::{Cpu, Exit, Hart, HartConfig, HartState, PrivMode};
pub use jit::{JitConfig, JitStats};
pub use mem::{GuestRam, RamMapping};
pub use trap::{Exception, Interrupt};
