//! Units measured from a response: headers, JSON body, SSE stream. The
//! request side (`model`, reservations, `stream_options`) is read in one
//! strict pass by [`request::read_request`]; [`request_model`] and
//! [`ensure_include_usage`] are thin library faces over it.
//!
//! Everything here is pure and bounded. JSON is never parsed into a tree to
//! find one number: a path lookup walks the document with serde and skips
//! every value off the path without allocating ([`json_number_at`]).
//!
//! The proxy's one-stop API is [`ResponseMeter`]: build it from the route's
//! `usage` sources and the response headers, pass every body chunk through
//! [`ResponseMeter::feed`] (which returns the bytes to forward), call
//! [`ResponseMeter::finish`] at the end (or not, when the stream was cut
//! short) and settle with [`ResponseMeter::settle_units`] (reported
//! usage, else the stream estimate or the reservation).
//!
//! A JSON response body is never kept whole: [`JsonScanner`]
//! (`usage/json_scan.rs`) follows it chunk by chunk, captures only the
//! values of the top-level keys that head a path (bounded), and skips
//! everything else, so `usage` is found wherever it sits — before a
//! multi-megabyte `prompt_logprobs` (vLLM) or after a large embedding. An
//! SSE stream is read event by event by [`SseScanner`].

use std::fmt;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, CONTENT_TYPE};
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::config::ValueSource;
use crate::plans::Unit;

pub mod request;

mod json_scan;

pub use json_scan::{JsonScanner, DEFAULT_MAX_KEY_BYTES};

/// Default bound on one SSE line / event, and on the value of one
/// top-level JSON key captured by [`JsonScanner`].
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1 << 20;

// ---------------------------------------------------------------- numbers

/// A number from a header or JSON string: a non-negative integer, or a
/// non-negative decimal rounded up (`1.2` GPU-seconds cost 2).
pub fn parse_amount(s: &str) -> Option<u64> {
    let s = s.trim();
    if let Ok(n) = s.parse::<u64>() {
        return Some(n);
    }
    // Only plain decimals: `inf`, `NaN` and exponents are not amounts.
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return None;
    }
    s.parse::<f64>().ok().and_then(float_amount)
}

fn float_amount(f: f64) -> Option<u64> {
    // `as` saturates at u64::MAX, which is what an absurd amount should be.
    (f.is_finite() && f >= 0.0).then(|| f.ceil() as u64)
}

/// The amount in header `name`, if present and numeric.
pub fn header_amount(headers: &HeaderMap, name: &HeaderName) -> Option<u64> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_amount)
}

// ---------------------------------------------------------------- JSON paths

/// Walks a dotted path (object keys; decimal segments also index arrays)
/// and hands the value found there to a leaf seed. Everything off the path
/// is skipped with [`IgnoredAny`]. With duplicate keys the last one that
/// has a value at the rest of the path wins (a later `null` does not erase
/// an earlier number); a path through a scalar finds nothing.
struct PathSeed<'p, L> {
    path: &'p [String],
    leaf: L,
}

trait Leaf<'de>: DeserializeSeed<'de> + Copy {}
impl<'de, T: DeserializeSeed<'de> + Copy> Leaf<'de> for T {}

impl<'de, T, L> DeserializeSeed<'de> for PathSeed<'_, L>
where
    L: Leaf<'de, Value = Option<T>>,
{
    type Value = Option<T>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<T>, D::Error> {
        match self.path.split_first() {
            None => self.leaf.deserialize(d),
            Some((head, rest)) => d.deserialize_any(PathVisitor {
                head,
                rest,
                leaf: self.leaf,
            }),
        }
    }
}

struct PathVisitor<'p, L> {
    head: &'p str,
    rest: &'p [String],
    leaf: L,
}

