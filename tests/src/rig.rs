//! Set-ups for the reliability tests: a gateway config written from parts
//! (so a test can point the gateway at a private Redis, a cuttable Postgres
//! route or a dead upstream), the same config run in-process (with a
//! `ManualClock` and access to `Core`) or as a `plangate serve` process,
//! raw-socket HTTP for inputs a well-behaved client cannot send, and a
//! tally of outcomes that tests print as the figures of docs/RELIABILITY.md.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use plangate::clock::{ManualClock, SharedClock};
use plangate::config::Config;
use plangate::proxy::Core;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::harness::{unique, T0_MS};

/// Admin token of reliability gateways (grepped for in logs).
pub const REL_ADMIN_TOKEN: &str = "rel-admin-token-9f8e7d6c5b4a39281706";

/// Plans of the reliability tests. Windows that must not roll over during
/// a test on the real clock are a day long (tests check the day did not
/// change under them).
pub const REL_PLANS: &str = r#"
default_plan: rel
plans:
  rel:
    name: Reliability
    endpoints:
      "exact-model":
        fixed_windows:
          - window: 86_400s
            limit: 100
      "paid-exact":
        fixed_windows:
          - window: 86_400s
            limit: 1_000_000
        credits: { min_balance: 1, per_request: 1 }
      "small-model":
        fixed_windows:
          - window: 86_400s
            limit: 5
      "free-model":
        fixed_windows:
          - window: 60s
            limit: 1_000_000
          - window: 60s
            limit: 1_000_000_000
            unit_type: token
        max_concurrent: 2000
        concurrency_expiry: 30s
      "paid-model":
        fixed_windows:
          - window: 60s
            limit: 1_000_000
          - window: 60s
            limit: 1_000_000_000
            unit_type: token
        max_concurrent: 2000
        concurrency_expiry: 30s
        credits:
          min_balance: 1
          per_request: 1
          per_unit: { token: { credits: 1, per: 100 } }
      "tts":
        fixed_windows:
          - window: 60s
            limit: 1_000_000
"#;

/// The parts of a gateway config the reliability tests vary.
#[derive(Debug, Clone)]
pub struct Setup {
    pub plans: String,
    pub postgres_url: Option<String>,
    pub redis_url: Option<String>,
    pub store_timeout: String,
    /// `[storage] catalog_timeout`; `None` leaves it out (the default).
    pub catalog_timeout: Option<String>,
    pub on_store_error: String,
    /// URL of the working upstream (usually the mock).
    pub upstream: String,
    /// URL of an upstream nobody listens on (route `/dead/v1/chat/completions`).
    pub dead_upstream: String,
    pub request_timeout: String,
    pub header_read_timeout: String,
    pub max_request_body: String,
    pub admin_token: String,
    /// Extra `[server]` lines (e.g. `body_read_timeout = "1s"`).
    pub extra_server: String,
    /// `[plans] source`: "file" (the default) or "database" (the admin
    /// API may change plans).
    pub plans_source: String,
    /// `[storage] spool` (in-process counters' durable outbox).
    pub spool: Option<String>,
    /// More `[storage]` lines, each ending in a newline.
    pub extra_storage: String,
}

impl Setup {
    /// Defaults: in-process stores, the given upstream, short timeouts.
    pub fn new(upstream: &str) -> Setup {
        Setup {
            plans: REL_PLANS.to_owned(),
            postgres_url: None,
            redis_url: None,
            store_timeout: "100ms".into(),
            catalog_timeout: None,
            on_store_error: "closed".into(),
            upstream: upstream.to_owned(),
            dead_upstream: format!("http://127.0.0.1:{}", crate::procs::free_port()),
            request_timeout: "1s".into(),
            header_read_timeout: "2s".into(),
            max_request_body: "64KiB".into(),
            admin_token: REL_ADMIN_TOKEN.to_owned(),
            extra_server: String::new(),
            plans_source: "file".into(),
            spool: None,
            extra_storage: String::new(),
        }
    }

