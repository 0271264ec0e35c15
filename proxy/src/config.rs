//! Proxy configuration (TOML).
//!
//! ```toml
//! proxy_id = "proxy-1"
//! listen = "127.0.0.1:7443"            # QUIC (UDP)
//! http_listen = "127.0.0.1:7444"       # /healthz, /readyz, /metrics
//! ledger = ["http://127.0.0.1:7400"]   # ledger gRPC endpoints
//! append_timeout_ms = 5000             # fail closed after this long without a commit
//! record_bytes_limit = 65536           # rows/params kept per response, the rest is counted
//! max_message_bytes = 268435456        # largest client message, and largest server message
//!                                      # other than DataRow/CopyData (those stream through)
//! lease_ttl_ms = 10000                # a dead proxy's sessions are closed this long after
//!                                      # its last lease renewal
//! response_hold_ms = 5                 # hold an idle session's response events this long so
//!                                      # they share one commit with its next request (0: off)
//!
//! [tls]
//! cert = "/etc/custody/proxy.pem"
//! key = "/etc/custody/proxy-key.pem"   # must be mode 0600
//!
//! [[issuers]]
//! issuer = "https://login.example.com"
//! audiences = ["custody"]
//! groups_claim = "groups"
//!
//! [[resources]]
//! name = "pg-prod"
//! protocol = "postgres"
//! host = "10.0.0.5"
//! port = 5432
//! user = "custody_gateway"
//! password_file = "/etc/custody/pg-prod.password"   # must be mode 0600
//! tls = "verify-full"                  # disable | require | verify-full
//! ca_file = "/etc/custody/pg-ca.pem"
//!
//! [policy.groups]
//! dba = ["pg-prod"]
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

/// The whole proxy config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Stable id of this proxy; part of every event's idempotency key.
    pub proxy_id: String,
    /// QUIC listen address.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// HTTP listen address for health and metrics.
    #[serde(default = "default_http")]
    pub http_listen: SocketAddr,
    /// Ledger endpoints (gRPC URLs).
    pub ledger: Vec<String>,
    /// Milliseconds to wait for a commit before refusing the statement.
    #[serde(default = "default_append_timeout")]
    pub append_timeout_ms: u64,
    /// Bytes of rows / parameter values kept per response or request.
    #[serde(default = "default_record_limit")]
    pub record_bytes_limit: usize,
    /// Largest PostgreSQL message accepted from either side.
    #[serde(default = "default_max_message")]
    pub max_message_bytes: usize,
    /// How long a session at rest holds its response events so that they share one ledger
    /// commit with its next request. Responses reach the caller at once either way.
    #[serde(default = "default_response_hold")]
    pub response_hold_ms: u64,
    /// Length of the proxy's lease with the ledger; when a dead proxy's lease lapses, the
    /// ledger closes its open sessions.
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl_ms: u64,
    /// Most concurrent sessions.
    #[serde(default = "default_max_sessions")]
    pub max_sessions: usize,
    /// QUIC TLS certificate.
    pub tls: TlsConfig,
    /// Accepted token issuers.
    pub issuers: Vec<IssuerConfig>,
    /// Reachable targets.
    #[serde(default)]
    pub resources: Vec<ResourceConfig>,
    /// Who may reach what.
    #[serde(default)]
    pub policy: PolicyConfig,
}

/// QUIC listener certificate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key (mode 0600).
    pub key: PathBuf,
}

pub use custody_auth::IssuerConfig;

/// How the proxy reaches a PostgreSQL target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TargetTls {
    /// Plain TCP.
    #[default]
    Disable,
    /// TLS without certificate verification.
    Require,
    /// TLS, verifying the chain against `ca_file` (or system roots) and the host name.
    VerifyFull,
}

