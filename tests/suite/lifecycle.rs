//! Who owns the plans (issue 14 item 1) and the lifecycle of accounts,
//! keys, credits and counters from the CLI and the admin API (item 6).
//! CLI tests run the real `plangate` binary against a fresh database.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use plangate_tests::harness::{send_to, Backend, Options, Resp, TestGateway, ADMIN_TOKEN};
use plangate_tests::procs::{free_port, GatewayProc};
use serde_json::json;

use crate::operator::{db_name, drop_database, plangate, Out, TempDir, PLANS};

const LIFE_ADMIN_TOKEN: &str = "life-admin-token-7a6b5c4d3e2f1a0b";

/// A config for `serve` and the CLI on the database `db`, with the plans
/// of `operator.rs` next to it and `[plans] source = source`.
fn write_config(dir: &TempDir, db: &str, source: &str) -> PathBuf {
    dir.write("plans.yaml", PLANS);
    dir.write(
        "plangate.toml",
        &format!(
            r#"
[server]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"
token = "{LIFE_ADMIN_TOKEN}"

[storage]
postgres_url = "{db}"

[plans]
file = "plans.yaml"
watch = true
source = "{source}"

[[upstreams]]
name = "up"
url = "http://127.0.0.1:{port}"

[[routes]]
path = "/v1/chat/completions"
upstream = "up"
endpoint = "{{model}}"
usage.token = "body:usage.total_tokens"
"#,
            port = free_port()
        ),
    )
}

/// A fresh, migrated database (None when Postgres is absent and not required).
async fn fresh_db(prefix: &str) -> Option<String> {
    let db = plangate_tests::postgres_db(prefix).await?;
    plangate::catalog::postgres::migrate(&db)
        .await
        .expect("migrate");
    Some(db)
}

/// Run `plangate ARGS` in `dir` (blocking the test's thread only).
fn run(dir: &Path, args: &[&str]) -> Out {
    tokio::task::block_in_place(|| plangate(dir, args, &[], Duration::from_secs(60)))
}

fn ok(out: Out) -> String {
    assert_eq!(out.code, Some(0), "{}", out.text());
    out.stdout
}

/// An admin API call to a `plangate serve` process.
async fn admin_call(gw: &GatewayProc, method: Method, path: &str, body: &str) -> Resp {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {LIFE_ADMIN_TOKEN}"))
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    send_to(&client, gw.admin.expect("admin listener"), req).await
}

/// Send SIGHUP to `gw` and wait until it has reloaded its routes `n` times
/// in all: the reload of the plans (when the file owns them) follows the
/// routes' in the same pass, so after the next pass's routes line the
/// previous pass has finished.
fn sighup_and_wait(gw: &GatewayProc, n: usize) {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &gw.pid().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while gw.log().matches("routes reloaded").count() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "no reload after SIGHUP:\n{}",
            gw.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ------------------------------------------------- item 1: plans ownership

/// Under `[plans] source = "file"` (the default) the admin API refuses
/// every plan write with 409 in the OpenAI error shape, naming the file;
/// reads still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_writes_through_the_admin_api_are_refused_when_the_file_owns_the_plans() {
    for backend in Backend::all().await {
        let gw = TestGateway::start(Options::new(backend)).await;
        let file = gw.dir.join("plans.yaml");
        let t = Some(ADMIN_TOKEN);
        let yaml = "plans:\n  extra:\n    endpoints:\n      \"x\":\n        fixed_windows:\n          - window: 1m\n            limit: 7\n";
        let default = json!({"plan_id": "other"}).to_string();
        for (method, path, body) in [
            (Method::PUT, "/admin/plans", yaml),
            (Method::DELETE, "/admin/plans/other", ""),
            (Method::PUT, "/admin/default-plan", default.as_str()),
        ] {
            let r = gw.admin(method.clone(), path, t, body).await;
            assert_eq!(r.status, 409, "{method} {path}: {:?}", r.body);
            assert_eq!(r.code(), "conflict");
            assert!(r.json()["error"]["type"].is_string(), "{:?}", r.body);
            let message = r.json()["error"]["message"].as_str().unwrap().to_owned();
            assert!(
                message.contains(&file.display().to_string())
                    && message.contains("source = \"file\""),
                "{message}"
            );
        }
        let r = gw.admin(Method::GET, "/admin/plans", t, "").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["default_plan"], "basic");
        assert!(r.json()["plans"]["other"].is_object());
        assert!(r.json()["plans"].get("extra").is_none());
        gw.stop().await;
    }
}

