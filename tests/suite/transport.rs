//! Transport: HTTPS inbound (rustls, ALPN h2 + http/1.1) with a certificate
//! generated for the test, HTTP/2 clients, and an https upstream trusted
//! through `ca_file`.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use plangate::config::TlsFiles;
use plangate::server::{serve_listener, tls_acceptor, Body, ListenerOptions};
use plangate_tests::harness::{Backend, Options, TestGateway};

/// A test CA and a localhost / 127.0.0.1 certificate it signed, made with
/// openssl. Returns the server files and the CA certificate.
fn make_cert(dir: &Path) -> (TlsFiles, std::path::PathBuf) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("openssl (Debian package openssl) is needed to make test certificates");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-days",
            "1",
            "-subj",
            "/CN=plangate-test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec,
        &[
            "-subj",
            "/CN=localhost",
            "-keyout",
            "key.pem",
            "-out",
            "leaf.csr",
        ],
    ]
    .concat());
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "leaf.ext",
        "-out",
        "cert.pem",
    ]);
    (
        TlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        },
        dir.join("ca.pem"),
    )
}

fn client_trusting(
    cert: &Path,
    h2_only: bool,
) -> Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
> {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(cert).unwrap();
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    // ALPN offers h2 only when the client wants it; otherwise http/1.1.
    let connector = if h2_only {
        builder.enable_http2().build()
    } else {
        builder.enable_http1().build()
    };
    let mut b = Client::builder(TokioExecutor::new());
    b.http2_only(h2_only);
    b.build(connector)
}

/// An https upstream answering every request with an OpenAI-style body.
async fn https_upstream(files: &TlsFiles) -> (String, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(AtomicU64::new(0));
    let counter = hits.clone();
    let acceptor = tls_acceptor(files).unwrap();
    let (_tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let _keep = _tx;
        serve_listener(
            listener,
            Some(acceptor),
            ListenerOptions::default(),
            move |_req, _peer| {
                counter.fetch_add(1, Ordering::SeqCst);
                async move {
                    let body = r#"{"id":"x","object":"chat.completion","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#;
                    let mut resp: Response<Body> = Response::new(
                        Full::new(Bytes::from_static(body.as_bytes())).map_err(|n| match n {}).boxed_unsync(),
                    );
                    resp.headers_mut().insert("content-type", "application/json".parse().unwrap());
                    resp
                }
            },
            rx,
        )
        .await;
    });
    (format!("https://localhost:{port}"), hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_in_with_h2_and_http1_and_https_upstream() {
    for backend in Backend::all().await {
        let dir = std::env::temp_dir().join(plangate_tests::harness::unique("tls"));
        std::fs::create_dir_all(&dir).unwrap();
        let (files, ca) = make_cert(&dir);
        let (upstream, hits) = https_upstream(&files).await;
        let mut opts = Options::new(backend);
        opts.extra_server = format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"",
            files.cert.display(),
            files.key.display()
        );
        opts.upstream_url = Some(upstream);
        opts.upstream_extra = format!("ca_file = \"{}\"", ca.display());
        let gw = TestGateway::start(opts).await;
        let (_, key) = gw.account(None).await;
        let body = serde_json::json!({"model": "gpt-test", "messages": []}).to_string();
        for (h2, version) in [(false, Version::HTTP_11), (true, Version::HTTP_2)] {
            let client = client_trusting(&ca, h2);
            let req = Request::post(format!(
                "https://localhost:{}/v1/chat/completions",
                gw.addr.port()
            ))
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.clone())))
            .unwrap();
            let resp = client.request(req).await.expect("https request");
            assert_eq!(resp.version(), version);
            assert_eq!(resp.status(), 200);
            assert!(resp
                .headers()
                .contains_key("x-ratelimit-remaining-requests"));
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(v["usage"]["total_tokens"], 7);
        }
        assert_eq!(
            hits.load(Ordering::SeqCst),
            2,
            "both requests went to the https upstream"
        );
        gw.wait_settled().await;
        let req = Request::get(format!("https://localhost:{}/v1/limits", gw.addr.port()))
            .header("authorization", format!("Bearer {key}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = client_trusting(&ca, true)
            .request(req)
            .await
            .expect("limits over h2");
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let limits: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            plangate_tests::harness::tokens_used(&limits, "gpt-test"),
            14
        );
        // Plain HTTP to the TLS port is refused, not served.
        let plain = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let r = plain
            .request(
                Request::get(format!("http://127.0.0.1:{}/healthz", gw.addr.port()))
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await;
        assert!(r.is_err() || r.unwrap().status() != 200);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listener_over_tls_with_a_read_only_metrics_token() {
    let dir = std::env::temp_dir().join(plangate_tests::harness::unique("admintls"));
    std::fs::create_dir_all(&dir).unwrap();
    let (files, ca) = make_cert(&dir);
    let mut opts = Options::new(Backend::Memory);
    opts.extra_admin = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"\nmetrics_token = \"scrape-only-0123456789\"",
        files.cert.display(),
        files.key.display()
    );
    let gw = TestGateway::start(opts).await;
    let port = gw.admin_addr.port();
    let client = client_trusting(&ca, false);
    let call = |method: &str, path: &str, token: &str| {
        Request::builder()
            .method(method)
            .uri(format!("https://localhost:{port}{path}"))
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::from_static(b"{\"id\":\"acme-tls\"}")))
            .unwrap()
    };
    let status = |r: Result<Response<hyper::body::Incoming>, _>| r.expect("https").status();
    let admin = plangate_tests::harness::ADMIN_TOKEN;
    // The admin token works over TLS, for reads and writes.
    assert_eq!(
        status(client.request(call("GET", "/metrics", admin)).await),
        200
    );
    assert_eq!(
        status(client.request(call("POST", "/admin/accounts", admin)).await),
        201
    );
    // The metrics token scrapes and does nothing else.
    let scrape = "scrape-only-0123456789";
    assert_eq!(
        status(client.request(call("GET", "/metrics", scrape)).await),
        200
    );
    assert_eq!(
        status(
            client
                .request(call("POST", "/admin/accounts", scrape))
                .await
        ),
        401
    );
    assert_eq!(
        status(
            client
                .request(call("GET", "/admin/accounts/acme-tls", scrape))
                .await
        ),
        401
    );
    // A control character in an id is a bad request, not a store failure.
    assert_eq!(
        status(
            client
                .request(call("GET", "/admin/accounts/%00", admin))
                .await
        ),
        400
    );
    // Under TLS the console's cookies are `Secure`.
    let login = client
        .request(call("GET", "/ui/login", ""))
        .await
        .expect("https");
    assert_eq!(login.status(), 200);
    let cookie = login.headers()["set-cookie"].to_str().unwrap();
    assert!(
        cookie.contains("HttpOnly") && cookie.ends_with("; Secure"),
        "{cookie}"
    );
    // Plain HTTP to the admin port is not served.
    let plain = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let r = plain
        .request(
            Request::get(format!("http://127.0.0.1:{port}/metrics"))
                .header("authorization", format!("Bearer {admin}"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert!(r.is_err() || r.unwrap().status() != 200);
    let _ = std::fs::remove_dir_all(&dir);
}
