-- One row per request (issue 12 item 1): a request's credit charge, as
-- its wallet decided it, is recorded in its usage event's row instead of
-- a ledger row of its own. The ledger (`Catalog::ledger`) shows such a row
-- as the entry `req:<request_id>`; `credits` is what was taken.
-- NULL credits_requested: the event carries no charge (an endpoint without
-- credits, or a charge recorded in credit_ledger).
ALTER TABLE usage_events
    ADD COLUMN credits_requested bigint CHECK (credits_requested >= credits),
    -- [{"block_id": "...", "credits": n}, ...] in drain order, as in
    -- credit_ledger: a refund gives back exactly what was taken.
    ADD COLUMN draws jsonb,
    ADD COLUMN credits_refunded bigint NOT NULL DEFAULT 0
        CHECK (credits_refunded >= 0 AND credits_refunded <= credits),
    ADD COLUMN refunded_at timestamptz;

-- Those draws are taken from quota_blocks.credits_remaining once per
-- outbox batch, on the same few rows of a busy account. An index whose
-- predicate names credits_remaining makes every such update a non-HOT one
-- (new entries in all four indexes, and dead ones to skip until vacuum):
-- the two partial indexes on it filter on expiry only, and their scans
-- check credits_remaining > 0 on the rows.
DROP INDEX quota_blocks_drain;
CREATE INDEX quota_blocks_drain ON quota_blocks (account_id, expires_at ASC NULLS LAST, seq);
DROP INDEX quota_blocks_expiring;
CREATE INDEX quota_blocks_expiring ON quota_blocks (expires_at) WHERE expires_at IS NOT NULL;
ALTER TABLE quota_blocks SET (fillfactor = 90);
