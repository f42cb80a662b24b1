//! HTTP/1.1 for the control socket: just enough of it, strictly bounded.
//!
//! Requests are parsed with `httparse` out of the connection's read buffer. The limits
//! come from `limits`: the head (request line and headers) may not exceed
//! `MAX_CONTROL_HEADER_BYTES`, a body is only accepted with a `Content-Length` of at most
//! `MAX_CONTROL_BODY_BYTES`, and chunked uploads are refused. Every refusal is an
//! [`HttpError`] that maps to a status code and a JSON body `{"error", "code"}`, so a
//! client always learns what was wrong.

use std::fmt;

use crate::limits::{MAX_CONTROL_BODY_BYTES, MAX_CONTROL_HEADER_BYTES};

/// Headers read from one request; more is an error.
const MAX_HEADERS: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
    Post,
    Delete,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Post => "POST",
            Method::Delete => "DELETE",
        }
    }
}

/// A complete request, copied out of the read buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    /// The path without the query string, still percent-encoded.
    pub path: String,
    /// The raw query string (after `?`), empty when absent.
    pub query: String,
    pub body: Vec<u8>,
    /// The client asked to close the connection after this response.
    pub close: bool,
    /// Bytes of the read buffer that this request used.
    pub consumed: usize,
}

/// Why a request was refused. Each maps to a status and a stable `code` string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpError {
    Malformed(String),
    HeadTooLarge,
    BodyTooLarge(u64),
    LengthRequired,
    UnsupportedMethod(String),
    UnsupportedVersion,
    NotFound(String),
    MethodNotAllowed {
        method: &'static str,
        path: String,
    },
    BadBody(String),
    /// The request did not arrive whole within the read timeout.
    RequestTimeout,
}

impl HttpError {
    pub fn status(&self) -> u16 {
        match self {
            HttpError::Malformed(_) | HttpError::BadBody(_) => 400,
            HttpError::NotFound(_) => 404,
            HttpError::MethodNotAllowed { .. } => 405,
            HttpError::RequestTimeout => 408,
            HttpError::LengthRequired => 411,
            HttpError::BodyTooLarge(_) => 413,
            HttpError::HeadTooLarge => 431,
            HttpError::UnsupportedMethod(_) => 501,
            HttpError::UnsupportedVersion => 505,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            HttpError::Malformed(_) => "malformed_request",
            HttpError::HeadTooLarge => "header_too_large",
            HttpError::BodyTooLarge(_) => "body_too_large",
            HttpError::LengthRequired => "length_required",
            HttpError::UnsupportedMethod(_) => "unsupported_method",
            HttpError::UnsupportedVersion => "unsupported_http_version",
            HttpError::NotFound(_) => "not_found",
            HttpError::MethodNotAllowed { .. } => "method_not_allowed",
            HttpError::BadBody(_) => "bad_body",
            HttpError::RequestTimeout => "request_timeout",
        }
    }

    /// Whether the connection can carry on: after a framing error the byte stream is
    /// no longer trustworthy, so those close it.
    pub fn keeps_connection(&self) -> bool {
        matches!(
            self,
            HttpError::NotFound(_) | HttpError::MethodNotAllowed { .. } | HttpError::BadBody(_)
        )
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Malformed(why) => write!(f, "malformed request: {why}"),
            HttpError::HeadTooLarge => write!(
                f,
                "request line and headers exceed {MAX_CONTROL_HEADER_BYTES} bytes"
            ),
            HttpError::BodyTooLarge(n) => write!(
                f,
                "request body of {n} bytes exceeds the {MAX_CONTROL_BODY_BYTES}-byte limit"
            ),
            HttpError::LengthRequired => {
                write!(
                    f,
                    "a request body needs Content-Length (chunked uploads are not accepted)"
                )
            }
            HttpError::UnsupportedMethod(m) => write!(f, "method {m} is not supported"),
            HttpError::UnsupportedVersion => write!(f, "only HTTP/1.1 and HTTP/1.0 are spoken"),
            HttpError::NotFound(path) => write!(f, "no such resource: {path}"),
            HttpError::MethodNotAllowed { method, path } => {
                write!(f, "{method} is not allowed on {path}")
            }
            HttpError::BadBody(why) => write!(f, "bad request body: {why}"),
            HttpError::RequestTimeout => write!(
                f,
                "the request did not arrive whole within {} ms",
                crate::limits::CONTROL_READ_TIMEOUT_MS
            ),
        }
    }
}

