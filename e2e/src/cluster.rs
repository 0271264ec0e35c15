//! A real ledger cluster for tests: `custody-ledger serve` processes on loopback, with mutual
//! TLS between them, and optionally a relay on every link that the test can cut.
//!
//! Node `i` dials node `j` through relay `(i, j)`, so a partition is real: connections are
//! refused and open ones are closed, in one direction or both, while the processes run on.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::{bin, free_port, wait_tcp, Proc};

/// A TCP relay that the test can cut.
pub struct Relay {
    /// Where it listens.
    pub addr: SocketAddr,
    blocked: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    /// Relays connections on a free loopback port to `to`.
    pub fn start(to: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let blocked = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (b, o, s) = (blocked.clone(), open.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        if b.load(Ordering::Relaxed) {
                            let _ = client.shutdown(Shutdown::Both);
                            continue;
                        }
                        let _ = client.set_nonblocking(false);
                        let Ok(server) = TcpStream::connect_timeout(&to, Duration::from_secs(2)) else {
                            let _ = client.shutdown(Shutdown::Both);
                            continue;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        if let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) {
                            let mut g = o.lock().unwrap_or_else(|p| p.into_inner());
                            g.retain(|t| t.peer_addr().is_ok());
                            g.push(c2);
                            g.push(s2);
                        }
                        pipe(client, server);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Self { addr, blocked, open, stop })
    }

    /// Cuts the link: open connections close, new ones are refused.
    pub fn cut(&self) {
        self.blocked.store(true, Ordering::Relaxed);
        for s in self.open.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Restores the link.
    pub fn heal(&self) {
        self.blocked.store(false, Ordering::Relaxed);
    }

    /// Whether the link is cut.
    pub fn is_cut(&self) -> bool {
        self.blocked.load(Ordering::Relaxed)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.cut();
    }
}

fn pipe(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else { return };
    std::thread::spawn(move || copy(a, b2));
    std::thread::spawn(move || copy(b, a2));
}

fn copy(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

/// One node's addresses, files and process.
pub struct ClusterNode {
    /// Raft id.
    pub id: u64,
    /// gRPC (Append, Status, Flight).
    pub grpc: SocketAddr,
    /// HTTP (health, status, metrics).
    pub http: SocketAddr,
    /// Raft transport.
    pub peer: SocketAddr,
    /// Data directory.
    pub data: PathBuf,
    /// Config file.
    pub config: PathBuf,
    /// The process, while it runs.
    pub proc: Option<Proc>,
    /// Log file.
    pub log: PathBuf,
}

impl ClusterNode {
    /// Its gRPC URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }
    /// Its Flight URL.
    pub fn flight(&self) -> String {
        format!("grpc://{}", self.grpc)
    }
}

/// Options for a test cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Put a cuttable relay on every link.
    pub relays: bool,
    /// Most node ids the test may ever use (relays and certificates are made up front).
    pub max_id: u64,
    /// `unsafe_fault` for every node (`none`, `ack-before-commit`, `drop-acked-writes`).
    pub unsafe_fault: String,
    /// Applied entries between snapshots (small in tests, so snapshots happen).
    pub snapshot_interval: u64,
    /// Entries kept behind a snapshot.
    pub log_retain: u64,
    /// Extra TOML for the `[cluster]` table.
    pub extra: String,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self { relays: false, max_id: 7, unsafe_fault: "none".into(), snapshot_interval: 50_000, log_retain: 5_000, extra: String::new() }
    }
}

/// A ledger cluster of real processes.
pub struct LedgerCluster {
    /// Scratch directory.
    pub dir: PathBuf,
    /// Cluster name.
    pub name: String,
    /// Certificates (ca.pem, ledger-<id>.pem, ledger-<id>-key.pem).
    pub certs: PathBuf,
    /// Nodes by id.
    pub nodes: BTreeMap<u64, ClusterNode>,
    /// Relays by (from, to).
    pub relays: BTreeMap<(u64, u64), Relay>,
    opts: ClusterOptions,
    ports: BTreeMap<u64, (SocketAddr, SocketAddr, SocketAddr)>,
}

