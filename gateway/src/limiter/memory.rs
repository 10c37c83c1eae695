//! In-process counter store: sharded, bounded memory.
//!
//! (account, endpoint) pairs are spread over [`DEFAULT_SHARDS`] mutex-guarded
//! maps by hash, so operations on different pairs rarely contend and every
//! operation on one pair is atomic (it runs under that pair's shard lock).
//!
//! Memory stays bounded by what is live: a pair keeps only the current
//! window of each (window length, unit) and its in-flight records (an
//! expired one for [`SETTLE_GRACE_MS`] more, so that its end still settles).
//! Ended windows and records past their grace are dropped whenever their
//! pair is touched, and every `sweep_every` operations one shard is swept (round
//! robin), so pairs nobody touches again vanish too.
//!
//! Entries are compact, because a gateway may hold one per account: with
//! 100,000 accounts and 3 windows, a pair costs about 280 bytes of RSS (one
//! flat table slot, one allocation for its name, one for its counters; the
//! in-flight list is freed when empty), where nested maps took about 850.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};

use hashbrown::HashTable;
use parking_lot::Mutex;

use std::collections::{HashMap, VecDeque};

use super::wallet::{
    admission_key, request_key, usage_key, Charged, CreditAsk, OutboxItem, OutboxOp, Unended,
    Wallet, WalletInit, WalletOp, WalletSnapshot, WALLET_TTL_MS,
};
use super::{
    AttemptOutcome, AttemptRequest, CounterStore, EndRequest, KeyScope, RenewRequest, StoreError,
    Usage, UsageRequest, Verdict, SETTLE_GRACE_MS,
};
use crate::catalog::{Draw, RequestCharge};
use crate::plans::{Period, Unit, WindowLen};

/// Number of shards of a [`MemoryStore::new`] store.
pub const DEFAULT_SHARDS: usize = 64;

/// Operations between two shard sweeps of a [`MemoryStore::new`] store.
pub const DEFAULT_SWEEP_EVERY: u64 = 1024;

/// The in-process [`CounterStore`].
#[derive(Debug)]
pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    ops: AtomicU64,
    sweep_every: u64,
    /// Credit wallets and outboxes by account, sharded by account. Locked
    /// after a pair's shard when both are needed (never the other way
    /// round), so an attempt checks windows and credits atomically.
    credits: Box<[Mutex<CreditShard>]>,
    /// Outbox entry ids, increasing.
    outbox_ids: AtomicU64,
    /// Keeps the outboxes durable (`[storage] spool`).
    spool: Option<super::spool::Spool>,
    /// About how many bytes the outboxes hold ([`OutboxItem::approx_bytes`]).
    outbox_bytes: AtomicU64,
    /// Past this many, admissions are refused (`[storage] outbox_memory`):
    /// while the catalog does not take the outboxes, memory stays bounded.
    outbox_max: u64,
}

/// Accounts' credit states, by account id.
type CreditShard = HashMap<Box<str>, AccountCredits>;

/// An account's credit state in the in-process store.
#[derive(Debug, Default)]
struct AccountCredits {
    /// With the catalog time (ms) it was loaded at.
    wallet: Option<(Wallet, u64)>,
    outbox: VecDeque<OutboxItem>,
    /// The newest credit version seen in an invalidation.
    min_version: u64,
    /// Draws of admissions not ended yet, by request id: recorded (or
    /// given back) at their end; a wallet loaded meanwhile holds them back.
    admissions: HashMap<Box<str>, Vec<Draw>>,
    /// How many times the outbox was acknowledged
    /// ([`CounterStore::outbox_acks`]).
    acks: u64,
}

impl AccountCredits {
    /// The wallet, unless it has outlived [`WALLET_TTL_MS`].
    fn wallet(&mut self, now_ms: u64) -> Option<&mut Wallet> {
        if self
            .wallet
            .as_ref()
            .is_some_and(|(_, at)| now_ms >= at.saturating_add(WALLET_TTL_MS))
        {
            self.wallet = None;
        }
        self.wallet.as_mut().map(|(w, _)| w)
    }

    fn is_empty(&self) -> bool {
        // `acks` keeps the state (a few words per account written to the
        // catalog): a load that read it must see it move.
        self.wallet.is_none()
            && self.outbox.is_empty()
            && self.min_version == 0
            && self.admissions.is_empty()
            && self.acks == 0
    }
}

/// One flat table of pairs per shard, hashed like the shard choice
/// (`MemoryStore::hash`), so that lookups borrow the `&str`s of the request
/// instead of allocating a key per operation.
type Shard = HashTable<Pair>;

/// An (account, endpoint) pair and its entry.
#[derive(Debug)]
struct Pair {
    /// The account id followed by the endpoint name, in one allocation.
    name: Box<str>,
    /// Length of the account id in `name`.
    split: usize,
    entry: Entry,
}

impl Pair {
    fn account(&self) -> &str {
        &self.name[..self.split]
    }

    fn endpoint(&self) -> &str {
        &self.name[self.split..]
    }

    fn is(&self, account: &str, endpoint: &str) -> bool {
        self.account() == account && self.endpoint() == endpoint
    }
}

/// Everything kept for one (account, endpoint).
#[derive(Debug, Default)]
struct Entry {
    /// The current (or most recent) window of each (length, unit).
    counters: Vec<Counter>,
    /// The counters of API keys with plans of their own (issue 15 item
    /// 3), by key: under the pair's lock with the account's, so one
    /// attempt admits against both. Empty (no allocation) for accounts
    /// whose keys have no plan.
    keyed: Vec<KeyCounters>,
    /// Request id and lease expiry (ms). A record is live while expiry > now,
    /// and kept until expiry + [`SETTLE_GRACE_MS`] so that an end settles it.
    /// A list rather than a map: counting the live records (every
    /// admission) scans them all anyway, most pairs have none or a few in
    /// flight, and an empty list holds no memory.
    in_flight: Vec<(Box<str>, u64)>,
    /// A lower bound of the earliest expiry + grace in `in_flight`
    /// (u64::MAX when empty), so pruning is O(1) until a record can be past
    /// its grace.
    next_drop: u64,
}

