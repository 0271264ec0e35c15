//! `custody-jepsen`: a fault-injection campaign against a real ledger cluster, with a checker
//! that proves no acknowledged event was lost or duplicated.
//!
//! One run:
//! 1. starts a 3- or 5-node cluster of the real `custody-ledger` binary, each node a separate
//!    process, with a relay on every peer link that the harness can cut;
//! 2. drives a bounded, concurrent workload of appends through the real Append API (the
//!    proxy's own ledger client: leader discovery, retries with the same bytes), and, with
//!    `--proxy`, SQL through the real proxy and tunnel to a real PostgreSQL;
//! 3. injects faults on a schedule drawn from `--seed`: SIGKILL of the leader and of
//!    followers with restarts, SIGSTOP/SIGCONT, majority/minority and bridge partitions,
//!    membership changes under load, and (with `--proxy`) SIGKILL of the proxy;
//! 4. records every invocation and its outcome (ok, failed, unknown) in `history.jsonl`;
//! 5. heals everything, waits for the nodes to converge, reads every node's log over Flight,
//!    and checks it (see [`check`]); writes `summary.json`; exits non-zero on any anomaly.

mod check;
mod history;
mod proxy_load;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use custody_e2e::cluster::{ClusterOptions, LedgerCluster};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::history::{now_ns, FaultRecord, History};

/// The faults a campaign can inject.
const ALL_FAULTS: [&str; 7] = ["kill-leader", "kill-follower", "pause", "partition-minority", "partition-leader", "bridge", "membership"];

