//! The peer handshake: a pure state machine (bytes in, bytes out, no I/O, no clock).
//!
//! Three messages on a fresh TCP connection, before any frame. The dialling member is the
//! initiator I, the accepting member the responder R:
//!
//! ```text
//! I -> R  Hello      from = I, to = R, nonce_i, the ids of the keys I holds (1 or 2)
//! R -> I  Challenge  from = R, to = I, nonce_r, the id of the chosen key K, mac_r
//! I -> R  Proof      mac_i
//! ```
//!
//! Every message starts with an 8-byte header, then its body (integers little-endian):
//!
//! ```text
//! header     0  4  magic "VGLH"
//!            4  1  version (VERSION)
//!            5  1  type: 1 hello, 2 challenge, 3 proof
//!            6  2  body length, exactly the type's (hello: 57 or 65)
//! hello      0  8  from node id      8  8  to node id     16 32  nonce_i
//!           48  1  key count (1..=2) 49  8 each: key ids, distinct
//! challenge  0  8  from node id      8  8  to node id     16 32  nonce_r
//!           48  8  chosen key id    56 32  mac_r
//! proof      0 32  mac_i
//! ```
//!
//! The transcript T is the complete Hello message followed by the Challenge message
//! without its mac (header and the first 56 body bytes). It holds the protocol version,
//! both node ids, both nonces, the offered and the chosen key. With K the chosen key:
//!
//! ```text
//! mac_r       = HMAC-SHA256(K, "vigil-auth v1 responder proof\0" || T)
//! mac_i       = HMAC-SHA256(K, "vigil-auth v1 initiator proof\0" || T)
//! key I -> R  = HMAC-SHA256(K, "vigil-auth v1 session initiator->responder\0" || T)
//! key R -> I  = HMAC-SHA256(K, "vigil-auth v1 session responder->initiator\0" || T)
//! ```
//!
//! Why this resists the usual attacks:
//! - Replay: each side's MAC covers the nonce it chose itself for this connection, so a
//!   recorded Challenge or Proof fails against a new nonce.
//! - Reflection: the two proofs carry different labels, so a responder's mac_r is never
//!   a valid mac_i (and a node refuses a peer claiming its own id).
//! - Tampering and misdirection: both ids, both nonces and the key offer are in T, so
//!   any change makes the MACs disagree; R refuses a Hello addressed to another id, I
//!   refuses a Challenge from anyone but the member it dialled.
//! - Strangers: R refuses a Hello from an id outside the membership before answering.
//! - The session keys are fresh per connection (both nonces) and per direction, so
//!   frames cannot be replayed across connections or reflected back to their sender.
//!
//! R shows mac_r (proof of the key) to an initiator that has not proven anything yet.
//! That lets a stranger collect MACs of transcripts that contain R's fresh nonce and the
//! responder label: useless for anything else.
//!
//! Key choice: R picks the first of its own keys (current, then next) that I offered;
//! none in common refuses the connection. This is what lets a rolling restart move a
//! cluster to a new key without downtime (see the `auth` module docs).

use std::fmt;

use hmac::Mac;

use super::key::{fill_random, ClusterKey, KeyId, KeyRing, KEY_ID_BYTES};
use super::session::{Session, SESSION_KEY_BYTES};
use crate::config::NodeId;

pub const MAGIC: [u8; 4] = *b"VGLH";
pub const VERSION: u8 = 1;
pub const HEADER_BYTES: usize = 8;
pub const NONCE_BYTES: usize = 32;
pub const MAC_BYTES: usize = 32;
/// Keys one node may hold at once (current and next).
pub const MAX_OFFERED_KEYS: usize = 2;

const TYPE_HELLO: u8 = 1;
const TYPE_CHALLENGE: u8 = 2;
const TYPE_PROOF: u8 = 3;

const HELLO_FIXED_BYTES: usize = 8 + 8 + NONCE_BYTES + 1;
const CHALLENGE_BODY_BYTES: usize = 8 + 8 + NONCE_BYTES + KEY_ID_BYTES + MAC_BYTES;
const PROOF_BODY_BYTES: usize = MAC_BYTES;
/// The largest Hello (offering two keys).
pub const MAX_HELLO_BYTES: usize =
    HEADER_BYTES + HELLO_FIXED_BYTES + MAX_OFFERED_KEYS * KEY_ID_BYTES;
