//! The I/O layer's buffer slab: the safe answer to "the kernel writes while in flight".
//!
//! All receive and send buffers live in one slab allocated when the `Io` is created and
//! never moved or resized. A buffer is named by a [`BufferId`] and is in one of three
//! states:
//!
//! - `Free`: in the pool.
//! - `Owned`: the caller holds it (`acquire`) and may read and write it through
//!   `Io::buffer` / `Io::buffer_mut`.
//! - `Lent`: an operation in flight uses it; the kernel (or the epoll emulation) may write
//!   it at any time. Touching it from Rust is refused with a panic (a caller bug), so no
//!   Rust reference ever aliases memory the kernel is writing. The completion of the
//!   operation, whatever its result (data, error, ECANCELED), gives the buffer back to
//!   the caller (`Owned`), who then reuses or releases it.
//!
//! The slab is held as a raw pointer (not a `Box<[u8]>` field) so that handing out a
//! `&mut [u8]` for one buffer never asserts exclusive access to the bytes of another
//! buffer that the kernel is writing concurrently.

use std::ptr::NonNull;

/// Names one buffer of the slab.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BufferId(u32);

impl BufferId {
    /// The buffer's index in the slab (`0..buffer_count`).
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Free,
    Owned,
    Lent,
}

pub(crate) struct Buffers {
    base: NonNull<u8>,
    bytes_each: usize,
    states: Box<[State]>,
    /// Stack of free buffer indices; capacity fixed at `count`.
    free: Vec<u32>,
    /// Set when operations could not be drained at teardown: the kernel may still write,
    /// so the slab is leaked rather than freed.
    leaked: bool,
}

impl Buffers {
    pub(crate) fn new(count: usize, bytes_each: usize) -> Buffers {
        assert!(count > 0 && count <= u32::MAX as usize);
        assert!(bytes_each > 0 && bytes_each <= u32::MAX as usize);
        let total = count
            .checked_mul(bytes_each)
            .expect("buffer slab size overflows");
        let slab: Box<[u8]> = vec![0u8; total].into_boxed_slice();
        let base = NonNull::new(Box::into_raw(slab) as *mut u8).expect("Box is never null");
        Buffers {
            base,
            bytes_each,
            states: vec![State::Free; count].into_boxed_slice(),
            free: (0..count as u32).rev().collect(),
            leaked: false,
        }
    }

    pub(crate) fn bytes_each(&self) -> usize {
        self.bytes_each
    }

    pub(crate) fn count(&self) -> usize {
        self.states.len()
    }

    pub(crate) fn free_count(&self) -> usize {
        self.free.len()
    }

    pub(crate) fn acquire(&mut self) -> Option<BufferId> {
        let index = self.free.pop()?;
        assert_eq!(self.states[index as usize], State::Free);
        self.states[index as usize] = State::Owned;
        Some(BufferId(index))
    }

    pub(crate) fn release(&mut self, id: BufferId) {
        self.expect_owned(id);
        self.states[id.index()] = State::Free;
        assert!(self.free.len() < self.states.len());
        self.free.push(id.0);
    }

    pub(crate) fn is_owned(&self, id: BufferId) -> bool {
        self.states.get(id.index()) == Some(&State::Owned)
    }

    fn expect_owned(&self, id: BufferId) {
        let state = self.states.get(id.index()).copied();
        assert!(
            state == Some(State::Owned),
            "buffer {} is not held by the caller (state {state:?}): lent to an operation in \
             flight, free, or out of range",
            id.0
        );
    }

    pub(crate) fn get(&self, id: BufferId) -> &[u8] {
        self.expect_owned(id);
        // SAFETY: the buffer is in bounds (checked by expect_owned), the slab lives until
        // drop, and no operation uses an Owned buffer, so nothing writes it concurrently.
        unsafe { std::slice::from_raw_parts(self.ptr(id), self.bytes_each) }
    }

    pub(crate) fn get_mut(&mut self, id: BufferId) -> &mut [u8] {
        self.expect_owned(id);
        // SAFETY: as in `get`; `&mut self` makes this the only Rust reference to it.
        unsafe { std::slice::from_raw_parts_mut(self.ptr(id), self.bytes_each) }
    }

    /// Lends an owned buffer to an operation; returns the start of its memory.
    pub(crate) fn lend(&mut self, id: BufferId) -> *mut u8 {
        self.expect_owned(id);
        self.states[id.index()] = State::Lent;
        self.ptr(id)
    }

    /// The operation that borrowed `id` completed: the caller holds it again.
    pub(crate) fn give_back(&mut self, id: BufferId) {
        assert_eq!(
            self.states[id.index()],
            State::Lent,
            "buffer {} was not lent",
            id.0
        );
        self.states[id.index()] = State::Owned;
    }

    /// Start of buffer `id` (in bounds; not dereferenced here).
    pub(crate) fn ptr(&self, id: BufferId) -> *mut u8 {
        assert!(id.index() < self.states.len());
        // SAFETY: index < count, so the offset stays inside the slab allocation.
        unsafe { self.base.as_ptr().add(id.index() * self.bytes_each) }
    }

    /// Never free the slab: something may still write into it.
    pub(crate) fn leak(&mut self) {
        self.leaked = true;
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        if self.leaked {
            log::error!(
                "io: leaking {} bytes of buffers that operations may still write",
                self.states.len() * self.bytes_each
            );
            return;
        }
        let total = self.states.len() * self.bytes_each;
        // SAFETY: `base` came from Box::<[u8]>::into_raw of exactly `total` bytes and is
        // freed once, here; no operation is in flight (otherwise `leaked` is set).
        unsafe {
            drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.base.as_ptr(),
                total,
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acquire_lend_give_back_release() {
        let mut b = Buffers::new(2, 16);
        let x = b.acquire().unwrap();
        let y = b.acquire().unwrap();
        assert_ne!(x, y);
        assert!(b.acquire().is_none());
        b.get_mut(x)[0] = 7;
        let p = b.lend(x);
        assert_eq!(p, b.ptr(x));
        assert!(!b.is_owned(x));
        b.give_back(x);
        assert_eq!(b.get(x)[0], 7);
        b.release(x);
        b.release(y);
        assert_eq!(b.free_count(), 2);
    }

    #[test]
    #[should_panic(expected = "not held by the caller")]
    fn touching_a_lent_buffer_is_refused() {
        let mut b = Buffers::new(1, 16);
        let x = b.acquire().unwrap();
        b.lend(x);
        let _ = b.get(x);
    }

    #[test]
    #[should_panic(expected = "not held by the caller")]
    fn double_release_is_refused() {
        let mut b = Buffers::new(1, 16);
        let x = b.acquire().unwrap();
        b.release(x);
        b.release(x);
    }
}
