-- plangate catalog schema, version 4: the lifecycle of accounts and keys
-- (issue 14 item 6).

-- A key may carry a label (e.g. "ci") and an expiry: from `expires_at` on
-- it is refused (401) like a revoked key.
ALTER TABLE api_keys ADD COLUMN label text CHECK (octet_length(label) <= 200);
ALTER TABLE api_keys ADD COLUMN expires_at timestamptz;

-- Accounts can be deleted (`plangate accounts delete`): their keys and
-- quota blocks go with them, their ledger rows stay for audit (as usage
-- events do, which never had a foreign key). The catalog checks that the
-- account exists before it writes a ledger row, as the key did.
ALTER TABLE credit_ledger DROP CONSTRAINT credit_ledger_account_id_fkey;

-- One row per deleted account id: when, and the credit version its
-- deletion announced. An account created again under the id starts from
-- that version, so credit versions never go back for an id and no wallet
-- of the old account (nor its invalidations) can pass for the new one.
CREATE TABLE deleted_accounts (
    id              text PRIMARY KEY,
    credit_version  bigint NOT NULL,
    deleted_at      timestamptz NOT NULL
);

-- Who owns the plans, as the last gateway started said (`[plans] source`):
-- key 'plans_file' holds the plans file of gateways under source =
-- "file", so that admin commands given only a database URL refuse plan
-- writes the file would undo. No row: the database owns the plans.
CREATE TABLE plangate_settings (
    key    text PRIMARY KEY,
    value  text NOT NULL
);

-- `accounts list` pages through accounts by id, bytewise.
CREATE INDEX accounts_id_bytewise ON accounts ((id COLLATE "C"));
