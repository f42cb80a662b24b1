//! The bytes waiting to be sent to one peer, with a hard limit.
//!
//! Frames are encoded straight into one buffer; sends drain it from the front (a send
//! operation takes a copy of the front, `copy_front`, and `consume` drops what the
//! completion says went out; bytes queued meanwhile go behind). When
//! a frame would take the queue past its limit the push fails, and the caller drops the
//! connection and redials: a slow or stuck peer costs at most the limit in memory, never
//! more, and Raft retransmits what was lost. The buffer keeps its capacity, so in steady
//! state pushing a frame does not allocate.

use super::frame;
use crate::auth::{MacError, Sealer, TAG_BYTES};

#[derive(Debug)]
pub struct SendQueue {
    buffer: Vec<u8>,
    /// Bytes before `head` were sent already.
    head: usize,
    limit: usize,
}

/// The frame did not fit; nothing was queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueFull {
    pub queued: usize,
    pub frame: usize,
    pub limit: usize,
}

impl std::fmt::Display for QueueFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "send queue full: {} bytes queued + a {}-byte frame exceed the {}-byte limit",
            self.queued, self.frame, self.limit
        )
    }
}

/// Why a sealed frame was not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushError {
    Full(QueueFull),
    Mac(MacError),
}

impl std::fmt::Display for PushError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PushError::Full(e) => e.fmt(f),
            PushError::Mac(e) => e.fmt(f),
        }
    }
}

impl SendQueue {
    pub fn new(limit: usize) -> Self {
        assert!(limit >= frame::HEADER_BYTES);
        SendQueue {
            buffer: Vec::new(),
            head: 0,
            limit,
        }
    }

    /// Bytes queued and not yet sent.
    pub fn len(&self) -> usize {
        self.buffer.len() - self.head
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Encodes a frame onto the end of the queue, or refuses it whole.
    pub fn push_frame(&mut self, kind: u8, payload: &[u8]) -> Result<(), QueueFull> {
        let size = frame::HEADER_BYTES + payload.len();
        if self.len() + size > self.limit {
            return Err(QueueFull {
                queued: self.len(),
                frame: size,
                limit: self.limit,
            });
        }
        self.make_room(size);
        frame::encode(kind, payload, &mut self.buffer);
        Ok(())
    }

    /// Encodes a frame onto the end of the queue followed by its MAC tag (an
    /// authenticated connection), or refuses it whole. The frame is sealed in place, so
    /// this does not allocate once the buffer has grown.
    pub fn push_sealed_frame(
        &mut self,
        kind: u8,
        payload: &[u8],
        sealer: &mut Sealer,
    ) -> Result<(), PushError> {
        let size = frame::HEADER_BYTES + payload.len() + TAG_BYTES;
        if self.len() + size > self.limit {
            return Err(PushError::Full(QueueFull {
                queued: self.len(),
                frame: size,
                limit: self.limit,
            }));
        }
        self.make_room(size);
        let start = self.buffer.len();
        frame::encode(kind, payload, &mut self.buffer);
        if let Err(e) = sealer.seal(&mut self.buffer, start) {
            self.buffer.truncate(start);
            return Err(PushError::Mac(e));
        }
        Ok(())
    }

    /// Queues raw bytes (the handshake messages, before any frame).
    pub fn push_raw(&mut self, bytes: &[u8]) -> Result<(), QueueFull> {
        if self.len() + bytes.len() > self.limit {
            return Err(QueueFull {
                queued: self.len(),
                frame: bytes.len(),
                limit: self.limit,
            });
        }
        self.make_room(bytes.len());
        self.buffer.extend_from_slice(bytes);
        Ok(())
    }

    /// The bytes to hand to the socket next.
    pub fn pending(&self) -> &[u8] {
        &self.buffer[self.head..]
    }

    /// Copies as many bytes from the front as fit `out` (the slab buffer of a send);
    /// returns how many. They stay queued until `consume`.
    pub fn copy_front(&self, out: &mut [u8]) -> usize {
        let n = self.len().min(out.len());
        out[..n].copy_from_slice(&self.pending()[..n]);
        n
    }

    /// `sent` bytes from the front went out.
    pub fn consume(&mut self, sent: usize) {
        assert!(sent <= self.len(), "consumed more than was queued");
        self.head += sent;
        if self.head == self.buffer.len() {
            self.buffer.clear();
            self.head = 0;
        }
    }

    /// Drops everything queued (the connection was lost), keeping the capacity.
    pub fn clear(&mut self) {
        self.buffer.clear();
        self.head = 0;
    }

    /// Moves unsent bytes to the front when the sent prefix is the larger part, so the
    /// buffer never grows past about twice the limit.
    fn make_room(&mut self, incoming: usize) {
        if self.head > 0
            && self.buffer.len() + incoming > self.buffer.capacity()
            && self.head >= self.len()
        {
            self.buffer.drain(..self.head);
            self.head = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_past_the_limit_and_drains_in_order() {
        let mut queue = SendQueue::new(100);
        queue.push_frame(1, &[1; 30]).unwrap();
        queue.push_frame(2, &[2; 30]).unwrap();
        let full = queue.push_frame(3, &[3; 30]).unwrap_err();
        assert_eq!(full.queued, 92);
        assert_eq!(queue.len(), 92);
        // Drain part of the first frame, then the rest, and check the frames decode.
        let mut wire = Vec::new();
        wire.extend_from_slice(&queue.pending()[..10]);
        queue.consume(10);
        queue.push_frame(3, &[3; 1]).unwrap();
        wire.extend_from_slice(queue.pending());
        let all = queue.len();
        queue.consume(all);
        assert!(queue.is_empty());
        let mut offset = 0;
        let mut kinds = Vec::new();
        while let Some(f) = frame::decode(&wire[offset..]).unwrap() {
            kinds.push(f.kind);
            offset += f.consumed;
        }
        assert_eq!(kinds, vec![1, 2, 3]);
    }

    #[test]
    fn copy_front_keeps_bytes_until_consumed() {
        let mut queue = SendQueue::new(1000);
        queue.push_raw(&(0..100u8).collect::<Vec<_>>()).unwrap();
        let mut slab = [0u8; 30];
        assert_eq!(queue.copy_front(&mut slab), 30);
        assert_eq!(slab[..], (0..30u8).collect::<Vec<_>>()[..]);
        assert_eq!(queue.len(), 100, "a copy is not a send");
        // A short send: 10 of the 30 went out; the next copy starts at byte 10, and
        // bytes queued meanwhile go behind.
        queue.consume(10);
        queue.push_raw(&[200; 5]).unwrap();
        assert_eq!(queue.copy_front(&mut slab), 30);
        assert_eq!(slab[..], (10..40u8).collect::<Vec<_>>()[..]);
        queue.consume(90);
        let mut big = [0u8; 64];
        assert_eq!(queue.copy_front(&mut big), 5, "only what is queued");
        assert_eq!(big[..5], [200; 5]);
        queue.consume(5);
        assert!(queue.is_empty());
        assert_eq!(queue.copy_front(&mut big), 0);
    }

    #[test]
    fn capacity_stays_bounded_under_churn() {
        let mut queue = SendQueue::new(1000);
        for round in 0..10_000usize {
            while queue.push_frame(1, &[0; 50][..round % 50]).is_ok() {}
            let half = queue.len() / 2 + 1;
            queue.consume(half.min(queue.len()));
            assert!(
                queue.buffer.capacity() <= 4 * 1000,
                "capacity {}",
                queue.buffer.capacity()
            );
        }
    }
}
