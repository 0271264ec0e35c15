//! Prometheus metrics of a ledger node, served at `/metrics` in the text format.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The ledger's metrics.
pub struct LedgerMetrics {
    registry: Registry,
    /// Events stored (not counting duplicates).
    pub events_appended: Counter,
    /// Events that were retries of stored keys.
    pub events_duplicate: Counter,
    /// Append requests refused (invalid, storage failure, overload).
    pub appends_failed: Counter,
    /// Seconds from an append's arrival to its commit and apply.
    pub append_latency: Histogram,
    /// Events per Raft entry (group commit).
    pub batch_size: Histogram,
    /// Entries in the ledger.
    pub size: Gauge,
    /// Current Raft term.
    pub term: Gauge,
    /// Raft id of the known leader (0: none).
    pub leader: Gauge,
    /// 1 on the leader.
    pub is_leader: Gauge,
    /// Raft commit index.
    pub commit_index: Gauge,
    /// Raft applied index.
    pub applied_index: Gauge,
    /// Blocks sealed (the last block's height + 1).
    pub blocks: Gauge,
    /// Self-checks of the stored log that passed.
    pub self_checks_passed: Counter,
    /// Self-checks that found damage.
    pub self_checks_failed: Counter,
    /// First index a self-check found damaged (-1: none).
    pub damaged_from: Gauge,
    /// Checkpoints this node refused to sign because they contradict one it signed.
    pub checkpoints_refused: Counter,
}

impl LedgerMetrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("custody_ledger");
        let events_appended = Counter::default();
        let events_duplicate = Counter::default();
        let appends_failed = Counter::default();
        let append_latency = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 14));
        let size = Gauge::default();
        let (term, leader, is_leader, commit_index, applied_index) = Default::default();
        registry.register("events_appended", "Events stored", events_appended.clone());
        registry.register("events_duplicate", "Appended events whose idempotency key was already stored", events_duplicate.clone());
        registry.register("appends_failed", "Append requests refused", appends_failed.clone());
        registry.register("append_latency_seconds", "Time from append arrival to durable commit", append_latency.clone());
        registry.register("batch_size_events", "Events per group commit", batch_size.clone());
        registry.register("size_entries", "Entries in the ledger", size.clone());
        registry.register("raft_term", "Current Raft term", Clone::clone(&term));
        registry.register("raft_leader_id", "Raft id of the known leader (0: none)", Clone::clone(&leader));
        registry.register("raft_is_leader", "1 if this node is the leader", Clone::clone(&is_leader));
        registry.register("raft_commit_index", "Raft commit index", Clone::clone(&commit_index));
        registry.register("raft_applied_index", "Raft applied index", Clone::clone(&applied_index));
        let (blocks, damaged_from): (Gauge, Gauge) = Default::default();
        let (self_checks_passed, self_checks_failed, checkpoints_refused): (Counter, Counter, Counter) = Default::default();
        damaged_from.set(-1);
        registry.register("blocks", "Blocks sealed", Clone::clone(&blocks));
        registry.register("self_checks_passed", "Checks of the stored log against its tree, blocks and last signed checkpoint that passed", self_checks_passed.clone());
        registry.register("self_checks_failed", "Checks of the stored log that found damage", self_checks_failed.clone());
        registry.register("damaged_from_index", "First entry a self-check found damaged and that is no longer served (-1: none)", Clone::clone(&damaged_from));
        registry.register("checkpoints_refused", "Checkpoints refused because they contradict one this node signed", checkpoints_refused.clone());
        Self {
            registry,
            events_appended,
            events_duplicate,
            appends_failed,
            append_latency,
            batch_size,
            size,
            term,
            leader,
            is_leader,
            commit_index,
            applied_index,
            blocks,
            self_checks_passed,
            self_checks_failed,
            damaged_from,
            checkpoints_refused,
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut s, &self.registry);
        s
    }
}

impl Default for LedgerMetrics {
    fn default() -> Self {
        Self::new()
    }
}
