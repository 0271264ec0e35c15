//! `custody-bench flight`: the same N audit events pulled two ways, side by side in one run:
//! - over Arrow Flight SQL from a custody ledger (`SELECT <columns> FROM events`);
//! - with `COPY (SELECT <columns> FROM audit_log) TO STDOUT` from a PostgreSQL table holding
//!   the same rows, which is how a Postgres-backed gateway keeps its audit log;
//!
//! and the latency of a selective query, one session out of N, both ways (Flight SQL with
//! the ledger's session index; PostgreSQL with a b-tree index on `session_id`, timed by
//! pgbench over one connection).
//!
//! The events are synthetic but shaped like pgbench's through custody: sessions of
//! `--session-events` events, alternating an `Execute` request (SQL and one parameter) and its
//! response (command tag, one recorded row). PostgreSQL's table is loaded from the rows the
//! ledger serves, so both sides hold the same values.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{TimestampNanosecondType, UInt64Type};
use arrow_flight::sql::client::FlightSqlServiceClient;
use bytes::Bytes;
use custody_e2e::{Ledger, Postgres};
use custody_proto::pb::ledger::ledger_client::LedgerClient;
use custody_proto::pb::ledger::AppendRequest;
use custody_proto::pb::v1::{event, Cell, Column, Identity, Outcome, Param, PgRequest, PgResponse, Row};
use custody_proto::{Event, EventKind};
use futures::TryStreamExt;
use prost::Message;

/// Arguments of `custody-bench flight`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Events in the ledger and in the table.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Events per session.
    #[arg(long, default_value_t = 50)]
    session_events: u64,
    /// Timed full pulls per system.
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// Selective queries per system.
    #[arg(long, default_value_t = 50)]
    queries: u32,
    /// Where the results section goes.
    #[arg(long, default_value = "bench/RESULTS.md")]
    out: std::path::PathBuf,
}

/// The columns both sides pull: what a compliance query asks for.
const COLUMNS: &str = "index, commit_time, session_id, seq, kind, subject, resource, message, sql, params, outcome, command_tag, recorded_rows";

fn event_bytes(i: u64, session_events: u64) -> Bytes {
    let session = i / session_events;
    let seq = i % session_events;
    let aid = (i * 7919) % 100_000 + 1;
    let identity = Identity {
        issuer: "https://idp.example.com".into(),
        subject: format!("agent-{}", session % 20),
        email: format!("agent-{}@example.com", session % 20),
        groups: vec!["ci".into()],
        ..Default::default()
    };
    let (kind, body) = if seq % 2 == 0 {
        (
            EventKind::Request,
            event::Body::PgRequest(PgRequest {
                message: "Execute".into(),
                sql: "SELECT abalance FROM pgbench_accounts WHERE aid = $1".into(),
                portal: String::new(),
                params: vec![Param { text: aid.to_string(), ..Default::default() }],
                ..Default::default()
            }),
        )
    } else {
        (
            EventKind::Response,
            event::Body::PgResponse(PgResponse {
                in_reply_to: seq - 1,
                outcome: Outcome::Ok as i32,
                command_tag: "SELECT 1".into(),
                rows: 1,
                bytes: 12,
                columns: vec![Column { name: "abalance".into(), type_oid: 23, format: 0 }],
                recorded_rows: vec![Row { cells: vec![Cell { is_null: false, value: (aid * 10).to_string().into_bytes() }] }],
                ..Default::default()
            }),
        )
    };
    Event {
        proxy_id: "bench-proxy".into(),
        session_id: format!("sess-{session:08}"),
        seq,
        proxy_time_ns: 1_764_800_000_000_000_000 + i as i64 * 1_000_000,
        kind: kind as i32,
        identity: Some(identity),
        resource: "pg-prod".into(),
        protocol: custody_proto::pb::v1::Protocol::Postgres as i32,
        client_addr: "127.0.0.1:50000".into(),
        body: Some(body),
        proxy_instance: "bench".into(),
    }
    .encode_to_vec()
    .into()
}

