//! VM mode (`vigil sim --vms`): every simulated node is also a host. Its Raft node
//! applies committed entries to a `ClusterState`; the leader runs the
//! `FailureDetector` on Raft's acknowledgement times and proposes host verdicts and
//! `placement::plan`; every host runs `reconcile` against fake VMMs and carries out the
//! actions.
//!
//! A fake VMM has a token, a watchdog deadline on its host's (drifting) clock and a
//! paused flag. It "runs" at a true instant while it is not paused, its host machine is
//! powered, and its host's clock has not passed the deadline. VMMs outlive an agent
//! crash and a freeze (SIGSTOP); a power loss kills them.
//!
//! Invariants checked here: no VM runs on two hosts at one true instant (checked after
//! every event: a VMM only starts running at an event, so any overlap shows at the
//! later start); per host, each VM's fencing token never goes down as the host applies
//! entries; and VM liveness: after the last fault heals, once one leader has led without
//! interruption for [`vm_recovery_bound`], no VM that should run runs nowhere for that
//! long (checked at every event), and at the end every VM that should run runs on the
//! host the committed state places it on, unless it is inside such a recovery window.
//!
//! Why the leader matters: links stay lossy after the heal, so CheckQuorum can depose a
//! leader and elections can fail for seconds (a 3-of-4 quorum with one voter gone needs
//! every vote); without a leader no host lease is renewed and every VM fences, by
//! design. The property is "once a quorum exists, a VM runs again within a bound", so
//! the clock starts when the current leader took over. (Seeds 8128 and 18535 ended inside
//! such an election and failed the older check, "runs at the last instant"; seed 10177
//! had no leader for 3 s after the heal.)

use super::{Ev, World, MS};
use crate::agent::leader::{LeaderDuties, RaftView};
use crate::agent::lease::{own_lease_expiry, LeaseRules};
use crate::agent::reconcile::{self, snapshot_record, Action, LocalVmm};
use crate::cluster::command::{Command, RequestId, Resources, VmSpec};
use crate::cluster::state::ClusterState;
use crate::config::Timing;
use crate::raft::{Nanos, Term};
use std::collections::BTreeMap;
use vigil_kvm::control::VmmState;

/// Planted bugs of the VM layer (the agent and leader logic around the shared code).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmBugs {
    /// A new leader does not wait L(1 + eps) after its election before declaring hosts
    /// dead.
    pub skip_new_leader_lease_wait: bool,
    /// Hosts renew their VMMs' watchdogs whether or not their own lease is valid.
    pub renew_without_lease: bool,
    /// A follower's lease runs from any message of the leader (`last_leader_contact`),
    /// even one it rejected, and whatever its applied state.
    pub lease_from_any_contact: bool,
    /// Hosts never start a VM that ran before (anywhere): a VM of a dead host is placed
    /// again but never restored. The liveness check must catch it.
    pub no_resurrection: bool,
}

impl VmBugs {
    pub fn any(&self) -> bool {
        self.skip_new_leader_lease_wait
            || self.renew_without_lease
            || self.lease_from_any_contact
            || self.no_resurrection
    }
}

/// A fake VMM process.
#[derive(Clone, Debug)]
pub(super) struct FakeVmm {
    pub(super) local: LocalVmm,
    /// Watchdog deadline on the host's clock.
    pub(super) deadline: Nanos,
    pub(super) paused: bool,
}

/// The agent-side state of one host (the VMMs live here too: they survive the agent).
pub(super) struct HostSim {
    pub(super) vmms: Vec<FakeVmm>,
    /// True time until which the whole agent (Raft included) is stopped.
    pub(super) frozen_until: Nanos,
    /// The leader's duties: the agent's own component (`agent::leader`).
    duties: LeaderDuties,
    /// Per VM, the highest token this host's applied state showed (reset on restart).
    tokens: BTreeMap<String, u64>,
}

