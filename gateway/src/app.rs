//! Assembly: builds the stores, catalog, limiter and listeners from a
//! [`Config`] and runs them (`plangate serve` and `plangate dev`), plus hot
//! reload of plans (file watch and SIGHUP) and routes (SIGHUP), and the
//! hourly retention pass over usage events (`[usage] retain`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;

use crate::admin::Admin;
use crate::background::Job;
use crate::catalog::cache::{CacheConfig, CatalogCache};
use crate::catalog::memory::MemoryCatalog;
use crate::catalog::postgres::{PgOptions, PostgresCatalog};
use crate::catalog::timed::Timed;
use crate::catalog::{Catalog, CatalogError, Invalidation};
use crate::cli::CliError;
use crate::clock::{Clock, SharedClock, SystemClock};
use crate::config::{Config, PlansSource};
use crate::credits::Outbox;
use crate::health::{mask_url, StoreWatch};
use crate::limiter::memory::MemoryStore;
use crate::limiter::redis::{RedisOptions, RedisStore};
use crate::limiter::{AnyStore, Limiter, StoreError};
use crate::metrics::Metrics;
use crate::plans::parse::{check_plan_units, load_plans_file_for};
use crate::plans::KnownUnits;
use crate::proxy::{Core, Gateway, RequestIds, RouteTable};
use crate::server::{self, ListenerOptions, ShutdownSignal};

/// A gateway built from a config, not yet listening.
pub struct App {
    pub config: Config,
    pub core: Arc<Core>,
    pub gateway: Arc<Gateway>,
    pub admin: Option<Arc<Admin>>,
    /// The units plans may name under the routes in force (swapped when a
    /// SIGHUP reloads the routes); plans loads and the admin API check
    /// against it.
    pub units: Arc<ArcSwap<KnownUnits>>,
    /// The clock everything was built with (retention reads it too).
    pub clock: SharedClock,
}

fn bad(e: impl std::fmt::Display) -> CliError {
    CliError::BadInput(e.to_string())
}

fn fail(e: impl std::fmt::Display) -> CliError {
    CliError::Failure(e.to_string())
}

impl App {
    /// Build everything `config` describes. The plans file is validated
    /// (against the routes' units too) and applied to the catalog. A store
    /// that does not answer is logged at ERROR (see `health.rs`); with
    /// `[storage] require_at_start` it fails the build instead.
    pub async fn build(config: Config, clock: SharedClock) -> Result<App, CliError> {
        let plans = match &config.plans.file {
            Some(file) => Some(load_plans_file_for(file, &config.known_units()).map_err(bad)?),
            None => None,
        };
        let start = StartPlans {
            source: config.plans.source,
            file: config.plans.file.clone(),
            plans,
        };
        let require = config.storage.require_at_start;
        let timeout = config.storage.catalog_timeout;
        let (catalog, connected): (Arc<dyn Catalog>, bool) = match &config.storage.postgres_url {
            Some(url) => {
                let (catalog, connected) =
                    connect_postgres(url, clock.clone(), require, timeout).await?;
                // Every call the gateway makes — the cache's loads, wallet
                // loads and credit writes, the admin API, health — is
                // bounded by `catalog_timeout` from here on.
                (Arc::new(Timed::new(catalog, timeout)), connected)
            }
            None => (Arc::new(MemoryCatalog::new(clock.clone())), true),
        };
        if !connected {
            // Postgres did not answer the connection (the store watch says
            // so at ERROR): apply as soon as it does, rather than wait
            // here for it to fail again.
            tokio::spawn(apply_when_available(catalog.clone(), start));
            return Self::assemble(config, clock, catalog).await;
        }
        match start.apply(&*catalog).await {
            Ok(_) => {}
            Err(CatalogError::Unavailable(e)) => {
                let url = config.storage.postgres_url.as_deref().map(mask_url);
                let url = url.as_deref().unwrap_or("-");
                if require {
                    return Err(fail(format!(
                        "[storage] postgres_url {url}: {e} (the stores are required at start)"
                    )));
                }
                // It answered the connection, so it is reachable but
                // unusable (no schema) or stopped answering: only this says
                // why.
                tracing::error!(url = %url, error = %e, "plans not applied: Postgres answers but cannot serve; serving 503 until it can");
                // Start anyway (not ready); apply as soon as Postgres answers.
                tokio::spawn(apply_when_available(catalog.clone(), start));
            }
            Err(e) => return Err(fail(format!("applying {}: {e}", start.describe_file()))),
        }
        Self::assemble(config, clock, catalog).await
    }

