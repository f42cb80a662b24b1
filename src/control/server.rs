//! Control socket connections: access checks, accept, bounded reads, request parsing,
//! bounded output.
//!
//! Access: the socket file is mode 0600 (or 0660 and owned by the `control_group`), and
//! every connection's peer credentials (SO_PEERCRED) are checked: root, the agent's own
//! uid, and with `control_group` members of that group are served; anyone else gets a
//! 403 and the connection is closed. Each request is logged with its uid and pid and the
//! request line (method and path; never the query, headers or body), at most
//! `ACCESS_LOG_LINES_PER_SECOND` lines a second.
//!
//! One request at a time per connection (a pipelined second request waits in the read
//! buffer until the first is answered). Limits: at most `MAX_CONTROL_CONNECTIONS`
//! connections (when full, the connection idle the longest without a request in
//! progress is closed to make room; if every one is busy the new one is closed), a
//! request of at most `http::MAX_REQUEST_BYTES` that must arrive whole within
//! `CONTROL_READ_TIMEOUT_MS` of its first byte (else 408), at most
//! `MAX_CONTROL_OUTPUT_BYTES` of queued output, and an idle timeout; a request waiting on
//! the cluster is answered with a timeout error. A slow client never stalls the loop.
//!
//! I/O runs as operations of the event loop's [`Io`] (on the io_uring ring, or emulated
//! by the epoll backend), one code path for both:
//! - `CONTROL_ACCEPTS_IN_FLIGHT` accepts stay in flight on the listener, each submitted
//!   again at the end of the turn that handled it (after an error such as EMFILE only
//!   `ACCEPT_RETRY_MS` later, so the loop does not spin on it). A new connection's
//!   first recv is submitted as soon as it has a slot.
//! - Each connection has at most one recv and one send in flight, each with a slab
//!   buffer. A recv completion appends to the connection's read buffer (bounded: no
//!   recv is submitted while it holds `http::MAX_REQUEST_BYTES`) and feeds the HTTP
//!   parser. Output is queued in `out`; a send carries up to one buffer's worth of it,
//!   its completion consumes what was sent, and the next one goes out until `out` is
//!   drained, then the send buffer goes back to the slab. So an open connection holds one
//!   buffer while idle and two while answering (`limits.rs` budgets two per connection).
//! - Closing (`Connection: close` answered, peer gone, an error, a timeout, eviction)
//!   cancels the connection's operations; the fd is closed and its buffers released only
//!   when every one of them has completed (the completion of a cancelled recv still
//!   brings its buffer back). A closing connection keeps its slot until then; a new
//!   connection that needs that slot waits for it in a small waiting room (accepting
//!   pauses meanwhile), so slots, and with them buffers, stay bounded.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use super::http::{self, HttpError, Request};
use crate::config::GroupSpec;
use crate::io::{socket, BufferId, Completion, Error as IoError, Instant, Io, OpKind};
use crate::limits::{self, CONTROL_ACCEPTS_IN_FLIGHT};
use crate::logging::RateLimit;
use crate::metrics;

/// Access log lines (and refusal warnings) a second; the rest are counted only.
const ACCESS_LOG_LINES_PER_SECOND: u32 = 50;

/// Who may use the control socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// The agent's effective uid.
    pub own_uid: u32,
    /// With `control_group`: its gid (members are served too).
    pub group: Option<u32>,
}

/// A connected client's credentials, from SO_PEERCRED (taken at connect time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

impl Access {
    /// Whether a client with these credentials may use the API. Group membership counts
    /// the primary gid and the supplementary groups of the connecting process.
    pub fn allows(&self, cred: &PeerCred) -> bool {
        if cred.uid == 0 || cred.uid == self.own_uid {
            return true;
        }
        match self.group {
            Some(gid) => cred.gid == gid || supplementary_groups(cred.pid).contains(&gid),
            None => false,
        }
    }

    fn describe(&self) -> String {
        match self.group {
            Some(gid) => format!("root, uid {} and group {gid}", self.own_uid),
            None => format!("root and uid {}", self.own_uid),
        }
    }
}

