//! Plans, policies, windows and credit costs: pure, checked domain types.
//!
//! Parsing `plans.yaml` (with file:line errors) lives in `plans/parse.rs`;
//! everything here is already valid by construction.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

pub mod parse;

pub use crate::clock::{Period, WindowLen};

use serde::Serialize;

/// The unit every request counts as unless told otherwise.
pub const REQUEST_UNIT: &str = "request";

/// The unit of spend-cap windows: credits charged, counted by the gateway.
pub const CREDIT_UNIT: &str = "credit";

// --- Bounds on numbers (README "Limits on numbers").
//
// Every number that reaches a store is bounded here, once, so that all
// stores can hold it: Redis scripts compute in Lua doubles (exact only
// below 2^53), Postgres holds credits as `bigint`, and counters may grow
// past a limit (ends add measured units even past it) without overflowing.
// Input above a bound is refused at the edge (config, plans, admin API,
// request fields); measured amounts, which cannot be refused after the
// fact, are clamped with [`clamp_amount`].

/// The largest amount anywhere: window limits, units in one request
/// (reserved or measured), credit costs, one grant, an account's balance.
/// 10^15, far below 2^53 (~9.007 * 10^15) so that Lua doubles stay exact
/// and a counter can take thousands of such amounts without leaving i64.
pub const MAX_AMOUNT: u64 = 1_000_000_000_000_000;

/// The longest window: 10 years (of 365 days), in seconds.
pub const MAX_WINDOW_SECS: u64 = 10 * 365 * 86_400;

/// The longest `concurrency_expiry`: one day, in seconds.
pub const MAX_CONCURRENCY_EXPIRY_SECS: u64 = 86_400;

/// The largest `max_concurrent`.
pub const MAX_CONCURRENT: u32 = 1_000_000;

/// A measured amount as the stores may hold it: saturates at
/// [`MAX_AMOUNT`]. For amounts that cannot be refused (units an upstream
/// reports after the work was done); amounts a client asks for are refused
/// above the bound instead.
pub fn clamp_amount(amount: u64) -> u64 {
    amount.min(MAX_AMOUNT)
}

/// The units plans may limit or charge for: every unit some route measures
/// (`usage.<unit>`) or reserves (`reserve.<unit>`), plus `request`, which
/// every request counts as. A plan naming any other unit would never be
/// enforced, so it is refused (see `plans::parse::parse_plans_for`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownUnits(std::collections::BTreeSet<Unit>);

impl KnownUnits {
    /// `request` plus `units`.
    pub fn new(units: impl IntoIterator<Item = Unit>) -> Self {
        let mut set: std::collections::BTreeSet<Unit> = units.into_iter().collect();
        set.insert(Unit::request());
        KnownUnits(set)
    }

    pub fn contains(&self, unit: &str) -> bool {
        self.0.iter().any(|u| u.as_str() == unit)
    }

    /// The names, `request` first, then in name order.
    pub fn names(&self) -> Vec<&str> {
        let mut out = vec![REQUEST_UNIT];
        out.extend(
            self.0
                .iter()
                .map(Unit::as_str)
                .filter(|u| *u != REQUEST_UNIT),
        );
        out
    }

    /// The known unit `unit` is most likely a typo of, if any: the same
    /// name without a trailing `s`, or one at most two edits away.
    pub fn suggest(&self, unit: &str) -> Option<&str> {
        let names = self.names();
        if let Some(singular) = unit.strip_suffix('s') {
            if let Some(n) = names.iter().find(|n| **n == singular) {
                return Some(n);
            }
        }
        names
            .into_iter()
            .map(|n| (edit_distance(unit, n), n))
            .filter(|(d, n)| *d <= 2 && *d < n.len().max(unit.len()))
            .min_by_key(|(d, _)| *d)
            .map(|(_, n)| n)
    }
}

/// Levenshtein distance, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let subst = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = subst.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// A unit name (`request`, `token`, `image`, `gpu-second`, ...).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Unit(Arc<str>);

impl Unit {
    /// The unit of spend caps ([`CREDIT_UNIT`]).
    pub fn credit() -> Self {
        Unit::new(CREDIT_UNIT)
    }

    /// `credit`: a window on the credits charged (a spend cap).
    pub fn is_credit(&self) -> bool {
        self.as_str() == CREDIT_UNIT
    }

