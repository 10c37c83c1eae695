//! The catalog: plans, accounts, API keys, quota blocks and the credit
//! ledger (SPEC §5, §8). A Postgres implementation for production and an
//! in-process one for `plangate dev` and tests pass one conformance suite.
//!
//! Catalog reads are never on the hot path of a cached request: the gateway
//! reads through `catalog/cache.rs`, which every implementation invalidates
//! through [`Catalog::subscribe`].
//!
//! Usage events (one record per ended request) are stored here too; their
//! types and shared rules are in `catalog/usage.rs`.

pub mod cache;
pub mod memory;
pub mod notifications;
pub mod postgres;
pub mod usage;

pub use notifications::{
    Attempted, NewNotification, Notification, NotificationQuery, NotificationStatus,
};
pub use usage::{
    BucketKey, GroupBy, RequestCharge, UnitUsage, UsageBucket, UsageCursor, UsageEvent, UsageQuery,
};
pub mod timed;

use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;

use crate::plans::{Plan, PlanSet, MAX_AMOUNT};

/// A catalog operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The thing named does not exist (HTTP 404).
    #[error("{kind} not found: {id}")]
    NotFound { kind: &'static str, id: String },
    /// The operation would break a rule (HTTP 409), e.g. deleting the
    /// default plan or a plan in use, or creating an account that exists.
    #[error("{0}")]
    Conflict(String),
    /// The input is invalid (HTTP 400).
    #[error("{0}")]
    Invalid(String),
    /// The backing database failed or is unreachable (HTTP 503).
    #[error("catalog unavailable: {0}")]
    Unavailable(String),
}

impl CatalogError {
    /// A [`CatalogError::NotFound`] for `kind` (e.g. `"plan"`) and `id`.
    pub fn not_found(kind: &'static str, id: impl Into<String>) -> Self {
        CatalogError::NotFound {
            kind,
            id: id.into(),
        }
    }
}

/// The result of a catalog operation.
pub type CatalogResult<T> = Result<T, CatalogError>;

/// What applying a plans file changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ApplyReport {
    /// Plans inserted or updated.
    pub upserted: Vec<String>,
    /// Plans removed by `--prune`.
    pub pruned: Vec<String>,
    /// Plans `--prune` kept because accounts use them (or it is the default).
    pub kept_in_use: Vec<String>,
    /// The default plan after the apply.
    pub default_plan: Option<String>,
}

/// An account and the plan it is on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Account {
    /// The account id (opaque, chosen by the operator).
    pub id: String,
    /// The plan assigned explicitly, if any.
    pub plan_id: Option<String>,
    /// The plan in force: `plan_id`, else the default plan.
    pub effective_plan: Option<String>,
    /// Free-form JSON (an object; `{}` when none was given).
    pub metadata: serde_json::Value,
    /// The day of the month (1 to 31) the account's billing month starts
    /// on: its plan's `1mo` windows run from that day (clamped in short
    /// months). `None`: the calendar month.
    pub billing_anchor: Option<u8>,
}

/// An API key as listed: never the key itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiKeyInfo {
    /// The key's id (not secret), used to revoke it.
    pub id: String,
    /// The account the key belongs to.
    pub account_id: String,
    /// The first characters of the key, to recognise it (e.g. `pg_3f9a1c`).
    pub prefix: String,
    /// When the key was created (catalog clock).
    #[serde(with = "humantime_serde_opt")]
    pub created_at: Option<SystemTime>,
    /// Revoked keys are listed but never found by [`Catalog::lookup_key`].
    pub revoked: bool,
    /// The operator's label (e.g. `ci`), if any.
    pub label: Option<String>,
    /// From this instant on the key is refused like a revoked one.
    #[serde(with = "humantime_serde_opt")]
    pub expires_at: Option<SystemTime>,
    /// The key's own plan (key-level limits on top of its account's), if any.
    pub plan_id: Option<String>,
}

/// What a new key may carry besides its account.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyOptions {
    /// A label to recognise the key by (1 to 200 bytes, no control
    /// characters).
    pub label: Option<String>,
    /// When the key stops working; must be in the future.
    pub expires_at: Option<SystemTime>,
    /// A plan of the key's own: its windows apply to this key on top of
    /// the account's plan. Must name an existing plan.
    pub plan: Option<String>,
}

