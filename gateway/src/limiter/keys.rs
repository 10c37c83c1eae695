//! The Redis key format: the only place that builds counter-store keys.
//!
//! Every key of one (account, endpoint) carries the same hash tag, so the
//! scripts that touch them all run on one Redis Cluster slot:
//!
//! ```text
//! <prefix>{<account>:<endpoint>}:w:<window_secs>:<unit>:<window_index>   window counter (string)
//! <prefix>{<account>:<endpoint>}:f                                       in-flight set (zset)
//! ```
//!
//! Account ids, endpoint ids and unit names are arbitrary UTF-8 and may
//! contain `{`, `}` and `:`. They are percent-escaped (`%`, `{`, `}`, `:`)
//! so that the tag cannot be closed early, two different (account,
//! endpoint) pairs can never produce the same key, and no id can forge
//! another key's suffix. The prefix (configurable, default `pg:`) has its
//! braces escaped too, so it can never open a tag of its own.

use std::fmt::Write as _;

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "pg:";

/// Builds every key the Redis counter store uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Default for Keys {
    fn default() -> Self {
        Keys::new(DEFAULT_PREFIX)
    }
}

impl Keys {
    /// Keys under `prefix` (tests use a unique one to stay isolated).
    /// Braces in the prefix are escaped so that it cannot open a hash tag.
    pub fn new(prefix: &str) -> Self {
        let mut escaped = String::with_capacity(prefix.len());
        for c in prefix.chars() {
            match c {
                '%' => escaped.push_str("%25"),
                '{' => escaped.push_str("%7B"),
                '}' => escaped.push_str("%7D"),
                c => escaped.push(c),
            }
        }
        Keys { prefix: escaped }
    }

    /// The prefix as it appears in keys.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The hash tag shared by every key of (account, endpoint), braces
    /// included.
    pub fn tag(account: &str, endpoint: &str) -> String {
        let mut t = String::with_capacity(account.len() + endpoint.len() + 3);
        t.push('{');
        escape_into(&mut t, account);
        t.push(':');
        escape_into(&mut t, endpoint);
        t.push('}');
        t
    }

    /// The counter of window `index` of length `window_secs` on `unit`.
    pub fn window(
        &self,
        account: &str,
        endpoint: &str,
        window_secs: u64,
        unit: &str,
        index: u64,
    ) -> String {
        let mut k = self.base(account, endpoint);
        let _ = write!(k, ":w:{window_secs}:");
        escape_into(&mut k, unit);
        let _ = write!(k, ":{index}");
        k
    }

    /// The set of in-flight requests of (account, endpoint): members are
    /// request ids, scores lease expiry times in ms since the epoch.
    pub fn in_flight(&self, account: &str, endpoint: &str) -> String {
        let mut k = self.base(account, endpoint);
        k.push_str(":f");
        k
    }

    /// A `SCAN MATCH` pattern for every key under this prefix.
    pub fn scan_pattern(&self) -> String {
        let mut p = String::with_capacity(self.prefix.len() + 1);
        for c in self.prefix.chars() {
            // Glob metacharacters in the prefix must match literally.
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                p.push('\\');
            }
            p.push(c);
        }
        p.push('*');
        p
    }

    fn base(&self, account: &str, endpoint: &str) -> String {
        // Built in place (no intermediate tag string): this runs for every
        // key of every attempt and end.
        let mut k = String::with_capacity(self.prefix.len() + account.len() + endpoint.len() + 40);
        k.push_str(&self.prefix);
        k.push('{');
        escape_into(&mut k, account);
        k.push(':');
        escape_into(&mut k, endpoint);
        k.push('}');
        k
    }
}

/// Percent-escape the characters that carry meaning in a key. Ids rarely
/// contain any, so whole runs between them are copied at once rather than
/// char by char.
fn escape_into(out: &mut String, s: &str) {
    let mut rest = s;
    // Byte search: the four are ASCII, so a match is a char boundary.
    while let Some(i) = rest
        .bytes()
        .position(|b| matches!(b, b'%' | b'{' | b'}' | b':'))
    {
        out.push_str(&rest[..i]);
        out.push_str(match rest.as_bytes()[i] {
            b'%' => "%25",
            b'{' => "%7B",
            b'}' => "%7D",
            _ => "%3A",
        });
        rest = &rest[i + 1..];
    }
    out.push_str(rest);
}

/// The hash tag Redis Cluster would hash for `key`: the part between the
/// first `{` and the next `}`, if non-empty; otherwise the whole key.
#[cfg(test)]
fn cluster_hash_part(key: &str) -> &str {
    if let Some(open) = key.find('{') {
        if let Some(len) = key[open + 1..].find('}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn key_shapes() {
        let k = Keys::default();
        assert_eq!(
            k.window("acct", "gpt-4o", 60, "request", 7),
            "pg:{acct:gpt-4o}:w:60:request:7"
        );
        assert_eq!(k.in_flight("acct", "gpt-4o"), "pg:{acct:gpt-4o}:f");
    }

    #[test]
    fn hostile_ids_are_escaped() {
        let k = Keys::new("t:");
        let cases = [
            ("a}b", "e", "t:{a%7Db:e}:f"),
            ("a{b", "e", "t:{a%7Bb:e}:f"),
            ("a:b", "e", "t:{a%3Ab:e}:f"),
            ("a", "b:e", "t:{a:b%3Ae}:f"),
            ("100%", "e", "t:{100%25:e}:f"),
            ("", "", "t:{:}:f"),
        ];
        for (account, endpoint, want) in cases {
            assert_eq!(
                k.in_flight(account, endpoint),
                want,
                "{account:?} {endpoint:?}"
            );
        }
    }

    #[test]
    fn prefix_braces_cannot_open_a_tag() {
        let k = Keys::new("x{y}:");
        let key = k.in_flight("a", "e");
        assert_eq!(key, "x%7By%7D:{a:e}:f");
        assert_eq!(cluster_hash_part(&key), "a:e");
    }

    #[test]
    fn scan_pattern_escapes_glob() {
        assert_eq!(Keys::new("t*1:").scan_pattern(), "t\\*1:*");
    }

    proptest! {
        #[test]
        fn all_keys_of_a_pair_share_one_tag(
            account in ".{0,40}",
            endpoint in ".{0,40}",
            unit in ".{0,10}",
            secs in 1u64..100_000,
            index in any::<u64>(),
        ) {
            let k = Keys::new("p:");
            let tag = Keys::tag(&account, &endpoint);
            let inner = &tag[1..tag.len() - 1];
            let w = k.window(&account, &endpoint, secs, &unit, index);
            let f = k.in_flight(&account, &endpoint);
            prop_assert_eq!(cluster_hash_part(&w), inner);
            prop_assert_eq!(cluster_hash_part(&f), inner);
        }

        #[test]
        fn distinct_pairs_get_distinct_keys(
            a1 in "[a:{}%]{0,6}", e1 in "[a:{}%]{0,6}",
            a2 in "[a:{}%]{0,6}", e2 in "[a:{}%]{0,6}",
        ) {
            let k = Keys::default();
            let same = a1 == a2 && e1 == e2;
            prop_assert_eq!(k.in_flight(&a1, &e1) == k.in_flight(&a2, &e2), same);
            prop_assert_eq!(
                k.window(&a1, &e1, 60, "u", 1) == k.window(&a2, &e2, 60, "u", 1),
                same
            );
        }
    }
}
