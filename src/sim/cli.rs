//! `vigil sim`: run seeds, print JSON lines (one object per line) on stdout.

use super::world::{Fault, RunReport, SimConfig, VmBugs, World, MS};
use crate::raft::{Bugs, Nanos, Role};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::Instant;

const HELP: &str = "\
vigil sim: deterministic simulation of a Raft cluster with faults

Usage: vigil sim [--seed S | --seeds N [--start S]] [--bug NAME] [--no-faults]
       vigil sim --election-bench [--runs N]

  --seed S          run one seed; prints its trace hash (same seed, same hash)
  --seeds N         run seeds start..start+N; reports seeds/s and simulated s per wall s
  --start S         first seed for --seeds (default 0)
  --bug NAME        plant a bug (vote-without-log-check, commit-old-term,
                    ack-before-persist, follower-commit-unchecked, vote-twice,
                    lease-from-election, follower-read-local)
  --vms             VM mode: every node is a host running fake VMMs (split-brain,
                    token and VM liveness checks; freezes and power losses too);
                    --seeds adds the resurrection-time distribution
  --bug NAME (VM mode) skip-new-leader-lease-wait, renew-without-lease,
                    lease-from-any-contact, no-resurrection
  --no-faults       no network, crash or disk faults
  --election-bench  measure election convergence (leader lost -> new leader commits)
  --runs N          elections measured by --election-bench (default 200)

Output: one JSON object per line. A failing seed prints its seed, its fault schedule
and the first violated invariant, and the command exits with status 1.
";

fn bug_from_name(name: &str) -> Option<Bugs> {
    let mut b = Bugs::default();
    match name {
        "vote-without-log-check" => b.vote_without_log_check = true,
        "commit-old-term" => b.commit_old_term_by_count = true,
        "ack-before-persist" => b.ack_before_persist = true,
        "follower-commit-unchecked" => b.follower_commit_unchecked = true,
        "vote-twice" => b.vote_twice = true,
        "lease-from-election" => b.lease_from_election = true,
        "follower-read-local" => b.follower_read_local = true,
        _ => return None,
    }
    Some(b)
}

fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn fault_text(f: &Fault) -> String {
    match f {
        Fault::Partition(side) => {
            let ids: Vec<String> = side.iter().map(|n| (n + 1).to_string()).collect();
            format!("partition [{}] | rest", ids.join(","))
        }
        Fault::Isolate(n) => format!("isolate {}", n + 1),
        Fault::OneWay(a, b) => format!("drop {}->{}", a + 1, b + 1),
        Fault::Heal => "heal network".into(),
        Fault::Crash(n) => format!("crash {}", n + 1),
        Fault::Restart(n) => format!("restart {}", n + 1),
        Fault::PowerOff(n) => format!("power off {} (its VMMs die)", n + 1),
        Fault::Freeze(n, d) => format!("freeze agent {} for {} ms", n + 1, d / MS),
        Fault::FlipBit(n) => format!("flip a synced bit on {} and restart it", n + 1),
        Fault::TransferLeader => "transfer leadership".into(),
        Fault::Membership => "membership change".into(),
        Fault::HealAll => "heal all, restart all".into(),
    }
}

/// One JSON line describing a run.
pub fn report_json(r: &RunReport, wall_s: f64) -> String {
    let mut s = format!(
        "{{\"seed\":{},\"ok\":{},\"trace_hash\":\"{:016x}\",\"sim_s\":{:.3},\"wall_s\":{:.4},\"events\":{},\"committed\":{},\"leaders\":{},\"history_ops\":{},\"linearizability\":\"{}\",\"snapshots_installed\":{},\"corrupt_nodes\":{},\"membership_changes\":{},\"transfers\":{}",
        r.seed,
        r.violation.is_none(),
        r.trace_hash,
        r.sim_nanos as f64 / 1e9,
        wall_s,
        r.events,
        r.committed,
        r.leaders,
        r.history_ops,
        r.linearizability,
        r.snapshots_installed,
        r.corrupt_nodes,
        r.membership_changes,
        r.transfers
    );
    if let Some(v) = &r.violation {
        let _ = write!(s, ",\"violation\":{}", json_str(v));
        let sched: Vec<String> = r
            .schedule
            .iter()
            .map(|(t, f)| json_str(&format!("{}ms {}", t / MS, fault_text(f))))
            .collect();
        let _ = write!(s, ",\"schedule\":[{}]", sched.join(","));
    }
    s.push('}');
    s
}

