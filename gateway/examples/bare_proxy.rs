//! The floor under plangate's request path, for the load benchmark
//! (tests/load/bench.sh `--floor`): the same listener (`server::serve_listener`)
//! and the same upstream client (`upstream::UpstreamClient`) as the gateway,
//! forwarding every request unchanged — no key, no plan, no limiter, no
//! metering. Whatever this costs per request, plangate cannot go below.
//!
//! Usage: `bare_proxy LISTEN_ADDR UPSTREAM_URL`.

use std::sync::Arc;

use http::header;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use plangate::config::Upstream;
use plangate::server::{self, Body, BoxError, ListenerOptions};
use plangate::upstream::{strip_hop_by_hop, UpstreamClient};

async fn forward(up: Arc<UpstreamClient>, req: Request<Incoming>) -> Response<Body> {
    let (mut parts, body) = req.into_parts();
    let Ok(uri) = up.uri_for(parts.uri.path_and_query()) else {
        return Response::new(empty());
    };
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::HOST);
    parts.uri = uri;
    parts.version = http::Version::HTTP_11;
    let req = Request::from_parts(parts, body.map_err(BoxError::from).boxed_unsync());
    match up.client().request(req).await {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, body.map_err(BoxError::from).boxed_unsync())
        }
        Err(_) => {
            let mut r = Response::new(empty());
            *r.status_mut() = http::StatusCode::BAD_GATEWAY;
            r
        }
    }
}

fn empty() -> Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(url)) = (args.next(), args.next()) else {
        return Err("usage: bare_proxy LISTEN_ADDR UPSTREAM_URL [tpc]".into());
    };
    let tpc = args.next().as_deref() == Some("tpc");
    let upstream = Upstream {
        name: "up".into(),
        url: url.parse()?,
        auth: None,
        auth_header: http::header::AUTHORIZATION,
        ca_file: None,
        drop_response_headers: Vec::new(),
    };
    if !tpc {
        let up = Arc::new(UpstreamClient::new(&upstream)?);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        return rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind(&listen).await?;
            let (_tx, shutdown) = server::shutdown_on_signals();
            server::serve_listener(
                listener,
                None,
                ListenerOptions::default(),
                move |req, _peer| forward(up.clone(), req),
                shutdown,
            )
            .await;
            Ok(())
        });
    }
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let addr: std::net::SocketAddr = listen.parse()?;
    let mut threads = Vec::new();
    for _ in 0..n {
        let upstream = upstream.clone();
        threads.push(std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let up = Arc::new(UpstreamClient::new(&upstream).unwrap());
                let sock = tokio::net::TcpSocket::new_v4().unwrap();
                sock.set_reuseport(true).unwrap();
                sock.set_reuseaddr(true).unwrap();
                sock.bind(addr).unwrap();
                let listener = sock.listen(1024).unwrap();
                let (_tx, shutdown) = tokio::sync::watch::channel(false);
                server::serve_listener(
                    listener,
                    None,
                    ListenerOptions::default(),
                    move |req, _peer| forward(up.clone(), req),
                    shutdown,
                )
                .await;
            })
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}
