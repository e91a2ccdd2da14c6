//! The namespace topology the demo and the replication tests stand on (root).

mod common;

use common::netns::Topology;
use std::process::Command;

fn namespaces() -> String {
    String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output().unwrap().stdout).to_string()
}

fn ping(topo: &Topology, ns: &str, addr: &str) -> bool {
    topo.exec(ns, &["busybox", "ping", "-c", "1", "-W", "2", addr]).is_ok()
}

#[test]
fn the_topology_links_the_hosts_and_is_removed_on_drop() {
    let prefix = format!("ftvm-t{}", std::process::id());
    let topo = Topology::create(&prefix).unwrap();
    assert!(ping(&topo, &topo.primary_ns(), Topology::BACKUP_REPL_ADDR), "replication link");
    // The client reaches a host's bridge: give the primary's bridge an address.
    topo.exec(&topo.primary_ns(), &["ip", "addr", "add", "10.0.2.50/24", "dev", "br0"]).unwrap();
    assert!(ping(&topo, &topo.client_ns(), "10.0.2.50"), "client through the switch");
    topo.set_replication_link(false).unwrap();
    assert!(!ping(&topo, &topo.primary_ns(), Topology::BACKUP_REPL_ADDR), "a cut link carries nothing");
    drop(topo);
    assert!(!namespaces().contains(&prefix), "namespaces removed");
}

/// The impairment relay the replication tests put on the link: it passes bytes intact,
/// a cut holds them (the connection stays open and nothing is lost), and damage alters
/// chunks with the probability asked.
#[test]
fn the_relay_passes_holds_during_a_cut_and_damages_as_asked() {
    use common::relay::{Mode, Relay};
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    let prefix = format!("ftvm-r{}", std::process::id());
    let topo = Topology::create(&prefix).unwrap();
    let ns = topo.backup_ns();
    // An echo server inside the namespace, behind the relay.
    let netns = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let listener = TcpListener::bind("127.0.0.1:7000").unwrap();
        tx.send(()).unwrap();
        for mut s in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = s.read(&mut buf) {
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    rx.recv().unwrap();
    let relay = Relay::start(&ns, "127.0.0.1:7100".parse().unwrap(), "127.0.0.1:7000".parse().unwrap(), 7);
    // Sockets keep the namespace they were made in: connect from a thread inside it.
    let netns = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
    let mut s = std::thread::spawn(move || {
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        TcpStream::connect("127.0.0.1:7100").unwrap()
    })
    .join()
    .unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
    s.write_all(&data).unwrap();
    let mut echoed = vec![0u8; data.len()];
    s.read_exact(&mut echoed).unwrap();
    assert_eq!(echoed, data, "pass mode echoes the bytes intact");
    let mut got = [0u8; 4];
    relay.set(Mode::Cut);
    s.write_all(b"late").unwrap();
    assert!(s.read_exact(&mut got).is_err(), "nothing passes a cut link");
    relay.set(Mode::Pass);
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"late", "a cut loses nothing: the bytes wait, as TCP would retransmit them");
    relay.set(Mode::Damage(1.0));
    s.write_all(b"intact?").unwrap();
    let mut got = [0u8; 7];
    s.read_exact(&mut got).unwrap();
    assert_ne!(&got, b"intact?", "damage alters the bytes");
    assert!(relay.stats().damaged_chunks >= 1);
}
