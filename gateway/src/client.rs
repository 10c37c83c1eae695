//! The library face (SPEC §10): `Client` and the `admin` functions.
//!
//! [`Client`] combines the catalog (through its per-process
//! [`CatalogCache`]) with the [`Limiter`]: it resolves an account's plan
//! and the endpoint's policy, then attempts and ends requests and reads
//! limits; credits go straight to the catalog (never cached: they fail
//! closed). The [`admin`] module offers the original library's management
//! functions over any [`Catalog`].
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use plangate::catalog::memory::MemoryCatalog;
//! use plangate::client::{Client, DeductOptions};
//! use plangate::clock::SystemClock;
//! use plangate::limiter::{memory::MemoryStore, Limiter};
//! use plangate::plans::Unit;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let clock = Arc::new(SystemClock);
//! let catalog = Arc::new(MemoryCatalog::new(clock.clone()));
//! let plans = plangate::client::admin::load_plans_from_file("plans.yaml".as_ref())?;
//! plangate::client::admin::apply_plans(&*catalog, &plans).await?;
//! let limiter = Limiter::new(MemoryStore::new(), clock, Duration::from_millis(50));
//! let client = Client::new(catalog, limiter).await?;
//!
//! let admission = client
//!     .attempt_request("request-123", "user-456", "gpt-4-turbo", &[(Unit::new("token"), 10)])
//!     .await?;
//! if !admission.allowed {
//!     for u in &admission.info.units {
//!         println!("{}: {}/{} (resets in {} ms)", u.unit, u.remaining, u.limit, u.reset_ms);
//!     }
//!     return Ok(());
//! }
//! // ... handle the request ...
//! client.end_request("request-123", &[(Unit::new("token"), 100)]).await?;
//!
//! if client.has_min_balance("user-456", 15).await? {
//!     let r = client
//!         .deduct_credits("user-456", 15, DeductOptions { require_full: true, ..Default::default() })
//!         .await?;
//!     println!("deducted {} of {}", r.deducted, r.requested);
//! }
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::catalog::cache::{CacheConfig, CatalogCache};
use crate::catalog::{generate_id, Catalog, CatalogError, DeductResult, Deduction};
use crate::limiter::{Attempt, CounterStore, Denial, Limiter, RateLimitInfo, StoreError, Ticket};
use crate::plans::{Policy, Unit};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The account's plan does not grant the endpoint (or no plan exists).
    #[error("no access to endpoint: {0}")]
    NoAccess(String),
    /// The catalog refused or failed.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// The counter store failed or timed out.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The answer to [`Client::attempt_request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// Whether the request may proceed. If so, end it with
    /// [`Client::end_request`].
    pub allowed: bool,
    /// Where the caller stands, on allow and deny alike.
    pub info: RateLimitInfo,
    /// Why it was denied.
    pub denial: Option<Denial>,
}

/// Options of [`Client::deduct_credits`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeductOptions {
    /// All or nothing.
    pub require_full: bool,
    /// Deduct nothing unless the balance is at least this (checked
    /// atomically with the deduction).
    pub min_balance: u64,
    /// The same key deducts once. Defaults to `request_id`, else a random
    /// key (so the call is not idempotent).
    pub idempotency_key: Option<String>,
    /// Recorded in the ledger.
    pub request_id: Option<String>,
    /// Recorded in the ledger.
    pub endpoint: Option<String>,
}

/// Admitted requests kept for [`Client::end_request`] beyond this many get
/// pruned of those whose lease has run out (their slots expired anyway).
const PRUNE_AT: usize = 10_000;

/// Rate limits and credits for accounts, as a library.
pub struct Client<S: CounterStore> {
    cache: CatalogCache,
    limiter: Arc<Limiter<S>>,
    /// Requests admitted by [`Client::attempt_request`], by request id.
    in_flight: Mutex<HashMap<String, Ticket>>,
}

impl<S: CounterStore + std::fmt::Debug> std::fmt::Debug for Client<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("cache", &self.cache)
            .field("limiter", &self.limiter)
            .field("in_flight", &self.in_flight.lock().len())
            .finish()
    }
}

impl<S: CounterStore> Client<S> {
    /// A client over `catalog` and `limiter`, with a [`CatalogCache`] using
    /// the limiter's clock and the default TTLs. Loads the plans.
    pub async fn new(
        catalog: Arc<dyn Catalog>,
        limiter: Arc<Limiter<S>>,
    ) -> Result<Self, ClientError> {
        let cache =
            CatalogCache::new(catalog, limiter.clock().clone(), CacheConfig::default()).await?;
        Ok(Self::with_cache(cache, limiter))
    }

