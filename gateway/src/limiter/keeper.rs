//! The lease keeper: the registry of live permits whose concurrency leases
//! the limiter renews in the background, independent of whether anyone
//! polls the response body.
//!
//! Every admitted [`super::Permit`] registers here (one shard lock and one
//! insert) and deregisters when it is ended, handed over as a ticket or
//! dropped (one lock and one remove). A lease is due for renewal at half
//! its length after admission (and after each renewal), read from the
//! limiter's clock, so a request that ends sooner — the normal case —
//! never costs a renewal. One background task per limiter runs the passes
//! ([`super::Limiter::renew_due`]); this module only keeps the books.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::Ticket;

/// Shards of the registry: admissions and ends on different shards do not
/// contend.
const SHARDS: usize = 16;

/// Identifies one registered permit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LeaseKey(u64);

/// What a renewal needs, and when it is next due.
#[derive(Debug)]
struct Lease {
    request_id: Arc<str>,
    account: Arc<str>,
    endpoint: Arc<str>,
    lease_ms: u64,
    /// Clock time (ms) at which the next renewal is due.
    due_ms: u64,
}

/// A lease due for renewal, taken out of the registry by a pass.
#[derive(Debug, Clone)]
pub(crate) struct DueLease {
    pub key: LeaseKey,
    pub request_id: Arc<str>,
    pub account: Arc<str>,
    pub endpoint: Arc<str>,
    pub lease_ms: u64,
}

/// Keys are sequence numbers: a multiply spreads them over the table's
/// bits at a fraction of SipHash's cost.
#[derive(Default)]
struct SeqHasher(u64);

impl Hasher for SeqHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type Shard = HashMap<u64, Lease, BuildHasherDefault<SeqHasher>>;

/// The registry of live permits.
#[derive(Debug)]
pub(crate) struct Keeper {
    shards: Box<[Mutex<Shard>]>,
    next: AtomicU64,
}

impl Default for Keeper {
    fn default() -> Self {
        Keeper {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            next: AtomicU64::new(0),
        }
    }
}

/// When a lease renewed (or admitted) at `at_ms` is next due: at half its
/// length, so a pass that runs late, or a renewal that fails and is
/// retried, still lands before it runs out.
pub(crate) fn due_after(at_ms: u64, lease_ms: u64) -> u64 {
    at_ms.saturating_add((lease_ms / 2).max(1))
}

/// When a failed renewal is tried again: an eighth of the lease later, so
/// a store that is briefly unavailable gets a few more tries before the
/// lease runs out.
pub(crate) fn retry_after(at_ms: u64, lease_ms: u64) -> u64 {
    at_ms.saturating_add((lease_ms / 8).max(1))
}

impl Keeper {
    fn shard(&self, key: u64) -> &Mutex<Shard> {
        &self.shards[(key % self.shards.len() as u64) as usize]
    }

    /// Start keeping the lease of an admitted ticket (admitted at
    /// `ticket.admitted_ms` with a lease of `lease_ms`).
    pub fn register(&self, ticket: &Ticket, lease_ms: u64) -> LeaseKey {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let lease = Lease {
            request_id: ticket.request_id.clone(),
            account: ticket.account.clone(),
            endpoint: ticket.endpoint.clone(),
            lease_ms,
            due_ms: due_after(ticket.admitted_ms, lease_ms),
        };
        self.shard(key).lock().insert(key, lease);
        LeaseKey(key)
    }

    /// Stop keeping a lease (ended, handed over, dropped or lost).
    pub fn deregister(&self, key: LeaseKey) {
        // Dropped outside the lock: the Arcs' counts are not the shard's
        // business.
        let removed = self.shard(key.0).lock().remove(&key.0);
        drop(removed);
    }

    /// Set when a lease still registered is next due.
    pub fn reschedule(&self, key: LeaseKey, due_ms: u64) {
        if let Some(lease) = self.shard(key.0).lock().get_mut(&key.0) {
            lease.due_ms = due_ms;
        }
    }

    /// Every registered lease due at `now_ms`.
    pub fn due(&self, now_ms: u64) -> Vec<DueLease> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.lock();
            out.extend(
                shard
                    .iter()
                    .filter(|(_, l)| l.due_ms <= now_ms)
                    .map(|(&k, l)| DueLease {
                        key: LeaseKey(k),
                        request_id: l.request_id.clone(),
                        account: l.account.clone(),
                        endpoint: l.endpoint.clone(),
                        lease_ms: l.lease_ms,
                    }),
            );
        }
        out
    }

    /// Number of leases kept.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }
}
