//! The simulator's replicated state machine: a few registers (key -> value) with put,
//! get and compare-and-set, plus what the checkers need to see what was applied.

use crate::raft::{Entry, EntryKind, Index, ReadState, StateMachine, Term};

/// Keys are small integers; values are u64, 0 meaning "absent".
pub const KEYS: usize = 5;
/// Keys whose history is checked for linearizability. The last key takes the writes
/// made after the history reached its size bound (they keep the liveness check fed
/// without entering the checked history).
pub const CHECKED_KEYS: usize = KEYS - 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Put { key: u8, value: u64 },
    Get { key: u8 },
    Cas { key: u8, expected: u64, new: u64 },
}

impl Op {
    pub fn key(&self) -> u8 {
        match *self {
            Op::Put { key, .. } | Op::Get { key } | Op::Cas { key, .. } => key,
        }
    }
    /// Encodes a write for the log: tag, key, two u64, client id.
    pub fn encode(&self, client: u32, out: &mut Vec<u8>) {
        let (tag, key, a, b) = match *self {
            Op::Put { key, value } => (1u8, key, value, 0),
            Op::Get { key } => (2, key, 0, 0),
            Op::Cas { key, expected, new } => (3, key, expected, new),
        };
        out.push(tag);
        out.push(key);
        out.extend_from_slice(&a.to_le_bytes());
        out.extend_from_slice(&b.to_le_bytes());
        out.extend_from_slice(&client.to_le_bytes());
    }
    pub fn decode(b: &[u8]) -> Option<Op> {
        if b.len() != 22 {
            return None;
        }
        let key = b[1];
        if key as usize >= KEYS {
            return None;
        }
        let a = u64::from_le_bytes(b[2..10].try_into().ok()?);
        let c = u64::from_le_bytes(b[10..18].try_into().ok()?);
        match b[0] {
            1 => Some(Op::Put { key, value: a }),
            2 => Some(Op::Get { key }),
            3 => Some(Op::Cas {
                key,
                expected: a,
                new: c,
            }),
            _ => None,
        }
    }
}

/// The result of an applied or read operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpResult {
    Ok,
    Value(u64),
    Cas(bool),
}

/// What one node applied in the current turn, drained by the simulator.
#[derive(Clone, Copy, Debug)]
pub struct Applied {
    pub index: Index,
    pub term: Term,
    pub hash: u64,
    pub result: Option<OpResult>,
}

pub fn fnv(data: &[u8], kind: EntryKind) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ kind.to_u8() as u64;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

#[derive(Default)]
pub struct KvState {
    pub values: [u64; KEYS],
    pub last_applied: Index,
    pub applied: Vec<Applied>,
    pub reads_ready: Vec<ReadState>,
    pub reads_failed: Vec<u64>,
    /// VM mode: the replicated cluster state (entries that are not KV ops are cluster
    /// commands). Snapshots carry it after the KV part.
    pub cluster: Option<Box<crate::cluster::state::ClusterState>>,
    /// A cluster command was applied since the host last looked.
    pub cluster_changed: bool,
}

impl KvState {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.last_applied.to_le_bytes());
        for v in self.values {
            out.extend_from_slice(&v.to_le_bytes());
        }
        if let Some(c) = &self.cluster {
            c.encode(out);
        }
    }
}

impl StateMachine for KvState {
    fn apply(&mut self, entry: &Entry) {
        assert_eq!(entry.index, self.last_applied + 1, "apply out of order");
        self.last_applied = entry.index;
        let mut result = None;
        if entry.kind == EntryKind::Normal {
            if let Some(op) = Op::decode(&entry.data) {
                let k = op.key() as usize;
                result = Some(match op {
                    Op::Put { value, .. } => {
                        self.values[k] = value;
                        OpResult::Ok
                    }
                    Op::Get { .. } => OpResult::Value(self.values[k]),
                    Op::Cas { expected, new, .. } => {
                        let ok = self.values[k] == expected;
                        if ok {
                            self.values[k] = new;
                        }
                        OpResult::Cas(ok)
                    }
                });
            } else if let Some(c) = self.cluster.as_mut() {
                c.apply(entry.index, &entry.data);
                self.cluster_changed = true;
            }
        }
        self.applied.push(Applied {
            index: entry.index,
            term: entry.term,
            hash: fnv(&entry.data, entry.kind),
            result,
        });
    }
    fn restore(&mut self, state: &[u8]) {
        let kv_len = 8 + 8 * KEYS;
        assert!(state.len() >= kv_len, "kv snapshot size");
        if let Some(c) = self.cluster.as_mut() {
            **c = crate::cluster::state::ClusterState::decode(&state[kv_len..])
                .expect("the sim's own snapshot decodes");
            self.cluster_changed = true;
        } else {
            assert_eq!(state.len(), kv_len, "kv snapshot size");
        }
        self.last_applied = u64::from_le_bytes(state[0..8].try_into().unwrap());
        for k in 0..KEYS {
            let off = 8 + 8 * k;
            self.values[k] = u64::from_le_bytes(state[off..off + 8].try_into().unwrap());
        }
    }
    fn read_ready(&mut self, read: ReadState) {
        self.reads_ready.push(read);
    }
    fn read_failed(&mut self, id: u64) {
        self.reads_failed.push(id);
    }
}
