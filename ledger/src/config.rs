//! Ledger node configuration, read from TOML.
//!
//! A single node needs only a data directory. A cluster node names its Raft id, the cluster,
//! where its peers reach it, and the mutual-TLS files its peers check:
//!
//! ```toml
//! node_id = "ledger-1"                    # name in logs and status
//! data_dir = "/var/lib/custody/ledger"
//! listen = "0.0.0.0:7400"                 # gRPC: Append API, Status, Arrow Flight
//! http_listen = "0.0.0.0:7401"            # /healthz, /readyz, /metrics
//! max_event_bytes = 1048576
//!
//! [cluster]
//! id = 1                                  # Raft id, unique, never reused after removal
//! name = "prod-audit"                     # every node of a cluster has the same name
//! peer_listen = "0.0.0.0:7410"            # Raft transport (mutual TLS)
//! advertise_client = "ledger-1:7400"      # what proxies are told (default: listen)
//! advertise_peer = "ledger-1:7410"        # what peers dial (default: peer_listen)
//! state = "new"                           # "new": bootstrap from initial_members when empty;
//!                                         # "join": wait for the leader to add this node
//! initial_members = [
//!   { id = 1, peer = "ledger-1:7410", client = "ledger-1:7400" },
//!   { id = 2, peer = "ledger-2:7410", client = "ledger-2:7400" },
//!   { id = 3, peer = "ledger-3:7410", client = "ledger-3:7400" },
//! ]
//!
//! [checkpoint]
//! origin = "audit.example.com/prod"      # first line of every signed checkpoint
//!                                         # (default custody/<cluster name>); this node's key
//!                                         # is <data_dir>/checkpoint.key, made on first start
//!
//! [blocks]
//! max_entries = 1024                      # seal a block every N entries (0: no blocks)
//! max_delay_ms = 1000                     # ... or once the oldest unsealed entry is T ms old
//!
//! [readers]                              # who may read the audit log (Flight, Flight SQL)
//! groups = ["auditors"]                   # the token must carry one of these groups
//! issuers = [{ issuer = "https://idp.example.com", audiences = ["urn:custody-ledger"] }]
//!                                         # absent: reads are not authenticated (a warning
//!                                         # at start); checkpoints, blocks and consistency
//!                                         # proofs are public either way
//!
//! [retention]                            # absent: payloads are kept forever
//! archive = "s3://audit-lake/custody"     # the export target that counts (file:///dir too)
//! prune_after = "90d"                     # prune blocks sealed longer ago, once exported there
//! interval_s = 60                         # and read back and checked by the leader
//!
//! [self_check]
//! on_start = true                         # check the stored log against the last signed
//! interval_s = 3600                       # checkpoint at start and then every interval (0: never)
//!
//! [cluster.tls]
//! ca = "/etc/custody/ledger-ca.pem"
//! cert = "/etc/custody/ledger-1.pem"      # must be valid for the DNS name ledger-<id>
//! key = "/etc/custody/ledger-1-key.pem"   # must be mode 0600
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::node::UnsafeFault;

/// A ledger node's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerConfig {
    /// Name of this node in logs and status.
    #[serde(default = "default_node_id")]
    pub node_id: String,
    /// Data directory (Raft log and state machine).
    pub data_dir: PathBuf,
    /// gRPC address (Append, Status and Flight).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// HTTP address for health and metrics.
    #[serde(default = "default_http")]
    pub http_listen: SocketAddr,
    /// Largest single event accepted.
    #[serde(default = "default_max_event")]
    pub max_event_bytes: usize,
    /// Replication settings; absent for a single node.
    #[serde(default)]
    pub cluster: ClusterConfig,
    /// Signed checkpoints.
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// Sealing entries into blocks.
    #[serde(default)]
    pub blocks: BlocksConfig,
    /// The node's check of its own stored log.
    #[serde(default)]
    pub self_check: SelfCheckConfig,
    /// Who may read events, sessions and entries; absent: anyone who reaches the node.
    pub readers: Option<ReadersConfig>,
    /// Pruning exported payloads from hot storage; absent: nothing is ever pruned.
    pub retention: Option<crate::retention::RetentionConfig>,
}

