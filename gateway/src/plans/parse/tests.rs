use proptest::prelude::*;

use super::*;
use crate::plans::{
    KnownUnits, Period, WindowLen, MAX_AMOUNT, MAX_CONCURRENCY_EXPIRY_SECS, MAX_CONCURRENT,
    MAX_WINDOW_SECS,
};

/// SPEC §3's example, verbatim.
const SPEC_EXAMPLE: &str = r#"default_plan: free_tier            # optional; admin can change it later
plans:
  free_tier:
    name: "Free Tier"
    endpoints:
      "gpt-4-turbo":
        fixed_windows:
          - window: 60s            # 3 requests per minute
            limit: 3
            unit_type: request     # default when absent: request
          - window: 86_400s        # 200 requests per day
            limit: 200
            unit_type: request
          - window: 60s            # 40k tokens per minute
            limit: 40_000
            unit_type: token
        max_concurrent: 4
        concurrency_expiry: 60s    # default 60s
        credits:                   # optional: this endpoint costs credits
          min_balance: 1           # balance needed to be admitted
          per_request: 1
          per_unit: { token: { credits: 1, per: 1000 } }   # rounded up per request
      "dall-e-3":
        fixed_windows:
          - window: 60s
            limit: 1
            unit_type: image
"#;

fn errors(text: &str) -> Vec<String> {
    match parse_plans(text, "plans.yaml") {
        Ok(set) => panic!("expected errors, parsed {set:?}"),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    }
}

#[test]
fn spec_example_loads() {
    let set = parse_plans(SPEC_EXAMPLE, "plans.yaml").unwrap();
    assert_eq!(set.default_plan.as_deref(), Some("free_tier"));
    let plan = &set.plans["free_tier"];
    assert_eq!(plan.name, "Free Tier");
    let gpt = plan.policy("gpt-4-turbo").unwrap();
    assert_eq!(
        gpt.windows,
        vec![
            Window {
                len: WindowLen::Fixed(60),
                limit: 3,
                unit: Unit::request()
            },
            Window {
                len: WindowLen::Fixed(86_400),
                limit: 200,
                unit: Unit::request()
            },
            Window {
                len: WindowLen::Fixed(60),
                limit: 40_000,
                unit: Unit::new("token")
            },
        ]
    );
    assert_eq!(gpt.max_concurrent, 4);
    assert_eq!(gpt.concurrency_expiry_secs, 60);
    let credits = gpt.credits.as_ref().unwrap();
    assert_eq!(credits.min_balance, 1);
    assert_eq!(credits.per_request, 1);
    assert_eq!(
        credits.per_unit[&Unit::new("token")],
        PerUnit {
            credits: 1,
            per: 1000
        }
    );
    let dalle = plan.policy("dall-e-3").unwrap();
    assert_eq!(dalle.windows[0].unit, Unit::new("image"));
    assert_eq!(dalle.max_concurrent, 0);
    assert_eq!(dalle.concurrency_expiry_secs, 60);
    assert_eq!(dalle.credits, None);
}

#[test]
fn defaults_apply() {
    let set = parse_plans(
        "plans:\n  p:\n    endpoints:\n      e:\n        fixed_windows:\n          - {window: 1m, limit: 5}\n",
        "x",
    )
    .unwrap();
    let plan = &set.plans["p"];
    assert_eq!(plan.name, "p");
    assert_eq!(set.default_plan, None);
    let policy = plan.policy("e").unwrap();
    assert_eq!(policy.windows[0].unit, Unit::request());
    assert_eq!(policy.windows[0].len, WindowLen::Fixed(60));
    assert_eq!(
        policy.concurrency_expiry_secs,
        DEFAULT_CONCURRENCY_EXPIRY_SECS
    );
}

#[test]
fn unit_kind_is_an_alias() {
    let set = parse_plans(
        "plans:\n  p:\n    endpoints:\n      e:\n        fixed_windows:\n          - {window: 60s, limit: 5, unit_kind: token}\n",
        "x",
    )
    .unwrap();
    assert_eq!(
        set.plans["p"].endpoints["e"].windows[0].unit,
        Unit::new("token")
    );
}

#[test]
fn json_text_parses_too() {
    let set = parse_plans(
        r#"{"plans": {"p": {"endpoints": {"e": {"fixed_windows": [{"window": "60s", "limit": 2}]}}}}}"#,
        "<request body>",
    )
    .unwrap();
    assert_eq!(set.plans["p"].endpoints["e"].windows[0].limit, 2);
}

