//! The leader's decisions about where VMs run: placement of VMs that need a host,
//! the moves that drain a host, and the visible reasons of VMs that wait.
//!
//! Pure: from the committed state to a list of commands to propose. Each decision
//! carries what it was based on (a place carries the VM's token), so a decision made on
//! an old state is rejected when applied, and proposing the same plan twice moves
//! nothing twice. The leader runs [`plan`] after applying committed entries (and may run
//! it on a timer); it should not propose again while its previous proposals are in
//! flight, though doing so is harmless.
//!
//! Rules:
//! - Only alive hosts (not dead, draining or drained) receive VMs.
//! - A host receives a VM only if its memory and vCPUs, counting the VMs already placed
//!   there (and those placed earlier in the same plan), have room.
//! - Least loaded first: the host whose larger share (memory or vCPUs) is smallest, then
//!   fewer VMs, then the lower host id.
//! - Anti-affinity: a VM of a group goes to a host with no VM of that group whenever
//!   such a host has room; only when none has does it share.
//! - VMs are placed oldest-waiting first (lower token, then id).
//! - A migrating VM is placed only once its source committed its final snapshot; its
//!   requested target is used when it has room, otherwise the rules above (never the
//!   source). If no host has room then, the migration is called off (the VM resumes
//!   where it is) instead of leaving the VM paused.

use std::collections::BTreeMap;

use super::command::{Command, HostId, Resources};
use super::state::{fits, ClusterState, HostState, Vm};

/// What one planning round decided.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// To propose, in order.
    pub commands: Vec<Command>,
    /// VMs left without a host this round and why (also proposed as `VmWaiting` when
    /// the replicated reason differs, so every node shows it).
    pub waiting: Vec<(String, String)>,
}

/// Placement, drain moves and drained hosts in one round.
pub fn plan(state: &ClusterState) -> Plan {
    let mut plan = plan_placements(state);
    plan.commands.extend(plan_drains(state));
    plan
}

#[derive(Clone, Debug)]
struct HostLoad {
    id: HostId,
    capacity: Resources,
    used: Resources,
    vms: usize,
    groups: BTreeMap<String, usize>,
}

impl HostLoad {
    /// The larger of the memory and vCPU shares in use, in millionths.
    fn share_ppm(&self) -> u128 {
        let memory =
            self.used.memory_bytes as u128 * 1_000_000 / self.capacity.memory_bytes as u128;
        let vcpus = self.used.vcpus as u128 * 1_000_000 / self.capacity.vcpus as u128;
        memory.max(vcpus)
    }

    fn add(&mut self, vm: &Vm) {
        self.used.memory_bytes += vm.spec.resources.memory_bytes;
        self.used.vcpus += vm.spec.resources.vcpus;
        self.vms += 1;
        if let Some(group) = &vm.spec.anti_affinity {
            *self.groups.entry(group.clone()).or_default() += 1;
        }
    }

    fn has_group(&self, vm: &Vm) -> bool {
        vm.spec
            .anti_affinity
            .as_ref()
            .is_some_and(|g| self.groups.get(g).copied().unwrap_or(0) > 0)
    }
}

/// The load of every alive host (the only ones that take VMs).
fn alive_loads(state: &ClusterState) -> Vec<HostLoad> {
    let mut loads: Vec<HostLoad> = state
        .hosts()
        .map(|host| HostLoad {
            id: host.id,
            capacity: host.capacity,
            used: Resources::default(),
            vms: 0,
            groups: BTreeMap::new(),
        })
        .collect();
    for vm in state.vms() {
        if let Some(host) = vm.host {
            let load = loads
                .iter_mut()
                .find(|l| l.id == host)
                .expect("placed on a known host");
            load.add(vm);
        }
    }
    // Only alive hosts take VMs; loads of the others were needed for nothing else.
    loads.retain(|l| {
        state
            .host(l.id)
            .is_some_and(|h| h.state == HostState::Alive)
    });
    loads
}

