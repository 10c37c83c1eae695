-- Threshold notifications (issue 15 item 7): the delivery queue and log of
-- the signed webhooks plans ask for (`notify:` in plans.yaml). One row per
-- notification; the UNIQUE dedupe key makes a threshold fire at most once
-- (per window, per set of quota blocks, per block) whichever gateway saw
-- it first. No foreign key on accounts: the log outlives a deleted account.
CREATE TABLE notifications (
    seq              bigserial PRIMARY KEY,
    id               text NOT NULL UNIQUE,
    dedupe_key       text NOT NULL UNIQUE CHECK (octet_length(dedupe_key) BETWEEN 1 AND 1024),
    account_id       text NOT NULL,
    kind             text NOT NULL CHECK (kind IN ('window', 'balance', 'expiry')),
    data             jsonb NOT NULL,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    last_error       text,
    created_at       timestamptz NOT NULL,
    -- Pending: when the next attempt is due (a claimed row is leased by
    -- moving it forward). NULL once delivered or failed.
    next_attempt_at  timestamptz,
    delivered_at     timestamptz
);

-- The worker's scan: pending rows by due time.
CREATE INDEX notifications_due ON notifications (next_attempt_at) WHERE status = 'pending';
-- The delivery log of one account, newest first.
CREATE INDEX notifications_account ON notifications (account_id, seq);
-- The expiry scan: blocks with credits left by expiry.
CREATE INDEX quota_blocks_expiring ON quota_blocks (expires_at)
    WHERE credits_remaining > 0 AND expires_at IS NOT NULL;