#[derive(Parser, Debug, Clone)]
#[command(name = "custody-jepsen", about = "Fault-injection campaign against a custody ledger cluster")]
pub struct Args {
    /// Cluster size (3 or 5).
    #[arg(long, default_value_t = 3)]
    pub nodes: u64,
    /// Length of the faulty phase, in seconds.
    #[arg(long, default_value_t = 150)]
    pub seconds: u64,
    /// Seed for the fault schedule and the workload.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Concurrent Append API clients.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Most operations per client (the workload is bounded either way).
    #[arg(long, default_value_t = 100_000)]
    pub max_ops: u64,
    /// Faults to draw from (comma-separated); default all.
    #[arg(long, value_delimiter = ',')]
    pub faults: Vec<String>,
    /// Seconds between the start of one fault and the next.
    #[arg(long, default_value_t = 10)]
    pub fault_every: u64,
    /// Testing the checker: make every node lie (`drop-acked-writes`, `ack-before-commit`).
    #[arg(long, default_value = "none")]
    pub unsafe_fault: String,
    /// Also run SQL through the real proxy (needs PostgreSQL and the e2e OpenID provider).
    #[arg(long)]
    pub proxy: bool,
    /// Output directory for history.jsonl, summary.json and node logs.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.nodes == 3 || args.nodes == 5, "--nodes must be 3 or 5");
    let faults: Vec<String> = if args.faults.is_empty() { ALL_FAULTS.iter().map(|s| s.to_string()).collect() } else { args.faults.clone() };
    for f in &faults {
        anyhow::ensure!(ALL_FAULTS.contains(&f.as_str()) || f == "kill-proxy" || f == "none", "unknown fault {f:?}; choose from {ALL_FAULTS:?}, kill-proxy, none");
    }
    let out = match &args.out {
        Some(p) => p.clone(),
        None => std::env::temp_dir().join(format!("custody-jepsen-{}-{}", args.seed, std::process::id())),
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    eprintln!("jepsen: seed {} nodes {} seconds {} clients {}; output in {}", args.seed, args.nodes, args.seconds, args.clients, out.display());

    let spare_ids = 6;
    let mut cluster = LedgerCluster::start(
        &out,
        args.nodes,
        ClusterOptions {
            relays: true,
            max_id: args.nodes + spare_ids,
            unsafe_fault: args.unsafe_fault.clone(),
            // Small, so that snapshots and log compaction happen during the campaign and
            // re-added nodes catch up from a snapshot.
            snapshot_interval: 2_000,
            log_retain: 500,
            extra: String::new(),
        },
    )?;
    let history = Arc::new(History::create(&out.join("history.jsonl"))?);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));

    // The workload, on the runtime.
    let urls = cluster.urls();
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let h = history.clone();
        let s = stop.clone();
        let urls = urls.clone();
        let seed = args.seed;
        let max_ops = args.max_ops;
        tasks.push(rt.spawn(async move { history::append_client(c, seed, urls, h, s, max_ops).await }));
    }
    let proxy = if args.proxy {
        Some(proxy_load::ProxyLoad::start(&out, &cluster, &rt, history.clone(), stop.clone())?)
    } else {
        None
    };
    let mut proxy = proxy;

    // The fault schedule.
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut next_id = args.nodes + 1;
    let start = Instant::now();
    let mut faults_done: Vec<FaultRecord> = Vec::new();
    std::thread::sleep(Duration::from_secs(3));
    while start.elapsed() < Duration::from_secs(args.seconds) {
        let mut choices = faults.clone();
        if proxy.is_some() && !choices.iter().any(|c| c == "kill-proxy") {
            choices.push("kill-proxy".into());
        }
        let fault = choices[rng.gen_range(0..choices.len())].clone();
        let began = now_ns();
        let note = inject(&fault, &mut cluster, &mut rng, &mut next_id, proxy.as_mut(), args.nodes + spare_ids)
            .unwrap_or_else(|e| format!("fault failed to inject: {e:#}"));
        eprintln!("jepsen: t+{:>3}s {fault}: {note}", start.elapsed().as_secs());
        faults_done.push(FaultRecord { fault, note, start_ns: began, end_ns: now_ns() });
        let rest = Duration::from_secs(args.fault_every).saturating_sub(Duration::from_nanos((now_ns() - began).max(0) as u64));
        std::thread::sleep(rest.min(Duration::from_secs(args.seconds).saturating_sub(start.elapsed())));
    }

    // Heal, then let the workload run a little on a healthy cluster before stopping it.
    eprintln!("jepsen: healing");
    heal(&mut cluster)?;
    std::thread::sleep(Duration::from_secs(5));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        let _ = rt.block_on(t);
    }
    if let Some(p) = proxy.as_mut() {
        p.stop(&rt)?;
    }
    history.flush()?;
    let report = check::run(&cluster, &history, &faults_done, &rt, proxy.as_ref(), &args)?;
    let summary = serde_json::to_string_pretty(&report.summary)?;
    std::fs::write(out.join("summary.json"), &summary)?;
    println!("{summary}");
    // Stop every process before exiting: `exit` would skip their kill-on-drop.
    drop(proxy);
    drop(cluster);
    if report.anomalies.is_empty() {
        eprintln!("jepsen: OK: no anomaly");
        Ok(())
    } else {
        eprintln!("jepsen: {} ANOMALIES:", report.anomalies.len());
        for a in report.anomalies.iter().take(50) {
            eprintln!("  - {a}");
        }
        std::process::exit(1);
    }
}