/// The tokens that may read the audit log.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadersConfig {
    /// Issuers whose bearer tokens are accepted.
    pub issuers: Vec<custody_auth::IssuerConfig>,
    /// A reader's token must carry one of these groups.
    pub groups: Vec<String>,
}

/// When the leader seals entries into blocks (through Raft; every node signs each block's
/// checkpoint).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlocksConfig {
    /// Seal once this many entries wait (0: never seal).
    #[serde(default = "default_block_entries")]
    pub max_entries: u64,
    /// Seal once the oldest waiting entry is this many ms old.
    #[serde(default = "default_block_delay")]
    pub max_delay_ms: u64,
}

impl Default for BlocksConfig {
    fn default() -> Self {
        Self { max_entries: default_block_entries(), max_delay_ms: default_block_delay() }
    }
}

fn default_block_entries() -> u64 {
    1024
}
fn default_block_delay() -> u64 {
    1000
}

/// When the node re-reads its whole stored log and checks it against its Merkle tree, its
/// blocks and the last checkpoint it signed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelfCheckConfig {
    /// Check at start-up (in the background; reads wait for nothing).
    #[serde(default = "default_true")]
    pub on_start: bool,
    /// Seconds between checks while running (0: only at start-up).
    #[serde(default = "default_self_check_interval")]
    pub interval_s: u64,
}

impl Default for SelfCheckConfig {
    fn default() -> Self {
        Self { on_start: true, interval_s: default_self_check_interval() }
    }
}

fn default_true() -> bool {
    true
}
fn default_self_check_interval() -> u64 {
    3600
}

/// How this node signs checkpoints.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// The log's origin, the first line of every checkpoint (default `custody/<cluster name>`).
    /// This node's key name is `<origin>/<node_id>`.
    pub origin: Option<String>,
}

impl LedgerConfig {
    /// The checkpoint origin.
    pub fn checkpoint_origin(&self) -> String {
        self.checkpoint.origin.clone().unwrap_or_else(|| format!("custody/{}", self.cluster.name))
    }
}

/// How this node takes part in a cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Raft id.
    #[serde(default = "default_id")]
    pub id: u64,
    /// The cluster's name, recorded at bootstrap and checked at every start.
    #[serde(default = "default_cluster")]
    pub name: String,
    /// Raft transport listen address (needs `tls`).
    pub peer_listen: Option<SocketAddr>,
    /// Client address announced to others (default `listen`).
    pub advertise_client: Option<String>,
    /// Peer address announced to others (default `peer_listen`).
    pub advertise_peer: Option<String>,
    /// `new` or `join`.
    #[serde(default)]
    pub state: JoinState,
    /// The voters a new cluster starts with (default: this node alone).
    #[serde(default)]
    pub initial_members: Vec<InitialMember>,
    /// Addresses to dial instead of the members' own (NAT, or a test relay), by Raft id.
    #[serde(default)]
    pub peer_overrides: BTreeMap<String, String>,
    /// Mutual TLS for the peer transport.
    pub tls: Option<PeerTlsConfig>,
    /// Milliseconds per Raft tick.
    #[serde(default = "default_tick")]
    pub tick_ms: u64,
    /// Ticks before an election.
    #[serde(default = "default_election")]
    pub election_ticks: usize,
    /// Ticks between heartbeats.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_ticks: usize,
    /// Applied entries between snapshots.
    #[serde(default = "default_snapshot_interval")]
    pub snapshot_interval: u64,
    /// Entries kept behind a snapshot.
    #[serde(default = "default_log_retain")]
    pub log_retain: u64,
    /// Testing only: make this node lie (see `UnsafeFault`).
    #[serde(default)]
    pub unsafe_fault: UnsafeFault,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            id: default_id(),
            name: default_cluster(),
            peer_listen: None,
            advertise_client: None,
            advertise_peer: None,
            state: JoinState::New,
            initial_members: Vec::new(),
            peer_overrides: BTreeMap::new(),
            tls: None,
            tick_ms: default_tick(),
            election_ticks: default_election(),
            heartbeat_ticks: default_heartbeat(),
            snapshot_interval: default_snapshot_interval(),
            log_retain: default_log_retain(),
            unsafe_fault: UnsafeFault::None,
        }
    }
}

