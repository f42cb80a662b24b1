//! Plain data types of the Raft core: ids, entries, hard state, membership, messages.
//!
//! Messages are small `Copy` structs. Entry payloads and snapshot chunks are not inside
//! the message: the sender's driver reads them from the core (`Raft::payload`) while
//! encoding, and the receiver passes them next to the message (`Payload`). A wire codec
//! can therefore encode and decode without allocating.

use std::collections::VecDeque;

/// A member of the cluster. Zero is never a valid id.
pub type NodeId = u64;
/// A Raft term.
pub type Term = u64;
/// A log index. Index 0 is the empty prefix (term 0).
pub type Index = u64;
/// Monotonic time in nanoseconds, supplied by the caller (the core never reads a clock).
pub type Nanos = u64;

/// What a log entry carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A command for the state machine.
    Normal,
    /// The empty entry a new leader appends at the start of its term.
    Noop,
    /// A membership change; `data` is an encoded [`Membership`].
    Config,
}

impl EntryKind {
    pub fn to_u8(self) -> u8 {
        match self {
            EntryKind::Normal => 0,
            EntryKind::Noop => 1,
            EntryKind::Config => 2,
        }
    }
    pub fn from_u8(v: u8) -> Option<EntryKind> {
        match v {
            0 => Some(EntryKind::Normal),
            1 => Some(EntryKind::Noop),
            2 => Some(EntryKind::Config),
            _ => None,
        }
    }
}

/// One log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub term: Term,
    pub index: Index,
    pub kind: EntryKind,
    pub data: Vec<u8>,
}

/// The state that must be durable before a vote or an acknowledgement leaves the node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HardState {
    pub term: Term,
    /// The candidate voted for in `term`, 0 if none.
    pub vote: NodeId,
    /// A commit index known to this node (a hint on restart; may lag).
    pub commit: Index,
}

/// A fixed-capacity set of node ids, `Copy`, no allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdList<const N: usize> {
    ids: [NodeId; N],
    len: usize,
}

impl<const N: usize> Default for IdList<N> {
    fn default() -> Self {
        IdList {
            ids: [0; N],
            len: 0,
        }
    }
}

impl<const N: usize> IdList<N> {
    pub fn from_slice(ids: &[NodeId]) -> Option<Self> {
        let mut list = IdList::default();
        for &id in ids {
            if !list.insert(id) {
                return None;
            }
        }
        Some(list)
    }
    pub fn as_slice(&self) -> &[NodeId] {
        &self.ids[..self.len]
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn contains(&self, id: NodeId) -> bool {
        self.as_slice().contains(&id)
    }
    /// Adds `id`; false if it is 0, already present, or the list is full.
    pub fn insert(&mut self, id: NodeId) -> bool {
        if id == 0 || self.contains(id) || self.len == N {
            return false;
        }
        self.ids[self.len] = id;
        self.len += 1;
        true
    }
    /// Removes `id`; false if it was absent.
    pub fn remove(&mut self, id: NodeId) -> bool {
        match self.as_slice().iter().position(|&x| x == id) {
            Some(pos) => {
                self.ids.copy_within(pos + 1..self.len, pos);
                self.len -= 1;
                true
            }
            None => false,
        }
    }
}

/// Voters and non-voting observers.
///
/// Node ids are never reused for a node that lost its disk: a stale configuration
/// elsewhere may still count that id's votes, and a wiped node does not remember the
/// votes it gave. A replacement host gets a new id.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Membership {
    pub voters: IdList<{ crate::limits::MAX_VOTERS }>,
    pub observers: IdList<{ crate::limits::MAX_OBSERVERS }>,
}

/// Bytes of an encoded membership: two counts, then the ids.
pub const MEMBERSHIP_MAX_BYTES: usize =
    2 + 8 * (crate::limits::MAX_VOTERS + crate::limits::MAX_OBSERVERS);