/// The CLI follows `[plans] source` of the config it reads: under `file`,
/// `plans delete`, `set-default` and applying any other file exit 2 with
/// the message naming the file; applying the config's own plans file (what
/// `serve` does) is fine. Under `database` the same writes succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_refuses_plan_writes_when_the_file_owns_the_plans() {
    let Some(db) = fresh_db("lifeown").await else {
        return;
    };
    let dir = TempDir::new("life-own");
    let config = write_config(&dir, &db, "file");
    let config = config.to_str().unwrap();
    let own = dir.path().join("plans.yaml");
    let own = own.to_str().unwrap();
    let other = dir.write("other.yaml", PLANS);
    let other = other.to_str().unwrap();
    let home = dir.path();

    ok(run(home, &["plans", "apply", own, "--config", config]));
    for args in [
        vec!["plans", "set-default", "pro"],
        vec!["plans", "delete", "pro"],
        vec!["plans", "apply", other],
    ] {
        let mut args = args.clone();
        args.extend(["--config", config]);
        let out = run(home, &args);
        assert_eq!(out.code, Some(2), "{args:?}: {}", out.text());
        assert!(
            out.stderr.contains(own) && out.stderr.contains("source = \"file\""),
            "{args:?}: {}",
            out.text()
        );
    }
    let list = ok(run(home, &["plans", "list", "--json", "--config", config]));
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list["default_plan"], "free", "{list}");

    // Given only the database, the CLI follows what the gateway last
    // started on it recorded: a gateway under `file` names its file.
    let elsewhere = TempDir::new("life-own-cwd");
    let by_url = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--postgres-url", &db]);
        run(elsewhere.path(), &all)
    };
    ok(by_url(&["plans", "set-default", "pro"]));
    ok(by_url(&["plans", "set-default", "free"]));
    let gw = GatewayProc::spawn(Path::new(config), &[]);
    let out = by_url(&["plans", "set-default", "pro"]);
    assert_eq!(out.code, Some(2), "{}", out.text());
    assert!(
        out.stderr.contains(own) && out.stderr.contains("last started"),
        "{}",
        out.text()
    );
    ok(by_url(&["plans", "apply", own]));
    drop(gw);

    let config = write_config(&dir, &db, "database");
    let config = config.to_str().unwrap();
    // A gateway under `database` clears the record.
    let gw = GatewayProc::spawn(Path::new(config), &[]);
    ok(by_url(&["plans", "set-default", "pro"]));
    ok(by_url(&["plans", "set-default", "free"]));
    drop(gw);
    ok(run(
        home,
        &["plans", "set-default", "pro", "--config", config],
    ));
    ok(run(home, &["plans", "delete", "free", "--config", config]));
    drop_database(db_name(&db)).await;
}