    /// Build around an existing catalog (whose plans are already applied).
    pub async fn assemble(
        config: Config,
        clock: SharedClock,
        catalog: Arc<dyn Catalog>,
    ) -> Result<App, CliError> {
        // A reply slower than `store_timeout` is already a store error for
        // the limiter; the connection itself gives up (and reconnects) only
        // well after that, so a slow moment does not cost a reconnect.
        let options = RedisOptions {
            response_timeout: (config.storage.store_timeout + Duration::from_millis(100))
                .max(RedisOptions::default().response_timeout),
            ..RedisOptions::default()
        };
        let redis = if !config.storage.redis_cluster.is_empty() {
            Some(
                RedisStore::connect_cluster(&config.storage.redis_cluster, options)
                    .await
                    .map_err(|e| bad(format!("[storage] redis_cluster: {e}")))?,
            )
        } else if let Some(url) = &config.storage.redis_url {
            Some(
                RedisStore::connect_with(url, options)
                    .await
                    .map_err(|e| bad(format!("[storage] redis_url {}: {e}", mask_url(url))))?,
            )
        } else {
            None
        };
        let store: AnyStore = match (redis, &config.storage.spool) {
            (Some(redis), _) => redis.into(),
            (None, Some(path)) => {
                let (store, refunded) = MemoryStore::with_spool(path, clock.now_ms())
                    .map_err(|e| bad(format!("[storage] spool {}: {e}", path.display())))?;
                tracing::info!(path = %path.display(), refunded, "outbox spool replayed (admission charges of requests that never ended, from an older version's spool, refunded)");
                store.with_outbox_limit(config.storage.outbox_memory).into()
            }
            (None, None) => MemoryStore::new()
                .with_outbox_limit(config.storage.outbox_memory)
                .into(),
        };
        let cache = CatalogCache::new_lazy(catalog.clone(), clock.clone(), CacheConfig::default())
            .await
            .map_err(|e| fail(format!("loading plans from the catalog: {e}")))?;
        let limiter = Limiter::new(store, clock.clone(), config.storage.store_timeout);
        let outbox = Outbox::install(&limiter, catalog.clone());
        outbox.start();
        let cache = Arc::new(cache);
        let notifier = match &config.notify {
            Some(n) => {
                let notifier = crate::notify::Notifier::new(
                    n.clone(),
                    catalog.clone(),
                    cache.clone(),
                    clock.clone(),
                    limiter.background().clone(),
                )
                .map_err(bad)?;
                // Pending notifications (of this or an earlier run) are
                // picked up by the worker's first pass.
                notifier.start();
                Some(notifier)
            }
            None => {
                if cache.plans().plans.values().any(|p| !p.notify.is_empty()) {
                    tracing::warn!("plans have `notify:` thresholds but the config has no [notify] section: no notifications are sent");
                }
                None
            }
        };
        let core = Arc::new(Core {
            catalog: catalog.clone(),
            cache,
            notifier,
            limiter,
            on_store_error: config.storage.on_store_error,
            record_usage: config.usage.record,
            metrics: Arc::new(Metrics::new()),
            ids: RequestIds::default(),
            outbox,
            bodies: Arc::new(crate::proxy::BodyBudget::default()),
        });
        // The first probe also warms up the counter store's connection
        // (it connects lazily; without it the first requests would pay for
        // the connection and exceed `store_timeout`). An unreachable store
        // is logged at ERROR, and again while it stays down; the gateway
        // follows `on_store_error` until it comes back, unless the stores
        // are required at start.
        let mut watch = StoreWatch::new(&core, &config.storage);
        let failed = watch.check().await;
        if config.storage.require_at_start && !failed.is_empty() {
            let lines: Vec<String> = failed
                .iter()
                .map(|(target, why)| format!("{target}: {why}"))
                .collect();
            return Err(fail(format!(
                "{} (the stores are required at start)",
                lines.join("; ")
            )));
        }
        tokio::spawn(watch.run());
        tokio::spawn(check_counter_store(core.clone()));
        let table = RouteTable::from_config(&config).map_err(bad)?;
        let gateway = Arc::new(Gateway {
            table: ArcSwap::from_pointee(table),
            core: core.clone(),
        });
        let units = Arc::new(ArcSwap::from_pointee(config.known_units()));
        let admin = config.admin.as_ref().map(|a| {
            Arc::new(
                Admin::new(a.token.clone(), core.clone(), units.clone())
                    .with_metrics_token(a.metrics_token.clone())
                    .with_console(a.console.then_some(crate::console::ConsoleOptions {
                        session_ttl: a.console_session_ttl,
                        secure: a.tls.is_some(),
                    }))
                    .with_plan_writes_refused(config.plans.writes_refused()),
            )
        });
        Ok(App {
            config,
            core,
            gateway,
            admin,
            units,
            clock,
        })
    }

    /// Bind the listeners (the main one on `listen` if given, else the
    /// config's). Returns the bound addresses and a future that serves until
    /// `shutdown` flips.
    pub async fn bind(
        &self,
        listen: Option<SocketAddr>,
        shutdown: ShutdownSignal,
    ) -> Result<
        (
            Bound,
            impl std::future::Future<Output = ()> + Send + 'static,
        ),
        CliError,
    > {
        let listen = Listen {
            main: listen,
            ..Listen::default()
        };
        self.bind_with(listen, shutdown).await
    }

