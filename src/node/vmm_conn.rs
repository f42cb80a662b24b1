//! One non-blocking control connection from the agent to a `vigil vmm`.
//!
//! The socket is a non-blocking Unix stream; the loop watches it with `Io::poll_in`
//! and calls [`VmmConn::read`] when it is readable. Requests are framed with
//! `vigil_kvm::control` (small: a snapshot request with its path is the largest), so a
//! send normally completes at once; what the socket does not take waits in `out` and
//! goes with the next [`VmmConn::flush`]. Nothing here blocks.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use vigil_kvm::control::{decode_frame, Reply, Request};

use crate::limits::MAX_VMM_CONTROL_FRAME_BYTES;

pub struct VmmConn {
    fd: OwnedFd,
    rbuf: Vec<u8>,
    out: Vec<u8>,
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
        Ok(VmmConn {
            fd,
            rbuf: Vec::new(),
            out: Vec::new(),
        })
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The process id at the other end (SO_PEERCRED), to watch and, if it hangs, kill.
    pub fn peer_pid(&self) -> Option<i32> {
        // SAFETY: ucred is plain old data; all zeroes is valid.
        let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: `cred` is writable for `len` bytes; the fd is ours.
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                &mut cred as *mut _ as *mut libc::c_void,
                &mut len,
            )
        };
        (rc == 0 && cred.pid > 0).then_some(cred.pid)
    }

    /// Queues `request` and sends what the socket takes.
    pub fn send(&mut self, request: &Request) -> io::Result<()> {
        self.out.extend_from_slice(&request.encode());
        self.flush().map(|_| ())
    }

    /// Sends queued bytes; true while some remain.
    pub fn flush(&mut self) -> io::Result<bool> {
        while !self.out.is_empty() {
            // SAFETY: `out` is a valid readable slice.
            let n = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    self.out.as_ptr() as *const libc::c_void,
                    self.out.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => return Ok(true),
                    Some(libc::EINTR) => continue,
                    _ => return Err(e),
                }
            }
            self.out.drain(..n as usize);
        }
        Ok(false)
    }

    /// Reads what arrived and decodes the complete replies. An error (the VMM closed the
    /// connection, or sent a frame that does not decode) means the connection is done.
    pub fn read(&mut self) -> Result<Vec<Reply>, String> {
        let mut chunk = [0u8; 4096];
        loop {
            // SAFETY: `chunk` is writable for its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    chunk.as_mut_ptr() as *mut libc::c_void,
                    chunk.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n == 0 {
                return Err("the VMM closed the connection".into());
            }
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => break,
                    Some(libc::EINTR) => continue,
                    _ => return Err(format!("read: {e}")),
                }
            }
            self.rbuf.extend_from_slice(&chunk[..n as usize]);
            if self.rbuf.len() > 2 * MAX_VMM_CONTROL_FRAME_BYTES {
                return Err("the VMM sent more than two frames' worth unasked".into());
            }
        }
        decode_replies(&mut self.rbuf)
    }
}

/// Takes the complete replies off the front of `buf`.
pub fn decode_replies(buf: &mut Vec<u8>) -> Result<Vec<Reply>, String> {
    let mut replies = Vec::new();
    loop {
        if buf.is_empty() {
            break;
        }
        match decode_frame(buf, MAX_VMM_CONTROL_FRAME_BYTES) {
            Ok(None) => break,
            Ok(Some((frame, used))) => {
                let reply = Reply::decode(&frame).map_err(|e| format!("bad reply: {e}"))?;
                replies.push(reply);
                buf.drain(..used);
            }
            Err(e) => return Err(format!("bad frame: {e}")),
        }
    }
    Ok(replies)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_kvm::control::{Status, VmmState};

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
    fn talks_to_a_socket_without_blocking() {
        let dir = std::env::temp_dir().join(format!("vigil-vmmconn-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("c.sock");
        let _ = std::fs::remove_file(&path);
        assert!(VmmConn::connect(&path).is_err(), "nobody listens yet");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let mut conn = VmmConn::connect(&path).unwrap();
        assert_eq!(conn.peer_pid(), Some(std::process::id() as i32));
        let (mut server, _) = listener.accept().unwrap();
        conn.send(&Request::Status).unwrap();
        assert_eq!(conn.read().unwrap(), vec![], "nothing arrived: no wait");
        let mut buf = [0u8; 64];
        let n = std::io::Read::read(&mut server, &mut buf).unwrap();
        assert_eq!(n, Request::Status.encode().len());
        let reply = Reply::Error {
            code: 2,
            message: "no".into(),
        };
        std::io::Write::write_all(&mut server, &reply.encode()).unwrap();
        assert_eq!(conn.read().unwrap(), vec![reply]);
        drop(server);
        assert!(conn.read().is_err(), "closed");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
