//! Who may read the audit log: an OIDC bearer token from a configured issuer, carrying one of
//! the auditor groups (`[readers]` in the node's config). Tokens are checked with the same
//! validator the proxy uses for callers (`custody-auth`) and are never logged.
//!
//! What needs a reader: the `events`, `sessions` and `entries` tables, Flight SQL, and
//! inclusion proofs (they carry an entry's bytes). What does not: `status`, checkpoints,
//! blocks and consistency proofs — the public face of a transparency log, needed by anyone
//! who verifies it.

use custody_auth::TokenValidator;
use custody_proto::Identity;
use tonic::metadata::MetadataMap;
use tonic::Status;

use crate::config::ReadersConfig;

/// Checks readers' tokens.
pub struct ReaderGate {
    validator: TokenValidator,
    groups: Vec<String>,
}

impl ReaderGate {
    /// A gate for `cfg`'s issuers and groups.
    pub fn new(cfg: &ReadersConfig) -> anyhow::Result<Self> {
        Ok(Self { validator: TokenValidator::new(cfg.issuers.clone())?, groups: cfg.groups.clone() })
    }

    /// The reader behind a request's `authorization: Bearer …` header, if its token is valid
    /// and in an auditor group.
    pub async fn check(&self, md: &MetadataMap) -> Result<Identity, Status> {
        let header = md
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("reading the audit log needs a bearer token of an auditor (custody sends CUSTODY_TOKEN or the `custody login` token; other clients set the authorization header)"))?;
        let value = header.to_str().map_err(|_| Status::unauthenticated("the authorization header is not text"))?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or_else(|| Status::unauthenticated("the authorization header must be `Bearer <token>`"))?;
        let id = self.validator.validate(token.trim()).await.map_err(|e| Status::unauthenticated(format!("token refused: {e}")))?;
        if !id.groups.iter().any(|g| self.groups.contains(g)) {
            return Err(Status::permission_denied(format!(
                "{} may not read the audit log: the token's groups [{}] include none of the auditor groups [{}]",
                if id.email.is_empty() { &id.subject } else { &id.email },
                id.groups.join(", "),
                self.groups.join(", ")
            )));
        }
        Ok(id)
    }
}