/// The largest handshake message (the Challenge).
pub const MAX_MESSAGE_BYTES: usize = HEADER_BYTES + CHALLENGE_BODY_BYTES;
const MAX_TRANSCRIPT_BYTES: usize = MAX_HELLO_BYTES + HEADER_BYTES + CHALLENGE_BODY_BYTES;

const _: () = assert!(MAX_MESSAGE_BYTES >= MAX_HELLO_BYTES);
const _: () = assert!(MAX_MESSAGE_BYTES >= HEADER_BYTES + PROOF_BODY_BYTES);
const _: () = assert!(MAX_MESSAGE_BYTES <= u16::MAX as usize);

const LABEL_RESPONDER_PROOF: &[u8] = b"vigil-auth v1 responder proof\0";
const LABEL_INITIATOR_PROOF: &[u8] = b"vigil-auth v1 initiator proof\0";
const LABEL_KEY_I_TO_R: &[u8] = b"vigil-auth v1 session initiator->responder\0";
const LABEL_KEY_R_TO_I: &[u8] = b"vigil-auth v1 session responder->initiator\0";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub from: NodeId,
    pub to: NodeId,
    pub nonce: [u8; NONCE_BYTES],
    /// Offered keys, the sender's current key first.
    pub keys: Vec<KeyId>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    pub from: NodeId,
    pub to: NodeId,
    pub nonce: [u8; NONCE_BYTES],
    pub key: KeyId,
    pub mac: [u8; MAC_BYTES],
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proof {
    pub mac: [u8; MAC_BYTES],
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    Challenge(Challenge),
    Proof(Proof),
}

impl Message {
    fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Challenge(_) => "challenge",
            Message::Proof(_) => "proof",
        }
    }

    /// Appends the encoded message to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let (kind, body_len) = match self {
            Message::Hello(h) => {
                assert!(
                    (1..=MAX_OFFERED_KEYS).contains(&h.keys.len()),
                    "a hello offers one or two keys"
                );
                (TYPE_HELLO, HELLO_FIXED_BYTES + h.keys.len() * KEY_ID_BYTES)
            }
            Message::Challenge(_) => (TYPE_CHALLENGE, CHALLENGE_BODY_BYTES),
            Message::Proof(_) => (TYPE_PROOF, PROOF_BODY_BYTES),
        };
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(kind);
        out.extend_from_slice(&(body_len as u16).to_le_bytes());
        match self {
            Message::Hello(h) => {
                out.extend_from_slice(&h.from.to_le_bytes());
                out.extend_from_slice(&h.to.to_le_bytes());
                out.extend_from_slice(&h.nonce);
                out.push(h.keys.len() as u8);
                for key in &h.keys {
                    out.extend_from_slice(&key.0);
                }
            }
            Message::Challenge(c) => {
                out.extend_from_slice(&c.from.to_le_bytes());
                out.extend_from_slice(&c.to.to_le_bytes());
                out.extend_from_slice(&c.nonce);
                out.extend_from_slice(&c.key.0);
                out.extend_from_slice(&c.mac);
            }
            Message::Proof(p) => out.extend_from_slice(&p.mac),
        }
    }
}

/// Why a handshake failed. The caller closes the connection and counts [`Self::reason`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandshakeError {
    /// Bytes that are not a handshake message; `offset` is within the message.
    Malformed { offset: usize, what: String },
    /// A well-formed message of the wrong kind for this step.
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
    /// The peer sent bytes before it was its turn.
    SentAhead { bytes: usize },
    /// The peer claims this node's own id (a reflection or a node dialling itself).
    OwnId { id: NodeId },
    /// The Hello is addressed to another member.
    WrongDestination { to: NodeId, me: NodeId },
    /// The Challenge comes from another member than the one dialled.
    WrongPeer { expected: NodeId, got: NodeId },
    /// The peer is not a member of the cluster.
    UnknownNode { id: NodeId },
    /// The peer's nonce equals ours (a reflected message or a broken random source).
    NonceReused,
    /// No key both sides hold.
    NoCommonKey {
        offered: Vec<KeyId>,
        held: Vec<KeyId>,
    },
    /// The peer's MAC is wrong: it does not hold the key, or the messages were altered.
    BadProof { peer: NodeId },
    /// The handshake already failed or finished; the connection must be closed.
    Finished,
}

