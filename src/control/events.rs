//! `GET /events`: leadership, membership and placement changes as JSON lines.
//!
//! Each event is rendered once, with a sequence number, and appended to every
//! subscriber's outgoing buffer. A subscriber that falls more than its limit behind is
//! cut off (its connection is closed, and it can reconnect and read `/status`), so one
//! slow reader never holds memory or the loop hostage.
//!
//! Every event carries `at_ms` (CLOCK_MONOTONIC milliseconds, a float) and `node` (the
//! emitting node's id), as the API contract promises: a publisher may set `at_ms` itself
//! (the loop's `now`); otherwise the hub reads the clock when it publishes.

use std::collections::VecDeque;

use crate::io::clock::Instant;
use crate::limits::{MAX_EVENTS_BUFFERED, MAX_EVENT_SUBSCRIBERS};

/// A subscriber, named by the control connection that asked for the stream.
pub type SubscriberId = u64;

#[derive(Debug)]
struct Subscriber {
    id: SubscriberId,
    lines: VecDeque<String>,
}

#[derive(Debug)]
pub struct EventHub {
    /// The node whose events these are (each event's `node`).
    node: u64,
    subscribers: Vec<Subscriber>,
    next_sequence: u64,
}

/// Why a subscription was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooManySubscribers;

impl EventHub {
    pub fn new(node: u64) -> Self {
        EventHub {
            node,
            subscribers: Vec::new(),
            next_sequence: 0,
        }
    }

    pub fn subscribe(&mut self, id: SubscriberId) -> Result<(), TooManySubscribers> {
        assert!(
            self.subscribers.iter().all(|s| s.id != id),
            "subscribed twice"
        );
        if self.subscribers.len() >= MAX_EVENT_SUBSCRIBERS {
            return Err(TooManySubscribers);
        }
        self.subscribers.push(Subscriber {
            id,
            lines: VecDeque::new(),
        });
        Ok(())
    }

    pub fn unsubscribe(&mut self, id: SubscriberId) {
        self.subscribers.retain(|s| s.id != id);
    }

    pub fn subscriber_count(&self) -> usize {
        self.subscribers.len()
    }

    /// Publishes one event: `fields` is a JSON object to which `seq`, `type`, and (when
    /// the publisher did not set them) `at_ms` and `node` are added. Returns the subscribers that overflowed and were dropped; their
    /// connections must be closed.
    pub fn publish(&mut self, kind: &str, mut fields: serde_json::Value) -> Vec<SubscriberId> {
        self.next_sequence += 1;
        if let Some(object) = fields.as_object_mut() {
            object.insert("seq".into(), self.next_sequence.into());
            object.insert("type".into(), kind.into());
            if !object.contains_key("at_ms") {
                let at_ms = Instant::now().as_nanos() as f64 / 1e6;
                object.insert("at_ms".into(), at_ms.into());
            }
            object.entry("node").or_insert(self.node.into());
        }
        if self.subscribers.is_empty() {
            return Vec::new();
        }
        let mut line = fields.to_string();
        line.push('\n');
        let mut dropped = Vec::new();
        for subscriber in &mut self.subscribers {
            if subscriber.lines.len() >= MAX_EVENTS_BUFFERED {
                dropped.push(subscriber.id);
            } else {
                subscriber.lines.push_back(line.clone());
            }
        }
        self.subscribers.retain(|s| !dropped.contains(&s.id));
        dropped
    }

    /// Takes the lines waiting for `id`, oldest first, to write to its connection.
    pub fn drain(&mut self, id: SubscriberId, out: &mut Vec<u8>) {
        if let Some(subscriber) = self.subscribers.iter_mut().find(|s| s.id == id) {
            for line in subscriber.lines.drain(..) {
                out.extend_from_slice(line.as_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_subscriber_gets_numbered_lines() {
        let mut hub = EventHub::new(7);
        hub.subscribe(1).unwrap();
        hub.subscribe(2).unwrap();
        assert!(hub
            .publish("leader", json!({"term": 3, "leader": 2}))
            .is_empty());
        hub.publish("member", json!({"member": 4, "role": "observer"}));
        let mut out = Vec::new();
        hub.drain(1, &mut out);
        let lines: Vec<serde_json::Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["seq"], 1);
        assert_eq!(lines[0]["type"], "leader");
        assert_eq!(lines[1]["seq"], 2);
        // Every event says who emitted it and when, even when the publisher did not.
        for line in &lines {
            assert_eq!(line["node"], 7, "{line}");
            assert!(line["at_ms"].as_f64().is_some_and(|t| t > 0.0), "{line}");
        }
        let mut again = Vec::new();
        hub.drain(1, &mut again);
        assert!(again.is_empty());
        // A publisher's own `at_ms` and `node` are kept.
        hub.publish("vm_started", json!({"at_ms": 1.5, "node": 3}));
        hub.drain(1, &mut again);
        let line: serde_json::Value =
            serde_json::from_str(String::from_utf8(again.clone()).unwrap().trim()).unwrap();
        assert_eq!(line["at_ms"], 1.5);
        assert_eq!(line["node"], 3);
        again.clear();
        hub.drain(2, &mut again);
        assert_eq!(again.iter().filter(|&&b| b == b'\n').count(), 3);
    }

    #[test]
    fn a_slow_subscriber_is_cut_off_and_the_count_is_bounded() {
        let mut hub = EventHub::new(7);
        for id in 0..MAX_EVENT_SUBSCRIBERS as u64 {
            hub.subscribe(id).unwrap();
        }
        assert_eq!(hub.subscribe(999), Err(TooManySubscribers));
        let mut dropped = Vec::new();
        for _ in 0..=MAX_EVENTS_BUFFERED {
            // Subscriber 0 keeps reading; everyone else is slow.
            dropped.extend(hub.publish("tick", json!({})));
            hub.drain(0, &mut Vec::new());
        }
        assert_eq!(dropped.len(), MAX_EVENT_SUBSCRIBERS - 1);
        assert!(!dropped.contains(&0));
        assert_eq!(hub.subscriber_count(), 1);
    }
}
