//! Threshold notifications (plans' `notify:`), delivered as signed webhooks
//! to `[notify] url`.
//!
//! **Detection** is level-triggered on what the request path already has:
//! after an admission, [`Notifier::observe`] compares each window's count
//! (the store returns it with the verdict) and the wallet's balance with the
//! plan's thresholds — integer comparisons, no I/O. A threshold that is
//! reached is due; its **dedupe key** names what it is about:
//!
//! | kind | dedupe key | once per |
//! |---|---|---|
//! | `window` | `w|<account>|<endpoint>|<unit>|<len>|<window start ms>|<percent>` | window |
//! | `balance` | `b|<account>|<blocks tag>|<percent>` | set of unexpired quota blocks (a grant re-arms) |
//! | `expiry` | `x|<block id>|<within secs>` | block |
//!
//! A key is queued at most once per process (a local set, forgotten when
//! its window ends) and at most once in all (the catalog's unique dedupe
//! key: Postgres `ON CONFLICT DO NOTHING`, or the in-process map), so many
//! requests crossing at once, on many gateways, queue one notification.
//! Being level-triggered, a threshold reached by a settlement (tokens
//! counted at the end of a request) is seen by the account's next
//! admission, and a queueing that failed (catalog down) is tried again by
//! the next request that sees the threshold.
//!
//! **Expiry** (`expires_within`) is found by a periodic scan of the
//! catalog's quota blocks ([`Notifier::scan_expiring`]).
//!
//! **Delivery**: the catalog is the durable queue (`pending` rows survive a
//! restart and are picked up by any gateway). A worker claims due rows
//! (leased, so two gateways never post the same one at once), POSTs each
//! as a `Job::Deliver` of the [`Background`] executor, and records the
//! attempt: delivered on 2xx, else retried after `backoff * 2^(attempt-1)`
//! (at most `max_backoff`), failed after `max_attempts`. Delivery is at
//! least once (a gateway that dies mid-post leaves the row to be claimed
//! again after its lease): receivers drop repeats by the notification id.
//!
//! **Signature** (Stripe's scheme): `x-plangate-timestamp: <unix seconds>`
//! and `x-plangate-signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use parking_lot::Mutex;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::background::{Background, Job};
use crate::catalog::cache::CatalogCache;
use crate::catalog::{
    Attempted, Catalog, CatalogResult, Invalidation, NewNotification, Notification,
};
use crate::clock::SharedClock;
use crate::config::NotifyConfig;
use crate::limiter::RateLimitInfo;
use crate::plans::{NotifyRule, Plan};

/// The header carrying the signing time (Unix seconds).
pub const TIMESTAMP_HEADER: &str = "x-plangate-timestamp";
/// The header carrying the signature (`v1=<hex>`).
pub const SIGNATURE_HEADER: &str = "x-plangate-signature";
/// The header carrying the notification's id (also the body's `id`).
pub const ID_HEADER: &str = "x-plangate-notification-id";

/// Notifications one claim takes (and posts at once).
const CLAIM_BATCH: usize = 32;

/// Dedupe keys one process remembers; past it, expired ones are dropped
/// (and, if that is not enough, all: the catalog still dedupes).
const MAX_SEEN: usize = 100_000;

/// How long a balance key is remembered locally (the catalog dedupes
/// after that).
const BALANCE_SEEN_MS: u64 = 3_600_000;

/// How long an account's granted credits are used before they are read
/// again (invalidations drop them sooner).
const GRANTED_TTL_MS: u64 = 60_000;

/// Most bytes of a receiver's response body read (and dropped).
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Quota blocks one page of the expiry scan reads.
const SCAN_PAGE: usize = 500;

/// HMAC-SHA256 (RFC 2104) over `sha2`.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut ipad = [0x36u8; BLOCK];
    let mut opad = [0x5cu8; BLOCK];
    for i in 0..BLOCK {
        ipad[i] ^= k[i];
        opad[i] ^= k[i];
    }
    let inner = Sha256::new()
        .chain_update(ipad)
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(opad)
        .chain_update(inner)
        .finalize()
        .into()
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// The signature header's value for `body` signed at `timestamp` (Unix
/// seconds): `v1=` and the hex HMAC-SHA256 of `"<timestamp>.<body>"`.
pub fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let mut message = Vec::with_capacity(body.len() + 21);
    message.extend_from_slice(timestamp.to_string().as_bytes());
    message.push(b'.');
    message.extend_from_slice(body);
    format!("v1={}", hex(&hmac_sha256(secret, &message)))
}

