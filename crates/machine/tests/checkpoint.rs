//! Checkpoint payloads (the replication layer's unit of state): a full checkpoint
//! pre-copied while the guest runs, then incremental ones, carry a second machine to
//! exactly the first one's state; a malformed payload changes nothing.

mod common;
use common::{drive, tiny_kernel, TempDir};
use machine::checkpoint::{self, PreCopy};
use machine::Machine;

fn config() -> machine::MachineConfig {
    common::debian_config(None)
}

#[test]
fn a_pre_copied_full_checkpoint_then_incrementals_keep_a_backup_exact() {
    let mut primary = Machine::new(&config()).unwrap();
    let mut backup = Machine::new(&config()).unwrap();
    drive(&mut primary, 30_000_000);
    // Pre-copy while the guest keeps running (and writing) between steps.
    let mut precopy = PreCopy::start(&primary);
    let mut at = primary.icount();
    while !precopy.step(&primary, 2048) {
        at += 1_000_000;
        drive(&mut primary, at);
    }
    let full = precopy.finish(&mut primary).unwrap();
    checkpoint::apply(&mut backup, &full).unwrap();
    assert_eq!(backup.digest(), primary.digest(), "the full checkpoint is the state at finish");
    for epoch in 1..=3u64 {
        drive(&mut primary, at + epoch * 5_000_000);
        let delta = checkpoint::take(&mut primary, false).unwrap();
        assert!(delta.len() < full.len(), "an incremental checkpoint carries only what changed");
        checkpoint::apply(&mut backup, &delta).unwrap();
        assert_eq!(backup.digest(), primary.digest(), "after incremental {epoch}");
    }
}

#[test]
fn an_abandoned_pre_copy_leaves_the_next_incremental_complete() {
    // The driver may start a pre-copy on a stale view and abandon it when the replication
    // thread says an incremental checkpoint will do: every page written since the last
    // checkpoint must still reach the backup.
    let mut primary = Machine::new(&config()).unwrap();
    let mut backup = Machine::new(&config()).unwrap();
    drive(&mut primary, 20_000_000);
    checkpoint::apply(&mut backup, &checkpoint::take(&mut primary, true).unwrap()).unwrap();
    drive(&mut primary, 25_000_000); // pages written here...
    let mut abandoned = PreCopy::start(&primary);
    abandoned.step(&primary, 1024);
    drop(abandoned); // ...must not be forgotten with it
    drive(&mut primary, 30_000_000);
    checkpoint::apply(&mut backup, &checkpoint::take(&mut primary, false).unwrap()).unwrap();
    assert_eq!(backup.digest(), primary.digest());
}

#[test]
fn a_checkpoint_carrying_a_digest_is_verified_by_the_backup() {
    let mut primary = Machine::new(&config()).unwrap();
    let mut backup = Machine::new(&config()).unwrap();
    drive(&mut primary, 10_000_000);
    let mut full = checkpoint::take(&mut primary, true).unwrap();
    let pages = checkpoint::page_count(&full);
    assert!(pages > 100, "a booted guest has pages: {pages}");
    checkpoint::add_digest(&mut full, &primary);
    assert_eq!(checkpoint::page_count(&full), pages, "the digest is skipped when counting pages");
    checkpoint::apply(&mut backup, &full).unwrap();
    // An incremental applied on a base that lacks a page the primary wrote: diverged.
    drive(&mut primary, 15_000_000);
    let mut delta = checkpoint::take(&mut primary, false).unwrap();
    checkpoint::add_digest(&mut delta, &primary);
    backup.write_page(5, &[0xa5; 4096]).unwrap();
    let err = checkpoint::apply(&mut backup, &delta).unwrap_err();
    assert!(err.to_string().contains("diverged"), "{err}");
}

