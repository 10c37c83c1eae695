//! Store reachability, said loudly and precisely. Owns the masked form of
//! store URLs that logs and messages use, the start-up check of the
//! configured stores (`[storage] require_at_start`, `serve
//! --require-stores`), the background watch that logs an unreachable store
//! at ERROR when it goes down and again every [`REPEAT_EVERY`] while it
//! stays down and sets `plangate_store_up`, and the probes of
//! `check-config --connect`.
//!
//! A wrong `redis_url` with `on_store_error = "open"` turns every limit
//! off; a wrong `postgres_url` answers 503 to everything. Neither may be a
//! single line at start-up that scrolls away.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crate::config::{OnStoreError, StorageConfig};
use crate::limiter::redis::{RedisOptions, RedisStore};
use crate::limiter::StoreError;
use crate::proxy::Core;

/// How often an unreachable store is logged again while it stays down.
pub const REPEAT_EVERY: Duration = Duration::from_secs(30);

/// How often the watch probes every external store.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);

/// How long one probe may take before the store counts as unreachable
/// (also the connect and reply timeouts of a probe's own connection).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// `url` with its password replaced by `***`: in the user-info of a URL
/// (`redis://:pw@host`, `postgres://user:pw@host/db`), in query parameters
/// (`?password=`, `?pass=`) and in the key-value form of a Postgres
/// connection string (`host=h password=pw`). Everything else is kept, so
/// the operator can spot a typo in the host, port or database.
pub fn mask_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return mask_key_values(url);
    };
    let query_at = rest.find(['?', '#']).unwrap_or(rest.len());
    let (head, tail) = rest.split_at(query_at);
    // The last `@` before the query ends the user-info: an unencoded `@`
    // or `/` in a password must not leak the rest of it.
    let head = match head.rfind('@') {
        Some(at) => {
            let (userinfo, host) = head.split_at(at);
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:***{host}"),
                None => head.to_owned(),
            }
        }
        None => head.to_owned(),
    };
    format!("{scheme}://{head}{}", mask_query(tail))
}

fn is_secret_param(name: &str) -> bool {
    let name = name.trim().to_ascii_lowercase();
    name == "pass" || name.contains("password")
}

/// `?a=1&password=x#frag` with every secret parameter's value masked.
fn mask_query(tail: &str) -> String {
    let Some(query) = tail.strip_prefix('?') else {
        return tail.to_owned();
    };
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, format!("#{f}")),
        None => (query, String::new()),
    };
    let params: Vec<String> = query
        .split('&')
        .map(|p| match p.split_once('=') {
            Some((name, _)) if is_secret_param(name) => format!("{name}=***"),
            _ => p.to_owned(),
        })
        .collect();
    format!("?{}{fragment}", params.join("&"))
}

/// `host=h password='p w' dbname=d` with the password's value masked.
fn mask_key_values(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(eq) = rest.find('=') {
        let (before, after) = rest.split_at(eq);
        let key_start = before.rfind(char::is_whitespace).map_or(0, |i| {
            i + before[i..].chars().next().map_or(1, char::len_utf8)
        });
        out.push_str(before);
        out.push('=');
        let after = &after[1..];
        if !is_secret_param(&before[key_start..]) {
            rest = after;
            continue;
        }
        // The value: quoted (backslash escapes) or up to the next space.
        let value_end = if let Some(quoted) = after.strip_prefix('\'') {
            let mut escaped = false;
            let mut end = after.len();
            for (i, c) in quoted.char_indices() {
                match c {
                    _ if escaped => escaped = false,
                    '\\' => escaped = true,
                    '\'' => {
                        end = i + 2;
                        break;
                    }
                    _ => {}
                }
            }
            end
        } else {
            after.find(char::is_whitespace).unwrap_or(after.len())
        };
        out.push_str("***");
        rest = &after[value_end..];
    }
    out.push_str(rest);
    out
}

/// Which external store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// The counter store: Redis, Valkey, Garnet or a Redis Cluster.
    Redis,
    /// The catalog.
    Postgres,
}

