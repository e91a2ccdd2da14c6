//! Where the cluster keeps its state in the store (a [`store::KvStore`]).
//!
//! | key                         | value                                   | written by        |
//! |-----------------------------|-----------------------------------------|-------------------|
//! | /ftvm/vms/NAME              | [`crate::DeclaredVm`] JSON              | the API (any agent) |
//! | /ftvm/hosts/NAME            | [`crate::HostReport`] JSON (heartbeat)  | that host's agent |
//! | /ftvm/hostctl/NAME          | [`crate::HostState`] JSON (drain, ...)  | rules, the user   |
//! | /ftvm/replace/NAME         | [`crate::spec::Replacement`] JSON       | rules (reprotect_elsewhere) |
//! | /ftvm/events/ID             | [`Event`] JSON (timeline)               | any agent         |
//! | /ftvm/owner/NAME.UID        | ownership record (etcd; file: in DIR/)  | the replicas      |

use serde::{Deserialize, Serialize};

pub const VMS: &str = "/ftvm/vms/";
pub const HOSTS: &str = "/ftvm/hosts/";
pub const HOSTCTL: &str = "/ftvm/hostctl/";
pub const EVENTS: &str = "/ftvm/events/";
pub const REPLACE: &str = "/ftvm/replace/";
/// The timeline keeps at most this many events (the oldest are removed).
pub const MAX_EVENTS: usize = 1000;

pub fn vm(name: &str) -> String {
    format!("{VMS}{name}")
}

pub fn host(name: &str) -> String {
    format!("{HOSTS}{name}")
}

pub fn hostctl(name: &str) -> String {
    format!("{HOSTCTL}{name}")
}

/// A request to move VM `name`'s backup off a host ([`crate::spec::Replacement`]).
pub fn replace(name: &str) -> String {
    format!("{REPLACE}{name}")
}

/// The id of a VM's ownership record: its name and the store revision that declared it, so
/// that a VM deleted and declared again under the same name starts a fresh record.
pub fn ownership_id(name: &str, uid: u64) -> String {
    format!("{name}.{uid}")
}

/// The name a replica process carries in its VM's ownership record: its host's name, a `/`,
/// and an id unique to that process start. A host may run two replicas of one VM for a while
/// (a backup that has just taken over beside a primary started again), so the record names
/// the process, not the host: nothing may take a record whose owner still runs.
pub fn replica_name(host: &str, id: &str) -> String {
    format!("{host}/{id}")
}

/// The host of a record's owner ([`replica_name`]; a bare name is a host's).
pub fn owner_host(owner: &str) -> &str {
    owner.split_once('/').map_or(owner, |(host, _)| host)
}

/// One entry of the timeline. Its key is derived from what happened (a failover of VM v at
/// generation g has one key), so that agents reporting the same thing twice — after a
/// restart, say — write it once; its place in the timeline is the store revision that wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    pub vm: Option<String>,
    pub host: Option<String>,
    pub message: String,
    /// When the writing agent saw it, by its own clock (display only; order is by revision).
    pub time_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    VmCreated,
    VmDeleted,
    Placed,
    Failover,
    Reprotect,
    Protected,
    ReplicaStopped,
    HostUp,
    HostDown,
    Rule,
    Error,
}

/// The identity of the failover event of VM `vm` (declaration `uid`) at `generation`: one per
/// takeover, however many agents report it, so counting these counts failovers.
pub fn failover_event(vm: &str, uid: u64, generation: u64) -> String {
    format!("{}{generation}", failover_event_prefix(vm, uid))
}

/// What every failover event identity of VM `vm` (declaration `uid`) starts with.
pub fn failover_event_prefix(vm: &str, uid: u64) -> String {
    format!("failover-{vm}-{uid}-")
}

/// The key of an event with this identity (only `[A-Za-z0-9._-]` and `/` survive).
pub fn event(identity: &str) -> String {
    let clean: String = identity
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' })
        .collect();
    let mut key = format!("{EVENTS}{clean}");
    key.truncate(store::kv::MAX_KEY_BYTES);
    key
}