/// One API key's own counters in a pair.
#[derive(Debug)]
struct KeyCounters {
    key: Box<str>,
    counters: Vec<Counter>,
}

#[derive(Debug)]
struct Counter {
    /// The window's [`len_code`].
    len: u64,
    unit: Unit,
    index: u64,
    count: u64,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// A store with [`DEFAULT_SHARDS`] shards, sweeping one shard every
    /// [`DEFAULT_SWEEP_EVERY`] operations.
    pub fn new() -> Self {
        Self::with_options(DEFAULT_SHARDS, DEFAULT_SWEEP_EVERY)
    }

    /// A store with `shards` shards (at least 1) that sweeps one shard
    /// every `sweep_every` operations (at least 1).
    pub fn with_options(shards: usize, sweep_every: u64) -> Self {
        let shards = (0..shards.max(1))
            .map(|_| Mutex::new(Shard::default()))
            .collect();
        MemoryStore {
            shards,
            hasher: RandomState::new(),
            ops: AtomicU64::new(0),
            sweep_every: sweep_every.max(1),
            credits: (0..DEFAULT_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
            outbox_ids: AtomicU64::new(0),
            spool: None,
            outbox_bytes: AtomicU64::new(0),
            outbox_max: u64::MAX,
        }
    }

    /// Refuse admissions while the outboxes hold `bytes` or more (about:
    /// [`OutboxItem::approx_bytes`]) that the catalog has not taken. The
    /// ends of requests already admitted still append theirs, so the bound
    /// is exceeded by at most what the requests in flight record.
    pub fn with_outbox_limit(mut self, bytes: u64) -> Self {
        self.outbox_max = bytes;
        self
    }

    /// About how many bytes the outboxes hold.
    pub fn outbox_bytes(&self) -> u64 {
        self.outbox_bytes.load(Ordering::Relaxed)
    }

    /// A store whose outboxes are kept durable in the spool file at `path`
    /// (`[storage] spool`): its entries not yet acknowledged are loaded
    /// into the outboxes (and the admission charges of requests that never
    /// ended refunded) before the store is used. Returns how many
    /// admissions were refunded.
    pub fn with_spool(path: &std::path::Path, now_ms: u64) -> std::io::Result<(Self, usize)> {
        let (spool, replayed) = super::spool::Spool::open(path, now_ms)?;
        let mut store = Self::new();
        store.outbox_ids = AtomicU64::new(replayed.max_id);
        for (account, items) in replayed.outboxes {
            let bytes: u64 = items.iter().map(OutboxItem::approx_bytes).sum();
            store.outbox_bytes.fetch_add(bytes, Ordering::Relaxed);
            store.with_credits(&account, |credits| credits.outbox.extend(items));
        }
        store.spool = Some(spool);
        Ok((store, replayed.refunded))
    }

    fn credit_shard(&self, account: &str) -> &Mutex<CreditShard> {
        let h = self.hasher.hash_one(account);
        &self.credits[((h >> 32) % self.credits.len() as u64) as usize]
    }

    /// Run `f` on the account's credit state (created for it).
    fn with_credits<T>(&self, account: &str, f: impl FnOnce(&mut AccountCredits) -> T) -> T {
        let mut shard = self.credit_shard(account).lock();
        if !shard.contains_key(account) {
            shard.insert(Box::from(account), AccountCredits::default());
        }
        let credits = shard.get_mut(account).expect("inserted above");
        let out = f(credits);
        if credits.is_empty() {
            shard.remove(account);
        }
        out
    }

    fn push_op(&self, account: &str, credits: &mut AccountCredits, op: WalletOp) {
        self.push(account, credits, OutboxOp::Credit(op));
    }

    /// Append to the account's outbox (and to the spool, under the
    /// account's lock: the file has each account's order).
    fn push(&self, account: &str, credits: &mut AccountCredits, op: OutboxOp) {
        let id = self.outbox_ids.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(spool) = &self.spool {
            spool.op(account, id, &op);
        }
        let item = OutboxItem {
            id: id.to_string(),
            op,
        };
        self.outbox_bytes
            .fetch_add(item.approx_bytes(), Ordering::Relaxed);
        credits.outbox.push_back(item);
    }

    /// The admission's credit charge (windows and concurrency admitted it).
    fn charge_admission(
        &self,
        credits: &mut AccountCredits,
        req: &AttemptRequest<'_>,
        ask: CreditAsk,
    ) -> Result<Charged, (Verdict, Option<Charged>)> {
        let Some(wallet) = credits.wallet(req.now_ms) else {
            return Err((Verdict::NoWallet, None));
        };
        let balance = wallet.balance(req.now_ms);
        if balance < ask.threshold || balance < ask.amount {
            let refused = Charged {
                balance,
                draws: Vec::new(),
            };
            return Err((Verdict::NoCredits, Some(refused)));
        }
        let (taken, draws) = wallet.draw(ask.amount);
        if taken > 0 {
            // Recorded at the end, with the per-unit charge.
            credits
                .admissions
                .insert(Box::from(req.request_id), draws.clone());
        }
        Ok(Charged {
            balance: balance - taken,
            draws,
        })
    }

    /// The credits and the usage record of an end (`settles`: its record
    /// was there).
    fn settle_credits(&self, credits: &mut AccountCredits, req: &EndRequest<'_>, settles: bool) {
        let usage = req.usage.filter(|_| settles);
        let (taken, charge) = self.settle_charges(credits, req, settles, usage.is_some());
        if let Some(usage) = usage {
            let mut usage = usage.clone();
            match charge {
                Some((deducted, charge)) => {
                    usage.credits = deducted;
                    usage.charge = Some(charge);
                }
                None => usage.credits = usage.credits.saturating_add(taken),
            }
            self.push(req.account, credits, OutboxOp::Usage(Box::new(usage)));
        }
    }

    /// The admission's charge and the per-unit charge of an end, as one
    /// ledger entry (`req:<id>`), or the admission's draws given back; what
    /// the per-unit charge took, and, with `carried` (the end has a usage
    /// record to carry it), the charge for the usage record instead of a
    /// ledger row of its own (with what it took in all). Mirrors the Redis
    /// end script.
    fn settle_charges(
        &self,
        credits: &mut AccountCredits,
        req: &EndRequest<'_>,
        settles: bool,
        carried: bool,
    ) -> (u64, Option<(u64, RequestCharge)>) {
        let now = req.now_ms;
        let admitted = credits.admissions.remove(req.request_id);
        if req.credits.refund {
            if let (Some(draws), Some(wallet)) = (&admitted, credits.wallet(now)) {
                wallet.give_back(draws);
            }
            return (0, None);
        }
        let charge = if settles { req.credits.charge } else { 0 };
        if admitted.is_none() && charge == 0 {
            return (0, None);
        }
        let adm_draws = admitted.unwrap_or_default();
        let adm_taken: u64 = adm_draws.iter().map(|d| d.credits).sum();
        let op = |key: String, requested, deducted, draws| WalletOp::Charge {
            key,
            request_id: req.request_id.to_owned(),
            endpoint: req.endpoint.to_owned(),
            requested,
            deducted,
            draws,
            at_ms: now,
        };
        let loaded = charge == 0 || credits.wallet(now).is_some();
        if loaded {
            let (taken, unit_draws) = match credits.wallet(now) {
                Some(wallet) if charge > 0 => {
                    wallet.balance(now);
                    wallet.draw(charge)
                }
                _ => (0, Vec::new()),
            };
            let draws = super::wallet::merge_draws(&adm_draws, &unit_draws);
            if carried {
                let requested = adm_taken + charge;
                return (
                    taken,
                    Some((adm_taken + taken, RequestCharge { requested, draws })),
                );
            }
            let charge_op = op(
                request_key(req.request_id),
                adm_taken + charge,
                Some(adm_taken + taken),
                draws,
            );
            self.push_op(req.account, credits, charge_op);
            return (taken, None);
        }
        // The wallet was dropped meanwhile: the admission as decided, the
        // per-unit charge for the catalog to decide.
        if adm_taken > 0 {
            let adm = op(
                admission_key(req.request_id),
                adm_taken,
                Some(adm_taken),
                adm_draws,
            );
            self.push_op(req.account, credits, adm);
        }
        let unit = op(usage_key(req.request_id), charge, None, Vec::new());
        self.push_op(req.account, credits, unit);
        (0, None)
    }

    /// Number of (account, endpoint) pairs currently held.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// Whether no pair is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drop every ended window and every in-flight record past its grace as
    /// of `now_ms`, and every pair left with nothing.
    pub fn sweep_all(&self, now_ms: u64) {
        for shard in self.shards.iter() {
            self.sweep(&mut shard.lock(), now_ms);
        }
    }

    fn hash(&self, account: &str, endpoint: &str) -> u64 {
        self.hasher.hash_one((account, endpoint))
    }

    /// The shard of a pair with hash `h`: chosen by the upper half of the
    /// hash, since the table inside uses its low bits (and top 7).
    fn shard(&self, h: u64) -> &Mutex<Shard> {
        &self.shards[((h >> 32) % self.shards.len() as u64) as usize]
    }

    fn sweep(&self, shard: &mut Shard, now_ms: u64) {
        shard.retain(|p| {
            p.entry.prune(now_ms);
            !p.entry.is_empty()
        });
        // Give memory back after a burst: a table never shrinks by itself.
        if shard.capacity() > 64 && shard.len() < shard.capacity() / 4 {
            shard.shrink_to_fit(|p| self.hash(p.account(), p.endpoint()));
        }
    }

    /// Count an operation; every `sweep_every`th sweeps the next shard in
    /// turn. Called after the operation's own lock is released.
    fn tick(&self, now_ms: u64) {
        let n = self.ops.fetch_add(1, Ordering::Relaxed) + 1;
        if n % self.sweep_every == 0 {
            let i = (n / self.sweep_every) % self.shards.len() as u64;
            self.sweep(&mut self.shards[i as usize].lock(), now_ms);
        }
    }

    /// Run `f` on the pair's entry (pruned as of `now_ms`), creating it only
    /// if `f` says it must be kept; drop it if it is left empty.
    fn with_entry<T>(
        &self,
        account: &str,
        endpoint: &str,
        now_ms: u64,
        f: impl FnOnce(&mut Entry) -> T,
    ) -> T {
        let h = self.hash(account, endpoint);
        let out = {
            let mut shard = self.shard(h).lock();
            match shard.find_entry(h, |p| p.is(account, endpoint)) {
                Ok(mut found) => {
                    let entry = &mut found.get_mut().entry;
                    entry.prune(now_ms);
                    let out = f(entry);
                    if entry.is_empty() {
                        found.remove();
                    }
                    out
                }
                Err(_) => {
                    let mut entry = Entry::new();
                    let out = f(&mut entry);
                    if !entry.is_empty() {
                        let pair = Pair {
                            name: [account, endpoint].concat().into_boxed_str(),
                            split: account.len(),
                            entry,
                        };
                        shard.insert_unique(h, pair, |p| self.hash(p.account(), p.endpoint()));
                    }
                    out
                }
            }
        };
        self.tick(now_ms);
        out
    }
}

impl Entry {
    fn new() -> Self {
        Entry {
            counters: Vec::new(),
            keyed: Vec::new(),
            in_flight: Vec::new(),
            next_drop: u64::MAX,
        }
    }

