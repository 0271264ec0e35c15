//! The main job end to end: real clients through the QUIC tunnel to a real PostgreSQL, every
//! statement in the ledger, read back with pyarrow.flight.

use std::process::Command;
use std::time::Duration;

use custody_e2e::*;

fn pgbench(port: u16, mode: &str, script: &std::path::Path, clients: u32, tx: u32) -> String {
    let out = Command::new("pgbench")
        .args(["-n", "-M", mode, "-c", &clients.to_string(), "-t", &tx.to_string(), "-f"])
        .arg(script)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "bench", "postgres"])
        .output()
        .expect("pgbench");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "pgbench -M {mode} failed:\n{text}");
    text
}

fn ledger_size(flight: &str) -> u64 {
    rt().block_on(async {
        let mut c = custody::query::client(flight).await.unwrap();
        use futures::TryStreamExt;
        let mut s = c.do_action(arrow_flight_action()).await.unwrap();
        let b = s.try_next().await.unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        v["size"].as_u64().unwrap()
    })
}

fn arrow_flight_action() -> arrow_flight::Action {
    arrow_flight::Action::new("status", "")
}

#[test]
fn pgbench_statements_are_recorded_exactly_once_in_order_with_params_and_identity() {
    let stack = Stack::start().unwrap();
    let token = rt().block_on(stack.token());
    let tunnel = stack.tunnel("pg", &token);
    stack.pg.direct_sql("create table accounts(aid int primary key, abalance int); insert into accounts select g, g*10 from generate_series(1, 1000) g; create table e2e_log(id serial primary key, client int, aid int)").unwrap();
    let script = stack.dir.path().join("bench.sql");
    std::fs::write(
        &script,
        "\\set aid random(1, 1000)\nSELECT abalance FROM accounts WHERE aid = :aid;\nINSERT INTO e2e_log(client, aid) VALUES (:client_id, :aid);\n",
    )
    .unwrap();
    let clients = 4;
    let tx = 25;
    for mode in ["simple", "extended", "prepared"] {
        stack.pg.direct_sql("truncate e2e_log").unwrap();
        let since = ledger_size(&stack.ledger.flight());
        let out = pgbench(tunnel.port, mode, &script, clients, tx);
        assert!(out.contains(&format!("number of transactions actually processed: {}/{}", clients * tx, clients * tx)), "{out}");
        // What pgbench did, read directly from PostgreSQL.
        let log = stack.pg.direct_sql("select client, aid from e2e_log order by id").unwrap();
        let mut per_client: std::collections::BTreeMap<u32, Vec<serde_json::Value>> = Default::default();
        for line in log.lines() {
            let (c, aid) = line.split_once('|').unwrap();
            let c: u32 = c.parse().unwrap();
            let steps = per_client.entry(c).or_default();
            if mode == "simple" {
                steps.push(serde_json::json!({"sql": format!("SELECT abalance FROM accounts WHERE aid = {aid}"), "params": []}));
                steps.push(serde_json::json!({"sql": format!("INSERT INTO e2e_log(client, aid) VALUES ({c}, {aid})"), "params": []}));
            } else {
                steps.push(serde_json::json!({"sql": "SELECT abalance FROM accounts WHERE aid = $1", "params": [aid]}));
                steps.push(serde_json::json!({"sql": "INSERT INTO e2e_log(client, aid) VALUES ($1, $2)", "params": [c.to_string(), aid]}));
            }
        }
        assert_eq!(per_client.len(), clients as usize);
        let expect = serde_json::json!({
            "subject": "ci-client",
            "resource": "pg",
            "since_index": since,
            "statements": per_client.iter().map(|(c, s)| serde_json::json!({"client": c, "steps": s})).collect::<Vec<_>>(),
        });
        let path = stack.dir.path().join(format!("expect-{mode}.json"));
        std::fs::write(&path, expect.to_string()).unwrap();
        let report = stack.python("check_events.py", &[&stack.ledger.flight(), path.to_str().unwrap()]).unwrap_or_else(|e| panic!("mode {mode}: {e}"));
        eprintln!("pgbench -M {mode}: {report}");
    }
    // Compliance queries over Flight SQL (ADBC, pyarrow.flight, DuckDB) against what the last
    // pgbench run did.
    let report = stack.python("flight_sql.py", &[&stack.ledger.flight(), stack.dir.path().join("expect-prepared.json").to_str().unwrap()]).unwrap();
    eprintln!("flight sql: {report}");
    let r: serde_json::Value = serde_json::from_str(report.trim().lines().last().unwrap()).unwrap();
    assert_eq!(r["statements"], clients * tx * 2, "{report}");
    assert_eq!(r["inserts"], clients * tx, "{report}");
    let out = custody_cmd(&stack.dir.path().join("home"), None).args(["verify", "--flight", &stack.ledger.flight()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A third party with pyarrow and its own RFC 6962 code checks the root and the proofs.
    let report = stack.python("verify_proofs.py", &[&stack.ledger.flight()]).unwrap();
    let r: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    assert!(r["proofs_checked"].as_u64().unwrap() >= 10 && r["size"].as_u64().unwrap() > 100, "{report}");
    export_verify_and_read_with_duckdb(&stack, &stack.dir.path().join("expect-prepared.json"));
}

/// The ledger's size, once every entry is in a sealed block.
fn wait_all_sealed(flight: &str) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let st = rt().block_on(custody::query::action(flight, "status", &serde_json::json!({}))).unwrap();
        let (size, sealed) = (st["size"].as_u64().unwrap(), st["sealed_size"].as_u64().unwrap_or(0));
        if size == sealed {
            return size;
        }
        assert!(std::time::Instant::now() < deadline, "entries up to {size} not sealed after 30 s (sealed {sealed})");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `custody export` of everything pgbench did, `custody verify --offline` on it, DuckDB and
/// pyarrow reading the Parquet files, and a row edited in one file failing verification with
/// its index named.
fn export_verify_and_read_with_duckdb(stack: &Stack, expect: &std::path::Path) {
    let flight = stack.ledger.flight();
    let home = stack.dir.path().join("home");
    let key = rt().block_on(custody::query::action(&flight, "status", &serde_json::json!({}))).unwrap()["verifier_key"].as_str().unwrap().to_string();
    let size = wait_all_sealed(&flight);
    let dir = stack.dir.path().join("lake");
    let out = custody_cmd(&home, None).args(["export", "--flight", &flight, "--key", &key]).arg(&dir).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains(&format!("read back and verified against the checkpoint at size {size}")), "{text}");
    // The ledger sealed more than one block during pgbench: one file per block.
    let files = std::fs::read_dir(dir.join("blocks")).unwrap().count();
    assert!(files > 1, "{files} block files: {text}");
    let verify = |dir: &std::path::Path| custody_cmd(&home, None).args(["verify", "--key", &key, "--offline"]).arg(dir).output().unwrap();
    let out = verify(&dir);
    let vtext = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && vtext.contains(&format!("{files} blocks, {size} rows")), "{vtext}");
    // Nothing new sealed since: a second run exports nothing and writes no second manifest.
    let out = custody_cmd(&home, None).args(["export", "--flight", &flight, "--key", &key]).arg(&dir).output().unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("nothing to export"), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(std::fs::read_dir(dir.join("manifests")).unwrap().count(), 1);
    // DuckDB and pyarrow on the files: the same statements pgbench ran.
    let report = stack.python("export_parquet.py", &["check", dir.to_str().unwrap(), expect.to_str().unwrap()]).unwrap();
    let r: serde_json::Value = serde_json::from_str(report.trim().lines().last().unwrap()).unwrap();
    let e: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(expect).unwrap()).unwrap();
    let steps: usize = e["statements"].as_array().unwrap().iter().map(|c| c["steps"].as_array().unwrap().len()).sum();
    assert_eq!(r["statements"].as_u64().unwrap() as usize, steps, "{report}");
    assert_eq!((r["first_index"].as_u64(), r["last_index"].as_u64()), (Some(0), Some(size - 1)), "{report}");
    // A copy with one row's SQL edited (by pyarrow, as anyone with write access to the lake
    // could) fails, naming that row's index and column.
    let copy = stack.dir.path().join("lake-tampered");
    let st = Command::new("cp").arg("-r").arg(&dir).arg(&copy).status().unwrap();
    assert!(st.success());
    let index = stack.python("export_parquet.py", &["tamper", copy.to_str().unwrap()]).unwrap().trim().to_string();
    let out = verify(&copy);
    let vtext = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success() && vtext.contains(&format!("index {index}: column sql is not what the row's entry records")), "tampered row {index}: {vtext}");
    // The original still verifies: nothing but the copy was touched.
    assert!(verify(&dir).status.success());
    // A manifest that no longer names one of its blocks: that file is named by none.
    let cut = stack.dir.path().join("lake-cut");
    assert!(Command::new("cp").arg("-r").arg(&dir).arg(&cut).status().unwrap().success());
    let mpath = std::fs::read_dir(cut.join("manifests")).unwrap().next().unwrap().unwrap().path();
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    m["blocks"].as_array_mut().unwrap().pop();
    std::fs::write(&mpath, serde_json::to_vec(&m).unwrap()).unwrap();
    let out = verify(&cut);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("named by no manifest"), "{}", String::from_utf8_lossy(&out.stderr));

    // The same export to an S3-compatible bucket (moto's S3 server on loopback), verified
    // offline from the bucket.
    let s3 = S3Server::start(stack.dir.path());
    s3.create_bucket("audit-lake");
    let out = s3.env(&mut custody_cmd(&home, None)).args(["export", "--flight", &flight, "--key", &key, "s3://audit-lake/custody"]).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("to s3://audit-lake/custody; read back and verified"), "{text}");
    let out = s3.env(&mut custody_cmd(&home, None)).args(["verify", "--key", &key, "--offline", "s3://audit-lake/custody"]).output().unwrap();
    let vtext = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && vtext.contains("rows; every row's entry proven"), "{vtext}");
    // A bucket that does not exist fails clearly, and nothing is recorded.
    let out = s3.env(&mut custody_cmd(&home, None)).args(["export", "--flight", &flight, "--key", &key, "s3://no-such-bucket/x"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success() && text.contains("nothing was marked as exported"), "{text}");
}

