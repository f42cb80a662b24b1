//! A linearizability checker for the register model (Wing & Gong's search with
//! Lowe's memoisation, as in Porcupine), run per key (registers are independent).
//!
//! Operations whose outcome is unknown (timed out, node crashed) have return time
//! infinity and accept any result: they may take effect at any point after their call,
//! or never (placed last).

use super::kv::{Op, OpResult};
use std::collections::HashSet;

pub const INFINITY: u64 = u64::MAX;

#[derive(Clone, Copy, Debug)]
pub struct HistoryOp {
    pub client: u32,
    pub op: Op,
    pub call: u64,
    /// `INFINITY` when the outcome is unknown.
    pub ret: u64,
    /// None when the outcome is unknown.
    pub result: Option<OpResult>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// Not linearizable: the key and a short description.
    Violation(String),
    /// The search budget ran out (counted, not treated as a pass or a failure).
    Unknown,
}

/// Steps of the search per key before giving up.
pub const SEARCH_BUDGET: u64 = 2_000_000;

/// Applies `op` to the register `state`; returns the new state if `result` is possible.
fn step(state: u64, op: &Op, result: Option<OpResult>) -> Option<u64> {
    match (*op, result) {
        (Op::Put { value, .. }, None | Some(OpResult::Ok)) => Some(value),
        (Op::Get { .. }, None) => Some(state),
        (Op::Get { .. }, Some(OpResult::Value(v))) => (v == state).then_some(state),
        (Op::Cas { expected, new, .. }, None) => Some(if state == expected { new } else { state }),
        (Op::Cas { expected, new, .. }, Some(OpResult::Cas(ok))) => {
            if ok && state == expected {
                Some(new)
            } else if !ok && state != expected {
                Some(state)
            } else {
                None
            }
        }
        _ => None,
    }
}

/// Checks the whole history, key by key.
pub fn check(history: &[HistoryOp], keys: usize) -> Verdict {
    let mut unknown = false;
    for key in 0..keys {
        let ops: Vec<HistoryOp> = history
            .iter()
            .filter(|h| h.op.key() as usize == key)
            // A read with an unknown outcome constrains nothing.
            .filter(|h| !(matches!(h.op, Op::Get { .. }) && h.result.is_none()))
            .copied()
            .collect();
        match check_key(&ops) {
            Verdict::Ok => {}
            Verdict::Unknown => unknown = true,
            Verdict::Violation(v) => return Verdict::Violation(format!("key {key}: {v}")),
        }
    }
    if unknown {
        Verdict::Unknown
    } else {
        Verdict::Ok
    }
}

