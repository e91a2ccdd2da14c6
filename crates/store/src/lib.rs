//! The ownership store: one record per VM saying which replica owns it, under which
//! generation, and whether the VM still runs. A record changes only by compare-and-swap on
//! its generation, and every change raises the generation by exactly one, so a replica whose
//! state belongs to an older generation can never win a swap (DESIGN.md §5, "Ownership").
//!
//! [`OwnershipStore`] is the trait; [`FileStore`] keeps the records in a directory (flock +
//! atomic rename); [`MemoryStore`] serves tests and simulations, with a switch that models an
//! outage. [`open`] turns a `--store` spec into a store.

mod etcd;
mod file;
pub mod http;
pub mod kv;
mod memory;

use std::path::PathBuf;

pub use etcd::EtcdKv;
pub use file::{FileStore, DEFAULT_LOCK_TIMEOUT, MAX_RECORD_FILE_BYTES, RECORD_FORMAT, RECORD_FORMAT_VERSION};
pub use http::HttpError;
pub use kv::{Expect, FileKv, KvEntry, KvOwnership, KvStore, MemoryKv};
pub use memory::MemoryStore;

/// The longest VM id a store accepts.
pub const MAX_VM_ID_BYTES: usize = 64;
/// The longest owner name a record may carry.
pub const MAX_OWNER_BYTES: usize = 256;

/// A VM's ownership record. Every change raises `generation` by exactly one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OwnershipRecord {
    pub generation: u64,
    pub owner: String,
    pub state: VmState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum VmState {
    Active,
    Ended { exit_code: u32 },
}

/// The answer to a compare-and-swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SwapOutcome {
    /// The record is now the one given.
    Swapped(OwnershipRecord),
    /// The current record's generation was not the one expected; this is the record as it
    /// stands (None: there is no record).
    Conflict(Option<OwnershipRecord>),
}

/// What a compare-and-swap answers (every store's signature).
pub type SwapResult = Result<SwapOutcome, StoreError>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("ownership store {path}: cannot {action}")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "ownership record {path} is corrupt: {what}; stop every replica of this VM and restore or \
         delete the file"
    )]
    Corrupt { path: PathBuf, what: String },
    #[error(
        "ownership record {path} has format version {found}; this ftvm reads version {RECORD_FORMAT_VERSION} only"
    )]
    ForeignVersion { path: PathBuf, found: u64 },
    #[error("ownership store {path}: its lock is still held by another process after {waited_ms} ms")]
    LockTimeout { path: PathBuf, waited_ms: u64 },
    #[error("ownership store {spec:?}: {problem}; accepted forms: file:DIR, etcd:http://HOST:PORT[,...]")]
    BadSpec { spec: String, problem: &'static str },
    #[error(
        "VM id {id:?} is invalid: use 1 to {MAX_VM_ID_BYTES} of the characters A-Z a-z 0-9 . _ -, not starting \
         with '.'"
    )]
    BadVmId { id: String },
    #[error("owner name {owner:?} is invalid: use 1 to {MAX_OWNER_BYTES} bytes with no control characters")]
    BadOwner { owner: String },
    #[error(
        "ownership record of VM {vm_id}: a swap expecting generation {} must write generation {}, not {found}",
        expected.map_or("none (no record)".to_string(), |g| g.to_string()),
        expected.map_or(1, |g| g.saturating_add(1))
    )]
    BadGeneration { vm_id: String, expected: Option<u64>, found: u64 },
    #[error("ownership store {name} is unreachable")]
    Unreachable { name: String },
    #[error(
        "store key {key:?} is invalid: use a path of A-Z a-z 0-9 . _ - starting with '/', at most {} bytes",
        kv::MAX_KEY_BYTES
    )]
    BadKey { key: String },
    #[error("store key {key}: a value of {size_bytes} bytes is over the limit of {} bytes", kv::MAX_VALUE_BYTES)]
    ValueTooLarge { key: String, size_bytes: usize },
    #[error("store: more than {} keys under {prefix}", kv::MAX_LIST_KEYS)]
    TooManyKeys { prefix: String },
    #[error("etcd {endpoint}")]
    EtcdRequest {
        endpoint: String,
        #[source]
        source: HttpError,
    },
    #[error("etcd {endpoint}: {problem}")]
    EtcdAnswer { endpoint: String, problem: String },
}

impl StoreError {
    /// Whether the store could not be reached (as opposed to answering something wrong):
    /// callers keep serving with what they have and try again later.
    pub fn is_unreachable(&self) -> bool {
        match self {
            StoreError::Unreachable { .. } => true,
            StoreError::EtcdRequest { source, .. } => matches!(source, HttpError::Io { .. }),
            StoreError::EtcdAnswer { problem, .. } => problem.starts_with("HTTP 5"),
            _ => false,
        }
    }
}

