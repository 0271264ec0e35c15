//! Caller authentication for the proxy (callers) and the ledger (readers): validates OIDC bearer tokens (JWT access or ID tokens) with the
//! `openidconnect` crate against the configured issuers.
//!
//! Each issuer's discovery document and JWKS are fetched once and cached; a token signed with
//! a key id the cache does not know triggers one JWKS refresh (at most every 10 s), so key
//! rotation works without a restart. Signature, `iss`, `aud`, `exp`, `nbf` and `iat` are
//! checked with the issuer's leeway. Only asymmetric algorithms are accepted: `alg: none` and
//! HMAC tokens (including one "signed" with the issuer's public key) are refused.
//!
//! The token itself is never logged or recorded; only the identifying claims are.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use custody_proto::Identity;
use openidconnect::core::{
    CoreGenderClaim, CoreJsonWebKey, CoreJsonWebKeySet, CoreJweContentEncryptionAlgorithm,
    CoreJwsSigningAlgorithm, CoreProviderMetadata,
};
use openidconnect::{
    AdditionalClaims, ClaimsVerificationError, ClientId, IdToken, IdTokenVerifier, IssuerUrl,
    JsonWebTokenType, Nonce, SignatureVerificationError,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::Mutex;
use tracing::{info, warn};


/// A trusted token issuer.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// Issuer URL, exactly as in tokens' `iss`.
    pub issuer: String,
    /// Accepted `aud` values (one must match).
    pub audiences: Vec<String>,
    /// Claim holding the caller's groups.
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// Seconds of clock skew tolerated on `exp`, `nbf` and `iat`.
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
}

fn default_groups_claim() -> String {
    "groups".into()
}
fn default_leeway() -> u64 {
    60
}

/// Largest token accepted.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Why a token was refused. Messages say which check failed and are safe to show the caller;
/// none contains the token.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthError {
    /// No token was presented.
    #[error("no token: set CUSTODY_TOKEN, pass --token-file, or run `custody login`")]
    Missing,
    /// The token is not a well-formed JWT.
    #[error("token is not a well-formed JWT: {0}")]
    Malformed(String),
    /// The token is unsigned.
    #[error("token is unsigned (alg: none); only asymmetrically signed tokens are accepted")]
    Unsigned,
    /// The token uses an HMAC (shared-secret) algorithm.
    #[error("token uses the shared-secret algorithm {0}; only asymmetric signatures (RS*, PS*, ES*, EdDSA) are accepted")]
    SymmetricAlg(String),
    /// `iss` names an issuer this proxy does not trust.
    #[error("token issuer {0:?} is not trusted here")]
    UnknownIssuer(String),
    /// The issuer's keys could not be fetched.
    #[error("cannot fetch the signing keys of issuer {issuer}: {reason}")]
    IssuerUnavailable {
        /// Issuer URL.
        issuer: String,
        /// Why.
        reason: String,
    },
    /// The signature does not verify.
    #[error("token signature is invalid: {0}")]
    BadSignature(String),
    /// `aud` does not name this proxy.
    #[error("token audience is wrong: {0}")]
    WrongAudience(String),
    /// The token has expired.
    #[error("token expired at {expired_at} (now {now}); get a new token (`custody login`, or refresh CUSTODY_TOKEN)")]
    Expired {
        /// RFC 3339.
        expired_at: String,
        /// RFC 3339.
        now: String,
    },
    /// `nbf` is in the future.
    #[error("token is not valid before {0}")]
    NotYetValid(String),
    /// Another claim check failed.
    #[error("token rejected: {0}")]
    Invalid(String),
}

/// Claims beyond the standard ones: groups (under a configurable name), `nbf`, `act`,
/// `client_id`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExtraClaims {
    /// Every other claim.
    #[serde(flatten)]
    pub rest: HashMap<String, serde_json::Value>,
}
impl AdditionalClaims for ExtraClaims {}

type Token = IdToken<ExtraClaims, CoreGenderClaim, CoreJweContentEncryptionAlgorithm, CoreJwsSigningAlgorithm>;

struct IssuerState {
    cfg: IssuerConfig,
    jwks: Mutex<Option<(CoreJsonWebKeySet, Instant)>>,
}

