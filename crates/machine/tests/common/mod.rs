//! What the machine's scenario tests share: the Debian guest's configuration and a
//! driver loop that runs to an instruction count the way `ftvm run --clock fast` does.
#![allow(dead_code)] // each test binary uses its own subset

use machine::{DiskConfig, Input, InputKind, Machine, MachineConfig, RunExit};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The default Debian guest running `true`, with 128 MiB of RAM and an optional disk.
pub fn debian_config(disk: Option<PathBuf>) -> MachineConfig {
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../guest/out");
    assert!(out.join("Image").exists(), "guest image missing: run `bash guest/build.sh` (scripts/test does)");
    let mut config = MachineConfig::new(out.join("Image"));
    config.initrd = Some(out.join("initramfs.cpio.gz"));
    config.bootargs = "console=ttyS0 quiet cryptomgr.notests ftvm.cmd=dHJ1ZQ==".into(); // `true`
    config.ram_size = 128 << 20;
    config.disk = disk.map(|path| DiskConfig { path, read_only: false });
    config
}

/// Run to `until`, skipping idle time to the next deadline and feeding fixed entropy.
pub fn drive(machine: &mut Machine, until: u64) {
    loop {
        if machine.wants_entropy() {
            let input = Input { icount: machine.icount(), kind: InputKind::Entropy(vec![7; 64]) };
            machine.push_input(input).unwrap();
        }
        match machine.run(until) {
            RunExit::Idle { next_deadline_ticks: Some(d) } => {
                let ticks = d - machine.time_ticks();
                machine.push_input(Input { icount: machine.icount(), kind: InputKind::IdleSkip { ticks } }).unwrap();
            }
            RunExit::Budget => return,
            other => panic!("unexpected exit {other:?}"),
        }
    }
}

/// Run until the guest powers off or `max_icount` is reached, as [`drive`] does; returns
/// how the run ended and the console output.
pub fn drive_to_end(machine: &mut Machine, max_icount: u64) -> (RunExit, String) {
    let mut console = Vec::new();
    let exit = loop {
        if machine.wants_entropy() {
            let input = Input { icount: machine.icount(), kind: InputKind::Entropy(vec![7; 64]) };
            machine.push_input(input).unwrap();
        }
        let exit = machine.run(max_icount);
        for output in machine.take_outputs() {
            if let machine::OutputKind::Console(bytes) = output.kind {
                console.extend(bytes);
            }
        }
        match exit {
            RunExit::Idle { next_deadline_ticks: Some(d) } => {
                let ticks = d - machine.time_ticks();
                machine.push_input(Input { icount: machine.icount(), kind: InputKind::IdleSkip { ticks } }).unwrap();
            }
            other => break other,
        }
    };
    (exit, String::from_utf8_lossy(&console).into_owned())
}

/// A directory under the system's temporary directory, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ftvm-machine-test-{}-{name}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A RISC-V Image whose code is one instruction, `j .`.
pub fn tiny_kernel(dir: &TempDir) -> PathBuf {
    let mut image = vec![0u8; 4096];
    image[0..4].copy_from_slice(&0x0000_006fu32.to_le_bytes());
    image[8..16].copy_from_slice(&0x20_0000u64.to_le_bytes());
    image[16..24].copy_from_slice(&4096u64.to_le_bytes());
    image[56..60].copy_from_slice(b"RSC\x05");
    let path = dir.path("Image");
    std::fs::write(&path, image).unwrap();
    path
}

/// An error and its sources on one line, as `ftvm` prints it (anyhow's `{:#}`).
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        line.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    line
}
