//! Listeners, TLS and graceful shutdown: the one place connections are
//! accepted and handed to hyper. The request handling itself lives in
//! `proxy.rs` (main listener) and `admin.rs` (admin listener).

use std::convert::Infallible;
use std::future::Future;
use std::io::BufReader;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsFiles;
use crate::errors::ApiError;

mod edge;

pub use edge::{EdgeGuard, Rejection};

/// Boxed error type of response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The response body every handler returns.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Largest request head (request line + headers) accepted; larger → 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// How log lines are written (`PLANGATE_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line (`timestamp`, `level`, `target`,
    /// `message` and the event's fields at the top level).
    Json,
    /// Human-readable text.
    Text,
}

impl LogFormat {
    /// The format `PLANGATE_LOG_FORMAT` asks for (`json` or `text`);
    /// unset, empty or `auto`: text when stderr is a terminal, JSON
    /// otherwise (a log collector reads it). `Err` names a value that is
    /// none of these.
    pub fn choose(env: Option<&str>, stderr_is_terminal: bool) -> Result<LogFormat, String> {
        match env.map(str::trim).unwrap_or("") {
            "json" => Ok(LogFormat::Json),
            "text" => Ok(LogFormat::Text),
            "" | "auto" => Ok(if stderr_is_terminal {
                LogFormat::Text
            } else {
                LogFormat::Json
            }),
            other => Err(format!(
                "PLANGATE_LOG_FORMAT={other:?} is none of json, text, auto; using auto"
            )),
        }
    }
}

/// Log to stderr, filtered by `RUST_LOG` (default `info`), in the format
/// `PLANGATE_LOG_FORMAT` chooses ([`LogFormat::choose`]).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let env = std::env::var("PLANGATE_LOG_FORMAT").ok();
    let (format, problem) = match LogFormat::choose(env.as_deref(), terminal) {
        Ok(f) => (f, None),
        Err(e) => (
            LogFormat::choose(None, terminal).unwrap_or(LogFormat::Text),
            Some(e),
        ),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder.with_ansi(terminal).try_init(),
    };
    if let Some(problem) = problem {
        tracing::warn!("{problem}");
    }
}

#[cfg(test)]
mod log_format_tests {
    use super::LogFormat::{self, Json, Text};

    #[test]
    fn json_unless_a_terminal_or_asked() {
        let cases: &[(Option<&str>, bool, Result<LogFormat, ()>)] = &[
            (None, false, Ok(Json)),
            (None, true, Ok(Text)),
            (Some("auto"), false, Ok(Json)),
            (Some(""), true, Ok(Text)),
            (Some("json"), true, Ok(Json)),
            (Some("text"), false, Ok(Text)),
            (Some("yaml"), false, Err(())),
        ];
        for (env, terminal, want) in cases {
            let got = LogFormat::choose(*env, *terminal).map_err(|_| ());
            assert_eq!(&got, want, "{env:?} terminal={terminal}");
        }
    }
}

/// Build a rustls acceptor (ring provider) offering h2 and http/1.1.
pub fn tls_acceptor(files: &TlsFiles) -> Result<TlsAcceptor, String> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()));
    let cert_pem = read(&files.cert)?;
    let key_pem = read(&files.key)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut BufReader::new(&cert_pem[..]))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", files.cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate found", files.cert.display()));
    }
    let key = rustls_pemfile::private_key(&mut BufReader::new(&key_pem[..]))
        .map_err(|e| format!("{}: {e}", files.key.display()))?
        .ok_or_else(|| format!("{}: no private key found", files.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("{}: {e}", files.cert.display()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Makes the answer to a head the edge guard refused (the main listener's
/// stamps it with a request id, counts it and logs it like any response).
pub type Refuse = Arc<dyn Fn(&ApiError) -> Response<Body> + Send + Sync>;

/// Connection-level settings of one listener.
#[derive(Clone)]
pub struct ListenerOptions {
    /// Time allowed to receive a request head (slowloris guard).
    pub header_read_timeout: Duration,
    /// How long in-flight requests may run after shutdown begins.
    pub drain_timeout: Duration,
    /// Headers that carry credentials (API keys, the admin token): a
    /// control byte in one is answered 401 rather than 400.
    pub credential_headers: Arc<[HeaderName]>,
    /// The answer to a refused head; `None`: the bare error response.
    pub refuse: Option<Refuse>,
}

impl std::fmt::Debug for ListenerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerOptions")
            .field("header_read_timeout", &self.header_read_timeout)
            .field("drain_timeout", &self.drain_timeout)
            .field("credential_headers", &self.credential_headers)
            .field("refuse", &self.refuse.is_some())
            .finish()
    }
}

impl Default for ListenerOptions {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            credential_headers: Arc::from([http::header::AUTHORIZATION]),
            refuse: None,
        }
    }
}

/// A receiver that flips to `true` when shutdown begins.
pub type ShutdownSignal = watch::Receiver<bool>;

