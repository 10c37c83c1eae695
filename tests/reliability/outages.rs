//! Store outages: Redis killed, paused or a blackhole; Postgres cut.

use std::sync::Arc;
use std::time::{Duration, Instant};

use plangate::catalog::postgres::{migrate, PostgresCatalog};
use plangate::catalog::Catalog;
use plangate::clock::SystemClock;
use plangate::mock::MockOptions;
use plangate_tests::procs::{Blackhole, GatewayProc, RedisServer, TcpCut};
use plangate_tests::rig::{self, http_client, Resp, Rig, Setup, Tally};

use crate::*;

/// One request of a [`Load`]: when it was sent and what came back.
pub(crate) struct Rec {
    pub(crate) sent: Instant,
    pub(crate) resp: Resp,
}

/// Requests sent back to back by `concurrency` loops until stopped.
pub(crate) struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    records: Arc<parking_lot::Mutex<Vec<Rec>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub(crate) fn start(
        addr: std::net::SocketAddr,
        key: &str,
        model: &str,
        concurrency: usize,
    ) -> Load {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let records: Arc<parking_lot::Mutex<Vec<Rec>>> = Arc::default();
        let client = http_client();
        let tasks = (0..concurrency)
            .map(|_| {
                let (stop, records, client) = (stop.clone(), records.clone(), client.clone());
                let (key, model) = (key.to_owned(), model.to_owned());
                tokio::spawn(async move {
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        let sent = Instant::now();
                        let resp = bounded(rig::chat(
                            &client,
                            addr,
                            "/v1/chat/completions",
                            &key,
                            &model,
                            &[],
                        ))
                        .await;
                        records.lock().push(Rec { sent, resp });
                    }
                })
            })
            .collect();
        Load {
            stop,
            records,
            tasks,
        }
    }

    pub(crate) async fn finish(self) -> Vec<Rec> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for t in self.tasks {
            let _ = t.await;
        }
        std::mem::take(&mut *self.records.lock())
    }
}

/// How long a test waits for one answer before counting it as none
/// (status 599): a gateway waiting on a store that never answers would
/// otherwise hang the test.
pub(crate) const GIVE_UP: Duration = Duration::from_secs(10);

/// `request`, or a 599 after [`GIVE_UP`].
pub(crate) async fn bounded(request: impl std::future::Future<Output = Resp>) -> Resp {
    let start = Instant::now();
    match tokio::time::timeout(GIVE_UP, request).await {
        Ok(resp) => resp,
        Err(_) => Resp {
            status: http::StatusCode::from_u16(599).expect("599"),
            headers: http::HeaderMap::new(),
            body: bytes::Bytes::new(),
            body_error: true,
            elapsed: start.elapsed(),
        },
    }
}

/// Tally of the records sent in `[from, to)`.
pub(crate) fn tally_between(recs: &[Rec], from: Instant, to: Instant) -> Tally {
    let mut t = Tally::default();
    for r in recs.iter().filter(|r| r.sent >= from && r.sent < to) {
        t.add(&r.resp);
    }
    t
}

/// How long after `from` the first request was sent from which on every
/// request sent was `healthy`; `None` if the last one was not.
fn recovery_after(
    recs: &[Rec],
    from: Instant,
    healthy: impl Fn(&Resp) -> bool,
) -> Option<Duration> {
    let mut after: Vec<&Rec> = recs.iter().filter(|r| r.sent >= from).collect();
    after.sort_by_key(|r| r.sent);
    let last_bad = after.iter().rposition(|r| !healthy(&r.resp));
    match last_bad {
        None => Some(Duration::ZERO),
        Some(i) if i + 1 < after.len() => Some(after[i + 1].sent - from),
        Some(_) => None,
    }
}

fn healthy_open(r: &Resp) -> bool {
    r.status == 200 && r.header("x-ratelimit-degraded").is_none()
}

fn healthy_closed(r: &Resp) -> bool {
    r.status == 200
}

/// `n` sequential requests for `small-model` (5 per day): how many passed,
/// and whether any was marked degraded.
async fn enforce_check(addr: std::net::SocketAddr, key: &str, n: usize) -> Tally {
    let client = http_client();
    let mut t = Tally::default();
    for _ in 0..n {
        let r = rig::chat(
            &client,
            addr,
            "/v1/chat/completions",
            key,
            "small-model",
            &[],
        )
        .await;
        t.add(&r);
    }
    t
}