/// What [`Catalog::delete_account`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DeletedAccount {
    /// The account deleted.
    pub id: String,
    /// Its API keys, deleted (and refused from then on).
    pub keys: u64,
    /// Its quota blocks, deleted.
    pub blocks: u64,
    /// Credits of its unexpired blocks, forfeited (only with `force`).
    pub credits_forfeited: u64,
}

/// One row of [`Catalog::search_accounts`]: an account with its balance
/// and when it was last seen.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AccountSummary {
    pub account: Account,
    /// Credits remaining in its unexpired blocks (catalog clock).
    pub balance: u64,
    /// When its latest usage event ended, if it has any.
    #[serde(with = "humantime_serde_opt")]
    pub last_seen: Option<SystemTime>,
}

/// The least string above every string that starts with `prefix`
/// (bytewise, as ids are ordered), or `None` when there is none (an empty
/// prefix, or one of only `char::MAX`). Bounds a prefix search to an index
/// range: `prefix <= id < upper`.
pub fn prefix_upper_bound(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        // UTF-8 orders bytewise as code points do, so the next code point
        // (surrogates skipped) is the next string of this length.
        let next = match last as u32 + 1 {
            0xD800 => Some('\u{E000}'),
            n => char::from_u32(n),
        };
        if let Some(n) = next {
            chars.push(n);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// Longest key label, in bytes.
pub const MAX_LABEL_BYTES: usize = 200;

/// Most accounts one page of [`Catalog::list_accounts`] returns.
pub const MAX_ACCOUNTS_PAGE: usize = 1000;

/// Check a new key's options against the catalog clock's `now`; both
/// backends refuse the same ones.
pub(crate) fn check_key_options(opts: &KeyOptions, now: SystemTime) -> CatalogResult<()> {
    if let Some(label) = &opts.label {
        if label.is_empty() || label.len() > MAX_LABEL_BYTES {
            return Err(CatalogError::Invalid(format!(
                "a key label is 1 to {MAX_LABEL_BYTES} bytes"
            )));
        }
        if label.chars().any(char::is_control) {
            return Err(CatalogError::Invalid(
                "a key label must not contain control characters".into(),
            ));
        }
    }
    if let Some(at) = opts.expires_at {
        if at <= now {
            return Err(CatalogError::Invalid(format!(
                "the key's expiry {} is not in the future",
                humantime::format_rfc3339_seconds(at)
            )));
        }
    }
    Ok(())
}

/// A grant expiring at `expires_at` is refused when that is not after
/// `now`: the block would never count.
pub(crate) fn check_block_expiry(
    expires_at: Option<SystemTime>,
    now: SystemTime,
) -> CatalogResult<()> {
    match expires_at {
        Some(at) if at <= now => Err(CatalogError::Invalid(format!(
            "expires_at {} is not in the future: the credits would never count",
            humantime::format_rfc3339_seconds(at)
        ))),
        _ => Ok(()),
    }
}

/// `patch` applied to an account's `metadata`: each key set to its value,
/// or removed when the value is `null`.
pub(crate) fn merge_metadata(
    metadata: &serde_json::Value,
    patch: &serde_json::Map<String, serde_json::Value>,
) -> serde_json::Value {
    let mut out = metadata.as_object().cloned().unwrap_or_default();
    for (k, v) in patch {
        if v.is_null() {
            out.remove(k);
        } else {
            out.insert(k.clone(), v.clone());
        }
    }
    serde_json::Value::Object(out)
}

/// The refusal of deleting an account that still has `credits` unexpired
/// credits without `force`.
pub(crate) fn credits_left(id: &str, credits: u64) -> CatalogError {
    CatalogError::Conflict(format!(
        "account `{id}` has {credits} unexpired credits; delete it with force \
         (`plangate accounts delete --force`, `?force=true`) to forfeit them"
    ))
}

/// A freshly created key: the only time the plaintext exists.
#[derive(Debug, Clone, Serialize)]
pub struct NewApiKey {
    /// The key's id (not secret).
    pub id: String,
    /// The plaintext key: `pg_` followed by 43 base62 characters (256 bits).
    pub key: String,
    /// The first characters of the key, as [`ApiKeyInfo::prefix`] shows them.
    pub prefix: String,
}

/// Which account a key belongs to (the result of a lookup by hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyOwner {
    /// The key's id.
    pub key_id: String,
    /// The account it authenticates as.
    pub account_id: String,
    /// When the key expires (catalog clock, ms since the epoch), if it
    /// does: caches refuse it from then on without asking again.
    pub expires_at_ms: Option<u64>,
    /// The key's own plan, if it has one (key-level limits).
    pub plan_id: Option<String>,
}

impl KeyOwner {
    /// Whether the key has expired at `now_ms`.
    pub fn expired_at(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|e| e <= now_ms)
    }
}

