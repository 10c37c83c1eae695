//! Credit deductions on Postgres: one deduction per transaction
//! ([`deduct_tx`]), and the group commit in front of it ([`Batcher`]).
//!
//! A hot account serialises on its `quota_blocks` row locks, so one
//! transaction per deduction caps it at about one deduction per commit.
//! The batcher queues concurrent [`Catalog::deduct`](super::Catalog::deduct)
//! calls and applies everything pending (at most [`MAX_BATCH`]) in one
//! transaction: per account the live blocks are locked once, the
//! deductions are decided in arrival order in memory with exactly the
//! rules of [`deduct_tx`], and the ledger rows and block updates are written
//! in one statement. There is no timer: the first caller on an idle catalog
//! starts a batch at once, and callers arriving while it commits form the
//! next one. A batch that fails is run again one deduction at a time with
//! [`deduct_tx`], so a bad deduction fails alone.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use deadpool_postgres::Pool;
use tokio::sync::oneshot;
use tokio_postgres::error::SqlState;

use super::{balance_of, fk_not_found, pool_err, PgErr, RETRIES};
use crate::catalog::{
    check_credits, ms_to_time, CatalogError, CatalogResult, DeductResult, Deduction, Draw,
};
use crate::clock::SharedClock;

/// Most deductions one batch transaction applies.
pub const MAX_BATCH: usize = 256;

/// Batch transactions one catalog runs at once. One: a batch holds its
/// accounts' row locks through its commit (a durable WAL flush), so on a
/// hot account a second batch in flight only waits, and splits what would
/// have been one batch into two commits (measured with
/// `examples/catalog_bench`: 2,550 against 3,000 deductions/s on one hot
/// account with 32 workers).
pub const MAX_IN_FLIGHT: usize = 1;

/// What the deduction batcher has done (see [`super::PostgresCatalog::batch_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Batches run (each one transaction, retries aside).
    pub batches: u64,
    /// Deductions those batches carried.
    pub deductions: u64,
    /// The largest batch.
    pub largest: u64,
    /// Batches whose transaction failed and that were run one deduction
    /// at a time instead.
    pub fallbacks: u64,
}

type Reply = oneshot::Sender<CatalogResult<DeductResult>>;

#[derive(Default)]
struct Queue {
    pending: Vec<(Deduction, Reply)>,
    /// Batcher tasks running (each takes batches from `pending` until it
    /// is empty), at most [`MAX_IN_FLIGHT`].
    running: usize,
}

/// The group commit of deductions: a queue and at most [`MAX_IN_FLIGHT`]
/// batcher tasks (each with one batch transaction in flight).
pub(super) struct Batcher {
    pool: Pool,
    clock: SharedClock,
    queue: parking_lot::Mutex<Queue>,
    batches: AtomicU64,
    deductions: AtomicU64,
    largest: AtomicU64,
    fallbacks: AtomicU64,
}

impl Batcher {
    pub(super) fn new(pool: Pool, clock: SharedClock) -> Self {
        Self {
            pool,
            clock,
            queue: parking_lot::Mutex::new(Queue::default()),
            batches: AtomicU64::new(0),
            deductions: AtomicU64::new(0),
            largest: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
        }
    }

    pub(super) fn stats(&self) -> BatchStats {
        BatchStats {
            batches: self.batches.load(Ordering::Relaxed),
            deductions: self.deductions.load(Ordering::Relaxed),
            largest: self.largest.load(Ordering::Relaxed),
            fallbacks: self.fallbacks.load(Ordering::Relaxed),
        }
    }

