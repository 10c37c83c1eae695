//! The catalog side of credits: where wallets come from and where what
//! they decide goes (see `limiter::wallet` for the design).
//!
//! [`Outbox`] is the limiter's [`WalletSource`]. It loads wallets from the
//! catalog ([`Catalog::credit_snapshot`]), drops them when the catalog says
//! an account's credits changed outside the wallets
//! ([`Invalidation::Credits`]), and writes every account's outbox — the
//! charges and refunds the counter store decided, in the order it decided
//! them — to the catalog in batches ([`Catalog::record_credit_ops`], one
//! transaction per batch, idempotent by ledger key), acknowledging each
//! batch in the store only once the catalog has committed it.
//!
//! Nothing here holds a charge in memory: the outbox lives in the counter
//! store, so on Redis a charge survives the gateway's death and Postgres
//! outages (the next flush, by this gateway after a restart or by any
//! other, writes it), and memory stays bounded by what is being written.
//! A crash between the catalog's commit and the acknowledgement writes the
//! batch again, which the ledger keys make harmless.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;

use crate::background::Job;
use crate::catalog::{Catalog, CatalogError, Invalidation};
use crate::clock::SharedClock;
use crate::limiter::wallet::{OutboxOp, WalletBlock, WalletSnapshot};
use crate::limiter::{CounterStore, Limiter, StoreError, WalletSource};

/// Outbox entries written to the catalog per transaction.
pub const FLUSH_BATCH: usize = 1024;

/// Accounts flushed at once.
const FLUSH_CONCURRENCY: usize = 16;

/// How often every outbox in the store is looked for (entries left by a
/// gateway that died), besides at start.
const RECOVERY_EVERY: Duration = Duration::from_secs(60);

/// How often a gateway says it is alive, and how long that lasts: an
/// instance silent for longer is dead, and its unended admissions are
/// refunded once their leases run out.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
const HEARTBEAT_TTL: Duration = Duration::from_secs(10);

/// How often unended admissions of dead gateways are looked for.
const REAP_EVERY: Duration = Duration::from_secs(5);

/// The writer's longest sleep while nothing is pending.
const IDLE_WAKE: Duration = Duration::from_secs(1);

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Counters of an [`Outbox`].
#[derive(Debug, Default)]
pub struct OutboxStats {
    /// Operations written to the catalog.
    pub written: AtomicU64,
    /// Flushes that failed (and will be retried).
    pub failures: AtomicU64,
    /// Wallets loaded from the catalog.
    pub loads: AtomicU64,
    /// Admissions refunded because their gateway died before their end.
    pub reaped: AtomicU64,
}

/// Loads wallets, follows credit invalidations, and writes outboxes to the
/// catalog. See the module docs.
pub struct Outbox<S> {
    limiter: Weak<Limiter<S>>,
    catalog: Arc<dyn Catalog>,
    clock: SharedClock,
    /// Accounts whose outbox may hold entries.
    dirty: Mutex<HashSet<String>>,
    /// Accounts whose wallets this process loaded or used: dropped when
    /// the catalog's notifications may have been missed.
    known: Mutex<HashSet<String>>,
    /// Accounts found in the store by a scan, not written by this process:
    /// checked against the catalog before their outbox is written, since
    /// another deployment may share the counter store (and its outboxes
    /// belong to its own catalog).
    found: Mutex<HashSet<String>>,
    /// Accounts of outboxes the catalog does not know: left alone.
    foreign: Mutex<HashSet<String>>,
    /// Accounts being written right now (taken off `dirty`).
    flushing: std::sync::atomic::AtomicUsize,
    wake: tokio::sync::Notify,
    pub stats: OutboxStats,
}

impl<S> std::fmt::Debug for Outbox<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("dirty", &self.dirty.lock().len())
            .finish_non_exhaustive()
    }
}

