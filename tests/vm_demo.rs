//! `vigil demo`, the README's first command, run as a person would: it must show every
//! step of the failover, exit 0, and leave no process and no temp dir behind. With VMs
//! it needs root and /dev/kvm (skipped with the reason otherwise); `--no-kvm` runs
//! anywhere.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const PATIENCE: Duration = Duration::from_secs(120);

/// The demo process; on drop (a failed test) it gets SIGTERM, which makes it stop
/// everything it started, then SIGKILL if it is still there.
struct Demo(Option<Child>);

impl Demo {
    fn run(args: &[&str]) -> Output {
        let child = Command::new(env!("CARGO_BIN_EXE_vigil"))
            .arg("demo")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vigil demo");
        let mut demo = Demo(Some(child));
        let start = Instant::now();
        loop {
            let child = demo.0.as_mut().unwrap();
            if child.try_wait().unwrap().is_some() {
                break;
            }
            assert!(
                start.elapsed() < PATIENCE,
                "vigil demo ran over {PATIENCE:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        demo.0.take().unwrap().wait_with_output().unwrap()
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            // SAFETY: kill(2) on our own child, not yet waited for.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let start = Instant::now();
            while child.try_wait().ok().flatten().is_none() && start.elapsed() < PATIENCE {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The temp dir the demo says it removed; it must be gone, and no process may name it.
fn check_cleaned_up(stdout: &str) {
    let removed = stdout
        .lines()
        .find_map(|l| l.split("removed ").nth(1))
        .unwrap_or_else(|| panic!("the demo did not say it removed its dir:\n{stdout}"));
    let dir = PathBuf::from(removed.trim());
    assert!(!dir.exists(), "{} is still there", dir.display());
    let left = vigil::demo::procs::pids_mentioning(&dir.join(""));
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

#[test]
fn demo_without_kvm_shows_the_leader_failover() {
    let out = Demo::run(&["--no-kvm"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for needle in [
        "VMs: off (--no-kvm was given)",
        "(the leader) killed",
        "leader elected: host",
        "first write committed",
        "stopped 2 agent(s)",
    ] {
        assert!(stdout.contains(needle), "no {needle:?} in:\n{stdout}");
    }
    assert!(!stdout.contains("not seen"), "{stdout}");
    check_cleaned_up(&stdout);
}

#[test]
fn demo_with_vms_shows_every_step_of_the_resurrection() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: not root");
        return;
    }
    if let Err(why) = vigil_kvm::kvm_available() {
        eprintln!("skipped: {why}");
        return;
    }
    let out = Demo::run(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for needle in [
        "(the leader): SIGKILL to its agent",
        "leader elected: host",
        "declared dead",
        "placed on host",
        "restored on host",
        "guest counter running again on host",
        "after the failover",
    ] {
        assert!(stdout.contains(needle), "no {needle:?} in:\n{stdout}");
    }
    assert!(!stdout.contains("not seen"), "{stdout}");
    check_cleaned_up(&stdout);
}
