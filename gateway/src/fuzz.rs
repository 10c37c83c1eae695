//! Property-based fuzz targets for the parsers that read untrusted or
//! hand-written input (issue 6): the config file, the plans file, the
//! usage meter over upstream bodies (SSE and JSON), and the duration
//! formatter of the `x-ratelimit-reset-*` headers. They complement the
//! "never panics" properties next to each parser with structure-aware
//! inputs that get past the first syntax error.
//!
//! CI runs them with `PROPTEST_CASES=256` (tests/run.sh); `tests/fuzz.sh`
//! runs them (and every other "never panics" property) for longer.

use std::path::Path;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;

use crate::config::{Config, ValueSource};
use crate::headers::{duration_value, format_duration_ms, parse_duration_ms};
use crate::plans::parse::parse_plans;
use crate::plans::{PlanSet, Unit};
use crate::usage::{dotted, ResponseMeter};

const EXAMPLE_CONFIG: &str = include_str!("../../config/plangate.toml");
const EXAMPLE_PLANS: &str = include_str!("../../config/plans.yaml");

fn env(name: &str) -> Option<String> {
    match name {
        "PLANGATE_ADMIN_TOKEN" => Some("token".into()),
        "VLLM_API_KEY" => Some("key".into()),
        _ => None,
    }
}

/// Apply `edits` (position, characters to delete, text to insert) to `text`.
fn edit(text: &str, edits: &[(prop::sample::Index, usize, String)]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for (at, delete, insert) in edits {
        let i = at.index(chars.len() + 1);
        let end = (i + delete).min(chars.len());
        chars.splice(i..end, insert.chars());
    }
    chars.into_iter().collect()
}

fn edits(
    alphabet: &'static str,
) -> impl Strategy<Value = Vec<(prop::sample::Index, usize, String)>> {
    prop::collection::vec((any::<prop::sample::Index>(), 0usize..4, alphabet), 1..8)
}

/// A plan set the parser accepted must hold every rule it checks.
fn check_accepted(set: &PlanSet) -> Result<(), TestCaseError> {
    if let Some(d) = &set.default_plan {
        prop_assert!(set.plans.contains_key(d), "default {d} names no plan");
    }
    for plan in set.plans.values() {
        for policy in plan.endpoints.values() {
            let mut seen = Vec::new();
            for w in &policy.windows {
                prop_assert!(w.len.max_secs() >= 1);
                prop_assert!(w.limit >= 1);
                prop_assert!(w.unit.as_str() != "credit");
                prop_assert!(!seen.contains(&(w.len, w.unit.clone())), "duplicate window");
                seen.push((w.len, w.unit.clone()));
            }
        }
    }
    Ok(())
}

/// YAML values that plans files get wrong in practice.
fn yaml_scalar() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "60s",
        "86_400s",
        "1.5s",
        "0s",
        "-1s",
        "1m",
        "60",
        "0",
        "-3",
        "1_000",
        "99999999999999999999999",
        "3.0",
        "null",
        "~",
        "''",
        "\"\"",
        "[]",
        "{}",
        "true",
        "request",
        "token",
        "credit",
        "gpu-second",
        "\"✓ ünï\"",
        "&a x",
        "*a",
        "!!str 5",
        "0x10",
        "1e3",
        ".inf",
        "|\n  text",
    ])
    .prop_map(str::to_owned)
}

fn yaml_key() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "default_plan",
        "plans",
        "name",
        "endpoints",
        "fixed_windows",
        "sliding_windows",
        "window",
        "limit",
        "unit_type",
        "unit_kind",
        "max_concurrent",
        "concurrency_expiry",
        "credits",
        "min_balance",
        "per_request",
        "per_unit",
        "token",
        "per",
        "free",
        "gpt-4",
        "\"a:b\"",
        "x",
    ])
    .prop_map(str::to_owned)
}

