//! An incremental scanner over a JSON response body that finds amounts at
//! dotted paths wherever their top-level key sits in the document.
//!
//! Fed the body in chunks split anywhere (inside strings, escapes, keys or
//! numbers), [`JsonScanner`] follows only the lexical state of the document
//! — inside a string or not, after a backslash or not, how many containers
//! are open — plus where it is in the members of the top-level object. Its
//! memory is O(1) apart from two bounded captures:
//!
//! - the raw bytes of the current top-level key (at most
//!   [`DEFAULT_MAX_KEY_BYTES`]; a longer key is not one of ours), compared
//!   with the first segment of each path after decoding JSON escapes, so
//!   `"\u0075sage"` is `usage`;
//! - the raw bytes of the value of a top-level key that heads one of the
//!   paths (at most `max_value`, by default
//!   [`DEFAULT_MAX_EVENT_BYTES`](super::DEFAULT_MAX_EVENT_BYTES); a larger
//!   value is dropped, not captured). When the value is complete the rest
//!   of each path is looked up in it with [`json_number_at`], and the
//!   capture is thrown away.
//!
//! Every other value — a 5 MiB `prompt_logprobs` after `usage`, a base64
//! embedding before it — is skipped without being kept: strings with a
//! vectorized search for `"` and `\`, everything else a byte at a time.
//!
//! Semantics, chosen to agree with [`json_number_at`] on the whole body
//! whenever the body is valid JSON:
//!
//! - Only keys of the top-level object count: a `usage` inside
//!   `choices[0].message`, or `"usage":` inside a string, is not it.
//! - With duplicate top-level keys the last value that has a number at the
//!   path wins (a later `"usage": null` does not erase an earlier count,
//!   just as in [`json_number_at`] and the SSE scanner).
//! - If the top-level value is not an object (an array, a string, …),
//!   nothing is found. An empty path finds nothing either.
//! - Values are only read once complete, so a cut-short body yields what
//!   was complete before the cut; a number at the very end of a cut body
//!   could itself be cut, so it is not read.
//! - Beyond that the scanner is lenient rather than a validator: a body
//!   that is broken after the usage (trailing garbage, an unbalanced
//!   bracket later on) still yields the usage it showed. Counting brackets
//!   without a stack cannot tell `}` from `]`, which only matters for a
//!   document that is not JSON anyway.
//!
//! Throughput (`cargo test --release -p plangate --lib json_scan_throughput
//! -- --ignored --nocapture`; shared 2-core AMD EPYC VM, 10 MiB bodies fed
//! in 64 KiB chunks): one base64 string ≈ 15 GB/s on a first pass (86 GB/s
//! once in L3), a float embedding ≈ 1.7 GB/s, vLLM `prompt_logprobs`
//! (small objects, short strings, numbers) ≈ 0.7–1 GB/s.

use memchr::memchr2;

use super::json_number_at;

/// Keys longer than this (raw, escapes included) are never one of ours.
pub const DEFAULT_MAX_KEY_BYTES: usize = 1 << 10;

/// Where the scanner is relative to the top-level value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Top {
    /// Before it (leading whitespace).
    Start,
    /// Inside the top-level object.
    Object,
    /// After it closed, or it is not an object: the rest is ignored.
    Done,
}

/// Position among the members of the top-level object (at depth 1,
/// outside a string, except where noted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Expecting a key or the closing brace.
    Key,
    /// Inside a key string.
    InKey,
    /// After a key, expecting `:`.
    Colon,
    /// After `:`, expecting a value.
    Value,
    /// Inside a string value.
    StrValue,
    /// Inside an object or array value (depth > 1).
    Container,
    /// Inside a number or literal.
    Scalar,
    /// After a value, expecting `,` or the closing brace.
    After,
}

/// What the bytes going by are being recorded into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rec {
    Off,
    Key,
    Value,
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// Bytes that change the lexical state outside a string below depth 1.
fn is_structural(b: u8) -> bool {
    matches!(b, b'"' | b'{' | b'}' | b'[' | b']')
}

