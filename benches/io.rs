//! I/O layer latency: loopback TCP ping-pong round trips through each backend, and a
//! plain blocking std::net round trip as the floor; fdatasync through each backend.
//!
//! One JSON object per line on stdout; progress on stderr.
//! `cargo bench --bench io` (`-- --quick` for a short run).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use serde_json::json;
use vigil::io::{socket, Backend, BackendChoice, Completion, Config, Instant, Io};

const MESSAGE: usize = 64;

struct Stats {
    n: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

fn stats(mut samples_ns: Vec<u64>) -> Stats {
    samples_ns.sort_unstable();
    let n = samples_ns.len();
    let at = |q: usize| samples_ns[(n * q / 100).min(n - 1)] as f64 / 1000.0;
    Stats {
        n,
        p50: at(50),
        p99: at(99),
        max: *samples_ns.last().unwrap() as f64 / 1000.0,
    }
}

fn config(backend: Backend) -> Config {
    Config {
        backend: match backend {
            Backend::Uring => BackendChoice::Uring,
            Backend::Epoll => BackendChoice::Epoll,
        },
        ring_entries: 64,
        max_in_flight: 64,
        buffer_count: 8,
        buffer_bytes: 4096,
        fail_uring_setup: None,
    }
}

fn next(io: &mut Io) -> Completion {
    let mut out = [Completion::EMPTY; 1];
    let deadline = Instant::now().saturating_add(Duration::from_secs(30));
    assert_eq!(io.wait(Some(deadline), &mut out).unwrap(), 1, "stalled");
    out[0]
}

/// Echo server on its own thread and its own `Io`: recv, send it all back, repeat.
fn echo_server(backend: Backend, listener: OwnedFd) {
    let mut io = Io::new(&config(backend)).unwrap();
    io.accept(0, listener.as_raw_fd()).unwrap();
    let fd = next(&mut io).result.unwrap() as RawFd;
    // SAFETY: the accept completion handed us this new fd.
    let conn = unsafe { OwnedFd::from_raw_fd(fd) };
    socket::set_tcp_nodelay(conn.as_raw_fd()).unwrap();
    let buf = io.buffer_acquire().unwrap();
    loop {
        io.recv(1, conn.as_raw_fd(), buf, 0..4096).unwrap();
        let got = next(&mut io).result.unwrap() as usize;
        if got == 0 {
            return;
        }
        let mut sent = 0;
        while sent < got {
            io.send(2, conn.as_raw_fd(), buf, sent..got).unwrap();
            sent += next(&mut io).result.unwrap() as usize;
        }
    }
}

fn pingpong_io(backend: Backend, warmup: usize, n: usize) -> Stats {
    let listener = socket::tcp_listen("127.0.0.1:0".parse().unwrap(), 4).unwrap();
    let addr = socket::local_addr(listener.as_raw_fd()).unwrap();
    let server = std::thread::spawn(move || echo_server(backend, listener));

    let mut io = Io::new(&config(backend)).unwrap();
    let conn = socket::tcp_socket(&addr).unwrap();
    io.connect(0, conn.as_raw_fd(), addr).unwrap();
    next(&mut io).result.unwrap();
    let send_buf = io.buffer_acquire().unwrap();
    let recv_buf = io.buffer_acquire().unwrap();
    io.buffer_mut(send_buf)[..MESSAGE].fill(0x5a);

    let mut samples = Vec::with_capacity(n);
    let mut out = [Completion::EMPTY; 4];
    for i in 0..warmup + n {
        let start = Instant::now();
        io.recv(1, conn.as_raw_fd(), recv_buf, 0..MESSAGE).unwrap();
        io.send(2, conn.as_raw_fd(), send_buf, 0..MESSAGE).unwrap();
        let (mut received, mut sent_done) = (0, false);
        while received < MESSAGE || !sent_done {
            let k = io.wait(None, &mut out).unwrap();
            for c in &out[..k] {
                match c.token {
                    1 => {
                        let got = c.result.unwrap() as usize;
                        assert!(got > 0, "server closed");
                        received += got;
                        if received < MESSAGE {
                            io.recv(1, conn.as_raw_fd(), recv_buf, received..MESSAGE)
                                .unwrap();
                        }
                    }
                    2 => {
                        assert_eq!(c.result.unwrap() as usize, MESSAGE, "short send");
                        sent_done = true;
                    }
                    t => panic!("token {t}"),
                }
            }
        }
        if i >= warmup {
            samples.push(Instant::now().saturating_duration_since(start).as_nanos() as u64);
        }
    }
    drop(conn);
    server.join().unwrap();
    stats(samples)
}

fn pingpong_std(warmup: usize, n: usize) -> Stats {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_nodelay(true).unwrap();
        let mut buf = [0u8; MESSAGE];
        while conn.read_exact(&mut buf).is_ok() {
            conn.write_all(&buf).unwrap();
        }
    });
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_nodelay(true).unwrap();
    let message = [0x5au8; MESSAGE];
    let mut reply = [0u8; MESSAGE];
    let mut samples = Vec::with_capacity(n);
    for i in 0..warmup + n {
        let start = Instant::now();
        conn.write_all(&message).unwrap();
        conn.read_exact(&mut reply).unwrap();
        if i >= warmup {
            samples.push(Instant::now().saturating_duration_since(start).as_nanos() as u64);
        }
    }
    drop(conn);
    server.join().unwrap();
    stats(samples)
}

