//! Child processes watched through pidfds.
//!
//! `spawn` starts a child (a `vigil vmm` process, say) and opens a pidfd for it. The
//! pidfd becomes readable when the child exits, so the loop watches it with
//! `Io::poll_in` like any other event; the exit status is then collected with
//! `waitid(P_PIDFD)`, which also reaps the zombie. Opening the pidfd after fork is safe:
//! an unreaped child's pid cannot be reused. A child can be started in its own session
//! (setsid), so it outlives the agent and no terminal signal reaches it; a restarted
//! agent can re-adopt such a process with [`pidfd_open`] and watch it with poll-in, but
//! only its parent can collect its status.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// `idtype_t` for waitid on a pidfd (Linux 5.4; not exported by the libc crate).
const P_PIDFD: libc::idtype_t = 3;

/// How a child ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// It called exit with this code.
    Exited(i32),
    /// A signal killed it.
    Signaled(i32),
}

/// A child process and its pidfd. Dropping it neither kills nor reaps the process.
#[derive(Debug)]
pub struct Child {
    pid: libc::pid_t,
    pidfd: OwnedFd,
}

/// Opens a pidfd for `pid` (close-on-exec; readable once the process exits).
pub fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; flags 0.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Starts `command`; with `new_session` the child calls setsid first. The child starts
/// with an empty signal mask (the agent blocks the signals it reads via signalfd, and a
/// mask is inherited across exec).
pub fn spawn(command: &mut Command, new_session: bool) -> io::Result<Child> {
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
    // calls (sigemptyset, sigprocmask, setsid); it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            if libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
            if new_session && libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn()?;
    let pid = child.id() as libc::pid_t;
    // Dropping std's handle neither waits nor kills; we reap through the pidfd.
    drop(child);
    let pidfd = pidfd_open(pid)?;
    Ok(Child { pid, pidfd })
}

impl Child {
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// The fd to watch with `Io::poll_in`.
    pub fn pidfd(&self) -> RawFd {
        self.pidfd.as_raw_fd()
    }

    /// Sends `signal` through the pidfd (never hits a reused pid).
    pub fn signal(&self, signal: libc::c_int) -> io::Result<()> {
        // SAFETY: plain syscall; null siginfo and flags 0 behave like kill(2).
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Collects the exit status if the child has exited (reaping it); `None` if it is
    /// still running.
    pub fn try_wait(&self) -> io::Result<Option<ExitStatus>> {
        // SAFETY: siginfo_t is plain old data; all zeroes is valid, and waitid only
        // writes it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: `info` is writable; the pidfd is ours.
            let rc = unsafe {
                libc::waitid(
                    P_PIDFD,
                    self.pidfd.as_raw_fd() as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOHANG,
                )
            };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(e);
            }
            break;
        }
        // SAFETY: waitid filled `info` (or left it zero: no child changed state).
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if pid == 0 {
            return Ok(None);
        }
        Ok(Some(match info.si_code {
            libc::CLD_EXITED => ExitStatus::Exited(status),
            _ => ExitStatus::Signaled(status),
        }))
    }
}
