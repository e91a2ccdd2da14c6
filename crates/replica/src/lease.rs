//! The takeover lease: whoever holds it may run the VM. A backup must win it before it goes
//! live, and a primary renews it and stops when it learns it has lost it, so two live
//! primaries cannot exist. [`Lease`] is the small trait; [`FileLease`] is the embedded
//! default (a lease file on storage both sides see, VMware FT's shared-storage test-and-set);
//! [`MemoryLease`] serves tests and simulations.
//!
//! Time is passed in (`now_ms`, wall-clock milliseconds in real use) so tests can drive it.
//! Each successful acquisition advances the `term`; a renewal succeeds only for the holder
//! and term on record, so a holder whose term has moved on learns it at its next renewal.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::fcntl::{Flock, FlockArg};
use thiserror::Error;

/// The longest holder name a lease accepts.
pub const MAX_HOLDER_BYTES: usize = 256;
/// A lease file larger than this is not a lease file.
const MAX_LEASE_FILE_BYTES: u64 = 4096;
const LEASE_FILE_HEADER: &str = "ftvm-lease 1";

/// What a lease says: who holds it, under which term, until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    pub holder: String,
    /// Goes up by one at every acquisition.
    pub term: u64,
    /// The holder's right ends at this time (ms); anyone may acquire from then on.
    pub expires_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcquireOutcome {
    /// The caller holds the lease now, under `record.term`.
    Acquired(LeaseRecord),
    /// Someone else holds it and it has not expired.
    Busy(LeaseRecord),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RenewOutcome {
    /// Still ours, now until `record.expires_ms`.
    Renewed(LeaseRecord),
    /// Another holder or a later term is on record (or no record at all): the caller has
    /// lost the lease and must stop.
    Lost(Option<LeaseRecord>),
}

#[derive(Debug, Error)]
pub enum LeaseError {
    #[error("lease file {path}: could not {action}: {source}")]
    Io { path: PathBuf, action: &'static str, source: std::io::Error },
    #[error(
        "lease file {path} is corrupt ({reason}); if no ftvm replica is running, delete it \
         and start again"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("lease holder name {holder:?} is invalid: use 1 to {MAX_HOLDER_BYTES} printable characters, no spaces")]
    InvalidHolder { holder: String },
}

/// A lease both replicas can reach.
pub trait Lease {
    /// Takes the lease if it is free, expired or already the caller's (the term advances in
    /// every case, so a stale incarnation under the same name is fenced off).
    fn try_acquire(&mut self, holder: &str, now_ms: u64, ttl_ms: u64) -> Result<AcquireOutcome, LeaseError>;
    /// Extends the lease if `holder` and `term` are still those on record.
    fn renew(&mut self, holder: &str, term: u64, now_ms: u64, ttl_ms: u64) -> Result<RenewOutcome, LeaseError>;
    /// The record as it stands.
    fn current_holder(&mut self) -> Result<Option<LeaseRecord>, LeaseError>;
    /// Gives the lease up at once (on a clean shutdown), if `holder` and `term` still hold it.
    fn release(&mut self, holder: &str, term: u64) -> Result<bool, LeaseError>;
}

fn check_holder(holder: &str) -> Result<(), LeaseError> {
    let valid = !holder.is_empty()
        && holder.len() <= MAX_HOLDER_BYTES
        && holder.chars().all(|c| c.is_ascii_graphic() || (!c.is_ascii() && !c.is_control() && !c.is_whitespace()));
    match valid {
        true => Ok(()),
        false => Err(LeaseError::InvalidHolder { holder: holder.to_string() }),
    }
}

/// The test-and-set, the same for every store: the new record to write, if any, and the answer.
fn decide_acquire(
    current: Option<&LeaseRecord>,
    holder: &str,
    now_ms: u64,
    ttl_ms: u64,
) -> (AcquireOutcome, Option<LeaseRecord>) {
    match current {
        Some(record) if record.holder != holder && now_ms < record.expires_ms => {
            (AcquireOutcome::Busy(record.clone()), None)
        }
        _ => {
            let term = current.map_or(0, |r| r.term) + 1;
            let record = LeaseRecord { holder: holder.to_string(), term, expires_ms: now_ms.saturating_add(ttl_ms) };
            (AcquireOutcome::Acquired(record.clone()), Some(record))
        }
    }
}

fn decide_renew(
    current: Option<&LeaseRecord>,
    holder: &str,
    term: u64,
    now_ms: u64,
    ttl_ms: u64,
) -> (RenewOutcome, Option<LeaseRecord>) {
    match current {
        // Renewing after expiry is still safe when nobody took the lease meanwhile: the term
        // on record is unchanged.
        Some(record) if record.holder == holder && record.term == term => {
            let record =
                LeaseRecord { expires_ms: now_ms.saturating_add(ttl_ms).max(record.expires_ms), ..record.clone() };
            (RenewOutcome::Renewed(record.clone()), Some(record))
        }
        other => (RenewOutcome::Lost(other.cloned()), None),
    }
}

fn decide_release(current: Option<&LeaseRecord>, holder: &str, term: u64) -> Option<LeaseRecord> {
    current.filter(|r| r.holder == holder && r.term == term).map(|r| LeaseRecord { expires_ms: 0, ..r.clone() })
}

/// A lease kept in memory and shared by cloning: for tests and simulations.
#[derive(Debug, Clone, Default)]
pub struct MemoryLease(Arc<Mutex<Option<LeaseRecord>>>);

impl MemoryLease {
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut Option<LeaseRecord>) -> T) -> T {
        let mut guard = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut guard)
    }
}