impl Membership {
    pub fn new(voters: &[NodeId], observers: &[NodeId]) -> Option<Membership> {
        let m = Membership {
            voters: IdList::from_slice(voters)?,
            observers: IdList::from_slice(observers)?,
        };
        if voters.iter().any(|v| observers.contains(v)) {
            return None;
        }
        Some(m)
    }
    pub fn is_voter(&self, id: NodeId) -> bool {
        self.voters.contains(id)
    }
    pub fn is_member(&self, id: NodeId) -> bool {
        self.voters.contains(id) || self.observers.contains(id)
    }
    /// Votes needed for a majority of the voters.
    pub fn quorum(&self) -> usize {
        self.voters.len() / 2 + 1
    }
    /// Appends the encoding to `out` (no allocation when `out` has capacity).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.voters.len() as u8);
        out.push(self.observers.len() as u8);
        for id in self
            .voters
            .as_slice()
            .iter()
            .chain(self.observers.as_slice())
        {
            out.extend_from_slice(&id.to_le_bytes());
        }
    }
    /// Decodes a membership; the error names what was wrong.
    pub fn decode(bytes: &[u8]) -> Result<(Membership, usize), &'static str> {
        if bytes.len() < 2 {
            return Err("membership: shorter than its two counts");
        }
        let (nv, no) = (bytes[0] as usize, bytes[1] as usize);
        if nv > crate::limits::MAX_VOTERS || no > crate::limits::MAX_OBSERVERS {
            return Err("membership: count above limit");
        }
        let len = 2 + 8 * (nv + no);
        if bytes.len() < len {
            return Err("membership: truncated id list");
        }
        let mut m = Membership::default();
        for i in 0..nv + no {
            let off = 2 + 8 * i;
            let id = u64::from_le_bytes(bytes[off..off + 8].try_into().expect("8 bytes"));
            let ok = if i < nv {
                m.voters.insert(id)
            } else {
                !m.voters.contains(id) && m.observers.insert(id)
            };
            if !ok {
                return Err("membership: zero or duplicate id");
            }
        }
        Ok((m, len))
    }
}

/// Metadata of a snapshot: the last index and term it covers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapshotMeta {
    pub index: Index,
    pub term: Term,
}

/// A message between two nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message {
    pub from: NodeId,
    pub to: NodeId,
    pub term: Term,
    pub body: Body,
}

/// The kinds of message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Body {
    /// A pre-election probe for `term` (which the sender has not entered).
    PreVote {
        last_index: Index,
        last_term: Term,
    },
    PreVoteResp {
        granted: bool,
    },
    /// A vote request; `transfer` marks an election started by TimeoutNow, which
    /// followers honour even while they hear from a live leader.
    Vote {
        last_index: Index,
        last_term: Term,
        transfer: bool,
    },
    VoteResp {
        granted: bool,
    },
    /// Entries `prev_index + 1 ..= prev_index + count` (payload sent alongside).
    Append {
        prev_index: Index,
        prev_term: Term,
        commit: Index,
        count: u32,
        read_seq: u64,
        /// The highest round (`read_seq`) of this leader's appends that the receiver
        /// acknowledged with success and whose acknowledgement this leader received
        /// while it held its leader lease: the receiver's host lease may run from its
        /// receipt of that round (see `Raft::host_lease_anchor`).
        lease_seq: u64,
        /// The incarnation (`AppendResp::incarnation`) of the receiver's process that
        /// sent that acknowledgement: a confirmation counts only for that process (a
        /// restarted one may have received another copy of the same round later).
        lease_incarnation: u64,
        /// The leader's last log index when it sent this append: the receiver may use
        /// the lease this append confirms only once it applied that far, so that every
        /// verdict the leader had proposed by then (a `HostDead` for the receiver)
        /// reaches it first.
        lease_index: Index,
    },
    /// On success `index` is the highest index known to match; on rejection it is
    /// the rejected `prev_index` and `hint_*` point the leader at the conflict.
    AppendResp {
        success: bool,
        index: Index,
        hint_index: Index,
        hint_term: Term,
        read_seq: u64,
        /// The sender's `Config::incarnation`: which process of the node answered.
        incarnation: u64,
    },
    /// Bytes `offset .. offset + len` of the snapshot at `index` (payload alongside).
    Snapshot {
        index: Index,
        term: Term,
        total: u64,
        offset: u64,
        len: u32,
    },
    /// The follower has the snapshot at `index` up to `next_offset`.
    SnapshotResp {
        index: Index,
        next_offset: u64,
    },
    /// Leadership transfer: start an election now.
    TimeoutNow,
    /// A follower asks the leader to confirm the linearizable read `id`.
    ReadIndex {
        id: u64,
    },
    /// The leader's answer: serve read `id` once `index` is applied; `ok == false` if
    /// the leader cannot serve reads now.
    ReadIndexResp {
        id: u64,
        index: Index,
        ok: bool,
    },
}

