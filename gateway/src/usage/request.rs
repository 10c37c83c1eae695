//! The request-side facts the gateway acts on, read strictly.
//!
//! The gateway reads a few fields of a JSON request body (`model`, `stream`,
//! `stream_options`, the reservation fields) and the upstream reads the same
//! body again, often with a lenient parser: pydantic takes `"stream": 1` or
//! `"stream": "true"` for `true` and `"n": "2"` for 2, and Python's `json`
//! keeps the last of duplicate keys. Were the gateway to read such a body
//! differently from the upstream, a stream could go unmetered or a
//! reservation be undercut. So the rule is: every field the gateway
//! interprets must have its canonical JSON type (as OpenAI's API requires)
//! and appear once, or the request is refused with 400 `invalid_request`
//! before anything is counted or forwarded. Fields the gateway does not
//! interpret are left to the upstream.
//!
//! A body is interpreted whenever it parses as JSON, whatever its
//! `content-type` (llama.cpp's server parses the body without looking at
//! it). A body that does not parse is refused when its `content-type` says
//! JSON (or is absent), and otherwise (multipart uploads) forwarded
//! uninterpreted: nothing is streamed from it and reservations default.

use std::fmt;

use http::header::{HeaderMap, CONTENT_TYPE};
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use super::header_amount;
use crate::config::ValueSource;
use crate::plans::Unit;

/// Largest amount a request may reserve: what every store holds exactly
/// ([`crate::plans::MAX_AMOUNT`]).
pub const MAX_REQUEST_AMOUNT: u64 = crate::plans::MAX_AMOUNT;

/// Top-level fields always checked when present: those the gateway reads,
/// and the token and choice counts OpenAI-compatible servers read for the
/// reservations an operator may configure.
const CHECKED: [&str; 7] = [
    "model",
    "stream",
    "stream_options",
    "n",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
];

/// What the gateway read from a request body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestFacts {
    /// The body was a JSON object and was interpreted.
    pub json: bool,
    /// The top-level `model`, if a string.
    pub model: Option<String>,
    /// `"stream": true`.
    pub stream: bool,
    /// The body has a `stream_options` key (whatever its value, `null`
    /// included).
    pub has_stream_options: bool,
    /// `stream_options.include_usage` is `true`.
    pub include_usage: bool,
    /// Per `reserve` unit of the route, the amount of the first source
    /// that yields one.
    pub reserved: Vec<(Unit, Option<u64>)>,
}

impl RequestFacts {
    /// The endpoint id of a `{model}` route: the non-empty `model`.
    pub fn routing_model(&self) -> Result<&str, super::ModelError> {
        match self.model.as_deref() {
            Some(m) if !m.is_empty() => Ok(m),
            _ if self.json => Err(super::ModelError::NoModel),
            _ => Err(super::ModelError::NotJson),
        }
    }
}

/// Why a request body is refused (400 `invalid_request`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest(pub String);

impl fmt::Display for BadRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadRequest {}

/// Message for a body that is not JSON where JSON is needed.
pub const NOT_JSON: &str = "We could not parse the JSON body of your request. \
     (HINT: This likely means you aren't using your HTTP library correctly. \
     The body must be a JSON object, sent with `Content-Type: application/json`.)";

/// Whether a `content-type` is JSON (`application/json`, `...+json`) or
/// absent: a body that does not parse is then an error.
fn claims_json(headers: &HeaderMap) -> bool {
    let Some(ct) = headers.get(CONTENT_TYPE) else {
        return true;
    };
    let Ok(ct) = ct.to_str() else { return false };
    let mime = ct.split(';').next().unwrap_or("").trim();
    mime.eq_ignore_ascii_case("application/json")
        || mime
            .get(mime.len().saturating_sub(5)..)
            .is_some_and(|s| s.eq_ignore_ascii_case("+json"))
}

