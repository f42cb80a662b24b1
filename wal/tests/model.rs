//! Random operation sequences (append, sync, truncate, compact, reopen) checked against a
//! plain in-memory model of the log. Set VIGIL_WAL_SEED to replay one seed.

mod common;

use common::{payload_for, small_options, Rng, TempDir};
use vigil_wal::{EntryRef, Wal, WalOptions};

/// The model: entries `first..first + terms.len()`, payloads derived from (index, term).
struct Model {
    first: u64,
    terms: Vec<u64>,
}

impl Model {
    fn last(&self) -> u64 {
        self.first + self.terms.len() as u64 - 1
    }
    fn next(&self) -> u64 {
        self.first + self.terms.len() as u64
    }
}

const MAX_PAYLOAD: usize = 700;

fn check_all(wal: &Wal, model: &Model, ctx: &str) {
    assert_eq!(wal.first_index(), model.first, "{ctx}: first_index");
    assert_eq!(wal.last_index(), model.last(), "{ctx}: last_index");
    for (i, &term) in model.terms.iter().enumerate() {
        let index = model.first + i as u64;
        let e = wal
            .entry(index)
            .unwrap_or_else(|| panic!("{ctx}: entry {index} missing"));
        assert_eq!(e.index, index, "{ctx}");
        assert_eq!(e.term, term, "{ctx}: term of {index}");
        assert_eq!(
            e.payload,
            &payload_for(index, term, MAX_PAYLOAD)[..],
            "{ctx}: payload of {index}"
        );
        assert_eq!(wal.term(index), Some(term), "{ctx}");
    }
    assert!(wal.entry(model.first.wrapping_sub(1)).is_none(), "{ctx}");
    assert!(wal.entry(model.next()).is_none(), "{ctx}");
    let all: Vec<_> = wal
        .entries(model.first..model.next())
        .expect("whole range")
        .map(|e| (e.index, e.term))
        .collect();
    assert_eq!(all.len(), model.terms.len(), "{ctx}: range length");
    assert!(
        wal.entries(model.first..model.next() + 1).is_none(),
        "{ctx}"
    );
}

fn run_seed(seed: u64, ops: usize, opts: WalOptions) {
    let dir = TempDir::new("model");
    let mut rng = Rng::new(seed);
    let mut wal = Wal::open(dir.path(), opts).unwrap();
    let mut model = Model {
        first: 1,
        terms: Vec::new(),
    };
    let mut term = 1;
    let trace = std::env::var("VIGIL_WAL_TRACE").is_ok();
    for step in 0..ops {
        let ctx = format!("seed {seed} step {step}");
        let op = rng.range(0, 100);
        if trace {
            eprintln!(
                "{ctx}: op {op} first {} last {} segs {}",
                model.first,
                model.last(),
                wal.segment_count()
            );
        }
        match op {
            0..=54 => {
                let n = rng.range(1, 12);
                if rng.chance(10) {
                    term += 1;
                }
                let start = model.next();
                let payloads: Vec<Vec<u8>> = (0..n)
                    .map(|i| payload_for(start + i, term, MAX_PAYLOAD))
                    .collect();
                let batch: Vec<EntryRef<'_>> = payloads
                    .iter()
                    .enumerate()
                    .map(|(i, p)| EntryRef {
                        index: start + i as u64,
                        term,
                        payload: p,
                    })
                    .collect();
                wal.append(&batch).unwrap();
                model.terms.extend(std::iter::repeat_n(term, n as usize));
            }
            55..=69 => {
                let synced = wal.sync().unwrap();
                assert_eq!(synced, model.last(), "{ctx}: sync covers everything");
                assert_eq!(wal.synced_index(), model.last(), "{ctx}");
            }
            70..=77 => {
                // A Raft conflict: cut somewhere in the log (or a no-op at its end).
                let at = rng.range(model.first, model.next() + 1);
                let before = wal.synced_index();
                wal.truncate_suffix(at).unwrap();
                model.terms.truncate((at - model.first) as usize);
                assert_eq!(
                    wal.synced_index(),
                    before.min(at - 1),
                    "{ctx}: synced_index"
                );
                term += 1;
            }
            78..=85 => {
                // A snapshot: sometimes past the end (install from a leader).
                let at = if rng.chance(15) {
                    model.next() + rng.range(0, 5)
                } else {
                    rng.range(model.first, model.next() + 1)
                };
                wal.compact(at).unwrap();
                if at >= model.next() {
                    model.terms.clear();
                    model.first = at;
                } else if at > model.first {
                    model.terms.drain(..(at - model.first) as usize);
                    model.first = at;
                }
            }
            86..=92 => {
                drop(wal);
                wal = Wal::open(dir.path(), opts).unwrap_or_else(|e| panic!("{ctx}: reopen: {e}"));
                assert!(
                    wal.recovery().torn_tail.is_none(),
                    "{ctx}: a clean close left no torn tail"
                );
                assert_eq!(wal.synced_index(), model.last(), "{ctx}: open syncs");
            }
            93..=95 => {
                // Compacting everything and syncing leaves one segment: space comes back.
                wal.compact(model.next()).unwrap();
                model.first = model.next();
                model.terms.clear();
                wal.sync().unwrap();
                assert_eq!(wal.segment_count(), 1, "{ctx}: compacted segments deleted");
                assert_eq!(common::segment_files(dir.path()).len(), 1, "{ctx}: files");
            }
            _ => check_all(&wal, &model, &ctx),
        }
        if step % 25 == 0 {
            check_all(&wal, &model, &ctx);
        }
    }
    check_all(&wal, &model, &format!("seed {seed} end"));
    drop(wal);
    let wal = Wal::open(dir.path(), opts).unwrap();
    check_all(&wal, &model, &format!("seed {seed} final reopen"));
}