    /// A client sharing an existing cache (e.g. the gateway's).
    pub fn with_cache(cache: CatalogCache, limiter: Arc<Limiter<S>>) -> Self {
        Self {
            cache,
            limiter,
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    /// The catalog cache.
    pub fn cache(&self) -> &CatalogCache {
        &self.cache
    }

    /// The catalog.
    pub fn catalog(&self) -> &Arc<dyn Catalog> {
        self.cache.catalog()
    }

    /// The limiter.
    pub fn limiter(&self) -> &Arc<Limiter<S>> {
        &self.limiter
    }

    /// The policy of `endpoint` in `account`'s plan (its own or the default).
    pub async fn policy(&self, account: &str, endpoint: &str) -> Result<Arc<Policy>, ClientError> {
        self.cache
            .plan_for_account(account)
            .await?
            .and_then(|plan| plan.policy(endpoint).cloned())
            .ok_or_else(|| ClientError::NoAccess(endpoint.to_string()))
    }

    /// SPEC §4 Attempt, returning the RAII [`crate::limiter::Permit`] when
    /// admitted: dropping it ends the request. `start_units` defaults to one
    /// `request` (pass `&[]`).
    pub async fn attempt(
        &self,
        request_id: &str,
        account: &str,
        endpoint: &str,
        start_units: &[(Unit, u64)],
    ) -> Result<Attempt<S>, ClientError> {
        let policy = self.policy(account, endpoint).await?;
        Ok(self
            .limiter
            .attempt(request_id, account, endpoint, &policy, start_units)
            .await?)
    }

    /// The original library's `AttemptRequest`: admit or deny; an admitted
    /// request is remembered until [`Client::end_request`] (or until its
    /// concurrency slot expires).
    ///
    /// ```no_run
    /// # async fn f(client: &plangate::client::Client<plangate::limiter::memory::MemoryStore>) -> Result<(), plangate::client::ClientError> {
    /// let a = client.attempt_request("req-1", "user-456", "api/v1/chat", &[]).await?;
    /// if a.allowed {
    ///     client.end_request("req-1", &[]).await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn attempt_request(
        &self,
        request_id: &str,
        account: &str,
        endpoint: &str,
        start_units: &[(Unit, u64)],
    ) -> Result<Admission, ClientError> {
        match self
            .attempt(request_id, account, endpoint, start_units)
            .await?
        {
            Attempt::Admitted(permit, info) => {
                let ticket = permit.into_ticket();
                let mut map = self.in_flight.lock();
                if map.len() >= PRUNE_AT {
                    let now = self.limiter.clock().now_ms();
                    map.retain(|_, t| {
                        let lease = t.policy.concurrency_expiry_secs.saturating_mul(1000);
                        t.admitted_ms.saturating_add(lease) > now
                    });
                }
                map.insert(request_id.to_string(), ticket);
                Ok(Admission {
                    allowed: true,
                    info,
                    denial: None,
                })
            }
            Attempt::Denied(denial, info) => Ok(Admission {
                allowed: false,
                info,
                denial: Some(denial),
            }),
        }
    }

    /// The original library's `EndRequest`: release the slot and add the
    /// final units (each at most [`crate::plans::MAX_AMOUNT`]). Returns whether the request was in flight; ending an
    /// unknown or already ended request changes nothing.
    pub async fn end_request(
        &self,
        request_id: &str,
        final_units: &[(Unit, u64)],
    ) -> Result<bool, ClientError> {
        let Some(ticket) = self.in_flight.lock().remove(request_id) else {
            return Ok(false);
        };
        // The work was done: an absurd amount is clamped, not refused.
        let final_units: Vec<(Unit, u64)> = final_units
            .iter()
            .map(|(u, n)| (u.clone(), crate::plans::clamp_amount(*n)))
            .collect();
        match self.limiter.end(&ticket, &final_units).await {
            Ok(ended) => Ok(ended),
            Err(e) => {
                // Keep it so the caller can retry; the lease bounds the slot.
                self.in_flight.lock().insert(request_id.to_string(), ticket);
                Err(e.into())
            }
        }
    }

    /// SPEC §4 Info for `account` on `endpoint`, changing nothing.
    pub async fn get_rate_limit_info(
        &self,
        account: &str,
        endpoint: &str,
    ) -> Result<RateLimitInfo, ClientError> {
        let policy = self.policy(account, endpoint).await?;
        Ok(self.limiter.info(account, endpoint, &policy).await?)
    }

    /// Whether the account's balance is at least `min`. Read from the
    /// catalog, never cached.
    pub async fn has_min_balance(&self, account: &str, min: u64) -> Result<bool, ClientError> {
        Ok(self.get_balance(account).await? >= min)
    }

    /// Sum of remaining credits over the account's unexpired blocks.
    pub async fn get_balance(&self, account: &str) -> Result<u64, ClientError> {
        Ok(self.catalog().balance(account).await?)
    }

    /// Deduct credits (SPEC §5): earliest-expiring blocks first; partial
    /// unless `require_full`; idempotent by key.
    pub async fn deduct_credits(
        &self,
        account: &str,
        amount: u64,
        opts: DeductOptions,
    ) -> Result<DeductResult, ClientError> {
        let idempotency_key = opts
            .idempotency_key
            .or_else(|| opts.request_id.clone())
            .unwrap_or_else(|| generate_id("ded_"));
        let d = Deduction {
            account_id: account.to_string(),
            amount,
            require_full: opts.require_full,
            min_balance: opts.min_balance,
            idempotency_key,
            request_id: opts.request_id,
            endpoint: opts.endpoint,
        };
        Ok(self.catalog().deduct(&d).await?)
    }

    /// Give back what the deduction with `idempotency_key` took.
    pub async fn refund_credits(&self, idempotency_key: &str) -> Result<u64, ClientError> {
        Ok(self.catalog().refund(idempotency_key).await?)
    }
}

/// The original library's admin functions, over any [`Catalog`].
///
/// ```no_run
/// use plangate::client::admin;
/// # async fn f(db: &dyn plangate::catalog::Catalog) -> Result<(), Box<dyn std::error::Error>> {
/// let plans = admin::load_plans_from_file("plans.yaml".as_ref())?;
/// admin::apply_plans(db, &plans).await?;
/// admin::set_default_plan(db, "free_tier").await?;
/// admin::assign_plan(db, "account-123", "premium").await?;
/// let plan = admin::get_account_plan(db, "account-123").await?;
/// let block = admin::create_quota_block(db, "account-123", 1000, None, serde_json::json!({})).await?;
/// admin::delete_quota_block(db, &block.id).await?;
/// admin::expire_quota_blocks(db, "account-123").await?;
/// # Ok(()) }
/// ```
pub mod admin {
    use std::path::Path;
    use std::sync::Arc;
    use std::time::SystemTime;

