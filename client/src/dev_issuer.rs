//! A development-only OpenID issuer, served on loopback by `custody dev`.
//!
//! It publishes discovery and a JWKS, signs EdDSA tokens with a key made at start, approves
//! every authorization request for the local user without a login page, and grants
//! client-credentials tokens to one dev CI client. It exists so the main job runs with no
//! identity provider to set up; it is not an identity provider. Tests use a real one
//! (the `oidc-provider` npm package).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::{Form, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Json;
use base64::Engine;
use openidconnect::core::{
    CoreEdDsaPrivateSigningKey, CoreGenderClaim, CoreJweContentEncryptionAlgorithm, CoreJwsSigningAlgorithm,
};
use openidconnect::{
    AdditionalClaims, Audience, EndUserEmail, IdToken, IdTokenClaims, IssuerUrl, JsonWebKeyId, Nonce,
    PrivateSigningKey, StandardClaims, SubjectIdentifier,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Groups and client id carried in dev tokens.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevClaims {
    groups: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_id: Option<String>,
}
impl AdditionalClaims for DevClaims {}

type DevToken = IdToken<DevClaims, CoreGenderClaim, CoreJweContentEncryptionAlgorithm, CoreJwsSigningAlgorithm>;

struct PendingCode {
    client_id: String,
    redirect_uri: String,
    challenge: String,
    nonce: Option<String>,
    resource: Option<String>,
    issued: Instant,
}

/// Settings of the dev issuer.
#[derive(Debug, Clone)]
pub struct DevIssuerConfig {
    /// Local user the issuer logs in.
    pub user: String,
    /// Groups in every token.
    pub groups: Vec<String>,
    /// Audience of access tokens.
    pub audience: String,
    /// Client id and secret of the dev CI client (client credentials grant).
    pub ci_client: (String, String),
    /// Token lifetime.
    pub lifetime: Duration,
}

struct Inner {
    issuer: String,
    cfg: DevIssuerConfig,
    key: CoreEdDsaPrivateSigningKey,
    codes: Mutex<HashMap<String, PendingCode>>,
}

/// A running dev issuer.
pub struct DevIssuer {
    /// Its URL.
    pub url: String,
    inner: Arc<Inner>,
}

impl DevIssuer {
    /// Starts serving on `addr`.
    pub async fn start(addr: SocketAddr, cfg: DevIssuerConfig) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the dev issuer on {addr}"))?;
        let url = format!("http://{}", listener.local_addr()?);
        let pem = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?.serialize_pem();
        let kid = format!("dev-{}", &hex::encode(Sha256::digest(pem.as_bytes()))[..12]);
        let key = CoreEdDsaPrivateSigningKey::from_ed25519_pem(&pem, Some(JsonWebKeyId::new(kid)))
            .map_err(|e| anyhow::anyhow!("dev issuer key: {e}"))?;
        let inner = Arc::new(Inner {
            issuer: url.clone(),
            cfg,
            key,
            codes: Mutex::new(HashMap::new()),
        });
        let app = axum::Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .route("/authorize", get(authorize))
            .route("/token", post(token))
            .with_state(inner.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { url, inner })
    }

    /// Mints an access token for `subject` directly (used by tests of the dev setup).
    pub fn mint(&self, subject: &str, client_id: &str) -> anyhow::Result<String> {
        self.inner.mint(subject, &self.inner.cfg.audience, client_id, None)
    }
}

impl Inner {
    fn mint(&self, subject: &str, audience: &str, client_id: &str, nonce: Option<&str>) -> anyhow::Result<String> {
        let now = chrono::Utc::now();
        let exp = now + chrono::Duration::from_std(self.cfg.lifetime)?;
        let email = format!("{subject}@dev.invalid");
        let mut claims = IdTokenClaims::new(
            IssuerUrl::new(self.issuer.clone())?,
            vec![Audience::new(audience.to_string())],
            exp,
            now,
            StandardClaims::new(SubjectIdentifier::new(subject.to_string()))
                .set_email(Some(EndUserEmail::new(email)))
                .set_email_verified(Some(true)),
            DevClaims {
                groups: self.cfg.groups.clone(),
                client_id: Some(client_id.to_string()),
            },
        );
        if let Some(n) = nonce {
            claims = claims.set_nonce(Some(Nonce::new(n.to_string())));
        }
        let t = DevToken::new(claims, &self.key, CoreJwsSigningAlgorithm::EdDsa, None, None)?;
        Ok(t.to_string())
    }
}

async fn discovery(State(s): State<Arc<Inner>>) -> Json<serde_json::Value> {
    let i = &s.issuer;
    Json(serde_json::json!({
        "issuer": i,
        "authorization_endpoint": format!("{i}/authorize"),
        "token_endpoint": format!("{i}/token"),
        "jwks_uri": format!("{i}/jwks"),
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["EdDSA"],
        "grant_types_supported": ["authorization_code", "client_credentials"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["none", "client_secret_post", "client_secret_basic"],
        "scopes_supported": ["openid", "email", "profile"],
        "custody_dev_only": true
    }))
}

async fn jwks(State(s): State<Arc<Inner>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "keys": [s.key.as_verification_key()] }))
}

#[derive(Deserialize)]
struct AuthorizeQuery {
    response_type: String,
    client_id: String,
    redirect_uri: String,
    state: Option<String>,
    code_challenge: Option<String>,
    code_challenge_method: Option<String>,
    nonce: Option<String>,
    resource: Option<String>,
}

