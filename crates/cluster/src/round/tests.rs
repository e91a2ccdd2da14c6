//! One round from hand-made states: each test names the behaviour it pins down.

use super::*;
use crate::observed::HostReport;
use crate::spec::VmSpec;
use store::OwnershipRecord;

pub(crate) fn declared(names: &[(&str, Protection)]) -> Declared {
    let mut declared = Declared::default();
    for (uid, (name, protection)) in names.iter().enumerate() {
        let spec: VmSpec = serde_json::from_value(serde_json::json!({"name": name})).unwrap();
        let spec = VmSpec { protection: *protection, ..spec }.checked().unwrap();
        declared.vms.insert(name.to_string(), DeclaredVm { spec, uid: uid as u64 + 1, created_ms: 0 });
    }
    declared
}

/// A host and its replicas (each named `HOST/VM` in ownership records unless named already).
fn host(name: &str, replicas: Vec<ReplicaReport>) -> (String, HostView) {
    let replicas = replicas
        .into_iter()
        .map(|r| ReplicaReport { name: r.name.clone().or_else(|| Some(crate::keys::replica_name(name, &r.vm))), ..r })
        .collect();
    let report = HostReport {
        name: name.into(),
        labels: Default::default(),
        address: format!("10.0.0.{}", name.len()),
        api: String::new(),
        memory_mib_free: 4096,
        seq: 1,
        time_ms: 0,
        replicas,
    };
    (name.to_string(), HostView { report, silent_ms: 0 })
}

fn replica(vm: &str, uid: u64, role: ReplicaRole) -> ReplicaReport {
    ReplicaReport {
        vm: vm.into(),
        uid,
        role,
        pid: Some(100),
        listen: (role == ReplicaRole::Backup).then(|| format!("{vm}-backup:7000")),
        backup_to: None,
        protected: None,
        generation: Some(1),
        epoch: None,
        lag_epochs: None,
        took_over_generation: None,
        disk_bytes: None,
        name: None,
    }
}

/// `vm`'s record, owned by its replica on `host` (as [`host`] names it).
fn owned_by(vm: &str, host: &str, generation: u64) -> (String, Option<OwnershipRecord>) {
    let owner = crate::keys::replica_name(host, vm);
    (vm.to_string(), Some(OwnershipRecord { generation, owner, state: store::VmState::Active }))
}

#[test]
fn a_new_vm_gets_its_primary_on_the_least_loaded_host() {
    let declared = declared(&[("web", Protection::Checkpoint)]);
    let busy = replica("other", 9, ReplicaRole::Backup);
    let observed = Observed {
        hosts: [host("a", vec![busy]), host("b", vec![]), host("c", vec![])].into_iter().collect(),
        ..Default::default()
    };
    assert_eq!(round("b", &declared, &observed), [Action::StartPrimary { vm: "web".into(), uid: 1, claim_from: None }]);
    assert_eq!(round("c", &declared, &observed), [], "every host picks the same one");
    // Host a also stops the replica of a VM nobody declared.
    assert!(matches!(&round("a", &declared, &observed)[..], [Action::Stop { reason: StopReason::Undeclared, .. }]));
}

#[test]
fn a_primary_without_backup_gets_one_elsewhere_then_protects_to_it() {
    let declared = declared(&[("web", Protection::Checkpoint)]);
    let mut observed = Observed {
        hosts: [host("a", vec![replica("web", 1, ReplicaRole::Primary)]), host("b", vec![])].into_iter().collect(),
        owners: [owned_by("web", "a", 1)].into_iter().collect(),
        ..Default::default()
    };
    assert_eq!(round("b", &declared, &observed), [Action::StartBackup { vm: "web".into(), uid: 1 }]);
    assert_eq!(round("a", &declared, &observed), [], "never on the primary's own host");
    observed.hosts.insert("b".into(), host("b", vec![replica("web", 1, ReplicaRole::Backup)]).1);
    let protect = Action::Protect { vm: "web".into(), uid: 1, to: "web-backup:7000".into() };
    assert_eq!(round("a", &declared, &observed), [protect]);
}

