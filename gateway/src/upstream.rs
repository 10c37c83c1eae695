//! Upstream HTTP clients: one pooled hyper client per configured upstream,
//! plain HTTP or HTTPS (rustls with the ring provider; system roots plus an
//! optional `ca_file`), and the URL/header rewriting of forwarded requests.

use std::io::BufReader;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::Upstream;
use crate::server::Body;

/// The pooled client of one upstream.
#[derive(Clone)]
pub struct UpstreamClient {
    pub name: String,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    /// Path prefix of the upstream URL without a trailing slash ("" for none).
    base_path: String,
    /// Replaces the client's credential upstream, when configured, sent in
    /// `auth_header`.
    pub auth: Option<HeaderValue>,
    pub auth_header: HeaderName,
    /// Response headers never forwarded to clients.
    drop_headers: Vec<Glob>,
    client: Client<HttpsConnector<HttpConnector>, Body>,
}

impl std::fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamClient")
            .field("name", &self.name)
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

impl UpstreamClient {
    /// Build the client for `up`. Fails on an unreadable `ca_file` or an
    /// unusable URL or credential.
    pub fn new(up: &Upstream) -> Result<Self, String> {
        let scheme = up
            .url
            .scheme()
            .cloned()
            .ok_or_else(|| format!("upstream {}: URL has no scheme", up.name))?;
        let authority = up
            .url
            .authority()
            .cloned()
            .ok_or_else(|| format!("upstream {}: URL has no host", up.name))?;
        let base_path = up.url.path().trim_end_matches('/').to_string();
        let auth =
            match &up.auth {
                Some(a) => Some(HeaderValue::from_str(a).map_err(|_| {
                    format!("upstream {}: auth is not a valid header value", up.name)
                })?),
                None => None,
            };
        let drop_headers = up
            .drop_response_headers
            .iter()
            .map(|g| Glob::new(g))
            .collect();
        let tls = client_tls_config(up.ca_file.as_deref())
            .map_err(|e| format!("upstream {}: {e}", up.name))?;
        let client = https_client(tls, Duration::from_secs(5), Duration::from_secs(60), 1024);
        Ok(Self {
            name: up.name.clone(),
            scheme,
            authority,
            base_path,
            auth,
            auth_header: up.auth_header.clone(),
            drop_headers,
            client,
        })
    }

    /// The upstream URL for a request path (+ query).
    pub fn uri_for(&self, path_and_query: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
        let pq = path_and_query.map(|p| p.as_str()).unwrap_or("/");
        let full = if self.base_path.is_empty() {
            pq.to_string()
        } else {
            format!("{}{}", self.base_path, pq)
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(full)
            .build()
    }

    pub fn client(&self) -> &Client<HttpsConnector<HttpConnector>, Body> {
        &self.client
    }
}

/// A pooled HTTP/1 + HTTP/2 client over plain TCP or rustls (`tls`), as
/// the upstreams and the webhook sender use it.
pub(crate) fn https_client<B>(
    tls: rustls::ClientConfig,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle_per_host: usize,
) -> Client<HttpsConnector<HttpConnector>, B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_all_versions()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(idle_timeout)
        .pool_max_idle_per_host(max_idle_per_host)
        .build(connector)
}

