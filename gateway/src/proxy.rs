//! The request path of the main listener (SPEC §6):
//! route → API key → account → plan → attempt → credits → forward → stream
//! back → measure units → end + charge. Also the key-authenticated reads
//! `/v1/limits` and `/v1/usage`, and `/healthz`, `/readyz`.
//!
//! Invariant: every admitted request ends exactly once. The limiter's
//! [`Permit`] travels with the response body ([`MeteredBody`]); whichever
//! comes first — the body's end, an error, or the body being dropped
//! because the client went away — settles it.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::FutureExt;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

use crate::access::{self, AccessLine};
use crate::background::{Background, Job};
use crate::catalog::cache::CatalogCache;
use crate::catalog::{key_digest, Catalog, GroupBy, KeyOwner, UnitUsage, UsageEvent};
use crate::config::{Config, EndpointSource, OnStoreError, Route};
use crate::decode::{ContentDecoder, Unsupported};
use crate::errors::ApiError;
use crate::headers;
use crate::limiter::{
    AnyStore, Attempt, CounterStore, Denial, Ending, Limiter, Permit, RateLimitInfo, StoreError,
};
use crate::metrics::Metrics;
use crate::plans::{CreditCost, Plan, Policy, Unit};
use crate::routes::{self, Router};
use crate::server::{error_response, Body, BoxError};
use crate::upstream::{strip_hop_by_hop, UpstreamClient};
use crate::usage::{self, ResponseMeter};

/// `x-request-id`.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest API key considered at all; anything longer is invalid without a
/// lookup (hashing megabytes of header per request would be a DoS lever).
const MAX_KEY_LEN: usize = 512;

/// What a reload swaps atomically: routes, upstream clients and the
/// per-request settings of the `[server]`, `[auth]` and `[log]` sections.
#[derive(Debug)]
pub struct RouteTable {
    pub router: Router,
    pub routes: Vec<Route>,
    pub upstreams: Vec<UpstreamClient>,
    /// `[auth] header`: where a route without its own `auth_header` reads
    /// the client's key.
    pub auth_header: HeaderName,
    /// Every header a key is read from (`[auth] header` first, then the
    /// routes' own): the gateway's own endpoints (`/v1/limits`,
    /// `/v1/usage`, `/v1/models`) take the key from the first present, and
    /// none of them is ever forwarded upstream.
    pub key_headers: Vec<HeaderName>,
    /// `[log] access`: one access-log line per request.
    pub access_log: bool,
    pub max_request_body: u64,
    pub request_timeout: Duration,
    pub body_read_timeout: Duration,
    pub unadmitted_body_budget: u64,
    pub unadmitted_body_per_account: u64,
}

impl RouteTable {
    /// Build from a checked config (creates the upstream clients).
    pub fn from_config(config: &Config) -> Result<Self, String> {
        let upstreams = config
            .upstreams
            .iter()
            .map(UpstreamClient::new)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            router: Router::new(&config.routes),
            routes: config.routes.clone(),
            upstreams,
            auth_header: config.auth.header.clone(),
            key_headers: config.key_headers(),
            access_log: config.log.access,
            max_request_body: config.server.max_request_body,
            request_timeout: config.server.request_timeout,
            body_read_timeout: config.server.body_read_timeout,
            unadmitted_body_budget: config.server.unadmitted_body_budget,
            unadmitted_body_per_account: config.server.unadmitted_body_per_account,
        })
    }
}

/// Bytes of request bodies held by requests not yet admitted (read for
/// `{model}` routing, reservations or `include_usage`), in all and per
/// account, so that clients trickling bodies cannot hold the gateway's
/// memory: one account's share is bounded (429), and so is the whole
/// (503), before more is read.
#[derive(Debug, Default)]
pub struct BodyBudget {
    total: AtomicU64,
    per_account: parking_lot::Mutex<HashMap<String, u64>>,
}

/// Bytes held against a [`BodyBudget`]; given back when dropped.
struct BodyHold<'a> {
    budget: &'a BodyBudget,
    account: &'a str,
    bytes: u64,
}

impl<'a> BodyHold<'a> {
    /// Costs nothing until bytes are held.
    fn new(budget: &'a BodyBudget, account: &'a str) -> Self {
        Self {
            budget,
            account,
            bytes: 0,
        }
    }

    /// Hold `n` more bytes, if both limits allow it.
    fn grow(&mut self, n: u64, table: &RouteTable) -> Result<(), ApiError> {
        let b = self.budget;
        let total = b.total.fetch_add(n, Ordering::AcqRel) + n;
        if total > table.unadmitted_body_budget {
            b.total.fetch_sub(n, Ordering::AcqRel);
            return Err(ApiError::BodiesPending {
                whole_gateway: true,
            });
        }
        let mut map = b.per_account.lock();
        let held = map.get(self.account).copied().unwrap_or(0);
        if held + n > table.unadmitted_body_per_account {
            drop(map);
            b.total.fetch_sub(n, Ordering::AcqRel);
            return Err(ApiError::BodiesPending {
                whole_gateway: false,
            });
        }
        match map.get_mut(self.account) {
            Some(h) => *h += n,
            None => {
                map.insert(self.account.to_owned(), n);
            }
        }
        self.bytes += n;
        Ok(())
    }
}

impl Drop for BodyHold<'_> {
    fn drop(&mut self) {
        if self.bytes == 0 {
            return;
        }
        let b = self.budget;
        b.total.fetch_sub(self.bytes, Ordering::AcqRel);
        let mut map = b.per_account.lock();
        if let Some(held) = map.get_mut(self.account) {
            *held = held.saturating_sub(self.bytes);
            if *held == 0 {
                map.remove(self.account);
            }
        }
    }
}

/// Unique ids for admitted requests: a random per-process prefix and a
/// counter, so ids never collide across instances or restarts.
#[derive(Debug)]
pub struct RequestIds {
    prefix: String,
    next: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        Self {
            prefix: format!("{:08x}", rand::random::<u32>()),
            next: AtomicU64::new(1),
        }
    }
}

impl RequestIds {
    pub fn next_id(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("req_{}{:x}", self.prefix, n)
    }
}

/// A route as usage records name it: its path, `*` for a prefix route.
fn route_label(path: &crate::config::RoutePath) -> String {
    match path {
        crate::config::RoutePath::Exact(p) => p.clone(),
        crate::config::RoutePath::Prefix(p) => format!("{p}*"),
    }
}

/// The metrics label of requests refused before their endpoint was known
/// (no route, no key, unreadable body, ...).
const NO_ENDPOINT: &str = "_none";

/// The metrics label of endpoints the caller's plan does not have (the
/// name is the client's choice, never a label).
const UNKNOWN_ENDPOINT: &str = "_unknown";

/// How a request ended, recorded once per response in
/// `plangate_requests_total` and in the access log.
#[derive(Default)]
struct Outcome {
    /// The endpoint, once the plan knows it.
    endpoint: Option<String>,
    /// The stage's decision; the first one recorded wins.
    decision: Option<&'static str>,
    /// The `error.code` of an error response.
    error: Option<&'static str>,
    /// The request's access-log line, when the access log is on; an
    /// admitted request's settlement holds it too, and adds the units and
    /// credits it settled with.
    access: Option<Arc<AccessLine>>,
    /// Admitted without the counter store (`on_store_error = "open"`).
    degraded: bool,
}

impl Outcome {
    fn decide(&mut self, decision: &'static str) {
        self.decision.get_or_insert(decision);
    }

    /// An error response with this code.
    fn fail(&mut self, code: &'static str) {
        self.decide(code);
        self.error.get_or_insert(code);
    }

    /// Fill in access-log fields (nothing when the log is off).
    fn note(&self, f: impl FnOnce(&mut access::Fields)) {
        if let Some(a) = &self.access {
            a.note(f);
        }
    }

    /// Who is calling: the key's id and account, never the key.
    fn caller(&self, owner: &KeyOwner) {
        self.note(|f| {
            f.account = Some(owner.account_id.clone());
            f.key_id = Some(owner.key_id.clone());
        });
    }
}

