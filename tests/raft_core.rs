//! Unit tests of the Raft core in the style of etcd's raft tests: a few nodes, messages
//! delivered by hand, one feature per test.

mod raft_common;
use raft_common::*;
use vigil::raft::*;

fn elect(c: &mut Cluster, id: NodeId) {
    c.campaign(id);
    assert_eq!(c.leader(), Some(id), "node {id} should lead");
    // Commit the no-op.
    c.run_for(50 * MS);
}

#[test]
fn a_node_wins_an_election_and_commits_its_noop() {
    let mut c = Cluster::new(3, 0, 0, |_| {});
    elect(&mut c, 1);
    let r = c.raft(1);
    assert_eq!(r.role(), Role::Leader);
    assert_eq!(r.term(), 1);
    assert_eq!(r.entry(1).kind, EntryKind::Noop);
    assert_eq!(r.entry(1).term, 1);
    for id in 1..=3 {
        assert_eq!(c.raft(id).commit_index(), 1);
        assert_eq!(c.raft(id).leader(), 1);
    }
}

#[test]
fn single_voter_commits_alone() {
    let mut c = Cluster::new(1, 0, 0, |_| {});
    c.campaign(1);
    assert!(c.raft(1).is_leader());
    let (i, _) = c.propose(1, b"x").unwrap();
    assert_eq!(c.raft(1).commit_index(), i);
    assert_eq!(c.node(1).sm.applied.len(), 1);
}

#[test]
fn proposals_replicate_and_apply_in_order_everywhere() {
    let mut c = Cluster::new(3, 0, 0, |_| {});
    elect(&mut c, 1);
    for k in 0..100u32 {
        c.propose(1, &k.to_le_bytes()).unwrap();
        if k % 7 == 0 {
            c.deliver_all();
        }
    }
    c.run_for(100 * MS);
    let expected: Vec<Vec<u8>> = (0..100u32).map(|k| k.to_le_bytes().to_vec()).collect();
    for id in 1..=3 {
        let got: Vec<Vec<u8>> = c.node(id).sm.applied.iter().map(|a| a.2.clone()).collect();
        assert_eq!(got, expected, "node {id}");
    }
}

#[test]
fn followers_refuse_proposals_and_name_the_leader() {
    let mut c = Cluster::new(3, 0, 0, |_| {});
    elect(&mut c, 2);
    assert_eq!(c.propose(1, b"x"), Err(RaftError::NotLeader { leader: 2 }));
}

#[test]
fn votes_and_acks_wait_for_persistence_vote_requests_too() {
    let mut c = Cluster::new(3, 0, 0, |_| {});
    let now = c.now;
    c.nodes[0].raft.campaign_now(now); // pre-vote round
    let out = c.nodes[0].raft.outputs();
    assert!(out
        .messages
        .iter()
        .all(|m| matches!(m.body, Body::PreVote { .. })));
    assert_eq!(out.messages.len(), 2);
    c.flush(0);
    c.deliver_all();
    // The candidate's Vote requests are durable-first: hard state with its own vote.
    assert!(c.raft(1).is_leader());
    assert_eq!(c.node(1).storage.hard_state.vote, 1);
    // An append acknowledgement is queued behind the sync.
    c.run_for(50 * MS);
    let now = c.now;
    c.nodes[0].raft.propose(now, b"x").unwrap();
    c.flush(0);
    let (m, p) = c.queue.pop_front().unwrap();
    let payload = match &p {
        OwnedPayload::Entries(e) => Payload::Entries(EntriesView::from_slice(e)),
        _ => Payload::None,
    };
    let to = (m.to - 1) as usize;
    c.nodes[to].raft.step(now, &m, payload);
    let out = c.nodes[to].raft.outputs();
    assert!(out.messages.is_empty());
    assert!(matches!(
        out.messages_after_persist[0].body,
        Body::AppendResp { success: true, .. }
    ));
    assert!(out.persist_from.is_some());
}

#[test]
fn prevote_keeps_a_partitioned_node_from_raising_its_term() {
    let mut c = Cluster::new(3, 0, 0, |_| {});
    elect(&mut c, 1);
    let term = c.raft(1).term();
    c.isolate(3);
    for _ in 0..5 {
        c.campaign(3);
    }
    assert_eq!(
        c.raft(3).term(),
        term,
        "pre-votes failed, so the term stays"
    );
    c.heal();
    c.run_for(300 * MS);
    assert_eq!(c.leader(), Some(1));
    assert_eq!(
        c.raft(1).term(),
        term,
        "the healed node did not disrupt the leader"
    );
}

#[test]
fn without_prevote_a_partitioned_node_raises_its_term() {
    let mut c = Cluster::new(3, 0, 0, |cfg| cfg.pre_vote = false);
    elect(&mut c, 1);
    let term = c.raft(1).term();
    c.isolate(3);
    c.campaign(3);
    c.campaign(3);
    assert_eq!(c.raft(3).term(), term + 2);
}

#[test]
fn check_quorum_makes_an_isolated_leader_step_down() {
    let mut c = Cluster::new(3, 0, 0, |_| {});
    elect(&mut c, 1);
    c.isolate(1);
    c.run_for(90 * MS);
    assert!(
        c.raft(1).is_leader(),
        "within one election timeout it stays"
    );
    c.run_for(200 * MS);
    assert!(
        !c.raft(1).is_leader(),
        "no quorum contact for an election timeout"
    );
    let mut nocq = Cluster::new(3, 0, 0, |cfg| cfg.check_quorum = false);
    elect(&mut nocq, 1);
    nocq.isolate(1);
    nocq.run_for(500 * MS);
    assert!(
        nocq.raft(1).is_leader(),
        "without CheckQuorum the leader stays"
    );
}

