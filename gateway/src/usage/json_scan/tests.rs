use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;

use super::*;
use crate::config::ValueSource;
use crate::plans::Unit;
use crate::usage::{dotted, ResponseMeter, DEFAULT_MAX_EVENT_BYTES};

fn p(s: &str) -> Vec<String> {
    dotted(s)
}

fn paths(list: &[&str]) -> Vec<Vec<String>> {
    list.iter().map(|s| p(s)).collect()
}

/// Feed `doc` split at `cuts` (sorted, clamped) to a scanner for `list`.
fn scan_with(mut s: JsonScanner, doc: &[u8], cuts: &[usize]) -> Vec<Option<u64>> {
    let mut at = 0;
    for &c in cuts.iter().chain(std::iter::once(&doc.len())) {
        let c = c.clamp(at, doc.len());
        s.feed(&doc[at..c]);
        at = c;
    }
    s.values().to_vec()
}

fn scan(doc: &[u8], list: &[&str], cuts: &[usize]) -> Vec<Option<u64>> {
    scan_with(JsonScanner::new(paths(list)), doc, cuts)
}

/// What a whole-document parse says, path by path.
fn whole(doc: &[u8], list: &[&str]) -> Vec<Option<u64>> {
    list.iter().map(|s| json_number_at(doc, &p(s))).collect()
}

/// A vLLM-style `prompt_logprobs` array of at least `bytes` bytes.
fn prompt_logprobs(bytes: usize) -> String {
    let mut s = String::from("[null");
    let mut i = 0u64;
    while s.len() < bytes {
        s.push_str(&format!(
            r#",{{"{}":{{"logprob":-{}.{:04},"rank":{},"decoded_token":"tok\"{}\\n"}}}}"#,
            1000 + i % 30_000,
            i % 7,
            i % 9973,
            1 + i % 50,
            i % 100
        ));
        i += 1;
    }
    s.push(']');
    s
}

/// A base64-looking string of `bytes` bytes, quoted.
fn base64_string(bytes: usize) -> String {
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(bytes + 2);
    s.push('"');
    s.extend((0..bytes).map(|i| char::from(alphabet[(i * 7 + i / 64) % 64])));
    s.push('"');
    s
}

fn json_meter() -> (Vec<(Unit, Vec<ValueSource>)>, HeaderMap) {
    let usage = vec![(
        Unit::new("token"),
        vec![ValueSource::Body(p("usage.total_tokens"))],
    )];
    let mut h = HeaderMap::new();
    h.insert("content-type", HeaderValue::from_static("application/json"));
    (usage, h)
}

/// Issue "Metering integrity" item 7: vLLM puts `prompt_logprobs` after
/// `usage`. The old meter searched only the last 64 KiB of a large body and
/// charged nothing (the reservation, 1) for this response.
#[test]
fn usage_before_a_huge_trailing_field_is_found() {
    let doc = format!(
        r#"{{"id":"cmpl-1","object":"text_completion","choices":[{{"index":0,"text":"hi"}}],"usage":{{"prompt_tokens":700,"total_tokens":812,"completion_tokens":112}},"prompt_logprobs":{}}}"#,
        prompt_logprobs(5 << 20)
    );
    assert!(doc.len() > 5 << 20);
    let (usage, h) = json_meter();
    for chunk in [8 << 10, 65_537, doc.len()] {
        let mut m = ResponseMeter::new(&usage, &h, false);
        for c in doc.as_bytes().chunks(chunk) {
            assert_eq!(m.feed(&Bytes::copy_from_slice(c)).len(), c.len());
        }
        assert!(m.finish().is_empty());
        assert_eq!(m.units(), vec![(Unit::new("token"), 812)], "chunk {chunk}");
    }
    let list = ["usage.prompt_tokens", "usage.completion_tokens", "id"];
    assert_eq!(
        scan(doc.as_bytes(), &list, &[1 << 20, 3 << 20]),
        vec![Some(700), Some(112), None]
    );
}

#[test]
fn usage_after_a_huge_field_is_found() {
    let mut floats = String::from("[");
    for i in 0..200_000 {
        floats.push_str(&format!("{}0.{i:06},", if i % 2 == 0 { "-" } else { "" }));
    }
    floats.push_str("1e-3]");
    let doc = format!(
        r#"{{"object":"list","data":[{{"object":"embedding","index":0,"embedding":{}}},{{"index":1,"embedding":{floats}}}],"model":"m","usage":{{"prompt_tokens":8,"total_tokens":8}}}}"#,
        base64_string(5 << 20)
    );
    let list = ["usage.total_tokens", "usage.prompt_tokens", "model"];
    assert_eq!(
        scan(doc.as_bytes(), &list, &[100, 4 << 20, (5 << 20) + 3]),
        vec![Some(8), Some(8), None]
    );
    assert_eq!(
        scan(doc.as_bytes(), &list, &[]),
        whole(doc.as_bytes(), &list)
    );
}

