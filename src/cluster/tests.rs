//! Tests of the cluster state machine: each command, each rejection, idempotence,
//! fencing tokens, encoding of the whole state.

use super::command::{
    Command, Desired, KvCommand, RequestId, Resources, SnapshotKind, SnapshotRecord,
};
use super::kv;
use super::state::{ClusterState, HostState, Outcome, RejectCode, TokenCheck};
use super::testkit::{spec, Harness, GIB, MIB};
use crate::limits::{MAX_HOSTS, MAX_SNAPSHOT_CHAIN, MAX_VMS};

fn two_hosts_one_vm() -> Harness {
    let mut h = Harness::new();
    h.host(1, 4, 4);
    h.host(2, 4, 4);
    h.vm("web", 1024, 2, None);
    h
}

#[test]
fn register_host_adds_and_updates_capacity() {
    let mut h = Harness::new();
    h.host(1, 4, 4);
    let host = h.state.host(1).unwrap();
    assert_eq!(host.state, HostState::Alive);
    assert_eq!(host.capacity.vcpus, 4);
    h.host(1, 8, 16);
    assert_eq!(h.state.host(1).unwrap().capacity.vcpus, 16);
    assert_eq!(h.state.hosts().count(), 1);

    for (id, memory, vcpus) in [(0, GIB, 1), (2, 0, 1), (2, GIB, 0)] {
        let (code, message) = h.rejected(Command::RegisterHost {
            host: id,
            capacity: Resources {
                memory_bytes: memory,
                vcpus,
            },
        });
        assert_eq!(code, RejectCode::Invalid, "{message}");
    }
    // Shrinking below what is placed there is refused.
    h.vm("a", 2048, 2, None);
    assert_eq!(h.place("a", 1), Outcome::Placed { token: h.index });
    let (code, _) = h.rejected(Command::RegisterHost {
        host: 1,
        capacity: Resources {
            memory_bytes: GIB,
            vcpus: 16,
        },
    });
    assert_eq!(code, RejectCode::NoCapacity);
    assert_eq!(h.state.host(1).unwrap().capacity.memory_bytes, 8 * GIB);
}

#[test]
fn host_limit() {
    let mut h = Harness::new();
    for id in 1..=MAX_HOSTS as u64 {
        h.host(id, 1, 1);
    }
    let (code, _) = h.rejected(Command::RegisterHost {
        host: 999,
        capacity: Resources {
            memory_bytes: GIB,
            vcpus: 1,
        },
    });
    assert_eq!(code, RejectCode::LimitReached);
}

#[test]
fn create_vm_validates_its_spec() {
    let mut h = Harness::new();
    h.vm("web-1.a_b", 64, 1, Some("front"));
    let vm = h.state.vm("web-1.a_b").unwrap();
    assert_eq!(vm.token, h.index, "a new VM's token is its creating entry");
    assert!(vm.needs_placement());
    assert_eq!(vm.waiting, "waiting for a host");

    // Too long for the format: the decoder refuses it (the entry is malformed).
    let (code, message) = h.rejected(Command::CreateVm {
        vm: "x".repeat(65),
        spec: spec(64, 1, None),
    });
    assert_eq!(code, RejectCode::Malformed);
    assert!(message.contains("create_vm.vm at byte 10"), "{message}");
    for name in ["", "../etc", ".hidden", "a/b", "a b", "-x"] {
        let (code, _) = h.rejected(Command::CreateVm {
            vm: name.into(),
            spec: spec(64, 1, None),
        });
        assert_eq!(code, RejectCode::Invalid, "{name:?}");
    }
    let mut bad_specs = vec![
        spec(32, 1, None),          // below the smallest guest
        spec(1024 * 1024, 1, None), // above the largest
        spec(64, 0, None),
        spec(64, 33, None),
        spec(64, 1, Some("a/b")),
    ];
    let mut odd = spec(64, 1, None);
    odd.resources.memory_bytes += 4096;
    bad_specs.push(odd);
    let mut touch = spec(64, 1, None);
    touch.touch_percent = 101;
    bad_specs.push(touch);
    for full_every in [0, MAX_SNAPSHOT_CHAIN as u32 + 1] {
        let mut s = spec(64, 1, None);
        s.full_every = full_every;
        bad_specs.push(s);
    }
    for s in bad_specs {
        let (code, message) = h.rejected(Command::CreateVm {
            vm: "ok".into(),
            spec: s.clone(),
        });
        assert_eq!(code, RejectCode::Invalid, "{s:?}: {message}");
    }
    assert!(h.state.vm("ok").is_none());
    let (code, _) = h.rejected(Command::CreateVm {
        vm: "web-1.a_b".into(),
        spec: spec(64, 1, None),
    });
    assert_eq!(code, RejectCode::VmExists);
}

