//! The event loop's I/O layer: completion-based, single-threaded, bounded.
//!
//! The agent is one thread running one loop. Everything it waits for (peer and control
//! sockets, the WAL fsync, timeouts, child exits through pidfds, signals through a
//! signalfd) is an *operation* submitted here with a caller-chosen `u64` token; `wait`
//! hands back [`Completion`]s carrying that token. Two backends behave the same:
//!
//! - **io_uring** ([`Backend::Uring`]): every operation is an SQE on one ring (accept,
//!   connect, recv, send, poll-in, fsync/fdatasync, absolute timeout, close, async
//!   cancel). The kernel does the work; `wait` is one `io_uring_enter`.
//! - **epoll** ([`Backend::Epoll`], through mio with `SourceFd` on the caller's
//!   non-blocking fds): the same operations emulated as completions. An operation is
//!   first tried with its syscall inside `wait`; if it would block, its fd is registered
//!   (edge-triggered) and the syscall is retried on readiness. **fsync/fdatasync and
//!   close run synchronously inside `wait`: the fallback blocks the loop for the
//!   duration of an fsync.** There are no hidden threads.
//!
//! [`Io::new`] with [`BackendChoice::Auto`] takes io_uring unless setting up the ring
//! fails (ENOSYS, EPERM from `kernel.io_uring_disabled` or a seccomp filter, ...) or the
//! ring lacks an opcode or feature we use (checked with an io_uring probe); then epoll.
//! The choice and the reason for a fallback are logged.
//!
//! Memory is bounded and allocated up front: at most `max_in_flight` operations (a
//! clear [`Error::InFlightFull`] beyond), a fixed slab of buffers (see [`buffers`]), and
//! the completions land in a caller-provided array. Steady state allocates nothing.
//!
//! Results follow the kernel's convention, normalised so both backends agree:
//! accept gives the new fd (non-blocking, close-on-exec), recv/send the byte count
//! (recv 0 = the peer closed), poll-in the `revents` mask, connect/fsync/close/timeout 0;
//! a failure is an [`Errno`]. A cancelled operation completes with `ECANCELED`, unless
//! it had already finished, in which case its real result arrives instead (a race no
//! caller can avoid, so both backends allow it).
//!
//! The shape of the loop that runs on this layer:
//!
//! ```
//! use std::time::Duration;
//! use vigil::io::{Completion, Config, Instant, Io, Timers};
//!
//! let config = Config { buffer_count: 4, buffer_bytes: 4096, ..Config::default() };
//! let mut io = Io::new(&config)?;
//! let mut completions = [Completion::EMPTY; 64]; // allocated once
//! let mut timers = Timers::new(4);
//! const HEARTBEAT: usize = 0;
//! timers.set(HEARTBEAT, Instant::now().saturating_add(Duration::from_millis(20)));
//! for _turn in 0..2 {
//!     let n = io.wait(timers.next_deadline(), &mut completions)?;
//!     for c in &completions[..n] {
//!         let _ = (c.token, c.result); // dispatch on the token
//!     }
//!     let now = Instant::now(); // the time input for raft.tick(now)
//!     while let Some(timer) = timers.pop_expired(now) {
//!         assert_eq!(timer, HEARTBEAT);
//!         timers.set(HEARTBEAT, now.saturating_add(Duration::from_millis(20)));
//!     }
//! }
//! # Ok::<(), vigil::io::Error>(())
//! ```

pub mod buffers;
pub mod child;
pub mod clock;
mod epoll;
pub mod signals;
pub mod socket;
pub mod timers;
mod uring;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::fd::{IntoRawFd, OwnedFd, RawFd};

pub use buffers::BufferId;
pub use clock::Instant;
pub use timers::Timers;

use crate::limits;
use buffers::Buffers;

/// The mechanism that runs the operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// io_uring: the kernel performs every operation asynchronously.
    Uring,
    /// epoll (through mio): readiness plus the syscall; fsync blocks the loop.
    Epoll,
}

/// Which backend [`Io::new`] sets up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    /// io_uring if the kernel lets us have a ring with every opcode we use, else epoll.
    Auto,
    /// io_uring or an error.
    Uring,
    /// epoll, even where io_uring works.
    Epoll,
}

