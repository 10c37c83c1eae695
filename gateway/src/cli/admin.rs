//! Admin subcommands against Postgres: plans, accounts, keys, credits, migrate.

use std::path::PathBuf;

use super::CliError;

/// Where the catalog lives: a config file's `[storage] postgres_url`, or a URL.
#[derive(Debug, Clone, clap::Args)]
pub struct DbTarget {
    /// plangate.toml to read `[storage] postgres_url` from.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Postgres URL (overrides --config).
    #[arg(long, global = true, env = "PLANGATE_POSTGRES_URL")]
    pub postgres_url: Option<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum PlansCmd {
    /// Upsert every plan in FILE (and its default_plan) in one transaction.
    Apply {
        file: PathBuf,
        /// Also delete plans not in FILE that no account uses.
        #[arg(long)]
        prune: bool,
    },
    /// List plans.
    List,
    /// Show one plan.
    Show { id: String },
    /// Delete a plan (refused for the default plan and plans in use).
    Delete { id: String },
    /// Make a plan the default.
    SetDefault { id: String },
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum AccountsCmd {
    /// Create an account.
    Create {
        id: String,
        #[arg(long)]
        plan: Option<String>,
    },
    /// Assign a plan to an account.
    Assign { id: String, plan: String },
    /// Show an account and its effective plan.
    Show { id: String },
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum KeysCmd {
    /// Create a key; the plaintext is printed once.
    Create { account: String },
    /// Revoke a key by id.
    Revoke { key_id: String },
    /// List an account's keys (prefix and id only).
    List { account: String },
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum CreditsCmd {
    /// Grant credits as a new quota block.
    Grant {
        account: String,
        amount: u64,
        /// RFC 3339 expiry, e.g. 2027-01-01T00:00:00Z.
        #[arg(long)]
        expires: Option<String>,
    },
    /// Show an account's balance.
    Balance { account: String },
    /// Expire all of an account's blocks now.
    Expire { account: String },
    /// Delete a quota block.
    Delete { block_id: String },
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

/// Run an admin command against the catalog `target` names.
pub async fn run(target: &DbTarget, cmd: AdminCmd) -> Result<(), CliError> {
    let _ = (target, cmd);
    Err(CliError::Failure("admin commands are not built yet".into()))
}
