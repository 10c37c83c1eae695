//! Redis-compatible counter store: one atomic Lua script per operation.
