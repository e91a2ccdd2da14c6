//! The input log read as an outsider would break it: records forged with valid checksums
//! (an icount far past the one before, or going back; region counts no machine has; a
//! header naming absurd sizes; a log that starts from a snapshot it does not hold), logs
//! cut in the middle of every kind of record, a log read while it is being written, and a
//! seeded fuzzer that damages a log and its checksums alike. Each gets one line naming the
//! problem and the offset or icount; never a panic, a hang, or memory use proportional to a
//! number in the file.
//!
//! The fuzzer runs 3 s by default; `JOURNAL_FUZZ_SECONDS=300 JOURNAL_FUZZ_SEED=N` runs it
//! longer from a given seed (it prints the seed it uses).

use journal::replay::Replayer;
use journal::{
    DiskImage, EndReason, ImageFile, JournalError, LogHeader, LogReader, LogWriter, Record, RegionDigests, Start,
    StateDigest, FRAME_HEADER_BYTES, MAX_RECORD_GAP_ICOUNT, PREAMBLE_BYTES,
};
use machine::{Input, InputKind, Machine, MachineConfig};
use seeded::SeededRng;
use std::io::Cursor;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

fn header() -> LogHeader {
    LogHeader {
        start: Start::Boot,
        ram_size: 16 << 20,
        icount_per_tick: 10,
        boot_unix_ns: 1_764_000_000_000_000_000,
        reboot_on_reset: false,
        net_mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
        seed: None,
        bootargs: "console=ttyS0".into(),
        kernel: ImageFile { path: "/images/Image".into(), size_bytes: 4096, sha256: [1; 32] },
        initrd: None,
        disk: Some(DiskImage { path: "run.log.disk".into(), read_only: false, sectors: 8192, digest: 9 }),
    }
}

/// Region digests of the header's machine (16 RAM regions, 4 disk regions).
fn regions(state: u128, ram0: u128) -> RegionDigests {
    let mut ram = vec![0; 16];
    ram[0] = ram0;
    ram[3] = 0x3333;
    RegionDigests { state, ram, disk: vec![0xd15c, 0, 0, 0] }
}

fn digest(w: &mut LogWriter<Vec<u8>>, icount: u64, state: u128) {
    let regions = regions(state, icount as u128);
    w.digest(StateDigest { icount, machine: regions.root().0, outputs: 5 }, &regions).unwrap();
}

/// A log with a record of every kind: inputs of every tag, digests, a snapshot, a delta, the end.
fn log() -> Vec<u8> {
    let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
    let input = |icount, kind| Input { icount, kind };
    w.input(&input(0, InputKind::ClockRate { icount_per_tick: 12 })).unwrap();
    w.input(&input(10, InputKind::Entropy(vec![7; 64]))).unwrap();
    w.input(&input(20, InputKind::Console(b"ls\n".to_vec()))).unwrap();
    digest(&mut w, 100, 1);
    w.input(&input(150, InputKind::IdleSkip { ticks: 1000 })).unwrap();
    w.snapshot(200, &b"snapshot bytes ".repeat(300)).unwrap();
    digest(&mut w, 250, 2);
    w.input(&input(300, InputKind::NetFrame(vec![0xff; 600]))).unwrap();
    w.delta(400, b"the pages that changed").unwrap();
    digest(&mut w, 450, 3);
    let end = regions(4, 500);
    w.end(StateDigest { icount: 500, machine: end.root().0, outputs: 6 }, &end, EndReason::PowerOff { code: 0 })
        .unwrap();
    w.into_inner().unwrap()
}

/// Every record a reader hands out, then how it stopped (None: a clean end).
fn read_all(bytes: &[u8]) -> (Vec<Record>, Option<JournalError>) {
    let mut reader = match LogReader::new(Cursor::new(bytes)) {
        Ok(reader) => reader,
        Err(e) => return (Vec::new(), Some(e)),
    };
    let mut out = Vec::new();
    loop {
        match reader.next_record() {
            Ok(Some(record)) => out.push(record),
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(e)),
        }
    }
}

