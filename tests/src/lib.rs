//! Support for plangate's black-box tests: finding the real services the
//! tests need, and failing loudly when they are required but absent.
//!
//! `tests/run.sh` (the README's test command, which CI runs) sets
//! `PLANGATE_REQUIRE_SERVICES=1`, so there a missing Postgres or Redis fails
//! the test instead of skipping it.

pub mod harness;
pub mod litellm;
pub mod procs;
pub mod rig;
pub mod soak;
pub mod webdriver;

use std::time::Duration;

/// Redis URL for tests: `PLANGATE_TEST_REDIS_URL`, default the local server.
pub fn redis_url_default() -> String {
    std::env::var("PLANGATE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Postgres URL of the server (database `postgres`) for tests:
/// `PLANGATE_TEST_POSTGRES_URL`, default the local server.
pub fn postgres_url_default() -> String {
    std::env::var("PLANGATE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn services_required() -> bool {
    std::env::var("PLANGATE_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

/// Skip (loudly) or fail (under CI) when a service is absent.
fn absent(service: &str, url: &str, why: &str) -> Option<String> {
    if services_required() {
        panic!(
            "{service} at {url} is required (PLANGATE_REQUIRE_SERVICES=1) but unreachable: {why}"
        );
    }
    eprintln!(
        "\n*** SKIPPING: {service} at {url} is unreachable ({why}).\n*** Run ./tests/run.sh to start it and run every test.\n"
    );
    None
}

/// The Redis URL if a server answers PING there; `None` (with a loud
/// message) if not, or a panic when services are required.
pub async fn redis() -> Option<String> {
    let url = redis_url_default();
    let check = async {
        let client = redis::Client::open(url.as_str()).map_err(|e| e.to_string())?;
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| e.to_string())?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(Duration::from_secs(3), check).await {
        Ok(Ok(_)) => Some(url),
        Ok(Err(e)) => absent("Redis", &url, &e),
        Err(_) => absent("Redis", &url, "no answer within 3s"),
    }
}

/// A fresh, empty Postgres database for one test; returns its URL.
/// `None` (loudly) when Postgres is absent, or a panic when required.
pub async fn postgres_db(prefix: &str) -> Option<String> {
    let url = postgres_url_default();
    let connect = async {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Ok::<_, String>(client)
    };
    let client = match tokio::time::timeout(Duration::from_secs(5), connect).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return absent("Postgres", &url, &e),
        Err(_) => return absent("Postgres", &url, "no answer within 5s"),
    };
    let name = format!(
        "pgt_{}_{}_{}",
        prefix,
        std::process::id(),
        NEXT_DB.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    );
    // Two statements, not one batch: a multi-statement simple query runs in
    // an implicit transaction, where DROP/CREATE DATABASE are not allowed.
    for sql in [
        format!("DROP DATABASE IF EXISTS {name}"),
        format!("CREATE DATABASE {name}"),
    ] {
        client
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("creating test database {name}: {e:?}"));
    }
    let base = url.rsplit_once('/').map(|(b, _)| b).unwrap_or(&url);
    Some(format!("{base}/{name}"))
}

static NEXT_DB: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The `plangate` binary the process tests run, if it is there:
/// `PLANGATE_BIN`, else the one in the same target directory as this
/// executable: a test binary lives in `target/debug/deps/`, a helper binary
/// such as `soak` in `target/debug/`. `tests/run.sh` builds it before the
/// tests; a plain `cargo test` of this package does not.
pub fn built_plangate() -> Option<std::path::PathBuf> {
    if let Ok(p) = std::env::var("PLANGATE_BIN") {
        return Some(std::path::PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let name = format!("plangate{}", std::env::consts::EXE_SUFFIX);
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(&name))
        .find(|bin| bin.is_file())
}

/// Where gateways started by tests keep their logs: `PLANGATE_TEST_LOG_DIR`
/// (set by tests/run.sh, which greps them all for API keys and admin
/// tokens once every test has run).
pub fn test_log_dir() -> Option<std::path::PathBuf> {
    std::env::var_os("PLANGATE_TEST_LOG_DIR")
        .filter(|d| !d.is_empty())
        .map(std::path::PathBuf::from)
}

/// Send the logs of in-process gateways of this test binary to a file in
/// [`test_log_dir`] (at `RUST_LOG`, default `info,plangate=debug`), once
/// per process. A
/// no-op without that directory, or if a test installed its own subscriber.
pub fn capture_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    let Some(dir) = test_log_dir() else {
        return;
    };
    ONCE.call_once(|| {
        let exe = std::env::current_exe().ok();
        let name = exe
            .as_deref()
            .and_then(|e| e.file_stem())
            .and_then(|s| s.to_str())
            .unwrap_or("tests");
        let path = dir.join(format!("in-process-{name}-{}.log", std::process::id()));
        let Ok(file) = std::fs::File::create(&path) else {
            return;
        };
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,plangate=debug"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(std::sync::Mutex::new(file))
            .try_init();
    });
}

/// [`built_plangate`], or a panic saying how to build it.
pub fn plangate_bin() -> std::path::PathBuf {
    built_plangate().expect(
        "target/debug/plangate is missing: build it first (cargo build -p plangate, or ./tests/run.sh)",
    )
}
