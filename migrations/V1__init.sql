-- plangate catalog schema, version 1: plans, accounts, API keys, quota
-- blocks and the credit ledger (SPEC §5, §8). Applied by `plangate migrate`.

-- Plans in the plans.yaml schema (one plan's {"name", "endpoints"} as JSONB).
CREATE TABLE plans (
    id          text PRIMARY KEY CHECK (octet_length(id) BETWEEN 1 AND 200),
    name        text NOT NULL,
    policy      jsonb NOT NULL,
    is_default  boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);

-- At most one default plan; the catalog code keeps it at exactly one once
-- any plan exists (the default can be changed but never deleted).
CREATE UNIQUE INDEX plans_single_default ON plans ((true)) WHERE is_default;

CREATE TABLE accounts (
    id          text PRIMARY KEY CHECK (octet_length(id) BETWEEN 1 AND 200),
    -- NULL: the account is on the default plan. RESTRICT: a plan in use
    -- cannot be deleted.
    plan_id     text REFERENCES plans (id) ON DELETE RESTRICT ON UPDATE CASCADE,
    metadata    jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(metadata) = 'object'),
    created_at  timestamptz NOT NULL
);

CREATE INDEX accounts_plan_id ON accounts (plan_id) WHERE plan_id IS NOT NULL;

-- API keys are stored only as the hex SHA-256 of the plaintext.
CREATE TABLE api_keys (
    seq         bigserial UNIQUE,
    id          text PRIMARY KEY,
    account_id  text NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    key_hash    text NOT NULL UNIQUE CHECK (key_hash ~ '^[0-9a-f]{64}$'),
    prefix      text NOT NULL,
    created_at  timestamptz NOT NULL,
    revoked_at  timestamptz
);

CREATE INDEX api_keys_account ON api_keys (account_id);

CREATE TABLE quota_blocks (
    -- Creation order: the drain-order tie-breaker after expiry.
    seq                bigserial UNIQUE,
    id                 text PRIMARY KEY,
    account_id         text NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    credits_granted    bigint NOT NULL CHECK (credits_granted >= 0),
    credits_remaining  bigint NOT NULL CHECK (credits_remaining >= 0),
    expires_at         timestamptz,
    metadata           jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(metadata) = 'object'),
    created_at         timestamptz NOT NULL,
    CHECK (credits_remaining <= credits_granted)
);

-- Deduction scans: an account's blocks with credits left, in drain order.
CREATE INDEX quota_blocks_drain ON quota_blocks (account_id, expires_at ASC NULLS LAST, seq)
    WHERE credits_remaining > 0;
CREATE INDEX quota_blocks_account ON quota_blocks (account_id, seq);

-- One row per deduction; the UNIQUE idempotency key makes a repeated or
-- concurrent duplicate deduct once.
CREATE TABLE credit_ledger (
    seq              bigserial PRIMARY KEY,
    idempotency_key  text NOT NULL UNIQUE,
    account_id       text NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    request_id       text,
    endpoint         text,
    requested        bigint NOT NULL CHECK (requested >= 0),
    deducted         bigint NOT NULL CHECK (deducted >= 0 AND deducted <= requested),
    -- [{"block_id": "...", "credits": n}, ...] in drain order, so a refund
    -- gives back exactly what was taken. No FK: a block may be deleted.
    draws            jsonb NOT NULL DEFAULT '[]'::jsonb,
    refunded         bigint NOT NULL DEFAULT 0 CHECK (refunded >= 0 AND refunded <= deducted),
    refunded_at      timestamptz,
    created_at       timestamptz NOT NULL
);

CREATE INDEX credit_ledger_account ON credit_ledger (account_id, seq);
