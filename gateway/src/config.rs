//! Checked configuration (SPEC §2), built from the serde mirror in
//! `config/raw.rs`. Everything here is valid by construction: durations are
//! `Duration`s, upstream URLs parsed, routes point at existing upstreams.

mod build;
pub mod raw;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::header::HeaderName;

use crate::plans::{KnownUnits, Unit};

/// One problem in a config or plans file, located as precisely as possible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file (as given, or a pseudo-name such as `<request body>`).
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// Dotted key path, e.g. `plans.free.endpoints.gpt-4o.fixed_windows[1].limit`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    /// `plans.yaml:14:9: plans.free.endpoints.gpt-4o.fixed_windows[1].limit: must be at least 1`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in one load, in file order. Never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// What to do when the counter store fails or times out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStoreError {
    /// Admit, marking responses `x-ratelimit-degraded: true`.
    Open,
    /// Refuse with 503 `limiter_unavailable`.
    Closed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub tls: Option<TlsFiles>,
    pub max_request_body: u64,
    pub request_timeout: Duration,
    pub header_read_timeout: Duration,
    /// Deadline for reading a request body the gateway must see before
    /// admission: 408 when it passes.
    pub body_read_timeout: Duration,
    /// Bytes of such bodies held at once, in all (503 beyond) and per
    /// account (429 beyond).
    pub unadmitted_body_budget: u64,
    pub unadmitted_body_per_account: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token: String,
    /// A read-only token: `GET /metrics` only.
    pub metrics_token: Option<String>,
    /// HTTPS for the admin listener.
    pub tls: Option<TlsFiles>,
    /// Serve the browser console under `/ui/` (`[admin] console`, default true).
    pub console: bool,
    /// How long a console (`/ui/`) sign-in lasts (default 8 h, at most 1 day).
    pub console_session_ttl: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageConfig {
    pub postgres_url: Option<String>,
    pub redis_url: Option<String>,
    pub redis_cluster: Vec<String>,
    pub store_timeout: Duration,
    /// Bound on every catalog (Postgres) call the gateway makes, and on
    /// opening a connection to it: past it the call fails as
    /// `CatalogError::Unavailable` (`catalog::timed`).
    pub catalog_timeout: Duration,
    pub on_store_error: OnStoreError,
    /// `serve` exits (1) when a configured store does not answer at start
    /// instead of starting not ready (`serve --require-stores` sets it too).
    pub require_at_start: bool,
    /// With in-process counters: the file that keeps their credit and
    /// usage outbox durable (`limiter::spool`); resolved relative to the
    /// config file's directory.
    pub spool: Option<PathBuf>,
    /// With in-process counters: past about this many bytes of outbox
    /// entries the catalog has not taken, admissions are refused (credit
    /// requests 503, others as `on_store_error` says), so memory stays
    /// bounded while Postgres is down or slow.
    pub outbox_memory: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// Lower-case header name. `authorization` means `Bearer KEY`; any
    /// other header carries the raw key.
    pub header: HeaderName,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlansConfig {
    /// Resolved relative to the config file's directory. Always set under
    /// `source = "file"`; optional under `"database"`.
    pub file: Option<PathBuf>,
    pub watch: bool,
    /// Who owns the plans: the file or the database.
    pub source: PlansSource,
}

/// `[plans] source`: the one place plans are changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PlansSource {
    /// The plans file (required) is the only source: `serve` applies it at start, on
    /// change (`watch`) and on SIGHUP; plan writes through the admin API
    /// and the CLI are refused (409, naming the file). The default.
    #[default]
    File,
    /// The database owns the plans: they change through the admin API and
    /// the CLI (`plans apply FILE` applies a file once). `serve` applies
    /// the plans file, if the config names one, only to a catalog that has
    /// no plan yet (the first start; always for the in-process catalog),
    /// never after, and does not watch it.
    Database,
}

impl PlansSource {
    /// The word used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            PlansSource::File => "file",
            PlansSource::Database => "database",
        }
    }
}