impl HandshakeError {
    /// A short, fixed name for metrics labels and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeError::Malformed { .. } => "malformed",
            HandshakeError::Unexpected { .. } => "unexpected_message",
            HandshakeError::SentAhead { .. } => "sent_ahead",
            HandshakeError::OwnId { .. } => "own_id",
            HandshakeError::WrongDestination { .. } => "wrong_destination",
            HandshakeError::WrongPeer { .. } => "wrong_peer",
            HandshakeError::UnknownNode { .. } => "unknown_node",
            HandshakeError::NonceReused => "nonce_reused",
            HandshakeError::NoCommonKey { .. } => "no_common_key",
            HandshakeError::BadProof { .. } => "bad_proof",
            HandshakeError::Finished => "finished",
        }
    }
}

fn ids(keys: &[KeyId]) -> String {
    keys.iter()
        .map(|k| k.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeError::Malformed { offset, what } => {
                write!(f, "malformed handshake message at byte {offset}: {what}")
            }
            HandshakeError::Unexpected { expected, got } => {
                write!(f, "expected a handshake {expected}, got a {got}")
            }
            HandshakeError::SentAhead { bytes } => write!(
                f,
                "the peer sent {bytes} bytes before its turn in the handshake"
            ),
            HandshakeError::OwnId { id } => {
                write!(f, "the peer claims this node's own id {id}")
            }
            HandshakeError::WrongDestination { to, me } => {
                write!(f, "the hello is addressed to node {to}, this is node {me}")
            }
            HandshakeError::WrongPeer { expected, got } => {
                write!(f, "dialled node {expected}, but node {got} answered")
            }
            HandshakeError::UnknownNode { id } => {
                write!(f, "node {id} is not a member of the cluster")
            }
            HandshakeError::NonceReused => write!(f, "the peer's nonce equals ours"),
            HandshakeError::NoCommonKey { offered, held } => write!(
                f,
                "no cluster key in common: the peer holds key ids [{}], this node [{}]",
                ids(offered),
                ids(held)
            ),
            HandshakeError::BadProof { peer } => write!(
                f,
                "node {peer} failed to prove it holds the cluster key (wrong key or altered messages)"
            ),
            HandshakeError::Finished => write!(f, "the handshake is over"),
        }
    }
}

impl std::error::Error for HandshakeError {}

fn malformed<T>(offset: usize, what: impl Into<String>) -> Result<T, HandshakeError> {
    Err(HandshakeError::Malformed {
        offset,
        what: what.into(),
    })
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(raw)
}

fn array_at<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut raw = [0u8; N];
    raw.copy_from_slice(&bytes[at..at + N]);
    raw
}

