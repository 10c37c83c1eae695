//! Path (+ model) → endpoint and upstream: pure lookup, no I/O.