#[test]
fn vm_limit() {
    let mut h = Harness::new();
    for i in 0..MAX_VMS {
        h.vm(&format!("vm{i}"), 64, 1, None);
    }
    let (code, _) = h.rejected(Command::CreateVm {
        vm: "one-more".into(),
        spec: spec(64, 1, None),
    });
    assert_eq!(code, RejectCode::LimitReached);
}

#[test]
fn a_retried_create_never_creates_twice() {
    let mut h = Harness::new();
    let create = Command::CreateVm {
        vm: "db".into(),
        spec: spec(64, 1, None),
    };
    assert_eq!(h.apply_request(RequestId(7), create.clone()), Outcome::Done);
    let created_at = h.state.vm("db").unwrap().created_index;
    h.ok(Command::DeleteVm { vm: "db".into() });
    // The retry (same request id) commits later: answered from the window, so the
    // deleted VM does not come back.
    assert_eq!(h.apply_request(RequestId(7), create.clone()), Outcome::Done);
    assert!(h.state.vm("db").is_none());
    // A new request creates it again, with a new token.
    assert_eq!(h.apply_request(RequestId(8), create), Outcome::Done);
    assert!(h.state.vm("db").unwrap().created_index > created_at);
}

#[test]
fn a_retried_kv_request_is_answered_not_reapplied() {
    let mut h = Harness::new();
    let put = Command::Kv(KvCommand::Put {
        key: "k".into(),
        value: b"v".to_vec(),
        if_revision: Some(0),
    });
    assert_eq!(
        h.apply_request(RequestId(42), put.clone()),
        Outcome::Kv(kv::Outcome::Stored { revision: 1 })
    );
    // Without the window, the retry would be a conflict (the key exists).
    assert_eq!(
        h.apply_request(RequestId(42), put),
        Outcome::Kv(kv::Outcome::Stored { revision: 1 })
    );
    assert_eq!(h.state.kv().get("k").unwrap().mod_revision, 1);
}

#[test]
fn place_gives_a_new_token_and_a_retry_never_moves_twice() {
    let mut h = two_hosts_one_vm();
    let created = h.token("web");
    let place = Command::PlaceVm {
        vm: "web".into(),
        host: 1,
        expected_token: created,
    };
    assert_eq!(
        h.apply_request(RequestId(5), place.clone()),
        Outcome::Placed { token: h.index }
    );
    let token = h.token("web");
    assert!(token > created);
    assert_eq!(h.host_of("web"), Some(1));
    assert_eq!(h.state.vm("web").unwrap().waiting, "");
    // The same decision proposed again (no request id): its token is stale now.
    let (code, _) = h.rejected(place.clone());
    assert_eq!(code, RejectCode::StaleToken);
    // The same request retried: the first answer, nothing moves.
    assert_eq!(
        h.apply_request(RequestId(5), place),
        Outcome::Placed { token }
    );
    assert_eq!(h.token("web"), token);
    // A stale decision for another host is rejected too.
    let (code, _) = h.rejected(Command::PlaceVm {
        vm: "web".into(),
        host: 2,
        expected_token: created,
    });
    assert_eq!(code, RejectCode::StaleToken);
    assert_eq!(h.host_of("web"), Some(1));
}

