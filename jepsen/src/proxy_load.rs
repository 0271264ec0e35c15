//! The workload through the proxy: SQL clients run INSERTs through `custody connect`, the real
//! proxy and a real PostgreSQL, against the cluster, while the campaign kills the proxy too.
//!
//! Checked afterwards:
//! - every INSERT the client saw succeed has exactly one Execute request in the ledger;
//! - every row in PostgreSQL has a request in the ledger (nothing ran unrecorded);
//! - every session the proxy opened has a session end in the ledger, with reason
//!   `abandoned` for those that were open when the proxy was killed.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use custody_e2e::cluster::LedgerCluster;
use custody_e2e::{pg_resource, Oidc, Postgres, Proxy, ProxyOptions, Tunnel};
use custody_proto::pb::v1::event;
use custody_proto::{Event, EventKind};

use crate::history::{now_ns, History, Op, Outcome};

const SQL_CLIENTS: usize = 2;

/// The proxy side of the campaign.
pub struct ProxyLoad {
    dir: PathBuf,
    pg: Postgres,
    oidc: Oidc,
    proxy: Proxy,
    tunnel: Arc<std::sync::RwLock<Tunnel>>,
    ledgers: Vec<String>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    kills: u32,
    history: Arc<History>,
}

impl ProxyLoad {
    /// Starts PostgreSQL, the OpenID provider, a proxy in front of every ledger node, a
    /// tunnel, and the SQL clients.
    pub fn start(dir: &Path, cluster: &LedgerCluster, rt: &tokio::runtime::Runtime, history: Arc<History>, stop: Arc<AtomicBool>) -> anyhow::Result<Self> {
        let dir = dir.join("proxy");
        std::fs::create_dir_all(&dir)?;
        let pg = Postgres::start()?;
        pg.direct_sql("create table jepsen_sql(op text primary key)")?;
        let oidc = Oidc::start(&dir)?;
        let ledgers: Vec<String> = cluster.nodes.values().map(|n| n.grpc.to_string()).collect();
        let mut extra = pg_resource("pg", &pg, &dir, None)?;
        extra.push_str("\n[policy.groups]\ndba = [\"pg\"]\n");
        let opts = ProxyOptions {
            issuer: oidc.issuer.clone(),
            audiences: vec!["urn:custody".into()],
            leeway_secs: 5,
            append_timeout_ms: 4000,
            extra: format!("lease_ttl_ms = 3000\n{extra}"),
        };
        let proxy = Proxy::start_with_ledgers(&dir, &ledgers, &opts)?;
        let token = rt.block_on(oidc.client_token("ci-client", "urn:custody"))?;
        let tunnel = Arc::new(std::sync::RwLock::new(Tunnel::start(&dir, &proxy, "pg", &token)?));
        let mut tasks = Vec::new();
        for k in 0..SQL_CLIENTS {
            let h = history.clone();
            let s = stop.clone();
            let t = tunnel.clone();
            tasks.push(rt.spawn(async move { sql_client(k, t, h, s).await }));
        }
        Ok(Self { dir, pg, oidc, proxy, tunnel, ledgers, tasks, kills: 0, history })
    }

    /// SIGKILLs the proxy, waits, and starts it again (same id, a new run) with a new tunnel.
    pub fn kill_and_restart(&mut self) -> anyhow::Result<String> {
        self.proxy.proc.kill();
        self.kills += 1;
        std::thread::sleep(Duration::from_secs(2));
        self.proxy.restart()?;
        let rt = custody_e2e::rt();
        let token = rt.block_on(self.oidc.client_token("ci-client", "urn:custody"))?;
        let t = Tunnel::start(&self.dir, &self.proxy, "pg", &token)?;
        *self.tunnel.write().unwrap_or_else(|p| p.into_inner()) = t;
        Ok("SIGKILL the proxy, restarted it".into())
    }

    /// Waits for the SQL clients to stop, then long enough for every lease to lapse.
    pub fn stop(&mut self, rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
        for t in self.tasks.drain(..) {
            let _ = rt.block_on(t);
        }
        // Let the ledger close what a killed proxy run left open (lease 3 s, checked every 1 s).
        std::thread::sleep(Duration::from_secs(6));
        let _ = &self.ledgers;
        Ok(())
    }

