//! Postgres catalog (deadpool-postgres + tokio-postgres) and embedded migrations.
//!
//! Invariants the schema enforces (migrations/V1__init.sql): at most one
//! default plan (partial unique index), a plan in use cannot be deleted
//! (FK `ON DELETE RESTRICT`), `credits_remaining >= 0` (CHECK), one ledger
//! row per idempotency key (UNIQUE); usage events (V2__usage.sql) are
//! unique by request id. Changes are announced with
//! `NOTIFY plangate_catalog`, which every instance LISTENs to.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::broadcast;
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, NoTls};

use super::{
    already_revoked, check_block_expiry, check_key_options, credits_left, merge_metadata,
    time_to_ms, trunc_micros, Attempted, DeletedAccount, KeyOptions, NewNotification, Notification,
    NotificationQuery, MAX_ACCOUNTS_PAGE,
};
use super::{
    check_billing_anchor, check_credits, check_grant, check_id, generate_id, generate_key,
    hash_key, ms_to_time, normalize_metadata, Account, AccountSummary, ApiKeyInfo, ApplyReport,
    Catalog, CatalogError, CatalogResult, CreditOp, CreditSnapshot, DeductResult, Deduction, Draw,
    GroupBy, Invalidation, KeyOwner, LedgerEntry, NewApiKey, QuotaBlock, UsageBucket, UsageCursor,
    UsageEvent, UsageQuery,
};
use crate::clock::SharedClock;
use crate::plans::parse::{plan_from_json, plan_to_json};
use crate::plans::{Plan, PlanSet};

mod deduct;
mod notifications;
mod usage;

pub use deduct::{BatchStats, MAX_BATCH};

/// The NOTIFY channel every instance listens on.
pub const CHANNEL: &str = "plangate_catalog";

/// `pg_advisory_lock` key held while migrating ("plangate" in ASCII).
const MIGRATE_LOCK: i64 = 0x706c_616e_6761_7465;
/// `pg_advisory_xact_lock` key serialising plan changes (default plan rules).
const PLANS_LOCK: i64 = 0x706c_616e_7331;

/// One embedded migration.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// `V<version>__<name>.sql`.
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration, in order. Append only: never edit a released one.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sql: include_str!("../../../migrations/V1__init.sql"),
    },
    Migration {
        version: 2,
        name: "usage",
        sql: include_str!("../../../migrations/V2__usage.sql"),
    },
    Migration {
        version: 3,
        name: "credit_version",
        sql: include_str!("../../../migrations/V3__credit_version.sql"),
    },
    Migration {
        version: 4,
        name: "lifecycle",
        sql: include_str!("../../../migrations/V4__lifecycle.sql"),
    },
    Migration {
        version: 5,
        name: "billing_anchor",
        sql: include_str!("../../../migrations/V5__billing_anchor.sql"),
    },
    Migration {
        version: 6,
        name: "key_plan",
        sql: include_str!("../../../migrations/V6__key_plan.sql"),
    },
    Migration {
        version: 7,
        name: "notifications",
        sql: include_str!("../../../migrations/V7__notifications.sql"),
    },
    Migration {
        version: 8,
        name: "usage_charge",
        sql: include_str!("../../../migrations/V8__usage_charge.sql"),
    },
];

/// What `migrate` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct MigrateReport {
    /// Versions applied by this run (empty when already up to date).
    pub applied: Vec<String>,
    /// Schema version after the run.
    pub version: i32,
}

/// Options for [`PostgresCatalog::connect_with`].
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Pooled connections (the LISTEN connection is extra).
    pub pool_size: usize,
    /// Run the LISTEN connection that feeds [`Catalog::subscribe`] with
    /// other instances' changes. Off for one-shot admin commands.
    pub listen: bool,
    /// Return at once without checking the database or waiting for
    /// LISTEN: a gateway must start (not ready) while Postgres is down
    /// and recover when it returns.
    pub lazy: bool,
    /// Bounds every step of getting a connection: the TCP connect and the
    /// whole start-up exchange (pool create), the wait for a pooled one,
    /// its recycling check, and each LISTEN (re)connection. A server that
    /// accepts and never answers costs at most this long per attempt,
    /// and no connection is left half-open. The gateway sets it to
    /// `[storage] catalog_timeout`; calls themselves are bounded by
    /// `catalog::timed::Timed`.
    pub timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            pool_size: 16,
            listen: true,
            lazy: false,
            timeout: Duration::from_secs(5),
        }
    }
}

/// See `parse_url`.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

fn parse_url(url: &str, timeout: Duration) -> CatalogResult<tokio_postgres::Config> {
    let mut cfg: tokio_postgres::Config = url
        .parse()
        .map_err(|e| CatalogError::Invalid(format!("invalid Postgres URL: {e}")))?;
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(timeout);
    }
    // Keepalives notice a silently dead peer, so the LISTEN connection
    // reconnects instead of waiting forever for notifications.
    cfg.keepalives(true);
    cfg.keepalives_idle(Duration::from_secs(10));
    // A path that drops packets leaves what was sent unacknowledged: the
    // kernel closes such a connection after this long (instead of after
    // ~15 minutes of retransmissions), so the pool replaces it rather
    // than handing it out again. A server that is stuck but whose kernel
    // still acknowledges is caught by the call timeouts instead.
    cfg.tcp_user_timeout(TCP_USER_TIMEOUT);
    cfg.application_name("plangate");
    Ok(cfg)
}

/// A database error as a catalog error: see [`describe_error`].
fn db_err(e: tokio_postgres::Error) -> CatalogError {
    CatalogError::Unavailable(describe_error(&e))
}

/// A tokio-postgres error for people (tokio-postgres alone prints just "db
/// error" or "error connecting to server"): the server's message and
/// SQLSTATE, with what to do about the mistakes an operator makes (wrong
/// password or user, a database that does not exist, a schema not
/// migrated); otherwise the chain of causes, e.g. "error connecting to
/// server: Connection refused (os error 111)". The host, port and
/// database are not in the error: callers that know the URL name it.
pub fn describe_error(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        if *code == SqlState::UNDEFINED_TABLE {
            return "the database schema is missing or outdated; run `plangate migrate`".into();
        }
        let hint = if *code == SqlState::INVALID_CATALOG_NAME {
            "; run `plangate migrate`, which creates it"
        } else if *code == SqlState::INVALID_PASSWORD {
            "; check the user and password in postgres_url"
        } else if *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION {
            "; check the user in postgres_url and the server's pg_hba.conf"
        } else {
            ""
        };
        return format!("{} ({}){hint}", db.message(), code.code());
    }
    // tokio-postgres keeps the cause (e.g. "Connection refused") in `source`.
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.ends_with(&text) {
            msg = format!("{msg}: {text}");
        }
        source = s.source();
    }
    msg
}

fn pool_err(e: deadpool_postgres::PoolError) -> CatalogError {
    use deadpool_postgres::{PoolError, TimeoutType};
    let why = match e {
        PoolError::Backend(e) => return db_err(e),
        PoolError::Timeout(TimeoutType::Create) => {
            "connecting timed out (the server accepted but did not answer in time)".to_owned()
        }
        PoolError::Timeout(TimeoutType::Wait) => {
            "no pooled connection came free in time (all busy)".to_owned()
        }
        PoolError::Timeout(TimeoutType::Recycle) => {
            "checking a pooled connection timed out".to_owned()
        }
        other => other.to_string(),
    };
    CatalogError::Unavailable(format!("Postgres connection: {why}"))
}

/// Inside an operation: a database error (maybe retryable) or a decided
/// catalog error.
enum PgErr {
    Db(tokio_postgres::Error),
    Catalog(CatalogError),
}

impl From<tokio_postgres::Error> for PgErr {
    fn from(e: tokio_postgres::Error) -> Self {
        PgErr::Db(e)
    }
}

impl From<CatalogError> for PgErr {
    fn from(e: CatalogError) -> Self {
        PgErr::Catalog(e)
    }
}

impl From<PgErr> for CatalogError {
    fn from(e: PgErr) -> Self {
        match e {
            PgErr::Db(e) => db_err(e),
            PgErr::Catalog(e) => e,
        }
    }
}

impl PgErr {
    fn code(&self) -> Option<&SqlState> {
        match self {
            PgErr::Db(e) => e.code(),
            PgErr::Catalog(_) => None,
        }
    }

    /// Deadlocks and serialization failures are worth a retry: the
    /// transaction did nothing.
    fn retryable(&self) -> bool {
        matches!(
            self.code(),
            Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED
                || *c == SqlState::T_R_SERIALIZATION_FAILURE
        )
    }
}