#[test]
fn place_rejections() {
    let mut h = two_hosts_one_vm();
    let t = h.token("web");
    let place = |vm: &str, host, expected_token| Command::PlaceVm {
        vm: vm.into(),
        host,
        expected_token,
    };
    assert_eq!(h.rejected(place("nope", 1, t)).0, RejectCode::UnknownVm);
    assert_eq!(h.rejected(place("web", 9, t)).0, RejectCode::UnknownHost);
    assert_eq!(
        h.rejected(place("web", 1, t + 100)).0,
        RejectCode::StaleToken
    );
    h.ok(Command::DrainHost { host: 2 });
    assert_eq!(h.rejected(place("web", 2, t)).0, RejectCode::HostNotLive);
    h.host(3, 4, 4);
    h.ok(Command::HostDead {
        host: 3,
        reason: "test".into(),
    });
    assert_eq!(h.rejected(place("web", 3, t)).0, RejectCode::HostNotLive);
    h.vm("huge", 8192, 1, None);
    let huge = h.token("huge");
    assert_eq!(h.rejected(place("huge", 1, huge)).0, RejectCode::NoCapacity);
    h.vm("cpu", 64, 5, None);
    let cpu = h.token("cpu");
    assert_eq!(h.rejected(place("cpu", 1, cpu)).0, RejectCode::NoCapacity);
    // Stopped VMs are not placed.
    h.ok(Command::SetDesired {
        vm: "cpu".into(),
        desired: Desired::Stopped,
    });
    let cpu = h.token("cpu");
    assert_eq!(h.rejected(place("cpu", 1, cpu)).0, RejectCode::WrongState);
    // Placed: not again on the same host, and not elsewhere without a migration.
    assert!(matches!(h.place("web", 1), Outcome::Placed { .. }));
    let t = h.token("web");
    assert_eq!(h.rejected(place("web", 1, t)).0, RejectCode::WrongState);
    h.ok(Command::HostAlive { host: 2 });
    assert_eq!(h.rejected(place("web", 2, t)).0, RejectCode::WrongState);
    assert_eq!(h.host_of("web"), Some(1));
    assert_eq!(h.token("web"), t);
}

#[test]
fn capacity_counts_every_placed_vm() {
    let mut h = Harness::new();
    h.host(1, 2, 8);
    h.vm("a", 1024, 1, None);
    h.vm("b", 1024, 1, None);
    h.vm("c", 64, 1, None);
    assert!(matches!(h.place("a", 1), Outcome::Placed { .. }));
    assert!(matches!(h.place("b", 1), Outcome::Placed { .. }));
    assert!(matches!(h.place("c", 1), Outcome::Rejected(r) if r.code == RejectCode::NoCapacity));
    assert_eq!(h.state.load(1).memory_bytes, 2 * GIB);
}

#[test]
fn host_dead_moves_its_vms_to_needs_placement_and_their_tokens_on() {
    let mut h = two_hosts_one_vm();
    h.vm("db", 64, 1, None);
    assert!(matches!(h.place("web", 1), Outcome::Placed { .. }));
    assert!(matches!(h.place("db", 2), Outcome::Placed { .. }));
    let old = h.token("web");
    assert_eq!(h.state.validate_token("web", old), TokenCheck::Current);
    h.ok(Command::HostDead {
        host: 1,
        reason: "no ack for 505 ms".into(),
    });
    let dead_at = h.index;
    let host = h.state.host(1).unwrap();
    assert_eq!(host.state, HostState::Dead);
    assert_eq!(host.reason, "no ack for 505 ms");
    let vm = h.state.vm("web").unwrap();
    assert_eq!(vm.host, None);
    assert_eq!(vm.token, dead_at);
    assert!(vm.needs_placement());
    assert!(
        vm.waiting.contains("host 1 declared dead"),
        "{}",
        vm.waiting
    );
    // The old placement's token is stale at once, before any new placement.
    assert_eq!(
        h.state.validate_token("web", old),
        TokenCheck::Stale { current: dead_at }
    );
    assert_eq!(
        h.state.validate_token("web", dead_at),
        TokenCheck::Stale { current: dead_at },
        "a VM without a host has no current token"
    );
    // The other host's VM is untouched.
    assert_eq!(h.host_of("db"), Some(2));
    // Declaring it dead again changes nothing.
    let before = h.state.clone();
    h.ok(Command::HostDead {
        host: 1,
        reason: "again".into(),
    });
    assert_eq!(h.state.vm("web"), before.vm("web"));
    assert_eq!(h.state.host(1), before.host(1));
    assert_eq!(
        h.rejected(Command::HostDead {
            host: 9,
            reason: String::new()
        })
        .0,
        RejectCode::UnknownHost
    );
    // Back alive: alive again, but its VMs do not move back by themselves.
    h.ok(Command::HostAlive { host: 1 });
    assert_eq!(h.state.host(1).unwrap().state, HostState::Alive);
    assert_eq!(h.host_of("web"), None);
    assert_eq!(
        h.rejected(Command::HostAlive { host: 9 }).0,
        RejectCode::UnknownHost
    );
}

