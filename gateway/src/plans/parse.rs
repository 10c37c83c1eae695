//! Parsing `plans.yaml` (and the same schema as JSON) into checked
//! [`crate::plans`] types, with file:line errors; and rendering plans back
//! into that schema (for Postgres JSONB and the admin API).
//!
//! The document is first read into a tree that keeps each node's line and
//! column (`tree.rs`); the checks below walk that tree and collect every
//! problem they find instead of stopping at the first, so one run of
//! `plangate check-config` shows them all.

mod tree;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Map as JsonMap, Value as Json};

use self::tree::{Node, Pos, Value};
use crate::config::{parse_duration, ConfigError, ConfigErrors};
use crate::plans::{
    CreditCost, KnownUnits, NotifyRule, PerUnit, Period, Plan, PlanSet, Policy, Unit, Window,
    WindowLen, DEFAULT_CONCURRENCY_EXPIRY_SECS, MAX_AMOUNT, MAX_CONCURRENCY_EXPIRY_SECS,
    MAX_CONCURRENT, MAX_EXPIRES_WITHIN_SECS, MAX_NOTIFY_RULES, MAX_WINDOW_SECS, REQUEST_UNIT,
};

/// Plan and endpoint ids are opaque strings of at most this many bytes.
pub const MAX_ID_BYTES: usize = 200;

/// Unit names longer than this are refused: they become HTTP header names.
pub const MAX_UNIT_BYTES: usize = 64;

/// The unit name reserved for credits (`x-credits-remaining`).
pub const RESERVED_UNIT: &str = "credit";

/// The pseudo file name used in errors about plans given as JSON.
pub const JSON_ORIGIN: &str = "<json>";

/// The one calendar of calendar windows (`calendar: utc`).
pub const CALENDAR_UTC: &str = "utc";

/// Parse the text of a plans file (YAML, or JSON, which is YAML too).
/// `origin` names it in errors. Returns every problem found, in file order.
///
/// This checks the file on its own; a gateway checks it against its routes
/// with [`parse_plans_for`].
pub fn parse_plans(text: &str, origin: &str) -> Result<PlanSet, ConfigErrors> {
    parse(text, origin, None)
}

/// [`parse_plans`], and also refuse (located) every window `unit_type`
/// and credits `per_unit` unit that is not in `known`: no route measures
/// or reserves it, so it would never be enforced. What `check-config`,
/// `serve`, reloads and the admin API use, with
/// [`crate::config::Config::known_units`].
pub fn parse_plans_for(
    text: &str,
    origin: &str,
    known: &KnownUnits,
) -> Result<PlanSet, ConfigErrors> {
    parse(text, origin, Some(known))
}

fn parse(text: &str, origin: &str, known: Option<&KnownUnits>) -> Result<PlanSet, ConfigErrors> {
    let mut checker = Checker::new(origin);
    checker.known = known;
    let root = match tree::parse_yaml(text) {
        Ok(Some(root)) => root,
        Ok(None) => {
            checker.error(
                Pos::default(),
                "",
                "the file is empty; expected a `plans:` mapping of plan id to plan",
            );
            return Err(checker.into_errors());
        }
        Err(e) => {
            let message = if e.limit {
                e.message
            } else {
                format!("YAML syntax error: {}", e.message)
            };
            checker.error(e.pos, "", message);
            return Err(checker.into_errors());
        }
    };
    let set = checker.plan_set(&root);
    checker.finish(set)
}

/// Read and parse a plans file.
pub fn load_plans_file(path: &Path) -> Result<PlanSet, ConfigErrors> {
    load(path, None)
}

/// Read and parse a plans file, checking its units against `known` (see
/// [`parse_plans_for`]).
pub fn load_plans_file_for(path: &Path, known: &KnownUnits) -> Result<PlanSet, ConfigErrors> {
    load(path, Some(known))
}

fn load(path: &Path, known: Option<&KnownUnits>) -> Result<PlanSet, ConfigErrors> {
    let origin = path.display().to_string();
    let fail = |message: String| {
        ConfigErrors(vec![ConfigError {
            file: origin.clone(),
            line: None,
            column: None,
            key: String::new(),
            message,
        }])
    };
    // Read one byte past the bound at most: a larger file is refused
    // without being read whole.
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| {
            f.take(tree::MAX_TEXT_BYTES as u64 + 1)
                .read_to_end(&mut bytes)
        })
        .map_err(|e| fail(format!("cannot read: {e}")))?;
    if bytes.len() > tree::MAX_TEXT_BYTES {
        return Err(fail(tree::too_long().message));
    }
    let text = String::from_utf8(bytes)
        .map_err(|_| fail("cannot read: stream did not contain valid UTF-8".into()))?;
    parse(&text, &origin, known)
}