/// Map a foreign-key violation to NotFound of the referenced thing.
fn fk_not_found(e: tokio_postgres::Error, kind: &'static str, id: &str) -> PgErr {
    if e.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION) {
        PgErr::Catalog(CatalogError::not_found(kind, id))
    } else {
        PgErr::Db(e)
    }
}

/// A foreign key violation inserting a key: its plan (constraint
/// `api_keys_plan_id_fkey`) or else its account does not exist.
fn key_fk_not_found(e: tokio_postgres::Error, account_id: &str, plan: Option<&str>) -> PgErr {
    let on_plan = e
        .as_db_error()
        .and_then(|d| d.constraint())
        .is_some_and(|c| c == "api_keys_plan_id_fkey");
    match plan {
        Some(plan) if on_plan => PgErr::Catalog(CatalogError::not_found("plan", plan)),
        _ => fk_not_found(e, "account", account_id),
    }
}

const RETRIES: usize = 5;

/// Create or upgrade the schema at `url`. Safe to run twice and
/// concurrently: the whole run holds a session advisory lock, and each
/// migration commits together with its `schema_migrations` row.
pub async fn migrate(url: &str) -> CatalogResult<MigrateReport> {
    let cfg = parse_url(url, Duration::from_secs(5))?;
    let (mut client, conn) = cfg.connect(NoTls).await.map_err(db_err)?;
    let driver = tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "migration connection closed");
        }
    });
    let result = migrate_locked(&mut client).await;
    // Closing the session releases the advisory lock even if unlocking failed.
    drop(client);
    let _ = driver.await;
    result
}

/// Create the database `url` names when it does not exist (what a
/// first `plangate migrate` needs), connecting with the same credentials
/// to the server's `postgres` database (else `template1`). Returns the
/// name of the database created, `None` when it existed. Needs the
/// CREATEDB privilege only when it does create one.
pub async fn create_database_if_missing(url: &str) -> CatalogResult<Option<String>> {
    let cfg = parse_url(url, Duration::from_secs(5))?;
    match cfg.connect(NoTls).await {
        Ok(_) => return Ok(None),
        Err(e) if e.code() == Some(&SqlState::INVALID_CATALOG_NAME) => {}
        Err(e) => return Err(db_err(e)),
    }
    // libpq's default database is the user's name.
    let name = cfg
        .get_dbname()
        .or(cfg.get_user())
        .unwrap_or("postgres")
        .to_owned();
    let mut last = None;
    for maintenance in ["postgres", "template1"] {
        let mut admin = cfg.clone();
        admin.dbname(maintenance);
        let (client, conn) = match admin.connect(NoTls).await {
            Ok(pair) => pair,
            Err(e) => {
                last = Some(describe_error(&e));
                continue;
            }
        };
        let driver = tokio::spawn(conn);
        let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        let created = client.batch_execute(&sql).await;
        drop(client);
        let _ = driver.await;
        return match created {
            Ok(()) => Ok(Some(name)),
            // Created by a concurrent migrate in the meantime.
            Err(e) if e.code() == Some(&SqlState::DUPLICATE_DATABASE) => Ok(None),
            Err(e) => Err(CatalogError::Unavailable(format!(
                "database \"{name}\" does not exist and could not be created: {}; \
                 create it (e.g. createdb {name}) and run `plangate migrate` again",
                describe_error(&e)
            ))),
        };
    }
    Err(CatalogError::Unavailable(format!(
        "database \"{name}\" does not exist, and connecting to the server's `postgres` database to create it failed: {}",
        last.unwrap_or_default()
    )))
}

async fn migrate_locked(client: &mut tokio_postgres::Client) -> CatalogResult<MigrateReport> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATE_LOCK])
        .await
        .map_err(db_err)?;
    let result = apply_migrations(client).await;
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATE_LOCK])
        .await;
    result
}

async fn apply_migrations(client: &mut tokio_postgres::Client) -> CatalogResult<MigrateReport> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version     integer PRIMARY KEY,
                 name        text NOT NULL,
                 applied_at  timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await
        .map_err(db_err)?;
    let rows = client
        .query("SELECT version FROM schema_migrations", &[])
        .await
        .map_err(db_err)?;
    let done: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    let latest = MIGRATIONS.last().map_or(0, |m| m.version);
    if let Some(newer) = done.iter().copied().filter(|v| *v > latest).max() {
        return Err(CatalogError::Invalid(format!(
            "the database schema is at version {newer}, newer than this plangate ({latest})"
        )));
    }
    let mut report = MigrateReport::default();
    for m in MIGRATIONS {
        if done.contains(&m.version) {
            continue;
        }
        let tx = client.transaction().await.map_err(db_err)?;
        tx.batch_execute(m.sql).await.map_err(|e| {
            CatalogError::Unavailable(format!(
                "migration V{}__{} failed: {}",
                m.version,
                m.name,
                db_err(e)
            ))
        })?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[&m.version, &m.name],
        )
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        report.applied.push(format!("V{}__{}", m.version, m.name));
    }
    report.version = latest.max(done.iter().copied().max().unwrap_or(0));
    Ok(report)
}

/// Encode an invalidation as a NOTIFY payload.
fn encode(inv: &Invalidation) -> String {
    match inv {
        Invalidation::Plans => "plans".into(),
        // `Deaf` is local (never sent); should it be, it forgets all.
        Invalidation::All | Invalidation::Deaf => "all".into(),
        Invalidation::Account(id) => format!("account:{id}"),
        Invalidation::Key(hash) => format!("key:{hash}"),
        Invalidation::Credits { account, version } => format!("credits:{version}:{account}"),
    }
}

/// Decode a NOTIFY payload; anything unknown forgets everything.
fn decode(payload: &str) -> Invalidation {
    if payload == "plans" {
        Invalidation::Plans
    } else if let Some(id) = payload.strip_prefix("account:") {
        Invalidation::Account(id.to_string())
    } else if let Some(hash) = payload.strip_prefix("key:") {
        Invalidation::Key(hash.to_string())
    } else if let Some((version, account)) = payload
        .strip_prefix("credits:")
        .and_then(|rest| rest.split_once(':'))
        .and_then(|(v, a)| Some((v.parse().ok()?, a)))
    {
        Invalidation::Credits {
            account: account.to_string(),
            version,
        }
    } else {
        Invalidation::All
    }
}

/// The Postgres catalog. Dropping it stops its LISTEN task.
pub struct PostgresCatalog {
    pool: Pool,
    clock: SharedClock,
    events: broadcast::Sender<Invalidation>,
    listener: Option<tokio::task::AbortHandle>,
    /// See [`Catalog::invalidations_confirmed_ms`]; 0: never confirmed.
    confirmed_ms: Arc<AtomicU64>,
    /// The group commit of [`Catalog::deduct`].
    batcher: Arc<deduct::Batcher>,
}

impl std::fmt::Debug for PostgresCatalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresCatalog")
            .field("pool", &self.pool.status())
            .field("listening", &self.listener.is_some())
            .finish()
    }
}

impl Drop for PostgresCatalog {
    fn drop(&mut self) {
        if let Some(l) = &self.listener {
            l.abort();
        }
    }
}

impl PostgresCatalog {
    /// Connect with [`PgOptions::default`]: a pool of 16 and a LISTEN
    /// connection. Returns once the database answered and LISTEN is active.
    pub async fn connect(url: &str, clock: SharedClock) -> CatalogResult<Self> {
        Self::connect_with(url, clock, PgOptions::default()).await
    }

