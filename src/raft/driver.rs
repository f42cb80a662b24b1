//! The order in which a node's event loop handles the core's outputs, shared by the
//! simulator and the agent:
//!
//! 1. after every input ([`Driver::collect`]): persist (snapshot, entries, hard state:
//!    written, not synced), send messages that promise nothing, queue those that promise
//!    durability (votes, vote requests, append acknowledgements);
//! 2. once per loop turn, ONE sync of everything the turn wrote (group commit); when it
//!    has completed: tell the core what is durable ([`Raft::persisted`]: the leader's own
//!    match index), send the queued messages the sync covers; then apply committed
//!    entries and answer reads whose index is applied.
//!
//! Two ways to run step 2:
//!
//! - **Blocking** ([`Driver::finish_turn`], any [`LogStorage`]): the sync runs inside the
//!   call. The simulator (which models the disk's latency itself) and the Raft tests use
//!   it.
//! - **Split** ([`Driver::end_turn`] + [`Driver::complete_sync`], a [`SplitSync`]
//!   storage): `end_turn` starts the sync and returns how many flushes the caller must
//!   run (the agent submits them as fdatasync operations on its io_uring ring, so the
//!   loop keeps serving timers, sockets and the control API meanwhile); when every flush
//!   succeeded the caller calls `complete_sync`. At most one sync is in flight. Whatever
//!   is written while it runs (group commit) goes into the next one, which `end_turn`
//!   starts at the end of the turn in which the previous one completed.
//!
//! With [`Driver::batch_entry_writes`] (the agent turns it on), `collect` only notes
//! from where the log changed, and the end of the turn hands storage one write for all
//! the entries of the turn, before a sync begins.
//!
//! The ordering argument, which the driver checks with assertions on every message it
//! releases (`check_durable`):
//!
//! - A durability-promising message depends only on writes made before it was queued
//!   (the core queues it in the same call whose outputs `collect` persisted first).
//! - Messages queued before a sync began wait in `covered` and leave when that sync
//!   completed: it captured every write made before it began.
//! - Messages queued while a sync is in flight wait in `after_sync` for the next sync;
//!   they may leave at the completion of the current one only if nothing was written
//!   since it began (then every write they depend on is durable).
//! - With no sync in flight and nothing unsynced, every write is durable: queued
//!   messages leave at once.
//! - A log truncation (a conflict) drops queued acknowledgements for the overwritten
//!   indexes and lowers what the sync in flight, and what is durable, cover to below the
//!   truncation, exactly as the WAL lowers its synced index.

use super::core::Raft;
use super::types::{
    Body, EntriesView, Entry, HardState, Index, Message, Payload, ReadState, SnapshotMeta, Term,
};
use std::collections::VecDeque;

/// Durable storage of the log, the hard state and the latest snapshot.
pub trait LogStorage {
    type Error: std::fmt::Display;
    /// Drops every entry with index `>= from`, then appends `entries` (starting at `from`).
    fn write_entries(&mut self, from: Index, entries: EntriesView<'_>) -> Result<(), Self::Error>;
    fn write_hard_state(&mut self, hard_state: &HardState) -> Result<(), Self::Error>;
    /// Stores a snapshot and drops the log prefix it covers. The next sync must make it
    /// durable (a received snapshot: the acknowledgement that follows promises it).
    fn write_snapshot(&mut self, meta: &SnapshotMeta, data: &[u8]) -> Result<(), Self::Error>;
    /// Stores a snapshot the node made of its own applied state. Every entry it covers
    /// is durable in the log already, so storage may make it durable later, at its own
    /// pace, as long as it drops the log prefix only after the snapshot is durable; a
    /// blocking `sync` finishes it. A later `write_snapshot` (an install) must win over
    /// one still in progress. By default, the same as `write_snapshot`.
    fn write_local_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        data: &[u8],
    ) -> Result<(), Self::Error> {
        self.write_snapshot(meta, data)
    }
    /// Makes everything written so far durable.
    fn sync(&mut self) -> Result<(), Self::Error>;
}

