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
//!   source).

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

/// Place commands for every VM that needs a host (and every migration that is ready).
pub fn plan_placements(state: &ClusterState) -> Plan {
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
/// (its host then takes the final snapshot, and [`plan_placements`] moves it), and
/// "drained" for a draining host with no VM left.
pub fn plan_drains(state: &ClusterState) -> Vec<Command> {
    let mut commands = Vec::new();
    for host in state.hosts().filter(|h| h.state == HostState::Draining) {
        let mut any = false;
        for vm in state.vms_on(host.id) {
            any = true;
            if vm.migration.is_none() {
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
