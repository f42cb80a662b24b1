//! `vigil demo`: a local 3-host cluster loses a host and brings its VM back.
//!
//! Starts three agents of this executable on 127.0.0.1 (temp data dirs, one temp
//! shared-storage dir), creates test-guest VMs, shows where they run, SIGKILLs the
//! agent and the VMMs of one VM's host, and prints the failover timeline from the
//! survivors' `GET /events` streams and the guest's own report file. Then it stops
//! every process it started, by PID (also on error or Ctrl-C), and removes the temp dir.
//! Without a usable /dev/kvm it says so and shows the leader failover alone.
//!
//! The pieces are shared with the VM tests and the resurrect benchmark: `local` (the
//! cluster of processes), `procs` (finding a host's VMMs), `vms` (the VM API),
//! `timeline` (events), `reports` (the guest's report files) and `snapshot` (the
//! counter a snapshot holds).

pub mod local;
pub mod procs;
pub mod reports;
pub mod snapshot;
pub mod timeline;
pub mod vms;

use std::ffi::OsString;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use local::{LocalCluster, Options, VmsConfig};
use timeline::{now_ms, EventFeed, Failure, Mark, Timeline};
use vms::VmView;

use crate::limits::MAX_DEMO_VMS;

pub fn monotonic_ns() -> u64 {
    vigil_kvm::monotonic_ns()
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether SIGINT or SIGTERM arrived (every wait of the demo checks it).
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// SIGINT and SIGTERM set a flag instead of ending the process, so the demo can stop
/// what it started. No SA_RESTART: a blocking read returns EINTR and the wait ends.
fn install_signal_handlers() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is valid; the handler only stores to an atomic,
        // which is async-signal-safe.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

const USAGE: &str = "\
Usage: vigil demo [options]

Starts a local 3-host cluster (three `vigil agent` processes on 127.0.0.1, temp dirs),
creates test-guest VMs, kills the host of one of them (its agent and its VMMs, with
SIGKILL) and prints the timeline of the failover in milliseconds: leader election,
host declared dead, VM placed, VM restored, guest counter running again. Then it stops
everything it started and removes its temp dir. Needs /dev/kvm for the VMs; without it,
it shows the leader failover alone.

Options:
  --vms <N>           VMs to create, 1..=8 (default 2)
  --kill <WHO>        leader: the killed host is also the Raft leader (default);
                      follower: it is not
  --no-kvm            show the leader failover alone even when /dev/kvm is usable
  --timeout <S>       give up on any one step after S seconds (default 60)
  --keep              keep the temp dir (configs, logs, report files) afterwards
  -h, --help          print this help
";

#[derive(Clone, Debug)]
struct DemoOptions {
    vms: usize,
    kill_leader: bool,
    no_kvm: bool,
    step_limit: Duration,
    keep: bool,
}

fn parse(args: Vec<OsString>) -> Result<Option<DemoOptions>, String> {
    use lexopt::prelude::*;
    let mut options = DemoOptions {
        vms: 2,
        kill_leader: true,
        no_kvm: false,
        step_limit: Duration::from_secs(60),
        keep: false,
    };
    let mut parser = lexopt::Parser::from_args(args);
    let number = |parser: &mut lexopt::Parser, name: &str| -> Result<u64, String> {
        let value = parser.value().map_err(|e| e.to_string())?;
        value
            .to_str()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| format!("{name} takes a number, not {value:?}"))
    };
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Long("vms") => {
                let n = number(&mut parser, "--vms")? as usize;
                if n == 0 || n > MAX_DEMO_VMS {
                    return Err(format!("--vms {n}: must be 1..={MAX_DEMO_VMS}"));
                }
                options.vms = n;
            }
            Long("kill") => {
                let value = parser.value().map_err(|e| e.to_string())?;
                options.kill_leader = match value.to_str() {
                    Some("leader") => true,
                    Some("follower") => false,
                    _ => return Err(format!("--kill takes leader or follower, not {value:?}")),
                };
            }
            Long("no-kvm") => options.no_kvm = true,
            Long("timeout") => {
                let s = number(&mut parser, "--timeout")?;
                if s == 0 {
                    return Err("--timeout 0: must be at least 1 second".into());
                }
                options.step_limit = Duration::from_secs(s);
            }
            Long("keep") => options.keep = true,
            Short('h') | Long("help") => return Ok(None),
            other => return Err(other.unexpected().to_string()),
        }
    }
    Ok(Some(options))
}

