//! Parsing `plans.yaml` into checked [`crate::plans`] types, with file:line errors.
