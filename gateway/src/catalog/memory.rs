//! In-process catalog: everything behind one mutex, so every operation is
//! trivially atomic. Used by `plangate dev` and the tests; behaves exactly
//! like the Postgres catalog (one conformance suite runs on both).
//!
//! Usage events are kept apart, behind a mutex of their own, and bounded:
//! the newest [`USAGE_CAPACITY`] by `ended_at` (see [`UsageStore`]).

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;
use tokio::sync::broadcast;

use super::{
    already_revoked, check_billing_anchor, check_block_expiry, check_credits, check_grant,
    check_id, check_key_options, credits_left, generate_id, generate_key, hash_key, merge_metadata,
    ms_to_time, normalize_metadata, time_to_ms, trunc_micros, Account, AccountSummary, ApiKeyInfo,
    ApplyReport, Catalog, CatalogError, CatalogResult, CreditOp, CreditSnapshot, DeductResult,
    Deduction, DeletedAccount, Draw, GroupBy, Invalidation, KeyOptions, KeyOwner, LedgerEntry,
    NewApiKey, QuotaBlock, UsageBucket, UsageCursor, UsageEvent, UsageQuery, MAX_ACCOUNTS_PAGE,
};
use crate::catalog::notifications::NotificationStore;
use crate::catalog::usage::{check_batch, epoch_ms_ceil, from_ms, Summary};
use crate::catalog::{Attempted, NewNotification, Notification, NotificationQuery};
use crate::clock::SharedClock;
use crate::limiter::wallet::request_key;
use crate::plans::{Plan, PlanSet};

/// How many usage events the in-process catalog keeps by default.
pub const USAGE_CAPACITY: usize = 100_000;

/// The in-process catalog. Times come from the clock it is given.
pub struct MemoryCatalog {
    state: Mutex<State>,
    /// Threshold notifications (queue and delivery log), kept in memory:
    /// lost with the process, like everything here.
    notifications: Mutex<NotificationStore>,
    /// Apart from `state`: recording usage never waits for a deduction.
    usage: Mutex<UsageStore>,
    clock: SharedClock,
    events: broadcast::Sender<Invalidation>,
}

impl MemoryCatalog {
    fn send(&self, inv: Option<Invalidation>) {
        if let Some(inv) = inv {
            let _ = self.events.send(inv);
        }
    }
}

/// Usage events in (`ended_at` ms, `request_id`) order, at most `capacity`:
/// past it, the events that ended first are dropped (roughly half a KB
/// each, so some 50 MB at the default bound). `plangate dev` needs
/// recent usage, not a billing history. A dropped event's id is
/// forgotten too: recorded again, it is stored again.
#[derive(Debug)]
pub struct UsageStore {
    capacity: usize,
    by_time: BTreeMap<(u64, String), UsageEvent>,
    /// `request_id` → `ended_at` ms: the key into `by_time`.
    ended_of: HashMap<String, u64>,
}

impl UsageStore {
    fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            by_time: BTreeMap::new(),
            ended_of: HashMap::new(),
        }
    }

    fn record(&mut self, events: &[UsageEvent]) -> u64 {
        let mut inserted = 0;
        for e in events {
            if self.ended_of.contains_key(&e.request_id) {
                continue;
            }
            let mut e = e.normalized();
            // Its charge is in the ledger (`State::record_charge`).
            e.charge = None;
            let ms = e.ended_ms();
            self.ended_of.insert(e.request_id.clone(), ms);
            self.by_time.insert((ms, e.request_id.clone()), e);
            inserted += 1;
        }
        while self.by_time.len() > self.capacity {
            if let Some(((_, id), _)) = self.by_time.pop_first() {
                self.ended_of.remove(&id);
            }
        }
        inserted
    }

    /// When the account's latest event ended (ms), if it has any.
    fn last_ended(&self, account: &str) -> Option<u64> {
        self.by_time
            .iter()
            .rev()
            .find(|(_, e)| e.account_id == account)
            .map(|((ended, _), _)| *ended)
    }

    fn page(&self, q: &UsageQuery, after: Option<&UsageCursor>, limit: usize) -> Vec<UsageEvent> {
        let range = q.ms_range();
        // Start at the cursor or at `since`, whichever is later, and stop
        // at `until`: only the account and endpoint filters scan.
        let from = match (after, range.since_ms) {
            (Some(c), Some(s)) if s > c.ended_ms => Bound::Included((s, String::new())),
            (Some(c), _) => Bound::Excluded((c.ended_ms, c.request_id.clone())),
            (None, Some(s)) => Bound::Included((s, String::new())),
            (None, None) => Bound::Unbounded,
        };
        self.by_time
            .range((from, Bound::Unbounded))
            .map(|(_, e)| e)
            .take_while(|e| range.until_ms.map_or(true, |u| e.ended_ms() < u))
            .filter(|e| q.matches(e))
            .take(limit)
            .cloned()
            .collect()
    }

    fn summary(&self, q: &UsageQuery, group_by: GroupBy) -> Vec<UsageBucket> {
        let mut s = Summary::default();
        for e in self.by_time.values().filter(|e| q.matches(e)) {
            s.add(group_by, e);
        }
        s.finish()
    }

    fn prune(&mut self, before_ms: u64) -> u64 {
        let keep = self.by_time.split_off(&(before_ms, String::new()));
        let gone = std::mem::replace(&mut self.by_time, keep);
        for (_, id) in gone.keys() {
            self.ended_of.remove(id);
        }
        gone.len() as u64
    }

    /// Events held.
    pub fn len(&self) -> usize {
        self.by_time.len()
    }

    /// Whether no event is held.
    pub fn is_empty(&self) -> bool {
        self.by_time.is_empty()
    }
}

