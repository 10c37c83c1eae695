//! The admin console (`/ui/`) in a real headless Chromium, driven over
//! WebDriver, against a real gateway on Postgres and Redis: sign-in, the
//! accounts search among 10,000, live usage bars, credits, keys, CSRF,
//! session expiry (on the injected clock) and sign-out. Screenshots of each
//! page go to `PLANGATE_CONSOLE_SCREENSHOTS` (e.g. `docs/console`), else to
//! the target directory.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use plangate::clock::Clock;
use plangate_tests::harness::{send_to, Backend, Options, TestGateway, ADMIN_TOKEN};
use plangate_tests::webdriver::Browser;

fn screenshot_dir() -> PathBuf {
    match std::env::var_os("PLANGATE_CONSOLE_SCREENSHOTS") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console"),
    }
}

/// 10,000 accounts `cust-00001` .. `cust-10000` in one statement.
async fn seed_accounts(url: &str, n: u32) {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
        .execute(
            "INSERT INTO accounts (id, metadata, created_at)
             SELECT 'cust-' || lpad(i::text, 5, '0'), '{}', now()
             FROM generate_series(1, $1::int) i",
            &[&(n as i32)],
        )
        .await
        .expect("seed accounts");
    client
        .execute("ANALYZE accounts", &[])
        .await
        .expect("analyze");
}