/// Read and check the fields the gateway interprets. `reserve` is the
/// route's reservation sources (header sources are read from `headers`).
pub fn read_request(
    body: &[u8],
    headers: &HeaderMap,
    reserve: &[(Unit, Vec<ValueSource>)],
) -> Result<RequestFacts, BadRequest> {
    if body.iter().all(u8::is_ascii_whitespace) {
        // No body (a GET through a catch-all route): nothing to interpret.
        return Ok(RequestFacts {
            reserved: header_reservations(headers, reserve)?,
            ..RequestFacts::default()
        });
    }
    let mut wanted: Vec<&str> = CHECKED.to_vec();
    for (_, sources) in reserve {
        for s in sources {
            if let ValueSource::Body(path) = s {
                if let Some(head) = path.first() {
                    if !wanted.contains(&head.as_str()) {
                        wanted.push(head);
                    }
                }
            }
        }
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let top = TopLevel { wanted: &wanted }
        .deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v));
    let fields = match top {
        Ok(Some(fields)) => fields,
        Ok(None) => return Err(BadRequest("the request body must be a JSON object".into())),
        Err(e) => {
            if let Some(msg) = e.to_string().strip_prefix(DUPLICATE_MARK) {
                let msg = msg.split(" at line ").next().unwrap_or(msg);
                return Err(BadRequest(msg.to_owned()));
            }
            if claims_json(headers) {
                return Err(BadRequest(NOT_JSON.into()));
            }
            // Not JSON and not claiming to be (a multipart upload): not
            // ours to interpret.
            return Ok(RequestFacts {
                reserved: header_reservations(headers, reserve)?,
                ..RequestFacts::default()
            });
        }
    };
    let get = |name: &str| -> Option<&Value> {
        wanted
            .iter()
            .position(|w| *w == name)
            .and_then(|i| fields[i].as_ref())
    };
    let model = match get("model") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => return Err(wrong_type("model", "a string", other)),
    };
    let stream = match get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(wrong_type("stream", "a boolean", other)),
    };
    let (has_stream_options, include_usage) = match get("stream_options") {
        None => (false, false),
        Some(Value::Null) => (true, false),
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => (true, false),
            Some(Value::Bool(b)) => (true, *b),
            Some(other) => {
                return Err(wrong_type(
                    "stream_options.include_usage",
                    "a boolean",
                    other,
                ))
            }
        },
        Some(other) => return Err(wrong_type("stream_options", "an object", other)),
    };
    for name in &CHECKED[3..] {
        if let Some(v) = get(name) {
            amount(name, v)?;
        }
    }
    let mut reserved = Vec::with_capacity(reserve.len());
    for (unit, sources) in reserve {
        let mut found = None;
        for s in sources {
            let v = match s {
                ValueSource::Header(_) => first_header(std::slice::from_ref(s), headers)?,
                // The config refuses sums in `reserve`.
                ValueSource::Sum(_) => None,
                ValueSource::Body(path) => {
                    let Some((head, rest)) = path.split_first() else {
                        continue;
                    };
                    let mut v = get(head);
                    for seg in rest {
                        v = v.and_then(|v| match v {
                            Value::Object(o) => o.get(seg),
                            Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get(i)),
                            _ => None,
                        });
                    }
                    match v {
                        Some(v) => amount(&path.join("."), v)?,
                        None => None,
                    }
                }
            };
            if v.is_some() {
                found = v;
                break;
            }
        }
        reserved.push((unit.clone(), found));
    }
    Ok(RequestFacts {
        json: true,
        model,
        stream,
        has_stream_options,
        include_usage,
        reserved,
    })
}

/// Reservations from the header sources only (a body that is not read or
/// not interpreted).
pub fn header_reservations(
    headers: &HeaderMap,
    reserve: &[(Unit, Vec<ValueSource>)],
) -> Result<Vec<(Unit, Option<u64>)>, BadRequest> {
    reserve
        .iter()
        .map(|(u, sources)| Ok((u.clone(), first_header(sources, headers)?)))
        .collect()
}

/// The first header source with a number; a header too large is refused.
fn first_header(sources: &[ValueSource], headers: &HeaderMap) -> Result<Option<u64>, BadRequest> {
    for s in sources {
        if let ValueSource::Header(name) = s {
            if let Some(n) = header_amount(headers, name) {
                if n > MAX_REQUEST_AMOUNT {
                    return Err(BadRequest(format!(
                        "Invalid value for header '{name}': at most {MAX_REQUEST_AMOUNT}."
                    )));
                }
                return Ok(Some(n));
            }
        }
    }
    Ok(None)
}

/// A reservation field: absent, `null` or an integer in
/// `0..=MAX_REQUEST_AMOUNT`.
fn amount(name: &str, v: &Value) -> Result<Option<u64>, BadRequest> {
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => match n.as_u64() {
            Some(x) if x <= MAX_REQUEST_AMOUNT => Ok(Some(x)),
            _ if n.is_f64() => Err(wrong_type(name, "an integer", v)),
            _ => Err(BadRequest(format!(
                "Invalid value for '{name}': expected an integer between 0 and {MAX_REQUEST_AMOUNT}, got {n}."
            ))),
        },
        other => Err(wrong_type(name, "an integer", other)),
    }
}

fn wrong_type(name: &str, expected: &str, got: &Value) -> BadRequest {
    let got = match got {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a decimal",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    BadRequest(format!(
        "Invalid type for '{name}': expected {expected}, but got {got} instead."
    ))
}

/// Prefix of the serde error that reports a duplicate key.
const DUPLICATE_MARK: &str = "plangate-duplicate: ";