    /// The config file text.
    pub fn toml(&self) -> String {
        let mut storage = String::new();
        if let Some(pg) = &self.postgres_url {
            storage.push_str(&format!("postgres_url = \"{pg}\"\n"));
        }
        if let Some(r) = &self.redis_url {
            storage.push_str(&format!("redis_url = \"{r}\"\n"));
        }
        if let Some(t) = &self.catalog_timeout {
            storage.push_str(&format!("catalog_timeout = \"{t}\"\n"));
        }
        if let Some(s) = &self.spool {
            storage.push_str(&format!("spool = \"{s}\"\n"));
        }
        storage.push_str(&self.extra_storage);
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
max_request_body = "{max_body}"
request_timeout = "{request_timeout}"
header_read_timeout = "{header_timeout}"
{extra_server}

[admin]
listen = "127.0.0.1:0"
token = "{token}"

[storage]
{storage}store_timeout = "{store_timeout}"
on_store_error = "{on_store_error}"

[plans]
file = "plans.yaml"
watch = false
source = "{plans_source}"

[[upstreams]]
name = "mock"
url = "{upstream}"

[[upstreams]]
name = "dead"
url = "{dead}"

[[routes]]
path = "/v1/chat/completions"
upstream = "mock"
endpoint = "{{model}}"
usage.token = ["header:x-total-tokens", "body:usage.total_tokens"]

[[routes]]
path = "/dead/v1/chat/completions"
upstream = "dead"
endpoint = "{{model}}"

[[routes]]
path = "/v1/audio/speech"
upstream = "mock"
endpoint = "tts"
"#,
            max_body = self.max_request_body,
            request_timeout = self.request_timeout,
            header_timeout = self.header_read_timeout,
            extra_server = self.extra_server,
            token = self.admin_token,
            store_timeout = self.store_timeout,
            on_store_error = self.on_store_error,
            upstream = self.upstream,
            dead = self.dead_upstream,
            plans_source = self.plans_source,
        )
    }

    /// Write `plangate.toml` and `plans.yaml` into a fresh temp dir;
    /// returns the config path.
    pub fn write(&self) -> PathBuf {
        let dir = std::env::temp_dir().join(unique("plangate-rel"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("plans.yaml"), &self.plans).expect("plans");
        let path = dir.join("plangate.toml");
        std::fs::write(&path, self.toml()).expect("config");
        path
    }
}

/// A gateway in this process on a [`Setup`], with a `ManualClock`.
pub struct Rig {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub core: Arc<Core>,
    pub clock: ManualClock,
    pub client: HttpClient,
    dir: PathBuf,
    shutdown: watch::Sender<bool>,
}

/// The HTTP client tests use.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A plain HTTP/1.1 client with a connection pool.
pub fn http_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

impl Rig {
    /// Charges not yet in the catalog: requests still ending (their
    /// settlement writes the outbox) plus accounts whose outbox is not yet
    /// written.
    pub fn charges_pending(&self) -> usize {
        self.core.limiter.ends_pending() + self.core.outbox.pending_accounts()
    }

    pub async fn start(setup: &Setup) -> Rig {
        crate::capture_logs();
        let path = setup.write();
        let config = Config::load(&path).unwrap_or_else(|e| panic!("rig config: {e}"));
        let clock = ManualClock::new(T0_MS);
        let shared: SharedClock = Arc::new(clock.clone());
        let crate::harness::Served {
            app,
            bound,
            shutdown: tx,
            ..
        } = crate::harness::serve_app(config, shared).await;
        Rig {
            addr: bound.main,
            admin_addr: bound.admin.expect("admin listener"),
            core: app.core.clone(),
            clock,
            client: http_client(),
            dir: path.parent().map(PathBuf::from).unwrap_or_default(),
            shutdown: tx,
        }
    }

    /// A new account on the default plan with one key: (account, key).
    pub async fn account(&self) -> (String, String) {
        let id = unique("rel");
        let cat = &self.core.catalog;
        cat.create_account(&id, None, serde_json::json!({}))
            .await
            .expect("create account");
        let key = cat.create_key(&id).await.expect("create key");
        (id, key.key)
    }

    /// Chat completion for `model` with extra headers.
    pub async fn chat(&self, key: &str, model: &str, headers: &[(&str, &str)]) -> Resp {
        chat(
            &self.client,
            self.addr,
            "/v1/chat/completions",
            key,
            model,
            headers,
        )
        .await
    }

