//! The access log: one line per response of the main listener, an INFO
//! event on the tracing target `plangate::access` (JSON like every other
//! line when the log is JSON, see `server::init_logging`).
//!
//! A line is written when its request is over: for an admitted request
//! when its body ended (or the client left) and it was settled, so the
//! units and credits it settled with are known; for any other when its
//! response was made. Whoever lets go of the [`AccessLine`] last writes
//! it, once (it is written on `Drop`): the request handler, or the
//! settlement travelling with the response body. A request whose client
//! left before its response was ready is logged with status 499.
//!
//! `[log] access = false` turns it off (`RouteTable::access_log`), and so
//! does `RUST_LOG=info,plangate::access=off`; either way no line is built.
//!
//! Invariant: a line names the caller by account and key id, never by the
//! key itself (nor any header value).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use http::Method;
use parking_lot::Mutex;

use crate::plans::Unit;

/// The tracing target of access-log lines.
pub const TARGET: &str = "plangate::access";

/// Whether an access-log line would be written now (`RUST_LOG` may filter
/// the target out). Cheap: tracing caches the answer per call site.
pub fn enabled() -> bool {
    tracing::enabled!(target: "plangate::access", tracing::Level::INFO)
}

/// What a line says besides the request id, method, path and latency;
/// filled in as the request goes.
#[derive(Debug)]
pub struct Fields {
    pub account: Option<String>,
    /// The id of the API key that authenticated the request.
    pub key_id: Option<String>,
    /// The endpoint, once the caller's plan has it (`_unknown` when not).
    pub endpoint: Option<String>,
    /// The status the client got.
    pub status: u16,
    /// The deciding stage, as `plangate_requests_total` labels it:
    /// `admitted`, `denied`, `no_credits`, `no_access`, an error code, ...
    pub decision: &'static str,
    /// The `error.code` of an error response.
    pub error: Option<&'static str>,
    /// The window that refused a request: `request/60s`.
    pub window: Option<String>,
    /// The units the request was settled with.
    pub units: Vec<(Unit, u64)>,
    /// Credits charged: the admission charge (unless refunded) plus the
    /// per-unit charge.
    pub credits: u64,
    /// The upstream's status, when it answered.
    pub upstream_status: Option<u16>,
    /// Admitted without the counter store (`on_store_error = "open"`).
    pub degraded: bool,
    /// Admitted by shadow mode (`enforce: false`): the `error.code` its
    /// limits would have refused it with.
    pub would_deny: Option<&'static str>,
    /// The response was an event stream.
    pub streamed: bool,
    /// The response body did not reach its end.
    pub cut_short: bool,
}

/// One request's access-log line, shared by the handler and the
/// settlement; written when the last of them drops it.
pub struct AccessLine {
    started: Instant,
    request_id: String,
    /// The request line, unless the edge guard refused the head.
    method: Option<Method>,
    path: Option<String>,
    fields: Mutex<Fields>,
}

impl AccessLine {
    /// A line for a request that started at `started` (`line`: its method
    /// and path, when it has a readable one). Until the handler says
    /// otherwise, the client left before its response (499).
    pub fn new(request_id: &str, line: Option<(&Method, &str)>, started: Instant) -> Arc<Self> {
        Arc::new(AccessLine {
            started,
            request_id: request_id.to_owned(),
            method: line.map(|(m, _)| m.clone()),
            path: line.map(|(_, p)| p.to_owned()),
            fields: Mutex::new(Fields {
                account: None,
                key_id: None,
                endpoint: None,
                status: 499,
                decision: "client_gone",
                error: None,
                window: None,
                units: Vec::new(),
                credits: 0,
                upstream_status: None,
                degraded: false,
                would_deny: None,
                streamed: false,
                cut_short: false,
            }),
        })
    }

    /// Fill in fields.
    pub fn note(&self, f: impl FnOnce(&mut Fields)) {
        f(&mut self.fields.lock());
    }
}

/// `token=67;image=1`, as `usage export --format csv` writes units.
fn units_text(units: &[(Unit, u64)]) -> Option<String> {
    if units.is_empty() {
        return None;
    }
    let mut out = String::new();
    for (i, (unit, n)) in units.iter().enumerate() {
        if i > 0 {
            out.push(';');
        }
        let _ = write!(out, "{}={n}", unit.as_str());
    }
    Some(out)
}

impl Drop for AccessLine {
    fn drop(&mut self) {
        let f = self.fields.get_mut();
        // Milliseconds with microsecond precision.
        let latency_ms = (self.started.elapsed().as_micros() as f64) / 1000.0;
        tracing::info!(
            target: "plangate::access",
            request_id = %self.request_id,
            method = self.method.as_ref().map(Method::as_str),
            path = self.path.as_deref(),
            account = f.account.as_deref(),
            key_id = f.key_id.as_deref(),
            endpoint = f.endpoint.as_deref(),
            status = f.status,
            decision = f.decision,
            error = f.error,
            window = f.window.as_deref(),
            units = units_text(&f.units).as_deref(),
            credits = f.credits,
            upstream_status = f.upstream_status,
            latency_ms,
            degraded = f.degraded,
            would_deny = f.would_deny,
            streamed = f.streamed,
            cut_short = f.cut_short,
            "request"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_read_like_the_csv_export() {
        assert_eq!(units_text(&[]), None);
        assert_eq!(
            units_text(&[(Unit::new("token"), 67), (Unit::new("image"), 1)]).as_deref(),
            Some("token=67;image=1")
        );
    }
}
