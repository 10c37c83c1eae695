//! A real LiteLLM proxy as an upstream, started once per test process.
//!
//! LiteLLM (`pip install 'litellm[proxy]'`, which `tests/run.sh` does) runs
//! offline and keyless: `LITELLM_LOCAL_MODEL_COST_MAP=True` keeps it from
//! fetching its price list, `LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY=true`
//! lets it start without a master key, and its config
//! (`tests/fixtures/upstreams/litellm_config.yaml`) answers the model
//! `gpt-test` with its own `mock_response`, so no provider is called.
//!
//! It takes seconds to start (importing litellm), so the first test that
//! asks starts it and every later one shares it. The child cannot outlive
//! the test process: it is spawned by a thread that lives as long as the
//! child, through a small Python launcher that sets `PR_SET_PDEATHSIG`
//! (SIGKILL) before importing litellm, so the kernel kills it when this
//! process ends, however it ends.
//!
//! `PLANGATE_TEST_LITELLM_URL` (e.g. `http://127.0.0.1:4000`) uses a
//! LiteLLM that is already running instead, with the same config;
//! `PLANGATE_TEST_PYTHON` (default `python3`) is the interpreter whose
//! litellm package is started.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The model of the test config.
pub const MODEL: &str = "gpt-test";

/// How long LiteLLM may take to answer its health check after spawning.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// A LiteLLM proxy serving the test config.
#[derive(Debug)]
pub struct LiteLlm {
    /// Base URL, e.g. `http://127.0.0.1:41234` (no trailing slash).
    pub url: String,
    /// Its log (stdout and stderr), when this process started it.
    pub log: Option<PathBuf>,
}

static LITELLM: OnceLock<Result<LiteLlm, String>> = OnceLock::new();

/// The config the suite runs LiteLLM with.
pub fn config_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/upstreams/litellm_config.yaml")
}

/// The shared LiteLLM, started on first use. `None` (with a loud message)
/// when it cannot be started, or a panic under `PLANGATE_REQUIRE_SERVICES=1`.
pub async fn litellm() -> Option<&'static LiteLlm> {
    let started = tokio::task::spawn_blocking(|| LITELLM.get_or_init(find_or_start))
        .await
        .expect("starting LiteLLM");
    match started {
        Ok(l) => Some(l),
        Err(why) => {
            crate::absent("LiteLLM (pip install 'litellm[proxy]')", "127.0.0.1", why);
            None
        }
    }
}

fn find_or_start() -> Result<LiteLlm, String> {
    if let Some(url) = std::env::var("PLANGATE_TEST_LITELLM_URL")
        .ok()
        .filter(|u| !u.is_empty())
    {
        let url = url.trim_end_matches('/').to_owned();
        let addr = url
            .strip_prefix("http://")
            .and_then(|a| a.split('/').next())
            .and_then(|a| std::net::ToSocketAddrs::to_socket_addrs(a).ok())
            .and_then(|mut a| a.next())
            .ok_or_else(|| format!("PLANGATE_TEST_LITELLM_URL={url}: expected http://host:port"))?;
        if !healthy(addr) {
            return Err(format!(
                "PLANGATE_TEST_LITELLM_URL={url} does not answer its health check"
            ));
        }
        return Ok(LiteLlm { url, log: None });
    }
    // A port picked free can be taken before LiteLLM binds it: try again
    // once if that is why it stopped.
    match start() {
        Err(e) if e.contains("address already in use") => start(),
        r => r,
    }
}

/// Sets the parent-death signal, checks the parent is still the one that
/// spawned it (else it died before the signal was armed), then runs the
/// `litellm` command line with the arguments given.
const LAUNCHER: &str = r#"
import ctypes, os, sys
ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
if os.getppid() != int(os.environ["PLANGATE_TEST_PARENT_PID"]):
    sys.exit("plangate test process gone before LiteLLM started")
from litellm.proxy.proxy_cli import run_server
sys.argv = ["litellm"] + sys.argv[1:]
run_server()
"#;