impl HostSim {
    fn new(rules: LeaseRules, bugs: VmBugs) -> HostSim {
        // The phi floor: about one duty tick, as the agent sets it.
        let mut duties = LeaderDuties::new(rules, 10 * MS);
        duties.bug_skip_new_leader_lease_wait = bugs.skip_new_leader_lease_wait;
        HostSim {
            vmms: Vec::new(),
            frozen_until: 0,
            duties,
            tokens: BTreeMap::new(),
        }
    }
}

/// The VM layer of the world.
pub(super) struct VmWorld {
    pub(super) hosts: Vec<HostSim>,
    pub(super) rules: LeaseRules,
    pub(super) bugs: VmBugs,
    /// Workload events: (at, what).
    pub(super) workload: Vec<(Nanos, Workload)>,
    next_snapshot_id: u64,
    /// Per VM: how many hosts run it right now (scratch).
    running: BTreeMap<String, usize>,
    /// Per VM: the true time since which it runs nowhere (None: running or never ran).
    down_since: BTreeMap<String, Nanos>,
    /// Per VM: when a `HostDead` for its host was first applied anywhere (true time).
    declared_dead_at: BTreeMap<String, Nanos>,
    dead_seen: BTreeMap<u64, ()>,
    /// Per VM: (applied index, token) of the most advanced view any host had.
    latest_view: BTreeMap<String, (u64, u64)>,
    /// VMs that ran at some point.
    ran: BTreeMap<String, ()>,
    /// Per VM: the true time since which it runs nowhere, also before it first ran
    /// (None: running now). For the liveness check.
    idle_since: BTreeMap<String, Nanos>,
    /// True time of the last fault's heal (None: not yet, or a run without faults).
    pub(super) healed_at: Option<Nanos>,
    /// The node leading now (leader of the highest term, not frozen) with its term, and
    /// the true time since which it has led without interruption.
    stable_leader: (Option<(usize, Term)>, Nanos),
    /// Outage figures: (declared dead -> running again), (stopped running -> running
    /// again), in nanoseconds of true time.
    pub(super) after_declared_dead: Vec<Nanos>,
    pub(super) outages: Vec<Nanos>,
    pub(super) vms_created: usize,
}

#[derive(Clone, Debug)]
pub enum Workload {
    CreateVm(String),
    Drain(u64),
    Migrate(String),
}

const HOST_TICK: Nanos = 10 * MS;
const VM_MEMORY: u64 = 256 << 20;

fn capacity() -> Resources {
    Resources {
        memory_bytes: 8 * VM_MEMORY,
        vcpus: 16,
    }
}

fn spec() -> VmSpec {
    VmSpec {
        resources: Resources {
            memory_bytes: VM_MEMORY,
            vcpus: 1,
        },
        touch_percent: 10,
        snapshot_interval_ms: 300,
        full_every: 4,
        anti_affinity: None,
    }
}

impl VmWorld {
    pub(super) fn new(
        total: usize,
        bugs: VmBugs,
        rng: &mut crate::raft::rng::Rng,
        fault_time: Nanos,
    ) -> VmWorld {
        let rules = LeaseRules::new(&Timing::default());
        let mut workload = Vec::new();
        let vms = 2 + rng.below(4) as usize;
        for i in 0..vms {
            let at = 50 * MS + rng.below(fault_time / 2);
            workload.push((at, Workload::CreateVm(format!("vm{i}"))));
        }
        if rng.chance(0.3) {
            let at = 200 * MS + rng.below(fault_time);
            workload.push((at, Workload::Drain(1 + rng.below(total as u64))));
        }
        for _ in 0..rng.below(3) {
            let at = 200 * MS + rng.below(fault_time);
            workload.push((
                at,
                Workload::Migrate(format!("vm{}", rng.below(vms as u64))),
            ));
        }
        workload.sort_by_key(|(t, _)| *t);
        VmWorld {
            hosts: (0..total).map(|_| HostSim::new(rules, bugs)).collect(),
            rules,
            bugs,
            workload,
            next_snapshot_id: 1,
            running: BTreeMap::new(),
            down_since: BTreeMap::new(),
            declared_dead_at: BTreeMap::new(),
            dead_seen: BTreeMap::new(),
            ran: BTreeMap::new(),
            idle_since: BTreeMap::new(),
            healed_at: None,
            stable_leader: (None, 0),
            latest_view: BTreeMap::new(),
            after_declared_dead: Vec::new(),
            outages: Vec::new(),
            vms_created: vms,
        }
    }
}