#[test]
fn drain_and_drained() {
    let mut h = two_hosts_one_vm();
    assert!(matches!(h.place("web", 1), Outcome::Placed { .. }));
    h.ok(Command::DrainHost { host: 1 });
    assert_eq!(h.state.host(1).unwrap().state, HostState::Draining);
    h.ok(Command::DrainHost { host: 1 }); // again: no change
    let (code, message) = h.rejected(Command::HostDrained { host: 1 });
    assert_eq!(code, RejectCode::WrongState);
    assert!(message.contains("1 VMs"), "{message}");
    assert_eq!(
        h.rejected(Command::HostDrained { host: 2 }).0,
        RejectCode::WrongState,
        "an alive host is not draining"
    );
    // The VM moves through a migration: request, final snapshot, place.
    h.ok(Command::MigrateVm {
        vm: "web".into(),
        target: None,
    });
    let mut record = h.next_snapshot("web", SnapshotKind::Full, 0xA);
    record.final_for_migration = true;
    h.ok(Command::SnapshotCommitted(record));
    assert!(h.state.vm("web").unwrap().migration.unwrap().ready);
    assert!(matches!(h.place("web", 2), Outcome::Placed { .. }));
    assert_eq!(h.state.vm("web").unwrap().migration, None);
    h.ok(Command::HostDrained { host: 1 });
    assert_eq!(h.state.host(1).unwrap().state, HostState::Drained);
    // Dead hosts cannot be drained; unknown hosts neither.
    h.ok(Command::HostDead {
        host: 1,
        reason: "gone".into(),
    });
    assert_eq!(
        h.rejected(Command::DrainHost { host: 1 }).0,
        RejectCode::HostNotLive
    );
    assert_eq!(
        h.rejected(Command::DrainHost { host: 7 }).0,
        RejectCode::UnknownHost
    );
}

#[test]
fn snapshots_continue_the_chain_under_the_current_token() {
    let mut h = two_hosts_one_vm();
    // No host: no snapshot.
    let record = h.next_snapshot("web", SnapshotKind::Full, 1);
    assert_eq!(
        h.rejected(Command::SnapshotCommitted(record)).0,
        RejectCode::NotPlaced
    );
    assert!(matches!(h.place("web", 1), Outcome::Placed { .. }));
    // A diff needs a committed parent.
    let record = h.next_snapshot("web", SnapshotKind::Diff, 2);
    assert_eq!(
        h.rejected(Command::SnapshotCommitted(record)).0,
        RejectCode::BadSnapshot
    );
    let full = h.next_snapshot("web", SnapshotKind::Full, 0x10);
    h.ok(Command::SnapshotCommitted(full.clone()));
    let vm = h.state.vm("web").unwrap();
    assert_eq!(vm.chain.len(), 1);
    assert_eq!(vm.latest_snapshot().unwrap().path, full.path);
    assert_eq!(full.path, format!("vms/web/{}-1", vm.token));
    // The same record again: the sequence does not advance.
    assert_eq!(
        h.rejected(Command::SnapshotCommitted(full.clone())).0,
        RejectCode::BadSnapshot
    );
    // A diff against something else than the latest is refused.
    let mut diff = h.next_snapshot("web", SnapshotKind::Diff, 0x11);
    diff.parent_id = 0x99;
    assert_eq!(
        h.rejected(Command::SnapshotCommitted(diff)).0,
        RejectCode::BadSnapshot
    );
    // Wrong path, zero id, full with a parent.
    let mut bad = h.next_snapshot("web", SnapshotKind::Full, 0x12);
    bad.path = "vms/web/../../etc".into();
    assert_eq!(
        h.rejected(Command::SnapshotCommitted(bad)).0,
        RejectCode::BadSnapshot
    );
    let bad = h.next_snapshot("web", SnapshotKind::Full, 0);
    assert_eq!(
        h.rejected(Command::SnapshotCommitted(bad)).0,
        RejectCode::BadSnapshot
    );
    let mut bad = h.next_snapshot("web", SnapshotKind::Full, 0x13);
    bad.parent_id = 0x10;
    assert_eq!(
        h.rejected(Command::SnapshotCommitted(bad)).0,
        RejectCode::BadSnapshot
    );
    // Diffs grow the chain up to the limit; a full one restarts it.
    for i in 1..MAX_SNAPSHOT_CHAIN as u64 {
        let diff = h.next_snapshot("web", SnapshotKind::Diff, 0x100 + i);
        h.ok(Command::SnapshotCommitted(diff));
    }
    assert_eq!(h.state.vm("web").unwrap().chain.len(), MAX_SNAPSHOT_CHAIN);
    let diff = h.next_snapshot("web", SnapshotKind::Diff, 0x200);
    assert_eq!(
        h.rejected(Command::SnapshotCommitted(diff)).0,
        RejectCode::BadSnapshot
    );
    let full = h.next_snapshot("web", SnapshotKind::Full, 0x300);
    h.ok(Command::SnapshotCommitted(full));
    assert_eq!(h.state.vm("web").unwrap().chain.len(), 1);
    // A snapshot taken under an older token is refused: after the host died and the
    // VM moved, the old host's late snapshot must not become the latest.
    let stale = h.next_snapshot("web", SnapshotKind::Diff, 0x301);
    h.ok(Command::HostDead {
        host: 1,
        reason: "test".into(),
    });
    assert!(matches!(h.place("web", 2), Outcome::Placed { .. }));
    let (code, message) = h.rejected(Command::SnapshotCommitted(stale));
    assert_eq!(code, RejectCode::StaleToken, "{message}");
    // The new placement continues the old chain with a diff (the VMM restored it, so
    // its last snapshot is the chain's last), its sequence starting again at 1.
    let diff = h.next_snapshot("web", SnapshotKind::Diff, 0x400);
    assert_eq!(diff.seq, 1);
    h.ok(Command::SnapshotCommitted(diff));
    let vm = h.state.vm("web").unwrap();
    assert_eq!(vm.chain.len(), 2);
    assert!(vm.chain[0].token < vm.chain[1].token);
    assert_eq!(
        h.rejected(Command::SnapshotCommitted(SnapshotRecord {
            vm: "nope".into(),
            ..h.next_snapshot("web", SnapshotKind::Full, 1)
        }))
        .0,
        RejectCode::UnknownVm
    );
}

