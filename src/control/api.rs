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
//! | GET    | `/events`               | JSON lines: `{"seq","type":"leader",...}` on leadership changes, and the VM events |
//! | POST   | `/vms`                  | create a VM (see `parse_vm_create`) -> 201 `{"vm","index","served_by"}` |
//! | GET    | `/vms`, `/vms/{id}`     | linearizable: `{"vms": [...]}` / one VM object; 404 `not_found` |
//! | DELETE | `/vms/{id}`             | stop everywhere and forget -> `{"deleted","index","served_by"}` |
//! | POST   | `/vms/{id}/snapshot`    | `{"kind": "full"|"diff"}` -> `{"vm","snapshot"}` once committed (served by the VM's host) |
//! | POST   | `/vms/{id}/migrate`     | `{"to": host?, "wait": bool?}` -> 200 once placed elsewhere (202 with `"wait": false` or when it takes long) |
//! | GET    | `/hosts`                | served by the leader: hosts with state, phi, capacity, use, VMs |
//! | POST   | `/hosts/{id}/drain`     | `{"wait": bool?}` -> 200 once drained (202 as for migrate) |
//! | POST   | `/fence-token/validate` | `{"vm": id, "token": n}` -> `{"result": "current"|"stale"|"unknown", "current"}` (linearizable) |
//!
//! The VM contract in full is /work/notes/vm-api.md (kept with the `vms` branch).
//!
//! Values are UTF-8 strings of at most 64 KiB (`MAX_KV_VALUE_BYTES`). `if_revision: 0`
//! means "only if absent". `request_id` (non-zero) makes a retried write apply once.
//! Writes and step-down need the leader: a follower forwards them over its peer
//! connection and relays the answer; `served_by` names the node that served it. Errors
//! are `{"error": "...", "code": "..."}` with a fitting status: 503 `no_leader` (no
//! leader known or reachable; retry), 504 `timeout`, 409 `conflict`, 400 `bad_body`, ...

use super::http::{HttpError, Method};
use crate::limits::{MAX_KV_KEY_BYTES, MAX_KV_VALUE_BYTES, MAX_VMS_PAGE, MAX_VM_ID_BYTES};

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

/// The role `POST /members` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberRole {
    Observer,
    /// Added as an observer, promoted once it has caught up.
    Voter,
}

/// `POST /members {"id": 4, "address": "IP:port", "role": "observer"|"voter"}`; the
/// role defaults to observer.
pub fn parse_member_add(body: &[u8]) -> Result<(u64, std::net::SocketAddr, MemberRole), HttpError> {
    let (id, address) = parse_member_id_address(body)?;
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| HttpError::BadBody(format!("not JSON: {e}")))?;
    let role = match v.get("role") {
        None => MemberRole::Observer,
        Some(r) => match r.as_str() {
            Some("observer") => MemberRole::Observer,
            Some("voter") => MemberRole::Voter,
            _ => {
                return Err(HttpError::BadBody(
                    "role must be \"observer\" or \"voter\"".into(),
                ))
            }
        },
    };
    Ok((id, address, role))
}

fn parse_member_id_address(body: &[u8]) -> Result<(u64, std::net::SocketAddr), HttpError> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| HttpError::BadBody(format!("not JSON: {e}")))?;
    let id = v["id"]
        .as_u64()
        .filter(|&i| i != 0)
        .ok_or_else(|| HttpError::BadBody("id must be a non-zero node id".into()))?;
    let address = v["address"]
        .as_str()
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        .filter(|a| a.port() != 0 && !a.ip().is_unspecified())
        .ok_or_else(|| HttpError::BadBody("address must be IP:port".into()))?;
    Ok((id, address))
}

/// The VM and host routes (handled by `node::vms`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmRoute {
    /// `GET /vms` or `POST /vms`.
    Vms,
    /// `GET /vms/{id}` or `DELETE /vms/{id}`.
    Vm(String),
    Snapshot(String),
    Migrate(String),
    Hosts,
    Drain(u64),
    ValidateToken,
    /// `POST /internal/command`: a host's own proposal (its registration, a snapshot
    /// record) forwarded to the leader, as the hex of the encoded command.
    InternalCommand,
}