/// A YAML mapping of depth `depth` made of plans-schema keys.
fn yaml_doc(depth: u32) -> BoxedStrategy<String> {
    let leaf = (yaml_key(), yaml_scalar()).prop_map(|(k, v)| format!("{k}: {v}\n"));
    if depth == 0 {
        return leaf.boxed();
    }
    let child = yaml_doc(depth - 1);
    let list_item = (yaml_key(), yaml_scalar(), yaml_key(), yaml_scalar())
        .prop_map(|(k1, v1, k2, v2)| format!("  - {k1}: {v1}\n    {k2}: {v2}\n"));
    prop_oneof![
        3 => leaf,
        2 => (yaml_key(), prop::collection::vec(child, 1..4)).prop_map(|(k, kids)| {
            let body: String = kids
                .concat()
                .lines()
                .map(|l| format!("  {l}\n"))
                .collect();
            format!("{k}:\n{body}")
        }),
        1 => (yaml_key(), prop::collection::vec(list_item, 1..3))
            .prop_map(|(k, items)| format!("{k}:\n{}", items.concat())),
    ]
    .boxed()
}

/// Go's `time.Duration` text for whole milliseconds, written independently
/// of [`format_duration_ms`] (float seconds, shortest representation).
fn reference_duration(ms: u64) -> String {
    if ms == 0 {
        return "0s".into();
    }
    if ms < 1_000 {
        return format!("{ms}ms");
    }
    let (h, m) = (ms / 3_600_000, ms % 3_600_000 / 60_000);
    let secs = (ms % 60_000) as f64 / 1_000.0;
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h{m}m"));
    } else if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    out.push_str(&format!("{secs}s"));
    out
}

fn sse_event() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<u32>().prop_map(|n| format!(
            "data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":1,\"total_tokens\":{n}}}}}"
        )),
        Just("data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}".to_owned()),
        Just("data: [DONE]".to_owned()),
        Just(": keep-alive".to_owned()),
        Just("event: ping\ndata: {}".to_owned()),
        Just("data: {\"usage\":\ndata: {\"total_tokens\":7}}".to_owned()),
        "\\PC{0,40}".prop_map(|s| format!("data: {s}")),
        "[a-z:{}\"0-9 ]{0,30}",
    ]
}

