use std::path::Path;
use std::time::Duration;

use proptest::prelude::*;

use super::*;

fn env(name: &str) -> Option<String> {
    match name {
        "TOKEN" => Some("s3cret".into()),
        "EMPTY" => Some(String::new()),
        "PORT" => Some("8000".into()),
        _ => None,
    }
}

fn load(text: &str) -> Result<Config, ConfigErrors> {
    Config::from_toml(text, Path::new("conf/plangate.toml"), &env)
}

fn errors(text: &str) -> Vec<String> {
    match load(text) {
        Ok(c) => panic!("expected errors, loaded {c:?}"),
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    }
}

const MINIMAL: &str = "[plans]\nfile = \"plans.yaml\"\n";

#[test]
fn durations() {
    let ok = [
        ("500ms", 500),
        ("60s", 60_000),
        ("5m", 300_000),
        ("1h", 3_600_000),
        ("1d", 86_400_000),
        ("86_400s", 86_400_000),
        ("1h30m", 5_400_000),
        (" 2s ", 2_000),
        ("0s", 0),
    ];
    for (s, ms) in ok {
        assert_eq!(parse_duration(s), Ok(Duration::from_millis(ms)), "{s}");
    }
    for s in [
        "",
        "60",
        "s",
        "1.5s",
        "5 min",
        "1x",
        "-1s",
        "99999999999999999999d",
        "1h30",
    ] {
        assert!(parse_duration(s).is_err(), "{s} should fail");
    }
}

#[test]
fn sizes() {
    let ok = [
        ("512", 512),
        ("1KiB", 1024),
        ("10MiB", 10 << 20),
        ("1GB", 1_000_000_000),
        ("1gib", 1 << 30),
        ("64 KB", 64_000),
        ("1_000B", 1000),
    ];
    for (s, n) in ok {
        assert_eq!(parse_size(s), Ok(n), "{s}");
    }
    for s in ["", "MiB", "1.5MiB", "10XB", "-1", "99999999999999999999TiB"] {
        assert!(parse_size(s).is_err(), "{s} should fail");
    }
}

#[test]
fn env_substitution() {
    assert_eq!(substitute_env("a${TOKEN}b", &env).unwrap(), "as3cretb");
    assert_eq!(
        substitute_env("${TOKEN}:${PORT}", &env).unwrap(),
        "s3cret:8000"
    );
    assert_eq!(substitute_env("$${TOKEN} $5", &env).unwrap(), "${TOKEN} $5");
    assert_eq!(
        substitute_env("x${NOPE}", &env).unwrap_err(),
        "environment variable `NOPE` is not set"
    );
    assert!(substitute_env("${TOKEN", &env).is_err());
    assert!(substitute_env("${1A}", &env).is_err());
    assert!(substitute_env("${}", &env).is_err());
}

#[test]
fn value_sources() {
    assert_eq!(
        parse_value_source("header:X-Total-Tokens").unwrap(),
        ValueSource::Header(HeaderName::from_static("x-total-tokens"))
    );
    assert_eq!(
        parse_value_source("body:usage.total_tokens").unwrap(),
        ValueSource::Body(vec!["usage".into(), "total_tokens".into()])
    );
    for s in [
        "body:",
        "body:a..b",
        "header:",
        "header:bad header",
        "usage.total_tokens",
    ] {
        assert!(parse_value_source(s).is_err(), "{s} should fail");
    }
}

#[test]
fn minimal_file_gets_defaults() {
    let c = load(MINIMAL).unwrap();
    assert_eq!(c.server.listen, "0.0.0.0:8080".parse().unwrap());
    assert_eq!(c.server.max_request_body, 10 << 20);
    assert_eq!(c.server.request_timeout, Duration::from_secs(600));
    assert_eq!(c.server.header_read_timeout, Duration::from_secs(10));
    assert_eq!(c.server.tls, None);
    assert_eq!(c.admin, None);
    assert_eq!(c.storage.store_timeout, Duration::from_millis(50));
    assert_eq!(c.storage.catalog_timeout, Duration::from_secs(2));
    assert_eq!(c.storage.on_store_error, OnStoreError::Open);
    assert!(!c.storage.require_at_start);
    assert_eq!(c.storage.postgres_url, None);
    assert_eq!(c.auth.header, "authorization");
    assert!(c.log.access, "the access log is on by default");
    assert_eq!(c.plans.file.as_deref(), Some(Path::new("conf/plans.yaml")));
    assert!(c.plans.watch);
    assert_eq!(c.usage.retain, Duration::from_secs(400 * 86_400));
    assert!(c.upstreams.is_empty() && c.routes.is_empty());
}

