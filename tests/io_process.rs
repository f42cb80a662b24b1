//! I/O layer tests that change process-wide state, so they run without the test
//! harness: one process, one thread (`harness = false` in Cargo.toml).
//!
//! - signals through a signalfd, for both backends: blocking signals is per thread, and
//!   a process-directed signal goes to any thread that does not block it; with a single
//!   thread, `kill(getpid(), ...)` is sound.
//! - the real fallback check: a seccomp filter makes io_uring_setup fail with EPERM, and
//!   `BackendChoice::Auto` must then run on epoll. A filter cannot be removed, so this
//!   runs last.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::Duration;

use vigil::io::child::{self, ExitStatus};
use vigil::io::signals::SignalFd;
use vigil::io::{Backend, BackendChoice, Completion, Config, Error, Instant, Io, OpKind};

const GUARD: Duration = Duration::from_secs(30);

fn config(backend: BackendChoice) -> Config {
    Config {
        backend,
        ring_entries: 16,
        max_in_flight: 16,
        buffer_count: 4,
        buffer_bytes: 4096,
        fail_uring_setup: None,
    }
}

fn next(io: &mut Io) -> Completion {
    let mut out = [Completion::EMPTY; 1];
    let n = io
        .wait(Some(Instant::now().saturating_add(GUARD)), &mut out)
        .unwrap();
    assert_eq!(n, 1, "no completion within {GUARD:?}");
    out[0]
}

fn signals_through_signalfd(io: &mut Io) {
    let signals = SignalFd::new(&[libc::SIGUSR1, libc::SIGUSR2, libc::SIGTERM]).unwrap();
    assert_eq!(signals.read().unwrap(), None, "nothing pending yet");
    // SAFETY: getpid/kill on ourselves; the signals are blocked, so they stay pending.
    let pid = unsafe { libc::getpid() };
    assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR1) }, 0);

    io.poll_in(1, signals.fd()).unwrap();
    let c = next(io);
    assert_eq!((c.token, c.kind), (1, OpKind::PollIn));
    assert_ne!(c.result.unwrap() & libc::POLLIN as u32, 0);
    let info = signals.read().unwrap().expect("a signal is pending");
    assert_eq!(info.signal, libc::SIGUSR1);
    assert_eq!(info.pid, pid as u32);
    assert_eq!(signals.read().unwrap(), None);

    // Two different signals pending at once: both are read, in signal-number order.
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR2) }, 0);
    io.poll_in(2, signals.fd()).unwrap();
    assert_eq!(next(io).token, 2);
    let first = signals.read().unwrap().unwrap().signal;
    let second = signals.read().unwrap().unwrap().signal;
    assert_eq!((first, second), (libc::SIGUSR2, libc::SIGTERM));

    // SIGPIPE is ignored: writing to a pipe without reader fails with EPIPE instead.
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for two fds; the ends are owned right after.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read_end);
    // SAFETY: writing one byte from a valid buffer.
    let rc = unsafe {
        libc::write(
            write_end.as_raw_fd(),
            b"x".as_ptr() as *const libc::c_void,
            1,
        )
    };
    assert_eq!(rc, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EPIPE)
    );

    // A child does not inherit the blocked mask: SIGUSR1 to itself kills it.
    let c = child::spawn(
        Command::new("/bin/sh").args(["-c", "kill -USR1 $$; exit 3"]),
        true,
    )
    .unwrap();
    io.poll_in(3, c.pidfd()).unwrap();
    assert_eq!(next(io).token, 3);
    assert_eq!(
        c.try_wait().unwrap(),
        Some(ExitStatus::Signaled(libc::SIGUSR1))
    );
}

/// Installs a seccomp filter that fails io_uring_setup with EPERM (as a container
/// runtime's default profile does). Returns false where the check cannot run.
fn deny_io_uring_setup() -> bool {
    #[cfg(target_arch = "x86_64")]
    const AUDIT_ARCH: u32 = 0xC000_003E; // AUDIT_ARCH_X86_64
    #[cfg(not(target_arch = "x86_64"))]
    {
        eprintln!("skipped: the seccomp filter is written for x86_64 only");
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        fn statement(code: u32, k: u32) -> libc::sock_filter {
            libc::sock_filter {
                code: code as u16,
                jt: 0,
                jf: 0,
                k,
            }
        }
        fn jump(code: u32, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
            libc::sock_filter {
                code: code as u16,
                jt,
                jf,
                k,
            }
        }
        // struct seccomp_data { int nr; __u32 arch; ... }
        let mut filter = [
            statement(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 4),
            jump(
                libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
                AUDIT_ARCH,
                1,
                0,
            ),
            statement(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
            statement(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0),
            jump(
                libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
                libc::SYS_io_uring_setup as u32,
                0,
                1,
            ),
            statement(
                libc::BPF_RET | libc::BPF_K,
                libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
            ),
            statement(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
        ];
        let program = libc::sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_mut_ptr(),
        };
        // SAFETY: prctl with valid arguments; `program` and `filter` outlive the call
        // (the kernel copies the filter).
        unsafe {
            assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
            let rc = libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &program as *const libc::sock_fprog,
            );
            if rc != 0 {
                // A kernel without seccomp filters (EINVAL) cannot run this check.
                eprintln!(
                    "skipped: seccomp filter: {}",
                    std::io::Error::last_os_error()
                );
                return false;
            }
        }
        true
    }
}

