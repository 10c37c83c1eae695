-- Key-level limits (issue 15 item 3): an API key may carry a plan of its
-- own, whose windows for an endpoint apply to that key on top of its
-- account's plan (counted per key, admitted atomically with the
-- account's). NULL: the key has only its account's limits. RESTRICT: a
-- plan some key uses cannot be deleted (as for accounts).
ALTER TABLE api_keys ADD COLUMN plan_id text
    REFERENCES plans (id) ON DELETE RESTRICT ON UPDATE CASCADE;

CREATE INDEX api_keys_plan_id ON api_keys (plan_id) WHERE plan_id IS NOT NULL;
