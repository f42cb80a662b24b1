//! The in-memory log: entries after the last snapshot, in a preallocated ring, with
//! recycled payload buffers so that steady-state appends do not allocate.

use super::types::{EntriesView, Entry, EntryKind, Index, Term};
use std::collections::VecDeque;

pub struct RaftLog {
    /// Entries `snapshot_index + 1 ..= last_index()`.
    entries: VecDeque<Entry>,
    snapshot_index: Index,
    snapshot_term: Term,
    /// Payload buffers of dropped entries, reused by later appends.
    pool: Vec<Vec<u8>>,
    capacity: usize,
}

impl RaftLog {
    pub fn new(capacity: usize) -> RaftLog {
        assert!(capacity >= 2);
        RaftLog {
            entries: VecDeque::with_capacity(capacity),
            snapshot_index: 0,
            snapshot_term: 0,
            pool: Vec::with_capacity(capacity),
            capacity,
        }
    }
    pub fn first_index(&self) -> Index {
        self.snapshot_index + 1
    }
    pub fn last_index(&self) -> Index {
        self.snapshot_index + self.entries.len() as u64
    }
    pub fn snapshot_index(&self) -> Index {
        self.snapshot_index
    }
    pub fn snapshot_term(&self) -> Term {
        self.snapshot_term
    }
    pub fn last_term(&self) -> Term {
        self.entries.back().map_or(self.snapshot_term, |e| e.term)
    }
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    pub fn free_slots(&self) -> usize {
        self.capacity - self.entries.len()
    }
    /// The term at `index`, if known (the snapshot's last index included).
    pub fn term(&self, index: Index) -> Option<Term> {
        if index == self.snapshot_index {
            return Some(self.snapshot_term);
        }
        if index < self.snapshot_index || index > self.last_index() {
            return None;
        }
        Some(self.entries[(index - self.snapshot_index - 1) as usize].term)
    }
    pub fn entry(&self, index: Index) -> &Entry {
        assert!(index > self.snapshot_index && index <= self.last_index());
        &self.entries[(index - self.snapshot_index - 1) as usize]
    }
    /// Entries `lo ..= hi`.
    pub fn view(&self, lo: Index, hi: Index) -> EntriesView<'_> {
        if hi < lo {
            return EntriesView::EMPTY;
        }
        assert!(
            lo > self.snapshot_index && hi <= self.last_index(),
            "view {lo}..={hi}"
        );
        let start = (lo - self.snapshot_index - 1) as usize;
        let end = (hi - self.snapshot_index) as usize;
        EntriesView::from_deque(&self.entries, start, end)
    }
    /// Appends a copy of `data` at the next index; the caller checked `free_slots`.
    pub fn append(&mut self, term: Term, kind: EntryKind, data: &[u8]) -> Index {
        assert!(self.entries.len() < self.capacity, "log full");
        assert!(term >= self.last_term(), "terms in the log never decrease");
        let mut buf = self.pool.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(data);
        let index = self.last_index() + 1;
        self.entries.push_back(Entry {
            term,
            index,
            kind,
            data: buf,
        });
        index
    }
    /// Drops entries `from ..`.
    pub fn truncate_from(&mut self, from: Index) {
        assert!(from > self.snapshot_index);
        while self.last_index() >= from {
            let e = self.entries.pop_back().expect("non-empty");
            self.recycle(e.data);
        }
    }
    /// Drops entries `..= upto`, which a snapshot now covers.
    pub fn compact_to(&mut self, upto: Index) {
        assert!(upto <= self.last_index() && upto >= self.snapshot_index);
        let term = self.term(upto).expect("in range");
        while self.snapshot_index < upto {
            let e = self.entries.pop_front().expect("non-empty");
            self.recycle(e.data);
            self.snapshot_index += 1;
        }
        self.snapshot_term = term;
    }
    /// Replaces the whole log with a snapshot's end point.
    pub fn reset(&mut self, index: Index, term: Term) {
        while let Some(e) = self.entries.pop_back() {
            self.recycle(e.data);
        }
        self.snapshot_index = index;
        self.snapshot_term = term;
    }
    fn recycle(&mut self, buf: Vec<u8>) {
        if self.pool.len() < self.pool.capacity() {
            self.pool.push(buf);
        }
    }
    /// The first index of the run of entries with `term` that contains `index`.
    pub fn first_index_of_term_run(&self, index: Index) -> Index {
        let term = self.term(index).expect("known index");
        let mut i = index;
        while i > self.snapshot_index + 1 && self.term(i - 1) == Some(term) {
            i -= 1;
        }
        i
    }
    /// The last index whose term is `term`, searching down from `from`.
    pub fn last_index_of_term(&self, term: Term, from: Index) -> Option<Index> {
        let mut i = from.min(self.last_index());
        while i > self.snapshot_index {
            let t = self.term(i).expect("in range");
            if t == term {
                return Some(i);
            }
            if t < term {
                return None;
            }
            i -= 1;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn terms(v: EntriesView<'_>) -> Vec<(Index, Term)> {
        v.iter().map(|e| (e.index, e.term)).collect()
    }

    #[test]
    fn views_cross_the_ring_boundary() {
        let mut log = RaftLog::new(8);
        for i in 1..=8 {
            log.append(1, EntryKind::Normal, &[i as u8]);
        }
        log.compact_to(5);
        for _ in 0..4 {
            log.append(2, EntryKind::Normal, b"x");
        }
        // Entries 6..=12 now wrap around the end of the ring buffer.
        assert_eq!(log.first_index(), 6);
        assert_eq!(log.last_index(), 12);
        let v = log.view(7, 11);
        assert_eq!(terms(v), vec![(7, 1), (8, 1), (9, 2), (10, 2), (11, 2)]);
        assert_eq!(v.get(2).index, 9);
        assert_eq!(log.term(5), Some(1), "the snapshot's last term is known");
        assert_eq!(log.term(4), None);
        assert_eq!(log.term(13), None);
    }

    #[test]
    fn truncation_and_term_searches() {
        let mut log = RaftLog::new(16);
        for t in [1, 1, 2, 2, 2, 4, 4] {
            log.append(t, EntryKind::Normal, b"");
        }
        assert_eq!(log.first_index_of_term_run(5), 3);
        assert_eq!(log.last_index_of_term(2, 7), Some(5));
        assert_eq!(log.last_index_of_term(3, 7), None);
        log.truncate_from(4);
        assert_eq!(log.last_index(), 3);
        assert_eq!(log.last_term(), 2);
        // Recycled buffers are reused.
        log.append(5, EntryKind::Normal, b"abc");
        assert_eq!(log.entry(4).data, b"abc");
        log.reset(20, 7);
        assert!(log.is_empty());
        assert_eq!((log.first_index(), log.last_term()), (21, 7));
    }
}
