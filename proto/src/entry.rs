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
//!
//! Retention replaces an exported entry's bytes in hot storage by a [`PrunedEntry`]: its
//! header, its hashes and the session it belonged to, without the event. The Merkle leaf and
//! the chain link stay, so proofs and chain checks go on through pruned entries
//! ([`stored_leaf`], [`ChainVerifier::push`]); the payload is in the export.
//!
//! ```text
//! pruned = "CPR1" index u64, commit_time_ns i64, prev_hash 32, entry_hash 32, leaf 32,
//!          event_sha256 32, kind u32, session_len u16, session_id
//! ```

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
    /// A pruned entry's session id is not UTF-8.
    #[error("pruned entry: the session id is not UTF-8")]
    BadSession,
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

/// Magic of a pruned entry.
pub const PRUNED_MAGIC: &[u8; 4] = b"CPR1";

/// What hot storage keeps of an entry whose payload was pruned after export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrunedEntry {
    /// Position in the ledger.
    pub index: u64,
    /// Commit time, unix ns.
    pub commit_time_ns: i64,
    /// Hash of the previous entry.
    pub prev_hash: Hash,
    /// SHA-256 of the full entry.
    pub entry_hash: Hash,
    /// The entry's Merkle leaf hash.
    pub leaf: Hash,
    /// SHA-256 of the event bytes (to recognise a retried append of the same event).
    pub event_sha256: Hash,
    /// The event's kind.
    pub kind: i32,
    /// Its session.
    pub session_id: String,
}

impl PrunedEntry {
    /// The pruned form of a full entry (`bytes`, decoded as `e`).
    pub fn of(bytes: &[u8], e: &Entry<'_>, kind: i32, session_id: &str) -> Self {
        Self {
            index: e.index,
            commit_time_ns: e.commit_time_ns,
            prev_hash: e.prev_hash,
            entry_hash: entry_hash(bytes),
            leaf: crate::merkle::leaf_hash(bytes),
            event_sha256: Sha256::digest(e.event).into(),
            kind,
            session_id: session_id.to_string(),
        }
    }

    /// Canonical bytes.
    pub fn encode(&self) -> Vec<u8> {
        let sid = &self.session_id.as_bytes()[..self.session_id.len().min(u16::MAX as usize)];
        let mut out = Vec::with_capacity(4 + 8 + 8 + 32 * 4 + 4 + 2 + sid.len());
        out.extend_from_slice(PRUNED_MAGIC);
        out.extend_from_slice(&self.index.to_be_bytes());
        out.extend_from_slice(&self.commit_time_ns.to_be_bytes());
        for h in [&self.prev_hash, &self.entry_hash, &self.leaf, &self.event_sha256] {
            out.extend_from_slice(h);
        }
        out.extend_from_slice(&(self.kind as u32).to_be_bytes());
        out.extend_from_slice(&(sid.len() as u16).to_be_bytes());
        out.extend_from_slice(sid);
        out
    }

    /// Decodes `bytes`, which must hold exactly one pruned entry.
    pub fn decode(bytes: &[u8]) -> Result<Self, EntryError> {
        let mut r = Reader::new(bytes);
        if r.take(4, "magic")? != PRUNED_MAGIC {
            return Err(EntryError::BadMagic);
        }
        let index = r.u64("index")?;
        let commit_time_ns = r.u64("commit time")? as i64;
        let mut hashes = [[0u8; 32]; 4];
        for h in hashes.iter_mut() {
            h.copy_from_slice(r.take(32, "hash")?);
        }
        let kind = r.u32("kind")? as i32;
        let n = r.u16("session length")? as usize;
        let session_id = String::from_utf8(r.take(n, "session id")?.to_vec()).map_err(|_| EntryError::BadSession)?;
        r.finish()?;
        let [prev_hash, entry_hash, leaf, event_sha256] = hashes;
        Ok(Self { index, commit_time_ns, prev_hash, entry_hash, leaf, event_sha256, kind, session_id })
    }
}

/// True when stored bytes are a pruned entry.
pub fn is_pruned(bytes: &[u8]) -> bool {
    bytes.starts_with(PRUNED_MAGIC)
}

/// The Merkle leaf of stored bytes: the leaf hash of a full entry, or the leaf a pruned entry
/// kept. A pruned entry that does not decode gives the hash of its bytes, which no proof
/// accepts.
pub fn stored_leaf(bytes: &[u8]) -> Hash {
    match is_pruned(bytes).then(|| PrunedEntry::decode(bytes)) {
        Some(Ok(p)) => p.leaf,
        _ => crate::merkle::leaf_hash(bytes),
    }
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

    /// Checks the next entry (full or pruned); returns its hash.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Hash, ChainError> {
        let index = self.next_index;
        if is_pruned(bytes) {
            let p = PrunedEntry::decode(bytes).map_err(|source| ChainError::Undecodable { index, source })?;
            return self.link(index, p.index, p.prev_hash, p.entry_hash);
        }
        let e = Entry::decode(bytes).map_err(|source| ChainError::Undecodable { index, source })?;
        self.link(index, e.index, e.prev_hash, entry_hash(bytes))
    }

    fn link(&mut self, index: u64, found: u64, prev_hash: Hash, hash: Hash) -> Result<Hash, ChainError> {
        if found != index {
            return Err(ChainError::WrongIndex { index, found });
        }
        if prev_hash != self.head {
            return Err(ChainError::BrokenLink {
                index,
                expected: hex(&self.head),
                found: hex(&prev_hash),
            });
        }
        self.head = hash;
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

#[cfg(test)]
mod pruned_tests {
    use super::*;

    #[test]
    fn a_pruned_entry_keeps_leaf_and_link_and_the_chain_goes_through_it() {
        let e0 = Entry::encode(0, 10, &GENESIS, b"first event");
        let e1 = Entry::encode(1, 11, &entry_hash(&e0), b"second event");
        let e2 = Entry::encode(2, 12, &entry_hash(&e1), b"third event");
        let d1 = Entry::decode(&e1).unwrap();
        let p1 = PrunedEntry::of(&e1, &d1, 2, "sess-1");
        let b1 = p1.encode();
        assert!(is_pruned(&b1) && !is_pruned(&e1));
        assert_eq!(PrunedEntry::decode(&b1).unwrap(), p1);
        assert_eq!(stored_leaf(&b1), crate::merkle::leaf_hash(&e1), "the leaf survives pruning");
        assert_eq!(stored_leaf(&e1), crate::merkle::leaf_hash(&e1));
        let mut chain = ChainVerifier::new();
        for b in [&e0, &b1, &e2] {
            chain.push(b).unwrap();
        }
        assert_eq!(chain.head(), entry_hash(&e2));
        // A pruned entry whose kept hash was changed breaks the next link.
        let mut forged = p1.clone();
        forged.entry_hash[0] ^= 1;
        let mut chain = ChainVerifier::new();
        chain.push(&e0).unwrap();
        chain.push(&forged.encode()).unwrap();
        assert!(matches!(chain.push(&e2), Err(ChainError::BrokenLink { index: 2, .. })));
        // Cut short or trailing bytes are errors, not panics.
        for n in 0..b1.len() {
            assert!(PrunedEntry::decode(&b1[..n]).is_err());
        }
        assert!(PrunedEntry::decode(&[b1.as_slice(), b"x"].concat()).is_err());
    }
}
