//! A headless Chromium driven over WebDriver (W3C, plain HTTP + JSON) by
//! Debian's `chromedriver`, with the hyper client the tests already use:
//! no browser-automation crate.
//!
//! [`Browser::start`] returns `None` (loudly) when `chromedriver` or
//! `chromium` is not installed, and panics instead under
//! `PLANGATE_REQUIRE_SERVICES=1` (`tests/run.sh` installs both).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

/// The W3C key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// `name` on the `PATH`, if there.
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A chromedriver process and one browser session in it.
pub struct Browser {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    session: String,
    driver: Child,
    profile: PathBuf,
}

impl Browser {
    /// Start chromedriver on a free port and a headless Chromium session
    /// with a fresh profile; `None` when they are not installed (and not
    /// required).
    pub async fn start() -> Option<Browser> {
        let found = (
            which("chromedriver"),
            which("chromium").or_else(|| which("chromium-browser")),
        );
        let (Some(driver_bin), Some(chromium)) = found else {
            if std::env::var("PLANGATE_REQUIRE_SERVICES").is_ok_and(|v| v == "1") {
                panic!("chromium and chromedriver are required (PLANGATE_REQUIRE_SERVICES=1) but not installed: apt-get install -y chromium chromium-driver");
            }
            eprintln!("\n*** SKIPPING the browser tests: chromium or chromedriver is not installed.\n*** apt-get install -y chromium chromium-driver (./tests/run.sh does).\n");
            return None;
        };
        let port = crate::procs::free_port();
        let driver = Command::new(driver_bin)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn chromedriver");
        let profile = std::env::temp_dir().join(crate::harness::unique("plangate-chromium"));
        std::fs::create_dir_all(&profile).expect("profile dir");
        let mut b = Browser {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base: format!("http://127.0.0.1:{port}"),
            session: String::new(),
            driver,
            profile,
        };
        // Ready within 10 s.
        let mut ready = false;
        for _ in 0..200 {
            if let Ok(v) = b.raw(Method::GET, "/status", None).await {
                if v["value"]["ready"] == true {
                    ready = true;
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(ready, "chromedriver did not become ready within 10 s");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "unhandledPromptBehavior": "ignore",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1280,900",
                    format!("--user-data-dir={}", b.profile.display()),
                ],
            },
        }}});
        let v = b
            .raw(Method::POST, "/session", Some(caps))
            .await
            .expect("new session");
        b.session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_owned();
        Some(b)
    }

    async fn raw(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value, String> {
        let req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                body.map(|b| b.to_string()).unwrap_or_default(),
            )))
            .map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(Duration::from_secs(30), self.client.request(req))
            .await
            .map_err(|_| "webdriver: no answer within 30 s".to_owned())?
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
        if status.is_success() {
            Ok(v)
        } else {
            Err(format!("{status}: {}", v["value"]))
        }
    }

    /// A command of this session; its `value`.
    async fn cmd(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value, String> {
        let path = format!("/session/{}{path}", self.session);
        self.raw(method, &path, body)
            .await
            .map(|v| v["value"].clone())
    }

    /// Navigate to `url` (returns when the page has loaded).
    pub async fn goto(&self, url: &str) {
        self.cmd(Method::POST, "/url", Some(json!({ "url": url })))
            .await
            .unwrap_or_else(|e| panic!("navigate to {url}: {e}"));
    }

    pub async fn url(&self) -> String {
        self.cmd(Method::GET, "/url", None)
            .await
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    pub async fn source(&self) -> String {
        self.cmd(Method::GET, "/source", None)
            .await
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// The element matching `css` now, if any.
    pub async fn try_find(&self, css: &str) -> Option<String> {
        let v = self
            .cmd(
                Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await
            .ok()?;
        v[ELEMENT].as_str().map(str::to_owned)
    }

    /// The element matching `css`, waiting up to 5 s for it to appear.
    pub async fn find(&self, css: &str) -> String {
        for _ in 0..100 {
            if let Some(e) = self.try_find(css).await {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "no element `{css}` within 5 s at {}:\n{}",
            self.url().await,
            self.source().await
        );
    }

    pub async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.cmd(
            Method::POST,
            &format!("/element/{e}/click"),
            Some(json!({})),
        )
        .await
        .unwrap_or_else(|err| panic!("click {css}: {err}"));
    }

    pub async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.cmd(
            Method::POST,
            &format!("/element/{e}/clear"),
            Some(json!({})),
        )
        .await
        .unwrap_or_else(|err| panic!("clear {css}: {err}"));
        self.cmd(
            Method::POST,
            &format!("/element/{e}/value"),
            Some(json!({ "text": text })),
        )
        .await
        .unwrap_or_else(|err| panic!("type into {css}: {err}"));
    }

    /// The rendered text of the element matching `css`.
    pub async fn text(&self, css: &str) -> String {
        let e = self.find(css).await;
        self.cmd(Method::GET, &format!("/element/{e}/text"), None)
            .await
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// Wait up to 5 s for the text of `css` to satisfy `ok`; its text.
    pub async fn wait_text(&self, css: &str, ok: impl Fn(&str) -> bool) -> String {
        let mut last = String::new();
        for _ in 0..100 {
            if self.try_find(css).await.is_some() {
                last = self.text(css).await;
                if ok(&last) {
                    return last;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("`{css}` never had the expected text; last: {last:?}");
    }

    /// Accept the open `confirm()` dialog, waiting up to 5 s for it.
    pub async fn accept_alert(&self) {
        for _ in 0..100 {
            if self
                .cmd(Method::POST, "/alert/accept", Some(json!({})))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no dialog to accept within 5 s");
    }

    /// Run `script` (a function body) in the page; its return value.
    pub async fn exec(&self, script: &str) -> Value {
        self.cmd(
            Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .await
        .unwrap_or_else(|e| panic!("script failed: {e}"))
    }

    /// The current page's Navigation Timing: (ms from navigation start to
    /// the end of the load event, bytes of the HTML as transferred).
    pub async fn load_timing(&self) -> (f64, u64) {
        let v = self
            .exec(
                "const n = performance.getEntriesByType('navigation')[0];
                 return [n.loadEventEnd - n.startTime, n.encodedBodySize];",
            )
            .await;
        (
            v[0].as_f64().unwrap_or(f64::NAN),
            v[1].as_u64().unwrap_or(0),
        )
    }

    /// The session's cookies (HttpOnly ones included).
    pub async fn cookies(&self) -> Vec<Value> {
        self.cmd(Method::GET, "/cookie", None)
            .await
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }

    pub async fn set_size(&self, width: u32, height: u32) {
        self.cmd(
            Method::POST,
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .await
        .unwrap_or_else(|e| panic!("resize: {e}"));
    }

    /// Save a PNG of the viewport at `path`.
    pub async fn screenshot(&self, path: &Path) {
        let v = self
            .cmd(Method::GET, "/screenshot", None)
            .await
            .unwrap_or_else(|e| panic!("screenshot: {e}"));
        let png = base64_decode(v.as_str().unwrap_or("")).expect("screenshot base64");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot dir");
        }
        std::fs::write(path, png).expect("write screenshot");
    }

    /// End the session and chromedriver.
    pub async fn quit(mut self) {
        let _ = self.cmd(Method::DELETE, "", None).await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Standard base64 (with padding) decoded; `None` on a bad character.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' | b'\n' | b'\r' => continue,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn decodes_base64() {
        assert_eq!(super::base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(super::base64_decode("aGk=").unwrap(), b"hi");
        assert_eq!(super::base64_decode("").unwrap(), b"");
        assert!(super::base64_decode("a*").is_none());
    }
}
