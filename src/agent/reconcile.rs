//! Reconcile: what one host must do so that the VMMs running on it match the committed
//! cluster state. Pure: the agent loop passes the state, this host's id, the VMMs it
//! found or runs (from their status replies), its own lease and the time, and carries
//! out the actions in order.
//!
//! Safety rules, in the order they matter:
//! - Only a VMM holding the VM's current token, on the host the VM is placed on, is
//!   ever renewed, started, resumed or adopted. Everything else is stopped: a host that
//!   comes back learns from the log that its VMs moved (their tokens moved on) and stops
//!   its stale VMMs without renewing them.
//! - Nothing is renewed or started unless this host's own lease is valid (a renewal
//!   carries the lease's expiry as the VMM's deadline, so the VMM can never outlive it).
//! - A new VMM is started only once no other VMM of that VM remains on this host.
//! - A VMM whose token is newer than this node's state knows (the state lags the log,
//!   e.g. right after an agent restart) is left alone: not stopped, not renewed, until
//!   the state catches up.
//! - A VMM found running with the current token (agent restart) is adopted, never
//!   restarted.
//! - Snapshots: per-VM interval, a full one every `full_every` (a diff otherwise, and
//!   only when the VMM's own last snapshot is the committed chain's last, so the diff
//!   continues the chain). A migrating VM is paused, then its final snapshot is taken;
//!   it stays paused until the leader places it elsewhere (its token then moves on and
//!   this host stops it).

use crate::cluster::command::{Desired, HostId, SnapshotKind, SnapshotRecord, VmSpec};
use crate::cluster::state::{snapshot_path, ClusterState, Vm};
use crate::limits::MAX_SNAPSHOT_CHAIN;
use vigil_kvm::control::VmmState;

/// A VMM on this host, as the agent knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalVmm {
    pub vm: String,
    pub token: u64,
    pub state: VmmState,
    /// Started or adopted by this agent process (false: found at agent start).
    pub adopted: bool,
    /// A stop was sent; the process has not exited yet.
    pub stopping: bool,
    /// When this agent started or adopted it (its monotonic clock).
    pub since_ns: u64,
    /// The snapshot it took or restored last (the parent of its next diff; 0: none).
    pub last_snapshot_id: u64,
    /// When this agent last asked it for a snapshot.
    pub last_snapshot_requested_ns: Option<u64>,
    /// The highest snapshot sequence this agent used under `token` (committed or not),
    /// so a path is never written twice.
    pub last_seq_used: u64,
    /// A snapshot is being written or its record is being committed.
    pub snapshot_in_flight: bool,
}

/// What this host must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start `vigil vmm` for the VM: restore `restore` (paths relative to the shared
    /// dir, full snapshot first, then diffs in order), or boot `spec` when empty.
    Start {
        vm: String,
        token: u64,
        spec: VmSpec,
        restore: Vec<String>,
        lease_deadline_ns: u64,
    },
    /// Take over a VMM found running with the current token (connect, do not restart).
    Adopt {
        vm: String,
        token: u64,
    },
    Stop {
        vm: String,
        token: u64,
        reason: StopReason,
    },
    /// Extend the VMM's watchdog to this host's lease expiry.
    Renew {
        vm: String,
        token: u64,
        deadline_ns: u64,
    },
    Pause {
        vm: String,
        token: u64,
    },
    Resume {
        vm: String,
        token: u64,
    },
    /// Ask the VMM for a snapshot into `path`; once it is written, commit
    /// [`snapshot_record`] through Raft.
    Snapshot(SnapshotRequest),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The VM is no longer in the cluster state.
    UnknownVm,
    /// The VM is stopped.
    DesiredStopped,
    /// The VM is placed elsewhere or waits for a host.
    NotPlacedHere,
    /// Another placement (a newer token) replaced this one.
    StaleToken,
    /// The VMM reported a failure; it is started again once gone.
    Failed,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRequest {
    pub vm: String,
    pub token: u64,
    pub kind: SnapshotKind,
    pub seq: u64,
    pub path: String,
    /// For a diff: the committed snapshot it continues (the VMM's last one).
    pub parent_id: u64,
    pub final_for_migration: bool,
}

/// The record to commit once the VMM wrote the snapshot with id `snapshot_id`.
pub fn snapshot_record(
    request: &SnapshotRequest,
    snapshot_id: u64,
    taken_at_ms: u64,
) -> SnapshotRecord {
    SnapshotRecord {
        vm: request.vm.clone(),
        token: request.token,
        seq: request.seq,
        kind: request.kind,
        snapshot_id,
        parent_id: request.parent_id,
        path: request.path.clone(),
        final_for_migration: request.final_for_migration,
        taken_at_ms,
    }
}

/// What reconcile looks at.
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    pub state: &'a ClusterState,
    pub host: HostId,
    pub vmms: &'a [LocalVmm],
    /// Expiry of this host's own lease (None: no lease yet); valid while `now_ns` is
    /// before it.
    pub own_lease_expiry_ns: Option<u64>,
    pub now_ns: u64,
}