/// Storage whose sync runs in the background: `begin_sync` captures everything written
/// so far and names the flushes to run (the caller runs them, for example as fdatasync
/// on an io_uring ring); writes may continue meanwhile and belong to the next sync.
pub trait SplitSync: LogStorage {
    /// Starts a sync of everything written so far. Returns how many flushes the caller
    /// must run before `complete_sync` (0: nothing to flush; complete at once). At most
    /// one sync is in flight.
    fn begin_sync(&mut self) -> Result<usize, Self::Error>;
    /// Every flush of the sync in flight succeeded (a failed flush must never reach
    /// this: it is fatal). Returns the last log index that is now durable.
    fn complete_sync(&mut self) -> Result<Index, Self::Error>;
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
    /// The read `id` will not be confirmed: answer its client with an error.
    fn read_failed(&mut self, id: u64);
}

/// What one sync makes durable: every write up to write number `writes`, which left the
/// log ending at `index` (whose term is `term`) and the hard state `hard_state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SyncPoint {
    writes: u64,
    index: Index,
    term: Term,
    hard_state: HardState,
}

impl SyncPoint {
    fn of(raft: &Raft, writes: u64) -> SyncPoint {
        SyncPoint {
            writes,
            index: raft.last_index(),
            term: raft.last_term(),
            hard_state: raft.hard_state(),
        }
    }

    /// The log from `from` on was replaced: only what lies below it stays covered.
    fn truncate(&mut self, from: Index, raft: &Raft) {
        if self.index >= from {
            self.index = from - 1;
            // Unchanged below `from`; unknown only below a snapshot, which a truncation
            // never reaches (committed entries are never overwritten).
            self.term = raft.term_at(self.index).unwrap_or(0);
        }
    }
}

/// Output handling state between the steps of one loop turn. Preallocated; no
/// allocation in steady state.
pub struct Driver {
    /// Durability-promising messages queued while a sync is in flight, or since the
    /// last one: the next sync covers them. Each with the number of writes made before
    /// it was queued (what it may depend on).
    after_sync: Vec<(Message, u64)>,
    /// Messages the sync in flight covers: they leave when it completes.
    covered: Vec<(Message, u64)>,
    reads: VecDeque<ReadState>,
    /// Writes (entries, hard state, snapshot) handed to storage so far (counted when
    /// collected, also if a batched entry write is handed over at the end of the turn).
    writes: u64,
    /// Batch entry writes: collect only notes from where the log changed; the end of
    /// the turn hands storage one write for the whole turn (one WAL write per turn
    /// instead of one per proposal or received append).
    batch_writes: bool,
    /// With batching: the log changed from this index on and storage has not seen it.
    pending_from: Option<Index>,
    /// Something was written since the last sync began.
    unsynced_writes: bool,
    /// What the sync in flight makes durable.
    in_flight: Option<SyncPoint>,
    /// What is durable: the last completed sync's point, lowered by truncations. None
    /// until the first sync completed, unless the caller named the recovered state.
    durable: Option<SyncPoint>,
}

impl Driver {
    pub fn new(max_messages: usize, max_reads: usize) -> Driver {
        Driver {
            after_sync: Vec::with_capacity(max_messages),
            covered: Vec::with_capacity(max_messages),
            reads: VecDeque::with_capacity(max_reads),
            writes: 0,
            batch_writes: false,
            pending_from: None,
            unsynced_writes: false,
            in_flight: None,
            durable: None,
        }
    }

    /// The core's state right after recovery is durable (storage recovered it from
    /// disk): from now on every released message is checked against what is durable.
    pub fn recovered(&mut self, raft: &Raft) {
        assert!(self.in_flight.is_none() && !self.unsynced_writes);
        self.durable = Some(SyncPoint::of(raft, self.writes));
    }

    /// Batch the entry writes of a turn into one (see the field). Off by default.
    pub fn batch_entry_writes(&mut self, on: bool) {
        assert!(self.pending_from.is_none());
        self.batch_writes = on;
    }

    /// Messages waiting for a sync.
    pub fn waiting_for_sync(&self) -> usize {
        self.after_sync.len() + self.covered.len()
    }

