//! Reading usage events out: `GET /v1/usage` (the caller's own account
//! only), `GET /admin/usage` and `GET /admin/usage/events` on both
//! backends, and `plangate usage export` (JSON lines and CSV) against
//! Postgres.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use plangate::catalog::postgres::{migrate, PostgresCatalog};
use plangate::catalog::{Catalog, UnitUsage, UsageEvent};
use plangate::clock::SystemClock;
use plangate_tests::harness::{Resp, TestGateway, ADMIN_TOKEN};
use serde_json::json;

/// 2027-01-14T00:00:00Z.
const D0: u64 = 1_799_884_800_000;
const HOUR: u64 = 3_600_000;

fn at(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

fn ev(id: &str, account: &str, endpoint: &str, ended_ms: u64, tokens: u64) -> UsageEvent {
    UsageEvent {
        request_id: id.into(),
        account_id: account.into(),
        key_id: Some("key_x".into()),
        endpoint: endpoint.into(),
        route: "/v1/chat/completions".into(),
        units: vec![UnitUsage {
            unit: "token".into(),
            measured: tokens,
            reserved: 0,
        }],
        credits: 1,
        status: 200,
        degraded: false,
        streamed: false,
        cut_short: false,
        started_at: at(ended_ms - 100),
        ended_at: at(ended_ms),
        charge: None,
    }
}

async fn get(gw: &TestGateway, path: &str, key: Option<&str>) -> Resp {
    let mut b = Request::builder().method(Method::GET).uri(path);
    if let Some(k) = key {
        b = b.header("authorization", format!("Bearer {k}"));
    }
    gw.send(b.body(Full::new(Bytes::new())).unwrap()).await
}

#[track_caller]
fn bad_param(r: &Resp, param: &str) {
    assert_eq!(r.status, 400, "{:?}", r.body);
    assert_eq!(r.code(), "invalid_request");
    assert_eq!(r.json()["error"]["param"], param, "{:?}", r.body);
}

/// Events of two accounts; returns (a's events, b's events).
async fn seed(gw: &TestGateway, a: &str, b: &str) -> (Vec<UsageEvent>, Vec<UsageEvent>) {
    let of_a = vec![
        ev("ra1", a, "gpt-test", D0 + 10, 100),
        ev("ra2", a, "gpt-test", D0 + HOUR + 10, 50),
        ev("ra3", a, "paid-model", D0 + HOUR + 10, 7),
    ];
    let of_b = vec![
        ev("rb1", b, "gpt-test", D0 + 10, 1_000),
        ev("rb2", b, "other-model", D0 + 2 * HOUR, 9),
    ];
    let all: Vec<UsageEvent> = of_a.iter().chain(&of_b).cloned().collect();
    assert_eq!(gw.catalog().record_usage(&all).await.unwrap(), 5);
    (of_a, of_b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_usage_shows_only_the_callers_account() {
    for gw in TestGateway::each_backend().await {
        let (a, key_a) = gw.account(None).await;
        let (b, key_b) = gw.account(None).await;
        seed(&gw, &a, &b).await;

        let r = get(&gw, "/v1/usage?group_by=endpoint", Some(&key_a)).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(
            r.json(),
            json!({"account": a, "group_by": "endpoint", "buckets": [
                {"endpoint": "gpt-test", "requests": 2, "credits": 2, "units": {"token": 150}},
                {"endpoint": "paid-model", "requests": 1, "credits": 1, "units": {"token": 7}},
            ]})
        );
        // Day is the default grouping; hours are UTC hours.
        let r = get(&gw, "/v1/usage", Some(&key_b)).await;
        assert_eq!(
            r.json()["buckets"],
            json!([{"start": "2027-01-14T00:00:00.000Z", "requests": 2, "credits": 2,
                    "units": {"token": 1009}}])
        );
        let r = get(
            &gw,
            "/v1/usage?group_by=hour&since=2027-01-14T01:00:00Z&until=2027-01-14T03:00:00Z",
            Some(&key_a),
        )
        .await;
        assert_eq!(
            r.json()["buckets"],
            json!([{"start": "2027-01-14T01:00:00.000Z", "requests": 2, "credits": 2,
                    "units": {"token": 57}}])
        );

        // Another account's usage cannot be asked for, only refused.
        let r = get(&gw, &format!("/v1/usage?account={b}"), Some(&key_a)).await;
        bad_param(&r, "account");
        bad_param(
            &get(&gw, "/v1/usage?group_by=week", Some(&key_a)).await,
            "group_by",
        );
        bad_param(
            &get(&gw, "/v1/usage?since=yesterday", Some(&key_a)).await,
            "since",
        );
        bad_param(
            &get(
                &gw,
                "/v1/usage?since=2027-01-02&until=2027-01-01",
                Some(&key_a),
            )
            .await,
            "until",
        );
        bad_param(
            &get(&gw, "/v1/usage?endpoint=gpt-test", Some(&key_a)).await,
            "endpoint",
        );
        let r = get(&gw, "/v1/usage", None).await;
        assert_eq!(
            (r.status.as_u16(), r.code()),
            (401, "missing_api_key".into())
        );
        let r = get(&gw, "/v1/usage", Some("pg_not-a-real-key-000000000000")).await;
        assert_eq!(
            (r.status.as_u16(), r.code()),
            (401, "invalid_api_key".into())
        );
        let r = gw
            .post("/v1/usage", Some(&key_a), &json!({"account": b}))
            .await;
        assert_eq!(r.status, 405);
        assert!(r.header("x-request-id").is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_usage_sums_and_pages() {
    for gw in TestGateway::each_backend().await {
        let (a, _) = gw.account(None).await;
        let (b, _) = gw.account(None).await;
        let (of_a, of_b) = seed(&gw, &a, &b).await;
        let t = Some(ADMIN_TOKEN);
        let admin = |path: String| {
            let gw = &gw;
            async move { gw.admin(Method::GET, &path, t, "").await }
        };

        let r = gw.admin(Method::GET, "/admin/usage", None, "").await;
        assert_eq!(r.status, 401);
        let r = admin("/admin/usage?group_by=hour".into()).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(
            r.json(),
            json!({"group_by": "hour", "buckets": [
                {"start": "2027-01-14T00:00:00.000Z", "requests": 2, "credits": 2, "units": {"token": 1100}},
                {"start": "2027-01-14T01:00:00.000Z", "requests": 2, "credits": 2, "units": {"token": 57}},
                {"start": "2027-01-14T02:00:00.000Z", "requests": 1, "credits": 1, "units": {"token": 9}},
            ]})
        );
        let r = admin(format!(
            "/admin/usage?account={a}&group_by=endpoint&endpoint=gpt-test"
        ))
        .await;
        assert_eq!(
            r.json()["buckets"],
            json!([{"endpoint": "gpt-test", "requests": 2, "credits": 2, "units": {"token": 150}}])
        );
        // An account that never existed has no usage, not a 404.
        let r = admin("/admin/usage?account=nobody".into()).await;
        assert_eq!(
            (r.status.as_u16(), r.json()["buckets"].clone()),
            (200, json!([]))
        );
        bad_param(
            &admin("/admin/usage?group_by=minute".into()).await,
            "group_by",
        );
        bad_param(&admin("/admin/usage?acount=x".into()).await, "acount");
        bad_param(&admin("/admin/usage?limit=5".into()).await, "limit");

        // Pages of two: every event exactly once, in (ended_at, id) order.
        let mut seen = Vec::new();
        let mut path = "/admin/usage/events?limit=2".to_string();
        let mut pages = 0;
        loop {
            let r = admin(path.clone()).await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            let v = r.json();
            let events = v["events"].as_array().unwrap();
            assert!(events.len() <= 2);
            seen.extend(
                events
                    .iter()
                    .map(|e| e["request_id"].as_str().unwrap().to_string()),
            );
            pages += 1;
            match v["next_cursor"].as_str() {
                Some(c) => path = format!("/admin/usage/events?limit=2&cursor={c}"),
                None => break,
            }
        }
        assert_eq!(seen, ["ra1", "rb1", "ra2", "ra3", "rb2"]);
        assert_eq!(pages, 3, "no empty last page");
        let r = admin(format!("/admin/usage/events?account={b}")).await;
        let v = r.json();
        assert_eq!(v["next_cursor"], serde_json::Value::Null);
        let got: Vec<UsageEvent> = serde_json::from_value(v["events"].clone()).unwrap();
        assert_eq!(got, of_b);
        assert_eq!(v["events"][0]["ended_at"], "2027-01-14T00:00:00.010Z");
        let r = admin(format!(
            "/admin/usage/events?account={a}&since=2027-01-14T01:00:00.010Z&endpoint=paid-model"
        ))
        .await;
        let got: Vec<UsageEvent> = serde_json::from_value(r.json()["events"].clone()).unwrap();
        assert_eq!(got, of_a[2..]);

        bad_param(
            &admin("/admin/usage/events?limit=1001".into()).await,
            "limit",
        );
        bad_param(&admin("/admin/usage/events?limit=0".into()).await, "limit");
        bad_param(
            &admin("/admin/usage/events?cursor=nope".into()).await,
            "cursor",
        );
        bad_param(
            &admin("/admin/usage/events?group_by=day".into()).await,
            "group_by",
        );
        bad_param(
            &admin("/admin/usage/events?until=2027-01-14&until=2027-01-15".into()).await,
            "until",
        );
        let r = admin("/admin/usage/events?limit=1000".into()).await;
        assert_eq!(r.json()["events"].as_array().unwrap().len(), 5);
    }
}

// ------------------------------------------------------------------ CLI

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn export(url: &str, args: &[&str]) -> Run {
    let out = std::process::Command::new(plangate_tests::plangate_bin())
        .args(["usage", "export"])
        .args(args)
        .env("PLANGATE_POSTGRES_URL", url)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A CSV line split into fields (RFC 4180 quoting).
fn csv_fields(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                fields.last_mut().unwrap().push('"');
            }
            ('"', _) => quoted = !quoted,
            (',', false) => fields.push(String::new()),
            (c, _) => fields.last_mut().unwrap().push(c),
        }
    }
    fields
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_export_streams_jsonl_and_csv() {
    let Some(url) = plangate_tests::postgres_db("usagecli").await else {
        return;
    };
    migrate(&url).await.unwrap();
    let c = PostgresCatalog::connect(&url, std::sync::Arc::new(SystemClock))
        .await
        .unwrap();
    // 23 events, ties on ended_at, two accounts, one awkward for CSV.
    let mut events = Vec::new();
    for i in 0..23u64 {
        let account = if i % 3 == 0 { "acme, \"inc\"" } else { "beta" };
        let mut e = ev(
            &format!("r{i:02}"),
            account,
            "gpt-test",
            D0 + (i / 4) * 1_000,
            i,
        );
        if i == 5 {
            e.units.push(UnitUsage {
                unit: "image".into(),
                measured: 2,
                reserved: 3,
            });
            e.key_id = None;
            e.cut_short = true;
        }
        events.push(e);
    }
    c.record_usage(&events).await.unwrap();
    let want = |f: &dyn Fn(&UsageEvent) -> bool| -> Vec<UsageEvent> {
        let mut v: Vec<UsageEvent> = events
            .iter()
            .filter(|e| f(e))
            .map(|e| e.normalized())
            .collect();
        v.sort_by(|a, b| (a.ended_at, &a.request_id).cmp(&(b.ended_at, &b.request_id)));
        v
    };

    // JSON lines, in pages of 4 (ties span pages), everything.
    let r = export(&url, &["--format", "jsonl", "--page-size", "4"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let got: Vec<UsageEvent> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(got, want(&|_| true));
    assert!(
        r.stderr.contains("exported 23 usage event(s)"),
        "{}",
        r.stderr
    );

    // One account and a time range (since inclusive, until exclusive).
    let r = export(
        &url,
        &[
            "--account",
            "beta",
            "--since",
            "2027-01-14T00:00:01Z",
            "--until",
            "2027-01-14T00:00:05Z",
            "--page-size",
            "3",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let got: Vec<UsageEvent> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let expected = want(&|e| {
        e.account_id == "beta" && e.ended_at >= at(D0 + 1_000) && e.ended_at < at(D0 + 5_000)
    });
    assert!(!expected.is_empty());
    assert_eq!(got, expected);

    // CSV: a header, then one line per event, fields as the events hold.
    let r = export(&url, &["--format", "csv", "--account", "acme, \"inc\""]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.split("\r\n").filter(|l| !l.is_empty()).collect();
    assert_eq!(
        csv_fields(lines[0]),
        [
            "request_id",
            "account_id",
            "key_id",
            "endpoint",
            "route",
            "status",
            "credits",
            "degraded",
            "streamed",
            "cut_short",
            "started_at",
            "ended_at",
            "units_measured",
            "units_reserved"
        ]
    );
    let expected = want(&|e| e.account_id.starts_with("acme"));
    assert_eq!(lines.len(), 1 + expected.len());
    for (line, e) in lines[1..].iter().zip(&expected) {
        let f = csv_fields(line);
        assert_eq!(f[0], e.request_id);
        assert_eq!(f[1], "acme, \"inc\"");
        assert_eq!(f[2], e.key_id.clone().unwrap_or_default());
        assert_eq!(json!(f[11]), serde_json::to_value(e).unwrap()["ended_at"]);
    }
    let r = export(
        &url,
        &[
            "--format",
            "csv",
            "--since",
            "2027-01-14T00:00:01Z",
            "--until",
            "2027-01-14T00:00:02Z",
        ],
    );
    let r05: Vec<String> = r
        .stdout
        .split("\r\n")
        .find(|l| l.starts_with("r05,"))
        .map(csv_fields)
        .expect("r05 exported");
    assert_eq!(r05[2], "");
    assert_eq!(r05[9], "true");
    assert_eq!(&r05[12..], ["image=2;token=5", "image=3;token=0"]);
    let ids: BTreeSet<&str> = r
        .stdout
        .split("\r\n")
        .skip(1)
        .filter_map(|l| l.split(',').next())
        .filter(|s| !s.is_empty())
        .collect();
    assert_eq!(ids, ["r04", "r05", "r06", "r07"].into());

    // Mistakes are one line and exit 2; an unreachable database exits 1.
    for args in [
        &["--since", "last week"][..],
        &["--format", "xml"][..],
        &["--page-size", "0"][..],
    ] {
        let r = export(&url, args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(!r.stderr.contains("panicked"));
    }
    let r = export("postgres://postgres@127.0.0.1:1/none", &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
}

/// The events of `account`, oldest first, once `n` have been recorded
/// (outboxes are written in the background).
async fn recorded(gw: &TestGateway, account: &str, n: usize) -> Vec<UsageEvent> {
    let q = plangate::catalog::UsageQuery {
        account_id: Some(account.to_owned()),
        ..Default::default()
    };
    let mut events = Vec::new();
    for _ in 0..300 {
        events = gw
            .catalog()
            .usage_events(&q, None, 100)
            .await
            .expect("events");
        if events.len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    events
}

/// Every admitted request that ends leaves exactly one usage record, keyed
/// by the gateway's request id (the `x-request-id` a client that sent none
/// gets back), with its key, endpoint, route, units, credits (admission +
/// per-unit), status, and whether it streamed and was cut short. Both
/// backends; on Redis the record travels through the account's outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_requests_leave_one_usage_record_each() {
    for gw in TestGateway::each_backend().await {
        let (account, key) = gw.account(None).await;
        gw.catalog()
            .create_quota_block(&account, 1_000, None, json!({}))
            .await
            .expect("grant");
        let chat = |model: &str, stream: bool| {
            json!({"model": model, "stream": stream,
                   "messages": [{"role": "user", "content": "hi"}]})
        };
        let plain = gw.chat(&key, "gpt-test").await;
        assert_eq!(plain.status, 200);
        let paid = gw
            .post_with(
                "/v1/chat/completions",
                Some(&key),
                &chat("paid-model", false),
                &[("x-mock-tokens", "250")],
            )
            .await;
        assert_eq!(paid.status, 200, "{:?}", paid.body);
        let mut cut = gw
            .post_streaming(
                "/v1/chat/completions",
                &key,
                &chat("gpt-test", true),
                &[("x-mock-chunks", "50"), ("x-mock-die-after", "10")],
            )
            .await;
        let (_, clean) = cut.read_all().await;
        assert!(!clean);
        gw.wait_settled().await;

        let events = recorded(&gw, &account, 3).await;
        assert_eq!(events.len(), 3, "{events:#?}");
        let by_id = |r: &Resp| {
            let id = r.header("x-request-id").expect("x-request-id");
            events
                .iter()
                .find(|e| e.request_id == id)
                .unwrap_or_else(|| panic!("no record for {id}: {events:#?}"))
                .clone()
        };
        let p = by_id(&plain);
        assert_eq!((p.endpoint.as_str(), p.status), ("gpt-test", 200));
        assert_eq!(p.route, "/v1/chat/completions");
        assert!(p.key_id.as_deref().is_some_and(|k| !k.is_empty()));
        assert!(!p.streamed && !p.cut_short && !p.degraded);
        assert_eq!(p.credits, 0);
        assert!(p.started_at <= p.ended_at);
        let tokens = |e: &UsageEvent| {
            e.units
                .iter()
                .find(|u| u.unit == "token")
                .map(|u| u.measured)
        };
        assert!(tokens(&p).is_some_and(|t| t > 0), "{p:?}");
        let q = by_id(&paid);
        assert_eq!(q.endpoint, "paid-model");
        assert_eq!(tokens(&q), Some(250));
        // 1 at admission + ceil(250 / 100) per unit.
        assert_eq!(q.credits, 1 + 3, "{q:?}");
        let ledger = gw.catalog().ledger(&account).await.expect("ledger");
        let charged: u64 = ledger.iter().map(|e| e.deducted - e.refunded).sum();
        assert_eq!(charged, q.credits, "usage and ledger agree");
        let c = events
            .iter()
            .find(|e| e.request_id != p.request_id && e.request_id != q.request_id)
            .expect("the cut stream's record");
        assert!(c.streamed && c.cut_short, "{c:?}");
        assert_eq!(c.endpoint, "gpt-test");
    }
}
