//! The Postgres catalog's group commit of deductions
//! (`catalog/postgres/deduct.rs`): concurrent `deduct` calls applied in
//! batches, one transaction each, exact across two catalogs on one
//! database; `deduct_batch` runs one given batch, so what happens inside
//! one is tested deterministically.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use plangate::catalog::postgres::PostgresCatalog;
use plangate::catalog::{Catalog, CatalogError, DeductResult, Deduction};
use plangate::clock::ManualClock;

use super::{deduction, fresh_db, is_not_found, remaining, T0};

async fn two_catalogs() -> Option<(Arc<PostgresCatalog>, Arc<PostgresCatalog>, ManualClock)> {
    let url = fresh_db().await?;
    let clock = ManualClock::new(T0);
    let a = PostgresCatalog::connect(&url, Arc::new(clock.clone()))
        .await
        .expect("connect a");
    let b = PostgresCatalog::connect(&url, Arc::new(clock.clone()))
        .await
        .expect("connect b");
    Some((Arc::new(a), Arc::new(b), clock))
}

fn at(offset: Duration) -> std::time::SystemTime {
    std::time::SystemTime::UNIX_EPOCH + Duration::from_millis(T0) + offset
}

fn admission(account: &str, key: &str) -> Deduction {
    let mut d = deduction(account, 1, key);
    d.require_full = true;
    d.min_balance = 1;
    d
}

/// Send every deduction at once, each to catalog `a` or `b` (or both:
/// then the same key twice, concurrently); results by key, both answers.
async fn fire(
    cats: &[Arc<PostgresCatalog>],
    ds: Vec<(Deduction, &[usize])>,
) -> HashMap<String, Vec<DeductResult>> {
    let start = Arc::new(tokio::sync::Barrier::new(
        ds.iter().map(|(_, to)| to.len()).sum(),
    ));
    let mut tasks = Vec::new();
    for (d, to) in ds {
        for &i in to {
            let (c, d, start) = (cats[i].clone(), d.clone(), start.clone());
            tasks.push(tokio::spawn(async move {
                start.wait().await;
                let r = c.deduct(&d).await.expect("deduct");
                (d.idempotency_key, r)
            }));
        }
    }
    let mut out: HashMap<String, Vec<DeductResult>> = HashMap::new();
    for t in tasks {
        let (k, r) = t.await.unwrap();
        out.entry(k).or_default().push(r);
    }
    out
}