    /// Whether something was written that no sync (finished or in flight) covers yet.
    pub fn needs_sync(&self) -> bool {
        self.unsynced_writes
    }

    /// Whether a split sync is in flight (between `end_turn` starting it and
    /// `complete_sync`).
    pub fn sync_in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// The last log index known durable (None before the first sync, unless
    /// [`Driver::recovered`] was called).
    pub fn durable_index(&self) -> Option<Index> {
        self.durable.map(|d| d.index)
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
            // Batched entries at or below the snapshot are in it (a received snapshot
            // replaced them; a local one covers only durable entries, never batched ones).
            if let Some(from) = &mut self.pending_from {
                *from = (*from).max(meta.index + 1);
            }
            if raft.outputs().install_snapshot {
                storage.write_snapshot(&meta, raft.snapshot_data())?;
            } else {
                storage.write_local_snapshot(&meta, raft.snapshot_data())?;
            }
            // Counted as a write also when local (nothing depends on it, but a storage
            // whose snapshot becomes durable only at the next sync needs one).
            self.wrote();
            if raft.outputs().install_snapshot {
                sm.restore(raft.snapshot_state());
                // Reads waiting for an index the snapshot covers can go now.
            }
        }
        if let Some(from) = raft.outputs().persist_from {
            // An acknowledgement queued for entries that have just been overwritten
            // would promise something no sync will make durable.
            let keep = |(m, _): &(Message, u64)| !matches!(m.body, Body::AppendResp { success: true, index, .. } if index >= from);
            self.after_sync.retain(keep);
            self.covered.retain(keep);
            if let Some(point) = &mut self.in_flight {
                point.truncate(from, raft);
            }
            if let Some(point) = &mut self.durable {
                point.truncate(from, raft);
            }
            if self.batch_writes {
                self.pending_from = Some(self.pending_from.map_or(from, |f| f.min(from)));
            } else {
                let last = raft.last_index();
                storage.write_entries(from, raft.entries(from, last))?;
            }
            self.wrote();
        }
        if let Some(hs) = raft.outputs().hard_state {
            storage.write_hard_state(&hs)?;
            self.wrote();
        }
        for i in 0..raft.outputs().messages.len() {
            let m = raft.outputs().messages[i];
            transport.send(&m, raft.payload(&m));
        }
        let out = raft.outputs_mut();
        let writes = self.writes;
        self.after_sync
            .extend(out.messages_after_persist.iter().map(|m| (*m, writes)));
        for r in out.reads.iter() {
            self.reads.push_back(*r);
        }
        for &id in out.reads_failed.iter() {
            sm.read_failed(id);
        }
        out.clear();
        Ok(())
    }

    /// Ends a loop turn with the blocking sync: one sync, durable messages, apply, reads.
    pub fn finish_turn<S: LogStorage, T: Transport, M: StateMachine>(
        &mut self,
        raft: &mut Raft,
        storage: &mut S,
        transport: &mut T,
        sm: &mut M,
    ) -> Result<(), S::Error> {
        assert!(
            self.in_flight.is_none(),
            "finish_turn while a split sync is in flight"
        );
        self.collect(raft, storage, transport, sm)?;
        self.write_batched(raft, storage)?;
        if self.unsynced_writes {
            self.capture(raft);
            storage.sync()?;
            self.synced(raft, transport);
        } else {
            // Nothing unsynced: everything the core holds is durable.
            let (last, term) = (raft.last_index(), raft.last_term());
            raft.persisted(last, term);
            self.release_waiting(transport);
        }
        self.collect(raft, storage, transport, sm)?;
        self.apply(raft, sm);
        Ok(())
    }

    /// Ends a loop turn without waiting for the disk. If no sync is in flight and the
    /// turn (or an earlier one) wrote something, starts one and returns how many
    /// flushes the caller must run before [`Driver::complete_sync`] (0 if none was
    /// started, or if there was nothing to flush: then it completed at once). Then
    /// applies committed entries and answers reads whose index is applied.
    pub fn end_turn<S: SplitSync, T: Transport, M: StateMachine>(
        &mut self,
        raft: &mut Raft,
        storage: &mut S,
        transport: &mut T,
        sm: &mut M,
    ) -> Result<usize, S::Error> {
        self.collect(raft, storage, transport, sm)?;
        self.write_batched(raft, storage)?;
        let mut flushes = 0;
        if self.in_flight.is_none() {
            if self.unsynced_writes {
                self.capture(raft);
                flushes = storage.begin_sync()?;
                if flushes == 0 {
                    self.complete_sync(raft, storage, transport, sm)?;
                }
            } else {
                self.release_waiting(transport);
            }
        }
        self.apply(raft, sm);
        Ok(flushes)
    }

    /// Every flush of the sync in flight succeeded: the core learns what is durable
    /// (a leader may now count its own log toward the commit), the messages the sync
    /// covers leave, and the outputs of that are handled. Applying what committed is
    /// left to the next [`Driver::end_turn`].
    pub fn complete_sync<S: SplitSync, T: Transport, M: StateMachine>(
        &mut self,
        raft: &mut Raft,
        storage: &mut S,
        transport: &mut T,
        sm: &mut M,
    ) -> Result<(), S::Error> {
        let point = self
            .in_flight
            .expect("complete_sync without a sync in flight");
        let durable = storage.complete_sync()?;
        assert!(
            durable >= point.index,
            "storage made the log durable to {durable}, the sync covered {}",
            point.index
        );
        self.synced(raft, transport);
        self.collect(raft, storage, transport, sm)
    }

    /// Hands storage the entries batched in this turn (before any sync begins).
    fn write_batched<S: LogStorage>(
        &mut self,
        raft: &Raft,
        storage: &mut S,
    ) -> Result<(), S::Error> {
        if let Some(from) = self.pending_from.take() {
            storage.write_entries(from, raft.entries(from, raft.last_index()))?;
        }
        Ok(())
    }

    fn wrote(&mut self) {
        self.writes += 1;
        self.unsynced_writes = true;
    }

    /// A sync begins: it covers every write so far and the messages queued so far.
    fn capture(&mut self, raft: &Raft) {
        assert!(self.in_flight.is_none() && self.covered.is_empty());
        assert!(
            self.pending_from.is_none(),
            "a sync must cover batched writes"
        );
        self.in_flight = Some(SyncPoint::of(raft, self.writes));
        // Swapping keeps both preallocated buffers.
        std::mem::swap(&mut self.covered, &mut self.after_sync);
        self.unsynced_writes = false;
    }

    /// The sync in flight is durable.
    fn synced<T: Transport>(&mut self, raft: &mut Raft, transport: &mut T) {
        let point = self.in_flight.take().expect("a sync in flight");
        self.durable = Some(point);
        raft.persisted(point.index, point.term);
        for i in 0..self.covered.len() {
            let (m, writes) = self.covered[i];
            self.check_durable(&m, writes);
            transport.send(&m, Payload::None);
        }
        self.covered.clear();
        if !self.unsynced_writes {
            // Nothing was written while it ran: what was queued meanwhile is durable too.
            self.release_waiting(transport);
        }
    }

    /// Sends the messages queued since the last sync began; only when every write is
    /// durable.
    fn release_waiting<T: Transport>(&mut self, transport: &mut T) {
        assert!(self.in_flight.is_none() && !self.unsynced_writes);
        for i in 0..self.after_sync.len() {
            let (m, writes) = self.after_sync[i];
            self.check_durable(&m, writes);
            transport.send(&m, Payload::None);
        }
        self.after_sync.clear();
    }

    /// The invariant: a message that promises durability leaves only once every write
    /// made before it was queued (`writes`) is durable, its term is durable, and, for an
    /// acknowledgement, the entries it acknowledges are durable and not overwritten.
    /// (Whether the core put the right vote into the hard state is the core's business,
    /// checked by the simulator, which plants such bugs on purpose.) Skipped before the
    /// driver knows anything durable.
    fn check_durable(&self, m: &Message, writes: u64) {
        let Some(d) = self.durable else { return };
        assert!(
            writes <= d.writes,
            "{m:?} depends on write {writes} but only {} are durable",
            d.writes
        );
        assert!(
            d.hard_state.term >= m.term,
            "{m:?} would leave before its term is durable (durable: {d:?})"
        );
        if let Body::AppendResp {
            success: true,
            index,
            ..
        } = m.body
        {
            assert!(
                index <= d.index,
                "{m:?} acknowledges index {index} but only {} is durable",
                d.index
            );
        }
    }

    /// Applies committed entries, then hands over reads whose index is applied.
    fn apply<M: StateMachine>(&mut self, raft: &mut Raft, sm: &mut M) {
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
    }

    /// Forgets queued messages and reads (after a crash the driver is rebuilt anyway).
    pub fn reset(&mut self) {
        self.writes = 0;
        self.pending_from = None;
        self.after_sync.clear();
        self.covered.clear();
        self.reads.clear();
        self.unsynced_writes = false;
        self.in_flight = None;
        self.durable = None;
    }
}