impl PlansConfig {
    /// Why a plan write (admin API, CLI) is refused: `Some` under
    /// `source = "file"`, naming the file.
    pub fn writes_refused(&self) -> Option<String> {
        refusal(self.source, self.file.as_deref())
    }
}

/// The message of a plan write refused because `file` owns the plans.
pub(crate) fn refusal(source: PlansSource, file: Option<&Path>) -> Option<String> {
    match source {
        PlansSource::Database => None,
        PlansSource::File => {
            let file = file
                .map(|f| f.display().to_string())
                .unwrap_or_else(|| "the plans file".into());
            Some(format!(
                "plans are managed by the plans file {file} ([plans] source = \"file\"): \
                 edit that file (gateways apply it on change and on SIGHUP), or set \
                 [plans] source = \"database\" to manage plans through the admin API and CLI"
            ))
        }
    }
}

/// `[usage]`: usage events (one per ended request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageConfig {
    /// Events that ended longer ago than this are deleted (hourly).
    pub retain: Duration,
    /// Record one event per admitted request (default true). Off saves the
    /// outbox entry and the catalog row per request (docs/PERFORMANCE.md).
    pub record: bool,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// One access-log line per request of the main listener (target
    /// `plangate::access`); default true.
    pub access: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub name: String,
    /// `http` or `https`, no query; the request path is appended to its path.
    pub url: http::Uri,
    /// Replaces the client's credential upstream (e.g. `Bearer sk-...`).
    pub auth: Option<String>,
    /// The header `auth` is sent in: `authorization` by default,
    /// `x-api-key` for Anthropic's API.
    pub auth_header: HeaderName,
    /// Extra CA bundle (PEM) for an https upstream, resolved like `plans.file`.
    pub ca_file: Option<PathBuf>,
    /// Response header names (lower-case globs, `*` for any run of
    /// characters) removed before a response reaches the client; by default
    /// [`defaults::DROP_RESPONSE_HEADERS`].
    pub drop_response_headers: Vec<String>,
}

/// How a route matches the request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoutePath {
    /// The whole path, exactly.
    Exact(String),
    /// `"/v1/*"` in the file: any path starting with `/v1/`.
    Prefix(String),
}

/// Where a route's endpoint id comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointSource {
    Literal(String),
    /// `{model}`: the `model` field of the JSON request body.
    Model,
}

/// Where a measured or reserved amount is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueSource {
    /// `header:x-total-tokens`
    Header(HeaderName),
    /// `body:usage.total_tokens`: a dotted path into the JSON body (or into
    /// SSE events for a stream).
    Body(Vec<String>),
    /// `body:usage.input_tokens + body:usage.output_tokens`: found when its
    /// first term is found; later terms not found count 0 (optional parts
    /// such as cache tokens). Terms are headers or body paths. Only for
    /// `usage` (a reservation is one number the client sent).
    Sum(Vec<ValueSource>),
}

impl ValueSource {
    /// Whether this source reads the body (a body path, or a sum with one).
    pub fn reads_body(&self) -> bool {
        match self {
            ValueSource::Header(_) => false,
            ValueSource::Body(_) => true,
            ValueSource::Sum(terms) => terms.iter().any(ValueSource::reads_body),
        }
    }
}

