//! serde mirrors of `plangate.toml` (deny_unknown_fields): the edge.
//!
//! Every value that is checked later is `Spanned`, so that the checks in
//! `config.rs` can say file:line:column. Strings stay strings here: `${VAR}`
//! substitution, durations, sizes and addresses are all checked after
//! deserialization, where every problem can be collected instead of
//! stopping at the first.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

/// A string value with its byte span in the file.
pub type Str = Spanned<String>;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub server: Option<RawServer>,
    pub admin: Option<Spanned<RawAdmin>>,
    pub storage: Option<RawStorage>,
    pub auth: Option<RawAuth>,
    pub plans: Option<Spanned<RawPlans>>,
    pub usage: Option<RawUsage>,
    pub log: Option<RawLog>,
    pub notify: Option<Spanned<RawNotify>>,
    #[serde(default)]
    pub upstreams: Vec<RawUpstream>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
}

/// `[server]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<Str>,
    pub tls_cert: Option<Str>,
    pub tls_key: Option<Str>,
    /// A size string (`"10MiB"`) or a number of bytes.
    pub max_request_body: Option<Spanned<toml::Value>>,
    pub request_timeout: Option<Str>,
    pub header_read_timeout: Option<Str>,
    pub body_read_timeout: Option<Str>,
    /// Sizes: bytes of request bodies read before admission, in all and
    /// per account.
    pub unadmitted_body_budget: Option<Spanned<toml::Value>>,
    pub unadmitted_body_per_account: Option<Spanned<toml::Value>>,
}

/// `[admin]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<Str>,
    pub token: Option<Str>,
    pub metrics_token: Option<Str>,
    pub tls_cert: Option<Str>,
    pub tls_key: Option<Str>,
    /// Serve the browser console under `/ui/` (default true).
    pub console: Option<bool>,
    /// How long a console sign-in lasts.
    pub console_session_ttl: Option<Str>,
}

/// `[storage]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStorage {
    pub postgres_url: Option<Str>,
    pub redis_url: Option<Str>,
    pub redis_cluster: Option<Vec<Str>>,
    pub store_timeout: Option<Str>,
    pub catalog_timeout: Option<Str>,
    pub on_store_error: Option<Str>,
    pub require_at_start: Option<bool>,
    /// The in-process store's durable outbox file.
    pub spool: Option<Str>,
    /// The most memory the in-process store's outbox may hold.
    pub outbox_memory: Option<Spanned<toml::Value>>,
}

/// `[auth]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    pub header: Option<Str>,
}

/// `[plans]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlans {
    pub file: Option<Str>,
    pub watch: Option<bool>,
    /// `"file"` or `"database"`: which one owns the plans.
    pub source: Option<Str>,
}

/// `[notify]`: where threshold notifications are delivered.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNotify {
    pub url: Option<Str>,
    /// The name of the environment variable holding the signing secret.
    pub secret_env: Option<Str>,
    /// A file holding the signing secret (trailing newline ignored).
    pub secret_file: Option<Str>,
    pub timeout: Option<Str>,
    pub backoff: Option<Str>,
    pub max_backoff: Option<Str>,
    pub max_attempts: Option<Spanned<i64>>,
    pub poll_interval: Option<Str>,
    pub scan_interval: Option<Str>,
    pub retain: Option<Str>,
    pub ca_file: Option<Str>,
}

/// `[usage]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUsage {
    /// How long usage events are kept (a duration, e.g. `"400d"`).
    pub retain: Option<Str>,
    /// Whether usage events are recorded.
    pub record: Option<bool>,
}

/// `[log]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    /// Whether the access log (one line per request) is written.
    pub access: Option<bool>,
}

/// `[[upstreams]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub name: Str,
    pub url: Str,
    pub auth: Option<Str>,
    /// The header `auth` is sent in (default `authorization`).
    pub auth_header: Option<Str>,
    pub ca_file: Option<Str>,
    /// Globs of response header names never forwarded to clients.
    pub drop_response_headers: Option<Vec<Str>>,
}

/// `[[routes]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub path: Str,
    pub upstream: Str,
    pub endpoint: Str,
    /// The header(s) the client's API key is read from on this route
    /// (default: `[auth] header`): a name or a list of names.
    pub auth_header: Option<Spanned<toml::Value>>,
    /// `usage.<unit> = "source"` or `["source", ...]`.
    #[serde(default)]
    pub usage: BTreeMap<Str, Spanned<toml::Value>>,
    /// `reserve.<unit> = "source"` or `["source", ...]`.
    #[serde(default)]
    pub reserve: BTreeMap<Str, Spanned<toml::Value>>,
    /// `cap.<unit> = "max_tokens"`: fit instead of fail.
    #[serde(default)]
    pub cap: BTreeMap<Str, Spanned<String>>,
}
