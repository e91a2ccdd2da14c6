//! Replay's divergences from the outside: a digest that differs names the parts of the
//! machine whose region digests differ (the hart's and devices' state, RAM address ranges,
//! disk byte ranges), read from the log's digest records.

use journal::replay::{Replayer, Step};
use journal::{LogHeader, LogReader, LogWriter, StateDigest};
use machine::{DiskConfig, Input, InputKind, Machine, MachineConfig};
use std::io::Cursor;
use std::path::PathBuf;

/// A directory for one test, removed when dropped.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!("journal-replay-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A machine whose kernel is one instruction, `j .` (no outputs), with 16 MiB of RAM and a
/// 4 MiB disk.
fn tiny_config(dir: &Dir) -> MachineConfig {
    let mut image = vec![0u8; 4096];
    image[0..4].copy_from_slice(&0x0000_006fu32.to_le_bytes());
    image[8..16].copy_from_slice(&0x20_0000u64.to_le_bytes());
    image[16..24].copy_from_slice(&4096u64.to_le_bytes());
    image[56..60].copy_from_slice(b"RSC\x05");
    let kernel = dir.0.join("Image");
    std::fs::write(&kernel, image).unwrap();
    let disk = dir.0.join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(4 << 20).unwrap();
    let mut config = MachineConfig::new(kernel);
    config.ram_size = 16 << 20;
    config.disk = Some(DiskConfig { path: disk, read_only: false });
    // Each machine's disk writes stay its own (the recorded one writes its disk below).
    config.disk_overlay = true;
    config
}

/// A log of `recorded` at its icount: one digest record, with its regions.
fn log_of(config: &MachineConfig, recorded: &Machine) -> Vec<u8> {
    let header = LogHeader::for_boot(config, Some(("disk.img", &config.disk.as_ref().unwrap().path))).unwrap();
    let mut w = LogWriter::new(Vec::new(), &header).unwrap();
    let regions = recorded.region_digests();
    w.digest(
        StateDigest {
            icount: recorded.icount(),
            machine: regions.root().0,
            outputs: journal::OutputDigest::new().take(),
        },
        &regions,
    )
    .unwrap();
    w.into_inner().unwrap()
}

/// Replays `log` into a machine built from `config`; the error line at the digest.
fn replay_error(config: &MachineConfig, log: &[u8]) -> String {
    let mut reader = LogReader::new(Cursor::new(log)).unwrap();
    let mut replayer = Replayer::new(Machine::new(config).unwrap());
    let record = reader.next_record().unwrap().unwrap();
    match replayer.apply(&record, None, &mut |_| {}) {
        Ok(step) => panic!("no divergence: {step:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_divergence_names_the_state_the_ram_ranges_and_the_disk_ranges_that_differ() {
    let dir = Dir::new("parts");
    let config = tiny_config(&dir);
    // The recording's machine took a key at icount 500 (its UART's state) and has two
    // adjacent RAM regions and one disk region written; the replay's has none of it.
    let mut recorded = Machine::new(&config).unwrap();
    recorded.push_input(Input { icount: 500, kind: InputKind::Console(b"k".to_vec()) }).unwrap();
    assert_eq!(recorded.run(1000), machine::RunExit::Budget);
    recorded.write_page(5 * 256 + 3, &[0x11; 4096]).unwrap();
    recorded.write_page(6 * 256 + 200, &[0x22; 4096]).unwrap();
    recorded.write_sectors(2 * 2048 + 9, &[0x33; 512]).unwrap();
    let line = replay_error(&config, &log_of(&config, &recorded));
    let (head, parts) = line.split_once("; ").unwrap_or_else(|| panic!("no parts named: {line}"));
    assert!(head.starts_with("divergence at icount 1000: the replay's state digest is "), "{line}");
    assert_eq!(
        parts,
        "they differ in the hart's and devices' state, RAM 0x80500000..0x80700000 and disk bytes 0x200000..0x300000"
    );
}

#[test]
fn a_divergence_in_one_ram_region_alone_names_just_that_range() {
    let dir = Dir::new("one");
    let config = tiny_config(&dir);
    let mut recorded = Machine::new(&config).unwrap();
    recorded.run(1000);
    recorded.write_page(15 * 256 + 255, &[0x44; 4096]).unwrap();
    let line = replay_error(&config, &log_of(&config, &recorded));
    assert!(line.ends_with("; they differ in RAM 0x80f00000..0x81000000"), "{line}");
}

#[test]
fn the_same_run_replayed_matches_its_digest_with_regions() {
    let dir = Dir::new("same");
    let config = tiny_config(&dir);
    let mut recorded = Machine::new(&config).unwrap();
    recorded.run(1000);
    let log = log_of(&config, &recorded);
    let mut reader = LogReader::new(Cursor::new(&log)).unwrap();
    let mut replayer = Replayer::new(Machine::new(&config).unwrap());
    let record = reader.next_record().unwrap().unwrap();
    assert_eq!(replayer.apply(&record, None, &mut |_| {}), Ok(Step::Continue));
    assert_eq!(replayer.digests_checked, 1);
}