/// The built-in `usage.preset`s: per API shape, where the tokens of a
/// response are (JSON body and SSE stream alike), and whether streamed
/// requests get `stream_options.include_usage` injected.
///
/// - `openai-chat` (chat and legacy completions): `usage.total_tokens`;
///   include_usage injected.
/// - `openai-responses` (`/v1/responses`): `usage.total_tokens`, in a
///   stream the `response.completed` event's `response.usage.total_tokens`;
///   nothing injected (the Responses API always reports usage and refuses
///   `stream_options`).
/// - `anthropic-messages` (`/v1/messages`): input, output, cache creation
///   and cache read tokens (every token the upstream processed counts once,
///   whatever price tier it is billed at): from `usage` of the body (or of
///   a `message_delta` event that carries `input_tokens`), else from a
///   stream's last `message_delta` (`usage.output_tokens`, cumulative)
///   plus its `message_start` (`message.usage`: input and cache fields).
///   A stream cut before its `message_delta` reports nothing and is
///   settled like any cut stream (the prompt and the streamed text's
///   estimate, at least the reservation). Nothing injected.
pub fn usage_preset(name: &str) -> Option<(&'static [&'static str], bool)> {
    const CHAT: &[&str] = &["body:usage.total_tokens"];
    const RESPONSES: &[&str] = &[
        "body:usage.total_tokens",
        "body:response.usage.total_tokens",
    ];
    const ANTHROPIC: &[&str] = &[
        "body:usage.input_tokens + body:usage.output_tokens + body:usage.cache_creation_input_tokens + body:usage.cache_read_input_tokens",
        "body:usage.output_tokens + body:message.usage.input_tokens + body:message.usage.cache_creation_input_tokens + body:message.usage.cache_read_input_tokens",
    ];
    match name {
        "openai-chat" => Some((CHAT, true)),
        "openai-responses" => Some((RESPONSES, false)),
        "anthropic-messages" => Some((ANTHROPIC, false)),
        _ => None,
    }
}

/// The names [`usage_preset`] knows, for error messages.
pub const USAGE_PRESETS: &str = "openai-chat, openai-responses, anthropic-messages";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub path: RoutePath,
    /// Index into [`Config::upstreams`].
    pub upstream: usize,
    pub endpoint: EndpointSource,
    /// The headers the client's API key is read from on this route, the
    /// first the request carries (`auth_header`); empty: `[auth] header`.
    /// `authorization` means `Bearer KEY`, any other header the raw key
    /// (`x-api-key`, as Anthropic's SDKs before 2.0 send it).
    pub auth_headers: Vec<HeaderName>,
    /// Per unit, sources tried in order; the first that yields a number wins.
    pub usage: Vec<(Unit, Vec<ValueSource>)>,
    /// Per unit, the request-side amount reserved at admission: sources
    /// tried in order, the first that yields a number wins.
    pub reserve: Vec<(Unit, Vec<ValueSource>)>,
    /// Whether a streamed request that measures its body gets
    /// `stream_options.include_usage` injected (OpenAI chat and completions;
    /// not the Responses or Anthropic shapes: `usage.preset`).
    pub inject_include_usage: bool,
    /// `cap.<unit> = "<field>"` (fit instead of fail): a request asking for
    /// more of the unit than its windows have left, or asking nothing, is
    /// admitted with the top-level body field rewritten to what is left
    /// (at least 1). The field is one of the unit's `reserve` sources.
    pub cap: Option<(Unit, String)>,
}

/// The whole checked configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file it was read from.
    pub path: PathBuf,
    pub server: ServerConfig,
    pub admin: Option<AdminConfig>,
    pub storage: StorageConfig,
    pub auth: AuthConfig,
    pub plans: PlansConfig,
    pub usage: UsageConfig,
    pub log: LogConfig,
    /// `[notify]`: threshold notifications are delivered only with it.
    pub notify: Option<NotifyConfig>,
    pub upstreams: Vec<Upstream>,
    pub routes: Vec<Route>,
}

/// The secret webhooks are signed with. Never printed: `Debug` shows its
/// length only.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret(pub std::sync::Arc<[u8]>);

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WebhookSecret(<{} bytes>)", self.0.len())
    }
}

/// The shortest signing secret accepted, in bytes.
pub const MIN_WEBHOOK_SECRET_BYTES: usize = 16;

/// `[notify]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifyConfig {
    /// Where notifications are POSTed (http or https).
    pub url: http::Uri,
    pub secret: WebhookSecret,
    /// Per delivery attempt (connect + response head).
    pub timeout: Duration,
    /// The wait before the first retry; doubled at each further one.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// Attempts before a notification is marked failed.
    pub max_attempts: u32,
    /// How often the queue is read for due deliveries (real time).
    pub poll_interval: Duration,
    /// How often quota blocks are scanned for `expires_within` (real time).
    pub scan_interval: Duration,
    /// Delivered and failed notifications older than this are deleted.
    pub retain: Duration,
    /// Extra CA certificates for an https receiver.
    pub ca_file: Option<PathBuf>,
}