/// Finds amounts at dotted paths in a JSON body fed in chunks; see the
/// module docs for what it reads and what it skips.
///
/// ```
/// use plangate::usage::{dotted, JsonScanner};
///
/// let mut s = JsonScanner::new(vec![dotted("usage.total_tokens")]);
/// s.feed(br#"{"usage":{"total_tok"#);
/// s.feed(br#"ens":42},"prompt_logprobs":[null,{"1":{"logprob":-1.5}}]}"#);
/// assert_eq!(s.value(0), Some(42));
/// assert_eq!(s.number_at(&dotted("usage.total_tokens")), Some(42));
/// ```
#[derive(Debug)]
pub struct JsonScanner {
    paths: Vec<Vec<String>>,
    /// Distinct first segments of `paths`.
    heads: Vec<String>,
    /// Per path, its first segment's index in `heads` (`None`: empty path).
    head_of: Vec<Option<usize>>,
    values: Vec<Option<u64>>,
    max_key: usize,
    max_value: usize,
    top: Top,
    /// Open containers, the top-level object included.
    depth: usize,
    in_string: bool,
    /// The last byte seen was a backslash inside a string.
    escape: bool,
    phase: Phase,
    rec: Rec,
    /// Where recording resumes in the chunk being fed.
    rec_from: usize,
    /// The current top-level key, raw, without its quotes.
    key: Vec<u8>,
    key_overflow: bool,
    /// The head the current member's key matched.
    matched: Option<usize>,
    /// The current member's value, raw, when its key matched.
    value: Vec<u8>,
    value_overflow: bool,
}

impl JsonScanner {
    /// Scan for `paths` (each a dotted path split into segments), with the
    /// default bounds.
    pub fn new(paths: Vec<Vec<String>>) -> Self {
        Self::with_limits(paths, DEFAULT_MAX_KEY_BYTES, super::DEFAULT_MAX_EVENT_BYTES)
    }

    /// Full control over the bounds on a captured key and value.
    pub fn with_limits(paths: Vec<Vec<String>>, max_key: usize, max_value: usize) -> Self {
        let mut heads: Vec<String> = Vec::new();
        let head_of = paths
            .iter()
            .map(|p| {
                let head = p.first()?;
                Some(match heads.iter().position(|h| h == head) {
                    Some(i) => i,
                    None => {
                        heads.push(head.clone());
                        heads.len() - 1
                    }
                })
            })
            .collect();
        let values = vec![None; paths.len()];
        Self {
            paths,
            heads,
            head_of,
            values,
            max_key,
            max_value,
            top: Top::Start,
            depth: 0,
            in_string: false,
            escape: false,
            phase: Phase::Key,
            rec: Rec::Off,
            rec_from: 0,
            key: Vec::new(),
            key_overflow: false,
            matched: None,
            value: Vec::new(),
            value_overflow: false,
        }
    }

    /// The amount found for path `i` (in the order given), so far.
    pub fn value(&self, i: usize) -> Option<u64> {
        self.values.get(i).copied().flatten()
    }

    /// The amounts found so far, in path order.
    pub fn values(&self) -> &[Option<u64>] {
        &self.values
    }

    /// The amount found so far at `path`, which must be one of the paths
    /// the scanner was built with (any other path is `None`).
    pub fn number_at(&self, path: &[String]) -> Option<u64> {
        let i = self.paths.iter().position(|p| p == path)?;
        self.value(i)
    }

    /// Scan the next chunk of the body.
    pub fn feed(&mut self, chunk: &[u8]) {
        self.rec_from = 0;
        let mut i = 0;
        while i < chunk.len() {
            i = if self.in_string {
                self.in_string_step(chunk, i)
            } else {
                match self.top {
                    Top::Done => break,
                    Top::Start => self.start_step(chunk, i),
                    Top::Object if self.depth > 1 => self.nested_step(chunk, i),
                    Top::Object => {
                        self.member(chunk, i);
                        i + 1
                    }
                }
            };
        }
        if self.rec != Rec::Off {
            let from = self.rec_from.min(chunk.len());
            self.record(chunk.get(from..).unwrap_or_default());
        }
    }

