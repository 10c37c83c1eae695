//! Prometheus metrics, rendered as text on the admin listener's `/metrics`.
//!
//! No metrics crate: a handful of atomics and one label map. The hot path
//! takes a read lock on the label map (a write lock only the first time a
//! label set is seen) and does relaxed atomic adds.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::RwLock;

/// Distinct endpoint labels kept; beyond this, new endpoints are counted
/// under `endpoint="_other"`. Endpoint labels come from plans (the proxy
/// labels an endpoint no plan grants `_unknown`), so this only bounds a
/// catalog with very many endpoint ids.
const MAX_ENDPOINTS: usize = 1_000;

/// Longest endpoint label kept (plan endpoint ids are at most 200 bytes);
/// a longer one is counted as `_other`.
const MAX_LABEL_BYTES: usize = 200;

/// The decision under which [`Metrics::would_deny`] counts (rendered as
/// `plangate_would_deny_total`, not as a request).
const WOULD_DENY: &str = "would_deny";

/// Per endpoint label: (decision, status) → count.
type Decisions = HashMap<(&'static str, u16), AtomicU64>;

/// Upper bounds (seconds) of the admission latency histogram.
const LATENCY_BUCKETS: [f64; 12] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
];

/// The classes of the console's requests-per-minute chart, in the order
/// [`Metrics::minutes`] returns their counts.
pub const MINUTE_CLASSES: [&str; 6] = [
    "admitted",
    "degraded",
    "denied",
    "no_credits",
    "refused",
    "error",
];

/// Minutes of per-minute counts kept (one day).
const MINUTES: usize = 1440;

/// One minute of [`MINUTE_CLASSES`] counts; `minute` says which minute
/// (since the epoch, + 1 so that 0 means never used) the counts are of.
#[derive(Debug, Default)]
struct MinuteSlot {
    minute: AtomicU64,
    counts: [AtomicU64; MINUTE_CLASSES.len()],
}

/// The class of a decision on the per-minute chart.
fn minute_class(decision: &str, degraded: bool) -> usize {
    match decision {
        "admitted" if degraded => 1,
        "admitted" => 0,
        "denied" => 2,
        "no_credits" => 3,
        "store_error" | "upstream_error" | "upstream_timeout" | "internal_error" | "other" => 5,
        _ => 4,
    }
}

