//! catalog tests
