//! Runs a ledger node: checks and opens its data, bootstraps or joins its cluster, starts the
//! Raft loop and the peer transport, and serves gRPC (Append, Status, Flight) and HTTP
//! (health, metrics) until shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use anyhow::{bail, Context};
use arrow_flight::flight_service_server::FlightServiceServer;
use axum::http::StatusCode;
use axum::routing::get;
use custody_proto::pb::ledger::ledger_server::LedgerServer;
use custody_proto::pb::ledger::Member;
use tokio::net::TcpListener;
use tracing::{error, info, warn, Instrument};

use crate::config::{JoinState, LedgerConfig};
use crate::flight::{LedgerFlight, SharedSigner};
use crate::selfcheck::Integrity;
use crate::layout::DataLayout;
use crate::machine::{LedgerMachine, StoreCell};
use crate::metrics::LedgerMetrics;
use crate::node::{bootstrap, Node, NodeOptions, NodeStatus, Transport};
use crate::peer::{PeerNet, PeerTls};
use crate::raft_log::{LogIdentity, RaftLogStore};
use crate::service::{AppendLimits, LedgerService};
use crate::store::Store;

/// Largest gRPC message accepted (an append batch).
pub const MAX_GRPC_MESSAGE: usize = 64 << 20;

/// A transport for a node without peers.
struct NoPeers;

impl Transport for NoPeers {
    fn send(&self, msgs: Vec<raft::eraftpb::Message>) {
        if !msgs.is_empty() {
            tracing::debug!(n = msgs.len(), "a single node has no peers to send to");
        }
    }
    fn set_members(&self, _: &[Member]) {}
}

/// How the node process ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// Shut down on request.
    Stopped,
    /// Removed from the cluster by its peers.
    Removed,
}

/// Opens the node's data, refusing data that belongs to another node or cluster.
fn open_data(cfg: &LedgerConfig) -> anyhow::Result<(DataLayout, RaftLogStore, LedgerMachine)> {
    let c = &cfg.cluster;
    let layout = DataLayout::new(&cfg.data_dir).with_context(|| format!("creating data dir {}", cfg.data_dir.display()))?;
    let log = RaftLogStore::open(&layout.raft_dir()).with_context(|| {
        format!(
            "the Raft log in {} cannot be opened; if it is damaged, rebuild this node from its peers: remove it from the cluster, empty its data directory and add it again",
            layout.raft_dir().display()
        )
    })?;
    if let Some(id) = log.identity()? {
        if id.cluster_id != c.name || id.node_id != c.id {
            bail!(
                "{} holds node {} of cluster {:?}, but this config is node {} of cluster {:?}; refusing to start rather than join the wrong cluster",
                cfg.data_dir.display(),
                id.node_id,
                id.cluster_id,
                c.id,
                c.name
            );
        }
    }
    let state_dir = layout.state_dir()?;
    let store = Store::open(&state_dir).with_context(|| {
        format!(
            "the state machine in {} cannot be opened; if it is damaged, rebuild this node from its peers",
            state_dir.display()
        )
    })?;
    let machine = LedgerMachine::open(StoreCell::new(Arc::new(store)), cfg.max_event_bytes).with_context(|| {
        format!("the state machine in {} is inconsistent; run `custody-ledger verify --data-dir {}`", state_dir.display(), cfg.data_dir.display())
    })?;
    if let Some(stored) = machine.cluster_id()? {
        if stored != c.name {
            bail!(
                "{} holds data of cluster {stored:?}, but this config is for cluster {:?}; refusing to start",
                cfg.data_dir.display(),
                c.name
            );
        }
    }
    if machine.removed().contains(&c.id) {
        bail!(
            "node {} was removed from cluster {:?}; it must not rejoin with its old data. Delete {} and add it back under a new id with `custody-ledger member add`",
            c.id,
            c.name,
            cfg.data_dir.display()
        );
    }
    let _ = layout.remove_stale();
    Ok((layout, log, machine))
}

