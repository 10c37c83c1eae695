//! The admin console: server-rendered HTML pages under `/ui/` on the admin
//! listener (same TLS and exposure as the admin API), its stylesheet and
//! script embedded in the binary.
//!
//! Sign-in takes the admin token once, in a POST form, and gives a random
//! session id in an `HttpOnly`, `SameSite=Strict` cookie (`Secure` under
//! TLS) that expires after `[admin] console_session_ttl`. Sessions live in
//! memory, keyed by the SHA-256 of their id; every POST form carries the
//! session's CSRF token and is refused without it. The token is never put
//! in a URL, a page or a log line. Every action is logged (WARN, target
//! `plangate::console`) with the account and what changed.

mod pages;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::admin::Admin;
use crate::query::percent_decode_bytes;
use crate::server::Body;

/// The session cookie.
const COOKIE: &str = "plangate_console";
/// The sign-in form's own CSRF cookie (double submit: no session yet).
const LOGIN_COOKIE: &str = "plangate_console_login";
/// Most sessions held at once; sign-in beyond it is refused (503).
const MAX_SESSIONS: usize = 10_000;
/// Largest form body.
const MAX_FORM: usize = 64 * 1024;

static CSS: &str = include_str!("console/console.css");
static JS: &str = include_str!("console/console.js");

/// Console settings from `[admin]`.
#[derive(Debug, Clone, Copy)]
pub struct ConsoleOptions {
    /// How long a session lasts from sign-in.
    pub session_ttl: Duration,
    /// Mark cookies `Secure` (the admin listener serves TLS).
    pub secure: bool,
}

impl Default for ConsoleOptions {
    fn default() -> Self {
        Self {
            session_ttl: Duration::from_secs(8 * 3600),
            secure: false,
        }
    }
}

struct Session {
    csrf: String,
    expires_ms: u64,
}

/// The console's sessions.
pub struct Console {
    opts: ConsoleOptions,
    sessions: Mutex<HashMap<[u8; 32], Session>>,
}