/// How long a VM may run nowhere while one leader leads, after the last heal: the new
/// leader's L(1 + eps) + ET(1 + eps) wait before it may declare its host dead (the host's own L(1 + eps)
/// since its last acknowledgement runs concurrently), then the verdict, the placement
/// and the start, a few heartbeats and host ticks; one second of slack for lossy links.
pub(super) fn vm_recovery_bound(rules: &LeaseRules) -> Nanos {
    rules.new_leader_wait_ns + 1_000 * MS
}

impl VmWorld {
    /// How long a VM idle since `idle` has been down, at `now`, counting only the time
    /// after the last heal during which the current leader has led (None: no leader
    /// now, or not healed yet).
    fn down_while_led(&self, idle: Nanos, now: Nanos) -> Option<Nanos> {
        let healed = self.healed_at?;
        let (leader, since) = self.stable_leader;
        leader?;
        Some(now.saturating_sub(idle.max(healed).max(since)))
    }
}

impl World {
    pub(super) fn vm_schedule(&mut self) {
        let times: Vec<Nanos> = match &self.vm {
            Some(vm) => vm.workload.iter().map(|(t, _)| *t).collect(),
            None => return,
        };
        for (i, t) in times.into_iter().enumerate() {
            self.push(t, Ev::Workload(i));
        }
        for n in 0..self.nodes.len() {
            let t = self.rng.below(HOST_TICK);
            self.push(t, Ev::HostTick(n));
        }
    }

    pub(super) fn frozen(&self, n: usize) -> Option<Nanos> {
        let vm = self.vm.as_ref()?;
        let until = vm.hosts[n].frozen_until;
        (until > self.now).then_some(until)
    }

    /// Whether a fake VMM runs at the current true instant.
    fn vmm_runs(&self, n: usize, v: &FakeVmm) -> bool {
        !v.paused && self.local(n, self.now) < v.deadline
    }

    /// The agent crashed (`power_loss`: the machine too, which kills its VMMs).
    pub(super) fn host_crashed(&mut self, n: usize, power_loss: bool) {
        let Some(vm) = self.vm.as_mut() else {
            return;
        };
        let h = &mut vm.hosts[n];
        h.duties.reset();
        h.tokens.clear();
        if power_loss {
            h.vmms.clear();
        } else {
            // A restarted agent finds them: not adopted yet, no snapshot in flight.
            for v in &mut h.vmms {
                v.local.adopted = false;
                v.local.stopping = false;
                v.local.snapshot_in_flight = false;
            }
        }
    }

    pub(super) fn workload(&mut self, i: usize) {
        let Some(vm) = self.vm.as_ref() else {
            return;
        };
        let cmd = match &vm.workload[i].1 {
            Workload::CreateVm(id) => Command::CreateVm {
                vm: id.clone(),
                spec: spec(),
            },
            Workload::Drain(host) => Command::DrainHost { host: *host },
            Workload::Migrate(id) => Command::MigrateVm {
                vm: id.clone(),
                target: None,
            },
        };
        let Some(l) = self.leader().filter(|&l| self.frozen(l).is_none()) else {
            let t = self.now + 50 * MS;
            self.push(t, Ev::Workload(i));
            return;
        };
        if !self.propose_cmd(l, &cmd) {
            let t = self.now + 50 * MS;
            self.push(t, Ev::Workload(i));
        }
    }

    fn propose_cmd(&mut self, n: usize, cmd: &Command) -> bool {
        let local = self.local(n, self.now);
        let data = cmd.to_bytes(RequestId(0));
        let Some(live) = self.nodes[n].live.as_mut() else {
            return false;
        };
        let ok = match live.raft.propose(local, &data) {
            Ok((index, term)) => {
                if let Some(vm) = self.vm.as_mut() {
                    vm.hosts[n].duties.proposed(term, index);
                }
                true
            }
            Err(_) => false,
        };
        self.after_input(n);
        ok
    }

