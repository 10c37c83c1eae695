//! Time, injected: everything that reads the clock takes a [`Clock`], so tests
//! advance a [`ManualClock`] instead of sleeping.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of wall-clock time in milliseconds since the Unix epoch (UTC).
///
/// Fixed windows are aligned to the epoch, so the limiter needs wall-clock
/// time, not a monotonic instant.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since 1970-01-01T00:00:00Z.
    fn now_ms(&self) -> u64;
}

/// Shared handle to a clock.
pub type SharedClock = Arc<dyn Clock>;

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            // A clock set before 1970 is a broken machine; treat it as the epoch
            // rather than panicking on the hot path.
            .unwrap_or(0)
    }
}

/// A clock that only moves when told to. Cheap to clone; clones share time.
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A clock standing at `now_ms`.
    pub fn new(now_ms: u64) -> Self {
        Self(Arc::new(AtomicU64::new(now_ms)))
    }

    /// Move to an absolute time.
    pub fn set_ms(&self, now_ms: u64) {
        self.0.store(now_ms, Ordering::SeqCst);
    }

    /// Move forward.
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Milliseconds in a day.
const DAY_MS: u64 = 86_400_000;

/// A window's length: a fixed number of seconds aligned to the Unix epoch,
/// or a calendar period in UTC.
///
/// Every window of either kind is a half-open interval `[start, end)` of
/// wall-clock milliseconds, numbered by an index that grows with time, so
/// the limiter and both stores treat them alike: the counter of the window
/// containing `t` is keyed by [`WindowLen::index`] and lives until
/// [`WindowLen::end_ms`] (+ slack).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WindowLen {
    /// `secs` seconds (>= 1), the window containing `t` starts at
    /// `floor(t / W) * W`.
    Fixed(u64),
    /// A calendar day, week or month in UTC.
    Calendar(Period),
}

/// A calendar period (`calendar: utc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Period {
    /// From 00:00 UTC to the next 00:00 UTC.
    Day,
    /// From Monday 00:00 UTC to the next Monday 00:00 UTC (ISO 8601 weeks).
    Week,
    /// From the 1st 00:00 UTC to the 1st of the next month.
    Month,
    /// An account's billing month (`accounts.billing_anchor`, 2 to 31):
    /// from that day of the month 00:00 UTC to the same day of the next
    /// month, clamped to the last day of short months (anchor 31: Jan 31,
    /// Feb 28 or 29, Mar 31, Apr 30...). Plans never name it: a plan's
    /// `1mo` becomes it for an account with an anchor (see
    /// `plans::Policy::anchored`). Anchor 1 is [`Period::Month`].
    MonthFrom(u8),
}

impl Period {
    /// The spelling in plans (`window: 1d | 1w | 1mo`); a billing month
    /// is a `1mo` too.
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "1d",
            Period::Week => "1w",
            Period::Month | Period::MonthFrom(_) => "1mo",
        }
    }

    /// The billing anchor of a billing month.
    pub fn anchor(self) -> Option<u8> {
        match self {
            Period::MonthFrom(a) => Some(a),
            _ => None,
        }
    }

    /// The period a plan's `window` names, if it names one.
    pub fn parse(s: &str) -> Option<Period> {
        match s.trim() {
            "1d" => Some(Period::Day),
            "1w" => Some(Period::Week),
            "1mo" => Some(Period::Month),
            _ => None,
        }
    }

    /// Its name in words (`day`, `week`, `month`, `billing month`).
    pub fn noun(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
            Period::MonthFrom(_) => "billing month",
        }
    }
}

impl WindowLen {
    /// Index of the window containing `now_ms`: strictly increasing from
    /// one window to the next. Fixed: `floor(t / W)`; day: days since the
    /// epoch; week: weeks since the Monday before the epoch
    /// (1969-12-29); month: `year * 12 + month - 1`; billing month: the
    /// same of the month it starts in.
    pub fn index(self, now_ms: u64) -> u64 {
        match self {
            WindowLen::Fixed(secs) => window_index(now_ms, secs),
            WindowLen::Calendar(Period::Day) => now_ms / DAY_MS,
            WindowLen::Calendar(Period::Week) => (now_ms / DAY_MS + 3) / 7,
            WindowLen::Calendar(Period::Month) => {
                let (y, m, _) = civil_from_days(now_ms / DAY_MS);
                y * 12 + (m - 1)
            }
            WindowLen::Calendar(Period::MonthFrom(a)) => billing_month(now_ms, a).0,
        }
    }