#[test]
fn validation_errors_are_located() {
    let table: &[(&str, &[&str])] = &[
        (
            "plans:\n  free:\n    endpoints:\n      gpt-4o:\n        fixed_windows:\n          - window: 60s\n            limit: 3\n          - window: 60s\n            limit: 0\n            unit_type: token\n",
            &["plans.yaml:9:20: plans.free.endpoints.gpt-4o.fixed_windows[1].limit: must be at least 1"],
        ),
        (
            "plans:\n  p:\n    endpoints:\n      e:\n        fixed_windows:\n          - {window: 500ms, limit: 1}\n          - {window: 1500ms, limit: 1}\n          - {window: 0s, limit: 1}\n",
            &[
                "plans.yaml:6:22: plans.p.endpoints.e.fixed_windows[0].window: must be at least 1s",
                "plans.yaml:7:22: plans.p.endpoints.e.fixed_windows[1].window: `1500ms` is not a whole number of seconds",
                "plans.yaml:8:22: plans.p.endpoints.e.fixed_windows[2].window: must be at least 1s",
            ],
        ),
        (
            "plans:\n  p:\n    endpoints:\n      e:\n        fixed_windows:\n          - {window: 60s, limit: 1, unit_type: credit}\n",
            &["plans.yaml:6:48: plans.p.endpoints.e.fixed_windows[0].unit_type: a `credit` window caps the credits the endpoint's requests are charged: the endpoint needs `credits:`"],
        ),
        (
            "plans:\n  p:\n    nmae: x\n    endpoints:\n      e:\n        fixed_windows:\n          - {window: 60s, limt: 1}\n",
            &[
                "plans.yaml:3:5: plans.p.nmae: unknown key `nmae` (expected one of `name`, `endpoints`, `enforce`, `notify`)",
                "plans.yaml:7:13: plans.p.endpoints.e.fixed_windows[0].limit: missing `limit`",
                "plans.yaml:7:27: plans.p.endpoints.e.fixed_windows[0].limt: unknown key `limt` (expected one of `window`, `calendar`, `limit`, `unit_type`, `unit_kind`)",
            ],
        ),
        (
            "default_plan: gold\nplans:\n  free: {}\n",
            &["plans.yaml:1:15: default_plan: no plan named `gold` (plans: `free`)"],
        ),
        (
            "plans:\n  p:\n    endpoints:\n      e:\n        fixed_windows:\n          - {window: 60s, limit: 1}\n          - {window: 1m, limit: 2, unit_type: request}\n",
            &["plans.yaml:7:13: plans.p.endpoints.e.fixed_windows[1]: duplicate window: `request` per 60s is already limited by plans.p.endpoints.e.fixed_windows[0]"],
        ),
        (
            "plans:\n  p:\n    endpoints:\n      e:\n        credits:\n          per_unit:\n            token: {credits: 1, per: 0}\n",
            &["plans.yaml:7:38: plans.p.endpoints.e.credits.per_unit.token.per: must be at least 1"],
        ),
        (
            "plans:\n  p:\n    endpoints:\n      e:\n        max_concurrent: -1\n        concurrency_expiry: soon\n",
            &[
                "plans.yaml:5:25: plans.p.endpoints.e.max_concurrent: must not be negative",
                "plans.yaml:6:29: plans.p.endpoints.e.concurrency_expiry: `soon` is not a duration such as \"500ms\", \"60s\", \"5m\", \"1h\", \"1d\"",
            ],
        ),
        (
            "plans:\n  p:\n    endpoints:\n      e: {}\n      e: {}\n",
            &["plans.yaml:5:7: plans.p.endpoints.e: duplicate key `e`"],
        ),
        (
            "plans: [1]\n",
            &["plans.yaml:1:8: plans: expected a mapping, found a list"],
        ),
        (
            "plan: {}\n",
            &[
                "plans.yaml:1:1: plan: unknown key `plan` (expected one of `default_plan`, `plans`)",
                "plans.yaml:1:1: plans: missing `plans` (a mapping of plan id to plan)",
            ],
        ),
        (
            "plans:\n  p:\n    endpoints:\n      e:\n        fixed_windows:\n          - {window: 60, limit: 1.5}\n",
            &[
                "plans.yaml:6:22: plans.p.endpoints.e.fixed_windows[0].window: `60` has no unit (use ms, s, m, h or d)",
                "plans.yaml:6:33: plans.p.endpoints.e.fixed_windows[0].limit: `1.5` is not a whole number",
            ],
        ),
    ];
    let mut mismatches = Vec::new();
    for (text, expected) in table {
        let got = errors(text);
        if &got != expected {
            mismatches.push(format!(
                "for:\n{text}\n  got: {got:#?}\n  expected: {expected:#?}"
            ));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn ids_are_limited_to_200_bytes() {
    let long = "é".repeat(101); // 202 bytes
    let text = format!("plans:\n  p:\n    endpoints:\n      \"{long}\": {{}}\n");
    let errs = errors(&text);
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].starts_with("plans.yaml:4:7: plans.p.endpoints.")
            && errs[0].ends_with(": id is 202 bytes long; at most 200 bytes are allowed"),
        "{errs:?}"
    );
    let ok = "é".repeat(100);
    let text = format!("plans:\n  \"{ok}\":\n    endpoints:\n      \"{ok}\": {{}}\n");
    assert!(parse_plans(&text, "x").is_ok());
}

#[test]
fn sliding_windows_are_refused_naming_fixed_windows() {
    let errs = errors(
        "plans:\n  basic_plan:\n    name: \"Basic Plan\"\n    endpoints:\n      \"api/v1/chat\":\n        sliding_windows:\n          - window: 60s\n            limit: 100\n            unit_kind: request\n",
    );
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with(
            "plans.yaml:6:9: plans.basic_plan.endpoints.api/v1/chat.sliding_windows: "
        ) && errs[0].contains("only `fixed_windows`"),
        "{errs:?}"
    );
}

#[test]
fn syntax_errors_have_a_line() {
    let errs = errors("plans:\n  p: [\n");
    assert_eq!(errs.len(), 1);
    assert!(errs[0].starts_with("plans.yaml:"), "{errs:?}");
    assert!(errs[0].contains("YAML syntax error"), "{errs:?}");
}

