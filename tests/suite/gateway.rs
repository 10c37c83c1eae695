//! Black-box tests of the gateway: real listeners, the mock OpenAI server
//! as a real upstream, on the in-process and the Postgres + Redis backends.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use plangate_tests::harness::{Backend, Options, TestGateway, ADMIN_TOKEN};
use serde_json::json;

async fn gateways() -> Vec<TestGateway> {
    TestGateway::each_backend().await
}

/// One gateway per backend whose plans the database owns (`[plans] source
/// = "database"`), so that the admin API may change them.
async fn database_plans_gateways() -> Vec<TestGateway> {
    let mut out = Vec::new();
    for backend in Backend::all().await {
        let mut opts = Options::new(backend);
        opts.plans_source = "database";
        out.push(TestGateway::start(opts).await);
    }
    out
}

fn chat_body(model: &str) -> serde_json::Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hello"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_and_invalid_keys_are_401_and_never_reach_upstream() {
    for gw in gateways().await {
        let r = gw
            .post("/v1/chat/completions", None, &chat_body("gpt-test"))
            .await;
        assert_eq!(r.status, 401);
        assert_eq!(r.code(), "missing_api_key");
        assert_eq!(r.json()["error"]["param"], serde_json::Value::Null);

        let bogus = "pg_0123456789abcdef0123456789abcdef";
        let r = gw
            .post("/v1/chat/completions", Some(bogus), &chat_body("gpt-test"))
            .await;
        assert_eq!(r.status, 401);
        assert_eq!(r.code(), "invalid_api_key");
        let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(!msg.contains(bogus), "key must be masked: {msg}");

        // Absurd length and control characters: 401, no panic.
        let long = "k".repeat(10_000);
        let r = gw
            .post("/v1/chat/completions", Some(&long), &chat_body("gpt-test"))
            .await;
        assert_eq!(r.status, 401);
        // Tabs and non-ASCII bytes are legal in a header value but never in a key.
        for raw in [&b"Bearer pg_ab\tcd"[..], &b"Bearer pg_\xff\xfe\x80"[..]] {
            let req = Request::builder()
                .method(Method::POST)
                .uri("/v1/chat/completions")
                .header("authorization", http::HeaderValue::from_bytes(raw).unwrap())
                .body(Full::new(Bytes::from(chat_body("gpt-test").to_string())))
                .unwrap();
            let r = gw.send(req).await;
            assert_eq!(r.status, 401);
        }

        // A revoked key stops working.
        let (account, key) = gw.account(None).await;
        assert_eq!(gw.chat(&key, "gpt-test").await.status, 200);
        let keys = gw.catalog().list_keys(&account).await.unwrap();
        gw.catalog().revoke_key(&keys[0].id).await.unwrap();
        // The invalidation reaches the cache through its follow task, so a
        // request right after the revocation may still pass on a loaded
        // machine: those are counted, not failed.
        let mut revoked = false;
        let mut admitted_while_revoking = 0;
        for _ in 0..100 {
            match gw.chat(&key, "gpt-test").await.status.as_u16() {
                401 => {
                    revoked = true;
                    break;
                }
                200 => admitted_while_revoking += 1,
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(revoked, "revoked key still admitted after 5 s");
        assert_eq!(
            gw.mock.requests(),
            1 + admitted_while_revoking,
            "only requests with the valid key reached the upstream"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_route_endpoint_not_allowed_and_bad_bodies() {
    for gw in gateways().await {
        let (_, key) = gw.account(None).await;
        let r = gw.post("/v2/nothing", Some(&key), &json!({})).await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (StatusCode::NOT_FOUND, "unknown_route")
        );

        let r = gw.chat(&key, "other-model").await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (StatusCode::FORBIDDEN, "endpoint_not_allowed")
        );
        assert_eq!(
            r.json()["error"]["message"],
            "no access to endpoint: other-model"
        );

        let req = Request::builder()
            .method(Method::POST)
            .uri("/v1/chat/completions")
            .header("authorization", format!("Bearer {key}"))
            .body(Full::new(Bytes::from_static(b"{not json")))
            .unwrap();
        let r = gw.send(req).await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (StatusCode::BAD_REQUEST, "invalid_request")
        );

        let r = gw
            .post("/v1/chat/completions", Some(&key), &json!({"messages": []}))
            .await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (StatusCode::BAD_REQUEST, "invalid_request")
        );
        assert_eq!(
            gw.mock.requests(),
            0,
            "refused requests never reach the upstream"
        );
    }
}

