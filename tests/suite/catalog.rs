//! Catalog tests: one conformance suite run on the in-process and the
//! Postgres catalog, plus Postgres-only tests (contention, LISTEN/NOTIFY
//! invalidation across pools, migrations, the admin CLI end to end).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use plangate::catalog::cache::{CacheConfig, CatalogCache};
use plangate::catalog::memory::MemoryCatalog;
use plangate::catalog::postgres::{migrate, PgOptions, PostgresCatalog, MIGRATIONS};
use plangate::catalog::timed::Timed;
use plangate::catalog::{hash_key, Catalog, CatalogError, Deduction, Invalidation, QuotaBlock};
use plangate::clock::{Clock, ManualClock, SharedClock, SystemClock};
use plangate::plans::{
    CreditCost, NotifyRule, PerUnit, Period, Plan, PlanSet, Policy, Unit, Window, WindowLen,
};

mod batch;
mod usage;

const T0: u64 = 1_700_000_000_000;

struct Fixture {
    catalog: Arc<dyn Catalog>,
    clock: ManualClock,
    /// Set for Postgres.
    url: Option<String>,
}

impl Fixture {
    fn at(&self, offset: Duration) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(T0) + offset
    }
}

fn memory() -> Fixture {
    let clock = ManualClock::new(T0);
    Fixture {
        catalog: Arc::new(MemoryCatalog::new(Arc::new(clock.clone()))),
        clock,
        url: None,
    }
}

/// A fresh, migrated database; `None` (loudly skipped) without Postgres.
async fn fresh_db() -> Option<String> {
    let url = plangate_tests::postgres_db("cat").await?;
    migrate(&url).await.expect("migrate");
    Some(url)
}

async fn postgres() -> Option<Fixture> {
    let url = fresh_db().await?;
    let clock = ManualClock::new(T0);
    let catalog = PostgresCatalog::connect(&url, Arc::new(clock.clone()))
        .await
        .expect("connect");
    Some(Fixture {
        catalog: Arc::new(catalog),
        clock,
        url: Some(url),
    })
}

fn policy(limit: u64) -> Arc<Policy> {
    Arc::new(Policy {
        windows: vec![Window {
            len: WindowLen::Fixed(60),
            limit,
            unit: Unit::request(),
        }],
        max_concurrent: 0,
        concurrency_expiry_secs: 60,
        credits: None,
        enforce: true,
        key: None,
    })
}

fn plan(id: &str, limit: u64) -> Arc<Plan> {
    Arc::new(Plan {
        id: id.into(),
        name: format!("Plan {id}"),
        endpoints: [("chat".to_string(), policy(limit))].into(),
        notify: Vec::new(),
    })
}

/// A plan using every feature, to check the JSONB round trip.
fn rich_plan(id: &str) -> Arc<Plan> {
    let chat = Policy {
        windows: vec![
            Window {
                len: WindowLen::Fixed(60),
                limit: 3,
                unit: Unit::request(),
            },
            Window {
                len: WindowLen::Fixed(86_400),
                limit: 200,
                unit: Unit::request(),
            },
            Window {
                len: WindowLen::Fixed(60),
                limit: 40_000,
                unit: Unit::new("token"),
            },
        ],
        max_concurrent: 4,
        concurrency_expiry_secs: 30,
        credits: Some(CreditCost {
            min_balance: 2,
            per_request: 1,
            per_unit: [(
                Unit::new("token"),
                PerUnit {
                    credits: 1,
                    per: 1000,
                },
            )]
            .into(),
        }),
        enforce: true,
        key: None,
    };
    Arc::new(Plan {
        id: id.into(),
        name: "Rich — ünïcode".into(),
        endpoints: [
            ("gpt-4-turbo".to_string(), Arc::new(chat)),
            ("dall-e-3".to_string(), policy(1)),
        ]
        .into(),
        notify: vec![
            NotifyRule::Window { percent: 80 },
            NotifyRule::Balance { percent: 90 },
            NotifyRule::Expiry {
                within_secs: 7 * 86_400,
            },
        ],
    })
}

fn set(default: Option<&str>, plans: &[Arc<Plan>]) -> PlanSet {
    PlanSet {
        default_plan: default.map(str::to_string),
        plans: plans
            .iter()
            .map(|p| (p.id.clone(), p.clone()))
            .collect::<BTreeMap<_, _>>(),
    }
}

fn deduction(account: &str, amount: u64, key: &str) -> Deduction {
    Deduction {
        account_id: account.into(),
        amount,
        require_full: false,
        min_balance: 0,
        idempotency_key: key.into(),
        request_id: Some(format!("req-{key}")),
        endpoint: Some("chat".into()),
    }
}

fn is_not_found<T: std::fmt::Debug>(r: Result<T, CatalogError>) -> bool {
    matches!(r, Err(CatalogError::NotFound { .. }))
}

fn is_conflict<T: std::fmt::Debug>(r: Result<T, CatalogError>) -> bool {
    matches!(r, Err(CatalogError::Conflict(_)))
}

fn is_invalid<T: std::fmt::Debug>(r: Result<T, CatalogError>) -> bool {
    matches!(r, Err(CatalogError::Invalid(_)))
}

