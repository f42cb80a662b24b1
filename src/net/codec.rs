//! The peer wire's message codec: what travels inside a frame (`net::frame`).
//!
//! Frame kinds:
//!
//! | kind | name             | payload                                                   |
//! |------|------------------|-----------------------------------------------------------|
//! | 1    | (retired)        | was the unauthenticated hello; refused since the handshake  |
//! | 2    | raft             | a Raft message and its payload (entries or snapshot chunk) |
//! | 3    | forward request  | request id u64, method u8, path str, body bytes            |
//! | 4    | forward response | request id u64, status u16, body bytes                     |
//!
//! A connection starts with the peer handshake (`auth::handshake`), which proves the
//! peer's node id and cluster key; every frame after it carries a MAC (`auth::session`).
//! Decoding never panics: every failure is a [`DecodeError`] naming the field and byte
//! offset.

use crate::codec::{put_bool, put_bytes, put_u16, put_u32, put_u64, put_u8, DecodeError, Reader};
use crate::limits::{
    MAX_APPEND_BYTES, MAX_CONTROL_BODY_BYTES, MAX_ENTRIES_PER_APPEND, MAX_ENTRY_BYTES,
};
use crate::raft::{Body, Entry, EntryKind, Message, Payload};

pub const KIND_RAFT: u8 = 2;
pub const KIND_FORWARD_REQUEST: u8 = 3;
pub const KIND_FORWARD_RESPONSE: u8 = 4;

/// The longest control path a forwarded request may carry.
pub const MAX_FORWARD_PATH_BYTES: usize = 1024;

/// What a decoded Raft frame carries next to its message.
#[derive(Debug, PartialEq, Eq)]
pub enum OwnedPayload {
    None,
    Entries(Vec<Entry>),
    Chunk(Vec<u8>),
}

impl OwnedPayload {
    pub fn as_payload(&self) -> Payload<'_> {
        match self {
            OwnedPayload::None => Payload::None,
            OwnedPayload::Entries(e) => Payload::Entries(crate::raft::EntriesView::from_slice(e)),
            OwnedPayload::Chunk(c) => Payload::Chunk(c),
        }
    }
}

pub fn encode_message(m: &Message, payload: Payload<'_>, out: &mut Vec<u8>) {
    put_u64(out, m.from);
    put_u64(out, m.to);
    put_u64(out, m.term);
    match m.body {
        Body::PreVote {
            last_index,
            last_term,
        } => {
            put_u8(out, 1);
            put_u64(out, last_index);
            put_u64(out, last_term);
        }
        Body::PreVoteResp { granted } => {
            put_u8(out, 2);
            put_bool(out, granted);
        }
        Body::Vote {
            last_index,
            last_term,
            transfer,
        } => {
            put_u8(out, 3);
            put_u64(out, last_index);
            put_u64(out, last_term);
            put_bool(out, transfer);
        }
        Body::VoteResp { granted } => {
            put_u8(out, 4);
            put_bool(out, granted);
        }
        Body::Append {
            prev_index,
            prev_term,
            commit,
            count,
            read_seq,
            lease_seq,
            lease_incarnation,
            lease_index,
        } => {
            put_u8(out, 5);
            put_u64(out, prev_index);
            put_u64(out, prev_term);
            put_u64(out, commit);
            put_u32(out, count);
            put_u64(out, read_seq);
            put_u64(out, lease_seq);
            put_u64(out, lease_incarnation);
            put_u64(out, lease_index);
        }
        Body::AppendResp {
            success,
            index,
            hint_index,
            hint_term,
            read_seq,
            incarnation,
        } => {
            put_u8(out, 6);
            put_bool(out, success);
            put_u64(out, index);
            put_u64(out, hint_index);
            put_u64(out, hint_term);
            put_u64(out, read_seq);
            put_u64(out, incarnation);
        }
        Body::Snapshot {
            index,
            term,
            total,
            offset,
            len,
        } => {
            put_u8(out, 7);
            put_u64(out, index);
            put_u64(out, term);
            put_u64(out, total);
            put_u64(out, offset);
            put_u32(out, len);
        }
        Body::SnapshotResp { index, next_offset } => {
            put_u8(out, 8);
            put_u64(out, index);
            put_u64(out, next_offset);
        }
        Body::TimeoutNow => put_u8(out, 9),
        Body::ReadIndex { id } => {
            put_u8(out, 10);
            put_u64(out, id);
        }
        Body::ReadIndexResp { id, index, ok } => {
            put_u8(out, 11);
            put_u64(out, id);
            put_u64(out, index);
            put_bool(out, ok);
        }
    }
    match payload {
        Payload::None => put_u8(out, 0),
        Payload::Entries(view) => {
            put_u8(out, 1);
            put_u32(out, view.len() as u32);
            for e in view.iter() {
                put_u64(out, e.term);
                put_u64(out, e.index);
                put_u8(out, e.kind.to_u8());
                put_bytes(out, &e.data);
            }
        }
        Payload::Chunk(c) => {
            put_u8(out, 2);
            put_bytes(out, c);
        }
    }
}