#[test]
fn a_malformed_payload_is_refused_and_changes_nothing() {
    let mut primary = Machine::new(&config()).unwrap();
    drive(&mut primary, 10_000_000);
    let good = checkpoint::take(&mut primary, true).unwrap();
    let mut backup = Machine::new(&config()).unwrap();
    let before = backup.digest();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("bad magic", [b"XXXX".as_slice(), &good[4..]].concat()),
        ("other version", [&good[..4], &[9, 0], &good[6..]].concat()),
        ("truncated", good[..good.len() / 2].to_vec()),
        ("trailing bytes", [good.as_slice(), &[0]].concat()),
    ];
    for (what, payload) in cases {
        assert!(checkpoint::apply(&mut backup, &payload).is_err(), "{what} must be refused");
        assert_eq!(backup.digest(), before, "{what} changed the machine");
    }
    let version_error = checkpoint::apply(&mut backup, &[&good[..4], &[9, 0], &good[6..]].concat()).unwrap_err();
    assert!(version_error.to_string().contains("version 9"), "{version_error}");
}

const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

/// A tiny machine (a kernel that jumps to itself, 16 MiB of RAM) a few instructions in,
/// with a network card and, when `disk_sectors` is not 0, a disk filled with `fill`.
fn tiny_machine(dir: &TempDir, name: &str, disk_sectors: usize, fill: u8, mac: [u8; 6]) -> Machine {
    let mut config = machine::MachineConfig::new(tiny_kernel(dir));
    config.ram_size = 16 << 20;
    config.net_mac = Some(mac);
    if disk_sectors > 0 {
        let path = dir.path(name);
        std::fs::write(&path, vec![fill; disk_sectors * 512]).unwrap();
        config.disk = Some(machine::DiskConfig { path, read_only: false });
    }
    let mut machine = Machine::new(&config).unwrap();
    assert_eq!(machine.run(1_000), machine::RunExit::Budget);
    machine
}

#[test]
fn a_full_checkpoint_from_a_machine_of_another_shape_changes_nothing() {
    // The state is checked against every device before RAM and the disk are cleared:
    // a backup whose disk is of another size, or whose MAC differs, keeps its RAM and
    // its disk's contents.
    let dir = TempDir::new("checkpoint-shape");
    let mut primary = tiny_machine(&dir, "primary.img", 1024, 0x11, MAC);
    primary.write_page(50, &[7; 4096]).unwrap();
    let full = checkpoint::take(&mut primary, true).unwrap();
    let mut backup = tiny_machine(&dir, "backup.img", 2048, 0x22, MAC);
    backup.write_page(60, &[9; 4096]).unwrap();
    let (before, disk_before) = (backup.digest(), std::fs::read(dir.path("backup.img")).unwrap());
    let err = checkpoint::apply(&mut backup, &full).unwrap_err();
    assert!(err.left_machine_unchanged(), "{err}");
    assert_eq!(backup.digest(), before);
    assert_eq!(std::fs::read(dir.path("backup.img")).unwrap(), disk_before, "the disk was not cleared");
    let disk = dir.path("backup.img").display().to_string();
    assert_eq!(
        common::error_chain(&err),
        format!(
            "the checkpoint does not fit this machine: virtio device 0: invalid virtio block state: the saved state is of a \
             writable disk of 1024 sectors, {disk} is a writable disk of 2048 sectors"
        )
    );

    let mut primary = tiny_machine(&dir, "", 0, 0, [2, 0, 0, 0, 0, 1]);
    let full = checkpoint::take(&mut primary, true).unwrap();
    let mut backup = tiny_machine(&dir, "", 0, 0, MAC);
    backup.write_page(60, &[9; 4096]).unwrap();
    let before = backup.digest();
    let err = checkpoint::apply(&mut backup, &full).unwrap_err();
    assert!(err.left_machine_unchanged(), "{err}");
    assert_eq!(backup.digest(), before, "RAM was not cleared");
}

