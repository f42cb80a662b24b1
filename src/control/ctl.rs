//! `vigil ctl [--socket PATH] [--json] COMMAND`: the control API for people.
//!
//! ```text
//! vigil ctl status                     node, role, term, leader, indexes, members table
//! vigil ctl stepdown [--to ID]         move leadership away (waits until it moved)
//! vigil ctl members                    the members table only
//! vigil ctl members add ID IP:PORT     add an observer
//! vigil ctl members promote|demote|remove ID
//! vigil ctl kv get KEY
//! vigil ctl kv put KEY VALUE [--if-revision N]
//! vigil ctl kv delete KEY [--if-revision N]
//! vigil ctl events                     follow leadership events (JSON lines)
//! vigil ctl metrics                    Prometheus text
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

const USAGE: &str = "Usage: vigil ctl [--socket PATH] [--json] status|stepdown [--to ID]|members [add ID ADDR|promote ID|demote ID|remove ID]|kv get KEY|kv put KEY VALUE [--if-revision N]|kv delete KEY [--if-revision N]|events|metrics";
const DEFAULT_SOCKET: &str = "/run/vigil/vigil.sock";

pub fn main(args: Vec<OsString>) -> ExitCode {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_args(args);
    let mut socket = PathBuf::from(DEFAULT_SOCKET);
    let mut json = false;
    let mut words: Vec<String> = Vec::new();
    let mut if_revision: Option<u64> = None;
    let mut to: Option<u64> = None;
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
    let text = String::from_utf8_lossy(&response.body).to_string();
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
        _ => println!("{v}"),
    }
    ExitCode::SUCCESS
}

fn print_members(v: &serde_json::Value) {
    println!(
        "{:>8}  {:<9} {:<7} {:>10} {:>6} {:>16}",
        "NODE", "ROLE", "LEADER", "MATCH", "LAG", "LAST CONTACT ms"
    );
    if let Some(ms) = v["members"].as_array() {
        for m in ms {
            let contact = m["last_contact_ms"]
                .as_f64()
                .map_or("-".to_string(), |x| format!("{x:.1}"));
            println!(
                "{:>8}  {:<9} {:<7} {:>10} {:>6} {:>16}",
                cell(&m["node_id"]),
                cell(&m["role"]),
                if m["is_leader"].as_bool() == Some(true) {
                    "*"
                } else {
                    ""
                },
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