    /// Inside a string from `i`: find its end; returns where to go on.
    fn in_string_step(&mut self, chunk: &[u8], i: usize) -> usize {
        if self.escape {
            // The byte after a backslash is never the end of the string.
            self.escape = false;
            return i + 1;
        }
        let rest = chunk.get(i..).unwrap_or_default();
        match memchr2(b'"', b'\\', rest) {
            None => chunk.len(),
            Some(j) => {
                let at = i + j;
                if rest.get(j) == Some(&b'\\') {
                    self.escape = true;
                } else {
                    self.in_string = false;
                    self.string_closed(chunk, at);
                }
                at + 1
            }
        }
    }

    /// Before the top-level value.
    fn start_step(&mut self, chunk: &[u8], i: usize) -> usize {
        match chunk.get(i) {
            Some(b) if is_ws(*b) => {}
            Some(b'{') => {
                self.top = Top::Object;
                self.depth = 1;
                self.phase = Phase::Key;
            }
            // Not an object: nothing is ours.
            _ => self.top = Top::Done,
        }
        i + 1
    }

    /// Below the top-level members, outside a string: skip to the next
    /// byte that matters.
    fn nested_step(&mut self, chunk: &[u8], i: usize) -> usize {
        let rest = chunk.get(i..).unwrap_or_default();
        let Some(j) = rest.iter().position(|b| is_structural(*b)) else {
            return chunk.len();
        };
        let at = i + j;
        match rest.get(j) {
            Some(b'"') => self.in_string = true,
            Some(b'{' | b'[') => self.depth = self.depth.saturating_add(1),
            Some(_) => {
                self.depth = self.depth.saturating_sub(1);
                if self.depth == 1 {
                    // The member's object or array value is complete.
                    self.end_rec(chunk, at + 1);
                    self.value_done();
                    self.phase = Phase::After;
                }
            }
            None => {}
        }
        at + 1
    }

    /// A string ended at `at` (the closing quote).
    fn string_closed(&mut self, chunk: &[u8], at: usize) {
        if self.depth != 1 {
            return;
        }
        match self.phase {
            Phase::InKey => {
                self.end_rec(chunk, at);
                self.key_done();
                self.phase = Phase::Colon;
            }
            Phase::StrValue => {
                self.end_rec(chunk, at + 1);
                self.value_done();
                self.phase = Phase::After;
            }
            _ => {}
        }
    }

    /// One byte among the top-level members (depth 1, outside a string).
    /// Unexpected bytes are read leniently, always moving on.
    fn member(&mut self, chunk: &[u8], at: usize) {
        let Some(&b) = chunk.get(at) else {
            return;
        };
        // Each arm either consumes `b` (returns) or moves to a phase that
        // comes later in a read of `b`: After → Key → Value, Scalar → After.
        loop {
            match self.phase {
                Phase::Key => match b {
                    b'"' => {
                        self.in_string = true;
                        self.phase = Phase::InKey;
                        self.matched = None;
                        self.start_rec(Rec::Key, at + 1);
                        return;
                    }
                    b'}' | b']' => return self.close_top(),
                    b',' => return,
                    _ if is_ws(b) => return,
                    // A value without a key: nobody's.
                    _ => {
                        self.matched = None;
                        self.phase = Phase::Value;
                    }
                },
                Phase::Colon => match b {
                    b':' => {
                        self.phase = Phase::Value;
                        return;
                    }
                    _ if is_ws(b) => return,
                    _ => {
                        self.matched = None;
                        self.phase = Phase::Value;
                    }
                },
                Phase::Value => {
                    match b {
                        b'}' | b']' => return self.close_top(),
                        b',' => {
                            self.matched = None;
                            self.phase = Phase::Key;
                            return;
                        }
                        _ if is_ws(b) => return,
                        b'"' => {
                            self.in_string = true;
                            self.phase = Phase::StrValue;
                        }
                        b'{' | b'[' => {
                            self.depth = 2;
                            self.phase = Phase::Container;
                        }
                        _ => self.phase = Phase::Scalar,
                    }
                    if self.matched.is_some() {
                        self.start_rec(Rec::Value, at);
                    }
                    return;
                }
                Phase::Scalar => {
                    if !(is_ws(b) || b == b',' || b == b':' || is_structural(b)) {
                        return;
                    }
                    self.end_rec(chunk, at);
                    self.value_done();
                    self.phase = Phase::After;
                }
                Phase::After => match b {
                    b',' => {
                        self.phase = Phase::Key;
                        return;
                    }
                    b'}' | b']' => return self.close_top(),
                    _ if is_ws(b) => return,
                    // A member without the comma before it.
                    _ => self.phase = Phase::Key,
                },
                // Not reachable at depth 1 outside a string; recover.
                Phase::InKey | Phase::StrValue | Phase::Container => {
                    self.rec = Rec::Off;
                    self.matched = None;
                    self.phase = Phase::After;
                }
            }
        }
    }

