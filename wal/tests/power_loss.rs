//! Power-loss images: after a sync, more batches are written but not synced; a power cut
//! may then persist any subset of the unsynced pages, each wholly or in part. Every such
//! image is a legitimate crash state: opening it must succeed (a torn tail, never a
//! corruption error), keep every synced entry, and return only entries as written.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{payload_for, small_options, Rng, TempDir};
use vigil_wal::{EntryRef, Wal, WalOptions};

const TERM: u64 = 5;
const MAX_PAYLOAD: usize = 900;
const PAGE: usize = 4096;

fn options() -> WalOptions {
    WalOptions {
        segment_header_bytes: 4096,
        ..small_options(20 * 1024)
    }
}

fn append_batch(wal: &mut Wal, rng: &mut Rng, term: u64) {
    let start = wal.last_index() + 1;
    let n = rng.range(1, 8);
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
}

fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
        .map(|e| {
            (
                PathBuf::from(e.file_name()),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

#[test]
fn any_subset_of_unsynced_pages_recovers() {
    let (mut torn, mut removed, mut unnamed) = (0, 0, 0);
    for seed in 0..120u64 {
        let mut rng = Rng::new(seed);
        let dir = TempDir::new("powerloss");
        let mut wal = Wal::open(dir.path(), options()).unwrap();
        for _ in 0..rng.range(1, 25) {
            append_batch(&mut wal, &mut rng, TERM);
            wal.sync().unwrap();
        }
        let synced = wal.synced_index();
        let durable = snapshot(dir.path());
        for _ in 0..rng.range(1, 6) {
            append_batch(&mut wal, &mut rng, TERM);
        }
        let written = snapshot(dir.path());
        drop(wal);

        let crash = TempDir::new("powerloss-image");
        let newest = written.keys().next_back().cloned();
        for (name, now) in &written {
            let last_new = !durable.contains_key(name) && Some(name) == newest.as_ref();
            if last_new && rng.chance(20) {
                // The newest segment was made from a spare: header flushed and renamed,
                // but the directory fsync is left to the next sync, so its name may
                // not have reached the disk at all.
                unnamed += 1;
                continue;
            }
            let mut image = match durable.get(name) {
                Some(before) => before.clone(),
                // Created after the sync: its header page was flushed before it got its
                // name, the rest starts as preallocated zeroes.
                None => {
                    let mut fresh = vec![0u8; now.len()];
                    fresh[..PAGE].copy_from_slice(&now[..PAGE]);
                    fresh
                }
            };
            for page in (0..now.len()).step_by(PAGE) {
                let range = page..page + PAGE;
                if image[range.clone()] == now[range.clone()] {
                    continue;
                }
                match rng.range(0, 3) {
                    0 => {} // this page never reached the disk
                    1 => image[range.clone()].copy_from_slice(&now[range]),
                    _ => {
                        // Part of it did (sectors of 512 bytes).
                        let cut = page + 512 * rng.range(1, 8) as usize;
                        image[page..cut].copy_from_slice(&now[page..cut]);
                    }
                }
            }
            std::fs::write(crash.path().join(name), &image).unwrap();
        }
        let ctx = format!("seed {seed}");
        let wal = Wal::open(crash.path(), options())
            .unwrap_or_else(|e| panic!("{ctx}: a legitimate crash image failed to open: {e}"));
        assert!(
            wal.last_index() >= synced,
            "{ctx}: synced entry lost: last {} < synced {synced}",
            wal.last_index()
        );
        if let Some(t) = &wal.recovery().torn_tail {
            torn += 1;
            removed += t.removed_segments.len();
        }

        for index in wal.first_index()..=wal.last_index() {
            let e = wal.entry(index).unwrap();
            assert_eq!(e.term, TERM, "{ctx}");
            assert_eq!(
                e.payload,
                &payload_for(index, TERM, MAX_PAYLOAD)[..],
                "{ctx}: entry {index} is not what was written"
            );
        }
    }
    eprintln!(
        "power-loss images: 120, torn tails cut: {torn}, later segments removed: {removed}, \
         newest segment without its name: {unnamed}"
    );
    // The generator must actually produce torn states, or this test checks nothing.
    assert!(torn > 20, "only {torn} torn images");
    assert!(unnamed > 0, "no image lost the name of a new segment");
}

/// The same with a Raft conflict in the unsynced part: a truncation into synced entries
/// and new entries of a higher term. A crash image may show the log before or after the
/// truncation (or partly re-appended), but never a mix that was not written: every entry
/// up to the truncation point is the synced one, and every entry returned carries the
/// payload written for its own term.
#[test]
fn torn_truncation_recovers_to_a_written_state() {
    let (mut before, mut after) = (0, 0);
    for seed in 500..620u64 {
        let mut rng = Rng::new(seed);
        let dir = TempDir::new("powerloss-trunc");
        let mut wal = Wal::open(dir.path(), options()).unwrap();
        for _ in 0..rng.range(2, 25) {
            append_batch(&mut wal, &mut rng, TERM);
            wal.sync().unwrap();
        }
        let synced = wal.synced_index();
        let durable = snapshot(dir.path());
        let cut = rng.range(wal.first_index() + 1, synced + 1);
        wal.truncate_suffix(cut).unwrap();
        assert_eq!(wal.synced_index(), cut - 1);
        for _ in 0..rng.range(0, 5) {
            append_batch(&mut wal, &mut rng, TERM + 1);
        }
        let written = snapshot(dir.path());
        drop(wal);

        let crash = TempDir::new("powerloss-trunc-image");
        for (name, now) in &written {
            let mut image = match durable.get(name) {
                Some(before) => before.clone(),
                None => {
                    let mut fresh = vec![0u8; now.len()];
                    fresh[..PAGE].copy_from_slice(&now[..PAGE]);
                    fresh
                }
            };
            for page in (0..now.len()).step_by(PAGE) {
                if rng.chance(50) {
                    image[page..page + PAGE].copy_from_slice(&now[page..page + PAGE]);
                }
            }
            std::fs::write(crash.path().join(name), &image).unwrap();
        }
        let ctx = format!("seed {seed}");
        let wal = Wal::open(crash.path(), options())
            .unwrap_or_else(|e| panic!("{ctx}: a legitimate crash image failed to open: {e}"));
        assert!(
            wal.last_index() >= cut - 1,
            "{ctx}: entries before the cut lost"
        );
        let mut saw_new = false;
        for index in wal.first_index()..=wal.last_index() {
            let e = wal.entry(index).unwrap();
            if index < cut {
                assert_eq!(e.term, TERM, "{ctx}: entry {index} before the cut changed");
            } else {
                assert!(e.term == TERM || e.term == TERM + 1, "{ctx}");
                // Terms never go down along the log: no old entry after a new one.
                assert!(
                    !saw_new || e.term == TERM + 1,
                    "{ctx}: old entry {index} after new"
                );
            }
            saw_new |= e.term == TERM + 1;
            assert_eq!(
                e.payload,
                &payload_for(index, e.term, MAX_PAYLOAD)[..],
                "{ctx}: entry {index} is not what was written"
            );
        }
        if wal.last_index() >= cut && wal.term(cut) == Some(TERM) {
            before += 1;
            // The truncation did not survive, so the old suffix must be whole.
            assert!(wal.last_index() >= synced, "{ctx}: old suffix cut short");
        } else {
            after += 1;
        }
    }
    eprintln!("torn truncations: {before} recovered before the cut, {after} after it");
    assert!(before > 0 && after > 0, "both outcomes occur");
}

fn segment_count_on_disk(dir: &Path) -> usize {
    snapshot(dir).len()
}

/// A rollover uses the spare made after the previous sync: the same file (inode) is
/// renamed into place, and the next sync fsyncs the directory that names it.
#[test]
fn rollover_uses_the_spare_and_syncs_the_directory() {
    use std::os::unix::fs::MetadataExt;
    let dir = TempDir::new("powerloss-spare");
    let mut rng = Rng::new(7);
    let mut wal = Wal::open(dir.path(), options()).unwrap();
    append_batch(&mut wal, &mut rng, TERM);
    wal.sync().unwrap();
    append_batch(&mut wal, &mut rng, TERM);
    // This sync flushes the spare made after the first one.
    wal.sync().unwrap();
    let spare = dir.path().join(format!("{:016x}.seg.tmp", 1));
    let inode = std::fs::metadata(&spare)
        .expect("a spare segment file exists after a sync")
        .ino();
    let before = segment_count_on_disk(dir.path());
    while segment_count_on_disk(dir.path()) == before {
        append_batch(&mut wal, &mut rng, TERM);
    }
    let used = dir.path().join(format!("{:016x}.seg", 1));
    assert_eq!(
        std::fs::metadata(&used).unwrap().ino(),
        inode,
        "the rollover renamed the spare"
    );
    let token = wal.begin_sync().expect("unsynced entries");
    assert!(
        wal.sync_targets().any(|t| t.full_fsync),
        "the sync after a rollover fsyncs the directory"
    );
    let last = wal.last_index();
    for t in wal.sync_targets().collect::<Vec<_>>() {
        // SAFETY: descriptors the log keeps open until complete_sync.
        let rc = unsafe {
            if t.full_fsync {
                libc::fsync(t.fd)
            } else {
                libc::fdatasync(t.fd)
            }
        };
        assert_eq!(rc, 0);
    }
    wal.complete_sync(token).unwrap();
    assert_eq!(wal.synced_index(), last);
    drop(wal);
    let wal = Wal::open(dir.path(), options()).unwrap();
    assert_eq!(wal.last_index(), last);
    assert_eq!(wal.recovery().torn_tail, None);
    for index in wal.first_index()..=last {
        assert_eq!(
            wal.entry(index).unwrap().payload,
            &payload_for(index, TERM, MAX_PAYLOAD)[..]
        );
    }
}

fn names_ending(dir: &Path, suffix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(suffix))
        .collect();
    names.sort();
    names
}

/// A segment a compaction made unneeded is renamed out of the log and freed a slice per
/// sync, then unlinked; a crash while it is being freed leaves a `.seg.del` file that
/// the next open removes, with every live entry intact.
#[test]
fn removed_segment_is_freed_in_slices_and_survives_a_crash() {
    let opts = WalOptions {
        segment_bytes: 9 << 20,
        segment_header_bytes: 4096,
        max_entry_bytes: 4096,
        first_index: 1,
    };
    let dir = TempDir::new("powerloss-trash");
    let mut wal = Wal::open(dir.path(), opts).unwrap();
    let payload = |i: u64| payload_for(i, TERM, 4000);
    while names_ending(dir.path(), ".seg").len() < 2 {
        let i = wal.last_index() + 1;
        let p = payload(i);
        wal.append(&[EntryRef {
            index: i,
            term: TERM,
            payload: &p,
        }])
        .unwrap();
    }
    wal.sync().unwrap();
    // Everything in the first segment is covered by a snapshot now.
    let keep_from = wal.last_index();
    wal.compact(keep_from).unwrap();
    wal.sync().unwrap();
    assert_eq!(
        names_ending(dir.path(), ".seg.del"),
        vec![format!("{:016x}.seg.del", 0)],
        "the removed segment is renamed out and not freed in one go"
    );
    assert!(!dir.path().join(format!("{:016x}.seg", 0)).exists());

    // A crash now: the image holds the half-freed file.
    let crash = TempDir::new("powerloss-trash-image");
    common::copy_dir(dir.path(), crash.path());
    let image = Wal::open(crash.path(), opts).unwrap();
    assert!(names_ending(crash.path(), ".seg.del").is_empty());
    assert_eq!(image.first_index(), keep_from);
    assert_eq!(
        image.entry(keep_from).unwrap().payload,
        &payload(keep_from)[..]
    );
    drop(image);

    // Later syncs finish the job.
    for _ in 0..4 {
        let i = wal.last_index() + 1;
        let p = payload(i);
        wal.append(&[EntryRef {
            index: i,
            term: TERM,
            payload: &p,
        }])
        .unwrap();
        wal.sync().unwrap();
    }
    assert!(names_ending(dir.path(), ".seg.del").is_empty());
    drop(wal);
    let wal = Wal::open(dir.path(), opts).unwrap();
    assert_eq!(wal.first_index(), keep_from);
    assert_eq!(wal.recovery().torn_tail, None);
}
