//! A general key-value store with revisions, as etcd has it: every write raises the store's
//! revision, each key remembers the revision of its last write (`mod_revision`), and a write
//! can be made conditional on it. The cluster keeps its declared and observed state here, and
//! [`KvOwnership`] keeps ownership records on any [`KvStore`] (a swap is a write conditional
//! on the record's mod_revision, which is an etcd transaction in etcd mode).
//!
//! Implementations: [`MemoryKv`] (tests, simulations; an outage switch), [`FileKv`] (a
//! directory, one machine), [`crate::EtcdKv`] (many hosts).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::fcntl::{Flock, FlockArg};

use crate::{
    check_swap, decide_swap, validate_vm_id, OwnershipRecord, OwnershipStore, StoreError, SwapOutcome, SwapResult,
};

/// The longest key accepted.
pub const MAX_KEY_BYTES: usize = 160;
/// The largest value accepted.
pub const MAX_VALUE_BYTES: usize = 256 * 1024;
/// A listing returns at most this many keys (more is an error, not a silent cut).
pub const MAX_LIST_KEYS: usize = 10_000;

/// One key's value and the store revision that last wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEntry {
    pub value: Vec<u8>,
    pub mod_revision: u64,
}

/// What a conditional write expects of the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The key does not exist.
    Absent,
    /// The key's last write was at this revision.
    ModRevision(u64),
}

/// A key-value store with revisions. Keys are `/`-separated paths of `[A-Za-z0-9._-]`,
/// starting with `/`, at most [`MAX_KEY_BYTES`].
pub trait KvStore: Send {
    fn get(&mut self, key: &str) -> Result<Option<KvEntry>, StoreError>;
    /// Every key starting with `prefix`, in key order.
    fn list(&mut self, prefix: &str) -> Result<Vec<(String, KvEntry)>, StoreError>;
    /// Writes unconditionally; returns the new revision.
    fn put(&mut self, key: &str, value: &[u8]) -> Result<u64, StoreError>;
    /// Writes only if the key is as `expect` says; returns whether it wrote.
    fn put_if(&mut self, key: &str, expect: Expect, value: &[u8]) -> Result<bool, StoreError>;
    /// Removes the key (nothing if absent).
    fn delete(&mut self, key: &str) -> Result<(), StoreError>;
    /// Removes the key only if its last write was at `mod_revision`; returns whether it did.
    fn delete_if(&mut self, key: &str, mod_revision: u64) -> Result<bool, StoreError>;
}

impl<S: KvStore + ?Sized> KvStore for Box<S> {
    fn get(&mut self, key: &str) -> Result<Option<KvEntry>, StoreError> {
        (**self).get(key)
    }
    fn list(&mut self, prefix: &str) -> Result<Vec<(String, KvEntry)>, StoreError> {
        (**self).list(prefix)
    }
    fn put(&mut self, key: &str, value: &[u8]) -> Result<u64, StoreError> {
        (**self).put(key, value)
    }
    fn put_if(&mut self, key: &str, expect: Expect, value: &[u8]) -> Result<bool, StoreError> {
        (**self).put_if(key, expect, value)
    }
    fn delete(&mut self, key: &str) -> Result<(), StoreError> {
        (**self).delete(key)
    }
    fn delete_if(&mut self, key: &str, mod_revision: u64) -> Result<bool, StoreError> {
        (**self).delete_if(key, mod_revision)
    }
}

/// Checks a key: see [`KvStore`].
pub fn validate_key(key: &str) -> Result<(), StoreError> {
    let valid = key.len() <= MAX_KEY_BYTES
        && key.starts_with('/')
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'));
    match valid {
        true => Ok(()),
        false => Err(StoreError::BadKey { key: key.to_string() }),
    }
}

pub(crate) fn check_value(key: &str, value: &[u8]) -> Result<(), StoreError> {
    validate_key(key)?;
    match value.len() <= MAX_VALUE_BYTES {
        true => Ok(()),
        false => Err(StoreError::ValueTooLarge { key: key.to_string(), size_bytes: value.len() }),
    }
}

/// Ownership records kept on a [`KvStore`] under `/ftvm/owner/<vm_id>`, in the same
/// self-checking encoding as a [`crate::FileStore`] record file.
pub struct KvOwnership<K> {
    kv: K,
}