/// How to build an [`Io`]. `Config::default()` takes its bounds from `limits`.
#[derive(Clone, Debug)]
pub struct Config {
    pub backend: BackendChoice,
    /// Submission queue size of the ring (a power of two, at least `max_in_flight`).
    pub ring_entries: u32,
    /// Operations in flight at once.
    pub max_in_flight: usize,
    /// Buffers in the slab.
    pub buffer_count: usize,
    /// Bytes of each buffer.
    pub buffer_bytes: usize,
    /// Test hook: pretend `io_uring_setup` failed with this errno (for example
    /// `libc::EPERM`), so the fallback path runs without changing the machine.
    pub fail_uring_setup: Option<i32>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            backend: BackendChoice::Auto,
            ring_entries: limits::IO_RING_ENTRIES,
            max_in_flight: limits::IO_MAX_IN_FLIGHT,
            buffer_count: limits::IO_BUFFER_COUNT,
            buffer_bytes: limits::IO_BUFFER_BYTES,
            fail_uring_setup: None,
        }
    }
}

/// What an operation was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    Accept,
    Connect,
    Recv,
    Send,
    PollIn,
    Fsync,
    Fdatasync,
    Timeout,
    Close,
}

/// An OS error number (positive, as in `errno`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    pub fn io_error(self) -> io::Error {
        io::Error::from_raw_os_error(self.0)
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (errno {})", self.io_error(), self.0)
    }
}

/// The outcome of one operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The token the caller chose at submission.
    pub token: u64,
    pub kind: OpKind,
    /// See the module documentation for what the value means per kind.
    pub result: Result<u32, Errno>,
    /// The buffer the operation used; the caller holds it again.
    pub buffer: Option<BufferId>,
}

impl Completion {
    /// A placeholder to preallocate completion arrays with.
    pub const EMPTY: Completion = Completion {
        token: 0,
        kind: OpKind::Timeout,
        result: Ok(0),
        buffer: None,
    };
}

/// Why a call into the I/O layer failed (an operation's own failure is an [`Errno`] in
/// its [`Completion`]).
#[derive(Debug)]
pub enum Error {
    /// `max` operations are in flight already.
    InFlightFull { max: usize },
    /// Every one of the `count` buffers is held by the caller or lent.
    NoBuffers { count: usize },
    /// The range does not fit the buffer.
    BufferRange {
        buffer: usize,
        range: Range<usize>,
        buffer_bytes: usize,
    },
    /// The buffer is not held by the caller (free or lent to an operation in flight).
    BufferNotHeld { buffer: usize },
    /// The fd still has operations whose completion the caller has not received;
    /// cancel them and wait for their completions before closing it.
    FdBusy { fd: RawFd, operations: usize },
    /// No operation in flight has this token.
    UnknownToken { token: u64 },
    /// `wait` without a deadline and with nothing in flight would sleep forever.
    NothingToWaitFor,
    /// The backend could not be set up.
    Setup { backend: Backend, source: io::Error },
    /// A system call of the layer itself failed.
    Syscall {
        call: &'static str,
        source: io::Error,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InFlightFull { max } => {
                write!(f, "io: {max} operations already in flight (the limit)")
            }
            Error::NoBuffers { count } => write!(f, "io: all {count} buffers are in use"),
            Error::BufferRange {
                buffer,
                range,
                buffer_bytes,
            } => write!(
                f,
                "io: range {range:?} does not fit buffer {buffer} of {buffer_bytes} bytes"
            ),
            Error::BufferNotHeld { buffer } => write!(
                f,
                "io: buffer {buffer} is not held by the caller (free, or lent to an operation)"
            ),
            Error::FdBusy { fd, operations } => write!(
                f,
                "io: fd {fd} still has {operations} operation(s) not completed; cancel first"
            ),
            Error::UnknownToken { token } => {
                write!(f, "io: no operation in flight has token {token}")
            }
            Error::NothingToWaitFor => {
                write!(f, "io: wait without deadline and nothing in flight")
            }
            Error::Setup { backend, source } => write!(f, "io: {backend:?} setup: {source}"),
            Error::Syscall { call, source } => write!(f, "io: {call}: {source}"),
        }
    }
}

impl std::error::Error for Error {}

// ---- Operation slots (shared by both backends) ----------------------------------------

