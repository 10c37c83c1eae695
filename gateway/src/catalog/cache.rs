//! Per-process cache of plans, account→plan and key→account, invalidated across instances.
//!
//! The gateway's hot path reads only this cache: the plan set is an
//! [`ArcSwap`] snapshot (never a database call), and account and key
//! entries are served from memory while fresh. Freshness has two sources:
//!
//! * [`Catalog::subscribe`] (LISTEN/NOTIFY for Postgres): an invalidation
//!   marks the entry stale at once, so the next use reloads it — well
//!   within a second of the change.
//! * A TTL backstop for lost notifications. A key entry is refreshed in the
//!   background once it is older than half its TTL and reloaded before use
//!   once older than its TTL (5 s by default), so a revoked key stops
//!   working within 5 s even if no notification arrives.
//! * While the catalog vouches for its notifications
//!   ([`Catalog::invalidations_confirmed_ms`]: Postgres round-trips a query
//!   on its LISTEN connection every second), an entry cannot have missed an
//!   invalidation older than that confirmation. As long as the confirmation
//!   is younger than the entry's TTL, any change it might have missed is
//!   younger than the TTL too, so the entry is kept — up to
//!   [`CacheConfig::trusted_ttl`] — without the per-TTL reload. This keeps
//!   100,000 keys used once a minute each off the database, and the TTL
//!   guarantee holds: if the channel goes deaf, confirmations stop and the
//!   plain TTLs apply again within one TTL.
//!
//! When the catalog is unreachable, entries already held keep serving
//! (stale but usable, SPEC §9); a failed reload is retried after
//! [`CacheConfig::retry_after_error`], not on every request. And once a
//! load has failed, until one succeeds, an entry due for a reload (expired,
//! or caught by an invalidation of everything) is served at once and
//! reloaded in the background: a catalog that does not answer costs each
//! reload the whole `catalog_timeout`, which requests with cached keys
//! should not wait out again and again. Only an entry an invalidation
//! named — known to have changed — is still reloaded before use.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::RwLock;
use tokio::sync::broadcast::error::RecvError;

use super::{
    hex_digest, parse_hex_digest, Catalog, CatalogError, CatalogResult, Invalidation, KeyDigest,
    KeyOwner,
};
use crate::clock::SharedClock;
use crate::plans::{Plan, PlanSet};

/// How long entries live.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// The plan set is reloaded this often even without notifications.
    pub plans_ttl: Duration,
    /// Account → assigned plan entries.
    pub account_ttl: Duration,
    /// Key hash → owner entries; bounds how long a revoked key can work
    /// when its notification is lost.
    pub key_ttl: Duration,
    /// Key hashes found to belong to no (unrevoked) key.
    pub negative_ttl: Duration,
    /// After a failed reload, keep serving the old entry this long before
    /// trying again.
    pub retry_after_error: Duration,
    /// At most this many account and (separately) key entries; beyond it
    /// expired entries are dropped, then everything.
    pub max_entries: usize,
    /// How long account and key entries are kept while the catalog
    /// confirms that its invalidations arrive (see the module docs).
    pub trusted_ttl: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            plans_ttl: Duration::from_secs(60),
            account_ttl: Duration::from_secs(30),
            key_ttl: Duration::from_secs(5),
            negative_ttl: Duration::from_secs(2),
            retry_after_error: Duration::from_secs(1),
            // About 350 bytes a key and its account (measured with
            // 100,000 of each, short ids): 1M of each stay within 500 MB.
            max_entries: 1_000_000,
            // Refreshed in the background from half of it on: about one
            // read per active key every 30 minutes.
            trusted_ttl: Duration::from_secs(3_600),
        }
    }
}

/// Cache hit/miss counters, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups answered from memory.
    pub hits: u64,
    /// Lookups that had to ask the catalog.
    pub loads: u64,
    /// Lookups answered with a stale entry because the catalog failed.
    pub stale_served: u64,
}