/// Where the ownership record of `vm_id` is kept on a key-value store.
pub fn owner_key(vm_id: &str) -> String {
    format!("/ftvm/owner/{vm_id}")
}

impl<K: KvStore> KvOwnership<K> {
    pub fn new(kv: K) -> Self {
        KvOwnership { kv }
    }

    pub fn kv(&mut self) -> &mut K {
        &mut self.kv
    }

    fn read_entry(&mut self, vm_id: &str) -> Result<Option<(OwnershipRecord, u64)>, StoreError> {
        validate_vm_id(vm_id)?;
        let key = owner_key(vm_id);
        let Some(entry) = self.kv.get(&key)? else { return Ok(None) };
        let record = crate::file::parse_record_file(&entry.value, vm_id, Path::new(&key))?;
        Ok(Some((record, entry.mod_revision)))
    }
}

impl<K: KvStore> OwnershipStore for KvOwnership<K> {
    fn read(&mut self, vm_id: &str) -> Result<Option<OwnershipRecord>, StoreError> {
        Ok(self.read_entry(vm_id)?.map(|(record, _)| record))
    }

    fn compare_and_swap(&mut self, vm_id: &str, expected: Option<u64>, new: &OwnershipRecord) -> SwapResult {
        check_swap(vm_id, expected, new)?;
        let current = self.read_entry(vm_id)?;
        let outcome = decide_swap(current.as_ref().map(|(record, _)| record), expected, new);
        if let SwapOutcome::Swapped(record) = &outcome {
            let expect = current.map_or(Expect::Absent, |(_, revision)| Expect::ModRevision(revision));
            let bytes = crate::file::encode_record_file(vm_id, record)?;
            // The record changed between the read and the write: someone else swapped.
            if !self.kv.put_if(&owner_key(vm_id), expect, &bytes)? {
                return Ok(SwapOutcome::Conflict(self.read(vm_id)?));
            }
        }
        Ok(outcome)
    }
}

/// A key-value store in memory, shared by cloning; an outage switch for simulations.
#[derive(Debug, Clone, Default)]
pub struct MemoryKv(Arc<Mutex<MemoryShared>>);

#[derive(Debug, Default)]
struct MemoryShared {
    entries: BTreeMap<String, KvEntry>,
    revision: u64,
    unreachable: bool,
}

impl MemoryKv {
    pub fn new() -> Self {
        Self::default()
    }

    /// While set, every call on every clone fails as unreachable and changes nothing.
    pub fn set_unreachable(&self, unreachable: bool) {
        self.with(|shared| {
            shared.unreachable = unreachable;
            Ok(())
        })
        .unwrap_or(());
    }

    fn with<T>(&self, f: impl FnOnce(&mut MemoryShared) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let mut guard = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut guard)
    }

    fn live<T>(&self, f: impl FnOnce(&mut MemoryShared) -> Result<T, StoreError>) -> Result<T, StoreError> {
        self.with(|shared| match shared.unreachable {
            true => Err(StoreError::Unreachable { name: "memory (simulated outage)".to_string() }),
            false => f(shared),
        })
    }
}

impl MemoryShared {
    fn write(&mut self, key: &str, value: &[u8]) -> u64 {
        self.revision += 1;
        self.entries.insert(key.to_string(), KvEntry { value: value.to_vec(), mod_revision: self.revision });
        self.revision
    }

    fn matches(&self, key: &str, expect: Expect) -> bool {
        match (self.entries.get(key), expect) {
            (None, Expect::Absent) => true,
            (Some(entry), Expect::ModRevision(revision)) => entry.mod_revision == revision,
            _ => false,
        }
    }
}

impl KvStore for MemoryKv {
    fn get(&mut self, key: &str) -> Result<Option<KvEntry>, StoreError> {
        validate_key(key)?;
        self.live(|shared| Ok(shared.entries.get(key).cloned()))
    }

    fn list(&mut self, prefix: &str) -> Result<Vec<(String, KvEntry)>, StoreError> {
        validate_key(prefix)?;
        self.live(|shared| {
            let found: Vec<_> = shared
                .entries
                .range(prefix.to_string()..)
                .take_while(|(key, _)| key.starts_with(prefix))
                .take(MAX_LIST_KEYS + 1)
                .map(|(key, entry)| (key.clone(), entry.clone()))
                .collect();
            check_list_size(prefix, found)
        })
    }