/// Two catalogs (two gateway instances) on one database, one hot account
/// with 300 credits in three blocks and an expired one: concurrent
/// admission-style deductions (cost 1, require_full, min_balance 1) take
/// exactly the balance, earliest expiry first; keys sent to both catalogs
/// at once deduct once; deductions are batched (fewer transactions than
/// deductions); a block that expires between two bursts is not drawn by
/// the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_batched_deductions_exact_across_two_catalogs() {
    let Some((a, b, clock)) = two_catalogs().await else {
        return;
    };
    let cats = [a.clone(), b.clone()];
    a.create_account("hot", None, serde_json::Value::Null)
        .await
        .unwrap();
    let null = serde_json::Value::Null;
    let never = a
        .create_quota_block("hot", 100, None, null.clone())
        .await
        .unwrap();
    let late = a
        .create_quota_block(
            "hot",
            100,
            Some(at(Duration::from_secs(7200))),
            null.clone(),
        )
        .await
        .unwrap();
    let early = a
        .create_quota_block(
            "hot",
            100,
            Some(at(Duration::from_secs(3600))),
            null.clone(),
        )
        .await
        .unwrap();
    // Granted just before it expires (an expired grant is refused).
    let expired = a
        .create_quota_block("hot", 500, Some(at(Duration::from_millis(1))), null.clone())
        .await
        .unwrap();
    clock.advance(Duration::from_millis(1));

    // Burst one: 150 deductions split over the two catalogs. The earliest
    // expiring block drains first, then the next; never-expiring untouched.
    let both: &[usize] = &[0, 1];
    let burst: Vec<(Deduction, &[usize])> = (0..150)
        .map(|i| {
            (
                admission("hot", &format!("one-{i}")),
                &both[i % 2..i % 2 + 1],
            )
        })
        .collect();
    let r = fire(&cats, burst).await;
    assert!(r.values().flatten().all(|r| r.deducted == 1 && !r.replayed));
    let blocks = a.list_quota_blocks("hot").await.unwrap();
    assert_eq!(remaining(&blocks, &early.id), 0);
    assert_eq!(remaining(&blocks, &late.id), 50);
    assert_eq!(remaining(&blocks, &never.id), 100);

    // Burst two: 250 keys, each sent to both catalogs at once (500 calls):
    // exactly the 150 credits left are taken, each key at most once.
    let burst: Vec<(Deduction, &[usize])> = (0..250)
        .map(|i| (admission("hot", &format!("two-{i}")), both))
        .collect();
    let r = fire(&cats, burst).await;
    let mut charged = 0;
    for (key, answers) in &r {
        assert_eq!(answers.len(), 2);
        let fresh: Vec<_> = answers.iter().filter(|r| !r.replayed).collect();
        if answers.iter().any(|r| r.deducted == 1) {
            charged += 1;
            // One deducted, the other replayed the same result.
            assert_eq!(fresh.len(), 1, "{key}: {answers:?}");
            assert!(
                answers.iter().all(|r| r.deducted == 1),
                "{key}: {answers:?}"
            );
        } else {
            assert!(answers.iter().all(|r| r.shortfall == 1 && !r.replayed));
        }
    }
    assert_eq!(charged, 150);
    assert_eq!(a.balance("hot").await.unwrap(), 0);
    let blocks = b.list_quota_blocks("hot").await.unwrap();
    for id in [&never.id, &late.id, &early.id] {
        assert_eq!(remaining(&blocks, id), 0);
    }
    assert_eq!(remaining(&blocks, &expired.id), 500);
    let ledger = a.ledger("hot").await.unwrap();
    assert_eq!(ledger.len(), 300);
    assert_eq!(ledger.iter().map(|e| e.deducted).sum::<u64>(), 300);
    // Batched: fewer batches than deductions (the first caller of a burst
    // goes alone, the rest queue behind it), and none had to fall back.
    let (sa, sb) = (a.batch_stats(), b.batch_stats());
    assert_eq!(sa.deductions + sb.deductions, 150 + 500, "{sa:?} {sb:?}");
    assert!(sa.batches + sb.batches < 650 / 4, "{sa:?} {sb:?}");
    assert!(sa.largest > 1 && sb.largest > 1, "{sa:?} {sb:?}");
    assert_eq!(sa.fallbacks + sb.fallbacks, 0, "{sa:?} {sb:?}");

    // A block expiring between two bursts: drawn by the first (earliest
    // expiry first), never by the second.
    a.create_account("exp", None, null.clone()).await.unwrap();
    let soon = a
        .create_quota_block("exp", 1000, Some(at(Duration::from_secs(10))), null.clone())
        .await
        .unwrap();
    let after = a.create_quota_block("exp", 1000, None, null).await.unwrap();
    let burst: Vec<(Deduction, &[usize])> = (0..60)
        .map(|i| {
            (
                admission("exp", &format!("e1-{i}")),
                &both[i % 2..i % 2 + 1],
            )
        })
        .collect();
    fire(&cats, burst).await;
    clock.advance(Duration::from_secs(10));
    let burst: Vec<(Deduction, &[usize])> = (0..60)
        .map(|i| {
            (
                admission("exp", &format!("e2-{i}")),
                &both[i % 2..i % 2 + 1],
            )
        })
        .collect();
    let r = fire(&cats, burst).await;
    assert!(r.values().flatten().all(|r| r.deducted == 1));
    let blocks = a.list_quota_blocks("exp").await.unwrap();
    assert_eq!(remaining(&blocks, &soon.id), 940);
    assert_eq!(remaining(&blocks, &after.id), 940);
    for e in a.ledger("exp").await.unwrap() {
        let block = if e.idempotency_key.starts_with("e1-") {
            &soon.id
        } else {
            &after.id
        };
        assert_eq!(e.draws.len(), 1, "{e:?}");
        assert_eq!(&e.draws[0].block_id, block, "{e:?}");
    }
}

fn result(r: &Result<DeductResult, CatalogError>) -> (u64, u64, u64, u64, bool) {
    let r = r.as_ref().expect("deducted");
    (r.requested, r.deducted, r.shortfall, r.balance, r.replayed)
}

