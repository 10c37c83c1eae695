//! The admin listener (SPEC §7): the admin API over any [`Catalog`], and
//! `/metrics`. Every request needs `Authorization: Bearer <admin token>`,
//! compared in constant time, but the browser console under `/ui/`
//! (`console.rs`), which has its own sign-in and sessions.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::catalog::notifications::MAX_NOTIFICATIONS_PAGE;
use crate::catalog::{
    Catalog, CatalogError, GroupBy, Invalidation, KeyOptions, NotificationQuery,
    NotificationStatus, UsageCursor, MAX_ACCOUNTS_PAGE,
};
use crate::errors::ApiError;
use crate::plans::parse::{parse_plans_for, plan_to_json, plans_to_json};
use crate::plans::{KnownUnits, MAX_AMOUNT};
use crate::proxy::{limits_json, Core};
use crate::query::{self, percent_decode};
use crate::server::{error_response, Body};

/// Events per page of `GET /admin/usage/events` unless `limit` says.
const USAGE_PAGE_DEFAULT: usize = 100;
/// Most events one page of `GET /admin/usage/events` holds.
const USAGE_PAGE_MAX: usize = 1000;
/// Notifications per page of `GET /admin/notifications` unless `limit` says.
const NOTIFICATIONS_PAGE_DEFAULT: usize = 100;

/// Accounts per page of `GET /admin/accounts` unless `limit` says.
const ACCOUNTS_PAGE_DEFAULT: usize = 100;

/// Largest admin request body (plans files are small).
const MAX_ADMIN_BODY: usize = 4 * 1024 * 1024;

