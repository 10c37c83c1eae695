use super::*;

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// RFC 4231 test cases 1, 2, 3, 4, 6 and 7 (HMAC-SHA-256); case 5 is a
/// truncated output and not applicable.
#[test]
fn hmac_sha256_matches_rfc_4231() {
    let cases: [(Vec<u8>, Vec<u8>, &str); 6] = [
        (
            vec![0x0b; 20],
            b"Hi There".to_vec(),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
        ),
        (
            b"Jefe".to_vec(),
            b"what do ya want for nothing?".to_vec(),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
        ),
        (
            vec![0xaa; 20],
            vec![0xdd; 50],
            "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe",
        ),
        (
            unhex("0102030405060708090a0b0c0d0e0f10111213141516171819"),
            vec![0xcd; 50],
            "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b",
        ),
        (
            vec![0xaa; 131],
            b"Test Using Larger Than Block-Size Key - Hash Key First".to_vec(),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
        ),
        (
            vec![0xaa; 131],
            b"This is a test using a larger than block-size key and a larger than block-size data. The key needs to be hashed before being used by the HMAC algorithm.".to_vec(),
            "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2",
        ),
    ];
    for (key, data, want) in cases {
        assert_eq!(hex(&hmac_sha256(&key, &data)), want);
    }
}

#[test]
fn signatures_sign_timestamp_and_body() {
    let secret = b"whsec_0123456789abcdef";
    let body = br#"{"id":"nt_1"}"#;
    let sig = signature(secret, 1_800_000_000, body);
    // The documented recipe: HMAC-SHA256 of "<timestamp>.<body>".
    let want = format!(
        "v1={}",
        hex(&hmac_sha256(secret, b"1800000000.{\"id\":\"nt_1\"}"))
    );
    assert_eq!(sig, want);
    assert!(verify(secret, 1_800_000_000, body, &sig));
    // One of several (during a secret rotation) is enough.
    assert!(verify(
        secret,
        1_800_000_000,
        body,
        &format!("v1=00, {sig}")
    ));
    assert!(!verify(secret, 1_800_000_001, body, &sig), "other time");
    assert!(!verify(secret, 1_800_000_000, b"{}", &sig), "other body");
    assert!(!verify(b"another secret 0123", 1_800_000_000, body, &sig));
    assert!(!verify(secret, 1_800_000_000, body, ""));
}

#[test]
fn event_types_name_the_kind() {
    assert_eq!(event_type("window"), "window.threshold");
    assert_eq!(event_type("balance"), "balance.threshold");
    assert_eq!(event_type("expiry"), "block.expiring");
}

mod observe {
    use std::collections::BTreeMap;

    use super::*;
    use crate::catalog::cache::CacheConfig;
    use crate::catalog::memory::MemoryCatalog;
    use crate::catalog::NotificationQuery;
    use crate::clock::{Clock as _, ManualClock};
    use crate::config::WebhookSecret;
    use crate::plans::{Policy, Unit, Window, WindowLen, DEFAULT_CONCURRENCY_EXPIRY_SECS};

    fn plan(notify: Vec<NotifyRule>) -> Plan {
        let policy = Policy {
            windows: vec![Window {
                len: WindowLen::Fixed(60),
                limit: 10,
                unit: Unit::request(),
            }],
            max_concurrent: 0,
            concurrency_expiry_secs: DEFAULT_CONCURRENCY_EXPIRY_SECS,
            credits: None,
            enforce: true,
            key: None,
        };
        Plan {
            id: "p".into(),
            name: "p".into(),
            endpoints: BTreeMap::from([("chat".to_string(), Arc::new(policy))]),
            notify,
        }
    }

    fn started(bg: &Background, job: &str) -> String {
        let mut text = String::new();
        bg.render(&mut text);
        let prefix = format!("plangate_background_started_total{{job=\"{job}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or("?")
            .to_string()
    }

    /// Below a threshold `observe` does nothing but compare; at or above
    /// it, one queueing per process, whatever the number of requests.
    #[tokio::test]
    async fn queues_once_per_process_and_nothing_below_the_threshold() {
        let clock = ManualClock::new(1_800_000_000_000);
        let shared: SharedClock = Arc::new(clock.clone());
        let catalog: Arc<dyn Catalog> = Arc::new(MemoryCatalog::new(shared.clone()));
        let cache = Arc::new(
            CatalogCache::new(catalog.clone(), shared.clone(), CacheConfig::default())
                .await
                .unwrap(),
        );
        let bg = Arc::new(Background::default());
        let config = NotifyConfig {
            url: "http://127.0.0.1:9/hooks".parse().unwrap(),
            secret: WebhookSecret(Arc::from(&b"0123456789abcdef"[..])),
            timeout: Duration::from_secs(1),
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(10),
            max_attempts: 3,
            poll_interval: Duration::from_secs(3600),
            scan_interval: Duration::from_secs(3600),
            retain: Duration::from_secs(86_400),
            ca_file: None,
        };
        let n = Notifier::new(config, catalog.clone(), cache, shared, bg.clone()).unwrap();
        let plan = plan(vec![NotifyRule::Window { percent: 80 }]);
        let policy = plan.endpoints["chat"].clone();
        let now = clock.now_ms();
        for used in 0..8 {
            let info = RateLimitInfo::from_usage(&policy, &[used], 0, now);
            n.observe("a", "chat", &plan, &info, None);
        }
        assert_eq!(started(&bg, "notify"), "0");
        for used in [8, 9, 10, 10, 10] {
            let info = RateLimitInfo::from_usage(&policy, &[used], 0, now);
            n.observe("a", "chat", &plan, &info, None);
        }
        assert_eq!(started(&bg, "notify"), "1");
        let q = NotificationQuery {
            limit: 10,
            ..Default::default()
        };
        let rows = catalog.notifications(&q).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].dedupe_key, "w|a|chat|request|60s|1800000000000|80");
        // Another account, and the next window, are notifications of their own.
        let info = RateLimitInfo::from_usage(&policy, &[9], 0, now);
        n.observe("b", "chat", &plan, &info, None);
        clock.advance(Duration::from_secs(60));
        let info = RateLimitInfo::from_usage(&policy, &[9], 0, clock.now_ms());
        n.observe("a", "chat", &plan, &info, None);
        assert_eq!(catalog.notifications(&q).await.unwrap().len(), 3);
        // A plan without `notify:` costs one check.
        let quiet = super::observe::plan(Vec::new());
        n.observe("c", "chat", &quiet, &info, None);
        assert_eq!(started(&bg, "notify"), "3");
        // Retries wait `backoff`, doubled each time, at most `max_backoff`.
        assert_eq!(
            [1, 2, 3, 4, 5, 6, 1000].map(|a| n.backoff(a).as_secs()),
            [1, 2, 4, 8, 10, 10, 10]
        );
    }
}