    /// Checks the proxy's record against what the SQL clients saw and what PostgreSQL holds.
    pub fn check(&self, log: &[Event], anomalies: &mut Vec<String>) -> serde_json::Value {
        let mut executes: HashMap<String, u32> = HashMap::new();
        let mut sessions: HashMap<String, (bool, String)> = HashMap::new();
        for ev in log.iter().filter(|e| e.resource == "pg") {
            let ended = sessions.entry(ev.session_id.clone()).or_insert((false, String::new()));
            match &ev.body {
                Some(event::Body::PgRequest(r)) if r.message == "Execute" => {
                    for p in &r.params {
                        if p.text.starts_with("p") && p.text.contains('-') {
                            *executes.entry(p.text.clone()).or_default() += 1;
                        }
                    }
                }
                Some(event::Body::SessionEnd(e)) if ev.kind == EventKind::SessionEnd as i32 => {
                    *ended = (true, e.reason.clone());
                }
                _ => {}
            }
        }
        let ops: Vec<Op> = self.history.ops().into_iter().filter(|o| o.client.starts_with("sql")).collect();
        let (mut ok, mut lost, mut dup) = (0, 0, 0);
        for o in &ops {
            let n = executes.get(&o.op).copied().unwrap_or(0);
            match (&o.outcome, n) {
                (Outcome::Ok { .. }, 0) => {
                    lost += 1;
                    anomalies.push(format!("LOST (proxy): INSERT {} succeeded for the client but is not in the ledger", o.op));
                }
                (Outcome::Ok { .. }, 1) => ok += 1,
                (_, n) if n > 1 => {
                    dup += 1;
                    anomalies.push(format!("DUPLICATED (proxy): INSERT {} is in the ledger {n} times", o.op));
                }
                _ => {}
            }
        }
        let rows = self.pg.direct_sql("select op from jepsen_sql").unwrap_or_default();
        let refused: HashSet<&str> = ops.iter().filter(|o| matches!(o.outcome, Outcome::Failed { .. })).map(|o| o.op.as_str()).collect();
        let mut unrecorded = 0;
        for r in rows.lines().filter(|l| !l.is_empty()) {
            if refused.contains(r) {
                anomalies.push(format!("RAN WHILE REFUSED: INSERT {r} was refused (CU001) but its row is in PostgreSQL"));
            }
            if !executes.contains_key(r) {
                unrecorded += 1;
                anomalies.push(format!("UNRECORDED: row {r} is in PostgreSQL but no request for it is in the ledger"));
            }
        }
        let open: Vec<&String> = sessions.iter().filter(|(_, (ended, _))| !ended).map(|(s, _)| s).collect();
        for s in &open {
            anomalies.push(format!("session {s} has no end in the ledger (its proxy was killed and the lease never closed it)"));
        }
        let abandoned = sessions.values().filter(|(_, r)| r == "abandoned").count();
        let seen: HashSet<&String> = executes.keys().collect();
        serde_json::json!({
            "sql_statements": ops.len(),
            "sql_acknowledged_and_recorded": ok,
            "sql_lost": lost,
            "sql_duplicated": dup,
            "rows_unrecorded": unrecorded,
            "distinct_recorded": seen.len(),
            "sessions": sessions.len(),
            "sessions_abandoned": abandoned,
            "sessions_without_end": open.len(),
            "proxy_kills": self.kills,
        })
    }
}

async fn sql_client(k: usize, tunnel: Arc<std::sync::RwLock<Tunnel>>, history: Arc<History>, stop: Arc<AtomicBool>) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let conninfo = tunnel.read().unwrap_or_else(|p| p.into_inner()).conninfo();
        let Ok(Ok((client, conn))) = tokio::time::timeout(Duration::from_secs(5), tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)).await else {
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        };
        tokio::spawn(async move {
            let _ = conn.await;
        });
        while !stop.load(Ordering::Relaxed) {
            let op = format!("p{k}-{n}");
            n += 1;
            let invoke_ns = now_ns();
            let r = tokio::time::timeout(Duration::from_secs(10), client.execute("insert into jepsen_sql(op) values ($1)", &[&op])).await;
            let (outcome, broken) = match r {
                Ok(Ok(_)) => (Outcome::Ok { index: u64::MAX }, false),
                Ok(Err(e)) if e.code().map(|c| c.code()) == Some("CU001") => (Outcome::Failed { reason: e.to_string() }, false),
                Ok(Err(e)) => (Outcome::Unknown { reason: e.to_string() }, client.is_closed()),
                Err(_) => (Outcome::Unknown { reason: "timeout".into() }, true),
            };
            history.record(Op { op, client: format!("sql{k}"), session: String::new(), seq: n, invoke_ns, complete_ns: now_ns(), outcome });
            if broken {
                break;
            }
        }
    }
}
