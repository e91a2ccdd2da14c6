use std::os::unix::fs::MetadataExt;
use std::process::Command;

use super::*;
use crate::VmState;

/// A fresh directory for one test, removed when the test ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("ftvm-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn store(&self) -> FileStore {
        FileStore::open(&self.0).unwrap()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn active(generation: u64, owner: &str) -> OwnershipRecord {
    OwnershipRecord { generation, owner: owner.to_string(), state: VmState::Active }
}

/// Reads the current generation and tries to raise it by one; the generation won, if any.
fn try_to_win(store: &mut FileStore, owner: &str) -> Option<u64> {
    let expected = store.read("vm").unwrap().map(|r| r.generation);
    let next = expected.map_or(1, |g| g + 1);
    match store.compare_and_swap("vm", expected, &active(next, owner)).unwrap() {
        SwapOutcome::Swapped(record) => Some(record.generation),
        SwapOutcome::Conflict(_) => None,
    }
}

/// Every generation from 1 to the final one was won exactly once.
fn assert_one_winner_per_generation(mut won: Vec<u64>, final_generation: u64) {
    won.sort_unstable();
    assert_eq!(won, (1..=final_generation).collect::<Vec<_>>(), "a generation was won twice or skipped");
}

#[test]
fn open_creates_the_directory() {
    let dir = TempDir::new("create");
    let nested = dir.0.join("a/b");
    assert!(!nested.exists());
    FileStore::open(&nested).unwrap();
    assert!(nested.is_dir());
}

#[test]
fn a_swap_writes_one_json_line_that_a_new_store_reads_back() {
    let dir = TempDir::new("roundtrip");
    let mut store = dir.store();
    let ended = OwnershipRecord { generation: 2, owner: "host-a".into(), state: VmState::Ended { exit_code: 3 } };
    store.compare_and_swap("web-1", None, &active(1, "host-a")).unwrap();
    assert_eq!(store.compare_and_swap("web-1", Some(1), &ended).unwrap(), SwapOutcome::Swapped(ended.clone()));
    let text = std::fs::read_to_string(dir.0.join("web-1.json")).unwrap();
    let crc = checksum("web-1", &ended);
    assert_eq!(
        text,
        format!(
            "{{\"format\":\"ftvm-ownership\",\"version\":1,\"vm_id\":\"web-1\",\"record\":{{\"generation\":2,\
             \"owner\":\"host-a\",\"state\":{{\"state\":\"ended\",\"exit_code\":3}}}},\"crc32c\":\"{crc:08x}\"}}\n"
        )
    );
    assert_eq!(dir.store().read("web-1").unwrap(), Some(ended));
    assert!(!dir.0.join("web-1.json.tmp").exists());
}

#[test]
fn a_missing_record_reads_as_none() {
    let dir = TempDir::new("missing");
    assert_eq!(dir.store().read("vm").unwrap(), None);
}

#[test]
fn a_conflict_returns_the_current_record_and_changes_nothing() {
    let dir = TempDir::new("conflict");
    let mut a = dir.store();
    let mut b = dir.store();
    a.compare_and_swap("vm", None, &active(1, "a")).unwrap();
    a.compare_and_swap("vm", Some(1), &active(2, "a")).unwrap();
    assert_eq!(
        b.compare_and_swap("vm", Some(1), &active(2, "b")).unwrap(),
        SwapOutcome::Conflict(Some(active(2, "a")))
    );
    assert_eq!(b.compare_and_swap("vm", None, &active(1, "b")).unwrap(), SwapOutcome::Conflict(Some(active(2, "a"))));
    assert_eq!(b.compare_and_swap("other", Some(2), &active(3, "b")).unwrap(), SwapOutcome::Conflict(None));
    assert_eq!(a.read("vm").unwrap(), Some(active(2, "a")));
    assert_eq!(a.read("other").unwrap(), None);
}

