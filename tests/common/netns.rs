//! The network namespaces of a partition test, shared by both test harnesses: a bridge
//! in namespace `hub`, and one namespace per node joined to it by a veth, node `i`
//! (1-based) at 10.200.0.i/24.

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