impl std::fmt::Debug for MemoryCatalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryCatalog").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct State {
    plans: BTreeMap<String, Arc<Plan>>,
    default_plan: Option<String>,
    accounts: HashMap<String, AccountRow>,
    /// By key id.
    keys: HashMap<String, KeyRow>,
    /// Key hash → key id.
    key_by_hash: HashMap<String, String>,
    /// By block id.
    blocks: HashMap<String, BlockRow>,
    /// Account id → its block ids, so credit operations do not scan every
    /// block of every account.
    blocks_of: HashMap<String, Vec<String>>,
    /// By idempotency key.
    ledger: HashMap<String, LedgerRow>,
    /// Creation order, the tie-breaker Postgres gets from `bigserial`.
    next_seq: u64,
    /// See [`Catalog::plans_file_owner`].
    plans_file_owner: Option<String>,
    /// Deleted account id → the credit version its deletion announced
    /// (an account created again under the id starts there).
    deleted: HashMap<String, u64>,
}

struct AccountRow {
    plan_id: Option<String>,
    billing_anchor: Option<u8>,
    metadata: serde_json::Value,
    /// Bumped by credit changes made outside the wallets.
    credit_version: u64,
}

struct KeyRow {
    seq: u64,
    account_id: String,
    hash: String,
    prefix: String,
    created_at: SystemTime,
    revoked: bool,
    label: Option<String>,
    expires_at: Option<SystemTime>,
    plan_id: Option<String>,
}

struct BlockRow {
    seq: u64,
    account_id: String,
    granted: u64,
    remaining: u64,
    expires_at: Option<SystemTime>,
    metadata: serde_json::Value,
    created_at: SystemTime,
}

struct LedgerRow {
    seq: u64,
    account_id: String,
    request_id: Option<String>,
    endpoint: Option<String>,
    requested: u64,
    deducted: u64,
    draws: Vec<Draw>,
    refunded: Option<u64>,
    created_at: SystemTime,
}

impl BlockRow {
    fn live(&self, now: SystemTime) -> bool {
        self.expires_at.map_or(true, |e| e > now)
    }

    fn to_block(&self, id: &str) -> QuotaBlock {
        QuotaBlock {
            id: id.to_string(),
            account_id: self.account_id.clone(),
            credits_granted: self.granted,
            credits_remaining: self.remaining,
            expires_at: self.expires_at,
            metadata: self.metadata.clone(),
            created_at: Some(self.created_at),
        }
    }
}

impl State {
    fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    /// A charge a wallet decided, under ledger key `key`, once: its draws
    /// taken from the blocks still there, its row numbered now.
    fn record_charge(&mut self, key: &str, mut row: LedgerRow) {
        if self.ledger.contains_key(key) {
            return;
        }
        for d in &row.draws {
            if let Some(b) = self.blocks.get_mut(&d.block_id) {
                b.remaining = b.remaining.saturating_sub(d.credits);
            }
        }
        row.seq = self.seq();
        self.ledger.insert(key.to_owned(), row);
    }

    fn require_account(&self, id: &str) -> CatalogResult<&AccountRow> {
        self.accounts
            .get(id)
            .ok_or_else(|| CatalogError::not_found("account", id))
    }

    fn require_plan(&self, id: &str) -> CatalogResult<()> {
        if self.plans.contains_key(id) {
            Ok(())
        } else {
            Err(CatalogError::not_found("plan", id))
        }
    }

    fn plan_in_use(&self, id: &str) -> bool {
        self.accounts
            .values()
            .any(|a| a.plan_id.as_deref() == Some(id))
            || self.keys.values().any(|k| k.plan_id.as_deref() == Some(id))
    }

