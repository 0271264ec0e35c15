//! `custody replay SESSION`: a recorded session as it happened — each statement, its
//! parameters, its result summary and the rows that were recorded — with the time since the
//! session began, as the proxy saw it.
//!
//! `--speed X` waits between events X times faster than they happened (1: real time);
//! `--follow` keeps reading a live session until it ends; `--format json` prints one JSON
//! object per event (the `events` row, plus `t` in seconds since the first event).

use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::query::fetch;

/// How `custody replay` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReplayFormat {
    /// A readable transcript.
    Text,
    /// One JSON object per event.
    Json,
}

/// Options of `custody replay`.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// The session id.
    pub session: String,
    /// Output.
    pub format: ReplayFormat,
    /// Playback speed (None: print at once).
    pub speed: Option<f64>,
    /// Tail a live session until its `session_end`.
    pub follow: bool,
    /// Most rows of each result to print in text (the rest are counted).
    pub max_rows: usize,
}

/// The events of `session` from index `from` on, as JSON rows in index order.
async fn session_events(url: &str, session: &str, from: u64) -> anyhow::Result<Vec<Value>> {
    let batches = fetch(url, &json!({"table": "events", "session_id": session, "from_index": from})).await?;
    let mut buf = Vec::new();
    {
        let mut w = arrow::json::LineDelimitedWriter::new(&mut buf);
        for b in &batches {
            w.write(b)?;
        }
        w.finish()?;
    }
    String::from_utf8(buf)?
        .lines()
        .map(|l| serde_json::from_str(l).context("the ledger's events row is not JSON"))
        .collect()
}

/// Nanoseconds of a timestamp column as the Arrow JSON writer prints it.
fn time_ns(v: &Value) -> Option<i64> {
    let s = v.as_str()?;
    chrono::DateTime::parse_from_rfc3339(s)
        .or_else(|_| chrono::DateTime::parse_from_rfc3339(&format!("{s}Z")))
        .ok()
        .and_then(|t| t.timestamp_nanos_opt())
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or("")
}

/// One event as transcript lines (without the time prefix).
pub fn render(ev: &Value, max_rows: usize) -> Vec<String> {
    let mut out = Vec::new();
    if ev["pruned"] == true {
        out.push(format!("{}: payload pruned from the ledger after export (retention); it is in the export", s(ev, "kind").replace('_', " ")));
        return out;
    }
    match s(ev, "kind") {
        "session_start" => {
            let who = if s(ev, "email").is_empty() { s(ev, "subject") } else { s(ev, "email") };
            let mut line = format!("session start: {who} -> {} (database {}", s(ev, "resource"), s(ev, "database"));
            if !s(ev, "application_name").is_empty() {
                line.push_str(&format!(", application {}", s(ev, "application_name")));
            }
            if !s(ev, "agent").is_empty() {
                line.push_str(&format!(", agent {}", s(ev, "agent")));
            }
            line.push_str(&format!(") from {}", s(ev, "client_addr")));
            out.push(line);
        }
        "request" => {
            let msg = s(ev, "message");
            let sql = s(ev, "sql");
            let mut line = match msg {
                "Query" => format!("> {sql}"),
                "Parse" => format!("> prepare {}: {sql}", name_or_unnamed(s(ev, "statement_name"))),
                "Bind" => format!("> bind {} to {}", name_or_unnamed(s(ev, "statement_name")), name_or_unnamed(s(ev, "portal"))),
                "Execute" => format!("> execute {}", name_or_unnamed(s(ev, "portal"))),
                other if sql.is_empty() => format!("> {other}"),
                other => format!("> {other}: {sql}"),
            };
            if let Some(params) = ev["params"].as_array().filter(|p| !p.is_empty()) {
                let p: Vec<String> = params.iter().map(|v| if v.is_null() { "NULL".into() } else { v.as_str().unwrap_or_default().to_string() }).collect();
                line.push_str(&format!("  [params: {}]", p.join(", ")));
            }
            out.push(line);
        }
        "response" => {
            let outcome = s(ev, "outcome");
            let mut line = if outcome == "error" {
                format!("< ERROR {}: {}", s(ev, "error_sqlstate"), s(ev, "error_message"))
            } else if !s(ev, "command_tag").is_empty() {
                format!("< {}", s(ev, "command_tag"))
            } else {
                format!("< {outcome}")
            };
            let rows = ev["rows"].as_u64().unwrap_or(0);
            if rows > 0 || ev["columns"].as_array().is_some_and(|c| !c.is_empty()) {
                line.push_str(&format!("  ({rows} row{}, {} bytes)", if rows == 1 { "" } else { "s" }, ev["bytes"].as_u64().unwrap_or(0)));
            }
            out.push(line);
            let columns: Vec<String> = ev["columns"].as_array().into_iter().flatten().filter_map(|c| c.as_str().map(str::to_string)).collect();
            let recorded: Vec<Vec<Value>> = ev["recorded_rows"].as_str().and_then(|j| serde_json::from_str(j).ok()).unwrap_or_default();
            if !columns.is_empty() && !recorded.is_empty() {
                out.push(format!("    {}", columns.join(" | ")));
                for r in recorded.iter().take(max_rows) {
                    let cells: Vec<String> = r.iter().map(|c| if c.is_null() { "NULL".into() } else { c.as_str().unwrap_or_default().to_string() }).collect();
                    out.push(format!("    {}", cells.join(" | ")));
                }
                let more = recorded.len().saturating_sub(max_rows) as u64 + ev["rows_truncated"].as_u64().unwrap_or(0);
                if more > 0 {
                    out.push(format!("    … {more} more row{} not shown{}", if more == 1 { "" } else { "s" }, if ev["rows_truncated"].as_u64().unwrap_or(0) > 0 { " (some not recorded: over the recorder's limit)" } else { "" }));
                }
            }
        }
        "denied" => out.push(format!("DENIED {}", s(ev, "reason"))),
        "session_end" => out.push(format!("session end: {}", s(ev, "reason"))),
        other => out.push(other.to_string()),
    }
    out
}