    /// The periodic agent timer of host `n`.
    pub(super) fn host_tick(&mut self, n: usize) {
        let t = self.now + HOST_TICK;
        self.push(t, Ev::HostTick(n));
        if self.cfg.verbose {
            if let Some(l) = self.nodes[n].live.as_ref() {
                eprintln!(
                    "hosttick {} next_tick {} deadline(global) {} role {:?}",
                    n + 1,
                    self.nodes[n].next_tick,
                    self.global(n, l.raft.next_deadline()),
                    l.raft.role()
                );
            }
        }
        if self.frozen(n).is_some() || self.nodes[n].live.is_none() {
            return;
        }
        self.leader_duties(n);
        self.host_reconcile(n);
    }

    /// Leader: failure detection, host verdicts, placement (`agent::leader`, the code
    /// the agent runs).
    fn leader_duties(&mut self, n: usize) {
        let local = self.local(n, self.now);
        let me = self.nodes[n].id;
        let Some(vm) = self.vm.as_mut() else { return };
        let Some(live) = self.nodes[n].live.as_ref() else {
            return;
        };
        let Some(state) = live.kv.cluster.as_deref() else {
            return;
        };
        let view = RaftView::of(&live.raft, me);
        // The simulator registers every member with the same capacity.
        let cmds = vm.hosts[n]
            .duties
            .tick(&view, state, local, |_| Some(capacity()));
        for c in cmds {
            if self.cfg.verbose {
                eprintln!("leader {} proposes {c:?}", n + 1);
            }
            if !self.propose_cmd(n, &c) {
                break;
            }
        }
    }

    /// This host's own lease expiry on its clock (None: no lease): the agent's rule
    /// (`lease::own_lease_expiry`), unless a planted bug replaces it.
    fn own_lease(&self, n: usize, local: Nanos) -> Option<Nanos> {
        let vm = self.vm.as_ref()?;
        if vm.bugs.renew_without_lease {
            return Some(local + vm.rules.host_lease_ns);
        }
        let raft = &self.nodes[n].live.as_ref()?.raft;
        if vm.bugs.lease_from_any_contact && !raft.is_leader() {
            return raft
                .last_leader_contact()
                .map(|t| vm.rules.host_lease_expiry(t));
        }
        own_lease_expiry(raft, &vm.rules)
    }

