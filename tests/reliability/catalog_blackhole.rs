//! A Postgres that accepts and never answers (issue 13 item 9): a hung
//! server or a black-holed network path, switched on under a gateway with
//! warm caches. Every catalog call is bounded by `[storage]
//! catalog_timeout`; what needs the catalog fails closed within it, what
//! does not keeps its normal latency.

use std::sync::Arc;
use std::time::{Duration, Instant};

use plangate::catalog::postgres::{migrate, PostgresCatalog};
use plangate::catalog::Catalog;
use plangate::clock::SystemClock;
use plangate::mock::MockOptions;
use plangate_tests::procs::{Blackhole, GatewayProc, RedisServer, TcpCut};
use plangate_tests::rig::{self, http_client, Resp, Rig, Setup, Tally, REL_ADMIN_TOKEN};

use crate::outages::{bounded, postgres_addr, tally_between, via, Load, MARGIN};
use crate::*;

/// `[storage] catalog_timeout` of this test.
const CATALOG_TIMEOUT: Duration = Duration::from_secs(1);

/// How long the gateway's LISTEN connection takes at most to notice that
/// it hears nothing (its heartbeat: a query every second, 2 s to answer),
/// plus scheduling.
const LISTEN_GIVES_UP: Duration = Duration::from_millis(3_500);

/// Credits one served `paid-model` request costs with `x-mock-tokens: 250`:
/// 1 at admission, 3 per unit (1 per 100 tokens, rounded up).
const PER_PAID_REQUEST: u64 = 4;

fn line(name: &str, t: &Tally, extra: &str) -> String {
    format!("{}{extra}", t.line(&format!("catalog blackhole/{name}")))
}

fn codes(resps: &[Resp]) -> Vec<String> {
    let mut codes: Vec<String> = resps.iter().map(Resp::code).collect();
    codes.sort();
    codes.dedup();
    codes
}

fn tally(resps: &[Resp]) -> Tally {
    let mut t = Tally::default();
    for r in resps {
        t.add(r);
    }
    t
}

/// The median of the latencies of `resps`.
fn p50(resps: &[&Resp]) -> Duration {
    let mut l: Vec<Duration> = resps.iter().map(|r| r.elapsed).collect();
    l.sort();
    l.get(l.len() / 2).copied().unwrap_or_default()
}