#[test]
fn usage_recording_is_on_unless_turned_off() {
    let record = |extra: &str| load(&format!("{MINIMAL}{extra}")).map(|c| c.usage.record);
    assert_eq!(record(""), Ok(true));
    assert_eq!(record("[usage]\nrecord = true\n"), Ok(true));
    assert_eq!(record("[usage]\nrecord = false\n"), Ok(false));
    assert!(record("[usage]\nrecord = \"no\"\n").is_err());
}

#[test]
fn usage_retention() {
    let retain =
        |v: &str| load(&format!("{MINIMAL}[usage]\nretain = \"{v}\"\n")).map(|c| c.usage.retain);
    assert_eq!(retain("400d"), Ok(Duration::from_secs(400 * 86_400)));
    assert_eq!(retain("1h"), Ok(Duration::from_secs(3_600)));
    assert_eq!(
        retain("90d12h"),
        Ok(Duration::from_secs(90 * 86_400 + 12 * 3_600))
    );
    assert_eq!(
        load(&format!("{MINIMAL}[usage]\n")).unwrap().usage.retain,
        Duration::from_secs(400 * 86_400)
    );
    let f = "conf/plangate.toml";
    assert_eq!(
        errors(&format!(
            "{MINIMAL}[usage]\nretain = \"59m\"\n[usage.extra]\n"
        )),
        vec![format!(
            "{f}:5:8: usage.extra: unknown field `extra`, expected `retain` or `record`"
        )]
    );
    for (v, want) in [
        (
            "59m",
            "`59m` is too short: usage is kept at least 1h (pruning runs hourly)",
        ),
        (
            "36501d",
            "`36501d` is too long: must be at most 3153600000s (100 years)",
        ),
        (
            "forever",
            "`forever` is not a duration such as \"500ms\", \"60s\", \"5m\", \"1h\", \"1d\"",
        ),
        ("${NOPE}", "environment variable `NOPE` is not set"),
    ] {
        assert_eq!(
            errors(&format!("{MINIMAL}[usage]\nretain = \"{v}\"\n")),
            vec![format!("{f}:4:10: usage.retain: {want}")],
            "{v}"
        );
    }
}

#[test]
fn full_file_loads() {
    let text = r#"
[server]
listen = "127.0.0.1:8081"
tls_cert = "tls/server.pem"
tls_key = "/abs/server.key"
max_request_body = "1KiB"
request_timeout = "30s"
header_read_timeout = "2s"

[admin]
listen = "127.0.0.1:9091"
token = "${TOKEN}"

[storage]
postgres_url = "postgres://postgres@127.0.0.1:5432/plangate"
redis_url = "redis://127.0.0.1:6379"
store_timeout = "100ms"
catalog_timeout = "750ms"
on_store_error = "closed"

[auth]
header = "X-API-Key"

[plans]
file = "plans.yaml"
watch = false

[log]
access = false

[[upstreams]]
name = "vllm"
url = "http://127.0.0.1:${PORT}/base"
auth = "Bearer ${TOKEN}"
auth_header = "X-Upstream-Key"
ca_file = "ca.pem"

[[routes]]
path = "/v1/chat/completions"
upstream = "vllm"
endpoint = "{model}"
usage.token = ["header:x-total-tokens", "body:usage.total_tokens"]
reserve.token = "body:max_tokens"

[[routes]]
path = "/v1/*"
upstream = "vllm"
endpoint = "other"
auth_header = ["X-Client-Key", "authorization"]
usage.image = "body:data.length"
"#;
    let c = load(text).unwrap();
    assert!(!c.log.access);
    assert_eq!(c.upstreams[0].auth_header, "x-upstream-key");
    assert!(c.routes[0].auth_headers.is_empty());
    assert_eq!(
        c.routes[1].auth_headers,
        [
            HeaderName::from_static("x-client-key"),
            HeaderName::from_static("authorization")
        ]
    );
    assert_eq!(
        c.server.tls,
        Some(TlsFiles {
            cert: "conf/tls/server.pem".into(),
            key: "/abs/server.key".into()
        })
    );
    assert_eq!(c.server.max_request_body, 1024);
    assert_eq!(
        c.admin,
        Some(AdminConfig {
            listen: "127.0.0.1:9091".parse().unwrap(),
            token: "s3cret".into(),
            metrics_token: None,
            tls: None,
            console: true,
            console_session_ttl: Duration::from_secs(8 * 3600),
        })
    );
    assert_eq!(c.storage.on_store_error, OnStoreError::Closed);
    assert_eq!(c.storage.store_timeout, Duration::from_millis(100));
    assert_eq!(c.storage.catalog_timeout, Duration::from_millis(750));
    assert_eq!(c.auth.header, "x-api-key");
    assert!(!c.plans.watch);
    let u = &c.upstreams[0];
    assert_eq!(u.url, "http://127.0.0.1:8000/base");
    assert_eq!(u.auth.as_deref(), Some("Bearer s3cret"));
    assert_eq!(u.ca_file.as_deref(), Some(Path::new("conf/ca.pem")));
    assert_eq!(
        c.routes[0],
        Route {
            path: RoutePath::Exact("/v1/chat/completions".into()),
            upstream: 0,
            endpoint: EndpointSource::Model,
            auth_headers: vec![],
            usage: vec![(
                Unit::new("token"),
                vec![
                    ValueSource::Header(HeaderName::from_static("x-total-tokens")),
                    ValueSource::Body(vec!["usage".into(), "total_tokens".into()]),
                ]
            )],
            reserve: vec![(
                Unit::new("token"),
                vec![ValueSource::Body(vec!["max_tokens".into()])]
            )],
            inject_include_usage: true,
            cap: None,
        }
    );
    assert_eq!(c.routes[1].path, RoutePath::Prefix("/v1/".into()));
    assert_eq!(
        c.routes[1].endpoint,
        EndpointSource::Literal("other".into())
    );
    assert_eq!(
        c.routes[1].usage,
        vec![(
            Unit::new("image"),
            vec![ValueSource::Body(vec!["data".into(), "length".into()])]
        )]
    );
}