    fn put(&mut self, key: &str, value: &[u8]) -> Result<u64, StoreError> {
        check_value(key, value)?;
        self.live(|shared| Ok(shared.write(key, value)))
    }

    fn put_if(&mut self, key: &str, expect: Expect, value: &[u8]) -> Result<bool, StoreError> {
        check_value(key, value)?;
        self.live(|shared| match shared.matches(key, expect) {
            true => Ok(shared.write(key, value) > 0),
            false => Ok(false),
        })
    }

    fn delete(&mut self, key: &str) -> Result<(), StoreError> {
        validate_key(key)?;
        self.live(|shared| {
            if shared.entries.remove(key).is_some() {
                shared.revision += 1;
            }
            Ok(())
        })
    }

    fn delete_if(&mut self, key: &str, mod_revision: u64) -> Result<bool, StoreError> {
        validate_key(key)?;
        self.live(|shared| match shared.matches(key, Expect::ModRevision(mod_revision)) {
            true => {
                shared.entries.remove(key);
                shared.revision += 1;
                Ok(true)
            }
            false => Ok(false),
        })
    }
}

fn check_list_size(prefix: &str, found: Vec<(String, KvEntry)>) -> Result<Vec<(String, KvEntry)>, StoreError> {
    match found.len() > MAX_LIST_KEYS {
        true => Err(StoreError::TooManyKeys { prefix: prefix.to_string() }),
        false => Ok(found),
    }
}

/// The file format of one [`FileKv`] entry: this line, then the value.
const FILE_KV_MAGIC: &str = "ftvm-kv 1";

/// A key-value store in a directory: one file per key (`/` written as `+`), replaced by
/// atomic rename; the store revision in `revision`; every write holds an exclusive `flock` on
/// `lock`, so several processes on one machine share the store safely.
#[derive(Debug, Clone)]
pub struct FileKv {
    dir: PathBuf,
}

impl FileKv {
    pub fn open(dir: &Path) -> Result<FileKv, StoreError> {
        let io = |action| crate::file::io_error(dir, action);
        std::fs::create_dir_all(dir.join("keys")).map_err(io("create its directory"))?;
        Ok(FileKv { dir: dir.to_path_buf() })
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join("keys").join(key.replace('/', "+"))
    }

    fn lock(&self) -> Result<Flock<File>, StoreError> {
        let path = self.dir.join("lock");
        let io = |action| crate::file::io_error(&path, action);
        let file = crate::file::open_lock_file(&path).map_err(io("open the lock file"))?;
        // Writers hold the lock for one small write: a blocking wait is short.
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| io("lock the lock file")(errno.into()))
    }

    fn next_revision(&self) -> Result<u64, StoreError> {
        let path = self.dir.join("revision");
        let current = match std::fs::read_to_string(&path) {
            Ok(text) => text.trim().parse::<u64>().map_err(|_| StoreError::Corrupt {
                path: path.clone(),
                what: format!("revision {:?} is not a number", text.trim()),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(crate::file::io_error(&path, "read the revision")(e)),
        };
        let next = current + 1;
        self.replace(&path, next.to_string().as_bytes())?;
        Ok(next)
    }

    fn replace(&self, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        let temp = path.with_extension("tmp");
        let io = crate::file::io_error;
        let mut file = File::create(&temp).map_err(io(&temp, "create a temporary file"))?;
        file.write_all(bytes).map_err(io(&temp, "write a temporary file"))?;
        file.sync_all().map_err(io(&temp, "sync a temporary file"))?;
        std::fs::rename(&temp, path).map_err(io(path, "replace the file"))
    }

    fn read_path(&self, path: &Path) -> Result<Option<KvEntry>, StoreError> {
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(crate::file::io_error(path, "open")(e)),
        };
        let mut bytes = Vec::new();
        file.take((MAX_VALUE_BYTES + 64) as u64)
            .read_to_end(&mut bytes)
            .map_err(crate::file::io_error(path, "read"))?;
        let corrupt = |what: &str| StoreError::Corrupt { path: path.to_path_buf(), what: what.to_string() };
        let newline = bytes.iter().position(|&b| b == b'\n').ok_or_else(|| corrupt("no header line"))?;
        let header = std::str::from_utf8(&bytes[..newline]).map_err(|_| corrupt("header not UTF-8"))?;
        let revision = header
            .strip_prefix(FILE_KV_MAGIC)
            .and_then(|rest| rest.trim().parse::<u64>().ok())
            .ok_or_else(|| corrupt("not an ftvm-kv 1 entry"))?;
        Ok(Some(KvEntry { value: bytes[newline + 1..].to_vec(), mod_revision: revision }))
    }

    fn write_locked(&self, key: &str, value: &[u8]) -> Result<u64, StoreError> {
        let revision = self.next_revision()?;
        let mut bytes = format!("{FILE_KV_MAGIC} {revision}\n").into_bytes();
        bytes.extend_from_slice(value);
        self.replace(&self.path(key), &bytes)?;
        Ok(revision)
    }

    fn matches(&self, key: &str, expect: Expect) -> Result<bool, StoreError> {
        Ok(match (self.read_path(&self.path(key))?, expect) {
            (None, Expect::Absent) => true,
            (Some(entry), Expect::ModRevision(revision)) => entry.mod_revision == revision,
            _ => false,
        })
    }

    fn remove(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path(key);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(crate::file::io_error(&path, "remove")(e)),
            _ => Ok(()),
        }
    }
}

