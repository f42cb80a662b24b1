//! Commands of the replicated state machine, as they are stored in Raft log entries.
//!
//! ```text
//! u8   format version (COMMAND_VERSION)
//! u8   kind
//! u64  request id (0: not deduplicated)
//! ...  the kind's fields, in the order of the `encode` match arm:
//!      u8/u32/u64 little-endian; strings and bytes as a u32 length then the bytes;
//!      Option<u64> as a bool then a u64 (0 when absent); Option<string> as a bool then
//!      the string (empty when absent)
//! ```
//!
//! | kind | command          | fields                                                    |
//! |------|------------------|-----------------------------------------------------------|
//! | 1    | kv put           | key, if_revision?, value                                  |
//! | 2    | kv delete        | key, if_revision?                                         |
//! | 10   | register host    | host u64, memory_bytes u64, vcpus u32                     |
//! | 11   | create vm        | vm, memory_bytes u64, vcpus u32, touch_percent u8,        |
//! |      |                  | snapshot_interval_ms u64, full_every u32, group?          |
//! | 12   | delete vm        | vm                                                        |
//! | 13   | set desired      | vm, desired u8 (1 running, 2 stopped)                     |
//! | 14   | place vm         | vm, host u64, expected_token u64                          |
//! | 15   | host dead        | host u64, reason                                          |
//! | 16   | host alive       | host u64                                                  |
//! | 17   | drain host       | host u64                                                  |
//! | 18   | host drained     | host u64                                                  |
//! | 19   | snapshot commit  | vm, token u64, seq u64, kind u8 (1 full, 2 diff),         |
//! |      |                  | snapshot_id u64, parent_id u64, path, final bool,         |
//! |      |                  | taken_at_ms u64                                           |
//! | 20   | migrate vm       | vm, target?                                               |
//! | 21   | vm waiting       | vm, reason                                                |
//! | 22   | cancel migration | vm                                                        |
//!
//! Decoding is strict and never panics: lengths are bounded before anything is
//! allocated, tags must be known, and no byte may trail. A committed entry that does not
//! decode is applied as a rejected no-op with the decoder's message (field and offset),
//! identically on every node. Meaning (known VM, capacity, tokens...) is checked when
//! the command is applied, not here.

use crate::codec::{self, DecodeError, Problem, Reader};
use crate::limits::{
    MAX_GROUP_BYTES, MAX_KV_KEY_BYTES, MAX_KV_VALUE_BYTES, MAX_REASON_BYTES,
    MAX_SNAPSHOT_PATH_BYTES, MAX_VM_ID_BYTES,
};

pub const COMMAND_VERSION: u8 = 1;

/// A client request's identity: a retried request carries the same id, and the state
/// machine answers it from memory instead of applying it twice. Zero means none.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RequestId(pub u64);

/// A host's id: its Raft node id.
pub type HostId = u64;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvCommand {
    Put {
        key: String,
        value: Vec<u8>,
        /// Compare-and-set: write only if the key's revision is this (0: absent).
        if_revision: Option<u64>,
    },
    Delete {
        key: String,
        if_revision: Option<u64>,
    },
}

/// Memory and vCPUs: what a host offers and what a VM takes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub memory_bytes: u64,
    pub vcpus: u32,
}

