//! Operator experience (issue 14), black-box: every test runs the real
//! `plangate` binary. Stores that fail say so loudly and precisely (`serve
//! --require-stores`, `check-config --connect`, `plangate_store_up`,
//! Postgres errors with their cause and a hint, URLs with passwords
//! masked); admin commands read only `[storage]` of a config; `plangate
//! dev` runs from any directory, twice at once; the README's production
//! block runs verbatim; `--help` describes every command and option.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use plangate_tests::procs::{free_port, Blackhole, GatewayProc};
use plangate_tests::rig;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A fresh directory under the system temp dir, removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(prefix: &str) -> TempDir {
        let dir = std::env::temp_dir().join(plangate_tests::harness::unique(prefix));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }

    pub(crate) fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("dir");
        }
        std::fs::write(&path, text).expect("write");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a finished `plangate` run printed.
#[derive(Debug)]
pub(crate) struct Out {
    pub(crate) code: Option<i32>,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
    elapsed: Duration,
}

impl Out {
    pub(crate) fn text(&self) -> String {
        format!(
            "exit {:?} after {:?}\nstdout:\n{}\nstderr:\n{}",
            self.code, self.elapsed, self.stdout, self.stderr
        )
    }
}

/// The plangate variables of the test's own environment, removed from
/// every run so that only what a test sets counts.
const PLANGATE_VARS: &[&str] = &[
    "PLANGATE_CONFIG",
    "PLANGATE_POSTGRES_URL",
    "PLANGATE_ADMIN_TOKEN",
    "RUST_LOG",
];

fn command(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(plangate_tests::plangate_bin());
    cmd.args(args).current_dir(dir).env("NO_COLOR", "1");
    for var in PLANGATE_VARS {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Read a pipe to its end on a thread of its own.
fn drain(pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = BufReader::new(pipe).read_to_string(&mut s);
        s
    })
}