    /// Runs reconcile on host `n` and carries out the actions.
    pub(super) fn host_reconcile(&mut self, n: usize) {
        if self.vm.is_none() || self.frozen(n).is_some() {
            return;
        }
        let local = self.local(n, self.now);
        let lease = self.own_lease(n, local);
        let host = self.nodes[n].id;
        let Some(live) = self.nodes[n].live.as_mut() else {
            return;
        };
        live.kv.cluster_changed = false;
        let Some(state) = live.kv.cluster.as_deref() else {
            return;
        };
        let vm = self.vm.as_mut().expect("checked");
        // Token growth, as this host's applied state shows it, and across hosts: a view
        // at a later index never shows a lower token than one at an earlier index.
        let at = state.applied_index();
        for v in state.vms() {
            let best = vm.latest_view.entry(v.id.clone()).or_insert((0, 0));
            let wrong = (at >= best.0 && v.token < best.1) || (at < best.0 && v.token > best.1);
            if wrong {
                self.checker.violation.get_or_insert_with(|| {
                    format!(
                        "fencing token of {} on host {host} is {} at index {at}, another host saw {} at index {}",
                        v.id, v.token, best.1, best.0
                    )
                });
            }
            if at > best.0 {
                *best = (at, v.token);
            }
        }
        for v in state.vms() {
            let seen = vm.hosts[n].tokens.entry(v.id.clone()).or_insert(0);
            if v.token < *seen {
                self.checker.violation.get_or_insert_with(|| {
                    format!(
                        "fencing token of {} went down on host {host}: {} after {}",
                        v.id, v.token, *seen
                    )
                });
            }
            *seen = v.token;
        }
        for h in state.hosts() {
            if h.state == crate::cluster::state::HostState::Dead
                && vm.dead_seen.insert(h.state_index, ()).is_none()
            {
                // First time anyone applied this verdict: its VMs' clocks start.
                for v in state.vms() {
                    if v.host.is_none() && v.desired == crate::cluster::command::Desired::Running {
                        vm.declared_dead_at.entry(v.id.clone()).or_insert(self.now);
                    }
                }
            }
        }
        // What the agent knows of its VMMs (their status replies).
        let hs = &mut vm.hosts[n];
        let vmms: Vec<LocalVmm> = hs
            .vmms
            .iter_mut()
            .map(|v| {
                let mut l = v.local.clone();
                l.state = if v.paused {
                    VmmState::Paused
                } else if local >= v.deadline {
                    VmmState::Fenced
                } else {
                    VmmState::Running
                };
                // A snapshot request that never committed is given up after a while.
                if l.snapshot_in_flight
                    && l.last_snapshot_requested_ns
                        .is_some_and(|t| local > t + 300 * MS)
                {
                    l.snapshot_in_flight = false;
                    v.local.snapshot_in_flight = false;
                }
                l
            })
            .collect();
        let actions = reconcile::reconcile(&reconcile::Input {
            state,
            host,
            vmms: &vmms,
            own_lease_expiry_ns: lease,
            now_ns: local,
        });
        // Snapshot records become committed-or-not: clear in-flight once the chain has it.
        for v in &mut hs.vmms {
            if let Some(x) = state.vm(&v.local.vm) {
                if x.chain
                    .iter()
                    .any(|c| c.token == v.local.token && c.seq == v.local.last_seq_used)
                    || x.migration.is_some_and(|m| m.ready)
                {
                    v.local.snapshot_in_flight = false;
                }
            }
        }
        let mut proposals = Vec::new();
        if self.cfg.verbose {
            for a in &actions {
                if !matches!(a, Action::Snapshot(_)) {
                    eprintln!(
                        "host {} applied {} lease {lease:?} local {local}: {a:?}",
                        n + 1,
                        state.applied_index()
                    );
                }
            }
        }
        for a in actions {
            self.trace = super::mix(self.trace, 0x51 ^ (n as u64) << 3);
            let w = self.vm.as_mut().expect("vm");
            if let Action::Start { vm, .. } = &a {
                if w.bugs.no_resurrection && w.ran.contains_key(vm) {
                    continue;
                }
            }
            let hs = &mut w.hosts[n];
            let find = |vmms: &mut Vec<FakeVmm>, vm: &str, token: u64| {
                vmms.iter()
                    .position(|v| v.local.vm == vm && v.local.token == token)
            };
            match a {
                Action::Start {
                    vm,
                    token,
                    lease_deadline_ns,
                    ..
                } => hs.vmms.push(FakeVmm {
                    local: LocalVmm {
                        vm,
                        token,
                        state: VmmState::Running,
                        adopted: true,
                        stopping: false,
                        since_ns: local,
                        last_snapshot_id: 0,
                        last_snapshot_requested_ns: None,
                        last_seq_used: 0,
                        snapshot_in_flight: false,
                    },
                    deadline: lease_deadline_ns,
                    paused: false,
                }),
                Action::Adopt { vm, token } => {
                    if let Some(i) = find(&mut hs.vmms, &vm, token) {
                        hs.vmms[i].local.adopted = true;
                    }
                }
                Action::Stop { vm, token, .. } => {
                    if let Some(i) = find(&mut hs.vmms, &vm, token) {
                        hs.vmms.remove(i);
                    }
                }
                Action::Renew {
                    vm,
                    token,
                    deadline_ns,
                } => {
                    if let Some(i) = find(&mut hs.vmms, &vm, token) {
                        hs.vmms[i].deadline = deadline_ns;
                    }
                }
                Action::Pause { vm, token } => {
                    if let Some(i) = find(&mut hs.vmms, &vm, token) {
                        hs.vmms[i].paused = true;
                    }
                }
                Action::Resume { vm, token } => {
                    if let Some(i) = find(&mut hs.vmms, &vm, token) {
                        hs.vmms[i].paused = false;
                    }
                }
                Action::Snapshot(req) => {
                    let id = {
                        let w = self.vm.as_mut().expect("vm");
                        w.next_snapshot_id += 1;
                        w.next_snapshot_id
                    };
                    let hs = &mut self.vm.as_mut().expect("vm").hosts[n];
                    if let Some(i) = find(&mut hs.vmms, &req.vm, req.token) {
                        let l = &mut hs.vmms[i].local;
                        l.last_snapshot_id = id;
                        l.last_snapshot_requested_ns = Some(local);
                        l.last_seq_used = l.last_seq_used.max(req.seq);
                        l.snapshot_in_flight = true;
                    }
                    proposals.push(Command::SnapshotCommitted(snapshot_record(&req, id, 0)));
                }
            }
        }
        self.check_split_brain();
        // Snapshot records go to the leader this host knows (forwarding), if reachable.
        for c in proposals {
            let Some(leader) = self.nodes[n]
                .live
                .as_ref()
                .map(|l| l.raft.leader())
                .filter(|&l| l != 0)
            else {
                break;
            };
            let l = (leader - 1) as usize;
            if l != n && (self.blocked[n][l] || self.blocked[l][n] || self.frozen(l).is_some()) {
                break;
            }
            let local_l = self.local(l, self.now);
            let data = c.to_bytes(RequestId(0));
            if let Some(live) = self.nodes[l].live.as_mut() {
                let _ = live.raft.propose(local_l, &data);
                self.after_input(l);
            }
        }
    }

