//! The limiting engine: the [`CounterStore`] trait and the attempt / end /
//! info algorithm of SPEC §4 on top of it.
//!
//! The split: this module does everything that can be decided without the
//! store (start amounts, `TooLarge`, which window denied, the info a client
//! sees) as pure functions; a store only does the atomic
//! check-and-increment over the counters it keeps.

mod keeper;
pub mod keys;
pub mod memory;
pub mod redis;
pub mod spool;
#[cfg(test)]
mod tests;
pub mod wallet;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;

use crate::background::{Background, Job};
use crate::catalog::Draw;
use crate::clock::SharedClock;
use crate::plans::{Policy, Unit, Window, WindowLen};
use keeper::{due_after, retry_after, DueLease, Keeper, LeaseKey};
use wallet::{Charged, CreditAsk, EndCredits, OutboxItem, Unended, WalletInit, WalletSnapshot};

/// How long an in-flight record is kept after its lease ran out, so that a
/// request whose lease expired (a store outage longer than half a lease
/// kept the keeper from renewing it, or its gateway stalled) is still
/// settled when it ends. During the grace the record is not in flight: it
/// takes no slot, is no duplicate and cannot be renewed; only an end finds
/// it (and settles it, once).
pub const SETTLE_GRACE_MS: u64 = 3_600_000;

/// How often the lease keeper's background task looks for leases due for
/// renewal (see [`Limiter::renew_due`]).
pub const DEFAULT_KEEPER_INTERVAL: Duration = Duration::from_millis(200);

/// Renewals one keeper pass runs at once.
const KEEPER_CONCURRENCY: usize = 64;

/// A counter store failed or did not answer in time.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("counter store timed out after {0:?}")]
    Timeout(Duration),
    #[error("counter store unavailable: {0}")]
    Unavailable(String),
    #[error("counter store answered unexpectedly: {0}")]
    Protocol(String),
    /// A credit wallet needed the catalog (to be loaded, or to have its
    /// outbox written first), which failed or did not answer within
    /// `catalog_timeout`. Credits fail closed: 503 `catalog_unavailable`.
    #[error("catalog unavailable: {0}")]
    Catalog(String),
}

/// One window of an attempt, with the amount this request deducts from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowSpec {
    pub len: WindowLen,
    pub limit: u64,
    pub unit: Unit,
    /// Start amount deducted at admission (0 if the unit was not given).
    pub amount: u64,
}

/// The API key whose own plan adds windows to a store request
/// (issue 15 item 3): the last `windows` of the request's windows (or
/// settlements) are the key's, counted under the key's id on top of the
/// account's, in the same atomic operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyScope<'a> {
    /// The key's id (never the key itself).
    pub id: &'a str,
    /// How many of the request's windows, the last ones, are the key's.
    pub windows: usize,
}

impl<'a> KeyScope<'a> {
    /// The key that item `i` of `len` items belongs to, if it is the key's.
    pub fn of(scope: Option<Self>, len: usize, i: usize) -> Option<&'a str> {
        scope.and_then(|k| (i >= len.saturating_sub(k.windows)).then_some(k.id))
    }
}

/// What a store is asked to do atomically at admission.
#[derive(Debug, Clone)]
pub struct AttemptRequest<'a> {
    pub request_id: &'a str,
    pub account: &'a str,
    pub endpoint: &'a str,
    pub now_ms: u64,
    pub windows: &'a [WindowSpec],
    /// 0: no concurrency limit (the request is still tracked as in flight).
    pub max_concurrent: u32,
    /// Lifetime of the in-flight record / concurrency slot without renewal.
    pub lease_ms: u64,
    /// Credits charged from the account's wallet, atomically with the
    /// windows; `None` for an endpoint without credits.
    pub credits: Option<CreditAsk>,
    /// Which of `windows` are the API key's own.
    pub key: Option<KeyScope<'a>>,
}

/// The store's verdict on an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every window incremented, the request recorded as in flight.
    Admitted,
    /// Window `index` (into the request's windows) has no room: nothing written.
    WindowFull { index: usize },
    /// All slots taken: nothing written.
    ConcurrencyFull,
    /// The request id is already in flight: nothing written.
    Duplicate,
    /// Credits were asked and the account's wallet is not loaded: nothing
    /// written (load it with [`CounterStore::wallet_init`], then retry).
    NoWallet,
    /// The balance is below the credit threshold: nothing written.
    /// [`AttemptOutcome::credits`] carries the balance.
    NoCredits,
}

/// The store's answer to an attempt: its verdict plus what it saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptOutcome {
    pub verdict: Verdict,
    /// Per window of the request, the units used in the current window
    /// (after the increment when admitted).
    pub used: Vec<u64>,
    /// Live in-flight requests for (account, endpoint), including this one
    /// when admitted.
    pub in_flight: u32,
    /// With credits asked: the balance after the charge and its draws when
    /// admitted, the balance (no draws) when refused for credits.
    pub credits: Option<Charged>,
}

/// Settlement of one window at the end of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    pub len: WindowLen,
    pub unit: Unit,
    /// Index ([`WindowLen::index`]) of the window the start amount was
    /// deducted from.
    pub admitted_index: u64,
    /// Start amount deducted at admission.
    pub reserved: u64,
    /// Units actually used. `actual - reserved` is added to the current
    /// window when positive; when negative, it is given back to the
    /// admission window (if that is still alive), never below 0.
    pub actual: u64,
}

/// What a store is asked to do atomically at the end of a request.
#[derive(Debug, Clone)]
pub struct EndRequest<'a> {
    pub request_id: &'a str,
    pub account: &'a str,
    pub endpoint: &'a str,
    pub now_ms: u64,
    /// Only windows whose unit was measured; may be empty (release only).
    pub settlements: &'a [Settlement],
    /// Credits settled with the windows (applied only when the record was
    /// there, like the settlements).
    pub credits: EndCredits,
    /// The request's usage record, appended to the account's outbox with
    /// the settlement (only when the record was there: once per request).
    /// Its `credits` are the admission's; the store adds what the per-unit
    /// charge took.
    pub usage: Option<&'a crate::catalog::UsageEvent>,
    /// Which of `settlements` are the API key's own windows.
    pub key: Option<KeyScope<'a>>,
    /// What the admission's credit charge drew, as the attempt answered
    /// (the store has it too, until this end: given, it need not be read
    /// back). `None`: not known here.
    pub admission: Option<&'a [Draw]>,
}

