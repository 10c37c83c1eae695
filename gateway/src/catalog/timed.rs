//! [`Timed`]: a catalog whose every call is bounded by a timeout
//! (`[storage] catalog_timeout`).
//!
//! A Postgres that accepts connections but never answers (a stopped
//! server, a black-holed network path, a proxy whose backend hangs) would
//! otherwise hold each caller for as long as the operating system keeps
//! the connection: requests with uncached keys, wallet loads, `/readyz`,
//! the admin API and the credit writer would all hang. `App::build` wraps
//! the Postgres catalog in a `Timed`, so every caller — the cache, the
//! outbox, the admin API, health — gets the same bound, and a call past
//! it fails as [`CatalogError::Unavailable`] like any other outage.
//!
//! Giving up is not undoing: a write the catalog received may still
//! commit after its caller gave up. Every write the gateway retries on
//! its own is idempotent (credit operations by ledger key, deductions by
//! idempotency key); see docs/CATALOG.md "Timeouts" for the others.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{
    Account, AccountSummary, ApiKeyInfo, ApplyReport, Attempted, Catalog, CatalogError,
    CatalogResult, CreditOp, CreditSnapshot, DeductResult, Deduction, DeletedAccount, GroupBy,
    Invalidation, KeyOptions, KeyOwner, LedgerEntry, NewApiKey, NewNotification, Notification,
    NotificationQuery, QuotaBlock, UsageBucket, UsageCursor, UsageEvent, UsageQuery,
};
use crate::plans::{Plan, PlanSet};

/// `C` with every call bounded by `timeout`. See the module docs.
#[derive(Debug)]
pub struct Timed<C> {
    inner: C,
    timeout: Duration,
}

impl<C: Catalog> Timed<C> {
    /// Bound every call of `inner` by `timeout`.
    pub fn new(inner: C, timeout: Duration) -> Self {
        Self { inner, timeout }
    }

    /// The catalog being timed.
    pub fn inner(&self) -> &C {
        &self.inner
    }

    /// The bound on each call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `call` (the catalog operation `op`), or Unavailable once `timeout`
    /// has passed. Dropping the call's future abandons it: a pooled
    /// connection it held goes back to the pool, and the answer, should
    /// one come, is read and dropped by the connection.
    async fn within<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = CatalogResult<T>>,
    ) -> CatalogResult<T> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(CatalogError::Unavailable(format!(
                "{op}: no answer within {} (catalog_timeout)",
                humantime::format_duration(self.timeout)
            ))),
        }
    }
}

#[async_trait::async_trait]
impl<C: Catalog> Catalog for Timed<C> {
    async fn apply_plans(&self, plans: &PlanSet, prune: bool) -> CatalogResult<ApplyReport> {
        self.within("apply_plans", self.inner.apply_plans(plans, prune))
            .await
    }

    async fn list_plans(&self) -> CatalogResult<PlanSet> {
        self.within("list_plans", self.inner.list_plans()).await
    }

    async fn get_plan(&self, id: &str) -> CatalogResult<Arc<Plan>> {
        self.within("get_plan", self.inner.get_plan(id)).await
    }

    async fn delete_plan(&self, id: &str) -> CatalogResult<()> {
        self.within("delete_plan", self.inner.delete_plan(id)).await
    }

    async fn default_plan(&self) -> CatalogResult<Option<String>> {
        self.within("default_plan", self.inner.default_plan()).await
    }

    async fn set_default_plan(&self, id: &str) -> CatalogResult<()> {
        self.within("set_default_plan", self.inner.set_default_plan(id))
            .await
    }

    async fn create_account(
        &self,
        id: &str,
        plan_id: Option<&str>,
        metadata: serde_json::Value,
    ) -> CatalogResult<Account> {
        self.within(
            "create_account",
            self.inner.create_account(id, plan_id, metadata),
        )
        .await
    }

    async fn assign_plan(&self, account_id: &str, plan_id: Option<&str>) -> CatalogResult<()> {
        self.within("assign_plan", self.inner.assign_plan(account_id, plan_id))
            .await
    }

    async fn get_account(&self, id: &str) -> CatalogResult<Account> {
        self.within("get_account", self.inner.get_account(id)).await
    }