/// Defaults for settings the file may leave out.
pub mod defaults {
    /// `[server] listen`.
    pub const LISTEN: &str = "0.0.0.0:8080";
    /// `[admin] listen`.
    pub const ADMIN_LISTEN: &str = "127.0.0.1:9090";
    /// `[admin] console_session_ttl`: 8 hours.
    pub const CONSOLE_SESSION_TTL_SECS: u64 = 8 * 3600;
    /// `[server] max_request_body`: 10 MiB.
    pub const MAX_REQUEST_BODY: u64 = 10 * 1024 * 1024;
    /// `[server] request_timeout`, seconds.
    pub const REQUEST_TIMEOUT_SECS: u64 = 600;
    /// `[server] header_read_timeout`, seconds.
    pub const HEADER_READ_TIMEOUT_SECS: u64 = 10;
    /// `[server] body_read_timeout`, seconds.
    pub const BODY_READ_TIMEOUT_SECS: u64 = 30;
    /// `[server] unadmitted_body_budget`: 256 MiB.
    pub const UNADMITTED_BODY_BUDGET: u64 = 256 * 1024 * 1024;
    /// `[server] unadmitted_body_per_account`: 32 MiB.
    pub const UNADMITTED_BODY_PER_ACCOUNT: u64 = 32 * 1024 * 1024;
    /// `[storage] outbox_memory`: a usage record takes about 580 bytes
    /// (`in_process_outbox_is_bounded_while_postgres_is_down`: 14 in
    /// 8 KiB), so about 450,000 of them.
    pub const OUTBOX_MEMORY: u64 = 256 * 1024 * 1024;
    /// `[storage] store_timeout`, milliseconds.
    pub const STORE_TIMEOUT_MS: u64 = 50;
    /// `[storage] catalog_timeout`, seconds: well above a healthy catalog
    /// call (milliseconds; a plans apply or a batch of 1,024 credit
    /// operations is one transaction), well below the 5 s after which
    /// clients commonly give up.
    pub const CATALOG_TIMEOUT_SECS: u64 = 2;
    /// `[auth] header`.
    pub const AUTH_HEADER: &str = "authorization";
    /// `[usage] retain`, days.
    pub const USAGE_RETAIN_DAYS: u64 = 400;
    /// `[notify] timeout`, seconds.
    pub const NOTIFY_TIMEOUT_SECS: u64 = 10;
    /// `[notify] backoff`, seconds (doubled at each retry).
    pub const NOTIFY_BACKOFF_SECS: u64 = 10;
    /// `[notify] max_backoff`, seconds: 1 hour.
    pub const NOTIFY_MAX_BACKOFF_SECS: u64 = 3_600;
    /// `[notify] max_attempts`: with the defaults, retried for about a day.
    pub const NOTIFY_MAX_ATTEMPTS: u32 = 30;
    /// `[notify] poll_interval`, seconds.
    pub const NOTIFY_POLL_SECS: u64 = 1;
    /// `[notify] scan_interval`, seconds.
    pub const NOTIFY_SCAN_SECS: u64 = 300;
    /// `[notify] retain`, days.
    pub const NOTIFY_RETAIN_DAYS: u64 = 30;
    /// `[[upstreams]] drop_response_headers`: what upstreams say about
    /// themselves and the operator's account with them, which customers
    /// should not see — LiteLLM's cost, key spend, API base and provider
    /// headers; OpenAI's organization, project and timing; the upstream's
    /// own rate limits (plangate's `x-ratelimit-*` are added after).
    pub const DROP_RESPONSE_HEADERS: &[&str] = &[
        "x-litellm-*",
        "llm_provider-*",
        "openai-organization",
        "openai-project",
        "openai-processing-ms",
        "openai-version",
        "x-ratelimit-*",
        "anthropic-ratelimit-*",
    ];
}