/// Run `plangate ARGS` in `dir` with `env`; killed after `limit`.
pub(crate) fn plangate(dir: &Path, args: &[&str], env: &[(&str, &str)], limit: Duration) -> Out {
    let start = Instant::now();
    let mut child = command(dir, args, env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn plangate");
    let stdout = drain(child.stdout.take().expect("stdout"));
    let stderr = drain(child.stderr.take().expect("stderr"));
    let code = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Out {
        code,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
        elapsed: start.elapsed(),
    }
}

pub(crate) const PLANS: &str = r#"
default_plan: free
plans:
  free:
    name: Free
    endpoints:
      gpt-4o:
        fixed_windows:
          - window: 60s
            limit: 100
  pro:
    name: Pro
    endpoints:
      gpt-4o:
        fixed_windows:
          - window: 60s
            limit: 1000
          - window: 60s
            limit: 100000
            unit_type: token
"#;

/// A config around `storage` (the `[storage]` lines), with the plans
/// above next to it. `admin_token` and `upstream_auth` are TOML strings
/// (they may hold `${VAR}`s).
fn write_config(dir: &TempDir, storage: &str, admin_token: &str, upstream_auth: &str) -> PathBuf {
    dir.write("plans.yaml", PLANS);
    dir.write(
        "plangate.toml",
        &format!(
            r#"
[server]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"
token = "{admin_token}"

[storage]
{storage}
store_timeout = "100ms"

[plans]
file = "plans.yaml"
watch = false

[[upstreams]]
name = "up"
url = "http://127.0.0.1:{port}"
auth = "{upstream_auth}"

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

/// The test Postgres URL with its database replaced by `db` (and a
/// password put in when it has none, to see it masked: the local test
/// server trusts local connections, so it is not checked).
fn postgres_url_for(db: &str) -> (String, Option<&'static str>) {
    let url = plangate_tests::postgres_url_default();
    let base = url.rsplit_once('/').map_or(url.as_str(), |(b, _)| b);
    let (scheme, rest) = base.split_once("://").expect("a postgres:// URL");
    let (userinfo, host) = rest.rsplit_once('@').unwrap_or(("", rest));
    if userinfo.is_empty() || userinfo.contains(':') {
        return (format!("{base}/{db}"), None);
    }
    const SECRET: &str = "pg-secret-0f9e8d";
    (
        format!("{scheme}://{userinfo}:{SECRET}@{host}/{db}"),
        Some(SECRET),
    )
}

/// `postgres://user:***@host:port/db`, as plangate prints it.
fn masked(url: &str) -> String {
    plangate::health::mask_url(url)
}

/// The database a Postgres URL names.
pub(crate) fn db_name(url: &str) -> &str {
    url.rsplit_once('/').map_or(url, |(_, name)| name)
}

/// Whether the test Postgres is there (a panic instead under
/// `PLANGATE_REQUIRE_SERVICES=1`), without leaving a database behind.
async fn postgres_available(prefix: &str) -> bool {
    match plangate_tests::postgres_db(prefix).await {
        Some(url) => {
            drop_database(db_name(&url)).await;
            true
        }
        None => false,
    }
}

pub(crate) async fn drop_database(name: &str) {
    let url = plangate_tests::postgres_url_default();
    let Ok((client, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await else {
        return;
    };
    tokio::spawn(conn);
    let _ = client
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await;
}

// ------------------------------------------------------ stores, loudly

const REDIS_SECRET: &str = "hunter2-redis-secret";
const OPS_ADMIN_TOKEN: &str = "ops-admin-token-5e6f7a8b9c0d1e2f";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_require_stores_exits_naming_the_store_and_why() {
    let env = [("PLANGATE_ADMIN_TOKEN", OPS_ADMIN_TOKEN)];

    // A Redis URL nobody listens on, with a password: exit 1, the URL
    // with the password masked, and why.
    let dir = TempDir::new("ops-require");
    let port = free_port();
    let redis = format!("redis://:{REDIS_SECRET}@127.0.0.1:{port}");
    let config = write_config(
        &dir,
        &format!("redis_url = \"{redis}\""),
        "${PLANGATE_ADMIN_TOKEN}",
        "Bearer sk-up",
    );
    let config = config.to_str().unwrap();
    let out = tokio::task::block_in_place(|| {
        plangate(
            dir.path(),
            &["serve", "--config", config, "--require-stores"],
            &env,
            Duration::from_secs(30),
        )
    });
    assert_eq!(out.code, Some(1), "{}", out.text());
    assert!(
        out.stderr.contains(&format!(
            "[storage] redis_url redis://:***@127.0.0.1:{port}: Connection refused"
        )),
        "{}",
        out.text()
    );
    assert!(!out.stderr.contains(REDIS_SECRET), "{}", out.text());
    assert!(!out.stderr.contains("plangate listening"), "{}", out.text());

    // A Redis that accepts and never answers, required by the config
    // itself: exit 1 within seconds, naming it.
    let hole = Blackhole::start().await;
    let dir = TempDir::new("ops-require-hole");
    let config = write_config(
        &dir,
        &format!(
            "redis_url = \"redis://:{REDIS_SECRET}@{}\"\nrequire_at_start = true",
            hole.addr
        ),
        "${PLANGATE_ADMIN_TOKEN}",
        "Bearer sk-up",
    );
    let config = config.to_str().unwrap();
    let out = tokio::task::block_in_place(|| {
        plangate(
            dir.path(),
            &["serve", "--config", config],
            &env,
            Duration::from_secs(30),
        )
    });
    assert_eq!(out.code, Some(1), "{}", out.text());
    assert!(
        out.stderr
            .contains(&format!("[storage] redis_url redis://:***@{}", hole.addr)),
        "{}",
        out.text()
    );
    assert!(!out.stderr.contains(REDIS_SECRET), "{}", out.text());
    assert!(out.elapsed < Duration::from_secs(15), "{}", out.text());

    // A Postgres database that does not exist: exit 1, the server and the
    // database named, the cause, and what to do.
    if !postgres_available("opsreq").await {
        return;
    }
    let db = format!("pgt_ops_nodb_{}", std::process::id());
    let (url, secret) = postgres_url_for(&db);
    let dir = TempDir::new("ops-require-pg");
    let config = write_config(
        &dir,
        &format!("postgres_url = \"{url}\""),
        "${PLANGATE_ADMIN_TOKEN}",
        "Bearer sk-up",
    );
    let config = config.to_str().unwrap();
    let out = tokio::task::block_in_place(|| {
        plangate(
            dir.path(),
            &["serve", "--config", config, "--require-stores"],
            &env,
            Duration::from_secs(30),
        )
    });
    assert_eq!(out.code, Some(1), "{}", out.text());
    for needle in [
        format!("[storage] postgres_url {}", masked(&url)),
        format!("database \"{db}\" does not exist"),
        "run `plangate migrate`".to_owned(),
    ] {
        assert!(out.stderr.contains(&needle), "{needle}: {}", out.text());
    }
    if let Some(secret) = secret {
        assert!(!out.stderr.contains(secret), "{}", out.text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_redis_url_is_logged_at_error_measured_and_not_ready() {
    let dir = TempDir::new("ops-degraded");
    let port = free_port();
    let config = write_config(
        &dir,
        &format!("redis_url = \"redis://:{REDIS_SECRET}@127.0.0.1:{port}\""),
        "${PLANGATE_ADMIN_TOKEN}",
        "Bearer sk-up",
    );
    // Starts anyway (on_store_error = "open"), not ready.
    let mut gw = tokio::task::block_in_place(|| {
        GatewayProc::spawn(&config, &[("PLANGATE_ADMIN_TOKEN", OPS_ADMIN_TOKEN)])
    });
    let client = rig::http_client();
    let admin = gw.admin.expect("admin listener");
    let metrics = rig::get(&client, admin, "/metrics", Some(OPS_ADMIN_TOKEN)).await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(
        text.contains("# TYPE plangate_store_up gauge\nplangate_store_up{store=\"redis\"} 0\n"),
        "{text}"
    );
    let ready = rig::get(&client, gw.main, "/readyz", None).await;
    assert_eq!(ready.status, 503);
    let log = gw.log();
    let error = log
        .lines()
        .find(|l| l.contains("ERROR") && l.contains("[storage] redis_url unreachable"))
        .unwrap_or_else(|| panic!("no ERROR line for the counter store:\n{log}"));
    for needle in [
        "LIMITS ARE NOT ENFORCED",
        &format!("url=redis://:***@127.0.0.1:{port}"),
        "Connection refused",
    ] {
        assert!(error.contains(needle), "{needle}: {error}");
    }
    assert!(!log.contains(REDIS_SECRET), "{log}");
    assert!(gw.terminate());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_connect_says_which_store_fails_and_why() {
    let (Some(db), Some(redis)) = (
        plangate_tests::postgres_db("opsconn").await,
        plangate_tests::redis().await,
    ) else {
        return;
    };
    let env = [("PLANGATE_ADMIN_TOKEN", OPS_ADMIN_TOKEN)];
    let dir = TempDir::new("ops-connect");
    let storage = format!("postgres_url = \"{db}\"\nredis_url = \"{redis}\"");
    let config = write_config(&dir, &storage, "${PLANGATE_ADMIN_TOKEN}", "Bearer sk");
    let config = config.to_str().unwrap();
    let check = |args: &[&str]| {
        tokio::task::block_in_place(|| plangate(dir.path(), args, &env, Duration::from_secs(60)))
    };

    // Reachable, but never migrated.
    let out = check(&["check-config", "--config", config, "--connect"]);
    assert_eq!(out.code, Some(1), "{}", out.text());
    assert!(
        out.stderr.contains(&format!(
            "[storage] postgres_url {}: the database schema is missing or outdated; run `plangate migrate`",
            masked(&db)
        )),
        "{}",
        out.text()
    );
    assert!(
        out.stdout
            .contains(&format!("[storage] redis_url {}: ok", masked(&redis))),
        "{}",
        out.text()
    );

    // Migrated: both stores answer.
    let out = check(&["migrate", "--config", config]);
    assert_eq!(out.code, Some(0), "{}", out.text());
    let out = check(&["check-config", "--config", config, "--connect"]);
    assert_eq!(out.code, Some(0), "{}", out.text());
    assert!(out.stdout.starts_with("ok: "), "{}", out.text());
    assert!(
        out.stdout.contains(&format!(
            "[storage] postgres_url {}: ok, schema version",
            masked(&db)
        )),
        "{}",
        out.text()
    );

    // A wrong Redis URL: valid offline, named with its reason online.
    let port = free_port();
    let storage = format!(
        "postgres_url = \"{db}\"\nredis_url = \"redis://:{REDIS_SECRET}@127.0.0.1:{port}\""
    );
    let config = write_config(&dir, &storage, "${PLANGATE_ADMIN_TOKEN}", "Bearer sk");
    let config = config.to_str().unwrap();
    let out = check(&["check-config", "--config", config]);
    assert_eq!(out.code, Some(0), "{}", out.text());
    let out = check(&["check-config", "--config", config, "--connect"]);
    assert_eq!(out.code, Some(1), "{}", out.text());
    assert!(
        out.stderr.contains(&format!(
            "[storage] redis_url redis://:***@127.0.0.1:{port}: Connection refused"
        )),
        "{}",
        out.text()
    );
    assert!(
        out.stdout.contains("[storage] postgres_url") && !out.stderr.contains("postgres_url"),
        "only the failing store is an error: {}",
        out.text()
    );
    assert!(!out.text().contains(REDIS_SECRET), "{}", out.text());
    drop_database(db_name(&db)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_errors_name_the_server_the_cause_and_the_fix() {
    if !postgres_available("opsprobe").await {
        return;
    }
    let dir = TempDir::new("ops-pgerr");
    let run = |args: &[&str]| {
        tokio::task::block_in_place(|| plangate(dir.path(), args, &[], Duration::from_secs(60)))
    };

    // A database that does not exist: one line naming the server and the
    // database, the cause, and `plangate migrate`, which then creates it.
    let db = format!("pgt_ops_created_{}", std::process::id());
    drop_database(&db).await;
    let (url, secret) = postgres_url_for(&db);
    let out = run(&["plans", "list", "--postgres-url", &url]);
    assert_eq!(out.code, Some(1), "{}", out.text());
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.text());
    for needle in [
        format!("Postgres at {}", masked(&url)),
        format!("database \"{db}\" does not exist (3D000)"),
        "run `plangate migrate`, which creates it".to_owned(),
    ] {
        assert!(out.stderr.contains(&needle), "{needle}: {}", out.text());
    }
    let out = run(&["migrate", "--postgres-url", &url]);
    assert_eq!(out.code, Some(0), "{}", out.text());
    assert!(
        out.stdout
            .starts_with(&format!("created database {db}\napplied V1__init")),
        "{}",
        out.text()
    );
    let out = run(&["plans", "list", "--postgres-url", &url]);
    assert_eq!(out.code, Some(0), "{}", out.text());
    assert_eq!(out.stdout.trim(), "no plans");
    if let Some(secret) = secret {
        assert!(!out.text().contains(secret));
    }
    drop_database(&db).await;

    // Nobody listening: the host and port, and the cause.
    let port = free_port();
    let url = format!("postgres://gw:pw-secret-1a2b@127.0.0.1:{port}/plangate");
    let out = run(&["credits", "balance", "acme", "--postgres-url", &url]);
    assert_eq!(out.code, Some(1), "{}", out.text());
    assert!(
        out.stderr.contains(&format!(
            "Postgres at postgres://gw:***@127.0.0.1:{port}/plangate: error connecting to server: Connection refused"
        )),
        "{}",
        out.text()
    );
    assert!(!out.stderr.contains("pw-secret-1a2b"), "{}", out.text());
}

// ------------------------------------------------- admin CLI and config

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_read_only_the_storage_section() {
    let Some(db) = plangate_tests::postgres_db("opsadmin").await else {
        return;
    };
    plangate::catalog::postgres::migrate(&db)
        .await
        .expect("migrate");
    // Neither the admin token nor the upstream's key is set where the
    // catalog is managed.
    let dir = TempDir::new("ops-admin");
    let config = write_config(
        &dir,
        &format!("postgres_url = \"{db}\""),
        "${PLANGATE_OPS_UNSET_ADMIN_TOKEN}",
        "Bearer ${PLANGATE_OPS_UNSET_UPSTREAM_KEY}",
    );
    let config_arg = config.to_str().unwrap();
    let elsewhere = TempDir::new("ops-admin-cwd");
    let run = |cwd: &Path, args: &[&str], env: &[(&str, &str)]| {
        tokio::task::block_in_place(|| plangate(cwd, args, env, Duration::from_secs(60)))
    };
    let ok = |out: Out| {
        assert_eq!(out.code, Some(0), "{}", out.text());
        out.stdout
    };

    // --config FILE.
    let home = elsewhere.path();
    ok(run(
        home,
        &[
            "plans",
            "apply",
            dir.path().join("plans.yaml").to_str().unwrap(),
            "--config",
            config_arg,
        ],
        &[],
    ));
    ok(run(
        home,
        &[
            "accounts", "create", "acme", "--plan", "pro", "--config", config_arg,
        ],
        &[],
    ));
    ok(run(
        home,
        &["credits", "grant", "acme", "10", "--config", config_arg],
        &[],
    ));
    let balance = ok(run(
        home,
        &["credits", "balance", "acme", "--config", config_arg],
        &[],
    ));
    assert!(balance.starts_with("acme: 10 credits"), "{balance}");

    // ./plangate.toml when no config is named.
    let show = ok(run(dir.path(), &["accounts", "show", "acme"], &[]));
    assert!(show.contains("plan: pro"), "{show}");
    // PLANGATE_CONFIG.
    let balance = ok(run(
        home,
        &["credits", "balance", "acme"],
        &[("PLANGATE_CONFIG", config_arg)],
    ));
    assert!(balance.starts_with("acme: 10 credits"), "{balance}");

    // The routes' units still check plans applied with the config (its
    // own plans file: under the default `[plans] source = "file"` no other
    // file may be applied).
    let bad = dir.write(
        "plans.yaml",
        "plans:\n  p:\n    endpoints:\n      e:\n        fixed_windows:\n          - window: 60s\n            limit: 1\n            unit_type: tokens\n",
    );
    let out = run(
        home,
        &[
            "plans",
            "apply",
            bad.to_str().unwrap(),
            "--config",
            config_arg,
        ],
        &[],
    );
    assert_eq!(out.code, Some(2), "{}", out.text());
    assert!(
        out.stderr.contains("did you mean `token`?"),
        "{}",
        out.text()
    );

    // Nothing named and no ./plangate.toml: what to do.
    let out = run(home, &["keys", "list", "acme"], &[]);
    assert_eq!(out.code, Some(2), "{}", out.text());
    assert!(
        out.stderr.contains("--postgres-url") && out.stderr.contains("PLANGATE_CONFIG"),
        "{}",
        out.text()
    );
    // The whole config (serve, check-config) still needs every variable.
    let out = run(home, &["check-config", "--config", config_arg], &[]);
    assert_eq!(out.code, Some(2), "{}", out.text());
    assert!(out.stderr.contains("admin.token"), "{}", out.text());
    drop_database(db_name(&db)).await;
}

/// `accounts create --billing-anchor` and `accounts billing-anchor`: set,
/// shown, changed, cleared; days outside 1 to 31 refused (exit 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_anchors_from_the_command_line() {
    let Some(db) = plangate_tests::postgres_db("opsanchor").await else {
        return;
    };
    plangate::catalog::postgres::migrate(&db)
        .await
        .expect("migrate");
    let dir = TempDir::new("ops-anchor");
    let config = write_config(&dir, &format!("postgres_url = \"{db}\""), "t", "Bearer k");
    let config_arg = config.to_str().unwrap();
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--config", config_arg]);
        tokio::task::block_in_place(|| plangate(dir.path(), &all, &[], Duration::from_secs(60)))
    };
    let ok = |out: Out| {
        assert_eq!(out.code, Some(0), "{}", out.text());
        out.stdout
    };
    let created = ok(run(&[
        "accounts",
        "create",
        "acme",
        "--billing-anchor",
        "15",
    ]));
    assert!(created.contains("billing month: from day 15"), "{created}");
    ok(run(&["accounts", "billing-anchor", "acme", "31"]));
    let show = ok(run(&["accounts", "show", "acme"]));
    assert!(show.contains("billing month: from day 31"), "{show}");
    for bad in ["0", "32", "first"] {
        let out = run(&["accounts", "billing-anchor", "acme", bad]);
        assert_eq!(out.code, Some(2), "{bad}: {}", out.text());
    }
    let out = run(&["accounts", "create", "other", "--billing-anchor", "32"]);
    assert_eq!(out.code, Some(2), "{}", out.text());
    ok(run(&["accounts", "billing-anchor", "acme", "none"]));
    let show = ok(run(&["accounts", "show", "acme"]));
    assert!(!show.contains("billing month"), "{show}");
    drop_database(db_name(&db)).await;
}

/// The shell block under "## Running in production" in README.md.
fn readme_production_block() -> String {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let section = readme
        .split("\n## Running in production")
        .nth(1)
        .expect("README.md has a \"Running in production\" section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .expect("a ```sh block in that section");
    block.to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_production_block_runs_verbatim() {
    use std::os::unix::process::CommandExt;
    let Some(redis) = plangate_tests::redis().await else {
        return;
    };
    if !postgres_available("opsreadme").await {
        return;
    }
    // The example config, pointed at a database of this test's own (which
    // the block's `plangate migrate` creates), the test Redis and free
    // ports; the block itself runs as written.
    let db = format!("pgt_ops_readme_{}", std::process::id());
    drop_database(&db).await;
    let (url, _) = postgres_url_for(&db);
    let mut config =
        std::fs::read_to_string(repo().join("config/plangate.toml")).expect("example config");
    for (from, to) in [
        ("listen = \"0.0.0.0:8080\"", "listen = \"127.0.0.1:0\""),
        ("listen = \"127.0.0.1:9090\"", "listen = \"127.0.0.1:0\""),
        (
            "postgres_url = \"postgres://postgres@127.0.0.1:5432/plangate\"",
            &format!("postgres_url = \"{url}\""),
        ),
        (
            "redis_url = \"redis://127.0.0.1:6379\"",
            &format!("redis_url = \"{redis}\""),
        ),
    ] {
        assert!(
            config.contains(from),
            "config/plangate.toml has no `{from}`"
        );
        config = config.replace(from, to);
    }
    let dir = TempDir::new("ops-readme");
    dir.write("config/plangate.toml", &config);
    dir.write(
        "config/plans.yaml",
        &std::fs::read_to_string(repo().join("config/plans.yaml")).expect("example plans"),
    );
    // `plangate` on the PATH, as an installed binary would be.
    let bin = TempDir::new("ops-readme-bin");
    std::os::unix::fs::symlink(plangate_tests::plangate_bin(), bin.path().join("plangate"))
        .expect("symlink");
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let block = readme_production_block();
    let mut cmd = Command::new("bash");
    cmd.args(["-euo", "pipefail", "-c", &block])
        .current_dir(dir.path())
        .env("PATH", path)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    for var in PLANGATE_VARS {
        if *var != "RUST_LOG" {
            cmd.env_remove(var);
        }
    }
    let mut child = cmd.spawn().expect("bash");
    let seen = Arc::new(Mutex::new(String::new()));
    let copy = |pipe: Box<dyn Read + Send>, seen: Arc<Mutex<String>>| {
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut s = seen.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        })
    };
    let out_thread = copy(Box::new(child.stdout.take().unwrap()), seen.clone());
    let err_thread = copy(Box::new(child.stderr.take().unwrap()), seen.clone());
    let deadline = Instant::now() + Duration::from_secs(120);
    let outcome = loop {
        if seen.lock().unwrap().contains("plangate listening") {
            break None;
        }
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if Instant::now() > deadline {
            break Some(std::process::ExitStatus::default());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Stop the block's process group (bash and the gateway it started),
    // gracefully, else for good.
    let group = format!("-{}", child.id());
    let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("wait").is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if child.try_wait().expect("wait").is_none() {
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
    }
    let _ = child.wait();
    let _ = out_thread.join();
    let _ = err_thread.join();
    let seen = seen.lock().unwrap().clone();
    drop_database(&db).await;
    assert!(
        outcome.is_none(),
        "the block stopped before the gateway listened ({outcome:?}):\n{block}\n---\n{seen}"
    );
    for needle in [
        "created database",
        "applied V1__init",
        "[storage] postgres_url",
        "created key",
        "granted 10000 credits to acme",
    ] {
        assert!(seen.contains(needle), "{needle}:\n{seen}");
    }
}

// ------------------------------------------------------------ dev mode

/// A running `plangate dev`, as its banner describes it.
struct DevProc {
    child: Child,
    gateway: SocketAddr,
    admin: Option<SocketAddr>,
    key: String,
    plans: PathBuf,
}

impl DevProc {
    /// Start `plangate dev ARGS` in `dir` and read its banner.
    fn start(dir: &Path, args: &[&str]) -> DevProc {
        let mut all = vec!["dev"];
        all.extend_from_slice(args);
        let mut child = command(dir, &all, &[])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn plangate dev");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let field = |line: &str, name: &str| {
            line.trim_start()
                .strip_prefix(name)
                .map(|v| v.split_whitespace().next().unwrap_or("").to_owned())
        };
        let addr =
            |v: String| -> SocketAddr { v.trim_start_matches("http://").parse().expect("address") };
        let (mut gateway, mut admin, mut plans) = (None, None, None);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                let _ = child.kill();
                let _ = child.wait();
                panic!("plangate dev printed no banner");
            };
            if let Some(v) = field(&line, "gateway:") {
                gateway = Some(addr(v));
            } else if let Some(v) = field(&line, "admin API:") {
                admin = Some(addr(v));
            } else if let Some(v) = field(&line, "plans:") {
                plans = Some(PathBuf::from(v));
            } else if let Some(key) = field(&line, "demo API key:") {
                return DevProc {
                    child,
                    gateway: gateway.expect("gateway line"),
                    admin,
                    key,
                    plans: plans.expect("plans line"),
                };
            }
        }
    }

    /// SIGTERM, and whether it exited by itself within 15 s.
    fn stop(mut self) -> bool {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for DevProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dev_gateways_from_a_temp_dir_both_serve() {
    let dir = TempDir::new("ops-dev");
    // Started at once, with the same (default) addresses: the second
    // finds them in use and takes free ports; each has its own mock.
    let (a, b) = tokio::task::block_in_place(|| {
        std::thread::scope(|s| {
            let a = s.spawn(|| DevProc::start(dir.path(), &[]));
            let b = s.spawn(|| DevProc::start(dir.path(), &[]));
            (a.join().unwrap(), b.join().unwrap())
        })
    });
    assert_ne!(a.gateway, b.gateway);
    assert_ne!(a.admin, b.admin);
    let client = rig::http_client();
    for dev in [&a, &b] {
        let r = rig::chat(
            &client,
            dev.gateway,
            "/v1/chat/completions",
            &dev.key,
            "gpt-4-turbo",
            &[],
        )
        .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.header("x-ratelimit-limit-requests"), Some("3"));
        // The built-in plans, in a directory of its own.
        assert!(dev.plans.is_file(), "{}", dev.plans.display());
        assert!(!dev.plans.starts_with(dir.path()));
    }
    assert_ne!(a.plans, b.plans);
    // Nothing was written where it ran; its own files go at exit.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    let plans = [a.plans.clone(), b.plans.clone()];
    assert!(tokio::task::block_in_place(|| a.stop() && b.stop()));
    for p in plans {
        assert!(!p.exists(), "{} left behind", p.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_takes_listen_addresses_and_refuses_a_busy_one_clearly() {
    let dir = TempDir::new("ops-dev-listen");
    let admin_port = free_port();
    let admin_listen = format!("127.0.0.1:{admin_port}");
    let dev = tokio::task::block_in_place(|| {
        DevProc::start(
            dir.path(),
            &["--listen", "127.0.0.1:0", "--admin-listen", &admin_listen],
        )
    });
    assert_eq!(dev.admin, Some(admin_listen.parse().unwrap()));
    assert_ne!(dev.gateway.port(), 0);
    let client = rig::http_client();
    let r = rig::get(&client, dev.gateway, "/healthz", None).await;
    assert_eq!(r.status, 200);

    // An address given on the command line that is in use: exit 1 with
    // what to do, not a silent move.
    let busy = dev.gateway.to_string();
    let out = tokio::task::block_in_place(|| {
        plangate(
            dir.path(),
            &["dev", "--listen", &busy, "--admin-listen", "127.0.0.1:0"],
            &[],
            Duration::from_secs(60),
        )
    });
    assert_eq!(out.code, Some(1), "{}", out.text());
    for needle in [busy.as_str(), "in use", "--listen", "port 0"] {
        assert!(out.stderr.contains(needle), "{needle}: {}", out.text());
    }
    assert!(tokio::task::block_in_place(|| dev.stop()));
}

// ---------------------------------------------------------------- help

/// The entries of `section` ("Commands", "Arguments", "Options") of a help
/// text: (name, description). clap puts a description after the name on
/// its line, or (in long help with multi-line descriptions) on the lines
/// below it, indented further.
fn help_entries(help: &str, section: &str) -> Vec<(String, String)> {
    let header = format!("{section}:");
    let mut entries: Vec<(String, String)> = Vec::new();
    let body = help
        .lines()
        .skip_while(|l| *l != header)
        .skip(1)
        .take_while(|l| l.is_empty() || l.starts_with(' '));
    for line in body {
        let indent = line.len() - line.trim_start().len();
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        if indent <= 6 {
            let (name, desc) = text.split_once("  ").unwrap_or((text, ""));
            entries.push((name.trim().to_owned(), desc.trim().to_owned()));
        } else if let Some(last) = entries.last_mut() {
            if last.1.is_empty() {
                last.1 = text.to_owned();
            }
        }
    }
    entries
}

#[test]
fn help_describes_every_command_and_option() {
    let dir = std::env::temp_dir();
    let help = |path: &[&str]| {
        let mut args = path.to_vec();
        args.push("--help");
        let out = plangate(&dir, &args, &[], Duration::from_secs(30));
        assert_eq!(out.code, Some(0), "{}", out.text());
        out.stdout
    };
    let top = help(&[]);
    let start = top
        .split("Start here:")
        .nth(1)
        .expect("a Start here section");
    for first in ["plangate dev", "plangate migrate", "plangate serve"] {
        assert!(start.contains(first), "{first}:\n{top}");
    }
    let serve = help(&["serve"]);
    assert!(serve.contains("PLANGATE_ADMIN_TOKEN"), "{serve}");
    assert!(serve.contains("--require-stores"), "{serve}");

    // Every command, at every level: a description for each subcommand,
    // argument and option.
    let mut todo: Vec<Vec<String>> = vec![Vec::new()];
    let mut seen = 0;
    while let Some(path) = todo.pop() {
        let args: Vec<&str> = path.iter().map(String::as_str).collect();
        let text = help(&args);
        seen += 1;
        let about = text.lines().next().unwrap_or("");
        assert!(
            !about.trim().is_empty(),
            "{args:?}: no description:\n{text}"
        );
        for section in ["Commands", "Arguments", "Options"] {
            for (name, desc) in help_entries(&text, section) {
                assert!(
                    !desc.is_empty(),
                    "plangate {}: {section} `{name}` has no description:\n{text}",
                    args.join(" ")
                );
                if section == "Commands" && name != "help" {
                    let mut sub = path.clone();
                    sub.push(name);
                    todo.push(sub);
                }
            }
        }
    }
    // plangate, 9 commands, and the subcommands of plans (5), accounts
    // (3), keys (3) and credits (4).
    assert!(seen >= 25, "only {seen} help texts");
}
