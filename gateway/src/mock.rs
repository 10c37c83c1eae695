//! A mock OpenAI upstream (JSON with usage, SSE with the usage chunk,
//! embeddings, images, models) for `plangate dev`, the tests and the load
//! benchmark. HTTP/1.1 and h2c on one port (hyper-util's auto server).
//!
//! Endpoints: `POST /v1/chat/completions`, `POST /v1/completions` (both
//! with `"stream": true` support), `POST /v1/embeddings`,
//! `POST /v1/images/generations`, `GET /v1/models`, Anthropic's
//! `POST /v1/messages` (not streamed; `usage.input_tokens` and
//! `output_tokens`), and `GET /mock/stats` (not counted as a request).
//!
//! Token counts are deterministic: `prompt_tokens = ceil(body bytes / 4)`,
//! `completion_tokens = 10 × chunks`; with `x-mock-tokens: T` the total is
//! `T`, split as `prompt = T / 2`, `completion = T - prompt`.
//!
//! Test knobs, as request headers (so black-box tests can drive faults):
//!
//! | header | effect |
//! |---|---|
//! | `x-mock-delay-ms: N` | wait N ms before answering |
//! | `x-mock-status: S` | answer with status S and an OpenAI error body |
//! | `x-mock-chunks: N` | N content chunks (stream) / N×10 completion tokens |
//! | `x-mock-chunk-delay-ms: N` | pause between stream chunks |
//! | `x-mock-die-after: N` | break the connection after N chunks (non-stream: mid-body) |
//! | `x-mock-tokens: T` | report T total tokens |
//! | `x-mock-encoding: E` | compress with E (`gzip`, `deflate`) whatever the request accepts; `br` sends the body unchanged but labelled `br` |
//! | `x-mock-response-headers: a=1,b=2` | add these response headers |
//! | `x-mock-trailing-bytes: N` | a JSON answer carries a `prompt_logprobs` field of about N bytes after `usage`, as vLLM's does |
//!
//! Like the servers it stands in for, the mock
//! - compresses with gzip when the request accepts it (`accept-encoding`
//!   naming `gzip`), as nginx with `gzip on` does, streams included (each
//!   event flushed);
//! - reads the request leniently, as pydantic does: `stream` and
//!   `stream_options.include_usage` are truthy (`true`, `1`, `"true"`,
//!   `"1"`, `"yes"`, `"on"`), `n` may be a numeric string; of duplicate
//!   keys the last wins.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Response body of the mock: a stream that may fail on purpose.
pub type MockBody = BoxBody<Bytes, io::Error>;

/// How the mock behaves when a request does not say otherwise.
#[derive(Debug, Clone)]
pub struct MockOptions {
    /// Content chunks per streamed answer (and ×10 completion tokens).
    pub chunks: u32,
    /// Pause between streamed chunks.
    pub chunk_delay: Duration,
    /// Completion tokens each chunk is worth.
    pub tokens_per_chunk: u64,
    /// Also report the total tokens of non-streamed answers in this header
    /// (e.g. `x-total-tokens`), for routes that measure usage from headers.
    /// OpenAI itself does not send one, so it is off by default.
    pub usage_header: Option<HeaderName>,
}

impl Default for MockOptions {
    fn default() -> Self {
        Self {
            chunks: 5,
            chunk_delay: Duration::ZERO,
            tokens_per_chunk: 10,
            usage_header: None,
        }
    }
}

/// A request the mock received, for tests that check what the gateway
/// forwarded (headers rewritten, body changed).
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: Method,
    /// Path and query (also for HTTP/2's absolute form).
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Counters shared between the mock and its handle.
#[derive(Debug, Default)]
pub struct MockStats {
    requests: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    last: parking_lot::Mutex<Option<RecordedRequest>>,
    /// `x-request-id` of every API request received (tests that check
    /// nothing was charged that the upstream never saw).
    request_ids: parking_lot::Mutex<std::collections::HashSet<String>>,
}

