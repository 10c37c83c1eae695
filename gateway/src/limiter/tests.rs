//! Property tests: window math, settlement, and the in-process store
//! checked against a plain model of SPEC §4.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use proptest::prelude::*;

use super::memory::MemoryStore;
use super::wallet::{OutboxItem, Unended, WalletInit, WalletSnapshot};
use super::*;
use crate::clock::{window_index, window_reset_ms, window_start_ms, Period};

fn block_on<T>(f: impl Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(f)
}

proptest! {
    #[test]
    fn window_alignment_and_reset(now in 0u64..=u64::MAX / 2, secs in 1u64..=10 * 86_400) {
        let w = secs * 1000;
        let start = window_start_ms(now, secs);
        let reset = window_reset_ms(now, secs);
        prop_assert!(start <= now && now < start + w);
        prop_assert_eq!(start % w, 0);
        prop_assert!((1..=w).contains(&reset));
        prop_assert_eq!(now + reset, start + w);
        prop_assert_eq!(window_index(now, secs), start / w);
    }

    #[test]
    fn settlement_in_the_admission_window(
        other in 0u64..1_000,
        reserved in 0u64..1_000,
        actual in 0u64..5_000,
        end_after in 0u64..59_000,
    ) {
        let store = MemoryStore::new();
        let now = 1_700_000_000_000 - 1_700_000_000_000 % 60_000;
        let unit = Unit::new("token");
        let spec = |amount| [WindowSpec { len: WindowLen::Fixed(60), limit: 1_000_000, unit: unit.clone(), amount }];
        let run = |id: &str, amount: u64| block_on(store.attempt(&AttemptRequest {
            request_id: id, account: "a", endpoint: "e", now_ms: now,
            windows: &spec(amount), max_concurrent: 0, lease_ms: 60_000,
            credits: None,
            key: None,
        })).expect("attempt");
        prop_assert_eq!(run("other", other).verdict, Verdict::Admitted);
        prop_assert_eq!(run("r", reserved).verdict, Verdict::Admitted);
        let settle = [Settlement {
            len: WindowLen::Fixed(60), unit: unit.clone(), admitted_index: window_index(now, 60),
            reserved, actual,
        }];
        let ended = block_on(store.end(&EndRequest {
            request_id: "r", account: "a", endpoint: "e", now_ms: now + end_after,
            settlements: &settle,
            credits: Default::default(),
            usage: None,
            key: None,
            admission: None,
        })).expect("end");
        prop_assert!(ended);
        let used = block_on(store.usage(&UsageRequest {
            account: "a", endpoint: "e", now_ms: now + end_after,
            windows: &[Window { len: WindowLen::Fixed(60), limit: 1, unit: unit.clone() }],
            key: None,
        })).expect("usage").used[0];
        // reserved + (actual - reserved), on top of the other traffic.
        prop_assert_eq!(used, other + actual);
    }

    #[test]
    fn settlement_after_the_window_moved_on(reserved in 0u64..1_000, actual in 0u64..5_000) {
        let store = MemoryStore::new();
        let now = 1_700_000_000_000 - 1_700_000_000_000 % 60_000;
        let unit = Unit::new("token");
        let windows = [WindowSpec { len: WindowLen::Fixed(60), limit: 1_000_000, unit: unit.clone(), amount: reserved }];
        block_on(store.attempt(&AttemptRequest {
            request_id: "r", account: "a", endpoint: "e", now_ms: now,
            windows: &windows, max_concurrent: 0, lease_ms: 600_000,
            credits: None,
            key: None,
        })).expect("attempt");
        let later = now + 90_000;
        let settle = [Settlement {
            len: WindowLen::Fixed(60), unit: unit.clone(), admitted_index: window_index(now, 60),
            reserved, actual,
        }];
        block_on(store.end(&EndRequest {
            request_id: "r", account: "a", endpoint: "e", now_ms: later, settlements: &settle,
            credits: Default::default(),
            usage: None,
            key: None,
            admission: None,
        })).expect("end");
        let used = block_on(store.usage(&UsageRequest {
            account: "a", endpoint: "e", now_ms: later,
            windows: &[Window { len: WindowLen::Fixed(60), limit: 1, unit }],
            key: None,
        })).expect("usage").used[0];
        // Only an excess lands in the new window; a give-back never makes
        // it negative (it cannot: u64) nor takes anything from it.
        prop_assert_eq!(used, actual.saturating_sub(reserved));
    }

    #[test]
    fn memory_store_matches_the_model(ops in proptest::collection::vec(op(), 1..80)) {
        check_against_model(&ops)?;
    }

    /// Calendar windows, from a few minutes before boundaries: the end of
    /// a leap February (Tue 2028-02-29), of a short month that is also a
    /// Sunday (2027-02-28), of a year (Fri 2027-12-31) and of a 31-day
    /// month that is a Sunday (2026-05-31). Ends settle across them.
    #[test]
    fn memory_store_matches_the_model_across_calendar_boundaries(
        ops in proptest::collection::vec(op(), 1..80),
        start in prop_oneof![
            Just(1_835_481_600_000u64), // 2028-03-01T00:00:00Z
            Just(1_803_859_200_000u64), // 2027-03-01T00:00:00Z
            Just(1_830_297_600_000u64), // 2028-01-01T00:00:00Z
            Just(1_780_272_000_000u64), // 2026-06-01T00:00:00Z
        ],
        before in 0u64..600_000,
    ) {
        let lens = [
            WindowLen::Calendar(Period::Month),
            WindowLen::Calendar(Period::Day),
            WindowLen::Calendar(Period::Week),
        ];
        check_against_model_at(&ops, start - before, lens)?;
    }
}

