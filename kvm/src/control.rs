//! The `vigil vmm` control protocol: framed, versioned, CRC-checked messages over a
//! Unix stream socket, and a blocking client.
//!
//! ```text
//! frame (little-endian):
//!   0  magic    u32   "VGVM"
//!   4  version  u16   PROTOCOL_VERSION
//!   6  type     u16   message type (below)
//!   8  length   u32   payload bytes; header + payload <= the configured max frame
//!   12 crc32    u32   CRC32 of bytes 0..12 followed by the payload
//!   16 payload
//! requests                          replies
//!   1 pause      (empty)              0x81 status   state u8, token u64, counter u64,
//!   2 resume     (empty)                            reports u64, lease_deadline_ns u64,
//!   3 snapshot   kind u8, path bytes                last_snapshot_id u64
//!   4 renew      token u64,           0x82 snapshot id u64, kind u8, pages u64,
//!                deadline_ns u64                    duration_ns u64
//!   5 status     (empty)              0x8F error    code u16, message (UTF-8)
//!   6 stop       (empty)
//! ```
//! Every request gets exactly one reply, in order. pause, resume, renew, status and stop
//! answer with a status; snapshot with a snapshot reply, sent once the snapshot's files
//! are written and fsynced (its `duration_ns` is how long the vCPUs were paused for it;
//! the writing happens after they resume); failures with an error. Requests behind a
//! snapshot on the same connection, and snapshots from other connections, wait until
//! it is written. A frame that
//! cannot be decoded gets an error reply and the connection is closed (the stream can
//! no longer be trusted to be in sync).
//!
//! Decoding is pure and never panics.

use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const MAGIC: [u8; 4] = *b"VGVM";
pub const PROTOCOL_VERSION: u16 = 1;
pub const HEADER_LEN: usize = 16;

pub const TYPE_PAUSE: u16 = 1;
pub const TYPE_RESUME: u16 = 2;
pub const TYPE_SNAPSHOT: u16 = 3;
pub const TYPE_RENEW: u16 = 4;
pub const TYPE_STATUS: u16 = 5;
pub const TYPE_STOP: u16 = 6;
pub const TYPE_STATUS_REPLY: u16 = 0x81;
pub const TYPE_SNAPSHOT_REPLY: u16 = 0x82;
pub const TYPE_ERROR_REPLY: u16 = 0x8F;

/// Error reply codes.
pub const ERROR_BAD_FRAME: u16 = 1;
pub const ERROR_BAD_REQUEST: u16 = 2;
pub const ERROR_STALE_TOKEN: u16 = 3;
pub const ERROR_FENCED: u16 = 4;
pub const ERROR_FAILED: u16 = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapshotKindWire {
    Full = 0,
    Diff = 1,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Pause,
    Resume,
    Snapshot {
        kind: SnapshotKindWire,
        path: PathBuf,
    },
    Renew {
        token: u64,
        deadline_ns: u64,
    },
    Status,
    Stop,
}

/// What the VM is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmmState {
    Running = 1,
    Paused = 2,
    /// The lease ran out: vCPUs paused until a renewal with the current token.
    Fenced = 3,
    /// A vCPU stopped on a guest or KVM failure.
    Failed = 4,
}

impl VmmState {
    fn from_u8(v: u8) -> Option<VmmState> {
        match v {
            1 => Some(VmmState::Running),
            2 => Some(VmmState::Paused),
            3 => Some(VmmState::Fenced),
            4 => Some(VmmState::Failed),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            VmmState::Running => "running",
            VmmState::Paused => "paused",
            VmmState::Fenced => "fenced",
            VmmState::Failed => "failed",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub state: VmmState,
    pub token: u64,
    /// The latest counter vCPU 0 reported.
    pub counter: u64,
    pub reports: u64,
    pub lease_deadline_ns: u64,
    /// The snapshot taken or restored last: the parent of the next diff (0 if none).
    pub last_snapshot_id: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Status(Status),
    Snapshot {
        snapshot_id: u64,
        kind: SnapshotKindWire,
        pages_written: u64,
        duration_ns: u64,
    },
    Error {
        code: u16,
        message: String,
    },
}

/// A frame or message that could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError {
    pub offset: usize,
    pub what: String,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (at byte {})", self.what, self.offset)
    }
}

