//! Routes and JSON bodies of the control API.
//!
//! | method | path                    | body / answer                                                  |
//! |--------|-------------------------|----------------------------------------------------------------|
//! | GET    | `/status`               | node id, role, term, leader {node_id, term, lease_expiry_ms}, commit/applied index, io backend, members (role, match index, lag, last contact) |
//! | GET    | `/kv/{key}`             | linearizable (ReadIndex): `{"key","value","revision","create_revision","served_by"}`; 404 `not_found` |
//! | PUT    | `/kv/{key}`             | `{"value": "...", "if_revision": n?, "request_id": n?}` -> `{"revision": n, "served_by": id}`; 409 `conflict` with `current_revision` |
//! | DELETE | `/kv/{key}`             | optional `{"if_revision": n, "request_id": n}` -> `{"revision": n, "served_by": id}`; 404 `not_found` |
//! | POST   | `/leadership/stepdown`  | optional `{"to": id}` -> `{"leader": id, "term": n}` once leadership moved |
//! | GET    | `/members`              | `{"members": [...], "served_by"}` (as in `/status`)             |
//! | POST   | `/members`              | `{"id": n, "address": "IP:port"}`: add an observer -> `{"index": n, "served_by"}` |
//! | POST   | `/members/{id}/promote` | observer -> voter (also `/demote`) -> `{"index": n, "served_by"}` once committed |
//! | DELETE | `/members/{id}`         | remove a member -> `{"index": n, "served_by"}` once committed   |
//! | GET    | `/metrics`              | Prometheus text                                                |
//! | GET    | `/events`               | JSON lines: `{"seq","event":"leader",...}` on leadership changes |
//!
//! Values are UTF-8 strings of at most 64 KiB (`MAX_KV_VALUE_BYTES`). `if_revision: 0`
//! means "only if absent". `request_id` (non-zero) makes a retried write apply once.
//! Writes and step-down need the leader: a follower forwards them over its peer
//! connection and relays the answer; `served_by` names the node that served it. Errors
//! are `{"error": "...", "code": "..."}` with a fitting status: 503 `no_leader` (no
//! leader known or reachable; retry), 504 `timeout`, 409 `conflict`, 400 `bad_body`, ...

use super::http::{HttpError, Method};
use crate::limits::{MAX_KV_KEY_BYTES, MAX_KV_VALUE_BYTES};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    Status,
    Metrics,
    Events,
    Stepdown,
    Kv(String),
    /// `GET /members` (list) or `POST /members` (add an observer).
    Members,
    /// `POST /members/{id}/promote|demote` or `DELETE /members/{id}`.
    Member(u64, MemberAction),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberAction {
    Promote,
    Demote,
    Remove,
}

impl Route {
    /// Whether this request must be served by the leader (followers forward it).
    pub fn needs_leader(&self, method: Method) -> bool {
        match self {
            Route::Kv(_) | Route::Members => method != Method::Get,
            Route::Stepdown | Route::Member(..) => true,
            _ => false,
        }
    }
}

pub fn route(method: Method, path: &str) -> Result<Route, HttpError> {
    let not_allowed = || HttpError::MethodNotAllowed {
        method: method.as_str(),
        path: path.to_string(),
    };
    let r = match path {
        "/status" => Route::Status,
        "/metrics" => Route::Metrics,
        "/events" => Route::Events,
        "/leadership/stepdown" => Route::Stepdown,
        "/members" => Route::Members,
        _ if path.starts_with("/members/") => {
            let rest = &path["/members/".len()..];
            let (id, action) = match rest.split_once('/') {
                Some((id, "promote")) => (id, MemberAction::Promote),
                Some((id, "demote")) => (id, MemberAction::Demote),
                None => (rest, MemberAction::Remove),
                Some(_) => return Err(HttpError::NotFound(path.to_string())),
            };
            let id: u64 = id
                .parse()
                .map_err(|_| HttpError::NotFound(path.to_string()))?;
            Route::Member(id, action)
        }
        _ => match path.strip_prefix("/kv/") {
            Some(key) if !key.is_empty() => {
                let key = percent_decode(key).ok_or_else(|| {
                    HttpError::Malformed(format!("bad percent-encoding in {path}"))
                })?;
                if key.len() > MAX_KV_KEY_BYTES {
                    return Err(HttpError::BadBody(format!(
                        "key of {} bytes exceeds {MAX_KV_KEY_BYTES}",
                        key.len()
                    )));
                }
                Route::Kv(key)
            }
            _ => return Err(HttpError::NotFound(path.to_string())),
        },
    };
    let ok = matches!(
        (&r, method),
        (Route::Status | Route::Metrics | Route::Events, Method::Get)
            | (Route::Stepdown, Method::Post)
            | (Route::Kv(_), Method::Get | Method::Put | Method::Delete)
            | (Route::Members, Method::Get | Method::Post)
            | (Route::Member(_, MemberAction::Remove), Method::Delete)
            | (
                Route::Member(_, MemberAction::Promote | MemberAction::Demote),
                Method::Post
            )
    );
    if !ok {
        return Err(not_allowed());
    }
    Ok(r)
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

pub fn method_code(m: Method) -> u8 {
    match m {
        Method::Get => 0,
        Method::Put => 1,
        Method::Post => 2,
        Method::Delete => 3,
    }
}

pub fn method_from_code(c: u8) -> Option<Method> {
    Some(match c {
        0 => Method::Get,
        1 => Method::Put,
        2 => Method::Post,
        3 => Method::Delete,
        _ => return None,
    })
}

/// A parsed `PUT /kv/{key}` or `DELETE /kv/{key}` body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvWrite {
    pub value: Option<String>,
    pub if_revision: Option<u64>,
    pub request_id: u64,
}