fn error_line(bytes: &[u8]) -> String {
    read_all(bytes).1.expect("the reader refuses the log").to_string()
}

/// The offsets where each record starts (the header's first), and where the log ends.
fn record_starts(bytes: &[u8]) -> Vec<usize> {
    let mut starts = vec![PREAMBLE_BYTES];
    let mut at = PREAMBLE_BYTES;
    while at + FRAME_HEADER_BYTES <= bytes.len() {
        let len = u64::from_le_bytes(bytes[at + 4..at + 12].try_into().unwrap()) as usize;
        at += FRAME_HEADER_BYTES + len;
        starts.push(at);
    }
    starts
}

/// A frame of `kind` around `payload`, with the checksums right (a forger's record).
fn frame(kind: u32, payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(FRAME_HEADER_BYTES + payload.len());
    bytes.extend_from_slice(&kind.to_le_bytes());
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    let crc = crc32c::crc32c(&bytes[..16]);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

/// Sets the checksums of the record at `start` to fit its bytes (as far as they are there).
fn reframe(bytes: &mut [u8], start: usize) {
    if start + FRAME_HEADER_BYTES > bytes.len() {
        return;
    }
    let len = u64::from_le_bytes(bytes[start + 4..start + 12].try_into().unwrap());
    let payload = start + FRAME_HEADER_BYTES;
    let end = payload.saturating_add(len.min(bytes.len() as u64) as usize).min(bytes.len());
    let crc = crc32c::crc32c(&bytes[payload..end]);
    bytes[start + 12..start + 16].copy_from_slice(&crc.to_le_bytes());
    let crc = crc32c::crc32c(&bytes[start..start + 16]);
    bytes[start + 16..start + 20].copy_from_slice(&crc.to_le_bytes());
}

/// The log's header and the records given, forged.
fn forged(records: &[Vec<u8>]) -> Vec<u8> {
    let mut bytes = LogWriter::new(Vec::new(), &header()).unwrap().into_inner().unwrap();
    for record in records {
        bytes.extend_from_slice(record);
    }
    bytes
}

fn input_record(icount: u64, kind: InputKind) -> Vec<u8> {
    let mut payload = Vec::new();
    journal::encode_input(&Input { icount, kind }, &mut payload);
    frame(2, &payload)
}

#[test]
fn a_record_far_past_the_one_before_is_refused_naming_its_offset_and_icount() {
    let far = MAX_RECORD_GAP_ICOUNT + 1 + 20;
    let bytes =
        forged(&[input_record(20, InputKind::Console(b"a".to_vec())), input_record(far, InputKind::Entropy(vec![1]))]);
    let second = record_starts(&bytes)[2];
    assert_eq!(
        error_line(&bytes),
        format!(
            "corrupt record at byte {second}: its icount {far} is {} past the previous record's 20, more than the \
             {MAX_RECORD_GAP_ICOUNT} a recorder leaves between two records",
            MAX_RECORD_GAP_ICOUNT + 1
        )
    );
    // As far as the gap allows is fine.
    let bytes = forged(&[input_record(MAX_RECORD_GAP_ICOUNT, InputKind::Console(b"a".to_vec()))]);
    assert!(read_all(&bytes).1.is_none());
}

#[test]
fn a_writer_refuses_to_leave_a_gap_its_reader_would_refuse() {
    let mut w = LogWriter::new(Vec::new(), &header()).unwrap();
    w.input(&Input { icount: 5, kind: InputKind::Console(b"a".to_vec()) }).unwrap();
    let far = 5 + MAX_RECORD_GAP_ICOUNT + 1;
    let err = w.input(&Input { icount: far, kind: InputKind::Console(b"b".to_vec()) }).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "cannot record this run: icount {far} is {} past the record at icount 5, more than the \
             {MAX_RECORD_GAP_ICOUNT} a log may leave between two records (write a digest record in between)",
            MAX_RECORD_GAP_ICOUNT + 1
        )
    );
    assert_eq!(w.last_icount(), 5);
}

