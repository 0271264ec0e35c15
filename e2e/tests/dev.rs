//! The README's first command: `custody dev` brings up the whole system on loopback, and a
//! new user connects, runs SQL and reads the record with nothing else set up.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use custody_e2e::*;

/// One test, run in sequence: `custody dev` prefers fixed ports (7400, 7443, ...), so two of
/// them started at once by parallel tests would race for the same ones.
#[test]
fn custody_dev_runs_the_main_job_on_one_node_and_on_a_three_node_cluster_and_stops_on_ctrl_c() {
    main_job(1);
    main_job(3);
}

fn main_job(nodes: u64) {
    let scratch = tempfile::Builder::new().prefix("custody-dev-e2e-").tempdir().unwrap();
    // PostgreSQL runs as an unprivileged user when the test runs as root: it must reach here.
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let home = scratch.path().join("home");
    let data = scratch.path().join("state");
    let mut dev = Command::new(bin("custody"))
        .args(["dev", "--nodes", &nodes.to_string(), "--data-dir"])
        .arg(&data)
        .env("CUSTODY_HOME", &home)
        .env("TMPDIR", scratch.path())
        .env_remove("CUSTODY_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = dev.id();
    // If the test fails, custody dev and everything it started still stop.
    struct StopOnDrop(u32);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            let _ = Command::new("kill").args(["-INT", &self.0.to_string()]).status();
        }
    }
    let _stop = StopOnDrop(pid);
    let mut printed = String::new();
    {
        let mut r = BufReader::new(dev.stdout.take().unwrap());
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut line = String::new();
        while !printed.contains("Press Ctrl-C to stop.") {
            line.clear();
            assert!(r.read_line(&mut line).unwrap() > 0, "custody dev exited early; it printed:\n{printed}");
            printed.push_str(&line);
            assert!(Instant::now() < deadline, "custody dev did not come up:\n{printed}");
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in r.lines() {});
    }
    for needle in ["proxy (QUIC)", "grpc://127.0.0.1:", "DEVELOPMENT ONLY", "[dev-only]", "registered as resource demo-pg", "custody connect demo-pg --port 5433"] {
        assert!(printed.contains(needle), "custody dev should print {needle:?}:\n{printed}");
    }
    if nodes > 1 {
        assert!(printed.contains(&format!("{nodes} Raft nodes")), "{printed}");
        let endpoint = printed.split("--endpoint ").nth(1).and_then(|r| r.split_whitespace().next()).unwrap().to_string();
        let out = Command::new(bin("custody-ledger")).args(["status", "--json", "--endpoint", &endpoint]).output().unwrap();
        let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(st["members"].as_array().unwrap().len(), nodes as usize, "{st}");
        assert!(st["leader_id"].as_u64().unwrap() > 0, "{st}");
    }
    let cache = home.join("token.json");
    assert_eq!(std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777, 0o600, "token cached 0600");
    let flight = printed.split_whitespace().find(|w| w.starts_with("grpc://")).unwrap().to_string();

    // Second shell: connect with only what custody dev wrote, and run SQL with no password.
    let port = free_port();
    let mut connect = Command::new(bin("custody"))
        .args(["connect", "demo-pg", "--port", &port.to_string()])
        .env("CUSTODY_HOME", &home)
        .env_remove("CUSTODY_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _stop_connect = StopOnDrop(connect.id());
    let mut first = String::new();
    let mut r = BufReader::new(connect.stdout.take().unwrap());
    r.read_line(&mut first).unwrap();
    assert_eq!(first.trim(), format!("listening on 127.0.0.1:{port}"));
    std::thread::spawn(move || for _ in r.lines() {});
    let out = Command::new("psql")
        .args(["-X", "-At", "-h", "127.0.0.1", "-p", &port.to_string(), "-U", "anyone", "postgres", "-c", "select 'through custody dev'"])
        .env_remove("PGPASSWORD")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "through custody dev");

    let rows = events_json(&home, &flight, &["--since", "10m", "--resource", "demo-pg"]).unwrap();
    let req = rows.iter().find(|r| r["sql"] == "select 'through custody dev'").expect("the statement is on the record");
    let user = std::env::var("USER").ok().filter(|u| !u.is_empty()).unwrap_or_else(|| "developer".into());
    assert_eq!(req["subject"], user.as_str());
    // The dev ledger serves the audit log to the dev group's tokens only, and records each read.
    let stranger = tempfile::tempdir().unwrap();
    let out = Command::new(bin("custody")).args(["events", "--flight", &flight]).env("CUSTODY_HOME", stranger.path()).env_remove("CUSTODY_TOKEN").output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("needs a bearer token"), "{}", String::from_utf8_lossy(&out.stderr));
    let reads = events_json(&home, &flight, &["--kind", "audit_query"]).unwrap();
    assert!(reads.iter().any(|r| r["subject"] == user.as_str() && r["sql"].as_str().unwrap_or("").contains("demo-pg")), "{reads:?}");

    // custody dev pinned every ledger node's checkpoint key: verify checks the cosigned head.
    let out = Command::new(bin("custody")).args(["verify"]).env("CUSTODY_HOME", &home).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("signed checkpoint at size"), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(bin("custody")).args(["checkpoint"]).env("CUSTODY_HOME", &home).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.contains(&format!("by {nodes} of {nodes} pinned keys")), "one key pinned and one signature per node: {stderr}");

    // Ctrl-C stops the tunnel, then custody dev and every child it started.
    Command::new("kill").args(["-INT", &connect.id().to_string()]).status().unwrap();
    assert!(wait_exit(&mut connect, Duration::from_secs(10)).is_some_and(|s| s.success()), "custody connect stops cleanly on Ctrl-C");
    let children = child_pids(pid);
    assert!(children.len() as u64 >= 2 + nodes, "ledger nodes, postgres and proxy run as children: {children:?}");
    Command::new("kill").args(["-INT", &pid.to_string()]).status().unwrap();
    assert!(wait_exit(&mut dev, Duration::from_secs(30)).is_some(), "custody dev stops on Ctrl-C");
    std::thread::sleep(Duration::from_millis(200));
    for c in children {
        assert!(!std::path::Path::new(&format!("/proc/{c}")).exists() || is_zombie(c), "child {c} still runs after custody dev stopped");
    }
}

fn wait_exit(c: &mut std::process::Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(s)) = c.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = c.kill();
    None
}

fn child_pids(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // pid (comm) state ppid ...
            let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            if after.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(parent) {
                out.push(pid);
            }
        }
    }
    out
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| s.rsplit_once(')').map(|(_, r)| r.trim_start().starts_with('Z')).unwrap_or(false)).unwrap_or(true)
}
