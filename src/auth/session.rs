//! Per-frame authentication of an established peer connection.
//!
//! After the handshake each direction of the connection has its own 32-byte session key.
//! The sender appends to every frame a tag: the full 32-byte HMAC-SHA256, under the
//! direction's key, of the frame's sequence number (u64 little-endian, 0 for the first
//! frame of the direction) followed by the frame's bytes. The sequence number is not
//! sent: both ends count, so a replayed, dropped, reordered or reflected frame (the other
//! direction has another key) fails the check. A failed check poisons the [`Opener`]: the
//! caller closes the connection and counts it (`vigil_peer_bad_mac_total`).

use std::fmt;

use hmac::Mac;

use super::key::HmacSha256;

/// Bytes of the tag appended to every frame.
pub const TAG_BYTES: usize = 32;
/// Bytes of a per-direction session key.
pub const SESSION_KEY_BYTES: usize = 32;

/// Why a sealed frame was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MacError {
    /// Fewer bytes than a tag.
    TooShort { len: usize },
    /// The tag does not match: tampered, replayed, reordered, or from someone else.
    BadTag { seq: u64 },
    /// An earlier frame failed: the connection must be closed.
    Poisoned,
    /// 2^64 - 1 frames in one direction: the connection must be re-established.
    Exhausted,
}

impl fmt::Display for MacError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MacError::TooShort { len } => write!(
                f,
                "sealed frame of {len} bytes is shorter than its {TAG_BYTES}-byte MAC"
            ),
            MacError::BadTag { seq } => write!(
                f,
                "frame {seq} failed authentication (tampered, replayed, reordered or forged)"
            ),
            MacError::Poisoned => write!(f, "an earlier frame failed authentication"),
            MacError::Exhausted => write!(f, "the frame sequence numbers are used up"),
        }
    }
}

impl std::error::Error for MacError {}

/// Both directions of an authenticated connection.
#[derive(Clone)]
pub struct Session {
    pub sealer: Sealer,
    pub opener: Opener,
}

impl Session {
    pub fn new(send_key: &[u8; SESSION_KEY_BYTES], recv_key: &[u8; SESSION_KEY_BYTES]) -> Self {
        Session {
            sealer: Sealer {
                mac: keyed(send_key),
                next_seq: 0,
            },
            opener: Opener {
                mac: keyed(recv_key),
                next_seq: 0,
                poisoned: false,
            },
        }
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Session {{ sent: {}, received: {} }}",
            self.sealer.next_seq, self.opener.next_seq
        )
    }
}

fn keyed(key: &[u8; SESSION_KEY_BYTES]) -> HmacSha256 {
    <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts any key length")
}

/// The sending direction: tags frames with increasing sequence numbers.
#[derive(Clone)]
pub struct Sealer {
    /// Keyed once; cloned per frame (cheaper than re-keying).
    mac: HmacSha256,
    next_seq: u64,
}

impl Sealer {
    /// Appends the tag of `buf[frame_start..]` (one encoded frame) to `buf`. Does not
    /// allocate when `buf` has room for [`TAG_BYTES`] more.
    pub fn seal(&mut self, buf: &mut Vec<u8>, frame_start: usize) -> Result<(), MacError> {
        assert!(frame_start <= buf.len(), "frame start beyond the buffer");
        if self.next_seq == u64::MAX {
            return Err(MacError::Exhausted);
        }
        let tag = tag(&self.mac, self.next_seq, &buf[frame_start..]);
        self.next_seq += 1;
        buf.extend_from_slice(&tag);
        Ok(())
    }

    /// Frames sealed so far.
    pub fn sealed(&self) -> u64 {
        self.next_seq
    }
}

/// The receiving direction: checks tags and sequence numbers.
#[derive(Clone)]
pub struct Opener {
    mac: HmacSha256,
    next_seq: u64,
    poisoned: bool,
}

impl Opener {
    /// Checks `sealed` (one frame followed by its tag) and returns the frame. Any failure
    /// is final: every later call fails with [`MacError::Poisoned`].
    pub fn open<'a>(&mut self, sealed: &'a [u8]) -> Result<&'a [u8], MacError> {
        if self.poisoned {
            return Err(MacError::Poisoned);
        }
        if self.next_seq == u64::MAX {
            self.poisoned = true;
            return Err(MacError::Exhausted);
        }
        let Some(frame_len) = sealed.len().checked_sub(TAG_BYTES) else {
            self.poisoned = true;
            return Err(MacError::TooShort { len: sealed.len() });
        };
        let (frame, received) = sealed.split_at(frame_len);
        let mut mac = self.mac.clone();
        mac.update(&self.next_seq.to_le_bytes());
        mac.update(frame);
        // verify_slice compares in constant time.
        if mac.verify_slice(received).is_err() {
            self.poisoned = true;
            return Err(MacError::BadTag { seq: self.next_seq });
        }
        self.next_seq += 1;
        Ok(frame)
    }

    /// Frames opened so far.
    pub fn opened(&self) -> u64 {
        self.next_seq
    }
}