/// Initialises an empty data directory as one of a new cluster's first members (what `serve`
/// does on first start with `cluster.state = "new"`), without serving. Returns false if the
/// directory was already initialised.
pub fn bootstrap_data(cfg: &LedgerConfig) -> anyhow::Result<bool> {
    cfg.check()?;
    if cfg.cluster.state != JoinState::New {
        bail!("cluster.state is \"join\": a joining node is initialised by the leader's snapshot, not bootstrapped");
    }
    let (_, log, mut machine) = open_data(cfg)?;
    if log.is_initialized() {
        return Ok(false);
    }
    initialise(cfg, &log, &mut machine)?;
    log.flush()?;
    Ok(true)
}

fn initialise(cfg: &LedgerConfig, log: &RaftLogStore, machine: &mut LedgerMachine) -> anyhow::Result<()> {
    let c = &cfg.cluster;
    match c.state {
        JoinState::New => {
            let members: Vec<Member> = if c.initial_members.is_empty() {
                vec![Member { id: c.id, peer_addr: cfg.peer_addr(), client_addr: cfg.client_addr(), learner: false }]
            } else {
                c.initial_members
                    .iter()
                    .map(|m| Member { id: m.id, peer_addr: m.peer.clone(), client_addr: m.client.clone(), learner: false })
                    .collect()
            };
            bootstrap(log, machine, &c.name, c.id, &members)?;
            info!(cluster = %c.name, id = c.id, voters = ?members.iter().map(|m| m.id).collect::<Vec<_>>(), "bootstrapped a new cluster");
        }
        JoinState::Join => {
            log.set_identity(&LogIdentity { cluster_id: c.name.clone(), node_id: c.id })?;
            info!(cluster = %c.name, id = c.id, "waiting for the leader to add this node (`custody-ledger member add`)");
        }
    }
    Ok(())
}