    fn close_top(&mut self) {
        self.depth = 0;
        self.top = Top::Done;
        self.rec = Rec::Off;
        self.matched = None;
    }

    fn start_rec(&mut self, rec: Rec, from: usize) {
        self.rec = rec;
        self.rec_from = from;
        match rec {
            Rec::Key => {
                self.key.clear();
                self.key_overflow = false;
            }
            Rec::Value => {
                self.value.clear();
                self.value_overflow = false;
            }
            Rec::Off => {}
        }
    }

    /// Recording stops before `end` in this chunk.
    fn end_rec(&mut self, chunk: &[u8], end: usize) {
        if self.rec == Rec::Off {
            return;
        }
        let end = end.min(chunk.len());
        let from = self.rec_from.min(end);
        self.record(chunk.get(from..end).unwrap_or_default());
        self.rec = Rec::Off;
    }

    fn record(&mut self, bytes: &[u8]) {
        let (buf, overflow, max) = match self.rec {
            Rec::Off => return,
            Rec::Key => (&mut self.key, &mut self.key_overflow, self.max_key),
            Rec::Value => (&mut self.value, &mut self.value_overflow, self.max_value),
        };
        if *overflow {
            return;
        }
        if buf.len().saturating_add(bytes.len()) > max {
            // Too long to be ours: drop it, and its memory.
            *overflow = true;
            *buf = Vec::new();
        } else {
            buf.extend_from_slice(bytes);
        }
    }

    /// A top-level key is complete: is it the head of one of our paths?
    fn key_done(&mut self) {
        self.matched = if self.key_overflow {
            None
        } else if !self.key.contains(&b'\\') {
            self.heads.iter().position(|h| h.as_bytes() == self.key)
        } else {
            // Escaped (rare): decode it as the JSON string it is.
            let mut quoted = Vec::with_capacity(self.key.len() + 2);
            quoted.push(b'"');
            quoted.extend_from_slice(&self.key);
            quoted.push(b'"');
            serde_json::from_slice::<String>(&quoted)
                .ok()
                .and_then(|k| self.heads.iter().position(|h| *h == k))
        };
        self.key.clear();
    }

    /// The current member's value is complete: read our paths in it.
    fn value_done(&mut self) {
        if let Some(h) = self.matched.take() {
            if !self.value_overflow {
                for (i, path) in self.paths.iter().enumerate() {
                    if self.head_of.get(i) != Some(&Some(h)) {
                        continue;
                    }
                    let rest = path.get(1..).unwrap_or_default();
                    if let Some(v) = json_number_at(&self.value, rest) {
                        if let Some(slot) = self.values.get_mut(i) {
                            *slot = Some(v);
                        }
                    }
                }
            }
        }
        self.value.clear();
        self.value_overflow = false;
    }
}

#[cfg(test)]
mod tests;
