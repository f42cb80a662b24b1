//! The agent's config file: a small TOML document, read strictly.
//!
//! ```toml
//! node_id = 1
//! listen = "127.0.0.1:7001"
//! data_dir = "/var/lib/vigil"
//! shared_dir = "/srv/vigil-shared"
//! control_socket = "/run/vigil/vigil.sock"
//! key_file = "/etc/vigil/cluster.key"       # required: `vigil keygen PATH`, mode 0600
//! next_key_file = "/etc/vigil/cluster.key.next"  # optional: during a key rotation
//! control_group = "vigil-ops"  # optional: socket mode 0660, this group may connect
//!
//! [timing]               # optional; these are the defaults
//! heartbeat_ms = 20
//! election_min_ms = 100
//! election_max_ms = 200
//! lease_ms = 500
//! clock_rate_bound_ppm = 10000   # eps = 1 %
//! fence_margin_ms = 50
//!
//! [vms]                  # optional; absent: this host runs no VMs
//! capacity_memory_mib = 4096
//! capacity_vcpus = 8
//! vmm_binary = "/usr/bin/vigil"  # optional; default: the running executable
//! abandon_after_ms = 60000       # optional; a fenced VMM exits after this long
//!
//! [[peers]]              # every member, this node included
//! id = 1
//! address = "127.0.0.1:7001"
//! role = "voter"         # or "observer"
//! ```
//!
//! Unknown keys, missing keys and bad values are errors that name the file, the line and
//! the key. Addresses are `IP:port` only: the agent never resolves host names.

pub mod toml;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::limits::{MAX_OBSERVERS, MAX_VOTERS};
use toml::{Entry, Table, Value};

/// A member's identity in the cluster. Zero is reserved for "nobody".
pub type NodeId = u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Voter,
    Observer,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub id: NodeId,
    pub address: SocketAddr,
    pub role: Role,
}

/// Raft and lease timings (see ARCHITECTURE.md, "Time, leases and fencing").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// The host lease L.
    pub lease_ms: u64,
    /// The bound on how far two hosts' clock rates may differ (eps), in parts per million.
    pub clock_rate_bound_ppm: u64,
    /// Taken off a host's own lease so that it fences itself before the leader may act.
    pub fence_margin_ms: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            heartbeat_ms: 20,
            election_min_ms: 100,
            election_max_ms: 200,
            lease_ms: 500,
            clock_rate_bound_ppm: 10_000,
            fence_margin_ms: 50,
        }
    }
}

/// The `[vms]` section: this host runs VMs (with `vigil vmm` processes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmsConfig {
    /// What this host offers the cluster.
    pub capacity_memory_mib: u64,
    pub capacity_vcpus: u32,
    /// The executable started as `<vmm_binary> vmm ...` (None: the running executable).
    pub vmm_binary: Option<PathBuf>,
    /// A fenced VMM that hears nothing exits after this long.
    pub abandon_after_ms: u64,
}

/// Default of `[vms] abandon_after_ms`.
pub const DEFAULT_ABANDON_AFTER_MS: u64 = 60_000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub node_id: NodeId,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub shared_dir: PathBuf,
    pub control_socket: PathBuf,
    /// The cluster key (32 bytes, mode 0600): peers prove they hold it.
    pub key_file: PathBuf,
    /// A second accepted key, during a rotation (see the README).
    pub next_key_file: Option<PathBuf>,
    /// A group (name or numeric gid) whose members may use the control socket: the
    /// socket is then created 0660 with this group. Without it: 0600, root and the
    /// agent's own user only.
    pub control_group: Option<GroupSpec>,
    pub timing: Timing,
    /// Every member, this node included, in file order.
    pub peers: Vec<Peer>,
    /// `join = true`: this node joins a running cluster. It starts outside the
    /// membership (it never campaigns) and waits for the leader to add it
    /// (`POST /members`) and send it the log; the other peers are where to find the
    /// cluster until the replicated member addresses arrive.
    pub join: bool,
    /// `[vms]`: None when this host runs no VMs.
    pub vms: Option<VmsConfig>,
}