async fn load_ledger(grpc: &str, n: u64, session_events: u64) -> anyhow::Result<f64> {
    let start = Instant::now();
    let batch = 2000u64;
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let next = next.clone();
        let url = format!("http://{grpc}");
        tasks.push(tokio::spawn(async move {
            let mut c = LedgerClient::connect(url).await?;
            loop {
                let from = next.fetch_add(batch, std::sync::atomic::Ordering::SeqCst);
                if from >= n {
                    return anyhow::Ok(());
                }
                let events: Vec<Bytes> = (from..(from + batch).min(n)).map(|i| event_bytes(i, session_events)).collect();
                c.append(AppendRequest { events }).await.context("append")?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(start.elapsed().as_secs_f64())
}

async fn flight_sql(url: &str) -> anyhow::Result<FlightSqlServiceClient<tonic::transport::Channel>> {
    let ch = tonic::transport::Endpoint::from_shared(url.replace("grpc://", "http://"))?.connect().await?;
    Ok(FlightSqlServiceClient::new(ch))
}

async fn sql_query(c: &mut FlightSqlServiceClient<tonic::transport::Channel>, sql: &str) -> anyhow::Result<Vec<RecordBatch>> {
    let info = c.execute(sql.to_string(), None).await?;
    let mut out = Vec::new();
    for ep in info.endpoint {
        let t = ep.ticket.context("endpoint without ticket")?;
        let s = c.do_get(t).await?;
        out.extend(s.try_collect::<Vec<_>>().await?);
    }
    Ok(out)
}

fn csv_text(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn pg_array(items: &[Option<String>]) -> String {
    let inner: Vec<String> = items
        .iter()
        .map(|i| match i {
            None => "NULL".into(),
            Some(v) => format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")),
        })
        .collect();
    format!("{{{}}}", inner.join(","))
}

/// The ledger's rows as CSV for `COPY audit_log FROM STDIN (FORMAT csv)`.
fn to_csv(batches: &[RecordBatch], out: &mut Vec<u8>) -> anyhow::Result<u64> {
    let mut n = 0;
    for b in batches {
        let idx = b.column(0).as_primitive::<UInt64Type>();
        let ts = b.column(1).as_primitive::<TimestampNanosecondType>();
        let seq = b.column(3).as_primitive::<UInt64Type>();
        let params = b.column(9).as_list::<i32>();
        for r in 0..b.num_rows() {
            let t = chrono::DateTime::from_timestamp_nanos(ts.value(r)).to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
            let s = |c: usize| {
                let a = b.column(c).as_string::<i32>();
                if a.is_null(r) {
                    String::new()
                } else {
                    csv_text(a.value(r))
                }
            };
            let p = if params.is_null(r) {
                String::new()
            } else {
                let v = params.value(r);
                let v = v.as_string::<i32>();
                csv_text(&pg_array(&(0..v.len()).map(|i| (!v.is_null(i)).then(|| v.value(i).to_string())).collect::<Vec<_>>()))
            };
            writeln!(out, "{},{},{},{},{},{},{},{},{},{},{},{},{}", idx.value(r), t, s(2), seq.value(r), s(4), s(5), s(6), s(7), s(8), p, s(10), s(11), s(12))?;
            n += 1;
        }
    }
    Ok(n)
}

fn psql(pg: &Postgres) -> Command {
    let mut c = Command::new("psql");
    c.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", &pg.port.to_string(), "-U", &pg.user, "-d", "postgres"]).env("PGPASSWORD", &pg.password);
    c
}

fn copy_out(pg: &Postgres) -> anyhow::Result<(u64, f64)> {
    let start = Instant::now();
    let out = psql(pg).args(["-c", &format!("COPY (SELECT {COLUMNS} FROM audit_log) TO STDOUT")]).stderr(Stdio::piped()).output()?;
    let secs = start.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!("COPY TO STDOUT failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((out.stdout.iter().filter(|b| **b == b'\n').count() as u64, secs))
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs the benchmark and writes its section of `--out`.
pub fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(a.events >= a.session_events && a.session_events >= 2, "--events must hold at least one session of --session-events (>= 2)");
    let rt = tokio::runtime::Runtime::new()?;
    let dir = tempfile::Builder::new().prefix("custody-bench-flight-").tempdir()?;
    let ledger = Ledger::start(dir.path())?;
    let grpc = ledger.grpc.to_string();
    let flight = ledger.flight();
    eprintln!("loading {} events into the ledger ...", a.events);
    let load_secs = rt.block_on(load_ledger(&grpc, a.events, a.session_events))?;
    eprintln!("loaded in {load_secs:.1} s");

    let pg = Postgres::start_with(&["fsync=off", "shared_buffers=512MB"])?;
    let create = "CREATE TABLE audit_log (index bigint PRIMARY KEY, commit_time timestamptz NOT NULL, session_id text NOT NULL, seq bigint NOT NULL, kind text NOT NULL, \
                  subject text, resource text NOT NULL, message text, sql text, params text[], outcome text, command_tag text, recorded_rows text)";
    pg.direct_sql(create)?;
    // The rows the ledger serves, loaded into PostgreSQL (untimed).
    let rows = rt.block_on(async { sql_query(&mut flight_sql(&flight).await?, &format!("SELECT {COLUMNS} FROM events")).await })?;
    let mut csv = Vec::new();
    let loaded = to_csv(&rows, &mut csv)?;
    anyhow::ensure!(loaded == a.events, "the ledger served {loaded} rows, {} were appended", a.events);
    drop(rows);
    let mut child = psql(&pg).args(["-c", "\\copy audit_log FROM STDIN (FORMAT csv)"]).stdin(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    child.stdin.take().context("stdin")?.write_all(&csv)?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(out.status.success(), "loading PostgreSQL: {}", String::from_utf8_lossy(&out.stderr));
    drop(csv);
    pg.direct_sql("CREATE INDEX audit_log_session ON audit_log (session_id)")?;
    pg.direct_sql("VACUUM ANALYZE audit_log")?;
    let pg_size = pg.direct_sql("SELECT pg_size_pretty(pg_total_relation_size('audit_log'))")?;

    // Full pulls, alternating so that both see the same machine.
    let mut flight_rates = Vec::new();
    let mut copy_rates = Vec::new();
    for run in 0..a.runs {
        let (n, secs) = rt.block_on(async {
            let mut c = flight_sql(&flight).await?;
            let start = Instant::now();
            let b = sql_query(&mut c, &format!("SELECT {COLUMNS} FROM events")).await?;
            anyhow::Ok((b.iter().map(|b| b.num_rows() as u64).sum::<u64>(), start.elapsed().as_secs_f64()))
        })?;
        anyhow::ensure!(n == a.events, "Flight run {run}: {n} rows");
        flight_rates.push(n as f64 / secs);
        let (n, secs) = copy_out(&pg)?;
        anyhow::ensure!(n == a.events, "COPY run {run}: {n} rows");
        copy_rates.push(n as f64 / secs);
        eprintln!("run {run}: flight {:.0} rows/s, COPY {:.0} rows/s", flight_rates[run as usize], copy_rates[run as usize]);
    }

    // One session out of N.
    let sid = format!("sess-{:08}", a.events / a.session_events / 2);
    let q = format!("SELECT {COLUMNS} FROM events WHERE session_id = '{sid}'");
    let mut lat = Vec::new();
    rt.block_on(async {
        let mut c = flight_sql(&flight).await?;
        for _ in 0..a.queries {
            let start = Instant::now();
            let b = sql_query(&mut c, &q).await?;
            lat.push(start.elapsed().as_secs_f64() * 1000.0);
            let n: usize = b.iter().map(|b| b.num_rows()).sum();
            anyhow::ensure!(n as u64 == a.session_events, "the selective query returned {n} rows, not {}", a.session_events);
        }
        anyhow::Ok(())
    })?;
    lat.sort_by(|a, b| a.total_cmp(b));
    let script = dir.path().join("select.sql");
    std::fs::write(&script, format!("SELECT {COLUMNS} FROM audit_log WHERE session_id = '{sid}';\n"))?;
    let n_pg = pg.direct_sql(&format!("SELECT count(*) FROM audit_log WHERE session_id = '{sid}'"))?;
    anyhow::ensure!(n_pg == a.session_events.to_string(), "PostgreSQL holds {n_pg} rows of {sid}");
    let out = Command::new("pgbench")
        .args(["-n", "-c", "1", "-t", &a.queries.to_string(), "-f"])
        .arg(&script)
        .args(["-h", "127.0.0.1", "-p", &pg.port.to_string(), "-U", &pg.user, "postgres"])
        .env("PGPASSWORD", &pg.password)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    anyhow::ensure!(out.status.success(), "pgbench: {}{}", text, String::from_utf8_lossy(&out.stderr));
    let pg_lat: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("latency average = ").and_then(|v| v.trim_end_matches(" ms").trim().parse().ok()))
        .context("pgbench printed no latency average")?;

    let (fr, cr) = (median(flight_rates.clone()), median(copy_rates.clone()));
    let cmd = format!("bench/run flight --events {} --session-events {} --runs {} --queries {}", a.events, a.session_events, a.runs, a.queries);
    let pgv = crate::run_ok(Command::new("postgres").arg("--version"), "postgres --version").unwrap_or_default();
    let body = format!(
        "## Compliance pulls: Arrow Flight SQL from the ledger vs PostgreSQL `COPY ... TO STDOUT` (issue 5)\n\n\
         Command: `{cmd}` (release build)  \n\
         Machine: {}; {}; single-node custody ledger and PostgreSQL on loopback, one at a time.  \n\
         Both pull the same {} rows and the same 13 columns (`{COLUMNS}`); PostgreSQL's `audit_log` table ({pg_size} with its indexes) was loaded from the rows the ledger served. \
         The ledger runs without `[readers]`, so no read is recorded as an `audit_query` event here. Each figure is the median of {} runs; PostgreSQL's time includes psql writing the rows to a pipe.\n\n\
         | pull | rows/s (median) | runs (rows/s) | Flight ÷ COPY |\n|---|---:|---|---:|\n\
         | custody Flight SQL `SELECT … FROM events` | {fr:.0} | {} | {:.2} |\n\
         | PostgreSQL `COPY (SELECT … FROM audit_log) TO STDOUT` | {cr:.0} | {} | |\n\n\
         Selective query, one session ({} events) out of {}: custody Flight SQL (GetFlightInfo + DoGet, one connection, `session_id` pushed down to the ledger's session index) \
         p50 {:.2} ms, p99 {:.2} ms over {} queries; PostgreSQL (b-tree index on `session_id`, pgbench, one connection) latency average {pg_lat:.3} ms.\n\n\
         Loading the ledger: {} events appended in {load_secs:.1} s ({:.0} events/s; batches of 2000, 4 concurrent appends).\n",
        crate::machine(),
        pgv.trim(),
        a.events,
        a.runs,
        flight_rates.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", "),
        fr / cr,
        copy_rates.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", "),
        a.session_events,
        a.events,
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        a.queries,
        a.events,
        a.events as f64 / load_secs,
    );
    crate::write_section(&a.out, "flight", &body)?;
    println!("{body}");
    drop(ledger);
    Ok(())
}
