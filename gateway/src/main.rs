//! The `plangate` command line. Parses arguments, runs the library, maps
//! errors to exit codes (0 ok, 1 runtime failure, 2 bad input).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use plangate::cli::admin::{AccountsCmd, AdminCmd, CreditsCmd, DbTarget, KeysCmd, PlansCmd};
use plangate::cli::usage::UsageCmd;
use plangate::cli::{self, CliError};

/// mimalloc instead of glibc's malloc: a request makes about 70
/// allocations, and mimalloc's thread-local free lists make them cheaper
/// (docs/PERFORMANCE.md has the measurement).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "plangate",
    version,
    about = "Metering gateway for OpenAI-compatible APIs"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the gateway.
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// Run with in-process stores, the example plans and a mock upstream.
    Dev {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        listen: Option<String>,
    },
    /// Run only the built-in mock OpenAI upstream (demos, compose, load tests).
    Mock {
        #[arg(long, default_value = "127.0.0.1:18080")]
        listen: String,
    },
    /// Create or upgrade the Postgres schema (idempotent).
    Migrate {
        #[command(flatten)]
        target: DbTarget,
    },
    /// Validate config and plans offline.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
    /// Plan admin.
    Plans {
        #[command(flatten)]
        target: DbTarget,
        #[command(subcommand)]
        cmd: PlansCmd,
    },
    /// Account admin.
    Accounts {
        #[command(flatten)]
        target: DbTarget,
        #[command(subcommand)]
        cmd: AccountsCmd,
    },
    /// API keys.
    Keys {
        #[command(flatten)]
        target: DbTarget,
        #[command(subcommand)]
        cmd: KeysCmd,
    },
    /// Quota blocks.
    Credits {
        #[command(flatten)]
        target: DbTarget,
        #[command(subcommand)]
        cmd: CreditsCmd,
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
        Cmd::CheckConfig { config } => {
            let summary = cli::check::run(&config)?;
            println!("{summary}");
            Ok(())
        }
        Cmd::Serve { config } => runtime()?.block_on(plangate::app::serve(&config)),
        Cmd::Dev { config, listen } => {
            runtime()?.block_on(plangate::app::dev(config.as_deref(), listen.as_deref()))
        }
        Cmd::Mock { listen } => runtime()?.block_on(plangate::app::mock(&listen)),
        Cmd::Migrate { target } => admin(target, AdminCmd::Migrate),
        Cmd::Plans { target, cmd } => admin(target, AdminCmd::Plans(cmd)),
        Cmd::Accounts { target, cmd } => admin(target, AdminCmd::Accounts(cmd)),
        Cmd::Keys { target, cmd } => admin(target, AdminCmd::Keys(cmd)),
        Cmd::Credits { target, cmd } => admin(target, AdminCmd::Credits(cmd)),
        Cmd::Usage { target, cmd } => runtime()?.block_on(cli::usage::run(&target, cmd)),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Failure(format!("starting the async runtime: {e}")))
}