/// The units of already parsed plans that are not in `known`, as errors
/// without a line (the plans are not text any more): for plans in force
/// when the routes change. `origin` names where the plans came from.
pub fn check_plan_units(
    plans: &PlanSet,
    known: &KnownUnits,
    origin: &str,
) -> Result<(), ConfigErrors> {
    let mut checker = Checker::new(origin);
    for (id, plan) in &plans.plans {
        let plan_path = format!("plans.{}.endpoints", segment(id));
        for (endpoint, policy) in &plan.endpoints {
            let path = join(&plan_path, &segment(endpoint));
            for (i, w) in policy.windows.iter().enumerate() {
                if let Some(message) = unknown_unit(known, w.unit.as_str()) {
                    checker.error(
                        Pos::default(),
                        &format!("{path}.fixed_windows[{i}].unit_type"),
                        message,
                    );
                }
            }
            for unit in policy.credits.iter().flat_map(|c| c.per_unit.keys()) {
                if let Some(message) = unknown_unit(known, unit.as_str()) {
                    checker.error(
                        Pos::default(),
                        &join(
                            &path,
                            &format!("credits.per_unit.{}", segment(unit.as_str())),
                        ),
                        message,
                    );
                }
            }
        }
    }
    checker.finish(())
}

/// Why `unit` may not be used in plans, if it may not.
fn unknown_unit(known: &KnownUnits, unit: &str) -> Option<String> {
    // Spend caps count what the gateway charges, not what a route measures.
    if known.contains(unit) || unit == RESERVED_UNIT {
        return None;
    }
    let mut message = format!(
        "unit `{unit}` is not measured or reserved by any route (known: {})",
        known.names().join(", ")
    );
    match known.suggest(unit) {
        Some(s) => message.push_str(&format!("; did you mean `{s}`?")),
        None => message.push_str(&format!(
            "; add `usage.{unit}` or `reserve.{unit}` to a route in the config"
        )),
    }
    Some(message)
}

/// One plan in the plans.yaml schema (`{"name":..., "endpoints": {...}}`),
/// as stored in Postgres JSONB and shown by the admin API.
pub fn plan_to_json(plan: &Plan) -> Json {
    let endpoints: JsonMap<String, Json> = plan
        .endpoints
        .iter()
        .map(|(id, policy)| (id.clone(), policy_to_json(policy)))
        .collect();
    let mut out = json!({ "name": plan.name, "endpoints": endpoints });
    // Left out when empty, so that plans without notifications are stored
    // as they were before notifications existed.
    if !plan.notify.is_empty() {
        out["notify"] = Json::Array(plan.notify.iter().map(notify_to_json).collect());
    }
    out
}

fn notify_to_json(rule: &NotifyRule) -> Json {
    match *rule {
        NotifyRule::Window { percent } => json!({ "at": format!("{percent}%"), "of": "window" }),
        NotifyRule::Balance { percent } => json!({ "at": format!("{percent}%"), "of": "balance" }),
        NotifyRule::Expiry { within_secs } => {
            json!({ "expires_within": render_secs(within_secs) })
        }
    }
}

fn policy_to_json(policy: &Policy) -> Json {
    let windows: Vec<Json> = policy
        .windows
        .iter()
        .map(|w| {
            let mut out = json!({
                "window": w.len.to_string(),
                "limit": w.limit,
                "unit_type": w.unit.as_str(),
            });
            if w.len.period().is_some() {
                out["calendar"] = json!(CALENDAR_UTC);
            }
            out
        })
        .collect();
    let mut out = JsonMap::new();
    out.insert("fixed_windows".into(), Json::Array(windows));
    out.insert("max_concurrent".into(), json!(policy.max_concurrent));
    out.insert(
        "concurrency_expiry".into(),
        json!(render_secs(policy.concurrency_expiry_secs)),
    );
    if !policy.enforce {
        out.insert("enforce".into(), json!(false));
    }
    if let Some(credits) = &policy.credits {
        let per_unit: JsonMap<String, Json> = credits
            .per_unit
            .iter()
            .map(|(unit, p)| {
                (
                    unit.as_str().to_string(),
                    json!({ "credits": p.credits, "per": p.per }),
                )
            })
            .collect();
        out.insert(
            "credits".into(),
            json!({
                "min_balance": credits.min_balance,
                "per_request": credits.per_request,
                "per_unit": per_unit,
            }),
        );
    }
    Json::Object(out)
}

fn render_secs(secs: u64) -> String {
    format!("{secs}s")
}

/// The inverse of [`plan_to_json`], with the same checks as the file.
/// Errors name the pseudo file [`JSON_ORIGIN`] and the key path
/// `plans.<id>...`.
///
/// Numbers above their bounds (stored by a version that did not bound
/// them) are clamped to the bounds rather than refused, so that such a
/// plan keeps loading.
pub fn plan_from_json(id: &str, value: &Json) -> Result<Plan, ConfigErrors> {
    let mut checker = Checker::new(JSON_ORIGIN);
    checker.clamp = true;
    let node = match tree::from_json(value) {
        Ok(node) => node,
        Err(e) => {
            checker.error(e.pos, &format!("plans.{}", segment(id)), e.message);
            return Err(checker.into_errors());
        }
    };
    checker.check_id(Pos::default(), "plans", id);
    let plan = checker.plan(id, &node, &format!("plans.{}", segment(id)));
    checker.finish(plan)
}

