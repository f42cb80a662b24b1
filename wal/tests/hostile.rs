//! Hostile input: segment files made of records with valid checksums but arbitrary
//! kinds, indexes and claims (what a bug or a forged file could leave). Opening must never
//! panic: it either refuses with an error naming a file, or yields a consistent log.

mod common;

use common::{small_options, Rng, TempDir};
use vigil_wal::format::{self, RecordHeader, RecordKind, SegmentHeader};
use vigil_wal::{EntryRef, Wal};

const SEGMENT: u64 = 8192;

/// A segment and the index its records lead the log to (roughly: the writer's view).
fn random_segment(rng: &mut Rng, seq: u64, first_index: u64, hostile: bool) -> (Vec<u8>, u64) {
    let mut buf = vec![0u8; SEGMENT as usize];
    let header = SegmentHeader {
        seq,
        first_index,
        segment_bytes: SEGMENT,
        data_offset: 512,
    };
    format::encode_segment_header(&mut buf, &header);
    let mut at = 512usize;
    let mut index = first_index;
    for _ in 0..rng.range(0, 40) {
        let kind = match rng.range(0, 20) {
            0..=1 => RecordKind::Truncate,
            2..=3 => RecordKind::Compact,
            4 => RecordKind::Seal,
            _ => RecordKind::Entry,
        };
        let record_index = match if hostile { rng.range(0, 20) } else { 20 } {
            0 => rng.next_u64(),
            1..=4 => index.saturating_sub(rng.range(0, 5)),
            5 => index + rng.range(0, 5),
            _ => match kind {
                // Well-formed: a truncation inside the segment's part of the log, a
                // compaction near the end.
                RecordKind::Truncate => {
                    let (lo, hi) = (first_index.max(1), index.saturating_add(1));
                    if lo < hi {
                        rng.range(lo, hi)
                    } else {
                        index
                    }
                }
                RecordKind::Compact => index
                    .saturating_sub(rng.range(0, 4))
                    .saturating_add(rng.range(0, 3)),
                _ => index,
            },
        };
        let synced_to = if hostile && rng.chance(2) {
            rng.next_u64()
        } else {
            format::position(seq, rng.range(0, at as u64 + 1))
        };
        let payload = vec![rng.next_u64() as u8; rng.range(0, 100) as usize];
        let payload = if kind == RecordKind::Entry {
            &payload[..]
        } else {
            &[][..]
        };
        if at + format::record_len(payload.len()) + 40 > buf.len() {
            break;
        }
        let head = RecordHeader {
            kind,
            index: record_index,
            term: rng.range(0, 4),
            synced_to,
        };
        at += format::encode_record(&mut buf[at..], seq, &head, payload);
        match kind {
            RecordKind::Entry if record_index == index => index += 1,
            RecordKind::Truncate if record_index <= index => index = record_index,
            RecordKind::Compact if record_index > index => index = record_index,
            _ => {}
        }
        if kind == RecordKind::Seal {
            break;
        }
    }
    if hostile && rng.chance(20) {
        let i = rng.range(512, at as u64 + 1) as usize;
        let last = buf.len() - 1;
        buf[i.min(last)] ^= 0x40;
    }
    (buf, index)
}

#[test]
fn valid_checksums_with_arbitrary_contents_never_panic() {
    let (mut opened, mut refused) = (0, 0);
    for seed in 0..400u64 {
        let mut rng = Rng::new(seed);
        let dir = TempDir::new("hostile");
        let files = rng.range(1, 4);
        let wild = rng.chance(10);
        let mut first = if wild {
            rng.next_u64()
        } else {
            rng.range(1, 50)
        };
        let base_seq = if wild {
            rng.next_u64()
        } else {
            rng.range(0, 3)
        };
        let hostile = rng.chance(50);
        for k in 0..files {
            let seq = base_seq.wrapping_add(k);
            let (bytes, next) = random_segment(&mut rng, seq, first, hostile);
            std::fs::write(dir.path().join(format!("{seq:016x}.seg")), bytes).unwrap();
            first = if !hostile || rng.chance(80) {
                next
            } else {
                first.wrapping_add(rng.range(0, 30))
            };
        }
        let outcome =
            std::panic::catch_unwind(|| match Wal::open(dir.path(), small_options(SEGMENT)) {
                Ok(mut wal) => {
                    assert!(wal.first_index() <= wal.last_index() + 1);
                    for index in wal.first_index()..=wal.last_index() {
                        assert_eq!(wal.entry(index).expect("entry in range").index, index);
                    }
                    let next = wal.last_index() + 1;
                    wal.append(&[EntryRef {
                        index: next,
                        term: 9,
                        payload: b"after",
                    }])
                    .unwrap();
                    wal.sync().unwrap();
                    drop(wal);
                    let wal = Wal::open(dir.path(), small_options(SEGMENT)).unwrap();
                    assert_eq!(wal.last_index(), next);
                    assert_eq!(wal.entry(next).unwrap().payload, b"after");
                    true
                }
                Err(e) => {
                    let text = e.to_string();
                    if std::env::var("HOSTILE_TRACE").is_ok() {
                        eprintln!("refused: {text}");
                    }
                    assert!(text.contains(".seg") || text.contains("segment"), "{text}");
                    false
                }
            });
        match outcome {
            Ok(true) => opened += 1,
            Ok(false) => refused += 1,
            Err(panic) => {
                eprintln!("hostile input seed {seed} panicked");
                std::panic::resume_unwind(panic);
            }
        }
    }
    eprintln!("hostile inputs: {opened} opened consistently, {refused} refused");
    assert!(opened > 0 && refused > 0);
}
