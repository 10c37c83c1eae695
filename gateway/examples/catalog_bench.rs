//! Catalog figures for docs/CATALOG.md: credit deductions per second on one
//! hot account and spread over 100 accounts, and API-key lookup latency with
//! and without the per-process cache.
//!
//! Creates (and drops) its own database on the server given by
//! `PLANGATE_BENCH_POSTGRES_URL` (default: the local server, database
//! `postgres`). Run: `cargo run --release -p plangate --example catalog_bench`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use plangate::catalog::cache::{CacheConfig, CatalogCache};
use plangate::catalog::memory::MemoryCatalog;
use plangate::catalog::postgres::{migrate, PgOptions, PostgresCatalog};
use plangate::catalog::{hash_key, Catalog, Deduction};
use plangate::clock::SystemClock;

const WORKERS: usize = 32;
const RUN: Duration = Duration::from_secs(3);
const LOOKUPS: usize = 5_000;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = std::env::var("PLANGATE_BENCH_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let name = format!("plangate_bench_{}", std::process::id());
    let (admin, conn) = tokio_postgres::connect(&server, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;
    let base = server.rsplit_once('/').map_or(server.as_str(), |(b, _)| b);
    let url = format!("{base}/{name}");

    let result = run(&url).await;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await?;
    result
}

async fn run(url: &str) -> Result<(), Box<dyn std::error::Error>> {
    migrate(url).await?;
    let clock = Arc::new(SystemClock);
    let pg_cat = Arc::new(
        PostgresCatalog::connect_with(
            url,
            clock.clone(),
            PgOptions {
                pool_size: WORKERS,
                ..PgOptions::default()
            },
        )
        .await?,
    );
    let pg: Arc<dyn Catalog> = pg_cat.clone();
    let mem: Arc<dyn Catalog> = Arc::new(MemoryCatalog::new(clock.clone()));
    println!("{WORKERS} concurrent workers, {RUN:?} per run, deductions of 1 credit\n");
    for (label, cat) in [("postgres", &pg), ("in-process", &mem)] {
        let hot = deductions(cat, 1, label).await?;
        let spread = deductions(cat, 100, label).await?;
        println!("{label:>10}: 1 hot account: {hot:>8.0} deductions/s; 100 accounts: {spread:>8.0} deductions/s");
    }
    let s = pg_cat.batch_stats();
    println!(
        "  postgres batches: {} for {} deductions (mean {:.1}, largest {}), {} fell back",
        s.batches,
        s.deductions,
        s.deductions as f64 / s.batches.max(1) as f64,
        s.largest,
        s.fallbacks
    );
    println!();
    for (label, cat) in [("postgres", &pg), ("in-process", &mem)] {
        lookups(cat, label).await?;
    }
    Ok(())
}

/// Deductions per second with `WORKERS` tasks over `accounts` accounts.
async fn deductions(
    cat: &Arc<dyn Catalog>,
    accounts: usize,
    label: &str,
) -> Result<f64, Box<dyn std::error::Error>> {
    let prefix = format!("{label}-{accounts}");
    for a in 0..accounts {
        let id = format!("{prefix}-{a}");
        cat.create_account(&id, None, serde_json::Value::Null)
            .await?;
        // Three blocks, as a real account would have.
        for _ in 0..3 {
            cat.create_quota_block(&id, 1_000_000_000, None, serde_json::Value::Null)
                .await?;
        }
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let cat = cat.clone();
        let prefix = prefix.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while start.elapsed() < RUN {
                let d = Deduction {
                    account_id: format!("{prefix}-{}", (w + n as usize) % accounts),
                    amount: 1,
                    require_full: true,
                    min_balance: 1,
                    idempotency_key: format!("{prefix}-{w}-{n}"),
                    request_id: None,
                    endpoint: None,
                };
                if cat.deduct(&d).await.is_ok() {
                    n += 1;
                }
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await?;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

async fn lookups(cat: &Arc<dyn Catalog>, label: &str) -> Result<(), Box<dyn std::error::Error>> {
    let account = format!("{label}-keys");
    cat.create_account(&account, None, serde_json::Value::Null)
        .await?;
    let key = cat.create_key(&account).await?;
    let hash = hash_key(&key.key);
    let mut uncached = Vec::with_capacity(LOOKUPS);
    for _ in 0..LOOKUPS {
        let t = Instant::now();
        cat.lookup_key(&hash).await?;
        uncached.push(t.elapsed());
    }
    let cache =
        CatalogCache::new(cat.clone(), Arc::new(SystemClock), CacheConfig::default()).await?;
    cache.resolve_key(&hash).await?;
    let mut cached = Vec::with_capacity(LOOKUPS);
    for _ in 0..LOOKUPS {
        let t = Instant::now();
        cache.resolve_key(&hash).await?;
        cached.push(t.elapsed());
    }
    println!(
        "{label:>10}: key lookup uncached p50 {:?} p99 {:?}; cached p50 {:?} p99 {:?}",
        pct(&mut uncached, 50),
        pct(&mut uncached, 99),
        pct(&mut cached, 50),
        pct(&mut cached, 99)
    );
    Ok(())
}

fn pct(v: &mut [Duration], p: usize) -> Duration {
    v.sort();
    v[(v.len() * p / 100).min(v.len() - 1)]
}
