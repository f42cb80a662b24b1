//! Raft's safety properties, checked while the simulation runs: Election Safety, Leader
//! Append-Only, Log Matching, Leader Completeness and State Machine Safety.

use super::kv::fnv;
use crate::raft::{Index, Nanos, Raft, Role, Term};
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug)]
struct Known {
    term: Term,
    hash: u64,
    /// The lowest term of a node seen holding this entry as committed.
    seen_in_term: Term,
}

#[derive(Default)]
pub struct Checker {
    pub violation: Option<String>,
    leaders: BTreeMap<Term, usize>,
    /// Per node: (leader term, an index of its log, the term there) while leader.
    leader_tip: Vec<Option<(Term, Index, Term)>>,
    last_commit: Vec<Index>,
    was_leader_in: Vec<Term>,
    committed: Vec<Option<Known>>,
    applied: Vec<Option<(Term, u64)>>,
    pub liveness_latency: Option<Nanos>,
    /// Per node: the latest lease it could claim (term, start, end), global time.
    leases: Vec<Option<(Term, Nanos, Nanos)>>,
    /// When each term's leader was first seen (global time).
    elected_at: BTreeMap<Term, Nanos>,
}

fn slot<T: Clone>(v: &mut Vec<Option<T>>, i: Index) -> &mut Option<T> {
    let i = i as usize;
    if v.len() <= i {
        v.resize(i + 1, None);
    }
    &mut v[i]
}

impl Checker {
    pub fn new() -> Checker {
        Checker::default()
    }

    fn fail(&mut self, what: String) {
        if self.violation.is_none() {
            self.violation = Some(what);
        }
    }

    fn grow(&mut self, n: usize) {
        if self.leader_tip.len() <= n {
            self.leader_tip.resize(n + 1, None);
            self.last_commit.resize(n + 1, 0);
            self.was_leader_in.resize(n + 1, 0);
            self.leases.resize(n + 1, None);
        }
    }

    pub fn leaders_seen(&self) -> usize {
        self.leaders.len()
    }

    pub fn node_crashed(&mut self, n: usize) {
        self.grow(n);
        self.leader_tip[n] = None;
        self.last_commit[n] = 0;
    }

    /// Node `n` crashed at `now`: its lease claim ends there.
    pub fn crashed_at(&mut self, n: usize, now: Nanos) {
        self.lease_none(n, now);
    }

    /// Leader `n` of `term` may claim a lease over `[start, end)`: no leader of a later
    /// term may have been elected inside it.
    pub fn lease(&mut self, n: usize, term: Term, start: Nanos, end: Nanos) {
        self.grow(n);
        self.leases[n] = Some((term, start, end));
        let clash = self
            .elected_at
            .range(term + 1..)
            .find(|(_, &t)| start <= t && t < end)
            .map(|(&t2, &at)| (t2, at));
        if let Some((t2, at)) = clash {
            self.fail(format!(
                "leader lease: node {} of term {term} holds a lease over [{start}, {end}) ns but term {t2} elected a leader at {at} ns",
                n + 1
            ));
        }
    }

    /// Node `n` claims no lease from `now` on (it stepped down or voided it).
    pub fn lease_none(&mut self, n: usize, now: Nanos) {
        self.grow(n);
        if let Some((_, start, end)) = &mut self.leases[n] {
            *end = (*end).min(now).max(*start);
        }
    }

    fn elected(&mut self, n: usize, term: Term, now: Nanos) {
        self.elected_at.entry(term).or_insert(now);
        for (m, l) in self.leases.clone().into_iter().enumerate() {
            if let Some((t, start, end)) = l {
                if m != n && t < term && start <= now && now < end {
                    self.fail(format!(
                        "leader lease: node {} elected for term {term} at {now} ns inside the lease [{start}, {end}) ns of node {} (term {t})",
                        n + 1,
                        m + 1
                    ));
                }
            }
        }
    }

