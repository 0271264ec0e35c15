//! The `custody` client: CLI commands and the library they are built on.
//!
//! - [`tunnel`]: `custody connect`, a local listener whose connections ride QUIC streams.
//! - [`quic`]: the QUIC endpoint and proxy certificate trust (pin or CA).
//! - [`login`], [`token`]: OIDC authorization code + PKCE login, and the token search order
//!   (`--token-file`, `CUSTODY_TOKEN`, the 0600 cache).
//! - [`query`]: `events`, `sessions`, `checkpoint`, `proof` over Arrow Flight.
//! - [`replay`]: `custody replay SESSION`, a session as a transcript.
//! - [`audit`]: `verify` (online and offline), `bundle`, `blocks`, `events --verify`.
//! - [`dev`], [`dev_issuer`]: `custody dev`, the whole system on loopback.
//!
//! **Architecture Invariant:** the client does not link RocksDB or touch target credentials;
//! it only carries bytes and tokens.

pub mod audit;
pub mod config;
pub mod dev;
pub mod dev_issuer;
pub mod export;
pub mod login;
pub mod query;
pub mod quic;
pub mod replay;
pub mod token;
pub mod tunnel;