/// Serve HTTP/1.1 and HTTP/2 (and TLS with ALPN when `tls` is set) on
/// `listener` until `shutdown` flips, then stop accepting and let in-flight
/// requests finish (up to `drain_timeout`).
pub async fn serve_listener<H, F>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    opts: ListenerOptions,
    handler: H,
    mut shutdown: ShutdownSignal,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .keep_alive_interval(Some(Duration::from_secs(20)));
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly
                    // instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let refuse = opts.refuse.clone();
        let first_request = Arc::new(AtomicBool::new(false));
        let seen = first_request.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            seen.store(true, Ordering::Relaxed);
            // A head the edge guard refused arrives as its stand-in and is
            // answered before any routing.
            // HTTP/2 heads do not pass the edge guard (HPACK): hyper bounds
            // their size (`max_header_list_size`), the count is checked here,
            // with the same limit and answer as HTTP/1's.
            let rejection = match Rejection::of(req.headers()) {
                None if req.version() == http::Version::HTTP_2
                    && req.headers().len() > edge::MAX_HEADERS =>
                {
                    Some(Rejection::HeadTooLarge)
                }
                other => other,
            };
            match rejection {
                None => Served::Handler {
                    fut: handler(req, peer),
                },
                Some(rejection) => Served::Refused {
                    resp: Some(refusal(rejection, refuse.as_ref())),
                },
            }
        });
        let credentials = opts.credential_headers.clone();
        let header_timeout = opts.header_read_timeout;
        match &tls {
            None => {
                let conn = builder
                    .serve_connection_with_upgrades(
                        TokioIo::new(EdgeGuard::new(stream, credentials)),
                        service,
                    )
                    .into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(drive(conn, header_timeout, first_request, peer));
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                let builder = builder.clone();
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    // The TLS handshake is bounded by the same slowloris
                    // guard as the request head.
                    let tls_stream =
                        match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "TLS handshake timed out");
                                return;
                            }
                        };
                    let conn = builder
                        .serve_connection_with_upgrades(
                            TokioIo::new(EdgeGuard::new(tls_stream, credentials)),
                            service,
                        )
                        .into_owned();
                    drive(watcher.watch(conn), header_timeout, first_request, peer).await;
                });
            }
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(opts.drain_timeout) => {
            tracing::warn!("drain timeout reached; closing remaining connections");
        }
    }
}

/// Serve one connection; close it if no request head arrived within
/// `header_timeout` (hyper's own timeout starts only once it knows the
/// protocol, so a client dribbling the HTTP/2 preface would otherwise hold
/// the connection forever).
async fn drive<C, E>(
    conn: C,
    header_timeout: Duration,
    first_request: Arc<AtomicBool>,
    peer: SocketAddr,
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut conn = std::pin::pin!(conn);
    let served = tokio::select! {
        out = conn.as_mut() => Some(out),
        _ = tokio::time::sleep(header_timeout) => None,
    };
    let out = match served {
        Some(out) => out,
        None if too_slow(&first_request) => return,
        None => conn.await,
    };
    if let Err(e) = out {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

pin_project_lite::pin_project! {
    /// The service future of a connection: the handler's future, polled as
    /// it is, or a refusal. (An async block that took the handler's future
    /// out of an `Option` or a tuple would hold it twice — kilobytes — and
    /// hyper moves the service future by memcpy once per request: +15,000
    /// instructions per request, measured with callgrind.)
    #[project = ServedProj]
    enum Served<F> {
        Handler { #[pin] fut: F },
        Refused { resp: Option<Response<Body>> },
    }
}

impl<F: Future<Output = Response<Body>>> Future for Served<F> {
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            ServedProj::Handler { fut } => fut.poll(cx).map(Ok),
            ServedProj::Refused { resp } => Poll::Ready(Ok(resp
                .take()
                .unwrap_or_else(|| refusal(Rejection::Malformed, None)))),
        }
    }
}

/// The answer to a head the edge guard refused; the connection closes
/// after it.
fn refusal(rejection: Rejection, refuse: Option<&Refuse>) -> Response<Body> {
    let error = rejection.error();
    let mut resp = match refuse {
        Some(refuse) => refuse(&error),
        None => error_response(&error),
    };
    resp.headers_mut()
        .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// An [`ApiError`] as a response with the handlers' body type.
pub fn error_response(e: &ApiError) -> Response<Body> {
    use http_body_util::BodyExt;
    e.to_response::<http_body_util::Full<Bytes>>()
        .map(|b| b.map_err(|never| match never {}).boxed_unsync())
}

fn too_slow(first_request: &AtomicBool) -> bool {
    let slow = !first_request.load(Ordering::Relaxed);
    if slow {
        tracing::debug!("no request head within header_read_timeout; closing the connection");
    }
    slow
}

/// A shutdown signal that flips on SIGTERM or Ctrl-C.
pub fn shutdown_on_signals() -> (watch::Sender<bool>, ShutdownSignal) {
    let (tx, rx) = watch::channel(false);
    let sender = tx.clone();
    tokio::spawn(async move {
        wait_for_termination().await;
        tracing::info!("shutting down: no new connections; draining in-flight requests");
        let _ = sender.send(true);
    });
    (tx, rx)
}

async fn wait_for_termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
