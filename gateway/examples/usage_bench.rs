//! Usage-event figures for docs/CATALOG.md ("Usage events"): the rate at
//! which the Postgres catalog records events in batches of 256 (one writer,
//! then several), bytes per event on disk, and the time of the read-outs
//! over the result.
//!
//! Creates the database `plangate_usage_bench` (dropped first if it
//! exists) on the server `PLANGATE_BENCH_POSTGRES_URL` (default: the local
//! server) and leaves it filled, so `plangate usage export` can be timed
//! on it afterwards; drop it when done. `PLANGATE_BENCH_EVENTS` (default
//! 1,000,000) and `PLANGATE_BENCH_WRITERS` (default 4) size the run.
//! Run: `cargo run --release -p plangate --example usage_bench`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use plangate::catalog::postgres::{migrate, PgOptions, PostgresCatalog};
use plangate::catalog::{Catalog, GroupBy, UnitUsage, UsageEvent, UsageQuery};
use plangate::clock::SystemClock;

const BATCH: usize = 256;
const ACCOUNTS: u64 = 1_000;
const ENDPOINTS: [&str; 5] = [
    "gpt-4o",
    "gpt-4o-mini",
    "text-embedding-3-small",
    "dall-e-3",
    "llama-3.1-70b",
];
/// Events end over the 30 days before 2027-01-14, in order.
const END_MS: u64 = 1_799_884_800_000;
const SPAN_MS: u64 = 30 * 86_400_000;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

const PREFIXES: [u32; 4] = [0x3f9a_1c07, 0x8b21_44e0, 0xc0de_5a11, 0x1d2e_3f4a];

/// Event `i` of the run: ids like the gateway's (`req_<8 hex><counter>`),
/// 1,000 accounts, five endpoints, tokens on most, images on one.
fn event(i: u64) -> UsageEvent {
    let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let account = h % ACCOUNTS;
    let endpoint = ENDPOINTS[(h >> 20) as usize % ENDPOINTS.len()];
    // In end order, as a gateway records them (2.592 s apart: 1,000,000
    // events fill the 30 days), so the time index grows at its right edge.
    let ended = END_MS - SPAN_MS + (i * 2_592) % SPAN_MS;
    let units = if endpoint == "dall-e-3" {
        vec![UnitUsage {
            unit: "image".into(),
            measured: 1 + (h >> 30) % 4,
            reserved: 4,
        }]
    } else {
        vec![UnitUsage {
            unit: "token".into(),
            measured: 50 + (h >> 30) % 4_000,
            reserved: if endpoint.starts_with("text") {
                0
            } else {
                4_096
            },
        }]
    };
    UsageEvent {
        // Four gateway instances, each with its random prefix and counter
        // (`proxy::RequestIds`).
        request_id: format!("req_{:08x}{:x}", PREFIXES[(i % 4) as usize], i / 4 + 1),
        account_id: format!("acct-{account:06}"),
        key_id: Some(format!(
            "key_{:016x}",
            account.wrapping_mul(0x2545_F491_4F6C_DD1D)
        )),
        endpoint: endpoint.into(),
        route: if endpoint.starts_with("text") {
            "/v1/embeddings".into()
        } else {
            "/v1/chat/completions".into()
        },
        units,
        credits: 1 + (h >> 40) % 20,
        status: if h % 97 == 0 { 502 } else { 200 },
        degraded: false,
        streamed: h % 3 == 0,
        cut_short: h % 211 == 0,
        started_at: UNIX_EPOCH + Duration::from_millis(ended - 800 - (h >> 45) % 20_000),
        ended_at: UNIX_EPOCH + Duration::from_millis(ended),
        charge: None,
    }
}

