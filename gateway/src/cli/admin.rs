//! Admin subcommands against Postgres: plans, accounts, keys, credits, migrate.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{CliError, ConfigArg, DEFAULT_CONFIG};
use crate::catalog::postgres::{create_database_if_missing, migrate, PgOptions, PostgresCatalog};
use crate::catalog::timed::Timed;
use crate::catalog::{Catalog, CatalogError};
use crate::clock::SystemClock;
use crate::config::CliView;
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
    #[command(after_help = "Example:\n  plangate accounts create acme --plan pro")]
    Create {
        /// Account id (any text up to 200 bytes).
        id: String,
        /// Its plan [default: none, i.e. the default plan].
        #[arg(long)]
        plan: Option<String>,
        /// The day of the month (1 to 31) its billing month starts on: its
        /// plan's calendar month windows (`window: 1mo, calendar: utc`) run
        /// from that day, clamped in short months [default: the 1st].
        #[arg(long, value_parser = clap::value_parser!(u8).range(1..=31))]
        billing_anchor: Option<u8>,
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
    Create {
        /// Account id.
        account: String,
    },
    /// Revoke a key by id (takes effect within 5 seconds everywhere).
    Revoke {
        /// Key id, as `keys list` shows it.
        key_id: String,
    },
    /// List an account's keys (id and prefix only).
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
    /// Show an account's balance and its quota blocks.
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

/// One admin command.
#[derive(Debug, Clone)]
pub enum AdminCmd {
    Migrate,
    Plans(PlansCmd),
    Accounts(AccountsCmd),
    Keys(KeysCmd),
    Credits(CreditsCmd),
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
            billing_anchor,
        } => {
            let mut account = catalog
                .create_account(&id, plan.as_deref(), serde_json::Value::Null)
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

async fn keys(catalog: &dyn Catalog, cmd: KeysCmd, json: bool) -> Result<String, CliError> {
    match cmd {
        KeysCmd::Create { account } => {
            let key = catalog.create_key(&account).await.map_err(catalog_err)?;
            Ok(if json {
                to_json(&key)
            } else {
                format!(
                    "created key {} for account {account}\n{}\nStore it now: plangate keeps only its hash and cannot show it again.",
                    key.id, key.key
                )
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
                    format!(
                        "{}\t{}...\tcreated {}{}",
                        k.id,
                        k.prefix,
                        time(k.created_at),
                        if k.revoked { "\trevoked" } else { "" }
                    )
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
                .map(|s| {
                    humantime::parse_rfc3339_weak(s).map_err(|e| {
                        CliError::BadInput(format!(
                            "--expires `{s}`: {e} (use RFC 3339 in UTC, e.g. 2030-01-01T00:00:00Z)"
                        ))
                    })
                })
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
            if json {
                return Ok(to_json(
                    &serde_json::json!({ "account": account, "balance": balance }),
                ));
            }
            let blocks = catalog
                .list_quota_blocks(&account)
                .await
                .map_err(catalog_err)?;
            let mut out = format!("{account}: {balance} credits");
            for b in blocks {
                out += &format!(
                    "\n  {}\t{}/{}\texpires {}",
                    b.id,
                    b.credits_remaining,
                    b.credits_granted,
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