    /// Connect with explicit options.
    pub async fn connect_with(
        url: &str,
        clock: SharedClock,
        opts: PgOptions,
    ) -> CatalogResult<Self> {
        let cfg = parse_url(url, opts.timeout)?;
        let mgr = Manager::from_config(
            cfg.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(opts.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(opts.timeout))
            .create_timeout(Some(opts.timeout))
            .recycle_timeout(Some(opts.timeout))
            .build()
            .map_err(|e| CatalogError::Invalid(format!("Postgres pool: {e}")))?;
        let (events, _) = broadcast::channel(1024);
        let batcher = Arc::new(deduct::Batcher::new(pool.clone(), clock.clone()));
        let mut catalog = Self {
            pool,
            clock,
            events,
            listener: None,
            confirmed_ms: Arc::new(AtomicU64::new(0)),
            batcher,
        };
        if !opts.lazy {
            catalog.ping().await?;
        }
        if opts.listen {
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
            let heartbeat = Heartbeat {
                clock: catalog.clock.clone(),
                confirmed_ms: catalog.confirmed_ms.clone(),
            };
            let task = tokio::spawn(listen_loop(
                cfg,
                opts.timeout,
                catalog.events.clone(),
                ready_tx,
                heartbeat,
            ));
            catalog.listener = Some(task.abort_handle());
            if opts.lazy {
                return Ok(catalog);
            }
            match tokio::time::timeout(opts.timeout, ready_rx).await {
                Ok(Ok(())) => {}
                _ => {
                    return Err(CatalogError::Unavailable(
                        "could not start listening for catalog notifications".into(),
                    ))
                }
            }
        }
        Ok(catalog)
    }

    /// The connection pool (for tests and tools).
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// What the deduction batcher has done so far.
    pub fn batch_stats(&self) -> BatchStats {
        self.batcher.stats()
    }

    /// Apply `ds` as one batch, exactly as the batcher applies the
    /// deductions it finds pending (for tests and tools: `deduct` batches
    /// whatever is concurrent). One result per deduction, in order.
    pub async fn deduct_batch(&self, ds: &[Deduction]) -> Vec<CatalogResult<DeductResult>> {
        let mut out: Vec<Option<CatalogResult<DeductResult>>> = Vec::with_capacity(ds.len());
        let mut valid = Vec::with_capacity(ds.len());
        for d in ds {
            match check_credits(d.amount).and_then(|_| check_credits(d.min_balance)) {
                Ok(_) => {
                    out.push(None);
                    valid.push(d.clone());
                }
                Err(e) => out.push(Some(Err(e))),
            }
        }
        let mut applied = if valid.is_empty() {
            Vec::new()
        } else {
            self.batcher.apply(&valid).await
        }
        .into_iter();
        out.into_iter()
            .map(|r| {
                r.or_else(|| applied.next())
                    .expect("one result per deduction")
            })
            .collect()
    }

    /// One deduction in a transaction of its own, without the batcher (the
    /// path a failed batch falls back to; for comparisons).
    pub async fn deduct_unbatched(&self, d: &Deduction) -> CatalogResult<DeductResult> {
        deduct::deduct_one(&self.pool, &self.clock, d).await
    }

    fn now(&self) -> SystemTime {
        ms_to_time(self.clock.now_ms())
    }

    async fn conn(&self) -> Result<deadpool_postgres::Object, CatalogError> {
        self.pool.get().await.map_err(pool_err)
    }

    /// After an update of a live key (`row`: its `key_hash`, `None` when
    /// no live key matched): the caches are told to drop it; or the key
    /// was revoked already, or there is no such key.
    async fn key_changed(
        &self,
        conn: &deadpool_postgres::Object,
        key_id: &str,
        row: Option<tokio_postgres::Row>,
    ) -> CatalogResult<()> {
        let Some(row) = row else {
            let exists = conn
                .query_opt("SELECT 1 FROM api_keys WHERE id = $1", &[&key_id])
                .await
                .map_err(db_err)?;
            return Err(match exists {
                Some(_) => already_revoked(key_id),
                None => CatalogError::not_found("key", key_id),
            });
        };
        let inv = Invalidation::Key(row.get(0));
        notify_sql(conn, &inv).await.map_err(db_err)?;
        self.notify_local(inv);
        Ok(())
    }

    /// Tell this process at once; other instances hear it through the
    /// NOTIFY sent (inside the transaction, so only on commit) by
    /// [`notify_sql`].
    fn notify_local(&self, inv: Invalidation) {
        let _ = self.events.send(inv);
    }

    /// The decided charges and the refunds of a batch of wallet
    /// operations, in one transaction. Consecutive operations of one kind
    /// form a segment, one statement each, run in the order the wallet
    /// decided them (a refund may free credits a later charge drew): a
    /// charge segment inserts its ledger rows once per key and takes their
    /// draws from the blocks; a refund segment marks its ledger rows
    /// refunded, once, and gives their draws back.
    async fn record_credit_ops_tx(&self, account: &str, ops: &[CreditOp]) -> Result<(), PgErr> {
        let mut conn = self.conn().await?;
        let charge = conn
            .prepare_cached(
                "WITH acct AS (SELECT id FROM accounts WHERE id = $1),
                 ins AS (
                     INSERT INTO credit_ledger (idempotency_key, account_id, request_id, endpoint,
                                                requested, deducted, draws, created_at)
                     SELECT k, acct.id, r, e, q, d, w, t
                     FROM acct, unnest($2::text[], $3::text[], $4::text[], $5::int8[],
                                       $6::int8[], $7::jsonb[], $8::timestamptz[])
                          AS x(k, r, e, q, d, w, t)
                     ON CONFLICT (idempotency_key) DO NOTHING
                     RETURNING draws),
                 takes AS (
                     SELECT j->>'block_id' AS id, sum((j->>'credits')::int8) AS take
                     FROM ins, jsonb_array_elements(ins.draws) j GROUP BY 1)
                 UPDATE quota_blocks q SET credits_remaining = GREATEST(q.credits_remaining - takes.take, 0)
                 FROM takes WHERE q.id = takes.id",
            )
            .await?;
        let refund = conn
            .prepare_cached(
                "WITH r AS (
                     UPDATE credit_ledger l SET refunded = l.deducted, refunded_at = x.t
                     FROM unnest($1::text[], $2::timestamptz[]) AS x(k, t)
                     WHERE l.idempotency_key = x.k AND l.refunded_at IS NULL
                     RETURNING l.draws),
                 gives AS (
                     SELECT j->>'block_id' AS id, sum((j->>'credits')::int8) AS give
                     FROM r, jsonb_array_elements(r.draws) j GROUP BY 1)
                 UPDATE quota_blocks q
                 SET credits_remaining = LEAST(q.credits_remaining + gives.give, q.credits_granted)
                 FROM gives WHERE q.id = gives.id",
            )
            .await?;
        let tx = conn.transaction().await?;
        let decided = ops
            .iter()
            .filter(|op| !matches!(op, CreditOp::Charge { deducted: None, .. }));
        let mut rest: Vec<&CreditOp> = decided.collect();
        while !rest.is_empty() {
            let refunds = matches!(rest[0], CreditOp::Refund { .. });
            let n = rest
                .iter()
                .position(|op| matches!(op, CreditOp::Refund { .. }) != refunds)
                .unwrap_or(rest.len());
            let segment: Vec<&CreditOp> = rest.drain(..n).collect();
            if refunds {
                let (keys, at): (Vec<&str>, Vec<SystemTime>) = segment
                    .iter()
                    .filter_map(|op| match op {
                        CreditOp::Refund { key, at_ms } => Some((key.as_str(), ms_to_time(*at_ms))),
                        _ => None,
                    })
                    .unzip();
                tx.execute(&refund, &[&keys, &at]).await?;
            } else {
                let mut c = ChargeColumns::default();
                for op in segment {
                    c.push(op);
                }
                tx.execute(
                    &charge,
                    &[
                        &account,
                        &c.keys,
                        &c.request_ids,
                        &c.endpoints,
                        &c.requested,
                        &c.deducted,
                        &c.draws,
                        &c.created,
                    ],
                )
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn refund_tx(&self, key: &str) -> Result<u64, PgErr> {
        let now = self.now();
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        let row = tx
            .query_opt(
                "SELECT seq, draws, refunded_at IS NOT NULL, account_id FROM credit_ledger
                 WHERE idempotency_key = $1 FOR UPDATE",
                &[&key],
            )
            .await?;
        // A request's charge its usage event carries (V8): the same entry.
        let row = match (row, key.strip_prefix("req:")) {
            (Some(row), _) => Some((Some(row.get::<_, i64>(0)), row)),
            (None, Some(request_id)) => tx
                .query_opt(
                    "SELECT NULL, draws, refunded_at IS NOT NULL, account_id FROM usage_events
                     WHERE request_id = $1 AND credits_requested IS NOT NULL FOR UPDATE",
                    &[&request_id],
                )
                .await?
                .map(|row| (None, row)),
            (None, None) => None,
        };
        let Some((seq, row)) = row else {
            return Ok(0);
        };
        if row.get::<_, bool>(2) {
            return Ok(0);
        }
        let draws: Vec<Draw> = serde_json::from_value(row.get(1))
            .map_err(|e| CatalogError::Unavailable(format!("ledger row {key}: bad draws: {e}")))?;
        let ids: Vec<String> = draws.iter().map(|d| d.block_id.clone()).collect();
        // Lock in the deduction order so a refund and a deduction never
        // wait for each other in a cycle. Deleted blocks get nothing back.
        let existing = tx
            .query(
                "SELECT id FROM quota_blocks WHERE id = ANY($1)
                 ORDER BY expires_at ASC NULLS LAST, seq FOR UPDATE",
                &[&ids],
            )
            .await?;
        let existing: Vec<String> = existing.iter().map(|r| r.get(0)).collect();
        let (back_ids, back): (Vec<String>, Vec<i64>) = draws
            .iter()
            .filter(|d| existing.contains(&d.block_id))
            .map(|d| (d.block_id.clone(), d.credits as i64))
            .unzip();
        let refunded: i64 = back.iter().sum();
        if !back_ids.is_empty() {
            tx.execute(
                "UPDATE quota_blocks q SET credits_remaining = q.credits_remaining + x.give
                 FROM unnest($1::text[], $2::int8[]) AS x(id, give)
                 WHERE q.id = x.id",
                &[&back_ids, &back],
            )
            .await?;
        }
        match (seq, key.strip_prefix("req:")) {
            (Some(seq), _) => {
                tx.execute(
                    "UPDATE credit_ledger SET refunded = $2, refunded_at = $3 WHERE seq = $1",
                    &[&seq, &refunded, &now],
                )
                .await?
            }
            (None, request_id) => {
                tx.execute(
                    "UPDATE usage_events SET credits_refunded = $2, refunded_at = $3
                     WHERE request_id = $1",
                    &[&request_id, &refunded, &now],
                )
                .await?
            }
        };
        let account: String = row.get(3);
        let inv = bump_credits(&tx, &account).await?;
        tx.commit().await?;
        if let Some(inv) = inv {
            self.notify_local(inv);
        }
        Ok(refunded as u64)
    }

    async fn apply_tx(&self, plans: &PlanSet, prune: bool) -> Result<ApplyReport, PgErr> {
        let now = self.now();
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PLANS_LOCK])
            .await?;
        // One statement for every plan (ids are unique: they are the keys
        // of the set), so applying takes the same few round trips however
        // many plans there are, well within `catalog_timeout`.
        let (mut ids, mut names, mut policies) = (Vec::new(), Vec::new(), Vec::new());
        for (id, plan) in &plans.plans {
            ids.push(id.as_str());
            names.push(plan.name.as_str());
            policies.push(plan_to_json(plan));
        }
        tx.execute(
            "INSERT INTO plans (id, name, policy, created_at, updated_at)
             SELECT id, name, policy, $4, $4
             FROM unnest($1::text[], $2::text[], $3::jsonb[]) AS x(id, name, policy)
             ON CONFLICT (id) DO UPDATE
             SET name = EXCLUDED.name, policy = EXCLUDED.policy, updated_at = EXCLUDED.updated_at",
            &[&ids, &names, &policies, &now],
        )
        .await?;
        let current: Option<String> = tx
            .query_opt("SELECT id FROM plans WHERE is_default", &[])
            .await?
            .map(|r| r.get(0));
        let wanted = match (&plans.default_plan, current) {
            (Some(d), _) => Some(d.clone()),
            // The first plan ever applied becomes the default.
            (None, None) => plans.plans.keys().next().cloned(),
            (None, Some(_)) => None,
        };
        if let Some(d) = &wanted {
            set_default_in(&tx, d).await.map_err(|e| match e {
                PgErr::Catalog(CatalogError::NotFound { .. }) => PgErr::Catalog(
                    CatalogError::Invalid(format!("default_plan `{d}` names no plan")),
                ),
                e => e,
            })?;
        }
        let mut pruned = Vec::new();
        let mut kept_in_use = Vec::new();
        if prune {
            let names: Vec<String> = plans.plans.keys().cloned().collect();
            pruned = tx
                .query(
                    "DELETE FROM plans p
                     WHERE NOT (p.id = ANY($1)) AND NOT p.is_default
                       AND NOT EXISTS (SELECT 1 FROM accounts a WHERE a.plan_id = p.id)
                       AND NOT EXISTS (SELECT 1 FROM api_keys k WHERE k.plan_id = p.id)
                     RETURNING p.id",
                    &[&names],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            kept_in_use = tx
                .query("SELECT id FROM plans WHERE NOT (id = ANY($1))", &[&names])
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            pruned.sort();
            kept_in_use.sort();
        }
        let default_plan: Option<String> = tx
            .query_opt("SELECT id FROM plans WHERE is_default", &[])
            .await?
            .map(|r| r.get(0));
        let changed = !plans.plans.is_empty() || !pruned.is_empty();
        if changed {
            notify_sql(&tx, &Invalidation::Plans).await?;
        }
        tx.commit().await?;
        if changed {
            self.notify_local(Invalidation::Plans);
        }
        Ok(ApplyReport {
            upserted: plans.plans.keys().cloned().collect(),
            pruned,
            kept_in_use,
            default_plan,
        })
    }

    async fn delete_plan_tx(&self, id: &str) -> Result<(), PgErr> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PLANS_LOCK])
            .await?;
        let row = tx
            .query_opt("SELECT is_default FROM plans WHERE id = $1", &[&id])
            .await?
            .ok_or_else(|| CatalogError::not_found("plan", id))?;
        if row.get::<_, bool>(0) {
            return Err(CatalogError::Conflict(format!(
                "plan `{id}` is the default plan; make another plan the default first"
            ))
            .into());
        }
        // The foreign key refuses a plan in use; its violation is the check.
        match tx.execute("DELETE FROM plans WHERE id = $1", &[&id]).await {
            Err(e) if e.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION) => {
                return Err(CatalogError::Conflict(format!(
                    "plan `{id}` is in use by accounts or keys"
                ))
                .into())
            }
            r => r?,
        };
        notify_sql(&tx, &Invalidation::Plans).await?;
        tx.commit().await?;
        self.notify_local(Invalidation::Plans);
        Ok(())
    }

    async fn set_default_tx(&self, id: &str) -> Result<(), PgErr> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PLANS_LOCK])
            .await?;
        set_default_in(&tx, id).await?;
        notify_sql(&tx, &Invalidation::Plans).await?;
        tx.commit().await?;
        self.notify_local(Invalidation::Plans);
        Ok(())
    }

    async fn require_account(
        &self,
        conn: &deadpool_postgres::Object,
        id: &str,
    ) -> CatalogResult<()> {
        let stmt = conn
            .prepare_cached("SELECT 1 FROM accounts WHERE id = $1")
            .await
            .map_err(db_err)?;
        match conn.query_opt(&stmt, &[&id]).await.map_err(db_err)? {
            Some(_) => Ok(()),
            None => Err(CatalogError::not_found("account", id)),
        }
    }
}

