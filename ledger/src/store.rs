//! RocksDB storage for the ledger: entries, idempotency keys, session summaries and meta.
//!
//! **Architecture Invariant:** only this module talks to RocksDB. Writes arrive as a
//! [`WriteSet`] produced by the state machine and are applied atomically in one
//! `WriteBatch`, with the WAL synced when asked.

use std::path::Path;

use rocksdb::{ColumnFamilyDescriptor, DBCompressionType, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use thiserror::Error;

/// Column families.
pub mod cf {
    /// index (u64 BE) -> entry bytes.
    pub const ENTRIES: &str = "entries";
    /// idempotency key -> index (u64 BE).
    pub const IDEM: &str = "idem";
    /// session id -> SessionSummary (JSON).
    pub const SESSIONS: &str = "sessions";
    /// session id, 0, index (u64 BE) -> empty. Finds a session's events without a scan.
    pub const BY_SESSION: &str = "by_session";
    /// Small state-machine values: next index, head hash, last commit time, the Raft index
    /// and conf state applied, cluster membership.
    pub const META: &str = "meta";
    /// proxy id (u16 length-prefixed), session id -> empty: the sessions still open, per
    /// proxy, so that a lapsed lease finds them without a scan.
    pub const OPEN_SESSIONS: &str = "open_sessions";
    /// proxy id -> lease (JSON).
    pub const LEASES: &str = "leases";
    /// level (u8), index (u64 BE) -> SHA-256: the RFC 6962 Merkle tree over the entries,
    /// as the hash of every complete subtree (see `custody_proto::merkle`).
    pub const MERKLE: &str = "merkle";
    /// height (u64 BE) -> the block header's canonical bytes (`custody_proto::block`).
    pub const BLOCKS: &str = "blocks";
    /// field tag (u8), value length (u16 BE), value, index (u64 BE) -> empty: events by
    /// caller (subject and email), resource and kind, so that those filters walk an index.
    pub const BY_FIELD: &str = "by_field";
    /// All of them.
    pub const ALL: [&str; 10] = [ENTRIES, IDEM, SESSIONS, BY_SESSION, META, OPEN_SESSIONS, LEASES, MERKLE, BLOCKS, BY_FIELD];
}

/// A storage failure.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StoreError {
    /// RocksDB reported an error (I/O, corruption, no space).
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    /// A stored value is not what the ledger wrote.
    #[error("corrupt ledger data: {0}")]
    Corrupt(String),
}

/// One write produced by the state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Put {
    /// Column family.
    pub cf: &'static str,
    /// Key.
    pub key: Vec<u8>,
    /// Value.
    pub value: Vec<u8>,
    /// Delete the key instead of writing `value`.
    pub delete: bool,
}

impl Put {
    /// Writes `value` at `key`.
    pub fn new(cf: &'static str, key: Vec<u8>, value: Vec<u8>) -> Self {
        Self { cf, key, value, delete: false }
    }

    /// Deletes `key`.
    pub fn delete(cf: &'static str, key: Vec<u8>) -> Self {
        Self { cf, key, value: Vec::new(), delete: true }
    }
}

/// Writes to apply atomically.
pub type WriteSet = Vec<Put>;

/// The ledger's RocksDB database.
pub struct Store {
    db: DB,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.db.path()).finish()
    }
}

