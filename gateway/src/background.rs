//! One owner for the work a request leaves behind.
//!
//! A request's settlement (the end script after its response), the release
//! of a slot whose attempt timed out, lease renewals, the writing of
//! credit charges to the catalog, and the queueing and delivery of
//! threshold notifications all run after the request path has moved on. They run here, as [`Job`]s of a [`Background`]: every one is
//! counted while it runs (queue depth and the age of the oldest, per kind),
//! its failures are counted, and the number running at once is bounded —
//! beyond [`Background::capacity`] a job is refused and counted, instead of
//! a task set that grows without limit while a store is slow. Graceful
//! shutdown waits on it ([`Background::idle`]) and names what is left.
//!
//! Rendered on `/metrics` as `plangate_background_jobs`,
//! `plangate_background_oldest_seconds`, `plangate_background_started_total`,
//! `plangate_background_failures_total` and
//! `plangate_background_refused_total`, each labelled by `job`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// What a background job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    /// A request's end: its windows settled to what it used, its per-unit
    /// charge and usage record written to the counter store.
    Settle,
    /// Releasing a slot (and giving back its reservations and admission
    /// charge) that no settlement will end: an attempt that timed out, or
    /// a permit dropped without an end.
    Release,
    /// A pass of the lease keeper (renewals of live requests' leases).
    Renew,
    /// Writing an account's outbox (charges, refunds, usage records) to
    /// the catalog.
    WriteCharges,
    /// Queueing a threshold notification in the catalog (`notify.rs`).
    Notify,
    /// One delivery attempt of a threshold notification (a webhook POST).
    Deliver,
}

/// How many kinds of [`Job`] there are.
const JOB_KINDS: usize = 6;