/// Everything a request needs besides the route table.
pub struct Core {
    pub catalog: Arc<dyn Catalog>,
    pub cache: Arc<CatalogCache>,
    pub limiter: Arc<Limiter<AnyStore>>,
    pub on_store_error: OnStoreError,
    /// `[usage] record`: one usage event per admitted request.
    pub record_usage: bool,
    pub metrics: Arc<Metrics>,
    pub ids: RequestIds,
    /// Loads credit wallets and writes what they decide to the catalog.
    pub outbox: Arc<crate::credits::Outbox<AnyStore>>,
    /// Bytes of request bodies read before admission.
    pub bodies: Arc<BodyBudget>,
    /// Threshold notifications (`[notify]`); `None` without that section.
    pub notifier: Option<Arc<crate::notify::Notifier>>,
}

/// The main listener's handler.
pub struct Gateway {
    pub table: ArcSwap<RouteTable>,
    pub core: Arc<Core>,
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn error_with_info(e: &ApiError, info: &RateLimitInfo) -> Response<Body> {
    e.to_response_with_info::<Full<Bytes>>(info)
        .map(|b| b.map_err(|never| match never {}).boxed_unsync())
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(full(serde_json::to_vec(value).unwrap_or_default()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// The API key a request carries in the first of `names` it has, if any.
/// In the `authorization` header the value must be `Bearer KEY`; any other
/// header carries the raw key.
pub fn extract_key<'a>(headers: &'a HeaderMap, names: &[HeaderName]) -> Option<&'a str> {
    let name = names.iter().find(|n| headers.contains_key(*n))?;
    let value = headers.get(name)?;
    let text = std::str::from_utf8(value.as_bytes()).ok()?.trim();
    let key = if name == header::AUTHORIZATION {
        let (scheme, rest) = text.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        rest.trim()
    } else {
        text
    };
    (!key.is_empty()).then_some(key)
}

/// Whether an upstream client error was caused by the request body going
/// over its [`Limited`] bound.
fn body_too_large(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cause = c.source();
    }
    false
}

/// Longest client `x-request-id` kept as a correlation id.
const MAX_CLIENT_REQUEST_ID: usize = 128;

/// The client's `x-request-id`, if it is a plausible correlation id: 1 to
/// 128 visible ASCII characters. Anything else is replaced by the
/// gateway's own id (it is never stored: ledger rows carry the gateway's).
fn client_request_id(headers: &HeaderMap) -> Option<HeaderValue> {
    let v = headers.get(&REQUEST_ID)?;
    let b = v.as_bytes();
    (!b.is_empty() && b.len() <= MAX_CLIENT_REQUEST_ID && b.iter().all(u8::is_ascii_graphic))
        .then(|| v.clone())
}

/// Whether a presented key is worth a lookup at all.
fn plausible_key(key: &str) -> bool {
    key.len() <= MAX_KEY_LEN && key.bytes().all(|b| b.is_ascii_graphic())
}

/// Parsed request-side facts needed before admission.
struct Admission {
    endpoint: String,
    start_units: Vec<(Unit, u64)>,
    /// Body to forward (buffered when it had to be read).
    body: Body,
    /// The gateway turned on `stream_options.include_usage`; drop the extra
    /// usage chunk before the client sees it.
    injected_usage: bool,
    /// Size of the request body (read, or as declared), for the prompt
    /// estimate of a stream cut short.
    body_bytes: u64,
    /// The body as read (routes that read it), for a rewrite by `cap`.
    bytes: Option<Bytes>,
    /// The route caps a unit and the request did not ask for any of it.
    cap_absent: bool,
    /// The body forwarded is not the one received (content-length goes).
    rewritten: bool,
}

impl Gateway {
    /// Handle one request of the main listener.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let path = req.uri().path();
        match path {
            "/healthz" => {
                return json_response(StatusCode::OK, &serde_json::json!({"status": "ok"}))
            }
            "/readyz" => return self.readyz().await,
            _ => {}
        }
        // Every API response carries `x-request-id`: the client's, when it
        // is a plausible correlation id, else the gateway's own. Ledger
        // rows are keyed by the gateway's id only.
        let request_id = self.core.ids.next_id();
        let echoed = client_request_id(req.headers()).unwrap_or_else(|| {
            HeaderValue::from_str(&request_id).unwrap_or(HeaderValue::from_static("req"))
        });
        let table = self.table.load_full();
        let mut outcome = Outcome::default();
        if table.access_log && access::enabled() {
            outcome.access = Some(AccessLine::new(
                &request_id,
                Some((req.method(), path)),
                started,
            ));
        }
        // The gateway's own endpoints are answered whatever the routes say.
        let result = if path == "/v1/limits" {
            outcome.decide("limits");
            self.limits(req, &table, &outcome).await
        } else if path == "/v1/usage" {
            self.usage(req, &table, &outcome).await
        } else if path == "/v1/models" || path.starts_with("/v1/models/") {
            outcome.decide("models");
            self.models(req, &table, &outcome).await
        } else {
            match table.router.match_path(path) {
                None => Err(ApiError::UnknownRoute {
                    method: req.method().to_string(),
                    path: path.to_owned(),
                }),
                Some((route_index, _)) => {
                    let route = &table.routes[route_index];
                    self.proxy(
                        req,
                        &table,
                        route,
                        (started, request_id, echoed.clone()),
                        &mut outcome,
                    )
                    .await
                }
            }
        };
        let mut resp = result.unwrap_or_else(|e| {
            outcome.fail(e.code());
            error_response(&e)
        });
        // Every response is counted, once, whatever stage ended it, and
        // has its access-log line (written now, or when an admitted
        // request's settlement lets go of it).
        let status = resp.status().as_u16();
        let decision = outcome.decision.unwrap_or("other");
        self.core.metrics.request(
            outcome.endpoint.as_deref().unwrap_or(NO_ENDPOINT),
            decision,
            status,
        );
        let now_ms = self.core.limiter.clock().now_ms();
        self.core.metrics.minute(now_ms, decision, outcome.degraded);
        if let Some(line) = outcome.access.take() {
            line.note(|f| {
                f.status = status;
                f.decision = decision;
                f.error = outcome.error;
                f.endpoint = outcome.endpoint.take();
            });
        }
        resp.headers_mut().entry(REQUEST_ID).or_insert(echoed);
        resp
    }

    /// The answer to a request head the edge guard refused (400, 401,
    /// 431; `server::ListenerOptions::refuse`): like every response of this
    /// listener it carries a request id, is counted and has its access-log
    /// line (without method and path: the head was not read).
    pub fn refused(&self, e: &ApiError) -> Response<Body> {
        let request_id = self.core.ids.next_id();
        let mut resp = error_response(e);
        let status = resp.status().as_u16();
        self.core.metrics.request(NO_ENDPOINT, e.code(), status);
        let now_ms = self.core.limiter.clock().now_ms();
        self.core.metrics.minute(now_ms, e.code(), false);
        if self.table.load().access_log && access::enabled() {
            AccessLine::new(&request_id, None, Instant::now()).note(|f| {
                f.status = status;
                f.decision = e.code();
                f.error = Some(e.code());
            });
        }
        if let Ok(v) = HeaderValue::from_str(&request_id) {
            resp.headers_mut().insert(REQUEST_ID, v);
        }
        resp
    }