/// Whether an empty node starts a cluster or waits to be added to one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JoinState {
    /// Bootstrap from `initial_members` when the data directory is empty.
    #[default]
    New,
    /// Wait for the leader to send a snapshot after `custody-ledger member add`.
    Join,
}

/// One of the first voters.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitialMember {
    /// Raft id.
    pub id: u64,
    /// Peer address.
    pub peer: String,
    /// Client address.
    pub client: String,
}

/// Peer TLS files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerTlsConfig {
    /// CA that signs every node's certificate.
    pub ca: PathBuf,
    /// This node's certificate (valid for `ledger-<id>`).
    pub cert: PathBuf,
    /// Its key (mode 0600).
    pub key: PathBuf,
}

fn default_node_id() -> String {
    "ledger-1".into()
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7400))
}
fn default_http() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7401))
}
fn default_max_event() -> usize {
    1 << 20
}
fn default_id() -> u64 {
    1
}
fn default_cluster() -> String {
    "custody".into()
}
fn default_tick() -> u64 {
    100
}
fn default_election() -> usize {
    10
}
fn default_heartbeat() -> usize {
    2
}
fn default_snapshot_interval() -> u64 {
    50_000
}
fn default_log_retain() -> u64 {
    5_000
}

impl LedgerConfig {
    /// Reads a config file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading ledger config {}", path.display()))?;
        let cfg: Self = toml::from_str(&text).with_context(|| format!("parsing ledger config {}", path.display()))?;
        cfg.check()?;
        Ok(cfg)
    }

    /// A single node on `data_dir` with default addresses.
    pub fn single(data_dir: PathBuf) -> Self {
        Self {
            node_id: default_node_id(),
            data_dir,
            listen: default_listen(),
            http_listen: default_http(),
            max_event_bytes: default_max_event(),
            cluster: ClusterConfig::default(),
            checkpoint: CheckpointConfig::default(),
            blocks: BlocksConfig::default(),
            self_check: SelfCheckConfig::default(),
            readers: None,
            retention: None,
        }
    }

    /// Checks what can be checked without touching the network or the disk.
    pub fn check(&self) -> anyhow::Result<()> {
        if let Some(r) = &self.retention {
            r.validate()?;
        }
        if let Some(r) = &self.readers {
            if r.issuers.is_empty() || r.groups.is_empty() {
                bail!("[readers] needs at least one issuer and one auditor group (or leave [readers] out to allow every reader)");
            }
        }
        let c = &self.cluster;
        if c.id == 0 {
            bail!("cluster.id must be a positive number");
        }
        if c.name.is_empty() || c.name.len() > 128 {
            bail!("cluster.name must be 1..=128 characters");
        }
        let mut seen = std::collections::BTreeSet::new();
        for m in &c.initial_members {
            if m.id == 0 || !seen.insert(m.id) {
                bail!("cluster.initial_members: ids must be positive and unique (id {})", m.id);
            }
        }
        let multi = c.initial_members.len() > 1 || c.state == JoinState::Join;
        if multi && (c.peer_listen.is_none() || c.tls.is_none()) {
            bail!("a cluster node needs cluster.peer_listen and cluster.tls (ca, cert, key) for its peers");
        }
        if !c.initial_members.is_empty() && c.state == JoinState::New && !seen.contains(&c.id) {
            bail!("cluster.state = \"new\" but this node (id {}) is not in cluster.initial_members", c.id);
        }
        for k in c.peer_overrides.keys() {
            k.parse::<u64>()
                .with_context(|| format!("cluster.peer_overrides: key {k:?} is not a Raft id"))?;
        }
        if c.tick_ms == 0 || c.heartbeat_ticks == 0 || c.election_ticks <= c.heartbeat_ticks {
            bail!("cluster: tick_ms and heartbeat_ticks must be positive, election_ticks larger than heartbeat_ticks");
        }
        Ok(())
    }

    /// The address proxies are told to use for this node.
    pub fn client_addr(&self) -> String {
        self.cluster.advertise_client.clone().unwrap_or_else(|| self.listen.to_string())
    }

    /// The address peers dial.
    pub fn peer_addr(&self) -> String {
        self.cluster
            .advertise_peer
            .clone()
            .or_else(|| self.cluster.peer_listen.map(|a| a.to_string()))
            .unwrap_or_default()
    }
}
