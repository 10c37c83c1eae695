//! Credit wallets (`limiter/wallet.rs`, `credits.rs`): balances held in the
//! counter store, charged atomically with the windows, recorded in the
//! catalog from the store's outbox. Every case runs on both backends: the
//! in-process store with the in-process catalog, and Redis with Postgres
//! (two limiters with their own connections — two gateway instances — on
//! one Redis and one database). Time is a `ManualClock`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use plangate::catalog::memory::MemoryCatalog;
use plangate::catalog::postgres::{migrate, PostgresCatalog};
use plangate::catalog::{Catalog, LedgerEntry};
use plangate::clock::ManualClock;
use plangate::credits::Outbox;
use plangate::limiter::memory::MemoryStore;
use plangate::limiter::redis::{RedisOptions, RedisStore};
use plangate::limiter::{AnyStore, Attempt, Denial, Ending, Limiter};
use plangate::plans::{CreditCost, PerUnit, Policy, Unit, Window, WindowLen};

/// 2023-11-14 22:13:20 UTC.
const T0: u64 = 1_700_000_000_000;

/// One gateway instance: a limiter on the shared store, its outbox on the
/// shared catalog.
struct Instance {
    limiter: Arc<Limiter<AnyStore>>,
    outbox: Arc<Outbox<AnyStore>>,
}

struct Backend {
    name: &'static str,
    catalog: Arc<dyn Catalog>,
    instances: Vec<Instance>,
    clock: ManualClock,
}

