//! A real service with a real client, judged from the client's side: Debian's
//! redis-server (trixie, riscv64, in guest/debian-test/out/redis-initrd.cpio.gz) runs in a
//! checkpoint-replicated VM, and Debian's redis-cli on the host (bookworm's redis-tools,
//! installed by scripts/test) counts with INCR over one long-lived TCP session while the
//! primary is killed with SIGKILL. Every reply the client got is acknowledged work: the
//! replies must run 1, 2, 3, ... with no value twice and none skipped, across the takeover,
//! and the session must survive it. Root (network namespaces).
//! A failing run prints FTVM_TEST_SEED (where in the epoch the kill lands).

mod common;

use common::cluster::{Cluster, Options, BOOT_LIMIT};
use common::redis::{check_consecutive, redis_cli, redis_image, Session, SERVER};
use common::seed;
use std::time::{Duration, Instant};

const PROTECTED_LIMIT: Duration = Duration::from_secs(60);
const TAKEOVER_LIMIT: Duration = Duration::from_secs(30);
/// Replies the session must get after the kill.
const REPLIES_AFTER: usize = 30;

#[test]
fn debians_redis_cli_counts_on_through_a_sigkill_of_the_primary_with_nothing_lost() {
    let seed = seed();
    let image = redis_image();
    let options = Options {
        command: SERVER.map(String::from).to_vec(),
        initrd: Some(image),
        // Twice the other tests' detection timeout: redis' larger image boots with more
        // pauses, and a spurious takeover on a loaded machine (correctly refused to the
        // primary by the ownership record) would end the test before its kill.
        failover_timeout_ms: 1000,
        ..Options::counter(seed)
    };
    let mut cluster = Cluster::start("redis", &options);
    let ns = cluster.topo.client_ns();
    let deadline = Instant::now() + BOOT_LIMIT;
    while redis_cli(&ns, &["PING"]).as_deref() != Some("PONG") {
        assert!(Instant::now() < deadline, "redis-server never answered PING\n{}", cluster.explain());
        std::thread::sleep(Duration::from_millis(200));
    }
    cluster.wait_protected(PROTECTED_LIMIT);

    let mut session = Session::start(&ns);
    assert!(session.wait_for(50, Duration::from_secs(60), None), "the session got {} replies", session.count());
    // Anywhere within a few epochs, so that across runs the kill lands at every phase of a
    // checkpoint.
    std::thread::sleep(Duration::from_millis(seed % 200));
    let killed = cluster.kill_primary();
    let live = cluster.wait_takeover(TAKEOVER_LIMIT);
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
    got.check_count(&ns).unwrap_or_else(|e| panic!("seed {seed}: {e}\n{}", cluster.explain()));
    println!("{} replies, {after} after the kill", got.replies.len());
}