/// A group named in the config: a name (looked up in /etc/group at start) or a gid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupSpec {
    Name(String),
    Id(u32),
}

/// What was wrong with a config file, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line, when the error belongs to one.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file.display(), line, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Largest config file accepted; a real one is a few hundred bytes.
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

impl Config {
    /// Reads and checks the config file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let error = |message: String| ConfigError {
            file: path.to_path_buf(),
            line: None,
            message,
        };
        let metadata = std::fs::metadata(path).map_err(|e| error(format!("cannot read: {e}")))?;
        if metadata.len() > MAX_CONFIG_BYTES {
            return Err(error(format!(
                "{} bytes is larger than the {MAX_CONFIG_BYTES}-byte limit",
                metadata.len()
            )));
        }
        let bytes = std::fs::read(path).map_err(|e| error(format!("cannot read: {e}")))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            error(format!(
                "not UTF-8 (byte offset {})",
                e.utf8_error().valid_up_to()
            ))
        })?;
        Config::parse(&text, path)
    }

    /// Parses and checks config text; `file` is only used in error messages.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let document = toml::parse(text).map_err(|e| ConfigError {
            file: file.to_path_buf(),
            line: Some(e.line),
            message: format!("column {}: {}", e.column, e.message),
        })?;
        Reader { file }.config(&document.tables)
    }

    /// This node's own entry in `peers`.
    pub fn this_peer(&self) -> &Peer {
        self.peers
            .iter()
            .find(|p| p.id == self.node_id)
            .expect("validated: node_id is among the peers")
    }
}

/// Turns tables into a `Config`, naming file and line in every error.
struct Reader<'a> {
    file: &'a Path,
}

/// The keys of one table, each taken at most once, so that leftovers are unknown keys.
struct Keys<'t> {
    table: &'t Table,
    taken: Vec<bool>,
}

impl<'t> Keys<'t> {
    fn new(table: &'t Table) -> Self {
        Keys {
            table,
            taken: vec![false; table.entries.len()],
        }
    }

    fn take(&mut self, key: &str) -> Option<&'t Entry> {
        let index = self.table.entries.iter().position(|e| e.key == key)?;
        self.taken[index] = true;
        Some(&self.table.entries[index])
    }

    fn first_unknown(&self) -> Option<&'t Entry> {
        self.table
            .entries
            .iter()
            .zip(&self.taken)
            .find(|(_, taken)| !**taken)
            .map(|(entry, _)| entry)
    }
}