impl Backend {
    /// Write every outbox to the catalog.
    async fn flush(&self) {
        for i in &self.instances {
            for _ in 0..50 {
                i.outbox.recover().await.expect("recover");
                if i.outbox.flush_dirty().await == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    async fn account(&self, id: &str, blocks: &[(u64, Option<Duration>)]) {
        self.catalog
            .create_account(id, None, serde_json::json!({}))
            .await
            .expect("account");
        for &(credits, expires) in blocks {
            let at = expires.map(|d| UNIX_EPOCH + Duration::from_millis(T0) + d);
            self.catalog
                .create_quota_block(id, credits, at, serde_json::json!({}))
                .await
                .expect("grant");
        }
    }
}

fn instance(store: AnyStore, clock: &ManualClock, catalog: &Arc<dyn Catalog>) -> Instance {
    let limiter =
        Limiter::with_keeper_interval(store, Arc::new(clock.clone()), Duration::from_secs(2), None);
    let outbox = Outbox::install(&limiter, catalog.clone());
    outbox.start();
    Instance { limiter, outbox }
}

fn memory() -> Backend {
    let clock = ManualClock::new(T0);
    let catalog: Arc<dyn Catalog> = Arc::new(MemoryCatalog::new(Arc::new(clock.clone())));
    let instances = vec![instance(MemoryStore::new().into(), &clock, &catalog)];
    Backend {
        name: "memory",
        catalog,
        instances,
        clock,
    }
}

async fn redis_postgres() -> Option<Backend> {
    let redis = plangate_tests::redis().await?;
    let db = plangate_tests::postgres_db("wal").await?;
    migrate(&db).await.expect("migrate");
    let clock = ManualClock::new(T0);
    let prefix = format!("wallet-test-{}:", rand_suffix());
    let mut instances = Vec::new();
    let mut first: Option<Arc<dyn Catalog>> = None;
    for _ in 0..2 {
        let catalog: Arc<dyn Catalog> = Arc::new(
            PostgresCatalog::connect(&db, Arc::new(clock.clone()))
                .await
                .expect("catalog"),
        );
        let options = RedisOptions {
            key_prefix: prefix.clone(),
            ..RedisOptions::default()
        };
        let store = RedisStore::connect_with(&redis, options)
            .await
            .expect("redis");
        instances.push(instance(store.into(), &clock, &catalog));
        first.get_or_insert(catalog);
    }
    Some(Backend {
        name: "redis+postgres",
        catalog: first.expect("two instances"),
        instances,
        clock,
    })
}

fn rand_suffix() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{nanos:x}")
}

async fn backends() -> Vec<Backend> {
    let mut out = vec![memory()];
    if let Some(b) = redis_postgres().await {
        out.push(b);
    }
    out
}

fn policy(per_request: u64, min_balance: u64, per_token: Option<(u64, u64)>) -> Arc<Policy> {
    let mut per_unit = BTreeMap::new();
    if let Some((credits, per)) = per_token {
        per_unit.insert(Unit::new("token"), PerUnit { credits, per });
    }
    Arc::new(Policy {
        windows: vec![Window {
            len: WindowLen::Fixed(60),
            limit: 1_000_000,
            unit: Unit::request(),
        }],
        max_concurrent: 0,
        concurrency_expiry_secs: 60,
        credits: Some(CreditCost {
            min_balance,
            per_request,
            per_unit,
        }),
        enforce: true,
        key: None,
    })
}

/// Attempt on instance `i`; `Ok(permit)` when admitted, the denial else.
async fn attempt(
    b: &Backend,
    i: usize,
    id: &str,
    account: &str,
    policy: &Arc<Policy>,
) -> Result<plangate::limiter::Permit<AnyStore>, Denial> {
    let inst = &b.instances[i % b.instances.len()];
    match inst
        .limiter
        .attempt(id, account, "chat", policy, &[])
        .await
        .expect("attempt")
    {
        Attempt::Admitted(p, _) => Ok(p),
        Attempt::Denied(d, _) => Err(d),
    }
}

fn net(ledger: &[LedgerEntry]) -> u64 {
    ledger.iter().map(|e| e.deducted - e.refunded).sum()
}

/// N concurrent admissions (1 credit each) against a balance of B in
/// three blocks with different expiries admit exactly B, across two
/// instances; the catalog ends with exactly B deducted, one ledger row per
/// admission, drawn earliest expiry first and the never-expiring block
/// last.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exact_admission_draws_blocks_in_expiry_order() {
    for b in backends().await {
        let b = Arc::new(b);
        b.account(
            "acct",
            &[
                (60, None),
                (50, Some(Duration::from_secs(3600))),
                (40, Some(Duration::from_secs(60))),
            ],
        )
        .await;
        let policy = policy(1, 1, None);
        const N: usize = 400;
        let start = Arc::new(tokio::sync::Barrier::new(N));
        let mut tasks = Vec::new();
        for n in 0..N {
            let (b, policy, start) = (b.clone(), policy.clone(), start.clone());
            tasks.push(tokio::spawn(async move {
                start.wait().await;
                match attempt(&b, n, &format!("r{n}"), "acct", &policy).await {
                    Ok(p) => {
                        p.end_as(Ending::default()).await.expect("end");
                        true
                    }
                    Err(Denial::Credits { balance, required }) => {
                        assert_eq!((balance, required), (0, 1));
                        false
                    }
                    Err(d) => panic!("unexpected denial {d:?}"),
                }
            }));
        }
        let mut admitted = 0;
        for t in tasks {
            admitted += usize::from(t.await.expect("task"));
        }
        assert_eq!(admitted, 150, "{}: exactly the balance", b.name);
        b.flush().await;
        assert_eq!(b.catalog.balance("acct").await.unwrap(), 0, "{}", b.name);
        let ledger = b.catalog.ledger("acct").await.unwrap();
        assert_eq!(ledger.len(), 150, "{}: one row per admission", b.name);
        assert_eq!(net(&ledger), 150, "{}", b.name);
        // Drain order: the 60 s block, then the 1 h block, then the
        // never-expiring one; every row of the first 40 admissions draws
        // the 60 s block... by construction each row draws one block.
        let blocks = b.catalog.list_quota_blocks("acct").await.unwrap();
        assert!(
            blocks.iter().all(|q| q.credits_remaining == 0),
            "{}: {blocks:?}",
            b.name
        );
    }
}

/// A block that expires mid-load is drawn before its expiry and not after;
/// the never-expiring block is drawn last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_expiring_mid_load_is_not_drawn_after_expiry() {
    for b in backends().await {
        b.account("acct", &[(50, None), (50, Some(Duration::from_secs(10)))])
            .await;
        let policy = policy(1, 1, None);
        let mut admitted = 0;
        for n in 0..130 {
            if n == 30 {
                // 30 drawn from the expiring block; it expires with 20 left.
                b.clock.advance(Duration::from_secs(10));
            }
            if let Ok(p) = attempt(&b, n, &format!("a{n}"), "acct", &policy).await {
                p.end_as(Ending::default()).await.expect("end");
                admitted += 1;
            }
        }
        assert_eq!(admitted, 80, "{}: 30 + the never-expiring 50", b.name);
        b.flush().await;
        let blocks = b.catalog.list_quota_blocks("acct").await.unwrap();
        let remaining: Vec<u64> = blocks.iter().map(|q| q.credits_remaining).collect();
        assert_eq!(
            remaining,
            vec![0, 20],
            "{}: never-expiring drained, expired kept 20",
            b.name
        );
        assert_eq!(b.catalog.balance("acct").await.unwrap(), 0, "{}", b.name);
    }
}