/// Store timeout of the outage tests, and the margin a request may take
/// beyond it (upstream round trip and scheduling on a busy 2-core CI box).
/// Long enough that a healthy Redis on a loaded 2-core box (builds
/// running beside the tests) does not time out before the outage: at 100 ms
/// one request in ~200 did.
const STORE_TIMEOUT: Duration = Duration::from_millis(250);
pub(crate) const MARGIN: Duration = Duration::from_millis(400);

struct RedisOutageRig {
    redis: RedisServer,
    open: GatewayProc,
    closed: GatewayProc,
    cat: Arc<PostgresCatalog>,
    _mock: plangate::mock::MockHandle,
}

async fn redis_outage_rig(redis_url: Option<String>) -> Option<RedisOutageRig> {
    let (pg, cat) = fresh_catalog("rel_redis").await?;
    let redis = RedisServer::start();
    let mock = plangate::mock::start(MockOptions::default())
        .await
        .expect("mock");
    let mut setup = Setup::new(&mock.url());
    setup.postgres_url = Some(pg);
    setup.redis_url = Some(redis_url.unwrap_or_else(|| redis.url()));
    setup.store_timeout = format!("{}ms", STORE_TIMEOUT.as_millis());
    setup.on_store_error = "open".into();
    let open = GatewayProc::spawn(&setup.write(), &[]);
    setup.on_store_error = "closed".into();
    let closed = GatewayProc::spawn(&setup.write(), &[]);
    Some(RedisOutageRig {
        redis,
        open,
        closed,
        cat,
        _mock: mock,
    })
}

/// Drive both gateways through one outage made by `break_it` and ended by
/// `mend_it`; assert the SPEC §9 behaviour and print the figures.
async fn redis_outage_phase(
    rig: &mut RedisOutageRig,
    name: &str,
    break_it: impl FnOnce(&mut RedisServer),
    mend_it: impl FnOnce(&mut RedisServer),
    recovery_bound: Duration,
) {
    let (_, key_open) = account_with_key(&*rig.cat, "ro").await;
    let (_, key_closed) = account_with_key(&*rig.cat, "rc").await;
    // Warm caches and connections: the figures are about the outage.
    let client = http_client();
    for (gw, key) in [(&rig.open, &key_open), (&rig.closed, &key_closed)] {
        for _ in 0..3 {
            rig::chat(
                &client,
                gw.main,
                "/v1/chat/completions",
                key,
                "free-model",
                &[],
            )
            .await;
        }
    }
    let load_open = Load::start(rig.open.main, &key_open, "free-model", 8);
    let load_closed = Load::start(rig.closed.main, &key_closed, "free-model", 8);
    tokio::time::sleep(Duration::from_millis(400)).await;

    let broken = Instant::now();
    break_it(&mut rig.redis);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mended_start = Instant::now();
    mend_it(&mut rig.redis);
    let mended = Instant::now();
    // Keep the load on long enough to see recovery within the bound.
    tokio::time::sleep(recovery_bound + Duration::from_millis(500)).await;
    let open = load_open.finish().await;
    let closed = load_closed.finish().await;

    // While down (after a grace period for requests admitted just before).
    let grace = broken + Duration::from_millis(STORE_TIMEOUT.as_millis() as u64 + 50);
    // ... and before the mend (a request still waiting on a paused Redis
    // when it resumes is answered properly).
    let down_end = mended_start - STORE_TIMEOUT - Duration::from_millis(50);
    let down_open = tally_between(&open, grace, down_end);
    let down_closed = tally_between(&closed, grace, down_end);
    // Before: requests sent up to 200 ms before the break (later ones may
    // reach the store after it).
    let settled = broken - Duration::from_millis(200);
    let before_open = tally_between(&open, broken - Duration::from_secs(10), settled);
    let before_closed = tally_between(&closed, broken - Duration::from_secs(10), settled);
    let rec_open = recovery_after(&open, mended, healthy_open);
    let rec_closed = recovery_after(&closed, mended, healthy_closed);
    // Latency of everything sent from the outage on (until recovered).
    let max_latency = |recs: &[Rec]| {
        recs.iter()
            .filter(|r| r.sent >= broken)
            .map(|r| r.resp.elapsed)
            .max()
            .unwrap_or_default()
    };
    let (lat_open, lat_closed) = (max_latency(&open), max_latency(&closed));
    eprintln!("{}", before_open.line(&format!("{name}/open before")));
    eprintln!(
        "{} | recovered_after={rec_open:?} max_latency_from_outage={lat_open:?}",
        down_open.line(&format!("{name}/open during"))
    );
    eprintln!("{}", before_closed.line(&format!("{name}/closed before")));
    eprintln!(
        "{} | recovered_after={rec_closed:?} max_latency_from_outage={lat_closed:?}",
        down_closed.line(&format!("{name}/closed during"))
    );

    assert_eq!(
        before_open.admitted(),
        before_open.sent(),
        "{before_open:?}"
    );
    assert_eq!(before_open.degraded, 0);
    assert_eq!(before_closed.admitted(), before_closed.sent());
    assert!(down_open.sent() > 10 && down_closed.sent() > 10);
    assert_eq!(
        (down_open.admitted(), down_open.degraded),
        (down_open.sent(), down_open.sent()),
        "open: every request admitted and marked degraded: {down_open:?}"
    );
    assert_eq!(
        down_closed.status(503),
        down_closed.sent(),
        "closed: every request 503: {down_closed:?}"
    );
    let code = closed
        .iter()
        .find(|r| r.sent >= grace && r.resp.status == 503)
        .map(|r| r.resp.code());
    assert_eq!(code.as_deref(), Some("limiter_unavailable"));
    for (lat, which) in [(lat_open, "open"), (lat_closed, "closed")] {
        assert!(
            lat <= STORE_TIMEOUT + MARGIN,
            "{which}: a request waited {lat:?} (store_timeout {STORE_TIMEOUT:?} + {MARGIN:?})"
        );
    }
    for (rec, which) in [(rec_open, "open"), (rec_closed, "closed")] {
        let rec = rec.unwrap_or_else(|| {
            panic!("{which}: not recovered {recovery_bound:?} after Redis returned")
        });
        assert!(
            rec <= recovery_bound,
            "{which}: recovered after {rec:?} (bound {recovery_bound:?})"
        );
    }

    // Limits are enforced again (no degraded admissions past the limit).
    for gw in [&rig.open, &rig.closed] {
        let (_, key) = account_with_key(&*rig.cat, "enf").await;
        let t = enforce_check(gw.main, &key, 7).await;
        eprintln!(
            "{}",
            t.line(&format!("{name}/enforced after recovery (5/day)"))
        );
        assert_eq!((t.admitted(), t.denied(), t.degraded), (5, 2, 0), "{t:?}");
    }
    assert!(
        rig.open.alive() && rig.closed.alive(),
        "gateways never exit"
    );
}

