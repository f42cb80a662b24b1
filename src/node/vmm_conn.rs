//! One control connection from the agent to a `vigil vmm`, on ring operations.
//!
//! The connect is a direct non-blocking Unix connect (it completes at once or fails:
//! no listener, backlog full; the caller retries on a later tick). From then on all
//! socket work is operations on the loop's `Io` (the io_uring ring, emulated on epoll),
//! one code path for both backends:
//!
//! - [`VmmConn::start`] takes two slab buffers, a receive buffer and a send buffer, that
//!   the connection holds for its whole life: a renewal to a connected VMM never waits
//!   for, or fails for lack of, a buffer (`limits.rs` budgets two per local VMM). A
//!   connection that cannot get them is not started (the caller retries next tick).
//! - Receive: one `Io::recv` in flight at all times (so a VMM that closes is noticed at
//!   once). Its bytes join the read buffer, complete replies are decoded and the receive
//!   is resubmitted. Its range keeps the read buffer at most one frame
//!   (`MAX_VMM_CONTROL_FRAME_BYTES`): a reply larger than a slab buffer, or cut anywhere
//!   by the socket, comes in over several receives and is decoded whole.
//! - Send: requests are encoded into `out`; when bytes wait and no send is in flight, up
//!   to one buffer's worth goes out; the completion consumes what was sent and the rest
//!   (a short send) goes next.
//! - Close: [`VmmConn::begin_close`] cancels the operations in flight; the fd stays open
//!   and the buffers held until every one of them completed (ECANCELED included: the
//!   completion brings the buffer back), then both go. Never an fd closed under an
//!   operation in flight.
//!
//! Every completion of a connection's tokens must reach [`VmmConn::on_completion`].

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use vigil_kvm::control::{decode_frame, Reply, Request};

use crate::io::{BufferId, Completion, Errno, Error as IoError, Io, OpKind};
use crate::limits::MAX_VMM_CONTROL_FRAME_BYTES;

/// Request bytes `out` may hold: the request being sent and the next one (the agent sends
/// a request only once the previous one was answered, but the completion of that one's
/// send may arrive after the answer).
const MAX_OUT_BYTES: usize = 2 * MAX_VMM_CONTROL_FRAME_BYTES;

/// What a completion meant for the connection.
#[derive(Debug, PartialEq)]
pub enum Progress {
    /// The replies that are now complete (often none).
    Replies(Vec<Reply>),
    /// The connection is over: the VMM closed it, an operation failed, or the VMM sent
    /// bytes that do not decode. The caller begins the close.
    Failed(String),
    /// A closing connection still waits for one of its operations.
    Closing,
    /// The close finished: the fd is closed and both buffers are back in the slab.
    Closed,
}

pub struct VmmConn {
    /// `None` once the close finished.
    fd: Option<OwnedFd>,
    recv_token: u64,
    send_token: u64,
    /// Bytes of a reply not complete yet (less than one frame).
    rbuf: Vec<u8>,
    /// Encoded requests not sent yet (at most `MAX_OUT_BYTES`).
    out: Vec<u8>,
    /// Held from `start` until the close finished; lent while the receive is in flight.
    recv_buffer: Option<BufferId>,
    /// Held from `start` until the close finished; lent while a send is in flight.
    send_buffer: Option<BufferId>,
    recv_in_flight: bool,
    send_in_flight: bool,
    closing: bool,
}

