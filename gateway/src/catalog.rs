//! The catalog: plans, accounts, API keys, quota blocks and the credit
//! ledger (SPEC §5, §8). A Postgres implementation for production and an
//! in-process one for `plangate dev` and tests pass one conformance suite.
//!
//! Catalog reads are never on the hot path of a cached request: the gateway
//! reads through `catalog/cache.rs`, which every implementation invalidates
//! through [`Catalog::subscribe`].

pub mod cache;
pub mod memory;
pub mod postgres;

use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;

use crate::plans::{Plan, PlanSet};

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
    pub fn not_found(kind: &'static str, id: impl Into<String>) -> Self {
        CatalogError::NotFound {
            kind,
            id: id.into(),
        }
    }
}

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
    pub default_plan: Option<String>,
}

/// An account and the plan it is on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Account {
    pub id: String,
    /// The plan assigned explicitly, if any.
    pub plan_id: Option<String>,
    /// The plan in force: `plan_id`, else the default plan.
    pub effective_plan: Option<String>,
    pub metadata: serde_json::Value,
}

/// An API key as listed: never the key itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiKeyInfo {
    pub id: String,
    pub account_id: String,
    /// The first characters of the key, to recognise it (e.g. `pg_3f9a1c`).
    pub prefix: String,
    #[serde(with = "humantime_serde_opt")]
    pub created_at: Option<SystemTime>,
    pub revoked: bool,
}

/// A freshly created key: the only time the plaintext exists.
#[derive(Debug, Clone, Serialize)]
pub struct NewApiKey {
    pub id: String,
    pub key: String,
    pub prefix: String,
}

/// Which account a key belongs to (the result of a lookup by hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyOwner {
    pub key_id: String,
    pub account_id: String,
}

/// A pre-purchased balance.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QuotaBlock {
    pub id: String,
    pub account_id: String,
    pub credits_granted: u64,
    pub credits_remaining: u64,
    #[serde(with = "humantime_serde_opt")]
    pub expires_at: Option<SystemTime>,
    pub metadata: serde_json::Value,
    #[serde(with = "humantime_serde_opt")]
    pub created_at: Option<SystemTime>,
}

/// A credit deduction (SPEC §5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deduction {
    pub account_id: String,
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
    pub endpoint: Option<String>,
}

/// What a deduction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DeductResult {
    pub requested: u64,
    pub deducted: u64,
    /// `requested - deducted`.
    pub shortfall: u64,
    /// Balance after the deduction (unexpired blocks).
    pub balance: u64,
    /// True when this idempotency key had already been used.
    pub replayed: bool,
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
    /// Unknown scope (e.g. the notification channel reconnected): forget all.
    All,
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
    async fn get_plan(&self, id: &str) -> CatalogResult<Arc<Plan>>;
    /// Refused (Conflict) for the default plan and for plans in use.
    async fn delete_plan(&self, id: &str) -> CatalogResult<()>;
    async fn default_plan(&self) -> CatalogResult<Option<String>>;
    async fn set_default_plan(&self, id: &str) -> CatalogResult<()>;

    // --- accounts
    async fn create_account(
        &self,
        id: &str,
        plan_id: Option<&str>,
        metadata: serde_json::Value,
    ) -> CatalogResult<Account>;
    /// `None` puts the account back on the default plan.
    async fn assign_plan(&self, account_id: &str, plan_id: Option<&str>) -> CatalogResult<()>;
    async fn get_account(&self, id: &str) -> CatalogResult<Account>;

    // --- API keys
    async fn create_key(&self, account_id: &str) -> CatalogResult<NewApiKey>;
    /// Look up an unrevoked key by the hex SHA-256 of its plaintext.
    async fn lookup_key(&self, key_hash: &str) -> CatalogResult<Option<KeyOwner>>;
    async fn revoke_key(&self, key_id: &str) -> CatalogResult<()>;
    async fn list_keys(&self, account_id: &str) -> CatalogResult<Vec<ApiKeyInfo>>;

    // --- credits
    async fn create_quota_block(
        &self,
        account_id: &str,
        credits: u64,
        expires_at: Option<SystemTime>,
        metadata: serde_json::Value,
    ) -> CatalogResult<QuotaBlock>;
    async fn delete_quota_block(&self, block_id: &str) -> CatalogResult<()>;
    /// Expire every block of the account now. Returns how many it expired.
    async fn expire_quota_blocks(&self, account_id: &str) -> CatalogResult<u64>;
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

    /// Invalidations from this catalog and (for Postgres) every other
    /// instance sharing the database.
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Invalidation>;

    /// Whether the backing store answers (for `/readyz`).
    async fn ping(&self) -> CatalogResult<()>;
}

/// Hex SHA-256 of an API key: the only form in which keys are stored.
pub fn hash_key(key: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(key.as_bytes());
    let mut out = String::with_capacity(64);
    for b in digest {
        use std::fmt::Write;
        let _ = write!(out, "{b:02x}");
    }
    out
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