#[test]
fn a_record_whose_icount_goes_back_is_refused_after_the_records_before_it() {
    let bytes = forged(&[
        input_record(500, InputKind::Console(b"a".to_vec())),
        input_record(499, InputKind::Console(b"b".to_vec())),
    ]);
    let (read, stop) = read_all(&bytes);
    assert_eq!(read.len(), 1);
    let second = record_starts(&bytes)[2];
    assert_eq!(
        stop.unwrap().to_string(),
        format!("corrupt record at byte {second}: its icount 499 is before the previous record's 500")
    );
}

/// A digest payload: icount, root, outputs, then region digests listed against "all empty".
fn digest_payload(icount: u64, ram_count: u32, disk_count: u32) -> Vec<u8> {
    let mut payload = Vec::new();
    payload.extend_from_slice(&icount.to_le_bytes());
    payload.extend_from_slice(&[0; 32]);
    payload.push(0);
    payload.extend_from_slice(&[0; 16]);
    payload.extend_from_slice(&ram_count.to_le_bytes());
    payload.extend_from_slice(&disk_count.to_le_bytes());
    payload.extend_from_slice(&0u32.to_le_bytes());
    payload.extend_from_slice(&0u32.to_le_bytes());
    payload
}

#[test]
fn a_digest_record_with_absurd_region_counts_is_refused_without_allocating_them() {
    let bytes = forged(&[frame(3, &digest_payload(1, u32::MAX, u32::MAX))]);
    let first = record_starts(&bytes)[1];
    // 16 MiB of RAM and a 4 MiB disk: 20 regions, and one more of each allowed.
    assert_eq!(
        error_line(&bytes),
        format!(
            "corrupt record at byte {first}: its region digests list 4294967295 RAM and 4294967295 disk regions, \
             more than the 22 the log's RAM and disk have"
        )
    );
}

/// The header's payload with `change` applied to the header, forged as the log's first record.
fn with_header(change: impl FnOnce(&mut LogHeader)) -> Vec<u8> {
    let mut h = header();
    change(&mut h);
    let mut bytes = journal::MAGIC.to_vec();
    bytes.extend_from_slice(&journal::FORMAT_VERSION.to_le_bytes());
    let crc = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes.extend_from_slice(&frame(1, &h.encode()));
    bytes
}

#[test]
fn a_header_naming_sizes_no_machine_has_is_refused_before_any_record_is_read() {
    let line = |bytes: Vec<u8>| LogReader::new(Cursor::new(bytes)).err().expect("refused").to_string();
    assert_eq!(
        line(with_header(|h| h.ram_size = 1 << 62)),
        "corrupt record at byte 16: the header's RAM size 4611686018427387904 is not a multiple of 4 KiB from \
         16777216 to 68719476736"
    );
    assert_eq!(
        line(with_header(|h| h.ram_size = (16 << 20) + 1)),
        "corrupt record at byte 16: the header's RAM size 16777217 is not a multiple of 4 KiB from 16777216 to \
         68719476736"
    );
    assert_eq!(
        line(with_header(|h| h.disk.as_mut().unwrap().sectors = u64::MAX)),
        "corrupt record at byte 16: the header's disk of 18446744073709551615 sectors is larger than the \
         4398046511104 bytes a log may name"
    );
    let mut bytes = with_header(|_| {});
    bytes[PREAMBLE_BYTES + FRAME_HEADER_BYTES] = 7; // the start field
    reframe(&mut bytes, PREAMBLE_BYTES);
    assert_eq!(line(bytes), "corrupt record at byte 16: the header's start is 7, neither 0 (boot) nor 1 (a snapshot)");
}

