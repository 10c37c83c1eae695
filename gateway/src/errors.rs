//! The one mapping from errors to HTTP responses (OpenAI error shape).
//!
//! Every error a client or admin can see is an [`ApiError`]; this module alone
//! decides its status, body and extra headers (SPEC §6 and §7). The body is
//! always `{"error":{"message","type","param","code"}}`; `param` names the
//! query parameter of an [`ApiError::InvalidParameter`] and is null
//! otherwise.
//!
//! Typical use in the proxy:
//!
//! ```
//! use http_body_util::Full;
//! use bytes::Bytes;
//! use plangate::errors::ApiError;
//! let resp: http::Response<Full<Bytes>> = ApiError::MissingApiKey.to_response();
//! assert_eq!(resp.status(), 401);
//! ```
//!
//! A 429 from the limiter also carries the caller's `x-ratelimit-*`
//! headers: use [`ApiError::to_response_with_info`] (or merge
//! [`crate::headers::insert_rate_limit`] into the response yourself).

use std::fmt;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};
use serde::Serialize;

use crate::catalog::CatalogError;
use crate::headers::{format_duration_ms, format_window, insert_rate_limit};
use crate::limiter::{Denial, RateLimitInfo};
use crate::plans::Window;

/// `retry-after-ms`: OpenAI's millisecond companion of `retry-after`.
pub const RETRY_AFTER_MS: HeaderName = HeaderName::from_static("retry-after-ms");
/// `x-should-retry: false` tells OpenAI's SDKs not to retry automatically.
pub const SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");

/// Every error the gateway answers with. Build one where the error happens,
/// render it here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// 401 `missing_api_key`: no key in the configured header.
    MissingApiKey,
    /// 401 `invalid_api_key`: unknown or revoked key. Holds the key already
    /// masked by [`mask_key`]; build it with [`ApiError::invalid_api_key`].
    InvalidApiKey { masked_key: String },
    /// 404 `unknown_route`: no route matches the path (without query).
    UnknownRoute { method: String, path: String },
    /// 403 `endpoint_not_allowed`: the account's plan lacks the endpoint.
    EndpointNotAllowed { endpoint: String },
    /// 404 `model_not_found` (`GET /v1/models/{id}`): the caller's plan
    /// has no such model, as OpenAI answers for a model that does not exist.
    ModelNotFound { model: String },
    /// 400 `invalid_request`: e.g. a body that is not JSON where `{model}`
    /// routing needs it, or no `model`; also the admin API's 400.
    InvalidRequest { message: String },
    /// 400 `invalid_request` for one query parameter (e.g. `group_by`),
    /// named in the body's `param` as OpenAI does.
    InvalidParameter { param: String, message: String },
    /// 429 `rate_limit_exceeded`: a window has no room.
    RateLimited {
        endpoint: String,
        window: Window,
        used: u64,
        requested: u64,
        reset_ms: u64,
    },
    /// 429 `request_too_large`: the request alone exceeds a window's limit.
    RequestTooLarge {
        endpoint: String,
        window: Window,
        requested: u64,
    },
    /// 429 `concurrency_limit_exceeded`: every slot is taken.
    ConcurrencyLimited { endpoint: String, limit: u32 },
    /// 409 `duplicate_request_id`: a request with this id is in flight.
    DuplicateRequest,
    /// 429 `insufficient_quota`: the credit balance is below what admission
    /// needs.
    InsufficientQuota {
        endpoint: String,
        balance: u64,
        required: u64,
    },
    /// 413 `payload_too_large`: the request body exceeds `max_request_body`.
    PayloadTooLarge { limit_bytes: u64 },
    /// 431 `headers_too_large`.
    HeadersTooLarge,
    /// 408 `request_timeout`: a body the gateway reads before admission
    /// did not arrive within `body_read_timeout`.
    BodyTimeout { secs: u64 },
    /// Too many bytes of request bodies read before admission: 429
    /// `too_many_pending_bodies` for one account's share, 503 `server_busy`
    /// for the gateway's whole budget.
    BodiesPending { whole_gateway: bool },
    /// 503 `limiter_unavailable`: the counter store failed and
    /// `on_store_error = "closed"`.
    LimiterUnavailable,
    /// 502 `upstream_unavailable`: the upstream could not be reached or
    /// broke the exchange. The cause is for logs, not clients.
    UpstreamUnavailable,
    /// 504 `upstream_timeout`: the upstream exceeded `request_timeout`.
    UpstreamTimeout,
    /// 401 `unauthorized`: missing or wrong admin token.
    AdminUnauthorized,
    /// 404 `not_found` (admin API): the named thing does not exist.
    NotFound { message: String },
    /// 409 `conflict` (admin API): e.g. deleting the default plan.
    Conflict { message: String },
    /// 405 `method_not_allowed`.
    MethodNotAllowed,
    /// 503 `catalog_unavailable`: Postgres is down (credits fail closed).
    CatalogUnavailable,
    /// 500 `internal_error`: a bug or an unexpected state; details are
    /// logged, never sent.
    Internal,
}