/// The supplementary groups of a process (`Groups:` in /proc/PID/status); empty when the
/// process is gone or the file cannot be read.
fn supplementary_groups(pid: i32) -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("Groups:"))
        .map(|list| {
            list.split_whitespace()
                .filter_map(|g| g.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// SO_PEERCRED of a connected Unix socket.
pub fn peer_cred(fd: &OwnedFd) -> std::io::Result<PeerCred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a writable ucred and `len` its size, as SO_PEERCRED expects.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(PeerCred {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// Looks a group up: a gid as is, a name in /etc/group (read directly: the static binary
/// has no NSS).
pub fn resolve_group(spec: &GroupSpec) -> Result<u32, String> {
    let name = match spec {
        GroupSpec::Id(gid) => return Ok(*gid),
        GroupSpec::Name(name) => name,
    };
    let text = std::fs::read_to_string("/etc/group")
        .map_err(|e| format!("control_group {name:?}: cannot read /etc/group: {e}"))?;
    group_in(&text, name).ok_or_else(|| {
        format!("control_group {name:?}: no such group in /etc/group (a numeric gid works too)")
    })
}

fn group_in(etc_group: &str, name: &str) -> Option<u32> {
    etc_group.lines().find_map(|line| {
        let mut fields = line.split(':');
        let group = fields.next()?;
        let _password = fields.next()?;
        let gid = fields.next()?.parse().ok()?;
        (group == name).then_some(gid)
    })
}

/// Creates the control socket: mode 0600, or with a group 0660 owned by that group. The
/// file gets its final owner and mode before `listen`, so no client connects earlier.
pub fn listen(path: &Path, group: Option<&GroupSpec>) -> Result<(OwnedFd, Access), String> {
    let gid = group.map(resolve_group).transpose()?;
    let _ = std::fs::remove_file(path);
    let fd = socket::unix_listen(path, 0o600, 128)
        .map_err(|e| format!("control socket {}: {e}", path.display()))?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(|e| {
            format!(
                "control socket {}: chown to group {gid}: {e}",
                path.display()
            )
        })?;
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o660))
            .map_err(|e| format!("control socket {}: chmod 660: {e}", path.display()))?;
    }
    // SAFETY: geteuid has no preconditions.
    let own_uid = unsafe { libc::geteuid() };
    Ok((
        fd,
        Access {
            own_uid,
            group: gid,
        },
    ))
}

/// Counters of refused and cut-off control connections, rendered into /metrics.
#[derive(Debug, Default)]
pub struct ControlCounters {
    pub refused_uid: u64,
    pub refused_full: u64,
    pub evicted_idle: u64,
    pub read_timeouts: u64,
    /// Connections closed because the I/O layer had no buffer (or no operation slot) for
    /// their next recv or send.
    pub no_buffers: u64,
}

/// Token kind (bits 56..64) of the accepts on the control listener; the low bits are
/// the accept's index (`0..CONTROL_ACCEPTS_IN_FLIGHT`).
pub const TOKEN_CONTROL_ACCEPT: u64 = 4;
/// Token kind of a control connection's recv and send: bits 48..56 say which, the low
/// 48 bits are the connection id.
pub const TOKEN_CONTROL_CONN: u64 = 5;
const OP_RECV: u64 = 1 << 48;
const OP_SEND: u64 = 2 << 48;
const ID_MASK: u64 = (1 << 48) - 1;

/// After an accept failed (EMFILE, ENFILE, ENOMEM...), accepting resumes this much later
/// instead of spinning on the error.
const ACCEPT_RETRY_MS: u64 = 10;

fn accept_token(index: usize) -> u64 {
    (TOKEN_CONTROL_ACCEPT << 56) | index as u64
}

fn recv_token(id: u64) -> u64 {
    (TOKEN_CONTROL_CONN << 56) | OP_RECV | id
}

fn send_token(id: u64) -> u64 {
    (TOKEN_CONTROL_CONN << 56) | OP_SEND | id
}

/// A recv or send could not be submitted (no buffer, no operation slot): the connection
/// is marked broken, so `flush` closes it, with a counter and a rate-limited warning.
fn connection_failed(
    counters: &mut ControlCounters,
    log_budget: &mut RateLimit,
    id: u64,
    conn: &mut ControlConn,
    e: IoError,
) {
    conn.broken = true;
    if matches!(e, IoError::NoBuffers { .. } | IoError::InFlightFull { .. }) {
        counters.no_buffers += 1;
    }
    if log_budget.allow("control access") {
        log::warn!("control: closing connection {id}: {e}");
    }
}

/// Whether a completion belongs to the control server (its accepts and connections).
pub fn owns(token: u64) -> bool {
    matches!(token >> 56, TOKEN_CONTROL_ACCEPT | TOKEN_CONTROL_CONN)
}

pub struct ControlConn {
    fd: OwnedFd,
    cred: PeerCred,
    /// The credentials passed the access check; if not, the request is answered 403.
    allowed: bool,
    /// The request being served asked for `Connection: close` (or is HTTP/1.0): the
    /// connection closes after its answer, whatever the answer.
    close_requested: bool,
    /// When the first byte of the request now being read arrived.
    request_started: Option<Instant>,
    rbuf: Vec<u8>,
    /// Output; `out[..sent]` is gone already (compacted from time to time).
    out: Vec<u8>,
    sent: usize,
    /// A request is being served; its answer is not written yet.
    pub busy_since: Option<Instant>,
    last_activity: Instant,
    close_after_write: bool,
    /// Subscribed to `/events`.
    pub streaming: bool,
    /// To be closed (peer gone, error, idle, too far behind): `flush` starts the close.
    broken: bool,
    /// Closing: its operations were cancelled; the fd is closed and the buffers released
    /// once both completed. Nothing is read, written or served any more.
    closing: bool,
    /// The slab buffer of this connection's recv (lent while `recv_in_flight`).
    recv_buffer: Option<BufferId>,
    recv_in_flight: bool,
    /// The slab buffer of this connection's send (lent while a send is in flight); it
    /// is released when the output is drained.
    send_buffer: Option<BufferId>,
    /// Bytes of the send in flight (`out[sent..sent + n]`).
    send_in_flight: Option<usize>,
}

impl ControlConn {
    fn new(fd: OwnedFd, cred: PeerCred, allowed: bool, now: Instant) -> ControlConn {
        ControlConn {
            fd,
            cred,
            allowed,
            close_requested: false,
            request_started: None,
            rbuf: Vec::new(),
            out: Vec::new(),
            sent: 0,
            busy_since: None,
            last_activity: now,
            close_after_write: false,
            streaming: false,
            broken: false,
            closing: false,
            recv_buffer: None,
            recv_in_flight: false,
            send_buffer: None,
            send_in_flight: None,
        }
    }

    /// Output bytes not sent yet (including those of the send in flight).
    fn unsent(&self) -> usize {
        self.out.len() - self.sent
    }

    fn in_flight(&self) -> bool {
        self.recv_in_flight || self.send_in_flight.is_some()
    }

    /// Could be closed to make room for a new connection: open, no request being
    /// served, not streaming, nothing left to write.
    fn evictable(&self) -> bool {
        !self.closing
            && self.busy_since.is_none()
            && !self.streaming
            && self.unsent() == 0
            && self.send_in_flight.is_none()
    }
}

pub struct ControlServer {
    listener: OwnedFd,
    /// Every connection with a slot: open ones and closing ones (waiting for their
    /// operations to complete). At most `MAX_CONTROL_CONNECTIONS`.
    conns: HashMap<u64, ControlConn>,
    next_id: u64,
    /// Which of the accepts are in flight.
    accepting: [bool; CONTROL_ACCEPTS_IN_FLIGHT],
    /// Accepting resumes at this time after an accept error.
    accept_paused_until: Option<Instant>,
    /// Accepted connections waiting for a closing one to give up its slot (every slot was
    /// taken; one was evicted for each). No operation is in flight on them. While any
    /// waits, no accept is submitted, so at most `CONTROL_ACCEPTS_IN_FLIGHT` wait.
    waiting_room: Vec<ControlConn>,
    /// Connection ids of one `flush` (kept to avoid allocating every turn).
    scratch: Vec<u64>,
    access: Access,
    log_budget: RateLimit,
    pub counters: ControlCounters,
}

impl ControlServer {
    /// A server for the connections of `listener` (from [`listen`]). Accepting starts
    /// at the first [`ControlServer::flush`].
    pub fn new(access: Access, listener: OwnedFd) -> ControlServer {
        ControlServer {
            listener,
            conns: HashMap::with_capacity(limits::MAX_CONTROL_CONNECTIONS),
            next_id: 1,
            accepting: [false; CONTROL_ACCEPTS_IN_FLIGHT],
            accept_paused_until: None,
            waiting_room: Vec::with_capacity(CONTROL_ACCEPTS_IN_FLIGHT),
            scratch: Vec::with_capacity(limits::MAX_CONTROL_CONNECTIONS),
            access,
            log_budget: RateLimit::new(ACCESS_LOG_LINES_PER_SECOND),
            counters: ControlCounters::default(),
        }
    }

    /// Handles a completion of one of the server's operations ([`owns`] its token),
    /// whatever its result (ECANCELED included: the buffer comes back with it). Returns
    /// a request to serve, with its connection id, when one is complete.
    pub fn on_completion(
        &mut self,
        io: &mut Io,
        c: Completion,
        now: Instant,
    ) -> Option<(u64, Request)> {
        let kind = c.token >> 56;
        if kind == TOKEN_CONTROL_ACCEPT {
            self.accept_completed(io, c, now);
            return None;
        }
        assert_eq!(
            kind, TOKEN_CONTROL_CONN,
            "not a control token: {:#x}",
            c.token
        );
        let id = c.token & ID_MASK;
        let op = c.token & !ID_MASK & ((1 << 56) - 1);
        let conn = self
            .conns
            .get_mut(&id)
            .unwrap_or_else(|| panic!("control: completion for connection {id}, which is gone"));
        match (op, c.kind) {
            (OP_RECV, OpKind::Recv) => {
                assert!(conn.recv_in_flight && c.buffer == conn.recv_buffer);
                conn.recv_in_flight = false;
                if !conn.closing {
                    match c.result {
                        Ok(0) | Err(_) => conn.broken = true,
                        Ok(n) => {
                            let buffer = conn.recv_buffer.expect("recv has a buffer");
                            if conn.rbuf.is_empty() && conn.request_started.is_none() {
                                conn.request_started = Some(now);
                            }
                            conn.rbuf
                                .extend_from_slice(&io.buffer(buffer)[..n as usize]);
                            conn.last_activity = now;
                        }
                    }
                }
            }
            (OP_SEND, OpKind::Send) => {
                let asked = conn.send_in_flight.take().expect("a send was in flight");
                assert!(c.buffer.is_some() && c.buffer == conn.send_buffer);
                if !conn.closing {
                    match c.result {
                        Ok(n) if n > 0 && n as usize <= asked => conn.sent += n as usize,
                        // 0 bytes sent of a non-empty range, or an error: the peer is gone.
                        _ => conn.broken = true,
                    }
                }
            }
            _ => panic!("control: unexpected completion {c:?}"),
        }
        if self.conns[&id].closing {
            self.finish_close(io, id);
            return None;
        }
        self.next_request(id).map(|req| (id, req))
    }

    fn accept_completed(&mut self, io: &mut Io, c: Completion, now: Instant) {
        let index = (c.token & ID_MASK) as usize;
        assert!(index < CONTROL_ACCEPTS_IN_FLIGHT && self.accepting[index]);
        self.accepting[index] = false;
        match c.result {
            Ok(fd) => {
                // SAFETY: a successful accept hands us a new fd that nothing else owns.
                let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
                self.accepted(io, fd, now);
            }
            Err(e) if e.0 == libc::ECANCELED => {}
            // The client gave up before the accept (or a signal): accept the next one.
            Err(e) if matches!(e.0, libc::ECONNABORTED | libc::EINTR | libc::EAGAIN) => {}
            Err(e) => {
                // EMFILE and friends: retrying at once would fail the same way and spin.
                self.accept_paused_until =
                    Some(now.saturating_add(Duration::from_millis(ACCEPT_RETRY_MS)));
                if self.log_budget.allow("control access") {
                    log::warn!("control: accept failed: {e}; retrying in {ACCEPT_RETRY_MS} ms");
                }
            }
        }
    }

    /// Submits the accepts not in flight, unless accepting is paused.
    fn accept_more(&mut self, io: &mut Io, now: Instant) {
        if let Some(until) = self.accept_paused_until {
            if now < until {
                return;
            }
            self.accept_paused_until = None;
        }
        if !self.waiting_room.is_empty() {
            return; // connections are waiting for a slot: accept no more meanwhile
        }
        for index in 0..CONTROL_ACCEPTS_IN_FLIGHT {
            if self.accepting[index] {
                continue;
            }
            match io.accept(accept_token(index), self.listener.as_raw_fd()) {
                Ok(()) => self.accepting[index] = true,
                Err(e) => {
                    if self.log_budget.allow("control access") {
                        log::warn!("control: cannot submit an accept: {e}; retrying next turn");
                    }
                    return;
                }
            }
        }
    }

    fn accepted(&mut self, io: &mut Io, fd: OwnedFd, now: Instant) {
        let cred = match peer_cred(&fd) {
            Ok(cred) => cred,
            Err(e) => {
                log::warn!("control: SO_PEERCRED failed ({e}); closing the connection");
                self.counters.refused_uid += 1;
                return;
            }
        };
        // A refused client still gets its request read (under the usual limits), so that
        // it sees the 403 instead of a broken pipe; nothing of it is served.
        let allowed = self.access.allows(&cred);
        if !allowed {
            self.counters.refused_uid += 1;
        }
        let conn = ControlConn::new(fd, cred, allowed, now);
        if self.conns.len() < limits::MAX_CONTROL_CONNECTIONS {
            self.admit(io, conn);
            return;
        }
        // Every slot is taken. A closing connection gives its slot up when its operations
        // complete; one not yet promised to a waiting connection is this one's. Else make
        // room by closing the connection idle the longest, unless every one is serving a
        // request or a stream.
        let closing = self.conns.values().filter(|c| c.closing).count();
        if closing <= self.waiting_room.len() {
            let idlest = self
                .conns
                .iter()
                .filter(|(_, c)| c.evictable())
                .min_by_key(|(_, c)| c.last_activity)
                .map(|(&id, _)| id);
            let Some(old) = idlest else {
                self.counters.refused_full += 1;
                if self.log_budget.allow("control access") {
                    log::warn!(
                        "control: {} connections open, all busy; refusing one",
                        self.conns.len()
                    );
                }
                return; // drops (closes) the new fd: no operation was submitted on it
            };
            self.counters.evicted_idle += 1;
            if self.log_budget.allow("control access") {
                log::warn!(
                    "control: {} connections open; closing the idlest to make room",
                    limits::MAX_CONTROL_CONNECTIONS
                );
            }
            self.begin_close(io, old);
            if self.conns.len() < limits::MAX_CONTROL_CONNECTIONS {
                self.admit(io, conn); // it had nothing in flight and is gone already
                return;
            }
        }
        assert!(self.waiting_room.len() < CONTROL_ACCEPTS_IN_FLIGHT);
        self.waiting_room.push(conn);
    }

    /// Gives a connection a slot and submits its first recv (if that fails, the next
    /// `flush` closes it).
    fn admit(&mut self, io: &mut Io, mut conn: ControlConn) {
        assert!(self.conns.len() < limits::MAX_CONTROL_CONNECTIONS);
        let id = self.next_id;
        self.next_id += 1;
        assert!(id <= ID_MASK);
        if let Err(e) = Self::submit_recv(io, id, &mut conn) {
            connection_failed(&mut self.counters, &mut self.log_budget, id, &mut conn, e);
        }
        self.conns.insert(id, conn);
    }

    /// Starts closing a connection: cancels its operations; the fd is closed and its
    /// buffers released when the last one completed (at once if none is in flight).
    fn begin_close(&mut self, io: &mut Io, id: u64) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if conn.closing {
            return;
        }
        conn.closing = true;
        conn.broken = true;
        for (in_flight, token) in [
            (conn.recv_in_flight, recv_token(id)),
            (conn.send_in_flight.is_some(), send_token(id)),
        ] {
            if !in_flight {
                continue;
            }
            match io.cancel(token) {
                // UnknownToken: it completed already and its completion is on its way
                // to us in this turn's batch.
                Ok(()) | Err(IoError::UnknownToken { .. }) => {}
                Err(e) => log::warn!(
                    "control: cancelling an operation of connection {id}: {e}; the \
                     connection closes when it completes"
                ),
            }
        }
        self.finish_close(io, id);
    }

    /// Closes a closing connection whose operations all completed: releases its buffers,
    /// closes its fd, and gives its slot to a connection in the waiting room.
    fn finish_close(&mut self, io: &mut Io, id: u64) {
        let done = self
            .conns
            .get(&id)
            .is_some_and(|c| c.closing && !c.in_flight());
        if !done {
            return;
        }
        let conn = self.conns.remove(&id).expect("checked above");
        for buffer in [conn.recv_buffer, conn.send_buffer].into_iter().flatten() {
            io.buffer_release(buffer);
        }
        drop(conn.fd); // nothing of it is in flight any more
        if !self.waiting_room.is_empty() {
            let next = self.waiting_room.remove(0);
            self.admit(io, next);
        }
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut ControlConn> {
        self.conns.get_mut(&id).filter(|c| !c.closing)
    }

    /// The next buffered request of an idle connection.
    pub fn next_request(&mut self, id: u64) -> Option<Request> {
        let conn = self.conns.get_mut(&id)?;
        if conn.busy_since.is_some()
            || conn.streaming
            || conn.broken
            || conn.closing
            || conn.close_after_write
        {
            return None;
        }
        match http::parse_request(&conn.rbuf) {
            Ok(None) => {
                if conn.rbuf.len() >= http::MAX_REQUEST_BYTES {
                    let e = HttpError::HeadTooLarge;
                    http::write_json_response(
                        &mut conn.out,
                        e.status(),
                        &http::error_body(&e),
                        true,
                    );
                    conn.close_after_write = true;
                }
                None
            }
            Ok(Some(req)) => {
                conn.rbuf.drain(..req.consumed);
                conn.busy_since = Some(conn.last_activity);
                // A pipelined next request started when its bytes came in.
                conn.request_started = (!conn.rbuf.is_empty()).then_some(conn.last_activity);
                if !conn.allowed {
                    if self.log_budget.allow("control access") {
                        log::warn!(
                            "control: refused uid {} gid {} pid {}: {} {}: only {} may use \
                             the control socket",
                            conn.cred.uid,
                            conn.cred.gid,
                            conn.cred.pid,
                            req.method.as_str(),
                            req.path,
                            self.access.describe()
                        );
                    }
                    let e = format!(
                        "uid {} may not use this control socket (allowed: {})",
                        conn.cred.uid,
                        self.access.describe()
                    );
                    http::write_json_response(
                        &mut conn.out,
                        403,
                        &serde_json::json!({ "error": e, "code": "forbidden" }).to_string(),
                        true,
                    );
                    conn.busy_since = None;
                    conn.close_after_write = true;
                    return None;
                }
                conn.close_requested = req.close;
                if self.log_budget.allow("control access") {
                    log::info!(
                        "control: uid {} pid {}: {} {}",
                        conn.cred.uid,
                        conn.cred.pid,
                        req.method.as_str(),
                        req.path
                    );
                }
                Some(req)
            }
            Err(e) => {
                http::write_json_response(&mut conn.out, e.status(), &http::error_body(&e), true);
                conn.close_after_write = true;
                None
            }
        }
    }

    /// Writes the answer to the request being served.
    pub fn respond(&mut self, id: u64, status: u16, content_type: &str, body: &[u8], close: bool) {
        let Some(conn) = self.get_mut(id) else {
            return;
        };
        conn.busy_since = None;
        let close = close || conn.close_requested;
        http::write_response(&mut conn.out, status, content_type, body, close);
        if close {
            conn.close_after_write = true;
        }
    }

    /// Starts a stream (`/events`): a head without a length, then raw lines.
    pub fn start_stream(&mut self, id: u64) {
        let Some(conn) = self.get_mut(id) else {
            return;
        };
        conn.busy_since = None;
        conn.streaming = true;
        conn.out.extend_from_slice(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n\r\n",
        );
    }

    pub fn stream_bytes(&mut self, id: u64) -> Option<&mut Vec<u8>> {
        self.get_mut(id).filter(|c| c.streaming).map(|c| &mut c.out)
    }

    /// Requests waiting longer than the limit, and idle connections to close. Requests
    /// still arriving after the read timeout are answered 408 here.
    pub fn expired(&mut self, now: Instant) -> Vec<u64> {
        let timeout = Duration::from_millis(limits::CONTROL_REQUEST_TIMEOUT_MS);
        let idle = Duration::from_millis(limits::CONTROL_IDLE_TIMEOUT_MS);
        let read = Duration::from_millis(limits::CONTROL_READ_TIMEOUT_MS);
        let mut waited = Vec::new();
        for (&id, c) in self.conns.iter_mut() {
            if c.closing {
                continue;
            }
            let reading = c.busy_since.is_none() && !c.streaming && !c.close_after_write;
            if let Some(started) = c.request_started.filter(|_| reading) {
                if now.saturating_duration_since(started) >= read {
                    let e = HttpError::RequestTimeout;
                    http::write_json_response(&mut c.out, e.status(), &http::error_body(&e), true);
                    c.close_after_write = true;
                    self.counters.read_timeouts += 1;
                    continue;
                }
            }
            if let Some(since) = c.busy_since {
                if now.saturating_duration_since(since) >= timeout {
                    waited.push(id);
                }
            } else if !c.streaming
                && c.unsent() == 0
                && now.saturating_duration_since(c.last_activity) >= idle
            {
                c.broken = true;
            }
        }
        waited
    }

    /// Once per loop turn, after the turn's work: submits the accepts, each open
    /// connection's next recv (while its read buffer has room) and next send (while it
    /// has output), and starts closing the connections that are finished (answered with
    /// `Connection: close`), broken, or too far behind. Completions drive the rest: the
    /// loop never needs to come back early for the control socket.
    pub fn flush(&mut self, io: &mut Io, now: Instant) {
        self.accept_more(io, now);
        let mut ids = std::mem::take(&mut self.scratch);
        ids.clear();
        ids.extend(self.conns.keys().copied());
        for &id in &ids {
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            if c.closing {
                continue;
            }
            if c.unsent() > limits::MAX_CONTROL_OUTPUT_BYTES {
                log::warn!(
                    "control: a reader fell {} bytes behind; closing",
                    c.unsent()
                );
                c.broken = true;
            }
            let finished = c.close_after_write && c.unsent() == 0;
            if !c.broken && !finished {
                if let Err(e) =
                    Self::submit_send(io, id, c).and_then(|()| Self::submit_recv(io, id, c))
                {
                    connection_failed(&mut self.counters, &mut self.log_budget, id, c, e);
                }
            }
            if self.conns[&id].broken || finished {
                self.begin_close(io, id);
            }
        }
        self.scratch = ids;
    }

    /// The next send, if output waits and none is in flight: up to one buffer's worth.
    fn submit_send(io: &mut Io, id: u64, c: &mut ControlConn) -> Result<(), IoError> {
        if c.send_in_flight.is_some() {
            return Ok(());
        }
        let unsent = c.unsent();
        if unsent == 0 {
            c.out.clear();
            c.sent = 0;
            if let Some(buffer) = c.send_buffer.take() {
                io.buffer_release(buffer);
            }
            return Ok(());
        }
        if c.sent > c.out.len() / 2 {
            // Compact now and then: each byte is moved at most once on average.
            c.out.drain(..c.sent);
            c.sent = 0;
        }
        let buffer = match c.send_buffer {
            Some(b) => b,
            None => {
                let b = io.buffer_acquire()?;
                c.send_buffer = Some(b);
                b
            }
        };
        let n = unsent.min(io.buffer_bytes());
        io.buffer_mut(buffer)[..n].copy_from_slice(&c.out[c.sent..c.sent + n]);
        io.send(send_token(id), c.fd.as_raw_fd(), buffer, 0..n)?;
        c.send_in_flight = Some(n);
        Ok(())
    }

    /// The next recv, if none is in flight and the read buffer has room (a full one waits
    /// until the request in it is served, which bounds what a client can pile up).
    fn submit_recv(io: &mut Io, id: u64, c: &mut ControlConn) -> Result<(), IoError> {
        if c.recv_in_flight {
            return Ok(());
        }
        let room = http::MAX_REQUEST_BYTES.saturating_sub(c.rbuf.len());
        if room == 0 {
            if let Some(buffer) = c.recv_buffer.take() {
                io.buffer_release(buffer);
            }
            return Ok(());
        }
        let buffer = match c.recv_buffer {
            Some(b) => b,
            None => {
                let b = io.buffer_acquire()?;
                c.recv_buffer = Some(b);
                b
            }
        };
        let n = room.min(io.buffer_bytes());
        io.recv(recv_token(id), c.fd.as_raw_fd(), buffer, 0..n)?;
        c.recv_in_flight = true;
        Ok(())
    }

    /// Ids of the open connections.
    pub fn ids(&self) -> Vec<u64> {
        self.conns
            .iter()
            .filter(|(_, c)| !c.closing)
            .map(|(&id, _)| id)
            .collect()
    }

    pub fn is_open(&self, id: u64) -> bool {
        self.conns.get(&id).is_some_and(|c| !c.broken && !c.closing)
    }

    /// Connections holding a slot (open or closing), and the closing ones among them.
    pub fn connections(&self) -> (usize, usize) {
        let closing = self.conns.values().filter(|c| c.closing).count();
        (self.conns.len(), closing)
    }

    /// The control socket's counters in Prometheus text.
    pub fn render_metrics(&self, out: &mut String) {
        metrics::render_scalar(
            out,
            "vigil_control_connections",
            "gauge",
            "Open control connections.",
            self.conns.values().filter(|c| !c.closing).count() as u64,
        );
        out.push_str(
            "# HELP vigil_control_connections_refused_total Control connections closed at \
             accept, by reason.\n# TYPE vigil_control_connections_refused_total counter\n",
        );
        for (reason, n) in [
            ("uid", self.counters.refused_uid),
            ("full", self.counters.refused_full),
            ("evicted_idle", self.counters.evicted_idle),
        ] {
            out.push_str(&format!(
                "vigil_control_connections_refused_total{{reason=\"{reason}\"}} {n}\n"
            ));
        }
        metrics::render_scalar(
            out,
            "vigil_control_read_timeouts_total",
            "counter",
            "Control requests that did not arrive whole in time (answered 408).",
            self.counters.read_timeouts,
        );
        metrics::render_scalar(
            out,
            "vigil_control_no_buffers_total",
            "counter",
            "Control connections closed because no I/O buffer or operation slot was free.",
            self.counters.no_buffers,
        );
    }

    /// At shutdown: cancels every operation and closes every fd without waiting for the
    /// cancellations. Only correct because the `Io` is dropped right after (its drop
    /// waits for the operations in flight before freeing the buffers), so nothing reads a
    /// completion of these fds any more.
    pub fn close_all(&mut self, io: &mut Io) {
        for (index, in_flight) in self.accepting.iter_mut().enumerate() {
            if std::mem::take(in_flight) {
                let _ = io.cancel(accept_token(index));
            }
        }
        for (id, c) in self.conns.drain() {
            if c.recv_in_flight {
                let _ = io.cancel(recv_token(id));
            }
            if c.send_in_flight.is_some() {
                let _ = io.cancel(send_token(id));
            }
            drop(c.fd);
        }
        self.waiting_room.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_lookup_reads_etc_group_lines() {
        let text = "root:x:0:\nvigil-ops:x:1234:alice,bob\nbroken line\nops:x:notanumber:\n";
        assert_eq!(group_in(text, "vigil-ops"), Some(1234));
        assert_eq!(group_in(text, "root"), Some(0));
        assert_eq!(group_in(text, "ops"), None);
        assert_eq!(group_in(text, "nobody"), None);
    }

    #[test]
    fn access_allows_root_own_uid_and_the_group_only() {
        let own = Access {
            own_uid: 1000,
            group: None,
        };
        let cred = |uid, gid| PeerCred { pid: 0, uid, gid };
        assert!(own.allows(&cred(0, 0)));
        assert!(own.allows(&cred(1000, 1000)));
        assert!(!own.allows(&cred(1001, 1000)));
        let grouped = Access {
            own_uid: 1000,
            group: Some(777),
        };
        assert!(grouped.allows(&cred(1001, 777)));
        assert!(!grouped.allows(&cred(1001, 778)));
    }
}

/// The server on both I/O backends, driven like the node's loop drives it, with real
/// clients on a real Unix socket.
#[cfg(test)]
mod ring_tests {
    use super::*;
    use crate::io::{BackendChoice, Config};
    use std::io::{ErrorKind, Read, Write};
    use std::os::unix::net::UnixStream;
    use std::path::PathBuf;

    struct Harness {
        io: Io,
        server: ControlServer,
        path: PathBuf,
        dir: PathBuf,
        completions: Vec<Completion>,
        buffers_at_start: usize,
    }

    impl Drop for Harness {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// A server on `backend` with small buffers (4 KiB: big answers take many sends);
    /// `None` when io_uring is not available here.
    fn harness(backend: BackendChoice, name: &str) -> Option<Harness> {
        harness_with(backend, name, 2 * limits::MAX_CONTROL_CONNECTIONS + 8)
    }

    fn harness_with(backend: BackendChoice, name: &str, buffers: usize) -> Option<Harness> {
        let config = Config {
            backend,
            ring_entries: 1024,
            max_in_flight: 1024,
            buffer_count: buffers,
            buffer_bytes: 4096,
            ..Config::default()
        };
        let io = match Io::new(&config) {
            Ok(io) => io,
            Err(e) if backend == BackendChoice::Uring => {
                eprintln!("skipped on io_uring: {e}");
                return None;
            }
            Err(e) => panic!("{e}"),
        };
        let dir = std::env::temp_dir().join(format!(
            "vigil-ctlserver-{name}-{backend:?}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("control.sock");
        let (listener, access) = listen(&path, None).unwrap();
        let buffers_at_start = io.buffers_free();
        Some(Harness {
            io,
            server: ControlServer::new(access, listener),
            path,
            dir,
            completions: vec![Completion::EMPTY; 64],
            buffers_at_start,
        })
    }

    impl Harness {
        /// Waits up to 20 ms and hands the completions to the server; returns the
        /// requests that became ready. No flush (see `turn`).
        fn dispatch(&mut self) -> Vec<(u64, Request)> {
            let deadline = Instant::now().saturating_add(Duration::from_millis(20));
            let n = match self.io.wait(Some(deadline), &mut self.completions) {
                Ok(n) => n,
                Err(crate::io::Error::NothingToWaitFor) => 0,
                Err(e) => panic!("{e}"),
            };
            let mut requests = Vec::new();
            for c in self.completions[..n].iter().copied() {
                assert!(owns(c.token), "{c:?}");
                requests.extend(self.server.on_completion(&mut self.io, c, Instant::now()));
            }
            requests
        }

        /// One loop turn: completions, then the flush.
        fn turn(&mut self) -> Vec<(u64, Request)> {
            let requests = self.dispatch();
            self.server.flush(&mut self.io, Instant::now());
            requests
        }

        /// Turns until `done` holds (panics after 10 s).
        fn turn_until(&mut self, what: &str, mut done: impl FnMut(&mut Harness) -> bool) {
            let limit = std::time::Instant::now() + Duration::from_secs(10);
            while !done(self) {
                assert!(std::time::Instant::now() < limit, "never: {what}");
                let requests = self.turn();
                assert!(requests.is_empty(), "unexpected requests while: {what}");
            }
        }
    }

    fn backends() -> [BackendChoice; 2] {
        [BackendChoice::Uring, BackendChoice::Epoll]
    }

    fn body(len: usize, salt: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ salt).collect()
    }

    #[test]
    fn answers_larger_than_a_buffer_arrive_whole_and_in_order() {
        for backend in backends() {
            let Some(mut h) = harness(backend, "big") else {
                continue;
            };
            // Two pipelined requests, the second asking to close: two answers of many
            // buffers each (the first over 64 KiB + headers), in order, then EOF.
            let big = body(64 * 1024 + 300, 0);
            let bigger = body(300 * 1024 + 7, 0x5a);
            let mut client = UnixStream::connect(&h.path).unwrap();
            client
                .write_all(
                    b"GET /kv/a HTTP/1.1\r\n\r\nGET /kv/b HTTP/1.1\r\nConnection: close\r\n\r\n",
                )
                .unwrap();
            let reader = std::thread::spawn(move || {
                client
                    .set_read_timeout(Some(Duration::from_secs(20)))
                    .unwrap();
                let mut all = Vec::new();
                client.read_to_end(&mut all).map(|_| all)
            });
            let mut served = Vec::new();
            let limit = std::time::Instant::now() + Duration::from_secs(20);
            while !reader.is_finished() {
                assert!(std::time::Instant::now() < limit, "{backend:?}: no EOF");
                for (id, req) in h.turn() {
                    let answer = if req.path == "/kv/a" { &big } else { &bigger };
                    served.push(req.path.clone());
                    h.server
                        .respond(id, 200, "application/octet-stream", answer, false);
                    // The next pipelined request, as the node's after_response does.
                    if let Some(req) = h.server.next_request(id) {
                        served.push(req.path.clone());
                        h.server
                            .respond(id, 200, "application/octet-stream", &bigger, false);
                    }
                }
            }
            let all = reader.join().unwrap().expect("read the answers");
            assert_eq!(served, ["/kv/a", "/kv/b"], "{backend:?}");
            let mut expected = Vec::new();
            http::write_response(&mut expected, 200, "application/octet-stream", &big, false);
            http::write_response(
                &mut expected,
                200,
                "application/octet-stream",
                &bigger,
                true,
            );
            assert_eq!(all.len(), expected.len(), "{backend:?}");
            assert!(all == expected, "{backend:?}: the bytes differ");
            h.turn_until("the connection is gone", |h| h.server.connections().0 == 0);
            assert_eq!(h.io.buffers_free(), h.buffers_at_start, "{backend:?}");
        }
    }

    #[test]
    fn eviction_closes_the_fd_only_after_the_cancelled_recv_completed() {
        for backend in backends() {
            let Some(mut h) = harness(backend, "evict") else {
                continue;
            };
            let max = limits::MAX_CONTROL_CONNECTIONS;
            let mut clients = Vec::new();
            for _ in 0..max {
                let c = UnixStream::connect(&h.path).unwrap();
                c.set_nonblocking(true).unwrap();
                clients.push(c);
            }
            // Every connection has a recv in flight, each holding one buffer.
            h.turn_until("all connections admitted", |h| {
                h.server.connections() == (max, 0)
                    && h.io.buffers_free() == h.buffers_at_start - max
            });
            let eof = |mut c: &UnixStream| {
                let mut byte = [0u8; 1];
                match c.read(&mut byte) {
                    Ok(0) => true,
                    Ok(_) => panic!("data from the server"),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => false,
                    Err(_) => true,
                }
            };
            let newcomer = UnixStream::connect(&h.path).unwrap();
            // Completions only, until the newcomer's accept was handled: the idlest
            // connection is closing, its recv cancelled but not completed, so its fd is
            // still open and the newcomer waits for the slot.
            let limit = std::time::Instant::now() + Duration::from_secs(10);
            while h.server.connections().1 == 0 {
                assert!(
                    std::time::Instant::now() < limit,
                    "{backend:?}: no eviction"
                );
                assert!(h.dispatch().is_empty());
            }
            assert_eq!(h.server.connections(), (max, 1), "{backend:?}");
            assert_eq!(h.server.waiting_room.len(), 1);
            assert_eq!(h.server.counters.evicted_idle, 1);
            assert_eq!(
                clients.iter().filter(|c| eof(c)).count(),
                0,
                "{backend:?}: an fd was closed before its recv completed"
            );
            assert_eq!(
                h.io.buffers_free(),
                h.buffers_at_start - max,
                "lent until then"
            );
            // The cancelled recv completes: its buffer comes back, its fd is closed and
            // the newcomer takes the slot (and a buffer for its own recv).
            h.turn_until("the evicted connection closed", |h| {
                h.server.connections() == (max, 0) && h.server.waiting_room.is_empty()
            });
            h.turn();
            assert_eq!(h.io.buffers_free(), h.buffers_at_start - max, "{backend:?}");
            let limit = std::time::Instant::now() + Duration::from_secs(10);
            let evicted = loop {
                let n = clients.iter().filter(|c| eof(c)).count();
                if n > 0 || std::time::Instant::now() > limit {
                    break n;
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            assert_eq!(
                evicted, 1,
                "{backend:?}: exactly the evicted client sees EOF"
            );
            drop(clients);
            drop(newcomer);
            h.turn_until("every connection closed", |h| h.server.connections().0 == 0);
            assert_eq!(h.io.buffers_free(), h.buffers_at_start, "{backend:?}");
        }
    }

    #[test]
    fn a_client_gone_mid_answer_leaks_no_buffer() {
        for backend in backends() {
            let Some(mut h) = harness(backend, "gone") else {
                continue;
            };
            let mut client = UnixStream::connect(&h.path).unwrap();
            client.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
            let mut id = None;
            let limit = std::time::Instant::now() + Duration::from_secs(10);
            while id.is_none() {
                assert!(std::time::Instant::now() < limit, "{backend:?}: no request");
                id = h.turn().first().map(|(id, _)| *id);
            }
            let id = id.unwrap();
            // Far more than the socket buffers hold: sends stay in flight.
            let answer = body(limits::MAX_CONTROL_OUTPUT_BYTES - 4096, 1);
            h.server.respond(id, 200, "text/plain", &answer, false);
            for _ in 0..5 {
                h.turn();
            }
            assert!(h.server.conns[&id].send_in_flight.is_some(), "{backend:?}");
            let mut some = [0u8; 1024];
            client.read_exact(&mut some).unwrap();
            assert!(some.starts_with(b"HTTP/1.1 200 OK\r\n"));
            drop(client);
            h.turn_until("the connection is gone", |h| h.server.connections().0 == 0);
            assert_eq!(h.io.buffers_free(), h.buffers_at_start, "{backend:?}");
            assert_eq!(
                h.io.in_flight(),
                CONTROL_ACCEPTS_IN_FLIGHT,
                "only the accepts"
            );
        }
    }

    #[test]
    fn a_connection_without_a_buffer_is_closed_and_counted() {
        for backend in backends() {
            let Some(mut h) = harness_with(backend, "nobuf", 2) else {
                continue;
            };
            // Two buffers: two idle connections hold one each; the third gets none.
            let first = UnixStream::connect(&h.path).unwrap();
            let second = UnixStream::connect(&h.path).unwrap();
            h.turn_until("two connections", |h| h.server.connections() == (2, 0));
            assert_eq!(h.io.buffers_free(), 0);
            let mut third = UnixStream::connect(&h.path).unwrap();
            h.turn_until("the third refused", |h| h.server.counters.no_buffers == 1);
            h.turn_until("the third closed", |h| h.server.connections() == (2, 0));
            third
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut byte = [0u8; 1];
            assert_eq!(third.read(&mut byte).unwrap(), 0, "{backend:?}: closed");
            // With the second gone, a buffer is free for the first's answer (an answer
            // needs a send buffer beside the recv buffer: limits.rs budgets two per
            // connection, this slab has fewer).
            drop(second);
            h.turn_until("the second closed", |h| h.server.connections() == (1, 0));
            let mut first = first;
            first
                .write_all(b"GET /status HTTP/1.1\r\nConnection: close\r\n\r\n")
                .unwrap();
            let limit = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                assert!(std::time::Instant::now() < limit, "{backend:?}: no request");
                if let Some((id, _)) = h.turn().pop() {
                    // The send needs a buffer too: the closed third gave its back.
                    h.server.respond(id, 200, "application/json", b"{}", false);
                    break;
                }
            }
            let reader = std::thread::spawn(move || {
                let mut all = Vec::new();
                first.read_to_end(&mut all).map(|_| all)
            });
            while !reader.is_finished() {
                h.turn();
            }
            let answer = reader.join().unwrap().unwrap();
            assert!(answer.starts_with(b"HTTP/1.1 200 OK\r\n"), "{backend:?}");
            h.turn_until("all closed", |h| h.server.connections() == (0, 0));
            assert_eq!(h.io.buffers_free(), h.buffers_at_start, "{backend:?}");
        }
    }
}
