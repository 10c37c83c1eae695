//! Listeners, TLS, graceful shutdown; the service assembled in one place.

use std::path::Path;

use crate::cli::CliError;

/// Log to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

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