impl Lease for MemoryLease {
    fn try_acquire(&mut self, holder: &str, now_ms: u64, ttl_ms: u64) -> Result<AcquireOutcome, LeaseError> {
        check_holder(holder)?;
        Ok(self.with(|slot| {
            let (outcome, write) = decide_acquire(slot.as_ref(), holder, now_ms, ttl_ms);
            if write.is_some() {
                *slot = write;
            }
            outcome
        }))
    }

    fn renew(&mut self, holder: &str, term: u64, now_ms: u64, ttl_ms: u64) -> Result<RenewOutcome, LeaseError> {
        check_holder(holder)?;
        Ok(self.with(|slot| {
            let (outcome, write) = decide_renew(slot.as_ref(), holder, term, now_ms, ttl_ms);
            if write.is_some() {
                *slot = write;
            }
            outcome
        }))
    }

    fn current_holder(&mut self) -> Result<Option<LeaseRecord>, LeaseError> {
        Ok(self.with(|slot| slot.clone()))
    }

    fn release(&mut self, holder: &str, term: u64) -> Result<bool, LeaseError> {
        Ok(self.with(|slot| match decide_release(slot.as_ref(), holder, term) {
            Some(record) => {
                *slot = Some(record);
                true
            }
            None => false,
        }))
    }
}

/// A lease file at `path`, guarded by an exclusive `flock` on `path.lock` for each
/// read-decide-write, and replaced atomically (write `path.tmp`, fsync, rename, fsync the
/// directory) so a crash leaves either the old record or the new one.
///
/// `flock` is atomic between processes and threads on one machine; on a network filesystem
/// its guarantees are the filesystem's (NFSv4 maps it to byte-range locks). For hosts that
/// share no filesystem, put another [`Lease`] (etcd, say) behind the same trait.
#[derive(Debug)]
pub struct FileLease {
    path: PathBuf,
    lock_path: PathBuf,
    temp_path: PathBuf,
}