/// Redis killed under load (connections reset, port refusing), then
/// restarted on the same port; then paused (SIGSTOP: connections accepted,
/// nothing answered) and resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_outage_open_and_closed_recover_without_restart() {
    let _serial = serial().await;
    if plangate_tests::redis().await.is_none() {
        return;
    }
    let Some(mut rig) = redis_outage_rig(None).await else {
        return;
    };
    // A restarted Redis must be used again within 1 s (issue 6). A paused
    // one (SIGSTOP) is a harsher case the issue does not name: the client
    // has timed out on it and is in its reconnect backoff when it resumes,
    // which on a loaded 2-core box was seen to take up to 1.25 s.
    let restarted = Duration::from_secs(1);
    let resumed = Duration::from_secs(3);
    redis_outage_phase(
        &mut rig,
        "redis killed",
        |r| r.kill(),
        |r| r.restart(),
        restarted,
    )
    .await;
    redis_outage_phase(
        &mut rig,
        "redis paused",
        |r| r.pause(),
        |r| r.resume(),
        resumed,
    )
    .await;
}

/// A "Redis" that accepts connections and never answers, from the start:
/// every request is decided within store_timeout (+ margin), admitted and
/// marked degraded (open) or refused with 503 (closed); the process stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blackhole_redis_is_bounded_by_store_timeout() {
    let _serial = serial().await;
    let hole = Blackhole::start().await;
    let Some(mut rig) = redis_outage_rig(Some(format!("redis://{}", hole.addr))).await else {
        return;
    };
    let (_, key_open) = account_with_key(&*rig.cat, "bo").await;
    let (_, key_closed) = account_with_key(&*rig.cat, "bc").await;
    let load_open = Load::start(rig.open.main, &key_open, "free-model", 8);
    let load_closed = Load::start(rig.closed.main, &key_closed, "free-model", 8);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let open = load_open.finish().await;
    let closed = load_closed.finish().await;
    let far = Instant::now() + Duration::from_secs(3600);
    let start = Instant::now() - Duration::from_secs(3600);
    let t_open = tally_between(&open, start, far);
    let t_closed = tally_between(&closed, start, far);
    eprintln!("{}", t_open.line("blackhole redis/open"));
    eprintln!("{}", t_closed.line("blackhole redis/closed"));
    assert!(t_open.sent() > 10 && t_closed.sent() > 10);
    assert_eq!(
        (t_open.admitted(), t_open.degraded),
        (t_open.sent(), t_open.sent())
    );
    assert_eq!(t_closed.status(503), t_closed.sent());
    assert!(t_open.max_latency <= STORE_TIMEOUT + MARGIN, "{t_open:?}");
    assert!(
        t_closed.max_latency <= STORE_TIMEOUT + MARGIN,
        "{t_closed:?}"
    );
    // Health is the process; readiness reports the store.
    let client = http_client();
    let health = rig::get(&client, rig.open.main, "/healthz", None).await;
    let ready = rig::get(&client, rig.open.main, "/readyz", None).await;
    assert_eq!((health.status.as_u16(), ready.status.as_u16()), (200, 503));
    assert!(rig.open.alive() && rig.closed.alive());
}

