//! The counter-store conformance suite: one set of test functions, generic
//! over the store, run against the in-process store and against real Redis
//! in both connection modes. A behaviour difference is a bug.
//!
//! Time is a `ManualClock`; nothing sleeps to wait out a window. The
//! limiter's lease keeper has no background task here: tests run its passes
//! (`Limiter::renew_due`) themselves, after moving the clock. On Redis,
//! every test uses its own key prefix, checks that a denied attempt left
//! the raw keys untouched, and at the end that none of its keys lacks a TTL.

use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use plangate::clock::{window_index, window_reset_ms, ManualClock};
use plangate::limiter::keys::Keys;
use plangate::limiter::memory::MemoryStore;
use plangate::limiter::redis::{RedisMode, RedisOptions, RedisStore};
use plangate::limiter::{
    Attempt, AttemptRequest, CounterStore, Denial, EndRequest, KeyScope, Limiter, Permit,
    RateLimitInfo, RenewRequest, UsageRequest, Verdict, WindowSpec, SETTLE_GRACE_MS,
};
use plangate::plans::{Period, Policy, Unit, Window, WindowLen};
use redis::aio::MultiplexedConnection;

const MINUTE: u64 = 60_000;
const DAY: u64 = 86_400_000;
/// 2025-03-14 12:34:17.250 UTC: inside a minute, 42.75 s before its end.
const T0: u64 = 20_161 * DAY + (12 * 3600 + 34 * 60) * 1000 + 17_250;

fn minute_end(t: u64) -> u64 {
    (t / MINUTE + 1) * MINUTE
}

fn policy(windows: &[(u64, u64, &str)], max_concurrent: u32, expiry_secs: u64) -> Arc<Policy> {
    Arc::new(Policy {
        windows: windows
            .iter()
            .map(|&(window_secs, limit, unit)| Window {
                len: WindowLen::Fixed(window_secs),
                limit,
                unit: Unit::new(unit),
            })
            .collect(),
        max_concurrent,
        concurrency_expiry_secs: expiry_secs,
        credits: None,
        enforce: true,
        key: None,
    })
}

/// A policy of windows of any length.
fn len_policy(windows: &[(WindowLen, u64, &str)]) -> Arc<Policy> {
    Arc::new(Policy {
        windows: windows
            .iter()
            .map(|&(len, limit, unit)| Window {
                len,
                limit,
                unit: Unit::new(unit),
            })
            .collect(),
        max_concurrent: 0,
        concurrency_expiry_secs: 60,
        credits: None,
        enforce: true,
        key: None,
    })
}

const MONTH: WindowLen = WindowLen::Calendar(Period::Month);
const WEEK: WindowLen = WindowLen::Calendar(Period::Week);
const CAL_DAY: WindowLen = WindowLen::Calendar(Period::Day);

/// `y-m-d h:mi:s` UTC in ms.
fn utc(y: u64, m: u64, d: u64, h: u64, mi: u64, s: u64) -> u64 {
    plangate::clock::days_from_civil(y, m, d) * DAY + ((h * 60 + mi) * 60 + s) * 1000
}

/// The free tier of ORIGINAL.md: 3 requests/min, 200 requests/day, 40k
/// tokens/min.
fn free_plan() -> Arc<Policy> {
    policy(
        &[
            (60, 3, "request"),
            (86_400, 200, "request"),
            (60, 40_000, "token"),
        ],
        0,
        60,
    )
}

fn tokens(n: u64) -> Vec<(Unit, u64)> {
    vec![(Unit::new("token"), n)]
}

fn unique(tag: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{tag}-{}-{nanos}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

/// Raw access to Redis for checks the store API cannot make.
#[derive(Clone)]
struct Raw {
    conn: MultiplexedConnection,
    keys: Keys,
}

/// One key's raw state: its value (a string, or a zset's members and
/// scores) and its remaining TTL.
#[derive(Debug, Clone, PartialEq)]
struct RawKey {
    key: String,
    value: Vec<String>,
    pttl: i64,
}

impl Raw {
    async fn key_state(&self, key: &str) -> RawKey {
        let mut c = self.conn.clone();
        let kind: String = redis::cmd("TYPE")
            .arg(key)
            .query_async(&mut c)
            .await
            .expect("TYPE");
        let value: Vec<String> = match kind.as_str() {
            "none" => vec![],
            "string" => vec![redis::cmd("GET")
                .arg(key)
                .query_async(&mut c)
                .await
                .expect("GET")],
            "zset" => redis::cmd("ZRANGE")
                .arg(key)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .query_async(&mut c)
                .await
                .expect("ZRANGE"),
            other => panic!("unexpected type {other} of {key}"),
        };
        let pttl: i64 = redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut c)
            .await
            .expect("PTTL");
        RawKey {
            key: key.to_owned(),
            value,
            pttl,
        }
    }

    /// Every key an attempt of `policy` at `now_ms` could touch.
    async fn snapshot(
        &self,
        account: &str,
        endpoint: &str,
        policy: &Policy,
        now_ms: u64,
    ) -> Vec<RawKey> {
        let mut keys = vec![self.keys.in_flight(account, endpoint)];
        let scope = plangate::limiter::key_scope(policy);
        for (i, w) in policy.windows.iter().enumerate() {
            keys.push(self.keys.scoped_window(
                account,
                KeyScope::of(scope, policy.windows.len(), i),
                endpoint,
                w.len,
                w.unit.as_str(),
                w.len.index(now_ms),
            ));
        }
        let mut out = Vec::new();
        for k in keys {
            out.push(self.key_state(&k).await);
        }
        out
    }

    /// Every key under this test's prefix has a TTL; then delete them.
    async fn assert_ttls_and_clean(&self) {
        let keys = self.all_keys().await;
        let mut c = self.conn.clone();
        for k in &keys {
            let pttl: i64 = redis::cmd("PTTL")
                .arg(k)
                .query_async(&mut c)
                .await
                .expect("PTTL");
            assert_ne!(pttl, -1, "{k} has no TTL");
        }
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL")
                .arg(&keys)
                .query_async(&mut c)
                .await
                .expect("DEL");
        }
    }

    async fn all_keys(&self) -> Vec<String> {
        let mut c = self.conn.clone();
        let mut cursor = 0u64;
        let mut out = Vec::new();
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(self.keys.scan_pattern())
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut c)
                .await
                .expect("SCAN");
            out.extend(batch);
            if next == 0 {
                return out;
            }
            cursor = next;
        }
    }
}

/// A store under test, the clock it runs on, and (Redis) raw access.
struct Harness<S: CounterStore> {
    limiter: Arc<Limiter<S>>,
    clock: ManualClock,
    raw: Option<Raw>,
    /// Unique per test, so concurrent test runs never share counters.
    account: String,
}

impl<S: CounterStore + Debug> Harness<S> {
    fn new(store: S, raw: Option<Raw>) -> Self {
        let clock = ManualClock::new(T0);
        // No keeper task: its passes run when a test says so.
        let limiter = Limiter::with_keeper_interval(
            store,
            Arc::new(clock.clone()),
            Duration::from_secs(5),
            None,
        );
        Harness {
            limiter,
            clock,
            raw,
            account: unique("acct"),
        }
    }

    fn store(&self) -> &S {
        self.limiter.store()
    }

    fn now(&self) -> u64 {
        use plangate::clock::Clock;
        self.clock.now_ms()
    }

    async fn attempt(
        &self,
        id: &str,
        endpoint: &str,
        policy: &Arc<Policy>,
        start: &[(Unit, u64)],
    ) -> Attempt<S> {
        self.limiter
            .attempt(id, &self.account, endpoint, policy, start)
            .await
            .expect("attempt")
    }

    /// Attempt, expecting admission.
    async fn admit(
        &self,
        id: &str,
        endpoint: &str,
        policy: &Arc<Policy>,
        start: &[(Unit, u64)],
    ) -> (Permit<S>, RateLimitInfo) {
        match self.attempt(id, endpoint, policy, start).await {
            Attempt::Admitted(p, info) => (p, info),
            Attempt::Denied(d, _) => panic!("{id} denied: {d:?}"),
        }
    }

