//! The steady-state message path of the Raft core and driver does not allocate: a
//! 3-node cluster commits 10,000 proposals after warm-up, and a counting global
//! allocator sees zero allocations inside the core's step/tick/propose/persisted/compact
//! calls and the driver's collect/finish_turn (the test's own storage, transport and
//! state machine switch counting off while they run: they are glue, not the core).

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use vigil::raft::*;

struct Counting;

thread_local! {
    /// Counting is per thread: only the thread driving the core is measured, not the
    /// test harness's own threads (which may allocate at any moment).
    static COUNTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn counting() -> bool {
    // `try_with`: no panic if a thread allocates while its locals are torn down.
    COUNTING.try_with(|c| c.get()).unwrap_or(false)
}

fn set_counting(on: bool) -> bool {
    COUNTING.with(|c| c.replace(on))
}
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: delegates to the system allocator; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if counting() {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if counting() {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `f` with counting off (test glue).
fn glue<T>(f: impl FnOnce() -> T) -> T {
    let was = set_counting(false);
    let r = f();
    set_counting(was);
    r
}

/// Storage that keeps only what the test needs (durability is not under test here).
struct NullStorage;
impl LogStorage for NullStorage {
    type Error = String;
    fn write_entries(&mut self, _: Index, _: EntriesView<'_>) -> Result<(), String> {
        Ok(())
    }
    fn write_hard_state(&mut self, _: &HardState) -> Result<(), String> {
        Ok(())
    }
    fn write_snapshot(&mut self, _: &SnapshotMeta, _: &[u8]) -> Result<(), String> {
        Ok(())
    }
    fn sync(&mut self) -> Result<(), String> {
        Ok(())
    }
}

struct Queue<'a>(&'a mut VecDeque<(Message, Vec<Entry>)>);
impl Transport for Queue<'_> {
    fn send(&mut self, m: &Message, p: Payload<'_>) {
        glue(|| {
            let entries = match p {
                Payload::Entries(v) => v.iter().cloned().collect(),
                _ => Vec::new(),
            };
            self.0.push_back((*m, entries));
        })
    }
}

#[derive(Default)]
struct CountingSm {
    applied: u64,
}
impl StateMachine for CountingSm {
    fn apply(&mut self, e: &Entry) {
        if e.kind == EntryKind::Normal {
            self.applied += 1;
        }
    }
    fn restore(&mut self, _: &[u8]) {}
    fn read_ready(&mut self, _: ReadState) {}
    fn read_failed(&mut self, _: u64) {}
}

struct Node {
    raft: Raft,
    driver: Driver,
    sm: CountingSm,
}

#[test]
fn steady_state_commits_do_not_allocate() {
    const MS: Nanos = 1_000_000;
    let members = Membership::new(&[1, 2, 3], &[]).unwrap();
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| {
            let mut cfg = Config::new(id, 7);
            cfg.log_capacity = 4096;
            Node {
                raft: Raft::new(cfg, members, Recovered::default()).unwrap(),
                driver: Driver::new(1024, 1024),
                sm: CountingSm::default(),
            }
        })
        .collect();
    let mut queue: VecDeque<(Message, Vec<Entry>)> = VecDeque::with_capacity(4096);
    let mut now: Nanos = 1_000 * MS;
    let mut storage = NullStorage;
    let payload = [7u8; 16];

    // One turn of node i: the core call has happened; the driver finishes the turn.
    fn finish(n: &mut Node, storage: &mut NullStorage, q: &mut VecDeque<(Message, Vec<Entry>)>) {
        n.driver
            .finish_turn(&mut n.raft, storage, &mut Queue(q), &mut n.sm)
            .unwrap();
        // Compaction keeps the in-memory log (and its buffer pool) bounded.
        let applied = n.raft.applied_index();
        if applied >= n.raft.first_index() + 1000 && n.raft.persisted_index() >= applied {
            n.raft.compact(applied, &[]);
            n.driver
                .collect(&mut n.raft, storage, &mut Queue(q), &mut n.sm)
                .unwrap();
        }
    }

    let mut run = |nodes: &mut Vec<Node>, proposals: u64, count: bool| -> u64 {
        let mut proposed = 0;
        let start_applied = nodes[0].sm.applied;
        let mut rounds = 0;
        while nodes[0].sm.applied < start_applied + proposals {
            rounds += 1;
            assert!(rounds < 1_000_000, "no progress");
            now += MS / 2;
            set_counting(count);
            for n in nodes.iter_mut() {
                n.raft.tick(now);
                finish(n, &mut storage, &mut queue);
            }
            if let Some(l) = nodes.iter().position(|n| n.raft.is_leader()) {
                // A batch of proposals per turn, as an event loop would see them.
                for _ in 0..8 {
                    if proposed < proposals && nodes[l].raft.propose(now, &payload).is_ok() {
                        proposed += 1;
                    }
                    let n = &mut nodes[l];
                    n.driver
                        .collect(&mut n.raft, &mut storage, &mut Queue(&mut queue), &mut n.sm)
                        .unwrap();
                }
                finish(&mut nodes[l], &mut storage, &mut queue);
            }
            while let Some((m, entries)) = glue(|| queue.pop_front()) {
                let n = &mut nodes[(m.to - 1) as usize];
                let p = if entries.is_empty() {
                    Payload::None
                } else {
                    Payload::Entries(EntriesView::from_slice(&entries))
                };
                n.raft.step(now, &m, p);
                finish(n, &mut storage, &mut queue);
                glue(|| drop(entries));
            }
            set_counting(false);
        }
        proposed
    };

    // Warm-up: elect a leader, fill buffers and the entry pools through compactions.
    run(&mut nodes, 6_000, false);
    let leader_before = nodes.iter().position(|n| n.raft.is_leader()).unwrap();
    let commit_before = nodes[leader_before].raft.commit_index();
    ALLOCATIONS.store(0, Ordering::Relaxed);
    let proposed = run(&mut nodes, 10_000, true);
    let allocations = ALLOCATIONS.load(Ordering::Relaxed);
    let leader = nodes.iter().position(|n| n.raft.is_leader()).unwrap();
    assert_eq!(
        leader, leader_before,
        "leadership must stay put for the measurement"
    );
    assert!(nodes[leader].raft.commit_index() >= commit_before + 10_000);
    assert_eq!(proposed, 10_000);
    for n in &nodes {
        assert!(
            n.sm.applied >= 16_000 - 8,
            "every node applied the proposals"
        );
    }
    assert_eq!(
        allocations, 0,
        "allocations in the core during 10,000 commits"
    );
}