#[test]
fn followers_with_a_live_leader_ignore_vote_requests() {
    let mut c = Cluster::new(3, 0, 0, |cfg| cfg.pre_vote = false);
    elect(&mut c, 1);
    let term = c.raft(1).term();
    // Node 3 cannot hear the leader but reaches the others.
    c.cut[0][2] = true;
    c.campaign(3);
    assert_eq!(c.raft(3).term(), term + 1);
    assert_eq!(
        c.raft(2).term(),
        term,
        "node 2 heard the leader recently: vote ignored"
    );
    assert_eq!(c.leader(), Some(1));
}

#[test]
fn a_new_leader_commits_old_entries_only_with_an_entry_of_its_term() {
    for bug in [false, true] {
        let mut c = Cluster::new(3, 0, 0, |cfg| {
            cfg.max_entries_per_append = 1;
            cfg.bugs.commit_old_term_by_count = bug;
        });
        elect(&mut c, 1);
        // An entry of term 1 that only the leader has; then nobody hears anybody
        // until the leader steps down (CheckQuorum) and pre-votes keep terms at 1.
        for id in 1..=3 {
            c.isolate(id);
        }
        let (x, _) = c.propose(1, b"old").unwrap();
        c.run_for(300 * MS);
        assert!(!c.raft(1).is_leader());
        c.queue.clear();
        c.heal();
        // Node 1 is elected again for term 2 (its log is the most up to date); its
        // first appends are lost.
        let now = c.now;
        c.nodes[0].raft.campaign_now(now);
        c.flush(0);
        while !c.raft(1).is_leader() {
            c.deliver_one().expect("election messages");
        }
        c.queue.clear();
        assert!(c.raft(1).is_leader());
        assert_eq!(c.raft(1).term_at(x), Some(1));
        let noop = c.raft(1).last_index();
        assert_eq!(c.raft(1).term_at(noop), Some(2));
        // Deliver one entry at a time until the followers have `x` but not the no-op.
        c.delivered.clear();
        c.advance(25 * MS);
        let mut guard = 0;
        while c.raft(1).peer_progress(2).unwrap().0 < x || c.raft(1).peer_progress(3).unwrap().0 < x
        {
            guard += 1;
            assert!(guard < 1000);
            if c.deliver_one().is_none() {
                c.advance(25 * MS);
            }
            // Do not let the no-op through to a follower that could accept it.
            let lasts = [c.raft(2).last_index(), c.raft(3).last_index()];
            c.drop_where(|m| {
                matches!(m.body, Body::Append { prev_index, count: 1.., .. } if prev_index >= x)
                    && m.from == 1
                    && lasts[(m.to - 2) as usize] >= x
            });
        }
        if bug {
            assert_eq!(
                c.raft(1).commit_index(),
                x,
                "the planted bug commits by counting"
            );
        } else {
            assert!(
                c.raft(1).commit_index() < x,
                "an old-term entry must not commit by counting: x={x} noop={noop} {:?}",
                c.delivered
                    .iter()
                    .map(|m| (m.from, m.to, m.body))
                    .collect::<Vec<_>>()
            );
        }
        c.run_for(100 * MS);
        assert!(c.raft(1).commit_index() >= noop);
    }
}

#[test]
fn divergent_followers_are_repaired_by_term_not_by_index() {
    let mut c = Cluster::new(3, 0, 0, |_| {});
    elect(&mut c, 1);
    // The old leader appends 60 entries nobody else gets.
    c.isolate(1);
    for k in 0..60u32 {
        c.propose(1, &k.to_le_bytes()).unwrap();
    }
    c.queue.clear();
    // Nodes 2 and 3 elect a leader of their own, which commits 60 entries.
    c.run_for(500 * MS);
    let l = c.leader().unwrap();
    assert!(l != 1 && c.raft(l).term() > c.raft(1).term());
    for k in 0..60u32 {
        c.propose(l, &(1000 + k).to_le_bytes()).unwrap();
    }
    c.run_for(50 * MS);
    c.delivered.clear();
    c.heal();
    c.run_for(300 * MS);
    let rejects = c
        .delivered
        .iter()
        .filter(|m| m.from == 1 && matches!(m.body, Body::AppendResp { success: false, .. }))
        .count();
    assert!(rejects <= 3, "{rejects} rejections to find the fork");
    assert_eq!(c.raft(1).last_index(), c.raft(l).last_index());
    assert_eq!(c.raft(1).commit_index(), c.raft(l).commit_index());
    let a: Vec<_> = c.node(1).sm.applied.iter().map(|x| x.2.clone()).collect();
    let b: Vec<_> = c.node(l).sm.applied.iter().map(|x| x.2.clone()).collect();
    assert_eq!(a, b);
}

