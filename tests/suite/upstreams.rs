//! What upstreams say about themselves stays with the gateway: response
//! headers on `drop_response_headers` (by default LiteLLM's cost, spend and
//! topology, OpenAI's organization, the upstream's own rate limits) never
//! reach clients. The stream shapes of vLLM, TGI, llama.cpp and Ollama are
//! unit-tested on fixtures (`gateway/src/usage/tests.rs`); LiteLLM runs for
//! real in `litellm.rs`.

use plangate_tests::harness::{Backend, Options, Resp, TestGateway};
use serde_json::json;

const UPSTREAM_HEADERS: &str = "x-litellm-response-cost=0.00042,x-litellm-key-spend=17.5,\
     x-litellm-model-api-base=http://10.0.0.7:8000,llm_provider-x-request-id=abc,\
     openai-organization=org-operator,openai-processing-ms=12,x-ratelimit-limit-images=500,\
     x-upstream-kept=yes";

async fn chat_and_image(gw: &TestGateway, key: &str) -> (Resp, Resp) {
    let chat = gw
        .post_with(
            "/v1/chat/completions",
            Some(key),
            &json!({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}),
            &[("x-mock-response-headers", UPSTREAM_HEADERS)],
        )
        .await;
    let image = gw
        .post_with(
            "/v1/images/generations",
            Some(key),
            &json!({"prompt": "a cat"}),
            &[("x-mock-response-headers", UPSTREAM_HEADERS)],
        )
        .await;
    (chat, image)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_internals_are_dropped_by_default() {
    for gw in TestGateway::each_backend().await {
        let (_, key) = gw.account(None).await;
        let (chat, image) = chat_and_image(&gw, &key).await;
        for r in [&chat, &image] {
            assert_eq!(r.status, 200);
            for name in r.headers.keys() {
                let n = name.as_str();
                assert!(
                    !n.starts_with("x-litellm-")
                        && !n.starts_with("llm_provider-")
                        && !n.starts_with("openai-"),
                    "{n} reached the client"
                );
            }
            assert_eq!(r.header("x-upstream-kept"), Some("yes"));
        }
        // The upstream's own image limit is gone; plangate's own stay.
        assert!(image.header("x-ratelimit-limit-images").is_some());
        assert_ne!(image.header("x-ratelimit-limit-images"), Some("500"));
        assert!(chat.header("x-ratelimit-limit-images").is_none());
        assert_eq!(chat.header("x-ratelimit-limit-requests"), Some("3"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_chooses_what_is_dropped() {
    for backend in Backend::all().await {
        let mut opts = Options::new(backend);
        opts.upstream_extra = r#"drop_response_headers = ["x-upstream-*", "*-key-spend"]"#.into();
        let gw = TestGateway::start(opts).await;
        let (_, key) = gw.account(None).await;
        let (chat, _) = chat_and_image(&gw, &key).await;
        assert_eq!(chat.status, 200);
        assert!(chat.header("x-upstream-kept").is_none());
        assert!(chat.header("x-litellm-key-spend").is_none());
        // Not on the operator's list: forwarded.
        assert_eq!(chat.header("x-litellm-response-cost"), Some("0.00042"));
        assert_eq!(chat.header("openai-organization"), Some("org-operator"));
    }
}

/// The OpenAI Responses and Anthropic Messages shapes, through the routes
/// `usage.preset = "openai-responses"` / `"anthropic-messages"` against the
/// mock answering in those shapes: whole bodies and streams are counted at
/// what they report, streamed requests reach the upstream unchanged (no
/// `stream_options` injected: neither API takes it), and the streams reach
/// the client whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_and_anthropic_messages_are_metered_by_their_presets() {
    use plangate_tests::harness::tokens_used;
    for gw in TestGateway::each_backend().await {
        let (_, key) = gw.account(None).await;
        let cases = [
            (
                "/v1/responses",
                json!({"model": "gpt-test", "input": "hi"}),
                "response.completed",
            ),
            (
                "/v1/messages",
                json!({"model": "gpt-test", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}),
                "message_stop",
            ),
        ];
        for (path, body, last_event) in cases {
            for stream in [false, true] {
                let mut body = body.clone();
                if stream {
                    body["stream"] = json!(true);
                }
                // A fresh minute for each (the plan allows 3 requests a minute).
                gw.clock.advance(std::time::Duration::from_secs(60));
                let before = tokens_used(&gw.limits(&key).await, "gpt-test");
                let r = gw
                    .post_with(path, Some(&key), &body, &[("x-mock-tokens", "40")])
                    .await;
                assert_eq!(r.status, 200, "{path} stream={stream}: {:?}", r.body);
                gw.wait_settled().await;
                let after = tokens_used(&gw.limits(&key).await, "gpt-test");
                assert_eq!(
                    after - before,
                    40,
                    "{path} stream={stream}: counted as reported"
                );
                let sent = gw.mock.stats().last_request().expect("forwarded");
                let sent: serde_json::Value = serde_json::from_slice(&sent.body).expect("json");
                assert!(
                    sent.get("stream_options").is_none(),
                    "{path}: nothing injected: {sent}"
                );
                if stream {
                    let text = String::from_utf8_lossy(&r.body);
                    assert!(
                        text.contains(last_event),
                        "{path}: stream reached the client whole: {text}"
                    );
                }
            }
        }
    }
}
