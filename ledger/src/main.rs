//! `custody-ledger`: runs a ledger node, administers a cluster, and checks a ledger's data
//! offline.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use custody_ledger::config::LedgerConfig;
use custody_ledger::layout::DataLayout;
use custody_ledger::server::Exit;
use custody_ledger::store::Store;
use custody_ledger::verify::verify_store;
use custody_proto::pb::ledger::ledger_client::LedgerClient;
use custody_proto::pb::ledger::{AddMemberRequest, Member, RemoveMemberRequest, StatusRequest, TransferLeaderRequest};

#[derive(Parser)]
#[command(name = "custody-ledger", version, about = "custody's audit ledger node")]
struct Cli {
    /// Log format: text or json.
    #[arg(long, global = true, default_value = "text", env = "CUSTODY_LOG_FORMAT")]
    log_format: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a ledger node (a single node, or one node of a Raft cluster).
    Serve {
        /// Config file (TOML). Flags below override it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Data directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// gRPC listen address (Append API and Arrow Flight).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// HTTP listen address (health and metrics).
        #[arg(long)]
        http_listen: Option<std::net::SocketAddr>,
    },
    /// Initialise an empty data directory as one of a new cluster's first members, then exit
    /// (`serve` does the same on its first start with `cluster.state = "new"`).
    Bootstrap {
        #[arg(long)]
        config: PathBuf,
    },
    /// Ask a running cluster to add this node (from its config), then serve it; it catches
    /// up from the leader's snapshot. The config must say `cluster.state = "join"`.
    Join {
        #[arg(long)]
        config: PathBuf,
        /// Any member's gRPC address.
        #[arg(long)]
        via: String,
        /// How long to keep retrying while the cluster has no leader or the outcome of the
        /// request is unknown (a leader change during the request), in seconds.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Check a config file without starting anything.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Show a node's view of the cluster: role, term, leader, indices, members.
    Status {
        /// Any node's gRPC address.
        #[arg(long, default_value = "http://127.0.0.1:7400")]
        endpoint: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Add, remove or list cluster members (asks the leader).
    Member {
        #[command(subcommand)]
        cmd: MemberCmd,
    },
    /// Hand leadership to another voter (before taking the leader down for maintenance).
    TransferLeader {
        /// Any node's gRPC address.
        #[arg(long, default_value = "http://127.0.0.1:7400")]
        endpoint: String,
        /// Raft id of the new leader.
        to: u64,
    },
    /// Write a development CA and node certificates for the peer transport.
    GenCerts {
        /// Output directory.
        #[arg(long)]
        dir: PathBuf,
        /// Raft ids to make certificates for, e.g. 1,2,3.
        #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
        nodes: Vec<u64>,
    },
    /// Walk a stopped node's data directory and verify the hash chain.
    Verify {
        /// Data directory.
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Replace this node's checkpoint key. The old public key stays published (retired), so
    /// the checkpoints it signed still verify; add the new key to verifiers' pins. Takes
    /// effect when the node next starts (rotate during a rolling restart).
    RotateKey {
        /// The node's config file (for its data directory, origin and name).
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum MemberCmd {
    /// Add a node. Start it first with `cluster.state = "join"`.
    Add {
        #[arg(long, default_value = "http://127.0.0.1:7400")]
        endpoint: String,
        /// Raft id of the new node (never reuse a removed id).
        #[arg(long)]
        id: u64,
        /// Where peers reach its Raft transport.
        #[arg(long)]
        peer_addr: String,
        /// Where proxies reach its gRPC API.
        #[arg(long)]
        client_addr: String,
        /// Add it as a non-voting learner.
        #[arg(long)]
        learner: bool,
        /// How long to keep retrying while there is no leader or the outcome is unknown (s).
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Remove a node.
    Remove {
        #[arg(long, default_value = "http://127.0.0.1:7400")]
        endpoint: String,
        /// Raft id.
        id: u64,
        /// How long to keep retrying while there is no leader or the outcome is unknown (s).
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// List members.
    List {
        #[arg(long, default_value = "http://127.0.0.1:7400")]
        endpoint: String,
    },
}

fn init_logs(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn endpoint_url(e: &str) -> String {
    if e.contains("://") {
        e.to_string()
    } else {
        format!("http://{e}")
    }
}

/// Connects to `endpoint`, following a not-leader answer once to the leader it names.
async fn client(endpoint: &str) -> anyhow::Result<LedgerClient<tonic::transport::Channel>> {
    let url = endpoint_url(endpoint);
    LedgerClient::connect(url.clone())
        .await
        .with_context(|| format!("cannot reach the ledger at {url}"))
}

async fn leader_client(endpoint: &str) -> anyhow::Result<LedgerClient<tonic::transport::Channel>> {
    let mut c = client(endpoint).await?;
    let st = c.status(StatusRequest {}).await.context("ledger status")?.into_inner();
    if st.role == "leader" || st.leader_addr.is_empty() {
        return Ok(c);
    }
    client(&st.leader_addr).await
}

/// A membership change that `change_membership` carries through.
enum MembershipEdit {
    Add(Member),
    Remove(u64),
}

impl MembershipEdit {
    /// Whether `members` already reflect the change; an error if they conflict with it.
    fn in_place(&self, members: &[Member]) -> Result<bool, String> {
        match self {
            MembershipEdit::Add(m) => match members.iter().find(|x| x.id == m.id) {
                None => Ok(false),
                Some(x) if x.peer_addr == m.peer_addr && x.learner == m.learner => Ok(true),
                Some(x) => Err(format!(
                    "node {} is already a member with peer address {} ({}); remove it first, or give the new node a new id",
                    m.id,
                    x.peer_addr,
                    if x.learner { "learner" } else { "voter" }
                )),
            },
            MembershipEdit::Remove(id) => Ok(!members.iter().any(|x| x.id == *id)),
        }
    }
}

/// Applies a membership change through the cluster's leader and returns whether it was
/// already in place, with the members after it. While there is no leader, the leader moves,
/// another change is in flight, or the outcome of a request is unknown, it looks at the
/// members again and retries, until `timeout`: the change is idempotent, so retrying is safe.
async fn change_membership(endpoint: &str, edit: &MembershipEdit, timeout: Duration) -> anyhow::Result<(bool, Vec<Member>)> {
    /// The most one attempt may take: a paused or unreachable node must not stall the loop.
    const ATTEMPT: Duration = Duration::from_secs(15);
    let deadline = std::time::Instant::now() + timeout;
    let mut attempts = 0u32;
    let mut refused: Option<String> = None;
    let mut endpoints = vec![endpoint.to_string()];
    let seen = std::sync::Mutex::new(Vec::<String>::new());
    loop {
        attempts += 1;
        let tried = endpoints.clone();
        let attempt = async {
            // The given endpoint first, then the members it named (it may be the node the
            // change removes, or down).
            let mut last = None;
            let mut found = None;
            for e in &tried {
                match leader_client(e).await {
                    Ok(c) => {
                        found = Some(c);
                        break;
                    }
                    Err(err) => last = Some(err),
                }
            }
            let Some(mut c) = found else {
                return Err(last.unwrap_or_else(|| anyhow::anyhow!("no endpoint to try")));
            };
            let st = c.status(StatusRequest {}).await.context("cluster status")?.into_inner();
            if let Ok(mut s) = seen.lock() {
                s.extend(st.members.iter().map(|m| m.client_addr.clone()));
            }
            // Only the leader's membership is current: a follower may not have applied the
            // last change yet, and would make a change look done (or not) wrongly.
            if st.role != "leader" {
                return Ok(Err(tonic::Status::unavailable(format!("node {} is not the leader (role {}); no leader known yet", st.raft_id, st.role))));
            }
            match edit.in_place(&st.members) {
                Ok(true) => return Ok(Ok((attempts == 1, st.members))),
                Ok(false) => {}
                Err(conflict) => return Ok(Err(tonic::Status::invalid_argument(conflict))),
            }
            let r = match edit {
                MembershipEdit::Add(m) => c.add_member(AddMemberRequest { member: Some(m.clone()) }).await,
                MembershipEdit::Remove(id) => c.remove_member(RemoveMemberRequest { id: *id }).await,
            };
            anyhow::Ok(r.map(|r| (false, r.into_inner().members)))
        };
        let left = deadline.saturating_duration_since(std::time::Instant::now()).max(Duration::from_secs(1));
        let why = match tokio::time::timeout(left.min(ATTEMPT), attempt).await {
            Ok(Ok(Ok(done))) => return Ok(done),
            Ok(Ok(Err(s))) if s.code() == tonic::Code::InvalidArgument => {
                // Refused. After an attempt whose outcome was unknown the refusal may only
                // say that the change is already done ("not a member" after our own
                // removal), so look again once; the same refusal twice is final.
                let msg = s.message().to_string();
                if attempts == 1 || refused.as_deref() == Some(msg.as_str()) {
                    bail!("{msg}");
                }
                refused = Some(msg.clone());
                msg
            }
            Ok(Ok(Err(s))) => s.message().to_string(),
            // An unreachable node or cluster may come back before the deadline.
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => format!("no answer within {:?}", left.min(ATTEMPT)),
        };
        for a in seen.lock().map(|mut s| std::mem::take(&mut *s)).unwrap_or_default() {
            if !endpoints.contains(&a) {
                endpoints.push(a);
            }
        }
        if std::time::Instant::now() >= deadline {
            bail!("membership change not done after {attempts} attempts in {timeout:?}; last: {why}");
        }
        tracing::warn!(attempt = attempts, "membership change not done yet, retrying: {why}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn print_members(members: &[Member]) {
    println!("{:<6} {:<8} {:<28} CLIENT", "ID", "ROLE", "PEER");
    for m in members {
        println!("{:<6} {:<8} {:<28} {}", m.id, if m.learner { "learner" } else { "voter" }, m.peer_addr, m.client_addr);
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logs(&cli.log_format);
    let rt = tokio::runtime::Runtime::new()?;
    match cli.cmd {
        Cmd::Serve {
            config,
            data_dir,
            listen,
            http_listen,
        } => {
            let mut cfg = match config {
                Some(p) => LedgerConfig::load(&p)?,
                None => LedgerConfig::single(data_dir.clone().context("--data-dir or --config is required")?),
            };
            if let Some(d) = data_dir {
                cfg.data_dir = d;
            }
            if let Some(l) = listen {
                cfg.listen = l;
            }
            if let Some(l) = http_listen {
                cfg.http_listen = l;
            }
            match rt.block_on(custody_ledger::server::run(cfg, shutdown_signal()))? {
                Exit::Stopped => Ok(()),
                Exit::Removed => {
                    eprintln!("custody-ledger: this node was removed from the cluster; its data directory can be deleted");
                    std::process::exit(3);
                }
            }
        }
        Cmd::Bootstrap { config } => {
            let cfg = LedgerConfig::load(&config)?;
            if custody_ledger::server::bootstrap_data(&cfg)? {
                println!("bootstrapped node {} of cluster {:?} in {}", cfg.cluster.id, cfg.cluster.name, cfg.data_dir.display());
            } else {
                println!("{} is already initialised; nothing to do", cfg.data_dir.display());
            }
            Ok(())
        }
        Cmd::Join { config, via, timeout } => {
            let cfg = LedgerConfig::load(&config)?;
            if cfg.cluster.state != custody_ledger::config::JoinState::Join {
                bail!("{} must say cluster.state = \"join\"", config.display());
            }
            let member = Member { id: cfg.cluster.id, peer_addr: cfg.peer_addr(), client_addr: cfg.client_addr(), learner: false };
            let (known, _) = rt.block_on(change_membership(&via, &MembershipEdit::Add(member), Duration::from_secs(timeout)))?;
            eprintln!("custody-ledger: node {} {} the cluster; serving", cfg.cluster.id, if known { "is already a member of" } else { "was added to" });
            match rt.block_on(custody_ledger::server::run(cfg, shutdown_signal()))? {
                Exit::Stopped => Ok(()),
                Exit::Removed => std::process::exit(3),
            }
        }
        Cmd::Check { config } => {
            let cfg = LedgerConfig::load(&config)?;
            println!(
                "ok: node {} (raft id {}) of cluster {:?}, data in {}",
                cfg.node_id,
                cfg.cluster.id,
                cfg.cluster.name,
                cfg.data_dir.display()
            );
            Ok(())
        }
        Cmd::Status { endpoint, json } => rt.block_on(async {
            let st = client(&endpoint).await?.status(StatusRequest {}).await.context("ledger status")?.into_inner();
            if json {
                let v = serde_json::json!({
                    "node_id": st.node_id, "raft_id": st.raft_id, "cluster_id": st.cluster_id, "role": st.role,
                    "term": st.term, "leader_id": st.leader_id, "leader_addr": st.leader_addr,
                    "commit_index": st.commit_index, "applied_index": st.applied_index, "size": st.size,
                    "head_hash": st.head_hash, "tree_root": st.tree_root, "log_first_index": st.log_first_index, "log_last_index": st.log_last_index,
                    "members": st.members.iter().map(|m| serde_json::json!({"id": m.id, "peer_addr": m.peer_addr, "client_addr": m.client_addr, "learner": m.learner})).collect::<Vec<_>>(),
                });
                println!("{v}");
            } else {
                println!("node       {} (raft id {}) of cluster {:?}", st.node_id, st.raft_id, st.cluster_id);
                println!("role       {} (term {}); leader {}{}", st.role, st.term, st.leader_id, if st.leader_addr.is_empty() { String::new() } else { format!(" at {}", st.leader_addr) });
                println!("indices    commit {} applied {}; raft log {}..={}", st.commit_index, st.applied_index, st.log_first_index, st.log_last_index);
                println!("ledger     {} events, head {}", st.size, st.head_hash);
                println!("merkle     root {} at size {}", st.tree_root, st.size);
                print_members(&st.members);
            }
            Ok(())
        }),
        Cmd::Member { cmd } => rt.block_on(async {
            match cmd {
                MemberCmd::Add { endpoint, id, peer_addr, client_addr, learner, timeout } => {
                    let m = Member { id, peer_addr, client_addr, learner };
                    let (already, members) = change_membership(&endpoint, &MembershipEdit::Add(m), Duration::from_secs(timeout)).await?;
                    println!("{} node {id}", if already { "already a member:" } else { "added" });
                    print_members(&members);
                }
                MemberCmd::Remove { endpoint, id, timeout } => {
                    let (already, members) = change_membership(&endpoint, &MembershipEdit::Remove(id), Duration::from_secs(timeout)).await?;
                    println!("{} node {id}", if already { "not a member:" } else { "removed" });
                    print_members(&members);
                }
                MemberCmd::List { endpoint } => {
                    let st = client(&endpoint).await?.status(StatusRequest {}).await.context("ledger status")?.into_inner();
                    print_members(&st.members);
                }
            }
            Ok(())
        }),
        Cmd::TransferLeader { endpoint, to } => rt.block_on(async {
            leader_client(&endpoint)
                .await?
                .transfer_leader(TransferLeaderRequest { to })
                .await
                .map_err(|s| anyhow::anyhow!("transfer: {}", s.message()))?;
            println!("asked the leader to hand over to node {to}");
            Ok(())
        }),
        Cmd::GenCerts { dir, nodes } => {
            if nodes.is_empty() || nodes.contains(&0) {
                bail!("--nodes needs positive Raft ids");
            }
            custody_ledger::peer::generate_certs(&dir, &nodes)?;
            println!("wrote ca.pem and certificates for nodes {nodes:?} to {}", dir.display());
            Ok(())
        }
        Cmd::RotateKey { config } => {
            let cfg = custody_ledger::config::LedgerConfig::load(&config)?;
            // A running node holds its store's lock and keeps signing with the key it loaded.
            if let Ok(state) = DataLayout::new(&cfg.data_dir).and_then(|l| l.state_dir()) {
                if state.exists() {
                    Store::open(&state).with_context(|| format!("{} is in use: stop the node before rotating its key", cfg.data_dir.display()))?;
                }
            }
            let (old, new) = custody_ledger::checkpoint::CheckpointSigner::rotate(&cfg.data_dir, &cfg.checkpoint_origin(), &cfg.node_id)
                .context("rotating the checkpoint key")?;
            println!("retired {old}");
            println!("new     {new}");
            println!("restart the node to sign with the new key; pin it in verifiers (keep the old key to verify older checkpoints)");
            Ok(())
        }
        Cmd::Verify { data_dir } => {
            let layout = DataLayout::new(&data_dir)?;
            let state = layout.state_dir()?;
            let store = Store::open(&state)
                .with_context(|| format!("opening {} (is a ledger still running on it?)", state.display()))?;
            match verify_store(&store) {
                Ok(r) => {
                    println!("ok: {} entries verified, head {}, merkle root {}", r.verified, r.head, r.tree_root);
                    Ok(())
                }
                Err(e) => {
                    eprintln!("FAILED: {e}");
                    std::process::exit(1);
                }
            }
        }
    }
}