#[test]
fn appends_in_flight_to_one_follower_are_bounded() {
    let mut c = Cluster::new(3, 0, 0, |cfg| {
        cfg.max_entries_per_append = 1;
        cfg.max_inflight_appends = 4;
    });
    elect(&mut c, 1);
    // Node 3's answers are lost, so nothing it was sent is ever acknowledged.
    c.cut[2][0] = true;
    c.delivered.clear();
    for k in 0..20u32 {
        c.propose(1, &k.to_le_bytes()).unwrap();
        c.deliver_all();
    }
    let to3 = c
        .delivered
        .iter()
        .filter(|m| m.to == 3 && matches!(m.body, Body::Append { count: 1.., .. }))
        .count();
    assert_eq!(
        to3, 4,
        "exactly the in-flight window reaches the silent follower"
    );
    let to2 = c
        .delivered
        .iter()
        .filter(|m| m.to == 2 && matches!(m.body, Body::Append { count: 1.., .. }))
        .count();
    assert!(to2 >= 20);
    // Batching: with a larger batch size one message carries many entries.
    let mut c = Cluster::new(3, 0, 0, |_| {});
    elect(&mut c, 1);
    for k in 0..50u32 {
        c.propose(1, &k.to_le_bytes()).unwrap();
    }
    c.queue.clear(); // lose the per-proposal appends
    c.delivered.clear();
    c.run_for(200 * MS);
    assert!(c
        .delivered
        .iter()
        .any(|m| matches!(m.body, Body::Append { count, .. } if count >= 40)));
    assert_eq!(c.raft(3).last_index(), c.raft(1).last_index());
}

#[test]
fn leadership_transfer_to_a_named_and_to_the_most_caught_up_voter() {
    let mut c = Cluster::new(3, 0, 0, |_| {});
    elect(&mut c, 1);
    let term = c.raft(1).term();
    let now = c.now;
    assert_eq!(c.node(1).raft.transfer_leadership(now, 3), Ok(3));
    assert_eq!(c.propose(1, b"x"), Err(RaftError::Transferring));
    c.flush(0);
    c.deliver_all();
    assert_eq!(c.leader(), Some(3));
    assert_eq!(c.raft(3).term(), term + 1);
    c.run_for(50 * MS);
    // Most caught up: node 2 lags (cut off), so node 1 is chosen.
    c.cut[2][1] = true;
    for k in 0..5u32 {
        c.propose(3, &k.to_le_bytes()).unwrap();
    }
    c.deliver_all();
    let now = c.now;
    assert_eq!(c.node(3).raft.transfer_leadership(now, 0), Ok(1));
    c.flush(2);
    c.deliver_all();
    assert_eq!(c.leader(), Some(1));
    // A transfer to a lagging node first catches it up.
    c.heal();
    c.cut[0][2] = true;
    for k in 0..5u32 {
        c.propose(1, &k.to_le_bytes()).unwrap();
    }
    c.deliver_all();
    c.heal();
    let now = c.now;
    c.node(1).raft.transfer_leadership(now, 3).unwrap();
    c.flush(0);
    c.deliver_all();
    // The lost appends are detected after two heartbeat intervals without progress.
    c.run_for(100 * MS);
    assert_eq!(c.leader(), Some(3));
}

#[test]
fn observers_replicate_but_never_vote_campaign_or_count() {
    let mut c = Cluster::new(3, 1, 0, |_| {});
    elect(&mut c, 1);
    c.propose(1, b"a").unwrap();
    c.run_for(50 * MS);
    assert_eq!(c.node(4).sm.applied.len(), 1, "the observer applies");
    // An isolated observer never campaigns.
    c.isolate(4);
    c.run_for(2_000 * MS);
    assert_eq!(c.raft(4).role(), Role::Follower);
    c.heal();
    // Two voters down: the observer does not make a quorum.
    c.isolate(2);
    c.isolate(3);
    c.cut[0][3] = false;
    c.cut[3][0] = false;
    let (i, _) = c.propose(1, b"b").unwrap();
    c.run_for(50 * MS);
    assert!(c.raft(1).commit_index() < i);
    assert_eq!(
        c.raft(4).last_index(),
        i,
        "the observer still receives the log"
    );
    // And candidates do not count an observer's vote.
    let mut d = Cluster::new(3, 1, 0, |_| {});
    d.isolate(2);
    d.isolate(3);
    d.campaign(1);
    assert!(!d.raft(1).is_leader());
}

#[test]
fn membership_changes_one_at_a_time() {
    let mut c = Cluster::new(3, 0, 2, |_| {});
    elect(&mut c, 1);
    let now = c.now;
    let (i, _) = c
        .node(1)
        .raft
        .change_membership(now, ConfChange::AddObserver(4))
        .unwrap();
    // Takes effect when appended; the next change waits for the commit.
    assert!(c.raft(1).membership().observers.contains(4));
    assert_eq!(
        c.node(1)
            .raft
            .change_membership(now, ConfChange::Promote(4)),
        Err(RaftError::ChangePending)
    );
    c.flush(0);
    c.run_for(100 * MS);
    assert!(c.raft(1).commit_index() >= i);
    assert!(
        c.raft(4).membership().observers.contains(4),
        "the new node learned its role"
    );
    let now = c.now;
    c.node(1)
        .raft
        .change_membership(now, ConfChange::Promote(4))
        .unwrap();
    c.flush(0);
    c.run_for(100 * MS);
    assert_eq!(c.raft(1).membership().voters.len(), 4);
    // Quorum is now 3 of 4: with two voters cut off, nothing commits.
    c.isolate(3);
    c.isolate(4);
    let (j, _) = c.propose(1, b"x").unwrap();
    c.run_for(50 * MS);
    assert!(c.raft(1).commit_index() < j);
    c.heal();
    c.run_for(100 * MS);
    assert!(c.raft(1).commit_index() >= j);
    // Invalid changes are refused.
    let now = c.now;
    assert_eq!(
        c.node(1)
            .raft
            .change_membership(now, ConfChange::Promote(9)),
        Err(RaftError::InvalidChange)
    );
    // Demote, then remove.
    c.node(1)
        .raft
        .change_membership(now, ConfChange::Demote(4))
        .unwrap();
    c.flush(0);
    c.run_for(100 * MS);
    assert!(c.raft(2).membership().observers.contains(4));
    let now = c.now;
    c.node(1)
        .raft
        .change_membership(now, ConfChange::Remove(4))
        .unwrap();
    c.flush(0);
    c.run_for(100 * MS);
    assert!(!c.raft(2).membership().is_member(4));
    // Replace voter 3 by node 5: add as observer, then Replace promotes and removes.
    let now = c.now;
    c.node(1)
        .raft
        .change_membership(now, ConfChange::AddObserver(5))
        .unwrap();
    c.flush(0);
    c.run_for(100 * MS);
    let now = c.now;
    c.node(1)
        .raft
        .change_membership(now, ConfChange::Replace { old: 3, new: 5 })
        .unwrap();
    c.flush(0);
    c.run_for(200 * MS);
    let m = *c.raft(1).membership();
    assert!(m.is_voter(5) && !m.is_member(3), "{m:?}");
    assert_eq!(m.voters.len(), 3);
}

