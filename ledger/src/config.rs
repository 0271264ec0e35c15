//! Ledger node configuration, read from TOML.
//!
//! ```toml
//! node_id = "ledger-1"
//! data_dir = "/var/lib/custody/ledger"
//! listen = "127.0.0.1:7400"        # gRPC: Append API and Arrow Flight
//! http_listen = "127.0.0.1:7401"   # /healthz, /readyz, /metrics
//! max_event_bytes = 1048576
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

/// A ledger node's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerConfig {
    /// Name of this node in logs and status.
    #[serde(default = "default_node_id")]
    pub node_id: String,
    /// RocksDB directory.
    pub data_dir: PathBuf,
    /// gRPC address (Append and Flight).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// HTTP address for health and metrics.
    #[serde(default = "default_http")]
    pub http_listen: SocketAddr,
    /// Largest single event accepted.
    #[serde(default = "default_max_event")]
    pub max_event_bytes: usize,
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

impl LedgerConfig {
    /// Reads a config file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading ledger config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing ledger config {}", path.display()))
    }
}