    /// Start of the window containing `now_ms` (inclusive), in ms since
    /// the epoch (0 for the week that began before the epoch).
    pub fn start_ms(self, now_ms: u64) -> u64 {
        match self {
            WindowLen::Fixed(secs) => window_start_ms(now_ms, secs),
            WindowLen::Calendar(Period::Day) => now_ms - now_ms % DAY_MS,
            WindowLen::Calendar(Period::Week) => {
                (self.index(now_ms) * 7).saturating_sub(3) * DAY_MS
            }
            WindowLen::Calendar(Period::Month) => {
                let (y, m, _) = civil_from_days(now_ms / DAY_MS);
                days_from_civil(y, m, 1) * DAY_MS
            }
            WindowLen::Calendar(Period::MonthFrom(a)) => billing_month(now_ms, a).1,
        }
    }

    /// End of the window containing `now_ms` (exclusive): the start of the
    /// next one. Always `> now_ms`.
    pub fn end_ms(self, now_ms: u64) -> u64 {
        match self {
            WindowLen::Fixed(secs) => now_ms + window_reset_ms(now_ms, secs),
            WindowLen::Calendar(Period::Day) => (now_ms / DAY_MS + 1) * DAY_MS,
            WindowLen::Calendar(Period::Week) => (self.index(now_ms) * 7 + 4) * DAY_MS,
            WindowLen::Calendar(Period::Month) => {
                let (y, m, _) = civil_from_days(now_ms / DAY_MS);
                let (y, m) = next_month(y, m);
                days_from_civil(y, m, 1) * DAY_MS
            }
            WindowLen::Calendar(Period::MonthFrom(a)) => billing_month(now_ms, a).2,
        }
    }

    /// Milliseconds from `now_ms` to the end of its window (`>= 1`): what
    /// `x-ratelimit-reset-*` and `/v1/limits` report.
    pub fn reset_ms(self, now_ms: u64) -> u64 {
        self.end_ms(now_ms) - now_ms
    }

    /// Length in seconds of the window containing `now_ms` (a month is 28
    /// to 31 days).
    pub fn secs_at(self, now_ms: u64) -> u64 {
        (self.end_ms(now_ms) - self.start_ms(now_ms)) / 1000
    }

    /// The longest this window can be, in seconds.
    pub fn max_secs(self) -> u64 {
        match self {
            WindowLen::Fixed(secs) => secs,
            WindowLen::Calendar(Period::Day) => 86_400,
            WindowLen::Calendar(Period::Week) => 7 * 86_400,
            WindowLen::Calendar(Period::Month | Period::MonthFrom(_)) => 31 * 86_400,
        }
    }

    /// The calendar period, if this is a calendar window.
    pub fn period(self) -> Option<Period> {
        match self {
            WindowLen::Fixed(_) => None,
            WindowLen::Calendar(p) => Some(p),
        }
    }
}

/// How a window is named in plans and log lines: `60s` for a fixed window,
/// `1mo` for a calendar one, `1mo@15` for a billing month from the 15th
/// (counter keys use the same without the fixed window's `s`: a fixed
/// token is digits only, so the kinds never meet).
impl std::fmt::Display for WindowLen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WindowLen::Fixed(secs) => write!(f, "{secs}s"),
            WindowLen::Calendar(Period::MonthFrom(a)) => write!(f, "1mo@{a}"),
            WindowLen::Calendar(p) => f.write_str(p.as_str()),
        }
    }
}

/// The month after (`y`, `m`).
fn next_month(y: u64, m: u64) -> (u64, u64) {
    if m == 12 {
        (y + 1, 1)
    } else {
        (y, m + 1)
    }
}