#[test]
fn a_replica_claiming_primary_without_the_record_is_stopped() {
    let declared = declared(&[("web", Protection::Checkpoint)]);
    let observed = Observed {
        hosts: [
            host("a", vec![replica("web", 1, ReplicaRole::Primary)]),
            host("b", vec![replica("web", 1, ReplicaRole::Primary)]),
        ]
        .into_iter()
        .collect(),
        owners: [owned_by("web", "b", 2)].into_iter().collect(),
        ..Default::default()
    };
    assert!(matches!(&round("a", &declared, &observed)[..], [Action::Stop { reason: StopReason::NotOwner, .. }]));
    assert!(!round("b", &declared, &observed).iter().any(|a| matches!(a, Action::Stop { .. })));
}

#[test]
fn a_silent_owner_and_an_owner_still_reporting_itself_a_backup_are_waited_for_not_replaced() {
    let declared = declared(&[("web", Protection::Checkpoint)]);
    let (name, mut dead) = host("a", vec![replica("web", 1, ReplicaRole::Primary)]);
    dead.silent_ms = 60_000;
    let mut observed = Observed {
        hosts: [(name, dead), host("b", vec![replica("web", 1, ReplicaRole::Backup)]), host("c", vec![])]
            .into_iter()
            .collect(),
        owners: [owned_by("web", "a", 1)].into_iter().collect(),
        ..Default::default()
    };
    // The backup takes over by itself (swapping the generation); nobody starts a primary.
    for me in ["a", "b", "c"] {
        assert_eq!(round(me, &declared, &observed), [], "{me}");
    }
    // It did (generation 2, owned by the backup), but b's agent read the backup's status just
    // before: it still reports a backup of generation 1. Nobody starts a primary beside it
    // (that would be a second live copy, and stopping either would end the VM).
    observed.owners.extend([owned_by("web", "b", 2)]);
    for me in ["a", "b", "c"] {
        assert_eq!(round(me, &declared, &observed), [], "{me}");
    }
}

#[test]
fn replicas_of_an_ended_or_redeclared_vm_stop() {
    let declared = declared(&[("web", Protection::None)]);
    let mut observed = Observed {
        hosts: [host("a", vec![replica("web", 7, ReplicaRole::Primary)])].into_iter().collect(),
        ..Default::default()
    };
    assert_eq!(
        round("a", &declared, &observed)[0],
        Action::Stop { vm: "web".into(), uid: 7, pid: Some(100), reason: StopReason::StaleDeclaration }
    );
    observed.hosts.insert("a".into(), host("a", vec![replica("web", 1, ReplicaRole::Primary)]).1);
    let ended = OwnershipRecord { generation: 3, owner: "a".into(), state: store::VmState::Ended { exit_code: 0 } };
    observed.owners.insert("web".into(), Some(ended));
    assert!(matches!(&round("a", &declared, &observed)[..], [Action::Stop { reason: StopReason::Ended, .. }]));
}

#[test]
fn a_backup_asked_to_move_goes_to_a_third_host_never_back_to_its_own_or_the_primarys() {
    let mut declared = declared(&[("web", Protection::Checkpoint)]);
    declared.replacing.insert("web".into(), crate::spec::Replacement { uid: 1, host: "b".into() });
    let mut primary = replica("web", 1, ReplicaRole::Primary);
    primary.backup_to = Some("web-backup:7000".into());
    primary.protected = Some(true);
    // Host b is the least loaded once its backup is gone, and a the primary's: neither may get it.
    let busy = || vec![replica("x", 9, ReplicaRole::Backup), replica("y", 9, ReplicaRole::Backup)];
    let mut observed = Observed {
        hosts: [
            host("a", vec![primary.clone()]),
            host("b", vec![replica("web", 1, ReplicaRole::Backup)]),
            host("c", busy()),
        ]
        .into_iter()
        .collect(),
        owners: [owned_by("web", "a", 1)].into_iter().collect(),
        ..Default::default()
    };
    // (c also stops the undeclared replicas that make it busy.)
    let of_web = |me: &str, observed: &Observed| -> Vec<Action> {
        round(me, &declared, observed)
            .into_iter()
            .filter(|a| !matches!(a, Action::Stop { vm, .. } if vm != "web"))
            .collect()
    };
    assert!(matches!(&of_web("b", &observed)[..], [Action::Stop { reason: StopReason::Replaced, .. }]));
    assert_eq!(of_web("c", &observed), [Action::StartBackup { vm: "web".into(), uid: 1 }]);
    // The old backup gone: the new one still goes to c, never to b or a.
    observed.hosts.insert("b".into(), host("b", vec![]).1);
    assert_eq!(of_web("c", &observed), [Action::StartBackup { vm: "web".into(), uid: 1 }]);
    assert_eq!(of_web("b", &observed), []);
    assert_eq!(of_web("a", &observed), [], "never on the primary's host");
    // Protected by c's backup: the request is done, and the first alive host removes it.
    let mut moved = replica("web", 1, ReplicaRole::Backup);
    moved.listen = Some("c:7000".into());
    let mut c = busy();
    c.push(moved);
    observed.hosts.insert("c".into(), host("c", c).1);
    primary.backup_to = Some("c:7000".into());
    observed.hosts.insert("a".into(), host("a", vec![primary]).1);
    assert_eq!(of_web("a", &observed), [Action::RemoveKey { key: "/ftvm/replace/web".into() }]);
}