/// Every metric the gateway exports.
#[derive(Debug)]
pub struct Metrics {
    /// Looked up by `&str`: counting allocates only for a new label.
    requests: RwLock<HashMap<Box<str>, Decisions>>,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_ns: AtomicU64,
    store_errors: AtomicU64,
    in_flight: AtomicU64,
    credits_charged: AtomicU64,
    reload_failures: AtomicU64,
    /// `plangate_store_up` per external store label (`redis`, `postgres`),
    /// set by the store watch (`health.rs`); absent for in-process stores.
    stores_up: parking_lot::Mutex<Vec<(&'static str, bool)>>,
    /// The last day of requests per minute by [`MINUTE_CLASSES`] (the
    /// console's overview), a ring indexed by minute.
    minutes: Box<[MinuteSlot]>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: RwLock::default(),
            latency_buckets: Default::default(),
            latency_count: AtomicU64::default(),
            latency_sum_ns: AtomicU64::default(),
            store_errors: AtomicU64::default(),
            in_flight: AtomicU64::default(),
            credits_charged: AtomicU64::default(),
            reload_failures: AtomicU64::default(),
            stores_up: parking_lot::Mutex::default(),
            minutes: (0..MINUTES).map(|_| MinuteSlot::default()).collect(),
        }
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Count a response on the per-minute chart at `now_ms` (gateway
    /// clock). A slot reused for a new minute is zeroed by the first
    /// request of that minute; a request racing that reset may be lost,
    /// which a chart can afford (the counters above are exact).
    pub fn minute(&self, now_ms: u64, decision: &str, degraded: bool) {
        let minute = now_ms / 60_000;
        let slot = &self.minutes[(minute % MINUTES as u64) as usize];
        let tag = minute + 1;
        let seen = slot.minute.load(Ordering::Relaxed);
        if seen != tag
            && slot
                .minute
                .compare_exchange(seen, tag, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            for c in &slot.counts {
                c.store(0, Ordering::Relaxed);
            }
        }
        if slot.minute.load(Ordering::Relaxed) == tag {
            slot.counts[minute_class(decision, degraded)].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The `n` minutes up to and including `now_minute` (minutes since
    /// the epoch), oldest first, with their counts by [`MINUTE_CLASSES`]
    /// (zeros for a minute without requests; at most a day back).
    pub fn minutes(&self, now_minute: u64, n: usize) -> Vec<(u64, [u64; MINUTE_CLASSES.len()])> {
        let n = n.min(MINUTES) as u64;
        (0..n)
            .rev()
            .filter_map(|back| now_minute.checked_sub(back))
            .map(|minute| {
                let slot = &self.minutes[(minute % MINUTES as u64) as usize];
                let mut counts = [0; MINUTE_CLASSES.len()];
                if slot.minute.load(Ordering::Relaxed) == minute + 1 {
                    for (c, a) in counts.iter_mut().zip(&slot.counts) {
                        *c = a.load(Ordering::Relaxed);
                    }
                }
                (minute, counts)
            })
            .collect()
    }

    /// Count a finished routing decision: `decision` is one of `admitted`,
    /// `denied`, `no_access`, `no_credits`, `store_error`, `upstream_error`,
    /// `upstream_timeout`.
    pub fn request(&self, endpoint: &str, decision: &'static str, status: u16) {
        {
            let map = self.requests.read();
            if let Some(c) = map.get(endpoint).and_then(|d| d.get(&(decision, status))) {
                c.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        let mut map = self.requests.write();
        let label = if endpoint.len() > MAX_LABEL_BYTES
            || (!map.contains_key(endpoint) && map.len() >= MAX_ENDPOINTS)
        {
            "_other"
        } else {
            endpoint
        };
        if !map.contains_key(label) {
            map.insert(label.into(), Decisions::default());
        }
        if let Some(d) = map.get_mut(label) {
            d.entry((decision, status))
                .or_default()
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Count a request that shadow mode (`enforce: false`) admitted although
    /// its limits would have refused it (`plangate_would_deny_total`).
    pub fn would_deny(&self, endpoint: &str) {
        self.request(endpoint, WOULD_DENY, 0);
    }

    /// Record how long admission (key, plan, limiter) took.
    pub fn admission_latency(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_ns
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    pub fn store_error(&self) {
        self.store_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn credits_charged(&self, n: u64) {
        self.credits_charged.fetch_add(n, Ordering::Relaxed);
    }

    pub fn reload_failure(&self) {
        self.reload_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Record whether the external store `store` answered its last probe.
    pub fn set_store_up(&self, store: &'static str, up: bool) {
        let mut stores = self.stores_up.lock();
        match stores.iter_mut().find(|(s, _)| *s == store) {
            Some(entry) => entry.1 = up,
            None => stores.push((store, up)),
        }
    }

    /// Whether `store` answered its last probe (`None`: not watched).
    pub fn store_up(&self, store: &str) -> Option<bool> {
        self.stores_up
            .lock()
            .iter()
            .find(|(s, _)| *s == store)
            .map(|(_, up)| *up)
    }

    pub fn in_flight_inc(&self) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
    }

    pub fn in_flight_dec(&self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    /// Admitted requests not yet ended.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub fn reload_failures(&self) -> u64 {
        self.reload_failures.load(Ordering::Relaxed)
    }

    pub fn store_errors(&self) -> u64 {
        self.store_errors.load(Ordering::Relaxed)
    }

    /// Prometheus text exposition format (0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(2048);
        out.push_str(
            "# HELP plangate_requests_total Routed requests by endpoint, decision and status.\n",
        );
        out.push_str("# TYPE plangate_requests_total counter\n");
        let map = self.requests.read();
        let mut rows: Vec<_> = map
            .iter()
            .flat_map(|(endpoint, d)| {
                d.iter()
                    .map(move |((dec, st), c)| ((endpoint, *dec, *st), c))
            })
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        let (shadowed, rows): (Vec<_>, Vec<_>) = rows
            .into_iter()
            .partition(|((_, d, _), _)| *d == WOULD_DENY);
        for ((endpoint, decision, status), c) in rows {
            let _ = writeln!(
                out,
                "plangate_requests_total{{endpoint=\"{}\",decision=\"{decision}\",status=\"{status}\"}} {}",
                escape_label(endpoint),
                c.load(Ordering::Relaxed)
            );
        }
        if !shadowed.is_empty() {
            out.push_str("# HELP plangate_would_deny_total Requests admitted by shadow mode (enforce: false) that their limits would have refused, by endpoint.\n");
            out.push_str("# TYPE plangate_would_deny_total counter\n");
            for ((endpoint, _, _), c) in shadowed {
                let _ = writeln!(
                    out,
                    "plangate_would_deny_total{{endpoint=\"{}\"}} {}",
                    escape_label(endpoint),
                    c.load(Ordering::Relaxed)
                );
            }
        }
        drop(map);
        out.push_str(
            "# HELP plangate_admission_seconds Time from request to admission decision.\n",
        );
        out.push_str("# TYPE plangate_admission_seconds histogram\n");
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "plangate_admission_seconds_bucket{{le=\"{bound}\"}} {}",
                self.latency_buckets[i].load(Ordering::Relaxed)
            );
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "plangate_admission_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "plangate_admission_seconds_sum {}",
            self.latency_sum_ns.load(Ordering::Relaxed) as f64 / 1e9
        );
        let _ = writeln!(out, "plangate_admission_seconds_count {count}");
        let simple = [
            (
                "plangate_store_errors_total",
                "counter",
                "Counter store calls that failed or timed out.",
                &self.store_errors,
            ),
            (
                "plangate_in_flight_requests",
                "gauge",
                "Admitted requests not yet ended (held slots).",
                &self.in_flight,
            ),
            (
                "plangate_credits_charged_total",
                "counter",
                "Credits charged (admission and per unit).",
                &self.credits_charged,
            ),
            (
                "plangate_reload_failures_total",
                "counter",
                "Plans or config reloads rejected.",
                &self.reload_failures,
            ),
        ];
        for (name, kind, help, v) in simple {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let stores = self.stores_up.lock();
        if !stores.is_empty() {
            out.push_str(
                "# HELP plangate_store_up Whether an external store (redis: counters, postgres: catalog) answered its last probe.\n# TYPE plangate_store_up gauge\n",
            );
            for (store, up) in stores.iter() {
                let _ = writeln!(
                    out,
                    "plangate_store_up{{store=\"{store}\"}} {}",
                    u8::from(*up)
                );
            }
        }
        out
    }
}

/// Escape a label value (backslash, quote, newline).
fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histogram_and_gauges() {
        let m = Metrics::new();
        m.request("gpt-4o", "admitted", 200);
        m.request("gpt-4o", "admitted", 200);
        m.request("we\"ird", "denied", 429);
        m.admission_latency(Duration::from_micros(300));
        m.in_flight_inc();
        m.credits_charged(5);
        let text = m.render();
        assert!(text.contains(
            "plangate_requests_total{endpoint=\"gpt-4o\",decision=\"admitted\",status=\"200\"} 2"
        ));
        assert!(text.contains(
            "plangate_requests_total{endpoint=\"we\\\"ird\",decision=\"denied\",status=\"429\"} 1"
        ));
        assert!(text.contains("plangate_admission_seconds_bucket{le=\"0.00025\"} 0"));
        assert!(text.contains("plangate_admission_seconds_bucket{le=\"0.0005\"} 1"));
        assert!(text.contains("plangate_admission_seconds_count 1"));
        assert!(text.contains("plangate_in_flight_requests 1"));
        assert!(text.contains("plangate_credits_charged_total 5"));
        // Without external stores there is no store gauge.
        assert!(!text.contains("plangate_store_up"));
        m.set_store_up("redis", false);
        m.set_store_up("postgres", true);
        m.set_store_up("redis", false);
        let text = m.render();
        assert!(text.contains("# TYPE plangate_store_up gauge\n"));
        assert!(text.contains("plangate_store_up{store=\"redis\"} 0\n"));
        assert!(text.contains("plangate_store_up{store=\"postgres\"} 1\n"));
        assert_eq!(text.matches("plangate_store_up{").count(), 2);
        assert_eq!(m.store_up("redis"), Some(false));
        assert_eq!(m.store_up("memory"), None);
    }

    #[test]
    fn minutes_ring_counts_by_class_and_forgets_old_minutes() {
        let m = Metrics::new();
        let t = 1_799_920_820_000; // some minute
        let min = t / 60_000;
        m.minute(t, "admitted", false);
        m.minute(t + 1, "admitted", true);
        m.minute(t, "denied", false);
        m.minute(t, "no_access", false);
        m.minute(t + 60_000, "upstream_error", false);
        let got = m.minutes(min + 1, 3);
        assert_eq!(got[0], (min - 1, [0; 6]));
        assert_eq!(got[1], (min, [1, 1, 1, 0, 1, 0]));
        assert_eq!(got[2], (min + 1, [0, 0, 0, 0, 0, 1]));
        // A day later the slot is reused: the old minute reads as empty.
        let later = t + MINUTES as u64 * 60_000;
        m.minute(later, "no_credits", false);
        assert_eq!(m.minutes(min, 1)[0].1, [0; 6]);
        assert_eq!(m.minutes(later / 60_000, 1)[0].1, [0, 0, 0, 1, 0, 0]);
    }

    #[test]
    fn label_sets_are_bounded() {
        let m = Metrics::new();
        for i in 0..(MAX_ENDPOINTS + 50) {
            m.request(&format!("model-{i}"), "denied", 429);
        }
        assert!(m.requests.read().len() <= MAX_ENDPOINTS + 1);
        assert!(m.render().contains("endpoint=\"_other\""));
        // A label longer than any endpoint id is never kept.
        let long = "x".repeat(MAX_LABEL_BYTES + 1);
        let m = Metrics::new();
        m.request(&long, "denied", 429);
        assert!(!m.render().contains(&long));
        assert!(m.render().contains("endpoint=\"_other\""));
    }
}