/// What a VM is and how it is looked after.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmSpec {
    pub resources: Resources,
    /// Share of guest memory the built-in guest keeps writing (0..=100).
    pub touch_percent: u8,
    /// How often the VM's host snapshots it (0: never).
    pub snapshot_interval_ms: u64,
    /// Every `full_every`-th snapshot is a full one, the others diffs (1: all full).
    pub full_every: u32,
    /// Two VMs of one group are not placed on one host while another host fits.
    pub anti_affinity: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Desired {
    Running,
    Stopped,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotKind {
    Full,
    Diff,
}

impl SnapshotKind {
    /// Reads the one-byte kind (1 full, 2 diff) that `snapshot_kind_tag` wrote.
    pub fn decode(r: &mut Reader<'_>) -> Result<SnapshotKind, DecodeError> {
        let at = r.offset();
        match r.u8("snapshot.kind")? {
            1 => Ok(SnapshotKind::Full),
            2 => Ok(SnapshotKind::Diff),
            other => Err(invalid_at(
                "snapshot.kind",
                at,
                format!("unknown snapshot kind {other}"),
            )),
        }
    }
}

/// A snapshot written, fsynced and renamed on shared storage, to be recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRecord {
    pub vm: String,
    /// The fencing token the VMM ran under when it took the snapshot.
    pub token: u64,
    /// Per-token sequence number (the `<seq>` of the path).
    pub seq: u64,
    pub kind: SnapshotKind,
    /// The id the VMM gave the snapshot (its state file records it).
    pub snapshot_id: u64,
    /// For a diff: the id of the snapshot it is a diff against (0 for a full one).
    pub parent_id: u64,
    /// `vms/<vm-id>/<token>-<seq>`, relative to the shared dir.
    pub path: String,
    /// Taken by a paused VMM as the last state before a planned move.
    pub final_for_migration: bool,
    /// The taker's wall clock, for display only: never used to decide anything.
    pub taken_at_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Kv(KvCommand),
    /// Adds a host (alive) or updates the capacity of a known one.
    RegisterHost {
        host: HostId,
        capacity: Resources,
    },
    CreateVm {
        vm: String,
        spec: VmSpec,
    },
    DeleteVm {
        vm: String,
    },
    SetDesired {
        vm: String,
        desired: Desired,
    },
    /// The leader's decision to run `vm` on `host`; rejected unless the VM's token is
    /// still `expected_token`, so a stale or repeated decision never moves a VM twice.
    PlaceVm {
        vm: String,
        host: HostId,
        expected_token: u64,
    },
    /// The leader's verdict (made with the lease rules): the host's VMs need a new host.
    HostDead {
        host: HostId,
        reason: String,
    },
    HostAlive {
        host: HostId,
    },
    DrainHost {
        host: HostId,
    },
    HostDrained {
        host: HostId,
    },
    SnapshotCommitted(SnapshotRecord),
    /// Move a running VM: its host takes a final snapshot, then the leader places it
    /// (on `target` when given and it fits).
    MigrateVm {
        vm: String,
        target: Option<HostId>,
    },
    /// The leader's note why a VM waits for a host (shown everywhere; proposed only when
    /// the reason changes).
    VmWaiting {
        vm: String,
        reason: String,
    },
    /// Calls off a migration that has not been placed yet: the VM resumes on its host.
    CancelMigration {
        vm: String,
    },
    /// Where member `id` listens for peers (`None`: forget it). Proposed before the Raft
    /// configuration change that adds the member (and after the one that removes it), so
    /// every node that applies the change knows how to reach it. Raft's own entries carry
    /// ids only.
    MemberAddress {
        id: u64,
        address: Option<std::net::SocketAddr>,
    },
}

const KIND_KV_PUT: u8 = 1;
const KIND_KV_DELETE: u8 = 2;
const KIND_REGISTER_HOST: u8 = 10;
const KIND_CREATE_VM: u8 = 11;
const KIND_DELETE_VM: u8 = 12;
const KIND_SET_DESIRED: u8 = 13;
const KIND_PLACE_VM: u8 = 14;
const KIND_HOST_DEAD: u8 = 15;
const KIND_HOST_ALIVE: u8 = 16;
const KIND_DRAIN_HOST: u8 = 17;
const KIND_HOST_DRAINED: u8 = 18;
const KIND_SNAPSHOT_COMMITTED: u8 = 19;
const KIND_MIGRATE_VM: u8 = 20;
const KIND_VM_WAITING: u8 = 21;
const KIND_CANCEL_MIGRATION: u8 = 22;
const KIND_MEMBER_ADDRESS: u8 = 30;
/// Longest peer address text accepted ("[v6]:port").
pub const MAX_ADDRESS_BYTES: usize = 64;