impl StoreKind {
    /// The `store` label of `plangate_store_up`, and the name in messages.
    pub fn label(self) -> &'static str {
        match self {
            StoreKind::Redis => "redis",
            StoreKind::Postgres => "postgres",
        }
    }
}

/// A configured external store, as logs and messages name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreTarget {
    pub kind: StoreKind,
    /// The config key that names it, e.g. `[storage] redis_url`.
    pub key: &'static str,
    /// Its URL (a cluster's node URLs, comma-separated), password masked.
    pub address: String,
}

impl StoreTarget {
    /// The external stores `storage` names: Postgres first, then Redis.
    pub fn of(storage: &StorageConfig) -> Vec<StoreTarget> {
        let mut out = Vec::new();
        if let Some(url) = &storage.postgres_url {
            out.push(StoreTarget {
                kind: StoreKind::Postgres,
                key: "[storage] postgres_url",
                address: mask_url(url),
            });
        }
        if let Some(url) = &storage.redis_url {
            out.push(StoreTarget {
                kind: StoreKind::Redis,
                key: "[storage] redis_url",
                address: mask_url(url),
            });
        } else if !storage.redis_cluster.is_empty() {
            let nodes: Vec<String> = storage.redis_cluster.iter().map(|u| mask_url(u)).collect();
            out.push(StoreTarget {
                kind: StoreKind::Redis,
                key: "[storage] redis_cluster",
                address: nodes.join(", "),
            });
        }
        out
    }
}

impl std::fmt::Display for StoreTarget {
    /// `[storage] postgres_url postgres://u:***@host:5432/db`: how
    /// messages name a store.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.key, self.address)
    }
}

/// Lets a repeated log line through once per period and counts the ones
/// it held back. Time is passed in, so the decision is a pure function.
#[derive(Debug, Clone)]
pub struct LogThrottle {
    every: Duration,
    last: Option<Instant>,
    held: u64,
}

impl LogThrottle {
    pub fn new(every: Duration) -> Self {
        LogThrottle {
            every,
            last: None,
            held: 0,
        }
    }

    /// `Some(lines held back since the last one)` if a line may be logged
    /// at `now`; `None` (and one more held back) if not.
    pub fn ready(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                self.held += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held))
            }
        }
    }

    /// Forget the last line: the next one goes through at once.
    pub fn reset(&mut self) {
        self.last = None;
        self.held = 0;
    }
}

/// What the watch says after one probe of one store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The store went down (first failed probe after success or start).
    Down,
    /// Still down, `for_` since the first failed probe: the periodic repeat.
    StillDown { for_: Duration },
    /// Answering again after `after` down.
    Back { after: Duration },
}

/// One store's standing across probes.
#[derive(Debug, Clone)]
pub struct Standing {
    down_since: Option<Instant>,
    repeat: LogThrottle,
}

impl Default for Standing {
    fn default() -> Self {
        Standing {
            down_since: None,
            repeat: LogThrottle::new(REPEAT_EVERY),
        }
    }
}

impl Standing {
    /// Record a probe's outcome at `now`; returns what to log, if anything.
    pub fn observe(&mut self, now: Instant, up: bool) -> Option<Event> {
        match (up, self.down_since) {
            (true, None) => None,
            (true, Some(since)) => {
                self.down_since = None;
                self.repeat.reset();
                Some(Event::Back {
                    after: now.saturating_duration_since(since),
                })
            }
            (false, None) => {
                self.down_since = Some(now);
                self.repeat.reset();
                self.repeat.ready(now);
                Some(Event::Down)
            }
            (false, Some(since)) => self.repeat.ready(now).map(|_| Event::StillDown {
                for_: now.saturating_duration_since(since),
            }),
        }
    }
}

/// Probes the external stores of a running gateway, logs what it finds
/// and keeps `plangate_store_up` current. Holds the gateway's core weakly:
/// its task ends when the gateway is dropped.
pub struct StoreWatch {
    core: Weak<Core>,
    storage: StorageConfig,
    stores: Vec<(StoreTarget, Standing)>,
}

