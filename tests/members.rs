//! Membership at run time with real processes: a node started with `join = true` is
//! added through a follower, catches up, serves linearizable reads, is promoted and
//! votes; the cluster keeps committing when the old leader dies; a removed member's
//! connections are dropped and it cannot authenticate again; replicated addresses
//! survive restarts.

mod common;

use std::time::{Duration, Instant};

use common::{Cluster, LIMIT};

fn skip_uring(io: &str) -> bool {
    if io == "uring" && !common::uring_available() {
        eprintln!("skipped: io_uring is not available here");
        return true;
    }
    false
}

/// Polls `check` until it returns true, or fails after `LIMIT` with `what` and the logs.
fn wait_until(c: &Cluster, what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < LIMIT,
            "{what}: not within {LIMIT:?}\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn member(list: &[serde_json::Value], id: u64) -> Option<&serde_json::Value> {
    list.iter().find(|m| m["node_id"].as_u64() == Some(id))
}

fn join_promote_kill_remove(io: &str) {
    if skip_uring(io) {
        return;
    }
    let mut c = Cluster::start(&format!("join-{io}"), 3, io);
    let leader = c.wait_leader();
    let keys: Vec<(String, String)> = (0..20)
        .map(|i| (format!("before-{i}"), format!("v{i}")))
        .collect();
    for (k, v) in &keys {
        c.put_retry(k, v);
    }

    // The joining node starts outside the membership: it never campaigns.
    let new = c.start_joining_node();
    let new_addr = c.peer_addr(new);
    wait_until(&c, "the joining node answers /status", || {
        c.status(new).is_some()
    });
    std::thread::sleep(Duration::from_millis(500));
    let s = c.status(new).unwrap();
    assert_eq!(s["role"], "follower", "{s}");
    assert_eq!(
        s["term"], 0,
        "a node outside the membership campaigned: {s}"
    );
    assert!(s["members"].as_array().unwrap().is_empty(), "{s}");
    // A write through it has no leader to go to yet.
    assert!(c.put(new, "too-early", "x").is_err());

    // Added as an observer through a follower (forwarded to the leader).
    let via = *c
        .alive()
        .iter()
        .find(|&&i| i != leader && i != new)
        .unwrap();
    let (status, body) = c.members_request(
        via,
        "POST",
        "/members",
        Some(&serde_json::json!({"id": new, "address": new_addr.to_string(), "role": "observer"})),
    );
    assert_eq!(status, 200, "{body}\n{}", c.logs());

    // It catches up and serves linearizable reads through its own socket.
    for (k, v) in &keys {
        assert_eq!(c.get_retry(new, k).as_deref(), Some(v.as_str()), "key {k}");
    }
    // Every node knows the new member's address, not only the leader that added it,
    // and every node is connected to it.
    for id in [1, 2, 3] {
        wait_until(&c, &format!("node {id} connected to node {new}"), || {
            let list = c.members(id);
            member(&list, new).is_some_and(|m| {
                m["address"] == new_addr.to_string()
                    && m["role"] == "observer"
                    && m["connected"] == true
            })
        });
    }

    // Promoted to voter (through another node).
    let (status, body) = c.members_request(new, "POST", &format!("/members/{new}/promote"), None);
    assert_eq!(status, 200, "{body}\n{}", c.logs());
    let list = c.members(leader);
    assert_eq!(member(&list, new).unwrap()["role"], "voter");
    assert_eq!(
        list.iter().filter(|m| m["role"] == "voter").count(),
        4,
        "{list:?}"
    );

    // kill -9 the old leader: 3 of 4 voters remain, a majority; writes still commit.
    c.kill9(leader);
    let survivors: Vec<u64> = c.alive();
    let leader2 = c.wait_leader_among(&survivors);
    assert_ne!(leader2, leader);
    let after: Vec<(String, String)> = (0..10)
        .map(|i| (format!("after-kill-{i}"), format!("w{i}")))
        .collect();
    for (k, v) in &after {
        c.put_retry(k, v);
    }
    for (k, v) in keys.iter().chain(&after) {
        assert_eq!(c.get_retry(new, k).as_deref(), Some(v.as_str()), "key {k}");
    }

    // Restart an old node whose config file does not list the new member: the
    // replicated address lets it reach the new member again.
    let old = *survivors
        .iter()
        .find(|&&i| i != new && i != leader2)
        .unwrap();
    restart_and_reconnect(&mut c, old, new, &new_addr.to_string());
    // And a restart of the new member (join = true in its config) resumes as a voter.
    assert!(c.terminate(new).success());
    c.restart(new);
    wait_until(&c, "the restarted new member reads again", || {
        c.get(new, "after-kill-0").ok().flatten().as_deref() == Some("w0")
    });
    let s = c.status(new).unwrap();
    assert_eq!(
        member(s["members"].as_array().unwrap(), new).unwrap()["role"],
        "voter"
    );

    // Remove a live member: the others forget it, close its connections, and refuse
    // its handshakes from then on.
    let leader3 = c.wait_leader_among(&c.alive());
    let removed = *c
        .alive()
        .iter()
        .find(|&&i| i != leader3 && i != new)
        .unwrap();
    let (status, body) = c.members_request(new, "DELETE", &format!("/members/{removed}"), None);
    assert_eq!(status, 200, "{body}\n{}", c.logs());
    let rest: Vec<u64> = c.alive().into_iter().filter(|&i| i != removed).collect();
    for &id in &rest {
        wait_until(&c, &format!("node {id} forgets node {removed}"), || {
            member(&c.members(id), removed).is_none()
        });
    }
    // The removed node still believes it is a member (it never received its removal),
    // but none of its connections survive and none can be re-established.
    wait_until(&c, "the removed node is cut off", || {
        c.status(removed).is_some_and(|s| {
            s["members"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|m| m["node_id"] != removed)
                .all(|m| m["connected"] == false)
        })
    });
    // Its handshakes keep failing: a member with a higher id refuses the unknown node
    // (the removed node dials higher ids; lower ids no longer dial it).
    let higher = rest.iter().copied().find(|&i| i > removed);
    if let Some(h) = higher {
        let metric = "vigil_peer_handshake_failures_total{reason=\"unknown_node\"}";
        let before = c.metric(h, metric).unwrap_or(0.0);
        wait_until(&c, "the removed node's handshakes are refused", || {
            c.metric(h, metric).unwrap_or(0.0) > before
        });
    }
    std::thread::sleep(Duration::from_millis(500));
    let s = c.status(removed).unwrap();
    for m in s["members"].as_array().unwrap() {
        if m["node_id"] != removed {
            assert_eq!(m["connected"], false, "removed node reconnected: {s}");
        }
    }
    // The cluster without it still commits.
    c.put_retry("after-remove", "z");
    assert_eq!(c.get_retry(new, "after-remove").as_deref(), Some("z"));
}

