//! The official `openai` Python SDK as the client (tests/sdk/openai_e2e.py),
//! non-streaming and streaming, seeing RateLimitError with the right code
//! and honouring retry-after, and listing the plan's models (`GET /v1/models`).

use std::process::Command;
use std::sync::Arc;

use plangate_tests::harness::{Backend, Options, TestGateway};

const SDK_PLANS: &str = r#"
default_plan: sdk
plans:
  sdk:
    endpoints:
      "gpt-sdk":
        fixed_windows:
          - window: 1s
            limit: 1
      "gpt-paid":
        fixed_windows:
          - window: 60s
            limit: 100
        credits:
          min_balance: 1
          per_request: 1
"#;

fn python_with_openai() -> Option<&'static str> {
    let ok = Command::new("python3")
        .args(["-c", "import openai"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        return Some("python3");
    }
    if std::env::var("PLANGATE_REQUIRE_SERVICES").is_ok_and(|v| v == "1") {
        panic!("python3 with the openai package is required (tests/run.sh installs it with pip)");
    }
    eprintln!("\n*** SKIPPING: python3 -c 'import openai' failed; run ./tests/run.sh (it pip-installs openai).\n");
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_openai_sdk_end_to_end() {
    let Some(python) = python_with_openai() else {
        return;
    };
    let mut opts = Options::new(Backend::Memory);
    opts.plans = SDK_PLANS.to_owned();
    // The SDK sleeps retry-after for real here, so the gateway reads the
    // real clock: a 1 s window is what it waits out.
    opts.system_clock = true;
    let gw = TestGateway::start(opts).await;
    let (_, key) = gw.account(None).await;
    let (_, poor) = gw.account(None).await;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sdk/openai_e2e.py");
    let base = format!("http://{}/v1", gw.addr);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .env("PLANGATE_BASE_URL", base)
            .env("PLANGATE_KEY", key)
            .env("PLANGATE_POOR_KEY", poor)
            .output()
            .expect("run python3")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "SDK checks failed:\n{stdout}");
    assert!(stdout.contains("all ok"));
    let _ = Arc::strong_count(&gw.core);
}