/// Read-only look at the counters of (account, endpoint).
#[derive(Debug, Clone)]
pub struct UsageRequest<'a> {
    pub account: &'a str,
    pub endpoint: &'a str,
    pub now_ms: u64,
    pub windows: &'a [Window],
    /// Which of `windows` are the API key's own.
    pub key: Option<KeyScope<'a>>,
}

/// The answer to a [`UsageRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    /// Units used in the current window, per requested window.
    pub used: Vec<u64>,
    /// Live in-flight requests.
    pub in_flight: u32,
}

/// Extend a live request's lease.
#[derive(Debug, Clone)]
pub struct RenewRequest<'a> {
    pub request_id: &'a str,
    pub account: &'a str,
    pub endpoint: &'a str,
    pub now_ms: u64,
    pub lease_ms: u64,
}

/// Where counters live. Both implementations (in-process and Redis) pass the
/// same conformance suite; a behaviour difference between them is a bug.
///
/// Every operation is atomic with respect to every other operation on the
/// same (account, endpoint).
pub trait CounterStore: Send + Sync + 'static {
    /// Admit or deny, all or nothing: on anything but [`Verdict::Admitted`]
    /// no counter changes. Admit only if for every window
    /// `used + max(amount, 1) <= limit`, the request id is not in flight, and
    /// (with `max_concurrent > 0`) fewer than `max_concurrent` requests are.
    /// Only live records (expiry > now) count; an expired record of the
    /// same id is replaced by the admission.
    fn attempt(
        &self,
        req: &AttemptRequest<'_>,
    ) -> impl Future<Output = Result<AttemptOutcome, StoreError>> + Send;

    /// Remove the request from the in-flight set and, only if its record
    /// was there — live, or expired less than [`SETTLE_GRACE_MS`] ago —
    /// apply the settlements. Returns whether the record was there (so
    /// whether this end settled it: a second end, or the end of an unknown
    /// id, changes nothing and returns `false`).
    fn end(&self, req: &EndRequest<'_>) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Current usage, without changing anything.
    fn usage(
        &self,
        req: &UsageRequest<'_>,
    ) -> impl Future<Output = Result<Usage, StoreError>> + Send;

    /// Push a live request's lease to `now + lease_ms`. Returns whether it
    /// was still in flight.
    fn renew(
        &self,
        req: &RenewRequest<'_>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Load the account's wallet from a catalog snapshot, unless it is
    /// loaded already (then nothing changes), its outbox is not empty
    /// ([`WalletInit::Pending`]) or the snapshot is older than the last
    /// invalidation ([`WalletInit::Stale`]).
    fn wallet_init(
        &self,
        account: &str,
        snapshot: &WalletSnapshot,
    ) -> impl Future<Output = Result<WalletInit, StoreError>> + Send;

    /// The catalog changed the account's credits at `version`: drop a
    /// wallet loaded before it and refuse loads of older snapshots. `None`:
    /// drop the wallet whatever its version (a notification may have been
    /// missed).
    fn wallet_invalidate(
        &self,
        account: &str,
        version: Option<u64>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The wallet's balance at `now_ms`; `None` when not loaded.
    fn wallet_balance(
        &self,
        account: &str,
        now_ms: u64,
    ) -> impl Future<Output = Result<Option<u64>, StoreError>> + Send;

    /// Up to `max` of the account's outbox entries, oldest first.
    fn outbox_read(
        &self,
        account: &str,
        max: usize,
    ) -> impl Future<Output = Result<Vec<OutboxItem>, StoreError>> + Send;

    /// Remove entries the catalog has recorded: the oldest entries, as
    /// [`CounterStore::outbox_read`] returned them (the Redis store drops
    /// everything up to the newest of `ids`). An entry may hold several
    /// items (a request's per-unit charge and its usage record): they share
    /// its id.
    fn outbox_ack(
        &self,
        account: &str,
        ids: &[String],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// How many times the account's outbox was acknowledged (recently): a
    /// wallet load reads it before the catalog and passes it in the
    /// snapshot, and [`CounterStore::wallet_init`] refuses the snapshot
    /// ([`WalletInit::Pending`]) if an acknowledgement came in between —
    /// the catalog may have recorded that batch after it was read.
    fn outbox_acks(&self, account: &str) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Accounts whose outbox is not empty (for recovery after a restart:
    /// entries another gateway wrote and did not flush).
    fn outbox_accounts(&self) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// Accounts with a wallet.
    fn wallet_accounts(&self) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// Say that gateway `instance` is alive for `ttl_ms`.
    fn heartbeat(
        &self,
        instance: &str,
        ttl_ms: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Whether gateway `instance` said it is alive within its last TTL.
    fn instance_alive(
        &self,
        instance: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// The account's admissions whose end has not come.
    fn unended_admissions(
        &self,
        account: &str,
    ) -> impl Future<Output = Result<Vec<Unended>, StoreError>> + Send;

    /// Refund an unended admission whose lease has run out (its gateway
    /// died): give its draws back, drop its record, write the refund to
    /// the outbox. Returns whether it did (a live one is left alone).
    fn reap(
        &self,
        account: &str,
        admission: &Unended,
        now_ms: u64,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Clear the counters of the current window of each of `windows` for
    /// (account, endpoint) (`limits reset`): the next attempt counts from
    /// zero. In-flight requests keep their concurrency slots; one that
    /// ends later settles against the cleared counter (never below zero).
    /// With `key`, the windows are that API key's own (key-level limits).
    fn reset_windows(
        &self,
        account: &str,
        key: Option<&str>,
        endpoint: &str,
        windows: &[Window],
        now_ms: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// Reset `account`'s current window counters on every endpoint of `plan`,
/// or only on `endpoint` (`plangate limits reset`, `POST
/// /admin/accounts/{id}/limits/reset`), and those of the account's keys
/// with plans of their own (`keys`: key id and its plan) on the same
/// endpoints. Returns the endpoints reset; `Ok(None)` when `endpoint` is
/// not one of the plan's.
pub async fn reset_account_windows<S: CounterStore>(
    store: &S,
    plan: &crate::plans::Plan,
    account: &str,
    keys: &[(String, Arc<crate::plans::Plan>)],
    endpoint: Option<&str>,
    now_ms: u64,
) -> Result<Option<Vec<String>>, StoreError> {
    let mut reset = Vec::new();
    for (id, policy) in &plan.endpoints {
        if endpoint.is_some_and(|e| e != id) {
            continue;
        }
        store
            .reset_windows(account, None, id, &policy.windows, now_ms)
            .await?;
        for (key, key_plan) in keys {
            if let Some(own) = key_plan.policy(id) {
                store
                    .reset_windows(account, Some(key), id, &own.windows, now_ms)
                    .await?;
            }
        }
        reset.push(id.clone());
    }
    Ok((endpoint.is_none() || !reset.is_empty()).then_some(reset))
}

/// A counter store chosen at runtime (configuration), dispatched statically.
#[derive(Debug)]
pub enum AnyStore {
    /// In-process counters (one gateway instance).
    Memory(memory::MemoryStore),
    /// Shared counters in Redis (any number of instances). Boxed: the
    /// store is several times the size of the in-process one.
    Redis(Box<redis::RedisStore>),
}

impl AnyStore {
    /// Check that the store answers (for readiness probes); the in-process
    /// store always does.
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            AnyStore::Memory(_) => Ok(()),
            AnyStore::Redis(s) => s.ping().await,
        }
    }
}

impl From<memory::MemoryStore> for AnyStore {
    fn from(s: memory::MemoryStore) -> Self {
        AnyStore::Memory(s)
    }
}

impl From<redis::RedisStore> for AnyStore {
    fn from(s: redis::RedisStore) -> Self {
        AnyStore::Redis(Box::new(s))
    }
}

// The Redis futures are boxed: redis-rs' script invocation state is several
// kilobytes, and without the box every future that awaits the store (the
// whole request handler) would carry that size inline and memcpy it on each
// move, even with the in-process store. One allocation per Redis round trip
// is cheap next to the round trip; the in-process path allocates nothing.
impl CounterStore for AnyStore {
    async fn attempt(&self, req: &AttemptRequest<'_>) -> Result<AttemptOutcome, StoreError> {
        match self {
            AnyStore::Memory(s) => s.attempt(req).await,
            AnyStore::Redis(s) => Box::pin(s.attempt(req)).await,
        }
    }

    async fn end(&self, req: &EndRequest<'_>) -> Result<bool, StoreError> {
        match self {
            AnyStore::Memory(s) => s.end(req).await,
            AnyStore::Redis(s) => Box::pin(s.end(req)).await,
        }
    }

    async fn usage(&self, req: &UsageRequest<'_>) -> Result<Usage, StoreError> {
        match self {
            AnyStore::Memory(s) => s.usage(req).await,
            AnyStore::Redis(s) => Box::pin(s.usage(req)).await,
        }
    }

    async fn renew(&self, req: &RenewRequest<'_>) -> Result<bool, StoreError> {
        match self {
            AnyStore::Memory(s) => s.renew(req).await,
            AnyStore::Redis(s) => Box::pin(s.renew(req)).await,
        }
    }

    async fn wallet_init(
        &self,
        account: &str,
        snapshot: &WalletSnapshot,
    ) -> Result<WalletInit, StoreError> {
        match self {
            AnyStore::Memory(s) => s.wallet_init(account, snapshot).await,
            AnyStore::Redis(s) => Box::pin(s.wallet_init(account, snapshot)).await,
        }
    }

    async fn wallet_invalidate(
        &self,
        account: &str,
        version: Option<u64>,
    ) -> Result<(), StoreError> {
        match self {
            AnyStore::Memory(s) => s.wallet_invalidate(account, version).await,
            AnyStore::Redis(s) => Box::pin(s.wallet_invalidate(account, version)).await,
        }
    }

    async fn wallet_balance(&self, account: &str, now_ms: u64) -> Result<Option<u64>, StoreError> {
        match self {
            AnyStore::Memory(s) => s.wallet_balance(account, now_ms).await,
            AnyStore::Redis(s) => Box::pin(s.wallet_balance(account, now_ms)).await,
        }
    }

    async fn outbox_read(&self, account: &str, max: usize) -> Result<Vec<OutboxItem>, StoreError> {
        match self {
            AnyStore::Memory(s) => s.outbox_read(account, max).await,
            AnyStore::Redis(s) => Box::pin(s.outbox_read(account, max)).await,
        }
    }

    async fn outbox_ack(&self, account: &str, ids: &[String]) -> Result<(), StoreError> {
        match self {
            AnyStore::Memory(s) => s.outbox_ack(account, ids).await,
            AnyStore::Redis(s) => Box::pin(s.outbox_ack(account, ids)).await,
        }
    }

    async fn outbox_acks(&self, account: &str) -> Result<u64, StoreError> {
        match self {
            AnyStore::Memory(s) => s.outbox_acks(account).await,
            AnyStore::Redis(s) => Box::pin(s.outbox_acks(account)).await,
        }
    }

    async fn outbox_accounts(&self) -> Result<Vec<String>, StoreError> {
        match self {
            AnyStore::Memory(s) => s.outbox_accounts().await,
            AnyStore::Redis(s) => Box::pin(s.outbox_accounts()).await,
        }
    }

    async fn wallet_accounts(&self) -> Result<Vec<String>, StoreError> {
        match self {
            AnyStore::Memory(s) => s.wallet_accounts().await,
            AnyStore::Redis(s) => Box::pin(s.wallet_accounts()).await,
        }
    }

    async fn heartbeat(&self, instance: &str, ttl_ms: u64) -> Result<(), StoreError> {
        match self {
            AnyStore::Memory(s) => s.heartbeat(instance, ttl_ms).await,
            AnyStore::Redis(s) => Box::pin(s.heartbeat(instance, ttl_ms)).await,
        }
    }

    async fn instance_alive(&self, instance: &str) -> Result<bool, StoreError> {
        match self {
            AnyStore::Memory(s) => s.instance_alive(instance).await,
            AnyStore::Redis(s) => Box::pin(s.instance_alive(instance)).await,
        }
    }

    async fn unended_admissions(&self, account: &str) -> Result<Vec<Unended>, StoreError> {
        match self {
            AnyStore::Memory(s) => s.unended_admissions(account).await,
            AnyStore::Redis(s) => Box::pin(s.unended_admissions(account)).await,
        }
    }

    async fn reap(
        &self,
        account: &str,
        admission: &Unended,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        match self {
            AnyStore::Memory(s) => s.reap(account, admission, now_ms).await,
            AnyStore::Redis(s) => Box::pin(s.reap(account, admission, now_ms)).await,
        }
    }

    async fn reset_windows(
        &self,
        account: &str,
        key: Option<&str>,
        endpoint: &str,
        windows: &[Window],
        now_ms: u64,
    ) -> Result<(), StoreError> {
        match self {
            AnyStore::Memory(s) => {
                s.reset_windows(account, key, endpoint, windows, now_ms)
                    .await
            }
            AnyStore::Redis(s) => {
                Box::pin(s.reset_windows(account, key, endpoint, windows, now_ms)).await
            }
        }
    }
}

/// Limit and remaining of the most constraining window of one unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitInfo {
    pub unit: Unit,
    pub limit: u64,
    pub remaining: u64,
    /// Milliseconds to the end of that window.
    pub reset_ms: u64,
    pub len: WindowLen,
}

/// Concurrency limit and free slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConcurrencyInfo {
    pub limit: u32,
    pub remaining: u32,
}

/// One window's state, for `/v1/limits`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowState {
    pub unit: Unit,
    pub len: WindowLen,
    pub limit: u64,
    pub used: u64,
    pub remaining: u64,
    pub reset_ms: u64,
    /// One of the API key's own windows (its plan's), not the account's.
    pub key: bool,
}

/// Where a caller stands: per unit the most constraining window, plus
/// concurrency. Returned on allow and deny alike.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RateLimitInfo {
    /// In the order units first appear in the policy.
    pub units: Vec<UnitInfo>,
    pub concurrent: Option<ConcurrencyInfo>,
    /// Every window of the policy, in policy order.
    pub windows: Vec<WindowState>,
}

impl RateLimitInfo {
    /// Build the info from per-window usage (pure).
    ///
    /// Per unit, the most constraining window is the one with the fewest
    /// remaining units; ties go to the later reset.
    pub fn from_usage(policy: &Policy, used: &[u64], in_flight: u32, now_ms: u64) -> Self {
        let windows: Vec<WindowState> = policy
            .windows
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let used = used.get(i).copied().unwrap_or(0);
                WindowState {
                    unit: w.unit.clone(),
                    len: w.len,
                    limit: w.limit,
                    used,
                    remaining: w.limit.saturating_sub(used),
                    reset_ms: w.len.reset_ms(now_ms),
                    key: policy.is_key_window(i),
                }
            })
            .collect();
        let mut units: Vec<UnitInfo> = Vec::new();
        for w in &windows {
            let candidate = UnitInfo {
                unit: w.unit.clone(),
                limit: w.limit,
                remaining: w.remaining,
                reset_ms: w.reset_ms,
                len: w.len,
            };
            match units.iter_mut().find(|u| u.unit == w.unit) {
                None => units.push(candidate),
                Some(best) => {
                    let tighter = candidate.remaining < best.remaining
                        || (candidate.remaining == best.remaining
                            && candidate.reset_ms > best.reset_ms);
                    if tighter {
                        *best = candidate;
                    }
                }
            }
        }
        let concurrent = (policy.max_concurrent > 0).then(|| ConcurrencyInfo {
            limit: policy.max_concurrent,
            remaining: policy.max_concurrent.saturating_sub(in_flight),
        });
        RateLimitInfo {
            units,
            concurrent,
            windows,
        }
    }

    /// The info of one unit, if the policy limits it.
    pub fn unit(&self, unit: &str) -> Option<&UnitInfo> {
        self.units.iter().find(|u| u.unit.as_str() == unit)
    }
}

/// Why an attempt was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// A window has no room for this request.
    Window {
        window: Window,
        used: u64,
        requested: u64,
        reset_ms: u64,
    },
    /// The start amount exceeds a window's limit: it can never fit.
    TooLarge { window: Window, requested: u64 },
    /// Every concurrency slot is taken.
    Concurrency { limit: u32 },
    /// The request id is already in flight.
    Duplicate,
    /// The account's credit balance is below what the endpoint needs.
    Credits { balance: u64, required: u64 },
}