/// Validates tokens against the configured issuers.
#[derive(Clone)]
pub struct TokenValidator {
    issuers: Arc<Vec<IssuerState>>,
    http: openidconnect::reqwest::Client,
}

const ASYMMETRIC: [CoreJwsSigningAlgorithm; 10] = [
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256,
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha384,
    CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha512,
    CoreJwsSigningAlgorithm::RsaSsaPssSha256,
    CoreJwsSigningAlgorithm::RsaSsaPssSha384,
    CoreJwsSigningAlgorithm::RsaSsaPssSha512,
    CoreJwsSigningAlgorithm::EcdsaP256Sha256,
    CoreJwsSigningAlgorithm::EcdsaP384Sha384,
    CoreJwsSigningAlgorithm::EcdsaP521Sha512,
    CoreJwsSigningAlgorithm::EdDsa,
];

const REFRESH_INTERVAL: Duration = Duration::from_secs(10);

fn b64url(part: &str) -> Result<Vec<u8>, AuthError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|e| AuthError::Malformed(format!("bad base64url: {e}")))
}

fn rfc3339(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|t| t.to_rfc3339())
        .unwrap_or_else(|| secs.to_string())
}

/// The unverified header and payload of a JWT, for routing and early refusal only.
fn peek(token: &str) -> Result<(serde_json::Value, serde_json::Value), AuthError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(AuthError::Malformed(format!(
            "{} bytes exceeds the {MAX_TOKEN_BYTES}-byte limit",
            token.len()
        )));
    }
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return Err(AuthError::Malformed(format!(
            "expected 3 dot-separated parts, found {}",
            parts.len()
        )));
    }
    let header: serde_json::Value = serde_json::from_slice(&b64url(parts[0])?)
        .map_err(|e| AuthError::Malformed(format!("header is not JSON: {e}")))?;
    let payload: serde_json::Value = serde_json::from_slice(&b64url(parts[1])?)
        .map_err(|e| AuthError::Malformed(format!("payload is not JSON: {e}")))?;
    Ok((header, payload))
}

impl TokenValidator {
    /// A validator for `issuers`. Keys are fetched on first use.
    pub fn new(issuers: Vec<IssuerConfig>) -> anyhow::Result<Self> {
        let http = openidconnect::reqwest::ClientBuilder::new()
            // Following redirects would let a discovery document send us anywhere.
            .redirect(openidconnect::reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()?;
        Ok(Self {
            issuers: Arc::new(
                issuers
                    .into_iter()
                    .map(|cfg| IssuerState {
                        cfg,
                        jwks: Mutex::new(None),
                    })
                    .collect(),
            ),
            http,
        })
    }

    async fn fetch_jwks(&self, cfg: &IssuerConfig) -> Result<CoreJsonWebKeySet, AuthError> {
        let unavailable = |reason: String| AuthError::IssuerUnavailable {
            issuer: cfg.issuer.clone(),
            reason,
        };
        let url = IssuerUrl::new(cfg.issuer.clone()).map_err(|e| unavailable(e.to_string()))?;
        let meta = CoreProviderMetadata::discover_async(url, &self.http)
            .await
            .map_err(|e| unavailable(format!("discovery failed: {e}")))?;
        let jwks = CoreJsonWebKeySet::fetch_async(meta.jwks_uri(), &self.http)
            .await
            .map_err(|e| unavailable(format!("JWKS fetch failed: {e}")))?;
        info!(issuer = %cfg.issuer, keys = jwks.keys().len(), "fetched issuer keys");
        Ok(jwks)
    }

    async fn keys(&self, st: &IssuerState, force: bool) -> Result<CoreJsonWebKeySet, AuthError> {
        let mut guard = st.jwks.lock().await;
        if let Some((jwks, at)) = guard.as_ref() {
            if !force || at.elapsed() < REFRESH_INTERVAL {
                return Ok(jwks.clone());
            }
        }
        match self.fetch_jwks(&st.cfg).await {
            Ok(jwks) => {
                *guard = Some((jwks.clone(), Instant::now()));
                Ok(jwks)
            }
            Err(e) => match guard.as_ref() {
                // Keep serving with the cached keys if a refresh fails.
                Some((jwks, _)) => {
                    warn!(error = %e, "JWKS refresh failed; keeping cached keys");
                    Ok(jwks.clone())
                }
                None => Err(e),
            },
        }
    }

    /// Validates `token` and returns who it identifies.
    pub async fn validate(&self, token: &str) -> Result<Identity, AuthError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let (header, payload) = peek(token)?;
        match header.get("alg").and_then(|a| a.as_str()) {
            None => return Err(AuthError::Malformed("header has no alg".into())),
            Some(a) if a.eq_ignore_ascii_case("none") => return Err(AuthError::Unsigned),
            Some(a) if a.starts_with("HS") => return Err(AuthError::SymmetricAlg(a.to_string())),
            _ => {}
        }
        let iss = payload
            .get("iss")
            .and_then(|v| v.as_str())
            .ok_or_else(|| AuthError::Invalid("token has no iss claim".into()))?;
        let st = self
            .issuers
            .iter()
            .find(|s| s.cfg.issuer.trim_end_matches('/') == iss.trim_end_matches('/'))
            .ok_or_else(|| AuthError::UnknownIssuer(iss.to_string()))?;
        let parsed: Token = token
            .parse()
            .map_err(|e: serde_json::Error| AuthError::Malformed(format!("claims: {e}")))?;

        let keys = self.keys(st, false).await?;
        let claims = match self.verify(st, &parsed, keys) {
            Err(AuthError::BadSignature(m)) if m == NO_MATCHING_KEY => {
                // Unknown kid: the issuer may have rotated its keys.
                let keys = self.keys(st, true).await?;
                self.verify(st, &parsed, keys)?
            }
            other => other?,
        };
        Ok(identity(&st.cfg, iss, &claims))
    }