    /// Wait (bounded by `limit`) until no admitted request is in flight;
    /// returns how long it took.
    pub async fn settled_within(&self, limit: Duration) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() <= limit {
            if self.core.metrics.in_flight() == 0 {
                return Some(start.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        None
    }

    /// Live concurrency slots of (account, endpoint) per the limiter.
    pub async fn slots_in_use(&self, account: &str, endpoint: &str) -> u32 {
        let plans = self.core.cache.plans();
        let plan = plans.plans.get("rel").expect("plan rel");
        let policy = plan.policy(endpoint).expect("endpoint");
        let info = self
            .core
            .limiter
            .info(account, endpoint, policy)
            .await
            .expect("limiter info");
        info.concurrent
            .map(|c| c.limit - c.remaining)
            .unwrap_or_default()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A fully read response.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The client saw the body cut short (connection error mid-body).
    pub body_error: bool,
    pub elapsed: Duration,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The OpenAI error code of an error body ("" if none).
    pub fn code(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }
}

/// A chat completion request body (`"stream": true` when `stream`).
pub fn chat_body(model: &str, stream: bool) -> serde_json::Value {
    let mut body =
        serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    if stream {
        body["stream"] = serde_json::Value::Bool(true);
    }
    body
}

/// POST a chat completion for `model` to `path` on `addr`.
pub async fn chat(
    client: &HttpClient,
    addr: SocketAddr,
    path: &str,
    key: &str,
    model: &str,
    headers: &[(&str, &str)],
) -> Resp {
    post_json(client, addr, path, key, &chat_body(model, false), headers).await
}

/// POST a JSON body with a bearer key and extra headers.
pub async fn post_json(
    client: &HttpClient,
    addr: SocketAddr,
    path: &str,
    key: &str,
    body: &serde_json::Value,
    headers: &[(&str, &str)],
) -> Resp {
    let mut b = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"));
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    send(
        client,
        b.body(Full::new(Bytes::from(body.to_string()))).unwrap(),
    )
    .await
}

/// Send a request and read the whole response; a transport error becomes
/// status 0 (counted as an error by [`Tally`]).
pub async fn send(client: &HttpClient, req: Request<Full<Bytes>>) -> Resp {
    let start = Instant::now();
    match client.request(req).await {
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            let (body, body_error) = match body.collect().await {
                Ok(c) => (c.to_bytes(), false),
                Err(_) => (Bytes::new(), true),
            };
            Resp {
                status: parts.status,
                headers: parts.headers,
                body,
                body_error,
                elapsed: start.elapsed(),
            }
        }
        Err(_) => Resp {
            status: StatusCode::from_u16(599).unwrap(),
            headers: HeaderMap::new(),
            body: Bytes::new(),
            body_error: true,
            elapsed: start.elapsed(),
        },
    }
}

/// GET `path` on `addr` with an optional bearer token.
pub async fn get(client: &HttpClient, addr: SocketAddr, path: &str, token: Option<&str>) -> Resp {
    let mut b = Request::builder().uri(format!("http://{addr}{path}"));
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    send(client, b.body(Full::new(Bytes::new())).unwrap()).await
}

/// Outcomes of a batch of requests, for assertions and the printed figures.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub statuses: BTreeMap<u16, u64>,
    pub degraded: u64,
    pub max_latency: Duration,
}

impl Tally {
    pub fn add(&mut self, r: &Resp) {
        *self.statuses.entry(r.status.as_u16()).or_default() += 1;
        if r.header("x-ratelimit-degraded") == Some("true") {
            self.degraded += 1;
        }
        self.max_latency = self.max_latency.max(r.elapsed);
    }

    pub fn sent(&self) -> u64 {
        self.statuses.values().sum()
    }

    /// 2xx answers.
    pub fn admitted(&self) -> u64 {
        self.count(|s| (200..300).contains(&s))
    }

    /// 429 answers.
    pub fn denied(&self) -> u64 {
        self.count(|s| s == 429)
    }

    /// Anything else (5xx, transport errors as 599, ...).
    pub fn errored(&self) -> u64 {
        self.sent() - self.admitted() - self.denied()
    }

    pub fn status(&self, s: u16) -> u64 {
        self.statuses.get(&s).copied().unwrap_or(0)
    }

    fn count(&self, f: impl Fn(u16) -> bool) -> u64 {
        self.statuses
            .iter()
            .filter(|(s, _)| f(**s))
            .map(|(_, n)| n)
            .sum()
    }

    /// One line for the test log (and docs/RELIABILITY.md).
    pub fn line(&self, name: &str) -> String {
        format!(
            "FIGURES {name}: sent={} admitted={} denied={} errored={} degraded={} max_latency={:?} statuses={:?}",
            self.sent(),
            self.admitted(),
            self.denied(),
            self.errored(),
            self.degraded,
            self.max_latency,
            self.statuses
        )
    }
}

/// Write `bytes` on a fresh connection to `addr` and read until the server
/// closes or `wait` passes. Returns what was read.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8], wait: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let _ = s.write_all(bytes).await;
    read_until_close(&mut s, wait).await
}

/// Read until EOF, error or `wait`.
pub async fn read_until_close(s: &mut TcpStream, wait: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// The status code of a raw HTTP/1.1 response ("HTTP/1.1 400 ...").
pub fn raw_status(resp: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(resp.get(..12)?).ok()?;
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// Tokio tasks alive in this process's runtime.
pub fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// This process's resident set size in KiB.
pub fn self_rss_kib() -> u64 {
    crate::procs::rss_kib(std::process::id()).unwrap_or(0)
}
