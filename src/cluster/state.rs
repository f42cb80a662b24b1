//! The cluster state: hosts, VMs, placements, fencing tokens, committed snapshots and
//! the metadata KV, as every node applies them from the committed Raft log.
//!
//! Deterministic: the state machine never reads a clock or a random number; anything
//! time-like arrives inside a command (and is only displayed). The same log gives the
//! same state and the same outcomes on every node.
//!
//! Never fails: an entry that does not decode, or a command that cannot be applied
//! (unknown VM, no room, stale token...), is a rejected no-op with a reason.
//!
//! Fencing tokens: a VM's token is the Raft index of the committed entry that last
//! changed where it runs: the placement, or the entry that took it off its host (host
//! declared dead, VM stopped). Tokens only grow. Only a placed VM has a current token
//! that a VMM may hold; everything else is stale.

use std::collections::BTreeMap;
use std::fmt;

use super::command::{
    self, Command, Desired, HostId, Resources, SnapshotKind, SnapshotRecord, VmSpec,
};
use super::dedup::DedupWindow;
use super::kv::{self, KvStore};
use crate::codec::{self, DecodeError, Problem, Reader};
use crate::limits::{
    MAX_DEDUP_REQUESTS, MAX_GROUP_BYTES, MAX_GUEST_MEMORY_BYTES, MAX_HOSTS, MAX_MEMBERS,
    MAX_REASON_BYTES, MAX_SNAPSHOT_CHAIN, MAX_SNAPSHOT_PATH_BYTES, MAX_VCPUS, MAX_VMS,
    MAX_VM_ID_BYTES, MIN_GUEST_MEMORY_BYTES,
};

/// Version of the encoded state (Raft snapshots). 2 added the member addresses at the
/// end; version 1 (no addresses) still decodes.
pub const STATE_VERSION: u8 = 2;

const MIB: u64 = 1024 * 1024;

/// A host's replicated state. "Suspect" is not here: it is the current leader's local
/// opinion (phi accrual), see `agent::failure`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostState {
    Alive,
    Dead,
    Draining,
    Drained,
}

impl HostState {
    pub fn name(self) -> &'static str {
        match self {
            HostState::Alive => "alive",
            HostState::Dead => "dead",
            HostState::Draining => "draining",
            HostState::Drained => "drained",
        }
    }

    /// Whether VMs may stay placed on a host in this state.
    pub fn holds_vms(self) -> bool {
        matches!(self, HostState::Alive | HostState::Draining)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    pub id: HostId,
    pub capacity: Resources,
    pub state: HostState,
    /// Raft index of the entry that set `state`.
    pub state_index: u64,
    /// Why the host was declared dead (empty otherwise).
    pub reason: String,
}

/// A snapshot recorded through Raft: the only kind a restorer trusts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommittedSnapshot {
    pub token: u64,
    pub seq: u64,
    pub kind: SnapshotKind,
    pub snapshot_id: u64,
    pub path: String,
    /// Raft index of the entry that recorded it.
    pub committed_index: u64,
    /// For display only.
    pub taken_at_ms: u64,
}

/// A planned move in progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Migration {
    pub target: Option<HostId>,
    pub requested_index: u64,
    /// The source committed a final snapshot of the paused VM: it may now be placed.
    pub ready: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vm {
    pub id: String,
    pub spec: VmSpec,
    pub desired: Desired,
    /// The host it is placed on; None: stopped, or waiting for a host (see `waiting`).
    pub host: Option<HostId>,
    /// The fencing token (see the module docs).
    pub token: u64,
    /// Why it waits for a host (empty when placed or stopped).
    pub waiting: String,
    /// The restore chain: a full snapshot, then diffs in order; the last is the latest.
    pub chain: Vec<CommittedSnapshot>,
    pub migration: Option<Migration>,
    pub created_index: u64,
}

impl Vm {
    pub fn latest_snapshot(&self) -> Option<&CommittedSnapshot> {
        self.chain.last()
    }

    /// Whether the VM should run but has no host.
    pub fn needs_placement(&self) -> bool {
        self.desired == Desired::Running && self.host.is_none()
    }
}

/// Why a command was not applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RejectCode {
    /// The entry does not decode.
    Malformed = 1,
    /// A field's value is not acceptable (bad name, zero capacity...).
    Invalid = 2,
    UnknownVm = 3,
    UnknownHost = 4,
    VmExists = 5,
    /// A cluster-wide limit (hosts, VMs) is reached.
    LimitReached = 6,
    /// The host is dead, draining or drained.
    HostNotLive = 7,
    NoCapacity = 8,
    /// The token is not the VM's current one.
    StaleToken = 9,
    /// The VM has no host.
    NotPlaced = 10,
    /// The snapshot does not continue the VM's chain (path, sequence, parent, kind).
    BadSnapshot = 11,
    /// The VM or host is not in a state that allows the command.
    WrongState = 12,
}