#[test]
fn ids_with_dots_are_quoted_in_paths() {
    let errs = errors("plans:\n  p:\n    endpoints:\n      v1.chat: {limit: 1}\n");
    assert_eq!(
        errs,
        vec![
            "plans.yaml:4:17: plans.p.endpoints.\"v1.chat\".limit: unknown key `limit` (expected one of `fixed_windows`, `max_concurrent`, `concurrency_expiry`, `credits`, `enforce`)"
        ]
    );
}

#[test]
fn json_round_trip_of_the_example() {
    let set = parse_plans(SPEC_EXAMPLE, "plans.yaml").unwrap();
    for plan in set.plans.values() {
        let json = plan_to_json(plan);
        assert_eq!(&plan_from_json(&plan.id, &json).unwrap(), &**plan);
    }
    let whole = plans_to_json(&set);
    assert_eq!(whole["default_plan"], "free_tier");
    assert_eq!(
        whole["plans"]["free_tier"]["endpoints"]["gpt-4-turbo"]["fixed_windows"][1],
        json!({"window": "86400s", "limit": 200, "unit_type": "request"})
    );
    let text = serde_json::to_string(&whole).unwrap();
    assert_eq!(parse_plans(&text, "<json>").unwrap(), set);
}

const CALENDAR_PLANS: &str = "\
plans:
  pro:
    endpoints:
      chat:
        fixed_windows:
          - {window: 60s, limit: 100}
          - {window: 1mo, calendar: utc, limit: 1_000_000, unit_type: token}
          - {window: 1w, calendar: UTC, limit: 5_000}
          - {window: 1d, calendar: utc, limit: 1_000}
          - {window: 1d, limit: 2_000}
";

#[test]
fn calendar_windows_load_and_round_trip() {
    let set = parse_plans(CALENDAR_PLANS, "plans.yaml").unwrap();
    let plan = &set.plans["pro"];
    let lens: Vec<WindowLen> = plan.endpoints["chat"]
        .windows
        .iter()
        .map(|w| w.len)
        .collect();
    assert_eq!(
        lens,
        vec![
            WindowLen::Fixed(60),
            WindowLen::Calendar(Period::Month),
            WindowLen::Calendar(Period::Week),
            WindowLen::Calendar(Period::Day),
            // `1d` without a calendar stays the fixed 86,400 s window
            // (the same boundaries, its own counter).
            WindowLen::Fixed(86_400),
        ]
    );
    let json = plan_to_json(plan);
    assert_eq!(
        json["endpoints"]["chat"]["fixed_windows"][1],
        json!({"window": "1mo", "calendar": "utc", "limit": 1_000_000, "unit_type": "token"})
    );
    assert_eq!(
        json["endpoints"]["chat"]["fixed_windows"][4],
        json!({"window": "86400s", "limit": 2_000, "unit_type": "request"})
    );
    assert_eq!(&plan_from_json("pro", &json).unwrap(), &**plan);
}

#[test]
fn calendar_window_errors_are_located() {
    let file = |window: &str| {
        format!("plans:\n  p:\n    endpoints:\n      e:\n        fixed_windows:\n          - {window}\n")
    };
    let cases: &[(&str, &str)] = &[
        (
            "{window: 1mo, limit: 1}",
            "plans.yaml:6:22: plans.p.endpoints.e.fixed_windows[0].window: `1mo` is a calendar window: \
             add `calendar: utc` for calendar months (from the 1st 00:00 UTC)",
        ),
        (
            "{window: 1w, limit: 1}",
            "plans.yaml:6:22: plans.p.endpoints.e.fixed_windows[0].window: `1w` is a calendar window: \
             add `calendar: utc` for calendar weeks (from Monday 00:00 UTC), or write `7d` for fixed 7-day windows",
        ),
        (
            "{window: 60s, calendar: utc, limit: 1}",
            "plans.yaml:6:22: plans.p.endpoints.e.fixed_windows[0].window: a calendar window is `1d`, `1w` \
             or `1mo`, found `60s` (remove `calendar` for a fixed window)",
        ),
        (
            "{window: 2mo, calendar: utc, limit: 1}",
            "plans.yaml:6:22: plans.p.endpoints.e.fixed_windows[0].window: a calendar window is `1d`, `1w` \
             or `1mo`, found `2mo` (remove `calendar` for a fixed window)",
        ),
        (
            "{window: 1mo, calendar: Europe/Paris, limit: 1}",
            "plans.yaml:6:37: plans.p.endpoints.e.fixed_windows[0].calendar: unknown calendar \
             `Europe/Paris`: only `utc` is supported (days from 00:00 UTC, weeks from Monday, months from the 1st)",
        ),
        (
            "{window: 1mo, calendar: [utc], limit: 1}",
            "plans.yaml:6:37: plans.p.endpoints.e.fixed_windows[0].calendar: expected a string, found a list",
        ),
    ];
    for (window, want) in cases {
        assert_eq!(errors(&file(window)), vec![want.to_string()], "{window}");
    }
    // The same (period, unit) twice is a duplicate; a calendar day next to
    // a fixed day is not.
    let twice = "plans:\n  p:\n    endpoints:\n      e:\n        fixed_windows:\n          \
                 - {window: 1mo, calendar: utc, limit: 1}\n          - {window: 1mo, calendar: utc, limit: 2}\n";
    assert_eq!(
        errors(twice),
        vec![
            "plans.yaml:7:13: plans.p.endpoints.e.fixed_windows[1]: duplicate window: `request` \
              per 1mo is already limited by plans.p.endpoints.e.fixed_windows[0]"
                .to_string()
        ]
    );
    // The JSON form is checked alike.
    let err = plan_from_json(
        "pro",
        &json!({"endpoints": {"e": {"fixed_windows": [{"window": "1mo", "limit": 1}]}}}),
    )
    .unwrap_err();
    assert!(
        err.to_string().starts_with(
            "<json>: plans.pro.endpoints.e.fixed_windows[0].window: `1mo` is a calendar window"
        ),
        "{err}"
    );
}

