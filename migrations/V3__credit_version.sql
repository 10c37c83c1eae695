-- Gateways hold each account's balance in their counter store (a
-- "wallet", limiter/wallet.rs) and record what they decide in the ledger.
-- Every change made outside the wallets (a grant, a deleted or expired
-- block, a direct deduction or refund) bumps the account's credit version,
-- so that wallets loaded before it are dropped and reloaded.
ALTER TABLE accounts ADD COLUMN credit_version bigint NOT NULL DEFAULT 0;
