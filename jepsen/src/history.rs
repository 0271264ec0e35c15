//! The workload's history: every invocation and its outcome, appended to `history.jsonl` as it
//! happens, and the Append API clients that produce it.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use custody_proto::pb::v1::{event, PgRequest};
use custody_proto::{Event, EventKind, Identity};
use custody_proxy::ledger_client::{LedgerClient, LedgerError};
use prost::Message;
use serde::{Deserialize, Serialize};

/// Unix ns now.
pub fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

/// How an operation ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "outcome")]
pub enum Outcome {
    /// Acknowledged, at this index.
    Ok {
        /// Ledger index reported.
        index: u64,
    },
    /// Definitely not applied (the ledger refused it).
    Failed {
        /// Why.
        reason: String,
    },
    /// May or may not have been applied (timeout, leader change, connection lost).
    Unknown {
        /// Why.
        reason: String,
    },
}

/// One operation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Op {
    /// Unique across the run.
    pub op: String,
    /// Which client ran it (`c3`, `proxy-1`, ...).
    pub client: String,
    /// Session and seq of its event.
    pub session: String,
    /// Its seq.
    pub seq: u64,
    /// When it was invoked.
    pub invoke_ns: i64,
    /// When it completed.
    pub complete_ns: i64,
    /// How.
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// A fault that was injected.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRecord {
    /// Which.
    pub fault: String,
    /// What exactly.
    pub note: String,
    /// Start.
    pub start_ns: i64,
    /// End (healed).
    pub end_ns: i64,
}

/// The history, in memory and on disk.
pub struct History {
    ops: Mutex<Vec<Op>>,
    file: Mutex<std::io::BufWriter<std::fs::File>>,
}

impl History {
    /// A new history written to `path`.
    pub fn create(path: &Path) -> anyhow::Result<Self> {
        Ok(Self { ops: Mutex::default(), file: Mutex::new(std::io::BufWriter::new(std::fs::File::create(path)?)) })
    }

    /// Records a completed operation.
    pub fn record(&self, op: Op) {
        if let Ok(line) = serde_json::to_string(&op) {
            let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
            let _ = writeln!(f, "{line}");
        }
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).push(op);
    }

    /// Every operation so far.
    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Flushes the file.
    pub fn flush(&self) -> anyhow::Result<()> {
        self.file.lock().unwrap_or_else(|p| p.into_inner()).flush()?;
        Ok(())
    }
}

/// The marker the checker looks for in an event's SQL.
pub fn op_sql(op: &str) -> String {
    format!("jepsen op {op}")
}

/// The operation an event carries, if it is one of the workload's.
pub fn op_of(ev: &Event) -> Option<String> {
    match &ev.body {
        Some(event::Body::PgRequest(r)) => r.sql.strip_prefix("jepsen op ").map(str::to_string),
        _ => None,
    }
}

/// One Append API client: appends single events with unique ids as fast as the cluster
/// takes them, until `stop` or `max_ops`.
pub async fn append_client(c: usize, seed: u64, urls: Vec<String>, history: Arc<History>, stop: Arc<AtomicBool>, max_ops: u64) {
    let client = match LedgerClient::new(&urls, Duration::from_secs(3)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("jepsen: client {c}: {e}");
            return;
        }
    };
    let session = format!("jepsen-{seed}-c{c}");
    for seq in 0..max_ops {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let op = format!("c{c}-{seq}");
        let ev = Event {
            proxy_id: "jepsen".into(),
            session_id: session.clone(),
            seq,
            proxy_time_ns: now_ns(),
            kind: EventKind::Request as i32,
            identity: Some(Identity { subject: format!("jepsen-client-{c}"), ..Default::default() }),
            resource: "jepsen".into(),
            body: Some(event::Body::PgRequest(PgRequest { message: "Query".into(), sql: op_sql(&op), ..Default::default() })),
            ..Default::default()
        };
        let bytes = Bytes::from(ev.encode_to_vec());
        let invoke_ns = now_ns();
        let outcome = match client.append(vec![bytes]).await {
            Ok(r) => Outcome::Ok { index: r.first().map(|r| r.index).unwrap_or(u64::MAX) },
            Err(LedgerError::Rejected(m)) => Outcome::Failed { reason: m },
            Err(e) => Outcome::Unknown { reason: e.to_string() },
        };
        let failed = !matches!(outcome, Outcome::Ok { .. });
        history.record(Op { op, client: format!("c{c}"), session: session.clone(), seq, invoke_ns, complete_ns: now_ns(), outcome });
        if failed {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