/// Where ownership records are kept. Both replicas of a VM must reach the same store.
pub trait OwnershipStore: Send {
    /// The record as it stands (None: the VM has none yet).
    fn read(&mut self, vm_id: &str) -> Result<Option<OwnershipRecord>, StoreError>;
    /// Write `new` only if the current record's generation is `expected` (None: no record yet).
    /// `new.generation` must be `expected.map_or(1, |g| g + 1)` (else an error, not a panic).
    /// A record whose state is Ended is never swapped again except by a caller passing the Ended
    /// record's own generation — i.e. CAS is purely on generation; callers decide.
    fn compare_and_swap(&mut self, vm_id: &str, expected: Option<u64>, new: &OwnershipRecord) -> SwapResult;
    /// As [`OwnershipStore::compare_and_swap`], but it may return once the swap is decided and
    /// every reader sees it, before it would survive a crash of the store's host; then
    /// [`OwnershipStore::sync`] makes it durable. For a caller that acts on the swap only
    /// later (a migration's destination answers the source at once and runs only after the
    /// source's reply). The default is the durable swap.
    fn compare_and_swap_visible(&mut self, vm_id: &str, expected: Option<u64>, new: &OwnershipRecord) -> SwapResult {
        self.compare_and_swap(vm_id, expected, new)
    }
    /// Make the swaps of `vm_id`'s record done so far durable (a no-op for a store whose
    /// every swap is).
    fn sync(&mut self, _vm_id: &str) -> Result<(), StoreError> {
        Ok(())
    }
}

impl<S: OwnershipStore + ?Sized> OwnershipStore for Box<S> {
    fn read(&mut self, vm_id: &str) -> Result<Option<OwnershipRecord>, StoreError> {
        (**self).read(vm_id)
    }

    fn compare_and_swap(&mut self, vm_id: &str, expected: Option<u64>, new: &OwnershipRecord) -> SwapResult {
        (**self).compare_and_swap(vm_id, expected, new)
    }

    fn compare_and_swap_visible(&mut self, vm_id: &str, expected: Option<u64>, new: &OwnershipRecord) -> SwapResult {
        (**self).compare_and_swap_visible(vm_id, expected, new)
    }

    fn sync(&mut self, vm_id: &str) -> Result<(), StoreError> {
        (**self).sync(vm_id)
    }
}

/// Opens the ownership store a `--store` spec names: `file:DIR` (the directory is created if
/// missing) or `etcd:http://HOST:PORT[,...]` (records under `/ftvm/owner/`).
pub fn open(spec: &str) -> Result<Box<dyn OwnershipStore>, StoreError> {
    match parse_spec(spec)? {
        Spec::File(dir) => Ok(Box::new(FileStore::open(&dir)?)),
        Spec::Etcd(urls) => Ok(Box::new(KvOwnership::new(EtcdKv::new(&urls)?))),
    }
}

/// Opens the key-value store a `--store` spec names, for the cluster's declared and observed
/// state: `file:DIR` keeps it in `DIR/kv` (beside the ownership records), etcd in etcd.
pub fn open_kv(spec: &str) -> Result<Box<dyn KvStore>, StoreError> {
    match parse_spec(spec)? {
        Spec::File(dir) => Ok(Box::new(FileKv::open(&dir.join("kv"))?)),
        Spec::Etcd(urls) => Ok(Box::new(EtcdKv::new(&urls)?)),
    }
}

enum Spec {
    File(PathBuf),
    Etcd(String),
}

fn parse_spec(spec: &str) -> Result<Spec, StoreError> {
    let bad = |problem| StoreError::BadSpec { spec: spec.to_string(), problem };
    if let Some(dir) = spec.strip_prefix("file:") {
        if dir.is_empty() {
            return Err(bad("file: needs a directory after the colon"));
        }
        return Ok(Spec::File(PathBuf::from(dir)));
    }
    if let Some(urls) = spec.strip_prefix("etcd:") {
        EtcdKv::new(urls)?;
        return Ok(Spec::Etcd(urls.to_string()));
    }
    Err(bad("unknown kind of store"))
}

/// Checks that `id` can key a record: `[A-Za-z0-9._-]{1,64}`, not starting with '.' (so it is
/// a plain file name that is never hidden, `.` or `..`).
pub fn validate_vm_id(id: &str) -> Result<(), StoreError> {
    let valid = !id.is_empty()
        && id.len() <= MAX_VM_ID_BYTES
        && !id.starts_with('.')
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    match valid {
        true => Ok(()),
        false => Err(StoreError::BadVmId { id: id.to_string() }),
    }
}

fn owner_is_valid(owner: &str) -> bool {
    !owner.is_empty() && owner.len() <= MAX_OWNER_BYTES && !owner.chars().any(char::is_control)
}