#[cfg(test)]
mod tests {
    //! The split sync's ordering, checked from outside the driver: the storage below
    //! records what a completed sync made durable, and the transport checks every
    //! message against that at the moment it is handed over.
    use super::*;
    use crate::raft::{Config, Membership, Recovered, Role};
    use std::cell::Cell;
    use std::rc::Rc;

    const MS: u64 = 1_000_000;

    /// What is durable: the last log index and the hard state.
    type Durable = Rc<Cell<(Index, HardState)>>;

    /// In-memory storage with a split sync whose single flush the test completes.
    struct SplitMem {
        written_last: Index,
        written_hs: HardState,
        in_flight: Option<(Index, HardState)>,
        durable: Durable,
        syncs_begun: u64,
        entry_writes: u64,
    }

    impl SplitMem {
        fn new(durable: Durable) -> SplitMem {
            SplitMem {
                written_last: 0,
                written_hs: HardState::default(),
                in_flight: None,
                durable,
                syncs_begun: 0,
                entry_writes: 0,
            }
        }
    }

    impl LogStorage for SplitMem {
        type Error = String;
        fn write_entries(&mut self, from: Index, entries: EntriesView<'_>) -> Result<(), String> {
            self.entry_writes += 1;
            self.written_last = from - 1 + entries.len() as u64;
            // Overwritten entries are no longer durable, whatever a flush does.
            let (d, hs) = self.durable.get();
            self.durable.set((d.min(from - 1), hs));
            if let Some((i, _)) = &mut self.in_flight {
                *i = (*i).min(from - 1);
            }
            Ok(())
        }
        fn write_hard_state(&mut self, hs: &HardState) -> Result<(), String> {
            self.written_hs = *hs;
            Ok(())
        }
        fn write_snapshot(&mut self, _: &SnapshotMeta, _: &[u8]) -> Result<(), String> {
            unreachable!("no snapshots in these tests")
        }
        fn sync(&mut self) -> Result<(), String> {
            unreachable!("the split path never calls the blocking sync")
        }
    }

