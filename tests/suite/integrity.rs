//! Metering integrity, tried as a client that wants free units would, with
//! an upstream that behaves like the real ones (compresses when asked,
//! reads JSON leniently, streams long answers, puts `usage` before a large
//! trailing field, answers slowly). Every case runs on both backends and
//! asserts on the counters (`/v1/limits`) and the credit ledger, not only
//! on status codes.
//!
//! Each case prints one `integrity:` line: units the upstream delivered,
//! units counted in the windows, credits charged per unit (run with
//! `--nocapture` to read them).

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use plangate::mock::MockOptions;
use plangate_tests::harness::{tokens_used, Backend, Options, Resp, TestGateway};
use serde_json::{json, Value};

/// One token per streamed chunk (as OpenAI and vLLM stream), so that what
/// the mock reports is what a real server would.
const PLANS: &str = r#"
default_plan: metered
plans:
  metered:
    endpoints:
      "gpt-test":
        fixed_windows:
          - window: 60s
            limit: 1000
          - window: 60s
            limit: 10_000_000
            unit_type: token
        max_concurrent: 4
        credits:
          min_balance: 1
          per_request: 1
          per_unit: { token: { credits: 1, per: 1 } }
      "one-slot":
        fixed_windows:
          - window: 60s
            limit: 1000
          - window: 60s
            limit: 10_000_000
            unit_type: token
        max_concurrent: 1
        concurrency_expiry: 5s
        credits:
          min_balance: 1
          per_request: 1
          per_unit: { token: { credits: 1, per: 1 } }
      "small-window":
        fixed_windows:
          - window: 60s
            limit: 60
            unit_type: token
      "text-embedding-test":
        fixed_windows:
          - window: 60s
            limit: 10_000_000
            unit_type: token
      "dall-e-3":
        fixed_windows:
          - window: 60s
            limit: 100
            unit_type: image
        credits:
          min_balance: 1
          per_request: 1
          per_unit: { image: { credits: 4, per: 1 } }
"#;

async fn gateways() -> Vec<TestGateway> {
    let mut out = Vec::new();
    for backend in Backend::all().await {
        let mut o = Options::new(backend);
        o.plans = PLANS.to_owned();
        o.mock = MockOptions {
            tokens_per_chunk: 1,
            ..MockOptions::default()
        };
        out.push(TestGateway::start(o).await);
    }
    out
}

/// A funded account: (id, key).
async fn account(gw: &TestGateway) -> (String, String) {
    let (id, key) = gw.account(None).await;
    gw.catalog()
        .create_quota_block(&id, 100_000_000, None, json!({}))
        .await
        .expect("grant");
    (id, key)
}