#[test]
fn migration_waits_for_the_final_snapshot() {
    let mut h = two_hosts_one_vm();
    assert_eq!(
        h.rejected(Command::MigrateVm {
            vm: "web".into(),
            target: None
        })
        .0,
        RejectCode::NotPlaced
    );
    assert!(matches!(h.place("web", 1), Outcome::Placed { .. }));
    for (target, code) in [
        (Some(9), RejectCode::UnknownHost),
        (Some(1), RejectCode::Invalid),
    ] {
        let (got, _) = h.rejected(Command::MigrateVm {
            vm: "web".into(),
            target,
        });
        assert_eq!(got, code);
    }
    h.host(3, 4, 4);
    h.ok(Command::DrainHost { host: 3 });
    assert_eq!(
        h.rejected(Command::MigrateVm {
            vm: "web".into(),
            target: Some(3)
        })
        .0,
        RejectCode::HostNotLive
    );
    h.ok(Command::MigrateVm {
        vm: "web".into(),
        target: Some(2),
    });
    let migration = h.state.vm("web").unwrap().migration.unwrap();
    assert_eq!((migration.target, migration.ready), (Some(2), false));
    // Not ready: the leader may not move it yet.
    match h.place("web", 2) {
        Outcome::Rejected(r) => {
            assert_eq!(r.code, RejectCode::WrongState);
            assert!(r.message.contains("final snapshot"), "{}", r.message);
        }
        other => panic!("{other:?}"),
    }
    // An ordinary snapshot does not make it ready; a final one does.
    let record = h.next_snapshot("web", SnapshotKind::Full, 1);
    h.ok(Command::SnapshotCommitted(record));
    assert!(!h.state.vm("web").unwrap().migration.unwrap().ready);
    let mut record = h.next_snapshot("web", SnapshotKind::Diff, 2);
    record.final_for_migration = true;
    h.ok(Command::SnapshotCommitted(record));
    assert!(h.state.vm("web").unwrap().migration.unwrap().ready);
    let before = h.token("web");
    assert!(matches!(h.place("web", 2), Outcome::Placed { .. }));
    assert!(h.token("web") > before);
    assert_eq!(h.host_of("web"), Some(2));
    assert_eq!(h.state.vm("web").unwrap().migration, None);
    // A migration that cannot complete is called off: the VM stays (and resumes).
    h.ok(Command::MigrateVm {
        vm: "web".into(),
        target: None,
    });
    let mut record = h.next_snapshot("web", SnapshotKind::Diff, 3);
    record.final_for_migration = true;
    h.ok(Command::SnapshotCommitted(record));
    h.ok(Command::CancelMigration { vm: "web".into() });
    assert_eq!(h.state.vm("web").unwrap().migration, None);
    let t = h.token("web");
    assert_eq!(
        h.rejected(Command::PlaceVm {
            vm: "web".into(),
            host: 1,
            expected_token: t
        })
        .0,
        RejectCode::WrongState,
        "without a migration a running VM does not move"
    );
    assert_eq!(
        h.rejected(Command::CancelMigration { vm: "web".into() }).0,
        RejectCode::WrongState
    );
    // The source host dying mid-migration cancels it.
    h.ok(Command::MigrateVm {
        vm: "web".into(),
        target: None,
    });
    h.ok(Command::HostDead {
        host: 2,
        reason: "test".into(),
    });
    assert_eq!(h.state.vm("web").unwrap().migration, None);
}