pub fn decode_message(bytes: &[u8]) -> Result<(Message, OwnedPayload), DecodeError> {
    let mut r = Reader::new(bytes);
    let from = r.u64("raft.from")?;
    let to = r.u64("raft.to")?;
    let term = r.u64("raft.term")?;
    let body = match r.u8("raft.body")? {
        1 => Body::PreVote {
            last_index: r.u64("prevote.last_index")?,
            last_term: r.u64("prevote.last_term")?,
        },
        2 => Body::PreVoteResp {
            granted: r.bool("prevote_resp.granted")?,
        },
        3 => Body::Vote {
            last_index: r.u64("vote.last_index")?,
            last_term: r.u64("vote.last_term")?,
            transfer: r.bool("vote.transfer")?,
        },
        4 => Body::VoteResp {
            granted: r.bool("vote_resp.granted")?,
        },
        5 => Body::Append {
            prev_index: r.u64("append.prev_index")?,
            prev_term: r.u64("append.prev_term")?,
            commit: r.u64("append.commit")?,
            count: r.u32("append.count")?,
            read_seq: r.u64("append.read_seq")?,
            lease_seq: r.u64("append.lease_seq")?,
            lease_incarnation: r.u64("append.lease_incarnation")?,
            lease_index: r.u64("append.lease_index")?,
        },
        6 => Body::AppendResp {
            success: r.bool("append_resp.success")?,
            index: r.u64("append_resp.index")?,
            hint_index: r.u64("append_resp.hint_index")?,
            hint_term: r.u64("append_resp.hint_term")?,
            read_seq: r.u64("append_resp.read_seq")?,
            incarnation: r.u64("append_resp.incarnation")?,
        },
        7 => Body::Snapshot {
            index: r.u64("snapshot.index")?,
            term: r.u64("snapshot.term")?,
            total: r.u64("snapshot.total")?,
            offset: r.u64("snapshot.offset")?,
            len: r.u32("snapshot.len")?,
        },
        8 => Body::SnapshotResp {
            index: r.u64("snapshot_resp.index")?,
            next_offset: r.u64("snapshot_resp.next_offset")?,
        },
        9 => Body::TimeoutNow,
        10 => Body::ReadIndex {
            id: r.u64("read_index.id")?,
        },
        11 => Body::ReadIndexResp {
            id: r.u64("read_index_resp.id")?,
            index: r.u64("read_index_resp.index")?,
            ok: r.bool("read_index_resp.ok")?,
        },
        other => return Err(r.invalid("raft.body", format!("unknown message type {other}"))),
    };
    let payload = match r.u8("raft.payload")? {
        0 => OwnedPayload::None,
        1 => {
            let count = r.u32("entries.count")? as usize;
            if count > MAX_ENTRIES_PER_APPEND {
                return Err(r.invalid(
                    "entries.count",
                    format!("{count} entries exceed {MAX_ENTRIES_PER_APPEND}"),
                ));
            }
            let mut entries = Vec::with_capacity(count);
            for _ in 0..count {
                let term = r.u64("entry.term")?;
                let index = r.u64("entry.index")?;
                let kind = r.u8("entry.kind")?;
                let Some(kind) = EntryKind::from_u8(kind) else {
                    return Err(r.invalid("entry.kind", format!("unknown entry kind {kind}")));
                };
                let data = r.bytes("entry.data", MAX_ENTRY_BYTES)?.to_vec();
                entries.push(Entry {
                    term,
                    index,
                    kind,
                    data,
                });
            }
            OwnedPayload::Entries(entries)
        }
        2 => OwnedPayload::Chunk(r.bytes("snapshot.chunk", MAX_APPEND_BYTES)?.to_vec()),
        other => return Err(r.invalid("raft.payload", format!("unknown payload type {other}"))),
    };
    if let Body::Append { count, .. } = body {
        let have = match &payload {
            OwnedPayload::Entries(e) => e.len(),
            _ => 0,
        };
        if count as usize != have {
            return Err(r.invalid(
                "append.count",
                format!("says {count} entries, payload has {have}"),
            ));
        }
    }
    r.finish("raft")?;
    Ok((
        Message {
            from,
            to,
            term,
            body,
        },
        payload,
    ))
}