/// A whole plan set in the plans.yaml schema
/// (`{"default_plan": ..., "plans": {...}}`).
pub fn plans_to_json(plans: &PlanSet) -> Json {
    let map: JsonMap<String, Json> = plans
        .plans
        .iter()
        .map(|(id, plan)| (id.clone(), plan_to_json(plan)))
        .collect();
    json!({ "default_plan": plans.default_plan, "plans": map })
}

/// Check a unit name: the rules shared by plans (`unit_type`, `per_unit`)
/// and routes (`usage.<unit>`, `reserve.<unit>`). Units become part of
/// header names (`x-ratelimit-limit-<unit>s`), hence the character set.
pub fn check_unit_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a unit name must not be empty".into());
    }
    if name == RESERVED_UNIT {
        return Err(format!(
            "`{RESERVED_UNIT}` is a reserved unit name (credits are configured under `credits:`)"
        ));
    }
    if name.len() > MAX_UNIT_BYTES {
        return Err(format!(
            "unit name is {} bytes; at most {MAX_UNIT_BYTES} are allowed",
            name.len()
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "unit name `{name}` contains {bad:?}; use letters, digits, `-`, `_` and `.`"
        ));
    }
    Ok(())
}

/// A key path segment: ids that would make the dotted path ambiguous are
/// quoted.
fn segment(id: &str) -> String {
    let plain = !id.is_empty()
        && id
            .chars()
            .all(|c| !c.is_whitespace() && !matches!(c, '.' | '[' | ']' | '"'));
    if plain {
        id.to_string()
    } else {
        format!("{id:?}")
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// The entries of a mapping with fixed keys, after unknown and duplicate
/// keys have been reported.
struct Fields<'n> {
    pos: Pos,
    entries: Vec<(&'n str, &'n Node, &'n Node)>,
}

impl<'n> Fields<'n> {
    fn get(&self, name: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _, _)| *k == name)
            .map(|(_, _, v)| *v)
    }

    /// The value, treating an explicit null as absent.
    fn value(&self, name: &str) -> Option<&'n Node> {
        self.get(name).filter(|n| n.value != Value::Null)
    }

    fn key_pos(&self, name: &str) -> Option<Pos> {
        self.entries
            .iter()
            .find(|(k, _, _)| *k == name)
            .map(|(_, k, _)| k.pos)
    }
}

/// Walks the tree, building plans and collecting errors.
struct Checker<'a> {
    origin: &'a str,
    errors: Vec<ConfigError>,
    /// When set, units outside it are refused.
    known: Option<&'a KnownUnits>,
    /// Clamp numbers above their bounds instead of refusing them (plans
    /// read back from storage).
    clamp: bool,
}

impl<'a> Checker<'a> {
    fn new(origin: &'a str) -> Self {
        Checker {
            origin,
            errors: Vec::new(),
            known: None,
            clamp: false,
        }
    }

    /// Refuse `unit` (at `pos`, key `path`) if a set of known units is
    /// given and it is not in it.
    fn check_known(&mut self, pos: Pos, path: &str, unit: &str) -> bool {
        let Some(known) = self.known else {
            return true;
        };
        match unknown_unit(known, unit) {
            Some(message) => {
                self.error(pos, path, message);
                false
            }
            None => true,
        }
    }

