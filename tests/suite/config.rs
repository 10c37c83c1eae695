//! Config and plans files, black-box: the fixtures under `tests/fixtures/`
//! and the example files in `config/` go through the library's loaders and
//! `plangate check-config`, and every error must say file:line:column and
//! the key path.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;

use plangate::cli::check;
use plangate::cli::{CliError, EXIT_BAD_INPUT};
use plangate::config::{Config, EndpointSource, OnStoreError, RoutePath};
use plangate::plans::parse::{load_plans_file, parse_plans, plan_from_json, plan_to_json};
use plangate::plans::Unit;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn fixture(rel: &str) -> PathBuf {
    repo().join("tests/fixtures").join(rel)
}

/// The example configs read `${PLANGATE_ADMIN_TOKEN}` and a fixture reads
/// `${PLANGATE_TEST_FIXTURE_TOKEN}`. Both are set once, before any test
/// here reads them, and never removed, so concurrent tests agree.
fn set_env() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::env::set_var("PLANGATE_ADMIN_TOKEN", "test-admin-token");
        std::env::set_var("PLANGATE_TEST_FIXTURE_TOKEN", "fixture-token");
    });
}

/// Every error of loading a plans fixture, rendered, with the fixture's
/// path replaced by its bare name.
fn plan_errors(name: &str) -> Vec<String> {
    let path = fixture(&format!("plans/{name}"));
    match load_plans_file(&path) {
        Ok(set) => panic!("{name} should not load, got {set:?}"),
        Err(e) => {
            e.0.iter()
                .map(|e| e.to_string().replace(&path.display().to_string(), name))
                .collect()
        }
    }
}

fn config_errors(name: &str) -> Vec<String> {
    set_env();
    let path = fixture(&format!("config/{name}"));
    match Config::load(&path) {
        Ok(c) => panic!("{name} should not load, got {c:?}"),
        Err(e) => {
            e.0.iter()
                .map(|e| e.to_string().replace(&path.display().to_string(), name))
                .collect()
        }
    }
}

#[test]
fn original_first_example_loads_unchanged() {
    let set = load_plans_file(&fixture("plans/original.yaml")).unwrap();
    assert_eq!(set.default_plan, None);
    let plan = &set.plans["free_tier"];
    assert_eq!(plan.name, "Free Tier");
    let gpt = &plan.endpoints["gpt-4-turbo"];
    let windows: Vec<(u64, u64, &str)> = gpt
        .windows
        .iter()
        .map(|w| (w.len.max_secs(), w.limit, w.unit.as_str()))
        .collect();
    assert_eq!(
        windows,
        vec![
            (60, 3, "request"),
            (86_400, 200, "request"),
            (60, 40_000, "token")
        ]
    );
    assert_eq!(gpt.max_concurrent, 4);
    assert_eq!(gpt.concurrency_expiry_secs, 60);
    assert_eq!(
        plan.endpoints["dall-e-3"].windows[0].unit,
        Unit::new("image")
    );
}

#[test]
fn original_second_example_is_refused_for_sliding_windows() {
    let errs = plan_errors("original_sliding.yaml");
    assert_eq!(
        errs,
        vec![
            "original_sliding.yaml:6:9: plans.basic_plan.endpoints.api/v1/chat.sliding_windows: \
             sliding windows are not supported: only `fixed_windows` are (rename the key to `fixed_windows`)"
        ]
    );
}

