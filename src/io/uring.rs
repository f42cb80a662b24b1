//! io_uring backend: every operation is one SQE, every result one CQE.
//!
//! Pointers the kernel reads or writes while an operation is in flight point into
//! memory that never moves until the CQE is consumed: buffers in the slab (lent, so Rust
//! does not touch them), socket addresses and timespecs in the operation's slot (the
//! slot table is a boxed slice that is never resized and is not reused before the CQE).

use std::io;
use std::ptr;

use io_uring::{opcode, register::Probe, types, IoUring};

use super::buffers::Buffers;
use super::clock::Instant;
use super::{complete, Completion, Error, Op, Slot, SlotState, Slots};

/// Marks the CQE of an internal cancel request (keys never have this bit).
const CANCEL_BIT: u64 = 1 << 63;

/// Every opcode the backend submits; the probe must report all of them.
const REQUIRED_OPCODES: [(u8, &str); 9] = [
    (opcode::Accept::CODE, "ACCEPT"),
    (opcode::Connect::CODE, "CONNECT"),
    (opcode::Recv::CODE, "RECV"),
    (opcode::Send::CODE, "SEND"),
    (opcode::PollAdd::CODE, "POLL_ADD"),
    (opcode::Fsync::CODE, "FSYNC"),
    (opcode::Timeout::CODE, "TIMEOUT"),
    (opcode::Close::CODE, "CLOSE"),
    (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
];

pub(crate) struct Uring {
    ring: IoUring,
}

impl Uring {
    /// Sets up the ring and checks it supports everything we use. `fail_setup` is the
    /// test hook that makes setup fail as if io_uring_setup returned that errno.
    pub(crate) fn new(entries: u32, fail_setup: Option<i32>) -> io::Result<Uring> {
        if let Some(errno) = fail_setup {
            return Err(io::Error::other(format!(
                "io_uring_setup: {} (simulated)",
                io::Error::from_raw_os_error(errno)
            )));
        }
        // One thread submits and reaps (Io is not Send), so the kernel may defer
        // completion work until we enter the ring to wait (Linux 6.1): fewer interrupts
        // of the loop, measurably lower round trips. Older kernels refuse the flags with
        // EINVAL; then a plain ring.
        let ring = match IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .build(entries)
        {
            Ok(ring) => ring,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                log::info!("io: io_uring without DEFER_TASKRUN (kernel refused it: {e})");
                IoUring::builder()
                    .build(entries)
                    .map_err(|e| io::Error::new(e.kind(), format!("io_uring_setup: {e}")))?
            }
            Err(e) => return Err(io::Error::new(e.kind(), format!("io_uring_setup: {e}"))),
        };
        if !ring.params().is_feature_ext_arg() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring lacks IORING_FEAT_EXT_ARG (wait with timeout, Linux 5.11)",
            ));
        }
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(|e| io::Error::new(e.kind(), format!("io_uring probe: {e}")))?;
        for (code, name) in REQUIRED_OPCODES {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("io_uring lacks opcode IORING_OP_{name}"),
                ));
            }
        }
        Ok(Uring { ring })
    }

    fn push(&mut self, entry: io_uring::squeue::Entry) -> io::Result<()> {
        // SAFETY (both pushes): every pointer in `entry` stays valid until its CQE (see the
        // module documentation and `submit`).
        if unsafe { self.ring.submission().push(&entry) }.is_ok() {
            return Ok(());
        }
        // The submission queue is full: hand it to the kernel, then there is room.
        self.ring.submit()?;
        unsafe { self.ring.submission().push(&entry) }
            .map_err(|_| io::Error::other("submission queue still full after submit"))
    }

    pub(crate) fn submit(
        &mut self,
        key: u64,
        slot: &mut Slot,
        buffers: &Buffers,
    ) -> io::Result<()> {
        assert_eq!(key & CANCEL_BIT, 0);
        let entry = match slot.op {
            Op::Accept { fd } => {
                opcode::Accept::new(types::Fd(fd), ptr::null_mut(), ptr::null_mut())
                    .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
                    .build()
            }
            Op::Connect { fd } => opcode::Connect::new(
                types::Fd(fd),
                // The address lives in the slot until the CQE.
                &slot.addr as *const libc::sockaddr_storage as *const libc::sockaddr,
                slot.addr_len,
            )
            .build(),
            Op::Recv {
                fd,
                buffer,
                offset,
                len,
            } => {
                // SAFETY: offset + len <= buffer size (checked at submission), so the
                // pointer stays inside the lent buffer.
                let start = unsafe { buffers.ptr(buffer).add(offset as usize) };
                opcode::Recv::new(types::Fd(fd), start, len).build()
            }
            Op::Send {
                fd,
                buffer,
                offset,
                len,
            } => {
                // SAFETY: as for Recv.
                let start = unsafe { buffers.ptr(buffer).add(offset as usize) };
                opcode::Send::new(types::Fd(fd), start, len)
                    .flags(libc::MSG_NOSIGNAL)
                    .build()
            }
            Op::PollIn { fd } => opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build(),
            Op::Fsync { fd, data_only } => {
                let flags = if data_only {
                    types::FsyncFlags::DATASYNC
                } else {
                    types::FsyncFlags::empty()
                };
                opcode::Fsync::new(types::Fd(fd)).flags(flags).build()
            }
            Op::Timeout { deadline } => {
                let nanos = deadline.as_nanos();
                slot.timespec = types::Timespec::new()
                    .sec(nanos / 1_000_000_000)
                    .nsec((nanos % 1_000_000_000) as u32);
                // Absolute on CLOCK_MONOTONIC (the default clock of ring timeouts).
                opcode::Timeout::new(&slot.timespec)
                    .flags(types::TimeoutFlags::ABS)
                    .build()
            }
            Op::Close { fd } => opcode::Close::new(types::Fd(fd)).build(),
        };
        self.push(entry.user_data(key))
    }

    pub(crate) fn cancel(&mut self, key: u64) -> io::Result<()> {
        self.push(
            opcode::AsyncCancel::new(key)
                .build()
                .user_data(key | CANCEL_BIT),
        )
    }

    /// Moves up to `out.len()` CQEs of operations into `out`; returns how many.
    fn reap(&mut self, slots: &mut Slots, buffers: &mut Buffers, out: &mut [Completion]) -> usize {
        let mut filled = 0;
        let mut cq = self.ring.completion();
        while filled < out.len() {
            let Some(cqe) = cq.next() else { break };
            let key = cqe.user_data();
            if key & CANCEL_BIT != 0 {
                // The cancel request's own result (0, ENOENT, EALREADY) does not matter:
                // the target operation reports its outcome in its own CQE.
                continue;
            }
            let index = slots
                .lookup(key)
                .unwrap_or_else(|| panic!("io_uring: completion for unknown key {key:#x}"));
            assert_eq!(slots.get(index).state, SlotState::InFlight);
            out[filled] = complete(slots, buffers, index, cqe.result());
            filled += 1;
        }
        filled
    }

    pub(crate) fn wait(
        &mut self,
        slots: &mut Slots,
        buffers: &mut Buffers,
        deadline: Option<Instant>,
        out: &mut [Completion],
    ) -> Result<usize, Error> {
        loop {
            let filled = self.reap(slots, buffers, out);
            if filled > 0 {
                // Hand queued submissions to the kernel without waiting.
                self.ring.submit().map_err(enter_error)?;
                return Ok(filled);
            }
            let now = Instant::now();
            let result = match deadline {
                Some(deadline) if now >= deadline => {
                    // Submit what is queued and run deferred completion work, then take
                    // whatever completed meanwhile.
                    self.ring.submit().map_err(enter_error)?;
                    return Ok(self.reap(slots, buffers, out));
                }
                Some(deadline) => {
                    let left = types::Timespec::from(deadline.remaining(now));
                    let args = types::SubmitArgs::new().timespec(&left);
                    self.ring.submitter().submit_with_args(1, &args)
                }
                None => {
                    if slots.in_flight() == 0 {
                        return Err(Error::NothingToWaitFor);
                    }
                    self.ring.submit_and_wait(1)
                }
            };
            match result {
                Ok(_) => {}
                // ETIME: the wait timed out; EINTR: a signal; EBUSY: completions are
                // backed up in the kernel. In each case: reap, check the clock, go again.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                    ) => {}
                Err(e) => return Err(enter_error(e)),
            }
        }
    }

    /// At teardown with operations in flight: cancel them all and wait (bounded) for
    /// their CQEs. Returns whether every operation completed.
    pub(crate) fn drain_for_drop(&mut self, slots: &mut Slots) -> bool {
        for index in 0..slots.capacity() {
            let slot = slots.get(index);
            if slot.state == SlotState::InFlight && !slot.cancel_requested {
                let key = slots.key(index);
                if self.cancel(key).is_err() {
                    return false;
                }
                slots.get_mut(index).cancel_requested = true;
            }
        }
        let give_up = Instant::now().saturating_add(std::time::Duration::from_secs(2));
        while slots.in_flight() > 0 {
            let now = Instant::now();
            if now >= give_up {
                return false;
            }
            let left = types::Timespec::from(give_up.remaining(now));
            let args = types::SubmitArgs::new().timespec(&left);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                    ) => {}
                Err(_) => return false,
            }
            let mut cq = self.ring.completion();
            for cqe in &mut cq {
                let key = cqe.user_data();
                if key & CANCEL_BIT != 0 {
                    continue;
                }
                if let Some(index) = slots.lookup(key) {
                    slots.release(index);
                }
            }
        }
        true
    }
}

fn enter_error(source: io::Error) -> Error {
    Error::Syscall {
        call: "io_uring_enter",
        source,
    }
}
