//! `custody-bench ledger`: appends to a 3-node custody ledger cluster against puts to a 3-node
//! etcd 3.4 cluster (Debian's `etcd-server`), side by side in one run, at the same client
//! concurrency, payload size and durability (both fsync their Raft log before answering;
//! both use mutual TLS between peers; clients talk plain gRPC to the leader).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use custody_e2e::cluster::{ClusterOptions, LedgerCluster};
use custody_e2e::{free_port, http_get, wait_tcp, Proc};
use custody_proto::pb::v1::{event, PgRequest};
use custody_proto::{Event, EventKind};
use custody_proxy::ledger_client::LedgerClient;
use prost::Message;

use crate::{machine, results_file, write_section};

mod etcdpb {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.rs"));
}

/// Options for the ledger benchmark.
#[derive(clap::Args)]
pub struct Args {
    /// Concurrent clients, each run against both clusters.
    #[arg(long, value_delimiter = ',', default_value = "16,64")]
    clients: Vec<usize>,
    /// Seconds per run.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// Bytes per event (custody: the encoded event; etcd: the value).
    #[arg(long, default_value_t = 512)]
    event_bytes: usize,
    /// Print without writing bench/RESULTS.md.
    #[arg(long)]
    no_write: bool,
}

struct Stats {
    ops: u64,
    errors: u64,
    secs: f64,
    lat_us: Vec<u64>,
}

impl Stats {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.secs
    }
    fn pct(&self, p: f64) -> f64 {
        if self.lat_us.is_empty() {
            return f64::NAN;
        }
        self.lat_us[((self.lat_us.len() as f64 - 1.0) * p).round() as usize] as f64 / 1000.0
    }
}

/// Runs `clients` loops of `op` for `secs`; each loop waits for its op before the next.
fn load<F, Fut>(rt: &tokio::runtime::Runtime, clients: usize, secs: u64, op: F) -> Stats
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let op = op.clone();
            rt.spawn(async move {
                let (mut ok, mut err, mut lat) = (0u64, 0u64, Vec::new());
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    if op(c, n).await {
                        ok += 1;
                        lat.push(t.elapsed().as_micros() as u64);
                    } else {
                        err += 1;
                    }
                    n += 1;
                }
                (ok, err, lat)
            })
        })
        .collect();
    let mut s = Stats { ops: 0, errors: 0, secs: 0.0, lat_us: Vec::new() };
    for t in tasks {
        if let Ok((ok, err, lat)) = rt.block_on(t) {
            s.ops += ok;
            s.errors += err;
            s.lat_us.extend(lat);
        }
    }
    s.secs = start.elapsed().as_secs_f64();
    s.lat_us.sort_unstable();
    s
}

fn custody_event(c: usize, n: u64, size: usize) -> Bytes {
    let mut ev = Event {
        proxy_id: "bench".into(),
        session_id: format!("bench-{c}"),
        seq: n,
        kind: EventKind::Request as i32,
        body: Some(event::Body::PgRequest(PgRequest { message: "Query".into(), sql: String::new(), ..Default::default() })),
        ..Default::default()
    };
    let base = ev.encoded_len();
    if let Some(event::Body::PgRequest(r)) = &mut ev.body {
        r.sql = "x".repeat(size.saturating_sub(base + 3));
    }
    ev.encode_to_vec().into()
}

/// A 3-node etcd cluster with mutual TLS between peers, like custody's.
struct Etcd {
    clients: Vec<String>,
    _procs: Vec<Proc>,
}

