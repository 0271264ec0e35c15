//! custody's audit ledger: an append-only, hash-chained event log, replicated with Raft
//! (raft-rs) over RocksDB.
//!
//! - [`state`]: the deterministic core. `LedgerState::apply_append` assigns indices, links
//!   the hash chain, applies each idempotency key once and folds session summaries.
//! - [`machine`]: the replicated state machine. `LedgerMachine::apply` applies one committed
//!   Raft command (appends, proxy leases, abandoned sessions, block seals) in one RocksDB write.
//! - [`node`]: the Raft Ready loop (one thread owns the `RawNode`): proposals, group commit,
//!   apply, ReadIndex, membership changes, snapshots.
//! - [`raft_log`]: the Raft log on RocksDB (`raft::Storage`).
//! - [`peer`]: the mutual-TLS transport between nodes, and snapshot transfer.
//! - [`store`], [`layout`]: the state machine's RocksDB and where a node keeps its files.
//! - [`service`]: the gRPC API proxies and operators call (Append, Status, RenewLease,
//!   membership).
//! - [`flight`], [`scan`], [`table`]: Arrow Flight reads of `events`, `sessions`, `entries`.
//! - [`sql`]: Flight SQL on the same endpoint, planned by DataFusion over the ledger's indexes.
//! - [`checkpoint`]: this node's ed25519 key, and the rule that it never signs a contradiction.
//! - [`verify`], [`selfcheck`]: the full check of a stored log (offline, and by a running
//!   node at start-up and on a schedule, which stops serving a damaged range).
//! - [`server`]: wires it together for the `custody-ledger` binary.
//!
//! **Architecture Invariant:** only this crate links RocksDB, and only `store` and
//! `raft_log` call it. Nothing under `state` or `machine` reads a clock, randomness or local
//! configuration: every replica that applies the same log holds the same bytes.

pub mod checkpoint;
pub mod config;
pub mod flight;
pub mod layout;
pub mod machine;
pub mod metrics;
pub mod node;
pub mod peer;
pub mod raft_log;
pub mod readers;
pub mod retention;
pub mod scan;
pub mod selfcheck;
pub mod server;
pub mod service;
pub mod sql;
pub mod state;
pub mod store;
pub mod table;
pub mod verify;