    /// Attempt, expecting a denial that changes nothing: neither the usage
    /// the store reports nor (Redis) any raw key, value or TTL.
    async fn deny(
        &self,
        id: &str,
        endpoint: &str,
        policy: &Arc<Policy>,
        start: &[(Unit, u64)],
    ) -> (Denial, RateLimitInfo) {
        let now = self.now();
        let usage_before = self.usage(endpoint, policy).await;
        let raw_before = match &self.raw {
            Some(r) => r.snapshot(&self.account, endpoint, policy, now).await,
            None => vec![],
        };
        let out = match self.attempt(id, endpoint, policy, start).await {
            Attempt::Denied(d, info) => (d, info),
            Attempt::Admitted(..) => panic!("{id} admitted, expected a denial"),
        };
        assert_eq!(
            self.usage(endpoint, policy).await,
            usage_before,
            "denial changed usage"
        );
        if let Some(r) = &self.raw {
            let after = r.snapshot(&self.account, endpoint, policy, now).await;
            for (b, a) in raw_before.iter().zip(&after) {
                assert_eq!(a.value, b.value, "denial changed {}", a.key);
                assert_eq!(
                    a.pttl < 0,
                    b.pttl < 0,
                    "denial created or dropped {}",
                    a.key
                );
                assert!(a.pttl <= b.pttl, "denial refreshed the TTL of {}", a.key);
            }
        }
        out
    }

    async fn usage(&self, endpoint: &str, policy: &Policy) -> (Vec<u64>, u32) {
        let u = self
            .store()
            .usage(&UsageRequest {
                account: &self.account,
                endpoint,
                now_ms: self.now(),
                windows: &policy.windows,
                key: plangate::limiter::key_scope(policy),
            })
            .await
            .expect("usage");
        (u.used, u.in_flight)
    }

    async fn info(&self, endpoint: &str, policy: &Policy) -> RateLimitInfo {
        self.limiter
            .info(&self.account, endpoint, policy)
            .await
            .expect("info")
    }

    /// Redis: no key of this test lacks a TTL; then clean up.
    async fn finish(self) {
        if let Some(raw) = &self.raw {
            raw.assert_ttls_and_clean().await;
        }
    }
}

fn memory_harness() -> Harness<MemoryStore> {
    Harness::new(MemoryStore::new(), None)
}

async fn redis_options(mode: RedisMode) -> Option<(String, RedisOptions)> {
    let url = plangate_tests::redis().await?;
    let options = RedisOptions {
        mode,
        key_prefix: format!("pgt:{}:", unique("lim")),
        // This machine is shared and often loaded: a slow reply is not
        // what these tests are about.
        response_timeout: Duration::from_secs(5),
        ..RedisOptions::default()
    };
    Some((url, options))
}

async fn redis_harness(mode: RedisMode) -> Option<Harness<RedisStore>> {
    let (url, options) = redis_options(mode).await?;
    let store = RedisStore::connect_with(&url, options)
        .await
        .expect("redis store");
    let conn = redis::Client::open(url.as_str())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("raw redis connection");
    let raw = Raw {
        conn,
        keys: store.keys().clone(),
    };
    Some(Harness::new(store, Some(raw)))
}

/// Run each named test function against every backend.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $name() {
                    let h = super::memory_harness();
                    super::$name(&h).await;
                    h.finish().await;
                }
            )*
        }
        mod redis_multiplexed {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let mode = plangate::limiter::redis::RedisMode::Multiplexed;
                    let Some(h) = super::redis_harness(mode).await else { return };
                    super::$name(&h).await;
                    h.finish().await;
                }
            )*
        }
        mod redis_pooled {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let mode = plangate::limiter::redis::RedisMode::Pooled { max_size: 8 };
                    let Some(h) = super::redis_harness(mode).await else { return };
                    super::$name(&h).await;
                    h.finish().await;
                }
            )*
        }
    };
}

conformance!(
    free_plan_fourth_request_in_a_minute_is_denied,
    day_window_is_aligned_to_utc_midnight,
    exhausted_token_window_blocks_zero_start_tokens,
    start_amount_over_a_limit_is_too_large,
    end_is_idempotent_and_unknown_ids_are_harmless,
    final_units_are_added_past_the_limit,
    reservations_are_settled,
    concurrency_slots_count_release_and_expire,
    in_flight_id_is_a_duplicate,
    renew_keeps_a_slot_alive,
    info_picks_the_most_constraining_window,
    plan_change_keeps_counts_of_windows_that_stay,
    dropped_permit_releases_its_slot,
    usage_writes_nothing,
    expired_request_is_still_settled_once,
    keeper_keeps_a_live_permits_slot,
    keeper_stops_with_the_permit,
    shadow_mode_counts_and_reports_but_refuses_nothing,
    reset_windows_clears_the_current_windows_of_one_endpoint,
    month_window_resets_on_the_first_after_a_leap_february,
    month_window_settles_across_the_month_end,
    short_months_and_the_year_end_reset_on_the_first,
    week_window_resets_on_monday,
    calendar_and_fixed_days_keep_separate_counters,
    billing_month_runs_anchor_to_anchor_clamped_in_short_months,
    key_window_refuses_while_the_account_has_room,
    account_window_refuses_while_the_key_has_room,
    two_keys_are_apart_at_key_level_and_shared_at_account_level,
    key_windows_settle_with_the_account_windows,
    shadowed_key_plan_counts_but_refuses_nothing,
    reset_clears_a_keys_own_windows_apart_from_the_accounts,
);

// --- Key-level limits (issue 15 item 3): a key's own plan adds windows
// counted per key, admitted with the account's in one store operation.

/// The account's policy as key `key` with a plan of `key_windows` sees it.
fn keyed(account: &Arc<Policy>, key: &str, key_windows: &[(u64, u64, &str)]) -> Arc<Policy> {
    Arc::new(account.with_key(key, &policy(key_windows, 0, 60)))
}

async fn key_window_refuses_while_the_account_has_room<S: CounterStore + Debug>(h: &Harness<S>) {
    let account = policy(&[(60, 10, "request")], 0, 60);
    let k = keyed(&account, "key_ci", &[(60, 2, "request")]);
    for i in 0..2 {
        let (permit, info) = h.admit(&format!("k{i}"), "chat", &k, &[]).await;
        // The tightest window is reported: the key's.
        let req = info.unit("request").expect("request info");
        assert_eq!((req.limit, req.remaining), (2, 1 - i));
        assert!(info.windows[1].key && !info.windows[0].key);
        permit.end(&[]).await.expect("end");
    }
    let (denial, info) = h.deny("k2", "chat", &k, &[]).await;
    assert!(
        matches!(&denial, Denial::Window { window, used: 2, .. } if window.limit == 2),
        "{denial:?}"
    );
    // Nothing moved: the account's counter kept its 2, the key's its 2.
    assert_eq!(
        (info.windows[0].used, info.windows[1].used),
        (2, 2),
        "{info:?}"
    );
    assert_eq!(h.usage("chat", &account).await.0, vec![2]);
    // The account still has room for its other keys and for keyless calls.
    let (permit, info) = h.admit("plain", "chat", &account, &[]).await;
    assert_eq!(info.windows[0].used, 3);
    permit.end(&[]).await.expect("end");
}

async fn account_window_refuses_while_the_key_has_room<S: CounterStore + Debug>(h: &Harness<S>) {
    let account = policy(&[(60, 2, "request")], 0, 60);
    let k = keyed(
        &account,
        "key_big",
        &[(60, 100, "request"), (86_400, 1000, "request")],
    );
    for i in 0..2 {
        let (permit, _) = h.admit(&format!("a{i}"), "chat", &k, &[]).await;
        permit.end(&[]).await.expect("end");
    }
    let (denial, info) = h.deny("a2", "chat", &k, &[]).await;
    assert!(
        matches!(&denial, Denial::Window { window, used: 2, .. } if window.limit == 2),
        "{denial:?}"
    );
    assert_eq!(
        info.windows.iter().map(|w| w.used).collect::<Vec<_>>(),
        vec![2, 2, 2]
    );
    // The key's own counters did not move on the refusal either.
    assert_eq!(h.usage("chat", &k).await.0, vec![2, 2, 2]);
}

