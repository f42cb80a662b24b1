//! `vigil ctl [--socket PATH] [--json] COMMAND`: the control API for people.
//!
//! ```text
//! vigil ctl status                     node, role, term, leader, indexes, members table
//! vigil ctl stepdown [--to ID]         move leadership away (waits until it moved)
//! vigil ctl members                    the members table only
//! vigil ctl members add ID IP:PORT [observer|voter]
//!                                      add a member (default observer; a voter is
//!                                      promoted once it caught up)
//! vigil ctl members promote|demote|remove ID
//! vigil ctl kv get KEY
//! vigil ctl kv put KEY VALUE [--if-revision N]
//! vigil ctl kv delete KEY [--if-revision N]
//! vigil ctl events                     follow leadership events (JSON lines)
//! vigil ctl metrics                    Prometheus text
//! vigil ctl vms                        the VMs table
//! vigil ctl vm create ID --memory-mib N --vcpus N [--touch-percent P]
//!              [--snapshot-interval-ms N] [--full-every N] [--anti-affinity G] [--request-id N]
//! vigil ctl vm show|delete ID
//! vigil ctl vm snapshot ID [--kind full|diff]
//! vigil ctl vm migrate ID [--to HOST] [--no-wait]
//! vigil ctl hosts                      hosts: state, phi, capacity and use, VMs
//! vigil ctl drain HOST [--no-wait]
//! vigil ctl fence-check VM TOKEN       current, stale or unknown
//! ```
//!
//! Tables by default, the agent's JSON with `--json`. Exit status 0 on success, 1 when
//! the agent answered with an error (printed), 2 on usage errors, 3 when the socket is
//! unreachable.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use super::client::Client;

const USAGE: &str = "Usage: vigil ctl [--socket PATH] [--json] status|stepdown [--to ID]|members [add ID ADDR [observer|voter]|promote ID|demote ID|remove ID]|kv get KEY|kv put KEY VALUE [--if-revision N]|kv delete KEY [--if-revision N]|events|metrics
       vigil ctl [--socket PATH] [--json] vms|hosts|vm create ID --memory-mib N --vcpus N [--touch-percent P] [--snapshot-interval-ms N] [--full-every N] [--anti-affinity G] [--request-id N]|vm show ID|vm delete ID|vm snapshot ID [--kind full|diff]|vm migrate ID [--to HOST] [--no-wait]|drain HOST [--no-wait]|fence-check VM TOKEN";

