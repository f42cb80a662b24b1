//! The bounded window of recent client requests and their outcomes, shared by every
//! command of the state machine (KV and cluster alike): a retried request (same request
//! id) is answered from here instead of being applied twice.
//!
//! The window is part of the replicated state (it is in Raft snapshots), so every node
//! answers a retry the same way. It holds the latest `capacity` request ids; the oldest
//! is forgotten first. Request id 0 means "not deduplicated" and is never remembered.

use std::collections::{HashMap, VecDeque};

use super::command::RequestId;
use crate::codec::{self, DecodeError, Reader};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DedupWindow<O> {
    capacity: usize,
    outcomes: HashMap<u64, O>,
    /// Apply order of `outcomes`, oldest first (forgotten first).
    order: VecDeque<u64>,
}

impl<O: Clone> DedupWindow<O> {
    pub fn new(capacity: usize) -> Self {
        assert!(capacity > 0);
        DedupWindow {
            capacity,
            outcomes: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The outcome a request already had, if it is still remembered.
    pub fn get(&self, request: RequestId) -> Option<&O> {
        if request.0 == 0 {
            return None;
        }
        self.outcomes.get(&request.0)
    }

    /// Remembers `outcome` for `request` (ignored for request id 0).
    pub fn remember(&mut self, request: RequestId, outcome: O) {
        if request.0 == 0 {
            return;
        }
        assert!(
            !self.outcomes.contains_key(&request.0),
            "a remembered request is answered, not applied again"
        );
        if self.order.len() == self.capacity {
            let oldest = self.order.pop_front().expect("the window is full");
            self.outcomes.remove(&oldest);
        }
        self.outcomes.insert(request.0, outcome);
        self.order.push_back(request.0);
        assert_eq!(self.outcomes.len(), self.order.len());
        assert!(self.order.len() <= self.capacity);
    }

    /// Writes the window oldest first; deterministic for equal windows.
    pub fn encode(&self, out: &mut Vec<u8>, encode_outcome: impl Fn(&O, &mut Vec<u8>)) {
        codec::put_u32(out, self.order.len() as u32);
        for id in &self.order {
            codec::put_u64(out, *id);
            encode_outcome(&self.outcomes[id], out);
        }
    }

    /// Reads what [`DedupWindow::encode`] wrote, with the same capacity.
    pub fn decode(
        reader: &mut Reader<'_>,
        capacity: usize,
        decode_outcome: impl Fn(&mut Reader<'_>) -> Result<O, DecodeError>,
    ) -> Result<Self, DecodeError> {
        let mut window = DedupWindow::new(capacity);
        let count = reader.u32("dedup.count")? as usize;
        if count > capacity {
            return Err(reader.invalid(
                "dedup.count",
                format!("{count} remembered requests exceed the window of {capacity}"),
            ));
        }
        for _ in 0..count {
            let at = reader.offset();
            let id = reader.u64("dedup.request_id")?;
            if id == 0 || window.outcomes.contains_key(&id) {
                return Err(DecodeError {
                    field: "dedup.request_id",
                    offset: at,
                    problem: codec::Problem::Invalid(format!(
                        "request id {id} is zero or repeated"
                    )),
                });
            }
            let outcome = decode_outcome(reader)?;
            window.outcomes.insert(id, outcome);
            window.order.push_back(id);
        }
        Ok(window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_the_latest_and_forgets_the_oldest() {
        let mut window = DedupWindow::new(3);
        window.remember(RequestId(0), 99u8);
        assert!(window.is_empty(), "request id 0 is never remembered");
        for id in 1..=4u64 {
            window.remember(RequestId(id), id as u8);
        }
        assert_eq!(window.len(), 3);
        assert_eq!(window.get(RequestId(1)), None);
        assert_eq!(window.get(RequestId(4)), Some(&4));
        assert_eq!(window.get(RequestId(0)), None);

        let mut bytes = Vec::new();
        window.encode(&mut bytes, |o, out| codec::put_u8(out, *o));
        let decoded = DedupWindow::decode(&mut Reader::new(&bytes), 3, |r| r.u8("o")).unwrap();
        assert_eq!(decoded, window);
        // A window larger than the capacity is refused, naming the field.
        let error = DedupWindow::decode(&mut Reader::new(&bytes), 2, |r| r.u8("o")).unwrap_err();
        assert_eq!(error.field, "dedup.count");
        for cut in 0..bytes.len() {
            assert!(
                DedupWindow::decode(&mut Reader::new(&bytes[..cut]), 3, |r| r.u8("o")).is_err()
            );
        }
    }
}
