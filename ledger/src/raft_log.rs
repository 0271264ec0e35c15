//! The Raft log on RocksDB: entries, hard state, conf state and the truncation point, in a
//! database of its own beside the state machine's (`DATA_DIR/raft`).
//!
//! raft-rs reads the log through [`raft::Storage`], which is read-only; every write happens in
//! the Ready loop ([`crate::node`]) through [`RaftLogStore::persist`], [`RaftLogStore::compact`]
//! and [`RaftLogStore::apply_snapshot`], each one atomic RocksDB write batch.
//!
//! Entries are stored exactly as raft-rs encodes them (protobuf), keyed by index (u64 BE).

use std::path::Path;
use std::sync::{Arc, Mutex};

use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{RaftState, Storage, StorageError};
use rocksdb::{ColumnFamilyDescriptor, DBCompressionType, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use thiserror::Error;

const CF_LOG: &str = "raft_log";
const CF_META: &str = "raft_meta";
const KEY_HARD_STATE: &[u8] = b"hard_state";
const KEY_CONF_STATE: &[u8] = b"conf_state";
/// Index and term of the last entry removed from the log (by compaction or a snapshot).
const KEY_TRUNCATED: &[u8] = b"truncated";
/// Which cluster and node this log belongs to.
const KEY_IDENTITY: &[u8] = b"identity";

/// A failure of the Raft log's storage.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RaftLogError {
    /// RocksDB failed (I/O, no space, corruption found by a checksum).
    #[error("raft log: rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    /// A stored value does not decode.
    #[error("raft log is corrupt: {0}")]
    Corrupt(String),
}

/// Who this log belongs to, written when the node is bootstrapped or joins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogIdentity {
    /// The cluster's name, from its bootstrap.
    pub cluster_id: String,
    /// This node's Raft id.
    pub node_id: u64,
}

/// Snapshots offered to raft-rs when a follower needs one. Filled by the node, read by
/// [`Storage::snapshot`].
#[derive(Debug, Default)]
pub struct SnapshotSlot {
    /// The newest snapshot ready to send.
    pub ready: Option<Snapshot>,
    /// Set when raft-rs asked for a snapshot that is not ready; the node makes one.
    pub wanted: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Truncated {
    index: u64,
    term: u64,
}

#[derive(Debug, Default)]
struct Cache {
    hard_state: HardState,
    conf_state: ConfState,
    truncated: Truncated,
    last_index: u64,
}

/// The Raft log. Cheap to clone; clones share the database and cache.
#[derive(Clone)]
pub struct RaftLogStore {
    db: Arc<DB>,
    cache: Arc<Mutex<Cache>>,
    snapshots: Arc<Mutex<SnapshotSlot>>,
}

impl std::fmt::Debug for RaftLogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftLogStore").field("path", &self.db.path()).finish()
    }
}

fn decode<M: protobuf::Message>(what: &str, bytes: &[u8]) -> Result<M, RaftLogError> {
    M::parse_from_bytes(bytes).map_err(|e| RaftLogError::Corrupt(format!("{what}: {e}")))
}

fn encode<M: protobuf::Message>(m: &M) -> Vec<u8> {
    // Encoding a message we built ourselves into a Vec cannot fail.
    m.write_to_bytes().unwrap_or_default()
}

fn store_err(e: RaftLogError) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