#[test]
fn plan_validation_rules_name_file_line_and_key() {
    let long = "m".repeat(201);
    let table: Vec<(&str, Vec<String>)> = vec![
        (
            "window_rules.yaml",
            vec![
                "window_rules.yaml:6:21: plans.free.endpoints.gpt-4o.fixed_windows[0].window: must be at least 1s".into(),
                "window_rules.yaml:8:21: plans.free.endpoints.gpt-4o.fixed_windows[1].window: `1500ms` is not a whole number of seconds".into(),
                "window_rules.yaml:11:20: plans.free.endpoints.gpt-4o.fixed_windows[2].limit: must be at least 1".into(),
                "window_rules.yaml:14:24: plans.free.endpoints.gpt-4o.fixed_windows[3].unit_type: a `credit` window caps the credits the endpoint's requests are charged: the endpoint needs `credits:`".into(),
            ],
        ),
        (
            "unknown_keys.yaml",
            vec![
                "unknown_keys.yaml:3:5: plans.free.title: unknown key `title` (expected one of `name`, `endpoints`, `enforce`, `notify`)".into(),
                "unknown_keys.yaml:9:13: plans.free.endpoints.gpt-4o.fixed_windows[0].unit: unknown key `unit` (expected one of `window`, `calendar`, `limit`, `unit_type`, `unit_kind`)".into(),
                "unknown_keys.yaml:10:9: plans.free.endpoints.gpt-4o.max_concurent: unknown key `max_concurent` (expected one of `fixed_windows`, `max_concurrent`, `concurrency_expiry`, `credits`, `enforce`)".into(),
            ],
        ),
        (
            "default_unknown.yaml",
            vec!["default_unknown.yaml:1:15: default_plan: no plan named `premium` (plans: `free`, `pro`)".into()],
        ),
        (
            "duplicate_window.yaml",
            vec!["duplicate_window.yaml:8:13: plans.free.endpoints.gpt-4o.fixed_windows[1]: duplicate window: `request` per 60s is already limited by plans.free.endpoints.gpt-4o.fixed_windows[0]".into()],
        ),
        (
            "long_id.yaml",
            vec![format!("long_id.yaml:4:7: plans.free.endpoints.{long}: id is 201 bytes long; at most 200 bytes are allowed")],
        ),
        (
            "credits_rules.yaml",
            vec![
                "credits_rules.yaml:6:24: plans.free.endpoints.gpt-4o.credits.min_balance: must not be negative".into(),
                "credits_rules.yaml:8:39: plans.free.endpoints.gpt-4o.credits.per_unit.token.per: must be at least 1".into(),
                "credits_rules.yaml:9:13: plans.free.endpoints.gpt-4o.credits.per_unit.credit: `credit` is a reserved unit name (credits are configured under `credits:`)".into(),
            ],
        ),
    ];
    let mut mismatches = Vec::new();
    for (name, expected) in &table {
        let got = plan_errors(name);
        if &got != expected {
            mismatches.push(format!(
                "{name}:\n  got: {got:#?}\n  expected: {expected:#?}"
            ));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn plan_syntax_errors_have_a_line() {
    let errs = plan_errors("syntax_error.yaml");
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with("syntax_error.yaml:4:") && errs[0].contains("YAML syntax error"),
        "{errs:?}"
    );
}

#[test]
fn plans_as_json_round_trip_and_parse_as_text() {
    let set = load_plans_file(&repo().join("config/plans.yaml")).unwrap();
    for plan in set.plans.values() {
        assert_eq!(
            &plan_from_json(&plan.id, &plan_to_json(plan)).unwrap(),
            &**plan
        );
    }
    let text = serde_json::to_string(&plangate::plans::parse::plans_to_json(&set)).unwrap();
    assert_eq!(parse_plans(&text, "<request body>").unwrap(), set);
}

#[test]
fn config_errors_name_file_line_and_key() {
    let table: Vec<(&str, Vec<&str>)> = vec![
        (
            "unknown_key.toml",
            vec!["unknown_key.toml:3:1: server.request_timout: unknown field `request_timout`, expected one of `listen`, `tls_cert`, `tls_key`, `max_request_body`, `request_timeout`, `header_read_timeout`, `body_read_timeout`, `unadmitted_body_budget`, `unadmitted_body_per_account`"],
        ),
        (
            "bad_duration.toml",
            vec![
                "bad_duration.toml:2:19: server.request_timeout: `ten minutes` is not a duration such as \"500ms\", \"60s\", \"5m\", \"1h\", \"1d\"",
                "bad_duration.toml:3:20: server.max_request_body: `10 megabytes`: unknown unit `megabytes` (use B, KiB, MiB, GiB, KB, MB or GB)",
                "bad_duration.toml:6:17: storage.store_timeout: `50` has no unit (use ms, s, m, h or d)",
            ],
        ),
        (
            "unset_var.toml",
            vec!["unset_var.toml:2:9: admin.token: environment variable `PLANGATE_TEST_SURELY_UNSET_VAR` is not set"],
        ),
        (
            "unknown_upstream.toml",
            vec!["unknown_upstream.toml:10:12: routes[0].upstream: no upstream named `openai` (defined: `vllm`)"],
        ),
    ];
    let mut mismatches = Vec::new();
    for (name, expected) in &table {
        let got = config_errors(name);
        if &got != expected {
            mismatches.push(format!(
                "{name}:\n  got: {got:#?}\n  expected: {expected:#?}"
            ));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn good_config_resolves_paths_and_substitutes() {
    set_env();
    let path = fixture("config/good.toml");
    let c = Config::load(&path).unwrap();
    assert_eq!(
        c.plans.file,
        Some(fixture("config").join("../plans/original.yaml"))
    );
    assert_eq!(c.admin.unwrap().token, "fixture-token");
    assert_eq!(c.storage.on_store_error, OnStoreError::Open);
    assert_eq!(
        c.routes[0].path,
        RoutePath::Exact("/v1/chat/completions".into())
    );
    assert_eq!(c.routes[0].endpoint, EndpointSource::Model);
    let summary = check::run(&path).unwrap();
    assert!(
        summary.starts_with("ok: ")
            && summary.contains("1 upstream, 2 routes")
            && summary.contains("1 plan,"),
        "{summary}"
    );
}

#[test]
fn example_configs_pass_check_config() {
    set_env();
    for name in ["plangate.toml", "dev.toml"] {
        let path = repo().join("config").join(name);
        match check::run(&path) {
            Ok(summary) => assert!(
                summary.contains("6 routes") && summary.contains("2 plans (default free_tier)"),
                "{name}: {summary}"
            ),
            Err(e) => panic!("{name} should pass check-config:\n{e}"),
        }
    }
    let dev = Config::load(&repo().join("config/dev.toml")).unwrap();
    assert_eq!(dev.server.listen, "127.0.0.1:8080".parse().unwrap());
    let admin = dev.admin.unwrap();
    assert_eq!(admin.listen, "127.0.0.1:9090".parse().unwrap());
    assert_eq!(admin.token, "dev-admin-token");
    assert_eq!(dev.storage.postgres_url, None);
    assert_eq!(dev.storage.redis_url, None);
    assert_eq!(dev.upstreams[0].name, "mock");
    assert_eq!(dev.upstreams[0].url, "http://127.0.0.1:18080");
}

#[test]
fn check_config_reports_both_files_in_one_run() {
    set_env();
    let path = fixture("config/broken_both.toml");
    let err = check::run(&path).unwrap_err();
    assert_eq!(err.exit_code(), EXIT_BAD_INPUT);
    let CliError::BadInput(text) = err else {
        panic!("expected BadInput")
    };
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "{text}");
    assert!(
        lines[0].ends_with("broken_both.toml:4:10: server.listen: `localhost:8080` is not an IP address and port such as \"0.0.0.0:8080\""),
        "{text}"
    );
    for line in &lines[1..] {
        assert!(line.contains("window_rules.yaml:"), "{text}");
    }
}

#[test]
fn check_config_reports_a_missing_plans_file() {
    set_env();
    let err = check::run(&fixture("config/missing_plans.toml")).unwrap_err();
    assert_eq!(err.exit_code(), EXIT_BAD_INPUT);
    let text = err.to_string();
    assert!(text.contains("no-such-plans.yaml: cannot read:"), "{text}");
}

/// The built binary, if this checkout has one: `cargo test` builds only
/// the binaries of the package under test, and this suite is another
/// package.
fn built_binary() -> Option<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"));
    let bin = target.join("debug").join("plangate");
    bin.exists().then_some(bin)
}

#[test]
fn binary_exits_2_and_prints_every_error() {
    let Some(bin) = built_binary() else {
        eprintln!(
            "\n*** SKIPPING binary_exits_2_and_prints_every_error: no target/debug/plangate \
             (run `cargo build -p plangate` first); the library path is tested above.\n"
        );
        return;
    };
    let out = Command::new(&bin)
        .args(["check-config", "--config"])
        .arg(fixture("config/bad_duration.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "bad_duration.toml:2:19: server.request_timeout:",
        "bad_duration.toml:3:20: server.max_request_body:",
        "bad_duration.toml:6:17: storage.store_timeout:",
    ] {
        assert!(stderr.contains(needle), "missing {needle} in:\n{stderr}");
    }

    let out = Command::new(&bin)
        .args(["check-config", "--config"])
        .arg(repo().join("config/dev.toml"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok: "));
}

/// The errors of `check-config` on a config fixture, with fixture paths
/// shortened to their names.
fn check_errors(name: &str) -> Vec<String> {
    set_env();
    let err = check::run(&fixture(&format!("config/{name}"))).unwrap_err();
    assert_eq!(err.exit_code(), EXIT_BAD_INPUT);
    let root = fixture("").display().to_string();
    err.to_string()
        .lines()
        .map(|l| {
            l.replace(&format!("{root}config/../plans/"), "")
                .replace(&format!("{root}plans/"), "")
                .replace(&format!("{root}config/"), "")
        })
        .collect()
}

#[test]
fn check_config_refuses_plan_units_no_route_measures() {
    assert_eq!(
        check_errors("unmeasured_units.toml"),
        vec![
            "unmeasured_units.yaml:8:24: plans.free.endpoints.gpt-4o.fixed_windows[0].unit_type: \
             unit `tokens` is not measured or reserved by any route (known: request, image, token); \
             did you mean `token`?",
            "unmeasured_units.yaml:13:13: plans.free.endpoints.gpt-4o.credits.per_unit.gpu-second: \
             unit `gpu-second` is not measured or reserved by any route (known: request, image, token); \
             add `usage.gpu-second` or `reserve.gpu-second` to a route in the config",
        ]
    );
    // The plans file alone (no routes to check against) is fine.
    load_plans_file(&fixture("plans/unmeasured_units.yaml")).unwrap();
}

#[test]
fn check_config_refuses_numbers_the_stores_cannot_hold() {
    assert_eq!(
        check_errors("too_large.toml"),
        vec![
            "too_large.toml:3:19: server.request_timeout: `100000000d` is too long: must be at most 86400s (1 day)",
            "too_large.yaml:7:20: plans.free.endpoints.gpt-4o.fixed_windows[0].limit: `18446744073709551615` \
             is too large: must be at most 1000000000000000 (10^15, the largest amount plangate stores)",
            "too_large.yaml:8:21: plans.free.endpoints.gpt-4o.fixed_windows[1].window: `10000000000000000s` \
             is too long: must be at most 315360000s (10 years)",
            "too_large.yaml:11:24: plans.free.endpoints.gpt-4o.credits.per_request: `9223372036854775807` \
             is too large: must be at most 1000000000000000 (10^15, the largest amount plangate stores)",
        ]
    );
}

#[test]
fn binary_check_config_exits_2_on_unmeasured_units_and_large_numbers() {
    let Some(bin) = built_binary() else {
        eprintln!(
            "\n*** SKIPPING binary_check_config_exits_2_on_unmeasured_units_and_large_numbers: \
             no target/debug/plangate (run `cargo build -p plangate` first)\n"
        );
        return;
    };
    set_env();
    for (fixture_name, needles) in [
        (
            "unmeasured_units.toml",
            &[
                "unmeasured_units.yaml:8:24: plans.free.endpoints.gpt-4o.fixed_windows[0].unit_type: unit `tokens`",
                "did you mean `token`?",
            ][..],
        ),
        (
            "too_large.toml",
            &["too_large.yaml:7:20: plans.free.endpoints.gpt-4o.fixed_windows[0].limit:"][..],
        ),
    ] {
        let out = Command::new(&bin)
            .args(["check-config", "--config"])
            .arg(fixture(&format!("config/{fixture_name}")))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{fixture_name}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        for needle in needles {
            assert!(stderr.contains(needle), "missing {needle} in:\n{stderr}");
        }
    }
}