#[test]
fn desired_state_stop_and_start() {
    let mut h = two_hosts_one_vm();
    assert!(matches!(h.place("web", 1), Outcome::Placed { .. }));
    let placed = h.token("web");
    h.ok(Command::SetDesired {
        vm: "web".into(),
        desired: Desired::Stopped,
    });
    let vm = h.state.vm("web").unwrap();
    assert_eq!((vm.host, vm.desired), (None, Desired::Stopped));
    assert!(vm.token > placed);
    assert!(!vm.needs_placement());
    assert_eq!(
        h.state.validate_token("web", placed),
        TokenCheck::Stale { current: vm.token }
    );
    h.ok(Command::SetDesired {
        vm: "web".into(),
        desired: Desired::Running,
    });
    assert!(h.state.vm("web").unwrap().needs_placement());
    assert_eq!(
        h.rejected(Command::SetDesired {
            vm: "x".into(),
            desired: Desired::Running
        })
        .0,
        RejectCode::UnknownVm
    );
}

#[test]
fn delete_and_validate() {
    let mut h = two_hosts_one_vm();
    assert!(matches!(h.place("web", 1), Outcome::Placed { .. }));
    let t = h.token("web");
    assert_eq!(h.state.validate_token("web", t), TokenCheck::Current);
    assert_eq!(
        h.state.validate_token("web", t - 1),
        TokenCheck::Stale { current: t }
    );
    assert_eq!(
        h.state.validate_token("web", t + 1),
        TokenCheck::Stale { current: t }
    );
    h.ok(Command::DeleteVm { vm: "web".into() });
    assert_eq!(h.state.validate_token("web", t), TokenCheck::UnknownVm);
    assert_eq!(
        h.rejected(Command::DeleteVm { vm: "web".into() }).0,
        RejectCode::UnknownVm
    );
    assert_eq!(h.state.load(1), Resources::default());
}

#[test]
fn waiting_reason_only_for_waiting_vms() {
    let mut h = two_hosts_one_vm();
    h.ok(Command::VmWaiting {
        vm: "web".into(),
        reason: "no room".into(),
    });
    assert_eq!(h.state.vm("web").unwrap().waiting, "no room");
    assert!(matches!(h.place("web", 1), Outcome::Placed { .. }));
    assert_eq!(
        h.rejected(Command::VmWaiting {
            vm: "web".into(),
            reason: "x".into()
        })
        .0,
        RejectCode::WrongState
    );
}