    /// Route → authenticate → admit (windows, concurrency, credits) →
    /// forward → respond; the settlement runs when the body ends. Records
    /// in `outcome` the endpoint (once it is known to the plan) and the
    /// decision; errors are recorded by the caller from their code.
    async fn proxy(
        &self,
        req: Request<Incoming>,
        table: &Arc<RouteTable>,
        route: &Route,
        (started, request_id, client_request_id): (Instant, String, HeaderValue),
        outcome: &mut Outcome,
    ) -> Result<Response<Body>, ApiError> {
        let core = &self.core;
        // Who is calling, by the route's key header.
        let key_headers = match route.auth_headers.as_slice() {
            [] => std::slice::from_ref(&table.auth_header),
            own => own,
        };
        let owner = self.authenticate(req.headers(), key_headers).await?;
        outcome.caller(&owner);
        let account = owner.account_id;

        // Cheap refusal of declared oversize bodies before reading a byte.
        if let Some(len) = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        {
            if len > table.max_request_body {
                linger(req.into_body(), table.max_request_body);
                return Err(ApiError::PayloadTooLarge {
                    limit_bytes: table.max_request_body,
                });
            }
        }

        let (mut parts, body) = req.into_parts();
        // The bytes of a body read before admission are held against the
        // budget until the attempt is decided.
        let mut hold = BodyHold::new(&core.bodies, &account);
        let mut admission = read_admission(route, &parts.headers, body, table, &mut hold).await?;
        let endpoint = admission.endpoint.as_str();

        let plan = self.plan_of(&account).await?;
        let Some(policy) = plan.as_ref().and_then(|p| p.policy(endpoint)).cloned() else {
            // Not an endpoint of the caller's plan: the id is the client's
            // choice (any model name), never a metrics label.
            outcome.endpoint = Some(UNKNOWN_ENDPOINT.into());
            outcome.decide("no_access");
            return Err(ApiError::EndpointNotAllowed {
                endpoint: endpoint.to_owned(),
            });
        };

        outcome.endpoint = Some(endpoint.to_owned());
        // A key with a plan of its own: its windows on top of the account's.
        let policy = key_policy(
            core,
            &account,
            &owner.key_id,
            owner.plan_id.as_deref(),
            endpoint,
            policy,
        )
        .await?;

        // Rate limits.
        // The attempt must run to completion even if the client goes away
        // while the store decides: a cancelled attempt could leave a slot
        // taken in the store with no permit to release it until its lease
        // expired. Finished, its permit is dropped and releases the slot.
        let attempt_with = |units: Vec<(Unit, u64)>| {
            let limiter = core.limiter.clone();
            let (id, acct, ep) = (request_id.clone(), account.clone(), endpoint.to_owned());
            let pol = policy.clone();
            async move {
                run_to_completion(
                    async move { limiter.attempt(&id, &acct, &ep, &pol, &units).await },
                )
                .await
                .unwrap_or_else(|e| Err(StoreError::Unavailable(format!("attempt task: {e}"))))
            }
        };
        // Spend caps (`credit` windows) reserve the admission charge; the
        // settlement counts what the request was charged in all.
        if let (Some(cost), true) = (&policy.credits, policy.caps_spend()) {
            set_units(
                &mut admission.start_units,
                &Unit::credit(),
                cost.per_request,
            );
        }
        // Fit instead of fail (`cap`): a request that asks nothing of the
        // capped unit asks for everything, and one refused for that unit
        // is tried once more with what its windows have left.
        if let (Some((unit, _)), true) = (&route.cap, admission.cap_absent) {
            set_units(&mut admission.start_units, unit, crate::plans::MAX_AMOUNT);
        }
        let mut attempt = attempt_with(admission.start_units.clone()).await;
        let mut capped = None;
        if let (Some((unit, field)), Ok(Attempt::Denied(denial, info))) = (&route.cap, &attempt) {
            let fit = fit_left(unit, denial, info).and_then(|left| {
                let bytes = admission.bytes.as_ref()?;
                Some((left, usage::request::with_field(bytes, field, left)?))
            });
            if let Some((left, bytes)) = fit {
                set_units(&mut admission.start_units, unit, left);
                attempt = attempt_with(admission.start_units.clone()).await;
                if matches!(attempt, Ok(Attempt::Admitted(..))) {
                    admission.body = full(Bytes::from(bytes));
                    admission.rewritten = true;
                    capped = Some(left);
                }
            } else if admission.cap_absent {
                // Nothing left: the refusal a request that asked nothing
                // gets (its default reservation), not one naming the
                // everything it was made to ask for.
                set_units(&mut admission.start_units, unit, 1);
                attempt = attempt_with(admission.start_units.clone()).await;
            }
        }
        core.metrics.admission_latency(started.elapsed());
        drop(hold);
        let (permit, info, degraded) = match attempt {
            Ok(Attempt::Admitted(permit, info)) => (Some(permit), Some(info), false),
            Ok(Attempt::Denied(denial, info)) => {
                let e = ApiError::from_denial(&denial, endpoint);
                let decision = match denial {
                    Denial::Credits { .. } => "no_credits",
                    _ => "denied",
                };
                outcome.decide(decision);
                outcome.error = Some(e.code());
                if let Denial::Window { window, .. } | Denial::TooLarge { window, .. } = &denial {
                    outcome.note(|f| {
                        f.window = Some(format!("{}/{}", window.unit.as_str(), window.len))
                    });
                }
                // Nothing was written: the info is the state after the
                // refusal.
                return Ok(error_with_info(&e, &info));
            }
            Err(e) => {
                core.metrics.store_error();
                tracing::warn!(error = %e, endpoint, "counter store failed");
                if policy.credits.is_some() {
                    // Balances live in the counter store: credits fail
                    // closed whatever `on_store_error` says; when it was
                    // the catalog that failed (loading the wallet), the
                    // answer says so.
                    outcome.decide("store_error");
                    return Err(match e {
                        StoreError::Catalog(_) => ApiError::CatalogUnavailable,
                        _ => ApiError::LimiterUnavailable,
                    });
                }
                match core.on_store_error {
                    OnStoreError::Open => (None, None, true),
                    OnStoreError::Closed => {
                        outcome.decide("store_error");
                        return Err(ApiError::LimiterUnavailable);
                    }
                }
            }
        };

        outcome.degraded = degraded;
        outcome.note(|f| f.degraded = degraded);
        // Shadow mode: admitted although the limits would have refused it;
        // counted, reported, not refused.
        let would_deny = permit.as_ref().and_then(|p| p.would_deny()).map(|denial| {
            core.metrics.would_deny(endpoint);
            if let Denial::Window { window, .. } | Denial::TooLarge { window, .. } = denial {
                outcome
                    .note(|f| f.window = Some(format!("{}/{}", window.unit.as_str(), window.len)));
            }
            let code = ApiError::from_denial(denial, endpoint).code();
            outcome.note(|f| f.would_deny = Some(code));
            code
        });
        let in_flight = permit.as_ref().map(|_| InFlightGuard::new(&core.metrics));

        // Credits were charged by the attempt, atomically with the windows.
        let credit_balance = permit
            .as_ref()
            .and_then(|p| p.ticket().charged.as_ref())
            .map(|c| c.balance);
        if let (Some(_), Some(cost)) = (credit_balance, &policy.credits) {
            core.metrics.credits_charged(cost.per_request);
        }
        // Threshold notifications: compares the counts and balance the
        // admission returned with the plan's thresholds; no I/O here.
        if let (Some(notifier), Some(plan), Some(info), Some(_)) =
            (&core.notifier, &plan, &info, &permit)
        {
            notifier.observe(&account, endpoint, plan, info, credit_balance);
        }

        // Forward.
        let upstream = &table.upstreams[route.upstream];
        let uri = upstream
            .uri_for(parts.uri.path_and_query())
            .map_err(|_| ApiError::invalid_request("request path cannot be forwarded"))?;
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::HOST);
        // No header a key is read from reaches an upstream (the client's
        // key for this gateway is not the upstream's business).
        for name in &table.key_headers {
            parts.headers.remove(name);
        }
        if let Some(auth) = &upstream.auth {
            parts
                .headers
                .insert(upstream.auth_header.clone(), auth.clone());
        }
        parts.headers.insert(REQUEST_ID, client_request_id.clone());
        if admission.rewritten {
            // The body was rewritten; its length changed.
            parts.headers.remove(header::CONTENT_LENGTH);
        }
        let meters_body = routes::meters_body(route);
        if meters_body {
            // The meter reads the body: ask for it uncompressed (an upstream
            // that compresses anyway is decoded below).
            parts.headers.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
        }
        parts.uri = uri;
        parts.version = http::Version::HTTP_11;
        let upstream_req = Request::from_parts(parts, admission.body);

        let settle = Settle {
            core: self.core.clone(),
            permit,
            policy: policy.clone(),
            account: account.clone(),
            endpoint: endpoint.to_owned(),
            request_id,
            key_id: owner.key_id,
            route: route_label(&route.path),
            credits: policy.credits.clone(),
            reserved: admission.start_units.clone(),
            prompt_tokens: admission.body_bytes.div_ceil(usage::BYTES_PER_TOKEN as u64),
            upstream_failed: false,
            answered_ok: true,
            status: 0,
            streamed: false,
            cut_short: false,
            access: outcome.access.clone(),
            _in_flight: in_flight,
        };