impl KvStore for FileKv {
    fn get(&mut self, key: &str) -> Result<Option<KvEntry>, StoreError> {
        validate_key(key)?;
        self.read_path(&self.path(key))
    }

    fn list(&mut self, prefix: &str) -> Result<Vec<(String, KvEntry)>, StoreError> {
        validate_key(prefix)?;
        let dir = self.dir.join("keys");
        let entries = std::fs::read_dir(&dir).map_err(crate::file::io_error(&dir, "list"))?;
        let encoded_prefix = prefix.replace('/', "+");
        let mut names: Vec<String> = entries
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter(|name| name.starts_with(&encoded_prefix) && !name.ends_with(".tmp"))
            .collect();
        names.sort();
        let mut found = Vec::new();
        for name in names.into_iter().take(MAX_LIST_KEYS + 1) {
            // A key removed since the listing is simply not there.
            if let Some(entry) = self.read_path(&dir.join(&name))? {
                found.push((name.replace('+', "/"), entry));
            }
        }
        check_list_size(prefix, found)
    }

    fn put(&mut self, key: &str, value: &[u8]) -> Result<u64, StoreError> {
        check_value(key, value)?;
        let _lock = self.lock()?;
        self.write_locked(key, value)
    }

    fn put_if(&mut self, key: &str, expect: Expect, value: &[u8]) -> Result<bool, StoreError> {
        check_value(key, value)?;
        let _lock = self.lock()?;
        match self.matches(key, expect)? {
            true => self.write_locked(key, value).map(|_| true),
            false => Ok(false),
        }
    }

    fn delete(&mut self, key: &str) -> Result<(), StoreError> {
        validate_key(key)?;
        let _lock = self.lock()?;
        self.remove(key)
    }

