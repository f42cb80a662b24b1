//! epoll backend (through mio): the same operations, emulated as completions.
//!
//! Inside `wait`, each newly submitted operation is first tried with its syscall
//! (accept4, connect, recv, send with MSG_NOSIGNAL, poll with a zero timeout). If it
//! would block, its fd is registered with epoll (edge-triggered, readable and writable,
//! mio token = the fd number), and on each readiness event of that fd every operation
//! waiting on it is tried again, until EAGAIN. Registering after an EAGAIN loses no
//! wake-up: EPOLL_CTL_ADD (and MOD) report readiness that is already there. Registrations
//! are kept after the last operation on an fd ends and re-armed with MOD by the next one
//! (see `Epoll::registered`), so the caller may still close fds freely between operations.
//!
//! fsync, fdatasync and close run synchronously inside `wait`: **this fallback blocks the
//! loop for the duration of an fsync.** No threads are started. Timeouts are kept in the
//! operation table; `wait` sleeps at most until the earliest of them.
//!
//! Costs: finding the operations of an fd scans the operation table (bounded by
//! `max_in_flight`), as does finding expired timeouts; both are simple loops over a few
//! hundred entries at most, and this is the fallback path.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use super::buffers::Buffers;
use super::clock::Instant;
use super::{complete, Completion, Error, Op, SlotState, Slots};

pub(crate) struct Epoll {
    poll: Poll,
    events: Events,
    /// The fds of one batch of events (copied out so operations can finish meanwhile).
    event_fds: Vec<RawFd>,
    /// Registered fds and how many waiting operations use each; capacity max_in_flight.
    /// An entry whose count dropped to 0 stays registered ("parked"): the next operation
    /// on that fd re-arms it with one EPOLL_CTL_MOD, instead of an ADD now and a DEL
    /// later. If the caller closed the fd meanwhile, the kernel dropped the registration;
    /// MOD then fails with ENOENT and we ADD.
    registered: Vec<(RawFd, u32)>,
    /// Operations waiting on a registered fd (the sum of the counts above).
    waiting: usize,
    /// Operations submitted since the last `wait`, not tried yet (in submission order).
    fresh: Vec<u32>,
    /// Operations with a result, in completion order, not yet handed to the caller.
    ready: VecDeque<u32>,
}

impl Epoll {
    pub(crate) fn new(max_in_flight: usize) -> io::Result<Epoll> {
        Ok(Epoll {
            poll: Poll::new()?,
            events: Events::with_capacity(max_in_flight.min(1024)),
            event_fds: Vec::with_capacity(max_in_flight.min(1024)),
            registered: Vec::with_capacity(max_in_flight),
            waiting: 0,
            fresh: Vec::with_capacity(max_in_flight),
            ready: VecDeque::with_capacity(max_in_flight),
        })
    }

    pub(crate) fn submit(&mut self, index: usize) {
        // Capacity is max_in_flight and every entry is an operation in flight: no growth.
        assert!(self.fresh.len() < self.fresh.capacity());
        self.fresh.push(index as u32);
    }

    pub(crate) fn cancel(&mut self, slots: &mut Slots, index: usize) {
        assert_eq!(slots.get(index).state, SlotState::InFlight);
        if let Some(position) = self.fresh.iter().position(|&i| i as usize == index) {
            self.fresh.remove(position);
        }
        self.finish(slots, index, -libc::ECANCELED);
    }

    /// Records an operation's result and queues it for the caller.
    fn finish(&mut self, slots: &mut Slots, index: usize, raw: i32) {
        let slot = slots.get_mut(index);
        assert_eq!(slot.state, SlotState::InFlight);
        if slot.registered {
            slot.registered = false;
            let fd = slot.op.fd().expect("registered operations have an fd");
            self.unregister(fd);
        }
        slot.state = SlotState::Done(raw);
        assert!(self.ready.len() < self.ready.capacity());
        self.ready.push_back(index as u32);
    }