#[test]
fn bad_entries_are_rejected_no_ops() {
    let mut h = two_hosts_one_vm();
    let before = h.state.to_bytes();
    h.index += 1;
    let outcome = h.state.apply(h.index, &[1, 99, 0, 0, 0, 0, 0, 0, 0, 0]);
    match outcome {
        Outcome::Rejected(r) => {
            assert_eq!(r.code, RejectCode::Malformed);
            assert!(
                r.message.contains("command.kind at byte 1"),
                "{}",
                r.message
            );
        }
        other => panic!("{other:?}"),
    }
    h.index += 1;
    assert_eq!(h.state.apply(h.index, &[]), Outcome::Empty);
    let mut after = h.state.clone();
    // Only the applied index moved.
    let mut expected = ClusterState::decode(&before).unwrap();
    assert_ne!(after.applied_index(), expected.applied_index());
    after = ClusterState::decode(&{
        let mut bytes = after.to_bytes();
        bytes[1..9].copy_from_slice(&expected.applied_index().to_le_bytes());
        bytes
    })
    .unwrap();
    expected = ClusterState::decode(&expected.to_bytes()).unwrap();
    assert_eq!(after, expected);
}

#[test]
#[should_panic(expected = "applied after")]
fn indexes_only_grow() {
    let mut state = ClusterState::new();
    state.apply(5, &[]);
    state.apply(5, &[]);
}

fn busy_state() -> ClusterState {
    let mut h = Harness::new();
    h.host(1, 8, 8);
    h.host(2, 8, 8);
    h.host(3, 8, 8);
    for i in 0..6 {
        h.vm(&format!("vm{i}"), 512, 1, (i % 2 == 0).then_some("g"));
    }
    h.run_plan();
    let record = h.next_snapshot("vm0", SnapshotKind::Full, 0x55);
    h.ok(Command::SnapshotCommitted(record));
    let record = h.next_snapshot("vm0", SnapshotKind::Diff, 0x56);
    h.ok(Command::SnapshotCommitted(record));
    h.ok(Command::MigrateVm {
        vm: "vm1".into(),
        target: None,
    });
    h.ok(Command::DrainHost { host: 3 });
    h.ok(Command::HostDead {
        host: 2,
        reason: "test".into(),
    });
    h.apply_request(
        RequestId(77),
        Command::Kv(KvCommand::Put {
            key: "k".into(),
            value: b"v".to_vec(),
            if_revision: None,
        }),
    );
    h.apply_request(RequestId(78), Command::DeleteVm { vm: "nope".into() });
    h.ok(Command::MemberAddress {
        id: 4,
        address: Some("127.0.0.1:7004".parse().unwrap()),
    });
    h.ok(Command::MemberAddress {
        id: 9,
        address: Some("10.0.0.9:7009".parse().unwrap()),
    });
    h.apply_request(
        RequestId(79),
        Command::PlaceVm {
            vm: "vm5".into(),
            host: 1,
            expected_token: 0,
        },
    );
    h.state
}

#[test]
fn member_addresses_are_replicated_forgotten_bounded_and_snapshotted() {
    let mut h = Harness::new();
    let a: std::net::SocketAddr = "127.0.0.1:7004".parse().unwrap();
    let b: std::net::SocketAddr = "127.0.0.1:7104".parse().unwrap();
    h.ok(Command::MemberAddress {
        id: 4,
        address: Some(a),
    });
    assert_eq!(h.state.member_addresses().get(&4), Some(&a));
    // A new address replaces the old one; `None` forgets it.
    h.ok(Command::MemberAddress {
        id: 4,
        address: Some(b),
    });
    assert_eq!(h.state.member_addresses().get(&4), Some(&b));
    let copy = ClusterState::decode(&h.state.to_bytes()).unwrap();
    assert_eq!(copy.member_addresses().get(&4), Some(&b));
    h.ok(Command::MemberAddress {
        id: 4,
        address: None,
    });
    assert!(h.state.member_addresses().is_empty());
    // At most MAX_MEMBERS addresses; a known id may still change its address.
    for id in 1..=crate::limits::MAX_MEMBERS as u64 {
        h.ok(Command::MemberAddress {
            id,
            address: Some(std::net::SocketAddr::from((
                [10, 0, 0, 1],
                7000 + id as u16,
            ))),
        });
    }
    let (code, _) = h.rejected(Command::MemberAddress {
        id: 100,
        address: Some(a),
    });
    assert_eq!(code, RejectCode::LimitReached);
    h.ok(Command::MemberAddress {
        id: 1,
        address: Some(a),
    });
}

