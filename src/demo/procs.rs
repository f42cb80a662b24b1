//! Finding and killing the processes of one demo or test host by PID.
//!
//! A host's `vigil vmm` processes are not our children (the agent spawns them and they
//! call setsid to outlive it), so they are found by their command line, which names the
//! host's own data dir (their control socket and report file live there). Each match is
//! opened as a pidfd, its command line checked again through that pidfd's PID, and only
//! then signalled through the pidfd: a PID reused in between is never hit.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

/// The command line of `pid` with its NUL separators turned into spaces, if readable.
fn cmdline(pid: i32) -> Option<String> {
    let bytes = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        bytes
            .iter()
            .map(|&b| if b == 0 { ' ' } else { b as char })
            .collect(),
    )
}

fn mentions(pid: i32, needle: &str) -> bool {
    cmdline(pid).is_some_and(|c| c.contains(needle))
}

/// PIDs (other than this process) whose command line contains `needle`'s path.
pub fn pids_mentioning(needle: &Path) -> Vec<i32> {
    let needle = needle.to_string_lossy();
    let own = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<i32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != own && mentions(pid, &needle))
        .collect();
    pids.sort_unstable();
    pids
}

/// A process opened by pidfd.
pub struct Process {
    pub pid: i32,
    fd: OwnedFd,
}

impl Process {
    /// Opens `pid` if it still runs and its command line still contains `needle`.
    pub fn open_checked(pid: i32, needle: &Path) -> Option<Process> {
        // SAFETY: pidfd_open takes a PID and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return None;
        }
        // SAFETY: the syscall returned a new file descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // Checked after opening: from now on `fd` names this process, whatever the PID
        // is later reused for.
        mentions(pid, &needle.to_string_lossy()).then_some(Process { pid, fd })
    }

    /// Sends `signal`; false if the process is gone.
    pub fn signal(&self, signal: libc::c_int) -> bool {
        // SAFETY: pidfd_send_signal on a pidfd we own, with no siginfo.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        rc == 0
    }

    /// Waits until the process has exited; false if it still runs after `limit`.
    pub fn wait_exit(&self, limit: Duration) -> bool {
        let start = Instant::now();
        loop {
            let left = limit.saturating_sub(start.elapsed());
            let mut poll = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd; a pidfd becomes readable when the process exits.
            let rc = unsafe { libc::poll(&mut poll, 1, left.as_millis().min(1000) as i32) };
            if rc > 0 {
                return true;
            }
            if start.elapsed() >= limit {
                return false;
            }
        }
    }
}

/// SIGKILLs every process whose command line mentions `needle` and waits (up to
/// `limit`) for each to exit. Returns the PIDs killed.
pub fn kill_all_mentioning(needle: &Path, limit: Duration) -> Vec<i32> {
    let processes: Vec<Process> = pids_mentioning(needle)
        .into_iter()
        .filter_map(|pid| Process::open_checked(pid, needle))
        .collect();
    // SIGCONT first: a stopped process dies from SIGKILL too, but say it explicitly.
    for p in &processes {
        p.signal(libc::SIGKILL);
        p.signal(libc::SIGCONT);
    }
    for p in &processes {
        if !p.wait_exit(limit) {
            log::warn!("process {} did not exit after SIGKILL", p.pid);
        }
    }
    processes.iter().map(|p| p.pid).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_and_kills_a_process_by_its_command_line() {
        let marker = std::env::temp_dir().join(format!(
            "vigil-procs-test-{}-{}",
            std::process::id(),
            crate::demo::monotonic_ns()
        ));
        // `cat FIFO` blocks in open() until a writer comes: a process whose command line
        // names the marker and that waits forever.
        let path = std::ffi::CString::new(marker.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        let mut child = std::process::Command::new("cat")
            .arg(&marker)
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let start = Instant::now();
        while !pids_mentioning(&marker).contains(&pid) {
            assert!(start.elapsed() < Duration::from_secs(10), "never found");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(Process::open_checked(pid, Path::new("/no/such/marker")).is_none());
        assert_eq!(
            kill_all_mentioning(&marker, Duration::from_secs(10)),
            vec![pid]
        );
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(pids_mentioning(&marker).is_empty());
        let _ = std::fs::remove_file(&marker);
    }
}
