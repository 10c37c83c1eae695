//! Threshold notifications as the catalog keeps them (`V7__notifications.sql`
//! on Postgres, [`NotificationStore`] in process): one row per notification,
//! unique by its dedupe key (so a threshold fires at most once, whichever
//! gateway saw it first), which is also the delivery queue (status,
//! attempts, next attempt, last error) and the delivery log the admin API
//! reads (`GET /admin/notifications`).
//!
//! The rules both catalogs share are here: the types, the query checks and
//! what finishing a delivery attempt does to a row.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::{humantime_serde_opt, CatalogError, CatalogResult};

/// Most notifications one page of the delivery log returns.
pub const MAX_NOTIFICATIONS_PAGE: usize = 1000;

/// The longest dedupe key, in bytes (account and endpoint ids are at most
/// 200 bytes each; the rest is short).
pub const MAX_DEDUPE_KEY_BYTES: usize = 1024;

/// Where a notification is in its delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NotificationStatus {
    /// Not delivered yet: due at `next_attempt_at`.
    Pending,
    /// The receiver answered 2xx.
    Delivered,
    /// Every attempt failed (`[notify] max_attempts`); never retried.
    Failed,
}

impl NotificationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            NotificationStatus::Pending => "pending",
            NotificationStatus::Delivered => "delivered",
            NotificationStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(NotificationStatus::Pending),
            "delivered" => Some(NotificationStatus::Delivered),
            "failed" => Some(NotificationStatus::Failed),
            _ => None,
        }
    }
}

/// A notification to queue.
#[derive(Debug, Clone, PartialEq)]
pub struct NewNotification {
    /// What makes it unique: a second notification with the same key is
    /// not queued (see `notify.rs` for the key of each kind).
    pub dedupe_key: String,
    pub account_id: String,
    /// `window`, `balance` or `expiry`.
    pub kind: &'static str,
    /// The event's data (the webhook body's `data`).
    pub data: serde_json::Value,
}

/// A notification, queued or delivered: one row of the delivery log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Notification {
    /// `nt_...`; the webhook carries it (`id`, `x-plangate-notification-id`)
    /// so that a receiver can drop a repeated delivery.
    pub id: String,
    /// Its position in the log (newest highest); the admin API's cursor.
    pub seq: u64,
    pub account_id: String,
    pub kind: String,
    pub dedupe_key: String,
    pub status: NotificationStatus,
    /// Delivery attempts made so far.
    pub attempts: u32,
    /// The error of the last failed attempt (`HTTP 500`, a connection
    /// error, a timeout), if any.
    pub last_error: Option<String>,
    #[serde(with = "humantime_serde_opt")]
    pub created_at: Option<SystemTime>,
    /// When the next attempt is due (pending only).
    #[serde(with = "humantime_serde_opt")]
    pub next_attempt_at: Option<SystemTime>,
    #[serde(with = "humantime_serde_opt")]
    pub delivered_at: Option<SystemTime>,
    pub data: serde_json::Value,
}

/// How a delivery attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempted {
    /// The receiver answered 2xx.
    Delivered,
    /// Failed; try again at `at`.
    Retry { at: SystemTime, error: String },
    /// Failed for the last time.
    Failed { error: String },
}

/// Longest `last_error` kept, in bytes.
const MAX_ERROR_BYTES: usize = 500;

/// `error`, cut to [`MAX_ERROR_BYTES`] at a character boundary.
pub(crate) fn short_error(error: &str) -> String {
    let mut end = error.len().min(MAX_ERROR_BYTES);
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    error[..end].to_string()
}

/// A page of the delivery log: newest first, optionally one account's or
/// one status's, after a cursor (the last `seq` of the previous page).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotificationQuery {
    pub account: Option<String>,
    pub status: Option<NotificationStatus>,
    /// Only notifications with a lower `seq`.
    pub before_seq: Option<u64>,
    /// 1 to [`MAX_NOTIFICATIONS_PAGE`].
    pub limit: usize,
}

impl NotificationQuery {
    pub fn check(&self) -> CatalogResult<()> {
        if self.limit == 0 || self.limit > MAX_NOTIFICATIONS_PAGE {
            return Err(CatalogError::Invalid(format!(
                "limit must be from 1 to {MAX_NOTIFICATIONS_PAGE}"
            )));
        }
        Ok(())
    }

    fn matches(&self, n: &Notification) -> bool {
        self.account.as_ref().map_or(true, |a| *a == n.account_id)
            && self.status.map_or(true, |s| s == n.status)
            && self.before_seq.map_or(true, |b| n.seq < b)
    }
}

