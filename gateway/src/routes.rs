//! Path (+ model) → endpoint and upstream: pure lookup, no I/O.
//!
//! Matching rules: an exact route beats any prefix route; among prefixes the
//! longest wins; among equal routes the first in the config wins. The query
//! string is not part of the path.
//!
//! ```
//! use plangate::config::{EndpointSource, Route, RoutePath};
//! use plangate::routes::Router;
//! let route = |path| Route {
//!     path,
//!     upstream: 0,
//!     endpoint: EndpointSource::Model,
//!     auth_headers: vec![],
//!     usage: vec![],
//!     reserve: vec![],
//!     inject_include_usage: true,
//!     cap: None,
//! };
//! let router = Router::new(&[
//!     route(RoutePath::Prefix("/v1/".into())),
//!     route(RoutePath::Exact("/v1/chat/completions".into())),
//! ]);
//! assert_eq!(router.match_path("/v1/chat/completions?x=1").map(|m| m.0), Some(1));
//! assert_eq!(router.match_path("/v1/embeddings").map(|m| m.0), Some(0));
//! assert!(router.match_path("/v2/x").is_none());
//! ```

use std::borrow::Cow;
use std::collections::HashMap;

use crate::config::{EndpointSource, Route, RoutePath, ValueSource};
use crate::usage::{request_model, ModelError};

/// The routes of one config, indexed for lookup. Cheap to share behind an
/// `Arc` / `ArcSwap` and rebuilt on reload.
#[derive(Debug, Clone, Default)]
pub struct Router {
    routes: Vec<Route>,
    /// Exact path → index of the first route with it.
    exact: HashMap<String, usize>,
    /// (prefix, index), longest prefix first, config order among equals.
    prefixes: Vec<(String, usize)>,
}

impl Router {
    /// Index `routes` (kept in config order; indices refer to it).
    pub fn new(routes: &[Route]) -> Self {
        let mut exact = HashMap::new();
        let mut prefixes = Vec::new();
        for (i, r) in routes.iter().enumerate() {
            match &r.path {
                RoutePath::Exact(p) => {
                    exact.entry(p.clone()).or_insert(i);
                }
                RoutePath::Prefix(p) => prefixes.push((normalize_prefix(p).to_owned(), i)),
            }
        }
        // Stable sort: equal lengths keep config order, so the first wins.
        prefixes.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        Self {
            routes: routes.to_vec(),
            exact,
            prefixes,
        }
    }

    /// The route for a request path (a query string is ignored), with its
    /// index in the config's route list.
    pub fn match_path(&self, path: &str) -> Option<(usize, &Route)> {
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        let index = match self.exact.get(path) {
            Some(&i) => i,
            None => self
                .prefixes
                .iter()
                .find(|(prefix, _)| path.starts_with(prefix.as_str()))
                .map(|&(_, i)| i)?,
        };
        self.routes.get(index).map(|r| (index, r))
    }