/// Days in month `m` of year `y`.
pub fn days_in_month(y: u64, m: u64) -> u64 {
    match m {
        2 if y % 4 == 0 && (y % 100 != 0 || y % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// The billing month with anchor `anchor` that contains `now_ms`: (index,
/// start ms, end ms). It starts on day `min(anchor, days in the month)` of
/// its month, 00:00 UTC. Before the first anchor day after the epoch it
/// starts at 0 (the epoch), with the index of December 1969.
fn billing_month(now_ms: u64, anchor: u8) -> (u64, u64, u64) {
    let anchor = u64::from(anchor.clamp(1, 31));
    let day_of = |y: u64, m: u64| days_from_civil(y, m, anchor.min(days_in_month(y, m)));
    let today = now_ms / DAY_MS;
    let (y, m, _) = civil_from_days(today);
    let this = day_of(y, m);
    if today >= this {
        let (ny, nm) = next_month(y, m);
        (y * 12 + m - 1, this * DAY_MS, day_of(ny, nm) * DAY_MS)
    } else if (y, m) == (1970, 1) {
        (1969 * 12 + 11, 0, this * DAY_MS)
    } else {
        let (py, pm) = if m == 1 { (y - 1, 12) } else { (y, m - 1) };
        (py * 12 + pm - 1, day_of(py, pm) * DAY_MS, this * DAY_MS)
    }
}

/// (year, month 1..=12, day 1..=31) of `days` since 1970-01-01 (proleptic
/// Gregorian; H. Hinnant's `civil_from_days`, for days >= 0).
pub fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Days since 1970-01-01 of (year >= 1970, month 1..=12, day 1..=31); the
/// inverse of [`civil_from_days`].
pub fn days_from_civil(y: u64, m: u64, d: u64) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Start of the fixed window of length `window_secs` that contains `now_ms`
/// (aligned to the Unix epoch), in milliseconds.
pub fn window_start_ms(now_ms: u64, window_secs: u64) -> u64 {
    let w = window_secs.saturating_mul(1000).max(1);
    now_ms - now_ms % w
}

/// Milliseconds from `now_ms` to the end of its window of length `window_secs`.
/// Always in `1..=window_secs*1000`.
pub fn window_reset_ms(now_ms: u64, window_secs: u64) -> u64 {
    let w = window_secs.saturating_mul(1000).max(1);
    w - now_ms % w
}

/// Index of the window containing `now_ms` (floor(t / W)).
pub fn window_index(now_ms: u64, window_secs: u64) -> u64 {
    now_ms / window_secs.saturating_mul(1000).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::{Duration, UNIX_EPOCH};

    const DAY: WindowLen = WindowLen::Calendar(Period::Day);
    const WEEK: WindowLen = WindowLen::Calendar(Period::Week);
    const MONTH: WindowLen = WindowLen::Calendar(Period::Month);

    /// Milliseconds of an RFC 3339 UTC time (an oracle independent of the
    /// civil-date code under test).
    fn at(s: &str) -> u64 {
        humantime::parse_rfc3339(s)
            .expect("rfc3339")
            .duration_since(UNIX_EPOCH)
            .expect("after the epoch")
            .as_millis() as u64
    }

    fn rfc(ms: u64) -> String {
        humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
    }

    #[test]
    fn calendar_windows_start_and_end_where_the_calendar_says() {
        // (window, time, start, end)
        let cases = [
            // Months: 31, 30, 28 and 29 days; a year end.
            (
                MONTH,
                "2027-01-31T23:59:59.999Z",
                "2027-01-01T00:00:00Z",
                "2027-02-01T00:00:00Z",
            ),
            (
                MONTH,
                "2027-02-01T00:00:00Z",
                "2027-02-01T00:00:00Z",
                "2027-03-01T00:00:00Z",
            ),
            (
                MONTH,
                "2027-04-30T12:00:00Z",
                "2027-04-01T00:00:00Z",
                "2027-05-01T00:00:00Z",
            ),
            (
                MONTH,
                "2028-02-29T23:59:59.999Z",
                "2028-02-01T00:00:00Z",
                "2028-03-01T00:00:00Z",
            ),
            (
                MONTH,
                "2028-03-01T00:00:00Z",
                "2028-03-01T00:00:00Z",
                "2028-04-01T00:00:00Z",
            ),
            (
                MONTH,
                "2026-12-31T23:59:59.999Z",
                "2026-12-01T00:00:00Z",
                "2027-01-01T00:00:00Z",
            ),
            (
                MONTH,
                "2100-02-28T00:00:00Z",
                "2100-02-01T00:00:00Z",
                "2100-03-01T00:00:00Z",
            ),
            (
                MONTH,
                "2000-02-29T00:00:00Z",
                "2000-02-01T00:00:00Z",
                "2000-03-01T00:00:00Z",
            ),
            (
                MONTH,
                "1970-01-01T00:00:00Z",
                "1970-01-01T00:00:00Z",
                "1970-02-01T00:00:00Z",
            ),
            // Weeks from Monday: Sunday 2026-12-06 -> Monday 2026-12-07.
            (
                WEEK,
                "2026-12-06T23:59:59.999Z",
                "2026-11-30T00:00:00Z",
                "2026-12-07T00:00:00Z",
            ),
            (
                WEEK,
                "2026-12-07T00:00:00Z",
                "2026-12-07T00:00:00Z",
                "2026-12-14T00:00:00Z",
            ),
            // A week across a month and a year end (Mon 2029-12-31).
            (
                WEEK,
                "2030-01-02T08:00:00Z",
                "2029-12-31T00:00:00Z",
                "2030-01-07T00:00:00Z",
            ),
            // Across Feb 29 (Mon 2028-02-28).
            (
                WEEK,
                "2028-03-01T00:00:00Z",
                "2028-02-28T00:00:00Z",
                "2028-03-06T00:00:00Z",
            ),
            // The first week began before the epoch (Mon 1969-12-29).
            (
                WEEK,
                "1970-01-01T00:00:00Z",
                "1970-01-01T00:00:00Z",
                "1970-01-05T00:00:00Z",
            ),
            (
                DAY,
                "2028-02-29T13:14:15Z",
                "2028-02-29T00:00:00Z",
                "2028-03-01T00:00:00Z",
            ),
        ];
        for (len, t, start, end) in cases {
            let t_ms = at(t);
            assert_eq!(
                rfc(len.start_ms(t_ms)),
                rfc(at(start)),
                "{len} start of {t}"
            );
            assert_eq!(rfc(len.end_ms(t_ms)), rfc(at(end)), "{len} end of {t}");
            assert_eq!(len.reset_ms(t_ms), at(end) - t_ms, "{len} reset at {t}");
            // The next window follows at once, with the next index.
            assert_eq!(len.index(at(end)), len.index(t_ms) + 1, "{len} next of {t}");
            assert_eq!(
                len.index(at(end) - 1),
                len.index(t_ms),
                "{len} last ms of {t}"
            );
        }
        // Lengths of the current period.
        assert_eq!(MONTH.secs_at(at("2028-02-10T00:00:00Z")), 29 * 86_400);
        assert_eq!(MONTH.secs_at(at("2027-02-10T00:00:00Z")), 28 * 86_400);
        assert_eq!(MONTH.secs_at(at("2027-04-10T00:00:00Z")), 30 * 86_400);
        assert_eq!(MONTH.secs_at(at("2027-12-10T00:00:00Z")), 31 * 86_400);
        assert_eq!(WEEK.secs_at(at("2027-12-10T00:00:00Z")), 7 * 86_400);
        // Month indexes count months: Dec 2026 then Jan 2027.
        assert_eq!(MONTH.index(at("2026-12-15T00:00:00Z")), 2026 * 12 + 11);
        assert_eq!(MONTH.index(at("2027-01-15T00:00:00Z")), 2027 * 12);
    }

    #[test]
    fn billing_months_run_anchor_to_anchor_clamped_in_short_months() {
        let from = |a| WindowLen::Calendar(Period::MonthFrom(a));
        // (anchor, time, start, end)
        let cases = [
            (
                15,
                "2027-03-14T23:59:59.999Z",
                "2027-02-15T00:00:00Z",
                "2027-03-15T00:00:00Z",
            ),
            (
                15,
                "2027-03-15T00:00:00Z",
                "2027-03-15T00:00:00Z",
                "2027-04-15T00:00:00Z",
            ),
            // Anchor 31: Jan 31 -> Feb 28 -> Mar 31 -> Apr 30 -> May 31.
            (
                31,
                "2027-02-10T00:00:00Z",
                "2027-01-31T00:00:00Z",
                "2027-02-28T00:00:00Z",
            ),
            (
                31,
                "2027-02-28T00:00:00Z",
                "2027-02-28T00:00:00Z",
                "2027-03-31T00:00:00Z",
            ),
            (
                31,
                "2027-04-30T12:00:00Z",
                "2027-04-30T00:00:00Z",
                "2027-05-31T00:00:00Z",
            ),
            // A leap year: Feb 29.
            (
                31,
                "2028-02-28T23:59:59.999Z",
                "2028-01-31T00:00:00Z",
                "2028-02-29T00:00:00Z",
            ),
            (
                30,
                "2028-02-29T00:00:00Z",
                "2028-02-29T00:00:00Z",
                "2028-03-30T00:00:00Z",
            ),
            (
                29,
                "2027-03-01T00:00:00Z",
                "2027-02-28T00:00:00Z",
                "2027-03-29T00:00:00Z",
            ),
            // Across a year end.
            (
                20,
                "2027-01-05T00:00:00Z",
                "2026-12-20T00:00:00Z",
                "2027-01-20T00:00:00Z",
            ),
            // Before the first anchor day after the epoch.
            (
                10,
                "1970-01-02T00:00:00Z",
                "1970-01-01T00:00:00Z",
                "1970-01-10T00:00:00Z",
            ),
        ];
        for (a, t, start, end) in cases {
            let len = from(a);
            let t_ms = at(t);
            assert_eq!(
                rfc(len.start_ms(t_ms)),
                rfc(at(start)),
                "{len} start of {t}"
            );
            assert_eq!(rfc(len.end_ms(t_ms)), rfc(at(end)), "{len} end of {t}");
            assert_eq!(len.index(at(end)), len.index(t_ms) + 1, "{len} next of {t}");
            assert_eq!(
                len.index(at(end) - 1),
                len.index(t_ms),
                "{len} last ms of {t}"
            );
        }
        // The index is the month the period starts in.
        assert_eq!(from(15).index(at("2027-03-14T00:00:00Z")), 2027 * 12 + 1);
        assert_eq!(from(31).secs_at(at("2027-02-10T00:00:00Z")), 28 * 86_400);
        assert_eq!(from(15).to_string(), "1mo@15");
    }

    #[test]
    fn a_utc_day_is_the_fixed_day() {
        // Same boundaries and index as `86_400s` (keys still differ).
        for t in [
            0,
            at("2028-02-29T23:59:59.999Z"),
            at("2031-07-04T01:02:03Z"),
        ] {
            let fixed = WindowLen::Fixed(86_400);
            assert_eq!(
                (DAY.index(t), DAY.start_ms(t), DAY.end_ms(t)),
                (fixed.index(t), fixed.start_ms(t), fixed.end_ms(t))
            );
        }
    }

    fn any_len() -> impl Strategy<Value = WindowLen> {
        prop_oneof![
            (1u64..=10 * 365 * 86_400).prop_map(WindowLen::Fixed),
            Just(DAY),
            Just(WEEK),
            Just(MONTH),
            (2u8..=31).prop_map(|a| WindowLen::Calendar(Period::MonthFrom(a))),
        ]
    }

    // Up to the year 9999.
    const MAX_T: u64 = 253_402_300_799_999;

    proptest! {
        #[test]
        fn civil_dates_match_an_independent_formatter(days in 0u64..2_932_896) {
            let (y, m, d) = civil_from_days(days);
            let want = rfc(days * DAY_MS);
            prop_assert_eq!(format!("{y:04}-{m:02}-{d:02}T00:00:00.000Z"), want);
            prop_assert_eq!(days_from_civil(y, m, d), days);
        }

        #[test]
        fn every_window_contains_its_time(len in any_len(), t in 0u64..MAX_T) {
            let (start, end) = (len.start_ms(t), len.end_ms(t));
            prop_assert!(start <= t && t < end, "{len}: {start} <= {t} < {end}");
            prop_assert_eq!(len.reset_ms(t), end - t);
            prop_assert!(len.reset_ms(t) >= 1);
            prop_assert!(end - start <= len.max_secs() * 1000);
            // Every time of the window has its index; the next window the next.
            prop_assert_eq!(len.index(start), len.index(t));
            prop_assert_eq!(len.index(end - 1), len.index(t));
            prop_assert_eq!(len.index(end), len.index(t) + 1);
            prop_assert_eq!(len.start_ms(end), end);
        }

        #[test]
        fn window_index_is_monotonic(len in any_len(), t in 0u64..MAX_T, d in 0u64..100 * 86_400_000) {
            prop_assert!(len.index(t) <= len.index(t + d));
            prop_assert!(len.start_ms(t) <= len.start_ms(t + d));
        }

        #[test]
        fn billing_months_start_on_their_clamped_anchor_day(t in 0u64..MAX_T, a in 2u8..=31) {
            let len = WindowLen::Calendar(Period::MonthFrom(a));
            let start = len.start_ms(t);
            if start > 0 {
                let (y, m, d) = civil_from_days(start / DAY_MS);
                prop_assert_eq!(start % DAY_MS, 0);
                prop_assert_eq!(d, u64::from(a).min(days_in_month(y, m)));
            }
            // One month later, clamped: 28 to 31 days.
            let days = (len.end_ms(t) - start) / DAY_MS;
            prop_assert!(start == 0 || (28..=31).contains(&days), "{} days", days);
        }

        #[test]
        fn calendar_windows_start_at_midnight_on_the_right_day(t in 0u64..MAX_T) {
            for len in [DAY, WEEK, MONTH] {
                let start = len.start_ms(t);
                let s = rfc(start);
                prop_assert!(s.ends_with("T00:00:00.000Z"), "{len} {s}");
                match len {
                    // Mondays (1970-01-05 was one), but the epoch's week.
                    WindowLen::Calendar(Period::Week) if start > 0 => {
                        prop_assert_eq!((start / DAY_MS) % 7, 4, "{}", s)
                    }
                    WindowLen::Calendar(Period::Month) => {
                        prop_assert!(s[8..10] == *"01", "{}", s)
                    }
                    _ => {}
                }
            }
        }
    }
}