#[derive(Debug, Clone)]
enum Op {
    Attempt { id: u8, tokens: u64 },
    End { id: u8, tokens: Option<u64> },
    Renew { id: u8 },
    Advance { ms: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..6, 0u64..60).prop_map(|(id, tokens)| Op::Attempt { id, tokens }),
        3 => (0u8..6, proptest::option::of(0u64..120)).prop_map(|(id, tokens)| Op::End { id, tokens }),
        1 => (0u8..6).prop_map(|id| Op::Renew { id }),
        2 => (0u64..45_000).prop_map(|ms| Op::Advance { ms }),
        // Exactly one lease: lands on expiry boundaries.
        1 => Just(Op::Advance { ms: 30_000 }),
        // Exactly the settle grace: lands on the boundary where an expired
        // record is dropped (after a lease-long advance).
        1 => Just(Op::Advance { ms: SETTLE_GRACE_MS }),
    ]
}

/// SPEC §4 the obvious way: every window of every index kept forever,
/// in-flight records never pruned, liveness (and the settle grace) checked
/// on read.
#[derive(Default)]
struct Model {
    counts: HashMap<(WindowLen, Unit, u64), u64>,
    in_flight: HashMap<String, u64>,
}

impl Model {
    fn live(&self, now: u64) -> u32 {
        self.in_flight.values().filter(|&&e| e > now).count() as u32
    }

    fn used(&self, len: WindowLen, unit: &Unit, now: u64) -> u64 {
        let key = (len, unit.clone(), len.index(now));
        self.counts.get(&key).copied().unwrap_or(0)
    }

    fn attempt(&mut self, req: &AttemptRequest<'_>) -> AttemptOutcome {
        let now = req.now_ms;
        let used: Vec<u64> = req
            .windows
            .iter()
            .map(|w| self.used(w.len, &w.unit, now))
            .collect();
        let in_flight = self.live(now);
        let verdict = if self.in_flight.get(req.request_id).is_some_and(|&e| e > now) {
            Verdict::Duplicate
        } else if let Some(index) = req
            .windows
            .iter()
            .zip(&used)
            .position(|(w, &u)| u + w.amount.max(1) > w.limit)
        {
            Verdict::WindowFull { index }
        } else if req.max_concurrent > 0 && in_flight >= req.max_concurrent {
            Verdict::ConcurrencyFull
        } else {
            Verdict::Admitted
        };
        if verdict != Verdict::Admitted {
            return AttemptOutcome {
                verdict,
                used,
                in_flight,
                credits: None,
            };
        }
        let mut after = Vec::new();
        for w in req.windows {
            let c = self
                .counts
                .entry((w.len, w.unit.clone(), w.len.index(now)))
                .or_default();
            *c += w.amount;
            after.push(*c);
        }
        self.in_flight
            .insert(req.request_id.to_owned(), now + req.lease_ms);
        AttemptOutcome {
            verdict,
            used: after,
            in_flight: in_flight + 1,
            credits: None,
        }
    }

