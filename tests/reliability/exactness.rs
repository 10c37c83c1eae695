//! Exactness across two `plangate serve` processes sharing Postgres and
//! Redis: window limits and credits admit exactly their limit.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use plangate::catalog::Catalog;
use plangate::mock::MockOptions;
use plangate_tests::procs::GatewayProc;
use plangate_tests::rig::{self, http_client, Setup, Tally};

use crate::*;

/// Fire `n` requests at once, alternating between `addrs`.
async fn burst(
    addrs: &[std::net::SocketAddr],
    n: usize,
    key: &str,
    model: &str,
) -> (Tally, Vec<Tally>) {
    let client = http_client();
    let start = Arc::new(tokio::sync::Barrier::new(n));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (client, start) = (client.clone(), start.clone());
        let which = i % addrs.len();
        let addr = addrs[which];
        let (key, model) = (key.to_owned(), model.to_owned());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let r = rig::chat(&client, addr, "/v1/chat/completions", &key, &model, &[]).await;
            (which, r)
        }));
    }
    let mut all = Tally::default();
    let mut per = vec![Tally::default(); addrs.len()];
    for t in tasks {
        let (which, r) = t.await.expect("request task");
        all.add(&r);
        per[which].add(&r);
    }
    (all, per)
}

/// One request on another endpoint through each process, so that both
/// have the key and the account cached when the burst starts: on a loaded
/// machine a process still reading them from Postgres could otherwise see
/// the other admit the whole limit first (the check that both admitted
/// some failed so once in CI).
async fn warm(addrs: &[std::net::SocketAddr], key: &str) {
    let client = http_client();
    for &addr in addrs {
        let r = rig::chat(
            &client,
            addr,
            "/v1/chat/completions",
            key,
            "free-model",
            &[],
        )
        .await;
        assert_eq!(r.status, 200, "warm-up: {:?}", r.body);
    }
}

/// Two `plangate serve` processes on one Postgres database and one Redis:
/// 400 concurrent requests against 100/day admit exactly 100; 150
/// concurrent requests against 70 credits in two blocks admit exactly 70,
/// leave the balance at 0 and the ledger summing to 70.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exact_across_two_gateway_processes() {
    let _serial = serial().await;
    let Some(redis) = plangate_tests::redis().await else {
        return;
    };
    let Some((pg, cat)) = fresh_catalog("rel_exact").await else {
        return;
    };
    let mock = plangate::mock::start(MockOptions::default())
        .await
        .expect("mock");
    let mut setup = Setup::new(&mock.url());
    setup.postgres_url = Some(pg);
    setup.redis_url = Some(redis);
    setup.store_timeout = "2s".into();
    setup.request_timeout = "20s".into();
    let config = setup.write();
    let mut a = GatewayProc::spawn(&config, &[]);
    let mut b = GatewayProc::spawn(&config, &[]);
    let addrs = [a.main, b.main];

    // Window limit: retried once with a new account should the UTC day
    // change under the burst (the counters would then legitimately split).
    let mut attempt = 0;
    let (all, per) = loop {
        attempt += 1;
        let (_, key) = account_with_key(&*cat, "exact").await;
        warm(&addrs, &key).await;
        let day = day_now();
        let out = burst(&addrs, 400, &key, "exact-model").await;
        if day == day_now() || attempt == 2 {
            break out;
        }
    };
    eprintln!(
        "{} | per process admitted: {} + {} | over-admitted={}",
        all.line("exact/window 400 vs 100/day, 2 processes"),
        per[0].admitted(),
        per[1].admitted(),
        all.admitted().saturating_sub(100)
    );
    assert_eq!(all.sent(), 400);
    assert_eq!(all.admitted(), 100, "exactly the limit admitted: {all:?}");
    assert_eq!(all.denied(), 300, "every other request denied: {all:?}");
    assert!(
        per[0].admitted() > 0 && per[1].admitted() > 0,
        "both processes admitted some: {per:?}"
    );

    // Credits: 70 in two blocks with different expiries.
    let (account, key) = account_with_key(&*cat, "credits").await;
    let soon = SystemTime::now() + Duration::from_secs(86_400);
    cat.create_quota_block(&account, 30, Some(soon), serde_json::json!({}))
        .await
        .expect("block 30");
    cat.create_quota_block(&account, 40, None, serde_json::json!({}))
        .await
        .expect("block 40");
    warm(&addrs, &key).await;
    let requests_before = mock.requests();
    let (all, per) = burst(&addrs, 150, &key, "paid-exact").await;
    let forwarded = mock.requests() - requests_before;
    // The charges reach the catalog from the counter store's outbox.
    until(Duration::from_secs(10), || async {
        cat.balance(&account).await.ok() == Some(0)
            && cat.ledger(&account).await.map_or(0, |l| l.len()) == 70
    })
    .await;
    let balance = cat.balance(&account).await.expect("balance");
    let ledger = cat.ledger(&account).await.expect("ledger");
    let charged: u64 = ledger.iter().map(|e| e.deducted - e.refunded).sum();
    let charged_rows = ledger.iter().filter(|e| e.deducted > 0).count();
    let blocks = cat.list_quota_blocks(&account).await.expect("blocks");
    eprintln!(
        "{} | per process admitted: {} + {} | forwarded={forwarded} balance={balance} ledger_sum={charged} ledger_rows_charged={charged_rows} over-admitted={} charges lost={} doubled={}",
        all.line("exact/credits 150 vs 70 credits, 2 processes"),
        per[0].admitted(),
        per[1].admitted(),
        all.admitted().saturating_sub(70),
        70u64.saturating_sub(charged),
        charged.saturating_sub(all.admitted()),
    );
    assert_eq!(all.admitted(), 70, "exactly the balance admitted: {all:?}");
    assert_eq!(all.status(429), 80, "the rest refused: {all:?}");
    assert_eq!(forwarded, 70, "only admitted requests reach the upstream");
    assert_eq!(balance, 0);
    assert_eq!(charged, 70, "ledger sums to the credits spent");
    assert_eq!(charged_rows, 70, "one ledger row per admitted request");
    assert!(ledger.iter().all(|e| e.deducted <= 1 && e.refunded == 0));
    assert!(
        blocks.iter().all(|b| b.credits_remaining == 0),
        "{blocks:?}"
    );

    assert!(a.alive() && b.alive(), "gateways still running");
}