#[test]
fn join_promote_kill_remove_epoll() {
    join_promote_kill_remove("epoll");
}

#[test]
fn join_promote_kill_remove_uring() {
    join_promote_kill_remove("uring");
}

/// `"role": "voter"` adds the node as an observer and promotes it once it caught up;
/// the request is answered when the promotion committed. Bad requests are refused.
#[test]
fn join_as_voter_and_bad_requests() {
    let mut c = Cluster::start("join-voter", 3, "auto");
    c.wait_leader();
    c.put_retry("k", "v");
    let new = c.start_joining_node();
    let new_addr = c.peer_addr(new).to_string();
    wait_until(&c, "the joining node answers /status", || {
        c.status(new).is_some()
    });
    let bad = [
        serde_json::json!({"id": new, "address": new_addr, "role": "boss"}),
        serde_json::json!({"id": 0, "address": new_addr}),
        serde_json::json!({"id": new, "address": "nowhere"}),
        serde_json::json!({"id": new, "address": "0.0.0.0:7000"}),
    ];
    for b in &bad {
        let (status, body) = c.members_request(1, "POST", "/members", Some(b));
        assert_eq!(status, 400, "{b}: {body}");
    }
    // An existing member's id with another address, or its address, is refused; the
    // same id and address again (a retry) succeeds without a change.
    let (status, body) = c.members_request(
        1,
        "POST",
        "/members",
        Some(&serde_json::json!({"id": 2, "address": new_addr})),
    );
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["code"], "exists", "{body}");
    let (status, body) = c.members_request(
        1,
        "POST",
        "/members",
        Some(&serde_json::json!({"id": 2, "address": c.peer_addr(2).to_string()})),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["already_member"], true, "{body}");
    let (status, body) = c.members_request(
        1,
        "POST",
        "/members",
        Some(&serde_json::json!({"id": new, "address": c.peer_addr(2).to_string()})),
    );
    assert_eq!(status, 409, "{body}");

    let (status, body) = c.members_request(
        2,
        "POST",
        "/members",
        Some(&serde_json::json!({"id": new, "address": new_addr, "role": "voter"})),
    );
    assert_eq!(status, 200, "{body}\n{}", c.logs());
    for id in 1..=new {
        wait_until(&c, &format!("node {id} sees node {new} as a voter"), || {
            member(&c.members(id), new).is_some_and(|m| m["role"] == "voter")
        });
    }
    // Asking again for the same voter is a no-op success.
    let (status, body) = c.members_request(
        3,
        "POST",
        "/members",
        Some(&serde_json::json!({"id": new, "address": new_addr, "role": "voter"})),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["already_member"], true, "{body}");
    assert_eq!(c.get_retry(new, "k").as_deref(), Some("v"));
}