fn random_token() -> String {
    use std::fmt::Write as _;
    let bytes: [u8; 32] = rand::random();
    let mut s = String::with_capacity(64);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn digest(sid: &str) -> [u8; 32] {
    Sha256::digest(sid.as_bytes()).into()
}

impl Console {
    pub fn new(opts: ConsoleOptions) -> Self {
        Self {
            opts,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// A new session: (id, CSRF token); `None` when too many are live.
    fn open(&self, now_ms: u64) -> Option<(String, String)> {
        let mut map = self.sessions.lock();
        map.retain(|_, s| s.expires_ms > now_ms);
        if map.len() >= MAX_SESSIONS {
            return None;
        }
        let (sid, csrf) = (random_token(), random_token());
        let ttl = self.opts.session_ttl.as_millis() as u64;
        map.insert(
            digest(&sid),
            Session {
                csrf: csrf.clone(),
                expires_ms: now_ms.saturating_add(ttl),
            },
        );
        Some((sid, csrf))
    }

    /// The CSRF token of a live session; an expired one is dropped.
    fn csrf_of(&self, sid: &str, now_ms: u64) -> Option<String> {
        let key = digest(sid);
        let mut map = self.sessions.lock();
        match map.get(&key) {
            Some(s) if s.expires_ms > now_ms => Some(s.csrf.clone()),
            Some(_) => {
                map.remove(&key);
                None
            }
            None => None,
        }
    }

    fn close(&self, sid: &str) {
        self.sessions.lock().remove(&digest(sid));
    }

    fn cookie(&self, name: &str, value: &str, max_age_s: u64) -> HeaderValue {
        let secure = if self.opts.secure { "; Secure" } else { "" };
        HeaderValue::from_str(&format!(
            "{name}={value}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={max_age_s}{secure}"
        ))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An HTML page with the console's security headers.
pub(crate) fn html(status: StatusCode, body: String) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

/// 303 to `location` (after a POST, or to the sign-in page).
pub(crate) fn see_other(location: &str) -> Response<Body> {
    let mut resp = Response::new(full(Bytes::new()));
    *resp.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(v) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn asset(body: &'static str, content_type: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(Bytes::from_static(body.as_bytes())));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    resp
}

/// The value of cookie `name` in the request, if sent.
fn cookie_value<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A decoded `application/x-www-form-urlencoded` body.
#[derive(Debug, Default)]
pub(crate) struct Form(Vec<(String, String)>);

impl Form {
    fn parse(body: &[u8]) -> Form {
        let text = String::from_utf8_lossy(body);
        let decode = |s: &str| {
            String::from_utf8_lossy(&percent_decode_bytes(&s.replace('+', " "))).into_owned()
        };
        Form(
            text.split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (decode(k), decode(v))
                })
                .collect(),
        )
    }

    /// The first value of `name`, trimmed; `None` when absent or empty.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    }
}

async fn read_form(req: Request<Incoming>) -> Option<Form> {
    let body = Limited::new(req.into_body(), MAX_FORM)
        .collect()
        .await
        .ok()?;
    Some(Form::parse(&body.to_bytes()))
}

fn ct_eq(a: &str, b: &str) -> bool {
    !b.is_empty() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// What a signed-in request carries to the pages.
pub(crate) struct Ctx<'a> {
    pub admin: &'a Admin,
    pub csrf: String,
    pub now_ms: u64,
}

/// Handle a request under `/ui`.
pub async fn handle(admin: &Admin, console: &Console, req: Request<Incoming>) -> Response<Body> {
    let now_ms = admin.core().limiter.clock().now_ms();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    match (&method, path.as_str()) {
        (&Method::GET, "/ui") => return see_other("/ui/"),
        (&Method::GET, "/ui/static/console.css") => return asset(CSS, "text/css; charset=utf-8"),
        (&Method::GET, "/ui/static/console.js") => {
            return asset(JS, "text/javascript; charset=utf-8")
        }
        (&Method::GET, "/ui/login") => {
            let nonce = random_token();
            let note = if query.contains("expired=1") {
                Some("Your session expired: sign in again.")
            } else {
                None
            };
            let mut resp = html(StatusCode::OK, pages::login(&nonce, note, None));
            resp.headers_mut().append(
                header::SET_COOKIE,
                console.cookie(LOGIN_COOKIE, &nonce, 600),
            );
            return resp;
        }
        (&Method::POST, "/ui/login") => {
            let nonce = cookie_value(&req, LOGIN_COOKIE).map(str::to_owned);
            let Some(form) = read_form(req).await else {
                return html(
                    StatusCode::BAD_REQUEST,
                    pages::error_page("The form could not be read."),
                );
            };
            let fresh = random_token();
            let retry = |status, msg: &str| {
                let mut resp = html(status, pages::login(&fresh, None, Some(msg)));
                resp.headers_mut().append(
                    header::SET_COOKIE,
                    console.cookie(LOGIN_COOKIE, &fresh, 600),
                );
                resp
            };
            let csrf_ok = match (nonce.as_deref(), form.get("csrf")) {
                (Some(n), Some(c)) => ct_eq(c, n),
                _ => false,
            };
            if !csrf_ok {
                tracing::warn!(target: "plangate::console", "console sign-in refused: missing or wrong CSRF token");
                return retry(
                    StatusCode::FORBIDDEN,
                    "The form expired or was not sent by this page: try again.",
                );
            }
            if !ct_eq(form.get("token").unwrap_or(""), admin.token()) {
                tracing::warn!(target: "plangate::console", "console sign-in refused: wrong admin token");
                return retry(StatusCode::UNAUTHORIZED, "Wrong admin token.");
            }
            let Some((sid, _)) = console.open(now_ms) else {
                return retry(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Too many console sessions are open: try again later.",
                );
            };
            tracing::warn!(target: "plangate::console", "console: signed in");
            let mut resp = see_other("/ui/");
            let ttl_s = console.opts.session_ttl.as_secs().max(1);
            let h = resp.headers_mut();
            h.append(header::SET_COOKIE, console.cookie(COOKIE, &sid, ttl_s));
            h.append(header::SET_COOKIE, console.cookie(LOGIN_COOKIE, "", 0));
            return resp;
        }
        _ => {}
    }
    // Everything else needs a live session.
    let sid = cookie_value(&req, COOKIE).map(str::to_owned);
    let csrf = sid.as_deref().and_then(|s| console.csrf_of(s, now_ms));
    let Some(csrf) = csrf else {
        return if sid.as_deref().is_some_and(|s| !s.is_empty()) {
            see_other("/ui/login?expired=1")
        } else {
            see_other("/ui/login")
        };
    };
    let ctx = Ctx {
        admin,
        csrf,
        now_ms,
    };
    let segments: Vec<String> = path
        .trim_start_matches("/ui")
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(&percent_decode_bytes(s)).into_owned())
        .collect();
    if segments.iter().any(|s| s.chars().any(char::is_control)) {
        return html(
            StatusCode::BAD_REQUEST,
            pages::error_page("Ids must not contain control characters."),
        );
    }
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    if method == Method::POST {
        let Some(form) = read_form(req).await else {
            return html(
                StatusCode::BAD_REQUEST,
                pages::error_page("The form could not be read."),
            );
        };
        if !ct_eq(form.get("csrf").unwrap_or(""), &ctx.csrf) {
            tracing::warn!(target: "plangate::console", path = %path, "console: POST refused: missing or wrong CSRF token");
            return html(
                StatusCode::FORBIDDEN,
                pages::error_page(
                    "Refused: this form did not carry the console's CSRF token. Reload the page and try again.",
                ),
            );
        }
        if segs == ["logout"] {
            if let Some(s) = &sid {
                console.close(s);
            }
            tracing::warn!(target: "plangate::console", "console: signed out");
            let mut resp = see_other("/ui/login");
            resp.headers_mut()
                .append(header::SET_COOKIE, console.cookie(COOKIE, "", 0));
            return resp;
        }
        return pages::post(&ctx, &segs, &form).await;
    }
    if method != Method::GET && method != Method::HEAD {
        return html(
            StatusCode::METHOD_NOT_ALLOWED,
            pages::error_page("Method not allowed."),
        );
    }
    pages::get(&ctx, &segs, &query).await
}

/// `s` with `&`, `<`, `>`, `"` and `'` escaped for HTML text and attributes.
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `s` percent-encoded for a path segment or query value.
pub(crate) fn enc(s: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_encodes() {
        assert_eq!(
            esc(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(enc("acct 1/é"), "acct%201%2F%C3%A9");
        let f = Form::parse(b"a=1+2&b=%2Fx&c=&d");
        assert_eq!(f.get("a"), Some("1 2"));
        assert_eq!(f.get("b"), Some("/x"));
        assert_eq!(f.get("c"), None);
        assert_eq!(f.get("d"), None);
    }

    #[test]
    fn sessions_expire_and_close() {
        let c = Console::new(ConsoleOptions {
            session_ttl: Duration::from_secs(60),
            secure: true,
        });
        let (sid, csrf) = c.open(1_000).unwrap();
        assert_eq!(c.csrf_of(&sid, 60_999).as_deref(), Some(csrf.as_str()));
        assert_eq!(c.csrf_of(&sid, 61_000), None);
        assert_eq!(c.csrf_of(&sid, 1_000), None, "an expired session is gone");
        let (sid, _) = c.open(1_000).unwrap();
        c.close(&sid);
        assert_eq!(c.csrf_of(&sid, 1_001), None);
        assert_eq!(c.csrf_of("nope", 1_001), None);
        let cookie = c.cookie(COOKIE, "abc", 60);
        let cookie = cookie.to_str().unwrap();
        assert!(
            cookie.contains("HttpOnly")
                && cookie.contains("SameSite=Strict")
                && cookie.ends_with("; Secure")
        );
    }
}