fn start() -> Result<LiteLlm, String> {
    let began = Instant::now();
    let port = crate::procs::free_port();
    let log_path = std::env::temp_dir().join(format!(
        "plangate-litellm-{}-{port}.log",
        std::process::id()
    ));
    let log = std::fs::File::create(&log_path).map_err(|e| format!("{log_path:?}: {e}"))?;
    let log2 = log.try_clone().map_err(|e| e.to_string())?;
    let python = std::env::var("PLANGATE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut cmd = Command::new(&python);
    cmd.arg("-c")
        .arg(LAUNCHER)
        .arg("--config")
        .arg(config_path())
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .env("PLANGATE_TEST_PARENT_PID", std::process::id().to_string())
        .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        .env(
            "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY",
            "true",
        )
        .env("LITELLM_TELEMETRY", "False")
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);

    // The parent-death signal follows the thread that spawned the child, so
    // spawn it from a thread that lives until the child exits (and reaps it).
    let (tx, rx) = std::sync::mpsc::channel::<Result<Arc<Mutex<Child>>, String>>();
    let exited: Arc<Mutex<Option<String>>> = Arc::default();
    let exited2 = exited.clone();
    std::thread::Builder::new()
        .name("litellm-child".into())
        .spawn(move || {
            let child = match cmd.spawn() {
                Ok(c) => Arc::new(Mutex::new(c)),
                Err(e) => {
                    let _ = tx.send(Err(format!("spawning {python}: {e}")));
                    return;
                }
            };
            let _ = tx.send(Ok(child.clone()));
            loop {
                match child.lock().unwrap().try_wait() {
                    Ok(None) => {}
                    Ok(Some(status)) => {
                        *exited2.lock().unwrap() = Some(status.to_string());
                        return;
                    }
                    Err(e) => {
                        *exited2.lock().unwrap() = Some(e.to_string());
                        return;
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
        .map_err(|e| e.to_string())?;
    let child = rx.recv().map_err(|e| e.to_string())??;

    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let tail = || {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    };
    loop {
        if let Some(status) = exited.lock().unwrap().clone() {
            return Err(format!(
                "LiteLLM exited ({status}) before answering; log {log_path:?}:\n{}",
                tail()
            ));
        }
        if healthy(addr) {
            break;
        }
        if began.elapsed() > START_TIMEOUT {
            let _ = child.lock().unwrap().kill();
            return Err(format!(
                "LiteLLM did not answer within {START_TIMEOUT:?}; log {log_path:?}:\n{}",
                tail()
            ));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let ready = began.elapsed();
    // The first completion pays for lazy imports: pay it here, not inside
    // a gateway's request timeout.
    let warm = http(
        addr,
        &format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{}",
            WARM_BODY.len(),
            WARM_BODY
        ),
        Duration::from_secs(60),
    );
    if !warm.as_deref().is_ok_and(|r| r.starts_with("HTTP/1.1 200")) {
        let _ = child.lock().unwrap().kill();
        return Err(format!(
            "LiteLLM's first chat completion failed ({warm:?}); log {log_path:?}:\n{}",
            tail()
        ));
    }
    eprintln!(
        "LiteLLM listening on 127.0.0.1:{port} (healthy after {:.1} s, warm after {:.1} s; log {log_path:?})",
        ready.as_secs_f64(),
        began.elapsed().as_secs_f64()
    );
    Ok(LiteLlm {
        url: format!("http://127.0.0.1:{port}"),
        log: Some(log_path),
    })
}

const WARM_BODY: &str = r#"{"model":"gpt-test","messages":[{"role":"user","content":"warm up"}]}"#;

/// `GET /health/liveliness` answers 200.
fn healthy(addr: SocketAddr) -> bool {
    http(
        addr,
        &format!("GET /health/liveliness HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"),
        Duration::from_secs(5),
    )
    .is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
}

/// One raw HTTP/1.1 exchange (the request closes the connection).
fn http(addr: SocketAddr, request: &str, timeout: Duration) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(request.as_bytes())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}