    use crate::catalog::{ApplyReport, Catalog, CatalogError, CatalogResult, QuotaBlock};
    use crate::config::ConfigErrors;
    use crate::plans::{Plan, PlanSet};

    /// Read and validate a plans file (errors carry file:line).
    pub fn load_plans_from_file(path: &Path) -> Result<PlanSet, ConfigErrors> {
        crate::plans::parse::load_plans_file(path)
    }

    /// Upsert every plan (and the set's `default_plan`) in one transaction.
    /// Plans not in the set are kept; see [`Catalog::apply_plans`] to prune.
    pub async fn apply_plans(db: &dyn Catalog, plans: &PlanSet) -> CatalogResult<ApplyReport> {
        db.apply_plans(plans, false).await
    }

    /// Make a plan the default.
    pub async fn set_default_plan(db: &dyn Catalog, plan_id: &str) -> CatalogResult<()> {
        db.set_default_plan(plan_id).await
    }

    /// Put an account on a plan, creating the account if it does not exist
    /// (as the original library did).
    pub async fn assign_plan(
        db: &dyn Catalog,
        account_id: &str,
        plan_id: &str,
    ) -> CatalogResult<()> {
        match db.assign_plan(account_id, Some(plan_id)).await {
            Err(CatalogError::NotFound {
                kind: "account", ..
            }) => {
                match db
                    .create_account(account_id, Some(plan_id), serde_json::Value::Null)
                    .await
                {
                    // Created concurrently by someone else: assign again.
                    Err(CatalogError::Conflict(_)) => {
                        db.assign_plan(account_id, Some(plan_id)).await
                    }
                    r => r.map(|_| ()),
                }
            }
            r => r,
        }
    }

    /// Bill an account from day `anchor` of the month (1 to 31; `None`:
    /// from the 1st): its calendar-month windows run anchor to anchor,
    /// clamped in short months (README "Calendar windows").
    pub async fn set_billing_anchor(
        db: &dyn Catalog,
        account_id: &str,
        anchor: Option<u8>,
    ) -> CatalogResult<()> {
        db.set_billing_anchor(account_id, anchor).await
    }

    /// The plan in force for an account (its own, else the default);
    /// unknown accounts are on the default plan. `None` if no plan exists.
    pub async fn get_account_plan(
        db: &dyn Catalog,
        account_id: &str,
    ) -> CatalogResult<Option<Arc<Plan>>> {
        let plan_id = match db.get_account(account_id).await {
            Ok(a) => a.effective_plan,
            Err(CatalogError::NotFound { .. }) => db.default_plan().await?,
            Err(e) => return Err(e),
        };
        match plan_id {
            Some(id) => db.get_plan(&id).await.map(Some),
            None => Ok(None),
        }
    }

    /// Every plan and the default.
    pub async fn list_plans(db: &dyn Catalog) -> CatalogResult<PlanSet> {
        db.list_plans().await
    }

    /// Delete a plan; refused for the default plan and plans in use.
    pub async fn delete_plan(db: &dyn Catalog, plan_id: &str) -> CatalogResult<()> {
        db.delete_plan(plan_id).await
    }

    /// Grant credits as a new quota block.
    pub async fn create_quota_block(
        db: &dyn Catalog,
        account_id: &str,
        credits: u64,
        expires_at: Option<SystemTime>,
        metadata: serde_json::Value,
    ) -> CatalogResult<QuotaBlock> {
        db.create_quota_block(account_id, credits, expires_at, metadata)
            .await
    }

    /// Delete a quota block.
    pub async fn delete_quota_block(db: &dyn Catalog, block_id: &str) -> CatalogResult<()> {
        db.delete_quota_block(block_id).await
    }

    /// Expire all of an account's blocks now; returns how many.
    pub async fn expire_quota_blocks(db: &dyn Catalog, account_id: &str) -> CatalogResult<u64> {
        db.expire_quota_blocks(account_id).await
    }
}