impl Reader<'_> {
    fn error(&self, line: usize, message: String) -> ConfigError {
        ConfigError {
            file: self.file.to_path_buf(),
            line: (line > 0).then_some(line),
            message,
        }
    }

    fn config(&self, tables: &[Table]) -> Result<Config, ConfigError> {
        let top = &tables[0];
        let mut keys = Keys::new(top);
        let node_id = self.required(&mut keys, "node_id", |r, e| r.node_id(e))?;
        let listen = self.required(&mut keys, "listen", |r, e| r.address(e))?;
        let data_dir = self.required(&mut keys, "data_dir", |r, e| r.path(e))?;
        let shared_dir = self.required(&mut keys, "shared_dir", |r, e| r.path(e))?;
        let control_socket = self.required(&mut keys, "control_socket", |r, e| r.path(e))?;
        let Some(key_entry) = keys.take("key_file") else {
            return Err(self.error(
                top.line,
                "top level: missing key 'key_file': peers authenticate with a shared cluster \
                 key; create one with `vigil keygen PATH`, copy it (mode 0600) to every \
                 member and set key_file = \"PATH\""
                    .into(),
            ));
        };
        let key_file = self.path(key_entry)?;
        let next_key_file = match keys.take("next_key_file") {
            Some(entry) => {
                let path = self.path(entry)?;
                if path == key_file {
                    return Err(self.error(
                        entry.line,
                        "next_key_file names the same file as key_file".into(),
                    ));
                }
                Some(path)
            }
            None => None,
        };
        let control_group = match keys.take("control_group") {
            Some(entry) => Some(self.group(entry)?),
            None => None,
        };
        let join = match keys.take("join") {
            Some(entry) => match &entry.value {
                Value::Boolean(b) => *b,
                other => {
                    return Err(self.error(
                        entry.line,
                        format!("key 'join': expected true or false, found {}", show(other)),
                    ))
                }
            },
            None => false,
        };
        self.reject_unknown(&keys, "top level")?;

        let mut timing = Timing::default();
        let mut peers = Vec::new();
        let mut timing_line = 0;
        let mut vms = None;
        for table in &tables[1..] {
            match (table.name.as_str(), table.is_array_element) {
                ("vms", false) => vms = Some(self.vms(table)?),
                ("timing", false) => {
                    timing = self.timing(table)?;
                    timing_line = table.line;
                }
                ("peers", true) => peers.push(self.peer(table)?),
                (name, true) => {
                    return Err(self.error(table.line, format!("unknown table [[{name}]]")))
                }
                (name, false) => {
                    return Err(self.error(table.line, format!("unknown table [{name}]")))
                }
            }
        }
        self.check_timing(&timing, timing_line)?;
        self.check_peers(&peers, node_id, listen)?;
        if join && peers.len() < 2 {
            return Err(self.error(
                0,
                "join = true needs at least one [[peers]] entry besides this node: a member \
                 of the running cluster to reach"
                    .into(),
            ));
        }
        Ok(Config {
            node_id,
            listen,
            data_dir,
            shared_dir,
            control_socket,
            key_file,
            next_key_file,
            control_group,
            timing,
            peers,
            join,
            vms,
        })
    }

    fn vms(&self, table: &Table) -> Result<VmsConfig, ConfigError> {
        let mut keys = Keys::new(table);
        let memory = self.required_in(&mut keys, "capacity_memory_mib", "[vms]", |r, e| {
            r.positive(e)
        })?;
        let max_mib = crate::limits::MAX_HOST_MEMORY_BYTES >> 20;
        if memory > max_mib {
            return Err(self.error(
                table.line,
                format!("[vms]: capacity_memory_mib {memory} is above the limit of {max_mib}"),
            ));
        }
        let vcpus = self.required_in(&mut keys, "capacity_vcpus", "[vms]", |r, e| r.positive(e))?;
        if vcpus > crate::limits::MAX_HOST_VCPUS as u64 {
            return Err(self.error(
                table.line,
                format!(
                    "[vms]: capacity_vcpus {vcpus} is above the limit of {}",
                    crate::limits::MAX_HOST_VCPUS
                ),
            ));
        }
        let vmm_binary = match keys.take("vmm_binary") {
            Some(entry) => Some(self.path(entry)?),
            None => None,
        };
        let abandon_after_ms = match keys.take("abandon_after_ms") {
            Some(entry) => self.positive(entry)?,
            None => DEFAULT_ABANDON_AFTER_MS,
        };
        self.reject_unknown(&keys, "[vms]")?;
        Ok(VmsConfig {
            capacity_memory_mib: memory,
            capacity_vcpus: vcpus as u32,
            vmm_binary,
            abandon_after_ms,
        })
    }

    fn timing(&self, table: &Table) -> Result<Timing, ConfigError> {
        let mut keys = Keys::new(table);
        let defaults = Timing::default();
        let mut ms = |key: &str, default: u64| -> Result<u64, ConfigError> {
            match keys.take(key) {
                Some(entry) => self.positive(entry),
                None => Ok(default),
            }
        };
        let timing = Timing {
            heartbeat_ms: ms("heartbeat_ms", defaults.heartbeat_ms)?,
            election_min_ms: ms("election_min_ms", defaults.election_min_ms)?,
            election_max_ms: ms("election_max_ms", defaults.election_max_ms)?,
            lease_ms: ms("lease_ms", defaults.lease_ms)?,
            clock_rate_bound_ppm: ms("clock_rate_bound_ppm", defaults.clock_rate_bound_ppm)?,
            fence_margin_ms: ms("fence_margin_ms", defaults.fence_margin_ms)?,
        };
        self.reject_unknown(&keys, "[timing]")?;
        Ok(timing)
    }

    fn check_timing(&self, t: &Timing, line: usize) -> Result<(), ConfigError> {
        let fail = |message: String| Err(self.error(line, format!("[timing]: {message}")));
        if t.heartbeat_ms * 2 > t.election_min_ms {
            return fail(format!(
                "heartbeat_ms ({}) must be at most half of election_min_ms ({})",
                t.heartbeat_ms, t.election_min_ms
            ));
        }
        if t.election_min_ms >= t.election_max_ms {
            return fail(format!(
                "election_min_ms ({}) must be below election_max_ms ({})",
                t.election_min_ms, t.election_max_ms
            ));
        }
        if t.lease_ms <= t.election_max_ms {
            return fail(format!(
                "lease_ms ({}) must be longer than election_max_ms ({})",
                t.lease_ms, t.election_max_ms
            ));
        }
        if t.clock_rate_bound_ppm >= 100_000 {
            return fail(format!(
                "clock_rate_bound_ppm ({}) must be below 100000 (10 %)",
                t.clock_rate_bound_ppm
            ));
        }
        // The host's own lease, L(1 - eps) - margin, must leave room for a heartbeat.
        let own_lease_ms = t.lease_ms - t.lease_ms * t.clock_rate_bound_ppm / 1_000_000;
        if t.fence_margin_ms + t.heartbeat_ms >= own_lease_ms {
            return fail(format!(
                "fence_margin_ms ({}) + heartbeat_ms ({}) leave no lease: L(1 - eps) is {} ms",
                t.fence_margin_ms, t.heartbeat_ms, own_lease_ms
            ));
        }
        Ok(())
    }

    fn peer(&self, table: &Table) -> Result<Peer, ConfigError> {
        let mut keys = Keys::new(table);
        let id = self.required_in(&mut keys, "id", "[[peers]]", |r, e| r.node_id(e))?;
        let address = self.required_in(&mut keys, "address", "[[peers]]", |r, e| r.address(e))?;
        let role = match keys.take("role") {
            None => Role::Voter,
            Some(entry) => match &entry.value {
                Value::String(s) if s == "voter" => Role::Voter,
                Value::String(s) if s == "observer" => Role::Observer,
                other => {
                    return Err(self.error(
                        entry.line,
                        format!(
                            "key 'role': expected \"voter\" or \"observer\", found {}",
                            show(other)
                        ),
                    ))
                }
            },
        };
        self.reject_unknown(&keys, "[[peers]]")?;
        Ok(Peer { id, address, role })
    }

    fn check_peers(
        &self,
        peers: &[Peer],
        node_id: NodeId,
        listen: SocketAddr,
    ) -> Result<(), ConfigError> {
        let error = |message: String| Err(self.error(0, message));
        if peers.is_empty() {
            return error("no [[peers]]: list every member, this node included".into());
        }
        for (i, peer) in peers.iter().enumerate() {
            if let Some(other) = peers[..i].iter().find(|p| p.id == peer.id) {
                return error(format!(
                    "[[peers]]: id {} listed twice ({} and {})",
                    peer.id, other.address, peer.address
                ));
            }
            if let Some(other) = peers[..i].iter().find(|p| p.address == peer.address) {
                return error(format!(
                    "[[peers]]: address {} used by both {} and {}",
                    peer.address, other.id, peer.id
                ));
            }
        }
        let Some(this) = peers.iter().find(|p| p.id == node_id) else {
            return error(format!("node_id {node_id} is not among the [[peers]]"));
        };
        if this.address.port() != listen.port() {
            return error(format!(
                "this node's [[peers]] address {} and listen {} disagree on the port",
                this.address, listen
            ));
        }
        let voters = peers.iter().filter(|p| p.role == Role::Voter).count();
        let observers = peers.len() - voters;
        if voters == 0 || voters > MAX_VOTERS {
            return error(format!("{voters} voters: a cluster has 1 to {MAX_VOTERS}"));
        }
        if observers > MAX_OBSERVERS {
            return error(format!("{observers} observers: at most {MAX_OBSERVERS}"));
        }
        Ok(())
    }

    fn required<T>(
        &self,
        keys: &mut Keys<'_>,
        key: &str,
        read: impl Fn(&Self, &Entry) -> Result<T, ConfigError>,
    ) -> Result<T, ConfigError> {
        self.required_in(keys, key, "top level", read)
    }

    fn required_in<T>(
        &self,
        keys: &mut Keys<'_>,
        key: &str,
        place: &str,
        read: impl Fn(&Self, &Entry) -> Result<T, ConfigError>,
    ) -> Result<T, ConfigError> {
        match keys.take(key) {
            Some(entry) => read(self, entry),
            None => Err(self.error(keys.table.line, format!("{place}: missing key '{key}'"))),
        }
    }

    fn reject_unknown(&self, keys: &Keys<'_>, place: &str) -> Result<(), ConfigError> {
        match keys.first_unknown() {
            Some(entry) => {
                Err(self.error(entry.line, format!("{place}: unknown key '{}'", entry.key)))
            }
            None => Ok(()),
        }
    }

    fn node_id(&self, entry: &Entry) -> Result<NodeId, ConfigError> {
        self.positive(entry)
    }

    fn positive(&self, entry: &Entry) -> Result<u64, ConfigError> {
        match entry.value {
            Value::Integer(n) if n > 0 => Ok(n as u64),
            ref other => Err(self.error(
                entry.line,
                format!(
                    "key '{}': expected a positive integer, found {}",
                    entry.key,
                    show(other)
                ),
            )),
        }
    }

    fn address(&self, entry: &Entry) -> Result<SocketAddr, ConfigError> {
        match &entry.value {
            Value::String(s) => s.parse::<SocketAddr>().map_err(|_| {
                self.error(
                    entry.line,
                    format!(
                        "key '{}': \"{s}\" is not an IP:port address (host names are not resolved)",
                        entry.key
                    ),
                )
            }),
            other => Err(self.error(
                entry.line,
                format!(
                    "key '{}': expected an \"IP:port\" string, found {}",
                    entry.key,
                    show(other)
                ),
            )),
        }
    }

    fn group(&self, entry: &Entry) -> Result<GroupSpec, ConfigError> {
        match &entry.value {
            Value::Integer(n) if (0..=u32::MAX as i64).contains(n) => Ok(GroupSpec::Id(*n as u32)),
            Value::String(s)
                if !s.is_empty()
                    && s.len() <= 32
                    && s.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b)) =>
            {
                Ok(GroupSpec::Name(s.clone()))
            }
            other => Err(self.error(
                entry.line,
                format!(
                    "key '{}': expected a group name or a numeric gid, found {}",
                    entry.key,
                    show(other)
                ),
            )),
        }
    }

    fn path(&self, entry: &Entry) -> Result<PathBuf, ConfigError> {
        match &entry.value {
            Value::String(s) if !s.is_empty() => Ok(PathBuf::from(s)),
            other => Err(self.error(
                entry.line,
                format!(
                    "key '{}': expected a non-empty path string, found {}",
                    entry.key,
                    show(other)
                ),
            )),
        }
    }
}

