//! Control socket connections: accept, bounded reads, request parsing, bounded output.
//!
//! One request at a time per connection (a pipelined second request waits in the read
//! buffer until the first is answered). Limits: at most `MAX_CONTROL_CONNECTIONS`
//! connections (further ones are closed at once), a request of at most
//! `http::MAX_REQUEST_BYTES`, at most `MAX_CONTROL_OUTPUT_BYTES` of queued output, and
//! an idle timeout; a request waiting on the cluster is answered with a timeout error.
//! Sockets are non-blocking, so a slow client never stalls the loop.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};

use super::http::{self, HttpError, Request};
use crate::io::{Instant, Io};
use crate::limits;

pub const TOKEN_CONTROL_POLL: u64 = 5;

pub fn token(id: u64) -> u64 {
    (TOKEN_CONTROL_POLL << 56) | id
}

pub struct ControlConn {
    fd: OwnedFd,
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

#[derive(Default)]
pub struct ControlServer {
    conns: HashMap<u64, ControlConn>,
    next_id: u64,
}

impl ControlServer {
    pub fn new() -> ControlServer {
        ControlServer {
            conns: HashMap::new(),
            next_id: 1,
        }
    }

    pub fn accepted(&mut self, io: &mut Io, fd: OwnedFd, now: Instant) {
        if self.conns.len() >= limits::MAX_CONTROL_CONNECTIONS {
            log::warn!(
                "control: {} connections open; refusing one",
                self.conns.len()
            );
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        if io.poll_in(token(id), fd.as_raw_fd()).is_ok() {
            self.conns.insert(
                id,
                ControlConn {
                    fd,
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

    /// Requests waiting longer than the limit, and idle connections to close.
    pub fn expired(&mut self, now: Instant) -> Vec<u64> {
        let timeout = std::time::Duration::from_millis(limits::CONTROL_REQUEST_TIMEOUT_MS);
        let idle = std::time::Duration::from_millis(limits::CONTROL_IDLE_TIMEOUT_MS);
        let mut waited = Vec::new();
        for (&id, c) in self.conns.iter_mut() {
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

    pub fn close_all(&mut self, io: &mut Io) {
        for (id, c) in self.conns.drain() {
            let _ = io.cancel(token(id));
            drop(c.fd);
        }
    }
}
