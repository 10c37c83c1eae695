//! A real gateway in-process for black-box tests: real listeners, a real
//! HTTP upstream (plangate's mock OpenAI server), and either the in-process
//! stores or real Postgres + Redis. Time comes from a `ManualClock`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use plangate::app::{App, Bound};
use plangate::catalog::postgres::{migrate, PostgresCatalog};
use plangate::catalog::Catalog;
use plangate::clock::{ManualClock, SharedClock};
use plangate::config::Config;
use plangate::mock::{MockHandle, MockOptions};
use plangate::proxy::Core;
use tokio::sync::watch;

/// Which stores the gateway runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// In-process catalog and counters.
    Memory,
    /// Postgres catalog (fresh database) and Redis counters.
    Real,
}

impl Backend {
    /// Both backends, or only memory (loudly) when services are absent
    /// and not required.
    pub async fn all() -> Vec<Backend> {
        let mut out = vec![Backend::Memory];
        if crate::redis().await.is_some() && crate::postgres_db("probe").await.is_some() {
            out.push(Backend::Real);
        }
        out
    }
}

/// Admin token of test gateways.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// Plans most gateway tests use.
pub const TEST_PLANS: &str = r#"
default_plan: basic
plans:
  basic:
    name: Basic
    endpoints:
      "gpt-test":
        fixed_windows:
          - window: 60s
            limit: 3
          - window: 86_400s
            limit: 100
          - window: 60s
            limit: 1_000
            unit_type: token
        max_concurrent: 2
        concurrency_expiry: 30s
      "paid-model":
        fixed_windows:
          - window: 60s
            limit: 100
          - window: 60s
            limit: 100_000
            unit_type: token
        credits:
          min_balance: 1
          per_request: 1
          per_unit: { token: { credits: 1, per: 100 } }
      "text-embedding-test":
        fixed_windows:
          - window: 60s
            limit: 100
          - window: 60s
            limit: 100_000
            unit_type: token
      "dall-e-3":
        fixed_windows:
          - window: 60s
            limit: 2
            unit_type: image
  other:
    endpoints:
      "other-model":
        fixed_windows:
          - window: 60s
            limit: 5
"#;

/// Options for [`TestGateway::start`].
#[derive(Debug, Clone)]
pub struct Options {
    pub backend: Backend,
    pub plans: String,
    pub on_store_error: &'static str,
    /// Overrides `redis_url` (e.g. a dead port) for outage tests.
    pub redis_url: Option<String>,
    /// Overrides `postgres_url` (e.g. a dead port) for outage tests.
    pub postgres_url: Option<String>,
    pub extra_server: String,
    /// Extra `[admin]` lines (e.g. `metrics_token = "..."`).
    pub extra_admin: String,
    /// Replaces the mock as the upstream (e.g. an https server).
    pub upstream_url: Option<String>,
    /// Extra keys of the `[[upstreams]]` entry (e.g. `ca_file = "..."`).
    pub upstream_extra: String,
    pub mock: MockOptions,
    /// Use the real clock instead of the manual one (for clients that
    /// really wait, like the openai SDK honouring retry-after).
    pub system_clock: bool,
    /// `[plans] source`: "file" (the default) or "database".
    pub plans_source: &'static str,
    /// Appended to the config file (whole sections, e.g. `[notify]`).
    pub extra_config: String,
}

impl Options {
    pub fn new(backend: Backend) -> Self {
        Self {
            backend,
            plans: TEST_PLANS.to_owned(),
            on_store_error: "closed",
            redis_url: None,
            postgres_url: None,
            extra_server: String::new(),
            extra_admin: String::new(),
            upstream_url: None,
            upstream_extra: String::new(),
            mock: MockOptions::default(),
            system_clock: false,
            plans_source: "file",
            extra_config: String::new(),
        }
    }
}

/// A running gateway plus its upstream.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub core: Arc<Core>,
    pub clock: ManualClock,
    pub mock: MockHandle,
    pub dir: PathBuf,
    pub config: Config,
    shutdown: watch::Sender<bool>,
    serving: Option<tokio::task::JoinHandle<()>>,
    _watcher: Option<notify::RecommendedWatcher>,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// An app built from a config and serving on 127.0.0.1:0 in the background.
pub struct Served {
    pub app: App,
    pub bound: Bound,
    /// Send `true` to stop serving.
    pub shutdown: watch::Sender<bool>,
    pub serving: tokio::task::JoinHandle<()>,
}

/// Build `config` into an app (panicking on errors: this is test setup),
/// bind it on an ephemeral port and serve it in the background.
pub async fn serve_app(config: Config, clock: SharedClock) -> Served {
    let app = App::build(config, clock)
        .await
        .unwrap_or_else(|e| panic!("build: {e}"));
    let (shutdown, rx) = watch::channel(false);
    let (bound, serving) = app
        .bind(Some("127.0.0.1:0".parse().unwrap()), rx)
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    Served {
        app,
        bound,
        shutdown,
        serving: tokio::spawn(serving),
    }
}