/// The text of the usage of `endpoint`'s `unit` window of `window`.
fn usage_css(endpoint: &str, window: &str, unit: &str) -> String {
    format!(
        r#"div.win[data-endpoint="{endpoint}"][data-window="{window}"][data-unit="{unit}"] .usage"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_in_a_real_browser() {
    if !Backend::all().await.contains(&Backend::Real) {
        return; // skipped loudly by Backend::all
    }
    let Some(b) = Browser::start().await else {
        return;
    };
    let mut opts = Options::new(Backend::Real);
    opts.extra_admin = "console_session_ttl = \"10m\"".into();
    let t = TestGateway::start(opts).await;
    let pg = t.config.storage.postgres_url.clone().expect("postgres url");
    seed_accounts(&pg, 10_000).await;
    let target = "cust-04242";
    let key = t.catalog().create_key(target).await.expect("key").key;
    let ui = format!("http://{}/ui", t.admin_addr);
    let shots = screenshot_dir();

    // Not signed in: every page leads to the sign-in form.
    b.goto(&format!("{ui}/accounts")).await;
    assert!(b.url().await.ends_with("/ui/login"), "{}", b.url().await);
    b.screenshot(&shots.join("login.png")).await;

    // A wrong token is refused, and said so.
    b.type_into("#token", "not-the-token").await;
    b.click("#signin").await;
    let error = b.wait_text("#error", |s| !s.is_empty()).await;
    assert!(error.contains("Wrong admin token"), "{error}");
    assert!(b.try_find("#signout").await.is_none());

    // Sign in.
    b.type_into("#token", ADMIN_TOKEN).await;
    b.click("#signin").await;
    b.find("#signout").await;
    assert!(b.url().await.ends_with("/ui/"), "{}", b.url().await);
    let cookies = b.cookies().await;
    let session = cookies
        .iter()
        .find(|c| c["name"] == "plangate_console")
        .expect("session cookie");
    assert_eq!(session["httpOnly"], true);
    assert_eq!(session["sameSite"], "Strict");
    assert!(session["expiry"].as_u64().is_some(), "expires: {session}");
    let sid = session["value"].as_str().unwrap().to_owned();
    assert!(!b.source().await.contains(ADMIN_TOKEN));

    // Find one account among 10,000 by the start of its id.
    b.click("header a[href='/ui/accounts']").await;
    b.type_into("#q", "cust-0424").await;
    b.click("#search").await;
    b.wait_text("#accounts", |s| s.contains(target)).await;
    let rows = b
        .exec("return document.querySelectorAll('#accounts tbody tr').length")
        .await;
    assert_eq!(rows, 10, "cust-04240 to cust-04249");
    b.screenshot(&shots.join("accounts.png")).await;
    // Pages: the first page of everything, then the next.
    b.type_into("#q", "cust-").await;
    b.click("#search").await;
    b.wait_text("#accounts", |s| s.contains("cust-00001")).await;
    b.click("#next").await;
    b.wait_text("#accounts", |s| s.contains("cust-00051")).await;
    b.goto(&format!("{ui}/accounts?q=cust-0424")).await;
    b.click(&format!("a[href='/ui/accounts/{target}']")).await;
    b.wait_text("#account-id", |s| s == target).await;

    // Usage bars follow requests: the page's live refresh redraws them.
    let css = usage_css("gpt-test", "60s", "request");
    let before = b.text(&css).await;
    assert!(before.starts_with("0 / 3"), "{before}");
    for _ in 0..2 {
        assert_eq!(t.chat(&key, "gpt-test").await.status, 200);
    }
    t.wait_settled().await;
    // Live: redrawn by the page's script within its 5 s refresh.
    let mut seen = String::new();
    for _ in 0..80 {
        seen = b.text(&css).await;
        if seen.starts_with("2 / 3") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen.starts_with("2 / 3"), "live bar: {seen}");
    let tokens = b.text(&usage_css("gpt-test", "60s", "token")).await;
    assert!(!tokens.starts_with("0 /"), "tokens counted: {tokens}");
    b.screenshot(&shots.join("account.png")).await;

    // Grant credits with an expiry: the balance moves.
    assert_eq!(b.text("#balance").await, "0");
    b.type_into("#credits", "1500").await;
    b.exec("document.getElementById('credits-expires').value = '2027-03-01'; return 1")
        .await;
    b.click("#grant").await;
    b.accept_alert().await;
    b.wait_text("#done", |s| s.contains("Credits granted"))
        .await;
    assert_eq!(b.text("#balance").await, "1,500");
    let blocks = b.text("#blocks").await;
    assert!(blocks.contains("2027-03-01 00:00:00 UTC"), "{blocks}");
    assert_eq!(t.catalog().balance(target).await.unwrap(), 1500);

    // A form without the CSRF token is refused, in the browser...
    b.exec(
        "const f = document.getElementById('credits').form;
         f.querySelector('input[name=csrf]').remove();
         document.getElementById('credits').value = '99';
         f.submit(); return 1",
    )
    .await;
    let refused = b.wait_text("#error", |s| !s.is_empty()).await;
    assert!(refused.contains("CSRF"), "{refused}");
    // ...and from outside it, with the session cookie but no or a wrong token.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    for body in ["credits=99", "credits=99&csrf=0000"] {
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("/ui/accounts/{target}/credits"))
            .header("cookie", format!("plangate_console={sid}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let r = send_to(&client, t.admin_addr, req).await;
        assert_eq!(r.status, 403, "{body}");
    }
    assert_eq!(t.catalog().balance(target).await.unwrap(), 1500);

    // Create a key (shown once) and revoke it.
    b.goto(&format!("{ui}/accounts/{target}")).await;
    b.type_into("#key-label", "console-test").await;
    b.click("#create-key").await;
    b.accept_alert().await;
    let new_key = b.wait_text("#new-key", |s| s.starts_with("pg_")).await;
    assert_eq!(t.chat(&new_key, "gpt-test").await.status, 200);
    let keys = t.catalog().list_keys(target).await.unwrap();
    let made = keys
        .iter()
        .find(|k| k.label.as_deref() == Some("console-test"))
        .expect("the new key");
    b.goto(&format!("{ui}/accounts/{target}")).await;
    assert!(
        !b.source().await.contains(&new_key),
        "a key is shown only once"
    );
    b.click(&format!("button.revoke[data-key='{}']", made.id))
        .await;
    b.accept_alert().await;
    b.wait_text("#done", |s| s.contains("Key revoked")).await;
    assert_eq!(t.chat(&new_key, "gpt-test").await.status, 401);
    assert_eq!(t.chat(&key, "gpt-test").await.status, 429, "3 a minute");

    // The other pages render.
    b.goto(&format!("{ui}/plans")).await;
    b.wait_text("#plan-basic", |s| s.contains("gpt-test")).await;
    b.screenshot(&shots.join("plans.png")).await;
    b.goto(&format!("{ui}/")).await;
    b.wait_text("#rpm-hour", |s| s.contains("admitted")).await;
    b.screenshot(&shots.join("overview.png")).await;
    // On a phone.
    b.set_size(390, 844).await;
    b.goto(&format!("{ui}/accounts/{target}")).await;
    b.find("#limits").await;
    b.screenshot(&shots.join("account-phone.png")).await;
    b.set_size(1280, 900).await;
    assert!(!b.source().await.contains(ADMIN_TOKEN));

    // Load times in the browser (HTML, CSS, JS, layout), 10,000 accounts.
    for page in [
        "/".to_owned(),
        "/accounts".to_owned(),
        "/accounts?q=cust-0424".to_owned(),
        format!("/accounts/{target}"),
        "/plans".to_owned(),
    ] {
        b.goto(&format!("{ui}{page}")).await;
        let (ms, bytes) = b.load_timing().await;
        eprintln!("console page {page}: loaded in {ms:.0} ms, {bytes} bytes of HTML");
        assert!(ms < 2_000.0, "{page} took {ms} ms");
    }

    // Sign out: the session is gone.
    b.click("#signout").await;
    b.find("#signin").await;
    b.goto(&format!("{ui}/accounts")).await;
    assert!(b.url().await.ends_with("/ui/login"), "{}", b.url().await);
    let req = Request::builder()
        .uri("/ui/accounts")
        .header("cookie", format!("plangate_console={sid}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = send_to(&client, t.admin_addr, req).await;
    assert_eq!(r.status, 303, "a signed-out session id is refused");

    // A session expires (10 minutes here) on the gateway's clock.
    b.type_into("#token", ADMIN_TOKEN).await;
    b.click("#signin").await;
    b.find("#signout").await;
    t.clock.advance(Duration::from_secs(9 * 60));
    b.goto(&format!("{ui}/accounts")).await;
    b.find("#accounts").await;
    // An open account page notices on its next refresh (every 5 s).
    b.goto(&format!("{ui}/accounts/{target}")).await;
    b.find("#limits").await;
    t.clock.advance(Duration::from_secs(60));
    let mut url = String::new();
    for _ in 0..80 {
        url = b.url().await;
        if url.contains("/ui/login") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(url.ends_with("/ui/login?expired=1"), "{url}");
    let note = b.wait_text("#note", |s| !s.is_empty()).await;
    assert!(note.contains("expired"), "{note}");
    assert!(b.url().await.contains("/ui/login"));

    b.quit().await;
    t.stop().await;
}

/// A console client without a browser: cookies kept, forms posted.
struct Http<'a> {
    t: &'a TestGateway,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
    cookies: std::collections::BTreeMap<String, String>,
}

impl<'a> Http<'a> {
    fn new(t: &'a TestGateway) -> Self {
        Http {
            t,
            client: hyper_util::client::legacy::Client::builder(
                hyper_util::rt::TokioExecutor::new(),
            )
            .build_http(),
            cookies: Default::default(),
        }
    }

    async fn send(&mut self, method: Method, path: &str, form: Option<&str>) -> Resp {
        let cookie: Vec<String> = self
            .cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let mut b = Request::builder().method(method).uri(path);
        if !cookie.is_empty() {
            b = b.header("cookie", cookie.join("; "));
        }
        if form.is_some() {
            b = b.header("content-type", "application/x-www-form-urlencoded");
        }
        let req = b
            .body(Full::new(Bytes::from(form.unwrap_or("").to_owned())))
            .unwrap();
        let r = send_to(&self.client, self.t.admin_addr, req).await;
        for v in r.headers.get_all("set-cookie") {
            let v = v.to_str().unwrap();
            let (kv, attrs) = v.split_once(';').unwrap_or((v, ""));
            let (k, val) = kv.split_once('=').unwrap();
            if val.is_empty() || attrs.contains("Max-Age=0") {
                self.cookies.remove(k);
            } else {
                self.cookies.insert(k.to_owned(), val.to_owned());
            }
        }
        r
    }

    async fn get(&mut self, path: &str) -> Resp {
        self.send(Method::GET, path, None).await
    }

    async fn post(&mut self, path: &str, form: &str) -> Resp {
        self.send(Method::POST, path, Some(form)).await
    }

    /// Sign in through the form; the page's CSRF token.
    async fn sign_in(&mut self) -> String {
        let login = self.get("/ui/login").await;
        let nonce = csrf_of(&login);
        let r = self
            .post("/ui/login", &format!("csrf={nonce}&token={ADMIN_TOKEN}"))
            .await;
        assert_eq!(r.status, 303);
        assert_eq!(r.header("location"), Some("/ui/"));
        let home = self.get("/ui/").await;
        assert_eq!(home.status, 200);
        csrf_of(&home)
    }
}

use plangate_tests::harness::Resp;

fn text(r: &Resp) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

fn csrf_of(r: &Resp) -> String {
    let body = text(r);
    let start = body.find(r#"name="csrf" value=""#).expect("a csrf field") + 19;
    body[start..start + 64].to_owned()
}

/// Every action of the account page, on each backend, over plain HTTP:
/// assign a plan, grant credits, create and revoke a key, reset counters;
/// the sign-in form's own CSRF check; security headers; no admin token in
/// any page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_actions_on_each_backend() {
    for t in TestGateway::each_backend().await {
        let (account, key) = t.account(None).await;
        let mut h = Http::new(&t);
        // The sign-in form refuses a post without its own CSRF cookie...
        let r = h
            .post("/ui/login", &format!("csrf=x&token={ADMIN_TOKEN}"))
            .await;
        assert_eq!(r.status, 403);
        assert!(!h.cookies.contains_key("plangate_console"));
        // ...and a wrong token, without echoing it.
        let nonce = csrf_of(&h.get("/ui/login").await);
        let r = h
            .post("/ui/login", &format!("csrf={nonce}&token=guess-123"))
            .await;
        assert_eq!(r.status, 401);
        assert!(!text(&r).contains("guess-123"));
        let csrf = h.sign_in().await;
        let page = h.get(&format!("/ui/accounts/{account}")).await;
        assert_eq!(page.status, 200);
        let csp = page.header("content-security-policy").unwrap();
        assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"));
        assert_eq!(page.header("cache-control"), Some("no-store"));
        assert_eq!(page.header("x-frame-options"), Some("DENY"));
        assert!(!text(&page).contains(ADMIN_TOKEN));

        // Assign a plan, and back to the default.
        let r = h
            .post(
                &format!("/ui/accounts/{account}/plan"),
                &format!("csrf={csrf}&plan=other"),
            )
            .await;
        assert_eq!(r.status, 303, "{}", text(&r));
        let a = t.catalog().get_account(&account).await.unwrap();
        assert_eq!(a.plan_id.as_deref(), Some("other"));
        let r = h
            .post(
                &format!("/ui/accounts/{account}/plan"),
                &format!("csrf={csrf}&plan="),
            )
            .await;
        assert_eq!(r.status, 303);
        let a = t.catalog().get_account(&account).await.unwrap();
        assert_eq!(a.plan_id, None);
        // An unknown plan: the page says so, nothing changes.
        let r = h
            .post(
                &format!("/ui/accounts/{account}/plan"),
                &format!("csrf={csrf}&plan=ghost"),
            )
            .await;
        assert_eq!(r.status, 404);
        assert!(text(&r).contains("ghost"), "{}", text(&r));

        // Grant credits; a bad amount or a past date is refused.
        for (form, status) in [
            ("credits=0", 400),
            ("credits=ten", 400),
            ("credits=5&expires=2020-01-01", 400),
            ("credits=5&expires=someday", 400),
            ("credits=250&expires=2027-02-01", 303),
        ] {
            let r = h
                .post(
                    &format!("/ui/accounts/{account}/credits"),
                    &format!("csrf={csrf}&{form}"),
                )
                .await;
            assert_eq!(r.status, status, "{form}: {}", text(&r));
        }
        assert_eq!(t.catalog().balance(&account).await.unwrap(), 250);

        // Create a key: shown once, works; revoke it: refused at once.
        let r = h
            .post(
                &format!("/ui/accounts/{account}/keys"),
                &format!("csrf={csrf}&label=from+the+console"),
            )
            .await;
        assert_eq!(r.status, 201);
        let body = text(&r);
        let at = body.find(r#"id="new-key">"#).unwrap() + 13;
        let new_key = body[at..].split('<').next().unwrap().to_owned();
        assert!(new_key.starts_with("pg_"), "{new_key}");
        assert_eq!(t.chat(&new_key, "gpt-test").await.status, 200);
        let made = t
            .catalog()
            .list_keys(&account)
            .await
            .unwrap()
            .into_iter()
            .find(|k| k.label.as_deref() == Some("from the console"))
            .unwrap();
        let page = text(&h.get(&format!("/ui/accounts/{account}")).await);
        assert!(!page.contains(&new_key));
        assert!(page.contains("from the console"));
        // A key of another account is not revoked from this page.
        let (_, other_key) = t.account(None).await;
        let other = t
            .catalog()
            .lookup_key(&plangate::catalog::hash_key(&other_key))
            .await
            .unwrap()
            .unwrap();
        let r = h
            .post(
                &format!("/ui/accounts/{account}/keys/{}/revoke", other.key_id),
                &format!("csrf={csrf}"),
            )
            .await;
        assert_eq!(r.status, 404);
        assert_eq!(t.chat(&other_key, "gpt-test").await.status, 200);
        let r = h
            .post(
                &format!("/ui/accounts/{account}/keys/{}/revoke", made.id),
                &format!("csrf={csrf}"),
            )
            .await;
        assert_eq!(r.status, 303);
        // The key cache hears of the revocation from the catalog's
        // notification: within moments, not necessarily before the reply.
        // Polled on `GET /v1/limits`, which authenticates but admits
        // nothing: a chat that still got through would fill the window
        // the reset below counts on.
        let mut status = 200;
        for _ in 0..200 {
            let req = Request::builder()
                .uri("/v1/limits")
                .header("authorization", format!("Bearer {new_key}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            status = t.send(req).await.status.as_u16();
            if status == 401 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(status, 401);
        assert_eq!(t.chat(&new_key, "gpt-test").await.status, 401);

        // Reset counters: the window that was full is empty again (the
        // new key's request was the first of 3 this minute).
        for _ in 0..2 {
            assert_eq!(t.chat(&key, "gpt-test").await.status, 200);
        }
        t.wait_settled().await;
        assert_eq!(t.chat(&key, "gpt-test").await.status, 429, "3 a minute");
        let r = h
            .post(
                &format!("/ui/accounts/{account}/reset"),
                &format!("csrf={csrf}&endpoint=gpt-test"),
            )
            .await;
        assert_eq!(r.status, 303);
        assert_eq!(t.chat(&key, "gpt-test").await.status, 200);

        // The live fragment, the plans page, the overview; unknown pages.
        t.wait_settled().await;
        let bars = text(&h.get(&format!("/ui/accounts/{account}/limits")).await);
        assert!(bars.contains("1 / 3"), "{bars}");
        let plans = h.get("/ui/plans").await;
        assert!(text(&plans).contains(r#"id="plan-other""#));
        let overview = text(&h.get("/ui/").await);
        assert!(overview.contains("rpm-hour"));
        // Top accounts come from the usage events (written in the background).
        let mut top = String::new();
        for _ in 0..100 {
            top = text(&h.get("/ui/").await);
            if top.contains(&format!(r#"<a href="/ui/accounts/{account}">"#)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            top.contains(&format!(r#"<a href="/ui/accounts/{account}">"#)),
            "{top}"
        );
        // An account whose only usage has no units: a requests chart alone.
        let (quiet, _) = t.account(None).await;
        let at = std::time::UNIX_EPOCH + Duration::from_millis(t.clock.now_ms() - 1_000);
        t.catalog()
            .record_usage(&[plangate::catalog::UsageEvent {
                request_id: format!("req-{quiet}"),
                account_id: quiet.clone(),
                key_id: None,
                endpoint: "gpt-test".into(),
                route: "/v1/chat/completions".into(),
                units: Vec::new(),
                credits: 0,
                status: 200,
                degraded: false,
                streamed: false,
                cut_short: false,
                started_at: at,
                ended_at: at,
                charge: None,
            }])
            .await
            .unwrap();
        let page = h.get(&format!("/ui/accounts/{quiet}")).await;
        assert_eq!(page.status, 200);
        assert!(text(&page).contains("<h3>requests</h3>"), "{}", text(&page));
        assert_eq!(h.get("/ui/nowhere").await.status, 404);
        assert_eq!(h.get("/ui/accounts/no-such-account").await.status, 404);
        // A session is not an admin API credential, nor the reverse.
        let r = t.admin(Method::GET, "/admin/plans", None, "").await;
        assert_eq!(r.status, 401);
        let mut bearer_only = Http::new(&t);
        let r = bearer_only.get("/ui/accounts").await;
        assert_eq!(r.status, 303);
        t.stop().await;
    }
    // `[admin] console = false`: no console, the admin API alone.
    let mut opts = Options::new(Backend::Memory);
    opts.extra_admin = "console = false".into();
    let t = TestGateway::start(opts).await;
    let r = t.admin(Method::GET, "/ui/login", None, "").await;
    assert_eq!(r.status, 401);
    let r = t
        .admin(Method::GET, "/ui/login", Some(ADMIN_TOKEN), "")
        .await;
    assert_eq!(r.status, 404);
    let r = t
        .admin(Method::GET, "/admin/plans", Some(ADMIN_TOKEN), "")
        .await;
    assert_eq!(r.status, 200);
    t.stop().await;
}

fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// Database-owned plans are edited on the plans page: what it shows
/// applies as it is, a refused edit shows each error at its line and
/// changes nothing; file-owned plans are not editable (409).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_plan_edits_on_each_backend() {
    for backend in Backend::all().await {
        let mut opts = Options::new(backend);
        opts.plans_source = "database";
        let t = TestGateway::start(opts).await;
        let mut h = Http::new(&t);
        let csrf = h.sign_in().await;
        let page = text(&h.get("/ui/plans").await);
        let start = page.find(r#"id="plans-text""#).expect("an edit form");
        let start = start + page[start..].find('>').unwrap() + 1;
        let end = start + page[start..].find("</textarea>").unwrap();
        let shown = unescape(&page[start..end]);
        let enc = |s: &str| s.bytes().map(|b| format!("%{b:02X}")).collect::<String>();
        // What the page shows applies unchanged.
        let r = h
            .post("/ui/plans", &format!("csrf={csrf}&plans={}", enc(&shown)))
            .await;
        assert_eq!(r.status, 303, "{}", text(&r));

        // An error is shown at its line; nothing is applied.
        let bad = "plans:\n  gold:\n    endpoints:\n      gpt-test:\n        fixed_windows:\n          - window: 60s\n            limit: 0\n";
        let r = h
            .post("/ui/plans", &format!("csrf={csrf}&plans={}", enc(bad)))
            .await;
        assert_eq!(r.status, 400);
        let body = text(&r);
        assert!(body.contains(r#"data-line="7""#), "{body}");
        assert!(body.contains("plans:7:"), "{body}");
        assert!(body.contains("▶    7 │             limit: 0"), "{body}");
        assert!(t.catalog().get_plan("gold").await.is_err());

        // A good edit applies, and every gateway's cache hears of it.
        let good = bad.replace("limit: 0", "limit: 7");
        let r = h
            .post("/ui/plans", &format!("csrf={csrf}&plans={}", enc(&good)))
            .await;
        assert_eq!(r.status, 303, "{}", text(&r));
        let gold = t.catalog().get_plan("gold").await.unwrap();
        assert_eq!(gold.endpoints["gpt-test"].windows[0].limit, 7);
        assert!(text(&h.get("/ui/plans?done=plans").await).contains(r#"id="plan-gold""#));
        // Without the CSRF token: refused.
        let r = h.post("/ui/plans", &format!("plans={}", enc(&good))).await;
        assert_eq!(r.status, 403);
        t.stop().await;
    }
    // File-owned plans: shown, not editable.
    let t = TestGateway::start(Options::new(Backend::Memory)).await;
    let mut h = Http::new(&t);
    let csrf = h.sign_in().await;
    let page = text(&h.get("/ui/plans").await);
    assert!(!page.contains("plans-text"));
    let r = h.post("/ui/plans", &format!("csrf={csrf}&plans=x")).await;
    assert_eq!(r.status, 409);
    t.stop().await;
}

/// The overview counts an admission made without the counter store as
/// degraded, not admitted, and shows the store down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_overview_shows_degraded_admissions() {
    if !Backend::all().await.contains(&Backend::Real) {
        return;
    }
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("redis://127.0.0.1:{}", l.local_addr().unwrap().port())
    };
    let mut opts = Options::new(Backend::Real);
    opts.redis_url = Some(dead);
    opts.on_store_error = "open";
    let t = TestGateway::start(opts).await;
    let (_, key) = t.account(None).await;
    let r = t.chat(&key, "gpt-test").await;
    assert_eq!(r.header("x-ratelimit-degraded"), Some("true"));
    let mut h = Http::new(&t);
    h.sign_in().await;
    let page = text(&h.get("/ui/").await);
    let hour = &page[page.find(r#"id="rpm-hour""#).unwrap()..];
    let hour = &hour[..hour.find("</svg>").unwrap()];
    assert!(hour.contains(" degraded: 1</title>"), "{hour}");
    assert!(!hour.contains(" admitted: "), "{hour}");
    assert!(
        page.contains(r#"<span class="pill down" id="store-redis">down</span>"#),
        "{page}"
    );
    assert!(page.contains(r#"<span class="pill up" id="store-postgres">up</span>"#));
    t.stop().await;
}