/// Streams `frames` frames of 1 MiB (the size of the largest peer frame) to a reader
/// thread that discards them: each frame is copied into slab buffers of 64 KiB and sent
/// one send at a time, as the peer transport will. Returns per-frame latency and MiB/s.
fn stream_io(backend: Backend, frames: usize) -> (Stats, f64) {
    const FRAME: usize = 1 << 20;
    let listener = socket::tcp_listen("127.0.0.1:0".parse().unwrap(), 4).unwrap();
    let addr = socket::local_addr(listener.as_raw_fd()).unwrap();
    let reader = std::thread::spawn(move || discard(listener, frames * FRAME));
    let mut cfg = config(backend);
    cfg.buffer_bytes = 64 * 1024;
    let mut io = Io::new(&cfg).unwrap();
    let conn = socket::tcp_socket(&addr).unwrap();
    io.connect(0, conn.as_raw_fd(), addr).unwrap();
    next(&mut io).result.unwrap();
    let frame: Vec<u8> = (0..FRAME).map(|i| i as u8).collect();
    let buf = io.buffer_acquire().unwrap();
    let chunk = io.buffer_bytes();
    let mut samples = Vec::with_capacity(frames);
    let begin = Instant::now();
    for _ in 0..frames {
        let start = Instant::now();
        for piece in frame.chunks(chunk) {
            io.buffer_mut(buf)[..piece.len()].copy_from_slice(piece);
            let mut sent = 0;
            while sent < piece.len() {
                io.send(1, conn.as_raw_fd(), buf, sent..piece.len())
                    .unwrap();
                sent += next(&mut io).result.unwrap() as usize;
            }
        }
        samples.push(Instant::now().saturating_duration_since(start).as_nanos() as u64);
    }
    drop(conn);
    reader.join().unwrap();
    let seconds = Instant::now()
        .saturating_duration_since(begin)
        .as_secs_f64();
    (
        stats(samples),
        (frames * FRAME) as f64 / (1 << 20) as f64 / seconds,
    )
}

/// The same stream with blocking std::net `write_all` of each 1 MiB frame.
fn stream_std(frames: usize) -> (Stats, f64) {
    const FRAME: usize = 1 << 20;
    let listener = socket::tcp_listen("127.0.0.1:0".parse().unwrap(), 4).unwrap();
    let addr = socket::local_addr(listener.as_raw_fd()).unwrap();
    let reader = std::thread::spawn(move || discard(listener, frames * FRAME));
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_nodelay(true).unwrap();
    let frame: Vec<u8> = (0..FRAME).map(|i| i as u8).collect();
    let mut samples = Vec::with_capacity(frames);
    let begin = Instant::now();
    for _ in 0..frames {
        let start = Instant::now();
        conn.write_all(&frame).unwrap();
        samples.push(Instant::now().saturating_duration_since(start).as_nanos() as u64);
    }
    drop(conn);
    reader.join().unwrap();
    let seconds = Instant::now()
        .saturating_duration_since(begin)
        .as_secs_f64();
    (
        stats(samples),
        (frames * FRAME) as f64 / (1 << 20) as f64 / seconds,
    )
}

/// Accepts one connection (blocking) and reads `total` bytes, then expects EOF.
fn discard(listener: OwnedFd, total: usize) {
    let listener = TcpListener::from(listener);
    listener.set_nonblocking(false).unwrap();
    let (mut conn, _) = listener.accept().unwrap();
    conn.set_nonblocking(false).unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    loop {
        let n = conn.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got += n;
    }
    assert_eq!(got, total, "stream lost or gained bytes");
}

