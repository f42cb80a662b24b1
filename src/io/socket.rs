//! Socket helpers on raw libc calls: non-blocking TCP (IPv4 and IPv6) and Unix stream
//! sockets, ready for the I/O layer. Addresses are `SocketAddr`s: no DNS, no NSS.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn check(rc: libc::c_int, call: &str) -> io::Result<libc::c_int> {
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{call}: {e}")));
    }
    Ok(rc)
}

fn set_int_option(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
    what: &str,
) -> io::Result<()> {
    // SAFETY: `value` is a valid int for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &value as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    check(rc, what).map(drop)
}

/// A new non-blocking, close-on-exec socket.
fn new_socket(domain: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the returned fd is new and owned by us.
    let fd = check(
        unsafe {
            libc::socket(
                domain,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        },
        "socket",
    )?;
    // SAFETY: `fd` was just created and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The C form of a socket address.
pub fn sockaddr_from(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all zeroes is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// The Rust form of an IPv4 or IPv6 socket address; `None` for other families.
pub fn sockaddr_to(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin = unsafe { &*(storage as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 = unsafe { &*(storage as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// A non-blocking TCP listener on `addr` with SO_REUSEADDR (port 0 picks a free port;
/// see `local_addr`).
pub fn tcp_listen(addr: SocketAddr, backlog: i32) -> io::Result<OwnedFd> {
    let fd = new_socket(domain_of(&addr))?;
    set_int_option(
        fd.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_REUSEADDR,
        1,
        "SO_REUSEADDR",
    )?;
    let (storage, len) = sockaddr_from(&addr);
    // SAFETY: storage/len describe a valid address of the socket's family.
    check(
        unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &storage as *const _ as *const libc::sockaddr,
                len,
            )
        },
        "bind",
    )?;
    // SAFETY: plain syscall on our socket.
    check(unsafe { libc::listen(fd.as_raw_fd(), backlog) }, "listen")?;
    Ok(fd)
}

/// A non-blocking TCP socket with TCP_NODELAY for connecting to `addr` (hand it to
/// `Io::connect`).
pub fn tcp_socket(addr: &SocketAddr) -> io::Result<OwnedFd> {
    let fd = new_socket(domain_of(addr))?;
    set_tcp_nodelay(fd.as_raw_fd())?;
    Ok(fd)
}

/// Turns off Nagle's algorithm (peer messages are small and latency-bound).
pub fn set_tcp_nodelay(fd: RawFd) -> io::Result<()> {
    set_int_option(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1, "TCP_NODELAY")
}

/// Makes the next close send a reset instead of a FIN (SO_LINGER with a zero timeout).
pub fn set_linger_zero(fd: RawFd) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `linger` is valid for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    check(rc, "SO_LINGER").map(drop)
}

/// The address a TCP socket is bound to.
pub fn local_addr(fd: RawFd) -> io::Result<SocketAddr> {
    // SAFETY: sockaddr_storage is plain old data; getsockname writes at most `len` bytes.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    check(
        unsafe { libc::getsockname(fd, &mut storage as *mut _ as *mut libc::sockaddr, &mut len) },
        "getsockname",
    )?;
    sockaddr_to(&storage)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an IP socket"))
}

fn domain_of(addr: &SocketAddr) -> libc::c_int {
    match addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    }
}

/// A non-blocking Unix stream listener at `path` whose file has permissions `mode`
/// (0600 for the control socket). The mode is set between bind and listen, so no client
/// can connect while the socket still has the umask's permissions. A stale socket file at
/// `path` is the caller's to remove.
pub fn unix_listen(path: &Path, mode: u32, backlog: i32) -> io::Result<OwnedFd> {
    // SAFETY: sockaddr_un is plain old data; all zeroes is valid.
    let mut sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= sun.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "unix socket path {} must be 1..{} bytes without NUL",
                path.display(),
                sun.sun_path.len() - 1
            ),
        ));
    }
    for (dst, src) in sun.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let fd = new_socket(libc::AF_UNIX)?;
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `sun` holds a NUL-terminated path of `len` bytes in total.
    check(
        unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sun as *const _ as *const libc::sockaddr,
                len as libc::socklen_t,
            )
        },
        "bind",
    )
    .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    // SAFETY: plain syscall on our socket.
    check(unsafe { libc::listen(fd.as_raw_fd(), backlog) }, "listen")?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddr_round_trip_v4_and_v6() {
        for text in ["127.0.0.1:7000", "[::1]:7001", "[fe80::1%2]:9", "0.0.0.0:0"] {
            let addr: SocketAddr = text.parse().unwrap();
            let (storage, len) = sockaddr_from(&addr);
            assert!(len as usize <= std::mem::size_of::<libc::sockaddr_storage>());
            assert_eq!(sockaddr_to(&storage), Some(addr), "{text}");
        }
    }

    #[test]
    fn listener_reports_its_port() {
        let fd = tcp_listen("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = local_addr(fd.as_raw_fd()).unwrap();
        assert_ne!(addr.port(), 0);
        // A blocking std client can connect (the backlog takes it without accept).
        std::net::TcpStream::connect(addr).unwrap();
    }

    #[test]
    fn unix_path_too_long_is_refused() {
        let long = "x".repeat(200);
        let e = unix_listen(Path::new(&long), 0o600, 1).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
