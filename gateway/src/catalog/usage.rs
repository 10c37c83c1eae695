//! Usage events: one record per ended request (issue 12 item 4), the
//! queries that read them back (keyset pages, hour/day/endpoint sums) and
//! retention. The types and the rules both catalogs share live here; the
//! storage is `catalog/memory.rs` (bounded) and `catalog/postgres/usage.rs`.
//!
//! Rules both backends follow, so that the conformance suite holds them to
//! one behaviour:
//!
//! - Events are stored as [`UsageEvent::normalized`]: times truncated to
//!   whole milliseconds (what the JSON form carries, so an event survives a
//!   JSON round trip unchanged) and units sorted by name.
//! - `request_id` is unique: recording an id again is a no-op (the first
//!   record wins), also within one batch.
//! - A batch is checked ([`UsageEvent::check`]) before anything is written:
//!   one invalid event refuses the whole batch with `Invalid`.
//! - Order is (`ended_at`, `request_id`), ids compared bytewise.
//! - `since` is inclusive and `until` exclusive, both on `ended_at`.
//! - Hour and day buckets are aligned to the Unix epoch in UTC, like the
//!   limiter's windows.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{CatalogError, CatalogResult, Draw, MAX_ID_BYTES};

/// Longest route (path pattern or name) an event may carry, in bytes.
pub const MAX_ROUTE_BYTES: usize = 1024;
/// Longest unit name an event may carry, in bytes (as in plans).
pub const MAX_UNIT_BYTES: usize = crate::plans::parse::MAX_UNIT_BYTES;
/// Largest amount (credits, measured or reserved units) an event may carry:
/// what Postgres `bigint` holds.
pub const MAX_EVENT_AMOUNT: u64 = i64::MAX as u64;
/// The latest time an event may carry, 9999-12-31T23:59:59.999Z (RFC 3339
/// has four-digit years), in ms since the epoch.
pub const MAX_TIME_MS: u64 = 253_402_300_799_999;

const HOUR_MS: u64 = 3_600_000;
const DAY_MS: u64 = 86_400_000;

/// Units of one kind a request used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitUsage {
    /// The unit name (`token`, `image`, ...).
    pub unit: String,
    /// What was measured (or settled) at the end.
    pub measured: u64,
    /// What was reserved at admission (0 if nothing).
    pub reserved: u64,
}

/// One ended request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageEvent {
    /// The gateway's own id; unique: recording it twice is a no-op.
    pub request_id: String,
    /// The account that made the request (need not exist any more).
    pub account_id: String,
    /// The API key used, if any.
    pub key_id: Option<String>,
    /// The endpoint id (from the plan).
    pub endpoint: String,
    /// The route (its path pattern or name).
    pub route: String,
    /// Units measured and reserved, one entry per unit.
    pub units: Vec<UnitUsage>,
    /// Credits charged (admission + per-unit, what was deducted).
    pub credits: u64,
    /// HTTP status the client got.
    pub status: u16,
    /// Admitted without the counter store (`on_store_error = "open"`).
    pub degraded: bool,
    /// The response was a stream.
    pub streamed: bool,
    /// The stream or body ended early (client or upstream cut).
    pub cut_short: bool,
    /// When the request arrived.
    #[serde(with = "rfc3339_ms")]
    pub started_at: SystemTime,
    /// When it ended.
    #[serde(with = "rfc3339_ms")]
    pub ended_at: SystemTime,
    /// The request's credit charge, decided by a wallet and recorded with
    /// the event: the event's row is then also the request's ledger entry
    /// `req:<request_id>` ([`crate::limiter::wallet::request_key`]) (one row per request, docs/CATALOG.md). Set only
    /// on the way from a wallet to the catalog; events read back carry
    /// `None` (the ledger shows the charge).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charge: Option<RequestCharge>,
}

/// The credits a request was charged (its admission and per-unit charges
/// together), as a wallet decided them; `credits` of its event is what was
/// taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestCharge {
    /// Credits asked for; more than was taken when the balance fell short.
    pub requested: u64,
    /// The blocks the credits were taken from, in drain order.
    pub draws: Vec<Draw>,
}

