//! Usage events on Postgres (`migrations/V2__usage.sql`): batched inserts,
//! keyset pages, sums in SQL, retention in bounded deletes. The rules both
//! catalogs share are in `catalog/usage.rs`.
//!
//! Time parameters are passed rounded to whole ms exactly as the
//! in-process catalog rounds them ([`UsageQuery::ms_range`]), so both
//! backends draw the same lines between events.

use std::collections::BTreeMap;
use std::time::SystemTime;

use deadpool_postgres::Pool;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use super::{db_err, pool_err, RETRIES};
use crate::catalog::usage::{check_batch, epoch_ms_ceil, from_ms, MAX_EVENT_AMOUNT};
use crate::catalog::{
    BucketKey, CatalogError, CatalogResult, GroupBy, UnitUsage, UsageBucket, UsageCursor,
    UsageEvent, UsageQuery,
};

/// Rows one retention statement deletes: each delete is a short
/// transaction, so pruning a large backlog never holds locks (or a
/// snapshot) for long.
const PRUNE_CHUNK: i64 = 10_000;

const COLUMNS: &str = "request_id, account_id, key_id, endpoint, route, units, credits, status, \
                       degraded, streamed, cut_short, started_at, ended_at";

type Param = Box<dyn ToSql + Sync + Send>;

/// `{"<unit>": [measured, reserved]}`.
fn units_json(units: &[UnitUsage]) -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> = units
        .iter()
        .map(|u| (u.unit.clone(), serde_json::json!([u.measured, u.reserved])))
        .collect();
    serde_json::Value::Object(map)
}

fn units_from_json(request_id: &str, v: &serde_json::Value) -> CatalogResult<Vec<UnitUsage>> {
    let bad =
        || CatalogError::Unavailable(format!("usage event `{request_id}`: unreadable units: {v}"));
    let obj = v.as_object().ok_or_else(bad)?;
    let mut units = obj
        .iter()
        .map(|(unit, pair)| {
            let measured = pair.get(0).and_then(serde_json::Value::as_u64);
            let reserved = pair.get(1).and_then(serde_json::Value::as_u64);
            match (measured, reserved) {
                (Some(measured), Some(reserved)) => Ok(UnitUsage {
                    unit: unit.clone(),
                    measured,
                    reserved,
                }),
                _ => Err(bad()),
            }
        })
        .collect::<CatalogResult<Vec<_>>>()?;
    // JSONB orders keys by length first; events carry them by name.
    units.sort_by(|a, b| a.unit.cmp(&b.unit));
    Ok(units)
}

fn event_from_row(r: &tokio_postgres::Row) -> CatalogResult<UsageEvent> {
    let request_id: String = r.get(0);
    let units = units_from_json(&request_id, &r.get(5))?;
    Ok(UsageEvent {
        account_id: r.get(1),
        key_id: r.get(2),
        endpoint: r.get(3),
        route: r.get(4),
        units,
        credits: r.get::<_, i64>(6) as u64,
        status: r.get::<_, i16>(7) as u16,
        degraded: r.get(8),
        streamed: r.get(9),
        cut_short: r.get(10),
        started_at: r.get(11),
        ended_at: r.get(12),
        request_id,
        charge: None,
    })
}

/// The WHERE clause of `q` (empty when it filters nothing), its
/// parameters numbered from `$1`.
fn filters(q: &UsageQuery, params: &mut Vec<Param>) -> Vec<String> {
    let mut clauses = Vec::new();
    let range = q.ms_range();
    if let Some(a) = &q.account_id {
        params.push(Box::new(a.clone()));
        clauses.push(format!("account_id = ${}", params.len()));
    }
    if let Some(s) = range.since_ms {
        params.push(Box::new(from_ms(s)));
        clauses.push(format!("ended_at >= ${}", params.len()));
    }
    if let Some(u) = range.until_ms {
        params.push(Box::new(from_ms(u)));
        clauses.push(format!("ended_at < ${}", params.len()));
    }
    if let Some(e) = &q.endpoint {
        params.push(Box::new(e.clone()));
        clauses.push(format!("endpoint = ${}", params.len()));
    }
    clauses
}

fn where_sql(clauses: &[String]) -> String {
    if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    }
}

fn refs(params: &[Param]) -> Vec<&(dyn ToSql + Sync)> {
    params
        .iter()
        .map(|p| p.as_ref() as &(dyn ToSql + Sync))
        .collect()
}