/// A value as a person would recognise it in an error message.
fn show(value: &Value) -> String {
    match value {
        Value::String(s) => format!("\"{s}\""),
        Value::Integer(n) => n.to_string(),
        Value::Boolean(b) => b.to_string(),
        Value::Array(_) => "an array".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
node_id = 2
listen = "127.0.0.1:7002"
data_dir = "/tmp/v2"
shared_dir = "/tmp/shared"
control_socket = "/tmp/v2/vigil.sock"
key_file = "/etc/vigil/cluster.key"

[timing]
heartbeat_ms = 25

[[peers]]
id = 1
address = "127.0.0.1:7001"
[[peers]]
id = 2
address = "127.0.0.1:7002"
[[peers]]
id = 3
address = "[::1]:7003"
[[peers]]
id = 9
address = "127.0.0.1:7009"
role = "observer"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("vigil.toml"))
    }

    #[test]
    fn join_mode() {
        assert!(!parse(GOOD).unwrap().join);
        let config = parse(&GOOD.replace("key_file", "join = true\nkey_file")).unwrap();
        assert!(config.join);
        let error = parse(&GOOD.replace("key_file", "join = 1\nkey_file")).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("key 'join': expected true or false"),
            "{error}"
        );
        // A joining node must name a member of the running cluster.
        let alone = "node_id = 2\nlisten = \"127.0.0.1:7002\"\ndata_dir = \"/tmp/v2\"\n\
                     shared_dir = \"/tmp/s\"\ncontrol_socket = \"/tmp/v2/s\"\n\
                     key_file = \"/k\"\njoin = true\n[[peers]]\nid = 2\n\
                     address = \"127.0.0.1:7002\"\n";
        let error = parse(alone).unwrap_err();
        assert!(error.to_string().contains("join = true needs"), "{error}");
    }

    #[test]
    fn reads_a_full_config() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.node_id, 2);
        assert_eq!(config.listen, "127.0.0.1:7002".parse().unwrap());
        assert_eq!(config.timing.heartbeat_ms, 25);
        assert_eq!(config.timing.election_min_ms, 100);
        assert_eq!(config.peers.len(), 4);
        assert_eq!(config.peers[3].role, Role::Observer);
        assert_eq!(config.peers[2].address, "[::1]:7003".parse().unwrap());
        assert_eq!(config.this_peer().id, 2);
    }

    fn expect_error(text: &str, line: Option<usize>, needle: &str) {
        let error = parse(text).expect_err(needle);
        assert_eq!(error.line, line, "{error}");
        let shown = error.to_string();
        assert!(shown.contains(needle), "'{shown}' lacks '{needle}'");
        assert!(shown.starts_with("vigil.toml"), "{shown}");
    }

    #[test]
    fn names_key_and_line_of_bad_input() {
        expect_error(
            &GOOD.replace("heartbeat_ms = 25", "heartbeat_msec = 25"),
            Some(10),
            "unknown key 'heartbeat_msec'",
        );
        expect_error(
            &GOOD.replace("node_id = 2", "node_id = \"two\""),
            Some(2),
            "key 'node_id': expected a positive integer, found \"two\"",
        );
        expect_error(
            &GOOD.replace("node_id = 2", "node_id = 0"),
            Some(2),
            "positive integer, found 0",
        );
        expect_error(
            &GOOD.replace("\"127.0.0.1:7001\"", "\"host1:7001\""),
            Some(14),
            "not an IP:port",
        );
        expect_error(
            &GOOD.replace("role = \"observer\"", "role = \"boss\""),
            Some(24),
            "key 'role'",
        );
        expect_error(
            &GOOD.replace("[timing]", "[timings]"),
            Some(9),
            "unknown table [timings]",
        );
        expect_error(
            &GOOD.replace("data_dir = \"/tmp/v2\"\n", ""),
            None,
            "missing key 'data_dir'",
        );
        expect_error(
            &GOOD.replace("heartbeat_ms = 25", "heartbeat_ms = 25.0"),
            Some(10),
            "floating-point",
        );
        expect_error(
            &GOOD.replace("control_socket", "extra = true\ncontrol_socket"),
            Some(6),
            "unknown key 'extra'",
        );
    }

    #[test]
    fn checks_how_values_relate() {
        expect_error(
            &GOOD.replace("node_id = 2", "node_id = 5"),
            None,
            "node_id 5 is not among",
        );
        expect_error(&GOOD.replace("id = 3", "id = 1"), None, "id 1 listed twice");
        expect_error(
            &GOOD.replace("heartbeat_ms = 25", "heartbeat_ms = 60"),
            Some(9),
            "at most half",
        );
        expect_error(
            &GOOD.replace("heartbeat_ms = 25", "election_max_ms = 90"),
            Some(9),
            "below election_max_ms",
        );
        expect_error(
            &GOOD.replace("heartbeat_ms = 25", "lease_ms = 150"),
            Some(9),
            "longer than election_max_ms",
        );
        expect_error(
            &GOOD.replace("listen = \"127.0.0.1:7002\"", "listen = \"127.0.0.1:7999\""),
            None,
            "disagree on the port",
        );
        let mut many = GOOD.to_string();
        for id in 10..16 {
            many.push_str(&format!(
                "[[peers]]\nid = {id}\naddress = \"127.0.0.1:{}\"\n",
                7000 + id
            ));
        }
        expect_error(&many, None, "9 voters");
    }

    #[test]
    fn reads_the_vms_section() {
        assert_eq!(
            parse(GOOD).unwrap().vms,
            None,
            "absent: no VMs on this host"
        );
        let text = GOOD.replace(
            "[[peers]]\nid = 1",
            "[vms]\ncapacity_memory_mib = 2048\ncapacity_vcpus = 4\n\n[[peers]]\nid = 1",
        );
        let vms = parse(&text).unwrap().vms.unwrap();
        assert_eq!(
            vms,
            VmsConfig {
                capacity_memory_mib: 2048,
                capacity_vcpus: 4,
                vmm_binary: None,
                abandon_after_ms: DEFAULT_ABANDON_AFTER_MS,
            }
        );
        let text = text.replace(
            "capacity_vcpus = 4",
            "capacity_vcpus = 4\nvmm_binary = \"/bin/vigil\"\nabandon_after_ms = 500",
        );
        let vms = parse(&text).unwrap().vms.unwrap();
        assert_eq!(vms.vmm_binary, Some(PathBuf::from("/bin/vigil")));
        assert_eq!(vms.abandon_after_ms, 500);
        let missing = GOOD.replace(
            "[[peers]]\nid = 1",
            "[vms]\ncapacity_vcpus = 4\n[[peers]]\nid = 1",
        );
        let has = |text: &str, needle: &str| {
            let shown = parse(text).expect_err(needle).to_string();
            assert!(shown.contains(needle), "'{shown}' lacks '{needle}'");
        };
        has(&missing, "[vms]: missing key 'capacity_memory_mib'");
        let unknown = GOOD.replace(
            "[[peers]]\nid = 1",
            "[vms]\ncapacity_memory_mib = 64\ncapacity_vcpus = 1\ncpus = 2\n[[peers]]\nid = 1",
        );
        has(&unknown, "[vms]: unknown key 'cpus'");
        let bad = GOOD.replace(
            "[[peers]]\nid = 1",
            "[vms]\ncapacity_memory_mib = \"lots\"\ncapacity_vcpus = 1\n[[peers]]\nid = 1",
        );
        has(
            &bad,
            "key 'capacity_memory_mib': expected a positive integer",
        );
    }

    #[test]
    fn key_and_group_settings() {
        expect_error(
            &GOOD.replace("key_file = \"/etc/vigil/cluster.key\"\n", ""),
            None,
            "missing key 'key_file'",
        );
        expect_error(
            &GOOD.replace(
                "key_file = \"/etc/vigil/cluster.key\"",
                "key_file = \"/k\"\nnext_key_file = \"/k\"",
            ),
            Some(8),
            "same file as key_file",
        );
        expect_error(
            &GOOD.replace("key_file", "control_group = \"a b\"\nkey_file"),
            Some(7),
            "group name or a numeric gid",
        );
        let config = parse(&GOOD.replace(
            "key_file",
            "control_group = 1234\nnext_key_file = \"/n\"\nkey_file",
        ))
        .unwrap();
        assert_eq!(config.control_group, Some(GroupSpec::Id(1234)));
        assert_eq!(config.next_key_file, Some(PathBuf::from("/n")));
        assert_eq!(config.key_file, PathBuf::from("/etc/vigil/cluster.key"));
        let config = parse(&GOOD.replace("key_file", "control_group = \"ops\"\nkey_file")).unwrap();
        assert_eq!(config.control_group, Some(GroupSpec::Name("ops".into())));
    }
}
