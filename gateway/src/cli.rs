//! The command line's work, one function per subcommand; `main.rs` only
//! parses arguments and maps errors to exit codes.

pub mod admin;
pub mod check;
pub mod usage;

use std::path::PathBuf;

/// The config file a command reads when none is named: `plangate.toml` in
/// the working directory.
pub const DEFAULT_CONFIG: &str = "plangate.toml";

/// `--config FILE` of the commands that read a config file.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArg {
    /// The config file (plangate.toml) [default: ./plangate.toml when it exists].
    #[arg(long, env = "PLANGATE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl ConfigArg {
    /// The file named (by `--config` or `PLANGATE_CONFIG`), else
    /// [`DEFAULT_CONFIG`] when the working directory has one.
    pub fn resolve(&self) -> Option<PathBuf> {
        self.config.clone().or_else(|| {
            let default = PathBuf::from(DEFAULT_CONFIG);
            default.is_file().then_some(default)
        })
    }

    /// [`ConfigArg::resolve`], or an error saying how to name one.
    pub fn require(&self) -> Result<PathBuf, CliError> {
        self.resolve().ok_or_else(|| {
            CliError::BadInput(format!(
                "no config file: pass --config FILE, set PLANGATE_CONFIG, or run where {DEFAULT_CONFIG} is"
            ))
        })
    }
}

/// Exit code for bad input or config.
pub const EXIT_BAD_INPUT: i32 = 2;
/// Exit code for runtime failures.
pub const EXIT_FAILURE: i32 = 1;

/// A failed command: what to print and which exit code to use.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad input or config: exit 2.
    #[error("{0}")]
    BadInput(String),
    /// Runtime failure: exit 1.
    #[error("{0}")]
    Failure(String),
}

impl CliError {
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::BadInput(_) => EXIT_BAD_INPUT,
            CliError::Failure(_) => EXIT_FAILURE,
        }
    }
}
