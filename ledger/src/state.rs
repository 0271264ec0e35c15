//! The ledger's deterministic state machine.
//!
//! [`LedgerState::apply_append`] turns one [`AppendBatch`] into the writes that store it and
//! the results to acknowledge. It reads nothing but its own state and the [`Lookup`] it is
//! given: no clock (the batch carries its commit time), no randomness, no configuration. The
//! single-node committer calls it today; a Raft apply loop calls it the same way, so every
//! replica computes the same indices and hashes.

use std::collections::HashMap;

use bytes::Bytes;
use custody_proto::entry::{entry_hash, Entry, Hash, GENESIS};
use custody_proto::merkle::{leaf_hash, nodes_completed_by, NodeSource};
use custody_proto::pb::ledger::AppendResult;
use custody_proto::pb::v1::{event, EventKind};
use custody_proto::Event;
use prost::Message;
use sha2::Digest as _;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::store::{cf, u64_key, Put, Store, StoreError, WriteSet};

/// A batch of encoded events with the commit time the proposer chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendBatch {
    /// Unix ns. Entries get `max(commit_time_ns, last commit time)`, so times never go back.
    pub commit_time_ns: i64,
    /// Encoded `custody.v1.Event`s, stored verbatim.
    pub events: Vec<Bytes>,
}

/// Limits checked on every event before it is accepted.
pub const MAX_ID_LEN: usize = 256;

/// Why a batch was refused. Nothing of a refused batch is stored.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// An event in the batch is not a valid custody event.
    #[error("event {position} of the batch is invalid: {reason}")]
    InvalidEvent {
        /// Position in the batch.
        position: usize,
        /// What is wrong.
        reason: String,
    },
    /// The batch is well formed but the ledger's state refuses it: an idempotency key that is
    /// already stored with different bytes, or an event for a session the ledger closed.
    #[error("event {position} of the batch is refused: {reason}")]
    Refused {
        /// Position in the batch.
        position: usize,
        /// What is wrong.
        reason: String,
    },
    /// Reading state failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Read access the state machine needs.
pub trait Lookup {
    /// The index stored for an idempotency key.
    fn idem(&self, key: &[u8]) -> Result<Option<u64>, StoreError>;
    /// A session's summary.
    fn session(&self, id: &str) -> Result<Option<SessionSummary>, StoreError>;
    /// The stored entry at `index`.
    fn entry_at(&self, index: u64) -> Result<Option<Vec<u8>>, StoreError>;
    /// The stored Merkle node at `level` and `index`.
    fn tree_node(&self, level: u8, index: u64) -> Result<Option<Hash>, StoreError>;
    /// Whether a session is under a legal hold.
    fn held(&self, session_id: &str) -> Result<bool, StoreError>;
}

/// The key of a Merkle node in `cf::MERKLE`.
pub fn tree_node_key(level: u8, index: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(level);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

fn decode_node(level: u8, index: u64, v: &[u8]) -> Result<Hash, StoreError> {
    v.try_into().map_err(|_| StoreError::Corrupt(format!("merkle node ({level}, {index}) is {} bytes, not 32", v.len())))
}

/// The stored Merkle tree as a [`NodeSource`]: a node that should exist and does not is
/// corruption.
pub struct StoredTree<'a, L: Lookup>(pub &'a L);

impl<L: Lookup> NodeSource for StoredTree<'_, L> {
    type Error = StoreError;
    fn node(&self, level: u8, index: u64) -> Result<Hash, StoreError> {
        self.0
            .tree_node(level, index)?
            .ok_or_else(|| StoreError::Corrupt(format!("merkle node (level {level}, index {index}) is missing")))
    }
}

fn decode_summary(id: &str, v: &[u8]) -> Result<SessionSummary, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt(format!("session summary {id}: {e}")))
}

impl Lookup for Store {
    fn idem(&self, key: &[u8]) -> Result<Option<u64>, StoreError> {
        self.get(cf::IDEM, key)?.map(|v| u64_key(&v)).transpose()
    }
    fn session(&self, id: &str) -> Result<Option<SessionSummary>, StoreError> {
        self.get(cf::SESSIONS, id.as_bytes())?.map(|v| decode_summary(id, &v)).transpose()
    }
    fn entry_at(&self, index: u64) -> Result<Option<Vec<u8>>, StoreError> {
        self.entry(index)
    }
    fn tree_node(&self, level: u8, index: u64) -> Result<Option<Hash>, StoreError> {
        self.get(cf::MERKLE, &tree_node_key(level, index))?.map(|v| decode_node(level, index, &v)).transpose()
    }
    fn held(&self, session_id: &str) -> Result<bool, StoreError> {
        Ok(self.get(cf::META, &hold_key(session_id))?.is_some())
    }
}

impl Lookup for crate::store::StoreView<'_> {
    fn idem(&self, key: &[u8]) -> Result<Option<u64>, StoreError> {
        self.get(cf::IDEM, key)?.map(|v| u64_key(&v)).transpose()
    }
    fn session(&self, id: &str) -> Result<Option<SessionSummary>, StoreError> {
        self.get(cf::SESSIONS, id.as_bytes())?.map(|v| decode_summary(id, &v)).transpose()
    }
    fn entry_at(&self, index: u64) -> Result<Option<Vec<u8>>, StoreError> {
        self.get(cf::ENTRIES, &index.to_be_bytes())
    }
    fn tree_node(&self, level: u8, index: u64) -> Result<Option<Hash>, StoreError> {
        self.get(cf::MERKLE, &tree_node_key(level, index))?.map(|v| decode_node(level, index, &v)).transpose()
    }
    fn held(&self, session_id: &str) -> Result<bool, StoreError> {
        Ok(self.get(cf::META, &hold_key(session_id))?.is_some())
    }
}

