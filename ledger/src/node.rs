//! One ledger node's Raft replica: the Ready loop that drives raft-rs.
//!
//! A single thread owns the [`RawNode`]. It takes [`Input`]s from a bounded channel (appends,
//! lease renewals, Raft messages from peers, read-index requests, membership changes), ticks
//! the clock, and handles each `Ready` in the order raft-rs documents:
//!
//! 1. send the leader's messages (they may go out before the entries are persisted);
//! 2. install a snapshot, if one arrived;
//! 3. apply committed entries;
//! 4. persist new entries and the hard state in one synced write;
//! 5. send `persisted_messages` (only now: they promise the entries are on disk);
//! 6. `advance`; persist the new commit index; send and apply what the light ready holds.
//!
//! Appends that arrive while the loop is busy are proposed together as one Raft entry, so
//! they share one fsync on every node (group commit). An append is answered only once its
//! entry is committed and applied on this node. If this node stops being the leader before
//! that, the append is answered "outcome unknown": the caller retries with the same events,
//! and idempotency keys make the retry harmless.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use custody_proto::pb::ledger::{raft_command, AbandonCommand, AppendCommand, AppendGroup, AppendResult, LeaseCommand, Member, RaftCommand, SealCommand, SnapshotDescriptor, SnapshotFile};
use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, Message, MessageType, Snapshot};
use raft::{RawNode, StateRole};
use thiserror::Error;
use tokio::sync::{oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::layout::DataLayout;
use crate::machine::{Applied, LedgerMachine, MachineError};
use crate::metrics::LedgerMetrics;
use crate::raft_log::RaftLogStore;
use crate::state::LedgerState;
use crate::store::Store;

/// Why a request to the node failed.
#[derive(Debug, Error, Clone)]
#[non_exhaustive]
pub enum NodeError {
    /// This node is not the leader; ask the leader (if one is known).
    #[error("this ledger node is not the leader{}", leader_hint(*leader_id, leader_addr))]
    NotLeader {
        /// The leader's Raft id, 0 if unknown.
        leader_id: u64,
        /// The leader's client address, if known.
        leader_addr: Option<String>,
    },
    /// The request may or may not have been committed (leadership changed after it was
    /// proposed). Retry it unchanged: idempotency keys make that safe.
    #[error("outcome unknown: {0}; retry the same request")]
    Unknown(String),
    /// The ledger refused the request (invalid or conflicting events).
    #[error("{0}")]
    Refused(String),
    /// The node's queue is full.
    #[error("ledger node is overloaded: its queue is full")]
    Overloaded,
    /// Another membership change is still in flight; retry once it has been applied.
    #[error("{0}")]
    Busy(String),
    /// The node is stopping, or stopped after a fault.
    #[error("ledger node is not running")]
    ShuttingDown,
    /// No answer in time.
    #[error("ledger node did not answer within {0:?}")]
    Timeout(Duration),
}

fn leader_hint(id: u64, addr: &Option<String>) -> String {
    match (id, addr) {
        (0, _) => "; no leader is known right now".into(),
        (id, Some(a)) => format!("; the leader is node {id} at {a}"),
        (id, None) => format!("; the leader is node {id}"),
    }
}

/// A fatal fault that stopped the node.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum NodeFault {
    /// The state machine could not apply a committed entry.
    #[error("cannot apply committed entries: {0}")]
    Apply(#[from] MachineError),
    /// The Raft log could not be written or read.
    #[error("raft log: {0}")]
    Log(#[from] crate::raft_log::RaftLogError),
    /// raft-rs refused an operation that must succeed.
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// A snapshot could not be installed.
    #[error("installing a snapshot failed: {0}")]
    Snapshot(String),
    /// This node was removed from the cluster.
    #[error("this node was removed from the cluster")]
    Removed,
}

/// Test-only faults that make a node lie, so that the jepsen checker can be shown to catch
/// what they cause. Never set in production.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnsafeFault {
    /// Honest.
    #[default]
    None,
    /// Acknowledge appends as soon as they are proposed, before they are committed.
    AckBeforeCommit,
    /// Acknowledge every 50th append without storing it.
    DropAckedWrites,
}

/// How the node runs.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Raft id (non-zero).
    pub id: u64,
    /// The cluster's name.
    pub cluster_id: String,
    /// One Raft tick.
    pub tick: Duration,
    /// Ticks without a leader's heartbeat before an election.
    pub election_ticks: usize,
    /// Ticks between the leader's heartbeats.
    pub heartbeat_ticks: usize,
    /// Largest event.
    pub max_event_bytes: usize,
    /// Most events per Raft entry.
    pub max_batch_events: usize,
    /// Most bytes per Raft entry.
    pub max_batch_bytes: usize,
    /// Inputs that may wait for the loop.
    pub queue_depth: usize,
    /// Applied entries between state-machine snapshots (and log compaction).
    pub snapshot_interval: u64,
    /// Entries kept in the log behind a snapshot, for followers that are only a little behind.
    pub log_retain: u64,
    /// How often the leader looks for lapsed proxy leases.
    pub lease_check: Duration,
    /// Seal a block once this many entries are unsealed (0: never seal).
    pub block_max_entries: u64,
    /// Seal a block once the oldest unsealed entry is this old.
    pub block_max_delay: Duration,
    /// Test-only lies; see [`UnsafeFault`].
    pub unsafe_fault: UnsafeFault,
}

impl NodeOptions {
    /// Defaults for node `id` of `cluster_id`.
    pub fn new(id: u64, cluster_id: &str) -> Self {
        Self {
            id,
            cluster_id: cluster_id.into(),
            tick: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 2,
            max_event_bytes: 1 << 20,
            max_batch_events: 8192,
            max_batch_bytes: 16 << 20,
            queue_depth: 8192,
            snapshot_interval: 50_000,
            log_retain: 5_000,
            lease_check: Duration::from_secs(1),
            block_max_entries: 1024,
            block_max_delay: Duration::from_secs(1),
            unsafe_fault: UnsafeFault::None,
        }
    }
}