/// One batch mixing partial and all-or-nothing deductions and a
/// min_balance: each is decided in arrival order against what the ones
/// before it left, exactly as one transaction each would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_batch_mixed_require_full_and_partial() {
    let Some((a, _b, _clock)) = two_catalogs().await else {
        return;
    };
    a.create_account("mix", None, serde_json::Value::Null)
        .await
        .unwrap();
    let never = a
        .create_quota_block("mix", 6, None, serde_json::Value::Null)
        .await
        .unwrap();
    let early = a
        .create_quota_block(
            "mix",
            4,
            Some(at(Duration::from_secs(60))),
            serde_json::Value::Null,
        )
        .await
        .unwrap();
    let full = |key: &str, amount| {
        let mut d = deduction("mix", amount, key);
        d.require_full = true;
        d
    };
    let mut min = deduction("mix", 1, "min");
    min.min_balance = 1;
    let batch = vec![
        deduction("mix", 3, "p1"), // 10 -> 7, from early
        full("f1", 5),             // 7 -> 2: early's last 1, then 4 of never
        full("f2", 5),             // refused: 2 < 5
        deduction("mix", 5, "p2"), // partial: takes 2, shortfall 3
        min,                       // refused: balance 0 < 1
        deduction("mix", 1, "p3"), // partial: nothing left, shortfall recorded
    ];
    let r = a.deduct_batch(&batch).await;
    assert_eq!(r.len(), 6);
    assert_eq!(result(&r[0]), (3, 3, 0, 7, false));
    assert_eq!(result(&r[1]), (5, 5, 0, 2, false));
    assert_eq!(result(&r[2]), (5, 0, 5, 2, false));
    assert_eq!(result(&r[3]), (5, 2, 3, 0, false));
    assert_eq!(result(&r[4]), (1, 0, 1, 0, false));
    assert_eq!(result(&r[5]), (1, 0, 1, 0, false));
    let stats = a.batch_stats();
    assert_eq!(
        (stats.batches, stats.deductions, stats.fallbacks),
        (1, 6, 0)
    );

    let blocks = a.list_quota_blocks("mix").await.unwrap();
    assert_eq!(remaining(&blocks, &early.id), 0);
    assert_eq!(remaining(&blocks, &never.id), 0);
    let ledger = a.ledger("mix").await.unwrap();
    type Row<'a> = (&'a str, u64, u64, Vec<(String, u64)>);
    let rows: Vec<Row> = ledger
        .iter()
        .map(|e| {
            (
                e.idempotency_key.as_str(),
                e.requested,
                e.deducted,
                e.draws
                    .iter()
                    .map(|d| (d.block_id.clone(), d.credits))
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            ("p1", 3, 3, vec![(early.id.clone(), 3)]),
            (
                "f1",
                5,
                5,
                vec![(early.id.clone(), 1), (never.id.clone(), 4)]
            ),
            ("p2", 5, 2, vec![(never.id.clone(), 2)]),
            ("p3", 1, 0, vec![]),
        ]
    );
    assert_eq!(ledger[0].request_id.as_deref(), Some("req-p1"));
    assert_eq!(ledger[0].endpoint.as_deref(), Some("chat"));
    // Refusals left their keys unused.
    a.create_quota_block("mix", 5, None, serde_json::Value::Null)
        .await
        .unwrap();
    let r = a.deduct(&full("f2", 5)).await.unwrap();
    assert_eq!((r.deducted, r.replayed), (5, false));
}