/// Send a NOTIFY (delivered when the surrounding transaction commits).
async fn notify_sql<C: deadpool_postgres::GenericClient>(
    client: &C,
    inv: &Invalidation,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &encode(inv)])
        .await
        .map(|_| ())
}

/// Make `id` the default inside a transaction holding [`PLANS_LOCK`]. Two
/// statements, so the single-default index never sees two defaults.
async fn set_default_in(tx: &deadpool_postgres::Transaction<'_>, id: &str) -> Result<(), PgErr> {
    if tx
        .query_opt("SELECT 1 FROM plans WHERE id = $1", &[&id])
        .await?
        .is_none()
    {
        return Err(CatalogError::not_found("plan", id).into());
    }
    tx.execute(
        "UPDATE plans SET is_default = false WHERE is_default AND id <> $1",
        &[&id],
    )
    .await?;
    tx.execute("UPDATE plans SET is_default = true WHERE id = $1", &[&id])
        .await?;
    Ok(())
}

/// Bump an account's credit version inside `client`'s transaction and
/// queue the NOTIFY (sent on commit); `None` if the account does not exist.
async fn bump_credits<C: deadpool_postgres::GenericClient>(
    client: &C,
    account: &str,
) -> Result<Option<Invalidation>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "UPDATE accounts SET credit_version = credit_version + 1 WHERE id = $1
             RETURNING credit_version",
            &[&account],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    let inv = Invalidation::Credits {
        account: account.to_owned(),
        version: row.get::<_, i64>(0) as u64,
    };
    notify_sql(client, &inv).await?;
    Ok(Some(inv))
}

/// Balance of an account (`None` if it does not exist).
async fn balance_of<C: deadpool_postgres::GenericClient>(
    client: &C,
    account: &str,
    now: SystemTime,
) -> Result<Option<u64>, tokio_postgres::Error> {
    let stmt = client
        .prepare_cached(
            "SELECT (SELECT LEAST(COALESCE(SUM(q.credits_remaining), 0), 9223372036854775807)::int8
                     FROM quota_blocks q
                     WHERE q.account_id = a.id AND (q.expires_at IS NULL OR q.expires_at > $2))
             FROM accounts a WHERE a.id = $1",
        )
        .await?;
    Ok(client
        .query_opt(&stmt, &[&account, &now])
        .await?
        .map(|r| r.get::<_, i64>(0) as u64))
}

fn block_from_row(row: &tokio_postgres::Row) -> QuotaBlock {
    QuotaBlock {
        id: row.get("id"),
        account_id: row.get("account_id"),
        credits_granted: row.get::<_, i64>("credits_granted") as u64,
        credits_remaining: row.get::<_, i64>("credits_remaining") as u64,
        expires_at: row.get("expires_at"),
        metadata: row.get("metadata"),
        created_at: Some(row.get("created_at")),
    }
}