impl Etcd {
    fn start(dir: &Path, certs: &Path) -> anyhow::Result<Self> {
        let bin = which("etcd").context("etcd is not installed (apt install etcd-server)")?;
        std::fs::create_dir_all(dir)?;
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports.iter().enumerate().map(|(i, (_, p))| format!("e{}=https://127.0.0.1:{p}", i + 1)).collect();
        let mut procs = Vec::new();
        for (i, (c, p)) in ports.iter().enumerate() {
            let id = i + 1;
            let mut cmd = Command::new(&bin);
            cmd.args(["--name", &format!("e{id}"), "--data-dir"])
                .arg(dir.join(format!("e{id}")))
                .args(["--listen-client-urls", &format!("http://127.0.0.1:{c}"), "--advertise-client-urls", &format!("http://127.0.0.1:{c}")])
                .args(["--listen-peer-urls", &format!("https://127.0.0.1:{p}"), "--initial-advertise-peer-urls", &format!("https://127.0.0.1:{p}")])
                .args(["--initial-cluster", &initial.join(","), "--initial-cluster-state", "new", "--initial-cluster-token", "custody-bench"])
                .arg("--peer-cert-file")
                .arg(certs.join(format!("ledger-{id}.pem")))
                .arg("--peer-key-file")
                .arg(certs.join(format!("ledger-{id}-key.pem")))
                .arg("--peer-trusted-ca-file")
                .arg(certs.join("ca.pem"))
                .args(["--peer-client-cert-auth", "--log-level", "error"]);
            procs.push(Proc::spawn(&format!("etcd-{id}"), cmd, dir)?);
        }
        for (i, (c, _)) in ports.iter().enumerate() {
            wait_tcp(([127, 0, 0, 1], *c).into(), "etcd", &mut procs[i])?;
        }
        Ok(Self { clients: ports.iter().map(|(c, _)| format!("127.0.0.1:{c}")).collect(), _procs: procs })
    }

