//! Admin subcommands against Postgres: plans, accounts, keys, credits, migrate.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{CliError, ConfigArg, DEFAULT_CONFIG};
use crate::catalog::postgres::{create_database_if_missing, migrate, PgOptions, PostgresCatalog};
use crate::catalog::timed::Timed;
use crate::catalog::{Catalog, CatalogError, KeyOptions, MAX_ACCOUNTS_PAGE};
use crate::clock::SystemClock;
use crate::config::{refusal, CliView, PlansSource};
use crate::health::mask_url;
use crate::plans::parse::{load_plans_file, load_plans_file_for, plan_to_json, plans_to_json};
use crate::plans::{KnownUnits, Plan, MAX_AMOUNT};

/// Where the catalog lives: `--postgres-url`, else a config file's
/// `[storage] postgres_url`.
#[derive(Debug, Clone, clap::Args)]
pub struct DbTarget {
    /// The config file to read [storage] postgres_url from [default: ./plangate.toml when it exists].
    #[arg(long, global = true, env = "PLANGATE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Postgres URL, e.g. postgres://user:pass@host:5432/plangate (wins over --config).
    #[arg(
        long,
        global = true,
        env = "PLANGATE_POSTGRES_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub postgres_url: Option<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum PlansCmd {
    /// Upsert every plan in FILE (and its default_plan) in one transaction.
    ///
    /// With a config file, plans may name only units its routes measure or
    /// reserve.
    #[command(after_help = "Example:\n  plangate plans apply plans.yaml --config plangate.toml")]
    Apply {
        /// The plans file (plans.yaml format).
        file: PathBuf,
        /// Also delete plans not in FILE that no account uses.
        #[arg(long)]
        prune: bool,
    },
    /// List plans.
    List,
    /// Show one plan: its windows, concurrency and credit costs per endpoint.
    Show {
        /// Plan id.
        id: String,
    },
    /// Delete a plan (refused for the default plan and plans in use).
    Delete {
        /// Plan id.
        id: String,
    },
    /// Make a plan the default (the plan of accounts without one).
    SetDefault {
        /// Plan id.
        id: String,
    },
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum AccountsCmd {
    /// Create an account.
    #[command(
        after_help = "Example:\n  plangate accounts create acme --plan pro --metadata owner=ops --metadata tier=gold"
    )]
    Create {
        /// Account id (any text up to 200 bytes).
        id: String,
        /// Its plan [default: none, i.e. the default plan].
        #[arg(long)]
        plan: Option<String>,
        /// A metadata entry KEY=VALUE (a string); repeat for more.
        #[arg(long, value_name = "KEY=VALUE")]
        metadata: Vec<String>,
        /// The day of the month (1 to 31) its billing month starts on: its
        /// plan's calendar month windows (`window: 1mo, calendar: utc`) run
        /// from that day, clamped in short months [default: the 1st].
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=31))]
        billing_anchor: Option<u8>,
    },
    /// Set or remove metadata entries of an account (other entries stay).
    #[command(
        after_help = "Example:\n  plangate accounts update acme --metadata tier=platinum --unset trial"
    )]
    Update {
        /// Account id.
        id: String,
        /// Set KEY to VALUE (a string); repeat for more.
        #[arg(long, value_name = "KEY=VALUE")]
        metadata: Vec<String>,
        /// Remove KEY; repeat for more.
        #[arg(long, value_name = "KEY")]
        unset: Vec<String>,
    },
    /// List accounts by id, a page at a time (the next page: --after the last id printed).
    #[command(
        after_help = "Example:\n  plangate accounts list --plan pro --limit 50\n  plangate accounts list --after acme"
    )]
    List {
        /// Accounts per page (1 to 1000).
        #[arg(long, default_value_t = 100, value_name = "N")]
        limit: usize,
        /// Start after this account id (the cursor: the last id of the previous page).
        #[arg(long, value_name = "ID")]
        after: Option<String>,
        /// Only accounts on this plan (explicitly or as the default plan).
        #[arg(long, value_name = "PLAN")]
        plan: Option<String>,
    },
    /// Delete an account: its keys stop working at once and are deleted with its quota blocks;
    /// its ledger rows and usage events are kept for audit.
    #[command(
        after_help = "Refused while the account has unexpired credits, unless --force.\n\nExample:\n  plangate accounts delete acme --force"
    )]
    Delete {
        /// Account id.
        id: String,
        /// Delete even though unexpired credits remain (they are forfeited).
        #[arg(long)]
        force: bool,
    },
    /// Set the day of the month (1 to 31, or `none`) an account's billing
    /// month starts on.
    #[command(after_help = "Example:\n  plangate accounts billing-anchor acme 15")]
    BillingAnchor {
        /// Account id.
        id: String,
        /// 1 to 31, or `none` for the calendar month.
        #[arg(value_parser = parse_anchor)]
        day: Anchor,
    },
    /// Assign a plan to an account.
    Assign {
        /// Account id.
        id: String,
        /// Plan id.
        plan: String,
    },
    /// Show an account, its effective plan and its balance.
    Show {
        /// Account id.
        id: String,
    },
}