    fn error(&mut self, pos: Pos, key: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.origin.to_string(),
            line: pos.line(),
            column: pos.col(),
            key: key.to_string(),
            message: message.into(),
        });
    }

    fn into_errors(mut self) -> ConfigErrors {
        // Errors in file order; the sort is stable, so unlocated (JSON)
        // errors keep the order they were found in.
        self.errors
            .sort_by_key(|e| (e.line.unwrap_or(0), e.column.unwrap_or(0)));
        ConfigErrors(self.errors)
    }

    fn finish<T>(self, value: T) -> Result<T, ConfigErrors> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(self.into_errors())
        }
    }

    /// A mapping whose keys must be among `allowed`. A null counts as an
    /// empty mapping. Returns `None` (after reporting) if it is no mapping.
    fn fields<'n>(&mut self, node: &'n Node, path: &str, allowed: &[&str]) -> Option<Fields<'n>> {
        let entries = self.entries(node, path)?;
        let mut fields = Fields {
            pos: node.pos,
            entries: Vec::new(),
        };
        for (name, key, value) in entries {
            if allowed.contains(&name) {
                fields.entries.push((name, key, value));
            } else {
                // `sliding_windows` is accepted only to be refused with a
                // message of its own; it is not a key to suggest.
                let expected = allowed
                    .iter()
                    .filter(|k| **k != "sliding_windows")
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ");
                self.error(
                    key.pos,
                    &join(path, &segment(name)),
                    format!("unknown key `{name}` (expected one of {expected})"),
                );
            }
        }
        Some(fields)
    }

    /// The entries of a mapping with free-form keys (ids, units), after
    /// reporting non-scalar and duplicate keys. A null is an empty mapping.
    fn entries<'n>(
        &mut self,
        node: &'n Node,
        path: &str,
    ) -> Option<Vec<(&'n str, &'n Node, &'n Node)>> {
        let entries = match &node.value {
            Value::Map(entries) => entries,
            Value::Null => return Some(Vec::new()),
            _ => {
                self.error(
                    node.pos,
                    path,
                    format!("expected a mapping, found {}", node.kind()),
                );
                return None;
            }
        };
        let mut out: Vec<(&'n str, &'n Node, &'n Node)> = Vec::with_capacity(entries.len());
        let mut seen: HashSet<&'n str> = HashSet::with_capacity(entries.len());
        for (key, value) in entries.iter() {
            let name = match &key.value {
                Value::Scalar { text, .. } => &**text,
                // `~:` as a key is odd but is the text "~" to a reader.
                Value::Null => "~",
                _ => {
                    self.error(
                        key.pos,
                        path,
                        format!("a key must be a scalar, found {}", key.kind()),
                    );
                    continue;
                }
            };
            if !seen.insert(name) {
                self.error(
                    key.pos,
                    &join(path, &segment(name)),
                    format!("duplicate key `{name}`"),
                );
                continue;
            }
            out.push((name, key, value));
        }
        Some(out)
    }

    fn string(&mut self, node: &Node, path: &str) -> Option<String> {
        match &node.value {
            Value::Scalar { text, .. } => Some(text.to_string()),
            _ => {
                self.error(
                    node.pos,
                    path,
                    format!("expected a string, found {}", node.kind()),
                );
                None
            }
        }
    }

    /// `true` or `false` (YAML's plain scalars, JSON booleans).
    fn boolean(&mut self, node: &Node, path: &str) -> Option<bool> {
        match &node.value {
            Value::Scalar { text, plain: true } if &**text == "true" => Some(true),
            Value::Scalar { text, plain: true } if &**text == "false" => Some(false),
            other => {
                let found = match other {
                    Value::Scalar { text, .. } => format!("`{text}`"),
                    _ => node.kind().to_string(),
                };
                self.error(
                    node.pos,
                    path,
                    format!("expected true or false, found {found}"),
                );
                None
            }
        }
    }

    /// A non-negative integer from `min` to `max`; underscores between
    /// digits (`40_000`) are allowed, as in the original format.
    fn uint(&mut self, node: &Node, path: &str, min: u64, max: u64) -> Option<u64> {
        let Value::Scalar { text, .. } = &node.value else {
            self.error(
                node.pos,
                path,
                format!("expected an integer, found {}", node.kind()),
            );
            return None;
        };
        match parse_uint(text) {
            Ok(n) if n > max && self.clamp => Some(max),
            Err(UintError::TooLarge) if self.clamp => Some(max),
            Ok(n) if n > max => {
                self.error(node.pos, path, too_large(text, max));
                None
            }
            Ok(n) if n >= min => Some(n),
            Ok(_) | Err(UintError::Negative) => {
                let message = if min == 0 {
                    "must not be negative".to_string()
                } else {
                    format!("must be at least {min}")
                };
                self.error(node.pos, path, message);
                None
            }
            Err(UintError::TooLarge) => {
                self.error(node.pos, path, too_large(text, max));
                None
            }
            Err(UintError::Fraction) => {
                self.error(node.pos, path, format!("`{text}` is not a whole number"));
                None
            }
            Err(UintError::NotANumber) => {
                self.error(
                    node.pos,
                    path,
                    format!("expected an integer, found `{text}`"),
                );
                None
            }
        }
    }

    /// A duration of whole seconds, from one second to `max` seconds.
    fn seconds(&mut self, node: &Node, path: &str, max: u64) -> Option<u64> {
        let Value::Scalar { text, .. } = &node.value else {
            self.error(
                node.pos,
                path,
                format!("expected a duration such as `60s`, found {}", node.kind()),
            );
            return None;
        };
        let d = match parse_duration(text) {
            Ok(d) => d,
            Err(e) => {
                self.error(node.pos, path, e);
                return None;
            }
        };
        if d.as_secs() < 1 {
            self.error(node.pos, path, "must be at least 1s");
            return None;
        }
        if d.subsec_nanos() != 0 {
            self.error(
                node.pos,
                path,
                format!("`{text}` is not a whole number of seconds"),
            );
            return None;
        }
        if d.as_secs() > max {
            if self.clamp {
                return Some(max);
            }
            self.error(
                node.pos,
                path,
                format!(
                    "`{text}` is too long: must be at most {}",
                    describe_secs(max)
                ),
            );
            return None;
        }
        Some(d.as_secs())
    }

    fn check_id(&mut self, pos: Pos, path: &str, id: &str) -> bool {
        let problem = if id.is_empty() {
            Some("an id must not be empty".to_string())
        } else if id.len() > MAX_ID_BYTES {
            Some(format!(
                "id is {} bytes long; at most {MAX_ID_BYTES} bytes are allowed",
                id.len()
            ))
        } else {
            None
        };
        match problem {
            Some(message) => {
                self.error(pos, &join(path, &segment(id)), message);
                false
            }
            None => true,
        }
    }

    fn unit(&mut self, node: &Node, path: &str) -> Option<Unit> {
        let name = self.string(node, path)?;
        match check_unit_name(&name) {
            Ok(()) => Some(Unit::new(&name)),
            Err(e) => {
                self.error(node.pos, path, e);
                None
            }
        }
    }

    /// A window's unit: a known unit, or `credit` (a spend cap: the credits
    /// the endpoint's requests are charged, counted by the gateway itself).
    fn window_unit(&mut self, node: &Node, path: &str) -> Option<Unit> {
        if matches!(&node.value, Value::Scalar { text, .. } if &**text == RESERVED_UNIT) {
            return Some(Unit::new(RESERVED_UNIT));
        }
        self.known_unit(node, path)
    }

    /// [`Checker::unit`], also refused when not among the known units.
    fn known_unit(&mut self, node: &Node, path: &str) -> Option<Unit> {
        let unit = self.unit(node, path)?;
        self.check_known(node.pos, path, unit.as_str())
            .then_some(unit)
    }

    fn plan_set(&mut self, root: &Node) -> PlanSet {
        let mut set = PlanSet::default();
        let Some(fields) = self.fields(root, "", &["default_plan", "plans"]) else {
            return set;
        };
        match fields.get("plans") {
            None => self.error(
                fields.pos,
                "plans",
                "missing `plans` (a mapping of plan id to plan)",
            ),
            Some(plans) => {
                let entries = self.entries(plans, "plans").unwrap_or_default();
                for (id, key, value) in entries {
                    if !self.check_id(key.pos, "plans", id) {
                        continue;
                    }
                    let plan = self.plan(id, value, &format!("plans.{}", segment(id)));
                    set.plans.insert(id.to_string(), Arc::new(plan));
                }
            }
        }
        if let Some(node) = fields.value("default_plan") {
            if let Some(id) = self.string(node, "default_plan") {
                if set.plans.contains_key(&id) {
                    set.default_plan = Some(id);
                } else {
                    let known = set
                        .plans
                        .keys()
                        .map(|k| format!("`{k}`"))
                        .collect::<Vec<_>>()
                        .join(", ");
                    self.error(
                        node.pos,
                        "default_plan",
                        format!("no plan named `{id}` (plans: {known})"),
                    );
                }
            }
        }
        set
    }

    fn plan(&mut self, id: &str, node: &Node, path: &str) -> Plan {
        let mut plan = Plan {
            id: id.to_string(),
            name: id.to_string(),
            endpoints: BTreeMap::new(),
            notify: Vec::new(),
        };
        let Some(fields) = self.fields(node, path, &["name", "endpoints", "enforce", "notify"])
        else {
            return plan;
        };
        if let Some(name) = fields.value("name") {
            if let Some(name) = self.string(name, &join(path, "name")) {
                plan.name = name;
            }
        }
        // The plan's `enforce` is its endpoints' default.
        let enforce = fields
            .value("enforce")
            .and_then(|n| self.boolean(n, &join(path, "enforce")))
            .unwrap_or(true);
        if let Some(endpoints) = fields.get("endpoints") {
            let path = join(path, "endpoints");
            let entries = self.entries(endpoints, &path).unwrap_or_default();
            for (endpoint, key, value) in entries {
                if !self.check_id(key.pos, &path, endpoint) {
                    continue;
                }
                let policy = self.policy(value, &join(&path, &segment(endpoint)), enforce);
                plan.endpoints
                    .insert(endpoint.to_string(), Arc::new(policy));
            }
        }
        if let Some(notify) = fields.value("notify") {
            let has_credits = plan.endpoints.values().any(|p| p.credits.is_some());
            plan.notify = self.notify(notify, &join(path, "notify"), has_credits);
        }
        plan
    }

    /// A plan's `notify:` list: `{at: 80%, of: window | balance}` and
    /// `{expires_within: 7d}` items, no two alike.
    fn notify(&mut self, node: &Node, path: &str, has_credits: bool) -> Vec<NotifyRule> {
        let Value::Seq(items) = &node.value else {
            self.error(
                node.pos,
                path,
                format!(
                    "expected a list of notifications such as `- {{at: 80%, of: window}}`, found {}",
                    node.kind()
                ),
            );
            return Vec::new();
        };
        if items.len() > MAX_NOTIFY_RULES {
            self.error(
                node.pos,
                path,
                format!(
                    "{} notifications; at most {MAX_NOTIFY_RULES} are allowed",
                    items.len()
                ),
            );
            return Vec::new();
        }
        // Each rule with the index of the item it came from.
        let mut out: Vec<(NotifyRule, usize)> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let item_path = format!("{path}[{i}]");
            let Some(rule) = self.notify_rule(item, &item_path, has_credits) else {
                continue;
            };
            if let Some(&(_, first)) = out.iter().find(|(r, _)| *r == rule) {
                self.error(
                    item.pos,
                    &item_path,
                    format!("duplicate notification: the same as {path}[{first}]"),
                );
                continue;
            }
            out.push((rule, i));
        }
        out.into_iter().map(|(rule, _)| rule).collect()
    }

    fn notify_rule(&mut self, node: &Node, path: &str, has_credits: bool) -> Option<NotifyRule> {
        let fields = self.fields(node, path, &["at", "of", "expires_within"])?;
        if let Some(within) = fields.value("expires_within") {
            for other in ["at", "of"] {
                if let Some(pos) = fields.key_pos(other) {
                    self.error(
                        pos,
                        &join(path, other),
                        "`expires_within` is a notification of its own: give it without `at` and `of`",
                    );
                    return None;
                }
            }
            let key = join(path, "expires_within");
            return self
                .seconds(within, &key, MAX_EXPIRES_WITHIN_SECS)
                .map(|within_secs| NotifyRule::Expiry { within_secs });
        }
        let percent = match fields.value("at") {
            Some(at) => self.percent(at, &join(path, "at")),
            None => {
                self.error(
                    fields.pos,
                    &join(path, "at"),
                    "missing `at` (a percentage such as `80%`), or give `expires_within`",
                );
                None
            }
        };
        let of = match fields.value("of") {
            Some(of) => {
                let key = join(path, "of");
                match self.string(of, &key).as_deref() {
                    Some("window") => Some(false),
                    Some("balance") if !has_credits => {
                        self.error(
                            of.pos,
                            &key,
                            "`of: balance` needs credits: no endpoint of the plan has `credits:`",
                        );
                        None
                    }
                    Some("balance") => Some(true),
                    Some(other) => {
                        self.error(
                            of.pos,
                            &key,
                            format!("`{other}` is not a threshold: `window` or `balance`"),
                        );
                        None
                    }
                    None => None,
                }
            }
            None => {
                self.error(
                    fields.pos,
                    &join(path, "of"),
                    "missing `of` (`window` or `balance`)",
                );
                None
            }
        };
        let percent = percent?;
        Some(if of? {
            NotifyRule::Balance { percent }
        } else {
            NotifyRule::Window { percent }
        })
    }

    /// A whole percentage from 1% to 100%, written with its `%`.
    fn percent(&mut self, node: &Node, path: &str) -> Option<u8> {
        let text = match &node.value {
            Value::Scalar { text, .. } => text.trim().to_string(),
            _ => {
                self.error(
                    node.pos,
                    path,
                    format!("expected a percentage such as `80%`, found {}", node.kind()),
                );
                return None;
            }
        };
        let Some(digits) = text.strip_suffix('%') else {
            self.error(
                node.pos,
                path,
                format!("`{text}` is not a percentage: write it with `%`, e.g. `{text}%`"),
            );
            return None;
        };
        match digits.trim().parse::<u32>() {
            Ok(n @ 1..=100) => Some(n as u8),
            Ok(_) => {
                self.error(node.pos, path, format!("`{text}` must be from 1% to 100%"));
                None
            }
            Err(_) => {
                self.error(
                    node.pos,
                    path,
                    format!("`{text}` is not a whole percentage from 1% to 100%"),
                );
                None
            }
        }
    }

    fn policy(&mut self, node: &Node, path: &str, enforce: bool) -> Policy {
        let mut policy = Policy {
            windows: Vec::new(),
            max_concurrent: 0,
            concurrency_expiry_secs: DEFAULT_CONCURRENCY_EXPIRY_SECS,
            credits: None,
            enforce,
            key: None,
        };
        let Some(fields) = self.fields(
            node,
            path,
            &[
                "fixed_windows",
                "sliding_windows",
                "max_concurrent",
                "concurrency_expiry",
                "credits",
                "enforce",
            ],
        ) else {
            return policy;
        };
        if let Some(node) = fields.value("enforce") {
            if let Some(b) = self.boolean(node, &join(path, "enforce")) {
                policy.enforce = b;
            }
        }
        if let Some(pos) = fields.key_pos("sliding_windows") {
            self.error(
                pos,
                &join(path, "sliding_windows"),
                "sliding windows are not supported: only `fixed_windows` are \
                 (rename the key to `fixed_windows`)",
            );
        }
        if let Some(windows) = fields.value("fixed_windows") {
            self.windows(windows, &join(path, "fixed_windows"), &mut policy.windows);
        }
        if let Some(node) = fields.value("max_concurrent") {
            let key = join(path, "max_concurrent");
            if let Some(n) = self.uint(node, &key, 0, u64::from(MAX_CONCURRENT)) {
                // At most MAX_CONCURRENT, which is a u32.
                policy.max_concurrent = n as u32;
            }
        }
        if let Some(expiry) = fields.value("concurrency_expiry") {
            let key = join(path, "concurrency_expiry");
            if let Some(secs) = self.seconds(expiry, &key, MAX_CONCURRENCY_EXPIRY_SECS) {
                policy.concurrency_expiry_secs = secs;
            }
        }
        if let Some(credits) = fields.value("credits") {
            policy.credits = self.credits(credits, &join(path, "credits"));
        }
        if policy.credits.is_none() && fields.value("credits").is_none() {
            // The first window (as written) whose unit is `credit`: its
            // index and the position of its `unit_type` (or `unit_kind`).
            let items = match fields.value("fixed_windows").map(|n| &n.value) {
                Some(Value::Seq(items)) => items.clone(),
                _ => Default::default(),
            };
            let found = items
                .iter()
                .enumerate()
                .find_map(|(i, item)| match &item.value {
                    Value::Map(entries) => entries.iter().find_map(|(k, v)| {
                        let unit_key = matches!(&k.value, Value::Scalar { text, .. }
                        if &**text == "unit_type" || &**text == "unit_kind");
                        let credit = matches!(&v.value, Value::Scalar { text, .. }
                        if &**text == RESERVED_UNIT);
                        (unit_key && credit).then(|| (i, v.pos, k.value.clone()))
                    }),
                    _ => None,
                });
            if let Some((i, pos, key)) = found {
                let key = match key {
                    Value::Scalar { text, .. } => text.to_string(),
                    _ => "unit_type".into(),
                };
                self.error(
                    pos,
                    &format!("{}[{i}].{key}", join(path, "fixed_windows")),
                    "a `credit` window caps the credits the endpoint's requests are charged: the endpoint needs `credits:`",
                );
            }
        }
        policy
    }

    fn windows(&mut self, node: &Node, path: &str, out: &mut Vec<Window>) {
        let Value::Seq(items) = &node.value else {
            self.error(
                node.pos,
                path,
                format!("expected a list of windows, found {}", node.kind()),
            );
            return;
        };
        // (window, unit) -> index of the first window with that pair.
        let mut seen: HashMap<(WindowLen, Unit), usize> = HashMap::new();
        for (i, item) in items.iter().enumerate() {
            let item_path = format!("{path}[{i}]");
            let Some(window) = self.window(item, &item_path) else {
                continue;
            };
            let pair = (window.len, window.unit.clone());
            if let Some(first) = seen.get(&pair) {
                self.error(
                    item.pos,
                    &item_path,
                    format!(
                        "duplicate window: `{}` per {} is already limited by {path}[{first}]",
                        window.unit, window.len
                    ),
                );
                continue;
            }
            seen.insert(pair, i);
            out.push(window);
        }
    }

    fn window(&mut self, node: &Node, path: &str) -> Option<Window> {
        let fields = self.fields(
            node,
            path,
            &["window", "calendar", "limit", "unit_type", "unit_kind"],
        )?;
        // Some(true): `calendar: utc`; None: a bad calendar (reported).
        let calendar = match fields.value("calendar") {
            Some(c) => self.calendar(c, &join(path, "calendar")),
            None => Some(false),
        };
        let len = match fields.value("window") {
            Some(w) => self.window_len(w, &join(path, "window"), calendar),
            None => {
                self.error(
                    fields.pos,
                    &join(path, "window"),
                    "missing `window` (e.g. `60s`)",
                );
                None
            }
        };
        let limit = match fields.value("limit") {
            Some(l) => self.uint(l, &join(path, "limit"), 1, MAX_AMOUNT),
            None => {
                self.error(fields.pos, &join(path, "limit"), "missing `limit`");
                None
            }
        };
        let unit = match (fields.value("unit_type"), fields.value("unit_kind")) {
            (Some(_), Some(kind)) => {
                self.error(
                    kind.pos,
                    &join(path, "unit_kind"),
                    "give either `unit_type` or its alias `unit_kind`, not both",
                );
                None
            }
            (Some(u), None) => self.window_unit(u, &join(path, "unit_type")),
            (None, Some(u)) => self.window_unit(u, &join(path, "unit_kind")),
            (None, None) => Some(Unit::new(REQUEST_UNIT)),
        };
        Some(Window {
            len: len?,
            limit: limit?,
            unit: unit?,
        })
    }

    /// A window's `calendar`: only `utc` is known (`Some(true)`).
    fn calendar(&mut self, node: &Node, path: &str) -> Option<bool> {
        let text = self.string(node, path)?;
        if text.eq_ignore_ascii_case(CALENDAR_UTC) {
            return Some(true);
        }
        self.error(
            node.pos,
            path,
            format!(
                "unknown calendar `{text}`: only `utc` is supported (days from 00:00 UTC, \
                 weeks from Monday, months from the 1st)"
            ),
        );
        None
    }

    /// A window's length: with `calendar: utc` one of `1d`, `1w`, `1mo`;
    /// without, a fixed duration of whole seconds (`1w` and `1mo` are
    /// refused there: they have no fixed length aligned to the epoch that
    /// means what they say). `calendar` is `None` when it was refused:
    /// nothing more is reported then.
    fn window_len(&mut self, node: &Node, path: &str, calendar: Option<bool>) -> Option<WindowLen> {
        let period = match &node.value {
            Value::Scalar { text, .. } => Period::parse(text).map(|p| (p, text.trim())),
            _ => None,
        };
        match (calendar?, period) {
            (true, Some((p, _))) => Some(WindowLen::Calendar(p)),
            (true, None) => {
                let found = match &node.value {
                    Value::Scalar { text, .. } => format!("`{text}`"),
                    _ => node.kind().to_string(),
                };
                self.error(
                    node.pos,
                    path,
                    format!(
                        "a calendar window is `1d`, `1w` or `1mo`, found {found} \
                         (remove `calendar` for a fixed window)"
                    ),
                );
                None
            }
            (false, Some((p @ (Period::Week | Period::Month), text))) => {
                let hint = match p {
                    Period::Week => {
                        "add `calendar: utc` for calendar weeks (from Monday 00:00 UTC), \
                         or write `7d` for fixed 7-day windows"
                    }
                    _ => "add `calendar: utc` for calendar months (from the 1st 00:00 UTC)",
                };
                self.error(
                    node.pos,
                    path,
                    format!("`{text}` is a calendar window: {hint}"),
                );
                None
            }
            (false, _) => self
                .seconds(node, path, MAX_WINDOW_SECS)
                .map(WindowLen::Fixed),
        }
    }

    fn credits(&mut self, node: &Node, path: &str) -> Option<CreditCost> {
        let fields = self.fields(node, path, &["min_balance", "per_request", "per_unit"])?;
        let mut cost = CreditCost::default();
        let mut ok = true;
        for (name, slot) in [
            ("min_balance", &mut cost.min_balance),
            ("per_request", &mut cost.per_request),
        ] {
            if let Some(n) = fields.value(name) {
                match self.uint(n, &join(path, name), 0, MAX_AMOUNT) {
                    Some(n) => *slot = n,
                    None => ok = false,
                }
            }
        }
        if let Some(per_unit) = fields.get("per_unit") {
            let path = join(path, "per_unit");
            let entries = self.entries(per_unit, &path).unwrap_or_default();
            for (name, key, value) in entries {
                let unit_path = join(&path, &segment(name));
                if let Err(e) = check_unit_name(name) {
                    self.error(key.pos, &unit_path, e);
                    ok = false;
                    continue;
                }
                if !self.check_known(key.pos, &unit_path, name) {
                    ok = false;
                    continue;
                }
                match self.per_unit(value, &unit_path) {
                    Some(p) => {
                        cost.per_unit.insert(Unit::new(name), p);
                    }
                    None => ok = false,
                }
            }
        }
        ok.then_some(cost)
    }

    fn per_unit(&mut self, node: &Node, path: &str) -> Option<PerUnit> {
        let fields = self.fields(node, path, &["credits", "per"])?;
        let credits = match fields.value("credits") {
            Some(c) => self.uint(c, &join(path, "credits"), 0, MAX_AMOUNT),
            None => {
                self.error(fields.pos, &join(path, "credits"), "missing `credits`");
                None
            }
        };
        // `per` defaults to 1: "credits per unit".
        let per = match fields.value("per") {
            Some(p) => self.uint(p, &join(path, "per"), 1, MAX_AMOUNT),
            None => Some(1),
        };
        Some(PerUnit {
            credits: credits?,
            per: per?,
        })
    }
}

