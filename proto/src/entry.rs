//! The ledger entry: the canonical bytes the ledger stores and hashes for one event.
//!
//! ```text
//! entry = "CEV1"                 4 bytes, magic and format version
//!         index                  u64 big-endian, 0-based position in the ledger
//!         commit_time_ns         i64 big-endian, unix ns chosen by the ledger leader
//!         prev_hash              32 bytes, entry_hash of entry index-1 (zeros for index 0)
//!         event_len              u32 big-endian
//!         event                  event_len bytes: the custody.v1.Event exactly as the proxy
//!                                encoded it; never re-encoded
//! entry_hash = SHA-256(entry)
//! ```
//!
//! Because each entry embeds the previous entry's hash, changing, removing or reordering
//! any entry breaks the chain at that index, which [`ChainVerifier`] reports.

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::reader::{ReadError, Reader};

/// Magic and version at the start of every entry.
pub const MAGIC: &[u8; 4] = b"CEV1";
/// Bytes before the event.
pub const HEADER_LEN: usize = 4 + 8 + 8 + 32 + 4;
/// A SHA-256 digest.
pub type Hash = [u8; 32];
/// `prev_hash` of the first entry.
pub const GENESIS: Hash = [0u8; 32];

/// An entry could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum EntryError {
    /// The entry does not start with `CEV1`.
    #[error("entry does not start with magic CEV1")]
    BadMagic,
    /// A field is cut short or bytes trail the event.
    #[error("malformed entry: {0}")]
    Malformed(#[from] ReadError),
}

/// A decoded view of an entry's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry<'a> {
    /// Position in the ledger.
    pub index: u64,
    /// Commit time, unix ns.
    pub commit_time_ns: i64,
    /// Hash of the previous entry.
    pub prev_hash: Hash,
    /// The encoded event.
    pub event: &'a [u8],
}

impl<'a> Entry<'a> {
    /// Decodes `bytes`, which must hold exactly one entry.
    pub fn decode(bytes: &'a [u8]) -> Result<Self, EntryError> {
        let mut r = Reader::new(bytes);
        if r.take(4, "magic")? != MAGIC {
            return Err(EntryError::BadMagic);
        }
        let index = r.u64("index")?;
        let commit_time_ns = r.u64("commit time")? as i64;
        let mut prev_hash = [0u8; 32];
        prev_hash.copy_from_slice(r.take(32, "prev hash")?);
        let len = r.u32("event length")? as usize;
        let event = r.take(len, "event")?;
        r.finish()?;
        Ok(Entry {
            index,
            commit_time_ns,
            prev_hash,
            event,
        })
    }

    /// Encodes an entry.
    pub fn encode(index: u64, commit_time_ns: i64, prev_hash: &Hash, event: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + event.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&index.to_be_bytes());
        out.extend_from_slice(&commit_time_ns.to_be_bytes());
        out.extend_from_slice(prev_hash);
        // Events are capped far below 4 GiB by the ledger before they get here.
        out.extend_from_slice(&(event.len() as u32).to_be_bytes());
        out.extend_from_slice(event);
        out
    }
}

/// SHA-256 of an entry's bytes.
pub fn entry_hash(entry: &[u8]) -> Hash {
    Sha256::digest(entry).into()
}

/// What is wrong at the first bad index of a chain.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ChainError {
    /// The bytes at this index are not an entry.
    #[error("index {index}: entry cannot be decoded: {source}")]
    Undecodable {
        /// Index.
        index: u64,
        /// Why.
        source: EntryError,
    },
    /// The entry claims another index: entries were removed, reordered or duplicated.
    #[error("index {index}: entry says it is index {found} (an entry was removed, reordered or copied)")]
    WrongIndex {
        /// Where it was found.
        index: u64,
        /// What it says.
        found: u64,
    },
    /// `prev_hash` does not match the previous entry: this or the previous entry changed.
    #[error("index {index}: prev_hash {found} does not match hash {expected} of entry {prev} (entry {prev} or {index} was changed)", prev = index.wrapping_sub(1))]
    BrokenLink {
        /// Index.
        index: u64,
        /// Hex of the expected hash.
        expected: String,
        /// Hex of the stored prev_hash.
        found: String,
    },
}

impl ChainError {
    /// The index the error was found at.
    pub fn index(&self) -> u64 {
        match self {
            ChainError::Undecodable { index, .. }
            | ChainError::WrongIndex { index, .. }
            | ChainError::BrokenLink { index, .. } => *index,
        }
    }
}

/// Walks entries in order and checks indices and links.
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    next_index: u64,
    head: Hash,
}

impl ChainVerifier {
    /// Starts at index 0.
    pub fn new() -> Self {
        Self::resume(0, GENESIS)
    }

    /// Starts at `next_index`, trusting `head` as the hash of entry `next_index - 1`.
    pub fn resume(next_index: u64, head: Hash) -> Self {
        Self { next_index, head }
    }

    /// Checks the next entry; returns its hash.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Hash, ChainError> {
        let index = self.next_index;
        let e = Entry::decode(bytes).map_err(|source| ChainError::Undecodable { index, source })?;
        if e.index != index {
            return Err(ChainError::WrongIndex {
                index,
                found: e.index,
            });
        }
        if e.prev_hash != self.head {
            return Err(ChainError::BrokenLink {
                index,
                expected: hex(&self.head),
                found: hex(&e.prev_hash),
            });
        }
        self.head = entry_hash(bytes);
        self.next_index += 1;
        Ok(self.head)
    }

    /// Entries checked so far (the next expected index).
    pub fn next_index(&self) -> u64 {
        self.next_index
    }

    /// Hash of the last entry checked.
    pub fn head(&self) -> Hash {
        self.head
    }
}

impl Default for ChainVerifier {
    fn default() -> Self {
        Self::new()
    }
}

/// Lowercase hex.
pub fn hex(b: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(D[(x >> 4) as usize] as char);
        s.push(D[(x & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<Vec<u8>> {
        let mut prev = GENESIS;
        (0..n)
            .map(|i| {
                let e = Entry::encode(i, 1000 + i as i64, &prev, format!("event {i}").as_bytes());
                prev = entry_hash(&e);
                e
            })
            .collect()
    }

    fn first_error(entries: &[Vec<u8>]) -> Option<ChainError> {
        let mut v = ChainVerifier::new();
        entries.iter().find_map(|e| v.push(e).err())
    }

    #[test]
    fn intact_chain_verifies() {
        assert_eq!(first_error(&chain(10)), None);
    }

    #[test]
    fn changed_event_is_found_at_the_next_link() {
        let mut c = chain(10);
        let last = c[4].len() - 1;
        c[4][last] ^= 1;
        let err = first_error(&c).unwrap();
        assert_eq!(err.index(), 5);
        assert!(matches!(err, ChainError::BrokenLink { .. }));
    }

    #[test]
    fn removed_and_reordered_entries_are_found() {
        let mut c = chain(10);
        c.remove(3);
        assert_eq!(
            first_error(&c),
            Some(ChainError::WrongIndex { index: 3, found: 4 })
        );
        let mut c = chain(10);
        c.swap(6, 7);
        assert_eq!(first_error(&c).unwrap().index(), 6);
    }

    #[test]
    fn garbage_is_undecodable_not_a_panic() {
        for bad in [&b""[..], b"CEV1", b"XXXXaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"] {
            assert!(Entry::decode(bad).is_err());
        }
        let mut e = chain(1).remove(0);
        e.push(0);
        assert!(matches!(
            Entry::decode(&e),
            Err(EntryError::Malformed(ReadError::Trailing(1)))
        ));
    }
}