async fn two_keys_are_apart_at_key_level_and_shared_at_account_level<S: CounterStore + Debug>(
    h: &Harness<S>,
) {
    let account = policy(&[(60, 5, "request")], 0, 60);
    let a = keyed(&account, "key_a", &[(60, 2, "request")]);
    let b = keyed(&account, "key_b", &[(60, 2, "request")]);
    for i in 0..2 {
        h.admit(&format!("a{i}"), "chat", &a, &[])
            .await
            .0
            .end(&[])
            .await
            .expect("end");
    }
    h.deny("a2", "chat", &a, &[]).await;
    // Key b has its own 2, and the account its 5 in all.
    for i in 0..2 {
        let (permit, info) = h.admit(&format!("b{i}"), "chat", &b, &[]).await;
        assert_eq!((info.windows[0].used, info.windows[1].used), (3 + i, 1 + i));
        permit.end(&[]).await.expect("end");
    }
    h.deny("b2", "chat", &b, &[]).await;
    // A third key without a plan takes the account's last request...
    h.admit("c0", "chat", &account, &[])
        .await
        .0
        .end(&[])
        .await
        .expect("end");
    // ... after which a fresh key with room is refused by the account.
    let c = keyed(&account, "key_c", &[(60, 2, "request")]);
    let (denial, info) = h.deny("c1", "chat", &c, &[]).await;
    assert!(
        matches!(&denial, Denial::Window { window, .. } if window.limit == 5),
        "{denial:?}"
    );
    assert_eq!((info.windows[0].used, info.windows[1].used), (5, 0));
    // The next minute both keys start again.
    h.clock.set_ms(minute_end(T0));
    h.admit("a3", "chat", &a, &[])
        .await
        .0
        .end(&[])
        .await
        .expect("end");
}

async fn key_windows_settle_with_the_account_windows<S: CounterStore + Debug>(h: &Harness<S>) {
    let account = policy(&[(60, 10_000, "token")], 0, 60);
    let k = keyed(
        &account,
        "key_t",
        &[(60, 1_000, "token"), (60, 5, "request")],
    );
    // Reserve 300, use 120: both token windows give 180 back.
    let (permit, _) = h.admit("t0", "chat", &k, &tokens(300)).await;
    assert_eq!(h.usage("chat", &k).await.0, vec![300, 300, 1]);
    permit.end(&tokens(120)).await.expect("end");
    assert_eq!(h.usage("chat", &k).await.0, vec![120, 120, 1]);
    // Reserve 100, use 950: both add 850; the key's window is now over.
    let (permit, _) = h.admit("t1", "chat", &k, &tokens(100)).await;
    permit.end(&tokens(950)).await.expect("end");
    assert_eq!(h.usage("chat", &k).await.0, vec![1_070, 1_070, 2]);
    let (denial, _) = h.deny("t2", "chat", &k, &tokens(1)).await;
    assert!(
        matches!(&denial, Denial::Window { window, .. } if window.limit == 1_000),
        "{denial:?}"
    );
    // The account's window alone still admits.
    h.admit("t3", "chat", &account, &tokens(1))
        .await
        .0
        .end(&tokens(1))
        .await
        .expect("end");
}

/// `limits reset` of a key's own windows clears them only; the account's
/// reset leaves the key's alone.
async fn reset_clears_a_keys_own_windows_apart_from_the_accounts<S: CounterStore + Debug>(
    h: &Harness<S>,
) {
    let account = policy(&[(60, 10, "request")], 0, 60);
    let k = keyed(&account, "key_r", &[(60, 2, "request")]);
    let own = policy(&[(60, 2, "request")], 0, 60);
    for i in 0..2 {
        h.admit(&format!("r{i}"), "chat", &k, &[])
            .await
            .0
            .end(&[])
            .await
            .expect("end");
    }
    h.deny("r2", "chat", &k, &[]).await;
    h.store()
        .reset_windows(&h.account, None, "chat", &account.windows, h.now())
        .await
        .expect("reset");
    assert_eq!(h.usage("chat", &k).await.0, vec![0, 2]);
    h.deny("r3", "chat", &k, &[]).await;
    h.store()
        .reset_windows(&h.account, Some("key_r"), "chat", &own.windows, h.now())
        .await
        .expect("reset");
    assert_eq!(h.usage("chat", &k).await.0, vec![0, 0]);
    let (permit, info) = h.admit("r4", "chat", &k, &[]).await;
    assert_eq!((info.windows[0].used, info.windows[1].used), (1, 1));
    permit.end(&[]).await.expect("end");
}

async fn shadowed_key_plan_counts_but_refuses_nothing<S: CounterStore + Debug>(h: &Harness<S>) {
    let account = policy(&[(60, 3, "request")], 0, 60);
    let mut shadow = (*policy(&[(60, 1, "request")], 0, 60)).clone();
    shadow.enforce = false;
    let k = Arc::new(account.with_key("key_s", &shadow));
    let (permit, _) = h.admit("s0", "chat", &k, &[]).await;
    assert!(permit.would_deny().is_none());
    permit.end(&[]).await.expect("end");
    // Over the key's (shadowed) limit: admitted, with what it would deny.
    let (permit, info) = h.admit("s1", "chat", &k, &[]).await;
    assert!(
        matches!(permit.would_deny(), Some(Denial::Window { window, .. }) if window.limit == 1),
        "{:?}",
        permit.would_deny()
    );
    assert_eq!((info.windows[0].used, info.windows[1].used), (2, 2));
    permit.end(&[]).await.expect("end");
    // The account's (enforced) window still refuses.
    h.admit("s2", "chat", &k, &[])
        .await
        .0
        .end(&[])
        .await
        .expect("end");
    let (denial, _) = h.deny("s3", "chat", &k, &[]).await;
    assert!(
        matches!(&denial, Denial::Window { window, .. } if window.limit == 3),
        "{denial:?}"
    );
}

/// `limits reset`: the current windows of (account, endpoint) count from
/// zero again; another endpoint's counters and the concurrency slots of
/// live requests are untouched.
async fn reset_windows_clears_the_current_windows_of_one_endpoint<S: CounterStore + Debug>(
    h: &Harness<S>,
) {
    let p = free_plan();
    let live = policy(&[(60, 100, "request")], 1, 30);
    let mut permits = Vec::new();
    for i in 0..3 {
        let (permit, _) = h.admit(&format!("r{i}"), "gpt-4-turbo", &p, &[]).await;
        permit.end(&tokens(10)).await.expect("end");
        let (permit, _) = h.admit(&format!("o{i}"), "other", &p, &[]).await;
        permits.push(permit);
    }
    for p in permits {
        p.end(&[]).await.expect("end");
    }
    let (_slot, _) = h.admit("slot", "live", &live, &[]).await;
    h.deny("r3", "gpt-4-turbo", &p, &[]).await;

    h.store()
        .reset_windows(&h.account, None, "gpt-4-turbo", &p.windows, h.now())
        .await
        .expect("reset");
    h.store()
        .reset_windows(&h.account, None, "live", &live.windows, h.now())
        .await
        .expect("reset");
    assert_eq!(h.usage("gpt-4-turbo", &p).await, (vec![0, 0, 0], 0));
    assert_eq!(h.usage("other", &p).await.0, vec![3, 3, 0]);
    // The live request keeps its slot: a second one is still refused.
    assert_eq!(h.usage("live", &live).await, (vec![0], 1));
    h.deny("slot2", "live", &live, &[]).await;
    let (permit, info) = h.admit("r4", "gpt-4-turbo", &p, &[]).await;
    assert_eq!(info.windows[0].used, 1);
    permit.end(&[]).await.expect("end");
}

/// A billing month from the 31st (an account's `billing_anchor`): Jan 31
/// to Feb 28 in 2027, Feb 28 to Mar 31; Jan 31 to Feb 29 in 2028. The
/// resets reported are those ends; its counter is not the calendar
/// month's.
async fn billing_month_runs_anchor_to_anchor_clamped_in_short_months<S: CounterStore + Debug>(
    h: &Harness<S>,
) {
    let from_31 = WindowLen::Calendar(Period::MonthFrom(31));
    let p = len_policy(&[(from_31, 2, "request")]);
    // (when, the period's end)
    let cases = [
        (utc(2027, 2, 27, 12, 0, 0), utc(2027, 2, 28, 0, 0, 0)),
        (utc(2027, 3, 30, 23, 0, 0), utc(2027, 3, 31, 0, 0, 0)),
        (utc(2028, 2, 28, 23, 59, 59), utc(2028, 2, 29, 0, 0, 0)),
    ];
    for (i, (t, end)) in cases.into_iter().enumerate() {
        let endpoint = format!("b{i}");
        h.clock.set_ms(t);
        for n in 0..2 {
            let (permit, info) = h.admit(&format!("r{n}"), &endpoint, &p, &[]).await;
            assert_eq!(info.windows[0].reset_ms, end - t, "case {i}");
            permit.end(&[]).await.expect("end");
        }
        let (denial, _) = h.deny("r2", &endpoint, &p, &[]).await;
        assert!(
            matches!(denial, Denial::Window { reset_ms, .. } if reset_ms == end - t),
            "case {i}: {denial:?}"
        );
        // The calendar month is another counter.
        assert_eq!(
            h.usage(&endpoint, &len_policy(&[(MONTH, 2, "request")]))
                .await
                .0,
            vec![0]
        );
        h.clock.set_ms(end);
        let (permit, _) = h.admit("r3", &endpoint, &p, &[]).await;
        permit.end(&[]).await.expect("end");
    }
    // From Feb 28, 2027 the next period ends on Mar 31 (31 days).
    h.clock.set_ms(utc(2027, 2, 28, 0, 0, 0));
    let info = h.info("b0", &p).await;
    assert_eq!(
        (info.windows[0].used, info.windows[0].reset_ms),
        (1, 31 * DAY)
    );
}