    fn verify(
        &self,
        st: &IssuerState,
        token: &Token,
        keys: CoreJsonWebKeySet,
    ) -> Result<openidconnect::IdTokenClaims<ExtraClaims, CoreGenderClaim>, AuthError> {
        let cfg = &st.cfg;
        let leeway = cfg.leeway_secs as i64;
        let issuer = IssuerUrl::new(cfg.issuer.clone()).map_err(|e| AuthError::Invalid(e.to_string()))?;
        let audiences = cfg.audiences.clone();
        let primary = audiences.first().cloned().unwrap_or_default();
        let verifier: IdTokenVerifier<'_, CoreJsonWebKey> =
            IdTokenVerifier::new_public_client(ClientId::new(primary), issuer, keys)
                .set_allowed_algs(ASYMMETRIC)
                .set_allowed_jose_types([
                    jose("JWT"),
                    jose("at+jwt"),
                    jose("application/at+jwt"),
                    jose("application/jwt"),
                ])
                // We check audience ourselves: any configured audience may match.
                .require_audience_match(false)
                .set_time_fn(move || chrono::Utc::now() - chrono::Duration::seconds(leeway))
                .set_issue_time_verifier_fn(move |iat| {
                    if iat > chrono::Utc::now() + chrono::Duration::seconds(leeway) {
                        Err(format!("issued in the future ({})", iat.to_rfc3339()))
                    } else {
                        Ok(())
                    }
                });
        let claims = token
            .clone()
            .into_claims(&verifier, |_: Option<&Nonce>| Ok(()))
            .map_err(|e| map_claims_error(e, token))?;
        let auds: Vec<String> = claims.audiences().iter().map(|a| a.to_string()).collect();
        if !auds.iter().any(|a| cfg.audiences.contains(a)) {
            return Err(AuthError::WrongAudience(format!(
                "token is for {auds:?}, this proxy accepts {:?}",
                cfg.audiences
            )));
        }
        if let Some(nbf) = claims.additional_claims().rest.get("nbf").and_then(|v| v.as_i64()) {
            if nbf > chrono::Utc::now().timestamp() + leeway {
                return Err(AuthError::NotYetValid(rfc3339(nbf)));
            }
        }
        Ok(claims)
    }
}

const NO_MATCHING_KEY: &str = "no key in the issuer's JWKS matches the token's kid";

fn jose(s: &str) -> openidconnect::NormalizedJsonWebTokenType {
    // These literals are valid media types, so normalizing cannot fail.
    JsonWebTokenType::new(s.to_string())
        .normalize()
        .expect("static JOSE type is valid")
}