/// The key scope of a policy combined with a key's plan ([`Policy::with_key`]).
pub fn key_scope(policy: &Policy) -> Option<KeyScope<'_>> {
    policy.key.as_ref().map(|k| KeyScope {
        id: &k.key_id,
        windows: k.count,
    })
}

/// Where a limiter gets wallets from and tells about outbox writes: the
/// catalog side of credits (`credits::Outbox`).
#[async_trait::async_trait]
pub trait WalletSource: Send + Sync + 'static {
    /// The account's unexpired blocks and credit version, from the catalog.
    async fn snapshot(&self, account: &str) -> Result<WalletSnapshot, StoreError>;
    /// Write the account's outbox to the catalog now.
    async fn flush(&self, account: &str) -> Result<(), StoreError>;
    /// The store appended to the account's outbox.
    fn wrote(&self, account: &str);
}

/// Loads of a wallet one attempt tries before giving up (each after a
/// flush or a fresh catalog read).
const WALLET_LOAD_TRIES: usize = 4;

/// Start amounts for each window of `policy`: the amount given for the
/// window's unit, 0 if none, except that `request` is 1 unless given.
pub fn start_amounts(policy: &Policy, start_units: &[(Unit, u64)]) -> Vec<WindowSpec> {
    policy
        .windows
        .iter()
        .map(|w| {
            let given = start_units
                .iter()
                .find(|(u, _)| *u == w.unit)
                .map(|(_, n)| *n);
            let amount = match given {
                Some(n) => n,
                None if w.unit.as_str() == crate::plans::REQUEST_UNIT => 1,
                None => 0,
            };
            WindowSpec {
                len: w.len,
                limit: w.limit,
                unit: w.unit.clone(),
                amount,
            }
        })
        .collect()
}

