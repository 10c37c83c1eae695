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

    let config = write_config(&dir, &db, "database");
    let config = config.to_str().unwrap();
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