#[test]
fn plan_from_json_reports_paths() {
    let err = plan_from_json(
        "pro",
        &json!({"endpoints": {"e": {"fixed_windows": [{"window": "60s", "limit": 0}]}}}),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "<json>: plans.pro.endpoints.e.fixed_windows[0].limit: must be at least 1"
    );
}

#[test]
fn uint_forms() {
    assert_eq!(parse_uint("40_000"), Ok(40_000));
    assert_eq!(parse_uint("+3"), Ok(3));
    assert_eq!(parse_uint("-0"), Ok(0));
    assert_eq!(parse_uint("-1"), Err(UintError::Negative));
    assert_eq!(parse_uint("1.5"), Err(UintError::Fraction));
    assert_eq!(parse_uint("1e3"), Err(UintError::Fraction));
    assert_eq!(parse_uint("99999999999999999999"), Err(UintError::TooLarge));
    assert_eq!(parse_uint("x"), Err(UintError::NotANumber));
    assert_eq!(parse_uint("_1"), Err(UintError::NotANumber));
    assert_eq!(parse_uint(""), Err(UintError::NotANumber));
}

/// A plan with one endpoint `e` whose policy is `policy` (YAML lines,
/// indented under the endpoint).
fn one_policy(policy: &str) -> String {
    let body: String = policy.lines().map(|l| format!("        {l}\n")).collect();
    format!("plans:\n  p:\n    endpoints:\n      e:\n{body}")
}

#[test]
fn numbers_above_their_bounds_are_refused_naming_key_and_bound() {
    let amount = "is too large: must be at most 1000000000000000 (10^15, the largest amount plangate stores)";
    let text = one_policy(
        "fixed_windows:\n\
         \x20 - {window: 60s, limit: 1_000_000_000_000_001}\n\
         \x20 - {window: 1d, limit: 18446744073709551615}\n\
         \x20 - {window: 99999999999999999999s, limit: 1}\n\
         \x20 - {window: 10000000000000000s, limit: 1}\n\
         \x20 - {window: 315360001s, limit: 1}\n\
         max_concurrent: 1_000_001\n\
         concurrency_expiry: 2d\n\
         credits:\n\
         \x20 min_balance: 1000000000000001\n\
         \x20 per_request: 9223372036854775807\n\
         \x20 per_unit: {token: {credits: 1000000000000001, per: 1000000000000001}}\n",
    );
    let expected = vec![
        format!("plans.yaml:6:34: plans.p.endpoints.e.fixed_windows[0].limit: `1_000_000_000_000_001` {amount}"),
        format!("plans.yaml:7:33: plans.p.endpoints.e.fixed_windows[1].limit: `18446744073709551615` {amount}"),
        "plans.yaml:8:22: plans.p.endpoints.e.fixed_windows[2].window: `99999999999999999999s`: number out of range".to_string(),
        "plans.yaml:9:22: plans.p.endpoints.e.fixed_windows[3].window: `10000000000000000s` is too long: must be at most 315360000s (10 years)".to_string(),
        "plans.yaml:10:22: plans.p.endpoints.e.fixed_windows[4].window: `315360001s` is too long: must be at most 315360000s (10 years)".to_string(),
        "plans.yaml:11:25: plans.p.endpoints.e.max_concurrent: `1_000_001` is too large: must be at most 1000000".to_string(),
        "plans.yaml:12:29: plans.p.endpoints.e.concurrency_expiry: `2d` is too long: must be at most 86400s (1 day)".to_string(),
        format!("plans.yaml:14:24: plans.p.endpoints.e.credits.min_balance: `1000000000000001` {amount}"),
        format!("plans.yaml:15:24: plans.p.endpoints.e.credits.per_request: `9223372036854775807` {amount}"),
        format!("plans.yaml:16:39: plans.p.endpoints.e.credits.per_unit.token.credits: `1000000000000001` {amount}"),
        format!("plans.yaml:16:62: plans.p.endpoints.e.credits.per_unit.token.per: `1000000000000001` {amount}"),
    ];
    assert_eq!(errors(&text), expected);
}