struct Entry<T> {
    value: T,
    /// When the value was loaded (clock ms).
    loaded_ms: u64,
    /// Set by an invalidation: reload before the next use.
    stale: Stale,
    /// Do not try the catalog again before this (after a failed reload).
    retry_at_ms: u64,
    /// A background refresh is running. Claimed (swapped to true) under
    /// the map's read lock by the lookup that starts the refresh; a new
    /// entry stored by the refresh starts with it clear, and a failed
    /// refresh clears it on the entry it finds. Inline rather than an
    /// `Arc` shared with the refresh task: one allocation less per entry.
    refreshing: AtomicBool,
}

impl<T> Entry<T> {
    fn new(value: T, now: u64) -> Self {
        Self {
            value,
            loaded_ms: now,
            stale: Stale::No,
            retry_at_ms: 0,
            refreshing: AtomicBool::new(false),
        }
    }
}

/// Whether an invalidation reached an entry since it was loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stale {
    No,
    /// Everything was invalidated (the notification channel was lost or
    /// reconnected, or notifications were missed): the entry may have
    /// changed.
    Maybe,
    /// An invalidation named the entry, or arrived while it was being
    /// loaded: it has changed, or may have.
    Named,
}

/// What a lookup should do with an entry.
enum Freshness<T> {
    /// Serve it.
    Fresh(T),
    /// Serve it and refresh in the background (this lookup claimed the
    /// entry's refresh flag).
    Refresh(T),
    /// Reload now (serving the old value only if the reload fails).
    Reload(Option<T>),
}

/// Entries plus an epoch bumped by every invalidation, so a load that
/// started before an invalidation never stores its (possibly outdated)
/// answer as fresh.
struct Map<K, T> {
    entries: RwLock<HashMap<K, Entry<T>>>,
    epoch: AtomicU64,
}

impl<K, T> Map<K, T> {
    fn new() -> Self {
        Self {
            entries: RwLock::new(HashMap::new()),
            epoch: AtomicU64::new(0),
        }
    }

    fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }
}

/// A plan as the cache found it and the same plan anchored.
type AnchoredPlan = (Arc<Plan>, Arc<Plan>);

/// What the cache keeps of an account.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Assigned {
    /// The assigned plan (`None`: the default plan, or no such account).
    plan: Option<String>,
    billing_anchor: Option<u8>,
}

struct Inner {
    catalog: Arc<dyn Catalog>,
    clock: SharedClock,
    config: CacheConfig,
    plans: ArcSwap<PlanSet>,
    /// When the plan snapshot was loaded; 0 after an invalidation.
    plans_loaded_ms: AtomicU64,
    /// Bumped by every plan invalidation (see [`Map`]).
    plans_epoch: AtomicU64,
    /// Account id → its assigned plan (`None`: default plan or unknown
    /// account) and billing anchor.
    accounts: Map<Box<str>, Assigned>,
    /// (plan id, billing anchor) → (the plan, the plan anchored): built
    /// once per plan version and anchor, not per request (a stale entry,
    /// whose plan is no longer the snapshot's, is rebuilt).
    anchored: parking_lot::Mutex<HashMap<(String, u8), AnchoredPlan>>,
    /// Key digest → owner (`None`: no such unrevoked key). Keyed on the
    /// 32-byte SHA-256 rather than its 64-character hex form: with 100,000
    /// keys that is 8 MB less, and a lookup needs no hex string.
    keys: Map<KeyDigest, Option<KeyOwner>>,
    hits: AtomicU64,
    loads: AtomicU64,
    stale_served: AtomicU64,
    /// The last catalog load failed as unavailable (and none has
    /// succeeded since): see the module docs.
    failing: AtomicBool,
}

