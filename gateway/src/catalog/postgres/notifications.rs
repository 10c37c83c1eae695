//! Threshold notifications on Postgres (`migrations/V7__notifications.sql`):
//! queued once by dedupe key (`ON CONFLICT DO NOTHING`), claimed by many
//! gateways at once without overlap (`FOR UPDATE SKIP LOCKED`, leased by
//! moving `next_attempt_at`), finished in one statement. The rules both
//! catalogs share are in `catalog/notifications.rs`.

use std::time::{Duration, SystemTime};

use deadpool_postgres::Pool;

use super::{block_from_row, db_err, pool_err, BLOCK_COLUMNS};
use crate::catalog::notifications::{check_new, short_error};
use crate::catalog::{
    generate_id, Attempted, CatalogError, CatalogResult, NewNotification, Notification,
    NotificationQuery, NotificationStatus, QuotaBlock,
};

const COLUMNS: &str = "seq, id, dedupe_key, account_id, kind, data, status, attempts, \
                       last_error, created_at, next_attempt_at, delivered_at";

fn from_row(row: &tokio_postgres::Row) -> CatalogResult<Notification> {
    let status: String = row.get("status");
    let status = NotificationStatus::parse(&status).ok_or_else(|| {
        CatalogError::Unavailable(format!("notification with unknown status `{status}`"))
    })?;
    Ok(Notification {
        id: row.get("id"),
        seq: row.get::<_, i64>("seq") as u64,
        account_id: row.get("account_id"),
        kind: row.get("kind"),
        dedupe_key: row.get("dedupe_key"),
        status,
        attempts: row.get::<_, i32>("attempts").max(0) as u32,
        last_error: row.get("last_error"),
        created_at: Some(row.get("created_at")),
        next_attempt_at: row.get("next_attempt_at"),
        delivered_at: row.get("delivered_at"),
        data: row.get("data"),
    })
}

pub(super) async fn enqueue(
    pool: &Pool,
    n: &NewNotification,
    now: SystemTime,
) -> CatalogResult<bool> {
    check_new(n)?;
    let conn = pool.get().await.map_err(pool_err)?;
    let inserted = conn
        .execute(
            "INSERT INTO notifications (id, dedupe_key, account_id, kind, data, created_at, next_attempt_at)
             VALUES ($1, $2, $3, $4, $5, $6, $6)
             ON CONFLICT (dedupe_key) DO NOTHING",
            &[
                &generate_id("nt"),
                &n.dedupe_key,
                &n.account_id,
                &n.kind,
                &n.data,
                &now,
            ],
        )
        .await
        .map_err(db_err)?;
    Ok(inserted == 1)
}

pub(super) async fn claim(
    pool: &Pool,
    now: SystemTime,
    limit: usize,
    lease: Duration,
) -> CatalogResult<Vec<Notification>> {
    let conn = pool.get().await.map_err(pool_err)?;
    let until = now + lease;
    let rows = conn
        .query(
            &format!(
                "UPDATE notifications SET next_attempt_at = $3
                 WHERE seq IN (
                     SELECT seq FROM notifications
                     WHERE status = 'pending' AND next_attempt_at <= $1
                     ORDER BY next_attempt_at, seq
                     LIMIT $2
                     FOR UPDATE SKIP LOCKED)
                 RETURNING {COLUMNS}"
            ),
            &[&now, &(limit as i64), &until],
        )
        .await
        .map_err(db_err)?;
    let mut out = rows
        .iter()
        .map(from_row)
        .collect::<CatalogResult<Vec<_>>>()?;
    out.sort_by_key(|n| (n.next_attempt_at, n.seq));
    Ok(out)
}

pub(super) async fn finish(
    pool: &Pool,
    id: &str,
    result: &Attempted,
    now: SystemTime,
) -> CatalogResult<()> {
    let (status, next, delivered, error): (
        &str,
        Option<SystemTime>,
        Option<SystemTime>,
        Option<String>,
    ) = match result {
        Attempted::Delivered => ("delivered", None, Some(now), None),
        Attempted::Retry { at, error } => ("pending", Some(*at), None, Some(short_error(error))),
        Attempted::Failed { error } => ("failed", None, None, Some(short_error(error))),
    };
    let conn = pool.get().await.map_err(pool_err)?;
    let rows = conn
        .query(
            "WITH target AS (SELECT seq, status FROM notifications WHERE id = $1)
             , done AS (
                 UPDATE notifications n
                 SET attempts = n.attempts + 1, status = $2, next_attempt_at = $3,
                     delivered_at = COALESCE($4, n.delivered_at),
                     last_error = COALESCE($5, n.last_error)
                 FROM target
                 WHERE n.seq = target.seq AND target.status = 'pending'
                 RETURNING n.seq)
             SELECT (SELECT count(*) FROM target) AS found",
            &[&id, &status, &next, &delivered, &error],
        )
        .await
        .map_err(db_err)?;
    let found: i64 = rows.first().map_or(0, |r| r.get("found"));
    if found == 0 {
        return Err(CatalogError::not_found("notification", id));
    }
    Ok(())
}

pub(super) async fn page(pool: &Pool, q: &NotificationQuery) -> CatalogResult<Vec<Notification>> {
    q.check()?;
    let conn = pool.get().await.map_err(pool_err)?;
    let status = q.status.map(NotificationStatus::as_str);
    let before = q.before_seq.map(|s| s.min(i64::MAX as u64) as i64);
    let rows = conn
        .query(
            &format!(
                "SELECT {COLUMNS} FROM notifications
                 WHERE ($1::text IS NULL OR account_id = $1)
                   AND ($2::text IS NULL OR status = $2)
                   AND ($3::bigint IS NULL OR seq < $3)
                 ORDER BY seq DESC
                 LIMIT $4"
            ),
            &[&q.account, &status, &before, &(q.limit as i64)],
        )
        .await
        .map_err(db_err)?;
    rows.iter().map(from_row).collect()
}

pub(super) async fn expiring_blocks(
    pool: &Pool,
    now: SystemTime,
    until: SystemTime,
    after: Option<&str>,
    limit: usize,
) -> CatalogResult<Vec<QuotaBlock>> {
    let conn = pool.get().await.map_err(pool_err)?;
    // `COLLATE "C"`: bytewise id order, as the in-process catalog sorts.
    let rows = conn
        .query(
            &format!(
                "SELECT {BLOCK_COLUMNS} FROM quota_blocks
                 WHERE credits_remaining > 0 AND expires_at IS NOT NULL
                   AND expires_at > $1 AND expires_at <= $2
                   AND ($3::text IS NULL OR id COLLATE \"C\" > $3)
                 ORDER BY id COLLATE \"C\"
                 LIMIT $4"
            ),
            &[&now, &until, &after, &(limit as i64)],
        )
        .await
        .map_err(db_err)?;
    Ok(rows.iter().map(block_from_row).collect())
}

pub(super) async fn prune(pool: &Pool, before: SystemTime) -> CatalogResult<u64> {
    let conn = pool.get().await.map_err(pool_err)?;
    let n = conn
        .execute(
            "DELETE FROM notifications WHERE status <> 'pending' AND created_at < $1",
            &[&before],
        )
        .await
        .map_err(db_err)?;
    Ok(n)
}