    fn is_empty(&self) -> bool {
        self.counters.is_empty() && self.keyed.is_empty() && self.in_flight.is_empty()
    }

    /// Drop ended windows and in-flight records past their grace.
    fn prune(&mut self, now_ms: u64) {
        self.counters
            .retain(|c| c.index >= len_from_code(c.len).index(now_ms));
        if !self.keyed.is_empty() {
            self.keyed.retain_mut(|k| {
                k.counters
                    .retain(|c| c.index >= len_from_code(c.len).index(now_ms));
                !k.counters.is_empty()
            });
        }
        if now_ms >= self.next_drop {
            self.in_flight.retain(|&(_, exp)| drop_at(exp) > now_ms);
            self.next_drop = self
                .in_flight
                .iter()
                .map(|&(_, exp)| drop_at(exp))
                .min()
                .unwrap_or(u64::MAX);
            self.shrink_in_flight();
        }
    }

    /// Free the in-flight list when it is empty (most pairs, most of the
    /// time) and give memory back after a burst.
    fn shrink_in_flight(&mut self) {
        let (len, cap) = (self.in_flight.len(), self.in_flight.capacity());
        if len == 0 && cap > 0 {
            self.in_flight = Vec::new();
        } else if cap > 64 && len < cap / 4 {
            self.in_flight.shrink_to_fit();
        }
    }