/// Returns false if skipped.
fn seccomp_denied_io_uring_falls_back_to_epoll() -> bool {
    if !deny_io_uring_setup() {
        return false;
    }
    match Io::new(&config(BackendChoice::Uring)) {
        Err(Error::Setup {
            backend: Backend::Uring,
            source,
        }) => assert_eq!(
            source.kind(),
            std::io::ErrorKind::PermissionDenied,
            "io_uring_setup under seccomp: {source}"
        ),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("io_uring setup succeeded despite the seccomp filter"),
    }
    let mut io = Io::new(&config(BackendChoice::Auto)).unwrap();
    assert_eq!(io.backend(), Backend::Epoll, "auto must fall back to epoll");
    // And the fallback works: a timeout and a child exit.
    io.timeout(1, Instant::now()).unwrap();
    assert_eq!(next(&mut io).result, Ok(0));
    let c = child::spawn(Command::new("/bin/sh").args(["-c", "exit 0"]), false).unwrap();
    io.poll_in(2, c.pidfd()).unwrap();
    assert_eq!(next(&mut io).token, 2);
    assert_eq!(c.try_wait().unwrap(), Some(ExitStatus::Exited(0)));
    true
}

/// With SIGPIPE at its default action (terminate), sending to a reset peer must fail
/// with an error, not kill the process: sends carry MSG_NOSIGNAL. (Rust programs ignore
/// SIGPIPE before `main`; this test restores the default first, so it can fail.)
fn send_to_reset_peer_does_not_raise_sigpipe(backend: BackendChoice) {
    let Ok(mut io) = Io::new(&config(backend)) else {
        eprintln!("io_process: send_to_reset_peer {backend:?} skipped: no io_uring");
        return;
    };
    // SAFETY: restoring a default disposition installs no handler code.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let listener = vigil::io::socket::tcp_listen("127.0.0.1:0".parse().unwrap(), 1).unwrap();
    let addr = vigil::io::socket::local_addr(listener.as_raw_fd()).unwrap();
    let client = std::net::TcpStream::connect(addr).unwrap();
    io.accept(1, listener.as_raw_fd()).unwrap();
    // SAFETY: the accept completion hands us a new fd.
    let server = unsafe { OwnedFd::from_raw_fd(next(&mut io).result.unwrap() as i32) };
    vigil::io::socket::set_linger_zero(client.as_raw_fd()).unwrap();
    drop(client);
    let buf = io.buffer_acquire().unwrap();
    let mut failed = None;
    for _ in 0..100 {
        io.send(2, server.as_raw_fd(), buf, 0..1024).unwrap();
        if let Err(e) = next(&mut io).result {
            failed = Some(e);
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let e = failed.expect("send to a reset peer kept succeeding");
    assert!(e.0 == libc::EPIPE || e.0 == libc::ECONNRESET, "{e}");
    // A second send after the error: now EPIPE for sure, still no signal.
    io.send(3, server.as_raw_fd(), buf, 0..1024).unwrap();
    assert_eq!(next(&mut io).result, Err(vigil::io::Errno(libc::EPIPE)));
    // SAFETY: as above.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

fn main() {
    vigil::logging::init();
    for backend in [BackendChoice::Uring, BackendChoice::Epoll] {
        send_to_reset_peer_does_not_raise_sigpipe(backend);
        eprintln!("io_process: send_to_reset_peer_does_not_raise_sigpipe {backend:?} done");
    }
    for backend in [BackendChoice::Uring, BackendChoice::Epoll] {
        match Io::new(&config(backend)) {
            Ok(mut io) => {
                signals_through_signalfd(&mut io);
                eprintln!("io_process: signals_through_signalfd {backend:?} ok");
            }
            Err(e) if backend == BackendChoice::Uring => {
                eprintln!("io_process: signals_through_signalfd {backend:?} skipped: {e}")
            }
            Err(e) => panic!("{e}"),
        }
    }
    if seccomp_denied_io_uring_falls_back_to_epoll() {
        eprintln!("io_process: seccomp_denied_io_uring_falls_back_to_epoll ok");
    }
}