#[test]
fn numbers_at_their_bounds_load() {
    let text = one_policy(
        "fixed_windows:\n\
         \x20 - {window: 315360000s, limit: 1_000_000_000_000_000}\n\
         max_concurrent: 1_000_000\n\
         concurrency_expiry: 1d\n\
         credits:\n\
         \x20 min_balance: 1000000000000000\n\
         \x20 per_request: 1000000000000000\n\
         \x20 per_unit: {token: {credits: 1000000000000000, per: 1000000000000000}}\n",
    );
    let set = parse_plans(&text, "plans.yaml").unwrap();
    let policy = &set.plans["p"].endpoints["e"];
    assert_eq!(policy.windows[0].len, WindowLen::Fixed(MAX_WINDOW_SECS));
    assert_eq!(policy.windows[0].limit, MAX_AMOUNT);
    assert_eq!(policy.max_concurrent, MAX_CONCURRENT);
    assert_eq!(policy.concurrency_expiry_secs, MAX_CONCURRENCY_EXPIRY_SECS);
    let credits = policy.credits.as_ref().unwrap();
    assert_eq!(
        (credits.min_balance, credits.per_request),
        (MAX_AMOUNT, MAX_AMOUNT)
    );
}

#[test]
fn stored_plans_above_the_bounds_are_clamped_not_refused() {
    let plan = plan_from_json(
        "old",
        &json!({"endpoints": {"e": {
            "fixed_windows": [{"window": "10000000000000000s", "limit": 18446744073709551615u64}],
            "max_concurrent": 4294967295u64,
            "concurrency_expiry": "3650d",
            "credits": {"per_request": 9223372036854775807u64, "per_unit": {"token": {"credits": 1, "per": 99999999999999999u64}}}
        }}}),
    )
    .unwrap();
    let policy = &plan.endpoints["e"];
    assert_eq!(
        (policy.windows[0].len, policy.windows[0].limit),
        (WindowLen::Fixed(MAX_WINDOW_SECS), MAX_AMOUNT)
    );
    assert_eq!(policy.max_concurrent, MAX_CONCURRENT);
    assert_eq!(policy.concurrency_expiry_secs, MAX_CONCURRENCY_EXPIRY_SECS);
    let credits = policy.credits.as_ref().unwrap();
    assert_eq!(credits.per_request, MAX_AMOUNT);
    assert_eq!(credits.per_unit[&Unit::new("token")].per, MAX_AMOUNT);
}

fn routes_units() -> KnownUnits {
    KnownUnits::new([Unit::new("token"), Unit::new("image")])
}

#[test]
fn units_no_route_measures_are_refused_with_a_suggestion() {
    let text = one_policy(
        "fixed_windows:\n\
         \x20 - {window: 60s, limit: 5}\n\
         \x20 - {window: 60s, limit: 5, unit_type: tokens}\n\
         \x20 - {window: 60s, limit: 5, unit_kind: imgae}\n\
         \x20 - {window: 60s, limit: 5, unit_type: gpu-second}\n\
         \x20 - {window: 60s, limit: 5, unit_type: token}\n\
         credits:\n\
         \x20 per_unit:\n\
         \x20   images: {credits: 1}\n\
         \x20   image: {credits: 1}\n",
    );
    // Without routes to check against, the file is fine on its own.
    assert!(parse_plans(&text, "plans.yaml").is_ok());
    let known = "(known: request, image, token)";
    let got: Vec<String> = parse_plans_for(&text, "plans.yaml", &routes_units())
        .unwrap_err()
        .0
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        got,
        vec![
            format!("plans.yaml:7:48: plans.p.endpoints.e.fixed_windows[1].unit_type: unit `tokens` is not measured or reserved by any route {known}; did you mean `token`?"),
            format!("plans.yaml:8:48: plans.p.endpoints.e.fixed_windows[2].unit_kind: unit `imgae` is not measured or reserved by any route {known}; did you mean `image`?"),
            format!("plans.yaml:9:48: plans.p.endpoints.e.fixed_windows[3].unit_type: unit `gpu-second` is not measured or reserved by any route {known}; add `usage.gpu-second` or `reserve.gpu-second` to a route in the config"),
            format!("plans.yaml:13:13: plans.p.endpoints.e.credits.per_unit.images: unit `images` is not measured or reserved by any route {known}; did you mean `image`?"),
        ]
    );
    // `request` needs no route; the SPEC example passes with its units.
    assert!(parse_plans_for(SPEC_EXAMPLE, "plans.yaml", &routes_units()).is_ok());
    let only_requests = KnownUnits::new([]);
    let errs = parse_plans_for(SPEC_EXAMPLE, "plans.yaml", &only_requests).unwrap_err();
    let keys: Vec<&str> = errs.0.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        vec![
            "plans.free_tier.endpoints.gpt-4-turbo.fixed_windows[2].unit_type",
            "plans.free_tier.endpoints.gpt-4-turbo.credits.per_unit.token",
            "plans.free_tier.endpoints.dall-e-3.fixed_windows[0].unit_type",
        ]
    );
}

#[test]
fn units_of_parsed_plans_are_checked_without_lines() {
    let set = parse_plans(SPEC_EXAMPLE, "plans.yaml").unwrap();
    assert!(check_plan_units(&set, &routes_units(), "plans in force").is_ok());
    let err = check_plan_units(
        &set,
        &KnownUnits::new([Unit::new("token")]),
        "plans in force",
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "plans in force: plans.free_tier.endpoints.dall-e-3.fixed_windows[0].unit_type: \
         unit `image` is not measured or reserved by any route (known: request, token); \
         add `usage.image` or `reserve.image` to a route in the config"
    );
}