fn tag(keyed: &HmacSha256, seq: u64, frame: &[u8]) -> [u8; TAG_BYTES] {
    let mut mac = keyed.clone();
    mac.update(&seq.to_le_bytes());
    mac.update(frame);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Session, Session) {
        let a_to_b = [1u8; 32];
        let b_to_a = [2u8; 32];
        (
            Session::new(&a_to_b, &b_to_a),
            Session::new(&b_to_a, &a_to_b),
        )
    }

    fn sealed(session: &mut Session, frame: &[u8]) -> Vec<u8> {
        let mut buf = b"prefix".to_vec();
        buf.extend_from_slice(frame);
        session.sealer.seal(&mut buf, 6).unwrap();
        assert_eq!(buf.len(), 6 + frame.len() + TAG_BYTES);
        buf.split_off(6)
    }

    #[test]
    fn frames_open_in_order_both_ways() {
        let (mut a, mut b) = pair();
        for i in 0..10u8 {
            let frame = vec![i; i as usize * 7];
            let wire = sealed(&mut a, &frame);
            assert_eq!(b.opener.open(&wire).unwrap(), &frame[..]);
            let reply = sealed(&mut b, &[i, i]);
            assert_eq!(a.opener.open(&reply).unwrap(), &[i, i]);
        }
        assert_eq!(a.sealer.sealed(), 10);
        assert_eq!(b.opener.opened(), 10);
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let (mut a, b) = pair();
        let wire = sealed(&mut a, b"append entries 42");
        for byte in 0..wire.len() {
            for bit in 0..8 {
                let mut tampered = wire.clone();
                tampered[byte] ^= 1 << bit;
                let mut opener = b.opener.clone();
                assert_eq!(opener.open(&tampered), Err(MacError::BadTag { seq: 0 }));
                assert_eq!(opener.open(&wire), Err(MacError::Poisoned));
            }
        }
        let mut opener = b.opener.clone();
        assert!(opener.open(&wire).is_ok());
    }

    #[test]
    fn truncated_and_extended_frames_are_refused() {
        let (mut a, b) = pair();
        let wire = sealed(&mut a, b"heartbeat");
        for len in 0..wire.len() {
            let mut opener = b.opener.clone();
            assert!(opener.open(&wire[..len]).is_err(), "len {len}");
        }
        let mut longer = wire.clone();
        longer.push(0);
        assert!(b.opener.clone().open(&longer).is_err());
        assert_eq!(
            b.opener.clone().open(&wire[..5]),
            Err(MacError::TooShort { len: 5 })
        );
    }

    #[test]
    fn replayed_frame_is_refused() {
        let (mut a, mut b) = pair();
        let first = sealed(&mut a, b"vote for me");
        b.opener.open(&first).unwrap();
        assert_eq!(b.opener.open(&first), Err(MacError::BadTag { seq: 1 }));
    }

    #[test]
    fn reordered_and_dropped_frames_are_refused() {
        let (mut a, b) = pair();
        let first = sealed(&mut a, b"one");
        let second = sealed(&mut a, b"two");
        // Reordered: the second arrives first.
        let mut opener = b.opener.clone();
        assert_eq!(opener.open(&second), Err(MacError::BadTag { seq: 0 }));
        // Dropped: the first never arrives; the second does not pass as the first.
        let mut opener = b.opener.clone();
        assert!(opener.open(&second).is_err());
        // In order, both open.
        let mut opener = b.opener.clone();
        opener.open(&first).unwrap();
        opener.open(&second).unwrap();
    }

    #[test]
    fn a_frame_reflected_back_to_its_sender_is_refused() {
        let (mut a, _b) = pair();
        let wire = sealed(&mut a, b"ack");
        // A's own receiving direction uses the other key.
        assert_eq!(a.opener.open(&wire), Err(MacError::BadTag { seq: 0 }));
    }

    #[test]
    fn another_sessions_frames_are_refused() {
        let (mut a, _) = pair();
        let mut other = Session::new(&[9u8; 32], &[2u8; 32]);
        let wire = sealed(&mut other, b"hello");
        let (_, mut b) = pair();
        assert!(b.opener.open(&wire).is_err());
        let wire = sealed(&mut a, b"hello");
        let (_, mut b) = pair();
        assert!(b.opener.open(&wire).is_ok());
    }
}
