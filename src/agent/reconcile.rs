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
use crate::cluster::state::{snapshot_path, ClusterState, CommittedSnapshot, Vm};
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
    /// The highest snapshot sequence used under `token` (committed or not), so a path
    /// is not written twice. After an agent restart: the highest `<token>-<seq>`
    /// directory found under `vms/<vm-id>/` for this token.
    pub last_seq_used: u64,
    /// A snapshot is being written or its record is being committed.
    pub snapshot_in_flight: bool,
}

/// What this host must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start `vigil vmm` for the VM: restore the committed chain `restore` (full
    /// snapshot first, then diffs in order; paths relative to the shared dir), or boot
    /// `spec` when empty. The starter checks that each directory's state file carries
    /// the committed snapshot id: a directory rewritten by an attempt whose record never
    /// committed is refused, not restored.
    Start {
        vm: String,
        token: u64,
        spec: VmSpec,
        restore: Vec<CommittedSnapshot>,
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
        if vm.desired == Desired::Stopped {
            stop(actions, vmm, StopReason::DesiredStopped);
        } else if !placed_here {
            stop(actions, vmm, StopReason::NotPlacedHere);
        } else if vmm.token < vm.token {
            stop(actions, vmm, StopReason::StaleToken);
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
                    restore: vm.chain.clone(),
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
            // Fenced too: the renewal above lets a fenced VMM run again, and the final
            // snapshot must be of a paused VM (the simulator found a fenced migrating
            // VMM that the renewal resumed: it kept running after its final snapshot,
            // and then also on the host the VM moved to).
            if vmm.state != VmmState::Paused {
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

/// A snapshot asked for through the API (`POST /vms/{id}/snapshot`): of `kind`, when
/// a diff can continue the committed chain from this VMM's last snapshot.
pub fn requested_snapshot(
    vm: &Vm,
    vmm: &LocalVmm,
    kind: SnapshotKind,
) -> Result<SnapshotRequest, String> {
    let mut request = next_snapshot(vm, vmm, false);
    match (kind, request.kind) {
        (SnapshotKind::Diff, SnapshotKind::Full) => Err(format!(
            "a diff of vm {} must continue the committed chain from this VMM's last snapshot (and the chain must have room): take a full one",
            vm.id
        )),
        (SnapshotKind::Full, SnapshotKind::Diff) => {
            request.kind = SnapshotKind::Full;
            request.parent_id = 0;
            Ok(request)
        }
        _ => Ok(request),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::command::Command;
    use crate::cluster::state::Outcome;
    use crate::cluster::testkit::Harness;

    const MS: u64 = 1_000_000;
    const NOW: u64 = 100_000 * MS;
    const LEASE: Option<u64> = Some(NOW + 400 * MS);

    /// Hosts 1 and 2; VM "a" (snapshots every second, a full one every 4) on host 1.
    fn placed() -> Harness {
        let mut h = Harness::new();
        h.host(1, 4, 4);
        h.host(2, 4, 4);
        h.vm("a", 1024, 1, None);
        assert!(matches!(h.place("a", 1), Outcome::Placed { .. }));
        h
    }

    fn vmm(vm: &str, token: u64, state: VmmState) -> LocalVmm {
        LocalVmm {
            vm: vm.into(),
            token,
            state,
            adopted: true,
            stopping: false,
            since_ns: NOW - 10 * MS,
            last_snapshot_id: 0,
            last_snapshot_requested_ns: None,
            last_seq_used: 0,
            snapshot_in_flight: false,
        }
    }

    fn run(
        h: &Harness,
        host: HostId,
        vmms: &[LocalVmm],
        lease: Option<u64>,
        now: u64,
    ) -> Vec<Action> {
        reconcile(&Input {
            state: &h.state,
            host,
            vmms,
            own_lease_expiry_ns: lease,
            now_ns: now,
        })
    }

    fn renew(vm: &str, token: u64) -> Action {
        Action::Renew {
            vm: vm.into(),
            token,
            deadline_ns: LEASE.unwrap(),
        }
    }

    #[test]
    fn starts_a_placed_vm_booting_the_spec_or_restoring_the_chain() {
        let mut h = placed();
        let token = h.token("a");
        let spec = h.state.vm("a").unwrap().spec.clone();
        assert_eq!(
            run(&h, 1, &[], LEASE, NOW),
            vec![Action::Start {
                vm: "a".into(),
                token,
                spec: spec.clone(),
                restore: vec![],
                lease_deadline_ns: LEASE.unwrap(),
            }]
        );
        assert_eq!(run(&h, 2, &[], LEASE, NOW), vec![], "not placed on host 2");
        // With committed snapshots: the chain, full first.
        let full = h.next_snapshot("a", SnapshotKind::Full, 7);
        h.ok(Command::SnapshotCommitted(full.clone()));
        let diff = h.next_snapshot("a", SnapshotKind::Diff, 8);
        h.ok(Command::SnapshotCommitted(diff.clone()));
        h.ok(Command::HostDead {
            host: 1,
            reason: "test".into(),
        });
        assert!(matches!(h.place("a", 2), Outcome::Placed { .. }));
        match &run(&h, 2, &[], LEASE, NOW)[..] {
            [Action::Start { restore, token, .. }] => {
                let paths: Vec<&str> = restore.iter().map(|s| s.path.as_str()).collect();
                assert_eq!(paths, vec![full.path.as_str(), diff.path.as_str()]);
                let ids: Vec<u64> = restore.iter().map(|s| s.snapshot_id).collect();
                assert_eq!(ids, vec![7, 8]);
                assert_eq!(*token, h.token("a"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn never_starts_or_renews_without_a_valid_own_lease() {
        let h = placed();
        let token = h.token("a");
        for lease in [None, Some(NOW), Some(NOW - 1)] {
            assert_eq!(run(&h, 1, &[], lease, NOW), vec![], "{lease:?}");
            let running = [vmm("a", token, VmmState::Running)];
            assert_eq!(run(&h, 1, &running, lease, NOW), vec![], "{lease:?}");
            // A fenced VMM stays fenced: no renewal would resume it.
            let fenced = [vmm("a", token, VmmState::Fenced)];
            assert_eq!(run(&h, 1, &fenced, lease, NOW), vec![], "{lease:?}");
        }
        // With the lease: renewed up to the lease's expiry (a fenced one resumes so).
        let fenced = [vmm("a", token, VmmState::Fenced)];
        assert_eq!(run(&h, 1, &fenced, LEASE, NOW), vec![renew("a", token)]);
    }

    #[test]
    fn adopts_a_vmm_found_with_the_current_token_instead_of_restarting_it() {
        let h = placed();
        let token = h.token("a");
        let mut found = vmm("a", token, VmmState::Running);
        found.adopted = false;
        assert_eq!(
            run(&h, 1, &[found.clone()], LEASE, NOW),
            vec![
                Action::Adopt {
                    vm: "a".into(),
                    token
                },
                renew("a", token)
            ]
        );
        // Without a lease it is adopted but not renewed.
        assert_eq!(
            run(&h, 1, &[found], None, NOW),
            vec![Action::Adopt {
                vm: "a".into(),
                token
            }]
        );
    }

    #[test]
    fn a_host_that_comes_back_stops_the_vms_that_moved() {
        let mut h = placed();
        let old = h.token("a");
        h.ok(Command::HostDead {
            host: 1,
            reason: "partitioned".into(),
        });
        assert!(matches!(h.place("a", 2), Outcome::Placed { .. }));
        h.ok(Command::HostAlive { host: 1 });
        let new = h.token("a");
        assert!(new > old);
        // Host 1 still has its VMM (fenced, or even running); it holds a lease again.
        for state in [VmmState::Fenced, VmmState::Running] {
            let mut found = vmm("a", old, state);
            found.adopted = false;
            assert_eq!(
                run(&h, 1, &[found], LEASE, NOW),
                vec![Action::Stop {
                    vm: "a".into(),
                    token: old,
                    reason: StopReason::NotPlacedHere
                }],
                "never renewed, adopted or restarted"
            );
        }
        // Host 2 runs it with the new token.
        assert!(matches!(
            &run(&h, 2, &[], LEASE, NOW)[..],
            [Action::Start { token, .. }] if *token == new
        ));
    }

    #[test]
    fn a_stale_vmm_is_stopped_before_the_current_one_starts() {
        let mut h = placed();
        let old = h.token("a");
        // Moved away and back: host 1 again, with a newer token.
        h.ok(Command::HostDead {
            host: 1,
            reason: "test".into(),
        });
        h.ok(Command::HostAlive { host: 1 });
        assert!(matches!(h.place("a", 1), Outcome::Placed { .. }));
        let stale = [vmm("a", old, VmmState::Fenced)];
        assert_eq!(
            run(&h, 1, &stale, LEASE, NOW),
            vec![Action::Stop {
                vm: "a".into(),
                token: old,
                reason: StopReason::StaleToken
            }],
            "no start while the old VMM is still here"
        );
        let mut stopping = stale[0].clone();
        stopping.stopping = true;
        assert_eq!(run(&h, 1, &[stopping], LEASE, NOW), vec![]);
        assert!(matches!(
            &run(&h, 1, &[], LEASE, NOW)[..],
            [Action::Start { .. }]
        ));
    }

    #[test]
    fn stops_for_deleted_stopped_and_failed_vms() {
        let mut h = placed();
        let token = h.token("a");
        let failed = [vmm("a", token, VmmState::Failed)];
        assert_eq!(
            run(&h, 1, &failed, LEASE, NOW),
            vec![Action::Stop {
                vm: "a".into(),
                token,
                reason: StopReason::Failed
            }]
        );
        h.ok(Command::SetDesired {
            vm: "a".into(),
            desired: Desired::Stopped,
        });
        let running = [vmm("a", token, VmmState::Running)];
        assert_eq!(
            run(&h, 1, &running, LEASE, NOW),
            vec![Action::Stop {
                vm: "a".into(),
                token,
                reason: StopReason::DesiredStopped
            }]
        );
        h.ok(Command::DeleteVm { vm: "a".into() });
        assert_eq!(
            run(&h, 1, &running, LEASE, NOW),
            vec![Action::Stop {
                vm: "a".into(),
                token,
                reason: StopReason::UnknownVm
            }]
        );
    }

    #[test]
    fn leaves_alone_what_a_lagging_state_does_not_know_yet() {
        let h = placed();
        let ahead = h.state.applied_index() + 5;
        // A VM this node has not applied yet, and a newer token of a known VM.
        let vmms = [
            vmm("later", ahead, VmmState::Running),
            vmm("a", ahead, VmmState::Running),
        ];
        assert_eq!(run(&h, 1, &vmms, LEASE, NOW), vec![]);
    }

    fn snapshot_of(actions: &[Action]) -> Option<&SnapshotRequest> {
        actions.iter().find_map(|a| match a {
            Action::Snapshot(request) => Some(request),
            _ => None,
        })
    }

    #[test]
    fn snapshots_when_due_diffs_between_full_ones() {
        let mut h = placed();
        let token = h.token("a");
        let mut local = vmm("a", token, VmmState::Running);
        local.since_ns = NOW;
        // The interval (1 s) runs from the start.
        assert_eq!(
            snapshot_of(&run(&h, 1, &[local.clone()], LEASE, NOW + 999 * MS)),
            None
        );
        let at = NOW + 1000 * MS;
        let lease = Some(at + 400 * MS);
        let mut ids = 0x100;
        let mut kinds = Vec::new();
        for _ in 0..9 {
            let actions = run(&h, 1, &[local.clone()], lease, at);
            let request = snapshot_of(&actions).expect("due").clone();
            assert_eq!(request.path, format!("vms/a/{token}-{}", request.seq));
            assert!(!request.final_for_migration);
            // While it is in flight, no second one.
            let mut busy = local.clone();
            busy.snapshot_in_flight = true;
            assert_eq!(snapshot_of(&run(&h, 1, &[busy], lease, at)), None);
            // The VMM writes it; the record is committed.
            ids += 1;
            let record = snapshot_record(&request, ids, 0);
            assert_eq!(
                h.apply(Command::SnapshotCommitted(record)),
                Outcome::Done,
                "{request:?}"
            );
            kinds.push(request.kind);
            local.last_snapshot_id = ids;
            local.last_seq_used = request.seq;
            local.last_snapshot_requested_ns = Some(at - 1000 * MS);
        }
        use SnapshotKind::{Diff, Full};
        assert_eq!(
            kinds,
            vec![Full, Diff, Diff, Diff, Full, Diff, Diff, Diff, Full]
        );
        // Not due again right after one.
        local.last_snapshot_requested_ns = Some(at);
        assert_eq!(
            snapshot_of(&run(&h, 1, &[local.clone()], lease, at + MS)),
            None
        );
        // A VMM whose last snapshot is not the committed one (its record was lost):
        // a full one, with a sequence past the one it used.
        local.last_snapshot_requested_ns = None;
        local.since_ns = NOW;
        local.last_snapshot_id = 0xbad;
        local.last_seq_used += 3;
        let request = snapshot_of(&run(&h, 1, &[local.clone()], lease, at))
            .unwrap()
            .clone();
        assert_eq!(request.kind, Full);
        assert_eq!(request.seq, local.last_seq_used + 1);
        // No snapshot of a fenced VMM, nor without a lease.
        local.state = VmmState::Fenced;
        assert_eq!(snapshot_of(&run(&h, 1, &[local.clone()], lease, at)), None);
        local.state = VmmState::Running;
        assert_eq!(run(&h, 1, &[local], None, at), vec![]);
    }

    #[test]
    fn a_migrating_vm_is_paused_snapshotted_and_kept_paused() {
        let mut h = placed();
        let token = h.token("a");
        h.ok(Command::MigrateVm {
            vm: "a".into(),
            target: Some(2),
        });
        let running = vmm("a", token, VmmState::Running);
        let actions = run(&h, 1, std::slice::from_ref(&running), LEASE, NOW);
        assert_eq!(actions[0], renew("a", token));
        assert_eq!(
            actions[1],
            Action::Pause {
                vm: "a".into(),
                token
            }
        );
        let request = snapshot_of(&actions).unwrap().clone();
        assert!(request.final_for_migration);
        assert_eq!(actions.len(), 3);
        // Paused, snapshot in flight: only renewals.
        let mut paused = running.clone();
        paused.state = VmmState::Paused;
        paused.snapshot_in_flight = true;
        assert_eq!(
            run(&h, 1, &[paused.clone()], LEASE, NOW),
            vec![renew("a", token)]
        );
        // Committed: ready; stays paused (no resume, no more snapshots).
        h.ok(Command::SnapshotCommitted(snapshot_record(&request, 5, 0)));
        paused.snapshot_in_flight = false;
        paused.last_snapshot_id = 5;
        assert_eq!(
            run(&h, 1, &[paused.clone()], LEASE, NOW),
            vec![renew("a", token)]
        );
        // The leader places it on host 2: host 1 stops its VMM, host 2 restores the
        // final snapshot.
        assert!(matches!(h.place("a", 2), Outcome::Placed { .. }));
        assert_eq!(
            run(&h, 1, &[paused.clone()], LEASE, NOW),
            vec![Action::Stop {
                vm: "a".into(),
                token,
                reason: StopReason::NotPlacedHere
            }]
        );
        match &run(&h, 2, &[], LEASE, NOW)[..] {
            [Action::Start { restore, .. }] => {
                assert_eq!(restore.last().map(|s| &s.path), Some(&request.path))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_fenced_migrating_vm_is_paused_before_its_final_snapshot() {
        let mut h = placed();
        let token = h.token("a");
        h.ok(Command::MigrateVm {
            vm: "a".into(),
            target: Some(2),
        });
        let fenced = vmm("a", token, VmmState::Fenced);
        let actions = run(&h, 1, std::slice::from_ref(&fenced), LEASE, NOW);
        assert_eq!(actions[0], renew("a", token));
        assert_eq!(
            actions[1],
            Action::Pause {
                vm: "a".into(),
                token
            }
        );
        assert!(snapshot_of(&actions).unwrap().final_for_migration);
        assert_eq!(actions.len(), 3);
    }

    #[test]
    fn a_paused_vm_without_a_migration_resumes() {
        let h = placed();
        let token = h.token("a");
        let paused = vmm("a", token, VmmState::Paused);
        assert_eq!(
            run(&h, 1, &[paused], LEASE, NOW),
            vec![
                renew("a", token),
                Action::Resume {
                    vm: "a".into(),
                    token
                }
            ]
        );
    }
}