impl VmRoute {
    /// Whether the leader serves it (a follower forwards it). Snapshots go to the VM's
    /// host instead; reads are linearizable where they are served.
    pub fn needs_leader(&self, method: Method) -> bool {
        match self {
            VmRoute::Vms | VmRoute::Vm(_) => method != Method::Get,
            VmRoute::Migrate(_) | VmRoute::Hosts | VmRoute::Drain(_) => true,
            VmRoute::InternalCommand => true,
            VmRoute::Snapshot(_) | VmRoute::ValidateToken => false,
        }
    }
}

/// `GET /vms?after=<id>&limit=<n>`: the page asked for (`after` exclusive; `limit`
/// 1..=`MAX_VMS_PAGE`, that by default).
pub fn parse_vms_page(query: &str) -> Result<(Option<String>, usize), HttpError> {
    let mut after = None;
    let mut limit = MAX_VMS_PAGE;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "after" => match percent_decode(value) {
                Some(id) if !id.is_empty() && id.len() <= MAX_VM_ID_BYTES => after = Some(id),
                _ => {
                    return Err(HttpError::BadBody(format!(
                        "after: {value:?} is not a VM id (1..={MAX_VM_ID_BYTES} bytes)"
                    )))
                }
            },
            "limit" => match value.parse::<usize>() {
                Ok(n) if (1..=MAX_VMS_PAGE).contains(&n) => limit = n,
                _ => {
                    return Err(HttpError::BadBody(format!(
                        "limit: {value:?} must be 1..={MAX_VMS_PAGE}"
                    )))
                }
            },
            other => {
                return Err(HttpError::BadBody(format!(
                    "unknown query parameter {other:?} (after, limit)"
                )))
            }
        }
    }
    Ok((after, limit))
}

/// The VM routes: None when `path` is not one of them.
pub fn vm_route(method: Method, path: &str) -> Option<Result<VmRoute, HttpError>> {
    let not_allowed = || HttpError::MethodNotAllowed {
        method: method.as_str(),
        path: path.to_string(),
    };
    let (route, ok) = if path == "/vms" {
        (VmRoute::Vms, matches!(method, Method::Get | Method::Post))
    } else if path == "/hosts" {
        (VmRoute::Hosts, method == Method::Get)
    } else if path == "/fence-token/validate" {
        (VmRoute::ValidateToken, method == Method::Post)
    } else if path == "/internal/command" {
        (VmRoute::InternalCommand, method == Method::Post)
    } else if let Some(rest) = path.strip_prefix("/vms/") {
        let (id, action) = match rest.split_once('/') {
            Some((id, action)) => (id, Some(action)),
            None => (rest, None),
        };
        let id = match percent_decode(id) {
            Some(id) if !id.is_empty() && id.len() <= MAX_VM_ID_BYTES => id,
            _ => return Some(Err(HttpError::NotFound(path.to_string()))),
        };
        match action {
            None => (
                VmRoute::Vm(id),
                matches!(method, Method::Get | Method::Delete),
            ),
            Some("snapshot") => (VmRoute::Snapshot(id), method == Method::Post),
            Some("migrate") => (VmRoute::Migrate(id), method == Method::Post),
            Some(_) => return Some(Err(HttpError::NotFound(path.to_string()))),
        }
    } else if let Some(rest) = path.strip_prefix("/hosts/") {
        match rest.split_once('/') {
            Some((id, "drain")) => match id.parse::<u64>() {
                Ok(id) if id != 0 => (VmRoute::Drain(id), method == Method::Post),
                _ => return Some(Err(HttpError::NotFound(path.to_string()))),
            },
            _ => return Some(Err(HttpError::NotFound(path.to_string()))),
        }
    } else {
        return None;
    };
    Some(if ok { Ok(route) } else { Err(not_allowed()) })
}

/// A parsed `POST /vms` body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmCreate {
    pub id: String,
    pub spec: crate::cluster::command::VmSpec,
    pub request_id: u64,
}