fn remaining(blocks: &[QuotaBlock], id: &str) -> u64 {
    blocks
        .iter()
        .find(|b| b.id == id)
        .map(|b| b.credits_remaining)
        .unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------- plans

async fn default_plan_rules(f: Fixture) {
    let c = &f.catalog;
    assert_eq!(c.default_plan().await.unwrap(), None);
    assert!(c.list_plans().await.unwrap().plans.is_empty());

    // The first plan ever applied becomes the default when none is named.
    let r = c
        .apply_plans(&set(None, &[plan("b", 10), plan("a", 10)]), false)
        .await
        .unwrap();
    assert_eq!(r.upserted, vec!["a", "b"]);
    assert_eq!(r.default_plan.as_deref(), Some("a"));
    assert_eq!(c.default_plan().await.unwrap().as_deref(), Some("a"));

    // A later set without a default leaves it alone; one naming it moves it.
    c.apply_plans(&set(None, &[plan("c", 10)]), false)
        .await
        .unwrap();
    assert_eq!(c.default_plan().await.unwrap().as_deref(), Some("a"));
    c.apply_plans(&set(Some("b"), &[plan("b", 10)]), false)
        .await
        .unwrap();
    assert_eq!(c.default_plan().await.unwrap().as_deref(), Some("b"));

    assert!(is_not_found(c.set_default_plan("nope").await));
    c.set_default_plan("c").await.unwrap();
    let listed = c.list_plans().await.unwrap();
    assert_eq!(listed.default_plan.as_deref(), Some("c"));
    assert_eq!(listed.plans.keys().collect::<Vec<_>>(), ["a", "b", "c"]);

    // Refusals: the default plan, a plan in use, an unknown plan.
    assert!(is_conflict(c.delete_plan("c").await));
    c.create_account("acct", Some("a"), serde_json::Value::Null)
        .await
        .unwrap();
    assert!(is_conflict(c.delete_plan("a").await));
    assert!(is_not_found(c.delete_plan("zzz").await));
    c.delete_plan("b").await.unwrap();
    assert!(is_not_found(c.delete_plan("b").await));
    assert!(is_not_found(c.get_plan("b").await));
    // Once the account leaves it, the plan can go.
    c.assign_plan("acct", None).await.unwrap();
    c.delete_plan("a").await.unwrap();
    assert_eq!(
        c.list_plans()
            .await
            .unwrap()
            .plans
            .keys()
            .collect::<Vec<_>>(),
        ["c"]
    );
    assert_eq!(c.default_plan().await.unwrap().as_deref(), Some("c"));
}

async fn plans_round_trip_and_upsert(f: Fixture) {
    let c = &f.catalog;
    let rich = rich_plan("rich");
    c.apply_plans(&set(Some("rich"), &[rich.clone(), plan("p", 10)]), false)
        .await
        .unwrap();
    assert_eq!(c.get_plan("rich").await.unwrap(), rich);
    assert_eq!(c.get_plan("p").await.unwrap(), plan("p", 10));
    // Upsert replaces the plan's policies.
    c.apply_plans(&set(None, &[plan("p", 20)]), false)
        .await
        .unwrap();
    assert_eq!(c.get_plan("p").await.unwrap(), plan("p", 20));
    assert_eq!(c.list_plans().await.unwrap().plans["rich"], rich);
    // A default_plan that names no plan is refused and changes nothing.
    assert!(is_invalid(
        c.apply_plans(&set(Some("ghost"), &[plan("q", 1)]), false)
            .await
    ));
    assert!(is_not_found(c.get_plan("q").await));
    assert_eq!(c.default_plan().await.unwrap().as_deref(), Some("rich"));
    // Ids: empty and over-long are refused.
    assert!(is_invalid(
        c.apply_plans(&set(None, &[plan("", 1)]), false).await
    ));
    let long = "x".repeat(201);
    assert!(is_invalid(
        c.apply_plans(&set(None, &[plan(&long, 1)]), false).await
    ));
    let max = "é".repeat(100);
    c.apply_plans(&set(None, &[plan(&max, 1)]), false)
        .await
        .unwrap();
    assert_eq!(c.get_plan(&max).await.unwrap().id, max);
}

async fn prune(f: Fixture) {
    let c = &f.catalog;
    c.apply_plans(
        &set(
            Some("a"),
            &[plan("a", 1), plan("b", 1), plan("c", 1), plan("d", 1)],
        ),
        false,
    )
    .await
    .unwrap();
    c.create_account("on-b", Some("b"), serde_json::Value::Null)
        .await
        .unwrap();
    let r = c
        .apply_plans(&set(None, &[plan("x", 1)]), true)
        .await
        .unwrap();
    assert_eq!(r.upserted, vec!["x"]);
    assert_eq!(r.pruned, vec!["c", "d"]);
    assert_eq!(r.kept_in_use, vec!["a", "b"]);
    assert_eq!(r.default_plan.as_deref(), Some("a"));
    assert_eq!(
        c.list_plans()
            .await
            .unwrap()
            .plans
            .keys()
            .collect::<Vec<_>>(),
        ["a", "b", "x"]
    );
    // Moving the default in the same apply lets the old default be pruned.
    let r = c
        .apply_plans(&set(Some("x"), &[plan("x", 1)]), true)
        .await
        .unwrap();
    assert_eq!(r.pruned, vec!["a"]);
    assert_eq!(r.kept_in_use, vec!["b"]);
    assert_eq!(c.default_plan().await.unwrap().as_deref(), Some("x"));
}

// ------------------------------------------------------------- accounts

async fn accounts(f: Fixture) {
    let c = &f.catalog;
    // Before any plan exists an account has no effective plan.
    let a = c
        .create_account("early", None, serde_json::Value::Null)
        .await
        .unwrap();
    assert_eq!(a.effective_plan, None);
    assert_eq!(a.metadata, serde_json::json!({}));

    c.apply_plans(
        &set(Some("free"), &[plan("free", 1), plan("pro", 5)]),
        false,
    )
    .await
    .unwrap();
    let meta = serde_json::json!({"email": "x@example.com", "tier": [1, 2]});
    let a = c.create_account("alice", None, meta.clone()).await.unwrap();
    assert_eq!(a.plan_id, None);
    assert_eq!(a.effective_plan.as_deref(), Some("free"));
    assert_eq!(a.metadata, meta);
    assert_eq!(c.get_account("alice").await.unwrap(), a);
    assert_eq!(
        c.get_account("early")
            .await
            .unwrap()
            .effective_plan
            .as_deref(),
        Some("free")
    );

    assert!(is_conflict(
        c.create_account("alice", Some("pro"), serde_json::Value::Null)
            .await
    ));
    assert!(is_not_found(
        c.create_account("bob", Some("ghost"), serde_json::Value::Null)
            .await
    ));
    assert!(is_not_found(c.get_account("bob").await));
    assert!(is_invalid(
        c.create_account("", None, serde_json::Value::Null).await
    ));
    assert!(is_invalid(
        c.create_account(&"x".repeat(201), None, serde_json::Value::Null)
            .await
    ));
    assert!(is_invalid(
        c.create_account("nul\0", None, serde_json::Value::Null)
            .await
    ));
    assert!(is_invalid(
        c.create_account("arr", None, serde_json::json!([1])).await
    ));

    c.assign_plan("alice", Some("pro")).await.unwrap();
    let a = c.get_account("alice").await.unwrap();
    assert_eq!(a.plan_id.as_deref(), Some("pro"));
    assert_eq!(a.effective_plan.as_deref(), Some("pro"));
    assert!(is_not_found(c.assign_plan("alice", Some("ghost")).await));
    assert!(is_not_found(c.assign_plan("bob", Some("pro")).await));
    assert_eq!(
        c.get_account("alice").await.unwrap().plan_id.as_deref(),
        Some("pro")
    );
    c.assign_plan("alice", None).await.unwrap();
    assert_eq!(c.get_account("alice").await.unwrap().plan_id, None);
    // The effective plan follows the default.
    c.set_default_plan("pro").await.unwrap();
    assert_eq!(
        c.get_account("alice")
            .await
            .unwrap()
            .effective_plan
            .as_deref(),
        Some("pro")
    );
}

// ------------------------------------------------------------------ keys

async fn keys(f: Fixture) {
    let c = &f.catalog;
    assert!(is_not_found(c.create_key("nobody").await));
    c.create_account("acct", None, serde_json::Value::Null)
        .await
        .unwrap();
    let k1 = c.create_key("acct").await.unwrap();
    let k2 = c.create_key("acct").await.unwrap();
    assert!(k1.key.starts_with("pg_"));
    assert_eq!(k1.key.len(), 46);
    assert!(k1.key[3..].chars().all(|ch| ch.is_ascii_alphanumeric()));
    assert!(k1.key.starts_with(&k1.prefix));
    assert!(k1.prefix.len() < 12);
    assert_ne!(k1.key, k2.key);
    assert_ne!(k1.id, k2.id);

    let owner = c.lookup_key(&hash_key(&k1.key)).await.unwrap().unwrap();
    assert_eq!(owner.key_id, k1.id);
    assert_eq!(owner.account_id, "acct");
    // Keys are found by hash only.
    assert_eq!(c.lookup_key(&k1.key).await.unwrap(), None);
    assert_eq!(c.lookup_key(&hash_key("pg_nope")).await.unwrap(), None);

    let listed = c.list_keys("acct").await.unwrap();
    assert_eq!(
        listed.iter().map(|k| k.id.as_str()).collect::<Vec<_>>(),
        [k1.id.as_str(), k2.id.as_str()]
    );
    assert!(listed.iter().all(|k| !k.revoked && k.account_id == "acct"));
    assert_eq!(listed[0].prefix, k1.prefix);
    assert_eq!(
        listed[0].created_at,
        Some(SystemTime::UNIX_EPOCH + Duration::from_millis(T0))
    );

    c.revoke_key(&k1.id).await.unwrap();
    assert_eq!(c.lookup_key(&hash_key(&k1.key)).await.unwrap(), None);
    assert!(c.lookup_key(&hash_key(&k2.key)).await.unwrap().is_some());
    // Revoking twice is an error (the operator learns the key was
    // already revoked), not a silent success.
    let again = c.revoke_key(&k1.id).await;
    assert!(matches!(again, Err(CatalogError::Conflict(_))), "{again:?}");
    assert!(again.unwrap_err().to_string().contains("already revoked"));
    assert!(is_not_found(c.revoke_key("key_missing").await));
    let listed = c.list_keys("acct").await.unwrap();
    assert!(listed[0].revoked && !listed[1].revoked);
    assert!(is_not_found(c.list_keys("nobody").await));
}

/// Who owns the plans, as gateways record it at start.
async fn plans_file_owner_round_trips(f: Fixture) {
    let c = &f.catalog;
    assert_eq!(c.plans_file_owner().await.unwrap(), None);
    c.set_plans_file_owner(Some("/etc/plangate/plans.yaml"))
        .await
        .unwrap();
    c.set_plans_file_owner(Some("/srv/plans.yaml"))
        .await
        .unwrap();
    assert_eq!(
        c.plans_file_owner().await.unwrap().as_deref(),
        Some("/srv/plans.yaml")
    );
    c.set_plans_file_owner(None).await.unwrap();
    assert_eq!(c.plans_file_owner().await.unwrap(), None);
}

/// Keys with a label and an expiry: found until the expiry (catalog
/// clock), refused from then on, by the catalog and by a cache that holds
/// them; labels and expiries in the past are refused.
async fn key_labels_and_expiry(f: Fixture) {
    use plangate::catalog::KeyOptions;
    let c = &f.catalog;
    c.create_account("acct", None, serde_json::Value::Null)
        .await
        .unwrap();
    let expires = f.at(Duration::from_secs(60));
    let opts = KeyOptions {
        label: Some("ci".into()),
        expires_at: Some(expires),
        ..KeyOptions::default()
    };
    let key = c.create_key_with("acct", &opts).await.unwrap();
    let plain = c.create_key("acct").await.unwrap();
    let listed = c.list_keys("acct").await.unwrap();
    assert_eq!(listed[0].label.as_deref(), Some("ci"));
    assert_eq!(listed[0].expires_at, Some(expires));
    assert_eq!(
        (listed[1].label.as_deref(), listed[1].expires_at),
        (None, None)
    );

    let cache = CatalogCache::new(c.clone(), Arc::new(f.clock.clone()), CacheConfig::default())
        .await
        .unwrap();
    let owner = c.lookup_key(&hash_key(&key.key)).await.unwrap().unwrap();
    assert_eq!(owner.expires_at_ms, Some(T0 + 60_000));
    assert!(cache
        .resolve_key(&hash_key(&key.key))
        .await
        .unwrap()
        .is_some());
    f.clock.advance(Duration::from_secs(60));
    // Expired: the catalog does not find it, and the cache refuses the
    // entry it holds without being told.
    assert_eq!(c.lookup_key(&hash_key(&key.key)).await.unwrap(), None);
    assert_eq!(cache.resolve_key(&hash_key(&key.key)).await.unwrap(), None);
    assert!(c.lookup_key(&hash_key(&plain.key)).await.unwrap().is_some());
    // Still listed, with its expiry.
    assert_eq!(c.list_keys("acct").await.unwrap().len(), 2);

    for bad in [
        KeyOptions {
            expires_at: Some(f.at(Duration::from_secs(60))),
            ..KeyOptions::default()
        },
        KeyOptions {
            label: Some(String::new()),
            ..KeyOptions::default()
        },
        KeyOptions {
            label: Some("x".repeat(201)),
            ..KeyOptions::default()
        },
        KeyOptions {
            label: Some("a\nb".into()),
            ..KeyOptions::default()
        },
    ] {
        let r = c.create_key_with("acct", &bad).await;
        assert!(matches!(r, Err(CatalogError::Invalid(_))), "{bad:?}: {r:?}");
    }
    assert_eq!(c.list_keys("acct").await.unwrap().len(), 2);
}

/// Key-level limits: a key carries a plan of its own (created with it,
/// changed, cleared), which lookups and caches see; an unknown plan is
/// refused; a plan a key uses is neither deleted nor pruned.
async fn key_plans(f: Fixture) {
    use plangate::catalog::KeyOptions;
    let c = &f.catalog;
    c.apply_plans(
        &set(Some("free"), &[plan("free", 10), plan("ci-small", 2)]),
        false,
    )
    .await
    .unwrap();
    c.create_account("acct", None, serde_json::Value::Null)
        .await
        .unwrap();
    let with_plan = KeyOptions {
        plan: Some("ci-small".into()),
        ..KeyOptions::default()
    };
    let key = c.create_key_with("acct", &with_plan).await.unwrap();
    let plain = c.create_key("acct").await.unwrap();
    let owner = c.lookup_key(&hash_key(&key.key)).await.unwrap().unwrap();
    assert_eq!(owner.plan_id.as_deref(), Some("ci-small"));
    let owner = c.lookup_key(&hash_key(&plain.key)).await.unwrap().unwrap();
    assert_eq!(owner.plan_id, None);
    let listed = c.list_keys("acct").await.unwrap();
    assert_eq!(listed[0].plan_id.as_deref(), Some("ci-small"));
    assert_eq!(listed[1].plan_id, None);

    // Unknown plans are refused, creating or updating.
    let ghost = KeyOptions {
        plan: Some("ghost".into()),
        ..KeyOptions::default()
    };
    let r = c.create_key_with("acct", &ghost).await;
    assert!(
        matches!(&r, Err(CatalogError::NotFound { kind: "plan", id }) if id == "ghost"),
        "{r:?}"
    );
    let r = c.create_key_with("nobody", &with_plan).await;
    assert!(
        matches!(
            &r,
            Err(CatalogError::NotFound {
                kind: "account",
                ..
            })
        ),
        "{r:?}"
    );
    let r = c.set_key_plan(&plain.id, Some("ghost")).await;
    assert!(
        matches!(&r, Err(CatalogError::NotFound { kind: "plan", .. })),
        "{r:?}"
    );
    assert!(is_not_found(c.set_key_plan("key_missing", None).await));
    assert_eq!(c.list_keys("acct").await.unwrap().len(), 2);

    // A plan a key uses stays.
    assert!(is_conflict(c.delete_plan("ci-small").await));
    let report = c
        .apply_plans(&set(Some("free"), &[plan("free", 10)]), true)
        .await
        .unwrap();
    assert_eq!(report.kept_in_use, vec!["ci-small".to_string()]);

    // Changed and cleared; a cache holding the key follows.
    let cache = CatalogCache::new(c.clone(), Arc::new(f.clock.clone()), CacheConfig::default())
        .await
        .unwrap();
    let cached = cache.resolve_key(&hash_key(&plain.key)).await.unwrap();
    assert_eq!(cached.unwrap().plan_id, None);
    c.set_key_plan(&plain.id, Some("ci-small")).await.unwrap();
    let hash = hash_key(&plain.key);
    wait_for(|| {
        let cache = cache.clone();
        let hash = hash.clone();
        async move {
            cache
                .resolve_key(&hash)
                .await
                .unwrap()
                .is_some_and(|o| o.plan_id.as_deref() == Some("ci-small"))
        }
    })
    .await;
    // And hands out the key's plan.
    let key_plan = cache.plan_for_key("acct", Some("ci-small")).await.unwrap();
    assert_eq!(key_plan.map(|p| p.id.clone()).as_deref(), Some("ci-small"));
    c.set_key_plan(&key.id, None).await.unwrap();
    let owner = c.lookup_key(&hash_key(&key.key)).await.unwrap().unwrap();
    assert_eq!(owner.plan_id, None);
    // Now unused by keys: deletable.
    c.set_key_plan(&plain.id, None).await.unwrap();
    c.delete_plan("ci-small").await.unwrap();

    // A revoked key's plan cannot be changed.
    c.revoke_key(&plain.id).await.unwrap();
    assert!(c.set_key_plan(&plain.id, None).await.is_err());
}

/// The console's account search: ids starting with a prefix, in bytewise
/// order, in pages, each with its balance (unexpired blocks) and the end of
/// its latest usage event.
async fn account_search(f: Fixture) {
    let c = &f.catalog;
    c.apply_plans(
        &set(Some("free"), &[plan("free", 1), plan("pro", 5)]),
        false,
    )
    .await
    .unwrap();
    for id in [
        "ab",
        "abc",
        "abd",
        "ab\u{10FFFF}",
        "ac",
        "B",
        "a",
        "é1",
        "é2",
    ] {
        c.create_account(id, (id == "abc").then_some("pro"), serde_json::json!({}))
            .await
            .unwrap();
    }
    let ids = |v: Vec<plangate::catalog::AccountSummary>| {
        v.into_iter().map(|r| r.account.id).collect::<Vec<_>>()
    };
    assert_eq!(
        ids(c.search_accounts("ab", None, 10).await.unwrap()),
        ["ab", "abc", "abd", "ab\u{10FFFF}"]
    );
    assert_eq!(
        ids(c.search_accounts("ab", None, 2).await.unwrap()),
        ["ab", "abc"]
    );
    assert_eq!(
        ids(c.search_accounts("ab", Some("abc"), 2).await.unwrap()),
        ["abd", "ab\u{10FFFF}"]
    );
    assert_eq!(
        ids(c.search_accounts("é", None, 10).await.unwrap()),
        ["é1", "é2"]
    );
    assert_eq!(
        ids(c.search_accounts("", None, 3).await.unwrap()),
        ["B", "a", "ab"]
    );
    assert!(c.search_accounts("zz", None, 10).await.unwrap().is_empty());
    assert!(c.search_accounts("%", None, 10).await.unwrap().is_empty());
    // Balance: unexpired blocks only; last seen: the latest event's end.
    c.create_quota_block("abc", 7, None, serde_json::Value::Null)
        .await
        .unwrap();
    c.create_quota_block(
        "abc",
        5,
        Some(f.at(Duration::from_secs(60))),
        serde_json::Value::Null,
    )
    .await
    .unwrap();
    f.clock.advance(Duration::from_secs(61));
    let event = |id: &str, ended: SystemTime| plangate::catalog::UsageEvent {
        request_id: id.into(),
        account_id: "abc".into(),
        key_id: None,
        endpoint: "m".into(),
        route: "/v1/chat/completions".into(),
        units: Vec::new(),
        credits: 0,
        status: 200,
        degraded: false,
        streamed: false,
        cut_short: false,
        started_at: ended,
        ended_at: ended,
        charge: None,
    };
    c.record_usage(&[
        event("req-2", f.at(Duration::from_secs(20))),
        event("req-1", f.at(Duration::from_secs(10))),
    ])
    .await
    .unwrap();
    let rows = c.search_accounts("ab", None, 2).await.unwrap();
    assert_eq!(rows[0].balance, 0);
    assert_eq!(rows[0].last_seen, None);
    assert_eq!(rows[1].account.plan_id.as_deref(), Some("pro"));
    assert_eq!(rows[1].balance, 7);
    assert_eq!(rows[1].last_seen, Some(f.at(Duration::from_secs(20))));
    assert_eq!(
        rows[0].account.effective_plan.as_deref(),
        Some("free"),
        "the default plan is the effective plan"
    );
}

/// Accounts listed by id in pages, filtered by effective plan; metadata
/// patched; deleted with their keys and blocks (refused while credits
/// remain, unless forced), their ledger kept.
async fn account_lifecycle(f: Fixture) {
    let c = &f.catalog;
    c.apply_plans(
        &set(Some("free"), &[plan("free", 1), plan("pro", 5)]),
        false,
    )
    .await
    .unwrap();
    // Bytewise order: "B" < "a" < "a0" < "é".
    for (id, p) in [
        ("a0", Some("pro")),
        ("é", None),
        ("B", None),
        ("a", Some("pro")),
    ] {
        c.create_account(id, p, serde_json::json!({"n": id}))
            .await
            .unwrap();
    }
    let ids = |v: Vec<plangate::catalog::Account>| v.into_iter().map(|a| a.id).collect::<Vec<_>>();
    assert_eq!(
        ids(c.list_accounts(None, None, 10).await.unwrap()),
        ["B", "a", "a0", "é"]
    );
    assert_eq!(
        ids(c.list_accounts(None, None, 2).await.unwrap()),
        ["B", "a"]
    );
    assert_eq!(
        ids(c.list_accounts(None, Some("a"), 2).await.unwrap()),
        ["a0", "é"]
    );
    assert!(c
        .list_accounts(None, Some("é"), 2)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        ids(c.list_accounts(Some("pro"), None, 10).await.unwrap()),
        ["a", "a0"]
    );
    // The default plan's accounts include those without a plan of their own.
    let free = c.list_accounts(Some("free"), None, 10).await.unwrap();
    assert_eq!(free[0].effective_plan.as_deref(), Some("free"));
    assert_eq!(ids(free), ["B", "é"]);
    assert!(is_not_found(c.list_accounts(Some("ghost"), None, 10).await));

    // Metadata: set and remove keys, keep the others.
    let mut patch = serde_json::Map::new();
    patch.insert("tier".into(), serde_json::json!("gold"));
    patch.insert("n".into(), serde_json::Value::Null);
    let a = c.update_account_metadata("a", &patch).await.unwrap();
    assert_eq!(a.metadata, serde_json::json!({"tier": "gold"}));
    assert_eq!(c.get_account("a").await.unwrap().metadata, a.metadata);
    assert!(is_not_found(
        c.update_account_metadata("ghost", &patch).await
    ));

    // Delete: refused while unexpired credits remain.
    let key = c.create_key("a").await.unwrap();
    let block = c
        .create_quota_block("a", 10, None, serde_json::Value::Null)
        .await
        .unwrap();
    c.deduct(&deduction("a", 3, "del-1")).await.unwrap();
    let r = c.delete_account("a", false).await;
    assert!(matches!(r, Err(CatalogError::Conflict(_))), "{r:?}");
    assert!(r.unwrap_err().to_string().contains("7 unexpired credits"));
    assert!(c.get_account("a").await.is_ok());
    let version = c.credit_snapshot("a").await.unwrap().version;
    let mut rx = c.subscribe();
    let d = c.delete_account("a", true).await.unwrap();
    assert_eq!((d.keys, d.blocks, d.credits_forfeited), (1, 1, 7), "{d:?}");
    assert!(is_not_found(c.get_account("a").await));
    assert_eq!(c.lookup_key(&hash_key(&key.key)).await.unwrap(), None);
    assert!(is_not_found(c.revoke_key(&key.id).await));
    assert!(is_not_found(c.delete_quota_block(&block.id).await));
    assert!(is_not_found(c.deduct(&deduction("a", 1, "del-2")).await));
    assert!(is_not_found(c.delete_account("a", true).await));
    assert_eq!(
        ids(c.list_accounts(Some("pro"), None, 10).await.unwrap()),
        ["a0"]
    );
    // Without credits (none, or only expired ones) no force is needed.
    c.create_quota_block(
        "B",
        5,
        Some(f.at(Duration::from_secs(1))),
        serde_json::Value::Null,
    )
    .await
    .unwrap();
    f.clock.advance(Duration::from_secs(1));
    assert_eq!(
        c.delete_account("B", false)
            .await
            .unwrap()
            .credits_forfeited,
        0
    );
    // The deletion announces a credit version past the account's, so every
    // wallet of it is dropped...
    let announced = loop {
        match rx.recv().await.unwrap() {
            Invalidation::Credits { account, version } if account == "a" => break version,
            _ => {}
        }
    };
    assert!(announced > version, "{announced} > {version}");
    // ...and an account created again under the id starts from it: its
    // wallet is never older than what its gateways last heard.
    c.create_account("a", None, serde_json::Value::Null)
        .await
        .unwrap();
    assert_eq!(c.credit_snapshot("a").await.unwrap().version, announced);
    // The ledger is kept: the account created again under the id sees it.
    let ledger = c.ledger("a").await.unwrap();
    assert_eq!(ledger.len(), 1);
    assert_eq!(
        (ledger[0].idempotency_key.as_str(), ledger[0].deducted),
        ("del-1", 3)
    );
    assert_eq!(c.balance("a").await.unwrap(), 0);
}

// --------------------------------------------------------- quota blocks

async fn quota_blocks_and_expiry(f: Fixture) {
    let c = &f.catalog;
    assert!(is_not_found(
        c.create_quota_block("nobody", 5, None, serde_json::Value::Null)
            .await
    ));
    assert!(is_not_found(c.balance("nobody").await));
    assert!(is_not_found(c.list_quota_blocks("nobody").await));
    assert!(is_not_found(c.expire_quota_blocks("nobody").await));
    c.create_account("acct", None, serde_json::Value::Null)
        .await
        .unwrap();
    assert_eq!(c.balance("acct").await.unwrap(), 0);
    assert!(is_invalid(
        c.create_quota_block("acct", u64::MAX, None, serde_json::Value::Null)
            .await
    ));
    // A block that has expired already would never count: refused.
    for past in [
        f.at(Duration::ZERO),
        f.at(Duration::ZERO) - Duration::from_secs(1),
    ] {
        let r = c
            .create_quota_block("acct", 5, Some(past), serde_json::Value::Null)
            .await;
        assert!(matches!(r, Err(CatalogError::Invalid(_))), "{r:?}");
        assert!(r.unwrap_err().to_string().contains("not in the future"));
    }
    assert!(c.list_quota_blocks("acct").await.unwrap().is_empty());

    let meta = serde_json::json!({"order": "inv-1"});
    let forever = c
        .create_quota_block("acct", 100, None, meta.clone())
        .await
        .unwrap();
    assert_eq!(forever.credits_granted, 100);
    assert_eq!(forever.credits_remaining, 100);
    assert_eq!(forever.metadata, meta);
    assert_eq!(forever.expires_at, None);
    // Sub-microsecond precision is dropped on both backends.
    let exp = f.at(Duration::from_secs(10)) + Duration::from_nanos(1_500);
    let soon = c
        .create_quota_block("acct", 30, Some(exp), serde_json::Value::Null)
        .await
        .unwrap();
    assert_eq!(
        soon.expires_at,
        Some(f.at(Duration::from_secs(10)) + Duration::from_micros(1))
    );
    assert_eq!(c.balance("acct").await.unwrap(), 130);
    let listed = c.list_quota_blocks("acct").await.unwrap();
    assert_eq!(listed, vec![forever.clone(), soon.clone()]);

    // At the expiry instant the block no longer counts, and is never drained.
    f.clock.advance(Duration::from_secs(10));
    assert_eq!(c.balance("acct").await.unwrap(), 130);
    f.clock.advance(Duration::from_millis(1));
    assert_eq!(c.balance("acct").await.unwrap(), 100);
    let r = c.deduct(&deduction("acct", 10, "d1")).await.unwrap();
    assert_eq!((r.deducted, r.balance), (10, 90));
    let listed = c.list_quota_blocks("acct").await.unwrap();
    assert_eq!(remaining(&listed, &soon.id), 30);
    assert_eq!(remaining(&listed, &forever.id), 90);

    // Expire all: counts only blocks still live.
    let later = c
        .create_quota_block(
            "acct",
            7,
            Some(f.at(Duration::from_secs(3600))),
            serde_json::Value::Null,
        )
        .await
        .unwrap();
    assert_eq!(c.balance("acct").await.unwrap(), 97);
    assert_eq!(c.expire_quota_blocks("acct").await.unwrap(), 2);
    assert_eq!(c.balance("acct").await.unwrap(), 0);
    assert_eq!(c.expire_quota_blocks("acct").await.unwrap(), 0);
    let listed = c.list_quota_blocks("acct").await.unwrap();
    assert!(listed.iter().all(|b| b
        .expires_at
        .is_some_and(|e| e <= f.at(Duration::from_secs(11)))));
    let r = c.deduct(&deduction("acct", 1, "d2")).await.unwrap();
    assert_eq!((r.deducted, r.shortfall, r.balance), (0, 1, 0));

    c.delete_quota_block(&later.id).await.unwrap();
    assert!(is_not_found(c.delete_quota_block(&later.id).await));
    assert_eq!(c.list_quota_blocks("acct").await.unwrap().len(), 2);
}

// ------------------------------------------------------------- deduction

/// Grants are bounded so that no balance leaves what every store holds:
/// one grant of more than MAX_AMOUNT, or one that would take the balance
/// above it, is refused (Invalid: 400 in the admin API) and changes
/// nothing, also when grants race.
async fn grants_are_bounded(f: Fixture) {
    use plangate::plans::MAX_AMOUNT;
    let c = &f.catalog;
    c.create_account("acct", None, serde_json::Value::Null)
        .await
        .unwrap();
    for huge in [MAX_AMOUNT + 1, i64::MAX as u64, u64::MAX] {
        let r = c
            .create_quota_block("acct", huge, None, serde_json::Value::Null)
            .await;
        assert!(is_invalid(r), "a grant of {huge}");
    }
    c.create_quota_block("acct", MAX_AMOUNT - 10, None, serde_json::Value::Null)
        .await
        .unwrap();
    let r = c
        .create_quota_block("acct", 11, None, serde_json::Value::Null)
        .await;
    let Err(CatalogError::Invalid(message)) = r else {
        panic!("expected Invalid, got {r:?}")
    };
    assert!(message.contains("above the largest balance"), "{message}");
    // Exactly up to the bound is fine; the balance reads back whole.
    c.create_quota_block("acct", 10, None, serde_json::Value::Null)
        .await
        .unwrap();
    assert_eq!(c.balance("acct").await.unwrap(), MAX_AMOUNT);
    assert_eq!(c.list_quota_blocks("acct").await.unwrap().len(), 2);
    // Expired blocks do not count: room again once they lapse.
    c.create_account("exp", None, serde_json::Value::Null)
        .await
        .unwrap();
    c.create_quota_block(
        "exp",
        MAX_AMOUNT,
        Some(f.at(Duration::from_secs(10))),
        serde_json::Value::Null,
    )
    .await
    .unwrap();
    assert!(is_invalid(
        c.create_quota_block("exp", 1, None, serde_json::Value::Null)
            .await
    ));
    f.clock.advance(Duration::from_secs(11));
    c.create_quota_block("exp", MAX_AMOUNT, None, serde_json::Value::Null)
        .await
        .unwrap();
    assert_eq!(c.balance("exp").await.unwrap(), MAX_AMOUNT);
    // Racing grants: exactly as many fit as the bound allows.
    c.create_account("race", None, serde_json::Value::Null)
        .await
        .unwrap();
    let share = MAX_AMOUNT / 4;
    let grants = (0..8).map(|_| {
        let c = c.clone();
        tokio::spawn(async move {
            c.create_quota_block("race", share, None, serde_json::Value::Null)
                .await
        })
    });
    let mut granted = 0;
    for g in grants {
        match g.await.unwrap() {
            Ok(_) => granted += 1,
            Err(CatalogError::Invalid(_)) => {}
            Err(e) => panic!("grant failed: {e}"),
        }
    }
    assert_eq!(granted, 4);
    assert_eq!(c.balance("race").await.unwrap(), MAX_AMOUNT);
    // Deductions above the bound are refused too.
    assert!(is_invalid(
        c.deduct(&deduction("race", MAX_AMOUNT + 1, "over")).await
    ));
}

async fn deduct_order_and_partial(f: Fixture) {
    let c = &f.catalog;
    c.create_account("acct", None, serde_json::Value::Null)
        .await
        .unwrap();
    let none = serde_json::Value::Null;
    let forever = c
        .create_quota_block("acct", 10, None, none.clone())
        .await
        .unwrap();
    let late = c
        .create_quota_block(
            "acct",
            5,
            Some(f.at(Duration::from_secs(100))),
            none.clone(),
        )
        .await
        .unwrap();
    let early = c
        .create_quota_block("acct", 5, Some(f.at(Duration::from_secs(50))), none.clone())
        .await
        .unwrap();
    // Same expiry as `early`, created later: drained after it.
    let early2 = c
        .create_quota_block("acct", 1, Some(f.at(Duration::from_secs(50))), none)
        .await
        .unwrap();

    let r = c.deduct(&deduction("acct", 8, "k1")).await.unwrap();
    assert_eq!(
        (r.requested, r.deducted, r.shortfall, r.balance, r.replayed),
        (8, 8, 0, 13, false)
    );
    let blocks = c.list_quota_blocks("acct").await.unwrap();
    assert_eq!(remaining(&blocks, &early.id), 0);
    assert_eq!(remaining(&blocks, &early2.id), 0);
    assert_eq!(remaining(&blocks, &late.id), 3);
    assert_eq!(remaining(&blocks, &forever.id), 10);

    // Not require_full: take what there is, report the shortfall.
    let r = c.deduct(&deduction("acct", 20, "k2")).await.unwrap();
    assert_eq!((r.deducted, r.shortfall, r.balance), (13, 7, 0));
    // Nothing left: still a ledger row, recording the whole shortfall.
    let r = c.deduct(&deduction("acct", 4, "k3")).await.unwrap();
    assert_eq!((r.deducted, r.shortfall, r.balance), (0, 4, 0));

    let ledger = c.ledger("acct").await.unwrap();
    assert_eq!(ledger.len(), 3);
    assert_eq!(ledger[0].idempotency_key, "k1");
    assert_eq!(ledger[0].request_id.as_deref(), Some("req-k1"));
    assert_eq!(ledger[0].endpoint.as_deref(), Some("chat"));
    let draws: Vec<(String, u64)> = ledger[0]
        .draws
        .iter()
        .map(|d| (d.block_id.clone(), d.credits))
        .collect();
    assert_eq!(
        draws,
        vec![
            (early.id.clone(), 5),
            (early2.id.clone(), 1),
            (late.id.clone(), 2)
        ]
    );
    assert_eq!(
        (ledger[1].requested, ledger[1].deducted, ledger[1].shortfall),
        (20, 13, 7)
    );
    assert_eq!((ledger[2].deducted, ledger[2].shortfall), (0, 4));
    assert!(ledger[2].draws.is_empty());
    let total: u64 = ledger.iter().map(|e| e.deducted).sum();
    assert_eq!(total, 21);
    assert!(is_not_found(c.deduct(&deduction("nobody", 1, "k4")).await));
    assert!(is_not_found(c.ledger("nobody").await));
}

async fn deduct_refusals(f: Fixture) {
    let c = &f.catalog;
    c.create_account("acct", None, serde_json::Value::Null)
        .await
        .unwrap();
    c.create_quota_block("acct", 5, None, serde_json::Value::Null)
        .await
        .unwrap();
    c.create_quota_block(
        "acct",
        100,
        Some(f.at(Duration::from_secs(1))),
        serde_json::Value::Null,
    )
    .await
    .unwrap();
    f.clock.advance(Duration::from_secs(1));
    let before = c.list_quota_blocks("acct").await.unwrap();

    // require_full with too little balance changes nothing (the expired
    // block's 100 do not count).
    let mut d = deduction("acct", 6, "full");
    d.require_full = true;
    let r = c.deduct(&d).await.unwrap();
    assert_eq!(
        (r.deducted, r.shortfall, r.balance, r.replayed),
        (0, 6, 5, false)
    );
    // min_balance above the balance: refused, even for a small amount.
    let mut m = deduction("acct", 1, "min");
    m.min_balance = 6;
    let r = c.deduct(&m).await.unwrap();
    assert_eq!((r.deducted, r.shortfall, r.balance), (0, 1, 5));
    assert_eq!(c.list_quota_blocks("acct").await.unwrap(), before);
    assert!(c.ledger("acct").await.unwrap().is_empty());

    // A refusal does not use up the key: with enough credits it succeeds.
    c.create_quota_block("acct", 1, None, serde_json::Value::Null)
        .await
        .unwrap();
    let r = c.deduct(&d).await.unwrap();
    assert_eq!(
        (r.deducted, r.shortfall, r.balance, r.replayed),
        (6, 0, 0, false)
    );
    // Exactly at min_balance is enough.
    c.create_quota_block("acct", 3, None, serde_json::Value::Null)
        .await
        .unwrap();
    m.min_balance = 3;
    let r = c.deduct(&m).await.unwrap();
    assert_eq!((r.deducted, r.balance), (1, 2));
    assert!(is_invalid(
        c.deduct(&deduction("acct", u64::MAX, "huge")).await
    ));
}

async fn idempotency_and_refund(f: Fixture) {
    let c = &f.catalog;
    c.create_account("acct", None, serde_json::Value::Null)
        .await
        .unwrap();
    let a = c
        .create_quota_block(
            "acct",
            2,
            Some(f.at(Duration::from_secs(60))),
            serde_json::Value::Null,
        )
        .await
        .unwrap();
    let b = c
        .create_quota_block("acct", 10, None, serde_json::Value::Null)
        .await
        .unwrap();
    let r1 = c.deduct(&deduction("acct", 5, "req-1")).await.unwrap();
    assert_eq!((r1.deducted, r1.balance, r1.replayed), (5, 7, false));
    let r2 = c.deduct(&deduction("acct", 5, "req-1")).await.unwrap();
    assert_eq!((r2.requested, r2.deducted, r2.shortfall), (5, 5, 0));
    assert!(r2.replayed);
    assert_eq!(r2.balance, 7);
    // Even a different amount under the same key replays the first result.
    let r3 = c.deduct(&deduction("acct", 1, "req-1")).await.unwrap();
    assert!(r3.replayed && r3.deducted == 5);
    assert_eq!(c.balance("acct").await.unwrap(), 7);
    assert_eq!(c.ledger("acct").await.unwrap().len(), 1);

    c.deduct(&deduction("acct", 1, "req-2")).await.unwrap();
    // Refund gives back to the blocks it came from, once.
    assert_eq!(c.refund("req-1").await.unwrap(), 5);
    let blocks = c.list_quota_blocks("acct").await.unwrap();
    assert_eq!(remaining(&blocks, &a.id), 2);
    assert_eq!(remaining(&blocks, &b.id), 9);
    assert_eq!(c.refund("req-1").await.unwrap(), 0);
    assert_eq!(c.refund("never-used").await.unwrap(), 0);
    assert_eq!(c.balance("acct").await.unwrap(), 11);
    let ledger = c.ledger("acct").await.unwrap();
    assert_eq!((ledger[0].deducted, ledger[0].refunded), (5, 5));
    assert_eq!(ledger[1].refunded, 0);
    // A refunded deduction is still used: its key does not deduct again.
    assert!(
        c.deduct(&deduction("acct", 5, "req-1"))
            .await
            .unwrap()
            .replayed
    );
    assert_eq!(c.balance("acct").await.unwrap(), 11);

    // A deleted block gets nothing back; the rest is refunded.
    let r = c.deduct(&deduction("acct", 4, "req-3")).await.unwrap();
    assert_eq!(r.deducted, 4);
    c.delete_quota_block(&a.id).await.unwrap();
    assert_eq!(c.refund("req-3").await.unwrap(), 2);
    assert_eq!(c.balance("acct").await.unwrap(), 9);
}

/// 200 concurrent deductions of 1 against 150 credits in three blocks:
/// exactly 150 succeed, the blocks drain earliest expiry first, and the
/// ledger accounts for every credit.
async fn concurrent_deductions(f: Fixture) {
    let c = &f.catalog;
    c.create_account("hot", None, serde_json::Value::Null)
        .await
        .unwrap();
    let never = c
        .create_quota_block("hot", 50, None, serde_json::Value::Null)
        .await
        .unwrap();
    let second = c
        .create_quota_block(
            "hot",
            50,
            Some(f.at(Duration::from_secs(7200))),
            serde_json::Value::Null,
        )
        .await
        .unwrap();
    let first = c
        .create_quota_block(
            "hot",
            50,
            Some(f.at(Duration::from_secs(3600))),
            serde_json::Value::Null,
        )
        .await
        .unwrap();
    // An expired block that must never be drained (granted just before
    // it expires: a grant that has expired already is refused).
    let expired = c
        .create_quota_block(
            "hot",
            500,
            Some(f.at(Duration::from_millis(1))),
            serde_json::Value::Null,
        )
        .await
        .unwrap();
    f.clock.advance(Duration::from_millis(1));

    // Phase one, 75 at once: the earliest-expiring block drains first, then
    // the next; the never-expiring one is untouched.
    assert_eq!(deduct_many(c, "hot", 0..75).await, 75);
    let blocks = c.list_quota_blocks("hot").await.unwrap();
    assert_eq!(remaining(&blocks, &first.id), 0);
    assert_eq!(remaining(&blocks, &second.id), 25);
    assert_eq!(remaining(&blocks, &never.id), 50);
    // Phase two, 125 more at once: exactly the 75 credits left are taken.
    assert_eq!(deduct_many(c, "hot", 75..200).await, 75);
    assert_eq!(c.balance("hot").await.unwrap(), 0);
    let blocks = c.list_quota_blocks("hot").await.unwrap();
    for id in [&never.id, &second.id, &first.id] {
        assert_eq!(remaining(&blocks, id), 0);
    }
    assert_eq!(remaining(&blocks, &expired.id), 500);
    let ledger = c.ledger("hot").await.unwrap();
    assert_eq!(ledger.len(), 150);
    assert_eq!(ledger.iter().map(|e| e.deducted).sum::<u64>(), 150);
    for block in [&first.id, &second.id, &never.id] {
        let drawn: u64 = ledger
            .iter()
            .flat_map(|e| &e.draws)
            .filter(|d| d.block_id == *block)
            .map(|d| d.credits)
            .sum();
        assert_eq!(drawn, 50);
    }
}

/// Run concurrent `require_full` deductions of 1, one per index; returns
/// how many succeeded.
async fn deduct_many(c: &Arc<dyn Catalog>, account: &str, ids: std::ops::Range<u32>) -> usize {
    let mut tasks = Vec::new();
    for i in ids {
        let c = c.clone();
        let account = account.to_string();
        tasks.push(tokio::spawn(async move {
            let mut d = deduction(&account, 1, &format!("c-{i}"));
            d.require_full = true;
            c.deduct(&d).await.unwrap()
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.deducted + r.shortfall, 1);
        if r.deducted == 1 {
            ok += 1;
        }
    }
    ok
}

/// The same idempotency key from 20 tasks deducts once.
async fn concurrent_duplicates(f: Fixture) {
    let c = &f.catalog;
    c.create_account("dup", None, serde_json::Value::Null)
        .await
        .unwrap();
    c.create_quota_block("dup", 100, None, serde_json::Value::Null)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.deduct(&deduction("dup", 7, "same-key")).await.unwrap()
        }));
    }
    let mut fresh = 0;
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.deducted, 7);
        if !r.replayed {
            fresh += 1;
        }
    }
    assert_eq!(fresh, 1);
    assert_eq!(c.balance("dup").await.unwrap(), 93);
    assert_eq!(c.ledger("dup").await.unwrap().len(), 1);
}

