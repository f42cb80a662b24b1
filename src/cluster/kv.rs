//! The replicated metadata KV: small values under string keys, with revisions.
//!
//! A key's revision is the Raft index of the entry that last wrote it, so revisions only
//! grow and a compare-and-set (`if_revision`) names exactly one write. `if_revision = 0`
//! means "only if the key does not exist". Applying a command never fails: a command
//! that cannot be applied (limits, conflicts) yields an [`Outcome`] that says why, the
//! same on every node.
//!
//! Retried requests are answered by the cluster state's one dedup window
//! ([`super::dedup::DedupWindow`]), shared by every command; the store itself applies
//! whatever it is given.

use std::collections::BTreeMap;

use super::command::KvCommand;
use crate::codec::{self, DecodeError, Reader};
use crate::limits::{
    MAX_KV_KEYS, MAX_KV_KEY_BYTES, MAX_KV_TOTAL_BYTES, MAX_KV_VALUE_BYTES, MAX_REASON_BYTES,
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvEntry {
    pub value: Vec<u8>,
    /// Raft index of the write that created the key.
    pub create_revision: u64,
    /// Raft index of the latest write.
    pub mod_revision: u64,
}

/// What applying a KV command did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Stored {
        revision: u64,
    },
    Deleted {
        revision: u64,
    },
    NotFound,
    /// `if_revision` did not match; `current` is the key's revision (0: absent).
    Conflict {
        current: u64,
    },
    Rejected {
        reason: String,
    },
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvStore {
    entries: BTreeMap<String, KvEntry>,
    /// Key and value bytes held, against MAX_KV_TOTAL_BYTES.
    bytes_used: usize,
}

impl KvStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, key: &str) -> Option<&KvEntry> {
        self.entries.get(key)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Keys in order, starting at `from` (inclusive), at most `limit`.
    pub fn range(&self, from: &str, limit: usize) -> impl Iterator<Item = (&String, &KvEntry)> {
        self.entries.range(from.to_string()..).take(limit)
    }

    /// Applies `command`, committed at Raft `index` (deduplication is the caller's).
    pub fn apply(&mut self, index: u64, command: &KvCommand) -> Outcome {
        let outcome = self.apply_new(index, command);
        self.check_invariants();
        outcome
    }

    fn apply_new(&mut self, index: u64, command: &KvCommand) -> Outcome {
        let (key, if_revision) = match command {
            KvCommand::Put {
                key, if_revision, ..
            }
            | KvCommand::Delete { key, if_revision } => (key, *if_revision),
        };
        if key.is_empty() || key.len() > MAX_KV_KEY_BYTES {
            return Outcome::Rejected {
                reason: format!("key length {} is outside 1..={MAX_KV_KEY_BYTES}", key.len()),
            };
        }
        let current = self.entries.get(key.as_str()).map_or(0, |e| e.mod_revision);
        if let Some(expected) = if_revision {
            if expected != current {
                return Outcome::Conflict { current };
            }
        }
        match command {
            KvCommand::Put { value, .. } => self.put(index, key, value),
            KvCommand::Delete { .. } => match self.entries.remove(key.as_str()) {
                Some(old) => {
                    self.bytes_used -= key.len() + old.value.len();
                    Outcome::Deleted { revision: index }
                }
                None => Outcome::NotFound,
            },
        }
    }

    fn put(&mut self, index: u64, key: &str, value: &[u8]) -> Outcome {
        if value.len() > MAX_KV_VALUE_BYTES {
            return Outcome::Rejected {
                reason: format!(
                    "value of {} bytes exceeds {MAX_KV_VALUE_BYTES}",
                    value.len()
                ),
            };
        }
        let old = self.entries.get(key);
        if old.is_none() && self.entries.len() >= MAX_KV_KEYS {
            return Outcome::Rejected {
                reason: format!("the store holds its limit of {MAX_KV_KEYS} keys"),
            };
        }
        let freed = old.map_or(0, |e| key.len() + e.value.len());
        if self.bytes_used - freed + key.len() + value.len() > MAX_KV_TOTAL_BYTES {
            return Outcome::Rejected {
                reason: format!("the store would exceed its limit of {MAX_KV_TOTAL_BYTES} bytes"),
            };
        }
        let create_revision = old.map_or(index, |e| e.create_revision);
        assert!(
            old.is_none_or(|e| e.mod_revision < index),
            "revisions only grow"
        );
        self.bytes_used = self.bytes_used - freed + key.len() + value.len();
        self.entries.insert(
            key.to_string(),
            KvEntry {
                value: value.to_vec(),
                create_revision,
                mod_revision: index,
            },
        );
        Outcome::Stored { revision: index }
    }

    fn check_invariants(&self) {
        assert!(self.entries.len() <= MAX_KV_KEYS);
        assert!(self.bytes_used <= MAX_KV_TOTAL_BYTES);
    }

    /// Serialises the whole store (for Raft snapshots); deterministic for equal stores.
    pub fn encode(&self, out: &mut Vec<u8>) {
        codec::put_u32(out, self.entries.len() as u32);
        for (key, entry) in &self.entries {
            codec::put_bytes(out, key.as_bytes());
            codec::put_bytes(out, &entry.value);
            codec::put_u64(out, entry.create_revision);
            codec::put_u64(out, entry.mod_revision);
        }
    }