/// Sends Raft messages to peers. The node never waits on it.
pub trait Transport: Send + 'static {
    /// Queues messages for their recipients (dropping what cannot be queued: Raft resends).
    fn send(&self, msgs: Vec<Message>);
    /// Learns the members' addresses after a membership change.
    fn set_members(&self, members: &[Member]);
}

type Reply<T> = oneshot::Sender<Result<T, NodeError>>;

/// What the loop is asked to do.
pub enum Input {
    /// Append events (one request, applied all or nothing).
    Append {
        /// Encoded events.
        events: Vec<Bytes>,
        /// When it arrived (for the latency metric).
        arrived: Instant,
        /// Where the results go.
        reply: Reply<Vec<AppendResult>>,
    },
    /// Take or renew a proxy lease.
    Lease {
        /// The proxy.
        proxy_id: String,
        /// Its run.
        instance: String,
        /// Lease length.
        ttl: Duration,
        /// (expiry, sessions of an earlier run closed).
        reply: Reply<(i64, u32)>,
    },
    /// A message from a peer.
    Raft(Box<Message>),
    /// Resolve once this node has applied everything committed before the request
    /// (linearizable read barrier). Replies with the applied index.
    ReadIndex(Reply<u64>),
    /// Add or remove a member.
    Membership {
        /// The change.
        change: MembershipChange,
        /// Members after it.
        reply: Reply<Vec<Member>>,
    },
    /// Retention (leader only): propose pruning the payloads of entries `from..end`, with the
    /// PRUNE event to append. Replies once proposed; apply re-checks everything.
    Prune {
        /// First entry.
        from: u64,
        /// End, exclusive.
        end: u64,
        /// The encoded PRUNE event.
        event: Bytes,
        /// Proposed, or why not.
        reply: Reply<()>,
    },
    /// Hand leadership to another voter.
    TransferLeader(u64),
    /// A peer could not be reached.
    Unreachable(u64),
    /// Stop the loop (shutdown).
    Stop,
    /// How sending a snapshot to a peer went.
    SnapshotSent {
        /// The peer.
        to: u64,
        /// Whether the send succeeded.
        ok: bool,
    },
}

/// A membership change.
#[derive(Debug, Clone)]
pub enum MembershipChange {
    /// Add a voter (or a learner).
    Add(Member),
    /// Remove a member.
    Remove(u64),
}

/// What the node publishes after every loop turn.
#[derive(Debug, Clone, Default)]
pub struct NodeStatus {
    /// Raft id.
    pub id: u64,
    /// Role.
    pub role: String,
    /// Current term.
    pub term: u64,
    /// Known leader (0: none).
    pub leader_id: u64,
    /// Commit index.
    pub commit: u64,
    /// Applied index.
    pub applied: u64,
    /// Ledger state (size and chain head).
    pub ledger: Option<LedgerState>,
    /// Members.
    pub members: Vec<Member>,
    /// Voters.
    pub voters: Vec<u64>,
    /// Learners.
    pub learners: Vec<u64>,
    /// Raft log range held.
    pub log_first: u64,
    /// Last log index.
    pub log_last: u64,
    /// Nodes removed from the cluster (never readmitted).
    pub removed: Vec<u64>,
    /// When this node last heard from a leader (or is the leader).
    pub leader_contact: Option<Instant>,
    /// Merkle tree root at the ledger's size (`None` if it could not be read).
    pub tree_root: Option<custody_proto::merkle::Hash>,
    /// The last block sealed.
    pub last_block: Option<custody_proto::block::BlockHeader>,
    /// Set when the node stopped on a fault.
    pub fault: Option<String>,
}

impl NodeStatus {
    /// The leader's client address, if known.
    pub fn leader_addr(&self) -> Option<String> {
        self.members
            .iter()
            .find(|m| m.id == self.leader_id && self.leader_id != 0)
            .map(|m| m.client_addr.clone())
            .filter(|a| !a.is_empty())
    }
}

/// A cheap handle to the node's loop.
#[derive(Clone)]
pub struct NodeHandle {
    tx: SyncSender<Input>,
    status: watch::Receiver<NodeStatus>,
}

impl NodeHandle {
    /// Queues an input without waiting.
    pub fn send(&self, i: Input) -> Result<(), NodeError> {
        match self.tx.try_send(i) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(NodeError::Overloaded),
            Err(TrySendError::Disconnected(_)) => Err(NodeError::ShuttingDown),
        }
    }

    /// Appends events; resolves once committed and applied, with one result per event.
    pub async fn append(&self, events: Vec<Bytes>, timeout: Duration) -> Result<Vec<AppendResult>, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Input::Append {
            events,
            arrived: Instant::now(),
            reply,
        })?;
        wait(rx, timeout).await
    }

    /// Takes or renews a proxy's lease.
    pub async fn lease(&self, proxy_id: String, instance: String, ttl: Duration, timeout: Duration) -> Result<(i64, u32), NodeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Input::Lease { proxy_id, instance, ttl, reply })?;
        wait(rx, timeout).await
    }

    /// Proposes a prune (leader only); see [`Input::Prune`].
    pub async fn prune(&self, from: u64, end: u64, event: Bytes, timeout: Duration) -> Result<(), NodeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Input::Prune { from, end, event, reply })?;
        wait(rx, timeout).await
    }

    /// A linearizable read barrier: resolves once this node has applied everything
    /// committed when it was called.
    pub async fn read_index(&self, timeout: Duration) -> Result<u64, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Input::ReadIndex(reply))?;
        wait(rx, timeout).await
    }

    /// Adds or removes a member; resolves once the change is applied here.
    pub async fn change_membership(&self, change: MembershipChange, timeout: Duration) -> Result<Vec<Member>, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.send(Input::Membership { change, reply })?;
        wait(rx, timeout).await
    }

    /// The latest status.
    pub fn status(&self) -> NodeStatus {
        self.status.borrow().clone()
    }

    /// A receiver of status updates.
    pub fn watch(&self) -> watch::Receiver<NodeStatus> {
        self.status.clone()
    }
}