/// Decodes the handshake message at the start of `bytes`: `Ok(None)` while incomplete,
/// `Ok(Some((message, length)))` once whole. Wrong magic, version, type or length is
/// refused as soon as the header bytes show it. Never panics.
pub fn decode(bytes: &[u8]) -> Result<Option<(Message, usize)>, HandshakeError> {
    let magic_seen = bytes.len().min(MAGIC.len());
    if bytes[..magic_seen] != MAGIC[..magic_seen] {
        return malformed(0, "bad magic: not a Vigil peer handshake");
    }
    if let Some(&version) = bytes.get(4) {
        if version != VERSION {
            return malformed(
                4,
                format!(
                    "handshake version {version} is not supported (this node speaks {VERSION})"
                ),
            );
        }
    }
    let kind = match bytes.get(5) {
        Some(&kind @ (TYPE_HELLO | TYPE_CHALLENGE | TYPE_PROOF)) => kind,
        Some(&other) => return malformed(5, format!("unknown handshake message type {other}")),
        None => return Ok(None),
    };
    let Some(len_bytes) = bytes.get(6..8) else {
        return Ok(None);
    };
    let body_len = u16::from_le_bytes([len_bytes[0], len_bytes[1]]) as usize;
    let length_ok = match kind {
        TYPE_HELLO => {
            (1..=MAX_OFFERED_KEYS).any(|keys| body_len == HELLO_FIXED_BYTES + keys * KEY_ID_BYTES)
        }
        TYPE_CHALLENGE => body_len == CHALLENGE_BODY_BYTES,
        _ => body_len == PROOF_BODY_BYTES,
    };
    if !length_ok {
        return malformed(6, format!("body length {body_len} is wrong for this type"));
    }
    let Some(body) = bytes.get(HEADER_BYTES..HEADER_BYTES + body_len) else {
        return Ok(None);
    };
    let at = |offset: usize| HEADER_BYTES + offset;
    let message = match kind {
        TYPE_HELLO => {
            let from = u64_at(body, 0);
            let to = u64_at(body, 8);
            if from == 0 {
                return malformed(at(0), "hello.from is node id 0 (reserved)");
            }
            if to == 0 {
                return malformed(at(8), "hello.to is node id 0 (reserved)");
            }
            let count = body[48] as usize;
            if body_len != HELLO_FIXED_BYTES + count * KEY_ID_BYTES {
                return malformed(
                    at(48),
                    format!("hello.key_count {count} does not match the body length {body_len}"),
                );
            }
            let keys: Vec<KeyId> = (0..count)
                .map(|i| KeyId(array_at(body, HELLO_FIXED_BYTES + i * KEY_ID_BYTES)))
                .collect();
            if count == 2 && keys[0] == keys[1] {
                return malformed(at(HELLO_FIXED_BYTES), "hello offers the same key twice");
            }
            Message::Hello(Hello {
                from,
                to,
                nonce: array_at(body, 16),
                keys,
            })
        }
        TYPE_CHALLENGE => {
            let from = u64_at(body, 0);
            let to = u64_at(body, 8);
            if from == 0 {
                return malformed(at(0), "challenge.from is node id 0 (reserved)");
            }
            if to == 0 {
                return malformed(at(8), "challenge.to is node id 0 (reserved)");
            }
            Message::Challenge(Challenge {
                from,
                to,
                nonce: array_at(body, 16),
                key: KeyId(array_at(body, 48)),
                mac: array_at(body, 56),
            })
        }
        _ => Message::Proof(Proof {
            mac: array_at(body, 0),
        }),
    };
    Ok(Some((message, HEADER_BYTES + body_len)))
}

/// A fresh nonce from getrandom(2).
pub fn fresh_nonce() -> std::io::Result<[u8; NONCE_BYTES]> {
    let mut nonce = [0u8; NONCE_BYTES];
    fill_random(&mut nonce)?;
    Ok(nonce)
}

/// What one [`Handshake::receive`] call did.
#[derive(Debug)]
pub enum Step {
    /// The message is not complete yet: call again with more bytes (nothing consumed).
    NeedMore,
    /// A message was consumed and the answer appended to `out`; wait for the next one.
    Continue { consumed: usize },
    /// The peer is authenticated. `consumed` bytes were the handshake; any bytes after
    /// them are the peer's first frames. Whatever was appended to `out` must be sent.
    /// (Boxed: it happens once per connection, and keeps `Step` small.)
    Established(Box<Established>),
}

#[derive(Debug)]
pub struct Established {
    pub consumed: usize,
    pub peer: NodeId,
    /// The key the two nodes agreed on.
    pub key: KeyId,
    pub session: Session,
}

enum State {
    /// Initiator: Hello sent, waiting for the Challenge.
    AwaitChallenge { peer: NodeId },
    /// Responder: waiting for the Hello.
    AwaitHello,
    /// Responder: Challenge sent, waiting for the Proof.
    AwaitProof { peer: NodeId, key: ClusterKey },
    /// Established or failed: nothing more is accepted.
    Over,
}

/// One side of the handshake on one connection.
pub struct Handshake {
    me: NodeId,
    keys: KeyRing,
    nonce: [u8; NONCE_BYTES],
    state: State,
    /// The Hello and, once known, the Challenge without its mac.
    transcript: Vec<u8>,
}

