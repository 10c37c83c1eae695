//! `cargo run -p plangate-tests --bin soak -- [MINUTES] [WORKERS]`: the soak
//! run of issue 6 (see `plangate_tests::soak`); `tests/soak.sh` wraps it.
//! Exits 1 when a criterion fails (RSS not flat, in-flight not back to 0,
//! a Redis key without TTL, the gateway gone, credits and ledger apart).

use std::time::Duration;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let minutes: f64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10.0);
    let workers: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(16);
    let duration = Duration::from_secs_f64(minutes * 60.0);
    eprintln!("soak: {duration:?} of mixed traffic with {workers} clients");
    let report = plangate_tests::soak::run(duration, workers, Duration::from_secs(10)).await;
    println!("{}", report.summary());
    let failures = report.failures();
    if failures.is_empty() {
        println!("soak: PASS");
    } else {
        for f in &failures {
            println!("soak: FAIL: {f}");
        }
        std::process::exit(1);
    }
}