/// Every response is counted in `plangate_requests_total`, once, with the
/// stage that decided it: refusals before the endpoint is known (no key,
/// bad key, no route, unreadable body) under `_none`, an endpoint the plan
/// lacks under `_unknown`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_is_counted_once() {
    for gw in gateways().await {
        let (_, key) = gw.account(None).await;
        let mut sent = 0;
        let mut send = |status: StatusCode, r: plangate_tests::harness::Resp| {
            assert_eq!(r.status, status, "{:?}", r.body);
            sent += 1;
        };
        send(
            StatusCode::UNAUTHORIZED,
            gw.post("/v1/chat/completions", None, &chat_body("gpt-test"))
                .await,
        );
        send(
            StatusCode::UNAUTHORIZED,
            gw.post(
                "/v1/chat/completions",
                Some("sk-wrong-key-000000000000000000"),
                &chat_body("gpt-test"),
            )
            .await,
        );
        send(
            StatusCode::NOT_FOUND,
            gw.post("/v2/nothing", Some(&key), &json!({})).await,
        );
        send(
            StatusCode::BAD_REQUEST,
            gw.post("/v1/chat/completions", Some(&key), &json!({"messages": []}))
                .await,
        );
        send(StatusCode::FORBIDDEN, gw.chat(&key, "other-model").await);
        send(StatusCode::OK, gw.chat(&key, "gpt-test").await);
        let text = gw.core.metrics.render();
        let counted: u64 = text
            .lines()
            .filter(|l| l.starts_with("plangate_requests_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        assert_eq!(counted, sent, "{text}");
        for line in [
            r#"plangate_requests_total{endpoint="_none",decision="missing_api_key",status="401"} 1"#,
            r#"plangate_requests_total{endpoint="_none",decision="invalid_api_key",status="401"} 1"#,
            r#"plangate_requests_total{endpoint="_none",decision="unknown_route",status="404"} 1"#,
            r#"plangate_requests_total{endpoint="_none",decision="invalid_request",status="400"} 1"#,
            r#"plangate_requests_total{endpoint="_unknown",decision="no_access",status="403"} 1"#,
            r#"plangate_requests_total{endpoint="gpt-test",decision="admitted",status="200"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_headers_count_down_and_429_carries_openai_fields() {
    for gw in gateways().await {
        let (_, key) = gw.account(None).await;
        let mut tokens_before = None;
        for expected_remaining in [2u64, 1, 0] {
            let r = gw.chat(&key, "gpt-test").await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            assert_eq!(r.header("x-ratelimit-limit-requests"), Some("3"));
            assert_eq!(
                r.header("x-ratelimit-remaining-requests"),
                Some(expected_remaining.to_string().as_str())
            );
            // The clock stands 20 s into the minute.
            assert_eq!(r.header("x-ratelimit-reset-requests"), Some("40s"));
            assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("1000"));
            assert_eq!(r.header("x-ratelimit-limit-concurrency"), Some("2"));
            assert!(r.header("x-request-id").is_some());
            let usage = r.json()["usage"]["total_tokens"].as_u64().unwrap();
            let remaining: u64 = r
                .header("x-ratelimit-remaining-tokens")
                .unwrap()
                .parse()
                .unwrap();
            if let Some((prev_remaining, prev_usage)) = tokens_before {
                // Headers are rendered at admission: they reflect the
                // previous response's usage, settled at its end.
                assert_eq!(
                    remaining,
                    prev_remaining - prev_usage,
                    "token window counts usage"
                );
            }
            tokens_before = Some((remaining, usage));
            // Let the settlement task of this response run.
            wait_settled(&gw).await;
        }
        let r = gw.chat(&key, "gpt-test").await;
        assert_eq!(r.status, 429);
        assert_eq!(r.code(), "rate_limit_exceeded");
        assert_eq!(r.json()["error"]["type"], "requests");
        assert_eq!(r.header("retry-after"), Some("40"));
        assert_eq!(r.header("retry-after-ms"), Some("40000"));
        assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));
        assert_eq!(
            r.json()["error"]["message"],
            "Rate limit reached for gpt-test on requests per 1m: Limit 3, Used 3, Requested 1. Please try again in 40s."
        );
        assert_eq!(
            gw.mock.requests(),
            3,
            "the denied request never reached the upstream"
        );

        // The next minute admits again.
        gw.clock.advance(Duration::from_secs(40));
        let r = gw.chat(&key, "gpt-test").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("2"));
        assert_eq!(r.header("x-ratelimit-reset-requests"), Some("1m0s"));
    }
}