    /// The account's blocks, in no particular order.
    fn blocks_of<'a>(
        &'a self,
        account_id: &str,
    ) -> impl Iterator<Item = (&'a String, &'a BlockRow)> {
        self.blocks_of
            .get(account_id)
            .into_iter()
            .flatten()
            .filter_map(|id| self.blocks.get_key_value(id))
    }

    /// Live blocks of an account with credits left, in drain order:
    /// earliest expiry first, never-expiring last, then creation order.
    fn drain_order(&self, account_id: &str, now: SystemTime) -> Vec<String> {
        let mut live: Vec<(&String, &BlockRow)> = self
            .blocks_of(account_id)
            .filter(|(_, b)| b.remaining > 0 && b.live(now))
            .collect();
        live.sort_by_key(|(_, b)| (b.expires_at.is_none(), b.expires_at, b.seq));
        live.into_iter().map(|(id, _)| id.clone()).collect()
    }

    /// Bump the account's credit version (if it exists): the invalidation
    /// to send once the state is unlocked.
    fn bump_credits(&mut self, account_id: &str) -> Option<Invalidation> {
        let row = self.accounts.get_mut(account_id)?;
        row.credit_version += 1;
        Some(Invalidation::Credits {
            account: account_id.to_owned(),
            version: row.credit_version,
        })
    }

    fn balance(&self, account_id: &str, now: SystemTime) -> u64 {
        self.blocks_of(account_id)
            .filter(|(_, b)| b.live(now))
            .map(|(_, b)| b.remaining)
            .fold(0u64, u64::saturating_add)
    }

    fn account(&self, id: &str) -> CatalogResult<Account> {
        let row = self.require_account(id)?;
        Ok(Account {
            id: id.to_string(),
            plan_id: row.plan_id.clone(),
            effective_plan: row.plan_id.clone().or_else(|| self.default_plan.clone()),
            metadata: row.metadata.clone(),
            billing_anchor: row.billing_anchor,
        })
    }
}

impl MemoryCatalog {
    /// An empty catalog reading time from `clock`, keeping at most
    /// [`USAGE_CAPACITY`] usage events.
    pub fn new(clock: SharedClock) -> Self {
        Self::with_usage_capacity(clock, USAGE_CAPACITY)
    }

    /// An empty catalog keeping at most `capacity` usage events (at least 1).
    pub fn with_usage_capacity(clock: SharedClock, capacity: usize) -> Self {
        let (events, _) = broadcast::channel(1024);
        Self {
            state: Mutex::new(State::default()),
            notifications: Mutex::new(NotificationStore::default()),
            usage: Mutex::new(UsageStore::new(capacity)),
            clock,
            events,
        }
    }

    /// Usage events held now.
    pub fn usage_len(&self) -> usize {
        self.usage.lock().len()
    }

    fn now(&self) -> SystemTime {
        ms_to_time(self.clock.now_ms())
    }

    fn notify(&self, inv: Invalidation) {
        // No receivers is fine: nothing is cached.
        let _ = self.events.send(inv);
    }
}

#[async_trait::async_trait]
impl Catalog for MemoryCatalog {
    async fn apply_plans(&self, plans: &PlanSet, prune: bool) -> CatalogResult<ApplyReport> {
        for id in plans.plans.keys() {
            check_id("plan", id)?;
        }
        let report = {
            let mut st = self.state.lock();
            if let Some(d) = &plans.default_plan {
                if !plans.plans.contains_key(d) && !st.plans.contains_key(d) {
                    return Err(CatalogError::Invalid(format!(
                        "default_plan `{d}` names no plan"
                    )));
                }
            }
            for (id, plan) in &plans.plans {
                st.plans.insert(id.clone(), plan.clone());
            }
            if let Some(d) = &plans.default_plan {
                st.default_plan = Some(d.clone());
            } else if st.default_plan.is_none() {
                st.default_plan = plans.plans.keys().next().cloned();
            }
            let mut pruned = Vec::new();
            let mut kept_in_use = Vec::new();
            if prune {
                let stale: Vec<String> = st
                    .plans
                    .keys()
                    .filter(|id| !plans.plans.contains_key(*id))
                    .cloned()
                    .collect();
                for id in stale {
                    if st.default_plan.as_deref() == Some(id.as_str()) || st.plan_in_use(&id) {
                        kept_in_use.push(id);
                    } else {
                        st.plans.remove(&id);
                        pruned.push(id);
                    }
                }
            }
            ApplyReport {
                upserted: plans.plans.keys().cloned().collect(),
                pruned,
                kept_in_use,
                default_plan: st.default_plan.clone(),
            }
        };
        if !plans.plans.is_empty() || !report.pruned.is_empty() {
            self.notify(Invalidation::Plans);
        }
        Ok(report)
    }

    async fn list_plans(&self) -> CatalogResult<PlanSet> {
        let st = self.state.lock();
        Ok(PlanSet {
            default_plan: st.default_plan.clone(),
            plans: st.plans.clone(),
        })
    }

    async fn get_plan(&self, id: &str) -> CatalogResult<Arc<Plan>> {
        self.state
            .lock()
            .plans
            .get(id)
            .cloned()
            .ok_or_else(|| CatalogError::not_found("plan", id))
    }

    async fn delete_plan(&self, id: &str) -> CatalogResult<()> {
        {
            let mut st = self.state.lock();
            st.require_plan(id)?;
            if st.default_plan.as_deref() == Some(id) {
                return Err(CatalogError::Conflict(format!(
                    "plan `{id}` is the default plan; make another plan the default first"
                )));
            }
            if st.plan_in_use(id) {
                return Err(CatalogError::Conflict(format!(
                    "plan `{id}` is in use by accounts or keys"
                )));
            }
            st.plans.remove(id);
        }
        self.notify(Invalidation::Plans);
        Ok(())
    }