/// `min_balance` holds at admission; a per-unit charge above the balance
/// takes what is there and records the shortfall; an upstream failure
/// gives the admission charge back (the catalog never records it); each
/// served request is one ledger row with both charges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_balance_shortfall_and_refund() {
    for b in backends().await {
        b.account("acct", &[(12, None)]).await;
        let policy = policy(1, 10, Some((1, 1)));
        // 12 -> 11 -> 10; the third admission needs 10 and leaves 9.
        let p1 = attempt(&b, 0, "r1", "acct", &policy).await.expect("first");
        assert_eq!(p1.ticket().charged.as_ref().map(|c| c.balance), Some(11));
        let p2 = attempt(&b, 1, "r2", "acct", &policy).await.expect("second");
        let p3 = attempt(&b, 0, "r3", "acct", &policy).await.expect("third");
        assert_eq!(p3.ticket().charged.as_ref().map(|c| c.balance), Some(9));
        match attempt(&b, 1, "r4", "acct", &policy).await {
            Err(Denial::Credits { balance, required }) => assert_eq!((balance, required), (9, 10)),
            other => panic!(
                "{}: expected a credit denial, got {:?}",
                b.name,
                other.map(|_| ())
            ),
        }
        // r1's upstream failed: its credit comes back.
        p1.end_as(Ending {
            units: vec![],
            charge: 0,
            refund: true,
            usage: None,
        })
        .await
        .expect("end r1");
        // r2 used 4 tokens: 4 credits charged.
        p2.end_as(Ending {
            units: vec![(Unit::new("token"), 4)],
            charge: 4,
            refund: false,
            usage: None,
        })
        .await
        .expect("end r2");
        // r3 used 100 tokens: 100 credits owed, 6 left to take.
        p3.end_as(Ending {
            units: vec![(Unit::new("token"), 100)],
            charge: 100,
            refund: false,
            usage: None,
        })
        .await
        .expect("end r3");
        b.flush().await;
        let ledger = b.catalog.ledger("acct").await.unwrap();
        let row = |k: &str| ledger.iter().find(|e| e.idempotency_key == k).cloned();
        // One ledger row per request, written at its end: r1's upstream
        // failed, so it has none (its admission was never recorded).
        assert_eq!(row("req:r1"), None, "{}", b.name);
        assert_eq!(row("adm:r1"), None, "{}", b.name);
        let r3 = row("req:r3").expect("req:r3");
        assert_eq!(
            (r3.requested, r3.deducted, r3.shortfall),
            (101, 7, 94),
            "{}: admission + per-unit charge, shortfall recorded",
            b.name
        );
        assert_eq!(row("req:r2").map(|e| e.deducted), Some(5), "{}", b.name);
        assert_eq!(ledger.len(), 2, "{}: {ledger:#?}", b.name);
        assert_eq!(b.catalog.balance("acct").await.unwrap(), 0, "{}", b.name);
        assert_eq!(net(&ledger), 12, "{}", b.name);
    }
}

