//! The Redis key format: the only place that builds counter-store keys.
//!
//! Every key of one account carries the account's hash tag, so the scripts
//! that touch an (account, endpoint)'s counters and the account's credit
//! wallet at once all run on one Redis Cluster slot:
//!
//! ```text
//! <prefix>{<account>}:<endpoint>:w:<window>:<unit>:<window_index>   window counter (string)
//!     (<window>: a fixed window's seconds, `60`, or a calendar period, `1d`, `1w`, `1mo`, `1mo@15`)
//! <prefix>{<account>}:<endpoint>:k:<key>:w:<window>:<unit>:<window_index>
//!                                                  an API key's own window counter (string)
//! <prefix>{<account>}:<endpoint>:f                                  in-flight set (zset)
//! <prefix>{<account>}/w        credit wallet (hash: block id -> remaining:expiry:order, `#v` version)
//! <prefix>{<account>}/o        credit outbox (stream), written to the catalog and trimmed
//! <prefix>{<account>}/a        credit admissions not yet ended (hash: request id -> instance|draws|endpoint)
//! <prefix>{<account>}/v        the newest catalog credit version seen (string)
//! ```
//!
//! The endpoint keys continue the tag with `:`, the account keys with `/`,
//! which an escaped endpoint id never starts with, so the two never meet.
//! After the (escaped, colon-free) endpoint comes `:w:` (an account
//! counter), `:k:` (a key's counter, the escaped key id, then `:w:` as
//! for the account) or `:f`: none is a prefix of another. A key's
//! counters carry its account's tag, so they sit on the account's slot
//! and one script admits against both.
//!
//! Account ids, endpoint ids and unit names are arbitrary UTF-8 and may
//! contain `{`, `}` and `:`. They are percent-escaped (`%`, `{`, `}`, `:`)
//! so that the tag cannot be closed early, two different (account,
//! endpoint) pairs can never produce the same key, and no id can forge
//! another key's suffix. The prefix (configurable, default `pg:`) has its
//! braces escaped too, so it can never open a tag of its own.

use std::fmt::Write as _;

use crate::plans::WindowLen;

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

    /// The hash tag shared by every key of an account, braces included.
    pub fn tag(account: &str) -> String {
        let mut t = String::with_capacity(account.len() + 2);
        t.push('{');
        escape_account(&mut t, account);
        t.push('}');
        t
    }

    /// The account's credit wallet.
    pub fn wallet(&self, account: &str) -> String {
        self.account_key(account, "/w")
    }

    /// The account's credit outbox.
    pub fn outbox(&self, account: &str) -> String {
        self.account_key(account, "/o")
    }

    /// The account's credit admissions not yet ended (hash: request id ->
    /// instance|draws|endpoint).
    pub fn admissions(&self, account: &str) -> String {
        self.account_key(account, "/a")
    }

    /// How many outbox batches of the account were acknowledged (a wallet
    /// load refuses a snapshot read before one).
    pub fn outbox_acks(&self, account: &str) -> String {
        self.account_key(account, "/k")
    }

    /// The newest credit version the store has seen for the account.
    pub fn wallet_version(&self, account: &str) -> String {
        self.account_key(account, "/v")
    }

    /// The liveness key of a gateway instance (not account-tagged).
    pub fn instance(&self, instance: &str) -> String {
        format!("{}gw:{instance}", self.prefix)
    }

    /// A `SCAN MATCH` pattern for every wallet under this prefix.
    pub fn wallet_pattern(&self) -> String {
        let mut p = self.scan_pattern();
        p.pop();
        p.push_str("{*}/w");
        p
    }

    /// The account of a wallet key, if it is one under this prefix.
    pub fn wallet_account(&self, key: &str) -> Option<String> {
        let inner = key
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix('{')?
            .strip_suffix("}/w")?;
        unescape(inner)
    }

    /// A `SCAN MATCH` pattern for every outbox under this prefix.
    pub fn outbox_pattern(&self) -> String {
        let mut p = self.scan_pattern();
        p.pop();
        p.push_str("{*}/o");
        p
    }

    /// The account of an outbox key, if it is one under this prefix.
    pub fn outbox_account(&self, key: &str) -> Option<String> {
        let inner = key
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix('{')?
            .strip_suffix("}/o")?;
        unescape(inner)
    }

    fn account_key(&self, account: &str, suffix: &str) -> String {
        let mut k = String::with_capacity(self.prefix.len() + account.len() + 2 + suffix.len());
        k.push_str(&self.prefix);
        k.push('{');
        escape_account(&mut k, account);
        k.push('}');
        k.push_str(suffix);
        k
    }

    /// The counter of window `index` of length `len` on `unit`. The
    /// window token is the seconds of a fixed window (`60`) or the period
    /// of a calendar window (`1d`, `1w`, `1mo`, a billing month from the
    /// 15th `1mo@15`): never the same, so a calendar window never shares a
    /// counter with a fixed one, nor a billing month with another anchor's.
    pub fn window(
        &self,
        account: &str,
        endpoint: &str,
        len: WindowLen,
        unit: &str,
        index: u64,
    ) -> String {
        let k = self.base(account, endpoint);
        window_into(k, len, unit, index)
    }

    /// The counter of an API key's own window (a key with a plan of its
    /// own): like [`Keys::window`], under the key's id, with its account's
    /// hash tag.
    pub fn key_window(
        &self,
        account: &str,
        key_id: &str,
        endpoint: &str,
        len: WindowLen,
        unit: &str,
        index: u64,
    ) -> String {
        // Room for the key's part too: a reallocation per key would cost
        // more than the rest of the key's building.
        let mut k = self.base_with(account, endpoint, key_id.len() + 3);
        k.push_str(":k:");
        escape_into(&mut k, key_id);
        window_into(k, len, unit, index)
    }

    /// The counter of `window` for the account, or for `key` when it is
    /// one of the key's windows.
    pub fn scoped_window(
        &self,
        account: &str,
        key: Option<&str>,
        endpoint: &str,
        len: WindowLen,
        unit: &str,
        index: u64,
    ) -> String {
        match key {
            None => self.window(account, endpoint, len, unit, index),
            Some(key) => self.key_window(account, key, endpoint, len, unit, index),
        }
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
        self.base_with(account, endpoint, 0)
    }

    /// [`Keys::base`] with room for `extra` more bytes than a window's
    /// suffix.
    fn base_with(&self, account: &str, endpoint: &str, extra: usize) -> String {
        // Built in place (no intermediate tag string): this runs for every
        // key of every attempt and end.
        let mut k =
            String::with_capacity(self.prefix.len() + account.len() + endpoint.len() + 40 + extra);
        k.push_str(&self.prefix);
        k.push('{');
        escape_account(&mut k, account);
        k.push_str("}:");
        escape_into(&mut k, endpoint);
        k
    }
}