#[test]
fn a_leader_that_removes_itself_steps_down_after_the_commit() {
    let mut c = Cluster::new(3, 0, 0, |_| {});
    elect(&mut c, 1);
    let now = c.now;
    c.node(1)
        .raft
        .change_membership(now, ConfChange::Remove(1))
        .unwrap();
    assert!(
        c.raft(1).is_leader(),
        "still leading until the change commits"
    );
    c.flush(0);
    c.run_for(50 * MS);
    assert!(!c.raft(1).is_leader());
    c.run_for(1_000 * MS);
    let l = c.leader().expect("the rest elect a leader");
    assert!(l == 2 || l == 3);
    let (i, _) = c.propose(l, b"after").unwrap();
    c.run_for(50 * MS);
    assert!(c.raft(l).commit_index() >= i);
}

#[test]
fn a_lagging_follower_gets_a_chunked_snapshot() {
    let mut c = Cluster::new(3, 0, 0, |cfg| cfg.snapshot_chunk_bytes = 16);
    elect(&mut c, 1);
    c.isolate(3);
    for k in 0..30u32 {
        c.propose(1, &k.to_le_bytes()).unwrap();
    }
    c.run_for(50 * MS);
    let applied = c.raft(1).applied_index();
    let state = vec![0xab; 100];
    c.node(1).raft.compact(applied, &state);
    c.flush(0);
    assert_eq!(c.raft(1).first_index(), applied + 1);
    assert!(c.node(1).storage.snapshot.is_some());
    c.delivered.clear();
    c.heal();
    c.run_for(300 * MS);
    let chunks = c
        .delivered
        .iter()
        .filter(|m| m.to == 3 && matches!(m.body, Body::Snapshot { .. }))
        .count();
    assert!(chunks >= 100 / 16, "{chunks} chunks");
    assert_eq!(c.node(3).sm.restored, vec![state]);
    assert_eq!(c.raft(3).snapshot_meta().index, applied);
    assert_eq!(c.raft(3).commit_index(), c.raft(1).commit_index());
    // It keeps up afterwards.
    let (i, _) = c.propose(1, b"later").unwrap();
    c.run_for(50 * MS);
    assert!(c.raft(3).commit_index() >= i);
    assert_eq!(c.node(3).sm.applied.last().unwrap().2, b"later".to_vec());
}

#[test]
fn read_index_needs_a_quorum_round_and_a_committed_entry_of_the_term() {
    let mut c = Cluster::new(3, 0, 0, |_| {});
    c.campaign(1);
    // The no-op is not committed yet in this turn? Deliveries committed it already;
    // so check NotReady on a fresh leader whose no-op is held back.
    let mut d = Cluster::new(3, 0, 0, |_| {});
    let now = d.now;
    d.nodes[0].raft.campaign_now(now);
    d.flush(0);
    while !d.raft(1).is_leader() {
        d.deliver_one().expect("election messages");
    }
    let now = d.now;
    assert_eq!(d.node(1).raft.read_index(now, 1), Err(RaftError::NotReady));
    c.run_for(50 * MS);
    let now = c.now;
    c.node(1).raft.read_index(now, 7).unwrap();
    c.flush(0);
    assert!(
        c.node(1).sm.reads.is_empty(),
        "not before a quorum answered"
    );
    c.deliver_all();
    assert_eq!(c.node(1).sm.reads.len(), 1);
    assert_eq!(c.node(1).sm.reads[0].id, 7);
    // An isolated leader cannot confirm its leadership; the read fails when it steps
    // down (CheckQuorum).
    c.isolate(1);
    let now = c.now;
    c.node(1).raft.read_index(now, 8).unwrap();
    c.flush(0);
    c.run_for(50 * MS);
    assert_eq!(c.node(1).sm.reads.len(), 1);
    assert!(c.node(1).sm.reads_failed.is_empty());
    c.run_for(300 * MS);
    assert!(!c.raft(1).is_leader());
    assert_eq!(c.node(1).sm.reads_failed, vec![8]);
    assert_eq!(c.node(1).sm.reads.len(), 1);
}

