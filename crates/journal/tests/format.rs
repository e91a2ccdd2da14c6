//! The input log's format from the outside: what a writer writes a reader reads back;
//! a log cut anywhere yields its whole records, then says where it was cut; a damaged
//! byte anywhere is caught and named with its record's offset; another version and
//! other images are refused with one line.

use journal::{
    DiskImage, EndReason, ImageFile, JournalError, LogHeader, LogReader, LogWriter, Record, RegionDigests, Start,
    StateDigest,
};
use machine::{Input, InputKind};
use std::io::Cursor;

fn header() -> LogHeader {
    LogHeader {
        start: Start::Boot,
        ram_size: 256 << 20,
        icount_per_tick: 10,
        boot_unix_ns: 1_764_000_000_123_456_789,
        reboot_on_reset: true,
        net_mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
        seed: Some(7),
        bootargs: "console=ttyS0 ftvm.cmd=dHJ1ZQ==".into(),
        kernel: ImageFile { path: "/images/Image".into(), size_bytes: 123, sha256: [1; 32] },
        initrd: Some(ImageFile { path: "/images/initrd".into(), size_bytes: 45, sha256: [2; 32] }),
        disk: Some(DiskImage { path: "run.log.disk".into(), read_only: false, sectors: 2048, digest: 99 }),
    }
}

const DELTA: &[u8] = b"the pages that changed since the snapshot";

/// Region digests of the header's machine (256 MiB of RAM, a disk of one region): the
/// state, and `changed` RAM regions given digests of their own.
fn regions(state: u128, changed: &[(usize, u128)]) -> RegionDigests {
    let mut ram = vec![0; 256];
    ram[0] = 0xaaaa;
    ram[7] = 0xbbbb;
    for &(i, d) in changed {
        ram[i] = d;
    }
    RegionDigests { state, ram, disk: vec![0xcccc] }
}

fn digest(icount: u64, regions: RegionDigests) -> Record {
    let state = StateDigest { icount, machine: regions.root().0, outputs: icount as u128 * 3 };
    Record::Digest { state, regions: Some(regions) }
}

fn records() -> Vec<Record> {
    let input = |icount, kind| Record::Input(Input { icount, kind });
    let end_regions = regions(6, &[(7, 0x7777), (200, 0x2000)]);
    vec![
        input(0, InputKind::ClockRate { icount_per_tick: 12 }),
        input(10, InputKind::Entropy(vec![7; 64])),
        input(10, InputKind::Console(b"ls\n".to_vec())),
        input(500, InputKind::IdleSkip { ticks: 1000 }),
        digest(550, regions(1, &[])),
        digest(600, regions(2, &[(3, 0x3333)])),
        input(700, InputKind::NetFrame(vec![0xff; 1514])),
        digest(750, regions(5, &[(7, 0x7777)])),
        Record::End {
            state: StateDigest { icount: 800, machine: end_regions.root().0, outputs: 2 },
            regions: Some(end_regions),
            reason: EndReason::PowerOff { code: 3 },
        },
    ]
}

/// Writes `record` (not a snapshot or delta) to `w`.
fn write(w: &mut LogWriter<Vec<u8>>, record: &Record) {
    match record {
        Record::Input(input) => w.input(input).unwrap(),
        Record::Digest { state, regions } => w.digest(*state, regions.as_ref().unwrap()).unwrap(),
        Record::End { state, regions, reason } => w.end(*state, regions.as_ref().unwrap(), *reason).unwrap(),
        Record::Snapshot { .. } | Record::Delta { .. } => unreachable!(),
    }
}

/// A log of `records()`, with a snapshot record of `snapshot` bytes after the digest at
/// icount 600, and a snapshot delta after it.
fn log_bytes(snapshot: &[u8]) -> Vec<u8> {
    let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
    for record in records() {
        write(&mut w, &record);
        if matches!(record, Record::Digest { state, .. } if state.icount == 600) {
            w.snapshot(600, snapshot).unwrap();
            w.delta(600, DELTA).unwrap();
        }
    }
    w.into_inner().unwrap()
}