/// `base` (an endpoint's key, or a key's under it) continued with the
/// window: `:w:<window>:<unit>:<index>`.
fn window_into(mut k: String, len: WindowLen, unit: &str, index: u64) -> String {
    match len {
        WindowLen::Fixed(secs) => {
            let _ = write!(k, ":w:{secs}:");
        }
        // `1d`, `1w`, `1mo`, `1mo@15`.
        calendar @ WindowLen::Calendar(_) => {
            let _ = write!(k, ":w:{calendar}:");
        }
    }
    escape_into(&mut k, unit);
    let _ = write!(k, ":{index}");
    k
}

/// An account id as the hash tag holds it: escaped, and the empty id as
/// `%00` (which escaping never writes), since Redis Cluster hashes a key
/// with an empty tag whole — the account's keys would land on different
/// slots.
fn escape_account(out: &mut String, account: &str) {
    if account.is_empty() {
        out.push_str("%00");
    } else {
        escape_into(out, account);
    }
}

/// The inverse of [`escape_account`]; `None` for anything it does not write.
fn unescape(s: &str) -> Option<String> {
    if s == "%00" {
        return Some(String::new());
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 3)?;
        out.push(match code {
            "25" => '%',
            "7B" => '{',
            "7D" => '}',
            "3A" => ':',
            _ => return None,
        });
        rest = &rest[i + 3..];
    }
    if rest.contains(['{', '}', ':']) {
        return None;
    }
    out.push_str(rest);
    Some(out)
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
    use crate::plans::Period;
    use proptest::prelude::*;

    #[test]
    fn key_shapes() {
        let k = Keys::default();
        assert_eq!(
            k.window("acct", "gpt-4o", WindowLen::Fixed(60), "request", 7),
            "pg:{acct}:gpt-4o:w:60:request:7"
        );
        // Calendar windows: the period instead of the seconds.
        for (period, token) in [
            (Period::Day, "1d"),
            (Period::Week, "1w"),
            (Period::Month, "1mo"),
            (Period::MonthFrom(15), "1mo@15"),
        ] {
            assert_eq!(
                k.window(
                    "acct",
                    "gpt-4o",
                    WindowLen::Calendar(period),
                    "token",
                    24_339
                ),
                format!("pg:{{acct}}:gpt-4o:w:{token}:token:24339")
            );
        }
        assert_eq!(k.in_flight("acct", "gpt-4o"), "pg:{acct}:gpt-4o:f");
        assert_eq!(
            k.key_window(
                "acct",
                "key_1",
                "gpt-4o",
                WindowLen::Fixed(60),
                "request",
                7
            ),
            "pg:{acct}:gpt-4o:k:key_1:w:60:request:7"
        );
        assert_eq!(
            k.key_window("acct", "k:w:60", "e", WindowLen::Fixed(60), "u", 7),
            "pg:{acct}:e:k:k%3Aw%3A60:w:60:u:7"
        );
        assert_eq!(k.wallet("acct"), "pg:{acct}/w");
        assert_eq!(k.outbox("acct"), "pg:{acct}/o");
        assert_eq!(k.wallet_version("acct"), "pg:{acct}/v");
        assert_eq!(k.outbox_pattern(), "pg:{*}/o");
        assert_eq!(k.outbox_account("pg:{a%3Ab%7D}/o").as_deref(), Some("a:b}"));
        assert_eq!(k.outbox_account("pg:{a}/w"), None);
        assert_eq!(k.outbox_account("pg:{a:b}/o"), None);
    }

    #[test]
    fn hostile_ids_are_escaped() {
        let k = Keys::new("t:");
        let cases = [
            ("a}b", "e", "t:{a%7Db}:e:f"),
            ("a{b", "e", "t:{a%7Bb}:e:f"),
            ("a:b", "e", "t:{a%3Ab}:e:f"),
            ("a", "b:e", "t:{a}:b%3Ae:f"),
            ("100%", "e", "t:{100%25}:e:f"),
            ("", "", "t:{%00}::f"),
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
        assert_eq!(key, "x%7By%7D:{a}:e:f");
        assert_eq!(cluster_hash_part(&key), "a");
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
            let tag = Keys::tag(&account);
            let inner = &tag[1..tag.len() - 1];
            let w = k.window(&account, &endpoint, WindowLen::Fixed(secs), &unit, index);
            let m = k.window(&account, &endpoint, WindowLen::Calendar(Period::Month), &unit, index);
            prop_assert_eq!(cluster_hash_part(&m), inner);
            let f = k.in_flight(&account, &endpoint);
            prop_assert_eq!(cluster_hash_part(&w), inner);
            prop_assert_eq!(cluster_hash_part(&f), inner);
            let kw = k.key_window(&account, &unit, &endpoint, WindowLen::Fixed(secs), &unit, index);
            prop_assert_eq!(cluster_hash_part(&kw), inner);
            let (wallet, outbox) = (k.wallet(&account), k.outbox(&account));
            prop_assert_eq!(cluster_hash_part(&wallet), inner);
            prop_assert_eq!(cluster_hash_part(&outbox), inner);
            prop_assert_eq!(k.outbox_account(&k.outbox(&account)), Some(account.clone()));
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
                k.window(&a1, &e1, WindowLen::Fixed(60), "u", 1)
                    == k.window(&a2, &e2, WindowLen::Fixed(60), "u", 1),
                same
            );
        }

        /// A key's counter never is an account's, nor another key's, nor
        /// another endpoint's, whatever the ids hold.
        #[test]
        fn key_counters_never_meet_account_counters(
            a in "[a:{}%]{0,4}", e1 in "[a:{}%kw]{0,5}", e2 in "[a:{}%kw]{0,5}",
            k1 in "[a:{}%kw0-9]{0,5}", k2 in "[a:{}%kw0-9]{0,5}",
            u1 in "[a:%]{0,3}", u2 in "[a:%]{0,3}",
        ) {
            let k = Keys::default();
            let len = WindowLen::Fixed(60);
            let key1 = k.key_window(&a, &k1, &e1, len, &u1, 1);
            prop_assert_ne!(&key1, &k.window(&a, &e2, len, &u2, 1));
            prop_assert_ne!(&key1, &k.in_flight(&a, &e2));
            let same = e1 == e2 && k1 == k2 && u1 == u2;
            prop_assert_eq!(key1 == k.key_window(&a, &k2, &e2, len, &u2, 1), same);
        }

        /// A calendar window never shares a counter with a fixed one, nor
        /// with another period, whatever the lengths and indexes.
        #[test]
        fn calendar_and_fixed_windows_never_share_a_key(
            secs in 1u64..=crate::plans::MAX_WINDOW_SECS,
            i1 in any::<u64>(),
            i2 in any::<u64>(),
            unit in "[a-z:%]{1,6}",
        ) {
            let k = Keys::default();
            let lens = [
                WindowLen::Fixed(secs),
                WindowLen::Calendar(Period::Day),
                WindowLen::Calendar(Period::Week),
                WindowLen::Calendar(Period::Month),
                WindowLen::Calendar(Period::MonthFrom(15)),
                WindowLen::Calendar(Period::MonthFrom(31)),
            ];
            for (a, la) in lens.iter().enumerate() {
                for (b, lb) in lens.iter().enumerate() {
                    let same = a == b && i1 == i2;
                    prop_assert_eq!(
                        k.window("a", "e", *la, &unit, i1) == k.window("a", "e", *lb, &unit, i2),
                        same
                    );
                }
            }
        }
    }
}