/// `vigil demo [options]`.
pub fn main(args: Vec<OsString>) -> ExitCode {
    let options = match parse(args) {
        Ok(Some(options)) => options,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(why) => {
            eprintln!("vigil demo: {why}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    install_signal_handlers();
    match run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("\nvigil demo failed: {why}");
            ExitCode::FAILURE
        }
    }
}

/// Why VMs cannot run here, if they cannot.
fn kvm_problem() -> Option<String> {
    if let Err(why) = vigil_kvm::kvm_available() {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        return Some(if root {
            why
        } else {
            format!("{why} (not running as root; /dev/kvm may need it)")
        });
    }
    None
}

fn run(options: &DemoOptions) -> Result<(), String> {
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find this executable to start the agents: {e}"))?;
    let kvm = if options.no_kvm {
        Some("--no-kvm was given".to_string())
    } else {
        kvm_problem()
    };
    if let Some(why) = &kvm {
        println!("VMs: off ({why}); showing the leader failover alone.\n");
    }
    let cluster_options = Options {
        name: "demo".into(),
        hosts: 3,
        vms: kvm.is_none().then_some(VmsConfig {
            capacity_memory_mib: 1024,
            capacity_vcpus: 8,
            abandon_after_ms: 10_000,
        }),
        timing_toml: String::new(),
        exe,
        io: "auto".into(),
        log_level: None,
        netns: None,
    };
    println!("starting 3 agents on 127.0.0.1 ...");
    let mut cluster = LocalCluster::start(cluster_options).map_err(|e| {
        if e.contains("[vms]") {
            format!("{e}\n(this build of the agent does not accept the [vms] config section: VM support is missing; `vigil demo --no-kvm` shows the leader failover)")
        } else {
            e
        }
    })?;
    cluster.keep = options.keep;
    let result = if kvm.is_none() {
        vm_demo(&mut cluster, options)
    } else {
        failover_demo(&mut cluster, options)
    };
    let result = if interrupted() {
        println!("\ninterrupted: stopping everything the demo started");
        Err("interrupted by SIGINT/SIGTERM".to_string())
    } else {
        if let Err(why) = &result {
            eprintln!(
                "\nvigil demo: {why}\nagent logs (last lines):\n{}",
                cluster.logs(12)
            );
        }
        result
    };
    let done = cluster.cleanup();
    println!(
        "\nstopped {} agent(s) (pids {:?}) and {} VMM(s) (pids {:?}); {}",
        done.agents.len(),
        done.agents,
        done.vmms.len(),
        done.vmms,
        match &done.removed {
            Some(dir) => format!("removed {}", dir.display()),
            None => format!("kept {}", cluster.root.display()),
        }
    );
    result
}

fn print_hosts(cluster: &LocalCluster, leader: u64, term: u64) {
    let rows: Vec<Vec<String>> = cluster
        .hosts
        .iter()
        .map(|h| {
            vec![
                h.id.to_string(),
                format!("127.0.0.1:{}", h.port),
                cluster
                    .agent_pid(h.id)
                    .map_or("-".into(), |p| p.to_string()),
                if h.id == leader {
                    format!("leader (term {term})")
                } else {
                    "follower".into()
                },
            ]
        })
        .collect();
    print!(
        "{}",
        table(&["host", "address", "agent pid", "role"], &rows)
    );
    println!("data: {}", cluster.root.display());
}

/// A text table: a header row, then rows, columns padded to their widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("  {}\n", padded.join("  ").trim_end())
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

fn vm_rows(views: &[VmView], dead: Option<u64>) -> Vec<Vec<String>> {
    views
        .iter()
        .map(|v| {
            vec![
                v.id.clone(),
                match v.host {
                    Some(h) if Some(h) == dead => format!("{h} (dead)"),
                    Some(h) => h.to_string(),
                    None => format!("- ({})", v.waiting.as_deref().unwrap_or("not placed")),
                },
                v.token.to_string(),
                v.local_state.clone().unwrap_or_else(|| "-".into()),
                v.counter.map_or("-".into(), |c| c.to_string()),
                v.pid.map_or("-".into(), |p| p.to_string()),
                v.snapshot_id.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect()
}

const VM_HEADERS: [&str; 7] = [
    "VM",
    "host",
    "token",
    "state",
    "counter",
    "VMM pid",
    "last snapshot",
];

/// Makes `want` the leader (step-down with a target) unless it already is.
fn move_leadership(
    cluster: &LocalCluster,
    from: u64,
    want: u64,
    limit: Duration,
) -> Result<(u64, u64), String> {
    if from != want {
        println!("moving leadership from host {from} to host {want} (POST /leadership/stepdown)");
        let body = serde_json::json!({ "to": want });
        let (status, v) = cluster.request(from, "POST", "/leadership/stepdown", Some(&body))?;
        if status != 200 {
            return Err(format!("step-down to host {want} answered {status}: {v}"));
        }
    }
    let all = cluster.ids();
    let start = Instant::now();
    loop {
        let (leader, term) = cluster.wait_leader(&all, limit)?;
        if leader == want {
            return Ok((leader, term));
        }
        if start.elapsed() > limit {
            return Err(format!(
                "leadership did not move to host {want} (leader is host {leader})"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn vm_demo(cluster: &mut LocalCluster, options: &DemoOptions) -> Result<(), String> {
    let limit = options.step_limit;
    let all = cluster.ids();
    let (leader, term) = cluster.wait_leader(&all, limit)?;
    vms::wait_hosts_alive(cluster, &all, limit)?;
    print_hosts(cluster, leader, term);

    let ids: Vec<String> = (1..=options.vms).map(|i| format!("vm{i}")).collect();
    println!(
        "\ncreating {} VM(s) of the built-in test guest (64 MiB, 1 vCPU, a snapshot every second) ...",
        ids.len()
    );
    let request_base = monotonic_ns();
    for (i, id) in ids.iter().enumerate() {
        vms::create(
            cluster,
            &vms::spec(id, 64, 1000, request_base + i as u64),
            limit,
        )?;
    }
    let mut views = Vec::new();
    for id in &ids {
        views.push(vms::wait_for(
            cluster,
            id,
            "running with a committed snapshot",
            limit,
            |v| v.running() && !v.snapshot_chain.is_empty(),
        )?);
    }
    println!();
    print!("{}", table(&VM_HEADERS, &vm_rows(&views, None)));

    // The victim: the host of a VM, which is also the leader unless --kill follower.
    let vm_hosts: Vec<u64> = views.iter().filter_map(|v| v.host).collect();
    let (leader, term) = cluster.wait_leader(&all, limit)?;
    let (victim, leader, term) = if options.kill_leader {
        let want = if vm_hosts.contains(&leader) {
            leader
        } else {
            *vm_hosts.first().ok_or("no VM is placed on any host")?
        };
        let (l, t) = move_leadership(cluster, leader, want, limit)?;
        (want, l, t)
    } else {
        match vm_hosts.iter().find(|&&h| h != leader) {
            Some(&h) => (h, leader, term),
            None => {
                let other = *all
                    .iter()
                    .find(|&&h| h != leader)
                    .ok_or("a single host cannot lose its leader")?;
                let (l, t) = move_leadership(cluster, leader, other, limit)?;
                (leader, l, t)
            }
        }
    };
    let followed = views
        .iter()
        .find(|v| v.host == Some(victim))
        .map(|v| v.id.clone())
        .ok_or_else(|| format!("no VM runs on host {victim}, the host picked to die"))?;
    let mut feed = EventFeed::subscribe(cluster, &all, limit)?;
    let before = vms::view(cluster, &followed)?.ok_or_else(|| format!("{followed} vanished"))?;
    let snapshot_counter =
        snapshot::counter_in_chain(&cluster.shared, &before.snapshot_chain, 0).ok();
    let vmm_pids = cluster.vmm_pids(victim);
    println!(
        "\nkilling host {victim}{}: SIGKILL to its agent (pid {}) and its {} VMM(s) (pids {vmm_pids:?})",
        if victim == leader { " (the leader)" } else { "" },
        cluster.agent_pid(victim).unwrap_or(0),
        vmm_pids.len(),
    );
    let kill = cluster.kill_host(victim)?;
    let failure = Failure {
        victim,
        vm: Some(followed.clone()),
        killed_ms: kill.at_ns as f64 / 1e6,
        leader_before: leader,
        term_before: term,
    };
    let old_reports =
        reports::read(&cluster.reports_path(victim, &followed)).map_err(|e| e.to_string())?;
    let last_old = old_reports.iter().rev().find(|r| r.vcpu == 0).copied();

    let mut timeline = Timeline::default();
    let start = Instant::now();
    while !timeline.complete(&failure) {
        for event in feed.next_batch(Duration::from_millis(20)) {
            timeline.observe(&event, &failure);
        }
        if let (Some(placed), None) = (&timeline.placed, &timeline.first_report) {
            let (host, token) = placed.what;
            let path = cluster.reports_path(host, &followed);
            let resumed = reports::read(&path).map_err(|e| e.to_string())?;
            if let Some(r) = resumed.iter().find(|r| r.token == token && r.vcpu == 0) {
                timeline.first_report = Some(Mark {
                    at_ms: r.at_ns as f64 / 1e6,
                    from: host,
                    what: (host, r.counter),
                });
            }
        }
        if interrupted() {
            return Err("interrupted (Ctrl-C)".into());
        }
        if start.elapsed() > limit {
            println!("\ntimeline so far:");
            for line in timeline.render(&failure, "killed") {
                println!("{line}");
            }
            return Err(format!(
                "{followed} was not running again within {limit:?} of the kill"
            ));
        }
    }
    println!("\ntimeline (ms after the kill; CLOCK_MONOTONIC, from the survivors' /events and the guest's report file):");
    let killed = format!("host {victim} killed (agent + {} VMM)", kill.vmm_pids.len());
    for line in timeline.render(&failure, &killed) {
        println!("{line}");
    }
    let t = crate::config::Timing::default();
    let wait_ms = t.lease_ms + t.lease_ms * t.clock_rate_bound_ppm / 1_000_000;
    println!(
        "(default timings: heartbeat {} ms, host lease L = {} ms. The leader declares a silent\n \
         host dead L(1 + eps) = {wait_ms} ms after its last acknowledgement; a new leader first\n \
         waits that long itself.)",
        t.heartbeat_ms, t.lease_ms
    );
    if let (Some(m), Some(last)) = (&timeline.first_report, last_old) {
        let resumed = m.what.1;
        let restored_from = timeline
            .started
            .as_ref()
            .and_then(|s| s.what.restored_from.clone());
        let shown = |c: Option<u64>| c.map_or("(unreadable)".to_string(), |c| c.to_string());
        let snapshot_text = match (&before.snapshot_id, restored_from) {
            (Some(seen), Some(used)) if *seen == used => format!(
                "the committed snapshot it was restored from ({used}) held {}",
                shown(snapshot_counter)
            ),
            (seen, used) => format!(
                "the last snapshot committed before the kill ({}) held {}; it was restored from {}",
                seen.as_deref().unwrap_or("-"),
                shown(snapshot_counter),
                used.as_deref().unwrap_or("none")
            ),
        };
        println!(
            "\n{followed}'s guest last reported {} on host {victim}, {:.1} ms before the kill; \
             {snapshot_text}; it resumed at {resumed} on host {}.",
            last.counter,
            failure.killed_ms - last.at_ns as f64 / 1e6,
            m.what.0,
        );
        if resumed <= last.counter {
            println!(
                "The {} rounds since that snapshot were lost with the host: a restore resumes from the last snapshot.",
                last.counter + 1 - resumed
            );
        }
    }
    // Let the guests run a moment, then show the cluster after the failure.
    std::thread::sleep(Duration::from_millis(500));
    let mut after = Vec::new();
    for id in &ids {
        after.push(
            vms::view(cluster, id)?.ok_or_else(|| format!("{id} vanished after the failover"))?,
        );
    }
    println!(
        "\nafter the failover (at {:.0} ms):",
        now_ms() - failure.killed_ms
    );
    print!("{}", table(&VM_HEADERS, &vm_rows(&after, Some(victim))));
    Ok(())
}

/// Without VMs: kill -9 the leader and show the re-election and the first write.
fn failover_demo(cluster: &mut LocalCluster, options: &DemoOptions) -> Result<(), String> {
    let limit = options.step_limit;
    let all = cluster.ids();
    let (leader, term) = cluster.wait_leader(&all, limit)?;
    print_hosts(cluster, leader, term);
    let mut feed = EventFeed::subscribe(cluster, &all, limit)?;
    println!(
        "\nkilling the leader, host {leader}: SIGKILL to its agent (pid {})",
        cluster.agent_pid(leader).unwrap_or(0)
    );
    let kill = cluster.kill_host(leader)?;
    let failure = Failure {
        victim: leader,
        vm: None,
        killed_ms: kill.at_ns as f64 / 1e6,
        leader_before: leader,
        term_before: term,
    };
    let survivors: Vec<u64> = all.iter().copied().filter(|&h| h != leader).collect();
    let mut timeline = Timeline::default();
    let mut written: Option<(f64, u64)> = None;
    let start = Instant::now();
    let body =
        serde_json::json!({"value": "written after the failover", "request_id": monotonic_ns()});
    let mut k = 0;
    while !timeline.complete(&failure) || written.is_none() {
        for event in feed.next_batch(Duration::from_millis(5)) {
            timeline.observe(&event, &failure);
        }
        if written.is_none() {
            let via = survivors[k % survivors.len()];
            k += 1;
            if let Ok((200, _)) = cluster.request(via, "PUT", "/kv/demo", Some(&body)) {
                written = Some((now_ms(), via));
            }
        }
        if interrupted() {
            return Err("interrupted (Ctrl-C)".into());
        }
        if start.elapsed() > limit {
            return Err(format!("no new leader within {limit:?} of the kill"));
        }
    }
    println!("\ntimeline (ms after the kill; CLOCK_MONOTONIC, from the survivors' /events):");
    for line in timeline.render(&failure, &format!("host {leader} (the leader) killed")) {
        println!("{line}");
    }
    if let Some((at, via)) = written {
        println!(
            "{:>9.1} ms  first write committed (PUT /kv/demo through host {via})",
            at - failure.killed_ms
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn parses_options_and_names_bad_ones() {
        let o = parse(args(&[])).unwrap().unwrap();
        assert_eq!(
            (o.vms, o.kill_leader, o.no_kvm, o.keep),
            (2, true, false, false)
        );
        let o = parse(args(&[
            "--vms",
            "3",
            "--kill",
            "follower",
            "--keep",
            "--timeout",
            "5",
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((o.vms, o.kill_leader, o.keep), (3, false, true));
        assert_eq!(o.step_limit, Duration::from_secs(5));
        assert!(parse(args(&["--help"])).unwrap().is_none());
        for (bad, needle) in [
            (&["--vms", "0"][..], "must be 1..=8"),
            (&["--vms", "x"][..], "--vms takes a number"),
            (&["--kill", "everyone"][..], "leader or follower"),
            (&["--timeout", "0"][..], "at least 1 second"),
            (&["--frobnicate"][..], "frobnicate"),
        ] {
            let e = parse(args(bad)).unwrap_err();
            assert!(e.contains(needle), "{bad:?}: {e}");
        }
    }

    #[test]
    fn tables_align_columns() {
        let t = table(
            &["VM", "host"],
            &[
                vec!["vm1".into(), "2".into()],
                vec!["vm22".into(), "3 (dead)".into()],
            ],
        );
        assert_eq!(t, "  VM    host\n  vm1   2\n  vm22  3 (dead)\n");
    }
}