/// A monthly token quota: full on Feb 29 2028 (a leap year) until the last
/// moment, reset at 00:00 UTC on March 1st; the reset reported is the real
/// month end (seconds away, then 31 days).
async fn month_window_resets_on_the_first_after_a_leap_february<S: CounterStore + Debug>(
    h: &Harness<S>,
) {
    let p = len_policy(&[(MONTH, 1_000, "token")]);
    // Feb 1st: the month is 29 days long.
    h.clock.set_ms(utc(2028, 2, 1, 0, 0, 0));
    let (permit, info) = h.admit("a", "e", &p, &tokens(300)).await;
    assert_eq!(info.windows[0].reset_ms, 29 * DAY);
    permit.end(&tokens(400)).await.expect("end");
    // Feb 29, 23:59:58: 400 used, 600 left; 2 s to the month end.
    h.clock.set_ms(utc(2028, 2, 29, 23, 59, 58));
    let (permit, info) = h.admit("b", "e", &p, &tokens(600)).await;
    let tok = info.unit("token").expect("token info");
    assert_eq!((tok.len, tok.remaining, tok.reset_ms), (MONTH, 0, 2_000));
    permit.end(&tokens(600)).await.expect("end");
    let (denial, info) = h.deny("c", "e", &p, &tokens(1)).await;
    assert_eq!(
        denial,
        Denial::Window {
            window: p.windows[0].clone(),
            used: 1_000,
            requested: 1,
            reset_ms: 2_000,
        }
    );
    assert_eq!(info.windows[0].reset_ms, 2_000);
    // The last millisecond of February is still February.
    h.clock.set_ms(utc(2028, 3, 1, 0, 0, 0) - 1);
    h.deny("c", "e", &p, &tokens(1)).await;
    // March 1st 00:00 UTC: a new month of 31 days.
    h.clock.set_ms(utc(2028, 3, 1, 0, 0, 0));
    let (permit, info) = h.admit("d", "e", &p, &tokens(1_000)).await;
    assert_eq!(
        (info.windows[0].used, info.windows[0].reset_ms),
        (1_000, 31 * DAY)
    );
    permit.end(&tokens(1_000)).await.expect("end");
}

/// A request admitted in one month and ended in the next: an excess lands
/// in the new month, a give-back goes to the old one (SPEC §4 End).
async fn month_window_settles_across_the_month_end<S: CounterStore + Debug>(h: &Harness<S>) {
    let p = len_policy(&[(MONTH, 10_000, "token")]);
    h.clock.set_ms(utc(2027, 1, 31, 23, 59, 0));
    let (over, _) = h.admit("over", "e", &p, &tokens(100)).await;
    let (under, _) = h.admit("under", "e", &p, &tokens(500)).await;
    assert_eq!(h.usage("e", &p).await.0, vec![600]);
    h.clock.set_ms(utc(2027, 2, 1, 0, 0, 30));
    assert_eq!(h.usage("e", &p).await.0, vec![0], "a new month");
    over.end(&tokens(250)).await.expect("end");
    under.end(&tokens(200)).await.expect("end");
    // February: only the excess of `over`; `under`'s give-back went to
    // January (gone), not taken from February.
    assert_eq!(h.usage("e", &p).await.0, vec![150]);
}

/// 28-day and 30-day months, and a December, each reset on the 1st.
async fn short_months_and_the_year_end_reset_on_the_first<S: CounterStore + Debug>(h: &Harness<S>) {
    let p = len_policy(&[(MONTH, 2, "request")]);
    // (a moment in the month, its next 1st); the next months (March, May,
    // January) have 31 days.
    let cases = [
        (utc(2027, 2, 14, 10, 0, 0), utc(2027, 3, 1, 0, 0, 0)),
        (utc(2027, 4, 30, 23, 0, 0), utc(2027, 5, 1, 0, 0, 0)),
        (utc(2026, 12, 31, 23, 59, 59), utc(2027, 1, 1, 0, 0, 0)),
    ];
    for (i, (t, next)) in cases.into_iter().enumerate() {
        let endpoint = format!("m{i}");
        h.clock.set_ms(t);
        for n in 0..2 {
            let (permit, _) = h.admit(&format!("r{n}"), &endpoint, &p, &[]).await;
            permit.end(&[]).await.expect("end");
        }
        let (denial, _) = h.deny("r2", &endpoint, &p, &[]).await;
        assert!(
            matches!(denial, Denial::Window { reset_ms, .. } if reset_ms == next - t),
            "case {i}: {denial:?}"
        );
        h.clock.set_ms(next);
        let (permit, info) = h.admit("r3", &endpoint, &p, &[]).await;
        assert_eq!(
            (info.windows[0].used, info.windows[0].reset_ms),
            (1, 31 * DAY),
            "case {i}"
        );
        permit.end(&[]).await.expect("end");
    }
}

/// A weekly quota runs Monday 00:00 UTC to Monday: Sunday night is the old
/// week, Monday the new one.
async fn week_window_resets_on_monday<S: CounterStore + Debug>(h: &Harness<S>) {
    let p = len_policy(&[(WEEK, 2, "request")]);
    // Monday 2026-11-30 and Sunday 2026-12-06, 23:59:59.
    for (i, t) in [utc(2026, 11, 30, 0, 0, 0), utc(2026, 12, 6, 23, 59, 59)]
        .into_iter()
        .enumerate()
    {
        h.clock.set_ms(t);
        let (permit, _) = h.admit(&format!("w{i}"), "e", &p, &[]).await;
        permit.end(&[]).await.expect("end");
    }
    let (denial, info) = h.deny("w2", "e", &p, &[]).await;
    assert!(
        matches!(
            denial,
            Denial::Window {
                reset_ms: 1_000,
                used: 2,
                ..
            }
        ),
        "{denial:?}"
    );
    assert_eq!(info.unit("request").map(|u| u.reset_ms), Some(1_000));
    h.clock.set_ms(utc(2026, 12, 7, 0, 0, 0));
    let (permit, info) = h.admit("w3", "e", &p, &[]).await;
    assert_eq!(
        (info.windows[0].used, info.windows[0].reset_ms),
        (1, 7 * DAY)
    );
    permit.end(&[]).await.expect("end");
}

/// `window: 1d, calendar: utc` and `window: 1d` have the same boundaries
/// but their own counters (their keys differ), so switching a plan from
/// one to the other starts afresh rather than reading the other's count.
async fn calendar_and_fixed_days_keep_separate_counters<S: CounterStore + Debug>(h: &Harness<S>) {
    let calendar = len_policy(&[(CAL_DAY, 5, "request")]);
    let fixed = len_policy(&[(WindowLen::Fixed(86_400), 5, "request")]);
    for i in 0..2 {
        let (permit, _) = h.admit(&format!("c{i}"), "e", &calendar, &[]).await;
        permit.end(&[]).await.expect("end");
    }
    let (permit, _) = h.admit("f", "e", &fixed, &[]).await;
    permit.end(&[]).await.expect("end");
    assert_eq!(h.usage("e", &calendar).await.0, vec![2]);
    assert_eq!(h.usage("e", &fixed).await.0, vec![1]);
    let info = h.info("e", &calendar).await;
    assert_eq!(info.windows[0].reset_ms, (T0 / DAY + 1) * DAY - T0);
}

