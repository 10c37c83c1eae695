//! limiter tests