async fn notifications(f: Fixture) {
    let c = &f.catalog;
    let mut rx = c.subscribe();
    c.apply_plans(&set(None, &[plan("a", 1), plan("b", 1)]), false)
        .await
        .unwrap();
    c.create_account("acct", None, serde_json::Value::Null)
        .await
        .unwrap();
    c.assign_plan("acct", Some("b")).await.unwrap();
    let key = c.create_key("acct").await.unwrap();
    c.revoke_key(&key.id).await.unwrap();
    c.set_default_plan("b").await.unwrap();
    let want = [
        Invalidation::Plans,
        Invalidation::Account("acct".into()),
        Invalidation::Key(hash_key(&key.key)),
    ];
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !want.iter().all(|w| seen.contains(w)) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(inv)) => seen.push(inv),
            other => panic!("missing invalidations; saw {seen:?}, then {other:?}"),
        }
    }
}

/// The cache serves keys and plans, and forgets revoked keys and changed
/// plans as soon as the catalog announces them.
async fn cache_follows_changes(f: Fixture) {
    let c = &f.catalog;
    c.apply_plans(
        &set(Some("free"), &[plan("free", 1), plan("pro", 5)]),
        false,
    )
    .await
    .unwrap();
    c.create_account("acct", None, serde_json::Value::Null)
        .await
        .unwrap();
    let key = c.create_key("acct").await.unwrap();
    let hash = hash_key(&key.key);
    let cache = CatalogCache::new(c.clone(), Arc::new(SystemClock), CacheConfig::default())
        .await
        .unwrap();
    assert_eq!(cache.plans().default_plan.as_deref(), Some("free"));
    let owner = cache.resolve_key(&hash).await.unwrap().unwrap();
    assert_eq!(owner.account_id, "acct");
    assert_eq!(cache.resolve_key(&hash).await.unwrap(), Some(owner));
    assert_eq!(cache.resolve_key(&hash_key("pg_nope")).await.unwrap(), None);
    assert_eq!(
        cache.plan_for_account("acct").await.unwrap().unwrap().id,
        "free"
    );
    // Unknown accounts are on the default plan.
    assert_eq!(
        cache
            .plan_for_account("stranger")
            .await
            .unwrap()
            .unwrap()
            .id,
        "free"
    );
    let loads = cache.stats().loads;
    for _ in 0..10 {
        cache.resolve_key(&hash).await.unwrap();
    }
    assert_eq!(
        cache.stats().loads,
        loads,
        "hits must not reach the catalog"
    );

    c.assign_plan("acct", Some("pro")).await.unwrap();
    c.revoke_key(&key.id).await.unwrap();
    c.apply_plans(&set(None, &[plan("free", 2)]), false)
        .await
        .unwrap();
    wait_for(|| {
        let cache = cache.clone();
        let hash = hash.clone();
        async move {
            cache.resolve_key(&hash).await.unwrap().is_none()
                && cache
                    .plan_for_account("acct")
                    .await
                    .unwrap()
                    .is_some_and(|p| p.id == "pro")
                && cache.plans().plans["free"] == plan("free", 2)
        }
    })
    .await;
}

