//! What the driver's no-root tests share: a fake [`Vm`] that prints at fixed instruction
//! counts and powers off, whose checkpoint is its instruction count, and a console that
//! collects what leaves.
#![allow(dead_code)] // each test binary uses its own part

use machine::{Digest, Input, Output, OutputKind, RunExit};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmm::driver::ConsoleSink;
use vmm::vm::{ReadSeek, Vm, WriteSeek};

/// Prints `"<n>;"` every `every` instructions, powers off with `code` at `end`.
pub struct FakeVm {
    pub icount: u64,
    pub every: u64,
    pub end: u64,
    pub code: u32,
    pub outputs: Vec<Output>,
    pub inputs: Vec<Input>,
    /// Wall time each run takes (a guest that computes, as seen by a backup's clock).
    pub run_sleep: Duration,
    /// Runs so far (a backup's machine must not run until it takes over).
    pub runs: u64,
    /// The icount of each checkpoint applied.
    pub applied: Vec<u64>,
    /// Applies (counted from 1) that fail as a digest mismatch would.
    pub fail_applies: Vec<usize>,
    applies_tried: usize,
}

impl FakeVm {
    pub fn new(every: u64, end: u64, code: u32) -> FakeVm {
        FakeVm {
            icount: 0,
            every,
            end,
            code,
            outputs: Vec::new(),
            inputs: Vec::new(),
            run_sleep: Duration::ZERO,
            runs: 0,
            applied: Vec::new(),
            fail_applies: Vec::new(),
            applies_tried: 0,
        }
    }

    pub fn slow(mut self, run_sleep: Duration) -> FakeVm {
        self.run_sleep = run_sleep;
        self
    }
}

/// A fake apply failure; `diverged` as a digest mismatch.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct FakeError {
    what: String,
    diverged: bool,
}

fn fake(what: &str) -> FakeError {
    FakeError { what: what.into(), diverged: false }
}

impl Vm for FakeVm {
    type Error = FakeError;
    type Config = ();
    type State = u64;
    type PreCopy = ();

    fn run(&mut self, until_icount: u64) -> RunExit {
        self.runs += 1;
        std::thread::sleep(self.run_sleep);
        let stop = until_icount.min(self.end);
        let mut next = (self.icount / self.every + 1) * self.every;
        while next <= stop {
            let kind = OutputKind::Console(format!("{next};").into_bytes());
            self.outputs.push(Output { icount: next, kind });
            next += self.every;
        }
        self.icount = stop;
        if stop == self.end {
            RunExit::PowerOff { code: self.code }
        } else {
            RunExit::Budget
        }
    }
    fn icount(&self) -> u64 {
        self.icount
    }
    fn time_ticks(&self) -> u64 {
        self.icount
    }
    fn icount_per_tick(&self) -> u64 {
        1
    }
    fn min_icount_per_tick(&self) -> u64 {
        1
    }
    fn rtc_unix_ns(&self) -> u64 {
        u64::MAX / 2 // far ahead of the host: the driver has no lag to catch up
    }
    fn reboots(&self) -> u64 {
        0
    }
    fn push_input(&mut self, input: Input) -> Result<(), FakeError> {
        if input.icount < self.icount {
            return Err(fake("an input in the past"));
        }
        self.inputs.push(input);
        Ok(())
    }
    fn wants_entropy(&self) -> bool {
        false
    }
    fn take_outputs(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.outputs)
    }
    fn take_dirty_pages(&mut self) -> Vec<usize> {
        Vec::new()
    }
    fn take_dirty_sectors(&mut self) -> Vec<u64> {
        Vec::new()
    }
    fn page_count(&self) -> usize {
        0
    }
    fn page(&self, _index: usize) -> Option<&[u8]> {
        None
    }
    fn disk_sectors(&self) -> Option<u64> {
        None
    }
    fn read_sectors(&self, _sector: u64, _buf: &mut [u8]) -> Result<(), FakeError> {
        Err(fake("no disk"))
    }
    fn write_page(&mut self, _index: usize, _data: &[u8]) -> Result<(), FakeError> {
        Err(fake("no RAM"))
    }
    fn write_sectors(&mut self, _sector: u64, _data: &[u8]) -> Result<(), FakeError> {
        Err(fake("no disk"))
    }
    fn save_state(&self) -> u64 {
        self.icount
    }
    fn restore_state(&mut self, state: u64) -> Result<(), FakeError> {
        self.icount = state;
        Ok(())
    }
    fn save(&self, out: &mut dyn WriteSeek) -> Result<u64, FakeError> {
        out.write_all(&self.icount.to_le_bytes()).map_err(|_| fake("cannot write"))?;
        Ok(8)
    }
    fn save_to_path(&self, path: &std::path::Path) -> Result<u64, FakeError> {
        std::fs::write(path, self.icount.to_le_bytes()).map_err(|_| fake("cannot write"))?;
        Ok(8)
    }
    fn restore(_config: &(), input: &mut dyn ReadSeek) -> Result<FakeVm, FakeError> {
        let mut bytes = [0; 8];
        input.read_exact(&mut bytes).map_err(|_| fake("cannot read"))?;
        Ok(FakeVm { icount: u64::from_le_bytes(bytes), ..FakeVm::new(1, u64::MAX, 0) })
    }
    fn digest(&self) -> Digest {
        Digest(self.icount as u128)
    }
    /// The checkpoint is the instruction count (all the state this machine has).
    fn take_checkpoint(&mut self, _full: bool) -> Result<Vec<u8>, FakeError> {
        Ok(self.icount.to_le_bytes().to_vec())
    }
    fn precopy_start(&self) {}
    fn precopy_step(&self, _precopy: &mut (), _max_pages: usize) -> bool {
        true
    }
    fn precopy_finish(&mut self, _precopy: ()) -> Result<Vec<u8>, FakeError> {
        self.take_checkpoint(true)
    }
    fn add_digest(&self, _payload: &mut Vec<u8>) {}
    fn apply_checkpoint(&mut self, payload: &[u8]) -> Result<(), FakeError> {
        self.applies_tried += 1;
        if self.fail_applies.contains(&self.applies_tried) {
            return Err(FakeError { what: "the digest after applying differs".into(), diverged: true });
        }
        let bytes: [u8; 8] = payload.try_into().map_err(|_| fake("not a fake checkpoint"))?;
        self.icount = u64::from_le_bytes(bytes);
        self.applied.push(self.icount);
        Ok(())
    }
    fn diverged(error: &FakeError) -> bool {
        error.diverged
    }
    fn checkpoint_pages(_payload: &[u8]) -> usize {
        0
    }
}

/// Collects the console output that leaves.
#[derive(Default, Clone)]
pub struct Collect(pub Arc<Mutex<Vec<u8>>>);

impl ConsoleSink for Collect {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Collect {
    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }

    /// The icounts printed, in order.
    pub fn numbers(&self) -> Vec<u64> {
        self.text().split(';').filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect()
    }
}