/// 4 KiB pwrite then fdatasync through the I/O layer (epoll runs it inside `wait`).
fn fdatasync_io(backend: Backend, n: usize) -> Stats {
    let dir = std::env::temp_dir().join(format!("vigil-bench-io-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = std::fs::File::create(dir.join(format!("{backend:?}"))).unwrap();
    let mut io = Io::new(&config(backend)).unwrap();
    let block = [0xa5u8; 4096];
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        // SAFETY: writing 4 KiB from a valid buffer at an offset of our own file.
        let rc = unsafe {
            libc::pwrite(
                file.as_raw_fd(),
                block.as_ptr() as *const libc::c_void,
                block.len(),
                (i * 4096) as libc::off_t,
            )
        };
        assert_eq!(rc, 4096);
        let start = Instant::now();
        io.fdatasync(1, file.as_raw_fd()).unwrap();
        assert_eq!(next(&mut io).result, Ok(0));
        samples.push(Instant::now().saturating_duration_since(start).as_nanos() as u64);
    }
    let _ = std::fs::remove_dir_all(&dir);
    stats(samples)
}

/// One JSON line, fields in the documented order (bench, case, unit, n, p50, ...).
fn line(case: &str, s: &Stats, baseline: Option<(&str, &Stats)>) {
    let mut text = format!(
        "{{\"bench\":\"io\",\"case\":{},\"unit\":\"us\",\"n\":{},\"p50\":{},\"p99\":{},\"max\":{}",
        json!(case),
        s.n,
        json!(round(s.p50)),
        json!(round(s.p99)),
        json!(round(s.max))
    );
    if let Some((name, b)) = baseline {
        text.push_str(&format!(
            ",\"baseline\":{},\"baseline_p50\":{},\"baseline_p99\":{},\"ratio_p50\":{},\"ratio_p99\":{}",
            json!(name),
            json!(round(b.p50)),
            json!(round(b.p99)),
            json!(round(s.p50 / b.p50)),
            json!(round(s.p99 / b.p99))
        ));
    }
    text.push('}');
    // Check it is JSON before printing it.
    serde_json::from_str::<serde_json::Value>(&text).expect("bench line is valid JSON");
    println!("{text}");
}

/// A throughput line: per-frame latency plus `per_s` (MiB per second).
fn line_rate(case: &str, s: &Stats, per_s: f64, baseline: Option<(&str, &Stats, f64)>) {
    let mut text = format!(
        "{{\"bench\":\"io\",\"case\":{},\"unit\":\"us\",\"n\":{},\"p50\":{},\"p99\":{},\"max\":{},\"per_s\":{},\"per_s_unit\":\"MiB\"",
        json!(case),
        s.n,
        json!(round(s.p50)),
        json!(round(s.p99)),
        json!(round(s.max)),
        json!(round(per_s))
    );
    if let Some((name, b, b_rate)) = baseline {
        text.push_str(&format!(
            ",\"baseline\":{},\"baseline_p50\":{},\"baseline_p99\":{},\"baseline_per_s\":{},\"ratio_p50\":{},\"ratio_per_s\":{}",
            json!(name),
            json!(round(b.p50)),
            json!(round(b.p99)),
            json!(round(b_rate)),
            json!(round(s.p50 / b.p50)),
            json!(round(per_s / b_rate))
        ));
    }
    text.push('}');
    serde_json::from_str::<serde_json::Value>(&text).expect("bench line is valid JSON");
    println!("{text}");
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (warmup, n, syncs) = if quick {
        (200, 2_000, 50)
    } else {
        (2_000, 20_000, 300)
    };
    let uring = Io::new(&config(Backend::Uring)).is_ok();
    if !uring {
        eprintln!("io bench: io_uring unavailable; uring cases skipped");
    }

    eprintln!("io bench: ping-pong std blocking, n={n}");
    let std_stats = pingpong_std(warmup, n);
    eprintln!("io bench: ping-pong epoll, n={n}");
    let epoll = pingpong_io(Backend::Epoll, warmup, n);
    let uring_stats = uring.then(|| {
        eprintln!("io bench: ping-pong io_uring, n={n}");
        pingpong_io(Backend::Uring, warmup, n)
    });
    if let Some(u) = &uring_stats {
        line("pingpong-uring", u, Some(("epoll", &epoll)));
    }
    line("pingpong-epoll", &epoll, Some(("std-blocking", &std_stats)));
    line("pingpong-std-blocking", &std_stats, None);

    let frames = if quick { 16 } else { 128 };
    eprintln!("io bench: stream of {frames} frames of 1 MiB");
    let (std_stream, std_rate) = stream_std(frames);
    let (epoll_stream, epoll_rate) = stream_io(Backend::Epoll, frames);
    if uring {
        let (u, rate) = stream_io(Backend::Uring, frames);
        line_rate(
            "stream-1MiB-uring",
            &u,
            rate,
            Some(("epoll", &epoll_stream, epoll_rate)),
        );
    }
    line_rate(
        "stream-1MiB-epoll",
        &epoll_stream,
        epoll_rate,
        Some(("std-blocking", &std_stream, std_rate)),
    );
    line_rate("stream-1MiB-std-blocking", &std_stream, std_rate, None);

    eprintln!("io bench: fdatasync of 4 KiB, n={syncs}");
    let epoll_sync = fdatasync_io(Backend::Epoll, syncs);
    if uring {
        let u = fdatasync_io(Backend::Uring, syncs);
        line("fdatasync-4k-uring", &u, Some(("epoll-sync", &epoll_sync)));
    }
    line("fdatasync-4k-epoll-sync", &epoll_sync, None);
}