impl Command {
    /// The command's name, for logs and rejections.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Kv(KvCommand::Put { .. }) => "kv put",
            Command::Kv(KvCommand::Delete { .. }) => "kv delete",
            Command::RegisterHost { .. } => "register host",
            Command::CreateVm { .. } => "create vm",
            Command::DeleteVm { .. } => "delete vm",
            Command::SetDesired { .. } => "set desired",
            Command::PlaceVm { .. } => "place vm",
            Command::HostDead { .. } => "host dead",
            Command::HostAlive { .. } => "host alive",
            Command::DrainHost { .. } => "drain host",
            Command::HostDrained { .. } => "host drained",
            Command::SnapshotCommitted(_) => "snapshot committed",
            Command::MigrateVm { .. } => "migrate vm",
            Command::VmWaiting { .. } => "vm waiting",
            Command::CancelMigration { .. } => "cancel migration",
            Command::MemberAddress { .. } => "member address",
        }
    }

    pub fn encode(&self, request: RequestId, out: &mut Vec<u8>) {
        codec::put_u8(out, COMMAND_VERSION);
        let header = |out: &mut Vec<u8>, kind: u8| {
            codec::put_u8(out, kind);
            codec::put_u64(out, request.0);
        };
        match self {
            Command::Kv(KvCommand::Put {
                key,
                value,
                if_revision,
            }) => {
                header(out, KIND_KV_PUT);
                codec::put_bytes(out, key.as_bytes());
                put_optional(out, *if_revision);
                codec::put_bytes(out, value);
            }
            Command::Kv(KvCommand::Delete { key, if_revision }) => {
                header(out, KIND_KV_DELETE);
                codec::put_bytes(out, key.as_bytes());
                put_optional(out, *if_revision);
            }
            Command::RegisterHost { host, capacity } => {
                header(out, KIND_REGISTER_HOST);
                codec::put_u64(out, *host);
                codec::put_u64(out, capacity.memory_bytes);
                codec::put_u32(out, capacity.vcpus);
            }
            Command::CreateVm { vm, spec } => {
                header(out, KIND_CREATE_VM);
                codec::put_bytes(out, vm.as_bytes());
                codec::put_u64(out, spec.resources.memory_bytes);
                codec::put_u32(out, spec.resources.vcpus);
                codec::put_u8(out, spec.touch_percent);
                codec::put_u64(out, spec.snapshot_interval_ms);
                codec::put_u32(out, spec.full_every);
                put_optional_str(out, spec.anti_affinity.as_deref());
            }
            Command::DeleteVm { vm } => {
                header(out, KIND_DELETE_VM);
                codec::put_bytes(out, vm.as_bytes());
            }
            Command::SetDesired { vm, desired } => {
                header(out, KIND_SET_DESIRED);
                codec::put_bytes(out, vm.as_bytes());
                codec::put_u8(out, desired_tag(*desired));
            }
            Command::PlaceVm {
                vm,
                host,
                expected_token,
            } => {
                header(out, KIND_PLACE_VM);
                codec::put_bytes(out, vm.as_bytes());
                codec::put_u64(out, *host);
                codec::put_u64(out, *expected_token);
            }
            Command::HostDead { host, reason } => {
                header(out, KIND_HOST_DEAD);
                codec::put_u64(out, *host);
                codec::put_bytes(out, reason.as_bytes());
            }
            Command::HostAlive { host } => {
                header(out, KIND_HOST_ALIVE);
                codec::put_u64(out, *host);
            }
            Command::DrainHost { host } => {
                header(out, KIND_DRAIN_HOST);
                codec::put_u64(out, *host);
            }
            Command::HostDrained { host } => {
                header(out, KIND_HOST_DRAINED);
                codec::put_u64(out, *host);
            }
            Command::SnapshotCommitted(record) => {
                header(out, KIND_SNAPSHOT_COMMITTED);
                codec::put_bytes(out, record.vm.as_bytes());
                codec::put_u64(out, record.token);
                codec::put_u64(out, record.seq);
                codec::put_u8(out, snapshot_kind_tag(record.kind));
                codec::put_u64(out, record.snapshot_id);
                codec::put_u64(out, record.parent_id);
                codec::put_bytes(out, record.path.as_bytes());
                codec::put_bool(out, record.final_for_migration);
                codec::put_u64(out, record.taken_at_ms);
            }
            Command::MigrateVm { vm, target } => {
                header(out, KIND_MIGRATE_VM);
                codec::put_bytes(out, vm.as_bytes());
                put_optional(out, *target);
            }
            Command::VmWaiting { vm, reason } => {
                header(out, KIND_VM_WAITING);
                codec::put_bytes(out, vm.as_bytes());
                codec::put_bytes(out, reason.as_bytes());
            }
            Command::CancelMigration { vm } => {
                header(out, KIND_CANCEL_MIGRATION);
                codec::put_bytes(out, vm.as_bytes());
            }
            Command::MemberAddress { id, address } => {
                header(out, KIND_MEMBER_ADDRESS);
                codec::put_u64(out, *id);
                put_optional_str(out, address.map(|a| a.to_string()).as_deref());
            }
        }
    }

    /// Encodes into a fresh buffer.
    pub fn to_bytes(&self, request: RequestId) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(request, &mut out);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<(RequestId, Command), DecodeError> {
        let mut reader = Reader::new(bytes);
        let version = reader.u8("command.version")?;
        if version != COMMAND_VERSION {
            return Err(DecodeError {
                field: "command.version",
                offset: 0,
                problem: Problem::Invalid(format!(
                    "command format {version} is not supported (this node reads {COMMAND_VERSION})"
                )),
            });
        }
        let kind_at = reader.offset();
        let kind = reader.u8("command.kind")?;
        let request = RequestId(reader.u64("command.request_id")?);
        let r = &mut reader;
        let command = match kind {
            KIND_KV_PUT => {
                let key = r.str("kv_put.key", MAX_KV_KEY_BYTES)?.to_string();
                let if_revision = get_optional(r, "kv_put.if_revision")?;
                let value = r.bytes("kv_put.value", MAX_KV_VALUE_BYTES)?.to_vec();
                Command::Kv(KvCommand::Put {
                    key,
                    value,
                    if_revision,
                })
            }
            KIND_KV_DELETE => {
                let key = r.str("kv_delete.key", MAX_KV_KEY_BYTES)?.to_string();
                let if_revision = get_optional(r, "kv_delete.if_revision")?;
                Command::Kv(KvCommand::Delete { key, if_revision })
            }
            KIND_REGISTER_HOST => Command::RegisterHost {
                host: r.u64("register_host.host")?,
                capacity: Resources {
                    memory_bytes: r.u64("register_host.memory_bytes")?,
                    vcpus: r.u32("register_host.vcpus")?,
                },
            },
            KIND_CREATE_VM => {
                let vm = vm_id(r, "create_vm.vm")?;
                let resources = Resources {
                    memory_bytes: r.u64("create_vm.memory_bytes")?,
                    vcpus: r.u32("create_vm.vcpus")?,
                };
                Command::CreateVm {
                    vm,
                    spec: VmSpec {
                        resources,
                        touch_percent: r.u8("create_vm.touch_percent")?,
                        snapshot_interval_ms: r.u64("create_vm.snapshot_interval_ms")?,
                        full_every: r.u32("create_vm.full_every")?,
                        anti_affinity: get_optional_str(
                            r,
                            "create_vm.anti_affinity",
                            MAX_GROUP_BYTES,
                        )?,
                    },
                }
            }
            KIND_DELETE_VM => Command::DeleteVm {
                vm: vm_id(r, "delete_vm.vm")?,
            },
            KIND_SET_DESIRED => {
                let vm = vm_id(r, "set_desired.vm")?;
                let at = r.offset();
                let desired = match r.u8("set_desired.desired")? {
                    1 => Desired::Running,
                    2 => Desired::Stopped,
                    other => {
                        return Err(invalid_at(
                            "set_desired.desired",
                            at,
                            format!("unknown desired state {other}"),
                        ))
                    }
                };
                Command::SetDesired { vm, desired }
            }
            KIND_PLACE_VM => Command::PlaceVm {
                vm: vm_id(r, "place_vm.vm")?,
                host: r.u64("place_vm.host")?,
                expected_token: r.u64("place_vm.expected_token")?,
            },
            KIND_HOST_DEAD => Command::HostDead {
                host: r.u64("host_dead.host")?,
                reason: r.str("host_dead.reason", MAX_REASON_BYTES)?.to_string(),
            },
            KIND_HOST_ALIVE => Command::HostAlive {
                host: r.u64("host_alive.host")?,
            },
            KIND_DRAIN_HOST => Command::DrainHost {
                host: r.u64("drain_host.host")?,
            },
            KIND_HOST_DRAINED => Command::HostDrained {
                host: r.u64("host_drained.host")?,
            },
            KIND_SNAPSHOT_COMMITTED => {
                let vm = vm_id(r, "snapshot.vm")?;
                let token = r.u64("snapshot.token")?;
                let seq = r.u64("snapshot.seq")?;
                let kind = SnapshotKind::decode(r)?;
                Command::SnapshotCommitted(SnapshotRecord {
                    vm,
                    token,
                    seq,
                    kind,
                    snapshot_id: r.u64("snapshot.snapshot_id")?,
                    parent_id: r.u64("snapshot.parent_id")?,
                    path: r.str("snapshot.path", MAX_SNAPSHOT_PATH_BYTES)?.to_string(),
                    final_for_migration: r.bool("snapshot.final_for_migration")?,
                    taken_at_ms: r.u64("snapshot.taken_at_ms")?,
                })
            }
            KIND_MIGRATE_VM => Command::MigrateVm {
                vm: vm_id(r, "migrate_vm.vm")?,
                target: get_optional(r, "migrate_vm.target")?,
            },
            KIND_VM_WAITING => Command::VmWaiting {
                vm: vm_id(r, "vm_waiting.vm")?,
                reason: r.str("vm_waiting.reason", MAX_REASON_BYTES)?.to_string(),
            },
            KIND_CANCEL_MIGRATION => Command::CancelMigration {
                vm: vm_id(r, "cancel_migration.vm")?,
            },
            KIND_MEMBER_ADDRESS => {
                let id_at = r.offset();
                let id = r.u64("member_address.id")?;
                let at = r.offset();
                let address =
                    match get_optional_str(r, "member_address.address", MAX_ADDRESS_BYTES)? {
                        None => None,
                        Some(text) => Some(parse_address(&text).ok_or_else(|| {
                            invalid_at(
                                "member_address.address",
                                at,
                                format!("{text:?} is not IP:port"),
                            )
                        })?),
                    };
                if id == 0 {
                    return Err(invalid_at(
                        "member_address.id",
                        id_at,
                        "node id 0 is reserved".into(),
                    ));
                }
                Command::MemberAddress { id, address }
            }
            other => {
                return Err(DecodeError {
                    field: "command.kind",
                    offset: kind_at,
                    problem: Problem::Invalid(format!("unknown command kind {other}")),
                })
            }
        };
        reader.finish("command")?;
        Ok((request, command))
    }
}