/// Every record a reader hands out, then how it stopped (None: a clean end).
fn read_all(bytes: &[u8]) -> Result<(Vec<Record>, Option<JournalError>), JournalError> {
    let mut reader = LogReader::new(Cursor::new(bytes))?;
    assert_eq!(reader.header(), &header());
    let mut out = Vec::new();
    loop {
        match reader.next_record() {
            Ok(Some(record)) => out.push(record),
            Ok(None) => return Ok((out, None)),
            Err(e) => return Ok((out, Some(e))),
        }
    }
}

#[test]
fn what_the_writer_writes_the_reader_reads_back() {
    let snapshot = b"a machine snapshot's bytes".repeat(5000);
    let bytes = log_bytes(&snapshot);
    let (read, stop) = read_all(&bytes).unwrap();
    assert!(stop.is_none());
    let mut expected = records();
    let Record::Snapshot { icount, section } = read[6] else { panic!("no snapshot in {read:?}") };
    assert_eq!(icount, 600);
    assert_eq!(&bytes[section.offset as usize..][..section.len as usize], &snapshot[..]);
    let Record::Delta { icount, section } = read[7] else { panic!("no delta in {read:?}") };
    assert_eq!(icount, 600);
    assert_eq!(&bytes[section.offset as usize..][..section.len as usize], DELTA);
    expected.insert(6, read[6].clone());
    expected.insert(7, read[7].clone());
    assert_eq!(read, expected, "every digest record's regions rebuilt, those listed as changes included");
}

#[test]
fn a_log_cut_anywhere_yields_its_whole_records_then_names_the_cut() {
    let bytes = log_bytes(&[9; 3000]);
    let whole = read_all(&bytes).unwrap().0;
    // Where each record ends: a cut there is a clean end of a shorter log.
    let mut ends = Vec::new();
    let mut reader = LogReader::new(Cursor::new(&bytes)).unwrap();
    let first = reader.offset() as usize;
    while reader.next_record().unwrap().is_some() {
        ends.push(reader.offset() as usize);
    }
    for cut in first..bytes.len() {
        let (read, stop) = read_all(&bytes[..cut]).unwrap();
        let whole_records = ends.iter().filter(|&&e| e <= cut).count();
        assert_eq!(read, whole[..whole_records], "cut at {cut}");
        match stop {
            None => assert!(cut == first || ends.contains(&cut), "cut at {cut}: a clean end only on a record boundary"),
            Some(JournalError::Truncated { offset, .. }) => {
                assert_eq!(offset as usize, if whole_records == 0 { first } else { ends[whole_records - 1] })
            }
            Some(e) => panic!("cut at {cut}: {e}"),
        }
    }
}

#[test]
fn a_damaged_byte_anywhere_is_caught_and_names_its_record() {
    let bytes = log_bytes(&[9; 300]);
    let mut starts = Vec::new();
    let mut reader = LogReader::new(Cursor::new(&bytes)).unwrap();
    let header_start = journal::PREAMBLE_BYTES;
    starts.push(reader.offset() as usize);
    while reader.next_record().unwrap().is_some() {
        starts.push(reader.offset() as usize);
    }
    for at in header_start..bytes.len() {
        let mut damaged = bytes.clone();
        damaged[at] ^= 0x20;
        let record_start =
            if at < starts[0] { header_start } else { *starts.iter().rev().find(|&&s| s <= at).unwrap() };
        let err = match read_all(&damaged) {
            Err(e) => e,
            Ok((_, Some(e))) => e,
            Ok((_, None)) => panic!("byte {at} damaged unnoticed"),
        };
        match err {
            JournalError::Corrupt { offset, .. } => assert_eq!(offset as usize, record_start, "byte {at}: {err}"),
            // A damaged length may point past the end of the log.
            JournalError::Truncated { offset, .. } => assert_eq!(offset as usize, record_start, "byte {at}: {err}"),
            e => panic!("byte {at}: {e}"),
        }
    }
}

