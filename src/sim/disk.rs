//! A simulated disk for one node: CRC-framed records, a synced prefix and unsynced
//! writes. A crash keeps a random prefix of the unsynced writes, possibly tearing the
//! last one; a bit flip corrupts a synced record. Recovery replays the records and
//! refuses (the node stays down) when a complete record fails its CRC: a node that
//! lost a synced vote or acknowledgement must not rejoin as if nothing happened.

use crate::raft::rng::Rng;
use crate::raft::{
    EntriesView, Entry, EntryKind, HardState, Index, LogStorage, Recovered, SnapshotMeta,
};

const TAG_ENTRIES: u8 = 1;
const TAG_HARD_STATE: u8 = 2;
const TAG_SNAPSHOT: u8 = 3;

#[derive(Default)]
pub struct SimDisk {
    /// Records that survive a crash (bytes exactly as written).
    synced: Vec<Vec<u8>>,
    unsynced: Vec<Vec<u8>>,
    pub syncs: u64,
}

/// Why recovery refused a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corruption {
    pub record: usize,
    pub what: String,
}

impl std::fmt::Display for Corruption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "record {}: {}", self.record, self.what)
    }
}

/// Record framing: length, CRC of the length, CRC of the payload, payload. The length
/// has its own CRC so that a flipped length bit is corruption, not a "torn" tail.
const HEADER: usize = 12;

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + HEADER);
    let len = (payload.len() as u32).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&crc32fast::hash(&len).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

impl SimDisk {
    pub fn new() -> SimDisk {
        SimDisk::default()
    }
    pub fn unsynced_records(&self) -> usize {
        self.unsynced.len()
    }
    pub fn synced_records(&self) -> usize {
        self.synced.len()
    }
    /// A crash: a random prefix of the unsynced writes reaches the disk, the last of
    /// them possibly torn (cut short).
    pub fn crash(&mut self, rng: &mut Rng) {
        let keep = rng.below(self.unsynced.len() as u64 + 1) as usize;
        let mut pending = std::mem::take(&mut self.unsynced);
        pending.truncate(keep);
        if let Some(last) = pending.last_mut() {
            if rng.chance(0.5) {
                let cut = rng.below(last.len() as u64) as usize;
                last.truncate(cut);
            }
        }
        self.synced.extend(pending);
    }
    /// Flips one bit of a synced record; returns false if there is none.
    pub fn flip_bit(&mut self, rng: &mut Rng) -> bool {
        if self.synced.is_empty() {
            return false;
        }
        let r = rng.below(self.synced.len() as u64) as usize;
        let rec = &mut self.synced[r];
        if rec.is_empty() {
            return false;
        }
        let byte = rng.below(rec.len() as u64) as usize;
        rec[byte] ^= 1 << rng.below(8);
        true
    }
    /// Rebuilds what was written, or refuses when a complete record is corrupt.
    /// A short final record is a torn write of unsynced data and is dropped.
    pub fn recover(&mut self) -> Result<Recovered, Corruption> {
        let mut rec = Recovered::default();
        let n = self.synced.len();
        let mut torn_at = None;
        for (i, bytes) in self.synced.iter().enumerate() {
            let last = i + 1 == n;
            if bytes.len() < 8 {
                // Not even a length: a write cut short, possible only at the tail.
                if last {
                    torn_at = Some(i);
                    break;
                }
                return Err(Corruption {
                    record: i,
                    what: format!(
                        "{} bytes, shorter than a header, before the tail",
                        bytes.len()
                    ),
                });
            }
            let len_bytes: [u8; 4] = bytes[0..4].try_into().unwrap();
            let len_crc = u32::from_le_bytes(bytes[4..8].try_into().unwrap());
            if crc32fast::hash(&len_bytes) != len_crc {
                return Err(Corruption {
                    record: i,
                    what: "length CRC mismatch at byte offset 0".into(),
                });
            }
            let len = u32::from_le_bytes(len_bytes) as usize;
            if bytes.len() < HEADER + len {
                if last {
                    torn_at = Some(i);
                    break;
                }
                return Err(Corruption {
                    record: i,
                    what: format!("record of {len} bytes cut short before the tail"),
                });
            }
            if bytes.len() != HEADER + len {
                return Err(Corruption {
                    record: i,
                    what: format!(
                        "length field {len} does not match {} bytes",
                        bytes.len() - HEADER
                    ),
                });
            }
            let crc = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
            let payload = &bytes[HEADER..];
            if crc32fast::hash(payload) != crc {
                return Err(Corruption {
                    record: i,
                    what: "payload CRC mismatch at byte offset 8".into(),
                });
            }
            apply_record(&mut rec, payload).map_err(|what| Corruption { record: i, what })?;
        }
        if let Some(i) = torn_at {
            self.synced.truncate(i);
        }
        self.unsynced.clear();
        Ok(rec)
    }
}