/// The body as a JSON object whose fields are all among `allowed`.
fn object<'a>(
    v: &'a serde_json::Value,
    allowed: &[&str],
) -> Result<&'a serde_json::Map<String, serde_json::Value>, HttpError> {
    let obj = v
        .as_object()
        .ok_or_else(|| HttpError::BadBody("expected a JSON object".into()))?;
    for k in obj.keys() {
        if !allowed.contains(&k.as_str()) {
            return Err(HttpError::BadBody(format!(
                "unknown field {k:?} (known: {})",
                allowed.join(", ")
            )));
        }
    }
    Ok(obj)
}

fn json_body(body: &[u8]) -> Result<serde_json::Value, HttpError> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(serde_json::json!({}));
    }
    serde_json::from_slice(body).map_err(|e| HttpError::BadBody(format!("not JSON: {e}")))
}

fn opt_u64(
    obj: &serde_json::Map<String, serde_json::Value>,
    name: &str,
) -> Result<Option<u64>, HttpError> {
    match obj.get(name) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .map(Some)
            .ok_or_else(|| HttpError::BadBody(format!("{name} must be a non-negative integer"))),
    }
}

fn req_u64(obj: &serde_json::Map<String, serde_json::Value>, name: &str) -> Result<u64, HttpError> {
    opt_u64(obj, name)?.ok_or_else(|| HttpError::BadBody(format!("{name} is required")))
}

fn opt_bool(
    obj: &serde_json::Map<String, serde_json::Value>,
    name: &str,
) -> Result<Option<bool>, HttpError> {
    match obj.get(name) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(HttpError::BadBody(format!("{name} must be true or false"))),
    }
}

fn opt_str<'a>(
    obj: &'a serde_json::Map<String, serde_json::Value>,
    name: &str,
) -> Result<Option<&'a str>, HttpError> {
    match obj.get(name) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(HttpError::BadBody(format!("{name} must be a string"))),
    }
}

/// Defaults of `POST /vms`.
pub const DEFAULT_TOUCH_PERCENT: u64 = 0;
pub const DEFAULT_SNAPSHOT_INTERVAL_MS: u64 = 1000;
pub const DEFAULT_FULL_EVERY: u64 = 10;

/// `POST /vms`: `{"id", "memory_mib", "vcpus", "touch_percent"?, "snapshot_interval_ms"?,
/// "full_every"?, "anti_affinity"?, "request_id"?}`. Types and presence are checked
/// here; ranges by the cluster state (a rejection names the field).
pub fn parse_vm_create(body: &[u8]) -> Result<VmCreate, HttpError> {
    use crate::cluster::command::{Resources, VmSpec};
    let v = json_body(body)?;
    let obj = object(
        &v,
        &[
            "id",
            "memory_mib",
            "vcpus",
            "touch_percent",
            "snapshot_interval_ms",
            "full_every",
            "anti_affinity",
            "request_id",
        ],
    )?;
    let id = opt_str(obj, "id")?
        .ok_or_else(|| HttpError::BadBody("id is required".into()))?
        .to_string();
    let memory_mib = req_u64(obj, "memory_mib")?;
    let memory_bytes = memory_mib
        .checked_mul(1 << 20)
        .ok_or_else(|| HttpError::BadBody(format!("memory_mib {memory_mib} is too large")))?;
    let vcpus = req_u64(obj, "vcpus")?;
    let vcpus = u32::try_from(vcpus)
        .map_err(|_| HttpError::BadBody(format!("vcpus {vcpus} is too large")))?;
    let touch = opt_u64(obj, "touch_percent")?.unwrap_or(DEFAULT_TOUCH_PERCENT);
    if touch > 100 {
        return Err(HttpError::BadBody(format!(
            "touch_percent {touch}: must be 0..=100"
        )));
    }
    let full_every = opt_u64(obj, "full_every")?.unwrap_or(DEFAULT_FULL_EVERY);
    let full_every = u32::try_from(full_every)
        .map_err(|_| HttpError::BadBody(format!("full_every {full_every} is too large")))?;
    Ok(VmCreate {
        id,
        spec: VmSpec {
            resources: Resources {
                memory_bytes,
                vcpus,
            },
            touch_percent: touch as u8,
            snapshot_interval_ms: opt_u64(obj, "snapshot_interval_ms")?
                .unwrap_or(DEFAULT_SNAPSHOT_INTERVAL_MS),
            full_every,
            anti_affinity: opt_str(obj, "anti_affinity")?.map(str::to_string),
        },
        request_id: opt_u64(obj, "request_id")?.unwrap_or(0),
    })
}