pub fn parse_kv_write(method: Method, body: &[u8]) -> Result<KvWrite, HttpError> {
    let v: serde_json::Value = if body.is_empty() && method == Method::Delete {
        serde_json::json!({})
    } else {
        serde_json::from_slice(body).map_err(|e| HttpError::BadBody(format!("not JSON: {e}")))?
    };
    let obj = v
        .as_object()
        .ok_or_else(|| HttpError::BadBody("expected a JSON object".into()))?;
    for k in obj.keys() {
        if !matches!(k.as_str(), "value" | "if_revision" | "request_id") {
            return Err(HttpError::BadBody(format!("unknown field {k:?}")));
        }
    }
    let u64_field = |name: &str| -> Result<Option<u64>, HttpError> {
        match obj.get(name) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(x) => x.as_u64().map(Some).ok_or_else(|| {
                HttpError::BadBody(format!("{name} must be a non-negative integer"))
            }),
        }
    };
    let value = match obj.get("value") {
        None => None,
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(HttpError::BadBody("value must be a string".into())),
    };
    if method == Method::Put && value.is_none() {
        return Err(HttpError::BadBody("value is required".into()));
    }
    if method == Method::Delete && value.is_some() {
        return Err(HttpError::BadBody("a delete takes no value".into()));
    }
    if let Some(v) = &value {
        if v.len() > MAX_KV_VALUE_BYTES {
            return Err(HttpError::BadBody(format!(
                "value of {} bytes exceeds {MAX_KV_VALUE_BYTES}",
                v.len()
            )));
        }
    }
    Ok(KvWrite {
        value,
        if_revision: u64_field("if_revision")?,
        request_id: u64_field("request_id")?.unwrap_or(0),
    })
}

/// `{"to": id}` or nothing.
pub fn parse_stepdown(body: &[u8]) -> Result<Option<u64>, HttpError> {
    if body.is_empty() {
        return Ok(None);
    }
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| HttpError::BadBody(format!("not JSON: {e}")))?;
    match v.get("to") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .map(Some)
            .ok_or_else(|| HttpError::BadBody("to must be a node id".into())),
    }
}

/// `POST /members`: `{"id": n, "address": "IP:port"}` (joins as an observer).
pub fn parse_member_add(body: &[u8]) -> Result<(u64, std::net::SocketAddr), HttpError> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| HttpError::BadBody(format!("not JSON: {e}")))?;
    let id = v["id"]
        .as_u64()
        .filter(|&i| i != 0)
        .ok_or_else(|| HttpError::BadBody("id must be a non-zero node id".into()))?;
    let address = v["address"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| HttpError::BadBody("address must be IP:port".into()))?;
    Ok((id, address))
}

pub fn error_json(message: &str, code: &str) -> String {
    serde_json::json!({ "error": message, "code": code }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route(Method::Get, "/status").unwrap(), Route::Status);
        assert_eq!(
            route(Method::Put, "/kv/a%2Fb").unwrap(),
            Route::Kv("a/b".into())
        );
        assert_eq!(route(Method::Post, "/status").unwrap_err().status(), 405);
        assert_eq!(route(Method::Get, "/nope").unwrap_err().status(), 404);
        assert_eq!(route(Method::Get, "/kv/%zz").unwrap_err().status(), 400);
    }

    #[test]
    fn kv_bodies() {
        let w = parse_kv_write(Method::Put, br#"{"value":"x","if_revision":3}"#).unwrap();
        assert_eq!(
            w,
            KvWrite {
                value: Some("x".into()),
                if_revision: Some(3),
                request_id: 0
            }
        );
        assert!(parse_kv_write(Method::Put, br#"{"if_revision":3}"#).is_err());
        assert!(parse_kv_write(Method::Put, br#"{"value":1}"#).is_err());
        assert!(parse_kv_write(Method::Put, br#"{"value":"x","bogus":1}"#).is_err());
        assert!(parse_kv_write(Method::Put, b"garbage").is_err());
        assert_eq!(
            parse_kv_write(Method::Delete, b"").unwrap().if_revision,
            None
        );
    }
}
