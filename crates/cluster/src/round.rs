//! One round of the control loop: from what is declared and what one host observes, the
//! actions that host takes now. A pure function — no memory of earlier rounds — so the loop
//! converges from whatever state it finds (DESIGN.md §8). Every host computes the same
//! decisions from the same observation and carries out only its own share; where two hosts
//! see differently and both act, the ownership record decides (a primary starts only by
//! swapping the record, a backup goes live only by swapping the generation its state belongs
//! to), so a disagreement costs a refused start, never two live copies.
//!
//! Per declared VM:
//! - its record ended → stop its replicas;
//! - the record's owner (a replica process, by name) runs it → that replica is the primary; any
//!   other replica claiming to be primary is stopped (it lost its generation); an owner not
//!   reporting itself primary yet (a backup taking over) is waited for;
//! - no record and nothing starting → place a primary on the best eligible host;
//! - the owner's host is alive but no longer runs the owner, and no backup holds the current
//!   generation → start the primary there again (its state is gone with its process), taking
//!   exactly that record;
//! - checkpoint protection: a primary with no backup gets one placed on another eligible host;
//!   a primary not replicating to its backup is told to protect to it; extra backups stop;
//! - a backup asked to move (a rule's `reprotect_elsewhere`) stops once another eligible host
//!   (not the primary's) can take its place, and the new one goes there.
//!
//! Replicas of VMs not declared, or of an earlier declaration of the same name, stop.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use store::VmState;

use crate::observed::{HostView, Observed, ReplicaReport, ReplicaRole, HOST_FORGET_MS};
use crate::spec::{Declared, DeclaredVm, Protection};
use crate::HostState;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Start the VM from its images here; the process claims the ownership record (taking it
    /// from `claim_from`, an owner whose process is gone, and from nothing else).
    StartPrimary { vm: String, uid: u64, claim_from: Option<ClaimFrom> },
    /// Start a backup of the VM here, listening on this host's address.
    StartBackup { vm: String, uid: u64 },
    /// Tell this host's primary of the VM to replicate to `to` (`ctl protect`).
    Protect { vm: String, uid: u64, to: String },
    /// Stop a replica process on this host.
    Stop { vm: String, uid: u64, pid: Option<u32>, reason: StopReason },
    /// Remove a host's report from the store (silent for [`HOST_FORGET_MS`]).
    ForgetHost { host: String },
    /// Remove a key whose value is not what belongs there.
    RemoveKey { key: String },
}

/// The record a primary started again may take: exactly this generation, owned by this
/// replica (whose process its host no longer runs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimFrom {
    pub generation: u64,
    pub owner: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The VM is not declared (any more).
    Undeclared,
    /// The replica belongs to an earlier declaration of the name.
    StaleDeclaration,
    /// It claims to be primary but does not own the record.
    NotOwner,
    /// The VM ended (its record says so).
    Ended,
    /// More backups than the protection needs.
    ExtraBackup,
    /// On the primary's own host, where it protects nothing.
    SameHostAsPrimary,
    /// Its host is quarantined.
    Quarantined,
    /// A rule asked for the VM's backup elsewhere, and another host can take it.
    Replaced,
}

impl StopReason {
    /// Whether the stop ends the VM (its record marked ended): only when a user ended it (the
    /// VM deleted or declared anew) or it ended already. Every other stop is of a replica the
    /// VM can do without, and must leave the record as it is.
    pub fn ends_the_vm(self) -> bool {
        matches!(self, StopReason::Undeclared | StopReason::StaleDeclaration | StopReason::Ended)
    }
}

/// The actions host `me` takes this round.
pub fn round(me: &str, declared: &Declared, observed: &Observed) -> Vec<Action> {
    let mut actions = Vec::new();
    for dv in declared.vms.values() {
        actions.extend(vm_round(dv, declared, observed).into_iter().filter(|(host, _)| host == me).map(|(_, a)| a));
    }
    for (host, replica) in observed.live_replicas() {
        if host == me && !declared.vms.contains_key(&replica.vm) {
            actions.push(stop(replica, StopReason::Undeclared));
        }
    }
    // Housekeeping falls to one host: the first alive one by name.
    let janitor = observed.hosts.iter().find(|(_, view)| view.alive()).map(|(name, _)| name.as_str());
    if janitor == Some(me) {
        for (name, view) in &observed.hosts {
            if view.silent_ms >= HOST_FORGET_MS {
                actions.push(Action::ForgetHost { host: name.clone() });
            }
        }
        for key in &observed.garbage_keys {
            actions.push(Action::RemoveKey { key: key.clone() });
        }
        for (vm, replacement) in &declared.replacing {
            let done = match declared.vms.get(vm) {
                Some(dv) if dv.uid == replacement.uid => replacement_done(dv, &replacement.host, observed),
                _ => true,
            };
            if done {
                actions.push(Action::RemoveKey { key: crate::keys::replace(vm) });
            }
        }
    }
    actions
}

