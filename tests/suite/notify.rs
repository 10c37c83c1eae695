//! Threshold notifications (issue 15 item 7): plans' `notify:` delivered as
//! signed webhooks to a real HTTP receiver, on both backends; time is the
//! gateway's `ManualClock` (backoffs and windows are never slept out).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use plangate::notify::{verify, ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use plangate_tests::harness::{unique, Backend, Options, TestGateway, T0_MS};

const SECRET: &str = "test-webhook-secret-0123456789";

const PLANS: &str = r#"
default_plan: metered
plans:
  metered:
    notify:
      - {at: 80%, of: window}
      - {at: 80%, of: balance}
      - expires_within: 7d
    endpoints:
      "chat-n":
        fixed_windows:
          - window: 60s
            limit: 10
      "paid":
        fixed_windows:
          - window: 60s
            limit: 1000
        credits: {per_request: 10}
      "tok":
        fixed_windows:
          - window: 60s
            limit: 400
            unit_type: token
"#;

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    headers: http::HeaderMap,
    body: Bytes,
}

impl Received {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("webhook body is JSON")
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// Whether the signature verifies, as a receiver checks it.
    fn verifies(&self) -> bool {
        let ts: u64 = self.header(TIMESTAMP_HEADER).parse().unwrap_or(0);
        verify(
            SECRET.as_bytes(),
            ts,
            &self.body,
            self.header(SIGNATURE_HEADER),
        )
    }
}

/// A webhook receiver: records every POST, answers 500 to the first
/// `fail_first` of them and 200 after.
#[derive(Clone)]
struct Receiver {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Received>>>,
    _task: Arc<tokio::task::JoinHandle<()>>,
}

impl Receiver {
    async fn start(fail_first: usize) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let seen = Arc::new(AtomicUsize::new(0));
        let store = got.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (store, seen) = (store.clone(), seen.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (store, seen) = (store.clone(), seen.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|c| c.to_bytes())
                                .unwrap_or_default();
                            store.lock().push(Received {
                                headers: parts.headers,
                                body,
                            });
                            let n = seen.fetch_add(1, Ordering::SeqCst);
                            let status = if n < fail_first {
                                StatusCode::INTERNAL_SERVER_ERROR
                            } else {
                                StatusCode::OK
                            };
                            let mut resp = Response::new(Full::new(Bytes::from_static(b"ok")));
                            *resp.status_mut() = status;
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Receiver {
            addr,
            got,
            _task: Arc::new(task),
        }
    }

    fn url(&self) -> String {
        format!("http://{}/hooks/plangate", self.addr)
    }

    fn received(&self) -> Vec<Received> {
        self.got.lock().clone()
    }

