//! Offline verification of a ledger's data directory: walk every entry and check the chain.

use custody_proto::entry::{hex, ChainError, ChainVerifier};
use thiserror::Error;

use custody_proto::merkle::{self, MemoryTree, NodeSource};

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
    /// Whether a signed checkpoint was given and compared (it is not while it is ahead of
    /// the stored entries).
    pub signed_checked: bool,
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
    /// A stored Merkle node differs from the one the entries give.
    #[error("index {first}: the stored merkle node at level {level}, index {index} (covering entries from {first}) does not match the entries")]
    TreeNodeMismatch {
        /// Level of the node.
        level: u8,
        /// Index of the node at its level.
        index: u64,
        /// First entry it covers.
        first: u64,
    },
    /// The stored Merkle tree lacks leaves the entries have.
    #[error("index {index}: the stored merkle tree ends here, the ledger has {size} entries")]
    TreeShort {
        /// First entry without a leaf.
        index: u64,
        /// Entries.
        size: u64,
    },
    /// A stored block header is malformed, does not follow the one before, or commits to a
    /// root the entries do not give.
    #[error("index {first_index}: block {height} (entries from {first_index}): {reason}")]
    Block {
        /// The block's height.
        height: u64,
        /// Its first entry (for a malformed header, the end of the block before).
        first_index: u64,
        /// What is wrong.
        reason: String,
    },
    /// The entries do not give the root of a checkpoint this node signed.
    #[error("the entries do not give the root this node signed for size {size} (signed {signed}, recomputed {computed}): entries before {size} were changed and the tree rewritten to match")]
    CheckpointMismatch {
        /// The signed size.
        size: u64,
        /// The root signed.
        signed: String,
        /// The root the entries give.
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
            VerifyError::Missing { index, .. } | VerifyError::TreeShort { index, .. } => Some(*index),
            VerifyError::TreeNodeMismatch { first, .. } => Some(*first),
            VerifyError::Block { first_index, .. } => Some(*first_index),
            _ => None,
        }
    }
}

/// Walks `store` from index 0 and checks every link: the hash chain, every stored Merkle
/// node, and every block header.
pub fn verify_store(store: &Store) -> Result<VerifyReport, VerifyError> {
    verify_store_against(store, None)
}

/// [`verify_store`], and then the checkpoint this node signed last (`signed`: size and
/// root): the entries must reach its size and give its root.
pub fn verify_store_against(store: &Store, signed: Option<(u64, merkle::Hash)>) -> Result<VerifyReport, VerifyError> {
    // One point-in-time view for every read: a running node goes on applying meanwhile.
    let view = store.view();
    let store = &view;
    // Read the recorded state without trusting it for the walk itself.
    let recorded = LedgerState::recorded_in(store)?.map(|s| (s.next_index, hex(&s.head)));
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
        // The stored leaf first: it names the changed entry itself, where the chain would
        // only notice at the next entry's link.
        let leaf = custody_proto::entry::stored_leaf(&bytes);
        if let Some(stored) = crate::state::Lookup::tree_node(store, 0, index)? {
            if stored != leaf {
                return Err(VerifyError::TreeNodeMismatch { level: 0, index, first: index });
            }
        }
        v.push(&bytes)?;
        tree.push(leaf);
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
        // Every stored node, not only those of the current root: proofs use them all.
        let stored_tree = StoredTree(store);
        let mut level = 0u8;
        while (stored_size >> level) > 0 {
            for index in 0..(stored_size >> level) {
                let stored = stored_tree.node(level, index)?;
                let computed = tree.node(level, index).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                if stored != computed {
                    return Err(VerifyError::TreeNodeMismatch { level, index, first: index << level });
                }
            }
            level += 1;
        }
        let stored = merkle::root(&stored_tree, stored_size)?;
        let computed = tree.root();
        if stored != computed {
            return Err(VerifyError::TreeMismatch { size: stored_size, stored: hex(&stored), computed: hex(&computed) });
        }
    }
    verify_blocks(store, &tree)?;
    // A signed size beyond the stored entries is not checked here: a node restarted after a
    // crash may have applied less than it had signed, and re-applies the rest from its Raft
    // log. (Entries lost from a store are still found: the blocks and the recorded state are
    // written with them, atomically.)
    let mut signed_checked = false;
    if let Some((size, root)) = signed.filter(|(size, _)| *size <= tree.size()) {
        signed_checked = true;
        let computed = merkle::root(&tree, size).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        if computed != root {
            return Err(VerifyError::CheckpointMismatch { size, signed: hex(&root), computed: hex(&computed) });
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
        signed_checked,
    })
}

