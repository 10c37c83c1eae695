//! Admin API, /metrics.