/// A response, fully read.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The OpenAI error code of an error body.
    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }
}

/// A unique id for this test run (accounts, keys, dirs).
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

/// 2027-01-15T10:00:20Z: 20 s into a minute, so minute windows have 40 s left.
pub const T0_MS: u64 = 1_799_920_820_000;

impl TestGateway {
    /// One gateway per available backend, with default options.
    pub async fn each_backend() -> Vec<TestGateway> {
        let mut out = Vec::new();
        for backend in Backend::all().await {
            out.push(TestGateway::start(Options::new(backend)).await);
        }
        out
    }

    pub async fn start(opts: Options) -> TestGateway {
        crate::capture_logs();
        let dir = std::env::temp_dir().join(unique("plangate-test"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("plans.yaml"), &opts.plans).expect("write plans");
        let mock = plangate::mock::start(opts.mock.clone())
            .await
            .expect("mock upstream");
        let storage = match opts.backend {
            Backend::Memory => String::new(),
            Backend::Real => {
                let pg = match &opts.postgres_url {
                    Some(url) => url.clone(),
                    None => {
                        let pg = crate::postgres_db("gw").await.expect("postgres");
                        migrate(&pg).await.expect("migrate");
                        pg
                    }
                };
                let redis = match &opts.redis_url {
                    Some(r) => r.clone(),
                    None => crate::redis().await.expect("redis"),
                };
                format!("postgres_url = \"{pg}\"\nredis_url = \"{redis}\"\n")
            }
        };
        let toml = format!(
            r#"
[server]
listen = "127.0.0.1:0"
max_request_body = "64KiB"
request_timeout = "3s"
header_read_timeout = "2s"
{extra_server}

[admin]
listen = "127.0.0.1:0"
token = "{ADMIN_TOKEN}"
{extra_admin}

[storage]
{storage}
store_timeout = "300ms"
on_store_error = "{on_store_error}"

[plans]
file = "plans.yaml"
watch = true
source = "{plans_source}"

[[upstreams]]
name = "mock"
url = "{upstream}"
{upstream_extra}

[[routes]]
path = "/v1/chat/completions"
upstream = "mock"
endpoint = "{{model}}"
usage.token = ["body:usage.total_tokens"]
reserve.token = ["body:max_completion_tokens", "body:max_tokens", "body:max_output_tokens"]

[[routes]]
path = "/capped/v1/chat/completions"
upstream = "mock"
endpoint = "{{model}}"
usage.token = ["body:usage.total_tokens"]
reserve.token = ["body:max_completion_tokens", "body:max_tokens"]
cap.token = "max_tokens"

[[routes]]
path = "/v1/embeddings"
upstream = "mock"
endpoint = "{{model}}"
usage.token = ["body:usage.total_tokens"]

[[routes]]
path = "/v1/images/generations"
upstream = "mock"
endpoint = "dall-e-3"
reserve.image = "body:n"

[[routes]]
path = "/v1/responses"
upstream = "mock"
endpoint = "{{model}}"
usage.preset = "openai-responses"
reserve.token = "body:max_output_tokens"

[[routes]]
path = "/v1/messages"
upstream = "mock"
endpoint = "{{model}}"
usage.preset = "anthropic-messages"
reserve.token = "body:max_tokens"

{extra_config}
"#,
            extra_config = opts.extra_config,
            extra_server = opts.extra_server,
            extra_admin = opts.extra_admin,
            on_store_error = opts.on_store_error,
            upstream = opts.upstream_url.clone().unwrap_or_else(|| mock.url()),
            upstream_extra = opts.upstream_extra,
            plans_source = opts.plans_source,
        );
        let path = dir.join("plangate.toml");
        std::fs::write(&path, toml).expect("write config");
        let config = Config::load(&path).unwrap_or_else(|e| panic!("test config: {e}"));
        let clock = ManualClock::new(T0_MS);
        let shared: SharedClock = if opts.system_clock {
            Arc::new(plangate::clock::SystemClock)
        } else {
            Arc::new(clock.clone())
        };
        let Served {
            app,
            bound,
            shutdown: tx,
            serving,
        } = serve_app(config.clone(), shared).await;
        let core = app.core.clone();
        let watcher = app.watch_plans();
        TestGateway {
            addr: bound.main,
            admin_addr: bound.admin.expect("admin listener"),
            core,
            clock,
            mock,
            dir,
            config,
            shutdown: tx,
            serving: Some(serving),
            _watcher: watcher,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub fn catalog(&self) -> &Arc<dyn Catalog> {
        &self.core.catalog
    }

    /// A new account on `plan` (None: default) with one key; returns
    /// (account id, key).
    pub async fn account(&self, plan: Option<&str>) -> (String, String) {
        let id = unique("acct");
        self.catalog()
            .create_account(&id, plan, serde_json::json!({}))
            .await
            .expect("create account");
        let key = self.catalog().create_key(&id).await.expect("create key");
        (id, key.key)
    }

    /// Send a request to the main listener.
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Resp {
        send_to(&self.client, self.addr, req).await
    }

    /// Send to the admin listener.
    pub async fn admin(&self, method: Method, path: &str, token: Option<&str>, body: &str) -> Resp {
        let mut b = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        let req = b.body(Full::new(Bytes::from(body.to_owned()))).unwrap();
        send_to(&self.client, self.admin_addr, req).await
    }

    /// POST JSON to `path` with `key`.
    pub async fn post(&self, path: &str, key: Option<&str>, body: &serde_json::Value) -> Resp {
        self.post_with(path, key, body, &[]).await
    }

    /// POST JSON with extra headers.
    pub async fn post_with(
        &self,
        path: &str,
        key: Option<&str>,
        body: &serde_json::Value,
        headers: &[(&str, &str)],
    ) -> Resp {
        let mut b = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header("content-type", "application/json");
        if let Some(k) = key {
            b = b.header("authorization", format!("Bearer {k}"));
        }
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        let req = b.body(Full::new(Bytes::from(body.to_string()))).unwrap();
        self.send(req).await
    }

    /// A chat completion for `model`.
    pub async fn chat(&self, key: &str, model: &str) -> Resp {
        self.post(
            "/v1/chat/completions",
            Some(key),
            &serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hello"}]}),
        )
        .await
    }

    /// Stop serving and wait for in-flight requests to drain.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(s) = self.serving.take() {
            let _ = s.await;
        }
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Send `req` to `addr` and read the whole response.
pub async fn send_to(
    client: &Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    mut req: Request<Full<Bytes>>,
) -> Resp {
    let uri = format!(
        "http://{addr}{}",
        req.uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
    );
    *req.uri_mut() = uri.parse().unwrap();
    let resp = client.request(req).await.expect("request to gateway");
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    Resp {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Connect a second catalog to the same database (for invalidation tests).
pub async fn second_catalog(url: &str, clock: SharedClock) -> PostgresCatalog {
    PostgresCatalog::connect(url, clock)
        .await
        .expect("second catalog")
}

/// A response whose body is read frame by frame.
pub struct Streaming {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: hyper::body::Incoming,
}

impl Streaming {
    /// The next data frame, if any (None at the end or on error).
    pub async fn next_data(&mut self) -> Option<Result<Bytes, String>> {
        loop {
            match self.body.frame().await {
                None => return None,
                Some(Err(e)) => return Some(Err(e.to_string())),
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        return Some(Ok(d));
                    }
                }
            }
        }
    }

    /// Read to the end; returns the bytes read and whether it ended cleanly.
    pub async fn read_all(&mut self) -> (Vec<u8>, bool) {
        let mut out = Vec::new();
        while let Some(r) = self.next_data().await {
            match r {
                Ok(d) => out.extend_from_slice(&d),
                Err(_) => return (out, false),
            }
        }
        (out, true)
    }
}

impl TestGateway {
    /// POST JSON and return the response without reading its body.
    pub async fn post_streaming(
        &self,
        path: &str,
        key: &str,
        body: &serde_json::Value,
        headers: &[(&str, &str)],
    ) -> Streaming {
        let mut b = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{}{path}", self.addr))
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {key}"));
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        let req = b.body(Full::new(Bytes::from(body.to_string()))).unwrap();
        let resp = self.client.request(req).await.expect("request to gateway");
        let (parts, body) = resp.into_parts();
        Streaming {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    /// Wait (bounded, 1 s) until no admitted request is in flight. It waits
    /// for background settlement tasks, never for a window.
    pub async fn wait_settled(&self) {
        for _ in 0..200 {
            if self.core.metrics.in_flight() == 0 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        panic!(
            "requests still in flight after 1 s: {}",
            self.core.metrics.in_flight()
        );
    }

    /// `GET /v1/limits` for `key`.
    pub async fn limits(&self, key: &str) -> serde_json::Value {
        let req = Request::builder()
            .uri("/v1/limits")
            .header("authorization", format!("Bearer {key}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let r = self.send(req).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        r.json()
    }
}

/// Tokens used in the current minute window of `endpoint` (window index 2
/// of the test plan's gpt-test, or the token window of others).
pub fn tokens_used(limits: &serde_json::Value, endpoint: &str) -> u64 {
    limits["endpoints"][endpoint]["windows"]
        .as_array()
        .expect("windows")
        .iter()
        .find(|w| w["unit"] == "token" && w["window_seconds"] == 60)
        .and_then(|w| w["used"].as_u64())
        .expect("token window")
}