/// The message for an integer above its bound.
fn too_large(text: &str, max: u64) -> String {
    if max == MAX_AMOUNT {
        format!("`{text}` is too large: must be at most {MAX_AMOUNT} (10^15, the largest amount plangate stores)")
    } else {
        format!("`{text}` is too large: must be at most {max}")
    }
}

/// `315360000s (10 years)`, `86400s (1 day)`: a bound on a duration.
fn describe_secs(secs: u64) -> String {
    const YEAR: u64 = 365 * 86_400;
    let human = if secs % YEAR == 0 {
        let n = secs / YEAR;
        format!("{n} year{}", if n == 1 { "" } else { "s" })
    } else if secs % 86_400 == 0 {
        let n = secs / 86_400;
        format!("{n} day{}", if n == 1 { "" } else { "s" })
    } else {
        return format!("{secs}s");
    };
    format!("{secs}s ({human})")
}

#[derive(Debug, PartialEq, Eq)]
enum UintError {
    Negative,
    TooLarge,
    Fraction,
    NotANumber,
}

/// Decimal digits with optional `_` separators (`40_000`), optionally `+`.
fn parse_uint(text: &str) -> Result<u64, UintError> {
    let t = text.trim();
    let (negative, digits) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let starts_with_digit = digits.as_bytes().first().is_some_and(u8::is_ascii_digit);
    let clean: String = digits.chars().filter(|c| *c != '_').collect();
    if starts_with_digit && !clean.is_empty() && clean.bytes().all(|b| b.is_ascii_digit()) {
        if negative && clean.bytes().any(|b| b != b'0') {
            return Err(UintError::Negative);
        }
        return clean.parse().map_err(|_| UintError::TooLarge);
    }
    if starts_with_digit && clean.parse::<f64>().is_ok() {
        if negative {
            return Err(UintError::Negative);
        }
        return Err(UintError::Fraction);
    }
    Err(UintError::NotANumber)
}

#[cfg(test)]
mod tests;