    /// Queue a deduction and wait for its batch.
    pub(super) async fn submit(self: &Arc<Self>, d: Deduction) -> CatalogResult<DeductResult> {
        check_credits(d.amount)?;
        check_credits(d.min_balance)?;
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut q = self.queue.lock();
            q.pending.push((d, reply));
            let start = q.running < MAX_IN_FLIGHT;
            if start {
                q.running += 1;
            }
            start
        };
        if start {
            tokio::spawn(self.clone().run());
        }
        answer.await.unwrap_or_else(|_| {
            Err(CatalogError::Unavailable(
                "the deduction batcher stopped".into(),
            ))
        })
    }

    /// Take batches until the queue is empty.
    async fn run(self: Arc<Self>) {
        // Should this task die (panic, runtime shutdown), the next caller
        // starts another; the callers of the lost batch see their reply
        // dropped.
        struct Running<'a>(&'a Batcher, bool);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                if self.1 {
                    self.0.queue.lock().running -= 1;
                }
            }
        }
        let mut guard = Running(&self, true);
        loop {
            let batch: Vec<(Deduction, Reply)> = {
                let mut q = self.queue.lock();
                if q.pending.is_empty() {
                    q.running -= 1;
                    guard.1 = false;
                    return;
                }
                let n = q.pending.len().min(MAX_BATCH);
                q.pending.drain(..n).collect()
            };
            let (ds, replies): (Vec<Deduction>, Vec<Reply>) = batch.into_iter().unzip();
            let results = self.apply(&ds).await;
            for (result, reply) in results.into_iter().zip(replies) {
                let _ = reply.send(result);
            }
        }
    }

    /// Apply `ds` (amounts already checked) in one transaction, retried on
    /// deadlock or serialization failure; if it fails, each one alone.
    pub(super) async fn apply(&self, ds: &[Deduction]) -> Vec<CatalogResult<DeductResult>> {
        let n = ds.len() as u64;
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.deductions.fetch_add(n, Ordering::Relaxed);
        self.largest.fetch_max(n, Ordering::Relaxed);
        let err = match self.pool.get().await {
            Ok(mut conn) => {
                let mut attempt = 0;
                loop {
                    match batch_tx(&mut conn, &self.clock, ds).await {
                        Ok(results) => return results,
                        Err(e) if e.retryable() && attempt < RETRIES => attempt += 1,
                        Err(e) => break e,
                    }
                }
            }
            // Without a connection every deduction would fail the same way.
            Err(e) => {
                let e = pool_err(e);
                return ds
                    .iter()
                    .map(|_| Err(CatalogError::Unavailable(unavailable_msg(&e))))
                    .collect();
            }
        };
        tracing::debug!(error = %CatalogError::from(err), size = n, "deduction batch failed; deducting one by one");
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
        let mut out = Vec::with_capacity(ds.len());
        for d in ds {
            out.push(deduct_one(&self.pool, &self.clock, d).await);
        }
        out
    }
}

fn unavailable_msg(e: &CatalogError) -> String {
    match e {
        CatalogError::Unavailable(m) => m.clone(),
        other => other.to_string(),
    }
}

/// One deduction in its own transaction, retried on deadlock or
/// serialization failure.
pub(super) async fn deduct_one(
    pool: &Pool,
    clock: &SharedClock,
    d: &Deduction,
) -> CatalogResult<DeductResult> {
    let mut attempt = 0;
    loop {
        match deduct_tx(pool, clock, d).await {
            Err(e) if e.retryable() && attempt < RETRIES => attempt += 1,
            r => break r.map_err(CatalogError::from),
        }
    }
}

/// An account's live blocks in drain order, as locked by a batch.
#[derive(Default)]
struct Blocks {
    /// (id, remaining, taken by this batch)
    blocks: Vec<(String, i64, i64)>,
    available: i64,
}

/// What the ledger holds (or this batch will write) for a key.
struct Recorded {
    account: String,
    requested: i64,
    deducted: i64,
}

/// A result waiting for its balance (a replay of an account the batch did
/// not lock).
struct Pending {
    index: usize,
    account: String,
}

/// The batch transaction, in two round trips: BEGIN with the reads (the
/// batch's accounts, their live blocks locked FOR UPDATE, the ledger rows
/// of its keys), pipelined and run by the server in that order, so the
/// ledger is read once the locks are held; then the write (ledger rows and
/// blocks in one statement) with COMMIT. Any failure rolls back.
async fn batch_tx(
    conn: &mut deadpool_postgres::Object,
    clock: &SharedClock,
    ds: &[Deduction],
) -> Result<Vec<CatalogResult<DeductResult>>, PgErr> {
    let r = batch_in_tx(conn, clock, ds).await;
    if r.is_err() {
        // Whatever state the session is in: outside a transaction this is
        // only a warning. The connection goes back to the pool clean.
        let _ = conn.batch_execute("ROLLBACK").await;
    }
    r
}

