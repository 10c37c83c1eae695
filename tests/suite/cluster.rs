//! Scale-out: counters on a real 3-master Redis Cluster (started on
//! loopback by tests/cluster.sh), two gateways sharing it, and the
//! Kubernetes ConfigMap update (an atomic `..data` symlink swap) seen by a
//! running `plangate serve`.
//!
//! The cluster's node URLs come from `PLANGATE_TEST_REDIS_CLUSTER`
//! (comma-separated; tests/run.sh sets it); without it the tests run
//! tests/cluster.sh themselves, which starts the cluster if needed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use plangate::catalog::postgres::migrate;
use plangate::clock::{ManualClock, SharedClock};
use plangate::config::Config;
use plangate::limiter::keys::Keys;
use plangate::limiter::redis::{RedisOptions, RedisStore};
use plangate::limiter::{
    AttemptRequest, CounterStore, KeyScope, UsageRequest, Verdict, WindowSpec,
};
use plangate::plans::{Period, Unit, Window, WindowLen};
use plangate_tests::harness::{send_to, unique, ADMIN_TOKEN, T0_MS};
use tokio::sync::watch;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

/// The test cluster's node URLs, or `None` (loudly) when it cannot be had;
/// a panic instead under `PLANGATE_REQUIRE_SERVICES=1` (tests/run.sh).
async fn cluster() -> Option<Vec<String>> {
    let required = std::env::var("PLANGATE_REQUIRE_SERVICES").is_ok_and(|v| v == "1");
    let absent = |why: String| -> Option<Vec<String>> {
        if required {
            panic!(
                "Redis Cluster is required (PLANGATE_REQUIRE_SERVICES=1) but unavailable: {why}"
            );
        }
        eprintln!(
            "\n*** SKIPPING: no Redis Cluster ({why}).\n*** Run ./tests/run.sh (or tests/cluster.sh) to start one.\n"
        );
        None
    };
    let list = match std::env::var("PLANGATE_TEST_REDIS_CLUSTER") {
        Ok(list) => list,
        Err(_) => {
            let out = tokio::task::spawn_blocking(|| {
                Command::new(repo().join("tests/cluster.sh"))
                    .stderr(Stdio::inherit())
                    .output()
            })
            .await
            .expect("join");
            match out {
                Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
                Ok(o) => return absent(format!("tests/cluster.sh exited with {}", o.status)),
                Err(e) => return absent(format!("tests/cluster.sh: {e}")),
            }
        }
    };
    let nodes: Vec<String> = list.split(',').map(|s| s.trim().to_owned()).collect();
    let ping = async {
        let client =
            redis::cluster::ClusterClient::new(nodes.clone()).map_err(|e| e.to_string())?;
        let mut c = client
            .get_async_connection()
            .await
            .map_err(|e| e.to_string())?;
        redis::cmd("PING")
            .query_async::<()>(&mut c)
            .await
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(Duration::from_secs(5), ping).await {
        Ok(Ok(())) => Some(nodes),
        Ok(Err(e)) => absent(format!("{list}: {e}")),
        Err(_) => absent(format!("{list}: no answer within 5s")),
    }
}

fn options(prefix: &str) -> RedisOptions {
    RedisOptions {
        key_prefix: prefix.to_owned(),
        // The box is shared and often loaded; slowness is not under test.
        response_timeout: Duration::from_secs(5),
        ..RedisOptions::default()
    }
}

/// The keys under `keys`' prefix on each master, by node URL (SCAN on a
/// cluster node lists only that node's keys), with their slots checked
/// against what the node owns.
async fn keys_per_node(nodes: &[String], keys: &Keys) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for url in nodes {
        let mut c = redis::Client::open(url.as_str())
            .expect("node url")
            .get_multiplexed_async_connection()
            .await
            .expect("node connection");
        let mut found = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(keys.scan_pattern())
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut c)
                .await
                .expect("SCAN");
            found.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        for k in &found {
            // A key is only ever stored on the master owning its slot;
            // COUNTKEYSINSLOT on this node confirms the slot is served here.
            let slot: u64 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(k)
                .query_async(&mut c)
                .await
                .expect("KEYSLOT");
            let here: u64 = redis::cmd("CLUSTER")
                .arg("COUNTKEYSINSLOT")
                .arg(slot)
                .query_async(&mut c)
                .await
                .expect("COUNTKEYSINSLOT");
            assert!(
                here >= 1,
                "{k} (slot {slot}) listed by {url} but not counted there"
            );
            let pttl: i64 = redis::cmd("PTTL")
                .arg(k)
                .query_async(&mut c)
                .await
                .expect("PTTL");
            assert!(pttl > 0, "{k} on {url} has no TTL ({pttl})");
        }
        out.insert(url.clone(), found);
    }
    out
}