impl Store {
    /// Opens (creating if missing) the database under `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_compression_type(DBCompressionType::Lz4);
        // Check block checksums on every read, so silent disk corruption surfaces as an error.
        opts.set_paranoid_checks(true);
        let cfs = cf::ALL.iter().map(|name| {
            let mut o = Options::default();
            o.set_compression_type(DBCompressionType::Lz4);
            ColumnFamilyDescriptor::new(*name, o)
        });
        let db = DB::open_cf_descriptors(&opts, path, cfs)?;
        Ok(Self { db })
    }

    fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily, StoreError> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| StoreError::Corrupt(format!("missing column family {name}")))
    }

    /// Applies `writes` atomically. With `sync`, returns only after the WAL is on disk.
    pub fn write(&self, writes: &[Put], sync: bool) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        for p in writes {
            if p.delete {
                batch.delete_cf(self.cf(p.cf)?, &p.key);
            } else {
                batch.put_cf(self.cf(p.cf)?, &p.key, &p.value);
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// A value by key.
    pub fn get(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get_cf(self.cf(cf)?, key)?)
    }

    /// The entry at `index`.
    pub fn entry(&self, index: u64) -> Result<Option<Vec<u8>>, StoreError> {
        self.get(cf::ENTRIES, &index.to_be_bytes())
    }

    /// Entries from `from` on, in index order.
    pub fn entries_from(
        &self,
        from: u64,
    ) -> Result<impl Iterator<Item = Result<(u64, Vec<u8>), StoreError>> + '_, StoreError> {
        let key = from.to_be_bytes();
        let it = self
            .db
            .iterator_cf(self.cf(cf::ENTRIES)?, IteratorMode::From(&key, Direction::Forward));
        Ok(it.map(|r| {
            let (k, v) = r?;
            let index = u64_key(&k)?;
            Ok((index, v.into_vec()))
        }))
    }

    /// Block headers from `height` on, in order (raw bytes).
    pub fn blocks_from(&self, height: u64) -> Result<impl Iterator<Item = Result<(u64, Vec<u8>), StoreError>> + '_, StoreError> {
        let key = height.to_be_bytes();
        let it = self.db.iterator_cf(self.cf(cf::BLOCKS)?, IteratorMode::From(&key, Direction::Forward));
        Ok(it.map(|r| {
            let (k, v) = r?;
            Ok((u64_key(&k)?, v.into_vec()))
        }))
    }

    /// Keys of `cf` that start with `prefix`, in order.
    pub fn keys_with_prefix<'a>(
        &'a self,
        cf: &str,
        prefix: &'a [u8],
    ) -> Result<impl Iterator<Item = Result<Box<[u8]>, StoreError>> + 'a, StoreError> {
        let it = self
            .db
            .iterator_cf(self.cf(cf)?, IteratorMode::From(prefix, Direction::Forward));
        Ok(it
            .map(|r| r.map(|(k, _)| k).map_err(StoreError::from))
            .take_while(move |r| match r {
                Ok(k) => k.starts_with(prefix),
                Err(_) => true,
            }))
    }

    /// All values of `cf`, in key order.
    pub fn values<'a>(
        &'a self,
        cf: &str,
    ) -> Result<impl Iterator<Item = Result<Vec<u8>, StoreError>> + 'a, StoreError> {
        let it = self.db.iterator_cf(self.cf(cf)?, IteratorMode::Start);
        Ok(it.map(|r| r.map(|(_, v)| v.into_vec()).map_err(StoreError::from)))
    }

    /// Values of `cf` whose keys start with `prefix`, in key order.
    pub fn scan_prefix<'a>(
        &'a self,
        cf: &str,
        prefix: &'a [u8],
    ) -> Result<impl Iterator<Item = Result<(Box<[u8]>, Box<[u8]>), StoreError>> + 'a, StoreError> {
        let it = self
            .db
            .iterator_cf(self.cf(cf)?, IteratorMode::From(prefix, Direction::Forward));
        Ok(it.map(|r| r.map_err(StoreError::from)).take_while(move |r| match r {
            Ok((k, _)) => k.starts_with(prefix),
            Err(_) => true,
        }))
    }

    /// Writes a consistent copy of the database to `dir` (hard links where possible), with
    /// memtables flushed first, so that the copy is durable and complete.
    pub fn checkpoint(&self, dir: &Path) -> Result<(), StoreError> {
        let cp = rocksdb::checkpoint::Checkpoint::new(&self.db)?;
        cp.create_checkpoint(dir)?;
        Ok(())
    }

    /// The directory the database lives in.
    pub fn path(&self) -> &Path {
        self.db.path()
    }

    /// Flushes memtables and syncs the WAL (used at shutdown).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_wal(true)?;
        Ok(())
    }

    /// Test and tamper-tooling hook: overwrite or delete an entry directly, bypassing the
    /// state machine. Used only by the tamper tests of `verify`.
    pub fn raw_put_entry(&self, index: u64, bytes: Option<&[u8]>) -> Result<(), StoreError> {
        let cf = self.cf(cf::ENTRIES)?;
        match bytes {
            Some(b) => self.db.put_cf(cf, index.to_be_bytes(), b)?,
            None => self.db.delete_cf(cf, index.to_be_bytes())?,
        }
        Ok(())
    }
}

/// A consistent, point-in-time view of the store (a RocksDB snapshot): every read through it
/// sees the same state, whatever the state machine writes meanwhile. A check of the whole
/// log reads through one, so that entries, tree nodes and blocks agree with each other.
pub struct StoreView<'a> {
    store: &'a Store,
    snap: rocksdb::Snapshot<'a>,
}

impl Store {
    /// A view of the store as it is now.
    pub fn view(&self) -> StoreView<'_> {
        StoreView { store: self, snap: self.db.snapshot() }
    }
}

impl StoreView<'_> {
    /// A value by key.
    pub fn get(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.snap.get_cf(self.store.cf(cf)?, key)?)
    }

    /// Entries from `from` on, in index order.
    pub fn entries_from(&self, from: u64) -> Result<impl Iterator<Item = Result<(u64, Vec<u8>), StoreError>> + '_, StoreError> {
        self.u64_keyed(cf::ENTRIES, from)
    }

    /// Block headers from `height` on (raw bytes).
    pub fn blocks_from(&self, height: u64) -> Result<impl Iterator<Item = Result<(u64, Vec<u8>), StoreError>> + '_, StoreError> {
        self.u64_keyed(cf::BLOCKS, height)
    }

    fn u64_keyed(&self, cf: &str, from: u64) -> Result<impl Iterator<Item = Result<(u64, Vec<u8>), StoreError>> + '_, StoreError> {
        let key = from.to_be_bytes();
        let it = self.snap.iterator_cf(self.store.cf(cf)?, IteratorMode::From(&key, Direction::Forward));
        Ok(it.map(|r| {
            let (k, v) = r?;
            Ok((u64_key(&k)?, v.into_vec()))
        }))
    }
}

/// Decodes a big-endian u64 key.
pub fn u64_key(k: &[u8]) -> Result<u64, StoreError> {
    let a: [u8; 8] = k
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("key of {} bytes where an index was expected", k.len())))?;
    Ok(u64::from_be_bytes(a))
}
