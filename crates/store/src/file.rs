//! Ownership records in a directory, one file per VM (`DIR/<vm_id>.json`). A swap holds an
//! exclusive `flock` on `DIR/<vm_id>.lock` — a stable file that is never renamed over, so every
//! process locks the same inode — reads the record, and if the generation matches writes
//! `DIR/<vm_id>.json.tmp`, fsyncs it, renames it over the record and fsyncs the directory. A
//! crash leaves either the old record or the new one, never a mix; a reader needs no lock.
//! [`OwnershipStore::compare_and_swap_visible`] returns after the rename (every process sees
//! the new record from then on) and leaves both fsyncs to [`OwnershipStore::sync`]: a crash of
//! the host before that may leave the old record, the new one, or — on a filesystem that does
//! not write a file's data before a rename over another (ext4 does, by default) — one its
//! checksum refuses, never a record that reads as valid and is not one of the two.
//!
//! `flock` is atomic between processes and threads on one machine; on a network filesystem its
//! guarantees are the filesystem's (NFSv4 maps it to byte-range locks). Hosts that share no
//! filesystem use another store (etcd) behind the same trait.
//!
//! The file is one line of JSON carrying a format name and version, the VM id it belongs to
//! (so a file copied under another VM's name is refused) and a CRC32C of the record, so a
//! damaged or foreign file is a clear error naming it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::{
    check_swap, decide_swap, owner_is_valid, validate_vm_id, OwnershipRecord, OwnershipStore, StoreError, SwapOutcome,
    SwapResult,
};

/// The `format` field of every record file.
pub const RECORD_FORMAT: &str = "ftvm-ownership";
/// The `version` field this code writes and the only one it reads.
pub const RECORD_FORMAT_VERSION: u32 = 1;
/// A record file larger than this is not a record file (a real one is a few hundred bytes).
pub const MAX_RECORD_FILE_BYTES: u64 = 4096;
/// How long a swap waits for another process to release the lock before it gives up.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(2);

/// A directory of ownership records.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
    lock_timeout: Duration,
}

/// Read first, so that a file of another format or version is named as such even when the
/// rest of it has another shape.
#[derive(Deserialize)]
struct Header {
    format: String,
    version: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordFile {
    format: String,
    version: u64,
    vm_id: String,
    record: OwnershipRecord,
    /// Of [`Checked`], as 8 hex digits.
    crc32c: String,
}

/// What the checksum covers.
#[derive(Serialize)]
struct Checked<'a> {
    vm_id: &'a str,
    record: &'a OwnershipRecord,
}

fn checksum(vm_id: &str, record: &OwnershipRecord) -> u32 {
    // Serializing a struct of integers, strings and a tagged enum is deterministic.
    let bytes = serde_json::to_vec(&Checked { vm_id, record }).unwrap_or_default();
    crc32c::crc32c(&bytes)
}

