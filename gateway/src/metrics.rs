//! Prometheus counters, gauges and histograms, rendered as text (served on
//! the admin listener's `/metrics`).
//!
//! No metrics crate: a handful of atomics. Each metric is a [`Family`] of
//! series keyed by label values; the hot path takes a read lock, hashes the
//! label values (no allocation) and bumps an atomic. A series is created
//! once, under the write lock. Callers with fixed labels can keep the
//! `Arc` from [`Family::get`] and skip the lookup entirely.
//!
//! Cardinality is capped per family ([`DEFAULT_MAX_SERIES`]): label values
//! can come from request bodies (`{model}` routing), so past the cap new
//! label sets share one series whose labels are all `"_other"`.
//!
//! ```
//! use std::time::Duration;
//! use plangate::metrics::Metrics;
//! let m = Metrics::new();
//! m.requests.inc(&["gpt-4o", "allowed", "200"]);
//! m.admission_latency.observe(Duration::from_micros(300));
//! assert!(m.render().contains(r#"plangate_requests_total{endpoint="gpt-4o",decision="allowed",status="200"} 1"#));
//! ```

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;

/// Series per family before new label sets are folded into `"_other"`.
pub const DEFAULT_MAX_SERIES: usize = 10_000;

/// Label value of the overflow series.
pub const OTHER: &str = "_other";

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn dec(&self) {
        self.add(-1);
    }

    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds (seconds) of the admission-latency buckets: 50µs to 1s,
/// where a store round trip (in-process ≈ µs, Redis ≈ 100µs–ms, timeout 50ms)
/// lands.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0,
];

/// A histogram over [`LATENCY_BUCKETS`], observed in durations.
#[derive(Debug)]
pub struct Histogram {
    /// Per bucket (not cumulative), plus one for `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_nanos: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&le| secs <= le)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// How a metric kind renders its samples.
pub trait Metric: Default + Send + Sync + 'static {
    /// `counter`, `gauge` or `histogram`.
    const TYPE: &'static str;
    /// Append this series' sample lines; `labels` is the rendered
    /// `k="v",...` list (possibly empty).
    fn render(&self, name: &str, labels: &str, out: &mut String);
}

impl Metric for Counter {
    const TYPE: &'static str = "counter";
    fn render(&self, name: &str, labels: &str, out: &mut String) {
        let _ = writeln!(out, "{name}{} {}", braces(labels), self.get());
    }
}

impl Metric for Gauge {
    const TYPE: &'static str = "gauge";
    fn render(&self, name: &str, labels: &str, out: &mut String) {
        let _ = writeln!(out, "{name}{} {}", braces(labels), self.get());
    }
}

impl Metric for Histogram {
    const TYPE: &'static str = "histogram";
    fn render(&self, name: &str, labels: &str, out: &mut String) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0u64;
        for (i, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = match LATENCY_BUCKETS.get(i) {
                Some(le) => le.to_string(),
                None => "+Inf".to_owned(),
            };
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(out, "{name}_count{} {}", braces(labels), self.count());
    }
}

fn braces(labels: &str) -> String {
    if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    }
}

type Series<M> = (Box<[String]>, Arc<M>);

/// One metric name with any number of label sets.
pub struct Family<M> {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    /// Hash of the label values → the series with that hash.
    series: RwLock<HashMap<u64, Vec<Series<M>>>>,
    len: AtomicUsize,
    max_series: usize,
    hasher: std::collections::hash_map::RandomState,
}

impl<M> std::fmt::Debug for Family<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Family")
            .field("name", &self.name)
            .field("series", &self.len.load(Ordering::Relaxed))
            .finish()
    }
}

