//! Turning the serde mirror (`raw.rs`) into a checked [`Config`].
//!
//! Syntax errors, unknown keys and wrong types come from the TOML
//! deserializer and stop the load (there is no tree left to check); every
//! check after that runs to the end and reports all it finds.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::header::HeaderName;

use super::raw::{
    RawAdmin, RawConfig, RawNotify, RawRoute, RawServer, RawStorage, RawUpstream, RawUsage, Str,
};
use super::{
    defaults, parse_duration, parse_size, parse_value_source, substitute_env, AdminConfig,
    AuthConfig, CliView, Config, ConfigError, ConfigErrors, EndpointSource, LogConfig,
    OnStoreError, PlansConfig, PlansSource, Route, RoutePath, ServerConfig, StorageConfig,
    TlsFiles, Upstream, UsageConfig, ValueSource, MAX_REQUEST_BODY_BYTES, MAX_RETAIN_SECS,
    MAX_SETTING_SECS, MIN_RETAIN_SECS,
};
use super::{NotifyConfig, WebhookSecret, MIN_WEBHOOK_SECRET_BYTES};
use crate::plans::parse::{check_unit_name, MAX_ID_BYTES};
use crate::plans::{KnownUnits, Unit};

pub(super) fn build(
    text: &str,
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    let file = path.display().to_string();
    let raw: RawConfig = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => return Err(ConfigErrors(vec![serde_error(&file, text, &e)])),
    };
    let mut b = Builder {
        file,
        text,
        env,
        base: path.parent().map(Path::to_path_buf).unwrap_or_default(),
        errors: Vec::new(),
    };
    let server = b.server(raw.server.as_ref());
    let admin = raw.admin.as_ref().and_then(|a| b.admin(a, &server));
    let storage = b.storage(raw.storage.as_ref());
    let auth = b.auth(raw.auth.as_ref().and_then(|a| a.header.as_ref()));
    let plans = b.plans(raw.plans.as_ref());
    let usage = b.usage(raw.usage.as_ref());
    let log = LogConfig {
        access: raw.log.as_ref().and_then(|l| l.access).unwrap_or(true),
    };
    let notify = raw.notify.as_ref().and_then(|n| b.notify(n));
    let upstreams = b.upstreams(&raw.upstreams);
    let routes = b.routes(&raw.routes, &upstreams);
    if !b.errors.is_empty() {
        b.errors
            .sort_by_key(|e| (e.line.unwrap_or(0), e.column.unwrap_or(0)));
        return Err(ConfigErrors(b.errors));
    }
    Ok(Config {
        path: path.to_path_buf(),
        server,
        admin,
        storage,
        auth,
        plans,
        usage,
        log,
        notify,
        upstreams,
        routes,
    })
}

/// Only what admin commands read: `[storage]` and the routes' unit names
/// (see [`CliView`]). Other sections are deserialized (syntax, unknown
/// keys and types are still checked) but their values are not, so their
/// `${VAR}`s need not be set.
pub(super) fn build_cli_view(
    text: &str,
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<CliView, ConfigErrors> {
    let file = path.display().to_string();
    let raw: RawConfig = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => return Err(ConfigErrors(vec![serde_error(&file, text, &e)])),
    };
    let mut b = Builder {
        file,
        text,
        env,
        base: path.parent().map(Path::to_path_buf).unwrap_or_default(),
        errors: Vec::new(),
    };
    let storage = b.storage(raw.storage.as_ref());
    let plans = raw.plans.as_ref().map(|p| p.get_ref());
    let plans_source = b.plans_source(plans.and_then(|p| p.source.as_ref()));
    let plans_file = plans
        .and_then(|p| p.file.as_ref())
        .and_then(|f| b.path(f, "plans.file"));
    let mut units = Vec::new();
    for (i, r) in raw.routes.iter().enumerate() {
        for (kind, map) in [("usage", &r.usage), ("reserve", &r.reserve)] {
            for name in map.keys() {
                let key = format!("routes[{i}].{kind}.{}", name.get_ref());
                units.extend(b.unit(name, &key));
            }
        }
    }
    if !b.errors.is_empty() {
        b.errors
            .sort_by_key(|e| (e.line.unwrap_or(0), e.column.unwrap_or(0)));
        return Err(ConfigErrors(b.errors));
    }
    Ok(CliView {
        storage,
        known_units: KnownUnits::new(units),
        plans_source,
        plans_file,
    })
}

/// 1-based line and column (in characters) of a byte offset.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    // Step back to a char boundary so slicing cannot panic.
    let offset = (0..=offset)
        .rev()
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(0);
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

/// A deserializer error, located, with the key path worked out from the
/// table headers above it (the error itself does not carry the path).
fn serde_error(file: &str, text: &str, e: &toml::de::Error) -> ConfigError {
    let (line, column, key) = match e.span() {
        Some(span) => {
            let (line, col) = line_col(text, span.start);
            (Some(line), Some(col), key_path_at(text, span.start))
        }
        None => (None, None, String::new()),
    };
    ConfigError {
        file: file.to_string(),
        line,
        column,
        key,
        message: e.message().trim().to_string(),
    }
}