#[test]
fn a_disk_written_during_its_pre_copy_reaches_the_backup_exactly() {
    // The disk is scanned a step at a time while the guest runs, like RAM: sectors the
    // guest writes ahead of the scan, behind it (even back to zeros) and before the
    // pre-copy began all reach the backup as they are at `finish`.
    let dir = TempDir::new("checkpoint-disk-precopy");
    let sectors = 4096;
    let mut primary = tiny_machine(&dir, "primary.img", sectors, 0x11, MAC);
    let mut backup = tiny_machine(&dir, "backup.img", sectors, 0x22, MAC);
    checkpoint::apply(&mut backup, &checkpoint::take(&mut primary, true).unwrap()).unwrap();
    primary.write_sectors(7, &[0x33; 512]).unwrap(); // since the last checkpoint, before the pre-copy
    let mut precopy = PreCopy::start(&primary);
    let mut steps = 0;
    let mut written = false;
    // 64 pages' budget a step: RAM (4096 pages) takes 64 steps, the disk 8 more.
    while !precopy.step(&primary, 64) {
        steps += 1;
        if steps == 66 {
            // The scan has passed the first 1024 sectors and not reached the last ones.
            primary.write_sectors(10, &[0x44; 1024]).unwrap();
            primary.write_sectors(20, &[0; 512]).unwrap();
            primary.write_sectors(4000, &[0x55; 512]).unwrap();
            primary.write_page(3, &[0x66; 4096]).unwrap();
            written = true;
        }
    }
    assert!(written && steps >= 70, "the disk was scanned in steps ({steps})");
    let full = precopy.finish(&mut primary).unwrap();
    checkpoint::apply(&mut backup, &full).unwrap();
    assert_eq!(backup.digest(), primary.digest(), "the full checkpoint is the state at finish");
    let (p, b) = (std::fs::read(dir.path("primary.img")).unwrap(), std::fs::read(dir.path("backup.img")).unwrap());
    assert!(p == b, "the backup's disk is the primary's");
    assert_eq!((&p[10 * 512..12 * 512], &p[20 * 512..21 * 512]), (&[0x44; 1024][..], &[0; 512][..]));
    // And incrementals carry on from it.
    primary.write_sectors(5, &[0x77; 512]).unwrap();
    checkpoint::apply(&mut backup, &checkpoint::take(&mut primary, false).unwrap()).unwrap();
    assert_eq!(backup.digest(), primary.digest());
}

#[test]
fn the_final_pass_of_a_disk_pre_copy_carries_only_what_was_written_meanwhile() {
    // A payload counts each sector it carries: a disk of 2048 non-zero sectors, scanned
    // during the steps, plus the 3 written meanwhile, makes 2051 — not twice the disk.
    let dir = TempDir::new("checkpoint-disk-final");
    let mut primary = tiny_machine(&dir, "primary.img", 2048, 0x11, MAC);
    primary.take_dirty_sectors();
    let mut precopy = PreCopy::start(&primary);
    while !precopy.step(&primary, 1024) {}
    primary.write_sectors(100, &[0x99; 3 * 512]).unwrap();
    let full = precopy.finish(&mut primary).unwrap();
    assert_eq!(checkpoint::counts(&full).1, 2051);
    let mut backup = tiny_machine(&dir, "backup.img", 2048, 0x22, MAC);
    checkpoint::apply(&mut backup, &full).unwrap();
    assert_eq!(backup.digest(), primary.digest());
}

