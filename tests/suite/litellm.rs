//! A real LiteLLM proxy as the upstream (tests/src/litellm.rs starts it
//! once per test process, offline, answering `gpt-test` with its own mock
//! response). On both backends: what LiteLLM reports is what is counted,
//! the usage chunk the gateway asked for on the client's behalf does not
//! reach the client (LiteLLM's has `choices:[{"index":0,"delta":{}}]`, not
//! the empty `choices` OpenAI sends), one the client asked for does, and
//! LiteLLM's own `x-litellm-*` response headers stay behind the gateway.

use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use plangate_tests::harness::{tokens_used, Backend, Options, TestGateway};
use plangate_tests::litellm::{litellm, LiteLlm, MODEL};
use serde_json::{json, Value};

/// Room for every request of a test in one account's minute windows.
const PLANS: &str = r#"
default_plan: litellm
plans:
  litellm:
    endpoints:
      "gpt-test":
        fixed_windows:
          - window: 60s
            limit: 1000
          - window: 60s
            limit: 10_000_000
            unit_type: token
        max_concurrent: 4
"#;

/// One gateway per backend in front of the shared LiteLLM; empty (the
/// test skips, loudly) when LiteLLM cannot be started and is not required.
async fn gateways() -> Vec<(TestGateway, &'static LiteLlm)> {
    let Some(ll) = litellm().await else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for backend in Backend::all().await {
        let mut o = Options::new(backend);
        o.plans = PLANS.to_owned();
        o.upstream_url = Some(ll.url.clone());
        out.push((TestGateway::start(o).await, ll));
    }
    out
}

fn chat(stream: Option<bool>, include_usage: Option<bool>) -> Value {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello"}],
    });
    if let Some(s) = stream {
        body["stream"] = json!(s);
    }
    if let Some(u) = include_usage {
        body["stream_options"] = json!({ "include_usage": u });
    }
    body
}

/// The JSON payloads of an SSE body's `data:` lines, `[DONE]` left out.
fn sse_events(body: &[u8]) -> Vec<Value> {
    let text = String::from_utf8_lossy(body).replace("\r\n", "\n");
    text.split("\n\n")
        .flat_map(|event| event.lines())
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim)
        .filter(|d| !d.is_empty() && *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("SSE data not JSON ({e}): {d}")))
        .collect()
}

/// The streamed text of chat chunks.
fn content(events: &[Value]) -> String {
    events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect()
}

/// Any `cost` key, at any depth (LiteLLM can add one to `usage`).
fn has_cost(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.iter().any(|(k, v)| k == "cost" || has_cost(v)),
        Value::Array(a) => a.iter().any(has_cost),
        _ => false,
    }
}

/// POST `body` to LiteLLM itself (not through the gateway).
async fn direct(ll: &LiteLlm, body: &Value) -> (HeaderMap, Bytes) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("{}/v1/chat/completions", ll.url))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = client.request(req).await.expect("request to LiteLLM");
    assert_eq!(resp.status(), 200, "LiteLLM answered {}", resp.status());
    let (parts, body) = resp.into_parts();
    (parts.headers, body.collect().await.unwrap().to_bytes())
}

/// The usage LiteLLM reports for the streamed `hello` chat, asked of it
/// directly with `include_usage`.
async fn stream_usage_reported(ll: &LiteLlm) -> u64 {
    let (_, body) = direct(ll, &chat(Some(true), Some(true))).await;
    let events = sse_events(&body);
    let usage: Vec<u64> = events
        .iter()
        .filter_map(|e| e["usage"]["total_tokens"].as_u64())
        .collect();
    assert_eq!(usage.len(), 1, "one usage chunk from LiteLLM: {events:?}");
    assert!(usage[0] > 0);
    usage[0]
}

fn litellm_headers(headers: &HeaderMap) -> Vec<String> {
    headers
        .iter()
        .filter(|(n, _)| n.as_str().starts_with("x-litellm-"))
        .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap_or("?")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn litellm_chat_is_counted_as_its_reported_usage() {
    for (gw, _) in gateways().await {
        let (_, key) = gw.account(None).await;
        let r = gw.chat(&key, MODEL).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        let body = r.json();
        assert!(
            body["choices"][0]["message"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty()),
            "{body}"
        );
        let reported = body["usage"]["total_tokens"].as_u64().expect("usage");
        assert!(reported > 0);
        gw.wait_settled().await;
        assert_eq!(tokens_used(&gw.limits(&key).await, MODEL), reported);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn litellm_stream_without_usage_is_counted_and_its_usage_chunk_withheld() {
    for (gw, ll) in gateways().await {
        let expected = stream_usage_reported(ll).await;
        let (_, key) = gw.account(None).await;
        let mut s = gw
            .post_streaming("/v1/chat/completions", &key, &chat(Some(true), None), &[])
            .await;
        assert_eq!(s.status, 200);
        let (body, clean) = s.read_all().await;
        assert!(clean, "stream ended cleanly");
        let text = String::from_utf8_lossy(&body).into_owned();
        assert!(text.contains("data: [DONE]"), "{text}");
        let events = sse_events(&body);
        assert!(!content(&events).is_empty(), "{text}");
        gw.wait_settled().await;
        // The gateway asked LiteLLM for usage on the client's behalf and
        // counted exactly what it reported.
        assert_eq!(tokens_used(&gw.limits(&key).await, MODEL), expected);
        // ...and the chunk carrying it is not the client's to see.
        let leaked: Vec<&Value> = events
            .iter()
            .filter(|e| e.get("usage").is_some_and(|u| !u.is_null()) || has_cost(e))
            .collect();
        assert!(
            leaked.is_empty(),
            "the client did not ask for usage, yet its stream carries LiteLLM's usage chunk: {leaked:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn litellm_stream_with_include_usage_reaches_the_client_and_is_counted() {
    for (gw, ll) in gateways().await {
        let expected = stream_usage_reported(ll).await;
        let (_, key) = gw.account(None).await;
        let mut s = gw
            .post_streaming(
                "/v1/chat/completions",
                &key,
                &chat(Some(true), Some(true)),
                &[],
            )
            .await;
        assert_eq!(s.status, 200);
        let (body, clean) = s.read_all().await;
        assert!(clean, "stream ended cleanly");
        let events = sse_events(&body);
        assert!(!content(&events).is_empty());
        let usage: Vec<u64> = events
            .iter()
            .filter_map(|e| e["usage"]["total_tokens"].as_u64())
            .collect();
        assert_eq!(
            usage,
            vec![expected],
            "the client sees the usage chunk it asked for"
        );
        gw.wait_settled().await;
        assert_eq!(tokens_used(&gw.limits(&key).await, MODEL), expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn litellm_response_headers_do_not_reach_the_client() {
    for (gw, ll) in gateways().await {
        // LiteLLM does send them: the check below is not vacuous.
        let (direct_headers, _) = direct(ll, &chat(None, None)).await;
        assert!(!litellm_headers(&direct_headers).is_empty());

        let (_, key) = gw.account(None).await;
        let r = gw.chat(&key, MODEL).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        let mut s = gw
            .post_streaming("/v1/chat/completions", &key, &chat(Some(true), None), &[])
            .await;
        assert_eq!(s.status, 200);
        let _ = s.read_all().await;
        for (what, headers) in [("chat", &r.headers), ("stream", &s.headers)] {
            let leaked = litellm_headers(headers);
            assert!(
                leaked.is_empty(),
                "{what}: LiteLLM's headers reach the client: {leaked:?}"
            );
        }
    }
}
