//! A real service with a real client, judged from the client's side: Debian's
//! redis-server (trixie, riscv64, in guest/debian-test/out/redis-initrd.cpio.gz) runs in a
//! checkpoint-replicated VM, and Debian's redis-cli on the host (bookworm's redis-tools,
//! installed by scripts/test) counts with INCR over one long-lived TCP session while the
//! primary is killed with SIGKILL. Every reply the client got is acknowledged work: the
//! replies must run 1, 2, 3, ... with no value twice and none skipped, across the takeover,
//! and the session must survive it. Root (network namespaces).
//! A failing run prints FTVM_TEST_SEED (where in the epoch the kill lands).

mod common;

use common::cluster::{Cluster, Options, BACKUP_PORT, BOOT_LIMIT};
use common::netns::Topology;
use common::redis::{
    check_consecutive, cut_and_heal, redis_cli, redis_image, shutdown_ends_both_sides, wait_pong, Session, SERVER,
};
use common::relay::Mode;
use common::seed;
use common::strangers::{Kind, Strangers};
use std::time::{Duration, Instant};

const PROTECTED_LIMIT: Duration = Duration::from_secs(60);
const TAKEOVER_LIMIT: Duration = Duration::from_secs(30);
/// Replies the session must get after the kill.
const REPLIES_AFTER: usize = 30;

/// Boot redis-server replicated with this detection timeout; return once it answers PING,
/// the primary is protected and a counting session has had 50 replies.
fn started(name: &str, seed: u64, failover_timeout_ms: u64) -> (Cluster, Session) {
    let options = Options {
        command: SERVER.map(String::from).to_vec(),
        initrd: Some(redis_image()),
        failover_timeout_ms,
        ..Options::counter(seed)
    };
    let mut cluster = Cluster::start(name, &options);
    let ns = cluster.topo.client_ns();
    assert!(wait_pong(&ns, BOOT_LIMIT), "redis-server never answered PING\n{}", cluster.explain());
    cluster.wait_protected(PROTECTED_LIMIT);
    let mut session = Session::start(&ns);
    assert!(session.wait_for(50, Duration::from_secs(60), None), "the session got {} replies", session.count());
    (cluster, session)
}

/// SIGKILL the primary anywhere within a few epochs (so that across runs the kill lands at
/// every phase of a checkpoint); the backup must take over, the session must go on, and
/// every reply it ever got must run 1, 2, 3, ... Returns the replies and those after the kill.
fn kill_and_check(mut cluster: Cluster, session: Session, seed: u64) -> (usize, usize) {
    std::thread::sleep(Duration::from_millis(seed % 200));
    let killed = cluster.kill_primary();
    let live = cluster.wait_takeover(TAKEOVER_LIMIT);
    let mut session = session;
    let answered = session.wait_for(REPLIES_AFTER, Duration::from_secs(60), Some(killed));
    let got = session.stop();
    let after = got.count_after(killed);
    assert!(
        answered,
        "seed {seed}: the session got {after} replies after the kill (redis-cli said {:?}); \
         the backup's status: {live}\n{}",
        got.stderr,
        cluster.explain()
    );
    check_consecutive(&got.replies).unwrap_or_else(|e| panic!("seed {seed}: {e}\n{}", cluster.explain()));
    // A new connection to the VM that carries on sees the count the session last saw.
    let ns = cluster.topo.client_ns();
    got.check_count(&ns).unwrap_or_else(|e| panic!("seed {seed}: {e}\n{}", cluster.explain()));
    (got.replies.len(), after)
}

#[test]
fn debians_redis_cli_counts_on_through_a_sigkill_of_the_primary_with_nothing_lost() {
    let seed = seed();
    // Twice the other tests' detection timeout: redis' larger image boots with more pauses,
    // and a spurious takeover on a loaded machine (correctly refused to the primary by the
    // ownership record) would end the test before its kill.
    let (cluster, session) = started("redis", seed, 1000);
    let (replies, after) = kill_and_check(cluster, session, seed);
    println!("{replies} replies, {after} after the kill");
}

/// The faults of the stale-takeover issue in sequence, judged by Debian's redis-cli: strangers
/// on the backup's port the whole time, then a link damaging 1% of its chunks, then the link
/// cut for 3 s (the primary serves on, unprotected; the backup's state is stale) and healed
/// (the backup resynchronizes under a new generation), then a SIGKILL of the primary. The
/// session's replies must run on consecutively through all of it.
#[test]
fn debians_redis_cli_counts_on_through_strangers_damage_a_cut_and_a_sigkill_in_sequence() {
    let seed = seed();
    // The cut tests' detection timeout: beyond the 700 ms the primary takes to give up on a
    // silent backup and swap the generation forward, so the primary is the side that stays live.
    let (mut cluster, session) = started("redis-seq", seed, 1500);
    let backup_port = format!("{}:{BACKUP_PORT}", Topology::BACKUP_REPL_ADDR).parse().unwrap();
    let kinds = [Kind::Idle, Kind::Garbage, Kind::SlowHeader, Kind::Hangup];
    let strangers = Strangers::every(&cluster.topo.primary_ns(), backup_port, &kinds, Duration::from_millis(300), seed);

    cluster.relay.set(Mode::Damage(0.01));
    let replies = session.count();
    let mut session = session;
    assert!(
        session.wait_for(replies + 50, Duration::from_secs(60), None),
        "seed {seed}: the session stalled on a damaged link at {} replies\n{}",
        session.count(),
        cluster.explain()
    );
    // Until the relay has damaged a few chunks (the link carries a checkpoint every 25 ms).
    let deadline = Instant::now() + Duration::from_secs(60);
    while cluster.relay.stats().damaged_chunks < 5 {
        assert!(Instant::now() < deadline, "the relay damaged too little: {:?}", cluster.relay.stats());
        std::thread::sleep(Duration::from_millis(50));
    }
    let damaged = cluster.relay.stats().damaged_chunks;
    cluster.relay.set(Mode::Pass);
    let served = cut_and_heal(&mut cluster, &mut session, seed, PROTECTED_LIMIT, |_| true);
    let opened = strangers.opened();
    let (replies, after) = kill_and_check(cluster, session, seed);
    drop(strangers);
    assert!(opened >= 20, "only {opened} stranger connections opened");
    println!("{replies} replies, {damaged} chunks damaged, {served} while cut off, {after} after the kill; {opened} strangers");
}

/// A replicated VM that ends stays ended, when a real client ends it: redis-cli tells the
/// server to shut down while the session counts; the guest's command exits, the VM powers
/// off, and both replicas exit with its status. The backup never goes live (which would
/// bring redis back with an older count), and the replies up to the end run on.
#[test]
fn a_redis_server_shut_down_by_its_client_ends_the_replicated_vm_on_both_sides() {
    let seed = seed();
    let (mut cluster, mut session) = started("redis-end", seed, 1000);
    assert!(session.wait_for(session.count() + 20, Duration::from_secs(60), None), "the session stalled");
    shutdown_ends_both_sides(&mut cluster, session, seed);
}
