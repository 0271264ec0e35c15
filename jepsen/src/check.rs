//! The checker: after the cluster has healed and converged, every node's log is read back over
//! Flight and compared with the history.
//!
//! Anomalies:
//! - an acknowledged operation absent from the log (**lost**), or present twice (**duplicated**);
//! - an operation whose outcome was unknown present more than once;
//! - an operation that definitely failed present at all;
//! - an event in the log that no client ever sent;
//! - indices that are not dense and increasing, or a hash chain that does not verify;
//! - two nodes whose logs are not prefixes of one another (or differ after convergence);
//! - an acknowledged index that is not where the event is stored.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use arrow::array::{Array, AsArray};
use arrow::datatypes::UInt64Type;
use custody_e2e::cluster::LedgerCluster;
use custody_proto::entry::{ChainVerifier, Entry};
use custody_proto::Event;
use prost::Message;
use serde_json::json;

use crate::history::{op_of, FaultRecord, History, Outcome};
use crate::proxy_load::ProxyLoad;
use crate::Args;

/// What the checker found.
pub struct Report {
    /// The run's summary (written to summary.json).
    pub summary: serde_json::Value,
    /// Every anomaly, described.
    pub anomalies: Vec<String>,
}

/// One node's log as read back.
pub struct NodeLog {
    /// Raft id.
    pub id: u64,
    /// Entry hashes, by index.
    pub hashes: Vec<[u8; 32]>,
    /// The events.
    pub events: Vec<Event>,
}

async fn read_log(url: &str) -> anyhow::Result<(Vec<u64>, Vec<Vec<u8>>)> {
    // This node's own copy: after convergence, staleness is not the question.
    let batches = custody::query::fetch(url, &json!({"table": "entries", "max_staleness_ms": 3_600_000})).await?;
    let mut idx = Vec::new();
    let mut entries = Vec::new();
    for b in &batches {
        let i = b.column(0).as_primitive::<UInt64Type>();
        let e = b.column(1).as_binary::<i32>();
        for r in 0..b.num_rows() {
            idx.push(i.value(r));
            entries.push(if e.is_null(r) { Vec::new() } else { e.value(r).to_vec() });
        }
    }
    Ok((idx, entries))
}

/// Reads and checks one node's log.
pub fn node_log(id: u64, indices: &[u64], entries: &[Vec<u8>], anomalies: &mut Vec<String>) -> NodeLog {
    let mut v = ChainVerifier::new();
    let mut hashes = Vec::with_capacity(entries.len());
    let mut events = Vec::with_capacity(entries.len());
    for (pos, (i, e)) in indices.iter().zip(entries).enumerate() {
        if *i != pos as u64 {
            anomalies.push(format!("node {id}: index {pos} holds entry {i}: indices are not dense"));
            break;
        }
        match v.push(e) {
            Ok(h) => hashes.push(h),
            Err(err) => {
                anomalies.push(format!("node {id}: hash chain broken: {err}"));
                break;
            }
        }
        match Entry::decode(e).ok().and_then(|en| Event::decode(en.event).ok()) {
            Some(ev) => events.push(ev),
            None => {
                anomalies.push(format!("node {id}: entry {i} does not decode"));
                break;
            }
        }
    }
    NodeLog { id, hashes, events }
}

