//! custody's audit ledger: an append-only, hash-chained event store on RocksDB.
//!
//! - [`state`]: the deterministic state machine. `apply_append` assigns indices, links the
//!   hash chain, applies each idempotency key once and folds session summaries.
//! - [`committer`]: group commit. Concurrent appends share one synced RocksDB write.
//! - [`store`]: RocksDB column families and atomic writes.
//! - [`service`]: the gRPC `Append`/`Status` API proxies call.
//! - [`flight`], [`scan`], [`table`]: Arrow Flight reads of `events`, `sessions`, `entries`.
//! - [`server`]: wires it together for the `custody-ledger` binary.
//!
//! **Architecture Invariant:** only this crate links RocksDB, and only `store` calls it.

pub mod committer;
pub mod config;
pub mod flight;
pub mod metrics;
pub mod scan;
pub mod server;
pub mod service;
pub mod state;
pub mod store;
pub mod table;
pub mod verify;
