//! The node's check of its own stored log, at start-up and on a schedule.
//!
//! A check re-reads every entry and compares it with the hash chain, every stored Merkle node,
//! every block header and the last checkpoint this node signed
//! ([`crate::verify::verify_store_against`]). A node whose check fails records the damaged
//! range in its [`Integrity`]: from then on it refuses reads of entries from the first bad
//! index (and every proof, checkpoint and session summary that would rest on them), reports
//! the damage in its status, `/readyz` and metrics, and logs an alarm. It keeps taking part in
//! Raft (its Raft log is separate and intact), so the cluster keeps its quorum while an
//! operator replaces its data (remove it, wipe the data directory, join it again).

use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use custody_proto::merkle::Hash;

use crate::store::Store;
use crate::verify::{verify_store_against, VerifyError};

/// A damaged range found by a self-check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// First entry that is not served.
    pub from_index: u64,
    /// What the check found.
    pub reason: String,
    /// When.
    pub found_at: SystemTime,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "entries from index {} failed this node's self-check ({})", self.from_index, self.reason)
    }
}

#[derive(Debug, Default)]
struct State {
    damage: Option<Damage>,
    checks: u64,
    last_ok_size: Option<u64>,
}

/// What the node knows about its own data, shared by every reader.
#[derive(Debug, Clone, Default)]
pub struct Integrity(Arc<RwLock<State>>);

impl Integrity {
    /// The damage found, if any.
    pub fn damage(&self) -> Option<Damage> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).damage.clone()
    }

    /// Checks done since start, and the size the last passing one covered.
    pub fn checks(&self) -> (u64, Option<u64>) {
        let s = self.0.read().unwrap_or_else(|p| p.into_inner());
        (s.checks, s.last_ok_size)
    }

    /// Refuses a read that needs entries at or beyond the damaged index (`end` exclusive).
    pub fn check_range(&self, end: u64) -> Result<(), Damage> {
        match self.damage() {
            Some(d) if end > d.from_index => Err(d),
            _ => Ok(()),
        }
    }

    /// Records a check's outcome. Damage, once found, stays until the node restarts: a later
    /// pass cannot make served bytes trustworthy again.
    fn record(&self, outcome: Result<u64, Damage>) {
        let mut s = self.0.write().unwrap_or_else(|p| p.into_inner());
        s.checks += 1;
        match outcome {
            Ok(size) => s.last_ok_size = Some(size),
            Err(d) => {
                let keep = s.damage.as_ref().is_some_and(|old| old.from_index <= d.from_index);
                if !keep {
                    s.damage = Some(d);
                }
            }
        }
    }
}

/// Runs one check of `store` against the checkpoint this node signed last, and records it.
/// Blocking: it reads the whole log.
/// Returns the entries verified and whether the signed checkpoint could be compared (it
/// cannot while the node has applied less than it signed, after a restart).
pub fn run_check(store: &Store, signed: Option<(u64, Hash)>, integrity: &Integrity) -> Result<(u64, bool), Damage> {
    let started = std::time::Instant::now();
    let outcome = match verify_store_against(store, signed) {
        Ok(r) => Ok((r.verified, r.signed_checked || signed.is_none())),
        Err(VerifyError::Store(e)) => {
            // An I/O error or a RocksDB checksum failure: the data cannot be read, which is
            // damage too, but not localised.
            Err(Damage { from_index: 0, reason: format!("reading the log failed: {e}"), found_at: SystemTime::now() })
        }
        // A broken link at k means entry k-1 or k changed: neither is served.
        Err(e @ VerifyError::Chain(custody_proto::entry::ChainError::BrokenLink { .. })) => {
            Err(Damage { from_index: e.index().unwrap_or(0).saturating_sub(1), reason: e.to_string(), found_at: SystemTime::now() })
        }
        Err(e) => Err(Damage { from_index: e.index().unwrap_or(0), reason: e.to_string(), found_at: SystemTime::now() }),
    };
    match &outcome {
        Ok((n, true)) => tracing::info!(entries = n, signed_size = signed.map(|s| s.0), ms = started.elapsed().as_millis() as u64, "self-check passed"),
        Ok((n, false)) => tracing::info!(
            entries = n,
            signed_size = signed.map(|s| s.0),
            "self-check passed; the last signed checkpoint is beyond the applied log and is compared once the node has caught up"
        ),
        Err(d) => tracing::error!(
            alarm = "self-check",
            from_index = d.from_index,
            "{d}; this node now refuses reads from index {}: remove it from the cluster, wipe its data directory and join it again (it recovers the log from its peers)",
            d.from_index
        ),
    }
    integrity.record(outcome.clone().map(|(n, _)| n));
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn damage_refuses_reads_that_reach_it_and_keeps_the_earliest() {
        let i = Integrity::default();
        assert!(i.check_range(u64::MAX).is_ok());
        i.record(Ok(10));
        assert_eq!(i.checks(), (1, Some(10)));
        let d = |from| Err(Damage { from_index: from, reason: "x".into(), found_at: SystemTime::now() });
        i.record(d(7));
        assert!(i.check_range(7).is_ok(), "entries 0..7 are still served");
        assert_eq!(i.check_range(8).unwrap_err().from_index, 7);
        i.record(d(9));
        assert_eq!(i.damage().unwrap().from_index, 7);
        i.record(d(3));
        assert_eq!(i.damage().unwrap().from_index, 3);
        i.record(Ok(20));
        assert_eq!(i.damage().unwrap().from_index, 3, "a later pass does not clear damage");
    }
}
