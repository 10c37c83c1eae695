//! Rendering `x-ratelimit-*` headers and OpenAI durations (SPEC §6).
//!
//! Everything here is pure: a [`RateLimitInfo`] goes in, headers come out.
//! The hot path renders numbers and durations into stack buffers and only
//! allocates for the header values themselves (and for header names of
//! unusual unit types; the common ones are static).
//!
//! ```
//! use plangate::headers::{format_duration_ms, format_period};
//! assert_eq!(format_duration_ms(20), "20ms");
//! assert_eq!(format_duration_ms(1_500), "1.5s");
//! assert_eq!(format_duration_ms(360_000), "6m0s");
//! assert_eq!(format_period(90), "1m30s");
//! ```

use std::fmt::{self, Write as _};

use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::limiter::RateLimitInfo;
use crate::plans::{Period, WindowLen};

/// `x-ratelimit-limit-concurrency`
pub const LIMIT_CONCURRENCY: HeaderName = HeaderName::from_static("x-ratelimit-limit-concurrency");
/// `x-ratelimit-remaining-concurrency`
pub const REMAINING_CONCURRENCY: HeaderName =
    HeaderName::from_static("x-ratelimit-remaining-concurrency");
/// `x-credits-remaining`
pub const CREDITS_REMAINING: HeaderName = HeaderName::from_static("x-credits-remaining");
/// `x-ratelimit-degraded`: set when the counter store failed and the
/// gateway admitted anyway (`on_store_error = "open"`).
pub const DEGRADED: HeaderName = HeaderName::from_static("x-ratelimit-degraded");

/// The three header names of one unit type: limit, remaining, reset.
type UnitNames = [HeaderName; 3];

/// Static names for the unit types nearly every policy uses, so the hot path
/// does not build (and allocate) them per response. `const`, so that even
/// `from_static`'s validation happens at compile time.
const REQUESTS_NAMES: UnitNames = [
    HeaderName::from_static("x-ratelimit-limit-requests"),
    HeaderName::from_static("x-ratelimit-remaining-requests"),
    HeaderName::from_static("x-ratelimit-reset-requests"),
];
const TOKENS_NAMES: UnitNames = [
    HeaderName::from_static("x-ratelimit-limit-tokens"),
    HeaderName::from_static("x-ratelimit-remaining-tokens"),
    HeaderName::from_static("x-ratelimit-reset-tokens"),
];
const IMAGES_NAMES: UnitNames = [
    HeaderName::from_static("x-ratelimit-limit-images"),
    HeaderName::from_static("x-ratelimit-remaining-images"),
    HeaderName::from_static("x-ratelimit-reset-images"),
];

fn static_unit_names(plural: &str) -> Option<UnitNames> {
    match plural {
        "requests" => Some(REQUESTS_NAMES),
        "tokens" => Some(TOKENS_NAMES),
        "images" => Some(IMAGES_NAMES),
        _ => None,
    }
}

/// The header names for a unit's plural form, or `None` when the unit name
/// cannot be part of a header name (e.g. it contains spaces or non-ASCII).
/// Plan ids and unit names are free-form, so this must not panic.
pub fn unit_header_names(plural: &str) -> Option<UnitNames> {
    if let Some(names) = static_unit_names(plural) {
        return Some(names);
    }
    let mut buf = String::with_capacity("x-ratelimit-remaining-".len() + plural.len());
    let mut name = |kind: &str| {
        buf.clear();
        buf.push_str("x-ratelimit-");
        buf.push_str(kind);
        buf.push('-');
        buf.push_str(plural);
        HeaderName::from_bytes(buf.as_bytes()).ok()
    };
    Some([name("limit")?, name("remaining")?, name("reset")?])
}