    /// No VM runs on two hosts at this true instant; records outage figures.
    pub(super) fn check_split_brain(&mut self) {
        let Some(mut vm) = self.vm.take() else { return };
        vm.running.clear();
        let mut twice: Option<String> = None;
        for (n, h) in vm.hosts.iter().enumerate() {
            for v in &h.vmms {
                if self.vmm_runs(n, v) {
                    let c = vm.running.entry(v.local.vm.clone()).or_insert(0);
                    *c += 1;
                    if *c > 1 && twice.is_none() {
                        twice = Some(v.local.vm.clone());
                    }
                }
            }
        }
        if let (Some(id), None) = (twice, &self.checker.violation) {
            let mut hosts = Vec::new();
            for (m, h) in vm.hosts.iter().enumerate() {
                for x in &h.vmms {
                    if x.local.vm == id && self.vmm_runs(m, x) {
                        hosts.push(format!(
                            "host {} token {} deadline {} ms on its clock, now {} ms",
                            m + 1,
                            x.local.token,
                            x.deadline / MS,
                            self.local(m, self.now) / MS
                        ));
                    }
                }
            }
            self.checker.violation = Some(format!(
                "split brain: {id} runs on two hosts at {} ms ({})",
                self.now / MS,
                hosts.join("; ")
            ));
        }
        let leader = self
            .leader()
            .filter(|&l| vm.hosts[l].frozen_until <= self.now)
            .and_then(|l| Some((l, self.raft(l)?.term())));
        if vm.stable_leader.0 != leader {
            vm.stable_leader = (leader, self.now);
        }
        let bound = vm_recovery_bound(&vm.rules);
        for i in 0..vm.vms_created {
            let id = format!("vm{i}");
            let runs = vm.running.contains_key(&id);
            if runs {
                vm.idle_since.remove(&id);
            } else {
                let idle = *vm.idle_since.entry(id.clone()).or_insert(self.now);
                // Only VMs that ran: a VM whose creation was lost with a deposed leader
                // never exists (the end check covers VMs that exist and never ran).
                let down = vm
                    .ran
                    .contains_key(&id)
                    .then(|| vm.down_while_led(idle, self.now))
                    .flatten();
                if let Some(down) = down {
                    if down >= bound && self.checker.violation.is_none() {
                        let (l, term) = vm.stable_leader.0.expect("led");
                        self.checker.violation = Some(format!(
                            "liveness: {id} ran on no host for {} ms after the last fault \
                             healed while node {} led term {term} (bound {} ms)",
                            down / MS,
                            l + 1,
                            bound / MS
                        ));
                    }
                }
            }
            if runs {
                vm.ran.insert(id.clone(), ());
                if let Some(since) = vm.down_since.remove(&id) {
                    vm.outages.push(self.now - since);
                }
                if let Some(at) = vm.declared_dead_at.remove(&id) {
                    vm.after_declared_dead.push(self.now - at);
                }
            } else if vm.ran.contains_key(&id) {
                vm.down_since.entry(id).or_insert(self.now);
            }
        }
        self.vm = Some(vm);
    }