/// Serves until `shutdown` resolves or the node stops (fault, removal).
pub async fn run(cfg: LedgerConfig, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<Exit> {
    let span = tracing::info_span!("ledger", node = %cfg.node_id, raft_id = cfg.cluster.id);
    run_node(cfg, shutdown).instrument(span).await
}

async fn run_node(cfg: LedgerConfig, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<Exit> {
    cfg.check()?;
    let c = cfg.cluster.clone();
    let (layout, log, mut machine) = open_data(&cfg)?;
    if !log.is_initialized() {
        initialise(&cfg, &log, &mut machine)?;
    } else if log.identity()?.is_none() {
        log.set_identity(&LogIdentity { cluster_id: c.name.clone(), node_id: c.id })?;
    }
    let st = machine.state();
    info!(node = %cfg.node_id, raft_id = c.id, cluster = %c.name, size = st.next_index, head = %hex::encode(st.head), applied = machine.applied().0, "ledger opened");

    let metrics = Arc::new(LedgerMetrics::new());
    let mut opts = NodeOptions::new(c.id, &c.name);
    opts.tick = std::time::Duration::from_millis(c.tick_ms);
    opts.election_ticks = c.election_ticks;
    opts.heartbeat_ticks = c.heartbeat_ticks;
    opts.max_event_bytes = cfg.max_event_bytes;
    opts.snapshot_interval = c.snapshot_interval;
    opts.log_retain = c.log_retain;
    opts.block_max_entries = cfg.blocks.max_entries;
    opts.block_max_delay = std::time::Duration::from_millis(cfg.blocks.max_delay_ms);
    opts.unsafe_fault = c.unsafe_fault;
    if opts.unsafe_fault != crate::node::UnsafeFault::None {
        warn!(fault = ?opts.unsafe_fault, "UNSAFE TEST MODE: this node acknowledges appends it may lose");
    }
    let store = machine.store().clone();

    let peers = match (&c.tls, c.peer_listen) {
        (Some(tls), Some(addr)) => {
            let tls = PeerTls::load(&tls.ca, &tls.cert, &tls.key).context("loading the peer TLS files")?;
            let overrides: HashMap<u64, String> = c
                .peer_overrides
                .iter()
                .filter_map(|(k, v)| k.parse().ok().map(|id| (id, v.clone())))
                .collect();
            let listener = TcpListener::bind(addr).await.with_context(|| format!("binding the peer listener {addr}"))?;
            Some((PeerNet::new(c.id, &c.name, tls, layout.clone(), overrides, cfg.peer_addr(), tokio::runtime::Handle::current()), listener))
        }
        _ => None,
    };

    let (node_done_tx, mut node_done) = tokio::sync::oneshot::channel::<Result<(), String>>();
    let handle = match &peers {
        Some((net, _)) => {
            let (node, handle, rx) = Node::new(opts, log, machine, layout.clone(), net.clone(), metrics.clone())?;
            net.attach(handle.clone());
            spawn_loop(node, rx, node_done_tx)?;
            handle
        }
        None => {
            let (node, handle, rx) = Node::new(opts, log, machine, layout.clone(), NoPeers, metrics.clone())?;
            spawn_loop(node, rx, node_done_tx)?;
            handle
        }
    };
    if let Some((net, listener)) = peers {
        info!(peer = %listener.local_addr()?, "peer transport listening (mutual TLS)");
        tokio::spawn(net.serve(listener));
    }

    let integrity = Integrity::default();
    let service = LedgerService::new(
        &cfg.node_id,
        &c.name,
        &cfg.data_dir.display().to_string(),
        handle.clone(),
        AppendLimits { max_event_bytes: cfg.max_event_bytes, max_batch_events: 8192 },
    )
    .with_integrity(integrity.clone());
    let signer = crate::checkpoint::CheckpointSigner::open(&cfg.data_dir, &cfg.checkpoint_origin(), &cfg.node_id)
        .context("opening this node's checkpoint key")?;
    info!(key = %signer.verifier(), "checkpoint verifier key");
    let signer: SharedSigner = Arc::new(tokio::sync::Mutex::new(signer));
    let mut flight = LedgerFlight::new(store.clone(), handle.clone(), signer.clone(), integrity.clone());
    match &cfg.readers {
        Some(r) => {
            flight = flight.with_readers(crate::readers::ReaderGate::new(r).context("setting up the readers' token check")?);
            info!(groups = ?r.groups, issuers = r.issuers.len(), "reading the audit log needs an auditor's token");
        }
        None => warn!("reads are not authenticated: anyone who reaches {} can read the audit log; configure [readers] with issuers and auditor groups", cfg.listen),
    }
    if let Some(r) = &cfg.retention {
        let after = r.validate()?;
        tokio::spawn(crate::retention::run(r.clone(), after, handle.clone(), store.clone()));
    }
    tokio::spawn(sign_blocks(handle.clone(), store.clone(), signer.clone(), integrity.clone(), metrics.clone(), cfg.self_check.on_start));
    if cfg.self_check.on_start || cfg.self_check.interval_s > 0 {
        tokio::spawn(self_checks(cfg.self_check.clone(), store.clone(), signer.clone(), integrity.clone(), metrics.clone()));
    }

    let grpc = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding gRPC listener {}", cfg.listen))?;
    let http = TcpListener::bind(cfg.http_listen)
        .await
        .with_context(|| format!("binding HTTP listener {}", cfg.http_listen))?;
    info!(grpc = %grpc.local_addr()?, http = %http.local_addr()?, "ledger listening");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop_on_signal = stop_tx.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_on_signal.send(true);
    });

    let app = health_routes(handle.clone(), metrics.clone(), integrity.clone());
    let mut http_stop = stop_rx.clone();
    let http_task = tokio::spawn(async move {
        axum::serve(http, app)
            .with_graceful_shutdown(async move {
                let _ = http_stop.wait_for(|s| *s).await;
            })
            .await
    });

    let mut grpc_stop = stop_rx.clone();
    let grpc_task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                LedgerServer::new(service)
                    .max_decoding_message_size(MAX_GRPC_MESSAGE)
                    .max_encoding_message_size(MAX_GRPC_MESSAGE),
            )
            .add_service(
                FlightServiceServer::new(flight)
                    .max_decoding_message_size(MAX_GRPC_MESSAGE)
                    .max_encoding_message_size(MAX_GRPC_MESSAGE),
            )
            // Small gRPC frames (a status, a proof, a Flight SQL answer) must not wait for
            // delayed ACKs: without TCP_NODELAY each unary call on an idle connection can
            // stall ~40 ms on Linux.
            .serve_with_incoming_shutdown(tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(grpc), |s| {
                if let Ok(s) = &s {
                    let _ = s.set_nodelay(true);
                }
                s
            }), async move {
                let _ = grpc_stop.wait_for(|s| *s).await;
            }),
    );

    let mut stop_wait = stop_rx.clone();
    let mut loop_ended = false;
    let exit = tokio::select! {
        _ = stop_wait.wait_for(|s| *s) => {
            info!("ledger shutting down");
            Exit::Stopped
        }
        r = &mut node_done => {
            loop_ended = true;
            let _ = stop_tx.send(true);
            match r {
                Ok(Ok(())) => Exit::Stopped,
                Ok(Err(e)) if e.contains("removed from the cluster") => {
                    warn!("this node was removed from the cluster; stopping");
                    Exit::Removed
                }
                Ok(Err(e)) => {
                    let _ = grpc_task.await;
                    bail!("the ledger node stopped: {e}");
                }
                Err(_) => Exit::Stopped,
            }
        }
    };
    let _ = grpc_task.await;
    let _ = http_task.await;
    let _ = handle.send(crate::node::Input::Stop);
    drop(handle);
    if !loop_ended {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), node_done).await;
    }
    info!("ledger stopped");
    Ok(exit)
}