impl RejectCode {
    fn from_u8(v: u8) -> Option<RejectCode> {
        use RejectCode::*;
        Some(match v {
            1 => Malformed,
            2 => Invalid,
            3 => UnknownVm,
            4 => UnknownHost,
            5 => VmExists,
            6 => LimitReached,
            7 => HostNotLive,
            8 => NoCapacity,
            9 => StaleToken,
            10 => NotPlaced,
            11 => BadSnapshot,
            12 => WrongState,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub code: RejectCode,
    pub message: String,
}

impl Rejection {
    fn new(code: RejectCode, message: impl Into<String>) -> Self {
        Rejection {
            code,
            message: truncate(message.into(), MAX_REASON_BYTES),
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

/// What applying one committed entry did; the same on every node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Kv(kv::Outcome),
    /// Applied (or already as asked: e.g. a dead host declared dead again).
    Done,
    /// The VM was placed; `token` is its new fencing token.
    Placed {
        token: u64,
    },
    /// An empty entry (Raft's no-op): nothing to do.
    Empty,
    Rejected(Rejection),
}

/// The answer of `POST /fence-token/validate`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenCheck {
    Current,
    /// Not the token of the VM's current placement (`current` is its latest token; a VM
    /// without a host has no current placement, and every token is stale).
    Stale {
        current: u64,
    },
    UnknownVm,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterState {
    applied_index: u64,
    hosts: BTreeMap<HostId, Host>,
    vms: BTreeMap<String, Vm>,
    kv: KvStore,
    /// One window for every client command, KV and cluster alike.
    dedup: DedupWindow<Outcome>,
    /// What the VMs placed on each host take (hosts without VMs have no entry).
    /// Derived from `vms`, kept up to date on every placement change, not encoded.
    loads: BTreeMap<HostId, Resources>,
    /// Where each member added at run time listens for peers (`MemberAddress`). Raft's
    /// configuration says who is a member; this says how to reach it.
    member_addresses: BTreeMap<u64, std::net::SocketAddr>,
}

impl Default for ClusterState {
    fn default() -> Self {
        Self::new()
    }
}

type Result<T> = std::result::Result<T, Rejection>;

fn reject<T>(code: RejectCode, message: impl Into<String>) -> Result<T> {
    Err(Rejection::new(code, message))
}

impl ClusterState {
    pub fn new() -> Self {
        ClusterState {
            applied_index: 0,
            hosts: BTreeMap::new(),
            vms: BTreeMap::new(),
            kv: KvStore::new(),
            dedup: DedupWindow::new(MAX_DEDUP_REQUESTS),
            loads: BTreeMap::new(),
            member_addresses: BTreeMap::new(),
        }
    }

    /// The replicated peer addresses of members, by node id.
    pub fn member_addresses(&self) -> &BTreeMap<u64, std::net::SocketAddr> {
        &self.member_addresses
    }

    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }

    pub fn hosts(&self) -> impl Iterator<Item = &Host> {
        self.hosts.values()
    }

    pub fn host(&self, id: HostId) -> Option<&Host> {
        self.hosts.get(&id)
    }

    /// VMs in id order.
    pub fn vms(&self) -> impl Iterator<Item = &Vm> {
        self.vms.values()
    }

    pub fn vm(&self, id: &str) -> Option<&Vm> {
        self.vms.get(id)
    }

    pub fn kv(&self) -> &KvStore {
        &self.kv
    }

    /// VMs placed on `host`, in id order.
    pub fn vms_on(&self, host: HostId) -> impl Iterator<Item = &Vm> {
        self.vms.values().filter(move |vm| vm.host == Some(host))
    }

    /// Memory and vCPUs taken by the VMs placed on `host`.
    pub fn load(&self, host: HostId) -> Resources {
        self.loads.get(&host).copied().unwrap_or_default()
    }

    /// `POST /fence-token/validate`.
    pub fn validate_token(&self, vm: &str, token: u64) -> TokenCheck {
        match self.vms.get(vm) {
            None => TokenCheck::UnknownVm,
            Some(vm) if vm.host.is_some() && vm.token == token => TokenCheck::Current,
            Some(vm) => TokenCheck::Stale { current: vm.token },
        }
    }

    /// Applies the committed entry at Raft `index` (indexes only grow).
    pub fn apply(&mut self, index: u64, entry: &[u8]) -> Outcome {
        assert!(
            index > self.applied_index,
            "entry {index} applied after {}",
            self.applied_index
        );
        self.applied_index = index;
        let outcome = if entry.is_empty() {
            Outcome::Empty
        } else {
            match Command::decode(entry) {
                Err(error) => Outcome::Rejected(Rejection::new(
                    RejectCode::Malformed,
                    format!("entry {index} does not decode: {error}"),
                )),
                Ok((request, command)) => match self.dedup.get(request) {
                    Some(previous) => previous.clone(),
                    None => {
                        let host_before = command_vm(&command)
                            .and_then(|vm| self.vms.get(vm))
                            .and_then(|vm| vm.host);
                        let outcome = match self.apply_command(index, &command) {
                            Ok(outcome) => outcome,
                            Err(rejection) => Outcome::Rejected(rejection),
                        };
                        self.dedup.remember(request, outcome.clone());
                        if let Err(broken) = self.check_touched(&command, host_before) {
                            panic!("cluster state invariant broken by entry {index}: {broken}");
                        }
                        outcome
                    }
                },
            }
        };
        // Tests check everything after every entry (production checks what the entry
        // touched, above, to keep an apply cheap with thousands of VMs).
        if cfg!(test) {
            if let Err(broken) = self.check_state(false) {
                panic!("cluster state invariant broken after entry {index}: {broken}");
            }
        }
        outcome
    }

    /// The invariants of what `command` may have changed: its VM, the hosts that VM
    /// left or joined, the host it names.
    fn check_touched(
        &self,
        command: &Command,
        host_before: Option<HostId>,
    ) -> std::result::Result<(), String> {
        if let Some(vm) = command_vm(command).and_then(|vm| self.vms.get(vm)) {
            self.check_vm(vm, false)?;
            if let Some(host) = vm.host {
                self.check_host(host)?;
            }
        }
        if let Some(host) = host_before {
            self.check_host(host)?;
        }
        if let Some(host) = command_host(command) {
            if self.hosts.contains_key(&host) {
                self.check_host(host)?;
            }
        }
        Ok(())
    }

    /// A host's own fields, and its load against its capacity and state.
    fn check_host(&self, id: HostId) -> std::result::Result<(), String> {
        let host = self
            .hosts
            .get(&id)
            .ok_or_else(|| format!("host {id} holds VMs but is unknown"))?;
        if id != host.id || id == 0 {
            return Err(format!("host {id} is filed under the wrong id"));
        }
        if host.capacity.memory_bytes == 0 || host.capacity.vcpus == 0 {
            return Err(format!("host {id} has no capacity"));
        }
        if host.state_index > self.applied_index {
            return Err(format!("host {id} changed state after the applied index"));
        }
        if let Some(load) = self.loads.get(&id) {
            if !host.state.holds_vms() {
                return Err(format!("{} host {id} holds VMs", host.state.name()));
            }
            if !fits(*load, Resources::default(), host.capacity) {
                return Err(format!("host {id} is over capacity"));
            }
        }
        Ok(())
    }

    /// One VM's invariants (`deep`: also those fixed once validated: id, paths).
    fn check_vm(&self, vm: &Vm, deep: bool) -> std::result::Result<(), String> {
        let id = &vm.id;
        if deep {
            check_name(id, "vm id", MAX_VM_ID_BYTES).map_err(|r| r.message)?;
            check_spec(&vm.spec).map_err(|r| format!("vm {id}: {}", r.message))?;
        }
        if vm.token > self.applied_index || vm.token < vm.created_index {
            return Err(format!(
                "vm {id}: token {} outside {}..={}",
                vm.token, vm.created_index, self.applied_index
            ));
        }
        if let Some(host_id) = vm.host {
            let Some(host) = self.hosts.get(&host_id) else {
                return Err(format!("vm {id} is placed on unknown host {host_id}"));
            };
            if !host.state.holds_vms() {
                return Err(format!(
                    "vm {id} is placed on {} host {host_id}",
                    host.state.name()
                ));
            }
            if vm.desired != Desired::Running {
                return Err(format!("vm {id} is stopped but placed"));
            }
        } else if vm.migration.is_some() {
            return Err(format!("vm {id} migrates without a host"));
        }
        if vm.chain.len() > MAX_SNAPSHOT_CHAIN {
            return Err(format!("vm {id}: chain too long"));
        }
        for (i, snapshot) in vm.chain.iter().enumerate() {
            let kind_ok = (i == 0) == (snapshot.kind == SnapshotKind::Full);
            if !kind_ok
                || snapshot.token > vm.token
                || snapshot.committed_index > self.applied_index
                || snapshot.seq == 0
                || snapshot.snapshot_id == 0
                || (deep && snapshot.path != snapshot_path(id, snapshot.token, snapshot.seq))
            {
                return Err(format!(
                    "vm {id}: snapshot {i} of the chain is inconsistent"
                ));
            }
            if i > 0 && vm.chain[i - 1].committed_index >= snapshot.committed_index {
                return Err(format!("vm {id}: chain out of order"));
            }
        }
        Ok(())
    }

    fn apply_command(&mut self, index: u64, command: &Command) -> Result<Outcome> {
        match command {
            Command::Kv(kv_command) => Ok(Outcome::Kv(match self.kv.apply(index, kv_command) {
                // Bounded like every reason kept in the dedup window (and its snapshot).
                kv::Outcome::Rejected { reason } => kv::Outcome::Rejected {
                    reason: truncate(reason, MAX_REASON_BYTES),
                },
                other => other,
            })),
            Command::RegisterHost { host, capacity } => self.register_host(index, *host, *capacity),
            Command::CreateVm { vm, spec } => self.create_vm(index, vm, spec),
            Command::DeleteVm { vm } => {
                let removed = self.vm_mut(vm)?.clone();
                if let Some(host) = removed.host {
                    sub_load(&mut self.loads, host, removed.spec.resources);
                }
                self.vms.remove(vm.as_str());
                Ok(Outcome::Done)
            }
            Command::SetDesired { vm, desired } => self.set_desired(index, vm, *desired),
            Command::PlaceVm {
                vm,
                host,
                expected_token,
            } => self.place(index, vm, *host, *expected_token),
            Command::HostDead { host, reason } => self.host_dead(index, *host, reason),
            Command::HostAlive { host } => {
                let host = self.host_mut(*host)?;
                if host.state != HostState::Alive {
                    host.state = HostState::Alive;
                    host.state_index = index;
                    host.reason.clear();
                }
                Ok(Outcome::Done)
            }
            Command::DrainHost { host } => {
                let host = self.host_mut(*host)?;
                match host.state {
                    HostState::Dead => {
                        reject(RejectCode::HostNotLive, format!("host {} is dead", host.id))
                    }
                    HostState::Draining | HostState::Drained => Ok(Outcome::Done),
                    HostState::Alive => {
                        host.state = HostState::Draining;
                        host.state_index = index;
                        Ok(Outcome::Done)
                    }
                }
            }
            Command::HostDrained { host } => self.host_drained(index, *host),
            Command::SnapshotCommitted(record) => self.snapshot_committed(index, record),
            Command::MigrateVm { vm, target } => self.migrate(index, vm, *target),
            Command::MemberAddress { id, address } => {
                match address {
                    Some(address) => {
                        if !self.member_addresses.contains_key(id)
                            && self.member_addresses.len() >= MAX_MEMBERS
                        {
                            return reject(
                                RejectCode::LimitReached,
                                format!("{MAX_MEMBERS} member addresses are known already"),
                            );
                        }
                        self.member_addresses.insert(*id, *address);
                    }
                    None => {
                        self.member_addresses.remove(id);
                    }
                }
                Ok(Outcome::Done)
            }
            Command::CancelMigration { vm } => {
                let vm = self.vm_mut(vm)?;
                if vm.migration.is_none() {
                    return reject(
                        RejectCode::WrongState,
                        format!("vm {} has no migration to cancel", vm.id),
                    );
                }
                vm.migration = None;
                Ok(Outcome::Done)
            }
            Command::VmWaiting { vm, reason } => {
                let vm = self.vm_mut(vm)?;
                if !vm.needs_placement() {
                    return reject(
                        RejectCode::WrongState,
                        format!("vm {} does not wait for a host", vm.id),
                    );
                }
                vm.waiting = truncate(reason.clone(), MAX_REASON_BYTES);
                Ok(Outcome::Done)
            }
        }
    }

    fn vm_mut(&mut self, id: &str) -> Result<&mut Vm> {
        match self.vms.get_mut(id) {
            Some(vm) => Ok(vm),
            None => reject(RejectCode::UnknownVm, format!("no vm {id:?}")),
        }
    }

    fn host_mut(&mut self, id: HostId) -> Result<&mut Host> {
        match self.hosts.get_mut(&id) {
            Some(host) => Ok(host),
            None => reject(RejectCode::UnknownHost, format!("no host {id}")),
        }
    }

    fn register_host(&mut self, index: u64, id: HostId, capacity: Resources) -> Result<Outcome> {
        if id == 0 || capacity.memory_bytes == 0 || capacity.vcpus == 0 {
            return reject(
                RejectCode::Invalid,
                format!(
                    "host {id}: the id, memory ({}) and vCPUs ({}) must be non-zero",
                    capacity.memory_bytes, capacity.vcpus
                ),
            );
        }
        let load = self.load(id);
        if let Some(host) = self.hosts.get_mut(&id) {
            if !fits(load, Resources::default(), capacity) {
                return reject(
                    RejectCode::NoCapacity,
                    format!(
                        "host {id} runs VMs taking {} bytes and {} vCPUs, more than the new capacity",
                        load.memory_bytes, load.vcpus
                    ),
                );
            }
            host.capacity = capacity;
            return Ok(Outcome::Done);
        }
        if self.hosts.len() >= MAX_HOSTS {
            return reject(
                RejectCode::LimitReached,
                format!("the cluster holds its limit of {MAX_HOSTS} hosts"),
            );
        }
        self.hosts.insert(
            id,
            Host {
                id,
                capacity,
                state: HostState::Alive,
                state_index: index,
                reason: String::new(),
            },
        );
        Ok(Outcome::Done)
    }

    fn create_vm(&mut self, index: u64, id: &str, spec: &VmSpec) -> Result<Outcome> {
        check_name(id, "vm id", MAX_VM_ID_BYTES)?;
        check_spec(spec)?;
        if self.vms.contains_key(id) {
            return reject(RejectCode::VmExists, format!("vm {id:?} exists"));
        }
        if self.vms.len() >= MAX_VMS {
            return reject(
                RejectCode::LimitReached,
                format!("the cluster holds its limit of {MAX_VMS} VMs"),
            );
        }
        self.vms.insert(
            id.to_string(),
            Vm {
                id: id.to_string(),
                spec: spec.clone(),
                desired: Desired::Running,
                host: None,
                token: index,
                waiting: "waiting for a host".into(),
                chain: Vec::new(),
                migration: None,
                created_index: index,
            },
        );
        Ok(Outcome::Done)
    }

    fn set_desired(&mut self, index: u64, id: &str, desired: Desired) -> Result<Outcome> {
        self.vm_mut(id)?;
        let vm = self.vms.get_mut(id).expect("looked up above");
        if vm.desired == desired {
            return Ok(Outcome::Done);
        }
        vm.desired = desired;
        match desired {
            Desired::Running => vm.waiting = "waiting for a host".into(),
            Desired::Stopped => {
                if vm.host.is_some() {
                    unplace(vm, &mut self.loads, index, "");
                }
                vm.waiting.clear();
            }
        }
        Ok(Outcome::Done)
    }

    fn place(&mut self, index: u64, id: &str, host_id: HostId, expected: u64) -> Result<Outcome> {
        let vm = self
            .vm(id)
            .ok_or_else(|| Rejection::new(RejectCode::UnknownVm, format!("no vm {id:?}")))?;
        if vm.desired == Desired::Stopped {
            return reject(RejectCode::WrongState, format!("vm {id} is stopped"));
        }
        if vm.token != expected {
            return reject(
                RejectCode::StaleToken,
                format!(
                    "vm {id}: placement decided for token {expected}, current token is {}",
                    vm.token
                ),
            );
        }
        let Some(host) = self.hosts.get(&host_id) else {
            return reject(RejectCode::UnknownHost, format!("no host {host_id}"));
        };
        if host.state != HostState::Alive {
            return reject(
                RejectCode::HostNotLive,
                format!("host {host_id} is {}", host.state.name()),
            );
        }
        if let Some(current) = vm.host {
            if current == host_id {
                return reject(
                    RejectCode::WrongState,
                    format!("vm {id} is already on host {host_id}"),
                );
            }
            // Moving a running VM without its final snapshot would lose its state.
            if !vm.migration.is_some_and(|m| m.ready) {
                return reject(
                    RejectCode::WrongState,
                    format!("vm {id} runs on host {current}: it moves only after a migration's final snapshot"),
                );
            }
        }
        let load = self.load(host_id);
        let capacity = host.capacity;
        if !fits(load, vm.spec.resources, capacity) {
            return reject(
                RejectCode::NoCapacity,
                format!(
                    "host {host_id} has {} of {} bytes and {} of {} vCPUs taken",
                    load.memory_bytes, capacity.memory_bytes, load.vcpus, capacity.vcpus
                ),
            );
        }
        let vm = self.vms.get_mut(id).expect("looked up above");
        assert!(index > vm.token, "fencing tokens only grow");
        if let Some(source) = vm.host {
            sub_load(&mut self.loads, source, vm.spec.resources);
        }
        add_load(&mut self.loads, host_id, vm.spec.resources);
        vm.token = index;
        vm.host = Some(host_id);
        vm.migration = None;
        vm.waiting.clear();
        Ok(Outcome::Placed { token: index })
    }

    fn host_dead(&mut self, index: u64, id: HostId, reason: &str) -> Result<Outcome> {
        let host = self.host_mut(id)?;
        if host.state == HostState::Dead {
            return Ok(Outcome::Done);
        }
        host.state = HostState::Dead;
        host.state_index = index;
        host.reason = truncate(reason.to_string(), MAX_REASON_BYTES);
        let why = format!("host {id} declared dead: {reason}");
        for vm in self.vms.values_mut().filter(|vm| vm.host == Some(id)) {
            unplace(vm, &mut self.loads, index, &why);
        }
        Ok(Outcome::Done)
    }

    fn host_drained(&mut self, index: u64, id: HostId) -> Result<Outcome> {
        let remaining = self.vms_on(id).count();
        let host = self.host_mut(id)?;
        match host.state {
            HostState::Drained => Ok(Outcome::Done),
            HostState::Draining if remaining == 0 => {
                host.state = HostState::Drained;
                host.state_index = index;
                Ok(Outcome::Done)
            }
            HostState::Draining => reject(
                RejectCode::WrongState,
                format!("host {id} still holds {remaining} VMs"),
            ),
            state => reject(
                RejectCode::WrongState,
                format!("host {id} is {}, not draining", state.name()),
            ),
        }
    }

    fn snapshot_committed(&mut self, index: u64, record: &SnapshotRecord) -> Result<Outcome> {
        let vm = self.vm_mut(&record.vm)?;
        if record.token != vm.token {
            return reject(
                RejectCode::StaleToken,
                format!(
                    "snapshot of vm {} taken under token {}, current token is {}",
                    vm.id, record.token, vm.token
                ),
            );
        }
        if vm.host.is_none() {
            return reject(RejectCode::NotPlaced, format!("vm {} has no host", vm.id));
        }
        let expected_path = snapshot_path(&vm.id, record.token, record.seq);
        if record.path != expected_path {
            return reject(
                RejectCode::BadSnapshot,
                format!("path {:?} is not {expected_path:?}", record.path),
            );
        }
        if record.seq == 0 || record.snapshot_id == 0 {
            return reject(
                RejectCode::BadSnapshot,
                "sequence and snapshot id must be non-zero",
            );
        }
        let latest = vm.chain.last();
        if let Some(latest) = latest.filter(|l| l.token == record.token) {
            if record.seq <= latest.seq {
                return reject(
                    RejectCode::BadSnapshot,
                    format!("sequence {} does not follow {}", record.seq, latest.seq),
                );
            }
        }
        match record.kind {
            SnapshotKind::Full => {
                if record.parent_id != 0 {
                    return reject(RejectCode::BadSnapshot, "a full snapshot has no parent");
                }
                vm.chain.clear();
            }
            SnapshotKind::Diff => {
                let Some(latest) = latest else {
                    return reject(RejectCode::BadSnapshot, "a diff needs a committed parent");
                };
                if record.parent_id != latest.snapshot_id {
                    return reject(
                        RejectCode::BadSnapshot,
                        format!(
                            "diff against snapshot {:#x}, the latest committed is {:#x}",
                            record.parent_id, latest.snapshot_id
                        ),
                    );
                }
                if vm.chain.len() >= MAX_SNAPSHOT_CHAIN {
                    return reject(
                        RejectCode::BadSnapshot,
                        format!("the chain holds {MAX_SNAPSHOT_CHAIN} snapshots: take a full one"),
                    );
                }
            }
        }
        vm.chain.push(CommittedSnapshot {
            token: record.token,
            seq: record.seq,
            kind: record.kind,
            snapshot_id: record.snapshot_id,
            path: record.path.clone(),
            committed_index: index,
            taken_at_ms: record.taken_at_ms,
        });
        if record.final_for_migration {
            if let Some(migration) = &mut vm.migration {
                migration.ready = true;
            }
        }
        Ok(Outcome::Done)
    }

    fn migrate(&mut self, index: u64, id: &str, target: Option<HostId>) -> Result<Outcome> {
        let vm = self
            .vm(id)
            .ok_or_else(|| Rejection::new(RejectCode::UnknownVm, format!("no vm {id:?}")))?;
        let Some(source) = vm.host else {
            return reject(RejectCode::NotPlaced, format!("vm {id} has no host"));
        };
        if let Some(target) = target {
            match self.hosts.get(&target) {
                None => return reject(RejectCode::UnknownHost, format!("no host {target}")),
                Some(_) if target == source => {
                    return reject(
                        RejectCode::Invalid,
                        format!("vm {id} already runs on host {target}"),
                    )
                }
                Some(host) if host.state != HostState::Alive => {
                    return reject(
                        RejectCode::HostNotLive,
                        format!("host {target} is {}", host.state.name()),
                    )
                }
                Some(_) => {}
            }
        }
        let vm = self.vms.get_mut(id).expect("looked up above");
        match &mut vm.migration {
            Some(migration) => migration.target = target,
            None => {
                vm.migration = Some(Migration {
                    target,
                    requested_index: index,
                    ready: false,
                })
            }
        }
        Ok(Outcome::Done)
    }

    /// Every invariant of the state; `decode` refuses a state that breaks it.
    pub fn check(&self) -> std::result::Result<(), String> {
        self.check_state(true)
    }

    /// Every invariant, over the whole state (`deep`: also what is fixed once
    /// validated), including that the kept loads are the sums of the placed VMs.
    fn check_state(&self, deep: bool) -> std::result::Result<(), String> {
        if self.hosts.len() > MAX_HOSTS || self.vms.len() > MAX_VMS {
            return Err("more hosts or VMs than the limits".into());
        }
        let mut sums: BTreeMap<HostId, Resources> = BTreeMap::new();
        for (id, vm) in &self.vms {
            if *id != vm.id {
                return Err(format!("vm {id:?} is filed under another id"));
            }
            self.check_vm(vm, deep)?;
            if let Some(host) = vm.host {
                add_load(&mut sums, host, vm.spec.resources);
            }
        }
        if sums != self.loads {
            return Err("the kept host loads are not the sums of the placed VMs".into());
        }
        for id in self.hosts.keys() {
            self.check_host(*id)?;
        }
        Ok(())
    }

    /// Serialises the whole state (Raft snapshots); equal states give equal bytes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        codec::put_u8(out, STATE_VERSION);
        codec::put_u64(out, self.applied_index);
        codec::put_u32(out, self.hosts.len() as u32);
        for host in self.hosts.values() {
            codec::put_u64(out, host.id);
            codec::put_u64(out, host.capacity.memory_bytes);
            codec::put_u32(out, host.capacity.vcpus);
            codec::put_u8(out, host_state_tag(host.state));
            codec::put_u64(out, host.state_index);
            codec::put_bytes(out, host.reason.as_bytes());
        }
        codec::put_u32(out, self.vms.len() as u32);
        for vm in self.vms.values() {
            codec::put_bytes(out, vm.id.as_bytes());
            codec::put_u64(out, vm.spec.resources.memory_bytes);
            codec::put_u32(out, vm.spec.resources.vcpus);
            codec::put_u8(out, vm.spec.touch_percent);
            codec::put_u64(out, vm.spec.snapshot_interval_ms);
            codec::put_u32(out, vm.spec.full_every);
            command::put_optional_str(out, vm.spec.anti_affinity.as_deref());
            codec::put_u8(out, command::desired_tag(vm.desired));
            command::put_optional(out, vm.host);
            codec::put_u64(out, vm.token);
            codec::put_bytes(out, vm.waiting.as_bytes());
            codec::put_u64(out, vm.created_index);
            codec::put_u32(out, vm.chain.len() as u32);
            for snapshot in &vm.chain {
                codec::put_u64(out, snapshot.token);
                codec::put_u64(out, snapshot.seq);
                codec::put_u8(out, command::snapshot_kind_tag(snapshot.kind));
                codec::put_u64(out, snapshot.snapshot_id);
                codec::put_bytes(out, snapshot.path.as_bytes());
                codec::put_u64(out, snapshot.committed_index);
                codec::put_u64(out, snapshot.taken_at_ms);
            }
            codec::put_bool(out, vm.migration.is_some());
            let migration = vm.migration.unwrap_or(Migration {
                target: None,
                requested_index: 0,
                ready: false,
            });
            command::put_optional(out, migration.target);
            codec::put_u64(out, migration.requested_index);
            codec::put_bool(out, migration.ready);
        }
        self.kv.encode(out);
        self.dedup.encode(out, encode_outcome);
        codec::put_u32(out, self.member_addresses.len() as u32);
        for (id, address) in &self.member_addresses {
            codec::put_u64(out, *id);
            codec::put_bytes(out, address.to_string().as_bytes());
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    /// Reads what [`ClusterState::encode`] wrote, and nothing else: every field is
    /// checked, ids must ascend, no byte may trail, and the result must pass
    /// [`ClusterState::check`].
    pub fn decode(bytes: &[u8]) -> std::result::Result<ClusterState, DecodeError> {
        let r = &mut Reader::new(bytes);
        let version = r.u8("state.version")?;
        if version != STATE_VERSION && version != 1 {
            return Err(DecodeError {
                field: "state.version",
                offset: 0,
                problem: Problem::Invalid(format!(
                    "state format {version} is not supported (this node reads 1 to {STATE_VERSION})"
                )),
            });
        }
        let mut state = ClusterState::new();
        state.applied_index = r.u64("state.applied_index")?;
        let count = r.u32("state.host_count")? as usize;
        if count > MAX_HOSTS {
            return Err(r.invalid(
                "state.host_count",
                format!("{count} hosts exceed {MAX_HOSTS}"),
            ));
        }
        for _ in 0..count {
            let at = r.offset();
            let id = r.u64("host.id")?;
            if state
                .hosts
                .last_key_value()
                .is_some_and(|(last, _)| *last >= id)
            {
                return Err(invalid_at("host.id", at, "host ids must ascend"));
            }
            let capacity = Resources {
                memory_bytes: r.u64("host.memory_bytes")?,
                vcpus: r.u32("host.vcpus")?,
            };
            let at = r.offset();
            let state_tag = r.u8("host.state")?;
            let host_state = host_state_from_tag(state_tag).ok_or_else(|| {
                invalid_at("host.state", at, format!("unknown host state {state_tag}"))
            })?;
            let host = Host {
                id,
                capacity,
                state: host_state,
                state_index: r.u64("host.state_index")?,
                reason: r.str("host.reason", MAX_REASON_BYTES)?.to_string(),
            };
            state.hosts.insert(id, host);
        }
        let count = r.u32("state.vm_count")? as usize;
        if count > MAX_VMS {
            return Err(r.invalid("state.vm_count", format!("{count} VMs exceed {MAX_VMS}")));
        }
        for _ in 0..count {
            let at = r.offset();
            let id = r.str("vm.id", MAX_VM_ID_BYTES)?.to_string();
            if state
                .vms
                .last_key_value()
                .is_some_and(|(last, _)| *last >= id)
            {
                return Err(invalid_at("vm.id", at, "vm ids must ascend"));
            }
            let spec_at = r.offset();
            let resources = Resources {
                memory_bytes: r.u64("vm.memory_bytes")?,
                vcpus: r.u32("vm.vcpus")?,
            };
            let spec = VmSpec {
                resources,
                touch_percent: r.u8("vm.touch_percent")?,
                snapshot_interval_ms: r.u64("vm.snapshot_interval_ms")?,
                full_every: r.u32("vm.full_every")?,
                anti_affinity: command::get_optional_str(r, "vm.anti_affinity", MAX_GROUP_BYTES)?,
            };
            // Checked here, before any sum over VMs is taken.
            check_spec(&spec).map_err(|r| invalid_at("vm.spec", spec_at, r.message))?;
            let at = r.offset();
            let desired = match r.u8("vm.desired")? {
                1 => Desired::Running,
                2 => Desired::Stopped,
                other => {
                    return Err(invalid_at(
                        "vm.desired",
                        at,
                        format!("unknown desired state {other}"),
                    ))
                }
            };
            let host = command::get_optional(r, "vm.host")?;
            let token = r.u64("vm.token")?;
            let waiting = r.str("vm.waiting", MAX_REASON_BYTES)?.to_string();
            let created_index = r.u64("vm.created_index")?;
            let chain_len = r.u32("vm.chain_len")? as usize;
            if chain_len > MAX_SNAPSHOT_CHAIN {
                return Err(r.invalid(
                    "vm.chain_len",
                    format!("{chain_len} snapshots exceed {MAX_SNAPSHOT_CHAIN}"),
                ));
            }
            let mut chain = Vec::with_capacity(chain_len);
            for _ in 0..chain_len {
                let token = r.u64("snapshot.token")?;
                let seq = r.u64("snapshot.seq")?;
                let kind = SnapshotKind::decode(r)?;
                chain.push(CommittedSnapshot {
                    token,
                    seq,
                    kind,
                    snapshot_id: r.u64("snapshot.snapshot_id")?,
                    path: r.str("snapshot.path", MAX_SNAPSHOT_PATH_BYTES)?.to_string(),
                    committed_index: r.u64("snapshot.committed_index")?,
                    taken_at_ms: r.u64("snapshot.taken_at_ms")?,
                });
            }
            let migrating = r.bool("vm.migration")?;
            let at = r.offset();
            let migration = Migration {
                target: command::get_optional(r, "vm.migration.target")?,
                requested_index: r.u64("vm.migration.requested_index")?,
                ready: r.bool("vm.migration.ready")?,
            };
            if !migrating
                && migration
                    != (Migration {
                        target: None,
                        requested_index: 0,
                        ready: false,
                    })
            {
                return Err(invalid_at(
                    "vm.migration",
                    at,
                    "absent migration is not zero",
                ));
            }
            state.vms.insert(
                id.clone(),
                Vm {
                    id,
                    spec,
                    desired,
                    host,
                    token,
                    waiting,
                    chain,
                    migration: migrating.then_some(migration),
                    created_index,
                },
            );
        }
        for vm in state.vms.values() {
            if let Some(host) = vm.host {
                add_load(&mut state.loads, host, vm.spec.resources);
            }
        }
        state.kv = KvStore::decode(r)?;
        state.dedup = DedupWindow::decode(r, MAX_DEDUP_REQUESTS, decode_outcome)?;
        if version >= 2 {
            let count = r.u32("state.member_count")? as usize;
            if count > MAX_MEMBERS {
                return Err(r.invalid(
                    "state.member_count",
                    format!("{count} member addresses exceed {MAX_MEMBERS}"),
                ));
            }
            for _ in 0..count {
                let at = r.offset();
                let id = r.u64("member.id")?;
                if id == 0
                    || state
                        .member_addresses
                        .last_key_value()
                        .is_some_and(|(last, _)| *last >= id)
                {
                    return Err(invalid_at(
                        "member.id",
                        at,
                        "member ids must be non-zero and ascend",
                    ));
                }
                let at = r.offset();
                let text = r.str("member.address", command::MAX_ADDRESS_BYTES)?;
                let address = command::parse_address(text).ok_or_else(|| {
                    invalid_at("member.address", at, format!("{text:?} is not IP:port"))
                })?;
                state.member_addresses.insert(id, address);
            }
        }
        let end = r.offset();
        r.finish("state")?;
        state
            .check()
            .map_err(|broken| invalid_at("state", end, format!("inconsistent state: {broken}")))?;
        Ok(state)
    }
}

/// `vms/<vm-id>/<token>-<seq>`: where a snapshot lives, relative to the shared dir.
pub fn snapshot_path(vm: &str, token: u64, seq: u64) -> String {
    format!("vms/{vm}/{token}-{seq}")
}

/// Whether `load + extra` fits `capacity`.
pub fn fits(load: Resources, extra: Resources, capacity: Resources) -> bool {
    load.memory_bytes + extra.memory_bytes <= capacity.memory_bytes
        && load.vcpus + extra.vcpus <= capacity.vcpus
}

fn add_load(loads: &mut BTreeMap<HostId, Resources>, host: HostId, vm: Resources) {
    let load = loads.entry(host).or_default();
    load.memory_bytes += vm.memory_bytes;
    load.vcpus += vm.vcpus;
}

/// Removes a VM's share; a host left without VMs loses its entry (VMs take non-zero
/// resources, so a zero load means no VM).
fn sub_load(loads: &mut BTreeMap<HostId, Resources>, host: HostId, vm: Resources) {
    let load = loads.get_mut(&host).expect("a placed VM's host has a load");
    load.memory_bytes = load
        .memory_bytes
        .checked_sub(vm.memory_bytes)
        .expect("load underflow");
    load.vcpus = load.vcpus.checked_sub(vm.vcpus).expect("load underflow");
    if *load == Resources::default() {
        loads.remove(&host);
    }
}

/// The VM a command names, if any.
fn command_vm(command: &Command) -> Option<&str> {
    match command {
        Command::CreateVm { vm, .. }
        | Command::DeleteVm { vm }
        | Command::SetDesired { vm, .. }
        | Command::PlaceVm { vm, .. }
        | Command::MigrateVm { vm, .. }
        | Command::VmWaiting { vm, .. }
        | Command::CancelMigration { vm } => Some(vm),
        Command::SnapshotCommitted(record) => Some(&record.vm),
        _ => None,
    }
}

/// The host a command names, if any.
fn command_host(command: &Command) -> Option<HostId> {
    match command {
        Command::RegisterHost { host, .. }
        | Command::PlaceVm { host, .. }
        | Command::HostDead { host, .. }
        | Command::HostAlive { host }
        | Command::DrainHost { host }
        | Command::HostDrained { host } => Some(*host),
        Command::MigrateVm { target, .. } => *target,
        _ => None,
    }
}

/// Takes a VM off its host at `index`: its token moves on, so the old one is stale.
fn unplace(vm: &mut Vm, loads: &mut BTreeMap<HostId, Resources>, index: u64, reason: &str) {
    assert!(index > vm.token, "fencing tokens only grow");
    if let Some(host) = vm.host {
        sub_load(loads, host, vm.spec.resources);
    }
    vm.token = index;
    vm.host = None;
    vm.migration = None;
    vm.waiting = truncate(reason.to_string(), MAX_REASON_BYTES);
}

/// What a VM spec must be (checked on create, and on decoding a state).
fn check_spec(spec: &VmSpec) -> Result<()> {
    if let Some(group) = &spec.anti_affinity {
        check_name(group, "anti-affinity group", MAX_GROUP_BYTES)?;
    }
    let memory = spec.resources.memory_bytes;
    if !(MIN_GUEST_MEMORY_BYTES..=MAX_GUEST_MEMORY_BYTES).contains(&memory) || memory % MIB != 0 {
        return reject(
            RejectCode::Invalid,
            format!(
                "memory of {memory} bytes: must be whole MiB within {MIN_GUEST_MEMORY_BYTES}..={MAX_GUEST_MEMORY_BYTES}"
            ),
        );
    }
    let vcpus = spec.resources.vcpus;
    if vcpus == 0 || vcpus as usize > MAX_VCPUS {
        return reject(
            RejectCode::Invalid,
            format!("{vcpus} vCPUs: must be 1..={MAX_VCPUS}"),
        );
    }
    if spec.touch_percent > 100 {
        return reject(
            RejectCode::Invalid,
            format!("touch share {}%: must be 0..=100", spec.touch_percent),
        );
    }
    if spec.full_every == 0 || spec.full_every as usize > MAX_SNAPSHOT_CHAIN {
        return reject(
            RejectCode::Invalid,
            format!(
                "a full snapshot every {}: must be 1..={MAX_SNAPSHOT_CHAIN}",
                spec.full_every
            ),
        );
    }
    Ok(())
}

/// Names that become path components: 1..=max of `[A-Za-z0-9._-]`, starting with a
/// letter or digit (so never "." or "..").
fn check_name(name: &str, what: &str, max: usize) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= max
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        reject(
            RejectCode::Invalid,
            format!(
                "{what} {name:?}: 1..={max} of [A-Za-z0-9._-], starting with a letter or digit"
            ),
        )
    }
}

fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

fn invalid_at(field: &'static str, offset: usize, why: impl Into<String>) -> DecodeError {
    DecodeError {
        field,
        offset,
        problem: Problem::Invalid(why.into()),
    }
}

fn host_state_tag(state: HostState) -> u8 {
    match state {
        HostState::Alive => 1,
        HostState::Dead => 2,
        HostState::Draining => 3,
        HostState::Drained => 4,
    }
}

fn host_state_from_tag(tag: u8) -> Option<HostState> {
    Some(match tag {
        1 => HostState::Alive,
        2 => HostState::Dead,
        3 => HostState::Draining,
        4 => HostState::Drained,
        _ => return None,
    })
}

fn encode_outcome(outcome: &Outcome, out: &mut Vec<u8>) {
    match outcome {
        Outcome::Kv(kv_outcome) => {
            codec::put_u8(out, 1);
            kv::encode_outcome(kv_outcome, out);
        }
        Outcome::Done => codec::put_u8(out, 2),
        Outcome::Placed { token } => {
            codec::put_u8(out, 3);
            codec::put_u64(out, *token);
        }
        Outcome::Empty => codec::put_u8(out, 4),
        Outcome::Rejected(rejection) => {
            codec::put_u8(out, 5);
            codec::put_u8(out, rejection.code as u8);
            codec::put_bytes(out, rejection.message.as_bytes());
        }
    }
}

fn decode_outcome(r: &mut Reader<'_>) -> std::result::Result<Outcome, DecodeError> {
    let at = r.offset();
    Ok(match r.u8("outcome")? {
        1 => Outcome::Kv(kv::decode_outcome(r)?),
        2 => Outcome::Done,
        3 => Outcome::Placed {
            token: r.u64("outcome.token")?,
        },
        4 => Outcome::Empty,
        5 => {
            let at = r.offset();
            let tag = r.u8("outcome.code")?;
            let code = RejectCode::from_u8(tag)
                .ok_or_else(|| invalid_at("outcome.code", at, format!("unknown code {tag}")))?;
            Outcome::Rejected(Rejection {
                code,
                message: r.str("outcome.message", MAX_REASON_BYTES)?.to_string(),
            })
        }
        tag => {
            return Err(invalid_at(
                "outcome",
                at,
                format!("unknown outcome tag {tag}"),
            ))
        }
    })
}
