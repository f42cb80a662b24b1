//! The failover timeline: the agents' `GET /events` streams, and the steps of one host
//! failure picked out of them.
//!
//! Every event carries `at_ms` (CLOCK_MONOTONIC milliseconds on the emitting agent); on
//! one machine that is the same clock the demo reads when it kills a host, so the steps
//! line up. An event without `at_ms` is placed at the time the demo received it.

use std::collections::VecDeque;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::Duration;

use serde_json::Value;

use crate::demo::local::LocalCluster;
use crate::demo::monotonic_ns;
use crate::limits::MAX_DEMO_EVENTS;

/// One event line from one agent's stream.
#[derive(Clone, Debug)]
pub struct Event {
    /// The host whose stream carried it.
    pub from: u64,
    /// CLOCK_MONOTONIC ms when the demo read it.
    pub received_ms: f64,
    pub value: Value,
}

impl Event {
    /// When it happened: the agent's `at_ms`, else when it was received.
    pub fn at_ms(&self) -> f64 {
        self.value["at_ms"].as_f64().unwrap_or(self.received_ms)
    }

    pub fn kind(&self) -> &str {
        self.value["type"].as_str().unwrap_or("")
    }
}

pub fn now_ms() -> f64 {
    monotonic_ns() as f64 / 1e6
}

/// Subscriptions to several agents' `/events`, one reader thread each (the demo is a
/// blocking client; the agents' loops are untouched). A stream ends when its agent
/// dies or the feed is dropped (at the stream's next line).
pub struct EventFeed {
    rx: Receiver<Event>,
    /// Every event seen, oldest first, at most `MAX_DEMO_EVENTS`.
    pub seen: VecDeque<Event>,
}

impl EventFeed {
    /// Subscribes to `hosts` and waits until each stream is open (the agent greets a new
    /// subscriber with a `leader` event).
    pub fn subscribe(
        cluster: &LocalCluster,
        hosts: &[u64],
        limit: Duration,
    ) -> Result<EventFeed, String> {
        let (tx, rx) = channel();
        for &id in hosts {
            let tx = tx.clone();
            let client = cluster.client(id, Duration::from_secs(10));
            std::thread::Builder::new()
                .name(format!("events-{id}"))
                .spawn(move || {
                    let _ = client.stream_lines("/events", |line| {
                        let Ok(value) = serde_json::from_str::<Value>(line) else {
                            return true; // not an event line: skip it
                        };
                        tx.send(Event {
                            from: id,
                            received_ms: now_ms(),
                            value,
                        })
                        .is_ok()
                    });
                })
                .map_err(|e| format!("cannot start an event reader thread: {e}"))?;
        }
        let mut feed = EventFeed {
            rx,
            seen: VecDeque::new(),
        };
        let start = std::time::Instant::now();
        let mut open: Vec<u64> = Vec::new();
        while open.len() < hosts.len() {
            let left = limit.saturating_sub(start.elapsed());
            if left.is_zero() {
                let missing: Vec<u64> = hosts
                    .iter()
                    .filter(|h| !open.contains(h))
                    .copied()
                    .collect();
                return Err(format!(
                    "GET /events did not answer on hosts {missing:?} within {limit:?}"
                ));
            }
            for e in feed.next_batch(left.min(Duration::from_millis(100))) {
                if !open.contains(&e.from) {
                    open.push(e.from);
                }
            }
        }
        Ok(feed)
    }

    /// The events that arrive within `wait` (at least one, unless none came).
    pub fn next_batch(&mut self, wait: Duration) -> Vec<Event> {
        let mut batch = Vec::new();
        match self.rx.recv_timeout(wait) {
            Ok(e) => batch.push(e),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return batch,
        }
        while let Ok(e) = self.rx.try_recv() {
            batch.push(e);
        }
        for e in &batch {
            if self.seen.len() == MAX_DEMO_EVENTS {
                self.seen.pop_front();
            }
            self.seen.push_back(e.clone());
        }
        batch
    }
}

