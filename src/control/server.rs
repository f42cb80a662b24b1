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
//! the cluster is answered with a timeout error. Sockets are non-blocking, so a slow
//! client never stalls the loop.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use super::http::{self, HttpError, Request};
use crate::config::GroupSpec;
use crate::io::{socket, Instant, Io};
use crate::limits;
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
}

pub const TOKEN_CONTROL_POLL: u64 = 5;

pub fn token(id: u64) -> u64 {
    (TOKEN_CONTROL_POLL << 56) | id
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
    out: Vec<u8>,
    /// A request is being served; its answer is not written yet.
    pub busy_since: Option<Instant>,
    last_activity: Instant,
    close_after_write: bool,
    /// Subscribed to `/events`.
    pub streaming: bool,
    broken: bool,
}

pub struct ControlServer {
    conns: HashMap<u64, ControlConn>,
    next_id: u64,
    access: Access,
    log_budget: RateLimit,
    pub counters: ControlCounters,
}

impl ControlServer {
    pub fn new(access: Access) -> ControlServer {
        ControlServer {
            conns: HashMap::new(),
            next_id: 1,
            access,
            log_budget: RateLimit::new(ACCESS_LOG_LINES_PER_SECOND),
            counters: ControlCounters::default(),
        }
    }

    pub fn accepted(&mut self, io: &mut Io, fd: OwnedFd, now: Instant) {
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
        if self.conns.len() >= limits::MAX_CONTROL_CONNECTIONS {
            // Make room by closing the connection idle the longest, unless every one is
            // serving a request or a stream.
            let idlest = self
                .conns
                .iter()
                .filter(|(_, c)| c.busy_since.is_none() && !c.streaming && c.out.is_empty())
                .min_by_key(|(_, c)| c.last_activity)
                .map(|(&id, _)| id);
            match idlest {
                Some(old) => {
                    if let Some(c) = self.conns.remove(&old) {
                        let _ = io.cancel(token(old));
                        drop(c.fd);
                    }
                    self.counters.evicted_idle += 1;
                    if self.log_budget.allow("control access") {
                        log::warn!(
                            "control: {} connections open; closed the idlest to make room",
                            limits::MAX_CONTROL_CONNECTIONS
                        );
                    }
                }
                None => {
                    self.counters.refused_full += 1;
                    if self.log_budget.allow("control access") {
                        log::warn!(
                            "control: {} connections open, all busy; refusing one",
                            self.conns.len()
                        );
                    }
                    return;
                }
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        if io.poll_in(token(id), fd.as_raw_fd()).is_ok() {
            self.conns.insert(
                id,
                ControlConn {
                    fd,
                    cred,
                    allowed,
                    close_requested: false,
                    request_started: None,
                    rbuf: Vec::new(),
                    out: Vec::new(),
                    busy_since: None,
                    last_activity: now,
                    close_after_write: false,
                    streaming: false,
                    broken: false,
                },
            );
        }
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut ControlConn> {
        self.conns.get_mut(&id)
    }

    /// Reads what arrived; returns a complete request if one is ready and none is being
    /// served. Parse errors are answered here.
    pub fn readable(&mut self, io: &mut Io, id: u64, now: Instant) -> Option<Request> {
        let conn = self.conns.get_mut(&id)?;
        let mut closed = false;
        let mut chunk = [0u8; 16 * 1024];
        while conn.rbuf.len() < http::MAX_REQUEST_BYTES {
            let room = chunk.len().min(http::MAX_REQUEST_BYTES - conn.rbuf.len());
            // SAFETY: `chunk` is writable for `room` bytes.
            let n = unsafe {
                libc::recv(
                    conn.fd.as_raw_fd(),
                    chunk.as_mut_ptr() as *mut libc::c_void,
                    room,
                    libc::MSG_DONTWAIT,
                )
            };
            if n == 0 {
                closed = true;
                break;
            }
            if n < 0 {
                let e = std::io::Error::last_os_error().raw_os_error();
                if e != Some(libc::EAGAIN) && e != Some(libc::EINTR) {
                    closed = true;
                }
                break;
            }
            if conn.rbuf.is_empty() && conn.request_started.is_none() {
                conn.request_started = Some(now);
            }
            conn.rbuf.extend_from_slice(&chunk[..n as usize]);
            conn.last_activity = now;
        }
        if closed {
            conn.broken = true;
            return None;
        }
        if io.poll_in(token(id), conn.fd.as_raw_fd()).is_err() {
            conn.broken = true;
            return None;
        }
        self.next_request(id)
    }

    /// The next buffered request of an idle connection.
    pub fn next_request(&mut self, id: u64) -> Option<Request> {
        let conn = self.conns.get_mut(&id)?;
        if conn.busy_since.is_some() || conn.streaming || conn.broken || conn.close_after_write {
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
        let Some(conn) = self.conns.get_mut(&id) else {
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
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        conn.busy_since = None;
        conn.streaming = true;
        conn.out.extend_from_slice(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n\r\n",
        );
    }

    pub fn stream_bytes(&mut self, id: u64) -> Option<&mut Vec<u8>> {
        self.conns
            .get_mut(&id)
            .filter(|c| c.streaming)
            .map(|c| &mut c.out)
    }

    /// Requests waiting longer than the limit, and idle connections to close. Requests
    /// still arriving after the read timeout are answered 408 here.
    pub fn expired(&mut self, now: Instant) -> Vec<u64> {
        let timeout = Duration::from_millis(limits::CONTROL_REQUEST_TIMEOUT_MS);
        let idle = Duration::from_millis(limits::CONTROL_IDLE_TIMEOUT_MS);
        let read = Duration::from_millis(limits::CONTROL_READ_TIMEOUT_MS);
        let mut waited = Vec::new();
        for (&id, c) in self.conns.iter_mut() {
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
                && c.out.is_empty()
                && now.saturating_duration_since(c.last_activity) >= idle
            {
                c.broken = true;
            }
        }
        waited
    }

    /// Writes pending output, closes finished and broken connections. Returns true if
    /// output is still pending.
    pub fn flush(&mut self, io: &mut Io) -> bool {
        let mut pending = false;
        let mut dead = Vec::new();
        for (&id, c) in self.conns.iter_mut() {
            while !c.out.is_empty() && !c.broken {
                // SAFETY: `out` is a valid readable slice.
                let n = unsafe {
                    libc::send(
                        c.fd.as_raw_fd(),
                        c.out.as_ptr() as *const libc::c_void,
                        c.out.len(),
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                };
                if n < 0 {
                    match std::io::Error::last_os_error().raw_os_error() {
                        Some(libc::EAGAIN) => pending = true,
                        Some(libc::EINTR) => continue,
                        _ => c.broken = true,
                    }
                    break;
                }
                c.out.drain(..n as usize);
            }
            if c.out.len() > limits::MAX_CONTROL_OUTPUT_BYTES {
                log::warn!(
                    "control: a reader fell {} bytes behind; closing",
                    c.out.len()
                );
                c.broken = true;
            }
            if c.broken || (c.close_after_write && c.out.is_empty()) {
                dead.push(id);
            }
        }
        for id in dead {
            if let Some(c) = self.conns.remove(&id) {
                let _ = io.cancel(token(id));
                drop(c.fd);
            }
        }
        pending
    }

    /// Ids of the connections with a request ready in their buffer.
    pub fn ids(&self) -> Vec<u64> {
        self.conns.keys().copied().collect()
    }

    pub fn is_open(&self, id: u64) -> bool {
        self.conns.get(&id).is_some_and(|c| !c.broken)
    }

    /// The control socket's counters in Prometheus text.
    pub fn render_metrics(&self, out: &mut String) {
        metrics::render_scalar(
            out,
            "vigil_control_connections",
            "gauge",
            "Open control connections.",
            self.conns.len() as u64,
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
    }

    pub fn close_all(&mut self, io: &mut Io) {
        for (id, c) in self.conns.drain() {
            let _ = io.cancel(token(id));
            drop(c.fd);
        }
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
