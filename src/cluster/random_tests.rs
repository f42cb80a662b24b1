//! Randomised test: random command sequences (valid, invalid, retried, garbage, and the
//! leader's own plans) applied on two copies, and on a third copy restored from a
//! snapshot midway, give identical outcomes and states; invariants are checked after
//! every entry by this test itself (independently of `ClusterState::check`).

use std::collections::BTreeMap;

use super::command::{
    Command, Desired, KvCommand, RequestId, Resources, SnapshotKind, SnapshotRecord,
};
use super::placement;
use super::state::{snapshot_path, ClusterState, HostState, Outcome};
use super::testkit::{spec, GIB};

/// xorshift64*: deterministic, seedable, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

const VMS: u64 = 12;
const HOSTS: u64 = 6;

fn vm_name(rng: &mut Rng) -> String {
    format!("vm{}", rng.below(VMS))
}

/// One random command, often plausible given `state`, sometimes not.
fn random_command(rng: &mut Rng, state: &ClusterState) -> Command {
    let host = 1 + rng.below(HOSTS);
    match rng.below(15) {
        0 => Command::RegisterHost {
            host,
            capacity: Resources {
                memory_bytes: (1 + rng.below(8)) * GIB,
                vcpus: 1 + rng.below(8) as u32,
            },
        },
        1 | 2 => {
            let mut s = spec(64 * (1 + rng.below(32)), 1 + rng.below(4) as u32, None);
            s.anti_affinity = match rng.below(3) {
                0 => None,
                1 => Some("g1".into()),
                _ => Some("g2".into()),
            };
            s.full_every = rng.below(6) as u32; // 0 is invalid
            Command::CreateVm {
                vm: vm_name(rng),
                spec: s,
            }
        }
        3 => Command::DeleteVm { vm: vm_name(rng) },
        4 => Command::SetDesired {
            vm: vm_name(rng),
            desired: if rng.chance(70) {
                Desired::Running
            } else {
                Desired::Stopped
            },
        },
        5 => {
            let vm = vm_name(rng);
            let current = state.vm(&vm).map_or(0, |v| v.token);
            Command::PlaceVm {
                vm,
                host,
                expected_token: if rng.chance(70) {
                    current
                } else {
                    rng.below(current + 2)
                },
            }
        }
        6 => Command::HostDead {
            host,
            reason: "random".into(),
        },
        7 => Command::HostAlive { host },
        8 => Command::DrainHost { host },
        9 => Command::HostDrained { host },
        10 | 11 => {
            let vm = vm_name(rng);
            let (token, latest) = state.vm(&vm).map_or((0, None), |v| {
                (
                    v.token,
                    v.latest_snapshot().map(|l| (l.token, l.seq, l.snapshot_id)),
                )
            });
            let token = if rng.chance(80) {
                token
            } else {
                rng.below(token + 2)
            };
            let seq = match latest {
                Some((t, seq, _)) if t == token => seq + 1,
                _ => 1,
            } + if rng.chance(10) { rng.below(3) } else { 0 };
            let diff = rng.chance(60);
            let parent_id = match (diff, latest) {
                (true, Some((_, _, id))) if rng.chance(90) => id,
                (true, _) => rng.below(4),
                (false, _) => 0,
            };
            Command::SnapshotCommitted(SnapshotRecord {
                vm: vm.clone(),
                token,
                seq,
                kind: if diff {
                    SnapshotKind::Diff
                } else {
                    SnapshotKind::Full
                },
                snapshot_id: 1 + rng.below(1 << 40),
                parent_id,
                path: if rng.chance(95) {
                    snapshot_path(&vm, token, seq)
                } else {
                    "vms/x/../y".into()
                },
                final_for_migration: rng.chance(50),
                taken_at_ms: rng.next(),
            })
        }
        12 => Command::MigrateVm {
            vm: vm_name(rng),
            target: rng.chance(50).then_some(host),
        },
        13 if rng.chance(30) => Command::CancelMigration { vm: vm_name(rng) },
        13 => Command::VmWaiting {
            vm: vm_name(rng),
            reason: "busy".into(),
        },
        _ => Command::Kv(if rng.chance(70) {
            KvCommand::Put {
                key: format!("k{}", rng.below(8)),
                value: vec![7; rng.below(16) as usize],
                if_revision: rng.chance(30).then(|| rng.below(50)),
            }
        } else {
            KvCommand::Delete {
                key: format!("k{}", rng.below(8)),
                if_revision: None,
            }
        }),
    }
}