#[test]
fn lease_information_tracks_acks_and_leader_contact() {
    let mut c = Cluster::new(3, 0, 0, |_| {});
    elect(&mut c, 1);
    let t0 = c.now;
    c.run_for(100 * MS);
    let q = c.raft(1).quorum_contact().unwrap();
    assert!(q > t0, "quorum contact advances with heartbeat acks");
    let ack2 = c.raft(1).peer_last_ack(2).unwrap();
    assert!(ack2 > t0);
    let contact = c.raft(2).last_leader_contact().unwrap();
    assert!(contact > t0);
    // The lease starts no later than a quorum's receipt of the heartbeat it counts.
    let receipts = [2, 3].map(|id| c.raft(id).last_leader_contact().unwrap());
    assert!(receipts.iter().any(|&r| r >= q), "{q} vs {receipts:?}");
    assert_eq!(c.raft(2).quorum_contact(), None);
    // One follower silent: its last ack stops, the quorum contact goes on.
    c.isolate(3);
    let before = c.raft(1).peer_last_ack(3).unwrap();
    c.run_for(60 * MS);
    assert_eq!(c.raft(1).peer_last_ack(3).unwrap(), before);
    assert!(c.raft(1).quorum_contact().unwrap() > before);
}

#[test]
fn a_restarted_node_recovers_its_term_vote_and_log() {
    let mut c = Cluster::new(3, 0, 0, |_| {});
    elect(&mut c, 1);
    for k in 0..10u32 {
        c.propose(1, &k.to_le_bytes()).unwrap();
    }
    c.run_for(50 * MS);
    let n = c.node(2);
    let rec = Recovered {
        hard_state: n.storage.hard_state,
        snapshot: n.storage.snapshot.clone(),
        entries: n.storage.entries.clone(),
    };
    let m = Membership::new(&[1, 2, 3], &[]).unwrap();
    let r = Raft::new(config(2), m, rec).unwrap();
    assert_eq!(r.term(), c.raft(2).term());
    assert_eq!(r.vote(), c.raft(2).vote());
    assert_eq!(r.last_index(), c.raft(2).last_index());
    assert_eq!(r.commit_index(), c.raft(2).commit_index());
    // A log with a gap is refused with a clear error.
    let mut bad = c.node(2).storage.entries.clone();
    bad.remove(3);
    let err = Raft::new(
        config(2),
        m,
        Recovered {
            entries: bad,
            ..Recovered::default()
        },
    )
    .err()
    .unwrap();
    assert!(err.contains("does not follow"), "{err}");
}

#[test]
fn membership_encoding_round_trips_and_rejects_garbage() {
    let m = Membership::new(&[1, 2, 3], &[9, 10]).unwrap();
    let mut buf = Vec::new();
    m.encode(&mut buf);
    assert_eq!(Membership::decode(&buf).unwrap(), (m, buf.len()));
    assert!(Membership::decode(&buf[..5]).is_err());
    assert!(Membership::decode(&[200, 0]).is_err());
    let mut dup = buf.clone();
    dup[10..18].copy_from_slice(&1u64.to_le_bytes());
    assert!(Membership::decode(&dup).is_err());
    assert!(Membership::new(&[1, 1], &[]).is_none());
    assert!(Membership::new(&[1], &[1]).is_none());
}

#[test]
fn sixty_four_observers_follow_three_voters() {
    let mut c = Cluster::new(3, 64, 0, |_| {});
    elect(&mut c, 1);
    for k in 0..20u32 {
        c.propose(1, &k.to_le_bytes()).unwrap();
    }
    c.run_for(100 * MS);
    for id in 4..=67 {
        assert_eq!(c.node(id).sm.applied.len(), 20, "observer {id}");
        assert_eq!(c.raft(id).role(), Role::Follower);
    }
    assert_eq!(c.raft(1).membership().observers.len(), 64);
    // Promote one observer (the quorum becomes 3 of 4).
    let now = c.now;
    c.node(1)
        .raft
        .change_membership(now, ConfChange::Promote(40))
        .unwrap();
    c.flush(0);
    c.run_for(100 * MS);
    assert!(c.raft(67).membership().is_voter(40));
}

#[test]
fn a_node_removed_by_an_uncommitted_change_can_still_break_a_deadlock() {
    let mut c = Cluster::new(4, 0, 0, |_| {});
    elect(&mut c, 4);
    // Node 4 appends its own removal, which nobody receives; node 1 is gone for good.
    c.isolate(4);
    let now = c.now;
    c.node(4)
        .raft
        .change_membership(now, ConfChange::Remove(4))
        .unwrap();
    c.flush(3);
    c.isolate(1);
    c.run_for(300 * MS);
    assert!(!c.raft(4).is_leader(), "CheckQuorum");
    assert!(!c.raft(4).membership().is_voter(4));
    // Nodes 2 and 3 need node 4's vote (3 of {1,2,3,4}); node 4 has the longer log, so
    // only node 4 can be elected: by 2 and 3, the voters of its latest configuration.
    for id in 2..=4 {
        for other in 2..=4 {
            c.cut[id - 1][other - 1] = false;
        }
    }
    c.run_for(2_000 * MS);
    let l = c
        .leader()
        .expect("a leader despite the uncommitted removal");
    let (i, _) = c.propose(l, b"progress").unwrap();
    c.run_for(100 * MS);
    assert!(c.raft(l).commit_index() >= i);
    assert!(
        !c.raft(2).membership().is_member(4),
        "the removal committed"
    );
    assert_ne!(c.leader(), Some(4), "and the removed node stepped down");
}