/// moto's S3 server (from e2e/py/requirements.txt) on a free loopback port.
struct S3Server {
    port: u16,
    _proc: Proc,
}

impl S3Server {
    fn start(logs: &std::path::Path) -> Self {
        let port = free_port();
        let bin = python().with_file_name("moto_server");
        let mut cmd = Command::new(&bin);
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        let mut p = Proc::spawn("moto", cmd, logs).unwrap_or_else(|e| panic!("{}: {e} (the test command installs it)", bin.display()));
        wait_tcp(std::net::SocketAddr::from(([127, 0, 0, 1], port)), "moto_server", &mut p).unwrap();
        Self { port, _proc: p }
    }

    fn create_bucket(&self, name: &str) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(s, "PUT /{name} HTTP/1.0\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\n\r\n", self.port).unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        assert!(r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200"), "{r}");
    }

    fn env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ENDPOINT", format!("http://127.0.0.1:{}", self.port))
            .env("AWS_ALLOW_HTTP", "true")
    }
}

#[test]
fn psql_session_is_recorded_with_results_errors_and_identity() {
    let stack = Stack::start().unwrap();
    let token = rt().block_on(stack.token());
    let tunnel = stack.tunnel("pg", &token);
    let out = tunnel.psql(&["-c", "create table t(id int, v text)", "-c", "insert into t values (1, 'one'), (2, NULL)", "-c", "select * from t order by id", "-c", "select 1/0"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("division by zero"), "{stderr}");
    let home = stack.dir.path().join("home");
    // psql has exited; the proxy records the session's end when it sees the stream close,
    // a moment later.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let rows = loop {
        let rows = events_json(&home, &stack.ledger.flight(), &["--resource", "pg"]).unwrap();
        if rows.last().is_some_and(|r| r["kind"] == "session_end") || std::time::Instant::now() > deadline {
            break rows;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let sid = rows[0]["session_id"].as_str().unwrap().to_string();
    assert!(rows.iter().all(|r| r["subject"] == "ci-client" && r["groups"] == serde_json::json!(["ci", "dba"])));
    let reqs: Vec<&str> = rows.iter().filter(|r| r["kind"] == "request").map(|r| r["sql"].as_str().unwrap()).collect();
    assert_eq!(reqs, vec!["create table t(id int, v text)", "insert into t values (1, 'one'), (2, NULL)", "select * from t order by id", "select 1/0"]);
    let select = rows.iter().find(|r| r["kind"] == "response" && r["command_tag"] == "SELECT 2").expect("select response");
    assert_eq!(select["recorded_rows"].as_str().unwrap(), r#"[["1","one"],["2",null]]"#);
    assert_eq!(select["columns"], serde_json::json!(["id", "v"]));
    let err = rows.iter().find(|r| r["outcome"] == "error").expect("error response");
    assert_eq!(err["error_sqlstate"], "22012");
    assert_eq!(rows.first().unwrap()["kind"], "session_start");
    assert_eq!(rows.first().unwrap()["application_name"], "psql");
    assert_eq!(rows.last().unwrap()["kind"], "session_end");
    // CSV, for spreadsheets: one line per event after the header, lists as JSON arrays.
    let out = custody_cmd(&home, None).args(["events", "--format", "csv", "--resource", "pg", "--flight", &stack.ledger.flight()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let csv = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(csv.starts_with("index,commit_time,"), "{csv}");
    assert!(csv.contains(r#""[""ci"",""dba""]""#), "groups as a JSON array: {csv}");
    assert_eq!(csv.lines().filter(|l| l.contains(&sid)).count(), rows.len());
    // Time ranges: everything is within the last 10 minutes, nothing is older than an hour.
    assert_eq!(events_json(&home, &stack.ledger.flight(), &["--resource", "pg", "--since", "10m"]).unwrap().len(), rows.len());
    assert!(events_json(&home, &stack.ledger.flight(), &["--resource", "pg", "--until", "1h"]).unwrap().is_empty());
    assert!(events_json(&home, &stack.ledger.flight(), &["--resource", "pg", "--identity", "someone-else"]).unwrap().is_empty());
    let reqs_only = events_json(&home, &stack.ledger.flight(), &["--resource", "pg", "--kind", "request"]).unwrap();
    assert!(!reqs_only.is_empty() && reqs_only.iter().all(|r| r["kind"] == "request"));
    // The same through the session filter and the sessions table.
    let by_session = events_json(&home, &stack.ledger.flight(), &["--session", &sid]).unwrap();
    assert_eq!(by_session.len(), rows.len());
    let out = custody_cmd(&home, None).args(["sessions", "--format", "json", "--flight", &stack.ledger.flight()]).output().unwrap();
    let s: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().next().unwrap()).unwrap();
    assert_eq!(s["statements"], 4);
    assert_eq!(s["errors"], 1);
    assert_eq!(s["status"], "ended");
    assert_eq!(s["end_reason"], "terminate");

    // Replay: the session as a transcript, times relative to its start (normalised here, as
    // is the client's port), compared line by line with what psql did.
    let out = custody_cmd(&home, None).args(["replay", &sid, "--flight", &stack.ledger.flight()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut times = Vec::new();
    let normalised: Vec<String> = text
        .lines()
        .map(|l| {
            let t = l.trim_start();
            match t.split_once("s  ") {
                Some((ts, rest)) if ts.starts_with('+') => {
                    times.push(ts[1..].parse::<f64>().unwrap());
                    let rest = match rest.rsplit_once(" from 127.0.0.1:") {
                        Some((head, _)) => format!("{head} from 127.0.0.1:PORT"),
                        None => rest.to_string(),
                    };
                    format!("+T  {rest}")
                }
                _ => l.trim_end().to_string(),
            }
        })
        .collect();
    let expected = [
        "+T  session start: ci-client -> pg (database postgres, application psql) from 127.0.0.1:PORT",
        "+T  > create table t(id int, v text)",
        "+T  < CREATE TABLE",
        "+T  > insert into t values (1, 'one'), (2, NULL)",
        "+T  < INSERT 0 2",
        "+T  > select * from t order by id",
        "+T  < SELECT 2  (2 rows, 35 bytes)",
        "                 id | v",
        "                 1 | one",
        "                 2 | NULL",
        "+T  > select 1/0",
        "+T  < ERROR 22012: division by zero",
        "+T  session end: terminate",
    ];
    assert_eq!(normalised, expected, "{text}");
    assert!(times.windows(2).all(|w| w[0] <= w[1]) && times[0] == 0.0, "times count up from 0: {times:?}");
    // JSON: one object per event, the same events, each with its time since the start.
    let out = custody_cmd(&home, None).args(["replay", &sid, "--format", "json", "--flight", &stack.ledger.flight()]).output().unwrap();
    let json: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(json.len(), rows.len());
    assert!(json.iter().zip(&rows).all(|(j, r)| j["index"] == r["index"] && j["t"].is_number()));
    let out = custody_cmd(&home, None).args(["replay", "no-such-session", "--flight", &stack.ledger.flight()]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no events recorded for session"));
}

#[test]
fn statements_are_refused_and_nothing_runs_while_the_ledger_is_down() {
    // A short append deadline keeps the test quick; the behaviour is the same at any deadline.
    let mut stack = Stack::start_with(|_, _| Ok(String::new()), 1500).unwrap();
    let token = rt().block_on(stack.token());
    let tunnel = stack.tunnel("pg", &token);
    stack.pg.direct_sql("create table fc(id int)").unwrap();
    let out = tunnel.psql(&["-c", "insert into fc values (1)"]);
    assert!(out.status.success());

    // A session that is open when the ledger dies.
    let mut raw = raw::RawPg::connect(tunnel.port).unwrap();
    stack.ledger.kill();

    raw.send(&raw::query("insert into fc values (2)")).unwrap();
    let frames = raw.until(|f| f.tag() == b'Z').unwrap();
    let (sev, code, msg) = raw::error_of(&frames[0]).expect("an ErrorResponse");
    assert_eq!((sev.as_str(), code.as_str()), ("ERROR", "CU001"), "{msg}");
    assert!(msg.contains("not executed") && msg.contains("audit ledger is unavailable"), "{msg}");
    // Extended protocol too: error, skip until Sync, ReadyForQuery.
    let mut batch = raw::parse("", "insert into fc values (3)");
    batch.extend(raw::bind("", "", &[]));
    batch.extend(raw::execute(""));
    batch.extend(raw::sync());
    raw.send(&batch).unwrap();
    let frames = raw.until(|f| f.tag() == b'Z').unwrap();
    assert_eq!(raw::tags(&frames), "EZ");
    // A new session cannot start either.
    let out = tunnel.psql(&["-c", "insert into fc values (4)"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("audit ledger is unavailable"), "{stderr}");
    assert_eq!(stack.pg.direct_sql("select count(*) from fc").unwrap(), "1", "nothing reached the target");

    // The ledger comes back: the open session works again, and its record says what happened.
    stack.ledger.restart().unwrap();
    raw.send(&raw::query("insert into fc values (5)")).unwrap();
    let frames = raw.until(|f| f.tag() == b'Z').unwrap();
    assert_eq!(raw::tags(&frames), "CZ");
    assert_eq!(stack.pg.direct_sql("select array_agg(id order by id) from fc").unwrap(), "{1,5}");
    raw.send(&raw::msg(b'X', b"")).unwrap();
    assert!(raw.next().unwrap().is_none());
    std::thread::sleep(Duration::from_millis(500));
    let rows = events_json(&stack.dir.path().join("home"), &stack.ledger.flight(), &["--resource", "pg"]).unwrap();
    let refused: Vec<_> = rows.iter().filter(|r| r["error_sqlstate"] == "CU001").collect();
    assert_eq!(refused.len(), 2, "both refusals are on the record");
    let sqls: Vec<&str> = rows.iter().filter(|r| r["message"] == "Query" || r["message"] == "Execute").filter_map(|r| r["sql"].as_str()).collect();
    assert!(sqls.contains(&"insert into fc values (2)") && sqls.contains(&"insert into fc values (5)"));
    let out = custody_cmd(&stack.dir.path().join("home"), None).args(["verify", "--flight", &stack.ledger.flight()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn custody_ok(home: &std::path::Path, args: &[&str]) -> String {
    let out = custody_cmd(home, None).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "custody {args:?}: {text}");
    text
}

fn ledger_status(flight: &str) -> serde_json::Value {
    rt().block_on(custody::query::action(flight, "status", &serde_json::json!({}))).unwrap()
}

#[test]
fn retention_prunes_exported_payloads_but_keeps_held_sessions_and_every_proof() {
    let stack = Stack::start_full(|_, _| Ok(String::new()), 5000, |dir| {
        let archive = dir.join("archive");
        std::fs::create_dir_all(&archive).unwrap();
        Some(format!("[blocks]\nmax_entries = 4\nmax_delay_ms = 200\n\n[retention]\narchive = \"file://{}\"\nprune_after = \"0s\"\ninterval_s = 1\n", archive.display()))
    })
    .unwrap();
    let token = rt().block_on(stack.token());
    let tunnel = stack.tunnel("pg", &token);
    assert!(tunnel.psql(&["-c", "select 'keep-me'"]).status.success());
    assert!(tunnel.psql(&["-c", "select 'prune-me'"]).status.success());
    let flight = stack.ledger.flight();
    let home = stack.dir.path().join("home");
    let f = flight.as_str();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let session_of = |sql: &str| loop {
        let rows = events_json(&home, f, &["--resource", "pg", "--kind", "request"]).unwrap();
        if let Some(r) = rows.iter().find(|r| r["sql"] == sql) {
            return r["session_id"].as_str().unwrap().to_string();
        }
        assert!(std::time::Instant::now() < deadline, "{sql} not recorded");
        std::thread::sleep(Duration::from_millis(200));
    };
    let (kept, pruned) = (session_of("select 'keep-me'"), session_of("select 'prune-me'"));
    // Both sessions have ended before anything is exported.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while events_json(&home, f, &["--kind", "session_end"]).unwrap().len() < 2 {
        assert!(std::time::Instant::now() < deadline, "sessions did not end");
        std::thread::sleep(Duration::from_millis(200));
    }
    custody_ok(&home, &["hold", &kept, "--reason", "case 4711: litigation hold requested by legal", "--flight", f]);
    assert!(custody_ok(&home, &["holds", "--flight", f]).contains(&kept));
    let out = custody_cmd(&home, None).args(["hold", "no-such-session", "--reason", "x", "--flight", f]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no session"), "{}", String::from_utf8_lossy(&out.stderr));
    let key = ledger_status(f)["verifier_key"].as_str().unwrap().to_string();

    // An export somewhere else is recorded but prunes nothing: only the archive counts.
    let size = wait_all_sealed(f);
    custody_ok(&home, &["export", "--flight", f, "--key", &key, stack.dir.path().join("laptop").to_str().unwrap()]);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(ledger_status(f)["pruned_through"], 0, "an export outside the archive must not prune");

    // The archive, first only from a middle block on (--since its seal time): a gap from
    // entry 0, so nothing may be pruned.
    let archive = stack.dir.path().join("archive");
    let blocks: Vec<serde_json::Value> = custody_ok(&home, &["blocks", "--json", "--flight", f]).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(blocks.len() >= 3, "{blocks:?}");
    let middle = &blocks[blocks.len() / 2];
    let since = chrono::DateTime::from_timestamp_nanos(middle["sealed_at_ns"].as_i64().unwrap()).to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
    let out = custody_ok(&home, &["export", "--since", &since, "--flight", f, "--key", &key, archive.to_str().unwrap()]);
    assert!(out.contains(&format!("exported blocks {}..=", middle["height"])), "{out}");
    // A false record: that manifest, claimed to hold everything from entry 0. The leader reads
    // the archive and does not believe it.
    let manifest = std::fs::read_dir(archive.join("manifests")).unwrap().next().unwrap().unwrap().path();
    let sha = { use sha2::Digest; hex::encode(sha2::Sha256::digest(std::fs::read(&manifest).unwrap())) };
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    let forged = serde_json::json!({
        "target": format!("file://{}", archive.canonicalize().unwrap().display()),
        "manifest": format!("manifests/{}", manifest.file_name().unwrap().to_str().unwrap()),
        "manifest_sha256": sha, "size": m["size"], "first_height": 0, "last_height": blocks.last().unwrap()["height"],
        "first_index": 0, "end_index": m["size"], "rows": m["size"],
    });
    rt().block_on(custody::query::action(f, "record_export", &forged)).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(ledger_status(f)["pruned_through"], 0, "a record the archive does not bear out pruned payloads");
    let log = stack.ledger.proc.as_ref().unwrap().log_text();
    assert!(log.contains("does not hold what it claims") && log.contains("the record claims entries 0.."), "the leader must say why it ignored the record:\n{log}");
    // Someone who can write to the archive puts a manifest there (real headers and checkpoint,
    // copied from the export elsewhere) over files that are not those entries, with matching
    // hashes. The leader reads the rows themselves and does not believe it either.
    let laptop = stack.dir.path().join("laptop");
    let lm_path = std::fs::read_dir(laptop.join("manifests")).unwrap().next().unwrap().unwrap().path();
    let mut evil: serde_json::Value = serde_json::from_slice(&std::fs::read(&lm_path).unwrap()).unwrap();
    let mut planted = Vec::new();
    for b in evil["blocks"].as_array_mut().unwrap() {
        let file = archive.join(b["file"].as_str().unwrap());
        if file.exists() {
            continue;
        }
        let junk = format!("not the entries of block {}", b["height"]).into_bytes();
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, &junk).unwrap();
        b["sha256"] = hex::encode({ use sha2::Digest; sha2::Sha256::digest(&junk) }).into();
        b["bytes"] = junk.len().into();
        planted.push(file);
    }
    let evil_bytes = serde_json::to_vec(&evil).unwrap();
    let evil_path = archive.join("manifests/zz-evil.json");
    std::fs::write(&evil_path, &evil_bytes).unwrap();
    let mut forged2 = forged.clone();
    forged2["manifest"] = "manifests/zz-evil.json".into();
    forged2["manifest_sha256"] = hex::encode({ use sha2::Digest; sha2::Sha256::digest(&evil_bytes) }).into();
    forged2["size"] = evil["size"].clone();
    forged2["end_index"] = evil["size"].clone();
    rt().block_on(custody::query::action(f, "record_export", &forged2)).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(ledger_status(f)["pruned_through"], 0, "files that are not the ledger's entries pruned payloads");
    let log = stack.ledger.proc.as_ref().unwrap().log_text();
    assert!(log.contains("zz-evil.json") && log.contains("not a Parquet file"), "the leader must say why it ignored the planted manifest:\n{log}");
    std::fs::remove_file(&evil_path).unwrap();
    for p in planted {
        std::fs::remove_file(p).unwrap();
    }
    // The rest of the archive: now every entry from 0 is there, and payloads go.
    custody_ok(&home, &["export", "--flight", f, "--key", &key, archive.to_str().unwrap()]);
    // Two runs, the second filling the gap before the first: still one chain.
    custody_ok(&home, &["verify", "--key", &key, "--offline", archive.to_str().unwrap()]);
    // Without its first run's manifest (and that run's files), the export does not verify.
    let cut = stack.dir.path().join("archive-cut");
    assert!(Command::new("cp").arg("-r").arg(&archive).arg(&cut).status().unwrap().success());
    std::fs::remove_file(cut.join("manifests").join(manifest.file_name().unwrap())).unwrap();
    for b in m["blocks"].as_array().unwrap() {
        std::fs::remove_file(cut.join(b["file"].as_str().unwrap())).unwrap();
    }
    let out = custody_cmd(&home, None).args(["verify", "--key", &key, "--offline"]).arg(&cut).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("is missing (manifests were removed)"), "{}", String::from_utf8_lossy(&out.stderr));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while ledger_status(f)["pruned_through"].as_u64().unwrap() < size {
        assert!(std::time::Instant::now() < deadline, "not pruned after 20 s: {}", ledger_status(f));
        std::thread::sleep(Duration::from_millis(300));
    }
    let rows = events_json(&home, f, &["--session", &pruned]).unwrap();
    assert!(!rows.is_empty() && rows.iter().all(|r| r["pruned"] == true && r["sql"].is_null() && r["subject"].is_null()), "{rows:?}");
    let out = custody_ok(&home, &["replay", &pruned, "--flight", f]);
    assert!(out.contains("payload pruned from the ledger after export") && !out.contains("prune-me"), "{out}");
    let rows = events_json(&home, f, &["--session", &kept]).unwrap();
    assert!(rows.iter().all(|r| r["pruned"] == false), "a held session was pruned: {rows:?}");
    assert!(rows.iter().any(|r| r["sql"] == "select 'keep-me'"));
    // The prune is recorded, naming the range and the export.
    let prunes = events_json(&home, f, &["--kind", "prune"]).unwrap();
    assert!(prunes.iter().any(|p| p["sql"].as_str().unwrap().contains("exported to file://")), "{prunes:?}");
    // Every proof still holds: the whole log verifies, a pruned entry is proven in the tree,
    // and the archive verifies offline as before.
    let out = custody_ok(&home, &["verify", "--key", &key, "--flight", f]);
    assert!(out.contains("entries verified"), "{out}");
    // So does the independent Python verifier, from the documented pruned-entry layout.
    let report = stack.python("verify_proofs.py", &[f]).unwrap();
    assert!(report.contains("proofs_checked"), "{report}");
    let pruned_index = events_json(&home, f, &["--session", &pruned]).unwrap()[0]["index"].as_u64().unwrap();
    custody_ok(&home, &["proof", "inclusion", &pruned_index.to_string(), "--flight", f]);
    custody_ok(&home, &["events", "--verify", "--key", &key, "--session", &pruned, "--flight", f]);
    custody_ok(&home, &["verify", "--key", &key, "--offline", archive.to_str().unwrap()]);
    // An export elsewhere leaves out the pruned blocks (their payloads are only in the
    // archive), says so, and exports the rest.
    let out = custody_ok(&home, &["export", "--flight", f, "--key", &key, stack.dir.path().join("again").to_str().unwrap()]);
    assert!(out.contains("were pruned from the ledger by its retention policy"), "{out}");

    // After a restart, the node's own self-check accepts the pruned entries.
    let mut stack = stack;
    let ledger = &mut stack.ledger;
    ledger.kill();
    ledger.restart().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = http_get(ledger.http, "/metrics").unwrap_or_default();
        let passed = metrics.lines().any(|l| l.starts_with("custody_ledger_self_checks_passed_total") && !l.ends_with(" 0"));
        assert!(!metrics.lines().any(|l| l.starts_with("custody_ledger_self_checks_failed_total") && !l.ends_with(" 0")), "the self-check failed on pruned entries: {}", http_get(ledger.http, "/readyz").unwrap_or_default());
        if passed && http_get(ledger.http, "/readyz").unwrap_or_default().starts_with("ready") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no passed self-check after restart:\n{metrics}");
        std::thread::sleep(Duration::from_millis(300));
    }
    custody_ok(&home, &["hold", &kept, "--release", "--flight", &ledger.flight()]);
    assert!(custody_ok(&home, &["holds", "--flight", &ledger.flight()]).contains("no legal holds"));
    // Eight holds at once on one session: the log decides, exactly one is placed.
    let fl = ledger.flight();
    let placed: usize = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..8)
            .map(|i| {
                let (fl, kept) = (fl.clone(), kept.clone());
                sc.spawn(move || rt().block_on(custody::query::action(&fl, "legal_hold", &serde_json::json!({"session_id": kept, "reason": format!("request {i}")}))).is_ok())
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap() as usize).sum()
    });
    assert_eq!(placed, 1, "concurrent holds on one session");
    assert_eq!(custody_ok(&home, &["holds", "--flight", &fl]).lines().count(), 1);
}