/// [`crate::catalog::Catalog::record_usage`]: one `INSERT ... SELECT FROM
/// unnest(...) ON CONFLICT (request_id) DO NOTHING`.
pub(super) async fn record(pool: &Pool, events: &[UsageEvent]) -> CatalogResult<u64> {
    check_batch(events)?;
    if events.is_empty() {
        return Ok(0);
    }
    let mut events: Vec<UsageEvent> = events.iter().map(UsageEvent::normalized).collect();
    // Two batches inserting the same ids (a replay racing the first
    // write) take the index locks in one order, so they cannot deadlock.
    // The sort is stable: of two copies in one batch the first still wins.
    events.sort_by(|a, b| a.request_id.cmp(&b.request_id));
    let n = events.len();
    let mut ids = Vec::with_capacity(n);
    let mut accounts = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    let mut endpoints = Vec::with_capacity(n);
    let mut routes = Vec::with_capacity(n);
    let mut units = Vec::with_capacity(n);
    let mut credits = Vec::with_capacity(n);
    let mut statuses = Vec::with_capacity(n);
    let mut degraded = Vec::with_capacity(n);
    let mut streamed = Vec::with_capacity(n);
    let mut cut_short = Vec::with_capacity(n);
    let mut started = Vec::with_capacity(n);
    let mut ended = Vec::with_capacity(n);
    let mut requested: Vec<Option<i64>> = Vec::with_capacity(n);
    let mut draws: Vec<Option<serde_json::Value>> = Vec::with_capacity(n);
    let mut charged = false;
    for e in events {
        units.push(units_json(&e.units));
        // Checked: at most MAX_EVENT_AMOUNT and 999.
        credits.push(e.credits as i64);
        statuses.push(e.status as i16);
        degraded.push(e.degraded);
        streamed.push(e.streamed);
        cut_short.push(e.cut_short);
        started.push(e.started_at);
        ended.push(e.ended_at);
        match e.charge {
            Some(c) => {
                charged = true;
                requested.push(Some(c.requested as i64));
                draws.push(Some(super::draws_json(&c.draws)));
            }
            None => {
                requested.push(None);
                draws.push(None);
            }
        }
        ids.push(e.request_id);
        accounts.push(e.account_id);
        keys.push(e.key_id);
        endpoints.push(e.endpoint);
        routes.push(e.route);
    }
    // Events carrying a charge take their draws from the blocks, in the
    // same statement and only for the rows inserted: recording an event
    // twice charges it once.
    let sql = if charged {
        format!(
            "WITH ins AS (
                 INSERT INTO usage_events ({COLUMNS}, credits_requested, draws)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                                      $6::jsonb[], $7::int8[], $8::int2[], $9::bool[], $10::bool[],
                                      $11::bool[], $12::timestamptz[], $13::timestamptz[],
                                      $14::int8[], $15::jsonb[])
                 ON CONFLICT (request_id) DO NOTHING
                 RETURNING draws),
             takes AS (
                 SELECT j->>'block_id' AS id, sum((j->>'credits')::int8) AS take
                 FROM ins, jsonb_array_elements(ins.draws) j
                 WHERE ins.draws IS NOT NULL GROUP BY 1),
             taken AS (
                 UPDATE quota_blocks q
                 SET credits_remaining = GREATEST(q.credits_remaining - takes.take, 0)
                 FROM takes WHERE q.id = takes.id)
             SELECT count(*) FROM ins"
        )
    } else {
        format!(
            "INSERT INTO usage_events ({COLUMNS})
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                                  $6::jsonb[], $7::int8[], $8::int2[], $9::bool[], $10::bool[],
                                  $11::bool[], $12::timestamptz[], $13::timestamptz[])
             ON CONFLICT (request_id) DO NOTHING"
        )
    };
    let mut attempt = 0;
    loop {
        let conn = pool.get().await.map_err(pool_err)?;
        let stmt = conn.prepare_cached(&sql).await.map_err(db_err)?;
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![
            &ids, &accounts, &keys, &endpoints, &routes, &units, &credits, &statuses, &degraded,
            &streamed, &cut_short, &started, &ended,
        ];
        let result = if charged {
            params.push(&requested);
            params.push(&draws);
            conn.query_one(&stmt, &params)
                .await
                .map(|row| row.get::<_, i64>(0) as u64)
        } else {
            conn.execute(&stmt, &params).await
        };
        match result {
            Ok(inserted) => return Ok(inserted),
            // Ids are inserted in one order, so this is only a backstop.
            Err(e) if e.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED) && attempt < RETRIES => {
                attempt += 1
            }
            Err(e) => return Err(db_err(e)),
        }
    }
}