#[test]
fn measured_amounts_saturate_at_the_largest_amount() {
    use crate::plans::clamp_amount;
    assert_eq!(clamp_amount(5), 5);
    assert_eq!(clamp_amount(MAX_AMOUNT), MAX_AMOUNT);
    assert_eq!(clamp_amount(u64::MAX), MAX_AMOUNT);
    let cost = CreditCost {
        min_balance: 0,
        per_request: 0,
        per_unit: [
            (
                Unit::new("token"),
                PerUnit {
                    credits: MAX_AMOUNT,
                    per: 1,
                },
            ),
            (Unit::new("image"), PerUnit { credits: 3, per: 2 }),
        ]
        .into(),
    };
    assert_eq!(cost.unit_charge(&[(Unit::new("image"), 3)]), 5);
    assert_eq!(
        cost.unit_charge(&[
            (Unit::new("token"), u64::MAX),
            (Unit::new("image"), u64::MAX)
        ]),
        MAX_AMOUNT
    );
}

fn unit_strategy() -> impl Strategy<Value = Unit> {
    prop_oneof![
        Just(Unit::request()),
        "[a-z][a-z0-9_.-]{0,10}"
            .prop_filter("reserved", |s| s != RESERVED_UNIT)
            .prop_map(|s| Unit::new(&s)),
    ]
}

fn len_strategy() -> impl Strategy<Value = WindowLen> {
    prop_oneof![
        3 => (1u64..=MAX_WINDOW_SECS).prop_map(WindowLen::Fixed),
        1 => prop_oneof![Just(Period::Day), Just(Period::Week), Just(Period::Month)]
            .prop_map(WindowLen::Calendar),
    ]
}

fn policy_strategy() -> impl Strategy<Value = Policy> {
    (
        prop::collection::vec((len_strategy(), 1u64..=MAX_AMOUNT, unit_strategy()), 0..5),
        0u32..=MAX_CONCURRENT,
        1u64..=MAX_CONCURRENCY_EXPIRY_SECS,
        prop::option::of((
            0u64..=MAX_AMOUNT,
            0u64..=MAX_AMOUNT,
            prop::collection::btree_map(
                unit_strategy(),
                (0u64..=MAX_AMOUNT, 1u64..=MAX_AMOUNT),
                0..3,
            ),
        )),
    )
        .prop_map(|(windows, max_concurrent, expiry, credits)| {
            let mut seen = Vec::new();
            let windows = windows
                .into_iter()
                .filter(|(secs, _, unit)| {
                    let fresh = !seen.contains(&(*secs, unit.clone()));
                    seen.push((*secs, unit.clone()));
                    fresh
                })
                .map(|(len, limit, unit)| Window { len, limit, unit })
                .collect();
            Policy {
                windows,
                max_concurrent,
                concurrency_expiry_secs: expiry,
                credits: credits.map(|(min_balance, per_request, per_unit)| CreditCost {
                    min_balance,
                    per_request,
                    per_unit: per_unit
                        .into_iter()
                        .map(|(u, (credits, per))| (u, PerUnit { credits, per }))
                        .collect(),
                }),
                enforce: true,
                key: None,
            }
        })
}

fn plan_strategy() -> impl Strategy<Value = Plan> {
    (
        "\\PC{1,20}",
        "\\PC{0,20}",
        prop::collection::btree_map("\\PC{1,30}", policy_strategy(), 0..4),
        prop::collection::btree_set(1u8..=100, 0..3),
        prop::collection::btree_set(1u8..=100, 0..3),
        prop::option::of(1..=crate::plans::MAX_EXPIRES_WITHIN_SECS),
    )
        .prop_map(|(id, name, endpoints, windows, balances, expiry)| {
            let has_credits = endpoints.values().any(|p: &Policy| p.credits.is_some());
            let mut notify: Vec<NotifyRule> = windows
                .into_iter()
                .map(|percent| NotifyRule::Window { percent })
                .collect();
            if has_credits {
                notify.extend(
                    balances
                        .into_iter()
                        .map(|percent| NotifyRule::Balance { percent }),
                );
            }
            notify.extend(expiry.map(|within_secs| NotifyRule::Expiry { within_secs }));
            Plan {
                id,
                name,
                endpoints: endpoints
                    .into_iter()
                    .map(|(k, v)| (k, Arc::new(v)))
                    .collect(),
                notify,
            }
        })
}

proptest! {
    #[test]
    fn json_round_trip(plan in plan_strategy()) {
        let json = plan_to_json(&plan);
        prop_assert_eq!(plan_from_json(&plan.id, &json).unwrap(), plan);
    }

    #[test]
    fn whole_set_round_trips_through_text(plans in prop::collection::vec(plan_strategy(), 0..3)) {
        let mut set = PlanSet::default();
        for plan in plans {
            set.plans.insert(plan.id.clone(), Arc::new(plan));
        }
        set.default_plan = set.plans.keys().next().cloned();
        let text = serde_json::to_string_pretty(&plans_to_json(&set)).unwrap();
        prop_assert_eq!(parse_plans(&text, "<json>").unwrap(), set);
    }

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
        let _ = parse_plans(&text, "x");
    }

    #[test]
    fn yaml_like_text_never_panics(text in "[a-z:\\-\\[\\]{}&*!|>'\" \n0-9_,#.]{0,200}") {
        let _ = parse_plans(&text, "x");
    }
}

