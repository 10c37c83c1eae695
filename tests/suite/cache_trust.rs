//! The catalog cache keeps key and account entries past their TTL only
//! while the Postgres catalog confirms (a heartbeat on its LISTEN
//! connection) that invalidations arrive; when the confirmations stop, the
//! plain TTLs apply again (that fallback is unit-tested in
//! `catalog::cache`, where the clock can outrun the heartbeat). This is
//! what keeps 100,000 keys used once a minute each off the database
//! (docs/PERFORMANCE.md).

use std::sync::Arc;
use std::time::Duration;

use plangate::catalog::cache::{CacheConfig, CatalogCache};
use plangate::catalog::postgres::{migrate, PostgresCatalog};
use plangate::catalog::{hash_key, Catalog};
use plangate::clock::{Clock, ManualClock};
use plangate::plans::parse::parse_plans;

const T0: u64 = 1_700_000_000_000;

/// Wait (bounded) until the catalog has confirmed its notifications at or
/// after `at_ms` — the heartbeat runs every second in real time.
async fn confirmed_since(catalog: &PostgresCatalog, at_ms: u64) -> bool {
    for _ in 0..60 {
        if catalog
            .invalidations_confirmed_ms()
            .is_some_and(|c| c >= at_ms)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_outlive_their_ttl_only_while_notifications_are_confirmed() {
    let Some(url) = plangate_tests::postgres_db("trust").await else {
        return;
    };
    migrate(&url).await.expect("migrate");
    let clock = ManualClock::new(T0);
    let catalog = Arc::new(
        PostgresCatalog::connect(&url, Arc::new(clock.clone()))
            .await
            .expect("connect"),
    );
    let plans = parse_plans(
        "default_plan: free\nplans:\n  free:\n    endpoints:\n      m:\n        fixed_windows:\n          - { window: 60s, limit: 5 }\n",
        "plans.yaml",
    )
    .expect("plans");
    catalog.apply_plans(&plans, false).await.unwrap();
    catalog
        .create_account("acct", None, serde_json::Value::Null)
        .await
        .unwrap();
    let key = catalog.create_key("acct").await.unwrap();
    let hash = hash_key(&key.key);
    let dyn_catalog: Arc<dyn Catalog> = catalog.clone();
    let config = CacheConfig::default();
    let key_ttl = config.key_ttl;
    let cache = CatalogCache::new(dyn_catalog, Arc::new(clock.clone()), config)
        .await
        .unwrap();

    assert!(confirmed_since(&catalog, T0).await, "no heartbeat");
    assert!(cache.resolve_key(&hash).await.unwrap().is_some());

    // Past the key TTL, but with a fresh confirmation: still served from
    // memory, no database read. On a loaded machine the LISTEN heartbeat
    // can miss a beat and the channel is then (rightly) distrusted and
    // re-established, which reloads everything once; so allow a few
    // attempts, each a full TTL later, and require one clean one.
    let mut served_from_memory = false;
    for _ in 0..3 {
        let loads = cache.stats().loads;
        clock.advance(key_ttl + Duration::from_secs(1));
        assert!(
            confirmed_since(&catalog, clock.now_ms()).await,
            "no heartbeat"
        );
        assert!(cache.resolve_key(&hash).await.unwrap().is_some());
        if cache.stats().loads == loads {
            served_from_memory = true;
            break;
        }
    }
    assert!(
        served_from_memory,
        "a confirmed entry was reloaded every time"
    );

    // A revocation still arrives at once (the notification).
    catalog.revoke_key(&key.id).await.unwrap();
    let mut revoked = false;
    for _ in 0..50 {
        if cache.resolve_key(&hash).await.unwrap().is_none() {
            revoked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(revoked, "revocation not seen");
}
