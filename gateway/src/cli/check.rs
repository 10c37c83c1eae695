//! `plangate check-config`: validate the config file and the plans file it
//! names, offline, and report every problem of both in one run, including
//! plan units that no route measures or reserves.

use std::collections::BTreeSet;
use std::path::Path;

use super::CliError;
use crate::config::{self, Config, ConfigError, EndpointSource};
use crate::health::probe_stores;
use crate::plans::parse::{load_plans_file, load_plans_file_for};
use crate::plans::PlanSet;

/// Validate the config file and the plans file it names; on failure the
/// error lists every problem, one per line, with file:line. On success,
/// returns a one-paragraph summary of what was loaded.
pub fn run(config: &Path) -> Result<String, CliError> {
    let mut errors: Vec<ConfigError> = Vec::new();
    let loaded = match Config::load(config) {
        Ok(c) => Some(c),
        Err(e) => {
            errors.extend(e.0);
            None
        }
    };
    let plans_path = match &loaded {
        Some(c) => c.plans.file.clone(),
        None => config::plans_file_hint(config),
    };
    // `[plans] source = "database"` without a file: no plans to check.
    let no_file = loaded.as_ref().is_some_and(|c| c.plans.file.is_none());
    // With the config loaded, plans may name only units its routes measure
    // or reserve; without it, the plans file is checked on its own.
    let known = loaded.as_ref().map(Config::known_units);
    let plans = plans_path.and_then(|p| {
        let result = match &known {
            Some(known) => load_plans_file_for(&p, known),
            None => load_plans_file(&p),
        };
        match result {
            Ok(set) => Some(set),
            Err(e) => {
                errors.extend(e.0);
                None
            }
        }
    });
    if let Some(c) = &loaded {
        errors.extend(missing_files(c));
    }
    match (loaded, plans) {
        (Some(c), Some(plans)) if errors.is_empty() => Ok(summary(&c, &plans)),
        (Some(c), None) if errors.is_empty() && no_file => Ok(summary(&c, &PlanSet::default())),
        _ => {
            let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
            Err(CliError::BadInput(lines.join("\n")))
        }
    }
}

/// `check-config --connect`, after the offline checks passed: connect to
/// every store the config names, each on a connection of its own, and
/// print one line per store. A store that fails is an error (exit 1) that
/// names it, its URL (password masked) and why.
pub async fn connect(config: &Path) -> Result<(), CliError> {
    let c = Config::load(config).map_err(|e| CliError::BadInput(e.to_string()))?;
    let results = probe_stores(&c.storage).await;
    if results.is_empty() {
        println!("no external stores: in-process catalog and counters");
        return Ok(());
    }
    let mut failed = Vec::new();
    for (target, result) in results {
        match result {
            Ok(what) => println!("{target}: {what}"),
            Err(why) => failed.push(format!("{target}: {why}")),
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(CliError::Failure(failed.join("\n")))
    }
}

/// Files the config names besides the plans file must exist: a server that
/// would fail at start-up should fail the check too.
fn missing_files(c: &Config) -> Vec<ConfigError> {
    let mut files = Vec::new();
    if let Some(tls) = &c.server.tls {
        files.push(("server.tls_cert".to_string(), tls.cert.clone()));
        files.push(("server.tls_key".to_string(), tls.key.clone()));
    }
    for (i, u) in c.upstreams.iter().enumerate() {
        if let Some(ca) = &u.ca_file {
            files.push((format!("upstreams[{i}].ca_file"), ca.clone()));
        }
    }
    files
        .into_iter()
        .filter_map(|(key, path)| {
            std::fs::metadata(&path).err().map(|e| ConfigError {
                file: c.path.display().to_string(),
                line: None,
                column: None,
                key,
                message: format!("cannot read `{}`: {e}", path.display()),
            })
        })
        .collect()
}

fn count(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

fn summary(c: &Config, plans: &PlanSet) -> String {
    let storage = match (&c.storage.postgres_url, &c.storage.redis_url) {
        _ if !c.storage.redis_cluster.is_empty() && c.storage.postgres_url.is_some() => {
            "Postgres catalog, Redis Cluster counters"
        }
        _ if !c.storage.redis_cluster.is_empty() => "in-process catalog, Redis Cluster counters",
        (Some(_), Some(_)) => "Postgres catalog, Redis counters",
        (Some(_), None) => "Postgres catalog, in-process counters",
        (None, Some(_)) => "in-process catalog, Redis counters",
        (None, None) => "in-process catalog and counters",
    };
    let default = match &plans.default_plan {
        Some(d) => format!(" (default {d})"),
        None => String::new(),
    };
    let endpoints: BTreeSet<&str> = plans
        .plans
        .values()
        .flat_map(|p| p.endpoints.keys().map(String::as_str))
        .collect();
    let mut out = format!(
        "ok: {}: {}, {}; {}: {}{}, {}; {}.",
        c.path.display(),
        count(c.upstreams.len(), "upstream"),
        count(c.routes.len(), "route"),
        c.plans.file.as_ref().map_or_else(
            || "no plans file (the database owns the plans)".into(),
            |f| f.display().to_string()
        ),
        count(plans.plans.len(), "plan"),
        default,
        count(endpoints.len(), "endpoint"),
        storage,
    );
    // Routes with a literal endpoint that no plan grants would answer 403
    // to everyone; that is legal (plans change at run time) but worth a note.
    for (i, r) in c.routes.iter().enumerate() {
        if let EndpointSource::Literal(e) = &r.endpoint {
            if !endpoints.contains(e.as_str()) {
                out.push_str(&format!(
                    " Note: routes[{i}] serves endpoint `{e}`, which no plan grants."
                ));
            }
        }
    }
    out
}