/// Whether `dv`'s primary is protected by a backup that is not on `host` (or the VM has no
/// backups to move).
fn replacement_done(dv: &DeclaredVm, host: &str, observed: &Observed) -> bool {
    if dv.spec.protection == Protection::None {
        return true;
    }
    let name = &dv.spec.name;
    let mine = || observed.live_replicas().filter(|(_, r)| &r.vm == name && r.uid == dv.uid);
    mine().any(|(_, primary)| {
        primary.role == ReplicaRole::Primary
            && primary.protected == Some(true)
            && mine().any(|(h, b)| h != host && b.role == ReplicaRole::Backup && b.listen == primary.backup_to)
    })
}

fn stop(replica: &ReplicaReport, reason: StopReason) -> Action {
    Action::Stop { vm: replica.vm.clone(), uid: replica.uid, pid: replica.pid, reason }
}

/// Every host's actions for one VM, each with the host that takes it.
fn vm_round(dv: &DeclaredVm, declared: &Declared, observed: &Observed) -> Vec<(String, Action)> {
    let name = &dv.spec.name;
    let mut actions = Vec::new();
    let mut replicas: Vec<(&str, &ReplicaReport)> = Vec::new();
    for (host, replica) in observed.live_replicas().filter(|(_, r)| &r.vm == name) {
        match replica.uid == dv.uid {
            true => replicas.push((host, replica)),
            false => actions.push((host.to_string(), stop(replica, StopReason::StaleDeclaration))),
        }
    }
    let record = observed.owners.get(name).cloned().flatten();
    if let Some(record) = &record {
        if matches!(record.state, VmState::Ended { .. }) {
            actions.extend(replicas.iter().map(|(host, r)| (host.to_string(), stop(r, StopReason::Ended))));
            return actions;
        }
    }
    let owner = record.as_ref().map(|r| r.owner.as_str());
    let owner_host = owner.map(crate::keys::owner_host);
    // The replica the record names, found by name on its host: it owns the VM whatever its
    // report says (a report may lag the record by a swap, never lead it: a backup that has
    // just taken over still reports itself a backup).
    let owner_replica = replicas
        .iter()
        .find(|(host, r)| Some(*host) == owner_host && r.name.is_some() && r.name.as_deref() == owner)
        .copied();
    // The primary: the owner claiming the role. Every other claim is stale.
    let primary = owner_replica.filter(|(_, r)| r.role == ReplicaRole::Primary);
    for (host, replica) in &replicas {
        let is_owner = owner_replica.is_some_and(|(h, p)| h == *host && std::ptr::eq(p, *replica));
        if replica.role == ReplicaRole::Primary && !is_owner {
            actions.push((host.to_string(), stop(replica, StopReason::NotOwner)));
        }
    }
    let others: Vec<(&str, &ReplicaReport)> =
        replicas.iter().filter(|(_, r)| r.role != ReplicaRole::Primary).copied().collect();
    match primary {
        Some((primary_host, primary)) => {
            actions.extend(protect_round(dv, declared, observed, (primary_host, primary), &others, &replicas));
        }
        // The owner runs but does not report itself primary yet (taking over, or starting): wait.
        None if owner_replica.is_some() => {}
        None => {
            // A start waits for replicas still starting, and for stale claims to be stopped.
            let starting = others.iter().any(|(_, r)| r.role == ReplicaRole::Starting)
                || replicas.iter().any(|(_, r)| r.role == ReplicaRole::Primary);
            let current_generation = record.as_ref().map(|r| r.generation);
            let backup_can_take_over = others.iter().any(|(_, r)| {
                r.role == ReplicaRole::Backup && r.generation.is_some() && r.generation == current_generation
            });
            let owner_alive = owner_host.is_some_and(|o| observed.hosts.get(o).is_some_and(HostView::alive));
            let start_on = match (owner_host, &record) {
                // The owner's process is gone (its host, alive, runs no replica of that name), and
                // no backup can continue the VM: start it again there, taking exactly that record.
                // (A backup left on that host, stale, does not hold the VM: it is stopped once the
                // primary runs beside it.)
                (Some(o), Some(record)) if owner_alive && !starting && !backup_can_take_over => Some((
                    o.to_string(),
                    Some(ClaimFrom { generation: record.generation, owner: record.owner.clone() }),
                )),
                (Some(_), _) => None,
                (None, _) if !starting => choose_host(dv, declared, observed, &replicas).map(|host| (host, None)),
                (None, _) => None,
            };
            if let Some((host, claim_from)) = start_on {
                actions.push((host, Action::StartPrimary { vm: name.clone(), uid: dv.uid, claim_from }));
            }
        }
    }
    actions
}