impl RaftLogStore {
    /// Opens (creating if missing) the log under `path`.
    pub fn open(path: &Path) -> Result<Self, RaftLogError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_paranoid_checks(true);
        opts.set_compression_type(DBCompressionType::Lz4);
        let cfs = [CF_LOG, CF_META].into_iter().map(|n| {
            let mut o = Options::default();
            o.set_compression_type(DBCompressionType::Lz4);
            ColumnFamilyDescriptor::new(n, o)
        });
        let db = DB::open_cf_descriptors(&opts, path, cfs)?;
        let store = Self {
            db: Arc::new(db),
            cache: Arc::default(),
            snapshots: Arc::default(),
        };
        store.load()?;
        Ok(store)
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily, RaftLogError> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| RaftLogError::Corrupt(format!("missing column family {name}")))
    }

    fn load(&self) -> Result<(), RaftLogError> {
        let meta = self.cf(CF_META)?;
        let hard_state = match self.db.get_cf(meta, KEY_HARD_STATE)? {
            Some(b) => decode("hard state", &b)?,
            None => HardState::default(),
        };
        let conf_state = match self.db.get_cf(meta, KEY_CONF_STATE)? {
            Some(b) => decode("conf state", &b)?,
            None => ConfState::default(),
        };
        let truncated = match self.db.get_cf(meta, KEY_TRUNCATED)? {
            Some(b) if b.len() == 16 => Truncated {
                index: u64::from_be_bytes(b[0..8].try_into().unwrap_or_default()),
                term: u64::from_be_bytes(b[8..16].try_into().unwrap_or_default()),
            },
            Some(_) => return Err(RaftLogError::Corrupt("truncation record has the wrong size".into())),
            None => Truncated::default(),
        };
        let last = self
            .db
            .iterator_cf(self.cf(CF_LOG)?, IteratorMode::End)
            .next()
            .transpose()?
            .map(|(k, _)| index_of(&k))
            .transpose()?;
        let last_index = last.unwrap_or(truncated.index).max(truncated.index);
        // Every index between the truncation point and the last entry must be present.
        let first = truncated.index + 1;
        if last_index >= first {
            let mut expect = first;
            for kv in self.db.iterator_cf(self.cf(CF_LOG)?, IteratorMode::Start) {
                let (k, _) = kv?;
                let i = index_of(&k)?;
                if i < first {
                    continue;
                }
                if i != expect {
                    return Err(RaftLogError::Corrupt(format!("entry {expect} is missing from the raft log (next is {i})")));
                }
                expect += 1;
            }
        }
        *self.cache.lock().unwrap_or_else(|p| p.into_inner()) = Cache {
            hard_state,
            conf_state,
            truncated,
            last_index,
        };
        Ok(())
    }

    /// The identity recorded in this log, if any.
    pub fn identity(&self) -> Result<Option<LogIdentity>, RaftLogError> {
        let Some(b) = self.db.get_cf(self.cf(CF_META)?, KEY_IDENTITY)? else {
            return Ok(None);
        };
        let text = String::from_utf8(b).map_err(|_| RaftLogError::Corrupt("identity is not UTF-8".into()))?;
        let (id, cluster) = text
            .split_once(' ')
            .ok_or_else(|| RaftLogError::Corrupt("identity record is malformed".into()))?;
        let node_id = id
            .parse()
            .map_err(|_| RaftLogError::Corrupt("identity node id is not a number".into()))?;
        Ok(Some(LogIdentity {
            cluster_id: cluster.to_string(),
            node_id,
        }))
    }

    /// Records which cluster and node this log belongs to (synced).
    pub fn set_identity(&self, id: &LogIdentity) -> Result<(), RaftLogError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        let v = format!("{} {}", id.node_id, id.cluster_id);
        self.db.put_cf_opt(self.cf(CF_META)?, KEY_IDENTITY, v.as_bytes(), &wo)?;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The stored hard state.
    pub fn hard_state(&self) -> HardState {
        self.lock().hard_state.clone()
    }

    /// The stored conf state.
    pub fn conf_state(&self) -> ConfState {
        self.lock().conf_state.clone()
    }

    /// Whether this log has ever been initialised (bootstrapped, or received a snapshot).
    pub fn is_initialized(&self) -> bool {
        self.lock().conf_state != ConfState::default()
    }

    /// Writes `entries` (replacing any conflicting tail), and `hard_state` if given, as one
    /// write batch; with `sync`, returns only once it is on disk.
    pub fn persist(&self, entries: &[Entry], hard_state: Option<&HardState>, sync: bool) -> Result<(), RaftLogError> {
        let mut batch = WriteBatch::default();
        let log = self.cf(CF_LOG)?;
        let mut new_last = None;
        if let (Some(first), Some(last)) = (entries.first(), entries.last()) {
            let old_last = self.lock().last_index;
            if first.index <= old_last {
                // A new leader overwrote our tail: everything from `first` on goes.
                batch.delete_range_cf(log, first.index.to_be_bytes(), (old_last + 1).to_be_bytes());
            }
            for e in entries {
                batch.put_cf(log, e.index.to_be_bytes(), encode(e));
            }
            new_last = Some(last.index);
        }
        if let Some(hs) = hard_state {
            batch.put_cf(self.cf(CF_META)?, KEY_HARD_STATE, encode(hs));
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(batch, &wo)?;
        let mut c = self.lock();
        if let Some(l) = new_last {
            c.last_index = l;
        }
        if let Some(hs) = hard_state {
            c.hard_state = hs.clone();
        }
        Ok(())
    }

    /// Records a new commit index (not synced: on restart the node raises the commit index to
    /// what the state machine has applied, which was only applied once committed).
    pub fn set_commit(&self, commit: u64) -> Result<(), RaftLogError> {
        let mut hs = self.hard_state();
        if hs.commit >= commit {
            return Ok(());
        }
        hs.commit = commit;
        self.persist(&[], Some(&hs), false)
    }

    /// Records the voters and learners after a conf change, or at bootstrap (synced).
    pub fn set_conf_state(&self, cs: &ConfState) -> Result<(), RaftLogError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.put_cf_opt(self.cf(CF_META)?, KEY_CONF_STATE, encode(cs), &wo)?;
        self.lock().conf_state = cs.clone();
        Ok(())
    }

    /// Removes entries before `index` (they are covered by a state-machine snapshot).
    pub fn compact(&self, index: u64) -> Result<(), RaftLogError> {
        let (first, last) = {
            let c = self.lock();
            (c.truncated.index + 1, c.last_index)
        };
        if index <= first {
            return Ok(());
        }
        if index > last + 1 {
            return Err(RaftLogError::Corrupt(format!("compact to {index} beyond the last entry {last}")));
        }
        let term = self.term_of(index - 1)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.cf(CF_LOG)?, first.to_be_bytes(), index.to_be_bytes());
        batch.put_cf(self.cf(CF_META)?, KEY_TRUNCATED, truncated_bytes(index - 1, term));
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo)?;
        self.lock().truncated = Truncated { index: index - 1, term };
        Ok(())
    }

    /// Installs a received snapshot's metadata: the log restarts after it, empty.
    pub fn apply_snapshot(&self, meta: &SnapshotMetadata) -> Result<(), RaftLogError> {
        let last = self.lock().last_index;
        let mut hs = self.hard_state();
        hs.commit = hs.commit.max(meta.index);
        hs.term = hs.term.max(meta.term);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.cf(CF_LOG)?, 0u64.to_be_bytes(), (last.max(meta.index) + 1).to_be_bytes());
        batch.put_cf(self.cf(CF_META)?, KEY_TRUNCATED, truncated_bytes(meta.index, meta.term));
        batch.put_cf(self.cf(CF_META)?, KEY_HARD_STATE, encode(&hs));
        batch.put_cf(self.cf(CF_META)?, KEY_CONF_STATE, encode(meta.get_conf_state()));
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(batch, &wo)?;
        let mut c = self.lock();
        c.truncated = Truncated {
            index: meta.index,
            term: meta.term,
        };
        c.last_index = meta.index;
        c.hard_state = hs;
        c.conf_state = meta.get_conf_state().clone();
        Ok(())
    }

    /// Where snapshots for followers are offered.
    pub fn snapshot_slot(&self) -> Arc<Mutex<SnapshotSlot>> {
        self.snapshots.clone()
    }

    /// The term of the entry at `idx`, from the cache's truncation point or the log.
    pub fn term_of(&self, idx: u64) -> Result<u64, RaftLogError> {
        let (t, last) = {
            let c = self.lock();
            (c.truncated, c.last_index)
        };
        if idx == t.index {
            return Ok(t.term);
        }
        if idx < t.index || idx > last {
            return Err(RaftLogError::Corrupt(format!("term of {idx} asked outside the log ({}..={last})", t.index)));
        }
        Ok(self.entry(idx)?.map(|e| e.term).unwrap_or(0))
    }

    /// One stored entry.
    pub fn entry(&self, idx: u64) -> Result<Option<Entry>, RaftLogError> {
        match self.db.get_cf(self.cf(CF_LOG)?, idx.to_be_bytes())? {
            Some(b) => Ok(Some(decode("raft entry", &b)?)),
            None => Ok(None),
        }
    }

    /// Index of the last stored entry (or of the truncation point when the log is empty).
    pub fn last(&self) -> u64 {
        self.lock().last_index
    }

    /// Index of the first stored entry.
    pub fn first(&self) -> u64 {
        self.lock().truncated.index + 1
    }

    /// Flushes the WAL (at shutdown).
    pub fn flush(&self) -> Result<(), RaftLogError> {
        self.db.flush_wal(true)?;
        Ok(())
    }
}

