//! Query strings of the usage read-outs (`GET /admin/usage`,
//! `GET /admin/usage/events` on the admin listener, `GET /v1/usage` on the
//! main one): percent-decoded, every parameter known and given once, each
//! value checked, and every refusal a 400 naming its parameter
//! ([`ApiError::InvalidParameter`]).
//!
//! Unknown parameters are refused rather than ignored: a misspelt
//! `acount=` would otherwise silently read every account's usage.

use std::time::SystemTime;

use crate::catalog::usage::parse_time;
use crate::catalog::{GroupBy, UsageCursor, UsageQuery};
use crate::errors::ApiError;

/// A checked query string: each allowed parameter at most once.
#[derive(Debug, Default)]
pub struct Params {
    pairs: Vec<(String, String)>,
}

/// Decode `%XX` escapes (ids may contain any UTF-8). `+` stays `+` (it is
/// not a space here: RFC 3339 offsets and ids may contain it); a `%` not
/// followed by two hex digits stays as it is.
pub fn percent_decode_bytes(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// [`percent_decode_bytes`], invalid UTF-8 replaced (for path segments).
pub fn percent_decode(s: &str) -> String {
    String::from_utf8_lossy(&percent_decode_bytes(s)).into_owned()
}

/// Parse `query` (without `?`), allowing only the parameters in `allowed`.
pub fn parse(query: Option<&str>, allowed: &[&str]) -> Result<Params, ApiError> {
    let mut params = Params::default();
    for piece in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = piece.split_once('=').unwrap_or((piece, ""));
        let name = String::from_utf8_lossy(&percent_decode_bytes(name)).into_owned();
        if !allowed.contains(&name.as_str()) {
            let shown: String = name.chars().take(64).collect();
            return Err(ApiError::invalid_parameter(
                shown.clone(),
                format!(
                    "unknown query parameter `{}` (known: {})",
                    shown.escape_debug(),
                    allowed.join(", ")
                ),
            ));
        }
        let bad = |m: &str| ApiError::invalid_parameter(name.clone(), format!("{name}: {m}"));
        let value = String::from_utf8(percent_decode_bytes(value))
            .map_err(|_| bad("must be UTF-8 (percent-encoded)"))?;
        if value.is_empty() {
            return Err(bad("must not be empty"));
        }
        if value.chars().any(char::is_control) {
            return Err(bad("must not contain control characters"));
        }
        if params.get(&name).is_some() {
            return Err(bad("given more than once"));
        }
        params.pairs.push((name, value));
    }
    Ok(params)
}

impl Params {
    /// The value of `name`, if given.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// An RFC 3339 time (or a date) in `name`.
    pub fn time(&self, name: &str) -> Result<Option<SystemTime>, ApiError> {
        self.get(name)
            .map(|v| {
                parse_time(v).map_err(|e| ApiError::invalid_parameter(name, format!("{name}: {e}")))
            })
            .transpose()
    }

    /// The filters `since`, `until` and `endpoint` (those given), for
    /// `account` (None: every account).
    pub fn usage_query(&self, account: Option<String>) -> Result<UsageQuery, ApiError> {
        let since = self.time("since")?;
        let until = self.time("until")?;
        if let (Some(s), Some(u)) = (since, until) {
            if u < s {
                return Err(ApiError::invalid_parameter(
                    "until",
                    "until: must not be before since",
                ));
            }
        }
        Ok(UsageQuery {
            account_id: account,
            since,
            until,
            endpoint: self.get("endpoint").map(str::to_owned),
        })
    }

    /// `group_by`: `hour`, `day` or `endpoint`; `default` when absent.
    pub fn group_by(&self, default: GroupBy) -> Result<GroupBy, ApiError> {
        match self.get("group_by") {
            None => Ok(default),
            Some(v) => GroupBy::parse(v).ok_or_else(|| {
                ApiError::invalid_parameter(
                    "group_by",
                    format!(
                        "group_by: `{}` is not one of hour, day, endpoint",
                        v.escape_debug()
                    ),
                )
            }),
        }
    }

