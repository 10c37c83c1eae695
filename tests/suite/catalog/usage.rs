//! Usage events (`catalog/usage.rs`): one conformance suite run on the
//! in-process and the Postgres catalog — idempotent batches, keyset pages
//! that read every event exactly once across ties on `ended_at`, filters,
//! hour/day/endpoint sums, retention.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use plangate::catalog::{
    BucketKey, Catalog, Draw, GroupBy, RequestCharge, UnitUsage, UsageBucket, UsageCursor,
    UsageEvent, UsageQuery,
};

use super::{is_invalid, Fixture};

const HOUR: u64 = 3_600_000;
const DAY: u64 = 86_400_000;
/// 2027-01-14T00:00:00Z: a day boundary, so buckets are easy to name.
const D0: u64 = 1_799_884_800_000;

fn at(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

fn unit(name: &str, measured: u64, reserved: u64) -> UnitUsage {
    UnitUsage {
        unit: name.into(),
        measured,
        reserved,
    }
}

fn ev(id: &str, account: &str, endpoint: &str, ended_ms: u64) -> UsageEvent {
    UsageEvent {
        request_id: id.into(),
        account_id: account.into(),
        key_id: Some(format!("key_{account}")),
        endpoint: endpoint.into(),
        route: "/v1/chat/completions".into(),
        units: vec![unit("token", 10, 0)],
        credits: 1,
        status: 200,
        degraded: false,
        streamed: false,
        cut_short: false,
        started_at: at(ended_ms - 250),
        ended_at: at(ended_ms),
        charge: None,
    }
}

fn ids(events: &[UsageEvent]) -> Vec<String> {
    events.iter().map(|e| e.request_id.clone()).collect()
}

/// Every event matching `q`, read in pages of `limit`, each page started
/// from the cursor of the one before as an HTTP client would: encoded and
/// decoded again.
async fn read_all(c: &dyn Catalog, q: &UsageQuery, limit: usize) -> Vec<UsageEvent> {
    let mut out: Vec<UsageEvent> = Vec::new();
    let mut cursor: Option<UsageCursor> = None;
    loop {
        let page = c.usage_events(q, cursor.as_ref(), limit).await.unwrap();
        assert!(
            page.len() <= limit,
            "a page of {} for limit {limit}",
            page.len()
        );
        let Some(last) = page.last() else { break };
        let next = UsageCursor::decode(&UsageCursor::after(last).encode()).unwrap();
        let full = page.len() == limit;
        out.extend(page);
        if !full {
            break;
        }
        cursor = Some(next);
        assert!(out.len() < 100_000, "paging does not end");
    }
    out
}

/// The order both catalogs promise: `ended_at`, then `request_id` bytewise.
fn sorted(mut events: Vec<UsageEvent>) -> Vec<UsageEvent> {
    events.sort_by(|a, b| (a.ended_at, &a.request_id).cmp(&(b.ended_at, &b.request_id)));
    events
}

fn everything() -> UsageQuery {
    UsageQuery::default()
}

async fn recording_is_idempotent(f: Fixture) {
    let c = &*f.catalog;
    // Not an account of the catalog: usage of unknown (or deleted)
    // accounts is kept.
    let mut a1 = ev("req-1", "ghost", "chat", D0 + 1_000);
    // Stored normalized: ms precision, units by name.
    a1.ended_at += Duration::from_micros(789);
    a1.started_at += Duration::from_nanos(5);
    a1.units = vec![
        unit("token", 120, 200),
        unit("image", 2, 2),
        unit("gpu-second", 0, 7),
    ];
    a1.key_id = None;
    a1.status = 499;
    a1.cut_short = true;
    a1.streamed = true;
    a1.degraded = true;
    a1.credits = 9_000_000_000_000_000_000;
    let a2 = ev("req-2", "acct", "chat", D0 + 2_000);
    let mut a3 = ev("req-3", "acct", "embed", D0 + 2_000);
    a3.units.clear();
    a3.route = String::new();
    a3.endpoint = String::new();
    let batch = vec![a1.clone(), a2.clone(), a3.clone()];
    assert_eq!(c.record_usage(&batch).await.unwrap(), 3);
    assert_eq!(c.record_usage(&batch).await.unwrap(), 0, "replayed batch");
    assert_eq!(c.record_usage(&[]).await.unwrap(), 0);

    // An id stored keeps its first record; within a batch the first copy
    // wins too.
    let mut a3_again = a3.clone();
    a3_again.credits = 77;
    let a4 = ev("req-4", "acct", "chat", D0 + 3_000);
    let mut a4_copy = a4.clone();
    a4_copy.credits = 55;
    assert_eq!(
        c.record_usage(&[a3_again, a4.clone(), a4_copy])
            .await
            .unwrap(),
        1
    );

    let stored = read_all(c, &everything(), 10).await;
    let want: Vec<UsageEvent> = [&a1, &a2, &a3, &a4]
        .iter()
        .map(|e| e.normalized())
        .collect();
    assert_eq!(stored, want);
    assert_eq!(
        stored[0]
            .units
            .iter()
            .map(|u| u.unit.as_str())
            .collect::<Vec<_>>(),
        ["gpu-second", "image", "token"]
    );
    assert_eq!(stored[0].ended_at, at(D0 + 1_000));
    // A normalized event survives JSON unchanged (what export writes).
    let json = serde_json::to_string(&stored[0]).unwrap();
    assert_eq!(
        serde_json::from_str::<UsageEvent>(&json).unwrap(),
        stored[0]
    );

    // One invalid event refuses the whole batch; nothing is written.
    let a5 = ev("req-5", "acct", "chat", D0 + 4_000);
    let mut bad = ev("req-6", "acct", "chat", D0 + 4_000);
    bad.status = 42;
    assert!(is_invalid(c.record_usage(&[a5.clone(), bad]).await));
    let mut nul = ev("req-7", "acct\0", "chat", D0 + 4_000);
    assert!(is_invalid(c.record_usage(&[nul.clone()]).await));
    nul.account_id = "acct".into();
    nul.units = vec![unit("token", 1, 0), unit("token", 2, 0)];
    assert!(is_invalid(c.record_usage(&[nul]).await));
    let mut huge = a5.clone();
    huge.units[0].measured = u64::MAX;
    assert!(is_invalid(c.record_usage(&[huge]).await));
    assert_eq!(read_all(c, &everything(), 10).await.len(), 4);
    assert_eq!(c.record_usage(&[a5]).await.unwrap(), 1);
}

/// Ids whose bytewise order differs from a typical locale's (upper before
/// lower case, punctuation, non-ASCII), so a backend sorting by collation
/// instead of bytes would page differently from the other.
const ID_STEMS: [&str; 8] = ["A", "a", "B", "_", "Z-", "é", "a-b", "ab"];

fn tied_events() -> Vec<UsageEvent> {
    let mut out = Vec::new();
    for (i, stem) in ID_STEMS.iter().enumerate() {
        for t in 0..5u64 {
            // Five distinct end times, eight events on each.
            let account = if i % 2 == 0 { "even" } else { "odd" };
            out.push(ev(&format!("{stem}{t}"), account, "chat", D0 + t * 1_000));
        }
    }
    out
}

async fn pages_cover_every_event_once(f: Fixture) {
    let c = &*f.catalog;
    let events = tied_events();
    // Recorded out of order, in uneven batches.
    let mut shuffled = events.clone();
    shuffled.reverse();
    shuffled.rotate_left(13);
    for chunk in shuffled.chunks(7) {
        c.record_usage(chunk).await.unwrap();
    }
    let want = sorted(events.iter().map(|e| e.normalized()).collect());
    for limit in [1, 3, 7, 8, 40, 41, 1000] {
        let got = read_all(c, &everything(), limit).await;
        assert_eq!(ids(&got), ids(&want), "limit {limit}");
    }
    // The same with filters: one account, and a time range that cuts no
    // tie (since is inclusive, until exclusive).
    let odd = UsageQuery {
        account_id: Some("odd".into()),
        ..everything()
    };
    let want_odd: Vec<UsageEvent> = want
        .iter()
        .filter(|e| e.account_id == "odd")
        .cloned()
        .collect();
    assert_eq!(want_odd.len(), 20);
    for limit in [1, 3, 20] {
        assert_eq!(ids(&read_all(c, &odd, limit).await), ids(&want_odd));
    }
    let middle = UsageQuery {
        since: Some(at(D0 + 1_000)),
        until: Some(at(D0 + 3_000)),
        ..everything()
    };
    let want_middle: Vec<UsageEvent> = want
        .iter()
        .filter(|e| e.ended_at >= at(D0 + 1_000) && e.ended_at < at(D0 + 3_000))
        .cloned()
        .collect();
    assert_eq!(want_middle.len(), 16);
    for limit in [1, 5, 16, 17] {
        assert_eq!(ids(&read_all(c, &middle, limit).await), ids(&want_middle));
    }
    // A cursor from the middle of a tie resumes right after it.
    let cut = &want[10];
    let rest = c
        .usage_events(&everything(), Some(&UsageCursor::after(cut)), 1000)
        .await
        .unwrap();
    assert_eq!(ids(&rest), ids(&want[11..]));
    // A cursor before `since` starts at `since`.
    let before = UsageCursor {
        ended_ms: D0 - 5,
        request_id: "zzz".into(),
    };
    let from_since = c.usage_events(&middle, Some(&before), 1000).await.unwrap();
    assert_eq!(ids(&from_since), ids(&want_middle));
    assert!(c
        .usage_events(&everything(), None, 0)
        .await
        .unwrap()
        .is_empty());
}

async fn filters(f: Fixture) {
    let c = &*f.catalog;
    let events = vec![
        ev("e1", "a", "chat", D0),
        ev("e2", "a", "embed", D0 + 1_000),
        ev("e3", "b", "chat", D0 + 1_000),
        ev("e4", "b", "embed", D0 + 2_000),
        ev("e5", "a", "chat", D0 + 3_000),
    ];
    c.record_usage(&events).await.unwrap();
    let q = |account: Option<&str>,
             since: Option<SystemTime>,
             until: Option<SystemTime>,
             endpoint: Option<&str>| UsageQuery {
        account_id: account.map(str::to_string),
        since,
        until,
        endpoint: endpoint.map(str::to_string),
    };
    let sub_ms = Duration::from_micros(1);
    let cases: Vec<(UsageQuery, Vec<&str>)> = vec![
        (everything(), vec!["e1", "e2", "e3", "e4", "e5"]),
        (q(Some("a"), None, None, None), vec!["e1", "e2", "e5"]),
        (q(Some("c"), None, None, None), vec![]),
        (q(None, None, None, Some("embed")), vec!["e2", "e4"]),
        (q(Some("a"), None, None, Some("chat")), vec!["e1", "e5"]),
        // since is inclusive, until exclusive.
        (
            q(None, Some(at(D0 + 1_000)), None, None),
            vec!["e2", "e3", "e4", "e5"],
        ),
        (q(None, None, Some(at(D0 + 1_000)), None), vec!["e1"]),
        (
            q(None, Some(at(D0 + 1_000)), Some(at(D0 + 3_000)), None),
            vec!["e2", "e3", "e4"],
        ),
        // Bounds finer than a ms: an event at D0+1000 ended before
        // D0+1000+1µs and not at or after it.
        (
            q(None, Some(at(D0 + 1_000) + sub_ms), None, None),
            vec!["e4", "e5"],
        ),
        (
            q(None, None, Some(at(D0 + 1_000) + sub_ms), None),
            vec!["e1", "e2", "e3"],
        ),
        (
            q(None, Some(at(D0 + 2_000)), Some(at(D0 + 2_000)), None),
            vec![],
        ),
        (q(None, Some(at(D0 + 3_000)), Some(at(D0)), None), vec![]),
        (
            q(
                Some("b"),
                Some(at(D0 + 1_000)),
                Some(at(D0 + 2_001)),
                Some("embed"),
            ),
            vec!["e4"],
        ),
    ];
    for (query, want) in cases {
        let got = read_all(c, &query, 2).await;
        assert_eq!(ids(&got), want, "{query:?}");
    }
}

fn bucket(key: BucketKey, requests: u64, credits: u64, units: &[(&str, u64)]) -> UsageBucket {
    UsageBucket {
        key,
        requests,
        credits,
        units: units
            .iter()
            .map(|(u, n)| (u.to_string(), *n))
            .collect::<BTreeMap<_, _>>(),
    }
}

fn start(ms: u64) -> BucketKey {
    BucketKey::Start(at(ms))
}

async fn summaries(f: Fixture) {
    let c = &*f.catalog;
    let mk =
        |id: &str, account: &str, endpoint: &str, ms: u64, credits: u64, units: Vec<UnitUsage>| {
            let mut e = ev(id, account, endpoint, ms);
            e.credits = credits;
            e.units = units;
            e
        };
    let events = vec![
        // Day 0, hour 0.
        mk("s1", "a", "chat", D0, 2, vec![unit("token", 100, 500)]),
        mk(
            "s2",
            "a",
            "chat",
            D0 + HOUR - 1,
            3,
            vec![unit("token", 50, 0), unit("image", 1, 1)],
        ),
        // Day 0, hour 1 (an event with no units counts as a request).
        // "Images" sorts before "chat" bytewise, after it in most locales.
        mk("s3", "a", "Images", D0 + HOUR, 5, vec![unit("image", 4, 4)]),
        mk("s4", "b", "chat", D0 + HOUR + 10, 0, vec![]),
        // Day 1, hour 0: the very first ms of the day.
        mk("s5", "a", "chat", D0 + DAY, 7, vec![unit("token", 1, 0)]),
        mk(
            "s6",
            "b",
            "chat",
            D0 + DAY + 2 * HOUR,
            1,
            vec![unit("token", 9, 9)],
        ),
    ];
    c.record_usage(&events).await.unwrap();

    let hours = c.usage_summary(&everything(), GroupBy::Hour).await.unwrap();
    assert_eq!(
        hours,
        vec![
            bucket(start(D0), 2, 5, &[("image", 1), ("token", 150)]),
            bucket(start(D0 + HOUR), 2, 5, &[("image", 4)]),
            bucket(start(D0 + DAY), 1, 7, &[("token", 1)]),
            bucket(start(D0 + DAY + 2 * HOUR), 1, 1, &[("token", 9)]),
        ]
    );
    let days = c.usage_summary(&everything(), GroupBy::Day).await.unwrap();
    assert_eq!(
        days,
        vec![
            bucket(start(D0), 4, 10, &[("image", 5), ("token", 150)]),
            bucket(start(D0 + DAY), 2, 8, &[("token", 10)]),
        ]
    );
    let endpoints = c
        .usage_summary(&everything(), GroupBy::Endpoint)
        .await
        .unwrap();
    assert_eq!(
        endpoints,
        vec![
            bucket(BucketKey::Endpoint("Images".into()), 1, 5, &[("image", 4)]),
            bucket(
                BucketKey::Endpoint("chat".into()),
                5,
                13,
                &[("image", 1), ("token", 160)]
            ),
        ]
    );
    // By account (the console's top accounts), bytewise.
    assert_eq!(
        c.usage_summary(&everything(), GroupBy::Account)
            .await
            .unwrap(),
        vec![
            bucket(
                BucketKey::Account("a".into()),
                4,
                17,
                &[("image", 5), ("token", 151)]
            ),
            bucket(BucketKey::Account("b".into()), 2, 1, &[("token", 9)]),
        ]
    );
    // Filters apply before grouping.
    let b_only = UsageQuery {
        account_id: Some("b".into()),
        ..everything()
    };
    assert_eq!(
        c.usage_summary(&b_only, GroupBy::Day).await.unwrap(),
        vec![
            bucket(start(D0), 1, 0, &[]),
            bucket(start(D0 + DAY), 1, 1, &[("token", 9)]),
        ]
    );
    let day1_chat = UsageQuery {
        since: Some(at(D0 + HOUR)),
        endpoint: Some("chat".into()),
        ..everything()
    };
    assert_eq!(
        c.usage_summary(&day1_chat, GroupBy::Endpoint)
            .await
            .unwrap(),
        vec![bucket(
            BucketKey::Endpoint("chat".into()),
            3,
            8,
            &[("token", 10)]
        )]
    );
    let nobody = UsageQuery {
        account_id: Some("nobody".into()),
        ..everything()
    };
    assert!(c
        .usage_summary(&nobody, GroupBy::Hour)
        .await
        .unwrap()
        .is_empty());
}

async fn prune(f: Fixture) {
    let c = &*f.catalog;
    let events: Vec<UsageEvent> = (0..25u64)
        .map(|i| ev(&format!("p{i:02}"), "a", "chat", D0 + i * 1_000))
        .collect();
    c.record_usage(&events).await.unwrap();
    // `before` is exclusive: the event ending at D0+10s stays.
    assert_eq!(c.prune_usage(at(D0 + 10_000)).await.unwrap(), 10);
    assert_eq!(c.prune_usage(at(D0 + 10_000)).await.unwrap(), 0);
    let left = read_all(c, &everything(), 100).await;
    assert_eq!(left.len(), 15);
    assert_eq!(left[0].request_id, "p10");
    // Finer than a ms: the event at D0+10s ended before D0+10s+1µs.
    assert_eq!(
        c.prune_usage(at(D0 + 10_000) + Duration::from_micros(1))
            .await
            .unwrap(),
        1
    );
    assert_eq!(c.prune_usage(UNIX_EPOCH).await.unwrap(), 0);
    assert_eq!(c.prune_usage(at(D0 + DAY)).await.unwrap(), 14);
    assert!(read_all(c, &everything(), 100).await.is_empty());
    // Pruned ids are forgotten: recorded again, they are stored again.
    assert_eq!(c.record_usage(&events[..3]).await.unwrap(), 3);
}

/// A database whose default collation is not bytewise (ICU `en-US`: `a`
/// before `B`): ids and endpoints still order bytewise, as in the
/// in-process catalog, because the columns are `COLLATE "C"`.
async fn postgres_with_locale_collation() -> Option<Fixture> {
    use plangate::catalog::postgres::{migrate, PostgresCatalog};
    use plangate::clock::ManualClock;
    use std::sync::Arc;
    let probe = plangate_tests::postgres_db("icuprobe").await?;
    let server = plangate_tests::postgres_url_default();
    let (admin, conn) = tokio_postgres::connect(&server, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let name = format!("{}_icu", probe.rsplit('/').next().unwrap());
    admin
        .batch_execute(&format!(
            "CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' \
             LOCALE 'C.UTF-8'"
        ))
        .await
        .expect("an ICU database (PostgreSQL 15+ with ICU)");
    let row = admin
        .query_one("SELECT 'a' < 'B' COLLATE \"en-US-x-icu\"", &[])
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
    let url = format!("{}/{name}", server.rsplit_once('/').unwrap().0);
    migrate(&url).await.expect("migrate");
    let clock = ManualClock::new(super::T0);
    let catalog = PostgresCatalog::connect(&url, Arc::new(clock.clone()))
        .await
        .expect("connect");
    Some(Fixture {
        catalog: Arc::new(catalog),
        clock,
        url: Some(url),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_pages_and_groups_bytewise_under_a_locale_collation() {
    let Some(f) = postgres_with_locale_collation().await else {
        return;
    };
    pages_cover_every_event_once(f).await;
    let Some(f) = postgres_with_locale_collation().await else {
        return;
    };
    summaries(f).await;
}

/// The gateway's hourly pass (`app::prune_usage_once`) deletes what ended
/// more than `[usage] retain` before now, by the catalog's clock.
async fn retention_pass(f: Fixture) {
    use plangate::clock::Clock;
    let c = &*f.catalog;
    let now = f.clock.now_ms();
    let events: Vec<UsageEvent> = [DAY * 3, DAY * 2 + 1, DAY * 2, DAY * 2 - 1, HOUR, 0]
        .iter()
        .enumerate()
        .map(|(i, age)| ev(&format!("r{i}"), "a", "chat", now - age))
        .collect();
    c.record_usage(&events).await.unwrap();
    let retain = Duration::from_millis(2 * DAY);
    let pruned = plangate::app::prune_usage_once(c, &f.clock, retain)
        .await
        .unwrap();
    assert_eq!(pruned, 2, "older than 2 days: 3 days and 2 days + 1 ms");
    assert_eq!(
        ids(&read_all(c, &everything(), 10).await),
        ["r2", "r3", "r4", "r5"]
    );
    // An hour later the event exactly 2 days old then is past retention.
    f.clock.advance(Duration::from_millis(HOUR));
    assert_eq!(
        plangate::app::prune_usage_once(c, &f.clock, retain)
            .await
            .unwrap(),
        2
    );
}

/// A usage event carrying its request's charge (one row per request,
/// issue 12): recording it takes the draws from the blocks, once however
/// often it is recorded; the ledger shows it as `req:<id>`, and it can be
/// refunded like any ledger entry. On Postgres no `credit_ledger` row is
/// written for it.
async fn an_event_carries_its_requests_charge(f: Fixture) {
    let c = &*f.catalog;
    c.create_account("acct", None, serde_json::Value::Null)
        .await
        .unwrap();
    let qb1 = c
        .create_quota_block("acct", 4, None, serde_json::Value::Null)
        .await
        .unwrap();
    let qb2 = c
        .create_quota_block("acct", 10, None, serde_json::Value::Null)
        .await
        .unwrap();
    let draw = |b: &str, n: u64| Draw {
        block_id: b.into(),
        credits: n,
    };
    let mut e1 = ev("req-1", "acct", "chat", D0 + 1_000);
    e1.credits = 5;
    e1.charge = Some(RequestCharge {
        requested: 5,
        draws: vec![draw(&qb1.id, 4), draw(&qb2.id, 1)],
    });
    // Owed 9, 2 taken: the shortfall is recorded.
    let mut e2 = ev("req-2", "acct", "chat", D0 + 2_000);
    e2.credits = 2;
    e2.charge = Some(RequestCharge {
        requested: 9,
        draws: vec![draw(&qb2.id, 2)],
    });
    let plain = ev("req-3", "acct", "chat", D0 + 3_000);
    let batch = [e1.clone(), e2.clone(), plain.clone()];
    assert_eq!(c.record_usage(&batch).await.unwrap(), 3);
    assert_eq!(c.balance("acct").await.unwrap(), 7);
    assert_eq!(c.record_usage(&batch).await.unwrap(), 0, "replayed");
    assert_eq!(c.balance("acct").await.unwrap(), 7, "charged once");

    let ledger = c.ledger("acct").await.unwrap();
    let rows: Vec<(&str, u64, u64, u64)> = ledger
        .iter()
        .map(|e| {
            let key = e.idempotency_key.as_str();
            (key, e.requested, e.deducted, e.shortfall)
        })
        .collect();
    assert_eq!(rows, [("req:req-1", 5, 5, 0), ("req:req-2", 9, 2, 7)]);
    assert_eq!(ledger[0].draws, e1.charge.as_ref().unwrap().draws);
    assert_eq!(ledger[1].request_id.as_deref(), Some("req-2"));
    assert_eq!(ledger[1].endpoint.as_deref(), Some("chat"));
    assert_eq!(ledger[1].created_at, Some(at(D0 + 2_000)));
    // Read back as events, without the charge (the ledger has it).
    let stored = read_all(c, &everything(), 10).await;
    assert_eq!(stored.len(), 3);
    assert!(stored.iter().all(|e| e.charge.is_none()));
    assert_eq!(stored[0].credits, 5);

    // Refunded once, to the blocks it came from.
    assert_eq!(c.refund("req:req-1").await.unwrap(), 5);
    assert_eq!(c.refund("req:req-1").await.unwrap(), 0);
    assert_eq!(c.refund("req:req-3").await.unwrap(), 0, "no charge");
    assert_eq!(c.balance("acct").await.unwrap(), 12);
    assert_eq!(c.ledger("acct").await.unwrap()[0].refunded, 5);

    // A charge whose draws do not add up to the credits taken is refused.
    let mut bad = ev("req-4", "acct", "chat", D0 + 4_000);
    bad.credits = 3;
    bad.charge = Some(RequestCharge {
        requested: 3,
        draws: vec![draw(&qb2.id, 2)],
    });
    assert!(is_invalid(c.record_usage(&[bad.clone()]).await));
    bad.charge = Some(RequestCharge {
        requested: 2,
        draws: vec![draw(&qb2.id, 3)],
    });
    assert!(is_invalid(c.record_usage(&[bad]).await));
    assert_eq!(c.balance("acct").await.unwrap(), 12);

    if let Some(url) = &f.url {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let rows: i64 = client
            .query_one("SELECT count(*) FROM credit_ledger", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(rows, 0, "one row per request: no ledger row of its own");
    }
}

macro_rules! usage_conformance {
    ($($name:ident),* $(,)?) => {
        mod memory_catalog {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::super::memory()).await
                }
            )*
        }
        mod postgres_catalog {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(f) = super::super::postgres().await else { return };
                    super::$name(f).await
                }
            )*
        }
    };
}

usage_conformance!(
    recording_is_idempotent,
    an_event_carries_its_requests_charge,
    pages_cover_every_event_once,
    filters,
    summaries,
    prune,
    retention_pass,
);