    /// Reads what [`KvStore::encode`] wrote; rejects anything else, naming the field.
    pub fn decode(reader: &mut Reader<'_>) -> Result<KvStore, DecodeError> {
        let mut store = KvStore::new();
        let count = reader.u32("kv.count")? as usize;
        if count > MAX_KV_KEYS {
            return Err(reader.invalid("kv.count", format!("{count} keys exceed {MAX_KV_KEYS}")));
        }
        let mut previous: Option<String> = None;
        for _ in 0..count {
            let key = reader.str("kv.key", MAX_KV_KEY_BYTES)?.to_string();
            if key.is_empty() || previous.as_ref().is_some_and(|p| *p >= key) {
                return Err(
                    reader.invalid("kv.key", "keys must be non-empty and strictly ascending")
                );
            }
            let value = reader.bytes("kv.value", MAX_KV_VALUE_BYTES)?.to_vec();
            let create_revision = reader.u64("kv.create_revision")?;
            let mod_revision = reader.u64("kv.mod_revision")?;
            if create_revision == 0 || create_revision > mod_revision {
                return Err(reader.invalid("kv.mod_revision", "revisions out of order"));
            }
            store.bytes_used += key.len() + value.len();
            if store.bytes_used > MAX_KV_TOTAL_BYTES {
                return Err(reader.invalid("kv.value", "the store exceeds its byte limit"));
            }
            previous = Some(key.clone());
            store.entries.insert(
                key,
                KvEntry {
                    value,
                    create_revision,
                    mod_revision,
                },
            );
        }
        Ok(store)
    }
}

/// Writes an outcome (the dedup window keeps them in snapshots).
pub fn encode_outcome(outcome: &Outcome, out: &mut Vec<u8>) {
    match outcome {
        Outcome::Stored { revision } => {
            codec::put_u8(out, 1);
            codec::put_u64(out, *revision);
        }
        Outcome::Deleted { revision } => {
            codec::put_u8(out, 2);
            codec::put_u64(out, *revision);
        }
        Outcome::NotFound => codec::put_u8(out, 3),
        Outcome::Conflict { current } => {
            codec::put_u8(out, 4);
            codec::put_u64(out, *current);
        }
        Outcome::Rejected { reason } => {
            codec::put_u8(out, 5);
            codec::put_bytes(out, reason.as_bytes());
        }
    }
}

/// Reads what [`encode_outcome`] wrote.
pub fn decode_outcome(reader: &mut Reader<'_>) -> Result<Outcome, DecodeError> {
    let at = reader.offset();
    Ok(match reader.u8("kv.outcome")? {
        1 => Outcome::Stored {
            revision: reader.u64("kv.outcome.revision")?,
        },
        2 => Outcome::Deleted {
            revision: reader.u64("kv.outcome.revision")?,
        },
        3 => Outcome::NotFound,
        4 => Outcome::Conflict {
            current: reader.u64("kv.outcome.current")?,
        },
        5 => Outcome::Rejected {
            reason: reader
                .str("kv.outcome.reason", MAX_REASON_BYTES)?
                .to_string(),
        },
        tag => {
            return Err(DecodeError {
                field: "kv.outcome",
                offset: at,
                problem: codec::Problem::Invalid(format!("unknown outcome tag {tag}")),
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &[u8], if_revision: Option<u64>) -> KvCommand {
        KvCommand::Put {
            key: key.into(),
            value: value.to_vec(),
            if_revision,
        }
    }

    #[test]
    fn revisions_and_compare_and_set() {
        let mut kv = KvStore::new();
        assert_eq!(
            kv.apply(5, &put("a", b"1", None)),
            Outcome::Stored { revision: 5 }
        );
        assert_eq!(
            kv.apply(6, &put("a", b"2", Some(4))),
            Outcome::Conflict { current: 5 }
        );
        assert_eq!(
            kv.apply(7, &put("a", b"2", Some(5))),
            Outcome::Stored { revision: 7 }
        );
        assert_eq!(kv.get("a").unwrap().create_revision, 5);
        assert_eq!(kv.get("a").unwrap().value, b"2");
        assert_eq!(
            kv.apply(8, &put("b", b"x", Some(0))),
            Outcome::Stored { revision: 8 }
        );
        assert_eq!(
            kv.apply(9, &put("b", b"y", Some(0))),
            Outcome::Conflict { current: 8 }
        );
        let delete = KvCommand::Delete {
            key: "a".into(),
            if_revision: None,
        };
        assert_eq!(kv.apply(10, &delete), Outcome::Deleted { revision: 10 });
        assert_eq!(kv.apply(11, &delete), Outcome::NotFound);
        assert_eq!(kv.len(), 1);
    }

    #[test]
    fn limits_reject_with_reasons() {
        let mut kv = KvStore::new();
        let big = vec![0u8; MAX_KV_VALUE_BYTES + 1];
        assert!(matches!(
            kv.apply(1, &put("k", &big, None)),
            Outcome::Rejected { .. }
        ));
        assert!(matches!(
            kv.apply(2, &put("", b"v", None)),
            Outcome::Rejected { .. }
        ));
        assert!(kv.is_empty());
    }

    #[test]
    fn snapshot_round_trip_and_rejects_garbage() {
        let mut kv = KvStore::new();
        for i in 1..50u64 {
            kv.apply(i, &put(&format!("key{}", i % 13), &i.to_le_bytes(), None));
        }
        let mut bytes = Vec::new();
        kv.encode(&mut bytes);
        let mut reader = Reader::new(&bytes);
        let copy = KvStore::decode(&mut reader).unwrap();
        reader.finish("kv").unwrap();
        assert_eq!(copy, kv);
        // Every truncation and many bit flips fail cleanly or decode to a valid store.
        for cut in 0..bytes.len() {
            assert!(KvStore::decode(&mut Reader::new(&bytes[..cut])).is_err());
        }
        for at in 0..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[at] ^= 0x41;
            if let Ok(store) = KvStore::decode(&mut Reader::new(&flipped)) {
                store.check_invariants();
            }
        }
    }
}