pub fn main(args: Vec<OsString>) -> ExitCode {
    match run_cli(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vigil sim: {e}\n\n{HELP}");
            ExitCode::from(2)
        }
    }
}

fn run_cli(args: Vec<OsString>) -> Result<ExitCode, String> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_args(args);
    let mut seed: Option<u64> = None;
    let mut seeds: Option<u64> = None;
    let mut start = 0u64;
    let mut bugs = Bugs::default();
    let mut faults = true;
    let mut bench = false;
    let mut runs = 200usize;
    let mut vms = false;
    let mut vm_bugs = VmBugs::default();
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Long("seed") => seed = Some(parse(&mut parser)?),
            Long("seeds") => seeds = Some(parse(&mut parser)?),
            Long("start") => start = parse(&mut parser)?,
            Long("runs") => runs = parse(&mut parser)?,
            Long("bug") => {
                let v: String = parser
                    .value()
                    .map_err(|e| e.to_string())?
                    .into_string()
                    .map_err(|_| "--bug: not UTF-8".to_string())?;
                match v.as_str() {
                    "skip-new-leader-lease-wait" => vm_bugs.skip_new_leader_lease_wait = true,
                    "renew-without-lease" => vm_bugs.renew_without_lease = true,
                    "lease-from-any-contact" => vm_bugs.lease_from_any_contact = true,
                    "no-resurrection" => vm_bugs.no_resurrection = true,
                    _ => {
                        bugs =
                            bug_from_name(&v).ok_or_else(|| format!("--bug: unknown bug '{v}'"))?
                    }
                }
            }
            Long("no-faults") => faults = false,
            Long("vms") => vms = true,
            Long("election-bench") => bench = true,
            Short('h') | Long("help") => {
                print!("{HELP}");
                return Ok(ExitCode::SUCCESS);
            }
            other => return Err(other.unexpected().to_string()),
        }
    }
    if bench {
        election_bench(runs);
        return Ok(ExitCode::SUCCESS);
    }
    if vm_bugs.any() && !vms {
        return Err("the VM bugs need --vms".into());
    }
    let (first, count) = match (seed, seeds) {
        (Some(s), None) => (s, 1),
        (None, Some(n)) => (start, n),
        (None, None) => (0, 1),
        (Some(_), Some(_)) => return Err("give --seed or --seeds, not both".into()),
    };
    let wall = Instant::now();
    let mut sim_nanos = 0u128;
    let mut failed = 0u64;
    let mut lin_unknown = 0u64;
    let mut events = 0u64;
    let mut after_dead: Vec<f64> = Vec::new();
    let mut outages: Vec<f64> = Vec::new();
    for s in first..first + count {
        let mut cfg = if vms {
            SimConfig::vm_mode(s)
        } else {
            SimConfig::new(s)
        };
        cfg.vm_bugs = vm_bugs;
        cfg.bugs = bugs;
        cfg.faults = faults;
        let t0 = Instant::now();
        let r = super::run(cfg);
        sim_nanos += r.sim_nanos as u128;
        after_dead.extend(r.vm_after_declared_dead.iter().map(|&n| n as f64 / 1e6));
        outages.extend(r.vm_outages.iter().map(|&n| n as f64 / 1e6));
        events += r.events;
        if r.linearizability == "unknown" {
            lin_unknown += 1;
        }
        if r.violation.is_some() || count == 1 {
            println!("{}", report_json(&r, t0.elapsed().as_secs_f64()));
        }
        if r.violation.is_some() {
            failed += 1;
            if count > 1 {
                eprintln!("seed {s}: {}", r.violation.as_deref().unwrap_or(""));
            }
        }
        if count > 1 && (s - first + 1) % 1000 == 0 {
            eprintln!("{} seeds, {failed} failed", s - first + 1);
        }
    }
    let secs = wall.elapsed().as_secs_f64();
    if count > 1 {
        println!(
            "{{\"bench\":\"sim\",\"case\":\"seeds\",\"seeds\":{count},\"failed\":{failed},\"linearizability_unknown\":{lin_unknown},\"wall_s\":{secs:.3},\"seeds_per_s\":{:.2},\"sim_s_per_wall_s\":{:.2},\"events_per_s\":{:.0}}}",
            count as f64 / secs,
            sim_nanos as f64 / 1e9 / secs,
            events as f64 / secs
        );
    }
    if vms && count > 1 {
        for (case, mut v) in [
            ("declared-dead-to-running", after_dead),
            ("stopped-running-to-running", outages),
        ] {
            if v.is_empty() {
                continue;
            }
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            println!(
                "{{\"bench\":\"sim-vms\",\"case\":\"{case}\",\"unit\":\"ms\",\"n\":{},\"p50\":{:.1},\"p99\":{:.1},\"max\":{:.1}}}",
                v.len(),
                percentile(&v, 0.5),
                percentile(&v, 0.99),
                v[v.len() - 1]
            );
        }
    }
    Ok(if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn parse<T: std::str::FromStr>(p: &mut lexopt::Parser) -> Result<T, String> {
    let v = p.value().map_err(|e| e.to_string())?;
    v.to_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("invalid number {v:?}"))
}