/// Insert the per-unit and concurrency headers of `info` into `headers`,
/// replacing any previous values of the same names:
///
/// - per unit type: `x-ratelimit-limit-<plural>`,
///   `x-ratelimit-remaining-<plural>`, `x-ratelimit-reset-<plural>` (an
///   OpenAI duration, see [`format_duration_ms`]);
/// - with a concurrency limit: `x-ratelimit-limit-concurrency` and
///   `x-ratelimit-remaining-concurrency`.
///
/// Units whose names cannot form a header name are skipped.
pub fn insert_rate_limit(headers: &mut HeaderMap, info: &RateLimitInfo) {
    for u in &info.units {
        let names = match u.unit.as_str() {
            // The common units: static names, no plural string built.
            "request" | "requests" => Some(REQUESTS_NAMES),
            "token" | "tokens" => Some(TOKENS_NAMES),
            "image" | "images" => Some(IMAGES_NAMES),
            _ => unit_header_names(&u.unit.plural()),
        };
        let Some([limit, remaining, reset]) = names else {
            continue;
        };
        headers.insert(limit, HeaderValue::from(u.limit));
        headers.insert(remaining, HeaderValue::from(u.remaining));
        headers.insert(reset, duration_value(u.reset_ms));
    }
    if let Some(c) = info.concurrent {
        headers.insert(LIMIT_CONCURRENCY, HeaderValue::from(c.limit));
        headers.insert(REMAINING_CONCURRENCY, HeaderValue::from(c.remaining));
    }
}

/// A fresh map holding just the headers of [`insert_rate_limit`].
pub fn rate_limit_headers(info: &RateLimitInfo) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(info.units.len() * 3 + 2);
    insert_rate_limit(&mut h, info);
    h
}

/// `x-credits-remaining: <balance>`.
pub fn insert_credits_remaining(headers: &mut HeaderMap, balance: u64) {
    headers.insert(CREDITS_REMAINING, HeaderValue::from(balance));
}

/// `x-ratelimit-degraded: true`.
pub fn insert_degraded(headers: &mut HeaderMap) {
    headers.insert(DEGRADED, HeaderValue::from_static("true"));
}

/// `x-ratelimit-capped-tokens: N` (named for the unit capped): `cap`
/// rewrote the request to ask for `n`, what its windows had left.
pub fn insert_capped(headers: &mut HeaderMap, n: u64) {
    headers.insert(
        HeaderName::from_static("x-ratelimit-capped-tokens"),
        HeaderValue::from(n),
    );
}

/// `x-ratelimit-would-deny: <error code>`: shadow mode (`enforce: false`)
/// admitted a request its limits would have refused with that code.
pub fn insert_would_deny(headers: &mut HeaderMap, code: &'static str) {
    headers.insert(
        HeaderName::from_static("x-ratelimit-would-deny"),
        HeaderValue::from_static(code),
    );
}

/// An OpenAI duration as a header value, rendered without a heap buffer.
pub fn duration_value(ms: u64) -> HeaderValue {
    let mut buf = StackBuf::new();
    // Cannot fail: the longest rendering of a u64 is far below the capacity.
    let _ = write_duration_ms(&mut buf, ms);
    HeaderValue::from_bytes(buf.as_bytes()).unwrap_or_else(|_| HeaderValue::from_static("0s"))
}

/// OpenAI's (Go's `time.Duration`) format for a number of milliseconds:
/// `0s`; under a second `20ms`; under a minute seconds with up to three
/// decimals, trailing zeros trimmed (`1s`, `1.5s`, `59.999s`); from a minute
/// on `6m0s`, `6m0.5s`, `1h2m3s` (hours are not folded into days).
pub fn format_duration_ms(ms: u64) -> String {
    let mut s = String::with_capacity(12);
    let _ = write_duration_ms(&mut s, ms);
    s
}