fn loopback(uri: &str) -> bool {
    url::Url::parse(uri)
        .ok()
        .is_some_and(|u| u.scheme() == "http" && matches!(u.host_str(), Some("127.0.0.1" | "localhost" | "[::1]")))
}

async fn authorize(State(s): State<Arc<Inner>>, Query(q): Query<AuthorizeQuery>) -> Response {
    if q.response_type != "code" || !loopback(&q.redirect_uri) {
        return (StatusCode::BAD_REQUEST, "dev issuer: only response_type=code with a loopback redirect_uri\n").into_response();
    }
    let (Some(challenge), Some("S256")) = (q.code_challenge.clone(), q.code_challenge_method.as_deref()) else {
        return (StatusCode::BAD_REQUEST, "dev issuer: PKCE with S256 is required\n").into_response();
    };
    let code = hex::encode(rand_bytes());
    if let Ok(mut m) = s.codes.lock() {
        m.retain(|_, c| c.issued.elapsed() < Duration::from_secs(120));
        m.insert(
            code.clone(),
            PendingCode {
                client_id: q.client_id,
                redirect_uri: q.redirect_uri.clone(),
                challenge,
                nonce: q.nonce,
                resource: q.resource,
                issued: Instant::now(),
            },
        );
    }
    let Ok(mut url) = url::Url::parse(&q.redirect_uri) else {
        return (StatusCode::BAD_REQUEST, "bad redirect_uri\n").into_response();
    };
    url.query_pairs_mut().append_pair("code", &code);
    if let Some(st) = q.state {
        url.query_pairs_mut().append_pair("state", &st);
    }
    Redirect::to(url.as_str()).into_response()
}

fn rand_bytes() -> [u8; 24] {
    let mut b = [0u8; 24];
    // uuid v4 draws from the OS RNG; two of them give plenty of entropy for a dev code.
    b[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    b[16..].copy_from_slice(&uuid::Uuid::new_v4().as_bytes()[..8]);
    b
}

#[derive(Deserialize)]
struct TokenForm {
    grant_type: String,
    code: Option<String>,
    redirect_uri: Option<String>,
    code_verifier: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    resource: Option<String>,
}

fn oauth_error(code: &str, desc: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(serde_json::json!({"error": code, "error_description": desc})),
    )
        .into_response()
}

fn basic_auth(h: &HeaderMap) -> Option<(String, String)> {
    let v = h.get(header::AUTHORIZATION)?.to_str().ok()?;
    let b = base64::engine::general_purpose::STANDARD.decode(v.strip_prefix("Basic ")?).ok()?;
    let s = String::from_utf8(b).ok()?;
    let (u, p) = s.split_once(':')?;
    let dec = |x: &str| url::form_urlencoded::parse(format!("a={x}").as_bytes()).next().map(|(_, v)| v.into_owned());
    Some((dec(u)?, dec(p)?))
}

async fn token(State(s): State<Arc<Inner>>, headers: HeaderMap, Form(f): Form<TokenForm>) -> Response {
    let lifetime = s.cfg.lifetime.as_secs();
    match f.grant_type.as_str() {
        "authorization_code" => {
            let Some(code) = f.code.as_deref() else { return oauth_error("invalid_request", "code is required") };
            let pending = s.codes.lock().ok().and_then(|mut m| m.remove(code));
            let Some(p) = pending else { return oauth_error("invalid_grant", "unknown or used code") };
            if p.issued.elapsed() > Duration::from_secs(120) {
                return oauth_error("invalid_grant", "code expired");
            }
            if f.redirect_uri.as_deref() != Some(p.redirect_uri.as_str()) {
                return oauth_error("invalid_grant", "redirect_uri does not match");
            }
            if f.client_id.as_deref().is_some_and(|c| c != p.client_id) {
                return oauth_error("invalid_grant", "client_id does not match");
            }
            let Some(verifier) = f.code_verifier.as_deref() else {
                return oauth_error("invalid_request", "code_verifier is required");
            };
            let computed = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
            if computed != p.challenge {
                return oauth_error("invalid_grant", "PKCE verification failed");
            }
            let aud = p.resource.or(f.resource).unwrap_or_else(|| s.cfg.audience.clone());
            let user = s.cfg.user.clone();
            let (Ok(access), Ok(id)) = (
                s.mint(&user, &aud, &p.client_id, None),
                s.mint(&user, &p.client_id, &p.client_id, p.nonce.as_deref()),
            ) else {
                return (StatusCode::INTERNAL_SERVER_ERROR, "signing failed").into_response();
            };
            Json(serde_json::json!({
                "access_token": access, "id_token": id, "token_type": "Bearer", "expires_in": lifetime
            }))
            .into_response()
        }
        "client_credentials" => {
            let (id, secret) = match (f.client_id.clone(), f.client_secret.clone()) {
                (Some(i), Some(s)) => (i, s),
                _ => match basic_auth(&headers) {
                    Some(v) => v,
                    None => return oauth_error("invalid_client", "client authentication is required"),
                },
            };
            if (id.as_str(), secret.as_str()) != (s.cfg.ci_client.0.as_str(), s.cfg.ci_client.1.as_str()) {
                return oauth_error("invalid_client", "unknown client or wrong secret");
            }
            let aud = f.resource.unwrap_or_else(|| s.cfg.audience.clone());
            match s.mint(&id, &aud, &id, None) {
                Ok(t) => Json(serde_json::json!({"access_token": t, "token_type": "Bearer", "expires_in": lifetime})).into_response(),
                Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "signing failed").into_response(),
            }
        }
        _ => oauth_error("unsupported_grant_type", "authorization_code or client_credentials"),
    }
}
