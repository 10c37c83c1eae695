//! Counter-store benchmark: attempt + end pairs.
//!
//! ```text
//! cargo run --release --example limiter_bench -- [--redis URL] [--secs N] [--tasks N]
//! cargo run --release --example limiter_bench -- --print-attempt-lua
//! ```
//!
//! 1. In-process store, one thread: ns per attempt+end pair.
//! 2. Redis with `--tasks` (default 64) concurrent tasks, for each connection
//!    mode: pairs/s and p50/p99 latency of single calls.
//!
//! The figures and the exact commands are in docs/LIMITER.md.

use std::sync::Arc;
use std::time::{Duration, Instant};

use plangate::limiter::memory::MemoryStore;
use plangate::limiter::redis::{RedisMode, RedisOptions, RedisStore, ATTEMPT_LUA};
use plangate::limiter::{AttemptRequest, CounterStore, EndRequest, Verdict, WindowSpec};
use plangate::plans::{Unit, WindowLen};

const NOW_MS: u64 = 1_741_955_657_250;

/// The original free plan's windows with limits no benchmark reaches, so
/// every attempt is admitted and runs the full write path.
fn windows() -> Vec<WindowSpec> {
    let w = |secs, unit: &str, amount| WindowSpec {
        len: WindowLen::Fixed(secs),
        limit: 1 << 50,
        unit: Unit::new(unit),
        amount,
    };
    vec![
        w(60, "request", 1),
        w(86_400, "request", 1),
        w(60, "token", 0),
    ]
}

async fn pair<S: CounterStore>(
    store: &S,
    windows: &[WindowSpec],
    account: &str,
    id: &str,
    lat: Option<&mut Vec<u32>>,
) {
    let t0 = Instant::now();
    let out = store
        .attempt(&AttemptRequest {
            request_id: id,
            account,
            endpoint: "gpt-4o",
            now_ms: NOW_MS,
            windows,
            max_concurrent: 0,
            lease_ms: 60_000,
            credits: None,
            key: None,
        })
        .await;
    let t1 = Instant::now();
    match out {
        Ok(o) if o.verdict == Verdict::Admitted => {}
        other => panic!("benchmark attempt not admitted: {other:?}"),
    }
    store
        .end(&EndRequest {
            request_id: id,
            account,
            endpoint: "gpt-4o",
            now_ms: NOW_MS,
            settlements: &[],
            credits: Default::default(),
            usage: None,
            key: None,
            admission: None,
        })
        .await
        .expect("end");
    if let Some(lat) = lat {
        lat.push((t1 - t0).as_micros() as u32);
        lat.push(t1.elapsed().as_micros() as u32);
    }
}

fn bench_memory() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let store = MemoryStore::new();
    let windows = windows();
    // Accounts and ids prepared up front: the loop measures the store.
    let accounts: Vec<String> = (0..1024).map(|i| format!("acct-{i}")).collect();
    let ids: Vec<String> = (0..1024).map(|i| format!("req-{i}")).collect();
    let n = 2_000_000usize;
    rt.block_on(async {
        for i in 0..100_000 {
            pair(&store, &windows, &accounts[i % 1024], &ids[i % 1024], None).await;
        }
        let t = Instant::now();
        for i in 0..n {
            pair(&store, &windows, &accounts[i % 1024], &ids[i % 1024], None).await;
        }
        let el = t.elapsed();
        println!(
            "memory, 1 thread: {n} attempt+end pairs in {:.2?}: {:.0} ns/pair ({:.2} M pairs/s)",
            el,
            el.as_nanos() as f64 / n as f64,
            n as f64 / el.as_secs_f64() / 1e6
        );
    });
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

async fn bench_redis(url: &str, mode: RedisMode, tasks: usize, secs: u64) {
    let options = RedisOptions {
        mode,
        key_prefix: format!("pgbench:{}:", std::process::id()),
        ..RedisOptions::default()
    };
    let store = Arc::new(RedisStore::connect_with(url, options).await.expect("store"));
    store.ping().await.expect("redis answers");
    let windows = Arc::new(windows());
    let run = |duration: Duration| {
        let mut handles = Vec::new();
        for t in 0..tasks {
            let (store, windows) = (store.clone(), windows.clone());
            handles.push(tokio::spawn(async move {
                let account = format!("acct-{t}");
                let mut lat = Vec::with_capacity(200_000);
                let mut pairs = 0u64;
                let start = Instant::now();
                while start.elapsed() < duration {
                    let id = format!("req-{t}-{pairs}");
                    pair(&*store, &windows, &account, &id, Some(&mut lat)).await;
                    pairs += 1;
                }
                (pairs, lat)
            }));
        }
        handles
    };
    // Warm up: connections, script cache.
    for h in run(Duration::from_millis(500)) {
        h.await.expect("task");
    }
    let t = Instant::now();
    let mut pairs = 0u64;
    let mut lat = Vec::new();
    for h in run(Duration::from_secs(secs)) {
        let (p, l) = h.await.expect("task");
        pairs += p;
        lat.extend(l);
    }
    let el = t.elapsed().as_secs_f64();
    cleanup(url, store.keys()).await;
    lat.sort_unstable();
    println!(
        "redis {mode:?}, {tasks} tasks: {:.0} pairs/s ({:.0} calls/s); call latency p50 {} us, p99 {} us, max {} us",
        pairs as f64 / el,
        2.0 * pairs as f64 / el,
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(0),
    );
}

/// Delete the benchmark's keys (they would expire, the day window only
/// within hours).
async fn cleanup(url: &str, keys: &plangate::limiter::keys::Keys) {
    let client = redis::Client::open(url).expect("redis url");
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection");
    let mut cursor = 0u64;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(keys.scan_pattern())
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut c)
            .await
            .expect("SCAN");
        if !batch.is_empty() {
            let _: () = redis::cmd("DEL")
                .arg(&batch)
                .query_async(&mut c)
                .await
                .expect("DEL");
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--print-attempt-lua") {
        print!("{ATTEMPT_LUA}");
        return;
    }
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let url = value("--redis").unwrap_or_else(|| "redis://127.0.0.1:6379".into());
    let secs: u64 = value("--secs").and_then(|s| s.parse().ok()).unwrap_or(5);
    let tasks: usize = value("--tasks").and_then(|s| s.parse().ok()).unwrap_or(64);
    let skip_memory = args.iter().any(|a| a == "--redis-only");

    if !skip_memory {
        bench_memory();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        for mode in [
            RedisMode::Multiplexed,
            RedisMode::Pooled { max_size: 8 },
            RedisMode::Pooled { max_size: 64 },
        ] {
            bench_redis(&url, mode, tasks, secs).await;
        }
    });
}