/// The top-level object: the values of the `wanted` keys (checked for
/// duplicates at every depth), everything else skipped. `None` when the
/// document is not an object.
struct TopLevel<'w> {
    wanted: &'w [&'w str],
}

impl<'de> DeserializeSeed<'de> for TopLevel<'_> {
    type Value = Option<Vec<Option<Value>>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TopLevel<'_> {
    type Value = Option<Vec<Option<Value>>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out: Vec<Option<Value>> = vec![None; self.wanted.len()];
        while let Some(i) = map.next_key_seed(KeyIndex(self.wanted))? {
            match i {
                Some(i) => {
                    let v = map.next_value_seed(Strict)?;
                    if out[i].is_some() {
                        return Err(duplicate(self.wanted[i]));
                    }
                    out[i] = Some(v);
                }
                None => {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        Ok(Some(out))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<de::IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

fn duplicate<E: de::Error>(key: &str) -> E {
    E::custom(format!(
        "{DUPLICATE_MARK}Duplicate key '{key}' in the request body: send each field once."
    ))
}

/// A map key as its index in a list of wanted keys (escapes decoded).
#[derive(Clone, Copy)]
struct KeyIndex<'w>(&'w [&'w str]);

impl<'de> DeserializeSeed<'de> for KeyIndex<'_> {
    type Value = Option<usize>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIndex<'_> {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<usize>, E> {
        Ok(self.0.iter().position(|w| *w == v))
    }
}

/// A JSON value whose objects must not repeat a key.
#[derive(Clone, Copy)]
struct Strict;

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(Strict)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            let v = map.next_value_seed(Strict)?;
            if out.contains_key(&k) {
                return Err(duplicate(&k));
            }
            out.insert(k, v);
        }
        Ok(Value::Object(out))
    }
}

/// The body to forward for a streaming request whose client did not ask
/// for the usage chunk: `stream_options.include_usage` set to `true`. When
/// `stream_options` is absent the member is spliced in after the opening
/// brace, leaving the rest of the body byte for byte as the client sent
/// it; otherwise the body is parsed and written again (key order may
/// change; the content does not).
pub fn with_include_usage(body: &[u8], facts: &RequestFacts) -> Option<Vec<u8>> {
    if !facts.has_stream_options {
        let brace = body.iter().position(|b| *b == b'{')?;
        let member: &[u8] = br#""stream_options":{"include_usage":true},"#;
        let mut out = Vec::with_capacity(body.len() + member.len());
        out.extend_from_slice(&body[..=brace]);
        out.extend_from_slice(member);
        out.extend_from_slice(&body[brace + 1..]);
        return Some(out);
    }
    let Ok(Value::Object(mut obj)) = serde_json::from_slice(body) else {
        return None;
    };
    let opts = obj
        .entry("stream_options")
        .or_insert_with(|| Value::Object(Map::new()));
    if !opts.is_object() {
        *opts = Value::Object(Map::new());
    }
    if let Some(o) = opts.as_object_mut() {
        o.insert("include_usage".into(), Value::Bool(true));
    }
    serde_json::to_vec(&obj).ok()
}