impl LedgerCluster {
    /// Starts nodes `1..=n` as a new cluster and waits for a leader.
    pub fn start(dir: &Path, n: u64, opts: ClusterOptions) -> anyhow::Result<Self> {
        let certs = dir.join("certs");
        let ids: Vec<String> = (1..=opts.max_id.max(n)).map(|i| i.to_string()).collect();
        let out = std::process::Command::new(bin("custody-ledger")).args(["gen-certs", "--dir"]).arg(&certs).args(["--nodes", &ids.join(",")]).output()?;
        anyhow::ensure!(out.status.success(), "gen-certs failed: {}", String::from_utf8_lossy(&out.stderr));
        let mut ports = BTreeMap::new();
        for id in 1..=opts.max_id.max(n) {
            let a = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
            ports.insert(id, (a(free_port()), a(free_port()), a(free_port())));
        }
        let mut relays = BTreeMap::new();
        if opts.relays {
            for from in 1..=opts.max_id.max(n) {
                for to in 1..=opts.max_id.max(n) {
                    if from != to {
                        relays.insert((from, to), Relay::start(ports[&to].2)?);
                    }
                }
            }
        }
        let mut c = Self { dir: dir.to_path_buf(), name: format!("test-{}", std::process::id()), certs, nodes: BTreeMap::new(), relays, opts, ports };
        let initial: Vec<u64> = (1..=n).collect();
        for id in 1..=n {
            c.write_node(id, "new", &initial)?;
        }
        for id in 1..=n {
            c.restart(id)?;
        }
        c.wait_leader(Duration::from_secs(30))?;
        Ok(c)
    }

    fn write_node(&mut self, id: u64, state: &str, initial: &[u64]) -> anyhow::Result<()> {
        let (grpc, http, peer) = self.ports[&id];
        let data = self.dir.join(format!("node-{id}"));
        let members: Vec<String> = initial
            .iter()
            .map(|m| format!("{{ id = {m}, peer = \"{}\", client = \"{}\" }}", self.ports[m].2, self.ports[m].0))
            .collect();
        let overrides: Vec<String> = self
            .relays
            .iter()
            .filter(|((from, _), _)| *from == id)
            .map(|((_, to), r)| format!("\"{to}\" = \"{}\"", r.addr))
            .collect();
        let cfg = format!(
            "node_id = \"ledger-{id}\"\ndata_dir = \"{}\"\nlisten = \"{grpc}\"\nhttp_listen = \"{http}\"\n\n[cluster]\nid = {id}\nname = \"{}\"\npeer_listen = \"{peer}\"\nstate = \"{state}\"\ninitial_members = [{}]\npeer_overrides = {{ {} }}\nunsafe_fault = \"{}\"\nsnapshot_interval = {}\nlog_retain = {}\n{}\n[cluster.tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            data.display(),
            self.name,
            members.join(", "),
            overrides.join(", "),
            self.opts.unsafe_fault,
            self.opts.snapshot_interval,
            self.opts.log_retain,
            self.opts.extra,
            self.certs.join("ca.pem").display(),
            self.certs.join(format!("ledger-{id}.pem")).display(),
            self.certs.join(format!("ledger-{id}-key.pem")).display(),
        );
        let config = self.dir.join(format!("node-{id}.toml"));
        std::fs::write(&config, cfg)?;
        let log = self.dir.join(format!("ledger-{id}.log"));
        self.nodes.insert(id, ClusterNode { id, grpc, http, peer, data, config, proc: None, log });
        Ok(())
    }

