//! Incremental region digests: whatever was written, taken, cleared or restored, and
//! whatever digests were taken before, `Machine::digest` equals the digest computed from
//! scratch, and digests never disturb the dirty logs that checkpoints take.

mod common;
use common::{drive, tiny_kernel, TempDir};
use machine::checkpoint;
use machine::digest::{ram_region_pages, Region, PAGES_PER_REGION, SECTORS_PER_REGION};
use machine::{DiskConfig, Machine, MachineConfig};
use proptest::prelude::*;

/// 16 MiB of RAM (16 regions) and a disk of 5 MiB and 3 sectors: a short last region
/// whose last leaf is short too.
const DISK_SECTORS: u64 = 5 * 2048 + 3;

fn tiny_config(dir: &TempDir, name: &str) -> MachineConfig {
    let disk = dir.path(name);
    std::fs::File::create(&disk).unwrap().set_len(DISK_SECTORS * 512).unwrap();
    let mut config = MachineConfig::new(tiny_kernel(dir));
    config.ram_size = 16 << 20;
    config.disk = Some(DiskConfig { path: disk, read_only: false });
    config
}

#[derive(Debug, Clone)]
enum Op {
    Page {
        index: usize,
        at: usize,
        byte: u8,
    },
    Sectors {
        first: u64,
        count: u64,
        byte: u8,
    },
    TakePages,
    TakeSectors,
    Digest,
    ClearRam,
    ClearDisk,
    /// Become the other machine by a full checkpoint (clears RAM and disk, then writes).
    ApplyFullFromOther,
    /// A write to the other machine only.
    OtherPage {
        index: usize,
        byte: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let pages = (16usize << 20) / 4096;
    prop_oneof![
        6 => (0..pages, 0..4096usize, any::<u8>()).prop_map(|(index, at, byte)| Op::Page { index, at, byte }),
        4 => (0..DISK_SECTORS, 1..40u64, any::<u8>())
            .prop_map(|(first, count, byte)| Op::Sectors { first, count: count.min(DISK_SECTORS - first), byte }),
        2 => Just(Op::TakePages),
        2 => Just(Op::TakeSectors),
        4 => Just(Op::Digest),
        1 => Just(Op::ClearRam),
        1 => Just(Op::ClearDisk),
        1 => Just(Op::ApplyFullFromOther),
        2 => (0..pages, any::<u8>()).prop_map(|(index, byte)| Op::OtherPage { index, byte }),
    ]
}

/// Apply `op`; what a checkpoint consumer took, if the op took anything.
fn apply(machine: &mut Machine, other: &mut Machine, op: &Op) -> Option<Vec<u64>> {
    match *op {
        Op::Page { index, at, byte } => {
            let mut page = machine.page(index).unwrap().to_vec();
            page[at] = byte;
            machine.write_page(index, &page).unwrap();
        }
        Op::Sectors { first, count, byte } => {
            machine.write_sectors(first, &vec![byte; count as usize * 512]).unwrap();
        }
        Op::TakePages => return Some(machine.take_dirty_pages().into_iter().map(|p| p as u64).collect()),
        Op::TakeSectors => return Some(machine.take_dirty_sectors()),
        Op::Digest => {
            machine.digest();
        }
        Op::ClearRam => machine.clear_ram(),
        Op::ClearDisk => machine.clear_disk().unwrap(),
        Op::ApplyFullFromOther => {
            checkpoint::apply(machine, &checkpoint::take(other, true).unwrap()).unwrap();
        }
        Op::OtherPage { index, byte } => other.write_page(index, &[byte; 4096]).unwrap(),
    }
    None
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn incremental_digests_equal_digests_from_scratch(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = TempDir::new("digest-agree");
        let mut machine = Machine::new(&tiny_config(&dir, "a.img")).unwrap();
        let mut other = Machine::new(&tiny_config(&dir, "b.img")).unwrap();
        for (i, op) in ops.iter().enumerate() {
            apply(&mut machine, &mut other, op);
            if matches!(op, Op::Digest) || i + 1 == ops.len() {
                let scratch = machine.digest_from_scratch();
                prop_assert_eq!(machine.digest(), scratch, "after op {} {:?}", i, op);
                prop_assert_eq!(machine.region_digests().root(), scratch);
            }
        }
        if ops.iter().any(|op| matches!(op, Op::ApplyFullFromOther)) {
            // Whatever happened since, a machine made equal has the same regions' digests.
            checkpoint::apply(&mut machine, &checkpoint::take(&mut other, true).unwrap()).unwrap();
            prop_assert_eq!(machine.region_digests(), other.region_digests());
        }
    }

    #[test]
    fn digests_do_not_change_what_checkpoints_take(ops in proptest::collection::vec(op(), 1..60)) {
        // Two machines given the same writes, one taking digests and one not, hand the
        // checkpoint consumer the same pages and sectors at every take.
        let dir = TempDir::new("digest-dirty");
        let mut with = Machine::new(&tiny_config(&dir, "a.img")).unwrap();
        let mut without = Machine::new(&tiny_config(&dir, "b.img")).unwrap();
        let (mut other_a, mut other_b) =
            (Machine::new(&tiny_config(&dir, "c.img")).unwrap(), Machine::new(&tiny_config(&dir, "d.img")).unwrap());
        with.digest();
        for (i, op) in ops.iter().enumerate() {
            let a = apply(&mut with, &mut other_a, op);
            if !matches!(op, Op::Digest) {
                let b = apply(&mut without, &mut other_b, op);
                prop_assert_eq!(a, b, "op {} {:?}", i, op);
            }
        }
        prop_assert_eq!(with.take_dirty_pages(), without.take_dirty_pages());
        prop_assert_eq!(with.take_dirty_sectors(), without.take_dirty_sectors());
        prop_assert_eq!(with.digest(), without.digest());
    }
}

#[test]
fn region_digests_locate_the_region_that_differs() {
    let dir = TempDir::new("digest-locate");
    let mut a = Machine::new(&tiny_config(&dir, "a.img")).unwrap();
    let mut b = Machine::new(&tiny_config(&dir, "b.img")).unwrap();
    let (ra, rb) = (a.region_digests(), b.region_digests());
    assert_eq!(ra, rb);
    assert_eq!((ra.ram.len(), ra.disk.len()), (16, 6));
    let page = 5 * PAGES_PER_REGION + 17;
    b.write_page(page, &[1; 4096]).unwrap();
    b.write_sectors(3 * SECTORS_PER_REGION + 9, &[2; 512]).unwrap();
    let differing = a.region_digests().differing(&b.region_digests());
    assert_eq!(differing, vec![Region::Ram(5), Region::Disk(3)]);
    // Repair the odd one by copying only those regions.
    for index in ram_region_pages(5) {
        let bytes = a.page(index).unwrap().to_vec();
        b.write_page(index, &bytes).unwrap();
    }
    let sectors = b.disk_region_sectors(3).unwrap();
    let mut buf = vec![0; (sectors.end - sectors.start) as usize * 512];
    a.read_sectors(sectors.start, &mut buf).unwrap();
    b.write_sectors(sectors.start, &buf).unwrap();
    assert_eq!(b.digest(), a.digest());
    assert_eq!(b.disk_region_sectors(5), Some(5 * 2048..DISK_SECTORS));
    assert_eq!(b.disk_region_sectors(6), None);
    // Running changes the hart's state, and only that.
    a.run(a.icount() + 10);
    assert_eq!(a.region_digests().differing(&b.region_digests()), vec![Region::State]);
}

#[test]
fn a_guest_run_digested_every_slice_agrees_with_scratch_and_with_an_undigested_run() {
    // The guest's own stores (compiled code writes pages already dirty without marking
    // them) and device DMA: the digest of each slice must still see every write.
    let dir = TempDir::new("digest-guest");
    let disk = |name: &str| {
        let path = dir.path(name);
        std::fs::File::create(&path).unwrap().set_len(8 << 20).unwrap();
        Some(path)
    };
    let mut digested = Machine::new(&common::debian_config(disk("a.img"))).unwrap();
    let mut plain = Machine::new(&common::debian_config(disk("b.img"))).unwrap();
    let mut at = 0;
    for slice in 0..8 {
        at += 4_000_000;
        drive(&mut digested, at);
        if slice % 3 == 1 {
            // A checkpoint consumer takes the dirty logs first: the digest still sees them.
            checkpoint::take(&mut digested, false).unwrap();
        }
        assert_eq!(digested.digest(), digested.digest_from_scratch(), "slice {slice}");
    }
    drive(&mut plain, at);
    assert_eq!(digested.region_digests(), plain.region_digests(), "the state a run without digests reaches");
}

#[test]
fn the_pages_and_sectors_whose_leaves_changed_carry_one_state_to_the_next() {
    // What a recording's snapshot delta is: a checkpoint of what the leaf hashes say changed.
    let dir = TempDir::new("digest-delta");
    let mut a = Machine::new(&tiny_config(&dir, "a.img")).unwrap();
    let mut b = Machine::new(&tiny_config(&dir, "b.img")).unwrap();
    a.write_page(7, &[3; 4096]).unwrap();
    checkpoint::apply(&mut b, &checkpoint::take(&mut a, true).unwrap()).unwrap();
    let before = a.leaf_hashes();
    a.write_page(7, &[0; 4096]).unwrap(); // back to zero
    a.write_page(300, &[4; 4096]).unwrap();
    a.write_sectors(DISK_SECTORS - 1, &[5; 512]).unwrap(); // in the short last leaf
    a.write_sectors(100, &[0; 512]).unwrap(); // written, unchanged
    a.run(a.icount() + 10);
    let (pages, sectors) = a.leaf_hashes().changed_since(&before, DISK_SECTORS);
    assert_eq!(pages, vec![7, 300]);
    assert_eq!(sectors, vec![DISK_SECTORS - 3, DISK_SECTORS - 2, DISK_SECTORS - 1]);
    let mut delta = checkpoint::take_these(&a, &pages, &sectors).unwrap();
    checkpoint::add_digest(&mut delta, &a);
    checkpoint::apply(&mut b, &delta).unwrap();
    assert_eq!(b.digest(), a.digest());
}