/// The invariants, recomputed from the public view.
fn check_invariants(state: &ClusterState, tokens: &mut BTreeMap<String, u64>) {
    let mut used: BTreeMap<u64, Resources> = BTreeMap::new();
    for vm in state.vms() {
        if let Some(host_id) = vm.host {
            let host = state
                .host(host_id)
                .unwrap_or_else(|| panic!("{} on unknown host {host_id}", vm.id));
            assert!(
                matches!(host.state, HostState::Alive | HostState::Draining),
                "{} on {} host {host_id}",
                vm.id,
                host.state.name()
            );
            let u = used.entry(host_id).or_default();
            u.memory_bytes += vm.spec.resources.memory_bytes;
            u.vcpus += vm.spec.resources.vcpus;
        }
        let previous = tokens.insert(vm.id.clone(), vm.token).unwrap_or(0);
        assert!(
            vm.token >= previous,
            "{}: token {previous} -> {}",
            vm.id,
            vm.token
        );
        assert!(vm.token <= state.applied_index());
        if let Some(latest) = vm.latest_snapshot() {
            assert!(
                latest.token <= vm.token,
                "{}: snapshot of a later token",
                vm.id
            );
        }
    }
    for (host_id, u) in used {
        let capacity = state.host(host_id).unwrap().capacity;
        assert!(
            u.memory_bytes <= capacity.memory_bytes && u.vcpus <= capacity.vcpus,
            "host {host_id} over capacity"
        );
    }
}

#[derive(Default, Debug)]
struct Coverage {
    placed: u64,
    rejected: u64,
    snapshots: u64,
    deaths_with_vms: u64,
    retries_answered: u64,
}

fn run(seed: u64, steps: u64, coverage: &mut Coverage) {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut a = ClusterState::new();
    let mut b = ClusterState::new();
    let mut restored: Option<ClusterState> = None;
    let mut tokens = BTreeMap::new();
    let mut sent: Vec<(RequestId, Vec<u8>, Outcome)> = Vec::new();
    let mut index = 0;
    let mut queue: Vec<Vec<u8>> = Vec::new();
    for step in 0..steps {
        if step == steps / 2 {
            let copy = ClusterState::decode(&a.to_bytes()).unwrap();
            assert_eq!(copy, a);
            restored = Some(copy);
        }
        if queue.is_empty() {
            match rng.below(10) {
                // The leader's plan, applied as the leader would propose it.
                0..=2 => {
                    for command in placement::plan(&a).commands {
                        queue.push(command.to_bytes(RequestId(0)));
                    }
                }
                // A retry of an earlier client request.
                3 if !sent.is_empty() => {
                    let (_, bytes, _) = &sent[rng.below(sent.len() as u64) as usize];
                    queue.push(bytes.clone());
                }
                // Garbage.
                4 if rng.chance(20) => {
                    let len = rng.below(24) as usize;
                    queue.push((0..len).map(|_| rng.next() as u8).collect());
                }
                _ => {
                    let command = random_command(&mut rng, &a);
                    let request = if rng.chance(50) {
                        RequestId(0)
                    } else {
                        RequestId(1 + rng.below(300))
                    };
                    queue.push(command.to_bytes(request));
                }
            }
            queue.reverse();
        }
        let Some(bytes) = queue.pop() else { continue };
        index += 1 + rng.below(2); // Raft indexes may skip (config entries, no-ops).
        let before_vms_on: Vec<usize> = (1..=HOSTS).map(|h| a.vms_on(h).count()).collect();
        let outcome = a.apply(index, &bytes);
        assert_eq!(b.apply(index, &bytes), outcome, "seed {seed} step {step}");
        if let Some(c) = &mut restored {
            assert_eq!(
                c.apply(index, &bytes),
                outcome,
                "restored, seed {seed} step {step}"
            );
        }
        check_invariants(&a, &mut tokens);
        match &outcome {
            Outcome::Placed { .. } => coverage.placed += 1,
            Outcome::Rejected(_) => coverage.rejected += 1,
            _ => {}
        }
        if let Ok((request, command)) = Command::decode(&bytes) {
            if let Some((_, _, first)) = sent.iter().find(|(r, _, _)| *r == request && r.0 != 0) {
                // Within the window, a retry gets the first answer.
                assert_eq!(
                    &outcome, first,
                    "seed {seed} step {step}: retry answered differently"
                );
                coverage.retries_answered += 1;
            } else if request.0 != 0 {
                sent.push((request, bytes.clone(), outcome.clone()));
            }
            match command {
                Command::SnapshotCommitted(_) if outcome == Outcome::Done => {
                    coverage.snapshots += 1
                }
                Command::HostDead { host, .. } if before_vms_on[host as usize - 1] > 0 => {
                    coverage.deaths_with_vms += 1
                }
                _ => {}
            }
        }
        if step % 97 == 0 {
            assert_eq!(a.to_bytes(), b.to_bytes());
        }
    }
    let bytes = a.to_bytes();
    assert_eq!(bytes, b.to_bytes(), "seed {seed}");
    assert_eq!(bytes, restored.unwrap().to_bytes(), "seed {seed}");
    assert_eq!(ClusterState::decode(&bytes).unwrap(), a);
}