/// Milliseconds since the epoch; `None` before it.
pub(crate) fn epoch_ms(t: SystemTime) -> Option<u64> {
    t.duration_since(UNIX_EPOCH)
        .ok()
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Milliseconds since the epoch, rounded up (before the epoch: 0).
pub(crate) fn epoch_ms_ceil(t: SystemTime) -> u64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => {
            let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
            if d.subsec_nanos() % 1_000_000 == 0 {
                ms
            } else {
                ms.saturating_add(1)
            }
        }
        Err(_) => 0,
    }
}

/// The instant `ms` milliseconds after the epoch.
pub(crate) fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

fn check_text(what: &str, s: &str, min: usize, max: usize) -> Result<(), String> {
    if s.len() < min {
        return Err(format!("{what} must not be empty"));
    }
    if s.len() > max {
        return Err(format!("{what} is longer than {max} bytes"));
    }
    if s.contains('\0') {
        return Err(format!("{what} must not contain NUL"));
    }
    Ok(())
}

fn check_time(what: &str, t: SystemTime) -> Result<(), String> {
    match epoch_ms(t) {
        None => Err(format!("{what} is before 1970")),
        Some(ms) if ms > MAX_TIME_MS => Err(format!("{what} is after the year 9999")),
        Some(_) => Ok(()),
    }
}

impl UsageEvent {
    /// Whether both catalogs can store the event: ids of 1 to 200 bytes
    /// (`key_id` too, when given), an endpoint of at most 200 bytes and a
    /// route of at most 1024, no NUL anywhere (Postgres text cannot hold
    /// it), unit names of 1 to 64 bytes each named once, amounts that fit a
    /// `bigint`, a status from 100 to 999, times from 1970 to 9999.
    ///
    /// A batch with an invalid event is refused whole, and would be again:
    /// a producer should check events before it makes them durable.
    pub fn check(&self) -> Result<(), String> {
        let id = &self.request_id;
        let err = |m: String| format!("usage event `{}`: {m}", id.escape_debug());
        check_text("request_id", id, 1, MAX_ID_BYTES).map_err(err)?;
        check_text("account_id", &self.account_id, 1, MAX_ID_BYTES).map_err(err)?;
        if let Some(k) = &self.key_id {
            check_text("key_id", k, 1, MAX_ID_BYTES).map_err(err)?;
        }
        check_text("endpoint", &self.endpoint, 0, MAX_ID_BYTES).map_err(err)?;
        check_text("route", &self.route, 0, MAX_ROUTE_BYTES).map_err(err)?;
        for (i, u) in self.units.iter().enumerate() {
            check_text("unit name", &u.unit, 1, MAX_UNIT_BYTES).map_err(err)?;
            if self.units[..i].iter().any(|v| v.unit == u.unit) {
                return Err(err(format!("unit `{}` appears twice", u.unit)));
            }
            if u.measured > MAX_EVENT_AMOUNT || u.reserved > MAX_EVENT_AMOUNT {
                return Err(err(format!(
                    "unit `{}`: amounts must be at most {MAX_EVENT_AMOUNT}",
                    u.unit
                )));
            }
        }
        if self.credits > MAX_EVENT_AMOUNT {
            return Err(err(format!("credits must be at most {MAX_EVENT_AMOUNT}")));
        }
        if let Some(c) = &self.charge {
            let drawn = c
                .draws
                .iter()
                .try_fold(0u64, |sum, d| sum.checked_add(d.credits));
            if drawn != Some(self.credits) || c.requested < self.credits {
                return Err(err(format!(
                    "charge: its draws must add up to the {} credits taken, of at most {} requested",
                    self.credits, c.requested
                )));
            }
            if c.requested > MAX_EVENT_AMOUNT {
                return Err(err(format!(
                    "charge: requested must be at most {MAX_EVENT_AMOUNT}"
                )));
            }
            for d in &c.draws {
                check_text("charge block id", &d.block_id, 1, MAX_ID_BYTES).map_err(err)?;
            }
        }
        if !(100..=999).contains(&self.status) {
            return Err(err(format!(
                "status {} is not an HTTP status (100 to 999)",
                self.status
            )));
        }
        check_time("started_at", self.started_at).map_err(err)?;
        check_time("ended_at", self.ended_at).map_err(err)?;
        Ok(())
    }