#[test]
fn a_bad_generation_is_refused_before_the_store_is_touched() {
    let dir = TempDir::new("badgen");
    let error = dir.store().compare_and_swap("vm", Some(1), &active(3, "a")).unwrap_err();
    assert!(matches!(error, StoreError::BadGeneration { expected: Some(1), found: 3, .. }), "{error}");
    assert!(!dir.0.join("vm.lock").exists());
}

/// How long a racer waits for the lock. These tests check that each generation has exactly one
/// winner, not how long a waiter waits: 8 threads or 4 processes taking turns, two fsyncs a
/// turn, on a loaded host's disk, once kept one waiter out past the 2 s default (the lock is
/// taken by polling, not in order). A lock never released still fails them, after this long;
/// the default bound has its own test (`a_swap_waits_a_bounded_time_for_a_held_lock`).
const RACE_LOCK_TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn threads_racing_on_one_record_get_exactly_one_winner_per_generation() {
    let dir = TempDir::new("threads");
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let mut store = dir.store().with_lock_timeout(RACE_LOCK_TIMEOUT);
            std::thread::spawn(move || {
                let owner = format!("thread-{i}");
                (0..40).filter_map(|_| try_to_win(&mut store, &owner)).collect::<Vec<u64>>()
            })
        })
        .collect();
    let won: Vec<u64> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let final_generation = dir.store().read("vm").unwrap().unwrap().generation;
    assert_one_winner_per_generation(won, final_generation);
}

const RACE_DIR_VAR: &str = "FTVM_STORE_RACE_DIR";

/// The body of each process in the test below; does nothing when run on its own.
#[test]
fn process_race_child() {
    let Some(dir) = std::env::var_os(RACE_DIR_VAR) else { return };
    let mut store = FileStore::open(Path::new(&dir)).unwrap().with_lock_timeout(RACE_LOCK_TIMEOUT);
    let owner = format!("process-{}", std::process::id());
    for generation in (0..60).filter_map(|_| try_to_win(&mut store, &owner)) {
        println!("won {generation}");
    }
}

#[test]
fn processes_racing_on_one_record_get_exactly_one_winner_per_generation() {
    let dir = TempDir::new("processes");
    dir.store();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..4)
        .map(|_| {
            Command::new(&exe)
                .args(["--exact", "file::tests::process_race_child", "--nocapture", "--test-threads=1"])
                .env(RACE_DIR_VAR, &dir.0)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut won = Vec::new();
    for child in children {
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "a racing process failed: {}", String::from_utf8_lossy(&output.stdout));
        let stdout = String::from_utf8(output.stdout).unwrap();
        won.extend(
            stdout
                .lines()
                .filter_map(|line| line.split_once("won ").map(|(_, won)| won))
                .map(|g| g.parse::<u64>().unwrap()),
        );
    }
    let final_generation = dir.store().read("vm").unwrap().unwrap().generation;
    assert!(final_generation >= 60, "only {final_generation} swaps: did the children run?");
    assert_one_winner_per_generation(won, final_generation);
}

#[test]
fn the_lock_file_is_never_replaced() {
    let dir = TempDir::new("stable-lock");
    let mut store = dir.store();
    store.compare_and_swap("vm", None, &active(1, "a")).unwrap();
    let inode = std::fs::metadata(dir.0.join("vm.lock")).unwrap().ino();
    let record_inode = std::fs::metadata(dir.0.join("vm.json")).unwrap().ino();
    store.compare_and_swap("vm", Some(1), &active(2, "a")).unwrap();
    assert_eq!(std::fs::metadata(dir.0.join("vm.lock")).unwrap().ino(), inode);
    assert_ne!(std::fs::metadata(dir.0.join("vm.json")).unwrap().ino(), record_inode, "the record is replaced");
}