impl std::error::Error for DecodeError {}

fn bad<T>(offset: usize, what: impl Into<String>) -> Result<T, DecodeError> {
    Err(DecodeError {
        offset,
        what: what.into(),
    })
}

fn encode_frame(kind: u16, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() <= u32::MAX as usize);
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&out);
    crc.update(payload);
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// One decoded frame: its type and payload.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub kind: u16,
    pub payload: &'a [u8],
}

/// Decodes the frame at the start of `buf`. `Ok(None)`: more bytes are needed;
/// `Ok(Some((frame, used)))`: a frame of `used` bytes. Oversized frames are rejected
/// as soon as their header is complete.
pub fn decode_frame(
    buf: &[u8],
    max_frame: usize,
) -> Result<Option<(Frame<'_>, usize)>, DecodeError> {
    let magic_seen = buf.len().min(4);
    if buf[..magic_seen] != MAGIC[..magic_seen] {
        return bad(0, "bad magic: not a vmm control frame");
    }
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let version = u16::from_le_bytes([buf[4], buf[5]]);
    if version != PROTOCOL_VERSION {
        return bad(4, format!("unsupported protocol version {version}"));
    }
    let kind = u16::from_le_bytes([buf[6], buf[7]]);
    let len = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
    if len > max_frame.saturating_sub(HEADER_LEN) {
        return bad(
            8,
            format!("frame of {len} payload bytes exceeds the limit of {max_frame} bytes"),
        );
    }
    if buf.len() - HEADER_LEN < len {
        return Ok(None);
    }
    let payload = &buf[HEADER_LEN..HEADER_LEN + len];
    let mut crc = crc32fast::Hasher::new();
    crc.update(&buf[..12]);
    crc.update(payload);
    let expected = u32::from_le_bytes([buf[12], buf[13], buf[14], buf[15]]);
    if crc.finalize() != expected {
        return bad(12, "frame CRC mismatch");
    }
    Ok(Some((Frame { kind, payload }, HEADER_LEN + len)))
}

fn u64_at(p: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&p[at..at + 8]);
    u64::from_le_bytes(a)
}

fn expect_len(frame: &Frame<'_>, len: usize, name: &str) -> Result<(), DecodeError> {
    if frame.payload.len() != len {
        return bad(
            HEADER_LEN,
            format!(
                "{name} payload is {} bytes, expected {len}",
                frame.payload.len()
            ),
        );
    }
    Ok(())
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Request::Pause => encode_frame(TYPE_PAUSE, &[]),
            Request::Resume => encode_frame(TYPE_RESUME, &[]),
            Request::Status => encode_frame(TYPE_STATUS, &[]),
            Request::Stop => encode_frame(TYPE_STOP, &[]),
            Request::Renew { token, deadline_ns } => {
                let mut p = Vec::with_capacity(16);
                p.extend_from_slice(&token.to_le_bytes());
                p.extend_from_slice(&deadline_ns.to_le_bytes());
                encode_frame(TYPE_RENEW, &p)
            }
            Request::Snapshot { kind, path } => {
                let mut p = vec![*kind as u8];
                p.extend_from_slice(path.as_os_str().as_bytes());
                encode_frame(TYPE_SNAPSHOT, &p)
            }
        }
    }

    pub fn decode(frame: &Frame<'_>) -> Result<Request, DecodeError> {
        match frame.kind {
            TYPE_PAUSE => expect_len(frame, 0, "pause").map(|_| Request::Pause),
            TYPE_RESUME => expect_len(frame, 0, "resume").map(|_| Request::Resume),
            TYPE_STATUS => expect_len(frame, 0, "status").map(|_| Request::Status),
            TYPE_STOP => expect_len(frame, 0, "stop").map(|_| Request::Stop),
            TYPE_RENEW => {
                expect_len(frame, 16, "renew")?;
                Ok(Request::Renew {
                    token: u64_at(frame.payload, 0),
                    deadline_ns: u64_at(frame.payload, 8),
                })
            }
            TYPE_SNAPSHOT => {
                let Some((&kind, path)) = frame.payload.split_first() else {
                    return bad(HEADER_LEN, "snapshot payload is empty");
                };
                let kind = match kind {
                    0 => SnapshotKindWire::Full,
                    1 => SnapshotKindWire::Diff,
                    k => {
                        return bad(
                            HEADER_LEN,
                            format!("snapshot kind {k} is neither 0 (full) nor 1 (diff)"),
                        )
                    }
                };
                if path.is_empty() {
                    return bad(HEADER_LEN + 1, "snapshot path is empty");
                }
                if let Some(nul) = path.iter().position(|&b| b == 0) {
                    return bad(HEADER_LEN + 1 + nul, "snapshot path contains NUL");
                }
                let path = PathBuf::from(std::ffi::OsStr::from_bytes(path));
                Ok(Request::Snapshot { kind, path })
            }
            other => bad(6, format!("unknown request type {other}")),
        }
    }
}

