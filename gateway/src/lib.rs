//! plangate: an HTTP gateway that meters AI inference APIs with tiered plans
//! of fixed-window limits, concurrency limits and expiring credits.
//!
//! The gateway binary is built on this library; see ARCHITECTURE.md for the
//! request lifecycle and the code map.
#![forbid(unsafe_code)]

pub mod access;
pub mod admin;
pub mod app;
pub mod background;
pub mod catalog;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod console;
pub mod credits;
pub mod decode;
pub mod errors;
#[cfg(test)]
mod fuzz;
pub mod headers;
pub mod health;
pub mod limiter;
pub mod metrics;
pub mod mock;
pub mod notify;
pub mod plans;
pub mod proxy;
pub mod query;
pub mod routes;
pub mod server;
pub mod upstream;
pub mod usage;