fn map_claims_error(e: ClaimsVerificationError, token: &Token) -> AuthError {
    match e {
        ClaimsVerificationError::Expired(_) => {
            let exp = token
                .clone()
                .into_claims(
                    &IdTokenVerifier::<CoreJsonWebKey>::new_insecure_without_verification()
                        .set_time_fn(|| chrono::DateTime::<chrono::Utc>::MIN_UTC),
                    |_: Option<&Nonce>| Ok(()),
                )
                .map(|c| c.expiration().to_rfc3339())
                .unwrap_or_else(|_| "an earlier time".into());
            AuthError::Expired {
                expired_at: exp,
                now: chrono::Utc::now().to_rfc3339(),
            }
        }
        ClaimsVerificationError::InvalidAudience(m) => AuthError::WrongAudience(m),
        ClaimsVerificationError::InvalidIssuer(m) => AuthError::Invalid(format!("issuer: {m}")),
        ClaimsVerificationError::SignatureVerification(s) => match s {
            SignatureVerificationError::NoMatchingKey => AuthError::BadSignature(NO_MATCHING_KEY.into()),
            SignatureVerificationError::DisallowedAlg(m) => AuthError::BadSignature(format!("algorithm not allowed: {m}")),
            SignatureVerificationError::NoSignature => AuthError::Unsigned,
            other => AuthError::BadSignature(other.to_string()),
        },
        other => AuthError::Invalid(other.to_string()),
    }
}

fn identity(
    cfg: &IssuerConfig,
    iss: &str,
    claims: &openidconnect::IdTokenClaims<ExtraClaims, CoreGenderClaim>,
) -> Identity {
    let extra = &claims.additional_claims().rest;
    let groups = match extra.get(&cfg.groups_claim) {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .take(256)
            .collect(),
        Some(serde_json::Value::String(s)) => s.split([' ', ',']).filter(|g| !g.is_empty()).map(str::to_string).collect(),
        _ => Vec::new(),
    };
    let agent = extra
        .get("act")
        .and_then(|a| a.get("sub"))
        .and_then(|s| s.as_str())
        .unwrap_or_default()
        .to_string();
    let client_id = extra
        .get("client_id")
        .or_else(|| extra.get("azp"))
        .and_then(|s| s.as_str())
        .map(str::to_string)
        .or_else(|| claims.authorized_party().map(|a| a.to_string()))
        .unwrap_or_default();
    Identity {
        issuer: iss.to_string(),
        subject: claims.subject().to_string(),
        email: claims.email().map(|e| e.to_string()).unwrap_or_default(),
        groups,
        agent,
        agent_declared: false,
        client_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(v: &serde_json::Value) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    }

    fn validator() -> TokenValidator {
        TokenValidator::new(vec![IssuerConfig {
            issuer: "http://127.0.0.1:1".into(),
            audiences: vec!["custody".into()],
            groups_claim: "groups".into(),
            leeway_secs: 60,
        }])
        .unwrap()
    }

    #[tokio::test]
    async fn refuses_before_any_network_use() {
        let v = validator();
        assert_eq!(v.validate("").await, Err(AuthError::Missing));
        assert!(matches!(v.validate("abc").await, Err(AuthError::Malformed(_))));
        let none = format!(
            "{}.{}.",
            b64(&serde_json::json!({"alg":"none"})),
            b64(&serde_json::json!({"iss":"http://127.0.0.1:1","sub":"x"}))
        );
        assert_eq!(v.validate(&none).await, Err(AuthError::Unsigned));
        let hs = format!(
            "{}.{}.c2ln",
            b64(&serde_json::json!({"alg":"HS256","typ":"JWT"})),
            b64(&serde_json::json!({"iss":"http://127.0.0.1:1","sub":"x"}))
        );
        assert_eq!(v.validate(&hs).await, Err(AuthError::SymmetricAlg("HS256".into())));
        let other = format!(
            "{}.{}.c2ln",
            b64(&serde_json::json!({"alg":"RS256"})),
            b64(&serde_json::json!({"iss":"https://evil.example","sub":"x"}))
        );
        assert_eq!(
            v.validate(&other).await,
            Err(AuthError::UnknownIssuer("https://evil.example".into()))
        );
        let huge = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert!(matches!(v.validate(&huge).await, Err(AuthError::Malformed(_))));
    }
}