/// The first window a start amount can never fit into, if any.
pub fn too_large(specs: &[WindowSpec]) -> Option<usize> {
    specs.iter().position(|s| s.amount > s.limit)
}

/// What the limits of a shadowed policy would have refused, judged from
/// the counts the store returned after admitting without limits: the
/// same tests in the same order as an enforcing attempt (a start amount
/// above a window's limit, then a window without room for `max(amount, 1)`
/// before this request, then every slot taken before it).
///
/// Only the windows in shadow mode are judged (an enforced window that
/// had no room refused the request in the store): all of them when the
/// account's policy is `enforce: false`, else the key's windows of a key
/// plan with `enforce: false`.
fn shadow_denial(
    policy: &Policy,
    specs: &[WindowSpec],
    used: &[u64],
    in_flight: u32,
    now_ms: u64,
) -> Option<Denial> {
    let shadowed = |i: usize| !policy.enforces_window(i);
    if let Some(i) = (0..specs.len()).find(|&i| shadowed(i) && specs[i].amount > specs[i].limit) {
        return Some(Denial::TooLarge {
            window: policy.windows.get(i)?.clone(),
            requested: specs[i].amount,
        });
    }
    for (i, (spec, window)) in specs.iter().zip(&policy.windows).enumerate() {
        if !shadowed(i) {
            continue;
        }
        let before = used
            .get(i)
            .copied()
            .unwrap_or(0)
            .saturating_sub(spec.amount);
        if before.saturating_add(spec.amount.max(1)) > spec.limit {
            return Some(Denial::Window {
                window: window.clone(),
                used: before,
                requested: spec.amount,
                reset_ms: window.len.reset_ms(now_ms),
            });
        }
    }
    (!policy.enforce && policy.max_concurrent > 0 && in_flight > policy.max_concurrent).then_some(
        Denial::Concurrency {
            limit: policy.max_concurrent,
        },
    )
}