impl StoreWatch {
    /// A watch over the external stores `storage` names (none for
    /// in-process stores).
    pub fn new(core: &Arc<Core>, storage: &StorageConfig) -> Self {
        StoreWatch {
            core: Arc::downgrade(core),
            storage: storage.clone(),
            stores: StoreTarget::of(storage)
                .into_iter()
                .map(|t| (t, Standing::default()))
                .collect(),
        }
    }

    /// Probe every store once: set its gauge and log what changed (ERROR
    /// when it goes down and every [`REPEAT_EVERY`] while it stays down,
    /// INFO when it is back). Returns the stores that did not answer, each
    /// with why.
    pub async fn check(&mut self) -> Vec<(StoreTarget, String)> {
        let Some(core) = self.core.upgrade() else {
            return Vec::new();
        };
        let mut failed = Vec::new();
        for (target, standing) in &mut self.stores {
            let mut result = probe_core(&core, target.kind).await;
            core.metrics
                .set_store_up(target.kind.label(), result.is_ok());
            if let Some(event) = standing.observe(Instant::now(), result.is_ok()) {
                if let (Err(why), StoreKind::Redis) = (&mut result, target.kind) {
                    // The store's own connection retries a refused connect
                    // quietly until the probe times out: a connection of
                    // the probe's own says why.
                    if let Err(direct) = connect_redis_once(&self.storage).await {
                        *why = direct;
                    }
                }
                log_event(target, &event, result.as_ref().err(), core.on_store_error);
            }
            if let Err(why) = result {
                failed.push((target.clone(), why));
            }
        }
        failed
    }

    /// Probe every [`CHECK_EVERY`] until the gateway is gone.
    pub async fn run(mut self) {
        if self.stores.is_empty() {
            return;
        }
        loop {
            tokio::time::sleep(CHECK_EVERY).await;
            if self.core.strong_count() == 0 {
                return;
            }
            self.check().await;
        }
    }
}

/// Why `kind` does not answer through the gateway's own connections.
async fn probe_core(core: &Core, kind: StoreKind) -> Result<(), String> {
    let probe = async {
        match kind {
            StoreKind::Redis => core
                .limiter
                .store()
                .ping()
                .await
                .map_err(|e| store_reason(&e)),
            StoreKind::Postgres => core.catalog.ping().await.map_err(|e| catalog_reason(&e)),
        }
    };
    match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
    }
}

/// A counter store error without the "counter store unavailable:" prefix
/// (the log line already says which store).
fn store_reason(e: &StoreError) -> String {
    match e {
        StoreError::Unavailable(m) | StoreError::Protocol(m) | StoreError::Catalog(m) => m.clone(),
        StoreError::Timeout(d) => format!("no answer within {d:?}"),
    }
}

fn catalog_reason(e: &crate::catalog::CatalogError) -> String {
    match e {
        crate::catalog::CatalogError::Unavailable(m) => m.clone(),
        other => other.to_string(),
    }
}

/// What an unreachable store means for requests.
fn consequence(kind: StoreKind, on_store_error: OnStoreError) -> &'static str {
    match (kind, on_store_error) {
        (StoreKind::Redis, OnStoreError::Open) => {
            "LIMITS ARE NOT ENFORCED: requests are admitted and marked x-ratelimit-degraded: true (on_store_error = \"open\")"
        }
        (StoreKind::Redis, OnStoreError::Closed) => {
            "requests are refused with 503 limiter_unavailable (on_store_error = \"closed\")"
        }
        (StoreKind::Postgres, _) => {
            "requests that need the catalog (keys and plans not cached, credits) are refused with 503"
        }
    }
}