    fn end(&mut self, req: &EndRequest<'_>) -> bool {
        let now = req.now_ms;
        match self.in_flight.remove(req.request_id) {
            Some(exp) if exp + SETTLE_GRACE_MS > now => {}
            _ => return false,
        }
        for s in req.settlements {
            if s.actual > s.reserved {
                let key = (s.len, s.unit.clone(), s.len.index(now));
                *self.counts.entry(key).or_default() += s.actual - s.reserved;
            } else if let Some(c) = self
                .counts
                .get_mut(&(s.len, s.unit.clone(), s.admitted_index))
            {
                *c = c.saturating_sub(s.reserved - s.actual);
            }
        }
        true
    }

    fn renew(&mut self, req: &RenewRequest<'_>) -> bool {
        match self.in_flight.get_mut(req.request_id) {
            Some(exp) if *exp > req.now_ms => {
                *exp = req.now_ms + req.lease_ms;
                true
            }
            _ => false,
        }
    }
}

fn check_against_model(ops: &[Op]) -> Result<(), TestCaseError> {
    let lens = [
        WindowLen::Fixed(60),
        WindowLen::Fixed(60),
        WindowLen::Fixed(3_600),
    ];
    check_against_model_at(ops, 1_700_000_000_000u64 + 12_345, lens)
}

/// [`check_against_model`] with windows of lengths `lens` (request,
/// token, request), from `start` on.
fn check_against_model_at(
    ops: &[Op],
    start: u64,
    lens: [WindowLen; 3],
) -> Result<(), TestCaseError> {
    // A small sweep interval so that sweeping happens during the run.
    let store = MemoryStore::with_options(2, 3);
    let mut model = Model::default();
    let policy = Policy {
        windows: vec![
            Window {
                len: lens[0],
                limit: 8,
                unit: Unit::request(),
            },
            Window {
                len: lens[1],
                limit: 150,
                unit: Unit::new("token"),
            },
            Window {
                len: lens[2],
                limit: 30,
                unit: Unit::request(),
            },
        ],
        max_concurrent: 3,
        concurrency_expiry_secs: 30,
        credits: None,
        enforce: true,
        key: None,
    };
    let lease_ms = 30_000;
    let mut now = start;
    // id -> (admitted at, reserved per window)
    let mut tickets: HashMap<u8, (u64, Vec<u64>)> = HashMap::new();
    for op in ops {
        match *op {
            Op::Advance { ms } => now += ms,
            Op::Attempt { id, tokens } => {
                let start = [(Unit::new("token"), tokens)];
                let specs = start_amounts(&policy, &start);
                if too_large(&specs).is_some() {
                    continue;
                }
                let rid = format!("r{id}");
                let req = AttemptRequest {
                    request_id: &rid,
                    account: "a",
                    endpoint: "e",
                    now_ms: now,
                    windows: &specs,
                    max_concurrent: policy.max_concurrent,
                    lease_ms,
                    credits: None,
                    key: None,
                };
                let got = block_on(store.attempt(&req)).expect("attempt");
                let want = model.attempt(&req);
                prop_assert_eq!(&got, &want, "{:?} at {}", op, now);
                if got.verdict == Verdict::Admitted {
                    tickets.insert(id, (now, specs.iter().map(|s| s.amount).collect()));
                }
            }
            Op::End { id, tokens } => {
                let (admitted_ms, reserved) =
                    tickets.get(&id).cloned().unwrap_or((now, vec![1, 0, 1]));
                let ticket = Ticket {
                    request_id: Arc::from(format!("r{id}").as_str()),
                    account: Arc::from("a"),
                    endpoint: Arc::from("e"),
                    policy: Arc::new(policy.clone()),
                    reserved,
                    admitted_ms,
                    charged: None,
                };
                let finals: Vec<(Unit, u64)> = tokens
                    .map(|t| (Unit::new("token"), t))
                    .into_iter()
                    .collect();
                let settlements = ticket.settlements(&finals);
                let req = EndRequest {
                    request_id: &ticket.request_id,
                    account: "a",
                    endpoint: "e",
                    now_ms: now,
                    settlements: &settlements,
                    credits: Default::default(),
                    usage: None,
                    key: None,
                    admission: None,
                };
                let got = block_on(store.end(&req)).expect("end");
                prop_assert_eq!(got, model.end(&req), "{:?} at {}", op, now);
            }
            Op::Renew { id } => {
                let rid = format!("r{id}");
                let req = RenewRequest {
                    request_id: &rid,
                    account: "a",
                    endpoint: "e",
                    now_ms: now,
                    lease_ms,
                };
                let got = block_on(store.renew(&req)).expect("renew");
                prop_assert_eq!(got, model.renew(&req), "{:?} at {}", op, now);
            }
        }
        let usage = block_on(store.usage(&UsageRequest {
            account: "a",
            endpoint: "e",
            now_ms: now,
            windows: &policy.windows,
            key: None,
        }))
        .expect("usage");
        let want: Vec<u64> = policy
            .windows
            .iter()
            .map(|w| model.used(w.len, &w.unit, now))
            .collect();
        prop_assert_eq!(&usage.used, &want, "usage after {:?} at {}", op, now);
        prop_assert_eq!(usage.in_flight, model.live(now));
    }
    Ok(())
}