    /// Bind the listeners where `listen` says, else where the config says.
    /// Returns the bound addresses and a future that serves until
    /// `shutdown` flips.
    pub async fn bind_with(
        &self,
        listen: Listen,
        shutdown: ShutdownSignal,
    ) -> Result<
        (
            Bound,
            impl std::future::Future<Output = ()> + Send + 'static,
        ),
        CliError,
    > {
        if listen.admin.is_some() && self.admin.is_none() {
            return Err(bad(format!(
                "--admin-listen: {} has no [admin] section",
                self.config.path.display()
            )));
        }
        let (main, main_busy) = bind_listener(
            listen.main.unwrap_or(self.config.server.listen),
            listen.main.is_none() && listen.free_port_if_busy,
            ("the main listener", "--listen", "[server] listen"),
        )
        .await?;
        let tls = match &self.config.server.tls {
            Some(files) => Some(server::tls_acceptor(files).map_err(bad)?),
            None => None,
        };
        // The configured key headers as of start-up: a SIGHUP that renames
        // one leaves control bytes in the new header answered 400, not 401.
        let mut credentials = vec![http::header::AUTHORIZATION];
        for h in self.config.key_headers() {
            if !credentials.contains(&h) {
                credentials.push(h);
            }
        }
        let refusing = self.gateway.clone();
        let opts = ListenerOptions {
            header_read_timeout: self.config.server.header_read_timeout,
            credential_headers: credentials.into(),
            refuse: Some(Arc::new(move |e: &crate::errors::ApiError| {
                refusing.refused(e)
            })),
            ..ListenerOptions::default()
        };
        let main_local = main.local_addr().map_err(fail)?;
        let gateway = self.gateway.clone();
        let main_task = server::serve_listener(
            main,
            tls,
            opts.clone(),
            move |req, _peer| gateway.clone().handle(req),
            shutdown.clone(),
        );
        let (admin_local, admin_busy, admin_task) = match (&self.admin, &self.config.admin) {
            (Some(admin), Some(cfg)) => {
                let (listener, busy) = bind_listener(
                    listen.admin.unwrap_or(cfg.listen),
                    listen.admin.is_none() && listen.free_port_if_busy,
                    ("the admin listener", "--admin-listen", "[admin] listen"),
                )
                .await?;
                let local = listener.local_addr().map_err(fail)?;
                let admin = admin.clone();
                let admin_tls = match &cfg.tls {
                    Some(files) => Some(server::tls_acceptor(files).map_err(bad)?),
                    None => None,
                };
                let task = server::serve_listener(
                    listener,
                    admin_tls,
                    // The admin API's refusals are its own: not counted or
                    // logged as requests of the main listener.
                    ListenerOptions {
                        refuse: None,
                        ..opts
                    },
                    move |req, _peer| admin.clone().handle(req),
                    shutdown,
                );
                (Some(local), busy, Some(task))
            }
            _ => (None, None, None),
        };
        let serve = async move {
            match admin_task {
                Some(admin_task) => {
                    tokio::join!(main_task, admin_task);
                }
                None => main_task.await,
            }
        };
        Ok((
            Bound {
                main: main_local,
                admin: admin_local,
                main_busy,
                admin_busy,
            },
            serve,
        ))
    }

    /// Start watching the plans file when `[plans] watch` is on; the watch
    /// lasts as long as the returned handle.
    pub fn watch_plans(&self) -> Option<notify::RecommendedWatcher> {
        match &self.config.plans.file {
            Some(file)
                if self.config.plans.watch && self.config.plans.source == PlansSource::File =>
            {
                watch_plans(self.core.clone(), file.clone(), self.units.clone())
            }
            _ => None,
        }
    }

    /// Re-read and apply the plans file, checked against `units` (those of
    /// the routes in force). An invalid file leaves the plans in force, is
    /// logged with file:line and counted.
    pub async fn reload_plans(core: &Core, file: &Path, units: &KnownUnits) -> bool {
        match load_plans_off_runtime(file, units).await {
            Ok(plans) => match core.catalog.apply_plans(&plans, false).await {
                Ok(_) => {
                    core.cache.invalidate(&Invalidation::Plans);
                    tracing::info!(file = %file.display(), plans = plans.plans.len(), "plans reloaded");
                    true
                }
                Err(e) => {
                    core.metrics.reload_failure();
                    tracing::error!(file = %file.display(), error = %e, "plans reload could not be applied; old plans stay in force");
                    false
                }
            },
            Err(errors) => {
                core.metrics.reload_failure();
                for e in &errors.0 {
                    tracing::error!("plans reload rejected; old plans stay in force: {e}");
                }
                false
            }
        }
    }
}

/// How often usage events past `[usage] retain` are deleted.
pub const PRUNE_EVERY: Duration = Duration::from_secs(3_600);