impl<M: Metric> Family<M> {
    /// A family named `name` (e.g. `plangate_requests_total`) with these
    /// label names, in the order values are given.
    pub fn new(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Self {
        Self {
            name,
            help,
            labels,
            series: RwLock::new(HashMap::new()),
            len: AtomicUsize::new(0),
            max_series: DEFAULT_MAX_SERIES,
            hasher: Default::default(),
        }
    }

    /// Change the cardinality cap.
    pub fn with_max_series(mut self, max: usize) -> Self {
        self.max_series = max.max(1);
        self
    }

    fn hash(&self, values: &[&str]) -> u64 {
        let mut h = self.hasher.build_hasher();
        for i in 0..self.labels.len() {
            values.get(i).copied().unwrap_or("").hash(&mut h);
        }
        h.finish()
    }

    fn matches(stored: &[String], values: &[&str]) -> bool {
        stored
            .iter()
            .enumerate()
            .all(|(i, s)| s == values.get(i).copied().unwrap_or(""))
    }

    /// The series for `values` (one per label name; missing values are
    /// empty, extra ones ignored), created on first use.
    pub fn get(&self, values: &[&str]) -> Arc<M> {
        let hash = self.hash(values);
        if let Some(m) = self.find(hash, values) {
            return m;
        }
        if self.len.load(Ordering::Relaxed) >= self.max_series {
            let other = vec![OTHER; self.labels.len()];
            let hash = self.hash(&other);
            return self
                .find(hash, &other)
                .unwrap_or_else(|| self.insert(hash, &other));
        }
        self.insert(hash, values)
    }

    /// Run `f` on the series for `values` without cloning its `Arc` when
    /// it exists (the hot path).
    pub fn with<R>(&self, values: &[&str], f: impl FnOnce(&M) -> R) -> R {
        let hash = self.hash(values);
        {
            let map = self.series.read();
            if let Some(bucket) = map.get(&hash) {
                if let Some((_, m)) = bucket.iter().find(|(k, _)| Self::matches(k, values)) {
                    return f(m);
                }
            }
        }
        f(&self.get(values))
    }

    fn find(&self, hash: u64, values: &[&str]) -> Option<Arc<M>> {
        let map = self.series.read();
        map.get(&hash)?
            .iter()
            .find(|(k, _)| Self::matches(k, values))
            .map(|(_, m)| m.clone())
    }

    fn insert(&self, hash: u64, values: &[&str]) -> Arc<M> {
        let mut map = self.series.write();
        let bucket = map.entry(hash).or_default();
        // Another thread may have created it between our read and write.
        if let Some((_, m)) = bucket.iter().find(|(k, _)| Self::matches(k, values)) {
            return m.clone();
        }
        let key: Box<[String]> = (0..self.labels.len())
            .map(|i| values.get(i).copied().unwrap_or("").to_owned())
            .collect();
        let m = Arc::new(M::default());
        bucket.push((key, m.clone()));
        self.len.fetch_add(1, Ordering::Relaxed);
        m
    }

    /// Append `# HELP`, `# TYPE` and every series, sorted by labels.
    pub fn render_into(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} {}", self.name, M::TYPE);
        let mut rows: Vec<(String, Arc<M>)> = {
            let map = self.series.read();
            map.values()
                .flatten()
                .map(|(k, m)| (self.label_text(k), m.clone()))
                .collect()
        };
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        for (labels, m) in rows {
            m.render(self.name, &labels, out);
        }
    }

    fn label_text(&self, values: &[String]) -> String {
        let mut s = String::new();
        for (i, (name, value)) in self.labels.iter().zip(values).enumerate() {
            if i > 0 {
                s.push(',');
            }
            let _ = write!(s, "{name}=\"");
            escape_label(value, &mut s);
            s.push('"');
        }
        s
    }
}

impl Family<Counter> {
    /// Add one to the series for `values`.
    pub fn inc(&self, values: &[&str]) {
        self.with(values, Counter::inc);
    }

    /// Add `n` to the series for `values`.
    pub fn add(&self, values: &[&str], n: u64) {
        self.with(values, |c| c.add(n));
    }
}

impl Family<Gauge> {
    /// Add `n` (may be negative) to the series for `values`.
    pub fn add(&self, values: &[&str], n: i64) {
        self.with(values, |g| g.add(n));
    }
}

impl Family<Histogram> {
    /// Record one duration in the series for `values`.
    pub fn observe_with(&self, values: &[&str], d: Duration) {
        self.with(values, |h| h.observe(d));
    }
}

