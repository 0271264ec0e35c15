//! Offline verification of a ledger's data directory: walk every entry and check the chain.

use custody_proto::entry::{hex, ChainError, ChainVerifier};
use thiserror::Error;

use custody_proto::merkle::{self, leaf_hash, MemoryTree};

use crate::state::{stored_tree_size, LedgerState, StoredTree};
use crate::store::{Store, StoreError};

/// The result of a full walk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Entries that verified.
    pub verified: u64,
    /// Hash of the last good entry.
    pub head: String,
    /// Merkle tree root over the verified entries, recomputed from them.
    pub tree_root: String,
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
    /// The stored Merkle tree does not match the entries (a node was changed, or entries
    /// were changed and the chain rewritten to match).
    #[error("merkle tree mismatch at size {size}: stored root {stored}, recomputed from the entries {computed}")]
    TreeMismatch {
        /// Tree size compared.
        size: u64,
        /// Root from the stored nodes.
        stored: String,
        /// Root recomputed from the entries.
        computed: String,
    },
    /// The stored Merkle tree lacks leaves the entries have.
    #[error("index {index}: the stored merkle tree ends here, the ledger has {size} entries")]
    TreeShort {
        /// First entry without a leaf.
        index: u64,
        /// Entries.
        size: u64,
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
            VerifyError::Missing { index, .. } | VerifyError::TreeShort { index, .. } => Some(*index),
            _ => None,
        }
    }
}

/// Walks `store` from index 0 and checks every link.
pub fn verify_store(store: &Store) -> Result<VerifyReport, VerifyError> {
    // Read the recorded state without trusting it for the walk itself.
    let recorded = LedgerState::recorded(store)?.map(|s| (s.next_index, hex(&s.head)));
    let mut v = ChainVerifier::new();
    let mut tree = MemoryTree::new();
    for r in store.entries_from(0)? {
        let (index, bytes) = r?;
        if index != v.next_index() {
            return Err(VerifyError::Missing {
                index: v.next_index(),
                size: recorded.as_ref().map(|r| r.0).unwrap_or(index),
            });
        }
        v.push(&bytes)?;
        tree.push(leaf_hash(&bytes));
    }
    // The stored tree must give the same root as the entries (it is what proofs are built
    // from), at the size the stored tree reaches.
    let stored_size = stored_tree_size(store, v.next_index())?;
    if stored_size < v.next_index() {
        // The node backfills a missing tail on open; offline, a short tree is reported,
        // and the part it holds is still compared below.
        return Err(VerifyError::TreeShort { index: stored_size, size: v.next_index() });
    }
    if stored_size > 0 {
        let stored = merkle::root(&StoredTree(store), stored_size)?;
        let computed = tree.root();
        if stored != computed {
            return Err(VerifyError::TreeMismatch { size: stored_size, stored: hex(&stored), computed: hex(&computed) });
        }
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
        tree_root: hex(&tree.root()),
    })
}
