//! Snapshot files, end to end: a machine restored from a file continues exactly (with
//! and without a disk); a file of another format version, a corrupt byte anywhere, a
//! truncation anywhere and a configuration that does not fit are refused with a clear
//! error, never a panic, and leave the target disk untouched; random and mutated files
//! never panic the reader nor make it allocate beyond its caps.
//!
//! The exact-continuation tests boot the Debian kernel part of the way (the guest image
//! must be built and the build optimized); the others use a tiny stand-in kernel (a
//! jump to itself) and 16 MiB of RAM, so that they run in milliseconds.

mod common;
use common::{debian_config, drive, error_chain, tiny_kernel, TempDir};
use machine::snapshot::{self, SnapshotError, FORMAT_VERSION, HEADER_BYTES};
use machine::{DiskConfig, Input, InputKind, Machine, MachineConfig, RunExit};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Cursor;
use std::path::Path;

// --- The largest single allocation, per thread -----------------------------------------

struct LargestAllocation;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
}

// SAFETY: every call goes to the system allocator unchanged; this only records sizes
// in a const-initialised thread-local, which never allocates.
unsafe impl GlobalAlloc for LargestAllocation {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller upholds `alloc`'s contract, passed on as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, that is from `System`, with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: as for `dealloc`; the caller upholds `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: LargestAllocation = LargestAllocation;

/// Runs `f` and returns the largest single allocation it made on this thread.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|largest| largest.set(0));
    let result = f();
    (result, LARGEST.with(Cell::get))
}

// --- Helpers ----------------------------------------------------------------------------

const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const TINY_RAM: u64 = 16 << 20;
const DISK_SECTORS: usize = 2048;

fn tiny_config(dir: &TempDir, disk: Option<&Path>) -> MachineConfig {
    let mut config = MachineConfig::new(tiny_kernel(dir));
    config.ram_size = TINY_RAM;
    config.disk = disk.map(|path| DiskConfig { path: path.to_path_buf(), read_only: false });
    config.net_mac = Some(MAC);
    config
}

fn disk_image(path: &Path, fill: impl Fn(usize) -> u8) {
    let bytes: Vec<u8> = (0..DISK_SECTORS * 512).map(fill).collect();
    std::fs::write(path, bytes).unwrap();
}

/// A tiny machine with a disk and a network card, a few thousand instructions in, with
/// RAM pages and disk sectors written and inputs waiting: something in every section.
/// Its clock was set at boot and its rate changed, which a restore into a machine
/// configured at another time (as `tiny_config` is) must keep.
fn tiny_machine(dir: &TempDir) -> (Machine, MachineConfig) {
    let disk = dir.path("source.img");
    disk_image(&disk, |i| if (i / 512) % 97 == 0 { (i % 251) as u8 } else { 0 });
    let config = MachineConfig { boot_unix_ns: 1_764_000_000_123_456_789, ..tiny_config(dir, Some(&disk)) };
    let mut machine = Machine::new(&config).unwrap();
    machine.push_input(Input { icount: 1_000, kind: InputKind::ClockRate { icount_per_tick: 17 } }).unwrap();
    assert_eq!(machine.run(3_000), RunExit::Budget);
    assert_eq!(machine.icount_per_tick(), 17);
    machine.write_page(100, &[0x22; 4096]).unwrap();
    machine.write_page(101, &[0x33; 4096]).unwrap();
    machine.write_page(3000, &[0x44; 4096]).unwrap();
    machine.write_sectors(3, &[0x5a; 1024]).unwrap();
    machine.write_sectors(DISK_SECTORS as u64 - 1, &[0xa5; 512]).unwrap();
    let inputs = [
        (5_000, InputKind::Console(b"hello\n".to_vec())),
        (6_000, InputKind::Entropy(vec![9; 32])),
        (7_000, InputKind::NetFrame(vec![0xff; 60])),
        (8_000, InputKind::IdleSkip { ticks: 50 }),
        (9_000, InputKind::ClockRate { icount_per_tick: 31 }),
    ];
    for (icount, kind) in inputs {
        machine.push_input(Input { icount, kind }).unwrap();
    }
    (machine, config)
}