impl FileLease {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let with_suffix = |suffix: &str| {
            let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
            name.push(suffix);
            path.with_file_name(name)
        };
        FileLease { lock_path: with_suffix(".lock"), temp_path: with_suffix(".tmp"), path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io_error(&self, action: &'static str) -> impl FnOnce(std::io::Error) -> LeaseError + '_ {
        move |source| LeaseError::Io { path: self.path.clone(), action, source }
    }

    /// Runs `decide` on the record under the lock, and writes what it returns.
    fn transact<T>(
        &self,
        decide: impl FnOnce(Option<&LeaseRecord>) -> (T, Option<LeaseRecord>),
    ) -> Result<T, LeaseError> {
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock_path)
            .map_err(self.io_error("open its lock file"))?;
        let _guard = Flock::lock(lock_file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| self.io_error("lock it")(errno.into()))?;
        let current = self.read()?;
        let (answer, write) = decide(current.as_ref());
        if let Some(record) = write {
            self.write(&record)?;
        }
        Ok(answer)
    }

    fn read(&self) -> Result<Option<LeaseRecord>, LeaseError> {
        let file = match File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io_error("open it")(e)),
        };
        let mut bytes = Vec::new();
        file.take(MAX_LEASE_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(self.io_error("read it"))?;
        if bytes.len() as u64 > MAX_LEASE_FILE_BYTES {
            return Err(self.corrupt(format!("larger than {MAX_LEASE_FILE_BYTES} bytes")));
        }
        parse_record(&bytes).map(Some).map_err(|reason| self.corrupt(reason))
    }

    fn corrupt(&self, reason: String) -> LeaseError {
        LeaseError::Corrupt { path: self.path.clone(), reason }
    }

    fn write(&self, record: &LeaseRecord) -> Result<(), LeaseError> {
        let mut temp = File::create(&self.temp_path).map_err(self.io_error("create its temporary file"))?;
        temp.write_all(format_record(record).as_bytes()).map_err(self.io_error("write its temporary file"))?;
        temp.sync_all().map_err(self.io_error("sync its temporary file"))?;
        std::fs::rename(&self.temp_path, &self.path).map_err(self.io_error("replace it"))?;
        let dir = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        File::open(dir).and_then(|d| d.sync_all()).map_err(self.io_error("sync its directory"))
    }
}

fn record_body(record: &LeaseRecord) -> String {
    format!("{LEASE_FILE_HEADER}\nholder {}\nterm {}\nexpires_ms {}\n", record.holder, record.term, record.expires_ms)
}

fn format_record(record: &LeaseRecord) -> String {
    let body = record_body(record);
    format!("{body}crc32c {:08x}\n", crc32c::crc32c(body.as_bytes()))
}

fn parse_record(bytes: &[u8]) -> Result<LeaseRecord, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())?;
    let lines: Vec<&str> = text.lines().collect();
    let [header, holder, term, expires, crc] = lines[..] else {
        return Err(format!("{} lines where 5 were expected", lines.len()));
    };
    if header != LEASE_FILE_HEADER {
        return Err(format!("first line {header:?}, expected {LEASE_FILE_HEADER:?}"));
    }
    let value = |line: &str, name: &str| -> Result<String, String> {
        line.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(' '))
            .map(str::to_string)
            .ok_or_else(|| format!("expected a line \"{name} ...\", found {line:?}"))
    };
    let number = |line: &str, name: &str| -> Result<u64, String> {
        value(line, name)?.parse().map_err(|_| format!("{name} is not a number in {line:?}"))
    };
    let record = LeaseRecord {
        holder: value(holder, "holder")?,
        term: number(term, "term")?,
        expires_ms: number(expires, "expires_ms")?,
    };
    let crc_found =
        u32::from_str_radix(&value(crc, "crc32c")?, 16).map_err(|_| format!("bad checksum line {crc:?}"))?;
    let crc_expected = crc32c::crc32c(record_body(&record).as_bytes());
    if crc_found != crc_expected {
        return Err(format!("checksum {crc_found:08x} does not match its contents ({crc_expected:08x})"));
    }
    check_holder(&record.holder).map_err(|e| e.to_string())?;
    Ok(record)
}