    fn in_flight_pos(&self, request_id: &str) -> Option<usize> {
        self.in_flight
            .iter()
            .position(|(id, _)| **id == *request_id)
    }

    /// The account's counters, or `key`'s own.
    fn counters(&self, key: Option<&str>) -> &[Counter] {
        match key {
            None => &self.counters,
            Some(key) => self
                .keyed
                .iter()
                .find(|k| *k.key == *key)
                .map_or(&[], |k| &k.counters),
        }
    }

    /// The account's counters, or `key`'s own (created if missing).
    fn counters_mut(&mut self, key: Option<&str>) -> &mut Vec<Counter> {
        let Some(key) = key else {
            return &mut self.counters;
        };
        let pos = match self.keyed.iter().position(|k| *k.key == *key) {
            Some(p) => p,
            None => {
                self.keyed.push(KeyCounters {
                    key: Box::from(key),
                    counters: Vec::new(),
                });
                self.keyed.len() - 1
            }
        };
        &mut self.keyed[pos].counters
    }

    /// Units used in the window of length `len` on `unit` that contains
    /// `now_ms`, the account's or `key`'s own.
    fn used(&self, key: Option<&str>, len: WindowLen, unit: &Unit, now_ms: u64) -> u64 {
        let index = len.index(now_ms);
        let code = len_code(len);
        self.counters(key)
            .iter()
            .find(|c| c.len == code && c.unit == *unit && c.index == index)
            .map_or(0, |c| c.count)
    }

    /// The counter of the current window, created (or moved on from an
    /// ended window) as needed.
    fn current(
        &mut self,
        key: Option<&str>,
        len: WindowLen,
        unit: &Unit,
        now_ms: u64,
    ) -> &mut Counter {
        let index = len.index(now_ms);
        let code = len_code(len);
        let counters = self.counters_mut(key);
        let pos = counters
            .iter()
            .position(|c| c.len == code && c.unit == *unit);
        let pos = match pos {
            Some(p) => p,
            None => {
                // Grown one at a time: a pair has a handful of counters
                // (one per window), and the default growth to 4 would
                // waste a quarter of a 3-window pair's counter memory.
                counters.reserve_exact(1);
                counters.push(Counter {
                    len: code,
                    unit: unit.clone(),
                    index,
                    count: 0,
                });
                counters.len() - 1
            }
        };
        let c = &mut counters[pos];
        if c.index != index {
            c.index = index;
            c.count = 0;
        }
        c
    }

