-- plangate catalog schema, version 2: usage events, one row per ended
-- request (issue 12 item 4). Written in batches by the gateway, read by
-- `plangate usage export`, `GET /admin/usage[/events]` and `GET /v1/usage`,
-- pruned by `[usage] retain`.

CREATE TABLE usage_events (
    -- Fixed-width columns first: no alignment padding between them.
    ended_at    timestamptz NOT NULL,
    started_at  timestamptz NOT NULL,
    credits     bigint NOT NULL CHECK (credits >= 0),
    status      smallint NOT NULL CHECK (status BETWEEN 100 AND 999),
    degraded    boolean NOT NULL,
    streamed    boolean NOT NULL,
    cut_short   boolean NOT NULL,
    -- The gateway's request id: recording an event twice inserts it once.
    -- COLLATE "C": ids order bytewise, as the in-process catalog orders
    -- them, whatever the database's locale (and "C" compares faster).
    request_id  text COLLATE "C" PRIMARY KEY
                CHECK (octet_length(request_id) BETWEEN 1 AND 200),
    -- No foreign key: the usage of an account deleted since must not be
    -- lost, and recording must not wait on account rows.
    account_id  text COLLATE "C" NOT NULL,
    key_id      text,
    endpoint    text COLLATE "C" NOT NULL,
    route       text NOT NULL,
    -- {"<unit>": [measured, reserved], ...}: one row per event (no join on
    -- export), summed per unit in SQL with jsonb_each.
    units       jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(units) = 'object')
);

-- The time-ordered export of all accounts (keyset pages on
-- (ended_at, request_id)) and retention (ended_at < cutoff).
CREATE INDEX usage_events_ended ON usage_events (ended_at, request_id);
-- One account's events in time order: its export, /v1/usage, summaries.
CREATE INDEX usage_events_account ON usage_events (account_id, ended_at, request_id);
