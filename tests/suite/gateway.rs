//! gateway tests