const BLOCK_COLUMNS: &str =
    "id, account_id, credits_granted, credits_remaining, expires_at, metadata, created_at";

/// Decided charges as the columns of one `unnest` insert.
#[derive(Default)]
struct ChargeColumns<'a> {
    keys: Vec<&'a str>,
    request_ids: Vec<&'a str>,
    endpoints: Vec<&'a str>,
    requested: Vec<i64>,
    deducted: Vec<i64>,
    draws: Vec<serde_json::Value>,
    created: Vec<SystemTime>,
}

impl<'a> ChargeColumns<'a> {
    fn push(&mut self, op: &'a CreditOp) {
        if let CreditOp::Charge {
            key,
            request_id,
            endpoint,
            requested,
            deducted: Some(deducted),
            draws,
            at_ms,
        } = op
        {
            self.keys.push(key);
            self.request_ids.push(request_id);
            self.endpoints.push(endpoint);
            self.requested.push(clamp_i64(*requested));
            self.deducted.push(clamp_i64((*deducted).min(*requested)));
            self.draws.push(draws_json(draws));
            self.created.push(ms_to_time(*at_ms));
        }
    }
}

/// Two ledger lists, each in its own order, merged by `created_at` (ties:
/// `a` first), keeping each list's order.
fn merge_by_time(a: Vec<LedgerEntry>, b: Vec<LedgerEntry>) -> Vec<LedgerEntry> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let mut b = b.into_iter().peekable();
    for e in a {
        while b.peek().is_some_and(|x| x.created_at < e.created_at) {
            out.extend(b.next());
        }
        out.push(e);
    }
    out.extend(b);
    out
}

/// Draws as the ledger stores them: `[{"block_id": "...", "credits": n}]`.
fn draws_json(draws: &[Draw]) -> serde_json::Value {
    serde_json::to_value(draws).unwrap_or_default()
}

/// [`BLOCK_COLUMNS`] of a table aliased `q`.
const BLOCK_COLUMNS_Q: &str = "q.id, q.account_id, q.credits_granted, q.credits_remaining, \
     q.expires_at, q.metadata, q.created_at";

/// An amount as Postgres `bigint` (amounts are at most `MAX_AMOUNT`).
fn clamp_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn parse_plan(id: &str, policy: &serde_json::Value) -> CatalogResult<Arc<Plan>> {
    plan_from_json(id, policy)
        .map(Arc::new)
        .map_err(|e| CatalogError::Unavailable(format!("stored plan `{id}` is unreadable: {e}")))
}

/// How often the LISTEN connection proves it still hears notifications.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// Where the LISTEN connection records its last proof of hearing.
struct Heartbeat {
    clock: SharedClock,
    confirmed_ms: Arc<AtomicU64>,
}

impl Heartbeat {
    /// Round-trip a query on the LISTEN connection every
    /// [`HEARTBEAT_EVERY`] until one fails. Postgres sends a listening
    /// session its pending notifications before the answer to its next
    /// query, and the connection task forwards them as it reads them, so
    /// when the answer arrives every change committed before the query was
    /// sent has been delivered: record the send time.
    async fn run(&self, client: &tokio_postgres::Client) {
        loop {
            let sent = self.clock.now_ms();
            match tokio::time::timeout(HEARTBEAT_EVERY * 2, client.simple_query("SELECT 1")).await {
                Ok(Ok(_)) => self.confirmed_ms.store(sent.max(1), Ordering::Release),
                Ok(Err(e)) => {
                    tracing::warn!(error = %describe_error(&e), "catalog LISTEN heartbeat failed");
                    return;
                }
                Err(_) => {
                    tracing::warn!("catalog LISTEN heartbeat timed out");
                    return;
                }
            }
            tokio::time::sleep(HEARTBEAT_EVERY).await;
        }
    }
}