/// One retention pass: delete the usage events that ended more than
/// `retain` before now (by `clock`). Logs what it deleted.
pub async fn prune_usage_once(
    catalog: &dyn Catalog,
    clock: &dyn Clock,
    retain: Duration,
) -> Result<u64, CatalogError> {
    let now = UNIX_EPOCH + Duration::from_millis(clock.now_ms());
    let before = now.checked_sub(retain).unwrap_or(UNIX_EPOCH);
    let pruned = catalog.prune_usage(before).await?;
    let cutoff = humantime::format_rfc3339_seconds(before).to_string();
    if pruned > 0 {
        tracing::info!(pruned, before = %cutoff, "usage events past retention deleted");
    } else {
        tracing::debug!(before = %cutoff, "no usage events past retention");
    }
    Ok(pruned)
}

/// Run [`prune_usage_once`] at start and every [`PRUNE_EVERY`] after, for
/// as long as the task lives (`run` aborts it at shutdown; a pass cut
/// short loses nothing: every delete is a transaction of its own).
async fn prune_usage_loop(catalog: Arc<dyn Catalog>, clock: SharedClock, retain: Duration) {
    let mut every = tokio::time::interval(PRUNE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if let Err(e) = prune_usage_once(&*catalog, &*clock, retain).await {
            tracing::warn!(error = %e, retry_in = ?PRUNE_EVERY, "pruning usage events failed");
        }
    }
}

