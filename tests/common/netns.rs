//! The network namespaces of a partition test, shared by both test harnesses: a bridge
//! in namespace `hub`, and one namespace per node joined to it by a veth, node `i`
//! (1-based) at 10.200.0.i/24.

/// Whether `ip` and `nft` are installed and a network namespace can be created (the
/// caller checks for root first).
pub fn probe() -> Result<(), String> {
    use std::process::Command;
    use std::sync::atomic::{AtomicU64, Ordering};
    for tool in ["ip", "nft"] {
        if Command::new(tool).arg("-V").output().is_err() {
            return Err(format!("{tool} is not installed"));
        }
    }
    // Unique per call: tests in one process probe concurrently, and a shared name made
    // one probe fail with "File exists" and skip its test.
    static PROBE: AtomicU64 = AtomicU64::new(0);
    let name = format!(
        "vglprobe{}x{}",
        std::process::id(),
        PROBE.fetch_add(1, Ordering::Relaxed)
    );
    let ok = Command::new("ip")
        .args(["netns", "add", &name])
        .status()
        .is_ok_and(|s| s.success());
    let _ = Command::new("ip").args(["netns", "del", &name]).status();
    if !ok {
        return Err("cannot create network namespaces".into());
    }
    Ok(())
}

/// Creates `hub` and the `nodes` (in id order); `run` runs one command and fails the
/// test if it fails.
pub fn build_bridged(hub: &str, nodes: &[String], run: &dyn Fn(&[&str])) {
    run(&["ip", "netns", "add", hub]);
    run(&["ip", "-n", hub, "link", "add", "br0", "type", "bridge"]);
    run(&["ip", "-n", hub, "link", "set", "br0", "up"]);
    for (k, node) in nodes.iter().enumerate() {
        let i = k + 1;
        let veth = format!("v{i}");
        run(&["ip", "netns", "add", node]);
        run(&[
            "ip", "-n", hub, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns",
            node,
        ]);
        run(&["ip", "-n", hub, "link", "set", &veth, "master", "br0", "up"]);
        run(&[
            "ip",
            "-n",
            node,
            "addr",
            "add",
            &format!("10.200.0.{i}/24"),
            "dev",
            "eth0",
        ]);
        run(&["ip", "-n", node, "link", "set", "eth0", "up"]);
        run(&["ip", "-n", node, "link", "set", "lo", "up"]);
    }
}