        let sent = tokio::time::timeout(
            table.request_timeout,
            upstream.client().request(upstream_req),
        )
        .await;
        let upstream_resp = match sent {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) if body_too_large(&e) => {
                // A streamed (undeclared-length) request body went over
                // max_request_body while being forwarded: the client's
                // fault, not the upstream's.
                settle.fail(StatusCode::PAYLOAD_TOO_LARGE).await;
                outcome.decide("body_too_large");
                return Err(ApiError::PayloadTooLarge {
                    limit_bytes: table.max_request_body,
                });
            }
            Ok(Err(e)) => {
                tracing::warn!(upstream = %upstream.name, error = %e, "upstream request failed");
                settle.fail(StatusCode::BAD_GATEWAY).await;
                outcome.decide("upstream_error");
                return Err(ApiError::UpstreamUnavailable);
            }
            Err(_) => {
                settle.fail(StatusCode::GATEWAY_TIMEOUT).await;
                outcome.decide("upstream_timeout");
                return Err(ApiError::UpstreamTimeout);
            }
        };

        let (mut resp_parts, resp_body) = upstream_resp.into_parts();
        let status = resp_parts.status;
        outcome.decide("admitted");
        outcome.note(|f| f.upstream_status = Some(status.as_u16()));
        let mut settle = settle;
        if status.is_server_error() {
            settle.upstream_failed = true;
        }
        settle.answered_ok = status.is_success();
        settle.status = status.as_u16();
        settle.streamed = usage::is_event_stream(&resp_parts.headers);
        strip_hop_by_hop(&mut resp_parts.headers);
        upstream.drop_response_headers(&mut resp_parts.headers);
        let decoder = if meters_body {
            match ContentDecoder::for_headers(&resp_parts.headers) {
                Ok(d) => d,
                Err(Unsupported(coding)) => {
                    // Asked for identity, sent something the meter cannot
                    // read: refused rather than forwarded uncounted.
                    tracing::warn!(upstream = %upstream.name, %coding, "upstream response in a content-encoding the gateway cannot meter");
                    settle.fail(StatusCode::BAD_GATEWAY).await;
                    outcome.decide("upstream_error");
                    return Err(ApiError::UpstreamUnavailable);
                }
            }
        } else {
            None
        };
        if decoder.is_some() {
            resp_parts.headers.remove(header::CONTENT_ENCODING);
        }
        let meter = ResponseMeter::new(&route.usage, &resp_parts.headers, admission.injected_usage);
        let rewrites_body = decoder.is_some()
            || (admission.injected_usage && usage::is_event_stream(&resp_parts.headers));
        if let Some(info) = &info {
            headers::insert_rate_limit(&mut resp_parts.headers, info);
        }
        if let Some(balance) = credit_balance {
            headers::insert_credits_remaining(&mut resp_parts.headers, balance);
        }
        if degraded {
            headers::insert_degraded(&mut resp_parts.headers);
        }
        if let Some(code) = would_deny {
            headers::insert_would_deny(&mut resp_parts.headers, code);
        }
        if let Some(n) = capped {
            headers::insert_capped(&mut resp_parts.headers, n);
        }
        resp_parts.headers.insert(REQUEST_ID, client_request_id);
        if rewrites_body {
            resp_parts.headers.remove(header::CONTENT_LENGTH);
        }
        let body = MeteredBody::new(resp_body, meter, decoder, settle, rewrites_body);
        if body.settle_first && !usage::is_event_stream(&resp_parts.headers) {
            // Credits: the client gets the last bytes only once the
            // request is settled. An answer that is not a stream is read
            // ahead (up to READ_AHEAD_BYTES, within request_timeout) so that
            // it goes out with its headers in one write, settled: else
            // the headers go first and the last bytes after the store's
            // round trip, a second write and wakeup per request (and one
            // more segment for the client to read).
            let head = read_ahead(body, table.request_timeout).await;
            return Ok(Response::from_parts(resp_parts, head.boxed_unsync()));
        }
        Ok(Response::from_parts(resp_parts, body.boxed_unsync()))
    }

    /// The caller of one of the gateway's own `GET` endpoints (`/v1/limits`,
    /// `/v1/usage`, `/v1/models`), recorded in the request's outcome.
    async fn get_caller(
        &self,
        req: &Request<Incoming>,
        table: &RouteTable,
        outcome: &Outcome,
    ) -> Result<KeyOwner, ApiError> {
        if req.method() != Method::GET {
            return Err(ApiError::MethodNotAllowed);
        }
        let owner = self.authenticate(req.headers(), &table.key_headers).await?;
        outcome.caller(&owner);
        Ok(owner)
    }

    /// Resolve the caller's account from its API key.
    async fn authenticate(
        &self,
        headers: &HeaderMap,
        key_headers: &[HeaderName],
    ) -> Result<KeyOwner, ApiError> {
        let Some(key) = extract_key(headers, key_headers) else {
            return Err(ApiError::MissingApiKey);
        };
        if !plausible_key(key) {
            return Err(ApiError::invalid_api_key(key));
        }
        match self.core.cache.resolve_key_digest(&key_digest(key)).await {
            Ok(Some(owner)) => Ok(owner),
            Ok(None) => Err(ApiError::invalid_api_key(key)),
            Err(e) => {
                tracing::warn!(error = %e, "key lookup failed");
                Err(ApiError::CatalogUnavailable)
            }
        }
    }

    async fn plan_of(&self, account: &str) -> Result<Option<Arc<Plan>>, ApiError> {
        self.core
            .cache
            .plan_for_account(account)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "plan lookup failed");
                ApiError::CatalogUnavailable
            })
    }

    async fn readyz(&self) -> Response<Body> {
        let store = self.core.limiter.store().ping().await;
        let catalog = self.core.catalog.ping().await;
        let ok = store.is_ok() && catalog.is_ok();
        let body = serde_json::json!({
            "ready": ok,
            "counter_store": store.err().map(|e| e.to_string()).unwrap_or_else(|| "ok".into()),
            "catalog": catalog.err().map(|e| e.to_string()).unwrap_or_else(|| "ok".into()),
        });
        let status = if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        json_response(status, &body)
    }

    /// `GET /v1/limits`: the caller's standing on every endpoint of its plan.
    async fn limits(
        &self,
        req: Request<Incoming>,
        table: &RouteTable,
        outcome: &Outcome,
    ) -> Result<Response<Body>, ApiError> {
        let owner = self.get_caller(&req, table, outcome).await?;
        let v = limits_json(&self.core, &owner.account_id, None, Some(&owner)).await?;
        Ok(json_response(StatusCode::OK, &v))
    }

    /// `GET /v1/models` (OpenAI's list) and `GET /v1/models/{id}`: the
    /// models the caller's plan allows ([`plan_models`]). The id is the
    /// rest of the path, percent-decoded (model names may hold `/`).
    async fn models(
        &self,
        req: Request<Incoming>,
        table: &RouteTable,
        outcome: &Outcome,
    ) -> Result<Response<Body>, ApiError> {
        let owner = self.get_caller(&req, table, outcome).await?;
        let plan = self.plan_of(&owner.account_id).await?;
        let models = plan_models(plan.as_deref(), &table.routes);
        match req.uri().path().strip_prefix("/v1/models/") {
            None => {
                let data: Vec<serde_json::Value> = models.iter().map(|m| model_json(m)).collect();
                Ok(json_response(
                    StatusCode::OK,
                    &serde_json::json!({"object": "list", "data": data}),
                ))
            }
            Some(raw) => {
                let id = crate::query::percent_decode(raw);
                if models.contains(&id.as_str()) {
                    Ok(json_response(StatusCode::OK, &model_json(&id)))
                } else {
                    Err(ApiError::ModelNotFound { model: id })
                }
            }
        }
    }
}

/// The models a plan allows: its endpoint ids that a request can reach as
/// a model name. Under a `{model}` route the body's `model` is the endpoint
/// id, so every endpoint of the plan is one (when some route is `{model}`);
/// a route with a literal endpoint (`dall-e-3` for images) makes that one
/// reachable too. Sorted, no duplicates; none without a plan.
pub fn plan_models<'a>(plan: Option<&'a Plan>, routes: &[Route]) -> Vec<&'a str> {
    let Some(plan) = plan else {
        return Vec::new();
    };
    let any_model_route = routes
        .iter()
        .any(|r| matches!(r.endpoint, EndpointSource::Model));
    let mut out: Vec<&str> = plan
        .endpoints
        .keys()
        .map(String::as_str)
        .filter(|id| {
            any_model_route
                || routes
                    .iter()
                    .any(|r| matches!(&r.endpoint, EndpointSource::Literal(e) if e == id))
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// One model in OpenAI's shape. plangate knows no creation time: 0.
fn model_json(id: &str) -> serde_json::Value {
    serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "plangate"})
}