impl ApiError {
    /// 401 `invalid_api_key` for `key`, which is masked before it is stored.
    pub fn invalid_api_key(key: &str) -> Self {
        ApiError::InvalidApiKey {
            masked_key: mask_key(key),
        }
    }

    /// 400 `invalid_request` with a message.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
        }
    }

    /// 400 `invalid_request` naming the query parameter `param`.
    pub fn invalid_parameter(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidParameter {
            param: param.into(),
            message: message.into(),
        }
    }

    /// The `error.param` field: the parameter at fault, if one is.
    pub fn param(&self) -> Option<&str> {
        match self {
            ApiError::InvalidParameter { param, .. } => Some(param),
            ApiError::ModelNotFound { .. } => Some("model"),
            _ => None,
        }
    }

    /// The error for a limiter denial on `endpoint`.
    pub fn from_denial(denial: &Denial, endpoint: &str) -> Self {
        let endpoint = endpoint.to_owned();
        match denial {
            Denial::Window {
                window,
                used,
                requested,
                reset_ms,
            } => ApiError::RateLimited {
                endpoint,
                window: window.clone(),
                used: *used,
                requested: *requested,
                reset_ms: *reset_ms,
            },
            Denial::TooLarge { window, requested } => ApiError::RequestTooLarge {
                endpoint,
                window: window.clone(),
                requested: *requested,
            },
            Denial::Concurrency { limit } => ApiError::ConcurrencyLimited {
                endpoint,
                limit: *limit,
            },
            Denial::Duplicate => ApiError::DuplicateRequest,
            Denial::Credits { balance, required } => ApiError::InsufficientQuota {
                endpoint,
                balance: *balance,
                required: *required,
            },
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            MissingApiKey | InvalidApiKey { .. } | AdminUnauthorized => StatusCode::UNAUTHORIZED,
            UnknownRoute { .. } | NotFound { .. } | ModelNotFound { .. } => StatusCode::NOT_FOUND,
            EndpointNotAllowed { .. } => StatusCode::FORBIDDEN,
            InvalidRequest { .. } | InvalidParameter { .. } => StatusCode::BAD_REQUEST,
            RateLimited { .. }
            | RequestTooLarge { .. }
            | ConcurrencyLimited { .. }
            | InsufficientQuota { .. } => StatusCode::TOO_MANY_REQUESTS,
            DuplicateRequest | Conflict { .. } => StatusCode::CONFLICT,
            PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            BodiesPending {
                whole_gateway: false,
            } => StatusCode::TOO_MANY_REQUESTS,
            BodiesPending {
                whole_gateway: true,
            } => StatusCode::SERVICE_UNAVAILABLE,
            LimiterUnavailable | CatalogUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `error.code` field.
    pub fn code(&self) -> &'static str {
        use ApiError::*;
        match self {
            MissingApiKey => "missing_api_key",
            InvalidApiKey { .. } => "invalid_api_key",
            UnknownRoute { .. } => "unknown_route",
            EndpointNotAllowed { .. } => "endpoint_not_allowed",
            ModelNotFound { .. } => "model_not_found",
            InvalidRequest { .. } | InvalidParameter { .. } => "invalid_request",
            RateLimited { .. } => "rate_limit_exceeded",
            RequestTooLarge { .. } => "request_too_large",
            ConcurrencyLimited { .. } => "concurrency_limit_exceeded",
            DuplicateRequest => "duplicate_request_id",
            InsufficientQuota { .. } => "insufficient_quota",
            PayloadTooLarge { .. } => "payload_too_large",
            HeadersTooLarge => "headers_too_large",
            BodyTimeout { .. } => "request_timeout",
            BodiesPending {
                whole_gateway: false,
            } => "too_many_pending_bodies",
            BodiesPending {
                whole_gateway: true,
            } => "server_busy",
            LimiterUnavailable => "limiter_unavailable",
            UpstreamUnavailable => "upstream_unavailable",
            UpstreamTimeout => "upstream_timeout",
            AdminUnauthorized => "unauthorized",
            NotFound { .. } => "not_found",
            Conflict { .. } => "conflict",
            MethodNotAllowed => "method_not_allowed",
            CatalogUnavailable => "catalog_unavailable",
            Internal => "internal_error",
        }
    }

    /// The `error.type` field. Like OpenAI: a window denial's type is the
    /// unit plural (`tokens`, `requests`); quota is `insufficient_quota`;
    /// other client errors are `invalid_request_error`, 5xx `server_error`.
    pub fn error_type(&self) -> String {
        use ApiError::*;
        match self {
            RateLimited { window, .. } | RequestTooLarge { window, .. } => window.unit.plural(),
            ConcurrencyLimited { .. } => "concurrency".to_owned(),
            InsufficientQuota { .. } => "insufficient_quota".to_owned(),
            EndpointNotAllowed { .. } => "permission_error".to_owned(),
            MissingApiKey | InvalidApiKey { .. } | AdminUnauthorized => {
                "authentication_error".to_owned()
            }
            LimiterUnavailable
            | UpstreamUnavailable
            | UpstreamTimeout
            | CatalogUnavailable
            | BodiesPending {
                whole_gateway: true,
            }
            | Internal => "server_error".to_owned(),
            BodiesPending {
                whole_gateway: false,
            } => "requests".to_owned(),
            UnknownRoute { .. }
            | ModelNotFound { .. }
            | InvalidRequest { .. }
            | InvalidParameter { .. }
            | DuplicateRequest
            | PayloadTooLarge { .. }
            | HeadersTooLarge
            | BodyTimeout { .. }
            | NotFound { .. }
            | Conflict { .. }
            | MethodNotAllowed => "invalid_request_error".to_owned(),
        }
    }

    /// The human-readable `error.message`. Never contains a full API key.
    pub fn message(&self) -> String {
        use ApiError::*;
        match self {
            MissingApiKey => "You didn't provide an API key. Provide it in the Authorization header \
                 (Authorization: Bearer YOUR_KEY) or in the header this gateway is configured to read."
                .to_owned(),
            InvalidApiKey { masked_key } => format!("Incorrect API key provided: {masked_key}."),
            UnknownRoute { method, path } => format!("Invalid URL ({method} {path})"),
            EndpointNotAllowed { endpoint } => format!("no access to endpoint: {endpoint}"),
            ModelNotFound { model } => format!(
                "The model `{model}` does not exist or you do not have access to it."
            ),
            InvalidRequest { message }
            | InvalidParameter { message, .. }
            | NotFound { message }
            | Conflict { message } => message.clone(),
            RateLimited {
                endpoint,
                window,
                used,
                requested,
                reset_ms,
            } => format!(
                "Rate limit reached for {endpoint} on {} per {}: Limit {}, Used {used}, \
                 Requested {}. Please try again in {}.",
                window.unit.plural(),
                format_window(window.len),
                window.limit,
                // The store checks `used + max(amount, 1)`: a request that
                // deducts nothing yet still needs one unit of room.
                (*requested).max(1),
                format_duration_ms(*reset_ms),
            ),
            RequestTooLarge {
                endpoint,
                window,
                requested,
            } => format!(
                "Request too large for {endpoint} on {} per {}: Limit {}, Requested {requested}. \
                 The request must be made smaller to run successfully.",
                window.unit.plural(),
                format_window(window.len),
                window.limit,
            ),
            ConcurrencyLimited { endpoint, limit } => format!(
                "Concurrency limit reached for {endpoint}: at most {limit} requests in flight. \
                 Please try again when one of your requests has completed."
            ),
            DuplicateRequest => "A request with this x-request-id is already in flight.".to_owned(),
            InsufficientQuota {
                endpoint,
                balance,
                required,
            } => format!(
                "You exceeded your current quota: {endpoint} needs a credit balance of at least \
                 {required}, you have {balance}. Please check your plan and billing details."
            ),
            BodyTimeout { secs } => format!(
                "The request body did not arrive within {secs}s; send it without pauses."
            ),
            BodiesPending {
                whole_gateway: false,
            } => "Too many unfinished request bodies for this account at once; \
                 finish sending the ones in progress, then retry."
                .to_owned(),
            BodiesPending {
                whole_gateway: true,
            } => "The server is busy reading other requests; retry shortly.".to_owned(),
            PayloadTooLarge { limit_bytes } => {
                format!("Request body too large: the limit is {limit_bytes} bytes.")
            }
            HeadersTooLarge => "Request headers too large.".to_owned(),
            LimiterUnavailable => {
                "The rate limiter is unavailable. Please try again shortly.".to_owned()
            }
            UpstreamUnavailable => "The upstream server could not be reached.".to_owned(),
            UpstreamTimeout => "The upstream server did not answer in time.".to_owned(),
            AdminUnauthorized => "Missing or invalid admin token.".to_owned(),
            MethodNotAllowed => "Method not allowed for this path.".to_owned(),
            CatalogUnavailable => {
                "The account catalog is unavailable. Please try again shortly.".to_owned()
            }
            Internal => "Internal gateway error.".to_owned(),
        }
    }

    /// Headers this error adds besides `content-type` (`retry-after`,
    /// `retry-after-ms`, `x-should-retry`).
    pub fn insert_extra_headers(&self, headers: &mut HeaderMap) {
        use ApiError::*;
        match self {
            RateLimited { reset_ms, .. } => {
                headers.insert(RETRY_AFTER, HeaderValue::from(reset_ms.div_ceil(1_000)));
                headers.insert(RETRY_AFTER_MS, HeaderValue::from(*reset_ms));
            }
            ConcurrencyLimited { .. } => {
                headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            RequestTooLarge { .. } | InsufficientQuota { .. } => {
                headers.insert(SHOULD_RETRY, HeaderValue::from_static("false"));
            }
            _ => {}
        }
    }

    /// The JSON body: `{"error":{"message","type","param","code"}}`.
    pub fn body(&self) -> Bytes {
        #[derive(Serialize)]
        struct Envelope<'a> {
            error: Inner<'a>,
        }
        #[derive(Serialize)]
        struct Inner<'a> {
            message: &'a str,
            #[serde(rename = "type")]
            kind: &'a str,
            param: Option<&'a str>,
            code: &'a str,
        }
        let message = self.message();
        let kind = self.error_type();
        let envelope = Envelope {
            error: Inner {
                message: &message,
                kind: &kind,
                param: self.param(),
                code: self.code(),
            },
        };
        // Serializing plain strings into a Vec cannot fail; fall back to a
        // fixed body rather than panic if it ever did.
        serde_json::to_vec(&envelope).map(Bytes::from).unwrap_or_else(|_| {
            Bytes::from_static(br#"{"error":{"message":"error","type":"server_error","param":null,"code":"internal_error"}}"#)
        })
    }

    /// Status, headers (`content-type: application/json` plus the extras)
    /// and body.
    pub fn into_parts(&self) -> (StatusCode, HeaderMap, Bytes) {
        let mut headers = HeaderMap::with_capacity(4);
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        self.insert_extra_headers(&mut headers);
        (self.status(), headers, self.body())
    }

    /// The whole response, for any body type buildable from `Bytes`
    /// (e.g. `http_body_util::Full<Bytes>`).
    pub fn to_response<B: From<Bytes>>(&self) -> Response<B> {
        let (status, headers, body) = self.into_parts();
        let mut resp = Response::new(B::from(body));
        *resp.status_mut() = status;
        *resp.headers_mut() = headers;
        resp
    }

    /// [`ApiError::to_response`] plus the caller's `x-ratelimit-*` headers.
    pub fn to_response_with_info<B: From<Bytes>>(&self, info: &RateLimitInfo) -> Response<B> {
        let mut resp = self.to_response();
        insert_rate_limit(resp.headers_mut(), info);
        resp
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message(), self.code())
    }
}