#[derive(Clone, Copy, Debug)]
pub(crate) enum Op {
    Accept {
        fd: RawFd,
    },
    /// The address is in the slot (stable storage the kernel reads).
    Connect {
        fd: RawFd,
    },
    Recv {
        fd: RawFd,
        buffer: BufferId,
        offset: u32,
        len: u32,
    },
    Send {
        fd: RawFd,
        buffer: BufferId,
        offset: u32,
        len: u32,
    },
    PollIn {
        fd: RawFd,
    },
    Fsync {
        fd: RawFd,
        data_only: bool,
    },
    Timeout {
        deadline: Instant,
    },
    Close {
        fd: RawFd,
    },
}

impl Op {
    fn kind(&self) -> OpKind {
        match self {
            Op::Accept { .. } => OpKind::Accept,
            Op::Connect { .. } => OpKind::Connect,
            Op::Recv { .. } => OpKind::Recv,
            Op::Send { .. } => OpKind::Send,
            Op::PollIn { .. } => OpKind::PollIn,
            Op::Fsync {
                data_only: false, ..
            } => OpKind::Fsync,
            Op::Fsync {
                data_only: true, ..
            } => OpKind::Fdatasync,
            Op::Timeout { .. } => OpKind::Timeout,
            Op::Close { .. } => OpKind::Close,
        }
    }

    pub(crate) fn fd(&self) -> Option<RawFd> {
        match *self {
            Op::Accept { fd }
            | Op::Connect { fd }
            | Op::Recv { fd, .. }
            | Op::Send { fd, .. }
            | Op::PollIn { fd }
            | Op::Fsync { fd, .. }
            | Op::Close { fd } => Some(fd),
            Op::Timeout { .. } => None,
        }
    }