    /// Every route, in config order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

/// `"/v1/*"` (the file form) and `"/v1/"` both mean "starts with `/v1/`".
fn normalize_prefix(p: &str) -> &str {
    p.strip_suffix('*').unwrap_or(p)
}

/// Whether handling a request on `route` needs its JSON body before it is
/// forwarded: for `{model}` routing, a reservation read from the body, or
/// a body-measured route (a streaming request's `include_usage`).
pub fn needs_request_body(route: &Route) -> bool {
    matches!(route.endpoint, EndpointSource::Model)
        || any_body_source(&route.reserve)
        || meters_body(route)
}

/// Whether `route` measures units from the response body.
pub fn meters_body(route: &Route) -> bool {
    any_body_source(&route.usage)
}

fn any_body_source(sources: &[(crate::plans::Unit, Vec<ValueSource>)]) -> bool {
    sources
        .iter()
        .any(|(_, s)| s.iter().any(ValueSource::reads_body))
}

/// The endpoint id of a request on `route`: the literal, or the `model` of
/// the JSON body (`body` is `None` when it was not read).
pub fn endpoint_id<'r>(route: &'r Route, body: Option<&[u8]>) -> Result<Cow<'r, str>, ModelError> {
    match &route.endpoint {
        EndpointSource::Literal(id) => Ok(Cow::Borrowed(id)),
        EndpointSource::Model => request_model(body.unwrap_or_default()).map(Cow::Owned),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plans::Unit;
    use proptest::prelude::*;

    fn route(path: RoutePath, upstream: usize) -> Route {
        Route {
            path,
            upstream,
            endpoint: EndpointSource::Literal(format!("e{upstream}")),
            auth_headers: vec![],
            usage: vec![],
            reserve: vec![],
            inject_include_usage: true,
            cap: None,
        }
    }

    fn exact(p: &str, up: usize) -> Route {
        route(RoutePath::Exact(p.into()), up)
    }

    fn prefix(p: &str, up: usize) -> Route {
        route(RoutePath::Prefix(p.into()), up)
    }

    #[test]
    fn matching_rules() {
        let router = Router::new(&[
            prefix("/v1/*", 0),
            exact("/v1/chat/completions", 1),
            prefix("/v1/images/", 2),
            exact("/v1/chat/completions", 3), // duplicate: the first wins
            prefix("/v1/images/", 4),         // duplicate: the first wins
            prefix("/", 5),
            exact("/healthz-like", 6),
        ]);
        let cases: &[(&str, Option<usize>)] = &[
            ("/v1/chat/completions", Some(1)),
            ("/v1/chat/completions?stream=true", Some(1)),
            ("/v1/chat/completions/", Some(0)),
            ("/v1/chat/completionsX", Some(0)),
            ("/v1/images/generations", Some(2)),
            ("/v1/images/", Some(2)),
            ("/v1/images", Some(0)),
            ("/v1/", Some(0)),
            ("/v1", Some(5)),
            ("/v2/anything", Some(5)),
            ("/healthz-like", Some(6)),
            ("/healthz-like?x", Some(6)),
            ("?only=query", None),
            ("", None),
        ];
        for &(path, want) in cases {
            let got = router.match_path(path).map(|(i, _)| i);
            assert_eq!(got, want, "{path:?}");
            if let Some((i, r)) = router.match_path(path) {
                assert_eq!(&router.routes()[i], r);
            }
        }
    }

    #[test]
    fn no_routes_no_match() {
        assert!(Router::new(&[]).match_path("/v1/x").is_none());
        assert!(Router::default().match_path("/").is_none());
    }

    #[test]
    fn exact_does_not_match_a_longer_path() {
        let router = Router::new(&[exact("/v1/embeddings", 0)]);
        assert!(router.match_path("/v1/embeddings/x").is_none());
        assert!(router.match_path("/v1/embedding").is_none());
    }

    #[test]
    fn endpoints_and_body_needs() {
        let lit = route(RoutePath::Exact("/a".into()), 0);
        assert!(!needs_request_body(&lit));
        assert_eq!(endpoint_id(&lit, None).unwrap(), "e0");

        let model = Route {
            endpoint: EndpointSource::Model,
            ..lit.clone()
        };
        assert!(needs_request_body(&model));
        assert_eq!(
            endpoint_id(&model, Some(br#"{"model":"gpt-4o"}"#)).unwrap(),
            "gpt-4o"
        );
        assert_eq!(endpoint_id(&model, None), Err(ModelError::NotJson));
        assert_eq!(endpoint_id(&model, Some(b"{}")), Err(ModelError::NoModel));

        let reserve = Route {
            reserve: vec![(
                Unit::new("token"),
                vec![ValueSource::Body(vec!["max_tokens".into()])],
            )],
            ..lit
        };
        assert!(needs_request_body(&reserve));
    }

    proptest! {
        /// The router agrees with a brute-force reading of the rules.
        #[test]
        fn agrees_with_brute_force(
            specs in prop::collection::vec((any::<bool>(), "/[ab/]{0,5}"), 0..8),
            path in "/[ab/]{0,7}(\\?[ab]{0,3})?",
        ) {
            let routes: Vec<Route> = specs
                .iter()
                .enumerate()
                .map(|(i, (is_exact, p))| if *is_exact { exact(p, i) } else { prefix(p, i) })
                .collect();
            let router = Router::new(&routes);
            let bare = path.split('?').next().unwrap();
            let want = routes
                .iter()
                .position(|r| r.path == RoutePath::Exact(bare.to_owned()))
                .or_else(|| {
                    let mut best: Option<(usize, usize)> = None;
                    for (i, r) in routes.iter().enumerate() {
                        if let RoutePath::Prefix(p) = &r.path {
                            if bare.starts_with(p.as_str()) && best.map_or(true, |(len, _)| p.len() > len) {
                                best = Some((p.len(), i));
                            }
                        }
                    }
                    best.map(|(_, i)| i)
                });
            prop_assert_eq!(router.match_path(&path).map(|(i, _)| i), want);
        }
    }
}
