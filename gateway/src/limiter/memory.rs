//! In-process counter store: sharded, bounded memory.
