//! The `plangate` command line. Parses arguments, runs the library, maps
//! errors to exit codes (0 ok, 1 runtime failure, 2 bad input).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use plangate::cli::admin::{
    AccountsCmd, AdminCmd, CreditsCmd, DbTarget, KeysCmd, LimitsCmd, NotificationsCmd, PlansCmd,
};
use plangate::cli::usage::UsageCmd;
use plangate::cli::{self, CliError, ConfigArg};

/// mimalloc instead of glibc's malloc: a request makes about 70
/// allocations, and mimalloc's thread-local free lists make them cheaper
/// (docs/PERFORMANCE.md has the measurement).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Shown under every `plangate --help`: the first commands of a new user.
const START_HERE: &str = "\
Start here:
  plangate dev                                 try it: a mock upstream, example plans and a demo key, no database
  plangate migrate --config plangate.toml      create or upgrade the Postgres schema
  plangate serve --config plangate.toml        run the gateway

Commands that read a config file take --config FILE, else $PLANGATE_CONFIG, else ./plangate.toml.
Admin commands (plans, accounts, keys, credits, migrate) may take --postgres-url URL instead.
Exit codes: 0 ok, 1 runtime failure (e.g. a store unreachable), 2 bad input or config.";

const SERVE_HELP: &str = "\
Environment:
  PLANGATE_ADMIN_TOKEN  the admin API token; the example config reads it with token = \"${PLANGATE_ADMIN_TOKEN}\"
                        (any ${VAR} in the config is read from the environment; unset is an error)
  PLANGATE_CONFIG       the config file when --config is not given
  RUST_LOG              log filter, default info (e.g. RUST_LOG=info,plangate=debug;
                        RUST_LOG=info,plangate::access=off silences the access log)
  PLANGATE_LOG_FORMAT   json | text | auto (default: text on a terminal, JSON otherwise)

Examples:
  export PLANGATE_ADMIN_TOKEN=$(openssl rand -hex 32)
  plangate serve --config plangate.toml
  plangate serve --config /etc/plangate/plangate.toml --require-stores";

