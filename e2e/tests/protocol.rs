//! PostgreSQL protocol behaviours real clients depend on, through the tunnel, and how each
//! is recorded.

use std::time::{Duration, Instant};

use custody_e2e::raw::{self, RawPg};
use custody_e2e::*;
use futures::StreamExt;
use tokio_postgres::{AsyncMessage, NoTls};

fn events(stack: &Stack) -> Vec<serde_json::Value> {
    events_json(&stack.dir.path().join("home"), &stack.ledger.flight(), &["--resource", "pg"]).unwrap()
}

/// Connects tokio-postgres through the tunnel; async messages go to the returned channel.
async fn connect(t: &Tunnel) -> (tokio_postgres::Client, tokio::sync::mpsc::UnboundedReceiver<AsyncMessage>) {
    let (client, mut conn) = tokio_postgres::connect(&t.conninfo(), NoTls).await.expect("connect through tunnel");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut s = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = s.next().await {
            match m {
                Ok(m) => {
                    let _ = tx.send(m);
                }
                Err(_) => break,
            }
        }
    });
    (client, rx)
}

#[test]
fn extended_protocol_flush_pipelining_errors_and_statement_binding() {
    let stack = Stack::start().unwrap();
    let t = stack.tunnel("pg", &rt().block_on(stack.token()));
    let mut c = RawPg::connect(t.port).unwrap();

    // Flush without Sync must be answered at once.
    let mut b = raw::parse("", "select 41 + 1");
    b.extend(raw::bind("", "", &[]));
    b.extend(raw::execute(""));
    b.extend(raw::flush());
    c.send(&b).unwrap();
    let frames = c.until(|f| f.tag() == b'C').unwrap();
    assert_eq!(raw::tags(&frames), "12DC");
    c.send(&raw::sync()).unwrap();
    assert_eq!(raw::tags(&c.until(|f| f.tag() == b'Z').unwrap()), "Z");

    // An error mid-pipeline: the rest is skipped until Sync.
    let mut b = raw::parse("", "selec 1");
    b.extend(raw::bind("", "", &[]));
    b.extend(raw::execute(""));
    b.extend(raw::parse("", "select 'after'"));
    b.extend(raw::bind("", "", &[]));
    b.extend(raw::execute(""));
    b.extend(raw::sync());
    c.send(&b).unwrap();
    let frames = c.until(|f| f.tag() == b'Z').unwrap();
    assert_eq!(raw::tags(&frames), "EZ");
    assert_eq!(raw::error_of(&frames[0]).unwrap().1, "42601");

    // A named statement that failed to parse is not bound to its SQL.
    let mut b = raw::parse("s1", "selec 2");
    b.extend(raw::sync());
    b.extend(raw::bind("", "s1", &[]));
    b.extend(raw::execute(""));
    b.extend(raw::sync());
    c.send(&b).unwrap();
    let frames = c.until(|f| f.tag() == b'Z').unwrap();
    assert_eq!(raw::tags(&frames), "EZ");
    let frames = c.until(|f| f.tag() == b'Z').unwrap();
    assert_eq!(raw::tags(&frames), "EZ");
    assert_eq!(raw::error_of(&frames[0]).unwrap().1, "26000", "prepared statement does not exist");

    // Many statements pipelined before one Sync, with parameters.
    let mut b = raw::parse("p", "select $1::int * 2");
    for i in 0..20 {
        b.extend(raw::bind("", "p", &[&i.to_string()]));
        b.extend(raw::execute(""));
    }
    b.extend(raw::sync());
    c.send(&b).unwrap();
    let frames = c.until(|f| f.tag() == b'Z').unwrap();
    assert_eq!(raw::tags(&frames), format!("1{}Z", "2DC".repeat(20)));
    c.send(&raw::msg(b'X', b"")).unwrap();
    assert!(c.next().unwrap().is_none(), "Terminate closes the stream");

    std::thread::sleep(Duration::from_millis(300));
    let ev = events(&stack);
    let executes: Vec<&serde_json::Value> = ev.iter().filter(|e| e["message"] == "Execute").collect();
    let outcome_of = |seq: u64| {
        ev.iter()
            .find(|e| e["kind"] == "response" && e["in_reply_to"] == seq && e["session_id"] == executes[0]["session_id"])
            .map(|e| e["outcome"].as_str().unwrap().to_string())
    };
    // flush query, skipped pair, unknown statement, 20 pipelined
    assert_eq!(executes.len(), 1 + 2 + 1 + 20);
    assert_eq!(executes[0]["sql"], "select 41 + 1");
    assert_eq!(outcome_of(executes[0]["seq"].as_u64().unwrap()).as_deref(), Some("ok"));
    assert_eq!(outcome_of(executes[1]["seq"].as_u64().unwrap()).as_deref(), Some("skipped"));
    assert_eq!(outcome_of(executes[2]["seq"].as_u64().unwrap()).as_deref(), Some("skipped"));
    assert!(executes[3]["sql"].is_null(), "s1 never parsed, so Execute is not attributed to 'selec 2': {}", executes[3]);
    for (i, e) in executes[4..].iter().enumerate() {
        assert_eq!(e["sql"], "select $1::int * 2");
        assert_eq!(e["params"], serde_json::json!([i.to_string()]));
    }
    let end = ev.iter().rev().find(|e| e["kind"] == "session_end").unwrap();
    assert_eq!(end["reason"], "terminate");
}