/// The VM options of `vigil ctl` (numbers kept as given; the agent checks them).
#[derive(Default)]
struct VmOptions {
    numbers: Vec<(&'static str, u64)>,
    anti_affinity: Option<String>,
    kind: Option<String>,
    no_wait: bool,
}
const DEFAULT_SOCKET: &str = "/run/vigil/vigil.sock";

pub fn main(args: Vec<OsString>) -> ExitCode {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_args(args);
    let mut socket = PathBuf::from(DEFAULT_SOCKET);
    let mut json = false;
    let mut words: Vec<String> = Vec::new();
    let mut if_revision: Option<u64> = None;
    let mut to: Option<u64> = None;
    let mut vm_options = VmOptions::default();
    loop {
        let arg = match parser.next() {
            Ok(Some(a)) => a,
            Ok(None) => break,
            Err(e) => return usage_error(&e.to_string()),
        };
        match arg {
            Long("socket") => match parser.value() {
                Ok(v) => socket = v.into(),
                Err(e) => return usage_error(&e.to_string()),
            },
            Long("json") => json = true,
            Long("if-revision") => match parser
                .value()
                .ok()
                .and_then(|v| v.into_string().ok())
                .and_then(|v| v.parse().ok())
            {
                Some(n) => if_revision = Some(n),
                None => return usage_error("--if-revision takes a number"),
            },
            Long("to") => match parser
                .value()
                .ok()
                .and_then(|v| v.into_string().ok())
                .and_then(|v| v.parse().ok())
            {
                Some(n) => to = Some(n),
                None => return usage_error("--to takes a node id"),
            },
            Long(
                name @ ("memory-mib"
                | "vcpus"
                | "touch-percent"
                | "snapshot-interval-ms"
                | "full-every"
                | "request-id"),
            ) => {
                let key: &'static str = match name {
                    "memory-mib" => "memory_mib",
                    "vcpus" => "vcpus",
                    "touch-percent" => "touch_percent",
                    "snapshot-interval-ms" => "snapshot_interval_ms",
                    "full-every" => "full_every",
                    _ => "request_id",
                };
                match parser
                    .value()
                    .ok()
                    .and_then(|v| v.into_string().ok())
                    .and_then(|v| v.parse().ok())
                {
                    Some(n) => vm_options.numbers.push((key, n)),
                    None => {
                        return usage_error(&format!("--{} takes a number", key.replace('_', "-")))
                    }
                }
            }
            Long("anti-affinity") => match parser.value().ok().and_then(|v| v.into_string().ok()) {
                Some(g) => vm_options.anti_affinity = Some(g),
                None => return usage_error("--anti-affinity takes a group name"),
            },
            Long("kind") => match parser.value().ok().and_then(|v| v.into_string().ok()) {
                Some(k) => vm_options.kind = Some(k),
                None => return usage_error("--kind takes full or diff"),
            },
            Long("no-wait") => vm_options.no_wait = true,
            Short('h') | Long("help") => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            Value(v) => match v.into_string() {
                Ok(s) => words.push(s),
                Err(_) => return usage_error("arguments must be UTF-8"),
            },
            other => return usage_error(&other.unexpected().to_string()),
        }
    }
    let client = Client::new(&socket, Duration::from_secs(10));
    let words: Vec<&str> = words.iter().map(|s| s.as_str()).collect();
    let (method, path, body) = match words.as_slice() {
        ["status"] | ["members"] => ("GET", "/status".to_string(), None),
        ["metrics"] => ("GET", "/metrics".to_string(), None),
        ["members", "add", id, address] => (
            "POST",
            "/members".to_string(),
            Some(
                serde_json::json!({ "id": id.parse::<u64>().unwrap_or(0), "address": address })
                    .to_string(),
            ),
        ),
        ["members", "add", id, address, role] => (
            "POST",
            "/members".to_string(),
            Some(
                serde_json::json!({ "id": id.parse::<u64>().unwrap_or(0), "address": address, "role": role })
                    .to_string(),
            ),
        ),
        ["members", "promote", id] => ("POST", format!("/members/{id}/promote"), None),
        ["members", "demote", id] => ("POST", format!("/members/{id}/demote"), None),
        ["members", "remove", id] => ("DELETE", format!("/members/{id}"), None),
        ["stepdown"] => (
            "POST",
            "/leadership/stepdown".to_string(),
            Some(serde_json::json!({ "to": to }).to_string()),
        ),
        ["kv", "get", key] => ("GET", format!("/kv/{}", encode_key(key)), None),
        ["kv", "put", key, value] => (
            "PUT",
            format!("/kv/{}", encode_key(key)),
            Some(serde_json::json!({ "value": value, "if_revision": if_revision }).to_string()),
        ),
        ["kv", "delete", key] => (
            "DELETE",
            format!("/kv/{}", encode_key(key)),
            Some(serde_json::json!({ "if_revision": if_revision }).to_string()),
        ),
        ["vms"] => ("GET", "/vms".to_string(), None),
        ["hosts"] => ("GET", "/hosts".to_string(), None),
        ["vm", "create", id] => {
            let mut body = serde_json::json!({ "id": id });
            for (k, n) in &vm_options.numbers {
                body[*k] = (*n).into();
            }
            if let Some(g) = &vm_options.anti_affinity {
                body["anti_affinity"] = g.clone().into();
            }
            ("POST", "/vms".to_string(), Some(body.to_string()))
        }
        ["vm", "show", id] => ("GET", format!("/vms/{}", encode_key(id)), None),
        ["vm", "delete", id] => ("DELETE", format!("/vms/{}", encode_key(id)), None),
        ["vm", "snapshot", id] => (
            "POST",
            format!("/vms/{}/snapshot", encode_key(id)),
            Some(
                serde_json::json!({ "kind": vm_options.kind.as_deref().unwrap_or("full") })
                    .to_string(),
            ),
        ),
        ["vm", "migrate", id] => (
            "POST",
            format!("/vms/{}/migrate", encode_key(id)),
            Some(serde_json::json!({ "to": to, "wait": !vm_options.no_wait }).to_string()),
        ),
        ["drain", host] => match host.parse::<u64>() {
            Ok(h) => (
                "POST",
                format!("/hosts/{h}/drain"),
                Some(serde_json::json!({ "wait": !vm_options.no_wait }).to_string()),
            ),
            Err(_) => return usage_error("drain takes a host id"),
        },
        ["fence-check", vm, token] => match token.parse::<u64>() {
            Ok(t) => (
                "POST",
                "/fence-token/validate".to_string(),
                Some(serde_json::json!({ "vm": vm, "token": t }).to_string()),
            ),
            Err(_) => return usage_error("fence-check takes a VM id and a token number"),
        },
        ["events"] => {
            let r = client.stream_lines("/events", |line| {
                println!("{line}");
                true
            });
            return match r {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("vigil ctl: {e}");
                    ExitCode::from(3)
                }
            };
        }
        _ => return usage_error("unknown command"),
    };
    let response = match client.request(method, &path, body.as_deref().map(str::as_bytes)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vigil ctl: {e}");
            return ExitCode::from(3);
        }
    };
    let mut text = String::from_utf8_lossy(&response.body).to_string();
    if words == ["vms"] && response.status < 300 {
        // `GET /vms` answers in pages: follow the `next` cursor and show them as one.
        match follow_vms_pages(&client, &text) {
            Ok(all) => text = all,
            Err(e) => {
                eprintln!("vigil ctl: {e}");
                return ExitCode::from(3);
            }
        }
    }
    if response.status >= 300 {
        eprintln!("vigil ctl: {} {}", response.status, text.trim());
        return ExitCode::from(1);
    }
    if json || words[0] == "metrics" {
        println!("{}", text.trim_end());
        return ExitCode::SUCCESS;
    }
    let v: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(_) => {
            println!("{text}");
            return ExitCode::SUCCESS;
        }
    };
    match words[0] {
        "status" => {
            println!(
                "node {}  role {}  term {}  leader {}  commit {}  applied {}  io {}",
                v["node_id"],
                cell(&v["role"]),
                v["term"],
                v["leader"]["node_id"],
                v["commit_index"],
                v["applied_index"],
                cell(&v["io_backend"])
            );
            print_members(&v);
        }
        "members" if words.len() == 1 => print_members(&v),
        "members" => println!("committed (served by {})", v["served_by"]),
        "kv" if words[1] == "get" => {
            println!(
                "{}  (revision {}, served by {})",
                cell(&v["value"]),
                v["revision"],
                v["served_by"]
            );
        }
        "kv" => println!("revision {}  (served by {})", v["revision"], v["served_by"]),
        "stepdown" => println!("leader is now {} (term {})", v["leader"], v["term"]),
        "vms" => print_vms(v["vms"].as_array().map(Vec::as_slice).unwrap_or(&[])),
        "vm" if words[1] == "create" => print_vms(std::slice::from_ref(&v["vm"])),
        "vm" if words[1] == "show" => {
            print_vms(std::slice::from_ref(&v));
            if let Some(chain) = v["snapshot"]["chain"].as_array() {
                let paths: Vec<String> = chain.iter().map(cell).collect();
                println!("snapshot chain: {}", paths.join(" "));
            }
        }
        "vm" if words[1] == "delete" => {
            println!("deleted {} (index {})", cell(&v["deleted"]), v["index"])
        }
        "vm" if words[1] == "snapshot" => println!(
            "snapshot {} ({}) of {} committed at index {}",
            cell(&v["snapshot"]["id"]),
            cell(&v["snapshot"]["kind"]),
            cell(&v["vm"]),
            v["snapshot"]["index"]
        ),
        "vm" | "drain" if response.status == 202 => {
            println!(
                "in progress (served by {}); follow with `vigil ctl vms` / `hosts`",
                v["served_by"]
            )
        }
        "vm" => println!(
            "{} moved from host {} to host {} (token {})",
            cell(&v["vm"]),
            cell(&v["from"]),
            cell(&v["host"]),
            cell(&v["token"])
        ),
        "drain" => println!("host {} drained", cell(&v["host"])),
        "hosts" => print_hosts(&v),
        "fence-check" => println!(
            "{}: token {} is {} (current {})",
            cell(&v["vm"]),
            v["token"],
            cell(&v["result"]),
            cell(&v["current"])
        ),
        _ => println!("{v}"),
    }
    ExitCode::SUCCESS
}

