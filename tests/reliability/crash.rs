//! `kill -9` of a gateway under load, then a restart: every request whose
//! response the client received in full is charged exactly once, and no
//! request is charged that the upstream never served — also when Postgres
//! is down at the moment of the crash (issue 12, durable settlement).
//!
//! Correlation is by the gateway's own request id: clients send none, so
//! the `x-request-id` of each response is the id the ledger rows carry,
//! and the mock upstream records the ids it received.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use plangate::catalog::Catalog;
use plangate::mock::MockOptions;
use plangate_tests::procs::{GatewayProc, TcpCut};
use plangate_tests::rig::{self, http_client, Setup};

use crate::*;

/// What a client saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    status: u16,
    /// The whole body arrived (a stream up to its end).
    complete: bool,
}

/// Requests in a loop from `clients` tasks (half of them streaming) until
/// `stop`; every answer by the gateway's request id.
async fn load(
    addr: std::net::SocketAddr,
    key: String,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> HashMap<String, Seen> {
    let client = http_client();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (client, key, stop) = (client.clone(), key.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let stream = c % 2 == 0;
                let headers: &[(&str, &str)] = if stream {
                    &[
                        ("x-mock-tokens", "250"),
                        ("x-mock-chunks", "10"),
                        ("x-mock-chunk-delay-ms", "20"),
                    ]
                } else {
                    &[("x-mock-tokens", "250"), ("x-mock-delay-ms", "30")]
                };
                let body = rig::chat_body("paid-model", stream);
                let r = rig::post_json(&client, addr, "/v1/chat/completions", &key, &body, headers)
                    .await;
                let Some(id) = r.header("x-request-id").map(str::to_owned) else {
                    // No head: the gateway is gone.
                    if r.status.as_u16() == 599 {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    continue;
                };
                let complete = !r.body_error
                    && (!stream || memchr::memmem::find(&r.body, b"[DONE]").is_some());
                seen.push((
                    id,
                    Seen {
                        status: r.status.as_u16(),
                        complete,
                    },
                ));
            }
            seen
        }));
    }
    let mut out = HashMap::new();
    for t in tasks {
        out.extend(t.await.expect("client task"));
    }
    out
}

