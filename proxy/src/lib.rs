//! custody's proxy: authenticates callers, applies policy, speaks the target's protocol with
//! the gateway's own credential, and records every request and response in the ledger
//! before (requests) or while (responses) they pass.
//!
//! - [`server`]: QUIC listener and the per-stream preamble (token, resource, policy).
//! - [`auth`]: OIDC token validation; [`policy`]: group -> resource grants.
//! - [`pg`]: the PostgreSQL session tracker (sans-IO), target connection and relay loop.
//! - [`recorder`], [`ledger_client`]: ordered, deadline-bounded appends to the ledger.
//! - [`config`], [`tls`], [`cancel`], [`metrics`].
//!
//! **Architecture Invariant:** only this crate touches target credentials, and only
//! `pg::target` uses them. They reach no event, log line or error message.

pub use custody_auth as auth;
pub mod cancel;
pub mod config;
pub mod ledger_client;
pub mod metrics;
pub mod pg;
pub mod policy;
pub mod recorder;
pub mod server;
pub mod tls;
