//! Block headers: the ledger seals its entries into blocks, every N entries or T
//! milliseconds, through Raft, so that every replica holds the same blocks.
//!
//! A block covers the entries `first_index .. first_index + count` and commits to the
//! Merkle tree at `tree_size = first_index + count`. Blocks link by hash: each header holds
//! the hash of the one before (32 zero bytes for the first block, height 0).
//!
//! # Canonical encoding (120 bytes, integers big-endian)
//!
//! ```text
//! "custody-block-v1"   16 bytes, ASCII
//! height               u64
//! first_index          u64
//! count                u64
//! prev_hash            32 bytes (SHA-256 of the previous header's encoding)
//! tree_size            u64      (= first_index + count)
//! root                 32 bytes (RFC 6962 root of the tree of tree_size entries)
//! sealed_at_ns         i64      (the sealing leader's clock, unix ns)
//! ```
//!
//! A block's hash is SHA-256 of this encoding.

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::merkle::Hash;

const MAGIC: &[u8; 16] = b"custody-block-v1";
/// Length of an encoded header.
pub const HEADER_LEN: usize = 16 + 8 * 3 + 32 + 8 + 32 + 8;

/// A block header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHeader {
    /// 0 for the first block.
    pub height: u64,
    /// Index of the block's first entry.
    pub first_index: u64,
    /// Entries in the block (at least one).
    pub count: u64,
    /// Hash of the previous block's header (zeros for height 0).
    pub prev_hash: Hash,
    /// Size of the Merkle tree the block commits to (`first_index + count`).
    pub tree_size: u64,
    /// Root of that tree.
    pub root: Hash,
    /// When the leader proposed the seal, unix ns.
    pub sealed_at_ns: i64,
}

/// Why bytes are not a block header, or a header does not follow its predecessor.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum BlockError {
    /// Wrong length.
    #[error("a block header is {HEADER_LEN} bytes, got {0}")]
    Length(usize),
    /// The magic prefix is missing.
    #[error("not a custody block header (bad magic)")]
    Magic,
    /// The fields contradict each other.
    #[error("block {height}: {reason}")]
    Invalid {
        /// Its height.
        height: u64,
        /// What is wrong.
        reason: String,
    },
}