fn u64_at(p: &[u8], off: &mut usize) -> Result<u64, String> {
    let b = p
        .get(*off..*off + 8)
        .ok_or_else(|| format!("truncated field at byte {}", *off))?;
    *off += 8;
    Ok(u64::from_le_bytes(b.try_into().unwrap()))
}

fn apply_record(rec: &mut Recovered, p: &[u8]) -> Result<(), String> {
    let mut off = 1;
    match p.first() {
        Some(&TAG_ENTRIES) => {
            let from = u64_at(p, &mut off)?;
            let count = u64_at(p, &mut off)?;
            let base = rec.snapshot.as_ref().map_or(0, |(m, _)| m.index);
            if from <= base {
                return Err(format!(
                    "entries from {from} at or below the snapshot {base}"
                ));
            }
            let keep = (from - base - 1) as usize;
            if keep > rec.entries.len() {
                return Err(format!("entries from {from} leave a gap"));
            }
            rec.entries.truncate(keep);
            for _ in 0..count {
                let term = u64_at(p, &mut off)?;
                let index = u64_at(p, &mut off)?;
                let kind = *p.get(off).ok_or("truncated entry kind")?;
                off += 1;
                let len = u64_at(p, &mut off)? as usize;
                let data = p
                    .get(off..off + len)
                    .ok_or("truncated entry data")?
                    .to_vec();
                off += len;
                let kind = EntryKind::from_u8(kind).ok_or("bad entry kind")?;
                rec.entries.push(Entry {
                    term,
                    index,
                    kind,
                    data,
                });
            }
        }
        Some(&TAG_HARD_STATE) => {
            rec.hard_state = HardState {
                term: u64_at(p, &mut off)?,
                vote: u64_at(p, &mut off)?,
                commit: u64_at(p, &mut off)?,
            };
        }
        Some(&TAG_SNAPSHOT) => {
            let index = u64_at(p, &mut off)?;
            let term = u64_at(p, &mut off)?;
            let data = p[off..].to_vec();
            // Entries after the snapshot stay only if they continue it.
            let base = rec.snapshot.as_ref().map_or(0, |(m, _)| m.index);
            let mut kept = Vec::new();
            let covered = rec
                .entries
                .iter()
                .any(|e| e.index == index && e.term == term);
            if covered {
                kept = rec.entries.split_off((index - base) as usize);
            }
            rec.entries = kept;
            rec.snapshot = Some((SnapshotMeta { index, term }, data));
        }
        _ => return Err("unknown record tag".into()),
    }
    Ok(())
}