fn print_vms(vms: &[serde_json::Value]) {
    println!(
        "{:<16} {:>5} {:>8} {:<8} {:>6} {:>5} {:<10} {:>10}  SNAPSHOT / WAITING",
        "VM", "HOST", "TOKEN", "DESIRED", "MiB", "vCPU", "LOCAL", "COUNTER"
    );
    for v in vms {
        let note = if v["waiting"].is_string() {
            format!("waiting: {}", cell(&v["waiting"]))
        } else if v["snapshot"].is_object() {
            format!(
                "{} ({})",
                cell(&v["snapshot"]["id"]),
                cell(&v["snapshot"]["kind"])
            )
        } else {
            "-".to_string()
        };
        println!(
            "{:<16} {:>5} {:>8} {:<8} {:>6} {:>5} {:<10} {:>10}  {}",
            cell(&v["id"]),
            cell(&v["host"]),
            cell(&v["token"]),
            cell(&v["desired"]),
            cell(&v["memory_mib"]),
            cell(&v["vcpus"]),
            cell(&v["local"]["state"]),
            cell(&v["local"]["counter"]),
            note
        );
    }
}

fn print_hosts(v: &serde_json::Value) {
    println!(
        "{:>5}  {:<9} {:>7} {:>15} {:>11}  VMS",
        "HOST", "STATE", "PHI", "MiB USED/CAP", "vCPU U/C"
    );
    for h in v["hosts"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        let phi = h["phi"]
            .as_f64()
            .map_or("-".to_string(), |p| format!("{p:.2}"));
        let vms: Vec<String> = h["vms"]
            .as_array()
            .map(|a| a.iter().map(cell).collect())
            .unwrap_or_default();
        println!(
            "{:>5}  {:<9} {:>7} {:>15} {:>11}  {}",
            cell(&h["id"]),
            cell(&h["state"]),
            phi,
            format!(
                "{}/{}",
                cell(&h["used"]["memory_mib"]),
                cell(&h["capacity"]["memory_mib"])
            ),
            format!(
                "{}/{}",
                cell(&h["used"]["vcpus"]),
                cell(&h["capacity"]["vcpus"])
            ),
            vms.join(",")
        );
    }
}