/// Billing anchors: set, read back, cleared, checked; a cache hands an
/// anchored account its plan with billing months instead of calendar
/// months, and follows a change of anchor.
async fn billing_anchors(f: Fixture) {
    let c = &f.catalog;
    let month = WindowLen::Calendar(Period::Month);
    let monthly = Arc::new(Plan {
        id: "monthly".into(),
        name: "Monthly".into(),
        endpoints: [(
            "chat".to_string(),
            Arc::new(Policy {
                windows: vec![Window {
                    len: month,
                    limit: 1_000,
                    unit: Unit::new("token"),
                }],
                max_concurrent: 0,
                concurrency_expiry_secs: 60,
                credits: None,
                enforce: true,
                key: None,
            }),
        )]
        .into(),
        notify: Vec::new(),
    });
    c.apply_plans(&set(Some("monthly"), &[monthly]), false)
        .await
        .unwrap();
    let a = c
        .create_account("anchored", None, serde_json::Value::Null)
        .await
        .unwrap();
    assert_eq!(a.billing_anchor, None);
    c.set_billing_anchor("anchored", Some(31)).await.unwrap();
    assert_eq!(
        c.get_account("anchored").await.unwrap().billing_anchor,
        Some(31)
    );
    for bad in [0u8, 32, 255] {
        assert!(
            is_invalid(c.set_billing_anchor("anchored", Some(bad)).await),
            "{bad}"
        );
    }
    assert!(is_not_found(c.set_billing_anchor("ghost", Some(5)).await));
    assert_eq!(
        c.get_account("anchored").await.unwrap().billing_anchor,
        Some(31),
        "a refused anchor changes nothing"
    );

    let cache = CatalogCache::new(c.clone(), Arc::new(SystemClock), CacheConfig::default())
        .await
        .unwrap();
    let lens = |plan: Arc<Plan>| plan.endpoints["chat"].windows[0].len;
    let got = cache.plan_for_account("anchored").await.unwrap().unwrap();
    assert_eq!(
        lens(got.clone()),
        WindowLen::Calendar(Period::MonthFrom(31))
    );
    // Built once, not per call.
    let again = cache.plan_for_account("anchored").await.unwrap().unwrap();
    assert!(Arc::ptr_eq(&got, &again));
    // Accounts without an anchor share the plan itself.
    let plain = cache.plan_for_account("stranger").await.unwrap().unwrap();
    assert!(Arc::ptr_eq(&plain, &cache.plans().plans["monthly"]));

    c.set_billing_anchor("anchored", Some(15)).await.unwrap();
    wait_for(|| {
        let cache = cache.clone();
        async move {
            lens(cache.plan_for_account("anchored").await.unwrap().unwrap())
                == WindowLen::Calendar(Period::MonthFrom(15))
        }
    })
    .await;
    c.set_billing_anchor("anchored", None).await.unwrap();
    assert_eq!(
        c.get_account("anchored").await.unwrap().billing_anchor,
        None
    );
    wait_for(|| {
        let cache = cache.clone();
        async move { lens(cache.plan_for_account("anchored").await.unwrap().unwrap()) == month }
    })
    .await;
}