/// A [`Lookup`] that sees, over a base, the writes of batches applied earlier in the same
/// atomic write: one Raft entry carries several append requests, applied one after another
/// but stored together.
pub struct Overlay<'a, L: Lookup> {
    base: &'a L,
    idem: HashMap<Vec<u8>, u64>,
    sessions: HashMap<Vec<u8>, Vec<u8>>,
    entries: HashMap<u64, Vec<u8>>,
    nodes: HashMap<Vec<u8>, Hash>,
    holds: HashMap<Vec<u8>, bool>,
}

impl<'a, L: Lookup> Overlay<'a, L> {
    /// An overlay with nothing pending.
    pub fn new(base: &'a L) -> Self {
        Self {
            base,
            idem: HashMap::new(),
            sessions: HashMap::new(),
            entries: HashMap::new(),
            nodes: HashMap::new(),
            holds: HashMap::new(),
        }
    }

    /// Makes `writes` visible to later lookups.
    pub fn absorb(&mut self, writes: &[Put]) {
        for p in writes {
            match p.cf {
                cf::IDEM => {
                    if let Ok(i) = u64_key(&p.value) {
                        self.idem.insert(p.key.clone(), i);
                    }
                }
                cf::SESSIONS => {
                    self.sessions.insert(p.key.clone(), p.value.clone());
                }
                cf::ENTRIES => {
                    if let Ok(i) = u64_key(&p.key) {
                        self.entries.insert(i, p.value.clone());
                    }
                }
                cf::MERKLE => {
                    if let Ok(h) = <Hash>::try_from(&p.value[..]) {
                        self.nodes.insert(p.key.clone(), h);
                    }
                }
                cf::META if p.key.starts_with(HOLD_PREFIX) => {
                    self.holds.insert(p.key.clone(), !p.delete);
                }
                _ => {}
            }
        }
    }
}

impl<L: Lookup> Lookup for Overlay<'_, L> {
    fn idem(&self, key: &[u8]) -> Result<Option<u64>, StoreError> {
        match self.idem.get(key) {
            Some(i) => Ok(Some(*i)),
            None => self.base.idem(key),
        }
    }
    fn session(&self, id: &str) -> Result<Option<SessionSummary>, StoreError> {
        match self.sessions.get(id.as_bytes()) {
            Some(v) => decode_summary(id, v).map(Some),
            None => self.base.session(id),
        }
    }
    fn entry_at(&self, index: u64) -> Result<Option<Vec<u8>>, StoreError> {
        match self.entries.get(&index) {
            Some(v) => Ok(Some(v.clone())),
            None => self.base.entry_at(index),
        }
    }
    fn tree_node(&self, level: u8, index: u64) -> Result<Option<Hash>, StoreError> {
        match self.nodes.get(&tree_node_key(level, index)) {
            Some(h) => Ok(Some(*h)),
            None => self.base.tree_node(level, index),
        }
    }
    fn held(&self, session_id: &str) -> Result<bool, StoreError> {
        match self.holds.get(&hold_key(session_id)) {
            Some(h) => Ok(*h),
            None => self.base.held(session_id),
        }
    }
}

/// Nodes written earlier in the same batch, over a [`Lookup`].
struct PendingTree<'a, L: Lookup> {
    base: &'a L,
    nodes: &'a HashMap<(u8, u64), Hash>,
}

impl<L: Lookup> NodeSource for PendingTree<'_, L> {
    type Error = StoreError;
    fn node(&self, level: u8, index: u64) -> Result<Hash, StoreError> {
        match self.nodes.get(&(level, index)) {
            Some(h) => Ok(*h),
            None => StoredTree(self.base).node(level, index),
        }
    }
}

/// What the `by_field` index is keyed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Field {
    /// The caller: subject or email.
    Identity = 1,
    /// The resource.
    Resource = 2,
    /// The event kind (its name).
    Kind = 3,
}

/// The prefix of `field = value` in `cf::BY_FIELD` (values longer than 64 KiB are cut there;
/// the scan still compares the decoded event).
pub fn by_field_prefix(field: Field, value: &str) -> Vec<u8> {
    let v = &value.as_bytes()[..value.len().min(u16::MAX as usize)];
    let mut k = Vec::with_capacity(3 + v.len() + 8);
    k.push(field as u8);
    k.extend_from_slice(&(v.len() as u16).to_be_bytes());
    k.extend_from_slice(v);
    k
}

/// The `by_field` keys of one event at `index`.
pub fn by_field_keys(ev: &Event, index: u64) -> Vec<Vec<u8>> {
    let mut values: Vec<(Field, &str)> = Vec::with_capacity(4);
    if let Some(id) = &ev.identity {
        if !id.subject.is_empty() {
            values.push((Field::Identity, &id.subject));
        }
        if !id.email.is_empty() && id.email != id.subject {
            values.push((Field::Identity, &id.email));
        }
    }
    values.push((Field::Resource, &ev.resource));
    values.push((Field::Kind, crate::table::kind_name(ev.kind)));
    values
        .into_iter()
        .map(|(f, v)| {
            let mut k = by_field_prefix(f, v);
            k.extend_from_slice(&index.to_be_bytes());
            k
        })
        .collect()
}

const META_FIELD_INDEX: &[u8] = b"by_field_complete";