/// Whether `header` (an `x-plangate-signature` value) signs `body` at
/// `timestamp` with `secret`, compared in constant time: what a receiver
/// does (it should also refuse timestamps too far from its own clock).
pub fn verify(secret: &[u8], timestamp: u64, body: &[u8], header: &str) -> bool {
    use subtle::ConstantTimeEq as _;
    let want = signature(secret, timestamp, body);
    header
        .split(',')
        .map(str::trim)
        .any(|sig| sig.len() == want.len() && bool::from(sig.as_bytes().ct_eq(want.as_bytes())))
}

/// The webhook's `type` for a notification kind.
pub fn event_type(kind: &str) -> &'static str {
    match kind {
        "window" => "window.threshold",
        "balance" => "balance.threshold",
        _ => "block.expiring",
    }
}

fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// The body POSTed for `n` (bytes as signed).
pub fn webhook_body(n: &Notification) -> Vec<u8> {
    let body = json!({
        "id": n.id,
        "type": event_type(&n.kind),
        "created_at": n.created_at.map(rfc3339),
        "account": n.account_id,
        "data": n.data,
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

/// An account's credits granted in its unexpired blocks, as last read.
#[derive(Debug, Clone)]
struct Granted {
    total: u64,
    /// Names the set of blocks (a new grant or an expiry changes it).
    tag: String,
    loaded_ms: u64,
}

/// A balance an admission left, to be compared with the plan's balance
/// thresholds (again when the granted credits are (re)loaded).
#[derive(Debug, Clone)]
struct BalanceCheck {
    endpoint: String,
    plan: String,
    percents: Vec<u8>,
    balance: u64,
}

/// What this process knows of one account's granted credits.
#[derive(Debug, Default)]
struct GrantedEntry {
    /// Bumped by every invalidation: a load started before it is stale and
    /// its result dropped.
    generation: u64,
    loaded: Option<Granted>,
    loading: bool,
    /// The latest balance observed: checked again when a load completes,
    /// so that the last request before a threshold is not missed while the
    /// granted credits were being read.
    last: Option<BalanceCheck>,
}

/// Accounts whose granted credits one process keeps; past it, all are
/// forgotten (and read again as needed).
const MAX_GRANTED: usize = 100_000;

/// Counters shown on `/metrics`.
#[derive(Debug, Default)]
struct Counters {
    queued: AtomicU64,
    delivered: AtomicU64,
    retried: AtomicU64,
    failed: AtomicU64,
}

/// Detects thresholds, queues notifications and delivers them (see the
/// module documentation).
pub struct Notifier {
    config: NotifyConfig,
    catalog: Arc<dyn Catalog>,
    cache: Arc<CatalogCache>,
    clock: SharedClock,
    background: Arc<Background>,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// Dedupe keys queued (or found queued) by this process → when they
    /// may be forgotten (clock ms).
    seen: Mutex<HashMap<String, u64>>,
    /// Account → its granted credits.
    granted: Mutex<HashMap<String, GrantedEntry>>,
    /// Woken when a notification is queued.
    wake: Arc<tokio::sync::Notify>,
    /// One delivery pass at a time in this process.
    pass: tokio::sync::Mutex<()>,
    counters: Counters,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("url", &self.config.url)
            .finish_non_exhaustive()
    }
}

impl Notifier {
    /// A notifier posting to `config.url`; its background work runs on
    /// `background`. Nothing runs until [`Notifier::start`].
    pub fn new(
        config: NotifyConfig,
        catalog: Arc<dyn Catalog>,
        cache: Arc<CatalogCache>,
        clock: SharedClock,
        background: Arc<Background>,
    ) -> Result<Arc<Self>, String> {
        let tls = crate::upstream::client_tls_config(config.ca_file.as_deref())
            .map_err(|e| format!("[notify]: {e}"))?;
        let client =
            crate::upstream::https_client(tls, config.timeout, Duration::from_secs(30), usize::MAX);
        Ok(Arc::new(Self {
            config,
            catalog,
            cache,
            clock,
            background,
            client,
            seen: Mutex::new(HashMap::new()),
            granted: Mutex::new(HashMap::new()),
            wake: Arc::new(tokio::sync::Notify::new()),
            pass: tokio::sync::Mutex::new(()),
            counters: Counters::default(),
        }))
    }

    pub fn config(&self) -> &NotifyConfig {
        &self.config
    }

    /// Start the delivery worker (every `poll_interval`, and at once when
    /// something is queued here), the expiry scan (every `scan_interval`),
    /// the hourly retention pass and the invalidation listener. They end
    /// when the notifier is dropped.
    pub fn start(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let poll = self.config.poll_interval;
        let wake = self.wake.clone();
        tokio::spawn(async move {
            loop {
                let woken = wake.notified();
                tokio::pin!(woken);
                woken.as_mut().enable();
                let Some(me) = weak.upgrade() else { return };
                me.deliver_due().await;
                drop(me);
                let _ = tokio::time::timeout(poll, woken).await;
            }
        });
        let weak = Arc::downgrade(self);
        let scan = self.config.scan_interval;
        tokio::spawn(async move {
            let mut every = tokio::time::interval(scan);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let Some(me) = weak.upgrade() else { return };
                if let Err(e) = me.scan_expiring().await {
                    tracing::warn!(error = %e, "notify: expiring quota blocks not scanned");
                }
            }
        });
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(3600));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let Some(me) = weak.upgrade() else { return };
                let now = UNIX_EPOCH + Duration::from_millis(me.clock.now_ms());
                let before = now.checked_sub(me.config.retain).unwrap_or(UNIX_EPOCH);
                match me.catalog.prune_notifications(before).await {
                    Ok(n) if n > 0 => {
                        tracing::info!(pruned = n, "notifications past retention deleted")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "notify: pruning failed"),
                }
            }
        });
        let weak = Arc::downgrade(self);
        let mut events = self.catalog.subscribe();
        tokio::spawn(async move {
            loop {
                let event = events.recv().await;
                let Some(me) = weak.upgrade() else { return };
                match event {
                    Ok(Invalidation::Credits { account, .. }) => me.reload_granted(Some(&account)),
                    Ok(Invalidation::All)
                    | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        me.reload_granted(None)
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }

    /// After an admission: queue what the counts it returned (`info`) and
    /// the balance after its charge (`balance`, endpoints with credits)
    /// have reached. No I/O here: queueing runs as a background job.
    pub fn observe(
        self: &Arc<Self>,
        account: &str,
        endpoint: &str,
        plan: &Plan,
        info: &RateLimitInfo,
        balance: Option<u64>,
    ) {
        if plan.notify.is_empty() {
            return;
        }
        let now_ms = self.clock.now_ms();
        for rule in &plan.notify {
            match *rule {
                NotifyRule::Window { percent } => {
                    for w in &info.windows {
                        let at = NotifyRule::threshold(w.limit, percent);
                        if w.used < at {
                            continue;
                        }
                        let start = w.len.start_ms(now_ms);
                        let end = w.len.end_ms(now_ms);
                        let key = format!(
                            "w|{account}|{endpoint}|{}|{}|{start}|{percent}",
                            w.unit, w.len
                        );
                        self.due(key, end, || NewNotification {
                            dedupe_key: String::new(),
                            account_id: account.to_owned(),
                            kind: "window",
                            data: json!({
                                "plan": plan.id,
                                "endpoint": endpoint,
                                "threshold_percent": percent,
                                "window": {
                                    "unit": w.unit.as_str(),
                                    "length": w.len.to_string(),
                                    "limit": w.limit,
                                    "threshold": at,
                                    "used": w.used,
                                    "start": rfc3339_ms(start),
                                    "reset": rfc3339_ms(end),
                                },
                            }),
                        });
                    }
                }
                NotifyRule::Balance { .. } => {}
                NotifyRule::Expiry { .. } => {}
            }
        }
        if let Some(balance) = balance {
            let percents: Vec<u8> = plan
                .notify
                .iter()
                .filter_map(|r| match r {
                    NotifyRule::Balance { percent } => Some(*percent),
                    _ => None,
                })
                .collect();
            if !percents.is_empty() {
                let check = BalanceCheck {
                    endpoint: endpoint.to_owned(),
                    plan: plan.id.clone(),
                    percents,
                    balance,
                };
                self.observe_balance(account, check, now_ms);
            }
        }
    }

    /// Compare `check` with the account's granted credits, if known; read
    /// them (in the background) if not known or old, `check` compared again
    /// when they arrive.
    fn observe_balance(self: &Arc<Self>, account: &str, check: BalanceCheck, now_ms: u64) {
        let (known, load) = {
            let mut map = self.granted.lock();
            if !map.contains_key(account) {
                if map.len() >= MAX_GRANTED {
                    map.clear();
                }
                map.insert(account.to_owned(), GrantedEntry::default());
            }
            let Some(e) = map.get_mut(account) else {
                return;
            };
            e.last = Some(check.clone());
            let fresh = e
                .loaded
                .as_ref()
                .is_some_and(|g| now_ms < g.loaded_ms.saturating_add(GRANTED_TTL_MS));
            let load = (!fresh && !e.loading).then(|| {
                e.loading = true;
                e.generation
            });
            (e.loaded.clone(), load)
        };
        if let Some(granted) = known {
            self.check_balance(account, &check, &granted);
        }
        if let Some(generation) = load {
            self.load_granted(account, generation);
        }
    }

    /// Queue what `check` reaches of its thresholds, given `granted`.
    fn check_balance(self: &Arc<Self>, account: &str, check: &BalanceCheck, granted: &Granted) {
        let used = granted.total.saturating_sub(check.balance);
        for &percent in &check.percents {
            let at = NotifyRule::threshold(granted.total, percent);
            if granted.total == 0 || used < at {
                continue;
            }
            let key = format!("b|{account}|{}|{percent}", granted.tag);
            let now_ms = self.clock.now_ms();
            self.due(key, now_ms + BALANCE_SEEN_MS, || NewNotification {
                dedupe_key: String::new(),
                account_id: account.to_owned(),
                kind: "balance",
                data: json!({
                    "plan": check.plan,
                    "endpoint": check.endpoint,
                    "threshold_percent": percent,
                    "granted": granted.total,
                    "used": used,
                    "balance": check.balance,
                }),
            });
        }
    }

    /// After an invalidation (of one account, or of all): read the granted
    /// credits again (those read before it are stale), and compare the
    /// last balance seen with them.
    fn reload_granted(self: &Arc<Self>, account: Option<&str>) {
        let loads: Vec<(String, u64)> = {
            let mut map = self.granted.lock();
            let mut out = Vec::new();
            for (id, e) in map.iter_mut() {
                if account.is_some_and(|a| a != id) {
                    continue;
                }
                e.generation += 1;
                e.loading = true;
                out.push((id.clone(), e.generation));
            }
            out
        };
        for (account, generation) in loads {
            self.load_granted(&account, generation);
        }
    }

    /// Read the account's granted credits in the background; kept only if
    /// no invalidation came since `generation`.
    fn load_granted(self: &Arc<Self>, account: &str, generation: u64) {
        let me = self.clone();
        let owned = account.to_owned();
        let spawned = self.background.spawn(
            Job::Notify,
            Box::pin(async move {
                let account = owned;
                let loaded = me.catalog.credit_snapshot(&account).await;
                let ready = {
                    let mut map = me.granted.lock();
                    let Some(e) = map.get_mut(&account) else { return };
                    if e.generation != generation {
                        // A newer load is under way.
                        return;
                    }
                    e.loading = false;
                    match loaded {
                        Ok(snapshot) => {
                            let mut ids: Vec<&str> =
                                snapshot.blocks.iter().map(|b| b.id.as_str()).collect();
                            ids.sort_unstable();
                            let granted = Granted {
                                total: snapshot
                                    .blocks
                                    .iter()
                                    .map(|b| b.credits_granted)
                                    .fold(0u64, u64::saturating_add),
                                tag: hex(&Sha256::digest(ids.join(",").as_bytes())[..8]),
                                loaded_ms: me.clock.now_ms(),
                            };
                            e.loaded = Some(granted.clone());
                            e.last.clone().map(|check| (check, granted))
                        }
                        Err(err) => {
                            me.background.failed(Job::Notify);
                            tracing::warn!(account = %account, error = %err, "notify: granted credits not read");
                            None
                        }
                    }
                };
                if let Some((check, granted)) = ready {
                    me.check_balance(&account, &check, &granted);
                }
            }),
        );
        if !spawned {
            if let Some(e) = self.granted.lock().get_mut(account) {
                e.loading = false;
            }
        }
    }

    /// Queue the notification `make` builds under `key`, unless this
    /// process did already; in the background.
    fn due(self: &Arc<Self>, key: String, forget_ms: u64, make: impl FnOnce() -> NewNotification) {
        if !self.remember(&key, forget_ms) {
            return;
        }
        let mut n = make();
        n.dedupe_key = key.clone();
        let me = self.clone();
        let spawned = self.background.spawn(
            Job::Notify,
            Box::pin(async move {
                me.queue(&n).await;
            }),
        );
        if !spawned {
            // At capacity: the next request that sees the threshold tries
            // again.
            self.seen.lock().remove(&key);
        }
    }

    /// Note `key` as queued by this process; false if it already was.
    fn remember(&self, key: &str, forget_ms: u64) -> bool {
        let mut seen = self.seen.lock();
        if seen.contains_key(key) {
            return false;
        }
        if seen.len() >= MAX_SEEN {
            let now = self.clock.now_ms();
            seen.retain(|_, until| *until > now);
            if seen.len() >= MAX_SEEN {
                seen.clear();
            }
        }
        seen.insert(key.to_owned(), forget_ms);
        true
    }

    /// Queue `n` in the catalog now; on failure the key is forgotten, so
    /// that the next request that sees the threshold tries again.
    async fn queue(&self, n: &NewNotification) -> bool {
        match self.catalog.enqueue_notification(n).await {
            Ok(true) => {
                self.counters.queued.fetch_add(1, Ordering::Relaxed);
                tracing::info!(account = %n.account_id, kind = n.kind, key = %n.dedupe_key, "notification queued");
                self.wake.notify_one();
                true
            }
            Ok(false) => false,
            Err(e) => {
                self.seen.lock().remove(&n.dedupe_key);
                self.background.failed(Job::Notify);
                tracing::warn!(account = %n.account_id, error = %e, "notification not queued; the next request over the threshold tries again");
                false
            }
        }
    }

    /// Find quota blocks with credits left that expire within some plan's
    /// `expires_within`, and queue one notification per (block, rule).
    /// Returns how many were queued.
    pub async fn scan_expiring(&self) -> CatalogResult<usize> {
        let plans = self.cache.plans();
        let longest = plans
            .plans
            .values()
            .flat_map(|p| p.notify.iter())
            .filter_map(|r| match r {
                NotifyRule::Expiry { within_secs } => Some(*within_secs),
                _ => None,
            })
            .max();
        let Some(longest) = longest else {
            return Ok(0);
        };
        let now_ms = self.clock.now_ms();
        let until = UNIX_EPOCH + Duration::from_millis(now_ms) + Duration::from_secs(longest);
        let mut after: Option<String> = None;
        let mut queued = 0;
        loop {
            let blocks = self
                .catalog
                .expiring_blocks(until, after.as_deref(), SCAN_PAGE)
                .await?;
            let Some(last) = blocks.last() else { break };
            after = Some(last.id.clone());
            let full = blocks.len() == SCAN_PAGE;
            for block in blocks {
                let Some(expires) = block.expires_at else {
                    continue;
                };
                let expires_ms = crate::catalog::time_to_ms(expires);
                let plan = match self.cache.plan_for_account(&block.account_id).await {
                    Ok(Some(plan)) => plan,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(account = %block.account_id, error = %e, "notify: plan not read; block skipped this scan");
                        continue;
                    }
                };
                for rule in &plan.notify {
                    let NotifyRule::Expiry { within_secs } = *rule else {
                        continue;
                    };
                    if expires_ms.saturating_sub(now_ms) > within_secs.saturating_mul(1000) {
                        continue;
                    }
                    let key = format!("x|{}|{within_secs}", block.id);
                    if !self.remember(&key, expires_ms) {
                        continue;
                    }
                    let n = NewNotification {
                        dedupe_key: key,
                        account_id: block.account_id.clone(),
                        kind: "expiry",
                        data: json!({
                            "plan": plan.id,
                            "expires_within_secs": within_secs,
                            "block": {
                                "id": block.id,
                                "credits_granted": block.credits_granted,
                                "credits_remaining": block.credits_remaining,
                                "expires_at": rfc3339(expires),
                            },
                        }),
                    };
                    if self.queue(&n).await {
                        queued += 1;
                    }
                }
            }
            if !full {
                break;
            }
        }
        Ok(queued)
    }

    /// Deliver every notification due now (by the clock), one claim of up
    /// to [`CLAIM_BATCH`] after another, the posts of a claim at once.
    /// Returns how many attempts were made.
    pub async fn deliver_due(self: &Arc<Self>) -> usize {
        let _pass = self.pass.lock().await;
        let lease = self.config.timeout * 2 + Duration::from_secs(5);
        let mut attempts = 0;
        loop {
            let batch = match self.catalog.claim_notifications(CLAIM_BATCH, lease).await {
                Ok(batch) => batch,
                Err(e) => {
                    self.background.failed(Job::Deliver);
                    tracing::warn!(error = %e, "notify: due notifications not read");
                    return attempts;
                }
            };
            if batch.is_empty() {
                return attempts;
            }
            attempts += batch.len();
            let posts = batch.into_iter().map(|n| {
                let me = self.clone();
                async move { me.background.run(Job::Deliver, me.deliver(n)).await }
            });
            futures_util::future::join_all(posts).await;
        }
    }

    /// One attempt at `n`, recorded in the catalog.
    async fn deliver(&self, n: Notification) {
        let result = match self.post(&n).await {
            Ok(()) => {
                self.counters.delivered.fetch_add(1, Ordering::Relaxed);
                tracing::info!(id = %n.id, account = %n.account_id, attempts = n.attempts + 1, "notification delivered");
                Attempted::Delivered
            }
            Err(error) => {
                self.background.failed(Job::Deliver);
                let attempt = n.attempts.saturating_add(1);
                if attempt >= self.config.max_attempts {
                    self.counters.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(id = %n.id, account = %n.account_id, attempts = attempt, error = %error, "notification not delivered; giving up");
                    Attempted::Failed { error }
                } else {
                    self.counters.retried.fetch_add(1, Ordering::Relaxed);
                    let wait = self.backoff(attempt);
                    tracing::warn!(id = %n.id, account = %n.account_id, attempts = attempt, retry_in = ?wait, error = %error, "notification not delivered; will retry");
                    Attempted::Retry {
                        at: UNIX_EPOCH + Duration::from_millis(self.clock.now_ms()) + wait,
                        error,
                    }
                }
            }
        };
        if let Err(e) = self.catalog.finish_notification(&n.id, &result).await {
            // The lease runs out and the notification is tried again.
            self.background.failed(Job::Deliver);
            tracing::warn!(id = %n.id, error = %e, "notify: delivery attempt not recorded");
        }
    }

    /// The wait after failed attempt number `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(20);
        self.config
            .backoff
            .saturating_mul(factor)
            .min(self.config.max_backoff)
    }

    /// POST `n`, signed; Ok on a 2xx answer within `timeout`.
    async fn post(&self, n: &Notification) -> Result<(), String> {
        let body = webhook_body(n);
        let timestamp = self.clock.now_ms() / 1000;
        let sig = signature(&self.config.secret.0, timestamp, &body);
        let req = Request::builder()
            .method(Method::POST)
            .uri(self.config.url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(
                header::USER_AGENT,
                concat!("plangate/", env!("CARGO_PKG_VERSION")),
            )
            .header(
                ID_HEADER,
                HeaderValue::from_str(&n.id).map_err(|e| e.to_string())?,
            )
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(SIGNATURE_HEADER, sig)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let exchange = async {
            let resp = self.client.request(req).await.map_err(|e| {
                let mut msg = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    msg.push_str(&format!(": {s}"));
                    source = s.source();
                }
                msg
            })?;
            let status = resp.status();
            // Read (a bounded part of) the answer, so that the connection
            // can be reused.
            let _ = http_body_util::Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await;
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("HTTP {}", status.as_u16()))
            }
        };
        match tokio::time::timeout(self.config.timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "no answer within {}",
                humantime::format_duration(self.config.timeout)
            )),
        }
    }

    /// Prometheus text of the notification counters.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(
            out,
            "# HELP plangate_notifications_total Threshold notifications, by what became of them."
        );
        let _ = writeln!(out, "# TYPE plangate_notifications_total counter");
        for (result, n) in [
            ("queued", &self.counters.queued),
            ("delivered", &self.counters.delivered),
            ("retried", &self.counters.retried),
            ("failed", &self.counters.failed),
        ] {
            let _ = writeln!(
                out,
                "plangate_notifications_total{{result=\"{result}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
    }
}

#[cfg(test)]
mod tests;