impl Handshake {
    /// The dialling side: appends the Hello to `out` (send it first).
    pub fn initiator(
        keys: &KeyRing,
        me: NodeId,
        peer: NodeId,
        nonce: [u8; NONCE_BYTES],
        out: &mut Vec<u8>,
    ) -> Handshake {
        assert!(me != 0 && peer != 0, "node id 0 is reserved");
        let hello = Message::Hello(Hello {
            from: me,
            to: peer,
            nonce,
            keys: keys.keys().map(ClusterKey::id).collect(),
        });
        let mut transcript = Vec::with_capacity(MAX_TRANSCRIPT_BYTES);
        hello.encode(&mut transcript);
        out.extend_from_slice(&transcript);
        Handshake {
            me,
            keys: keys.clone(),
            nonce,
            state: State::AwaitChallenge { peer },
            transcript,
        }
    }

    /// The accepting side: waits for a Hello.
    pub fn responder(keys: &KeyRing, me: NodeId, nonce: [u8; NONCE_BYTES]) -> Handshake {
        assert!(me != 0, "node id 0 is reserved");
        Handshake {
            me,
            keys: keys.clone(),
            nonce,
            state: State::AwaitHello,
            transcript: Vec::with_capacity(MAX_TRANSCRIPT_BYTES),
        }
    }

    /// Feeds the bytes received so far (from the start of the unconsumed input).
    /// `is_member` says whether a node id belongs to the cluster. Answers go to `out`.
    /// After an error, or once established, every call fails with `Finished`. On an
    /// error nothing is appended to `out`: close the connection without answering.
    pub fn receive(
        &mut self,
        input: &[u8],
        is_member: &dyn Fn(NodeId) -> bool,
        out: &mut Vec<u8>,
    ) -> Result<Step, HandshakeError> {
        let state = std::mem::replace(&mut self.state, State::Over);
        let result = self.step(state, input, is_member, out);
        if result.is_err() {
            self.state = State::Over;
        }
        result
    }

    fn step(
        &mut self,
        state: State,
        input: &[u8],
        is_member: &dyn Fn(NodeId) -> bool,
        out: &mut Vec<u8>,
    ) -> Result<Step, HandshakeError> {
        if matches!(state, State::Over) {
            return Err(HandshakeError::Finished);
        }
        let Some((message, consumed)) = decode(input)? else {
            self.state = state;
            return Ok(Step::NeedMore);
        };
        match (state, message) {
            (State::AwaitHello, Message::Hello(hello)) => {
                if input.len() > consumed {
                    return Err(HandshakeError::SentAhead {
                        bytes: input.len() - consumed,
                    });
                }
                self.on_hello(hello, &input[..consumed], is_member, out)?;
                Ok(Step::Continue { consumed })
            }
            (State::AwaitChallenge { peer }, Message::Challenge(challenge)) => {
                if input.len() > consumed {
                    return Err(HandshakeError::SentAhead {
                        bytes: input.len() - consumed,
                    });
                }
                let (key, session) = self.on_challenge(peer, challenge, is_member, out)?;
                Ok(Step::Established(Box::new(Established {
                    consumed,
                    peer,
                    key,
                    session,
                })))
            }
            (State::AwaitProof { peer, key }, Message::Proof(proof)) => {
                let mut mac = key.mac();
                mac.update(LABEL_INITIATOR_PROOF);
                mac.update(&self.transcript);
                // verify_slice compares in constant time.
                if mac.verify_slice(&proof.mac).is_err() {
                    return Err(HandshakeError::BadProof { peer });
                }
                let session = Session::new(
                    &derive(&key, LABEL_KEY_R_TO_I, &self.transcript),
                    &derive(&key, LABEL_KEY_I_TO_R, &self.transcript),
                );
                Ok(Step::Established(Box::new(Established {
                    consumed,
                    peer,
                    key: key.id(),
                    session,
                })))
            }
            (state, message) => Err(HandshakeError::Unexpected {
                expected: match state {
                    State::AwaitHello => "hello",
                    State::AwaitChallenge { .. } => "challenge",
                    _ => "proof",
                },
                got: message.name(),
            }),
        }
    }