/// Place commands for every VM that needs a host (and every migration that is ready).
pub fn plan_placements(state: &ClusterState) -> Plan {
    let mut loads = alive_loads(state);

    let mut queue: Vec<&Vm> = state
        .vms()
        .filter(|vm| vm.needs_placement() || vm.migration.is_some_and(|m| m.ready))
        .collect();
    queue.sort_by(|a, b| (a.token, &a.id).cmp(&(b.token, &b.id)));

    let mut plan = Plan::default();
    for vm in queue {
        let target = vm.migration.and_then(|m| m.target);
        match choose_host(&loads, vm, target) {
            Some(i) => {
                loads[i].add(vm);
                plan.commands.push(Command::PlaceVm {
                    vm: vm.id.clone(),
                    host: loads[i].id,
                    expected_token: vm.token,
                });
            }
            None => {
                let reason = if loads.iter().all(|l| Some(l.id) == vm.host) {
                    "no live host to run it".to_string()
                } else {
                    format!(
                        "no live host has room for {} MiB and {} vCPUs",
                        vm.spec.resources.memory_bytes / (1024 * 1024),
                        vm.spec.resources.vcpus
                    )
                };
                if vm.needs_placement() && vm.waiting != reason {
                    plan.commands.push(Command::VmWaiting {
                        vm: vm.id.clone(),
                        reason: reason.clone(),
                    });
                }
                if vm.host.is_some() {
                    // A ready migration with nowhere to go: call it off rather than
                    // keep the VM paused; it resumes on its host (a drain asks again
                    // once some host has room).
                    plan.commands
                        .push(Command::CancelMigration { vm: vm.id.clone() });
                }
                plan.waiting.push((vm.id.clone(), reason));
            }
        }
    }
    plan
}

/// Index in `loads` of the host for `vm`, or None if none has room.
fn choose_host(loads: &[HostLoad], vm: &Vm, target: Option<HostId>) -> Option<usize> {
    let need = vm.spec.resources;
    let candidates: Vec<usize> = (0..loads.len())
        .filter(|&i| Some(loads[i].id) != vm.host && fits(loads[i].used, need, loads[i].capacity))
        .collect();
    if let Some(target) = target {
        if let Some(&i) = candidates.iter().find(|&&i| loads[i].id == target) {
            return Some(i);
        }
    }
    let apart: Vec<usize> = candidates
        .iter()
        .copied()
        .filter(|&i| !loads[i].has_group(vm))
        .collect();
    let pool = if apart.is_empty() {
        &candidates
    } else {
        &apart
    };
    pool.iter()
        .copied()
        .min_by_key(|&i| (loads[i].share_ppm(), loads[i].vms, loads[i].id))
}