/// The gateway's view of the catalog. Cheap to clone; clones share entries.
#[derive(Clone)]
pub struct CatalogCache {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CatalogCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CatalogCache")
            .field("config", &self.inner.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl CatalogCache {
    /// Load the plan set and start following the catalog's invalidations.
    /// Fails if the plans cannot be loaded: a gateway without plans can
    /// admit nothing. Must be called inside a tokio runtime.
    pub async fn new(
        catalog: Arc<dyn Catalog>,
        clock: SharedClock,
        config: CacheConfig,
    ) -> CatalogResult<Self> {
        Self::start(catalog, clock, config, false).await
    }

    /// Like [`CatalogCache::new`], but when the plans cannot be loaded the
    /// cache starts empty and keeps retrying in the background: the gateway
    /// starts (not ready) while the catalog is down and recovers by itself.
    pub async fn new_lazy(
        catalog: Arc<dyn Catalog>,
        clock: SharedClock,
        config: CacheConfig,
    ) -> CatalogResult<Self> {
        Self::start(catalog, clock, config, true).await
    }

    async fn start(
        catalog: Arc<dyn Catalog>,
        clock: SharedClock,
        config: CacheConfig,
        lazy: bool,
    ) -> CatalogResult<Self> {
        // Subscribe before loading so no change between the two is missed.
        let events = catalog.subscribe();
        let (plans, loaded) = match catalog.list_plans().await {
            Ok(plans) => (plans, true),
            // The gateway's store watch (`health.rs`) says so at ERROR.
            Err(e) if lazy => {
                tracing::debug!(error = %e, "catalog unavailable at start; retrying in the background");
                (PlanSet::default(), false)
            }
            Err(e) => return Err(e),
        };
        let now = if loaded { clock.now_ms().max(1) } else { 0 };
        let inner = Arc::new(Inner {
            catalog,
            clock,
            config,
            plans: ArcSwap::from_pointee(plans),
            plans_loaded_ms: now.into(),
            plans_epoch: 0.into(),
            accounts: Map::new(),
            anchored: Default::default(),
            keys: Map::new(),
            hits: 0.into(),
            loads: 0.into(),
            stale_served: 0.into(),
            failing: AtomicBool::new(false),
        });
        tokio::spawn(follow(Arc::downgrade(&inner), events));
        Ok(Self { inner })
    }

    /// The catalog behind the cache.
    pub fn catalog(&self) -> &Arc<dyn Catalog> {
        &self.inner.catalog
    }

    /// The current plan set. Never touches the database.
    pub fn plans(&self) -> Arc<PlanSet> {
        self.inner.plans.load_full()
    }

    /// Reload the plan set now (after a change this process made, or on
    /// SIGHUP). On failure the old snapshot stays.
    pub async fn refresh_plans(&self) -> CatalogResult<()> {
        self.inner.reload_plans().await
    }

    /// Who owns the key with this hash (hex SHA-256, see
    /// [`super::hash_key`]); `None` for unknown and revoked keys. Errors
    /// only when the catalog is unreachable and nothing is cached.
    pub async fn resolve_key(&self, key_hash: &str) -> CatalogResult<Option<KeyOwner>> {
        match parse_hex_digest(key_hash) {
            Some(digest) => self.resolve_key_digest(&digest).await,
            // Not a hash `hash_key` makes, so no key has it: ask the
            // catalog as it is (it answers `None`), without caching.
            None => self.inner.catalog.lookup_key(key_hash).await,
        }
    }

    /// [`Self::resolve_key`] for the raw digest ([`super::key_digest`]):
    /// the hot path, which makes no hex string unless it must load.
    pub async fn resolve_key_digest(&self, digest: &KeyDigest) -> CatalogResult<Option<KeyOwner>> {
        let inner = &self.inner;
        let owner = inner
            .lookup(
                |i| &i.keys,
                digest,
                |v: &Option<KeyOwner>| {
                    if v.is_some() {
                        inner.config.key_ttl
                    } else {
                        inner.config.negative_ttl
                    }
                },
                || {
                    let cat = inner.catalog.clone();
                    let owned = hex_digest(digest);
                    move || {
                        let cat = cat.clone();
                        let h = owned.clone();
                        async move { cat.lookup_key(&h).await }
                    }
                },
            )
            .await?;
        // A cached key that has expired since is refused at once, like a
        // revoked one (the catalog would not find it either).
        let now = inner.clock.now_ms();
        Ok(owner.filter(|o| !o.expired_at(now)))
    }

    /// The id of the plan in force for `account`: its assigned plan, else
    /// the default plan. Accounts the catalog does not know are on the
    /// default plan too.
    pub async fn plan_id_for_account(&self, account: &str) -> CatalogResult<Option<String>> {
        let assigned = self.assigned(account).await?;
        Ok(assigned.plan.or_else(|| self.plans().default_plan.clone()))
    }

    /// The plan in force for `account` (see [`Self::plan_id_for_account`]);
    /// `None` when no plan exists at all.
    ///
    /// For an account with a billing anchor (2 to 31), the plan's calendar
    /// month windows are billing months from that day ([`Plan::anchored`]).
    pub async fn plan_for_account(&self, account: &str) -> CatalogResult<Option<Arc<Plan>>> {
        let assigned = self.assigned(account).await?;
        let Some(id) = assigned.plan.or_else(|| self.plans().default_plan.clone()) else {
            return Ok(None);
        };
        Ok(self.plan_by_id(&id, assigned.billing_anchor).await)
    }

    /// The plan of a key that has one of its own (key-level limits,
    /// `keys create --plan`), as it applies under the key's account's
    /// billing anchor; `None` for a key without one. A plan the snapshot
    /// does not hold even after a reload (deleted meanwhile) adds nothing.
    pub async fn plan_for_key(
        &self,
        account: &str,
        plan_id: Option<&str>,
    ) -> CatalogResult<Option<Arc<Plan>>> {
        let Some(id) = plan_id else {
            return Ok(None);
        };
        let assigned = self.assigned(account).await?;
        Ok(self.plan_by_id(id, assigned.billing_anchor).await)
    }

    /// Plan `id` from the snapshot (reloaded once when missing), anchored.
    async fn plan_by_id(&self, id: &str, billing_anchor: Option<u8>) -> Option<Arc<Plan>> {
        let plan = match self.plans().plans.get(id) {
            Some(plan) => Some(plan.clone()),
            None => {
                // The account names a plan newer than our snapshot (its
                // notification is still on the way): reload once.
                if let Err(e) = self.refresh_plans().await {
                    tracing::warn!(error = %e, "reloading plans failed");
                }
                self.plans().plans.get(id).cloned()
            }
        };
        match (plan, billing_anchor) {
            (Some(plan), Some(anchor)) if anchor > 1 && plan.has_months() => {
                Some(self.anchored(&plan, anchor))
            }
            (plan, _) => plan,
        }
    }

    /// `plan` anchored on `anchor`, built once per plan version.
    fn anchored(&self, plan: &Arc<Plan>, anchor: u8) -> Arc<Plan> {
        let mut map = self.inner.anchored.lock();
        let key = (plan.id.clone(), anchor);
        if let Some((base, anchored)) = map.get(&key) {
            if Arc::ptr_eq(base, plan) {
                return anchored.clone();
            }
        }
        // Bounded: plan ids × 30 anchors; dropped whole if plans churn.
        if map.len() >= 10_000 {
            map.clear();
        }
        let anchored = plan.anchored(anchor);
        map.insert(key, (plan.clone(), anchored.clone()));
        anchored
    }

    /// Hit, load and stale counters since start.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.inner.hits.load(Ordering::Relaxed),
            loads: self.inner.loads.load(Ordering::Relaxed),
            stale_served: self.inner.stale_served.load(Ordering::Relaxed),
        }
    }