/// An admitted request: what its end needs to know. Plain data; see
/// [`Permit`] for the guard that guarantees the end happens.
#[derive(Debug, Clone)]
pub struct Ticket {
    pub request_id: Arc<str>,
    pub account: Arc<str>,
    pub endpoint: Arc<str>,
    pub policy: Arc<Policy>,
    /// Per window of the policy: the start amount deducted.
    pub reserved: Vec<u64>,
    pub admitted_ms: u64,
    /// The admission's credit charge, if the endpoint has credits.
    pub charged: Option<Charged>,
}

impl Ticket {
    /// Settlements for the measured units (units not measured stay as
    /// reserved), in policy order: the key's windows last.
    pub fn settlements(&self, final_units: &[(Unit, u64)]) -> Vec<Settlement> {
        self.policy
            .windows
            .iter()
            .zip(&self.reserved)
            .filter_map(|(w, &reserved)| {
                let actual = final_units
                    .iter()
                    .find(|(u, _)| *u == w.unit)
                    .map(|(_, n)| *n)?;
                Some(Settlement {
                    len: w.len,
                    unit: w.unit.clone(),
                    admitted_index: w.len.index(self.admitted_ms),
                    reserved,
                    actual,
                })
            })
            .collect()
    }

    fn lease_ms(&self) -> u64 {
        self.policy
            .concurrency_expiry_secs
            .saturating_mul(1000)
            .max(1)
    }
}

/// The result of an attempt.
#[derive(Debug)]
pub enum Attempt<S: CounterStore> {
    Admitted(Permit<S>, RateLimitInfo),
    Denied(Denial, RateLimitInfo),
}

/// The limiter: a counter store, a clock, a timeout per store call, and the
/// lease keeper that renews the concurrency leases of live permits.
pub struct Limiter<S> {
    store: S,
    clock: SharedClock,
    timeout: Duration,
    /// Settlements, releases and keeper passes run here, counted and
    /// bounded (see [`crate::background`]).
    background: Arc<Background>,
    /// Live permits whose leases are renewed (see [`Limiter::renew_due`]).
    keeper: Keeper,
    /// How often the keeper task runs a pass; `None`: no task.
    keeper_interval: Option<Duration>,
    /// Whether the keeper task has been spawned (at the first admission).
    keeper_started: AtomicBool,
    /// One pass at a time, so that a pass a caller runs finds every
    /// renewal of an earlier pass done.
    keeper_pass: tokio::sync::Mutex<()>,
    /// Where wallets come from; without one, attempts with credits fail.
    wallets: std::sync::OnceLock<Arc<dyn WalletSource>>,
    /// This limiter's id among the gateways sharing its store (random).
    instance: &'static str,
}

/// Marks a limiter's keeper task as gone when the task ends or is dropped.
struct KeeperGuard<S>(Weak<Limiter<S>>);

impl<S> Drop for KeeperGuard<S> {
    fn drop(&mut self) {
        if let Some(limiter) = self.0.upgrade() {
            limiter.keeper_started.store(false, Ordering::Release);
        }
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for Limiter<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("store", &self.store)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl<S: CounterStore> Limiter<S> {
    /// A limiter whose lease keeper runs a pass every
    /// [`DEFAULT_KEEPER_INTERVAL`] (in a task spawned at the first
    /// admission, on that admission's runtime).
    pub fn new(store: S, clock: SharedClock, timeout: Duration) -> Arc<Self> {
        Self::with_keeper_interval(store, clock, timeout, Some(DEFAULT_KEEPER_INTERVAL))
    }

    /// A limiter whose lease keeper runs a pass every `keeper_interval` of
    /// real time; with `None` there is no background task, and leases are
    /// renewed only by explicit [`Limiter::renew_due`] calls (tests that
    /// drive time with a `ManualClock`).
    pub fn with_keeper_interval(
        store: S,
        clock: SharedClock,
        timeout: Duration,
        keeper_interval: Option<Duration>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            clock,
            timeout,
            background: Arc::new(Background::default()),
            keeper: Keeper::default(),
            keeper_interval,
            keeper_started: AtomicBool::new(false),
            keeper_pass: tokio::sync::Mutex::new(()),
            wallets: std::sync::OnceLock::new(),
            // Leaked: one short string per limiter, referenced by every
            // credit admission it makes.
            instance: Box::leak(format!("{:016x}", rand::random::<u64>()).into_boxed_str()),
        })
    }

