//! The order in which a node's event loop handles the core's outputs, shared by the
//! simulator and the agent:
//!
//! 1. after every input: persist (snapshot, entries, hard state: written, not synced),
//!    send messages that promise nothing, queue those that promise durability;
//! 2. once per loop turn ([`Driver::finish_turn`]): ONE sync, then tell the core what is
//!    durable, then send the queued votes and acknowledgements, then apply committed
//!    entries, then answer reads whose index is applied.

use super::core::Raft;
use super::types::{
    Body, EntriesView, Entry, HardState, Index, Message, Payload, ReadState, SnapshotMeta,
};
use std::collections::VecDeque;

/// Durable storage of the log, the hard state and the latest snapshot.
pub trait LogStorage {
    type Error: std::fmt::Display;
    /// Drops every entry with index `>= from`, then appends `entries` (starting at `from`).
    fn write_entries(&mut self, from: Index, entries: EntriesView<'_>) -> Result<(), Self::Error>;
    fn write_hard_state(&mut self, hard_state: &HardState) -> Result<(), Self::Error>;
    /// Stores a snapshot and drops the log prefix it covers.
    fn write_snapshot(&mut self, meta: &SnapshotMeta, data: &[u8]) -> Result<(), Self::Error>;
    /// Makes everything written so far durable.
    fn sync(&mut self) -> Result<(), Self::Error>;
}

/// Sends messages to peers (best effort; Raft tolerates loss).
pub trait Transport {
    fn send(&mut self, message: &Message, payload: Payload<'_>);
}

/// The replicated state machine.
pub trait StateMachine {
    fn apply(&mut self, entry: &Entry);
    /// Replaces the state with a snapshot's state-machine bytes.
    fn restore(&mut self, state: &[u8]);
    /// A linearizable read may now be served from the current state.
    fn read_ready(&mut self, read: ReadState);
}

/// Output handling state between the steps of one loop turn. Preallocated; no
/// allocation in steady state.
pub struct Driver {
    after_sync: Vec<Message>,
    reads: VecDeque<ReadState>,
    unsynced_writes: bool,
}

impl Driver {
    pub fn new(max_messages: usize, max_reads: usize) -> Driver {
        Driver {
            after_sync: Vec::with_capacity(max_messages),
            reads: VecDeque::with_capacity(max_reads),
            unsynced_writes: false,
        }
    }

    /// Messages waiting for the sync of this turn.
    pub fn waiting_for_sync(&self) -> usize {
        self.after_sync.len()
    }

    /// Whether this turn wrote anything that still needs the sync.
    pub fn needs_sync(&self) -> bool {
        self.unsynced_writes
    }

    /// Handles the outputs of the last call into the core (call after every input).
    pub fn collect<S: LogStorage, T: Transport, M: StateMachine>(
        &mut self,
        raft: &mut Raft,
        storage: &mut S,
        transport: &mut T,
        sm: &mut M,
    ) -> Result<(), S::Error> {
        if let Some(meta) = raft.outputs().snapshot {
            storage.write_snapshot(&meta, raft.snapshot_data())?;
            self.unsynced_writes = true;
            if raft.outputs().install_snapshot {
                sm.restore(raft.snapshot_state());
                // Reads waiting for an index the snapshot covers can go now.
            }
        }
        if let Some(from) = raft.outputs().persist_from {
            // An acknowledgement queued in this turn for entries that have just been
            // overwritten would promise something the sync will not make durable.
            self.after_sync.retain(|m| {
                !matches!(m.body, Body::AppendResp { success: true, index, .. } if index >= from)
            });
            let last = raft.last_index();
            storage.write_entries(from, raft.entries(from, last))?;
            self.unsynced_writes = true;
        }
        if let Some(hs) = raft.outputs().hard_state {
            storage.write_hard_state(&hs)?;
            self.unsynced_writes = true;
        }
        for i in 0..raft.outputs().messages.len() {
            let m = raft.outputs().messages[i];
            transport.send(&m, raft.payload(&m));
        }
        let out = raft.outputs_mut();
        self.after_sync
            .extend_from_slice(&out.messages_after_persist);
        for r in out.reads.iter() {
            self.reads.push_back(*r);
        }
        out.clear();
        Ok(())
    }

    /// Ends a loop turn: one sync, durable messages, apply, reads.
    pub fn finish_turn<S: LogStorage, T: Transport, M: StateMachine>(
        &mut self,
        raft: &mut Raft,
        storage: &mut S,
        transport: &mut T,
        sm: &mut M,
    ) -> Result<(), S::Error> {
        self.collect(raft, storage, transport, sm)?;
        if self.unsynced_writes {
            storage.sync()?;
            self.unsynced_writes = false;
        }
        let (last, term) = (raft.last_index(), raft.last_term());
        raft.persisted(last, term);
        for m in self.after_sync.drain(..) {
            transport.send(&m, Payload::None);
        }
        self.collect(raft, storage, transport, sm)?;
        while let Some((lo, hi)) = raft.to_apply() {
            let hi = hi.min(raft.last_index());
            if lo > hi {
                break;
            }
            for i in lo..=hi {
                sm.apply(raft.entry(i));
            }
            raft.applied_to(hi);
        }
        let applied = raft.applied_index();
        while let Some(r) = self.reads.front().copied() {
            if r.index > applied {
                break;
            }
            self.reads.pop_front();
            sm.read_ready(r);
        }
        Ok(())
    }

    /// Forgets queued messages and reads (after a crash the driver is rebuilt anyway).
    pub fn reset(&mut self) {
        self.after_sync.clear();
        self.reads.clear();
        self.unsynced_writes = false;
    }
}
