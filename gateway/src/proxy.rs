//! Upstream client, header rewriting, streaming bodies.
