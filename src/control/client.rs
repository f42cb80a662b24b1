//! A blocking HTTP/1.1 client for the control socket, used by `vigil ctl`, `vigil demo`
//! and the tests. It is not part of the agent's event loop (which never blocks).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::limits::{MAX_CONTROL_BODY_BYTES, MAX_CONTROL_HEADER_BYTES};

/// Largest response body the client accepts (a status of 71 members is far smaller).
const MAX_RESPONSE_BODY_BYTES: usize = 16 * 1024 * 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> Result<serde_json::Value, ClientError> {
        serde_json::from_slice(&self.body)
            .map_err(|e| ClientError::BadResponse(format!("body is not JSON: {e}")))
    }
}

#[derive(Debug)]
pub enum ClientError {
    Connect {
        socket: PathBuf,
        source: std::io::Error,
    },
    Io(std::io::Error),
    BadResponse(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Connect { socket, source } => {
                write!(
                    f,
                    "cannot connect to {}: {source} (is the agent running?)",
                    socket.display()
                )
            }
            ClientError::Io(e) => write!(f, "control socket: {e}"),
            ClientError::BadResponse(why) => write!(f, "bad response from the agent: {why}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> Self {
        ClientError::Io(e)
    }
}

pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

impl Client {
    pub fn new(socket: &Path, timeout: Duration) -> Self {
        Client {
            socket: socket.to_path_buf(),
            timeout,
        }
    }

    fn connect(&self) -> Result<UnixStream, ClientError> {
        let stream = UnixStream::connect(&self.socket).map_err(|source| ClientError::Connect {
            socket: self.socket.clone(),
            source,
        })?;
        stream.set_read_timeout(Some(self.timeout))?;
        stream.set_write_timeout(Some(self.timeout))?;
        Ok(stream)
    }

    /// Sends one request (JSON body when given) and reads the whole response.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, ClientError> {
        let body = body.unwrap_or(&[]);
        assert!(
            body.len() <= MAX_CONTROL_BODY_BYTES,
            "request body over the limit"
        );
        let mut stream = self.connect()?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: vigil\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let mut request = head.into_bytes();
        request.extend_from_slice(body);
        stream.write_all(&request)?;
        let mut reader = BufReader::new(stream);
        let (status, length) = read_head(&mut reader)?;
        let body = match length {
            Some(n) if n > MAX_RESPONSE_BODY_BYTES => {
                return Err(ClientError::BadResponse(format!(
                    "{n}-byte body is too large"
                )))
            }
            Some(n) => {
                let mut body = vec![0; n];
                reader.read_exact(&mut body)?;
                body
            }
            None => {
                let mut body = Vec::new();
                reader
                    .take(MAX_RESPONSE_BODY_BYTES as u64 + 1)
                    .read_to_end(&mut body)?;
                if body.len() > MAX_RESPONSE_BODY_BYTES {
                    return Err(ClientError::BadResponse("body is too large".into()));
                }
                body
            }
        };
        Ok(Response { status, body })
    }

    /// Opens a streaming GET (for `/events`) and calls `line` for each line received
    /// until it returns false or the agent closes the stream.
    pub fn stream_lines(
        &self,
        path: &str,
        mut line: impl FnMut(&str) -> bool,
    ) -> Result<u16, ClientError> {
        let mut stream = self.connect()?;
        stream.set_read_timeout(None)?;
        write!(stream, "GET {path} HTTP/1.1\r\nHost: vigil\r\n\r\n")?;
        let mut reader = BufReader::new(stream);
        let (status, _) = read_head(&mut reader)?;
        let mut text = String::new();
        loop {
            text.clear();
            if reader.read_line(&mut text)? == 0 {
                return Ok(status);
            }
            if !line(text.trim_end()) {
                return Ok(status);
            }
        }
    }
}

/// Reads the status line and headers; returns the status and Content-Length.
fn read_head(reader: &mut impl BufRead) -> Result<(u16, Option<usize>), ClientError> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > MAX_CONTROL_HEADER_BYTES {
            return Err(ClientError::BadResponse(
                "response headers too large".into(),
            ));
        }
        let before = head.len();
        reader.read_until(b'\n', &mut head)?;
        if head.len() == before {
            return Err(ClientError::BadResponse(
                "connection closed before the response".into(),
            ));
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(ClientError::BadResponse("incomplete head".into()))
        }
        Err(e) => return Err(ClientError::BadResponse(e.to_string())),
    }
    let status = response
        .code
        .ok_or_else(|| ClientError::BadResponse("no status".into()))?;
    let mut length = None;
    for header in response.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            let text = std::str::from_utf8(header.value).unwrap_or("");
            length = Some(
                text.trim()
                    .parse::<usize>()
                    .map_err(|_| ClientError::BadResponse(format!("Content-Length '{text}'")))?,
            );
        }
    }
    Ok((status, length))
}