#[test]
fn info_prefers_fewest_remaining_then_later_reset() {
    let w = |secs, limit| Window {
        len: WindowLen::Fixed(secs),
        limit,
        unit: Unit::request(),
    };
    let now = 1_700_000_000_000 + 30_000;
    // (windows, used, chosen window length in seconds)
    let cases: [(Vec<Window>, Vec<u64>, u64); 4] = [
        (vec![w(60, 3), w(86_400, 200)], vec![1, 1], 60),
        (vec![w(60, 10), w(86_400, 5)], vec![1, 1], 86_400),
        (vec![w(60, 3), w(3_600, 3)], vec![1, 1], 3_600),
        (vec![w(3_600, 3), w(60, 3)], vec![0, 0], 3_600),
    ];
    for (windows, used, want) in cases {
        let policy = Policy {
            windows,
            max_concurrent: 0,
            concurrency_expiry_secs: 60,
            credits: None,
            enforce: true,
            key: None,
        };
        let info = RateLimitInfo::from_usage(&policy, &used, 0, now);
        assert_eq!(
            info.unit("request").map(|u| u.len),
            Some(WindowLen::Fixed(want))
        );
    }
}

// ---------------------------------------------------------------------
// The lease keeper.

/// The in-process store, counting renewals and failing them on demand.
#[derive(Debug, Default)]
struct Counting {
    inner: MemoryStore,
    renews: AtomicUsize,
    fail_renew: AtomicBool,
}

impl CounterStore for Counting {
    async fn attempt(&self, req: &AttemptRequest<'_>) -> Result<AttemptOutcome, StoreError> {
        self.inner.attempt(req).await
    }

    async fn end(&self, req: &EndRequest<'_>) -> Result<bool, StoreError> {
        self.inner.end(req).await
    }

    async fn usage(&self, req: &UsageRequest<'_>) -> Result<Usage, StoreError> {
        self.inner.usage(req).await
    }