    fn buffer(&self) -> Option<BufferId> {
        match *self {
            Op::Recv { buffer, .. } | Op::Send { buffer, .. } => Some(buffer),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SlotState {
    Free,
    /// Submitted, result not known yet.
    InFlight,
    /// Result known (epoll emulation), waiting to be handed to the caller.
    Done(i32),
}

pub(crate) struct Slot {
    generation: u32,
    pub(crate) state: SlotState,
    token: u64,
    pub(crate) op: Op,
    pub(crate) cancel_requested: bool,
    /// Stable storage the kernel reads while the operation is in flight: the slots live
    /// in a boxed slice that is never moved or resized.
    pub(crate) addr: libc::sockaddr_storage,
    pub(crate) addr_len: libc::socklen_t,
    pub(crate) timespec: io_uring::types::Timespec,
    /// epoll emulation: a non-blocking connect has been started.
    pub(crate) connect_started: bool,
    /// epoll emulation: the fd is registered for this operation.
    pub(crate) registered: bool,
}

/// Bounded table of operations; the io_uring `user_data` (a "key") is the slot index
/// plus a generation, so a stale key can never be mistaken for a reused slot.
pub(crate) struct Slots {
    slots: Box<[Slot]>,
    free: Vec<u32>,
    in_flight: usize,
}

/// Keys have bit 63 clear; the io_uring backend marks its internal cancel requests with it.
const GENERATION_MASK: u32 = 0x7fff_ffff;

impl Slots {
    fn new(capacity: usize) -> Slots {
        assert!(capacity > 0 && capacity <= u32::MAX as usize);
        let slots = (0..capacity)
            .map(|_| Slot {
                generation: 0,
                state: SlotState::Free,
                token: 0,
                op: Op::Timeout {
                    deadline: Instant::ZERO,
                },
                cancel_requested: false,
                // SAFETY: sockaddr_storage is plain old data; all zeroes is valid.
                addr: unsafe { std::mem::zeroed() },
                addr_len: 0,
                timespec: io_uring::types::Timespec::new(),
                connect_started: false,
                registered: false,
            })
            .collect();
        Slots {
            slots,
            free: (0..capacity as u32).rev().collect(),
            in_flight: 0,
        }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn allocate(&mut self, token: u64, op: Op) -> Option<usize> {
        let index = self.free.pop()? as usize;
        let slot = &mut self.slots[index];
        assert_eq!(slot.state, SlotState::Free);
        slot.generation = slot.generation.wrapping_add(1) & GENERATION_MASK;
        slot.state = SlotState::InFlight;
        slot.token = token;
        slot.op = op;
        slot.cancel_requested = false;
        slot.connect_started = false;
        slot.registered = false;
        self.in_flight += 1;
        Some(index)
    }

    pub(crate) fn key(&self, index: usize) -> u64 {
        (u64::from(self.slots[index].generation) << 32) | index as u64
    }

    /// The slot a key names, if that operation is still in the table.
    pub(crate) fn lookup(&self, key: u64) -> Option<usize> {
        let index = (key & 0xffff_ffff) as usize;
        let generation = (key >> 32) as u32;
        let slot = self.slots.get(index)?;
        (slot.state != SlotState::Free && slot.generation == generation).then_some(index)
    }

    pub(crate) fn get(&self, index: usize) -> &Slot {
        &self.slots[index]
    }

    pub(crate) fn get_mut(&mut self, index: usize) -> &mut Slot {
        &mut self.slots[index]
    }

    fn find_token(&self, token: u64) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.state != SlotState::Free && s.token == token)
    }

    fn operations_on_fd(&self, fd: RawFd) -> usize {
        self.slots
            .iter()
            .filter(|s| s.state != SlotState::Free && s.op.fd() == Some(fd))
            .count()
    }

    fn release(&mut self, index: usize) {
        let slot = &mut self.slots[index];
        assert_ne!(slot.state, SlotState::Free);
        slot.state = SlotState::Free;
        assert!(self.in_flight > 0);
        self.in_flight -= 1;
        self.free.push(index as u32);
    }

    /// Never free the slots: the kernel may still read addresses or timespecs in them.
    fn leak(&mut self) {
        let slots = std::mem::take(&mut self.slots);
        std::mem::forget(slots);
    }
}

/// Turns a raw kernel-style result into the caller's completion, returns the buffer to
/// the caller and frees the slot. Both backends end every operation here.
pub(crate) fn complete(
    slots: &mut Slots,
    buffers: &mut Buffers,
    index: usize,
    raw: i32,
) -> Completion {
    let slot = slots.get(index);
    let kind = slot.op.kind();
    let buffer = slot.op.buffer();
    let token = slot.token;
    let result = match (kind, raw) {
        // io_uring reports an expired timeout as -ETIME; for the caller it is success.
        (OpKind::Timeout, r) if r == -libc::ETIME => Ok(0),
        (_, r) if r >= 0 => Ok(r as u32),
        (_, r) => Err(Errno(-r)),
    };
    if let Some(buffer) = buffer {
        buffers.give_back(buffer);
    }
    slots.release(index);
    Completion {
        token,
        kind,
        result,
        buffer,
    }
}

// ---- The I/O layer ---------------------------------------------------------------------

enum Engine {
    Uring(uring::Uring),
    Epoll(epoll::Epoll),
}

/// The event loop's I/O: operations in, completions out. See the module documentation.
///
/// Rules for callers:
/// - Sockets must be non-blocking (the `socket` helpers and accept make them so): the
///   epoll backend runs the syscalls itself and would block the loop on a blocking fd.
/// - Tokens are the caller's; keep the tokens of operations in flight unique if you
///   cancel by token (`cancel` picks the first match).
/// - Close an fd through [`Io::close`] after its operations completed, or directly once
///   none is in flight; never while one is in flight (the kernel would keep the file
///   alive for io_uring, and epoll would never report the operation).
/// - `Io` is not `Send`: one thread submits and waits (io_uring is set up single-issuer).
pub struct Io {
    slots: Slots,
    buffers: Buffers,
    engine: Engine,
}

impl Io {
    /// Sets up the chosen backend and allocates every table and buffer.
    pub fn new(config: &Config) -> Result<Io, Error> {
        assert!(config.max_in_flight > 0);
        assert!(
            config.ring_entries.is_power_of_two()
                && config.max_in_flight <= config.ring_entries as usize,
            "ring_entries must be a power of two and at least max_in_flight"
        );
        let setup_uring = || uring::Uring::new(config.ring_entries, config.fail_uring_setup);
        let engine = match config.backend {
            BackendChoice::Uring => {
                Engine::Uring(setup_uring().map_err(|source| Error::Setup {
                    backend: Backend::Uring,
                    source,
                })?)
            }
            BackendChoice::Epoll => Engine::Epoll(Self::setup_epoll(config)?),
            BackendChoice::Auto => match setup_uring() {
                Ok(ring) => Engine::Uring(ring),
                Err(reason) => {
                    log::info!("io: io_uring unavailable ({reason}); falling back to epoll");
                    Engine::Epoll(Self::setup_epoll(config)?)
                }
            },
        };
        let io = Io {
            slots: Slots::new(config.max_in_flight),
            buffers: Buffers::new(config.buffer_count, config.buffer_bytes),
            engine,
        };
        log::info!(
            "io: backend {:?} ({:?} requested), {} operations in flight at most, {} buffers of {} bytes",
            io.backend(),
            config.backend,
            config.max_in_flight,
            config.buffer_count,
            config.buffer_bytes
        );
        Ok(io)
    }

    fn setup_epoll(config: &Config) -> Result<epoll::Epoll, Error> {
        epoll::Epoll::new(config.max_in_flight).map_err(|source| Error::Setup {
            backend: Backend::Epoll,
            source,
        })
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        match self.engine {
            Engine::Uring(_) => Backend::Uring,
            Engine::Epoll(_) => Backend::Epoll,
        }
    }

    /// Operations submitted whose completion the caller has not received yet.
    pub fn in_flight(&self) -> usize {
        self.slots.in_flight()
    }

    // ---- Buffers ----

    /// Takes a buffer from the slab; the caller holds it until `buffer_release`.
    pub fn buffer_acquire(&mut self) -> Result<BufferId, Error> {
        self.buffers.acquire().ok_or(Error::NoBuffers {
            count: self.buffers.count(),
        })
    }

    /// Returns a held buffer to the slab. Panics if it is lent to an operation.
    pub fn buffer_release(&mut self, buffer: BufferId) {
        self.buffers.release(buffer);
    }

    /// A held buffer's bytes. Panics if the buffer is lent to an operation in flight.
    pub fn buffer(&self, buffer: BufferId) -> &[u8] {
        self.buffers.get(buffer)
    }

    /// A held buffer's bytes, writable. Panics if the buffer is lent.
    pub fn buffer_mut(&mut self, buffer: BufferId) -> &mut [u8] {
        self.buffers.get_mut(buffer)
    }

    /// Bytes of every buffer.
    pub fn buffer_bytes(&self) -> usize {
        self.buffers.bytes_each()
    }

    /// Buffers in the slab not held by anyone.
    pub fn buffers_free(&self) -> usize {
        self.buffers.free_count()
    }

    // ---- Operations ----

    /// Accepts one connection on a listening socket. Result: the new fd (non-blocking,
    /// close-on-exec), which the caller then owns.
    pub fn accept(&mut self, token: u64, listener: RawFd) -> Result<(), Error> {
        self.submit(token, Op::Accept { fd: listener }, None)
    }

    /// Connects a non-blocking socket (from `socket::tcp_socket`) to `addr`. Result: 0.
    pub fn connect(&mut self, token: u64, socket: RawFd, addr: SocketAddr) -> Result<(), Error> {
        self.submit(token, Op::Connect { fd: socket }, Some(addr))
    }

    /// Receives into `buffer[range]`. Result: bytes received; 0 means the peer closed.
    /// The buffer is lent until the completion.
    pub fn recv(
        &mut self,
        token: u64,
        fd: RawFd,
        buffer: BufferId,
        range: Range<usize>,
    ) -> Result<(), Error> {
        let (offset, len) = self.check_range(buffer, &range)?;
        self.submit(
            token,
            Op::Recv {
                fd,
                buffer,
                offset,
                len,
            },
            None,
        )
    }

    /// Sends `buffer[range]` (with MSG_NOSIGNAL). Result: bytes sent, possibly fewer than
    /// asked; the caller sends the rest. The buffer is lent until the completion.
    /// Keep at most one send in flight per socket: neither backend orders concurrent
    /// sends on one socket, so their bytes could interleave (the same holds for recvs).
    pub fn send(
        &mut self,
        token: u64,
        fd: RawFd,
        buffer: BufferId,
        range: Range<usize>,
    ) -> Result<(), Error> {
        let (offset, len) = self.check_range(buffer, &range)?;
        self.submit(
            token,
            Op::Send {
                fd,
                buffer,
                offset,
                len,
            },
            None,
        )
    }

    /// Completes when `fd` is readable (a pidfd whose process exited, a signalfd with a
    /// pending signal, a timerfd that fired, a socket with data). Result: `revents`.
    pub fn poll_in(&mut self, token: u64, fd: RawFd) -> Result<(), Error> {
        self.submit(token, Op::PollIn { fd }, None)
    }

    /// fsync(2) of `fd`. On epoll it runs synchronously inside the next `wait`.
    pub fn fsync(&mut self, token: u64, fd: RawFd) -> Result<(), Error> {
        self.submit(
            token,
            Op::Fsync {
                fd,
                data_only: false,
            },
            None,
        )
    }

    /// fdatasync(2) of `fd`. On epoll it runs synchronously inside the next `wait`.
    pub fn fdatasync(&mut self, token: u64, fd: RawFd) -> Result<(), Error> {
        self.submit(
            token,
            Op::Fsync {
                fd,
                data_only: true,
            },
            None,
        )
    }

    /// Completes (result 0) once CLOCK_MONOTONIC reaches `deadline`.
    pub fn timeout(&mut self, token: u64, deadline: Instant) -> Result<(), Error> {
        self.submit(token, Op::Timeout { deadline }, None)
    }

    /// Closes `fd`, which must have no operation in flight (else [`Error::FdBusy`] and
    /// the fd is handed back, still open). Result: 0 or close's error.
    pub fn close(&mut self, token: u64, fd: OwnedFd) -> Result<(), (Error, OwnedFd)> {
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        let operations = self.slots.operations_on_fd(raw);
        if operations > 0 {
            return Err((
                Error::FdBusy {
                    fd: raw,
                    operations,
                },
                fd,
            ));
        }
        if let Err(e) = self.check_capacity() {
            return Err((e, fd));
        }
        let raw = fd.into_raw_fd();
        self.submit(token, Op::Close { fd: raw }, None)
            .map_err(|e| {
                // Submission failed: the fd is still ours to give back.
                // SAFETY: `raw` came from into_raw_fd just above and was not closed.
                (e, unsafe { std::os::fd::FromRawFd::from_raw_fd(raw) })
            })
    }

    /// Asks to cancel the operation with `token`. It then completes with ECANCELED, or
    /// with its real result if it finished first; its buffer comes back either way.
    /// Operations already running in the kernel that cannot be interrupted (fsync,
    /// close) just finish. Cancelling twice is harmless.
    pub fn cancel(&mut self, token: u64) -> Result<(), Error> {
        let index = self
            .slots
            .find_token(token)
            .ok_or(Error::UnknownToken { token })?;
        let slot = self.slots.get(index);
        if slot.cancel_requested || slot.state != SlotState::InFlight {
            return Ok(());
        }
        match &mut self.engine {
            Engine::Uring(ring) => {
                let key = self.slots.key(index);
                ring.cancel(key).map_err(|source| Error::Syscall {
                    call: "io_uring_enter (cancel)",
                    source,
                })?;
            }
            Engine::Epoll(epoll) => epoll.cancel(&mut self.slots, index),
        }
        self.slots.get_mut(index).cancel_requested = true;
        Ok(())
    }

    /// Blocks until at least one completion is ready or CLOCK_MONOTONIC reaches
    /// `deadline` (`None`: no deadline), submitting whatever was queued. Fills `out` from
    /// the start and returns how many it filled; 0 means the deadline passed. Completions
    /// that do not fit stay queued for the next call.
    pub fn wait(
        &mut self,
        deadline: Option<Instant>,
        out: &mut [Completion],
    ) -> Result<usize, Error> {
        assert!(
            !out.is_empty(),
            "wait needs room for at least one completion"
        );
        match &mut self.engine {
            Engine::Uring(ring) => ring.wait(&mut self.slots, &mut self.buffers, deadline, out),
            Engine::Epoll(epoll) => epoll.wait(&mut self.slots, &mut self.buffers, deadline, out),
        }
    }

    fn check_capacity(&self) -> Result<(), Error> {
        if self.slots.in_flight() >= self.slots.capacity() {
            return Err(Error::InFlightFull {
                max: self.slots.capacity(),
            });
        }
        Ok(())
    }

    fn check_range(&self, buffer: BufferId, range: &Range<usize>) -> Result<(u32, u32), Error> {
        if !self.buffers.is_owned(buffer) {
            return Err(Error::BufferNotHeld {
                buffer: buffer.index(),
            });
        }
        let bytes = self.buffers.bytes_each();
        if range.start >= range.end || range.end > bytes {
            return Err(Error::BufferRange {
                buffer: buffer.index(),
                range: range.clone(),
                buffer_bytes: bytes,
            });
        }
        // Both fit u32: buffer_bytes <= u32::MAX (asserted in Buffers::new).
        Ok((range.start as u32, (range.end - range.start) as u32))
    }

    fn submit(&mut self, token: u64, op: Op, addr: Option<SocketAddr>) -> Result<(), Error> {
        self.check_capacity()?;
        let index = self
            .slots
            .allocate(token, op)
            .expect("a free slot exists below capacity");
        if let Some(buffer) = op.buffer() {
            self.buffers.lend(buffer);
        }
        let slot = self.slots.get_mut(index);
        if let Some(addr) = addr {
            let (storage, len) = socket::sockaddr_from(&addr);
            slot.addr = storage;
            slot.addr_len = len;
        }
        let result = match &mut self.engine {
            Engine::Uring(ring) => {
                let key = self.slots.key(index);
                ring.submit(key, self.slots.get_mut(index), &self.buffers)
                    .map_err(|source| Error::Syscall {
                        call: "io_uring_enter (submit)",
                        source,
                    })
            }
            Engine::Epoll(epoll) => {
                epoll.submit(index);
                Ok(())
            }
        };
        if result.is_err() {
            if let Some(buffer) = op.buffer() {
                self.buffers.give_back(buffer);
            }
            self.slots.release(index);
        }
        result
    }
}

impl Drop for Io {
    fn drop(&mut self) {
        if self.slots.in_flight() == 0 {
            return;
        }
        if let Engine::Uring(ring) = &mut self.engine {
            // The kernel may still write buffers and read slots: cancel everything and
            // wait for the completions; if that fails, leak rather than free under it.
            if !ring.drain_for_drop(&mut self.slots) {
                self.buffers.leak();
                self.slots.leak();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_keys_name_one_use_of_a_slot() {
        let mut slots = Slots::new(2);
        let op = Op::Timeout {
            deadline: Instant::ZERO,
        };
        let a = slots.allocate(10, op).unwrap();
        let key_a = slots.key(a);
        assert_eq!(key_a >> 63, 0, "keys leave the cancel bit clear");
        assert_eq!(slots.lookup(key_a), Some(a));
        assert_eq!(slots.find_token(10), Some(a));
        let b = slots.allocate(11, op).unwrap();
        assert!(slots.allocate(12, op).is_none(), "bounded");
        assert_eq!(slots.in_flight(), 2);
        slots.release(a);
        assert_eq!(slots.lookup(key_a), None, "released");
        let again = slots.allocate(13, op).unwrap();
        assert_eq!(again, a, "the slot is reused");
        assert_ne!(slots.key(again), key_a, "with a new generation");
        assert_eq!(
            slots.lookup(key_a),
            None,
            "a stale key never names the new use"
        );
        assert_eq!(slots.find_token(10), None);
        assert_eq!(slots.lookup(slots.key(b)), Some(b));
        assert_eq!(slots.lookup(u64::from(u32::MAX)), None, "out of range");
    }

    #[test]
    fn results_are_normalised() {
        let mut slots = Slots::new(4);
        let mut buffers = Buffers::new(1, 8);
        let timeout = Op::Timeout {
            deadline: Instant::ZERO,
        };
        let i = slots.allocate(1, timeout).unwrap();
        assert_eq!(
            complete(&mut slots, &mut buffers, i, -libc::ETIME).result,
            Ok(0)
        );
        let i = slots.allocate(2, timeout).unwrap();
        let c = complete(&mut slots, &mut buffers, i, -libc::ECANCELED);
        assert_eq!(c.result, Err(Errno(libc::ECANCELED)));
        let buffer = buffers.acquire().unwrap();
        buffers.lend(buffer);
        let recv = Op::Recv {
            fd: 0,
            buffer,
            offset: 0,
            len: 8,
        };
        let i = slots.allocate(3, recv).unwrap();
        let c = complete(&mut slots, &mut buffers, i, 5);
        assert_eq!(
            (c.token, c.kind, c.result, c.buffer),
            (3, OpKind::Recv, Ok(5), Some(buffer))
        );
        assert!(
            buffers.is_owned(buffer),
            "the completion hands the buffer back"
        );
        assert_eq!(slots.in_flight(), 0);
    }
}