/// A document with a bit of everything the scanner has to get right.
const SMALL: &str = r#" { "id" : "x\"usage\":{\"total_tokens\":99}}" ,
  "choices":[{"index":0,"message":{"content":"{[\"usage\":}]\\","usage":{"total_tokens":98}}}],
  "\u0075sage":{"prompt_tokens":3,"total_tokens":13.5,"nested":{"usage":{"total_tokens":97}}},
  "n":42,"f":1.5e2,"neg":-4,"s":"17","t":true,"nil":null,"e":[],"o":{},
  "a\"b":5,"arr":[1,[2,{"k":[3]}],"]"] }
"#;

const SMALL_PATHS: &[&str] = &[
    "usage.total_tokens",
    "usage.prompt_tokens",
    "usage.nested.usage.total_tokens",
    "n",
    "f",
    "neg",
    "s",
    "t",
    "nil",
    "e",
    "o",
    "a\"b",
    "arr.1.1.k.0",
    "arr.0",
    "id",
    "missing",
    "choices.0.message.usage.total_tokens",
];

#[test]
fn every_split_matches_the_whole_parse() {
    let doc = SMALL.as_bytes();
    let want = whole(doc, SMALL_PATHS);
    assert_eq!(
        want,
        vec![
            Some(14),
            Some(3),
            Some(97),
            Some(42),
            Some(150),
            None,
            Some(17),
            None,
            None,
            None,
            None,
            Some(5),
            Some(3),
            Some(1),
            None,
            None,
            Some(98),
        ]
    );
    assert_eq!(scan(doc, SMALL_PATHS, &[]), want, "whole");
    let every_byte: Vec<usize> = (1..doc.len()).collect();
    assert_eq!(scan(doc, SMALL_PATHS, &every_byte), want, "byte by byte");
    for cut in 0..=doc.len() {
        assert_eq!(scan(doc, SMALL_PATHS, &[cut]), want, "cut {cut}");
    }
    for a in (0..doc.len()).step_by(7) {
        for b in (a..doc.len()).step_by(5) {
            assert_eq!(scan(doc, SMALL_PATHS, &[a, b]), want, "cuts {a} {b}");
        }
    }
}