/// Every stored block follows the one before and commits to the root the entries give.
fn verify_blocks(store: &crate::store::StoreView<'_>, tree: &MemoryTree) -> Result<(), VerifyError> {
    let mut prev: Option<custody_proto::block::BlockHeader> = None;
    for r in store.blocks_from(0)? {
        let (height, bytes) = r?;
        let at = prev.map_or(0, |p| p.tree_size);
        let b = custody_proto::block::BlockHeader::decode(&bytes).map_err(|e| VerifyError::Block { height, first_index: at, reason: e.to_string() })?;
        let bad = |reason: String| VerifyError::Block { height, first_index: b.first_index, reason };
        if b.height != height {
            return Err(bad(format!("stored under height {height} but says {}", b.height)));
        }
        b.check_follows(prev.as_ref()).map_err(|e| bad(e.to_string()))?;
        if b.tree_size > tree.size() {
            // Entries a block sealed are gone: the log was truncated.
            return Err(VerifyError::Missing { index: tree.size(), size: b.tree_size });
        }
        let root = merkle::root(tree, b.tree_size).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        if root != b.root {
            return Err(bad(format!("its root {} is not the root of the entries up to {} ({})", hex(&b.root), b.tree_size, hex(&root))));
        }
        prev = Some(b);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{tree_node_key, AppendBatch};
    use crate::store::{cf, Put};
    use custody_proto::pb::v1::{event, PgRequest};
    use custody_proto::merkle::leaf_hash;
    use custody_proto::{Event, EventKind};
    use prost::Message;

    /// A real RocksDB ledger of `n` entries, written by the state machine.
    fn ledger(dir: &std::path::Path, n: u64) -> Store {
        let store = Store::open(dir).unwrap();
        let mut st = LedgerState::empty();
        for i in 0..n {
            let ev = Event {
                proxy_id: "p".into(),
                session_id: "s".into(),
                seq: i,
                kind: EventKind::Request as i32,
                body: Some(event::Body::PgRequest(PgRequest { message: "Query".into(), sql: format!("select {i}"), ..Default::default() })),
                ..Default::default()
            };
            let a = st.apply_append(&AppendBatch { commit_time_ns: i as i64, events: vec![ev.encode_to_vec().into()] }, 1 << 20, &store).unwrap();
            store.write(&a.writes, true).unwrap();
            st = a.state;
        }
        store
    }

    #[test]
    fn changed_deleted_reordered_and_truncated_entries_and_changed_tree_nodes_are_found_on_disk() {
        let good = || {
            let d = tempfile::tempdir().unwrap();
            let s = ledger(d.path(), 20);
            (d, s)
        };
        let (_d, s) = good();
        let r = verify_store(&s).unwrap();
        assert_eq!(r.verified, 20);

        // One byte of entry 7's event changed.
        let (_d, s) = good();
        let mut e = s.entry(7).unwrap().unwrap();
        let last = e.len() - 1;
        e[last] ^= 1;
        s.raw_put_entry(7, Some(&e)).unwrap();
        let err = verify_store(&s).unwrap_err();
        assert_eq!(err.index(), Some(7), "entry 7 no longer hashes to its stored leaf: {err}");
        // Changed together with its stored leaf, it shows where entry 8 links to it.
        s.write(&[Put::new(cf::MERKLE, tree_node_key(0, 7), leaf_hash(&e).to_vec())], true).unwrap();
        let err = verify_store(&s).unwrap_err();
        assert_eq!(err.index(), Some(8), "{err}");

        // Entry 7 deleted.
        let (_d, s) = good();
        s.raw_put_entry(7, None).unwrap();
        assert_eq!(verify_store(&s).unwrap_err().index(), Some(7));

        // Entries 7 and 8 swapped.
        let (_d, s) = good();
        let (a, b) = (s.entry(7).unwrap().unwrap(), s.entry(8).unwrap().unwrap());
        s.raw_put_entry(7, Some(&b)).unwrap();
        s.raw_put_entry(8, Some(&a)).unwrap();
        assert_eq!(verify_store(&s).unwrap_err().index(), Some(7));

        // The last three entries cut off.
        let (_d, s) = good();
        for i in 17..20 {
            s.raw_put_entry(i, None).unwrap();
        }
        let err = verify_store(&s).unwrap_err();
        assert!(matches!(err, VerifyError::Missing { index: 17, size: 20 }), "{err}");

        // A stored Merkle node changed: proofs would be served from it.
        let (_d, s) = good();
        s.write(&[Put::new(cf::MERKLE, tree_node_key(2, 1), vec![9u8; 32])], true).unwrap();
        let err = verify_store(&s).unwrap_err();
        assert!(matches!(err, VerifyError::TreeNodeMismatch { level: 2, index: 1, first: 4 }), "{err}");

        // Checked against the checkpoint this node signed: a matching one passes, one with
        // another root fails, and one beyond the stored entries (a node that applied less
        // than it signed before a crash, and re-applies from its Raft log) waits.
        let (_d, s) = good();
        let mut t = MemoryTree::new();
        for i in 0..20 {
            t.push(leaf_hash(&s.entry(i).unwrap().unwrap()));
        }
        let root12 = merkle::root(&t, 12).unwrap();
        assert!(verify_store_against(&s, Some((12, root12))).unwrap().signed_checked);
        let err = verify_store_against(&s, Some((12, [1u8; 32]))).unwrap_err();
        assert!(matches!(err, VerifyError::CheckpointMismatch { size: 12, .. }), "{err}");
        let r = verify_store_against(&s, Some((25, [1u8; 32]))).unwrap();
        assert!(!r.signed_checked && r.verified == 20);

        // A leaf of the stored tree deleted.
        let (_d, s) = good();
        s.write(&[Put::delete(cf::MERKLE, tree_node_key(0, 19))], true).unwrap();
        assert!(matches!(verify_store(&s).unwrap_err(), VerifyError::TreeShort { index: 19, size: 20 }));
    }
}