/// A reachable target.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceConfig {
    /// Name callers use (`custody connect NAME`).
    pub name: String,
    /// Wire protocol: "postgres".
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// Target host.
    pub host: String,
    /// Target port.
    #[serde(default = "default_pg_port")]
    pub port: u16,
    /// Role the gateway logs in as.
    pub user: String,
    /// The gateway's password, inline. Prefer `password_file`.
    #[serde(default)]
    pub password: Option<String>,
    /// File holding the gateway's password (mode 0600).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// If set, callers always get this database, whatever they ask for.
    #[serde(default)]
    pub database: Option<String>,
    /// TLS to the target.
    #[serde(default)]
    pub tls: TargetTls,
    /// CA bundle for `verify-full`.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for ResourceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The credential never reaches a log line, even through Debug.
        f.debug_struct("ResourceConfig")
            .field("name", &self.name)
            .field("protocol", &self.protocol)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("password_file", &self.password_file)
            .field("tls", &self.tls)
            .finish()
    }
}

/// Grants.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// group -> resource names (`*` for all).
    #[serde(default)]
    pub groups: BTreeMap<String, Vec<String>>,
    /// subject -> resource names, for callers without groups (CI clients).
    #[serde(default)]
    pub subjects: BTreeMap<String, Vec<String>>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7443))
}
fn default_http() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7444))
}
fn default_append_timeout() -> u64 {
    5000
}
fn default_record_limit() -> usize {
    64 * 1024
}
fn default_lease_ttl() -> u64 {
    10_000
}

fn default_response_hold() -> u64 {
    5
}
fn default_max_message() -> usize {
    256 << 20
}
fn default_max_sessions() -> usize {
    4096
}
fn default_protocol() -> String {
    "postgres".into()
}
fn default_pg_port() -> u16 {
    5432
}

/// Refuses a secrets file that others can read.
pub fn check_secret_file_mode(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "{} has mode {:o}; secrets files must not be readable by group or others (chmod 600 {})",
            path.display(),
            mode,
            path.display()
        );
    }
    Ok(())
}

impl ProxyConfig {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading proxy config {}", path.display()))?;
        let cfg: Self =
            toml::from_str(&text).with_context(|| format!("parsing proxy config {}", path.display()))?;
        cfg.check()?;
        Ok(cfg)
    }

    /// Checks cross-field rules.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.proxy_id.is_empty() || self.proxy_id.len() > 128 {
            bail!("proxy_id must be 1..=128 characters");
        }
        if self.ledger.is_empty() {
            bail!("at least one ledger endpoint is required");
        }
        if self.issuers.is_empty() {
            bail!("at least one [[issuers]] entry is required");
        }
        check_secret_file_mode(&self.tls.key)?;
        let mut names = std::collections::HashSet::new();
        for r in &self.resources {
            if !names.insert(&r.name) {
                bail!("resource {:?} is defined twice", r.name);
            }
            if r.protocol != "postgres" {
                bail!("resource {:?}: protocol {:?} is not supported (postgres)", r.name, r.protocol);
            }
            match (&r.password, &r.password_file) {
                (Some(_), Some(_)) => bail!("resource {:?}: set password or password_file, not both", r.name),
                (None, Some(p)) => check_secret_file_mode(p)
                    .with_context(|| format!("resource {:?}", r.name))?,
                _ => {}
            }
        }
        Ok(())
    }

    /// A resource by name.
    pub fn resource(&self, name: &str) -> Option<&ResourceConfig> {
        self.resources.iter().find(|r| r.name == name)
    }
}

/// A secret that never prints.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// Wraps a value.
    pub fn new(s: String) -> Self {
        Self(s)
    }
    /// The value, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl ResourceConfig {
    /// Reads the gateway's password for this resource.
    pub fn password(&self) -> anyhow::Result<Secret> {
        match (&self.password, &self.password_file) {
            (Some(p), _) => Ok(Secret::new(p.clone())),
            (None, Some(path)) => {
                let s = std::fs::read_to_string(path)
                    .with_context(|| format!("reading password file {}", path.display()))?;
                Ok(Secret::new(s.trim_end_matches(['\n', '\r']).to_string()))
            }
            (None, None) => Ok(Secret::new(String::new())),
        }
    }
}