fn snapshot_bytes(machine: &Machine) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    snapshot::write_snapshot(machine, &mut out).unwrap();
    out.into_inner()
}

fn restore(bytes: &[u8], config: &MachineConfig) -> Result<Machine, SnapshotError> {
    snapshot::read_snapshot(&mut Cursor::new(bytes), config)
}

/// The sections of a snapshot: (offset, payload length).
fn sections(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = HEADER_BYTES;
    while at + 12 <= bytes.len() {
        let len = u64::from_le_bytes(bytes[at + 4..at + 12].try_into().unwrap()) as usize;
        out.push((at, len));
        at = at.saturating_add(16).saturating_add(len);
    }
    out
}

/// Recomputes every length and checksum the format has (an independent reading of the
/// format), so that a mutation reaches the checks behind them.
fn reseal(bytes: &mut [u8]) {
    if bytes.len() < HEADER_BYTES {
        return;
    }
    let body_len = (bytes.len() - HEADER_BYTES) as u64;
    bytes[16..24].copy_from_slice(&body_len.to_le_bytes());
    for (at, len) in sections(bytes) {
        let end = at + 12 + len;
        if end + 4 <= bytes.len() {
            let crc = crc32c::crc32c(&bytes[at..end]);
            bytes[end..end + 4].copy_from_slice(&crc.to_le_bytes());
        }
    }
    let body_crc = crc32c::crc32c(&bytes[HEADER_BYTES..]);
    bytes[24..28].copy_from_slice(&body_crc.to_le_bytes());
    let header_crc = crc32c::crc32c(&bytes[..HEADER_BYTES - 4]);
    bytes[HEADER_BYTES - 4..HEADER_BYTES].copy_from_slice(&header_crc.to_le_bytes());
}

// --- Exact continuation on the real kernel ---------------------------------------------

#[test]
fn a_machine_restored_from_a_file_continues_exactly() {
    let (n, m) = (40_000_000, 30_000_000);
    let dir = TempDir::new("continue");
    let typed = Input { icount: n + 5_000_000, kind: InputKind::Console(b"x\n".to_vec()) };
    let mut straight = Machine::new(&debian_config(None)).unwrap();
    straight.push_input(typed.clone()).unwrap();
    drive(&mut straight, n + m);

    let mut first = Machine::new(&debian_config(None)).unwrap();
    first.push_input(typed).unwrap();
    drive(&mut first, n);
    let file = dir.path("vm.snap");
    let info = snapshot::save_to_path(&first, &file).unwrap();
    assert_eq!((info.icount, info.machine_digest, info.format_version), (n, first.digest(), FORMAT_VERSION));
    assert_eq!(std::fs::metadata(&file).unwrap().len(), info.file_bytes());
    assert_eq!(snapshot::read_header_from_path(&file).unwrap(), info);
    drop(first);

    let mut restored = snapshot::load_from_path(&file, &debian_config(None)).unwrap();
    assert_eq!((restored.icount(), restored.digest()), (n, info.machine_digest));
    drive(&mut restored, n + m);
    assert_eq!((restored.icount(), restored.digest()), (straight.icount(), straight.digest()));
}