/// The checks every store makes before a swap, whatever holds the records.
fn check_swap(vm_id: &str, expected: Option<u64>, new: &OwnershipRecord) -> Result<(), StoreError> {
    validate_vm_id(vm_id)?;
    if !owner_is_valid(&new.owner) {
        return Err(StoreError::BadOwner { owner: new.owner.clone() });
    }
    let wanted = match expected {
        None => Some(1),
        Some(g) => g.checked_add(1),
    };
    if wanted != Some(new.generation) {
        return Err(StoreError::BadGeneration { vm_id: vm_id.to_string(), expected, found: new.generation });
    }
    Ok(())
}

/// The compare-and-swap itself, the same for every store: whether to write, and the answer.
fn decide_swap(current: Option<&OwnershipRecord>, expected: Option<u64>, new: &OwnershipRecord) -> SwapOutcome {
    match current.map(|r| r.generation) == expected {
        true => SwapOutcome::Swapped(new.clone()),
        false => SwapOutcome::Conflict(current.cloned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn active(generation: u64, owner: &str) -> OwnershipRecord {
        OwnershipRecord { generation, owner: owner.to_string(), state: VmState::Active }
    }

    #[test]
    fn vm_ids_are_plain_file_names() {
        for good in ["a", "web-1", "vm_2.prod", "A.b-c_d", &"x".repeat(64)] {
            assert!(validate_vm_id(good).is_ok(), "{good:?}");
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "../a", "a b", "é", "a\n", &"x".repeat(65)] {
            assert!(matches!(validate_vm_id(bad), Err(StoreError::BadVmId { .. })), "{bad:?}");
        }
        assert_eq!(
            validate_vm_id("a/b").unwrap_err().to_string(),
            "VM id \"a/b\" is invalid: use 1 to 64 of the characters A-Z a-z 0-9 . _ -, not starting with '.'"
        );
    }

    #[test]
    fn a_swap_must_raise_the_generation_by_exactly_one() {
        assert!(check_swap("vm", None, &active(1, "a")).is_ok());
        assert!(check_swap("vm", Some(4), &active(5, "a")).is_ok());
        let error = check_swap("vm", None, &active(2, "a")).unwrap_err();
        assert_eq!(
            error.to_string(),
            "ownership record of VM vm: a swap expecting generation none (no record) must write generation 1, not 2"
        );
        let error = check_swap("vm", Some(4), &active(4, "a")).unwrap_err();
        assert_eq!(
            error.to_string(),
            "ownership record of VM vm: a swap expecting generation 4 must write generation 5, not 4"
        );
        assert!(matches!(check_swap("vm", Some(u64::MAX), &active(0, "a")), Err(StoreError::BadGeneration { .. })));
    }

    #[test]
    fn owner_names_are_checked() {
        for bad in ["", "line\nbreak", &"o".repeat(257)] {
            assert!(matches!(check_swap("vm", None, &active(1, bad)), Err(StoreError::BadOwner { .. })), "{bad:?}");
        }
        assert!(check_swap("vm", None, &active(1, "backup at 10.0.0.2:7000")).is_ok());
    }

    #[test]
    fn the_record_serializes_with_a_tagged_state() {
        let ended = OwnershipRecord { generation: 3, owner: "a".into(), state: VmState::Ended { exit_code: 7 } };
        assert_eq!(
            serde_json::to_string(&ended).unwrap(),
            r#"{"generation":3,"owner":"a","state":{"state":"ended","exit_code":7}}"#
        );
        assert_eq!(
            serde_json::to_string(&active(1, "a")).unwrap(),
            r#"{"generation":1,"owner":"a","state":{"state":"active"}}"#
        );
    }

    #[test]
    fn store_specs_name_the_accepted_forms() {
        let message = |spec: &str| open(spec).err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(message("etcd:http://127.0.0.1:2379"), "", "opening needs no connection");
        assert_eq!(
            message("etcd:127.0.0.1:2379"),
            "ownership store \"etcd:127.0.0.1:2379\": each etcd URL starts with http://; accepted forms: file:DIR, \
             etcd:http://HOST:PORT[,...]"
        );
        assert_eq!(
            message("/tmp/dir"),
            "ownership store \"/tmp/dir\": unknown kind of store; accepted forms: file:DIR, etcd:http://HOST:PORT[,...]"
        );
        assert_eq!(
            message("file:"),
            "ownership store \"file:\": file: needs a directory after the colon; accepted forms: file:DIR, \
             etcd:http://HOST:PORT[,...]"
        );
    }

    #[test]
    fn a_file_spec_opens_a_file_store() {
        let dir = std::env::temp_dir().join(format!("ftvm-store-spec-{}", std::process::id()));
        let mut store = open(&format!("file:{}", dir.display())).unwrap();
        assert_eq!(store.compare_and_swap("vm", None, &active(1, "a")).unwrap(), SwapOutcome::Swapped(active(1, "a")));
        assert_eq!(store.read("vm").unwrap(), Some(active(1, "a")));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