/// Record events `range` with `writers` concurrent tasks, each sending
/// batches of [`BATCH`]; returns events per second.
async fn write(
    catalog: &Arc<PostgresCatalog>,
    range: std::ops::Range<u64>,
    writers: u64,
) -> Result<f64, Box<dyn std::error::Error>> {
    let next = Arc::new(AtomicU64::new(range.start));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let (catalog, next, end) = (catalog.clone(), next.clone(), range.end);
        tasks.push(tokio::spawn(async move {
            loop {
                let from = next.fetch_add(BATCH as u64, Ordering::Relaxed);
                if from >= end {
                    return Ok::<_, plangate::catalog::CatalogError>(());
                }
                let batch: Vec<UsageEvent> =
                    (from..end.min(from + BATCH as u64)).map(event).collect();
                catalog.record_usage(&batch).await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok((range.end - range.start) as f64 / start.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = std::env::var("PLANGATE_BENCH_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let events = env_u64("PLANGATE_BENCH_EVENTS", 1_000_000);
    let writers = env_u64("PLANGATE_BENCH_WRITERS", 4).max(1);
    let name = "plangate_usage_bench";
    let (admin, conn) = tokio_postgres::connect(&server, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;
    let base = server.rsplit_once('/').map_or(server.as_str(), |(b, _)| b);
    let url = format!("{base}/{name}");
    migrate(&url).await?;
    let catalog = Arc::new(
        PostgresCatalog::connect_with(
            &url,
            Arc::new(SystemClock),
            PgOptions {
                pool_size: writers as usize,
                listen: false,
                ..PgOptions::default()
            },
        )
        .await?,
    );

    // One writer for the first fifth, then `writers` for the rest.
    let first = events / 5;
    let one = write(&catalog, 0..first, 1).await?;
    println!("write, 1 writer,  batches of {BATCH}: {one:>9.0} events/s ({first} events)");
    let many = write(&catalog, first..events, writers).await?;
    println!(
        "write, {writers} writers, batches of {BATCH}: {many:>9.0} events/s ({} events)",
        events - first
    );
    // A replayed batch inserts nothing and says so.
    let again: Vec<UsageEvent> = (0..BATCH as u64).map(event).collect();
    let t = Instant::now();
    let n = catalog.record_usage(&again).await?;
    println!("replayed batch of {BATCH}: {n} inserted, {:?}", t.elapsed());

    let c = catalog.pool().get().await?;
    c.batch_execute("VACUUM ANALYZE usage_events").await?;
    let row = c
        .query_one(
            "SELECT count(*), pg_total_relation_size('usage_events'),
                    pg_relation_size('usage_events'), pg_indexes_size('usage_events')
             FROM usage_events",
            &[],
        )
        .await?;
    let (rows, total, heap, indexes): (i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    println!(
        "on disk: {rows} events, {} MB in all: {:.0} bytes/event ({:.0} table + {:.0} indexes)",
        total / 1_000_000,
        total as f64 / rows as f64,
        heap as f64 / rows as f64,
        indexes as f64 / rows as f64
    );
    for idx in [
        "usage_events_pkey",
        "usage_events_ended",
        "usage_events_account",
    ] {
        let size: i64 = c
            .query_one("SELECT pg_relation_size($1::text::regclass)", &[&idx])
            .await?
            .get(0);
        println!("  {idx}: {:.0} bytes/event", size as f64 / rows as f64);
    }
    drop(c);

    // Read-outs over the full table.
    let one_account = UsageQuery {
        account_id: Some("acct-000042".into()),
        ..UsageQuery::default()
    };
    let last_day = UsageQuery {
        since: Some(UNIX_EPOCH + Duration::from_millis(END_MS - 86_400_000)),
        ..UsageQuery::default()
    };
    for (label, q, g) in [
        ("summary, one account, by day", &one_account, GroupBy::Day),
        (
            "summary, one account, by endpoint",
            &one_account,
            GroupBy::Endpoint,
        ),
        (
            "summary, all accounts, last day, by hour",
            &last_day,
            GroupBy::Hour,
        ),
        (
            "summary, all accounts, 30 days, by day",
            &UsageQuery::default(),
            GroupBy::Day,
        ),
    ] {
        let t = Instant::now();
        let buckets = catalog.usage_summary(q, g).await?;
        println!("{label}: {} buckets in {:?}", buckets.len(), t.elapsed());
    }
    let t = Instant::now();
    let page = catalog.usage_events(&one_account, None, 100).await?;
    println!(
        "one page of 100 of one account: {} events in {:?}",
        page.len(),
        t.elapsed()
    );
    println!("\nleft in place for the export: {url}");
    Ok(())
}
