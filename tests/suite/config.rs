//! config tests
