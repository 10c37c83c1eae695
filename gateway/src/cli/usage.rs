//! `plangate usage export`: usage events from Postgres to stdout, as JSON
//! lines or CSV, oldest first. It pages through
//! [`Catalog::usage_events`] (keyset pages, [`DEFAULT_PAGE`] events each)
//! and writes each page as it arrives, so memory stays at one page however
//! many events there are.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use super::admin::{catalog_err, postgres_url, DbTarget};
use super::CliError;
use crate::catalog::postgres::{PgOptions, PostgresCatalog};
use crate::catalog::usage::parse_time;
use crate::catalog::{Catalog, UsageCursor, UsageEvent, UsageQuery};
use crate::clock::SystemClock;

/// Events per page of an export.
pub const DEFAULT_PAGE: usize = 5_000;
/// The largest `--page-size`.
pub const MAX_PAGE: usize = 100_000;

/// Output formats of `usage export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON object per line, the fields of a usage event.
    Jsonl,
    /// RFC 4180 CSV with a header line; units as `unit=n;unit=n`.
    Csv,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum UsageCmd {
    /// Write usage events to stdout, oldest first (by end time), streaming.
    Export {
        /// Only this account's events (default: every account).
        #[arg(long)]
        account: Option<String>,
        /// Only events that ended at or after this time (RFC 3339 in UTC,
        /// e.g. 2027-01-01T00:00:00Z, or a date).
        #[arg(long)]
        since: Option<String>,
        /// Only events that ended before this time (RFC 3339 or a date).
        #[arg(long)]
        until: Option<String>,
        /// Only this endpoint's events.
        #[arg(long)]
        endpoint: Option<String>,
        #[arg(long, value_enum, default_value_t = Format::Jsonl)]
        format: Format,
        /// Events fetched per database round trip.
        #[arg(long, default_value_t = DEFAULT_PAGE)]
        page_size: usize,
    },
}

/// Run a `usage` command against the catalog `target` names.
pub async fn run(target: &DbTarget, cmd: UsageCmd) -> Result<(), CliError> {
    let UsageCmd::Export {
        account,
        since,
        until,
        endpoint,
        format,
        page_size,
    } = cmd;
    if !(1..=MAX_PAGE).contains(&page_size) {
        return Err(CliError::BadInput(format!(
            "--page-size {page_size}: must be from 1 to {MAX_PAGE}"
        )));
    }
    let time = |flag: &str, v: Option<String>| {
        v.map(|s| parse_time(&s).map_err(|e| CliError::BadInput(format!("--{flag}: {e}"))))
            .transpose()
    };
    let q = UsageQuery {
        account_id: account,
        since: time("since", since)?,
        until: time("until", until)?,
        endpoint,
    };
    let url = postgres_url(target)?;
    let catalog = PostgresCatalog::connect_with(
        &url,
        Arc::new(SystemClock),
        PgOptions {
            pool_size: 1,
            listen: false,
            lazy: false,
            timeout: Duration::from_secs(5),
        },
    )
    .await
    .map_err(catalog_err)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, stdout.lock());
    let written = export(&catalog, &q, format, page_size, &mut out).await?;
    eprintln!("exported {written} usage event(s)");
    Ok(())
}