#[test]
fn driver_binary_params_notify_notice_parameter_status_and_cancel() {
    let stack = Stack::start().unwrap();
    let t = stack.tunnel("pg", &rt().block_on(stack.token()));
    let pg_port = stack.pg.port;
    let pg_pw = stack.pg.password.clone();
    rt().block_on(async {
        let (client, mut msgs) = connect(&t).await;
        // Binary parameters through a prepared statement (tokio-postgres sends binary).
        let st = client.prepare("select $1::int4 + 1, $2::int8, $3::text, $4::bool, $5::float8").await.unwrap();
        let row = client.query_one(&st, &[&41i32, &-7i64, &"héllo", &true, &2.5f64]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), 42);
        assert_eq!(row.get::<_, String>(2), "héllo");
        // Pipelined queries (tokio-postgres pipelines concurrent requests).
        let futs = (0..10).map(|i| {
            let client = &client;
            async move { client.query_one("select $1::int4", &[&i]).await.unwrap().get::<_, i32>(0) }
        });
        let got: Vec<i32> = futures::future::join_all(futs).await;
        assert_eq!(got, (0..10).collect::<Vec<_>>());

        // ParameterStatus reaches the client: TimeZone changes are seen.
        client.batch_execute("SET TimeZone = 'Asia/Tokyo'").await.unwrap();
        let tz: String = client.query_one("SHOW TimeZone", &[]).await.unwrap().get(0);
        assert_eq!(tz, "Asia/Tokyo");

        // NoticeResponse and NOTIFY reach the client, the latter while it is idle.
        client.batch_execute("DO $$ BEGIN RAISE NOTICE 'custody-notice'; END $$").await.unwrap();
        client.batch_execute("LISTEN custody_channel").await.unwrap();
        let notify = std::process::Command::new("psql")
            .args(["-X", "-h", "127.0.0.1", "-p", &pg_port.to_string(), "-U", "custody_gateway", "-d", "postgres", "-c", "NOTIFY custody_channel, 'hello'"])
            .env("PGPASSWORD", &pg_pw)
            .output()
            .unwrap();
        assert!(notify.status.success());
        let deadline = Instant::now() + Duration::from_secs(10);
        let (mut saw_notice, mut saw_notify) = (false, false);
        while !(saw_notice && saw_notify) && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(1), msgs.recv()).await {
                Ok(Some(AsyncMessage::Notice(n))) if n.message() == "custody-notice" => saw_notice = true,
                Ok(Some(AsyncMessage::Notification(n))) => {
                    assert_eq!((n.channel(), n.payload()), ("custody_channel", "hello"));
                    saw_notify = true;
                }
                _ => {}
            }
        }
        assert!(saw_notice, "notice not delivered");
        assert!(saw_notify, "notification not delivered to the idle client");

        // CancelRequest reaches the right backend, through a new tunnel connection.
        let token = client.cancel_token();
        let sleeper = tokio::spawn(async move {
            let r = client.query_one("select pg_sleep(30)", &[]).await;
            (r, client)
        });
        tokio::time::sleep(Duration::from_millis(700)).await;
        let t0 = Instant::now();
        token.cancel_query(NoTls).await.expect("cancel request sent");
        let (r, _client) = sleeper.await.unwrap();
        let err = r.expect_err("the query was cancelled");
        assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::QUERY_CANCELED), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(10));
    });
    std::thread::sleep(Duration::from_millis(300));
    let ev = events(&stack);
    let bound = ev.iter().find(|e| e["message"] == "Execute" && e["sql"] == "select $1::int4 + 1, $2::int8, $3::text, $4::bool, $5::float8").expect("execute recorded");
    assert_eq!(bound["params"], serde_json::json!(["41", "-7", "héllo", "t", "2.5"]));
    let cancel = ev.iter().find(|e| e["message"] == "CancelRequest").expect("cancel recorded");
    let sleeper_session = ev.iter().find(|e| e["sql"] == "select pg_sleep(30)").unwrap()["session_id"].clone();
    assert_ne!(cancel["session_id"], sleeper_session, "the cancel arrives on its own stream");
    let note = ev.iter().find(|e| e["outcome"] == "notification").expect("notification recorded");
    assert_eq!(note["kind"], "response");
}