const DEV_HELP: &str = "\
Without --config it runs the built-in copy of config/dev.toml and config/plans.yaml, from any directory.
The mock upstream takes a free port. When 127.0.0.1:8080 (or the admin's 127.0.0.1:9090) is in use,
for instance by another plangate dev, a free port is taken instead and printed; an address given with
--listen or --admin-listen must be free (port 0 picks a free one).

Examples:
  plangate dev
  plangate dev --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0
  plangate dev --config my-dev.toml";

const CHECK_HELP: &str = "\
Examples:
  plangate check-config --config plangate.toml
  plangate check-config --config plangate.toml --connect";

const ADMIN_HELP: &str = "\
The database: --postgres-url URL (or $PLANGATE_POSTGRES_URL), else [storage] postgres_url of --config FILE
(or $PLANGATE_CONFIG, else ./plangate.toml). Only [storage] (and the routes' units) of the config is read,
so PLANGATE_ADMIN_TOKEN need not be set.";

#[derive(Debug, Parser)]
#[command(
    name = "plangate",
    version,
    about = "Metering gateway for OpenAI-compatible APIs: plans, rate limits, concurrency limits and credits",
    after_help = START_HERE
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the gateway (the production command).
    #[command(after_help = SERVE_HELP)]
    Serve {
        #[command(flatten)]
        config: ConfigArg,
        /// Exit (1) if Postgres or Redis does not answer at start, naming which and why, instead of
        /// starting not ready (also: [storage] require_at_start = true).
        #[arg(long)]
        require_stores: bool,
    },
    /// Try plangate: in-process stores, the example plans, a mock upstream and a demo key.
    #[command(after_help = DEV_HELP)]
    Dev {
        /// Config file to run instead of the built-in dev config (its [storage] URLs are ignored).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Address of the gateway [default: the config's, 127.0.0.1:8080].
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
        /// Address of the admin API [default: the config's, 127.0.0.1:9090].
        #[arg(long, value_name = "ADDR")]
        admin_listen: Option<SocketAddr>,
    },
    /// Run only the built-in mock OpenAI upstream (demos, compose, load tests).
    Mock {
        /// Address to listen on.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:18080")]
        listen: String,
    },
    /// Create or upgrade the Postgres schema, creating the database if it does not exist (idempotent).
    #[command(after_help = ADMIN_HELP)]
    Migrate {
        #[command(flatten)]
        target: DbTarget,
    },
    /// Validate the config and the plans file it names, offline; with --connect, try the stores too.
    #[command(after_help = CHECK_HELP)]
    CheckConfig {
        #[command(flatten)]
        config: ConfigArg,
        /// Also connect to Postgres and Redis and say which one fails and why (exit 1).
        #[arg(long)]
        connect: bool,
    },
    /// Manage plans in Postgres: apply a plans file, list, show, delete, set the default.
    #[command(after_help = ADMIN_HELP)]
    Plans {
        #[command(flatten)]
        target: DbTarget,
        #[command(subcommand)]
        cmd: PlansCmd,
    },
    /// Manage accounts: create, update metadata, assign a plan, show, list, delete.
    #[command(after_help = ADMIN_HELP)]
    Accounts {
        #[command(flatten)]
        target: DbTarget,
        #[command(subcommand)]
        cmd: AccountsCmd,
    },
    /// Manage API keys: create (printed once, optionally with a plan of its own), update its plan, revoke, list.
    #[command(after_help = ADMIN_HELP)]
    Keys {
        #[command(flatten)]
        target: DbTarget,
        #[command(subcommand)]
        cmd: KeysCmd,
    },
    /// Manage credits (quota blocks): grant, balance, expire, delete.
    #[command(after_help = ADMIN_HELP)]
    Credits {
        #[command(flatten)]
        target: DbTarget,
        #[command(subcommand)]
        cmd: CreditsCmd,
    },
    /// Rate-limit counters: reset an account's windows (logged at WARN).
    #[command(after_help = ADMIN_HELP)]
    Limits {
        #[command(flatten)]
        target: DbTarget,
        #[command(subcommand)]
        cmd: LimitsCmd,
    },
    /// Threshold notifications (plans' `notify:`): the delivery log.
    #[command(after_help = ADMIN_HELP)]
    Notifications {
        #[command(flatten)]
        target: DbTarget,
        #[command(subcommand)]
        cmd: NotificationsCmd,
    },
    /// Usage events (export).
    Usage {
        #[command(flatten)]
        target: DbTarget,
        #[command(subcommand)]
        cmd: UsageCmd,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    plangate::server::init_logging();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn run(cli: Cli) -> Result<(), CliError> {
    let admin =
        |target: DbTarget, cmd: AdminCmd| runtime()?.block_on(cli::admin::run(&target, cmd));
    match cli.cmd {
        Cmd::CheckConfig { config, connect } => {
            let config = config.require()?;
            let summary = cli::check::run(&config)?;
            println!("{summary}");
            if connect {
                runtime()?.block_on(cli::check::connect(&config))?;
            }
            Ok(())
        }
        Cmd::Serve {
            config,
            require_stores,
        } => {
            let config = config.require()?;
            runtime()?.block_on(plangate::app::serve(&config, require_stores))
        }
        Cmd::Dev {
            config,
            listen,
            admin_listen,
        } => runtime()?.block_on(plangate::app::dev(plangate::app::DevOptions {
            config,
            listen,
            admin_listen,
        })),
        Cmd::Mock { listen } => runtime()?.block_on(plangate::app::mock(&listen)),
        Cmd::Migrate { target } => admin(target, AdminCmd::Migrate),
        Cmd::Plans { target, cmd } => admin(target, AdminCmd::Plans(cmd)),
        Cmd::Accounts { target, cmd } => admin(target, AdminCmd::Accounts(cmd)),
        Cmd::Keys { target, cmd } => admin(target, AdminCmd::Keys(cmd)),
        Cmd::Credits { target, cmd } => admin(target, AdminCmd::Credits(cmd)),
        Cmd::Limits { target, cmd } => admin(target, AdminCmd::Limits(cmd)),
        Cmd::Notifications { target, cmd } => admin(target, AdminCmd::Notifications(cmd)),
        Cmd::Usage { target, cmd } => runtime()?.block_on(cli::usage::run(&target, cmd)),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Failure(format!("starting the async runtime: {e}")))
}