async fn free_plan_fourth_request_in_a_minute_is_denied<S: CounterStore + Debug>(h: &Harness<S>) {
    let p = free_plan();
    for i in 0..3 {
        let (permit, info) = h.admit(&format!("r{i}"), "gpt-4-turbo", &p, &[]).await;
        assert_eq!(info.unit("request").map(|u| u.remaining), Some(2 - i));
        permit.end(&tokens(10)).await.expect("end");
    }
    let (denial, info) = h.deny("r3", "gpt-4-turbo", &p, &[]).await;
    let reset = minute_end(T0) - T0;
    assert_eq!(
        denial,
        Denial::Window {
            window: p.windows[0].clone(),
            used: 3,
            requested: 1,
            reset_ms: reset,
        }
    );
    assert_eq!(reset, 42_750);
    let req = info.unit("request").expect("request info");
    assert_eq!(
        (req.len, req.limit, req.remaining, req.reset_ms),
        (WindowLen::Fixed(60), 3, 0, reset)
    );
    let tok = info.unit("token").expect("token info");
    assert_eq!((tok.limit, tok.remaining), (40_000, 39_970));

    // The next minute admits again; the day window keeps counting.
    h.clock.set_ms(minute_end(T0));
    let (permit, info) = h.admit("r4", "gpt-4-turbo", &p, &[]).await;
    assert_eq!(info.windows[0].used, 1);
    assert_eq!(info.windows[1].used, 4, "day window");
    assert_eq!(info.windows[2].used, 0, "new token minute");
    permit.end(&[]).await.expect("end");
}

async fn day_window_is_aligned_to_utc_midnight<S: CounterStore + Debug>(h: &Harness<S>) {
    let p = policy(&[(86_400, 3, "request")], 0, 60);
    let midnight = (T0 / DAY + 1) * DAY;
    for (i, t) in [T0, T0 + 3_600_000, midnight - 2_000]
        .into_iter()
        .enumerate()
    {
        h.clock.set_ms(t);
        let (permit, _) = h.admit(&format!("d{i}"), "e", &p, &[]).await;
        permit.end(&[]).await.expect("end");
    }
    let (denial, info) = h.deny("d3", "e", &p, &[]).await;
    assert!(
        matches!(
            denial,
            Denial::Window {
                reset_ms: 2_000,
                used: 3,
                ..
            }
        ),
        "{denial:?}"
    );
    assert_eq!(info.unit("request").map(|u| u.reset_ms), Some(2_000));
    h.clock.set_ms(midnight);
    let (_permit, info) = h.admit("d4", "e", &p, &[]).await;
    let day = info.unit("request").expect("request info");
    assert_eq!((day.remaining, day.reset_ms), (2, DAY));
}

async fn exhausted_token_window_blocks_zero_start_tokens<S: CounterStore + Debug>(h: &Harness<S>) {
    let p = free_plan();
    let (permit, info) = h.admit("t1", "e", &p, &tokens(40_000)).await;
    assert_eq!(info.unit("token").map(|u| u.remaining), Some(0));
    permit.end(&tokens(40_000)).await.expect("end");
    let (denial, info) = h.deny("t2", "e", &p, &[]).await;
    assert_eq!(
        denial,
        Denial::Window {
            window: p.windows[2].clone(),
            used: 40_000,
            requested: 0,
            reset_ms: minute_end(T0) - T0,
        }
    );
    assert_eq!(info.unit("request").map(|u| u.remaining), Some(2));
}

async fn start_amount_over_a_limit_is_too_large<S: CounterStore + Debug>(h: &Harness<S>) {
    let p = free_plan();
    let (permit, _) = h.admit("a", "e", &p, &tokens(100)).await;
    permit.end(&tokens(100)).await.expect("end");
    let (denial, info) = h.deny("b", "e", &p, &tokens(40_001)).await;
    assert_eq!(
        denial,
        Denial::TooLarge {
            window: p.windows[2].clone(),
            requested: 40_001,
        }
    );
    // The info still reflects the account's real standing.
    assert_eq!(info.unit("token").map(|u| u.remaining), Some(39_900));
    assert_eq!(info.unit("request").map(|u| u.remaining), Some(2));
    // Exactly the limit fits.
    let _c = h.admit("c", "e", &p, &tokens(39_900)).await;
}

async fn end_is_idempotent_and_unknown_ids_are_harmless<S: CounterStore + Debug>(h: &Harness<S>) {
    let p = policy(&[(60, 10, "request"), (60, 1_000, "token")], 2, 60);
    let (permit, _) = h.admit("a", "e", &p, &tokens(100)).await;
    let ticket = permit.into_ticket();
    assert!(h.limiter.end(&ticket, &tokens(300)).await.expect("end"));
    let after_first = h.usage("e", &p).await;
    assert_eq!(after_first, (vec![1, 300], 0));
    assert!(!h
        .limiter
        .end(&ticket, &tokens(900))
        .await
        .expect("second end"));
    assert_eq!(h.usage("e", &p).await, after_first);

    let settle = ticket.settlements(&tokens(0));
    let ended = h
        .store()
        .end(&EndRequest {
            request_id: "never-admitted",
            account: &h.account,
            endpoint: "e",
            now_ms: h.now(),
            settlements: &settle,
            credits: Default::default(),
            usage: None,
            key: None,
            admission: None,
        })
        .await
        .expect("end unknown");
    assert!(!ended);
    assert_eq!(h.usage("e", &p).await, after_first);
}

async fn final_units_are_added_past_the_limit<S: CounterStore + Debug>(h: &Harness<S>) {
    let p = policy(&[(60, 100, "token")], 0, 60);
    let (permit, _) = h.admit("a", "e", &p, &[]).await;
    assert!(permit.end(&tokens(250)).await.expect("end"));
    assert_eq!(h.usage("e", &p).await.0, vec![250]);
    let info = h.info("e", &p).await;
    assert_eq!(info.unit("token").map(|u| u.remaining), Some(0));
    let (denial, _) = h.deny("b", "e", &p, &[]).await;
    assert!(
        matches!(denial, Denial::Window { used: 250, .. }),
        "{denial:?}"
    );
}

async fn reservations_are_settled<S: CounterStore + Debug>(h: &Harness<S>) {
    let p = policy(&[(60, 1_000, "token")], 0, 60);
    let next_minute = minute_end(T0) + 1_000;
    // (reserved, actual, ended at, used after the end in the window
    // current at the end, admission window's raw value on Redis)
    let cases: [(u64, u64, u64, u64, &str); 6] = [
        (100, 150, T0, 150, "150"),
        (100, 40, T0, 40, "40"),
        (100, 0, T0, 0, "0"),
        (100, 100, T0, 100, "100"),
        // Ended in the next minute: the excess lands in the window current
        // at the end; a give-back goes to the admission window (never
        // below 0) and never touches the new one.
        (100, 150, next_minute, 50, "100"),
        (100, 0, next_minute, 0, "0"),
    ];
    for (i, (reserved, actual, end_at, want_used, want_raw)) in cases.into_iter().enumerate() {
        let endpoint = format!("case{i}");
        h.clock.set_ms(T0);
        let (permit, _) = h.admit("r", &endpoint, &p, &tokens(reserved)).await;
        assert_eq!(h.usage(&endpoint, &p).await.0, vec![reserved], "case {i}");
        h.clock.set_ms(end_at);
        assert!(permit.end(&tokens(actual)).await.expect("end"), "case {i}");
        assert_eq!(h.usage(&endpoint, &p).await.0, vec![want_used], "case {i}");
        if let Some(raw) = &h.raw {
            let key = raw.keys.window(
                &h.account,
                &endpoint,
                WindowLen::Fixed(60),
                "token",
                window_index(T0, 60),
            );
            let state = raw.key_state(&key).await;
            assert_eq!(state.value, vec![want_raw.to_owned()], "case {i}: {key}");
        }
    }
    // Never below 0, even when the counter lost units behind the store's
    // back (Redis eviction, an operator's edit): simulated on the raw key.
    if let Some(raw) = &h.raw {
        h.clock.set_ms(T0);
        let (permit, _) = h.admit("r", "floor", &p, &tokens(100)).await;
        let key = raw.keys.window(
            &h.account,
            "floor",
            WindowLen::Fixed(60),
            "token",
            window_index(T0, 60),
        );
        let mut c = raw.conn.clone();
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg(30)
            .arg("KEEPTTL")
            .query_async(&mut c)
            .await
            .expect("SET");
        permit.end(&tokens(0)).await.expect("end");
        assert_eq!(raw.key_state(&key).await.value, vec!["0".to_owned()]);
    }
    // Give-back with other traffic in the window: only this request's own
    // unused reservation goes back.
    h.clock.set_ms(T0);
    let (a, _) = h.admit("a", "mixed", &p, &tokens(300)).await;
    let (b, _) = h.admit("b", "mixed", &p, &tokens(200)).await;
    b.end(&tokens(250)).await.expect("end b");
    a.end(&tokens(10)).await.expect("end a");
    assert_eq!(h.usage("mixed", &p).await.0, vec![260]);
}