    /// This limiter's id among the gateways sharing its store.
    pub fn instance(&self) -> &'static str {
        self.instance
    }

    /// Set where wallets come from (once; later calls are ignored).
    pub fn set_wallet_source(&self, source: Arc<dyn WalletSource>) {
        let _ = self.wallets.set(source);
    }

    /// The wallet source, if set.
    pub fn wallet_source(&self) -> Option<&Arc<dyn WalletSource>> {
        self.wallets.get()
    }

    /// Load the account's wallet from the catalog (flushing its outbox
    /// first when the store says it must).
    pub async fn load_wallet(&self, account: &str) -> Result<(), StoreError> {
        let source = self
            .wallets
            .get()
            .ok_or_else(|| StoreError::Unavailable("credits: no wallet source".into()))?;
        for _ in 0..WALLET_LOAD_TRIES {
            let acks = self.timed(self.store.outbox_acks(account)).await?;
            let mut snapshot = source.snapshot(account).await?;
            snapshot.acks = acks;
            match self
                .timed(self.store.wallet_init(account, &snapshot))
                .await?
            {
                WalletInit::Loaded => return Ok(()),
                WalletInit::Pending => source.flush(account).await?,
                WalletInit::Stale => {}
            }
        }
        Err(StoreError::Unavailable(format!(
            "credits: the wallet of account {account:?} could not be loaded"
        )))
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    async fn timed<T>(
        &self,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        }
    }

    /// SPEC §4 Attempt for an already-resolved policy. One store round trip
    /// (two only for `TooLarge`, which reads usage to fill in the info).
    pub async fn attempt(
        self: &Arc<Self>,
        request_id: &str,
        account: &str,
        endpoint: &str,
        policy: &Arc<Policy>,
        start_units: &[(Unit, u64)],
    ) -> Result<Attempt<S>, StoreError> {
        let credits = policy.credits.as_ref().map(|c| CreditAsk {
            amount: c.per_request,
            threshold: c.admission_threshold(),
            instance: self.instance,
        });
        let mut tries = 0;
        loop {
            match self
                .attempt_once(request_id, account, endpoint, policy, start_units, credits)
                .await?
            {
                Err(()) if tries < WALLET_LOAD_TRIES => {
                    tries += 1;
                    self.load_wallet(account).await?;
                }
                Err(()) => {
                    return Err(StoreError::Unavailable(format!(
                        "credits: the wallet of account {account:?} keeps disappearing"
                    )))
                }
                Ok(attempt) => return Ok(attempt),
            }
        }
    }

    /// One attempt; `Err(())` when the wallet must be loaded first.
    async fn attempt_once(
        self: &Arc<Self>,
        request_id: &str,
        account: &str,
        endpoint: &str,
        policy: &Arc<Policy>,
        start_units: &[(Unit, u64)],
        credits: Option<CreditAsk>,
    ) -> Result<Result<Attempt<S>, ()>, StoreError> {
        let now_ms = self.clock.now_ms();
        let specs = start_amounts(policy, start_units);
        // Shadow mode (`enforce: false`): the store counts without limits,
        // and what the limits would have decided is worked out from the
        // counts it returns (`shadow_denial`).
        // With a key plan in shadow mode, only the key's windows are.
        let shadow = policy.shadows_any();
        let unlimited: Vec<WindowSpec>;
        let store_specs: &[WindowSpec] = if shadow {
            unlimited = specs
                .iter()
                .enumerate()
                .map(|(i, s)| WindowSpec {
                    limit: if policy.enforces_window(i) {
                        s.limit
                    } else {
                        u64::MAX
                    },
                    ..s.clone()
                })
                .collect();
            &unlimited
        } else {
            &specs
        };
        let enforced_too_large = (0..specs.len())
            .find(|&i| policy.enforces_window(i) && specs[i].amount > specs[i].limit);
        if let Some(i) = enforced_too_large {
            let info = self.info(account, endpoint, policy).await?;
            let denial = Denial::TooLarge {
                window: policy.windows[i].clone(),
                requested: specs[i].amount,
            };
            return Ok(Ok(Attempt::Denied(denial, info)));
        }
        let req = AttemptRequest {
            request_id,
            account,
            endpoint,
            now_ms,
            windows: store_specs,
            max_concurrent: if policy.enforce {
                policy.max_concurrent
            } else {
                0
            },
            lease_ms: policy.concurrency_expiry_secs.saturating_mul(1000).max(1),
            credits,
            key: key_scope(policy),
        };
        let ticket = || Ticket {
            request_id: Arc::from(request_id),
            account: Arc::from(account),
            endpoint: Arc::from(endpoint),
            policy: policy.clone(),
            reserved: specs.iter().map(|s| s.amount).collect(),
            admitted_ms: now_ms,
            charged: None,
        };
        let outcome = match self.timed(self.store.attempt(&req)).await {
            Ok(outcome) => outcome,
            Err(e @ StoreError::Timeout(_)) => {
                // The store may still run the attempt after we gave up on
                // it, taking a slot no permit will release: release it once
                // the store answers (ending an unknown id changes nothing).
                let mut ticket = ticket();
                // It may have charged credits too: the release gives them back.
                ticket.charged = credits.map(|_| Charged::default());
                self.end_in_background(Job::Release, ticket, Ending::release());
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let info = RateLimitInfo::from_usage(policy, &outcome.used, outcome.in_flight, now_ms);
        let denial = match outcome.verdict {
            Verdict::Admitted => {
                self.start_keeper();
                let mut ticket = ticket();
                if credits.is_some() {
                    if let Some(source) = self.wallets.get() {
                        source.wrote(account);
                    }
                    ticket.charged = Some(outcome.credits.unwrap_or_default());
                }
                let mut permit = Permit::new(self.clone(), ticket);
                if shadow {
                    permit.would_deny =
                        shadow_denial(policy, &specs, &outcome.used, outcome.in_flight, now_ms)
                            .map(Box::new);
                }
                return Ok(Ok(Attempt::Admitted(permit, info)));
            }
            Verdict::NoWallet => return Ok(Err(())),
            Verdict::NoCredits => Denial::Credits {
                balance: outcome.credits.map_or(0, |c| c.balance),
                required: credits.map_or(0, |c| c.threshold),
            },
            Verdict::WindowFull { index } => {
                let window = policy.windows.get(index).cloned().ok_or_else(|| {
                    StoreError::Protocol(format!(
                        "store named window {index}, policy has {}",
                        policy.windows.len()
                    ))
                })?;
                Denial::Window {
                    reset_ms: window.len.reset_ms(now_ms),
                    used: outcome.used.get(index).copied().unwrap_or(0),
                    requested: specs[index].amount,
                    window,
                }
            }
            Verdict::ConcurrencyFull => Denial::Concurrency {
                limit: policy.max_concurrent,
            },
            Verdict::Duplicate => Denial::Duplicate,
        };
        Ok(Ok(Attempt::Denied(denial, info)))
    }

    /// SPEC §4 End for a ticket. Harmless when repeated.
    pub async fn end(
        &self,
        ticket: &Ticket,
        final_units: &[(Unit, u64)],
    ) -> Result<bool, StoreError> {
        self.end_with(ticket, final_units, EndCredits::default(), None)
            .await
    }

    /// SPEC §4 End, settling credits too: a per-unit charge, or the refund
    /// of the admission charge. Harmless when repeated (only the first end
    /// finds the request's record and settles).
    pub async fn end_with(
        &self,
        ticket: &Ticket,
        final_units: &[(Unit, u64)],
        credits: EndCredits,
        usage: Option<&crate::catalog::UsageEvent>,
    ) -> Result<bool, StoreError> {
        let settlements = ticket.settlements(final_units);
        // The key's windows come last in the policy, so their settlements
        // come last too.
        let key = key_scope(&ticket.policy).map(|k| KeyScope {
            windows: ticket
                .policy
                .windows
                .iter()
                .enumerate()
                .filter(|(i, w)| {
                    ticket.policy.is_key_window(*i) && final_units.iter().any(|(u, _)| *u == w.unit)
                })
                .count(),
            ..k
        });
        let req = EndRequest {
            request_id: &ticket.request_id,
            account: &ticket.account,
            endpoint: &ticket.endpoint,
            now_ms: self.clock.now_ms(),
            settlements: &settlements,
            credits,
            usage,
            key,
            admission: ticket.charged.as_ref().map(|c| c.draws.as_slice()),
        };
        let settled = self.timed(self.store.end(&req)).await?;
        if settled && (!credits.is_empty() || usage.is_some()) {
            if let Some(source) = self.wallets.get() {
                source.wrote(&ticket.account);
            }
        }
        Ok(settled)
    }

    /// End a ticket in the background, retrying with backoff while the
    /// store fails: for as long as the slot could still be live (its
    /// lease), after which the store has expired it anyway — or, when
    /// credits are to be settled, for as long as the store keeps the
    /// record ([`SETTLE_GRACE_MS`]), so that the charge is not lost.
    /// End `ticket` as a background job, retried (see [`Limiter::end_loop`]).
    /// At the executor's capacity (a long store outage under heavy
    /// traffic) the end is refused: its slot is left to its lease.
    fn end_in_background(self: &Arc<Self>, job: Job, ticket: Ticket, ending: Ending) {
        let request_id = ticket.request_id.clone();
        let limiter = self.clone();
        let spawned = self.background.spawn(
            job,
            Box::pin(async move {
                limiter.end_loop(job, &ticket, &ending).await;
            }),
        );
        if !spawned {
            tracing::warn!(request_id = %request_id, job = job.as_str(), "too many requests awaiting their end; this one expires with its lease");
        }
    }

    /// The executor of this limiter's background work (also the proxy's
    /// settlements and the outbox writer's batches).
    pub fn background(&self) -> &Arc<Background> {
        &self.background
    }

    /// Background ends running or waiting to retry.
    pub fn ends_pending(&self) -> usize {
        self.background.pending(Job::Settle) + self.background.pending(Job::Release)
    }

    async fn end_loop(&self, job: Job, ticket: &Ticket, ending: &Ending) {
        let keep_trying = if ticket.charged.is_some() {
            SETTLE_GRACE_MS
        } else {
            ticket.lease_ms()
        };
        let give_up = tokio::time::Instant::now() + Duration::from_millis(keep_trying);
        let mut backoff = Duration::from_millis(50);
        loop {
            match self
                .end_with(
                    ticket,
                    &ending.units,
                    ending.credits(ticket),
                    ending.usage.as_ref(),
                )
                .await
            {
                Ok(_) => return,
                Err(e) if tokio::time::Instant::now() + backoff >= give_up => {
                    self.background.failed(job);
                    tracing::error!(request_id = %ticket.request_id, error = %e, "ending a request failed for good; its slot expires with its lease, its settlement is lost");
                    return;
                }
                Err(_) => {
                    self.background.failed(job);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// Extend a live request's slot by its policy's `concurrency_expiry`.
    pub async fn renew(&self, ticket: &Ticket) -> Result<bool, StoreError> {
        let req = RenewRequest {
            request_id: &ticket.request_id,
            account: &ticket.account,
            endpoint: &ticket.endpoint,
            now_ms: self.clock.now_ms(),
            lease_ms: ticket.lease_ms(),
        };
        self.timed(self.store.renew(&req)).await
    }

    /// Spawn the keeper task, once, if this limiter has one. It holds only
    /// a `Weak`: it ends at its first tick after the limiter is dropped
    /// (or with its runtime).
    fn start_keeper(self: &Arc<Self>) {
        let Some(every) = self.keeper_interval else {
            return;
        };
        if self.keeper_started.load(Ordering::Relaxed)
            || self.keeper_started.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.keeper_started.store(false, Ordering::Release);
            return;
        };
        let weak: Weak<Self> = Arc::downgrade(self);
        // Dropped with the task, even one never polled (its runtime shut
        // down while the limiter lives on): the next admission starts a
        // new one.
        let restart = KeeperGuard(weak.clone());
        rt.spawn(async move {
            let _restart = restart;
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(limiter) = weak.upgrade() else {
                    return;
                };
                limiter.renew_due().await;
            }
        });
    }

    /// One pass of the lease keeper: renew the lease of every live permit
    /// that is due, by the limiter's clock (half a lease after admission or
    /// after its last renewal). The background task calls this every
    /// keeper interval; tests call it after moving a `ManualClock`. A pass
    /// waits for one already running, so when it returns, every renewal
    /// due by the clock at its start has been tried.
    ///
    /// A renewal that fails is tried again an eighth of a lease later; a
    /// lease the store no longer holds live (it ran out, e.g. during a
    /// store outage) is no longer kept — the request still settles when it
    /// ends, within [`SETTLE_GRACE_MS`].
    pub async fn renew_due(&self) {
        let _pass = self.keeper_pass.lock().await;
        let now_ms = self.clock.now_ms();
        let due = self.keeper.due(now_ms);
        if due.is_empty() {
            return;
        }
        let failed = AtomicUsize::new(0);
        let pass = futures_util::stream::iter(due).for_each_concurrent(
            KEEPER_CONCURRENCY,
            |lease| async {
                if let Err(e) = self.renew_kept(lease, now_ms).await {
                    self.background.failed(Job::Renew);
                    if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                        tracing::warn!(error = %e, "renewing a concurrency lease failed; retrying");
                    }
                }
            },
        );
        self.background.run(Job::Renew, pass).await;
        let failed = failed.into_inner();
        if failed > 1 {
            tracing::warn!(failed, "renewing concurrency leases failed; retrying");
        }
    }

    async fn renew_kept(&self, lease: DueLease, now_ms: u64) -> Result<(), StoreError> {
        let req = RenewRequest {
            request_id: &lease.request_id,
            account: &lease.account,
            endpoint: &lease.endpoint,
            now_ms,
            lease_ms: lease.lease_ms,
        };
        match self.timed(self.store.renew(&req)).await {
            Ok(true) => {
                self.keeper
                    .reschedule(lease.key, due_after(now_ms, lease.lease_ms));
                Ok(())
            }
            Ok(false) => {
                // Ended meanwhile (then already deregistered), or expired.
                self.keeper.deregister(lease.key);
                Ok(())
            }
            Err(e) => {
                self.keeper
                    .reschedule(lease.key, retry_after(now_ms, lease.lease_ms));
                Err(e)
            }
        }
    }

    /// Number of live permits whose leases the keeper renews.
    pub fn leases_kept(&self) -> usize {
        self.keeper.len()
    }

    /// SPEC §4 Info: where (account, endpoint) stands, without changing it.
    pub async fn info(
        &self,
        account: &str,
        endpoint: &str,
        policy: &Policy,
    ) -> Result<RateLimitInfo, StoreError> {
        let now_ms = self.clock.now_ms();
        let req = UsageRequest {
            account,
            endpoint,
            now_ms,
            windows: &policy.windows,
            key: key_scope(policy),
        };
        let usage = self.timed(self.store.usage(&req)).await?;
        Ok(RateLimitInfo::from_usage(
            policy,
            &usage.used,
            usage.in_flight,
            now_ms,
        ))
    }
}

/// How a ticket is to be ended: the measured units and the credits.
#[derive(Debug, Clone, Default)]
pub struct Ending {
    pub units: Vec<(Unit, u64)>,
    /// The per-unit credit charge.
    pub charge: u64,
    /// Give back the admission charge (nothing was served).
    pub refund: bool,
    /// The request's usage record.
    pub usage: Option<crate::catalog::UsageEvent>,
}

impl Ending {
    /// A release: no units, the admission charge given back.
    pub fn release() -> Self {
        Ending {
            units: Vec::new(),
            charge: 0,
            refund: true,
            usage: None,
        }
    }

    fn credits(&self, ticket: &Ticket) -> EndCredits {
        if ticket.charged.is_none() {
            return EndCredits::default();
        }
        EndCredits {
            charge: if self.refund { 0 } else { self.charge },
            refund: self.refund,
            admitted: true,
        }
    }
}

/// An admitted request. Dropping it without [`Permit::end`] still ends the
/// request (in a background task, with no final units), so no path — error,
/// panic, client disconnect — leaks a concurrency slot.
///
/// While it lives, the limiter's lease keeper renews its concurrency lease
/// (see [`Limiter::renew_due`]), however long the request waits for the
/// upstream or for the client to read; ending, handing over or dropping
/// the permit stops that.
#[derive(Debug)]
pub struct Permit<S: CounterStore> {
    limiter: Arc<Limiter<S>>,
    ticket: Ticket,
    ended: AtomicBool,
    /// Its entry in the limiter's keeper, until ended, handed over or dropped.
    lease: Option<LeaseKey>,
    /// The end that failed, to retry on drop; `None`: a release. Boxed: a
    /// usage record is large, and permits travel in every response body.
    ending: Option<Box<Ending>>,
    /// Shadow mode: what the policy's limits would have refused.
    would_deny: Option<Box<Denial>>,
}

impl<S: CounterStore> Permit<S> {
    fn new(limiter: Arc<Limiter<S>>, ticket: Ticket) -> Self {
        let lease = Some(limiter.keeper.register(&ticket, ticket.lease_ms()));
        Self {
            limiter,
            ticket,
            ended: AtomicBool::new(false),
            lease,
            ending: None,
            would_deny: None,
        }
    }

    /// For a policy with `enforce: false`: the refusal its limits would
    /// have given this request, which was admitted anyway.
    pub fn would_deny(&self) -> Option<&Denial> {
        self.would_deny.as_deref()
    }

    /// Stop the keeper renewing this permit's lease.
    fn unkeep(&mut self) {
        if let Some(key) = self.lease.take() {
            self.limiter.keeper.deregister(key);
        }
    }

    pub fn ticket(&self) -> &Ticket {
        &self.ticket
    }

    /// End the request with the measured units.
    ///
    /// The permit counts as ended only once the store confirmed it: if the
    /// call fails, or its future is dropped mid-way, the permit's `Drop`
    /// still releases the slot (ending twice is harmless).
    pub async fn end(self, final_units: &[(Unit, u64)]) -> Result<bool, StoreError> {
        self.end_as(Ending {
            units: final_units.to_vec(),
            ..Ending::default()
        })
        .await
    }

    /// End the request as `ending` says (units and credits). If the store
    /// fails, the end is retried in the background (see
    /// [`Limiter::end_in_background`]), the same settlement and charge included.
    pub async fn end_as(mut self, ending: Ending) -> Result<bool, StoreError> {
        self.unkeep();
        let result = self
            .limiter
            .end_with(
                &self.ticket,
                &ending.units,
                ending.credits(&self.ticket),
                ending.usage.as_ref(),
            )
            .await;
        if result.is_ok() {
            self.ended.store(true, Ordering::SeqCst);
        } else {
            self.ending = Some(Box::new(ending));
        }
        result
    }

    /// Renew the lease now (the keeper does it by itself; this is for
    /// callers and tests that want it at once).
    pub async fn renew(&self) -> Result<bool, StoreError> {
        self.limiter.renew(&self.ticket).await
    }

    /// Give up responsibility for ending: the caller ends the ticket itself.
    /// The keeper no longer renews its lease: the slot lasts until the
    /// caller ends it or its lease runs out.
    pub fn into_ticket(mut self) -> Ticket {
        self.unkeep();
        self.ended.store(true, Ordering::SeqCst);
        self.ticket.clone()
    }
}

impl<S: CounterStore> Drop for Permit<S> {
    fn drop(&mut self) {
        self.unkeep();
        if self.ended.load(Ordering::SeqCst) {
            return;
        }
        let limiter = self.limiter.clone();
        let ticket = self.ticket.clone();
        // A settlement whose end failed is retried as one; a permit dropped
        // without an end is released.
        let (job, ending) = match self.ending.take() {
            Some(ending) => (Job::Settle, *ending),
            None => (Job::Release, Ending::release()),
        };
        match tokio::runtime::Handle::try_current() {
            Ok(_) => {
                // Retried: under overload a single end can time out, and a
                // slot left behind would refuse requests until its lease ends.
                limiter.end_in_background(job, ticket, ending);
            }
            Err(_) => {
                tracing::warn!(request_id = %ticket.request_id, "permit dropped outside a runtime; its slot expires with its lease");
            }
        }
    }
}