/// Poll (bounded) until `cond` holds: used only to wait for a notification,
/// never to wait out a window. Fails if it takes longer than a second.
async fn wait_for<F, Fut>(cond: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    while !cond().await {
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "change not seen within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A catalog whose notifications are lost: the cache's TTL must still
/// stop a revoked key within 5 s (on the injected clock).
struct Deaf(
    Arc<dyn Catalog>,
    tokio::sync::broadcast::Sender<Invalidation>,
);

#[async_trait::async_trait]
impl Catalog for Deaf {
    async fn apply_plans(
        &self,
        p: &PlanSet,
        prune: bool,
    ) -> plangate::catalog::CatalogResult<plangate::catalog::ApplyReport> {
        self.0.apply_plans(p, prune).await
    }
    async fn list_plans(&self) -> plangate::catalog::CatalogResult<PlanSet> {
        self.0.list_plans().await
    }
    async fn get_plan(&self, id: &str) -> plangate::catalog::CatalogResult<Arc<Plan>> {
        self.0.get_plan(id).await
    }
    async fn delete_plan(&self, id: &str) -> plangate::catalog::CatalogResult<()> {
        self.0.delete_plan(id).await
    }
    async fn default_plan(&self) -> plangate::catalog::CatalogResult<Option<String>> {
        self.0.default_plan().await
    }
    async fn set_default_plan(&self, id: &str) -> plangate::catalog::CatalogResult<()> {
        self.0.set_default_plan(id).await
    }
    async fn create_account(
        &self,
        id: &str,
        plan: Option<&str>,
        m: serde_json::Value,
    ) -> plangate::catalog::CatalogResult<plangate::catalog::Account> {
        self.0.create_account(id, plan, m).await
    }
    async fn assign_plan(&self, a: &str, p: Option<&str>) -> plangate::catalog::CatalogResult<()> {
        self.0.assign_plan(a, p).await
    }
    async fn set_billing_anchor(
        &self,
        a: &str,
        anchor: Option<u8>,
    ) -> plangate::catalog::CatalogResult<()> {
        self.0.set_billing_anchor(a, anchor).await
    }
    async fn get_account(
        &self,
        id: &str,
    ) -> plangate::catalog::CatalogResult<plangate::catalog::Account> {
        self.0.get_account(id).await
    }
    async fn list_accounts(
        &self,
        plan: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> plangate::catalog::CatalogResult<Vec<plangate::catalog::Account>> {
        self.0.list_accounts(plan, after, limit).await
    }
    async fn search_accounts(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> plangate::catalog::CatalogResult<Vec<plangate::catalog::AccountSummary>> {
        self.0.search_accounts(prefix, after, limit).await
    }
    async fn update_account_metadata(
        &self,
        id: &str,
        patch: &serde_json::Map<String, serde_json::Value>,
    ) -> plangate::catalog::CatalogResult<plangate::catalog::Account> {
        self.0.update_account_metadata(id, patch).await
    }
    async fn delete_account(
        &self,
        id: &str,
        force: bool,
    ) -> plangate::catalog::CatalogResult<plangate::catalog::DeletedAccount> {
        self.0.delete_account(id, force).await
    }
    async fn create_key(
        &self,
        a: &str,
    ) -> plangate::catalog::CatalogResult<plangate::catalog::NewApiKey> {
        self.0.create_key(a).await
    }
    async fn create_key_with(
        &self,
        a: &str,
        o: &plangate::catalog::KeyOptions,
    ) -> plangate::catalog::CatalogResult<plangate::catalog::NewApiKey> {
        self.0.create_key_with(a, o).await
    }
    async fn lookup_key(
        &self,
        h: &str,
    ) -> plangate::catalog::CatalogResult<Option<plangate::catalog::KeyOwner>> {
        self.0.lookup_key(h).await
    }
    async fn revoke_key(&self, id: &str) -> plangate::catalog::CatalogResult<()> {
        self.0.revoke_key(id).await
    }
    async fn set_key_plan(
        &self,
        id: &str,
        plan: Option<&str>,
    ) -> plangate::catalog::CatalogResult<()> {
        self.0.set_key_plan(id, plan).await
    }
    async fn list_keys(
        &self,
        a: &str,
    ) -> plangate::catalog::CatalogResult<Vec<plangate::catalog::ApiKeyInfo>> {
        self.0.list_keys(a).await
    }
    async fn create_quota_block(
        &self,
        a: &str,
        n: u64,
        e: Option<SystemTime>,
        m: serde_json::Value,
    ) -> plangate::catalog::CatalogResult<QuotaBlock> {
        self.0.create_quota_block(a, n, e, m).await
    }
    async fn delete_quota_block(&self, id: &str) -> plangate::catalog::CatalogResult<()> {
        self.0.delete_quota_block(id).await
    }
    async fn expire_quota_blocks(&self, a: &str) -> plangate::catalog::CatalogResult<u64> {
        self.0.expire_quota_blocks(a).await
    }
    async fn list_quota_blocks(
        &self,
        a: &str,
    ) -> plangate::catalog::CatalogResult<Vec<QuotaBlock>> {
        self.0.list_quota_blocks(a).await
    }
    async fn balance(&self, a: &str) -> plangate::catalog::CatalogResult<u64> {
        self.0.balance(a).await
    }
    async fn deduct(
        &self,
        d: &Deduction,
    ) -> plangate::catalog::CatalogResult<plangate::catalog::DeductResult> {
        self.0.deduct(d).await
    }
    async fn refund(&self, k: &str) -> plangate::catalog::CatalogResult<u64> {
        self.0.refund(k).await
    }
    async fn ledger(
        &self,
        a: &str,
    ) -> plangate::catalog::CatalogResult<Vec<plangate::catalog::LedgerEntry>> {
        self.0.ledger(a).await
    }
    async fn credit_snapshot(
        &self,
        a: &str,
    ) -> plangate::catalog::CatalogResult<plangate::catalog::CreditSnapshot> {
        self.0.credit_snapshot(a).await
    }
    async fn record_credit_ops(
        &self,
        a: &str,
        ops: &[plangate::catalog::CreditOp],
    ) -> plangate::catalog::CatalogResult<()> {
        self.0.record_credit_ops(a, ops).await
    }
    async fn touch_credits(&self, a: &str) -> plangate::catalog::CatalogResult<u64> {
        self.0.touch_credits(a).await
    }
    async fn record_usage(
        &self,
        e: &[plangate::catalog::UsageEvent],
    ) -> plangate::catalog::CatalogResult<u64> {
        self.0.record_usage(e).await
    }
    async fn usage_events(
        &self,
        q: &plangate::catalog::UsageQuery,
        after: Option<&plangate::catalog::UsageCursor>,
        limit: usize,
    ) -> plangate::catalog::CatalogResult<Vec<plangate::catalog::UsageEvent>> {
        self.0.usage_events(q, after, limit).await
    }
    async fn usage_summary(
        &self,
        q: &plangate::catalog::UsageQuery,
        g: plangate::catalog::GroupBy,
    ) -> plangate::catalog::CatalogResult<Vec<plangate::catalog::UsageBucket>> {
        self.0.usage_summary(q, g).await
    }
    async fn prune_usage(&self, before: SystemTime) -> plangate::catalog::CatalogResult<u64> {
        self.0.prune_usage(before).await
    }
    async fn enqueue_notification(
        &self,
        n: &plangate::catalog::NewNotification,
    ) -> plangate::catalog::CatalogResult<bool> {
        self.0.enqueue_notification(n).await
    }
    async fn claim_notifications(
        &self,
        limit: usize,
        lease: Duration,
    ) -> plangate::catalog::CatalogResult<Vec<plangate::catalog::Notification>> {
        self.0.claim_notifications(limit, lease).await
    }
    async fn finish_notification(
        &self,
        id: &str,
        result: &plangate::catalog::Attempted,
    ) -> plangate::catalog::CatalogResult<()> {
        self.0.finish_notification(id, result).await
    }
    async fn notifications(
        &self,
        q: &plangate::catalog::NotificationQuery,
    ) -> plangate::catalog::CatalogResult<Vec<plangate::catalog::Notification>> {
        self.0.notifications(q).await
    }
    async fn expiring_blocks(
        &self,
        until: SystemTime,
        after: Option<&str>,
        limit: usize,
    ) -> plangate::catalog::CatalogResult<Vec<plangate::catalog::QuotaBlock>> {
        self.0.expiring_blocks(until, after, limit).await
    }
    async fn prune_notifications(
        &self,
        before: SystemTime,
    ) -> plangate::catalog::CatalogResult<u64> {
        self.0.prune_notifications(before).await
    }
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Invalidation> {
        self.1.subscribe()
    }
    async fn ping(&self) -> plangate::catalog::CatalogResult<()> {
        self.0.ping().await
    }
    async fn plans_file_owner(&self) -> plangate::catalog::CatalogResult<Option<String>> {
        self.0.plans_file_owner().await
    }
    async fn set_plans_file_owner(&self, f: Option<&str>) -> plangate::catalog::CatalogResult<()> {
        self.0.set_plans_file_owner(f).await
    }
}

async fn cache_ttl_backstop(f: Fixture) {
    let c = &f.catalog;
    c.apply_plans(&set(None, &[plan("free", 1)]), false)
        .await
        .unwrap();
    c.create_account("acct", None, serde_json::Value::Null)
        .await
        .unwrap();
    let key = c.create_key("acct").await.unwrap();
    let hash = hash_key(&key.key);
    let deaf: Arc<dyn Catalog> = Arc::new(Deaf(c.clone(), tokio::sync::broadcast::channel(1).0));
    let clock: SharedClock = Arc::new(f.clock.clone());
    let cache = CatalogCache::new(deaf, clock, CacheConfig::default())
        .await
        .unwrap();
    assert!(cache.resolve_key(&hash).await.unwrap().is_some());
    c.revoke_key(&key.id).await.unwrap();
    // Without a notification the entry is served until its TTL...
    f.clock.advance(Duration::from_millis(2_000));
    assert!(cache.resolve_key(&hash).await.unwrap().is_some());
    // ...and no longer than 5 s after it was loaded.
    f.clock.advance(Duration::from_millis(3_000));
    assert_eq!(cache.resolve_key(&hash).await.unwrap(), None);
    assert_eq!(f.clock.now_ms(), T0 + 5_000);
}

/// The threshold-notification queue (`notify.rs`): one row per dedupe
/// key, claims leased, attempts recorded, the log paged newest first,
/// expiring blocks found across accounts, old rows pruned.
async fn threshold_notification_queue(f: Fixture) {
    use plangate::catalog::{Attempted, NewNotification, NotificationQuery, NotificationStatus};
    let c = &f.catalog;
    let new = |key: &str, account: &str| NewNotification {
        dedupe_key: key.to_owned(),
        account_id: account.to_owned(),
        kind: "window",
        data: serde_json::json!({"n": key}),
    };
    assert!(c.enqueue_notification(&new("k1", "a")).await.unwrap());
    assert!(
        !c.enqueue_notification(&new("k1", "a")).await.unwrap(),
        "deduped"
    );
    assert!(c.enqueue_notification(&new("k2", "b")).await.unwrap());
    assert!(matches!(
        c.enqueue_notification(&new("", "a")).await,
        Err(CatalogError::Invalid(_))
    ));
    // Claimed once, leased: a second claim finds nothing until the lease ends.
    let lease = Duration::from_secs(30);
    let claimed = c.claim_notifications(10, lease).await.unwrap();
    assert_eq!(
        claimed
            .iter()
            .map(|n| n.dedupe_key.as_str())
            .collect::<Vec<_>>(),
        vec!["k1", "k2"]
    );
    assert_eq!(claimed[0].attempts, 0);
    assert_eq!(claimed[0].data, serde_json::json!({"n": "k1"}));
    assert!(c.claim_notifications(10, lease).await.unwrap().is_empty());
    let (k1, k2) = (claimed[0].id.clone(), claimed[1].id.clone());
    c.finish_notification(&k1, &Attempted::Delivered)
        .await
        .unwrap();
    c.finish_notification(
        &k2,
        &Attempted::Retry {
            at: f.at(Duration::from_secs(5)),
            error: "HTTP 503".into(),
        },
    )
    .await
    .unwrap();
    // Finishing a delivered one again changes nothing.
    c.finish_notification(&k1, &Attempted::Failed { error: "x".into() })
        .await
        .unwrap();
    assert!(matches!(
        c.finish_notification("nt_missing", &Attempted::Delivered)
            .await,
        Err(CatalogError::NotFound { .. })
    ));
    assert!(c.claim_notifications(10, lease).await.unwrap().is_empty());
    f.clock.advance(Duration::from_secs(5));
    let again = c.claim_notifications(10, lease).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].id, k2);
    assert_eq!(again[0].attempts, 1);
    assert_eq!(again[0].last_error.as_deref(), Some("HTTP 503"));
    c.finish_notification(
        &k2,
        &Attempted::Failed {
            error: "HTTP 410".into(),
        },
    )
    .await
    .unwrap();

    let q = |account: Option<&str>, status, before_seq, limit| NotificationQuery {
        account: account.map(str::to_owned),
        status,
        before_seq,
        limit,
    };
    let all = c.notifications(&q(None, None, None, 10)).await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].id, k2, "newest first");
    assert_eq!(all[0].status, NotificationStatus::Failed);
    assert_eq!(all[0].attempts, 2);
    assert_eq!(all[0].last_error.as_deref(), Some("HTTP 410"));
    assert_eq!(all[0].next_attempt_at, None);
    assert_eq!(all[1].status, NotificationStatus::Delivered);
    assert_eq!(all[1].attempts, 1);
    assert_eq!(all[1].delivered_at, Some(f.at(Duration::ZERO)));
    let page = c
        .notifications(&q(None, None, Some(all[0].seq), 10))
        .await
        .unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].id, k1);
    let of_a = c
        .notifications(&q(Some("a"), None, None, 10))
        .await
        .unwrap();
    assert_eq!(of_a.len(), 1);
    let failed = c
        .notifications(&q(None, Some(NotificationStatus::Failed), None, 10))
        .await
        .unwrap();
    assert_eq!(failed.len(), 1);
    assert!(matches!(
        c.notifications(&q(None, None, None, 0)).await,
        Err(CatalogError::Invalid(_))
    ));

    // Expiring blocks across accounts, with credits left, in id order.
    c.apply_plans(&set(Some("free"), &[plan("free", 1)]), false)
        .await
        .unwrap();
    for a in ["x1", "x2"] {
        c.create_account(a, None, serde_json::Value::Null)
            .await
            .unwrap();
    }
    let day = Duration::from_secs(86_400);
    let soon = c
        .create_quota_block("x1", 5, Some(f.at(day * 2)), serde_json::json!({}))
        .await
        .unwrap();
    let also = c
        .create_quota_block("x2", 5, Some(f.at(day * 3)), serde_json::json!({}))
        .await
        .unwrap();
    c.create_quota_block("x2", 5, Some(f.at(day * 30)), serde_json::json!({}))
        .await
        .unwrap();
    c.create_quota_block("x1", 5, None, serde_json::json!({}))
        .await
        .unwrap();
    let mut want = vec![soon.id.clone(), also.id.clone()];
    want.sort();
    let found = c.expiring_blocks(f.at(day * 7), None, 10).await.unwrap();
    assert_eq!(found.iter().map(|b| b.id.clone()).collect::<Vec<_>>(), want);
    let next = c
        .expiring_blocks(f.at(day * 7), Some(&want[0]), 10)
        .await
        .unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].id, want[1]);
    assert_eq!(
        c.expiring_blocks(f.at(day * 7), None, 1)
            .await
            .unwrap()
            .len(),
        1
    );

    // Delivered and failed rows past retention go; pending ones stay.
    assert!(c.enqueue_notification(&new("k3", "a")).await.unwrap());
    f.clock.advance(Duration::from_secs(10));
    assert_eq!(
        c.prune_notifications(f.at(Duration::from_secs(15)))
            .await
            .unwrap(),
        2
    );
    let left = c.notifications(&q(None, None, None, 10)).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].dedupe_key, "k3");
    // Their dedupe keys are free again.
    assert!(c.enqueue_notification(&new("k1", "a")).await.unwrap());
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod memory_catalog {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::memory()).await
                }
            )*
        }
        mod postgres_catalog {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(f) = super::postgres().await else { return };
                    super::$name(f).await
                }
            )*
        }
    };
}

