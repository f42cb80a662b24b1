//! Partitions and packet loss between real agents, each in its own network namespace
//! (veth + bridge), with nftables rules. Needs root, `ip` and `nft`: skipped otherwise.

mod common;

use std::time::{Duration, Instant};

use common::Cluster;

fn skip() -> bool {
    if let Err(why) = common::netns_available() {
        eprintln!("skipped: {why}");
        return true;
    }
    false
}

/// The leader and one follower are cut off from the other three: the minority cannot
/// commit, the majority elects a leader and commits; after healing all five converge.
#[test]
fn minority_partition_cannot_commit_and_heals() {
    if skip() {
        return;
    }
    let c = Cluster::start_netns("partition", 5, "auto");
    let old = c.wait_leader();
    c.put_retry("before", "1");
    let follower = (1..=5).find(|&i| i != old).unwrap();
    let minority = [old, follower];
    let majority: Vec<u64> = (1..=5).filter(|i| !minority.contains(i)).collect();
    for &m in &minority {
        c.nft_rules(m, &majority, 0);
    }
    // The majority elects a leader among itself and commits.
    let new = c.wait_leader_among(&majority);
    assert!(majority.contains(&new));
    let start = Instant::now();
    loop {
        if c.put(majority[0], "during", "majority").is_ok() {
            break;
        }
        assert!(
            start.elapsed() < common::LIMIT,
            "majority never committed\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The minority never acknowledges a write (each attempt waits for the cluster and
    // is refused or times out).
    for attempt in 0..3 {
        for &m in &minority {
            let r = c.put(m, "minority", &format!("m{attempt}"));
            assert!(
                r.is_err(),
                "the minority node {m} acknowledged a write: {r:?}"
            );
        }
    }
    // Heal: everyone agrees on one leader and holds the majority's writes, not the
    // minority's.
    for &m in &minority {
        c.nft_heal(m);
    }
    let all: Vec<u64> = (1..=5).collect();
    c.wait_leader_among(&all);
    for id in all {
        assert_eq!(
            c.get_retry(id, "during").as_deref(),
            Some("majority"),
            "node {id}"
        );
        assert_eq!(c.get_retry(id, "before").as_deref(), Some("1"), "node {id}");
        assert_eq!(
            c.get_retry(id, "minority"),
            None,
            "node {id} holds an unacknowledged minority write"
        );
    }
}

/// 10 % random loss on every node's traffic: writes still commit and none is lost.
#[test]
fn packet_loss_writes_commit() {
    if skip() {
        return;
    }
    let c = Cluster::start_netns("loss", 3, "auto");
    c.wait_leader();
    for id in 1..=3 {
        c.nft_rules(id, &[], 10);
    }
    let mut acked = Vec::new();
    for i in 0..30 {
        let (k, v) = (format!("loss-{i}"), format!("v{i}"));
        c.put_retry(&k, &v);
        acked.push((k, v));
    }
    for id in 1..=3 {
        c.nft_heal(id);
    }
    c.wait_leader();
    for id in 1..=3 {
        for (k, v) in &acked {
            assert_eq!(c.get_retry(id, k).as_deref(), Some(v.as_str()), "node {id}");
        }
    }
}
