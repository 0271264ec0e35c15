//! Where the caller's token comes from, without ever prompting: `--token-file`, then
//! `CUSTODY_TOKEN`, then the cache `custody login` wrote (refreshed if it has expired).

use std::path::Path;

use anyhow::{bail, Context};
use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::config::{token_path, write_private};

/// What `custody login` caches (mode 0600).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CachedToken {
    /// The bearer token presented to proxies.
    pub token: String,
    /// Refresh token, if the issuer gave one.
    #[serde(default)]
    pub refresh_token: Option<String>,
    /// Unix seconds when `token` expires.
    #[serde(default)]
    pub expires_at: Option<i64>,
    /// Issuer that issued it.
    #[serde(default)]
    pub issuer: String,
    /// OAuth client id used.
    #[serde(default)]
    pub client_id: String,
    /// Audience / resource requested.
    #[serde(default)]
    pub audience: String,
}

impl CachedToken {
    /// Reads the cache.
    pub fn load() -> anyhow::Result<Option<Self>> {
        let p = token_path();
        match std::fs::read(&p) {
            Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| format!("parsing {}", p.display()))?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    /// Writes the cache with mode 0600.
    pub fn save(&self) -> anyhow::Result<()> {
        write_private(&token_path(), &serde_json::to_vec_pretty(self)?)
    }
}

/// `exp` of a JWT, read without verification (only to decide whether to refresh).
pub fn jwt_expiry(token: &str) -> Option<i64> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("exp")?.as_i64()
}

/// Where a token came from, for messages.
#[derive(Debug, Clone)]
pub enum TokenSource {
    /// `--token-file PATH`.
    File(std::path::PathBuf),
    /// `CUSTODY_TOKEN`.
    Env,
    /// The login cache.
    Cache,
}

/// Finds the token to present, refreshing a cached one if needed.
pub async fn resolve(token_file: Option<&Path>) -> anyhow::Result<(String, TokenSource)> {
    if let Some(p) = token_file {
        let t = std::fs::read_to_string(p).with_context(|| format!("reading token file {}", p.display()))?;
        let t = t.trim().to_string();
        if t.is_empty() {
            bail!("token file {} is empty", p.display());
        }
        return Ok((t, TokenSource::File(p.to_path_buf())));
    }
    if let Ok(t) = std::env::var("CUSTODY_TOKEN") {
        let t = t.trim().to_string();
        if !t.is_empty() {
            return Ok((t, TokenSource::Env));
        }
    }
    let Some(cached) = CachedToken::load()? else {
        bail!("no token: set CUSTODY_TOKEN, pass --token-file, or run `custody login`");
    };
    let now = chrono::Utc::now().timestamp();
    let exp = cached.expires_at.or_else(|| jwt_expiry(&cached.token));
    if exp.is_some_and(|e| e <= now + 30) {
        if cached.refresh_token.is_some() {
            let fresh = crate::login::refresh(&cached).await.context(
                "the cached token expired and refreshing it failed; run `custody login` again",
            )?;
            fresh.save()?;
            return Ok((fresh.token, TokenSource::Cache));
        }
        bail!("the cached token expired; run `custody login` again");
    }
    Ok((cached.token, TokenSource::Cache))
}