/// With the gateway's Postgres path turned into a blackhole (connections
/// kept open, nothing answered, new ones accepted and never answered):
/// an uncached key, a credit endpoint whose wallet is not loaded, `/readyz`
/// and the admin API all answer 503 within `catalog_timeout` (+ margin);
/// cached keys on non-credit endpoints, and a credit endpoint whose wallet
/// is loaded in Redis, keep serving at normal latency, even past every
/// cache TTL and after the LISTEN connection gave up. When the path is
/// restored, everything serves again and every charge decided meanwhile is
/// written exactly once (writes that timed out on the gateway's side and
/// committed later included).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blackhole_postgres_is_bounded_by_catalog_timeout() {
    let _serial = serial().await;
    let Some(db) = plangate_tests::postgres_db("rel_pgbh").await else {
        return;
    };
    // A Redis of its own: the outboxes other test runs leave in a shared
    // one (any gateway writes those it finds) must not count as pending.
    let redis = RedisServer::start();
    migrate(&db).await.expect("migrate");
    let direct = PostgresCatalog::connect(&db, Arc::new(SystemClock))
        .await
        .expect("direct catalog");
    let pg_path = TcpCut::start(postgres_addr(&db).await).await;
    let mock = plangate::mock::start(MockOptions::default())
        .await
        .expect("mock");
    let mut setup = Setup::new(&mock.url());
    setup.postgres_url = Some(via(&db, pg_path.addr));
    setup.redis_url = Some(redis.url());
    setup.store_timeout = "1s".into();
    setup.request_timeout = "5s".into();
    setup.catalog_timeout = Some(format!("{}ms", CATALOG_TIMEOUT.as_millis()));
    let rig = Rig::start(&setup).await;
    let client = http_client();
    let bound = CATALOG_TIMEOUT + MARGIN;

    // A: key cached, wallet loaded. B: key cached, wallet never loaded.
    // C: a key never used (not cached).
    let (a, key_a) = rig.account().await;
    let (b, key_b) = rig.account().await;
    let (_, key_c) = rig.account().await;
    for account in [&a, &b] {
        direct
            .create_quota_block(account, 100, None, serde_json::json!({}))
            .await
            .expect("grant");
    }
    let paid = |key: &str| {
        let (client, addr, key) = (client.clone(), rig.addr, key.to_owned());
        async move {
            bounded(rig::chat(
                &client,
                addr,
                "/v1/chat/completions",
                &key,
                "paid-model",
                &[("x-mock-tokens", "250")],
            ))
            .await
        }
    };
    let free = |key: &str| {
        let (client, addr, key) = (client.clone(), rig.addr, key.to_owned());
        async move {
            bounded(rig::chat(
                &client,
                addr,
                "/v1/chat/completions",
                &key,
                "free-model",
                &[],
            ))
            .await
        }
    };
    assert_eq!(free(&key_a).await.status, 200);
    assert_eq!(free(&key_b).await.status, 200);
    let warm_up = vec![paid(&key_a).await];
    assert_eq!(warm_up[0].status, 200);
    until(Duration::from_secs(5), || async {
        rig.charges_pending() == 0
    })
    .await
    .expect("warm-up charge written");

    // A's cached key on a non-credit endpoint, from before the blackhole
    // to its end.
    let load = Load::start(rig.addr, &key_a, "free-model", 4);
    tokio::time::sleep(Duration::from_millis(300)).await;
    pg_path.blackhole();
    let hole_at = Instant::now();

    // (1) An uncached key.
    let mut uncached = Vec::new();
    for _ in 0..3 {
        uncached.push(free(&key_c).await);
    }
    // (2) A credit endpoint whose wallet is not loaded: fail closed.
    let mut cold = Vec::new();
    for _ in 0..3 {
        cold.push(paid(&key_b).await);
    }
    // A credit endpoint whose wallet is loaded: served from Redis.
    let mut warm = Vec::new();
    for _ in 0..3 {
        warm.push(paid(&key_a).await);
    }
    // (4) Readiness; liveness stays.
    let ready = bounded(rig::get(&client, rig.addr, "/readyz", None)).await;
    let health = bounded(rig::get(&client, rig.addr, "/healthz", None)).await;
    // (5) The admin API: a read and a write.
    let admin_read = bounded(rig::get(
        &client,
        rig.admin_addr,
        &format!("/admin/accounts/{a}"),
        Some(REL_ADMIN_TOKEN),
    ))
    .await;
    let created_during = plangate_tests::harness::unique("rel_bh_new");
    let admin_write = bounded(rig::post_json(
        &client,
        rig.admin_addr,
        "/admin/accounts",
        REL_ADMIN_TOKEN,
        &serde_json::json!({ "id": created_during }),
        &[],
    ))
    .await;

    // (3) Past every cache TTL, and after the LISTEN connection gave up
    // (every cached entry is then due for a reload): cached keys still
    // serve, and so does the loaded wallet.
    let listen_lost = hole_at + LISTEN_GIVES_UP;
    tokio::time::sleep(listen_lost.saturating_duration_since(Instant::now())).await;
    rig.clock.advance(Duration::from_secs(120));
    let mut cached_late = Vec::new();
    for _ in 0..20 {
        cached_late.push(free(&key_b).await);
    }
    let mut warm_late = Vec::new();
    for _ in 0..3 {
        warm_late.push(paid(&key_a).await);
    }
    let records = load.finish().await;
    let restored_at = Instant::now();
    let hole_lasted = restored_at - hole_at;

    let far = Instant::now() + Duration::from_secs(3600);
    let during = tally_between(&records, hole_at, far);
    let during_resps: Vec<&Resp> = records
        .iter()
        .filter(|r| r.sent >= hole_at)
        .map(|r| &r.resp)
        .collect();
    let before: Vec<&Resp> = records
        .iter()
        .filter(|r| r.sent < hole_at)
        .map(|r| &r.resp)
        .collect();
    let (t_uncached, t_cold, t_warm) = (tally(&uncached), tally(&cold), tally(&warm));
    let (t_cached_late, t_warm_late) = (tally(&cached_late), tally(&warm_late));
    eprintln!(
        "{}",
        line(
            "uncached key",
            &t_uncached,
            &format!(" codes={:?}", codes(&uncached))
        )
    );
    eprintln!(
        "{}",
        line(
            "credit endpoint, wallet not loaded",
            &t_cold,
            &format!(" codes={:?}", codes(&cold))
        )
    );
    eprintln!("{}", line("credit endpoint, wallet loaded", &t_warm, ""));
    eprintln!(
        "{}",
        line(
            "credit endpoint, wallet loaded, after LISTEN gave up",
            &t_warm_late,
            ""
        )
    );
    eprintln!(
        "{}",
        line(
            "cached key, non-credit endpoint, throughout",
            &during,
            &format!(
                " p50={:?} (before the blackhole: p50={:?})",
                p50(&during_resps),
                p50(&before)
            )
        )
    );
    eprintln!(
        "{}",
        line(
            "cached key, non-credit endpoint, past every TTL",
            &t_cached_late,
            ""
        )
    );
    eprintln!(
        "FIGURES catalog blackhole/readyz: status={} after {:?} | healthz: status={}",
        ready.status, ready.elapsed, health.status
    );
    eprintln!(
        "FIGURES catalog blackhole/admin API: GET account status={} code={} after {:?} | POST account status={} after {:?} | blackhole lasted {hole_lasted:?}",
        admin_read.status,
        admin_read.code(),
        admin_read.elapsed,
        admin_write.status,
        admin_write.elapsed
    );

    // Back: everything serves again, and every charge is written once.
    pg_path.restore();
    let uncached_back = until(Duration::from_secs(10), || async {
        free(&key_c).await.status == 200
    })
    .await;
    let mut served_b = 0;
    let mut cold_back = None;
    let back_at = Instant::now();
    while back_at.elapsed() < Duration::from_secs(10) {
        if paid(&key_b).await.status == 200 {
            served_b += 1;
            cold_back = Some(back_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ready_back = until(Duration::from_secs(10), || async {
        bounded(rig::get(&client, rig.addr, "/readyz", None))
            .await
            .status
            == 200
    })
    .await;
    let written = until(Duration::from_secs(20), || async {
        rig.charges_pending() == 0
    })
    .await;
    let served_a = [&warm_up, &warm, &warm_late]
        .into_iter()
        .flatten()
        .filter(|r| r.status == 200)
        .count() as u64;
    let mut accounts = Vec::new();
    for (account, served) in [(&a, served_a), (&b, served_b)] {
        let ledger = direct.ledger(account).await.expect("ledger");
        let net: u64 = ledger.iter().map(|e| e.deducted - e.refunded).sum();
        let balance = direct.balance(account).await.expect("balance");
        accounts.push((
            served,
            PER_PAID_REQUEST * served,
            net,
            100 - balance,
            ledger.len(),
        ));
    }
    let committed_later = direct.get_account(&created_during).await.is_ok();
    eprintln!(
        "FIGURES catalog blackhole/restored: uncached key served after {uncached_back:?}, cold wallet after {cold_back:?}, ready after {ready_back:?}, charges written after {written:?}; per account (served, expected net, ledger net, balance spent, ledger rows): A={:?} B={:?}; account created by the timed-out admin POST exists afterwards: {committed_later}",
        accounts[0], accounts[1]
    );

    // (1) Uncached key: 503 catalog_unavailable within the timeout.
    assert_eq!(t_uncached.status(503), 3, "{t_uncached:?}");
    assert_eq!(codes(&uncached), ["catalog_unavailable"]);
    assert!(t_uncached.max_latency <= bound, "{t_uncached:?}");
    // (2) Credits fail closed within the timeout when the wallet must be
    // loaded ...
    assert_eq!(t_cold.status(503), 3, "{t_cold:?}");
    assert_eq!(codes(&cold), ["catalog_unavailable"]);
    assert!(t_cold.max_latency <= bound, "{t_cold:?}");
    // ... and serve from a loaded wallet, even once the LISTEN connection
    // has given up.
    for t in [&t_warm, &t_warm_late] {
        assert_eq!(t.status(200), 3, "{t:?}");
        assert!(t.max_latency < CATALOG_TIMEOUT, "{t:?}");
    }
    // (3) Cached keys on non-credit endpoints: every request served, none
    // waiting for the catalog.
    assert!(during.sent() > 20, "{during:?}");
    assert_eq!(during.admitted(), during.sent(), "{during:?}");
    assert!(during.max_latency < CATALOG_TIMEOUT, "{during:?}");
    assert_eq!(t_cached_late.status(200), 20, "{t_cached_late:?}");
    assert!(
        t_cached_late.max_latency < CATALOG_TIMEOUT,
        "{t_cached_late:?}"
    );
    // (4) Not ready, within the timeout; alive.
    assert_eq!(ready.status, 503);
    assert!(ready.elapsed <= bound, "{:?}", ready.elapsed);
    assert_eq!(health.status, 200);
    // (5) The admin API answers 503 within the timeout.
    assert_eq!(admin_read.status, 503);
    assert_eq!(admin_read.code(), "catalog_unavailable");
    assert!(admin_read.elapsed <= bound, "{:?}", admin_read.elapsed);
    assert_eq!(admin_write.status, 503);
    assert!(admin_write.elapsed <= bound, "{:?}", admin_write.elapsed);
    // Recovery, and no charge lost or doubled.
    assert!(uncached_back.is_some(), "uncached key served after restore");
    assert!(cold_back.is_some(), "wallet loaded after restore");
    assert!(ready_back.is_some(), "ready after restore");
    assert!(written.is_some(), "charges written after restore");
    for (served, expected, net, spent, _) in &accounts {
        assert!(*served > 0);
        assert_eq!((net, spent), (expected, expected), "{accounts:?}");
    }
}

/// `plangate serve` whose Postgres accepts connections and never answers
/// from the start: it starts (not ready) after a few `catalog_timeout`s
/// — connecting and loading plans each give up after one — and then
/// answers what needs the catalog with 503 within the timeout, instead of
/// waiting for the pool's connection attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_starts_against_a_blackholed_postgres() {
    let _serial = serial().await;
    if plangate_tests::postgres_db("rel_pgbh_probe")
        .await
        .is_none()
    {
        return;
    }
    let hole = Blackhole::start().await;
    let redis = RedisServer::start();
    let mock = plangate::mock::start(MockOptions::default())
        .await
        .expect("mock");
    let mut setup = Setup::new(&mock.url());
    setup.postgres_url = Some(format!("postgres://postgres@{}/plangate", hole.addr));
    setup.redis_url = Some(redis.url());
    setup.catalog_timeout = Some(format!("{}ms", CATALOG_TIMEOUT.as_millis()));
    let start = Instant::now();
    let mut gw = GatewayProc::spawn(&setup.write(), &[]);
    let started = start.elapsed();
    let client = http_client();
    let bound = CATALOG_TIMEOUT + MARGIN;
    let key = format!("pg_{}", "a".repeat(43));
    let chat = bounded(rig::chat(
        &client,
        gw.main,
        "/v1/chat/completions",
        &key,
        "free-model",
        &[],
    ))
    .await;
    let ready = bounded(rig::get(&client, gw.main, "/readyz", None)).await;
    let admin = bounded(rig::get(
        &client,
        gw.admin.expect("admin listener"),
        "/admin/plans",
        Some(REL_ADMIN_TOKEN),
    ))
    .await;
    eprintln!(
        "FIGURES catalog blackhole/from the start: listening after {started:?}; a request: status={} code={} after {:?}; readyz: status={} after {:?}; admin GET /admin/plans: status={} after {:?}",
        chat.status,
        chat.code(),
        chat.elapsed,
        ready.status,
        ready.elapsed,
        admin.status,
        admin.elapsed
    );
    // Connecting, loading plans and the first store probe: one timeout
    // each at most (the plans file is applied in the background once
    // Postgres answers), plus the process start.
    assert!(
        started < CATALOG_TIMEOUT * 3 + Duration::from_secs(2),
        "{started:?}"
    );
    assert_eq!(
        (chat.status.as_u16(), chat.code().as_str()),
        (503, "catalog_unavailable")
    );
    assert!(chat.elapsed <= bound, "{:?}", chat.elapsed);
    assert_eq!(ready.status, 503);
    assert!(ready.elapsed <= bound, "{:?}", ready.elapsed);
    assert_eq!(admin.status, 503);
    assert!(admin.elapsed <= bound, "{:?}", admin.elapsed);
    assert!(gw.alive());
}