impl<'de, T, L> Visitor<'de> for PathVisitor<'_, L>
where
    L: Leaf<'de, Value = Option<T>>,
{
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an object with key `{}`", self.head)
    }

    // A path through a scalar finds nothing there, and is no error: the
    // walk goes on, so a later duplicate key can still be found (and a
    // response scanned member by member agrees with one parsed whole).
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Option<T>, E> {
        Ok(None)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Option<T>, E> {
        Ok(None)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Option<T>, E> {
        Ok(None)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Option<T>, E> {
        Ok(None)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Option<T>, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Option<T>, E> {
        Ok(None)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<T>, A::Error> {
        let mut found = None;
        while let Some(is_head) = map.next_key_seed(KeyIs(self.head))? {
            if is_head {
                let v = map.next_value_seed(PathSeed {
                    path: self.rest,
                    leaf: self.leaf,
                })?;
                if v.is_some() {
                    found = v;
                }
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<T>, A::Error> {
        let index: Option<usize> = self.head.parse().ok();
        let mut found = None;
        let mut i = 0usize;
        loop {
            if Some(i) == index {
                let seed = PathSeed {
                    path: self.rest,
                    leaf: self.leaf,
                };
                match seq.next_element_seed(seed)? {
                    Some(v) => found = v,
                    None => break,
                }
            } else if seq.next_element::<IgnoredAny>()?.is_none() {
                break;
            }
            i = i.saturating_add(1);
        }
        Ok(found)
    }
}

/// Deserializes a map key into "is it this key?", without allocating.
#[derive(Clone, Copy)]
struct KeyIs<'a>(&'a str);

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        Ok(v == self.0)
    }
}

/// Leaf: a non-negative amount (integer, decimal rounded up, or a numeric
/// string). `null` and other types are "no amount".
#[derive(Clone, Copy)]
struct AmountLeaf;

impl<'de> DeserializeSeed<'de> for AmountLeaf {
    type Value = Option<u64>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<u64>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for AmountLeaf {
    type Value = Option<u64>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a non-negative number")
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Option<u64>, E> {
        Ok(Some(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Option<u64>, E> {
        Ok(u64::try_from(v).ok())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Option<u64>, E> {
        Ok(float_amount(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Option<u64>, E> {
        Ok(parse_amount(v))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Option<u64>, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Option<u64>, E> {
        Ok(None)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<u64>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<u64>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
}

fn lookup<'de, T, L>(
    json: &'de [u8],
    path: &[String],
    leaf: L,
) -> Result<Option<T>, serde_json::Error>
where
    L: Leaf<'de, Value = Option<T>>,
{
    let mut de = serde_json::Deserializer::from_slice(json);
    let v = PathSeed { path, leaf }.deserialize(&mut de)?;
    de.end()?;
    Ok(v)
}

/// The amount at dotted `path` (e.g. `["usage", "total_tokens"]`) in a JSON
/// document. `None` when the document is not JSON, the path is absent or
/// the value there is not a non-negative number (decimals round up;
/// numeric strings count).
pub fn json_number_at(json: &[u8], path: &[String]) -> Option<u64> {
    lookup(json, path, AmountLeaf).ok().flatten()
}

/// Split `"usage.total_tokens"` into path segments.
pub fn dotted(path: &str) -> Vec<String> {
    path.split('.').map(str::to_owned).collect()
}

// ---------------------------------------------------------------- request side

/// Why a request body does not name a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelError {
    /// The body is not valid JSON.
    NotJson,
    /// Valid JSON, but no string `model` at the top level.
    NoModel,
}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelError::NotJson => f.write_str(
                "We could not parse the JSON body of your request. The endpoint is chosen by \
                 the `model` field, so the body must be a JSON object.",
            ),
            ModelError::NoModel => f.write_str(
                "you must provide a model parameter: a string `model` field in the JSON body",
            ),
        }
    }
}

impl std::error::Error for ModelError {}

/// The top-level `model` string of a JSON request body (for `{model}`
/// routing), read as the gateway reads every request
/// ([`request::read_request`]): a body whose interpreted fields are
/// mistyped or repeated names no model. The caller bounds the body
/// (`max_request_body`).
pub fn request_model(body: &[u8]) -> Result<String, ModelError> {
    match request::read_request(body, &HeaderMap::new(), &[]) {
        Ok(facts) => facts.routing_model().map(str::to_owned),
        Err(request::BadRequest(m)) if m == request::NOT_JSON => Err(ModelError::NotJson),
        Err(_) => Err(ModelError::NoModel),
    }
}

/// What [`ensure_include_usage`] did to a request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IncludeUsage {
    /// Not a JSON object with `"stream": true`: forward the body unchanged.
    NotStreaming,
    /// The client asked for the usage chunk itself: forward unchanged and
    /// pass the chunk through.
    AlreadyRequested,
    /// The gateway turned it on: forward these bytes instead, and drop the
    /// usage-only chunk from the response (see [`SseScanner::dropping`]).
    Added(Bytes),
}

/// For a streaming chat request (`"stream": true`), make sure
/// `stream_options.include_usage` is `true`, so the upstream reports usage
/// in a final chunk (see [`request::with_include_usage`]). A body the
/// strict reading of [`request::read_request`] refuses is `NotStreaming`
/// here; the gateway refuses it with 400 before it gets this far.
pub fn ensure_include_usage(body: &Bytes) -> IncludeUsage {
    let Ok(facts) = request::read_request(body, &HeaderMap::new(), &[]) else {
        return IncludeUsage::NotStreaming;
    };
    if !facts.stream {
        IncludeUsage::NotStreaming
    } else if facts.include_usage {
        IncludeUsage::AlreadyRequested
    } else {
        request::with_include_usage(body, &facts).map_or(IncludeUsage::NotStreaming, |b| {
            IncludeUsage::Added(Bytes::from(b))
        })
    }
}

/// What the gateway does with an event of a stream whose usage it asked
/// for on behalf of a client that did not ([`injected_usage_event`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InjectedUsage {
    /// No usage object in it: forward as is.
    Forward,
    /// A usage object and nothing the client needs (no text, no
    /// `finish_reason`, whatever `choices` holds: OpenAI's `[]`, LiteLLM's
    /// `[{"index":0,"delta":{}}]`): withhold it.
    Withhold,
    /// A usage object beside content (vLLM's `continuous_usage_stats`,
    /// llama.cpp and TGI putting usage beside `finish_reason`): forward this
    /// data instead, the same event without its `usage`.
    Strip(Vec<u8>),
}

/// Decide what a client that did not ask for usage gets of one SSE event
/// (its data). Events without `"usage"` or with `"usage": null` cost a
/// substring search, nothing more.
pub fn injected_usage_event(data: &[u8]) -> InjectedUsage {
    if !usage_object_possible(data) {
        return InjectedUsage::Forward;
    }
    let Ok(serde_json::Value::Object(mut o)) = serde_json::from_slice::<serde_json::Value>(data)
    else {
        return InjectedUsage::Forward;
    };
    if !matches!(o.get("usage"), Some(serde_json::Value::Object(_))) {
        return InjectedUsage::Forward;
    }
    let nothing_else = match o.get("choices") {
        None | Some(serde_json::Value::Null) => true,
        Some(serde_json::Value::Array(choices)) => choices.iter().all(empty_choice),
        Some(_) => false,
    };
    if nothing_else {
        return InjectedUsage::Withhold;
    }
    o.remove("usage");
    match serde_json::to_vec(&o) {
        Ok(v) => InjectedUsage::Strip(v),
        Err(_) => InjectedUsage::Forward,
    }
}

/// Whether `data` may hold a `"usage"` member that is not `null`.
fn usage_object_possible(data: &[u8]) -> bool {
    memchr::memmem::find_iter(data, b"\"usage\"").any(|at| {
        let rest = &data[at + 7..];
        let colon = skip_ws(rest, 0);
        if rest.get(colon) != Some(&b':') {
            return true;
        }
        let v = skip_ws(rest, colon + 1);
        !rest[v.min(rest.len())..].starts_with(b"null")
    })
}

/// A choice that carries nothing but its index: every other member null,
/// empty, or an object of such (`{"index":0,"delta":{}}`,
/// `{"delta":{"content":""},"finish_reason":null}`).
fn empty_choice(choice: &serde_json::Value) -> bool {
    fn empty(v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::Null => true,
            serde_json::Value::String(s) => s.is_empty(),
            serde_json::Value::Array(a) => a.is_empty(),
            serde_json::Value::Object(o) => o.values().all(empty),
            serde_json::Value::Bool(_) | serde_json::Value::Number(_) => false,
        }
    }
    match choice {
        serde_json::Value::Object(o) => o.iter().all(|(k, v)| k == "index" || empty(v)),
        other => empty(other),
    }
}

/// The raw bytes of an SSE event with its data replaced by `data`: the
/// first `data:` line carries it, later ones go, every other line and
/// every line terminator stay as they were.
fn replace_event_data(raw: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + data.len());
    let mut replaced = false;
    let mut i = 0;
    while i < raw.len() {
        let rest = &raw[i..];
        let (line_len, term_len) = match memchr::memchr2(b'\n', b'\r', rest) {
            None => (rest.len(), 0),
            Some(j) if rest[j] == b'\r' && rest.get(j + 1) == Some(&b'\n') => (j, 2),
            Some(j) => (j, 1),
        };
        let line = &rest[..line_len];
        let term = &rest[line_len..line_len + term_len];
        if line.starts_with(b"data:") {
            if !replaced {
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(data);
                out.extend_from_slice(term);
                replaced = true;
            }
        } else {
            out.extend_from_slice(line);
            out.extend_from_slice(term);
        }
        i += line_len + term_len;
    }
    out
}

// ---------------------------------------------------------------- estimates

/// Bytes of generated text counted as one token when a stream is cut short
/// before its usage chunk. English averages about four bytes per token.
pub const BYTES_PER_TOKEN: usize = 4;

/// Keys whose string values are generated text in the stream shapes the
/// gateway meets: OpenAI chat (`content`, `reasoning_content`, `refusal`,
/// tool-call `arguments`), completions (`text`), Responses (`delta`),
/// Anthropic (`text`, `thinking`, `partial_json`), vLLM (`reasoning`).
const CONTENT_KEYS: [&[u8]; 9] = [
    b"content",
    b"text",
    b"reasoning_content",
    b"reasoning",
    b"refusal",
    b"arguments",
    b"delta",
    b"thinking",
    b"partial_json",
];

/// Estimated tokens of one SSE event: `ceil(text bytes / 4)`, and at least
/// one for an event that carries any text. Servers that stream one token
/// per event (OpenAI, vLLM, TGI, llama.cpp) are never undercounted; text
/// longer than four bytes per token counts more. Escapes count at their
/// escaped length (more, never less).
pub fn content_tokens(data: &[u8]) -> u64 {
    let bytes = content_bytes(data);
    if bytes == 0 {
        0
    } else {
        bytes.div_ceil(BYTES_PER_TOKEN) as u64
    }
}

/// Total length of the string values of [`CONTENT_KEYS`] in a JSON text,
/// found lexically (no parse, no allocation): every `:` that follows one
/// of the keys (its quotes unescaped, so text inside a string never
/// matches) and precedes a string. About 85 ns for an OpenAI chat chunk
/// (release build, the 2-core dev box; a byte-at-a-time state machine took
/// 126 ns, a search for `":"` alone 65 ns but misses `": "`).
fn content_bytes(data: &[u8]) -> usize {
    let mut total = 0usize;
    // Colons inside a value already counted are skipped.
    let mut counted_to = 0;
    for colon in memchr::memchr_iter(b':', data) {
        if colon < counted_to {
            continue;
        }
        // Most members are not strings (numbers, objects, null): that is
        // the cheaper test, so it goes first.
        let j = skip_ws(data, colon + 1);
        if data.get(j) != Some(&b'"') {
            continue;
        }
        let mut q = colon;
        while q > 0 && data[q - 1].is_ascii_whitespace() {
            q -= 1;
        }
        if q == 0 || data[q - 1] != b'"' || !ends_with_content_key(&data[..q - 1]) {
            continue;
        }
        match string_end(data, j + 1) {
            Some(end) => {
                total += end - (j + 1);
                counted_to = end + 1;
            }
            None => {
                // Cut inside the value: count what is there.
                total += data.len() - (j + 1);
                break;
            }
        }
    }
    total
}

/// Whether `before` ends with `"<content key>` whose opening quote is not
/// escaped.
fn ends_with_content_key(before: &[u8]) -> bool {
    CONTENT_KEYS.iter().any(|key| {
        let n = key.len();
        before.ends_with(key)
            && before.len() > n
            && before[before.len() - n - 1] == b'"'
            && (before.len() == n + 1 || before[before.len() - n - 2] != b'\\')
    })
}

/// Index of the quote that closes a string whose content starts at `from`.
fn string_end(data: &[u8], mut from: usize) -> Option<usize> {
    loop {
        let k = memchr::memchr2(b'"', b'\\', data.get(from..)?)?;
        if data[from + k] == b'"' {
            return Some(from + k);
        }
        from += k + 2;
    }
}

fn skip_ws(data: &[u8], mut i: usize) -> usize {
    while data.get(i).is_some_and(u8::is_ascii_whitespace) {
        i += 1;
    }
    i
}

// ---------------------------------------------------------------- SSE

/// An incremental `text/event-stream` scanner. Feed it the response body in
/// chunks split anywhere; it remembers, per path, the value from the LAST
/// event whose data carries a number there (OpenAI's `include_usage` chunk).
///
/// - `data: [DONE]` is ignored.
/// - An event's JSON is only parsed when it contains the path's last key
///   in quotes (a cheap substring check), so content chunks cost a scan.
///   A key spelled with JSON escapes (`"\u0075sage"`) is not recognised.
/// - Memory is bounded: a line or event longer than the limit is skipped.
/// - In dropping mode ([`SseScanner::dropping`]) it also keeps the usage
///   the gateway asked for from the client ([`injected_usage_event`]):
///   events that carry nothing else are withheld, others lose their
///   `usage` member; otherwise it returns every chunk untouched.
#[derive(Debug)]
pub struct SseScanner {
    paths: Vec<Vec<String>>,
    /// `"<last key>"` of each path, searched for in every event.
    needles: Vec<memchr::memmem::Finder<'static>>,
    values: Vec<Option<u64>>,
    max_event: usize,
    drop_usage_only: bool,
    line: Vec<u8>,
    line_overflow: bool,
    after_cr: bool,
    data: Vec<u8>,
    has_data: bool,
    event_overflow: bool,
    /// Dropping mode: raw bytes of the current event, held back until it is
    /// known whether to forward it.
    raw: Vec<u8>,
    /// The current event's start was already forwarded (it grew past the
    /// limit), so it can no longer be dropped.
    raw_flushed: bool,
    /// The last event was dispatched at a `\r`: a `\n` right after it
    /// belongs to that event, and is dropped or forwarded with it
    /// (`Some(true)`: dropped).
    lf_after_dispatch: Option<bool>,
    dropped: usize,
    /// How many events were forwarded without their usage object.
    stripped: usize,
    /// Estimated completion tokens of the events forwarded so far (see
    /// [`content_tokens`]).
    content_tokens: u64,
}

impl SseScanner {
    /// Scan for `paths` (each a dotted path split into segments), passing
    /// bytes through untouched.
    pub fn new(paths: Vec<Vec<String>>) -> Self {
        Self::with_options(paths, false, DEFAULT_MAX_EVENT_BYTES)
    }

    /// Like [`SseScanner::new`], but also keep usage out of the forwarded
    /// bytes (when the gateway injected `include_usage`).
    pub fn dropping(paths: Vec<Vec<String>>) -> Self {
        Self::with_options(paths, true, DEFAULT_MAX_EVENT_BYTES)
    }

    /// Full control, including the bound on one line / event.
    pub fn with_options(paths: Vec<Vec<String>>, drop_usage_only: bool, max_event: usize) -> Self {
        let needles = paths
            .iter()
            .map(|p| {
                let key = p.last().map(String::as_str).unwrap_or("");
                let mut n = Vec::with_capacity(key.len() + 2);
                n.push(b'"');
                n.extend_from_slice(key.as_bytes());
                n.push(b'"');
                memchr::memmem::Finder::new(&n).into_owned()
            })
            .collect();
        let values = vec![None; paths.len()];
        Self {
            paths,
            needles,
            values,
            max_event: max_event.max(1),
            drop_usage_only,
            line: Vec::new(),
            line_overflow: false,
            after_cr: false,
            data: Vec::new(),
            has_data: false,
            event_overflow: false,
            raw: Vec::new(),
            raw_flushed: false,
            lf_after_dispatch: None,
            dropped: 0,
            stripped: 0,
            content_tokens: 0,
        }
    }

    /// Scan a chunk. Returns the bytes to forward: the chunk itself unless
    /// dropping, in which case complete events minus the usage-only one.
    pub fn feed(&mut self, chunk: &Bytes) -> Bytes {
        if !self.drop_usage_only {
            self.scan(chunk, &mut Vec::new());
            return chunk.clone();
        }
        let mut out = Vec::with_capacity(chunk.len() + self.raw.len());
        self.scan(chunk, &mut out);
        Bytes::from(out)
    }

    /// The stream ended: treat an unterminated last line / event as
    /// complete (a cut-short stream still charges what it showed) and
    /// return the bytes still held back.
    pub fn finish(&mut self) -> Bytes {
        let mut out = Vec::new();
        if !self.line.is_empty() || self.line_overflow {
            self.end_line(&mut out);
        }
        if self.has_data {
            self.dispatch(&mut out);
        }
        out.append(&mut self.raw);
        self.raw_flushed = false;
        Bytes::from(out)
    }

    /// The value seen last for path `i`.
    pub fn value(&self, i: usize) -> Option<u64> {
        self.values.get(i).copied().flatten()
    }

    /// The values seen last, in path order.
    pub fn values(&self) -> &[Option<u64>] {
        &self.values
    }

    /// Path `i`, as given.
    pub fn path(&self, i: usize) -> Option<&[String]> {
        self.paths.get(i).map(Vec::as_slice)
    }

    /// How many usage-only events were dropped.
    pub fn dropped(&self) -> usize {
        self.dropped
    }

    /// How many events were forwarded without their usage object.
    pub fn stripped(&self) -> usize {
        self.stripped
    }

    /// Estimated completion tokens of the events forwarded so far: the
    /// fallback measurement of a stream cut short before its usage chunk.
    pub fn content_tokens(&self) -> u64 {
        self.content_tokens
    }

    fn emit(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        if !self.drop_usage_only {
            return;
        }
        if self.raw_flushed {
            out.extend_from_slice(bytes);
            return;
        }
        self.raw.extend_from_slice(bytes);
        if self.raw.len() > self.max_event {
            // Too big to be a usage chunk worth holding: forward it as is.
            out.append(&mut self.raw);
            self.raw_flushed = true;
        }
    }

    fn scan(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let mut i = 0;
        while i < chunk.len() {
            if self.after_cr {
                self.after_cr = false;
                let dispatched = self.lf_after_dispatch.take();
                if chunk[i] == b'\n' {
                    // The second half of a CRLF terminator.
                    match dispatched {
                        Some(true) => {}
                        Some(false) if self.drop_usage_only => out.push(b'\n'),
                        _ => self.emit(b"\n", out),
                    }
                    i += 1;
                    continue;
                }
            }
            let rest = &chunk[i..];
            match memchr::memchr2(b'\n', b'\r', rest) {
                None => {
                    self.push_line(rest);
                    self.emit(rest, out);
                    break;
                }
                Some(j) => {
                    // A line that starts and ends in this chunk (the usual
                    // case) is read in place; only a line split across
                    // chunks is gathered in `self.line`.
                    let whole = self.line.is_empty() && !self.line_overflow;
                    if !whole {
                        self.push_line(&rest[..j]);
                    }
                    self.emit(&rest[..=j], out);
                    if rest[j] == b'\r' {
                        self.after_cr = true;
                    }
                    i += j + 1;
                    // A blank line (not an overlong one) dispatches the event.
                    let dispatches = if whole {
                        j == 0
                    } else {
                        self.line.is_empty() && !self.line_overflow
                    };
                    let dropped_before = self.dropped;
                    if !whole {
                        self.end_line(out);
                    } else if j > self.max_event {
                        self.event_overflow = true;
                    } else {
                        self.take_line(&rest[..j], out);
                    }
                    if self.after_cr && dispatches {
                        self.lf_after_dispatch = Some(self.dropped != dropped_before);
                    }
                }
            }
        }
    }

    fn push_line(&mut self, bytes: &[u8]) {
        if self.line_overflow {
            return;
        }
        if self.line.len() + bytes.len() > self.max_event {
            self.line_overflow = true;
            self.line.clear();
        } else {
            self.line.extend_from_slice(bytes);
        }
    }

    fn end_line(&mut self, out: &mut Vec<u8>) {
        if std::mem::take(&mut self.line_overflow) {
            self.event_overflow = true;
            return;
        }
        let line = std::mem::take(&mut self.line);
        self.take_line(&line, out);
        // Reuse the line's allocation for the next line.
        self.line = line;
        self.line.clear();
    }

    /// Act on one complete line (without its terminator), at most
    /// `max_event` bytes long.
    fn take_line(&mut self, line: &[u8], out: &mut Vec<u8>) {
        if line.is_empty() {
            self.dispatch(out);
        } else if line[0] != b':' {
            let (name, value) = match line.iter().position(|b| *b == b':') {
                Some(c) => {
                    let v = &line[c + 1..];
                    (&line[..c], v.strip_prefix(b" ").unwrap_or(v))
                }
                None => (line, &[][..]),
            };
            if name == b"data" {
                let extra = value.len() + usize::from(self.has_data);
                if self.data.len() + extra > self.max_event {
                    self.event_overflow = true;
                } else {
                    if self.has_data {
                        self.data.push(b'\n');
                    }
                    self.data.extend_from_slice(value);
                }
                self.has_data = true;
            }
        }
    }

    fn dispatch(&mut self, out: &mut Vec<u8>) {
        let mut drop = false;
        if self.has_data && !self.event_overflow && self.data != b"[DONE]" {
            for (i, needle) in self.needles.iter().enumerate() {
                if needle.find(&self.data).is_some() {
                    if let Some(v) = json_number_at(&self.data, &self.paths[i]) {
                        self.values[i] = Some(v);
                    }
                }
            }
            if self.drop_usage_only && !self.raw_flushed {
                match injected_usage_event(&self.data) {
                    InjectedUsage::Forward => {}
                    InjectedUsage::Withhold => drop = true,
                    InjectedUsage::Strip(data) => {
                        self.raw = replace_event_data(&self.raw, &data);
                        self.stripped += 1;
                    }
                }
            }
            if !drop {
                self.content_tokens = self
                    .content_tokens
                    .saturating_add(content_tokens(&self.data));
            }
        } else if self.has_data && self.event_overflow {
            // Too large to look into: at least what its size allows.
            self.content_tokens = self
                .content_tokens
                .saturating_add(self.max_event.div_ceil(BYTES_PER_TOKEN) as u64);
        }
        if self.drop_usage_only {
            if drop {
                self.raw.clear();
                self.dropped += 1;
            } else {
                out.append(&mut self.raw);
            }
        }
        self.raw_flushed = false;
        self.data.clear();
        self.has_data = false;
        self.event_overflow = false;
    }
}

// ---------------------------------------------------------------- one response

/// A source resolved for one response.
#[derive(Debug, Clone)]
enum Resolved {
    /// A header's value, read when the meter was built.
    Header(Option<u64>),
    /// Index into the body paths.
    Body(usize),
    /// Found when its first term is; later terms not found count 0.
    Sum(Vec<Resolved>),
}

#[derive(Debug)]
enum BodyScan {
    None,
    Json(JsonScanner),
    Sse(SseScanner),
}

/// Measures the units of one response, per the route's `usage` sources.
///
/// ```
/// use bytes::Bytes;
/// use plangate::config::ValueSource;
/// use plangate::plans::Unit;
/// use plangate::usage::{dotted, ResponseMeter};
///
/// let usage = vec![(Unit::new("token"), vec![ValueSource::Body(dotted("usage.total_tokens"))])];
/// let mut headers = http::HeaderMap::new();
/// headers.insert("content-type", "application/json".parse().unwrap());
/// let mut meter = ResponseMeter::new(&usage, &headers, false);
/// let fwd = meter.feed(&Bytes::from_static(br#"{"usage":{"total_tokens":42}}"#));
/// assert_eq!(fwd.len(), 29);
/// meter.finish();
/// assert_eq!(meter.units(), vec![(Unit::new("token"), 42)]);
/// ```
#[derive(Debug)]
pub struct ResponseMeter {
    units: Vec<(Unit, Vec<Resolved>)>,
    /// Finds the distinct body paths; `Resolved::Body` indexes into them.
    body: BodyScan,
}

impl ResponseMeter {
    /// Build from a route's `usage` and the response headers. The body is
    /// scanned as SSE ([`SseScanner`]) when the content type is
    /// `text/event-stream`, else as one JSON document ([`JsonScanner`]: the
    /// top-level keys heading the paths, wherever they are in the body).
    /// `drop_usage_chunk`: the gateway injected `include_usage`, so the
    /// usage-only SSE event is removed from the forwarded bytes.
    pub fn new(
        usage: &[(Unit, Vec<ValueSource>)],
        headers: &HeaderMap,
        drop_usage_chunk: bool,
    ) -> Self {
        let mut paths: Vec<Vec<String>> = Vec::new();
        let units = usage
            .iter()
            .map(|(unit, sources)| {
                let resolved = sources
                    .iter()
                    .map(|s| resolve(s, headers, &mut paths))
                    .collect();
                (unit.clone(), resolved)
            })
            .collect();
        let body = if is_event_stream(headers) {
            if drop_usage_chunk {
                BodyScan::Sse(SseScanner::dropping(paths))
            } else {
                BodyScan::Sse(SseScanner::new(paths))
            }
        } else if paths.is_empty() {
            BodyScan::None
        } else {
            BodyScan::Json(JsonScanner::new(paths))
        };
        Self { units, body }
    }

    /// Watch a body chunk; returns the bytes to forward to the client.
    pub fn feed(&mut self, chunk: &Bytes) -> Bytes {
        match &mut self.body {
            BodyScan::None => chunk.clone(),
            BodyScan::Json(s) => {
                s.feed(chunk);
                chunk.clone()
            }
            BodyScan::Sse(s) => s.feed(chunk),
        }
    }

    /// The body ended; returns bytes still to forward (empty unless SSE
    /// events were held back).
    pub fn finish(&mut self) -> Bytes {
        match &mut self.body {
            BodyScan::Sse(s) => s.finish(),
            _ => Bytes::new(),
        }
    }

    /// Per unit, the first source that yielded a number. Units with no
    /// number are left out (their reservation stands). Valid at any time,
    /// so a cut-short stream charges what was seen.
    pub fn units(&self) -> Vec<(Unit, u64)> {
        self.units
            .iter()
            .filter_map(|(unit, sources)| {
                sources
                    .iter()
                    .find_map(|s| self.value(s))
                    .map(|v| (unit.clone(), v))
            })
            .collect()
    }

    /// What the request is settled with, per unit (windows and per-unit
    /// credits alike):
    /// - the amount the response reported, when it did (at most
    ///   [`crate::plans::MAX_AMOUNT`]);
    /// - else, for an event stream (finished or cut short before its usage
    ///   chunk), the larger of the reservation and an estimate of what was
    ///   delivered: the completion from the streamed text
    ///   ([`content_tokens`]) plus `prompt_tokens`, by the measuring path's
    ///   last key (`*prompt*`/`*input*`: the prompt; `*completion*`/
    ///   `*output*`: the completion; anything else, e.g. `total_tokens`:
    ///   both);
    /// - else the reservation: a unit reserved but not measured (images
    ///   from `n`) is charged what was reserved.
    ///
    /// Units with none of these are left out.
    pub fn settle_units(&self, reserved: &[(Unit, u64)], prompt_tokens: u64) -> Vec<(Unit, u64)> {
        let measured = self.units();
        let mut out: Vec<(Unit, u64)> = measured
            .iter()
            .map(|(u, n)| (u.clone(), crate::plans::clamp_amount(*n)))
            .collect();
        for (unit, sources) in &self.units {
            if measured.iter().any(|(u, _)| u == unit) {
                continue;
            }
            let reserve = reserved.iter().find(|(u, _)| u == unit).map(|(_, n)| *n);
            let estimate = match &self.body {
                BodyScan::Sse(scan) => sources.iter().find_map(|s| match s {
                    // A sum (input + output): everything delivered.
                    Resolved::Sum(terms)
                        if terms.iter().any(|t| matches!(t, Resolved::Body(_))) =>
                    {
                        Some(prompt_tokens.saturating_add(scan.content_tokens()))
                    }
                    Resolved::Sum(_) => None,
                    Resolved::Body(i) => scan.path(*i).map(|path| {
                        let completion = scan.content_tokens();
                        let last = path.last().map(String::as_str).unwrap_or("");
                        if last.contains("prompt") || last.contains("input") {
                            prompt_tokens
                        } else if last.contains("completion") || last.contains("output") {
                            completion
                        } else {
                            prompt_tokens.saturating_add(completion)
                        }
                    }),
                    Resolved::Header(_) => None,
                }),
                _ => None,
            };
            let amount = match (reserve, estimate) {
                (Some(r), Some(e)) => Some(r.max(e)),
                (r, e) => r.or(e),
            };
            if let Some(n) = amount {
                out.push((unit.clone(), crate::plans::clamp_amount(n)));
            }
        }
        for (unit, n) in reserved {
            if !out.iter().any(|(u, _)| u == unit) {
                out.push((unit.clone(), *n));
            }
        }
        out
    }

    /// The number a source yielded, if any.
    fn value(&self, source: &Resolved) -> Option<u64> {
        match source {
            Resolved::Header(v) => *v,
            Resolved::Body(i) => self.body_value(*i),
            Resolved::Sum(terms) => {
                let (first, rest) = terms.split_first()?;
                let first = self.value(first)?;
                Some(
                    rest.iter()
                        .filter_map(|t| self.value(t))
                        .fold(first, u64::saturating_add),
                )
            }
        }
    }

    fn body_value(&self, i: usize) -> Option<u64> {
        match &self.body {
            BodyScan::None => None,
            BodyScan::Json(s) => s.value(i),
            BodyScan::Sse(s) => s.value(i),
        }
    }
}

/// A route's source for one response: a header's value read now, a body
/// path as an index into `paths` (each distinct path scanned once).
fn resolve(source: &ValueSource, headers: &HeaderMap, paths: &mut Vec<Vec<String>>) -> Resolved {
    match source {
        ValueSource::Header(name) => Resolved::Header(header_amount(headers, name)),
        ValueSource::Body(path) => {
            let i = match paths.iter().position(|p| p == path) {
                Some(i) => i,
                None => {
                    paths.push(path.clone());
                    paths.len() - 1
                }
            };
            Resolved::Body(i)
        }
        ValueSource::Sum(terms) => {
            Resolved::Sum(terms.iter().map(|t| resolve(t, headers, paths)).collect())
        }
    }
}

/// Whether the response is a server-sent event stream.
pub fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|ct| {
            ct.trim_start()
                .get(..17)
                .is_some_and(|p| p.eq_ignore_ascii_case("text/event-stream"))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests;