impl Gateway {
    /// `GET /v1/usage?since=&until=&group_by=`: the caller's own usage,
    /// summed per day (default), hour or endpoint. The account is the
    /// key's, always: an `account` parameter is refused like any unknown
    /// one, never read.
    async fn usage(
        &self,
        req: Request<Incoming>,
        table: &RouteTable,
        outcome: &Outcome,
    ) -> Result<Response<Body>, ApiError> {
        let owner = self.get_caller(&req, table, outcome).await?;
        let account = owner.account_id;
        let v = async {
            let p = crate::query::parse(req.uri().query(), &["since", "until", "group_by"])?;
            let q = p.usage_query(Some(account.clone()))?;
            let group_by = p.group_by(GroupBy::Day)?;
            let buckets = self
                .core
                .catalog
                .usage_summary(&q, group_by)
                .await
                .map_err(|e| {
                    tracing::warn!(error = %e, "usage summary failed");
                    ApiError::from(e)
                })?;
            Ok::<_, ApiError>(serde_json::json!({
                "account": account,
                "group_by": group_by.as_str(),
                "buckets": buckets,
            }))
        }
        .await?;
        Ok(json_response(StatusCode::OK, &v))
    }
}

/// `POST /admin/accounts/{id}/limits/reset[?endpoint=E]`: clear the
/// account's current window counters on every endpoint of its plan (or
/// one). Returns the endpoints reset. 404 for an unknown account or an
/// endpoint its plan does not have.
pub async fn reset_limits(
    core: &Core,
    account: &str,
    endpoint: Option<&str>,
) -> Result<Vec<String>, ApiError> {
    core.catalog.get_account(account).await?;
    let plan = core
        .cache
        .plan_for_account(account)
        .await
        .map_err(ApiError::from)?;
    let Some(plan) = plan else {
        return Ok(Vec::new());
    };
    // The account's keys with plans of their own: their windows too.
    let mut keys = Vec::new();
    for k in core.catalog.list_keys(account).await? {
        if let (false, Some(plan_id)) = (k.revoked, k.plan_id.as_deref()) {
            let key_plan = core.cache.plan_for_key(account, Some(plan_id)).await?;
            if let Some(key_plan) = key_plan {
                keys.push((k.id, key_plan));
            }
        }
    }
    let now_ms = core.limiter.clock().now_ms();
    let reset = crate::limiter::reset_account_windows(
        core.limiter.store(),
        &plan,
        account,
        &keys,
        endpoint,
        now_ms,
    )
    .await
    .map_err(|e| {
        tracing::warn!(error = %e, "resetting rate-limit windows failed");
        ApiError::LimiterUnavailable
    })?;
    reset.ok_or_else(|| ApiError::NotFound {
        message: format!(
            "endpoint `{}` is not in plan `{}`",
            endpoint.unwrap_or_default(),
            plan.id
        ),
    })
}

/// The policy of `endpoint` as it applies to key `key_id` of `account`,
/// whose own plan is `key_plan`: `policy` (the account's) with the key
/// plan's windows for the endpoint added ([`Policy::with_key`]). A key
/// without a plan, or whose plan does not list the endpoint, gets
/// `policy` itself: the account's plan alone decides access, and a key
/// plan adds limits only where it names the endpoint.
async fn key_policy(
    core: &Core,
    account: &str,
    key_id: &str,
    key_plan: Option<&str>,
    endpoint: &str,
    policy: Arc<Policy>,
) -> Result<Arc<Policy>, ApiError> {
    if key_plan.is_none() {
        return Ok(policy);
    }
    let plan = core
        .cache
        .plan_for_key(account, key_plan)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "key plan lookup failed");
            ApiError::CatalogUnavailable
        })?;
    Ok(match plan.as_ref().and_then(|p| p.policy(endpoint)) {
        Some(own) if !own.windows.is_empty() => Arc::new(policy.with_key(key_id, own)),
        _ => policy,
    })
}

/// The `/v1/limits` document for `account` (optionally one endpoint):
/// with the caller's key, its own windows too (marked `"scope": "key"`);
/// the admin API's view of an account passes no key (the account's
/// windows only).
pub async fn limits_json(
    core: &Core,
    account: &str,
    only: Option<&str>,
    key: Option<&KeyOwner>,
) -> Result<serde_json::Value, ApiError> {
    let plan = core
        .cache
        .plan_for_account(account)
        .await
        .map_err(ApiError::from)?;
    let mut endpoints = serde_json::Map::new();
    if let Some(plan) = &plan {
        for (id, policy) in &plan.endpoints {
            if only.is_some_and(|o| o != id) {
                continue;
            }
            let policy = match key {
                Some(k) => {
                    key_policy(
                        core,
                        account,
                        &k.key_id,
                        k.plan_id.as_deref(),
                        id,
                        policy.clone(),
                    )
                    .await?
                }
                None => policy.clone(),
            };
            let now_ms = core.limiter.clock().now_ms();
            let info = core.limiter.info(account, id, &policy).await;
            endpoints.insert(id.clone(), endpoint_json(&policy, info.ok(), now_ms));
        }
        if let Some(o) = only {
            if !plan.endpoints.contains_key(o) {
                return Err(ApiError::EndpointNotAllowed {
                    endpoint: o.to_owned(),
                });
            }
        }
    }
    // The wallet's balance when one is loaded (it is ahead of the catalog
    // by the charges not yet written), else the catalog's.
    let now_ms = core.limiter.clock().now_ms();
    let wallet = core.limiter.store().wallet_balance(account, now_ms).await;
    let balance = match wallet {
        Ok(Some(b)) => serde_json::json!(b),
        _ => match core.catalog.balance(account).await {
            Ok(b) => serde_json::json!(b),
            Err(_) => serde_json::Value::Null,
        },
    };
    Ok(serde_json::json!({
        "account": account,
        "plan": plan.as_ref().map(|p| p.id.clone()),
        "key_plan": key.and_then(|k| k.plan_id.clone()),
        "endpoints": endpoints,
        "credits": { "balance": balance },
    }))
}

/// One endpoint of `/v1/limits`. A calendar window also names its period
/// (`"window": "1mo"`, `"calendar": "utc"`, and for an account's billing
/// month its `"billing_anchor"`) and its `window_seconds` is the length of
/// the current period (a month: 28 to 31 days).
fn endpoint_json(policy: &Policy, info: Option<RateLimitInfo>, now_ms: u64) -> serde_json::Value {
    // Without the counter store (degraded), limits are known but usage is not.
    let windows: Vec<serde_json::Value> = policy
        .windows
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let state = info.as_ref().and_then(|info| info.windows.get(i));
            let mut out = serde_json::json!({
                "unit": w.unit.as_str(),
                "window": match w.len.period() {
                    Some(p) => p.as_str().to_owned(),
                    None => w.len.to_string(),
                },
                "window_seconds": w.len.secs_at(now_ms),
                "limit": w.limit,
                "used": state.map(|s| s.used),
                "remaining": state.map(|s| s.remaining),
                "reset_ms": state.map(|s| s.reset_ms),
                "scope": if policy.is_key_window(i) { "key" } else { "account" },
            });
            if let Some(p) = w.len.period() {
                out["calendar"] = serde_json::json!(crate::plans::parse::CALENDAR_UTC);
                if let Some(anchor) = p.anchor() {
                    out["billing_anchor"] = serde_json::json!(anchor);
                }
            }
            out
        })
        .collect();
    let concurrency = (policy.max_concurrent > 0).then(|| {
        let remaining = info
            .as_ref()
            .and_then(|i| i.concurrent)
            .map(|c| c.remaining)
            .unwrap_or(policy.max_concurrent);
        serde_json::json!({
            "limit": policy.max_concurrent,
            "in_use": policy.max_concurrent - remaining,
        })
    });
    serde_json::json!({
        "windows": windows,
        "concurrency": concurrency,
        "degraded": info.is_none(),
    })
}