fn spawn_loop<T: Transport>(node: Node<T>, rx: std::sync::mpsc::Receiver<crate::node::Input>, done: tokio::sync::oneshot::Sender<Result<(), String>>) -> anyhow::Result<()> {
    let span = tracing::Span::current();
    std::thread::Builder::new()
        .name("raft-ready".into())
        .spawn(move || {
            let _entered = span.enter();
            // raft-rs panics on a log that lost entries it acknowledged (restored from an old
            // backup, or a disk that dropped synced writes); say so instead of dying silently.
            let r = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| node.run(rx))) {
                Ok(r) => r.map_err(|e| {
                    if !matches!(e, crate::node::NodeFault::Removed) {
                        error!(error = %e, "the ledger node stopped on a fault");
                    }
                    e.to_string()
                }),
                Err(p) => {
                    let what = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
                    let e = format!("the Raft loop failed: {what}; if this node's data was restored from a backup or its disk lost writes, its Raft log is behind what it acknowledged: remove it from the cluster, wipe its data directory and join it again");
                    error!("{e}");
                    Err(e)
                }
            };
            let _ = done.send(r);
        })
        .context("spawning the Raft loop")?;
    Ok(())
}

/// Signs the checkpoint of every new block with this node's key, so that the node checks each
/// block against the last checkpoint it signed (and alarms at once if they contradict), and a
/// checkpoint at the latest block is always ready to be cosigned.
async fn sign_blocks(node: crate::node::NodeHandle, store: crate::machine::StoreCell, signer: SharedSigner, integrity: Integrity, metrics: Arc<LedgerMetrics>, wait_for_check: bool) {
    let mut rx = node.watch();
    let mut signed: Option<u64> = None;
    while rx.changed().await.is_ok() {
        let (last_block, size) = {
            let st = rx.borrow_and_update();
            (st.last_block, st.ledger.map_or(0, |l| l.next_index))
        };
        let Some(b) = last_block else { continue };
        // Only what this node holds and has checked: after the start-up self-check, never
        // over a damaged range, never beyond its own entries.
        if signed.is_some_and(|h| h >= b.height) || (wait_for_check && integrity.checks().0 == 0) || integrity.check_range(b.tree_size).is_err() || b.tree_size > size {
            continue;
        }
        signed = Some(b.height);
        let store = store.get();
        let signer = signer.clone();
        let r = tokio::task::spawn_blocking(move || signer.blocking_lock().sign(&crate::state::StoredTree(store.as_ref()), b.tree_size).map(|_| ())).await;
        match r {
            Ok(Ok(())) => tracing::debug!(height = b.height, size = b.tree_size, "signed the checkpoint of block"),
            // The signer logged the alarm.
            Ok(Err(crate::checkpoint::CheckpointError::Inconsistent { .. })) => {
                metrics.checkpoints_refused.inc();
            }
            Ok(Err(e)) => warn!(height = b.height, error = %e, "cannot sign the checkpoint of a block"),
            Err(e) => warn!(error = %e, "block signing task failed"),
        }
    }
}

