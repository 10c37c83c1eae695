use super::*;
use crate::usage::{dotted, SseScanner};
use hyper_util::client::legacy::{connect::HttpConnector, Client};

type TestClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Result<Bytes, String>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(self.body.as_ref().expect("complete body")).expect("JSON body")
    }
}

async fn call(
    client: &TestClient,
    mock: &MockHandle,
    method: Method,
    path: &str,
    headers: &[(&'static str, &str)],
    body: &str,
) -> Answer {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("{}{path}", mock.url()));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
    let resp = client.request(req).await.expect("response head");
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| e.to_string());
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

async fn stats(client: &TestClient, mock: &MockHandle) -> Value {
    call(client, mock, Method::GET, "/mock/stats", &[], "")
        .await
        .json()
}

const CHAT: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;

#[tokio::test]
async fn chat_completion_reports_deterministic_usage() {
    let mock = start(MockOptions::default()).await.unwrap();
    let c = client();
    let a = call(&c, &mock, Method::POST, "/v1/chat/completions", &[], CHAT).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.headers[CONTENT_TYPE], "application/json");
    let v = a.json();
    let prompt = (CHAT.len() as u64).div_ceil(4);
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "gpt-4o");
    assert_eq!(v["usage"]["prompt_tokens"], prompt);
    assert_eq!(v["usage"]["completion_tokens"], 50);
    assert_eq!(v["usage"]["total_tokens"], prompt + 50);
    assert!(a.headers.get("x-total-tokens").is_none());

    let a = call(
        &c,
        &mock,
        Method::POST,
        "/v1/completions",
        &[("x-mock-tokens", "101"), ("x-mock-chunks", "2")],
        r#"{"model":"m","prompt":"x"}"#,
    )
    .await;
    let v = a.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], "mock mock ");
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 50, "completion_tokens": 51, "total_tokens": 101})
    );

    // The stats endpoint is not counted.
    assert_eq!(mock.requests(), 2);
    assert_eq!(stats(&c, &mock).await["requests"], 2);
    assert_eq!(mock.requests(), 2);
    mock.shutdown().await;
}

fn scan(body: &Bytes) -> (Vec<String>, Option<u64>) {
    let mut s = SseScanner::new(vec![dotted("usage.total_tokens")]);
    s.feed(body);
    s.finish();
    let events = std::str::from_utf8(body)
        .unwrap()
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(str::to_owned)
        .collect();
    (events, s.value(0))
}