#[test]
fn a_log_that_starts_from_a_snapshot_must_hold_it_first() {
    let mut bytes = with_header(|h| h.start = Start::Snapshot { icount: 1000 });
    let at = bytes.len();
    bytes.extend_from_slice(&input_record(1000, InputKind::Console(b"x".to_vec())));
    assert_eq!(
        error_line(&bytes),
        format!(
            "corrupt record at byte {at}: the header says the run starts from a snapshot at icount 1000, but the \
             first record is an input record at icount 1000"
        )
    );
    let mut payload = 999u64.to_le_bytes().to_vec();
    payload.extend_from_slice(b"state");
    bytes.truncate(at);
    bytes.extend_from_slice(&frame(4, &payload));
    assert_eq!(
        error_line(&bytes),
        format!("corrupt record at byte {at}: its icount 999 is before the previous record's 1000")
    );
}

#[test]
fn a_snapshot_whose_length_runs_past_the_end_of_the_file_is_a_cut_naming_its_offset() {
    let mut payload = 5u64.to_le_bytes().to_vec();
    payload.extend_from_slice(&[0xab; 100]);
    let mut record = frame(4, &payload);
    // The length says a terabyte (the frame's own checksum fixed to fit).
    record[4..12].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let crc = crc32c::crc32c(&record[..16]);
    record[16..20].copy_from_slice(&crc.to_le_bytes());
    let bytes = forged(&[record]);
    let first = record_starts(&bytes)[1];
    let started = Instant::now();
    assert_eq!(
        error_line(&bytes),
        format!("the log is cut short at byte {first}: the snapshot record there lacks {} bytes", (1u64 << 40) - 108)
    );
    assert!(started.elapsed() < Duration::from_secs(5), "streamed past, not allocated");
}