proptest! {
    /// Small edits of a valid file reach the checks behind the parser
    /// (unlike random text, which rarely parses at all).
    #[test]
    fn edited_example_never_panics(
        edits in prop::collection::vec((any::<prop::sample::Index>(), 0usize..3, "[ a-z0-9:\\-\\[\\]{}_\n#'\"]{0,3}"), 1..6)
    ) {
        let mut text: Vec<char> = SPEC_EXAMPLE.chars().collect();
        for (at, delete, insert) in edits {
            let i = at.index(text.len() + 1);
            let end = (i + delete).min(text.len());
            text.splice(i..end, insert.chars());
        }
        let text: String = text.into_iter().collect();
        if let Err(errors) = parse_plans(&text, "x") {
            prop_assert!(!errors.0.is_empty());
        }
    }
}

/// An alias bomb is one located error naming the bound, not an
/// out-of-memory kill or minutes of work.
#[test]
fn alias_bombs_are_refused_with_a_located_error() {
    let mut doc = String::from("plans:\n  a0: &a0 [x, x]\n");
    for i in 1..=30 {
        let p = i - 1;
        doc.push_str(&format!("  a{i}: &a{i} [*a{p}, *a{p}]\n"));
    }
    let errs = errors(&doc);
    assert_eq!(errs.len(), 1, "{errs:?}");
    // Line 19 is `  a17: &a17 [*a16, *a16]`: its second alias takes the
    // count past 2^20 nodes.
    assert_eq!(
        errs[0],
        "plans.yaml:19:20: the document expands to more than 1000000 nodes \
         (aliases count as many nodes as they name)"
    );
}

