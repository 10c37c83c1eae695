//! In-process catalog.