async fn batch_in_tx(
    conn: &mut deadpool_postgres::Object,
    clock: &SharedClock,
    ds: &[Deduction],
) -> Result<Vec<CatalogResult<DeductResult>>, PgErr> {
    let now = ms_to_time(clock.now_ms());
    let mut accounts: Vec<&str> = ds.iter().map(|d| d.account_id.as_str()).collect();
    accounts.sort_unstable();
    accounts.dedup();
    let keys: Vec<&str> = ds.iter().map(|d| d.idempotency_key.as_str()).collect();

    let known = conn
        // KEY SHARE holds each account against its deletion until the
        // batch commits (the ledger has no foreign key to do it, V4).
        .prepare_cached("SELECT id FROM accounts WHERE id = ANY($1) ORDER BY id FOR KEY SHARE")
        .await?;
    // Accounts in id order, each one's blocks in drain order: every
    // batch (and deduct_tx, and refund_tx, which lock one account's
    // blocks in drain order) takes the locks in one global order.
    let lock = conn
        .prepare_cached(
            "SELECT account_id, id, credits_remaining FROM quota_blocks
             WHERE account_id = ANY($1) AND credits_remaining > 0
               AND (expires_at IS NULL OR expires_at > $2)
             ORDER BY account_id, expires_at ASC NULLS LAST, seq
             FOR UPDATE",
        )
        .await?;
    let used = conn
        .prepare_cached(
            "SELECT idempotency_key, account_id, requested, deducted FROM credit_ledger
             WHERE idempotency_key = ANY($1)",
        )
        .await?;
    let write = conn
        .prepare_cached(
            "WITH ins AS (
                 INSERT INTO credit_ledger (idempotency_key, account_id, request_id, endpoint,
                                            requested, deducted, draws, created_at)
                 SELECT k, a, r, e, q, d, w, $8
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],
                             $5::int8[], $6::int8[], $7::jsonb[]) AS x(k, a, r, e, q, d, w)
                 ON CONFLICT (idempotency_key) DO NOTHING
                 RETURNING 1),
             drained AS (
                 UPDATE quota_blocks q SET credits_remaining = q.credits_remaining - x.take
                 FROM unnest($9::text[], $10::int8[]) AS x(id, take)
                 WHERE q.id = x.id
                 RETURNING 1)
             -- Every row written, or an error (division by zero), so that
             -- the COMMIT sent behind this statement rolls back instead.
             SELECT 1 / (CASE WHEN (SELECT count(*) FROM ins) = $11
                               AND (SELECT count(*) FROM drained) = $12
                              THEN 1 ELSE 0 END)",
        )
        .await?;
    let known_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&accounts];
    let lock_params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&accounts, &now];
    let used_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&keys];
    // Sent together (tokio-postgres pipelines concurrent requests), run by
    // the server in this order.
    let client: &tokio_postgres::Client = conn;
    let ((), known, locked, used) = tokio::try_join!(
        client.batch_execute("BEGIN"),
        client.query(&known, &known_params),
        client.query(&lock, &lock_params),
        client.query(&used, &used_params),
    )?;

    let known: HashSet<String> = known.iter().map(|r| r.get(0)).collect();
    let mut books: HashMap<String, Blocks> = known
        .iter()
        .map(|a| (a.clone(), Blocks::default()))
        .collect();
    for r in &locked {
        let account: String = r.get(0);
        let remaining: i64 = r.get(2);
        let b = books.entry(account).or_default();
        b.blocks.push((r.get(1), remaining, 0));
        b.available += remaining;
    }
    let mut recorded: HashMap<String, Recorded> = used
        .iter()
        .map(|r| {
            (
                r.get(0),
                Recorded {
                    account: r.get(1),
                    requested: r.get(2),
                    deducted: r.get(3),
                },
            )
        })
        .collect();

    // Decide each deduction in arrival order.
    let mut out: Vec<CatalogResult<DeductResult>> = Vec::with_capacity(ds.len());
    let mut need_balance: Vec<Pending> = Vec::new();
    let mut rows = LedgerRows::default();
    for d in ds {
        // A used key replays the first result (even for another account,
        // as deduct_tx does: the ledger insert conflicts before its
        // foreign key is checked).
        if let Some(rec) = recorded.get(&d.idempotency_key) {
            let balance = match books.get(&rec.account) {
                Some(b) => b.available as u64,
                None => {
                    need_balance.push(Pending {
                        index: out.len(),
                        account: rec.account.clone(),
                    });
                    0
                }
            };
            out.push(Ok(DeductResult {
                requested: rec.requested as u64,
                deducted: rec.deducted as u64,
                shortfall: (rec.requested - rec.deducted) as u64,
                balance,
                replayed: true,
            }));
            continue;
        }
        let Some(book) = books.get_mut(&d.account_id) else {
            out.push(Err(CatalogError::not_found("account", &d.account_id)));
            continue;
        };
        // Checked before queueing: at most MAX_AMOUNT.
        let amount = d.amount as i64;
        let min_balance = d.min_balance as i64;
        if book.available < min_balance || (d.require_full && book.available < amount) {
            // Refused: no ledger row, the key stays unused.
            out.push(Ok(DeductResult {
                requested: d.amount,
                deducted: 0,
                shortfall: d.amount,
                balance: book.available as u64,
                replayed: false,
            }));
            continue;
        }
        let mut left = amount;
        let mut draws = Vec::new();
        for (id, remaining, taken) in book.blocks.iter_mut() {
            if left == 0 {
                break;
            }
            let take = left.min(*remaining);
            if take == 0 {
                continue;
            }
            *remaining -= take;
            *taken += take;
            left -= take;
            draws.push(Draw {
                block_id: id.clone(),
                credits: take as u64,
            });
        }
        let deducted = amount - left;
        book.available -= deducted;
        let draws = serde_json::to_value(&draws)
            .map_err(|e| CatalogError::Unavailable(format!("encoding draws: {e}")))?;
        rows.push(d, deducted, draws);
        recorded.insert(
            d.idempotency_key.clone(),
            Recorded {
                account: d.account_id.clone(),
                requested: amount,
                deducted,
            },
        );
        out.push(Ok(DeductResult {
            requested: d.amount,
            deducted: deducted as u64,
            shortfall: left as u64,
            balance: book.available as u64,
            replayed: false,
        }));
    }

    for p in need_balance {
        let balance = balance_of(&*conn, &p.account, now).await?.unwrap_or(0);
        if let Ok(r) = &mut out[p.index] {
            r.balance = balance;
        }
    }
    if rows.keys.is_empty() {
        client.batch_execute("COMMIT").await?;
        return Ok(out);
    }
    let (ids, takes): (Vec<&str>, Vec<i64>) = books
        .values()
        .flat_map(|b| b.blocks.iter())
        .filter(|(_, _, taken)| *taken > 0)
        .map(|(id, _, taken)| (id.as_str(), *taken))
        .unzip();
    let (n_rows, n_blocks) = (rows.keys.len() as i64, ids.len() as i64);
    let write_params: [&(dyn tokio_postgres::types::ToSql + Sync); 12] = [
        &rows.keys,
        &rows.accounts,
        &rows.request_ids,
        &rows.endpoints,
        &rows.requested,
        &rows.deducted,
        &rows.draws,
        &now,
        &ids,
        &takes,
        &n_rows,
        &n_blocks,
    ];
    let written = tokio::try_join!(
        client.query_one(&write, &write_params),
        client.batch_execute("COMMIT"),
    );
    match written {
        Ok(_) => Ok(out),
        Err(e) if e.code() == Some(&SqlState::DIVISION_BY_ZERO) => {
            // A key was written meanwhile by a transaction that did not
            // wait for these blocks (deduct_tx inserts its ledger row
            // first): the decisions above are void and were rolled back.
            // One by one, such a key replays.
            Err(PgErr::Catalog(CatalogError::Conflict(
                "an idempotency key of the batch was used concurrently".into(),
            )))
        }
        Err(e) => Err(e.into()),
    }
}