impl VmmConn {
    /// Connects to the control socket at `path`. A Unix stream connect completes at once
    /// or fails (no listener, backlog full): the caller retries on a later tick.
    pub fn connect(path: &Path) -> io::Result<VmmConn> {
        // SAFETY: sockaddr_un is plain old data; all zeroes is valid.
        let mut sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let bytes = path.as_os_str().as_bytes();
        if bytes.is_empty() || bytes.len() >= sun.sun_path.len() || bytes.contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("control socket path {} is too long", path.display()),
            ));
        }
        for (dst, src) in sun.sun_path.iter_mut().zip(bytes) {
            *dst = *src as libc::c_char;
        }
        // SAFETY: plain syscall; the flags make the fd non-blocking and close-on-exec.
        let raw = unsafe {
            libc::socket(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
        // SAFETY: `sun` holds a NUL-terminated path of `len` bytes in total.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                &sun as *const _ as *const libc::sockaddr,
                len as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(VmmConn::from_fd(fd))
    }

    /// A connection over a connected, non-blocking stream socket (not started).
    fn from_fd(fd: OwnedFd) -> VmmConn {
        VmmConn {
            fd: Some(fd),
            recv_token: 0,
            send_token: 0,
            rbuf: Vec::new(),
            out: Vec::new(),
            recv_buffer: None,
            send_buffer: None,
            recv_in_flight: false,
            send_in_flight: false,
            closing: false,
        }
    }

    /// Whether `token` is one of this connection's (set by `start`; never 0).
    pub fn owns(&self, token: u64) -> bool {
        token != 0 && (token == self.recv_token || token == self.send_token)
    }

    fn raw_fd(&self) -> RawFd {
        self.fd
            .as_ref()
            .expect("a connection whose close has not finished")
            .as_raw_fd()
    }

    /// The process id at the other end (SO_PEERCRED), to watch and, if it hangs, kill.
    pub fn peer_pid(&self) -> Option<i32> {
        // SAFETY: ucred is plain old data; all zeroes is valid.
        let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: `cred` is writable for `len` bytes; the fd is ours.
        let rc = unsafe {
            libc::getsockopt(
                self.raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                &mut cred as *mut _ as *mut libc::c_void,
                &mut len,
            )
        };
        (rc == 0 && cred.pid > 0).then_some(cred.pid)
    }

    /// Takes the connection's two buffers and submits its first receive; its operations
    /// carry `recv_token` and `send_token` (distinct, and no other operation's). On an
    /// error nothing is in flight: the caller closes it ([`VmmConn::begin_close`] finishes
    /// at once).
    pub fn start(&mut self, io: &mut Io, recv_token: u64, send_token: u64) -> Result<(), IoError> {
        assert!(
            self.recv_buffer.is_none() && !self.closing,
            "a connection starts once"
        );
        assert!(recv_token != send_token && recv_token != 0 && send_token != 0);
        self.recv_token = recv_token;
        self.send_token = send_token;
        self.recv_buffer = Some(io.buffer_acquire()?);
        self.send_buffer = Some(io.buffer_acquire()?);
        self.start_recv(io)
    }

    /// Submits the receive, limited so that the read buffer never holds more than one
    /// frame. Decoding consumes every whole frame and refuses longer ones, so what is
    /// left is shorter than a frame: there is always room for one more byte.
    fn start_recv(&mut self, io: &mut Io) -> Result<(), IoError> {
        assert!(!self.recv_in_flight, "one receive in flight per connection");
        assert!(self.rbuf.len() < MAX_VMM_CONTROL_FRAME_BYTES);
        let buffer = self.recv_buffer.expect("started");
        let room = (MAX_VMM_CONTROL_FRAME_BYTES - self.rbuf.len()).min(io.buffer_bytes());
        io.recv(self.recv_token, self.raw_fd(), buffer, 0..room)?;
        self.recv_in_flight = true;
        Ok(())
    }

    /// Queues `request` and starts sending it unless a send is in flight.
    pub fn send(&mut self, io: &mut Io, request: &Request) -> Result<(), String> {
        assert!(!self.closing, "no request on a closing connection");
        let bytes = request.encode();
        if self.out.len() + bytes.len() > MAX_OUT_BYTES {
            return Err(format!(
                "{} request bytes not sent yet; the VMM does not read",
                self.out.len()
            ));
        }
        self.out.extend_from_slice(&bytes);
        self.flush(io)
    }

    /// Starts a send of up to one buffer from the front of `out`, if bytes wait and no
    /// send is in flight. With every operation slot taken the bytes wait for the next
    /// call (the caller flushes every tick); any other error ends the connection.
    pub fn flush(&mut self, io: &mut Io) -> Result<(), String> {
        if self.closing || self.send_in_flight || self.out.is_empty() {
            return Ok(());
        }
        let buffer = self.send_buffer.expect("started");
        let n = self.out.len().min(io.buffer_bytes());
        io.buffer_mut(buffer)[..n].copy_from_slice(&self.out[..n]);
        match io.send(self.send_token, self.raw_fd(), buffer, 0..n) {
            Ok(()) => {
                self.send_in_flight = true;
                Ok(())
            }
            Err(IoError::InFlightFull { .. }) => Ok(()),
            Err(e) => Err(format!("send: {e}")),
        }
    }

    /// Handles a completion of one of the connection's tokens, whatever its result
    /// (ECANCELED included).
    pub fn on_completion(&mut self, io: &mut Io, c: &Completion) -> Progress {
        match c.kind {
            OpKind::Recv => {
                assert!(
                    self.recv_in_flight,
                    "a receive completion with none in flight"
                );
                assert_eq!(c.token, self.recv_token);
                assert_eq!(
                    c.buffer, self.recv_buffer,
                    "the receive's buffer comes back"
                );
                self.recv_in_flight = false;
            }
            OpKind::Send => {
                assert!(self.send_in_flight, "a send completion with none in flight");
                assert_eq!(c.token, self.send_token);
                assert_eq!(c.buffer, self.send_buffer, "the send's buffer comes back");
                self.send_in_flight = false;
            }
            other => panic!("vmm connection: unexpected {other:?} completion"),
        }
        if self.closing {
            return self.finish_close(io);
        }
        match c.kind {
            OpKind::Recv => self.received(io, c.result),
            _ => self.sent(io, c.result),
        }
    }

    /// A receive completed: its bytes join the read buffer, whole replies come off it,
    /// and the next receive goes in.
    fn received(&mut self, io: &mut Io, result: Result<u32, Errno>) -> Progress {
        let replies = match result {
            Ok(0) => return Progress::Failed("the VMM closed the connection".into()),
            Ok(n) => {
                let buffer = self.recv_buffer.expect("started");
                self.rbuf
                    .extend_from_slice(&io.buffer(buffer)[..n as usize]);
                match decode_replies(&mut self.rbuf) {
                    Ok(replies) => replies,
                    Err(e) => return Progress::Failed(e),
                }
            }
            Err(Errno(libc::EAGAIN | libc::EINTR)) => Vec::new(),
            Err(e) => return Progress::Failed(format!("receive: {e}")),
        };
        match self.start_recv(io) {
            Ok(()) => Progress::Replies(replies),
            Err(e) => Progress::Failed(format!("resubmitting the receive: {e}")),
        }
    }

    /// A send completed: what went out leaves `out`, and the rest (a short send, or the
    /// next request) goes next.
    fn sent(&mut self, io: &mut Io, result: Result<u32, Errno>) -> Progress {
        match result {
            Ok(n) => {
                self.out.drain(..n as usize);
            }
            Err(Errno(libc::EAGAIN | libc::EINTR)) => {}
            Err(e) => return Progress::Failed(format!("send: {e}")),
        }
        match self.flush(io) {
            Ok(()) => Progress::Replies(Vec::new()),
            Err(e) => Progress::Failed(e),
        }
    }

    /// Starts the close: cancels the operations in flight. Returns true when it finished
    /// at once (nothing was in flight: the fd is closed and the buffers are back); else
    /// the completions of the cancelled operations finish it ([`Progress::Closed`]).
    pub fn begin_close(&mut self, io: &mut Io) -> bool {
        if !self.closing {
            self.closing = true;
            self.out = Vec::new();
            self.rbuf = Vec::new();
            for (in_flight, token) in [
                (self.recv_in_flight, self.recv_token),
                (self.send_in_flight, self.send_token),
            ] {
                if !in_flight {
                    continue;
                }
                match io.cancel(token) {
                    // UnknownToken: it completed and its completion is in the batch being
                    // dispatched; it still arrives at `on_completion`.
                    Ok(()) | Err(IoError::UnknownToken { .. }) => {}
                    Err(e) => log::error!(
                        "vmm connection: cancelling an operation of a closing connection: {e}"
                    ),
                }
            }
        }
        self.finish_close(io) == Progress::Closed
    }

    /// Once nothing is in flight: the buffers go back and the fd closes.
    fn finish_close(&mut self, io: &mut Io) -> Progress {
        assert!(self.closing);
        if self.recv_in_flight || self.send_in_flight {
            return Progress::Closing;
        }
        for buffer in [self.recv_buffer.take(), self.send_buffer.take()]
            .into_iter()
            .flatten()
        {
            io.buffer_release(buffer);
        }
        self.fd = None; // closes it: nothing of it is in flight any more
        Progress::Closed
    }
}