    async fn default_plan(&self) -> CatalogResult<Option<String>> {
        Ok(self.state.lock().default_plan.clone())
    }

    async fn set_default_plan(&self, id: &str) -> CatalogResult<()> {
        {
            let mut st = self.state.lock();
            st.require_plan(id)?;
            st.default_plan = Some(id.to_string());
        }
        self.notify(Invalidation::Plans);
        Ok(())
    }

    async fn create_account(
        &self,
        id: &str,
        plan_id: Option<&str>,
        metadata: serde_json::Value,
    ) -> CatalogResult<Account> {
        check_id("account", id)?;
        let metadata = normalize_metadata(metadata)?;
        let account = {
            let mut st = self.state.lock();
            if st.accounts.contains_key(id) {
                return Err(CatalogError::Conflict(format!(
                    "account `{id}` already exists"
                )));
            }
            if let Some(p) = plan_id {
                st.require_plan(p)?;
            }
            let credit_version = st.deleted.get(id).copied().unwrap_or(0);
            st.accounts.insert(
                id.to_string(),
                AccountRow {
                    credit_version,
                    billing_anchor: None,
                    plan_id: plan_id.map(str::to_string),
                    metadata,
                },
            );
            st.account(id)?
        };
        self.notify(Invalidation::Account(id.to_string()));
        Ok(account)
    }

    async fn assign_plan(&self, account_id: &str, plan_id: Option<&str>) -> CatalogResult<()> {
        {
            let mut st = self.state.lock();
            st.require_account(account_id)?;
            if let Some(p) = plan_id {
                st.require_plan(p)?;
            }
            if let Some(row) = st.accounts.get_mut(account_id) {
                row.plan_id = plan_id.map(str::to_string);
            }
        }
        self.notify(Invalidation::Account(account_id.to_string()));
        Ok(())
    }

    async fn get_account(&self, id: &str) -> CatalogResult<Account> {
        self.state.lock().account(id)
    }