/// Whether the `by_field` index covers every entry: recorded by [`backfill_field_index`],
/// which every store goes through once (at once when it is empty); appends index as they go.
pub fn field_index_complete(store: &Store) -> Result<bool, StoreError> {
    Ok(store.get(cf::META, META_FIELD_INDEX)?.is_some())
}

/// Indexes every stored entry by field (for a ledger written before the index existed), in
/// writes of at most `chunk` entries, then records the index as complete.
pub fn backfill_field_index(store: &Store, chunk: usize) -> Result<u64, StoreError> {
    let mut n = 0u64;
    let mut writes = Vec::new();
    for r in store.entries_from(0)? {
        let (index, bytes) = r?;
        if custody_proto::entry::is_pruned(&bytes) {
            // Pruned after the index existed: its keys are already there.
            continue;
        }
        let e = Entry::decode(&bytes).map_err(|e| StoreError::Corrupt(format!("entry {index}: {e}")))?;
        let ev = Event::decode(e.event).map_err(|e| StoreError::Corrupt(format!("entry {index}: event: {e}")))?;
        for k in by_field_keys(&ev, index) {
            writes.push(Put::new(cf::BY_FIELD, k, Vec::new()));
        }
        n += 1;
        if writes.len() >= chunk {
            store.write(&writes, false)?;
            writes.clear();
        }
    }
    writes.push(Put::new(cf::META, META_FIELD_INDEX.to_vec(), vec![1]));
    store.write(&writes, true)?;
    Ok(n)
}

/// The writes that add the leaf `entry` at `index` to the Merkle tree.
fn tree_writes<L: Lookup>(lookup: &L, pending: &mut HashMap<(u8, u64), Hash>, index: u64, entry: &[u8], writes: &mut Vec<Put>) -> Result<(), StoreError> {
    let nodes = nodes_completed_by(&PendingTree { base: lookup, nodes: pending }, index, leaf_hash(entry))?;
    for (level, i, h) in nodes {
        pending.insert((level, i), h);
        writes.push(Put::new(cf::MERKLE, tree_node_key(level, i), h.to_vec()));
    }
    Ok(())
}

/// Adds the Merkle nodes of entries `from..to` (a ledger written before the tree existed),
/// in writes of at most `chunk` entries. Returns how many entries it added.
pub fn backfill_tree(store: &Store, from: u64, to: u64, chunk: u64) -> Result<u64, StoreError> {
    let mut at = from;
    while at < to {
        let end = (at + chunk).min(to);
        let mut writes = Vec::new();
        let mut pending = HashMap::new();
        for i in at..end {
            let e = store.entry(i)?.ok_or_else(|| StoreError::Corrupt(format!("entry {i} is missing")))?;
            tree_writes(store, &mut pending, i, &e, &mut writes)?;
        }
        store.write(&writes, true)?;
        at = end;
    }
    Ok(to - from)
}

/// The size of the stored tree: the number of leaves it holds, found by probing the leaf
/// level (O(log n) reads). Equals the ledger size unless the tree is behind (backfill).
pub fn stored_tree_size<L: Lookup>(store: &L, ledger_size: u64) -> Result<u64, StoreError> {
    if ledger_size == 0 || store.tree_node(0, ledger_size - 1)?.is_some() {
        return Ok(ledger_size);
    }
    // Leaves are written in order: binary search for the first missing one.
    let (mut lo, mut hi) = (0u64, ledger_size - 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if store.tree_node(0, mid)?.is_some() {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

/// What the ledger knows about one session, maintained as its events are applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSummary {
    pub session_id: String,
    pub proxy_id: String,
    pub resource: String,
    pub protocol: String,
    pub client_addr: String,
    pub issuer: String,
    pub subject: String,
    pub email: String,
    pub agent: String,
    pub groups: Vec<String>,
    pub database: String,
    pub user: String,
    pub application_name: String,
    pub start_ns: i64,
    pub last_ns: i64,
    pub first_index: u64,
    pub last_index: u64,
    pub events: u64,
    pub requests: u64,
    pub statements: u64,
    pub errors: u64,
    /// The proxy run that opened the session (`Event::proxy_instance`).
    #[serde(default)]
    pub proxy_instance: String,
    /// Seq and kind (`EventKind` number) of the session's last event.
    #[serde(default)]
    pub last_seq: u64,
    #[serde(default)]
    pub last_kind: i32,
    /// "open", "ended", "denied", or "abandoned" (closed by the ledger when its proxy's
    /// lease lapsed; no further event of the session is accepted).
    pub status: String,
    pub end_reason: String,
    pub last_response_unrecorded: bool,
}

/// The state that decides the next entry: where it goes and what it links to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerState {
    /// Index the next entry gets; also the number of entries.
    pub next_index: u64,
    /// Hash of the last entry.
    pub head: Hash,
    /// Commit time of the last entry.
    pub last_commit_ns: i64,
}

const META_STATE: &[u8] = b"state";

/// The outcome of applying a batch: the new state, the writes, the per-event results.
#[derive(Debug)]
pub struct Applied {
    /// State after the batch. Adopt it only once `writes` are durable.
    pub state: LedgerState,
    /// Writes to apply atomically.
    pub writes: WriteSet,
    /// One result per input event, in order.
    pub results: Vec<AppendResult>,
}

/// Status of a session the ledger closed after its proxy's lease lapsed.
pub const STATUS_ABANDONED: &str = "abandoned";
/// `SessionEnd.reason` of a session the ledger closed.
pub const END_ABANDONED: &str = "abandoned";

/// Key in `open_sessions`: length-prefixed proxy id, then the session id.
pub fn open_session_key(proxy_id: &str, session_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + proxy_id.len() + session_id.len());
    k.extend_from_slice(&(proxy_id.len() as u16).to_be_bytes());
    k.extend_from_slice(proxy_id.as_bytes());
    k.extend_from_slice(session_id.as_bytes());
    k
}