impl<S: CounterStore> Outbox<S> {
    /// An outbox for `limiter`, installed as its wallet source. Call
    /// [`Outbox::start`] (on a runtime) to run the writer and the
    /// invalidation follower.
    pub fn install(limiter: &Arc<Limiter<S>>, catalog: Arc<dyn Catalog>) -> Arc<Self> {
        let outbox = Arc::new(Outbox {
            limiter: Arc::downgrade(limiter),
            catalog,
            clock: limiter.clock().clone(),
            dirty: Mutex::new(HashSet::new()),
            known: Mutex::new(HashSet::new()),
            found: Mutex::new(HashSet::new()),
            foreign: Mutex::new(HashSet::new()),
            flushing: std::sync::atomic::AtomicUsize::new(0),
            wake: tokio::sync::Notify::new(),
            stats: OutboxStats::default(),
        });
        limiter.set_wallet_source(outbox.clone());
        outbox
    }

    /// Spawn the writer and the invalidation follower. Both hold only a
    /// `Weak` and end when the outbox is dropped.
    pub fn start(self: &Arc<Self>) {
        let events = self.catalog.subscribe();
        tokio::spawn(follow(Arc::downgrade(self), events));
        tokio::spawn(write_loop(Arc::downgrade(self)));
    }

    fn limiter(&self) -> Result<Arc<Limiter<S>>, StoreError> {
        self.limiter
            .upgrade()
            .ok_or_else(|| StoreError::Unavailable("the limiter is gone".into()))
    }

    /// Accounts whose outbox may hold entries not yet written.
    pub fn pending_accounts(&self) -> usize {
        self.dirty.lock().len() + self.flushing.load(Ordering::SeqCst)
    }

    /// Write the account's whole outbox to the catalog. Returns how many
    /// operations were written.
    pub async fn flush_account(&self, account: &str) -> Result<u64, StoreError> {
        let limiter = self.limiter()?;
        let store = limiter.store();
        let mut written = 0;
        loop {
            let items = store.outbox_read(account, FLUSH_BATCH).await?;
            if items.is_empty() {
                return Ok(written);
            }
            // Charges and refunds in the order they were decided; usage
            // records after them (both idempotent, so a batch written
            // twice changes nothing).
            let mut ops = Vec::new();
            let mut usage = Vec::new();
            for item in &items {
                match &item.op {
                    OutboxOp::Credit(op) => ops.push(op.clone()),
                    OutboxOp::Usage(event) => usage.push((**event).clone()),
                }
            }
            if !ops.is_empty() {
                self.catalog
                    .record_credit_ops(account, &ops)
                    .await
                    .map_err(|e| StoreError::Unavailable(format!("writing credits: {e}")))?;
            }
            if !usage.is_empty() {
                self.record_usage(&usage).await?;
            }
            let ids: Vec<String> = items.into_iter().map(|i| i.id).collect();
            store.outbox_ack(account, &ids).await?;
            written += ids.len() as u64;
            self.stats
                .written
                .fetch_add(ids.len() as u64, Ordering::Relaxed);
            if ids.len() < FLUSH_BATCH {
                return Ok(written);
            }
        }
    }