impl std::error::Error for HttpError {}

/// Parses the request at the start of `buffer`. `Ok(None)` means more bytes are needed
/// (and the limits so far are respected).
pub fn parse_request(buffer: &[u8]) -> Result<Option<Request>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(buffer) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buffer.len() > MAX_CONTROL_HEADER_BYTES {
                return Err(HttpError::HeadTooLarge);
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpError::Malformed(format!(
                "more than {MAX_HEADERS} headers"
            )))
        }
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    };
    if head_len > MAX_CONTROL_HEADER_BYTES {
        return Err(HttpError::HeadTooLarge);
    }
    let method = match request.method.unwrap_or("") {
        "GET" => Method::Get,
        "PUT" => Method::Put,
        "POST" => Method::Post,
        "DELETE" => Method::Delete,
        other => {
            return Err(HttpError::UnsupportedMethod(
                other.chars().take(16).collect(),
            ))
        }
    };
    let version = request.version.unwrap_or(0);
    let target = request.path.unwrap_or("");
    if !target.starts_with('/') {
        return Err(HttpError::Malformed(
            "the request target must start with '/'".into(),
        ));
    }

    let mut content_length: Option<u64> = None;
    let mut close = version == 0;
    for header in request.headers.iter() {
        let value = std::str::from_utf8(header.value)
            .map_err(|_| HttpError::Malformed(format!("header {} is not UTF-8", header.name)))?
            .trim();
        if header.name.eq_ignore_ascii_case("content-length") {
            let parsed = value.parse::<u64>().map_err(|_| {
                HttpError::Malformed(format!("Content-Length '{value}' is not a number"))
            })?;
            if content_length.is_some_and(|previous| previous != parsed) {
                return Err(HttpError::Malformed(
                    "conflicting Content-Length headers".into(),
                ));
            }
            content_length = Some(parsed);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::LengthRequired);
        } else if header.name.eq_ignore_ascii_case("connection") {
            if value.eq_ignore_ascii_case("close") {
                close = true;
            } else if value.eq_ignore_ascii_case("keep-alive") {
                close = false;
            }
        }
    }
    let body_len = content_length.unwrap_or(0);
    if body_len > MAX_CONTROL_BODY_BYTES as u64 {
        return Err(HttpError::BodyTooLarge(body_len));
    }
    let total = head_len + body_len as usize;
    let Some(body) = buffer.get(head_len..total) else {
        return Ok(None);
    };
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, query),
        None => (target, ""),
    };
    Ok(Some(Request {
        method,
        path: path.to_string(),
        query: query.to_string(),
        body: body.to_vec(),
        close,
        consumed: total,
    }))
}

/// Largest request the connection buffer must be able to hold.
pub const MAX_REQUEST_BYTES: usize = MAX_CONTROL_HEADER_BYTES + MAX_CONTROL_BODY_BYTES;

/// Writes a complete response with a JSON body.
pub fn write_json_response(out: &mut Vec<u8>, status: u16, body: &str, close: bool) {
    write_response(out, status, "application/json", body.as_bytes(), close);
}

/// Writes a complete response.
pub fn write_response(
    out: &mut Vec<u8>,
    status: u16,
    content_type: &str,
    body: &[u8],
    close: bool,
) {
    use std::io::Write;
    let connection = if close { "close" } else { "keep-alive" };
    // Writing into a Vec cannot fail.
    let _ = write!(
        out,
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n",
        reason(status),
        body.len(),
    );
    out.extend_from_slice(body);
}