/// Checks the stored log at start-up (when asked) and then every `interval_s`.
async fn self_checks(cfg: crate::config::SelfCheckConfig, store: crate::machine::StoreCell, signer: SharedSigner, integrity: Integrity, metrics: Arc<LedgerMetrics>) {
    let interval = std::time::Duration::from_secs(cfg.interval_s);
    if !cfg.on_start {
        tokio::time::sleep(interval).await;
    }
    let mut catching_up = 0u32;
    loop {
        let signed = signer.lock().await.last_signed();
        let store = store.get();
        let i = integrity.clone();
        let mut again = interval;
        match tokio::task::spawn_blocking(move || crate::selfcheck::run_check(&store, signed, &i)).await {
            Ok(Ok((_, signed_checked))) => {
                metrics.self_checks_passed.inc();
                if !signed_checked && catching_up < 30 {
                    // Catching up after a restart: compare with the signed checkpoint soon.
                    catching_up += 1;
                    again = std::time::Duration::from_secs(10);
                }
            }
            Ok(Err(d)) => {
                metrics.self_checks_failed.inc();
                metrics.damaged_from.set(integrity.damage().map_or(d.from_index, |d| d.from_index) as i64);
            }
            Err(e) => warn!(error = %e, "self-check task failed"),
        }
        if cfg.interval_s == 0 && again == interval {
            break;
        }
        tokio::time::sleep(again).await;
    }
}

fn health_routes(node: crate::node::NodeHandle, metrics: Arc<LedgerMetrics>, integrity: Integrity) -> axum::Router {
    let ready_node = node.clone();
    let status_node = node;
    let ready_integrity = integrity.clone();
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let st = ready_node.status();
                let damage = ready_integrity.damage();
                async move {
                    match damage {
                        Some(d) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {d}\n")),
                        None => readiness(&st),
                    }
                }
            }),
        )
        .route(
            "/status",
            get(move || {
                let st = status_node.status();
                let damage = integrity.damage();
                let (checks, last_ok) = integrity.checks();
                async move {
                    let mut v = status_json(&st);
                    v["damage"] = damage.map_or(serde_json::Value::Null, |d| serde_json::json!({"from_index": d.from_index, "reason": d.reason}));
                    v["self_checks"] = serde_json::json!({"done": checks, "last_passed_size": last_ok});
                    axum::Json(v)
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move { m.render() }
            }),
        )
}

/// Ready: not faulted, a leader is known, and everything committed is applied.
fn readiness(st: &NodeStatus) -> (StatusCode, String) {
    let size = st.ledger.map(|l| l.next_index).unwrap_or(0);
    if let Some(f) = &st.fault {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: stopped on a fault: {f}\n"));
    }
    if st.leader_id == 0 {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: no leader known (role {}, term {})\n", st.role, st.term));
    }
    if st.applied < st.commit {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: applying ({} of {})\n", st.applied, st.commit));
    }
    (StatusCode::OK, format!("ready role={} leader={} term={} size={size} applied={}\n", st.role, st.leader_id, st.term, st.applied))
}

/// The node's status as JSON, for `custody-ledger status` and operators.
pub fn status_json(st: &NodeStatus) -> serde_json::Value {
    let ledger = st.ledger.unwrap_or_else(crate::state::LedgerState::empty);
    serde_json::json!({
        "raft_id": st.id,
        "role": st.role,
        "term": st.term,
        "leader_id": st.leader_id,
        "leader_addr": st.leader_addr(),
        "commit_index": st.commit,
        "applied_index": st.applied,
        "size": ledger.next_index,
        "head_hash": hex::encode(ledger.head),
        "tree_root": st.tree_root.map(hex::encode),
        "blocks": st.last_block.map_or(0, |b| b.height + 1),
        "sealed_size": st.last_block.map_or(0, |b| b.tree_size),
        "last_block_hash": st.last_block.map(|b| hex::encode(b.hash())),
        "voters": st.voters,
        "learners": st.learners,
        "members": st.members.iter().map(|m| serde_json::json!({"id": m.id, "peer_addr": m.peer_addr, "client_addr": m.client_addr, "learner": m.learner})).collect::<Vec<_>>(),
        "removed": st.removed,
        "log_first_index": st.log_first,
        "log_last_index": st.log_last,
        "fault": st.fault,
    })
}