impl Lease for FileLease {
    fn try_acquire(&mut self, holder: &str, now_ms: u64, ttl_ms: u64) -> Result<AcquireOutcome, LeaseError> {
        check_holder(holder)?;
        self.transact(|current| decide_acquire(current, holder, now_ms, ttl_ms))
    }

    fn renew(&mut self, holder: &str, term: u64, now_ms: u64, ttl_ms: u64) -> Result<RenewOutcome, LeaseError> {
        check_holder(holder)?;
        self.transact(|current| decide_renew(current, holder, term, now_ms, ttl_ms))
    }

    fn current_holder(&mut self) -> Result<Option<LeaseRecord>, LeaseError> {
        self.transact(|current| (current.cloned(), None))
    }

    fn release(&mut self, holder: &str, term: u64) -> Result<bool, LeaseError> {
        self.transact(|current| {
            let write = decide_release(current, holder, term);
            (write.is_some(), write)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory for one test, removed when the test ends.
    struct TempDir(PathBuf);

    impl TempDir {
        fn join(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn temp_dir(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("ftvm-lease-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn acquired(outcome: AcquireOutcome) -> LeaseRecord {
        match outcome {
            AcquireOutcome::Acquired(record) => record,
            AcquireOutcome::Busy(record) => panic!("busy: {record:?}"),
        }
    }

    #[test]
    fn a_free_lease_is_acquired_with_term_one() {
        let dir = temp_dir("free");
        let mut lease = FileLease::new(dir.join("vm.lease"));
        let record = acquired(lease.try_acquire("primary-a", 1000, 500).unwrap());
        assert_eq!(record, LeaseRecord { holder: "primary-a".into(), term: 1, expires_ms: 1500 });
        assert_eq!(lease.current_holder().unwrap(), Some(record));
    }

    #[test]
    fn a_held_lease_is_busy_until_it_expires_then_taken_with_a_new_term() {
        let dir = temp_dir("expiry");
        let path = dir.join("vm.lease");
        let mut primary = FileLease::new(&path);
        let mut backup = FileLease::new(&path);
        acquired(primary.try_acquire("primary", 0, 100).unwrap());
        assert!(
            matches!(backup.try_acquire("backup", 99, 100).unwrap(), AcquireOutcome::Busy(r) if r.holder == "primary")
        );
        let taken = acquired(backup.try_acquire("backup", 100, 100).unwrap());
        assert_eq!(taken.term, 2);
        assert_eq!(primary.renew("primary", 1, 101, 100).unwrap(), RenewOutcome::Lost(Some(taken)));
    }

    #[test]
    fn renewal_extends_the_holders_lease() {
        let dir = temp_dir("renew");
        let mut lease = FileLease::new(dir.join("vm.lease"));
        acquired(lease.try_acquire("p", 0, 100).unwrap());
        let renewed = lease.renew("p", 1, 80, 100).unwrap();
        assert_eq!(renewed, RenewOutcome::Renewed(LeaseRecord { holder: "p".into(), term: 1, expires_ms: 180 }));
    }

    #[test]
    fn reacquiring_under_the_same_name_fences_the_older_incarnation() {
        let dir = temp_dir("same-name");
        let mut lease = FileLease::new(dir.join("vm.lease"));
        acquired(lease.try_acquire("p", 0, 100).unwrap());
        assert_eq!(acquired(lease.try_acquire("p", 10, 100).unwrap()).term, 2);
        assert!(matches!(lease.renew("p", 1, 20, 100).unwrap(), RenewOutcome::Lost(_)));
    }

    #[test]
    fn release_frees_the_lease_at_once() {
        let dir = temp_dir("release");
        let path = dir.join("vm.lease");
        let mut a = FileLease::new(&path);
        acquired(a.try_acquire("a", 0, 1000).unwrap());
        assert!(a.release("a", 1).unwrap());
        assert_eq!(acquired(FileLease::new(&path).try_acquire("b", 1, 1000).unwrap()).term, 2);
    }

    #[test]
    fn racing_acquirers_on_one_file_get_exactly_one_lease_per_term() {
        let dir = temp_dir("race");
        let path = dir.join("vm.lease");
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let mut lease = FileLease::new(path);
                    let name = format!("node-{i}");
                    (0..20)
                        .filter_map(|round| match lease.try_acquire(&name, round * 1000, 1000).unwrap() {
                            AcquireOutcome::Acquired(record) => Some(record.term),
                            AcquireOutcome::Busy(_) => None,
                        })
                        .collect::<Vec<u64>>()
                })
            })
            .collect();
        let mut terms: Vec<u64> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        let won = terms.len();
        terms.sort_unstable();
        terms.dedup();
        assert_eq!(terms.len(), won, "two acquirers were granted the same term");
        assert_eq!(terms, (1..=won as u64).collect::<Vec<_>>());
    }

    #[test]
    fn racing_acquirers_at_one_instant_get_one_winner() {
        let dir = temp_dir("instant");
        let path = dir.join("vm.lease");
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || {
                    matches!(
                        FileLease::new(path).try_acquire(&format!("n{i}"), 5, 1000).unwrap(),
                        AcquireOutcome::Acquired(_)
                    )
                })
            })
            .collect();
        let winners = threads.into_iter().map(|t| t.join().unwrap()).filter(|&won| won).count();
        assert_eq!(winners, 1);
    }

    #[test]
    fn a_corrupt_lease_file_is_a_clear_error() {
        let dir = temp_dir("corrupt");
        let path = dir.join("vm.lease");
        for contents in [
            &b"garbage"[..],
            b"ftvm-lease 1\nholder a\nterm 1\nexpires_ms 5\ncrc32c 00000000\n",
            b"ftvm-lease 1\nholder a\nterm x\nexpires_ms 5\ncrc32c 00000000\n",
            &[0xff; 10],
            &[b'a'; 5000],
        ] {
            std::fs::write(&path, contents).unwrap();
            let error = FileLease::new(&path).try_acquire("b", 0, 10).unwrap_err();
            assert!(matches!(error, LeaseError::Corrupt { .. }), "{error}");
            assert!(error.to_string().contains("delete it"));
        }
    }

    #[test]
    fn a_tampered_record_fails_its_checksum() {
        let dir = temp_dir("tamper");
        let path = dir.join("vm.lease");
        acquired(FileLease::new(&path).try_acquire("a", 0, 10).unwrap());
        let text = std::fs::read_to_string(&path).unwrap().replace("term 1", "term 9");
        std::fs::write(&path, text).unwrap();
        let error = FileLease::new(&path).current_holder().unwrap_err();
        assert!(error.to_string().contains("checksum"), "{error}");
    }

    #[test]
    fn holder_names_are_checked() {
        let mut lease = MemoryLease::new();
        for bad in ["", "two words", "line\nbreak"] {
            assert!(matches!(lease.try_acquire(bad, 0, 1), Err(LeaseError::InvalidHolder { .. })));
        }
    }

    #[test]
    fn an_unreachable_lease_directory_is_an_io_error() {
        let mut lease = FileLease::new("/nonexistent-ftvm-dir/vm.lease");
        assert!(matches!(lease.try_acquire("a", 0, 1), Err(LeaseError::Io { .. })));
    }

    #[test]
    fn memory_lease_clones_share_one_record() {
        let mut a = MemoryLease::new();
        let mut b = a.clone();
        acquired(a.try_acquire("a", 0, 10).unwrap());
        assert!(matches!(b.try_acquire("b", 5, 10).unwrap(), AcquireOutcome::Busy(_)));
    }
}