impl Job {
    const ALL: [Job; JOB_KINDS] = [
        Job::Settle,
        Job::Release,
        Job::Renew,
        Job::WriteCharges,
        Job::Notify,
        Job::Deliver,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Job::Settle => "settle",
            Job::Release => "release",
            Job::Renew => "renew",
            Job::WriteCharges => "write_charges",
            Job::Notify => "notify",
            Job::Deliver => "deliver",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Jobs of all kinds running at once, by default; beyond it new spawned
/// jobs are refused (a long store outage under heavy traffic: their slots
/// are left to their leases).
pub const DEFAULT_CAPACITY: usize = 10_000;

/// The jobs of one kind.
#[derive(Debug, Default)]
struct Lane {
    started: AtomicU64,
    failed: AtomicU64,
    refused: AtomicU64,
    /// Running jobs by start order: the first is the oldest.
    running: Mutex<BTreeMap<u64, Instant>>,
}

/// The tracked, bounded executor of background work (see the module
/// documentation).
#[derive(Debug)]
pub struct Background {
    lanes: [Lane; JOB_KINDS],
    /// Jobs running, all kinds.
    running: AtomicUsize,
    next_id: AtomicU64,
    capacity: usize,
    /// Woken whenever a job ends.
    ended: tokio::sync::Notify,
}

impl Default for Background {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

/// Counts one job as running until dropped.
struct Running {
    owner: Arc<Background>,
    job: Job,
    id: u64,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.owner.lanes[self.job.index()]
            .running
            .lock()
            .remove(&self.id);
        self.owner.running.fetch_sub(1, Ordering::SeqCst);
        self.owner.ended.notify_waiters();
    }
}

impl Background {
    pub fn new(capacity: usize) -> Self {
        Self {
            lanes: Default::default(),
            running: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            capacity,
            ended: tokio::sync::Notify::new(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Count a job as running until the returned guard is dropped.
    fn enter(self: &Arc<Self>, job: Job) -> Running {
        let lane = &self.lanes[job.index()];
        self.running.fetch_add(1, Ordering::SeqCst);
        lane.started.fetch_add(1, Ordering::Relaxed);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lane.running.lock().insert(id, Instant::now());
        Running {
            owner: self.clone(),
            job,
            id,
        }
    }

    /// Run `fut` as a background job of kind `job`. Returns false if it was
    /// refused (at capacity, or outside a runtime): the caller says what
    /// that leaves undone. A job whose future is done on its first poll
    /// (the in-process stores) runs right here, without a task. `Unpin`: the
    /// caller boxes it once (a settlement already is).
    pub fn spawn<F>(self: &Arc<Self>, job: Job, mut fut: F) -> bool
    where
        F: Future<Output = ()> + Unpin + Send + 'static,
    {
        use futures_util::FutureExt as _;
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.lanes[job.index()]
                .refused
                .fetch_add(1, Ordering::Relaxed);
            return false;
        };
        let lane = &self.lanes[job.index()];
        if self.running.load(Ordering::SeqCst) >= self.capacity {
            lane.refused.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if (&mut fut).now_or_never().is_some() {
            // Done already: counted, never registered as running (no lock
            // on the in-process stores' path).
            lane.started.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        // Started (its first poll may have sent a store call): tracked from
        // here, never refused any more (a race past the capacity check
        // overshoots it by the jobs in that race).
        let running = self.enter(job);
        rt.spawn(async move {
            let _running = running;
            fut.await;
        });
        true
    }

    /// Run `fut` here, counted as a job of kind `job` while it runs (work
    /// that already has its own task, such as a keeper pass). Never
    /// refused.
    pub async fn run<T>(self: &Arc<Self>, job: Job, fut: impl Future<Output = T>) -> T {
        let _running = self.enter(job);
        fut.await
    }

    /// Count a failure of a job of kind `job`.
    pub fn failed(&self, job: Job) {
        self.lanes[job.index()]
            .failed
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Jobs of kind `job` running (or waiting to retry).
    pub fn pending(&self, job: Job) -> usize {
        self.lanes[job.index()].running.lock().len()
    }

    /// How long the oldest running job of kind `job` has been running.
    pub fn oldest(&self, job: Job) -> Option<Duration> {
        let lane = self.lanes[job.index()].running.lock();
        lane.values().next().map(|t| t.elapsed())
    }

    pub fn failures(&self, job: Job) -> u64 {
        self.lanes[job.index()].failed.load(Ordering::Relaxed)
    }

    pub fn refusals(&self, job: Job) -> u64 {
        self.lanes[job.index()].refused.load(Ordering::Relaxed)
    }

    /// Wait until no job of the given kinds runs, or the deadline passes.
    /// Returns what is still running, by kind (empty: all done).
    pub async fn idle(&self, jobs: &[Job], deadline: Instant) -> Vec<(Job, usize)> {
        loop {
            let ended = self.ended.notified();
            let left: Vec<(Job, usize)> = jobs
                .iter()
                .map(|&j| (j, self.pending(j)))
                .filter(|&(_, n)| n > 0)
                .collect();
            if left.is_empty() || Instant::now() >= deadline {
                return left;
            }
            // Woken by every job's end; polled too, in case a job ended
            // between the count and the wait.
            let _ = tokio::time::timeout_at(
                deadline.min(Instant::now() + Duration::from_millis(50)),
                ended,
            )
            .await;
        }
    }

    /// The Prometheus text of these metrics.
    pub fn render(&self, out: &mut String) {
        let gauges: [(&str, &str, &str); 5] = [
            (
                "plangate_background_jobs",
                "gauge",
                "Background jobs running or waiting to retry, by kind.",
            ),
            (
                "plangate_background_oldest_seconds",
                "gauge",
                "Age of the oldest running background job, by kind (0: none).",
            ),
            (
                "plangate_background_started_total",
                "counter",
                "Background jobs started, by kind.",
            ),
            (
                "plangate_background_failures_total",
                "counter",
                "Failed attempts of background jobs, by kind.",
            ),
            (
                "plangate_background_refused_total",
                "counter",
                "Background jobs refused at capacity, by kind.",
            ),
        ];
        for (i, (name, kind, help)) in gauges.iter().enumerate() {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for job in Job::ALL {
                let lane = &self.lanes[job.index()];
                let value = match i {
                    0 => self.pending(job).to_string(),
                    1 => format!("{:.3}", self.oldest(job).unwrap_or_default().as_secs_f64()),
                    2 => lane.started.load(Ordering::Relaxed).to_string(),
                    3 => lane.failed.load(Ordering::Relaxed).to_string(),
                    _ => lane.refused.load(Ordering::Relaxed).to_string(),
                };
                let _ = writeln!(out, "{name}{{job=\"{}\"}} {value}", job.as_str());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_running_jobs_their_age_and_failures() {
        let bg = Arc::new(Background::new(10));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let before = Instant::now();
        assert!(bg.spawn(
            Job::Settle,
            Box::pin(async move {
                let _ = rx.await;
            })
        ));
        tokio::task::yield_now().await;
        assert_eq!(bg.pending(Job::Settle), 1);
        assert_eq!(bg.pending(Job::Release), 0);
        let age = bg.oldest(Job::Settle).expect("running");
        assert!(age <= before.elapsed(), "{age:?}");
        assert_eq!(bg.oldest(Job::Release), None);
        bg.failed(Job::Settle);
        let mut text = String::new();
        bg.render(&mut text);
        assert!(
            text.contains("plangate_background_jobs{job=\"settle\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("plangate_background_oldest_seconds{job=\"settle\"} 0.0"),
            "{text}"
        );
        assert!(
            text.contains("plangate_background_oldest_seconds{job=\"release\"} 0.000\n"),
            "{text}"
        );
        assert!(
            text.contains("plangate_background_failures_total{job=\"settle\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("plangate_background_started_total{job=\"release\"} 0\n"),
            "{text}"
        );
        tx.send(()).expect("job waits");
        let left = bg
            .idle(&[Job::Settle], Instant::now() + Duration::from_secs(1))
            .await;
        assert!(left.is_empty(), "{left:?}");
        assert_eq!(bg.oldest(Job::Settle), None);
    }

    #[tokio::test]
    async fn refuses_beyond_capacity_and_idle_names_what_is_left() {
        let bg = Arc::new(Background::new(2));
        let (tx, rx) = tokio::sync::watch::channel(false);
        for _ in 0..2 {
            let mut rx = rx.clone();
            assert!(bg.spawn(
                Job::Release,
                Box::pin(async move {
                    let _ = rx.wait_for(|done| *done).await;
                })
            ));
        }
        assert!(!bg.spawn(Job::Settle, Box::pin(async {})), "at capacity");
        assert_eq!(bg.refusals(Job::Settle), 1);
        // Work that has its own task is counted but never refused.
        assert_eq!(bg.run(Job::Renew, async { 7 }).await, 7);
        let left = bg
            .idle(&[Job::Release], Instant::now() + Duration::from_millis(20))
            .await;
        assert_eq!(left, vec![(Job::Release, 2)]);
        tx.send(true).expect("jobs wait");
        let left = bg
            .idle(&[Job::Release], Instant::now() + Duration::from_secs(1))
            .await;
        assert!(left.is_empty(), "{left:?}");
        assert!(bg.spawn(Job::Settle, Box::pin(async {})), "room again");
        assert_eq!(bg.pending(Job::Settle), 0, "done on its first poll");
    }
}
