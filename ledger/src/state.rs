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
use custody_proto::pb::ledger::AppendResult;
use custody_proto::pb::v1::{event, EventKind};
use custody_proto::Event;
use prost::Message;
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
}

impl Lookup for Store {
    fn idem(&self, key: &[u8]) -> Result<Option<u64>, StoreError> {
        self.get(cf::IDEM, key)?.map(|v| u64_key(&v)).transpose()
    }
    fn session(&self, id: &str) -> Result<Option<SessionSummary>, StoreError> {
        self.get(cf::SESSIONS, id.as_bytes())?
            .map(|v| {
                serde_json::from_slice(&v)
                    .map_err(|e| StoreError::Corrupt(format!("session summary {id}: {e}")))
            })
            .transpose()
    }
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
    /// "open", "ended" or "denied".
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

        for (position, bytes) in batch.events.iter().enumerate() {
            let ev = validate_event(bytes, max_event_bytes)
                .map_err(|reason| ApplyError::InvalidEvent { position, reason })?;
            let key = idem_key(&ev.proxy_id, &ev.session_id, ev.seq);
            let existing = match seen.get(&key) {
                Some(i) => Some(*i),
                None => lookup.idem(&key)?,
            };
            if let Some(index) = existing {
                results.push(AppendResult {
                    index,
                    commit_time_ns: 0,
                    duplicate: true,
                });
                continue;
            }
            let index = state.next_index;
            let entry = Entry::encode(index, commit, &state.head, bytes);
            state.head = entry_hash(&entry);
            state.next_index += 1;
            state.last_commit_ns = commit;
            writes.push(Put {
                cf: cf::ENTRIES,
                key: index.to_be_bytes().to_vec(),
                value: entry,
            });
            writes.push(Put {
                cf: cf::IDEM,
                key: key.clone(),
                value: index.to_be_bytes().to_vec(),
            });
            writes.push(Put {
                cf: cf::BY_SESSION,
                key: by_session_key(&ev.session_id, index),
                value: Vec::new(),
            });
            seen.insert(key, index);

            let summary = match sessions.remove(&ev.session_id) {
                Some(s) => s,
                None => lookup.session(&ev.session_id)?.unwrap_or_default(),
            };
            sessions.insert(ev.session_id.clone(), fold_session(summary, &ev, index, commit));
            results.push(AppendResult {
                index,
                commit_time_ns: commit,
                duplicate: false,
            });
        }
        let mut sessions: Vec<_> = sessions.into_iter().collect();
        sessions.sort_by(|a, b| a.0.cmp(&b.0));
        for (id, s) in sessions {
            writes.push(Put {
                cf: cf::SESSIONS,
                key: id.into_bytes(),
                // Serializing a plain struct of strings and integers cannot fail.
                value: serde_json::to_vec(&s).unwrap_or_default(),
            });
        }
        writes.push(Put {
            cf: cf::META,
            key: META_STATE.to_vec(),
            value: state.encode(),
        });
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
    }
    s.events += 1;
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
        Some(event::Body::SessionEnd(e)) => {
            if s.status != "denied" {
                s.status = "ended".into();
                s.end_reason = e.reason.clone();
            }
            s.last_response_unrecorded = e.last_response_unrecorded;
        }
        None => {}
    }
    s
}

/// Lowercase protocol name.
pub fn protocol_name(p: i32) -> &'static str {
    match custody_proto::pb::v1::Protocol::try_from(p) {
        Ok(custody_proto::pb::v1::Protocol::Postgres) => "postgres",
        _ => "unspecified",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use custody_proto::entry::ChainVerifier;
    use custody_proto::pb::v1::{Identity, PgRequest};

    #[derive(Default)]
    struct Mem {
        idem: HashMap<Vec<u8>, u64>,
        sessions: HashMap<String, SessionSummary>,
        entries: Vec<Vec<u8>>,
    }

    impl Lookup for Mem {
        fn idem(&self, key: &[u8]) -> Result<Option<u64>, StoreError> {
            Ok(self.idem.get(key).copied())
        }
        fn session(&self, id: &str) -> Result<Option<SessionSummary>, StoreError> {
            Ok(self.sessions.get(id).cloned())
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