impl BlockHeader {
    /// The header's canonical bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_LEN);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&self.height.to_be_bytes());
        b.extend_from_slice(&self.first_index.to_be_bytes());
        b.extend_from_slice(&self.count.to_be_bytes());
        b.extend_from_slice(&self.prev_hash);
        b.extend_from_slice(&self.tree_size.to_be_bytes());
        b.extend_from_slice(&self.root);
        b.extend_from_slice(&self.sealed_at_ns.to_be_bytes());
        b
    }

    /// SHA-256 of the canonical bytes.
    pub fn hash(&self) -> Hash {
        Sha256::digest(self.encode()).into()
    }

    /// Decodes and checks a header's own consistency (`tree_size = first_index + count`,
    /// `count > 0`, zeros before the first block).
    pub fn decode(b: &[u8]) -> Result<Self, BlockError> {
        if b.len() != HEADER_LEN {
            return Err(BlockError::Length(b.len()));
        }
        if &b[..16] != MAGIC {
            return Err(BlockError::Magic);
        }
        let u = |at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[at..at + 8]);
            a
        };
        let h = |at: usize| {
            let mut a = [0u8; 32];
            a.copy_from_slice(&b[at..at + 32]);
            a
        };
        let hdr = BlockHeader {
            height: u64::from_be_bytes(u(16)),
            first_index: u64::from_be_bytes(u(24)),
            count: u64::from_be_bytes(u(32)),
            prev_hash: h(40),
            tree_size: u64::from_be_bytes(u(72)),
            root: h(80),
            sealed_at_ns: i64::from_be_bytes(u(112)),
        };
        let bad = |reason: &str| Err(BlockError::Invalid { height: hdr.height, reason: reason.into() });
        if hdr.count == 0 {
            return bad("holds no entries");
        }
        if hdr.first_index.checked_add(hdr.count) != Some(hdr.tree_size) {
            return bad("tree_size is not first_index + count");
        }
        if hdr.height == 0 && (hdr.first_index != 0 || hdr.prev_hash != [0u8; 32]) {
            return bad("the first block must start at entry 0 with a zero previous hash");
        }
        Ok(hdr)
    }

    /// The header that seals entries `prev.tree_size .. tree_size` after `prev` (or from 0
    /// when there is no block yet), committing to `root`.
    pub fn next(prev: Option<&BlockHeader>, tree_size: u64, root: Hash, sealed_at_ns: i64) -> Option<Self> {
        let first_index = prev.map_or(0, |p| p.tree_size);
        let count = tree_size.checked_sub(first_index).filter(|c| *c > 0)?;
        Some(BlockHeader {
            height: prev.map_or(0, |p| p.height + 1),
            first_index,
            count,
            prev_hash: prev.map_or([0u8; 32], |p| p.hash()),
            tree_size,
            root,
            sealed_at_ns,
        })
    }

    /// Checks that `self` directly follows `prev` (or is the first block when `prev` is
    /// `None`): consecutive heights, contiguous entries, and the previous hash.
    pub fn check_follows(&self, prev: Option<&BlockHeader>) -> Result<(), BlockError> {
        let bad = |reason: String| Err(BlockError::Invalid { height: self.height, reason });
        match prev {
            None if self.height != 0 => bad(format!("expected the first block (height 0), got height {}", self.height)),
            None => Ok(()),
            Some(p) if self.height != p.height + 1 => bad(format!("follows block {} but has height {}", p.height, self.height)),
            Some(p) if self.first_index != p.tree_size => bad(format!("starts at entry {}, block {} ended at {}", self.first_index, p.height, p.tree_size)),
            Some(p) if self.prev_hash != p.hash() => bad(format!("its previous-block hash is not the hash of block {}", p.height)),
            Some(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_link_and_reject_what_does_not_follow() {
        let b0 = BlockHeader::next(None, 5, [1; 32], 10).unwrap();
        assert_eq!((b0.height, b0.first_index, b0.count, b0.prev_hash), (0, 0, 5, [0; 32]));
        let b1 = BlockHeader::next(Some(&b0), 12, [2; 32], 20).unwrap();
        assert_eq!((b1.height, b1.first_index, b1.count), (1, 5, 7));
        assert_eq!(b1.prev_hash, b0.hash());
        for b in [b0, b1] {
            let e = b.encode();
            assert_eq!(e.len(), HEADER_LEN);
            assert_eq!(BlockHeader::decode(&e).unwrap(), b);
        }
        b1.check_follows(Some(&b0)).unwrap();
        b0.check_follows(None).unwrap();
        assert!(b1.check_follows(None).is_err());
        let mut forged = b1;
        forged.prev_hash = [9; 32];
        assert!(forged.check_follows(Some(&b0)).is_err());
        let mut gap = b1;
        gap.first_index = 6;
        gap.count = 6;
        assert!(gap.check_follows(Some(&b0)).is_err());
        // Nothing new to seal.
        assert!(BlockHeader::next(Some(&b1), 12, [3; 32], 30).is_none());
        assert!(BlockHeader::next(Some(&b1), 11, [3; 32], 30).is_none());
    }

    #[test]
    fn malformed_headers_are_refused_without_panicking() {
        let good = BlockHeader::next(None, 3, [7; 32], 1).unwrap().encode();
        for n in 0..good.len() {
            assert!(BlockHeader::decode(&good[..n]).is_err());
        }
        let mut magic = good.clone();
        magic[0] ^= 1;
        assert_eq!(BlockHeader::decode(&magic), Err(BlockError::Magic));
        let mut size = good.clone();
        size[79] ^= 1; // tree_size's last byte
        assert!(matches!(BlockHeader::decode(&size), Err(BlockError::Invalid { .. })));
        let mut empty = BlockHeader::next(None, 3, [7; 32], 1).unwrap();
        empty.count = 0;
        empty.tree_size = 0;
        assert!(BlockHeader::decode(&empty.encode()).is_err());
    }
}
