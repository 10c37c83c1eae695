//! Reliability and security tests (issue 6; SPEC §4, §5, §9): exactness
//! across gateway processes, store outages, upstream and client faults,
//! hostile input, and secrets kept out of logs.
//!
//! Outages are made on private servers only: a `redis-server` of our own on
//! a free port, and a cuttable TCP proxy in front of the shared Postgres.
//! Every test prints `FIGURES` lines (requests sent, admitted, denied,
//! errored, over-admitted, charges lost/doubled, time to recover); they are
//! collected in docs/RELIABILITY.md. Run them alone with
//! `cargo test -p plangate-tests --test reliability -- --nocapture`.
//!
//! This is a test binary of its own, and its tests take [`serial`] first:
//! they load the machine on purpose (hundreds of connections, gateway
//! processes), and their timing assertions must measure the gateway, not
//! neighbouring tests.

mod catalog_blackhole;
mod crash;
mod exactness;
mod faults;
mod hostile;
mod logs;
mod outages;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use plangate::catalog::postgres::{migrate, PostgresCatalog};
use plangate::catalog::Catalog;
use plangate::clock::SystemClock;
use plangate::mock::MockOptions;
use plangate_tests::rig::{self, Rig, Setup};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Run one reliability test at a time (held for the whole test).
pub(crate) async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

/// The UTC day index now (day-long windows roll over at its change).
pub(crate) fn day_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        / 86_400
}

/// A fresh migrated database and a catalog on it (real clock).
pub(crate) async fn fresh_catalog(prefix: &str) -> Option<(String, Arc<PostgresCatalog>)> {
    let url = plangate_tests::postgres_db(prefix).await?;
    migrate(&url).await.expect("migrate");
    let cat = PostgresCatalog::connect(&url, Arc::new(SystemClock))
        .await
        .expect("catalog");
    Some((url, Arc::new(cat)))
}

pub(crate) async fn account_with_key(cat: &dyn Catalog, prefix: &str) -> (String, String) {
    let id = plangate_tests::harness::unique(prefix);
    cat.create_account(&id, None, serde_json::json!({}))
        .await
        .expect("account");
    let key = cat.create_key(&id).await.expect("key");
    (id, key.key)
}

/// Poll `f` every 10 ms until it is true or `limit` passes; returns the
/// time it took.
pub(crate) async fn until<F, Fut>(limit: Duration, mut f: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() <= limit {
        if f().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// A rig on the real stores (shared Redis, fresh database) whose account
/// has `credits`; returns (rig, account, key, mock).
pub(crate) async fn real_rig(
    prefix: &str,
    credits: u64,
    tune: impl FnOnce(&mut Setup),
) -> Option<(Rig, String, String, plangate::mock::MockHandle)> {
    let redis = plangate_tests::redis().await?;
    let db = plangate_tests::postgres_db(prefix).await?;
    migrate(&db).await.expect("migrate");
    let mock = plangate::mock::start(MockOptions::default())
        .await
        .expect("mock");
    let mut setup = Setup::new(&mock.url());
    setup.postgres_url = Some(db);
    setup.redis_url = Some(redis);
    setup.store_timeout = "1s".into();
    tune(&mut setup);
    let rig = Rig::start(&setup).await;
    let (account, key) = rig.account().await;
    if credits > 0 {
        rig.core
            .catalog
            .create_quota_block(&account, credits, None, serde_json::json!({}))
            .await
            .expect("grant");
    }
    Some((rig, account, key, mock))
}

/// Tokens counted in the current token window of (account, endpoint).
pub(crate) async fn tokens_used(rig: &Rig, account: &str, endpoint: &str) -> u64 {
    let plans = rig.core.cache.plans();
    let policy = plans.plans["rel"]
        .policy(endpoint)
        .expect("endpoint")
        .clone();
    let info = rig
        .core
        .limiter
        .info(account, endpoint, &policy)
        .await
        .expect("info");
    info.windows
        .iter()
        .find(|w| w.unit.as_str() == "token")
        .map(|w| w.used)
        .unwrap_or(0)
}

/// Wait for settlement (in-flight gauge 0 and no pending charge) and
/// report how long it took and whether the concurrency slot is free.
pub(crate) async fn settle_report(rig: &Rig, account: &str, endpoint: &str) -> (Duration, u32) {
    let took = until(Duration::from_secs(5), || async {
        rig.core.metrics.in_flight() == 0 && rig.charges_pending() == 0
    })
    .await
    .expect("request settled within 5 s");
    (took, rig.slots_in_use(account, endpoint).await)
}

/// A raw HTTP/1.1 chat request (so the client can vanish at will).
pub(crate) fn raw_chat(key: &str, model: &str, stream: bool, extra: &str) -> Vec<u8> {
    let body = rig::chat_body(model, stream).to_string();
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Admin `/metrics` value of the in-flight gauge.
pub(crate) async fn metrics_in_flight(
    client: &rig::HttpClient,
    admin: std::net::SocketAddr,
) -> Option<u64> {
    let r = rig::get(client, admin, "/metrics", Some(rig::REL_ADMIN_TOKEN)).await;
    String::from_utf8_lossy(&r.body)
        .lines()
        .find_map(|l| l.strip_prefix("plangate_in_flight_requests "))
        .and_then(|v| v.trim().parse().ok())
}

/// A short soak (the 10-minute one is `tests/soak.sh`): mixed traffic
/// leaves RSS flat, nothing in flight, every Redis key with a TTL, and the
/// ledger equal to the credits spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn short_soak_of_mixed_traffic() {
    let _serial = serial().await;
    if plangate_tests::postgres_db("soakprobe").await.is_none() {
        return;
    }
    let report =
        plangate_tests::soak::run(Duration::from_secs(15), 8, Duration::from_secs(1)).await;
    eprintln!("{}", report.summary());
    let failures = report.failures();
    assert!(failures.is_empty(), "{failures:?}");
}