/// `body` (a JSON object) with its top-level `field` set to `n`; `None`
/// when it is not a JSON object.
pub fn with_field(body: &[u8], field: &str, n: u64) -> Option<Vec<u8>> {
    let Ok(Value::Object(mut obj)) = serde_json::from_slice(body) else {
        return None;
    };
    obj.insert(field.to_owned(), Value::from(n));
    serde_json::to_vec(&obj).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reserve_tokens() -> Vec<(Unit, Vec<ValueSource>)> {
        vec![(
            Unit::new("token"),
            ["max_completion_tokens", "max_tokens", "max_output_tokens"]
                .iter()
                .map(|k| ValueSource::Body(vec![(*k).to_owned()]))
                .collect(),
        )]
    }

    fn read(body: &str) -> Result<RequestFacts, BadRequest> {
        read_request(body.as_bytes(), &HeaderMap::new(), &reserve_tokens())
    }

    fn refused(body: &str) -> String {
        match read(body) {
            Err(BadRequest(m)) => m,
            Ok(f) => panic!("accepted {body}: {f:?}"),
        }
    }

    #[test]
    fn canonical_bodies_are_read() {
        let f = read(r#"{"model":"m","stream":true,"max_tokens":7}"#).unwrap();
        assert!(f.json && f.stream && !f.has_stream_options && !f.include_usage);
        assert_eq!(f.model.as_deref(), Some("m"));
        assert_eq!(f.reserved, vec![(Unit::new("token"), Some(7))]);
        let f = read(r#"{"model":"m","stream":null,"stream_options":null}"#).unwrap();
        assert!(!f.stream && f.has_stream_options);
        assert_eq!(f.reserved, vec![(Unit::new("token"), None)]);
        let f =
            read(r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#).unwrap();
        assert!(f.include_usage);
        // Escaped keys are the same keys.
        let f = read(r#"{"model":"m","\u0073tream":true}"#).unwrap();
        assert!(f.stream);
    }

    #[test]
    fn the_first_reservation_source_with_a_number_wins() {
        let f = read(r#"{"max_tokens":5,"max_completion_tokens":9}"#).unwrap();
        assert_eq!(f.reserved, vec![(Unit::new("token"), Some(9))]);
        let f = read(r#"{"max_output_tokens":3}"#).unwrap();
        assert_eq!(f.reserved, vec![(Unit::new("token"), Some(3))]);
        let f = read(r#"{"max_completion_tokens":null,"max_tokens":4}"#).unwrap();
        assert_eq!(f.reserved, vec![(Unit::new("token"), Some(4))]);
    }

    #[test]
    fn non_canonical_types_are_refused() {
        for (body, field) in [
            (r#"{"model":"m","stream":1}"#, "stream"),
            (r#"{"model":"m","stream":"true"}"#, "stream"),
            (r#"{"model":"m","stream":"false"}"#, "stream"),
            (r#"{"model":1}"#, "model"),
            (r#"{"model":"m","n":"2"}"#, "n"),
            (r#"{"model":"m","n":2.5}"#, "n"),
            (r#"{"model":"m","max_tokens":"200"}"#, "max_tokens"),
            (r#"{"model":"m","max_tokens":-1}"#, "max_tokens"),
            (r#"{"model":"m","max_tokens":1e19}"#, "max_tokens"),
            (
                r#"{"model":"m","max_completion_tokens":10000000000000000000}"#,
                "max_completion_tokens",
            ),
            (
                r#"{"model":"m","max_output_tokens":true}"#,
                "max_output_tokens",
            ),
            (r#"{"model":"m","stream_options":"yes"}"#, "stream_options"),
            (
                r#"{"model":"m","stream":true,"stream_options":{"include_usage":1}}"#,
                "stream_options.include_usage",
            ),
        ] {
            let m = refused(body);
            assert!(m.contains(&format!("'{field}'")), "{body}: {m}");
        }
    }

    #[test]
    fn duplicate_interpreted_keys_are_refused_at_any_depth() {
        for body in [
            r#"{"model":"a","stream":false,"model":"b"}"#,
            r#"{"model":"a","stream":false,"stream":true}"#,
            r#"{"model":"a","\u006dodel":"b"}"#,
            r#"{"model":"a","max_tokens":1,"max_tokens":100000}"#,
            r#"{"model":"a","stream":true,"stream_options":{"include_usage":true,"include_usage":false}}"#,
        ] {
            let m = refused(body);
            assert!(m.starts_with("Duplicate key"), "{body}: {m}");
        }
        // Keys the gateway does not read are the upstream's business.
        assert!(read(r#"{"model":"a","temperature":1,"temperature":2}"#).is_ok());
    }

    #[test]
    fn bodies_that_are_not_json() {
        assert_eq!(refused("{nope"), NOT_JSON);
        assert_eq!(refused(r#"{"model":"m","temperature":NaN}"#), NOT_JSON);
        assert!(refused("[1,2]").contains("JSON object"));
        // Multipart is not ours to read; reservations default.
        let mut h = HeaderMap::new();
        h.insert(
            CONTENT_TYPE,
            "multipart/form-data; boundary=x".parse().unwrap(),
        );
        let f = read_request(b"--x\r\n", &h, &reserve_tokens()).unwrap();
        assert!(!f.json && !f.stream);
        // But JSON is read whatever the content-type says.
        h.insert(CONTENT_TYPE, "text/plain".parse().unwrap());
        let f = read_request(br#"{"stream":true}"#, &h, &reserve_tokens()).unwrap();
        assert!(f.stream);
        // No body at all (a GET): nothing to read.
        assert_eq!(
            read("").unwrap(),
            RequestFacts {
                reserved: vec![(Unit::new("token"), None)],
                ..RequestFacts::default()
            }
        );
    }

    #[test]
    fn include_usage_is_added_without_leaving_a_duplicate() {
        for body in [
            r#"{"model":"m","stream":true}"#,
            r#"{"model":"m","stream":true,"stream_options":null}"#,
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":false}}"#,
            r#"{"model":"m","stream":true,"stream_options":{}}"#,
        ] {
            let f = read(body).unwrap();
            let out = with_include_usage(body.as_bytes(), &f).expect("rewritten");
            // Read back strictly: no duplicate, include_usage on.
            let again = read_request(&out, &HeaderMap::new(), &reserve_tokens())
                .unwrap_or_else(|e| panic!("{body} -> {}: {e}", String::from_utf8_lossy(&out)));
            assert!(again.include_usage && again.stream, "{body}");
        }
    }
}