/// Election convergence with 1 ms links and the default timeouts: the leader crashes;
/// measured until a new leader has committed the no-op of its term.
pub fn election_convergence(seed: u64, voters: usize) -> Option<Nanos> {
    let mut cfg = SimConfig::new(seed);
    cfg.voters = voters;
    cfg.observers = 0;
    cfg.spares = 0;
    cfg.faults = false;
    cfg.clients = 0;
    cfg.link.min_delay = MS;
    cfg.link.jitter = 0;
    cfg.uniform_links = true;
    cfg.link.loss = 0.0;
    cfg.link.duplicate = 0.0;
    cfg.link.straggle = 0.0;
    cfg.sync_latency = (MS / 10, MS / 10);
    cfg.fault_time = 60_000 * MS;
    let mut w = World::new(cfg);
    // Wait for a first leader that has committed its no-op, plus a little stability.
    let committed_leader = |w: &World| {
        w.leader().and_then(|l| {
            let r = w.raft(l)?;
            (r.term_at(r.commit_index()) == Some(r.term())).then_some(l)
        })
    };
    if !w.run_until(10_000 * MS, |w| committed_leader(w).is_some()) {
        return None;
    }
    let settle = w.now() + 300 * MS;
    w.run_until(settle, |_| false);
    let old = committed_leader(&w)?;
    let old_term = w.raft(old)?.term();
    w.crash(old);
    let t0 = w.now();
    let done = w.run_until(t0 + 10_000 * MS, |w| {
        w.leader().is_some_and(|l| {
            let r = w.raft(l).unwrap();
            r.role() == Role::Leader
                && r.term() > old_term
                && r.term_at(r.commit_index()) == Some(r.term())
        })
    });
    done.then(|| w.now() - t0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Prints the election convergence distribution for 3 and 5 voters as JSON lines.
pub fn election_bench(runs: usize) {
    for voters in [3usize, 5] {
        let mut samples = Vec::with_capacity(runs);
        for s in 0..runs as u64 {
            if let Some(ns) = election_convergence(s, voters) {
                samples.push(ns as f64 / 1e6);
            }
            if (s + 1) % 50 == 0 {
                eprintln!("{voters} voters: {} runs", s + 1);
            }
        }
        samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
        if samples.is_empty() {
            continue;
        }
        println!(
            "{{\"bench\":\"election\",\"case\":\"sim-{voters}voters-1ms-hb20-et100-200\",\"unit\":\"ms\",\"n\":{},\"failed\":{},\"p50\":{:.1},\"p99\":{:.1},\"max\":{:.1}}}",
            samples.len(),
            runs - samples.len(),
            percentile(&samples, 0.5),
            percentile(&samples, 0.99),
            samples[samples.len() - 1]
        );
    }
}