    impl SplitSync for SplitMem {
        fn begin_sync(&mut self) -> Result<usize, String> {
            assert!(self.in_flight.is_none(), "two syncs in flight");
            self.in_flight = Some((self.written_last, self.written_hs));
            self.syncs_begun += 1;
            Ok(1)
        }
        fn complete_sync(&mut self) -> Result<Index, String> {
            let point = self.in_flight.take().expect("a sync in flight");
            self.durable.set(point);
            Ok(point.0)
        }
    }

    /// Records what leaves, checking each durability promise against the storage.
    struct Checked {
        durable: Durable,
        sent: Vec<Message>,
    }

    impl Transport for Checked {
        fn send(&mut self, m: &Message, _: Payload<'_>) {
            let (index, hs) = self.durable.get();
            match m.body {
                Body::AppendResp {
                    success: true,
                    index: acked,
                    ..
                } => assert!(acked <= index, "{m:?} left with only {index} durable"),
                Body::VoteResp { .. } | Body::Vote { .. } => {
                    assert!(hs.term >= m.term, "{m:?} left before its term was durable")
                }
                _ => {}
            }
            if let Body::VoteResp { granted: true } = m.body {
                assert!(
                    hs.term > m.term || hs.vote == m.to,
                    "{m:?}: vote not durable"
                );
            }
            self.sent.push(*m);
        }
    }

