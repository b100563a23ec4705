//! The pool logic (routers of several workers, shared limits, donation between workers,
//! `min_pool_size`, reserve, timeouts, reloads) under a deterministic simulation: many seeds,
//! each a random configuration, random clients and random faults, with the invariants checked
//! after every step (see `pgcorral::actors::router::sim`).
//!
//! `SIM_SEEDS` (default 10,000) seeds from `SIM_FIRST_SEED` (default 0) run; a failing seed is
//! printed with the one command that replays it: `SIM_SEED=n cargo test --test pool_simulation`.

use std::time::Instant;

use pgcorral::actors::router::sim;

fn env(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| v.parse().unwrap_or_else(|_| panic!("{name} must be a number")))
}

#[test]
fn pool_logic_keeps_its_invariants_under_random_clients_faults_and_reloads() {
    if let Some(seed) = env("SIM_SEED") {
        let outcome = sim::run(seed);
        println!("{}", outcome.trace);
        assert_eq!(outcome.violation, None, "seed {seed} after {} steps", outcome.steps);
        return;
    }
    let first = env("SIM_FIRST_SEED").unwrap_or(0);
    let count = env("SIM_SEEDS").unwrap_or(10_000);
    let started = Instant::now();
    let mut steps = 0;
    for seed in first..first + count {
        let outcome = sim::run(seed);
        steps += outcome.steps;
        if let Some(violation) = outcome.violation {
            panic!(
                "{violation:?}\n\n{}\nreproduce: SIM_SEED={seed} cargo test --test pool_simulation -- --nocapture",
                outcome.trace
            );
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{count} seeds, {steps} steps in {seconds:.1} s: {:.0} seeds/s, {:.0} steps/s",
        count as f64 / seconds,
        steps as f64 / seconds
    );
}