#[test]
fn a_header_whose_disk_size_is_not_the_disk_files_is_for_another_disk() {
    let dir = std::env::temp_dir().join(format!("journal-hostile-sectors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut config = spinning_config(&dir);
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![7u8; 1 << 20]).unwrap();
    config.disk = Some(machine::DiskConfig { path: disk.clone(), read_only: false });
    let mut h = LogHeader::for_boot(&config, Some(("disk.img", &disk))).unwrap();
    h.check_images(&config, Some(&disk)).unwrap();
    h.disk.as_mut().unwrap().sectors = 4096;
    assert_eq!(
        h.check_images(&config, Some(&disk)).unwrap_err().to_string(),
        format!(
            "the log was recorded with another disk: {} has 2048 sectors, the header says the disk at the \
             recording's start had 4096",
            disk.display()
        )
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_log_cut_in_the_middle_of_each_kind_of_record_names_the_cut_after_every_whole_record() {
    let bytes = log();
    let starts = record_starts(&bytes);
    let whole = read_all(&bytes).0;
    assert_eq!(whole.len(), starts.len() - 2, "every record but the header");
    for (i, pair) in starts.windows(2).enumerate() {
        let (start, end) = (pair[0], pair[1]);
        for cut in [start + 1, start + FRAME_HEADER_BYTES - 1, start + FRAME_HEADER_BYTES, end - 1] {
            let (read, stop) = read_all(&bytes[..cut]);
            let stop = stop.unwrap_or_else(|| panic!("a log cut at {cut} read to its end"));
            assert!(matches!(stop, JournalError::Truncated { offset, .. } if offset == start as u64), "{stop}");
            assert_eq!(read, whole[..i.saturating_sub(1)], "the whole records before the cut at {cut}");
        }
    }
}

#[test]
fn bytes_after_the_end_record_are_refused_naming_where_they_start() {
    let mut bytes = log();
    let end = bytes.len();
    assert!(read_all(&bytes).1.is_none());
    bytes.extend_from_slice(&input_record(600, InputKind::Console(b"appended".to_vec())));
    let (read, stop) = read_all(&bytes);
    assert!(matches!(read.last(), Some(Record::End { .. })), "every record up to the end: {read:?}");
    assert_eq!(
        stop.unwrap().to_string(),
        format!("corrupt record at byte {end}: there are bytes after the end record")
    );
}

#[test]
fn a_log_read_while_it_is_written_yields_what_is_whole_and_then_the_rest() {
    let dir = std::env::temp_dir().join(format!("journal-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("live.log");
    let mut w = LogWriter::create(&path, &header()).unwrap();
    w.input(&Input { icount: 1, kind: InputKind::Console(b"a".to_vec()) }).unwrap();
    w.flush().unwrap();
    // The writer's half-written next record: the reader stops at a cut, naming it.
    let mut reader = LogReader::open_path(&path).unwrap();
    assert!(matches!(reader.next_record().unwrap(), Some(Record::Input(_))));
    assert!(reader.next_record().unwrap().is_none(), "on a record boundary: no more yet");
    {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&input_record(2, InputKind::Console(b"b".to_vec()))[..10]).unwrap();
    }
    let mut reader = LogReader::open_path(&path).unwrap();
    reader.next_record().unwrap();
    let err = reader.next_record().unwrap_err();
    assert!(matches!(err, JournalError::Truncated { .. }), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A machine whose kernel is one instruction, `j .` (a guest that never idles), 16 MiB of RAM.
fn spinning_config(dir: &std::path::Path) -> MachineConfig {
    let mut image = vec![0u8; 4096];
    image[0..4].copy_from_slice(&0x0000_006fu32.to_le_bytes());
    image[8..16].copy_from_slice(&0x20_0000u64.to_le_bytes());
    image[16..24].copy_from_slice(&4096u64.to_le_bytes());
    image[56..60].copy_from_slice(b"RSC\x05");
    let kernel = dir.join("Image");
    std::fs::write(&kernel, image).unwrap();
    let mut config = MachineConfig::new(kernel);
    config.ram_size = 16 << 20;
    config
}

#[test]
fn a_hostile_icount_never_makes_a_replay_run_the_machine_that_far() {
    let dir = std::env::temp_dir().join(format!("journal-hostile-spin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = spinning_config(&dir);
    let mut h = LogHeader::for_boot(&config, None).unwrap();
    h.boot_unix_ns = 0;
    let mut bytes = LogWriter::new(Vec::new(), &h).unwrap().into_inner().unwrap();
    bytes.extend_from_slice(&input_record(1000, InputKind::Console(b"a".to_vec())));
    bytes.extend_from_slice(&input_record(u64::MAX / 2, InputKind::Console(b"b".to_vec())));
    let started = Instant::now();
    let mut reader = LogReader::new(Cursor::new(&bytes)).unwrap();
    let mut replayer = Replayer::new(Machine::new(&config).unwrap());
    let err = loop {
        match reader.next_record() {
            Ok(Some(record)) => replayer.apply(&record, None, &mut |_| {}).unwrap(),
            Ok(None) => panic!("the forged record was read"),
            Err(e) => break e,
        };
    };
    assert!(err.to_string().contains(&format!("its icount {} is ", u64::MAX / 2)), "{err}");
    assert_eq!(replayer.machine.icount(), 1000);
    assert!(started.elapsed() < Duration::from_secs(10));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The fuzzers' seed (JOURNAL_FUZZ_SEED, else from the clock) and how long they run
/// (JOURNAL_FUZZ_SECONDS, else 3), printed.
fn fuzz_seed_and_seconds() -> (u64, u64) {
    let seed = std::env::var("JOURNAL_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    let seconds = std::env::var("JOURNAL_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    println!("fuzz seed {seed} ({seconds} s; JOURNAL_FUZZ_SEED={seed} repeats it)");
    (seed, seconds)
}

/// Peak resident memory of this process, from /proc (bytes).
fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// One damage to a log: bytes flipped, a field set to an extreme, a length changed, records
/// cut, dropped, repeated or swapped, garbage records; with the checksums fixed to fit most
/// of the time (a forger's log), else left (a damaged disk's).
fn damage(rng: &mut SeededRng, log: &[u8]) -> Vec<u8> {
    let mut bytes = log.to_vec();
    let starts = record_starts(&bytes);
    let records = starts.len() - 1;
    let pick_record = |rng: &mut SeededRng| rng.below(records as u64) as usize;
    let mut touched = Vec::new();
    for _ in 0..rng.range(1, 4) {
        let r = pick_record(rng);
        let (start, end) = (starts[r], starts[r + 1].min(bytes.len()));
        match rng.below(9) {
            0 => {
                let at = rng.range(start as u64, end as u64 - 1) as usize;
                bytes[at] ^= 1 << rng.below(8);
                touched.push(start);
            }
            1 | 2 => {
                // A payload field set to an extreme: 1, 4 or 8 bytes of all-ones, zeros or random.
                let width = rng.pick(&[1usize, 4, 8]);
                let payload = start + FRAME_HEADER_BYTES;
                if end > payload + width {
                    let at = rng.range(payload as u64, (end - width) as u64) as usize;
                    let value = match rng.below(3) {
                        0 => u64::MAX,
                        1 => 0,
                        _ => rng.next_u64(),
                    };
                    bytes[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
                    touched.push(start);
                }
            }
            3 => {
                // The length changed.
                let len = match rng.below(3) {
                    0 => rng.below(64),
                    1 => rng.next_u64(),
                    _ => u64::from_le_bytes(bytes[start + 4..start + 12].try_into().unwrap()) + rng.range(1, 64),
                };
                bytes[start + 4..start + 12].copy_from_slice(&len.to_le_bytes());
                touched.push(start);
            }
            4 => {
                let cut = rng.range(start as u64, bytes.len() as u64) as usize;
                bytes.truncate(cut);
                break;
            }
            5 if r > 0 => {
                bytes.drain(start..end);
                break;
            }
            6 if r > 0 => {
                let copy = bytes[start..end].to_vec();
                let at = starts[pick_record(rng).max(1)];
                bytes.splice(at..at, copy);
                break;
            }
            7 => {
                let kind = rng.range(0, 7) as u32;
                let len = rng.below(200) as usize;
                let garbage = frame(kind, &rng.bytes(len));
                let at = starts[r.max(1)];
                bytes.splice(at..at, garbage);
                break;
            }
            _ => {
                // A record's type changed.
                let kind = rng.range(0, 7) as u32;
                bytes[start..start + 4].copy_from_slice(&kind.to_le_bytes());
                touched.push(start);
            }
        }
    }
    if rng.chance(0.8) {
        for start in touched {
            reframe(&mut bytes, start);
        }
    }
    bytes
}

#[test]
fn a_seeded_fuzzer_never_makes_the_reader_panic_hang_or_hoard_memory() {
    let (seed, seconds) = fuzz_seed_and_seconds();
    let base = log();
    let mut rng = SeededRng::new(seed);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut runs = 0u64;
    let mut kinds = std::collections::BTreeMap::<String, u64>::new();
    while Instant::now() < deadline {
        let bytes = damage(&mut rng, &base);
        let started = Instant::now();
        let outcome = std::panic::catch_unwind(|| read_all(&bytes));
        let (read, stop) = outcome.unwrap_or_else(|_| panic!("the reader panicked: seed {seed}, run {runs}"));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the reader took {:?}: seed {seed}, run {runs}",
            started.elapsed()
        );
        assert!(read.len() <= bytes.len() / FRAME_HEADER_BYTES, "seed {seed}, run {runs}");
        if let Some(e) = stop {
            let line = e.to_string();
            assert!(!line.contains('\n'), "one line: {line}: seed {seed}, run {runs}");
            let kind: String = line.chars().take_while(|c| !c.is_ascii_digit()).collect();
            *kinds.entry(kind).or_default() += 1;
        }
        runs += 1;
    }
    println!("{runs} damaged logs read; errors by their first words: {kinds:#?}");
    let peak = peak_rss_bytes();
    assert!(peak < 512 << 20, "peak resident memory {peak} bytes: seed {seed}");
}

/// Bytes of `data` damaged: a few bytes flipped, a field set to an extreme, or cut.
fn damage_bytes(rng: &mut SeededRng, data: &[u8]) -> Vec<u8> {
    let mut bytes = data.to_vec();
    for _ in 0..rng.range(1, 3) {
        if bytes.is_empty() {
            break;
        }
        // Most fields sit near the start (headers, lengths, counts): aim there half the time.
        let span = if rng.chance(0.5) { bytes.len().min(256) } else { bytes.len() } as u64;
        let at = rng.below(span) as usize;
        match rng.below(4) {
            0 => bytes[at] ^= 1 << rng.below(8),
            1 | 2 => {
                let width = rng.pick(&[1usize, 2, 4, 8]).min(bytes.len() - at);
                let random = rng.next_u64();
                let value = rng.pick(&[u64::MAX, 0, random, 1 << 40, 0x8000_0000]);
                bytes[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
            }
            _ => bytes.truncate(at),
        }
    }
    bytes
}

/// What a seek restores from a log (`ftvm replay --until`): a machine snapshot section and a
/// snapshot delta section (a `machine::checkpoint`), damaged by a seeded generator. The log's
/// checksums only say the bytes are the ones written; a forger writes these too. Each must be
/// refused with an error, never a panic, a hang or memory a length in it asks for.
#[test]
fn a_seeded_fuzzer_never_makes_restoring_a_snapshot_or_applying_a_delta_panic_hang_or_hoard_memory() {
    let (seed, seconds) = fuzz_seed_and_seconds();
    let dir = std::env::temp_dir().join(format!("journal-hostile-sections-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut config = spinning_config(&dir);
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(1 << 20).unwrap();
    config.disk = Some(machine::DiskConfig { path: disk, read_only: false });
    config.disk_overlay = true;
    let mut machine = Machine::new(&config).unwrap();
    machine.run(10_000);
    let mut snapshot = Cursor::new(Vec::new());
    machine::snapshot::write_snapshot(&machine, &mut snapshot).unwrap();
    let snapshot = snapshot.into_inner();
    let before = machine.leaf_hashes();
    machine.run(20_000);
    machine.write_page(100, &[0x5a; 4096]).unwrap();
    machine.write_sectors(8, &[0xa5; 1024]).unwrap();
    let (pages, sectors) = machine.leaf_hashes().changed_since(&before, machine.disk_sectors().unwrap_or(0));
    let mut delta = machine::checkpoint::take_these(&machine, &pages, &sectors).unwrap();
    machine::checkpoint::add_digest(&mut delta, &machine);
    // The undamaged ones restore and apply.
    let mut restored = machine::snapshot::read_snapshot(&mut Cursor::new(&snapshot), &config).unwrap();
    machine::checkpoint::apply(&mut restored, &delta).unwrap();
    assert_eq!(restored.digest(), machine.digest());

    let mut rng = SeededRng::new(seed);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (mut runs, mut refused) = (0u64, 0u64);
    while Instant::now() < deadline {
        let started = Instant::now();
        let which = rng.chance(0.5);
        let outcome = if which {
            let bytes = damage_bytes(&mut rng, &snapshot);
            let config = &config;
            std::panic::catch_unwind(AssertUnwindSafe(|| {
                machine::snapshot::read_snapshot(&mut Cursor::new(&bytes), config).is_err()
            }))
        } else {
            let bytes = damage_bytes(&mut rng, &delta);
            let mut target = machine::snapshot::read_snapshot(&mut Cursor::new(&snapshot), &config).unwrap();
            std::panic::catch_unwind(AssertUnwindSafe(move || machine::checkpoint::apply(&mut target, &bytes).is_err()))
        };
        let what = if which { "restoring a snapshot" } else { "applying a delta" };
        let failed = outcome.unwrap_or_else(|_| panic!("{what} panicked: seed {seed}, run {runs}"));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{what} took {:?}: seed {seed}, run {runs}",
            started.elapsed()
        );
        refused += u64::from(failed);
        runs += 1;
    }
    println!("{runs} damaged sections, {refused} refused");
    let peak = peak_rss_bytes();
    assert!(peak < 1 << 30, "peak resident memory {peak} bytes: seed {seed}");
    std::fs::remove_dir_all(&dir).unwrap();
}