#[test]
fn a_corrupt_record_is_one_line_naming_its_offset() {
    let mut bytes = log_bytes(&[]);
    let mut reader = LogReader::new(Cursor::new(&bytes)).unwrap();
    let first = reader.offset() as usize;
    reader.next_record().unwrap();
    bytes[first + journal::FRAME_HEADER_BYTES] ^= 1; // the first input's icount
    let (read, stop) = read_all(&bytes).unwrap();
    assert!(read.is_empty());
    let message = stop.unwrap().to_string();
    assert!(
        message.starts_with(&format!("corrupt record at byte {first}: the input record's checksum is 0x")),
        "{message}"
    );
}

#[test]
fn another_version_and_another_file_are_refused_with_one_line() {
    let mut bytes = log_bytes(&[]);
    bytes[8] = 9;
    let err = LogReader::new(Cursor::new(&bytes)).err().unwrap();
    assert_eq!(err.to_string(), "input log format version 9; this ftvm reads version 3");
    bytes[8] = 2; // the version before region digests in digest records
    let err = LogReader::new(Cursor::new(&bytes)).err().unwrap();
    assert_eq!(err.to_string(), "input log format version 2; this ftvm reads version 3");
    let err = LogReader::new(Cursor::new(b"FTVMSNAP and more".to_vec())).err().unwrap();
    assert_eq!(
        err.to_string(),
        "not an ftvm input log: it starts with [46, 54, 56, 4d, 53, 4e, 41, 50], not \"FTVMILOG\""
    );
}

#[test]
fn a_writer_refuses_an_icount_that_goes_back() {
    let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
    w.input(&Input { icount: 10, kind: InputKind::Console(b"a".to_vec()) }).unwrap();
    let err = w.input(&Input { icount: 9, kind: InputKind::Console(b"b".to_vec()) }).unwrap_err();
    assert_eq!(err.to_string(), "cannot record this run: icount 9 after a record at icount 10");
}