async fn concurrency_slots_count_release_and_expire<S: CounterStore + Debug>(h: &Harness<S>) {
    let p = policy(&[(60, 100, "request")], 2, 30);
    let (a, info) = h.admit("a", "e", &p, &[]).await;
    assert_eq!(info.concurrent.map(|c| c.remaining), Some(1));
    let (_b, info) = h.admit("b", "e", &p, &[]).await;
    assert_eq!(info.concurrent.map(|c| c.remaining), Some(0));
    let (denial, info) = h.deny("c", "e", &p, &[]).await;
    assert_eq!(denial, Denial::Concurrency { limit: 2 });
    assert_eq!(
        info.concurrent.map(|c| (c.limit, c.remaining)),
        Some((2, 0))
    );
    assert!(a.end(&[]).await.expect("end"));
    let (c, _) = h.admit("c", "e", &p, &[]).await;
    assert_eq!(h.usage("e", &p).await, (vec![3], 2));

    // b and c are never ended: their slots expire after 30 s.
    h.clock.advance(Duration::from_millis(29_999));
    h.deny("d", "e", &p, &[]).await;
    h.clock.advance(Duration::from_millis(1));
    assert_eq!(h.usage("e", &p).await.1, 0);
    let (_d, _) = h.admit("d", "e", &p, &[]).await;
    let (_e, _) = h.admit("e", "e", &p, &[]).await;
    // An expired request's permit ending late is not in flight any more
    // (its end still settles it, and frees no slot of d's or e's).
    assert!(c.end(&[]).await.expect("late end"));
    assert_eq!(h.usage("e", &p).await.1, 2);
}

async fn in_flight_id_is_a_duplicate<S: CounterStore + Debug>(h: &Harness<S>) {
    let p = policy(&[(60, 100, "request")], 0, 60);
    let (x, _) = h.admit("x", "e", &p, &[]).await;
    let (denial, _) = h.deny("x", "e", &p, &[]).await;
    assert_eq!(denial, Denial::Duplicate);
    // The same id on another endpoint is another request.
    let _other = h.admit("x", "other", &p, &[]).await;
    x.end(&[]).await.expect("end");
    let _again = h.admit("x", "e", &p, &[]).await;
    assert_eq!(h.usage("e", &p).await.0, vec![2]);
}

async fn renew_keeps_a_slot_alive<S: CounterStore + Debug>(h: &Harness<S>) {
    let p = policy(&[(3_600, 100, "request")], 1, 10);
    let (a, _) = h.admit("a", "e", &p, &[]).await;
    h.clock.advance(Duration::from_secs(8));
    assert!(a.renew().await.expect("renew"));
    h.clock.advance(Duration::from_secs(8));
    // 16 s after admission, past the 10 s expiry: the renewal kept it.
    let (denial, _) = h.deny("b", "e", &p, &[]).await;
    assert_eq!(denial, Denial::Concurrency { limit: 1 });
    h.clock.advance(Duration::from_secs(2));
    let _b = h.admit("b", "e", &p, &[]).await;
    assert!(
        !a.renew().await.expect("renew expired"),
        "a's lease ran out"
    );
    let renewed = h
        .store()
        .renew(&RenewRequest {
            request_id: "unknown",
            account: &h.account,
            endpoint: "e",
            now_ms: h.now(),
            lease_ms: 10_000,
        })
        .await
        .expect("renew unknown");
    assert!(!renewed);
}