/// A primary runs on `primary_host`: give it the backups its protection needs.
fn protect_round(
    dv: &DeclaredVm,
    declared: &Declared,
    observed: &Observed,
    (primary_host, primary): (&str, &ReplicaReport),
    others: &[(&str, &ReplicaReport)],
    all: &[(&str, &ReplicaReport)],
) -> Vec<(String, Action)> {
    let name = &dv.spec.name;
    let mut actions = Vec::new();
    let mut candidates = Vec::new();
    // A backup to move off `leave`, once a host other than the primary's and `leave` has or
    // can get one (else it stays: protection on that host beats none).
    let leave = declared.replacing.get(name).filter(|r| r.uid == dv.uid).map(|r| r.host.as_str());
    let elsewhere = leave.and_then(|leave| {
        let has_other = others.iter().any(|(h, _)| *h != leave && *h != primary_host);
        let other_host = choose_host_avoiding(dv, declared, observed, all, Some(leave));
        (has_other || other_host.is_some()).then_some(other_host)
    });
    for (host, replica) in others {
        let quarantined = declared.host_states.get(*host) == Some(&HostState::Quarantined);
        let reason = match () {
            _ if dv.spec.protection == Protection::None && replica.role == ReplicaRole::Backup => {
                Some(StopReason::ExtraBackup)
            }
            _ if *host == primary_host && dv.spec.placement.distinct_hosts => Some(StopReason::SameHostAsPrimary),
            _ if quarantined => Some(StopReason::Quarantined),
            _ if Some(*host) == leave && elsewhere.is_some() => Some(StopReason::Replaced),
            _ => None,
        };
        match reason {
            Some(reason) => actions.push((host.to_string(), stop(replica, reason))),
            None => candidates.push((*host, *replica)),
        }
    }
    if dv.spec.protection == Protection::None {
        return actions;
    }
    // Keep the backup the primary replicates to, else the first ready one; stop the rest.
    let ready = |r: &ReplicaReport| r.role == ReplicaRole::Backup && r.listen.is_some();
    let keep = candidates
        .iter()
        .find(|(_, r)| ready(r) && r.listen.is_some() && r.listen == primary.backup_to)
        .or_else(|| candidates.iter().find(|(_, r)| ready(r)))
        .copied();
    let starting = candidates.iter().any(|(_, r)| r.role == ReplicaRole::Starting);
    for (host, replica) in &candidates {
        let kept = keep.is_some_and(|(h, _)| h == *host);
        if replica.role == ReplicaRole::Backup && !kept {
            actions.push((host.to_string(), stop(replica, StopReason::ExtraBackup)));
        }
    }
    match keep {
        Some((_, backup)) if backup.listen != primary.backup_to => {
            if let Some(to) = &backup.listen {
                actions.push((
                    primary_host.to_string(),
                    Action::Protect { vm: name.clone(), uid: dv.uid, to: to.clone() },
                ));
            }
        }
        Some(_) => {}
        None if !starting => {
            // Hosts with any replica of the VM, even one being stopped, wait for the next round.
            let host = elsewhere.flatten().or_else(|| choose_host(dv, declared, observed, all));
            if let Some(host) = host {
                actions.push((host, Action::StartBackup { vm: name.clone(), uid: dv.uid }));
            }
        }
        None => {}
    }
    actions
}

/// The best eligible host for a new replica of `dv`: alive, active, with the labels asked
/// for and none of those to avoid, enough free memory, and (distinct hosts) no replica of the
/// VM yet; the least loaded first, then by name, so every observer picks the same one.
pub fn choose_host(
    dv: &DeclaredVm,
    declared: &Declared,
    observed: &Observed,
    occupied: &[(&str, &ReplicaReport)],
) -> Option<String> {
    choose_host_avoiding(dv, declared, observed, occupied, None)
}

/// [`choose_host`], never `avoid` (whatever `distinct_hosts` says).
fn choose_host_avoiding(
    dv: &DeclaredVm,
    declared: &Declared,
    observed: &Observed,
    occupied: &[(&str, &ReplicaReport)],
    avoid: Option<&str>,
) -> Option<String> {
    let placement = &dv.spec.placement;
    let taken: BTreeSet<&str> = occupied.iter().map(|(host, _)| *host).collect();
    let needed_mib = dv.spec.memory_mib.saturating_add(placement.min_free_memory_mib);
    observed
        .hosts
        .iter()
        .filter(|(_, view)| view.alive())
        .filter(|(name, _)| Some(name.as_str()) != avoid)
        .filter(|(name, _)| declared.host_states.get(*name).copied().unwrap_or_default() == HostState::Active)
        .filter(|(name, _)| !placement.distinct_hosts || !taken.contains(name.as_str()))
        .filter(|(_, view)| placement.labels.iter().all(|(k, v)| view.report.labels.get(k) == Some(v)))
        .filter(|(_, view)| !placement.avoid_labels.iter().any(|(k, v)| view.report.labels.get(k) == Some(v)))
        .filter(|(_, view)| view.report.memory_mib_free >= needed_mib)
        .min_by_key(|(name, view)| (view.report.replicas.len(), name.as_str()))
        .map(|(name, _)| name.clone())
}

#[cfg(test)]
mod tests;
