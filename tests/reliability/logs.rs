//! Secrets in logs.
