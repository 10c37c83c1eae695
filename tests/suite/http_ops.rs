//! Operator experience over HTTP (issue 14 items 8-10), black-box against
//! the real `plangate serve`: the access log (one JSON line per response,
//! never a key), `GET /v1/models` in OpenAI's shape, `x-request-id` on
//! every 4xx, and OpenAI-style and Anthropic-style clients (`x-api-key`)
//! sharing one gateway, also with the official openai and anthropic
//! Python SDKs (tests/sdk/two_sdks.py).

use std::collections::HashMap;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use plangate_tests::procs::GatewayProc;
use plangate_tests::rig::{self, HttpClient, Resp};

const ADMIN: &str = "ops-http-admin-token-5e4d3c2b1a09";
const OPENAI_UPSTREAM_KEY: &str = "sk-openai-upstream-7f3a";
const ANTHROPIC_UPSTREAM_KEY: &str = "sk-ant-upstream-2b9c";

const PLANS: &str = r#"
default_plan: basic
plans:
  basic:
    name: Basic
    endpoints:
      "chat-model":
        fixed_windows:
          - window: 86_400s
            limit: 2
        credits:
          min_balance: 1
          per_request: 1
          per_unit: { token: { credits: 1, per: 100 } }
      "claude-model":
        fixed_windows:
          - window: 86_400s
            limit: 100
      "org/model-a":
        fixed_windows:
          - window: 86_400s
            limit: 100
      "image-model":
        fixed_windows:
          - window: 86_400s
            limit: 100
  other:
    name: Other
    endpoints:
      "other-model":
        fixed_windows:
          - window: 86_400s
            limit: 100
"#;

/// A gateway in front of `mock` with an OpenAI-style upstream and an
/// Anthropic-style one (its key sent in `x-api-key`), on the same mock;
/// `/v1/messages` reads the client's key from `x-api-key` or, failing
/// that, `Authorization: Bearer` (Anthropic's SDKs before 2.0 and since).
/// `log` is appended (a `[log]` section).
fn start(mock: &str, log: &str, env: &[(&str, &str)]) -> (GatewayProc, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(plangate_tests::harness::unique("ops-http"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("plans.yaml"), PLANS).unwrap();
    let config = dir.join("plangate.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"
token = "{ADMIN}"

[plans]
file = "plans.yaml"
watch = false

{log}

[[upstreams]]
name = "openai"
url = "{mock}"
auth = "Bearer {OPENAI_UPSTREAM_KEY}"

[[upstreams]]
name = "anthropic"
url = "{mock}"
auth = "{ANTHROPIC_UPSTREAM_KEY}"
auth_header = "x-api-key"

[[routes]]
path = "/v1/chat/completions"
upstream = "openai"
endpoint = "{{model}}"
usage.token = "body:usage.total_tokens"

[[routes]]
path = "/v1/messages"
upstream = "anthropic"
endpoint = "{{model}}"
auth_header = ["x-api-key", "authorization"]
usage.token = "body:usage.output_tokens"

[[routes]]
path = "/v1/images/generations"
upstream = "openai"
endpoint = "image-model"
"#
        ),
    )
    .unwrap();
    let gw = tokio::task::block_in_place(|| GatewayProc::spawn(&config, env));
    (gw, dir)
}

/// Create an account (on `plan`, or the default) with `credits`; its key
/// and key id.
async fn account(
    client: &HttpClient,
    gw: &GatewayProc,
    plan: Option<&str>,
    credits: u64,
) -> (String, String) {
    let admin = gw.admin.expect("admin listener");
    let id = plangate_tests::harness::unique("acct");
    let mut body = serde_json::json!({ "id": id });
    if let Some(p) = plan {
        body["plan_id"] = p.into();
    }
    let r = rig::post_json(client, admin, "/admin/accounts", ADMIN, &body, &[]).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let r = rig::post_json(
        client,
        admin,
        &format!("/admin/accounts/{id}/keys"),
        ADMIN,
        &serde_json::json!({}),
        &[],
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let created: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    if credits > 0 {
        let r = rig::post_json(
            client,
            admin,
            &format!("/admin/accounts/{id}/quota-blocks"),
            ADMIN,
            &serde_json::json!({ "credits": credits }),
            &[],
        )
        .await;
        assert_eq!(r.status, 201, "{:?}", r.body);
    }
    (
        created["key"].as_str().unwrap().to_owned(),
        created["id"].as_str().unwrap().to_owned(),
    )
}

/// A request with arbitrary headers and body.
async fn call(
    client: &HttpClient,
    gw: &GatewayProc,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Resp {
    let mut b = Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", gw.main));
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    rig::send(
        client,
        b.body(Full::new(Bytes::from(body.to_owned()))).unwrap(),
    )
    .await
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

fn json(r: &Resp) -> serde_json::Value {
    serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&r.body)))
}