/// Runs every check.
pub fn run(cluster: &LedgerCluster, history: &History, faults: &[FaultRecord], rt: &tokio::runtime::Runtime, proxy: Option<&ProxyLoad>, args: &Args) -> anyhow::Result<Report> {
    let mut anomalies = Vec::new();
    let converged = cluster.wait_converged(Duration::from_secs(90));
    if let Err(e) = &converged {
        anomalies.push(format!("the cluster did not converge after healing: {e:#}"));
    }
    let mut logs = Vec::new();
    for (id, n) in &cluster.nodes {
        if n.proc.is_none() {
            continue;
        }
        match rt.block_on(read_log(&n.flight())) {
            Ok((idx, entries)) => logs.push(node_log(*id, &idx, &entries, &mut anomalies)),
            Err(e) => anomalies.push(format!("node {id}: reading its log failed: {e:#}")),
        }
    }
    logs.sort_by_key(|l| std::cmp::Reverse(l.hashes.len()));
    let Some(reference) = logs.first() else {
        anomalies.push("no node's log could be read".into());
        return Ok(Report { summary: json!({"anomalies": anomalies.len()}), anomalies });
    };
    for l in &logs[1..] {
        let n = l.hashes.len();
        if reference.hashes[..n] != l.hashes[..] {
            let at = (0..n).find(|i| reference.hashes[*i] != l.hashes[*i]).unwrap_or(n);
            anomalies.push(format!("node {} and node {} disagree at index {at}: their logs are not prefixes of one another", l.id, reference.id));
        } else if n != reference.hashes.len() && converged.is_ok() {
            anomalies.push(format!("node {} holds {n} entries, node {} holds {}, after convergence", l.id, reference.id, reference.hashes.len()));
        }
    }

    // Where each operation is in the reference log.
    let mut found: HashMap<String, Vec<u64>> = HashMap::new();
    for (i, ev) in reference.events.iter().enumerate() {
        if let Some(op) = op_of(ev) {
            found.entry(op).or_default().push(i as u64);
        }
    }
    // The SQL workload's statements are checked by the proxy check, against Execute events.
    let ops: Vec<crate::history::Op> = history.ops().into_iter().filter(|o| !o.client.starts_with("sql")).collect();
    let mut invoked: HashMap<&str, &crate::history::Op> = HashMap::new();
    let (mut ok, mut failed, mut unknown, mut lost, mut duplicated, mut unknown_in, mut unknown_out) = (0u64, 0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    for op in &ops {
        invoked.insert(op.op.as_str(), op);
        let at = found.get(&op.op).map(Vec::as_slice).unwrap_or(&[]);
        match &op.outcome {
            Outcome::Ok { index } => {
                ok += 1;
                match at.len() {
                    0 => {
                        lost += 1;
                        anomalies.push(format!("LOST: {} ({}) was acknowledged at index {index} but is in no node's log", op.op, op.client));
                    }
                    1 => {
                        if *index != u64::MAX && at[0] != *index {
                            anomalies.push(format!("{} was acknowledged at index {index} but is stored at {}", op.op, at[0]));
                        }
                    }
                    _ => {
                        duplicated += 1;
                        anomalies.push(format!("DUPLICATED: {} is stored at {at:?}", op.op));
                    }
                }
            }
            Outcome::Unknown { .. } => {
                unknown += 1;
                match at.len() {
                    0 => unknown_out += 1,
                    1 => unknown_in += 1,
                    _ => {
                        duplicated += 1;
                        anomalies.push(format!("DUPLICATED: {} (outcome unknown) is stored at {at:?}", op.op));
                    }
                }
            }
            Outcome::Failed { reason } => {
                failed += 1;
                if !at.is_empty() {
                    anomalies.push(format!("{} failed ({reason}) but is stored at {at:?}", op.op));
                }
            }
        }
    }
    for (op, at) in &found {
        if !invoked.contains_key(op.as_str()) {
            anomalies.push(format!("PHANTOM: {op} is stored at {at:?} but was never sent"));
        }
    }

    let proxy_summary = match proxy {
        Some(p) => Some(p.check(&reference.events, &mut anomalies)),
        None => None,
    };

    // The longest stretch without any acknowledgement.
    let mut acks: Vec<i64> = ops.iter().filter(|o| matches!(o.outcome, Outcome::Ok { .. })).map(|o| o.complete_ns).collect();
    acks.sort_unstable();
    let first_invoke = ops.iter().map(|o| o.invoke_ns).min().unwrap_or(0);
    let mut longest = 0i64;
    let mut prev = first_invoke;
    for t in &acks {
        longest = longest.max(t - prev);
        prev = *t;
    }
    let mut by_fault: BTreeMap<&str, u64> = BTreeMap::new();
    for f in faults {
        *by_fault.entry(f.fault.as_str()).or_default() += 1;
    }
    let summary = json!({
        "seed": args.seed,
        "nodes": args.nodes,
        "seconds": args.seconds,
        "clients": args.clients,
        "unsafe_fault": args.unsafe_fault,
        "faults_injected": faults.len(),
        "faults_by_kind": by_fault,
        "faults": faults,
        "operations": {"invoked": ops.len(), "acknowledged": ok, "failed": failed, "unknown": unknown,
                        "unknown_committed": unknown_in, "unknown_not_committed": unknown_out},
        "lost": lost,
        "duplicated": duplicated,
        "longest_unavailability_ms": longest / 1_000_000,
        "ledger_entries": reference.hashes.len(),
        "nodes_checked": logs.iter().map(|l| l.id).collect::<Vec<_>>(),
        "proxy": proxy_summary,
        "anomalies": anomalies.len(),
    });
    Ok(Report { summary, anomalies })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry_chain(n: usize) -> Vec<Vec<u8>> {
        let mut prev = custody_proto::entry::GENESIS;
        (0..n)
            .map(|i| {
                let ev = Event { proxy_id: "p".into(), session_id: "s".into(), seq: i as u64, ..Default::default() };
                let e = Entry::encode(i as u64, 1, &prev, &ev.encode_to_vec());
                prev = custody_proto::entry::entry_hash(&e);
                e
            })
            .collect()
    }

    #[test]
    fn a_gap_or_a_changed_entry_is_an_anomaly() {
        let chain = entry_chain(4);
        let mut a = Vec::new();
        node_log(1, &[0, 1, 2, 3], &chain, &mut a);
        assert!(a.is_empty(), "{a:?}");
        node_log(2, &[0, 1, 3], &[chain[0].clone(), chain[1].clone(), chain[3].clone()], &mut a);
        assert!(a.iter().any(|x| x.contains("not dense")), "{a:?}");
        let mut bad = chain.clone();
        let last = bad[2].len() - 1;
        bad[2][last] ^= 1;
        let mut b = Vec::new();
        node_log(3, &[0, 1, 2, 3], &bad, &mut b);
        assert!(b.iter().any(|x| x.contains("hash chain broken")), "{b:?}");
    }
}
