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
use crate::catalog::cache::{CacheConfig, CatalogCache};
use crate::catalog::memory::MemoryCatalog;
use crate::catalog::postgres::{PgOptions, PostgresCatalog};
use crate::catalog::{Catalog, CatalogError, Invalidation};
use crate::cli::CliError;
use crate::clock::{Clock, SharedClock, SystemClock};
use crate::config::Config;
use crate::credits::ChargeQueue;
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
    /// (against the routes' units too) and applied to the catalog.
    pub async fn build(config: Config, clock: SharedClock) -> Result<App, CliError> {
        let plans = load_plans_file_for(&config.plans.file, &config.known_units()).map_err(bad)?;
        let catalog: Arc<dyn Catalog> = match &config.storage.postgres_url {
            Some(url) => Arc::new(connect_postgres(url, clock.clone()).await?),
            None => Arc::new(MemoryCatalog::new(clock.clone())),
        };
        match catalog.apply_plans(&plans, false).await {
            Ok(_) => {}
            Err(CatalogError::Unavailable(e)) => {
                // Start anyway (not ready); apply as soon as Postgres answers.
                tracing::error!(error = %e, "Postgres unavailable at start: serving 503 until it returns");
                tokio::spawn(apply_when_available(catalog.clone(), plans));
            }
            Err(e) => {
                return Err(fail(format!(
                    "applying {}: {e}",
                    config.plans.file.display()
                )))
            }
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
                    .map_err(|e| bad(format!("[storage] redis_url: {e}")))?,
            )
        } else {
            None
        };
        if let Some(store) = &redis {
            // The store connects lazily; without a warm-up the first requests
            // pay for the connection and exceed `store_timeout`. An
            // unreachable Redis is not fatal: the gateway follows
            // `on_store_error` until it comes back.
            match tokio::time::timeout(Duration::from_secs(1), store.ping()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "counter store unreachable at start"),
                Err(_) => tracing::warn!("counter store did not answer at start"),
            }
        }
        let store: AnyStore = match redis {
            Some(redis) => redis.into(),
            None => MemoryStore::new().into(),
        };
        let cache = CatalogCache::new_lazy(catalog.clone(), clock.clone(), CacheConfig::default())
            .await
            .map_err(|e| fail(format!("loading plans from the catalog: {e}")))?;
        let limiter = Limiter::new(store, clock.clone(), config.storage.store_timeout);
        let core = Arc::new(Core {
            catalog: catalog.clone(),
            cache: Arc::new(cache),
            limiter,
            on_store_error: config.storage.on_store_error,
            metrics: Arc::new(Metrics::new()),
            ids: RequestIds::default(),
            charges: ChargeQueue::new(catalog),
            bodies: Arc::new(crate::proxy::BodyBudget::default()),
        });
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
                    .with_metrics_token(a.metrics_token.clone()),
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
        let main_addr = listen.unwrap_or(self.config.server.listen);
        let main = TcpListener::bind(main_addr)
            .await
            .map_err(|e| fail(format!("binding {main_addr}: {e}")))?;
        let tls = match &self.config.server.tls {
            Some(files) => Some(server::tls_acceptor(files).map_err(bad)?),
            None => None,
        };
        // The configured key header as of start-up: a SIGHUP that renames
        // it leaves control bytes in the new header answered 400, not 401.
        let mut credentials = vec![http::header::AUTHORIZATION];
        if self.config.auth.header != http::header::AUTHORIZATION {
            credentials.push(self.config.auth.header.clone());
        }
        let opts = ListenerOptions {
            header_read_timeout: self.config.server.header_read_timeout,
            credential_headers: credentials.into(),
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
        let (admin_local, admin_task) = match (&self.admin, &self.config.admin) {
            (Some(admin), Some(cfg)) => {
                let listener = TcpListener::bind(cfg.listen)
                    .await
                    .map_err(|e| fail(format!("binding admin {}: {e}", cfg.listen)))?;
                let local = listener.local_addr().map_err(fail)?;
                let admin = admin.clone();
                let admin_tls = match &cfg.tls {
                    Some(files) => Some(server::tls_acceptor(files).map_err(bad)?),
                    None => None,
                };
                let task = server::serve_listener(
                    listener,
                    admin_tls,
                    opts,
                    move |req, _peer| admin.clone().handle(req),
                    shutdown,
                );
                (Some(local), Some(task))
            }
            _ => (None, None),
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
            },
            serve,
        ))
    }

    /// Start watching the plans file when `[plans] watch` is on; the watch
    /// lasts as long as the returned handle.
    pub fn watch_plans(&self) -> Option<notify::RecommendedWatcher> {
        if self.config.plans.watch {
            watch_plans(
                self.core.clone(),
                self.config.plans.file.clone(),
                self.units.clone(),
            )
        } else {
            None
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
    let mut told = false;
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
            Ok(Err(StoreError::Unavailable(_) | StoreError::Timeout(_))) | Err(_) => {
                if !told {
                    tracing::warn!(
                        "counter store unreachable; its script check runs when it answers"
                    );
                    told = true;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Connect to Postgres; when it is down, connect lazily (the pool and the
/// LISTEN connection retry by themselves) so the gateway still starts.
async fn connect_postgres(url: &str, clock: SharedClock) -> Result<PostgresCatalog, CliError> {
    match PostgresCatalog::connect(url, clock.clone()).await {
        Ok(c) => Ok(c),
        Err(CatalogError::Unavailable(e)) => {
            tracing::error!(error = %e, "Postgres unavailable at start; retrying in the background");
            let opts = PgOptions {
                lazy: true,
                ..PgOptions::default()
            };
            PostgresCatalog::connect_with(url, clock, opts)
                .await
                .map_err(|e| bad(format!("[storage] postgres_url: {e}")))
        }
        Err(e) => Err(bad(format!("[storage] postgres_url: {e}"))),
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

/// Apply the plans file once the catalog answers (after a start without
/// Postgres).
async fn apply_when_available(catalog: Arc<dyn Catalog>, plans: crate::plans::PlanSet) {
    let mut backoff = Duration::from_millis(250);
    loop {
        match catalog.apply_plans(&plans, false).await {
            Ok(_) => {
                tracing::info!("Postgres is back: plans applied");
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
        let plans_file = app.config.plans.file.clone();
        tokio::spawn(async move {
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                tracing::warn!("cannot listen for SIGHUP");
                return;
            };
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading routes and plans");
                match Config::load(&config_path) {
                    Ok(config) => {
                        let known = config.known_units();
                        let fit = plans_fit_routes(&core, &plans_file, &known).await;
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
                App::reload_plans(&core, &plans_file, &units.load()).await;
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
    plans_file: &Path,
    known: &KnownUnits,
) -> Result<(), RoutesError> {
    let Ok(mut in_force) = core.catalog.list_plans().await else {
        tracing::warn!("catalog unavailable: new routes not checked against the plans in force");
        return Ok(());
    };
    if let Ok(file) = load_plans_off_runtime(plans_file, known).await {
        in_force.plans.retain(|id, _| !file.plans.contains_key(id));
    }
    check_plan_units(&in_force, known, "plans in force").map_err(RoutesError::Units)
}

/// Run a built app until SIGTERM/Ctrl-C: listeners, plan watching, SIGHUP.
pub async fn run(
    app: App,
    listen: Option<SocketAddr>,
    on_bound: impl FnOnce(&Bound),
) -> Result<(), CliError> {
    let (_tx, shutdown) = server::shutdown_on_signals();
    let (bound, serving) = app.bind(listen, shutdown).await?;
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
    let left = app.core.charges.drain(Duration::from_secs(10)).await;
    if left > 0 {
        tracing::error!(pending = left, "credit charges still unwritten at exit");
    }
    Ok(())
}

/// `plangate serve`.
pub async fn serve(config_path: &Path) -> Result<(), CliError> {
    let config = Config::load(config_path).map_err(bad)?;
    let app = App::build(config, Arc::new(SystemClock)).await?;
    run(app, None, |_| {}).await
}

/// Default config of `plangate dev`.
pub const DEV_CONFIG: &str = "config/dev.toml";

/// `plangate dev`: in-process stores, the example plans, a mock OpenAI
/// upstream, and a demo account whose key and credits are printed.
pub async fn dev(config_path: Option<&Path>, listen: Option<&str>) -> Result<(), CliError> {
    let path = config_path
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(DEV_CONFIG));
    let mut config = Config::load(&path).map_err(bad)?;
    if config.storage.postgres_url.is_some()
        || config.storage.redis_url.is_some()
        || !config.storage.redis_cluster.is_empty()
    {
        tracing::info!("dev mode ignores [storage] URLs: using in-process stores");
        config.storage.postgres_url = None;
        config.storage.redis_url = None;
        config.storage.redis_cluster.clear();
    }
    let listen: Option<SocketAddr> = match listen {
        Some(l) => Some(l.parse().map_err(|_| {
            bad(format!(
                "--listen {l}: not an address such as 127.0.0.1:8080"
            ))
        })?),
        None => None,
    };

    // The mock upstream listens where the config's first upstream points.
    let mock_addr = mock_address(&config)?;
    let mock_listener = TcpListener::bind(mock_addr)
        .await
        .map_err(|e| fail(format!("starting the mock upstream on {mock_addr}: {e}")))?;
    let mock = crate::mock::serve(mock_listener, crate::mock::MockOptions::default())
        .await
        .map_err(|e| fail(format!("starting the mock upstream on {mock_addr}: {e}")))?;

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
    let admin_token = app.config.admin.as_ref().map(|a| a.token.clone());
    let mock_local = mock.addr();
    let result = run(app, listen, move |bound| {
        print_dev_banner(
            bound,
            &key.key,
            plan.as_deref(),
            admin_token.as_deref(),
            mock_local,
        );
    })
    .await;
    mock.shutdown().await;
    result
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

fn mock_address(config: &Config) -> Result<SocketAddr, CliError> {
    let up = config
        .upstreams
        .first()
        .ok_or_else(|| bad("dev mode needs an upstream for its mock server"))?;
    let host = up.url.host().unwrap_or("127.0.0.1");
    let port = up.url.port_u16().unwrap_or(80);
    let host = if host == "localhost" {
        "127.0.0.1"
    } else {
        host
    };
    format!("{host}:{port}").parse().map_err(|_| {
        bad(format!(
            "upstream {}: dev mode needs an IP address, got {host}",
            up.name
        ))
    })
}

fn print_dev_banner(
    bound: &Bound,
    key: &str,
    plan: Option<&str>,
    admin_token: Option<&str>,
    mock: SocketAddr,
) {
    let base = format!("http://{}", bound.main);
    println!();
    println!("plangate dev is running (in-process stores; nothing is persisted)");
    println!("  gateway:        {base}");
    println!("  mock upstream:  http://{mock}");
    if let (Some(admin), Some(token)) = (bound.admin, admin_token) {
        println!("  admin API:      http://{admin}  (Authorization: Bearer {token})");
    }
    println!(
        "  demo account:   demo (plan {}), 1000 credits",
        plan.unwrap_or("-")
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
