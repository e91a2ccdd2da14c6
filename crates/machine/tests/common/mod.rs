//! What the machine's scenario tests share: the Debian guest's configuration and a
//! driver loop that runs to an instruction count the way `ftvm run --clock fast` does.
#![allow(dead_code)] // each test binary uses its own subset

use machine::{DiskConfig, Input, InputKind, Machine, MachineConfig, RunExit};
use std::path::PathBuf;

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