/// Changes made in the catalog reach loaded wallets: a grant admits an
/// account that was out of credits, expiring its blocks refuses it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_changes_reach_loaded_wallets() {
    for b in backends().await {
        b.account("acct", &[(1, None)]).await;
        let policy = policy(1, 1, None);
        let admitted = |n: usize, id: String| {
            let (b, policy) = (&b, &policy);
            async move {
                match attempt(b, n, &id, "acct", policy).await {
                    Ok(p) => {
                        p.end_as(Ending::default()).await.expect("end");
                        true
                    }
                    Err(_) => false,
                }
            }
        };
        assert!(admitted(0, "r1".into()).await);
        assert!(!admitted(1, "r2".into()).await, "{}", b.name);
        b.catalog
            .create_quota_block("acct", 5, None, serde_json::json!({}))
            .await
            .unwrap();
        let mut admitted = false;
        for n in 0..100 {
            if attempt(&b, n, &format!("g{n}"), "acct", &policy)
                .await
                .is_ok()
            {
                admitted = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(admitted, "{}: the grant reached the wallet", b.name);
        b.catalog.expire_quota_blocks("acct").await.unwrap();
        let mut refused = false;
        for n in 0..100 {
            if attempt(&b, n, &format!("x{n}"), "acct", &policy)
                .await
                .is_err()
            {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(refused, "{}: the expiry reached the wallet", b.name);
        b.flush().await;
        // Every admission is in the ledger, exactly once.
        let ledger = b.catalog.ledger("acct").await.unwrap();
        let keys: std::collections::HashSet<_> =
            ledger.iter().map(|e| &e.idempotency_key).collect();
        assert_eq!(keys.len(), ledger.len(), "{}", b.name);
    }
}

/// What an instance decided and did not write survives it: a second
/// instance (a restart) finds the outbox and writes it; writing the same
/// operations twice (a crash between the catalog's commit and the
/// acknowledgement) changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_left_by_a_dead_instance_is_written_once() {
    let Some(b) = redis_postgres().await else {
        return;
    };
    b.account("acct", &[(100, None)]).await;
    let policy = policy(1, 1, None);
    for n in 0..40 {
        let p = attempt(&b, 0, &format!("r{n}"), "acct", &policy)
            .await
            .expect("admit");
        p.end_as(Ending::default()).await.expect("end");
    }
    // The operations as the store holds them, before anyone writes them.
    let store = b.instances[0].limiter.store();
    use plangate::limiter::CounterStore;
    let ops: Vec<_> = store
        .outbox_read("acct", 1000)
        .await
        .expect("read")
        .into_iter()
        .filter_map(|i| match i.op {
            plangate::limiter::wallet::OutboxOp::Credit(op) => Some(op),
            plangate::limiter::wallet::OutboxOp::Usage(_) => None,
        })
        .collect();
    assert!(!ops.is_empty());
    // Written twice, as a crash after commit and before the ack would.
    b.catalog.record_credit_ops("acct", &ops).await.unwrap();
    b.catalog.record_credit_ops("acct", &ops).await.unwrap();
    // The other instance recovers the outbox (and writes it again).
    b.instances[1].outbox.recover().await.expect("recover");
    assert_eq!(b.instances[1].outbox.flush_dirty().await, 0);
    let ledger = b.catalog.ledger("acct").await.unwrap();
    assert_eq!(ledger.len(), 40);
    assert_eq!(net(&ledger), 40);
    assert_eq!(b.catalog.balance("acct").await.unwrap(), 60);
    // Instance 0's own writer may still be acknowledging its copy.
    let mut left = usize::MAX;
    for _ in 0..200 {
        left = store.outbox_read("acct", 10).await.unwrap().len();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(left, 0);
}

/// A request's admission charge reaches the catalog only at its end, with
/// its per-unit charge (one ledger row). A wallet dropped and loaded again
/// while admissions are unended holds their draws back, so the balance
/// stays exact: 10 credits, r1 admitted (1), a grant of 5 drops the
/// wallet, r2 admitted from the reloaded wallet; both end; the wallet and
/// the catalog agree on 13. (Loaded without holding r1 back, the wallet
/// said 14 while the catalog said 13.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_holds_back_unended_admissions() {
    use plangate::clock::Clock;
    use plangate::limiter::CounterStore;
    for b in backends().await {
        b.account("acct", &[(10, None)]).await;
        let policy = policy(1, 1, None);
        let r1 = attempt(&b, 0, "r1", "acct", &policy).await.expect("r1");
        b.catalog
            .create_quota_block("acct", 5, None, serde_json::json!({}))
            .await
            .unwrap();
        // Wait for the grant's invalidation to drop the wallet everywhere:
        // an admission then reloads it.
        let store = |i: usize| b.instances[i % b.instances.len()].limiter.clone();
        let mut r2 = None;
        for n in 0..200 {
            let p = attempt(&b, 1, &format!("g{n}"), "acct", &policy)
                .await
                .expect("admitted");
            let balance = p.ticket().charged.as_ref().map(|c| c.balance);
            if balance == Some(13) {
                r2 = Some(p);
                break;
            }
            // Still the old wallet (10 - r1 - this one): give it back.
            assert_eq!(balance, Some(8), "{}", b.name);
            p.end_as(Ending {
                refund: true,
                ..Ending::default()
            })
            .await
            .expect("end");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let r2 = r2.unwrap_or_else(|| panic!("{}: the grant never reached the wallet", b.name));
        r1.end_as(Ending::default()).await.expect("end r1");
        r2.end_as(Ending::default()).await.expect("end r2");
        b.flush().await;
        assert_eq!(b.catalog.balance("acct").await.unwrap(), 13, "{}", b.name);
        for i in 0..b.instances.len() {
            let wallet = store(i)
                .store()
                .wallet_balance("acct", b.clock.now_ms())
                .await
                .expect("balance");
            assert_eq!(wallet, Some(13), "{}: the wallet agrees", b.name);
        }
        // One row per served request; those given back left none.
        let ledger = b.catalog.ledger("acct").await.unwrap();
        let keys: Vec<&str> = ledger.iter().map(|e| e.idempotency_key.as_str()).collect();
        assert_eq!(keys.len(), 2, "{}: {keys:?}", b.name);
        assert_eq!(keys[0], "req:r1", "{}", b.name);
        assert!(keys[1].starts_with("req:g"), "{}: {keys:?}", b.name);
    }
}

/// A wallet load refuses a snapshot read before an outbox batch was
/// acknowledged (the catalog may have recorded the batch after the read):
/// `wallet_init` with the acknowledgement count read before the batch says
/// `Pending`, with the count read after it loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_read_before_an_acknowledgement_is_refused() {
    use plangate::clock::Clock;
    use plangate::limiter::wallet::{WalletInit, WalletSnapshot};
    use plangate::limiter::CounterStore;
    for b in backends().await {
        b.account("acct", &[(10, None)]).await;
        let policy = policy(1, 1, None);
        let p = attempt(&b, 0, "r1", "acct", &policy).await.expect("r1");
        let store = b.instances[0].limiter.store();
        let before = store.outbox_acks("acct").await.expect("acks");
        // The end's ledger row is written and acknowledged (by the flush,
        // or the background writer before it).
        p.end_as(Ending::default()).await.expect("end");
        b.flush().await;
        let after = store.outbox_acks("acct").await.expect("acks");
        assert!(after > before, "{}: {before} -> {after}", b.name);
        store
            .wallet_invalidate("acct", None)
            .await
            .expect("drop the wallet");
        let snapshot = |acks| WalletSnapshot {
            version: 1_000_000,
            loaded_ms: b.clock.now_ms(),
            acks,
            blocks: Vec::new(),
        };
        assert_eq!(
            store
                .wallet_init("acct", &snapshot(before))
                .await
                .expect("init"),
            WalletInit::Pending,
            "{}",
            b.name
        );
        // With the count read after every acknowledgement it loads (read
        // again while a second flusher, the background writer, may still
        // acknowledge the same entry).
        let mut loaded = WalletInit::Pending;
        for _ in 0..100 {
            let acks = store.outbox_acks("acct").await.expect("acks");
            assert!(acks >= after, "{}", b.name);
            loaded = store
                .wallet_init("acct", &snapshot(acks))
                .await
                .expect("init");
            if loaded == WalletInit::Loaded {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(loaded, WalletInit::Loaded, "{}", b.name);
    }
}