    async fn renew(&self, req: &RenewRequest<'_>) -> Result<bool, StoreError> {
        self.renews.fetch_add(1, Ordering::SeqCst);
        if self.fail_renew.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("down".into()));
        }
        self.inner.renew(req).await
    }

    async fn wallet_init(
        &self,
        account: &str,
        snapshot: &WalletSnapshot,
    ) -> Result<WalletInit, StoreError> {
        self.inner.wallet_init(account, snapshot).await
    }

    async fn wallet_invalidate(
        &self,
        account: &str,
        version: Option<u64>,
    ) -> Result<(), StoreError> {
        self.inner.wallet_invalidate(account, version).await
    }

    async fn wallet_balance(&self, account: &str, now_ms: u64) -> Result<Option<u64>, StoreError> {
        self.inner.wallet_balance(account, now_ms).await
    }

    async fn outbox_read(&self, account: &str, max: usize) -> Result<Vec<OutboxItem>, StoreError> {
        self.inner.outbox_read(account, max).await
    }

    async fn outbox_ack(&self, account: &str, ids: &[String]) -> Result<(), StoreError> {
        self.inner.outbox_ack(account, ids).await
    }

    async fn outbox_acks(&self, account: &str) -> Result<u64, StoreError> {
        self.inner.outbox_acks(account).await
    }

    async fn outbox_accounts(&self) -> Result<Vec<String>, StoreError> {
        self.inner.outbox_accounts().await
    }

    async fn wallet_accounts(&self) -> Result<Vec<String>, StoreError> {
        self.inner.wallet_accounts().await
    }

    async fn heartbeat(&self, instance: &str, ttl_ms: u64) -> Result<(), StoreError> {
        self.inner.heartbeat(instance, ttl_ms).await
    }

    async fn instance_alive(&self, instance: &str) -> Result<bool, StoreError> {
        self.inner.instance_alive(instance).await
    }

    async fn unended_admissions(&self, account: &str) -> Result<Vec<Unended>, StoreError> {
        self.inner.unended_admissions(account).await
    }

    async fn reap(
        &self,
        account: &str,
        admission: &Unended,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        self.inner.reap(account, admission, now_ms).await
    }

    async fn reset_windows(
        &self,
        account: &str,
        key: Option<&str>,
        endpoint: &str,
        windows: &[crate::plans::Window],
        now_ms: u64,
    ) -> Result<(), StoreError> {
        self.inner
            .reset_windows(account, key, endpoint, windows, now_ms)
            .await
    }
}

const KEEPER_T0: u64 = 1_700_000_000_000 - 1_700_000_000_000 % 86_400_000 + 3_600_000;

/// One request slot, a 10 s lease.
fn keeper_policy() -> Arc<Policy> {
    Arc::new(Policy {
        windows: vec![Window {
            len: WindowLen::Fixed(86_400),
            limit: 1_000,
            unit: Unit::request(),
        }],
        max_concurrent: 1,
        concurrency_expiry_secs: 10,
        credits: None,
        enforce: true,
        key: None,
    })
}

async fn admit(limiter: &Arc<Limiter<Counting>>, id: &str) -> Permit<Counting> {
    match limiter
        .attempt(id, "a", "e", &keeper_policy(), &[])
        .await
        .expect("attempt")
    {
        Attempt::Admitted(p, _) => p,
        Attempt::Denied(d, _) => panic!("{id} denied: {d:?}"),
    }
}

async fn in_flight(limiter: &Limiter<Counting>) -> u32 {
    limiter
        .info("a", "e", &keeper_policy())
        .await
        .expect("info")
        .concurrent
        .map(|c| c.limit - c.remaining)
        .expect("concurrency info")
}

fn keeper_limiter(
    interval: Option<Duration>,
) -> (Arc<Limiter<Counting>>, crate::clock::ManualClock) {
    let clock = crate::clock::ManualClock::new(KEEPER_T0);
    let limiter = Limiter::with_keeper_interval(
        Counting::default(),
        Arc::new(clock.clone()),
        Duration::from_secs(1),
        interval,
    );
    (limiter, clock)
}

#[tokio::test]
async fn keeper_renews_only_what_is_due() {
    let (limiter, clock) = keeper_limiter(None);
    let renews = || limiter.store().renews.load(Ordering::SeqCst);
    let permit = admit(&limiter, "r").await;
    assert_eq!(limiter.leases_kept(), 1);
    // Before half the lease: a pass makes no store call (a quick request
    // costs no renewal).
    clock.advance(Duration::from_millis(4_999));
    limiter.renew_due().await;
    assert_eq!(renews(), 0);
    clock.advance(Duration::from_millis(1));
    limiter.renew_due().await;
    assert_eq!(renews(), 1);
    limiter.renew_due().await;
    assert_eq!(renews(), 1, "renewed at T+5 s: next due at T+10 s");
    // A failed renewal is retried an eighth of a lease later.
    clock.advance(Duration::from_secs(5));
    limiter.store().fail_renew.store(true, Ordering::SeqCst);
    limiter.renew_due().await;
    assert_eq!(renews(), 2);
    clock.advance(Duration::from_millis(1_249));
    limiter.renew_due().await;
    assert_eq!(renews(), 2);
    limiter.store().fail_renew.store(false, Ordering::SeqCst);
    clock.advance(Duration::from_millis(1));
    limiter.renew_due().await;
    assert_eq!(renews(), 3);
    // T+11.25 s, lease renewed to T+21.25 s.
    clock.advance(Duration::from_secs(9));
    assert_eq!(in_flight(&limiter).await, 1);
    assert!(permit.end(&[]).await.expect("end"));
    assert_eq!(limiter.leases_kept(), 0);
    clock.advance(Duration::from_secs(60));
    limiter.renew_due().await;
    assert_eq!(renews(), 3, "an ended permit is not renewed");
}

