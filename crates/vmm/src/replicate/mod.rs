//! Checkpoint replication at the edges: sockets, threads, clocks and the ownership store
//! around the pure protocol core of the `replica` crate.
//!
//! - [`primary`]: the replication thread of a running VM (`ftvm run --replicate-to`).
//! - [`backup`]: `ftvm backup`, which holds the last whole checkpoint and takes over.
//! - [`migrate`]: the destination's side of a live migration (a backup that goes live by a
//!   planned switchover); the source's is a mode, [`crate::mode::migrate`].
//! - [`Ownership`]: the VM's ownership record (generation + compare-and-swap) in the store
//!   both replicas see (`--store file:DIR`).

pub mod backup;
pub mod migrate;
pub mod primary;

use replica::{Nonce, PresharedKey, RecordView, SwapAnswer};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};
use store::{OwnershipRecord, OwnershipStore, SwapOutcome, VmState};

/// Why replication, or the ownership record it rests on, could not do what was asked. Each
/// variant says its cause once: in its message, or as its source (printed by the chain).
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("cannot read host randomness: {0}")]
    Randomness(getrandom::Error),
    #[error("cannot read key file {}", path.display())]
    ReadKey { path: PathBuf, source: std::io::Error },
    #[error("key file {}", path.display())]
    Key { path: PathBuf, source: replica::KeyError },
    #[error("{addr:?} is not an address (HOST:PORT)")]
    NotAnAddress { addr: String, source: std::io::Error },
    #[error("{addr:?} resolves to no address")]
    NoAddress { addr: String },
    #[error("--store {spec}")]
    OpenStore { spec: String, source: store::StoreError },
    #[error("--vm-id")]
    VmId(#[source] store::StoreError),
    #[error("cannot read VM {vm_id}'s record")]
    ReadRecord { vm_id: String, source: store::StoreError },
    #[error("cannot update VM {vm_id}'s ownership record")]
    UpdateRecord { vm_id: String, source: store::StoreError },
    #[error(
        "VM {vm_id} is running elsewhere: its ownership record (generation {generation}) is owned by {owner}; stop \
         that replica first (its record is marked ended when it stops), or give this VM another --vm-id"
    )]
    RunningElsewhere { vm_id: String, generation: u64, owner: String },
    #[error(
        "VM {vm_id}'s ownership generation has moved on to {generation}, owned by {owner}{}: another replica \
         took the VM over while this one restarted, so this one stops",
        ended.map_or(String::new(), |code| format!(", ended with exit code {code}"))
    )]
    Superseded { vm_id: String, generation: u64, owner: String, ended: Option<u32> },
    #[error(
        "VM {vm_id}'s ownership record changed while this replica was starting (now {now}): another replica is \
         starting it"
    )]
    ChangedWhileStarting { vm_id: String, now: String },
    #[error(
        "VM {vm_id} ended here, but its ownership record is at generation {generation:?}, owned by {owner}: \
         another replica owns it"
    )]
    EndedButOwnedElsewhere { vm_id: String, generation: Option<u64>, owner: String },
    /// The store could not be reached (its error, rendered for the protocol core).
    #[error("{0}")]
    Store(String),
    #[error("replication needs the VM's ownership record (--store)")]
    NoRecord,
    #[error("this VM is already replicating")]
    AlreadyReplicating,
    #[error("cannot start the replication thread")]
    Thread(#[source] std::io::Error),
    #[error("the driver stopped taking the backup's checkpoints")]
    DriverGone,
    #[error("the listener stopped")]
    ListenerStopped,
}

type Result<T, E = ReplicationError> = std::result::Result<T, E>;

/// Wall-clock milliseconds, for the protocol's heartbeats and timeouts (each side's own
/// clock; nothing compares the two sides' clocks).
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Fresh random bytes for nonces and run ids (getrandom(2): no file descriptor, so a flood
/// of connections that exhausts descriptors cannot stop a handshake).
pub fn random<const N: usize>() -> Result<[u8; N]> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(ReplicationError::Randomness)?;
    Ok(bytes)
}

pub fn nonce() -> Result<Nonce> {
    random()
}

/// The pre-shared key from a file (its bytes, trailing newline removed).
pub fn load_key(path: &Path) -> Result<PresharedKey> {
    let mut bytes =
        std::fs::read(path).map_err(|source| ReplicationError::ReadKey { path: path.to_path_buf(), source })?;
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    PresharedKey::new(&bytes).map_err(|source| ReplicationError::Key { path: path.to_path_buf(), source })
}

/// Socket buffers of the replication link. Bytes in flight when a frame arrives damaged are
/// sent again after it (go-back-N, see `replica::wire`), or on the next connection when the
/// damage lost the framing, so a small window costs little on a bad link; on a good one it is
/// far above what a few milliseconds of checkpoints need.
const LINK_BUFFER_BYTES: usize = 256 << 10;

