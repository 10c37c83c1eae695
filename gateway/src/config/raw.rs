//! serde mirrors of `plangate.toml` (deny_unknown_fields): the edge.