    #[derive(Default)]
    struct Sm {
        applied: Vec<Index>,
    }

    impl StateMachine for Sm {
        fn apply(&mut self, entry: &Entry) {
            self.applied.push(entry.index);
        }
        fn restore(&mut self, _: &[u8]) {}
        fn read_ready(&mut self, _: ReadState) {}
        fn read_failed(&mut self, _: u64) {}
    }

    struct Node {
        raft: Raft,
        driver: Driver,
        storage: SplitMem,
        transport: Checked,
        sm: Sm,
    }

    impl Node {
        fn new(id: u64, batch: bool) -> Node {
            let membership = Membership::new(&[1, 2, 3], &[]).unwrap();
            let mut config = Config::new(id, 7);
            config.log_capacity = 1024;
            let raft = Raft::new(config, membership, Recovered::default()).unwrap();
            let durable: Durable = Rc::new(Cell::new((0, HardState::default())));
            let mut driver = Driver::new(64, 64);
            driver.batch_entry_writes(batch);
            driver.recovered(&raft);
            Node {
                raft,
                driver,
                storage: SplitMem::new(durable.clone()),
                transport: Checked {
                    durable,
                    sent: Vec::new(),
                },
                sm: Sm::default(),
            }
        }

        fn step(&mut self, now: u64, m: &Message, entries: &[Entry]) {
            let payload = if entries.is_empty() {
                Payload::None
            } else {
                Payload::Entries(EntriesView::from_slice(entries))
            };
            self.raft.step(now, m, payload);
            self.driver
                .collect(
                    &mut self.raft,
                    &mut self.storage,
                    &mut self.transport,
                    &mut self.sm,
                )
                .unwrap();
        }

        fn end_turn(&mut self) -> usize {
            self.driver
                .end_turn(
                    &mut self.raft,
                    &mut self.storage,
                    &mut self.transport,
                    &mut self.sm,
                )
                .unwrap()
        }

        fn complete(&mut self) {
            self.driver
                .complete_sync(
                    &mut self.raft,
                    &mut self.storage,
                    &mut self.transport,
                    &mut self.sm,
                )
                .unwrap();
        }

        /// Acknowledged indexes sent so far, in order.
        fn acks(&self) -> Vec<Index> {
            self.transport
                .sent
                .iter()
                .filter_map(|m| match m.body {
                    Body::AppendResp {
                        success: true,
                        index,
                        ..
                    } => Some(index),
                    _ => None,
                })
                .collect()
        }
    }

    fn entry(term: Term, index: Index) -> Entry {
        Entry {
            term,
            index,
            kind: crate::raft::EntryKind::Normal,
            data: vec![index as u8; 8],
        }
    }

    fn append(prev_index: Index, prev_term: Term, commit: Index, count: u32) -> Message {
        Message {
            from: 1,
            to: 2,
            term: 1,
            body: Body::Append {
                prev_index,
                prev_term,
                commit,
                count,
                read_seq: 0,
                lease_seq: 0,
                lease_incarnation: 0,
                lease_index: 0,
            },
        }
    }

    #[test]
    fn an_acknowledgement_waits_for_the_sync_that_covers_its_entries() {
        for batch in [false, true] {
            an_acknowledgement_waits_for_the_sync_that_covers_its_entries_with(batch);
        }
    }