#[test]
fn a_restarted_node_waits_an_election_timeout_before_voting() {
    let mut c = Cluster::new(3, 0, 0, |_| {});
    elect(&mut c, 1);
    let m = Membership::new(&[1, 2, 3], &[]).unwrap();
    let n = c.node(2);
    let rec = Recovered {
        hard_state: n.storage.hard_state,
        snapshot: None,
        entries: n.storage.entries.clone(),
    };
    let mut r = Raft::new(config(2), m, rec).unwrap();
    let term = r.term();
    let vote = |term| Message {
        from: 3,
        to: 2,
        term,
        body: Body::Vote {
            last_index: 100,
            last_term: 100,
            transfer: false,
        },
    };
    let t0 = c.now;
    r.tick(t0);
    r.step(t0 + MS, &vote(term + 1), Payload::None);
    assert_eq!(
        r.term(),
        term,
        "ignored: it may have acknowledged a heartbeat it forgot"
    );
    assert!(r.outputs().messages_after_persist.is_empty());
    r.step(t0 + 101 * MS, &vote(term + 1), Payload::None);
    assert_eq!(r.term(), term + 1);
    assert_eq!(r.vote(), 3);
    // The leader's lease is void once it has sent TimeoutNow.
    assert!(c.raft(1).quorum_contact().is_some());
    let now = c.now;
    c.node(1).raft.transfer_leadership(now, 2).unwrap();
    assert_eq!(c.raft(1).quorum_contact(), None);
}

#[test]
fn in_flight_bytes_are_bounded_too() {
    let mut c = Cluster::new(3, 0, 0, |cfg| {
        cfg.max_entries_per_append = 1;
        cfg.max_inflight_appends = 64;
        cfg.max_inflight_bytes = 1000;
    });
    elect(&mut c, 1);
    c.cut[2][0] = true; // node 3's answers are lost
    c.delivered.clear();
    for _ in 0..20 {
        c.propose(1, &[0u8; 300]).unwrap();
        c.deliver_all();
    }
    let to3 = c
        .delivered
        .iter()
        .filter(|m| m.to == 3 && matches!(m.body, Body::Append { count: 1.., .. }))
        .count();
    // 300-byte entries (plus framing): the window closes once 1000 bytes are out.
    assert!((3..=4).contains(&to3), "{to3} appends in flight");
}

#[test]
fn lost_snapshot_chunks_are_sent_again() {
    let mut c = Cluster::new(3, 0, 0, |cfg| cfg.snapshot_chunk_bytes = 8);
    elect(&mut c, 1);
    c.isolate(3);
    for k in 0..10u32 {
        c.propose(1, &k.to_le_bytes()).unwrap();
    }
    c.run_for(50 * MS);
    let applied = c.raft(1).applied_index();
    c.node(1).raft.compact(applied, &[7u8; 40]);
    c.flush(0);
    c.heal();
    // Drop every third snapshot chunk for a while.
    let mut n = 0;
    for _ in 0..200 {
        c.advance(5 * MS);
        while let Some((m, _)) = c.queue.front() {
            if matches!(m.body, Body::Snapshot { .. }) {
                n += 1;
                if n % 3 == 0 {
                    c.queue.pop_front();
                    continue;
                }
            }
            c.deliver_one();
        }
    }
    assert_eq!(c.node(3).sm.restored, vec![vec![7u8; 40]]);
    assert_eq!(c.raft(3).commit_index(), c.raft(1).commit_index());
}

#[test]
fn a_new_leader_has_no_lease_until_a_quorum_answers_a_heartbeat() {
    let mut c = Cluster::new(3, 0, 0, |_| {});
    let now = c.now;
    c.nodes[0].raft.campaign_now(now);
    c.flush(0);
    while !c.raft(1).is_leader() {
        c.deliver_one().expect("election messages");
    }
    assert_eq!(c.raft(1).quorum_contact(), None, "votes are no lease");
    let elected = c.now;
    c.advance(MS);
    c.deliver_all();
    let q = c
        .raft(1)
        .quorum_contact()
        .expect("answers to the first appends");
    assert!(q >= elected);
}

#[test]
fn followers_serve_reads_through_the_leaders_read_index() {
    let mut c = Cluster::new(3, 1, 0, |_| {});
    elect(&mut c, 1);
    let (i, _) = c.propose(1, b"w").unwrap();
    c.deliver_all();
    assert!(
        c.raft(1).commit_index() >= i,
        "the write completed before the read"
    );
    let now = c.now;
    c.node(2).raft.read_index(now, 11).unwrap();
    c.flush(1);
    let m = c.queue.back().unwrap().0;
    assert_eq!(
        (m.to, m.body),
        (1, Body::ReadIndex { id: 11 }),
        "asked the leader"
    );
    c.run_for(100 * MS);
    assert_eq!(c.node(2).sm.reads.len(), 1);
    assert_eq!(c.node(2).sm.reads[0].id, 11);
    assert!(c.node(2).sm.reads[0].index >= i);
    assert!(c.raft(2).applied_index() >= c.node(2).sm.reads[0].index);
    assert_eq!(c.node(2).sm.applied.last().unwrap().2, b"w".to_vec());
    // An observer reads the same way; a node without a known leader cannot.
    let now = c.now;
    c.node(4).raft.read_index(now, 12).unwrap();
    c.flush(3);
    c.run_for(20 * MS);
    assert_eq!(c.node(4).sm.reads.len(), 1);
    let mut d = Cluster::new(3, 0, 0, |_| {});
    let now = d.now;
    assert_eq!(
        d.node(2).raft.read_index(now, 1),
        Err(RaftError::NotLeader { leader: 0 })
    );
    // A leader that cannot serve reads yet (its no-op is not committed) refuses a
    // follower's request, and the follower reports the read as failed.
    d.nodes[0].raft.campaign_now(now);
    d.flush(0);
    while !d.raft(1).is_leader() {
        d.deliver_one().expect("election messages");
    }
    d.queue.clear();
    let term = d.raft(1).term();
    let ask = Message {
        from: 2,
        to: 1,
        term,
        body: Body::ReadIndex { id: 5 },
    };
    d.nodes[0].raft.step(now, &ask, Payload::None);
    let refusal = *d.raft(1).outputs().messages.last().unwrap();
    assert_eq!(
        refusal.body,
        Body::ReadIndexResp {
            id: 5,
            index: 0,
            ok: false
        }
    );
    d.flush(0);
    d.deliver_all();
    assert_eq!(d.node(2).sm.reads_failed, vec![5]);
}