/// POST a raw body (possibly not canonical JSON).
async fn post_raw(
    gw: &TestGateway,
    path: &str,
    key: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> Resp {
    let mut b = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"));
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    gw.send(b.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
        .await
}

/// Requests counted in the 60 s window of `endpoint`.
fn requests_used(limits: &Value, endpoint: &str) -> u64 {
    limits["endpoints"][endpoint]["windows"]
        .as_array()
        .expect("windows")
        .iter()
        .find(|w| w["unit"] == "request" && w["window_seconds"] == 60)
        .and_then(|w| w["used"].as_u64())
        .expect("request window")
}

fn units_used(limits: &Value, endpoint: &str, unit: &str) -> u64 {
    limits["endpoints"][endpoint]["windows"]
        .as_array()
        .expect("windows")
        .iter()
        .find(|w| w["unit"] == unit)
        .and_then(|w| w["used"].as_u64())
        .expect("window")
}

/// Per-unit credits charged to `account`, once the background charge has
/// landed (bounded wait, never for a window). A request's ledger row
/// (`req:*`) holds its admission charge (`per_request: 1` in every plan
/// here) and its per-unit charge; `use:*` rows (the wallet dropped
/// meanwhile) the per-unit charge alone.
async fn unit_credits(gw: &TestGateway, account: &str, expect_rows: usize) -> u64 {
    const PER_REQUEST: u64 = 1;
    let mut sum = 0;
    for _ in 0..300 {
        let ledger = gw.catalog().ledger(account).await.expect("ledger");
        let rows: Vec<_> = ledger
            .iter()
            .filter(|e| {
                e.idempotency_key.starts_with("req:") || e.idempotency_key.starts_with("use:")
            })
            .collect();
        sum = rows
            .iter()
            .map(|e| match e.idempotency_key.starts_with("req:") {
                true => e.requested - PER_REQUEST,
                false => e.requested,
            })
            .sum();
        if rows.len() >= expect_rows {
            return sum;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sum
}

fn backend_of(gw: &TestGateway) -> Backend {
    match gw.config.storage.redis_url {
        Some(_) => Backend::Real,
        None => Backend::Memory,
    }
}

/// Units counted in the window of (`endpoint`, `unit`) and per-unit credits
/// charged, once the request has settled.
/// Reports them next to what the upstream `delivered`.
async fn figures(
    gw: &TestGateway,
    case: &str,
    account: &str,
    key: &str,
    (endpoint, unit): (&str, &str),
    rows: usize,
    delivered: u64,
) -> (u64, u64) {
    gw.wait_settled().await;
    let counted = units_used(&gw.limits(key).await, endpoint, unit);
    let charged = unit_credits(gw, account, rows).await;
    eprintln!(
        "integrity: {case:<34} {:?}: delivered {delivered}, counted {counted}, credits charged {charged}",
        backend_of(gw)
    );
    (counted, charged)
}

/// What the mock's usage says for the last request: its prompt
/// (`ceil(body bytes / 4)`) plus `completion` tokens.
fn mock_delivered(gw: &TestGateway, completion: u64) -> u64 {
    let forwarded = gw.mock.stats().last_request().expect("forwarded");
    forwarded.body.len().div_ceil(4) as u64 + completion
}

/// The one-slot stream's every token was counted and charged: the mock's
/// prompt plus `completion`.
async fn counted_and_charged_in_full(
    gw: &TestGateway,
    case: &str,
    account: &str,
    key: &str,
    completion: u64,
) {
    let delivered = mock_delivered(gw, completion);
    let (counted, charged) =
        figures(gw, case, account, key, ("one-slot", "token"), 1, delivered).await;
    assert_eq!(counted, delivered);
    assert_eq!(charged, delivered);
}

/// A 3,000-chunk stream on the one-slot endpoint, its head read.
async fn one_slot_stream(gw: &TestGateway, key: &str) -> plangate_tests::harness::Streaming {
    let body = json!({
        "model": "one-slot",
        "stream": true,
        "messages": [{"role": "user", "content": "a long answer"}],
    });
    let s = gw
        .post_streaming(
            "/v1/chat/completions",
            key,
            &body,
            &[("x-mock-chunks", "3000")],
        )
        .await;
    assert_eq!(s.status, 200);
    s
}

fn chat(stream: bool) -> Value {
    json!({
        "model": "gpt-test",
        "stream": stream,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_upstream_answers_are_metered() {
    for gw in gateways().await {
        let (account_id, key) = account(&gw).await;
        let mut delivered = 0;
        let mut rows = 0;
        // The client accepts gzip (the openai SDK does): the gateway asks
        // the upstream for identity, so a compressing upstream does not.
        let r = gw
            .post_with(
                "/v1/chat/completions",
                Some(&key),
                &chat(false),
                &[("accept-encoding", "gzip, deflate")],
            )
            .await;
        assert_eq!(r.status, 200);
        let forwarded = gw.mock.stats().last_request().expect("forwarded");
        let asked_identity = forwarded.headers.get("accept-encoding").cloned();
        let mut leaks = Vec::new();
        // What the mock reports: prompt = ceil(body bytes / 4), one token
        // per chunk, five chunks.
        delivered += forwarded.body.len().div_ceil(4) as u64 + 5;
        rows += 1;
        // An upstream (or CDN) that compresses whatever it is asked:
        // decoded, metered, and forwarded decoded.
        for coding in ["gzip", "deflate"] {
            let r = gw
                .post_with(
                    "/v1/chat/completions",
                    Some(&key),
                    &chat(false),
                    &[("x-mock-encoding", coding), ("accept-encoding", "gzip")],
                )
                .await;
            assert_eq!(r.status, 200, "{coding}");
            if r.header("content-encoding").is_some() {
                leaks.push(format!("{coding}: a JSON answer was not decoded"));
            }
            let forwarded = gw.mock.stats().last_request().expect("forwarded");
            delivered += forwarded.body.len().div_ceil(4) as u64 + 5;
            rows += 1;
            // And a compressed stream, whose usage chunk the client did not
            // ask for and must not see.
            let mut s = gw
                .post_streaming(
                    "/v1/chat/completions",
                    &key,
                    &chat(true),
                    &[("x-mock-encoding", coding), ("x-mock-chunks", "20")],
                )
                .await;
            assert_eq!(s.status, 200);
            let decoded = s.headers.get("content-encoding").is_none();
            let (body, clean) = s.read_all().await;
            assert!(clean);
            let text = String::from_utf8_lossy(&body).into_owned();
            if !decoded || !text.contains("data: [DONE]") || text.contains("total_tokens") {
                leaks.push(format!("{coding}: {text}"));
            }
            let forwarded = gw.mock.stats().last_request().unwrap();
            delivered += forwarded.body.len().div_ceil(4) as u64 + 20;
            rows += 1;
        }
        let (counted, charged) = figures(
            &gw,
            "compressed responses",
            &account_id,
            &key,
            ("gpt-test", "token"),
            rows,
            delivered,
        )
        .await;
        assert_eq!(
            asked_identity.as_ref().map(|v| v.as_bytes()),
            Some(&b"identity"[..])
        );
        assert!(
            leaks.is_empty(),
            "streams not decoded or usage chunk leaked: {leaks:?}"
        );
        assert_eq!(counted, delivered);
        assert_eq!(charged, delivered);

        // A coding the gateway cannot read is refused, not served free.
        let before = gw.limits(&key).await;
        let r = gw
            .post_with(
                "/v1/chat/completions",
                Some(&key),
                &chat(false),
                &[("x-mock-encoding", "br")],
            )
            .await;
        assert_eq!(r.status, 502);
        assert_eq!(r.code(), "upstream_unavailable");
        gw.wait_settled().await;
        let after = gw.limits(&key).await;
        assert_eq!(
            tokens_used(&after, "gpt-test"),
            tokens_used(&before, "gpt-test")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_canonical_and_duplicate_fields_are_refused_before_anything_runs() {
    for gw in gateways().await {
        let (_, key) = account(&gw).await;
        let msgs = r#""messages":[{"role":"user","content":"hi"}]"#;
        for body in [
            format!(r#"{{"model":"gpt-test","stream":1,{msgs}}}"#),
            format!(r#"{{"model":"gpt-test","stream":"true",{msgs}}}"#),
            format!(
                r#"{{"model":"gpt-test","stream":true,"stream_options":{{"include_usage":"false"}},{msgs}}}"#
            ),
            format!(r#"{{"model":"gpt-test","n":"2",{msgs}}}"#),
            format!(r#"{{"model":"gpt-test","max_tokens":"100000",{msgs}}}"#),
            format!(r#"{{"model":"gpt-test","max_tokens":1e19,{msgs}}}"#),
            format!(
                r#"{{"model":"gpt-test","max_completion_tokens":100000000000000000000,{msgs}}}"#
            ),
            format!(r#"{{"model":"small-window","stream":false,{msgs},"model":"gpt-test"}}"#),
            format!(r#"{{"model":"gpt-test","stream":false,{msgs},"stream":true}}"#),
            format!(r#"{{"model":"gpt-test","max_tokens":1,{msgs},"max_tokens":100000}}"#),
        ] {
            let r = post_raw(&gw, "/v1/chat/completions", &key, &body, &[]).await;
            assert_eq!(r.status, 400, "{body}: {:?}", r.body);
            assert_eq!(r.code(), "invalid_request", "{body}");
            let stream_like = body.contains(r#""stream":"true""#) || body.contains(r#""stream":1"#);
            if stream_like {
                let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
                assert!(msg.contains("'stream'"), "{msg}");
            }
        }
        // Nothing reached the upstream, nothing was counted.
        assert_eq!(gw.mock.requests(), 0);
        let limits = gw.limits(&key).await;
        assert_eq!(requests_used(&limits, "gpt-test"), 0);
        assert_eq!(tokens_used(&limits, "gpt-test"), 0);
    }
}

/// Reads a stream until `events` content events arrived, then hangs up.
async fn read_events_then_hang_up(
    gw: &TestGateway,
    key: &str,
    body: &Value,
    events: usize,
) -> usize {
    let mut s = gw
        .post_streaming(
            "/v1/chat/completions",
            key,
            body,
            &[("x-mock-chunks", "200"), ("x-mock-chunk-delay-ms", "3")],
        )
        .await;
    assert_eq!(s.status, 200);
    let mut seen = 0;
    let mut text = Vec::new();
    while seen < events {
        match s.next_data().await {
            Some(Ok(d)) => {
                text.extend_from_slice(&d);
                seen = memchr::memmem::find_iter(&text, b"\"content\"").count();
            }
            _ => break,
        }
    }
    assert!(seen >= events, "the stream ended early after {seen} events");
    drop(s);
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_short_is_charged_what_was_delivered() {
    for gw in gateways().await {
        let (account_id, key) = account(&gw).await;
        // No max_tokens: the reservation is 1 token.
        let seen = read_events_then_hang_up(&gw, &key, &chat(true), 150).await;
        gw.wait_settled().await;
        let forwarded = gw.mock.stats().last_request().expect("forwarded");
        // What the upstream's usage would have said for what was delivered.
        let prompt = forwarded.body.len().div_ceil(4) as u64;
        let delivered = prompt + seen as u64;
        let (counted, charged) = figures(
            &gw,
            "stream cut by the client",
            &account_id,
            &key,
            ("gpt-test", "token"),
            1,
            delivered,
        )
        .await;
        assert!(
            counted >= delivered,
            "counted {counted} < delivered {delivered}"
        );
        // The estimate's margin: "mock " is 5 bytes, two tokens at four
        // bytes a token; at most the 200 chunks the upstream could send.
        assert!(counted <= prompt + 2 * 200, "counted {counted}");
        assert_eq!(charged, counted);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_the_upstream_cuts_is_charged_what_was_delivered() {
    for gw in gateways().await {
        let (account_id, key) = account(&gw).await;
        let mut s = gw
            .post_streaming(
                "/v1/chat/completions",
                &key,
                &chat(true),
                &[("x-mock-chunks", "100"), ("x-mock-die-after", "60")],
            )
            .await;
        let (body, clean) = s.read_all().await;
        assert!(!clean);
        let seen = memchr::memmem::find_iter(&body, b"\"content\"").count() as u64;
        let delivered = mock_delivered(&gw, seen);
        let (counted, charged) = figures(
            &gw,
            "stream cut by the upstream",
            &account_id,
            &key,
            ("gpt-test", "token"),
            1,
            delivered,
        )
        .await;
        assert_eq!(seen, 60);
        assert!(
            counted >= delivered,
            "counted {counted} < delivered {delivered}"
        );
        assert!(counted <= delivered + seen, "counted {counted}");
        assert_eq!(charged, counted);
    }
}

/// A credit answer that is not a stream is read ahead and sent settled
/// with its headers: whole, with its exact length. Cut by the upstream
/// mid-body, the client still sees it cut (after what came before the
/// cut), and what was delivered is charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credit_answer_read_ahead_arrives_whole_or_cut_as_the_upstream_sent_it() {
    for gw in gateways().await {
        let (account_id, key) = account(&gw).await;
        let mut s = gw
            .post_streaming("/v1/chat/completions", &key, &chat(false), &[])
            .await;
        assert_eq!(s.status, 200);
        let length: usize = s.headers["content-length"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let (body, clean) = s.read_all().await;
        assert!(clean);
        assert_eq!(body.len(), length);
        let answer: Value = serde_json::from_slice(&body).unwrap();
        let delivered = answer["usage"]["total_tokens"].as_u64().unwrap();
        let (counted, charged) = figures(
            &gw,
            "answer read ahead",
            &account_id,
            &key,
            ("gpt-test", "token"),
            1,
            delivered,
        )
        .await;
        assert_eq!((counted, charged), (delivered, delivered));

        let mut s = gw
            .post_streaming(
                "/v1/chat/completions",
                &key,
                &chat(false),
                &[("x-mock-die-after", "1")],
            )
            .await;
        assert_eq!(s.status, 200);
        let (_, clean) = s.read_all().await;
        assert!(!clean, "the client sees the answer cut");
        gw.wait_settled().await;
        // Written to the catalog by the outbox writer, in its own time.
        let mut ledger = Vec::new();
        for _ in 0..300 {
            ledger = gw.catalog().ledger(&account_id).await.unwrap();
            if ledger.len() >= 2 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(ledger.len(), 2, "the cut answer was charged: {ledger:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_only_units_are_charged_credits_for_what_was_reserved() {
    for gw in gateways().await {
        let (account_id, key) = account(&gw).await;
        let r = gw
            .post(
                "/v1/images/generations",
                Some(&key),
                &json!({"prompt": "a cat", "n": 3}),
            )
            .await;
        assert_eq!(r.status, 200);
        let delivered = r.json()["data"].as_array().unwrap().len() as u64;
        let (counted, charged) = figures(
            &gw,
            "images reserved from n",
            &account_id,
            &key,
            ("dall-e-3", "image"),
            1,
            delivered,
        )
        .await;
        assert_eq!(delivered, 3);
        assert_eq!(counted, 3);
        assert_eq!(charged, 3 * 4);

        // A refused request (the upstream's 4xx) is not charged its images.
        let r = gw
            .post_with(
                "/v1/images/generations",
                Some(&key),
                &json!({"prompt": "a cat", "n": 2}),
                &[("x-mock-status", "400")],
            )
            .await;
        assert_eq!(r.status, 400);
        gw.wait_settled().await;
        assert_eq!(units_used(&gw.limits(&key).await, "dall-e-3", "image"), 3);
        assert_eq!(unit_credits(&gw, &account_id, 1).await, 12);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_output_token_field_is_reserved() {
    for gw in gateways().await {
        let (_, key) = account(&gw).await;
        // A 60-token window: a request that may produce 200,000 tokens does
        // not fit, whatever the field is called.
        for field in ["max_tokens", "max_completion_tokens", "max_output_tokens"] {
            let mut body =
                json!({"model": "small-window", "messages": [{"role": "user", "content": "hi"}]});
            body[field] = json!(200_000);
            let r = gw.post("/v1/chat/completions", Some(&key), &body).await;
            assert_eq!(r.status, 429, "{field}");
            assert_eq!(r.code(), "request_too_large", "{field}");
        }
        assert_eq!(gw.mock.requests(), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_before_a_large_trailing_field_is_found() {
    for gw in gateways().await {
        let (account_id, key) = account(&gw).await;
        let r = gw
            .post_with(
                "/v1/chat/completions",
                Some(&key),
                &chat(false),
                &[
                    ("x-mock-trailing-bytes", "3000000"),
                    ("x-mock-tokens", "777"),
                ],
            )
            .await;
        assert_eq!(r.status, 200);
        assert!(r.body.len() > 3_000_000);
        let delivered = r.json()["usage"]["total_tokens"].as_u64().unwrap();
        let (counted, charged) = figures(
            &gw,
            "usage before 3 MB of logprobs",
            &account_id,
            &key,
            ("gpt-test", "token"),
            1,
            delivered,
        )
        .await;
        assert_eq!(delivered, 777);
        assert_eq!(counted, 777);
        assert_eq!(charged, 777);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absurd_reported_amount_is_clamped_and_keeps_the_store_working() {
    for gw in gateways().await {
        let (account_id, key) = account(&gw).await;
        // 10^19 tokens: beyond Redis' INCRBY range and Lua's exact doubles.
        let r = gw
            .post_with(
                "/v1/chat/completions",
                Some(&key),
                &chat(false),
                &[("x-mock-tokens", "10000000000000000000")],
            )
            .await;
        assert_eq!(r.status, 200);
        let (counted, charged) = figures(
            &gw,
            "10^19 tokens reported",
            &account_id,
            &key,
            ("gpt-test", "token"),
            1,
            10_000_000_000_000_000_000,
        )
        .await;
        assert_eq!(counted, plangate::plans::MAX_AMOUNT);
        // Charged in full; what the balance cannot cover is a shortfall.
        assert_eq!(charged, plangate::plans::MAX_AMOUNT);
        // The store took it: the next request is refused by the full token
        // window, not admitted as degraded.
        let r = gw
            .post("/v1/chat/completions", Some(&key), &chat(false))
            .await;
        assert_eq!(r.status, 429, "{:?}", r.body);
        assert_eq!(r.code(), "rate_limit_exceeded");
        assert!(r.header("x-ratelimit-degraded").is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_its_client_stops_reading_keeps_its_slot_and_is_counted() {
    for gw in gateways().await {
        let (account_id, key) = account(&gw).await;
        let mut s = one_slot_stream(&gw, &key).await;
        let first = s.next_data().await.expect("a first chunk").expect("data");
        assert!(!first.is_empty());
        // The client stops reading (backpressure) while time passes: 16 s,
        // more than three 5 s leases, with a keeper pass every 2 s.
        for _ in 0..8 {
            gw.clock.advance(Duration::from_secs(2));
            gw.core.limiter.renew_due().await;
        }
        let second = gw
            .post(
                "/v1/chat/completions",
                Some(&key),
                &json!({"model": "one-slot", "messages": []}),
            )
            .await;
        assert_eq!(second.status, 429, "{:?}", second.body);
        assert_eq!(second.code(), "concurrency_limit_exceeded");
        // The client reads on to the end: every token is counted.
        let (rest, clean) = s.read_all().await;
        assert!(clean);
        assert!(String::from_utf8_lossy(&rest).contains("[DONE]"));
        counted_and_charged_in_full(&gw, "stream not read for 3 leases", &account_id, &key, 3000)
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_lease_ran_out_is_still_counted_when_it_ends() {
    for gw in gateways().await {
        let (account_id, key) = account(&gw).await;
        let mut s = one_slot_stream(&gw, &key).await;
        s.next_data().await.expect("a first chunk").expect("data");
        // The lease runs out before any renewal could run (as when the
        // counter store is unreachable for longer than a lease).
        gw.clock.advance(Duration::from_secs(20));
        gw.core.limiter.renew_due().await;
        let (_, clean) = s.read_all().await;
        assert!(clean);
        counted_and_charged_in_full(&gw, "stream whose lease ran out", &account_id, &key, 3000)
            .await;
    }
}
