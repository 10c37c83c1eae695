//! Hostile input: slowloris, request smuggling, oversized heads and
//! bodies, absurd API keys and admin tokens. In-process stores: these are
//! about the HTTP edge, not the stores.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use plangate::mock::{MockHandle, MockOptions};
use plangate_tests::rig::{self, raw_exchange, raw_status, Rig, Setup, Tally};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::*;

async fn edge_rig() -> (Rig, MockHandle, String) {
    let mock = plangate::mock::start(MockOptions::default())
        .await
        .expect("mock");
    let setup = Setup::new(&mock.url()); // header_read_timeout 2s, body 64KiB
    let rig = Rig::start(&setup).await;
    let (_, key) = rig.account().await;
    (rig, mock, key)
}

const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// Dribble a request head one byte per second until the server closes the
/// connection; returns how long that took and what it answered.
async fn slowloris(
    addr: SocketAddr,
    head: &'static [u8],
    give_up: Duration,
) -> (Option<Duration>, Vec<u8>) {
    let start = Instant::now();
    let Ok(s) = TcpStream::connect(addr).await else {
        return (Some(Duration::ZERO), Vec::new());
    };
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        for b in head.iter() {
            if wr.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        // Keep the connection open (a closed write half would tell the
        // server the client is gone).
        std::future::pending::<()>().await;
        drop(wr);
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let closed = loop {
        match tokio::time::timeout(give_up.saturating_sub(start.elapsed()), rd.read(&mut buf)).await
        {
            Ok(Ok(0)) | Ok(Err(_)) => break Some(start.elapsed()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => break None,
        }
    };
    writer.abort();
    (closed, got)
}

/// What slow clients send, one byte per second: an HTTP/1.1 head, the
/// HTTP/2 connection preface (which keeps the server guessing the
/// protocol), or nothing at all.
const SLOW_HEADS: [&[u8]; 3] = [
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r",
    b"",
];

/// 60 connections dribbling their heads at 1 byte/s (an HTTP/1.1 head,
/// the HTTP/2 preface, nothing) are closed once header_read_timeout
/// passes, while normal requests keep succeeding.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slowloris_is_cut_off_while_normal_traffic_flows() {
    let _serial = serial().await;
    let (rig, _mock, key) = edge_rig().await;
    let slow: Vec<_> = (0..60)
        .map(|i| {
            tokio::spawn(slowloris(
                rig.addr,
                SLOW_HEADS[i % SLOW_HEADS.len()],
                Duration::from_secs(8),
            ))
        })
        .collect();
    let mut normal = Tally::default();
    let until = Instant::now() + HEADER_READ_TIMEOUT + Duration::from_millis(1500);
    while Instant::now() < until {
        normal.add(&rig.chat(&key, "free-model", &[]).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut closed_after = vec![Vec::new(); SLOW_HEADS.len()];
    let mut answers = std::collections::BTreeMap::<Option<u16>, usize>::new();
    for (i, t) in slow.into_iter().enumerate() {
        let (closed, got) = t.await.expect("slowloris task");
        *answers.entry(raw_status(&got)).or_default() += 1;
        closed_after[i % SLOW_HEADS.len()].push(closed);
    }
    eprintln!("{}", normal.line("slowloris/normal traffic meanwhile"));
    for (kind, closed) in ["HTTP/1.1 head", "HTTP/2 preface", "nothing"]
        .iter()
        .zip(&closed_after)
    {
        let max = closed.iter().flatten().max().copied();
        let min = closed.iter().flatten().min().copied();
        eprintln!(
            "FIGURES slowloris/{kind} at 1 byte/s: closed {}/{} after min={min:?} max={max:?}",
            closed.iter().flatten().count(),
            closed.len()
        );
    }
    eprintln!("FIGURES slowloris/answers: {answers:?}");
    assert_eq!(normal.admitted(), normal.sent(), "{normal:?}");
    assert!(
        normal.max_latency < Duration::from_millis(500),
        "{normal:?}"
    );
    for closed in &closed_after {
        assert!(
            closed.iter().all(Option::is_some),
            "every slow connection closed: {closed:?}"
        );
        let min = closed.iter().flatten().min().unwrap();
        let max = closed.iter().flatten().max().unwrap();
        assert!(
            *min >= HEADER_READ_TIMEOUT - Duration::from_millis(100),
            "{min:?}"
        );
        assert!(
            *max <= HEADER_READ_TIMEOUT + Duration::from_millis(500),
            "{max:?}"
        );
    }
}

fn chat_json(model: &str) -> String {
    rig::chat_body(model, false).to_string()
}

/// Ambiguous or malformed framing is 400 (an OpenAI-shaped error) and
/// nothing is forwarded: Content-Length with Transfer-Encoding (CL.TE and
/// TE.CL, with a second request hidden behind the body), duplicate
/// Content-Length (even equal ones), a Transfer-Encoding that is not
/// chunked, malformed lengths. Also on a keep-alive connection after a
/// valid request, where the valid one is answered and the smuggling
/// attempt refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_smuggling_is_refused() {
    let _serial = serial().await;
    let (rig, mock, key) = edge_rig().await;
    let body = chat_json("free-model");
    let head = |extra: &str| {
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\n{extra}\r\n"
        )
    };
    let chunked = format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
    let hidden = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let len = body.len();
    let refused: Vec<(&str, String)> = vec![
        (
            "CL.TE with a hidden request",
            format!(
                "{}{chunked}{hidden}",
                head(&format!(
                    "content-length: {len}\r\ntransfer-encoding: chunked\r\n"
                ))
            ),
        ),
        (
            "TE.CL with a hidden request",
            format!(
                "{}{chunked}{hidden}",
                head(&format!(
                    "transfer-encoding: chunked\r\ncontent-length: {len}\r\n"
                ))
            ),
        ),
        (
            "duplicate differing Content-Length",
            format!(
                "{}{body}",
                head(&format!(
                    "content-length: {len}\r\ncontent-length: {}\r\n",
                    len + 5
                ))
            ),
        ),
        (
            "duplicate equal Content-Length",
            format!(
                "{}{body}",
                head(&format!(
                    "content-length: {len}\r\ncontent-length: {len}\r\n"
                ))
            ),
        ),
        (
            "Transfer-Encoding not chunked",
            format!(
                "{}{body}",
                head(&format!(
                    "transfer-encoding: gzip\r\ncontent-length: {len}\r\n"
                ))
            ),
        ),
        (
            "Transfer-Encoding on HTTP/1.0",
            format!(
                "{}{chunked}",
                head("transfer-encoding: chunked\r\n").replace("HTTP/1.1", "HTTP/1.0"),
            ),
        ),
        (
            "Transfer-Encoding gzip then chunked, two lines",
            format!(
                "{}{chunked}{hidden}",
                head("transfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n")
            ),
        ),
        (
            "Transfer-Encoding identity, chunked",
            format!(
                "{}{chunked}{hidden}",
                head("transfer-encoding: identity, chunked\r\n")
            ),
        ),
        (
            "Transfer-Encoding gzip, chunked",
            format!(
                "{}{chunked}{hidden}",
                head("Transfer-Encoding: gzip, Chunked\r\n")
            ),
        ),
        (
            "Transfer-Encoding chunked, chunked",
            format!(
                "{}{chunked}{hidden}",
                head("transfer-encoding: chunked, chunked\r\n")
            ),
        ),
        (
            "bare LF line ends throughout",
            format!(
                "{}{body}",
                head(&format!("content-length: {len}\r\n")).replace("\r\n", "\n")
            ),
        ),
        (
            "bare LF ending the request line",
            format!(
                "{}{body}",
                head(&format!("content-length: {len}\r\n")).replacen(
                    "HTTP/1.1\r\n",
                    "HTTP/1.1\n",
                    1
                )
            ),
        ),
        (
            "bare LF ending one header line",
            format!(
                "{}{body}",
                head(&format!("x-lf: 1\ncontent-length: {len}\r\n"))
            ),
        ),
        (
            "Content-Length with a sign",
            format!("{}{body}", head(&format!("content-length: +{len}\r\n"))),
        ),
        (
            "Content-Length list",
            format!(
                "{}{body}",
                head(&format!("content-length: {len}, {len}0\r\n"))
            ),
        ),
    ];
    for (name, req) in &refused {
        let before = mock.requests();
        let resp = raw_exchange(rig.addr, req.as_bytes(), Duration::from_secs(3)).await;
        let forwarded = mock.requests() - before;
        let answers = resp.windows(9).filter(|w| w == b"HTTP/1.1 ").count();
        eprintln!(
            "FIGURES smuggling/{name}: status={:?} responses={answers} forwarded={forwarded}",
            raw_status(&resp)
        );
        assert_eq!(raw_status(&resp), Some(400), "{name}");
        assert_eq!(answers, 1, "{name}: one answer, then the connection closes");
        assert_eq!(forwarded, 0, "{name}: nothing forwarded");
        let text = String::from_utf8_lossy(&resp);
        assert!(
            text.contains(r#""type":"invalid_request_error""#)
                && text.contains("connection: close"),
            "{name}: OpenAI-shaped error, connection closed: {text}"
        );
    }

    // Keep-alive: a valid chunked request, then a valid Content-Length
    // one, then CL.TE hiding a third, all written at once.
    let before = mock.requests();
    let pipelined = format!(
        "{}{chunked}{hidden}{}{chunked}{hidden}",
        head("transfer-encoding: chunked\r\n"),
        head(&format!(
            "content-length: {len}\r\ntransfer-encoding: chunked\r\n"
        )),
    );
    let resp = raw_exchange(rig.addr, pipelined.as_bytes(), Duration::from_secs(3)).await;
    let text = String::from_utf8_lossy(&resp);
    let statuses: Vec<&str> = text
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &text[i + 9..i + 12])
        .collect();
    let forwarded = mock.requests() - before;
    eprintln!("FIGURES smuggling/pipelined valid, valid, CL.TE: statuses={statuses:?} forwarded={forwarded}");
    assert_eq!(statuses, ["200", "200", "400"]);
    assert_eq!(
        forwarded, 2,
        "only the two valid requests reach the upstream"
    );

    // Keep-alive: a valid chunked request, then stacked codings hiding a
    // request, then a valid one that must never be read; and a valid
    // request followed by a bare-LF head.
    for (name, second) in [
        (
            "valid chunked, gzip+chunked",
            format!(
                "{}{chunked}{hidden}{hidden}",
                head("transfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n")
            ),
        ),
        (
            "valid chunked, bare LF",
            format!(
                "{}{body}{hidden}",
                head(&format!("content-length: {len}\r\n")).replace("\r\n", "\n")
            ),
        ),
    ] {
        let before = mock.requests();
        let pipelined = format!(
            "{}{chunked}{second}",
            head("transfer-encoding: chunked\r\n")
        );
        let resp = raw_exchange(rig.addr, pipelined.as_bytes(), Duration::from_secs(3)).await;
        let text = String::from_utf8_lossy(&resp);
        let statuses: Vec<&str> = text
            .match_indices("HTTP/1.1 ")
            .map(|(i, _)| &text[i + 9..i + 12])
            .collect();
        let forwarded = mock.requests() - before;
        eprintln!(
            "FIGURES smuggling/pipelined {name}: statuses={statuses:?} forwarded={forwarded}"
        );
        assert_eq!(statuses, ["200", "400"], "{name}");
        assert_eq!(forwarded, 1, "{name}: only the valid request is forwarded");
    }

    // The gateway still serves.
    assert_eq!(rig.chat(&key, "free-model", &[]).await.status, 200);
}

/// Heads over 64 KiB → 431; a declared body over max_request_body → 413
/// at once; an undeclared (chunked) one → 413 long before the client has
/// sent it all, on routes that read the body and routes that stream it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_heads_and_bodies_are_refused_early() {
    let _serial = serial().await;
    let (rig, mock, key) = edge_rig().await;
    let body = chat_json("free-model");

    let big_header = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {key}\r\nx-pad: {}\r\ncontent-length: {}\r\n\r\n{body}",
        "p".repeat(100 * 1024),
        body.len()
    );
    let many_headers = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {key}\r\n{}content-length: {}\r\n\r\n{body}",
        (0..500).map(|i| format!("x-h{i}: v\r\n")).collect::<String>(),
        body.len()
    );
    for (name, req) in [
        ("100 KiB header", big_header),
        ("500 headers", many_headers),
    ] {
        let resp = raw_exchange(rig.addr, req.as_bytes(), Duration::from_secs(3)).await;
        eprintln!("FIGURES oversized/{name}: status={:?}", raw_status(&resp));
        assert_eq!(raw_status(&resp), Some(431), "{name}");
        assert!(
            String::from_utf8_lossy(&resp).contains(r#""code":"headers_too_large""#),
            "{name}: OpenAI-shaped 431"
        );
    }

    // Declared 50 MiB: answered after the head, nothing read.
    let mut s = TcpStream::connect(rig.addr).await.unwrap();
    let started = Instant::now();
    s.write_all(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {key}\r\ncontent-length: {}\r\n\r\n{{\"model\":",
            50 * 1024 * 1024
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let resp = rig::read_until_close(&mut s, Duration::from_secs(3)).await;
    eprintln!(
        "FIGURES oversized/declared 50 MiB body: status={:?} after {:?} with 10 bytes of body sent",
        raw_status(&resp),
        started.elapsed()
    );
    assert_eq!(raw_status(&resp), Some(413));

    // Undeclared (chunked) 10 MiB, on a {model} route (body read for
    // routing) and a literal route (body streamed to the upstream).
    for path in ["/v1/chat/completions", "/v1/audio/speech"] {
        let before = mock.requests();
        let s = TcpStream::connect(rig.addr).await.unwrap();
        let (mut rd, mut wr) = s.into_split();
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        let total = 10 * 1024 * 1024;
        let writer = tokio::spawn(async move {
            let chunk = format!("{:x}\r\n{}\r\n", 16 * 1024, "a".repeat(16 * 1024));
            let mut sent = 0usize;
            if wr.write_all(head.as_bytes()).await.is_err() {
                return (sent, false);
            }
            while sent < total {
                if wr.write_all(chunk.as_bytes()).await.is_err() {
                    return (sent, false);
                }
                sent += 16 * 1024;
            }
            let done = wr.write_all(b"0\r\n\r\n").await.is_ok();
            (sent, done)
        });
        let mut resp = Vec::new();
        let mut buf = [0u8; 4096];
        let started = Instant::now();
        while resp.len() < 12 && started.elapsed() < Duration::from_secs(5) {
            match tokio::time::timeout(Duration::from_secs(5), rd.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => resp.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        let answered_after = started.elapsed();
        drop(rd);
        let (sent, done) = tokio::time::timeout(Duration::from_secs(10), writer)
            .await
            .expect("writer stops once the gateway closes")
            .expect("writer task");
        let forwarded = mock.requests() - before;
        eprintln!(
            "FIGURES oversized/chunked 10 MiB body on {path}: status={:?} after {answered_after:?}; client got {} KiB out before the gateway closed; upstream requests={forwarded}",
            raw_status(&resp),
            sent / 1024
        );
        assert_eq!(raw_status(&resp), Some(413), "{path}");
        assert!(
            !done && sent < total,
            "{path}: refused before the body was all sent"
        );
    }
    assert_eq!(rig.chat(&key, "free-model", &[]).await.status, 200);
}

/// Absurd or odd API keys — control bytes included — are 401, never
/// forwarded, never echoed whole, never a crash; the
/// admin API refuses every token but the right one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn absurd_keys_and_admin_tokens_are_refused() {
    let _serial = serial().await;
    let (rig, mock, key) = edge_rig().await;
    let body = chat_json("free-model");
    let long = "k".repeat(60 * 1024);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("60 KiB key", long.clone().into_bytes()),
        ("513-byte key", "a".repeat(513).into_bytes()),
        ("control byte 0x01", b"sk-ab\x01cd".to_vec()),
        ("NUL byte", b"sk-ab\x00cd".to_vec()),
        ("DEL byte", b"sk-ab\x7fcd".to_vec()),
        ("bytes 0xff 0xfe (not UTF-8)", b"sk-\xff\xfe".to_vec()),
        ("UTF-8 letters", "sk-ключ".as_bytes().to_vec()),
        ("space inside", b"sk-ab cd".to_vec()),
        ("tab inside", b"sk-ab\tcd".to_vec()),
        ("valid key plus suffix", format!("{key}x").into_bytes()),
        (
            "valid key truncated",
            key.as_bytes()[..key.len() - 1].to_vec(),
        ),
        ("empty", Vec::new()),
    ];
    let mut summary = Vec::new();
    for (name, k) in &cases {
        let mut req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\nauthorization: Bearer ",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(k);
        req.extend_from_slice(b"\r\n\r\n");
        req.extend_from_slice(body.as_bytes());
        let resp = raw_exchange(rig.addr, &req, Duration::from_secs(3)).await;
        let status = raw_status(&resp);
        summary.push(format!("{name}={status:?}"));
        assert_eq!(status, Some(401), "{name}");
        assert!(
            String::from_utf8_lossy(&resp).contains(r#""type":"authentication_error""#),
            "{name}: OpenAI-shaped 401"
        );
        assert!(
            resp.len() < 4096,
            "{name}: response echoes the key ({} bytes)",
            resp.len()
        );
        let text = String::from_utf8_lossy(&resp);
        if k.len() >= 16 {
            assert!(
                !text.contains(&*String::from_utf8_lossy(k)),
                "{name}: key echoed"
            );
        }
    }
    eprintln!(
        "FIGURES hostile keys: {}; forwarded={}",
        summary.join(" "),
        mock.requests()
    );
    assert_eq!(mock.requests(), 0, "nothing forwarded");
    let token = rig::REL_ADMIN_TOKEN;
    let client = &rig.client;
    let mut admin = Vec::new();
    for (name, presented) in [
        ("no token", None),
        ("wrong token", Some("nope".to_owned())),
        (
            "prefix of the token",
            Some(token[..token.len() - 1].to_owned()),
        ),
        ("token plus a byte", Some(format!("{token}x"))),
        ("upper-cased token", Some(token.to_uppercase())),
        ("10 KiB token", Some("t".repeat(10 * 1024))),
        ("an API key", Some(key.clone())),
    ] {
        let r = rig::get(client, rig.admin_addr, "/admin/plans", presented.as_deref()).await;
        admin.push(format!("{name}={}", r.status.as_u16()));
        assert_eq!(r.status, 401, "{name}");
    }
    let basic = rig::send(
        client,
        http::Request::builder()
            .uri(format!("http://{}/metrics", rig.admin_addr))
            .header("authorization", format!("Basic {token}"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(basic.status, 401, "Basic scheme");
    let control = raw_exchange(
        rig.admin_addr,
        format!(
            "GET /admin/plans HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {token}\x01\r\n\r\n"
        )
        .as_bytes(),
        Duration::from_secs(3),
    )
    .await;
    admin.push(format!(
        "token with a control byte={:?}",
        raw_status(&control)
    ));
    assert_eq!(raw_status(&control), Some(401), "token with a control byte");
    let ok = rig::get(client, rig.admin_addr, "/admin/plans", Some(token)).await;
    assert_eq!(ok.status, 200);
    eprintln!(
        "FIGURES admin tokens: {} Basic={} right=200",
        admin.join(" "),
        basic.status.as_u16()
    );
    assert_eq!(rig.chat(&key, "free-model", &[]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invented_model_names_do_not_grow_metrics_or_memory() {
    let (rig, _mock, key) = edge_rig().await;
    let metrics = |rig: &Rig| {
        let (client, addr) = (rig.client.clone(), rig.admin_addr);
        async move { rig::get(&client, addr, "/metrics", Some(rig::REL_ADMIN_TOKEN)).await }
    };
    let rss_before = rig::self_rss_kib();
    // 1,000 names of 32 KiB each: 32 MiB of labels if they were kept.
    for i in 0..1_000 {
        let model = format!("{i:04}{}", "m".repeat(32 << 10));
        let r = rig.chat(&key, &model, &[]).await;
        assert_eq!(r.status, 403, "{i}");
    }
    let page = metrics(&rig).await;
    let rss_after = rig::self_rss_kib();
    eprintln!(
        "FIGURES 1000 invented 32 KiB model names: /metrics {} bytes, RSS {} -> {} KiB",
        page.body.len(),
        rss_before,
        rss_after
    );
    assert_eq!(page.status, 200);
    let text = String::from_utf8_lossy(&page.body);
    assert!(text.contains(
        "plangate_requests_total{endpoint=\"_unknown\",decision=\"no_access\",status=\"403\"} 1000"
    ));
    assert!(
        page.body.len() < 16 << 10,
        "/metrics is {} bytes",
        page.body.len()
    );
    // RSS is reported, not asserted: this test process also holds what the
    // tests before it left to the allocator (100 MB after the anchor-heavy
    // plans test, in a full run). What kept memory before — one label per
    // invented name — is bounded by the assertions above.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http2_heads_have_the_http1_header_limits() {
    use bytes::Bytes;
    use http_body_util::Full;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let (rig, mock, key) = edge_rig().await;
    // HTTP/2 with prior knowledge (h2c), as gRPC-style clients speak it.
    let mut b = Client::builder(TokioExecutor::new());
    b.http2_only(true);
    let h2: rig::HttpClient = b.build_http();
    let send = |headers: usize| {
        let mut req = http::Request::builder()
            .method("POST")
            .uri(format!("http://{}/v1/chat/completions", rig.addr))
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json");
        for i in 0..headers {
            req = req.header(format!("f{i}"), "v");
        }
        let req = req
            .body(Full::new(Bytes::from(chat_json("free-model"))))
            .unwrap();
        let h2 = h2.clone();
        async move { rig::send(&h2, req).await }
    };
    let ok = send(50).await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    let before = mock.requests();
    let many = send(150).await;
    eprintln!("FIGURES HTTP/2 request with 150 headers: {}", many.status);
    assert_eq!(many.status, 431, "{:?}", many.body);
    assert_eq!(many.code(), "headers_too_large");
    assert_eq!(mock.requests(), before, "nothing forwarded");
}

/// Open a request whose head promises `len` body bytes, send `sent` of
/// them, and keep the connection open (the caller holds the stream).
async fn unfinished_body(addr: SocketAddr, key: &str, len: usize, sent: usize) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n\
         content-type: application/json\r\ncontent-length: {len}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut body = br#"{"model":"free-model","messages":[],"pad":""#.to_vec();
    body.resize(sent, b'x');
    s.write_all(&body).await.unwrap();
    s
}

async fn status_of(s: &mut TcpStream, wait: Duration) -> Option<u16> {
    let mut buf = vec![0u8; 4096];
    match tokio::time::timeout(wait, s.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => raw_status(&buf[..n]),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trickled_bodies_meet_a_deadline_and_a_memory_budget() {
    let mock = plangate::mock::start(MockOptions::default())
        .await
        .expect("mock");
    let mut setup = Setup::new(&mock.url());
    setup.max_request_body = "64KiB".into();
    setup.extra_server = "body_read_timeout = \"1s\"\n\
                          unadmitted_body_per_account = \"100KiB\"\n\
                          unadmitted_body_budget = \"1MiB\""
        .into();
    let rig = Rig::start(&setup).await;
    let (_, key) = rig.account().await;
    let (_, other_key) = rig.account().await;

    // Two bodies of 40 KiB held unfinished fit one account's 100 KiB; the
    // third does not and is refused at once, without waiting for it.
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(unfinished_body(rig.addr, &key, 60_000, 40_000).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let mut third = unfinished_body(rig.addr, &key, 60_000, 40_000).await;
    let third_status = status_of(&mut third, Duration::from_millis(900)).await;
    let third_took = started.elapsed();
    // Another account is not affected, and normal traffic flows.
    let r = rig.chat(&other_key, "free-model", &[]).await;
    assert_eq!(r.status, 200);
    // The held ones are cut at the deadline with 408.
    let mut deadline_statuses = Vec::new();
    for s in &mut held {
        deadline_statuses.push(status_of(s, Duration::from_secs(3)).await);
    }
    let held_for = started.elapsed();
    eprintln!(
        "FIGURES trickled bodies: third of one account -> {third_status:?} in {third_took:?}; \
         held ones -> {deadline_statuses:?} after {held_for:?}"
    );
    assert_eq!(third_status, Some(429));
    assert!(third_took < Duration::from_millis(900));
    assert_eq!(deadline_statuses, vec![Some(408), Some(408)]);
    assert!(held_for < Duration::from_secs(3));
    // Everything given back: the account can send again.
    let r = rig.chat(&key, "free-model", &[]).await;
    assert_eq!(r.status, 200);
}

/// Send a whole oversize request the way simple clients do (write it all,
/// then read); the status read back, or None when the connection broke.
async fn oversize_exchange(
    addr: SocketAddr,
    key: &str,
    body_len: usize,
    chunked: bool,
) -> Option<u16> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    let framing = if chunked {
        "transfer-encoding: chunked".to_owned()
    } else {
        format!("content-length: {body_len}")
    };
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n\
         content-type: application/json\r\n{framing}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.ok()?;
    let mut body = br#"{"model":"free-model","messages":[],"pad":""#.to_vec();
    body.resize(body_len, b'x');
    for piece in body.chunks(16 << 10) {
        if chunked {
            s.write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                .await
                .ok()?;
            s.write_all(piece).await.ok()?;
            s.write_all(b"\r\n").await.ok()?;
        } else {
            s.write_all(piece).await.ok()?;
        }
    }
    if chunked {
        s.write_all(b"0\r\n\r\n").await.ok()?;
    }
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .ok()?
        .ok()?;
    raw_status(&buf[..n])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversize_bodies_are_answered_413_not_reset() {
    let (rig, _mock, key) = edge_rig().await; // max_request_body 64 KiB
    for chunked in [false, true] {
        let clients: Vec<_> = (0..20)
            .map(|_| {
                let key = key.clone();
                let addr = rig.addr;
                tokio::spawn(async move { oversize_exchange(addr, &key, 256 << 10, chunked).await })
            })
            .collect();
        let mut statuses = Vec::new();
        for c in clients {
            statuses.push(c.await.unwrap());
        }
        let answered = statuses.iter().filter(|s| **s == Some(413)).count();
        eprintln!(
            "FIGURES 20 clients x 256 KiB to a 64 KiB limit ({}): {answered} read the 413, {} saw a broken connection",
            if chunked { "chunked" } else { "content-length" },
            20 - answered
        );
        assert_eq!(answered, 20, "{statuses:?}");
    }
}

/// A plans document of `anchors` anchored scalars, each aliased once, in
/// a flow list under a key the schema does not know (so the whole document
/// is parsed and checked, and refused with one error), padded with a
/// comment to `size` bytes.
fn anchor_heavy_plans(anchors: usize, size: usize) -> String {
    fn name(mut i: usize) -> String {
        const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
        let mut out = vec![b'a'];
        loop {
            out.push(DIGITS[i % 36]);
            i /= 36;
            if i == 0 {
                break;
            }
        }
        String::from_utf8(out).unwrap()
    }
    let mut doc = String::from(
        "default_plan: p\nplans:\n  p:\n    name: anchors\n    endpoints: {}\njunk: [",
    );
    for i in 0..anchors {
        let n = name(i);
        doc.push_str(&format!("&{n} v,*{n},"));
    }
    doc.push_str("end]\n#");
    assert!(doc.len() < size, "{} bytes", doc.len());
    doc.push_str(&"x".repeat(size - doc.len() - 1));
    doc.push('\n');
    doc
}

/// Two concurrent `PUT /admin/plans` of a 4 MiB document with 225k anchors
/// (and as many aliases) do not stall the main listener: plans are parsed
/// off the async workers, in time linear in the document. Two workers, as
/// on the 2-core machine of the issue, where they stalled `/healthz` for
/// 15.9 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anchor_heavy_plans_do_not_stall_the_main_listener() {
    use bytes::Bytes;
    use http_body_util::Full;

    let _serial = serial().await;
    let mock = plangate::mock::start(MockOptions::default())
        .await
        .expect("mock");
    // The database owns the plans, so the admin API parses them (under the
    // default `source = "file"` it refuses them unread).
    let mut setup = Setup::new(&mock.url());
    setup.plans_source = "database".into();
    let rig = Rig::start(&setup).await;
    let doc = Bytes::from(anchor_heavy_plans(225_000, 4 << 20));
    assert_eq!(doc.len(), 4 << 20);
    // The poller has a thread and a runtime of its own, so that it measures
    // the gateway's workers, not its own.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let (addr, done) = (rig.addr, done.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("poller runtime");
            rt.block_on(async move {
                let client = rig::http_client();
                let mut max = Duration::ZERO;
                let mut polls = 0u32;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let r = rig::get(&client, addr, "/healthz", None).await;
                    assert_eq!(r.status, 200, "/healthz");
                    max = max.max(r.elapsed);
                    polls += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                (max, polls)
            })
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let start = Instant::now();
    let puts: Vec<_> = (0..2)
        .map(|_| {
            let (client, addr, doc) = (rig.client.clone(), rig.admin_addr, doc.clone());
            tokio::spawn(async move {
                let req = http::Request::builder()
                    .method("PUT")
                    .uri(format!("http://{addr}/admin/plans"))
                    .header("authorization", format!("Bearer {}", rig::REL_ADMIN_TOKEN))
                    .header("content-type", "application/yaml")
                    .body(Full::new(doc))
                    .unwrap();
                let r = rig::send(&client, req).await;
                (r, start.elapsed())
            })
        })
        .collect();
    let mut took = Vec::new();
    let mut answers = Vec::new();
    for put in puts {
        let (r, elapsed) = put.await.expect("PUT task");
        answers.push(r);
        took.push(elapsed);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (max_stall, polls) = poller.join().expect("poller");
    eprintln!(
        "FIGURES anchor-heavy plans: 2 concurrent PUT /admin/plans of {} bytes (225k anchors + 225k aliases) answered after {took:?}; /healthz on the main listener polled {polls} times, max latency {max_stall:?}",
        doc.len()
    );
    assert!(
        max_stall < Duration::from_millis(100),
        "/healthz stalled {max_stall:?}"
    );
    for r in &answers {
        let body = String::from_utf8_lossy(&r.body);
        assert_eq!(r.status, 400, "{body}");
        assert!(body.contains("unknown key `junk`"), "{body}");
    }
    assert!(
        rig.core.cache.plans().plans.contains_key("rel"),
        "plans in force kept"
    );
}

/// A route whose endpoint does not depend on the body (a literal endpoint,
/// no reservation or usage read from the body) is admitted before its
/// body is read (issue 13 item 2): an account over its limit is refused at
/// once, without the gateway waiting for (or holding) a body the client
/// has not sent; an admitted one is forwarded while the body streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn literal_routes_are_admitted_before_their_body_is_read() {
    let mock = plangate::mock::start(MockOptions::default())
        .await
        .expect("mock");
    let mut setup = Setup::new(&mock.url());
    setup.plans = setup.plans.replace(
        "\"tts\":\n        fixed_windows:\n          - window: 60s\n            limit: 1_000_000",
        "\"tts\":\n        fixed_windows:\n          - window: 60s\n            limit: 1",
    );
    assert!(setup.plans.contains("limit: 1\n"), "tts limited to 1");
    setup.extra_server = "body_read_timeout = \"5s\"".into();
    let rig = Rig::start(&setup).await;
    let (_, key) = rig.account().await;

    let open = |key: String| async move {
        let mut s = TcpStream::connect(rig.addr).await.expect("connect");
        let head = format!(
            "POST /v1/audio/speech HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {key}\r\n\
             content-type: application/json\r\ncontent-length: 1000\r\n\r\n{{\"input\":"
        );
        s.write_all(head.as_bytes()).await.expect("head");
        s
    };
    // The first: admitted with its body unfinished, and forwarded (the
    // mock sees the request) before the body is complete.
    let before = mock.requests();
    let mut first = open(key.clone()).await;
    let forwarded = crate::until(Duration::from_secs(2), || async {
        mock.requests() > before
    })
    .await;
    // The second: the window is full; refused without its body.
    let started = Instant::now();
    let mut second = open(key.clone()).await;
    let status = status_of(&mut second, Duration::from_secs(2)).await;
    let took = started.elapsed();
    eprintln!(
        "FIGURES literal route, body unfinished: forwarded after {forwarded:?}; over the limit -> {status:?} in {took:?}"
    );
    assert!(
        forwarded.is_some(),
        "admitted and forwarded before its body was read"
    );
    assert_eq!(status, Some(429));
    assert!(took < Duration::from_secs(2), "{took:?}");
    first.shutdown().await.ok();
}
