//! Per-process cache of plans, account→plan and key→account, invalidated across instances.