/// Injects one fault and undoes it before returning (faults overlap the workload, not each
/// other). Returns what was done.
fn inject(fault: &str, c: &mut LedgerCluster, rng: &mut StdRng, next_id: &mut u64, proxy: Option<&mut proxy_load::ProxyLoad>, max_id: u64) -> anyhow::Result<String> {
    let leader = c.wait_leader(Duration::from_secs(15)).ok();
    let running = c.running();
    let followers: Vec<u64> = running.iter().copied().filter(|id| Some(*id) != leader).collect();
    let pick = |rng: &mut StdRng, v: &[u64]| -> Option<u64> { (!v.is_empty()).then(|| v[rng.gen_range(0..v.len())]) };
    let hold = |rng: &mut StdRng| Duration::from_millis(rng.gen_range(2_000..5_000));
    match fault {
        "kill-leader" | "kill-follower" => {
            let victim = if fault == "kill-leader" { leader } else { pick(rng, &followers) };
            let Some(v) = victim else { return Ok("no victim".into()) };
            c.kill(v);
            std::thread::sleep(hold(rng));
            c.restart(v)?;
            Ok(format!("SIGKILL node {v}, restarted"))
        }
        "pause" => {
            let Some(v) = pick(rng, &running) else { return Ok("no victim".into()) };
            c.signal(v, "STOP");
            std::thread::sleep(hold(rng));
            c.signal(v, "CONT");
            Ok(format!("SIGSTOP node {v}, SIGCONT"))
        }
        "partition-minority" | "partition-leader" => {
            let size = if running.len() >= 5 { 2 } else { 1 };
            let mut group: Vec<u64> = Vec::new();
            if fault == "partition-leader" {
                group.extend(leader);
            }
            let mut pool: Vec<u64> = running.iter().copied().filter(|id| !group.contains(id)).collect();
            while group.len() < size && !pool.is_empty() {
                group.push(pool.remove(rng.gen_range(0..pool.len())));
            }
            c.partition(&group);
            std::thread::sleep(hold(rng) + Duration::from_secs(2));
            c.heal();
            Ok(format!("isolated {group:?} from the rest, healed"))
        }
        "bridge" => {
            // Two sides that cannot see each other, and one node that sees both.
            let mut nodes = running.clone();
            if nodes.len() < 3 {
                return Ok("too few nodes".into());
            }
            let bridge = nodes.remove(rng.gen_range(0..nodes.len()));
            let half = nodes.len() / 2;
            let (a, b) = nodes.split_at(half);
            for x in a {
                for y in b {
                    c.cut(*x, *y);
                }
            }
            std::thread::sleep(hold(rng) + Duration::from_secs(2));
            c.heal();
            Ok(format!("bridge through {bridge}: {a:?} cut from {b:?}, healed"))
        }
        "membership" => {
            // Replace a follower by a new node (ids are never reused), keeping the size.
            if *next_id > max_id {
                return Ok("no spare ids left".into());
            }
            let Some(v) = pick(rng, &followers) else { return Ok("no follower".into()) };
            c.remove_node(v)?;
            std::thread::sleep(Duration::from_millis(500));
            c.kill(v);
            c.nodes.remove(&v);
            let id = *next_id;
            *next_id += 1;
            c.add_node(id)?;
            Ok(format!("removed node {v}, added node {id}"))
        }
        "kill-proxy" => match proxy {
            Some(p) => p.kill_and_restart(),
            None => Ok("no proxy".into()),
        },
        "none" => {
            std::thread::sleep(Duration::from_secs(3));
            Ok("nothing".into())
        }
        other => anyhow::bail!("unknown fault {other}"),
    }
}

/// Restarts what is down and heals every link.
fn heal(c: &mut LedgerCluster) -> anyhow::Result<()> {
    c.heal();
    let ids: Vec<u64> = c.nodes.keys().copied().collect();
    // A node that stopped by itself (not killed by a fault) is a finding, not something to
    // restart and forget.
    for id in &ids {
        if let Some(p) = c.nodes.get_mut(id).and_then(|n| n.proc.as_mut()) {
            if let Ok(Some(status)) = p.child.try_wait() {
                let log = std::fs::read_to_string(&p.log).unwrap_or_default();
                let last: Vec<&str> = log.lines().filter(|l| l.contains("ERROR") || l.starts_with("Error")).collect();
                anyhow::bail!("ledger node {id} stopped by itself during the campaign ({status}); its last errors:\n{}", last.join("\n"));
            }
        }
    }
    for id in ids {
        c.signal(id, "CONT");
        if c.nodes[&id].proc.is_none() {
            c.restart(id)?;
        }
    }
    c.wait_leader(Duration::from_secs(30))?;
    Ok(())
}
