//! Offline verification of a ledger's data directory: walk every entry and check the chain.

use custody_proto::entry::{hex, ChainError, ChainVerifier};
use thiserror::Error;

use crate::state::LedgerState;
use crate::store::{Store, StoreError};

/// The result of a full walk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Entries that verified.
    pub verified: u64,
    /// Hash of the last good entry.
    pub head: String,
}

/// Why verification failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The chain is broken at an index.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// Entries stop before the ledger's recorded size: the log was truncated.
    #[error("index {index}: entry missing; the ledger records {size} entries (log truncated or entry deleted)")]
    Missing {
        /// First missing index.
        index: u64,
        /// Recorded size.
        size: u64,
    },
    /// The recorded head does not match the last entry.
    #[error("chain head mismatch: recorded {recorded}, computed {computed}")]
    HeadMismatch {
        /// Stored.
        recorded: String,
        /// Computed.
        computed: String,
    },
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl VerifyError {
    /// The first bad index, when the error is about one.
    pub fn index(&self) -> Option<u64> {
        match self {
            VerifyError::Chain(c) => Some(c.index()),
            VerifyError::Missing { index, .. } => Some(*index),
            _ => None,
        }
    }
}

/// Walks `store` from index 0 and checks every link.
pub fn verify_store(store: &Store) -> Result<VerifyReport, VerifyError> {
    // Read the recorded state without trusting it for the walk itself.
    let recorded = LedgerState::recorded(store)?.map(|s| (s.next_index, hex(&s.head)));
    let mut v = ChainVerifier::new();
    for r in store.entries_from(0)? {
        let (index, bytes) = r?;
        if index != v.next_index() {
            return Err(VerifyError::Missing {
                index: v.next_index(),
                size: recorded.as_ref().map(|r| r.0).unwrap_or(index),
            });
        }
        v.push(&bytes)?;
    }
    if let Some((size, head)) = recorded {
        if v.next_index() < size {
            return Err(VerifyError::Missing {
                index: v.next_index(),
                size,
            });
        }
        let computed = hex(&v.head());
        if v.next_index() == size && head != computed {
            return Err(VerifyError::HeadMismatch {
                recorded: head,
                computed,
            });
        }
    }
    Ok(VerifyReport {
        verified: v.next_index(),
        head: hex(&v.head()),
    })
}