    /// The event as both catalogs store it: times truncated to whole
    /// milliseconds, units sorted by name.
    pub fn normalized(&self) -> UsageEvent {
        let mut e = self.clone();
        e.started_at = from_ms(epoch_ms(e.started_at).unwrap_or(0));
        e.ended_at = from_ms(epoch_ms(e.ended_at).unwrap_or(0));
        e.units.sort_by(|a, b| a.unit.cmp(&b.unit));
        e
    }

    /// `ended_at` in ms since the epoch (valid events only).
    pub(crate) fn ended_ms(&self) -> u64 {
        epoch_ms(self.ended_at).unwrap_or(0)
    }
}

/// Check a batch: every event, or `Invalid` naming the first bad one.
pub(crate) fn check_batch(events: &[UsageEvent]) -> CatalogResult<()> {
    for e in events {
        e.check().map_err(CatalogError::Invalid)?;
    }
    Ok(())
}

/// Which events a query reads. Every filter is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageQuery {
    /// Only this account's events.
    pub account_id: Option<String>,
    /// Only events that ended at or after this time.
    pub since: Option<SystemTime>,
    /// Only events that ended before this time.
    pub until: Option<SystemTime>,
    /// Only this endpoint's events.
    pub endpoint: Option<String>,
}

/// A [`UsageQuery`]'s time bounds in whole ms, as both backends apply them
/// to ms-precision events: `since_ms <= ended < until_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MsRange {
    pub since_ms: Option<u64>,
    pub until_ms: Option<u64>,
}

impl UsageQuery {
    /// The time bounds in ms. An event at whole ms `e` is at or after
    /// `since` exactly when `e >= ceil(since)`, and before `until` exactly
    /// when `e < ceil(until)`, so rounding both up keeps the filter exact
    /// for times of any precision.
    pub(crate) fn ms_range(&self) -> MsRange {
        MsRange {
            since_ms: self.since.map(epoch_ms_ceil),
            until_ms: self.until.map(epoch_ms_ceil),
        }
    }

    /// Whether `e` (normalized) passes every filter.
    pub(crate) fn matches(&self, e: &UsageEvent) -> bool {
        let range = self.ms_range();
        let ended = e.ended_ms();
        self.account_id
            .as_ref()
            .map_or(true, |a| *a == e.account_id)
            && self.endpoint.as_ref().map_or(true, |p| *p == e.endpoint)
            && range.since_ms.map_or(true, |s| ended >= s)
            && range.until_ms.map_or(true, |u| ended < u)
    }
}

/// Where a page of [`crate::catalog::Catalog::usage_events`] ends: the next
/// page starts after this (`ended_at`, `request_id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageCursor {
    /// `ended_at` of the last event read, in ms since the epoch.
    pub ended_ms: u64,
    /// `request_id` of the last event read.
    pub request_id: String,
}

impl UsageCursor {
    /// The cursor just after `e`.
    pub fn after(e: &UsageEvent) -> Self {
        Self {
            ended_ms: e.ended_ms(),
            request_id: e.request_id.clone(),
        }
    }

    /// The opaque form handed to HTTP clients: lowercase hex of
    /// `<ended ms>:<request id>` (URL-safe without escaping).
    pub fn encode(&self) -> String {
        let plain = format!("{}:{}", self.ended_ms, self.request_id);
        let mut out = String::with_capacity(plain.len() * 2);
        for b in plain.bytes() {
            out.push_str(&format!("{b:02x}"));
        }
        out
    }