conformance!(
    default_plan_rules,
    plans_round_trip_and_upsert,
    prune,
    accounts,
    keys,
    key_labels_and_expiry,
    key_plans,
    account_lifecycle,
    account_search,
    plans_file_owner_round_trips,
    quota_blocks_and_expiry,
    grants_are_bounded,
    deduct_order_and_partial,
    deduct_refusals,
    idempotency_and_refund,
    concurrent_deductions,
    concurrent_duplicates,
    notifications,
    cache_follows_changes,
    cache_ttl_backstop,
    billing_anchors,
    threshold_notification_queue,
);

// ------------------------------------------------------- Postgres only

/// A change made through one pool reaches a second, independently
/// connected catalog's cache through LISTEN/NOTIFY within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_invalidation_across_instances() {
    let Some(f) = postgres().await else { return };
    let url = f.url.clone().unwrap();
    let admin = &f.catalog;
    admin
        .apply_plans(
            &set(Some("free"), &[plan("free", 1), plan("pro", 5)]),
            false,
        )
        .await
        .unwrap();
    admin
        .create_account("acct", None, serde_json::Value::Null)
        .await
        .unwrap();
    let key = admin.create_key("acct").await.unwrap();
    let hash = hash_key(&key.key);

    let other: Arc<dyn Catalog> = Arc::new(
        PostgresCatalog::connect(&url, Arc::new(SystemClock))
            .await
            .unwrap(),
    );
    let cache = CatalogCache::new(other, Arc::new(SystemClock), CacheConfig::default())
        .await
        .unwrap();
    assert!(cache.resolve_key(&hash).await.unwrap().is_some());
    assert_eq!(
        cache.plan_for_account("acct").await.unwrap().unwrap().id,
        "free"
    );

    admin.revoke_key(&key.id).await.unwrap();
    wait_for(|| {
        let (cache, hash) = (cache.clone(), hash.clone());
        async move { cache.resolve_key(&hash).await.unwrap().is_none() }
    })
    .await;

    admin.set_default_plan("pro").await.unwrap();
    wait_for(|| {
        let cache = cache.clone();
        async move { cache.plans().default_plan.as_deref() == Some("pro") }
    })
    .await;
    assert_eq!(
        cache.plan_for_account("acct").await.unwrap().unwrap().id,
        "pro"
    );

    admin
        .apply_plans(&set(None, &[plan("pro", 99)]), false)
        .await
        .unwrap();
    wait_for(|| {
        let cache = cache.clone();
        async move { cache.plans().plans["pro"] == plan("pro", 99) }
    })
    .await;

    admin.assign_plan("acct", Some("free")).await.unwrap();
    wait_for(|| {
        let cache = cache.clone();
        async move {
            cache
                .plan_for_account("acct")
                .await
                .unwrap()
                .is_some_and(|p| p.id == "free")
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_migrate_twice_and_concurrently() {
    let Some(url) = plangate_tests::postgres_db("catmig").await else {
        return;
    };
    // The newest version (versions may skip: V4 is another branch's).
    let latest = MIGRATIONS.last().unwrap().version;
    let (a, b) = tokio::join!(migrate(&url), migrate(&url));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!((a.version, b.version), (latest, latest));
    // Exactly one of the two did the work.
    assert_eq!(a.applied.len() + b.applied.len(), MIGRATIONS.len());
    let again = migrate(&url).await.unwrap();
    assert!(again.applied.is_empty());
    assert_eq!(again.version, latest);
}

/// A database at version 1 (an earlier plangate) with data in it is
/// upgraded in place: only the later migrations run, the data stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_upgrade_from_v1_keeps_data() {
    let Some(url) = plangate_tests::postgres_db("catv1").await else {
        return;
    };
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client.batch_execute(MIGRATIONS[0].sql).await.unwrap();
    client
        .batch_execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now());
             INSERT INTO schema_migrations (version, name) VALUES (1, 'init');
             INSERT INTO accounts (id, created_at) VALUES ('old', now());",
        )
        .await
        .unwrap();
    let report = migrate(&url).await.unwrap();
    let later: Vec<String> = MIGRATIONS[1..]
        .iter()
        .map(|m| format!("V{}__{}", m.version, m.name))
        .collect();
    assert_eq!(report.applied, later);
    assert_eq!(report.version, MIGRATIONS.last().unwrap().version);
    let c = PostgresCatalog::connect(&url, Arc::new(ManualClock::new(T0)))
        .await
        .unwrap();
    assert_eq!(c.get_account("old").await.unwrap().id, "old");
    assert!(c
        .usage_events(&Default::default(), None, 10)
        .await
        .unwrap()
        .is_empty());
}