/// Set up a replication connection: no Nagle delay, small buffers (see LINK_BUFFER_BYTES).
pub fn tune_link(stream: &std::net::TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = stream.set_nodelay(true);
    let _ = setsockopt(stream, sockopt::SndBuf, &LINK_BUFFER_BYTES);
    let _ = setsockopt(stream, sockopt::RcvBuf, &LINK_BUFFER_BYTES);
}

/// A `host:port` address, resolved.
pub fn resolve(addr: &str) -> Result<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    let mut addrs =
        addr.to_socket_addrs().map_err(|source| ReplicationError::NotAnAddress { addr: addr.to_string(), source })?;
    addrs.next().ok_or_else(|| ReplicationError::NoAddress { addr: addr.to_string() })
}

/// Where a VM's ownership record lives, under which id, and who this replica is.
#[derive(Debug, Clone, Default)]
pub struct OwnershipSpec {
    /// The store: `file:DIR` (None: the VM holds no record).
    pub store: Option<String>,
    /// The VM's name in the store (None: derived from its configuration).
    pub vm_id: Option<String>,
    /// This replica's name in the record (None: `<role>-<hostname>-<pid>`).
    pub replica_name: Option<String>,
}

/// A name for the record's owner: unique per process.
pub fn default_owner(role: &str) -> String {
    let host = nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "host".into());
    format!("{role}-{host}-{}", std::process::id())
}

/// The VM's record in the ownership store, as this replica sees and changes it.
pub struct Ownership {
    store: Box<dyn OwnershipStore>,
    pub vm_id: String,
    pub owner: String,
    /// The generation this replica holds (0: none yet).
    pub generation: u64,
    /// What a replication handshake for this VM checks ([`replication_digest`]).
    pub replication_digest: replica::ConfigDigest,
    /// Taken up by [`Ownership::resume`] at a generation an earlier run held: a backup may
    /// hold that run's state, which counts for it (replica's `earlier_run_protected`).
    pub resumed: bool,
}

impl Ownership {
    /// Opens the store `args` names for the VM of `config`; None without a store.
    pub fn open(args: &OwnershipSpec, config: &machine::MachineConfig, role: &str) -> Result<Option<Ownership>> {
        let Some(spec) = &args.store else { return Ok(None) };
        let store = store::open(spec).map_err(|source| ReplicationError::OpenStore { spec: spec.clone(), source })?;
        let vm_id = match &args.vm_id {
            Some(id) => id.clone(),
            None => default_vm_id(config),
        };
        store::validate_vm_id(&vm_id).map_err(ReplicationError::VmId)?;
        let owner = args.replica_name.clone().unwrap_or_else(|| default_owner(role));
        let replication_digest = replication_digest(config, &vm_id);
        Ok(Some(Ownership { store, vm_id, owner, generation: 0, replication_digest, resumed: false }))
    }

    /// A VM starting from its images: take the record, refusing when another replica may
    /// run the VM (an active record owned by someone else).
    pub fn claim_for_start(&mut self) -> Result<u64> {
        self.claim_for_start_from(None)
    }

    /// [`Self::claim_for_start`], also taking an active record at exactly `from` (generation,
    /// owner): a replica whose process is known to be gone (its host's agent saw it end). A
    /// record that moved on since is refused like any other.
    pub fn claim_for_start_from(&mut self, from: Option<(u64, &str)>) -> Result<u64> {
        let current = self
            .store
            .read(&self.vm_id)
            .map_err(|source| ReplicationError::ReadRecord { vm_id: self.vm_id.clone(), source })?;
        if let Some(record) = &current {
            let gone = from.is_some_and(|(generation, owner)| record.generation == generation && record.owner == owner);
            if record.state == VmState::Active && record.owner != self.owner && !gone {
                return Err(ReplicationError::RunningElsewhere {
                    vm_id: self.vm_id.clone(),
                    generation: record.generation,
                    owner: record.owner.clone(),
                });
            }
        }
        let expected = current.map(|r| r.generation);
        match self.swap_to(expected, VmState::Active)? {
            SwapOutcome::Swapped(record) => {
                self.generation = record.generation;
                Ok(record.generation)
            }
            SwapOutcome::Conflict(other) => {
                Err(ReplicationError::ChangedWhileStarting { vm_id: self.vm_id.clone(), now: describe(other.as_ref()) })
            }
        }
    }