async fn wait<T>(rx: oneshot::Receiver<Result<T, NodeError>>, timeout: Duration) -> Result<T, NodeError> {
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(NodeError::ShuttingDown),
        Err(_) => Err(NodeError::Timeout(timeout)),
    }
}

struct PendingAppend {
    events: Vec<Bytes>,
    arrived: Instant,
    reply: Reply<Vec<AppendResult>>,
}

enum Waiter {
    Append(Vec<(Reply<Vec<AppendResult>>, Instant)>),
    Lease(Reply<(i64, u32)>),
    Membership(Reply<Vec<Member>>),
    /// Nobody waits (an abandonment the leader proposed itself).
    None,
}

struct Proposal {
    term: u64,
    waiter: Waiter,
}

/// The Ready loop's state.
pub struct Node<T: Transport> {
    opts: NodeOptions,
    raw: RawNode<RaftLogStore>,
    log: RaftLogStore,
    machine: LedgerMachine,
    layout: DataLayout,
    transport: T,
    metrics: Arc<LedgerMetrics>,
    status_tx: watch::Sender<NodeStatus>,
    pending: Vec<PendingAppend>,
    pending_bytes: usize,
    proposals: HashMap<u64, Proposal>,
    next_proposal: u64,
    reads: HashMap<u64, Reply<u64>>,
    ready_reads: VecDeque<(u64, Reply<u64>)>,
    role: StateRole,
    leader_contact: Option<Instant>,
    /// The Merkle root last published, and the ledger size it is for.
    root_cache: std::cell::Cell<(u64, custody_proto::merkle::Hash)>,
    next_lease_check: Instant,
    abandon_in_flight: HashMap<String, Instant>,
    /// When this node last became the leader (wall clock, unix ns).
    leader_since_ns: i64,
    /// The tree size this leader last proposed to seal up to, and when.
    seal_in_flight: Option<(u64, Instant)>,
    /// When this leader first saw entries that no block holds yet.
    unsealed_since: Option<Instant>,
    retired: Vec<Arc<Store>>,
    removed_self: bool,
    stopping: bool,
    dropped_acks: u64,
}

static PROPOSAL_SEED: AtomicU64 = AtomicU64::new(1);

/// Wall-clock unix ns (the leader's proposals carry it; apply never reads a clock).
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// raft-rs logs through slog; this forwards its records to `tracing`.
struct TracingDrain;

struct KvText(String);

impl slog::Serializer for KvText {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments<'_>) -> slog::Result {
        use std::fmt::Write;
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;
    fn log(&self, record: &slog::Record<'_>, values: &slog::OwnedKVList) -> Result<(), slog::Never> {
        use slog::KV;
        let mut kv = KvText(String::new());
        let _ = record.kv().serialize(record, &mut kv);
        let _ = values.serialize(record, &mut kv);
        let msg = format!("{}{}", record.msg(), kv.0);
        match record.level() {
            slog::Level::Critical | slog::Level::Error => error!(target: "raft", "{msg}"),
            slog::Level::Warning => warn!(target: "raft", "{msg}"),
            slog::Level::Info => info!(target: "raft", "{msg}"),
            slog::Level::Debug => debug!(target: "raft", "{msg}"),
            slog::Level::Trace => tracing::trace!(target: "raft", "{msg}"),
        }
        Ok(())
    }
}

fn raft_logger(id: u64) -> slog::Logger {
    use slog::Drain;
    slog::Logger::root(TracingDrain.fuse(), slog::o!("raft_id" => id))
}

fn role_name(r: StateRole) -> &'static str {
    match r {
        StateRole::Leader => "leader",
        StateRole::Follower => "follower",
        StateRole::Candidate => "candidate",
        StateRole::PreCandidate => "pre_candidate",
    }
}

/// Bootstraps a new cluster's first members on an empty node: the log starts after a
/// synthetic snapshot at index 1 holding the initial voters, so any node added later must
/// catch up from a real snapshot (which carries the membership) rather than from entries
/// that never mention the first voters.
pub fn bootstrap(log: &RaftLogStore, machine: &mut LedgerMachine, cluster_id: &str, id: u64, members: &[Member]) -> Result<(), NodeFault> {
    let mut cs = ConfState::default();
    cs.voters = members.iter().filter(|m| !m.learner).map(|m| m.id).collect();
    cs.learners = members.iter().filter(|m| m.learner).map(|m| m.id).collect();
    let mut meta = raft::eraftpb::SnapshotMetadata::default();
    meta.index = 1;
    meta.term = 1;
    meta.set_conf_state(cs.clone());
    log.apply_snapshot(&meta)?;
    log.set_identity(&crate::raft_log::LogIdentity {
        cluster_id: cluster_id.into(),
        node_id: id,
    })?;
    machine
        .bootstrap(cluster_id, members, cs.write_to_bytes().unwrap_or_default(), 1, 1)
        .map_err(|e| NodeFault::Apply(e.into()))?;
    Ok(())
}