/// Prometheus label value escaping: backslash, double quote, newline.
fn escape_label(v: &str, out: &mut String) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Every metric the gateway exports. Share one behind an `Arc`.
#[derive(Debug)]
pub struct Metrics {
    /// `plangate_requests_total{endpoint,decision,status}`: decision is e.g.
    /// `allowed`, `rate_limited`, `too_large`, `concurrency`, `no_access`,
    /// `insufficient_quota`, `unauthenticated`, `degraded`, `error`.
    pub requests: Family<Counter>,
    /// `plangate_store_errors_total{store,op}`: store `counter` or
    /// `catalog`, op `attempt`, `end`, `renew`, `deduct`, ...
    pub store_errors: Family<Counter>,
    /// `plangate_in_flight{endpoint}`: admitted requests not yet ended.
    pub in_flight: Family<Gauge>,
    /// `plangate_credits_charged_total{endpoint}`.
    pub credits_charged: Family<Counter>,
    /// `plangate_reload_failures_total{source}`: source `plans` or `routes`.
    pub reload_failures: Family<Counter>,
    /// `plangate_upstream_errors_total{kind}`: kind `unavailable`,
    /// `timeout`, `status_5xx`, `stream_broken`.
    pub upstream_errors: Family<Counter>,
    /// `plangate_admission_duration_seconds`: time from request to admission
    /// decision (key lookup, plan, limiter, credits).
    pub admission_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self {
            requests: Family::new(
                "plangate_requests_total",
                "Requests handled, by endpoint, admission decision and response status.",
                &["endpoint", "decision", "status"],
            ),
            store_errors: Family::new(
                "plangate_store_errors_total",
                "Failed or timed-out store calls, by store and operation.",
                &["store", "op"],
            ),
            in_flight: Family::new(
                "plangate_in_flight",
                "Admitted requests not yet ended (held concurrency slots), by endpoint.",
                &["endpoint"],
            ),
            credits_charged: Family::new(
                "plangate_credits_charged_total",
                "Credits deducted, by endpoint.",
                &["endpoint"],
            ),
            reload_failures: Family::new(
                "plangate_reload_failures_total",
                "Rejected reloads (invalid files; the old version stays in force).",
                &["source"],
            ),
            upstream_errors: Family::new(
                "plangate_upstream_errors_total",
                "Upstream failures, by kind.",
                &["kind"],
            ),
            admission_latency: Histogram::default(),
        }
    }

    /// The Prometheus text exposition (format 0.0.4) of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        self.requests.render_into(&mut out);
        self.store_errors.render_into(&mut out);
        self.in_flight.render_into(&mut out);
        self.credits_charged.render_into(&mut out);
        self.reload_failures.render_into(&mut out);
        self.upstream_errors.render_into(&mut out);
        let name = "plangate_admission_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time from request to admission decision."
        );
        let _ = writeln!(out, "# TYPE {name} histogram");
        self.admission_latency.render(name, "", &mut out);
        out
    }
}

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_labels_sorted() {
        let m = Metrics::new();
        m.requests.inc(&["gpt-4o", "allowed", "200"]);
        m.requests.inc(&["gpt-4o", "allowed", "200"]);
        m.requests.inc(&["dall-e-3", "rate_limited", "429"]);
        m.in_flight.add(&["gpt-4o"], 3);
        m.in_flight.add(&["gpt-4o"], -1);
        m.credits_charged.add(&["gpt-4o"], 40);
        m.reload_failures.inc(&["plans"]);
        m.store_errors.inc(&["counter", "attempt"]);
        let text = m.render();
        let expected = "\
# HELP plangate_requests_total Requests handled, by endpoint, admission decision and response status.
# TYPE plangate_requests_total counter
plangate_requests_total{endpoint=\"dall-e-3\",decision=\"rate_limited\",status=\"429\"} 1
plangate_requests_total{endpoint=\"gpt-4o\",decision=\"allowed\",status=\"200\"} 2
# HELP plangate_store_errors_total Failed or timed-out store calls, by store and operation.
# TYPE plangate_store_errors_total counter
plangate_store_errors_total{store=\"counter\",op=\"attempt\"} 1
# HELP plangate_in_flight Admitted requests not yet ended (held concurrency slots), by endpoint.
# TYPE plangate_in_flight gauge
plangate_in_flight{endpoint=\"gpt-4o\"} 2
# HELP plangate_credits_charged_total Credits deducted, by endpoint.
# TYPE plangate_credits_charged_total counter
plangate_credits_charged_total{endpoint=\"gpt-4o\"} 40
# HELP plangate_reload_failures_total Rejected reloads (invalid files; the old version stays in force).
# TYPE plangate_reload_failures_total counter
plangate_reload_failures_total{source=\"plans\"} 1
# HELP plangate_upstream_errors_total Upstream failures, by kind.
# TYPE plangate_upstream_errors_total counter
";
        assert!(text.starts_with(expected), "{text}");
    }

    #[test]
    fn histogram_is_cumulative_with_sum_and_count() {
        let m = Metrics::new();
        m.admission_latency.observe(Duration::from_micros(40)); // <= 50µs
        m.admission_latency.observe(Duration::from_micros(300)); // <= 0.5ms
        m.admission_latency.observe(Duration::from_millis(2)); // <= 2.5ms
        m.admission_latency.observe(Duration::from_secs(3)); // +Inf
        let text = m.render();
        let tail = text
            .split("# TYPE plangate_admission_duration_seconds histogram\n")
            .nth(1)
            .unwrap();
        let expected = "\
plangate_admission_duration_seconds_bucket{le=\"0.00005\"} 1
plangate_admission_duration_seconds_bucket{le=\"0.0001\"} 1
plangate_admission_duration_seconds_bucket{le=\"0.00025\"} 1
plangate_admission_duration_seconds_bucket{le=\"0.0005\"} 2
plangate_admission_duration_seconds_bucket{le=\"0.001\"} 2
plangate_admission_duration_seconds_bucket{le=\"0.0025\"} 3
plangate_admission_duration_seconds_bucket{le=\"0.005\"} 3
plangate_admission_duration_seconds_bucket{le=\"0.01\"} 3
plangate_admission_duration_seconds_bucket{le=\"0.025\"} 3
plangate_admission_duration_seconds_bucket{le=\"0.05\"} 3
plangate_admission_duration_seconds_bucket{le=\"0.1\"} 3
plangate_admission_duration_seconds_bucket{le=\"0.25\"} 3
plangate_admission_duration_seconds_bucket{le=\"0.5\"} 3
plangate_admission_duration_seconds_bucket{le=\"1\"} 3
plangate_admission_duration_seconds_bucket{le=\"+Inf\"} 4
plangate_admission_duration_seconds_sum 3.00234
plangate_admission_duration_seconds_count 4
";
        assert_eq!(tail, expected);
    }

    #[test]
    fn labelled_histograms_put_le_last() {
        let f: Family<Histogram> = Family::new("h", "help", &["op"]);
        f.observe_with(&["attempt"], Duration::from_millis(1));
        let mut out = String::new();
        f.render_into(&mut out);
        assert!(
            out.contains("h_bucket{op=\"attempt\",le=\"0.001\"} 1\n"),
            "{out}"
        );
        assert!(out.contains("h_count{op=\"attempt\"} 1\n"), "{out}");
    }

    #[test]
    fn label_values_are_escaped() {
        let f: Family<Counter> = Family::new("c", "help", &["endpoint"]);
        f.inc(&["a\"b\\c\nd"]);
        let mut out = String::new();
        f.render_into(&mut out);
        assert!(
            out.ends_with("c{endpoint=\"a\\\"b\\\\c\\nd\"} 1\n"),
            "{out}"
        );
    }

    #[test]
    fn wrong_number_of_values_does_not_panic() {
        let f: Family<Counter> = Family::new("c", "help", &["a", "b"]);
        f.inc(&["x"]);
        f.inc(&["x", ""]);
        f.inc(&["x", "", "extra"]);
        let mut out = String::new();
        f.render_into(&mut out);
        assert!(out.ends_with("c{a=\"x\",b=\"\"} 3\n"), "{out}");
    }

    #[test]
    fn cardinality_is_capped() {
        let f: Family<Counter> = Family::new("c", "help", &["endpoint"]).with_max_series(3);
        for i in 0..10 {
            f.inc(&[&format!("model-{i}")]);
        }
        // Known series keep counting past the cap.
        f.inc(&["model-0"]);
        let mut out = String::new();
        f.render_into(&mut out);
        assert!(out.contains("c{endpoint=\"model-0\"} 2\n"), "{out}");
        assert!(out.contains("c{endpoint=\"model-1\"} 1\n"), "{out}");
        assert!(out.contains("c{endpoint=\"_other\"} 7\n"), "{out}");
        assert!(!out.contains("model-5"), "{out}");
    }

    #[test]
    fn concurrent_increments_are_not_lost() {
        let m = Arc::new(Metrics::new());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for i in 0..1_000 {
                        let endpoint = format!("e{}", i % 7);
                        m.requests.inc(&[&endpoint, "allowed", "200"]);
                        m.in_flight
                            .add(&[&endpoint], if t % 2 == 0 { 1 } else { -1 });
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let total: u64 = (0..7)
            .map(|i| m.requests.get(&[&format!("e{i}"), "allowed", "200"]).get())
            .sum();
        assert_eq!(total, 4_000);
        let gauge: i64 = (0..7)
            .map(|i| m.in_flight.get(&[&format!("e{i}")]).get())
            .sum();
        assert_eq!(gauge, 0);
    }
}
