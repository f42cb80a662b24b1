//! `vigil sim` as a command: reproducible trace hashes, JSON lines, and a failing seed
//! reported with its schedule and a non-zero exit status.

use std::process::Command;

fn vigil(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(args)
        .output()
        .expect("run vigil");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).expect("utf-8 output"),
    )
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = &line[start..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Some(rest[..end].trim_matches('"'))
}

#[test]
fn one_seed_prints_the_same_trace_hash_every_time() {
    let (code, a) = vigil(&["sim", "--seed", "42"]);
    assert_eq!(code, 0, "{a}");
    let (_, b) = vigil(&["sim", "--seed", "42"]);
    assert_eq!(a.lines().count(), 1);
    assert!(a.starts_with('{') && a.trim_end().ends_with('}'));
    assert_eq!(field(&a, "trace_hash"), field(&b, "trace_hash"));
    assert_eq!(field(&a, "ok"), Some("true"));
    let (_, c) = vigil(&["sim", "--seed", "43"]);
    assert_ne!(field(&a, "trace_hash"), field(&c, "trace_hash"));
}

#[test]
fn many_seeds_report_rates_as_json() {
    let (code, out) = vigil(&["sim", "--seeds", "20", "--start", "500"]);
    assert_eq!(code, 0, "{out}");
    let last = out.lines().last().unwrap();
    assert_eq!(field(last, "seeds"), Some("20"));
    assert_eq!(field(last, "failed"), Some("0"));
    assert!(field(last, "seeds_per_s").unwrap().parse::<f64>().unwrap() > 0.0);
    assert!(
        field(last, "sim_s_per_wall_s")
            .unwrap()
            .parse::<f64>()
            .unwrap()
            > 0.0
    );
}

#[test]
fn a_failing_seed_names_itself_its_schedule_and_the_violation() {
    let (code, out) = vigil(&["sim", "--seeds", "300", "--bug", "vote-twice"]);
    assert_eq!(code, 1, "the planted bug must fail some seed");
    let first = out.lines().next().unwrap();
    assert_eq!(field(first, "ok"), Some("false"));
    assert!(first.contains("\"schedule\":["), "{first}");
    let seed = field(first, "seed").unwrap().to_string();
    let violation = field(first, "violation").unwrap().to_string();
    // The same seed alone fails the same way.
    let (code, again) = vigil(&["sim", "--seed", &seed, "--bug", "vote-twice"]);
    assert_eq!(code, 1);
    assert_eq!(field(&again, "violation"), Some(violation.as_str()));
    assert_eq!(field(&again, "trace_hash"), field(first, "trace_hash"));
}

#[test]
fn bad_arguments_are_refused_clearly() {
    let out = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(["sim", "--bug", "nonsense"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown bug 'nonsense'"), "{err}");
}

#[test]
fn vm_mode_reports_seeds_and_resurrection_times_and_fails_a_planted_bug() {
    let (code, a) = vigil(&["sim", "--vms", "--seed", "7"]);
    assert_eq!(code, 0, "{a}");
    let (_, b) = vigil(&["sim", "--vms", "--seed", "7"]);
    assert_eq!(field(&a, "trace_hash"), field(&b, "trace_hash"));
    let (code, out) = vigil(&["sim", "--vms", "--seeds", "30"]);
    assert_eq!(code, 0, "{out}");
    let cases: Vec<&str> = out
        .lines()
        .filter(|l| field(l, "bench") == Some("sim-vms"))
        .filter_map(|l| field(l, "case"))
        .collect();
    assert!(cases.contains(&"declared-dead-to-running"), "{out}");
    assert!(cases.contains(&"stopped-running-to-running"), "{out}");
    // A planted bug: the failing seed is printed with its schedule and the violation.
    let (code, out) = vigil(&[
        "sim",
        "--vms",
        "--seeds",
        "300",
        "--bug",
        "renew-without-lease",
    ]);
    assert_eq!(code, 1, "{out}");
    let failing = out
        .lines()
        .find(|l| field(l, "ok") == Some("false"))
        .unwrap();
    assert!(failing.contains("\"schedule\":["), "{failing}");
    assert!(failing.contains("split brain"), "{failing}");
    // The VM bugs need VM mode.
    let (code, _) = vigil(&["sim", "--bug", "renew-without-lease"]);
    assert_eq!(code, 2);
}