#[test]
fn random_logs_give_identical_states_and_outcomes() {
    let mut coverage = Coverage::default();
    for seed in 1..=24 {
        run(seed, 1500, &mut coverage);
    }
    // The run exercised what it claims to (else the generator is broken).
    assert!(coverage.placed > 100, "{coverage:?}");
    assert!(coverage.rejected > 100, "{coverage:?}");
    assert!(coverage.snapshots > 20, "{coverage:?}");
    assert!(coverage.deaths_with_vms > 10, "{coverage:?}");
    assert!(coverage.retries_answered > 20, "{coverage:?}");
    eprintln!("{coverage:?}");
}

#[test]
fn corrupted_states_and_commands_never_panic() {
    let mut rng = Rng(0x5eed);
    // A state with hosts, placed VMs, snapshots, migrations, KV keys and remembered
    // requests, built by the leader's plans and random commands.
    let mut state = ClusterState::new();
    let mut index = 0;
    for _ in 0..400 {
        let mut commands = vec![random_command(&mut rng, &state)];
        if rng.chance(30) {
            commands.extend(placement::plan(&state).commands);
        }
        for command in commands {
            index += 1;
            state.apply(index, &command.to_bytes(RequestId(rng.below(50))));
        }
    }
    assert!(state.vms().any(|vm| vm.host.is_some()));
    let bytes = state.to_bytes();
    let mut decoded = 0;
    for _ in 0..3000 {
        let mut corrupt = bytes.clone();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(corrupt.len() as u64) as usize;
            corrupt[at] = rng.next() as u8;
        }
        if rng.chance(10) {
            corrupt.truncate(rng.below(corrupt.len() as u64) as usize);
        }
        if let Ok(copy) = ClusterState::decode(&corrupt) {
            copy.check().unwrap();
            assert_eq!(copy.to_bytes(), corrupt, "one encoding per state");
            decoded += 1;
        }
    }
    eprintln!("{decoded} of 3000 corrupted states still decoded (and were consistent)");
    // Commands: random bytes behind a valid header.
    for _ in 0..20_000 {
        let len = rng.below(64) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        if bytes.len() >= 2 {
            bytes[0] = super::command::COMMAND_VERSION;
            bytes[1] =
                [1, 2, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21][rng.below(14) as usize];
        }
        if let Ok((request, command)) = Command::decode(&bytes) {
            assert_eq!(command.to_bytes(request), bytes);
        }
        index += 1;
        state.apply(index, &bytes);
    }
}