/// The prefix of `open_sessions` keys of one proxy.
pub fn open_sessions_prefix(proxy_id: &str) -> Vec<u8> {
    open_session_key(proxy_id, "")
}

/// The idempotency key of an event: length-prefixed proxy id and session id, then seq.
pub fn idem_key(proxy_id: &str, session_id: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + proxy_id.len() + session_id.len() + 8);
    k.extend_from_slice(&(proxy_id.len() as u16).to_be_bytes());
    k.extend_from_slice(proxy_id.as_bytes());
    k.extend_from_slice(&(session_id.len() as u16).to_be_bytes());
    k.extend_from_slice(session_id.as_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Key in `by_session` for an event of `session_id` at `index`.
pub fn by_session_key(session_id: &str, index: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(session_id.len() + 9);
    k.extend_from_slice(session_id.as_bytes());
    k.push(0);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// Decodes and checks one event as the ledger requires it.
pub fn validate_event(bytes: &[u8], max_bytes: usize) -> Result<Event, String> {
    if bytes.len() > max_bytes {
        return Err(format!(
            "event of {} bytes exceeds the ledger's {max_bytes}-byte limit",
            bytes.len()
        ));
    }
    let ev = Event::decode(bytes).map_err(|e| format!("not a custody.v1.Event: {e}"))?;
    if ev.proxy_id.is_empty() || ev.proxy_id.len() > MAX_ID_LEN {
        return Err("proxy_id must be 1..=256 bytes".into());
    }
    if ev.session_id.is_empty() || ev.session_id.len() > MAX_ID_LEN || ev.session_id.contains('\0') {
        return Err("session_id must be 1..=256 bytes without NUL".into());
    }
    if ev.kind == EventKind::Unspecified as i32 || EventKind::try_from(ev.kind).is_err() {
        return Err(format!("unknown event kind {}", ev.kind));
    }
    Ok(ev)
}

impl LedgerState {
    /// The state of an empty ledger.
    pub fn empty() -> Self {
        Self {
            next_index: 0,
            head: GENESIS,
            last_commit_ns: 0,
        }
    }

    /// The state record as stored, unchecked.
    pub fn recorded(store: &Store) -> Result<Option<Self>, StoreError> {
        store.get(cf::META, META_STATE)?.map(|v| Self::decode(&v)).transpose()
    }

    /// The state recorded in a consistent view.
    pub fn recorded_in(view: &crate::store::StoreView<'_>) -> Result<Option<Self>, StoreError> {
        view.get(cf::META, META_STATE)?.map(|v| Self::decode(&v)).transpose()
    }

    /// Loads the state stored in `store`, and checks it against the last stored entry.
    pub fn load(store: &Store) -> Result<Self, StoreError> {
        let Some(state) = Self::recorded(store)? else {
            if store.entry(0)?.is_some() {
                return Err(StoreError::Corrupt(
                    "entries exist but the ledger state record is missing".into(),
                ));
            }
            return Ok(Self::empty());
        };
        if state.next_index > 0 {
            let last = state.next_index - 1;
            let bytes = store.entry(last)?.ok_or_else(|| {
                StoreError::Corrupt(format!("ledger state says {} entries but entry {last} is missing", state.next_index))
            })?;
            if entry_hash(&bytes) != state.head {
                return Err(StoreError::Corrupt(format!(
                    "entry {last} does not hash to the recorded chain head"
                )));
            }
        }
        if store.entry(state.next_index)?.is_some() {
            return Err(StoreError::Corrupt(format!(
                "entry {} exists beyond the recorded end of the ledger",
                state.next_index
            )));
        }
        Ok(state)
    }

    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(48);
        v.extend_from_slice(&self.next_index.to_be_bytes());
        v.extend_from_slice(&self.head);
        v.extend_from_slice(&self.last_commit_ns.to_be_bytes());
        v
    }

    fn decode(v: &[u8]) -> Result<Self, StoreError> {
        if v.len() != 48 {
            return Err(StoreError::Corrupt("ledger state record has the wrong size".into()));
        }
        let mut n = [0u8; 8];
        n.copy_from_slice(&v[0..8]);
        let mut head = [0u8; 32];
        head.copy_from_slice(&v[8..40]);
        let mut t = [0u8; 8];
        t.copy_from_slice(&v[40..48]);
        Ok(Self {
            next_index: u64::from_be_bytes(n),
            head,
            last_commit_ns: i64::from_be_bytes(t),
        })
    }

    /// Applies a batch. Deterministic: the same state, batch and lookup give the same result.
    pub fn apply_append(
        &self,
        batch: &AppendBatch,
        max_event_bytes: usize,
        lookup: &impl Lookup,
    ) -> Result<Applied, ApplyError> {
        let mut state = *self;
        let commit = batch.commit_time_ns.max(state.last_commit_ns);
        let mut writes = Vec::with_capacity(batch.events.len() * 3 + 1);
        let mut results = Vec::with_capacity(batch.events.len());
        let mut seen: HashMap<Vec<u8>, u64> = HashMap::new();
        let mut sessions: HashMap<String, SessionSummary> = HashMap::new();
        let mut tree: HashMap<(u8, u64), Hash> = HashMap::new();
        let mut batch_holds: HashMap<String, bool> = HashMap::new();

        for (position, bytes) in batch.events.iter().enumerate() {
            let ev = validate_event(bytes, max_event_bytes)
                .map_err(|reason| ApplyError::InvalidEvent { position, reason })?;
            let key = idem_key(&ev.proxy_id, &ev.session_id, ev.seq);
            let existing = match seen.get(&key) {
                Some(i) => Some(*i),
                None => lookup.idem(&key)?,
            };
            if let Some(index) = existing {
                // A retry carries exactly the bytes first sent. Different bytes under a stored
                // key are not a retry: accepting them as one would lose this event.
                let same = match batch.events[..position].iter().position(|b| {
                    validate_event(b, max_event_bytes).is_ok_and(|e| idem_key(&e.proxy_id, &e.session_id, e.seq) == key)
                }) {
                    Some(earlier) => batch.events[earlier] == *bytes,
                    None => {
                        let stored = lookup.entry_at(index)?.ok_or_else(|| {
                            StoreError::Corrupt(format!("idempotency key points at missing entry {index}"))
                        })?;
                        if custody_proto::entry::is_pruned(&stored) {
                            // Retention kept the event's hash: a retry still matches.
                            let p = custody_proto::entry::PrunedEntry::decode(&stored).map_err(|e| StoreError::Corrupt(format!("entry {index}: {e}")))?;
                            p.event_sha256 == <[u8; 32]>::from(sha2::Sha256::digest(&bytes[..]))
                        } else {
                            let e = Entry::decode(&stored).map_err(|e| StoreError::Corrupt(format!("entry {index}: {e}")))?;
                            e.event == &bytes[..]
                        }
                    }
                };
                if !same {
                    // The ledger itself may have written that seq: the session-end of a
                    // proxy run whose lease lapsed. Say so, rather than "different content".
                    let closed = lookup
                        .entry_at(index)?
                        .and_then(|b| Entry::decode(&b).ok().and_then(|e| Event::decode(e.event).ok()))
                        .and_then(|stored| match stored.body {
                            Some(event::Body::SessionEnd(end)) if end.reason == END_ABANDONED => Some(end.detail),
                            _ => None,
                        });
                    let reason = match closed {
                        Some(detail) => format!("session {} was closed by the ledger at index {index}: {detail}", ev.session_id),
                        None => format!("session {} seq {} is already recorded at index {index} with different content", ev.session_id, ev.seq),
                    };
                    return Err(ApplyError::Refused { position, reason });
                }
                results.push(AppendResult {
                    index,
                    commit_time_ns: 0,
                    duplicate: true,
                });
                continue;
            }
            // The ledger's own records (audit queries, exports, legal holds, prunes) belong to
            // no session: they are stored and indexed, and holds and exports noted.
            // One hold per session, decided here in log order (two concurrent requests both
            // passed the node's check before either was applied).
            if let Some(event::Body::LegalHold(h)) = &ev.body {
                let held = match batch_holds.get(&h.session_id) {
                    Some(v) => *v,
                    None => lookup.held(&h.session_id)?,
                };
                if held != h.released {
                    let reason = if h.released { format!("session {} is not under a legal hold", h.session_id) } else { format!("session {} is already under a legal hold", h.session_id) };
                    return Err(ApplyError::Refused { position, reason });
                }
                batch_holds.insert(h.session_id.clone(), !h.released);
            }
            let summary = if is_ledger_record(ev.kind) {
                match &ev.body {
                    Some(event::Body::LegalHold(h)) if h.released => writes.push(Put::delete(cf::META, hold_key(&h.session_id))),
                    Some(event::Body::LegalHold(h)) => writes.push(Put::new(cf::META, hold_key(&h.session_id), h.reason.clone().into_bytes())),
                    Some(event::Body::ExportRecord(x)) => writes.push(Put::new(cf::META, export_key(&x.target, x.first_index, &x.manifest_sha256), x.encode_to_vec())),
                    _ => {}
                }
                None
            } else {
                let summary = match sessions.remove(&ev.session_id) {
                    Some(s) => s,
                    None => lookup.session(&ev.session_id)?.unwrap_or_default(),
                };
                if summary.status == STATUS_ABANDONED {
                    return Err(ApplyError::Refused {
                        position,
                        reason: format!("session {} was closed by the ledger: {}", ev.session_id, summary.end_reason),
                    });
                }
                Some(summary)
            };
            let index = state.next_index;
            let entry = Entry::encode(index, commit, &state.head, bytes);
            state.head = entry_hash(&entry);
            state.next_index += 1;
            state.last_commit_ns = commit;
            tree_writes(lookup, &mut tree, index, &entry, &mut writes)?;
            writes.push(Put::new(cf::ENTRIES, index.to_be_bytes().to_vec(), entry));
            writes.push(Put::new(cf::IDEM, key.clone(), index.to_be_bytes().to_vec()));
            for k in by_field_keys(&ev, index) {
                writes.push(Put::new(cf::BY_FIELD, k, Vec::new()));
            }
            seen.insert(key, index);
            if let Some(summary) = summary {
                writes.push(Put::new(cf::BY_SESSION, by_session_key(&ev.session_id, index), Vec::new()));
                let was_open = summary.status == "open";
                let summary = fold_session(summary, &ev, index, commit);
                let open_key = open_session_key(&summary.proxy_id, &ev.session_id);
                if summary.status == "open" {
                    writes.push(Put::new(cf::OPEN_SESSIONS, open_key, Vec::new()));
                } else if was_open {
                    writes.push(Put::delete(cf::OPEN_SESSIONS, open_key));
                }
                sessions.insert(ev.session_id.clone(), summary);
            }
            results.push(AppendResult {
                index,
                commit_time_ns: commit,
                duplicate: false,
            });
        }
        let mut sessions: Vec<_> = sessions.into_iter().collect();
        sessions.sort_by(|a, b| a.0.cmp(&b.0));
        for (id, s) in sessions {
            // Serializing a plain struct of strings and integers cannot fail.
            writes.push(Put::new(cf::SESSIONS, id.into_bytes(), serde_json::to_vec(&s).unwrap_or_default()));
        }
        writes.push(Put::new(cf::META, META_STATE.to_vec(), state.encode()));
        Ok(Applied {
            state,
            writes,
            results,
        })
    }
}

fn fold_session(mut s: SessionSummary, ev: &Event, index: u64, commit: i64) -> SessionSummary {
    if s.events == 0 {
        s.session_id = ev.session_id.clone();
        s.proxy_id = ev.proxy_id.clone();
        s.resource = ev.resource.clone();
        s.protocol = protocol_name(ev.protocol).to_string();
        s.client_addr = ev.client_addr.clone();
        if let Some(id) = &ev.identity {
            s.issuer = id.issuer.clone();
            s.subject = id.subject.clone();
            s.email = id.email.clone();
            s.agent = id.agent.clone();
            s.groups = id.groups.clone();
        }
        s.start_ns = commit;
        s.first_index = index;
        s.status = "open".into();
        s.proxy_instance = ev.proxy_instance.clone();
    }
    s.events += 1;
    s.last_seq = ev.seq;
    s.last_kind = ev.kind;
    s.last_ns = commit;
    s.last_index = index;
    match &ev.body {
        Some(event::Body::SessionStart(st)) => {
            s.database = st.database.clone();
            s.user = st.user.clone();
            s.application_name = st.application_name.clone();
        }
        Some(event::Body::PgRequest(r)) => {
            s.requests += 1;
            if r.message == "Query" || r.message == "Execute" || r.message == "FunctionCall" {
                s.statements += 1;
            }
        }
        Some(event::Body::PgResponse(r)) => {
            if r.error.is_some() {
                s.errors += 1;
            }
        }
        Some(event::Body::Denied(d)) => {
            s.status = "denied".into();
            s.end_reason = format!("{}: {}", d.check, d.reason);
        }
        // Not part of a session (apply_append stores them without one).
        Some(event::Body::AuditQuery(_) | event::Body::ExportRecord(_) | event::Body::LegalHold(_) | event::Body::Prune(_)) => {}
        Some(event::Body::SessionEnd(e)) => {
            if s.status != "denied" {
                if e.reason == END_ABANDONED {
                    s.status = STATUS_ABANDONED.into();
                    s.end_reason = format!("{}: {}", e.reason, e.detail);
                } else {
                    s.status = "ended".into();
                    s.end_reason = e.reason.clone();
                }
            }
            s.last_response_unrecorded = e.last_response_unrecorded;
        }
        None => {}
    }
    s
}

pub use custody_proto::table::protocol_name;

/// Kinds the ledger records about itself, outside any session.
pub fn is_ledger_record(kind: i32) -> bool {
    [EventKind::AuditQuery, EventKind::Export, EventKind::LegalHold, EventKind::Prune].iter().any(|k| *k as i32 == kind)
}

const HOLD_PREFIX: &[u8] = b"hold/";
const EXPORT_PREFIX: &[u8] = b"export/";

/// `cf::META` key of a session's legal hold (value: the reason).
pub fn hold_key(session_id: &str) -> Vec<u8> {
    [HOLD_PREFIX, session_id.as_bytes()].concat()
}

/// `cf::META` key of an export record (value: the `ExportRecord`). One per manifest: a second
/// record for the same entries (another run, or a false one) does not replace the first.
pub fn export_key(target: &str, first_index: u64, manifest_sha256: &str) -> Vec<u8> {
    [EXPORT_PREFIX, target.as_bytes(), b"\0", &first_index.to_be_bytes(), manifest_sha256.as_bytes()].concat()
}

/// Sessions under a legal hold, with the reason.
pub fn legal_holds(store: &Store) -> Result<Vec<(String, String)>, StoreError> {
    Ok(store
        .scan_prefix(cf::META, HOLD_PREFIX)?
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .map(|(k, v)| (String::from_utf8_lossy(&k[HOLD_PREFIX.len()..]).into_owned(), String::from_utf8_lossy(&v).into_owned()))
        .collect())
}

/// Whether `session_id` is under a legal hold.
pub fn is_held(store: &Store, session_id: &str) -> Result<bool, StoreError> {
    Ok(store.get(cf::META, &hold_key(session_id))?.is_some())
}

/// The export records for `target`, by first index.
pub fn export_records(store: &Store, target: &str) -> Result<Vec<custody_proto::pb::v1::ExportRecord>, StoreError> {
    let prefix = [EXPORT_PREFIX, target.as_bytes(), b"\0"].concat();
    let rows = store.scan_prefix(cf::META, &prefix)?.collect::<Result<Vec<_>, _>>()?;
    rows.into_iter()
        .map(|(_, v)| custody_proto::pb::v1::ExportRecord::decode(&v[..]).map_err(|e| StoreError::Corrupt(format!("export record: {e}"))))
        .collect()
}

/// The end of the contiguous stretch from `start` (entry 0, or where pruning reached) that
/// exports to a target claim to cover.
pub fn exported_end(records: &[custody_proto::pb::v1::ExportRecord], start: u64) -> u64 {
    let mut end = start;
    let mut rs: Vec<_> = records.iter().collect();
    rs.sort_by_key(|r| r.first_index);
    for r in rs {
        if r.first_index <= end {
            end = end.max(r.end_index);
        }
    }
    end
}

/// `cf::META` key: entries below this index were pruned (retention).
pub const META_PRUNED_THROUGH: &[u8] = b"pruned_through";

/// Entries below this index had their payloads pruned (held sessions' excepted).
pub fn pruned_through(store: &Store) -> Result<u64, StoreError> {
    Ok(store.get(cf::META, META_PRUNED_THROUGH)?.and_then(|v| v.try_into().ok()).map(u64::from_be_bytes).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_contiguous_exported_prefix_counts_for_retention() {
        let rec = |first_index: u64, end_index: u64| custody_proto::pb::v1::ExportRecord { first_index, end_index, ..Default::default() };
        assert_eq!(exported_end(&[], 0), 0);
        // An export that starts later (--since) leaves a gap: nothing before it counts.
        assert_eq!(exported_end(&[rec(100, 200)], 0), 0);
        assert_eq!(exported_end(&[rec(100, 200), rec(0, 100)], 0), 200);
        assert_eq!(exported_end(&[rec(0, 50), rec(60, 90)], 0), 50);
        assert_eq!(exported_end(&[rec(0, 80), rec(50, 120), rec(300, 400)], 0), 120);
        // After a prune, a new archive's first export starts where pruning reached.
        assert_eq!(exported_end(&[rec(443, 748)], 443), 748);
        assert_eq!(exported_end(&[rec(443, 748)], 400), 400);
    }
    use custody_proto::entry::ChainVerifier;
    use custody_proto::pb::v1::{Identity, PgRequest};

    #[derive(Default)]
    struct Mem {
        idem: HashMap<Vec<u8>, u64>,
        sessions: HashMap<String, SessionSummary>,
        entries: Vec<Vec<u8>>,
        nodes: HashMap<Vec<u8>, Hash>,
    }

    impl Lookup for Mem {
        fn idem(&self, key: &[u8]) -> Result<Option<u64>, StoreError> {
            Ok(self.idem.get(key).copied())
        }
        fn session(&self, id: &str) -> Result<Option<SessionSummary>, StoreError> {
            Ok(self.sessions.get(id).cloned())
        }
        fn entry_at(&self, index: u64) -> Result<Option<Vec<u8>>, StoreError> {
            Ok(self.entries.get(index as usize).cloned())
        }
        fn tree_node(&self, level: u8, index: u64) -> Result<Option<Hash>, StoreError> {
            Ok(self.nodes.get(&tree_node_key(level, index)).copied())
        }
        fn held(&self, _session_id: &str) -> Result<bool, StoreError> {
            Ok(false)
        }
    }

    impl Mem {
        fn commit(&mut self, a: &Applied) {
            for p in &a.writes {
                match p.cf {
                    cf::IDEM => {
                        self.idem.insert(p.key.clone(), u64_key(&p.value).unwrap());
                    }
                    cf::SESSIONS => {
                        self.sessions.insert(
                            String::from_utf8(p.key.clone()).unwrap(),
                            serde_json::from_slice(&p.value).unwrap(),
                        );
                    }
                    cf::ENTRIES => self.entries.push(p.value.clone()),
                    cf::MERKLE => {
                        self.nodes.insert(p.key.clone(), p.value[..].try_into().unwrap());
                    }
                    _ => {}
                }
            }
        }
    }

    fn ev(session: &str, seq: u64, sql: &str) -> Bytes {
        Event {
            proxy_id: "p1".into(),
            session_id: session.into(),
            seq,
            kind: EventKind::Request as i32,
            identity: Some(Identity {
                subject: "alice".into(),
                ..Default::default()
            }),
            body: Some(event::Body::PgRequest(PgRequest {
                message: "Query".into(),
                sql: sql.into(),
                ..Default::default()
            })),
            ..Default::default()
        }
        .encode_to_vec()
        .into()
    }

    #[test]
    fn indices_are_dense_and_the_chain_verifies() {
        let mut mem = Mem::default();
        let mut st = LedgerState::empty();
        for b in 0..5 {
            let batch = AppendBatch {
                commit_time_ns: 100 + b,
                events: (0..3).map(|i| ev("s", (b * 3 + i) as u64, "select 1")).collect(),
            };
            let a = st.apply_append(&batch, 1 << 20, &mem).unwrap();
            mem.commit(&a);
            st = a.state;
        }
        assert_eq!(st.next_index, 15);
        let mut v = ChainVerifier::new();
        for e in &mem.entries {
            v.push(e).unwrap();
        }
        assert_eq!(v.head(), st.head);
        assert_eq!(mem.sessions["s"].statements, 15);
    }

    #[test]
    fn the_stored_merkle_tree_covers_every_entry_and_gives_the_rfc_root() {
        let mut mem = Mem::default();
        let mut st = LedgerState::empty();
        // Batches of uneven sizes, so that nodes complete inside and across batches.
        for (b, n) in [1usize, 2, 5, 1, 8, 3, 13].into_iter().enumerate() {
            let batch = AppendBatch { commit_time_ns: 10 + b as i64, events: (0..n).map(|i| ev(&format!("s{b}"), i as u64, "select 1")).collect() };
            let a = st.apply_append(&batch, 1 << 20, &mem).unwrap();
            mem.commit(&a);
            st = a.state;
            let mut reference = custody_proto::merkle::MemoryTree::new();
            for e in &mem.entries {
                reference.push(leaf_hash(e));
            }
            let stored = custody_proto::merkle::root(&StoredTree(&mem), st.next_index).unwrap();
            assert_eq!(stored, reference.root(), "root after {} entries", st.next_index);
            for i in 0..st.next_index {
                let p = custody_proto::merkle::inclusion_proof(&StoredTree(&mem), i, st.next_index).unwrap();
                custody_proto::merkle::verify_inclusion(i, st.next_index, &leaf_hash(&mem.entries[i as usize]), &p, &stored).unwrap();
            }
        }
        // A retried batch adds no leaf.
        let before = mem.nodes.len();
        let again = st.apply_append(&AppendBatch { commit_time_ns: 99, events: vec![ev("s0", 0, "select 1")] }, 1 << 20, &mem).unwrap();
        assert!(again.results[0].duplicate);
        assert!(again.writes.iter().all(|w| w.cf != cf::MERKLE));
        assert_eq!(mem.nodes.len(), before);
    }

    #[test]
    fn a_retried_key_is_applied_once_even_within_one_batch() {
        let mut mem = Mem::default();
        let st = LedgerState::empty();
        let batch = AppendBatch {
            commit_time_ns: 1,
            events: vec![ev("s", 0, "a"), ev("s", 1, "b"), ev("s", 0, "a")],
        };
        let a = st.apply_append(&batch, 1 << 20, &mem).unwrap();
        mem.commit(&a);
        assert_eq!(a.state.next_index, 2);
        assert!(a.results[2].duplicate);
        assert_eq!(a.results[2].index, 0);
        let again = a.state.apply_append(&batch, 1 << 20, &mem).unwrap();
        assert_eq!(again.state.next_index, 2, "a retried batch adds nothing");
        assert!(again.results.iter().all(|r| r.duplicate));
    }

    #[test]
    fn different_bytes_under_a_stored_key_are_refused_not_taken_for_a_retry() {
        let mut mem = Mem::default();
        let st = LedgerState::empty();
        let a = st.apply_append(&AppendBatch { commit_time_ns: 1, events: vec![ev("s", 0, "a")] }, 1 << 20, &mem).unwrap();
        mem.commit(&a);
        let err = a.state.apply_append(&AppendBatch { commit_time_ns: 2, events: vec![ev("s", 0, "b")] }, 1 << 20, &mem).unwrap_err();
        assert!(matches!(err, ApplyError::Refused { position: 0, .. }), "{err}");
        // The same within one batch.
        let err = st.apply_append(&AppendBatch { commit_time_ns: 1, events: vec![ev("t", 0, "a"), ev("t", 0, "b")] }, 1 << 20, &Mem::default()).unwrap_err();
        assert!(matches!(err, ApplyError::Refused { position: 1, .. }), "{err}");
    }

    #[test]
    fn an_abandoned_session_takes_no_more_events() {
        let mut mem = Mem::default();
        let st = LedgerState::empty();
        let end = Event {
            proxy_id: "p1".into(),
            session_id: "s".into(),
            seq: 1,
            kind: EventKind::SessionEnd as i32,
            body: Some(event::Body::SessionEnd(custody_proto::pb::v1::SessionEnd {
                reason: END_ABANDONED.into(),
                detail: "lease lapsed".into(),
                last_response_unrecorded: true,
            })),
            ..Default::default()
        }
        .encode_to_vec()
        .into();
        let a = st.apply_append(&AppendBatch { commit_time_ns: 1, events: vec![ev("s", 0, "a"), end] }, 1 << 20, &mem).unwrap();
        mem.commit(&a);
        assert_eq!(mem.sessions["s"].status, STATUS_ABANDONED);
        let err = a.state.apply_append(&AppendBatch { commit_time_ns: 2, events: vec![ev("s", 2, "late")] }, 1 << 20, &mem).unwrap_err();
        assert!(err.to_string().contains("closed by the ledger"), "{err}");
    }

    #[test]
    fn apply_is_deterministic_and_commit_time_never_goes_back() {
        let mem = Mem::default();
        let st = LedgerState {
            last_commit_ns: 500,
            ..LedgerState::empty()
        };
        let batch = AppendBatch {
            commit_time_ns: 100,
            events: vec![ev("s", 0, "a"), ev("t", 0, "b")],
        };
        let a = st.apply_append(&batch, 1 << 20, &mem).unwrap();
        let b = st.apply_append(&batch, 1 << 20, &mem).unwrap();
        assert_eq!(a.writes, b.writes);
        assert_eq!(a.state.last_commit_ns, 500);
    }

    #[test]
    fn invalid_events_refuse_the_whole_batch() {
        let mem = Mem::default();
        let st = LedgerState::empty();
        let batch = AppendBatch {
            commit_time_ns: 1,
            events: vec![ev("s", 0, "a"), Bytes::from_static(b"\xff\xff garbage")],
        };
        let err = st.apply_append(&batch, 1 << 20, &mem).unwrap_err();
        assert!(matches!(err, ApplyError::InvalidEvent { position: 1, .. }));
        let big = AppendBatch {
            commit_time_ns: 1,
            events: vec![ev("s", 0, &"x".repeat(2000))],
        };
        assert!(st.apply_append(&big, 1000, &mem).is_err());
    }
}