    /// `limit`: 1 to `max`, `default` when absent.
    pub fn limit(&self, default: usize, max: usize) -> Result<usize, ApiError> {
        let Some(v) = self.get("limit") else {
            return Ok(default);
        };
        match v.parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(ApiError::invalid_parameter(
                "limit",
                format!(
                    "limit: `{}` is not a number from 1 to {max}",
                    v.escape_debug()
                ),
            )),
        }
    }

    /// `cursor`: a `next_cursor` an earlier page returned.
    pub fn cursor(&self) -> Result<Option<UsageCursor>, ApiError> {
        self.get("cursor")
            .map(|v| {
                UsageCursor::decode(v)
                    .map_err(|e| ApiError::invalid_parameter("cursor", format!("cursor: {e}")))
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param_of(r: Result<Params, ApiError>) -> String {
        r.unwrap_err().param().unwrap_or("").to_owned()
    }

    #[test]
    fn decoding() {
        assert_eq!(percent_decode("a%20b%2Fc"), "a b/c");
        assert_eq!(
            percent_decode("2027-01-14T10:00:00+00:00"),
            "2027-01-14T10:00:00+00:00"
        );
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("x%41"), "xA");
        assert_eq!(percent_decode("%C3%A9"), "é");
    }

    #[test]
    fn parameters_are_known_given_once_and_checked() {
        let allowed = &["account", "since", "group_by", "limit", "cursor"];
        let p = parse(
            Some("account=a%20b&since=2027-01-14&&group_by=day"),
            allowed,
        )
        .unwrap();
        assert_eq!(p.get("account"), Some("a b"));
        assert_eq!(p.group_by(GroupBy::Hour).unwrap(), GroupBy::Day);
        assert!(p.time("since").unwrap().is_some());
        assert_eq!(p.limit(100, 1000).unwrap(), 100);
        assert!(parse(None, allowed).unwrap().get("account").is_none());

        assert_eq!(param_of(parse(Some("acount=a"), allowed)), "acount");
        assert_eq!(
            param_of(parse(Some("account=a&account=b"), allowed)),
            "account"
        );
        assert_eq!(param_of(parse(Some("account="), allowed)), "account");
        assert_eq!(param_of(parse(Some("account=a%00b"), allowed)), "account");
        assert_eq!(param_of(parse(Some("account=%FF"), allowed)), "account");

        let err = |q: &str, f: fn(&Params) -> Result<(), ApiError>| {
            f(&parse(Some(q), allowed).unwrap())
                .unwrap_err()
                .param()
                .unwrap()
                .to_owned()
        };
        assert_eq!(
            err("group_by=week", |p| p.group_by(GroupBy::Day).map(drop)),
            "group_by"
        );
        assert_eq!(err("limit=0", |p| p.limit(100, 1000).map(drop)), "limit");
        assert_eq!(err("limit=1001", |p| p.limit(100, 1000).map(drop)), "limit");
        assert_eq!(err("limit=-1", |p| p.limit(100, 1000).map(drop)), "limit");
        assert_eq!(err("cursor=xyz", |p| p.cursor().map(drop)), "cursor");
        assert_eq!(
            err("since=yesterday", |p| p.usage_query(None).map(drop)),
            "since"
        );
        let p = parse(Some("limit=1000"), allowed).unwrap();
        assert_eq!(p.limit(100, 1000).unwrap(), 1000);
        let until_first = parse(Some("since=2027-01-14"), &["since", "until"]).unwrap();
        assert!(until_first.usage_query(None).is_ok());
        let reversed = parse(
            Some("since=2027-01-14&until=2027-01-13"),
            &["since", "until"],
        )
        .unwrap();
        assert_eq!(
            reversed.usage_query(None).unwrap_err().param(),
            Some("until")
        );
    }
}