#[test]
fn version_1_states_still_decode_without_addresses() {
    // Version 1 is version 2 without the member addresses at the end.
    let mut h = Harness::new();
    h.host(1, 8, 8);
    h.vm("vm0", 512, 1, None);
    let mut bytes = h.state.to_bytes();
    assert_eq!(bytes[0], 2);
    assert_eq!(
        bytes[bytes.len() - 4..],
        [0, 0, 0, 0],
        "no addresses: count 0"
    );
    bytes.truncate(bytes.len() - 4);
    bytes[0] = 1;
    let old = ClusterState::decode(&bytes).unwrap();
    assert_eq!(old, h.state);
    // A version 2 state whose address list is garbage names the field.
    let mut bad = h.state.to_bytes();
    bad.truncate(bad.len() - 4);
    bad.extend_from_slice(&1u32.to_le_bytes());
    bad.extend_from_slice(&4u64.to_le_bytes());
    let at = bad.len();
    crate::codec::put_bytes(&mut bad, b"127.0.0.1:07004");
    assert_eq!(
        ClusterState::decode(&bad).unwrap_err().to_string(),
        format!("member.address at byte {at}: \"127.0.0.1:07004\" is not IP:port")
    );
}

#[test]
fn state_round_trips_with_deterministic_bytes() {
    let state = busy_state();
    let bytes = state.to_bytes();
    let copy = ClusterState::decode(&bytes).unwrap();
    assert_eq!(copy, state);
    assert_eq!(copy.to_bytes(), bytes);
    // A copy built by applying the same log gives the same bytes.
    assert_eq!(busy_state().to_bytes(), bytes);
    // The restored copy answers retries the same way.
    let mut a = state.clone();
    let mut b = copy;
    let retry = Command::DeleteVm { vm: "nope".into() }.to_bytes(RequestId(78));
    let next = state.applied_index() + 1;
    assert_eq!(a.apply(next, &retry), b.apply(next, &retry));
}

#[test]
fn state_decoder_rejects_garbage_naming_the_field() {
    let bytes = busy_state().to_bytes();
    for cut in 0..bytes.len() {
        let error = ClusterState::decode(&bytes[..cut]).unwrap_err();
        assert!(!error.field.is_empty());
    }
    let mut longer = bytes.clone();
    longer.push(0);
    let error = ClusterState::decode(&longer).unwrap_err();
    assert!(error.to_string().starts_with("state at byte"), "{error}");
    let error = ClusterState::decode(&[3]).unwrap_err();
    assert_eq!(
        error.to_string(),
        "state.version at byte 0: state format 3 is not supported (this node reads 1 to 2)"
    );
    // Bit flips: never a panic, and whatever decodes passes every invariant.
    for at in 0..bytes.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut flipped = bytes.clone();
            flipped[at] ^= mask;
            if let Ok(state) = ClusterState::decode(&flipped) {
                state.check().unwrap();
                assert_eq!(ClusterState::decode(&state.to_bytes()).unwrap(), state);
            }
        }
    }
}

#[test]
fn decoder_refuses_a_consistent_looking_but_broken_state() {
    // Place a VM, then shrink the host's capacity in the bytes: over capacity.
    let mut h = Harness::new();
    h.host(1, 1, 1);
    h.vm("a", 1024, 1, None);
    assert!(matches!(h.place("a", 1), Outcome::Placed { .. }));
    let mut bytes = h.state.to_bytes();
    // version u8, applied u64, host count u32, host id u64, then memory_bytes u64.
    let at = 1 + 8 + 4 + 8;
    bytes[at..at + 8].copy_from_slice(&(512 * MIB).to_le_bytes());
    let error = ClusterState::decode(&bytes).unwrap_err();
    assert_eq!(error.field, "state");
    assert!(error.to_string().contains("over capacity"), "{error}");
    // A VM spec out of bounds (here: memory that would overflow a host's load sum) is
    // refused where it is read, before anything is summed.
    let mut bytes = h.state.to_bytes();
    let host_record = 8 + 8 + 4 + 1 + 8 + 4; // id, memory, vcpus, state, index, reason ""
    let vm_memory_at = 1 + 8 + 4 + host_record + 4 + 4 + 1; // vm count, id "a"
    bytes[vm_memory_at..vm_memory_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    let error = ClusterState::decode(&bytes).unwrap_err();
    assert_eq!(error.field, "vm.spec");
    assert_eq!(error.offset, vm_memory_at);
    assert!(error.to_string().contains("memory of"), "{error}");
}