impl<T: Transport> Node<T> {
    /// Builds the node over an opened log and machine.
    pub fn new(
        opts: NodeOptions,
        log: RaftLogStore,
        machine: LedgerMachine,
        layout: DataLayout,
        transport: T,
        metrics: Arc<LedgerMetrics>,
    ) -> Result<(Self, NodeHandle, mpsc::Receiver<Input>), NodeFault> {
        let (applied, _) = machine.applied();
        // The commit index is written without a sync; what was applied was committed.
        if log.hard_state().commit < applied {
            log.set_commit(applied)?;
        }
        let cfg = raft::Config {
            id: opts.id,
            election_tick: opts.election_ticks,
            heartbeat_tick: opts.heartbeat_ticks,
            applied,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            read_only_option: raft::ReadOnlyOption::Safe,
            ..Default::default()
        };
        cfg.validate()?;
        let raw = RawNode::new(&cfg, log.clone(), &raft_logger(opts.id))?;
        let (tx, rx) = mpsc::sync_channel(opts.queue_depth);
        let (status_tx, status_rx) = watch::channel(NodeStatus::default());
        let members: Vec<Member> = machine.members().values().cloned().collect();
        transport.set_members(&members);
        let node = Self {
            next_lease_check: Instant::now() + opts.lease_check,
            opts,
            raw,
            log,
            machine,
            layout,
            transport,
            metrics,
            status_tx,
            pending: Vec::new(),
            pending_bytes: 0,
            proposals: HashMap::new(),
            next_proposal: PROPOSAL_SEED.fetch_add(1 << 40, Ordering::Relaxed) ^ (now_ns() as u64),
            reads: HashMap::new(),
            ready_reads: VecDeque::new(),
            role: StateRole::Follower,
            leader_contact: None,
            root_cache: std::cell::Cell::new((0, custody_proto::merkle::empty_root())),
            abandon_in_flight: HashMap::new(),
            seal_in_flight: None,
            unsealed_since: None,
            leader_since_ns: now_ns(),
            retired: Vec::new(),
            removed_self: false,
            stopping: false,
            dropped_acks: 0,
        };
        node.publish();
        Ok((node, NodeHandle { tx, status: status_rx }, rx))
    }