/// Read what admission needs from the request body: the endpoint id
/// (`{model}`), reservations, and whether a stream needs `include_usage`
/// (see `usage::request` for the strict reading). Reads the body (bounded)
/// only when one of them needs it; otherwise the body streams through
/// untouched.
async fn read_admission(
    route: &Route,
    headers: &HeaderMap,
    body: Incoming,
    table: &RouteTable,
    hold: &mut BodyHold<'_>,
) -> Result<Admission, ApiError> {
    let max_body = table.max_request_body;
    let bad = |e: usage::request::BadRequest| ApiError::invalid_request(e.0);
    if !routes::needs_request_body(route) {
        // Only literal endpoints get here: `{model}` needs the body.
        let endpoint = match &route.endpoint {
            EndpointSource::Literal(e) => e.clone(),
            EndpointSource::Model => String::new(),
        };
        let reserved = usage::request::header_reservations(headers, &route.reserve).map_err(bad)?;
        let body_bytes = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let limited = Limited::new(body, max_body as usize).map_err(BoxError::from);
        return Ok(Admission {
            endpoint,
            start_units: default_reservations(reserved),
            body: limited.boxed_unsync(),
            injected_usage: false,
            body_bytes,
            bytes: None,
            cap_absent: false,
            rewritten: false,
        });
    }
    let bytes = read_body(body, table, hold).await?;
    let facts = usage::request::read_request(&bytes, headers, &route.reserve).map_err(bad)?;
    let endpoint = match &route.endpoint {
        EndpointSource::Literal(e) => e.clone(),
        EndpointSource::Model => facts
            .routing_model()
            .map_err(|e| ApiError::invalid_request(e.to_string()))?
            .to_owned(),
    };
    let body_bytes = bytes.len() as u64;
    let mut injected_usage = false;
    let mut bytes = bytes;
    if facts.stream
        && !facts.include_usage
        && routes::meters_body(route)
        && route.inject_include_usage
    {
        if let Some(rewritten) = usage::request::with_include_usage(&bytes, &facts) {
            bytes = Bytes::from(rewritten);
            injected_usage = true;
        }
    }
    let cap_absent = route
        .cap
        .as_ref()
        .is_some_and(|(unit, _)| facts.reserved.iter().any(|(u, n)| u == unit && n.is_none()));
    Ok(Admission {
        endpoint,
        start_units: default_reservations(facts.reserved),
        body: full(bytes.clone()),
        injected_usage,
        body_bytes,
        bytes: Some(bytes),
        cap_absent,
        rewritten: injected_usage,
    })
}

/// Set `unit`'s start amount to `n`.
fn set_units(units: &mut Vec<(Unit, u64)>, unit: &Unit, n: u64) {
    match units.iter_mut().find(|(u, _)| u == unit) {
        Some(entry) => entry.1 = n,
        None => units.push((unit.clone(), n)),
    }
}

/// What a request refused for `unit` (its windows full for its start
/// amount, or the amount larger than a window) could still have: the least
/// room among the unit's windows, if at least 1.
fn fit_left(unit: &Unit, denial: &Denial, info: &RateLimitInfo) -> Option<u64> {
    let (Denial::Window { window, .. } | Denial::TooLarge { window, .. }) = denial else {
        return None;
    };
    if window.unit != *unit {
        return None;
    }
    info.windows
        .iter()
        .filter(|w| w.unit == *unit)
        .map(|w| w.limit.saturating_sub(w.used))
        .min()
        .filter(|left| *left >= 1)
}

/// Read a request body before admission: at most `max_request_body`
/// bytes (413), within `body_read_timeout` (408), each chunk held against
/// the body budget before it is kept (429 / 503).
async fn read_body(
    mut body: Incoming,
    table: &RouteTable,
    hold: &mut BodyHold<'_>,
) -> Result<Bytes, ApiError> {
    let max_body = table.max_request_body;
    let read = async {
        let mut buf = bytes::BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame =
                frame.map_err(|_| ApiError::invalid_request("could not read the request body"))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if buf.len() as u64 + data.len() as u64 > max_body {
                return Err(ApiError::PayloadTooLarge {
                    limit_bytes: max_body,
                });
            }
            hold.grow(data.len() as u64, table)?;
            buf.extend_from_slice(&data);
        }
        Ok(buf.freeze())
    };
    let result = match tokio::time::timeout(table.body_read_timeout, read).await {
        Ok(r) => r,
        Err(_) => Err(ApiError::BodyTimeout {
            secs: table.body_read_timeout.as_secs().max(1),
        }),
    };
    if matches!(result, Err(ApiError::PayloadTooLarge { .. })) {
        linger(body, max_body);
    }
    result
}

/// How long the rest of a refused body is read and dropped after the 413.
const LINGER_TIME: Duration = Duration::from_secs(5);

/// At least this much of a refused body is read and dropped (more for
/// large limits: four times the limit).
const LINGER_MIN_BYTES: u64 = 1 << 20;

/// Like nginx's lingering close: after refusing a body as too large, read
/// and discard what the client still sends (for at most [`LINGER_TIME`]
/// and four times the body limit, at least [`LINGER_MIN_BYTES`]) so that
/// it finishes writing and reads the 413 instead of a reset connection;
/// then drop the connection. A client sending far more is still cut off.
fn linger(mut body: Incoming, max_body: u64) {
    if tokio::runtime::Handle::try_current().is_err() {
        return;
    }
    let budget = max_body.saturating_mul(4).max(LINGER_MIN_BYTES);
    tokio::spawn(async move {
        let drain = async {
            let mut seen = 0u64;
            while let Some(Ok(frame)) = body.frame().await {
                if let Some(d) = frame.data_ref() {
                    seen += d.len() as u64;
                    if seen > budget {
                        break;
                    }
                }
            }
        };
        let _ = tokio::time::timeout(LINGER_TIME, drain).await;
    });
}

/// Start amounts from the route's `reserve` sources. A request that does
/// not say (no `n`, no `max_tokens`) reserves 1, OpenAI's default `n`: an
/// image request without `n` still counts one image, and a token
/// reservation is settled to the measured amount at the end anyway.
fn default_reservations(reserved: Vec<(Unit, Option<u64>)>) -> Vec<(Unit, u64)> {
    reserved
        .into_iter()
        .map(|(unit, n)| (unit, n.unwrap_or(1)))
        .collect()
}

/// Run `fut` to its end even if the caller's future is dropped meanwhile:
/// here, if it finishes on its first poll (the in-process stores), else in
/// a task of its own whose result the caller awaits (its first poll has
/// already sent the store call). Spawning every time cost a task per
/// request, more than an in-process attempt itself.
async fn run_to_completion<T, F>(fut: F) -> Result<T, tokio::task::JoinError>
where
    T: Send + 'static,
    F: Future<Output = T> + Send + 'static,
{
    let mut fut = Box::pin(fut);
    match (&mut fut).now_or_never() {
        Some(out) => Ok(out),
        None => tokio::spawn(fut).await,
    }
}

/// Ends an admitted request: limiter end with the measured units, per-unit
/// credit charge, refund of the admission charge when the upstream failed.
struct Settle {
    core: Arc<Core>,
    permit: Option<Permit<AnyStore>>,
    policy: Arc<Policy>,
    account: String,
    endpoint: String,
    request_id: String,
    credits: Option<CreditCost>,
    /// The start amounts reserved at admission (the route's `reserve`).
    reserved: Vec<(Unit, u64)>,
    /// Estimated prompt tokens (request body bytes / 4), for a stream cut
    /// short before its usage chunk.
    prompt_tokens: u64,
    upstream_failed: bool,
    /// The upstream answered 2xx. Otherwise (a 4xx refusal) reserved units
    /// the response did not report are given back, not charged.
    answered_ok: bool,
    /// For the usage record: the API key, the route, the status the client
    /// got, whether the response streamed and ended early.
    key_id: String,
    route: String,
    status: u16,
    streamed: bool,
    cut_short: bool,
    /// The request's access-log line: the settlement adds the units and
    /// credits, and writes it if the handler let go of it first.
    access: Option<Arc<AccessLine>>,
    /// Counts the request in the in-flight gauge until settled.
    _in_flight: Option<InFlightGuard>,
}

/// Keeps an admitted request in the in-flight gauge until dropped.
struct InFlightGuard(Arc<Metrics>);

impl InFlightGuard {
    fn new(metrics: &Arc<Metrics>) -> Self {
        metrics.in_flight_inc();
        Self(metrics.clone())
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.in_flight_dec();
    }
}