    /// Forget one entry (or everything) as if an invalidation had arrived.
    pub fn invalidate(&self, inv: &Invalidation) {
        self.inner.invalidate(inv);
    }

    async fn assigned(&self, account: &str) -> CatalogResult<Assigned> {
        let inner = &self.inner;
        inner
            .lookup(
                |i| &i.accounts,
                account,
                |_| inner.config.account_ttl,
                || {
                    let cat = inner.catalog.clone();
                    let owned = account.to_string();
                    move || {
                        let cat = cat.clone();
                        let id = owned.clone();
                        async move {
                            match cat.get_account(&id).await {
                                Ok(a) => Ok(Assigned {
                                    plan: a.plan_id,
                                    billing_anchor: a.billing_anchor,
                                }),
                                Err(CatalogError::NotFound { .. }) => Ok(Assigned::default()),
                                Err(e) => Err(e),
                            }
                        }
                    }
                },
            )
            .await
    }
}

impl Inner {
    fn now(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Called under the map's read lock, so that claiming the refresh
    /// flag and reading the entry happen on the same entry.
    fn freshness<T: Clone>(&self, e: &Entry<T>, ttl: Duration, now: u64) -> Freshness<T> {
        let age = now.saturating_sub(e.loaded_ms);
        let mut ttl_ms = ttl.as_millis() as u64;
        if self.invalidations_trusted(ttl_ms, now) {
            ttl_ms = ttl_ms.max(self.config.trusted_ttl.as_millis() as u64);
        }
        let must_reload = e.stale != Stale::No || age >= ttl_ms;
        if must_reload && now < e.retry_at_ms {
            // A reload failed recently: keep serving what we have.
            self.stale_served.fetch_add(1, Ordering::Relaxed);
            return Freshness::Fresh(e.value.clone());
        }
        if must_reload && e.stale != Stale::Named && self.failing.load(Ordering::Acquire) {
            // The catalog is failing: serve what we have rather than wait
            // for it to fail again, and try it in the background.
            self.stale_served.fetch_add(1, Ordering::Relaxed);
            if !e.refreshing.swap(true, Ordering::AcqRel) {
                return Freshness::Refresh(e.value.clone());
            }
            return Freshness::Fresh(e.value.clone());
        }
        if must_reload {
            return Freshness::Reload(Some(e.value.clone()));
        }
        if age >= ttl_ms / 2
            && !e.refreshing.load(Ordering::Relaxed)
            && !e.refreshing.swap(true, Ordering::AcqRel)
        {
            return Freshness::Refresh(e.value.clone());
        }
        Freshness::Fresh(e.value.clone())
    }

    /// Whether every change an entry with this TTL could have missed is
    /// younger than the TTL: the catalog confirmed delivery of all
    /// invalidations up to less than `ttl_ms` ago.
    fn invalidations_trusted(&self, ttl_ms: u64, now: u64) -> bool {
        trusted(self.catalog.invalidations_confirmed_ms(), ttl_ms, now)
    }

    /// Read through `map`: serve fresh entries, refresh ageing ones in the
    /// background, reload expired ones (falling back to the old value when
    /// the catalog fails). `make_load` builds the loader only when one is
    /// needed, so a cache hit allocates nothing.
    async fn lookup<K, Q, T, F, Fut>(
        self: &Arc<Self>,
        map_of: fn(&Inner) -> &Map<K, T>,
        id: &Q,
        ttl: impl Fn(&T) -> Duration,
        make_load: impl FnOnce() -> F,
    ) -> CatalogResult<T>
    where
        K: Borrow<Q> + Hash + Eq + From<Q::Owned> + Send + Sync + 'static,
        Q: ToOwned + Hash + Eq + ?Sized,
        T: Clone + Send + Sync + 'static,
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = CatalogResult<T>> + Send + 'static,
    {
        let now = self.now();
        let map = map_of(self);
        let epoch = map.epoch();
        let state = map
            .entries
            .read()
            .get(id)
            .map(|e| self.freshness(e, ttl(&e.value), now));
        let old = match state {
            Some(Freshness::Fresh(v)) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(v);
            }
            Some(Freshness::Refresh(v)) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                let load = make_load();
                let weak = Arc::downgrade(self);
                let id = K::from(id.to_owned());
                tokio::spawn(async move {
                    let result = load().await;
                    let Some(inner) = weak.upgrade() else { return };
                    inner.note(&result);
                    let map = map_of(&inner);
                    match result {
                        // The new entry starts with the flag clear.
                        Ok(v) => inner.store(map, id.borrow(), v, epoch),
                        Err(_) => {
                            let retry_at =
                                inner.now() + inner.config.retry_after_error.as_millis() as u64;
                            if let Some(e) = map.entries.write().get_mut(id.borrow()) {
                                e.retry_at_ms = retry_at;
                                e.refreshing.store(false, Ordering::Release);
                            }
                        }
                    }
                });
                return Ok(v);
            }
            Some(Freshness::Reload(old)) => old,
            None => None,
        };
        self.loads.fetch_add(1, Ordering::Relaxed);
        let load = make_load();
        let result = load().await;
        self.note(&result);
        match result {
            Ok(v) => {
                self.store(map, id, v.clone(), epoch);
                Ok(v)
            }
            Err(e) => match old {
                Some(v) => {
                    tracing::warn!(error = %e, "catalog reload failed; serving cached entry");
                    self.stale_served.fetch_add(1, Ordering::Relaxed);
                    let retry_at = self.now() + self.config.retry_after_error.as_millis() as u64;
                    if let Some(entry) = map.entries.write().get_mut(id) {
                        entry.retry_at_ms = retry_at;
                    }
                    Ok(v)
                }
                None => Err(e),
            },
        }
    }

    /// Store a loaded value; stale at once if an invalidation arrived since
    /// the load began (`epoch`), so the next use loads again.
    fn store<K, Q, T>(&self, map: &Map<K, T>, id: &Q, v: T, epoch: u64)
    where
        K: Borrow<Q> + Hash + Eq + From<Q::Owned>,
        Q: ToOwned + Hash + Eq + ?Sized,
    {
        let now = self.now();
        let mut m = map.entries.write();
        if m.len() >= self.config.max_entries && !m.contains_key(id) {
            let mut horizon = self.config.account_ttl.max(self.config.key_ttl);
            if self.invalidations_trusted(self.config.key_ttl.as_millis() as u64, now) {
                horizon = horizon.max(self.config.trusted_ttl);
            }
            let horizon = horizon.as_millis() as u64;
            m.retain(|_, e| now.saturating_sub(e.loaded_ms) < horizon);
            if m.len() >= self.config.max_entries {
                m.clear();
            }
        }
        let mut entry = Entry::new(v, now);
        if map.epoch() != epoch {
            entry.stale = Stale::Named;
        }
        m.insert(K::from(id.to_owned()), entry);
    }

    fn mark_all_stale<K, T>(map: &Map<K, T>) {
        map.epoch.fetch_add(1, Ordering::AcqRel);
        for e in map.entries.write().values_mut() {
            if e.stale == Stale::No {
                e.stale = Stale::Maybe;
            }
            e.retry_at_ms = 0;
        }
    }

    fn mark_stale<K, Q>(map: &Map<K, impl Sized>, id: Option<&Q>)
    where
        K: Borrow<Q> + Hash + Eq,
        Q: Hash + Eq + ?Sized,
    {
        map.epoch.fetch_add(1, Ordering::AcqRel);
        let Some(id) = id else { return };
        if let Some(e) = map.entries.write().get_mut(id) {
            e.stale = Stale::Named;
            e.retry_at_ms = 0;
        }
    }

    fn invalidate(&self, inv: &Invalidation) {
        match inv {
            Invalidation::Plans => self.plans_stale(),
            Invalidation::Account(id) => Self::mark_stale(&self.accounts, Some(id.as_str())),
            // A hash that does not parse names no cached entry.
            Invalidation::Key(hash) => {
                Self::mark_stale(&self.keys, parse_hex_digest(hash).as_ref());
            }
            // Wallets, not caches, hold credits (`credits::Outbox`).
            Invalidation::Credits { .. } => {}
            Invalidation::All | Invalidation::Deaf => {
                self.plans_stale();
                Self::mark_all_stale(&self.accounts);
                Self::mark_all_stale(&self.keys);
            }
        }
    }

    fn plans_stale(&self) {
        self.plans_epoch.fetch_add(1, Ordering::AcqRel);
        self.plans_loaded_ms.store(0, Ordering::Release);
    }

    /// Remember whether the catalog answered a load (see `failing`).
    fn note<T>(&self, result: &CatalogResult<T>) {
        match result {
            Ok(_) => self.failing.store(false, Ordering::Release),
            Err(CatalogError::Unavailable(_)) => self.failing.store(true, Ordering::Release),
            Err(_) => {}
        }
    }

    async fn reload_plans(&self) -> CatalogResult<()> {
        let epoch = self.plans_epoch.load(Ordering::Acquire);
        let result = self.catalog.list_plans().await;
        self.note(&result);
        let set = result?;
        // Invalidated while loading: this answer may predate the change (and
        // a newer load may already have stored a later one), so drop it and
        // leave the plans due for `follow` to load again.
        if self.plans_epoch.load(Ordering::Acquire) == epoch {
            self.plans.store(Arc::new(set));
            self.plans_loaded_ms
                .store(self.now().max(1), Ordering::Release);
        }
        Ok(())
    }

    fn plans_due(&self) -> bool {
        let loaded = self.plans_loaded_ms.load(Ordering::Relaxed);
        loaded == 0 || self.now().saturating_sub(loaded) >= self.config.plans_ttl.as_millis() as u64
    }
}