    /// Runs the loop until every handle is dropped or a fault stops it.
    pub fn run(mut self, rx: mpsc::Receiver<Input>) -> Result<(), NodeFault> {
        let tick = self.opts.tick;
        let mut next_tick = Instant::now() + tick;
        // A single voter has nobody to wait for: campaign at once.
        if self.raw.raft.prs().conf().voters().ids().len() == 1 && self.raw.raft.prs().conf().voters().contains(self.opts.id) {
            let _ = self.raw.campaign();
        }
        let result = loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(i) => self.handle(i),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break Ok(()),
            }
            for _ in 0..4096 {
                match rx.try_recv() {
                    Ok(i) => self.handle(i),
                    Err(_) => break,
                }
                if self.pending_bytes >= self.opts.max_batch_bytes {
                    break;
                }
            }
            let now = Instant::now();
            if now >= next_tick {
                self.raw.tick();
                next_tick = now + tick;
                if let Err(e) = self.periodic() {
                    break Err(e);
                }
            }
            self.propose_pending();
            self.propose_seal();
            if let Err(e) = self.on_ready() {
                break Err(e);
            }
            self.publish();
            if self.removed_self {
                break Err(NodeFault::Removed);
            }
            if self.stopping {
                break Ok(());
            }
        };
        if let Err(e) = &result {
            let mut st = self.status_tx.borrow().clone();
            st.fault = Some(e.to_string());
            let _ = self.status_tx.send(st);
        }
        self.fail_all(|| NodeError::ShuttingDown);
        let _ = self.log.flush();
        result
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Append { events, arrived, reply } => {
                self.pending_bytes += events.iter().map(|e| e.len()).sum::<usize>();
                self.pending.push(PendingAppend { events, arrived, reply });
            }
            Input::Prune { from, end, event, reply } => {
                if !self.is_leader() {
                    let _ = reply.send(Err(self.not_leader()));
                    return;
                }
                let cmd = RaftCommand { command: Some(raft_command::Command::Prune(custody_proto::pb::ledger::PruneCommand { now_ns: now_ns(), from_index: from, end_index: end, event: event.to_vec() })) };
                self.propose(cmd, Waiter::None);
                let _ = reply.send(Ok(()));
            }
            Input::Lease { proxy_id, instance, ttl, reply } => {
                if !self.is_leader() {
                    let _ = reply.send(Err(self.not_leader()));
                    return;
                }
                let now = now_ns();
                // A new run of the proxy: close what its previous run left open. The
                // events are built once, here, and replicated as they are.
                let abandon_events = match self.machine.lease(&proxy_id) {
                    Some(prev) if prev.instance != instance => self
                        .machine
                        .abandon_events(&proxy_id, Some(&prev.instance), None, now, &format!("proxy {proxy_id} restarted; this session's proxy run ended without closing it"))
                        .unwrap_or_default(),
                    _ => Vec::new(),
                };
                let cmd = RaftCommand {
                    command: Some(raft_command::Command::Lease(LeaseCommand {
                        proxy_id,
                        instance,
                        now_ns: now,
                        ttl_ns: ttl.as_nanos().min(i64::MAX as u128) as i64,
                        abandon_events,
                    })),
                };
                self.propose(cmd, Waiter::Lease(reply));
            }
            Input::Raft(m) => {
                if self.machine.removed().contains(&m.from) {
                    debug!(from = m.from, "dropped a message from a removed node");
                    return;
                }
                if matches!(m.get_msg_type(), MessageType::MsgAppend | MessageType::MsgHeartbeat | MessageType::MsgSnapshot) {
                    self.leader_contact = Some(Instant::now());
                }
                if let Err(e) = self.raw.step(*m) {
                    debug!(error = %e, "raft refused a message");
                }
            }
            Input::ReadIndex(reply) => {
                let id = self.next_id();
                self.reads.insert(id, reply);
                self.raw.read_index(id.to_be_bytes().to_vec());
            }
            Input::Membership { change, reply } => self.propose_membership(change, reply),
            Input::TransferLeader(to) => self.raw.transfer_leader(to),
            Input::Stop => self.stopping = true,
            Input::Unreachable(id) => self.raw.report_unreachable(id),
            Input::SnapshotSent { to, ok } => self.raw.report_snapshot(
                to,
                if ok { raft::SnapshotStatus::Finish } else { raft::SnapshotStatus::Failure },
            ),
        }
    }

    fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    fn not_leader(&self) -> NodeError {
        let leader_id = self.raw.raft.leader_id;
        NodeError::NotLeader {
            leader_id,
            leader_addr: self
                .machine
                .members()
                .get(&leader_id)
                .map(|m| m.client_addr.clone())
                .filter(|a| !a.is_empty()),
        }
    }

    fn next_id(&mut self) -> u64 {
        self.next_proposal = self.next_proposal.wrapping_add(1);
        self.next_proposal
    }

    fn propose(&mut self, cmd: RaftCommand, waiter: Waiter) {
        let id = self.next_id();
        let data = cmd.encode_to_vec();
        match self.raw.propose(id.to_be_bytes().to_vec(), data) {
            Ok(()) => {
                self.proposals.insert(id, Proposal { term: self.raw.raft.term, waiter });
            }
            Err(e) => {
                let err = match e {
                    raft::Error::ProposalDropped => self.not_leader(),
                    other => NodeError::Unknown(other.to_string()),
                };
                fail_waiter(waiter, err);
            }
        }
    }

    fn propose_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        if !self.is_leader() {
            let err = self.not_leader();
            for p in pending {
                let _ = p.reply.send(Err(err.clone()));
            }
            return;
        }
        let mut groups = Vec::new();
        let mut replies = Vec::new();
        let (mut n, mut bytes) = (0usize, 0usize);
        for p in pending {
            let (pn, pb) = (p.events.len(), p.events.iter().map(|e| e.len()).sum::<usize>());
            if !groups.is_empty() && (n + pn > self.opts.max_batch_events || bytes + pb > self.opts.max_batch_bytes) {
                self.propose_groups(std::mem::take(&mut groups), std::mem::take(&mut replies), n);
                (n, bytes) = (0, 0);
            }
            n += pn;
            bytes += pb;
            match self.opts.unsafe_fault {
                UnsafeFault::AckBeforeCommit => {
                    let fake = (0..pn).map(|_| AppendResult { index: u64::MAX, commit_time_ns: 0, duplicate: false }).collect();
                    let _ = p.reply.send(Ok(fake));
                    groups.push(AppendGroup { events: p.events });
                    continue;
                }
                UnsafeFault::DropAckedWrites => {
                    self.dropped_acks += 1;
                    if self.dropped_acks % 50 == 0 {
                        let fake = (0..pn).map(|_| AppendResult { index: u64::MAX, commit_time_ns: 0, duplicate: false }).collect();
                        let _ = p.reply.send(Ok(fake));
                        continue;
                    }
                }
                UnsafeFault::None => {}
            }
            groups.push(AppendGroup { events: p.events });
            replies.push((p.reply, p.arrived));
        }
        if !groups.is_empty() {
            self.propose_groups(groups, replies, n);
        }
    }

    fn propose_groups(&mut self, groups: Vec<AppendGroup>, replies: Vec<(Reply<Vec<AppendResult>>, Instant)>, events: usize) {
        self.metrics.batch_size.observe(events as f64);
        let cmd = RaftCommand {
            command: Some(raft_command::Command::Append(AppendCommand {
                commit_time_ns: now_ns(),
                groups,
            })),
        };
        self.propose(cmd, Waiter::Append(replies));
    }

    fn propose_membership(&mut self, change: MembershipChange, reply: Reply<Vec<Member>>) {
        if !self.is_leader() {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        let mut cc = ConfChangeV2::default();
        let mut single = ConfChangeSingle::default();
        match &change {
            MembershipChange::Add(m) => {
                if self.machine.removed().contains(&m.id) {
                    let _ = reply.send(Err(NodeError::Refused(format!("node id {} was removed from this cluster and cannot be reused; pick a new id", m.id))));
                    return;
                }
                single.node_id = m.id;
                single.set_change_type(if m.learner { ConfChangeType::AddLearnerNode } else { ConfChangeType::AddNode });
                cc.context = m.encode_to_vec().into();
            }
            MembershipChange::Remove(id) => {
                if !self.machine.members().contains_key(id) {
                    let _ = reply.send(Err(NodeError::Refused(format!("node {id} is not a member"))));
                    return;
                }
                single.node_id = *id;
                single.set_change_type(ConfChangeType::RemoveNode);
            }
        }
        cc.changes = vec![single].into();
        // raft-rs would turn a second change into an empty entry and accept it, leaving the
        // caller to wait out its deadline for an "unknown" outcome: refuse it here instead.
        if self.raw.raft.has_pending_conf() {
            let _ = reply.send(Err(NodeError::Busy("another membership change is not applied yet; retry once it is (one change at a time)".into())));
            return;
        }
        let id = self.next_id();
        match self.raw.propose_conf_change(id.to_be_bytes().to_vec(), cc) {
            Ok(()) => {
                self.proposals.insert(id, Proposal { term: self.raw.raft.term, waiter: Waiter::Membership(reply) });
            }
            Err(e) => {
                let _ = reply.send(Err(NodeError::Busy(format!("membership change refused: {e} (one change at a time; retry once the last one is applied)"))));
            }
        }
    }

    /// Leader: proposes sealing the entries no block holds yet, in blocks of at most
    /// `block_max_entries`, once that many are waiting or the oldest has waited
    /// `block_max_delay`. Apply skips what is already sealed, so a repeat is harmless.
    fn propose_seal(&mut self) {
        let max = self.opts.block_max_entries;
        if max == 0 || !self.is_leader() {
            self.unsealed_since = None;
            return;
        }
        let now = Instant::now();
        let size = self.machine.state().next_index;
        let sealed = self.machine.sealed_size();
        let from = match self.seal_in_flight {
            Some((end, at)) if end > sealed && now.duration_since(at) < Duration::from_secs(5) => end,
            _ => sealed,
        };
        if size <= from {
            if size <= sealed {
                self.unsealed_since = None;
            }
            return;
        }
        let since = *self.unsealed_since.get_or_insert(now);
        let overdue = now.duration_since(since) >= self.opts.block_max_delay;
        let mut ends = Vec::new();
        let mut end = from;
        while size - end >= max {
            end += max;
            ends.push(end);
        }
        if overdue && end < size {
            ends.push(size);
            end = size;
        }
        if ends.is_empty() {
            return;
        }
        self.seal_in_flight = Some((end, now));
        if end >= size {
            self.unsealed_since = None;
        }
        let cmd = RaftCommand { command: Some(raft_command::Command::Seal(SealCommand { sealed_at_ns: now_ns(), ends })) };
        self.propose(cmd, Waiter::None);
    }

    /// Leader chores on the tick: close sessions of lapsed leases; snapshots.
    fn periodic(&mut self) -> Result<(), NodeFault> {
        let now = Instant::now();
        self.retired.retain(|s| Arc::strong_count(s) > 1);
        // Read requests no leader answered: their callers gave up.
        self.reads.retain(|_, r| !r.is_closed());
        if self.is_leader() {
            self.leader_contact = Some(now);
            if now >= self.next_lease_check {
                self.next_lease_check = now + self.opts.lease_check;
                self.abandon_in_flight.retain(|_, at| now.duration_since(*at) < Duration::from_secs(10));
                let wall = now_ns();
                for (proxy_id, lease) in self.machine.lapsed_leases(wall, self.leader_since_ns) {
                    if self.abandon_in_flight.contains_key(&proxy_id) {
                        continue;
                    }
                    let detail = format!("proxy {proxy_id} stopped renewing its lease; it died or lost contact with the ledger");
                    let events = self.machine.abandon_events(&proxy_id, Some(&lease.instance), None, wall, &detail).unwrap_or_default();
                    self.abandon_in_flight.insert(proxy_id.clone(), now);
                    let cmd = RaftCommand {
                        command: Some(raft_command::Command::Abandon(AbandonCommand {
                            proxy_id,
                            instance: lease.instance,
                            now_ns: wall,
                            lease_expires_ns: lease.expires_ns,
                            events,
                        })),
                    };
                    self.propose(cmd, Waiter::None);
                }
            }
        }
        // Snapshots: one was asked for by raft-rs, or the log is long enough to compact.
        let wanted = self.log.snapshot_slot().lock().map(|s| s.wanted).unwrap_or(None);
        let (applied, _) = self.machine.applied();
        if wanted.is_some() || applied.saturating_sub(self.log.first()) >= self.opts.snapshot_interval + self.opts.log_retain {
            self.make_snapshot()?;
        }
        Ok(())
    }

    /// Checkpoints the state machine, offers it to followers, and compacts the log.
    fn make_snapshot(&mut self) -> Result<(), NodeFault> {
        let (applied, term) = self.machine.applied();
        let name = format!("snap-{applied}-{term}");
        let dir = self.layout.snapshots_out().join(&name);
        if !dir.exists() {
            let tmp = self.layout.snapshots_out().join(format!("{name}.tmp"));
            let _ = std::fs::remove_dir_all(&tmp);
            self.machine
                .store()
                .get()
                .checkpoint(&tmp)
                .map_err(|e| NodeFault::Snapshot(format!("checkpoint: {e}")))?;
            std::fs::rename(&tmp, &dir).map_err(|e| NodeFault::Snapshot(format!("rename checkpoint: {e}")))?;
        }
        let mut files = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(|e| NodeFault::Snapshot(e.to_string()))? {
            let e = e.map_err(|e| NodeFault::Snapshot(e.to_string()))?;
            let md = e.metadata().map_err(|e| NodeFault::Snapshot(e.to_string()))?;
            if md.is_file() {
                files.push(SnapshotFile {
                    name: e.file_name().to_string_lossy().into_owned(),
                    size: md.len(),
                });
            }
        }
        files.sort_by(|a, b| a.name.cmp(&b.name));
        let desc = SnapshotDescriptor {
            cluster_id: self.opts.cluster_id.clone(),
            leader_id: self.opts.id,
            name: name.clone(),
            applied_index: applied,
            files,
        };
        let cs = ConfState::parse_from_bytes(self.machine.conf_state_bytes()).map_err(|e| NodeFault::Snapshot(format!("conf state: {e}")))?;
        let mut snap = Snapshot::default();
        snap.data = desc.encode_to_vec().into();
        snap.mut_metadata().index = applied;
        snap.mut_metadata().term = term;
        snap.mut_metadata().set_conf_state(cs);
        {
            let slot = self.log.snapshot_slot();
            let mut s = slot.lock().unwrap_or_else(|p| p.into_inner());
            s.ready = Some(snap);
            s.wanted = None;
        }
        info!(index = applied, term, name = %name, "state machine snapshot ready");
        // Keep the two newest checkpoints; a follower may still be fetching the older one.
        let mut old: Vec<_> = std::fs::read_dir(self.layout.snapshots_out())
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        old.sort_by_key(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.split('-').nth(1))
                .and_then(|i| i.parse::<u64>().ok())
                .unwrap_or(0)
        });
        while old.len() > 2 {
            let p = old.remove(0);
            let _ = std::fs::remove_dir_all(p);
        }
        // The checkpoint flushed the state machine: entries up to `applied` are durable there.
        let compact_to = applied.saturating_sub(self.opts.log_retain);
        if compact_to > self.log.first() {
            self.log.compact(compact_to)?;
            info!(first_index = compact_to, "raft log compacted");
        }
        Ok(())
    }

    fn on_ready(&mut self) -> Result<(), NodeFault> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        if let Some(ss) = ready.ss() {
            if ss.raft_state != self.role {
                info!(role = role_name(ss.raft_state), leader = ss.leader_id, term = self.raw.raft.term, "raft role changed");
                if self.role == StateRole::Leader {
                    // Our proposals may be overwritten by the next leader.
                    self.fail_proposals(|| NodeError::Unknown("this node lost the leadership before the append was committed".into()));
                }
                self.role = ss.raft_state;
                if self.role == StateRole::Leader {
                    self.leader_since_ns = now_ns();
                }
            }
        }
        if !ready.messages().is_empty() {
            self.transport.send(ready.take_messages());
        }
        if !ready.snapshot().is_empty() {
            let snap = ready.snapshot().clone();
            self.install_snapshot(&snap)?;
        }
        self.apply(ready.take_committed_entries())?;
        if !ready.entries().is_empty() || ready.hs().is_some() {
            let sync = ready.must_sync() || !ready.entries().is_empty();
            self.log.persist(ready.entries(), ready.hs(), sync)?;
        }
        for rs in ready.take_read_states() {
            if let Ok(b) = <[u8; 8]>::try_from(&rs.request_ctx[..]) {
                if let Some(reply) = self.reads.remove(&u64::from_be_bytes(b)) {
                    self.ready_reads.push_back((rs.index, reply));
                }
            }
        }
        if !ready.persisted_messages().is_empty() {
            self.transport.send(ready.take_persisted_messages());
        }
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.log.set_commit(commit)?;
        }
        if !light.messages().is_empty() {
            self.transport.send(light.take_messages());
        }
        self.apply(light.take_committed_entries())?;
        self.raw.advance_apply();
        self.resolve_reads();
        Ok(())
    }

    fn resolve_reads(&mut self) {
        let (applied, _) = self.machine.applied();
        while let Some((idx, _)) = self.ready_reads.front() {
            if *idx > applied {
                break;
            }
            if let Some((_, reply)) = self.ready_reads.pop_front() {
                let _ = reply.send(Ok(applied));
            }
        }
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), NodeFault> {
        for e in entries {
            let (applied, _) = self.machine.applied();
            if e.index <= applied {
                continue;
            }
            let pid = <[u8; 8]>::try_from(&e.context[..]).ok().map(u64::from_be_bytes);
            match e.get_entry_type() {
                EntryType::EntryNormal if e.data.is_empty() => {
                    self.machine.apply_empty(e.index, e.term).map_err(MachineError::from)?;
                }
                EntryType::EntryNormal => {
                    let outcome = self.machine.apply(e.index, e.term, &e.data)?;
                    if let Applied::Append(groups) = &outcome {
                        for g in groups {
                            match g {
                                Ok(rs) => {
                                    let dup = rs.iter().filter(|r| r.duplicate).count() as u64;
                                    self.metrics.events_duplicate.inc_by(dup);
                                    self.metrics.events_appended.inc_by(rs.len() as u64 - dup);
                                }
                                Err(_) => {
                                    self.metrics.appends_failed.inc();
                                }
                            }
                        }
                    }
                    if let Some(p) = pid.and_then(|id| self.proposals.remove(&id)) {
                        self.answer(p, e.term, outcome);
                    }
                }
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    let cc: ConfChangeV2 = if e.get_entry_type() == EntryType::EntryConfChange {
                        let v1 = ConfChange::parse_from_bytes(&e.data).map_err(|err| MachineError::BadEntry { index: e.index, reason: err.to_string() })?;
                        {
                            // This node never proposes v1 changes; convert one if it appears.
                            let mut single = ConfChangeSingle::default();
                            single.node_id = v1.node_id;
                            single.set_change_type(v1.get_change_type());
                            let mut v2 = ConfChangeV2::default();
                            v2.changes = vec![single].into();
                            v2.context = v1.context.clone();
                            v2
                        }
                    } else {
                        ConfChangeV2::parse_from_bytes(&e.data).map_err(|err| MachineError::BadEntry { index: e.index, reason: err.to_string() })?
                    };
                    let cs = self.raw.apply_conf_change(&cc)?;
                    self.log.set_conf_state(&cs)?;
                    let mut added = Vec::new();
                    let mut removed = Vec::new();
                    for ch in cc.changes.iter() {
                        match ch.get_change_type() {
                            ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                                let mut m = Member::decode(&cc.context[..]).unwrap_or_default();
                                m.id = ch.node_id;
                                m.learner = ch.get_change_type() == ConfChangeType::AddLearnerNode;
                                added.push(m);
                            }
                            ConfChangeType::RemoveNode => removed.push(ch.node_id),
                        }
                    }
                    info!(index = e.index, added = ?added.iter().map(|m| m.id).collect::<Vec<_>>(), removed = ?removed, voters = ?cs.voters, "membership changed");
                    if removed.contains(&self.opts.id) {
                        self.removed_self = true;
                    }
                    self.machine
                        .apply_membership(e.index, e.term, cs.write_to_bytes().unwrap_or_default(), added, removed)
                        .map_err(MachineError::from)?;
                    let members: Vec<Member> = self.machine.members().values().cloned().collect();
                    self.transport.set_members(&members);
                    if let Some(p) = pid.and_then(|id| self.proposals.remove(&id)) {
                        if let Waiter::Membership(reply) = p.waiter {
                            let _ = reply.send(Ok(members));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn answer(&mut self, p: Proposal, term: u64, outcome: Applied) {
        if p.term != term {
            fail_waiter(p.waiter, NodeError::Unknown("the entry was replaced by another leader's".into()));
            return;
        }
        match (p.waiter, outcome) {
            (Waiter::Append(replies), Applied::Append(groups)) => {
                for ((reply, arrived), g) in replies.into_iter().zip(groups) {
                    self.metrics.append_latency.observe(arrived.elapsed().as_secs_f64());
                    let _ = reply.send(g.map_err(NodeError::Refused));
                }
            }
            (Waiter::Lease(reply), Applied::Lease { expires_ns, abandoned }) => {
                let _ = reply.send(Ok((expires_ns, abandoned)));
            }
            (Waiter::None, Applied::Abandoned(n)) => {
                if n > 0 {
                    info!(sessions = n, "closed the open sessions of a lapsed proxy lease");
                }
            }
            (Waiter::None, Applied::Pruned { pruned, held }) => {
                info!(pruned, held, "retention: pruned exported payloads from hot storage (held sessions kept)");
            }
            (w, _) => fail_waiter(w, NodeError::Unknown("unexpected outcome".into())),
        }
    }

    fn install_snapshot(&mut self, snap: &Snapshot) -> Result<(), NodeFault> {
        let meta = snap.get_metadata();
        let desc = SnapshotDescriptor::decode(&snap.data[..]).map_err(|e| NodeFault::Snapshot(format!("descriptor: {e}")))?;
        if desc.cluster_id != self.opts.cluster_id {
            return Err(NodeFault::Snapshot(format!(
                "the leader's snapshot belongs to cluster {:?}, this node to {:?}",
                desc.cluster_id, self.opts.cluster_id
            )));
        }
        let fetched = self.layout.snapshots_in().join(&desc.name);
        if !fetched.exists() {
            return Err(NodeFault::Snapshot(format!("snapshot {} was not fetched before it was stepped", desc.name)));
        }
        // The fetch checked it too; check again before it replaces anything.
        check_checkpoint(&fetched, meta.index).map_err(NodeFault::Snapshot)?;
        let dir = self.layout.install(&fetched).map_err(|e| NodeFault::Snapshot(format!("installing: {e}")))?;
        let store = Arc::new(Store::open(&dir).map_err(|e| NodeFault::Snapshot(format!("opening installed snapshot: {e}")))?);
        let old = self.machine.store().get();
        self.machine.store().replace(store);
        self.retired.push(old);
        self.machine.reload().map_err(MachineError::from)?;
        self.log.apply_snapshot(meta)?;
        let members: Vec<Member> = self.machine.members().values().cloned().collect();
        self.transport.set_members(&members);
        info!(index = meta.index, term = meta.term, name = %desc.name, "installed a snapshot from the leader");
        Ok(())
    }

    fn fail_proposals(&mut self, err: impl Fn() -> NodeError) {
        for (_, p) in self.proposals.drain() {
            fail_waiter(p.waiter, err());
        }
    }

    fn fail_all(&mut self, err: impl Fn() -> NodeError) {
        self.fail_proposals(&err);
        for p in self.pending.drain(..) {
            let _ = p.reply.send(Err(err()));
        }
        for (_, r) in self.reads.drain() {
            let _ = r.send(Err(err()));
        }
        for (_, r) in self.ready_reads.drain(..) {
            let _ = r.send(Err(err()));
        }
    }

    fn tree_root(&self) -> Option<custody_proto::merkle::Hash> {
        let size = self.machine.state().next_index;
        let (cached, root) = self.root_cache.get();
        if cached == size {
            return Some(root);
        }
        match self.machine.tree_root(size) {
            Ok(r) => {
                self.root_cache.set((size, r));
                Some(r)
            }
            Err(e) => {
                warn!(error = %e, "cannot read the Merkle root");
                None
            }
        }
    }

    fn publish(&self) {
        let st = self.raw.raft.prs().conf().to_conf_state();
        let status = NodeStatus {
            id: self.opts.id,
            role: role_name(self.raw.raft.state).into(),
            term: self.raw.raft.term,
            leader_id: self.raw.raft.leader_id,
            commit: self.raw.raft.raft_log.committed,
            applied: self.machine.applied().0,
            ledger: Some(self.machine.state()),
            members: self.machine.members().values().cloned().collect(),
            voters: st.voters.clone(),
            learners: st.learners.clone(),
            log_first: self.log.first(),
            log_last: self.log.last(),
            removed: self.machine.removed().iter().copied().collect(),
            leader_contact: self.leader_contact,
            tree_root: self.tree_root(),
            last_block: self.machine.last_block(),
            fault: None,
        };
        self.metrics.term.set(status.term as i64);
        self.metrics.leader.set(status.leader_id as i64);
        self.metrics.is_leader.set(i64::from(self.raw.raft.state == StateRole::Leader));
        self.metrics.commit_index.set(status.commit as i64);
        self.metrics.applied_index.set(status.applied as i64);
        self.metrics.size.set(self.machine.state().next_index as i64);
        self.metrics.blocks.set(status.last_block.map_or(0, |b| b.height as i64 + 1));
        let _ = self.status_tx.send(status);
    }
}

fn fail_waiter(w: Waiter, err: NodeError) {
    match w {
        Waiter::Append(rs) => {
            for (r, _) in rs {
                let _ = r.send(Err(err.clone()));
            }
        }
        Waiter::Lease(r) => {
            let _ = r.send(Err(err));
        }
        Waiter::Membership(r) => {
            let _ = r.send(Err(err));
        }
        Waiter::None => {}
    }
}

/// Checks that the RocksDB checkpoint in `dir` opens as a ledger and holds the state applied
/// up to Raft index `index`.
pub(crate) fn check_checkpoint(dir: &std::path::Path, index: u64) -> Result<(), String> {
    let s = Store::open(dir).map_err(|e| format!("fetched snapshot does not open: {e}"))?;
    let cell = crate::machine::StoreCell::new(Arc::new(s));
    let m = LedgerMachine::open(cell, usize::MAX).map_err(|e| format!("fetched snapshot is inconsistent: {e}"))?;
    if m.applied().0 != index {
        return Err(format!("fetched snapshot holds index {}, the leader said {index}", m.applied().0));
    }
    Ok(())
}