    /// Checks node `n` after an event.
    pub fn observe(&mut self, n: usize, raft: &Raft, now: Nanos) {
        self.grow(n);
        let term = raft.term();
        if raft.role() == Role::Leader {
            match self.leaders.get(&term) {
                Some(&other) if other != n => {
                    self.fail(format!(
                        "election safety: nodes {} and {} are both leader in term {term}",
                        other + 1,
                        n + 1
                    ));
                }
                _ => {
                    self.leaders.insert(term, n);
                }
            }
            if self.was_leader_in[n] != term {
                self.was_leader_in[n] = term;
                self.leader_completeness(n, raft);
                self.elected(n, term, now);
            }
            if let Some((t, idx, idx_term)) = self.leader_tip[n] {
                if t == term {
                    let still = idx < raft.first_index() || raft.term_at(idx) == Some(idx_term);
                    if raft.last_index() < idx || !still {
                        self.fail(format!(
                            "leader append-only: leader {} of term {term} lost or changed entry {idx}",
                            n + 1
                        ));
                    }
                }
            }
            self.leader_tip[n] = Some((term, raft.last_index(), raft.last_term()));
        } else {
            self.leader_tip[n] = None;
        }
        // Commits: every node must agree on every committed index.
        let commit = raft.commit_index();
        let from = (self.last_commit[n] + 1).max(raft.first_index());
        for i in from..=commit.min(raft.last_index()) {
            let e = raft.entry(i);
            let h = fnv(&e.data, e.kind);
            let known = slot(&mut self.committed, i);
            match known {
                Some(k) if k.term != e.term || k.hash != h => {
                    let k = *k;
                    self.fail(format!(
                        "state machine safety: node {} committed entry {i} of term {} but term {} was committed there before",
                        n + 1,
                        e.term,
                        k.term
                    ));
                }
                Some(k) => k.seen_in_term = k.seen_in_term.min(term),
                None => {
                    *known = Some(Known {
                        term: e.term,
                        hash: h,
                        seen_in_term: term,
                    })
                }
            }
        }
        self.last_commit[n] = commit;
    }

    /// A new leader must hold every entry committed in earlier terms.
    fn leader_completeness(&mut self, n: usize, raft: &Raft) {
        let term = raft.term();
        let first = raft.first_index();
        for i in first as usize..self.committed.len() {
            let Some(k) = self.committed[i] else { continue };
            if k.seen_in_term >= term {
                continue;
            }
            if raft.term_at(i as Index) != Some(k.term) {
                self.fail(format!(
                    "leader completeness: leader {} of term {term} lacks committed entry {i} (term {})",
                    n + 1,
                    k.term
                ));
                return;
            }
        }
    }

    /// Node `n` applied an entry.
    pub fn applied(&mut self, n: usize, index: Index, term: Term, hash: u64) {
        let known = slot(&mut self.applied, index);
        match known {
            Some((t, h)) if *t != term || *h != hash => {
                let t = *t;
                self.fail(format!(
                    "state machine safety: node {} applied entry {index} of term {term}, another node applied term {t} there",
                    n + 1
                ));
            }
            Some(_) => {}
            None => *known = Some((term, hash)),
        }
    }

    /// Log Matching over every pair of live nodes: where two logs hold an entry with the
    /// same index and term, they are identical up to it.
    pub fn log_matching(&mut self, rafts: &[(usize, &Raft)]) {
        for x in 0..rafts.len() {
            for y in x + 1..rafts.len() {
                let (na, a) = rafts[x];
                let (nb, b) = rafts[y];
                let lo = a.first_index().max(b.first_index());
                let hi = a.last_index().min(b.last_index());
                let mut top = None;
                let mut i = hi;
                while i >= lo && i > 0 {
                    if a.term_at(i) == b.term_at(i) {
                        top = Some(i);
                        break;
                    }
                    i -= 1;
                }
                let Some(top) = top else { continue };
                for j in lo..=top {
                    let (ea, eb) = (a.entry(j), b.entry(j));
                    if ea.term != eb.term || ea.data != eb.data || ea.kind != eb.kind {
                        self.fail(format!(
                            "log matching: nodes {} and {} agree at {top} but differ at {j}",
                            na + 1,
                            nb + 1
                        ));
                        return;
                    }
                }
            }
        }
    }
}