/// The address of host:port in a Postgres URL (`postgres://user@host:port/db`).
pub(crate) async fn postgres_addr(url: &str) -> std::net::SocketAddr {
    let host_port = url
        .split_once('@')
        .and_then(|(_, r)| r.split_once('/'))
        .map(|(hp, _)| hp.to_owned())
        .expect("host:port in the Postgres URL");
    tokio::net::lookup_host(host_port)
        .await
        .ok()
        .and_then(|mut a| a.next())
        .expect("postgres address")
}

/// Replace host:port of a Postgres URL (`postgres://user@host:port/db`).
pub(crate) fn via(url: &str, addr: std::net::SocketAddr) -> String {
    let (scheme_user, rest) = url.split_once('@').expect("user@ in URL");
    let db = rest.split_once('/').map(|(_, db)| db).unwrap_or("");
    format!("{scheme_user}@{addr}/{db}")
}

/// Postgres cut (every connection closed, new ones refused) under a gateway
/// with warm caches: cached keys and plans keep serving non-credit
/// endpoints even past every cache TTL; credit endpoints keep serving from
/// the account's wallet in the counter store (its balance is there);
/// unknown keys fail closed with 503; every charge and refund decided
/// during the outage waits in the outbox and is written exactly once when
/// it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_outage_serves_cached_and_credits_from_wallet_and_writes_charges_once() {
    let _serial = serial().await;
    let Some(db) = plangate_tests::postgres_db("rel_pg").await else {
        return;
    };
    // A Redis of its own: the outboxes other test runs leave in a shared
    // one (any gateway writes those it finds) must not count as pending.
    let redis = RedisServer::start();
    migrate(&db).await.expect("migrate");
    let direct = PostgresCatalog::connect(&db, Arc::new(SystemClock))
        .await
        .expect("direct catalog");
    let cut = TcpCut::start(postgres_addr(&db).await).await;
    let mock = plangate::mock::start(MockOptions::default())
        .await
        .expect("mock");
    let mut setup = Setup::new(&mock.url());
    setup.postgres_url = Some(via(&db, cut.addr));
    setup.redis_url = Some(redis.url());
    setup.store_timeout = "1s".into();
    setup.request_timeout = "5s".into();
    let rig = Rig::start(&setup).await;
    let (account, key) = rig.account().await;
    direct
        .create_quota_block(&account, 100, None, serde_json::json!({}))
        .await
        .expect("grant");
    let tokens = [("x-mock-tokens", "250")]; // 3 credits per request at the end
    let paid = |headers: &'static [(&'static str, &'static str)]| {
        let (client, addr, key) = (rig.client.clone(), rig.addr, key.clone());
        async move {
            let mut h = vec![("x-mock-tokens", "250")];
            h.extend_from_slice(headers);
            rig::chat(
                &client,
                addr,
                "/v1/chat/completions",
                &key,
                "paid-model",
                &h,
            )
            .await
        }
    };

    // Warm the caches (key, account, plans) and charge once normally.
    assert_eq!(rig.chat(&key, "free-model", &tokens).await.status, 200);
    assert_eq!(paid(&[]).await.status, 200);
    until(Duration::from_secs(5), || async {
        rig.charges_pending() == 0
    })
    .await
    .expect("warm-up charge written");

    // Requests admitted (and charged 1 each) before the cut, ending during it.
    const STREAMS: usize = 6;
    const FAILING: usize = 4;
    let mut inflight = Vec::new();
    for _ in 0..STREAMS {
        let (client, addr, key) = (rig.client.clone(), rig.addr, key.clone());
        inflight.push(tokio::spawn(async move {
            let h = [
                ("x-mock-tokens", "250"),
                ("x-mock-chunks", "20"),
                ("x-mock-chunk-delay-ms", "50"),
            ];
            let body = rig::chat_body("paid-model", true);
            rig::post_json(&client, addr, "/v1/chat/completions", &key, &body, &h).await
        }));
    }
    for _ in 0..FAILING {
        inflight.push(tokio::spawn(paid(&[
            ("x-mock-delay-ms", "600"),
            ("x-mock-status", "500"),
        ])));
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(rig.core.metrics.in_flight(), (STREAMS + FAILING) as u64);
    cut.cut();
    let cut_at = Instant::now();
    let mut ended = Tally::default();
    for t in inflight {
        ended.add(&t.await.expect("in-flight request"));
    }
    assert_eq!(ended.status(200), STREAMS as u64, "{ended:?}");
    assert_eq!(ended.status(500), FAILING as u64, "{ended:?}");

    // Past every cache TTL: entries are stale, reloads fail, old ones serve.
    rig.clock.advance(Duration::from_secs(120));
    let mut free = Tally::default();
    let mut credit = Tally::default();
    for _ in 0..40 {
        free.add(&rig.chat(&key, "free-model", &tokens).await);
    }
    const DURING: usize = 5;
    for _ in 0..DURING {
        credit.add(&paid(&[]).await);
    }
    let stranger = rig
        .chat("sk-not-cached-anywhere-0000000000", "free-model", &[])
        .await;
    let pending_during = rig.charges_pending();
    eprintln!(
        "{} | outage at {:?}",
        free.line("postgres cut/non-credit endpoint, cached key"),
        cut_at.elapsed()
    );
    eprintln!("{}", credit.line("postgres cut/credit endpoint"));
    eprintln!(
        "FIGURES postgres cut/uncached key: status={} code={} | charges pending during outage={pending_during}",
        stranger.status,
        stranger.code()
    );
    assert_eq!(
        free.admitted(),
        40,
        "cached key and plan keep serving: {free:?}"
    );
    assert_eq!(
        credit.status(200),
        DURING as u64,
        "credits serve from the wallet: {credit:?}"
    );
    assert!(credit.max_latency < Duration::from_secs(2), "{credit:?}");
    assert_eq!(stranger.status, 503);
    assert_eq!(stranger.code(), "catalog_unavailable");
    assert!(
        pending_during > 0,
        "charges and refunds wait for Postgres in the outbox"
    );
    // Let the writers retry a few times against the dead database.
    tokio::time::sleep(Duration::from_millis(500)).await;

    cut.restore();
    let credit_back = until(Duration::from_secs(10), || async {
        paid(&[]).await.status == 200
    })
    .await;
    let written = until(Duration::from_secs(15), || async {
        rig.charges_pending() == 0
    })
    .await;

    // Every charge exactly once: 4 per served paid request (1 at
    // admission + 3 per-unit, one ledger row), the failed ones given back
    // before the catalog ever saw them.
    let served = 1 + STREAMS as u64 + DURING as u64 + 1; // warm-up, streams, during, the recovery probe
    let ledger = direct.ledger(&account).await.expect("ledger");
    let balance = direct.balance(&account).await.expect("balance");
    let net: u64 = ledger.iter().map(|e| e.deducted - e.refunded).sum();
    let use_rows = ledger
        .iter()
        .filter(|e| e.idempotency_key.starts_with("req:"))
        .count() as u64;
    let refunded: u64 = ledger.iter().map(|e| e.refunded).sum();
    let expected = 4 * served;
    eprintln!(
        "FIGURES postgres cut/charges: in flight at cut={} expected_net={expected} ledger_net={net} balance={balance} per_unit_rows={use_rows} refunded={refunded} lost={} doubled={} | credit endpoint back after {credit_back:?}, pending charges written after {written:?}",
        STREAMS + FAILING,
        expected.saturating_sub(net),
        net.saturating_sub(expected),
    );
    assert!(credit_back.is_some(), "credit endpoint back after restore");
    assert!(written.is_some(), "pending charges written after restore");
    // The recovery probe's own per-unit charge may still be queued.
    until(Duration::from_secs(5), || async {
        rig.charges_pending() == 0
    })
    .await
    .expect("probe charge");
    let ledger = direct.ledger(&account).await.expect("ledger");
    let net: u64 = ledger.iter().map(|e| e.deducted - e.refunded).sum();
    let balance = direct.balance(&account).await.expect("balance");
    assert_eq!(net, expected, "no charge lost, none doubled: {ledger:#?}");
    assert_eq!(balance, 100 - expected);
    assert_eq!(refunded, 0, "failed requests were never recorded");
    assert_eq!(
        ledger
            .iter()
            .filter(|e| e.idempotency_key.starts_with("req:"))
            .count() as u64,
        served,
        "one row per served request: {ledger:#?}"
    );
    assert_eq!(ledger.len() as u64, served, "{ledger:#?}");
}