    /// Record usage events; a batch the catalog refuses as invalid (it
    /// never will take it) is recorded event by event, and the events it
    /// refuses are dropped with an error log rather than blocking the
    /// account's outbox for good.
    async fn record_usage(&self, events: &[crate::catalog::UsageEvent]) -> Result<(), StoreError> {
        let unavailable = |e: CatalogError| StoreError::Unavailable(format!("writing usage: {e}"));
        match self.catalog.record_usage(events).await {
            Ok(_) => Ok(()),
            Err(CatalogError::Invalid(_)) => {
                for event in events {
                    match self.catalog.record_usage(std::slice::from_ref(event)).await {
                        Ok(_) => {}
                        Err(CatalogError::Invalid(e)) => {
                            tracing::error!(request_id = %event.request_id, error = %e, "usage record refused by the catalog; dropped");
                        }
                        Err(e) => return Err(unavailable(e)),
                    }
                }
                Ok(())
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Flush every account marked dirty; the ones that fail stay marked.
    /// Returns how many failed.
    pub async fn flush_dirty(&self) -> usize {
        use futures_util::StreamExt;
        let accounts: Vec<String> = {
            let mut dirty = self.dirty.lock();
            self.flushing.fetch_add(dirty.len(), Ordering::SeqCst);
            dirty.drain().collect()
        };
        let flushing = &self.flushing;
        // Counted as pending until each one is written or marked again.
        struct Done<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let failed = AtomicU64::new(0);
        futures_util::stream::iter(accounts)
            .for_each_concurrent(FLUSH_CONCURRENCY, |account| {
                let failed = &failed;
                async move {
                    let _done = Done(flushing);
                    match self.ours(&account).await {
                        Ok(true) => {}
                        Ok(false) => return,
                        Err(e) => {
                            tracing::warn!(error = %e, account = %account, "checking an account found in the counter store failed; retrying");
                            self.dirty.lock().insert(account);
                            return;
                        }
                    }
                    let written = match self.limiter() {
                        Ok(limiter) => {
                            let background = limiter.background().clone();
                            drop(limiter);
                            background
                                .run(Job::WriteCharges, self.flush_account(&account))
                                .await
                                .inspect_err(|_| background.failed(Job::WriteCharges))
                        }
                        Err(e) => Err(e),
                    };
                    if let Err(e) = written {
                        if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                            tracing::warn!(error = %e, account = %account, "writing credits to the catalog failed; retrying");
                        }
                        self.stats.failures.fetch_add(1, Ordering::Relaxed);
                        self.dirty.lock().insert(account);
                    }
                }
            })
            .await;
        failed.into_inner() as usize
    }

    /// Mark every account with a non-empty outbox in the store dirty
    /// (entries a gateway that died left behind).
    pub async fn recover(&self) -> Result<usize, StoreError> {
        let accounts = self.limiter()?.store().outbox_accounts().await?;
        let accounts: Vec<String> = {
            let foreign = self.foreign.lock();
            accounts
                .into_iter()
                .filter(|a| !foreign.contains(a))
                .collect()
        };
        let n = accounts.len();
        if n > 0 {
            tracing::info!(
                accounts = n,
                "credit outboxes found in the counter store; writing them to the catalog"
            );
            self.mark_found(accounts);
        }
        Ok(n)
    }

    /// Accounts found by a scan: written once the catalog says they are its.
    fn mark_found(&self, accounts: Vec<String>) {
        {
            let dirty = self.dirty.lock();
            let mut found = self.found.lock();
            // An account this process is writing anyway is known to be its.
            found.extend(accounts.iter().filter(|a| !dirty.contains(*a)).cloned());
        }
        self.dirty.lock().extend(accounts);
        self.wake.notify_one();
    }

    /// Whether this catalog is where the account's outbox belongs: yes for
    /// accounts this process wrote; an account found by a scan must exist
    /// in the catalog (else it is another deployment's, left alone).
    async fn ours(&self, account: &str) -> Result<bool, StoreError> {
        if !self.found.lock().contains(account) {
            return Ok(true);
        }
        match self.catalog.get_account(account).await {
            Ok(_) => {
                self.found.lock().remove(account);
                Ok(true)
            }
            Err(CatalogError::NotFound { .. }) => {
                self.found.lock().remove(account);
                self.foreign.lock().insert(account.to_owned());
                tracing::info!(account = %account, "an outbox in the counter store belongs to an account this catalog does not have; left for its own gateways");
                Ok(false)
            }
            Err(e) => Err(StoreError::Unavailable(format!("catalog: {e}"))),
        }
    }

    /// Refund the unended admissions of gateways that died (no heartbeat)
    /// whose leases have run out. Returns how many were refunded.
    pub async fn reap_dead(&self) -> Result<u64, StoreError> {
        let limiter = self.limiter()?;
        let store = limiter.store();
        let me = limiter.instance();
        let mut alive: std::collections::HashMap<String, bool> = Default::default();
        let mut reaped = 0;
        for account in store.wallet_accounts().await? {
            for admission in store.unended_admissions(&account).await? {
                if admission.instance == me {
                    continue;
                }
                let live = match alive.get(&admission.instance) {
                    Some(&live) => live,
                    None => {
                        let live = store.instance_alive(&admission.instance).await?;
                        alive.insert(admission.instance.clone(), live);
                        live
                    }
                };
                if live {
                    continue;
                }
                let now_ms = self.clock.now_ms();
                if store.reap(&account, &admission, now_ms).await? {
                    reaped += 1;
                    self.mark_found(vec![account.clone()]);
                }
            }
        }
        if reaped > 0 {
            self.stats.reaped.fetch_add(reaped, Ordering::Relaxed);
            tracing::info!(
                reaped,
                "refunded admissions of gateways that died before their requests ended"
            );
        }
        Ok(reaped)
    }

    /// Say this gateway is alive.
    pub async fn heartbeat(&self) -> Result<(), StoreError> {
        let limiter = self.limiter()?;
        limiter
            .store()
            .heartbeat(limiter.instance(), HEARTBEAT_TTL.as_millis() as u64)
            .await
    }

    /// For graceful shutdown: write what is pending, for up to `timeout`.
    /// Returns the accounts whose outbox could not be written.
    pub async fn drain(&self, timeout: Duration) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Empty, and nothing taken out of it by the writer task still
            // being written: done. (Checking `dirty` alone returned while
            // the writer was mid-batch, and the process exited before the
            // batch reached the catalog.)
            if self.pending_accounts() == 0 {
                return Vec::new();
            }
            if self.dirty.lock().is_empty() {
                // The writer task has them: wait for it.
                if tokio::time::Instant::now() >= deadline {
                    let n = self.flushing.load(Ordering::SeqCst);
                    return vec![format!("({n} being written by the writer task)")];
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            self.flush_dirty().await;
            if tokio::time::Instant::now() >= deadline {
                let mut left: Vec<String> = self.dirty.lock().iter().cloned().collect();
                left.sort();
                return left;
            }
            if !self.dirty.lock().is_empty() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    async fn invalidate(&self, inv: Invalidation) {
        let Ok(limiter) = self.limiter() else { return };
        let store = limiter.store();
        match inv {
            Invalidation::Credits { account, version } => {
                if let Err(e) = store.wallet_invalidate(&account, Some(version)).await {
                    // The wallet keeps its old view until it expires
                    // (`WALLET_TTL_MS`); say so loudly.
                    tracing::error!(error = %e, account = %account, "dropping a credit wallet after a catalog change failed");
                }
            }
            // Notifications may have been missed (the LISTEN connection
            // was lost): compare every wallet this process knows with the
            // catalog's version once the catalog answers, and drop only
            // those that are behind. Wallets keep serving meanwhile — a
            // Postgres outage must not take credits down.
            Invalidation::All => {
                let mut accounts: Vec<String> = self.known.lock().iter().cloned().collect();
                let mut wait = FIRST_BACKOFF;
                while !accounts.is_empty() {
                    let mut left = Vec::new();
                    for account in accounts {
                        let checked = match self.catalog.credit_snapshot(&account).await {
                            Ok(s) => store
                                .wallet_invalidate(&account, Some(s.version))
                                .await
                                .is_ok(),
                            Err(_) => false,
                        };
                        if !checked {
                            left.push(account);
                        }
                    }
                    accounts = left;
                    if !accounts.is_empty() {
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(MAX_BACKOFF);
                    }
                }
            }
            _ => {}
        }
    }
}

#[async_trait::async_trait]
impl<S: CounterStore> WalletSource for Outbox<S> {
    async fn snapshot(&self, account: &str) -> Result<WalletSnapshot, StoreError> {
        let loaded_ms = self.clock.now_ms();
        let snapshot = self
            .catalog
            .credit_snapshot(account)
            .await
            .map_err(|e| match e {
                CatalogError::Unavailable(e) => {
                    StoreError::Catalog(format!("loading the credit wallet: {e}"))
                }
                e => StoreError::Protocol(format!("catalog: {e}")),
            })?;
        self.known.lock().insert(account.to_owned());
        self.stats.loads.fetch_add(1, Ordering::Relaxed);
        Ok(WalletSnapshot {
            version: snapshot.version,
            loaded_ms,
            // Read before the catalog by the limiter (`Limiter::load_wallet`).
            acks: 0,
            blocks: snapshot
                .blocks
                .into_iter()
                .map(|b| WalletBlock {
                    expires_ms: b.expires_at.map(|t| {
                        t.duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_millis() as u64)
                    }),
                    id: b.id,
                    remaining: b.credits_remaining,
                })
                .collect(),
        })
    }

    async fn flush(&self, account: &str) -> Result<(), StoreError> {
        self.flush_account(account).await.map(|_| ())
    }

    fn wrote(&self, account: &str) {
        // Written by this process: its catalog's.
        {
            let mut found = self.found.lock();
            if !found.is_empty() {
                found.remove(account);
            }
        }
        let mut dirty = self.dirty.lock();
        if dirty.contains(account) {
            return;
        }
        dirty.insert(account.to_owned());
        drop(dirty);
        self.wake.notify_one();
    }
}

/// Write dirty outboxes as they appear: no timer between batches, so a
/// busy account's entries form one batch per catalog commit (group
/// commit); failures back off.
async fn write_loop<S: CounterStore>(outbox: Weak<Outbox<S>>) {
    let mut backoff = FIRST_BACKOFF;
    let now = tokio::time::Instant::now();
    let (mut next_recovery, mut next_heartbeat, mut next_reap) = (now, now, now + REAP_EVERY);
    loop {
        let Some(o) = outbox.upgrade() else { return };
        let now = tokio::time::Instant::now();
        if now >= next_heartbeat {
            if let Err(e) = o.heartbeat().await {
                tracing::warn!(error = %e, "saying this gateway is alive in the counter store failed");
            }
            next_heartbeat = now + HEARTBEAT_EVERY;
        }
        if now >= next_recovery {
            if let Err(e) = o.recover().await {
                tracing::warn!(error = %e, "looking for credit outboxes in the counter store failed");
            }
            next_recovery = now + RECOVERY_EVERY;
        }
        if now >= next_reap {
            if let Err(e) = o.reap_dead().await {
                tracing::warn!(error = %e, "looking for admissions of dead gateways failed");
            }
            next_reap = now + REAP_EVERY;
        }
        let failed = o.flush_dirty().await;
        let wait = if failed > 0 {
            let wait = backoff;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            wait
        } else {
            backoff = FIRST_BACKOFF;
            // Idle: wake up for the next heartbeat (and to notice the
            // outbox was dropped).
            IDLE_WAKE.min(next_heartbeat.saturating_duration_since(tokio::time::Instant::now()))
        };
        if failed > 0 || o.dirty.lock().is_empty() {
            let _ = tokio::time::timeout(wait, o.wake.notified()).await;
        }
    }
}

/// Drop wallets when the catalog says their credits changed.
async fn follow<S: CounterStore>(
    outbox: Weak<Outbox<S>>,
    mut events: tokio::sync::broadcast::Receiver<Invalidation>,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let inv = match events.recv().await {
            Ok(inv) => inv,
            Err(RecvError::Lagged(_)) => Invalidation::All,
            Err(RecvError::Closed) => return,
        };
        let Some(o) = outbox.upgrade() else { return };
        if inv == Invalidation::All {
            // May wait for the catalog to come back: not in the way of
            // the notifications that follow.
            tokio::spawn(async move { o.invalidate(inv).await });
        } else {
            o.invalidate(inv).await;
        }
    }
}