impl Reply {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Reply::Status(s) => {
                let mut p = Vec::with_capacity(41);
                p.push(s.state as u8);
                for v in [
                    s.token,
                    s.counter,
                    s.reports,
                    s.lease_deadline_ns,
                    s.last_snapshot_id,
                ] {
                    p.extend_from_slice(&v.to_le_bytes());
                }
                encode_frame(TYPE_STATUS_REPLY, &p)
            }
            Reply::Snapshot {
                snapshot_id,
                kind,
                pages_written,
                duration_ns,
            } => {
                let mut p = Vec::with_capacity(25);
                p.extend_from_slice(&snapshot_id.to_le_bytes());
                p.push(*kind as u8);
                p.extend_from_slice(&pages_written.to_le_bytes());
                p.extend_from_slice(&duration_ns.to_le_bytes());
                encode_frame(TYPE_SNAPSHOT_REPLY, &p)
            }
            Reply::Error { code, message } => {
                let mut p = code.to_le_bytes().to_vec();
                // Keep error messages well inside any sane frame limit.
                let mut end = message.len().min(1024);
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                p.extend_from_slice(&message.as_bytes()[..end]);
                encode_frame(TYPE_ERROR_REPLY, &p)
            }
        }
    }

    pub fn decode(frame: &Frame<'_>) -> Result<Reply, DecodeError> {
        let p = frame.payload;
        match frame.kind {
            TYPE_STATUS_REPLY => {
                expect_len(frame, 41, "status reply")?;
                let Some(state) = VmmState::from_u8(p[0]) else {
                    return bad(HEADER_LEN, format!("unknown VM state {}", p[0]));
                };
                Ok(Reply::Status(Status {
                    state,
                    token: u64_at(p, 1),
                    counter: u64_at(p, 9),
                    reports: u64_at(p, 17),
                    lease_deadline_ns: u64_at(p, 25),
                    last_snapshot_id: u64_at(p, 33),
                }))
            }
            TYPE_SNAPSHOT_REPLY => {
                expect_len(frame, 25, "snapshot reply")?;
                let kind = match p[8] {
                    0 => SnapshotKindWire::Full,
                    1 => SnapshotKindWire::Diff,
                    k => return bad(HEADER_LEN + 8, format!("snapshot kind {k}")),
                };
                Ok(Reply::Snapshot {
                    snapshot_id: u64_at(p, 0),
                    kind,
                    pages_written: u64_at(p, 9),
                    duration_ns: u64_at(p, 17),
                })
            }
            TYPE_ERROR_REPLY => {
                if p.len() < 2 {
                    return bad(HEADER_LEN, "error reply shorter than its code");
                }
                let Ok(message) = std::str::from_utf8(&p[2..]) else {
                    return bad(HEADER_LEN + 2, "error message is not UTF-8");
                };
                Ok(Reply::Error {
                    code: u16::from_le_bytes([p[0], p[1]]),
                    message: message.to_string(),
                })
            }
            other => bad(6, format!("unknown reply type {other}")),
        }
    }
}