    /// Wait (bounded, real time) until `n` requests have arrived.
    async fn wait_for(&self, n: usize) -> Vec<Received> {
        let start = tokio::time::Instant::now();
        loop {
            let got = self.received();
            if got.len() >= n {
                return got;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "receiver got {} requests, expected {n}",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// `[notify]` for a receiver at `url`: backoff 1 s doubling (on the
/// manual clock), polled every 50 ms of real time.
fn notify_section(dir_tag: &str, url: &str) -> String {
    let path = std::env::temp_dir().join(format!("{dir_tag}.secret"));
    std::fs::write(&path, format!("{SECRET}\n")).expect("write secret");
    format!(
        r#"
[notify]
url = "{url}"
secret_file = "{}"
timeout = "2s"
backoff = "1s"
max_backoff = "10s"
max_attempts = 5
poll_interval = "50ms"
scan_interval = "1h"
"#,
        path.display()
    )
}

async fn gateway(backend: Backend, url: &str, postgres_url: Option<String>) -> TestGateway {
    let mut opts = Options::new(backend);
    opts.plans = PLANS.to_owned();
    opts.extra_config = notify_section(&unique("plangate-notify"), url);
    opts.postgres_url = postgres_url;
    TestGateway::start(opts).await
}

async fn chat(gw: &TestGateway, key: &str, model: &str) -> StatusCode {
    gw.chat(key, model).await.status
}

/// The delivery log as the admin API shows it.
async fn log(gw: &TestGateway, query: &str) -> serde_json::Value {
    let r = gw
        .admin(
            Method::GET,
            &format!("/admin/notifications?{query}"),
            Some(plangate_tests::harness::ADMIN_TOKEN),
            "",
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    r.json()
}

fn notifier(gw: &TestGateway) -> &Arc<plangate::notify::Notifier> {
    gw.core.notifier.as_ref().expect("[notify] configured")
}

/// Many requests crossing 80% of a window at once (on two gateways sharing
/// the stores, with Postgres + Redis): one notification, signed, delivered
/// once; the next window fires again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn window_threshold_fires_once_per_window_under_concurrency() {
    for backend in Backend::all().await {
        let receiver = Receiver::start(0).await;
        let gw = gateway(backend, &receiver.url(), None).await;
        let second = match backend {
            Backend::Real => Some(
                gateway(
                    backend,
                    &receiver.url(),
                    gw.config.storage.postgres_url.clone(),
                )
                .await,
            ),
            Backend::Memory => None,
        };
        let (account, key) = gw.account(None).await;
        let client = plangate_tests::rig::http_client();
        let mut sends = tokio::task::JoinSet::new();
        for i in 0..30 {
            let addr = match (&second, i % 2) {
                (Some(s), 1) => s.addr,
                _ => gw.addr,
            };
            let (client, key) = (client.clone(), key.clone());
            sends.spawn(async move {
                plangate_tests::rig::chat(
                    &client,
                    addr,
                    "/v1/chat/completions",
                    &key,
                    "chat-n",
                    &[],
                )
                .await
                .status
            });
        }
        let statuses: Vec<StatusCode> = sends.join_all().await;
        let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
        assert_eq!(ok, 10, "{backend:?}: {statuses:?}");
        let got = receiver.wait_for(1).await;
        // Whatever is still due is delivered now; nothing more arrives.
        notifier(&gw).deliver_due().await;
        if let Some(s) = &second {
            notifier(s).deliver_due().await;
        }
        let got_after = receiver.received();
        assert_eq!(got_after.len(), 1, "{backend:?}: {got_after:?}");
        let hook = &got[0];
        assert!(hook.verifies(), "{backend:?}: signature does not verify");
        assert_eq!(hook.header("content-type"), "application/json");
        let body = hook.json();
        assert_eq!(body["type"], "window.threshold", "{body}");
        assert_eq!(body["account"], account.as_str());
        assert_eq!(hook.header(ID_HEADER), body["id"].as_str().unwrap());
        let data = &body["data"];
        assert_eq!(data["endpoint"], "chat-n");
        assert_eq!(data["plan"], "metered");
        assert_eq!(data["threshold_percent"], 80);
        assert_eq!(data["window"]["limit"], 10);
        assert_eq!(data["window"]["threshold"], 8);
        assert!(data["window"]["used"].as_u64().unwrap() >= 8, "{data}");
        assert_eq!(data["window"]["unit"], "request");
        assert_eq!(data["window"]["length"], "60s");
        assert_eq!(data["window"]["reset"], "2027-01-14T10:01:00.000Z");
        // The timestamp signed is the gateway's clock.
        assert_eq!(hook.header(TIMESTAMP_HEADER), (T0_MS / 1000).to_string());
        // A tampered body does not verify.
        let mut forged = hook.clone();
        forged.body = Bytes::from(hook.body.iter().copied().rev().collect::<Vec<u8>>());
        assert!(!forged.verifies());

        let page = log(&gw, &format!("account={account}")).await;
        let rows = page["notifications"].as_array().unwrap();
        assert_eq!(rows.len(), 1, "{page}");
        assert_eq!(rows[0]["status"], "delivered");
        assert_eq!(rows[0]["attempts"], 1);
        assert_eq!(rows[0]["kind"], "window");

        // The next window: fires again, once.
        gw.clock.advance(Duration::from_secs(60));
        if let Some(s) = &second {
            s.clock.advance(Duration::from_secs(60));
        }
        for _ in 0..12 {
            chat(&gw, &key, "chat-n").await;
        }
        receiver.wait_for(2).await;
        notifier(&gw).deliver_due().await;
        assert_eq!(receiver.received().len(), 2, "{backend:?}");
        assert_eq!(
            receiver.received()[1].json()["data"]["window"]["reset"],
            "2027-01-14T10:02:00.000Z"
        );
        if let Some(s) = second {
            s.stop().await;
        }
        gw.stop().await;
    }
}

/// A receiver failing twice: retried after 1 s, then 2 s (on the manual
/// clock), delivered once; the log shows the attempts and the last error.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_deliveries_are_retried_with_backoff_and_logged() {
    for backend in Backend::all().await {
        let receiver = Receiver::start(2).await;
        let gw = gateway(backend, &receiver.url(), None).await;
        let (account, key) = gw.account(None).await;
        for _ in 0..8 {
            assert_eq!(chat(&gw, &key, "chat-n").await, StatusCode::OK);
        }
        receiver.wait_for(1).await;
        let n = notifier(&gw);
        // The retry is not due before its backoff.
        n.deliver_due().await;
        assert_eq!(receiver.received().len(), 1, "{backend:?}");
        let page = log(&gw, &format!("account={account}&status=pending")).await;
        let row = &page["notifications"][0];
        assert_eq!(row["attempts"], 1, "{page}");
        assert_eq!(row["last_error"], "HTTP 500");
        assert_eq!(row["next_attempt_at"], "2027-01-14T10:00:21.000Z");

        gw.clock.advance(Duration::from_secs(1));
        n.deliver_due().await;
        assert_eq!(receiver.received().len(), 2, "{backend:?}");
        // The second retry waits twice as long.
        gw.clock.advance(Duration::from_secs(1));
        n.deliver_due().await;
        assert_eq!(receiver.received().len(), 2, "{backend:?}: too early");
        gw.clock.advance(Duration::from_secs(1));
        n.deliver_due().await;
        let got = receiver.received();
        assert_eq!(got.len(), 3, "{backend:?}");
        // The same notification each time, each attempt signed anew.
        let ids: Vec<&str> = got.iter().map(|r| r.header(ID_HEADER)).collect();
        assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
        assert!(got.iter().all(Received::verifies));
        assert_ne!(
            got[0].header(TIMESTAMP_HEADER),
            got[2].header(TIMESTAMP_HEADER)
        );

        gw.clock.advance(Duration::from_secs(60));
        n.deliver_due().await;
        assert_eq!(receiver.received().len(), 3, "{backend:?}: delivered once");
        let page = log(&gw, &format!("account={account}")).await;
        let row = &page["notifications"][0];
        assert_eq!(row["status"], "delivered", "{page}");
        assert_eq!(row["attempts"], 3);
        assert_eq!(row["last_error"], "HTTP 500");
        assert_eq!(row["delivered_at"], "2027-01-14T10:00:23.000Z");
        let text = gw
            .admin(
                Method::GET,
                "/metrics",
                Some(plangate_tests::harness::ADMIN_TOKEN),
                "",
            )
            .await;
        let text = String::from_utf8_lossy(&text.body).to_string();
        assert!(
            text.contains("plangate_notifications_total{result=\"retried\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("plangate_notifications_total{result=\"delivered\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("plangate_background_failures_total{job=\"deliver\"} 2"),
            "{text}"
        );
        gw.stop().await;
    }
}

/// A notification queued while the receiver is down is still pending
/// when the gateway stops; a new gateway on the same Postgres delivers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pending_notifications_survive_a_restart() {
    if !Backend::all().await.contains(&Backend::Real) {
        return;
    }
    // A port nothing listens on: every attempt fails at once.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let gw = gateway(Backend::Real, &format!("http://{dead}/hooks"), None).await;
    let pg = gw.config.storage.postgres_url.clone();
    let (account, key) = gw.account(None).await;
    for _ in 0..8 {
        assert_eq!(chat(&gw, &key, "chat-n").await, StatusCode::OK);
    }
    let start = tokio::time::Instant::now();
    loop {
        let page = log(&gw, &format!("account={account}")).await;
        if page["notifications"][0]["attempts"] == 1 {
            assert_eq!(page["notifications"][0]["status"], "pending");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{page}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gw.stop().await;

    let receiver = Receiver::start(0).await;
    let gw = gateway(Backend::Real, &receiver.url(), pg.clone()).await;
    gw.clock.set_ms(T0_MS + 1_000);
    notifier(&gw).deliver_due().await;
    let got = receiver.wait_for(1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].json()["account"], account.as_str());
    assert!(got[0].verifies());
    let page = log(&gw, &format!("account={account}")).await;
    assert_eq!(page["notifications"][0]["status"], "delivered", "{page}");
    assert_eq!(page["notifications"][0]["attempts"], 2);

    // The same log from the command line.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(plangate_tests::plangate_bin())
            .args(args)
            .env("PLANGATE_POSTGRES_URL", pg.as_deref().unwrap())
            .env_remove("RUST_LOG")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, text, err) = cli(&["notifications", "list", "--account", &account]);
    assert_eq!(code, Some(0), "{err}");
    assert!(text.contains("window.threshold"), "{text}");
    assert!(
        text.contains("2 attempt(s)\tdelivered (last error: "),
        "{text}"
    );
    let (code, text, _) = cli(&["notifications", "list", "--status", "pending", "--json"]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["notifications"], serde_json::json!([]));
    let (code, _, err) = cli(&["notifications", "list", "--status", "sent"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--status: `sent` is not pending, delivered or failed"),
        "{err}"
    );
    gw.stop().await;
}

/// `of: balance`: fires once when 80% of the granted credits is used;
/// a new grant re-arms it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn balance_threshold_fires_once_per_grant() {
    for backend in Backend::all().await {
        let receiver = Receiver::start(0).await;
        let gw = gateway(backend, &receiver.url(), None).await;
        let (account, key) = gw.account(None).await;
        gw.catalog()
            .create_quota_block(&account, 100, None, serde_json::json!({}))
            .await
            .unwrap();
        // 10 credits each: 70 used, then 80 (the threshold), then 90.
        for _ in 0..7 {
            assert_eq!(chat(&gw, &key, "paid").await, StatusCode::OK);
        }
        notifier(&gw).deliver_due().await;
        assert_eq!(receiver.received().len(), 0, "{backend:?}: below 80%");
        for _ in 0..2 {
            assert_eq!(chat(&gw, &key, "paid").await, StatusCode::OK);
        }
        let got = receiver.wait_for(1).await;
        notifier(&gw).deliver_due().await;
        assert_eq!(receiver.received().len(), 1, "{backend:?}");
        let body = got[0].json();
        assert_eq!(body["type"], "balance.threshold", "{body}");
        assert_eq!(body["data"]["granted"], 100);
        // 80 used, unless the granted credits were still being read at the
        // 8th request (a busy machine): then the 9th saw it.
        let used = body["data"]["used"].as_u64().unwrap();
        assert!(used == 80 || used == 90, "{body}");
        assert_eq!(body["data"]["balance"], 100 - used);
        // A new grant: 110 left of 200, below the threshold again.
        gw.catalog()
            .create_quota_block(&account, 100, None, serde_json::json!({}))
            .await
            .unwrap();
        let start = tokio::time::Instant::now();
        // 10 more requests: 200 granted, 190 used at the end.
        for _ in 0..8 {
            // The wallet and the granted credits follow the grant (its
            // invalidation reaches them within moments).
            while chat(&gw, &key, "paid").await != StatusCode::OK {
                assert!(start.elapsed() < Duration::from_secs(5));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        receiver.wait_for(2).await;
        notifier(&gw).deliver_due().await;
        assert_eq!(receiver.received().len(), 2, "{backend:?}");
        let body = receiver.received()[1].json();
        assert_eq!(body["data"]["granted"], 200, "{body}");
        gw.stop().await;
    }
}

/// `expires_within: 7d`: a block expiring in 5 days is notified once, one
/// expiring in 10 days is not (yet), an empty one never.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expiring_blocks_are_notified_once() {
    for backend in Backend::all().await {
        let receiver = Receiver::start(0).await;
        let gw = gateway(backend, &receiver.url(), None).await;
        let (account, _key) = gw.account(None).await;
        let now = UNIX_EPOCH + Duration::from_millis(T0_MS);
        let day = Duration::from_secs(86_400);
        let soon = gw
            .catalog()
            .create_quota_block(&account, 50, Some(now + 5 * day), serde_json::json!({}))
            .await
            .unwrap();
        let later = gw
            .catalog()
            .create_quota_block(&account, 50, Some(now + 10 * day), serde_json::json!({}))
            .await
            .unwrap();
        let n = notifier(&gw);
        assert_eq!(n.scan_expiring().await.unwrap(), 1, "{backend:?}");
        assert_eq!(n.scan_expiring().await.unwrap(), 0, "{backend:?}: once");
        n.deliver_due().await;
        let got = receiver.wait_for(1).await;
        let body = got[0].json();
        assert_eq!(body["type"], "block.expiring", "{body}");
        assert_eq!(body["data"]["block"]["id"], soon.id.as_str());
        assert_eq!(body["data"]["block"]["credits_remaining"], 50);
        assert_eq!(body["data"]["expires_within_secs"], 7 * 86_400);
        // Four days on, the later block is within 7 days too.
        gw.clock.advance(4 * day);
        assert_eq!(n.scan_expiring().await.unwrap(), 1, "{backend:?}");
        n.deliver_due().await;
        let got = receiver.wait_for(2).await;
        assert_eq!(got[1].json()["data"]["block"]["id"], later.id.as_str());
        assert_eq!(n.scan_expiring().await.unwrap(), 0);
        assert_eq!(receiver.received().len(), 2);
        gw.stop().await;
    }
}

/// The delivery log: filters, pages, and refuses bad parameters.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delivery_log_pages_and_filters() {
    for backend in Backend::all().await {
        let receiver = Receiver::start(0).await;
        let gw = gateway(backend, &receiver.url(), None).await;
        let (account, _key) = gw.account(None).await;
        let now = UNIX_EPOCH + Duration::from_millis(T0_MS);
        for d in 1..=3u32 {
            gw.catalog()
                .create_quota_block(
                    &account,
                    5,
                    Some(now + Duration::from_secs(86_400) * d),
                    serde_json::json!({}),
                )
                .await
                .unwrap();
        }
        assert_eq!(notifier(&gw).scan_expiring().await.unwrap(), 3);
        notifier(&gw).deliver_due().await;
        receiver.wait_for(3).await;
        let first = log(&gw, &format!("account={account}&limit=2")).await;
        let rows = first["notifications"].as_array().unwrap();
        assert_eq!(rows.len(), 2, "{first}");
        assert!(
            rows[0]["seq"].as_u64() > rows[1]["seq"].as_u64(),
            "newest first"
        );
        let cursor = first["next_cursor"]
            .as_str()
            .expect("a next page")
            .to_owned();
        let second = log(&gw, &format!("account={account}&limit=2&cursor={cursor}")).await;
        assert_eq!(second["notifications"].as_array().unwrap().len(), 1);
        assert!(second["next_cursor"].is_null());
        let delivered = log(&gw, &format!("account={account}&status=delivered")).await;
        assert_eq!(delivered["notifications"].as_array().unwrap().len(), 3);
        let failed = log(&gw, &format!("account={account}&status=failed")).await;
        assert_eq!(failed["notifications"].as_array().unwrap().len(), 0);
        let other = log(&gw, &format!("account={}", unique("nobody"))).await;
        assert_eq!(other["notifications"].as_array().unwrap().len(), 0);
        for bad in ["status=sent", "cursor=abc", "limit=0", "acount=x"] {
            let r = gw
                .admin(
                    Method::GET,
                    &format!("/admin/notifications?{bad}"),
                    Some(plangate_tests::harness::ADMIN_TOKEN),
                    "",
                )
                .await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(r.json()["error"]["type"], "invalid_request_error", "{bad}");
        }
        let r = gw
            .admin(Method::GET, "/admin/notifications", None, "")
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        gw.stop().await;
    }
}

/// A token window crossed by a settlement (tokens are counted when the
/// response ends) is seen by the account's next admission: detection is
/// level-triggered on the counts admissions return.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thresholds_reached_at_settlement_fire_at_the_next_admission() {
    for backend in Backend::all().await {
        let receiver = Receiver::start(0).await;
        let gw = gateway(backend, &receiver.url(), None).await;
        let (account, key) = gw.account(None).await;
        let mut used = 0;
        while used < 320 {
            assert_eq!(chat(&gw, &key, "tok").await, StatusCode::OK, "{backend:?}");
            gw.wait_settled().await;
            let limits = gw.limits(&key).await;
            used = plangate_tests::harness::tokens_used(&limits, "tok");
        }
        assert!(
            used < 400,
            "{backend:?}: {used} tokens; the next request must fit"
        );
        notifier(&gw).deliver_due().await;
        // No request reserves tokens here, so every admission so far saw
        // less than 80%: only the last settlement reached it.
        assert_eq!(receiver.received().len(), 0, "{backend:?}");
        assert_eq!(chat(&gw, &key, "tok").await, StatusCode::OK);
        let got = receiver.wait_for(1).await;
        notifier(&gw).deliver_due().await;
        assert_eq!(receiver.received().len(), 1, "{backend:?}");
        let body = got[0].json();
        assert_eq!(body["account"], account.as_str());
        assert_eq!(body["data"]["window"]["unit"], "token", "{body}");
        assert_eq!(body["data"]["window"]["threshold"], 320);
        assert!(body["data"]["window"]["used"].as_u64().unwrap() >= 320);
        gw.stop().await;
    }
}

/// A receiver that always fails: after `max_attempts` (5) the
/// notification is marked failed and never tried again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deliveries_give_up_after_max_attempts() {
    for backend in Backend::all().await {
        let receiver = Receiver::start(usize::MAX).await;
        let gw = gateway(backend, &receiver.url(), None).await;
        let (account, key) = gw.account(None).await;
        for _ in 0..8 {
            assert_eq!(chat(&gw, &key, "chat-n").await, StatusCode::OK);
        }
        receiver.wait_for(1).await;
        let n = notifier(&gw);
        // Waits for the worker's pass to record the first attempt (its
        // retry time is read from the clock then).
        n.deliver_due().await;
        // Backoffs of 1, 2, 4 and 8 s (at most max_backoff = 10 s).
        for (wait, total) in [(1, 2), (2, 3), (4, 4), (8, 5)] {
            gw.clock.advance(Duration::from_secs(wait));
            n.deliver_due().await;
            assert_eq!(receiver.received().len(), total, "{backend:?}");
        }
        gw.clock.advance(Duration::from_secs(3600));
        n.deliver_due().await;
        assert_eq!(receiver.received().len(), 5, "{backend:?}: given up");
        let page = log(&gw, &format!("account={account}&status=failed")).await;
        let row = &page["notifications"][0];
        assert_eq!(row["attempts"], 5, "{page}");
        assert_eq!(row["last_error"], "HTTP 500");
        assert!(row["next_attempt_at"].is_null());
        gw.stop().await;
    }
}