    /// A replica restarted under the same name (a `--resilient` primary's new monitor):
    /// take up the record at the generation it holds, without swapping it (the backup's
    /// state keeps counting for it). Err(RunningElsewhere) when the record moved on to
    /// another owner or ended meanwhile: another replica owns the VM, so this one must stop.
    pub fn resume(&mut self) -> Result<u64> {
        let current = self
            .store
            .read(&self.vm_id)
            .map_err(|source| ReplicationError::ReadRecord { vm_id: self.vm_id.clone(), source })?;
        match current {
            Some(record) if record.state == VmState::Active && record.owner == self.owner => {
                self.generation = record.generation;
                self.resumed = true;
                Ok(record.generation)
            }
            // Never claimed (the first start stopped before it did): claim it now.
            None => self.claim_for_start(),
            Some(record) => Err(ReplicationError::Superseded {
                vm_id: self.vm_id.clone(),
                generation: record.generation,
                owner: record.owner,
                ended: match record.state {
                    VmState::Ended { exit_code } => Some(exit_code),
                    VmState::Active => None,
                },
            }),
        }
    }

    fn swap_to(&mut self, expected: Option<u64>, state: VmState) -> Result<SwapOutcome> {
        self.swap_record(expected, state, true)
    }

    /// `durable`: the store's compare-and-swap; else its visible one ([`Ownership::sync`] later).
    fn swap_record(&mut self, expected: Option<u64>, state: VmState, durable: bool) -> Result<SwapOutcome> {
        let new = OwnershipRecord { generation: expected.map_or(1, |g| g + 1), owner: self.owner.clone(), state };
        let outcome = match durable {
            true => self.store.compare_and_swap(&self.vm_id, expected, &new),
            false => self.store.compare_and_swap_visible(&self.vm_id, expected, &new),
        };
        outcome.map_err(|source| ReplicationError::UpdateRecord { vm_id: self.vm_id.clone(), source })
    }

    /// Compare-and-swap from `expected` to the next generation, owned by this replica: the
    /// answer the protocol core wants (`Err` when the store cannot be reached).
    pub fn swap(&mut self, expected: u64, ended: Option<u32>) -> Result<SwapAnswer, String> {
        self.swap_answer(expected, ended, true)
    }

    /// As [`Ownership::swap`], answered once every reader of the store sees the swap, which
    /// [`Ownership::sync`] makes durable: for a swap this replica acts on only later (a
    /// migration's destination answers `SwitchedOver` from it and runs after `HandedOver`).
    pub fn swap_visible(&mut self, expected: u64) -> Result<SwapAnswer, String> {
        self.swap_answer(expected, None, false)
    }

    /// Make the visible swaps so far durable.
    pub fn sync(&mut self) -> Result<()> {
        self.store
            .sync(&self.vm_id)
            .map_err(|source| ReplicationError::UpdateRecord { vm_id: self.vm_id.clone(), source })
    }

    fn swap_answer(&mut self, expected: u64, ended: Option<u32>, durable: bool) -> Result<SwapAnswer, String> {
        let state = match ended {
            Some(exit_code) => VmState::Ended { exit_code },
            None => VmState::Active,
        };
        match self.swap_record(Some(expected), state, durable) {
            Ok(SwapOutcome::Swapped(record)) => {
                self.generation = record.generation;
                Ok(SwapAnswer::Swapped { generation: record.generation })
            }
            // A swap the store performed but answered with an error (a timeout after the
            // commit, an fsync failing after the rename) comes back, when retried, as a
            // conflict with the very record this replica wrote: it is ours.
            Ok(SwapOutcome::Conflict(Some(record)))
                if record.generation == expected + 1 && record.owner == self.owner && record.state == state =>
            {
                self.generation = record.generation;
                Ok(SwapAnswer::Swapped { generation: record.generation })
            }
            Ok(SwapOutcome::Conflict(record)) => Ok(SwapAnswer::Conflict {
                generation: record.as_ref().map(|r| r.generation),
                owner: record.as_ref().map_or_else(|| "nobody".into(), |r| r.owner.clone()),
                ended: record.and_then(|r| match r.state {
                    VmState::Ended { exit_code } => Some(exit_code),
                    VmState::Active => None,
                }),
            }),
            Err(e) => Err(chain(&e)),
        }
    }

    pub fn read(&mut self) -> Result<Option<RecordView>, String> {
        match self.store.read(&self.vm_id) {
            Ok(record) => Ok(record.map(|r| RecordView {
                generation: r.generation,
                owner: r.owner,
                ended: match r.state {
                    VmState::Ended { exit_code } => Some(exit_code),
                    VmState::Active => None,
                },
            })),
            Err(e) => Err(format!("cannot read VM {}'s ownership record: {}", self.vm_id, chain(&e))),
        }
    }

    /// The VM ended on this replica, which owns it: mark the record ended, so that no other
    /// replica ever brings it back.
    pub fn mark_ended(&mut self, exit_code: u32) -> Result<()> {
        match self.swap(self.generation, Some(exit_code)) {
            Ok(SwapAnswer::Swapped { .. }) => Ok(()),
            Ok(SwapAnswer::Conflict { generation, owner, .. }) => {
                Err(ReplicationError::EndedButOwnedElsewhere { vm_id: self.vm_id.clone(), generation, owner })
            }
            Err(e) => Err(ReplicationError::Store(e)),
        }
    }
}