/// A pre-purchased balance.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QuotaBlock {
    /// The block's id (`qb_...`).
    pub id: String,
    /// The account whose balance it is part of.
    pub account_id: String,
    /// Credits granted when the block was created.
    pub credits_granted: u64,
    /// Credits not yet consumed (never negative).
    pub credits_remaining: u64,
    /// From this instant on the block no longer counts. `None`: never.
    /// Stored with microsecond precision.
    #[serde(with = "humantime_serde_opt")]
    pub expires_at: Option<SystemTime>,
    /// Free-form JSON (an object; `{}` when none was given).
    pub metadata: serde_json::Value,
    /// When the block was created (catalog clock).
    #[serde(with = "humantime_serde_opt")]
    pub created_at: Option<SystemTime>,
}

/// A credit deduction (SPEC §5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deduction {
    /// The account to charge.
    pub account_id: String,
    /// Credits to deduct.
    pub amount: u64,
    /// All or nothing.
    pub require_full: bool,
    /// Refuse (deduct nothing) unless the balance is at least this much;
    /// checked atomically with the deduction. 0 for no check.
    pub min_balance: u64,
    /// The same key deducts once; repeats return the first result.
    pub idempotency_key: String,
    /// For the ledger.
    pub request_id: Option<String>,
    /// For the ledger.
    pub endpoint: Option<String>,
}

/// What a deduction did.
///
/// A refused deduction (`require_full` or `min_balance` not met) deducts
/// nothing, writes no ledger row and does not use up its idempotency key.
/// A partial deduction (not `require_full`) writes a ledger row recording
/// the shortfall, even when nothing could be deducted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DeductResult {
    /// The amount asked for.
    pub requested: u64,
    /// The amount taken from quota blocks.
    pub deducted: u64,
    /// `requested - deducted`.
    pub shortfall: u64,
    /// Balance after the deduction (unexpired blocks).
    pub balance: u64,
    /// True when this idempotency key had already been used.
    pub replayed: bool,
}

/// One row of the credit ledger: one deduction and what became of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LedgerEntry {
    /// The deduction's idempotency key (unique).
    pub idempotency_key: String,
    /// The account charged.
    pub account_id: String,
    /// The request that caused the charge, if known.
    pub request_id: Option<String>,
    /// The endpoint that caused the charge, if known.
    pub endpoint: Option<String>,
    /// The amount asked for.
    pub requested: u64,
    /// The amount taken.
    pub deducted: u64,
    /// `requested - deducted`: owed but not collected.
    pub shortfall: u64,
    /// Credits given back by [`Catalog::refund`] (0 if not refunded).
    pub refunded: u64,
    /// Which blocks the deduction drew from, in drain order.
    pub draws: Vec<Draw>,
    /// When the deduction happened (catalog clock).
    #[serde(with = "humantime_serde_opt")]
    pub created_at: Option<SystemTime>,
}

/// Credits one deduction took from one quota block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Draw {
    /// The quota block.
    pub block_id: String,
    /// Credits taken from it.
    pub credits: u64,
}

