//! The client's config file and token cache, under `$CUSTODY_HOME` (default
//! `$XDG_CONFIG_HOME/custody`, else `~/.config/custody`).
//!
//! ```toml
//! proxy = "127.0.0.1:7443"          # QUIC address of a proxy
//! server_name = "localhost"         # TLS name on the proxy's certificate
//! pin = "sha256:…"                  # pin the proxy certificate (or set ca_file)
//! flight = "grpc://127.0.0.1:7400"  # ledger Flight endpoint for events/sessions/verify
//! issuer = "https://login.example.com"
//! client_id = "custody-cli"
//! audience = "urn:custody"          # resource indicator requested at login
//! ```

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// Client settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Proxy QUIC address (host:port).
    pub proxy: Option<String>,
    /// TLS server name of the proxy.
    pub server_name: Option<String>,
    /// `sha256:<hex>` of the proxy's certificate.
    pub pin: Option<String>,
    /// CA bundle that signs the proxy's certificate.
    pub ca_file: Option<PathBuf>,
    /// Ledger Flight URL.
    pub flight: Option<String>,
    /// OpenID issuer for `custody login`.
    pub issuer: Option<String>,
    /// OAuth client id for `custody login`.
    pub client_id: Option<String>,
    /// Resource indicator / audience requested at login.
    pub audience: Option<String>,
    /// Note shown by `custody status`, e.g. "written by custody dev".
    pub note: Option<String>,
    /// Pinned ledger verifier keys (`name+keyid+base64`), for `custody verify` and
    /// `custody checkpoint`.
    #[serde(default)]
    pub ledger_keys: Vec<String>,
}

/// The directory holding config and token cache.
pub fn home() -> PathBuf {
    if let Some(h) = std::env::var_os("CUSTODY_HOME") {
        return PathBuf::from(h);
    }
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME") {
        return PathBuf::from(x).join("custody");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".config").join("custody")
}

/// Path of the config file.
pub fn config_path() -> PathBuf {
    home().join("config.toml")
}

/// Where `custody verify` keeps the last checkpoint it verified, per ledger origin.
pub fn verified_path(origin: &str) -> PathBuf {
    let safe: String = origin.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' }).collect();
    home().join("verified").join(format!("{safe}.checkpoint"))
}

/// Path of the token cache.
pub fn token_path() -> PathBuf {
    home().join("token.json")
}

impl ClientConfig {
    /// Loads the config file; an absent file is an empty config.
    pub fn load() -> anyhow::Result<Self> {
        let p = config_path();
        match std::fs::read_to_string(&p) {
            Ok(t) => toml::from_str(&t).with_context(|| format!("parsing {}", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    /// Writes the config file.
    pub fn save(&self) -> anyhow::Result<PathBuf> {
        let p = config_path();
        write_private(&p, toml::to_string_pretty(self)?.as_bytes())?;
        Ok(p)
    }

    /// A required field, with a message saying how to set it.
    pub fn need<'a>(&self, v: &'a Option<String>, name: &str, flag: &str) -> anyhow::Result<&'a str> {
        match v {
            Some(s) if !s.is_empty() => Ok(s.as_str()),
            _ => bail!(
                "no {name} configured: pass {flag}, or set `{name} = ...` in {} (run `custody dev` for a local setup)",
                config_path().display()
            ),
        }
    }
}

/// Writes `bytes` to `path` with mode 0600, creating the directory (0700).
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