/// A billing anchor on the command line: a day (1 to 31) or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchor(pub Option<u8>);

fn parse_anchor(s: &str) -> Result<Anchor, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(Anchor(None));
    }
    match s.parse::<u8>() {
        Ok(day @ 1..=31) => Ok(Anchor(Some(day))),
        _ => Err(format!(
            "`{s}` is not a day of the month (1 to 31) or `none`"
        )),
    }
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum KeysCmd {
    /// Create a key; the plaintext is printed once and stored only hashed.
    #[command(
        after_help = "Example:\n  plangate keys create acme --label ci --expires 2027-01-01T00:00:00Z --plan ci-small"
    )]
    Create {
        /// Account id.
        account: String,
        /// A label to recognise the key by in `keys list` (e.g. ci).
        #[arg(long)]
        label: Option<String>,
        /// When the key stops working (RFC 3339, e.g. 2027-01-01T00:00:00Z) [default: never].
        #[arg(long, value_name = "TIME")]
        expires: Option<String>,
        /// A plan of the key's own: its windows limit this key on top of its account's plan.
        #[arg(long, value_name = "PLAN")]
        plan: Option<String>,
    },
    /// Give a key a plan of its own (`--plan`) or take it away (`--no-plan`).
    #[command(after_help = "Example:\n  plangate keys update key_3f9a --plan ci-small")]
    Update {
        /// Key id, as `keys list` shows it.
        key_id: String,
        /// The key's own plan: its windows limit the key on top of its account's plan.
        #[arg(long, value_name = "PLAN", required_unless_present = "no_plan")]
        plan: Option<String>,
        /// Remove the key's own plan: only its account's limits apply.
        #[arg(long, conflicts_with = "plan")]
        no_plan: bool,
    },
    /// Revoke a key by id (takes effect within 5 seconds everywhere; a revoked key is an error).
    Revoke {
        /// Key id, as `keys list` shows it.
        key_id: String,
    },
    /// List an account's keys (id, prefix, label, expiry; never the key).
    List {
        /// Account id.
        account: String,
    },
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum CreditsCmd {
    /// Grant credits as a new quota block.
    #[command(
        after_help = "Example:\n  plangate credits grant acme 10000 --expires 2030-01-01T00:00:00Z"
    )]
    Grant {
        /// Account id.
        account: String,
        /// Credits to grant (1 to 10^15).
        amount: u64,
        /// Expiry in RFC 3339, e.g. 2030-01-01T00:00:00Z [default: never].
        #[arg(long, value_name = "TIME")]
        expires: Option<String>,
    },
    /// Show an account's balance and its quota blocks (expired ones marked).
    Balance {
        /// Account id.
        account: String,
    },
    /// Expire all of an account's blocks now.
    Expire {
        /// Account id.
        account: String,
    },
    /// Delete a quota block.
    Delete {
        /// Block id, as `credits balance` shows it.
        block_id: String,
    },
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum NotificationsCmd {
    /// The delivery log of threshold notifications, newest first: status, attempts, last error.
    #[command(
        after_help = "Examples:\n  plangate notifications list --account acme\n  plangate notifications list --status failed --json"
    )]
    List {
        /// Only this account's.
        #[arg(long, value_name = "ACCOUNT")]
        account: Option<String>,
        /// Only those pending, delivered or failed.
        #[arg(long, value_name = "STATUS")]
        status: Option<String>,
        /// At most this many (1 to 1000).
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum LimitsCmd {
    /// Reset an account's rate-limit windows: the current window's counters of every endpoint of its
    /// plan (or one) start again from zero. In-flight requests keep their concurrency slots.
    #[command(
        after_help = "The counters are in Redis ([storage] redis_url or redis_cluster of the config, or --redis-url).\nWith in-process counters, use the admin API of each gateway: POST /admin/accounts/ID/limits/reset.\n\nExamples:\n  plangate limits reset acme\n  plangate limits reset acme --endpoint gpt-4o"
    )]
    Reset {
        /// Account id.
        account: String,
        /// Only this endpoint [default: every endpoint of the account's plan].
        #[arg(long, value_name = "ENDPOINT")]
        endpoint: Option<String>,
        /// Redis URL of the counters (wins over the config's [storage]).
        #[arg(
            long,
            env = "PLANGATE_REDIS_URL",
            hide_env_values = true,
            value_name = "URL"
        )]
        redis_url: Option<String>,
    },
}

impl PlansCmd {
    /// Whether the command changes plans (refused under `[plans] source =
    /// "file"`).
    pub fn writes(&self) -> bool {
        matches!(
            self,
            PlansCmd::Apply { .. } | PlansCmd::Delete { .. } | PlansCmd::SetDefault { .. }
        )
    }
}