#[test]
fn errors_are_located() {
    let f = "conf/plangate.toml";
    let table: Vec<(String, Vec<String>)> = vec![
        (
            format!("{MINIMAL}[server]\nlisten = \"0.0.0.0:8080\"\nlsten = \"x\"\n"),
            vec![format!("{f}:5:1: server.lsten: unknown field `lsten`, expected one of `listen`, `tls_cert`, `tls_key`, `max_request_body`, `request_timeout`, `header_read_timeout`, `body_read_timeout`, `unadmitted_body_budget`, `unadmitted_body_per_account`")],
        ),
        (
            format!("{MINIMAL}[[upstreams]]\nname = \"a\"\nurl = \"http://x\"\n[[upstreams]]\nname = \"b\"\nurl = \"http://y\"\nsecret = 1\n"),
            vec![format!("{f}:9:1: upstreams[1].secret: unknown field `secret`, expected one of `name`, `url`, `auth`, `auth_header`, `ca_file`, `drop_response_headers`")],
        ),
        (
            format!("{MINIMAL}[server]\nrequest_timeout = \"10 minutes\"\nheader_read_timeout = \"0s\"\nmax_request_body = \"10XB\"\n"),
            vec![
                format!("{f}:4:19: server.request_timeout: `10 minutes`: unknown unit `minutes` (use ms, s, m, h or d)"),
                format!("{f}:5:23: server.header_read_timeout: must be longer than 0"),
                format!("{f}:6:20: server.max_request_body: `10XB`: unknown unit `xb` (use B, KiB, MiB, GiB, KB, MB or GB)"),
            ],
        ),
        (
            format!("{MINIMAL}[admin]\ntoken = \"${{PLANGATE_TEST_UNSET_VAR}}\"\n"),
            vec![format!("{f}:4:9: admin.token: environment variable `PLANGATE_TEST_UNSET_VAR` is not set")],
        ),
        (
            format!("{MINIMAL}[admin]\ntoken = \"${{EMPTY}}\"\n"),
            vec![format!("{f}:4:9: admin.token: must not be empty")],
        ),
        (
            format!("{MINIMAL}[admin]\nlisten = \"127.0.0.1:9090\"\n"),
            vec![format!("{f}:3:1: admin.token: missing: an [admin] section needs a `token` (e.g. \"${{PLANGATE_ADMIN_TOKEN}}\")")],
        ),
        (
            format!("{MINIMAL}[[upstreams]]\nname = \"vllm\"\nurl = \"ftp://x\"\n[[routes]]\npath = \"/v1/chat\"\nupstream = \"vlm\"\nendpoint = \"{{model}}\"\n"),
            vec![
                format!("{f}:5:7: upstreams[0].url: `ftp://x`: unsupported scheme `ftp` (use http or https)"),
                format!("{f}:8:12: routes[0].upstream: no upstream named `vlm` (defined: `vllm`)"),
            ],
        ),
        (
            format!("{MINIMAL}[[upstreams]]\nname = \"u\"\nurl = \"http://x\"\n[[routes]]\npath = \"v1/*/x\"\nupstream = \"u\"\nendpoint = \"{{modle}}\"\nusage.credit = \"body:x\"\nusage.token = [\"body:\", 3]\nreserve.token = \"max_tokens\"\n"),
            vec![
                format!("{f}:7:8: routes[0].path: a route path must start with `/`"),
                format!("{f}:9:12: routes[0].endpoint: `{{modle}}`: the only placeholder is `{{model}}`, and it must stand alone"),
                format!("{f}:10:7: routes[0].usage.credit: `credit` is a reserved unit name (credits are configured under `credits:`)"),
                format!("{f}:11:15: routes[0].usage.token[0]: `` is not a dotted JSON path such as `usage.total_tokens`"),
                format!("{f}:11:15: routes[0].usage.token[1]: expected a string, found integer"),
                format!("{f}:12:17: routes[0].reserve.token: `max_tokens` is not a source: use \"header:<name>\" or \"body:<dotted.path>\", or a sum of them joined by `+`"),
            ],
        ),
        (
            format!("{MINIMAL}[[upstreams]]\nname = \"u\"\nurl = \"http://x\"\ndrop_response_headers = [\"x-ok-*\", \"bad header\", \"\"]\n"),
            vec![
                format!("{f}:6:36: upstreams[0].drop_response_headers[1]: `bad header` is not a header name pattern (header-name characters and `*`)"),
                format!("{f}:6:50: upstreams[0].drop_response_headers[2]: must not be empty"),
            ],
        ),
        (
            format!("{MINIMAL}[[upstreams]]\nname = \"u\"\nurl = \"http://x\"\nauth_header = \"x key\"\n[[routes]]\npath = \"/v1/x\"\nupstream = \"u\"\nendpoint = \"e\"\nauth_header = \"\"\n[[routes]]\npath = \"/v1/y\"\nupstream = \"u\"\nendpoint = \"e\"\nauth_header = [\"x-api-key\", 3]\n[[routes]]\npath = \"/v1/z\"\nupstream = \"u\"\nendpoint = \"e\"\nauth_header = []\n"),
            vec![
                format!("{f}:6:15: upstreams[0].auth_header: `x key` is not a valid header name"),
                format!("{f}:11:15: routes[0].auth_header: must not be empty"),
                format!("{f}:16:15: routes[1].auth_header[1]: expected a header name, found integer"),
                format!("{f}:21:15: routes[2].auth_header: expected a header name such as \"x-api-key\" or a list of them, found an empty list"),
            ],
        ),
        (
            format!("{MINIMAL}[server]\ntls_cert = \"a.pem\"\n"),
            vec![format!("{f}:4:12: server.tls_cert: `tls_cert` needs `tls_key` too (set both for HTTPS, or neither)")],
        ),
        (
            "[server]\nlisten = \"localhost\"\n".to_string(),
            vec![
                format!("{f}: plans: missing [plans] section (e.g. `[plans]` with `file = \"plans.yaml\"`)"),
                format!("{f}:2:10: server.listen: `localhost` is not an IP address and port such as \"0.0.0.0:8080\""),
            ],
        ),
        (
            format!("{MINIMAL}[storage]\non_store_error = \"maybe\"\nredis_url = \"http://:pw@x\"\n"),
            vec![
                format!("{f}:4:18: storage.on_store_error: `maybe` is neither \"open\" nor \"closed\""),
                format!("{f}:5:13: storage.redis_url: `http://:***@x` is not a Redis URL (redis://host:port or rediss://...)"),
            ],
        ),
        (
            format!("{MINIMAL}[server]\nrequest_timeout = 5\n"),
            vec![format!("{f}:4:19: server.request_timeout: invalid type: integer `5`, expected a string")],
        ),
        (
            format!("{MINIMAL}[server\n"),
            vec![format!("{f}:3:8: server: invalid table header\nexpected `.`, `]`")],
        ),
        (
            format!("{MINIMAL}[[upstreams]]\nname = \"u\"\nurl = \"http://x\"\n[[routes]]\npath = \"/a\"\nupstream = \"u\"\nendpoint = \"e\"\n[[routes]]\npath = \"/a\"\nupstream = \"u\"\nendpoint = \"e\"\n"),
            vec![format!("{f}:11:8: routes[1].path: another route already has path `/a`")],
        ),
    ];
    let mut mismatches = Vec::new();
    for (text, expected) in &table {
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
fn line_col_counts_characters() {
    assert_eq!(build::line_col("ab\ncé d", 7), (2, 4));
    assert_eq!(build::line_col("x", 99), (1, 2));
    // Inside a multi-byte character: rounds down, never panics.
    assert_eq!(build::line_col("é", 1), (1, 1));
}

proptest! {
    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
        let _ = load(&text);
    }

    #[test]
    fn toml_like_text_never_panics(text in "[a-z_\\[\\]=\"$.{}:/* \n0-9,#]{0,300}") {
        let _ = load(&text);
    }

    #[test]
    fn substitution_never_panics(s in "\\PC{0,50}") {
        let _ = substitute_env(&s, &env);
        let _ = parse_size(&s);
        let _ = parse_duration(&s);
        let _ = parse_value_source(&s);
    }
}

#[test]
fn known_units_are_request_and_every_measured_or_reserved_unit() {
    let c = load(&format!(
        "{MINIMAL}\n[[upstreams]]\nname = \"u\"\nurl = \"http://127.0.0.1:1\"\n\n\
         [[routes]]\npath = \"/a\"\nupstream = \"u\"\nendpoint = \"a\"\nusage.token = \"body:usage.total_tokens\"\n\n\
         [[routes]]\npath = \"/b\"\nupstream = \"u\"\nendpoint = \"b\"\nreserve.image = \"body:n\"\n\n\
         [[routes]]\npath = \"/c\"\nupstream = \"u\"\nendpoint = \"c\"\n"
    ))
    .unwrap();
    let known = c.known_units();
    assert_eq!(known.names(), vec!["request", "image", "token"]);
    assert!(known.contains("token") && !known.contains("tokens"));
    assert_eq!(known.suggest("tokens"), Some("token"));
    assert_eq!(known.suggest("imag"), Some("image"));
    assert_eq!(known.suggest("requests"), Some("request"));
    assert_eq!(known.suggest("gpu-second"), None);
    let bare = load(MINIMAL).unwrap().known_units();
    assert_eq!(bare.names(), vec!["request"]);
}

#[test]
fn settings_above_their_bounds_are_refused() {
    let errs = errors(&format!(
        "{MINIMAL}[server]\nrequest_timeout = \"2d\"\nheader_read_timeout = \"100000000000s\"\nmax_request_body = \"2TiB\"\n\
         [storage]\nstore_timeout = \"86401s\"\ncatalog_timeout = \"0s\"\n"
    ));
    assert_eq!(
        errs,
        vec![
            "conf/plangate.toml:4:19: server.request_timeout: `2d` is too long: must be at most 86400s (1 day)",
            "conf/plangate.toml:5:23: server.header_read_timeout: `100000000000s` is too long: must be at most 86400s (1 day)",
            "conf/plangate.toml:6:20: server.max_request_body: 2199023255552 bytes is too large: must be at most 1099511627776 (1 TiB)",
            "conf/plangate.toml:8:17: storage.store_timeout: `86401s` is too long: must be at most 86400s (1 day)",
            "conf/plangate.toml:9:19: storage.catalog_timeout: must be longer than 0",
        ]
    );
    // At the bounds: fine.
    let c = load(&format!(
        "{MINIMAL}[server]\nrequest_timeout = \"1d\"\nmax_request_body = \"1TiB\"\n"
    ))
    .unwrap();
    assert_eq!(c.server.request_timeout, Duration::from_secs(86_400));
    assert_eq!(c.server.max_request_body, 1 << 40);
}

#[test]
fn stores_can_be_required_at_start() {
    let c = load(&format!("{MINIMAL}[storage]\nrequire_at_start = true\n")).unwrap();
    assert!(c.storage.require_at_start);
    assert_eq!(
        errors(&format!("{MINIMAL}[storage]\nrequire_at_start = \"yes\"\n")),
        vec!["conf/plangate.toml:4:20: storage.require_at_start: invalid type: string \"yes\", expected a boolean"]
    );
}

/// Admin commands read `[storage]` and the routes' units; the secrets of
/// other sections need not be set, but the file must still parse.
#[test]
fn the_cli_view_checks_only_storage_and_units() {
    let text = "[admin]\ntoken = \"${UNSET_ADMIN}\"\n\n\
                [storage]\npostgres_url = \"postgres://gw:${TOKEN}@db/plangate\"\n\n\
                [plans]\nfile = \"plans.yaml\"\n\n\
                [[upstreams]]\nname = \"u\"\nurl = \"http://127.0.0.1:1\"\nauth = \"Bearer ${UNSET_KEY}\"\n\n\
                [[routes]]\npath = \"/a\"\nupstream = \"u\"\nendpoint = \"a\"\nusage.token = \"body:usage.total_tokens\"\n\
                reserve.image = \"body:n\"\n";
    let path = Path::new("conf/plangate.toml");
    assert!(Config::from_toml(text, path, &env).is_err());
    let view = CliView::from_toml(text, path, &env).unwrap();
    assert_eq!(
        view.storage.postgres_url.as_deref(),
        Some("postgres://gw:s3cret@db/plangate")
    );
    assert_eq!(view.known_units.names(), vec!["request", "image", "token"]);

    let storage_error = "[storage]\npostgres_url = \"${UNSET_URL}\"\n";
    let e = CliView::from_toml(storage_error, path, &env).unwrap_err();
    assert_eq!(
        e.to_string(),
        "conf/plangate.toml:2:16: storage.postgres_url: environment variable `UNSET_URL` is not set"
    );
    let unknown_key = "[admin]\ntokn = \"x\"\n";
    let e = CliView::from_toml(unknown_key, path, &env).unwrap_err();
    assert!(e.to_string().contains("unknown field `tokn`"), "{e}");
    let bad_unit = "[[routes]]\npath = \"/a\"\nupstream = \"u\"\nendpoint = \"a\"\nusage.\"to ken\" = \"body:x\"\n";
    let e = CliView::from_toml(bad_unit, path, &env).unwrap_err();
    assert!(e.to_string().contains("routes[0].usage.to ken"), "{e}");
}

#[test]
fn usage_presets_and_sums() {
    let route = |usage: &str| {
        format!(
            "{MINIMAL}[[upstreams]]\nname = \"a\"\nurl = \"http://x\"\n[[routes]]\npath = \"/v1/messages\"\nupstream = \"a\"\nendpoint = \"{{model}}\"\n{usage}\n"
        )
    };
    let c = load(&route("usage.preset = \"anthropic-messages\"")).unwrap();
    let r = &c.routes[0];
    assert!(
        !r.inject_include_usage,
        "Anthropic requests are sent as they are"
    );
    assert_eq!(r.usage.len(), 1);
    assert_eq!(r.usage[0].0, Unit::new("token"));
    assert!(matches!(&r.usage[0].1[0], ValueSource::Sum(t) if t.len() == 4));
    assert!(crate::routes::meters_body(r));

    let c = load(&route("usage.preset = \"openai-responses\"")).unwrap();
    assert!(!c.routes[0].inject_include_usage);
    assert_eq!(c.routes[0].usage[0].1.len(), 2);
    let c = load(&route("usage.preset = \"openai-chat\"")).unwrap();
    assert!(c.routes[0].inject_include_usage);

    // An explicit token source replaces the preset's; other units add.
    let c = load(&route(
        "usage.preset = \"openai-responses\"\nusage.token = \"header:x-t\"\nusage.image = \"body:n\"",
    ))
    .unwrap();
    let u = &c.routes[0].usage;
    assert_eq!(u.len(), 2);
    let token = u.iter().find(|(n, _)| n.as_str() == "token").unwrap();
    assert_eq!(
        token.1,
        vec![ValueSource::Header(HeaderName::from_static("x-t"))]
    );

    // Sums parse with or without spaces, and every term is checked.
    assert_eq!(
        parse_value_source("body:a+header:x-b").unwrap(),
        ValueSource::Sum(vec![
            ValueSource::Body(vec!["a".into()]),
            ValueSource::Header(HeaderName::from_static("x-b")),
        ])
    );
    assert!(parse_value_source("body:a + ").is_err());
    assert!(parse_value_source("body:a + usage.b").is_err());

    let f = "conf/plangate.toml";
    assert_eq!(
        errors(&route("usage.preset = \"anthropic\"")),
        vec![format!("{f}:10:16: routes[0].usage.preset: unknown preset `anthropic`; the presets are openai-chat, openai-responses, anthropic-messages")]
    );
    assert_eq!(
        errors(&route("reserve.token = \"body:max_tokens + body:n\"")),
        vec![format!("{f}:10:17: routes[0].reserve.token: a reservation is one number the request carries; sums (`+`) are for `usage`")]
    );
}

/// `[plans] source`: the file by default, or the database; anything else
/// is refused where it is written. The CLI view reads it too.
#[test]
fn plans_source_is_file_unless_database() {
    use crate::config::PlansSource;
    let source = |extra: &str| load(&format!("{MINIMAL}{extra}")).map(|c| c.plans.source);
    assert_eq!(source(""), Ok(PlansSource::File));
    assert_eq!(source("source = \"file\"\n"), Ok(PlansSource::File));
    assert_eq!(source("source = \"database\"\n"), Ok(PlansSource::Database));
    assert_eq!(
        errors(&format!("{MINIMAL}source = \"db\"\n")),
        vec!["conf/plangate.toml:3:10: plans.source: `db` is not a plans source: \"file\" or \"database\""]
    );
    // Only the database may own the plans without a file.
    let c = load("[plans]\nsource = \"database\"\n").unwrap();
    assert_eq!(
        (c.plans.source, c.plans.file),
        (PlansSource::Database, None)
    );
    let e = errors("[plans]\nsource = \"file\"\n");
    assert!(
        e[0].contains("plans.file: missing") && e[0].contains("only source = \"database\""),
        "{e:?}"
    );
    let c = load(MINIMAL).unwrap();
    let refused = c.plans.writes_refused().expect("refused under file");
    assert!(refused.contains("conf/plans.yaml"), "{refused}");
    let path = Path::new("conf/plangate.toml");
    let view = CliView::from_toml(MINIMAL, path, &env).unwrap();
    assert_eq!(view.plan_writes_refused(), Some(refused));
    let text = format!("{MINIMAL}source = \"database\"\n");
    assert_eq!(
        CliView::from_toml(&text, path, &env)
            .unwrap()
            .plan_writes_refused(),
        None
    );
}

#[test]
fn cap_names_a_reserved_top_level_field() {
    let route = |extra: &str| {
        format!(
            "{MINIMAL}[[upstreams]]\nname = \"a\"\nurl = \"http://x\"\n[[routes]]\npath = \"/v1/chat/completions\"\nupstream = \"a\"\nendpoint = \"{{model}}\"\nreserve.token = [\"body:max_completion_tokens\", \"body:max_tokens\"]\n{extra}\n"
        )
    };
    let c = load(&route("cap.token = \"max_tokens\"")).unwrap();
    assert_eq!(
        c.routes[0].cap,
        Some((Unit::new("token"), "max_tokens".to_owned()))
    );
    assert_eq!(load(&route("")).unwrap().routes[0].cap, None);
    let f = "conf/plangate.toml";
    assert_eq!(
        errors(&route("cap.token = \"n\"")),
        vec![format!("{f}:11:13: routes[0].cap.token: `n` must be what the request reserves: add \"body:n\" to reserve.token")]
    );
    assert_eq!(
        errors(&route("cap.token = \"usage.max\"")),
        vec![format!("{f}:11:13: routes[0].cap.token: `usage.max` is not a top-level body field such as `max_tokens`")]
    );
}

#[test]
fn outbox_memory_bounds_the_in_process_outbox_only() {
    let c = load(&format!("{MINIMAL}[storage]\noutbox_memory = \"16MiB\"\n")).expect("loads");
    assert_eq!(c.storage.outbox_memory, 16 * 1024 * 1024);
    let c = load(MINIMAL).expect("loads");
    assert_eq!(c.storage.outbox_memory, defaults::OUTBOX_MEMORY);
    let f = "conf/plangate.toml";
    assert_eq!(
        errors(&format!(
            "{MINIMAL}[storage]\nredis_url = \"redis://127.0.0.1:6379\"\noutbox_memory = \"1MiB\"\n"
        )),
        vec![format!("{f}:5:17: storage.outbox_memory: bounds the in-process counters' outbox; with Redis the outbox lives in Redis")]
    );
    assert_eq!(
        errors(&format!("{MINIMAL}[storage]\noutbox_memory = 0\n")),
        vec![format!(
            "{f}:4:17: storage.outbox_memory: must be at least 1 byte"
        )]
    );
}

fn notify_env(name: &str) -> Option<String> {
    match name {
        "HOOK_SECRET" => Some("0123456789abcdef0123".into()),
        "SHORT_SECRET" => Some("short".into()),
        _ => None,
    }
}

fn load_notify(section: &str) -> Result<Config, ConfigErrors> {
    let text = format!("{MINIMAL}\n{section}");
    Config::from_toml(&text, Path::new("conf/plangate.toml"), &notify_env)
}

#[test]
fn notify_section_loads_with_defaults() {
    let config = load_notify(
        "[notify]\nurl = \"https://hooks.example.com/plangate\"\nsecret_env = \"HOOK_SECRET\"\n",
    )
    .unwrap();
    let n = config.notify.expect("[notify]");
    assert_eq!(n.url, "https://hooks.example.com/plangate");
    assert_eq!(&*n.secret.0, b"0123456789abcdef0123");
    // Never printed.
    assert!(!format!("{n:?}").contains("0123456789abcdef"), "{n:?}");
    assert_eq!(n.timeout, Duration::from_secs(10));
    assert_eq!(n.backoff, Duration::from_secs(10));
    assert_eq!(n.max_backoff, Duration::from_secs(3600));
    assert_eq!(n.max_attempts, 30);
    assert_eq!(n.retain, Duration::from_secs(30 * 86_400));
    assert!(load(MINIMAL).unwrap().notify.is_none());
}

#[test]
fn notify_secret_file_drops_its_trailing_newline() {
    let dir = std::env::temp_dir().join(format!("plangate-notify-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("hook.secret"), "file-secret-0123456789\n").unwrap();
    let text = format!(
        "{MINIMAL}\n[notify]\nurl = \"http://127.0.0.1:9/h\"\nsecret_file = \"hook.secret\"\n"
    );
    let config = Config::from_toml(&text, &dir.join("plangate.toml"), &notify_env).unwrap();
    assert_eq!(&*config.notify.unwrap().secret.0, b"file-secret-0123456789");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn notify_errors_are_located() {
    let errs = |section: &str| -> Vec<String> {
        match load_notify(section) {
            Ok(c) => panic!("expected errors, loaded {c:?}"),
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    };
    let f = "conf/plangate.toml";
    assert_eq!(
        errs("[notify]\nsecret_env = \"HOOK_SECRET\"\n"),
        vec![format!("{f}:4:1: notify.url: missing: a [notify] section needs the `url` webhooks are POSTed to")]
    );
    assert_eq!(
        errs("[notify]\nurl = \"ftp://x/\"\nsecret_env = \"HOOK_SECRET\"\n"),
        vec![format!(
            "{f}:5:7: notify.url: `ftp://x/`: unsupported scheme `ftp` (use http or https)"
        )]
    );
    assert_eq!(
        errs("[notify]\nurl = \"http://x/\"\n"),
        vec![format!("{f}:4:1: notify.secret_env: missing: a [notify] section needs `secret_env` (the name of an environment variable) or `secret_file` holding the signing secret")]
    );
    assert_eq!(
        errs("[notify]\nurl = \"http://x/\"\nsecret_env = \"NOPE\"\n"),
        vec![format!(
            "{f}:6:14: notify.secret_env: the environment variable `NOPE` is not set"
        )]
    );
    // The secret's length is said, never its value.
    assert_eq!(
        errs("[notify]\nurl = \"http://x/\"\nsecret_env = \"SHORT_SECRET\"\n"),
        vec![format!(
            "{f}:6:14: notify.secret_env: the signing secret is 5 bytes; at least 16 are needed"
        )]
    );
    assert_eq!(
        errs("[notify]\nurl = \"http://x/\"\nsecret_env = \"HOOK_SECRET\"\nsecret_file = \"s\"\n"),
        vec![format!(
            "{f}:7:15: notify.secret_file: give either `secret_env` or `secret_file`, not both"
        )]
    );
    assert_eq!(
        errs("[notify]\nurl = \"http://x/\"\nsecret_file = \"missing.secret\"\n"),
        vec![format!("{f}:6:15: notify.secret_file: cannot read conf/missing.secret: No such file or directory (os error 2)")]
    );
    assert_eq!(
        errs("[notify]\nurl = \"http://x/\"\nsecret_env = \"HOOK_SECRET\"\nmax_attempts = 0\nbackoff = \"10s\"\nmax_backoff = \"1s\"\nretain = \"1m\"\ntimeout = \"0s\"\n"),
        vec![
            format!("{f}:7:16: notify.max_attempts: `0` must be from 1 to 1000"),
            format!("{f}:9:15: notify.max_backoff: must be at least `backoff`"),
            format!("{f}:10:10: notify.retain: `1m` is too short: notifications are kept at least 1h"),
            format!("{f}:11:11: notify.timeout: must be longer than 0"),
        ]
    );
    assert_eq!(
        errs("[notify]\nurl = \"http://x/\"\nsecret_env = \"HOOK_SECRET\"\nsecret = \"inline\"\n"),
        vec![format!("{f}:7:1: notify.secret: unknown field `secret`, expected one of `url`, `secret_env`, `secret_file`, `timeout`, `backoff`, `max_backoff`, `max_attempts`, `poll_interval`, `scan_interval`, `retain`, `ca_file`")]
    );
}