impl Settle {
    /// The upstream could not be reached: release the slot, give back the
    /// reservations, refund the admission charge.
    async fn fail(mut self, status: StatusCode) {
        self.upstream_failed = true;
        self.status = status.as_u16();
        let units: Vec<(Unit, u64)> = Vec::new();
        self.finish(units).await;
    }

    async fn finish(mut self, units: Vec<(Unit, u64)>) {
        if let Some(line) = self.access.take() {
            let admission = match (&self.permit, &self.credits) {
                (Some(p), Some(cost)) if p.ticket().charged.is_some() && !self.upstream_failed => {
                    cost.per_request
                }
                _ => 0,
            };
            let unit_charge = match &self.credits {
                Some(cost) if !self.upstream_failed => cost.unit_charge(&units),
                _ => 0,
            };
            line.note(|f| {
                f.units = units.clone();
                f.credits = admission.saturating_add(unit_charge);
                f.streamed = self.streamed;
                f.cut_short = self.cut_short;
            });
            // Written at the end of this settlement (or by the handler):
            // kept until then so the line follows the charge.
            self.access = Some(line);
        }
        if let Some(permit) = self.permit.take() {
            let mut settled_units = if self.upstream_failed {
                // Nothing was served: give back every reservation except
                // the request itself.
                permit
                    .ticket()
                    .policy
                    .units()
                    .into_iter()
                    .filter(|u| u.as_str() != crate::plans::REQUEST_UNIT)
                    .map(|u| (u, 0))
                    .collect()
            } else {
                units.clone()
            };
            // The per-unit charge is settled with the windows, in the
            // same store operation; the upstream failing refunds the
            // admission charge instead.
            let charge = match &self.credits {
                Some(cost) if !self.upstream_failed => cost.unit_charge(&units),
                _ => 0,
            };
            // Spend caps: the credits charged in all (nothing when the
            // admission charge is refunded).
            if let Some(cost) = &self.credits {
                if permit.ticket().policy.caps_spend() {
                    let spent = if self.upstream_failed || permit.ticket().charged.is_none() {
                        0
                    } else {
                        cost.per_request.saturating_add(charge)
                    };
                    set_units(&mut settled_units, &Unit::credit(), spent);
                }
            }
            if charge > 0 {
                self.core.metrics.credits_charged(charge);
            }
            let usage = self
                .core
                .record_usage
                .then(|| self.usage_record(permit.ticket(), &units));
            let ending = Ending {
                units: settled_units,
                charge,
                refund: self.upstream_failed,
                usage,
            };
            if let Err(e) = permit.end_as(ending).await {
                self.core.metrics.store_error();
                tracing::warn!(error = %e, request_id = %self.request_id, "ending a request failed; retrying in the background");
            }
        }
        let _ = &self.policy;
    }

    /// The request's usage record (the store adds what its per-unit charge
    /// takes to `credits`).
    fn usage_record(&self, ticket: &crate::limiter::Ticket, units: &[(Unit, u64)]) -> UsageEvent {
        // A spend cap's `credit` is not a unit of work: the record's
        // `credits` says what was charged.
        let mut measured: Vec<UnitUsage> = units
            .iter()
            .filter(|(u, _)| !u.is_credit())
            .map(|(u, n)| UnitUsage {
                unit: u.as_str().to_owned(),
                measured: *n,
                reserved: 0,
            })
            .collect();
        for (u, n) in self.reserved.iter().filter(|(u, _)| !u.is_credit()) {
            match measured.iter_mut().find(|m| m.unit == u.as_str()) {
                Some(m) => m.reserved = *n,
                None => measured.push(UnitUsage {
                    unit: u.as_str().to_owned(),
                    measured: 0,
                    reserved: *n,
                }),
            }
        }
        let admission = match (&ticket.charged, &self.credits) {
            (Some(_), Some(cost)) if !self.upstream_failed => cost.per_request,
            _ => 0,
        };
        let at = |ms: u64| std::time::UNIX_EPOCH + Duration::from_millis(ms);
        UsageEvent {
            request_id: self.request_id.clone(),
            account_id: self.account.clone(),
            key_id: Some(self.key_id.clone()),
            endpoint: self.endpoint.clone(),
            route: self.route.clone(),
            units: measured,
            credits: admission,
            status: self.status,
            degraded: false,
            streamed: self.streamed,
            cut_short: self.cut_short,
            started_at: at(ticket.admitted_ms),
            ended_at: at(self.core.limiter.clock().now_ms().max(ticket.admitted_ms)),
            charge: None,
        }
    }
}

/// Most bytes of a response [`read_ahead`] holds before it lets the rest
/// stream.
const READ_AHEAD_BYTES: usize = 256 * 1024;

/// Read `body` ahead: to its end (its settlement done) when it ends within
/// `timeout` and [`READ_AHEAD_BYTES`]; else what was read, followed by the
/// rest as it comes. An error is passed on after the frames before it, as
/// the client would have seen it.
async fn read_ahead(mut body: MeteredBody, timeout: Duration) -> ReadAhead {
    let mut head = std::collections::VecDeque::new();
    let mut bytes = 0;
    let mut cut = None;
    // Armed only while the upstream is awaited: the settlement has the
    // store's own timeout, and a body that came with its head needs no
    // timer at all.
    let mut deadline: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let ended = std::future::poll_fn(|cx| loop {
        if bytes > READ_AHEAD_BYTES {
            return Poll::Ready(false);
        }
        match Pin::new(&mut body).poll_frame(cx) {
            Poll::Ready(None) => return Poll::Ready(true),
            Poll::Ready(Some(Ok(frame))) => {
                bytes += frame.data_ref().map_or(0, Bytes::len);
                head.push_back(frame);
            }
            Poll::Ready(Some(Err(e))) => {
                cut = Some(e);
                return Poll::Ready(true);
            }
            Poll::Pending if body.settling.is_some() => return Poll::Pending,
            Poll::Pending => {
                let sleep = deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                return match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(false),
                    Poll::Pending => Poll::Pending,
                };
            }
        }
    })
    .await;
    ReadAhead {
        exact: (ended && cut.is_none()).then_some(bytes as u64),
        head,
        cut,
        flushed: false,
        rest: (!ended).then_some(body),
    }
}

/// A response body whose first frames were read ahead ([`read_ahead`]).
struct ReadAhead {
    head: std::collections::VecDeque<Frame<Bytes>>,
    /// The upstream broke after `head`: the client sees the response cut
    /// there, as it would have without the read-ahead.
    cut: Option<BoxError>,
    /// A cut is passed on only after one `Pending`, which makes hyper send
    /// the head and what came before the cut (an error with nothing sent
    /// would close the connection without a response).
    flushed: bool,
    rest: Option<MeteredBody>,
    /// The bytes still to send, when the body was read to its end.
    exact: Option<u64>,
}