/// Whether an entry with a TTL of `ttl_ms` can have missed no invalidation
/// older than its TTL at `now`: delivery of everything before `confirmed`
/// was confirmed less than `ttl_ms` ago.
fn trusted(confirmed: Option<u64>, ttl_ms: u64, now: u64) -> bool {
    confirmed.is_some_and(|c| now < c.saturating_add(ttl_ms))
}

/// Follow invalidations and keep the plan snapshot fresh until the cache
/// is dropped. Plans are reloaded here, off the request path.
async fn follow(weak: Weak<Inner>, mut events: tokio::sync::broadcast::Receiver<Invalidation>) {
    // Real time, not the injected clock: this only paces the checks.
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retry_at = tokio::time::Instant::now();
    let mut told = crate::health::LogThrottle::new(crate::health::REPEAT_EVERY);
    loop {
        let inv = tokio::select! {
            r = events.recv() => match r {
                Ok(inv) => Some(inv),
                // Missed some: we cannot know which, so forget everything.
                Err(RecvError::Lagged(_)) => Some(Invalidation::All),
                Err(RecvError::Closed) => return,
            },
            _ = tick.tick() => None,
        };
        let Some(inner) = weak.upgrade() else { return };
        if let Some(inv) = inv {
            inner.invalidate(&inv);
        }
        if inner.plans_due() && tokio::time::Instant::now() >= retry_at {
            match inner.reload_plans().await {
                Ok(_) => told.reset(),
                Err(e) => {
                    // Retried every `retry_after_error` while the catalog is
                    // down: said once per `REPEAT_EVERY`.
                    if let Some(repeats) = told.ready(std::time::Instant::now()) {
                        tracing::warn!(error = %e, repeats, "reloading plans failed; keeping the cached plans");
                    }
                    retry_at = tokio::time::Instant::now() + inner.config.retry_after_error;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::trusted;

    #[test]
    fn trust_lasts_one_ttl_past_the_last_confirmation() {
        let cases = [
            // (confirmed, ttl, now, trusted)
            (None, 5_000, 1_000, false),
            (Some(1_000), 5_000, 1_000, true),
            (Some(1_000), 5_000, 5_999, true),
            (Some(1_000), 5_000, 6_000, false),
            (Some(1_000), 2_000, 3_500, false),
            (Some(10_000), 5_000, 9_000, true),
            (Some(u64::MAX), 5_000, 0, true),
        ];
        for (confirmed, ttl, now, expected) in cases {
            assert_eq!(
                trusted(confirmed, ttl, now),
                expected,
                "confirmed {confirmed:?} ttl {ttl} now {now}"
            );
        }
    }
}