#[test]
fn a_machine_with_a_written_disk_continues_exactly_and_its_disk_is_restored() {
    let (n, m) = (40_000_000, 30_000_000);
    let dir = TempDir::new("disk");
    let (a, b) = (dir.path("a.img"), dir.path("b.img"));
    disk_image(&a, |i| if (i / 512) % 5 == 0 { i as u8 } else { 0 });
    // The restore target starts with other contents everywhere.
    disk_image(&b, |i| (i % 13) as u8 + 1);

    let mut first = Machine::new(&debian_config(Some(a.clone()))).unwrap();
    drive(&mut first, n);
    first.write_sectors(10, &[0x5a; 1024]).unwrap();
    first.write_sectors(20, &[0; 512]).unwrap();
    let file = dir.path("vm.snap");
    let info = snapshot::save_to_path(&first, &file).unwrap();
    let disk_at_snapshot = std::fs::read(&a).unwrap();
    assert_eq!(info.disk.map(|d| d.sectors), Some(DISK_SECTORS as u64));
    assert_eq!(
        info.disk_sectors_saved,
        disk_at_snapshot.chunks(512).filter(|s| s.iter().any(|&b| b != 0)).count() as u64
    );
    drive(&mut first, n + m); // the straight run: the snapshot did not disturb it

    let mut restored = snapshot::load_from_path(&file, &debian_config(Some(b.clone()))).unwrap();
    assert_eq!(std::fs::read(&b).unwrap(), disk_at_snapshot, "the target disk holds the snapshot's contents");
    assert!(
        restored.take_dirty_pages().is_empty() && restored.take_dirty_sectors().is_empty(),
        "a restored machine starts clean"
    );
    drive(&mut restored, n + m);
    assert_eq!((restored.icount(), restored.digest()), (first.icount(), first.digest()));
    assert_eq!(std::fs::read(&b).unwrap(), std::fs::read(&a).unwrap());
}

// --- Refusals ---------------------------------------------------------------------------

#[test]
fn a_tiny_machine_round_trips_with_its_pending_inputs() {
    let dir = TempDir::new("tiny");
    let (mut machine, _) = tiny_machine(&dir);
    let bytes = snapshot_bytes(&machine);
    let target = dir.path("target.img");
    disk_image(&target, |_| 0xee);
    let mut restored = restore(&bytes, &tiny_config(&dir, Some(&target))).unwrap();
    assert_eq!(restored.save_state(), machine.save_state());
    assert_eq!(restored.digest(), machine.digest());
    assert_eq!((restored.rtc_unix_ns(), restored.icount_per_tick()), (machine.rtc_unix_ns(), 17));
    assert_eq!(machine.run(10_000), restored.run(10_000));
    assert_eq!(restored.take_outputs(), machine.take_outputs());
    assert_eq!((restored.icount(), restored.digest()), (machine.icount(), machine.digest()));
}

#[test]
fn a_file_of_another_format_version_is_refused_naming_both_versions() {
    let dir = TempDir::new("version");
    let (machine, config) = tiny_machine(&dir);
    let file = dir.path("vm.snap");
    snapshot::save_to_path(&machine, &file).unwrap();
    for version in [0, FORMAT_VERSION + 1, 77] {
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[8..12].copy_from_slice(&version.to_le_bytes());
        reseal(&mut bytes);
        let other = dir.path("other.snap");
        std::fs::write(&other, &bytes).unwrap();
        let err = snapshot::load_from_path(&other, &config).err().expect("refused");
        let expected =
            format!("{}: snapshot format version {version}, this ftvm reads version {FORMAT_VERSION}", other.display());
        assert_eq!(error_chain(&err), expected);
        let err = snapshot::read_header_from_path(&other).unwrap_err();
        assert_eq!(error_chain(&err), expected);
    }
}

/// Positions worth damaging: the whole header, every section header and checksum, the
/// first extent headers, a spread through the payloads, and the last byte.
fn damage_positions(bytes: &[u8]) -> Vec<usize> {
    let mut positions: Vec<usize> = (0..HEADER_BYTES).collect();
    for (at, len) in sections(bytes) {
        positions.extend(at..at + 12 + 12 + 12);
        positions.extend(at + 12 + len..at + 16 + len);
    }
    positions.extend((HEADER_BYTES..bytes.len()).step_by(97));
    positions.push(bytes.len() - 1);
    positions.sort_unstable();
    positions.dedup();
    positions.retain(|&p| p < bytes.len());
    positions
}