    /// At the end: every VM that should run, by the most up-to-date live committed state,
    /// runs on the host that state places it on, with its current token; or it runs
    /// nowhere and is inside a recovery window (no leader now, or the leader took over
    /// less than [`vm_recovery_bound`] ago, or it went down less than that ago).
    pub(super) fn check_vm_liveness(&mut self) -> Option<String> {
        let vm = self.vm.as_ref()?;
        let best = (0..self.nodes.len())
            .filter_map(|n| self.nodes[n].live.as_ref().map(|l| (n, l)))
            .max_by_key(|(_, l)| l.raft.applied_index())?;
        let state: &ClusterState = best.1.kv.cluster.as_deref()?;
        for v in state.vms() {
            if v.desired != crate::cluster::command::Desired::Running || v.migration.is_some() {
                continue;
            }
            let bound = vm_recovery_bound(&vm.rules);
            let briefly_down = vm
                .idle_since
                .get(&v.id)
                .is_some_and(|&idle| vm.down_while_led(idle, self.now).is_none_or(|d| d < bound));
            let Some(h) = v.host else {
                if briefly_down {
                    continue;
                }
                return Some(format!(
                    "liveness: {} has no host {} ms after the last fault healed ({})",
                    v.id,
                    self.cfg.quiet_time / MS,
                    v.waiting
                ));
            };
            let n = (h - 1) as usize;
            let ok = vm.hosts[n]
                .vmms
                .iter()
                .any(|x| x.local.vm == v.id && x.local.token == v.token && self.vmm_runs(n, x));
            if !ok && !briefly_down {
                return Some(format!(
                    "liveness: {} (token {}) is not running on host {h} {} ms after the last fault healed",
                    v.id,
                    v.token,
                    self.cfg.quiet_time / MS
                ));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The VM recovery clock runs only after the heal and only while one leader leads:
    /// from the latest of the VM going down, the heal and the leader's takeover.
    #[test]
    fn recovery_clock_starts_at_the_heal_and_at_the_leaders_takeover() {
        let mut rng = crate::raft::rng::Rng::new(1);
        let mut vm = VmWorld::new(3, VmBugs::default(), &mut rng, 3_000 * MS);
        vm.stable_leader = (Some((0, 2)), 500 * MS);
        assert_eq!(
            vm.down_while_led(1_000 * MS, 2_000 * MS),
            None,
            "not healed"
        );
        vm.healed_at = Some(3_000 * MS);
        // Down before the heal, leader since before: counts from the heal.
        assert_eq!(vm.down_while_led(1_000 * MS, 4_000 * MS), Some(1_000 * MS));
        // Down after the heal: from going down.
        assert_eq!(vm.down_while_led(3_500 * MS, 4_000 * MS), Some(500 * MS));
        // A leader that took over later: from its takeover.
        vm.stable_leader = (Some((1, 3)), 3_800 * MS);
        assert_eq!(vm.down_while_led(1_000 * MS, 4_000 * MS), Some(200 * MS));
        // No leader: no clock.
        vm.stable_leader = (None, 3_900 * MS);
        assert_eq!(vm.down_while_led(1_000 * MS, 9_000 * MS), None);
        assert_eq!(vm_recovery_bound(&vm.rules), 1_606 * MS);
    }
}