/// Whether `a` and `b` name the same file (as far as the file system
/// tells; by name when one of them does not exist).
fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// One admin command.
#[derive(Debug, Clone)]
pub enum AdminCmd {
    Migrate,
    Plans(PlansCmd),
    Accounts(AccountsCmd),
    Keys(KeysCmd),
    Credits(CreditsCmd),
    Limits(LimitsCmd),
    Notifications(NotificationsCmd),
}

/// Run an admin command against the catalog `target` names and print its
/// result (text, or JSON with `--json`).
pub async fn run(target: &DbTarget, cmd: AdminCmd) -> Result<(), CliError> {
    let out = execute(target, cmd).await?;
    println!("{out}");
    Ok(())
}

/// Run an admin command and return what it would print.
pub async fn execute(target: &DbTarget, cmd: AdminCmd) -> Result<String, CliError> {
    let config = ConfigArg {
        config: target.config.clone(),
    }
    .resolve();
    let view = |path: &PathBuf| CliView::load(path).map_err(|e| CliError::BadInput(e.to_string()));
    let default_timeout = Duration::from_secs(crate::config::defaults::CATALOG_TIMEOUT_SECS);
    let (url, timeout) = match (&target.postgres_url, &config) {
        (Some(url), _) => (url.clone(), default_timeout),
        (None, Some(path)) => {
            let storage = view(path)?.storage;
            let url = storage.postgres_url.ok_or_else(|| {
                CliError::BadInput(format!(
                    "{}: [storage] postgres_url is not set; admin commands need Postgres",
                    path.display()
                ))
            })?;
            (url, storage.catalog_timeout)
        }
        (None, None) => {
            return Err(CliError::BadInput(format!(
                "no database given: pass --postgres-url URL (or set PLANGATE_POSTGRES_URL), \
                 or --config FILE (or set PLANGATE_CONFIG, or run where {DEFAULT_CONFIG} is)"
            )))
        }
    };
    // Every failure to reach the database names it, password masked.
    let at = |e: CliError| match e {
        CliError::Failure(m) => CliError::Failure(format!("Postgres at {}: {m}", mask_url(&url))),
        other => other,
    };
    let json = target.json;
    if let AdminCmd::Migrate = cmd {
        return migrate_cmd(&url, json).await.map_err(at);
    }
    // Under `[plans] source = "file"` the plans file is the only source of
    // plans: a plan written here would be undone by the next reload.
    // Applying that file itself (what `serve` does) is fine: it is how a
    // new database gets its plans before the first `serve`.
    if let (AdminCmd::Plans(c), Some(path)) = (&cmd, &config) {
        if c.writes() {
            let view = view(path)?;
            if let Some(message) = view.plan_writes_refused() {
                let own_file = match (c, &view.plans_file) {
                    (PlansCmd::Apply { file, .. }, Some(own)) => same_file(file, own),
                    _ => false,
                };
                if !own_file {
                    return Err(CliError::BadInput(message));
                }
            }
        }
    }
    let catalog = PostgresCatalog::connect_with(
        &url,
        Arc::new(SystemClock),
        PgOptions {
            pool_size: 2,
            listen: false,
            lazy: false,
            timeout,
        },
    )
    .await
    .map_err(catalog_err)
    .map_err(at)?;
    // As in the gateway: a database that stops answering fails the
    // command after `catalog_timeout` instead of hanging it.
    let catalog = Timed::new(catalog, timeout);
    // Without a config, the gateways' own record says who owns the plans.
    if let (AdminCmd::Plans(c), None) = (&cmd, &config) {
        if c.writes() {
            let owner = catalog
                .plans_file_owner()
                .await
                .map_err(catalog_err)
                .map_err(at)?;
            if let Some(owner) = owner {
                let own_file = match c {
                    PlansCmd::Apply { file, .. } => same_file(file, Path::new(&owner)),
                    _ => false,
                };
                if !own_file {
                    let message =
                        refusal(PlansSource::File, Some(Path::new(&owner))).unwrap_or_default();
                    return Err(CliError::BadInput(format!(
                        "{message} (as the gateway last started on this database says; \
                         pass --config FILE to follow a config instead)"
                    )));
                }
            }
        }
    }
    match cmd {
        AdminCmd::Migrate => migrate_cmd(&url, json).await,
        AdminCmd::Plans(c) => {
            let known = match &config {
                Some(path) => Some(view(path)?.known_units),
                None => None,
            };
            plans(&catalog, c, json, known.as_ref()).await
        }
        AdminCmd::Accounts(c) => accounts(&catalog, c, json).await,
        AdminCmd::Keys(c) => keys(&catalog, c, json).await,
        AdminCmd::Credits(c) => credits(&catalog, c, json).await,
        AdminCmd::Notifications(c) => notifications(&catalog, c, json).await,
        AdminCmd::Limits(c) => {
            let storage = match &config {
                Some(path) => Some(view(path)?.storage),
                None => None,
            };
            limits(&catalog, c, json, storage.as_ref()).await
        }
    }
    .map_err(at)
}