/// The ledger rows a batch writes, as columns.
#[derive(Default)]
struct LedgerRows<'a> {
    keys: Vec<&'a str>,
    accounts: Vec<&'a str>,
    request_ids: Vec<Option<&'a str>>,
    endpoints: Vec<Option<&'a str>>,
    requested: Vec<i64>,
    deducted: Vec<i64>,
    draws: Vec<serde_json::Value>,
}

impl<'a> LedgerRows<'a> {
    fn push(&mut self, d: &'a Deduction, deducted: i64, draws: serde_json::Value) {
        self.keys.push(&d.idempotency_key);
        self.accounts.push(&d.account_id);
        self.request_ids.push(d.request_id.as_deref());
        self.endpoints.push(d.endpoint.as_deref());
        self.requested.push(d.amount as i64);
        self.deducted.push(deducted);
        self.draws.push(draws);
    }
}

/// One deduction, one transaction (the batch's fallback).
pub(super) async fn deduct_tx(
    pool: &Pool,
    clock: &SharedClock,
    d: &Deduction,
) -> Result<DeductResult, PgErr> {
    let now = ms_to_time(clock.now_ms());
    let amount = check_credits(d.amount)?;
    let min_balance = check_credits(d.min_balance)?;
    let mut conn = pool.get().await.map_err(pool_err)?;
    let tx = conn.transaction().await?;
    let insert = tx
        .prepare_cached(
            "INSERT INTO credit_ledger
                 (idempotency_key, account_id, request_id, endpoint, requested, deducted, created_at)
             VALUES ($1, $2, $3, $4, $5, 0, $6)
             ON CONFLICT (idempotency_key) DO NOTHING
             RETURNING seq",
        )
        .await?;
    // A concurrent insert of the same key waits here for the other
    // transaction: if it commits, this one sees the conflict and replays.
    let inserted = tx
        .query(
            &insert,
            &[
                &d.idempotency_key,
                &d.account_id,
                &d.request_id,
                &d.endpoint,
                &amount,
                &now,
            ],
        )
        .await
        .map_err(|e| fk_not_found(e, "account", &d.account_id))?;
    let Some(seq) = inserted.first().map(|r| r.get::<_, i64>(0)) else {
        tx.rollback().await?;
        return replay(&conn, &d.idempotency_key, now).await;
    };
    // The ledger has no foreign key on the account (a deleted account's
    // rows stay, V4): the account must exist, held against its deletion
    // as the key held it (KEY SHARE), and the key is checked first.
    let account = tx
        .prepare_cached("SELECT 1 FROM accounts WHERE id = $1 FOR KEY SHARE")
        .await?;
    if tx.query_opt(&account, &[&d.account_id]).await?.is_none() {
        tx.rollback().await?;
        return Err(CatalogError::not_found("account", &d.account_id).into());
    }
    let select = tx
        .prepare_cached(
            "SELECT id, credits_remaining FROM quota_blocks
             WHERE account_id = $1 AND credits_remaining > 0
               AND (expires_at IS NULL OR expires_at > $2)
             ORDER BY expires_at ASC NULLS LAST, seq
             FOR UPDATE",
        )
        .await?;
    let blocks = tx.query(&select, &[&d.account_id, &now]).await?;
    let blocks: Vec<(String, i64)> = blocks.iter().map(|r| (r.get(0), r.get(1))).collect();
    let available: i64 = blocks.iter().map(|(_, c)| *c).sum();
    if available < min_balance || (d.require_full && available < amount) {
        // Refused: the rollback also frees the idempotency key.
        tx.rollback().await?;
        return Ok(DeductResult {
            requested: d.amount,
            deducted: 0,
            shortfall: d.amount,
            balance: available as u64,
            replayed: false,
        });
    }
    let mut left = amount;
    let mut ids = Vec::new();
    let mut takes = Vec::new();
    let mut draws = Vec::new();
    for (id, remaining) in blocks {
        if left == 0 {
            break;
        }
        let take = left.min(remaining);
        left -= take;
        ids.push(id.clone());
        takes.push(take);
        draws.push(Draw {
            block_id: id,
            credits: take as u64,
        });
    }
    let deducted = amount - left;
    let draws_json = serde_json::to_value(&draws)
        .map_err(|e| CatalogError::Unavailable(format!("encoding draws: {e}")))?;
    // One statement for both writes: the row locks are held for as few
    // round trips as possible. A data-modifying CTE always runs.
    let record = tx
        .prepare_cached(
            "WITH drained AS (
                 UPDATE quota_blocks q SET credits_remaining = q.credits_remaining - x.take
                 FROM unnest($1::text[], $2::int8[]) AS x(id, take)
                 WHERE q.id = x.id
                 RETURNING 1)
             UPDATE credit_ledger SET deducted = $4, draws = $5 WHERE seq = $3",
        )
        .await?;
    tx.execute(&record, &[&ids, &takes, &seq, &deducted, &draws_json])
        .await?;
    tx.commit().await?;
    Ok(DeductResult {
        requested: d.amount,
        deducted: deducted as u64,
        shortfall: left as u64,
        balance: (available - deducted) as u64,
        replayed: false,
    })
}

async fn replay(
    conn: &deadpool_postgres::Object,
    key: &str,
    now: SystemTime,
) -> Result<DeductResult, PgErr> {
    let row = conn
        .query_one(
            "SELECT account_id, requested, deducted FROM credit_ledger WHERE idempotency_key = $1",
            &[&key],
        )
        .await?;
    let account: String = row.get(0);
    let requested: i64 = row.get(1);
    let deducted: i64 = row.get(2);
    let balance = balance_of(conn, &account, now).await?.unwrap_or(0);
    Ok(DeductResult {
        requested: requested as u64,
        deducted: deducted as u64,
        shortfall: (requested - deducted) as u64,
        balance,
        replayed: true,
    })
}