/// Takes the complete replies off the front of `buf`.
pub fn decode_replies(buf: &mut Vec<u8>) -> Result<Vec<Reply>, String> {
    let mut replies = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        match decode_frame(&buf[at..], MAX_VMM_CONTROL_FRAME_BYTES) {
            Ok(None) => break,
            Ok(Some((frame, used))) => {
                let reply = Reply::decode(&frame).map_err(|e| format!("bad reply: {e}"))?;
                replies.push(reply);
                at += used;
            }
            Err(e) => return Err(format!("bad frame: {e}")),
        }
    }
    buf.drain(..at);
    Ok(replies)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{BackendChoice, Instant};
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;
    use vigil_kvm::control::{Status, VmmState};

    const RECV: u64 = 7 << 56 | 1;
    const SEND: u64 = 9 << 56 | 1;

    #[test]
    fn decodes_replies_split_anywhere_and_rejects_garbage() {
        let status = Reply::Status(Status {
            state: VmmState::Running,
            token: 7,
            counter: 42,
            reports: 3,
            lease_deadline_ns: 99,
            last_snapshot_id: 5,
        });
        let bytes = [status.encode(), status.encode()].concat();
        for cut in 0..bytes.len() {
            let mut buf = bytes[..cut].to_vec();
            let mut got = decode_replies(&mut buf).unwrap();
            buf.extend_from_slice(&bytes[cut..]);
            got.extend(decode_replies(&mut buf).unwrap());
            assert_eq!(got, vec![status.clone(), status.clone()], "cut at {cut}");
            assert!(buf.is_empty());
        }
        let mut garbage = b"HTTP/1.1 200 OK\r\n".to_vec();
        let e = decode_replies(&mut garbage).unwrap_err();
        assert!(e.contains("magic"), "{e}");
    }

    #[test]
    fn connects_only_to_a_listener_and_knows_its_pid() {
        let dir = std::env::temp_dir().join(format!("vigil-vmmconn-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("c.sock");
        let _ = std::fs::remove_file(&path);
        assert!(VmmConn::connect(&path).is_err(), "nobody listens yet");
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let conn = VmmConn::connect(&path).unwrap();
        assert_eq!(conn.peer_pid(), Some(std::process::id() as i32));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A started connection on `backend` over a socketpair, the other end (blocking)
    /// standing in for the VMM; `None` when io_uring is not available here.
    fn setup(
        backend: BackendChoice,
        buffer_bytes: usize,
    ) -> Option<(Io, VmmConn, UnixStream, usize)> {
        let config = crate::io::Config {
            backend,
            ring_entries: 64,
            max_in_flight: 64,
            buffer_count: 8,
            buffer_bytes,
            fail_uring_setup: None,
        };
        let mut io = match Io::new(&config) {
            Ok(io) => io,
            Err(e) => {
                assert_eq!(backend, BackendChoice::Uring, "epoll always works: {e}");
                eprintln!("skipped: io_uring is not available here ({e})");
                return None;
            }
        };
        let start_free = io.buffers_free();
        let (ours, vmm) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut conn = VmmConn::from_fd(OwnedFd::from(ours));
        conn.start(&mut io, RECV, SEND).unwrap();
        assert_eq!(io.buffers_free(), start_free - 2, "two buffers held");
        Some((io, conn, vmm, start_free))
    }

    /// One loop turn: the completions of the connection, in order, with their kinds.
    fn turn(io: &mut Io, conn: &mut VmmConn) -> Vec<(OpKind, Progress)> {
        let mut out = [Completion::EMPTY; 16];
        let deadline = Instant::now().saturating_add(Duration::from_millis(5));
        let n = io.wait(Some(deadline), &mut out).unwrap();
        out[..n]
            .iter()
            .map(|c| {
                assert!(c.token == RECV || c.token == SEND, "{c:?}");
                (c.kind, conn.on_completion(io, c))
            })
            .collect()
    }

    /// Turns until at least one completion came and `done` holds for what came (panics
    /// after 5 s); returns every completion seen.
    fn turn_until(
        io: &mut Io,
        conn: &mut VmmConn,
        what: &str,
        done: impl Fn(&[(OpKind, Progress)]) -> bool,
    ) -> Vec<(OpKind, Progress)> {
        let limit = std::time::Instant::now() + Duration::from_secs(5);
        let mut seen = Vec::new();
        while seen.is_empty() || !done(&seen) {
            assert!(std::time::Instant::now() < limit, "never: {what}: {seen:?}");
            seen.extend(turn(io, conn));
        }
        seen
    }

    /// The identity of the file an fd number names now (None: the number is closed).
    fn file_of(fd: RawFd) -> Option<(u64, u64)> {
        // SAFETY: stat is plain old data; fstat writes it whole or fails.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `st` is writable; an fd number that is not open gives EBADF.
        let rc = unsafe { libc::fstat(fd, &mut st) };
        (rc == 0).then_some((st.st_dev, st.st_ino))
    }

    fn both(test: fn(BackendChoice)) {
        test(BackendChoice::Uring);
        test(BackendChoice::Epoll);
    }

    #[test]
    fn a_close_with_a_receive_in_flight_keeps_the_fd_until_its_completion() {
        both(|backend| {
            let Some((mut io, mut conn, mut vmm, start_free)) = setup(backend, 4096) else {
                return;
            };
            let fd = conn.raw_fd();
            let file = file_of(fd).expect("open");
            assert!(conn.recv_in_flight);
            assert!(
                !conn.begin_close(&mut io),
                "{backend:?}: the receive is in flight"
            );
            assert_eq!(file_of(fd), Some(file), "{backend:?}: the fd stays open");
            assert_eq!(io.buffers_free(), start_free - 2, "{backend:?}: still held");
            let seen = turn_until(&mut io, &mut conn, "closed", |_| true);
            assert_eq!(seen, vec![(OpKind::Recv, Progress::Closed)], "{backend:?}");
            // Closed: the number is free, or (tests run in parallel) names another file.
            assert_ne!(file_of(fd), Some(file), "{backend:?}: the fd was closed");
            assert_eq!(
                io.buffers_free(),
                start_free,
                "{backend:?}: both buffers back"
            );
            assert_eq!(io.in_flight(), 0);
            let mut byte = [0u8; 1];
            assert_eq!(
                vmm.read(&mut byte).unwrap(),
                0,
                "{backend:?}: the VMM sees the end"
            );
        });
    }

    /// Requests go out whole; a reply of the largest frame size, written in pieces and
    /// followed at once by another reply, comes in over several receives of a smaller
    /// buffer and is decoded whole, then the second; a larger frame ends the connection.
    #[test]
    fn replies_larger_than_a_buffer_arriving_in_pieces_are_decoded_whole() {
        both(|backend| {
            let Some((mut io, mut conn, mut vmm, start_free)) = setup(backend, 4096) else {
                return;
            };
            conn.send(&mut io, &Request::Status).unwrap();
            // Submitted at the next wait (one io_uring_enter a turn).
            let seen = turn_until(&mut io, &mut conn, "the request sent", |s| {
                s.iter().any(|(k, _)| *k == OpKind::Send)
            });
            assert_eq!(seen, vec![(OpKind::Send, Progress::Replies(vec![]))]);
            assert!(conn.out.is_empty(), "{backend:?}: sent whole");
            let request = Request::Status.encode();
            let mut got = vec![0u8; request.len()];
            vmm.read_exact(&mut got).unwrap();
            assert_eq!(got, request, "{backend:?}");

            let largest = error_frame(MAX_VMM_CONTROL_FRAME_BYTES);
            let status = Reply::Status(Status {
                state: VmmState::Fenced,
                token: 3,
                counter: 1,
                reports: 0,
                lease_deadline_ns: 5,
                last_snapshot_id: 0,
            });
            let mut bytes = largest.clone();
            bytes.extend_from_slice(&status.encode());
            let mut replies = Vec::new();
            let mut receives = 0;
            let mut take = |seen: Vec<(OpKind, Progress)>, replies: &mut Vec<Reply>| {
                for (kind, p) in seen {
                    assert_eq!(kind, OpKind::Recv, "{backend:?}");
                    let Progress::Replies(r) = p else {
                        panic!("{backend:?}: {p:?}")
                    };
                    receives += 1;
                    replies.extend(r);
                }
            };
            for piece in bytes.chunks(1500) {
                vmm.write_all(piece).unwrap();
                take(turn(&mut io, &mut conn), &mut replies);
            }
            while replies.len() < 2 {
                take(
                    turn_until(&mut io, &mut conn, "both replies", |_| true),
                    &mut replies,
                );
            }
            assert!(
                receives >= 3,
                "{backend:?}: {receives} receives (4 KiB each at most)"
            );
            let Reply::Error { code, message } = &replies[0] else {
                panic!("{backend:?}: {:?}", replies[0]);
            };
            assert_eq!(*code, 9);
            assert_eq!(message.len(), MAX_VMM_CONTROL_FRAME_BYTES - 16 - 2);
            assert!(message.bytes().all(|b| b == b'x'));
            assert_eq!(replies[1], status, "{backend:?}");
            assert!(conn.rbuf.is_empty());

            // One byte over the limit: refused once its header is in.
            vmm.write_all(&error_frame(MAX_VMM_CONTROL_FRAME_BYTES + 1)[..16])
                .unwrap();
            let seen = turn_until(&mut io, &mut conn, "refused", |_| true);
            let [(OpKind::Recv, Progress::Failed(why))] = &seen[..] else {
                panic!("{backend:?}: {seen:?}")
            };
            assert!(why.contains("exceeds"), "{backend:?}: {why}");
            assert!(conn.begin_close(&mut io), "{backend:?}: nothing in flight");
            assert_eq!(io.buffers_free(), start_free, "{backend:?}");
        });
    }

    /// The VMM going away ends the connection; so do bytes that are not a reply.
    #[test]
    fn the_vmm_closing_or_sending_garbage_ends_the_connection() {
        both(|backend| {
            let Some((mut io, mut conn, vmm, start_free)) = setup(backend, 4096) else {
                return;
            };
            drop(vmm);
            let seen = turn_until(&mut io, &mut conn, "the end", |_| true);
            assert_eq!(
                seen,
                vec![(
                    OpKind::Recv,
                    Progress::Failed("the VMM closed the connection".into())
                )],
                "{backend:?}"
            );
            assert!(conn.begin_close(&mut io));
            assert_eq!(io.buffers_free(), start_free);

            let Some((mut io, mut conn, mut vmm, _)) = setup(backend, 4096) else {
                return;
            };
            vmm.write_all(b"HTTP/1.1 200 OK\r\n").unwrap();
            let seen = turn_until(&mut io, &mut conn, "refused", |_| true);
            let [(OpKind::Recv, Progress::Failed(why))] = &seen[..] else {
                panic!("{backend:?}: {seen:?}")
            };
            assert!(why.contains("magic"), "{backend:?}: {why}");
        });
    }

    /// An error reply frame of exactly `frame_bytes` bytes (header included), its message
    /// all 'x'.
    fn error_frame(frame_bytes: usize) -> Vec<u8> {
        let mut payload = 9u16.to_le_bytes().to_vec();
        payload.resize(frame_bytes - 16, b'x');
        let mut out = vigil_kvm::control::MAGIC.to_vec();
        out.extend_from_slice(&vigil_kvm::control::PROTOCOL_VERSION.to_le_bytes());
        out.extend_from_slice(&vigil_kvm::control::TYPE_ERROR_REPLY.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&out);
        crc.update(&payload);
        out.extend_from_slice(&crc.finalize().to_le_bytes());
        out.extend_from_slice(&payload);
        assert_eq!(out.len(), frame_bytes);
        out
    }
}