/// [`format_duration_ms`] into any writer.
pub fn write_duration_ms<W: fmt::Write>(out: &mut W, ms: u64) -> fmt::Result {
    // Numbers go through `write_u64`, not `write!`: the formatting
    // machinery cost ~1,000 instructions per value, and every response
    // renders one or more of these.
    if ms == 0 {
        return out.write_str("0s");
    }
    if ms < 1_000 {
        write_u64(out, ms)?;
        return out.write_str("ms");
    }
    let hours = ms / 3_600_000;
    let minutes = ms % 3_600_000 / 60_000;
    let secs = ms % 60_000 / 1_000;
    let frac = ms % 1_000;
    if hours > 0 {
        write_u64(out, hours)?;
        out.write_char('h')?;
    }
    if hours > 0 || minutes > 0 {
        write_u64(out, minutes)?;
        out.write_char('m')?;
    }
    write_u64(out, secs)?;
    if frac > 0 {
        // Three digits, trailing zeros trimmed: 500 -> ".5", 50 -> ".05".
        let digits = [frac / 100, frac / 10 % 10, frac % 10].map(|d| b'0' + d as u8);
        let n = if frac % 100 == 0 {
            1
        } else if frac % 10 == 0 {
            2
        } else {
            3
        };
        out.write_char('.')?;
        out.write_str(std::str::from_utf8(&digits[..n]).map_err(|_| fmt::Error)?)?;
    }
    out.write_char('s')
}

/// A decimal integer, rendered on the stack.
fn write_u64<W: fmt::Write>(out: &mut W, mut n: u64) -> fmt::Result {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.write_str(std::str::from_utf8(&buf[i..]).map_err(|_| fmt::Error)?)
}

/// Parse a duration in the format of [`format_duration_ms`] back into
/// milliseconds (also accepts what Go prints for whole milliseconds, e.g.
/// `1h0m0s`, and sums repeated components). Returns `None` for anything else,
/// including sub-millisecond precision or overflow. Handy for clients and
/// tests reading `x-ratelimit-reset-*`.
pub fn parse_duration_ms(s: &str) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let b = s.as_bytes();
    let mut i = 0;
    let mut total: u64 = 0;
    while i < b.len() {
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        let whole: u64 = s[start..i].parse().ok()?;
        // Fraction as thousandths (at most three digits: we only speak ms).
        let mut frac_ms: u64 = 0;
        let mut has_frac = false;
        if i < b.len() && b[i] == b'.' {
            has_frac = true;
            i += 1;
            let fs = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            let digits = &s[fs..i];
            if digits.is_empty() || digits.len() > 3 {
                return None;
            }
            frac_ms = digits.parse::<u64>().ok()? * 10u64.pow(3 - digits.len() as u32);
        }
        let rest = &s[i..];
        let (unit_ms, len) = if rest.starts_with("ms") {
            (1, 2)
        } else if rest.starts_with('s') {
            (1_000, 1)
        } else if rest.starts_with('m') {
            (60_000, 1)
        } else if rest.starts_with('h') {
            (3_600_000, 1)
        } else {
            return None;
        };
        i += len;
        // Fractions are only meaningful on seconds at millisecond precision.
        if has_frac && unit_ms != 1_000 {
            return None;
        }
        let part = whole.checked_mul(unit_ms)?.checked_add(frac_ms)?;
        total = total.checked_add(part)?;
    }
    Some(total)
}

/// A window length for messages, in the largest whole units that add up:
/// `30s`, `1m`, `1m30s`, `1h`, `1d`, `1d1h`. `0s` for zero.
pub fn format_period(secs: u64) -> String {
    if secs == 0 {
        return "0s".to_owned();
    }
    let mut s = String::with_capacity(8);
    let parts = [
        (secs / 86_400, 'd'),
        (secs % 86_400 / 3_600, 'h'),
        (secs % 3_600 / 60, 'm'),
        (secs % 60, 's'),
    ];
    for (n, unit) in parts {
        if n > 0 {
            let _ = write!(s, "{n}{unit}");
        }
    }
    s
}

/// A window's length for messages: a fixed window as [`format_period`]
/// (`1m`, `1d`), a calendar one by its period (`calendar month (UTC)`).
pub fn format_window(len: WindowLen) -> String {
    match len {
        WindowLen::Fixed(secs) => format_period(secs),
        WindowLen::Calendar(Period::MonthFrom(a)) => {
            format!("billing month (from day {a}, UTC)")
        }
        WindowLen::Calendar(p) => format!("calendar {} (UTC)", p.noun()),
    }
}