    /// Read back what [`UsageCursor::encode`] produced.
    pub fn decode(s: &str) -> Result<Self, String> {
        let bad = || format!("`{}` is not a cursor this API returned", s.escape_debug());
        if s.is_empty() || s.len() % 2 != 0 || s.len() > 2 * (20 + 1 + MAX_ID_BYTES) {
            return Err(bad());
        }
        let bytes = (0..s.len())
            .step_by(2)
            .map(|i| {
                s.get(i..i + 2)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(bad)
            })
            .collect::<Result<Vec<u8>, String>>()?;
        let plain = String::from_utf8(bytes).map_err(|_| bad())?;
        let (ms, id) = plain.split_once(':').ok_or_else(bad)?;
        let ended_ms: u64 = ms.parse().map_err(|_| bad())?;
        if ms.starts_with('+') || check_text("request_id", id, 1, MAX_ID_BYTES).is_err() {
            return Err(bad());
        }
        Ok(Self {
            ended_ms,
            request_id: id.to_string(),
        })
    }
}

/// How [`crate::catalog::Catalog::usage_summary`] groups events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    /// By the UTC hour in which an event ended.
    Hour,
    /// By the UTC day in which an event ended.
    Day,
    /// By endpoint.
    Endpoint,
    /// By account (the console's top accounts). Not read from query
    /// strings: the admin API and `/v1/usage` group by the other three.
    Account,
}

impl GroupBy {
    /// `hour`, `day` or `endpoint`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "hour" => Some(GroupBy::Hour),
            "day" => Some(GroupBy::Day),
            "endpoint" => Some(GroupBy::Endpoint),
            _ => None,
        }
    }

    /// The name [`GroupBy::parse`] reads.
    pub fn as_str(self) -> &'static str {
        match self {
            GroupBy::Hour => "hour",
            GroupBy::Day => "day",
            GroupBy::Endpoint => "endpoint",
            GroupBy::Account => "account",
        }
    }
}

/// What a bucket groups.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum BucketKey {
    /// Events that ended in the hour or day starting here (UTC).
    Start(SystemTime),
    /// Events of this endpoint.
    Endpoint(String),
    /// Events of this account.
    Account(String),
}

/// Sums over the events of one bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageBucket {
    /// The bucket's start time or endpoint.
    pub key: BucketKey,
    /// Number of events (requests).
    pub requests: u64,
    /// Credits charged.
    pub credits: u64,
    /// Measured units, summed per unit (sums saturate at [`MAX_EVENT_AMOUNT`]).
    pub units: BTreeMap<String, u64>,
}

impl Serialize for UsageBucket {
    /// `{"start": "2027-01-15T10:00:00.000Z" | "endpoint": "gpt-4o",
    /// "requests": n, "credits": n, "units": {"token": n}}`
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(4))?;
        match &self.key {
            BucketKey::Start(t) => {
                m.serialize_entry("start", &humantime::format_rfc3339_millis(*t).to_string())?
            }
            BucketKey::Endpoint(e) => m.serialize_entry("endpoint", e)?,
            BucketKey::Account(a) => m.serialize_entry("account", a)?,
        }
        m.serialize_entry("requests", &self.requests)?;
        m.serialize_entry("credits", &self.credits)?;
        m.serialize_entry("units", &self.units)?;
        m.end()
    }
}

/// The bucket an event (normalized) falls in.
pub(crate) fn bucket_key(group_by: GroupBy, e: &UsageEvent) -> BucketKey {
    let ms = e.ended_ms();
    match group_by {
        GroupBy::Hour => BucketKey::Start(from_ms(ms - ms % HOUR_MS)),
        GroupBy::Day => BucketKey::Start(from_ms(ms - ms % DAY_MS)),
        GroupBy::Endpoint => BucketKey::Endpoint(e.endpoint.clone()),
        GroupBy::Account => BucketKey::Account(e.account_id.clone()),
    }
}

/// Sums events into buckets, ordered by key (time, or endpoint bytewise).
#[derive(Debug, Default)]
pub(crate) struct Summary {
    buckets: BTreeMap<BucketKey, UsageBucket>,
}

