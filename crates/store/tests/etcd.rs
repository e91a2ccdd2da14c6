//! The etcd backend against a real etcd server started by the test.

mod etcd_server;

use etcd_server::EtcdServer;
use std::time::Instant;
use store::{Expect, KvStore, OwnershipRecord, OwnershipStore, SwapOutcome, VmState};

fn active(generation: u64, owner: &str) -> OwnershipRecord {
    OwnershipRecord { generation, owner: owner.to_string(), state: VmState::Active }
}

#[test]
fn etcd_kv_writes_conditionally_on_the_mod_revision() {
    let etcd = EtcdServer::start("kv");
    let mut kv = store::EtcdKv::new(&etcd.urls()).unwrap();
    assert_eq!(kv.get("/t/a").unwrap(), None);
    assert!(kv.put_if("/t/a", Expect::Absent, b"one").unwrap());
    assert!(!kv.put_if("/t/a", Expect::Absent, b"again").unwrap(), "exists already");
    let first = kv.get("/t/a").unwrap().unwrap();
    assert_eq!(first.value, b"one");
    assert!(kv.put_if("/t/a", Expect::ModRevision(first.mod_revision), b"two").unwrap());
    assert!(!kv.put_if("/t/a", Expect::ModRevision(first.mod_revision), b"stale").unwrap());
    let revision = kv.put("/t/b", &[0, 255, 10]).unwrap();
    assert_eq!(kv.get("/t/b").unwrap().unwrap().mod_revision, revision);
    assert_eq!(kv.get("/t/b").unwrap().unwrap().value, [0, 255, 10], "binary values survive base64");
    kv.put("/t0", b"just past the prefix").unwrap();
    let listed: Vec<String> = kv.list("/t/").unwrap().into_iter().map(|(key, _)| key).collect();
    assert_eq!(listed, ["/t/a", "/t/b"]);
    let second = kv.get("/t/a").unwrap().unwrap();
    assert!(!kv.delete_if("/t/a", first.mod_revision).unwrap());
    assert!(kv.delete_if("/t/a", second.mod_revision).unwrap());
    kv.delete("/t/b").unwrap();
    assert!(kv.list("/t/").unwrap().is_empty());
}

#[test]
fn ownership_on_etcd_is_a_transaction_on_the_revision() {
    let etcd = EtcdServer::start("owner");
    let mut store = store::open(&etcd.spec()).unwrap();
    assert_eq!(store.read("vm").unwrap(), None);
    assert_eq!(store.compare_and_swap("vm", None, &active(1, "a")).unwrap(), SwapOutcome::Swapped(active(1, "a")));
    assert_eq!(
        store.compare_and_swap("vm", None, &active(1, "b")).unwrap(),
        SwapOutcome::Conflict(Some(active(1, "a")))
    );
    // Two contenders for generation 2, each with its own connection: exactly one wins.
    let contenders: Vec<_> = ["b", "c"]
        .into_iter()
        .map(|owner| {
            let spec = etcd.spec();
            std::thread::spawn(move || {
                let mut store = store::open(&spec).unwrap();
                matches!(store.compare_and_swap("vm", Some(1), &active(2, owner)).unwrap(), SwapOutcome::Swapped(_))
            })
        })
        .collect();
    let wins = contenders.into_iter().map(|t| t.join().unwrap()).filter(|won| *won).count();
    assert_eq!(wins, 1);
    assert_eq!(store.read("vm").unwrap().unwrap().generation, 2);
}

#[test]
fn many_racing_swaps_lose_no_generation() {
    let etcd = EtcdServer::start("race");
    let threads: Vec<_> = (0..4)
        .map(|n| {
            let spec = etcd.spec();
            std::thread::spawn(move || {
                let mut store = store::open(&spec).unwrap();
                let mut wins = 0;
                while wins < 10 {
                    let current = store.read("vm").unwrap().map(|r| r.generation);
                    let next = active(current.map_or(1, |g| g + 1), &format!("owner-{n}"));
                    if let SwapOutcome::Swapped(_) = store.compare_and_swap("vm", current, &next).unwrap() {
                        wins += 1;
                    }
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    let mut store = store::open(&etcd.spec()).unwrap();
    assert_eq!(store.read("vm").unwrap().unwrap().generation, 40, "every swap that won raised it by one");
}

#[test]
fn a_stopped_etcd_is_unreachable_and_a_restarted_one_keeps_the_records() {
    let mut etcd = EtcdServer::start("restart");
    let mut store = store::open(&etcd.spec()).unwrap();
    store.compare_and_swap("vm", None, &active(1, "a")).unwrap();
    etcd.kill();
    let error = store.read("vm").unwrap_err();
    assert!(error.is_unreachable(), "{error}");
    etcd.restart();
    assert_eq!(store.read("vm").unwrap(), Some(active(1, "a")));
}

/// Prints the cost of a takeover's store work (a read, then a transaction), the figure the
/// choice of client rests on. Not a timing assertion.
#[test]
fn takeover_store_work_is_timed() {
    let etcd = EtcdServer::start("timing");
    let mut store = store::open(&etcd.spec()).unwrap();
    store.compare_and_swap("vm", None, &active(1, "a")).unwrap();
    let rounds = 200;
    let start = Instant::now();
    for generation in 1..=rounds {
        let current = store.read("vm").unwrap().unwrap();
        assert_eq!(current.generation, generation);
        let outcome = store.compare_and_swap("vm", Some(generation), &active(generation + 1, "b")).unwrap();
        assert!(matches!(outcome, SwapOutcome::Swapped(_)));
    }
    let each_ms = start.elapsed().as_secs_f64() * 1000.0 / rounds as f64;
    println!("etcd JSON gateway: read + compare-and-swap {each_ms:.3} ms per takeover ({rounds} rounds)");
}