/// One key's history.
pub fn check_key(ops: &[HistoryOp]) -> Verdict {
    let n = ops.len();
    if n == 0 {
        return Verdict::Ok;
    }
    // Events: (time, is_return, op). Calls sort before returns at equal times, so
    // operations that touch at one instant count as concurrent (the permissive choice).
    let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * n);
    for (i, o) in ops.iter().enumerate() {
        assert!(o.ret >= o.call);
        events.push((o.call, false, i));
        events.push((o.ret, true, i));
    }
    events.sort();
    // A doubly linked list over events, with a head sentinel at index 0.
    let m = events.len();
    let mut next: Vec<usize> = (1..=m + 1).collect(); // next[k] for node k (0 = head)
    let mut prev: Vec<usize> = (0..=m).map(|k| k.wrapping_sub(1)).collect();
    next.truncate(m + 1);
    let end = m + 1;
    let mut ret_node = vec![0usize; n];
    let mut call_node = vec![0usize; n];
    for (k, &(_, is_ret, i)) in events.iter().enumerate() {
        if is_ret {
            ret_node[i] = k + 1;
        } else {
            call_node[i] = k + 1;
        }
    }
    let words = n.div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, u64)> = HashSet::new();
    let mut stack: Vec<(usize, u64)> = Vec::new(); // (op, state before)
    let mut state = 0u64;
    let mut cur = next[0];
    let mut steps = 0u64;
    let unlink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, k: usize| {
        let (p, nx) = (prev[k], next[k]);
        next[p] = nx;
        if nx != end {
            prev[nx] = p;
        }
    };
    let relink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, k: usize| {
        let (p, nx) = (prev[k], next[k]);
        next[p] = k;
        if nx != end {
            prev[nx] = k;
        }
    };
    loop {
        steps += 1;
        if steps > SEARCH_BUDGET {
            return Verdict::Unknown;
        }
        if cur == end {
            // Every operation linearized.
            return Verdict::Ok;
        }
        let (_, is_ret, i) = events[cur - 1];
        if !is_ret {
            if let Some(new_state) = step(state, &ops[i].op, ops[i].result) {
                linearized[i / 64] |= 1 << (i % 64);
                if cache.insert((linearized.clone(), new_state)) {
                    stack.push((i, state));
                    state = new_state;
                    unlink(&mut next, &mut prev, call_node[i]);
                    unlink(&mut next, &mut prev, ret_node[i]);
                    cur = next[0];
                    continue;
                }
                linearized[i / 64] &= !(1 << (i % 64));
            }
            cur = next[cur];
        } else {
            // A return whose call is not linearized: backtrack.
            let Some((j, old_state)) = stack.pop() else {
                let o = ops[i];
                return Verdict::Violation(format!(
                    "no valid order; stuck at client {} {:?} -> {:?} (call {} ret {})",
                    o.client, o.op, o.result, o.call, o.ret
                ));
            };
            state = old_state;
            linearized[j / 64] &= !(1 << (j % 64));
            relink(&mut next, &mut prev, ret_node[j]);
            relink(&mut next, &mut prev, call_node[j]);
            cur = next[call_node[j]];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(client: u32, value: u64, call: u64, ret: u64) -> HistoryOp {
        HistoryOp {
            client,
            op: Op::Put { key: 0, value },
            call,
            ret,
            result: if ret == INFINITY {
                None
            } else {
                Some(OpResult::Ok)
            },
        }
    }
    fn get(client: u32, value: u64, call: u64, ret: u64) -> HistoryOp {
        HistoryOp {
            client,
            op: Op::Get { key: 0 },
            call,
            ret,
            result: Some(OpResult::Value(value)),
        }
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = [
            put(1, 5, 0, 1),
            get(2, 5, 2, 3),
            put(1, 6, 4, 5),
            get(2, 6, 6, 7),
        ];
        assert_eq!(check_key(&h), Verdict::Ok);
    }

    #[test]
    fn stale_read_is_a_violation() {
        let h = [put(1, 5, 0, 1), put(1, 6, 2, 3), get(2, 5, 4, 5)];
        assert!(matches!(check_key(&h), Verdict::Violation(_)));
    }

    #[test]
    fn concurrent_ops_may_be_reordered() {
        let h = [
            put(1, 5, 0, 10),
            get(2, 0, 1, 2),
            get(3, 5, 3, 4),
            put(4, 6, 5, 12),
            get(2, 5, 11, 13),
        ];
        assert_eq!(check_key(&h), Verdict::Ok);
    }

    #[test]
    fn unknown_write_may_or_may_not_happen() {
        let h = [
            put(1, 5, 0, 1),
            put(2, 7, 2, INFINITY),
            get(3, 5, 3, 4),
            get(3, 7, 5, 6),
        ];
        assert_eq!(check_key(&h), Verdict::Ok);
        let h = [
            put(1, 5, 0, 1),
            put(2, 7, 2, INFINITY),
            get(3, 7, 3, 4),
            get(3, 5, 5, 6),
        ];
        assert!(matches!(check_key(&h), Verdict::Violation(_)));
    }

    #[test]
    fn cas_results_are_checked() {
        let cas = |ok, call, ret| HistoryOp {
            client: 9,
            op: Op::Cas {
                key: 0,
                expected: 5,
                new: 8,
            },
            call,
            ret,
            result: Some(OpResult::Cas(ok)),
        };
        assert_eq!(
            check_key(&[put(1, 5, 0, 1), cas(true, 2, 3), get(2, 8, 4, 5)]),
            Verdict::Ok
        );
        assert!(matches!(
            check_key(&[put(1, 5, 0, 1), cas(false, 2, 3)]),
            Verdict::Violation(_)
        ));
    }
}