/// Write every event matching `q` to `out`, page by page (each page
/// flushed once written). Returns how many were written. A reader that
/// goes away (`| head`) ends the export quietly.
pub async fn export(
    catalog: &dyn Catalog,
    q: &UsageQuery,
    format: Format,
    page_size: usize,
    out: &mut impl Write,
) -> Result<u64, CliError> {
    let io = |e: std::io::Error| CliError::Failure(format!("writing the export: {e}"));
    let mut written = 0u64;
    let mut line = Vec::with_capacity(512);
    if format == Format::Csv {
        match out.write_all(CSV_HEADER.as_bytes()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(0),
            r => r.map_err(io)?,
        }
    }
    let mut cursor: Option<UsageCursor> = None;
    loop {
        let page = catalog
            .usage_events(q, cursor.as_ref(), page_size)
            .await
            .map_err(catalog_err)?;
        let Some(last) = page.last() else { break };
        cursor = Some(UsageCursor::after(last));
        let full = page.len() == page_size;
        let result = (|| {
            for e in &page {
                line.clear();
                match format {
                    Format::Jsonl => {
                        serde_json::to_writer(&mut line, e).map_err(std::io::Error::other)?;
                        line.push(b'\n');
                    }
                    Format::Csv => csv_line(&mut line, e),
                }
                out.write_all(&line)?;
                written += 1;
            }
            out.flush()
        })();
        match result {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(written),
            r => r.map_err(io)?,
        }
        if !full {
            break;
        }
    }
    match out.flush() {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(written),
        r => r.map(|()| written).map_err(io),
    }
}

/// The CSV columns.
pub const CSV_HEADER: &str = "request_id,account_id,key_id,endpoint,route,status,credits,\
degraded,streamed,cut_short,started_at,ended_at,units_measured,units_reserved\r\n";

/// A field, quoted (RFC 4180) when it holds a separator, a quote, a line
/// break or surrounding spaces.
fn csv_field(out: &mut Vec<u8>, s: &str) {
    let quote = s.contains([',', '"', '\n', '\r']) || s.starts_with(' ') || s.ends_with(' ');
    if quote {
        out.push(b'"');
        for b in s.bytes() {
            if b == b'"' {
                out.push(b'"');
            }
            out.push(b);
        }
        out.push(b'"');
    } else {
        out.extend_from_slice(s.as_bytes());
    }
}

fn csv_line(out: &mut Vec<u8>, e: &UsageEvent) {
    let time = |t| humantime::format_rfc3339_millis(t).to_string();
    let units = |f: fn(&crate::catalog::UnitUsage) -> u64| {
        e.units
            .iter()
            .map(|u| format!("{}={}", u.unit, f(u)))
            .collect::<Vec<_>>()
            .join(";")
    };
    let fields: [&str; 5] = [
        &e.request_id,
        &e.account_id,
        e.key_id.as_deref().unwrap_or(""),
        &e.endpoint,
        &e.route,
    ];
    for f in fields {
        csv_field(out, f);
        out.push(b',');
    }
    let rest = [
        e.status.to_string(),
        e.credits.to_string(),
        e.degraded.to_string(),
        e.streamed.to_string(),
        e.cut_short.to_string(),
        time(e.started_at),
        time(e.ended_at),
        units(|u| u.measured),
        units(|u| u.reserved),
    ];
    for (i, f) in rest.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        csv_field(out, f);
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::usage::from_ms;
    use crate::catalog::UnitUsage;

    #[test]
    fn csv_quotes_what_needs_quoting() {
        let e = UsageEvent {
            request_id: "req_1".into(),
            account_id: "acme, inc".into(),
            key_id: None,
            endpoint: "say \"hi\"".into(),
            route: "/v1/*".into(),
            units: vec![
                UnitUsage {
                    unit: "image".into(),
                    measured: 2,
                    reserved: 2,
                },
                UnitUsage {
                    unit: "token".into(),
                    measured: 120,
                    reserved: 0,
                },
            ],
            credits: 5,
            status: 200,
            degraded: false,
            streamed: true,
            cut_short: false,
            started_at: from_ms(1_799_920_818_000),
            ended_at: from_ms(1_799_920_820_123),
            charge: None,
        };
        let mut out = Vec::new();
        csv_line(&mut out, &e);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "req_1,\"acme, inc\",,\"say \"\"hi\"\"\",/v1/*,200,5,false,true,false,\
             2027-01-14T10:00:18.000Z,2027-01-14T10:00:20.123Z,image=2;token=120,image=2;token=0\r\n"
        );
    }
}