    fn on_hello(
        &mut self,
        hello: Hello,
        hello_bytes: &[u8],
        is_member: &dyn Fn(NodeId) -> bool,
        out: &mut Vec<u8>,
    ) -> Result<(), HandshakeError> {
        if hello.from == self.me {
            return Err(HandshakeError::OwnId { id: hello.from });
        }
        if hello.to != self.me {
            return Err(HandshakeError::WrongDestination {
                to: hello.to,
                me: self.me,
            });
        }
        if !is_member(hello.from) {
            return Err(HandshakeError::UnknownNode { id: hello.from });
        }
        if hello.nonce == self.nonce {
            return Err(HandshakeError::NonceReused);
        }
        let Some(key) = self
            .keys
            .keys()
            .find(|key| hello.keys.contains(&key.id()))
            .cloned()
        else {
            return Err(HandshakeError::NoCommonKey {
                offered: hello.keys,
                held: self.keys.keys().map(ClusterKey::id).collect(),
            });
        };
        let mut challenge = Challenge {
            from: self.me,
            to: hello.from,
            nonce: self.nonce,
            key: key.id(),
            mac: [0; MAC_BYTES],
        };
        self.transcript.clear();
        self.transcript.extend_from_slice(hello_bytes);
        let challenge_start = self.transcript.len();
        Message::Challenge(challenge.clone()).encode(&mut self.transcript);
        self.transcript.truncate(self.transcript.len() - MAC_BYTES);
        let mut mac = key.mac();
        mac.update(LABEL_RESPONDER_PROOF);
        mac.update(&self.transcript);
        challenge.mac = mac.finalize().into_bytes().into();
        out.extend_from_slice(&self.transcript[challenge_start..]);
        out.extend_from_slice(&challenge.mac);
        self.state = State::AwaitProof {
            peer: hello.from,
            key,
        };
        Ok(())
    }

    fn on_challenge(
        &mut self,
        peer: NodeId,
        challenge: Challenge,
        is_member: &dyn Fn(NodeId) -> bool,
        out: &mut Vec<u8>,
    ) -> Result<(KeyId, Session), HandshakeError> {
        if challenge.from == self.me {
            return Err(HandshakeError::OwnId { id: challenge.from });
        }
        if challenge.from != peer {
            return Err(HandshakeError::WrongPeer {
                expected: peer,
                got: challenge.from,
            });
        }
        if challenge.to != self.me {
            return Err(HandshakeError::WrongDestination {
                to: challenge.to,
                me: self.me,
            });
        }
        if !is_member(peer) {
            return Err(HandshakeError::UnknownNode { id: peer });
        }
        if challenge.nonce == self.nonce {
            return Err(HandshakeError::NonceReused);
        }
        let Some(key) = self.keys.find(challenge.key).cloned() else {
            return Err(HandshakeError::NoCommonKey {
                offered: vec![challenge.key],
                held: self.keys.keys().map(ClusterKey::id).collect(),
            });
        };
        let mac_r = challenge.mac;
        let mut without_mac = Vec::with_capacity(HEADER_BYTES + CHALLENGE_BODY_BYTES);
        Message::Challenge(challenge).encode(&mut without_mac);
        without_mac.truncate(without_mac.len() - MAC_BYTES);
        self.transcript.extend_from_slice(&without_mac);

        let mut mac = key.mac();
        mac.update(LABEL_RESPONDER_PROOF);
        mac.update(&self.transcript);
        if mac.verify_slice(&mac_r).is_err() {
            return Err(HandshakeError::BadProof { peer });
        }
        let mut mac = key.mac();
        mac.update(LABEL_INITIATOR_PROOF);
        mac.update(&self.transcript);
        Message::Proof(Proof {
            mac: mac.finalize().into_bytes().into(),
        })
        .encode(out);
        let session = Session::new(
            &derive(&key, LABEL_KEY_I_TO_R, &self.transcript),
            &derive(&key, LABEL_KEY_R_TO_I, &self.transcript),
        );
        Ok((key.id(), session))
    }
}

fn derive(key: &ClusterKey, label: &[u8], transcript: &[u8]) -> [u8; SESSION_KEY_BYTES] {
    let mut mac = key.mac();
    mac.update(label);
    mac.update(transcript);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests;