proptest! {
    /// Small edits of the example config never panic the loader; whatever
    /// it refuses comes with at least one located error.
    #[test]
    fn config_edits_never_panic(e in edits("[ a-z0-9_=\\[\\]{}\".:/$\n#,*-]{0,4}")) {
        let text = edit(EXAMPLE_CONFIG, &e);
        match Config::from_toml(&text, Path::new("conf/plangate.toml"), &env) {
            Ok(_) => {}
            Err(errors) => {
                prop_assert!(!errors.0.is_empty());
                for err in &errors.0 {
                    prop_assert!(!err.to_string().is_empty());
                }
            }
        }
    }

    /// Edits of the example plans file: never a panic, and anything the
    /// parser accepts obeys every rule it promises to check.
    #[test]
    fn plans_edits_never_panic_and_accepted_sets_are_valid(
        e in edits("[ a-z0-9_:\\-\\[\\]{}\n#'\"&*!|>.~]{0,4}")
    ) {
        let text = edit(EXAMPLE_PLANS, &e);
        match parse_plans(&text, "plans.yaml") {
            Ok(set) => check_accepted(&set)?,
            Err(errors) => prop_assert!(!errors.0.is_empty()),
        }
    }

    /// Documents built from the plans schema's own keys with wrong-ish
    /// values reach the semantic checks: never a panic, accepted sets valid.
    #[test]
    fn schema_shaped_plans_never_panic(doc in yaml_doc(4)) {
        match parse_plans(&doc, "plans.yaml") {
            Ok(set) => check_accepted(&set)?,
            Err(errors) => prop_assert!(!errors.0.is_empty()),
        }
    }

    /// The usage meter over any SSE stream, split anywhere: no panic, the
    /// same units whole or split, and a final well-formed usage event wins.
    #[test]
    fn sse_meter_is_split_invariant(
        events in prop::collection::vec(sse_event(), 0..12),
        total in any::<u32>(),
        crlf in any::<bool>(),
        drop_chunk in any::<bool>(),
        mut cuts in prop::collection::vec(0usize..4_000, 0..10),
    ) {
        let eol = if crlf { "\r\n" } else { "\n" };
        let mut text: String = events.iter().map(|e| format!("{}{eol}{eol}", e.replace('\n', eol))).collect();
        text.push_str(&format!(
            "data: {{\"choices\":[],\"usage\":{{\"total_tokens\":{total}}}}}{eol}{eol}data: [DONE]{eol}{eol}"
        ));
        let usage = vec![(Unit::new("token"), vec![ValueSource::Body(dotted("usage.total_tokens"))])];
        let mut headers = HeaderMap::new();
        headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        let run = |cuts: &[usize]| {
            let mut meter = ResponseMeter::new(&usage, &headers, drop_chunk);
            let bytes = text.as_bytes();
            let mut out = Vec::new();
            let mut at = 0;
            for &c in cuts.iter().chain(std::iter::once(&bytes.len())) {
                let c = c.min(bytes.len()).max(at);
                out.extend_from_slice(&meter.feed(&Bytes::copy_from_slice(&bytes[at..c])));
                at = c;
            }
            out.extend_from_slice(&meter.finish());
            (meter.units(), out)
        };
        cuts.sort_unstable();
        let whole = run(&[]);
        let split = run(&cuts);
        prop_assert_eq!(&whole, &split);
        prop_assert_eq!(whole.0, vec![(Unit::new("token"), u64::from(total))]);
    }

    /// JSON bodies of any shape, split anywhere, never panic the meter;
    /// a well-formed usage object is found whatever surrounds it.
    #[test]
    fn json_meter_never_panics(
        prefix in "\\PC{0,200}",
        total in any::<u64>(),
        well_formed in any::<bool>(),
        cut in 0usize..400,
    ) {
        let body = if well_formed {
            format!("{{\"pad\":{},\"usage\":{{\"total_tokens\":{total}}}}}", serde_json::Value::String(prefix))
        } else {
            format!("{prefix}{{\"usage\":{{\"total_tokens\":{total}")
        };
        let usage = vec![(Unit::new("token"), vec![ValueSource::Body(dotted("usage.total_tokens"))])];
        let mut meter = ResponseMeter::new(&usage, &HeaderMap::new(), false);
        let bytes = body.as_bytes();
        let cut = cut.min(bytes.len());
        let _ = meter.feed(&Bytes::copy_from_slice(&bytes[..cut]));
        let _ = meter.feed(&Bytes::copy_from_slice(&bytes[cut..]));
        let _ = meter.finish();
        let units = meter.units();
        if well_formed {
            prop_assert_eq!(units, vec![(Unit::new("token"), total)]);
        }
    }

    /// The reset-header duration format equals an independent rendering of
    /// Go's `time.Duration`, is a valid header value, and parses back.
    #[test]
    fn duration_format_matches_go(ms in prop_oneof![0u64..100_000_000, any::<u64>()]) {
        let s = format_duration_ms(ms);
        // The float reference is exact only while seconds fit f64's
        // shortest-representation guarantees, i.e. always for x/1000 < 60.
        prop_assert_eq!(&s, &reference_duration(ms));
        let value = duration_value(ms);
        prop_assert_eq!(value.to_str().ok(), Some(s.as_str()));
        prop_assert_eq!(parse_duration_ms(&s), Some(ms));
    }
}

#[test]
fn reference_duration_agrees_with_spec_examples() {
    for (ms, text) in [
        (20, "20ms"),
        (1_000, "1s"),
        (1_500, "1.5s"),
        (360_000, "6m0s"),
        (3_723_000, "1h2m3s"),
    ] {
        assert_eq!(reference_duration(ms), text);
        assert_eq!(format_duration_ms(ms), text);
    }
}