pub(crate) fn desired_tag(desired: Desired) -> u8 {
    match desired {
        Desired::Running => 1,
        Desired::Stopped => 2,
    }
}

pub(crate) fn snapshot_kind_tag(kind: SnapshotKind) -> u8 {
    match kind {
        SnapshotKind::Full => 1,
        SnapshotKind::Diff => 2,
    }
}

fn invalid_at(field: &'static str, offset: usize, why: String) -> DecodeError {
    DecodeError {
        field,
        offset,
        problem: Problem::Invalid(why),
    }
}

fn vm_id(reader: &mut Reader<'_>, field: &'static str) -> Result<String, DecodeError> {
    Ok(reader.str(field, MAX_VM_ID_BYTES)?.to_string())
}

/// A peer address exactly as `SocketAddr` prints it (one encoding per address: "07004"
/// is refused); port 0 is no address.
pub(crate) fn parse_address(text: &str) -> Option<std::net::SocketAddr> {
    text.parse::<std::net::SocketAddr>()
        .ok()
        .filter(|a| a.port() != 0 && a.to_string() == text)
}

pub(crate) fn put_optional(out: &mut Vec<u8>, value: Option<u64>) {
    codec::put_bool(out, value.is_some());
    codec::put_u64(out, value.unwrap_or(0));
}