/// Under `[plans] source = "database"`, `serve` applies the file only to an
/// empty catalog: a change of the file (watched, and SIGHUP) does not undo
/// a default set through the admin API, and a plan deleted through the
/// admin API does not come back when another instance starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_source_database_serve_never_reapplies_the_plans_file() {
    let Some(db) = fresh_db("lifedb").await else {
        return;
    };
    let dir = TempDir::new("life-db");
    let config = write_config(&dir, &db, "database");
    let first = GatewayProc::spawn(&config, &[]);
    // The empty catalog got the file's plans.
    let r = admin_call(&first, Method::GET, "/admin/plans", "").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["default_plan"], "free");

    let r = admin_call(
        &first,
        Method::PUT,
        "/admin/default-plan",
        &json!({"plan_id": "pro"}).to_string(),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    // The file changes (a new plan, the old default): neither the watch
    // nor SIGHUP applies it.
    dir.write(
        "plans.yaml",
        &PLANS.replace(
            "plans:\n",
            "plans:\n  team:\n    endpoints:\n      gpt-4o:\n        fixed_windows:\n          - window: 60s\n            limit: 5\n",
        ),
    );
    tokio::task::block_in_place(|| {
        sighup_and_wait(&first, 1);
        sighup_and_wait(&first, 2);
    });
    let r = admin_call(&first, Method::GET, "/admin/plans", "").await;
    assert_eq!(r.json()["default_plan"], "pro", "{:?}", r.body);
    assert!(r.json()["plans"].get("team").is_none(), "{:?}", r.body);
    assert!(!first.log().contains("plans reloaded"), "{}", first.log());

    // Deleted through the admin API; another instance starts on the same
    // database with the same file.
    let r = admin_call(&first, Method::DELETE, "/admin/plans/free", "").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let second = GatewayProc::spawn(&config, &[]);
    for gw in [&first, &second] {
        let r = admin_call(gw, Method::GET, "/admin/plans/free", "").await;
        assert_eq!(r.status, 404, "{:?}", r.body);
        let r = admin_call(gw, Method::GET, "/admin/plans", "").await;
        assert_eq!(r.json()["default_plan"], "pro", "{:?}", r.body);
    }
    drop((first, second));
    drop_database(db_name(&db)).await;
}

// ------------------------------------------ item 6: the lifecycle, API