/// How long one startup check of the counter store may take.
const STORE_CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// Log what the counter store is, and loudly (error level) when its
/// scripts are not atomic or do not run: then limits can overshoot, or
/// every counter call fails. Runs in the background so that a store that
/// is down does not delay startup; it checks once the store answers.
async fn check_counter_store(core: Arc<Core>) {
    let AnyStore::Redis(store) = core.limiter.store() else {
        return;
    };
    let mut backoff = Duration::from_secs(1);
    loop {
        match tokio::time::timeout(STORE_CHECK_TIMEOUT, store.check_server()).await {
            Ok(Ok(report)) => {
                for p in &report.problems {
                    tracing::error!("COUNTER STORE NOT SAFE FOR LIMITS: {p}");
                }
                for w in &report.warnings {
                    tracing::warn!("counter store: {w}");
                }
                tracing::info!(servers = ?report.servers, mode = ?store.mode(), "counter store checked");
                return;
            }
            Ok(Err(StoreError::Protocol(e))) => {
                tracing::warn!(error = %e, "could not check that the counter store runs scripts atomically");
                return;
            }
            // The store watch says that the store is down (at ERROR, with
            // its URL); the script check waits until it answers.
            Ok(Err(
                StoreError::Unavailable(_) | StoreError::Timeout(_) | StoreError::Catalog(_),
            ))
            | Err(_) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Connect to Postgres; when it is down, connect lazily (the pool and the
/// LISTEN connection retry by themselves) so the gateway still starts,
/// unless `require` (then the error names the URL, password masked, and
/// why). Also returns whether the database answered. Every connection
/// attempt, the first included, is bounded by `timeout`.
async fn connect_postgres(
    url: &str,
    clock: SharedClock,
    require: bool,
    timeout: Duration,
) -> Result<(PostgresCatalog, bool), CliError> {
    let config_error =
        |e: CatalogError| bad(format!("[storage] postgres_url {}: {e}", mask_url(url)));
    let opts = PgOptions {
        timeout,
        ..PgOptions::default()
    };
    match PostgresCatalog::connect_with(url, clock.clone(), opts.clone()).await {
        Ok(c) => Ok((c, true)),
        Err(CatalogError::Unavailable(e)) if require => Err(fail(format!(
            "[storage] postgres_url {}: {e} (the stores are required at start)",
            mask_url(url)
        ))),
        Err(CatalogError::Unavailable(e)) => {
            // The store watch logs it at ERROR with the URL once the
            // gateway is assembled, and again while it lasts.
            tracing::debug!(error = %e, "Postgres unavailable at start; retrying in the background");
            let opts = PgOptions { lazy: true, ..opts };
            let catalog = PostgresCatalog::connect_with(url, clock, opts)
                .await
                .map_err(config_error)?;
            Ok((catalog, false))
        }
        Err(e) => Err(config_error(e)),
    }
}

/// [`load_plans_file_for`] on a blocking thread: reading and checking a
/// plans file (up to 4 MiB) is no work for the workers serving requests.
async fn load_plans_off_runtime(
    file: &Path,
    units: &KnownUnits,
) -> Result<crate::plans::PlanSet, crate::config::ConfigErrors> {
    let (path, known) = (file.to_path_buf(), units.clone());
    tokio::task::spawn_blocking(move || load_plans_file_for(&path, &known))
        .await
        .unwrap_or_else(|e| {
            Err(crate::config::ConfigErrors(vec![
                crate::config::ConfigError {
                    file: file.display().to_string(),
                    line: None,
                    column: None,
                    key: String::new(),
                    message: format!("reading the plans failed: {e}"),
                },
            ]))
        })
}

/// What `serve` does with the plans at start (`[plans]`).
struct StartPlans {
    source: PlansSource,
    file: Option<PathBuf>,
    /// The file's plans, checked.
    plans: Option<crate::plans::PlanSet>,
}

impl StartPlans {
    fn describe_file(&self) -> String {
        self.file
            .as_ref()
            .map_or_else(|| "no plans file".into(), |f| f.display().to_string())
    }

    /// Under `source = "file"` apply the file; under `"database"` apply it
    /// (if any) only to a catalog that has no plan yet (the first start;
    /// every start of the in-process catalog), so that a start never
    /// undoes a change made through the admin API or the CLI. Records who
    /// owns the plans either way. Returns whether it applied the file.
    async fn apply(&self, catalog: &dyn Catalog) -> Result<bool, CatalogError> {
        let file = self.describe_file();
        // Recorded for admin commands given only a database URL, which do
        // not see this config (`cli/admin.rs`).
        let owner = (self.source == PlansSource::File).then_some(file.as_str());
        catalog.set_plans_file_owner(owner).await?;
        if self.source == PlansSource::Database {
            let in_force = catalog.list_plans().await?;
            if !in_force.plans.is_empty() {
                tracing::info!(
                    file = %file,
                    plans = in_force.plans.len(),
                    "plans are owned by the database ([plans] source = \"database\"): the plans file is not applied (apply one with `plangate plans apply`)"
                );
                return Ok(false);
            }
            if self.plans.is_none() {
                tracing::warn!("the catalog has no plans and [plans] names no file: every request is refused until plans are applied (`plangate plans apply FILE` or PUT /admin/plans)");
                return Ok(false);
            }
            tracing::info!(file = %file, "the catalog has no plans yet: applying the plans file once");
        }
        match &self.plans {
            Some(plans) => {
                catalog.apply_plans(plans, false).await?;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

/// Apply the plans file once the catalog answers (after a start without
/// Postgres).
async fn apply_when_available(catalog: Arc<dyn Catalog>, start: StartPlans) {
    let mut backoff = Duration::from_millis(250);
    loop {
        match start.apply(&*catalog).await {
            Ok(applied) => {
                if applied {
                    tracing::info!("Postgres is back: plans applied");
                }
                return;
            }
            Err(CatalogError::Unavailable(_)) => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                tracing::error!(error = %e, "applying plans failed");
                return;
            }
        }
    }
}

/// Addresses the listeners are bound to.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub main: SocketAddr,
    pub admin: Option<SocketAddr>,
    /// The configured address of the main listener when it was in use and
    /// a free port was taken instead ([`Listen::free_port_if_busy`]).
    pub main_busy: Option<SocketAddr>,
    /// Likewise for the admin listener.
    pub admin_busy: Option<SocketAddr>,
}

/// Where to listen, over what the config says.
#[derive(Debug, Clone, Copy, Default)]
pub struct Listen {
    /// The main listener (else `[server] listen`).
    pub main: Option<SocketAddr>,
    /// The admin listener (else `[admin] listen`).
    pub admin: Option<SocketAddr>,
    /// When a configured address (one not given here) is in use, listen on
    /// a free port of the same IP instead of failing: `plangate dev`, where
    /// two instances on one machine must both start. An address given here
    /// that is in use is always an error (port 0 picks a free port).
    pub free_port_if_busy: bool,
}

/// Bind `addr`; when it is in use and `fallback`, a free port of the same
/// IP (returning `addr` as the busy one). `names` are what the listener is
/// called, its flag and its config key, for the error message.
async fn bind_listener(
    addr: SocketAddr,
    fallback: bool,
    names: (&str, &str, &str),
) -> Result<(TcpListener, Option<SocketAddr>), CliError> {
    let (what, flag, key) = names;
    match TcpListener::bind(addr).await {
        Ok(l) => Ok((l, None)),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && fallback => {
            let free = SocketAddr::new(addr.ip(), 0);
            let l = TcpListener::bind(free)
                .await
                .map_err(|e| fail(format!("binding {what} on {free}: {e}")))?;
            tracing::warn!(busy = %addr, "{what}: {addr} is in use; listening on a free port instead");
            Ok((l, Some(addr)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(fail(format!(
            "binding {what} on {addr}: {e}: another program (another plangate?) listens there; \
             choose another address with {key} (plangate dev: {flag}); port 0 picks a free one"
        ))),
        Err(e) => Err(fail(format!("binding {what} on {addr}: {e}"))),
    }
}

/// Watch the plans file's directory (so editors' atomic renames and
/// Kubernetes ConfigMap symlink swaps are seen) and reload on change.
fn watch_plans(
    core: Arc<Core>,
    file: PathBuf,
    units: Arc<ArcSwap<KnownUnits>>,
) -> Option<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher};
    let dir = file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut watcher =
        match notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if res.is_ok() {
                let _ = tx.send(());
            }
        }) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the plans file; reload with SIGHUP");
                return None;
            }
        };
    if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the plans directory; reload with SIGHUP");
        return None;
    }
    tokio::spawn(async move {
        let mut last: Option<Vec<u8>> = std::fs::read(&file).ok();
        while rx.recv().await.is_some() {
            // Editors write in bursts: settle, then take everything queued.
            tokio::time::sleep(Duration::from_millis(100)).await;
            while rx.try_recv().is_ok() {}
            let now = std::fs::read(&file).ok();
            if now.is_none() || now == last {
                continue;
            }
            last = now;
            App::reload_plans(&core, &file, &units.load()).await;
        }
    });
    Some(watcher)
}

/// On SIGHUP: reload the plans, and the routes/upstreams from the config.
fn reload_on_sighup(app: &App) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let core = app.core.clone();
        let gateway = app.gateway.clone();
        let units = app.units.clone();
        let config_path = app.config.path.clone();
        // Under `source = "database"` the file is not the plans' source:
        // SIGHUP reloads only the routes.
        let plans_file = match app.config.plans.source {
            PlansSource::File => app.config.plans.file.clone(),
            PlansSource::Database => None,
        };
        let from_file = plans_file.is_some();
        tokio::spawn(async move {
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                tracing::warn!("cannot listen for SIGHUP");
                return;
            };
            while hup.recv().await.is_some() {
                tracing::info!(plans = from_file, "SIGHUP: reloading routes and plans");
                match Config::load(&config_path) {
                    Ok(config) => {
                        let known = config.known_units();
                        let fit = plans_fit_routes(&core, plans_file.as_deref(), &known).await;
                        match fit.and_then(|()| {
                            RouteTable::from_config(&config).map_err(RoutesError::Table)
                        }) {
                            Ok(table) => {
                                gateway.table.store(Arc::new(table));
                                units.store(Arc::new(known));
                                tracing::info!(routes = config.routes.len(), "routes reloaded");
                            }
                            Err(RoutesError::Units(errors)) => {
                                core.metrics.reload_failure();
                                for e in &errors.0 {
                                    tracing::error!(
                                        "routes reload rejected (plans in force would name a unit no route measures); old routes stay in force: {e}"
                                    );
                                }
                            }
                            Err(RoutesError::Table(e)) => {
                                core.metrics.reload_failure();
                                tracing::error!(
                                    "routes reload rejected; old routes stay in force: {e}"
                                );
                            }
                        }
                    }
                    Err(errors) => {
                        core.metrics.reload_failure();
                        for e in &errors.0 {
                            tracing::error!(
                                "config reload rejected; old routes stay in force: {e}"
                            );
                        }
                    }
                }
                if let Some(file) = &plans_file {
                    App::reload_plans(&core, file, &units.load()).await;
                }
            }
        });
    }
}