#[test]
fn a_corrupt_byte_anywhere_is_refused_and_leaves_the_disk_untouched() {
    let dir = TempDir::new("corrupt");
    let (machine, _) = tiny_machine(&dir);
    let bytes = snapshot_bytes(&machine);
    let target = dir.path("target.img");
    disk_image(&target, |i| (i % 3) as u8);
    let before = std::fs::read(&target).unwrap();
    let config = tiny_config(&dir, Some(&target));
    let positions = damage_positions(&bytes);
    assert!(positions.len() > 300, "{}", positions.len());
    for at in positions {
        for bit in [0x01, 0x80] {
            let mut damaged = bytes.clone();
            damaged[at] ^= bit;
            let err = restore(&damaged, &config).err().unwrap_or_else(|| panic!("byte {at} ^ {bit:#x} was accepted"));
            let clear = matches!(
                err,
                SnapshotError::Checksum { .. }
                    | SnapshotError::Malformed { .. }
                    | SnapshotError::Truncated { .. }
                    | SnapshotError::NotASnapshot { .. }
                    | SnapshotError::UnsupportedVersion { .. }
            );
            assert!(clear, "byte {at} ^ {bit:#x}: {err}");
        }
    }
    assert!(std::fs::read(&target).unwrap() == before, "a refused snapshot never writes the disk");
}

#[test]
fn a_truncated_file_is_refused_naming_where_it_ends() {
    let dir = TempDir::new("truncated");
    let (machine, _) = tiny_machine(&dir);
    let bytes = snapshot_bytes(&machine);
    let target = dir.path("target.img");
    disk_image(&target, |_| 1);
    let config = tiny_config(&dir, Some(&target));
    let mut lengths: Vec<usize> = (0..HEADER_BYTES + 64).collect();
    lengths.extend((HEADER_BYTES..bytes.len()).step_by(251));
    for (at, len) in sections(&bytes) {
        lengths.extend([at + 11, at + 12, at + 30, at + 12 + len, at + 15 + len]);
    }
    lengths.push(bytes.len() - 1);
    for len in lengths {
        let err = restore(&bytes[..len], &config).err().expect("refused");
        assert!(matches!(err, SnapshotError::Truncated { offset, .. } if offset == len as u64), "{len}: {err}");
        assert!(err.to_string().starts_with(&format!("snapshot truncated at byte {len}")), "{err}");
    }
    assert!(std::fs::read(&target).unwrap().iter().all(|&b| b == 1));
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(restore(&longer, &config).err().unwrap().to_string().contains("bytes after the body's end"));
}