/// The default VM id: the configuration's digest names the VM, so both replicas (started
/// with the same images, RAM and devices) agree on it without being told.
pub fn default_vm_id(config: &machine::MachineConfig) -> String {
    let digest = machine::snapshot::config_digest(config);
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("vm-{hex}")
}

/// What the handshake checks: the machine's configuration and the VM's id.
pub fn replication_digest(config: &machine::MachineConfig, vm_id: &str) -> replica::ConfigDigest {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(machine::snapshot::config_digest(config));
    hasher.update(vm_id.as_bytes());
    hasher.finalize().into()
}

/// An error and its sources, as one line (`a: b: c`), for the protocol core, which carries
/// the store's errors as text.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        line.push_str(": ");
        line.push_str(&e.to_string());
        source = e.source();
    }
    line
}

fn describe(record: Option<&OwnershipRecord>) -> String {
    match record {
        None => "no record".into(),
        Some(r) => format!("generation {} owned by {}", r.generation, r.owner),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ownership(store: &store::MemoryStore, owner: &str) -> Ownership {
        let (vm_id, owner) = ("vm-test".to_string(), owner.to_string());
        Ownership {
            store: Box::new(store.clone()),
            vm_id,
            owner,
            generation: 0,
            replication_digest: [0; 32],
            resumed: false,
        }
    }

    #[test]
    fn a_swap_performed_but_answered_with_an_error_is_recognized_as_ours_when_retried() {
        let store = store::MemoryStore::new();
        let mut primary = ownership(&store, "primary-1");
        assert_eq!(primary.claim_for_start().unwrap(), 1);
        store.set_lose_replies(true);
        assert!(primary.swap(1, None).is_err(), "the reply was lost");
        store.set_lose_replies(false);
        assert_eq!(primary.swap(1, None), Ok(SwapAnswer::Swapped { generation: 2 }));
        // Someone else's record at that generation is a real conflict.
        let mut other = ownership(&store, "backup-2");
        assert!(matches!(other.swap(1, None), Ok(SwapAnswer::Conflict { generation: Some(2), .. })));
    }

    #[test]
    fn a_restarted_replica_resumes_its_generation_unless_another_replica_took_the_vm_over() {
        let store = store::MemoryStore::new();
        assert_eq!(ownership(&store, "primary-1").claim_for_start().unwrap(), 1);
        // The same name again (a new monitor under the same keeper): the same generation.
        let mut again = ownership(&store, "primary-1");
        assert_eq!(again.resume().unwrap(), 1);
        assert_eq!(again.generation, 1);
        // The backup took over meanwhile: the restarted primary stops, naming the generation.
        assert!(matches!(ownership(&store, "backup-2").swap(1, None), Ok(SwapAnswer::Swapped { generation: 2 })));
        let error = ownership(&store, "primary-1").resume().unwrap_err();
        assert_eq!(
            error.to_string(),
            "VM vm-test's ownership generation has moved on to 2, owned by backup-2: another replica took the VM \
             over while this one restarted, so this one stops"
        );
    }

    #[test]
    fn a_vm_running_elsewhere_is_not_claimed_for_start() {
        let store = store::MemoryStore::new();
        ownership(&store, "primary-1").claim_for_start().unwrap();
        let error = ownership(&store, "primary-2").claim_for_start().unwrap_err();
        assert!(format!("{error:#}").contains("is running elsewhere"), "{error:#}");
    }

    #[test]
    fn a_start_takes_a_gone_owners_record_only_at_the_generation_it_was_told() {
        let store = store::MemoryStore::new();
        ownership(&store, "h1/first").claim_for_start().unwrap();
        // Told of an older state of the record (the owner swapped on since): refused.
        assert!(matches!(ownership(&store, "h1/first").swap(1, None), Ok(SwapAnswer::Swapped { generation: 2 })));
        let error = ownership(&store, "h1/again").claim_for_start_from(Some((1, "h1/first"))).unwrap_err();
        assert!(matches!(error, ReplicationError::RunningElsewhere { generation: 2, .. }), "{error:#}");
        // Told of another owner: refused.
        let error = ownership(&store, "h1/again").claim_for_start_from(Some((2, "h1/other"))).unwrap_err();
        assert!(matches!(error, ReplicationError::RunningElsewhere { .. }), "{error:#}");
        // Exactly the record there: taken, at the next generation.
        assert_eq!(ownership(&store, "h1/again").claim_for_start_from(Some((2, "h1/first"))).unwrap(), 3);
    }
}