/// Why new routes were not put in force.
#[cfg(unix)]
enum RoutesError {
    /// Plans in force name units the new routes neither measure nor reserve.
    Units(crate::config::ConfigErrors),
    Table(String),
}

/// The plans that would be in force after reloading with routes whose
/// units are `known` — those in the catalog, less the ones the plans file
/// replaces when it is valid under them — name no other unit. When the
/// catalog cannot be read the check is skipped (the file is still checked
/// when it is applied).
#[cfg(unix)]
async fn plans_fit_routes(
    core: &Core,
    plans_file: Option<&Path>,
    known: &KnownUnits,
) -> Result<(), RoutesError> {
    let Ok(mut in_force) = core.catalog.list_plans().await else {
        tracing::warn!("catalog unavailable: new routes not checked against the plans in force");
        return Ok(());
    };
    let file = match plans_file {
        Some(f) => load_plans_off_runtime(f, known).await.ok(),
        None => None,
    };
    if let Some(file) = file {
        in_force.plans.retain(|id, _| !file.plans.contains_key(id));
    }
    check_plan_units(&in_force, known, "plans in force").map_err(RoutesError::Units)
}

/// Run a built app until SIGTERM/Ctrl-C: listeners, plan watching, SIGHUP.
pub async fn run(app: App, listen: Listen, on_bound: impl FnOnce(&Bound)) -> Result<(), CliError> {
    let (_tx, shutdown) = server::shutdown_on_signals();
    let (bound, serving) = app.bind_with(listen, shutdown).await?;
    tracing::info!(listen = %bound.main, admin = ?bound.admin, "plangate listening");
    on_bound(&bound);
    let _watcher = app.watch_plans();
    reload_on_sighup(&app);
    let pruner = tokio::spawn(prune_usage_loop(
        app.core.catalog.clone(),
        app.clock.clone(),
        app.config.usage.retain,
    ));
    serving.await;
    pruner.abort();
    // Settlements and releases first (settlements write the outbox), then
    // the outbox.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let background = app.core.limiter.background();
    let left = background
        .idle(&[Job::Settle, Job::Release], deadline)
        .await;
    if left.is_empty() {
        tracing::info!("requests settled");
    }
    for (job, pending) in left {
        tracing::error!(job = job.as_str(), pending, "background work left at exit: these requests' settlements are lost unless the counter store still answers (their slots expire with their leases)");
    }
    // Notifications being queued (a catalog insert each). Deliveries under
    // way are not waited for: their rows stay pending and are sent again
    // once their lease ends (delivery is at least once).
    for (job, pending) in background.idle(&[Job::Notify], deadline).await {
        tracing::warn!(job = job.as_str(), pending, "threshold notifications not queued at exit; the next request over each threshold queues it");
    }
    let left = app.core.outbox.drain(Duration::from_secs(10)).await;
    if left.is_empty() {
        tracing::info!("credit charges written to the catalog");
    } else {
        tracing::error!(accounts = ?left, "credit charges not yet written to the catalog at exit; they stay in the counter store's outbox and are written by the next gateway to start (with the in-process store they are lost, unless [storage] spool keeps them)");
    }
    Ok(())
}

