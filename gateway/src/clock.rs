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