/// One look at a cluster for a leader it agrees on: asks each node in `among` for its
/// `/status` (through `status`), and returns `Ok((leader, term))` when more than half of
/// the `members` name the same leader and term, that leader is in `among`, and the leader
/// itself says it leads in that term. Otherwise `Err` with the (leader, term) pairs seen,
/// for the caller's message. Callers poll it with their own deadline.
pub fn agreed_leader(
    among: &[u64],
    members: usize,
    status: impl Fn(u64) -> Option<serde_json::Value>,
) -> Result<(u64, u64), Vec<(u64, u64)>> {
    let mut seen: Vec<(u64, u64)> = Vec::new();
    for &id in among {
        if let Some(s) = status(id) {
            if let (Some(l), Some(t)) = (s["leader"]["node_id"].as_u64(), s["term"].as_u64()) {
                seen.push((l, t));
            }
        }
    }
    for &(l, t) in &seen {
        let agree = seen.iter().filter(|&&v| v == (l, t)).count();
        if among.contains(&l) && agree * 2 > members {
            if let Some(s) = status(l) {
                if s["role"] == "leader" && s["term"].as_u64() == Some(t) {
                    return Ok((l, t));
                }
            }
        }
    }
    Err(seen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// Statuses of a 5-node cluster: node i reports (leader, term, own role).
    fn view<'a>(
        of: &'a [(u64, u64, u64, &'a str)],
    ) -> impl Fn(u64) -> Option<serde_json::Value> + 'a {
        move |id| {
            of.iter().find(|v| v.0 == id).map(|&(_, leader, term, role)| {
                serde_json::json!({"leader": {"node_id": leader}, "term": term, "role": role})
            })
        }
    }

    #[test]
    fn agreed_leader_needs_a_majority_of_all_members_and_the_leaders_own_word() {
        let all = [1, 2, 3, 4, 5];
        let settled = [
            (1, 2, 7, "follower"),
            (2, 2, 7, "leader"),
            (3, 2, 7, "follower"),
            (4, 4, 6, "leader"),
            (5, 4, 6, "follower"),
        ];
        assert_eq!(agreed_leader(&all, 5, view(&settled)), Ok((2, 7)));
        // Two of five agreeing is no majority, even if they are all we asked.
        let seen = agreed_leader(&[4, 5], 5, view(&settled)).unwrap_err();
        assert_eq!(seen, vec![(4, 6), (4, 6)]);
        // A majority names node 2, but node 2 does not say it leads in that term.
        let stale = [
            (1, 2, 7, "follower"),
            (2, 2, 8, "candidate"),
            (3, 2, 7, "follower"),
            (4, 2, 7, "follower"),
        ];
        assert!(agreed_leader(&all, 5, view(&stale)).is_err());
        // The agreed leader must be among the nodes asked about.
        assert!(agreed_leader(&[1, 3, 5], 5, view(&settled)).is_err());
        // A node that does not answer counts for nobody.
        assert!(agreed_leader(&all, 5, |_| None).unwrap_err().is_empty());
    }

    #[test]
    fn round_trip_against_a_tiny_server() {
        let dir = std::env::temp_dir().join(format!("vigil-client-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buffer = vec![0; 4096];
            let mut used = 0;
            let request = loop {
                let n = conn.read(&mut buffer[used..]).unwrap();
                used += n;
                if let Some(r) = crate::control::http::parse_request(&buffer[..used]).unwrap() {
                    break r;
                }
            };
            assert_eq!(request.path, "/kv/a");
            assert_eq!(request.body, b"{\"value\":\"x\"}");
            let mut out = Vec::new();
            crate::control::http::write_json_response(&mut out, 201, "{\"revision\":5}", true);
            conn.write_all(&out).unwrap();
        });
        let client = Client::new(&path, Duration::from_secs(5));
        let response = client
            .request("PUT", "/kv/a", Some(b"{\"value\":\"x\"}"))
            .unwrap();
        server.join().unwrap();
        assert_eq!(response.status, 201);
        assert_eq!(response.json().unwrap()["revision"], 5);
        let missing = Client::new(&dir.join("none.sock"), Duration::from_secs(1));
        let error = missing
            .request("GET", "/status", None)
            .unwrap_err()
            .to_string();
        assert!(error.contains("is the agent running"), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