#[test]
fn a_configuration_that_does_not_fit_is_refused_naming_both_sides() {
    let dir = TempDir::new("mismatch");
    let (machine, config) = tiny_machine(&dir);
    let bytes = snapshot_bytes(&machine);
    let error = |config: &MachineConfig| restore(&bytes, config).err().expect("refused").to_string();

    let bigger = MachineConfig { ram_size: 32 << 20, ..config.clone() };
    let err = error(&bigger);
    assert!(
        err.contains(
            "RAM size: the snapshot has 16777216 bytes (16 MiB), the configuration has 33554432 bytes (32 MiB)"
        ),
        "{err}"
    );

    let no_disk = MachineConfig { disk: None, ..config.clone() };
    let err = error(&no_disk);
    assert!(err.contains("disk: the snapshot has a writable disk, the configuration has no disk"), "{err}");

    let read_only =
        MachineConfig { disk: Some(DiskConfig { path: dir.path("source.img"), read_only: true }), ..config.clone() };
    assert!(error(&read_only).contains("the configuration has a read-only disk"));

    let other_mac = MachineConfig { net_mac: Some([2, 0, 0, 0, 0, 1]), ..config.clone() };
    let err = error(&other_mac);
    assert!(err.contains("MAC 52:54:00:12:34:56") && err.contains("MAC 02:00:00:00:00:01"), "{err}");

    let no_net = MachineConfig { net_mac: None, ..config.clone() };
    assert!(error(&no_net).contains("the configuration has no network card"));

    let faster = MachineConfig { icount_per_tick: 20, ..config.clone() };
    assert!(error(&faster).contains("timer rate"));

    let small = dir.path("small.img");
    std::fs::write(&small, vec![0u8; 1024 * 512]).unwrap();
    let err = error(&tiny_config(&dir, Some(&small)));
    assert!(err.contains("disk size: the snapshot has 2048 sectors (1048576 bytes), the configuration has 1024 sectors (524288 bytes)"), "{err}");
    assert!(std::fs::read(&small).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn a_read_only_disk_must_already_hold_the_snapshots_contents() {
    let dir = TempDir::new("read-only");
    let disk = dir.path("ro.img");
    disk_image(&disk, |i| if i / 512 == 9 { 0x99 } else { 0 });
    let mut config = tiny_config(&dir, Some(&disk));
    config.disk = Some(DiskConfig { path: disk.clone(), read_only: true });
    let mut machine = Machine::new(&config).unwrap();
    machine.run(1_000);
    let bytes = snapshot_bytes(&machine);
    assert!(restore(&bytes, &config).is_ok());

    disk_image(&disk, |i| if i / 512 == 9 || i / 512 == 12 { 0x99 } else { 0 });
    let err = restore(&bytes, &config).err().expect("refused");
    assert!(matches!(&err, SnapshotError::ReadOnlyDiskDiffers { sector: 12, .. }), "{err}");
}

#[test]
fn saving_replaces_a_file_whole_and_leaves_no_temporary_files() {
    let dir = TempDir::new("save");
    let (mut machine, config) = tiny_machine(&dir);
    let file = dir.path("vm.snap");
    let first = snapshot::save_to_path(&machine, &file).unwrap();
    machine.run(4_000);
    let second = snapshot::save_to_path(&machine, &file).unwrap();
    assert_ne!(first.machine_digest, second.machine_digest);
    assert_eq!(snapshot::read_header_from_path(&file).unwrap(), second);
    let names: Vec<_> =
        std::fs::read_dir(dir.path("")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(names.iter().all(|n| !n.contains(".tmp")), "{names:?}");
    let restored = snapshot::load_from_path(&file, &config).unwrap();
    assert_eq!(restored.icount(), 4_000);

    let missing = dir.path("missing/vm.snap");
    let err = snapshot::save_to_path(&machine, &missing).unwrap_err();
    assert_eq!(
        error_chain(&err),
        format!("{}: I/O error creating the temporary file: No such file or directory (os error 2)", missing.display())
    );
    let disk = dir.path("source.img");
    let err = snapshot::save_to_path(&machine, &disk).unwrap_err();
    let disk = disk.display();
    assert_eq!(
        error_chain(&err),
        format!("{disk}: refusing to write the snapshot over the machine's own disk image {disk}")
    );
}

#[test]
fn a_lying_length_in_a_short_file_allocates_nothing_large() {
    let dir = TempDir::new("lying");
    let (machine, config) = tiny_machine(&dir);
    let bytes = snapshot_bytes(&machine);
    // The state section claims 60 MiB (under its cap) but the file ends soon after.
    let mut short = bytes[..HEADER_BYTES + 200].to_vec();
    short[HEADER_BYTES + 4..HEADER_BYTES + 12].copy_from_slice(&(60u64 << 20).to_le_bytes());
    short[16..24].copy_from_slice(&(61u64 << 20).to_le_bytes());
    let crc = crc32c::crc32c(&short[..HEADER_BYTES - 4]);
    short[HEADER_BYTES - 4..HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
    let (result, largest) = largest_allocation(|| restore(&short, &config));
    assert!(matches!(result, Err(SnapshotError::Truncated { offset, .. }) if offset == short.len() as u64));
    assert!(largest <= READER_ALLOCATION_BOUND, "largest allocation {largest}");
    // Beyond the cap it is refused outright.
    short[HEADER_BYTES + 4..HEADER_BYTES + 12].copy_from_slice(&(65u64 << 20).to_le_bytes());
    short[16..24].copy_from_slice(&(66u64 << 20).to_le_bytes());
    let crc = crc32c::crc32c(&short[..HEADER_BYTES - 4]);
    short[HEADER_BYTES - 4..HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
    assert!(restore(&short, &config)
        .err()
        .unwrap()
        .to_string()
        .contains("a state section of 68157440 bytes, at most 67108864"));
}

// --- Fuzzing ----------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: prop::sample::Index, bit: u8 },
    Set { at: prop::sample::Index, value: u8 },
    Insert { at: prop::sample::Index, bytes: Vec<u8> },
    Delete { at: prop::sample::Index, len: usize },
    Truncate { at: prop::sample::Index },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<prop::sample::Index>(), 0..8u8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(at, value)| Mutation::Set { at, value }),
        (any::<prop::sample::Index>(), proptest::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<prop::sample::Index>(), 1..64usize).prop_map(|(at, len)| Mutation::Delete { at, len }),
        any::<prop::sample::Index>().prop_map(|at| Mutation::Truncate { at }),
    ]
}

fn apply(bytes: &mut Vec<u8>, mutation: &Mutation) {
    if bytes.is_empty() {
        return;
    }
    let len = bytes.len();
    match mutation {
        Mutation::Flip { at, bit } => bytes[at.index(len)] ^= 1 << bit,
        Mutation::Set { at, value } => bytes[at.index(len)] = *value,
        Mutation::Insert { at, bytes: extra } => {
            let i = at.index(bytes.len());
            bytes.splice(i..i, extra.iter().copied());
        }
        Mutation::Delete { at, len } => {
            let i = at.index(bytes.len());
            let end = (i + len).min(bytes.len());
            bytes.drain(i..end);
        }
        Mutation::Truncate { at } => bytes.truncate(at.index(bytes.len())),
    }
}

struct Fuzz {
    _dir: TempDir,
    bytes: Vec<u8>,
    config: MachineConfig,
    /// The largest single allocation that building and digesting the machine makes.
    machine_allocation: usize,
}

impl Fuzz {
    fn new() -> Fuzz {
        let dir = TempDir::new("fuzz");
        let (machine, _) = tiny_machine(&dir);
        let bytes = snapshot_bytes(&machine);
        let target = dir.path("target.img");
        disk_image(&target, |_| 0);
        let config = tiny_config(&dir, Some(&target));
        let (_, machine_allocation) = largest_allocation(|| Machine::new(&config).unwrap().digest());
        Fuzz { _dir: dir, bytes, config, machine_allocation }
    }

    /// Reads `bytes` as a snapshot: whatever happens, no panic, and no allocation
    /// larger than the machine's own (its RAM) or the reader's bounded buffers.
    fn read_bounded(&self, bytes: &[u8]) -> Result<(), TestCaseError> {
        let (_, largest) = largest_allocation(|| {
            let _ = snapshot::read_header(&mut Cursor::new(bytes));
            let _ = restore(bytes, &self.config);
        });
        let bound = self.machine_allocation.max(READER_ALLOCATION_BOUND);
        prop_assert!(largest <= bound, "largest allocation {} bytes, bound {}", largest, bound);
        Ok(())
    }
}

/// The most a reader may allocate at once beyond building the machine: its 1 MiB
/// extent buffer or state chunk, rounded up for a vector's growth.
const READER_ALLOCATION_BOUND: usize = 2 << 20;

fn fuzz_runner() -> TestRunner {
    TestRunner::new(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })
}

#[test]
fn random_bytes_never_panic_the_reader() {
    let fuzz = Fuzz::new();
    let strategy = (proptest::collection::vec(any::<u8>(), 0..600), any::<bool>());
    let result = fuzz_runner().run(&strategy, |(mut bytes, with_header)| {
        if with_header {
            // A well-formed header in front, so that the body parser is reached.
            bytes.splice(0..0, fuzz.bytes[..HEADER_BYTES].iter().copied());
            reseal(&mut bytes);
        }
        fuzz.read_bounded(&bytes)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn mutated_snapshots_never_panic_the_reader() {
    let fuzz = Fuzz::new();
    let strategy = (proptest::collection::vec(mutation(), 1..4), any::<bool>());
    let result = fuzz_runner().run(&strategy, |(mutations, resealed)| {
        let mut bytes = fuzz.bytes.clone();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        if resealed {
            reseal(&mut bytes);
        }
        fuzz.read_bounded(&bytes)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
