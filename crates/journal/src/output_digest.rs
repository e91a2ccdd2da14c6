//! A digest of what a machine output since the last digest record: the console as one byte stream (how it was
//! cut into pieces depends on where the runs were split, which a replay need not repeat),
//! frames one by one with the icount that produced them, power-offs and resets.

use machine::{Output, OutputKind};
use xxhash_rust::xxh3::Xxh3;

#[derive(Clone, Default)]
pub struct OutputDigest {
    console: Xxh3,
    console_bytes: u64,
    events: Xxh3,
    event_count: u64,
}

impl std::fmt::Debug for OutputDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OutputDigest({:032x})", self.value())
    }
}

impl OutputDigest {
    pub fn new() -> OutputDigest {
        OutputDigest::default()
    }

    pub fn add(&mut self, output: &Output) {
        let tag: u8 = match &output.kind {
            OutputKind::Console(bytes) => {
                self.console.update(bytes);
                self.console_bytes += bytes.len() as u64;
                return;
            }
            OutputKind::NetFrame(_) => 1,
            OutputKind::PowerOff { .. } => 2,
            OutputKind::Reset => 3,
        };
        self.events.update(&[tag]);
        self.events.update(&output.icount.to_le_bytes());
        match &output.kind {
            OutputKind::NetFrame(frame) => {
                self.events.update(&(frame.len() as u64).to_le_bytes());
                self.events.update(frame);
            }
            OutputKind::PowerOff { code } => self.events.update(&code.to_le_bytes()),
            OutputKind::Console(_) | OutputKind::Reset => {}
        }
        self.event_count += 1;
    }

    /// Bytes written to the console so far.
    pub fn console_bytes(&self) -> u64 {
        self.console_bytes
    }

    /// Frames, power-offs and resets so far.
    pub fn event_count(&self) -> u64 {
        self.event_count
    }

    /// The digest of the outputs since the last take, and a fresh start (each digest
    /// record covers the outputs since the one before, so that a replay starting from a
    /// snapshot record checks the outputs that follow it).
    pub fn take(&mut self) -> u128 {
        let value = self.value();
        *self = OutputDigest::new();
        value
    }

    pub fn value(&self) -> u128 {
        let mut h = Xxh3::new();
        h.update(&self.console.digest128().to_le_bytes());
        h.update(&self.console_bytes.to_le_bytes());
        h.update(&self.events.digest128().to_le_bytes());
        h.update(&self.event_count.to_le_bytes());
        h.digest128()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console(icount: u64, bytes: &[u8]) -> Output {
        Output { icount, kind: OutputKind::Console(bytes.to_vec()) }
    }

    #[test]
    fn console_output_cut_differently_digests_the_same() {
        let mut a = OutputDigest::new();
        a.add(&console(5, b"hello world"));
        let mut b = OutputDigest::new();
        b.add(&console(5, b"hello "));
        b.add(&console(9, b"world"));
        assert_eq!(a.value(), b.value());
        b.add(&console(10, b"!"));
        assert_ne!(a.value(), b.value());
    }

    #[test]
    fn a_frame_at_another_icount_digests_differently() {
        let frame = |icount| Output { icount, kind: OutputKind::NetFrame(vec![1, 2, 3]) };
        let (mut a, mut b) = (OutputDigest::new(), OutputDigest::new());
        a.add(&frame(100));
        b.add(&frame(101));
        assert_ne!(a.value(), b.value());
    }
}