/// Keep a LISTEN connection open for the catalog's lifetime, forwarding
/// notifications; after a reconnect send [`Invalidation::All`], since
/// anything may have changed while it was down. Connecting and the
/// `LISTEN` itself are bounded by `timeout`: `connect_timeout` covers only
/// the TCP connect, and a server that accepts but never answers would
/// otherwise hold the start-up exchange, and this loop, forever.
async fn listen_loop(
    cfg: tokio_postgres::Config,
    timeout: Duration,
    events: broadcast::Sender<Invalidation>,
    ready: tokio::sync::oneshot::Sender<()>,
    heartbeat: Heartbeat,
) {
    let mut ready = Some(ready);
    let mut backoff = Duration::from_millis(250);
    let mut told = crate::health::LogThrottle::new(crate::health::REPEAT_EVERY);
    loop {
        let connected = match tokio::time::timeout(timeout, cfg.connect(NoTls)).await {
            Ok(result) => result.map_err(|e| describe_error(&e)),
            Err(_) => Err(format!(
                "no answer within {}",
                humantime::format_duration(timeout)
            )),
        };
        match connected {
            Ok((client, mut conn)) => {
                told.reset();
                let tx = events.clone();
                let driver = tokio::spawn(async move {
                    loop {
                        match futures_util::future::poll_fn(|cx| conn.poll_message(cx)).await {
                            Some(Ok(AsyncMessage::Notification(n))) => {
                                let _ = tx.send(decode(n.payload()));
                            }
                            Some(Ok(_)) => {}
                            Some(Err(e)) => {
                                tracing::warn!(error = %describe_error(&e), "catalog LISTEN connection failed");
                                break;
                            }
                            None => break,
                        }
                    }
                });
                let listen = format!("LISTEN {CHANNEL}");
                let listening =
                    match tokio::time::timeout(timeout, client.batch_execute(&listen)).await {
                        Ok(result) => result.map_err(|e| describe_error(&e)),
                        Err(_) => Err(format!(
                            "no answer within {}",
                            humantime::format_duration(timeout)
                        )),
                    };
                match listening {
                    Ok(()) => {
                        backoff = Duration::from_millis(250);
                        match ready.take() {
                            Some(r) => {
                                let _ = r.send(());
                            }
                            None => {
                                tracing::info!("catalog LISTEN connection re-established");
                                let _ = events.send(Invalidation::All);
                            }
                        }
                        let mut driver = driver;
                        tokio::select! {
                            _ = &mut driver => {}
                            _ = heartbeat.run(&client) => driver.abort(),
                        }
                        // Caches must not trust what they hold while deaf.
                        let _ = events.send(Invalidation::Deaf);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "LISTEN failed");
                        driver.abort();
                    }
                }
                drop(client);
            }
            // While Postgres stays down this repeats every few seconds:
            // said once per `REPEAT_EVERY` (the store watch says it at
            // ERROR, with the URL).
            Err(e) => {
                if let Some(repeats) = told.ready(std::time::Instant::now()) {
                    tracing::warn!(error = %e, retry_in = ?backoff, repeats, "catalog LISTEN connection failed");
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Retry a transaction body on deadlock or serialization failure.
macro_rules! retrying {
    ($body:expr) => {{
        let mut attempt = 0;
        loop {
            match $body.await {
                Err(e) if e.retryable() && attempt < RETRIES => attempt += 1,
                r => break r.map_err(CatalogError::from),
            }
        }
    }};
}

#[async_trait::async_trait]
impl Catalog for PostgresCatalog {
    async fn apply_plans(&self, plans: &PlanSet, prune: bool) -> CatalogResult<ApplyReport> {
        for id in plans.plans.keys() {
            check_id("plan", id)?;
        }
        retrying!(self.apply_tx(plans, prune))
    }

    async fn list_plans(&self) -> CatalogResult<PlanSet> {
        let conn = self.conn().await?;
        let rows = conn
            .query("SELECT id, policy, is_default FROM plans", &[])
            .await
            .map_err(db_err)?;
        let mut set = PlanSet::default();
        for r in rows {
            let id: String = r.get(0);
            let plan = parse_plan(&id, &r.get(1))?;
            if r.get::<_, bool>(2) {
                set.default_plan = Some(id.clone());
            }
            set.plans.insert(id, plan);
        }
        Ok(set)
    }

    async fn get_plan(&self, id: &str) -> CatalogResult<Arc<Plan>> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt("SELECT policy FROM plans WHERE id = $1", &[&id])
            .await
            .map_err(db_err)?
            .ok_or_else(|| CatalogError::not_found("plan", id))?;
        parse_plan(id, &row.get(0))
    }

    async fn delete_plan(&self, id: &str) -> CatalogResult<()> {
        retrying!(self.delete_plan_tx(id))
    }

    async fn default_plan(&self) -> CatalogResult<Option<String>> {
        let conn = self.conn().await?;
        Ok(conn
            .query_opt("SELECT id FROM plans WHERE is_default", &[])
            .await
            .map_err(db_err)?
            .map(|r| r.get(0)))
    }

    async fn set_default_plan(&self, id: &str) -> CatalogResult<()> {
        retrying!(self.set_default_tx(id))
    }

    async fn create_account(
        &self,
        id: &str,
        plan_id: Option<&str>,
        metadata: serde_json::Value,
    ) -> CatalogResult<Account> {
        check_id("account", id)?;
        let metadata = normalize_metadata(metadata)?;
        let now = self.now();
        let conn = self.conn().await?;
        let n = conn
            .execute(
                "INSERT INTO accounts (id, plan_id, metadata, created_at, credit_version)
                 VALUES ($1, $2, $3, $4,
                         COALESCE((SELECT credit_version FROM deleted_accounts WHERE id = $1), 0))
                 ON CONFLICT (id) DO NOTHING",
                &[&id, &plan_id, &metadata, &now],
            )
            .await
            .map_err(|e| CatalogError::from(fk_not_found(e, "plan", plan_id.unwrap_or(""))))?;
        if n == 0 {
            return Err(CatalogError::Conflict(format!(
                "account `{id}` already exists"
            )));
        }
        notify_sql(&conn, &Invalidation::Account(id.to_string()))
            .await
            .map_err(db_err)?;
        self.notify_local(Invalidation::Account(id.to_string()));
        drop(conn);
        self.get_account(id).await
    }

    async fn assign_plan(&self, account_id: &str, plan_id: Option<&str>) -> CatalogResult<()> {
        let conn = self.conn().await?;
        let n = conn
            .execute(
                "UPDATE accounts SET plan_id = $2 WHERE id = $1",
                &[&account_id, &plan_id],
            )
            .await
            .map_err(|e| CatalogError::from(fk_not_found(e, "plan", plan_id.unwrap_or(""))))?;
        if n == 0 {
            return Err(CatalogError::not_found("account", account_id));
        }
        let inv = Invalidation::Account(account_id.to_string());
        notify_sql(&conn, &inv).await.map_err(db_err)?;
        self.notify_local(inv);
        Ok(())
    }

    async fn get_account(&self, id: &str) -> CatalogResult<Account> {
        let conn = self.conn().await?;
        let stmt = conn
            .prepare_cached(
                "SELECT a.plan_id, a.metadata, (SELECT p.id FROM plans p WHERE p.is_default),
                        a.billing_anchor
                 FROM accounts a WHERE a.id = $1",
            )
            .await
            .map_err(db_err)?;
        let row = conn
            .query_opt(&stmt, &[&id])
            .await
            .map_err(db_err)?
            .ok_or_else(|| CatalogError::not_found("account", id))?;
        let plan_id: Option<String> = row.get(0);
        let default: Option<String> = row.get(2);
        let anchor: Option<i16> = row.get(3);
        Ok(Account {
            id: id.to_string(),
            effective_plan: plan_id.clone().or(default),
            plan_id,
            metadata: row.get(1),
            // The column's CHECK keeps it within 1 to 31.
            billing_anchor: anchor.and_then(|a| u8::try_from(a).ok()),
        })
    }

    async fn list_accounts(
        &self,
        plan: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> CatalogResult<Vec<Account>> {
        let conn = self.conn().await?;
        if let Some(p) = plan {
            let found = conn
                .query_opt("SELECT 1 FROM plans WHERE id = $1", &[&p])
                .await
                .map_err(db_err)?;
            if found.is_none() {
                return Err(CatalogError::not_found("plan", p));
            }
        }
        let limit = limit.min(MAX_ACCOUNTS_PAGE + 1) as i64;
        let stmt = conn
            .prepare_cached(
                "WITH d AS (SELECT id FROM plans WHERE is_default)
                 SELECT a.id, a.plan_id, a.metadata, (SELECT id FROM d), a.billing_anchor
                 FROM accounts a
                 WHERE ($1::text IS NULL OR a.id COLLATE \"C\" > $1::text COLLATE \"C\")
                   AND ($2::text IS NULL OR COALESCE(a.plan_id, (SELECT id FROM d)) = $2::text)
                 ORDER BY a.id COLLATE \"C\"
                 LIMIT $3",
            )
            .await
            .map_err(db_err)?;
        let rows = conn
            .query(&stmt, &[&after, &plan, &limit])
            .await
            .map_err(db_err)?;
        Ok(rows
            .iter()
            .map(|r| {
                let plan_id: Option<String> = r.get(1);
                let default: Option<String> = r.get(3);
                let anchor: Option<i16> = r.get(4);
                Account {
                    id: r.get(0),
                    effective_plan: plan_id.clone().or(default),
                    plan_id,
                    metadata: r.get(2),
                    billing_anchor: anchor.and_then(|a| u8::try_from(a).ok()),
                }
            })
            .collect())
    }

    async fn search_accounts(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> CatalogResult<Vec<AccountSummary>> {
        let now = self.now();
        let conn = self.conn().await?;
        let limit = limit.min(MAX_ACCOUNTS_PAGE + 1) as i64;
        let upper = super::prefix_upper_bound(prefix);
        // `prefix <= id < upper` on the bytewise index (accounts_id_bytewise):
        // one range scan stopped by the limit, whatever the table's size.
        // Balance and last use: one index probe each per row shown.
        let stmt = conn
            .prepare_cached(
                "WITH d AS (SELECT id FROM plans WHERE is_default)
                 SELECT a.id, a.plan_id, a.metadata, (SELECT id FROM d), a.billing_anchor,
                   (SELECT LEAST(COALESCE(SUM(q.credits_remaining), 0), 9223372036854775807)::int8
                      FROM quota_blocks q
                      WHERE q.account_id = a.id AND (q.expires_at IS NULL OR q.expires_at > $5)),
                   (SELECT max(u.ended_at) FROM usage_events u
                      WHERE u.account_id = a.id COLLATE \"C\")
                 FROM accounts a
                 WHERE a.id COLLATE \"C\" >= $1::text COLLATE \"C\"
                   AND ($2::text IS NULL OR a.id COLLATE \"C\" < $2::text COLLATE \"C\")
                   AND ($3::text IS NULL OR a.id COLLATE \"C\" > $3::text COLLATE \"C\")
                 ORDER BY a.id COLLATE \"C\"
                 LIMIT $4",
            )
            .await
            .map_err(db_err)?;
        let rows = conn
            .query(&stmt, &[&prefix, &upper, &after, &limit, &now])
            .await
            .map_err(db_err)?;
        Ok(rows
            .iter()
            .map(|r| {
                let plan_id: Option<String> = r.get(1);
                let default: Option<String> = r.get(3);
                let anchor: Option<i16> = r.get(4);
                AccountSummary {
                    account: Account {
                        id: r.get(0),
                        effective_plan: plan_id.clone().or(default),
                        plan_id,
                        metadata: r.get(2),
                        billing_anchor: anchor.and_then(|a| u8::try_from(a).ok()),
                    },
                    balance: r.get::<_, i64>(5) as u64,
                    last_seen: r.get(6),
                }
            })
            .collect())
    }

    async fn update_account_metadata(
        &self,
        id: &str,
        patch: &serde_json::Map<String, serde_json::Value>,
    ) -> CatalogResult<Account> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await.map_err(db_err)?;
        let row = tx
            .query_opt(
                "SELECT metadata FROM accounts WHERE id = $1 FOR NO KEY UPDATE",
                &[&id],
            )
            .await
            .map_err(db_err)?
            .ok_or_else(|| CatalogError::not_found("account", id))?;
        let metadata = merge_metadata(&row.get(0), patch);
        tx.execute(
            "UPDATE accounts SET metadata = $2 WHERE id = $1",
            &[&id, &metadata],
        )
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        drop(conn);
        self.get_account(id).await
    }

    async fn delete_account(&self, id: &str, force: bool) -> CatalogResult<DeletedAccount> {
        let now = self.now();
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await.map_err(db_err)?;
        // Locked against grants, deductions (their ledger rows check the
        // account FOR KEY SHARE) and wallet writes while it goes.
        let locked = tx
            .query_opt(
                "SELECT credit_version FROM accounts WHERE id = $1 FOR UPDATE",
                &[&id],
            )
            .await
            .map_err(db_err)?;
        let Some(locked) = locked else {
            return Err(CatalogError::not_found("account", id));
        };
        // The deletion's version is past every version the account had:
        // wallets of it are dropped everywhere, and an account created
        // again under the id starts from it.
        let version = locked.get::<_, i64>(0) + 1;
        let credits = balance_of(&tx, id, now).await.map_err(db_err)?.unwrap_or(0);
        if credits > 0 && !force {
            return Err(credits_left(id, credits));
        }
        let keys = tx
            .query(
                "DELETE FROM api_keys WHERE account_id = $1 RETURNING key_hash",
                &[&id],
            )
            .await
            .map_err(db_err)?;
        let blocks = tx
            .execute("DELETE FROM quota_blocks WHERE account_id = $1", &[&id])
            .await
            .map_err(db_err)?;
        tx.execute("DELETE FROM accounts WHERE id = $1", &[&id])
            .await
            .map_err(db_err)?;
        tx.execute(
            "INSERT INTO deleted_accounts (id, credit_version, deleted_at) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO UPDATE
             SET credit_version = EXCLUDED.credit_version, deleted_at = EXCLUDED.deleted_at",
            &[&id, &version, &now],
        )
        .await
        .map_err(db_err)?;
        let mut invs: Vec<Invalidation> =
            keys.iter().map(|r| Invalidation::Key(r.get(0))).collect();
        invs.push(Invalidation::Account(id.to_string()));
        invs.push(Invalidation::Credits {
            account: id.to_string(),
            version: version as u64,
        });
        for inv in &invs {
            notify_sql(&tx, inv).await.map_err(db_err)?;
        }
        tx.commit().await.map_err(db_err)?;
        for inv in invs {
            self.notify_local(inv);
        }
        Ok(DeletedAccount {
            id: id.to_string(),
            keys: keys.len() as u64,
            blocks,
            credits_forfeited: credits,
        })
    }

    async fn set_billing_anchor(&self, account_id: &str, anchor: Option<u8>) -> CatalogResult<()> {
        check_billing_anchor(anchor)?;
        let conn = self.conn().await?;
        let n = conn
            .execute(
                "UPDATE accounts SET billing_anchor = $2 WHERE id = $1",
                &[&account_id, &anchor.map(i16::from)],
            )
            .await
            .map_err(db_err)?;
        if n == 0 {
            return Err(CatalogError::not_found("account", account_id));
        }
        notify_sql(&conn, &Invalidation::Account(account_id.to_string()))
            .await
            .map_err(db_err)?;
        self.notify_local(Invalidation::Account(account_id.to_string()));
        Ok(())
    }

    async fn create_key_with(
        &self,
        account_id: &str,
        opts: &KeyOptions,
    ) -> CatalogResult<NewApiKey> {
        let (key, prefix) = generate_key();
        let hash = hash_key(&key);
        let id = generate_id("key_");
        let now = self.now();
        check_key_options(opts, now)?;
        let conn = self.conn().await?;
        conn.execute(
            "INSERT INTO api_keys (id, account_id, key_hash, prefix, created_at, label, expires_at, plan_id)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &id,
                &account_id,
                &hash,
                &prefix,
                &now,
                &opts.label,
                &opts.expires_at,
                &opts.plan,
            ],
        )
        .await
        .map_err(|e| CatalogError::from(key_fk_not_found(e, account_id, opts.plan.as_deref())))?;
        // Only matters to a cache holding a negative entry for this hash.
        let inv = Invalidation::Key(hash);
        notify_sql(&conn, &inv).await.map_err(db_err)?;
        self.notify_local(inv);
        Ok(NewApiKey { id, key, prefix })
    }

    async fn lookup_key(&self, key_hash: &str) -> CatalogResult<Option<KeyOwner>> {
        let conn = self.conn().await?;
        let stmt = conn
            .prepare_cached(
                "SELECT id, account_id, expires_at, plan_id FROM api_keys
                 WHERE key_hash = $1 AND revoked_at IS NULL
                   AND (expires_at IS NULL OR expires_at > $2)",
            )
            .await
            .map_err(db_err)?;
        Ok(conn
            .query_opt(&stmt, &[&key_hash, &self.now()])
            .await
            .map_err(db_err)?
            .map(|r| KeyOwner {
                key_id: r.get(0),
                account_id: r.get(1),
                expires_at_ms: r.get::<_, Option<SystemTime>>(2).map(time_to_ms),
                plan_id: r.get(3),
            }))
    }

    async fn revoke_key(&self, key_id: &str) -> CatalogResult<()> {
        let now = self.now();
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                "UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL
                 RETURNING key_hash",
                &[&key_id, &now],
            )
            .await
            .map_err(db_err)?;
        self.key_changed(&conn, key_id, row).await
    }

    async fn list_keys(&self, account_id: &str) -> CatalogResult<Vec<ApiKeyInfo>> {
        let conn = self.conn().await?;
        self.require_account(&conn, account_id).await?;
        let rows = conn
            .query(
                "SELECT id, prefix, created_at, revoked_at IS NOT NULL, label, expires_at, plan_id
                 FROM api_keys WHERE account_id = $1 ORDER BY seq",
                &[&account_id],
            )
            .await
            .map_err(db_err)?;
        Ok(rows
            .iter()
            .map(|r| ApiKeyInfo {
                id: r.get(0),
                account_id: account_id.to_string(),
                prefix: r.get(1),
                created_at: Some(r.get(2)),
                revoked: r.get(3),
                label: r.get(4),
                expires_at: r.get(5),
                plan_id: r.get(6),
            })
            .collect())
    }

    async fn set_key_plan(&self, key_id: &str, plan_id: Option<&str>) -> CatalogResult<()> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                "UPDATE api_keys SET plan_id = $2 WHERE id = $1 AND revoked_at IS NULL
                 RETURNING key_hash",
                &[&key_id, &plan_id],
            )
            .await
            .map_err(|e| match plan_id {
                Some(plan) if e.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION) => {
                    CatalogError::not_found("plan", plan)
                }
                _ => db_err(e),
            })?;
        // Caches hold the key's owner, plan included: reload it.
        self.key_changed(&conn, key_id, row).await
    }

    async fn create_quota_block(
        &self,
        account_id: &str,
        credits: u64,
        expires_at: Option<SystemTime>,
        metadata: serde_json::Value,
    ) -> CatalogResult<QuotaBlock> {
        let credits = check_credits(credits)?;
        let metadata = normalize_metadata(metadata)?;
        let id = generate_id("qb_");
        let now = self.now();
        check_block_expiry(expires_at.map(trunc_micros), now)?;
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await.map_err(db_err)?;
        // The account row, locked against concurrent grants (FOR NO KEY
        // UPDATE does not block deductions, whose ledger rows only take
        // KEY SHARE on it), so that the balance check below holds when
        // the block is inserted.
        let locked = tx
            .query_opt(
                "SELECT 1 FROM accounts WHERE id = $1 FOR NO KEY UPDATE",
                &[&account_id],
            )
            .await
            .map_err(db_err)?;
        if locked.is_none() {
            return Err(CatalogError::not_found("account", account_id));
        }
        let balance = balance_of(&tx, account_id, now)
            .await
            .map_err(db_err)?
            .unwrap_or(0);
        check_grant(account_id, balance, credits as u64)?;
        let row = tx
            .query_one(
                &format!(
                    "INSERT INTO quota_blocks
                         (id, account_id, credits_granted, credits_remaining, expires_at, metadata, created_at)
                     VALUES ($1, $2, $3, $3, $4, $5, $6)
                     RETURNING {BLOCK_COLUMNS}"
                ),
                &[&id, &account_id, &credits, &expires_at, &metadata, &now],
            )
            .await
            .map_err(|e| CatalogError::from(fk_not_found(e, "account", account_id)))?;
        let inv = bump_credits(&tx, account_id).await.map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        if let Some(inv) = inv {
            self.notify_local(inv);
        }
        Ok(block_from_row(&row))
    }

    async fn delete_quota_block(&self, block_id: &str) -> CatalogResult<()> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await.map_err(db_err)?;
        let row = tx
            .query_opt(
                "DELETE FROM quota_blocks WHERE id = $1 RETURNING account_id",
                &[&block_id],
            )
            .await
            .map_err(db_err)?;
        let Some(row) = row else {
            return Err(CatalogError::not_found("quota block", block_id));
        };
        let account: String = row.get(0);
        let inv = bump_credits(&tx, &account).await.map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        if let Some(inv) = inv {
            self.notify_local(inv);
        }
        Ok(())
    }

    async fn expire_quota_blocks(&self, account_id: &str) -> CatalogResult<u64> {
        let now = self.now();
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await.map_err(db_err)?;
        let row = tx
            .query_one(
                "WITH acct AS (SELECT 1 FROM accounts WHERE id = $1),
                      upd AS (UPDATE quota_blocks SET expires_at = $2
                              WHERE account_id = $1 AND (expires_at IS NULL OR expires_at > $2)
                              RETURNING 1)
                 SELECT (SELECT count(*) FROM acct), (SELECT count(*) FROM upd)",
                &[&account_id, &now],
            )
            .await
            .map_err(db_err)?;
        if row.get::<_, i64>(0) == 0 {
            return Err(CatalogError::not_found("account", account_id));
        }
        let inv = bump_credits(&tx, account_id).await.map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        if let Some(inv) = inv {
            self.notify_local(inv);
        }
        Ok(row.get::<_, i64>(1) as u64)
    }

    async fn list_quota_blocks(&self, account_id: &str) -> CatalogResult<Vec<QuotaBlock>> {
        let conn = self.conn().await?;
        self.require_account(&conn, account_id).await?;
        let rows = conn
            .query(
                &format!(
                    "SELECT {BLOCK_COLUMNS} FROM quota_blocks WHERE account_id = $1 ORDER BY seq"
                ),
                &[&account_id],
            )
            .await
            .map_err(db_err)?;
        Ok(rows.iter().map(block_from_row).collect())
    }

    async fn balance(&self, account_id: &str) -> CatalogResult<u64> {
        let conn = self.conn().await?;
        balance_of(&conn, account_id, self.now())
            .await
            .map_err(db_err)?
            .ok_or_else(|| CatalogError::not_found("account", account_id))
    }

    async fn deduct(&self, d: &Deduction) -> CatalogResult<DeductResult> {
        self.batcher.submit(d.clone()).await
    }

    async fn refund(&self, idempotency_key: &str) -> CatalogResult<u64> {
        retrying!(self.refund_tx(idempotency_key))
    }

    async fn credit_snapshot(&self, account_id: &str) -> CatalogResult<CreditSnapshot> {
        let now = self.now();
        let conn = self.conn().await?;
        // One statement, so the version and the blocks are read together.
        let stmt = conn
            .prepare_cached(&format!(
                "SELECT a.credit_version, {BLOCK_COLUMNS_Q}
                 FROM accounts a LEFT JOIN quota_blocks q
                   ON q.account_id = a.id AND (q.expires_at IS NULL OR q.expires_at > $2)
                 WHERE a.id = $1
                 ORDER BY q.expires_at ASC NULLS LAST, q.seq"
            ))
            .await
            .map_err(db_err)?;
        let rows = conn
            .query(&stmt, &[&account_id, &now])
            .await
            .map_err(db_err)?;
        let mut snapshot = CreditSnapshot::default();
        for row in &rows {
            snapshot.version = row.get::<_, i64>(0) as u64;
            if row.get::<_, Option<String>>(1).is_some() {
                snapshot.blocks.push(block_from_row(row));
            }
        }
        Ok(snapshot)
    }

    async fn record_credit_ops(&self, account_id: &str, ops: &[CreditOp]) -> CatalogResult<()> {
        retrying!(self.record_credit_ops_tx(account_id, ops))?;
        // Charges the wallet could not decide: the catalog decides, as a
        // deduction would (after the decided ones, which came first).
        for d in ops
            .iter()
            .filter_map(|op| op.undecided_deduction(account_id))
        {
            match self.deduct(&d).await {
                Ok(_) | Err(CatalogError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn touch_credits(&self, account_id: &str) -> CatalogResult<u64> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await.map_err(db_err)?;
        let inv = bump_credits(&tx, account_id).await.map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        match inv {
            Some(inv @ Invalidation::Credits { version, .. }) => {
                self.notify_local(inv);
                Ok(version)
            }
            _ => Err(CatalogError::not_found("account", account_id)),
        }
    }

    async fn ledger(&self, account_id: &str) -> CatalogResult<Vec<LedgerEntry>> {
        let conn = self.conn().await?;
        self.require_account(&conn, account_id).await?;
        let rows = conn
            .query(
                "SELECT idempotency_key, request_id, endpoint, requested, deducted, refunded,
                        draws, created_at
                 FROM credit_ledger WHERE account_id = $1 ORDER BY seq",
                &[&account_id],
            )
            .await
            .map_err(db_err)?;
        // Requests whose charge their usage event carries (V8).
        let charged = conn
            .query(
                "SELECT 'req:' || request_id, request_id, endpoint, credits_requested, credits,
                        credits_refunded, draws, ended_at
                 FROM usage_events WHERE account_id = $1 AND credits_requested IS NOT NULL
                 ORDER BY ended_at, request_id",
                &[&account_id],
            )
            .await
            .map_err(db_err)?;
        let entry = |r: &tokio_postgres::Row| {
            let requested = r.get::<_, i64>(3) as u64;
            let deducted = r.get::<_, i64>(4) as u64;
            let draws: Vec<Draw> = serde_json::from_value(r.get(6))
                .map_err(|e| CatalogError::Unavailable(format!("ledger: bad draws: {e}")))?;
            Ok(LedgerEntry {
                idempotency_key: r.get(0),
                account_id: account_id.to_string(),
                request_id: r.get(1),
                endpoint: r.get(2),
                requested,
                deducted,
                shortfall: requested.saturating_sub(deducted),
                refunded: r.get::<_, i64>(5) as u64,
                draws,
                created_at: Some(r.get(7)),
            })
        };
        let rows = rows.iter().map(entry).collect::<CatalogResult<Vec<_>>>()?;
        let charged = charged
            .iter()
            .map(entry)
            .collect::<CatalogResult<Vec<_>>>()?;
        Ok(merge_by_time(rows, charged))
    }

    async fn record_usage(&self, events: &[UsageEvent]) -> CatalogResult<u64> {
        usage::record(&self.pool, events).await
    }

    async fn usage_events(
        &self,
        q: &UsageQuery,
        after: Option<&UsageCursor>,
        limit: usize,
    ) -> CatalogResult<Vec<UsageEvent>> {
        usage::page(&self.pool, q, after, limit).await
    }

    async fn usage_summary(
        &self,
        q: &UsageQuery,
        group_by: GroupBy,
    ) -> CatalogResult<Vec<UsageBucket>> {
        usage::summary(&self.pool, q, group_by).await
    }

    async fn prune_usage(&self, before: SystemTime) -> CatalogResult<u64> {
        usage::prune(&self.pool, before).await
    }

    async fn enqueue_notification(&self, n: &NewNotification) -> CatalogResult<bool> {
        notifications::enqueue(&self.pool, n, self.now()).await
    }

    async fn claim_notifications(
        &self,
        limit: usize,
        lease: Duration,
    ) -> CatalogResult<Vec<Notification>> {
        notifications::claim(&self.pool, self.now(), limit, lease).await
    }

    async fn finish_notification(&self, id: &str, result: &Attempted) -> CatalogResult<()> {
        notifications::finish(&self.pool, id, result, self.now()).await
    }

    async fn notifications(&self, q: &NotificationQuery) -> CatalogResult<Vec<Notification>> {
        notifications::page(&self.pool, q).await
    }

    async fn expiring_blocks(
        &self,
        until: SystemTime,
        after: Option<&str>,
        limit: usize,
    ) -> CatalogResult<Vec<QuotaBlock>> {
        notifications::expiring_blocks(&self.pool, self.now(), until, after, limit).await
    }

    async fn prune_notifications(&self, before: SystemTime) -> CatalogResult<u64> {
        notifications::prune(&self.pool, before).await
    }

    fn subscribe(&self) -> broadcast::Receiver<Invalidation> {
        self.events.subscribe()
    }

    fn invalidations_confirmed_ms(&self) -> Option<u64> {
        match self.confirmed_ms.load(Ordering::Acquire) {
            0 => None,
            ms => Some(ms),
        }
    }

    async fn ping(&self) -> CatalogResult<()> {
        let conn = self.conn().await?;
        conn.execute("SELECT 1", &[]).await.map_err(db_err)?;
        Ok(())
    }

    async fn plans_file_owner(&self) -> CatalogResult<Option<String>> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                "SELECT value FROM plangate_settings WHERE key = 'plans_file'",
                &[],
            )
            .await
            .map_err(db_err)?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn set_plans_file_owner(&self, file: Option<&str>) -> CatalogResult<()> {
        let conn = self.conn().await?;
        match file {
            Some(f) => {
                conn.execute(
                    "INSERT INTO plangate_settings (key, value) VALUES ('plans_file', $1)
                     ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                    &[&f],
                )
                .await
            }
            None => {
                conn.execute(
                    "DELETE FROM plangate_settings WHERE key = 'plans_file'",
                    &[],
                )
                .await
            }
        }
        .map_err(db_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip() {
        for inv in [
            Invalidation::Plans,
            Invalidation::All,
            Invalidation::Account("a:b".into()),
            Invalidation::Key("ab12".into()),
        ] {
            assert_eq!(decode(&encode(&inv)), inv);
        }
        assert_eq!(decode("garbage"), Invalidation::All);
    }

    #[test]
    fn migrations_are_numbered_in_order() {
        // Increasing from 1 (V4 belongs to a branch not merged here yet:
        // the runner applies every version the database lacks, gaps or not).
        assert_eq!(MIGRATIONS[0].version, 1);
        for pair in MIGRATIONS.windows(2) {
            assert!(pair[0].version < pair[1].version);
        }
    }
}
