//! plangate's black-box test suite: one test binary, one module per area.
//! Tests that need Postgres or Redis talk to the real servers.

mod cache_trust;
mod catalog;
mod cluster;
mod config;
mod console;
mod gateway;
mod http_ops;
mod integrity;
mod key_limits;
mod lifecycle;
mod limiter;
mod litellm;
mod notify;
mod operator;
mod reload;
mod sdk;
mod streaming;
mod transport;
mod upstreams;
mod usage;
mod wallets;
