//! ftvm's virtual RISC-V board: guest RAM with dirty tracking, the bus, the devices
//! (16550 UART, CLINT, PLIC, virtio-mmio block/network/entropy, the SiFive test
//! device), the device tree, an SBI answered by the monitor, the kernel loader, and
//! the run loop with its single door for inputs and outputs.
//!
//! The machine knows nothing of replication: it offers the few verbs of DESIGN.md §6.

pub mod board;
pub mod checkpoint;
pub mod devices;
pub mod digest;
pub mod fdt;
pub mod io;
pub mod loader;
pub mod machine;
pub mod sbi;
pub mod snapshot;

pub use io::{Input, InputKind, Output, OutputKind};
pub use machine::{
    Digest, DigestWork, DiskConfig, InputError, Machine, MachineConfig, MachineError, MachineState, RestoreError,
    RunExit,
};
/// The engine choice for [`MachineConfig::cpu`], and what the compiler did.
pub use rv64::{Cpu, JitStats, RamMapping};