#[test]
fn escaped_keys_are_decoded() {
    let cases: &[(&str, &str, Option<u64>)] = &[
        (
            r#"{"\u0075sage":{"total_tokens":1}}"#,
            "usage.total_tokens",
            Some(1),
        ),
        (
            r#"{"us\u0061ge":{"tot\u0061l_tokens":2}}"#,
            "usage.total_tokens",
            Some(2),
        ),
        (
            r#"{"\u0075\u0073\u0061\u0067\u0065":{"total_tokens":3}}"#,
            "usage.total_tokens",
            Some(3),
        ),
        (r#"{"a\"b":4}"#, "a\"b", Some(4)),
        (r#"{"a\\":5}"#, "a\\", Some(5)),
        (r#"{"caf\u00e9":6}"#, "café", Some(6)),
        (r#"{"\ud83d\ude00":7}"#, "😀", Some(7)),
        (r#"{"\/n":8}"#, "/n", Some(8)),
        // Not `usage` once decoded, or not valid JSON escapes.
        (
            r#"{"\u0075sagee":{"total_tokens":9}}"#,
            "usage.total_tokens",
            None,
        ),
        (
            r#"{"\x75sage":{"total_tokens":9}}"#,
            "usage.total_tokens",
            None,
        ),
        (r#"{"\u00":{"total_tokens":9}}"#, "usage.total_tokens", None),
        (
            r#"{"usage\u0000":{"total_tokens":9}}"#,
            "usage.total_tokens",
            None,
        ),
    ];
    for &(doc, path, want) in cases {
        let every_byte: Vec<usize> = (1..doc.len()).collect();
        assert_eq!(scan(doc.as_bytes(), &[path], &[]), vec![want], "{doc}");
        assert_eq!(
            scan(doc.as_bytes(), &[path], &every_byte),
            vec![want],
            "{doc}"
        );
    }
}

#[test]
fn nested_usage_is_not_the_top_level_one() {
    let list = ["usage.total_tokens"];
    let nested = br#"{"choices":[{"message":{"role":"assistant","usage":{"total_tokens":99}}}],"data":{"usage":{"total_tokens":98}}}"#;
    assert_eq!(scan(nested, &list, &[]), vec![None]);
    let both = br#"{"choices":[{"message":{"usage":{"total_tokens":99}}}],"usage":{"total_tokens":3},"x":{"usage":{"total_tokens":97}}}"#;
    assert_eq!(scan(both, &list, &[]), vec![Some(3)]);
    assert_eq!(scan(both, &list, &[]), whole(both, &list));
}

#[test]
fn strings_do_not_confuse_it() {
    let list = ["usage.total_tokens", "n"];
    let docs: &[&str] = &[
        r#"{"content":"\"usage\":{\"total_tokens\":99}","usage":{"total_tokens":1},"n":2}"#,
        r#"{"content":"}}}]]]","usage":{"total_tokens":1},"n":2}"#,
        r#"{"content":"{{{[[[","usage":{"total_tokens":1},"n":2}"#,
        r#"{"content":"\\","usage":{"total_tokens":1},"n":2}"#,
        r#"{"content":"\\\"usage\\\":5","usage":{"total_tokens":1},"n":2}"#,
        r#"{"usage":{"note":"}\"total_tokens\":99,{","total_tokens":1},"n":2}"#,
        r#"{"usage":{"total_tokens":1,"x":["\"]}",{"y":"{"}]},"n":2}"#,
        r#"{"\"usage\"":{"total_tokens":99},"usage":{"total_tokens":1},"n":2}"#,
        r#"{"n\\":3,"usage":{"total_tokens":1},"n":2}"#,
    ];
    for doc in docs {
        let want = vec![Some(1), Some(2)];
        assert_eq!(whole(doc.as_bytes(), &list), want, "{doc}");
        for cut in 0..=doc.len() {
            assert_eq!(scan(doc.as_bytes(), &list, &[cut]), want, "{doc} cut {cut}");
        }
    }
}

#[test]
fn duplicate_top_level_key_last_wins() {
    let list = ["usage.total_tokens", "usage.prompt_tokens"];
    let cases: &[(&str, Vec<Option<u64>>)] = &[
        (
            r#"{"usage":{"total_tokens":1,"prompt_tokens":1},"x":0,"usage":{"total_tokens":2,"prompt_tokens":2}}"#,
            vec![Some(2), Some(2)],
        ),
        (
            r#"{"usage":{"total_tokens":1},"\u0075sage":{"total_tokens":2}}"#,
            vec![Some(2), None],
        ),
        // As in `json_number_at` (and the SSE scanner): a later value with no
        // number at the path does not erase an earlier one.
        (
            r#"{"usage":{"total_tokens":1,"prompt_tokens":1},"usage":{"total_tokens":5}}"#,
            vec![Some(5), Some(1)],
        ),
        (
            r#"{"usage":{"total_tokens":1},"usage":null}"#,
            vec![Some(1), None],
        ),
    ];
    for (doc, want) in cases {
        assert_eq!(&whole(doc.as_bytes(), &list), want, "{doc}");
        assert_eq!(&scan(doc.as_bytes(), &list, &[]), want, "{doc}");
    }
}

#[test]
fn truncated_body_yields_what_was_complete() {
    let doc = r#"{"id":"x","usage":{"total_tokens":7},"n":12,"s":"34","prompt_logprobs":[null,{"1":{"logprob":-1}}]}"#;
    let list = ["usage.total_tokens", "n", "s"];
    let end_of = |needle: &str| doc.find(needle).map(|i| i + needle.len()).unwrap();
    let usage_end = end_of(r#""usage":{"total_tokens":7}"#);
    // A number is only known complete at the byte after it.
    let n_end = end_of(r#""n":12"#) + 1;
    let s_end = end_of(r#""s":"34""#);
    for cut in 0..=doc.len() {
        let mut s = JsonScanner::new(paths(&list));
        s.feed(&doc.as_bytes()[..cut]);
        let want = vec![
            (cut >= usage_end).then_some(7),
            (cut >= n_end).then_some(12),
            (cut >= s_end).then_some(34),
        ];
        assert_eq!(s.values(), want, "cut {cut}");
    }
    // Whitespace also ends a number; the end of the body does not.
    assert_eq!(scan(br#"{"n":12 "#, &["n"], &[]), vec![Some(12)]);
    assert_eq!(scan(br#"{"n":12"#, &["n"], &[]), vec![None]);
    assert_eq!(scan(br#"{"n":true"#, &["n"], &[]), vec![None]);
}

#[test]
fn only_a_top_level_object_is_read() {
    for doc in [
        &br#"[{"usage":{"total_tokens":1}}]"#[..],
        br#""{\"usage\":{\"total_tokens\":1}}""#,
        b"5",
        b"null",
        b"",
        b"   ",
        b"x{\"usage\":{\"total_tokens\":1}}",
        b"\xef\xbb\xbf{\"usage\":{\"total_tokens\":1}}",
        // After the top-level object closed, nothing more is read.
        br#"{} {"usage":{"total_tokens":1}}"#,
        br#"{"a":1}]{"usage":{"total_tokens":1}}"#,
    ] {
        assert_eq!(
            scan(doc, &["usage.total_tokens"], &[]),
            vec![None],
            "{}",
            String::from_utf8_lossy(doc)
        );
    }
    // An empty path names the whole document, which is never a number here.
    let mut s = JsonScanner::new(vec![Vec::new(), p("n")]);
    s.feed(br#"{"n":1}"#);
    assert_eq!(s.values(), [None, Some(1)]);
    // Leading whitespace is fine, and a body broken after the usage still
    // yields it.
    assert_eq!(
        scan(
            b"\r\n\t {\"usage\":{\"total_tokens\":1}} trailing",
            &["usage.total_tokens"],
            &[]
        ),
        vec![Some(1)]
    );
}

#[test]
fn number_at_and_value_agree() {
    let mut s = JsonScanner::new(paths(&["usage.total_tokens", "usage", "n"]));
    s.feed(br#"{"usage":{"total_tokens":3},"n":"2.5"}"#);
    assert_eq!(s.number_at(&p("usage.total_tokens")), Some(3));
    assert_eq!(s.value(0), Some(3));
    assert_eq!(s.number_at(&p("usage")), None, "an object is not an amount");
    assert_eq!(s.number_at(&p("n")), Some(3));
    assert_eq!(s.number_at(&p("other")), None);
    assert_eq!(s.value(7), None);
}

#[test]
fn oversized_keys_and_values_are_dropped() {
    // Value bound: the padded usage is too large to capture; a later small
    // duplicate is still read.
    let pad = "x".repeat(200);
    let big = format!(r#"{{"usage":{{"pad":"{pad}","total_tokens":1}},"n":2}}"#);
    let mut s = JsonScanner::with_limits(paths(&["usage.total_tokens", "n"]), 16, 100);
    s.feed(big.as_bytes());
    assert_eq!(s.values(), [None, Some(2)]);
    assert!(s.value.capacity() <= 100);
    let later =
        format!(r#"{{"usage":{{"pad":"{pad}","total_tokens":1}},"usage":{{"total_tokens":3}}}}"#);
    let mut s = JsonScanner::with_limits(paths(&["usage.total_tokens"]), 16, 100);
    for c in later.as_bytes().chunks(9) {
        s.feed(c);
    }
    assert_eq!(s.values(), [Some(3)]);

    // Key bound: a key longer than the limit is not ours, even when its
    // decoded form would be.
    let long = r#"{"\u0075\u0073\u0061\u0067\u0065":{"total_tokens":4}}"#;
    let mut s = JsonScanner::with_limits(paths(&["usage.total_tokens"]), 16, 100);
    s.feed(long.as_bytes());
    assert_eq!(s.values(), [None]);
    let mut s = JsonScanner::with_limits(paths(&["usage.total_tokens"]), 30, 100);
    s.feed(long.as_bytes());
    assert_eq!(s.values(), [Some(4)]);

    // Default bounds: a key past 1 KiB and a value past 1 MiB are skipped.
    let key = "k".repeat(DEFAULT_MAX_KEY_BYTES + 1);
    let doc = format!(
        r#"{{"{key}":1,"usage":{{"pad":{},"total_tokens":3}},"n":5}}"#,
        base64_string(DEFAULT_MAX_EVENT_BYTES)
    );
    let mut s = JsonScanner::new(vec![p(&key), p("usage.total_tokens"), p("n")]);
    for c in doc.as_bytes().chunks(4096) {
        s.feed(c);
        assert!(s.key.capacity() <= 2 * DEFAULT_MAX_KEY_BYTES);
        assert!(s.value.capacity() <= 2 * DEFAULT_MAX_EVENT_BYTES);
    }
    assert_eq!(s.values(), [None, None, Some(5)]);
    assert_eq!(
        whole(doc.as_bytes(), &[&key, "usage.total_tokens", "n"]),
        vec![Some(1), Some(3), Some(5)],
        "a whole parse has no bounds"
    );
}

#[test]
fn the_meter_reads_a_split_json_body() {
    let (usage, h) = json_meter();
    let doc = SMALL.as_bytes();
    for cut in 0..=doc.len() {
        let mut m = ResponseMeter::new(&usage, &h, false);
        m.feed(&Bytes::copy_from_slice(&doc[..cut]));
        m.feed(&Bytes::copy_from_slice(&doc[cut..]));
        assert_eq!(m.units(), vec![(Unit::new("token"), 14)], "cut {cut}");
    }
}

// ---------------------------------------------------------------- properties

/// Keys as they appear in the document, escapes included.
const KEYS: &[&str] = &[
    r#""usage""#,
    r#""\u0075sage""#,
    r#""total_tokens""#,
    r#""tot\u0061l_tokens""#,
    r#""n""#,
    r#""a""#,
    r#""us\"age""#,
    r#""""#,
];

const PROP_PATHS: &[&str] = &[
    "usage.total_tokens",
    "usage",
    "n",
    "a.0",
    "a.n",
    "usage.n.total_tokens",
    "us\"age",
    "",
    "total_tokens",
];

const WS: &[&str] = &["", " ", "\n\t", "\r\n  "];

fn leaf() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        (-1_000i64..1_000).prop_map(|n| n.to_string()),
        (0.0f64..1e6).prop_map(|f| format!("{f}")),
        (0u32..100, -3i32..4).prop_map(|(m, e)| format!("{m}e{e}")),
        prop::sample::select(vec!["null", "true", "false", r#""12""#, r#""1.5""#])
            .prop_map(str::to_owned),
        prop::sample::select(KEYS.to_vec()).prop_map(str::to_owned),
        r#"[a-z0-9 {}\[\]:,"\\]{0,12}"#.prop_map(|s| serde_json::Value::String(s).to_string()),
    ]
}

fn object(members: Vec<(&str, &str, String)>) -> String {
    let body: Vec<String> = members
        .into_iter()
        .map(|(k, ws, v)| format!("{ws}{k}{ws}:{ws}{v}{ws}"))
        .collect();
    format!("{{{}}}", body.join(","))
}

fn value() -> impl Strategy<Value = String> {
    leaf().prop_recursive(4, 64, 6, |inner| {
        prop_oneof![
            (
                prop::collection::vec(inner.clone(), 0..6),
                prop::sample::select(WS.to_vec())
            )
                .prop_map(|(v, ws)| format!("[{ws}{}]", v.join(&format!(",{ws}")))),
            prop::collection::vec(
                (
                    prop::sample::select(KEYS.to_vec()),
                    prop::sample::select(WS.to_vec()),
                    inner
                ),
                0..6
            )
            .prop_map(object),
        ]
    })
}

fn document() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(
            (
                prop::sample::select(KEYS.to_vec()),
                prop::sample::select(WS.to_vec()),
                value(),
            ),
            0..8,
        ),
        prop::sample::select(WS.to_vec()),
    )
        .prop_map(|(members, ws)| format!("{ws}{}{ws}", object(members)))
}

proptest! {
    /// On valid JSON objects, split anywhere, the scanner says what a parse
    /// of the whole document says.
    #[test]
    fn agrees_with_a_whole_parse(doc in document(), mut cuts in prop::collection::vec(0usize..2_000, 0..8)) {
        prop_assert!(serde_json::from_str::<serde::de::IgnoredAny>(&doc).is_ok(), "{}", doc);
        cuts.sort_unstable();
        let want = whole(doc.as_bytes(), PROP_PATHS);
        prop_assert_eq!(scan(doc.as_bytes(), PROP_PATHS, &[]), want.clone(), "{}", doc);
        prop_assert_eq!(scan(doc.as_bytes(), PROP_PATHS, &cuts), want, "{} {:?}", doc, cuts);
    }

    /// On any bytes, split anywhere: no panic, the same answer as whole,
    /// and bounded captures.
    #[test]
    fn any_bytes_split_consistently(
        input in prop::collection::vec(
            prop::sample::select(br#"{}[]":,\ u0075sagen12.e-"#.to_vec()),
            0..300,
        ),
        mut cuts in prop::collection::vec(0usize..300, 0..6),
        max_key in 0usize..8,
        max_value in 0usize..16,
    ) {
        cuts.sort_unstable();
        let make = || JsonScanner::with_limits(paths(&["usage.n", "n", "u", ""]), max_key, max_value);
        let whole = scan_with(make(), &input, &[]);
        let split = scan_with(make(), &input, &cuts);
        prop_assert_eq!(whole, split);
    }

    #[test]
    fn random_bytes_never_panic(input in prop::collection::vec(any::<u8>(), 0..512), cut in 0usize..512) {
        let _ = scan(&input, &["usage.total_tokens", "a"], &[cut]);
    }
}
