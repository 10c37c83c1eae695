//! Checked configuration (SPEC §2), built from `config/raw.rs`.
