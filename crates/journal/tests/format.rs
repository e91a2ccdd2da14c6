//! The input log's format from the outside: what a writer writes a reader reads back;
//! a log cut anywhere yields its whole records, then says where it was cut; a damaged
//! byte anywhere is caught and named with its record's offset; another version and
//! other images are refused with one line.

use journal::{
    DiskImage, EndReason, ImageFile, JournalError, LogHeader, LogReader, LogWriter, Record, Start, StateDigest,
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

fn records() -> Vec<Record> {
    let input = |icount, kind| Record::Input(Input { icount, kind });
    vec![
        input(0, InputKind::ClockRate { icount_per_tick: 12 }),
        input(10, InputKind::Entropy(vec![7; 64])),
        input(10, InputKind::Console(b"ls\n".to_vec())),
        input(500, InputKind::IdleSkip { ticks: 1000 }),
        Record::Digest(StateDigest { icount: 600, machine: 0x1234, outputs: 0x5678 }),
        input(700, InputKind::NetFrame(vec![0xff; 1514])),
        Record::End {
            state: StateDigest { icount: 800, machine: 1, outputs: 2 },
            reason: EndReason::PowerOff { code: 3 },
        },
    ]
}

/// A log of `records()`, with a snapshot record of `snapshot` bytes after the digest, and a
/// snapshot delta after it.
fn log_bytes(snapshot: &[u8]) -> Vec<u8> {
    let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
    for record in records() {
        match record {
            Record::Input(input) => w.input(&input).unwrap(),
            Record::Digest(d) => {
                w.digest(d).unwrap();
                w.snapshot(d.icount, snapshot).unwrap();
                w.delta(d.icount, DELTA).unwrap();
            }
            Record::End { state, reason } => w.end(state, reason).unwrap(),
            Record::Snapshot { .. } | Record::Delta { .. } => unreachable!(),
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
    let Record::Snapshot { icount, section } = read[5] else { panic!("no snapshot in {read:?}") };
    assert_eq!(icount, 600);
    assert_eq!(&bytes[section.offset as usize..][..section.len as usize], &snapshot[..]);
    let Record::Delta { icount, section } = read[6] else { panic!("no delta in {read:?}") };
    assert_eq!(icount, 600);
    assert_eq!(&bytes[section.offset as usize..][..section.len as usize], DELTA);
    expected.insert(5, read[5].clone());
    expected.insert(6, read[6].clone());
    assert_eq!(read, expected);
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
    assert_eq!(err.to_string(), "input log format version 9; this ftvm reads version 2");
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