/// A fixed-capacity buffer that implements `fmt::Write`, so a header value
/// can be rendered without a temporary `String`.
struct StackBuf {
    buf: [u8; 48],
    len: usize,
}

impl StackBuf {
    fn new() -> Self {
        Self {
            buf: [0; 48],
            len: 0,
        }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl fmt::Write for StackBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len.checked_add(s.len()).ok_or(fmt::Error)?;
        let dst = self.buf.get_mut(self.len..end).ok_or(fmt::Error)?;
        dst.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::{ConcurrencyInfo, UnitInfo};
    use crate::plans::Unit;
    use proptest::prelude::*;

    #[test]
    fn durations_render_like_openai() {
        let cases: &[(u64, &str)] = &[
            (0, "0s"),
            (1, "1ms"),
            (20, "20ms"),
            (999, "999ms"),
            (1_000, "1s"),
            (1_500, "1.5s"),
            (1_050, "1.05s"),
            (1_005, "1.005s"),
            (12_000, "12s"),
            (59_999, "59.999s"),
            (60_000, "1m0s"),
            (360_000, "6m0s"),
            (360_500, "6m0.5s"),
            (3_599_999, "59m59.999s"),
            (3_600_000, "1h0m0s"),
            (3_723_000, "1h2m3s"),
            (86_400_000, "24h0m0s"),
            (u64::MAX, "5124095576030h25m51.615s"),
        ];
        for &(ms, want) in cases {
            assert_eq!(format_duration_ms(ms), want, "{ms} ms");
            assert_eq!(
                duration_value(ms).to_str().unwrap(),
                want,
                "{ms} ms as header"
            );
            assert_eq!(parse_duration_ms(want), Some(ms), "parse {want}");
        }
    }

    #[test]
    fn parse_rejects_garbage() {
        for bad in [
            "",
            "s",
            "1",
            "1.s",
            "1.5ms",
            "1.2345s",
            "1x",
            "-1s",
            "1.5m",
            "ms",
            "1s ",
            " 1s",
            "99999999999999999999h",
        ] {
            assert_eq!(parse_duration_ms(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn periods_render_compactly() {
        let cases: &[(u64, &str)] = &[
            (0, "0s"),
            (1, "1s"),
            (30, "30s"),
            (60, "1m"),
            (90, "1m30s"),
            (3_600, "1h"),
            (3_661, "1h1m1s"),
            (86_400, "1d"),
            (90_000, "1d1h"),
            (604_800, "7d"),
        ];
        for &(secs, want) in cases {
            assert_eq!(format_period(secs), want, "{secs} s");
        }
    }

    fn unit_info(unit: &str, limit: u64, remaining: u64, reset_ms: u64) -> UnitInfo {
        UnitInfo {
            unit: Unit::new(unit),
            limit,
            remaining,
            reset_ms,
            len: WindowLen::Fixed(60),
        }
    }

    fn get<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
        h.get(name).map(|v| v.to_str().unwrap())
    }

    #[test]
    fn renders_every_unit_and_concurrency() {
        let info = RateLimitInfo {
            units: vec![
                unit_info("request", 3, 2, 20),
                unit_info("token", 40_000, 39_990, 1_500),
                unit_info("gpu-second", 100, 0, 3_723_000),
                unit_info("gpu_second", 7, 7, 1_000),
                unit_info("image", 1, 1, 60_000),
            ],
            concurrent: Some(ConcurrencyInfo {
                limit: 4,
                remaining: 3,
            }),
            windows: vec![],
        };
        let h = rate_limit_headers(&info);
        let want = [
            ("x-ratelimit-limit-requests", "3"),
            ("x-ratelimit-remaining-requests", "2"),
            ("x-ratelimit-reset-requests", "20ms"),
            ("x-ratelimit-limit-tokens", "40000"),
            ("x-ratelimit-remaining-tokens", "39990"),
            ("x-ratelimit-reset-tokens", "1.5s"),
            ("x-ratelimit-limit-gpu-seconds", "100"),
            ("x-ratelimit-remaining-gpu-seconds", "0"),
            ("x-ratelimit-reset-gpu-seconds", "1h2m3s"),
            ("x-ratelimit-limit-gpu_seconds", "7"),
            ("x-ratelimit-reset-gpu_seconds", "1s"),
            ("x-ratelimit-limit-images", "1"),
            ("x-ratelimit-reset-images", "1m0s"),
            ("x-ratelimit-limit-concurrency", "4"),
            ("x-ratelimit-remaining-concurrency", "3"),
        ];
        for (name, value) in want {
            assert_eq!(get(&h, name), Some(value), "{name}");
        }
        assert_eq!(h.len(), 5 * 3 + 2);
    }

    #[test]
    fn no_concurrency_headers_without_a_limit_and_bad_units_are_skipped() {
        let info = RateLimitInfo {
            units: vec![
                unit_info("token", 10, 5, 1_000),
                unit_info("bad unit", 1, 1, 1),
                unit_info("ünit", 1, 1, 1),
            ],
            concurrent: None,
            windows: vec![],
        };
        let h = rate_limit_headers(&info);
        assert_eq!(h.len(), 3);
        assert!(h.get(LIMIT_CONCURRENCY).is_none());
    }

    #[test]
    fn insert_replaces_previous_values() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-ratelimit-remaining-tokens",
            HeaderValue::from_static("99"),
        );
        insert_rate_limit(
            &mut h,
            &RateLimitInfo {
                units: vec![unit_info("token", 10, 5, 1_000)],
                ..Default::default()
            },
        );
        assert_eq!(get(&h, "x-ratelimit-remaining-tokens"), Some("5"));
        assert_eq!(h.get_all("x-ratelimit-remaining-tokens").iter().count(), 1);
    }

    #[test]
    fn credits_and_degraded() {
        let mut h = HeaderMap::new();
        insert_credits_remaining(&mut h, 42);
        insert_degraded(&mut h);
        assert_eq!(get(&h, "x-credits-remaining"), Some("42"));
        assert_eq!(get(&h, "x-ratelimit-degraded"), Some("true"));
    }

    #[test]
    fn dynamic_names_match_static_ones() {
        for plural in ["requests", "tokens", "images"] {
            let fast = static_unit_names(plural).unwrap();
            let names = ["limit", "remaining", "reset"].map(|k| {
                HeaderName::from_bytes(format!("x-ratelimit-{k}-{plural}").as_bytes()).unwrap()
            });
            assert_eq!(fast, names);
        }
    }

    proptest! {
        #[test]
        fn duration_round_trips(ms in any::<u64>()) {
            let s = format_duration_ms(ms);
            prop_assert_eq!(parse_duration_ms(&s), Some(ms));
            let value = duration_value(ms);
            prop_assert_eq!(value.to_str().unwrap(), s.as_str());
        }

        #[test]
        fn small_durations_round_trip(ms in 0u64..10_000_000) {
            let s = format_duration_ms(ms);
            prop_assert_eq!(parse_duration_ms(&s), Some(ms));
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,24}") {
            let _ = parse_duration_ms(&s);
        }

        #[test]
        fn parse_never_panics_on_near_misses(s in "[0-9.hms]{0,16}") {
            if let Some(ms) = parse_duration_ms(&s) {
                // Whatever parses re-renders to something that parses the same.
                prop_assert_eq!(parse_duration_ms(&format_duration_ms(ms)), Some(ms));
            }
        }

        #[test]
        fn any_unit_name_renders_or_is_skipped(unit in "\\PC{1,20}", n in any::<u64>()) {
            let info = RateLimitInfo {
                units: vec![unit_info(&unit, n, n, n)],
                ..Default::default()
            };
            let h = rate_limit_headers(&info);
            prop_assert!(h.len() == 3 || h.is_empty());
        }
    }
}