/// A credit operation a gateway decided (in its counter store's wallet,
/// `limiter::wallet`) and the catalog records: idempotent by ledger key.
/// Serialized as the in-process store's spool writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(tag = "k", rename_all = "lowercase")]
pub enum CreditOp {
    /// A deduction. `deducted: None` when the wallet was not loaded at the
    /// end of the request: the catalog decides (as far as the balance goes).
    Charge {
        key: String,
        request_id: String,
        endpoint: String,
        requested: u64,
        deducted: Option<u64>,
        draws: Vec<Draw>,
        at_ms: u64,
    },
    /// Give back what the deduction under `key` took.
    Refund { key: String, at_ms: u64 },
}

impl CreditOp {
    /// A charge the wallet could not decide, as the partial deduction the
    /// catalog makes of it; `None` for any other operation.
    pub fn undecided_deduction(&self, account_id: &str) -> Option<Deduction> {
        match self {
            CreditOp::Charge {
                key,
                request_id,
                endpoint,
                requested,
                deducted: None,
                ..
            } => Some(Deduction {
                account_id: account_id.to_owned(),
                amount: *requested,
                require_full: false,
                min_balance: 0,
                idempotency_key: key.clone(),
                request_id: Some(request_id.clone()),
                endpoint: Some(endpoint.clone()),
            }),
            _ => None,
        }
    }
}

/// An account's credits as a wallet loads them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CreditSnapshot {
    /// The account's credit version: bumped by every change made outside
    /// the wallets (grants, deleted or expired blocks, direct deductions
    /// and refunds).
    pub version: u64,
    /// Unexpired blocks (drained ones included), in drain order.
    pub blocks: Vec<QuotaBlock>,
}

/// Something changed that caches must forget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalidation {
    /// Plans or the default plan changed.
    Plans,
    /// One account's plan changed.
    Account(String),
    /// A key was revoked; carries the key's hash (hex).
    Key(String),
    /// An account's credits changed outside the wallets; its credit
    /// version is now `version`.
    Credits { account: String, version: u64 },
    /// Unknown scope (e.g. the notification channel reconnected): forget all.
    All,
    /// The notification channel was lost: changes from now on may go
    /// unheard until it reconnects, which sends [`Invalidation::All`].
    /// Caches stop trusting what they hold (as for `All`); credit wallets
    /// are kept — they are dropped by the reconnect's `All`, when they
    /// can be loaded again — so that credits keep being served from the
    /// counter store while Postgres is unreachable. Never sent between
    /// instances.
    Deaf,
}

