//! The console's pages and actions, rendered as HTML strings. Every value
//! that comes from the catalog or the request goes through [`esc`] (text)
//! or [`enc`] (URLs); charts are inline SVG drawn here.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Response, StatusCode};

use super::{enc, esc, html, see_other, Ctx, Form};
use crate::catalog::{
    BucketKey, Catalog, CatalogError, GroupBy, Invalidation, KeyOptions, UsageQuery,
};
use crate::errors::ApiError;
use crate::server::Body;

/// Accounts per page of the accounts list.
const ACCOUNTS_PAGE: usize = 50;
/// Recent requests shown on an account page.
const RECENT: usize = 20;
/// Days of the account usage chart.
const CHART_DAYS: u64 = 30;

fn time_text(t: Option<SystemTime>) -> String {
    match t {
        Some(t) => {
            humantime::format_rfc3339_seconds(t)
                .to_string()
                .replace('T', " ")
                .trim_end_matches('Z')
                .to_owned()
                + " UTC"
        }
        None => "—".to_owned(),
    }
}

fn ms_time(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// `12_345` as `12,345`.
fn num(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A duration in ms as `1h 2m`, `45s`, `3d 4h`.
fn dur(ms: u64) -> String {
    let s = ms.div_ceil(1000);
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {}h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// The page frame: header, navigation, sign-out.
fn layout(ctx: &Ctx<'_>, title: &str, nav: &str, body: &str) -> String {
    let link = |href: &str, name: &str, id: &str| {
        format!(
            r#"<a href="{href}"{}>{name}</a>"#,
            if id == nav { r#" class="on""# } else { "" }
        )
    };
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1"><title>{title} · plangate</title><link rel="stylesheet" href="/ui/static/console.css"><script src="/ui/static/console.js" defer></script></head><body><header><span class="brand">plangate</span>{}{}{}<form method="post" action="/ui/logout"><input type="hidden" name="csrf" value="{csrf}"><button class="link" id="signout">Sign out</button></form></header><main>{body}</main></body></html>"#,
        link("/ui/", "Overview", "overview"),
        link("/ui/accounts", "Accounts", "accounts"),
        link("/ui/plans", "Plans", "plans"),
        title = esc(title),
        csrf = esc(&ctx.csrf),
    )
}

/// The sign-in page; `nonce` is its CSRF token (also in a cookie).
pub(crate) fn login(nonce: &str, note: Option<&str>, error: Option<&str>) -> String {
    let mut msg = String::new();
    if let Some(n) = note {
        let _ = write!(msg, r#"<p class="msg" id="note">{}</p>"#, esc(n));
    }
    if let Some(e) = error {
        let _ = write!(msg, r#"<p class="msg err" id="error">{}</p>"#, esc(e));
    }
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1"><title>Sign in · plangate</title><link rel="stylesheet" href="/ui/static/console.css"></head><body><main class="login"><div class="card"><h1>plangate console</h1>{msg}<form method="post" action="/ui/login"><input type="hidden" name="csrf" value="{nonce}"><label for="token">Admin token</label><input type="password" id="token" name="token" autocomplete="current-password" required autofocus><button id="signin">Sign in</button></form></div></main></body></html>"#,
        nonce = esc(nonce),
    )
}

/// A page that only says what went wrong (no session needed).
pub(crate) fn error_page(message: &str) -> String {
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1"><title>Error · plangate</title><link rel="stylesheet" href="/ui/static/console.css"></head><body><main><p class="msg err" id="error">{}</p><p><a href="/ui/">Back to the console</a></p></main></body></html>"#,
        esc(message)
    )
}

fn not_found(ctx: &Ctx<'_>, what: &str) -> Response<Body> {
    html(
        StatusCode::NOT_FOUND,
        layout(
            ctx,
            "Not found",
            "",
            &format!(r#"<p class="msg err" id="error">{}</p>"#, esc(what)),
        ),
    )
}

fn failure(ctx: &Ctx<'_>, e: &ApiError) -> Response<Body> {
    html(
        e.status(),
        layout(
            ctx,
            "Error",
            "",
            &format!(r#"<p class="msg err" id="error">{}</p>"#, esc(&e.message())),
        ),
    )
}

/// A GET page.
pub(crate) async fn get(ctx: &Ctx<'_>, segs: &[&str], query: &str) -> Response<Body> {
    let q = parse_query(query);
    match segs {
        [] => overview(ctx).await,
        ["accounts"] => accounts(ctx, &q).await,
        ["accounts", id] => account(ctx, id, &q, None, StatusCode::OK).await,
        ["accounts", id, "limits"] => match limits_html(ctx, id).await {
            Ok(s) => html(StatusCode::OK, s),
            Err(e) => html(e.status(), esc(&e.message())),
        },
        ["plans"] => plans_page(ctx, &q, None).await,
        _ => not_found(ctx, "No such console page."),
    }
}

fn parse_query(query: &str) -> Form {
    Form::parse(query.as_bytes())
}

// ---------------------------------------------------------------- overview

async fn overview(ctx: &Ctx<'_>) -> Response<Body> {
    let core = ctx.admin.core();
    let m = &core.metrics;
    let mut body = String::from("<h1>Overview</h1>");
    // Store health and reload failures.
    body.push_str(r#"<div class="grid"><div class="card" id="health"><h2>Stores</h2>"#);
    for store in ["redis", "postgres"] {
        let (cls, text) = match m.store_up(store) {
            Some(true) => ("up", "up"),
            Some(false) => ("down", "down"),
            None => ("", "in process"),
        };
        let _ = write!(
            body,
            r#"<p>{store} <span class="pill {cls}" id="store-{store}">{text}</span></p>"#
        );
    }
    let _ = write!(
        body,
        r#"<p>plan reload failures <span class="pill{}" id="reload-failures">{}</span></p><p>requests in flight <span class="pill">{}</span></p></div>"#,
        if m.reload_failures() > 0 { " down" } else { "" },
        num(m.reload_failures()),
        num(m.in_flight()),
    );
    // Top accounts by usage (last 24 h of usage events).
    body.push_str(r#"<div class="card" id="top"><h2>Top accounts, last 24 h</h2>"#);
    body.push_str(&top_accounts(ctx).await);
    body.push_str("</div></div>");
    // Requests per minute by decision.
    let names: Vec<String> = crate::metrics::MINUTE_CLASSES
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let now_min = ctx.now_ms / 60_000;
    let hour: Vec<(String, Vec<u64>)> = m
        .minutes(now_min, 60)
        .into_iter()
        .map(|(minute, counts)| (minute_label(minute), counts.to_vec()))
        .collect();
    let day: Vec<(String, Vec<u64>)> = m
        .minutes(now_min, 1440)
        .chunks(15)
        .map(|chunk| {
            let mut sum = vec![0u64; names.len()];
            for (_, c) in chunk {
                for (s, v) in sum.iter_mut().zip(c.iter()) {
                    *s += v;
                }
            }
            (minute_label(chunk[0].0), sum)
        })
        .collect();
    let _ = write!(
        body,
        r#"<div class="card" id="rpm-hour"><h2>Requests per minute, last hour</h2>{}</div><div class="card" id="rpm-day"><h2>Requests per 15 minutes, last day</h2>{}</div>"#,
        stacked_chart(&hour, &names, 10),
        stacked_chart(&day, &names, 8),
    );
    html(StatusCode::OK, layout(ctx, "Overview", "overview", &body))
}

fn minute_label(minute: u64) -> String {
    let m = minute % 1440;
    format!("{:02}:{:02}", m / 60, m % 60)
}

/// The accounts with the most requests over the last 24 h (summed by the
/// catalog: one bucket per account active in that day).
async fn top_accounts(ctx: &Ctx<'_>) -> String {
    let catalog: &dyn Catalog = &*ctx.admin.core().catalog;
    let q = UsageQuery {
        since: Some(ms_time(ctx.now_ms.saturating_sub(86_400_000))),
        ..UsageQuery::default()
    };
    let buckets = match catalog.usage_summary(&q, GroupBy::Account).await {
        Ok(b) => b,
        Err(e) => return format!(r#"<p class="mut">{}</p>"#, esc(&e.to_string())),
    };
    let mut top: Vec<(&str, u64, u64)> = buckets
        .iter()
        .filter_map(|b| match &b.key {
            BucketKey::Account(a) => Some((a.as_str(), b.requests, b.units.values().sum())),
            _ => None,
        })
        .collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    top.truncate(8);
    if top.is_empty() {
        return r#"<p class="mut">No usage recorded in the last 24 hours.</p>"#.to_owned();
    }
    let max = top[0].1.max(1);
    let mut out = String::new();
    for (id, requests, units) in &top {
        let _ = write!(
            out,
            r#"<div class="win"><a href="/ui/accounts/{}">{}</a>{}<span class="mut">{} req · {} units</span></div>"#,
            enc(id),
            esc(id),
            bar_of(*requests, max, Some("plain")),
            num(*requests),
            num(*units)
        );
    }
    out
}

/// A horizontal bar, `used` of `limit`, as inline SVG, coloured by how
/// full it is.
fn bar(used: u64, limit: u64) -> String {
    bar_of(used, limit, None)
}

/// [`bar`] in colour `class` (a comparison, not a limit) when given.
fn bar_of(used: u64, limit: u64, class: Option<&str>) -> String {
    let pct = if limit == 0 {
        0.0
    } else {
        (used as f64 / limit as f64 * 100.0).min(100.0)
    };
    let cls = if let Some(c) = class {
        c
    } else if pct >= 90.0 {
        "hi"
    } else if pct >= 70.0 {
        "mid"
    } else {
        "lo"
    };
    format!(
        r#"<svg class="bar" viewBox="0 0 100 10" preserveAspectRatio="none" role="img"><rect class="bg" width="100" height="10"/><rect class="{cls}" width="{pct:.1}" height="10"/></svg>"#
    )
}

/// A stacked bar chart: one column per `(label, values by series)`.
fn stacked_chart(columns: &[(String, Vec<u64>)], series: &[String], label_every: usize) -> String {
    const W: f64 = 600.0;
    const H: f64 = 150.0;
    const TOP: f64 = 14.0;
    const BOTTOM: f64 = 16.0;
    let max = columns
        .iter()
        .map(|(_, v)| v.iter().sum::<u64>())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg class="chart" viewBox="0 0 {W} {H}" role="img"><line class="ax" x1="0" y1="{y}" x2="{W}" y2="{y}"/><text x="2" y="10">max {max}</text>"#,
        y = H - BOTTOM,
        max = num(max)
    );
    let n = columns.len().max(1) as f64;
    let cw = W / n;
    let scale = if max == 0 {
        0.0
    } else {
        (H - TOP - BOTTOM) / max as f64
    };
    for (i, (label, values)) in columns.iter().enumerate() {
        let x = i as f64 * cw;
        let mut y = H - BOTTOM;
        for (s, v) in values.iter().enumerate() {
            if *v == 0 {
                continue;
            }
            let h = *v as f64 * scale;
            y -= h;
            let _ = write!(
                out,
                r#"<rect class="s{}" x="{:.1}" y="{y:.1}" width="{:.1}" height="{h:.1}"><title>{} {}: {}</title></rect>"#,
                s % 8,
                x + cw * 0.1,
                cw * 0.8,
                esc(label),
                esc(series.get(s).map(String::as_str).unwrap_or("")),
                num(*v)
            );
        }
        if label_every > 0 && i % label_every == 0 {
            let _ = write!(
                out,
                r#"<text x="{x:.1}" y="{}">{}</text>"#,
                H - 4.0,
                esc(label)
            );
        }
    }
    out.push_str("</svg>");
    out.push_str(&legend(series));
    out
}

fn legend(series: &[String]) -> String {
    let mut out = String::from(r#"<div class="legend">"#);
    for (i, s) in series.iter().enumerate() {
        let _ = write!(
            out,
            r#"<span><svg viewBox="0 0 10 10"><rect class="s{}" width="10" height="10"/></svg> {}</span>"#,
            i % 8,
            esc(s)
        );
    }
    out.push_str("</div>");
    out
}

// ---------------------------------------------------------------- accounts

async fn accounts(ctx: &Ctx<'_>, q: &Form) -> Response<Body> {
    let catalog: &dyn Catalog = &*ctx.admin.core().catalog;
    let prefix = q.get("q").unwrap_or("");
    let after = q.get("after");
    let mut rows = match catalog
        .search_accounts(prefix, after, ACCOUNTS_PAGE + 1)
        .await
    {
        Ok(r) => r,
        Err(e) => return failure(ctx, &ApiError::from(e)),
    };
    let next = crate::catalog::next_page(&mut rows, ACCOUNTS_PAGE, |r| r.account.id.clone());
    let mut body = format!(
        r#"<h1>Accounts</h1><form class="row" method="get" action="/ui/accounts" role="search"><label>Account id starts with<input type="search" name="q" id="q" value="{}" autocomplete="off"></label><button id="search">Search</button></form>"#,
        esc(prefix)
    );
    if rows.is_empty() {
        body.push_str(r#"<p class="mut" id="none">No account matches.</p>"#);
    } else {
        body.push_str(r#"<div class="card"><table class="wide" id="accounts"><thead><tr><th>Account</th><th>Plan</th><th class="n">Balance</th><th>Last seen</th></tr></thead><tbody>"#);
        for r in &rows {
            let a = &r.account;
            let plan = match (&a.plan_id, &a.effective_plan) {
                (Some(p), _) => esc(p),
                (None, Some(p)) => format!(r#"{} <span class="mut">(default)</span>"#, esc(p)),
                (None, None) => "—".to_owned(),
            };
            let _ = write!(
                body,
                r#"<tr><td data-h="Account"><a href="/ui/accounts/{}">{}</a></td><td data-h="Plan">{plan}</td><td class="n" data-h="Balance">{}</td><td data-h="Last seen">{}</td></tr>"#,
                enc(&a.id),
                esc(&a.id),
                num(r.balance),
                time_text(r.last_seen)
            );
        }
        body.push_str("</tbody></table></div>");
    }
    body.push_str(r#"<div class="pager">"#);
    if after.is_some() {
        let _ = write!(
            body,
            r#"<a href="/ui/accounts?q={}">First page</a>"#,
            enc(prefix)
        );
    }
    if let Some(n) = next {
        let _ = write!(
            body,
            r#"<a id="next" href="/ui/accounts?q={}&amp;after={}">Next page</a>"#,
            enc(prefix),
            enc(&n)
        );
    }
    body.push_str("</div>");
    html(StatusCode::OK, layout(ctx, "Accounts", "accounts", &body))
}

/// The usage bars of every window of every endpoint of the account's plan
/// (also served alone, for the page's live refresh).
async fn limits_html(ctx: &Ctx<'_>, id: &str) -> Result<String, ApiError> {
    let v = crate::proxy::limits_json(ctx.admin.core(), id, None, None).await?;
    let mut out = String::new();
    let balance = v["credits"]["balance"].as_u64();
    let _ = write!(
        out,
        r#"<p>Credit balance: <strong id="balance">{}</strong></p>"#,
        balance.map_or("unknown".to_owned(), num)
    );
    let Some(endpoints) = v["endpoints"].as_object() else {
        return Ok(out);
    };
    if endpoints.is_empty() {
        out.push_str(r#"<p class="mut">The account has no plan.</p>"#);
    }
    for (endpoint, e) in endpoints {
        let _ = write!(out, r#"<h3>{}</h3>"#, esc(endpoint));
        if e["degraded"].as_bool() == Some(true) {
            out.push_str(r#"<p class="mut">Counter store unavailable: usage unknown.</p>"#);
        }
        for w in e["windows"].as_array().into_iter().flatten() {
            let limit = w["limit"].as_u64().unwrap_or(0);
            let used = w["used"].as_u64();
            let unit = w["unit"].as_str().unwrap_or("");
            let window = w["window"].as_str().unwrap_or("");
            let reset = w["reset_ms"]
                .as_u64()
                .map(|r| format!(", resets in {}", dur(r)))
                .unwrap_or_default();
            let _ = write!(
                out,
                r#"<div class="win" data-endpoint="{ep}" data-window="{window}" data-unit="{unit}"><span>{unit} / {window}</span>{}<span class="usage">{} / {}{reset}</span></div>"#,
                bar(used.unwrap_or(0), limit),
                used.map_or("?".to_owned(), num),
                num(limit),
                ep = esc(endpoint),
                unit = esc(unit),
                window = esc(window),
            );
        }
        if let Some(c) = e["concurrency"].as_object() {
            let limit = c.get("limit").and_then(|l| l.as_u64()).unwrap_or(0);
            let in_use = c.get("in_use").and_then(|l| l.as_u64()).unwrap_or(0);
            let _ = write!(
                out,
                r#"<div class="win" data-endpoint="{}" data-window="concurrency"><span>concurrent</span>{}<span class="usage">{} / {} in use</span></div>"#,
                esc(endpoint),
                bar(in_use, limit),
                num(in_use),
                num(limit)
            );
        }
    }
    Ok(out)
}

/// The account page; `shown` is a message (e.g. a new key, shown once).
async fn account(
    ctx: &Ctx<'_>,
    id: &str,
    q: &Form,
    shown: Option<String>,
    status: StatusCode,
) -> Response<Body> {
    let core = ctx.admin.core();
    let catalog: &dyn Catalog = &*core.catalog;
    let account = match catalog.get_account(id).await {
        Ok(a) => a,
        Err(CatalogError::NotFound { .. }) => {
            return not_found(ctx, &format!("No account `{id}`."));
        }
        Err(e) => return failure(ctx, &ApiError::from(e)),
    };
    let (plans, keys, blocks) = match tokio::try_join!(
        catalog.list_plans(),
        catalog.list_keys(id),
        catalog.list_quota_blocks(id)
    ) {
        Ok(t) => t,
        Err(e) => return failure(ctx, &ApiError::from(e)),
    };
    let limits = limits_html(ctx, id)
        .await
        .unwrap_or_else(|e| format!(r#"<p class="msg err">{}</p>"#, esc(&e.message())));
    let e_id = enc(id);
    let csrf = esc(&ctx.csrf);
    let mut body = format!(r#"<h1 id="account-id">{}</h1>"#, esc(id));
    if let Some(s) = shown {
        body.push_str(&s);
    }
    if let Some(m) = q.get("done").and_then(done_message) {
        let _ = write!(body, r#"<p class="msg" id="done">{m}</p>"#);
    }
    let plan_text = match (&account.plan_id, &account.effective_plan) {
        (Some(p), _) => esc(p),
        (None, Some(p)) => format!("{} (the default plan)", esc(p)),
        (None, None) => "none".to_owned(),
    };
    let _ = write!(
        body,
        r#"<div class="card"><p>Plan: <strong id="plan">{plan_text}</strong>{}</p><div id="limits" data-src="/ui/accounts/{e_id}/limits">{limits}</div></div>"#,
        account
            .billing_anchor
            .map(|a| format!(" · billing month from day {a}"))
            .unwrap_or_default(),
    );
    // Actions.
    let mut plan_options = String::from(r#"<option value="">the default plan</option>"#);
    for p in plans.plans.keys() {
        let sel = if account.plan_id.as_deref() == Some(p.as_str()) {
            " selected"
        } else {
            ""
        };
        let _ = write!(
            plan_options,
            r#"<option value="{0}"{sel}>{0}</option>"#,
            esc(p)
        );
    }
    let mut endpoint_options = String::from(r#"<option value="">every endpoint</option>"#);
    if let Some(p) = account
        .effective_plan
        .as_ref()
        .and_then(|p| plans.plans.get(p))
    {
        for e in p.endpoints.keys() {
            let _ = write!(
                endpoint_options,
                r#"<option value="{0}">{0}</option>"#,
                esc(e)
            );
        }
    }
    let _ = write!(
        body,
        r#"<div class="grid"><div class="card"><h2>Assign plan</h2><form class="row" method="post" action="/ui/accounts/{e_id}/plan" data-confirm="Assign this plan?"><input type="hidden" name="csrf" value="{csrf}"><label>Plan<select name="plan" id="plan-select">{plan_options}</select></label><button id="assign">Assign</button></form></div>
<div class="card"><h2>Grant credits</h2><form class="row" method="post" action="/ui/accounts/{e_id}/credits" data-confirm="Grant these credits?"><input type="hidden" name="csrf" value="{csrf}"><label>Credits<input type="number" name="credits" id="credits" min="1" required></label><label>Expires (UTC)<input type="date" name="expires" id="credits-expires"></label><button id="grant">Grant</button></form></div>
<div class="card"><h2>Reset counters</h2><form class="row" method="post" action="/ui/accounts/{e_id}/reset" data-confirm="Reset the rate-limit windows?"><input type="hidden" name="csrf" value="{csrf}"><label>Endpoint<select name="endpoint">{endpoint_options}</select></label><button class="danger" id="reset">Reset</button></form></div></div>"#
    );
    // Credit blocks.
    body.push_str(r#"<h2>Credit blocks</h2><div class="card">"#);
    if blocks.is_empty() {
        body.push_str(r#"<p class="mut" id="no-blocks">No credit blocks.</p>"#);
    } else {
        body.push_str(r#"<table class="wide" id="blocks"><thead><tr><th>Block</th><th class="n">Granted</th><th class="n">Remaining</th><th>Expires</th><th>Created</th></tr></thead><tbody>"#);
        let now = ms_time(ctx.now_ms);
        for b in &blocks {
            let expired = b.expires_at.is_some_and(|t| t <= now);
            let _ = write!(
                body,
                r#"<tr{}><td data-h="Block">{}</td><td class="n" data-h="Granted">{}</td><td class="n" data-h="Remaining">{}</td><td data-h="Expires">{}{}</td><td data-h="Created">{}</td></tr>"#,
                if expired { r#" class="mut""# } else { "" },
                esc(&b.id),
                num(b.credits_granted),
                num(b.credits_remaining),
                time_text(b.expires_at),
                if expired { " (expired)" } else { "" },
                time_text(b.created_at)
            );
        }
        body.push_str("</tbody></table>");
    }
    body.push_str("</div>");
    // Recent requests (also the keys' last use).
    let recent = recent_requests(catalog, id, ctx.now_ms).await;
    // Keys.
    let _ = write!(
        body,
        r#"<h2>API keys</h2><div class="card"><form class="row" method="post" action="/ui/accounts/{e_id}/keys" data-confirm="Create a new API key?"><input type="hidden" name="csrf" value="{csrf}"><label>Label<input name="label" id="key-label" maxlength="200"></label><label>Expires (UTC)<input type="date" name="expires"></label><button id="create-key">Create key</button></form>"#
    );
    if keys.is_empty() {
        body.push_str(r#"<p class="mut">No keys.</p>"#);
    } else {
        body.push_str(r#"<table class="wide" id="keys"><thead><tr><th>Prefix</th><th>Label</th><th>Created</th><th>Expires</th><th>Last used</th><th></th></tr></thead><tbody>"#);
        for k in &keys {
            let last = recent
                .as_ref()
                .ok()
                .and_then(|r| r.iter().find(|e| e.key_id.as_deref() == Some(&k.id)))
                .map(|e| time_text(Some(e.ended_at)))
                .unwrap_or_else(|| "—".to_owned());
            let action = if k.revoked {
                r#"<span class="pill down">revoked</span>"#.to_owned()
            } else {
                format!(
                    r#"<form class="inline" method="post" action="/ui/accounts/{e_id}/keys/{}/revoke" data-confirm="Revoke this key? Requests with it are refused at once."><input type="hidden" name="csrf" value="{csrf}"><button class="danger revoke" data-key="{}">Revoke</button></form>"#,
                    enc(&k.id),
                    esc(&k.id)
                )
            };
            let _ = write!(
                body,
                r#"<tr data-key="{}"><td data-h="Prefix"><code>{}…</code></td><td data-h="Label">{}</td><td data-h="Created">{}</td><td data-h="Expires">{}</td><td data-h="Last used">{last}</td><td>{action}</td></tr>"#,
                esc(&k.id),
                esc(&k.prefix),
                k.label.as_deref().map(esc).unwrap_or_default(),
                time_text(k.created_at),
                time_text(k.expires_at),
            );
        }
        body.push_str("</tbody></table>");
    }
    body.push_str("</div>");
    // Usage chart.
    let _ = write!(
        body,
        r#"<h2>Usage, last {CHART_DAYS} days</h2><div class="card" id="usage">{}</div>"#,
        usage_charts(ctx, catalog, id).await
    );
    // Recent requests.
    body.push_str(r#"<h2>Recent requests</h2><div class="card">"#);
    match recent {
        Ok(events) if events.is_empty() => {
            body.push_str(r#"<p class="mut">No requests in the last 24 hours.</p>"#)
        }
        Ok(events) => {
            body.push_str(r#"<table class="wide" id="recent"><thead><tr><th>Ended</th><th>Endpoint</th><th class="n">Status</th><th>Units</th><th class="n">Credits</th><th>Request id</th></tr></thead><tbody>"#);
            for e in &events {
                let units: Vec<String> = e
                    .units
                    .iter()
                    .map(|u| format!("{} {}", num(u.measured), esc(&u.unit)))
                    .collect();
                let _ = write!(
                    body,
                    r#"<tr><td data-h="Ended">{}</td><td data-h="Endpoint">{}</td><td class="n" data-h="Status">{}</td><td data-h="Units">{}</td><td class="n" data-h="Credits">{}</td><td data-h="Request id"><code>{}</code></td></tr>"#,
                    time_text(Some(e.ended_at)),
                    esc(&e.endpoint),
                    e.status,
                    units.join(", "),
                    num(e.credits),
                    esc(&e.request_id)
                );
            }
            body.push_str("</tbody></table>");
        }
        Err(e) => {
            let _ = write!(body, r#"<p class="msg err">{}</p>"#, esc(&e.to_string()));
        }
    }
    body.push_str("</div>");
    html(status, layout(ctx, id, "accounts", &body))
}

/// The account's newest requests (of the last 24 h), newest first: the
/// last page of its events since then, read from the last 10 minutes
/// first, so a busy account costs one short range scan.
async fn recent_requests(
    catalog: &dyn Catalog,
    id: &str,
    now_ms: u64,
) -> Result<Vec<crate::catalog::UsageEvent>, CatalogError> {
    const PAGE: usize = 1000;
    for back_ms in [600_000, 86_400_000] {
        let q = UsageQuery {
            account_id: Some(id.to_owned()),
            since: Some(ms_time(now_ms.saturating_sub(back_ms))),
            ..UsageQuery::default()
        };
        let mut events = catalog.usage_events(&q, None, PAGE).await?;
        if !events.is_empty() || back_ms == 86_400_000 {
            events.reverse();
            events.truncate(RECENT);
            return Ok(events);
        }
    }
    Ok(Vec::new())
}

/// Per unit (and requests), a chart of the last 30 days stacked by endpoint.
async fn usage_charts(ctx: &Ctx<'_>, catalog: &dyn Catalog, id: &str) -> String {
    let day_ms = 86_400_000;
    let today = ctx.now_ms / day_ms;
    let first = today + 1 - CHART_DAYS;
    let base = UsageQuery {
        account_id: Some(id.to_owned()),
        since: Some(ms_time(first * day_ms)),
        until: Some(ms_time((today + 1) * day_ms)),
        endpoint: None,
    };
    let endpoints = match catalog.usage_summary(&base, GroupBy::Endpoint).await {
        Ok(b) => b,
        Err(e) => return format!(r#"<p class="mut">{}</p>"#, esc(&e.to_string())),
    };
    let names: Vec<String> = endpoints
        .iter()
        .filter_map(|b| match &b.key {
            BucketKey::Endpoint(e) => Some(e.clone()),
            _ => None,
        })
        .take(8)
        .collect();
    if names.is_empty() {
        return r#"<p class="mut">No usage in the last 30 days.</p>"#.to_owned();
    }
    // unit → day → endpoint index → amount; "requests" first.
    let mut units: BTreeMap<String, Vec<Vec<u64>>> = BTreeMap::new();
    let blank = || vec![vec![0u64; names.len()]; CHART_DAYS as usize];
    units.insert("requests".into(), blank());
    for (i, name) in names.iter().enumerate() {
        let q = UsageQuery {
            endpoint: Some(name.clone()),
            ..base.clone()
        };
        let buckets = match catalog.usage_summary(&q, GroupBy::Day).await {
            Ok(b) => b,
            Err(e) => return format!(r#"<p class="mut">{}</p>"#, esc(&e.to_string())),
        };
        for b in buckets {
            let BucketKey::Start(t) = b.key else { continue };
            let day = crate::catalog::usage::epoch_ms_ceil(t) / day_ms;
            let Some(d) = day.checked_sub(first).filter(|d| *d < CHART_DAYS) else {
                continue;
            };
            if let Some(r) = units.get_mut("requests") {
                r[d as usize][i] += b.requests;
            }
            for (unit, amount) in b.units {
                units.entry(unit).or_insert_with(blank)[d as usize][i] += amount;
            }
        }
    }
    let mut out = String::new();
    // Requests first, then the units by name.
    let mut order: Vec<(&String, &Vec<Vec<u64>>)> = units.iter().collect();
    order.sort_by_key(|(u, _)| *u != "requests");
    for (unit, days) in order {
        let columns: Vec<(String, Vec<u64>)> = days
            .iter()
            .enumerate()
            .map(|(d, v)| {
                let t = ms_time((first + d as u64) * day_ms);
                (
                    humantime::format_rfc3339_seconds(t).to_string()[..10].to_owned(),
                    v.clone(),
                )
            })
            .collect();
        let _ = write!(
            out,
            r#"<h3>{}</h3>{}"#,
            esc(unit),
            stacked_chart(&columns, &names, 7)
        );
    }
    out
}

fn done_message(code: &str) -> Option<&'static str> {
    Some(match code {
        "plan" => "Plan assigned.",
        "credits" => "Credits granted.",
        "revoked" => "Key revoked.",
        "reset" => "Rate-limit windows reset.",
        _ => return None,
    })
}

// ---------------------------------------------------------------- actions

/// A date (`2027-02-01`, midnight UTC) or an RFC 3339 time.
fn parse_expiry(s: Option<&str>) -> Result<Option<SystemTime>, ApiError> {
    let Some(s) = s else { return Ok(None) };
    let full = if s.len() == 10 {
        format!("{s}T00:00:00Z")
    } else {
        s.to_owned()
    };
    humantime::parse_rfc3339_weak(&full)
        .map(Some)
        .map_err(|_| ApiError::invalid_request(format!("`{s}` is not a date (YYYY-MM-DD)")))
}

/// A POST action (the CSRF token already checked).
pub(crate) async fn post(ctx: &Ctx<'_>, segs: &[&str], form: &Form) -> Response<Body> {
    let result = match segs {
        ["plans"] => return apply_plans(ctx, form).await,
        ["accounts", id, action] => act(ctx, id, action, form).await,
        ["accounts", id, "keys", key_id, "revoke"] => {
            let catalog = &ctx.admin.core().catalog;
            // Only a key of this account is revoked from its page.
            match catalog.list_keys(id).await {
                Ok(keys) if keys.iter().any(|k| k.id == *key_id) => {
                    match catalog.revoke_key(key_id).await {
                        Ok(()) => {
                            tracing::warn!(target: "plangate::console", account = %id, key = %key_id, by = "console", "console: key revoked");
                            Ok(Done::Redirect("revoked"))
                        }
                        Err(e) => Err(ApiError::from(e)),
                    }
                }
                Ok(_) => Err(ApiError::NotFound {
                    message: format!("the account has no key `{key_id}`"),
                }),
                Err(e) => Err(ApiError::from(e)),
            }
            .map(|d| (id.to_string(), d))
        }
        _ => {
            return not_found(ctx, "No such console action.");
        }
    };
    match result {
        Ok((id, Done::Redirect(code))) => {
            see_other(&format!("/ui/accounts/{}?done={code}", enc(&id)))
        }
        Ok((id, Done::Show(msg))) => {
            account(ctx, &id, &Form::default(), Some(msg), StatusCode::CREATED).await
        }
        Err(e) => match segs {
            ["accounts", id, ..] => {
                let msg = format!(r#"<p class="msg err" id="error">{}</p>"#, esc(&e.message()));
                account(ctx, id, &Form::default(), Some(msg), e.status()).await
            }
            _ => failure(ctx, &e),
        },
    }
}

enum Done {
    /// Redirect to the account page with this message code.
    Redirect(&'static str),
    /// Show the account page with this HTML (a new key, shown once).
    Show(String),
}

async fn act(
    ctx: &Ctx<'_>,
    id: &str,
    action: &str,
    form: &Form,
) -> Result<(String, Done), ApiError> {
    let core = ctx.admin.core();
    let catalog = &core.catalog;
    let done = match action {
        "plan" => {
            let plan = form.get("plan");
            catalog.assign_plan(id, plan).await?;
            core.cache.invalidate(&Invalidation::Account(id.to_owned()));
            tracing::warn!(target: "plangate::console", account = %id, plan = plan.unwrap_or("(default)"), by = "console", "console: plan assigned");
            Done::Redirect("plan")
        }
        "credits" => {
            let credits: u64 = form
                .get("credits")
                .and_then(|c| c.parse().ok())
                .filter(|c| *c > 0)
                .ok_or_else(|| ApiError::invalid_request("credits: a whole number above 0"))?;
            if credits > crate::plans::MAX_AMOUNT {
                return Err(ApiError::invalid_request(format!(
                    "credits: {credits} is more than the largest grant, {}",
                    crate::plans::MAX_AMOUNT
                )));
            }
            let expires_at = parse_expiry(form.get("expires"))?;
            let block = catalog
                .create_quota_block(
                    id,
                    credits,
                    expires_at,
                    serde_json::json!({"granted_by": "console"}),
                )
                .await?;
            ctx.admin.reload_wallet(id).await;
            tracing::warn!(target: "plangate::console", account = %id, block = %block.id, credits, by = "console", "console: credits granted");
            Done::Redirect("credits")
        }
        "keys" => {
            let opts = KeyOptions {
                label: form.get("label").map(str::to_owned),
                expires_at: parse_expiry(form.get("expires"))?,
                plan: None,
            };
            let key = catalog.create_key_with(id, &opts).await?;
            tracing::warn!(target: "plangate::console", account = %id, key = %key.id, prefix = %key.prefix, by = "console", "console: key created");
            Done::Show(format!(
                r#"<div class="msg" id="new-key-box"><p>New key <code>{}</code> — copy it now, it is shown only once:</p><code class="key" id="new-key">{}</code></div>"#,
                esc(&key.id),
                esc(&key.key)
            ))
        }
        "reset" => {
            let endpoint = form.get("endpoint");
            let reset = crate::proxy::reset_limits(core, id, endpoint).await?;
            tracing::warn!(target: "plangate::console", account = %id, endpoint = endpoint.unwrap_or("*"), endpoints = ?reset, by = "console", "console: rate-limit windows reset");
            Done::Redirect("reset")
        }
        _ => {
            return Err(ApiError::NotFound {
                message: format!("no console action `{action}`"),
            })
        }
    };
    Ok((id.to_owned(), done))
}

// ---------------------------------------------------------------- plans

/// Each error of a refused plans edit under the line it names, with two
/// lines of context.
fn error_listing(text: &str, errors: &crate::config::ConfigErrors) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = format!(
        r#"<div class="msg err" id="plan-errors"><p>The plans were not applied: {} error(s).</p>"#,
        errors.0.len()
    );
    for e in &errors.0 {
        let _ = write!(
            out,
            r#"<p class="plan-error" data-line="{}"><strong>{}</strong></p>"#,
            e.line.unwrap_or(0),
            esc(&e.to_string())
        );
        let Some(line) = e.line.filter(|l| *l >= 1 && *l <= lines.len()) else {
            continue;
        };
        out.push_str(r#"<pre class="listing">"#);
        for n in line.saturating_sub(2).max(1)..=(line + 2).min(lines.len()) {
            let mark = if n == line { "▶" } else { " " };
            let _ = writeln!(out, "{mark}{n:>5} │ {}", esc(lines[n - 1]));
            if n == line {
                let col = e.column.unwrap_or(1).max(1);
                let _ = writeln!(out, "       │ {}^", " ".repeat(col - 1));
            }
        }
        out.push_str("</pre>");
    }
    out.push_str("</div>");
    out
}

/// Check and apply an edited plans document (database-owned plans only).
async fn apply_plans(ctx: &Ctx<'_>, form: &Form) -> Response<Body> {
    if let Some(why) = ctx.admin.plan_writes_refused() {
        return failure(
            ctx,
            &ApiError::Conflict {
                message: why.to_owned(),
            },
        );
    }
    let text = form.get("plans").unwrap_or("").to_owned();
    let units = ctx.admin.units();
    let checked = {
        let text = text.clone();
        tokio::task::spawn_blocking(move || {
            crate::plans::parse::parse_plans_for(&text, "plans", &units)
        })
        .await
    };
    let plans = match checked {
        Ok(Ok(plans)) => plans,
        Ok(Err(errors)) => {
            let mut resp = plans_page(ctx, &Form::default(), Some((&text, &errors))).await;
            *resp.status_mut() = StatusCode::BAD_REQUEST;
            return resp;
        }
        Err(_) => return failure(ctx, &ApiError::Internal),
    };
    let core = ctx.admin.core();
    match core.catalog.apply_plans(&plans, false).await {
        Ok(report) => {
            core.cache.invalidate(&Invalidation::All);
            tracing::warn!(target: "plangate::console", upserted = ?report.upserted, default_plan = ?report.default_plan, by = "console", "console: plans applied");
            see_other("/ui/plans?done=plans")
        }
        Err(e) => failure(ctx, &ApiError::from(e)),
    }
}

/// The plans page; `edit` is a refused edit to show again: its text and
/// the errors (with their lines).
async fn plans_page(
    ctx: &Ctx<'_>,
    q: &Form,
    edit: Option<(&str, &crate::config::ConfigErrors)>,
) -> Response<Body> {
    let catalog: &dyn Catalog = &*ctx.admin.core().catalog;
    let set = match catalog.list_plans().await {
        Ok(s) => s,
        Err(e) => return failure(ctx, &ApiError::from(e)),
    };
    let mut body = String::from("<h1>Plans</h1>");
    if q.get("done") == Some("plans") {
        body.push_str(r#"<p class="msg" id="done">Plans applied.</p>"#);
    }
    if let Some(why) = ctx.admin.plan_writes_refused() {
        let _ = write!(body, r#"<p class="mut">{}</p>"#, esc(why));
    } else {
        // Database-owned plans: edited here, checked as `PUT /admin/plans`
        // checks them; a refusal shows each error at its line.
        let text = match edit {
            Some((text, _)) => text.to_owned(),
            None => serde_json::to_string_pretty(&crate::plans::parse::plans_to_json(&set))
                .unwrap_or_default(),
        };
        if let Some((text, errors)) = edit {
            body.push_str(&error_listing(text, errors));
        }
        let _ = write!(
            body,
            r#"<details class="card"{}><summary>Edit plans (YAML or JSON; plans left out are kept)</summary><form method="post" action="/ui/plans" data-confirm="Apply these plans to every gateway?"><input type="hidden" name="csrf" value="{}"><textarea name="plans" id="plans-text" rows="24" spellcheck="false">{}</textarea><p><button id="apply-plans">Apply</button></p></form></details>"#,
            if edit.is_some() { " open" } else { "" },
            esc(&ctx.csrf),
            esc(&text)
        );
    }
    for (id, plan) in &set.plans {
        let default = set.default_plan.as_deref() == Some(id.as_str());
        // Who is on it: the first accounts (the default plan's explicit
        // and implicit members alike), one page.
        let users = catalog
            .list_accounts(Some(id), None, 11)
            .await
            .unwrap_or_default();
        let _ = write!(
            body,
            r#"<div class="card plan" id="plan-{}"><h2>{}{}{}</h2>"#,
            esc(id),
            esc(id),
            if plan.name != *id {
                format!(r#" <span class="mut">{}</span>"#, esc(&plan.name))
            } else {
                String::new()
            },
            if default {
                r#" <span class="pill up">default</span>"#
            } else {
                ""
            }
        );
        body.push_str(r#"<table class="wide"><thead><tr><th>Endpoint</th><th>Windows</th><th>Concurrency</th><th>Credits</th></tr></thead><tbody>"#);
        for (endpoint, p) in &plan.endpoints {
            let windows: Vec<String> = p
                .windows
                .iter()
                .map(|w| format!("{} {} / {}", num(w.limit), esc(w.unit.as_str()), w.len))
                .collect();
            let credits = p
                .credits
                .as_ref()
                .map(|c| {
                    let mut parts = Vec::new();
                    if c.min_balance > 0 {
                        parts.push(format!("balance ≥ {}", num(c.min_balance)));
                    }
                    if c.per_request > 0 {
                        parts.push(format!("{} per request", num(c.per_request)));
                    }
                    for (unit, pu) in &c.per_unit {
                        parts.push(format!(
                            "{} per {} {}",
                            num(pu.credits),
                            num(pu.per),
                            unit.as_str()
                        ));
                    }
                    parts.join(" · ")
                })
                .unwrap_or_else(|| "—".to_owned());
            let _ = write!(
                body,
                r#"<tr><td data-h="Endpoint">{}</td><td data-h="Windows">{}{}</td><td data-h="Concurrency">{}</td><td data-h="Credits"><small>{}</small></td></tr>"#,
                esc(endpoint),
                windows.join("<br>"),
                if p.enforce {
                    ""
                } else {
                    " <span class=\"pill\">shadow</span>"
                },
                if p.max_concurrent > 0 {
                    p.max_concurrent.to_string()
                } else {
                    "—".to_owned()
                },
                esc(&credits)
            );
        }
        body.push_str("</tbody></table><p>Accounts: ");
        if users.is_empty() {
            body.push_str(r#"<span class="mut">none</span>"#);
        }
        for (i, a) in users.iter().take(10).enumerate() {
            let _ = write!(
                body,
                r#"{}<a href="/ui/accounts/{}">{}</a>"#,
                if i > 0 { ", " } else { "" },
                enc(&a.id),
                esc(&a.id)
            );
        }
        if users.len() > 10 {
            body.push_str(" …");
        }
        body.push_str("</p></div>");
    }
    html(StatusCode::OK, layout(ctx, "Plans", "plans", &body))
}