async fn info_picks_the_most_constraining_window<S: CounterStore + Debug>(h: &Harness<S>) {
    // (windows, requests admitted first, expected (window_secs, remaining))
    type Case<'a> = (&'a [(u64, u64, &'a str)], u64, (u64, u64));
    let cases: [Case; 4] = [
        (&[(60, 3, "request"), (86_400, 200, "request")], 1, (60, 2)),
        (
            &[(60, 10, "request"), (86_400, 5, "request")],
            1,
            (86_400, 4),
        ),
        // A tie on remaining goes to the later reset.
        (&[(60, 3, "request"), (3_600, 3, "request")], 1, (3_600, 2)),
        (&[(3_600, 3, "request"), (60, 3, "request")], 0, (3_600, 3)),
    ];
    for (i, (windows, admitted, (want_secs, want_remaining))) in cases.into_iter().enumerate() {
        let endpoint = format!("case{i}");
        let p = policy(windows, 0, 60);
        for n in 0..admitted {
            let (permit, _) = h.admit(&format!("r{n}"), &endpoint, &p, &[]).await;
            permit.end(&[]).await.expect("end");
        }
        let info = h.info(&endpoint, &p).await;
        let u = info.unit("request").expect("request info");
        assert_eq!(
            (u.len, u.remaining),
            (WindowLen::Fixed(want_secs), want_remaining),
            "case {i}"
        );
        assert_eq!(u.reset_ms, window_reset_ms(h.now(), want_secs), "case {i}");
        assert_eq!(info.windows.len(), windows.len());
    }
}

async fn plan_change_keeps_counts_of_windows_that_stay<S: CounterStore + Debug>(h: &Harness<S>) {
    let old = policy(&[(60, 10, "request")], 0, 60);
    for i in 0..3 {
        let (permit, _) = h.admit(&format!("o{i}"), "e", &old, &[]).await;
        permit.end(&[]).await.expect("end");
    }
    let new = policy(&[(3_600, 100, "request"), (60, 5, "request")], 2, 30);
    let info = h.info("e", &new).await;
    assert_eq!(
        info.windows.iter().map(|w| w.used).collect::<Vec<_>>(),
        vec![0, 3]
    );
    let _n1 = h.admit("n1", "e", &new, &[]).await;
    let _n2 = h.admit("n2", "e", &new, &[]).await;
    let (denial, _) = h.deny("n3", "e", &new, &[]).await;
    assert!(
        matches!(&denial, Denial::Window { window, used: 5, .. } if window.len == WindowLen::Fixed(60)),
        "{denial:?}"
    );
}

async fn dropped_permit_releases_its_slot<S: CounterStore + Debug>(h: &Harness<S>) {
    let p = policy(&[(60, 100, "request")], 1, 600);
    let (permit, _) = h.admit("a", "e", &p, &[]).await;
    drop(permit);
    // The release runs in a spawned task: wait for it, bounded.
    let mut released = false;
    for _ in 0..500 {
        if h.usage("e", &p).await.1 == 0 {
            released = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(released, "the dropped permit's slot was not released");
    let _b = h.admit("b", "e", &p, &[]).await;
}

async fn usage_writes_nothing<S: CounterStore + Debug>(h: &Harness<S>) {
    let p = free_plan();
    let info = h.info("fresh", &p).await;
    assert_eq!(info.unit("request").map(|u| u.remaining), Some(3));
    assert_eq!(h.usage("fresh", &p).await, (vec![0, 0, 0], 0));
    if let Some(raw) = &h.raw {
        assert!(raw.all_keys().await.is_empty(), "usage created keys");
    }
}

/// A request whose lease expired (no keeper pass ran: a store outage, a
/// stalled gateway) is out of flight, but its end still settles its units,
/// once; only after the settle grace is its record gone.
async fn expired_request_is_still_settled_once<S: CounterStore + Debug>(h: &Harness<S>) {
    let p = policy(&[(86_400, 1_000_000, "token")], 0, 10);
    let (a, _) = h.admit("a", "e", &p, &tokens(300)).await;
    let a = a.into_ticket();
    h.clock.advance(Duration::from_secs(10));
    assert_eq!(h.usage("e", &p).await, (vec![300], 0), "a's lease ran out");
    // A give-back to the admission window.
    assert!(h.limiter.end(&a, &tokens(50)).await.expect("end a"));
    assert_eq!(h.usage("e", &p).await, (vec![50], 0));
    assert!(!h.limiter.end(&a, &tokens(900)).await.expect("end a again"));
    assert_eq!(h.usage("e", &p).await, (vec![50], 0), "settled once");

    // Units past the reservation, ended long after the lease.
    let (b, _) = h.admit("b", "e", &p, &[]).await;
    h.clock.advance(Duration::from_secs(25));
    assert!(b.end(&tokens(500)).await.expect("end b"));
    assert_eq!(h.usage("e", &p).await, (vec![550], 0));

    // At the end of the grace the record is gone: nothing is settled.
    let (c, _) = h.admit("c", "e", &p, &tokens(100)).await;
    h.clock
        .advance(Duration::from_millis(10_000 + SETTLE_GRACE_MS - 1));
    let c = c.into_ticket();
    let (d, _) = h.admit("d", "e", &p, &tokens(100)).await;
    h.clock.advance(Duration::from_millis(1));
    assert!(!h.limiter.end(&c, &tokens(900)).await.expect("end c"));
    assert_eq!(h.usage("e", &p).await, (vec![750], 1));
    // One millisecond short of its grace, d still settles.
    h.clock
        .advance(Duration::from_millis(10_000 + SETTLE_GRACE_MS - 2));
    assert!(d.end(&tokens(0)).await.expect("end d"));
    assert_eq!(h.usage("e", &p).await, (vec![650], 0));
}

/// With the keeper's passes, a permit nobody renews by hand (a request
/// waiting for its upstream, a stream whose client stopped reading) keeps
/// its slot for as long as it lives.
async fn keeper_keeps_a_live_permits_slot<S: CounterStore + Debug>(h: &Harness<S>) {
    let p = policy(&[(86_400, 100, "request")], 1, 10);
    let (a, _) = h.admit("a", "e", &p, &[]).await;
    // Steps shorter than half the lease, a pass after each: 32 s in all,
    // more than three leases.
    for step in 1..=8 {
        h.clock.advance(Duration::from_secs(4));
        h.limiter.renew_due().await;
        assert_eq!(h.usage("e", &p).await.1, 1, "step {step}");
    }
    let (denial, _) = h.deny("b", "e", &p, &[]).await;
    assert_eq!(denial, Denial::Concurrency { limit: 1 });
    assert_eq!(h.limiter.leases_kept(), 1);
    assert!(a.end(&tokens(7)).await.expect("end"));
    let (b, _) = h.admit("b", "e", &p, &[]).await;
    b.end(&[]).await.expect("end b");
}

/// Once its permit is ended or handed over, the keeper renews a lease no
/// more: the slot is free at once, or (handed over, never ended) when its
/// lease runs out.
async fn keeper_stops_with_the_permit<S: CounterStore + Debug>(h: &Harness<S>) {
    let p = policy(&[(86_400, 100, "request")], 1, 10);
    let (a, _) = h.admit("a", "e", &p, &[]).await;
    h.clock.advance(Duration::from_secs(6));
    h.limiter.renew_due().await;
    assert!(a.end(&[]).await.expect("end"));
    assert_eq!(h.limiter.leases_kept(), 0);
    assert_eq!(h.usage("e", &p).await.1, 0, "the slot is free");

    // Handed over (the caller ends it, or its lease does): not renewed.
    let (b, _) = h.admit("b", "e", &p, &[]).await;
    let _b = b.into_ticket();
    assert_eq!(h.limiter.leases_kept(), 0);
    for _ in 0..3 {
        h.clock.advance(Duration::from_secs(4));
        h.limiter.renew_due().await;
    }
    assert_eq!(h.usage("e", &p).await.1, 0, "b's lease ran out");
    let (c, _) = h.admit("c", "e", &p, &[]).await;

    // Dropped: released, and not renewed either.
    drop(c);
    assert_eq!(h.limiter.leases_kept(), 0);
    for _ in 0..500 {
        if h.usage("e", &p).await.1 == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    h.clock.advance(Duration::from_secs(6));
    h.limiter.renew_due().await;
    assert_eq!(h.usage("e", &p).await.1, 0, "c's slot was released");
}

// ---------------------------------------------------------------------
// Exactness: N concurrent attempts against limit L admit exactly L.

const EXACT_ATTEMPTS: usize = 1_000;
const EXACT_LIMIT: u64 = 100;

async fn attempt_once<S: CounterStore>(store: &S, account: &str, id: &str) -> bool {
    let windows = [WindowSpec {
        len: WindowLen::Fixed(60),
        limit: EXACT_LIMIT,
        unit: Unit::request(),
        amount: 1,
    }];
    let out = store
        .attempt(&AttemptRequest {
            request_id: id,
            account,
            endpoint: "e",
            now_ms: T0,
            windows: &windows,
            max_concurrent: 0,
            lease_ms: 60_000,
            credits: None,
            key: None,
        })
        .await
        .expect("attempt");
    out.verdict == Verdict::Admitted
}

async fn used_now<S: CounterStore>(store: &S, account: &str) -> u64 {
    let windows = [Window {
        len: WindowLen::Fixed(60),
        limit: EXACT_LIMIT,
        unit: Unit::request(),
    }];
    store
        .usage(&UsageRequest {
            account,
            endpoint: "e",
            now_ms: T0,
            windows: &windows,
            key: None,
        })
        .await
        .expect("usage")
        .used[0]
}

#[test]
fn memory_exactly_limit_of_many_concurrent_attempts_from_8_threads() {
    let store = Arc::new(MemoryStore::new());
    let admitted = Arc::new(AtomicUsize::new(0));
    let account = unique("exact");
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let (store, admitted, account) = (store.clone(), admitted.clone(), account.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .expect("runtime");
                rt.block_on(async {
                    for i in 0..EXACT_ATTEMPTS / 8 {
                        if attempt_once(&*store, &account, &format!("{t}-{i}")).await {
                            admitted.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                });
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    assert_eq!(admitted.load(Ordering::SeqCst), EXACT_LIMIT as usize);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    assert_eq!(rt.block_on(used_now(&*store, &account)), EXACT_LIMIT);
}

/// `stores` are the gateway instances (each with its own connections).
async fn redis_exactness(stores: Vec<Arc<RedisStore>>, raw: Raw) {
    let account = unique("exact");
    let per_store = EXACT_ATTEMPTS / stores.len();
    let mut tasks = Vec::new();
    for (s, store) in stores.iter().enumerate() {
        for i in 0..per_store {
            let (store, account) = (store.clone(), account.clone());
            tasks.push(tokio::spawn(async move {
                attempt_once(&*store, &account, &format!("{s}-{i}")).await
            }));
        }
    }
    let mut admitted = 0;
    for t in tasks {
        if t.await.expect("task") {
            admitted += 1;
        }
    }
    assert_eq!(admitted, EXACT_LIMIT);
    assert_eq!(used_now(&*stores[0], &account).await, EXACT_LIMIT);
    raw.assert_ttls_and_clean().await;
}

async fn raw_for(url: &str, keys: &Keys) -> Raw {
    let conn = redis::Client::open(url)
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("raw redis connection");
    Raw {
        conn,
        keys: keys.clone(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_multiplexed_exactly_limit_from_8_instances() {
    let Some((url, options)) = redis_options(RedisMode::Multiplexed).await else {
        return;
    };
    let mut stores = Vec::new();
    for _ in 0..8 {
        let s = RedisStore::connect_with(&url, options.clone())
            .await
            .expect("store");
        stores.push(Arc::new(s));
    }
    let raw = raw_for(&url, stores[0].keys()).await;
    redis_exactness(stores, raw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_pooled_exactly_limit_from_8_connections() {
    let Some((url, options)) = redis_options(RedisMode::Pooled { max_size: 8 }).await else {
        return;
    };
    let store = Arc::new(
        RedisStore::connect_with(&url, options)
            .await
            .expect("store"),
    );
    let raw = raw_for(&url, store.keys()).await;
    redis_exactness(vec![store; 8], raw).await;
}

// ---------------------------------------------------------------------
// Failure: a store error is an error, never a panic, and the store
// recovers by itself when Redis is back.

/// A TCP forwarder to Redis that can be cut (every connection dropped,
/// new ones refused) and restored on the same port.
struct Cuttable {
    addr: std::net::SocketAddr,
    task: Option<tokio::task::JoinHandle<()>>,
    target: String,
}

impl Cuttable {
    async fn start(target: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut c = Cuttable {
            addr,
            task: None,
            target: target.to_owned(),
        };
        c.serve(listener);
        c
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let target = self.target.clone();
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                conns.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }));
    }

    /// Drop every connection and stop listening.
    fn cut(&mut self) {
        if let Some(t) = self.task.take() {
            // Aborting drops the listener and the JoinSet, which aborts
            // every forwarding task and closes its sockets.
            t.abort();
        }
    }

    async fn restore(&mut self) {
        let mut listener = None;
        for _ in 0..100 {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => {
                    listener = Some(l);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        self.serve(listener.expect("rebind the forwarder's port"));
    }
}

async fn recovers_after_outage(mode: RedisMode) {
    let Some((url, options)) = redis_options(mode).await else {
        return;
    };
    let target = url
        .strip_prefix("redis://")
        .and_then(|r| r.split('/').next())
        .unwrap_or("127.0.0.1:6379")
        .to_owned();
    let mut proxy = Cuttable::start(&target).await;
    let store = RedisStore::connect_with(&format!("redis://{}", proxy.addr), options)
        .await
        .expect("store");
    let account = unique("outage");
    assert!(attempt_once(&store, &account, "before").await);

    proxy.cut();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let windows = [WindowSpec {
        len: WindowLen::Fixed(60),
        limit: EXACT_LIMIT,
        unit: Unit::request(),
        amount: 1,
    }];
    let req = AttemptRequest {
        request_id: "during",
        account: &account,
        endpoint: "e",
        now_ms: T0,
        windows: &windows,
        max_concurrent: 0,
        lease_ms: 60_000,
        credits: None,
        key: None,
    };
    // Unreachable: an error (or no answer), never an answer or a panic.
    let during = tokio::time::timeout(Duration::from_secs(1), store.attempt(&req)).await;
    assert!(
        !matches!(during, Ok(Ok(_))),
        "attempt with Redis unreachable: {during:?}"
    );

    proxy.restore().await;
    // Waiting for the reconnect (with backoff), bounded: not a window.
    let mut recovered = None;
    for _ in 0..100 {
        if let Ok(Ok(out)) = tokio::time::timeout(Duration::from_secs(1), store.attempt(&req)).await
        {
            recovered = Some(out);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = recovered.expect("the store did not recover after Redis came back");
    assert_eq!(out.verdict, Verdict::Admitted);
    assert_eq!(out.used, vec![2]);
    raw_for(&url, store.keys())
        .await
        .assert_ttls_and_clean()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_multiplexed_recovers_after_outage() {
    recovers_after_outage(RedisMode::Multiplexed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_pooled_recovers_after_outage() {
    recovers_after_outage(RedisMode::Pooled { max_size: 4 }).await;
}

/// The scripts set a counter's TTL only when `INCRBY` creates it and extend
/// the in-flight set's TTL only when it would not cover the new lease: the
/// TTLs they leave must still cover every window and every lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_ttls_cover_windows_and_the_longest_lease() {
    let Some(h) = redis_harness(RedisMode::Multiplexed).await else {
        return;
    };
    let raw = h.raw.clone().expect("redis harness");
    let slack = plangate::limiter::redis::TTL_SLACK_MS as i64;
    let set = raw.keys.in_flight(&h.account, "e");
    let counter = raw.keys.window(
        &h.account,
        "e",
        WindowLen::Fixed(60),
        "request",
        window_index(T0, 60),
    );
    // Real time passes between the scripts and the PTTL reads: allow 2 s.
    let pttl = |k: String| {
        let raw = raw.clone();
        async move { raw.key_state(&k).await.pttl }
    };
    // Expired records are kept for the settle grace: the set covers it too.
    let grace = SETTLE_GRACE_MS as i64;
    let set_covers = |lease_ms: i64| {
        let set = set.clone();
        async move {
            let left = pttl(set.clone()).await;
            assert!(
                left >= lease_ms + grace + slack - 2_000,
                "{set}: {left} ms left, lease {lease_ms} ms"
            );
        }
    };
    let short = policy(&[(60, 100, "request")], 0, 30);
    let long = policy(&[(60, 100, "request")], 0, 600);

    let (_a, _) = h.admit("a", "e", &short, &[]).await;
    let window_left = (minute_end(T0) - T0) as i64 + slack;
    let left = pttl(counter.clone()).await;
    assert!(left > 0 && left <= window_left, "counter: {left} ms left");
    set_covers(30_000).await;

    // A set whose TTL runs short (as time passes) is extended by the next
    // admission; a counter that exists keeps the TTL it was created with.
    let mut c = raw.conn.clone();
    let _: () = redis::cmd("PEXPIRE")
        .arg(&set)
        .arg(1_000)
        .query_async(&mut c)
        .await
        .expect("PEXPIRE");
    let (_b, _) = h.admit("b", "e", &short, &[]).await;
    set_covers(30_000).await;
    assert!(pttl(counter.clone()).await <= left);

    // A longer lease (after a plan change) extends the set; a shorter one
    // after it does not shorten it.
    let (_c, _) = h.admit("c", "e", &long, &[]).await;
    set_covers(600_000).await;
    let (_d, _) = h.admit("d", "e", &short, &[]).await;
    set_covers(600_000).await;
    assert_eq!(h.usage("e", &short).await, (vec![4], 4));
    h.finish().await;
}

/// A calendar month's counter lives until the month's real end (+ slack):
/// an hour when written in the last hour of a leap February, 29 days when
/// written on its first day, and under its own key token (`1mo`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_month_counters_live_to_the_month_end() {
    let Some(h) = redis_harness(RedisMode::Multiplexed).await else {
        return;
    };
    let raw = h.raw.clone().expect("redis harness");
    let slack = plangate::limiter::redis::TTL_SLACK_MS as i64;
    let p = len_policy(&[(MONTH, 1_000, "token")]);
    for (endpoint, t, left) in [
        ("late", utc(2028, 2, 29, 23, 0, 0), 3_600_000i64),
        ("early", utc(2028, 2, 1, 0, 0, 0), 29 * DAY as i64),
    ] {
        h.clock.set_ms(t);
        let (permit, _) = h.admit("r", endpoint, &p, &tokens(10)).await;
        permit.end(&tokens(10)).await.expect("end");
        let key = raw
            .keys
            .window(&h.account, endpoint, MONTH, "token", MONTH.index(t));
        assert!(key.contains(":w:1mo:token:"), "{key}");
        let state = raw.key_state(&key).await;
        assert_eq!(state.value, vec!["10".to_owned()], "{key}");
        // Real time passes between the script and the PTTL read: allow 2 s.
        assert!(
            state.pttl <= left + slack && state.pttl > left + slack - 2_000,
            "{key}: {} ms left, want {} ms",
            state.pttl,
            left + slack
        );
    }
    h.finish().await;
}

#[tokio::test]
async fn malformed_redis_url_is_an_error() {
    let err = RedisStore::connect("not a url").await;
    assert!(err.is_err());
}

/// `enforce: false` (issue 15 item 6): every request is admitted and
/// counted; one the limits would refuse says why (`would_deny`), the same
/// refusal an enforcing policy gives, and the info reports the windows as
/// they are (over their limits: nothing remaining).
async fn shadow_mode_counts_and_reports_but_refuses_nothing<S: CounterStore + Debug>(
    h: &Harness<S>,
) {
    let enforcing = policy(&[(60, 2, "request"), (60, 100, "token")], 1, 60);
    let mut shadow = (*enforcing).clone();
    shadow.enforce = false;
    let shadow = Arc::new(shadow);
    let mut permits = Vec::new();
    for i in 0..2 {
        let (p, _) = h.admit(&format!("s{i}"), "sh", &shadow, &[]).await;
        permits.push(p);
    }
    // The first is within every limit; the second takes a second slot of
    // one: would be refused for concurrency.
    assert_eq!(permits[0].would_deny(), None);
    assert_eq!(
        permits[1].would_deny(),
        Some(&Denial::Concurrency { limit: 1 })
    );
    for p in permits.drain(..) {
        p.end(&[]).await.expect("end");
    }
    // The third request of the minute: the window would refuse it, as an
    // enforcing policy does.
    let (third, info) = h.admit("s2", "sh", &shadow, &[]).await;
    let window = |used| Denial::Window {
        window: shadow.windows[0].clone(),
        used,
        requested: 1,
        reset_ms: minute_end(T0) - T0,
    };
    assert_eq!(third.would_deny(), Some(&window(2)));
    assert_eq!(info.windows[0].used, 3, "counted");
    assert_eq!(info.unit("request").map(|u| u.remaining), Some(0));
    third.end(&[]).await.expect("end");
    let (denial, _) = h.deny("e0", "sh", &enforcing, &[]).await;
    assert_eq!(denial, window(3));
    // A start amount no window could hold: admitted, would be too large.
    let (big, _) = h.admit("s3", "sh", &shadow, &tokens(500)).await;
    assert_eq!(
        big.would_deny(),
        Some(&Denial::TooLarge {
            window: shadow.windows[1].clone(),
            requested: 500,
        })
    );
    big.end(&[]).await.expect("end");
    assert_eq!(h.usage("sh", &shadow).await, (vec![4, 500], 0));
}