/// Plans, accounts, keys and credits. Times come from the catalog's clock so
/// expiry is testable on every backend.
#[async_trait::async_trait]
pub trait Catalog: Send + Sync + 'static {
    // --- plans
    /// Upsert every plan in one transaction; with `prune`, delete plans not
    /// in `plans` that no account uses (never the default plan). A
    /// `default_plan` in the set becomes the default.
    async fn apply_plans(&self, plans: &PlanSet, prune: bool) -> CatalogResult<ApplyReport>;
    /// Every plan and the default.
    async fn list_plans(&self) -> CatalogResult<PlanSet>;
    /// One plan; NotFound if absent.
    async fn get_plan(&self, id: &str) -> CatalogResult<Arc<Plan>>;
    /// Refused (Conflict) for the default plan and for plans in use.
    async fn delete_plan(&self, id: &str) -> CatalogResult<()>;
    /// The default plan; `None` only while no plan exists.
    async fn default_plan(&self) -> CatalogResult<Option<String>>;
    /// Make `id` the default (NotFound if it does not exist).
    async fn set_default_plan(&self, id: &str) -> CatalogResult<()>;

    // --- accounts
    /// Create an account: Conflict if it exists, NotFound if `plan_id`
    /// names no plan, Invalid for an empty or over-long id. A `null`
    /// metadata is stored as `{}`.
    async fn create_account(
        &self,
        id: &str,
        plan_id: Option<&str>,
        metadata: serde_json::Value,
    ) -> CatalogResult<Account>;
    /// `None` puts the account back on the default plan.
    async fn assign_plan(&self, account_id: &str, plan_id: Option<&str>) -> CatalogResult<()>;
    /// The account and its effective plan; NotFound if absent.
    async fn get_account(&self, id: &str) -> CatalogResult<Account>;
    /// Up to `limit` accounts ordered by id (bytewise), those after `after`
    /// only; with `plan`, only accounts whose effective plan it is
    /// (NotFound if no such plan exists).
    async fn list_accounts(
        &self,
        plan: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> CatalogResult<Vec<Account>>;
    /// Up to `limit` accounts whose id starts with `prefix`, ordered by
    /// id (bytewise), those after `after` only, each with its balance and
    /// last usage. One index range scan on Postgres, however many
    /// accounts there are.
    async fn search_accounts(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> CatalogResult<Vec<AccountSummary>>;
    /// Set (or, with a `null` value, remove) top-level keys of the
    /// account's metadata; NotFound if absent.
    async fn update_account_metadata(
        &self,
        id: &str,
        patch: &serde_json::Map<String, serde_json::Value>,
    ) -> CatalogResult<Account>;
    /// Delete an account with its keys (refused from then on, everywhere)
    /// and its quota blocks; its ledger rows and usage events stay, for
    /// audit. Refused (Conflict) while it has unexpired credits, unless
    /// `force`. NotFound if absent.
    async fn delete_account(&self, id: &str, force: bool) -> CatalogResult<DeletedAccount>;
    /// Set (1 to 31) or clear the account's billing anchor; NotFound if
    /// the account is absent, Invalid outside 1 to 31. Caches hear of it
    /// through [`Catalog::subscribe`] (as of a plan assignment).
    async fn set_billing_anchor(&self, account_id: &str, anchor: Option<u8>) -> CatalogResult<()>;

    // --- API keys
    /// Create a random key for an existing account; only its hash is kept.
    async fn create_key(&self, account_id: &str) -> CatalogResult<NewApiKey> {
        self.create_key_with(account_id, &KeyOptions::default())
            .await
    }
    /// [`Catalog::create_key`] with a label and an expiry (Invalid: see
    /// [`KeyOptions`]).
    async fn create_key_with(
        &self,
        account_id: &str,
        opts: &KeyOptions,
    ) -> CatalogResult<NewApiKey>;
    /// Look up an unrevoked, unexpired key by the hex SHA-256 of its
    /// plaintext.
    async fn lookup_key(&self, key_hash: &str) -> CatalogResult<Option<KeyOwner>>;
    /// Revoke a key by id: NotFound if it never existed, Conflict if it is
    /// already revoked. Caches hear of it through [`Catalog::subscribe`].
    async fn revoke_key(&self, key_id: &str) -> CatalogResult<()>;
    /// An account's keys, revoked ones included, oldest first.
    async fn list_keys(&self, account_id: &str) -> CatalogResult<Vec<ApiKeyInfo>>;

    /// Give a key a plan of its own, or take it away (`None`): its
    /// windows apply to the key on top of its account's plan. The plan
    /// must exist; a revoked key cannot be changed.
    async fn set_key_plan(&self, key_id: &str, plan_id: Option<&str>) -> CatalogResult<()>;

    // --- credits
    /// Grant credits to an existing account as a new block. Invalid when
    /// `credits` is above [`MAX_AMOUNT`] or would take the account's
    /// balance above it (checked atomically with the grant), and when
    /// `expires_at` is not in the future (catalog clock).
    async fn create_quota_block(
        &self,
        account_id: &str,
        credits: u64,
        expires_at: Option<SystemTime>,
        metadata: serde_json::Value,
    ) -> CatalogResult<QuotaBlock>;
    /// Delete a block (NotFound if absent).
    async fn delete_quota_block(&self, block_id: &str) -> CatalogResult<()>;
    /// Expire every block of the account now. Returns how many it expired.
    async fn expire_quota_blocks(&self, account_id: &str) -> CatalogResult<u64>;
    /// Every block of the account (expired and drained ones too), oldest first.
    async fn list_quota_blocks(&self, account_id: &str) -> CatalogResult<Vec<QuotaBlock>>;
    /// Sum of remaining credits over unexpired blocks.
    async fn balance(&self, account_id: &str) -> CatalogResult<u64>;
    /// Earliest expiry first, never-expiring last, row locks, one
    /// transaction, one ledger row; idempotent by key.
    async fn deduct(&self, d: &Deduction) -> CatalogResult<DeductResult>;
    /// Give back what the deduction with this key took (to the blocks it
    /// came from). Idempotent; unknown keys refund nothing. Returns credits
    /// refunded.
    async fn refund(&self, idempotency_key: &str) -> CatalogResult<u64>;
    /// The account's ledger, oldest first.
    async fn ledger(&self, account_id: &str) -> CatalogResult<Vec<LedgerEntry>>;

    /// The account's unexpired blocks and credit version, read together.
    /// An unknown account has version 0 and no blocks.
    async fn credit_snapshot(&self, account_id: &str) -> CatalogResult<CreditSnapshot>;
    /// Record what a wallet decided, in order, in one transaction: a
    /// charge writes its ledger row and takes its draws from the blocks
    /// (never below 0), once per key; a charge without a decision
    /// (`deducted: None`) is a partial [`Catalog::deduct`]; a refund gives
    /// back the draws of its ledger row, once. Operations of an unknown
    /// account are dropped.
    async fn record_credit_ops(&self, account_id: &str, ops: &[CreditOp]) -> CatalogResult<()>;
    /// Bump the account's credit version and send
    /// [`Invalidation::Credits`], so wallets reload. Grants, deleted and
    /// expired blocks and refunds do it themselves; callers of
    /// [`Catalog::deduct`] outside a gateway call it after.
    async fn touch_credits(&self, account_id: &str) -> CatalogResult<u64>;
    // --- usage events (`catalog/usage.rs` has the shared rules)
    /// Record ended requests in one statement (one transaction): each event
    /// is stored [`UsageEvent::normalized`]; a `request_id` already stored
    /// (or earlier in the batch) is skipped. Events of unknown or deleted
    /// accounts are recorded all the same. Invalid (nothing written) when
    /// any event fails [`UsageEvent::check`]. Returns how many events were
    /// newly stored.
    async fn record_usage(&self, events: &[UsageEvent]) -> CatalogResult<u64>;
    /// Up to `limit` events matching `q`, ordered by (`ended_at`,
    /// `request_id`), starting after `after`. Pass
    /// [`UsageCursor::after`] of a page's last event to read the next page:
    /// every event is read exactly once, however many share an `ended_at`.
    async fn usage_events(
        &self,
        q: &UsageQuery,
        after: Option<&UsageCursor>,
        limit: usize,
    ) -> CatalogResult<Vec<UsageEvent>>;
    /// Events matching `q`, summed per hour or day (UTC, by `ended_at`) or
    /// per endpoint; buckets without events are left out; ordered by key.
    async fn usage_summary(
        &self,
        q: &UsageQuery,
        group_by: GroupBy,
    ) -> CatalogResult<Vec<UsageBucket>>;
    /// Delete every event that ended before `before` (retention). Returns
    /// how many were deleted.
    async fn prune_usage(&self, before: SystemTime) -> CatalogResult<u64>;

    // --- threshold notifications (`catalog/notifications.rs`)
    /// Queue a notification unless one with its dedupe key exists (queued,
    /// delivered or failed); true when queued. Due at once.
    async fn enqueue_notification(&self, n: &NewNotification) -> CatalogResult<bool>;
    /// Up to `limit` pending notifications due now (catalog clock), oldest
    /// first, each leased for `lease`: not handed out again (to this or any
    /// gateway) before the lease ends unless finished first.
    async fn claim_notifications(
        &self,
        limit: usize,
        lease: std::time::Duration,
    ) -> CatalogResult<Vec<Notification>>;
    /// Record how a delivery attempt of notification `id` ended (attempts
    /// counted, status, next attempt, last error). A notification that is
    /// no longer pending is left as it is.
    async fn finish_notification(&self, id: &str, result: &Attempted) -> CatalogResult<()>;
    /// The delivery log: newest first, filtered and paged by `q`.
    async fn notifications(&self, q: &NotificationQuery) -> CatalogResult<Vec<Notification>>;
    /// Quota blocks, of every account, with credits left that expire after
    /// now and no later than `until`, in id order after `after` (keyset
    /// pages of at most `limit`).
    async fn expiring_blocks(
        &self,
        until: SystemTime,
        after: Option<&str>,
        limit: usize,
    ) -> CatalogResult<Vec<QuotaBlock>>;
    /// Delete delivered and failed notifications created before `before`
    /// (their windows long over); returns how many.
    async fn prune_notifications(&self, before: SystemTime) -> CatalogResult<u64>;

    /// Invalidations from this catalog and (for Postgres) every other
    /// instance sharing the database.
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Invalidation>;

    /// A time (catalog clock, ms) before which every committed change has
    /// been delivered to [`Catalog::subscribe`], as last confirmed over the
    /// notification channel; `None` when the catalog cannot vouch for its
    /// notifications. Lets caches keep entries past their TTL while the
    /// channel is known to work (see `cache::CacheConfig::trusted_ttl`).
    fn invalidations_confirmed_ms(&self) -> Option<u64> {
        None
    }

    /// Whether the backing store answers (for `/readyz`).
    async fn ping(&self) -> CatalogResult<()>;

    // --- plans ownership
    /// The plans file that owns the plans (`[plans] source = "file"`), as
    /// the last gateway started recorded it; `None`: the database does.
    async fn plans_file_owner(&self) -> CatalogResult<Option<String>>;
    /// Record who owns the plans (a gateway does at start).
    async fn set_plans_file_owner(&self, file: Option<&str>) -> CatalogResult<()>;
}

/// SHA-256 of an API key, raw; [`hash_key`] is its hex form.
pub type KeyDigest = [u8; 32];

/// The SHA-256 of an API key (what [`hash_key`] renders in hex).
pub fn key_digest(key: &str) -> KeyDigest {
    use sha2::{Digest, Sha256};
    Sha256::digest(key.as_bytes()).into()
}

/// Hex SHA-256 of an API key: the only form in which keys are stored.
pub fn hash_key(key: &str) -> String {
    hex_digest(&key_digest(key))
}

/// Lowercase hex of a digest, as [`hash_key`] renders it.
pub fn hex_digest(digest: &KeyDigest) -> String {
    // A table lookup per nibble instead of 32 `write!("{:02x}")` calls,
    // which cost twice as much as the hash itself.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(64);
    for &b in digest {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    out
}

/// The digest a [`hash_key`] string encodes; `None` for anything
/// `hash_key` does not produce (wrong length, uppercase, not hex).
pub fn parse_hex_digest(hex: &str) -> Option<KeyDigest> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    let hex = hex.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *o = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

/// Longest plan or account id, in bytes (SPEC §3).
pub const MAX_ID_BYTES: usize = 200;

/// Check a billing anchor: a day of the month, 1 to 31.
/// Keyset paging: `rows` was read with `limit + 1` (one more than asked),
/// so a next page is promised only when there is one. Cuts `rows` to
/// `limit` and returns the cursor of its last row when more follow.
pub fn next_page<T>(
    rows: &mut Vec<T>,
    limit: usize,
    cursor: impl FnOnce(&T) -> String,
) -> Option<String> {
    if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(cursor)
    } else {
        None
    }
}

pub(crate) fn check_billing_anchor(anchor: Option<u8>) -> CatalogResult<()> {
    match anchor {
        Some(a) if !(1..=crate::plans::MAX_BILLING_ANCHOR).contains(&a) => {
            Err(CatalogError::Invalid(format!(
                "billing_anchor must be a day of the month, 1 to 31, not {a}"
            )))
        }
        _ => Ok(()),
    }
}

/// Check an operator-chosen id (account or plan): 1 to 200 bytes and no NUL
/// (which Postgres text cannot hold), so both backends refuse the same ids.
pub(crate) fn check_id(kind: &str, id: &str) -> CatalogResult<()> {
    if id.is_empty() {
        return Err(CatalogError::Invalid(format!(
            "{kind} id must not be empty"
        )));
    }
    if id.len() > MAX_ID_BYTES {
        return Err(CatalogError::Invalid(format!(
            "{kind} id is longer than {MAX_ID_BYTES} bytes"
        )));
    }
    if id.contains('\0') {
        return Err(CatalogError::Invalid(format!(
            "{kind} id must not contain NUL"
        )));
    }
    Ok(())
}

/// Credit amounts (grants, deductions, balances needed) are at most
/// [`MAX_AMOUNT`] on both backends, so that they behave the same and sums
/// of them never leave Postgres `bigint` (README "Limits on numbers").
pub(crate) fn check_credits(credits: u64) -> CatalogResult<i64> {
    if credits > MAX_AMOUNT {
        return Err(CatalogError::Invalid(format!(
            "{credits} credits is more than the largest amount, {MAX_AMOUNT}"
        )));
    }
    // MAX_AMOUNT < i64::MAX.
    Ok(credits as i64)
}

/// A grant of `credits` to an account whose balance is `balance`: refused
/// when the balance would go above [`MAX_AMOUNT`]. Both backends call it
/// with the account locked against concurrent grants.
pub(crate) fn check_grant(account_id: &str, balance: u64, credits: u64) -> CatalogResult<()> {
    if balance.saturating_add(credits) > MAX_AMOUNT {
        return Err(CatalogError::Invalid(format!(
            "granting {credits} credits would take the balance of account `{account_id}` \
             ({balance}) above the largest balance, {MAX_AMOUNT}"
        )));
    }
    Ok(())
}

/// `null` metadata is stored as `{}`; anything else must be a JSON object.
pub(crate) fn normalize_metadata(metadata: serde_json::Value) -> CatalogResult<serde_json::Value> {
    match metadata {
        serde_json::Value::Null => Ok(serde_json::Value::Object(Default::default())),
        v @ serde_json::Value::Object(_) => Ok(v),
        _ => Err(CatalogError::Invalid(
            "metadata must be a JSON object".into(),
        )),
    }
}

/// Prefix of every API key.
pub const KEY_PREFIX: &str = "pg_";

/// A new random key (256 bits, base62) and the prefix shown in listings.
pub(crate) fn generate_key() -> (String, String) {
    use rand::distr::{Alphanumeric, SampleString};
    let key = format!(
        "{KEY_PREFIX}{}",
        Alphanumeric.sample_string(&mut rand::rng(), 43)
    );
    let prefix = key[..KEY_PREFIX.len() + 6].to_string();
    (key, prefix)
}

/// A new random id such as `key_1f2e3d4c5b6a7980` (64 bits of randomness;
/// ids are not secret, the primary key catches the impossible collision).
pub(crate) fn generate_id(prefix: &str) -> String {
    format!("{prefix}{:016x}", rand::random::<u64>())
}

/// A `SystemTime` as milliseconds since the epoch (0 before it).
pub(crate) fn time_to_ms(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The refusal of revoking a key twice.
pub(crate) fn already_revoked(key_id: &str) -> CatalogError {
    CatalogError::Conflict(format!("key `{key_id}` is already revoked"))
}

/// Milliseconds since the epoch as a `SystemTime`.
pub(crate) fn ms_to_time(ms: u64) -> SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)
}