/// [`crate::catalog::Catalog::usage_events`]: a keyset page on
/// (`ended_at`, `request_id`), served by `usage_events_ended` or, for one
/// account, `usage_events_account`.
pub(super) async fn page(
    pool: &Pool,
    q: &UsageQuery,
    after: Option<&UsageCursor>,
    limit: usize,
) -> CatalogResult<Vec<UsageEvent>> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let mut params: Vec<Param> = Vec::new();
    let mut clauses = filters(q, &mut params);
    if let Some(c) = after {
        params.push(Box::new(from_ms(c.ended_ms)));
        params.push(Box::new(c.request_id.clone()));
        clauses.push(format!(
            "(ended_at, request_id) > (${}, ${})",
            params.len() - 1,
            params.len()
        ));
    }
    params.push(Box::new(i64::try_from(limit).unwrap_or(i64::MAX)));
    let sql = format!(
        "SELECT {COLUMNS} FROM usage_events {} ORDER BY ended_at, request_id LIMIT ${}",
        where_sql(&clauses),
        params.len()
    );
    let conn = pool.get().await.map_err(pool_err)?;
    // A handful of distinct statements (which filters are set): cached
    // per connection, so an export's pages are planned once.
    let stmt = conn.prepare_cached(&sql).await.map_err(db_err)?;
    let rows = conn.query(&stmt, &refs(&params)).await.map_err(db_err)?;
    rows.iter().map(event_from_row).collect()
}

/// [`crate::catalog::Catalog::usage_summary`], aggregated in SQL in one
/// scan: each event joined with its units (or with one empty row when it
/// has none), grouped twice — per bucket, where only the first row of each
/// event counts for requests and credits, and per bucket and unit.
pub(super) async fn summary(
    pool: &Pool,
    q: &UsageQuery,
    group_by: GroupBy,
) -> CatalogResult<Vec<UsageBucket>> {
    let key = match group_by {
        GroupBy::Hour => "date_trunc('hour', ended_at, 'UTC')",
        GroupBy::Day => "date_trunc('day', ended_at, 'UTC')",
        GroupBy::Endpoint => "endpoint",
        GroupBy::Account => "account_id",
    };
    let mut params: Vec<Param> = Vec::new();
    let clauses = filters(q, &mut params);
    let sql = format!(
        "SELECT e.k, u.unit, GROUPING(u.unit) = 1 AS whole,
                count(*) FILTER (WHERE u.ord IS NULL OR u.ord = 1),
                LEAST(COALESCE(sum(e.credits) FILTER (WHERE u.ord IS NULL OR u.ord = 1), 0),
                      {MAX_EVENT_AMOUNT})::int8,
                LEAST(COALESCE(sum((u.value ->> 0)::numeric), 0), {MAX_EVENT_AMOUNT})::int8
         FROM (SELECT {key} AS k, credits, units FROM usage_events {}) e
         LEFT JOIN LATERAL jsonb_each(e.units) WITH ORDINALITY AS u(unit, value, ord) ON true
         GROUP BY GROUPING SETS ((e.k), (e.k, u.unit))
         ORDER BY e.k, whole DESC",
        where_sql(&clauses)
    );
    let conn = pool.get().await.map_err(pool_err)?;
    let rows = conn
        .query(sql.as_str(), &refs(&params))
        .await
        .map_err(db_err)?;
    let mut out: Vec<UsageBucket> = Vec::new();
    for r in &rows {
        let k = match group_by {
            GroupBy::Hour | GroupBy::Day => BucketKey::Start(r.get::<_, SystemTime>(0)),
            GroupBy::Endpoint => BucketKey::Endpoint(r.get(0)),
            GroupBy::Account => BucketKey::Account(r.get(0)),
        };
        let whole: bool = r.get(2);
        if whole {
            out.push(UsageBucket {
                key: k,
                requests: r.get::<_, i64>(3) as u64,
                credits: r.get::<_, i64>(4) as u64,
                units: BTreeMap::new(),
            });
        } else if let Some(unit) = r.get::<_, Option<String>>(1) {
            // Rows come bucket by bucket, its total first.
            match out.last_mut() {
                Some(b) if b.key == k => {
                    b.units.insert(unit, r.get::<_, i64>(5) as u64);
                }
                _ => {
                    return Err(CatalogError::Unavailable(
                        "usage summary: unit sums out of order".into(),
                    ))
                }
            }
        }
    }
    Ok(out)
}

/// [`crate::catalog::Catalog::prune_usage`]: deletes of at most
/// [`PRUNE_CHUNK`] rows, each its own transaction, until none is left.
pub(super) async fn prune(pool: &Pool, before: SystemTime) -> CatalogResult<u64> {
    let before = from_ms(epoch_ms_ceil(before));
    let conn = pool.get().await.map_err(pool_err)?;
    let stmt = conn
        .prepare_cached(
            "DELETE FROM usage_events WHERE ctid = ANY(ARRAY(
                 SELECT ctid FROM usage_events WHERE ended_at < $1 LIMIT $2))",
        )
        .await
        .map_err(db_err)?;
    let mut total = 0;
    loop {
        let n = conn
            .execute(&stmt, &[&before, &PRUNE_CHUNK])
            .await
            .map_err(db_err)?;
        total += n;
        if n < PRUNE_CHUNK as u64 {
            return Ok(total);
        }
    }
}