#[test]
fn plans_over_the_size_bound_are_refused() {
    let mut doc = String::from("plans:\n  p:\n    name: big\n    endpoints: {}\n#");
    doc.push_str(&"x".repeat(4 * 1024 * 1024 + 1 - doc.len()));
    assert!(parse_plans(&doc[..doc.len() - 1], "plans.yaml").is_ok());
    let errs = errors(&doc);
    assert_eq!(
        errs,
        ["plans.yaml: the document is longer than 4194304 bytes (4 MiB), the most allowed"]
    );
    let dir = std::env::temp_dir().join(format!("plangate-big-plans-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("plans.yaml");
    std::fs::write(&path, &doc).unwrap();
    let errs = load_plans_file(&path).unwrap_err();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(
        errs.to_string(),
        format!(
            "{}: the document is longer than 4194304 bytes (4 MiB), the most allowed",
            path.display()
        )
    );
}

/// 225k anchors, each aliased once, in a list under an unknown key: the
/// whole document is read and checked (one error, for the key) rather than
/// stopped by the bound on nodes.
#[test]
fn many_anchors_are_read_and_checked() {
    let mut doc = String::from("plans:\n  p:\n    endpoints: {}\njunk: [");
    for i in 0..225_000 {
        doc.push_str(&format!("&a{i:x} v,*a{i:x},"));
    }
    doc.push_str("end]\n");
    assert!(doc.len() <= 4 << 20);
    assert_eq!(
        errors(&doc),
        ["plans.yaml:4:1: junk: unknown key `junk` (expected one of `default_plan`, `plans`)"]
    );
}

/// A mapping with many keys is checked for duplicates in linear time.
#[test]
fn many_keys_are_checked_for_duplicates() {
    let mut doc = String::from("plans:\n");
    for i in 0..100_000 {
        doc.push_str(&format!("  p{i}: {{}}\n"));
    }
    doc.push_str("  p7: {}\n");
    let errs = errors(&doc);
    assert_eq!(errs, ["plans.yaml:100002:3: plans.p7: duplicate key `p7`"]);
}

#[test]
fn enforce_false_is_shadow_mode_per_plan_or_endpoint() {
    let text = r#"
plans:
  rollout:
    enforce: false
    endpoints:
      "a": { fixed_windows: [{ window: 60s, limit: 1 }] }
      "b": { enforce: true, fixed_windows: [{ window: 60s, limit: 1 }] }
  normal:
    endpoints:
      "a": { fixed_windows: [{ window: 60s, limit: 1 }] }
      "c": { enforce: false, fixed_windows: [{ window: 60s, limit: 1 }] }
"#;
    let set = parse_plans(text, "plans.yaml").expect("parses");
    let enforce = |plan: &str, ep: &str| set.plans[plan].policy(ep).expect("endpoint").enforce;
    assert!(!enforce("rollout", "a"), "the plan's default");
    assert!(enforce("rollout", "b"), "the endpoint overrides it");
    assert!(enforce("normal", "a"), "enforced unless said otherwise");
    assert!(!enforce("normal", "c"));
    // Stored and shown as JSON: the shadowed endpoints say so.
    let json = plan_to_json(&set.plans["rollout"]);
    assert_eq!(json["endpoints"]["a"]["enforce"], serde_json::json!(false));
    assert!(json["endpoints"]["b"].get("enforce").is_none());
    let again = parse_plans(
        &serde_json::json!({"plans": {"rollout": json}}).to_string(),
        "plans.json",
    )
    .expect("round trip");
    assert_eq!(again.plans["rollout"], set.plans["rollout"]);

    assert_eq!(
        errors("plans:\n  p:\n    enforce: maybe\n    endpoints: {}\n"),
        vec!["plans.yaml:3:14: plans.p.enforce: expected true or false, found `maybe`"]
    );
}

#[test]
fn credit_windows_are_spend_caps_of_endpoints_with_credits() {
    let text = r#"
plans:
  p:
    endpoints:
      e:
        fixed_windows:
          - { window: 2_592_000s, limit: 5_000, unit_type: credit }
        credits: { min_balance: 1, per_request: 1 }
"#;
    let set = parse_plans(text, "plans.yaml").expect("parses");
    let policy = set.plans["p"].policy("e").expect("endpoint");
    assert!(policy.windows[0].unit.is_credit());
    // Known to every config: the gateway counts it, no route measures it.
    check_plan_units(&set, &KnownUnits::new([]), "plans.yaml").expect("no route needed");
    // Pricing credits in credits stays refused.
    let priced = text.replace(
        "per_request: 1 }",
        "per_request: 1, per_unit: { credit: { credits: 1, per: 1 } } }",
    );
    assert!(errors(&priced)[0].contains("`credit` is a reserved unit name"));
}

const NOTIFY_PLANS: &str = r#"plans:
  pro:
    notify:
      - {at: 80%, of: window}
      - at: 100%
        of: window
      - {at: 90%, of: balance}
      - expires_within: 7d
    endpoints:
      chat:
        fixed_windows: [{window: 60s, limit: 10}]
        credits: {per_request: 1}
"#;

#[test]
fn notify_rules_load_and_round_trip() {
    let set = parse_plans(NOTIFY_PLANS, "plans.yaml").unwrap();
    let plan = &set.plans["pro"];
    assert_eq!(
        plan.notify,
        vec![
            NotifyRule::Window { percent: 80 },
            NotifyRule::Window { percent: 100 },
            NotifyRule::Balance { percent: 90 },
            NotifyRule::Expiry {
                within_secs: 7 * 86_400
            },
        ]
    );
    let json = plan_to_json(plan);
    assert_eq!(
        json["notify"],
        serde_json::json!([
            {"at": "80%", "of": "window"},
            {"at": "100%", "of": "window"},
            {"at": "90%", "of": "balance"},
            {"expires_within": "604800s"},
        ])
    );
    assert_eq!(&plan_from_json("pro", &json).unwrap(), &**plan);
    // A plan without notifications is stored as before (no key).
    let plain = parse_plans(SPEC_EXAMPLE, "plans.yaml").unwrap();
    assert!(plan_to_json(&plain.plans["free_tier"])
        .get("notify")
        .is_none());
}

#[test]
fn notify_thresholds_round_up() {
    assert_eq!(NotifyRule::threshold(10, 80), 8);
    assert_eq!(NotifyRule::threshold(3, 80), 3);
    assert_eq!(NotifyRule::threshold(1000, 1), 10);
    assert_eq!(NotifyRule::threshold(7, 100), 7);
    assert_eq!(NotifyRule::threshold(1, 1), 1);
    assert_eq!(NotifyRule::threshold(MAX_AMOUNT, 100), MAX_AMOUNT);
}

#[test]
fn notify_errors_are_located() {
    let text = r#"plans:
  a:
    notify:
      - {at: 80, of: window}
      - {at: 0%, of: window}
      - {at: 101%, of: window}
      - {at: 80%, of: windows}
      - {at: 50%}
      - {of: window}
      - {expires_within: 7d, at: 80%}
      - {expires_within: 0s}
      - {expires_within: 400d}
      - {at: 80%, of: window, every: 1d}
      - {at: 75%, of: window}
      - {at: 75%, of: window}
      - {at: 80%, of: balance}
    endpoints:
      chat: {fixed_windows: [{window: 60s, limit: 10}]}
  b:
    notify: {at: 80%, of: window}
    endpoints: {}
"#;
    assert_eq!(
        errors(text),
        vec![
            "plans.yaml:4:14: plans.a.notify[0].at: `80` is not a percentage: write it with `%`, e.g. `80%`",
            "plans.yaml:5:14: plans.a.notify[1].at: `0%` must be from 1% to 100%",
            "plans.yaml:6:14: plans.a.notify[2].at: `101%` must be from 1% to 100%",
            "plans.yaml:7:23: plans.a.notify[3].of: `windows` is not a threshold: `window` or `balance`",
            "plans.yaml:8:9: plans.a.notify[4].of: missing `of` (`window` or `balance`)",
            "plans.yaml:9:9: plans.a.notify[5].at: missing `at` (a percentage such as `80%`), or give `expires_within`",
            "plans.yaml:10:30: plans.a.notify[6].at: `expires_within` is a notification of its own: give it without `at` and `of`",
            "plans.yaml:11:26: plans.a.notify[7].expires_within: must be at least 1s",
            "plans.yaml:12:26: plans.a.notify[8].expires_within: `400d` is too long: must be at most 31536000s (1 year)",
            "plans.yaml:13:31: plans.a.notify[9].every: unknown key `every` (expected one of `at`, `of`, `expires_within`)",
            "plans.yaml:15:9: plans.a.notify[11]: duplicate notification: the same as plans.a.notify[10]",
            "plans.yaml:16:23: plans.a.notify[12].of: `of: balance` needs credits: no endpoint of the plan has `credits:`",
            "plans.yaml:20:13: plans.b.notify: expected a list of notifications such as `- {at: 80%, of: window}`, found a mapping",
        ]
    );
}
