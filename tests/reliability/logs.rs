//! Secrets never reach logs: a real `plangate serve` at `RUST_LOG=debug`
//! is driven through key creation, good and bad keys, streaming, upstream
//! failures, wrong admin tokens and revocation; its whole log is then
//! searched for every key and token it saw.

use std::time::Duration;

use plangate::mock::MockOptions;
use plangate_tests::procs::GatewayProc;
use plangate_tests::rig::{self, http_client, Setup, REL_ADMIN_TOKEN};

use crate::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_keys_and_admin_token_never_appear_in_debug_logs() {
    let _serial = serial().await;
    let mock = plangate::mock::start(MockOptions::default())
        .await
        .expect("mock");
    let setup = Setup::new(&mock.url());
    // `REL_LOG_LEVEL=trace` checks the noisiest level by hand.
    let level = std::env::var("REL_LOG_LEVEL").unwrap_or_else(|_| "debug".into());
    let mut gw = GatewayProc::spawn(&setup.write(), &[("RUST_LOG", &level)]);
    let admin = gw.admin.expect("admin listener");
    let client = http_client();
    let post_admin = |path: &str, body: serde_json::Value| {
        let client = client.clone();
        let path = path.to_owned();
        async move { rig::post_json(&client, admin, &path, REL_ADMIN_TOKEN, &body, &[]).await }
    };

    let r = post_admin("/admin/accounts", serde_json::json!({"id": "logs"})).await;
    assert_eq!(r.status, 201);
    let r = post_admin("/admin/accounts/logs/keys", serde_json::json!({})).await;
    assert_eq!(r.status, 201);
    let created: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let key = created["key"].as_str().unwrap().to_owned();
    let key_id = created["id"].as_str().unwrap().to_owned();
    let r = post_admin(
        "/admin/accounts/logs/quota-blocks",
        serde_json::json!({"credits": 100}),
    )
    .await;
    assert_eq!(r.status, 201);

    let wrong_key = format!("sk-wrong-{:032x}", rand::random::<u128>());
    let wrong_admin = format!("{REL_ADMIN_TOKEN}-typo");
    let main = gw.main;
    let chat = |key: String,
                model: &'static str,
                path: &'static str,
                headers: Vec<(&'static str, &'static str)>| {
        let client = client.clone();
        async move { rig::chat(&client, main, path, &key, model, &headers).await }
    };
    let mut statuses = Vec::new();
    for (k, model, path, headers) in [
        (key.clone(), "free-model", "/v1/chat/completions", vec![]),
        (key.clone(), "paid-model", "/v1/chat/completions", vec![]),
        (
            key.clone(),
            "paid-model",
            "/v1/chat/completions",
            vec![("x-mock-status", "500")],
        ),
        (
            key.clone(),
            "free-model",
            "/dead/v1/chat/completions",
            vec![],
        ),
        (
            key.clone(),
            "free-model",
            "/v1/chat/completions",
            vec![("x-mock-die-after", "1")],
        ),
        (key.clone(), "no-such-model", "/v1/chat/completions", vec![]),
        (
            wrong_key.clone(),
            "free-model",
            "/v1/chat/completions",
            vec![],
        ),
    ] {
        statuses.push(chat(k, model, path, headers).await.status.as_u16());
    }
    let body = rig::chat_body("free-model", true);
    let stream = rig::post_json(&client, main, "/v1/chat/completions", &key, &body, &[]).await;
    statuses.push(stream.status.as_u16());
    // The key in a header the gateway does not read, and in the URL.
    let r = rig::get(&client, main, &format!("/v1/limits?key={key}"), Some(&key)).await;
    statuses.push(r.status.as_u16());
    for token in [wrong_admin.as_str(), key.as_str()] {
        statuses.push(
            rig::get(&client, admin, "/admin/plans", Some(token))
                .await
                .status
                .as_u16(),
        );
    }
    let r = rig::send(
        &client,
        http::Request::builder()
            .method(http::Method::DELETE)
            .uri(format!("http://{admin}/admin/keys/{key_id}"))
            .header("authorization", format!("Bearer {REL_ADMIN_TOKEN}"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap(),
    )
    .await;
    statuses.push(r.status.as_u16());
    tokio::time::sleep(Duration::from_millis(100)).await;
    statuses.push(
        chat(key.clone(), "free-model", "/v1/chat/completions", vec![])
            .await
            .status
            .as_u16(),
    );

    assert!(gw.terminate(), "graceful exit on SIGTERM");
    let log = gw.log();
    let secrets = [
        ("API key", key.as_str()),
        ("API key secret tail", &key[key.len() - 16..]),
        ("wrong API key", wrong_key.as_str()),
        ("wrong API key tail", &wrong_key[wrong_key.len() - 16..]),
        ("admin token", REL_ADMIN_TOKEN),
        ("mistyped admin token", wrong_admin.as_str()),
    ];
    let leaks: Vec<&str> = secrets
        .iter()
        .filter(|(_, s)| log.contains(s))
        .map(|(name, _)| *name)
        .collect();
    eprintln!(
        "FIGURES secrets in logs: RUST_LOG={level}, {} log lines, {} requests (statuses {statuses:?}); leaked: {leaks:?}",
        log.lines().count(),
        statuses.len()
    );
    assert!(log.lines().count() > 10, "the log was captured:\n{log}");
    assert!(leaks.is_empty(), "secrets in the log: {leaks:?}\n{log}");
}