/// The schema itself refuses what the catalog code refuses, so no other
/// writer can break the invariants either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_schema_enforces_invariants() {
    let Some(f) = postgres().await else { return };
    let c = &f.catalog;
    c.apply_plans(&set(Some("a"), &[plan("a", 1), plan("b", 1)]), false)
        .await
        .unwrap();
    c.create_account("acct", Some("b"), serde_json::Value::Null)
        .await
        .unwrap();
    let block = c
        .create_quota_block("acct", 5, None, serde_json::Value::Null)
        .await
        .unwrap();
    c.deduct(&deduction("acct", 1, "k")).await.unwrap();
    let (client, conn) = tokio_postgres::connect(f.url.as_deref().unwrap(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let code = |r: Result<u64, tokio_postgres::Error>| r.unwrap_err().code().cloned();
    use tokio_postgres::error::SqlState;
    assert_eq!(
        code(
            client
                .execute("UPDATE plans SET is_default = true WHERE id = 'b'", &[])
                .await
        ),
        Some(SqlState::UNIQUE_VIOLATION)
    );
    assert_eq!(
        code(
            client
                .execute("DELETE FROM plans WHERE id = 'b'", &[])
                .await
        ),
        Some(SqlState::FOREIGN_KEY_VIOLATION)
    );
    assert_eq!(
        code(
            client
                .execute(
                    "UPDATE quota_blocks SET credits_remaining = -1 WHERE id = $1",
                    &[&block.id]
                )
                .await
        ),
        Some(SqlState::CHECK_VIOLATION)
    );
    assert_eq!(
        code(
            client
                .execute(
                    "INSERT INTO credit_ledger (idempotency_key, account_id, requested, deducted, created_at)
                     VALUES ('k', 'acct', 1, 1, now())",
                    &[]
                )
                .await
        ),
        Some(SqlState::UNIQUE_VIOLATION)
    );
}

/// The catalog reports an unreachable database as `Unavailable`, and a
/// cache keeps serving what it holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_serves_cached_entries() {
    let Some(f) = postgres().await else { return };
    let url = f.url.clone().unwrap();
    let c = &f.catalog;
    c.apply_plans(&set(None, &[plan("free", 1)]), false)
        .await
        .unwrap();
    c.create_account("acct", None, serde_json::Value::Null)
        .await
        .unwrap();
    let key = c.create_key("acct").await.unwrap();
    let hash = hash_key(&key.key);
    let clock = ManualClock::new(T0);
    let own = PostgresCatalog::connect(&url, Arc::new(clock.clone()))
        .await
        .unwrap();
    let own: Arc<dyn Catalog> = Arc::new(own);
    let cache = CatalogCache::new(own, Arc::new(clock.clone()), CacheConfig::default())
        .await
        .unwrap();
    assert!(cache.resolve_key(&hash).await.unwrap().is_some());
    assert!(cache.plan_for_account("acct").await.unwrap().is_some());
    // Take the database away: terminate every session and refuse new ones.
    let name = url.rsplit('/').next().unwrap().to_string();
    let (admin, conn) = tokio_postgres::connect(
        &plangate_tests::postgres_url_default(),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {name} WITH ALLOW_CONNECTIONS false"
        ))
        .await
        .unwrap();
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
            &[&name],
        )
        .await
        .unwrap();
    clock.advance(Duration::from_secs(60));
    // Expired entries are served stale rather than failing.
    assert!(cache.resolve_key(&hash).await.unwrap().is_some());
    assert_eq!(
        cache.plan_for_account("acct").await.unwrap().unwrap().id,
        "free"
    );
    assert!(cache.stats().stale_served >= 1);
    // Uncached lookups and credits fail closed, as Unavailable.
    assert!(matches!(
        cache.resolve_key(&hash_key("pg_other")).await,
        Err(CatalogError::Unavailable(_))
    ));
    assert!(matches!(
        c.balance("acct").await,
        Err(CatalogError::Unavailable(_))
    ));
    admin
        .batch_execute(&format!(
            "ALTER DATABASE {name} WITH ALLOW_CONNECTIONS true"
        ))
        .await
        .unwrap();
    // Back: the pool reconnects by itself.
    clock.advance(Duration::from_secs(2));
    assert_eq!(c.balance("acct").await.unwrap(), 0);
}

/// A [`plangate_tests::procs::TcpCut`] in front of the Postgres at `url`,
/// and `url` through it.
async fn cuttable_path(url: &str) -> (plangate_tests::procs::TcpCut, String) {
    let (user, rest) = url.split_once('@').unwrap();
    let (host_port, db) = rest.split_once('/').unwrap();
    let target = tokio::net::lookup_host(host_port)
        .await
        .unwrap()
        .next()
        .unwrap();
    let path = plangate_tests::procs::TcpCut::start(target).await;
    let via = format!("{user}@{}/{db}", path.addr);
    (path, via)
}