#[cfg(test)]
thread_local! {
    /// Makes the next swap on this thread stop after its temporary file is written and synced,
    /// as if the process died before the rename.
    static CRASH_BEFORE_RENAME: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl FileStore {
    /// Opens (and creates, if missing) the directory of records.
    pub fn open(dir: &Path) -> Result<FileStore, StoreError> {
        let io = |action| io_error(dir, action);
        // Fails, too, when the path exists and is not a directory.
        std::fs::create_dir_all(dir).map_err(io("create its directory"))?;
        Ok(FileStore { dir: dir.to_path_buf(), lock_timeout: DEFAULT_LOCK_TIMEOUT })
    }

    /// How long a swap waits for the lock (default [`DEFAULT_LOCK_TIMEOUT`]).
    pub fn with_lock_timeout(mut self, lock_timeout: Duration) -> FileStore {
        self.lock_timeout = lock_timeout;
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the record of `vm_id` is kept (the id must be valid).
    pub fn record_path(&self, vm_id: &str) -> PathBuf {
        self.dir.join(format!("{vm_id}.json"))
    }

    fn lock_path(&self, vm_id: &str) -> PathBuf {
        self.dir.join(format!("{vm_id}.lock"))
    }

    fn temp_path(&self, vm_id: &str) -> PathBuf {
        self.dir.join(format!("{vm_id}.json.tmp"))
    }

    /// Takes the exclusive lock of `vm_id`, waiting at most `lock_timeout`.
    fn lock(&self, vm_id: &str) -> Result<Flock<File>, StoreError> {
        let path = self.lock_path(vm_id);
        let io = |action| io_error(&path, action);
        let mut file = open_lock_file(&path).map_err(io("open the lock file"))?;
        let start = Instant::now();
        let mut pause = Duration::from_micros(50);
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(guard) => return Ok(guard),
                Err((back, Errno::EWOULDBLOCK | Errno::EINTR)) => file = back,
                Err((_, errno)) => return Err(io("lock the lock file")(errno.into())),
            }
            let waited = start.elapsed();
            if waited >= self.lock_timeout {
                return Err(StoreError::LockTimeout { path, waited_ms: waited.as_millis() as u64 });
            }
            std::thread::sleep(pause.min(self.lock_timeout - waited));
            pause = (pause * 2).min(Duration::from_millis(2));
        }
    }

    fn read_record(&self, vm_id: &str) -> Result<Option<OwnershipRecord>, StoreError> {
        let path = self.record_path(vm_id);
        let io = |action| io_error(&path, action);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("open the record")(e)),
        };
        let mut bytes = Vec::new();
        file.take(MAX_RECORD_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(io("read the record"))?;
        parse_record_file(&bytes, vm_id, &path).map(Some)
    }

    /// Write the record in place of the old one; `durable`: fsync it before the rename and
    /// the directory after (else [`FileStore::sync_record`] does both later).
    fn write_record(&self, vm_id: &str, record: &OwnershipRecord, durable: bool) -> Result<(), StoreError> {
        let path = self.record_path(vm_id);
        let temp_path = self.temp_path(vm_id);
        let io = io_error;
        let text = encode_record_file(vm_id, record)?;
        let mut temp = File::create(&temp_path).map_err(io(&temp_path, "create the temporary record"))?;
        temp.write_all(&text).map_err(io(&temp_path, "write the temporary record"))?;
        if durable {
            temp.sync_all().map_err(io(&temp_path, "sync the temporary record"))?;
        }
        drop(temp);
        #[cfg(test)]
        if CRASH_BEFORE_RENAME.with(|crash| crash.replace(false)) {
            return Err(io(&temp_path, "rename (simulated crash)")(std::io::ErrorKind::Interrupted.into()));
        }
        std::fs::rename(&temp_path, &path).map_err(io(&path, "replace the record"))?;
        if durable {
            self.sync_dir()?;
        }
        Ok(())
    }

    /// Make the record as it stands, and the renames so far, durable.
    fn sync_record(&self, vm_id: &str) -> Result<(), StoreError> {
        let path = self.record_path(vm_id);
        File::open(&path).and_then(|file| file.sync_all()).map_err(io_error(&path, "sync the record"))?;
        self.sync_dir()
    }

    /// Make the renames done so far durable.
    fn sync_dir(&self) -> Result<(), StoreError> {
        File::open(&self.dir).and_then(|dir| dir.sync_all()).map_err(io_error(&self.dir, "sync the directory"))
    }

    fn swap(&mut self, vm_id: &str, expected: Option<u64>, new: &OwnershipRecord, durable: bool) -> SwapResult {
        check_swap(vm_id, expected, new)?;
        let _lock = self.lock(vm_id)?;
        let current = self.read_record(vm_id)?;
        let outcome = decide_swap(current.as_ref(), expected, new);
        if let SwapOutcome::Swapped(record) = &outcome {
            self.write_record(vm_id, record, durable)?;
        }
        Ok(outcome)
    }
}