/// A step of the timeline: when, and which agent said so.
#[derive(Clone, Debug, PartialEq)]
pub struct Mark<T> {
    pub at_ms: f64,
    pub from: u64,
    pub what: T,
}

/// What the demo did, against which the events are read.
#[derive(Clone, Debug)]
pub struct Failure {
    pub victim: u64,
    /// The VM whose resurrection is followed (None: the failover-only demo).
    pub vm: Option<String>,
    pub killed_ms: f64,
    pub leader_before: u64,
    pub term_before: u64,
}

/// A `vm_started` event of the followed VM on a new host.
#[derive(Clone, Debug, PartialEq)]
pub struct Started {
    pub host: u64,
    pub token: Option<u64>,
    /// The snapshot its VMM restored (None: booted afresh).
    pub restored_from: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct Timeline {
    /// (new leader, term)
    pub leader: Option<Mark<(u64, u64)>>,
    /// log index of the host-dead entry
    pub dead: Option<Mark<Option<u64>>>,
    /// (host, token)
    pub placed: Option<Mark<(u64, u64)>>,
    pub started: Option<Mark<Started>>,
    /// (host, counter) of the first guest report on the new host, from its report file
    pub first_report: Option<Mark<(u64, u64)>>,
    /// Steps whose event had no `at_ms`: their time is when the demo received it.
    pub received_times: Vec<&'static str>,
}

impl Timeline {
    /// Takes what `event` says about `failure`; earlier steps win, events from before
    /// the kill are ignored.
    pub fn observe(&mut self, event: &Event, failure: &Failure) {
        let at_ms = event.at_ms();
        if at_ms < failure.killed_ms {
            return;
        }
        let v = &event.value;
        fn mark<T>(at_ms: f64, event: &Event, what: T) -> Option<Mark<T>> {
            Some(Mark {
                at_ms,
                from: event.from,
                what,
            })
        }
        let vm_matches = |v: &Value| failure.vm.as_deref().is_some_and(|id| v["vm"] == id);
        match event.kind() {
            "leader" if self.leader.is_none() && failure.victim == failure.leader_before => {
                let (leader, term) = (v["leader"].as_u64(), v["term"].as_u64());
                if let (Some(leader), Some(term)) = (leader, term) {
                    if leader != 0 && leader != failure.victim && term > failure.term_before {
                        self.leader = mark(at_ms, event, (leader, term));
                        self.note_receipt_time(event, "leader elected");
                    }
                }
            }
            "host_dead" if self.dead.is_none() && v["host"].as_u64() == Some(failure.victim) => {
                self.dead = mark(at_ms, event, v["index"].as_u64());
                self.note_receipt_time(event, "host declared dead");
            }
            "vm_placed" if self.placed.is_none() && vm_matches(v) => {
                if let (Some(host), Some(token)) = (v["host"].as_u64(), v["token"].as_u64()) {
                    if host != failure.victim {
                        self.placed = mark(at_ms, event, (host, token));
                        self.note_receipt_time(event, "VM placed");
                    }
                }
            }
            "vm_started" if self.started.is_none() && vm_matches(v) => {
                if let Some(host) = v["host"].as_u64() {
                    if host != failure.victim {
                        let from = match &v["restored_from"] {
                            Value::Null => None,
                            Value::String(s) => Some(s.clone()),
                            other => Some(other.to_string()),
                        };
                        self.started = mark(
                            at_ms,
                            event,
                            Started {
                                host,
                                token: v["token"].as_u64(),
                                restored_from: from,
                            },
                        );
                        self.note_receipt_time(event, "VM restored");
                    }
                }
            }
            _ => {}
        }
    }

    fn note_receipt_time(&mut self, event: &Event, step: &'static str) {
        if !event.value["at_ms"].is_number() {
            self.received_times.push(step);
        }
    }