    /// (Re)starts node `id` on its data.
    pub fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        let node = self.nodes.get_mut(&id).context("no such node")?;
        if let Some(mut p) = node.proc.take() {
            p.kill();
        }
        let mut cmd = std::process::Command::new(bin("custody-ledger"));
        cmd.args(["serve", "--config"]).arg(&node.config);
        let mut p = Proc::spawn(&format!("ledger-{id}"), cmd, &self.dir)?;
        wait_tcp(node.grpc, &format!("custody-ledger {id}"), &mut p)?;
        node.proc = Some(p);
        Ok(())
    }

    /// Starts node `id` empty with `state = "join"` through `custody-ledger join`, which asks
    /// the cluster to add it and then serves it.
    pub fn add_node(&mut self, id: u64) -> anyhow::Result<()> {
        self.write_node(id, "join", &[])?;
        let leader = self.wait_leader(Duration::from_secs(20))?;
        let via = self.nodes[&leader].url();
        let node = self.nodes.get_mut(&id).context("no such node")?;
        let mut cmd = std::process::Command::new(bin("custody-ledger"));
        cmd.args(["join", "--config"]).arg(&node.config).args(["--via", &via]);
        let mut p = Proc::spawn(&format!("ledger-{id}"), cmd, &self.dir)?;
        wait_tcp(node.grpc, &format!("custody-ledger {id}"), &mut p)?;
        node.proc = Some(p);
        Ok(())
    }

    /// Adds node `id` to the membership with `custody-ledger member add`, without starting it
    /// (an SRE's two-step join: add, then start the node with `cluster.state = "join"`).
    /// `restart(id)` starts it later.
    pub fn add_member_only(&mut self, id: u64) -> anyhow::Result<()> {
        self.write_node(id, "join", &[])?;
        let leader = self.wait_leader(Duration::from_secs(20))?;
        let (grpc, _, peer) = self.ports[&id];
        let out = std::process::Command::new(bin("custody-ledger"))
            .args(["member", "add", "--endpoint", &self.nodes[&leader].url(), "--id", &id.to_string()])
            .args(["--peer-addr", &peer.to_string(), "--client-addr", &grpc.to_string()])
            .output()?;
        if !out.status.success() {
            bail!("member add {id} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Removes node `id` through the leader (its process then exits).
    pub fn remove_node(&mut self, id: u64) -> anyhow::Result<()> {
        let leader = self.wait_leader(Duration::from_secs(20))?;
        let out = std::process::Command::new(bin("custody-ledger"))
            .args(["member", "remove", "--endpoint", &self.nodes[&leader].url(), &id.to_string()])
            .output()?;
        if !out.status.success() {
            bail!("member remove {id} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// SIGKILL.
    pub fn kill(&mut self, id: u64) {
        if let Some(n) = self.nodes.get_mut(&id) {
            if let Some(mut p) = n.proc.take() {
                p.kill();
            }
        }
    }

    /// SIGSTOP or SIGCONT.
    pub fn signal(&self, id: u64, sig: &str) {
        if let Some(p) = self.nodes.get(&id).and_then(|n| n.proc.as_ref()) {
            p.signal(sig);
        }
    }

    /// Node `id`'s status as its HTTP endpoint reports it.
    pub fn status(&self, id: u64) -> anyhow::Result<serde_json::Value> {
        let n = self.nodes.get(&id).context("no such node")?;
        let body = crate::http_get(n.http, "/status")?;
        serde_json::from_str(&body).with_context(|| format!("node {id} /status said {body:?}"))
    }

    /// Ids of nodes whose process runs.
    pub fn running(&self) -> Vec<u64> {
        self.nodes.iter().filter(|(_, n)| n.proc.is_some()).map(|(id, _)| *id).collect()
    }

    /// The leader that a majority of running nodes agree on, once there is one.
    pub fn wait_leader(&self, timeout: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            for id in self.running() {
                if let Ok(s) = self.status(id) {
                    if s["role"] == "leader" {
                        return Ok(id);
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("no leader within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until every running node has applied the same Raft index, ledger size, chain
    /// head and Merkle root.
    pub fn wait_converged(&self, timeout: Duration) -> anyhow::Result<(u64, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut seen = Vec::new();
            for id in self.running() {
                if let Ok(s) = self.status(id) {
                    // The chain head and the Merkle root both, so replicas agree on the tree too.
                    // And the same blocks.
                    let head = format!(
                        "{} {} {}",
                        s["head_hash"].as_str().unwrap_or(""),
                        s["tree_root"].as_str().unwrap_or("no tree root"),
                        s["last_block_hash"].as_str().unwrap_or("no block")
                    );
                    seen.push((s["size"].as_u64().unwrap_or(0), head, s["commit_index"].as_u64(), s["applied_index"].as_u64()));
                }
            }
            // Same size, head and root, and the same Raft index applied everywhere: an empty
            // new member has the same (empty) ledger as a cluster without events, but not
            // the same applied index.
            if seen.len() == self.running().len() && !seen.is_empty() && seen.iter().all(|s| s.0 == seen[0].0 && s.1 == seen[0].1 && s.2 == s.3 && s.3 == seen[0].3) {
                return Ok((seen[0].0, seen[0].1.clone()));
            }
            if Instant::now() > deadline {
                bail!("nodes did not converge within {timeout:?}: {seen:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Cuts every link between `a` and `b`, both ways.
    pub fn cut(&self, a: u64, b: u64) {
        for k in [(a, b), (b, a)] {
            if let Some(r) = self.relays.get(&k) {
                r.cut();
            }
        }
    }

    /// Isolates `group` from everyone else.
    pub fn partition(&self, group: &[u64]) {
        for (&(from, to), r) in &self.relays {
            if group.contains(&from) != group.contains(&to) {
                r.cut();
            }
        }
    }

    /// Heals every link.
    pub fn heal(&self) {
        for r in self.relays.values() {
            r.heal();
        }
    }

    /// gRPC URLs of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.values().map(|n| n.url()).collect()
    }
}