#[tokio::test]
async fn a_lost_lease_is_no_longer_kept_but_still_settles() {
    let (limiter, clock) = keeper_limiter(None);
    let permit = admit(&limiter, "r").await;
    // No pass ran for a whole lease (say the store was down).
    clock.advance(Duration::from_secs(10));
    limiter.renew_due().await;
    assert_eq!(limiter.leases_kept(), 0, "the store no longer holds it");
    assert_eq!(in_flight(&limiter).await, 0);
    assert!(permit.end(&[(Unit::request(), 3)]).await.expect("late end"));
    let info = limiter
        .info("a", "e", &keeper_policy())
        .await
        .expect("info");
    assert_eq!(info.windows[0].used, 3, "settled after its lease expired");
}

#[tokio::test]
async fn handed_over_and_dropped_permits_are_not_kept() {
    let (limiter, _clock) = keeper_limiter(None);
    let ticket = admit(&limiter, "r1").await.into_ticket();
    assert_eq!(limiter.leases_kept(), 0);
    assert!(limiter.end(&ticket, &[]).await.expect("end"));
    drop(admit(&limiter, "r2").await);
    assert_eq!(limiter.leases_kept(), 0);
}

#[tokio::test]
async fn keeper_task_renews_without_anyone_polling() {
    let (limiter, clock) = keeper_limiter(Some(Duration::from_millis(10)));
    let renews = || limiter.store().renews.load(Ordering::SeqCst);
    let permit = admit(&limiter, "r").await;
    clock.advance(Duration::from_secs(6));
    // Waiting for the task (bounded), not for a window: the clock is manual.
    for _ in 0..500 {
        if renews() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(renews(), 1, "the keeper task renewed the lease");
    // Past the original lease (T+10 s): renewed at T+6 s to T+16 s.
    clock.advance(Duration::from_secs(8));
    assert_eq!(in_flight(&limiter).await, 1);
    drop(permit);
}

#[tokio::test]
async fn keeper_task_ends_with_its_limiter() {
    let metrics = tokio::runtime::Handle::current().metrics();
    let (limiter, _clock) = keeper_limiter(Some(Duration::from_millis(10)));
    let permit = admit(&limiter, "r").await;
    assert!(permit.end(&[]).await.expect("end"));
    assert_eq!(metrics.num_alive_tasks(), 1, "the keeper task");
    let weak = Arc::downgrade(&limiter);
    drop(limiter);
    assert!(
        weak.upgrade().is_none(),
        "the task holds no strong reference"
    );
    for _ in 0..500 {
        if metrics.num_alive_tasks() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(metrics.num_alive_tasks(), 0, "the keeper task ended");
}

fn timed_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn keeper_task_restarts_on_a_new_runtime() {
    let (limiter, clock) = keeper_limiter(Some(Duration::from_millis(10)));
    let renews = || limiter.store().renews.load(Ordering::SeqCst);
    // The first runtime starts the task, then goes away with it.
    timed_runtime().block_on(async {
        let permit = admit(&limiter, "r1").await;
        assert!(permit.end(&[]).await.expect("end"));
    });
    timed_runtime().block_on(async {
        let permit = admit(&limiter, "r2").await;
        clock.advance(Duration::from_secs(6));
        for _ in 0..500 {
            if renews() > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(renews(), 1, "a new keeper task renewed the lease");
        assert!(permit.end(&[]).await.expect("end"));
    });
}
