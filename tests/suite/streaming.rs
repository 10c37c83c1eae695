//! Streaming through the gateway: bytes flow before the upstream finishes,
//! usage from the `include_usage` chunk is counted, and a stream cut short
//! by either side still ends the request and frees its slot.

use std::time::{Duration, Instant};

use plangate_tests::harness::{tokens_used, Backend, Options, TestGateway};
use serde_json::json;

async fn gateways() -> Vec<TestGateway> {
    TestGateway::each_backend().await
}

fn stream_body(include_usage: Option<bool>) -> serde_json::Value {
    let mut b = json!({
        "model": "gpt-test",
        "stream": true,
        "messages": [{"role": "user", "content": "stream please"}],
    });
    if let Some(u) = include_usage {
        b["stream_options"] = json!({"include_usage": u});
    }
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_bytes_arrive_before_the_upstream_finishes() {
    for gw in gateways().await {
        let (_, key) = gw.account(None).await;
        let started = Instant::now();
        let mut s = gw
            .post_streaming(
                "/v1/chat/completions",
                &key,
                &stream_body(None),
                &[("x-mock-chunks", "6"), ("x-mock-chunk-delay-ms", "250")],
            )
            .await;
        assert_eq!(s.status, 200);
        assert_eq!(s.headers.get("x-ratelimit-limit-requests").unwrap(), "3");
        let first = s.next_data().await.expect("a first chunk").expect("data");
        let first_at = started.elapsed();
        assert!(!first.is_empty());
        let (_, clean) = s.read_all().await;
        let total = started.elapsed();
        assert!(clean);
        // Six chunks 250 ms apart take >= 1.25 s upstream; the first must
        // not wait for them.
        assert!(total >= Duration::from_millis(1200), "total {total:?}");
        assert!(
            first_at < total / 2,
            "first bytes at {first_at:?} of {total:?}"
        );
        gw.wait_settled().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_chunk_is_counted_and_dropped_unless_asked_for() {
    for gw in gateways().await {
        let (_, key) = gw.account(None).await;
        assert_eq!(tokens_used(&gw.limits(&key).await, "gpt-test"), 0);

        // The client did not ask for usage: the gateway asks upstream,
        // counts it, and drops the extra chunk.
        let mut s = gw
            .post_streaming("/v1/chat/completions", &key, &stream_body(None), &[])
            .await;
        let (body, clean) = s.read_all().await;
        assert!(clean);
        let text = String::from_utf8(body).unwrap();
        assert!(text.contains("data: [DONE]"), "{text}");
        assert!(
            !text.contains("\"total_tokens\""),
            "usage chunk must be dropped: {text}"
        );
        gw.wait_settled().await;
        let after_first = tokens_used(&gw.limits(&key).await, "gpt-test");
        assert!(after_first > 0, "stream usage counted");
        let forwarded = gw.mock.stats().last_request().expect("forwarded");
        let fwd: serde_json::Value = serde_json::from_slice(&forwarded.body).unwrap();
        assert_eq!(fwd["stream_options"]["include_usage"], true);

        // The client asked: it sees the chunk, and exactly that is counted.
        let mut s = gw
            .post_streaming("/v1/chat/completions", &key, &stream_body(Some(true)), &[])
            .await;
        let (body, clean) = s.read_all().await;
        assert!(clean);
        let text = String::from_utf8(body).unwrap();
        let usage_line = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
            .find(|v| v["usage"]["total_tokens"].is_u64())
            .expect("client sees the usage chunk");
        let reported = usage_line["usage"]["total_tokens"].as_u64().unwrap();
        gw.wait_settled().await;
        let after_second = tokens_used(&gw.limits(&key).await, "gpt-test");
        assert_eq!(after_second - after_first, reported);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_mid_stream_frees_the_slot_within_a_second() {
    for gw in gateways().await {
        let (_, key) = gw.account(None).await;
        let mut s = gw
            .post_streaming(
                "/v1/chat/completions",
                &key,
                &stream_body(None),
                &[("x-mock-chunks", "100"), ("x-mock-chunk-delay-ms", "100")],
            )
            .await;
        assert_eq!(s.status, 200);
        s.next_data().await.expect("first chunk").expect("data");
        assert_eq!(gw.core.metrics.in_flight(), 1);
        let limits = gw.limits(&key).await;
        assert_eq!(limits["endpoints"]["gpt-test"]["concurrency"]["in_use"], 1);
        drop(s);
        let dropped = Instant::now();
        gw.wait_settled().await;
        assert!(dropped.elapsed() < Duration::from_secs(1));
        let limits = gw.limits(&key).await;
        assert_eq!(limits["endpoints"]["gpt-test"]["concurrency"]["in_use"], 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_dying_mid_stream_ends_the_request_and_keeps_the_reservation() {
    for gw in gateways().await {
        let (_, key) = gw.account(None).await;
        let mut body = stream_body(None);
        body["max_tokens"] = json!(300);
        let mut s = gw
            .post_streaming(
                "/v1/chat/completions",
                &key,
                &body,
                &[("x-mock-die-after", "2")],
            )
            .await;
        assert_eq!(s.status, 200);
        let (bytes, clean) = s.read_all().await;
        assert!(!clean, "the client sees the stream break");
        assert!(!bytes.is_empty(), "chunks before the break were forwarded");
        gw.wait_settled().await;
        let limits = gw.limits(&key).await;
        assert_eq!(limits["endpoints"]["gpt-test"]["concurrency"]["in_use"], 0);
        // No usage arrived, so the 300 reserved tokens stand as the charge.
        assert_eq!(tokens_used(&limits, "gpt-test"), 300);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_stream_renews_its_concurrency_lease() {
    for backend in Backend::all().await {
        let mut opts = Options::new(backend);
        opts.plans = plangate_tests::harness::TEST_PLANS
            .replace("concurrency_expiry: 30s", "concurrency_expiry: 2s");
        let gw = TestGateway::start(opts).await;
        let (_, key) = gw.account(None).await;
        let mut s = gw
            .post_streaming(
                "/v1/chat/completions",
                &key,
                &stream_body(None),
                &[("x-mock-chunks", "60"), ("x-mock-chunk-delay-ms", "100")],
            )
            .await;
        s.next_data().await.expect("first chunk").expect("data");
        // Admitted at t0 with a 2 s lease. Move to t0+1.5 s (past half the
        // lease: due), let the limiter's lease keeper run a pass (every
        // 200 ms of real time), then go past the original lease: the slot
        // must still be held.
        gw.clock.advance(Duration::from_millis(1500));
        tokio::time::sleep(Duration::from_millis(1300)).await;
        gw.clock.advance(Duration::from_millis(1500));
        let limits = gw.limits(&key).await;
        assert_eq!(
            limits["endpoints"]["gpt-test"]["concurrency"]["in_use"], 1,
            "lease renewed while streaming"
        );
        drop(s);
        gw.wait_settled().await;
        let limits = gw.limits(&key).await;
        assert_eq!(limits["endpoints"]["gpt-test"]["concurrency"]["in_use"], 0);
    }
}

/// The lease is kept by the limiter, not by polling the body: a request
/// still waiting for the upstream's response head keeps its slot past its
/// original lease, and its usage is counted when it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_for_its_upstream_keeps_its_slot() {
    for backend in Backend::all().await {
        let mut opts = Options::new(backend);
        opts.plans = plangate_tests::harness::TEST_PLANS
            .replace("concurrency_expiry: 30s", "concurrency_expiry: 2s");
        let gw = TestGateway::start(opts).await;
        let (_, key) = gw.account(None).await;
        let body = json!({
            "model": "gpt-test",
            "messages": [{"role": "user", "content": "slow please"}],
        });
        let request = gw.post_with(
            "/v1/chat/completions",
            Some(&key),
            &body,
            &[("x-mock-delay-ms", "1500"), ("x-mock-tokens", "77")],
        );
        let watch = async {
            // Wait (bounded) until the request is admitted and waiting.
            for _ in 0..200 {
                let limits = gw.limits(&key).await;
                if limits["endpoints"]["gpt-test"]["concurrency"]["in_use"] == 1 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // As in the stream test: past half the lease, a keeper pass,
            // then past the original lease.
            gw.clock.advance(Duration::from_millis(1500));
            gw.core.limiter.renew_due().await;
            gw.clock.advance(Duration::from_millis(1500));
            gw.limits(&key).await
        };
        let (resp, limits) = tokio::join!(request, watch);
        assert_eq!(
            limits["endpoints"]["gpt-test"]["concurrency"]["in_use"], 1,
            "lease kept while waiting for the response head"
        );
        assert_eq!(resp.status, 200);
        gw.wait_settled().await;
        let limits = gw.limits(&key).await;
        assert_eq!(limits["endpoints"]["gpt-test"]["concurrency"]["in_use"], 0);
        assert_eq!(tokens_used(&limits, "gpt-test"), 77);
    }
}