pub(crate) fn get_optional(
    reader: &mut Reader<'_>,
    field: &'static str,
) -> Result<Option<u64>, DecodeError> {
    let present = reader.bool(field)?;
    let at = reader.offset();
    let value = reader.u64(field)?;
    if !present && value != 0 {
        // One encoding per value: an absent option carries zero.
        return Err(invalid_at(field, at, "absent value is not zero".into()));
    }
    Ok(present.then_some(value))
}

pub(crate) fn put_optional_str(out: &mut Vec<u8>, value: Option<&str>) {
    codec::put_bool(out, value.is_some());
    codec::put_bytes(out, value.unwrap_or("").as_bytes());
}

pub(crate) fn get_optional_str(
    reader: &mut Reader<'_>,
    field: &'static str,
    max: usize,
) -> Result<Option<String>, DecodeError> {
    let present = reader.bool(field)?;
    let at = reader.offset();
    let value = reader.str(field, max)?;
    if !present && !value.is_empty() {
        return Err(invalid_at(field, at, "absent value is not empty".into()));
    }
    Ok(present.then(|| value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One command of every kind.
    pub(crate) fn every_kind() -> Vec<Command> {
        let spec = VmSpec {
            resources: Resources {
                memory_bytes: 256 << 20,
                vcpus: 2,
            },
            touch_percent: 30,
            snapshot_interval_ms: 500,
            full_every: 4,
            anti_affinity: Some("db".into()),
        };
        vec![
            Command::Kv(KvCommand::Put {
                key: "vm/7".into(),
                value: b"{}".to_vec(),
                if_revision: Some(0),
            }),
            Command::Kv(KvCommand::Delete {
                key: "x".into(),
                if_revision: None,
            }),
            Command::RegisterHost {
                host: 3,
                capacity: Resources {
                    memory_bytes: 1 << 34,
                    vcpus: 16,
                },
            },
            Command::CreateVm {
                vm: "web-1".into(),
                spec: spec.clone(),
            },
            Command::CreateVm {
                vm: "web-2".into(),
                spec: VmSpec {
                    anti_affinity: None,
                    ..spec
                },
            },
            Command::DeleteVm { vm: "web-1".into() },
            Command::SetDesired {
                vm: "a".into(),
                desired: Desired::Running,
            },
            Command::SetDesired {
                vm: "a".into(),
                desired: Desired::Stopped,
            },
            Command::PlaceVm {
                vm: "a".into(),
                host: 2,
                expected_token: 41,
            },
            Command::HostDead {
                host: 2,
                reason: "no ack for 505 ms".into(),
            },
            Command::HostAlive { host: 2 },
            Command::DrainHost { host: 2 },
            Command::HostDrained { host: 2 },
            Command::SnapshotCommitted(SnapshotRecord {
                vm: "a".into(),
                token: 41,
                seq: 3,
                kind: SnapshotKind::Diff,
                snapshot_id: 0xdead,
                parent_id: 0xbeef,
                path: "vms/a/41-3".into(),
                final_for_migration: true,
                taken_at_ms: 1_700_000_000_000,
            }),
            Command::MigrateVm {
                vm: "a".into(),
                target: Some(5),
            },
            Command::MigrateVm {
                vm: "a".into(),
                target: None,
            },
            Command::VmWaiting {
                vm: "a".into(),
                reason: "no room".into(),
            },
            Command::CancelMigration { vm: "a".into() },
            Command::MemberAddress {
                id: 4,
                address: Some("127.0.0.1:7004".parse().unwrap()),
            },
            Command::MemberAddress {
                id: 5,
                address: Some("[::1]:7005".parse().unwrap()),
            },
            Command::MemberAddress {
                id: 4,
                address: None,
            },
        ]
    }

    #[test]
    fn round_trips() {
        let commands = every_kind();
        for (i, command) in commands.iter().enumerate() {
            let mut bytes = Vec::new();
            command.encode(RequestId(i as u64 + 1), &mut bytes);
            assert_eq!(
                Command::decode(&bytes).unwrap(),
                (RequestId(i as u64 + 1), command.clone())
            );
            // Deterministic: the same command gives the same bytes.
            assert_eq!(command.to_bytes(RequestId(i as u64 + 1)), bytes);
            // Bit flips never panic; what still decodes re-encodes to the same bytes
            // (one encoding per command).
            for at in 0..bytes.len() {
                let mut flipped = bytes.clone();
                flipped[at] ^= 0x5a;
                if let Ok((request, decoded)) = Command::decode(&flipped) {
                    assert_eq!(decoded.to_bytes(request), flipped, "{}", command.name());
                }
            }
            for cut in 0..bytes.len() {
                assert!(Command::decode(&bytes[..cut]).is_err(), "cut {cut}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(Command::decode(&longer)
                .unwrap_err()
                .to_string()
                .contains("trailing"));
        }
    }

    #[test]
    fn names_what_is_wrong() {
        let error = Command::decode(&[9]).unwrap_err();
        assert!(error.to_string().contains("command format 9"), "{error}");
        let error = Command::decode(&[COMMAND_VERSION, 77, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "command.kind at byte 1: unknown command kind 77"
        );
        let mut huge_key = vec![COMMAND_VERSION, KIND_KV_PUT];
        huge_key.extend_from_slice(&[0; 8]);
        huge_key.extend_from_slice(&u32::MAX.to_le_bytes());
        let error = Command::decode(&huge_key).unwrap_err();
        assert!(error.to_string().contains("exceeds the limit"), "{error}");
        // Unknown tags inside a command name their field and offset.
        let mut bytes = Command::SetDesired {
            vm: "a".into(),
            desired: Desired::Running,
        }
        .to_bytes(RequestId(0));
        *bytes.last_mut().unwrap() = 9;
        assert_eq!(
            Command::decode(&bytes).unwrap_err().to_string(),
            "set_desired.desired at byte 15: unknown desired state 9"
        );
        // An absent option must carry zero, so that each command has one encoding.
        let mut bytes = Command::MigrateVm {
            vm: "a".into(),
            target: None,
        }
        .to_bytes(RequestId(0));
        *bytes.last_mut().unwrap() = 1;
        assert_eq!(
            Command::decode(&bytes).unwrap_err().to_string(),
            "migrate_vm.target at byte 16: absent value is not zero"
        );
        // Member addresses: IP:port in its one printed form, and a non-zero id.
        for (text, id) in [("nowhere", 4), ("127.0.0.1:07004", 4), ("127.0.0.1:0", 4)] {
            let mut bytes = vec![COMMAND_VERSION, KIND_MEMBER_ADDRESS];
            bytes.extend_from_slice(&[0; 8]);
            bytes.extend_from_slice(&u64::to_le_bytes(id));
            let at = bytes.len();
            put_optional_str(&mut bytes, Some(text));
            assert_eq!(
                Command::decode(&bytes).unwrap_err().to_string(),
                format!("member_address.address at byte {at}: {text:?} is not IP:port")
            );
        }
        let bytes = Command::MemberAddress {
            id: 0,
            address: None,
        }
        .to_bytes(RequestId(0));
        assert_eq!(
            Command::decode(&bytes).unwrap_err().to_string(),
            "member_address.id at byte 10: node id 0 is reserved"
        );
    }
}
