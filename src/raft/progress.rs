//! The leader's view of one follower: what matches, what to send next, what is in flight.

use super::types::{Index, Nanos, NodeId};
use crate::limits::MAX_INFLIGHT_APPENDS;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressState {
    /// Unknown match: one append at a time, resent every heartbeat.
    Probe,
    /// Known match: appends are pipelined up to the in-flight bounds.
    Replicate,
    /// The follower needs the snapshot; chunks go one at a time.
    Snapshot,
}

/// Appends sent and not yet acknowledged: a fixed ring of (last index, bytes).
#[derive(Clone, Debug)]
pub struct Inflights {
    ring: [(Index, u64); MAX_INFLIGHT_APPENDS],
    start: usize,
    count: usize,
    bytes: u64,
}

impl Default for Inflights {
    fn default() -> Self {
        Inflights {
            ring: [(0, 0); MAX_INFLIGHT_APPENDS],
            start: 0,
            count: 0,
            bytes: 0,
        }
    }
}

impl Inflights {
    pub fn count(&self) -> usize {
        self.count
    }
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
    pub fn is_full(&self, max_count: usize, max_bytes: u64) -> bool {
        self.count >= max_count.min(MAX_INFLIGHT_APPENDS) || self.bytes >= max_bytes
    }
    pub fn add(&mut self, last: Index, bytes: u64) {
        assert!(self.count < MAX_INFLIGHT_APPENDS);
        let slot = (self.start + self.count) % MAX_INFLIGHT_APPENDS;
        self.ring[slot] = (last, bytes);
        self.count += 1;
        self.bytes += bytes;
    }
    /// Frees every append whose last index is at most `index`.
    pub fn free_to(&mut self, index: Index) {
        while self.count > 0 {
            let (last, bytes) = self.ring[self.start];
            if last > index {
                break;
            }
            self.start = (self.start + 1) % MAX_INFLIGHT_APPENDS;
            self.count -= 1;
            self.bytes -= bytes;
        }
    }
    pub fn reset(&mut self) {
        self.start = 0;
        self.count = 0;
        self.bytes = 0;
    }
}

#[derive(Clone, Debug)]
pub struct Progress {
    pub id: NodeId,
    pub match_index: Index,
    pub next_index: Index,
    pub state: ProgressState,
    /// Probe: an append is outstanding; wait for its answer or the next heartbeat.
    pub paused: bool,
    pub inflights: Inflights,
    /// When the last response of the current term arrived (leader's clock).
    pub last_ack_at: Nanos,
    /// The start of the latest heartbeat round this follower answered (leader lease).
    pub acked_round_started_at: Nanos,
    /// When `match_index` last advanced.
    pub last_progress_at: Nanos,
    /// The highest ReadIndex round this follower has answered.
    pub acked_read_seq: u64,
    /// The highest round this follower acknowledged with success, received while this
    /// leader held its lease (echoed in appends as `lease_seq`).
    pub lease_acked_seq: u64,
    /// The incarnation of the follower's process that sent those acknowledgements
    /// (echoed as `lease_incarnation`); 0 until the first.
    pub lease_acked_incarnation: u64,
    /// Snapshot transfer: which snapshot, the next offset to send, when last sent.
    pub snapshot_index: Index,
    pub snapshot_offset: u64,
    pub snapshot_sent_at: Nanos,
}

impl Progress {
    pub fn new(id: NodeId, next_index: Index, now: Nanos) -> Progress {
        Progress {
            id,
            match_index: 0,
            next_index,
            state: ProgressState::Probe,
            paused: false,
            inflights: Inflights::default(),
            last_ack_at: now,
            acked_round_started_at: 0,
            last_progress_at: now,
            acked_read_seq: 0,
            lease_acked_seq: 0,
            lease_acked_incarnation: 0,
            snapshot_index: 0,
            snapshot_offset: 0,
            snapshot_sent_at: 0,
        }
    }
    pub fn become_probe(&mut self) {
        self.state = ProgressState::Probe;
        self.paused = false;
        self.inflights.reset();
        self.next_index = self.match_index + 1;
    }
    pub fn become_replicate(&mut self) {
        self.state = ProgressState::Replicate;
        self.paused = false;
        self.inflights.reset();
        self.next_index = self.match_index + 1;
    }
}