impl MockStats {
    /// Requests received on the API paths (not `/mock/stats`).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Requests being answered right now (a stream counts until its end).
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// The most requests ever answered at once.
    pub fn max_in_flight(&self) -> u64 {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    /// The last API request received, if any.
    pub fn last_request(&self) -> Option<RecordedRequest> {
        self.last.lock().clone()
    }

    /// Whether a request with this `x-request-id` was received.
    pub fn saw_request_id(&self, id: &str) -> bool {
        self.request_ids.lock().contains(id)
    }

    fn to_json(&self) -> Value {
        json!({
            "requests": self.requests(),
            "in_flight": self.in_flight(),
            "max_in_flight": self.max_in_flight(),
        })
    }
}

/// Counts a request as in flight until dropped (with its response body).
struct InFlight(Arc<MockStats>);

impl InFlight {
    fn new(stats: Arc<MockStats>) -> Self {
        let now = stats.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        stats.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Self(stats)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running mock. Dropping it stops accepting connections.
#[derive(Debug)]
pub struct MockHandle {
    addr: SocketAddr,
    stats: Arc<MockStats>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl MockHandle {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`, ready for an upstream `url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Shared counters.
    pub fn stats(&self) -> &Arc<MockStats> {
        &self.stats
    }

    /// Requests received on the API paths so far.
    pub fn requests(&self) -> u64 {
        self.stats.requests()
    }

    /// Stop accepting connections and wait for the accept loop to end.
    /// Connections already open finish on their own.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for MockHandle {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Bind `127.0.0.1:0` and serve.
pub async fn start(opts: MockOptions) -> io::Result<MockHandle> {
    serve(TcpListener::bind(("127.0.0.1", 0)).await?, opts).await
}

/// Serve on `listener` in a background task; returns once it is accepting.
pub async fn serve(listener: TcpListener, opts: MockOptions) -> io::Result<MockHandle> {
    let addr = listener.local_addr()?;
    let stats = Arc::new(MockStats::default());
    let (tx, mut rx) = oneshot::channel::<()>();
    let opts = Arc::new(opts);
    let task_stats = stats.clone();
    let task = tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = &mut rx => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Usually too many open files: back off instead of spinning.
                        tracing::warn!(error = %e, "mock upstream: accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let (opts, stats) = (opts.clone(), task_stats.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let (opts, stats) = (opts.clone(), stats.clone());
                    async move { Ok::<_, Infallible>(handle(req, &opts, stats).await) }
                });
                // Errors here are clients going away or deliberate deaths.
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(MockHandle {
        addr,
        stats,
        shutdown: Some(tx),
        task: Some(task),
    })
}

/// Per-request knobs read from `x-mock-*` headers.
#[derive(Debug, Clone, Default)]
struct Knobs {
    delay_ms: Option<u64>,
    status: Option<u16>,
    chunks: Option<u32>,
    chunk_delay_ms: Option<u64>,
    die_after: Option<u32>,
    tokens: Option<u64>,
    encoding: Option<String>,
    trailing_bytes: Option<usize>,
}

impl Knobs {
    fn from_headers(h: &HeaderMap) -> Self {
        fn num<T: std::str::FromStr>(h: &HeaderMap, name: &str) -> Option<T> {
            h.get(name)?.to_str().ok()?.trim().parse().ok()
        }
        Self {
            delay_ms: num(h, "x-mock-delay-ms"),
            status: num(h, "x-mock-status"),
            chunks: num(h, "x-mock-chunks"),
            chunk_delay_ms: num(h, "x-mock-chunk-delay-ms"),
            die_after: num(h, "x-mock-die-after"),
            tokens: num(h, "x-mock-tokens"),
            encoding: h
                .get("x-mock-encoding")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
                .or_else(|| {
                    let accepts = h
                        .get_all(http::header::ACCEPT_ENCODING)
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .any(|v| v.split(',').any(|c| c.trim().starts_with("gzip")));
                    accepts.then(|| "gzip".to_owned())
                }),
            trailing_bytes: num(h, "x-mock-trailing-bytes"),
        }
    }
}

async fn handle(
    req: Request<Incoming>,
    opts: &MockOptions,
    stats: Arc<MockStats>,
) -> Response<MockBody> {
    // `x-mock-response-headers: a=1,b=2`: extra response headers, as
    // proxies such as LiteLLM add about cost and topology.
    let extra: Vec<(HeaderName, HeaderValue)> = req
        .headers()
        .get("x-mock-response-headers")
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(',')
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    Some((
                        HeaderName::from_bytes(k.trim().as_bytes()).ok()?,
                        HeaderValue::from_str(v.trim()).ok()?,
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut resp = answer(req, opts, stats).await;
    for (k, v) in extra {
        resp.headers_mut().append(k, v);
    }
    resp
}

async fn answer(
    req: Request<Incoming>,
    opts: &MockOptions,
    stats: Arc<MockStats>,
) -> Response<MockBody> {
    if req.method() == Method::GET && req.uri().path() == "/mock/stats" {
        return json_response(StatusCode::OK, &stats.to_json());
    }
    stats.requests.fetch_add(1, Ordering::SeqCst);
    let guard = InFlight::new(stats.clone());
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error_response(StatusCode::BAD_REQUEST, "could not read the body"),
    };
    if let Some(id) = parts
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
    {
        stats.request_ids.lock().insert(id.to_owned());
    }
    *stats.last.lock() = Some(RecordedRequest {
        method: parts.method.clone(),
        uri: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), ToString::to_string),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    let knobs = Knobs::from_headers(&parts.headers);
    if let Some(ms) = knobs.delay_ms {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(code) = knobs.status {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return error_response(status, &format!("mock status {code}"));
    }
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let model = json
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock-model")
        .to_owned();
    let chunks = knobs.chunks.unwrap_or(opts.chunks);
    let (prompt, completion) = match knobs.tokens {
        Some(t) => (t / 2, t - t / 2),
        None => (
            (body.len() as u64).div_ceil(4),
            opts.tokens_per_chunk.saturating_mul(u64::from(chunks)),
        ),
    };
    // Mounted under any prefix (`/capped/v1/...` answers as `/v1/...`),
    // like an upstream behind a path-routing proxy.
    let path = parts.uri.path();
    let path = path.find("/v1/").map_or(path, |i| &path[i..]);
    let resp = match (&parts.method, path) {
        (&Method::POST, "/v1/chat/completions")
        | (&Method::POST, "/v1/completions")
        | (&Method::POST, "/v1/responses")
        | (&Method::POST, "/v1/messages") => {
            let shape = match path {
                "/v1/chat/completions" => Shape::Chat,
                "/v1/completions" => Shape::Completion,
                "/v1/responses" => Shape::Responses,
                _ => Shape::Anthropic,
            };
            let chat = shape == Shape::Chat;
            if json.get("stream").is_some_and(truthy) {
                // The Responses and Anthropic streams always report usage.
                let include_usage = json
                    .pointer("/stream_options/include_usage")
                    .is_some_and(truthy);
                let plan = StreamPlan {
                    shape,
                    model,
                    chunks,
                    chunk_delay: knobs
                        .chunk_delay_ms
                        .map(Duration::from_millis)
                        .unwrap_or(opts.chunk_delay),
                    die_after: knobs.die_after,
                    include_usage,
                    usage: (prompt, completion),
                };
                return stream_response(plan, knobs.encoding.as_deref(), guard);
            }
            let text = "mock ".repeat(chunks as usize);
            if let Some(other) = other_shape_body(shape, &model, &text, (prompt, completion)) {
                other
            } else {
                let choice = if chat {
                    json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"})
                } else {
                    json!({"index": 0, "text": text, "finish_reason": "stop"})
                };
                json!({
                    "id": "mock-1",
                    "object": if chat { "chat.completion" } else { "text_completion" },
                    "created": 1_700_000_000,
                    "model": model,
                    "choices": [choice],
                    "usage": usage_json(prompt, completion),
                })
            }
        }
        (&Method::POST, "/v1/embeddings") => {
            let inputs = match json.get("input") {
                Some(Value::Array(a)) => a.len().max(1),
                _ => 1,
            };
            let data: Vec<Value> = (0..inputs)
                .map(|i| json!({"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3, 0.4]}))
                .collect();
            let total = knobs.tokens.unwrap_or(prompt);
            json!({
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": total, "total_tokens": total},
            })
        }
        (&Method::POST, "/v1/images/generations") => {
            let n = json
                .get("n")
                .and_then(|n| n.as_u64().or_else(|| n.as_str()?.trim().parse().ok()))
                .unwrap_or(1)
                .min(100);
            let data: Vec<Value> = (0..n)
                .map(|i| json!({"url": format!("https://mock.invalid/images/{i}.png")}))
                .collect();
            json!({"created": 1_700_000_000, "data": data})
        }
        (&Method::GET, "/v1/models") => {
            let data: Vec<Value> = ["gpt-4o", "gpt-4-turbo", "text-embedding-3-small", "dall-e-3"]
                .iter()
                .map(|id| json!({"id": id, "object": "model", "created": 1_700_000_000, "owned_by": "mock"}))
                .collect();
            json!({"object": "list", "data": data})
        }
        _ => {
            return error_response(
                StatusCode::NOT_FOUND,
                &format!("Invalid URL ({} {})", parts.method, path),
            )
        }
    };
    let mut raw = serde_json::to_vec(&resp).unwrap_or_default();
    if let (Some(n), Some(b'}')) = (knobs.trailing_bytes, raw.last()) {
        // After `usage` (serde_json writes keys in order, so splice it in).
        raw.pop();
        raw.extend_from_slice(br#","prompt_logprobs":["#);
        let item: &[u8] = br#"{"12":{"logprob":-1.5,"rank":1,"decoded_token":"usage"}},"#;
        while raw.len() < n {
            raw.extend_from_slice(item);
        }
        raw.extend_from_slice(br#"null]}"#);
    }
    let encoded = knobs.encoding.as_deref().and_then(|e| encode(e, &[&raw]));
    let bytes = match &encoded {
        Some((_, frames)) => Bytes::from(frames.concat()),
        None => Bytes::from(raw),
    };
    let mut response = match knobs.die_after {
        // Send half the body, then break the connection.
        Some(_) => {
            let half = bytes.slice(..bytes.len() / 2);
            let stream = futures_util::stream::unfold(0u8, move |step| {
                let half = half.clone();
                async move {
                    match step {
                        0 => Some((Ok(Frame::data(half)), 1)),
                        1 => {
                            flush_pause().await;
                            Some((Err(io::Error::other("mock upstream died")), 2))
                        }
                        _ => None,
                    }
                }
            });
            let mut r = Response::new(StreamBody::new(stream).boxed());
            // Promise the whole body so the client sees it cut short.
            r.headers_mut()
                .insert(http::header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
            r
        }
        None => Response::new(full(bytes)),
    };
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Some((coding, _)) = encoded {
        response.headers_mut().insert(
            http::header::CONTENT_ENCODING,
            HeaderValue::from_static(coding),
        );
    }
    if let Some(name) = &opts.usage_header {
        if resp.get("usage").is_some() {
            let total = resp["usage"]["total_tokens"].as_u64().unwrap_or(0);
            response
                .headers_mut()
                .insert(name.clone(), HeaderValue::from(total));
        }
    }
    drop(guard);
    response
}

fn usage_json(prompt: u64, completion: u64) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt.saturating_add(completion),
    })
}

/// The API shape of an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// OpenAI chat completions.
    Chat,
    /// OpenAI legacy completions.
    Completion,
    /// OpenAI Responses (`/v1/responses`).
    Responses,
    /// Anthropic Messages (`/v1/messages`).
    Anthropic,
}

/// The whole (non-streamed) answer of the Responses and Anthropic shapes,
/// as those APIs publish them; `None` for the OpenAI chat shapes.
fn other_shape_body(shape: Shape, model: &str, text: &str, usage: (u64, u64)) -> Option<Value> {
    let (prompt, completion) = usage;
    match shape {
        Shape::Responses => Some(json!({
            "id": "resp_mock",
            "object": "response",
            "created_at": 1_700_000_000,
            "status": "completed",
            "model": model,
            "output": [{"type": "message", "id": "msg_mock", "status": "completed", "role": "assistant",
                        "content": [{"type": "output_text", "text": text, "annotations": []}]}],
            "usage": {"input_tokens": prompt, "output_tokens": completion,
                      "total_tokens": prompt.saturating_add(completion)},
        })),
        Shape::Anthropic => Some(json!({
            "id": "msg_mock",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": null,
            "usage": {"input_tokens": prompt, "output_tokens": completion,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
        })),
        Shape::Chat | Shape::Completion => None,
    }
}

/// What a streamed answer looks like.
struct StreamPlan {
    shape: Shape,
    model: String,
    chunks: u32,
    chunk_delay: Duration,
    die_after: Option<u32>,
    include_usage: bool,
    usage: (u64, u64),
}

impl StreamPlan {
    /// The SSE events of the answer, in order.
    fn events(&self) -> Vec<Bytes> {
        match self.shape {
            Shape::Responses => return self.responses_events(),
            Shape::Anthropic => return self.anthropic_events(),
            Shape::Chat | Shape::Completion => {}
        }
        let chat = self.shape == Shape::Chat;
        let object = if chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let mut events = Vec::with_capacity(self.chunks as usize + 2);
        for i in 0..self.chunks {
            let last = i + 1 == self.chunks;
            let finish = if last { json!("stop") } else { Value::Null };
            let choice = if chat {
                json!({"index": 0, "delta": {"content": "mock "}, "finish_reason": finish})
            } else {
                json!({"index": 0, "text": "mock ", "finish_reason": finish})
            };
            let mut chunk = json!({
                "id": "mock-1",
                "object": object,
                "created": 1_700_000_000,
                "model": self.model,
                "choices": [choice],
            });
            if self.include_usage {
                // Like OpenAI: every chunk carries `usage: null` when asked.
                chunk["usage"] = Value::Null;
            }
            events.push(sse(&chunk));
        }
        if self.include_usage {
            events.push(sse(&json!({
                "id": "mock-1",
                "object": object,
                "created": 1_700_000_000,
                "model": self.model,
                "choices": [],
                "usage": usage_json(self.usage.0, self.usage.1),
            })));
        }
        events.push(Bytes::from_static(b"data: [DONE]\n\n"));
        events
    }

    /// A Responses stream: `response.created`, the text deltas, and
    /// `response.completed` with the usage (no `[DONE]`).
    fn responses_events(&self) -> Vec<Bytes> {
        let (prompt, completion) = self.usage;
        let response = |status: &str, usage: Value| {
            json!({"id": "resp_mock", "object": "response", "created_at": 1_700_000_000,
                   "status": status, "model": self.model, "output": [], "usage": usage})
        };
        let mut events = vec![named_sse(
            "response.created",
            &json!({"type": "response.created", "response": response("in_progress", Value::Null)}),
        )];
        for _ in 0..self.chunks {
            events.push(named_sse(
                "response.output_text.delta",
                &json!({"type": "response.output_text.delta", "item_id": "msg_mock",
                        "output_index": 0, "content_index": 0, "delta": "mock "}),
            ));
        }
        let usage = json!({"input_tokens": prompt, "output_tokens": completion,
                           "total_tokens": prompt.saturating_add(completion)});
        events.push(named_sse(
            "response.completed",
            &json!({"type": "response.completed", "response": response("completed", usage)}),
        ));
        events
    }

    /// An Anthropic Messages stream: `message_start` (input usage), the
    /// content block with its text deltas, `message_delta` (cumulative
    /// output tokens) and `message_stop`.
    fn anthropic_events(&self) -> Vec<Bytes> {
        let (prompt, completion) = self.usage;
        let mut events = vec![
            named_sse(
                "message_start",
                &json!({"type": "message_start", "message": {
                    "id": "msg_mock", "type": "message", "role": "assistant", "model": self.model,
                    "content": [], "stop_reason": null, "stop_sequence": null,
                    "usage": {"input_tokens": prompt, "output_tokens": 1,
                              "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}}),
            ),
            named_sse(
                "content_block_start",
                &json!({"type": "content_block_start", "index": 0,
                        "content_block": {"type": "text", "text": ""}}),
            ),
        ];
        for _ in 0..self.chunks {
            events.push(named_sse(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": 0,
                        "delta": {"type": "text_delta", "text": "mock "}}),
            ));
        }
        events.push(named_sse(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": 0}),
        ));
        events.push(named_sse(
            "message_delta",
            &json!({"type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                    "usage": {"output_tokens": completion}}),
        ));
        events.push(named_sse("message_stop", &json!({"type": "message_stop"})));
        events
    }
}

/// An SSE event with an `event:` name line, as the Responses and Anthropic
/// APIs send them.
fn named_sse(name: &str, v: &Value) -> Bytes {
    let mut out = format!("event: {name}\n").into_bytes();
    out.extend_from_slice(&sse(v));
    Bytes::from(out)
}

fn sse(v: &Value) -> Bytes {
    let mut out = b"data: ".to_vec();
    out.extend_from_slice(&serde_json::to_vec(v).unwrap_or_default());
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// A JSON value read as pydantic reads a `bool` in lax mode.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => matches!(
            s.trim().to_ascii_lowercase().as_str(),
            "true" | "1" | "yes" | "on" | "y" | "t"
        ),
        _ => false,
    }
}

/// Compress `pieces` as one body in `coding`, one output frame per piece
/// (each flushed, as a streaming nginx does) plus the trailer in the last.
/// `br` is only a label (the mock cannot brotli): the pieces go unchanged.
fn encode(coding: &str, pieces: &[&[u8]]) -> Option<(&'static str, Vec<Vec<u8>>)> {
    use flate2::write::{GzEncoder, ZlibEncoder};
    use flate2::Compression;
    use std::io::Write;
    fn run<W: Write>(
        mut enc: W,
        pieces: &[&[u8]],
        take: impl Fn(&mut W) -> Vec<u8>,
        finish: impl FnOnce(W) -> Vec<u8>,
    ) -> Vec<Vec<u8>> {
        let mut frames: Vec<Vec<u8>> = pieces
            .iter()
            .map(|p| {
                let _ = enc.write_all(p);
                let _ = enc.flush();
                take(&mut enc)
            })
            .collect();
        let tail = finish(enc);
        match frames.last_mut() {
            Some(last) => last.extend_from_slice(&tail),
            None => frames.push(tail),
        }
        frames
    }
    match coding.trim() {
        "gzip" => Some((
            "gzip",
            run(
                GzEncoder::new(Vec::new(), Compression::fast()),
                pieces,
                |e| std::mem::take(e.get_mut()),
                |e| e.finish().unwrap_or_default(),
            ),
        )),
        "deflate" => Some((
            "deflate",
            run(
                ZlibEncoder::new(Vec::new(), Compression::fast()),
                pieces,
                |e| std::mem::take(e.get_mut()),
                |e| e.finish().unwrap_or_default(),
            ),
        )),
        "br" => Some(("br", pieces.iter().map(|p| p.to_vec()).collect())),
        _ => None,
    }
}

fn stream_response(
    plan: StreamPlan,
    encoding: Option<&str>,
    guard: InFlight,
) -> Response<MockBody> {
    let mut events = plan.events();
    let encoded = encoding.and_then(|e| {
        let pieces: Vec<&[u8]> = events.iter().map(|b| &b[..]).collect();
        encode(e, &pieces)
    });
    let mut coding = None;
    if let Some((c, frames)) = encoded {
        coding = Some(c);
        events = frames.into_iter().map(Bytes::from).collect();
    }
    let delay = plan.chunk_delay;
    let die_after = plan.die_after.map(|n| n as usize);
    // State: next event index; the guard lives as long as the stream.
    let stream = futures_util::stream::unfold(
        (0usize, events, guard),
        move |(i, events, guard)| async move {
            if die_after == Some(i) {
                // Fail once (hyper then drops the connection); the state
                // moves past every event so the stream ends after.
                flush_pause().await;
                let err = io::Error::other("mock upstream died mid-stream");
                return Some((Err(err), (usize::MAX, events, guard)));
            }
            let event = events.get(i)?.clone();
            if i > 0 && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Some((Ok(Frame::data(event)), (i + 1, events, guard)))
        },
    );
    let mut r = Response::new(StreamBody::new(stream).boxed());
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    r.headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-cache"));
    if let Some(c) = coding {
        r.headers_mut()
            .insert(http::header::CONTENT_ENCODING, HeaderValue::from_static(c));
    }
    r
}

/// Before failing a body on purpose, give hyper a moment to put what was
/// already sent (and the response head) on the wire: a failing body aborts
/// the connection without flushing its write buffer.
async fn flush_pause() {
    tokio::time::sleep(Duration::from_millis(5)).await;
}

fn full(b: Bytes) -> MockBody {
    Full::new(b).map_err(|never| match never {}).boxed()
}

fn json_response(status: StatusCode, v: &Value) -> Response<MockBody> {
    let mut r = Response::new(full(Bytes::from(serde_json::to_vec(v).unwrap_or_default())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error_response(status: StatusCode, message: &str) -> Response<MockBody> {
    let kind = if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    json_response(
        status,
        &json!({"error": {"message": message, "type": kind, "param": null, "code": null}}),
    )
}

#[cfg(test)]
mod tests;