async fn migrate_cmd(url: &str, json: bool) -> Result<String, CliError> {
    let created = create_database_if_missing(url).await.map_err(catalog_err)?;
    let report = migrate(url).await.map_err(catalog_err)?;
    let created_line = created
        .as_ref()
        .map(|name| format!("created database {name}\n"))
        .unwrap_or_default();
    Ok(if json {
        let mut v = serde_json::to_value(&report).unwrap_or_default();
        v["created_database"] = created.into();
        to_json(&v)
    } else if report.applied.is_empty() {
        format!(
            "{created_line}schema up to date (version {})",
            report.version
        )
    } else {
        format!(
            "{created_line}applied {}; schema at version {}",
            report.applied.join(", "),
            report.version
        )
    })
}

/// The database an admin command works on: `--postgres-url` (or
/// `PLANGATE_POSTGRES_URL`), else `[storage] postgres_url` of the config
/// (`--config`, `PLANGATE_CONFIG`, or `plangate.toml` where it runs), of
/// which only the sections admin commands use are read.
pub(crate) fn postgres_url(target: &DbTarget) -> Result<String, CliError> {
    if let Some(url) = &target.postgres_url {
        return Ok(url.clone());
    }
    let config = ConfigArg {
        config: target.config.clone(),
    }
    .resolve();
    match &config {
        Some(path) => CliView::load(path)
            .map_err(|e| CliError::BadInput(e.to_string()))?
            .storage
            .postgres_url
            .ok_or_else(|| {
                CliError::BadInput(format!(
                    "{}: [storage] postgres_url is not set; admin commands need Postgres",
                    path.display()
                ))
            }),
        None => Err(CliError::BadInput(format!(
            "no database given: pass --postgres-url URL (or set PLANGATE_POSTGRES_URL), \
             or --config FILE (or set PLANGATE_CONFIG, or run where {DEFAULT_CONFIG} is)"
        ))),
    }
}

/// The caller's mistakes (unknown ids, refused changes, invalid input) exit
/// 2; an unreachable or failing database exits 1.
pub(crate) fn catalog_err(e: CatalogError) -> CliError {
    match e {
        CatalogError::NotFound { .. } | CatalogError::Conflict(_) | CatalogError::Invalid(_) => {
            CliError::BadInput(e.to_string())
        }
        CatalogError::Unavailable(m) => CliError::Failure(m),
    }
}

/// `limits reset`: the account's plan from the catalog, the counters in
/// the counter store the config (or `--redis-url`) names.
async fn limits(
    catalog: &dyn Catalog,
    cmd: LimitsCmd,
    json: bool,
    storage: Option<&crate::config::StorageConfig>,
) -> Result<String, CliError> {
    use crate::limiter::redis::{RedisOptions, RedisStore};
    let LimitsCmd::Reset {
        account,
        endpoint,
        redis_url,
    } = cmd;
    let account_row = catalog.get_account(&account).await.map_err(catalog_err)?;
    let Some(plan_id) = account_row.effective_plan else {
        return Err(CliError::BadInput(format!(
            "account {account} has no plan (no plans exist): nothing to reset"
        )));
    };
    // Anchored as the gateway anchors it (`CatalogCache::plan_by_id`): an
    // account billed from the 15th counts its months in `1mo@15` windows.
    let anchor = |plan: std::sync::Arc<crate::plans::Plan>| match account_row.billing_anchor {
        Some(a) if a > 1 && plan.has_months() => plan.anchored(a),
        _ => plan,
    };
    let plan = anchor(catalog.get_plan(&plan_id).await.map_err(catalog_err)?);
    let options = RedisOptions::default();
    let store = match (redis_url, storage) {
        (Some(url), _) => RedisStore::connect_with(&url, options)
            .await
            .map_err(|e| CliError::Failure(format!("Redis at {}: {e}", mask_url(&url))))?,
        (None, Some(s)) if !s.redis_cluster.is_empty() => {
            RedisStore::connect_cluster(&s.redis_cluster, options)
                .await
                .map_err(|e| CliError::Failure(format!("[storage] redis_cluster: {e}")))?
        }
        (None, Some(s)) if s.redis_url.is_some() => {
            let url = s.redis_url.clone().unwrap_or_default();
            RedisStore::connect_with(&url, options)
                .await
                .map_err(|e| CliError::Failure(format!("Redis at {}: {e}", mask_url(&url))))?
        }
        _ => {
            return Err(CliError::BadInput(
                "no counter store: the config's [storage] has no redis_url or redis_cluster \
                 (pass --redis-url URL); in-process counters live in each gateway: use its \
                 admin API, POST /admin/accounts/ID/limits/reset"
                    .into(),
            ))
        }
    };
    // The account's keys with plans of their own: their windows too.
    let mut keys = Vec::new();
    for k in catalog.list_keys(&account).await.map_err(catalog_err)? {
        if let (false, Some(plan_id)) = (k.revoked, k.plan_id.as_deref()) {
            keys.push((
                k.id,
                anchor(catalog.get_plan(plan_id).await.map_err(catalog_err)?),
            ));
        }
    }
    let now_ms = crate::clock::Clock::now_ms(&SystemClock);
    let reset = crate::limiter::reset_account_windows(
        &store,
        &plan,
        &account,
        &keys,
        endpoint.as_deref(),
        now_ms,
    )
    .await
    .map_err(|e| CliError::Failure(format!("resetting the counters: {e}")))?
    .ok_or_else(|| {
        CliError::BadInput(format!(
            "endpoint `{}` is not in plan `{}` of account {account}",
            endpoint.as_deref().unwrap_or_default(),
            plan.id
        ))
    })?;
    tracing::warn!(account = %account, endpoint = endpoint.as_deref().unwrap_or("*"), by = %operator(), endpoints = ?reset, "admin: rate-limit windows reset");
    Ok(if json {
        to_json(&serde_json::json!({ "account": account, "reset": reset }))
    } else {
        format!(
            "reset the current rate-limit windows of {account} on {}",
            if reset.is_empty() {
                "no endpoint (its plan has none)".to_owned()
            } else {
                reset.join(", ")
            }
        )
    })
}