#[test]
fn images_other_than_the_recorded_ones_are_refused_naming_the_image() {
    let dir = std::env::temp_dir().join(format!("journal-images-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (kernel, disk) = (dir.join("Image"), dir.join("disk.img"));
    std::fs::write(&kernel, b"kernel bytes").unwrap();
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let mut config = machine::MachineConfig::new(&kernel);
    config.disk = Some(machine::DiskConfig { path: disk.clone(), read_only: false });
    let header = LogHeader::for_boot(&config, Some(("disk.img", &disk))).unwrap();
    header.check_images(&config, Some(&disk)).unwrap();
    std::fs::write(&disk, vec![1u8; 4096]).unwrap();
    let err = header.check_images(&config, Some(&disk)).unwrap_err();
    assert!(err.to_string().starts_with("the log was recorded with another disk: "), "{err}");
    std::fs::write(&kernel, b"another kernel").unwrap();
    let err = header.check_images(&config, Some(&disk)).unwrap_err();
    assert!(err.to_string().starts_with("the log was recorded with another kernel: "), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The offsets where each record after the header starts, and where the log ends.
fn record_starts(bytes: &[u8]) -> Vec<usize> {
    let mut reader = LogReader::new(Cursor::new(bytes)).unwrap();
    let mut starts = vec![reader.offset() as usize];
    while reader.next_record().unwrap().is_some() {
        starts.push(reader.offset() as usize);
    }
    starts
}

/// Sets the checksums of the record at `start` (a frame header and a payload of
/// `payload_len` bytes) to fit its bytes, as a writer with a bug would have written them.
fn reframe(bytes: &mut [u8], start: usize) {
    let payload_len = u64::from_le_bytes(bytes[start + 4..start + 12].try_into().unwrap()) as usize;
    let payload = start + journal::FRAME_HEADER_BYTES;
    let crc = crc32c::crc32c(&bytes[payload..payload + payload_len]);
    bytes[start + 12..start + 16].copy_from_slice(&crc.to_le_bytes());
    let crc = crc32c::crc32c(&bytes[start..start + 16]);
    bytes[start + 16..start + 20].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn a_digest_record_lists_only_the_regions_changed_since_the_previous_one() {
    let bytes = log_bytes(&[]);
    let starts = record_starts(&bytes);
    let len = |i: usize| starts[i + 1] - starts[i];
    // Records 4 and 5: the first digest (three non-empty regions), then one with one
    // region changed; record 9, the first after the delta record, lists all three again.
    let (fixed, entry) = (journal::FRAME_HEADER_BYTES + 40 + 33, 20);
    assert_eq!(len(4), fixed + 3 * entry);
    assert_eq!(len(5), fixed + entry);
    assert_eq!(len(9), fixed + 3 * entry);
    // The end record (reason and code: 5 bytes): one region changed since the digest before.
    assert_eq!(len(10), fixed + 5 + entry);
}

#[test]
fn a_digest_record_whose_regions_do_not_make_its_root_is_corrupt() {
    let mut bytes = log_bytes(&[]);
    let starts = record_starts(&bytes);
    // The first digest's state digest (after icount, root and output digest, and the base).
    let at = starts[4] + journal::FRAME_HEADER_BYTES + 40 + 1;
    bytes[at] ^= 1;
    reframe(&mut bytes, starts[4]);
    let (read, stop) = read_all(&bytes).unwrap();
    assert_eq!(read.len(), 4);
    let message = stop.unwrap().to_string();
    assert!(
        message
            .starts_with(&format!("corrupt record at byte {}: its region digests make the machine digest ", starts[4])),
        "{message}"
    );
    assert!(message.contains(", but it records "), "{message}");
}

#[test]
fn a_digest_record_listing_more_regions_than_the_headers_machine_has_is_refused_before_it_is_read() {
    let big = RegionDigests { state: 1, ram: vec![0x5; 4096], disk: vec![] };
    let empty = RegionDigests { state: 1, ram: vec![0; 4096], disk: vec![] };
    let line = |regions: &RegionDigests| {
        let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
        w.digest(StateDigest { icount: 1, machine: regions.root().0, outputs: 0 }, regions).unwrap();
        read_all(&w.into_inner().unwrap()).unwrap().1.unwrap().to_string()
    };
    let first = record_starts(&LogWriter::new(Vec::new(), &header()).unwrap().into_inner().unwrap())[0];
    // 256 MiB of RAM and a disk of one region: 257 regions (and one more of each allowed).
    assert_eq!(
        line(&big),
        format!(
            "corrupt record at byte {first}: a digest record of {} bytes, more than the {} the region digests of \
             the log's RAM and disk need",
            40 + 33 + 4096 * 20,
            40 + 33 + 259 * 20
        )
    );
    assert_eq!(
        line(&empty),
        format!(
            "corrupt record at byte {first}: its region digests list 4096 RAM and 0 disk regions, more than the 259 \
             the log's RAM and disk have"
        )
    );
}

#[test]
fn after_a_seek_past_a_snapshot_digest_records_carry_their_regions_and_elsewhere_none_until_the_next() {
    let bytes = log_bytes(&[1; 100]);
    let starts = record_starts(&bytes);
    let whole = read_all(&bytes).unwrap().0;
    let mut reader = LogReader::new(Cursor::new(&bytes)).unwrap();
    // Right after the delta record (where `ftvm replay --until` starts reading).
    reader.seek_to_record(starts[8] as u64, 600).unwrap();
    let after: Vec<Record> = std::iter::from_fn(|| reader.next_record().unwrap()).collect();
    assert_eq!(after, whole[8..]);
    // Right after the first digest: the second lists changes against a digest not read.
    reader.seek_to_record(starts[5] as u64, 550).unwrap();
    let Some(Record::Digest { state, regions: None }) = reader.next_record().unwrap() else {
        panic!("regions listed against a digest record not read")
    };
    assert_eq!(state.icount, 600);
}

#[test]
fn a_writer_refuses_region_digests_that_do_not_make_the_machine_digest() {
    let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
    let regions = regions(1, &[]);
    let state = StateDigest { icount: 5, machine: regions.root().0 ^ 1, outputs: 0 };
    let err = w.digest(state, &regions).unwrap_err().to_string();
    assert!(err.starts_with("cannot record this run: region digests whose root is "), "{err}");
}
