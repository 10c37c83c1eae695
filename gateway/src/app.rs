//! Assembly: builds the stores, catalog, limiter and listeners from a
//! [`Config`](crate::config::Config) and runs them (`serve` and `dev`).

use std::path::Path;

use crate::cli::CliError;

/// `plangate serve`.
pub async fn serve(config: &Path) -> Result<(), CliError> {
    let _ = config;
    Err(CliError::Failure("serve is not built yet".into()))
}

/// `plangate dev`.
pub async fn dev(config: Option<&Path>, listen: Option<&str>) -> Result<(), CliError> {
    let _ = (config, listen);
    Err(CliError::Failure("dev is not built yet".into()))
}