/// The actions, in a deterministic order (VMs in id order; per VM: stops first).
pub fn reconcile(input: &Input<'_>) -> Vec<Action> {
    let lease = input
        .own_lease_expiry_ns
        .filter(|&expiry| expiry > input.now_ns);
    let mut actions = Vec::new();

    // VMMs of VMs the state does not know (deleted, or created after what we applied).
    let mut orphans: Vec<&LocalVmm> = input
        .vmms
        .iter()
        .filter(|vmm| input.state.vm(&vmm.vm).is_none())
        .collect();
    orphans.sort_by(|a, b| (&a.vm, a.token).cmp(&(&b.vm, b.token)));
    for vmm in orphans {
        // A token beyond what we applied: the VM exists in a log we have not caught up
        // with. Leave it alone.
        if vmm.token <= input.state.applied_index() {
            stop(&mut actions, vmm, StopReason::UnknownVm);
        }
    }

    for vm in input.state.vms() {
        let mut local: Vec<&LocalVmm> = input.vmms.iter().filter(|v| v.vm == vm.id).collect();
        local.sort_by_key(|v| v.token);
        reconcile_vm(&mut actions, input, lease, vm, &local);
    }
    actions
}

fn reconcile_vm(
    actions: &mut Vec<Action>,
    input: &Input<'_>,
    lease: Option<u64>,
    vm: &Vm,
    local: &[&LocalVmm],
) {
    let placed_here = vm.host == Some(input.host);
    let mut current: Option<&LocalVmm> = None;
    for &vmm in local {
        if vmm.token > vm.token {
            // The state lags: leave it alone (see the module docs).
            continue;
        }
        if vmm.token < vm.token {
            stop(actions, vmm, StopReason::StaleToken);
        } else if vm.desired == Desired::Stopped {
            stop(actions, vmm, StopReason::DesiredStopped);
        } else if !placed_here {
            stop(actions, vmm, StopReason::NotPlacedHere);
        } else if vmm.state == VmmState::Failed {
            stop(actions, vmm, StopReason::Failed);
        } else if !vmm.stopping {
            current = Some(vmm);
        }
    }
    if !placed_here {
        return;
    }
    let Some(vmm) = current else {
        // Start only when no VMM of this VM is left here and our lease is valid.
        if local.is_empty() {
            if let Some(deadline) = lease {
                actions.push(Action::Start {
                    vm: vm.id.clone(),
                    token: vm.token,
                    spec: vm.spec.clone(),
                    restore: vm.chain.iter().map(|s| s.path.clone()).collect(),
                    lease_deadline_ns: deadline,
                });
            }
        }
        return;
    };
    let token = vm.token;
    if !vmm.adopted {
        actions.push(Action::Adopt {
            vm: vm.id.clone(),
            token,
        });
    }
    let Some(deadline) = lease else {
        // Without a valid lease of our own: no renewal, no resume, no snapshot. The
        // VMM fences itself when its deadline passes.
        return;
    };
    actions.push(Action::Renew {
        vm: vm.id.clone(),
        token,
        deadline_ns: deadline,
    });
    match vm.migration {
        Some(migration) => {
            if vmm.state == VmmState::Running {
                actions.push(Action::Pause {
                    vm: vm.id.clone(),
                    token,
                });
            }
            if !migration.ready && !vmm.snapshot_in_flight {
                actions.push(Action::Snapshot(next_snapshot(vm, vmm, true)));
            }
        }
        None => {
            if vmm.state == VmmState::Paused {
                // Paused for a migration that was called off (or by hand): run again.
                actions.push(Action::Resume {
                    vm: vm.id.clone(),
                    token,
                });
            }
            let interval_ns = vm.spec.snapshot_interval_ms.saturating_mul(1_000_000);
            let since = vmm.last_snapshot_requested_ns.unwrap_or(vmm.since_ns);
            let due = interval_ns > 0 && input.now_ns.saturating_sub(since) >= interval_ns;
            if due && !vmm.snapshot_in_flight && vmm.state != VmmState::Fenced {
                actions.push(Action::Snapshot(next_snapshot(vm, vmm, false)));
            }
        }
    }
}

fn stop(actions: &mut Vec<Action>, vmm: &LocalVmm, reason: StopReason) {
    if !vmm.stopping {
        actions.push(Action::Stop {
            vm: vmm.vm.clone(),
            token: vmm.token,
            reason,
        });
    }
}

/// The next snapshot of `vm`: a diff when it continues the committed chain and the
/// chain is shorter than the VM's `full_every`, a full one otherwise.
fn next_snapshot(vm: &Vm, vmm: &LocalVmm, final_for_migration: bool) -> SnapshotRequest {
    let latest = vm.latest_snapshot();
    let continues_chain = latest.is_some_and(|l| l.snapshot_id == vmm.last_snapshot_id);
    let room = vm.chain.len() < (vm.spec.full_every as usize).min(MAX_SNAPSHOT_CHAIN);
    let (kind, parent_id) = match latest {
        Some(latest) if continues_chain && room => (SnapshotKind::Diff, latest.snapshot_id),
        _ => (SnapshotKind::Full, 0),
    };
    let committed_seq = latest.filter(|l| l.token == vm.token).map_or(0, |l| l.seq);
    let seq = committed_seq.max(vmm.last_seq_used) + 1;
    SnapshotRequest {
        vm: vm.id.clone(),
        token: vm.token,
        kind,
        seq,
        path: snapshot_path(&vm.id, vm.token, seq),
        parent_id,
        final_for_migration,
    }
}
