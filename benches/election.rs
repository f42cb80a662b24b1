//! Election convergence in the simulator (1 ms links, heartbeat 20 ms, election timeout
//! random in [100, 200) ms): the leader crashes; measured until a new leader has
//! committed the no-op of its term. JSON lines on stdout, progress on stderr.
//! Same as `vigil sim --election-bench`; `cargo bench --bench election -- RUNS`.

fn main() {
    let runs = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(300);
    vigil::sim::cli::election_bench(runs);
}