/// The admin listener's handler.
pub struct Admin {
    token: String,
    metrics_token: Option<String>,
    core: Arc<Core>,
    /// The units plans may name (those of the routes in force).
    units: Arc<arc_swap::ArcSwap<KnownUnits>>,
    /// Under `[plans] source = "file"`: why plan writes are refused (409).
    plan_writes_refused: Option<String>,
    /// The browser console under `/ui/` and its sessions; `None` when
    /// `[admin] console = false`.
    console: Option<crate::console::Console>,
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(full(serde_json::to_vec(value).unwrap_or_default()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn catalog_error(e: CatalogError) -> ApiError {
    if let CatalogError::Unavailable(cause) = &e {
        tracing::warn!(error = %cause, "admin request failed: catalog unavailable");
    }
    ApiError::from(e)
}

type AdminResult = Result<Response<Body>, ApiError>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAccount {
    id: String,
    #[serde(default)]
    plan_id: Option<String>,
    #[serde(default)]
    metadata: Option<serde_json::Value>,
    /// Day of the month (1 to 31) the account's billing month starts on.
    #[serde(default)]
    billing_anchor: Option<u8>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountPatch {
    /// Keys to set; a `null` value removes the key.
    metadata: serde_json::Map<String, serde_json::Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NewKey {
    #[serde(default)]
    label: Option<String>,
    #[serde(default)]
    expires_at: Option<String>,
    /// A plan of the key's own (key-level limits).
    #[serde(default)]
    plan: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanRef {
    plan_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AnchorRef {
    billing_anchor: Option<u8>,
}

/// 400 for a billing anchor that is no day of the month.
fn check_anchor(anchor: Option<u8>) -> Result<(), ApiError> {
    match anchor {
        Some(a) if !(1..=crate::plans::MAX_BILLING_ANCHOR).contains(&a) => {
            Err(ApiError::InvalidRequest {
                message: format!("billing_anchor must be a day of the month, 1 to 31, not {a}"),
            })
        }
        _ => Ok(()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewBlock {
    credits: u64,
    #[serde(default)]
    expires_at: Option<String>,
    #[serde(default)]
    metadata: Option<serde_json::Value>,
}

impl Admin {
    /// `units`: the units plans may name, shared with the reload of routes.
    pub fn new(token: String, core: Arc<Core>, units: Arc<arc_swap::ArcSwap<KnownUnits>>) -> Self {
        Self {
            token,
            metrics_token: None,
            core,
            units,
            plan_writes_refused: None,
            console: Some(crate::console::Console::new(Default::default())),
        }
    }

    /// The console's session lifetime and cookie settings; `None`: no
    /// console (`/ui/` is an admin API path like any other: 401, 404).
    pub fn with_console(mut self, opts: Option<crate::console::ConsoleOptions>) -> Self {
        self.console = opts.map(crate::console::Console::new);
        self
    }

    pub(crate) fn core(&self) -> &Arc<Core> {
        &self.core
    }

    pub(crate) fn token(&self) -> &str {
        &self.token
    }

    /// The units plans may name now.
    pub(crate) fn units(&self) -> Arc<KnownUnits> {
        self.units.load_full()
    }

    /// Why plan writes are refused (`[plans] source = "file"`), if they are.
    pub(crate) fn plan_writes_refused(&self) -> Option<&str> {
        self.plan_writes_refused.as_deref()
    }

    /// Refuse plan writes (409 with `message`): the plans file owns them.
    pub fn with_plan_writes_refused(mut self, message: Option<String>) -> Self {
        self.plan_writes_refused = message;
        self
    }

    /// `Err(409)` when plan writes are refused (`[plans] source = "file"`).
    fn plan_write(&self) -> Result<(), ApiError> {
        match &self.plan_writes_refused {
            Some(message) => Err(ApiError::Conflict {
                message: message.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Also accept `token` for `GET /metrics` (and nothing else).
    pub fn with_metrics_token(mut self, token: Option<String>) -> Self {
        self.metrics_token = token;
        self
    }

    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let presented = Self::presented(req);
        let matches = |t: &str| {
            !t.is_empty() && presented.is_some_and(|p| bool::from(p.as_bytes().ct_eq(t.as_bytes())))
        };
        if matches(&self.token) {
            return true;
        }
        // The read-only token scrapes metrics and does nothing else.
        req.method() == Method::GET
            && req.uri().path() == "/metrics"
            && self.metrics_token.as_deref().is_some_and(matches)
    }

    /// After a credit change made here: drop this gateway's copy of the
    /// account's wallet at once, so the change holds from the next request
    /// (other gateways follow the catalog's notification).
    pub(crate) async fn reload_wallet(&self, account: &str) {
        use crate::limiter::CounterStore;
        if let Err(e) = self
            .core
            .limiter
            .store()
            .wallet_invalidate(account, None)
            .await
        {
            tracing::warn!(error = %e, "dropping a credit wallet after an admin change failed; the catalog's notification will");
        }
    }

    fn presented(req: &Request<Incoming>) -> Option<&str> {
        req.headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
    }

    /// Handle one admin request.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        if req.uri().path() == "/healthz" {
            return json(StatusCode::OK, &serde_json::json!({"status": "ok"}));
        }
        // The console signs in with the admin token once and then holds a
        // session cookie (`console.rs`); it never takes a bearer header.
        let path = req.uri().path();
        if let Some(console) = &self.console {
            if path == "/ui" || path.starts_with("/ui/") {
                return crate::console::handle(&self, console, req).await;
            }
        }
        if !self.authorized(&req) {
            return error_response(&ApiError::AdminUnauthorized);
        }
        match self.route(req).await {
            Ok(resp) => resp,
            Err(e) => error_response(&e),
        }
    }

    async fn route(&self, req: Request<Incoming>) -> AdminResult {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let query = req.uri().query().map(str::to_owned);
        let segments: Vec<String> = path
            .trim_matches('/')
            .split('/')
            .map(percent_decode)
            .collect();
        if segments.iter().any(|seg| seg.chars().any(char::is_control)) {
            // No id contains a control character (Postgres cannot even
            // store NUL): refused here instead of failing in the catalog.
            return Err(ApiError::invalid_request(
                "ids in the path must not contain control characters",
            ));
        }
        let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
        let catalog: &dyn Catalog = &*self.core.catalog;
        match (&method, segs.as_slice()) {
            (&Method::GET, ["metrics"]) => {
                let mut text = self.core.metrics.render();
                self.core.limiter.background().render(&mut text);
                if let Some(n) = &self.core.notifier {
                    n.render(&mut text);
                }
                let mut resp = Response::new(full(text));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                Ok(resp)
            }
            (&Method::GET, ["admin", "plans"]) => {
                let plans = catalog.list_plans().await.map_err(catalog_error)?;
                Ok(json(StatusCode::OK, &plans_to_json(&plans)))
            }
            (&Method::PUT, ["admin", "plans"]) => {
                self.plan_write()?;
                let body = read_body(req).await?;
                // Parsing and checking a document of up to 4 MiB is work
                // for a blocking thread, not for the workers that serve
                // requests.
                let units = self.units.load_full();
                let parsed = tokio::task::spawn_blocking(move || {
                    let text = std::str::from_utf8(&body).map_err(|_| {
                        ApiError::invalid_request("plans must be UTF-8 YAML or JSON")
                    })?;
                    parse_plans_for(text, "<request body>", &units)
                        .map_err(|e| ApiError::invalid_request(e.to_string()))
                })
                .await;
                let plans = parsed.map_err(|e| {
                    tracing::error!(error = %e, "parsing plans failed");
                    ApiError::Internal
                })??;
                let report = catalog
                    .apply_plans(&plans, false)
                    .await
                    .map_err(catalog_error)?;
                self.core.cache.invalidate(&Invalidation::All);
                Ok(json(
                    StatusCode::OK,
                    &serde_json::to_value(report).unwrap_or_default(),
                ))
            }
            (&Method::GET, ["admin", "plans", id]) => {
                let plan = catalog.get_plan(id).await.map_err(catalog_error)?;
                let mut v = plan_to_json(&plan);
                if let Some(obj) = v.as_object_mut() {
                    obj.insert("id".into(), serde_json::json!(id));
                }
                Ok(json(StatusCode::OK, &v))
            }
            (&Method::DELETE, ["admin", "plans", id]) => {
                self.plan_write()?;
                catalog.delete_plan(id).await.map_err(catalog_error)?;
                self.core.cache.invalidate(&Invalidation::All);
                Ok(json(StatusCode::OK, &serde_json::json!({"deleted": id})))
            }
            (&Method::PUT, ["admin", "default-plan"]) => {
                self.plan_write()?;
                let r: PlanRef = read_json(req).await?;
                let id = r
                    .plan_id
                    .ok_or_else(|| ApiError::invalid_request("plan_id is required"))?;
                catalog.set_default_plan(&id).await.map_err(catalog_error)?;
                self.core.cache.invalidate(&Invalidation::All);
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({"default_plan": id}),
                ))
            }
            (&Method::POST, ["admin", "accounts"]) => {
                let a: NewAccount = read_json(req).await?;
                check_anchor(a.billing_anchor)?;
                let mut account = catalog
                    .create_account(
                        &a.id,
                        a.plan_id.as_deref(),
                        a.metadata.unwrap_or_else(|| serde_json::json!({})),
                    )
                    .await
                    .map_err(catalog_error)?;
                if let Some(anchor) = a.billing_anchor {
                    catalog
                        .set_billing_anchor(&a.id, Some(anchor))
                        .await
                        .map_err(catalog_error)?;
                    account.billing_anchor = Some(anchor);
                }
                Ok(json(
                    StatusCode::CREATED,
                    &serde_json::to_value(account).unwrap_or_default(),
                ))
            }
            (&Method::GET, ["admin", "accounts"]) => {
                let p = query::parse(query.as_deref(), &["limit", "after", "plan"])?;
                let limit = p.limit(ACCOUNTS_PAGE_DEFAULT, MAX_ACCOUNTS_PAGE)?;
                // One more than asked: a next page is promised only when
                // there is one.
                let mut accounts = catalog
                    .list_accounts(p.get("plan"), p.get("after"), limit + 1)
                    .await
                    .map_err(catalog_error)?;
                let next = crate::catalog::next_page(&mut accounts, limit, |a| a.id.clone());
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({"accounts": accounts, "next_after": next}),
                ))
            }
            (&Method::PATCH, ["admin", "accounts", id]) => {
                let patch: AccountPatch = read_json(req).await?;
                let account = catalog
                    .update_account_metadata(id, &patch.metadata)
                    .await
                    .map_err(catalog_error)?;
                Ok(json(
                    StatusCode::OK,
                    &serde_json::to_value(account).unwrap_or_default(),
                ))
            }
            (&Method::DELETE, ["admin", "accounts", id]) => {
                let p = query::parse(query.as_deref(), &["force"])?;
                let force = match p.get("force") {
                    None | Some("false") => false,
                    Some("true") => true,
                    Some(v) => {
                        return Err(ApiError::invalid_parameter(
                            "force",
                            format!("force: `{}` is not true or false", v.escape_debug()),
                        ))
                    }
                };
                let deleted = catalog
                    .delete_account(id, force)
                    .await
                    .map_err(catalog_error)?;
                self.reload_wallet(id).await;
                tracing::warn!(account = %id, by = "admin-api", keys = deleted.keys, blocks = deleted.blocks, credits_forfeited = deleted.credits_forfeited, "admin: account deleted");
                Ok(json(
                    StatusCode::OK,
                    &serde_json::to_value(deleted).unwrap_or_default(),
                ))
            }
            (&Method::POST, ["admin", "accounts", id, "limits", "reset"]) => {
                let p = query::parse(query.as_deref(), &["endpoint"])?;
                let reset = crate::proxy::reset_limits(&self.core, id, p.get("endpoint")).await?;
                tracing::warn!(account = %id, endpoint = p.get("endpoint").unwrap_or("*"), by = "admin-api", endpoints = ?reset, "admin: rate-limit windows reset");
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({"account": id, "reset": reset}),
                ))
            }
            (&Method::GET, ["admin", "accounts", id]) => account_json(catalog, id).await,
            (&Method::PUT, ["admin", "accounts", id, "plan"]) => {
                let r: PlanRef = read_json(req).await?;
                catalog
                    .assign_plan(id, r.plan_id.as_deref())
                    .await
                    .map_err(catalog_error)?;
                self.core
                    .cache
                    .invalidate(&Invalidation::Account((*id).to_owned()));
                account_json(catalog, id).await
            }
            (&Method::PUT, ["admin", "accounts", id, "billing-anchor"]) => {
                let r: AnchorRef = read_json(req).await?;
                check_anchor(r.billing_anchor)?;
                catalog
                    .set_billing_anchor(id, r.billing_anchor)
                    .await
                    .map_err(catalog_error)?;
                self.core
                    .cache
                    .invalidate(&Invalidation::Account((*id).to_owned()));
                account_json(catalog, id).await
            }
            (&Method::POST, ["admin", "accounts", id, "keys"]) => {
                // The body is optional: `{"label": "ci", "expires_at": "..."}`.
                let body = read_body(req).await?;
                let k: NewKey = if body.iter().all(u8::is_ascii_whitespace) {
                    NewKey::default()
                } else {
                    serde_json::from_slice(&body)
                        .map_err(|e| ApiError::invalid_request(format!("invalid JSON body: {e}")))?
                };
                let opts = KeyOptions {
                    label: k.label,
                    expires_at: k.expires_at.as_deref().map(parse_rfc3339).transpose()?,
                    plan: k.plan,
                };
                let key = catalog
                    .create_key_with(id, &opts)
                    .await
                    .map_err(catalog_error)?;
                Ok(json(
                    StatusCode::CREATED,
                    &serde_json::json!({
                        "id": key.id,
                        "key": key.key,
                        "prefix": key.prefix,
                        "label": opts.label,
                        "expires_at": opts.expires_at.map(|t| humantime::format_rfc3339_millis(t).to_string()),
                        "plan_id": opts.plan,
                    }),
                ))
            }
            (&Method::GET, ["admin", "accounts", id, "keys"]) => {
                let keys = catalog.list_keys(id).await.map_err(catalog_error)?;
                Ok(json(StatusCode::OK, &serde_json::json!({"keys": keys})))
            }
            (&Method::PUT, ["admin", "keys", key_id, "plan"]) => {
                // `{"plan_id": "ci-small"}` gives the key a plan of its
                // own; `{"plan_id": null}` takes it away.
                let r: PlanRef = read_json(req).await?;
                catalog
                    .set_key_plan(key_id, r.plan_id.as_deref())
                    .await
                    .map_err(catalog_error)?;
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({"id": key_id, "plan_id": r.plan_id}),
                ))
            }
            (&Method::DELETE, ["admin", "keys", key_id]) => {
                catalog.revoke_key(key_id).await.map_err(catalog_error)?;
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({"revoked": key_id}),
                ))
            }
            (&Method::POST, ["admin", "accounts", id, "quota-blocks"]) => {
                let b: NewBlock = read_json(req).await?;
                if b.credits > MAX_AMOUNT {
                    return Err(ApiError::invalid_request(format!(
                        "credits: {} is more than the largest grant, {MAX_AMOUNT}",
                        b.credits
                    )));
                }
                let expires_at = match &b.expires_at {
                    None => None,
                    Some(s) => Some(parse_rfc3339(s)?),
                };
                let block = catalog
                    .create_quota_block(
                        id,
                        b.credits,
                        expires_at,
                        b.metadata.unwrap_or_else(|| serde_json::json!({})),
                    )
                    .await
                    .map_err(catalog_error)?;
                self.reload_wallet(id).await;
                Ok(json(
                    StatusCode::CREATED,
                    &serde_json::to_value(block).unwrap_or_default(),
                ))
            }
            (&Method::GET, ["admin", "accounts", id, "quota-blocks"]) => {
                let blocks = catalog.list_quota_blocks(id).await.map_err(catalog_error)?;
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({"quota_blocks": blocks}),
                ))
            }
            (&Method::POST, ["admin", "accounts", id, "quota-blocks", "expire"]) => {
                let n = catalog
                    .expire_quota_blocks(id)
                    .await
                    .map_err(catalog_error)?;
                self.reload_wallet(id).await;
                Ok(json(StatusCode::OK, &serde_json::json!({"expired": n})))
            }
            (&Method::DELETE, ["admin", "quota-blocks", block_id]) => {
                catalog
                    .delete_quota_block(block_id)
                    .await
                    .map_err(catalog_error)?;
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({"deleted": block_id}),
                ))
            }
            (&Method::GET, ["admin", "accounts", id, "balance"]) => {
                // 404 for unknown accounts rather than a zero balance.
                catalog.get_account(id).await.map_err(catalog_error)?;
                let balance = catalog.balance(id).await.map_err(catalog_error)?;
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({"balance": balance}),
                ))
            }
            (&Method::GET, ["admin", "accounts", id, "limits"]) => {
                catalog.get_account(id).await.map_err(catalog_error)?;
                let endpoint = query.as_deref().and_then(|q| {
                    q.split('&')
                        .find_map(|kv| kv.strip_prefix("endpoint="))
                        .map(percent_decode)
                });
                let v = limits_json(&self.core, id, endpoint.as_deref(), None).await?;
                Ok(json(StatusCode::OK, &v))
            }
            (&Method::GET, ["admin", "usage"]) => {
                let p = query::parse(
                    query.as_deref(),
                    &["account", "since", "until", "endpoint", "group_by"],
                )?;
                // Unknown accounts are not 404: usage outlives accounts.
                let q = p.usage_query(p.get("account").map(str::to_owned))?;
                let group_by = p.group_by(GroupBy::Day)?;
                let buckets = catalog
                    .usage_summary(&q, group_by)
                    .await
                    .map_err(catalog_error)?;
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({"group_by": group_by.as_str(), "buckets": buckets}),
                ))
            }
            (&Method::GET, ["admin", "notifications"]) => {
                let p = query::parse(query.as_deref(), &["account", "status", "limit", "cursor"])?;
                let status = match p.get("status") {
                    None => None,
                    Some(s) => Some(NotificationStatus::parse(s).ok_or_else(|| {
                        ApiError::invalid_parameter(
                            "status",
                            format!(
                                "status: `{}` is not pending, delivered or failed",
                                s.escape_debug()
                            ),
                        )
                    })?),
                };
                let before_seq = match p.get("cursor") {
                    None => None,
                    Some(c) => Some(c.parse::<u64>().map_err(|_| {
                        ApiError::invalid_parameter(
                            "cursor",
                            format!(
                                "cursor: `{}` is not a cursor this API returned",
                                c.escape_debug()
                            ),
                        )
                    })?),
                };
                let limit = p.limit(NOTIFICATIONS_PAGE_DEFAULT, MAX_NOTIFICATIONS_PAGE - 1)?;
                // One more than asked: a next page is promised only when
                // there is one.
                let mut rows = catalog
                    .notifications(&NotificationQuery {
                        account: p.get("account").map(str::to_owned),
                        status,
                        before_seq,
                        limit: limit + 1,
                    })
                    .await
                    .map_err(catalog_error)?;
                let next = crate::catalog::next_page(&mut rows, limit, |n| n.seq.to_string());
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({"notifications": rows, "next_cursor": next}),
                ))
            }
            (&Method::GET, ["admin", "usage", "events"]) => {
                let p = query::parse(
                    query.as_deref(),
                    &["account", "since", "until", "endpoint", "limit", "cursor"],
                )?;
                let q = p.usage_query(p.get("account").map(str::to_owned))?;
                let limit = p.limit(USAGE_PAGE_DEFAULT, USAGE_PAGE_MAX)?;
                let cursor = p.cursor()?;
                // One more than asked: a next page is promised only when
                // there is one.
                let mut events = catalog
                    .usage_events(&q, cursor.as_ref(), limit + 1)
                    .await
                    .map_err(catalog_error)?;
                let next = crate::catalog::next_page(&mut events, limit, |e| {
                    UsageCursor::after(e).encode()
                });
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({"events": events, "next_cursor": next}),
                ))
            }
            _ => Err(ApiError::NotFound {
                message: format!("no admin route for {method} {path}"),
            }),
        }
    }
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    match Limited::new(req.into_body(), MAX_ADMIN_BODY)
        .collect()
        .await
    {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(ApiError::PayloadTooLarge {
                limit_bytes: MAX_ADMIN_BODY as u64,
            })
        }
        Err(_) => Err(ApiError::invalid_request("could not read the request body")),
    }
}

async fn read_json<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, ApiError> {
    let body = read_body(req).await?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid_request(format!("invalid JSON body: {e}")))
}

fn parse_rfc3339(s: &str) -> Result<SystemTime, ApiError> {
    humantime::parse_rfc3339_weak(s).map_err(|e| {
        ApiError::invalid_request(format!("expires_at `{s}` is not an RFC 3339 time: {e}"))
    })
}

/// The account as the admin API shows it (200), read from the catalog.
async fn account_json(catalog: &dyn Catalog, id: &str) -> Result<Response<Body>, ApiError> {
    let account = catalog.get_account(id).await.map_err(catalog_error)?;
    Ok(json(
        StatusCode::OK,
        &serde_json::to_value(account).unwrap_or_default(),
    ))
}