/// The dotted key path of the key or value at `offset`, from the nearest
/// `[table]` / `[[array]]` header above it and the `key =` on its line.
/// A best effort for block-style files, which is what config files are.
fn key_path_at(text: &str, offset: usize) -> String {
    let mut header = String::new();
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut last_key = String::new();
    let mut line_start = 0usize;
    for line in text.split_inclusive('\n') {
        let line_end = line_start + line.len();
        let trimmed = line.trim();
        let header_line = if let Some(rest) = trimmed.strip_prefix("[[") {
            rest.split("]]").next().map(|name| {
                let name = name.trim().to_string();
                let index = counts.entry(name.clone()).or_insert(0);
                let path = format!("{name}[{index}]");
                *index += 1;
                path
            })
        } else if let Some(rest) = trimmed.strip_prefix('[') {
            rest.split(']').next().map(|name| name.trim().to_string())
        } else {
            None
        };
        if let Some(path) = header_line {
            header = path;
            last_key.clear();
        } else if let Some((key, _)) = trimmed.split_once('=') {
            if !trimmed.starts_with('#') {
                last_key = key.trim().to_string();
            }
        }
        if offset < line_end {
            break;
        }
        line_start = line_end;
    }
    match (header.is_empty(), last_key.is_empty()) {
        (_, true) => header,
        (true, false) => last_key,
        (false, false) => format!("{header}.{last_key}"),
    }
}

struct Builder<'a> {
    file: String,
    text: &'a str,
    env: &'a dyn Fn(&str) -> Option<String>,
    /// The config file's directory: relative paths are resolved from here.
    base: PathBuf,
    errors: Vec<ConfigError>,
}