impl HttpBody for ReadAhead {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(frame) = self.head.pop_front() {
            let sent = frame.data_ref().map_or(0, |d| d.len() as u64);
            if let Some(left) = &mut self.exact {
                *left = left.saturating_sub(sent);
            }
            return Poll::Ready(Some(Ok(frame)));
        }
        if self.cut.is_some() {
            if !self.flushed {
                self.flushed = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            return Poll::Ready(self.cut.take().map(Err));
        }
        match &mut self.rest {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_empty()
            && self.cut.is_none()
            && self.rest.as_ref().map_or(true, |r| r.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        match self.exact {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// The response body: passes frames through unchanged (but for the dropped
/// usage chunk), measures units, and settles the request when it ends — or
/// when it is dropped. (The limiter's lease keeper keeps the request's
/// concurrency lease alive meanwhile.)
pub struct MeteredBody {
    inner: Incoming,
    meter: ResponseMeter,
    /// Decodes a compressed upstream body before it is metered.
    decoder: Option<ContentDecoder>,
    rewrites_body: bool,
    settle: Option<Settle>,
    done: bool,
    /// Settle before the client gets the last bytes (endpoints with
    /// credits): a client that received its response in full has been
    /// charged, whatever happens to the gateway afterwards.
    settle_first: bool,
    /// A frame read ahead to find out whether the one before it was the
    /// last.
    peeked: Option<Poll<Option<UpstreamFrame>>>,
    /// The settlement running before `held` (the last bytes) is released.
    settling: Option<Settling>,
    held: Option<Bytes>,
}

/// A frame of the upstream body as hyper yields it.
type UpstreamFrame = Result<Frame<Bytes>, hyper::Error>;

/// A settlement in progress.
type Settling = Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

impl MeteredBody {
    fn new(
        inner: Incoming,
        meter: ResponseMeter,
        decoder: Option<ContentDecoder>,
        settle: Settle,
        rewrites_body: bool,
    ) -> Self {
        let settle_first = settle.credits.is_some() && settle.permit.is_some();
        Self {
            inner,
            meter,
            decoder,
            rewrites_body,
            settle: Some(settle),
            done: false,
            settle_first,
            peeked: None,
            settling: None,
            held: None,
        }
    }

    /// Settle now (in the background if that needs waiting); `cut_short`:
    /// the body did not reach its end (client gone, upstream or encoding
    /// broke).
    fn finish(&mut self, cut_short: bool) {
        if let Some(settle) = &mut self.settle {
            settle.cut_short = cut_short;
        }
        if let Some((background, settling)) = self.settlement() {
            // Settled right here when that needs no waiting (the in-process
            // store, no credits to write): spawning a task per request cost
            // more than the settlement itself. Otherwise (a Redis round
            // trip), the first poll has sent the call and a task finishes it.
            if !background.spawn(Job::Settle, settling) {
                tracing::error!("too many settlements running; this request's settlement is dropped (its slot expires with its lease)");
            }
        }
    }

    /// The body ended (`last` are its last bytes, possibly empty): settle,
    /// then release them — first, when the endpoint has credits.
    fn end_with(&mut self, last: Vec<u8>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.settle_first {
            if let Some((background, settling)) = self.settlement() {
                // Polled by the body itself, counted as a settlement.
                self.settling = Some(Box::pin(async move {
                    background.run(Job::Settle, settling).await;
                }));
                self.held = Some(last.into());
                return Poll::Pending;
            }
        }
        self.finish(false);
        Poll::Ready((!last.is_empty()).then(|| Ok(Frame::data(last.into()))))
    }

    /// Whatever the body's end must do, as a future (`None` once taken).
    fn settlement(&mut self) -> Option<(Arc<Background>, Settling)> {
        self.done = true;
        let settle = self.settle.take()?;
        let background = settle.core.limiter.background().clone();
        {
            let units = if settle.answered_ok {
                self.meter
                    .settle_units(&settle.reserved, settle.prompt_tokens)
            } else {
                // Refused upstream: only what it reported; reservations
                // are given back.
                let mut units = self.meter.units();
                for (u, _) in &settle.reserved {
                    if !units.iter().any(|(m, _)| m == u) {
                        units.push((u.clone(), 0));
                    }
                }
                units
            };
            Some((background, Box::pin(settle.finish(units))))
        }
    }

    /// Wait for the settlement, then release the last bytes.
    fn poll_settling(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(settling) = &mut self.settling {
            std::task::ready!(settling.as_mut().poll(cx));
            self.settling = None;
        }
        let last = self.held.take().unwrap_or_default();
        Poll::Ready((!last.is_empty()).then(|| Ok(Frame::data(last))))
    }

    /// The next frame of the upstream body (a read-ahead one first).
    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Option<UpstreamFrame>> {
        match self.peeked.take() {
            Some(p) => p,
            None => Pin::new(&mut self.inner).poll_frame(cx),
        }
    }

    /// The tail the decoder and the meter still hold at the body's end.
    fn tail(&mut self) -> Result<Vec<u8>, BoxError> {
        let mut tail = Vec::new();
        if let Some(d) = &mut self.decoder {
            let rest = d.finish().map_err(|e| Box::new(e) as BoxError)?;
            tail.extend_from_slice(&self.meter.feed(&rest));
        }
        tail.extend_from_slice(&self.meter.finish());
        Ok(tail)
    }
}

impl HttpBody for MeteredBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.settling.is_some() {
            return this.poll_settling(cx);
        }
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            match this.poll_inner(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    return match this.tail() {
                        Ok(tail) => match this.end_with(tail) {
                            Poll::Pending => this.poll_settling(cx),
                            ready => ready,
                        },
                        Err(e) => {
                            this.finish(true);
                            Poll::Ready(Some(Err(e)))
                        }
                    };
                }
                Poll::Ready(Some(Err(e))) => {
                    // The upstream died mid-body: charge what was seen.
                    this.finish(true);
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let data = match &mut this.decoder {
                            None => data,
                            Some(d) => match d.feed(&data) {
                                Ok(decoded) => decoded,
                                Err(e) => {
                                    // A broken encoding is a broken upstream
                                    // body: charge what was seen.
                                    this.finish(true);
                                    return Poll::Ready(Some(Err(Box::new(e))));
                                }
                            },
                        };
                        let out = this.meter.feed(&data);
                        if this.settle_first {
                            // Is this the last frame? Read ahead without
                            // waiting: a body's end usually arrives with its
                            // last bytes.
                            let next = Pin::new(&mut this.inner).poll_frame(cx);
                            if let Poll::Ready(None) = next {
                                let mut last = out.to_vec();
                                match this.tail() {
                                    Ok(tail) => last.extend_from_slice(&tail),
                                    Err(e) => {
                                        this.finish(true);
                                        return Poll::Ready(Some(Err(e)));
                                    }
                                }
                                match this.end_with(last) {
                                    Poll::Pending => return this.poll_settling(cx),
                                    ready => return ready,
                                }
                            }
                            if !next.is_pending() {
                                this.peeked = Some(next);
                            }
                        }
                        if out.is_empty() {
                            continue;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.settling.is_none() && self.held.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        if self.rewrites_body {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        // The client went away (or hyper dropped the body): settle with
        // what was measured.
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        if let Some(settling) = self.settling.take() {
            // The client went away while the last bytes waited for the
            // settlement: it still completes (already counted as a job).
            tokio::spawn(settling);
        } else if !self.done && self.settle.is_some() {
            // hyper stops polling a body of known length once it has all
            // of it: that is an end, not a cut.
            let cut_short = !self.inner.is_end_stream();
            self.finish(cut_short);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RoutePath;

    fn route(endpoint: EndpointSource) -> Route {
        Route {
            path: RoutePath::Exact("/x".into()),
            upstream: 0,
            endpoint,
            auth_headers: vec![],
            usage: vec![],
            reserve: vec![],
            inject_include_usage: true,
            cap: None,
        }
    }

    #[test]
    fn plan_models_are_the_endpoints_reachable_by_name() {
        let policy = Arc::new(Policy {
            windows: vec![],
            max_concurrent: 0,
            concurrency_expiry_secs: 60,
            credits: None,
            enforce: true,
            key: None,
        });
        let plan = Plan {
            id: "p".into(),
            name: "p".into(),
            endpoints: ["b-model", "a-model", "images"]
                .iter()
                .map(|e| ((*e).to_owned(), policy.clone()))
                .collect(),
            notify: Vec::new(),
        };
        let images = route(EndpointSource::Literal("images".into()));
        let elsewhere = route(EndpointSource::Literal("not-in-plan".into()));
        let by_model = route(EndpointSource::Model);
        let check = |routes: &[Route], want: &[&str]| {
            assert_eq!(plan_models(Some(&plan), routes), want, "{routes:?}");
        };
        // A `{model}` route reaches every endpoint of the plan by name.
        check(
            std::slice::from_ref(&by_model),
            &["a-model", "b-model", "images"],
        );
        check(
            &[images.clone(), by_model],
            &["a-model", "b-model", "images"],
        );
        // Without one, only literal endpoints the plan has.
        check(&[images, elsewhere], &["images"]);
        check(&[], &[]);
        assert!(plan_models(None, &[route(EndpointSource::Model)]).is_empty());
    }

    #[test]
    fn the_key_is_read_from_the_first_header_present() {
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("raw-key"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer bearer-key"),
        );
        let x = HeaderName::from_static("x-api-key");
        let auth = header::AUTHORIZATION;
        assert_eq!(extract_key(&h, &[x.clone(), auth.clone()]), Some("raw-key"));
        assert_eq!(
            extract_key(&h, &[auth.clone(), x.clone()]),
            Some("bearer-key")
        );
        h.remove("x-api-key");
        assert_eq!(extract_key(&h, &[x.clone(), auth]), Some("bearer-key"));
        assert_eq!(extract_key(&h, &[x]), None);
        // A raw key in authorization is not a bearer key.
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("raw"));
        assert_eq!(extract_key(&h, &[header::AUTHORIZATION]), None);
    }
}