#[test]
fn a_swap_waits_a_bounded_time_for_a_held_lock() {
    let dir = TempDir::new("held");
    let store = dir.store().with_lock_timeout(Duration::from_millis(30));
    let held = store.lock("vm").unwrap();
    let error = store.clone().compare_and_swap("vm", None, &active(1, "a")).unwrap_err();
    let StoreError::LockTimeout { waited_ms, .. } = error else { panic!("{error}") };
    assert!(waited_ms >= 30);
    assert_eq!(
        error_text(store.clone().compare_and_swap("vm", None, &active(1, "a")))
            .replace(&format!("{waited_ms} ms"), "N ms")
            .split(" after ")
            .next()
            .unwrap(),
        format!("ownership store {}: its lock is still held by another process", dir.0.join("vm.lock").display())
    );
    drop(held);
    assert!(matches!(store.clone().compare_and_swap("vm", None, &active(1, "a")).unwrap(), SwapOutcome::Swapped(_)));
}

fn error_text<T: std::fmt::Debug>(result: Result<T, StoreError>) -> String {
    result.unwrap_err().to_string()
}

#[test]
fn a_crash_between_the_temporary_write_and_the_rename_leaves_the_old_record() {
    let dir = TempDir::new("crash");
    let mut store = dir.store();
    store.compare_and_swap("vm", None, &active(1, "a")).unwrap();
    CRASH_BEFORE_RENAME.with(|crash| crash.set(true));
    assert!(matches!(store.compare_and_swap("vm", Some(1), &active(2, "b")), Err(StoreError::Io { .. })));
    assert!(dir.0.join("vm.json.tmp").exists(), "the crash left its temporary file");
    let mut after_restart = dir.store();
    assert_eq!(after_restart.read("vm").unwrap(), Some(active(1, "a")));
    assert_eq!(
        after_restart.compare_and_swap("vm", Some(1), &active(2, "c")).unwrap(),
        SwapOutcome::Swapped(active(2, "c"))
    );
    assert_eq!(after_restart.read("vm").unwrap(), Some(active(2, "c")));
}

/// Writes `contents` as the record of "vm" and returns the error reading it gives, with the
/// directory's path replaced by DIR.
fn read_error(dir: &TempDir, contents: &[u8]) -> String {
    std::fs::write(dir.0.join("vm.json"), contents).unwrap();
    let read = error_text(dir.store().read("vm"));
    let swap = error_text(dir.store().compare_and_swap("vm", Some(1), &active(2, "a")));
    assert_eq!(read, swap, "a swap refuses the file as a read does");
    read.replace(&dir.0.display().to_string(), "DIR")
}

const ADVICE: &str = "; stop every replica of this VM and restore or delete the file";

#[test]
fn a_damaged_record_file_is_an_exact_error_naming_it() {
    let dir = TempDir::new("damaged");
    dir.store().compare_and_swap("vm", None, &active(1, "a")).unwrap();
    let good = std::fs::read(dir.0.join("vm.json")).unwrap();
    let crc = checksum("vm", &active(1, "a"));
    let prefix = "ownership record DIR/vm.json is corrupt: ";
    let cases: [(Vec<u8>, String); 7] = [
        (good[..40].to_vec(), "not an ownership record file (EOF while parsing a string at line 1 column 40)".into()),
        (Vec::new(), "not an ownership record file (EOF while parsing a value at line 1 column 0)".into()),
        (vec![0xff; 10], "not an ownership record file (expected value at line 1 column 1)".into()),
        (
            String::from_utf8(good.clone()).unwrap().replace("\"generation\":1", "\"generation\":9").into_bytes(),
            format!("checksum {crc:08x} does not match its contents ({:08x})", checksum("vm", &active(9, "a"))),
        ),
        (
            String::from_utf8(good.clone()).unwrap().replace("ftvm-ownership", "ftvm-lease").into_bytes(),
            "format \"ftvm-lease\" where \"ftvm-ownership\" was expected".into(),
        ),
        (
            String::from_utf8(good.clone()).unwrap().replace(&format!("{crc:08x}"), "xyz").into_bytes(),
            "checksum \"xyz\" is not 8 hex digits".into(),
        ),
        (
            String::from_utf8(good.clone()).unwrap().replace("\"owner\"", "\"holder\"").into_bytes(),
            "malformed record (missing field `owner` at line 1 column 117)".into(),
        ),
    ];
    for (contents, what) in cases {
        assert_eq!(read_error(&dir, &contents), format!("{prefix}{what}{ADVICE}"));
    }
}