fn request_id(r: &Resp) -> String {
    r.header("x-request-id")
        .unwrap_or_else(|| panic!("{} without x-request-id", r.status))
        .to_owned()
}

/// The status and `x-request-id` of a raw HTTP/1.1 exchange.
async fn raw(gw: &GatewayProc, bytes: &[u8]) -> (Option<u16>, Option<String>) {
    let resp = rig::raw_exchange(gw.main, bytes, std::time::Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&resp);
    let id = text
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .map(|v| v.trim().to_owned());
    (rig::raw_status(&resp), id)
}

/// A head the edge guard refuses before hyper reads it: two lengths.
const TWO_LENGTHS: &[u8] =
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab";

/// The access-log lines of a (JSON) log, by request id.
fn access_lines(log: &str) -> HashMap<String, serde_json::Value> {
    let mut out = HashMap::new();
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        if v["target"] == "plangate::access" {
            let id = v["request_id"].as_str().expect("request_id").to_owned();
            assert!(out.insert(id, v).is_none(), "two lines for one request");
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_is_one_json_line_per_response_without_the_key() {
    let mock = plangate::mock::start(Default::default()).await.unwrap();
    // The default format: JSON, stderr being a pipe ("" is as unset).
    let (mut gw, _dir) = start(&mock.url(), "", &[("PLANGATE_LOG_FORMAT", "")]);
    let client = rig::http_client();
    let (key, key_id) = account(&client, &gw, None, 100).await;
    let chat = r#"{"model":"chat-model","messages":[{"role":"user","content":"hi"}]}"#;
    let auth = bearer(&key);
    let json_ct = ("content-type", "application/json");
    let post = |headers: Vec<(&'static str, String)>| {
        let client = client.clone();
        let gw = &gw;
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            call(&client, gw, Method::POST, "/v1/chat/completions", &h, chat).await
        }
    };
    let ok1 = post(vec![
        json_ct_owned(json_ct),
        ("authorization", auth.clone()),
    ])
    .await;
    let ok2 = post(vec![
        json_ct_owned(json_ct),
        ("authorization", auth.clone()),
    ])
    .await;
    let denied = post(vec![
        json_ct_owned(json_ct),
        ("authorization", auth.clone()),
    ])
    .await;
    let wrong_key = format!("pg_{}", "x".repeat(43));
    let bad = post(vec![
        json_ct_owned(json_ct),
        ("authorization", bearer(&wrong_key)),
    ])
    .await;
    let missing = post(vec![json_ct_owned(json_ct)]).await;
    let (edge_status, edge_id) = raw(&gw, TWO_LENGTHS).await;
    assert_eq!(edge_status, Some(400));
    assert_eq!(
        [
            ok1.status,
            ok2.status,
            denied.status,
            bad.status,
            missing.status
        ]
        .map(|s| s.as_u16()),
        [200, 200, 429, 401, 401]
    );
    assert!(gw.terminate(), "graceful exit");
    let log = gw.log();
    assert!(!log.contains(&key), "the API key is in the log:\n{log}");
    assert!(!log.contains(&wrong_key), "a presented key is in the log");
    assert!(!log.contains(ADMIN), "the admin token is in the log");
    for secret in [OPENAI_UPSTREAM_KEY, ANTHROPIC_UPSTREAM_KEY] {
        assert!(!log.contains(secret), "an upstream key is in the log");
    }
    let lines = access_lines(&log);
    assert_eq!(lines.len(), 6, "one line per response:\n{log}");

    for ok in [&ok1, &ok2] {
        let l = &lines[&request_id(ok)];
        assert_eq!(l["level"], "INFO");
        assert_eq!(l["method"], "POST");
        assert_eq!(l["path"], "/v1/chat/completions");
        assert_eq!(
            l["account"].as_str().map(|a| a.starts_with("acct")),
            Some(true)
        );
        assert_eq!(l["key_id"], key_id.as_str());
        assert_eq!(l["endpoint"], "chat-model");
        assert_eq!(l["status"], 200);
        assert_eq!(l["decision"], "admitted");
        assert_eq!(l["upstream_status"], 200);
        assert_eq!(l["degraded"], false);
        assert!(l["latency_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{l}");
        // The units it was settled with, and the credits they cost:
        // 1 per request + 1 per 100 tokens (rounded up).
        let tokens = json(ok)["usage"]["total_tokens"].as_u64().unwrap();
        assert_eq!(l["units"], format!("token={tokens}"), "{l}");
        assert_eq!(l["credits"], 1 + tokens.div_ceil(100), "{l}");
        assert!(l.get("error").is_none(), "{l}");
    }
    let l = &lines[&request_id(&denied)];
    assert_eq!(l["status"], 429);
    assert_eq!(l["decision"], "denied");
    assert_eq!(l["error"], "rate_limit_exceeded");
    assert_eq!(l["window"], "request/86400s");
    assert_eq!(l["key_id"], key_id.as_str());
    assert_eq!(l["credits"], 0);
    assert!(l.get("upstream_status").is_none(), "{l}");
    for (r, code) in [(&bad, "invalid_api_key"), (&missing, "missing_api_key")] {
        let l = &lines[&request_id(r)];
        assert_eq!(l["status"], 401);
        assert_eq!(l["error"], code);
        assert!(
            l.get("account").is_none() && l.get("key_id").is_none(),
            "{l}"
        );
    }
    // A head refused before it was read: no method or path.
    let l = &lines[&edge_id.expect("x-request-id on an edge refusal")];
    assert_eq!(
        (l["status"].as_u64(), l["error"].as_str()),
        (Some(400), Some("invalid_request"))
    );
    assert!(l.get("method").is_none() && l.get("path").is_none(), "{l}");
}

fn json_ct_owned(h: (&'static str, &'static str)) -> (&'static str, String) {
    (h.0, h.1.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_can_be_turned_off() {
    let mock = plangate::mock::start(Default::default()).await.unwrap();
    // By the config, or by RUST_LOG.
    for (log_section, rust_log) in [
        ("[log]\naccess = false", "info"),
        ("", "info,plangate::access=off"),
    ] {
        let (mut gw, _dir) = start(
            &mock.url(),
            log_section,
            &[("PLANGATE_LOG_FORMAT", "json"), ("RUST_LOG", rust_log)],
        );
        let client = rig::http_client();
        let (key, _) = account(&client, &gw, None, 100).await;
        let r = rig::get(&client, gw.main, "/v1/models", Some(&key)).await;
        assert_eq!(r.status, 200);
        let r = rig::get(&client, gw.main, "/v1/models", None).await;
        assert_eq!(r.status, 401);
        assert!(gw.terminate());
        let log = gw.log();
        assert!(log.contains("plangate listening"), "{log}");
        assert!(
            access_lines(&log).is_empty(),
            "{log_section} {rust_log}: {log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_lists_what_the_callers_plan_allows_in_openai_shape() {
    let mock = plangate::mock::start(Default::default()).await.unwrap();
    let (gw, _dir) = start(&mock.url(), "", &[]);
    let client = rig::http_client();
    let (basic, _) = account(&client, &gw, None, 0).await;
    let (other, _) = account(&client, &gw, Some("other"), 0).await;

    let r = rig::get(&client, gw.main, "/v1/models", Some(&basic)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let model = |id: &str| serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "plangate"});
    assert_eq!(
        json(&r),
        serde_json::json!({"object": "list", "data": [
            model("chat-model"), model("claude-model"), model("image-model"), model("org/model-a")
        ]})
    );
    let r = rig::get(&client, gw.main, "/v1/models", Some(&other)).await;
    assert_eq!(
        json(&r),
        serde_json::json!({"object": "list", "data": [model("other-model")]})
    );

    // One model; ids may hold `/`, escaped or not.
    for path in ["/v1/models/org/model-a", "/v1/models/org%2Fmodel-a"] {
        let r = rig::get(&client, gw.main, path, Some(&basic)).await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(json(&r), model("org/model-a"));
    }
    // A model of another plan is not found, OpenAI-shaped.
    let r = rig::get(&client, gw.main, "/v1/models/other-model", Some(&basic)).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.code(), "model_not_found");
    assert_eq!(json(&r)["error"]["param"], "model");
    assert!(r.header("x-request-id").is_some());
    // Answered by the gateway itself: the upstream never saw a request.
    assert_eq!(mock.stats().requests(), 0);
}

/// Expected status and error code; the request: method, path, headers, body.
type Case<'a> = (
    u16,
    &'a str,
    Method,
    &'a str,
    Vec<(&'a str, &'a str)>,
    String,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_4xx_carries_x_request_id() {
    let mock = plangate::mock::start(Default::default()).await.unwrap();
    let (gw, _dir) = start(&mock.url(), "", &[]);
    let client = rig::http_client();
    let (key, _) = account(&client, &gw, None, 100).await;
    let auth = bearer(&key);
    let auth = auth.as_str();
    let ct = ("content-type", "application/json");
    let chat = |model: &str| format!(r#"{{"model":"{model}","messages":[]}}"#);
    let cases: Vec<Case> = vec![
        (
            401,
            "missing_api_key",
            Method::POST,
            "/v1/chat/completions",
            vec![ct],
            chat("chat-model"),
        ),
        (
            401,
            "invalid_api_key",
            Method::POST,
            "/v1/chat/completions",
            vec![ct, ("authorization", "Bearer nope")],
            chat("chat-model"),
        ),
        (
            404,
            "unknown_route",
            Method::POST,
            "/v2/nothing",
            vec![ct, ("authorization", auth)],
            chat("chat-model"),
        ),
        (
            403,
            "endpoint_not_allowed",
            Method::POST,
            "/v1/chat/completions",
            vec![ct, ("authorization", auth)],
            chat("other-model"),
        ),
        (
            400,
            "invalid_request",
            Method::POST,
            "/v1/chat/completions",
            vec![ct, ("authorization", auth)],
            "{not json".into(),
        ),
        (
            404,
            "model_not_found",
            Method::GET,
            "/v1/models/nope",
            vec![("authorization", auth)],
            String::new(),
        ),
        (
            405,
            "method_not_allowed",
            Method::POST,
            "/v1/models",
            vec![("authorization", auth)],
            String::new(),
        ),
        (
            401,
            "missing_api_key",
            Method::GET,
            "/v1/limits",
            vec![],
            String::new(),
        ),
        (
            401,
            "invalid_api_key",
            Method::GET,
            "/v1/usage",
            vec![("authorization", "Bearer nope")],
            String::new(),
        ),
        (
            200,
            "",
            Method::POST,
            "/v1/chat/completions",
            vec![ct, ("authorization", auth)],
            chat("chat-model"),
        ),
        (
            200,
            "",
            Method::POST,
            "/v1/chat/completions",
            vec![ct, ("authorization", auth)],
            chat("chat-model"),
        ),
        (
            429,
            "rate_limit_exceeded",
            Method::POST,
            "/v1/chat/completions",
            vec![ct, ("authorization", auth)],
            chat("chat-model"),
        ),
    ];
    let mut ids = std::collections::HashSet::new();
    for (status, code, method, path, headers, body) in cases {
        let r = call(&client, &gw, method.clone(), path, &headers, &body).await;
        let ctx = format!("{method} {path} {code}");
        assert_eq!(r.status.as_u16(), status, "{ctx}: {:?}", r.body);
        assert_eq!(r.code(), code, "{ctx}");
        let id = request_id(&r);
        assert!(id.starts_with("req_"), "{ctx}: {id}");
        assert!(ids.insert(id), "{ctx}: ids are unique");
    }
    // Heads the edge guard refuses before hyper reads them (400, and 401
    // for a control byte in a key header) carry one too.
    for (bytes, status) in [
        (TWO_LENGTHS.to_vec(), 400),
        (
            b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-api-key: pg_\x01\r\n\r\n".to_vec(),
            401,
        ),
    ] {
        let (got, id) = raw(&gw, &bytes).await;
        assert_eq!(got, Some(status));
        let id = id.expect("x-request-id on an edge refusal");
        assert!(ids.insert(id), "ids are unique");
    }
    // A client's own correlation id is echoed on a refusal too.
    let r = call(
        &client,
        &gw,
        Method::GET,
        "/v1/models",
        &[("x-request-id", "client-corr-1")],
        "",
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.header("x-request-id"), Some("client-corr-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_and_anthropic_style_clients_share_one_gateway() {
    let mock = plangate::mock::start(Default::default()).await.unwrap();
    let (gw, _dir) = start(&mock.url(), "", &[]);
    let client = rig::http_client();
    let (key, _) = account(&client, &gw, None, 100).await;
    let ct = ("content-type", "application/json");
    let messages =
        r#"{"model":"claude-model","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}"#;
    let chat = r#"{"model":"chat-model","messages":[{"role":"user","content":"hi"}]}"#;
    let auth = bearer(&key);

    // Anthropic's SDK: the raw key in x-api-key.
    let r = call(
        &client,
        &gw,
        Method::POST,
        "/v1/messages",
        &[ct, ("x-api-key", &key), ("anthropic-version", "2023-06-01")],
        messages,
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(json(&r)["type"], "message");
    let seen = mock.stats().last_request().expect("forwarded");
    assert_eq!(seen.uri, "/v1/messages");
    // The upstream gets the operator's key in its header, never the client's.
    assert_eq!(seen.headers["x-api-key"], ANTHROPIC_UPSTREAM_KEY);
    assert!(seen.headers.get("authorization").is_none());
    assert_eq!(seen.headers["anthropic-version"], "2023-06-01");

    // OpenAI's SDK on the same gateway, same key: Authorization: Bearer.
    let r = call(
        &client,
        &gw,
        Method::POST,
        "/v1/chat/completions",
        &[ct, ("authorization", &auth)],
        chat,
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let seen = mock.stats().last_request().expect("forwarded");
    assert_eq!(
        seen.headers["authorization"],
        format!("Bearer {OPENAI_UPSTREAM_KEY}").as_str()
    );
    assert!(seen.headers.get("x-api-key").is_none());

    // Anthropic's SDK since 2.0: Authorization: Bearer, which the
    // messages route reads when x-api-key is absent; neither reaches the
    // upstream.
    let r = call(
        &client,
        &gw,
        Method::POST,
        "/v1/messages",
        &[ct, ("authorization", &auth)],
        messages,
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let seen = mock.stats().last_request().expect("forwarded");
    assert_eq!(seen.headers["x-api-key"], ANTHROPIC_UPSTREAM_KEY);
    assert!(seen.headers.get("authorization").is_none());
    // Each route reads its own headers only: x-api-key is not the chat
    // route's.
    let r = call(
        &client,
        &gw,
        Method::POST,
        "/v1/chat/completions",
        &[ct, ("x-api-key", &key)],
        chat,
    )
    .await;
    assert_eq!(
        (r.status.as_u16(), r.code().as_str()),
        (401, "missing_api_key")
    );
    // A client that sends its key in both headers: neither is forwarded.
    let requests = mock.stats().requests();
    let r = call(
        &client,
        &gw,
        Method::POST,
        "/v1/messages",
        &[ct, ("x-api-key", &key), ("authorization", &auth)],
        messages,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(mock.stats().requests(), requests + 1);
    let seen = mock.stats().last_request().expect("forwarded");
    assert_eq!(seen.headers["x-api-key"], ANTHROPIC_UPSTREAM_KEY);
    assert!(seen.headers.get("authorization").is_none());
    for (_, v) in seen.headers.iter() {
        assert!(!v.as_bytes().windows(key.len()).any(|w| w == key.as_bytes()));
    }

    // The gateway's own endpoints take either header (Anthropic's
    // `client.models.list()` sends x-api-key).
    for h in [
        ("x-api-key", key.as_str()),
        ("authorization", auth.as_str()),
    ] {
        let r = call(&client, &gw, Method::GET, "/v1/models", &[h], "").await;
        assert_eq!(r.status, 200, "{h:?}");
        assert_eq!(json(&r)["data"].as_array().map(Vec::len), Some(4));
    }
}

/// `python3` when it has both the openai and anthropic packages; under
/// `PLANGATE_REQUIRE_SERVICES=1` their absence fails the test.
fn python_with_both_sdks() -> Option<&'static str> {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import openai, anthropic"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some("python3");
    }
    if std::env::var("PLANGATE_REQUIRE_SERVICES").is_ok_and(|v| v == "1") {
        panic!("python3 with the openai and anthropic packages is required (tests/run.sh installs them with pip)");
    }
    eprintln!(
        "\n*** SKIPPING: python3 -c 'import openai, anthropic' failed; run ./tests/run.sh.\n"
    );
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_openai_and_anthropic_sdks_share_one_gateway() {
    let Some(python) = python_with_both_sdks() else {
        return;
    };
    let mock = plangate::mock::start(Default::default()).await.unwrap();
    let (gw, _dir) = start(&mock.url(), "", &[]);
    let client = rig::http_client();
    let (key, _) = account(&client, &gw, None, 100).await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sdk/two_sdks.py");
    let base = format!("http://{}", gw.main);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .env("PLANGATE_BASE", base)
            .env("PLANGATE_KEY", key)
            .output()
            .expect("run python3")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "SDK checks failed:\n{stdout}");
    assert!(stdout.contains("all ok"));
    let seen = mock.stats().last_request().expect("forwarded");
    assert_eq!(seen.uri, "/v1/messages");
    assert_eq!(seen.headers["x-api-key"], ANTHROPIC_UPSTREAM_KEY);
}