    fn an_acknowledgement_waits_for_the_sync_that_covers_its_entries_with(batch: bool) {
        let mut f = Node::new(2, batch);
        let now = 1_000 * MS;
        f.step(now, &append(0, 0, 0, 1), &[entry(1, 1)]);
        assert_eq!(f.end_turn(), 1, "the turn wrote an entry: one sync starts");
        assert!(
            f.acks().is_empty(),
            "the ack left before the sync completed"
        );

        // While the sync runs, entry 2 arrives: written, not covered by that sync.
        f.step(now + MS, &append(1, 1, 0, 1), &[entry(1, 2)]);
        assert_eq!(f.end_turn(), 0, "at most one sync in flight");
        assert!(f.acks().is_empty());
        assert_eq!(f.storage.syncs_begun, 1);

        f.complete();
        assert_eq!(
            f.acks(),
            vec![1],
            "only what the first sync covered is acknowledged"
        );
        assert_eq!(f.raft.persisted_index(), 1);

        // The next turn starts the sync for entry 2 (group commit), and its ack waits.
        assert_eq!(f.end_turn(), 1);
        assert_eq!(f.acks(), vec![1]);
        f.complete();
        assert_eq!(f.acks(), vec![1, 2]);
        assert_eq!(f.raft.persisted_index(), 2);

        // A duplicate of entry 2 writes nothing: with nothing in flight or unsynced,
        // its ack promises only what is durable and leaves at the end of the turn.
        f.step(now + 2 * MS, &append(1, 1, 0, 1), &[entry(1, 2)]);
        assert_eq!(f.end_turn(), 0);
        assert_eq!(f.acks(), vec![1, 2, 2]);
    }

    #[test]
    fn an_ack_queued_during_a_sync_for_entries_that_sync_covers_leaves_with_it() {
        for batch in [false, true] {
            an_ack_queued_during_a_sync_for_entries_that_sync_covers_leaves_with_it_with(batch);
        }
    }

    fn an_ack_queued_during_a_sync_for_entries_that_sync_covers_leaves_with_it_with(batch: bool) {
        let mut f = Node::new(2, batch);
        let now = 1_000 * MS;
        f.step(now, &append(0, 0, 0, 2), &[entry(1, 1), entry(1, 2)]);
        assert_eq!(f.end_turn(), 1);
        // A retransmission of the same entries while the sync runs writes nothing, but
        // its ack depends on the sync in flight: it must not leave at the end of the turn.
        f.step(now + MS, &append(0, 0, 0, 2), &[entry(1, 1), entry(1, 2)]);
        assert_eq!(f.end_turn(), 0);
        assert!(
            f.acks().is_empty(),
            "an ack left while its entries were in flight"
        );
        f.complete();
        assert_eq!(f.acks(), vec![2, 2]);
    }

    #[test]
    fn a_truncation_drops_acks_for_overwritten_entries_and_lowers_the_sync() {
        for batch in [false, true] {
            a_truncation_drops_acks_for_overwritten_entries_and_lowers_the_sync_with(batch);
        }
    }

    fn a_truncation_drops_acks_for_overwritten_entries_and_lowers_the_sync_with(batch: bool) {
        let mut f = Node::new(2, batch);
        let now = 1_000 * MS;
        f.step(
            now,
            &append(0, 0, 0, 3),
            &[entry(1, 1), entry(1, 2), entry(1, 3)],
        );
        assert_eq!(f.end_turn(), 1);
        // A leader of term 2 overwrites entries 2 and 3 while the first sync runs.
        let mut m = append(1, 1, 0, 1);
        m.term = 2;
        f.step(now + MS, &m, &[entry(2, 2)]);
        f.complete();
        // The ack for 3 (promising the old entry 3) is gone; nothing above 1 counts as
        // durable, and the ack for the new entry 2 waits for the next sync.
        assert!(f.acks().is_empty(), "{:?}", f.transport.sent);
        assert_eq!(f.raft.persisted_index(), 1);
        assert_eq!(f.driver.durable_index(), Some(1));
        assert_eq!(f.end_turn(), 1);
        f.complete();
        assert_eq!(f.acks(), vec![2]);
        assert_eq!(f.raft.persisted_index(), 2);
    }

    #[test]
    fn votes_and_the_leaders_own_log_wait_for_the_sync() {
        for batch in [false, true] {
            votes_and_the_leaders_own_log_wait_for_the_sync_with(batch);
        }
    }