/// `DELETE /vms/{id}`: optional `{"request_id": n}`.
pub fn parse_request_id_only(body: &[u8]) -> Result<u64, HttpError> {
    let v = json_body(body)?;
    let obj = object(&v, &["request_id"])?;
    Ok(opt_u64(obj, "request_id")?.unwrap_or(0))
}

/// `POST /vms/{id}/snapshot`: `{"kind": "full"|"diff"}` (default full).
pub fn parse_snapshot(body: &[u8]) -> Result<crate::cluster::command::SnapshotKind, HttpError> {
    use crate::cluster::command::SnapshotKind;
    let v = json_body(body)?;
    let obj = object(&v, &["kind"])?;
    match opt_str(obj, "kind")? {
        None | Some("full") => Ok(SnapshotKind::Full),
        Some("diff") => Ok(SnapshotKind::Diff),
        Some(other) => Err(HttpError::BadBody(format!(
            "kind {other:?}: must be \"full\" or \"diff\""
        ))),
    }
}

/// `POST /vms/{id}/migrate`: `{"to": host?, "wait": bool?, "request_id": n?}`.
pub fn parse_migrate(body: &[u8]) -> Result<(Option<u64>, bool, u64), HttpError> {
    let v = json_body(body)?;
    let obj = object(&v, &["to", "wait", "request_id"])?;
    let to = opt_u64(obj, "to")?;
    if to == Some(0) {
        return Err(HttpError::BadBody("to must be a non-zero host id".into()));
    }
    Ok((
        to,
        opt_bool(obj, "wait")?.unwrap_or(true),
        opt_u64(obj, "request_id")?.unwrap_or(0),
    ))
}

/// `POST /hosts/{id}/drain`: `{"wait": bool?, "request_id": n?}`.
pub fn parse_drain(body: &[u8]) -> Result<(bool, u64), HttpError> {
    let v = json_body(body)?;
    let obj = object(&v, &["wait", "request_id"])?;
    Ok((
        opt_bool(obj, "wait")?.unwrap_or(true),
        opt_u64(obj, "request_id")?.unwrap_or(0),
    ))
}

/// `POST /fence-token/validate`: `{"vm": id, "token": n}`.
pub fn parse_validate(body: &[u8]) -> Result<(String, u64), HttpError> {
    let v = json_body(body)?;
    let obj = object(&v, &["vm", "token"])?;
    let vm = opt_str(obj, "vm")?
        .ok_or_else(|| HttpError::BadBody("vm is required".into()))?
        .to_string();
    Ok((vm, req_u64(obj, "token")?))
}

/// `POST /internal/command`: `{"hex": "..."}`, the encoded command (request id included).
pub fn parse_internal_command(body: &[u8]) -> Result<Vec<u8>, HttpError> {
    let v = json_body(body)?;
    let obj = object(&v, &["hex"])?;
    let hex = opt_str(obj, "hex")?.ok_or_else(|| HttpError::BadBody("hex is required".into()))?;
    if hex.len() % 2 != 0 || hex.len() > 2 * crate::limits::MAX_ENTRY_BYTES {
        return Err(HttpError::BadBody("hex: bad length".into()));
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16)
                .map_err(|_| HttpError::BadBody(format!("hex: bad digit at offset {i}")))
        })
        .collect()
}