/// Check a notification before it is queued (both catalogs).
pub(crate) fn check_new(n: &NewNotification) -> CatalogResult<()> {
    if n.dedupe_key.is_empty() || n.dedupe_key.len() > MAX_DEDUPE_KEY_BYTES {
        return Err(CatalogError::Invalid(format!(
            "a notification's dedupe key must be 1 to {MAX_DEDUPE_KEY_BYTES} bytes"
        )));
    }
    Ok(())
}

/// Apply a finished attempt to a row (the in-process catalog; the
/// Postgres one does the same in SQL).
fn finish(n: &mut Notification, result: &Attempted, now: SystemTime) {
    n.attempts = n.attempts.saturating_add(1);
    match result {
        Attempted::Delivered => {
            n.status = NotificationStatus::Delivered;
            n.delivered_at = Some(now);
            n.next_attempt_at = None;
        }
        Attempted::Retry { at, error } => {
            n.status = NotificationStatus::Pending;
            n.next_attempt_at = Some(*at);
            n.last_error = Some(short_error(error));
        }
        Attempted::Failed { error } => {
            n.status = NotificationStatus::Failed;
            n.next_attempt_at = None;
            n.last_error = Some(short_error(error));
        }
    }
}

/// The in-process catalog's notifications: every row kept in memory (lost
/// with the process, like the rest of the in-process catalog), unique by
/// dedupe key. Delivered and failed rows older than the retention are
/// dropped by [`NotificationStore::prune`].
#[derive(Debug, Default)]
pub struct NotificationStore {
    by_seq: BTreeMap<u64, Notification>,
    by_key: HashMap<String, u64>,
    by_id: HashMap<String, u64>,
    next_seq: u64,
}

impl NotificationStore {
    /// Queue `n` unless its dedupe key is known; true when queued.
    pub fn enqueue(&mut self, n: &NewNotification, now: SystemTime) -> CatalogResult<bool> {
        check_new(n)?;
        if self.by_key.contains_key(&n.dedupe_key) {
            return Ok(false);
        }
        self.next_seq += 1;
        let seq = self.next_seq;
        let id = super::generate_id("nt");
        self.by_key.insert(n.dedupe_key.clone(), seq);
        self.by_id.insert(id.clone(), seq);
        self.by_seq.insert(
            seq,
            Notification {
                id,
                seq,
                account_id: n.account_id.clone(),
                kind: n.kind.to_string(),
                dedupe_key: n.dedupe_key.clone(),
                status: NotificationStatus::Pending,
                attempts: 0,
                last_error: None,
                created_at: Some(now),
                next_attempt_at: Some(now),
                delivered_at: None,
                data: n.data.clone(),
            },
        );
        Ok(true)
    }

    /// Up to `limit` pending notifications due at `now`, oldest first,
    /// each leased until `now + lease` (not handed out again before then
    /// unless finished).
    pub fn claim(&mut self, now: SystemTime, limit: usize, lease: Duration) -> Vec<Notification> {
        let mut due: Vec<&mut Notification> = self
            .by_seq
            .values_mut()
            .filter(|n| {
                n.status == NotificationStatus::Pending
                    && n.next_attempt_at.is_some_and(|t| t <= now)
            })
            .collect();
        due.sort_by_key(|n| (n.next_attempt_at, n.seq));
        due.into_iter()
            .take(limit)
            .map(|n| {
                n.next_attempt_at = Some(now + lease);
                n.clone()
            })
            .collect()
    }

    /// Record a finished attempt. A notification no longer pending (a
    /// second gateway finished it) is left as it is.
    pub fn finish(&mut self, id: &str, result: &Attempted, now: SystemTime) -> CatalogResult<()> {
        let n = self
            .by_id
            .get(id)
            .and_then(|seq| self.by_seq.get_mut(seq))
            .ok_or_else(|| CatalogError::not_found("notification", id))?;
        if n.status == NotificationStatus::Pending {
            finish(n, result, now);
        }
        Ok(())
    }

    pub fn page(&self, q: &NotificationQuery) -> CatalogResult<Vec<Notification>> {
        q.check()?;
        Ok(self
            .by_seq
            .values()
            .rev()
            .filter(|n| q.matches(n))
            .take(q.limit)
            .cloned()
            .collect())
    }

    /// Drop delivered and failed notifications created before `before`;
    /// returns how many. Their dedupe keys go with them (by then their
    /// windows are long over).
    pub fn prune(&mut self, before: SystemTime) -> u64 {
        let gone: Vec<u64> = self
            .by_seq
            .values()
            .filter(|n| {
                n.status != NotificationStatus::Pending && n.created_at.is_some_and(|c| c < before)
            })
            .map(|n| n.seq)
            .collect();
        for seq in &gone {
            if let Some(n) = self.by_seq.remove(seq) {
                self.by_key.remove(&n.dedupe_key);
                self.by_id.remove(&n.id);
            }
        }
        gone.len() as u64
    }
}