fn print_members(v: &serde_json::Value) {
    println!(
        "{:>8}  {:<9} {:<7} {:<22} {:>10} {:>6} {:>16}",
        "NODE", "ROLE", "LEADER", "ADDRESS", "MATCH", "LAG", "LAST CONTACT ms"
    );
    if let Some(ms) = v["members"].as_array() {
        for m in ms {
            let contact = m["last_contact_ms"]
                .as_f64()
                .map_or("-".to_string(), |x| format!("{x:.1}"));
            println!(
                "{:>8}  {:<9} {:<7} {:<22} {:>10} {:>6} {:>16}",
                cell(&m["node_id"]),
                cell(&m["role"]),
                if m["is_leader"].as_bool() == Some(true) {
                    "*"
                } else {
                    ""
                },
                cell(&m["address"]),
                cell(&m["match_index"]),
                cell(&m["lag"]),
                contact
            );
        }
    }
}

/// A JSON value as a table cell: strings bare, numbers as written, null (unknown here,
/// e.g. a follower does not track match indexes) as "-". `Value`'s own `Display`
/// ignores width and alignment, so cells are strings first.
fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "-".to_string(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Fetches the pages after `first` (a `GET /vms` answer) and returns one answer with
/// every VM, in the API's shape (`next` null).
fn follow_vms_pages(client: &Client, first: &str) -> Result<String, String> {
    let mut all: serde_json::Value =
        serde_json::from_str(first).map_err(|e| format!("GET /vms: {e}"))?;
    let mut next = all["next"].as_str().map(str::to_string);
    // Every page holds at least one VM and the cluster holds at most MAX_VMS.
    for _ in 0..crate::limits::MAX_VMS {
        let Some(after) = next.take() else {
            return Ok(all.to_string());
        };
        let path = format!("/vms?after={}", encode_key(&after));
        let r = client
            .request("GET", &path, None)
            .map_err(|e| format!("GET {path}: {e}"))?;
        let text = String::from_utf8_lossy(&r.body);
        if r.status >= 300 {
            return Err(format!("GET {path}: {} {}", r.status, text.trim()));
        }
        let page: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("GET {path}: {e}"))?;
        let vms = page["vms"].as_array().cloned().unwrap_or_default();
        if vms.is_empty() && page["next"].is_string() {
            return Err(format!("GET {path}: an empty page with a next cursor"));
        }
        if let Some(list) = all["vms"].as_array_mut() {
            list.extend(vms);
        }
        next = page["next"].as_str().map(str::to_string);
        all["next"] = serde_json::Value::Null;
    }
    Err("GET /vms: more pages than the cluster can hold VMs".into())
}

fn encode_key(key: &str) -> String {
    let mut out = String::new();
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn usage_error(why: &str) -> ExitCode {
    eprintln!("vigil ctl: {why}\n{USAGE}");
    ExitCode::from(2)
}