#[test]
fn host_lease_anchor_needs_the_leader_to_confirm_the_acknowledgement() {
    let mut c = Cluster::new(3, 0, 0, |_| {});
    elect(&mut c, 1);
    let (t0, commit0) = c.raft(2).host_lease_anchor().expect("confirmed rounds");
    assert!(t0 > 0 && t0 <= c.now);
    assert_eq!(commit0, c.raft(1).commit_index());
    // Node 2's answers are lost: it still hears the leader (last_leader_contact moves
    // on) but no round of its is confirmed, so its lease anchor stays where it was.
    c.cut[1][0] = true;
    c.run_for(200 * MS);
    let contact = c.raft(2).last_leader_contact().unwrap();
    let (t1, _) = c.raft(2).host_lease_anchor().unwrap();
    assert!(contact > t0 + 150 * MS, "node 2 kept hearing the leader");
    // (The round acknowledged just before the cut is still confirmed afterwards.)
    assert!(
        t1 <= t0 + 50 * MS,
        "anchor {t1} moved on without confirmation (was {t0})"
    );
    // Answers get through again: confirmed rounds move the anchor on.
    c.heal();
    c.run_for(50 * MS);
    let (t2, _) = c.raft(2).host_lease_anchor().unwrap();
    assert!(t2 > t1 + 150 * MS);
    // The leader itself has no host lease anchor (its lease is quorum_contact).
    assert_eq!(c.raft(1).host_lease_anchor(), None);
}

#[test]
fn a_leader_whose_transfer_failed_after_timeout_now_steps_down() {
    let mut c = Cluster::new(3, 0, 0, |_| {});
    elect(&mut c, 1);
    let term = c.raft(1).term();
    let now = c.now;
    c.node(1).raft.transfer_leadership(now, 2).unwrap();
    c.flush(0);
    assert_eq!(
        c.raft(1).quorum_contact(),
        None,
        "lease void once TimeoutNow is out"
    );
    // TimeoutNow is lost: the transfer fails.
    for _ in 0..40 {
        c.drop_where(|m| matches!(m.body, Body::TimeoutNow));
        c.advance(5 * MS);
        c.drop_where(|m| matches!(m.body, Body::TimeoutNow));
        c.deliver_all();
    }
    // Without a lease for the rest of its term the old leader steps down; an election
    // makes a leader (in a later term) that holds a lease again.
    assert!(!c.raft(1).is_leader() || c.raft(1).term() > term);
    c.run_for(1_000 * MS);
    let l = c.leader().expect("a leader");
    assert!(c.raft(l).term() > term);
    assert!(c.raft(l).quorum_contact().is_some());
}

/// Takes the first queued message that matches `f` out of the queue (held in flight).
fn hold(c: &mut Cluster, f: impl Fn(&Message) -> bool) -> (Message, OwnedPayload) {
    let at = c
        .queue
        .iter()
        .position(|(m, _)| f(m))
        .expect("a matching message");
    c.queue.remove(at).unwrap()
}

/// The simulator's split brain on seeds 14195, 15458, 16906 and 17224: a follower process
/// acknowledged round R and crashed; its successor received a late copy of round R and
/// then the leader's confirmation of R, which the leader had made from the predecessor's
/// acknowledgement. The successor anchored its host lease at its late receipt, after the
/// last acknowledgement the leader ever got from the node: its lease outlived the
/// leader's L(1 + eps) wait. Confirmations name the acknowledging process now.
#[test]
fn a_restarted_follower_never_takes_its_predecessors_lease_confirmation() {
    let mut c = Cluster::new(3, 0, 0, |_| {});
    elect(&mut c, 1);
    // Round R: a heartbeat, and an entry appended in the same round whose copy to node 2
    // stays in flight.
    c.advance(20 * MS);
    c.propose(1, b"late").unwrap();
    let is_append_to_2 = |m: &Message, entries: bool| {
        m.to == 2 && matches!(m.body, Body::Append { count, .. } if (count > 0) == entries)
    };
    let late = hold(&mut c, |m| is_append_to_2(m, true));
    let Body::Append {
        read_seq: round, ..
    } = late.0.body
    else {
        unreachable!()
    };
    c.deliver_all();
    // Node 2 answered R's heartbeat; the leader confirms R in its next round.
    c.advance(20 * MS);
    let confirm = hold(&mut c, |m| {
        m.to == 2 && matches!(m.body, Body::Append { lease_seq, .. } if lease_seq == round)
    });
    let last_ack = c.raft(1).peer_last_ack(2).unwrap();
    let old_anchor = c.raft(2).host_lease_anchor().expect("confirmed rounds");
    assert!(old_anchor.0 <= last_ack);
    // Node 2 crashes and starts again (a new incarnation); its answers are lost.
    let n = c.node(2);
    let rec = Recovered {
        hard_state: n.storage.hard_state,
        snapshot: n.storage.snapshot.clone(),
        entries: n.storage.entries.clone(),
    };
    let mut cfg = config(2);
    cfg.incarnation ^= 0xff;
    let m = Membership::new(&[1, 2, 3], &[]).unwrap();
    n.raft = Raft::new(cfg, m, rec).unwrap();
    n.driver = Driver::new(1024, 1024);
    c.queue.retain(|(m, _)| m.to != 2);
    c.cut[1][0] = true;
    // Much later the held copies arrive: first round R, then the confirmation of R.
    c.now += 300 * MS;
    c.queue.push_front(confirm);
    c.queue.push_front(late);
    c.deliver_all();
    assert!(
        c.raft(2).last_leader_contact().is_some(),
        "it heard the leader"
    );
    // The host lease never starts after the last acknowledgement the leader received
    // from the node (the leader declares it dead L(1 + eps) after that).
    let anchor = c.raft(2).host_lease_anchor();
    assert!(
        anchor.is_none_or(|(t, _)| t <= last_ack),
        "the new process anchored its lease at {anchor:?}, after the leader's last ack {last_ack}"
    );
    // Once its own answers get through, the new process's rounds are confirmed.
    c.heal();
    c.run_for(100 * MS);
    let (t, _) = c
        .raft(2)
        .host_lease_anchor()
        .expect("its own rounds confirmed");
    assert!(t > last_ack + 300 * MS);
    assert!(t <= c.raft(1).peer_last_ack(2).unwrap());
}