    /// Whether every step the failure calls for has been seen.
    pub fn complete(&self, failure: &Failure) -> bool {
        let leader_done = failure.victim != failure.leader_before || self.leader.is_some();
        match failure.vm {
            None => leader_done,
            Some(_) => {
                leader_done
                    && self.dead.is_some()
                    && self.placed.is_some()
                    && self.started.is_some()
                    && self.first_report.is_some()
            }
        }
    }

    /// The timeline as lines of text: ms after the kill, then what happened.
    /// The timeline as lines of text, in time order: ms after the kill, then what
    /// happened. Steps not seen come last and say so.
    pub fn render(&self, failure: &Failure, killed: &str) -> Vec<String> {
        let t = |ms: f64| format!("{:>9.1} ms", ms - failure.killed_ms);
        let missing = |what: &str| (f64::INFINITY, format!("{:>12}  {what}: not seen", "-"));
        let mut lines = vec![(
            failure.killed_ms,
            format!("{}  {killed}", t(failure.killed_ms)),
        )];
        if failure.victim == failure.leader_before {
            lines.push(match &self.leader {
                Some(m) => (
                    m.at_ms,
                    format!(
                        "{}  leader elected: host {} in term {} (reported by host {})",
                        t(m.at_ms),
                        m.what.0,
                        m.what.1,
                        m.from
                    ),
                ),
                None => missing("new leader elected"),
            });
        } else {
            lines.push((
                failure.killed_ms,
                format!(
                    "{:>12}  leader unchanged: host {} (term {}) kept its lease",
                    "-", failure.leader_before, failure.term_before
                ),
            ));
        }
        if let Some(vm) = &failure.vm {
            lines.push(match &self.dead {
                Some(m) => (
                    m.at_ms,
                    format!(
                        "{}  host {} declared dead{}",
                        t(m.at_ms),
                        failure.victim,
                        m.what
                            .map(|i| format!(" (log index {i})"))
                            .unwrap_or_default()
                    ),
                ),
                None => missing(&format!("host {} declared dead", failure.victim)),
            });
            lines.push(match &self.placed {
                Some(m) => (
                    m.at_ms,
                    format!(
                        "{}  {vm} placed on host {} (fencing token {})",
                        t(m.at_ms),
                        m.what.0,
                        m.what.1
                    ),
                ),
                None => missing(&format!("{vm} placed")),
            });
            lines.push(match &self.started {
                Some(m) => (
                    m.at_ms,
                    format!(
                        "{}  {vm} restored on host {}{} (its agent saw the VMM running)",
                        t(m.at_ms),
                        m.what.host,
                        match &m.what.restored_from {
                            Some(s) => format!(" from snapshot {s}"),
                            None => " (no snapshot yet: booted afresh)".to_string(),
                        }
                    ),
                ),
                None => missing(&format!("{vm} restored")),
            });
            lines.push(match &self.first_report {
                Some(m) => (
                    m.at_ms,
                    format!(
                        "{}  guest counter running again on host {}, resumed at {} (the guest's first report)",
                        t(m.at_ms),
                        m.what.0,
                        m.what.1
                    ),
                ),
                None => missing("guest counter running again"),
            });
        }
        // Stable: equal times keep the causal order above.
        lines.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut lines: Vec<String> = lines.into_iter().map(|(_, line)| line).collect();
        if !self.received_times.is_empty() {
            lines.push(format!(
                "{:>12}  ({}: the event carries no at_ms; the time is when it was received)",
                "",
                self.received_times.join(", ")
            ));
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(from: u64, value: Value) -> Event {
        Event {
            from,
            received_ms: 0.0,
            value,
        }
    }

    fn failure(victim: u64, leader: u64) -> Failure {
        Failure {
            victim,
            vm: Some("vm1".into()),
            killed_ms: 1000.0,
            leader_before: leader,
            term_before: 3,
        }
    }

    #[test]
    fn picks_the_steps_of_a_leader_host_failure() {
        let f = failure(2, 2);
        let mut t = Timeline::default();
        let events = [
            json!({"type":"leader","leader":2,"term":3,"at_ms":900.0}),
            json!({"type":"vm_placed","vm":"vm1","host":2,"token":5,"at_ms":950.0}),
            json!({"type":"leader","leader":0,"term":4,"at_ms":1150.0}),
            json!({"type":"leader","leader":3,"term":4,"at_ms":1160.0}),
            json!({"type":"leader","leader":1,"term":5,"at_ms":1170.0}),
            json!({"type":"host_dead","host":1,"index":40,"at_ms":1600.0}),
            json!({"type":"host_dead","host":2,"index":41,"at_ms":1700.0}),
            json!({"type":"vm_placed","vm":"vm2","host":1,"token":42,"at_ms":1701.0}),
            json!({"type":"vm_placed","vm":"vm1","host":3,"token":43,"at_ms":1702.0}),
            json!({"type":"vm_started","vm":"vm1","host":3,"token":43,"restored_from":"vms/vm1/5-3","at_ms":1780.0}),
        ];
        for e in events {
            t.observe(&ev(1, e), &f);
            assert!(!t.complete(&f));
        }
        assert_eq!(t.leader.as_ref().unwrap().what, (3, 4));
        assert_eq!(t.leader.as_ref().unwrap().at_ms, 1160.0);
        assert_eq!(t.dead.as_ref().unwrap().what, Some(41));
        assert_eq!(t.placed.as_ref().unwrap().what, (3, 43));
        let started = t.started.clone().unwrap();
        assert_eq!(started.what.restored_from.as_deref(), Some("vms/vm1/5-3"));
        assert_eq!((started.what.host, started.what.token), (3, Some(43)));
        t.first_report = Some(Mark {
            at_ms: 1790.0,
            from: 3,
            what: (3, 1234),
        });
        assert!(t.complete(&f));
        let text = t.render(&f, "host 2 killed").join("\n");
        assert!(text.contains("      0.0 ms  host 2 killed"), "{text}");
        assert!(
            text.contains("    160.0 ms  leader elected: host 3 in term 4"),
            "{text}"
        );
        assert!(
            text.contains("    700.0 ms  host 2 declared dead (log index 41)"),
            "{text}"
        );
        assert!(text.contains("resumed at 1234"), "{text}");
    }

    #[test]
    fn a_follower_failure_needs_no_election_and_missing_steps_say_so() {
        let f = failure(2, 1);
        let mut t = Timeline::default();
        t.observe(
            &ev(
                3,
                json!({"type":"leader","leader":3,"term":4,"at_ms":1100.0}),
            ),
            &f,
        );
        assert!(t.leader.is_none(), "no election is expected");
        let text = t.render(&f, "host 2 killed").join("\n");
        assert!(text.contains("leader unchanged: host 1"), "{text}");
        assert!(!text.contains("no at_ms"), "{text}");
        assert!(text.contains("vm1 placed: not seen"), "{text}");
        // Without at_ms, the receipt time counts.
        let mut late = ev(3, json!({"type":"host_dead","host":2}));
        late.received_ms = 1500.0;
        t.observe(&late, &f);
        assert_eq!(t.dead.as_ref().unwrap().at_ms, 1500.0);
        let text = t.render(&f, "host 2 killed").join("\n");
        assert!(
            text.contains("(host declared dead: the event carries no at_ms"),
            "{text}"
        );
        let failover_only = Failure {
            vm: None,
            ..failure(1, 1)
        };
        let mut t = Timeline::default();
        assert!(!t.complete(&failover_only));
        t.observe(
            &ev(
                2,
                json!({"type":"leader","leader":2,"term":4,"at_ms":1100.0}),
            ),
            &failover_only,
        );
        assert!(t.complete(&failover_only));
    }
}