fn log_event(
    target: &StoreTarget,
    event: &Event,
    why: Option<&String>,
    on_store_error: OnStoreError,
) {
    let store = target.kind.label();
    let url = target.address.as_str();
    let error = why.map_or("", String::as_str);
    match event {
        Event::Down => tracing::error!(
            store,
            url = %url,
            error = %error,
            "{} unreachable; {}",
            target.key,
            consequence(target.kind, on_store_error)
        ),
        Event::StillDown { for_ } => tracing::error!(
            store,
            url = %url,
            error = %error,
            down_for = %humantime::format_duration(Duration::from_secs(for_.as_secs())),
            "{} still unreachable; {}",
            target.key,
            consequence(target.kind, on_store_error)
        ),
        Event::Back { after } => tracing::info!(
            store,
            url = %url,
            down_for = %humantime::format_duration(Duration::from_secs(after.as_secs())),
            "{} reachable again",
            target.key
        ),
    }
}

/// Connect to the Postgres at `url` on a connection of its own and check
/// that its schema is the one this plangate needs. `Ok` says what was
/// found; `Err` says what is wrong and what to do about it.
pub async fn probe_postgres(url: &str) -> Result<String, String> {
    use crate::catalog::postgres::{describe_error, MIGRATIONS};
    let mut cfg: tokio_postgres::Config = url
        .parse()
        .map_err(|e| format!("not a Postgres URL: {e}"))?;
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(Duration::from_secs(5));
    }
    cfg.application_name("plangate check-config");
    let connect = cfg.connect(tokio_postgres::NoTls);
    let (client, conn) = match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => return Err(describe_error(&e)),
        Err(_) => return Err("no answer within 10s".into()),
    };
    let driver = tokio::spawn(conn);
    let latest = MIGRATIONS.last().map_or(0, |m| m.version);
    let result = match client
        .query_one(
            "SELECT coalesce(max(version), 0) FROM schema_migrations",
            &[],
        )
        .await
    {
        Ok(row) => {
            let version: i32 = row.get(0);
            if version < latest {
                Err(format!(
                    "the schema is at version {version}, this plangate needs {latest}: run `plangate migrate`"
                ))
            } else if version > latest {
                Err(format!(
                    "the schema is at version {version}, newer than this plangate ({latest}): upgrade plangate"
                ))
            } else {
                Ok(format!("ok, schema version {version}"))
            }
        }
        Err(e) => Err(describe_error(&e)),
    };
    drop(client);
    driver.abort();
    result
}

/// One connection attempt and a PING to the Redis `storage` names (its
/// first node for a cluster), for the reason it fails: the store's own
/// connections retry quietly and only time out.
async fn connect_redis_once(storage: &StorageConfig) -> Result<(), String> {
    let Some(url) = storage.redis_url.as_ref().or(storage.redis_cluster.first()) else {
        return Ok(());
    };
    let client = redis::Client::open(url.as_str()).map_err(|e| format!("bad URL: {e}"))?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(PROBE_TIMEOUT))
        .set_response_timeout(Some(PROBE_TIMEOUT));
    let attempt = async {
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        redis::cmd("PING").query_async::<()>(&mut conn).await
    };
    match tokio::time::timeout(PROBE_TIMEOUT * 2, attempt).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {:?}", PROBE_TIMEOUT * 2)),
    }
}

/// Connect to the counter store `storage` names, check that it answers and
/// runs plangate's scripts atomically. `Ok` names the server(s).
pub async fn probe_redis(storage: &StorageConfig) -> Result<String, String> {
    connect_redis_once(storage).await?;
    let options = RedisOptions {
        connect_timeout: PROBE_TIMEOUT,
        response_timeout: PROBE_TIMEOUT,
        ..RedisOptions::default()
    };
    let store = if !storage.redis_cluster.is_empty() {
        RedisStore::connect_cluster(&storage.redis_cluster, options).await
    } else if let Some(url) = &storage.redis_url {
        RedisStore::connect_with(url, options).await
    } else {
        return Ok("not configured".into());
    }
    .map_err(|e| store_reason(&e))?;
    let check = async {
        store.ping().await?;
        store.check_server().await
    };
    match tokio::time::timeout(PROBE_TIMEOUT * 3, check).await {
        Ok(Ok(report)) if report.problems.is_empty() => {
            let mut out = format!("ok, {}", report.servers.join(", "));
            for w in &report.warnings {
                out.push_str(&format!(" (warning: {w})"));
            }
            Ok(out)
        }
        Ok(Ok(report)) => Err(format!(
            "reachable, but not safe for limits: {}",
            report.problems.join("; ")
        )),
        Ok(Err(e)) => Err(store_reason(&e)),
        Err(_) => Err(format!("no answer within {:?}", PROBE_TIMEOUT * 3)),
    }
}