/// The JSON error body for `error`: `{"error": "...", "code": "..."}`.
pub fn error_body(error: &HttpError) -> String {
    serde_json::json!({ "error": error.to_string(), "code": error.code() }).to_string()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        307 => "Temporary Redirect",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_get_and_put_with_body() {
        let raw = b"GET /status?verbose=1 HTTP/1.1\r\nHost: localhost\r\n\r\nPUT /kv/a HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";
        let first = parse_request(raw).unwrap().unwrap();
        assert_eq!(first.method, Method::Get);
        assert_eq!(first.path, "/status");
        assert_eq!(first.query, "verbose=1");
        assert!(!first.close);
        let second = parse_request(&raw[first.consumed..]).unwrap().unwrap();
        assert_eq!(second.method, Method::Put);
        assert_eq!(second.body, b"hello");
        assert!(second.close);
        assert_eq!(first.consumed + second.consumed, raw.len());
    }

    #[test]
    fn partial_requests_wait_for_more() {
        let raw = b"PUT /kv/a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello";
        for cut in 0..raw.len() {
            assert_eq!(parse_request(&raw[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn refuses_what_breaks_the_limits() {
        let huge_body = format!(
            "PUT /kv/a HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_CONTROL_BODY_BYTES + 1
        );
        assert!(matches!(
            parse_request(huge_body.as_bytes()),
            Err(HttpError::BodyTooLarge(_))
        ));
        let mut endless_head = b"GET / HTTP/1.1\r\nX-Pad: ".to_vec();
        endless_head.resize(MAX_CONTROL_HEADER_BYTES + 10, b'a');
        assert_eq!(parse_request(&endless_head), Err(HttpError::HeadTooLarge));
        let chunked = b"POST /vms HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(parse_request(chunked), Err(HttpError::LengthRequired));
        let patch = b"PATCH /x HTTP/1.1\r\n\r\n";
        assert_eq!(
            parse_request(patch),
            Err(HttpError::UnsupportedMethod("PATCH".into()))
        );
        let garbage = b"\x00\x01\x02 nonsense\r\n\r\n";
        assert!(matches!(
            parse_request(garbage),
            Err(HttpError::Malformed(_))
        ));
        let bad_length = b"PUT /kv/a HTTP/1.1\r\nContent-Length: x\r\n\r\n";
        assert!(matches!(
            parse_request(bad_length),
            Err(HttpError::Malformed(_))
        ));
        let two_lengths = b"PUT /kv/a HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab";
        assert!(matches!(
            parse_request(two_lengths),
            Err(HttpError::Malformed(_))
        ));
        let absolute = b"GET http://x/status HTTP/1.1\r\n\r\n";
        assert!(matches!(
            parse_request(absolute),
            Err(HttpError::Malformed(_))
        ));
    }

    #[test]
    fn error_bodies_are_json_with_a_code() {
        let error = HttpError::BodyTooLarge(1 << 30);
        let body: serde_json::Value = serde_json::from_str(&error_body(&error)).unwrap();
        assert_eq!(body["code"], "body_too_large");
        assert!(body["error"].as_str().unwrap().contains("exceeds"));
        assert_eq!(error.status(), 413);
        let mut out = Vec::new();
        write_json_response(&mut out, error.status(), &error_body(&error), true);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 413 Content Too Large\r\n"));
        assert!(text.contains("Connection: close\r\n"));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut state = 0xdead_beef_cafe_f00du64;
        let seed = b"GET /kv/a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc";
        let mut buffer = seed.to_vec();
        for _ in 0..50_000 {
            buffer.copy_from_slice(seed);
            for _ in 0..3 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let at = (state % buffer.len() as u64) as usize;
                buffer[at] = (state >> 32) as u8;
            }
            let cut = (state >> 40) as usize % (buffer.len() + 1);
            let _ = parse_request(&buffer[..cut]);
        }
    }
}