    pub fn new(name: &str) -> Self {
        Unit(Arc::from(name))
    }

    pub fn request() -> Self {
        Unit::new(REQUEST_UNIT)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// OpenAI's header form: `request` -> `requests`, `gpu-second` ->
    /// `gpu-seconds`; names already ending in `s` stay as they are.
    pub fn plural(&self) -> String {
        if self.0.ends_with('s') {
            self.0.to_string()
        } else {
            format!("{}s", self.0)
        }
    }
}

impl fmt::Debug for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for Unit {
    fn from(s: &str) -> Self {
        Unit::new(s)
    }
}

/// One window: at most `limit` units of `unit` per window of `len` (fixed
/// seconds aligned to the Unix epoch, or a UTC calendar day, week or
/// month).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Fixed windows: whole seconds, 1 to [`MAX_WINDOW_SECS`].
    pub len: WindowLen,
    /// Units allowed per window (1 to [`MAX_AMOUNT`]).
    pub limit: u64,
    pub unit: Unit,
}

/// Credits an endpoint costs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CreditCost {
    /// Balance needed to be admitted.
    pub min_balance: u64,
    /// Charged at admission, atomically with the balance check.
    pub per_request: u64,
    /// Charged at the end from measured units: `ceil(units * credits / per)`.
    pub per_unit: BTreeMap<Unit, PerUnit>,
}

impl CreditCost {
    /// The balance an account needs to be admitted.
    pub fn admission_threshold(&self) -> u64 {
        self.min_balance.max(self.per_request)
    }

    /// Credits owed for the measured units, rounded up per unit type;
    /// at most [`MAX_AMOUNT`] (a charge the catalog can always hold).
    pub fn unit_charge(&self, units: &[(Unit, u64)]) -> u64 {
        clamp_amount(
            units
                .iter()
                .filter_map(|(u, n)| self.per_unit.get(u).map(|p| p.charge(*n)))
                .fold(0u64, u64::saturating_add),
        )
    }
}

/// `credits` per `per` units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerUnit {
    pub credits: u64,
    /// >= 1.
    pub per: u64,
}

impl PerUnit {
    /// `ceil(units * credits / per)`, saturating at [`MAX_AMOUNT`].
    pub fn charge(&self, units: u64) -> u64 {
        let num = (units as u128) * (self.credits as u128);
        let per = self.per.max(1) as u128;
        num.div_ceil(per).min(MAX_AMOUNT as u128) as u64
    }
}

/// The limits on one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub windows: Vec<Window>,
    /// 0 means no concurrency limit; at most [`MAX_CONCURRENT`].
    pub max_concurrent: u32,
    /// How long a concurrency slot lives without renewal (1 s to
    /// [`MAX_CONCURRENCY_EXPIRY_SECS`]).
    pub concurrency_expiry_secs: u64,
    pub credits: Option<CreditCost>,
    /// `enforce: false` (shadow mode): the windows and the concurrency
    /// limit are counted and reported as usual, but a request they would
    /// refuse is admitted (and counted as `would_deny`). Credits are
    /// enforced either way.
    pub enforce: bool,
    /// Set only on a policy as it applies to one API key with a plan of
    /// its own ([`Policy::with_key`]): its last `count` windows are the
    /// key's, counted per key. `None` on every policy of a plan.
    pub key: Option<KeyWindows>,
}

/// The key-level part of a policy combined by [`Policy::with_key`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyWindows {
    /// The API key's id: its counters are the key's own.
    pub key_id: Arc<str>,
    /// How many of the policy's windows (the last ones) are the key's.
    pub count: usize,
    /// The key plan's `enforce` for its windows (the account's windows
    /// keep the account policy's `enforce`).
    pub enforce: bool,
}

/// Default lifetime of a concurrency slot.
pub const DEFAULT_CONCURRENCY_EXPIRY_SECS: u64 = 60;

impl Policy {
    /// Whether a window counts credits spent (a spend cap, `unit_type:
    /// credit`).
    pub fn caps_spend(&self) -> bool {
        self.windows.iter().any(|w| w.unit.is_credit())
    }