/// Probe every external store `storage` names, each on a connection of
/// its own (for `check-config --connect`), concurrently.
pub async fn probe_stores(storage: &StorageConfig) -> Vec<(StoreTarget, Result<String, String>)> {
    let targets = StoreTarget::of(storage);
    let probes = targets.iter().map(|t| async move {
        match t.kind {
            StoreKind::Postgres => match &storage.postgres_url {
                Some(url) => probe_postgres(url).await,
                None => Ok("not configured".into()),
            },
            StoreKind::Redis => probe_redis(storage).await,
        }
    });
    let results = futures_util::future::join_all(probes).await;
    targets.into_iter().zip(results).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check_mask(url: &str, expected: &str) {
        assert_eq!(mask_url(url), expected, "{url}");
    }

    #[test]
    fn passwords_are_masked_and_the_rest_kept() {
        for (url, expected) in [
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            (
                "redis://:hunter2@10.0.0.1:6390/0",
                "redis://:***@10.0.0.1:6390/0",
            ),
            (
                "rediss://app:s3cr3t@cache:6380",
                "rediss://app:***@cache:6380",
            ),
            (
                "postgres://postgres@127.0.0.1:5432/plangate",
                "postgres://postgres@127.0.0.1:5432/plangate",
            ),
            (
                "postgres://gw:pa/ss@w@db.internal:5432/plangate?sslmode=disable",
                "postgres://gw:***@db.internal:5432/plangate?sslmode=disable",
            ),
            (
                "postgresql://db/plangate?user=gw&password=x&application_name=a",
                "postgresql://db/plangate?user=gw&password=***&application_name=a",
            ),
            (
                "unix:///run/redis.sock?db=1&pass=x",
                "unix:///run/redis.sock?db=1&pass=***",
            ),
            (
                "host=db user=gw password=secret dbname=plangate",
                "host=db user=gw password=*** dbname=plangate",
            ),
            (
                "host=db password='p w\\'x' dbname=plangate",
                "host=db password=*** dbname=plangate",
            ),
            ("", ""),
        ] {
            check_mask(url, expected);
        }
    }

    #[test]
    fn throttle_lets_one_line_through_per_period() {
        let t0 = Instant::now();
        let mut t = LogThrottle::new(Duration::from_secs(30));
        assert_eq!(t.ready(t0), Some(0));
        assert_eq!(t.ready(t0 + Duration::from_secs(1)), None);
        assert_eq!(t.ready(t0 + Duration::from_secs(29)), None);
        assert_eq!(t.ready(t0 + Duration::from_secs(30)), Some(2));
        assert_eq!(t.ready(t0 + Duration::from_secs(31)), None);
        t.reset();
        assert_eq!(t.ready(t0 + Duration::from_secs(32)), Some(0));
    }

    #[test]
    fn a_store_down_is_told_at_once_then_every_period_then_back() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut s = Standing::default();
        let seen: Vec<Option<Event>> = [
            (0, true),
            (5, false),
            (10, false),
            (30, false),
            (35, false),
            (40, false),
            (65, false),
            (70, true),
            (75, true),
            (80, false),
        ]
        .into_iter()
        .map(|(t, up)| s.observe(at(t), up))
        .collect();
        assert_eq!(
            seen,
            vec![
                None,
                Some(Event::Down),
                None,
                None,
                Some(Event::StillDown {
                    for_: Duration::from_secs(30)
                }),
                None,
                Some(Event::StillDown {
                    for_: Duration::from_secs(60)
                }),
                Some(Event::Back {
                    after: Duration::from_secs(65)
                }),
                None,
                Some(Event::Down),
            ]
        );
    }
}