/// Truncate to whole microseconds, the precision of Postgres `timestamptz`,
/// so the in-process catalog returns the same instants.
pub(crate) fn trunc_micros(t: SystemTime) -> SystemTime {
    match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => std::time::UNIX_EPOCH + std::time::Duration::from_micros(d.as_micros() as u64),
        Err(_) => t,
    }
}

/// Serialize `Option<SystemTime>` as RFC 3339 (or null).
mod humantime_serde_opt {
    use std::time::SystemTime;

    pub fn serialize<S: serde::Serializer>(
        t: &Option<SystemTime>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&humantime::format_rfc3339_millis(*t).to_string()),
            None => s.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{hash_key, key_digest, parse_hex_digest};

    #[test]
    fn hex_digests_round_trip_and_only_hash_key_forms_parse() {
        let hex = hash_key("pg_example");
        assert_eq!(hex.len(), 64);
        assert_eq!(parse_hex_digest(&hex), Some(key_digest("pg_example")));
        let cases = [
            ("", false),
            (&hex[..62], false),
            (&hex.to_uppercase(), hex.to_uppercase() == hex),
            (&format!("{}g", &hex[..63]), false),
            ("ab12", false),
        ];
        for (input, parses) in cases {
            assert_eq!(parse_hex_digest(input).is_some(), parses, "{input:?}");
        }
    }
}