/// A client failure: I/O, an undecodable reply, or the VMM closing the connection.
#[derive(Debug)]
pub struct ClientError(pub String);

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ClientError {}

/// A blocking client of one VMM's control socket.
pub struct Client {
    stream: UnixStream,
    buffer: Vec<u8>,
    max_frame: usize,
}

impl Client {
    pub fn connect(
        path: &Path,
        timeout: Duration,
        max_frame: usize,
    ) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path)
            .map_err(|e| ClientError(format!("connect {}: {e}", path.display())))?;
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|_| stream.set_write_timeout(Some(timeout)))
            .map_err(|e| ClientError(format!("socket timeouts: {e}")))?;
        Ok(Client {
            stream,
            buffer: Vec::new(),
            max_frame,
        })
    }

    /// Sends raw bytes (tests use this to send malformed frames).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream
            .write_all(bytes)
            .map_err(|e| ClientError(format!("send: {e}")))
    }

    /// Reads one reply.
    pub fn read_reply(&mut self) -> Result<Reply, ClientError> {
        loop {
            match decode_frame(&self.buffer, self.max_frame) {
                Err(e) => return Err(ClientError(format!("bad reply: {e}"))),
                Ok(Some((frame, used))) => {
                    let reply =
                        Reply::decode(&frame).map_err(|e| ClientError(format!("bad reply: {e}")));
                    self.buffer.drain(..used);
                    return reply;
                }
                Ok(None) => {}
            }
            let mut chunk = [0u8; 4096];
            let n = self
                .stream
                .read(&mut chunk)
                .map_err(|e| ClientError(format!("receive: {e}")))?;
            if n == 0 {
                return Err(ClientError("the VMM closed the connection".into()));
            }
            self.buffer.extend_from_slice(&chunk[..n]);
        }
    }

    pub fn call(&mut self, request: &Request) -> Result<Reply, ClientError> {
        self.send_raw(&request.encode())?;
        self.read_reply()
    }

    /// `call`, expecting a status reply.
    pub fn status_of(&mut self, request: &Request) -> Result<Status, ClientError> {
        match self.call(request)? {
            Reply::Status(s) => Ok(s),
            Reply::Error { code, message } => Err(ClientError(format!("error {code}: {message}"))),
            other => Err(ClientError(format!("unexpected reply {other:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let requests = [
            Request::Pause,
            Request::Resume,
            Request::Status,
            Request::Stop,
            Request::Renew {
                token: 7,
                deadline_ns: 99,
            },
            Request::Snapshot {
                kind: SnapshotKindWire::Diff,
                path: "/tmp/x y".into(),
            },
        ];
        for request in requests {
            let bytes = request.encode();
            let (frame, used) = decode_frame(&bytes, 4096).unwrap().unwrap();
            assert_eq!(used, bytes.len());
            assert_eq!(Request::decode(&frame).unwrap(), request);
        }
    }

    #[test]
    fn replies_round_trip() {
        let replies = [
            Reply::Status(Status {
                state: VmmState::Fenced,
                token: 3,
                counter: 4,
                reports: 5,
                lease_deadline_ns: 6,
                last_snapshot_id: 7,
            }),
            Reply::Snapshot {
                snapshot_id: 1,
                kind: SnapshotKindWire::Full,
                pages_written: 2,
                duration_ns: 3,
            },
            Reply::Error {
                code: ERROR_STALE_TOKEN,
                message: "stale".into(),
            },
        ];
        for reply in replies {
            let bytes = reply.encode();
            let (frame, _) = decode_frame(&bytes, 4096).unwrap().unwrap();
            assert_eq!(Reply::decode(&frame).unwrap(), reply);
        }
    }
}