/// The body of `POST /internal/command`.
pub fn internal_command_body(bytes: &[u8]) -> String {
    let mut hex = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        hex.push_str(&format!("{b:02x}"));
    }
    serde_json::json!({ "hex": hex }).to_string()
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

    #[test]
    fn vms_pages_are_parsed_and_bounded() {
        assert_eq!(parse_vms_page(""), Ok((None, MAX_VMS_PAGE)));
        assert_eq!(
            parse_vms_page("after=vm%2D1&limit=10"),
            Ok((Some("vm-1".to_string()), 10))
        );
        for bad in [
            "limit=0",
            "limit=x",
            &format!("limit={}", MAX_VMS_PAGE + 1),
            "after=",
            "sort=id",
        ] {
            let e = parse_vms_page(bad).unwrap_err();
            assert_eq!(e.status(), 400, "{bad}");
        }
    }

    #[test]
    fn vm_routes() {
        assert_eq!(vm_route(Method::Get, "/status"), None);
        assert_eq!(vm_route(Method::Post, "/vms"), Some(Ok(VmRoute::Vms)));
        assert_eq!(
            vm_route(Method::Delete, "/vms/a1"),
            Some(Ok(VmRoute::Vm("a1".into())))
        );
        assert_eq!(
            vm_route(Method::Post, "/vms/a1/migrate"),
            Some(Ok(VmRoute::Migrate("a1".into())))
        );
        assert_eq!(
            vm_route(Method::Post, "/hosts/3/drain"),
            Some(Ok(VmRoute::Drain(3)))
        );
        let status = |m, p| vm_route(m, p).unwrap().unwrap_err().status();
        assert_eq!(status(Method::Put, "/vms"), 405);
        assert_eq!(status(Method::Get, "/vms/a1/snapshot"), 405);
        assert_eq!(status(Method::Post, "/vms/a1/explode"), 404);
        assert_eq!(status(Method::Post, "/hosts/x/drain"), 404);
        assert_eq!(status(Method::Post, "/hosts/0/drain"), 404);
        assert!(VmRoute::Vms.needs_leader(Method::Post));
        assert!(!VmRoute::Vms.needs_leader(Method::Get));
        assert!(!VmRoute::Snapshot("a".into()).needs_leader(Method::Post));
    }

    #[test]
    fn vm_bodies_name_what_is_wrong() {
        let c =
            parse_vm_create(br#"{"id":"vm1","memory_mib":64,"vcpus":1,"request_id":9}"#).unwrap();
        assert_eq!(c.id, "vm1");
        assert_eq!(c.spec.resources.memory_bytes, 64 << 20);
        assert_eq!(c.spec.snapshot_interval_ms, DEFAULT_SNAPSHOT_INTERVAL_MS);
        assert_eq!(c.request_id, 9);
        let err = |body: &[u8]| match parse_vm_create(body) {
            Err(HttpError::BadBody(why)) => why,
            other => panic!("{other:?}"),
        };
        assert!(err(br#"{"id":"a","memory_mib":64,"vcpus":1,"cpus":2}"#)
            .contains("unknown field \"cpus\""));
        assert!(err(br#"{"id":"a","memory_mib":"64","vcpus":1}"#).contains("memory_mib must be"));
        assert!(err(br#"{"memory_mib":64,"vcpus":1}"#).contains("id is required"));
        assert!(err(br#"{"id":"a","memory_mib":64}"#).contains("vcpus is required"));
        assert!(
            err(br#"{"id":"a","memory_mib":64,"vcpus":1,"touch_percent":101}"#)
                .contains("touch_percent")
        );
        assert!(err(b"[1,2]").contains("JSON object"));
        assert!(err(b"{nope").contains("not JSON"));
        assert!(parse_snapshot(b"").is_ok());
        assert!(parse_snapshot(br#"{"kind":"half"}"#).is_err());
        assert_eq!(
            parse_migrate(br#"{"to":2,"wait":false}"#).unwrap(),
            (Some(2), false, 0)
        );
        assert!(parse_migrate(br#"{"wait":"no"}"#).is_err());
        assert_eq!(
            parse_validate(br#"{"vm":"a","token":17}"#).unwrap(),
            ("a".into(), 17)
        );
        assert!(parse_validate(br#"{"vm":"a","token":-1}"#).is_err());
        let bytes = vec![0u8, 1, 0xab, 0xff];
        assert_eq!(
            parse_internal_command(internal_command_body(&bytes).as_bytes()).unwrap(),
            bytes
        );
        assert!(parse_internal_command(br#"{"hex":"0g"}"#).is_err());
        assert!(parse_internal_command(br#"{"hex":"abc"}"#).is_err());
    }
}
