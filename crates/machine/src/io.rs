//! The one door for non-determinism (DESIGN.md §2): every value from outside enters
//! as an [`Input`] stamped with the instruction count at which it takes effect, and
//! every value for the outside world leaves as an [`Output`] stamped with the
//! instruction count that produced it.

/// What an input carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum InputKind {
    /// Bytes typed on the console.
    Console(Vec<u8>),
    /// An Ethernet frame received by the network card.
    NetFrame(Vec<u8>),
    /// Bytes for the guest's entropy device.
    Entropy(Vec<u8>),
    /// Guest time moves forward by this many timer ticks: the hart idled until a
    /// deadline, or the driver catches guest time up with the wall clock.
    IdleSkip { ticks: u64 },
    /// From this icount on, guest time advances one tick per `icount_per_tick`
    /// instructions (guest time does not jump): how the driver keeps a busy guest's
    /// clock at the pace of the wall clock (see `Machine::push_input` for the range).
    ClockRate { icount_per_tick: u64 },
}

/// A value entering the machine at instruction count `icount`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Input {
    pub icount: u64,
    pub kind: InputKind,
}

/// What an output carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum OutputKind {
    /// Bytes written to the console (UART or SBI debug console).
    Console(Vec<u8>),
    /// An Ethernet frame transmitted by the network card.
    NetFrame(Vec<u8>),
    /// The guest powered off with this exit code (0 = success).
    PowerOff { code: u32 },
    /// The guest asked for a reset: the machine rebooted at this icount (or, without
    /// `MachineConfig::reboot_on_reset`, ended).
    Reset,
}

/// A value leaving the machine, produced at instruction count `icount`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Output {
    pub icount: u64,
    pub kind: OutputKind,
}

/// Collects the outputs produced during a run, merging adjacent console bytes.
#[derive(Debug, Default, Clone)]
pub struct Outputs {
    items: Vec<Output>,
}

impl Outputs {
    pub fn console(&mut self, icount: u64, bytes: &[u8]) {
        if let Some(Output { kind: OutputKind::Console(buf), .. }) = self.items.last_mut() {
            buf.extend_from_slice(bytes);
            return;
        }
        self.items.push(Output { icount, kind: OutputKind::Console(bytes.to_vec()) });
    }

    pub fn push(&mut self, icount: u64, kind: OutputKind) {
        self.items.push(Output { icount, kind });
    }

    pub fn take(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.items)
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}