/// A control request relayed from a follower to the leader.
#[derive(Debug, PartialEq, Eq)]
pub struct ForwardRequest<'a> {
    pub id: u64,
    pub method: u8,
    pub path: &'a str,
    pub body: &'a [u8],
}

pub fn encode_forward_request(req: &ForwardRequest<'_>, out: &mut Vec<u8>) {
    put_u64(out, req.id);
    put_u8(out, req.method);
    put_bytes(out, req.path.as_bytes());
    put_bytes(out, req.body);
}

pub fn decode_forward_request(bytes: &[u8]) -> Result<ForwardRequest<'_>, DecodeError> {
    let mut r = Reader::new(bytes);
    let id = r.u64("forward.id")?;
    let method = r.u8("forward.method")?;
    let path = r.str("forward.path", MAX_FORWARD_PATH_BYTES)?;
    let body = r.bytes("forward.body", MAX_CONTROL_BODY_BYTES)?;
    r.finish("forward")?;
    Ok(ForwardRequest {
        id,
        method,
        path,
        body,
    })
}

pub fn encode_forward_response(id: u64, status: u16, body: &[u8], out: &mut Vec<u8>) {
    put_u64(out, id);
    put_u16(out, status);
    put_bytes(out, body);
}

pub fn decode_forward_response(bytes: &[u8]) -> Result<(u64, u16, &[u8]), DecodeError> {
    let mut r = Reader::new(bytes);
    let id = r.u64("forward_response.id")?;
    let status = r.u16("forward_response.status")?;
    let body = r.bytes("forward_response.body", MAX_CONTROL_BODY_BYTES)?;
    r.finish("forward_response")?;
    Ok((id, status, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::EntriesView;

    #[test]
    fn messages_round_trip() {
        let entries = vec![
            Entry {
                term: 3,
                index: 7,
                kind: EntryKind::Normal,
                data: b"abc".to_vec(),
            },
            Entry {
                term: 3,
                index: 8,
                kind: EntryKind::Noop,
                data: vec![],
            },
        ];
        let m = Message {
            from: 1,
            to: 2,
            term: 3,
            body: Body::Append {
                prev_index: 6,
                prev_term: 2,
                commit: 5,
                count: 2,
                read_seq: 9,
                lease_seq: 4,
                lease_incarnation: 0x0123_4567_89ab_cdef,
                lease_index: 11,
            },
        };
        let mut out = Vec::new();
        encode_message(
            &m,
            Payload::Entries(EntriesView::from_slice(&entries)),
            &mut out,
        );
        let (back, payload) = decode_message(&out).unwrap();
        assert_eq!(back, m);
        assert_eq!(payload, OwnedPayload::Entries(entries));
        // Every truncation is an error, never a panic.
        for cut in 0..out.len() {
            assert!(decode_message(&out[..cut]).is_err());
        }
        // An answer carries the answering process's incarnation.
        let resp = Message {
            from: 2,
            to: 1,
            term: 3,
            body: Body::AppendResp {
                success: true,
                index: 8,
                hint_index: 0,
                hint_term: 0,
                read_seq: 9,
                incarnation: 0xfedc_ba98_7654_3211,
            },
        };
        out.clear();
        encode_message(&resp, Payload::None, &mut out);
        assert_eq!(decode_message(&out).unwrap(), (resp, OwnedPayload::None));
        let e = decode_message(&out[..out.len() - 2]).unwrap_err();
        assert_eq!(e.field, "append_resp.incarnation");
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u64 = 0x1234_5678;
        for len in 0..400 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = decode_message(&bytes);
            let _ = decode_forward_request(&bytes);
            let _ = decode_forward_response(&bytes);
        }
    }

    #[test]
    fn append_count_must_match_payload() {
        let m = Message {
            from: 1,
            to: 2,
            term: 1,
            body: Body::Append {
                prev_index: 0,
                prev_term: 0,
                commit: 0,
                count: 1,
                read_seq: 0,
                lease_seq: 0,
                lease_incarnation: 0,
                lease_index: 0,
            },
        };
        let mut out = Vec::new();
        encode_message(&m, Payload::None, &mut out);
        let e = decode_message(&out).unwrap_err();
        assert_eq!(e.field, "append.count");
    }
}