impl Summary {
    pub(crate) fn add(&mut self, group_by: GroupBy, e: &UsageEvent) {
        let key = bucket_key(group_by, e);
        let b = self
            .buckets
            .entry(key.clone())
            .or_insert_with(|| UsageBucket {
                key,
                requests: 0,
                credits: 0,
                units: BTreeMap::new(),
            });
        b.requests += 1;
        b.credits = b.credits.saturating_add(e.credits).min(MAX_EVENT_AMOUNT);
        for u in &e.units {
            let sum = b.units.entry(u.unit.clone()).or_insert(0);
            *sum = sum.saturating_add(u.measured).min(MAX_EVENT_AMOUNT);
        }
    }

    pub(crate) fn finish(self) -> Vec<UsageBucket> {
        self.buckets.into_values().collect()
    }
}

/// Parse a time given on the command line or in a query string: RFC 3339
/// in UTC (`2027-01-15T10:00:00Z`, fractions allowed, the `Z` optional) or
/// a date (`2027-01-15`, its midnight UTC).
pub fn parse_time(s: &str) -> Result<SystemTime, String> {
    let s = s.trim();
    let parsed = if s.len() == 10 && s.as_bytes().get(4) == Some(&b'-') {
        humantime::parse_rfc3339(&format!("{s}T00:00:00Z"))
    } else {
        humantime::parse_rfc3339_weak(s)
    };
    parsed.map_err(|e| {
        format!(
            "`{}` is not a time in RFC 3339 (UTC, e.g. 2027-01-15T10:00:00Z) or a date (2027-01-15): {e}",
            s.escape_debug()
        )
    })
}

/// `SystemTime` as RFC 3339 with milliseconds (`2027-01-15T10:00:20.123Z`).
pub mod rfc3339_ms {
    use std::time::SystemTime;

    use serde::Deserialize;

