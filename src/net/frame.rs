//! Framing of the peer wire: every message travels in one frame.
//!
//! ```text
//! offset  size  field
//!      0     4  magic          "VGLF" (0x56 0x47 0x4c 0x46)
//!      4     1  version        FRAME_VERSION; a peer speaking another version is refused
//!      5     1  kind           what the payload is (the message codec's tag)
//!      6     2  flags          reserved, must be zero
//!      8     4  payload length little-endian, at most MAX_FRAME_BYTES - HEADER_BYTES
//!     12     4  crc32          of bytes 0..12 and the payload (IEEE CRC-32)
//!     16     n  payload
//! ```
//!
//! The header is checked as soon as its 16 bytes are in: a wrong magic, version, flags
//! or an oversized length is rejected before a single payload byte is buffered, so a
//! hostile or confused peer cannot make us reserve memory. Decoding never panics: every
//! failure is a [`FrameError`] that names the field, and the connection is then closed.

use std::fmt;

use crate::limits::MAX_FRAME_BYTES;

pub const MAGIC: [u8; 4] = *b"VGLF";
pub const FRAME_VERSION: u8 = 1;
pub const HEADER_BYTES: usize = 16;
/// The largest payload one frame may carry.
pub const MAX_PAYLOAD_BYTES: usize = MAX_FRAME_BYTES - HEADER_BYTES;

const _: () = assert!(MAX_FRAME_BYTES > HEADER_BYTES);
const _: () = assert!(MAX_FRAME_BYTES <= u32::MAX as usize);

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: u8,
    pub payload_len: u32,
    pub crc: u32,
}

impl FrameHeader {
    /// Header plus payload.
    pub fn frame_len(&self) -> usize {
        HEADER_BYTES + self.payload_len as usize
    }
}

/// Why bytes are not a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    BadMagic([u8; 4]),
    UnsupportedVersion(u8),
    ReservedFlags(u16),
    TooLarge { payload_len: u32 },
    BadChecksum { expected: u32, computed: u32 },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::BadMagic(m) => write!(f, "bad frame magic {m:02x?} (expected {MAGIC:02x?})"),
            FrameError::UnsupportedVersion(v) => {
                write!(f, "frame version {v} is not supported (this node speaks {FRAME_VERSION})")
            }
            FrameError::ReservedFlags(x) => write!(f, "reserved frame flags set: {x:#06x}"),
            FrameError::TooLarge { payload_len } => write!(
                f,
                "frame payload of {payload_len} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit"
            ),
            FrameError::BadChecksum { expected, computed } => write!(
                f,
                "frame checksum mismatch: header says {expected:#010x}, payload gives {computed:#010x}"
            ),
        }
    }
}

impl std::error::Error for FrameError {}

/// Checks the 16 header bytes at the start of `bytes`; `Ok(None)` while fewer are in.
pub fn decode_header(bytes: &[u8]) -> Result<Option<FrameHeader>, FrameError> {
    let Some(header) = bytes.get(..HEADER_BYTES) else {
        return Ok(None);
    };
    let magic = [header[0], header[1], header[2], header[3]];
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    if header[4] != FRAME_VERSION {
        return Err(FrameError::UnsupportedVersion(header[4]));
    }
    let flags = u16::from_le_bytes([header[6], header[7]]);
    if flags != 0 {
        return Err(FrameError::ReservedFlags(flags));
    }
    let payload_len = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if payload_len as usize > MAX_PAYLOAD_BYTES {
        return Err(FrameError::TooLarge { payload_len });
    }
    let crc = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
    Ok(Some(FrameHeader {
        kind: header[5],
        payload_len,
        crc,
    }))
}

/// A whole frame found at the start of a buffer; the payload is borrowed, not copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub kind: u8,
    pub payload: &'a [u8],
    /// Bytes of the buffer the frame used, header included.
    pub consumed: usize,
}