/// Wait until no settlement is pending: the in-flight slot gauge is back
/// to zero. Bounded; it waits for a background task, not for a window.
async fn wait_settled(gw: &TestGateway) {
    for _ in 0..200 {
        if gw.core.metrics.in_flight() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("requests still in flight after 1 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_too_large_and_concurrency_limit() {
    for gw in gateways().await {
        let (_, key) = gw.account(None).await;
        let r = gw
            .post(
                "/v1/chat/completions",
                Some(&key),
                &json!({"model": "gpt-test", "max_tokens": 5000, "messages": []}),
            )
            .await;
        assert_eq!(r.status, 429);
        assert_eq!(r.code(), "request_too_large");
        assert_eq!(r.header("x-should-retry"), Some("false"));

        // Two slow requests hold both slots; the third is refused.
        let body = chat_body("gpt-test");
        let slow = || {
            gw.post_with(
                "/v1/chat/completions",
                Some(&key),
                &body,
                &[("x-mock-delay-ms", "800")],
            )
        };
        let (a, b, c) = tokio::join!(slow(), slow(), async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            gw.chat(&key, "gpt-test").await
        });
        assert_eq!((a.status, b.status), (StatusCode::OK, StatusCode::OK));
        assert_eq!(c.status, 429);
        assert_eq!(c.code(), "concurrency_limit_exceeded");
        assert_eq!(c.header("retry-after"), Some("1"));
        assert_eq!(c.header("x-ratelimit-remaining-concurrency"), Some("0"));
        wait_settled(&gw).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_charged_at_admission_and_per_unit_and_insufficient_quota() {
    for gw in gateways().await {
        let (account, key) = gw.account(None).await;
        let r = gw.chat(&key, "paid-model").await;
        assert_eq!(r.status, 429);
        assert_eq!(r.code(), "insufficient_quota");
        assert_eq!(r.json()["error"]["type"], "insufficient_quota");
        assert_eq!(r.header("x-should-retry"), Some("false"));
        assert_eq!(gw.mock.requests(), 0);
        // A refusal takes nothing, and its headers say so: the state after
        // it, twice in a row (100 requests a minute on paid-model).
        assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("100"));
        let again = gw.chat(&key, "paid-model").await;
        assert_eq!(again.code(), "insufficient_quota");
        assert_eq!(again.header("x-ratelimit-remaining-requests"), Some("100"));

        gw.catalog()
            .create_quota_block(&account, 10, None, json!({}))
            .await
            .unwrap();
        // The grant reaches the gateway's wallet with its notification.
        let mut r = gw.chat(&key, "paid-model").await;
        for _ in 0..200 {
            if r.status == 200 {
                break;
            }
            assert_eq!(r.code(), "insufficient_quota");
            tokio::time::sleep(Duration::from_millis(10)).await;
            r = gw.chat(&key, "paid-model").await;
        }
        assert_eq!(r.status, 200);
        // 1 per request at admission.
        assert_eq!(r.header("x-credits-remaining"), Some("9"));
        let tokens = r.json()["usage"]["total_tokens"].as_u64().unwrap();
        // Per unit: 1 credit per 100 tokens, rounded up, charged at the end.
        let expected = 9 - tokens.div_ceil(100);
        let mut balance = 0;
        for _ in 0..100 {
            balance = gw.catalog().balance(&account).await.unwrap();
            if balance == expected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(balance, expected);
        // The next request's header includes the previous request's
        // per-unit charge (no lag) and its own admission charge.
        let r = gw.chat(&key, "paid-model").await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("x-credits-remaining"),
            Some((expected - 1).to_string().as_str())
        );
        wait_settled(&gw).await;
        for _ in 0..300 {
            if gw.core.outbox.pending_accounts() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        // Upstream failure refunds the admission charge.
        let before = gw.catalog().balance(&account).await.unwrap();
        let r = gw
            .post_with(
                "/v1/chat/completions",
                Some(&key),
                &chat_body("paid-model"),
                &[("x-mock-status", "500")],
            )
            .await;
        assert_eq!(r.status, 500);
        let mut after = 0;
        for _ in 0..100 {
            after = gw.catalog().balance(&account).await.unwrap();
            if after == before {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            after, before,
            "admission charge refunded after an upstream 5xx"
        );
        // One row per served request: each one's usage record carries its
        // charge (admission + per-unit), shown in the ledger as `req:<id>`;
        // Postgres has no ledger row of its own for it.
        let ledger = gw.catalog().ledger(&account).await.unwrap();
        let charged: Vec<u64> = ledger.iter().map(|e| e.deducted).collect();
        assert_eq!(charged.len(), 2, "{ledger:#?}");
        assert_eq!(charged.iter().sum::<u64>(), 10 - after);
        assert!(ledger.iter().all(|e| e.idempotency_key.starts_with("req:")));
        if let Some(url) = &gw.config.storage.postgres_url {
            let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            let row = client
                .query_one(
                    "SELECT (SELECT count(*) FROM credit_ledger WHERE account_id = $1),
                            (SELECT count(*) FROM usage_events
                             WHERE account_id = $1 AND draws IS NOT NULL)",
                    &[&account],
                )
                .await
                .unwrap();
            let rows: (i64, i64) = (row.get(0), row.get(1));
            assert_eq!(rows, (0, 2), "(ledger rows, usage rows with a charge)");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_413_and_oversized_headers_431() {
    for gw in gateways().await {
        let (_, key) = gw.account(None).await;
        // A declared oversized body is refused before any of it is sent
        // (raw socket: a client still writing would race the early answer).
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: 102400\r\n\r\n"
        );
        assert_eq!(raw_status(gw.addr, head.as_bytes()).await, Some(413));

        // An oversized head: 431. The server stops reading at its limit and
        // closes; the client can see a reset instead of the answer, so try a
        // few times and require the answer to be 431 whenever it arrives.
        let huge = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\nx-huge: {}\r\ncontent-length: 2\r\n\r\n{{}}",
            "h".repeat(100 * 1024)
        );
        let mut seen = Vec::new();
        for _ in 0..5 {
            if let Some(status) = raw_status(gw.addr, huge.as_bytes()).await {
                seen.push(status);
            }
        }
        assert!(
            !seen.is_empty() && seen.iter().all(|s| *s == 431),
            "statuses: {seen:?}"
        );
        assert_eq!(gw.mock.requests(), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_requires_token_and_manages_everything() {
    for gw in database_plans_gateways().await {
        use http::Method as M;
        let r = gw.admin(M::GET, "/admin/plans", None, "").await;
        assert_eq!(r.status, 401);
        let r = gw.admin(M::GET, "/admin/plans", Some("wrong"), "").await;
        assert_eq!(r.status, 401);
        let r = gw.admin(M::GET, "/metrics", None, "").await;
        assert_eq!(r.status, 401);

        let t = Some(ADMIN_TOKEN);
        let r = gw.admin(M::GET, "/admin/plans", t, "").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["default_plan"], "basic");
        assert!(r.json()["plans"]["other"].is_object());

        let r = gw.admin(M::DELETE, "/admin/plans/basic", t, "").await;
        assert_eq!(r.status, 409, "the default plan cannot be deleted");

        let id = plangate_tests::harness::unique("adm");
        let r = gw
            .admin(
                M::POST,
                "/admin/accounts",
                t,
                &json!({"id": id, "metadata": {"tier": "x"}}).to_string(),
            )
            .await;
        assert_eq!(r.status, 201, "{:?}", r.body);
        let r = gw
            .admin(M::GET, &format!("/admin/accounts/{id}"), t, "")
            .await;
        assert_eq!(r.json()["effective_plan"], "basic");
        assert_eq!(r.json()["plan_id"], serde_json::Value::Null);
        let r = gw
            .admin(
                M::POST,
                "/admin/accounts",
                t,
                &json!({"id": id}).to_string(),
            )
            .await;
        assert_eq!(r.status, 409, "duplicate account");

        let r = gw
            .admin(M::POST, &format!("/admin/accounts/{id}/keys"), t, "")
            .await;
        assert_eq!(r.status, 201);
        let key = r.json()["key"].as_str().unwrap().to_owned();
        let key_id = r.json()["id"].as_str().unwrap().to_owned();
        assert!(key.starts_with("pg_"));

        let r = gw
            .admin(
                M::PUT,
                &format!("/admin/accounts/{id}/plan"),
                t,
                &json!({"plan_id": "other"}).to_string(),
            )
            .await;
        assert_eq!(r.status, 200);
        let r = gw.admin(M::DELETE, "/admin/plans/other", t, "").await;
        assert_eq!(r.status, 409, "a plan in use cannot be deleted");

        let r = gw
            .admin(
                M::POST,
                &format!("/admin/accounts/{id}/quota-blocks"),
                t,
                &json!({"credits": 50, "expires_at": "2099-01-01T00:00:00Z"}).to_string(),
            )
            .await;
        assert_eq!(r.status, 201, "{:?}", r.body);
        let block_id = r.json()["id"].as_str().unwrap().to_owned();
        let r = gw
            .admin(M::GET, &format!("/admin/accounts/{id}/balance"), t, "")
            .await;
        assert_eq!(r.json()["balance"], 50);
        let r = gw
            .admin(M::GET, &format!("/admin/accounts/{id}/quota-blocks"), t, "")
            .await;
        assert_eq!(r.status, 200);
        let r = gw
            .admin(
                M::POST,
                &format!("/admin/accounts/{id}/quota-blocks/expire"),
                t,
                "",
            )
            .await;
        assert_eq!(r.status, 200);
        let r = gw
            .admin(M::GET, &format!("/admin/accounts/{id}/balance"), t, "")
            .await;
        assert_eq!(r.json()["balance"], 0);
        let r = gw
            .admin(M::DELETE, &format!("/admin/quota-blocks/{block_id}"), t, "")
            .await;
        assert_eq!(r.status, 200);

        let r = gw
            .admin(
                M::GET,
                &format!("/admin/accounts/{id}/limits?endpoint=other-model"),
                t,
                "",
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(
            r.json()["endpoints"]["other-model"]["windows"][0]["limit"],
            5
        );

        // New plans via the API, in YAML.
        let yaml = "plans:\n  extra:\n    endpoints:\n      \"x\":\n        fixed_windows:\n          - window: 1m\n            limit: 7\n";
        let r = gw.admin(M::PUT, "/admin/plans", t, yaml).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        let r = gw.admin(M::GET, "/admin/plans/extra", t, "").await;
        assert_eq!(r.status, 200);
        let bad = "plans:\n  extra:\n    endpoints:\n      \"x\":\n        sliding_windows: []\n";
        let r = gw.admin(M::PUT, "/admin/plans", t, bad).await;
        assert_eq!(r.status, 400);
        assert!(r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("fixed_windows"));
        let r = gw
            .admin(
                M::PUT,
                "/admin/default-plan",
                t,
                &json!({"plan_id": "extra"}).to_string(),
            )
            .await;
        assert_eq!(r.status, 200);
        let r = gw.admin(M::GET, "/admin/plans/nope", t, "").await;
        assert_eq!(r.status, 404);

        let r = gw
            .admin(M::DELETE, &format!("/admin/keys/{key_id}"), t, "")
            .await;
        assert_eq!(r.status, 200);
        let r = gw.admin(M::GET, "/metrics", t, "").await;
        assert_eq!(r.status, 200);
        // The background executor's view (issue 12 item 3): every job kind.
        let text = String::from_utf8_lossy(&r.body).into_owned();
        for job in ["settle", "release", "renew", "write_charges"] {
            assert!(
                text.contains(&format!("plangate_background_jobs{{job=\"{job}\"}} ")),
                "{text}"
            );
        }
        assert!(text.contains("# TYPE plangate_background_oldest_seconds gauge"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_endpoint_reports_every_window() {
    for gw in gateways().await {
        let (account, key) = gw.account(None).await;
        assert_eq!(gw.chat(&key, "gpt-test").await.status, 200);
        wait_settled(&gw).await;
        let req = Request::builder()
            .uri("/v1/limits")
            .header("authorization", format!("Bearer {key}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let r = gw.send(req).await;
        assert_eq!(r.status, 200);
        let v = r.json();
        assert_eq!(v["account"], account.as_str());
        assert_eq!(v["plan"], "basic");
        let w = &v["endpoints"]["gpt-test"]["windows"];
        assert_eq!(w[0]["unit"], "request");
        assert_eq!(w[0]["window_seconds"], 60);
        assert_eq!(w[0]["used"], 1);
        assert_eq!(w[0]["remaining"], 2);
        assert_eq!(w[0]["reset_ms"], 40_000);
        assert!(w[2]["used"].as_u64().unwrap() > 0, "tokens counted: {w}");
        assert_eq!(v["endpoints"]["gpt-test"]["concurrency"]["in_use"], 0);
        assert_eq!(v["credits"]["balance"], 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_strips_hop_by_hop_and_the_clients_key_and_keeps_request_id() {
    for gw in gateways().await {
        let (_, key) = gw.account(None).await;
        let r = gw
            .post_with(
                "/v1/chat/completions",
                Some(&key),
                &chat_body("gpt-test"),
                &[
                    ("x-request-id", "client-req-42"),
                    ("connection", "x-private-hop"),
                    ("x-private-hop", "1"),
                    ("te", "trailers"),
                    ("proxy-authorization", "Basic abc"),
                    ("x-custom", "kept"),
                ],
            )
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-request-id"), Some("client-req-42"));
        let fwd = gw.mock.stats().last_request().expect("forwarded");
        let h = &fwd.headers;
        assert_eq!(h.get("x-request-id").unwrap(), "client-req-42");
        assert_eq!(h.get("x-custom").unwrap(), "kept");
        for gone in ["x-private-hop", "te", "proxy-authorization"] {
            assert!(h.get(gone).is_none(), "{gone} must not be forwarded");
        }
        assert!(
            h.get("authorization").is_none(),
            "the client's plangate key must not reach the upstream"
        );
        // Without a client id the gateway makes one.
        let r = gw.chat(&key, "gpt-test").await;
        assert!(r
            .header("x-request-id")
            .is_some_and(|v| v.starts_with("req_")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness() {
    for gw in gateways().await {
        let get = |path: &str| {
            Request::builder()
                .uri(path)
                .body(Full::new(Bytes::new()))
                .unwrap()
        };
        let r = gw.send(get("/healthz")).await;
        assert_eq!(r.status, 200);
        let r = gw.send(get("/readyz")).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.json()["ready"], true);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outage_open_admits_degraded_and_closed_refuses() {
    // A port nothing listens on: the counter store is down from the start.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("redis://127.0.0.1:{}", l.local_addr().unwrap().port())
    };
    if Backend::all().await.contains(&Backend::Real) {
        for (mode, status) in [("open", 200u16), ("closed", 503)] {
            let mut opts = Options::new(Backend::Real);
            opts.redis_url = Some(dead.clone());
            opts.on_store_error = mode;
            let gw = TestGateway::start(opts).await;
            let (_, key) = gw.account(None).await;
            let r = gw.chat(&key, "gpt-test").await;
            assert_eq!(r.status, status, "on_store_error={mode}: {:?}", r.body);
            if mode == "open" {
                assert_eq!(r.header("x-ratelimit-degraded"), Some("true"));
            } else {
                assert_eq!(r.code(), "limiter_unavailable");
            }
            let ready = gw
                .send(
                    Request::builder()
                        .uri("/readyz")
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                )
                .await;
            assert_eq!(ready.status, 503, "not ready without the counter store");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_without_postgres_not_ready_and_answering_503() {
    if !Backend::all().await.contains(&Backend::Real) {
        return;
    }
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!(
            "postgres://postgres@127.0.0.1:{}/nothing",
            l.local_addr().unwrap().port()
        )
    };
    let mut opts = Options::new(Backend::Real);
    opts.postgres_url = Some(dead);
    let gw = TestGateway::start(opts).await;
    let get = |path: &str| {
        Request::builder()
            .uri(path)
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    assert_eq!(gw.send(get("/healthz")).await.status, 200);
    assert_eq!(gw.send(get("/readyz")).await.status, 503);
    let r = gw
        .chat("pg_0123456789abcdef0123456789abcdef01234567890", "gpt-test")
        .await;
    assert_eq!(r.status, 503);
    assert_eq!(r.code(), "catalog_unavailable");
    assert_eq!(gw.mock.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_count_n_or_one_per_request() {
    for gw in gateways().await {
        let (_, key) = gw.account(None).await;
        let path = "/v1/images/generations";
        let r = gw.post(path, Some(&key), &json!({"prompt": "a cat"})).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.header("x-ratelimit-limit-images"), Some("2"));
        assert_eq!(r.header("x-ratelimit-remaining-images"), Some("1"));
        let r = gw
            .post(path, Some(&key), &json!({"prompt": "a cat", "n": 5}))
            .await;
        assert_eq!(r.code(), "request_too_large");
        let r = gw
            .post(path, Some(&key), &json!({"prompt": "a dog", "n": 1}))
            .await;
        assert_eq!(r.status, 200);
        gw.wait_settled().await;
        let r = gw
            .post(path, Some(&key), &json!({"prompt": "a bird"}))
            .await;
        assert_eq!(r.status, 429);
        assert_eq!(r.json()["error"]["type"], "images");
    }
}

/// Write `request` on a fresh connection (ignoring write errors: the server
/// may answer and close early) and return the status of the answer, if one
/// arrives.
async fn raw_status(addr: std::net::SocketAddr, request: &[u8]) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.ok()?;
    let _ = conn.write_all(request).await;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), conn.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&buf);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// Metering integrity: the admin API refuses plans whose units no route
/// measures or reserves and numbers the stores cannot hold (400 with
/// where and why), and bounds grants so no balance can overflow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_refuses_unmeasured_units_and_numbers_beyond_the_bounds() {
    const MAX: u64 = plangate::plans::MAX_AMOUNT;
    for gw in database_plans_gateways().await {
        use http::Method as M;
        let t = Some(ADMIN_TOKEN);
        let typo = "plans:\n  extra:\n    endpoints:\n      \"x\":\n        fixed_windows:\n          - window: 1m\n            limit: 7\n            unit_type: tokens\n";
        let r = gw.admin(M::PUT, "/admin/plans", t, typo).await;
        assert_eq!(r.status, 400, "{:?}", r.body);
        assert_eq!(r.code(), "invalid_request");
        let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
        assert_eq!(
            message,
            "<request body>:8:24: plans.extra.endpoints.x.fixed_windows[0].unit_type: unit `tokens` \
             is not measured or reserved by any route (known: request, image, token); did you mean `token`?"
        );
        let r = gw.admin(M::GET, "/admin/plans/extra", t, "").await;
        assert_eq!(r.status, 404, "nothing applied");
        // Units the test routes do measure or reserve are fine.
        let fine = typo.replace("tokens", "image");
        let r = gw.admin(M::PUT, "/admin/plans", t, &fine).await;
        assert_eq!(r.status, 200, "{:?}", r.body);

        let huge = json!({"plans": {"big": {"endpoints": {"x": {
            "fixed_windows": [{"window": "60s", "limit": 18446744073709551615u64}],
            "credits": {"per_request": 9223372036854775807u64}
        }}}}});
        let r = gw.admin(M::PUT, "/admin/plans", t, &huge.to_string()).await;
        assert_eq!(r.status, 400, "{:?}", r.body);
        let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
        for needle in [
            "plans.big.endpoints.x.fixed_windows[0].limit: `18446744073709551615` is too large: must be at most 1000000000000000",
            "plans.big.endpoints.x.credits.per_request: `9223372036854775807` is too large",
        ] {
            assert!(message.contains(needle), "missing {needle} in {message}");
        }

        let id = plangate_tests::harness::unique("bounds");
        let r = gw
            .admin(
                M::POST,
                "/admin/accounts",
                t,
                &json!({"id": id}).to_string(),
            )
            .await;
        assert_eq!(r.status, 201);
        let blocks = format!("/admin/accounts/{id}/quota-blocks");
        for credits in [
            json!(MAX + 1),
            json!(i64::MAX),
            json!(u64::MAX),
            json!(1e19),
        ] {
            let r = gw
                .admin(
                    M::POST,
                    &blocks,
                    t,
                    &json!({"credits": credits}).to_string(),
                )
                .await;
            assert_eq!(r.status, 400, "credits {credits}: {:?}", r.body);
            assert_eq!(r.code(), "invalid_request");
        }
        let r = gw
            .admin(
                M::POST,
                &blocks,
                t,
                &json!({"credits": MAX - 5}).to_string(),
            )
            .await;
        assert_eq!(r.status, 201, "{:?}", r.body);
        let r = gw
            .admin(M::POST, &blocks, t, &json!({"credits": 6}).to_string())
            .await;
        assert_eq!(r.status, 400, "{:?}", r.body);
        assert_eq!(r.code(), "invalid_request");
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("above the largest balance, 1000000000000000"),
            "{:?}",
            r.body
        );
        let r = gw
            .admin(M::GET, &format!("/admin/accounts/{id}/balance"), t, "")
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.json()["balance"], MAX - 5);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_request_ids_are_bounded_correlation_ids_never_ledger_keys() {
    for gw in gateways().await {
        let (a, key_a) = gw.account(None).await;
        let (b, key_b) = gw.account(None).await;
        for (acct, _) in [(&a, &key_a), (&b, &key_b)] {
            gw.catalog()
                .create_quota_block(acct, 100, None, json!({}))
                .await
                .unwrap();
        }
        // Tenant A's request, correlated by A's id.
        let r = gw
            .post_with(
                "/v1/chat/completions",
                Some(&key_a),
                &chat_body("paid-model"),
                &[("x-request-id", "tenant-a-0001")],
            )
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-request-id"), Some("tenant-a-0001"));
        // Tenant B puts A's id on its own request, then a 30 KB one.
        let r = gw
            .post_with(
                "/v1/chat/completions",
                Some(&key_b),
                &chat_body("paid-model"),
                &[("x-request-id", "tenant-a-0001")],
            )
            .await;
        assert_eq!(r.status, 200);
        let huge = "x".repeat(30_000);
        let r = gw
            .post_with(
                "/v1/chat/completions",
                Some(&key_b),
                &chat_body("paid-model"),
                &[("x-request-id", &huge)],
            )
            .await;
        assert_eq!(r.status, 200);
        let echoed = r.header("x-request-id").unwrap().to_owned();
        assert!(echoed.starts_with("req_") && echoed.len() < 64, "{echoed}");
        gw.wait_settled().await;
        // Ledger rows carry the gateway's ids only.
        for acct in [&a, &b] {
            let mut rows = Vec::new();
            for _ in 0..100 {
                rows = gw.catalog().ledger(acct).await.unwrap();
                if rows
                    .iter()
                    .filter(|e| e.idempotency_key.starts_with("req:"))
                    .count()
                    >= if acct == &a { 1 } else { 2 }
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(!rows.is_empty());
            for e in rows {
                let id = e.request_id.unwrap_or_default();
                assert!(id.starts_with("req_") && id.len() < 64, "{acct}: {id}");
            }
        }
        // Every response carries one, refusals included.
        let r = gw
            .post("/v1/chat/completions", None, &chat_body("gpt-test"))
            .await;
        assert_eq!(r.status, 401);
        assert!(r.header("x-request-id").unwrap().starts_with("req_"));
        let r = gw
            .post("/v1/nowhere", Some(&key_a), &chat_body("gpt-test"))
            .await;
        assert_eq!(r.status, 404);
        assert!(r.header("x-request-id").is_some());
        let r = gw
            .post_with(
                "/v1/chat/completions",
                Some(&key_a),
                &json!({"model": "gpt-test", "stream": "yes"}),
                &[("x-request-id", "bad-request-7")],
            )
            .await;
        assert_eq!(r.status, 400);
        assert_eq!(r.header("x-request-id"), Some("bad-request-7"));
    }
}

/// Shadow mode through the gateway (issue 15 item 6): a plan with
/// `enforce: false` answers every request; one its limits would refuse
/// carries `x-ratelimit-would-deny` with the refusal's code, the headers
/// show the windows as they are, and `/metrics` counts it in
/// `plangate_would_deny_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_admits_counts_and_reports() {
    for backend in Backend::all().await {
        let mut opts = Options::new(backend);
        opts.plans = plangate_tests::harness::TEST_PLANS.replace(
            "  basic:\n    name: Basic\n",
            "  basic:\n    name: Basic\n    enforce: false\n",
        );
        assert!(opts.plans.contains("enforce: false"));
        let gw = TestGateway::start(opts).await;
        let (_, key) = gw.account(None).await;
        let mut would = Vec::new();
        for _ in 0..5 {
            let r = gw.chat(&key, "gpt-test").await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            would.push(r.header("x-ratelimit-would-deny").map(str::to_owned));
            gw.wait_settled().await;
        }
        assert_eq!(
            would,
            vec![
                None,
                None,
                None,
                Some("rate_limit_exceeded".to_owned()),
                Some("rate_limit_exceeded".to_owned())
            ],
            "3 requests a minute: the 4th and 5th would be refused"
        );
        let limits = gw.limits(&key).await;
        let w = &limits["endpoints"]["gpt-test"]["windows"][0];
        assert_eq!(
            (w["used"].as_u64(), w["remaining"].as_u64()),
            (Some(5), Some(0))
        );
        let m = gw
            .admin(Method::GET, "/metrics", Some(ADMIN_TOKEN), "")
            .await;
        let text = String::from_utf8_lossy(&m.body).into_owned();
        assert!(
            text.contains("plangate_would_deny_total{endpoint=\"gpt-test\"} 2\n"),
            "{text}"
        );
        gw.stop().await;
    }
}

/// Fit instead of fail (issue 15 item 5): on a route with
/// `cap.token = "max_tokens"`, a request asking for more tokens than its
/// windows have left, or asking nothing, is admitted with `max_tokens`
/// rewritten to what is left and says so in `x-ratelimit-capped-tokens`;
/// one that fits is untouched; with nothing left it is refused as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capped_requests_fit_instead_of_failing() {
    for gw in gateways().await {
        let (_, key) = gw.account(None).await;
        let sent_max_tokens = || {
            let sent = gw.mock.stats().last_request().expect("forwarded");
            let v: serde_json::Value = serde_json::from_slice(&sent.body).expect("json");
            v.get("max_tokens").and_then(serde_json::Value::as_u64)
        };
        let chat = |max_tokens: Option<u64>, tokens: &'static str| {
            let mut body =
                json!({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]});
            if let Some(n) = max_tokens {
                body["max_tokens"] = json!(n);
            }
            let key = key.clone();
            let gw = &gw;
            async move {
                gw.post_with(
                    "/capped/v1/chat/completions",
                    Some(&key),
                    &body,
                    &[("x-mock-tokens", tokens)],
                )
                .await
            }
        };
        // The plan allows 1,000 tokens a minute. Asking 5,000: capped to 1,000.
        let r = chat(Some(5_000), "600").await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.header("x-ratelimit-capped-tokens"), Some("1000"));
        assert_eq!(sent_max_tokens(), Some(1_000));
        gw.wait_settled().await;
        // 600 used: asking 100 fits, untouched.
        let r = chat(Some(100), "100").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-ratelimit-capped-tokens"), None);
        assert_eq!(sent_max_tokens(), Some(100));
        gw.wait_settled().await;
        // 700 used: asking nothing is capped to the 300 left.
        let r = chat(None, "300").await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.header("x-ratelimit-capped-tokens"), Some("300"));
        assert_eq!(sent_max_tokens(), Some(300));
        gw.wait_settled().await;
        // A new minute: capped to the 1,000 and all used; then nothing is
        // left, and a request asking nothing gets the usual 429 for tokens.
        gw.clock.advance(Duration::from_secs(60));
        let r = chat(Some(5_000), "1000").await;
        assert_eq!(r.header("x-ratelimit-capped-tokens"), Some("1000"));
        gw.wait_settled().await;
        let r = chat(None, "10").await;
        assert_eq!(r.status, 429, "{:?}", r.body);
        assert_eq!(r.json()["error"]["type"], "tokens", "{:?}", r.body);
        assert_eq!(r.header("x-ratelimit-capped-tokens"), None);
    }
}

/// Spend caps (issue 15 item 2): a `credit` window counts the credits an
/// endpoint's requests are charged — the admission charge at admission
/// (reserved like any start amount), the per-unit charge at settlement —
/// and refuses once they reach its limit, on top of the balance; a request
/// the upstream failed (its admission charge refunded) counts nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credit_windows_cap_what_is_spent() {
    for backend in Backend::all().await {
        let mut opts = Options::new(backend);
        opts.plans = plangate_tests::harness::TEST_PLANS.replace(
            "      \"paid-model\":\n",
            "      \"spend-model\":\n        fixed_windows:\n          - window: 60s\n            limit: 100\n          - window: 60s\n            limit: 10\n            unit_type: credit\n        credits:\n          min_balance: 1\n          per_request: 1\n          per_unit: { token: { credits: 1, per: 100 } }\n      \"paid-model\":\n",
        );
        assert!(opts.plans.contains("spend-model"));
        let gw = TestGateway::start(opts).await;
        let (account, key) = gw.account(None).await;
        gw.catalog()
            .create_quota_block(&account, 1_000, None, json!({}))
            .await
            .expect("grant");
        let chat = |tokens: &'static str, status: Option<&'static str>| {
            let key = key.clone();
            let gw = &gw;
            async move {
                let mut headers = vec![("x-mock-tokens", tokens)];
                if let Some(s) = status {
                    headers.push(("x-mock-status", s));
                }
                let body = json!({"model": "spend-model", "messages": [{"role": "user", "content": "hi"}]});
                let r = gw
                    .post_with("/v1/chat/completions", Some(&key), &body, &headers)
                    .await;
                gw.wait_settled().await;
                r
            }
        };
        // 1 + ceil(250 / 100) = 4 credits each.
        let r = chat("250", None).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.header("x-ratelimit-limit-credits"), Some("10"));
        assert_eq!(chat("250", None).await.status, 200);
        // A failed upstream: refunded, counts nothing.
        assert_eq!(chat("250", Some("500")).await.status, 500);
        let spent = |limits: &serde_json::Value| {
            limits["endpoints"]["spend-model"]["windows"]
                .as_array()
                .expect("windows")
                .iter()
                .find(|w| w["unit"] == "credit")
                .and_then(|w| w["used"].as_u64())
        };
        assert_eq!(spent(&gw.limits(&key).await), Some(8));
        // 8 + 1 fits the cap at admission; settled at 12 (past it, like any
        // unit measured at the end)...
        assert_eq!(chat("250", None).await.status, 200);
        assert_eq!(spent(&gw.limits(&key).await), Some(12));
        // ...and the next is refused by the cap, not the balance.
        let r = chat("250", None).await;
        assert_eq!(r.status, 429, "{:?}", r.body);
        assert_eq!(r.code(), "rate_limit_exceeded");
        // The ledger (written from the outbox) agrees: 12 charged.
        let mut balance = 0;
        for _ in 0..250 {
            balance = gw.catalog().balance(&account).await.expect("balance");
            if balance == 1_000 - 12 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(balance, 1_000 - 12);
        gw.stop().await;
    }
}

/// A monthly quota (`window: 1mo, calendar: utc`) through the gateway, on
/// both backends (on Postgres the plan is stored as JSON and read back):
/// the headers, the 429 and `/v1/limits` report the real month end, in the
/// last minute of a leap February and again on March 1st.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calendar_month_quota_reports_the_real_reset() {
    const PLANS: &str = "\
default_plan: monthly
plans:
  monthly:
    endpoints:
      gpt-test:
        fixed_windows:
          - {window: 1mo, calendar: utc, limit: 2}
          - {window: 1mo, calendar: utc, limit: 1_000_000, unit_type: token}
          - {window: 1w, calendar: utc, limit: 100}
";
    // 2028-02-29T23:59:30Z and 2028-03-01T00:00:00Z.
    const LEAP_END: u64 = 1_835_481_570_000;
    const MARCH_1: u64 = 1_835_481_600_000;
    for backend in Backend::all().await {
        let gw = TestGateway::start(Options {
            plans: PLANS.to_owned(),
            ..Options::new(backend)
        })
        .await;
        gw.clock.set_ms(LEAP_END);
        let (_, key) = gw.account(None).await;
        for remaining in ["1", "0"] {
            let r = gw.chat(&key, "gpt-test").await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            assert_eq!(r.header("x-ratelimit-limit-requests"), Some("2"));
            assert_eq!(r.header("x-ratelimit-remaining-requests"), Some(remaining));
            assert_eq!(r.header("x-ratelimit-reset-requests"), Some("30s"));
            assert_eq!(r.header("x-ratelimit-reset-tokens"), Some("30s"));
            wait_settled(&gw).await;
        }
        let r = gw.chat(&key, "gpt-test").await;
        assert_eq!(r.status, 429);
        assert_eq!(r.header("retry-after"), Some("30"));
        assert_eq!(
            r.json()["error"]["message"],
            "Rate limit reached for gpt-test on requests per calendar month (UTC): Limit 2, \
             Used 2, Requested 1. Please try again in 30s."
        );
        let limits = |key: String| {
            let gw = &gw;
            async move {
                let req = Request::builder()
                    .uri("/v1/limits")
                    .header("authorization", format!("Bearer {key}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let r = gw.send(req).await;
                assert_eq!(r.status, 200);
                r.json()["endpoints"]["gpt-test"]["windows"].clone()
            }
        };
        let w = limits(key.clone()).await;
        assert_eq!(w[0]["window"], "1mo");
        assert_eq!(w[0]["calendar"], "utc");
        assert_eq!(w[0]["window_seconds"], 29 * 86_400, "a leap February");
        assert_eq!(w[0]["used"], 2);
        assert_eq!(w[0]["reset_ms"], 30_000);
        // Tue 2028-02-29: the week ends on Monday 2028-03-06.
        assert_eq!(w[2]["window"], "1w");
        assert_eq!(w[2]["reset_ms"], 30_000 + 5 * 86_400_000);

        // March 1st: a new month of 31 days (744 hours), the same week.
        gw.clock.set_ms(MARCH_1);
        let r = gw.chat(&key, "gpt-test").await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("1"));
        assert_eq!(r.header("x-ratelimit-reset-requests"), Some("744h0m0s"));
        wait_settled(&gw).await;
        let w = limits(key.clone()).await;
        assert_eq!(w[0]["window_seconds"], 31 * 86_400);
        assert_eq!(
            (w[0]["used"].as_u64(), w[0]["reset_ms"].as_u64()),
            (Some(1), Some(31 * 86_400_000))
        );
        assert_eq!(w[2]["used"], 3, "the week goes on");
    }
}

/// A billing anchor set through the admin API moves an account's monthly
/// quota: from the 31st, the period in February 2028 ends on Feb 29 (the
/// month is clamped); cleared, the calendar month is back. Both backends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_anchor_moves_the_monthly_quota() {
    const PLANS: &str = "\
default_plan: monthly
plans:
  monthly:
    endpoints:
      gpt-test:
        fixed_windows:
          - {window: 1mo, calendar: utc, limit: 5}
";
    // 2028-02-28T23:59:30Z.
    const T: u64 = 1_835_395_170_000;
    for backend in Backend::all().await {
        let gw = TestGateway::start(Options {
            plans: PLANS.to_owned(),
            ..Options::new(backend)
        })
        .await;
        gw.clock.set_ms(T);
        let admin = |method: Method, path: String, body: String| {
            let gw = &gw;
            async move { gw.admin(method, &path, Some(ADMIN_TOKEN), &body).await }
        };
        let account = plangate_tests::harness::unique("anchored");
        let r = admin(
            Method::POST,
            "/admin/accounts".into(),
            json!({"id": account, "billing_anchor": 31}).to_string(),
        )
        .await;
        assert_eq!(r.status, 201, "{:?}", r.body);
        assert_eq!(r.json()["billing_anchor"], 31);
        let key = gw.catalog().create_key(&account).await.unwrap().key;
        let limits = || {
            let gw = &gw;
            let key = key.clone();
            async move {
                let req = Request::builder()
                    .uri("/v1/limits")
                    .header("authorization", format!("Bearer {key}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let r = gw.send(req).await;
                assert_eq!(r.status, 200);
                r.json()["endpoints"]["gpt-test"]["windows"][0].clone()
            }
        };

        let r = gw.chat(&key, "gpt-test").await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.header("x-ratelimit-reset-requests"), Some("30s"));
        wait_settled(&gw).await;
        let w = limits().await;
        assert_eq!(w["window"], "1mo");
        assert_eq!(w["billing_anchor"], 31);
        // Jan 31 to Feb 29.
        assert_eq!(w["window_seconds"], 29 * 86_400);
        assert_eq!(
            (w["used"].as_u64(), w["reset_ms"].as_u64()),
            (Some(1), Some(30_000))
        );

        // Not a day of the month: 400, nothing changes.
        for bad in [json!({"billing_anchor": 0}), json!({"billing_anchor": 32})] {
            let r = admin(
                Method::PUT,
                format!("/admin/accounts/{account}/billing-anchor"),
                bad.to_string(),
            )
            .await;
            assert_eq!(r.status, 400, "{bad}");
        }
        // Cleared: the calendar month, to March 1st, a fresh counter.
        let r = admin(
            Method::PUT,
            format!("/admin/accounts/{account}/billing-anchor"),
            json!({"billing_anchor": null}).to_string(),
        )
        .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.json()["billing_anchor"], serde_json::Value::Null);
        let w = limits().await;
        assert!(w.get("billing_anchor").is_none(), "{w}");
        assert_eq!(w["reset_ms"], 86_400_000 + 30_000);
        assert_eq!(w["used"], 0);
    }
}
