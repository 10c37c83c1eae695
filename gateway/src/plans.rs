//! Plans, policies, windows and credit costs: pure, checked domain types.
//!
//! Parsing `plans.yaml` (with file:line errors) lives in `plans/parse.rs`;
//! everything here is already valid by construction.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

pub mod parse;

use serde::Serialize;

/// The unit every request counts as unless told otherwise.
pub const REQUEST_UNIT: &str = "request";

/// A unit name (`request`, `token`, `image`, `gpu-second`, ...).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Unit(Arc<str>);

impl Unit {
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

/// One fixed window: at most `limit` units of `unit` per `window_secs`,
/// aligned to the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Window length in whole seconds (>= 1).
    pub window_secs: u64,
    /// Units allowed per window (>= 1).
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

    /// Credits owed for the measured units, rounded up per unit type.
    pub fn unit_charge(&self, units: &[(Unit, u64)]) -> u64 {
        units
            .iter()
            .filter_map(|(u, n)| self.per_unit.get(u).map(|p| p.charge(*n)))
            .fold(0u64, u64::saturating_add)
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
    /// `ceil(units * credits / per)`, saturating.
    pub fn charge(&self, units: u64) -> u64 {
        let num = (units as u128) * (self.credits as u128);
        let per = self.per.max(1) as u128;
        num.div_ceil(per).min(u64::MAX as u128) as u64
    }
}

/// The limits on one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub windows: Vec<Window>,
    /// 0 means no concurrency limit.
    pub max_concurrent: u32,
    /// How long a concurrency slot lives without renewal.
    pub concurrency_expiry_secs: u64,
    pub credits: Option<CreditCost>,
}

/// Default lifetime of a concurrency slot.
pub const DEFAULT_CONCURRENCY_EXPIRY_SECS: u64 = 60;

impl Policy {
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
}

impl Plan {
    pub fn policy(&self, endpoint: &str) -> Option<&Arc<Policy>> {
        self.endpoints.get(endpoint)
    }
}

/// The content of a plans file: every plan plus an optional default.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PlanSet {
    pub default_plan: Option<String>,
    pub plans: BTreeMap<String, Arc<Plan>>,
}