/// `LogStorage` over a `SimDisk`.
impl LogStorage for SimDisk {
    type Error = String;
    fn write_entries(&mut self, from: Index, entries: EntriesView<'_>) -> Result<(), String> {
        let mut p = vec![TAG_ENTRIES];
        p.extend_from_slice(&from.to_le_bytes());
        p.extend_from_slice(&(entries.len() as u64).to_le_bytes());
        for e in entries.iter() {
            p.extend_from_slice(&e.term.to_le_bytes());
            p.extend_from_slice(&e.index.to_le_bytes());
            p.push(e.kind.to_u8());
            p.extend_from_slice(&(e.data.len() as u64).to_le_bytes());
            p.extend_from_slice(&e.data);
        }
        self.unsynced.push(frame(&p));
        Ok(())
    }
    fn write_hard_state(&mut self, hs: &HardState) -> Result<(), String> {
        let mut p = vec![TAG_HARD_STATE];
        p.extend_from_slice(&hs.term.to_le_bytes());
        p.extend_from_slice(&hs.vote.to_le_bytes());
        p.extend_from_slice(&hs.commit.to_le_bytes());
        self.unsynced.push(frame(&p));
        Ok(())
    }
    fn write_snapshot(&mut self, meta: &SnapshotMeta, data: &[u8]) -> Result<(), String> {
        let mut p = vec![TAG_SNAPSHOT];
        p.extend_from_slice(&meta.index.to_le_bytes());
        p.extend_from_slice(&meta.term.to_le_bytes());
        p.extend_from_slice(data);
        self.unsynced.push(frame(&p));
        Ok(())
    }
    fn sync(&mut self) -> Result<(), String> {
        self.syncs += 1;
        let pending = std::mem::take(&mut self.unsynced);
        self.synced.extend(pending);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::EntriesView;

    fn entry(index: Index, term: u64) -> Entry {
        Entry {
            term,
            index,
            kind: EntryKind::Normal,
            data: vec![index as u8; 5],
        }
    }

    fn disk_with(entries: &[Entry], sync: bool) -> SimDisk {
        let mut d = SimDisk::new();
        d.write_hard_state(&HardState {
            term: 3,
            vote: 2,
            commit: 1,
        })
        .unwrap();
        d.write_entries(1, EntriesView::from_slice(entries))
            .unwrap();
        if sync {
            d.sync().unwrap();
        }
        d
    }

    #[test]
    fn synced_writes_survive_a_crash_and_unsynced_ones_may_not() {
        let mut d = disk_with(&[entry(1, 1), entry(2, 1)], true);
        d.write_entries(3, EntriesView::from_slice(&[entry(3, 2)]))
            .unwrap();
        let mut lost = 0;
        for seed in 0..20 {
            let mut copy = SimDisk {
                synced: d.synced.clone(),
                unsynced: d.unsynced.clone(),
                syncs: 0,
            };
            copy.crash(&mut Rng::new(seed));
            let r = copy.recover().expect("a crash is not corruption");
            assert_eq!(r.hard_state.vote, 2);
            assert!(r.entries.len() >= 2);
            if r.entries.len() == 2 {
                lost += 1;
            }
        }
        assert!(lost > 0, "some crashes lose the unsynced write");
    }

    #[test]
    fn a_torn_tail_is_dropped_and_a_flipped_bit_refuses_recovery() {
        let mut d = disk_with(&[entry(1, 1), entry(2, 1)], true);
        let mut torn = d.synced.clone();
        let last = torn.last_mut().unwrap();
        last.truncate(last.len() - 3);
        let mut t = SimDisk {
            synced: torn,
            unsynced: Vec::new(),
            syncs: 0,
        };
        let r = t.recover().unwrap();
        assert!(r.entries.is_empty(), "the torn record is dropped");
        // Every single-bit flip of synced data is detected.
        for rec in 0..d.synced.len() {
            for byte in 0..d.synced[rec].len() {
                let mut c = SimDisk {
                    synced: d.synced.clone(),
                    unsynced: Vec::new(),
                    syncs: 0,
                };
                c.synced[rec][byte] ^= 0x10;
                assert!(
                    c.recover().is_err(),
                    "flip in record {rec} byte {byte} went unnoticed"
                );
            }
        }
        assert!(d.recover().is_ok());
    }

    #[test]
    fn snapshots_and_truncations_replay() {
        let mut d = disk_with(&[entry(1, 1), entry(2, 1), entry(3, 1)], false);
        d.write_entries(3, EntriesView::from_slice(&[entry(3, 2), entry(4, 2)]))
            .unwrap();
        d.write_snapshot(&SnapshotMeta { index: 2, term: 1 }, b"state")
            .unwrap();
        d.sync().unwrap();
        let r = d.recover().unwrap();
        assert_eq!(r.snapshot.as_ref().unwrap().0.index, 2);
        let idx: Vec<_> = r.entries.iter().map(|e| (e.index, e.term)).collect();
        assert_eq!(idx, vec![(3, 2), (4, 2)]);
    }
}