    pub fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_rfc3339_millis(*t).to_string())
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_rfc3339_weak(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, ended_ms: u64) -> UsageEvent {
        UsageEvent {
            request_id: id.into(),
            account_id: "a".into(),
            key_id: Some("key_1".into()),
            endpoint: "chat".into(),
            route: "/v1/chat/completions".into(),
            units: vec![
                UnitUsage {
                    unit: "token".into(),
                    measured: 12,
                    reserved: 20,
                },
                UnitUsage {
                    unit: "image".into(),
                    measured: 1,
                    reserved: 0,
                },
            ],
            credits: 3,
            status: 200,
            degraded: false,
            streamed: true,
            cut_short: false,
            started_at: from_ms(ended_ms - 1500),
            ended_at: from_ms(ended_ms) + Duration::from_micros(250),
            charge: None,
        }
    }

    #[test]
    fn json_round_trip_of_a_normalized_event_is_exact() {
        let e = event("req_1", 1_799_920_820_123).normalized();
        assert_eq!(e.units[0].unit, "image");
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["ended_at"], "2027-01-14T10:00:20.123Z");
        assert_eq!(json["started_at"], "2027-01-14T10:00:18.623Z");
        assert_eq!(json["key_id"], "key_1");
        assert_eq!(json["units"][1]["reserved"], 20);
        let back: UsageEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        for id in ["req_1", "a:b:c", "ünï 😀", "x"] {
            let c = UsageCursor {
                ended_ms: 1_799_920_820_123,
                request_id: id.into(),
            };
            let s = c.encode();
            assert!(s.bytes().all(|b| b.is_ascii_hexdigit()), "{s}");
            assert_eq!(UsageCursor::decode(&s).unwrap(), c);
        }
        let hex = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
        for bad in [
            String::new(),
            "abc".into(),
            "zz".into(),
            hex("123"),
            hex(":req"),
            hex("12:"),
            hex("-1:req"),
            hex("+1:req"),
            hex("99999999999999999999999:req"),
            hex("1:a\0b"),
        ] {
            assert!(UsageCursor::decode(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn checks_name_the_field() {
        let ok = event("req_1", 1_799_920_820_000);
        assert_eq!(ok.check(), Ok(()));
        type Edit = fn(&mut UsageEvent);
        let cases: &[(Edit, &str)] = &[
            (|e| e.request_id.clear(), "request_id must not be empty"),
            (
                |e| e.account_id = "a\0".into(),
                "account_id must not contain NUL",
            ),
            (
                |e| e.key_id = Some(String::new()),
                "key_id must not be empty",
            ),
            (
                |e| e.endpoint = "e".repeat(201),
                "endpoint is longer than 200",
            ),
            (|e| e.route = "r".repeat(1025), "route is longer than 1024"),
            (
                |e| e.units[1].unit = "token".into(),
                "unit `token` appears twice",
            ),
            (
                |e| e.units[0].measured = u64::MAX,
                "amounts must be at most",
            ),
            (|e| e.credits = u64::MAX, "credits must be at most"),
            (|e| e.status = 42, "status 42 is not an HTTP status"),
            (
                |e| e.ended_at = UNIX_EPOCH - Duration::from_secs(1),
                "ended_at is before 1970",
            ),
            (
                |e| e.started_at = from_ms(MAX_TIME_MS + 1),
                "started_at is after the year 9999",
            ),
        ];
        for (edit, want) in cases {
            let mut e = ok.clone();
            edit(&mut e);
            let got = e.check().unwrap_err();
            assert!(got.contains(want), "{got:?} should contain {want:?}");
        }
        // Empty endpoints and routes are allowed (nothing to name).
        let mut e = ok.clone();
        e.endpoint.clear();
        e.route.clear();
        e.units.clear();
        e.key_id = None;
        assert_eq!(e.check(), Ok(()));
    }

    #[test]
    fn time_bounds_round_up_to_whole_ms() {
        let q = |since: SystemTime, until: SystemTime| UsageQuery {
            since: Some(since),
            until: Some(until),
            ..Default::default()
        };
        let e = event("r", 10_000).normalized(); // ended at exactly 10.000 s
        let t = from_ms(10_000);
        let half = Duration::from_micros(500);
        assert!(q(t, t + half).matches(&e));
        assert!(!q(t + half, t + Duration::from_secs(1)).matches(&e));
        assert!(!q(t - half, t).matches(&e));
        assert!(q(t - half, t + Duration::from_nanos(1)).matches(&e));
        assert!(UsageQuery::default().matches(&e));
    }

    #[test]
    fn buckets_are_utc_hours_and_days() {
        // 2027-01-14T10:00:20.123Z
        let e = event("r", 1_799_920_820_123).normalized();
        let start = |k: BucketKey| match k {
            BucketKey::Start(t) => humantime::format_rfc3339_millis(t).to_string(),
            BucketKey::Endpoint(e) | BucketKey::Account(e) => e,
        };
        assert_eq!(
            start(bucket_key(GroupBy::Hour, &e)),
            "2027-01-14T10:00:00.000Z"
        );
        assert_eq!(
            start(bucket_key(GroupBy::Day, &e)),
            "2027-01-14T00:00:00.000Z"
        );
        assert_eq!(start(bucket_key(GroupBy::Endpoint, &e)), "chat");
        let mut s = Summary::default();
        s.add(GroupBy::Day, &e);
        s.add(GroupBy::Day, &e);
        let b = s.finish();
        assert_eq!(b.len(), 1);
        assert_eq!((b[0].requests, b[0].credits), (2, 6));
        assert_eq!(b[0].units["token"], 24);
        assert_eq!(
            serde_json::to_value(&b[0]).unwrap(),
            serde_json::json!({"start": "2027-01-14T00:00:00.000Z", "requests": 2,
                               "credits": 6, "units": {"image": 2, "token": 24}})
        );
    }

    #[test]
    fn times_parse_as_rfc3339_or_dates() {
        let ms = |s: &str| parse_time(s).map(|t| epoch_ms(t).unwrap());
        assert_eq!(ms("2027-01-14T10:00:20Z"), Ok(1_799_920_820_000));
        assert_eq!(ms("2027-01-14T10:00:20.123Z"), Ok(1_799_920_820_123));
        assert_eq!(ms("2027-01-14T10:00:20"), Ok(1_799_920_820_000));
        assert_eq!(ms("2027-01-14"), Ok(1_799_884_800_000));
        for bad in ["", "yesterday", "2027-13-01", "1799920820"] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }
}