impl std::error::Error for ApiError {}

impl From<&CatalogError> for ApiError {
    /// Catalog errors on the admin API. The cause of `Unavailable` stays
    /// out of the body (log it where it happens).
    fn from(e: &CatalogError) -> Self {
        match e {
            CatalogError::NotFound { .. } => ApiError::NotFound {
                message: e.to_string(),
            },
            CatalogError::Conflict(m) => ApiError::Conflict { message: m.clone() },
            CatalogError::Invalid(m) => ApiError::InvalidRequest { message: m.clone() },
            CatalogError::Unavailable(_) => ApiError::CatalogUnavailable,
        }
    }
}

impl From<CatalogError> for ApiError {
    fn from(e: CatalogError) -> Self {
        ApiError::from(&e)
    }
}

impl From<crate::usage::ModelError> for ApiError {
    /// 400 `invalid_request` for a body that `{model}` routing cannot use.
    fn from(e: crate::usage::ModelError) -> Self {
        ApiError::invalid_request(e.to_string())
    }
}

/// A key shown in messages: never the whole key. Long keys keep a short
/// prefix and the last four characters (`pg_abc…wxyz`), medium ones only a
/// short prefix, and short ones nothing at all.
pub fn mask_key(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    let n = chars.len();
    let prefix = |k: usize| chars[..k].iter().collect::<String>();
    if n >= 20 {
        let tail: String = chars[n - 4..].iter().collect();
        format!("{}…{tail}", prefix(6))
    } else if n >= 10 {
        format!("{}…", prefix(3))
    } else {
        "…".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::{ConcurrencyInfo, UnitInfo};
    use crate::plans::{Unit, WindowLen};
    use http_body_util::{BodyExt, Full};
    use proptest::prelude::*;

    fn window(secs: u64, limit: u64, unit: &str) -> Window {
        Window {
            len: WindowLen::Fixed(secs),
            limit,
            unit: Unit::new(unit),
        }
    }

    struct Row {
        err: ApiError,
        status: u16,
        code: &'static str,
        kind: &'static str,
        message: &'static str,
        headers: &'static [(&'static str, &'static str)],
    }

    fn rows() -> Vec<Row> {
        vec![
            Row {
                err: ApiError::MissingApiKey,
                status: 401,
                code: "missing_api_key",
                kind: "authentication_error",
                message: "You didn't provide an API key. Provide it in the Authorization header \
                          (Authorization: Bearer YOUR_KEY) or in the header this gateway is configured to read.",
                headers: &[],
            },
            Row {
                err: ApiError::invalid_api_key("pg_0123456789abcdefghijklmnopqrstuvwxyz"),
                status: 401,
                code: "invalid_api_key",
                kind: "authentication_error",
                message: "Incorrect API key provided: pg_012…wxyz.",
                headers: &[],
            },
            Row {
                err: ApiError::UnknownRoute {
                    method: "POST".into(),
                    path: "/v1/nope".into(),
                },
                status: 404,
                code: "unknown_route",
                kind: "invalid_request_error",
                message: "Invalid URL (POST /v1/nope)",
                headers: &[],
            },
            Row {
                err: ApiError::EndpointNotAllowed {
                    endpoint: "gpt-4o".into(),
                },
                status: 403,
                code: "endpoint_not_allowed",
                kind: "permission_error",
                message: "no access to endpoint: gpt-4o",
                headers: &[],
            },
            Row {
                err: ApiError::ModelNotFound {
                    model: "gpt-5".into(),
                },
                status: 404,
                code: "model_not_found",
                kind: "invalid_request_error",
                message: "The model `gpt-5` does not exist or you do not have access to it.",
                headers: &[],
            },
            Row {
                err: ApiError::invalid_request("request body is not JSON"),
                status: 400,
                code: "invalid_request",
                kind: "invalid_request_error",
                message: "request body is not JSON",
                headers: &[],
            },
            Row {
                err: ApiError::invalid_parameter("group_by", "group_by must be hour"),
                status: 400,
                code: "invalid_request",
                kind: "invalid_request_error",
                message: "group_by must be hour",
                headers: &[],
            },
            Row {
                err: ApiError::from_denial(
                    &Denial::Window {
                        window: window(60, 40_000, "token"),
                        used: 39_990,
                        requested: 0,
                        reset_ms: 11_200,
                    },
                    "gpt-4-turbo",
                ),
                status: 429,
                code: "rate_limit_exceeded",
                kind: "tokens",
                message: "Rate limit reached for gpt-4-turbo on tokens per 1m: Limit 40000, \
                          Used 39990, Requested 1. Please try again in 11.2s.",
                headers: &[("retry-after", "12"), ("retry-after-ms", "11200")],
            },
            Row {
                err: ApiError::from_denial(
                    &Denial::Window {
                        window: window(86_400, 200, "request"),
                        used: 200,
                        requested: 1,
                        reset_ms: 3_723_000,
                    },
                    "gpt-4-turbo",
                ),
                status: 429,
                code: "rate_limit_exceeded",
                kind: "requests",
                message: "Rate limit reached for gpt-4-turbo on requests per 1d: Limit 200, \
                          Used 200, Requested 1. Please try again in 1h2m3s.",
                headers: &[("retry-after", "3723"), ("retry-after-ms", "3723000")],
            },
            Row {
                err: ApiError::from_denial(
                    &Denial::TooLarge {
                        window: window(90, 1_000, "token"),
                        requested: 5_000,
                    },
                    "gpt-4o",
                ),
                status: 429,
                code: "request_too_large",
                kind: "tokens",
                message: "Request too large for gpt-4o on tokens per 1m30s: Limit 1000, \
                          Requested 5000. The request must be made smaller to run successfully.",
                headers: &[("x-should-retry", "false")],
            },
            Row {
                err: ApiError::from_denial(&Denial::Concurrency { limit: 4 }, "gpt-4o"),
                status: 429,
                code: "concurrency_limit_exceeded",
                kind: "concurrency",
                message: "Concurrency limit reached for gpt-4o: at most 4 requests in flight. \
                          Please try again when one of your requests has completed.",
                headers: &[("retry-after", "1")],
            },
            Row {
                err: ApiError::from_denial(&Denial::Duplicate, "gpt-4o"),
                status: 409,
                code: "duplicate_request_id",
                kind: "invalid_request_error",
                message: "A request with this x-request-id is already in flight.",
                headers: &[],
            },
            Row {
                err: ApiError::InsufficientQuota {
                    endpoint: "gpt-4o".into(),
                    balance: 0,
                    required: 1,
                },
                status: 429,
                code: "insufficient_quota",
                kind: "insufficient_quota",
                message: "You exceeded your current quota: gpt-4o needs a credit balance of at \
                          least 1, you have 0. Please check your plan and billing details.",
                headers: &[("x-should-retry", "false")],
            },
            Row {
                err: ApiError::PayloadTooLarge { limit_bytes: 10 },
                status: 413,
                code: "payload_too_large",
                kind: "invalid_request_error",
                message: "Request body too large: the limit is 10 bytes.",
                headers: &[],
            },
            Row {
                err: ApiError::HeadersTooLarge,
                status: 431,
                code: "headers_too_large",
                kind: "invalid_request_error",
                message: "Request headers too large.",
                headers: &[],
            },
            Row {
                err: ApiError::LimiterUnavailable,
                status: 503,
                code: "limiter_unavailable",
                kind: "server_error",
                message: "The rate limiter is unavailable. Please try again shortly.",
                headers: &[],
            },
            Row {
                err: ApiError::UpstreamUnavailable,
                status: 502,
                code: "upstream_unavailable",
                kind: "server_error",
                message: "The upstream server could not be reached.",
                headers: &[],
            },
            Row {
                err: ApiError::UpstreamTimeout,
                status: 504,
                code: "upstream_timeout",
                kind: "server_error",
                message: "The upstream server did not answer in time.",
                headers: &[],
            },
            Row {
                err: ApiError::AdminUnauthorized,
                status: 401,
                code: "unauthorized",
                kind: "authentication_error",
                message: "Missing or invalid admin token.",
                headers: &[],
            },
            Row {
                err: ApiError::from(CatalogError::not_found("plan", "pro")),
                status: 404,
                code: "not_found",
                kind: "invalid_request_error",
                message: "plan not found: pro",
                headers: &[],
            },
            Row {
                err: ApiError::from(CatalogError::Conflict("plan pro is in use".into())),
                status: 409,
                code: "conflict",
                kind: "invalid_request_error",
                message: "plan pro is in use",
                headers: &[],
            },
            Row {
                err: ApiError::from(CatalogError::Invalid("credits must be positive".into())),
                status: 400,
                code: "invalid_request",
                kind: "invalid_request_error",
                message: "credits must be positive",
                headers: &[],
            },
            Row {
                err: ApiError::from(CatalogError::Unavailable("connection refused to 10.0.0.1".into())),
                status: 503,
                code: "catalog_unavailable",
                kind: "server_error",
                message: "The account catalog is unavailable. Please try again shortly.",
                headers: &[],
            },
            Row {
                err: ApiError::MethodNotAllowed,
                status: 405,
                code: "method_not_allowed",
                kind: "invalid_request_error",
                message: "Method not allowed for this path.",
                headers: &[],
            },
            Row {
                err: ApiError::Internal,
                status: 500,
                code: "internal_error",
                kind: "server_error",
                message: "Internal gateway error.",
                headers: &[],
            },
        ]
    }

    /// Every error header this module can add; a row must list exactly the
    /// ones it carries.
    const ALL_EXTRA: [&str; 3] = ["retry-after", "retry-after-ms", "x-should-retry"];

    #[tokio::test]
    async fn every_row_renders_status_code_type_message_and_headers() {
        for row in rows() {
            let resp: Response<Full<Bytes>> = row.err.to_response();
            let ctx = row.code;
            assert_eq!(resp.status().as_u16(), row.status, "{ctx}");
            assert_eq!(
                resp.headers().get(CONTENT_TYPE).unwrap(),
                "application/json",
                "{ctx}"
            );
            for name in ALL_EXTRA {
                let want = row
                    .headers
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| *v);
                let got = resp.headers().get(name).map(|v| v.to_str().unwrap());
                assert_eq!(got, want, "{ctx}: header {name}");
            }
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            // Only a parameter error names a parameter (and a missing
            // model, `model`, as OpenAI does).
            let param = match row.code {
                "invalid_request" if row.message.starts_with("group_by") => {
                    serde_json::json!("group_by")
                }
                "model_not_found" => serde_json::json!("model"),
                _ => serde_json::Value::Null,
            };
            let expected = serde_json::json!({"error": {
                "message": row.message,
                "type": row.kind,
                "param": param,
                "code": row.code,
            }});
            assert_eq!(json, expected, "{ctx}");
        }
    }

    #[test]
    fn rate_limited_response_carries_rate_limit_headers() {
        let info = RateLimitInfo {
            units: vec![UnitInfo {
                unit: Unit::new("token"),
                limit: 40_000,
                remaining: 10,
                reset_ms: 1_500,
                len: WindowLen::Fixed(60),
            }],
            concurrent: Some(ConcurrencyInfo {
                limit: 2,
                remaining: 0,
            }),
            windows: vec![],
        };
        let err = ApiError::from_denial(&Denial::Concurrency { limit: 2 }, "e");
        let resp: Response<Full<Bytes>> = err.to_response_with_info(&info);
        let h = resp.headers();
        assert_eq!(h["x-ratelimit-remaining-tokens"], "10");
        assert_eq!(h["x-ratelimit-reset-tokens"], "1.5s");
        assert_eq!(h["x-ratelimit-remaining-concurrency"], "0");
        assert_eq!(h["retry-after"], "1");
    }

    #[test]
    fn retry_after_rounds_up() {
        for (reset_ms, secs) in [
            (1, "1"),
            (999, "1"),
            (1_000, "1"),
            (1_001, "2"),
            (60_000, "60"),
        ] {
            let err = ApiError::RateLimited {
                endpoint: "e".into(),
                window: window(60, 1, "request"),
                used: 1,
                requested: 1,
                reset_ms,
            };
            let (_, h, _) = err.into_parts();
            assert_eq!(h["retry-after"], secs, "{reset_ms} ms");
            assert_eq!(h["retry-after-ms"], reset_ms.to_string().as_str());
        }
    }

    #[test]
    fn model_errors_are_invalid_requests() {
        let err = ApiError::from(crate::usage::ModelError::NotJson);
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        assert_eq!(err.code(), "invalid_request");
        assert!(err.message().contains("JSON"));
    }

    #[test]
    fn masking_never_shows_the_whole_key() {
        assert_eq!(mask_key(""), "…");
        assert_eq!(mask_key("short"), "…");
        assert_eq!(mask_key("pg_abcdefgh"), "pg_…");
        assert_eq!(mask_key("pg_abcdefghijklmnopqrstu"), "pg_abc…rstu");
        assert_eq!(mask_key("ключ-ключ-ключ-ключ-ключ"), "ключ-к…ключ");
    }

    #[test]
    fn messages_escape_hostile_input() {
        let err = ApiError::EndpointNotAllowed {
            endpoint: "a\"b\\c\n</script>".into(),
        };
        let json: serde_json::Value = serde_json::from_slice(&err.body()).unwrap();
        assert_eq!(
            json["error"]["message"],
            "no access to endpoint: a\"b\\c\n</script>"
        );
    }

    proptest! {
        #[test]
        fn masked_key_is_never_the_key(key in "\\PC{0,64}") {
            let masked = mask_key(&key);
            prop_assert!(!key.is_empty() && masked != key || key.is_empty());
            // At most 10 characters of the key are revealed, and never more
            // than half of it.
            let shown = masked.chars().filter(|c| *c != '…').count();
            prop_assert!(shown <= 10);
            prop_assert!(shown * 2 <= key.chars().count());
            let err = ApiError::invalid_api_key(&key);
            let body = String::from_utf8(err.body().to_vec()).unwrap();
            if key.chars().count() >= 10 {
                prop_assert!(!body.contains(&key));
            }
        }
    }
}