    fn register(&mut self, fd: RawFd) -> io::Result<()> {
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Some(position) = self.registered.iter().position(|(f, _)| *f == fd) {
            if self.registered[position].1 == 0 {
                // Parked: re-arm it. If the caller closed the fd meanwhile (and the number
                // was reused), the kernel dropped that registration: add it again.
                let registry = self.poll.registry();
                match registry.reregister(&mut SourceFd(&fd), Token(fd as usize), interest) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                        registry.register(&mut SourceFd(&fd), Token(fd as usize), interest)?
                    }
                    Err(e) => return Err(e),
                }
            }
            self.registered[position].1 += 1;
            self.waiting += 1;
            return Ok(());
        }
        if self.registered.len() == self.registered.capacity() {
            // Full: evict a parked entry. One exists: fewer fds have waiting operations
            // than there are operations in flight, and this one is not counted yet.
            let position = self
                .registered
                .iter()
                .position(|&(_, users)| users == 0)
                .expect("a parked registration to evict");
            let (old, _) = self.registered.swap_remove(position);
            let _ = self.poll.registry().deregister(&mut SourceFd(&old));
        }
        let registry = self.poll.registry();
        match registry.register(&mut SourceFd(&fd), Token(fd as usize), interest) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                registry.reregister(&mut SourceFd(&fd), Token(fd as usize), interest)?
            }
            Err(e) => return Err(e),
        }
        self.registered.push((fd, 1));
        self.waiting += 1;
        Ok(())
    }

    /// An operation waiting on `fd` ended; the registration stays, parked.
    fn unregister(&mut self, fd: RawFd) {
        let entry = self
            .registered
            .iter_mut()
            .find(|(f, _)| *f == fd)
            .expect("unregister of an fd that is not registered");
        assert!(entry.1 > 0 && self.waiting > 0);
        entry.1 -= 1;
        self.waiting -= 1;
    }

    /// `fd` is about to be closed: drop its parked registration.
    fn forget(&mut self, fd: RawFd) {
        if let Some(position) = self.registered.iter().position(|(f, _)| *f == fd) {
            assert_eq!(
                self.registered[position].1, 0,
                "closing an fd with waiting operations"
            );
            self.registered.swap_remove(position);
            let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
        }
    }

    /// Tries operation `index` once; on a result, finishes it; on EAGAIN, makes sure its
    /// fd is registered so readiness brings us back.
    fn attempt(&mut self, slots: &mut Slots, buffers: &Buffers, index: usize) {
        match slots.get(index).op {
            Op::Timeout { .. } => return, // expired by the scan in `wait`
            Op::Close { fd } => self.forget(fd),
            _ => {}
        }
        let Some(raw) = try_syscall(slots, buffers, index) else {
            let slot = slots.get_mut(index);
            if !slot.registered {
                let fd = slot.op.fd().expect("only fd operations can block");
                match self.register(fd) {
                    Ok(()) => slots.get_mut(index).registered = true,
                    Err(e) => self.finish(slots, index, -e.raw_os_error().unwrap_or(libc::EIO)),
                }
            }
            return;
        };
        self.finish(slots, index, raw);
    }

    pub(crate) fn wait(
        &mut self,
        slots: &mut Slots,
        buffers: &mut Buffers,
        deadline: Option<Instant>,
        out: &mut [Completion],
    ) -> Result<usize, Error> {
        loop {
            // Try what was submitted since the last call (fsync and close run here).
            for position in 0..self.fresh.len() {
                let index = self.fresh[position] as usize;
                self.attempt(slots, buffers, index);
            }
            self.fresh.clear();

            // Expire timeouts; note the earliest one still pending.
            let now = Instant::now();
            let mut next_timeout: Option<Instant> = None;
            for index in 0..slots.capacity() {
                let slot = slots.get(index);
                if slot.state != SlotState::InFlight {
                    continue;
                }
                if let Op::Timeout { deadline } = slot.op {
                    if deadline <= now {
                        self.finish(slots, index, 0);
                    } else {
                        next_timeout = Some(next_timeout.map_or(deadline, |t| t.min(deadline)));
                    }
                }
            }

            // With a completion to hand back (or the deadline passed), readiness is still
            // collected, without blocking: otherwise a caller whose every turn has an
            // immediate completion would starve the operations waiting on fds.
            let finishing = !self.ready.is_empty() || deadline.is_some_and(|d| now >= d);
            let timeout = if finishing {
                if self.waiting == 0 {
                    return Ok(self.deliver(slots, buffers, out));
                }
                Some(Duration::ZERO)
            } else {
                let wake = match (deadline, next_timeout) {
                    (Some(d), Some(t)) => Some(d.min(t)),
                    (d, t) => d.or(t),
                };
                if wake.is_none() && slots.in_flight() == 0 {
                    return Err(Error::NothingToWaitFor);
                }
                // mio rounds the timeout up to whole milliseconds: we never wake early.
                wake.map(|w| w.remaining(now))
            };
            match self.poll.poll(&mut self.events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    if finishing {
                        return Ok(self.deliver(slots, buffers, out));
                    }
                    continue;
                }
                Err(source) => {
                    return Err(Error::Syscall {
                        call: "epoll_wait",
                        source,
                    })
                }
            }
            // Retry every registered operation of each fd that became ready.
            self.event_fds.clear();
            for event in self.events.iter() {
                assert!(self.event_fds.len() < self.event_fds.capacity());
                self.event_fds.push(event.token().0 as RawFd);
            }
            for position in 0..self.event_fds.len() {
                let fd = self.event_fds[position];
                for index in 0..slots.capacity() {
                    let slot = slots.get(index);
                    if slot.state == SlotState::InFlight
                        && slot.registered
                        && slot.op.fd() == Some(fd)
                    {
                        self.attempt(slots, buffers, index);
                    }
                }
            }
            if finishing || !self.ready.is_empty() {
                return Ok(self.deliver(slots, buffers, out));
            }
        }
    }

    /// Hands up to `out.len()` finished operations to the caller, in completion order.
    fn deliver(
        &mut self,
        slots: &mut Slots,
        buffers: &mut Buffers,
        out: &mut [Completion],
    ) -> usize {
        let mut filled = 0;
        while filled < out.len() {
            let Some(index) = self.ready.pop_front() else {
                break;
            };
            let index = index as usize;
            let SlotState::Done(raw) = slots.get(index).state else {
                panic!("epoll: ready operation {index} has no result");
            };
            out[filled] = complete(slots, buffers, index, raw);
            filled += 1;
        }
        filled
    }
}

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Runs the operation's syscall once. `None`: it would block (try again on readiness).
/// `Some(result)`: kernel-style result (value or -errno), as io_uring would report it.
fn try_syscall(slots: &mut Slots, buffers: &Buffers, index: usize) -> Option<i32> {
    let slot = slots.get_mut(index);
    loop {
        let (rc, nonblocking) = match slot.op {
            Op::Accept { fd } => {
                // SAFETY: null address pointers are allowed (we do not want the peer's).
                let rc = unsafe {
                    libc::accept4(
                        fd,
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    )
                };
                (rc as isize, true)
            }
            Op::Connect { fd } => return try_connect(slot, fd),
            Op::Recv {
                fd,
                buffer,
                offset,
                len,
            } => {
                // SAFETY: the buffer is lent to this operation (no Rust reference to it)
                // and offset + len is inside it (checked at submission).
                let rc = unsafe {
                    libc::recv(
                        fd,
                        buffers.ptr(buffer).add(offset as usize) as *mut libc::c_void,
                        len as usize,
                        0,
                    )
                };
                (rc, true)
            }
            Op::Send {
                fd,
                buffer,
                offset,
                len,
            } => {
                // SAFETY: as for Recv; send only reads the bytes.
                let rc = unsafe {
                    libc::send(
                        fd,
                        buffers.ptr(buffer).add(offset as usize) as *const libc::c_void,
                        len as usize,
                        libc::MSG_NOSIGNAL,
                    )
                };
                (rc, true)
            }
            Op::PollIn { fd } => {
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd; a zero timeout never blocks.
                let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
                if rc == 0 {
                    return None;
                }
                if rc > 0 {
                    return Some(i32::from(pfd.revents as u16 as i16));
                }
                (rc as isize, false)
            }
            Op::Fsync { fd, data_only } => {
                // Synchronous: the fallback blocks the loop for the fsync (documented).
                // SAFETY: plain syscalls on an fd.
                let rc = unsafe {
                    if data_only {
                        libc::fdatasync(fd)
                    } else {
                        libc::fsync(fd)
                    }
                };
                (rc as isize, false)
            }
            Op::Close { fd } => {
                // SAFETY: the caller gave this fd up to us (Io::close takes an OwnedFd).
                // close is not retried on EINTR: on Linux the fd is gone either way.
                let rc = unsafe { libc::close(fd) };
                return Some(if rc < 0 { -errno() } else { 0 });
            }
            Op::Timeout { .. } => return None,
        };
        if rc >= 0 {
            return Some(i32::try_from(rc).unwrap_or(i32::MAX));
        }
        match errno() {
            libc::EINTR => continue,
            libc::EAGAIN if nonblocking => return None,
            e => return Some(-e),
        }
    }
}

/// Non-blocking connect as a completion: start it, then on readiness read SO_ERROR and
/// ask connect again (EISCONN = done, EALREADY = still going).
fn try_connect(slot: &mut super::Slot, fd: RawFd) -> Option<i32> {
    if slot.connect_started {
        let mut error: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `error` and `len` are valid for writing an int.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                &mut error as *mut libc::c_int as *mut libc::c_void,
                &mut len,
            )
        };
        if rc < 0 {
            return Some(-errno());
        }
        if error != 0 {
            return Some(-error);
        }
    }
    slot.connect_started = true;
    loop {
        // SAFETY: addr/addr_len were filled from a SocketAddr at submission.
        let rc = unsafe {
            libc::connect(
                fd,
                &slot.addr as *const libc::sockaddr_storage as *const libc::sockaddr,
                slot.addr_len,
            )
        };
        if rc == 0 {
            return Some(0);
        }
        match errno() {
            libc::EINTR => continue,
            libc::EISCONN => return Some(0),
            libc::EINPROGRESS | libc::EALREADY | libc::EAGAIN => return None,
            e => return Some(-e),
        }
    }
}