/// One crash: load, (Postgres cut,) kill -9, (Postgres back,) restart,
/// wait for the outbox to be written, check the ledger.
async fn crash_case(postgres_down: bool, spool: bool) {
    let Some(redis) = plangate_tests::redis().await else {
        return;
    };
    let Some((pg, cat)) = fresh_catalog("rel_crash").await else {
        return;
    };
    let cut = TcpCut::start(crate::outages::postgres_addr(&pg).await).await;
    let mock = plangate::mock::start(MockOptions::default())
        .await
        .expect("mock");
    let mut setup = Setup::new(&mock.url());
    // Short leases: the dead gateway's admissions are reaped soon after.
    setup.plans = setup.plans.replace(
        "concurrency_expiry: 30s\n        credits",
        "concurrency_expiry: 2s\n        credits",
    );
    assert!(setup.plans.contains("concurrency_expiry: 2s"));
    setup.postgres_url = Some(crate::outages::via(&pg, cut.addr));
    if spool {
        // In-process counters, their outbox kept in a spool file next to
        // the config (the restart reads the same file).
        setup.spool = Some("outbox.spool".into());
    } else {
        setup.redis_url = Some(redis);
    }
    setup.store_timeout = "2s".into();
    setup.request_timeout = "20s".into();
    let config = setup.write();
    let (account, key) = account_with_key(&*cat, "crash").await;
    cat.create_quota_block(&account, 1_000_000, None, serde_json::json!({}))
        .await
        .expect("grant");

    let mut a = GatewayProc::spawn(&config, &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let running = tokio::spawn(load(a.main, key.clone(), 24, stop.clone()));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    if postgres_down {
        cut.cut();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    a.kill9();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    let seen = running.await.expect("load");
    if postgres_down {
        cut.restore();
    }
    // The restart finds what `a` decided and did not write.
    let mut b = GatewayProc::spawn(&config, &[]);
    // The dead gateway's unended admissions are refunded once its
    // heartbeat and their leases have run out (10 s, 2 s), by the reaper
    // (every 5 s), and everything is written.
    let written = until(Duration::from_secs(40), || async {
        // The outbox first, then the ledger: read the other way round, a
        // batch committed between the two reads (the ledger read before
        // it, the outbox after its acknowledgement) looked written and
        // clean while its unserved admission charges were not yet refunded.
        if !spool && outbox_len(&account).await != Some(0) {
            return false;
        }
        let ledger = cat.ledger(&account).await.unwrap_or_default();
        let unserved = ledger
            .iter()
            .filter(|e| e.deducted > e.refunded)
            .filter(|e| {
                !e.request_id
                    .as_deref()
                    .is_some_and(|id| mock.stats().saw_request_id(id))
            })
            .count();
        // With the spool the restart refunds unended admissions at once;
        // wait for every full response's charges to be written too.
        let complete = !spool || {
            let rows: HashMap<&str, _> = ledger
                .iter()
                .map(|e| (e.idempotency_key.as_str(), e))
                .collect();
            seen.iter()
                .filter(|(_, s)| s.status == 200 && s.complete)
                .all(|(id, _)| charges(&rows, id) == (true, true))
        };
        unserved == 0 && complete
    })
    .await;

    let ledger = cat.ledger(&account).await.expect("ledger");
    let rows: HashMap<&str, _> = ledger
        .iter()
        .map(|e| (e.idempotency_key.as_str(), e))
        .collect();
    let full: Vec<&String> = seen
        .iter()
        .filter(|(_, s)| s.status == 200 && s.complete)
        .map(|(id, _)| id)
        .collect();
    let mut missing_adm = 0;
    let mut missing_use = 0;
    for id in &full {
        let (admission, units) = charges(&rows, id);
        missing_adm += usize::from(!admission);
        missing_use += usize::from(!units);
    }
    let charged_unserved = ledger
        .iter()
        .filter(|e| e.deducted > e.refunded)
        .filter(|e| {
            !e.request_id
                .as_deref()
                .is_some_and(|id| mock.stats().saw_request_id(id))
        })
        .count();
    let cut_short = seen.values().filter(|s| !s.complete).count();
    eprintln!(
        "FIGURES crash postgres_down={postgres_down} spool={spool}: answered={} in_full={} cut_short={cut_short} ledger_rows={} missing_admission_charges={missing_adm} missing_unit_charges={missing_use} charged_but_never_served={charged_unserved} | outbox written after restart in {written:?}",
        seen.len(),
        full.len(),
        ledger.len(),
    );
    assert!(written.is_some(), "the restarted gateway wrote the outbox");
    assert!(
        full.len() > 20,
        "enough load before the crash: {}",
        full.len()
    );
    assert_eq!(
        missing_adm, 0,
        "every response received in full was charged at admission"
    );
    assert_eq!(
        missing_use, 0,
        "every response received in full was charged its units"
    );
    assert_eq!(
        charged_unserved, 0,
        "nothing charged that the upstream never saw"
    );
    // Each row once (the ledger key is unique); nothing else was charged
    // than admissions and the units of requests the upstream served.
    assert!(ledger.iter().all(|e| ["req:", "adm:", "use:"]
        .iter()
        .any(|p| e.idempotency_key.starts_with(p))));
    assert!(b.alive());
}

/// Whether request `id` was charged its admission (1 credit) and its
/// units: one ledger row `req:<id>` with both, or (the wallet dropped
/// between admission and end) `adm:<id>` and `use:<id>`.
fn charges(rows: &HashMap<&str, &plangate::catalog::LedgerEntry>, id: &str) -> (bool, bool) {
    if let Some(e) = rows.get(format!("req:{id}").as_str()) {
        return (
            e.refunded == 0 && e.deducted >= 1,
            e.refunded == 0 && e.deducted > 1,
        );
    }
    let admission = rows
        .get(format!("adm:{id}").as_str())
        .is_some_and(|e| e.deducted == 1 && e.refunded == 0);
    let units = rows
        .get(format!("use:{id}").as_str())
        .is_some_and(|e| e.deducted > 0);
    (admission, units)
}

/// `XLEN` of the account's outbox (default key prefix).
async fn outbox_len(account: &str) -> Option<u64> {
    let url = plangate_tests::redis().await?;
    let client = redis::Client::open(url.as_str()).ok()?;
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    let key = plangate::limiter::keys::Keys::default().outbox(account);
    redis::cmd("XLEN")
        .arg(key)
        .query_async::<u64>(&mut conn)
        .await
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_under_load_charges_what_was_served_once() {
    let _serial = serial().await;
    crash_case(false, false).await;
}

/// The same with in-process counters whose outbox is kept in a spool file
/// (`[storage] spool`), Postgres down at the crash so that nothing decided
/// since the cut reached the catalog: the restart replays the spool, loses
/// nothing and refunds the admissions of requests that never ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_with_in_process_counters_and_a_spool_charges_what_was_served_once() {
    let _serial = serial().await;
    crash_case(true, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_with_postgres_down_charges_what_was_served_once() {
    let _serial = serial().await;
    crash_case(true, false).await;
}

/// Graceful shutdown waits for settlements still waiting on the counter
/// store, then writes what they recorded: a streamed request (no credits:
/// its settlement runs after the last byte) ends while Redis is
/// black-holed, the gateway gets SIGTERM, Redis comes back a second
/// later — and the request's usage record is in the catalog after the
/// exit. (Before the background executor, a settlement's first attempt
/// was an uncounted task: the drain found nothing pending and exited.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_waits_for_settlements_stuck_on_redis() {
    let _serial = serial().await;
    let Some(redis) = plangate_tests::redis().await else {
        return;
    };
    let Some((pg, cat)) = fresh_catalog("rel_drain").await else {
        return;
    };
    let redis_addr: std::net::SocketAddr = redis
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .parse()
        .expect("redis URL is redis://host:port");
    let cut = TcpCut::start(redis_addr).await;
    let mock = plangate::mock::start(MockOptions::default())
        .await
        .expect("mock");
    let mut setup = Setup::new(&mock.url());
    setup.postgres_url = Some(pg);
    setup.redis_url = Some(format!("redis://{}", cut.addr));
    setup.store_timeout = "5s".into();
    setup.request_timeout = "20s".into();
    let config = setup.write();
    let (account, key) = account_with_key(&*cat, "drain").await;

    let mut gw = GatewayProc::spawn(&config, &[]);
    let client = http_client();
    let warm = rig::post_json(
        &client,
        gw.main,
        "/v1/chat/completions",
        &key,
        &rig::chat_body("free-model", false),
        &[],
    )
    .await;
    assert_eq!(warm.status.as_u16(), 200, "{:?}", warm.body);

    // A stream of 6 chunks, 100 ms apart: admitted at once; Redis goes
    // dark while it streams, so its end waits.
    let streaming = {
        let (client, key, addr) = (client.clone(), key.clone(), gw.main);
        tokio::spawn(async move {
            rig::post_json(
                &client,
                addr,
                "/v1/chat/completions",
                &key,
                &rig::chat_body("free-model", true),
                &[
                    ("x-mock-tokens", "120"),
                    ("x-mock-chunks", "6"),
                    ("x-mock-chunk-delay-ms", "100"),
                ],
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(250)).await;
    cut.blackhole();
    let streamed = streaming.await.expect("stream");
    assert_eq!(streamed.status.as_u16(), 200);
    assert!(memchr::memmem::find(&streamed.body, b"[DONE]").is_some());
    let id = streamed
        .header("x-request-id")
        .expect("x-request-id")
        .to_owned();

    let stopping = tokio::task::spawn_blocking(move || {
        let exited = gw.terminate();
        (exited, gw.log())
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    cut.restore();
    let (exited, log) = stopping.await.expect("terminate");
    assert!(exited, "the gateway exits on SIGTERM:\n{log}");

    let q = plangate::catalog::UsageQuery {
        account_id: Some(account.clone()),
        ..Default::default()
    };
    let events = cat.usage_events(&q, None, 100).await.expect("usage");
    assert!(
        events.iter().any(|e| e.request_id == id),
        "the settlement stuck on Redis at SIGTERM was waited for and its usage record written ({} events):\n{log}",
        events.len()
    );
    assert!(log.contains("requests settled"), "{log}");
}