    /// This policy as it applies to the API key `key_id`, whose own plan
    /// has `key_policy` for the same endpoint: the account's windows, then
    /// the key's (counted per key, on top of the account's). Concurrency,
    /// credits, lease and `enforce` of the account windows stay the
    /// account policy's; the key's `enforce` governs its windows.
    pub fn with_key(&self, key_id: &str, key_policy: &Policy) -> Policy {
        let mut windows = Vec::with_capacity(self.windows.len() + key_policy.windows.len());
        windows.extend(self.windows.iter().cloned());
        windows.extend(key_policy.windows.iter().cloned());
        Policy {
            windows,
            key: Some(KeyWindows {
                key_id: Arc::from(key_id),
                count: key_policy.windows.len(),
                enforce: key_policy.enforce,
            }),
            ..self.clone()
        }
    }

    /// Whether window `i` is one of the key's ([`Policy::with_key`]).
    pub fn is_key_window(&self, i: usize) -> bool {
        self.key
            .as_ref()
            .is_some_and(|k| i >= self.windows.len().saturating_sub(k.count))
    }

    /// Whether the limit of window `i` is enforced (not shadow mode).
    pub fn enforces_window(&self, i: usize) -> bool {
        match &self.key {
            Some(k) if self.is_key_window(i) => k.enforce,
            _ => self.enforce,
        }
    }

    /// Whether any window, or the concurrency limit, is in shadow mode.
    pub fn shadows_any(&self) -> bool {
        !self.enforce || self.key.as_ref().is_some_and(|k| !k.enforce && k.count > 0)
    }

    /// The distinct units this policy limits, in order of first appearance.
    pub fn units(&self) -> Vec<Unit> {
        let mut out: Vec<Unit> = Vec::new();
        for w in &self.windows {
            if !out.contains(&w.unit) {
                out.push(w.unit.clone());
            }
        }
        out
    }
}

/// A named set of policies, one per endpoint it grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub id: String,
    /// Human-readable name; defaults to the id.
    pub name: String,
    pub endpoints: BTreeMap<String, Arc<Policy>>,
    /// Threshold notifications (`notify:`), delivered as signed webhooks
    /// (`notify.rs`); empty: none.
    pub notify: Vec<NotifyRule>,
}

/// One threshold notification of a plan (`notify:` in plans.yaml).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NotifyRule {
    /// `{at: 80%, of: window}`: a window (any window of any endpoint of
    /// the plan) has counted `percent`% of its limit, i.e. at least
    /// `ceil(limit * percent / 100)` units. Once per window (per account,
    /// endpoint, window and window start).
    Window { percent: u8 },
    /// `{at: 80%, of: balance}`: `percent`% of the credits granted in the
    /// account's unexpired quota blocks has been used, i.e. the balance is
    /// at most `granted - ceil(granted * percent / 100)`. Once per set of
    /// unexpired blocks (a new grant re-arms it).
    Balance { percent: u8 },
    /// `{expires_within: 7d}`: a quota block with credits left expires
    /// within this many seconds. Once per block.
    Expiry { within_secs: u64 },
}

impl NotifyRule {
    /// The number of units (of `limit`) at which a `percent`% threshold is
    /// reached: `ceil(limit * percent / 100)`, at least 1.
    pub fn threshold(limit: u64, percent: u8) -> u64 {
        ((limit as u128 * percent as u128).div_ceil(100) as u64).max(1)
    }
}

/// The longest `expires_within`: one year, in seconds.
pub const MAX_EXPIRES_WITHIN_SECS: u64 = 365 * 86_400;

/// Most `notify` rules one plan may have.
pub const MAX_NOTIFY_RULES: usize = 32;

impl Plan {
    pub fn policy(&self, endpoint: &str) -> Option<&Arc<Policy>> {
        self.endpoints.get(endpoint)
    }

    /// Whether some window of the plan is a calendar month (which an
    /// account's billing anchor moves).
    pub fn has_months(&self) -> bool {
        self.endpoints.values().any(|p| {
            p.windows
                .iter()
                .any(|w| w.len == WindowLen::Calendar(Period::Month))
        })
    }

