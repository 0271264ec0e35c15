//! `custody login`: OpenID Connect authorization code + PKCE with a loopback redirect
//! (RFC 8252), using the `openidconnect` crate. The token is cached with mode 0600.

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use openidconnect::core::{CoreAuthenticationFlow, CoreClient, CoreProviderMetadata};
use openidconnect::{
    AuthorizationCode, ClientId, CsrfToken, IssuerUrl, Nonce, OAuth2TokenResponse, PkceCodeChallenge, RedirectUrl,
    RefreshToken, Scope, TokenResponse,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::token::{jwt_expiry, CachedToken};

/// What to log in to.
#[derive(Debug, Clone)]
pub struct LoginOptions {
    /// Issuer URL.
    pub issuer: String,
    /// Public client id.
    pub client_id: String,
    /// Resource indicator for the access token (RFC 8707).
    pub audience: String,
    /// Do not try to open a browser; just print the URL.
    pub no_browser: bool,
    /// Ask for a refresh token (`offline_access`).
    pub offline: bool,
    /// Give up after this long.
    pub timeout: Duration,
}

fn http() -> anyhow::Result<openidconnect::reqwest::Client> {
    Ok(openidconnect::reqwest::ClientBuilder::new()
        .redirect(openidconnect::reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()?)
}

fn looks_like_jwt(t: &str) -> bool {
    t.split('.').count() == 3
}

/// Runs the login and returns the token to cache. `on_url` receives the authorization URL
/// (printed for people; driven over HTTP by tests and by `custody dev`).
pub async fn login(opts: &LoginOptions, on_url: impl FnOnce(&str)) -> anyhow::Result<CachedToken> {
    let http = http()?;
    let issuer = IssuerUrl::new(opts.issuer.clone()).context("invalid issuer URL")?;
    let meta = CoreProviderMetadata::discover_async(issuer, &http)
        .await
        .map_err(|e| anyhow!("OpenID discovery at {} failed: {e}", opts.issuer))?;
    let listener = TcpListener::bind("127.0.0.1:0").await.context("binding the loopback redirect listener")?;
    let port = listener.local_addr()?.port();
    let redirect = format!("http://127.0.0.1:{port}/callback");
    let client = CoreClient::from_provider_metadata(meta, ClientId::new(opts.client_id.clone()), None)
        .set_redirect_uri(RedirectUrl::new(redirect)?);
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let mut req = client
        .authorize_url(
            CoreAuthenticationFlow::AuthorizationCode,
            CsrfToken::new_random,
            Nonce::new_random,
        )
        .add_scope(Scope::new("email".into()))
        .add_scope(Scope::new("profile".into()))
        .set_pkce_challenge(challenge);
    if opts.offline {
        req = req.add_scope(Scope::new("offline_access".into())).add_extra_param("prompt", "consent");
    }
    if !opts.audience.is_empty() {
        req = req.add_extra_param("resource", opts.audience.clone());
    }
    let (url, csrf, nonce) = req.url();
    on_url(url.as_str());
    if !opts.no_browser {
        let _ = std::process::Command::new("xdg-open")
            .arg(url.as_str())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }
    let (code, state) = tokio::time::timeout(opts.timeout, wait_for_callback(&listener))
        .await
        .map_err(|_| anyhow!("login timed out after {} s waiting for the browser", opts.timeout.as_secs()))??;
    if state != *csrf.secret() {
        bail!("login callback carried the wrong state parameter (possible CSRF); try again");
    }
    let mut exchange = client
        .exchange_code(AuthorizationCode::new(code))
        .context("the issuer has no token endpoint")?
        .set_pkce_verifier(verifier);
    if !opts.audience.is_empty() {
        exchange = exchange.add_extra_param("resource", opts.audience.clone());
    }
    let resp = exchange
        .request_async(&http)
        .await
        .map_err(|e| anyhow!("token exchange failed: {e}"))?;
    if let Some(id) = resp.id_token() {
        // Check the ID token (issuer, signature, nonce) so a tampered response is refused.
        id.claims(&client.id_token_verifier(), &nonce)
            .map_err(|e| anyhow!("the issuer's ID token did not verify: {e}"))?;
    }
    let access = resp.access_token().secret().clone();
    let token = if looks_like_jwt(&access) {
        access
    } else {
        resp.id_token()
            .map(|t| t.to_string())
            .ok_or_else(|| anyhow!("the issuer returned neither a JWT access token nor an ID token"))?
    };
    Ok(CachedToken {
        expires_at: jwt_expiry(&token),
        token,
        refresh_token: resp.refresh_token().map(|r| r.secret().clone()),
        issuer: opts.issuer.clone(),
        client_id: opts.client_id.clone(),
        audience: opts.audience.clone(),
    })
}

/// Serves one request on the loopback listener and returns `(code, state)`.
async fn wait_for_callback(listener: &TcpListener) -> anyhow::Result<(String, String)> {
    loop {
        let (mut s, _) = listener.accept().await?;
        let mut buf = vec![0u8; 8192];
        let mut n = 0;
        while n < buf.len() {
            let r = s.read(&mut buf[n..]).await?;
            if r == 0 {
                break;
            }
            n += r;
            if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        let head = String::from_utf8_lossy(&buf[..n]);
        let path = head.split_whitespace().nth(1).unwrap_or("");
        let Ok(url) = url::Url::parse(&format!("http://127.0.0.1{path}")) else { continue };
        if url.path() != "/callback" {
            let _ = s.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n").await;
            continue;
        }
        let q: std::collections::HashMap<String, String> = url.query_pairs().into_owned().collect();
        if let Some(err) = q.get("error") {
            let _ = s
                .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 13\r\n\r\nlogin failed\n")
                .await;
            bail!(
                "the issuer refused the login: {err}: {}",
                q.get("error_description").map(String::as_str).unwrap_or("")
            );
        }
        let (Some(code), Some(state)) = (q.get("code"), q.get("state")) else {
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n").await;
            continue;
        };
        let body = "Logged in to custody. You can close this tab.\n";
        let _ = s
            .write_all(format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}", body.len()).as_bytes())
            .await;
        return Ok((code.clone(), state.clone()));
    }
}

/// Uses the cached refresh token to get a new token.
pub async fn refresh(cached: &CachedToken) -> anyhow::Result<CachedToken> {
    let rt = cached.refresh_token.clone().context("no refresh token cached")?;
    let http = http()?;
    let meta = CoreProviderMetadata::discover_async(IssuerUrl::new(cached.issuer.clone())?, &http)
        .await
        .map_err(|e| anyhow!("OpenID discovery at {} failed: {e}", cached.issuer))?;
    let client = CoreClient::from_provider_metadata(meta, ClientId::new(cached.client_id.clone()), None);
    let rt = RefreshToken::new(rt);
    let mut req = client
        .exchange_refresh_token(&rt)
        .context("the issuer has no token endpoint")?;
    if !cached.audience.is_empty() {
        req = req.add_extra_param("resource", cached.audience.clone());
    }
    let resp = req.request_async(&http).await.map_err(|e| anyhow!("refresh failed: {e}"))?;
    let access = resp.access_token().secret().clone();
    let token = if looks_like_jwt(&access) {
        access
    } else {
        resp.id_token().map(|t| t.to_string()).context("refresh returned no usable token")?
    };
    Ok(CachedToken {
        expires_at: jwt_expiry(&token),
        token,
        refresh_token: resp
            .refresh_token()
            .map(|r| r.secret().clone())
            .or_else(|| cached.refresh_token.clone()),
        ..cached.clone()
    })
}