/// RFC 3339 of the harness clock's start plus `secs`.
fn harness_time(secs: u64) -> String {
    let t = std::time::UNIX_EPOCH
        + Duration::from_millis(plangate_tests::harness::T0_MS)
        + Duration::from_secs(secs);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The admin API covers the lifecycle: accounts listed in pages and by
/// plan, metadata patched, keys with a label and an expiry (an expired key
/// is 401 like a revoked one), revoking twice is 409, an expired grant is
/// 400, an account's windows reset, an account deleted (409 while it has
/// credits, then forced) and its keys refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_covers_the_account_lifecycle() {
    for backend in Backend::all().await {
        let gw = TestGateway::start(Options::new(backend)).await;
        let t = Some(ADMIN_TOKEN);
        let post = |path: String, body: serde_json::Value| {
            let gw = &gw;
            async move { gw.admin(Method::POST, &path, t, &body.to_string()).await }
        };
        for (id, plan) in [
            ("lc-a", Some("other")),
            ("lc-b", None),
            ("lc-c", Some("other")),
        ] {
            let r = post(
                "/admin/accounts".into(),
                json!({"id": id, "plan_id": plan, "metadata": {"n": id, "keep": 1}}),
            )
            .await;
            assert_eq!(r.status, 201, "{:?}", r.body);
        }

        // Pages by id; the cursor is the last id of a page.
        let r = gw
            .admin(Method::GET, "/admin/accounts?limit=2", t, "")
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        let ids = |r: &Resp| -> Vec<String> {
            r.json()["accounts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["id"].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(ids(&r), ["lc-a", "lc-b"]);
        assert_eq!(r.json()["next_after"], "lc-b");
        let r = gw
            .admin(Method::GET, "/admin/accounts?limit=2&after=lc-b", t, "")
            .await;
        assert_eq!(ids(&r), ["lc-c"]);
        assert!(r.json()["next_after"].is_null());
        let r = gw
            .admin(Method::GET, "/admin/accounts?plan=other", t, "")
            .await;
        assert_eq!(ids(&r), ["lc-a", "lc-c"]);
        let r = gw
            .admin(Method::GET, "/admin/accounts?plan=basic", t, "")
            .await;
        assert_eq!(ids(&r), ["lc-b"]);
        assert_eq!(r.json()["accounts"][0]["effective_plan"], "basic");
        for (query, status) in [
            ("plan=ghost", 404),
            ("limit=0", 400),
            ("limit=1001", 400),
            ("page=2", 400),
        ] {
            let r = gw
                .admin(Method::GET, &format!("/admin/accounts?{query}"), t, "")
                .await;
            assert_eq!(r.status, status, "{query}: {:?}", r.body);
        }

        // Metadata: set and remove keys, the others stay.
        let r = gw
            .admin(
                Method::PATCH,
                "/admin/accounts/lc-a",
                t,
                &json!({"metadata": {"tier": "gold", "n": null}}).to_string(),
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.json()["metadata"], json!({"keep": 1, "tier": "gold"}));

        // A key with a label and an expiry: 401 from the expiry on.
        let r = post(
            "/admin/accounts/lc-b/keys".into(),
            json!({"label": "ci", "expires_at": harness_time(60)}),
        )
        .await;
        assert_eq!(r.status, 201, "{:?}", r.body);
        assert_eq!(r.json()["label"], "ci");
        let expiring = r.json()["key"].as_str().unwrap().to_owned();
        let r = gw
            .admin(Method::POST, "/admin/accounts/lc-b/keys", t, "")
            .await;
        assert_eq!(r.status, 201, "{:?}", r.body);
        let lasting = r.json()["key"].as_str().unwrap().to_owned();
        let lasting_id = r.json()["id"].as_str().unwrap().to_owned();
        assert_eq!(gw.chat(&expiring, "gpt-test").await.status, 200);
        let r = gw
            .admin(Method::GET, "/admin/accounts/lc-b/keys", t, "")
            .await;
        let keys = r.json()["keys"].clone();
        assert_eq!(keys[0]["label"], "ci");
        assert!(keys[0]["expires_at"]
            .as_str()
            .unwrap()
            .starts_with(&harness_time(60)[..19]));
        assert!(keys[1]["label"].is_null() && keys[1]["expires_at"].is_null());
        gw.clock.advance(Duration::from_secs(60));
        let r = gw.chat(&expiring, "gpt-test").await;
        assert_eq!(r.status, 401, "{:?}", r.body);
        assert_eq!(r.code(), "invalid_api_key");
        assert_eq!(gw.chat(&lasting, "gpt-test").await.status, 200);
        let r = post(
            "/admin/accounts/lc-b/keys".into(),
            json!({"expires_at": harness_time(0)}),
        )
        .await;
        assert_eq!(r.status, 400, "{:?}", r.body);

        // Revoking twice: 409.
        let path = format!("/admin/keys/{lasting_id}");
        assert_eq!(gw.admin(Method::DELETE, &path, t, "").await.status, 200);
        let r = gw.admin(Method::DELETE, &path, t, "").await;
        assert_eq!(r.status, 409, "{:?}", r.body);
        assert!(r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already revoked"));

        // A grant that has expired already: 400.
        let r = post(
            "/admin/accounts/lc-b/quota-blocks".into(),
            json!({"credits": 5, "expires_at": harness_time(0)}),
        )
        .await;
        assert_eq!(r.status, 400, "{:?}", r.body);

        // Reset the windows: lc-c may make 5 requests a minute.
        let key = post("/admin/accounts/lc-c/keys".into(), json!({})).await;
        let key = key.json()["key"].as_str().unwrap().to_owned();
        // (The Redis counters outlive the test's database: an earlier run
        // may have used some of this minute already, on the manual clock.)
        let mut admitted = 0;
        loop {
            let status = gw.chat(&key, "other-model").await.status;
            gw.wait_settled().await;
            if status == 429 {
                break;
            }
            assert_eq!(status, 200);
            admitted += 1;
            assert!(admitted <= 5, "the limit is 5 a minute");
        }
        let r = post(
            "/admin/accounts/lc-c/limits/reset?endpoint=nope".into(),
            json!({}),
        )
        .await;
        assert_eq!(r.status, 404, "{:?}", r.body);
        let r = post(
            "/admin/accounts/lc-c/limits/reset?endpoint=other-model".into(),
            json!({}),
        )
        .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.json()["reset"], json!(["other-model"]));
        assert_eq!(gw.chat(&key, "other-model").await.status, 200);
        gw.wait_settled().await;
        let r = post("/admin/accounts/ghost/limits/reset".into(), json!({})).await;
        assert_eq!(r.status, 404, "{:?}", r.body);

        // Delete: refused while credits remain, then forced; keys refused.
        let r = post(
            "/admin/accounts/lc-c/quota-blocks".into(),
            json!({"credits": 50}),
        )
        .await;
        assert_eq!(r.status, 201, "{:?}", r.body);
        let r = gw
            .admin(Method::DELETE, "/admin/accounts/lc-c", t, "")
            .await;
        assert_eq!(r.status, 409, "{:?}", r.body);
        assert!(r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("50 unexpired credits"));
        let r = gw
            .admin(Method::DELETE, "/admin/accounts/lc-c?force=true", t, "")
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(
            (
                r.json()["keys"].as_u64(),
                r.json()["credits_forfeited"].as_u64()
            ),
            (Some(1), Some(50))
        );
        let r = gw.admin(Method::GET, "/admin/accounts/lc-c", t, "").await;
        assert_eq!(r.status, 404);
        let mut status = 0;
        for _ in 0..100 {
            status = gw.chat(&key, "other-model").await.status.as_u16();
            if status == 401 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(status, 401, "a deleted account's key is refused");
        gw.stop().await;
    }
}

// ------------------------------------------ item 6: the lifecycle, CLI

/// The plans of `operator.rs` and one with a day window (so that a test
/// never straddles a window's end).
fn plans_with_daily() -> String {
    format!(
        "{PLANS}  daily:\n    endpoints:\n      gpt-4o:\n        fixed_windows:\n          - window: 86400s\n            limit: 100\n  monthly:\n    endpoints:\n      gpt-4o:\n        fixed_windows:\n          - window: 1mo\n            calendar: utc\n            limit: 100\n"
    )
}

/// The CLI covers the lifecycle against a fresh database, with the real
/// binary: metadata, accounts list and delete, key labels and expiry,
/// revoking twice, expired grants refused and expired blocks marked, and
/// `limits reset` against the Redis counters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_covers_the_account_lifecycle() {
    let Some(db) = fresh_db("lifecli").await else {
        return;
    };
    let dir = TempDir::new("life-cli");
    let config = write_config(&dir, &db, "database");
    dir.write("plans.yaml", &plans_with_daily());
    let config = config.to_str().unwrap();
    let home = dir.path();
    let cli = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--config", config]);
        run(home, &all)
    };
    let refused = |out: Out, needle: &str| {
        assert_eq!(out.code, Some(2), "{}", out.text());
        assert!(out.stderr.contains(needle), "{needle}: {}", out.text());
    };
    let json_of =
        |out: Out| -> serde_json::Value { serde_json::from_str(&ok(out)).expect("JSON output") };
    ok(cli(&[
        "plans",
        "apply",
        dir.path().join("plans.yaml").to_str().unwrap(),
    ]));

    // Metadata from the command line.
    ok(cli(&[
        "accounts",
        "create",
        "acme",
        "--plan",
        "pro",
        "--metadata",
        "owner=ops",
        "--metadata",
        "tier=gold",
    ]));
    let show = json_of(cli(&["accounts", "show", "acme", "--json"]));
    assert_eq!(show["metadata"], json!({"owner": "ops", "tier": "gold"}));
    ok(cli(&[
        "accounts",
        "update",
        "acme",
        "--metadata",
        "tier=platinum",
        "--unset",
        "owner",
    ]));
    let show = json_of(cli(&["accounts", "show", "acme", "--json"]));
    assert_eq!(show["metadata"], json!({"tier": "platinum"}));
    refused(cli(&["accounts", "update", "acme"]), "nothing to update");
    refused(
        cli(&["accounts", "create", "x", "--metadata", "novalue"]),
        "KEY=VALUE",
    );

    // Listing: pages by id, by plan.
    for id in ["b1", "b2"] {
        ok(cli(&["accounts", "create", id]));
    }
    let page = json_of(cli(&["accounts", "list", "--limit", "2", "--json"]));
    let ids = |v: &serde_json::Value| -> Vec<String> {
        v["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids(&page), ["acme", "b1"]);
    assert_eq!(page["next_after"], "b1");
    let page = json_of(cli(&[
        "accounts", "list", "--limit", "2", "--after", "b1", "--json",
    ]));
    assert_eq!(ids(&page), ["b2"]);
    assert!(page["next_after"].is_null());
    let text = ok(cli(&["accounts", "list", "--plan", "pro"]));
    assert!(
        text.starts_with("acme\tpro\t") && !text.contains("b1"),
        "{text}"
    );
    let text = ok(cli(&["accounts", "list", "--limit", "1"]));
    assert!(text.trim_end().ends_with("(more: --after acme)"), "{text}");
    refused(
        cli(&["accounts", "list", "--plan", "ghost"]),
        "plan not found",
    );
    refused(cli(&["accounts", "list", "--limit", "0"]), "--limit");

    // Keys: label and expiry; an expiry in the past is refused.
    let created = json_of(cli(&[
        "keys",
        "create",
        "acme",
        "--label",
        "ci",
        "--expires",
        "2099-01-01T00:00:00Z",
        "--json",
    ]));
    let key_id = created["id"].as_str().unwrap().to_owned();
    let list = ok(cli(&["keys", "list", "acme"]));
    assert!(
        list.contains("label ci") && list.contains("expires 2099-01-01T00:00:00Z"),
        "{list}"
    );
    refused(
        cli(&[
            "keys",
            "create",
            "acme",
            "--expires",
            "2001-01-01T00:00:00Z",
        ]),
        "not in the future",
    );
    // Revoking twice is an error.
    ok(cli(&["keys", "revoke", &key_id]));
    refused(cli(&["keys", "revoke", &key_id]), "already revoked");
    assert!(ok(cli(&["keys", "list", "acme"])).contains("revoked"));

    // Credits: an expired grant is refused; expired blocks are marked.
    refused(
        cli(&[
            "credits",
            "grant",
            "acme",
            "10",
            "--expires",
            "2001-01-01T00:00:00Z",
        ]),
        "not in the future",
    );
    ok(cli(&["credits", "grant", "acme", "10"]));
    ok(cli(&[
        "credits",
        "grant",
        "b1",
        "5",
        "--expires",
        "2099-01-01T00:00:00Z",
    ]));
    ok(cli(&["credits", "expire", "b1"]));
    let balance = ok(cli(&["credits", "balance", "b1"]));
    assert!(
        balance.starts_with("b1: 0 credits") && balance.contains("\t5/5\tEXPIRED "),
        "{balance}"
    );
    let balance = json_of(cli(&["credits", "balance", "b1", "--json"]));
    assert_eq!(balance["blocks"][0]["expired"], true, "{balance}");
    let balance = ok(cli(&["credits", "balance", "acme"]));
    assert!(
        !balance.contains("EXPIRED") && balance.contains("expires never"),
        "{balance}"
    );

    // Delete: refused while credits remain, then forced.
    ok(cli(&["keys", "create", "acme"]));
    refused(cli(&["accounts", "delete", "acme"]), "10 unexpired credits");
    let out = ok(cli(&["accounts", "delete", "acme", "--force"]));
    assert!(
        out.contains(
            "deleted account acme: 2 key(s) and 1 quota block(s) deleted, 10 credits forfeited"
        ),
        "{out}"
    );
    refused(cli(&["accounts", "show", "acme"]), "account not found");
    // Only expired credits left: no --force needed.
    ok(cli(&["accounts", "delete", "b1"]));

    // limits reset: the counters are in Redis.
    let Some(redis) = plangate_tests::redis().await else {
        drop_database(db_name(&db)).await;
        return;
    };
    // A unique account: the gateway's key prefix is shared by every run.
    let acct = plangate_tests::harness::unique("lim");
    ok(cli(&["accounts", "create", &acct, "--plan", "daily"]));
    // A key with a plan of its own: its windows are reset too.
    let key = json_of(cli(&["keys", "create", &acct, "--plan", "daily", "--json"]));
    let key_id = key["id"].as_str().expect("key id").to_owned();
    refused(cli(&["limits", "reset", &acct]), "no counter store");
    let store = plangate::limiter::redis::RedisStore::connect_with(
        &redis,
        plangate::limiter::redis::RedisOptions::default(),
    )
    .await
    .expect("redis");
    let limiter = plangate::limiter::Limiter::new(
        store,
        std::sync::Arc::new(plangate::clock::SystemClock),
        Duration::from_secs(5),
    );
    let plan = plangate::plans::parse::parse_plans(&plans_with_daily(), "plans.yaml").unwrap();
    let daily = plan.plans["daily"].endpoints["gpt-4o"].clone();
    let policy = std::sync::Arc::new(daily.with_key(&key_id, &daily));
    let id = plangate_tests::harness::unique("req");
    let used = || async {
        let info = limiter.info(&acct, "gpt-4o", &policy).await.expect("info");
        // The account's window and the key's own agree here.
        assert_eq!(info.windows[0].used, info.windows[1].used);
        info.windows[1].used
    };
    let before = used().await;
    for i in 0..2 {
        match limiter
            .attempt(&format!("{id}-{i}"), &acct, "gpt-4o", &policy, &[])
            .await
            .expect("attempt")
        {
            plangate::limiter::Attempt::Admitted(permit, _) => {
                permit.end(&[]).await.expect("end");
            }
            plangate::limiter::Attempt::Denied(d, _) => panic!("denied: {d:?}"),
        }
    }
    assert_eq!(used().await, before + 2);
    let with_redis = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--redis-url", &redis]);
        cli(&all)
    };
    refused(
        with_redis(&["limits", "reset", &acct, "--endpoint", "nope"]),
        "not in plan `daily`",
    );
    let out = run(
        home,
        &[
            "limits",
            "reset",
            &acct,
            "--endpoint",
            "gpt-4o",
            "--redis-url",
            &redis,
            "--config",
            config,
        ],
    );
    assert_eq!(out.code, Some(0), "{}", out.text());
    assert!(
        out.stdout.contains(&format!(
            "reset the current rate-limit windows of {acct} on gpt-4o"
        )),
        "{}",
        out.text()
    );
    // Audited: logged at WARN with who and what.
    assert!(
        out.stderr.contains("WARN")
            && out.stderr.contains("rate-limit windows reset")
            && out.stderr.contains(&acct),
        "{}",
        out.text()
    );
    assert_eq!(used().await, 0);

    // An account billed from the 15th counts its months in `1mo@15`
    // counters: those are the ones reset (before, the CLI reset the
    // unanchored `1mo` ones and left the account's month as it was).
    let billed = plangate_tests::harness::unique("bill");
    ok(cli(&["accounts", "create", &billed, "--plan", "monthly"]));
    ok(cli(&["accounts", "billing-anchor", &billed, "15"]));
    let anchored = plan.plans["monthly"].anchored(15);
    let policy = anchored.endpoints["gpt-4o"].clone();
    let used = || async {
        let info = limiter
            .info(&billed, "gpt-4o", &policy)
            .await
            .expect("info");
        info.windows[0].used
    };
    for i in 0..2 {
        match limiter
            .attempt(&format!("{id}-m{i}"), &billed, "gpt-4o", &policy, &[])
            .await
            .expect("attempt")
        {
            plangate::limiter::Attempt::Admitted(permit, _) => {
                permit.end(&[]).await.expect("end");
            }
            plangate::limiter::Attempt::Denied(d, _) => panic!("denied: {d:?}"),
        }
    }
    assert_eq!(used().await, 2);
    ok(with_redis(&["limits", "reset", &billed]));
    assert_eq!(used().await, 0, "the anchored month was reset");
    drop_database(db_name(&db)).await;
}

/// An account deleted and created again under the same id is a new
/// account: its keys, its credits and its wallet work (no wallet or
/// invalidation of the old one stands in its way), and nothing of the old
/// balance comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_id_can_be_used_again_after_deletion() {
    for backend in Backend::all().await {
        let gw = TestGateway::start(Options::new(backend)).await;
        let t = Some(ADMIN_TOKEN);
        let id = plangate_tests::harness::unique("again");
        let paid = json!({"model": "paid-model", "messages": [{"role": "user", "content": "hi"}]});
        for (round, credits) in [(0, 10), (1, 3)] {
            let r = gw
                .admin(
                    Method::POST,
                    "/admin/accounts",
                    t,
                    &json!({"id": id}).to_string(),
                )
                .await;
            assert_eq!(r.status, 201, "round {round}: {:?}", r.body);
            let r = gw
                .admin(
                    Method::POST,
                    &format!("/admin/accounts/{id}/quota-blocks"),
                    t,
                    &json!({"credits": credits}).to_string(),
                )
                .await;
            assert_eq!(r.status, 201, "{:?}", r.body);
            let r = gw
                .admin(Method::POST, &format!("/admin/accounts/{id}/keys"), t, "")
                .await;
            let key = r.json()["key"].as_str().unwrap().to_owned();
            let r = gw.post("/v1/chat/completions", Some(&key), &paid).await;
            assert_eq!(r.status, 200, "round {round}: {:?}", r.body);
            // Only this round's credits: the old balance is gone.
            assert_eq!(
                r.header("x-credits-remaining"),
                Some((credits - 1).to_string().as_str()),
                "round {round}"
            );
            gw.wait_settled().await;
            let r = gw
                .admin(
                    Method::DELETE,
                    &format!("/admin/accounts/{id}?force=true"),
                    t,
                    "",
                )
                .await;
            assert_eq!(r.status, 200, "{:?}", r.body);
        }
        gw.stop().await;
    }
}

/// Under `[plans] source = "database"` the config need not name a plans
/// file: `check-config` passes and says so, `serve` starts (warning that
/// the catalog has no plans yet), and plans arrive through the admin API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_owned_config_needs_no_plans_file() {
    let Some(db) = fresh_db("lifenofile").await else {
        return;
    };
    let dir = TempDir::new("life-nofile");
    let config = write_config(&dir, &db, "database");
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replace("file = \"plans.yaml\"\n", "");
    assert!(!text.contains("plans.yaml"));
    std::fs::write(&config, text).unwrap();
    std::fs::remove_file(dir.path().join("plans.yaml")).unwrap();

    let check = ok(run(
        dir.path(),
        &["check-config", "--config", config.to_str().unwrap()],
    ));
    assert!(
        check.contains("no plans file (the database owns the plans)"),
        "{check}"
    );
    let gw = GatewayProc::spawn(&config, &[]);
    assert!(gw.log().contains("names no file"), "{}", gw.log());
    let yaml = "default_plan: p\nplans:\n  p:\n    endpoints:\n      gpt-4o:\n        fixed_windows:\n          - window: 60s\n            limit: 3\n";
    let r = admin_call(&gw, Method::PUT, "/admin/plans", yaml).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = admin_call(&gw, Method::GET, "/admin/plans", "").await;
    assert_eq!(r.json()["default_plan"], "p", "{:?}", r.body);
    drop(gw);
    drop_database(db_name(&db)).await;
}
