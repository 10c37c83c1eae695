//! The soak run (issue 6): mixed traffic — streaming and not, allowed and
//! denied, credit-costing, upstream errors, bad keys, clients vanishing
//! mid-request and mid-stream — against a real `plangate serve` on a fresh
//! Postgres database and a private Redis, for a given duration. It samples
//! the gateway's RSS and, at the end, checks that the in-flight gauge is
//! back to 0 and that every Redis key carries a TTL.
//!
//! `tests/soak.sh` runs it for 10 minutes; the reliability tests run it for
//! a few seconds so the code stays working.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use plangate::catalog::postgres::{migrate, PostgresCatalog};
use plangate::catalog::Catalog;
use plangate::clock::SystemClock;
use plangate::mock::MockOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::procs::{GatewayProc, RedisServer};
use crate::rig::{self, http_client, HttpClient, Setup, REL_ADMIN_TOKEN};

/// What a soak run saw.
#[derive(Debug, Default)]
pub struct SoakReport {
    pub duration: Duration,
    /// Per kind of traffic, per status (0 = client hung up on purpose).
    pub outcomes: BTreeMap<&'static str, BTreeMap<u16, u64>>,
    /// (seconds since start, RSS KiB) of the gateway process.
    pub rss: Vec<(u64, u64)>,
    /// The in-flight gauge once traffic stopped (after a short settle).
    pub in_flight_end: Option<u64>,
    pub redis_keys: u64,
    pub redis_keys_without_ttl: u64,
    /// Process still running at the end.
    pub alive: bool,
    /// Credits: granted − balance at the end, and the ledger's net sum.
    pub credits_spent: u64,
    pub ledger_net: u64,
}

impl SoakReport {
    pub fn requests(&self) -> u64 {
        self.outcomes.values().flat_map(|m| m.values()).sum()
    }

    /// RSS after warm-up (the sample nearest 20% of the run) and at the end.
    pub fn rss_warm_and_end(&self) -> (u64, u64) {
        let warm_at = self.duration.as_secs() / 5;
        let warm = self
            .rss
            .iter()
            .min_by_key(|(t, _)| t.abs_diff(warm_at))
            .map(|(_, r)| *r)
            .unwrap_or(0);
        (warm, self.rss.last().map(|(_, r)| *r).unwrap_or(0))
    }

    /// Printable summary (also what docs/RELIABILITY.md quotes).
    pub fn summary(&self) -> String {
        let (warm, end) = self.rss_warm_and_end();
        let max = self.rss.iter().map(|(_, r)| *r).max().unwrap_or(0);
        let mut out = format!(
            "FIGURES soak {:?}: requests={} in_flight_end={:?} redis_keys={} without_ttl={} alive={} credits_spent={} ledger_net={} rss_kib warm={warm} end={end} max={max}\n",
            self.duration,
            self.requests(),
            self.in_flight_end,
            self.redis_keys,
            self.redis_keys_without_ttl,
            self.alive,
            self.credits_spent,
            self.ledger_net,
        );
        for (kind, statuses) in &self.outcomes {
            out.push_str(&format!("  {kind}: {statuses:?}\n"));
        }
        out.push_str(&format!("  rss samples (s, KiB): {:?}\n", self.rss));
        out
    }

    /// The soak's pass criteria; returns what failed.
    pub fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        let (warm, end) = self.rss_warm_and_end();
        // Flat: within 10% (and at least 16 MiB of slack for short runs).
        let allowed = (warm / 10).max(16 * 1024);
        if end > warm + allowed {
            f.push(format!("RSS grew from {warm} KiB to {end} KiB"));
        }
        if self.in_flight_end != Some(0) {
            f.push(format!(
                "in-flight gauge at the end: {:?}",
                self.in_flight_end
            ));
        }
        if self.redis_keys_without_ttl > 0 {
            f.push(format!(
                "{} Redis keys without a TTL",
                self.redis_keys_without_ttl
            ));
        }
        if !self.alive {
            f.push("the gateway exited".into());
        }
        if self.credits_spent != self.ledger_net {
            f.push(format!(
                "credits spent {} but the ledger nets {}",
                self.credits_spent, self.ledger_net
            ));
        }
        let ok = |kind: &str, status: u16| {
            self.outcomes
                .get(kind)
                .and_then(|m| m.get(&status))
                .copied()
                .unwrap_or(0)
        };
        for (kind, status) in [
            ("chat", 200),
            ("stream", 200),
            ("paid", 200),
            ("limited", 429),
            ("bad key", 401),
        ] {
            if ok(kind, status) == 0 {
                f.push(format!("no {kind} request answered {status}"));
            }
        }
        f
    }
}

