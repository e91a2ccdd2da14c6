//! Re-protection after a failover, end to end in network namespaces (root): the primary is
//! killed with SIGKILL at a random point and its backup takes over; `ftvm ctl protect`
//! gives the new primary a fresh backup (in the dead primary's host); once protected it is
//! killed in turn, and the fresh backup takes over. A client records every value the
//! guest's counter tells it, over HTTP and over one long-lived TCP session: after each
//! failover nothing it was told is lost, and the session survives both. Verdicts come
//! from the typed status and the client's record. The detection timeout is 500 ms, so
//! that a loaded machine does not cause spurious takeovers; a failing run prints
//! FTVM_TEST_SEED (which places the kills).

mod common;

use common::client::Client;
use common::cluster::{Cluster, Options, BOOT_LIMIT};
use common::seed;
use serde_json::Value;
use std::time::{Duration, Instant};

const PROTECTED_LIMIT: Duration = Duration::from_secs(60);
const TAKEOVER_LIMIT: Duration = Duration::from_secs(30);
/// Answers the client must get on each way in (HTTP and the session) after a takeover.
const ANSWERS_AFTER: usize = 3;

/// A delay of 0 to 2 s, to the millisecond, drawn from `seed` and `round`: epochs are
/// 25 ms, so across runs the kill lands at every phase of a checkpoint.
fn delay(seed: u64, round: u64) -> Duration {
    let x = (seed ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_mul(6364136223846793005);
    Duration::from_millis((x >> 33) % 2000)
}

/// SIGKILL the primary after `wait`; the backup takes over and the client loses nothing.
fn kill_and_check(cluster: &mut Cluster, client: &Client, wait: Duration, seed: u64) -> Value {
    std::thread::sleep(wait);
    let killed = cluster.kill_primary();
    let live = cluster.wait_takeover(TAKEOVER_LIMIT);
    let verdict = client
        .check_nothing_lost(killed, ANSWERS_AFTER, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("seed {seed}, killed after {wait:?}: {e}\n{}", cluster.explain()));
    println!("killed after {wait:?}: {}", verdict.describe());
    live
}

#[test]
fn a_backup_that_took_over_is_protected_again_and_a_second_sigkill_loses_nothing() {
    let seed = seed();
    let options = Options::counter(seed);
    let mut cluster = Cluster::start("reprotect", &options);
    let client = Client::start(&cluster.topo.client_ns());
    if !client.wait_for_answers(20, BOOT_LIMIT) {
        panic!("the guest's counter never answered 20 times\n{}", cluster.explain());
    }
    cluster.wait_protected(PROTECTED_LIMIT);

    let live = kill_and_check(&mut cluster, &client, delay(seed, 1), seed);
    let generation = live["took_over"]["generation"].as_u64().expect("a takeover names its generation");
    assert_eq!(live["replication"], Value::Null, "the new primary runs alone: {live}");

    let to = cluster.fresh_backup_in_primary_host(options.failover_timeout_ms);
    let key = cluster.key_file().display().to_string();
    let (code, answer) = cluster.ctl_primary(&["protect", "--to", &to, "--key", &key]);
    assert_eq!(code, 0, "protect: {answer:?}\n{}", cluster.explain());
    let protected = cluster.wait_protected(PROTECTED_LIMIT);
    // It protects the generation it took over with: the fresh backup's state counts for it.
    assert_eq!(protected["replication"]["generation"], generation, "{protected}");
    let backup = cluster.backup_now();
    assert_eq!((&backup["role"], &backup["state_generation"]), (&"backup".into(), &generation.into()), "{backup}");
    let (code, refused) = cluster.ctl_primary(&["protect", "--to", &to, "--key", &key]);
    assert_eq!(code, 125, "a second protect is refused: {refused:?}");

    let live = kill_and_check(&mut cluster, &client, delay(seed, 2), seed);
    assert_eq!(live["took_over"]["generation"], generation + 1, "{live}");
    client.check_no_value_lost_or_repeated().unwrap_or_else(|e| panic!("seed {seed}: {e}\n{}", cluster.explain()));
    let started = Instant::now();
    drop(client);
    drop(cluster);
    println!("cleaned up in {:?}", started.elapsed());
}