/// Decodes the frame at the start of `bytes`. `Ok(None)` means more bytes are needed.
pub fn decode(bytes: &[u8]) -> Result<Option<Frame<'_>>, FrameError> {
    let Some(header) = decode_header(bytes)? else {
        return Ok(None);
    };
    let Some(payload) = bytes.get(HEADER_BYTES..header.frame_len()) else {
        return Ok(None);
    };
    let computed = checksum(&bytes[..12], payload);
    if computed != header.crc {
        return Err(FrameError::BadChecksum {
            expected: header.crc,
            computed,
        });
    }
    Ok(Some(Frame {
        kind: header.kind,
        payload,
        consumed: header.frame_len(),
    }))
}

/// Appends one frame carrying `payload` to `out`. The payload must respect the limit:
/// producing an oversized frame is a bug in this node, not bad input.
pub fn encode(kind: u8, payload: &[u8], out: &mut Vec<u8>) {
    assert!(
        payload.len() <= MAX_PAYLOAD_BYTES,
        "frame payload over the limit"
    );
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.push(FRAME_VERSION);
    out.push(kind);
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let crc = checksum(&out[start..start + 12], payload);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
}

fn checksum(header_prefix: &[u8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(header_prefix);
    hasher.update(payload);
    hasher.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(kind, payload, &mut out);
        out
    }

    #[test]
    fn round_trips_and_streams() {
        let mut stream = frame(3, b"hello");
        stream.extend(frame(7, b""));
        stream.extend(frame(9, &[0xAB; 1000]));
        let mut offset = 0;
        let mut seen = Vec::new();
        while let Some(frame) = decode(&stream[offset..]).unwrap() {
            seen.push((frame.kind, frame.payload.len()));
            offset += frame.consumed;
        }
        assert_eq!(seen, vec![(3, 5), (7, 0), (9, 1000)]);
        assert_eq!(offset, stream.len());
    }

    #[test]
    fn every_prefix_asks_for_more() {
        let bytes = frame(1, b"a payload of some length");
        for cut in 0..bytes.len() {
            assert_eq!(decode(&bytes[..cut]), Ok(None), "prefix of {cut} bytes");
        }
    }

    #[test]
    fn rejects_bad_fields_by_name() {
        let good = frame(1, b"payload");
        let mut bad_magic = good.clone();
        bad_magic[0] = b'X';
        assert!(matches!(decode(&bad_magic), Err(FrameError::BadMagic(_))));
        let mut bad_version = good.clone();
        bad_version[4] = 2;
        assert_eq!(decode(&bad_version), Err(FrameError::UnsupportedVersion(2)));
        let mut bad_flags = good.clone();
        bad_flags[6] = 1;
        assert_eq!(decode(&bad_flags), Err(FrameError::ReservedFlags(1)));
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 0x10;
        assert!(matches!(
            decode(&flipped),
            Err(FrameError::BadChecksum { .. })
        ));
        let mut flipped_kind = good.clone();
        flipped_kind[5] ^= 1;
        assert!(matches!(
            decode(&flipped_kind),
            Err(FrameError::BadChecksum { .. })
        ));
    }

    #[test]
    fn oversized_length_is_refused_from_the_header_alone() {
        let mut header = frame(1, b"")[..HEADER_BYTES].to_vec();
        header[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            decode(&header),
            Err(FrameError::TooLarge {
                payload_len: u32::MAX
            })
        );
        let error = decode(&header).unwrap_err().to_string();
        assert!(error.contains("exceeds"), "{error}");
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut buffer = [0u8; 64];
        for round in 0..50_000 {
            for byte in buffer.iter_mut() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *byte = state as u8;
            }
            // Half the rounds start from a valid header so the later checks get reached.
            if round % 2 == 0 {
                buffer[..4].copy_from_slice(&MAGIC);
                buffer[4] = FRAME_VERSION;
                buffer[6..8].fill(0);
                buffer[8..12].copy_from_slice(&((state % 80) as u32).to_le_bytes());
            }
            let len = (state % 65) as usize;
            let _ = decode(&buffer[..len]);
        }
    }
}