/// The steps that empty draining hosts: a migration request for each VM still on one
/// (its host then pauses it and takes the final snapshot, and [`plan_placements`] moves
/// it), and "drained" for a draining host with no VM left.
///
/// A migration pauses the VM until it is placed elsewhere, so it is requested only when
/// some alive host has room for it now (not reserved: if the room is gone by the time
/// the final snapshot is committed, the migration is called off and asked again later).
pub fn plan_drains(state: &ClusterState) -> Vec<Command> {
    let loads = alive_loads(state);
    let mut commands = Vec::new();
    for host in state.hosts().filter(|h| h.state == HostState::Draining) {
        let mut any = false;
        for vm in state.vms_on(host.id) {
            any = true;
            if vm.migration.is_none() && choose_host(&loads, vm, None).is_some() {
                commands.push(Command::MigrateVm {
                    vm: vm.id.clone(),
                    target: None,
                });
            }
        }
        if !any {
            commands.push(Command::HostDrained { host: host.id });
        }
    }
    commands
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::command::SnapshotKind;
    use crate::cluster::state::Outcome;
    use crate::cluster::testkit::Harness;

    fn hosts_of(h: &Harness, vms: &[&str]) -> Vec<Option<HostId>> {
        vms.iter().map(|vm| h.host_of(vm)).collect()
    }

    #[test]
    fn spreads_least_loaded_first() {
        let mut h = Harness::new();
        for id in 1..=3 {
            h.host(id, 8, 8);
        }
        for i in 0..6 {
            h.vm(&format!("vm{i}"), 1024, 1, None);
        }
        let plan = plan(&h.state);
        assert_eq!(plan, super::plan(&h.state), "deterministic");
        assert_eq!(plan.commands.len(), 6);
        assert!(plan.waiting.is_empty());
        h.run_plan();
        for id in 1..=3 {
            assert_eq!(h.state.vms_on(id).count(), 2, "host {id}");
        }
        // Nothing left to do: a second round proposes nothing.
        assert_eq!(super::plan(&h.state), Plan::default());
    }

    #[test]
    fn least_loaded_counts_the_larger_share() {
        let mut h = Harness::new();
        h.host(1, 16, 2); // lots of memory, few vCPUs
        h.host(2, 4, 16);
        h.vm("a", 1024, 2, None);
        h.vm("b", 1024, 1, None);
        h.run_plan();
        // "a" goes to host 1 (tie: both empty, lower id), which then has all its vCPUs
        // taken: "b" goes to host 2 although host 1 has more free memory.
        assert_eq!(hosts_of(&h, &["a", "b"]), vec![Some(1), Some(2)]);
    }

    #[test]
    fn anti_affinity_keeps_a_group_apart_while_another_host_fits() {
        let mut h = Harness::new();
        h.host(1, 32, 32);
        h.host(2, 4, 4);
        h.host(3, 4, 4);
        // Load host 2 and 3 a little so that host 1 is clearly the least loaded.
        h.vm("x", 2048, 2, None);
        h.vm("y", 2048, 2, None);
        h.run_plan();
        assert_eq!(hosts_of(&h, &["x", "y"]), vec![Some(1), Some(2)]);
        h.vm("db0", 1024, 1, Some("db"));
        h.vm("db1", 1024, 1, Some("db"));
        h.vm("db2", 1024, 1, Some("db"));
        h.run_plan();
        let mut placed: Vec<_> = hosts_of(&h, &["db0", "db1", "db2"]);
        placed.sort();
        assert_eq!(placed, vec![Some(1), Some(2), Some(3)], "one per host");
        // A fourth member: every host has one, so it shares (least loaded: host 1).
        h.vm("db3", 1024, 1, Some("db"));
        h.run_plan();
        assert_eq!(h.host_of("db3"), Some(1));
        // A member shares even when the only group-free host has no room.
        let mut h = Harness::new();
        h.host(1, 8, 8);
        h.host(2, 1, 8);
        h.vm("filler", 1024, 1, None);
        assert!(matches!(h.place("filler", 2), Outcome::Placed { .. }));
        h.vm("g0", 512, 1, Some("g"));
        h.run_plan();
        assert_eq!(hosts_of(&h, &["filler", "g0"]), vec![Some(2), Some(1)]);
        h.vm("g1", 512, 1, Some("g"));
        h.run_plan();
        assert_eq!(h.host_of("g1"), Some(1), "host 2 is full");
    }

    #[test]
    fn waits_visibly_when_full_and_is_placed_when_a_host_joins() {
        let mut h = Harness::new();
        h.vm("a", 1024, 1, None);
        let plan = h.run_plan();
        assert_eq!(
            plan.waiting,
            vec![("a".into(), "no live host to run it".into())]
        );
        assert_eq!(h.state.vm("a").unwrap().waiting, "no live host to run it");
        h.host(1, 1, 4);
        h.vm("b", 1024, 1, None);
        h.run_plan();
        assert_eq!(hosts_of(&h, &["a", "b"]), vec![Some(1), None]);
        let reason = "no live host has room for 1024 MiB and 1 vCPUs";
        assert_eq!(h.state.vm("b").unwrap().waiting, reason);
        // The reason is replicated once, not on every round.
        let again = plan_placements(&h.state);
        assert!(again.commands.is_empty(), "{again:?}");
        assert_eq!(again.waiting, vec![("b".into(), reason.into())]);
        h.host(2, 2, 4);
        h.run_plan();
        assert_eq!(h.host_of("b"), Some(2));
        assert_eq!(h.state.vm("b").unwrap().waiting, "");
    }

    #[test]
    fn replaces_the_vms_of_a_dead_host_on_the_survivors() {
        let mut h = Harness::new();
        for id in 1..=3 {
            h.host(id, 4, 4);
        }
        for i in 0..6 {
            h.vm(&format!("vm{i}"), 1024, 1, None);
        }
        h.run_plan();
        let on_1: Vec<String> = h.state.vms_on(1).map(|vm| vm.id.clone()).collect();
        assert_eq!(on_1.len(), 2);
        let tokens: Vec<u64> = on_1.iter().map(|vm| h.token(vm)).collect();
        h.ok(Command::HostDead {
            host: 1,
            reason: "test".into(),
        });
        // A stale plan made before the death would be rejected; a fresh one places.
        h.run_plan();
        for (vm, old) in on_1.iter().zip(tokens) {
            let host = h.host_of(vm).unwrap();
            assert_ne!(host, 1);
            assert!(h.token(vm) > old);
        }
        assert_eq!(h.state.vms_on(2).count() + h.state.vms_on(3).count(), 6);
    }

    #[test]
    fn a_plan_applied_twice_never_moves_twice() {
        let mut h = Harness::new();
        h.host(1, 4, 4);
        h.host(2, 4, 4);
        h.vm("a", 1024, 1, None);
        let plan = plan(&h.state);
        for command in plan.commands.clone() {
            assert!(matches!(h.apply(command), Outcome::Placed { .. }));
        }
        let token = h.token("a");
        for command in plan.commands {
            assert!(matches!(h.apply(command), Outcome::Rejected(_)));
        }
        assert_eq!(h.token("a"), token);
    }

    /// Carries out what the source host does for a migration: its final snapshot.
    fn final_snapshots(h: &mut Harness) {
        let migrating: Vec<String> = h
            .state
            .vms()
            .filter(|vm| vm.migration.is_some_and(|m| !m.ready))
            .map(|vm| vm.id.clone())
            .collect();
        for (i, vm) in migrating.iter().enumerate() {
            let mut record = h.next_snapshot(vm, SnapshotKind::Full, 100 + i as u64);
            record.final_for_migration = true;
            h.ok(Command::SnapshotCommitted(record));
        }
    }

    #[test]
    fn drain_moves_every_vm_then_marks_the_host_drained() {
        let mut h = Harness::new();
        for id in 1..=3 {
            h.host(id, 4, 4);
        }
        for i in 0..6 {
            h.vm(&format!("vm{i}"), 1024, 1, None);
        }
        h.run_plan();
        let on_1: Vec<String> = h.state.vms_on(1).map(|vm| vm.id.clone()).collect();
        h.ok(Command::DrainHost { host: 1 });
        // Round 1: a migration request for each VM on the host; none moves yet.
        let plan = h.run_plan();
        assert_eq!(
            plan.commands.len(),
            on_1.len(),
            "one migrate per VM: {plan:?}"
        );
        assert!(on_1.iter().all(|vm| h.host_of(vm) == Some(1)));
        // Until the final snapshots are committed, rounds propose nothing new.
        assert_eq!(super::plan(&h.state).commands, vec![]);
        final_snapshots(&mut h);
        // Round 2: the ready VMs are placed elsewhere.
        h.run_plan();
        for vm in &on_1 {
            assert!(matches!(h.host_of(vm), Some(2) | Some(3)), "{vm}");
        }
        assert_eq!(h.state.vms_on(1).count(), 0);
        // Round 3: drained.
        assert_eq!(
            super::plan(&h.state).commands,
            vec![Command::HostDrained { host: 1 }]
        );
        h.run_plan();
        assert_eq!(h.state.host(1).unwrap().state, HostState::Drained);
        assert_eq!(super::plan(&h.state), Plan::default());
    }

    #[test]
    fn drain_requests_no_move_without_room_elsewhere() {
        let mut h = Harness::new();
        h.host(1, 4, 4);
        h.host(2, 1, 4);
        h.vm("big", 2048, 1, None);
        h.vm("small", 512, 1, None);
        assert!(matches!(h.place("big", 1), Outcome::Placed { .. }));
        assert!(matches!(h.place("small", 1), Outcome::Placed { .. }));
        h.ok(Command::DrainHost { host: 1 });
        // Only "small" fits on host 2: "big" keeps running on the draining host.
        assert_eq!(
            super::plan(&h.state).commands,
            vec![Command::MigrateVm {
                vm: "small".into(),
                target: None
            }]
        );
        h.run_plan();
        final_snapshots(&mut h);
        h.run_plan();
        assert_eq!(hosts_of(&h, &["big", "small"]), vec![Some(1), Some(2)]);
        assert_eq!(h.state.host(1).unwrap().state, HostState::Draining);
        // A host with room joins: the drain completes.
        h.host(3, 4, 4);
        h.run_plan();
        final_snapshots(&mut h);
        h.run_plan();
        h.run_plan();
        assert_eq!(h.host_of("big"), Some(3));
        assert_eq!(h.state.host(1).unwrap().state, HostState::Drained);
    }

    #[test]
    fn a_ready_migration_without_room_is_called_off() {
        let mut h = Harness::new();
        h.host(1, 4, 4);
        h.host(2, 4, 4);
        h.vm("a", 2048, 1, None);
        h.vm("b", 3072, 1, None);
        assert!(matches!(h.place("a", 1), Outcome::Placed { .. }));
        assert!(matches!(h.place("b", 2), Outcome::Placed { .. }));
        h.ok(Command::MigrateVm {
            vm: "a".into(),
            target: None,
        });
        final_snapshots(&mut h);
        let plan = h.run_plan();
        assert_eq!(
            plan.commands,
            vec![Command::CancelMigration { vm: "a".into() }]
        );
        assert_eq!(
            plan.waiting,
            vec![(
                "a".into(),
                "no live host has room for 2048 MiB and 1 vCPUs".into()
            )]
        );
        assert_eq!(h.host_of("a"), Some(1));
        assert_eq!(h.state.vm("a").unwrap().migration, None);
    }

    #[test]
    fn a_migration_prefers_its_target() {
        let mut h = Harness::new();
        for id in 1..=3 {
            h.host(id, 4, 4);
        }
        h.vm("a", 1024, 1, None);
        h.vm("b", 1024, 1, None);
        h.run_plan();
        assert_eq!(hosts_of(&h, &["a", "b"]), vec![Some(1), Some(2)]);
        // Host 3 is emptier, but the request names host 2.
        h.ok(Command::MigrateVm {
            vm: "a".into(),
            target: Some(2),
        });
        final_snapshots(&mut h);
        h.run_plan();
        assert_eq!(h.host_of("a"), Some(2));
        // Without a target: the least loaded other host.
        h.ok(Command::MigrateVm {
            vm: "a".into(),
            target: None,
        });
        final_snapshots(&mut h);
        h.run_plan();
        assert_eq!(h.host_of("a"), Some(1));
    }
}