/// Duplicate keys: a key already in the ledger replays; a key twice in one
/// batch deducts once (the second replays the first's result); a key whose
/// first use in the batch is refused is still free for its second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_batch_duplicate_key_deducts_once() {
    let Some((a, _b, _clock)) = two_catalogs().await else {
        return;
    };
    a.create_account("dup", None, serde_json::Value::Null)
        .await
        .unwrap();
    a.create_quota_block("dup", 100, None, serde_json::Value::Null)
        .await
        .unwrap();
    let before = a.deduct(&deduction("dup", 10, "old")).await.unwrap();
    assert_eq!((before.deducted, before.balance), (10, 90));

    let mut too_much = deduction("dup", 1000, "late");
    too_much.require_full = true;
    let batch = vec![
        deduction("dup", 7, "k"),
        deduction("dup", 7, "k"),
        deduction("dup", 3, "old"), // replays the earlier 10
        deduction("dup", 1, "k"),   // another amount, same key: replays 7
        too_much,                   // refused: the key stays free
        deduction("dup", 2, "late"),
        deduction("dup", 2, "late"),
    ];
    let r = a.deduct_batch(&batch).await;
    assert_eq!(result(&r[0]), (7, 7, 0, 83, false));
    assert_eq!(result(&r[1]), (7, 7, 0, 83, true));
    assert_eq!(result(&r[2]), (10, 10, 0, 83, true));
    assert_eq!(result(&r[3]), (7, 7, 0, 83, true));
    assert_eq!(result(&r[4]), (1000, 0, 1000, 83, false));
    assert_eq!(result(&r[5]), (2, 2, 0, 81, false));
    assert_eq!(result(&r[6]), (2, 2, 0, 81, true));
    assert_eq!(a.balance("dup").await.unwrap(), 81);
    // Decided in the batch, not by a fallback one by one.
    assert_eq!(a.batch_stats().fallbacks, 0);
    let keys: Vec<String> = a
        .ledger("dup")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.idempotency_key)
        .collect();
    assert_eq!(keys, ["old", "k", "late"]);
    // Replays across batches too.
    let r = a.deduct(&deduction("dup", 7, "k")).await.unwrap();
    assert!(r.replayed && r.deducted == 7 && r.balance == 81);
    // A key used by another account replays that deduction and its
    // account's balance, as one transaction would (the ledger conflict
    // comes before the account's blocks matter).
    a.create_account("other", None, serde_json::Value::Null)
        .await
        .unwrap();
    a.create_quota_block("other", 5, None, serde_json::Value::Null)
        .await
        .unwrap();
    let r = a
        .deduct_batch(&[deduction("other", 1, "old"), deduction("other", 1, "o1")])
        .await;
    assert_eq!(result(&r[0]), (10, 10, 0, 81, true));
    assert_eq!(result(&r[1]), (1, 1, 0, 4, false));
    let u = a
        .deduct_unbatched(&deduction("other", 1, "old"))
        .await
        .unwrap();
    assert_eq!((u.deducted, u.balance, u.replayed), (10, 81, true));
}

/// An unknown account in a batch fails alone (NotFound) and the others
/// complete in the same batch; a deduction that makes the batch
/// transaction itself fail (a request id Postgres cannot store) sends the
/// batch one by one, where it fails alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_batch_with_unknown_account_completes_the_others() {
    let Some((a, _b, _clock)) = two_catalogs().await else {
        return;
    };
    for id in ["one", "two"] {
        a.create_account(id, None, serde_json::Value::Null)
            .await
            .unwrap();
        a.create_quota_block(id, 10, None, serde_json::Value::Null)
            .await
            .unwrap();
    }
    let batch = vec![
        deduction("one", 4, "a1"),
        deduction("nobody", 1, "n1"),
        deduction("two", 3, "b1"),
        deduction("one", 4, "a2"),
    ];
    let r = a.deduct_batch(&batch).await;
    assert_eq!(result(&r[0]), (4, 4, 0, 6, false));
    assert!(
        matches!(r[1], Err(CatalogError::NotFound { .. })),
        "{:?}",
        r[1]
    );
    assert_eq!(result(&r[2]), (3, 3, 0, 7, false));
    assert_eq!(result(&r[3]), (4, 4, 0, 2, false));
    assert_eq!(a.batch_stats().fallbacks, 0);
    // Through the batcher as well.
    assert!(is_not_found(a.deduct(&deduction("nobody", 1, "n2")).await));

    let mut bad = deduction("two", 1, "bad");
    bad.request_id = Some("nul\0byte".into());
    let batch = vec![deduction("one", 1, "a3"), bad, deduction("two", 1, "b2")];
    let r = a.deduct_batch(&batch).await;
    assert_eq!(result(&r[0]), (1, 1, 0, 1, false));
    assert!(
        matches!(r[1], Err(CatalogError::Unavailable(_))),
        "{:?}",
        r[1]
    );
    assert_eq!(result(&r[2]), (1, 1, 0, 6, false));
    assert_eq!(a.batch_stats().fallbacks, 1);
    assert_eq!(a.balance("one").await.unwrap(), 1);
    assert_eq!(a.balance("two").await.unwrap(), 6);
    assert_eq!(a.ledger("two").await.unwrap().len(), 2);
}
