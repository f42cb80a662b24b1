//! Hostile clients on a live agent's control socket: malformed HTTP, oversized heads and
//! bodies, chunked uploads, unknown JSON fields, a request trickled past the read
//! timeout, a flood of idle connections, and a uid the socket does not serve. Each gets a
//! 4xx with a JSON error `{"error", "code"}` (or, for the flood, makes room), and the node
//! keeps committing. (Bad JSON and wrong value types are in tests/cluster.rs.)

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::Cluster;

/// Sends raw bytes and reads the answer until the node closes the connection (every
/// case here is a framing error or asks for `Connection: close`).
fn raw(socket: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let closed = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    assert!(closed.is_ok(), "the node kept the connection open: {text}");
    text
}

/// The status code and the JSON body of a raw HTTP answer.
fn parse(answer: &str) -> (u16, serde_json::Value) {
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"));
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
    let json = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: body {body:?}"));
    (status, json)
}

fn with_body(body: &str) -> Vec<u8> {
    format!(
        "PUT /kv/x HTTP/1.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn malformed_requests_get_4xx_with_a_json_error() {
    malformed("auto");
}

#[test]
fn malformed_requests_get_4xx_with_a_json_error_epoll() {
    malformed("epoll");
}

fn malformed(io: &str) {
    let c = Cluster::start(&format!("hostile-control-{io}"), 3, io);
    let leader = c.wait_leader();
    let socket = c.node(leader).socket.clone();
    let big_head = format!(
        "GET /status HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(vigil::limits::MAX_CONTROL_HEADER_BYTES + 10)
    );
    let huge_body = format!(
        "PUT /kv/x HTTP/1.1\r\nContent-Length: {}\r\n\r\n{{",
        100 * 1024 * 1024
    );
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "binary garbage",
            b"\x00\x01\x02\xff\xfe garbage\r\n\r\n".to_vec(),
            400,
            "malformed_request",
        ),
        (
            "no request target",
            b"GET\r\n\r\n".to_vec(),
            400,
            "malformed_request",
        ),
        (
            "a relative target",
            b"GET status HTTP/1.1\r\n\r\n".to_vec(),
            400,
            "malformed_request",
        ),
        (
            "an unknown method",
            b"BREW /pot HTTP/1.1\r\n\r\n".to_vec(),
            501,
            "unsupported_method",
        ),
        (
            "a non-numeric Content-Length",
            b"PUT /kv/x HTTP/1.1\r\nContent-Length: lots\r\n\r\n".to_vec(),
            400,
            "malformed_request",
        ),
        (
            "conflicting Content-Lengths",
            b"PUT /kv/x HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}".to_vec(),
            400,
            "malformed_request",
        ),
        (
            "a chunked upload",
            b"PUT /kv/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
                .to_vec(),
            411,
            "length_required",
        ),
        ("a huge body", huge_body.into_bytes(), 413, "body_too_large"),
        (
            "a huge head",
            big_head.into_bytes(),
            431,
            "header_too_large",
        ),
        (
            "an unknown JSON field",
            with_body(r#"{"value":"a","sneaky":true}"#),
            400,
            "bad_body",
        ),
        ("a JSON array body", with_body("[]"), 400, "bad_body"),
    ];
    for (what, bytes, status, code) in &cases {
        let answer = raw(&socket, bytes);
        let (got, json) = parse(&answer);
        assert_eq!(got, *status, "{what}: {answer}");
        assert_eq!(json["code"], *code, "{what}: {answer}");
        assert!(
            json["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}: no error text in {answer}"
        );
    }
    c.put_retry("after-bad-http", "ok");
    assert_eq!(c.get_retry(leader, "after-bad-http").as_deref(), Some("ok"));
}

#[test]
fn a_trickled_request_is_cut_at_the_read_timeout() {
    let c = Cluster::start("hostile-trickle", 1, "auto");
    let leader = c.wait_leader();
    let socket = c.node(leader).socket.clone();
    let mut s = UnixStream::connect(&socket).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    // One byte a second: the idle timeout never fires, the read timeout must.
    let request = b"GET /status HTTP/1.1\r\nHost: vigil\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut answer = Vec::new();
    let limit = std::time::Instant::now()
        + Duration::from_millis(vigil::limits::CONTROL_READ_TIMEOUT_MS + 15_000);
    for &byte in request.iter().cycle() {
        assert!(std::time::Instant::now() < limit, "never cut off");
        if s.write_all(&[byte]).is_err() {
            break;
        }
        let mut buf = [0u8; 1024];
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // The node may have closed while a byte was being written: read what it sent.
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    answer.extend_from_slice(&rest);
    let answer = String::from_utf8_lossy(&answer).to_string();
    let (status, json) = parse(&answer);
    assert_eq!(status, 408, "{answer}");
    assert_eq!(json["code"], "request_timeout", "{answer}");
    assert!(
        c.metric(leader, "vigil_control_read_timeouts_total")
            .unwrap()
            >= 1.0
    );
}

#[test]
fn a_flood_of_idle_connections_makes_room_for_a_real_client() {
    flood("auto");
}

#[test]
fn a_flood_of_idle_connections_makes_room_for_a_real_client_epoll() {
    flood("epoll");
}

/// More idle connections than the limit: the idlest are closed (after their cancelled
/// receives completed) and a real client is served; every evicted client sees its
/// connection closed.
fn flood(io: &str) {
    let c = Cluster::start(&format!("hostile-flood-{io}"), 1, io);
    let leader = c.wait_leader();
    let socket = c.node(leader).socket.clone();
    let flood: Vec<UnixStream> = (0..vigil::limits::MAX_CONTROL_CONNECTIONS + 40)
        .filter_map(|_| UnixStream::connect(&socket).ok())
        .collect();
    assert!(flood.len() > vigil::limits::MAX_CONTROL_CONNECTIONS);
    // A real client is served: the idlest flood connections were closed to make room.
    c.put_retry("after-flood", "ok");
    let evicted = c
        .metric(
            leader,
            "vigil_control_connections_refused_total{reason=\"evicted_idle\"}",
        )
        .unwrap();
    assert!(evicted >= 40.0, "evicted {evicted}");
    let closed = flood
        .iter()
        .filter(|s| {
            let mut s: &UnixStream = s;
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            let mut byte = [0u8; 1];
            matches!(s.read(&mut byte), Ok(0))
        })
        .count();
    assert!(
        closed as f64 >= evicted,
        "{closed} closed, {evicted} evicted"
    );
    let open = c.metric(leader, "vigil_control_connections").unwrap();
    assert!(
        open <= vigil::limits::MAX_CONTROL_CONNECTIONS as f64,
        "{open} open"
    );
    drop(flood);
}

/// Runs `vigil ctl --json status` as another user.
fn ctl_as(socket: &Path, uid: u32, gid: u32) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(["ctl", "--json", "--socket"])
        .arg(socket)
        .arg("status")
        .uid(uid)
        .gid(gid)
        .output()
        .unwrap()
}

#[test]
fn other_users_are_refused_unless_in_the_control_group() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to run a client as another uid");
        return;
    }
    let mut c = Cluster::start("hostile-uid", 1, "auto");
    let id = c.wait_leader();
    let socket = c.node(id).socket.clone();
    let mode = |p: &Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions())
            & 0o777
    };
    assert_eq!(mode(&socket), 0o600);
    // The file mode already keeps others out; with the mode widened by mistake,
    // SO_PEERCRED still does.
    let out = ctl_as(&socket, 65534, 65534);
    assert!(!out.status.success(), "nobody got in through a 0600 socket");
    std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let out = ctl_as(&socket, 65534, 65534);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("forbidden") || text.contains("may not use"),
        "{text}"
    );
    assert!(
        c.metric(
            id,
            "vigil_control_connections_refused_total{reason=\"uid\"}"
        )
        .unwrap()
            >= 1.0
    );
    // With control_group = 65534 the socket is 0660 with that group, and its members
    // are served.
    c.terminate(id);
    let config = c.node(id).config.clone();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("control_group = 65534\n{text}")).unwrap();
    c.restart(id);
    c.wait_leader();
    assert_eq!(mode(&socket), 0o660);
    let out = ctl_as(&socket, 65534, 65534);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let log = std::fs::read_to_string(c.node(id).dir.join("log")).unwrap();
    assert!(log.contains("control: uid 65534 pid"), "no access log line");
}
