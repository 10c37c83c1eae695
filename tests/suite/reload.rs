//! Hot reload: plans follow their file (atomic renames included) and
//! SIGHUP; an invalid file leaves the old plans in force and is counted.
//! Routes reload on SIGHUP (tested against the real binary).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use plangate_tests::harness::{Backend, Options, TestGateway, ADMIN_TOKEN, TEST_PLANS};

/// Replace a file the way editors and ConfigMaps do: write aside, rename.
fn atomic_write(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn limit_header(gw: &TestGateway, key: &str) -> String {
    let r = gw.chat(key, "gpt-test").await;
    r.header("x-ratelimit-limit-requests")
        .unwrap_or("")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plans_file_changes_apply_and_bad_files_are_rejected() {
    for backend in Backend::all().await {
        let gw = TestGateway::start(Options::new(backend)).await;
        let (_, key) = gw.account(None).await;
        assert_eq!(limit_header(&gw, &key).await, "3");
        gw.wait_settled().await;

        let raised = TEST_PLANS.replacen("limit: 3\n", "limit: 7\n", 1);
        assert_ne!(raised, TEST_PLANS);
        atomic_write(&gw.dir.join("plans.yaml"), &raised);
        let mut seen = String::new();
        for _ in 0..60 {
            seen = limit_header(&gw, &key).await;
            gw.wait_settled().await;
            if seen == "7" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(seen, "7", "new plans applied within 3 s");

        // Invalid: the old plans stay and the failure is counted.
        let failures = gw.core.metrics.reload_failures();
        atomic_write(
            &gw.dir.join("plans.yaml"),
            &raised.replacen("fixed_windows", "sliding_windows", 1),
        );
        for _ in 0..60 {
            if gw.core.metrics.reload_failures() > failures {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(gw.core.metrics.reload_failures(), failures + 1);
        gw.clock.advance(Duration::from_secs(60));
        assert_eq!(
            limit_header(&gw, &key).await,
            "7",
            "old plans still in force"
        );
    }
}

/// A plans file naming a unit no route measures or reserves (a typo) is
/// refused on reload like any invalid file: old plans stay, it is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plans_naming_units_no_route_measures_are_rejected_on_reload() {
    let gw = TestGateway::start(Options::new(Backend::Memory)).await;
    let (_, key) = gw.account(None).await;
    assert_eq!(limit_header(&gw, &key).await, "3");
    gw.wait_settled().await;
    let failures = gw.core.metrics.reload_failures();
    let typo = TEST_PLANS.replacen("limit: 3\n", "limit: 7\n", 1).replacen(
        "unit_type: token\n",
        "unit_type: tokens\n",
        1,
    );
    assert_ne!(typo, TEST_PLANS);
    atomic_write(&gw.dir.join("plans.yaml"), &typo);
    for _ in 0..60 {
        if gw.core.metrics.reload_failures() > failures {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(gw.core.metrics.reload_failures(), failures + 1);
    gw.clock.advance(Duration::from_secs(60));
    assert_eq!(
        limit_header(&gw, &key).await,
        "3",
        "old plans still in force"
    );
}

/// A `plangate serve` process; killed on drop.
struct Served {
    child: Child,
    port: u16,
    admin_port: u16,
    addr: String,
    admin: String,
}

impl Served {
    /// Start `plangate serve` on a fresh config (plans: TEST_PLANS) pointing
    /// at `upstream`; waits until it listens.
    fn start(dir: &std::path::Path, upstream: &str, stderr: Stdio) -> Served {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("plans.yaml"), TEST_PLANS).unwrap();
        let (port, admin_port) = (free_port(), free_port());
        write_config(dir, port, admin_port, upstream, false);
        let child = Command::new(plangate_tests::plangate_bin())
            .args(["serve", "--config"])
            .arg(dir.join("plangate.toml"))
            .env("RUST_LOG", "info")
            .stderr(stderr)
            .spawn()
            .expect("spawn plangate serve");
        let listening = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(listening, "plangate serve did not start");
        Served {
            child,
            port,
            admin_port,
            addr: format!("http://127.0.0.1:{port}"),
            admin: format!("http://127.0.0.1:{admin_port}"),
        }
    }

    /// A new account with one key, through the admin API; returns the key.
    async fn key(&self, http: &reqwest_like::Client) -> String {
        let account = plangate_tests::harness::unique("proc");
        let body = format!("{{\"id\":\"{account}\"}}");
        let (s, _) = http
            .call(
                "POST",
                &format!("{}/admin/accounts", self.admin),
                Some(ADMIN_TOKEN),
                &body,
            )
            .await;
        assert_eq!(s, 201);
        let (s, body) = http
            .call(
                "POST",
                &format!("{}/admin/accounts/{account}/keys", self.admin),
                Some(ADMIN_TOKEN),
                "",
            )
            .await;
        assert_eq!(s, 201);
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["key"]
            .as_str()
            .unwrap()
            .to_owned()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn write_config(
    dir: &std::path::Path,
    port: u16,
    admin_port: u16,
    upstream: &str,
    extra_route: bool,
) {
    let mut toml = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
[admin]
listen = "127.0.0.1:{admin_port}"
token = "{ADMIN_TOKEN}"
[plans]
file = "plans.yaml"
[[upstreams]]
name = "mock"
url = "{upstream}"
[[routes]]
path = "/v1/chat/completions"
upstream = "mock"
endpoint = "{{model}}"
usage.token = ["body:usage.total_tokens"]
[[routes]]
path = "/v1/images/generations"
upstream = "mock"
endpoint = "dall-e-3"
reserve.image = "body:n"
"#
    );
    if extra_route {
        toml.push_str("\n[[routes]]\npath = \"/v1/embeddings\"\nupstream = \"mock\"\nendpoint = \"{model}\"\n");
    }
    atomic_write(&dir.join("plangate.toml"), &toml);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_routes_in_the_real_binary() {
    let mock = plangate::mock::start(Default::default()).await.unwrap();
    let dir = std::env::temp_dir().join(plangate_tests::harness::unique("sighup"));
    let mut served = Served::start(&dir, &mock.url(), Stdio::piped());
    let stderr = served.child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let http = reqwest_like::Client::new();
    let key = served.key(&http).await;
    let embed = r#"{"model":"text-embedding-test","input":"hi"}"#;
    let (s, _) = http
        .call(
            "POST",
            &format!("{}/v1/embeddings", served.addr),
            Some(&key),
            embed,
        )
        .await;
    assert_eq!(s, 404, "no embeddings route yet");

    write_config(&dir, served.port, served.admin_port, &mock.url(), true);
    let ok = Command::new("kill")
        .args(["-HUP", &served.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let mut status = 0;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        (status, _) = http
            .call(
                "POST",
                &format!("{}/v1/embeddings", served.addr),
                Some(&key),
                embed,
            )
            .await;
        if status == 200 {
            break;
        }
    }
    assert_eq!(status, 200, "route added by SIGHUP");
    let mut logs: Vec<String> = rx.try_iter().collect();
    assert!(
        logs.iter().any(|l| l.contains("routes reloaded")),
        "{logs:?}"
    );

    // Routes that no longer reserve `image`, which the plans in force
    // limit: refused, the old routes (embeddings included) stay.
    let config = dir.join("plangate.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let without_images = text.replace("reserve.image = \"body:n\"", "");
    assert_ne!(without_images, text);
    let without_embeddings =
        without_images.replace("path = \"/v1/embeddings\"", "path = \"/v1/gone\"");
    atomic_write(&config, &without_embeddings);
    assert!(Command::new("kill")
        .args(["-HUP", &served.child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let mut refused = false;
    for _ in 0..60 {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(50)) {
            refused |= line.contains("routes reload rejected")
                && line.contains("fixed_windows[0].unit_type: unit `image` is not measured or reserved by any route");
            logs.push(line);
            if refused {
                break;
            }
        }
    }
    assert!(refused, "{logs:?}");
    let (status, _) = http
        .call(
            "POST",
            &format!("{}/v1/embeddings", served.addr),
            Some(&key),
            embed,
        )
        .await;
    assert_eq!(status, 200, "old routes still in force");
    assert!(
        !logs.iter().any(|l| l.contains(&key)),
        "API key leaked into logs"
    );
    drop(served);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A minimal HTTP/1.1 client for the process tests.
mod reqwest_like {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::{connect::HttpConnector, Client as Hyper};
    use hyper_util::rt::TokioExecutor;

    pub struct Client(Hyper<HttpConnector, Full<Bytes>>);

    impl Client {
        pub fn new() -> Self {
            Client(Hyper::builder(TokioExecutor::new()).build_http())
        }

        pub async fn call(
            &self,
            method: &str,
            url: &str,
            bearer: Option<&str>,
            body: &str,
        ) -> (u16, String) {
            let mut b = http::Request::builder()
                .method(method)
                .uri(url)
                .header("content-type", "application/json");
            if let Some(t) = bearer {
                b = b.header("authorization", format!("Bearer {t}"));
            }
            let resp = self
                .0
                .request(b.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        }

        pub async fn call_with(
            &self,
            url: &str,
            key: &str,
            body: &str,
            headers: &[(&str, &str)],
        ) -> (u16, String) {
            let mut b = http::Request::builder()
                .method("POST")
                .uri(url)
                .header("content-type", "application/json")
                .header("authorization", format!("Bearer {key}"));
            for (n, v) in headers {
                b = b.header(*n, *v);
            }
            let resp = self
                .0
                .request(b.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish() {
    let mock = plangate::mock::start(Default::default()).await.unwrap();
    let dir = std::env::temp_dir().join(plangate_tests::harness::unique("term"));
    let mut served = Served::start(&dir, &mock.url(), Stdio::null());
    let port = served.port;
    let http = reqwest_like::Client::new();
    let key = served.key(&http).await;

    // A slow request is in flight when SIGTERM arrives.
    let url = format!("{}/v1/chat/completions", served.addr);
    let slow = tokio::spawn(async move {
        let client = reqwest_like::Client::new();
        client
            .call_with(
                &url,
                &key,
                r#"{"model":"gpt-test","messages":[]}"#,
                &[("x-mock-delay-ms", "1500")],
            )
            .await
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    let pid = served.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let (status, _) = slow.await.unwrap();
    assert_eq!(status, 200, "the in-flight request finished");
    let mut exited = None;
    for _ in 0..100 {
        if let Some(code) = served.child.try_wait().unwrap() {
            exited = Some(code);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let code = exited.expect("plangate exits after draining");
    assert!(code.success(), "clean exit: {code:?}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "no longer listening"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