#[test]
fn records_that_break_the_layout_are_refused_and_change_nothing() {
    let dir = TempDir::new("checkpoint-records");
    let mut primary = tiny_machine(&dir, "primary.img", 64, 0x11, MAC);
    let mut backup = tiny_machine(&dir, "backup.img", 64, 0x22, MAC);
    checkpoint::apply(&mut backup, &checkpoint::take(&mut primary, true).unwrap()).unwrap();
    primary.write_sectors(60, &[0x33; 4 * 512]).unwrap();
    let good = checkpoint::take(&mut primary, false).unwrap();
    let before = backup.digest();
    let header = &good[..8];
    // The header, one run of 4 sectors, the state.
    assert_eq!(good[8], 2, "a sectors record first");
    let state = &good[8 + 11 + 4 * 512..];
    assert_eq!(state[0], 3, "then the state record");
    let sectors = |first: u64, count: u16| {
        let mut r = vec![2u8];
        r.extend_from_slice(&first.to_le_bytes());
        r.extend_from_slice(&count.to_le_bytes());
        r.extend(std::iter::repeat_n(7u8, usize::from(count) * 512));
        r
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("no state", header.to_vec(), "no state record"),
        ("two states", [header, state, state].concat(), "appears twice"),
        ("an unknown tag", [header, &[9], state].concat(), "unknown record tag 9"),
        ("a run past the disk", [header, &sectors(62, 4), state].concat(), "sectors 62..66 are beyond the disk"),
        ("an empty run", [header, &sectors(0, 0), state].concat(), "a run of 0 sectors"),
        ("a long run", [header, &sectors(0, 257), state].concat(), "a run of 257 sectors"),
    ];
    for (what, payload, message) in cases {
        let err = checkpoint::apply(&mut backup, &payload).unwrap_err();
        assert!(err.to_string().contains(message), "{what}: {err}");
        assert!(err.left_machine_unchanged(), "{what}");
        assert_eq!(backup.digest(), before, "{what} changed the machine");
    }
    checkpoint::apply(&mut backup, &good).unwrap();
    assert_eq!(backup.digest(), primary.digest());
}

#[test]
fn a_pre_copy_skips_the_holes_of_a_sparse_disk() {
    // 64 MiB of disk with two short runs written: the scan reads those and skips the
    // holes (SEEK_DATA) instead of reading 131072 zero sectors.
    let dir = TempDir::new("checkpoint-sparse");
    let mut config = machine::MachineConfig::new(tiny_kernel(&dir));
    config.ram_size = 16 << 20;
    let sparse = |name: &str| {
        let path = dir.path(name);
        std::fs::File::create(&path).unwrap().set_len(64 << 20).unwrap();
        machine::DiskConfig { path, read_only: false }
    };
    config.disk = Some(sparse("primary.img"));
    let mut primary = Machine::new(&config).unwrap();
    config.disk = Some(sparse("backup.img"));
    let mut backup = Machine::new(&config).unwrap();
    primary.write_sectors(5, &[0x12; 1024]).unwrap();
    primary.write_sectors(100_000, &[0x34; 4096]).unwrap();
    let mut precopy = PreCopy::start(&primary);
    let mut steps = 1;
    // 64 pages' budget a step: RAM takes 64 steps, and reading every sector 256 more.
    while !precopy.step(&primary, 64) {
        steps += 1;
    }
    assert!(steps <= 64 + 4, "{steps} steps: the holes were read");
    checkpoint::apply(&mut backup, &precopy.finish(&mut primary).unwrap()).unwrap();
    assert_eq!(backup.digest(), primary.digest());
}

#[test]
fn written_names_the_pages_a_checkpoint_took_from_the_dirty_log() {
    // A second consumer of the dirty log (the keeper's local checkpoint of a replicated
    // primary) learns from the payload which pages the checkpoint took.
    let mut primary = Machine::new(&config()).unwrap();
    drive(&mut primary, 10_000_000);
    checkpoint::take(&mut primary, true).unwrap();
    drive(&mut primary, 15_000_000);
    let delta = checkpoint::take(&mut primary, false).unwrap();
    let (pages, sectors) = checkpoint::written(&delta).expect("a well-formed payload");
    assert!(!pages.is_empty(), "the guest wrote pages in 5 M instructions");
    assert_eq!(pages.len(), checkpoint::page_count(&delta));
    assert!(sectors.is_empty(), "no disk");
    assert!(pages.windows(2).all(|w| w[0] < w[1]), "each page once, ascending: {pages:?}");
    assert_eq!(checkpoint::written(&delta[..delta.len() - 1]), None, "a cut payload is malformed");
}
