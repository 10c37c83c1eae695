//! The Redis key format: the only place that builds counter-store keys.