/// The record as a record file holds it (one line of JSON), also the value of an ownership
/// key on a key-value store.
pub(crate) fn encode_record_file(vm_id: &str, record: &OwnershipRecord) -> Result<Vec<u8>, StoreError> {
    let file = RecordFile {
        format: RECORD_FORMAT.to_string(),
        version: RECORD_FORMAT_VERSION.into(),
        vm_id: vm_id.to_string(),
        record: record.clone(),
        crc32c: format!("{:08x}", checksum(vm_id, record)),
    };
    let mut text = serde_json::to_vec(&file)
        .map_err(|e| StoreError::Corrupt { path: PathBuf::from(vm_id), what: format!("cannot encode ({e})") })?;
    text.push(b'\n');
    Ok(text)
}

/// Wraps an I/O error with the path and what was being done.
/// A lock file, created if missing and never truncated (its contents do not matter: the
/// lock is `flock` on it).
pub(crate) fn open_lock_file(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)
}

pub(crate) fn io_error(path: &Path, action: &'static str) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { path, action, source }
}

pub(crate) fn parse_record_file(bytes: &[u8], vm_id: &str, path: &Path) -> Result<OwnershipRecord, StoreError> {
    let corrupt = |what: String| StoreError::Corrupt { path: path.to_path_buf(), what };
    if bytes.len() as u64 > MAX_RECORD_FILE_BYTES {
        return Err(corrupt(format!("larger than {MAX_RECORD_FILE_BYTES} bytes")));
    }
    let header: Header =
        serde_json::from_slice(bytes).map_err(|e| corrupt(format!("not an ownership record file ({e})")))?;
    if header.format != RECORD_FORMAT {
        return Err(corrupt(format!("format {:?} where {RECORD_FORMAT:?} was expected", header.format)));
    }
    if header.version != u64::from(RECORD_FORMAT_VERSION) {
        return Err(StoreError::ForeignVersion { path: path.to_path_buf(), found: header.version });
    }
    let file: RecordFile = serde_json::from_slice(bytes).map_err(|e| corrupt(format!("malformed record ({e})")))?;
    let crc_found = u32::from_str_radix(&file.crc32c, 16)
        .ok()
        .filter(|_| file.crc32c.len() == 8)
        .ok_or_else(|| corrupt(format!("checksum {:?} is not 8 hex digits", file.crc32c)))?;
    let crc_expected = checksum(&file.vm_id, &file.record);
    if crc_found != crc_expected {
        return Err(corrupt(format!("checksum {crc_found:08x} does not match its contents ({crc_expected:08x})")));
    }
    if file.vm_id != vm_id {
        return Err(corrupt(format!("it holds the record of VM {:?}", file.vm_id)));
    }
    if file.record.generation == 0 {
        return Err(corrupt("generation 0 (records start at 1)".to_string()));
    }
    if !owner_is_valid(&file.record.owner) {
        return Err(corrupt(format!("invalid owner name {:?}", file.record.owner)));
    }
    Ok(file.record)
}

impl OwnershipStore for FileStore {
    fn read(&mut self, vm_id: &str) -> Result<Option<OwnershipRecord>, StoreError> {
        validate_vm_id(vm_id)?;
        self.read_record(vm_id)
    }

    fn compare_and_swap(&mut self, vm_id: &str, expected: Option<u64>, new: &OwnershipRecord) -> SwapResult {
        self.swap(vm_id, expected, new, true)
    }

    fn compare_and_swap_visible(&mut self, vm_id: &str, expected: Option<u64>, new: &OwnershipRecord) -> SwapResult {
        self.swap(vm_id, expected, new, false)
    }

    fn sync(&mut self, vm_id: &str) -> Result<(), StoreError> {
        validate_vm_id(vm_id)?;
        self.sync_record(vm_id)
    }
}

#[cfg(test)]
mod tests;
