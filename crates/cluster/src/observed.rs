//! Observed state: what each host's agent reports of itself (a heartbeat carrying its labels
//! and its replicas' typed status) and the ownership records. Liveness is judged by the
//! observer — a host is alive while its report keeps changing within the timeout, by the
//! observer's own monotonic clock — so a host whose wall clock is far off is judged rightly.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use store::OwnershipRecord;

/// A host whose report has not changed for this long is not alive.
pub const HOST_TIMEOUT_MS: u64 = 3000;
/// A host's report not changed for this long is removed from the store (with its replicas'
/// entries), by whoever notices.
pub const HOST_FORGET_MS: u64 = 10 * 60 * 1000;
/// At most this many replicas in one report.
pub const MAX_REPLICAS_PER_HOST: usize = 256;

/// A host's administrative state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    #[default]
    Active,
    /// No new replicas; existing ones stay.
    Draining,
    /// No new replicas, and its backups are replaced elsewhere and stopped.
    Quarantined,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaRole {
    /// Runs the VM (a primary, or a backup that took over).
    Primary,
    /// Waits with the primary's checkpoints.
    Backup,
    /// Its process runs, its status not read yet.
    Starting,
}

/// One replica process, as its host's agent sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaReport {
    pub vm: String,
    /// The declaring revision of the VM it belongs to.
    pub uid: u64,
    pub role: ReplicaRole,
    pub pid: Option<u32>,
    /// A backup's replication address (HOST:PORT).
    pub listen: Option<String>,
    /// A primary: the address it replicates to, if any.
    pub backup_to: Option<String>,
    /// A primary: its backup acknowledges (outputs leave on acknowledgement).
    pub protected: Option<bool>,
    /// The generation it holds (primary) or its state belongs to (backup).
    pub generation: Option<u64>,
    pub epoch: Option<u64>,
    pub lag_epochs: Option<u64>,
    /// It took the VM over from a primary (at this generation).
    pub took_over_generation: Option<u64>,
    /// The size of its disk: a new backup gets an empty disk of this size, which the first
    /// full checkpoint fills (the disk travels by the replication stream, not a shared file).
    #[serde(default)]
    pub disk_bytes: Option<u64>,
    /// Its name in the ownership record ([`crate::keys::replica_name`]).
    #[serde(default)]
    pub name: Option<String>,
}

/// A host's heartbeat in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostReport {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// The address its backups listen on (no port).
    pub address: String,
    /// Its API, `http://HOST:PORT`.
    pub api: String,
    pub memory_mib_free: u64,
    /// Raised by every heartbeat: the observer sees it change.
    pub seq: u64,
    /// The host's own clock when it wrote this (display only: never compared).
    pub time_ms: u64,
    pub replicas: Vec<ReplicaReport>,
}

/// A host as one observer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostView {
    pub report: HostReport,
    /// How long since the observer saw its report change.
    pub silent_ms: u64,
}

impl HostView {
    pub fn alive(&self) -> bool {
        self.silent_ms < HOST_TIMEOUT_MS
    }

    /// Heartbeats missed, counting one per second of silence.
    pub fn missed_heartbeats(&self) -> u64 {
        self.silent_ms / 1000
    }
}

/// Everything one observer knows this round.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    pub hosts: BTreeMap<String, HostView>,
    /// The ownership record of each declared VM (by name; None: no record yet).
    pub owners: BTreeMap<String, Option<OwnershipRecord>>,
    /// Keys under the cluster's prefixes whose value is not what belongs there.
    pub garbage_keys: Vec<String>,
}

impl Observed {
    /// Every replica reported by an alive host, with its host's name.
    pub fn live_replicas(&self) -> impl Iterator<Item = (&str, &ReplicaReport)> {
        self.hosts
            .iter()
            .filter(|(_, view)| view.alive())
            .flat_map(|(name, view)| view.report.replicas.iter().map(move |r| (name.as_str(), r)))
    }
}