async fn delete_keys(nodes: &[String], per_node: &BTreeMap<String, Vec<String>>) {
    for url in nodes {
        let keys = &per_node[url];
        if keys.is_empty() {
            continue;
        }
        let mut c = redis::Client::open(url.as_str())
            .expect("node url")
            .get_multiplexed_async_connection()
            .await
            .expect("node connection");
        // One DEL per key: keys of different slots cannot share a DEL.
        for k in keys {
            let _: i64 = redis::cmd("DEL")
                .arg(k)
                .query_async(&mut c)
                .await
                .expect("DEL");
        }
    }
}

const LIMIT: u64 = 100;

fn minute_window() -> [WindowSpec; 1] {
    [WindowSpec {
        len: WindowLen::Fixed(60),
        limit: LIMIT,
        unit: Unit::request(),
        amount: 1,
    }]
}

async fn attempt(store: &RedisStore, account: &str, id: &str) -> Verdict {
    let windows = minute_window();
    store
        .attempt(&AttemptRequest {
            request_id: id,
            account,
            endpoint: "e",
            now_ms: T0_MS,
            windows: &windows,
            max_concurrent: 0,
            lease_ms: 60_000,
            credits: None,
            key: None,
        })
        .await
        .expect("attempt")
        .verdict
}

async fn used(store: &RedisStore, account: &str) -> u64 {
    let windows = [Window {
        len: WindowLen::Fixed(60),
        limit: LIMIT,
        unit: Unit::request(),
    }];
    store
        .usage(&UsageRequest {
            account,
            endpoint: "e",
            now_ms: T0_MS,
            windows: &windows,
            key: None,
        })
        .await
        .expect("usage")
        .used[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_store_admits_exactly_the_limit_from_8_instances() {
    let Some(nodes) = cluster().await else { return };
    let prefix = format!("pgt:{}:", unique("cl"));
    let mut stores = Vec::new();
    for _ in 0..8 {
        let s = RedisStore::connect_cluster(&nodes, options(&prefix))
            .await
            .expect("cluster store");
        stores.push(Arc::new(s));
    }
    let account = unique("exact");
    let mut tasks = Vec::new();
    for i in 0..1_000 {
        let store = stores[i % stores.len()].clone();
        let account = account.clone();
        tasks.push(tokio::spawn(async move {
            attempt(&store, &account, &format!("r{i}")).await
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        match t.await.expect("task") {
            Verdict::Admitted => admitted += 1,
            Verdict::WindowFull { index: 0 } => {}
            other => panic!("unexpected verdict {other:?}"),
        }
    }
    assert_eq!(admitted, LIMIT);
    assert_eq!(used(&stores[0], &account).await, LIMIT);

    // Every key of the account sits on one master, each with a TTL.
    let per_node = keys_per_node(&nodes, stores[0].keys()).await;
    let holding: Vec<_> = per_node.iter().filter(|(_, k)| !k.is_empty()).collect();
    assert_eq!(holding.len(), 1, "keys of one account split: {per_node:?}");
    assert_eq!(holding[0].1.len(), 2, "window counter + in-flight set");
    delete_keys(&nodes, &per_node).await;
}

/// Calendar windows on the cluster (issue 15 item 1): a month's counter
/// and a fixed minute's live on the account's master, each with a TTL;
/// in the last minute of a leap February the month is full, on March 1st
/// it counts from zero again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calendar_month_windows_on_the_cluster() {
    let Some(nodes) = cluster().await else { return };
    let prefix = format!("pgt:{}:", unique("cal"));
    let store = RedisStore::connect_cluster(&nodes, options(&prefix))
        .await
        .expect("cluster store");
    let account = unique("month");
    // 2028-02-29 23:59:00 UTC and a minute later.
    let feb29: u64 = 1_835_481_540_000;
    let mar1 = feb29 + 60_000;
    let windows = [
        WindowSpec {
            len: WindowLen::Calendar(Period::Month),
            limit: 2,
            unit: Unit::request(),
            amount: 1,
        },
        WindowSpec {
            len: WindowLen::Fixed(60),
            limit: 100,
            unit: Unit::request(),
            amount: 1,
        },
    ];
    let attempt_at = |now_ms: u64, id: &'static str| {
        let (store, account, windows) = (&store, &account, &windows);
        async move {
            store
                .attempt(&AttemptRequest {
                    request_id: id,
                    account,
                    endpoint: "e",
                    now_ms,
                    windows,
                    max_concurrent: 0,
                    lease_ms: 60_000,
                    credits: None,
                    key: None,
                })
                .await
                .expect("attempt")
                .verdict
        }
    };
    assert_eq!(attempt_at(feb29, "a").await, Verdict::Admitted);
    assert_eq!(attempt_at(feb29 + 1, "b").await, Verdict::Admitted);
    assert_eq!(
        attempt_at(feb29 + 2, "c").await,
        Verdict::WindowFull { index: 0 }
    );
    assert_eq!(
        attempt_at(mar1, "d").await,
        Verdict::Admitted,
        "a new month"
    );

    let per_node = keys_per_node(&nodes, store.keys()).await;
    let holding: Vec<_> = per_node.iter().filter(|(_, k)| !k.is_empty()).collect();
    assert_eq!(holding.len(), 1, "keys of one account split: {per_node:?}");
    // February's and March's month counters, two minutes, the in-flight set.
    assert_eq!(holding[0].1.len(), 5, "{per_node:?}");
    assert!(
        holding[0].1.iter().any(|k| k.contains("1mo")),
        "{per_node:?}"
    );
    delete_keys(&nodes, &per_node).await;
}

/// Key-level limits on the cluster (issue 15 item 3): an API key's own
/// counters carry its account's hash tag, so one script admits against
/// the account's windows and the key's on the account's master (no
/// CROSSSLOT), exactly, from several gateways at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_windows_live_on_their_accounts_master_and_admit_exactly() {
    let Some(nodes) = cluster().await else { return };
    let prefix = format!("pgt:{}:", unique("kl"));
    let mut stores = Vec::new();
    for _ in 0..4 {
        let s = RedisStore::connect_cluster(&nodes, options(&prefix))
            .await
            .expect("cluster store");
        stores.push(Arc::new(s));
    }
    // Account: 10 a minute; each key: 3 a minute of its own.
    let windows = |account_limit: u64, key_limit: u64| {
        [
            WindowSpec {
                len: WindowLen::Fixed(60),
                limit: account_limit,
                unit: Unit::request(),
                amount: 1,
            },
            WindowSpec {
                len: WindowLen::Fixed(60),
                limit: key_limit,
                unit: Unit::request(),
                amount: 1,
            },
        ]
    };
    // Several accounts, so that their slots fall on different masters.
    let accounts: Vec<String> = (0..6).map(|_| unique("kacct")).collect();
    let mut tasks = Vec::new();
    for (a, account) in accounts.iter().enumerate() {
        for key in ["key_a", "key_b", "key_c", "key_d"] {
            for i in 0..20 {
                let store = stores[(a + i) % stores.len()].clone();
                let (account, key) = (account.clone(), key.to_owned());
                tasks.push(tokio::spawn(async move {
                    let w = windows(10, 3);
                    let v = store
                        .attempt(&AttemptRequest {
                            request_id: &format!("{key}-{i}"),
                            account: &account,
                            endpoint: "e",
                            now_ms: T0_MS,
                            windows: &w,
                            max_concurrent: 0,
                            lease_ms: 60_000,
                            credits: None,
                            key: Some(KeyScope {
                                id: &key,
                                windows: 1,
                            }),
                        })
                        .await
                        .expect("attempt")
                        .verdict;
                    (account, key, v)
                }));
            }
        }
    }
    let mut admitted: BTreeMap<(String, String), u64> = BTreeMap::new();
    for t in tasks {
        let (account, key, v) = t.await.expect("task");
        match v {
            Verdict::Admitted => *admitted.entry((account, key)).or_default() += 1,
            Verdict::WindowFull { .. } => {}
            other => panic!("unexpected verdict {other:?}"),
        }
    }
    for account in &accounts {
        let per_key: Vec<u64> = ["key_a", "key_b", "key_c", "key_d"]
            .iter()
            .map(|k| {
                admitted
                    .get(&(account.clone(), (*k).to_owned()))
                    .copied()
                    .unwrap_or(0)
            })
            .collect();
        // At most 3 per key, exactly 10 for the account in all (4 × 3 > 10).
        assert!(per_key.iter().all(|&n| n <= 3), "{per_key:?}");
        assert_eq!(per_key.iter().sum::<u64>(), 10, "{per_key:?}");
        // The store agrees, key by key.
        for (k, n) in ["key_a", "key_b", "key_c", "key_d"].iter().zip(&per_key) {
            let lw = [
                Window {
                    len: WindowLen::Fixed(60),
                    limit: 10,
                    unit: Unit::request(),
                },
                Window {
                    len: WindowLen::Fixed(60),
                    limit: 3,
                    unit: Unit::request(),
                },
            ];
            let usage = stores[0]
                .usage(&UsageRequest {
                    account,
                    endpoint: "e",
                    now_ms: T0_MS,
                    windows: &lw,
                    key: Some(KeyScope { id: k, windows: 1 }),
                })
                .await
                .expect("usage");
            assert_eq!(usage.used, vec![10, *n]);
        }
    }
    // Every account's keys, its keys' counters included, on one master.
    let per_node = keys_per_node(&nodes, stores[0].keys()).await;
    for account in &accounts {
        let tag = Keys::tag(account);
        let holding: Vec<_> = per_node
            .iter()
            .filter(|(_, keys)| keys.iter().any(|k| k.contains(&tag)))
            .collect();
        assert_eq!(holding.len(), 1, "keys of {account} split: {per_node:?}");
        let mine: Vec<&String> = holding[0].1.iter().filter(|k| k.contains(&tag)).collect();
        let key_counters = mine.iter().filter(|k| k.contains(":k:")).count();
        // The account's counter, its in-flight set, 4 keys' counters.
        assert_eq!((mine.len(), key_counters), (6, 4), "{mine:?}");
    }
    let masters = per_node.values().filter(|k| !k.is_empty()).count();
    eprintln!("key-level counters of 6 accounts on {masters} masters");
    delete_keys(&nodes, &per_node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_different_accounts_spread_over_all_masters() {
    let Some(nodes) = cluster().await else { return };
    let prefix = format!("pgt:{}:", unique("spread"));
    let store = RedisStore::connect_cluster(&nodes, options(&prefix))
        .await
        .expect("cluster store");
    const ACCOUNTS: usize = 300;
    for a in 0..ACCOUNTS {
        assert_eq!(
            attempt(&store, &format!("acct-{a}"), "r").await,
            Verdict::Admitted
        );
    }
    let per_node = keys_per_node(&nodes, store.keys()).await;
    let counts: Vec<(String, usize)> = per_node.iter().map(|(n, k)| (n.clone(), k.len())).collect();
    println!("key distribution of {ACCOUNTS} accounts over the masters: {counts:?}");
    assert_eq!(
        counts.iter().map(|(_, c)| c).sum::<usize>(),
        2 * ACCOUNTS,
        "two keys per account"
    );
    for (node, count) in &counts {
        // 300 accounts over 3 equal slot ranges: ~200 keys each; fewer
        // than 100 would mean the hash tags do not spread accounts.
        assert!(*count >= 100, "{node} holds only {count} keys: {counts:?}");
    }
    delete_keys(&nodes, &per_node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_check_server_reports_every_master() {
    let Some(nodes) = cluster().await else { return };
    let store = RedisStore::connect_cluster(&nodes, options("pgt:check:"))
        .await
        .expect("cluster store");
    let report = store.check_server().await.expect("check_server");
    assert!(report.problems.is_empty(), "{report:?}");
    assert!(
        !report.servers.is_empty() && report.servers.iter().all(|s| s.starts_with("redis ")),
        "{report:?}"
    );
}

#[tokio::test]
async fn cluster_store_on_dead_nodes_errors_instead_of_hanging() {
    // Nothing listens on port 1: connecting is lazy, the first call fails.
    let store = RedisStore::connect_cluster(
        &["redis://127.0.0.1:1"],
        RedisOptions {
            connect_timeout: Duration::from_millis(200),
            response_timeout: Duration::from_millis(300),
            ..RedisOptions::default()
        },
    )
    .await
    .expect("lazy store");
    let windows = minute_window();
    let req = AttemptRequest {
        request_id: "r",
        account: "a",
        endpoint: "e",
        now_ms: T0_MS,
        windows: &windows,
        max_concurrent: 0,
        lease_ms: 1_000,
        credits: None,
        key: None,
    };
    let call = store.attempt(&req);
    let out = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("a dead cluster must fail the call, not hang it");
    assert!(out.is_err(), "{out:?}");
    assert!(store.ping().await.is_err());
}

// ------------------------------------------------------------------
// Two gateways on the cluster.

const DAILY_PLANS: &str = r#"
default_plan: daily
plans:
  daily:
    endpoints:
      "gpt-test":
        fixed_windows:
          - window: 86_400s
            limit: 100
"#;

/// A gateway built from `config` and serving on loopback.
struct Running {
    addr: SocketAddr,
    app_core: Arc<plangate::proxy::Core>,
    _shutdown: watch::Sender<bool>,
}

async fn start_gateway(config: Config, clock: &ManualClock) -> Running {
    let shared: SharedClock = Arc::new(clock.clone());
    let plangate_tests::harness::Served {
        app,
        bound,
        shutdown: tx,
        ..
    } = plangate_tests::harness::serve_app(config, shared).await;
    Running {
        addr: bound.main,
        app_core: app.core.clone(),
        _shutdown: tx,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_on_the_cluster_admit_exactly_100_of_400() {
    let Some(nodes) = cluster().await else { return };
    let Some(pg) = plangate_tests::postgres_db("cluster").await else {
        return;
    };
    migrate(&pg).await.expect("migrate");
    let mock = plangate::mock::start(plangate::mock::MockOptions::default())
        .await
        .expect("mock upstream");
    let dir = std::env::temp_dir().join(unique("plangate-cluster"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("plans.yaml"), DAILY_PLANS).expect("plans");
    let cluster_list = nodes
        .iter()
        .map(|n| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let toml = format!(
        r#"
[server]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"
token = "{ADMIN_TOKEN}"

[storage]
postgres_url = "{pg}"
redis_cluster = [{cluster_list}]
store_timeout = "5s"
on_store_error = "closed"

[plans]
file = "plans.yaml"
watch = false

[[upstreams]]
name = "mock"
url = "{upstream}"

[[routes]]
path = "/v1/chat/completions"
upstream = "mock"
endpoint = "{{model}}"
usage.token = ["body:usage.total_tokens"]
"#,
        upstream = mock.url(),
    );
    let path = dir.join("plangate.toml");
    std::fs::write(&path, toml).expect("config");
    let config = Config::load(&path).unwrap_or_else(|e| panic!("config: {e}"));
    assert_eq!(config.storage.redis_cluster, nodes);

    // The account is unique per run, so its counters are too.
    let clock = ManualClock::new(T0_MS);
    let a = start_gateway(config.clone(), &clock).await;
    let b = start_gateway(config, &clock).await;
    let account = unique("acct");
    let catalog = a.app_core.catalog.clone();
    catalog
        .create_account(&account, None, serde_json::json!({}))
        .await
        .expect("account");
    let key = catalog.create_key(&account).await.expect("key").key;

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut tasks = Vec::new();
    for i in 0..400 {
        let addr = if i % 2 == 0 { a.addr } else { b.addr };
        let (client, key) = (client.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let req = Request::builder()
                .method(Method::POST)
                .uri("/v1/chat/completions")
                .header("authorization", format!("Bearer {key}"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(
                    r#"{"model":"gpt-test","messages":[{"role":"user","content":"hi"}]}"#,
                )))
                .unwrap();
            send_to(&client, addr, req).await
        }));
    }
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    for t in tasks {
        let r = t.await.expect("task");
        *by_status.entry(r.status.as_u16()).or_default() += 1;
    }
    assert_eq!(
        by_status,
        BTreeMap::from([(200, 100), (429, 300)]),
        "status counts"
    );
    assert_eq!(
        mock.requests(),
        100,
        "only admitted requests reach upstream"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// ------------------------------------------------------------------
// Kubernetes ConfigMap updates.

/// A `plangate serve` child process, killed on drop.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn plans_named(id: &str) -> String {
    format!(
        "default_plan: {id}\nplans:\n  {id}:\n    endpoints:\n      \"m\":\n        fixed_windows:\n          - window: 60s\n            limit: 5\n"
    )
}

/// Write `files` into a new timestamped directory and swap `..data` to it
/// the way the kubelet's atomic writer does: a temporary symlink renamed
/// over `..data`, then the old directory removed.
fn kubelet_write(dir: &Path, version: &str, files: &[(&str, &str)]) {
    let ts = format!("..2026_01_01_00_00_0{version}.{}", rand::random::<u32>());
    std::fs::create_dir(dir.join(&ts)).expect("timestamped dir");
    for (name, content) in files {
        std::fs::write(dir.join(&ts).join(name), content).expect("write");
    }
    let old = std::fs::read_link(dir.join("..data")).ok();
    std::os::unix::fs::symlink(&ts, dir.join("..data_tmp")).expect("..data_tmp");
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).expect("swap ..data");
    for (name, _) in files {
        // The user-visible names are created once and never change.
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(name), &link).expect("link");
        }
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old)).expect("remove old dir");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_symlink_swap_reloads_plans() {
    let Some(bin) = plangate_tests::built_plangate() else {
        assert!(
            std::env::var("PLANGATE_REQUIRE_SERVICES").is_err(),
            "target/debug/plangate is missing (tests/run.sh builds it)"
        );
        eprintln!("\n*** SKIPPING configmap_symlink_swap_reloads_plans: build target/debug/plangate first\n");
        return;
    };
    let dir = std::env::temp_dir().join(unique("plangate-configmap"));
    std::fs::create_dir_all(&dir).expect("dir");
    let (port, admin_port) = (free_port(), free_port());
    let toml = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"

[admin]
listen = "127.0.0.1:{admin_port}"
token = "{ADMIN_TOKEN}"

[plans]
file = "plans.yaml"
watch = true

[[upstreams]]
name = "up"
url = "http://127.0.0.1:9"

[[routes]]
path = "/v1/chat/completions"
upstream = "up"
endpoint = "{{model}}"
"#
    );
    kubelet_write(
        &dir,
        "1",
        &[
            ("plangate.toml", &toml),
            ("plans.yaml", &plans_named("first")),
        ],
    );
    let child = Command::new(&bin)
        .args(["serve", "--config"])
        .arg(dir.join("plangate.toml"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn plangate serve");
    let _serve = Serve(child);

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    // None while the process is not answering yet.
    let default_plan = |client: Client<_, Full<Bytes>>| async move {
        let req = Request::builder()
            .uri(format!("http://{admin}/admin/plans"))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(2), client.request(req))
            .await
            .ok()?
            .ok()?;
        if resp.status() != StatusCode::OK {
            return None;
        }
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        let doc: serde_json::Value = serde_json::from_slice(&body).ok()?;
        doc["default_plan"].as_str().map(str::to_owned)
    };
    // Bounded waits on another process, not on a clock: poll until it
    // answers, then until the watcher has reloaded.
    let wait_for = |want: &'static str| {
        let client = client.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let got = default_plan(client.clone()).await;
                if got.as_deref() == Some(want) {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "default plan is {got:?}, still not {want:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    wait_for("first").await;

    kubelet_write(
        &dir,
        "2",
        &[
            ("plangate.toml", &toml),
            ("plans.yaml", &plans_named("second")),
        ],
    );
    wait_for("second").await;

    // A second update works too: the watcher survived the first swap.
    kubelet_write(
        &dir,
        "3",
        &[
            ("plangate.toml", &toml),
            ("plans.yaml", &plans_named("third")),
        ],
    );
    wait_for("third").await;
    let _ = std::fs::remove_dir_all(&dir);
}