    /// The leader's client URL, from `etcdctl endpoint status`.
    fn leader(&self) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new("etcdctl").env("ETCDCTL_API", "3").args(["--endpoints", &self.clients.join(","), "endpoint", "status", "-w", "json"]).output()?;
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
                for e in v.as_array().into_iter().flatten() {
                    if e["Status"]["header"]["member_id"] == e["Status"]["leader"] && e["Status"]["leader"].as_u64().unwrap_or(0) != 0 {
                        return Ok(format!("http://{}", e["Endpoint"].as_str().unwrap_or_default()));
                    }
                }
            }
            if Instant::now() > deadline {
                anyhow::bail!("etcd elected no leader: {}", String::from_utf8_lossy(&out.stderr));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// Mean events per Raft entry on the custody leader, from its /metrics.
fn custody_batch(cluster: &LedgerCluster) -> Option<(f64, f64)> {
    let leader = cluster.wait_leader(Duration::from_secs(5)).ok()?;
    let text = http_get(cluster.nodes[&leader].http, "/metrics").ok()?;
    let get = |name: &str| text.lines().find(|l| l.split_whitespace().next() == Some(name)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<f64>().ok());
    Some((get("custody_ledger_batch_size_events_sum")?, get("custody_ledger_batch_size_events_count")?))
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("custody-bench-ledger-").tempdir_in("/tmp")?;
    let d = dir.path();
    eprintln!("bench: scratch directory {}", d.display());
    std::fs::create_dir_all(d.join("custody"))?;
    let cluster = LedgerCluster::start(&d.join("custody"), 3, ClusterOptions::default())?;
    let etcd = Etcd::start(&d.join("etcd"), &cluster.certs)?;
    let etcd_leader = etcd.leader()?;
    let etcd_version = Command::new("etcd").arg("--version").output().map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").to_string()).unwrap_or_default();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let _in_runtime = rt.enter();

    let urls = cluster.urls();
    let size = a.event_bytes;
    let mut rows = Vec::new();
    for &c in &a.clients {
        let client = LedgerClient::new(&urls, Duration::from_secs(10))?;
        let before = custody_batch(&cluster);
        let cs = load(&rt, c, a.seconds, move |ci, n| {
            let client = client.clone();
            let ev = custody_event(ci + c * 1000, n, size);
            async move { client.append(vec![ev]).await.is_ok() }
        });
        let after = custody_batch(&cluster);
        let batch = match (before, after) {
            (Some(b), Some(a)) if a.1 > b.1 => (a.0 - b.0) / (a.1 - b.1),
            _ => f64::NAN,
        };
        let channel = rt.block_on(tonic::transport::Endpoint::from_shared(etcd_leader.clone())?.tcp_nodelay(true).connect())?;
        let value = Bytes::from(vec![b'v'; size]);
        let es = load(&rt, c, a.seconds, move |ci, n| {
            let mut kv = etcdpb::kv_client::KvClient::new(channel.clone());
            let req = etcdpb::PutRequest { key: format!("bench/{c}/{ci}/{n}").into_bytes(), value: value.to_vec(), lease: 0, prev_kv: false };
            async move { kv.put(req).await.is_ok() }
        });
        eprintln!(
            "bench: {c:>3} clients  custody {:>8.0}/s p50 {:.2} ms p99 {:.2} ms (batch {batch:.1})   etcd {:>8.0}/s p50 {:.2} ms p99 {:.2} ms",
            cs.rate(),
            cs.pct(0.5),
            cs.pct(0.99),
            es.rate(),
            es.pct(0.5),
            es.pct(0.99)
        );
        rows.push((c, cs, es, batch));
    }

    // Proofs (issue 4): inclusion proofs served by a follower, each checked by the client
    // as `custody proof` does; then `custody verify` over everything appended above.
    let leader = cluster.wait_leader(Duration::from_secs(10))?;
    let follower = cluster.running().into_iter().find(|id| *id != leader).context("a follower")?;
    let flight = cluster.nodes[&follower].flight();
    let total = cluster.status(leader)?["size"].as_u64().context("ledger size")?;
    let proof_clients = 8usize;
    let pool: Arc<Vec<tokio::sync::Mutex<arrow_flight::FlightClient>>> =
        Arc::new((0..proof_clients).map(|_| rt.block_on(custody::query::client(&flight)).map(tokio::sync::Mutex::new)).collect::<Result<_, _>>()?);
    let ps = load(&rt, proof_clients, a.seconds, move |ci, n| {
        let pool = pool.clone();
        // Spread over the whole log, so that the stored tree is read everywhere.
        let index = (ci as u64 * 7_919 + n * 104_729) % total;
        async move {
            let mut c = pool[ci].lock().await;
            custody::query::inclusion_proof_on(&mut c, index, Some(total)).await.is_ok()
        }
    });
    let t = Instant::now();
    let out = Command::new(custody_e2e::bin("custody")).args(["verify", "--flight", &flight]).env("HOME", d).output()?;
    let verify_secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        anyhow::bail!("custody verify failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    eprintln!("bench: proofs {:.0}/s p50 {:.2} ms p99 {:.2} ms; custody verify {total} events in {verify_secs:.2} s", ps.rate(), ps.pct(0.5), ps.pct(0.99));
    let mut p = String::new();
    p.push_str("## Proofs, verification and sealing (issue 4)\n\n");
    p.push_str(&format!("Command: `bench/run ledger --clients {} --seconds {} --event-bytes {}` (release build), on the cluster the ledger benchmark above filled.\n\n", a.clients.iter().map(usize::to_string).collect::<Vec<_>>().join(","), a.seconds, a.event_bytes));
    p.push_str("| measure | result |\n|---|---:|\n");
    p.push_str(&format!("| inclusion proofs served by a follower and checked by the client, {proof_clients} clients, tree of {total} | {:.0}/s (p50 {:.2} ms, p99 {:.2} ms, {} errors) |\n", ps.rate(), ps.pct(0.5), ps.pct(0.99), ps.errors));
    p.push_str(&format!("| `custody verify`: pull {total} entries over Flight, check the chain, recompute the Merkle root | {:.0} events/s ({verify_secs:.2} s) |\n", total as f64 / verify_secs));

    // Sealing (issue 4): the same load against this cluster (blocks every 1024 entries or
    // 1000 ms, the default; each node signs every block's checkpoint) and against a second
    // cluster with sealing off, alternating so that both see the same machine.
    std::fs::create_dir_all(d.join("custody-unsealed"))?;
    let unsealed = LedgerCluster::start(
        &d.join("custody-unsealed"),
        3,
        ClusterOptions { extra: "[blocks]\nmax_entries = 0\n".into(), ..Default::default() },
    )?;
    let blocks_of = |c: &LedgerCluster| -> u64 { c.wait_leader(Duration::from_secs(5)).ok().and_then(|l| c.status(l).ok()).and_then(|s| s["blocks"].as_u64()).unwrap_or(0) };
    let mut seal_rows = Vec::new();
    for &c in &a.clients {
        let mut pair = Vec::new();
        for target in [&cluster, &unsealed] {
            let client = LedgerClient::new(&target.urls(), Duration::from_secs(10))?;
            let b0 = blocks_of(target);
            let st = load(&rt, c, a.seconds, move |ci, n| {
                let client = client.clone();
                let ev = custody_event(ci + c * 1000 + 500_000, n, size);
                async move { client.append(vec![ev]).await.is_ok() }
            });
            pair.push((st, blocks_of(target) - b0));
        }
        eprintln!("bench: {c:>3} clients  sealing on {:>8.0}/s p99 {:.2} ms ({} blocks)   off {:>8.0}/s p99 {:.2} ms", pair[0].0.rate(), pair[0].0.pct(0.99), pair[0].1, pair[1].0.rate(), pair[1].0.pct(0.99));
        seal_rows.push((c, pair));
    }
    p.push_str("\n### Sealing into blocks: on against off\n\n");
    p.push_str("The same append load (one event per request, as above) against the cluster above, which seals a block every 1024 entries or 1000 ms and has every node sign each block's checkpoint, and against a second 3-node cluster with `[blocks] max_entries = 0`, run one after the other for each client count.\n\n");
    p.push_str("| clients | sealing | events/s | p50 ms | p99 ms | errors | blocks sealed | on ÷ off |\n|---:|---|---:|---:|---:|---:|---:|---:|\n");
    for (c, pair) in &seal_rows {
        let (on, off) = (&pair[0], &pair[1]);
        p.push_str(&format!("| {c} | on | {:.0} | {:.2} | {:.2} | {} | {} | {:.2} |\n", on.0.rate(), on.0.pct(0.5), on.0.pct(0.99), on.0.errors, on.1, on.0.rate() / off.0.rate()));
        p.push_str(&format!("| {c} | off | {:.0} | {:.2} | {:.2} | {} | 0 | |\n", off.0.rate(), off.0.pct(0.5), off.0.pct(0.99), off.0.errors));
    }

    let mut s = String::new();
    let clients: Vec<String> = a.clients.iter().map(usize::to_string).collect();
    s.push_str("## Ledger: a 3-node custody cluster against a 3-node etcd cluster (issue 3)\n\n");
    s.push_str(&format!("Command: `bench/run ledger --clients {} --seconds {} --event-bytes {}` (release build)  \n", clients.join(","), a.seconds, a.event_bytes));
    s.push_str(&format!(
        "Machine: {}; {etcd_version}; all six nodes and the load generator on loopback on this one machine. Each client sends one {}-byte event (custody `Append`) or value (etcd `Put`) and waits for the answer before the next; both fsync their Raft log before answering and use mutual TLS between peers; clients talk plain gRPC to the leader.\n\n",
        machine(),
        a.event_bytes
    ));
    s.push_str("| clients | system | events/s | p50 ms | p99 ms | errors | custody ÷ etcd | custody events per Raft entry |\n|---:|---|---:|---:|---:|---:|---:|---:|\n");
    for (c, cs, es, batch) in &rows {
        s.push_str(&format!("| {c} | custody | {:.0} | {:.2} | {:.2} | {} | {:.2} | {batch:.1} |\n", cs.rate(), cs.pct(0.5), cs.pct(0.99), cs.errors, cs.rate() / es.rate()));
        s.push_str(&format!("| {c} | etcd | {:.0} | {:.2} | {:.2} | {} | | |\n", es.rate(), es.pct(0.5), es.pct(0.99), es.errors));
    }
    println!("{s}\n{p}");
    if !a.no_write {
        write_section(&results_file(), "ledger", &s)?;
        write_section(&results_file(), "proofs", &p)?;
        eprintln!("bench: wrote {}", results_file().display());
    }
    Ok(())
}