    fn live(&self, now_ms: u64) -> u32 {
        let n = self.in_flight.iter().filter(|&&(_, e)| e > now_ms).count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// `charge` runs once windows and concurrency admit, before anything
    /// is written: it takes the credits or refuses (then nothing is
    /// written either).
    fn attempt(
        &mut self,
        req: &AttemptRequest<'_>,
        charge: impl FnOnce() -> Result<Option<Charged>, (Verdict, Option<Charged>)>,
    ) -> AttemptOutcome {
        let now = req.now_ms;
        let n = req.windows.len();
        let mut used: Vec<u64> = req
            .windows
            .iter()
            .enumerate()
            .map(|(i, w)| self.used(KeyScope::of(req.key, n, i), w.len, &w.unit, now))
            .collect();
        let in_flight = self.live(now);
        let record = self.in_flight_pos(req.request_id);
        let duplicate = record.is_some_and(|i| self.in_flight[i].1 > now);
        let full = req
            .windows
            .iter()
            .zip(&used)
            .position(|(w, &u)| u.saturating_add(w.amount.max(1)) > w.limit);
        let verdict = if duplicate {
            Verdict::Duplicate
        } else if let Some(index) = full {
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
        let credits = match charge() {
            Ok(charged) => charged,
            Err((verdict, credits)) => {
                return AttemptOutcome {
                    verdict,
                    used,
                    in_flight,
                    credits,
                }
            }
        };
        for (i, (w, u)) in req.windows.iter().zip(used.iter_mut()).enumerate() {
            // A zero amount writes nothing, as in the Redis store, so that
            // an unused window does not hold memory.
            if w.amount > 0 {
                let c = self.current(KeyScope::of(req.key, n, i), w.len, &w.unit, now);
                c.count = c.count.saturating_add(w.amount);
                *u = c.count;
            }
        }
        let expiry = now.saturating_add(req.lease_ms);
        match record {
            // An expired record of the same id, still in its grace:
            // replaced, as a map insert (Redis' ZADD) would.
            Some(i) => self.in_flight[i].1 = expiry,
            None => self.in_flight.push((Box::from(req.request_id), expiry)),
        }
        self.next_drop = self.next_drop.min(drop_at(expiry));
        AttemptOutcome {
            verdict,
            used,
            in_flight: in_flight.saturating_add(1),
            credits,
        }
    }

    fn end(&mut self, req: &EndRequest<'_>) -> bool {
        // Pruning already dropped the record if its grace ran out; a
        // record still here is settled, whether its lease expired or not.
        let Some(i) = self.in_flight_pos(req.request_id) else {
            return false;
        };
        self.in_flight.swap_remove(i);
        self.shrink_in_flight();
        let now = req.now_ms;
        let n = req.settlements.len();
        for (i, s) in req.settlements.iter().enumerate() {
            let key = KeyScope::of(req.key, n, i);
            if s.actual > s.reserved {
                let c = self.current(key, s.len, &s.unit, now);
                c.count = c.count.saturating_add(s.actual - s.reserved);
            } else if s.actual < s.reserved {
                let back = s.reserved - s.actual;
                let counters = match key {
                    None => Some(&mut self.counters),
                    Some(key) => self
                        .keyed
                        .iter_mut()
                        .find(|k| *k.key == *key)
                        .map(|k| &mut k.counters),
                };
                if let Some(c) = counters.into_iter().flatten().find(|c| {
                    c.len == len_code(s.len) && c.unit == s.unit && c.index == s.admitted_index
                }) {
                    c.count = c.count.saturating_sub(back);
                }
            }
        }
        true
    }
}

/// A window length in 8 bytes rather than [`WindowLen`]'s 16, for the
/// counters (most of this store's memory): fixed windows are their seconds
/// (at most `MAX_WINDOW_SECS`), calendar periods the top values.
fn len_code(len: WindowLen) -> u64 {
    match len {
        WindowLen::Fixed(secs) => secs,
        WindowLen::Calendar(Period::Day) => u64::MAX,
        WindowLen::Calendar(Period::Week) => u64::MAX - 1,
        WindowLen::Calendar(Period::Month) => u64::MAX - 2,
        WindowLen::Calendar(Period::MonthFrom(a)) => u64::MAX - 100 - u64::from(a),
    }
}

/// The inverse of [`len_code`].
fn len_from_code(code: u64) -> WindowLen {
    match u64::MAX - code {
        0 => WindowLen::Calendar(Period::Day),
        1 => WindowLen::Calendar(Period::Week),
        2 => WindowLen::Calendar(Period::Month),
        // Anchors are 0..=255 as u8: codes MAX-100 .. MAX-355.
        n @ 100..=355 => WindowLen::Calendar(Period::MonthFrom((n - 100) as u8)),
        _ => WindowLen::Fixed(code),
    }
}

/// When an in-flight record with lease expiry `expiry` is dropped.
fn drop_at(expiry: u64) -> u64 {
    expiry.saturating_add(SETTLE_GRACE_MS)
}

impl CounterStore for MemoryStore {
    async fn attempt(&self, req: &AttemptRequest<'_>) -> Result<AttemptOutcome, StoreError> {
        let held = self.outbox_bytes();
        if held >= self.outbox_max {
            // The catalog has not taken what was recorded (it is down or
            // slow): admitting more would grow memory without bound. Credit
            // requests fail closed; others as `on_store_error` says.
            return Err(StoreError::Catalog(format!(
                "the in-process outbox holds about {held} bytes the catalog has not taken \
                 (the limit, [storage] outbox_memory, is {})",
                self.outbox_max
            )));
        }
        Ok(self.with_entry(req.account, req.endpoint, req.now_ms, |e| {
            match req.credits {
                None => e.attempt(req, || Ok(None)),
                Some(ask) => self.with_credits(req.account, |credits| {
                    e.attempt(req, || self.charge_admission(credits, req, ask).map(Some))
                }),
            }
        }))
    }

    async fn end(&self, req: &EndRequest<'_>) -> Result<bool, StoreError> {
        Ok(self.with_entry(req.account, req.endpoint, req.now_ms, |e| {
            let settled = e.end(req);
            // An unended admission's charge is recorded even when the
            // record is gone (as on Redis).
            if !req.credits.is_empty() || (settled && req.usage.is_some()) {
                self.with_credits(req.account, |credits| {
                    self.settle_credits(credits, req, settled)
                });
            }
            // After what the end recorded: a crash in between leaves an
            // admission unended, refunded at replay.
            if let (true, Some(spool)) = (settled, &self.spool) {
                spool.ended(req.account, req.request_id);
            }
            settled
        }))
    }

    async fn wallet_init(
        &self,
        account: &str,
        snapshot: &WalletSnapshot,
    ) -> Result<WalletInit, StoreError> {
        Ok(self.with_credits(account, |credits| {
            if credits.wallet.is_some() {
                WalletInit::Loaded
            } else if !credits.outbox.is_empty() || snapshot.acks != credits.acks {
                // Not written yet, or written since the snapshot was read.
                WalletInit::Pending
            } else if snapshot.version < credits.min_version {
                WalletInit::Stale
            } else {
                let unended = credits.admissions.values().map(Vec::as_slice);
                let wallet = Wallet::load(snapshot, unended);
                credits.wallet = Some((wallet, snapshot.loaded_ms));
                WalletInit::Loaded
            }
        }))
    }

    async fn wallet_invalidate(
        &self,
        account: &str,
        version: Option<u64>,
    ) -> Result<(), StoreError> {
        self.with_credits(account, |credits| match version {
            Some(v) => {
                credits.min_version = credits.min_version.max(v);
                if credits.wallet.as_ref().is_some_and(|(w, _)| w.version < v) {
                    credits.wallet = None;
                }
            }
            None => credits.wallet = None,
        });
        Ok(())
    }

    async fn wallet_balance(&self, account: &str, now_ms: u64) -> Result<Option<u64>, StoreError> {
        Ok(self.with_credits(account, |credits| {
            credits.wallet(now_ms).map(|w| w.balance(now_ms))
        }))
    }

    async fn outbox_read(&self, account: &str, max: usize) -> Result<Vec<OutboxItem>, StoreError> {
        Ok(self.with_credits(account, |credits| {
            credits.outbox.iter().take(max).cloned().collect()
        }))
    }

    async fn outbox_ack(&self, account: &str, ids: &[String]) -> Result<(), StoreError> {
        if let Some(spool) = &self.spool {
            let numbers: Vec<u64> = ids.iter().filter_map(|id| id.parse().ok()).collect();
            spool.ack(account, &numbers);
        }
        let ids: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
        let freed = self.with_credits(account, |credits| {
            credits.acks += 1;
            let mut freed = 0;
            credits.outbox.retain(|item| {
                let keep = !ids.contains(item.id.as_str());
                if !keep {
                    freed += item.approx_bytes();
                }
                keep
            });
            freed
        });
        self.outbox_bytes.fetch_sub(freed, Ordering::Relaxed);
        Ok(())
    }

    async fn outbox_acks(&self, account: &str) -> Result<u64, StoreError> {
        Ok(self.with_credits(account, |credits| credits.acks))
    }

    async fn wallet_accounts(&self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .credits
            .iter()
            .flat_map(|shard| {
                shard
                    .lock()
                    .iter()
                    .filter(|(_, c)| c.wallet.is_some())
                    .map(|(a, _)| a.to_string())
                    .collect::<Vec<_>>()
            })
            .collect())
    }

    // One process holds the in-process store: its admissions end with it
    // or not at all, so there is nothing to reap.
    async fn heartbeat(&self, _instance: &str, _ttl_ms: u64) -> Result<(), StoreError> {
        Ok(())
    }

    async fn instance_alive(&self, _instance: &str) -> Result<bool, StoreError> {
        Ok(true)
    }

    async fn unended_admissions(&self, _account: &str) -> Result<Vec<Unended>, StoreError> {
        Ok(Vec::new())
    }

    async fn reap(
        &self,
        _account: &str,
        _admission: &Unended,
        _now_ms: u64,
    ) -> Result<bool, StoreError> {
        Ok(false)
    }

    async fn reset_windows(
        &self,
        account: &str,
        key: Option<&str>,
        endpoint: &str,
        windows: &[crate::plans::Window],
        now_ms: u64,
    ) -> Result<(), StoreError> {
        let current = |c: &Counter| {
            windows.iter().any(|w| {
                c.len == len_code(w.len) && w.unit == c.unit && c.index == w.len.index(now_ms)
            })
        };
        self.with_entry(account, endpoint, now_ms, |e| match key {
            None => e.counters.retain(|c| !current(c)),
            Some(key) => e.keyed.retain_mut(|k| {
                if *k.key == *key {
                    k.counters.retain(|c| !current(c));
                }
                !k.counters.is_empty()
            }),
        });
        Ok(())
    }

    async fn outbox_accounts(&self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .credits
            .iter()
            .flat_map(|shard| {
                shard
                    .lock()
                    .iter()
                    .filter(|(_, c)| !c.outbox.is_empty())
                    .map(|(a, _)| a.to_string())
                    .collect::<Vec<_>>()
            })
            .collect())
    }

