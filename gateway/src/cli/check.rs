//! `plangate check-config`.

use std::path::Path;

use super::CliError;

/// Validate the config file and the plans file it names; on failure the
/// error lists every problem, one per line, with file:line.
pub fn run(config: &Path) -> Result<String, CliError> {
    let _ = config;
    Err(CliError::Failure("check-config is not built yet".into()))
}