    async fn list_accounts(
        &self,
        plan: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> CatalogResult<Vec<Account>> {
        let st = self.state.lock();
        if let Some(p) = plan {
            st.require_plan(p)?;
        }
        let default = st.default_plan.as_deref();
        let mut ids: Vec<&String> = st
            .accounts
            .iter()
            .filter(|(id, _)| after.map_or(true, |a| id.as_bytes() > a.as_bytes()))
            .filter(|(_, row)| plan.map_or(true, |p| row.plan_id.as_deref().or(default) == Some(p)))
            .map(|(id, _)| id)
            .collect();
        ids.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        ids.into_iter()
            .take(limit.min(MAX_ACCOUNTS_PAGE + 1))
            .map(|id| st.account(id))
            .collect()
    }

    async fn search_accounts(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> CatalogResult<Vec<AccountSummary>> {
        let now = self.now();
        let rows: Vec<(Account, u64)> = {
            let st = self.state.lock();
            let mut ids: Vec<&String> = st
                .accounts
                .keys()
                .filter(|id| id.starts_with(prefix))
                .filter(|id| after.map_or(true, |a| id.as_bytes() > a.as_bytes()))
                .collect();
            ids.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            ids.into_iter()
                .take(limit.min(MAX_ACCOUNTS_PAGE + 1))
                .map(|id| Ok((st.account(id)?, st.balance(id, now))))
                .collect::<CatalogResult<_>>()?
        };
        let usage = self.usage.lock();
        Ok(rows
            .into_iter()
            .map(|(account, balance)| AccountSummary {
                last_seen: usage.last_ended(&account.id).map(ms_to_time),
                account,
                balance,
            })
            .collect())
    }

    async fn update_account_metadata(
        &self,
        id: &str,
        patch: &serde_json::Map<String, serde_json::Value>,
    ) -> CatalogResult<Account> {
        let mut st = self.state.lock();
        let row = st
            .accounts
            .get_mut(id)
            .ok_or_else(|| CatalogError::not_found("account", id))?;
        row.metadata = merge_metadata(&row.metadata, patch);
        st.account(id)
    }

    async fn delete_account(&self, id: &str, force: bool) -> CatalogResult<DeletedAccount> {
        let now = self.now();
        let (deleted, (hashes, version)) = {
            let mut st = self.state.lock();
            st.require_account(id)?;
            let credits = st.balance(id, now);
            if credits > 0 && !force {
                return Err(credits_left(id, credits));
            }
            let key_ids: Vec<String> = st
                .keys
                .iter()
                .filter(|(_, k)| k.account_id == id)
                .map(|(kid, _)| kid.clone())
                .collect();
            let mut hashes = Vec::with_capacity(key_ids.len());
            for kid in &key_ids {
                if let Some(k) = st.keys.remove(kid) {
                    st.key_by_hash.remove(&k.hash);
                    hashes.push(k.hash);
                }
            }
            let blocks = st.blocks_of.remove(id).unwrap_or_default();
            for b in &blocks {
                st.blocks.remove(b);
            }
            // The deletion's version is past every version the account had:
            // wallets of it are dropped everywhere, and an account created
            // again under the id starts from it.
            let version = st.accounts.remove(id).map_or(0, |a| a.credit_version) + 1;
            st.deleted.insert(id.to_string(), version);
            // The ledger is kept (audit): rows stay under the account id.
            (
                DeletedAccount {
                    id: id.to_string(),
                    keys: hashes.len() as u64,
                    blocks: blocks.len() as u64,
                    credits_forfeited: credits,
                },
                (hashes, version),
            )
        };
        for hash in hashes {
            self.notify(Invalidation::Key(hash));
        }
        self.notify(Invalidation::Account(id.to_string()));
        self.notify(Invalidation::Credits {
            account: id.to_string(),
            version,
        });
        Ok(deleted)
    }

    async fn set_billing_anchor(&self, account_id: &str, anchor: Option<u8>) -> CatalogResult<()> {
        check_billing_anchor(anchor)?;
        {
            let mut st = self.state.lock();
            st.require_account(account_id)?;
            if let Some(row) = st.accounts.get_mut(account_id) {
                row.billing_anchor = anchor;
            }
        }
        self.notify(Invalidation::Account(account_id.to_string()));
        Ok(())
    }

    async fn create_key_with(
        &self,
        account_id: &str,
        opts: &KeyOptions,
    ) -> CatalogResult<NewApiKey> {
        check_key_options(opts, self.now())?;
        let (key, prefix) = generate_key();
        let hash = hash_key(&key);
        let id = generate_id("key_");
        {
            let mut st = self.state.lock();
            st.require_account(account_id)?;
            if let Some(plan) = &opts.plan {
                st.require_plan(plan)?;
            }
            let seq = st.seq();
            st.key_by_hash.insert(hash.clone(), id.clone());
            st.keys.insert(
                id.clone(),
                KeyRow {
                    seq,
                    account_id: account_id.to_string(),
                    hash: hash.clone(),
                    prefix: prefix.clone(),
                    created_at: trunc_micros(self.now()),
                    revoked: false,
                    label: opts.label.clone(),
                    expires_at: opts.expires_at.map(trunc_micros),
                    plan_id: opts.plan.clone(),
                },
            );
        }
        // A cache may hold a negative entry for this hash (only if someone
        // guessed a 256-bit key); forgetting it costs nothing.
        self.notify(Invalidation::Key(hash));
        Ok(NewApiKey { id, key, prefix })
    }

    async fn lookup_key(&self, key_hash: &str) -> CatalogResult<Option<KeyOwner>> {
        let now = self.now();
        let st = self.state.lock();
        Ok(st.key_by_hash.get(key_hash).and_then(|id| {
            let row = st.keys.get(id)?;
            let live = !row.revoked && row.expires_at.map_or(true, |e| e > now);
            live.then(|| KeyOwner {
                key_id: id.clone(),
                account_id: row.account_id.clone(),
                expires_at_ms: row.expires_at.map(time_to_ms),
                plan_id: row.plan_id.clone(),
            })
        }))
    }

    async fn revoke_key(&self, key_id: &str) -> CatalogResult<()> {
        let hash = {
            let mut st = self.state.lock();
            let row = st
                .keys
                .get_mut(key_id)
                .ok_or_else(|| CatalogError::not_found("key", key_id))?;
            if row.revoked {
                return Err(already_revoked(key_id));
            }
            row.revoked = true;
            row.hash.clone()
        };
        self.notify(Invalidation::Key(hash));
        Ok(())
    }

    async fn list_keys(&self, account_id: &str) -> CatalogResult<Vec<ApiKeyInfo>> {
        let st = self.state.lock();
        st.require_account(account_id)?;
        let mut rows: Vec<(&String, &KeyRow)> = st
            .keys
            .iter()
            .filter(|(_, k)| k.account_id == account_id)
            .collect();
        rows.sort_by_key(|(_, k)| k.seq);
        Ok(rows
            .into_iter()
            .map(|(id, k)| ApiKeyInfo {
                id: id.clone(),
                account_id: k.account_id.clone(),
                prefix: k.prefix.clone(),
                created_at: Some(k.created_at),
                revoked: k.revoked,
                label: k.label.clone(),
                expires_at: k.expires_at,
                plan_id: k.plan_id.clone(),
            })
            .collect())
    }

    async fn set_key_plan(&self, key_id: &str, plan_id: Option<&str>) -> CatalogResult<()> {
        let hash = {
            let mut st = self.state.lock();
            if let Some(plan) = plan_id {
                st.require_plan(plan)?;
            }
            let row = st
                .keys
                .get_mut(key_id)
                .ok_or_else(|| CatalogError::not_found("key", key_id))?;
            if row.revoked {
                return Err(already_revoked(key_id));
            }
            row.plan_id = plan_id.map(str::to_owned);
            row.hash.clone()
        };
        // Caches hold the key's owner, plan included: reload it.
        self.notify(Invalidation::Key(hash));
        Ok(())
    }

    async fn create_quota_block(
        &self,
        account_id: &str,
        credits: u64,
        expires_at: Option<SystemTime>,
        metadata: serde_json::Value,
    ) -> CatalogResult<QuotaBlock> {
        check_credits(credits)?;
        let metadata = normalize_metadata(metadata)?;
        let id = generate_id("qb_");
        let now = self.now();
        check_block_expiry(expires_at.map(trunc_micros), now)?;
        let mut st = self.state.lock();
        st.require_account(account_id)?;
        check_grant(account_id, st.balance(account_id, now), credits)?;
        let seq = st.seq();
        let row = BlockRow {
            seq,
            account_id: account_id.to_string(),
            granted: credits,
            remaining: credits,
            expires_at: expires_at.map(trunc_micros),
            metadata,
            created_at: trunc_micros(now),
        };
        let block = row.to_block(&id);
        st.blocks_of
            .entry(account_id.to_string())
            .or_default()
            .push(id.clone());
        st.blocks.insert(id, row);
        let inv = st.bump_credits(account_id);
        drop(st);
        self.send(inv);
        Ok(block)
    }

    async fn delete_quota_block(&self, block_id: &str) -> CatalogResult<()> {
        let mut st = self.state.lock();
        let row = st
            .blocks
            .remove(block_id)
            .ok_or_else(|| CatalogError::not_found("quota block", block_id))?;
        if let Some(ids) = st.blocks_of.get_mut(&row.account_id) {
            ids.retain(|id| id != block_id);
        }
        let inv = st.bump_credits(&row.account_id);
        drop(st);
        self.send(inv);
        Ok(())
    }

    async fn expire_quota_blocks(&self, account_id: &str) -> CatalogResult<u64> {
        let now = trunc_micros(self.now());
        let mut st = self.state.lock();
        st.require_account(account_id)?;
        let ids = st.blocks_of.get(account_id).cloned().unwrap_or_default();
        let mut n = 0;
        for id in ids {
            if let Some(b) = st.blocks.get_mut(&id) {
                if b.live(now) {
                    b.expires_at = Some(now);
                    n += 1;
                }
            }
        }
        let inv = st.bump_credits(account_id);
        drop(st);
        self.send(inv);
        Ok(n)
    }

    async fn list_quota_blocks(&self, account_id: &str) -> CatalogResult<Vec<QuotaBlock>> {
        let st = self.state.lock();
        st.require_account(account_id)?;
        let mut rows: Vec<(&String, &BlockRow)> = st.blocks_of(account_id).collect();
        rows.sort_by_key(|(_, b)| b.seq);
        Ok(rows.into_iter().map(|(id, b)| b.to_block(id)).collect())
    }

    async fn balance(&self, account_id: &str) -> CatalogResult<u64> {
        let now = self.now();
        let st = self.state.lock();
        st.require_account(account_id)?;
        Ok(st.balance(account_id, now))
    }

    async fn deduct(&self, d: &Deduction) -> CatalogResult<DeductResult> {
        check_credits(d.amount)?;
        check_credits(d.min_balance)?;
        let now = self.now();
        let mut st = self.state.lock();
        // The key is checked before the account, as in Postgres where a
        // conflicting ledger insert never reaches the account foreign key.
        if let Some(row) = st.ledger.get(&d.idempotency_key) {
            let (requested, deducted) = (row.requested, row.deducted);
            let balance = st.balance(&row.account_id, now);
            return Ok(DeductResult {
                requested,
                deducted,
                shortfall: requested - deducted,
                balance,
                replayed: true,
            });
        }
        st.require_account(&d.account_id)?;
        let order = st.drain_order(&d.account_id, now);
        let available = st.balance(&d.account_id, now);
        if available < d.min_balance || (d.require_full && available < d.amount) {
            return Ok(DeductResult {
                requested: d.amount,
                deducted: 0,
                shortfall: d.amount,
                balance: available,
                replayed: false,
            });
        }
        let mut left = d.amount;
        let mut draws = Vec::new();
        for id in order {
            if left == 0 {
                break;
            }
            if let Some(b) = st.blocks.get_mut(&id) {
                let take = left.min(b.remaining);
                b.remaining -= take;
                left -= take;
                draws.push(Draw {
                    block_id: id,
                    credits: take,
                });
            }
        }
        let deducted = d.amount - left;
        let seq = st.seq();
        st.ledger.insert(
            d.idempotency_key.clone(),
            LedgerRow {
                seq,
                account_id: d.account_id.clone(),
                request_id: d.request_id.clone(),
                endpoint: d.endpoint.clone(),
                requested: d.amount,
                deducted,
                draws,
                refunded: None,
                created_at: trunc_micros(now),
            },
        );
        Ok(DeductResult {
            requested: d.amount,
            deducted,
            shortfall: left,
            balance: available - deducted,
            replayed: false,
        })
    }

    async fn refund(&self, idempotency_key: &str) -> CatalogResult<u64> {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        let Some(row) = st.ledger.get_mut(idempotency_key) else {
            return Ok(0);
        };
        if row.refunded.is_some() {
            return Ok(0);
        }
        let mut refunded = 0u64;
        for draw in &row.draws {
            // A block deleted since gets nothing back: it no longer exists.
            if let Some(b) = st.blocks.get_mut(&draw.block_id) {
                b.remaining += draw.credits;
                refunded += draw.credits;
            }
        }
        row.refunded = Some(refunded);
        let account = row.account_id.clone();
        let inv = st.bump_credits(&account);
        drop(guard);
        self.send(inv);
        Ok(refunded)
    }

    async fn credit_snapshot(&self, account_id: &str) -> CatalogResult<CreditSnapshot> {
        let now = self.now();
        let st = self.state.lock();
        let Some(row) = st.accounts.get(account_id) else {
            return Ok(CreditSnapshot::default());
        };
        let mut live: Vec<(&String, &BlockRow)> = st
            .blocks_of(account_id)
            .filter(|(_, b)| b.live(now))
            .collect();
        live.sort_by_key(|(_, b)| (b.expires_at.is_none(), b.expires_at, b.seq));
        Ok(CreditSnapshot {
            version: row.credit_version,
            blocks: live.into_iter().map(|(id, b)| b.to_block(id)).collect(),
        })
    }

    async fn record_credit_ops(&self, account_id: &str, ops: &[CreditOp]) -> CatalogResult<()> {
        let mut undecided = Vec::new();
        {
            let mut guard = self.state.lock();
            let st = &mut *guard;
            if !st.accounts.contains_key(account_id) {
                return Ok(());
            }
            for op in ops {
                match op {
                    CreditOp::Charge {
                        key,
                        request_id,
                        endpoint,
                        requested,
                        deducted: Some(deducted),
                        draws,
                        at_ms,
                    } => st.record_charge(
                        key,
                        LedgerRow {
                            seq: 0,
                            account_id: account_id.to_owned(),
                            request_id: Some(request_id.clone()),
                            endpoint: Some(endpoint.clone()),
                            requested: *requested,
                            deducted: (*deducted).min(*requested),
                            draws: draws.clone(),
                            refunded: None,
                            created_at: trunc_micros(ms_to_time(*at_ms)),
                        },
                    ),
                    CreditOp::Charge { deducted: None, .. } => undecided.push(op),
                    CreditOp::Refund { key, .. } => {
                        let Some(row) = st.ledger.get_mut(key) else {
                            continue;
                        };
                        if row.refunded.is_some() {
                            continue;
                        }
                        row.refunded = Some(row.deducted);
                        for d in &row.draws {
                            if let Some(b) = st.blocks.get_mut(&d.block_id) {
                                b.remaining = b.remaining.saturating_add(d.credits).min(b.granted);
                            }
                        }
                    }
                }
            }
        }
        for d in undecided
            .iter()
            .filter_map(|op| op.undecided_deduction(account_id))
        {
            self.deduct(&d).await?;
        }
        Ok(())
    }

    async fn touch_credits(&self, account_id: &str) -> CatalogResult<u64> {
        let inv = self.state.lock().bump_credits(account_id);
        match inv {
            Some(inv @ Invalidation::Credits { version, .. }) => {
                self.send(Some(inv));
                Ok(version)
            }
            _ => Err(CatalogError::not_found("account", account_id)),
        }
    }

    async fn ledger(&self, account_id: &str) -> CatalogResult<Vec<LedgerEntry>> {
        let st = self.state.lock();
        st.require_account(account_id)?;
        let mut rows: Vec<(&String, &LedgerRow)> = st
            .ledger
            .iter()
            .filter(|(_, r)| r.account_id == account_id)
            .collect();
        rows.sort_by_key(|(_, r)| r.seq);
        Ok(rows
            .into_iter()
            .map(|(key, r)| LedgerEntry {
                idempotency_key: key.clone(),
                account_id: r.account_id.clone(),
                request_id: r.request_id.clone(),
                endpoint: r.endpoint.clone(),
                requested: r.requested,
                deducted: r.deducted,
                shortfall: r.requested - r.deducted,
                refunded: r.refunded.unwrap_or(0),
                draws: r.draws.clone(),
                created_at: Some(r.created_at),
            })
            .collect())
    }

    async fn record_usage(&self, events: &[UsageEvent]) -> CatalogResult<u64> {
        check_batch(events)?;
        // Charges first, as one Postgres statement inserts the events and
        // takes their draws: recorded once, under `req:<id>`.
        let charged = events.iter().filter(|e| e.charge.is_some());
        let charged: Vec<&UsageEvent> = charged.collect();
        if !charged.is_empty() {
            let mut st = self.state.lock();
            for e in charged {
                let Some(c) = &e.charge else { continue };
                if !st.accounts.contains_key(&e.account_id) {
                    continue;
                }
                st.record_charge(
                    &request_key(&e.request_id),
                    LedgerRow {
                        seq: 0,
                        account_id: e.account_id.clone(),
                        request_id: Some(e.request_id.clone()),
                        endpoint: Some(e.endpoint.clone()),
                        requested: c.requested,
                        deducted: e.credits.min(c.requested),
                        draws: c.draws.clone(),
                        refunded: None,
                        created_at: from_ms(e.ended_ms()),
                    },
                );
            }
        }
        Ok(self.usage.lock().record(events))
    }

    async fn usage_events(
        &self,
        q: &UsageQuery,
        after: Option<&UsageCursor>,
        limit: usize,
    ) -> CatalogResult<Vec<UsageEvent>> {
        Ok(self.usage.lock().page(q, after, limit))
    }

    async fn usage_summary(
        &self,
        q: &UsageQuery,
        group_by: GroupBy,
    ) -> CatalogResult<Vec<UsageBucket>> {
        Ok(self.usage.lock().summary(q, group_by))
    }

    async fn prune_usage(&self, before: SystemTime) -> CatalogResult<u64> {
        // Events are whole ms: one ended before `before` exactly when it
        // ended before `before` rounded up to a whole ms.
        Ok(self.usage.lock().prune(epoch_ms_ceil(before)))
    }

    async fn enqueue_notification(&self, n: &NewNotification) -> CatalogResult<bool> {
        let now = self.now();
        self.notifications.lock().enqueue(n, now)
    }

    async fn claim_notifications(
        &self,
        limit: usize,
        lease: std::time::Duration,
    ) -> CatalogResult<Vec<Notification>> {
        let now = self.now();
        Ok(self.notifications.lock().claim(now, limit, lease))
    }

    async fn finish_notification(&self, id: &str, result: &Attempted) -> CatalogResult<()> {
        let now = self.now();
        self.notifications.lock().finish(id, result, now)
    }

    async fn notifications(&self, q: &NotificationQuery) -> CatalogResult<Vec<Notification>> {
        self.notifications.lock().page(q)
    }

    async fn expiring_blocks(
        &self,
        until: SystemTime,
        after: Option<&str>,
        limit: usize,
    ) -> CatalogResult<Vec<QuotaBlock>> {
        let now = self.now();
        let st = self.state.lock();
        let mut rows: Vec<(&String, &BlockRow)> = st
            .blocks
            .iter()
            .filter(|(id, b)| {
                b.remaining > 0
                    && b.expires_at.is_some_and(|e| e > now && e <= until)
                    && after.map_or(true, |a| id.as_str() > a)
            })
            .collect();
        rows.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        Ok(rows
            .into_iter()
            .take(limit)
            .map(|(id, b)| b.to_block(id))
            .collect())
    }

    async fn prune_notifications(&self, before: SystemTime) -> CatalogResult<u64> {
        Ok(self.notifications.lock().prune(before))
    }

    fn subscribe(&self) -> broadcast::Receiver<Invalidation> {
        self.events.subscribe()
    }

    async fn ping(&self) -> CatalogResult<()> {
        Ok(())
    }

    async fn plans_file_owner(&self) -> CatalogResult<Option<String>> {
        Ok(self.state.lock().plans_file_owner.clone())
    }

    async fn set_plans_file_owner(&self, file: Option<&str>) -> CatalogResult<()> {
        self.state.lock().plans_file_owner = file.map(str::to_owned);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::usage::from_ms;
    use crate::clock::ManualClock;

    fn event(id: &str, ended_ms: u64) -> UsageEvent {
        UsageEvent {
            request_id: id.into(),
            account_id: "a".into(),
            key_id: None,
            endpoint: "chat".into(),
            route: "/v1/chat/completions".into(),
            units: Vec::new(),
            credits: 0,
            status: 200,
            degraded: false,
            streamed: false,
            cut_short: false,
            started_at: from_ms(ended_ms),
            ended_at: from_ms(ended_ms),
            charge: None,
        }
    }

    /// The in-process store keeps the newest events by `ended_at` and
    /// forgets the ids of those it drops.
    #[tokio::test]
    async fn usage_is_bounded_to_the_newest_events() {
        let c = MemoryCatalog::with_usage_capacity(Arc::new(ManualClock::new(0)), 3);
        let batch: Vec<UsageEvent> = [("e5", 5), ("e1", 1), ("e3", 3), ("e4", 4), ("e2", 2)]
            .iter()
            .map(|(id, ms)| event(id, *ms))
            .collect();
        assert_eq!(c.record_usage(&batch).await.unwrap(), 5);
        assert_eq!(c.usage_len(), 3);
        let ids: Vec<String> = c
            .usage_events(&UsageQuery::default(), None, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.request_id)
            .collect();
        assert_eq!(ids, ["e3", "e4", "e5"]);
        // A dropped id is forgotten: older than everything kept, it is
        // stored and dropped again at once; a kept id is still a no-op.
        assert_eq!(c.record_usage(&[event("e1", 1)]).await.unwrap(), 1);
        assert_eq!(c.record_usage(&[event("e4", 4)]).await.unwrap(), 0);
        assert_eq!(c.usage_len(), 3);
        assert_eq!(c.record_usage(&[event("e9", 9)]).await.unwrap(), 1);
        let ids: Vec<String> = c
            .usage_events(&UsageQuery::default(), None, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.request_id)
            .collect();
        assert_eq!(ids, ["e4", "e5", "e9"]);
    }
}