/// Credits granted to each soak account.
const CREDITS: u64 = 1_000_000;

/// Run mixed traffic for `duration` with `workers` concurrent clients,
/// sampling RSS every `sample_every`. Needs Postgres (see
/// [`crate::postgres_db`]) and a `redis-server` binary.
pub async fn run(duration: Duration, workers: usize, sample_every: Duration) -> SoakReport {
    let redis = RedisServer::start();
    let db = crate::postgres_db("soak")
        .await
        .expect("postgres for the soak");
    migrate(&db).await.expect("migrate");
    let catalog = PostgresCatalog::connect(&db, Arc::new(SystemClock))
        .await
        .expect("catalog");
    let mock = plangate::mock::start(MockOptions::default())
        .await
        .expect("mock");
    let mut setup = Setup::new(&mock.url());
    setup.postgres_url = Some(db);
    setup.redis_url = Some(redis.url());
    setup.store_timeout = "500ms".into();
    setup.request_timeout = "10s".into();
    setup.header_read_timeout = "5s".into();
    let config = setup.write();
    let mut gw = GatewayProc::spawn(&config, &[]);

    let mut keys = Vec::new();
    let mut accounts = Vec::new();
    for i in 0..8 {
        let id = crate::harness::unique(&format!("soak{i}"));
        catalog
            .create_account(&id, None, serde_json::json!({}))
            .await
            .expect("account");
        catalog
            .create_quota_block(&id, CREDITS, None, serde_json::json!({}))
            .await
            .expect("credits");
        keys.push(catalog.create_key(&id).await.expect("key").key);
        accounts.push(id);
    }

    let outcomes: Arc<Mutex<BTreeMap<&'static str, BTreeMap<u16, u64>>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let client = http_client();
    let started = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let (outcomes, stop, client) = (outcomes.clone(), stop.clone(), client.clone());
            let key = keys[w % keys.len()].clone();
            let addr = gw.main;
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let (kind, status) = one_request(&client, addr, &key).await;
                    *outcomes
                        .lock()
                        .entry(kind)
                        .or_default()
                        .entry(status)
                        .or_default() += 1;
                }
            })
        })
        .collect();

    let mut rss = Vec::new();
    let mut last_print = Instant::now();
    while started.elapsed() < duration {
        let left = duration.saturating_sub(started.elapsed());
        tokio::time::sleep(sample_every.min(left)).await;
        if let Some(kib) = gw.rss_kib() {
            rss.push((started.elapsed().as_secs(), kib));
        }
        if last_print.elapsed() >= Duration::from_secs(60) {
            last_print = Instant::now();
            let total: u64 = outcomes.lock().values().flat_map(|m| m.values()).sum();
            eprintln!(
                "soak: {:?} elapsed, {total} requests, rss {:?} KiB",
                started.elapsed(),
                gw.rss_kib()
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = started.elapsed();

    // Settle: abandoned requests end, charges are written.
    let admin = gw.admin.expect("admin listener");
    let mut in_flight_end = None;
    for _ in 0..100 {
        in_flight_end = metric(&client, admin, "plangate_in_flight_requests").await;
        if in_flight_end == Some(0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    if let Some(kib) = gw.rss_kib() {
        rss.push((started.elapsed().as_secs(), kib));
    }
    let (redis_keys, redis_keys_without_ttl) = redis_ttls(&redis.url()).await;
    let mut credits_spent = 0;
    let mut ledger_net = 0;
    for id in &accounts {
        credits_spent += CREDITS - catalog.balance(id).await.expect("balance");
        ledger_net += catalog
            .ledger(id)
            .await
            .expect("ledger")
            .iter()
            .map(|e| e.deducted - e.refunded)
            .sum::<u64>();
    }
    let alive = gw.alive();
    let report = SoakReport {
        duration: elapsed,
        outcomes: std::mem::take(&mut *outcomes.lock()),
        rss,
        in_flight_end,
        redis_keys,
        redis_keys_without_ttl,
        alive,
        credits_spent,
        ledger_net,
    };
    drop(mock);
    report
}

/// One request of a randomly chosen kind; returns (kind, status), status
/// 0 when the client hung up on purpose.
async fn one_request(client: &HttpClient, addr: SocketAddr, key: &str) -> (&'static str, u16) {
    let roll = rand::random::<u32>() % 100;
    let post = |model: &'static str, stream: bool, headers: Vec<(&'static str, String)>| {
        let body = rig::chat_body(model, stream);
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            rig::post_json(client, addr, "/v1/chat/completions", key, &body, &h)
                .await
                .status
                .as_u16()
        }
    };
    match roll {
        0..=29 => ("chat", post("free-model", false, vec![]).await),
        30..=44 => {
            let chunks = (5 + rand::random::<u32>() % 20).to_string();
            let h = vec![
                ("x-mock-chunks", chunks),
                ("x-mock-chunk-delay-ms", "10".into()),
            ];
            ("stream", post("free-model", true, h).await)
        }
        45..=59 => (
            "paid",
            post("paid-model", rand::random::<bool>(), vec![]).await,
        ),
        60..=69 => ("limited", post("small-model", false, vec![]).await),
        70..=74 => (
            "upstream 500",
            post("paid-model", false, vec![("x-mock-status", "500".into())]).await,
        ),
        75..=79 => {
            let r = rig::chat(
                client,
                addr,
                "/v1/chat/completions",
                "sk-soak-bad",
                "free-model",
                &[],
            )
            .await;
            ("bad key", r.status.as_u16())
        }
        80..=84 => {
            let r = rig::get(client, addr, "/v1/limits", Some(key)).await;
            ("limits", r.status.as_u16())
        }
        85..=92 => ("gone mid-stream", hang_up(addr, key, true).await),
        _ => ("gone mid-request", hang_up(addr, key, false).await),
    }
}

/// A client that leaves: mid-stream after the first bytes, or while the
/// upstream is still working.
async fn hang_up(addr: SocketAddr, key: &str, stream: bool) -> u16 {
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return 599;
    };
    let (model, extra) = if stream {
        (
            "free-model",
            "x-mock-chunks: 50\r\nx-mock-chunk-delay-ms: 20\r\n",
        )
    } else {
        ("free-model", "x-mock-delay-ms: 300\r\n")
    };
    let body = rig::chat_body(model, stream).to_string();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra}\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return 599;
    }
    if stream {
        let mut buf = [0u8; 512];
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    } else {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    0
}

/// A gauge or counter value from the admin `/metrics`.
pub async fn metric(client: &HttpClient, admin: SocketAddr, name: &str) -> Option<u64> {
    let r = rig::get(client, admin, "/metrics", Some(REL_ADMIN_TOKEN)).await;
    String::from_utf8_lossy(&r.body).lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix(' ')?;
        rest.trim().parse::<f64>().ok().map(|v| v as u64)
    })
}

/// (keys, keys without a TTL) in a whole Redis database.
async fn redis_ttls(url: &str) -> (u64, u64) {
    let client = redis::Client::open(url).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection");
    let mut cursor: u64 = 0;
    let (mut keys, mut without) = (0, 0);
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .expect("SCAN");
        for k in batch {
            keys += 1;
            let ttl: i64 = redis::cmd("PTTL")
                .arg(&k)
                .query_async(&mut conn)
                .await
                .expect("PTTL");
            if ttl == -1 {
                without += 1;
            }
        }
        if next == 0 {
            return (keys, without);
        }
        cursor = next;
    }
}
