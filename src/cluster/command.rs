//! Commands of the replicated state machine, as they are stored in Raft log entries.
//!
//! ```text
//! u8   format version (COMMAND_VERSION)
//! u8   kind
//! u64  request id (0: not deduplicated)
//! ...  the kind's fields
//! ```
//!
//! Decoding is strict and never panics. A committed entry that does not decode is
//! applied as a rejected no-op with the decoder's message, identically on every node.

use crate::codec::{self, DecodeError, Problem, Reader};
use crate::limits::{MAX_KV_KEY_BYTES, MAX_KV_VALUE_BYTES};

pub const COMMAND_VERSION: u8 = 1;

/// A client request's identity: a retried request carries the same id, and the state
/// machine answers it from memory instead of applying it twice. Zero means none.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RequestId(pub u64);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvCommand {
    Put {
        key: String,
        value: Vec<u8>,
        /// Compare-and-set: write only if the key's revision is this (0: absent).
        if_revision: Option<u64>,
    },
    Delete {
        key: String,
        if_revision: Option<u64>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Kv(KvCommand),
}

const KIND_KV_PUT: u8 = 1;
const KIND_KV_DELETE: u8 = 2;

impl Command {
    pub fn encode(&self, request: RequestId, out: &mut Vec<u8>) {
        codec::put_u8(out, COMMAND_VERSION);
        match self {
            Command::Kv(KvCommand::Put {
                key,
                value,
                if_revision,
            }) => {
                codec::put_u8(out, KIND_KV_PUT);
                codec::put_u64(out, request.0);
                codec::put_bytes(out, key.as_bytes());
                put_optional(out, *if_revision);
                codec::put_bytes(out, value);
            }
            Command::Kv(KvCommand::Delete { key, if_revision }) => {
                codec::put_u8(out, KIND_KV_DELETE);
                codec::put_u64(out, request.0);
                codec::put_bytes(out, key.as_bytes());
                put_optional(out, *if_revision);
            }
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<(RequestId, Command), DecodeError> {
        let mut reader = Reader::new(bytes);
        let version = reader.u8("command.version")?;
        if version != COMMAND_VERSION {
            return Err(DecodeError {
                field: "command.version",
                offset: 0,
                problem: Problem::Invalid(format!(
                    "command format {version} is not supported (this node reads {COMMAND_VERSION})"
                )),
            });
        }
        let kind_at = reader.offset();
        let kind = reader.u8("command.kind")?;
        let request = RequestId(reader.u64("command.request_id")?);
        let command = match kind {
            KIND_KV_PUT => {
                let key = reader.str("kv_put.key", MAX_KV_KEY_BYTES)?.to_string();
                let if_revision = get_optional(&mut reader, "kv_put.if_revision")?;
                let value = reader.bytes("kv_put.value", MAX_KV_VALUE_BYTES)?.to_vec();
                Command::Kv(KvCommand::Put {
                    key,
                    value,
                    if_revision,
                })
            }
            KIND_KV_DELETE => {
                let key = reader.str("kv_delete.key", MAX_KV_KEY_BYTES)?.to_string();
                let if_revision = get_optional(&mut reader, "kv_delete.if_revision")?;
                Command::Kv(KvCommand::Delete { key, if_revision })
            }
            other => {
                return Err(DecodeError {
                    field: "command.kind",
                    offset: kind_at,
                    problem: Problem::Invalid(format!("unknown command kind {other}")),
                })
            }
        };
        reader.finish("command")?;
        Ok((request, command))
    }
}

fn put_optional(out: &mut Vec<u8>, value: Option<u64>) {
    codec::put_bool(out, value.is_some());
    codec::put_u64(out, value.unwrap_or(0));
}

fn get_optional(reader: &mut Reader<'_>, field: &'static str) -> Result<Option<u64>, DecodeError> {
    let present = reader.bool(field)?;
    let value = reader.u64(field)?;
    Ok(present.then_some(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let commands = [
            Command::Kv(KvCommand::Put {
                key: "vm/7".into(),
                value: b"{}".to_vec(),
                if_revision: Some(0),
            }),
            Command::Kv(KvCommand::Delete {
                key: "x".into(),
                if_revision: None,
            }),
        ];
        for (i, command) in commands.iter().enumerate() {
            let mut bytes = Vec::new();
            command.encode(RequestId(i as u64 + 1), &mut bytes);
            assert_eq!(
                Command::decode(&bytes).unwrap(),
                (RequestId(i as u64 + 1), command.clone())
            );
            for cut in 0..bytes.len() {
                assert!(Command::decode(&bytes[..cut]).is_err(), "cut {cut}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(Command::decode(&longer)
                .unwrap_err()
                .to_string()
                .contains("trailing"));
        }
    }

    #[test]
    fn names_what_is_wrong() {
        let error = Command::decode(&[9]).unwrap_err();
        assert!(error.to_string().contains("command format 9"), "{error}");
        let error = Command::decode(&[COMMAND_VERSION, 77, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap_err();
        assert_eq!(
            error.to_string(),
            "command.kind at byte 1: unknown command kind 77"
        );
        let mut huge_key = vec![COMMAND_VERSION, KIND_KV_PUT];
        huge_key.extend_from_slice(&[0; 8]);
        huge_key.extend_from_slice(&u32::MAX.to_le_bytes());
        let error = Command::decode(&huge_key).unwrap_err();
        assert!(error.to_string().contains("exceeds the limit"), "{error}");
    }
}