    async fn list_accounts(
        &self,
        plan: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> CatalogResult<Vec<Account>> {
        self.within(
            "list_accounts",
            self.inner.list_accounts(plan, after, limit),
        )
        .await
    }

    async fn search_accounts(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> CatalogResult<Vec<AccountSummary>> {
        self.within(
            "search_accounts",
            self.inner.search_accounts(prefix, after, limit),
        )
        .await
    }

    async fn set_billing_anchor(&self, account_id: &str, anchor: Option<u8>) -> CatalogResult<()> {
        self.within(
            "set_billing_anchor",
            self.inner.set_billing_anchor(account_id, anchor),
        )
        .await
    }

    async fn update_account_metadata(
        &self,
        id: &str,
        patch: &serde_json::Map<String, serde_json::Value>,
    ) -> CatalogResult<Account> {
        self.within(
            "update_account_metadata",
            self.inner.update_account_metadata(id, patch),
        )
        .await
    }

    async fn delete_account(&self, id: &str, force: bool) -> CatalogResult<DeletedAccount> {
        self.within("delete_account", self.inner.delete_account(id, force))
            .await
    }

    async fn create_key(&self, account_id: &str) -> CatalogResult<NewApiKey> {
        self.within("create_key", self.inner.create_key(account_id))
            .await
    }

    async fn create_key_with(
        &self,
        account_id: &str,
        opts: &KeyOptions,
    ) -> CatalogResult<NewApiKey> {
        self.within("create_key", self.inner.create_key_with(account_id, opts))
            .await
    }

    async fn lookup_key(&self, key_hash: &str) -> CatalogResult<Option<KeyOwner>> {
        self.within("lookup_key", self.inner.lookup_key(key_hash))
            .await
    }

    async fn set_key_plan(&self, key_id: &str, plan_id: Option<&str>) -> CatalogResult<()> {
        self.within("set_key_plan", self.inner.set_key_plan(key_id, plan_id))
            .await
    }

    async fn revoke_key(&self, key_id: &str) -> CatalogResult<()> {
        self.within("revoke_key", self.inner.revoke_key(key_id))
            .await
    }

    async fn list_keys(&self, account_id: &str) -> CatalogResult<Vec<ApiKeyInfo>> {
        self.within("list_keys", self.inner.list_keys(account_id))
            .await
    }

    async fn create_quota_block(
        &self,
        account_id: &str,
        credits: u64,
        expires_at: Option<SystemTime>,
        metadata: serde_json::Value,
    ) -> CatalogResult<QuotaBlock> {
        self.within(
            "create_quota_block",
            self.inner
                .create_quota_block(account_id, credits, expires_at, metadata),
        )
        .await
    }

    async fn delete_quota_block(&self, block_id: &str) -> CatalogResult<()> {
        self.within(
            "delete_quota_block",
            self.inner.delete_quota_block(block_id),
        )
        .await
    }

    async fn expire_quota_blocks(&self, account_id: &str) -> CatalogResult<u64> {
        self.within(
            "expire_quota_blocks",
            self.inner.expire_quota_blocks(account_id),
        )
        .await
    }

    async fn list_quota_blocks(&self, account_id: &str) -> CatalogResult<Vec<QuotaBlock>> {
        self.within(
            "list_quota_blocks",
            self.inner.list_quota_blocks(account_id),
        )
        .await
    }

    async fn balance(&self, account_id: &str) -> CatalogResult<u64> {
        self.within("balance", self.inner.balance(account_id)).await
    }

    async fn deduct(&self, d: &Deduction) -> CatalogResult<DeductResult> {
        self.within("deduct", self.inner.deduct(d)).await
    }

    async fn refund(&self, idempotency_key: &str) -> CatalogResult<u64> {
        self.within("refund", self.inner.refund(idempotency_key))
            .await
    }

    async fn ledger(&self, account_id: &str) -> CatalogResult<Vec<LedgerEntry>> {
        self.within("ledger", self.inner.ledger(account_id)).await
    }

    async fn record_usage(&self, events: &[UsageEvent]) -> CatalogResult<u64> {
        self.within("record_usage", self.inner.record_usage(events))
            .await
    }

    async fn usage_events(
        &self,
        q: &UsageQuery,
        after: Option<&UsageCursor>,
        limit: usize,
    ) -> CatalogResult<Vec<UsageEvent>> {
        self.within("usage_events", self.inner.usage_events(q, after, limit))
            .await
    }

    async fn usage_summary(
        &self,
        q: &UsageQuery,
        group_by: GroupBy,
    ) -> CatalogResult<Vec<UsageBucket>> {
        self.within("usage_summary", self.inner.usage_summary(q, group_by))
            .await
    }

    async fn prune_usage(&self, before: SystemTime) -> CatalogResult<u64> {
        self.within("prune_usage", self.inner.prune_usage(before))
            .await
    }

    async fn enqueue_notification(&self, n: &NewNotification) -> CatalogResult<bool> {
        self.within("enqueue_notification", self.inner.enqueue_notification(n))
            .await
    }

    async fn claim_notifications(
        &self,
        limit: usize,
        lease: Duration,
    ) -> CatalogResult<Vec<Notification>> {
        self.within(
            "claim_notifications",
            self.inner.claim_notifications(limit, lease),
        )
        .await
    }

    async fn finish_notification(&self, id: &str, result: &Attempted) -> CatalogResult<()> {
        self.within(
            "finish_notification",
            self.inner.finish_notification(id, result),
        )
        .await
    }

    async fn notifications(&self, q: &NotificationQuery) -> CatalogResult<Vec<Notification>> {
        self.within("notifications", self.inner.notifications(q))
            .await
    }

    async fn expiring_blocks(
        &self,
        until: SystemTime,
        after: Option<&str>,
        limit: usize,
    ) -> CatalogResult<Vec<QuotaBlock>> {
        self.within(
            "expiring_blocks",
            self.inner.expiring_blocks(until, after, limit),
        )
        .await
    }

    async fn prune_notifications(&self, before: SystemTime) -> CatalogResult<u64> {
        self.within(
            "prune_notifications",
            self.inner.prune_notifications(before),
        )
        .await
    }

    async fn credit_snapshot(&self, account_id: &str) -> CatalogResult<CreditSnapshot> {
        self.within("credit_snapshot", self.inner.credit_snapshot(account_id))
            .await
    }

    async fn record_credit_ops(&self, account_id: &str, ops: &[CreditOp]) -> CatalogResult<()> {
        self.within(
            "record_credit_ops",
            self.inner.record_credit_ops(account_id, ops),
        )
        .await
    }

    async fn touch_credits(&self, account_id: &str) -> CatalogResult<u64> {
        self.within("touch_credits", self.inner.touch_credits(account_id))
            .await
    }

    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Invalidation> {
        self.inner.subscribe()
    }

    fn invalidations_confirmed_ms(&self) -> Option<u64> {
        self.inner.invalidations_confirmed_ms()
    }

    async fn ping(&self) -> CatalogResult<()> {
        self.within("ping", self.inner.ping()).await
    }

    async fn plans_file_owner(&self) -> CatalogResult<Option<String>> {
        self.within("plans_file_owner", self.inner.plans_file_owner())
            .await
    }

    async fn set_plans_file_owner(&self, file: Option<&str>) -> CatalogResult<()> {
        self.within(
            "set_plans_file_owner",
            self.inner.set_plans_file_owner(file),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::memory::MemoryCatalog;
    use crate::clock::ManualClock;

    /// A catalog whose calls never end, but for `ping`, which answers at
    /// once, and `lookup_key`, which answers after `slow`.
    struct Hung {
        inner: MemoryCatalog,
        slow: Duration,
    }

    /// `impl Catalog for Hung`: the listed calls never end.
    macro_rules! hung_catalog {
        ($($name:ident($($arg:ident: $ty:ty),*) -> $out:ty;)*) => {
            #[async_trait::async_trait]
            impl Catalog for Hung {
                $(
                    async fn $name(&self, $($arg: $ty),*) -> CatalogResult<$out> {
                        let _ = ($($arg,)*);
                        std::future::pending().await
                    }
                )*

                async fn lookup_key(&self, key_hash: &str) -> CatalogResult<Option<KeyOwner>> {
                    tokio::time::sleep(self.slow).await;
                    self.inner.lookup_key(key_hash).await
                }

                fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Invalidation> {
                    self.inner.subscribe()
                }

                async fn ping(&self) -> CatalogResult<()> {
                    Ok(())
                }
            }
        };
    }

    hung_catalog! {
        apply_plans(plans: &PlanSet, prune: bool) -> ApplyReport;
        list_plans() -> PlanSet;
        get_plan(id: &str) -> Arc<Plan>;
        delete_plan(id: &str) -> ();
        default_plan() -> Option<String>;
        set_default_plan(id: &str) -> ();
        create_account(id: &str, plan_id: Option<&str>, metadata: serde_json::Value) -> Account;
        assign_plan(account_id: &str, plan_id: Option<&str>) -> ();
        get_account(id: &str) -> Account;
        list_accounts(plan: Option<&str>, after: Option<&str>, limit: usize) -> Vec<Account>;
        search_accounts(prefix: &str, after: Option<&str>, limit: usize) -> Vec<AccountSummary>;
        update_account_metadata(
            id: &str,
            patch: &serde_json::Map<String, serde_json::Value>
        ) -> Account;
        delete_account(id: &str, force: bool) -> DeletedAccount;
        set_billing_anchor(account_id: &str, anchor: Option<u8>) -> ();
        create_key(account_id: &str) -> NewApiKey;
        create_key_with(account_id: &str, opts: &KeyOptions) -> NewApiKey;
        revoke_key(key_id: &str) -> ();
        set_key_plan(key_id: &str, plan_id: Option<&str>) -> ();
        list_keys(account_id: &str) -> Vec<ApiKeyInfo>;
        create_quota_block(
            account_id: &str,
            credits: u64,
            expires_at: Option<SystemTime>,
            metadata: serde_json::Value
        ) -> QuotaBlock;
        delete_quota_block(block_id: &str) -> ();
        expire_quota_blocks(account_id: &str) -> u64;
        list_quota_blocks(account_id: &str) -> Vec<QuotaBlock>;
        balance(account_id: &str) -> u64;
        deduct(d: &Deduction) -> DeductResult;
        refund(idempotency_key: &str) -> u64;
        ledger(account_id: &str) -> Vec<LedgerEntry>;
        credit_snapshot(account_id: &str) -> CreditSnapshot;
        record_credit_ops(account_id: &str, ops: &[CreditOp]) -> ();
        touch_credits(account_id: &str) -> u64;
        record_usage(events: &[UsageEvent]) -> u64;
        usage_events(q: &UsageQuery, after: Option<&UsageCursor>, limit: usize) -> Vec<UsageEvent>;
        usage_summary(q: &UsageQuery, group_by: GroupBy) -> Vec<UsageBucket>;
        prune_usage(before: SystemTime) -> u64;
        enqueue_notification(n: &NewNotification) -> bool;
        claim_notifications(limit: usize, lease: Duration) -> Vec<Notification>;
        finish_notification(id: &str, result: &Attempted) -> ();
        notifications(q: &NotificationQuery) -> Vec<Notification>;
        expiring_blocks(until: SystemTime, after: Option<&str>, limit: usize) -> Vec<QuotaBlock>;
        prune_notifications(before: SystemTime) -> u64;
        plans_file_owner() -> Option<String>;
        set_plans_file_owner(file: Option<&str>) -> ();
    }

    const TIMEOUT: Duration = Duration::from_millis(100);

    fn hung(slow: Duration) -> Timed<Hung> {
        let clock = ManualClock::new(1_700_000_000_000);
        let inner = MemoryCatalog::new(Arc::new(clock));
        Timed::new(Hung { inner, slow }, TIMEOUT)
    }

    #[tokio::test]
    async fn calls_past_the_timeout_fail_as_unavailable_naming_the_call() {
        let c = hung(Duration::ZERO);
        let start = std::time::Instant::now();
        let e = c.get_account("a").await.unwrap_err();
        let took = start.elapsed();
        assert!(took >= TIMEOUT && took < TIMEOUT * 10, "{took:?}");
        assert_eq!(
            e.to_string(),
            "catalog unavailable: get_account: no answer within 100ms (catalog_timeout)"
        );
        let ops = [CreditOp::Refund {
            key: "adm:1".into(),
            at_ms: 0,
        }];
        assert!(matches!(
            c.record_credit_ops("a", &ops).await,
            Err(CatalogError::Unavailable(m)) if m.starts_with("record_credit_ops:")
        ));
        assert!(matches!(
            c.credit_snapshot("a").await,
            Err(CatalogError::Unavailable(_))
        ));
    }

    #[tokio::test]
    async fn answers_within_the_timeout_pass_through() {
        let c = hung(Duration::ZERO);
        assert_eq!(c.lookup_key(&"0".repeat(64)).await.unwrap(), None);
        c.ping().await.unwrap();
        let slow = hung(TIMEOUT * 3);
        assert!(matches!(
            slow.lookup_key(&"0".repeat(64)).await,
            Err(CatalogError::Unavailable(_))
        ));
    }
}