impl Body {
    pub fn name(&self) -> &'static str {
        match self {
            Body::PreVote { .. } => "PreVote",
            Body::PreVoteResp { .. } => "PreVoteResp",
            Body::Vote { .. } => "Vote",
            Body::VoteResp { .. } => "VoteResp",
            Body::Append { .. } => "Append",
            Body::AppendResp { .. } => "AppendResp",
            Body::Snapshot { .. } => "Snapshot",
            Body::SnapshotResp { .. } => "SnapshotResp",
            Body::TimeoutNow => "TimeoutNow",
            Body::ReadIndex { .. } => "ReadIndex",
            Body::ReadIndexResp { .. } => "ReadIndexResp",
        }
    }
}

/// A read-only view of consecutive entries (the two halves of a ring buffer).
#[derive(Clone, Copy, Debug)]
pub struct EntriesView<'a> {
    pub first: &'a [Entry],
    pub second: &'a [Entry],
}

impl<'a> EntriesView<'a> {
    pub const EMPTY: EntriesView<'static> = EntriesView {
        first: &[],
        second: &[],
    };
    pub fn from_slice(entries: &'a [Entry]) -> Self {
        EntriesView {
            first: entries,
            second: &[],
        }
    }
    pub fn from_deque(deque: &'a VecDeque<Entry>, start: usize, end: usize) -> Self {
        let (a, b) = deque.as_slices();
        if end <= a.len() {
            EntriesView {
                first: &a[start..end],
                second: &[],
            }
        } else if start >= a.len() {
            EntriesView {
                first: &b[start - a.len()..end - a.len()],
                second: &[],
            }
        } else {
            EntriesView {
                first: &a[start..],
                second: &b[..end - a.len()],
            }
        }
    }
    pub fn len(&self) -> usize {
        self.first.len() + self.second.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn get(&self, i: usize) -> &'a Entry {
        if i < self.first.len() {
            &self.first[i]
        } else {
            &self.second[i - self.first.len()]
        }
    }
    pub fn iter(&self) -> impl Iterator<Item = &'a Entry> {
        self.first.iter().chain(self.second.iter())
    }
}

/// What travels next to a message: entries of an Append or bytes of a Snapshot chunk.
#[derive(Clone, Copy, Debug)]
pub enum Payload<'a> {
    None,
    Entries(EntriesView<'a>),
    Chunk(&'a [u8]),
}

/// A linearizable read that may be served once the state machine has applied `index`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadState {
    pub id: u64,
    pub index: Index,
}

/// The role of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Follower,
    PreCandidate,
    Candidate,
    Leader,
}

/// One membership change (the Raft thesis' single-server changes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfChange {
    AddObserver(NodeId),
    Promote(NodeId),
    Demote(NodeId),
    Remove(NodeId),
    /// Promote the observer `new`, then (after that commits) remove the voter `old`.
    Replace {
        old: NodeId,
        new: NodeId,
    },
}

/// Why a request to the core was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RaftError {
    /// Only the leader accepts this; the hint names the leader if known (0 if not).
    NotLeader { leader: NodeId },
    /// A leadership transfer is in progress.
    Transferring,
    /// The in-memory log is full; retry after compaction.
    LogFull,
    /// The payload exceeds `MAX_ENTRY_BYTES`.
    TooLarge,
    /// The previous membership change has not committed yet.
    ChangePending,
    /// The leader has not yet committed an entry of its term.
    NotReady,
    /// The membership change is not valid (unknown node, limits, last voter...).
    InvalidChange,
    /// Too many reads are waiting.
    TooManyReads,
}