    fn delete_if(&mut self, key: &str, mod_revision: u64) -> Result<bool, StoreError> {
        validate_key(key)?;
        let _lock = self.lock()?;
        match self.matches(key, Expect::ModRevision(mod_revision))? {
            true => self.remove(key).map(|()| true),
            false => Ok(false),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::VmState;

    /// The behaviour every [`KvStore`] must have; run on each implementation.
    pub(crate) fn check_kv_semantics(kv: &mut dyn KvStore) {
        assert_eq!(kv.get("/t/a").unwrap(), None);
        assert!(kv.put_if("/t/a", Expect::Absent, b"one").unwrap());
        assert!(!kv.put_if("/t/a", Expect::Absent, b"again").unwrap(), "exists already");
        let first = kv.get("/t/a").unwrap().unwrap();
        assert_eq!(first.value, b"one");
        assert!(!kv.put_if("/t/a", Expect::ModRevision(first.mod_revision + 100), b"x").unwrap());
        assert!(kv.put_if("/t/a", Expect::ModRevision(first.mod_revision), b"two").unwrap());
        let second = kv.get("/t/a").unwrap().unwrap();
        assert!(second.mod_revision > first.mod_revision);
        assert!(!kv.put_if("/t/a", Expect::ModRevision(first.mod_revision), b"stale").unwrap());
        let revision = kv.put("/t/b", b"bee").unwrap();
        assert_eq!(kv.get("/t/b").unwrap().unwrap().mod_revision, revision);
        kv.put("/u/c", b"other prefix").unwrap();
        let listed: Vec<String> = kv.list("/t/").unwrap().into_iter().map(|(key, _)| key).collect();
        assert_eq!(listed, ["/t/a", "/t/b"]);
        assert!(!kv.delete_if("/t/a", first.mod_revision).unwrap());
        assert!(kv.delete_if("/t/a", second.mod_revision).unwrap());
        assert_eq!(kv.get("/t/a").unwrap(), None);
        kv.delete("/t/b").unwrap();
        kv.delete("/t/b").unwrap();
        assert!(kv.list("/t/").unwrap().is_empty());
        assert!(matches!(kv.get("no-slash"), Err(StoreError::BadKey { .. })));
        assert!(matches!(kv.put("/t/x y", b""), Err(StoreError::BadKey { .. })));
        assert!(matches!(kv.put("/t/big", &vec![0; MAX_VALUE_BYTES + 1]), Err(StoreError::ValueTooLarge { .. })));
    }

    /// Ownership on top of the store: the same rules as every ownership store.
    pub(crate) fn check_ownership_on(kv: impl KvStore) {
        let mut store = KvOwnership::new(kv);
        let active =
            |generation, owner: &str| OwnershipRecord { generation, owner: owner.into(), state: VmState::Active };
        assert_eq!(store.read("vm").unwrap(), None);
        assert_eq!(store.compare_and_swap("vm", None, &active(1, "a")).unwrap(), SwapOutcome::Swapped(active(1, "a")));
        assert_eq!(
            store.compare_and_swap("vm", None, &active(1, "b")).unwrap(),
            SwapOutcome::Conflict(Some(active(1, "a")))
        );
        assert_eq!(
            store.compare_and_swap("vm", Some(1), &active(2, "b")).unwrap(),
            SwapOutcome::Swapped(active(2, "b"))
        );
        assert_eq!(
            store.compare_and_swap("vm", Some(1), &active(2, "c")).unwrap(),
            SwapOutcome::Conflict(Some(active(2, "b"))),
            "a stale generation never wins"
        );
        assert_eq!(store.read("vm").unwrap(), Some(active(2, "b")));
        // A record another VM's key holds is refused by name.
        let foreign = store.kv().get(&owner_key("vm")).unwrap().unwrap().value;
        store.kv().put(&owner_key("other"), &foreign).unwrap();
        assert!(matches!(store.read("other"), Err(StoreError::Corrupt { .. })));
        store.kv().put(&owner_key("junk"), b"{not json").unwrap();
        assert!(matches!(store.read("junk"), Err(StoreError::Corrupt { .. })));
    }

    #[test]
    fn memory_kv_has_the_kv_semantics() {
        check_kv_semantics(&mut MemoryKv::new());
        check_ownership_on(MemoryKv::new());
    }

    #[test]
    fn memory_kv_outage_changes_nothing() {
        let mut kv = MemoryKv::new();
        kv.put("/a", b"1").unwrap();
        kv.set_unreachable(true);
        assert!(matches!(kv.put("/a", b"2"), Err(StoreError::Unreachable { .. })));
        kv.set_unreachable(false);
        assert_eq!(kv.get("/a").unwrap().unwrap().value, b"1");
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ftvm-kv-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn file_kv_has_the_kv_semantics() {
        let dir = temp_dir("semantics");
        check_kv_semantics(&mut FileKv::open(&dir).unwrap());
        check_ownership_on(FileKv::open(&dir).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn file_kv_swaps_are_atomic_between_threads() {
        let dir = temp_dir("race");
        let mut kv = FileKv::open(&dir).unwrap();
        kv.put("/n", b"0").unwrap();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let mut kv = kv.clone();
                std::thread::spawn(move || {
                    let mut wins = 0;
                    while wins < 25 {
                        let entry = kv.get("/n").unwrap().unwrap();
                        let n: u64 = std::str::from_utf8(&entry.value).unwrap().parse().unwrap();
                        let next = (n + 1).to_string();
                        if kv.put_if("/n", Expect::ModRevision(entry.mod_revision), next.as_bytes()).unwrap() {
                            wins += 1;
                        }
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(kv.get("/n").unwrap().unwrap().value, b"100", "no increment lost");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
