//! Helpers for tests that drive a [`ClusterState`] through encoded commands, the way
//! the log does.

use super::command::{Command, HostId, RequestId, Resources, SnapshotKind, SnapshotRecord, VmSpec};
use super::state::{snapshot_path, ClusterState, Outcome, RejectCode};

pub const MIB: u64 = 1024 * 1024;
pub const GIB: u64 = 1024 * MIB;

pub struct Harness {
    pub state: ClusterState,
    pub index: u64,
}

impl Harness {
    pub fn new() -> Self {
        Harness {
            state: ClusterState::new(),
            index: 0,
        }
    }

    /// Commits `command` without a request id at the next index.
    pub fn apply(&mut self, command: Command) -> Outcome {
        self.apply_request(RequestId(0), command)
    }

    pub fn apply_request(&mut self, request: RequestId, command: Command) -> Outcome {
        self.index += 1;
        self.state.apply(self.index, &command.to_bytes(request))
    }

    pub fn ok(&mut self, command: Command) {
        let described = format!("{command:?}");
        match self.apply(command) {
            Outcome::Done | Outcome::Placed { .. } => {}
            other => panic!("{described}: {other:?}"),
        }
    }

    pub fn rejected(&mut self, command: Command) -> (RejectCode, String) {
        let described = format!("{command:?}");
        match self.apply(command) {
            Outcome::Rejected(r) => (r.code, r.message),
            other => panic!("{described}: expected a rejection, got {other:?}"),
        }
    }

    pub fn host(&mut self, id: HostId, memory_gib: u64, vcpus: u32) {
        self.ok(Command::RegisterHost {
            host: id,
            capacity: Resources {
                memory_bytes: memory_gib * GIB,
                vcpus,
            },
        });
    }

    pub fn vm(&mut self, id: &str, memory_mib: u64, vcpus: u32, group: Option<&str>) {
        self.ok(Command::CreateVm {
            vm: id.into(),
            spec: spec(memory_mib, vcpus, group),
        });
    }

    pub fn token(&self, vm: &str) -> u64 {
        self.state.vm(vm).expect("known vm").token
    }

    pub fn host_of(&self, vm: &str) -> Option<HostId> {
        self.state.vm(vm).expect("known vm").host
    }

    pub fn place(&mut self, vm: &str, host: HostId) -> Outcome {
        let expected_token = self.token(vm);
        self.apply(Command::PlaceVm {
            vm: vm.into(),
            host,
            expected_token,
        })
    }

    /// Applies every command of a planning round (placement and drain).
    pub fn run_plan(&mut self) -> super::placement::Plan {
        let plan = super::placement::plan(&self.state);
        for command in plan.commands.clone() {
            self.apply(command);
        }
        plan
    }

    /// The next valid snapshot record of `vm` under its current token.
    pub fn next_snapshot(&self, vm: &str, kind: SnapshotKind, id: u64) -> SnapshotRecord {
        let v = self.state.vm(vm).expect("known vm");
        let latest = v.latest_snapshot();
        let seq = latest.filter(|l| l.token == v.token).map_or(0, |l| l.seq) + 1;
        SnapshotRecord {
            vm: vm.into(),
            token: v.token,
            seq,
            kind,
            snapshot_id: id,
            parent_id: match kind {
                SnapshotKind::Full => 0,
                SnapshotKind::Diff => latest.map_or(0, |l| l.snapshot_id),
            },
            path: snapshot_path(vm, v.token, seq),
            final_for_migration: false,
            taken_at_ms: 1_700_000_000_000,
        }
    }
}

pub fn spec(memory_mib: u64, vcpus: u32, group: Option<&str>) -> VmSpec {
    VmSpec {
        resources: Resources {
            memory_bytes: memory_mib * MIB,
            vcpus,
        },
        touch_percent: 10,
        snapshot_interval_ms: 1000,
        full_every: 4,
        anti_affinity: group.map(str::to_string),
    }
}