/// `plangate serve`. With `require_stores` (or `[storage]
/// require_at_start`), a store that does not answer at start is an error
/// (exit 1) instead of a start in the not-ready state.
pub async fn serve(config_path: &Path, require_stores: bool) -> Result<(), CliError> {
    let mut config = Config::load(config_path).map_err(bad)?;
    config.storage.require_at_start |= require_stores;
    let app = App::build(config, Arc::new(SystemClock)).await?;
    run(app, Listen::default(), |_| {}).await
}

/// The config `plangate dev` runs without `--config` (config/dev.toml) and
/// the example plans it names (config/plans.yaml), built into the binary so
/// that `plangate dev` runs from any directory.
pub const DEV_TOML: &str = include_str!("../../config/dev.toml");

/// See [`DEV_TOML`].
pub const EXAMPLE_PLANS: &str = include_str!("../../config/plans.yaml");

/// Options of `plangate dev`.
#[derive(Debug, Clone, Default)]
pub struct DevOptions {
    /// A config file instead of the built-in one.
    pub config: Option<PathBuf>,
    /// The main listener, instead of the config's.
    pub listen: Option<SocketAddr>,
    /// The admin listener, instead of the config's.
    pub admin_listen: Option<SocketAddr>,
}

/// `plangate dev`: in-process stores, the example plans, a mock OpenAI
/// upstream on a free port, and a demo account whose key and credits are
/// printed. Without `--config`, the built-in config and plans are written
/// to a directory of their own (removed at exit), where the plans file can
/// be edited while it runs. A configured listen address that is in use
/// (a second `plangate dev`) is replaced by a free port; one given on the
/// command line must be free.
pub async fn dev(opts: DevOptions) -> Result<(), CliError> {
    let (path, scratch) = match &opts.config {
        Some(path) => (path.clone(), None),
        None => {
            let dir = write_dev_files()?;
            (dir.join("dev.toml"), Some(dir))
        }
    };
    let result = dev_with(&path, &opts).await;
    if let Some(dir) = scratch {
        let _ = std::fs::remove_dir_all(dir);
    }
    result
}

/// Write [`DEV_TOML`] and [`EXAMPLE_PLANS`] to a fresh directory of this
/// process's own.
fn write_dev_files() -> Result<PathBuf, CliError> {
    let dir = std::env::temp_dir().join(format!("plangate-dev-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("dev.toml"), DEV_TOML)?;
        std::fs::write(dir.join("plans.yaml"), EXAMPLE_PLANS)
    };
    write().map_err(|e| fail(format!("writing the dev config to {}: {e}", dir.display())))?;
    Ok(dir)
}

async fn dev_with(path: &Path, opts: &DevOptions) -> Result<(), CliError> {
    let mut config = Config::load(path).map_err(bad)?;
    if config.storage.postgres_url.is_some()
        || config.storage.redis_url.is_some()
        || !config.storage.redis_cluster.is_empty()
    {
        tracing::info!("dev mode ignores [storage] URLs: using in-process stores");
        config.storage.postgres_url = None;
        config.storage.redis_url = None;
        config.storage.redis_cluster.clear();
    }

    // The mock upstream takes a free port, and the config's first upstream
    // is pointed at it: two `plangate dev` on one machine do not collide.
    let mock_listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))
        .await
        .map_err(|e| fail(format!("starting the mock upstream: {e}")))?;
    let mock = crate::mock::serve(mock_listener, crate::mock::MockOptions::default())
        .await
        .map_err(|e| fail(format!("starting the mock upstream: {e}")))?;
    point_first_upstream_at(&mut config, mock.addr())?;

    let clock: SharedClock = Arc::new(SystemClock);
    let app = App::build(config, clock).await?;
    let catalog = app.core.catalog.clone();
    let account = "demo";
    catalog
        .create_account(
            account,
            None,
            serde_json::json!({"created_by": "plangate dev"}),
        )
        .await
        .map_err(fail)?;
    let key = catalog.create_key(account).await.map_err(fail)?;
    catalog
        .create_quota_block(account, 1_000, None, serde_json::json!({"source": "dev"}))
        .await
        .map_err(fail)?;
    let plan = catalog
        .get_account(account)
        .await
        .map_err(fail)?
        .effective_plan;
    let banner = DevBanner {
        key: key.key.clone(),
        plan,
        admin_token: app.config.admin.as_ref().map(|a| a.token.clone()),
        mock: mock.addr(),
        plans_file: app.config.plans.file.clone(),
    };
    let listen = Listen {
        main: opts.listen,
        admin: opts.admin_listen,
        free_port_if_busy: true,
    };
    let result = run(app, listen, move |bound| banner.print(bound)).await;
    mock.shutdown().await;
    result
}