/// The longest duration a setting may be (`request_timeout`,
/// `header_read_timeout`, `store_timeout`, `catalog_timeout`): one day. Longer ones are
/// refused; timers that far out only overflow.
pub const MAX_SETTING_SECS: u64 = 86_400;

/// The shortest `[usage] retain`: one hour (the pruning pass runs hourly).
pub const MIN_RETAIN_SECS: u64 = 3_600;
/// The longest `[usage] retain`: 100 years.
pub const MAX_RETAIN_SECS: u64 = 100 * 365 * 86_400;

/// The largest `max_request_body`: 1 TiB.
pub const MAX_REQUEST_BODY_BYTES: u64 = 1 << 40;

impl Config {
    /// Read, substitute `${VAR}`s, parse and check `path`. Collects every
    /// problem rather than stopping at the first.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = read_config(path)?;
        Config::from_toml(&text, path, &|name| std::env::var(name).ok())
    }

    /// Parse and check the text of a config file. `path` names it in errors
    /// and anchors relative paths (`plans.file`, TLS files, `ca_file`);
    /// `env` answers `${VAR}` look-ups (tests pass their own).
    pub fn from_toml(
        text: &str,
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        build::build(text, path, env)
    }

    /// Every header a client's key is read from: `[auth] header`, then
    /// each route's own `auth_header` not already named, in file order.
    pub fn key_headers(&self) -> Vec<HeaderName> {
        let mut out = vec![self.auth.header.clone()];
        for h in self.routes.iter().flat_map(|r| &r.auth_headers) {
            if !out.contains(h) {
                out.push(h.clone());
            }
        }
        out
    }

    /// The units plans may name under these routes: every `usage.<unit>`
    /// and `reserve.<unit>` of every route, plus `request`.
    pub fn known_units(&self) -> KnownUnits {
        KnownUnits::new(self.routes.iter().flat_map(|r| {
            r.usage
                .iter()
                .map(|(u, _)| u.clone())
                .chain(r.reserve.iter().map(|(u, _)| u.clone()))
        }))
    }
}

/// What the admin commands read of a config file: `[storage]`, and the
/// units its routes measure or reserve (to check plans against). The rest
/// of the file is parsed — syntax and unknown keys are still errors — but
/// not checked, so the secrets of other sections (`${PLANGATE_ADMIN_TOKEN}`,
/// an upstream's key) need not be set where only the catalog is managed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliView {
    pub storage: StorageConfig,
    pub known_units: KnownUnits,
    /// `[plans] source` (file when not set).
    pub plans_source: PlansSource,
    /// `[plans] file`, when the config names one.
    pub plans_file: Option<PathBuf>,
}

impl CliView {
    /// Why a plan write is refused under this config (see
    /// [`PlansConfig::writes_refused`]).
    pub fn plan_writes_refused(&self) -> Option<String> {
        refusal(self.plans_source, self.plans_file.as_deref())
    }
}

impl CliView {
    /// Read `path` for an admin command.
    pub fn load(path: &Path) -> Result<CliView, ConfigErrors> {
        let text = read_config(path)?;
        CliView::from_toml(&text, path, &|name| std::env::var(name).ok())
    }

    /// [`CliView::load`] of a config file's text (see [`Config::from_toml`]).
    pub fn from_toml(
        text: &str,
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<CliView, ConfigErrors> {
        build::build_cli_view(text, path, env)
    }
}

fn read_config(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.display().to_string(),
            line: None,
            column: None,
            key: String::new(),
            message: format!("cannot read: {e}"),
        }])
    })
}

/// The plans file a config file names, even when the config has other
/// errors (`None` if it cannot be told). For `check-config`, which reports
/// the problems of both files in one run.
pub fn plans_file_hint(path: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(path).ok()?;
    build::plans_file_hint(&text, path, &|name| std::env::var(name).ok())
}

