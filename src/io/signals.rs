//! Signals as readable events: block them, read them from a signalfd inside the loop.
//!
//! The agent blocks SIGTERM, SIGINT, SIGHUP, SIGCHLD (and whatever else it wants to
//! handle) and reads them through a signalfd, which the loop watches with
//! `Io::poll_in`. Clean shutdown is then ordinary loop code, not a handler. SIGPIPE is
//! ignored (sends also use MSG_NOSIGNAL). Signal masks are per thread and inherited by
//! threads created later: call [`SignalFd::new`] at startup, before any thread exists,
//! or a process-directed signal may be delivered to a thread that does not block it.
//! Children started with `child::spawn` get an empty mask back before exec.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The signals the agent handles in its loop.
pub const AGENT_SIGNALS: [libc::c_int; 4] =
    [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD];

/// One signal read from the signalfd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignalInfo {
    pub signal: i32,
    /// Sender's pid (for SIGCHLD: the child's).
    pub pid: u32,
    /// For SIGCHLD: the exit status or signal number.
    pub status: i32,
}

/// A non-blocking signalfd for a set of signals blocked on the calling thread.
#[derive(Debug)]
pub struct SignalFd {
    fd: OwnedFd,
}

fn sigset(signals: &[libc::c_int]) -> io::Result<libc::sigset_t> {
    // SAFETY: sigemptyset initialises the set before sigaddset reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &signal in signals {
            if libc::sigaddset(&mut set, signal) != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("invalid signal number {signal}"),
                ));
            }
        }
        Ok(set)
    }
}

/// Ignores SIGPIPE for the whole process (a write to a closed socket or pipe then fails
/// with EPIPE instead of killing the agent).
pub fn ignore_sigpipe() -> io::Result<()> {
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler code.
    if unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) } == libc::SIG_ERR {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl SignalFd {
    /// Ignores SIGPIPE, blocks `signals` on the calling thread and opens a signalfd for
    /// them (non-blocking, close-on-exec).
    pub fn new(signals: &[libc::c_int]) -> io::Result<SignalFd> {
        ignore_sigpipe()?;
        let set = sigset(signals)?;
        // SAFETY: `set` is initialised; the old mask is not wanted.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        // SAFETY: -1 asks for a new signalfd; `set` is initialised.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is new and owned by nobody else.
        Ok(SignalFd {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// The fd to watch with `Io::poll_in`.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Reads one pending signal; `None` when there is none.
    pub fn read(&self) -> io::Result<Option<SignalInfo>> {
        // SAFETY: signalfd_siginfo is plain old data; all zeroes is valid.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        loop {
            // SAFETY: `info` is writable for `size` bytes.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    &mut info as *mut _ as *mut libc::c_void,
                    size,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) => return Ok(None),
                    _ => return Err(e),
                }
            }
            // The kernel returns whole records only.
            assert_eq!(n as usize, size, "short read from signalfd");
            return Ok(Some(SignalInfo {
                signal: info.ssi_signo as i32,
                pid: info.ssi_pid,
                status: info.ssi_status,
            }));
        }
    }
}