fn seeds(default: std::ops::Range<u64>) -> Vec<u64> {
    match std::env::var("VIGIL_WAL_SEED") {
        Ok(s) => vec![s.parse().expect("VIGIL_WAL_SEED is a number")],
        Err(_) => default.collect(),
    }
}

fn run_seeds(seeds: Vec<u64>, ops: usize, opts: WalOptions) {
    for seed in seeds {
        let result = std::panic::catch_unwind(|| run_seed(seed, ops, opts));
        if let Err(panic) = result {
            eprintln!("model test failed with seed {seed} (rerun: VIGIL_WAL_SEED={seed})");
            std::panic::resume_unwind(panic);
        }
    }
}

#[test]
fn random_operations_match_model_small_segments() {
    run_seeds(seeds(0..40), 400, small_options(8192));
}

#[test]
fn random_operations_match_model_larger_segments() {
    run_seeds(seeds(1000..1010), 600, small_options(64 * 1024));
}

#[test]
fn append_rejects_gaps_and_oversized_entries() {
    let dir = TempDir::new("reject");
    let opts = small_options(8192);
    let mut wal = Wal::open(dir.path(), opts).unwrap();
    let big = vec![0u8; opts.max_entry_bytes as usize + 1];
    let gap = [EntryRef {
        index: 2,
        term: 1,
        payload: b"x",
    }];
    assert!(wal.append(&gap).is_err());
    let too_big = [EntryRef {
        index: 1,
        term: 1,
        payload: &big,
    }];
    assert!(wal.append(&too_big).is_err());
    assert_eq!(wal.last_index(), 0);
    assert!(wal.truncate_suffix(5).is_err());
}

#[test]
fn a_second_open_of_the_same_directory_is_refused() {
    let dir = TempDir::new("lock");
    let wal = Wal::open(dir.path(), small_options(8192)).unwrap();
    let err = Wal::open(dir.path(), small_options(8192))
        .err()
        .expect("locked");
    assert!(err.to_string().contains("lock"), "{err}");
    drop(wal);
    Wal::open(dir.path(), small_options(8192)).unwrap();
}

#[test]
fn split_sync_reports_targets_and_durable_index() {
    let dir = TempDir::new("split");
    let opts = small_options(8192);
    let mut wal = Wal::open(dir.path(), opts).unwrap();
    assert!(wal.begin_sync().is_none(), "nothing to sync after open");
    let payload = vec![7u8; 1000];
    let mut index = 1;
    // Enough to roll over into a second segment: two targets.
    for _ in 0..10 {
        wal.append(&[EntryRef {
            index,
            term: 1,
            payload: &payload,
        }])
        .unwrap();
        index += 1;
    }
    assert_eq!(wal.synced_index(), 0);
    let token = wal.begin_sync().expect("unsynced data");
    let targets: Vec<_> = wal.sync_targets().collect();
    assert_eq!(targets.len(), 2, "the sealed segment and the new one");
    assert!(targets.iter().all(|t| t.len > 0));
    // Appends and truncation while the sync is in flight.
    wal.append(&[EntryRef {
        index,
        term: 1,
        payload: &payload,
    }])
    .unwrap();
    wal.truncate_suffix(9).unwrap();
    for t in &targets {
        // SAFETY: the descriptors stay open until complete_sync.
        assert_eq!(unsafe { libc::fdatasync(t.fd) }, 0);
    }
    wal.complete_sync(token).unwrap();
    assert_eq!(
        wal.synced_index(),
        8,
        "the truncation lowered the durable index"
    );
    assert_eq!(wal.sync().unwrap(), 8);
    assert_eq!(wal.last_index(), 8);
}