/// `KEY=VALUE` entries (string values) and keys to remove (`null`), as a
/// metadata patch.
fn parse_metadata(
    set: &[String],
    unset: &[String],
) -> Result<serde_json::Map<String, serde_json::Value>, CliError> {
    let mut out = serde_json::Map::new();
    for entry in set {
        let Some((k, v)) = entry.split_once('=').filter(|(k, _)| !k.is_empty()) else {
            return Err(CliError::BadInput(format!(
                "--metadata `{entry}`: expected KEY=VALUE, e.g. owner=ops"
            )));
        };
        out.insert(k.to_owned(), serde_json::Value::String(v.to_owned()));
    }
    for k in unset {
        out.insert(k.clone(), serde_json::Value::Null);
    }
    Ok(out)
}

/// An RFC 3339 time given to option `flag`.
fn parse_time(flag: &str, s: &str) -> Result<SystemTime, CliError> {
    humantime::parse_rfc3339_weak(s).map_err(|e| {
        CliError::BadInput(format!(
            "{flag} `{s}`: {e} (use RFC 3339 in UTC, e.g. 2030-01-01T00:00:00Z)"
        ))
    })
}

/// Who runs an admin command, for the log of what it changed: the
/// login name from the environment (`$USER`, `$LOGNAME`), else `unknown`.
pub(crate) fn operator() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .map(|u| format!("cli:{u}"))
        .unwrap_or_else(|_| "cli:unknown".into())
}