    /// The plan as it applies to an account whose billing month starts on
    /// day `anchor` (1 to 31; `accounts.billing_anchor`): every calendar
    /// month window (`1mo`) becomes a billing month from that day
    /// ([`Period::MonthFrom`]); anything else is shared, not copied. An
    /// anchor of 1 (or out of range) is the calendar month itself.
    pub fn anchored(self: &Arc<Self>, anchor: u8) -> Arc<Plan> {
        if !(2..=MAX_BILLING_ANCHOR).contains(&anchor) || !self.has_months() {
            return self.clone();
        }
        let month = WindowLen::Calendar(Period::Month);
        let endpoints = self
            .endpoints
            .iter()
            .map(|(id, policy)| {
                let policy = if policy.windows.iter().any(|w| w.len == month) {
                    let mut p = Policy::clone(policy);
                    for w in &mut p.windows {
                        if w.len == month {
                            w.len = WindowLen::Calendar(Period::MonthFrom(anchor));
                        }
                    }
                    Arc::new(p)
                } else {
                    policy.clone()
                };
                (id.clone(), policy)
            })
            .collect();
        Arc::new(Plan {
            id: self.id.clone(),
            name: self.name.clone(),
            endpoints,
            notify: self.notify.clone(),
        })
    }
}

/// The largest billing anchor (a day of the month).
pub const MAX_BILLING_ANCHOR: u8 = 31;

/// The content of a plans file: every plan plus an optional default.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PlanSet {
    pub default_plan: Option<String>,
    pub plans: BTreeMap<String, Arc<Plan>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(len: WindowLen) -> Window {
        Window {
            len,
            limit: 10,
            unit: Unit::request(),
        }
    }

    fn policy(lens: &[WindowLen]) -> Arc<Policy> {
        Arc::new(Policy {
            windows: lens.iter().map(|l| window(*l)).collect(),
            max_concurrent: 0,
            concurrency_expiry_secs: DEFAULT_CONCURRENCY_EXPIRY_SECS,
            credits: None,
            enforce: true,
            key: None,
        })
    }

    #[test]
    fn a_keys_windows_follow_the_accounts_and_keep_their_own_enforce() {
        let account = policy(&[WindowLen::Fixed(60), WindowLen::Fixed(3600)]);
        let mut key = Policy::clone(&policy(&[WindowLen::Fixed(60)]));
        key.enforce = false;
        key.max_concurrent = 7;
        let both = account.with_key("key_1", &key);
        assert_eq!(both.windows.len(), 3);
        assert_eq!(both.windows[2], key.windows[0]);
        // Concurrency, credits, lease: the account's.
        assert_eq!(both.max_concurrent, account.max_concurrent);
        assert_eq!(
            (0..3).map(|i| both.is_key_window(i)).collect::<Vec<_>>(),
            [false, false, true]
        );
        assert_eq!(
            (0..3).map(|i| both.enforces_window(i)).collect::<Vec<_>>(),
            [true, true, false]
        );
        assert!(both.shadows_any() && !account.shadows_any());
        assert_eq!(both.key.as_ref().map(|k| &*k.key_id), Some("key_1"));
        assert!(!account.is_key_window(0));
    }

    #[test]
    fn anchoring_moves_only_calendar_months_and_shares_the_rest() {
        let month = WindowLen::Calendar(Period::Month);
        let week = WindowLen::Calendar(Period::Week);
        let plan = Arc::new(Plan {
            id: "p".into(),
            name: "P".into(),
            endpoints: [
                (
                    "monthly".to_string(),
                    policy(&[WindowLen::Fixed(60), month]),
                ),
                ("weekly".to_string(), policy(&[week])),
            ]
            .into_iter()
            .collect(),
            notify: Vec::new(),
        });
        let anchored = plan.anchored(15);
        let lens: Vec<WindowLen> = anchored.endpoints["monthly"]
            .windows
            .iter()
            .map(|w| w.len)
            .collect();
        assert_eq!(
            lens,
            vec![
                WindowLen::Fixed(60),
                WindowLen::Calendar(Period::MonthFrom(15))
            ]
        );
        assert!(Arc::ptr_eq(
            &anchored.endpoints["weekly"],
            &plan.endpoints["weekly"]
        ));
        // Anchor 1 is the calendar month; out of range is ignored; a plan
        // without months is shared whole.
        assert!(Arc::ptr_eq(&plan.anchored(1), &plan));
        assert!(Arc::ptr_eq(&plan.anchored(32), &plan));
        let weekly = Arc::new(Plan {
            id: "w".into(),
            name: "W".into(),
            endpoints: [("weekly".to_string(), policy(&[week]))]
                .into_iter()
                .collect(),
            notify: Vec::new(),
        });
        assert!(!weekly.has_months());
        assert!(Arc::ptr_eq(&weekly.anchored(15), &weekly));
    }
}
