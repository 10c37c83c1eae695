//! Key-level limits (issue 15 item 3) through the gateway, on both
//! backends and both plan sources: a key with a plan of its own is limited
//! by its plan's windows on top of its account's; the headers report the
//! tightest window; `/v1/limits` marks the key's windows; a key plan that
//! does not list an endpoint adds nothing there.

use http::Method;
use plangate_tests::harness::{Backend, Options, TestGateway, ADMIN_TOKEN, TEST_PLANS};
use serde_json::json;

/// The test plans plus `ci-small`, a plan meant for keys: 2 requests and
/// 500 tokens a minute on `gpt-test`, nothing on the other endpoints.
fn plans() -> String {
    format!(
        r#"{TEST_PLANS}  ci-small:
    endpoints:
      "gpt-test":
        fixed_windows:
          - window: 60s
            limit: 2
          - window: 60s
            limit: 500
            unit_type: token
"#
    )
}

async fn gateways() -> Vec<TestGateway> {
    let mut out = Vec::new();
    for backend in Backend::all().await {
        for source in ["file", "database"] {
            let mut opts = Options::new(backend);
            opts.plans = plans();
            opts.plans_source = source;
            out.push(TestGateway::start(opts).await);
        }
    }
    out
}

fn windows<'a>(limits: &'a serde_json::Value, endpoint: &str) -> &'a Vec<serde_json::Value> {
    limits["endpoints"][endpoint]["windows"]
        .as_array()
        .expect("windows")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_plan_limits_it_on_top_of_its_account() {
    for gw in gateways().await {
        // The account is on `basic` (3 requests a minute on gpt-test); its
        // first key has no plan, the second (created through the admin
        // API) has `ci-small`.
        let (account, plain) = gw.account(None).await;
        let r = gw
            .admin(
                Method::POST,
                &format!("/admin/accounts/{account}/keys"),
                Some(ADMIN_TOKEN),
                &json!({"plan": "ci-small", "label": "ci"}).to_string(),
            )
            .await;
        assert_eq!(r.status, 201, "{:?}", r.body);
        assert_eq!(r.json()["plan_id"], "ci-small");
        let ci = r.json()["key"].as_str().unwrap().to_owned();
        let ci_id = r.json()["id"].as_str().unwrap().to_owned();
        // Unknown plans are refused, naming the plan.
        let r = gw
            .admin(
                Method::POST,
                &format!("/admin/accounts/{account}/keys"),
                Some(ADMIN_TOKEN),
                &json!({"plan": "ghost"}).to_string(),
            )
            .await;
        assert_eq!(r.status, 404, "{:?}", r.body);
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("ghost"),
            "{:?}",
            r.body
        );

        // The key's 2 a minute is tighter than the account's 3: reported.
        let r = gw.chat(&ci, "gpt-test").await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.header("x-ratelimit-limit-requests"), Some("2"));
        assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("1"));
        assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("500"));
        assert_eq!(gw.chat(&ci, "gpt-test").await.status, 200);
        let r = gw.chat(&ci, "gpt-test").await;
        assert_eq!(r.status, 429, "{:?}", r.body);
        assert_eq!(r.code(), "rate_limit_exceeded");
        assert_eq!(r.header("x-ratelimit-limit-requests"), Some("2"));
        assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));

        // The plain key has the account's third request, then the
        // account's window refuses it.
        let r = gw.chat(&plain, "gpt-test").await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.header("x-ratelimit-limit-requests"), Some("3"));
        assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));
        assert_eq!(gw.chat(&plain, "gpt-test").await.status, 429);

        // `limits reset` (admin API) clears the key's own windows too.
        let r = gw
            .admin(
                Method::POST,
                &format!("/admin/accounts/{account}/limits/reset?endpoint=gpt-test"),
                Some(ADMIN_TOKEN),
                "",
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        let r = gw.chat(&ci, "gpt-test").await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("1"));
        assert_eq!(gw.chat(&ci, "gpt-test").await.status, 200);
        assert_eq!(gw.chat(&plain, "gpt-test").await.status, 200);

        // `/v1/limits`: the key's windows, marked, after the account's.
        let limits = gw.limits(&ci).await;
        assert_eq!(limits["key_plan"], "ci-small");
        let w = windows(&limits, "gpt-test");
        let scopes: Vec<&str> = w.iter().map(|w| w["scope"].as_str().unwrap()).collect();
        assert_eq!(scopes, ["account", "account", "account", "key", "key"]);
        assert_eq!(
            (w[0]["limit"].clone(), w[0]["used"].clone()),
            (json!(3), json!(3))
        );
        assert_eq!(
            (w[3]["limit"].clone(), w[3]["used"].clone()),
            (json!(2), json!(2))
        );
        // `ci-small` does not list the embeddings model: no key window.
        let w = windows(&limits, "text-embedding-test");
        assert!(w.iter().all(|w| w["scope"] == "account"), "{w:?}");
        let r = gw
            .post(
                "/v1/embeddings",
                Some(&ci),
                &json!({"model": "text-embedding-test", "input": "hi"}),
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.header("x-ratelimit-limit-requests"), Some("100"));
        // The plain key sees no key windows.
        let limits = gw.limits(&plain).await;
        assert_eq!(limits["key_plan"], serde_json::Value::Null);
        assert!(windows(&limits, "gpt-test")
            .iter()
            .all(|w| w["scope"] == "account"));

        // Next minute: the plan is taken away (admin API); the key has
        // only its account's limits once the change reaches the cache.
        gw.clock.advance(std::time::Duration::from_secs(60));
        let r = gw
            .admin(
                Method::PUT,
                &format!("/admin/keys/{ci_id}/plan"),
                Some(ADMIN_TOKEN),
                r#"{"plan_id": null}"#,
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        let mut cleared = false;
        for _ in 0..200 {
            if gw.limits(&ci).await["key_plan"].is_null() {
                cleared = true;
                break;
            }
            // Waiting for the invalidation to reach the cache, not for a window.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(cleared, "the key's plan change never reached the cache");
        for _ in 0..3 {
            let r = gw.chat(&ci, "gpt-test").await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            assert_eq!(r.header("x-ratelimit-limit-requests"), Some("3"));
        }
        let r = gw
            .admin(
                Method::PUT,
                &format!("/admin/keys/{ci_id}/plan"),
                Some(ADMIN_TOKEN),
                r#"{"plan_id": "ghost"}"#,
            )
            .await;
        assert_eq!(r.status, 404, "{:?}", r.body);
        gw.stop().await;
    }
}