/// Writes `n` keys `{prefix}-{i}` through every live node, four clients at once (to get
/// past the compaction threshold quickly).
fn fill(c: &Cluster, prefix: &str, n: usize) {
    let via = c.alive();
    std::thread::scope(|s| {
        for t in 0..4 {
            let via = via[t % via.len()];
            s.spawn(move || {
                for i in (t..n).step_by(4) {
                    let key = format!("{prefix}-{i}");
                    let start = Instant::now();
                    while c.put(via, &key, "x").is_err() {
                        assert!(start.elapsed() < LIMIT, "put {key} via {via}");
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            });
        }
    });
}

/// A joining node that is far behind gets the leader's snapshot; addresses recorded
/// before a compaction are read back from the snapshot by a restarted node whose config
/// file does not list the new member.
#[test]
fn addresses_survive_snapshots() {
    let mut c = Cluster::start("join-snapshot", 3, "auto");
    c.wait_leader();
    // More entries than RAFT_COMPACT_AFTER_ENTRIES (4096): every node compacts, so the
    // joining node cannot get the log from index 1.
    let n = 4200;
    fill(&c, "a", n);
    let new = c.start_joining_node();
    let new_addr = c.peer_addr(new).to_string();
    wait_until(&c, "the joining node answers /status", || {
        c.status(new).is_some()
    });
    let (status, body) = c.members_request(
        2,
        "POST",
        "/members",
        Some(&serde_json::json!({"id": new, "address": new_addr, "role": "voter"})),
    );
    assert_eq!(status, 200, "{body}\n{}", c.logs());
    assert_eq!(c.get_retry(new, "a-0").as_deref(), Some("x"));
    assert_eq!(
        c.get_retry(new, &format!("a-{}", n - 1)).as_deref(),
        Some("x")
    );
    // Compact past the entry that recorded the address.
    fill(&c, "b", n);
    let leader = c.wait_leader();
    let old = [1, 2, 3].into_iter().find(|&i| i != leader).unwrap();
    restart_and_reconnect(&mut c, old, new, &new_addr);
    assert_eq!(
        c.get_retry(new, &format!("b-{}", n - 1)).as_deref(),
        Some("x")
    );
}

/// Restarts node `old` (its config file does not list `new`) and waits until it is
/// connected to `new` at `address`, learnt from the replicated state.
fn restart_and_reconnect(c: &mut Cluster, old: u64, new: u64, address: &str) {
    assert!(c.terminate(old).success());
    c.restart(old);
    wait_until(
        c,
        &format!("restarted node {old} reconnects to {new}"),
        || {
            c.status(old).is_some_and(|s| {
                member(s["members"].as_array().unwrap(), new)
                    .is_some_and(|m| m["connected"] == true && m["address"] == address)
            })
        },
    );
}