/// rustls client config: system roots (when any load) plus `ca_file`.
pub(crate) fn client_tls_config(
    ca_file: Option<&std::path::Path>,
) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let pem =
            std::fs::read(path).map_err(|e| format!("reading ca_file {}: {e}", path.display()))?;
        let mut added = 0;
        for cert in rustls_pemfile::certs(&mut BufReader::new(&pem[..])) {
            let cert = cert.map_err(|e| format!("ca_file {}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
            added += 1;
        }
        if added == 0 {
            return Err(format!("ca_file {}: no certificate found", path.display()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // ALPN (h2, http/1.1) is set by the hyper-rustls connector builder.
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

const HOP_COUNT: usize = 8;

/// Hop-by-hop headers (RFC 9110 §7.6.1) never forwarded in either direction.
pub const HOP_BY_HOP: [HeaderName; HOP_COUNT] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TRANSFER_ENCODING,
    header::TE,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    HeaderName::from_static("proxy-connection"),
];

/// A lower-case header-name pattern: `*` stands for any run of characters.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Glob {
    /// The literal pieces between the `*`s.
    parts: Vec<String>,
    starts_open: bool,
    ends_open: bool,
}

impl Glob {
    fn new(pattern: &str) -> Self {
        Self {
            parts: pattern
                .split('*')
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect(),
            starts_open: pattern.starts_with('*'),
            ends_open: pattern.ends_with('*'),
        }
    }

    fn matches(&self, name: &str) -> bool {
        let mut rest = name;
        let last = self.parts.len().wrapping_sub(1);
        for (i, part) in self.parts.iter().enumerate() {
            if i == 0 && !self.starts_open {
                let Some(r) = rest.strip_prefix(part.as_str()) else {
                    return false;
                };
                rest = r;
            } else if i == last && !self.ends_open {
                return rest.len() >= part.len() && rest.ends_with(part.as_str());
            } else {
                let Some(at) = rest.find(part.as_str()) else {
                    return false;
                };
                rest = &rest[at + part.len()..];
            }
        }
        self.ends_open || rest.is_empty() || (self.parts.is_empty() && self.starts_open)
    }
}

impl UpstreamClient {
    /// Remove the response headers this upstream must not show clients
    /// (`drop_response_headers`).
    pub fn drop_response_headers(&self, headers: &mut HeaderMap) {
        if self.drop_headers.is_empty() {
            return;
        }
        let doomed: Vec<HeaderName> = headers
            .keys()
            .filter(|name| self.drop_headers.iter().any(|g| g.matches(name.as_str())))
            .cloned()
            .collect();
        for name in doomed {
            headers.remove(&name);
        }
    }
}

/// Remove hop-by-hop headers, including any named by `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Runs twice per request. Most messages carry none of these, or only
    // `connection: keep-alive`: one pass over the (few) names present finds
    // out, instead of hashing all eight names into the map every time.
    let mut present = [false; HOP_COUNT];
    let mut names_others = false;
    for (name, value) in headers.iter() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present[i] = true;
            if *name == header::CONNECTION {
                names_others |= value.as_bytes().split(|b| *b == b',').any(|t| {
                    let t = t.trim_ascii();
                    !t.is_empty()
                        && !t.eq_ignore_ascii_case(b"keep-alive")
                        && !t.eq_ignore_ascii_case(b"close")
                });
            }
        }
    }
    if names_others {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn header_globs() {
        let cases = [
            ("x-litellm-*", "x-litellm-response-cost", true),
            ("x-litellm-*", "x-litellm-", true),
            ("x-litellm-*", "x-litellm", false),
            ("x-litellm-*", "y-x-litellm-a", false),
            ("openai-version", "openai-version", true),
            ("openai-version", "openai-versions", false),
            ("*-cost", "x-litellm-response-cost", true),
            ("*-cost", "x-cost-y", false),
            ("x-*-cost", "x-litellm-response-cost", true),
            ("x-*-cost", "x-cost", false),
            ("*", "anything", true),
            ("a*b*c", "abc", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "acb", false),
        ];
        for (pattern, name, want) in cases {
            assert_eq!(
                Glob::new(pattern).matches(name),
                want,
                "{pattern} vs {name}"
            );
        }
    }

    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<String> {
        let mut v: Vec<String> = h.keys().map(|k| k.as_str().to_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        // (headers in, header names left)
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
        let cases: &[Case] = &[
            (
                &[("content-type", "a"), ("x-request-id", "b")],
                &["content-type", "x-request-id"],
            ),
            (
                &[("connection", "keep-alive"), ("content-length", "5")],
                &["content-length"],
            ),
            (
                &[
                    ("connection", "close, X-Secret"),
                    ("x-secret", "1"),
                    ("keep-alive", "timeout=5"),
                    ("transfer-encoding", "chunked"),
                    ("te", "trailers"),
                    ("upgrade", "h2c"),
                    ("proxy-authorization", "Basic x"),
                    ("proxy-authenticate", "Basic"),
                    ("proxy-connection", "keep-alive"),
                    ("accept", "*/*"),
                ],
                &["accept"],
            ),
            (
                &[
                    ("connection", "Keep-Alive"),
                    ("connection", "x-a"),
                    ("x-a", "1"),
                    ("x-b", "2"),
                ],
                &["x-b"],
            ),
        ];
        for (input, expected) in cases {
            let mut h = map(input);
            strip_hop_by_hop(&mut h);
            assert_eq!(names(&h), *expected, "input {input:?}");
        }
    }
}