    fn votes_and_the_leaders_own_log_wait_for_the_sync_with(batch: bool) {
        let mut c = Node::new(1, batch);
        let mut now = 1_000 * MS;
        c.raft.tick(now);
        now += 300 * MS;
        c.raft.campaign_now(now);
        c.driver
            .collect(&mut c.raft, &mut c.storage, &mut c.transport, &mut c.sm)
            .unwrap();
        c.end_turn();
        let pre: Vec<_> = c.transport.sent.drain(..).collect();
        assert!(
            pre.iter().all(|m| matches!(m.body, Body::PreVote { .. })),
            "{pre:?}"
        );
        let grant = |from, term, body| Message {
            from,
            to: 1,
            term,
            body,
        };
        c.step(now, &grant(2, 1, Body::PreVoteResp { granted: true }), &[]);
        assert_eq!(c.raft.role(), Role::Candidate);
        assert_eq!(c.end_turn(), 1, "the own vote must be synced");
        assert!(
            !c.transport
                .sent
                .iter()
                .any(|m| matches!(m.body, Body::Vote { .. })),
            "a vote request left before the candidate's own vote was durable"
        );
        c.complete();
        assert!(c
            .transport
            .sent
            .iter()
            .any(|m| matches!(m.body, Body::Vote { .. })));

        c.step(now, &grant(2, 1, Body::VoteResp { granted: true }), &[]);
        assert!(c.raft.is_leader());
        // The leader's no-op goes to the followers at once, in parallel with its sync.
        assert!(c
            .transport
            .sent
            .iter()
            .any(|m| matches!(m.body, Body::Append { count: 1, .. })));
        assert_eq!(c.end_turn(), 1);
        let noop = c.raft.last_index();
        assert_eq!(c.raft.persisted_index(), noop - 1);
        // Follower 2 acknowledges the no-op before the leader's own sync completed. The
        // leader counts its own log only once durable: 1 of 3 voters is no quorum yet;
        // the completed sync makes it 2 of 3.
        let ack = grant(
            2,
            1,
            Body::AppendResp {
                success: true,
                index: noop,
                hint_index: 0,
                hint_term: 0,
                read_seq: 0,
                incarnation: 1,
            },
        );
        c.step(now + MS, &ack, &[]);
        c.end_turn();
        assert_eq!(
            c.raft.commit_index(),
            0,
            "committed without the leader's own sync"
        );
        c.complete();
        c.end_turn();
        assert_eq!(
            c.raft.commit_index(),
            noop,
            "the leader's sync completes the quorum"
        );
    }

    #[test]
    fn a_vote_waits_for_the_sync() {
        for batch in [false, true] {
            a_vote_waits_for_the_sync_with(batch);
        }
    }

    fn a_vote_waits_for_the_sync_with(batch: bool) {
        let mut f = Node::new(2, batch);
        let now = 1_000 * MS;
        f.raft.tick(now);
        let vote = Message {
            from: 3,
            to: 2,
            term: 1,
            body: Body::Vote {
                last_index: 0,
                last_term: 0,
                transfer: false,
            },
        };
        f.step(now + 300 * MS, &vote, &[]);
        assert_eq!(f.end_turn(), 1);
        assert!(
            f.transport.sent.is_empty(),
            "the vote left before it was durable: {:?}",
            f.transport.sent
        );
        f.complete();
        assert!(
            matches!(
                f.transport.sent.as_slice(),
                [Message {
                    body: Body::VoteResp { granted: true },
                    to: 3,
                    ..
                }]
            ),
            "{:?}",
            f.transport.sent
        );
    }

    #[test]
    fn batched_entry_writes_reach_storage_once_per_turn_and_before_the_sync() {
        let mut f = Node::new(2, true);
        let now = 1_000 * MS;
        for i in 1..=5 {
            f.step(
                now,
                &append(i - 1, if i > 1 { 1 } else { 0 }, 0, 1),
                &[entry(1, i)],
            );
        }
        assert_eq!(f.storage.entry_writes, 0, "collect only notes the change");
        assert_eq!(f.end_turn(), 1);
        assert_eq!(
            f.storage.entry_writes, 1,
            "one write for the turn's five appends"
        );
        assert_eq!(
            f.storage.in_flight.map(|(i, _)| i),
            Some(5),
            "the sync covers it"
        );
        f.complete();
        assert_eq!(f.acks(), vec![1, 2, 3, 4, 5]);
    }
}