/// Point the config's first upstream (the one dev mode replaces with its
/// mock) at `addr`, keeping the path of its URL.
fn point_first_upstream_at(config: &mut Config, addr: SocketAddr) -> Result<(), CliError> {
    let up = config
        .upstreams
        .first_mut()
        .ok_or_else(|| bad("dev mode needs an upstream for its mock server"))?;
    let path = up
        .url
        .path_and_query()
        .map(|p| p.as_str())
        .filter(|p| *p != "/")
        .unwrap_or("");
    up.url = format!("http://{addr}{path}")
        .parse()
        .map_err(|e| bad(format!("upstream {}: {e}", up.name)))?;
    Ok(())
}

/// `plangate mock --listen ADDR`: the mock OpenAI upstream alone, until
/// SIGTERM/Ctrl-C (the example upstream of deploy/docker-compose.yml).
pub async fn mock(listen: &str) -> Result<(), CliError> {
    let addr: SocketAddr = listen.parse().map_err(|_| {
        bad(format!(
            "--listen {listen}: not an address such as 0.0.0.0:8000"
        ))
    })?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| fail(format!("binding {addr}: {e}")))?;
    let mock = crate::mock::serve(listener, crate::mock::MockOptions::default())
        .await
        .map_err(|e| fail(format!("starting the mock upstream on {addr}: {e}")))?;
    tracing::info!(listen = %mock.addr(), "mock OpenAI upstream listening");
    let (_tx, mut shutdown) = server::shutdown_on_signals();
    // Flips once, on SIGTERM or Ctrl-C; an error means the sender is gone,
    // which also means shutting down.
    let _ = shutdown.wait_for(|stop| *stop).await;
    mock.shutdown().await;
    Ok(())
}

/// What `plangate dev` prints once it listens.
struct DevBanner {
    key: String,
    plan: Option<String>,
    admin_token: Option<String>,
    mock: SocketAddr,
    plans_file: Option<PathBuf>,
}

impl DevBanner {
    fn print(&self, bound: &Bound) {
        let key = &self.key;
        let base = format!("http://{}", bound.main);
        println!();
        println!("plangate dev is running (in-process stores; nothing is persisted)");
        println!("  gateway:        {base}");
        if let (Some(admin), Some(token)) = (bound.admin, &self.admin_token) {
            println!("  admin API:      http://{admin}  (Authorization: Bearer {token})");
            println!("  admin console:  http://{admin}/ui/  (sign in with the same token)");
        }
        for (what, busy) in [
            ("gateway", bound.main_busy),
            ("admin API", bound.admin_busy),
        ] {
            if let Some(busy) = busy {
                println!("                  ({what}: {busy} was in use, so a free port was taken)");
            }
        }
        println!("  mock upstream:  http://{}", self.mock);
        if let Some(file) = &self.plans_file {
            println!(
                "  plans:          {} (edit it: changes apply at once)",
                file.display()
            );
        }
        println!(
            "  demo account:   demo (plan {}), 1000 credits",
            self.plan.as_deref().unwrap_or("-")
        );
        println!("  demo API key:   {key}");
        println!();
        println!("Try it:");
        println!("  curl -i {base}/v1/chat/completions \\");
        println!("    -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\");
        println!("    -d '{{\"model\":\"gpt-4-turbo\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'");
        println!("  curl -s {base}/v1/limits -H 'Authorization: Bearer {key}'");
        println!();
        println!("With the openai Python SDK:");
        println!("  from openai import OpenAI");
        println!("  client = OpenAI(base_url=\"{base}/v1\", api_key=\"{key}\")");
        println!("  client.chat.completions.create(model=\"gpt-4-turbo\", messages=[{{\"role\":\"user\",\"content\":\"hi\"}}])");
        println!();
    }
}