#[tokio::test]
async fn streams_with_and_without_the_usage_chunk() {
    let mock = start(MockOptions::default()).await.unwrap();
    let c = client();
    let body = r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true}}"#;
    let a = call(
        &c,
        &mock,
        Method::POST,
        "/v1/chat/completions",
        &[("x-mock-tokens", "40")],
        body,
    )
    .await;
    assert_eq!(a.headers[CONTENT_TYPE], "text/event-stream");
    let (events, total) = scan(a.body.as_ref().unwrap());
    assert_eq!(events.len(), 5 + 2, "{events:?}");
    assert!(events[0].contains(r#""usage":null"#));
    assert!(events[5].contains(r#""choices":[]"#));
    assert_eq!(events[6], "data: [DONE]");
    assert_eq!(total, Some(40));

    let body = r#"{"model":"gpt-4o","stream":true}"#;
    let a = call(
        &c,
        &mock,
        Method::POST,
        "/v1/chat/completions",
        &[("x-mock-chunks", "3")],
        body,
    )
    .await;
    let (events, total) = scan(a.body.as_ref().unwrap());
    assert_eq!(events.len(), 3 + 1);
    assert!(!events[0].contains("usage"));
    assert!(events[2].contains(r#""finish_reason":"stop""#));
    assert_eq!(total, None);
}

#[tokio::test]
async fn dies_mid_stream_and_mid_body() {
    let mock = start(MockOptions::default()).await.unwrap();
    let c = client();
    let body = r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#;
    let a = call(
        &c,
        &mock,
        Method::POST,
        "/v1/chat/completions",
        &[("x-mock-die-after", "2")],
        body,
    )
    .await;
    assert_eq!(a.status, 200);
    assert!(a.body.is_err(), "the stream must break, got {:?}", a.body);

    let a = call(
        &c,
        &mock,
        Method::POST,
        "/v1/chat/completions",
        &[("x-mock-die-after", "0")],
        CHAT,
    )
    .await;
    assert_eq!(a.status, 200);
    assert!(a.body.is_err(), "the body must break, got {:?}", a.body);
    // The mock is still healthy afterwards.
    let a = call(&c, &mock, Method::POST, "/v1/chat/completions", &[], CHAT).await;
    assert!(a.body.is_ok());
    assert_eq!(stats(&c, &mock).await["in_flight"], 0);
}

#[tokio::test]
async fn status_and_delay_knobs() {
    let mock = start(MockOptions::default()).await.unwrap();
    let c = client();
    let a = call(
        &c,
        &mock,
        Method::POST,
        "/v1/chat/completions",
        &[("x-mock-status", "503")],
        CHAT,
    )
    .await;
    assert_eq!(a.status, 503);
    assert_eq!(a.json()["error"]["type"], "server_error");
    let a = call(
        &c,
        &mock,
        Method::POST,
        "/v1/chat/completions",
        &[("x-mock-status", "429")],
        CHAT,
    )
    .await;
    assert_eq!(a.status, 429);

    let started = std::time::Instant::now();
    let a = call(
        &c,
        &mock,
        Method::POST,
        "/v1/embeddings",
        &[("x-mock-delay-ms", "120")],
        r#"{"input":"x"}"#,
    )
    .await;
    assert_eq!(a.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(120));
}

#[tokio::test]
async fn concurrency_is_observable() {
    let mock = start(MockOptions::default()).await.unwrap();
    let c = client();
    let calls = (0..4).map(|_| {
        call(
            &c,
            &mock,
            Method::POST,
            "/v1/chat/completions",
            &[("x-mock-delay-ms", "200")],
            CHAT,
        )
    });
    let answers = futures_util::future::join_all(calls).await;
    assert!(answers.iter().all(|a| a.status == 200));
    assert_eq!(mock.stats().max_in_flight(), 4);
    assert_eq!(mock.stats().in_flight(), 0);
}

#[tokio::test]
async fn other_endpoints() {
    let mock = start(MockOptions {
        usage_header: Some(HeaderName::from_static("x-total-tokens")),
        ..Default::default()
    })
    .await
    .unwrap();
    let c = client();
    let a = call(
        &c,
        &mock,
        Method::POST,
        "/v1/embeddings",
        &[("x-mock-tokens", "9")],
        r#"{"model":"e","input":["a","b"]}"#,
    )
    .await;
    let v = a.json();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(v["usage"], json!({"prompt_tokens": 9, "total_tokens": 9}));
    assert_eq!(a.headers["x-total-tokens"], "9");

    let a = call(
        &c,
        &mock,
        Method::POST,
        "/v1/images/generations",
        &[],
        r#"{"model":"dall-e-3","n":3}"#,
    )
    .await;
    assert_eq!(a.json()["data"].as_array().unwrap().len(), 3);
    assert!(a.headers.get("x-total-tokens").is_none());

    let a = call(&c, &mock, Method::GET, "/v1/models", &[], "").await;
    assert_eq!(a.json()["object"], "list");

    let a = call(
        &c,
        &mock,
        Method::POST,
        "/v1/messages",
        &[("x-mock-tokens", "9")],
        r#"{"model":"claude","max_tokens":5,"messages":[]}"#,
    )
    .await;
    let v = a.json();
    assert_eq!(v["type"], "message");
    assert_eq!(
        v["usage"],
        json!({"input_tokens": 4, "output_tokens": 5, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0})
    );

    let a = call(&c, &mock, Method::POST, "/v1/nope", &[], "").await;
    assert_eq!(a.status, 404);
    assert_eq!(a.json()["error"]["message"], "Invalid URL (POST /v1/nope)");
}

#[tokio::test]
async fn records_the_last_request_and_speaks_h2c() {
    let mock = start(MockOptions::default()).await.unwrap();
    let c: TestClient = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let a = call(
        &c,
        &mock,
        Method::POST,
        "/v1/chat/completions?x=1",
        &[("authorization", "Bearer up")],
        CHAT,
    )
    .await;
    assert_eq!(a.status, 200);
    let last = mock.stats().last_request().unwrap();
    assert_eq!(last.method, Method::POST);
    assert_eq!(last.uri, "/v1/chat/completions?x=1");
    assert_eq!(last.headers["authorization"], "Bearer up");
    assert_eq!(last.body, CHAT.as_bytes());
}