/// Fast failover: survivors that saw the dead leader's connection break elect a new
/// leader at once, without waiting out the old leader's lease (an election timeout).
#[test]
fn survivors_that_lost_the_leaders_connection_elect_at_once() {
    let mut c = Cluster::new(3, 0, 0, |_| {});
    elect(&mut c, 1);
    let term = c.raft(1).term();
    // Leader 1 dies (kill -9): nodes 2 and 3 see its connections reset.
    c.isolate(1);
    c.advance(5 * MS);
    c.deliver_all();
    // Loyal voters refuse a campaign within an election timeout of the leader's message.
    c.campaign(2);
    assert_eq!(
        c.leader(),
        Some(1),
        "refused while the old lease is honoured"
    );
    assert_ne!(c.raft(2).role(), Role::Follower, "node 2 did campaign");
    let now = c.now;
    assert!(
        !c.node(2).raft.leader_connection_lost(now, 3),
        "3 is not the leader"
    );
    // Both survivors see the reset, also node 2 whose PreVote is under way.
    for id in [2, 3] {
        assert!(c.node(id).raft.leader_connection_lost(now, 1), "node {id}");
    }
    c.campaign(2);
    assert_eq!(c.raft(2).role(), Role::Leader, "elected at once");
    assert!(c.raft(2).term() > term);
    // The leader and candidates ignore the call.
    let now = c.now;
    assert!(!c.node(2).raft.leader_connection_lost(now, 2));
}

/// A message from the leader restores the loyalty: a connection that broke and came back
/// (the leader is alive) does not leave the follower granting votes to others.
#[test]
fn a_message_from_the_leader_restores_loyalty_after_a_lost_connection() {
    let mut c = Cluster::new(3, 0, 0, |_| {});
    elect(&mut c, 1);
    let term = c.raft(1).term();
    let now = c.now;
    assert!(c.node(2).raft.leader_connection_lost(now, 1));
    // The leader's next heartbeat arrives on a new connection.
    c.advance(20 * MS);
    c.deliver_all();
    // Node 3 cannot hear the leader and campaigns; node 2 is loyal again.
    c.cut[0][2] = true;
    c.campaign(3);
    assert_eq!(
        c.raft(2).term(),
        term,
        "node 2 refused: it hears the leader"
    );
    assert_eq!(c.leader(), Some(1));
}

/// Seed 2461 (once failover was fast): the leader proposed `HostDead` for a host and
/// then confirmed that host's next acknowledgement; the confirmation carried only the
/// old commit index, so the host used it, kept its VM, and the VM started elsewhere once
/// the verdict committed. A confirmation now requires the leader's last index.
#[test]
fn a_lease_confirmed_after_a_proposed_verdict_needs_the_verdict_applied() {
    let mut c = Cluster::new(5, 0, 0, |_| {});
    elect(&mut c, 1);
    let step = |c: &mut Cluster| {
        // Entries reach only node 2: nothing new commits; heartbeats reach everyone.
        c.advance(5 * MS);
        c.drop_where(|m| m.to != 2 && matches!(m.body, Body::Append { count, .. } if count > 0));
        while c.deliver_one().is_some() {
            c.drop_where(|m| {
                m.to != 2 && matches!(m.body, Body::Append { count, .. } if count > 0)
            });
        }
    };
    c.run_for(60 * MS);
    let before = c.raft(2).host_lease_anchor().expect("confirmed").0;
    let proposed_at = c.now;
    let (verdict, _) = c.propose(1, b"HostDead(2)").unwrap();
    for _ in 0..20 {
        step(&mut c);
    }
    assert!(
        c.raft(1).commit_index() < verdict,
        "the verdict did not commit"
    );
    assert!(
        c.raft(1).quorum_contact().is_some(),
        "the leader kept its lease"
    );
    assert!(c.raft(2).last_index() >= verdict, "node 2 has the verdict");
    let (at, required) = c.raft(2).host_lease_anchor().unwrap();
    assert!(at >= before);
    assert!(
        at <= proposed_at,
        "node 2's lease runs from {at}, confirmed after the verdict was proposed at \
         {proposed_at}, without the verdict applied (required index {required})"
    );
    // Once the verdict commits and node 2 applies it, the newer anchors count.
    c.run_for(50 * MS);
    assert!(c.raft(2).applied_index() >= verdict);
    let (at, _) = c.raft(2).host_lease_anchor().unwrap();
    assert!(at > proposed_at + 100 * MS);
}