    async fn usage(&self, req: &UsageRequest<'_>) -> Result<Usage, StoreError> {
        Ok(
            self.with_entry(req.account, req.endpoint, req.now_ms, |e| Usage {
                used: req
                    .windows
                    .iter()
                    .enumerate()
                    .map(|(i, w)| {
                        let key = KeyScope::of(req.key, req.windows.len(), i);
                        e.used(key, w.len, &w.unit, req.now_ms)
                    })
                    .collect(),
                in_flight: e.live(req.now_ms),
            }),
        )
    }

    async fn renew(&self, req: &RenewRequest<'_>) -> Result<bool, StoreError> {
        Ok(self.with_entry(req.account, req.endpoint, req.now_ms, |e| {
            match e.in_flight_pos(req.request_id) {
                // Only a live record: an expired one (in its grace) is no
                // longer in flight.
                Some(i) if e.in_flight[i].1 > req.now_ms => {
                    e.in_flight[i].1 = req.now_ms.saturating_add(req.lease_ms);
                    true
                }
                _ => false,
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limiter::{Settlement, WindowSpec};

    const T0: u64 = 1_700_000_000_000;

    fn run<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    fn spec(secs: u64, limit: u64, amount: u64) -> WindowSpec {
        WindowSpec {
            len: WindowLen::Fixed(secs),
            limit,
            unit: Unit::request(),
            amount,
        }
    }

    fn attempt(s: &MemoryStore, account: &str, id: &str, now: u64, lease: u64) -> Verdict {
        let windows = [spec(60, 100, 1)];
        run(s.attempt(&AttemptRequest {
            request_id: id,
            account,
            endpoint: "e",
            now_ms: now,
            windows: &windows,
            max_concurrent: 0,
            lease_ms: lease,
            credits: None,
            key: None,
        }))
        .expect("memory store does not fail")
        .verdict
    }

    #[test]
    fn len_codes_round_trip_and_never_collide() {
        let mut lens = vec![
            WindowLen::Fixed(1),
            WindowLen::Fixed(60),
            WindowLen::Fixed(crate::plans::MAX_WINDOW_SECS),
            WindowLen::Calendar(Period::Day),
            WindowLen::Calendar(Period::Week),
            WindowLen::Calendar(Period::Month),
        ];
        lens.extend((1..=31).map(|a| WindowLen::Calendar(Period::MonthFrom(a))));
        let codes: std::collections::HashSet<u64> = lens.iter().map(|l| len_code(*l)).collect();
        assert_eq!(codes.len(), lens.len());
        for len in lens {
            assert_eq!(len_from_code(len_code(len)), len);
        }
    }

    #[test]
    fn ended_pairs_are_dropped_on_touch() {
        let s = MemoryStore::with_options(4, u64::MAX);
        assert_eq!(attempt(&s, "a", "r1", T0, 1_000), Verdict::Admitted);
        let ended = run(s.end(&EndRequest {
            request_id: "r1",
            account: "a",
            endpoint: "e",
            now_ms: T0 + 10,
            settlements: &[],
            credits: Default::default(),
            usage: None,
            key: None,
            admission: None,
        }))
        .expect("end");
        assert!(ended);
        assert_eq!(s.len(), 1, "the window counter is still live");
        // Touching the pair after its window ended drops everything.
        let usage = run(s.usage(&UsageRequest {
            account: "a",
            endpoint: "e",
            now_ms: T0 + 120_000,
            windows: &[],
            key: None,
        }))
        .expect("usage");
        assert_eq!(usage.in_flight, 0);
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn pairs_are_told_apart_by_both_parts() {
        // "ab" + "c" and "a" + "bc" are stored under the same bytes.
        let s = MemoryStore::with_options(1, u64::MAX);
        let windows = [spec(60, 1, 1)];
        let try_pair = |account: &str, endpoint: &str| {
            run(s.attempt(&AttemptRequest {
                request_id: "r",
                account,
                endpoint,
                now_ms: T0,
                windows: &windows,
                max_concurrent: 0,
                lease_ms: 1_000,
                credits: None,
                key: None,
            }))
            .expect("attempt")
            .verdict
        };
        assert_eq!(try_pair("ab", "c"), Verdict::Admitted);
        assert_eq!(try_pair("a", "bc"), Verdict::Admitted);
        assert_eq!(try_pair("ab", "c"), Verdict::Duplicate);
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn ended_requests_leave_no_in_flight_memory() {
        let s = MemoryStore::with_options(1, u64::MAX);
        assert_eq!(attempt(&s, "a", "r1", T0, 1_000), Verdict::Admitted);
        assert_eq!(attempt(&s, "a", "r2", T0, 1_000), Verdict::Admitted);
        for id in ["r2", "r1"] {
            let ended = run(s.end(&EndRequest {
                request_id: id,
                account: "a",
                endpoint: "e",
                now_ms: T0 + 10,
                settlements: &[],
                credits: Default::default(),
                usage: None,
                key: None,
                admission: None,
            }))
            .expect("end");
            assert!(ended, "{id}");
        }
        let shard = s.shards[0].lock();
        let pair = shard.iter().next().expect("the window counter is live");
        assert_eq!(pair.entry.in_flight.capacity(), 0);
        assert_eq!(pair.entry.counters.capacity(), 1);
    }

    #[test]
    fn sweep_drops_idle_pairs() {
        let s = MemoryStore::with_options(8, u64::MAX);
        for i in 0..1_000 {
            let account = format!("acct-{i}");
            assert_eq!(attempt(&s, &account, "r", T0, 5_000), Verdict::Admitted);
        }
        assert_eq!(s.len(), 1_000);
        // Windows still current, leases still live: nothing goes.
        s.sweep_all(T0 + 1_000);
        assert_eq!(s.len(), 1_000);
        // Leases expired, but the minute window is still current.
        let minute_end = (T0 / 60_000 + 1) * 60_000;
        s.sweep_all(minute_end - 1);
        assert_eq!(s.len(), 1_000);
        // The window ended, but the expired records are kept for their
        // grace (an end would still settle them).
        s.sweep_all(minute_end);
        assert_eq!(s.len(), 1_000);
        let dropped = T0 + 5_000 + SETTLE_GRACE_MS;
        s.sweep_all(dropped - 1);
        assert_eq!(s.len(), 1_000);
        s.sweep_all(dropped);
        assert_eq!(s.len(), 0);
        assert!(s.is_empty());
    }

    #[test]
    fn amortized_sweep_reaches_every_shard() {
        let s = MemoryStore::with_options(4, 2);
        for i in 0..100 {
            let account = format!("acct-{i}");
            attempt(&s, &account, "r", T0, 1_000);
        }
        assert_eq!(s.len(), 100);
        // Operations on one unrelated pair, long after (past the leases'
        // grace): the round-robin sweep visits every shard within
        // shards * sweep_every operations.
        let later = T0 + 1_000 + SETTLE_GRACE_MS;
        for i in 0..8 {
            attempt(&s, "busy", &format!("b{i}"), later, 1_000);
        }
        assert_eq!(s.len(), 1, "only the busy pair is left");
    }

    #[test]
    fn expired_records_are_not_in_flight() {
        let s = MemoryStore::new();
        assert_eq!(attempt(&s, "a", "r1", T0, 1_000), Verdict::Admitted);
        assert_eq!(attempt(&s, "a", "r1", T0 + 999, 1_000), Verdict::Duplicate);
        // Lease over: the same id is admitted again (its expired record
        // replaced, not duplicated), and ending the old one afterwards ends
        // the new one (ids are the caller's business).
        assert_eq!(attempt(&s, "a", "r1", T0 + 1_000, 1_000), Verdict::Admitted);
        let settle = [Settlement {
            len: WindowLen::Fixed(60),
            unit: Unit::request(),
            admitted_index: WindowLen::Fixed(60).index(T0),
            reserved: 1,
            actual: 3,
        }];
        let end = |now_ms| {
            run(s.end(&EndRequest {
                request_id: "r1",
                account: "a",
                endpoint: "e",
                now_ms,
                settlements: &settle,
                credits: Default::default(),
                usage: None,
                key: None,
                admission: None,
            }))
            .expect("end")
        };
        let usage = |now_ms| {
            run(s.usage(&UsageRequest {
                account: "a",
                endpoint: "e",
                now_ms,
                windows: &[crate::plans::Window {
                    len: WindowLen::Fixed(60),
                    limit: 100,
                    unit: Unit::request(),
                }],
                key: None,
            }))
            .expect("usage")
        };
        // Its lease ran out at T0+2000: not in flight, but still settled.
        let u = usage(T0 + 2_500);
        assert_eq!((u.used.clone(), u.in_flight), (vec![2], 0));
        assert!(end(T0 + 2_500), "settled within the grace");
        assert_eq!(usage(T0 + 2_500).used, vec![4]);
        assert!(!end(T0 + 2_600), "settled once");
        assert_eq!(usage(T0 + 2_600).used, vec![4]);
        let shard = s
            .shards
            .iter()
            .find(|s| !s.lock().is_empty())
            .expect("pair");
        let shard = shard.lock();
        let pair = shard.iter().next().expect("pair");
        assert!(pair.entry.in_flight.is_empty());
    }

    #[test]
    fn expired_records_are_dropped_after_their_grace() {
        let s = MemoryStore::with_options(1, u64::MAX);
        assert_eq!(attempt(&s, "a", "r1", T0, 1_000), Verdict::Admitted);
        let end = |now_ms| {
            run(s.end(&EndRequest {
                request_id: "r1",
                account: "a",
                endpoint: "e",
                now_ms,
                settlements: &[],
                credits: Default::default(),
                usage: None,
                key: None,
                admission: None,
            }))
            .expect("end")
        };
        // Past the grace: the record is gone, the end changes nothing.
        assert!(!end(T0 + 1_000 + SETTLE_GRACE_MS));
        assert_eq!(s.len(), 0);
    }

    /// Past `with_outbox_limit`, admissions fail (the catalog has not taken
    /// what was recorded) until the outbox is acknowledged; the end of a
    /// request admitted before still records.
    #[test]
    fn a_full_outbox_refuses_admissions_until_acknowledged() {
        let record = |id: &str| crate::catalog::UsageEvent {
            request_id: id.into(),
            account_id: "a".into(),
            key_id: Some("key_1".into()),
            endpoint: "e".into(),
            route: "/v1/chat/completions".into(),
            units: Vec::new(),
            credits: 0,
            status: 200,
            degraded: false,
            streamed: false,
            cut_short: false,
            started_at: std::time::UNIX_EPOCH,
            ended_at: std::time::UNIX_EPOCH,
            charge: None,
        };
        let s = MemoryStore::new().with_outbox_limit(1_000);
        let end = |id: &str| {
            let usage = record(id);
            run(s.end(&EndRequest {
                request_id: id,
                account: "a",
                endpoint: "e",
                now_ms: T0,
                settlements: &[],
                credits: Default::default(),
                usage: Some(&usage),
                key: None,
                admission: None,
            }))
            .expect("end")
        };
        let try_admit = |id: &str| {
            run(s.attempt(&AttemptRequest {
                request_id: id,
                account: "a",
                endpoint: "e",
                now_ms: T0,
                windows: &[spec(60, 100, 1)],
                max_concurrent: 0,
                lease_ms: 60_000,
                credits: None,
                key: None,
            }))
        };
        let mut admitted = 0;
        while let Ok(outcome) = try_admit(&format!("r{admitted}")) {
            assert_eq!(outcome.verdict, Verdict::Admitted);
            assert!(end(&format!("r{admitted}")));
            admitted += 1;
            assert!(admitted < 100, "never refused");
        }
        let per_record = OutboxItem {
            id: "100".into(),
            op: OutboxOp::Usage(Box::new(record("r100"))),
        }
        .approx_bytes();
        assert!(admitted >= 1 && s.outbox_bytes() >= 1_000, "{admitted}");
        assert!(
            s.outbox_bytes() < 1_000 + per_record,
            "{}",
            s.outbox_bytes()
        );
        let refused = try_admit("late");
        assert!(
            matches!(refused, Err(StoreError::Catalog(_))),
            "{refused:?}"
        );
        let ids: Vec<String> = run(s.outbox_read("a", 1_000))
            .expect("read")
            .into_iter()
            .map(|i| i.id)
            .collect();
        assert_eq!(ids.len(), admitted);
        run(s.outbox_ack("a", &ids)).expect("ack");
        assert_eq!(s.outbox_bytes(), 0);
        assert_eq!(attempt(&s, "a", "after", T0, 60_000), Verdict::Admitted);
    }
}