#[test]
fn copy_both_directions_backend_death_and_large_values() {
    let stack = Stack::start().unwrap();
    let t = stack.tunnel("pg", &rt().block_on(stack.token()));
    stack.pg.direct_sql("create table ct(id int, v text)").unwrap();
    // COPY FROM STDIN and TO STDOUT through psql.
    let mut child = std::process::Command::new("psql")
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", &t.port.to_string(), "-U", "x", "-d", "postgres", "-c", "\\copy ct from stdin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"1\tone\n2\ttwo\n3\tthree\n").unwrap();
    assert!(child.wait().unwrap().success());
    let out = t.psql(&["-At", "-c", "\\copy ct to stdout"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1\tone\n2\ttwo\n3\tthree\n");
    assert_eq!(stack.pg.direct_sql("select count(*) from ct").unwrap(), "3");

    // A backend that dies mid-query: one FATAL, then EOF.
    let mut c = RawPg::connect(t.port).unwrap();
    c.send(&raw::query("select pg_sleep(60) /* doomed */")).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    stack.pg.direct_sql("select pg_terminate_backend(pid) from pg_stat_activity where query like '%doomed%' and pid <> pg_backend_pid()").unwrap();
    let mut fatals = 0;
    while let Some(f) = c.next().unwrap() {
        if let Some((sev, code, _)) = raw::error_of(&f) {
            assert_eq!(sev, "FATAL");
            assert_eq!(code, "57P01");
            fatals += 1;
        }
    }
    assert_eq!(fatals, 1, "exactly one FATAL before EOF");

    // Large values: a 24 MiB parameter and a 24 MiB result, recorded up to the limit.
    rt().block_on(async {
        let (client, _m) = connect(&t).await;
        let big = "x".repeat(24 << 20);
        client.execute("create table big(v text)", &[]).await.unwrap();
        client.execute("insert into big values ($1)", &[&big]).await.unwrap();
        let n: i32 = client.query_one("select length(v) from big", &[]).await.unwrap().get(0);
        assert_eq!(n, 24 << 20);
        let back: String = client.query_one("select v from big", &[]).await.unwrap().get(0);
        assert_eq!(back.len(), 24 << 20);
    });
    std::thread::sleep(Duration::from_millis(300));
    let ev = events(&stack);
    let copy_in = ev.iter().find(|e| e["message"] == "CopyData").expect("CopyData recorded");
    assert_eq!(copy_in["kind"], "request");
    let tags: Vec<&str> = ev.iter().filter_map(|e| e["command_tag"].as_str()).collect();
    assert_eq!(tags.iter().filter(|t| **t == "COPY 3").count(), 2, "{tags:?}");
    let ins = ev.iter().find(|e| e["message"] == "Execute" && e["sql"] == "insert into big values ($1)").unwrap();
    let p = ins["params"][0].as_str().unwrap();
    assert!(p.len() < 70_000 && p.contains("(+"), "the parameter is cut at the limit and the cut recorded: {}", &p[p.len() - 30..]);
    let sel = ev.iter().filter(|e| e["command_tag"] == "SELECT 1").find(|e| e["rows_truncated"] == 1).expect("large row counted as truncated");
    assert!(sel["bytes_truncated"].as_u64().unwrap() > 24 << 20);
    let end = ev.iter().find(|e| e["kind"] == "session_end" && e["reason"].as_str().unwrap_or("").starts_with("target_eof")).expect("backend death recorded");
    assert_eq!(end["kind"], "session_end");
}

/// Peak resident memory of a process, from /proc.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap()
}

#[test]
fn a_result_of_hundreds_of_megabytes_streams_through_the_proxy() {
    let stack = Stack::start().unwrap();
    let t = stack.tunnel("pg", &rt().block_on(stack.token()));
    let pid = stack.proxy.proc.child.id();
    let before = peak_rss_kib(pid);
    // One 300 MiB row: a proxy that held whole messages would grow by at least that much.
    let size: u64 = 300 << 20;
    let out = std::process::Command::new("psql")
        .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", &t.port.to_string(), "-U", "x", "-d", "postgres"])
        .args(["-c", &format!("select md5(v), v from (select repeat('y', {size}) as v) s")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Unaligned output: md5|value; the value arrived whole.
    let text = out.stdout;
    assert_eq!(text.len() as u64, 32 + 1 + size + 1, "the whole value reached psql");
    assert!(text[33..33 + 16].iter().all(|b| *b == b'y'));
    let grew_mib = peak_rss_kib(pid).saturating_sub(before) / 1024;
    assert!(grew_mib < 100, "the proxy's peak memory grew by {grew_mib} MiB for a 300 MiB row: it buffered the message");

    std::thread::sleep(Duration::from_millis(300));
    let ev = events(&stack);
    let resp = ev
        .iter()
        .find(|e| e["kind"] == "response" && e["command_tag"] == "SELECT 1" && e["rows_truncated"] == 1)
        .expect("the streamed row is recorded as counted and truncated");
    assert_eq!(resp["rows"], 1);
    assert!(resp["bytes_truncated"].as_u64().unwrap() > size);
    // The session goes on normally after the streamed message.
    let out = t.psql(&["-At", "-c", "select 41 + 1"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
}