/// While Postgres is down, the in-process counters' outbox grows only to
/// `[storage] outbox_memory`: past it admissions are refused (a credit
/// request 503 `catalog_unavailable`; others as `on_store_error` says,
/// here closed: 503), nothing admitted before is lost, and once Postgres
/// is back the outbox is written and requests are admitted again. Before
/// the bound, every request was admitted and its record kept in memory
/// for as long as the outage lasted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_process_outbox_is_bounded_while_postgres_is_down() {
    let _serial = serial().await;
    let Some(db) = plangate_tests::postgres_db("rel_obx").await else {
        return;
    };
    migrate(&db).await.expect("migrate");
    let direct = PostgresCatalog::connect(&db, Arc::new(SystemClock))
        .await
        .expect("direct catalog");
    let cut = TcpCut::start(postgres_addr(&db).await).await;
    let mock = plangate::mock::start(MockOptions::default())
        .await
        .expect("mock");
    let mut setup = Setup::new(&mock.url());
    setup.postgres_url = Some(via(&db, cut.addr));
    setup.store_timeout = "1s".into();
    setup.request_timeout = "5s".into();
    setup.extra_storage = "outbox_memory = \"8KiB\"\n".into();
    let rig = Rig::start(&setup).await;
    let (account, key) = rig.account().await;
    direct
        .create_quota_block(&account, 1_000, None, serde_json::json!({}))
        .await
        .expect("grant");
    let tokens = [("x-mock-tokens", "250")];
    let paid = || rig.chat(&key, "paid-model", &tokens);
    assert_eq!(rig.chat(&key, "free-model", &tokens).await.status, 200);
    assert_eq!(paid().await.status, 200);
    until(Duration::from_secs(5), || async {
        rig.charges_pending() == 0
    })
    .await
    .expect("warm-up records written");

    cut.cut();
    let mut served = 2u64;
    let mut refused = None;
    for _ in 0..1_000 {
        let r = rig.chat(&key, "free-model", &tokens).await;
        if r.status == 200 {
            served += 1;
        } else {
            refused = Some(r);
            break;
        }
    }
    let refused = refused.expect("admissions refused once the outbox is full");
    let during = served - 2;
    eprintln!(
        "FIGURES in-process outbox bound 8KiB: {during} requests admitted during the outage, then {} {}",
        refused.status,
        refused.code()
    );
    assert_eq!(refused.status, 503, "{:?}", refused.body);
    assert!(
        (5..=60).contains(&during),
        "about 8 KiB of usage records are kept, not more: {during}"
    );
    let paid_refused = paid().await;
    assert_eq!(paid_refused.status, 503, "{:?}", paid_refused.body);
    assert_eq!(paid_refused.code(), "catalog_unavailable");

    cut.restore();
    let back = until(Duration::from_secs(15), || async {
        rig.chat(&key, "free-model", &tokens).await.status == 200
    })
    .await;
    assert!(back.is_some(), "admitted again once the outbox is written");
    served += 1;
    assert_eq!(paid().await.status, 200);
    served += 1;
    until(Duration::from_secs(10), || async {
        rig.charges_pending() == 0
    })
    .await
    .expect("records written after restore");
    let q = plangate::catalog::UsageQuery {
        account_id: Some(account.clone()),
        ..Default::default()
    };
    let events = direct
        .usage_events(&q, None, 10_000)
        .await
        .expect("usage events");
    assert_eq!(
        events.len() as u64,
        served,
        "one record for every request served, none for the refused"
    );
}