#[test]
fn an_oversized_record_file_is_refused_before_it_is_parsed() {
    let dir = TempDir::new("oversized");
    let mut contents = vec![b' '; MAX_RECORD_FILE_BYTES as usize];
    contents.extend_from_slice(b"{}");
    assert_eq!(
        read_error(&dir, &contents),
        format!("ownership record DIR/vm.json is corrupt: larger than 4096 bytes{ADVICE}")
    );
}

#[test]
fn a_record_of_another_format_version_is_named_as_such() {
    let dir = TempDir::new("version");
    assert_eq!(
        read_error(&dir, br#"{"format":"ftvm-ownership","version":2,"owners":[]}"#),
        "ownership record DIR/vm.json has format version 2; this ftvm reads version 1 only"
    );
}

#[test]
fn a_record_copied_under_another_vms_name_is_refused() {
    let dir = TempDir::new("copied");
    let mut store = dir.store();
    store.compare_and_swap("web-1", None, &active(1, "a")).unwrap();
    let contents = std::fs::read(dir.0.join("web-1.json")).unwrap();
    assert_eq!(
        read_error(&dir, &contents),
        format!("ownership record DIR/vm.json is corrupt: it holds the record of VM \"web-1\"{ADVICE}")
    );
}

#[test]
fn a_directory_that_cannot_be_created_is_an_io_error_naming_it() {
    let dir = TempDir::new("io");
    let file = dir.0.join("plain-file");
    std::fs::write(&file, b"").unwrap();
    let error = FileStore::open(&file.join("sub")).unwrap_err();
    assert!(matches!(&error, StoreError::Io { .. }));
    assert_eq!(
        error.to_string(),
        format!("ownership store {}: cannot create its directory", file.join("sub").display())
    );
    let error = FileStore::open(&file).unwrap_err();
    assert_eq!(error.to_string(), format!("ownership store {}: cannot create its directory", file.display()));
    assert!(std::error::Error::source(&error).is_some(), "the cause is kept as the source");
}

#[test]
fn bad_vm_ids_never_reach_the_filesystem() {
    let dir = TempDir::new("vmid");
    let mut store = dir.store();
    assert!(matches!(store.read("../escape"), Err(StoreError::BadVmId { .. })));
    assert!(matches!(store.compare_and_swap("../escape", None, &active(1, "a")), Err(StoreError::BadVmId { .. })));
    assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 0);
}

#[test]
fn a_visible_swap_is_seen_by_every_reader_and_decided_like_a_durable_one() {
    let dir = TempDir::new("visible");
    let (mut a, mut b) = (dir.store(), dir.store());
    a.compare_and_swap("vm", None, &active(1, "source")).unwrap();
    let swapped = a.compare_and_swap_visible("vm", Some(1), &active(2, "destination")).unwrap();
    assert_eq!(swapped, SwapOutcome::Swapped(active(2, "destination")));
    // Before the sync, another store on the directory reads the new record and loses a swap
    // from the old generation.
    assert_eq!(b.read("vm").unwrap(), Some(active(2, "destination")));
    let lost = b.compare_and_swap_visible("vm", Some(1), &active(2, "source")).unwrap();
    assert_eq!(lost, SwapOutcome::Conflict(Some(active(2, "destination"))));
    a.sync("vm").unwrap();
    assert_eq!(b.read("vm").unwrap(), Some(active(2, "destination")));
    assert!(matches!(a.sync("../x"), Err(StoreError::BadVmId { .. })), "the id is checked");
}
