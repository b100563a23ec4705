//! PBKDF2, SCRAM's salted password: the one step of authentication whose cost someone else
//! chooses (a server's `i=`, a stored verifier's iteration count, a flood of cleartext logins
//! against SCRAM secrets). Iterations are capped, and derivations run on blocking threads, at
//! most one per core at a time, never on a worker thread, whose other clients would stall.

use std::sync::OnceLock;

use tokio::sync::Semaphore;

/// The most iterations pgcorral derives a key with: 250 times PostgreSQL's default of 4096,
/// well under a second of CPU.
pub const MAX_ITERATIONS: u32 = 1_000_000;

fn gate() -> &'static Semaphore {
    static GATE: OnceLock<Semaphore> = OnceLock::new();
    GATE.get_or_init(|| Semaphore::new(std::thread::available_parallelism().map_or(1, |n| n.get())))
}

/// Runs `derive` on a blocking thread once one of the per-core slots is free, and returns its
/// result. Waiting holds nothing but the caller's task.
pub async fn off_worker<T: Send + 'static>(derive: impl FnOnce() -> T + Send + 'static) -> T {
    let _slot = gate().acquire().await.expect("the gate is never closed");
    match tokio::task::spawn_blocking(derive).await {
        Ok(value) => value,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derivations_run_off_the_calling_thread_and_return_their_value() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let caller = std::thread::current().id();
        let (value, thread) = runtime.block_on(off_worker(|| (42, std::thread::current().id())));
        assert_eq!(value, 42);
        assert_ne!(thread, caller);
    }

    #[test]
    fn at_most_one_derivation_per_core_runs_at_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        runtime.block_on(async {
            let tasks: Vec<_> = (0..32)
                .map(|_| {
                    let (running, peak) = (running.clone(), peak.clone());
                    tokio::spawn(off_worker(move || {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(now, Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(5));
                        running.fetch_sub(1, Ordering::SeqCst);
                    }))
                })
                .collect();
            for task in tasks {
                task.await.unwrap();
            }
        });
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert!(
            peak.load(Ordering::SeqCst) <= cores,
            "peak {} on {cores} cores",
            peak.load(Ordering::SeqCst)
        );
    }
}