/// Parse `"500ms"`, `"60s"`, `"5m"`, `"1h"`, `"1d"` (and `"86_400s"`, and
/// compound forms such as `"1h30m"`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t: String = s.trim().chars().filter(|c| *c != '_').collect();
    let shape =
        || format!("`{s}` is not a duration such as \"500ms\", \"60s\", \"5m\", \"1h\", \"1d\"");
    if t.is_empty() {
        return Err(shape());
    }
    let mut total_ms: u64 = 0;
    let mut rest = t.as_str();
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if num_end == 0 {
            return Err(shape());
        }
        let (num, after) = rest.split_at(num_end);
        let unit_end = after
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_end);
        let unit = unit.trim();
        if unit.is_empty() {
            return Err(format!("`{s}` has no unit (use ms, s, m, h or d)"));
        }
        let n: u64 = num
            .parse()
            .map_err(|_| format!("`{s}`: number out of range"))?;
        let ms_per = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => {
                return Err(format!(
                    "`{s}`: unknown unit `{unit}` (use ms, s, m, h or d)"
                ))
            }
        };
        total_ms = n
            .checked_mul(ms_per)
            .and_then(|ms| total_ms.checked_add(ms))
            .ok_or_else(|| format!("`{s}`: duration out of range"))?;
        rest = next;
    }
    Ok(Duration::from_millis(total_ms))
}

/// Parse a size: `"512"` (bytes), `"1KiB"`, `"10MiB"`, `"1GiB"` (powers of
/// 1024) or `"1KB"`, `"1MB"`, `"1GB"` (powers of 1000); `B` is optional,
/// case does not matter, and `_` separators are allowed.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t: String = s.trim().chars().filter(|c| *c != '_').collect();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "`{s}` is not a size such as \"512\", \"64KiB\", \"10MiB\" or \"1GB\""
        ));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}`: number out of range"))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        other => {
            return Err(format!(
                "`{s}`: unknown unit `{other}` (use B, KiB, MiB, GiB, KB, MB or GB)"
            ))
        }
    };
    n.checked_mul(multiplier)
        .ok_or_else(|| format!("`{s}`: size out of range"))
}

/// Replace every `${NAME}` in `s` with the variable's value from `env`.
/// `$${` stands for a literal `${`. An unset variable is an error naming it.
pub fn substitute_env(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix("${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('{') {
            let end = tail
                .find('}')
                .ok_or_else(|| format!("unterminated `${{` in `{s}`"))?;
            let name = &tail[..end];
            let valid = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!("`${{{name}}}` is not a valid variable name"));
            }
            let value =
                env(name).ok_or_else(|| format!("environment variable `{name}` is not set"))?;
            out.push_str(&value);
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Parse a value source: `header:<name>` or `body:<dotted.path>`.
pub fn parse_value_source(s: &str) -> Result<ValueSource, String> {
    if s.contains('+') {
        let terms = s
            .split('+')
            .map(|t| parse_value_term(t.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(ValueSource::Sum(terms));
    }
    parse_value_term(s)
}

/// One `header:` or `body:` source.
fn parse_value_term(s: &str) -> Result<ValueSource, String> {
    if let Some(name) = s.strip_prefix("header:") {
        return HeaderName::from_bytes(name.trim().as_bytes())
            .map(ValueSource::Header)
            .map_err(|_| format!("`{name}` is not a valid header name"));
    }
    if let Some(path) = s.strip_prefix("body:") {
        let segments: Vec<String> = path.trim().split('.').map(str::to_string).collect();
        if segments.iter().any(String::is_empty) {
            return Err(format!(
                "`{path}` is not a dotted JSON path such as `usage.total_tokens`"
            ));
        }
        return Ok(ValueSource::Body(segments));
    }
    Err(format!(
        "`{s}` is not a source: use \"header:<name>\" or \"body:<dotted.path>\", or a sum of them joined by `+`"
    ))
}

#[cfg(test)]
mod tests;