fn truncated_bytes(index: u64, term: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&index.to_be_bytes());
    v.extend_from_slice(&term.to_be_bytes());
    v
}

fn index_of(k: &[u8]) -> Result<u64, RaftLogError> {
    let a: [u8; 8] = k
        .try_into()
        .map_err(|_| RaftLogError::Corrupt(format!("raft log key of {} bytes", k.len())))?;
    Ok(u64::from_be_bytes(a))
}

impl Storage for RaftLogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let c = self.lock();
        Ok(RaftState::new(c.hard_state.clone(), c.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: raft::GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into();
        let (first, last) = (self.first(), self.last());
        if low < first {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > last + 1 || low > high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let log = self.cf(CF_LOG).map_err(store_err)?;
        let mut out = Vec::with_capacity((high - low).min(1024) as usize);
        let mut size: u64 = 0;
        let start = low.to_be_bytes();
        for kv in self.db.iterator_cf(log, IteratorMode::From(&start, Direction::Forward)) {
            let (k, v) = kv.map_err(|e| store_err(e.into()))?;
            let idx = index_of(&k).map_err(store_err)?;
            if idx >= high {
                break;
            }
            if idx != low + out.len() as u64 {
                return Err(store_err(RaftLogError::Corrupt(format!("entry {} missing from the raft log", low + out.len() as u64))));
            }
            size += v.len() as u64;
            if !out.is_empty() && max_size.is_some_and(|m| size > m) {
                break;
            }
            out.push(decode::<Entry>("raft entry", &v).map_err(store_err)?);
        }
        if out.is_empty() && low < high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let (t, last) = {
            let c = self.lock();
            (c.truncated, c.last_index)
        };
        if idx == t.index {
            return Ok(t.term);
        }
        if idx < t.index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > last {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        match self.entry(idx).map_err(store_err)? {
            Some(e) => Ok(e.term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let mut slot = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = &slot.ready {
            let cs = s.get_metadata().get_conf_state();
            // A node added after the snapshot was taken would ignore it: it is not in it.
            let names_peer = cs.voters.contains(&to) || cs.learners.contains(&to);
            if s.get_metadata().index >= request_index && names_peer {
                return Ok(s.clone());
            }
        }
        slot.wanted = Some(slot.wanted.map_or(request_index, |w| w.max(request_index)));
        Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        let mut e = Entry::default();
        e.index = index;
        e.term = term;
        e.data = vec![index as u8; 10].into();
        e
    }

    fn ctx() -> raft::GetEntriesContext {
        raft::GetEntriesContext::empty(false)
    }

    #[test]
    fn entries_terms_truncation_and_conflicting_tails() {
        let dir = tempfile::tempdir().unwrap();
        let s = RaftLogStore::open(dir.path()).unwrap();
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (1, 0));
        s.persist(&(1..=5).map(|i| entry(i, 1)).collect::<Vec<_>>(), None, true).unwrap();
        assert_eq!(s.entries(2, 5, None, ctx()).unwrap().iter().map(|e| e.index).collect::<Vec<_>>(), vec![2, 3, 4]);
        // max_size keeps at least one entry.
        assert_eq!(s.entries(2, 5, Some(1), ctx()).unwrap().len(), 1);
        // A new leader replaces the tail from 4 on.
        s.persist(&[entry(4, 2)], None, true).unwrap();
        assert_eq!(s.last_index().unwrap(), 4);
        assert_eq!(s.term(4).unwrap(), 2);
        assert!(matches!(s.term(5), Err(raft::Error::Store(StorageError::Unavailable))));
        s.compact(3).unwrap();
        assert_eq!(s.first_index().unwrap(), 3);
        assert_eq!(s.term(2).unwrap(), 1, "the term before the first entry is kept");
        assert!(matches!(s.entries(1, 3, None, ctx()), Err(raft::Error::Store(StorageError::Compacted))));
        let mut hs = HardState::default();
        hs.term = 2;
        hs.commit = 3;
        s.persist(&[], Some(&hs), true).unwrap();
        drop(s);
        // Everything survives a reopen.
        let s = RaftLogStore::open(dir.path()).unwrap();
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (3, 4));
        assert_eq!(s.initial_state().unwrap().hard_state.commit, 3);
        assert_eq!(s.term(2).unwrap(), 1);
    }

    #[test]
    fn a_snapshot_resets_the_log_and_a_gap_is_reported_as_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let s = RaftLogStore::open(dir.path()).unwrap();
        s.persist(&(1..=3).map(|i| entry(i, 1)).collect::<Vec<_>>(), None, true).unwrap();
        let mut meta = SnapshotMetadata::default();
        meta.index = 10;
        meta.term = 3;
        meta.mut_conf_state().voters = vec![1, 2, 3];
        s.apply_snapshot(&meta).unwrap();
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (11, 10));
        assert_eq!(s.term(10).unwrap(), 3);
        assert_eq!(s.conf_state().voters, vec![1, 2, 3]);
        s.persist(&[entry(11, 3), entry(12, 3), entry(13, 3)], None, true).unwrap();
        // Remove a middle entry behind the store's back.
        s.db.delete_cf(s.cf(CF_LOG).unwrap(), 12u64.to_be_bytes()).unwrap();
        drop(s);
        let err = RaftLogStore::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("entry 12 is missing"), "{err}");
    }
}