#[test]
fn a_backup_asked_to_move_stays_when_no_other_host_can_take_it() {
    let mut declared = declared(&[("web", Protection::Checkpoint)]);
    declared.replacing.insert("web".into(), crate::spec::Replacement { uid: 1, host: "b".into() });
    let mut primary = replica("web", 1, ReplicaRole::Primary);
    primary.backup_to = Some("web-backup:7000".into());
    primary.protected = Some(true);
    let mut observed = Observed {
        hosts: [host("a", vec![primary]), host("b", vec![replica("web", 1, ReplicaRole::Backup)])]
            .into_iter()
            .collect(),
        owners: [owned_by("web", "a", 1)].into_iter().collect(),
        ..Default::default()
    };
    assert_eq!(round("b", &declared, &observed), [], "protection on b beats none");
    // Lost anyway: b is the only place left for it.
    observed.hosts.insert("b".into(), host("b", vec![]).1);
    assert_eq!(round("b", &declared, &observed), [Action::StartBackup { vm: "web".into(), uid: 1 }]);
    // A request about an earlier declaration is dropped.
    declared.replacing.insert("web".into(), crate::spec::Replacement { uid: 7, host: "b".into() });
    assert!(round("a", &declared, &observed).contains(&Action::RemoveKey { key: "/ftvm/replace/web".into() }));
}

#[test]
fn a_primary_whose_process_is_gone_starts_again_on_its_host_taking_exactly_its_record() {
    let declared = declared(&[("web", Protection::None)]);
    let mut observed = Observed {
        hosts: [host("a", vec![]), host("b", vec![])].into_iter().collect(),
        owners: [owned_by("web", "a", 3)].into_iter().collect(),
        ..Default::default()
    };
    let claim_from = Some(ClaimFrom { generation: 3, owner: "a/web".into() });
    assert_eq!(round("a", &declared, &observed), [Action::StartPrimary { vm: "web".into(), uid: 1, claim_from }]);
    assert_eq!(round("b", &declared, &observed), []);
    // Another replica of the VM on a, claiming primary under another name, does not own the
    // record: it is stopped, and the owner is waited for no longer than its process runs.
    let mut other = replica("web", 1, ReplicaRole::Primary);
    other.name = Some("a/web-again".into());
    observed.hosts.insert("a".into(), host("a", vec![other]).1);
    assert!(matches!(&round("a", &declared, &observed)[..], [Action::Stop { reason: StopReason::NotOwner, .. }]));
}

#[test]
fn only_a_users_end_or_an_ended_vm_stops_a_replica_by_ending_the_vm() {
    use StopReason::*;
    let ends: Vec<StopReason> =
        [Undeclared, StaleDeclaration, NotOwner, Ended, ExtraBackup, SameHostAsPrimary, Quarantined, Replaced]
            .into_iter()
            .filter(|r| r.ends_the_vm())
            .collect();
    assert_eq!(ends, [Undeclared, StaleDeclaration, Ended]);
}