impl Builder<'_> {
    fn error_at(&mut self, span: Range<usize>, key: &str, message: impl Into<String>) {
        let (line, col) = line_col(self.text, span.start);
        self.errors.push(ConfigError {
            file: self.file.clone(),
            line: Some(line),
            column: Some(col),
            key: key.to_string(),
            message: message.into(),
        });
    }

    fn error_nowhere(&mut self, key: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.clone(),
            line: None,
            column: None,
            key: key.to_string(),
            message: message.into(),
        });
    }

    /// The value with `${VAR}`s substituted.
    fn string(&mut self, s: &Str, key: &str) -> Option<String> {
        match substitute_env(s.get_ref(), self.env) {
            Ok(v) => Some(v),
            Err(e) => {
                self.error_at(s.span(), key, e);
                None
            }
        }
    }

    fn nonempty(&mut self, s: &Str, key: &str) -> Option<String> {
        let v = self.string(s, key)?;
        if v.is_empty() {
            self.error_at(s.span(), key, "must not be empty");
            return None;
        }
        Some(v)
    }

    fn duration(&mut self, s: Option<&Str>, key: &str, default: Duration) -> Duration {
        let Some(s) = s else { return default };
        let Some(v) = self.string(s, key) else {
            return default;
        };
        match parse_duration(&v) {
            Ok(d) if d.is_zero() => {
                self.error_at(s.span(), key, "must be longer than 0");
                default
            }
            Ok(d) if d > Duration::from_secs(MAX_SETTING_SECS) => {
                self.error_at(
                    s.span(),
                    key,
                    format!("`{v}` is too long: must be at most {MAX_SETTING_SECS}s (1 day)"),
                );
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.error_at(s.span(), key, e);
                default
            }
        }
    }

    fn addr(&mut self, s: Option<&Str>, key: &str, default: &str) -> SocketAddr {
        let fallback = default
            .parse()
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)));
        let Some(s) = s else { return fallback };
        let Some(v) = self.string(s, key) else {
            return fallback;
        };
        match v.parse() {
            Ok(addr) => addr,
            Err(_) => {
                self.error_at(
                    s.span(),
                    key,
                    format!("`{v}` is not an IP address and port such as \"{default}\""),
                );
                fallback
            }
        }
    }

    /// A path, resolved relative to the config file's directory.
    fn path(&mut self, s: &Str, key: &str) -> Option<PathBuf> {
        let v = self.nonempty(s, key)?;
        Some(self.base.join(v))
    }

    fn server(&mut self, raw: Option<&RawServer>) -> ServerConfig {
        let listen = self.addr(
            raw.and_then(|r| r.listen.as_ref()),
            "server.listen",
            defaults::LISTEN,
        );
        let tls = self.tls_files(
            raw.and_then(|r| r.tls_cert.as_ref()),
            raw.and_then(|r| r.tls_key.as_ref()),
            "server",
        );
        let max_request_body = match raw.and_then(|r| r.max_request_body.as_ref()) {
            None => defaults::MAX_REQUEST_BODY,
            Some(v) => self
                .size(v, "server.max_request_body")
                .unwrap_or(defaults::MAX_REQUEST_BODY),
        };
        let request_timeout = self.duration(
            raw.and_then(|r| r.request_timeout.as_ref()),
            "server.request_timeout",
            Duration::from_secs(defaults::REQUEST_TIMEOUT_SECS),
        );
        let header_read_timeout = self.duration(
            raw.and_then(|r| r.header_read_timeout.as_ref()),
            "server.header_read_timeout",
            Duration::from_secs(defaults::HEADER_READ_TIMEOUT_SECS),
        );
        let body_read_timeout = self.duration(
            raw.and_then(|r| r.body_read_timeout.as_ref()),
            "server.body_read_timeout",
            Duration::from_secs(defaults::BODY_READ_TIMEOUT_SECS),
        );
        let mut size_or = |v: Option<&toml::Spanned<toml::Value>>, key: &str, default: u64| match v
        {
            None => default,
            Some(v) => self.size(v, key).unwrap_or(default),
        };
        let unadmitted_body_budget = size_or(
            raw.and_then(|r| r.unadmitted_body_budget.as_ref()),
            "server.unadmitted_body_budget",
            defaults::UNADMITTED_BODY_BUDGET,
        );
        let unadmitted_body_per_account = size_or(
            raw.and_then(|r| r.unadmitted_body_per_account.as_ref()),
            "server.unadmitted_body_per_account",
            defaults::UNADMITTED_BODY_PER_ACCOUNT,
        );
        ServerConfig {
            listen,
            tls,
            max_request_body,
            request_timeout,
            header_read_timeout,
            body_read_timeout,
            unadmitted_body_budget,
            unadmitted_body_per_account,
        }
    }

    fn size(&mut self, v: &toml::Spanned<toml::Value>, key: &str) -> Option<u64> {
        let parsed = match v.get_ref() {
            toml::Value::Integer(n) => u64::try_from(*n).map_err(|_| "must not be negative".into()),
            toml::Value::String(s) => match substitute_env(s, self.env) {
                Ok(s) => parse_size(&s),
                Err(e) => Err(e),
            },
            other => Err(format!(
                "expected a size such as \"10MiB\" or a number of bytes, found {}",
                other.type_str()
            )),
        };
        match parsed {
            Ok(0) => {
                self.error_at(v.span(), key, "must be at least 1 byte");
                None
            }
            Ok(n) if n > MAX_REQUEST_BODY_BYTES => {
                self.error_at(
                    v.span(),
                    key,
                    format!(
                        "{n} bytes is too large: must be at most {MAX_REQUEST_BODY_BYTES} (1 TiB)"
                    ),
                );
                None
            }
            Ok(n) => Some(n),
            Err(e) => {
                self.error_at(v.span(), key, e);
                None
            }
        }
    }

    /// `tls_cert` + `tls_key` of `section`: both or neither.
    fn tls_files(
        &mut self,
        cert: Option<&Str>,
        key: Option<&Str>,
        section: &str,
    ) -> Option<TlsFiles> {
        match (cert, key) {
            (Some(cert), Some(key)) => {
                let cert = self.path(cert, &format!("{section}.tls_cert"));
                let key = self.path(key, &format!("{section}.tls_key"));
                cert.zip(key).map(|(cert, key)| TlsFiles { cert, key })
            }
            (Some(only), None) => {
                self.error_at(
                    only.span(),
                    &format!("{section}.tls_cert"),
                    "`tls_cert` needs `tls_key` too (set both for HTTPS, or neither)",
                );
                None
            }
            (None, Some(only)) => {
                self.error_at(
                    only.span(),
                    &format!("{section}.tls_key"),
                    "`tls_key` needs `tls_cert` too (set both for HTTPS, or neither)",
                );
                None
            }
            (None, None) => None,
        }
    }

    fn admin(
        &mut self,
        spanned: &toml::Spanned<RawAdmin>,
        server: &ServerConfig,
    ) -> Option<AdminConfig> {
        let raw = spanned.get_ref();
        let listen = self.addr(raw.listen.as_ref(), "admin.listen", defaults::ADMIN_LISTEN);
        if listen == server.listen && listen.port() != 0 {
            if let Some(s) = &raw.listen {
                self.error_at(
                    s.span(),
                    "admin.listen",
                    "must differ from `server.listen` (the admin API has its own listener)",
                );
            }
        }
        let token = match &raw.token {
            Some(t) => self.nonempty(t, "admin.token"),
            None => {
                self.error_at(
                    spanned.span(),
                    "admin.token",
                    "missing: an [admin] section needs a `token` (e.g. \"${PLANGATE_ADMIN_TOKEN}\")",
                );
                None
            }
        };
        let metrics_token = raw
            .metrics_token
            .as_ref()
            .and_then(|t| self.nonempty(t, "admin.metrics_token"));
        if let (Some(m), Some(t), Some(raw_m)) = (&metrics_token, &token, &raw.metrics_token) {
            if m == t {
                self.error_at(
                    raw_m.span(),
                    "admin.metrics_token",
                    "must differ from `admin.token` (it is the read-only one)",
                );
            }
        }
        let tls = self.tls_files(raw.tls_cert.as_ref(), raw.tls_key.as_ref(), "admin");
        let console_session_ttl = self.duration(
            raw.console_session_ttl.as_ref(),
            "admin.console_session_ttl",
            Duration::from_secs(defaults::CONSOLE_SESSION_TTL_SECS),
        );
        Some(AdminConfig {
            listen,
            token: token?,
            metrics_token,
            tls,
            console: raw.console.unwrap_or(true),
            console_session_ttl,
        })
    }

    fn storage(&mut self, raw: Option<&RawStorage>) -> StorageConfig {
        let mut out = StorageConfig {
            postgres_url: None,
            redis_url: None,
            redis_cluster: Vec::new(),
            store_timeout: Duration::from_millis(defaults::STORE_TIMEOUT_MS),
            catalog_timeout: Duration::from_secs(defaults::CATALOG_TIMEOUT_SECS),
            on_store_error: OnStoreError::Open,
            require_at_start: false,
            spool: None,
            outbox_memory: defaults::OUTBOX_MEMORY,
        };
        let Some(raw) = raw else { return out };
        if let Some(v) = &raw.outbox_memory {
            if let Some(n) = self.size(v, "storage.outbox_memory") {
                out.outbox_memory = n;
            }
            if raw.redis_url.is_some() || raw.redis_cluster.is_some() {
                self.error_at(
                    v.span(),
                    "storage.outbox_memory",
                    "bounds the in-process counters' outbox; with Redis the outbox lives in Redis",
                );
            }
        }
        out.require_at_start = raw.require_at_start.unwrap_or(false);
        if let Some(s) = &raw.spool {
            out.spool = self.path(s, "storage.spool");
            if raw.redis_url.is_some() || raw.redis_cluster.is_some() {
                self.error_at(
                    s.span(),
                    "storage.spool",
                    "the spool keeps the in-process counters' outbox; with Redis the outbox lives in Redis",
                );
            }
        }
        if let Some(s) = &raw.postgres_url {
            out.postgres_url = self.nonempty(s, "storage.postgres_url");
            if let Some(url) = &out.postgres_url {
                if let Some((scheme, _)) = url.split_once("://") {
                    if scheme != "postgres" && scheme != "postgresql" {
                        self.error_at(
                            s.span(),
                            "storage.postgres_url",
                            format!("unsupported scheme `{scheme}` (use postgres://)"),
                        );
                    }
                }
            }
        }
        if let Some(s) = &raw.redis_url {
            out.redis_url = self.redis_url(s, "storage.redis_url");
        }
        if let Some(list) = &raw.redis_cluster {
            for (i, s) in list.iter().enumerate() {
                if let Some(url) = self.redis_url(s, &format!("storage.redis_cluster[{i}]")) {
                    out.redis_cluster.push(url);
                }
            }
            if let (Some(_), Some(first)) = (&raw.redis_url, list.first()) {
                self.error_at(
                    first.span(),
                    "storage.redis_cluster",
                    "set either `redis_url` or `redis_cluster`, not both",
                );
            }
        }
        out.store_timeout = self.duration(
            raw.store_timeout.as_ref(),
            "storage.store_timeout",
            out.store_timeout,
        );
        out.catalog_timeout = self.duration(
            raw.catalog_timeout.as_ref(),
            "storage.catalog_timeout",
            out.catalog_timeout,
        );
        if let Some(s) = &raw.on_store_error {
            match self.string(s, "storage.on_store_error").as_deref() {
                Some("open") => out.on_store_error = OnStoreError::Open,
                Some("closed") => out.on_store_error = OnStoreError::Closed,
                Some(other) => self.error_at(
                    s.span(),
                    "storage.on_store_error",
                    format!("`{other}` is neither \"open\" nor \"closed\""),
                ),
                None => {}
            }
        }
        out
    }

    fn redis_url(&mut self, s: &Str, key: &str) -> Option<String> {
        let url = self.nonempty(s, key)?;
        let scheme = url.split_once("://").map(|(scheme, _)| scheme);
        if !matches!(
            scheme,
            Some("redis" | "rediss" | "unix" | "redis+unix" | "valkey" | "valkeys")
        ) {
            self.error_at(
                s.span(),
                key,
                format!(
                    "`{}` is not a Redis URL (redis://host:port or rediss://...)",
                    crate::health::mask_url(&url)
                ),
            );
            return None;
        }
        Some(url)
    }

    fn auth(&mut self, header: Option<&Str>) -> AuthConfig {
        let fallback = HeaderName::from_static(defaults::AUTH_HEADER);
        let Some(s) = header else {
            return AuthConfig { header: fallback };
        };
        let header = self.header_name(s, "auth.header");
        AuthConfig {
            header: header.unwrap_or(fallback),
        }
    }

    /// A header name (lower-cased, as `HeaderName` keeps it).
    fn header_name(&mut self, s: &Str, key: &str) -> Option<HeaderName> {
        let v = self.nonempty(s, key)?;
        match HeaderName::from_bytes(v.as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                self.error_at(s.span(), key, format!("`{v}` is not a valid header name"));
                None
            }
        }
    }

    /// One header name, or a non-empty list of them.
    fn header_names(&mut self, v: &toml::Spanned<toml::Value>, key: &str) -> Vec<HeaderName> {
        let span = v.span();
        let as_str = |s: &String| toml::Spanned::new(span.clone(), s.clone());
        match v.get_ref() {
            toml::Value::String(s) => self.header_name(&as_str(s), key).into_iter().collect(),
            toml::Value::Array(items) if !items.is_empty() => {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    let item_key = format!("{key}[{i}]");
                    match item {
                        toml::Value::String(s) => {
                            if let Some(h) = self.header_name(&as_str(s), &item_key) {
                                if !out.contains(&h) {
                                    out.push(h);
                                }
                            }
                        }
                        other => self.error_at(
                            span.clone(),
                            &item_key,
                            format!("expected a header name, found {}", other.type_str()),
                        ),
                    }
                }
                out
            }
            other => {
                self.error_at(
                    span,
                    key,
                    format!(
                        "expected a header name such as \"x-api-key\" or a list of them, found {}",
                        if matches!(other, toml::Value::Array(_)) {
                            "an empty list"
                        } else {
                            other.type_str()
                        }
                    ),
                );
                Vec::new()
            }
        }
    }

    fn plans(&mut self, spanned: Option<&toml::Spanned<super::raw::RawPlans>>) -> PlansConfig {
        let mut out = PlansConfig {
            file: None,
            watch: true,
            source: PlansSource::File,
        };
        let Some(spanned) = spanned else {
            self.error_nowhere(
                "plans",
                "missing [plans] section (e.g. `[plans]` with `file = \"plans.yaml\"`)",
            );
            return out;
        };
        let raw = spanned.get_ref();
        out.source = self.plans_source(raw.source.as_ref());
        match &raw.file {
            Some(f) => out.file = self.path(f, "plans.file"),
            // Under "database" the plans need no file.
            None if out.source == PlansSource::Database => {}
            None => self.error_at(
                spanned.span(),
                "plans.file",
                "missing: the plans file, relative to this file (e.g. \"plans.yaml\"); \
                 only source = \"database\" runs without one",
            ),
        }
        out.watch = raw.watch.unwrap_or(true);
        out
    }

    fn plans_source(&mut self, raw: Option<&Str>) -> PlansSource {
        let Some(s) = raw else {
            return PlansSource::File;
        };
        match self.string(s, "plans.source").as_deref() {
            Some("file") => PlansSource::File,
            Some("database") => PlansSource::Database,
            Some(other) => {
                self.error_at(
                    s.span(),
                    "plans.source",
                    format!("`{other}` is not a plans source: \"file\" or \"database\""),
                );
                PlansSource::File
            }
            None => PlansSource::File,
        }
    }

    fn usage(&mut self, raw: Option<&RawUsage>) -> UsageConfig {
        let default = Duration::from_secs(defaults::USAGE_RETAIN_DAYS * 86_400);
        let mut out = UsageConfig {
            retain: default,
            record: raw.and_then(|r| r.record).unwrap_or(true),
        };
        let Some(s) = raw.and_then(|r| r.retain.as_ref()) else {
            return out;
        };
        let key = "usage.retain";
        let Some(v) = self.string(s, key) else {
            return out;
        };
        match parse_duration(&v) {
            Ok(d) if d < Duration::from_secs(MIN_RETAIN_SECS) => self.error_at(
                s.span(),
                key,
                format!("`{v}` is too short: usage is kept at least 1h (pruning runs hourly)"),
            ),
            Ok(d) if d > Duration::from_secs(MAX_RETAIN_SECS) => self.error_at(
                s.span(),
                key,
                format!("`{v}` is too long: must be at most {MAX_RETAIN_SECS}s (100 years)"),
            ),
            Ok(d) => out.retain = d,
            Err(e) => self.error_at(s.span(), key, e),
        }
        out
    }

    /// `[notify]`: a receiver URL and a signing secret (from the
    /// environment or a file, never from the config file itself, and never
    /// echoed in an error), delivery timings.
    fn notify(&mut self, spanned: &toml::Spanned<RawNotify>) -> Option<NotifyConfig> {
        let raw = spanned.get_ref();
        let url = match &raw.url {
            Some(u) => self.upstream_url(u, "notify.url"),
            None => {
                self.error_at(
                    spanned.span(),
                    "notify.url",
                    "missing: a [notify] section needs the `url` webhooks are POSTed to",
                );
                None
            }
        };
        let secret = match (&raw.secret_env, &raw.secret_file) {
            (Some(_), Some(f)) => {
                self.error_at(
                    f.span(),
                    "notify.secret_file",
                    "give either `secret_env` or `secret_file`, not both",
                );
                None
            }
            (Some(name), None) => {
                let var = self.nonempty(name, "notify.secret_env")?;
                match (self.env)(&var) {
                    Some(v) => Some((v.into_bytes(), name.span(), "notify.secret_env")),
                    None => {
                        self.error_at(
                            name.span(),
                            "notify.secret_env",
                            format!("the environment variable `{var}` is not set"),
                        );
                        None
                    }
                }
            }
            (None, Some(f)) => {
                let path = self.path(f, "notify.secret_file")?;
                match std::fs::read(&path) {
                    Ok(mut bytes) => {
                        while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                            bytes.pop();
                        }
                        Some((bytes, f.span(), "notify.secret_file"))
                    }
                    Err(e) => {
                        self.error_at(
                            f.span(),
                            "notify.secret_file",
                            format!("cannot read {}: {e}", path.display()),
                        );
                        None
                    }
                }
            }
            (None, None) => {
                self.error_at(
                    spanned.span(),
                    "notify.secret_env",
                    "missing: a [notify] section needs `secret_env` (the name of an environment \
                     variable) or `secret_file` holding the signing secret",
                );
                None
            }
        };
        let secret = secret.and_then(|(bytes, span, key)| {
            if bytes.len() < MIN_WEBHOOK_SECRET_BYTES {
                self.error_at(
                    span,
                    key,
                    format!(
                        "the signing secret is {} bytes; at least {MIN_WEBHOOK_SECRET_BYTES} are needed",
                        bytes.len()
                    ),
                );
                return None;
            }
            Some(WebhookSecret(bytes.into()))
        });
        let timeout = self.duration(
            raw.timeout.as_ref(),
            "notify.timeout",
            Duration::from_secs(defaults::NOTIFY_TIMEOUT_SECS),
        );
        let backoff = self.duration(
            raw.backoff.as_ref(),
            "notify.backoff",
            Duration::from_secs(defaults::NOTIFY_BACKOFF_SECS),
        );
        let max_backoff = self.duration(
            raw.max_backoff.as_ref(),
            "notify.max_backoff",
            Duration::from_secs(defaults::NOTIFY_MAX_BACKOFF_SECS),
        );
        if max_backoff < backoff {
            if let Some(s) = &raw.max_backoff {
                self.error_at(s.span(), "notify.max_backoff", "must be at least `backoff`");
            }
        }
        let max_attempts = match &raw.max_attempts {
            None => defaults::NOTIFY_MAX_ATTEMPTS,
            Some(n) => match u32::try_from(*n.get_ref()) {
                Ok(v @ 1..=1000) => v,
                _ => {
                    self.error_at(
                        n.span(),
                        "notify.max_attempts",
                        format!("`{}` must be from 1 to 1000", n.get_ref()),
                    );
                    defaults::NOTIFY_MAX_ATTEMPTS
                }
            },
        };
        let poll_interval = self.duration(
            raw.poll_interval.as_ref(),
            "notify.poll_interval",
            Duration::from_secs(defaults::NOTIFY_POLL_SECS),
        );
        let scan_interval = self.duration(
            raw.scan_interval.as_ref(),
            "notify.scan_interval",
            Duration::from_secs(defaults::NOTIFY_SCAN_SECS),
        );
        let mut retain = Duration::from_secs(defaults::NOTIFY_RETAIN_DAYS * 86_400);
        if let Some(s) = &raw.retain {
            if let Some(v) = self.string(s, "notify.retain") {
                match parse_duration(&v) {
                    Ok(d) if d < Duration::from_secs(MIN_RETAIN_SECS) => self.error_at(
                        s.span(),
                        "notify.retain",
                        format!("`{v}` is too short: notifications are kept at least 1h"),
                    ),
                    Ok(d) if d > Duration::from_secs(MAX_RETAIN_SECS) => self.error_at(
                        s.span(),
                        "notify.retain",
                        format!(
                            "`{v}` is too long: must be at most {MAX_RETAIN_SECS}s (100 years)"
                        ),
                    ),
                    Ok(d) => retain = d,
                    Err(e) => self.error_at(s.span(), "notify.retain", e),
                }
            }
        }
        let ca_file = match &raw.ca_file {
            Some(f) => Some(self.path(f, "notify.ca_file")?),
            None => None,
        };
        Some(NotifyConfig {
            url: url?,
            secret: secret?,
            timeout,
            backoff,
            max_backoff,
            max_attempts,
            poll_interval,
            scan_interval,
            retain,
            ca_file,
        })
    }

    fn upstreams(&mut self, raw: &[RawUpstream]) -> Vec<Upstream> {
        let mut out: Vec<Upstream> = Vec::new();
        for (i, u) in raw.iter().enumerate() {
            let key = format!("upstreams[{i}]");
            let name = self.nonempty(&u.name, &format!("{key}.name"));
            if let Some(n) = &name {
                if out.iter().any(|o| &o.name == n) {
                    self.error_at(
                        u.name.span(),
                        &format!("{key}.name"),
                        format!("duplicate upstream name `{n}`"),
                    );
                }
            }
            let url = self.upstream_url(&u.url, &format!("{key}.url"));
            let auth = u
                .auth
                .as_ref()
                .and_then(|a| self.string(a, &format!("{key}.auth")));
            let auth_header = u
                .auth_header
                .as_ref()
                .and_then(|h| self.header_name(h, &format!("{key}.auth_header")))
                .unwrap_or(http::header::AUTHORIZATION);
            let ca_file = u
                .ca_file
                .as_ref()
                .and_then(|f| self.path(f, &format!("{key}.ca_file")));
            let drop_response_headers = match &u.drop_response_headers {
                None => super::defaults::DROP_RESPONSE_HEADERS
                    .iter()
                    .map(|s| (*s).to_owned())
                    .collect(),
                Some(list) => list
                    .iter()
                    .enumerate()
                    .filter_map(|(j, g)| {
                        self.header_glob(g, &format!("{key}.drop_response_headers[{j}]"))
                    })
                    .collect(),
            };
            // A broken entry is still pushed (with a placeholder) so that
            // routes naming it are not also reported as unknown.
            out.push(Upstream {
                name: name.unwrap_or_else(|| u.name.get_ref().clone()),
                url: url.unwrap_or_else(|| http::Uri::from_static("http://invalid")),
                auth,
                auth_header,
                ca_file,
                drop_response_headers,
            });
        }
        out
    }

    /// A header-name glob: header-name characters and `*`, lower-cased.
    fn header_glob(&mut self, s: &Str, key: &str) -> Option<String> {
        let v = self.nonempty(s, key)?.to_ascii_lowercase();
        let ok = v
            .split('*')
            .all(|part| part.is_empty() || http::HeaderName::from_bytes(part.as_bytes()).is_ok());
        if ok {
            Some(v)
        } else {
            self.error_at(
                s.span(),
                key,
                format!("`{v}` is not a header name pattern (header-name characters and `*`)"),
            );
            None
        }
    }

    fn upstream_url(&mut self, s: &Str, key: &str) -> Option<http::Uri> {
        let v = self.nonempty(s, key)?;
        let problem = match v.parse::<http::Uri>() {
            Err(e) => format!("`{v}` is not a URL: {e}"),
            Ok(uri) => match (uri.scheme_str(), uri.authority()) {
                (Some("http" | "https"), Some(_)) if uri.query().is_some() => {
                    format!("`{v}`: an upstream URL must not have a query")
                }
                (Some("http" | "https"), Some(_)) => return Some(uri),
                (Some(other), _) => {
                    format!("`{v}`: unsupported scheme `{other}` (use http or https)")
                }
                (None, _) => format!("`{v}` must start with http:// or https://"),
            },
        };
        self.error_at(s.span(), key, problem);
        None
    }

    fn routes(&mut self, raw: &[RawRoute], upstreams: &[Upstream]) -> Vec<Route> {
        let mut out = Vec::new();
        let mut seen_paths: Vec<RoutePath> = Vec::new();
        for (i, r) in raw.iter().enumerate() {
            let key = format!("routes[{i}]");
            let path = self.route_path(&r.path, &format!("{key}.path"));
            if let Some(p) = &path {
                if seen_paths.contains(p) {
                    self.error_at(
                        r.path.span(),
                        &format!("{key}.path"),
                        format!("another route already has path `{}`", r.path.get_ref()),
                    );
                }
                seen_paths.push(p.clone());
            }
            let upstream = self.string(&r.upstream, &format!("{key}.upstream"));
            let upstream = upstream.and_then(|name| {
                let found = upstreams.iter().position(|u| u.name == name);
                if found.is_none() {
                    let known = upstreams
                        .iter()
                        .map(|u| format!("`{}`", u.name))
                        .collect::<Vec<_>>()
                        .join(", ");
                    let known = if known.is_empty() {
                        "none are defined".to_string()
                    } else {
                        format!("defined: {known}")
                    };
                    self.error_at(
                        r.upstream.span(),
                        &format!("{key}.upstream"),
                        format!("no upstream named `{name}` ({known})"),
                    );
                }
                found
            });
            let endpoint = self.endpoint(&r.endpoint, &format!("{key}.endpoint"));
            let auth_headers = r
                .auth_header
                .as_ref()
                .map(|h| self.header_names(h, &format!("{key}.auth_header")))
                .unwrap_or_default();
            let (usage, inject_include_usage) =
                self.usage_sources(&r.usage, &format!("{key}.usage"));
            let reserve = self.sources(&r.reserve, &format!("{key}.reserve"));
            let cap = self.cap(&r.cap, &reserve, &format!("{key}.cap"));
            for (unit, sources) in &reserve {
                if sources.iter().any(|s| matches!(s, ValueSource::Sum(_))) {
                    let key = format!("{key}.reserve.{}", unit.as_str());
                    let span = r
                        .reserve
                        .iter()
                        .find(|(n, _)| n.get_ref() == unit.as_str())
                        .map(|(_, v)| v.span())
                        .unwrap_or_default();
                    self.error_at(
                        span,
                        &key,
                        "a reservation is one number the request carries; sums (`+`) are for `usage`",
                    );
                }
            }
            if let (Some(path), Some(upstream), Some(endpoint)) = (path, upstream, endpoint) {
                out.push(Route {
                    path,
                    upstream,
                    endpoint,
                    auth_headers,
                    usage,
                    reserve,
                    inject_include_usage,
                    cap,
                });
            }
        }
        out
    }

    fn route_path(&mut self, s: &Str, key: &str) -> Option<RoutePath> {
        let v = self.nonempty(s, key)?;
        let problem = if !v.starts_with('/') {
            "a route path must start with `/`".to_string()
        } else if v.contains(['?', '#']) || v.contains(char::is_whitespace) {
            "a route path must not contain `?`, `#` or spaces".to_string()
        } else if let Some(prefix) = v.strip_suffix('*') {
            if prefix.ends_with('/') && !prefix.contains('*') {
                return Some(RoutePath::Prefix(prefix.to_string()));
            }
            "`*` is allowed only as the last segment, as in \"/v1/*\"".to_string()
        } else if v.contains('*') {
            "`*` is allowed only as the last segment, as in \"/v1/*\"".to_string()
        } else {
            return Some(RoutePath::Exact(v));
        };
        self.error_at(s.span(), key, problem);
        None
    }

    fn endpoint(&mut self, s: &Str, key: &str) -> Option<EndpointSource> {
        let v = self.nonempty(s, key)?;
        let problem = if v == "{model}" {
            return Some(EndpointSource::Model);
        } else if v.contains(['{', '}']) {
            format!("`{v}`: the only placeholder is `{{model}}`, and it must stand alone")
        } else if v.len() > MAX_ID_BYTES {
            format!(
                "endpoint id is {} bytes long; at most {MAX_ID_BYTES} bytes are allowed",
                v.len()
            )
        } else {
            return Some(EndpointSource::Literal(v));
        };
        self.error_at(s.span(), key, problem);
        None
    }

    fn unit(&mut self, name: &Str, key: &str) -> Option<Unit> {
        match check_unit_name(name.get_ref()) {
            Ok(()) => Some(Unit::new(name.get_ref())),
            Err(e) => {
                self.error_at(name.span(), key, e);
                None
            }
        }
    }

    fn source(&mut self, s: &str, span: Range<usize>, key: &str) -> Option<ValueSource> {
        let s = match substitute_env(s, self.env) {
            Ok(s) => s,
            Err(e) => {
                self.error_at(span, key, e);
                return None;
            }
        };
        match parse_value_source(&s) {
            Ok(v) => Some(v),
            Err(e) => {
                self.error_at(span, key, e);
                None
            }
        }
    }

    /// A route's `usage`: `usage.preset` (a built-in API shape, see
    /// [`crate::config::usage_preset`]) for `token`, and `usage.<unit>` keys
    /// (one for `token` replaces the preset's). Returns the sources and
    /// whether streamed requests get `include_usage` injected.
    fn usage_sources(
        &mut self,
        raw: &BTreeMap<Str, toml::Spanned<toml::Value>>,
        key: &str,
    ) -> (Vec<(Unit, Vec<ValueSource>)>, bool) {
        let mut units = raw.clone();
        let preset = units.remove("preset");
        let mut out = self.sources(&units, key);
        let Some(preset) = preset else {
            return (out, true);
        };
        let preset_key = format!("{key}.preset");
        let found = match preset.get_ref() {
            toml::Value::String(name) => crate::config::usage_preset(name).ok_or_else(|| {
                format!(
                    "unknown preset `{name}`; the presets are {}",
                    crate::config::USAGE_PRESETS
                )
            }),
            other => Err(format!(
                "expected a preset name (one of {}), found {}",
                crate::config::USAGE_PRESETS,
                other.type_str()
            )),
        };
        match found {
            Ok((sources, inject)) => {
                let token = Unit::new("token");
                if !out.iter().any(|(u, _)| *u == token) {
                    let sources = sources
                        .iter()
                        .map(|s| crate::config::parse_value_source(s).expect("presets parse"))
                        .collect();
                    out.push((token, sources));
                }
                (out, inject)
            }
            Err(e) => {
                self.error_at(preset.span(), &preset_key, e);
                (out, true)
            }
        }
    }

    /// `cap.<unit> = "<field>"`: at most one unit, whose `reserve` sources
    /// include `body:<field>` (a top-level field), so that the rewritten
    /// field is what the request reserves.
    fn cap(
        &mut self,
        raw: &BTreeMap<Str, toml::Spanned<String>>,
        reserve: &[(Unit, Vec<ValueSource>)],
        key: &str,
    ) -> Option<(Unit, String)> {
        let mut out = None;
        for (name, field) in raw {
            let key = format!("{key}.{}", name.get_ref());
            let unit = self.unit(name, &key)?;
            let f = field.get_ref();
            let problem = if out.is_some() {
                Some("a route caps one unit".to_string())
            } else if f.is_empty() || f.contains(['.', ' ']) {
                Some(format!(
                    "`{f}` is not a top-level body field such as `max_tokens`"
                ))
            } else if !reserve.iter().any(|(u, sources)| {
                *u == unit
                    && sources
                        .iter()
                        .any(|s| matches!(s, ValueSource::Body(p) if p.len() == 1 && p[0] == *f))
            }) {
                Some(format!(
                    "`{f}` must be what the request reserves: add \"body:{f}\" to reserve.{unit}"
                ))
            } else {
                None
            };
            match problem {
                Some(p) => self.error_at(field.span(), &key, p),
                None => out = Some((unit, f.clone())),
            }
        }
        out
    }

    /// `usage.<unit>` or `reserve.<unit>`: a source or a list of them.
    fn sources(
        &mut self,
        raw: &BTreeMap<Str, toml::Spanned<toml::Value>>,
        key: &str,
    ) -> Vec<(Unit, Vec<ValueSource>)> {
        let mut out = Vec::new();
        for (name, value) in raw {
            let key = format!("{key}.{}", name.get_ref());
            let unit = self.unit(name, &key);
            let span = value.span();
            let sources = match value.get_ref() {
                toml::Value::String(s) => self.source(s, span, &key).map(|v| vec![v]),
                toml::Value::Array(items) if !items.is_empty() => {
                    let mut sources = Vec::new();
                    let mut ok = true;
                    for (i, item) in items.iter().enumerate() {
                        let item_key = format!("{key}[{i}]");
                        match item {
                            toml::Value::String(s) => {
                                match self.source(s, span.clone(), &item_key) {
                                    Some(v) => sources.push(v),
                                    None => ok = false,
                                }
                            }
                            other => {
                                self.error_at(
                                    span.clone(),
                                    &item_key,
                                    format!("expected a string, found {}", other.type_str()),
                                );
                                ok = false;
                            }
                        }
                    }
                    ok.then_some(sources)
                }
                toml::Value::Array(_) => {
                    self.error_at(span, &key, "needs at least one source");
                    None
                }
                other => {
                    self.error_at(
                        span,
                        &key,
                        format!(
                            "expected a source such as \"body:usage.total_tokens\" or a list of them, found {}",
                            other.type_str()
                        ),
                    );
                    None
                }
            };
            if let (Some(unit), Some(sources)) = (unit, sources) {
                out.push((unit, sources));
            }
        }
        out
    }
}

/// Where the plans file would be, read from a config file that may fail
/// other checks, so `check-config` can report the plans file's problems
/// in the same run as the config's.
pub(crate) fn plans_file_hint(
    text: &str,
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<PathBuf> {
    let raw: RawConfig = toml::from_str(text).ok()?;
    let file = raw.plans?.into_inner().file?;
    let file = substitute_env(file.get_ref(), env).ok()?;
    if file.is_empty() {
        return None;
    }
    Some(path.parent().unwrap_or(Path::new("")).join(file))
}
