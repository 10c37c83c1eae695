//! The command line's work, one function per subcommand; `main.rs` only
//! parses arguments and maps errors to exit codes.

pub mod admin;
pub mod check;
pub mod usage;

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
