//! Wire formats shared by custody's client, proxy and ledger. No I/O, no clock.
//!
//! - [`pb`]: prost types generated from `proto/custody/v1/*.proto`: the audit [`pb::Event`],
//!   the tunnel preamble, and the ledger's gRPC `Append` service.
//! - [`reader`]: a bounded byte reader that every decoder here is built on.
//! - [`tunnel`]: the framed preamble that opens each client->proxy QUIC stream.
//! - [`pg`]: a sans-IO PostgreSQL v3 frame codec with explicit length limits.
//! - [`entry`]: the ledger's canonical entry envelope and its hash chain.
//! - [`merkle`]: the RFC 6962 Merkle tree over entries, with inclusion and consistency proofs.
//! - [`block`]: block headers that seal ranges of entries and link by hash.
//! - [`note`]: C2SP signed notes and tlog checkpoints, signed and verified with ed25519.
//!
//! **Architecture Invariant:** nothing in this crate performs I/O or reads a clock, so every
//! decoder can be fuzzed directly (see `fuzz/`).

pub mod block;
pub mod entry;
pub mod merkle;
pub mod note;
pub mod pg;
pub mod reader;
#[cfg(feature = "arrow")]
pub mod table;
pub mod tunnel;

/// Generated protobuf types.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    /// Events and the tunnel preamble.
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/custody.v1.rs"));
    }
    /// The ledger's append API.
    pub mod ledger {
        include!(concat!(env!("OUT_DIR"), "/custody.ledger.v1.rs"));
    }
}

pub use pb::v1::{Event, EventKind, Identity};