/// `accounts list`: one page, and how to get the next.
async fn list_accounts(
    catalog: &dyn Catalog,
    limit: usize,
    after: Option<String>,
    plan: Option<String>,
    json: bool,
) -> Result<String, CliError> {
    if !(1..=MAX_ACCOUNTS_PAGE).contains(&limit) {
        return Err(CliError::BadInput(format!(
            "--limit {limit}: must be 1 to {MAX_ACCOUNTS_PAGE}"
        )));
    }
    // One more than asked: a next page is promised only when there is one.
    let mut page = catalog
        .list_accounts(plan.as_deref(), after.as_deref(), limit + 1)
        .await
        .map_err(catalog_err)?;
    let next = crate::catalog::next_page(&mut page, limit, |a| a.id.clone());
    if json {
        return Ok(to_json(&serde_json::json!({
            "accounts": page,
            "next_after": next,
        })));
    }
    if page.is_empty() {
        return Ok("no accounts".into());
    }
    let mut out: Vec<String> = page
        .iter()
        .map(|a| {
            let plan = match (&a.plan_id, &a.effective_plan) {
                (Some(p), _) => p.clone(),
                (None, Some(d)) => format!("{d} (default)"),
                (None, None) => "-".into(),
            };
            format!("{}\t{plan}\t{}", a.id, a.metadata)
        })
        .collect();
    if let Some(next) = next {
        out.push(format!("(more: --after {next})"));
    }
    Ok(out.join("\n"))
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

fn time(t: Option<SystemTime>) -> String {
    t.map_or_else(
        || "never".to_string(),
        |t| humantime::format_rfc3339_seconds(t).to_string(),
    )
}

async fn plans(
    catalog: &dyn Catalog,
    cmd: PlansCmd,
    json: bool,
    known: Option<&KnownUnits>,
) -> Result<String, CliError> {
    match cmd {
        PlansCmd::Apply { file, prune } => {
            let set = match known {
                Some(known) => load_plans_file_for(&file, known),
                None => load_plans_file(&file),
            }
            .map_err(|e| CliError::BadInput(e.to_string()))?;
            let r = catalog
                .apply_plans(&set, prune)
                .await
                .map_err(catalog_err)?;
            if json {
                return Ok(to_json(&r));
            }
            let mut out = format!(
                "applied {} plan(s): {}; default plan: {}",
                r.upserted.len(),
                r.upserted.join(", "),
                r.default_plan.as_deref().unwrap_or("none")
            );
            if !r.pruned.is_empty() {
                out += &format!("\npruned: {}", r.pruned.join(", "));
            }
            if !r.kept_in_use.is_empty() {
                out += &format!("\nkept (default or in use): {}", r.kept_in_use.join(", "));
            }
            Ok(out)
        }
        PlansCmd::List => {
            let set = catalog.list_plans().await.map_err(catalog_err)?;
            if json {
                return Ok(to_json(&plans_to_json(&set)));
            }
            if set.plans.is_empty() {
                return Ok("no plans".into());
            }
            let lines: Vec<String> = set
                .plans
                .values()
                .map(|p| {
                    let default = if set.default_plan.as_deref() == Some(p.id.as_str()) {
                        " (default)"
                    } else {
                        ""
                    };
                    let endpoints: Vec<&str> = p.endpoints.keys().map(String::as_str).collect();
                    format!(
                        "{}{default}\t{}\tendpoints: {}",
                        p.id,
                        p.name,
                        endpoints.join(", ")
                    )
                })
                .collect();
            Ok(lines.join("\n"))
        }
        PlansCmd::Show { id } => {
            let plan = catalog.get_plan(&id).await.map_err(catalog_err)?;
            if json {
                return Ok(to_json(&plan_to_json(&plan)));
            }
            let default = catalog.default_plan().await.map_err(catalog_err)?;
            Ok(describe_plan(
                &plan,
                default.as_deref() == Some(id.as_str()),
            ))
        }
        PlansCmd::Delete { id } => {
            catalog.delete_plan(&id).await.map_err(catalog_err)?;
            Ok(if json {
                to_json(&serde_json::json!({ "deleted": id }))
            } else {
                format!("deleted plan {id}")
            })
        }
        PlansCmd::SetDefault { id } => {
            catalog.set_default_plan(&id).await.map_err(catalog_err)?;
            Ok(if json {
                to_json(&serde_json::json!({ "default_plan": id }))
            } else {
                format!("default plan is now {id}")
            })
        }
    }
}

/// A plan for people: one line per endpoint.
fn describe_plan(plan: &Plan, is_default: bool) -> String {
    let mut out = format!(
        "{}{}\t{}",
        plan.id,
        if is_default { " (default)" } else { "" },
        plan.name
    );
    for (endpoint, policy) in &plan.endpoints {
        let windows: Vec<String> = policy
            .windows
            .iter()
            .map(|w| format!("{} {}/{}", w.limit, w.unit.plural(), w.len))
            .collect();
        out += &format!("\n  {endpoint}: {}", windows.join(", "));
        if policy.max_concurrent > 0 {
            out += &format!(
                "; at most {} concurrent (slot expiry {}s)",
                policy.max_concurrent, policy.concurrency_expiry_secs
            );
        }
        if let Some(c) = &policy.credits {
            out += &format!(
                "; credits: min_balance {}, per_request {}",
                c.min_balance, c.per_request
            );
            for (unit, p) in &c.per_unit {
                out += &format!(", {} per {} {}", p.credits, p.per, unit.plural());
            }
        }
    }
    out
}

async fn accounts(catalog: &dyn Catalog, cmd: AccountsCmd, json: bool) -> Result<String, CliError> {
    let account = match cmd {
        AccountsCmd::Create {
            id,
            plan,
            metadata,
            billing_anchor,
        } => {
            let metadata = parse_metadata(&metadata, &[])?;
            let mut account = catalog
                .create_account(&id, plan.as_deref(), serde_json::Value::Object(metadata))
                .await
                .map_err(catalog_err)?;
            if let Some(anchor) = billing_anchor {
                catalog
                    .set_billing_anchor(&id, Some(anchor))
                    .await
                    .map_err(catalog_err)?;
                account.billing_anchor = Some(anchor);
            }
            account
        }
        AccountsCmd::Update {
            id,
            metadata,
            unset,
        } => {
            if metadata.is_empty() && unset.is_empty() {
                return Err(CliError::BadInput(
                    "nothing to update: give --metadata KEY=VALUE or --unset KEY".into(),
                ));
            }
            let patch = parse_metadata(&metadata, &unset)?;
            catalog
                .update_account_metadata(&id, &patch)
                .await
                .map_err(catalog_err)?
        }
        AccountsCmd::List { limit, after, plan } => {
            return list_accounts(catalog, limit, after, plan, json).await;
        }
        AccountsCmd::Delete { id, force } => {
            let d = catalog
                .delete_account(&id, force)
                .await
                .map_err(catalog_err)?;
            tracing::warn!(account = %id, by = %operator(), keys = d.keys, blocks = d.blocks, credits_forfeited = d.credits_forfeited, "admin: account deleted");
            return Ok(if json {
                to_json(&d)
            } else {
                format!(
                    "deleted account {id}: {} key(s) and {} quota block(s) deleted, {} credits forfeited; its ledger and usage are kept",
                    d.keys, d.blocks, d.credits_forfeited
                )
            });
        }
        AccountsCmd::BillingAnchor { id, day } => {
            catalog
                .set_billing_anchor(&id, day.0)
                .await
                .map_err(catalog_err)?;
            catalog.get_account(&id).await.map_err(catalog_err)?
        }
        AccountsCmd::Assign { id, plan } => {
            catalog
                .assign_plan(&id, Some(&plan))
                .await
                .map_err(catalog_err)?;
            catalog.get_account(&id).await.map_err(catalog_err)?
        }
        AccountsCmd::Show { id } => catalog.get_account(&id).await.map_err(catalog_err)?,
    };
    let balance = catalog.balance(&account.id).await.map_err(catalog_err)?;
    if json {
        let mut v = serde_json::to_value(&account).unwrap_or_default();
        v["balance"] = balance.into();
        return Ok(to_json(&v));
    }
    let plan = match (&account.plan_id, &account.effective_plan) {
        (Some(p), _) => p.clone(),
        (None, Some(d)) => format!("{d} (the default plan)"),
        (None, None) => "none (no plans exist yet)".into(),
    };
    let anchor = match account.billing_anchor {
        Some(day) => format!("\n  billing month: from day {day}"),
        None => String::new(),
    };
    Ok(format!(
        "account {}\n  plan: {plan}{anchor}\n  balance: {balance} credits\n  metadata: {}",
        account.id, account.metadata
    ))
}

/// What of a key's plan does not apply to the key: only its windows do
/// (concurrency and credits stay the account's). Empty when all of it
/// applies.
async fn key_plan_note(catalog: &dyn Catalog, plan: Option<&str>) -> String {
    let Some(Ok(plan)) = (match plan {
        Some(p) => Some(catalog.get_plan(p).await),
        None => None,
    }) else {
        return String::new();
    };
    let unused: Vec<&str> = plan
        .endpoints
        .iter()
        .filter(|(_, p)| p.max_concurrent > 0 || p.credits.is_some())
        .map(|(id, _)| id.as_str())
        .collect();
    if unused.is_empty() {
        return String::new();
    }
    format!(
        "\nnote: only the windows of plan {} limit a key; its max_concurrent and credits \
         (on {}) stay the account's plan's",
        plan.id,
        unused.join(", ")
    )
}

async fn keys(catalog: &dyn Catalog, cmd: KeysCmd, json: bool) -> Result<String, CliError> {
    match cmd {
        KeysCmd::Create {
            account,
            label,
            expires,
            plan,
        } => {
            let opts = KeyOptions {
                label,
                expires_at: expires
                    .as_deref()
                    .map(|s| parse_time("--expires", s))
                    .transpose()?,
                plan,
            };
            let key = catalog
                .create_key_with(&account, &opts)
                .await
                .map_err(catalog_err)?;
            Ok(if json {
                to_json(&key)
            } else {
                format!(
                    "created key {} for account {account}\n{}\nStore it now: plangate keeps only its hash and cannot show it again.{}",
                    key.id,
                    key.key,
                    key_plan_note(catalog, opts.plan.as_deref()).await
                )
            })
        }
        KeysCmd::Update {
            key_id,
            plan,
            no_plan: _,
        } => {
            catalog
                .set_key_plan(&key_id, plan.as_deref())
                .await
                .map_err(catalog_err)?;
            Ok(if json {
                to_json(&serde_json::json!({ "id": key_id, "plan_id": plan }))
            } else {
                match plan {
                    Some(p) => format!(
                        "key {key_id} now has plan {p} on top of its account's{}",
                        key_plan_note(catalog, Some(&p)).await
                    ),
                    None => format!("key {key_id} now has only its account's limits"),
                }
            })
        }
        KeysCmd::Revoke { key_id } => {
            catalog.revoke_key(&key_id).await.map_err(catalog_err)?;
            Ok(if json {
                to_json(&serde_json::json!({ "revoked": key_id }))
            } else {
                format!("revoked key {key_id}")
            })
        }
        KeysCmd::List { account } => {
            let keys = catalog.list_keys(&account).await.map_err(catalog_err)?;
            if json {
                return Ok(to_json(&keys));
            }
            if keys.is_empty() {
                return Ok(format!("account {account} has no keys"));
            }
            let lines: Vec<String> = keys
                .iter()
                .map(|k| {
                    let mut line =
                        format!("{}\t{}...\tcreated {}", k.id, k.prefix, time(k.created_at));
                    if let Some(label) = &k.label {
                        line += &format!("\tlabel {label}");
                    }
                    if let Some(plan) = &k.plan_id {
                        line += &format!("\tplan {plan}");
                    }
                    if let Some(at) = k.expires_at {
                        let expired = at <= SystemTime::now();
                        line += &format!(
                            "\t{} {}",
                            if expired { "expired" } else { "expires" },
                            time(Some(at))
                        );
                    }
                    if k.revoked {
                        line += "\trevoked";
                    }
                    line
                })
                .collect();
            Ok(lines.join("\n"))
        }
    }
}

async fn credits(catalog: &dyn Catalog, cmd: CreditsCmd, json: bool) -> Result<String, CliError> {
    match cmd {
        CreditsCmd::Grant {
            account,
            amount,
            expires,
        } => {
            if amount == 0 {
                return Err(CliError::BadInput("AMOUNT must be at least 1".into()));
            }
            if amount > MAX_AMOUNT {
                return Err(CliError::BadInput(format!(
                    "AMOUNT {amount} is more than the largest grant, {MAX_AMOUNT}"
                )));
            }
            let expires_at = expires
                .as_deref()
                .map(|s| parse_time("--expires", s))
                .transpose()?;
            let block = catalog
                .create_quota_block(&account, amount, expires_at, serde_json::Value::Null)
                .await
                .map_err(catalog_err)?;
            Ok(if json {
                to_json(&block)
            } else {
                format!(
                    "granted {amount} credits to {account} as block {} (expires {})",
                    block.id,
                    time(block.expires_at)
                )
            })
        }
        CreditsCmd::Balance { account } => {
            let balance = catalog.balance(&account).await.map_err(catalog_err)?;
            let blocks = catalog
                .list_quota_blocks(&account)
                .await
                .map_err(catalog_err)?;
            let now = SystemTime::now();
            let expired = |b: &crate::catalog::QuotaBlock| b.expires_at.is_some_and(|e| e <= now);
            if json {
                let blocks: Vec<serde_json::Value> = blocks
                    .iter()
                    .map(|b| {
                        let mut v = serde_json::to_value(b).unwrap_or_default();
                        v["expired"] = expired(b).into();
                        v
                    })
                    .collect();
                return Ok(to_json(&serde_json::json!({
                    "account": account,
                    "balance": balance,
                    "blocks": blocks,
                })));
            }
            let mut out = format!("{account}: {balance} credits");
            for b in &blocks {
                out += &format!(
                    "\n  {}\t{}/{}\t{} {}",
                    b.id,
                    b.credits_remaining,
                    b.credits_granted,
                    if expired(b) { "EXPIRED" } else { "expires" },
                    time(b.expires_at)
                );
            }
            Ok(out)
        }
        CreditsCmd::Expire { account } => {
            let n = catalog
                .expire_quota_blocks(&account)
                .await
                .map_err(catalog_err)?;
            Ok(if json {
                to_json(&serde_json::json!({ "account": account, "expired": n }))
            } else {
                format!("expired {n} block(s) of {account}")
            })
        }
        CreditsCmd::Delete { block_id } => {
            catalog
                .delete_quota_block(&block_id)
                .await
                .map_err(catalog_err)?;
            Ok(if json {
                to_json(&serde_json::json!({ "deleted": block_id }))
            } else {
                format!("deleted block {block_id}")
            })
        }
    }
}

/// `plangate notifications list`: the delivery log, as the admin API's
/// `GET /admin/notifications` shows it.
async fn notifications(
    catalog: &dyn Catalog,
    cmd: NotificationsCmd,
    json: bool,
) -> Result<String, CliError> {
    let NotificationsCmd::List {
        account,
        status,
        limit,
    } = cmd;
    let status = match status.as_deref() {
        None => None,
        Some(s) => Some(crate::catalog::NotificationStatus::parse(s).ok_or_else(|| {
            CliError::BadInput(format!(
                "--status: `{s}` is not pending, delivered or failed"
            ))
        })?),
    };
    let rows = catalog
        .notifications(&crate::catalog::NotificationQuery {
            account,
            status,
            before_seq: None,
            limit,
        })
        .await
        .map_err(catalog_err)?;
    if json {
        return Ok(to_json(&serde_json::json!({ "notifications": rows })));
    }
    if rows.is_empty() {
        return Ok("no notifications".into());
    }
    let lines: Vec<String> = rows
        .iter()
        .map(|n| {
            format!(
                "{}\t{}\t{}\t{}\t{} attempt(s)\t{}{}",
                n.id,
                time(n.created_at),
                n.account_id,
                crate::notify::event_type(&n.kind),
                n.attempts,
                n.status.as_str(),
                n.last_error
                    .as_deref()
                    .map(|e| format!(" (last error: {e})"))
                    .unwrap_or_default()
            )
        })
        .collect();
    Ok(lines.join("\n"))
}