/// A catalog that does not answer (behind `Timed`): a cached entry due for
/// a reload costs the first lookup the timeout (the catalog was not known
/// to fail), then is served at once while it is reloaded in the
/// background; an entry an invalidation named is reloaded before use
/// (and served stale when that fails); an uncached key fails within the
/// timeout. Once the catalog answers again, reloads happen before use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_does_not_wait_for_a_hung_catalog_twice() {
    let Some(f) = postgres().await else { return };
    let url = f.url.clone().unwrap();
    f.catalog
        .apply_plans(&set(None, &[plan("free", 1)]), false)
        .await
        .unwrap();
    f.catalog
        .create_account("acct", None, serde_json::Value::Null)
        .await
        .unwrap();
    let key = f.catalog.create_key("acct").await.unwrap();
    let hash = hash_key(&key.key);
    let timeout = Duration::from_millis(300);
    let (path, via) = cuttable_path(&url).await;
    let clock = ManualClock::new(T0);
    let shared: SharedClock = Arc::new(clock.clone());
    let opts = PgOptions {
        timeout,
        ..PgOptions::default()
    };
    let c: Arc<dyn Catalog> = Arc::new(Timed::new(
        PostgresCatalog::connect_with(&via, shared.clone(), opts)
            .await
            .unwrap(),
        timeout,
    ));
    let cache = CatalogCache::new(c, shared, CacheConfig::default())
        .await
        .unwrap();
    assert!(cache.resolve_key(&hash).await.unwrap().is_some());

    path.blackhole();
    clock.advance(Duration::from_secs(3_700)); // past every TTL, trusted or not
                                               // Not yet known to fail: the reload waits out the timeout, then the
                                               // entry is served stale.
    let start = std::time::Instant::now();
    assert!(cache.resolve_key(&hash).await.unwrap().is_some());
    let first = start.elapsed();
    assert!(first >= timeout, "{first:?}");
    // Known to fail: served at once, every time, reloaded in the background.
    clock.advance(Duration::from_secs(2)); // past retry_after_error
    for _ in 0..3 {
        let start = std::time::Instant::now();
        assert!(cache.resolve_key(&hash).await.unwrap().is_some());
        let took = start.elapsed();
        assert!(took < Duration::from_millis(100), "{took:?}");
        clock.advance(Duration::from_secs(2));
    }
    // Named by an invalidation: reloaded before use even now (once the
    // background reloads above have given up).
    tokio::time::sleep(timeout + Duration::from_millis(200)).await;
    clock.advance(Duration::from_secs(2));
    cache.invalidate(&Invalidation::Key(hash.clone()));
    let start = std::time::Instant::now();
    assert!(cache.resolve_key(&hash).await.unwrap().is_some());
    assert!(start.elapsed() >= timeout, "{:?}", start.elapsed());
    // Not cached at all: Unavailable within the timeout.
    let start = std::time::Instant::now();
    assert!(matches!(
        cache.resolve_key(&hash_key("pg_unknown")).await,
        Err(CatalogError::Unavailable(_))
    ));
    let took = start.elapsed();
    assert!(took >= timeout && took < timeout * 3, "{took:?}");

    // Answering again: a background reload succeeds, and from then on a
    // revoked key is seen at its next use.
    path.restore();
    f.catalog.revoke_key(&key.id).await.unwrap();
    let mut revoked = false;
    for _ in 0..100 {
        clock.advance(Duration::from_secs(2));
        if cache.resolve_key(&hash).await.unwrap().is_none() {
            revoked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(revoked, "the revocation is seen once the catalog answers");
}

/// A Postgres that accepts connections and never answers. Connecting
/// fails within `PgOptions::timeout` (the start-up exchange included, not
/// only the TCP connect). Behind `Timed`, every call on a catalog whose
/// connections stop answering mid-use fails within the timeout as
/// Unavailable, the pool keeps no more connections than before, and once
/// the server answers again the same catalog works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackholed_postgres_fails_within_the_timeout() {
    let Some(f) = postgres().await else { return };
    let url = f.url.clone().unwrap();
    let timeout = Duration::from_millis(300);
    let slack = Duration::from_millis(500);
    let opts = PgOptions {
        timeout,
        ..PgOptions::default()
    };
    let clock: SharedClock = Arc::new(ManualClock::new(T0));

    // A listener that never answers: the connect attempt is bounded.
    let hole = plangate_tests::procs::Blackhole::start().await;
    let start = std::time::Instant::now();
    let err = PostgresCatalog::connect_with(
        &format!("postgres://postgres@{}/plangate", hole.addr),
        clock.clone(),
        opts.clone(),
    )
    .await
    .unwrap_err();
    let took = start.elapsed();
    assert!(matches!(err, CatalogError::Unavailable(_)), "{err}");
    assert!(took < timeout + slack, "connecting took {took:?}");

    // A working server whose path then stops answering.
    let (path, via) = cuttable_path(&url).await;
    let c = Timed::new(
        PostgresCatalog::connect_with(&via, clock, opts)
            .await
            .unwrap(),
        timeout,
    );
    // Set up without the timeout: a loaded box may take longer than
    // 300 ms for these, and they are not what is tested.
    c.inner()
        .apply_plans(&set(None, &[plan("free", 1)]), false)
        .await
        .unwrap();
    c.inner()
        .create_account("acct", None, serde_json::Value::Null)
        .await
        .unwrap();
    let pool_before = c.inner().pool().status().size;
    path.blackhole();
    for round in 0..3 {
        let (nobody, plans) = (hash_key("pg_nobody"), set(None, &[plan("free", 2)]));
        let start = std::time::Instant::now();
        let (key, account, snapshot, ping, plans) = tokio::join!(
            c.lookup_key(&nobody),
            c.get_account("acct"),
            c.credit_snapshot("acct"),
            c.ping(),
            c.apply_plans(&plans, false),
        );
        let took = start.elapsed();
        for e in [
            key.err(),
            account.err(),
            snapshot.err(),
            ping.err(),
            plans.err(),
        ] {
            // "no answer within 300ms", or the pool's own bound on
            // opening another connection.
            assert!(
                matches!(e, Some(CatalogError::Unavailable(ref m))
                    if m.contains("no answer within 300ms") || m.contains("connecting timed out")),
                "round {round}: {e:?}"
            );
        }
        assert!(took < timeout + slack, "round {round} took {took:?}");
    }
    let status = c.inner().pool().status();
    assert!(
        status.size <= pool_before.max(5),
        "{status:?} (before: {pool_before})"
    );
    assert_eq!(status.waiting, 0, "{status:?}");
    // Answering again (the frozen connections resume): the same catalog
    // works, and the plans applied while it hung are either in force or
    // not, never half.
    path.restore();
    let mut back = None;
    for _ in 0..50 {
        if let Ok(a) = c.get_account("acct").await {
            back = Some(a);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(back.unwrap().id, "acct");
    let limit = c.get_plan("free").await.unwrap().endpoints["chat"].windows[0].limit;
    assert!(limit == 1 || limit == 2, "{limit}");
}

// ------------------------------------------------------------------ CLI

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn cli(url: &str, args: &[&str]) -> Run {
    let out = std::process::Command::new(plangate_tests::plangate_bin())
        .args(args)
        .env("PLANGATE_POSTGRES_URL", url)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[track_caller]
fn ok(r: Run) -> String {
    assert_eq!(r.code, 0, "stdout: {}\nstderr: {}", r.stdout, r.stderr);
    r.stdout
}

#[track_caller]
fn bad_input(r: Run) -> String {
    assert_eq!(r.code, 2, "stdout: {}\nstderr: {}", r.stdout, r.stderr);
    assert_eq!(
        r.stderr.trim().lines().count(),
        1,
        "one-line error: {}",
        r.stderr
    );
    assert!(!r.stderr.contains("panicked"));
    r.stderr
}

const PLANS_YAML: &str = r#"
default_plan: free_tier
plans:
  free_tier:
    name: "Free Tier"
    endpoints:
      "gpt-4-turbo":
        fixed_windows:
          - window: 60s
            limit: 3
            unit_type: request
          - window: 86_400s
            limit: 200
          - window: 60s
            limit: 40_000
            unit_type: token
        max_concurrent: 4
        concurrency_expiry: 60s
  premium:
    name: "Premium"
    endpoints:
      "gpt-4-turbo":
        fixed_windows:
          - window: 60s
            limit: 100
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_end_to_end() {
    let Some(url) = plangate_tests::postgres_db("catcli").await else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("plangate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plans_file = dir.join("plans.yaml");
    std::fs::write(&plans_file, PLANS_YAML).unwrap();
    let plans_path = plans_file.to_str().unwrap().to_string();
    let plans_path = plans_path.as_str();
    let run = |args: &[&str]| cli(&url, args);
    {
        assert!(ok(run(&["migrate"])).contains("applied V1__init"));
        assert!(ok(run(&["migrate"])).contains("up to date"));

        let out = ok(run(&["plans", "apply", plans_path]));
        assert!(out.contains("default plan: free_tier"), "{out}");
        let list = ok(run(&["plans", "list"]));
        assert!(
            list.contains("free_tier (default)") && list.contains("premium"),
            "{list}"
        );
        let show = ok(run(&["plans", "show", "free_tier"]));
        assert!(show.contains("40000 tokens/60s"), "{show}");
        let json: serde_json::Value =
            serde_json::from_str(&ok(run(&["plans", "list", "--json"]))).unwrap();
        assert_eq!(json["default_plan"], "free_tier");

        ok(run(&["accounts", "create", "alice"]));
        let show = ok(run(&["accounts", "show", "alice", "--json"]));
        let acct: serde_json::Value = serde_json::from_str(&show).unwrap();
        assert_eq!(acct["effective_plan"], "free_tier");
        ok(run(&["accounts", "assign", "alice", "premium"]));
        assert!(ok(run(&["accounts", "show", "alice"])).contains("plan: premium"));

        let key: serde_json::Value =
            serde_json::from_str(&ok(run(&["keys", "create", "alice", "--json"]))).unwrap();
        let key_id = key["id"].as_str().unwrap().to_string();
        let plaintext = key["key"].as_str().unwrap().to_string();
        assert!(plaintext.starts_with("pg_"));
        let listed = ok(run(&["keys", "list", "alice"]));
        assert!(
            listed.contains(&key_id) && !listed.contains(&plaintext),
            "{listed}"
        );
        ok(run(&["keys", "revoke", &key_id]));
        assert!(ok(run(&["keys", "list", "alice"])).contains("revoked"));

        // Key-level limits: a key with a plan of its own, changed, cleared;
        // an unknown plan is a clear refusal (exit 2).
        let ci: serde_json::Value = serde_json::from_str(&ok(run(&[
            "keys",
            "create",
            "alice",
            "--plan",
            "free_tier",
            "--json",
        ])))
        .unwrap();
        let ci_id = ci["id"].as_str().unwrap().to_string();
        let listed = ok(run(&["keys", "list", "alice"]));
        assert!(listed.contains("plan free_tier"), "{listed}");
        let err = run(&["keys", "create", "alice", "--plan", "ghost"]);
        assert_eq!(err.code, 2, "{}", err.stderr);
        assert!(
            err.stderr.contains("plan not found: ghost"),
            "{}",
            err.stderr
        );
        let err = run(&["keys", "update", &ci_id, "--plan", "ghost"]);
        assert_eq!(err.code, 2, "{}", err.stderr);
        assert!(
            err.stderr.contains("plan not found: ghost"),
            "{}",
            err.stderr
        );
        assert!(ok(run(&["keys", "update", &ci_id, "--plan", "premium"])).contains("premium"));
        // free_tier has a concurrency limit, which a key plan does not carry: said.
        let out = ok(run(&["keys", "update", &ci_id, "--plan", "free_tier"]));
        assert!(
            out.contains("note: only the windows of plan free_tier limit a key"),
            "{out}"
        );
        let out = ok(run(&["keys", "update", &ci_id, "--plan", "premium"]));
        assert!(!out.contains("note:"), "{out}");
        assert!(ok(run(&["keys", "list", "alice"])).contains("plan premium"));
        // A plan a key uses cannot be deleted.
        ok(run(&["accounts", "assign", "alice", "free_tier"]));
        bad_input(run(&["plans", "delete", "premium"]));
        ok(run(&["keys", "update", &ci_id, "--no-plan"]));
        assert!(!ok(run(&["keys", "list", "alice"])).contains("plan "));
        ok(run(&["accounts", "assign", "alice", "premium"]));
        // Neither or both of --plan / --no-plan: a usage error.
        assert_ne!(run(&["keys", "update", &ci_id]).code, 0);
        assert_ne!(
            run(&["keys", "update", &ci_id, "--plan", "premium", "--no-plan"]).code,
            0
        );

        let block: serde_json::Value = serde_json::from_str(&ok(run(&[
            "credits",
            "grant",
            "alice",
            "100",
            "--expires",
            "2999-01-01T00:00:00Z",
            "--json",
        ])))
        .unwrap();
        ok(run(&["credits", "grant", "alice", "5"]));
        let bal: serde_json::Value =
            serde_json::from_str(&ok(run(&["credits", "balance", "alice", "--json"]))).unwrap();
        assert_eq!(bal["balance"], 105);
        ok(run(&["credits", "delete", block["id"].as_str().unwrap()]));
        assert!(ok(run(&["credits", "balance", "alice"])).contains("alice: 5 credits"));
        assert!(ok(run(&["credits", "expire", "alice"])).contains("expired 1 block"));
        assert!(ok(run(&["credits", "balance", "alice"])).contains("alice: 0 credits"));

        // Refusals and bad input: exit 2, one line.
        bad_input(run(&["plans", "delete", "free_tier"]));
        bad_input(run(&["plans", "delete", "premium"]));
        bad_input(run(&["plans", "show", "nope"]));
        bad_input(run(&["accounts", "create", "alice"]));
        bad_input(run(&["accounts", "assign", "alice", "ghost"]));
        bad_input(run(&["keys", "create", "nobody"]));
        bad_input(run(&[
            "credits",
            "grant",
            "alice",
            "10",
            "--expires",
            "tomorrow",
        ]));
        bad_input(run(&["credits", "grant", "alice", "0"]));
        // Above the largest grant, or past the largest balance: exit 2.
        bad_input(run(&["credits", "grant", "alice", "1000000000000001"]));
        ok(run(&["credits", "grant", "alice", "999999999999999"]));
        let err = run(&["credits", "grant", "alice", "2"]);
        assert_eq!(err.code, 2, "{}", err.stderr);
        assert!(
            err.stderr.contains("above the largest balance"),
            "{}",
            err.stderr
        );
        bad_input(run(&["credits", "delete", "qb_missing"]));
        let missing = dir.join("missing.yaml");
        bad_input(run(&["plans", "apply", missing.to_str().unwrap()]));
        let invalid = dir.join("invalid.yaml");
        std::fs::write(
            &invalid,
            "plans:\n  p:\n    endpoints:\n      e:\n        sliding_windows: []\n",
        )
        .unwrap();
        let err = run(&["plans", "apply", invalid.to_str().unwrap()]);
        assert_eq!(err.code, 2, "{}", err.stderr);
        assert!(err.stderr.contains("fixed_windows"), "{}", err.stderr);
        // A database that does not answer is a runtime failure: exit 1.
        let down = cli("postgres://postgres@127.0.0.1:1/none", &["plans", "list"]);
        assert_eq!(down.code, 1, "{}", down.stderr);
        assert_eq!(down.stderr.trim().lines().count(), 1, "{}", down.stderr);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// --------------------------------------------------------------- Client

mod client {
    use super::*;
    use plangate::client::{admin, Client, ClientError, DeductOptions};
    use plangate::limiter::memory::MemoryStore;
    use plangate::limiter::{Denial, Limiter};

    async fn client() -> (Client<MemoryStore>, Arc<dyn Catalog>, ManualClock) {
        let clock = ManualClock::new(T0);
        let shared: SharedClock = Arc::new(clock.clone());
        let catalog: Arc<dyn Catalog> = Arc::new(MemoryCatalog::new(shared.clone()));
        let mut premium = (*plan("premium", 100)).clone();
        premium.endpoints.insert("images".into(), policy(1));
        admin::apply_plans(
            &*catalog,
            &set(Some("free"), &[plan("free", 2), Arc::new(premium)]),
        )
        .await
        .unwrap();
        let limiter = Limiter::new(MemoryStore::new(), shared, Duration::from_secs(1));
        (
            Client::new(catalog.clone(), limiter).await.unwrap(),
            catalog,
            clock,
        )
    }

    #[tokio::test]
    async fn attempt_end_and_info() {
        let (c, _, clock) = client().await;
        let a = c.attempt_request("r1", "u", "chat", &[]).await.unwrap();
        assert!(a.allowed && a.denial.is_none());
        assert_eq!(a.info.unit("request").unwrap().remaining, 1);
        assert!(
            c.attempt_request("r2", "u", "chat", &[])
                .await
                .unwrap()
                .allowed
        );
        let denied = c.attempt_request("r3", "u", "chat", &[]).await.unwrap();
        assert!(!denied.allowed);
        assert!(matches!(denied.denial, Some(Denial::Window { .. })));
        assert_eq!(denied.info.unit("request").unwrap().remaining, 0);
        assert!(c.end_request("r1", &[]).await.unwrap());
        assert!(!c.end_request("r1", &[]).await.unwrap());
        assert!(!c.end_request("never", &[]).await.unwrap());
        let info = c.get_rate_limit_info("u", "chat").await.unwrap();
        assert_eq!(info.unit("request").unwrap().limit, 2);
        assert!(matches!(
            c.attempt_request("r4", "u", "images", &[]).await,
            Err(ClientError::NoAccess(e)) if e == "images"
        ));
        // A window later the account may go again.
        clock.advance(Duration::from_secs(60));
        assert!(
            c.attempt_request("r5", "u", "chat", &[])
                .await
                .unwrap()
                .allowed
        );
    }

    #[tokio::test]
    async fn admin_functions_and_credits() {
        let (c, db, _) = client().await;
        let db = &*db;
        // assign_plan creates the account, as the original did.
        admin::assign_plan(db, "acct", "premium").await.unwrap();
        assert_eq!(
            admin::get_account_plan(db, "acct")
                .await
                .unwrap()
                .unwrap()
                .id,
            "premium"
        );
        assert_eq!(
            admin::get_account_plan(db, "stranger")
                .await
                .unwrap()
                .unwrap()
                .id,
            "free"
        );
        wait_for(|| async { c.policy("acct", "images").await.is_ok() }).await;
        // Billing anchors: set, refused out of range, cleared.
        admin::set_billing_anchor(db, "acct", Some(15))
            .await
            .unwrap();
        assert_eq!(
            db.get_account("acct").await.unwrap().billing_anchor,
            Some(15)
        );
        assert!(admin::set_billing_anchor(db, "acct", Some(32))
            .await
            .is_err());
        assert!(admin::set_billing_anchor(db, "ghost", Some(2))
            .await
            .is_err());
        admin::set_billing_anchor(db, "acct", None).await.unwrap();
        assert_eq!(db.get_account("acct").await.unwrap().billing_anchor, None);
        admin::set_default_plan(db, "premium").await.unwrap();
        assert!(matches!(
            admin::delete_plan(db, "premium").await,
            Err(CatalogError::Conflict(_))
        ));
        admin::delete_plan(db, "free").await.unwrap();
        assert_eq!(
            admin::list_plans(db)
                .await
                .unwrap()
                .plans
                .keys()
                .collect::<Vec<_>>(),
            ["premium"]
        );

        let b = admin::create_quota_block(db, "acct", 10, None, serde_json::Value::Null)
            .await
            .unwrap();
        assert_eq!(c.get_balance("acct").await.unwrap(), 10);
        assert!(c.has_min_balance("acct", 10).await.unwrap());
        assert!(!c.has_min_balance("acct", 11).await.unwrap());
        let opts = DeductOptions {
            require_full: true,
            request_id: Some("req-1".into()),
            ..Default::default()
        };
        let r = c.deduct_credits("acct", 4, opts.clone()).await.unwrap();
        assert_eq!((r.deducted, r.balance), (4, 6));
        // Keyed by request id: a retry deducts nothing more.
        assert!(c.deduct_credits("acct", 4, opts).await.unwrap().replayed);
        assert_eq!(c.refund_credits("req-1").await.unwrap(), 4);
        admin::delete_quota_block(db, &b.id).await.unwrap();
        admin::create_quota_block(db, "acct", 3, None, serde_json::Value::Null)
            .await
            .unwrap();
        assert_eq!(admin::expire_quota_blocks(db, "acct").await.unwrap(), 1);
        assert_eq!(c.get_balance("acct").await.unwrap(), 0);
    }
}