fn name_or_unnamed(n: &str) -> &str {
    if n.is_empty() {
        "(unnamed)"
    } else {
        n
    }
}

/// `custody replay`.
pub async fn replay(url: &str, o: &ReplayOptions) -> anyhow::Result<()> {
    let mut next = 0u64;
    let mut start: Option<i64> = None;
    let mut last: Option<i64> = None;
    let mut printed = 0u64;
    let stdout = std::io::stdout();
    if o.follow {
        // Tailing waits for new events, not for a session that was never recorded.
        let known = fetch(url, &json!({"table": "sessions", "session_id": o.session})).await?.iter().map(|b| b.num_rows()).sum::<usize>();
        if known == 0 {
            bail!("no session {:?} is recorded (see `custody sessions` for ids)", o.session);
        }
    }
    loop {
        let events = session_events(url, &o.session, next).await?;
        let mut ended = false;
        for ev in &events {
            next = ev["index"].as_u64().map_or(next, |i| i + 1);
            let t = time_ns(&ev["proxy_time"]).or_else(|| time_ns(&ev["commit_time"])).unwrap_or(0);
            let t0 = *start.get_or_insert(t);
            if let (Some(speed), Some(prev)) = (o.speed, last) {
                let wait = (t - prev).max(0) as f64 / 1e9 / speed.max(1e-3);
                if wait > 0.0 {
                    tokio::time::sleep(Duration::from_secs_f64(wait.min(3600.0))).await;
                }
            }
            last = Some(t);
            let rel = (t - t0) as f64 / 1e9;
            let mut out = stdout.lock();
            match o.format {
                ReplayFormat::Json => {
                    let mut row = ev.clone();
                    row["t"] = json!((rel * 1e6).round() / 1e6);
                    writeln!(out, "{row}")?;
                }
                ReplayFormat::Text => {
                    for (i, line) in render(ev, o.max_rows).into_iter().enumerate() {
                        if i == 0 {
                            writeln!(out, "{:>+10.3}s  {line}", rel)?;
                        } else {
                            writeln!(out, "{:>12} {line}", "")?;
                        }
                    }
                }
            }
            out.flush()?;
            printed += 1;
            ended |= s(ev, "kind") == "session_end";
        }
        if !o.follow || ended {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if printed == 0 {
        bail!("no events recorded for session {:?} (see `custody sessions` for ids)", o.session);
    }
    Ok(())
}
