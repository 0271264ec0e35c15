//! The replicated state machine: applies committed Raft entries to the ledger's state.
//!
//! [`LedgerMachine::apply`] takes one committed [`RaftCommand`] and its Raft index, and
//! stores everything it changes, together with the applied index, in one RocksDB write. Like
//! [`LedgerState::apply_append`], which it calls for events, it reads no clock, randomness or
//! local configuration: times come in the commands, chosen by the leader that proposed them.
//! Every replica that applies the same log therefore holds the same bytes.
//!
//! Leader-side helpers ([`LedgerMachine::lapsed_leases`], [`LedgerMachine::abandon_events`])
//! only read state; what they build is proposed, and decided again on apply.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use custody_proto::block::BlockHeader;
use custody_proto::pb::ledger::{raft_command, AbandonCommand, AppendCommand, AppendResult, LeaseCommand, Member, PruneCommand, RaftCommand, SealCommand};
use custody_proto::pb::v1::{event, Identity, Protocol, SessionEnd};
use custody_proto::{Event, EventKind};
use prost::Message;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::state::{open_sessions_prefix, validate_event, AppendBatch, ApplyError, LedgerState, Lookup, Overlay, END_ABANDONED};
use crate::store::{cf, Put, Store, StoreError};

const META_APPLIED: &[u8] = b"raft_applied";
const META_CONF_STATE: &[u8] = b"raft_conf_state";
const META_MEMBERS: &[u8] = b"members";
const META_CLUSTER: &[u8] = b"cluster_id";
const META_LAST_BLOCK: &[u8] = b"last_block";

/// The store the machine writes, swappable when a snapshot replaces it. Readers take the
/// current `Arc<Store>` and keep it for the length of a query.
#[derive(Clone, Debug)]
pub struct StoreCell(Arc<RwLock<Arc<Store>>>);

impl StoreCell {
    /// A cell holding `store`.
    pub fn new(store: Arc<Store>) -> Self {
        Self(Arc::new(RwLock::new(store)))
    }
    /// The current store.
    pub fn get(&self) -> Arc<Store> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
    /// Replaces the store.
    pub fn replace(&self, store: Arc<Store>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = store;
    }
}

/// Why an entry could not be applied. The node stops: skipping an entry would make this
/// replica diverge from the others.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MachineError {
    /// Reading or writing the state failed (I/O, no space, corruption).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A committed entry does not decode: the log is corrupt.
    #[error("raft entry {index} does not decode: {reason}")]
    BadEntry {
        /// Its index.
        index: u64,
        /// What is wrong.
        reason: String,
    },
}

/// A proxy's lease, as the ledger holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The proxy run holding it.
    pub instance: String,
    /// Ledger time it lapses at, unix ns.
    pub expires_ns: i64,
    /// It lapsed and its open sessions were closed.
    pub lapsed: bool,
    /// The lease's length, as last renewed (0 in records written before it was kept).
    #[serde(default)]
    pub ttl_ns: i64,
}

/// The outcome of one append request (group) in an applied entry.
pub type GroupOutcome = Result<Vec<AppendResult>, String>;

/// What applying one entry produced, for whoever proposed it.
#[derive(Debug)]
pub enum Applied {
    /// Nothing to report (empty entry, conf change, cancelled command).
    Nothing,
    /// One outcome per append group, in order.
    Append(Vec<GroupOutcome>),
    /// A lease renewal: its expiry and how many earlier sessions it closed.
    Lease {
        /// Ledger time the lease lapses at.
        expires_ns: i64,
        /// Sessions of an earlier instance closed.
        abandoned: u32,
    },
    /// Sessions closed because a lease lapsed.
    Abandoned(u32),
    /// Blocks sealed.
    Sealed(u32),
    /// Entries pruned, and entries kept for a legal hold.
    Pruned {
        /// Payloads removed.
        pruned: u64,
        /// Entries of held sessions left whole.
        held: u64,
    },
}

/// The state machine of one ledger node.
pub struct LedgerMachine {
    store: StoreCell,
    state: LedgerState,
    applied_index: u64,
    applied_term: u64,
    max_event_bytes: usize,
    members: BTreeMap<u64, Member>,
    removed: BTreeSet<u64>,
    leases: HashMap<String, Lease>,
    conf_state: Vec<u8>,
    last_block: Option<BlockHeader>,
}

#[derive(Serialize, Deserialize, Default)]
struct MembersRecord {
    members: BTreeMap<u64, MemberRecord>,
    removed: BTreeSet<u64>,
}

#[derive(Serialize, Deserialize, Clone)]
struct MemberRecord {
    peer_addr: String,
    client_addr: String,
    learner: bool,
}

impl LedgerMachine {
    /// Loads the machine from `store`, checking the chain head against the last entry.
    pub fn open(store: StoreCell, max_event_bytes: usize) -> Result<Self, StoreError> {
        let mut m = Self {
            store,
            state: LedgerState::empty(),
            applied_index: 0,
            applied_term: 0,
            max_event_bytes,
            members: BTreeMap::new(),
            removed: BTreeSet::new(),
            leases: HashMap::new(),
            conf_state: Vec::new(),
            last_block: None,
        };
        m.reload()?;
        Ok(m)
    }

    /// Re-reads everything from the current store (after a snapshot replaced it).
    pub fn reload(&mut self) -> Result<(), StoreError> {
        let store = self.store.get();
        self.state = LedgerState::load(&store)?;
        let tree = crate::state::stored_tree_size(store.as_ref(), self.state.next_index)?;
        if tree < self.state.next_index {
            // A ledger written before the Merkle tree existed, or a backfill cut short.
            tracing::info!(from = tree, to = self.state.next_index, "adding the Merkle tree over existing entries");
            crate::state::backfill_tree(&store, tree, self.state.next_index, 10_000)?;
        }
        if !crate::state::field_index_complete(&store)? {
            tracing::info!(entries = self.state.next_index, "indexing existing entries by caller, resource and kind");
            crate::state::backfill_field_index(&store, 50_000)?;
        }
        (self.applied_index, self.applied_term) = match store.get(cf::META, META_APPLIED)? {
            Some(v) if v.len() == 16 => (u64_at(&v, 0), u64_at(&v, 8)),
            Some(_) => return Err(StoreError::Corrupt("applied-index record has the wrong size".into())),
            None => (0, 0),
        };
        self.conf_state = store.get(cf::META, META_CONF_STATE)?.unwrap_or_default();
        let rec: MembersRecord = match store.get(cf::META, META_MEMBERS)? {
            Some(v) => serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt(format!("membership record: {e}")))?,
            None => MembersRecord::default(),
        };
        self.members = rec
            .members
            .into_iter()
            .map(|(id, r)| {
                (
                    id,
                    Member {
                        id,
                        peer_addr: r.peer_addr,
                        client_addr: r.client_addr,
                        learner: r.learner,
                    },
                )
            })
            .collect();
        self.removed = rec.removed;
        self.last_block = store
            .get(cf::META, META_LAST_BLOCK)?
            .map(|v| BlockHeader::decode(&v).map_err(|e| StoreError::Corrupt(format!("last block record: {e}"))))
            .transpose()?;
        self.leases.clear();
        for kv in store.scan_prefix(cf::LEASES, b"")? {
            let (k, v) = kv?;
            let id = String::from_utf8(k.to_vec()).map_err(|_| StoreError::Corrupt("lease key is not UTF-8".into()))?;
            let lease: Lease = serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt(format!("lease {id}: {e}")))?;
            self.leases.insert(id, lease);
        }
        Ok(())
    }

    /// The store cell (shared with readers).
    pub fn store(&self) -> &StoreCell {
        &self.store
    }

    /// The Merkle tree root over the first `size` entries (at most the ledger's size).
    pub fn tree_root(&self, size: u64) -> Result<custody_proto::merkle::Hash, StoreError> {
        let store = self.store.get();
        custody_proto::merkle::root(&crate::state::StoredTree(store.as_ref()), size.min(self.state.next_index))
    }

    /// The ledger state after the last applied entry.
    pub fn state(&self) -> LedgerState {
        self.state
    }

    /// The last block sealed.
    pub fn last_block(&self) -> Option<BlockHeader> {
        self.last_block
    }

    /// Entries sealed into blocks.
    pub fn sealed_size(&self) -> u64 {
        self.last_block.map_or(0, |b| b.tree_size)
    }

    /// Index and term of the last applied Raft entry.
    pub fn applied(&self) -> (u64, u64) {
        (self.applied_index, self.applied_term)
    }

    /// The applied conf state, as raft-rs encodes it (empty before the first).
    pub fn conf_state_bytes(&self) -> &[u8] {
        &self.conf_state
    }

    /// The members, as applied.
    pub fn members(&self) -> &BTreeMap<u64, Member> {
        &self.members
    }

    /// Ids removed from the cluster; their messages are refused.
    pub fn removed(&self) -> &BTreeSet<u64> {
        &self.removed
    }

    /// The cluster id recorded in this store.
    pub fn cluster_id(&self) -> Result<Option<String>, StoreError> {
        Ok(self
            .store
            .get()
            .get(cf::META, META_CLUSTER)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    fn applied_put(&self, index: u64, term: u64) -> Put {
        let mut v = Vec::with_capacity(16);
        v.extend_from_slice(&index.to_be_bytes());
        v.extend_from_slice(&term.to_be_bytes());
        Put::new(cf::META, META_APPLIED.to_vec(), v)
    }

    fn members_put(&self) -> Put {
        let rec = MembersRecord {
            members: self
                .members
                .iter()
                .map(|(id, m)| {
                    (
                        *id,
                        MemberRecord {
                            peer_addr: m.peer_addr.clone(),
                            client_addr: m.client_addr.clone(),
                            learner: m.learner,
                        },
                    )
                })
                .collect(),
            removed: self.removed.clone(),
        };
        // A map of plain strings serializes without fail.
        Put::new(cf::META, META_MEMBERS.to_vec(), serde_json::to_vec(&rec).unwrap_or_default())
    }

    /// Initialises a brand-new store for a bootstrapped cluster: its id, the first members and
    /// conf state, applied up to `index` (the bootstrap snapshot's index).
    pub fn bootstrap(&mut self, cluster_id: &str, members: &[Member], conf_state: Vec<u8>, index: u64, term: u64) -> Result<(), StoreError> {
        for m in members {
            self.members.insert(m.id, m.clone());
        }
        self.conf_state = conf_state.clone();
        let writes = vec![
            Put::new(cf::META, META_CLUSTER.to_vec(), cluster_id.as_bytes().to_vec()),
            Put::new(cf::META, META_CONF_STATE.to_vec(), conf_state),
            self.members_put(),
            self.applied_put(index, term),
        ];
        self.store.get().write(&writes, true)?;
        self.applied_index = index;
        self.applied_term = term;
        Ok(())
    }

    /// Marks an entry that changes nothing (a leader's empty entry) as applied.
    pub fn apply_empty(&mut self, index: u64, term: u64) -> Result<(), StoreError> {
        self.store.get().write(&[self.applied_put(index, term)], false)?;
        self.applied_index = index;
        self.applied_term = term;
        Ok(())
    }

    /// Records an applied membership change: the new conf state, and who was added (with
    /// addresses) or removed.
    pub fn apply_membership(&mut self, index: u64, term: u64, conf_state: Vec<u8>, added: Vec<Member>, removed: Vec<u64>) -> Result<(), StoreError> {
        for m in added {
            self.removed.remove(&m.id);
            self.members.insert(m.id, m);
        }
        for id in removed {
            self.members.remove(&id);
            self.removed.insert(id);
        }
        self.conf_state = conf_state.clone();
        let writes = vec![
            Put::new(cf::META, META_CONF_STATE.to_vec(), conf_state),
            self.members_put(),
            self.applied_put(index, term),
        ];
        self.store.get().write(&writes, false)?;
        self.applied_index = index;
        self.applied_term = term;
        Ok(())
    }

    /// Applies one committed normal entry's data.
    pub fn apply(&mut self, index: u64, term: u64, data: &[u8]) -> Result<Applied, MachineError> {
        let cmd = RaftCommand::decode(data).map_err(|e| MachineError::BadEntry {
            index,
            reason: e.to_string(),
        })?;
        let store = self.store.get();
        let mut overlay = Overlay::new(store.as_ref());
        let mut writes: Vec<Put> = Vec::new();
        let mut state = self.state;
        let mut last_block = self.last_block;
        let outcome = match cmd.command {
            Some(raft_command::Command::Append(AppendCommand { commit_time_ns, groups })) => {
                let mut outcomes = Vec::with_capacity(groups.len());
                for g in groups {
                    outcomes.push(self.apply_group(&mut state, commit_time_ns, g.events, &mut overlay, &mut writes)?);
                }
                Applied::Append(outcomes)
            }
            Some(raft_command::Command::Lease(LeaseCommand {
                proxy_id,
                instance,
                now_ns,
                ttl_ns,
                abandon_events,
            })) => {
                let previous = self.leases.get(&proxy_id).cloned();
                let mut abandoned = 0;
                // A new run of the proxy: the previous run's sessions are over.
                if let Some(prev) = previous.filter(|p| p.instance != instance) {
                    abandoned = self.apply_abandon(&mut state, now_ns, &proxy_id, &prev.instance, abandon_events, &mut overlay, &mut writes)?;
                }
                let lease = Lease {
                    instance,
                    expires_ns: now_ns.saturating_add(ttl_ns.max(0)),
                    lapsed: false,
                    ttl_ns: ttl_ns.max(0),
                };
                writes.push(lease_put(&proxy_id, &lease));
                let expires_ns = lease.expires_ns;
                self.leases.insert(proxy_id, lease);
                Applied::Lease { expires_ns, abandoned }
            }
            Some(raft_command::Command::Abandon(AbandonCommand {
                proxy_id,
                instance,
                now_ns,
                lease_expires_ns,
                events,
            })) => match self.leases.get(&proxy_id).cloned() {
                // Still the lease the leader saw lapse, and it really has lapsed by the
                // command's time: close the sessions. A renewal in between cancels it.
                Some(mut lease) if lease.instance == instance && lease.expires_ns == lease_expires_ns && now_ns >= lease.expires_ns && !lease.lapsed => {
                    let n = self.apply_abandon(&mut state, now_ns, &proxy_id, &instance, events, &mut overlay, &mut writes)?;
                    lease.lapsed = true;
                    writes.push(lease_put(&proxy_id, &lease));
                    self.leases.insert(proxy_id, lease);
                    Applied::Abandoned(n)
                }
                _ => Applied::Nothing,
            },
            Some(raft_command::Command::Seal(SealCommand { sealed_at_ns, ends })) => {
                let mut last = last_block;
                let mut sealed = 0;
                for end in ends {
                    // Ends already sealed (a retried or duplicate proposal) or beyond what
                    // is stored are skipped, the same way on every replica.
                    if end <= last.map_or(0, |b| b.tree_size) || end > state.next_index {
                        continue;
                    }
                    let root = custody_proto::merkle::root(&crate::state::StoredTree(store.as_ref()), end)?;
                    let Some(b) = BlockHeader::next(last.as_ref(), end, root, sealed_at_ns) else { continue };
                    let bytes = b.encode();
                    writes.push(Put::new(cf::BLOCKS, b.height.to_be_bytes().to_vec(), bytes.clone()));
                    writes.push(Put::new(cf::META, META_LAST_BLOCK.to_vec(), bytes));
                    last = Some(b);
                    sealed += 1;
                }
                last_block = last;
                Applied::Sealed(sealed)
            }
            Some(raft_command::Command::Prune(PruneCommand { now_ns, from_index, end_index, event })) => {
                let done = crate::state::pruned_through(&store)?;
                let (from, end) = (from_index.max(done), end_index.min(state.next_index));
                if from >= end {
                    Applied::Nothing
                } else {
                    let (mut pruned, mut held) = (0u64, 0u64);
                    let mut holds: HashMap<String, bool> = HashMap::new();
                    for r in store.entries_from(from)? {
                        let (i, bytes) = r?;
                        if i >= end {
                            break;
                        }
                        if custody_proto::entry::is_pruned(&bytes) {
                            continue;
                        }
                        let Ok(e) = custody_proto::entry::Entry::decode(&bytes) else { continue };
                        let ev = custody_proto::Event::decode(e.event).unwrap_or_default();
                        // The ledger's own records (exports, holds, prunes, audit queries)
                        // stay whole: they say who did what to the log.
                        if crate::state::is_ledger_record(ev.kind) {
                            continue;
                        }
                        let is_held = match holds.get(&ev.session_id) {
                            Some(h) => *h,
                            None => {
                                let h = crate::state::is_held(&store, &ev.session_id)?;
                                holds.insert(ev.session_id.clone(), h);
                                h
                            }
                        };
                        if is_held {
                            held += 1;
                            continue;
                        }
                        let p = custody_proto::entry::PrunedEntry::of(&bytes, &e, ev.kind, &ev.session_id);
                        writes.push(Put::new(cf::ENTRIES, i.to_be_bytes().to_vec(), p.encode()));
                        pruned += 1;
                    }
                    writes.push(Put::new(cf::META, crate::state::META_PRUNED_THROUGH.to_vec(), end.to_be_bytes().to_vec()));
                    // The prune event goes after the entries it prunes, so it is never pruned
                    // by its own command.
                    let _ = self.apply_group(&mut state, now_ns, vec![Bytes::from(event)], &mut overlay, &mut writes)?;
                    Applied::Pruned { pruned, held }
                }
            }
            None => Applied::Nothing,
        };
        writes.push(self.applied_put(index, term));
        store.write(&writes, false)?;
        self.state = state;
        self.last_block = last_block;
        self.applied_index = index;
        self.applied_term = term;
        Ok(outcome)
    }

    fn apply_group<L: Lookup>(
        &self,
        state: &mut LedgerState,
        commit_time_ns: i64,
        events: Vec<Bytes>,
        overlay: &mut Overlay<'_, L>,
        writes: &mut Vec<Put>,
    ) -> Result<GroupOutcome, MachineError> {
        let batch = AppendBatch { commit_time_ns, events };
        match state.apply_append(&batch, self.max_event_bytes, overlay) {
            Ok(a) => {
                overlay.absorb(&a.writes);
                writes.extend(a.writes);
                *state = a.state;
                Ok(Ok(a.results))
            }
            Err(e @ (ApplyError::InvalidEvent { .. } | ApplyError::Refused { .. })) => Ok(Err(e.to_string())),
            Err(ApplyError::Store(e)) => Err(e.into()),
        }
    }

    /// Appends the session-end events of `events` whose session is still open, belongs to
    /// `instance` of `proxy_id`, and has not moved on since the leader built the event.
    #[allow(clippy::too_many_arguments)]
    fn apply_abandon<L: Lookup>(
        &self,
        state: &mut LedgerState,
        now_ns: i64,
        proxy_id: &str,
        instance: &str,
        events: Vec<Bytes>,
        overlay: &mut Overlay<'_, L>,
        writes: &mut Vec<Put>,
    ) -> Result<u32, MachineError> {
        let mut keep = Vec::new();
        for b in events {
            let Ok(ev) = validate_event(&b, self.max_event_bytes) else { continue };
            if ev.proxy_id != proxy_id || ev.proxy_instance != instance || ev.kind != EventKind::SessionEnd as i32 {
                continue;
            }
            let Some(s) = overlay.session(&ev.session_id)? else { continue };
            if s.status == "open" && s.proxy_instance == instance && s.last_seq + 1 == ev.seq {
                keep.push(b);
            }
        }
        if keep.is_empty() {
            return Ok(0);
        }
        let n = keep.len() as u32;
        match self.apply_group(state, now_ns, keep, overlay, writes)? {
            Ok(_) => Ok(n),
            Err(_) => Ok(0),
        }
    }

    /// Leases that have lapsed by `now_ns` and still have open sessions, with the expiry
    /// seen. (Leader side; the proposal is checked again on apply.) A leader that took over
    /// at `leader_since_ns` gives every lease one full length from then, as etcd's lessor
    /// does on promotion: proxies could not renew while there was no leader, and a failover
    /// must not close a live proxy's sessions.
    pub fn lapsed_leases(&self, now_ns: i64, leader_since_ns: i64) -> Vec<(String, Lease)> {
        self.leases
            .iter()
            .filter(|(_, l)| !l.lapsed && l.expires_ns.max(leader_since_ns.saturating_add(l.ttl_ns)) <= now_ns)
            .map(|(p, l)| (p.clone(), l.clone()))
            .collect()
    }

    /// The lease of `proxy_id`.
    pub fn lease(&self, proxy_id: &str) -> Option<&Lease> {
        self.leases.get(proxy_id)
    }

    /// Builds, once, the session-end events that close the open sessions of `proxy_id`
    /// recorded by `instance` (or by any instance other than `except_instance`).
    pub fn abandon_events(&self, proxy_id: &str, instance: Option<&str>, except_instance: Option<&str>, now_ns: i64, detail: &str) -> Result<Vec<Bytes>, StoreError> {
        let store = self.store.get();
        let prefix = open_sessions_prefix(proxy_id);
        let mut out = Vec::new();
        for kv in store.scan_prefix(cf::OPEN_SESSIONS, &prefix)? {
            let (k, _) = kv?;
            let session_id = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            let Some(s) = store_session(&store, &session_id)? else { continue };
            if s.status != "open" || instance.is_some_and(|i| i != s.proxy_instance) || except_instance.is_some_and(|i| i == s.proxy_instance) {
                continue;
            }
            let ev = Event {
                proxy_id: proxy_id.to_string(),
                session_id: session_id.clone(),
                seq: s.last_seq + 1,
                proxy_time_ns: now_ns,
                kind: EventKind::SessionEnd as i32,
                identity: Some(Identity {
                    issuer: s.issuer.clone(),
                    subject: s.subject.clone(),
                    email: s.email.clone(),
                    groups: s.groups.clone(),
                    agent: s.agent.clone(),
                    ..Default::default()
                }),
                resource: s.resource.clone(),
                protocol: if s.protocol == "postgres" { Protocol::Postgres as i32 } else { Protocol::Unspecified as i32 },
                client_addr: s.client_addr.clone(),
                proxy_instance: s.proxy_instance.clone(),
                body: Some(event::Body::SessionEnd(SessionEnd {
                    reason: END_ABANDONED.into(),
                    detail: detail.to_string(),
                    // The session's record ends with a request: whatever answered it is lost.
                    last_response_unrecorded: s.last_kind == EventKind::Request as i32,
                })),
            };
            out.push(Bytes::from(ev.encode_to_vec()));
        }
        Ok(out)
    }
}

fn store_session(store: &Store, id: &str) -> Result<Option<crate::state::SessionSummary>, StoreError> {
    Lookup::session(store, id)
}

fn lease_put(proxy_id: &str, lease: &Lease) -> Put {
    // A struct of a string and integers serializes without fail.
    Put::new(cf::LEASES, proxy_id.as_bytes().to_vec(), serde_json::to_vec(lease).unwrap_or_default())
}

fn u64_at(v: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&v[at..at + 8]);
    u64::from_be_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use custody_proto::pb::ledger::AppendGroup;
    use custody_proto::pb::v1::PgRequest;

    fn append(n: u64, from_seq: u64) -> Vec<u8> {
        let events = (from_seq..from_seq + n)
            .map(|seq| {
                let ev = Event {
                    proxy_id: "p".into(),
                    session_id: "s".into(),
                    seq,
                    kind: EventKind::Request as i32,
                    body: Some(event::Body::PgRequest(PgRequest { message: "Query".into(), sql: format!("select {seq}"), ..Default::default() })),
                    ..Default::default()
                };
                Bytes::from(ev.encode_to_vec())
            })
            .collect();
        RaftCommand { command: Some(raft_command::Command::Append(AppendCommand { commit_time_ns: from_seq as i64, groups: vec![AppendGroup { events }] })) }.encode_to_vec()
    }

    fn seal(at: i64, ends: &[u64]) -> Vec<u8> {
        RaftCommand { command: Some(raft_command::Command::Seal(SealCommand { sealed_at_ns: at, ends: ends.to_vec() })) }.encode_to_vec()
    }

    #[test]
    fn replicas_applying_the_same_seals_hold_the_same_linked_blocks_and_repeats_change_nothing() {
        let log: Vec<Vec<u8>> = vec![
            append(5, 0),
            seal(100, &[3, 5]),
            append(4, 5),
            // A repeat from a new leader, one end beyond the ledger, and a new end.
            seal(200, &[5, 3, 20, 9]),
            seal(300, &[9]),
        ];
        let mut headers = Vec::new();
        for _ in 0..2 {
            let dir = tempfile::tempdir().unwrap();
            let store = Arc::new(Store::open(dir.path()).unwrap());
            let mut m = LedgerMachine::open(StoreCell::new(store.clone()), 1 << 20).unwrap();
            for (i, d) in log.iter().enumerate() {
                m.apply(i as u64 + 1, 1, d).unwrap();
            }
            let blocks: Vec<BlockHeader> = store.blocks_from(0).unwrap().map(|r| BlockHeader::decode(&r.unwrap().1).unwrap()).collect();
            assert_eq!(blocks.iter().map(|b| (b.height, b.first_index, b.count)).collect::<Vec<_>>(), vec![(0, 0, 3), (1, 3, 2), (2, 5, 4)]);
            for (i, b) in blocks.iter().enumerate() {
                b.check_follows(i.checked_sub(1).map(|p| &blocks[p])).unwrap();
                assert_eq!(b.root, m.tree_root(b.tree_size).unwrap());
            }
            assert_eq!(m.sealed_size(), 9);
            // Reopened, the machine remembers its last block; the offline check passes.
            drop(m);
            let m = LedgerMachine::open(StoreCell::new(store.clone()), 1 << 20).unwrap();
            assert_eq!(m.last_block(), blocks.last().copied());
            crate::verify::verify_store(&store).unwrap();
            headers.push(blocks);
        }
        assert_eq!(headers[0], headers[1], "both replicas sealed the same bytes");
    }

    #[test]
    fn a_block_whose_root_does_not_match_the_entries_fails_the_offline_check() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let mut m = LedgerMachine::open(StoreCell::new(store.clone()), 1 << 20).unwrap();
        m.apply(1, 1, &append(6, 0)).unwrap();
        m.apply(2, 1, &seal(1, &[2, 4, 6])).unwrap();
        let mut b1 = BlockHeader::decode(&store.get(cf::BLOCKS, &1u64.to_be_bytes()).unwrap().unwrap()).unwrap();
        b1.root[0] ^= 1;
        store.write(&[Put::new(cf::BLOCKS, 1u64.to_be_bytes().to_vec(), b1.encode())], true).unwrap();
        let err = crate::verify::verify_store(&store).unwrap_err();
        assert_eq!(err.index(), Some(2), "{err}");
        // Block 2 no longer follows the altered block 1 either; the first fault is named.
        assert!(err.to_string().contains("block 1"), "{err}");
    }
}

#[cfg(test)]
mod field_index_tests {
    use super::*;
    use crate::table::{Table, TicketQuery};
    use custody_proto::pb::ledger::AppendGroup;
    use custody_proto::pb::v1::PgRequest;

    fn ev(seq: u64, subject: &str, resource: &str, kind: EventKind) -> Bytes {
        Event {
            proxy_id: "p".into(),
            session_id: format!("s-{subject}"),
            seq,
            kind: kind as i32,
            identity: Some(Identity { subject: subject.into(), email: format!("{subject}@example.com"), ..Default::default() }),
            resource: resource.into(),
            body: Some(event::Body::PgRequest(PgRequest { message: "Query".into(), sql: format!("select {seq}"), ..Default::default() })),
            ..Default::default()
        }
        .encode_to_vec()
        .into()
    }

    fn indices(store: &Store, q: TicketQuery) -> Vec<u64> {
        let size = crate::state::LedgerState::recorded(store).unwrap().unwrap().next_index;
        let mut out = Vec::new();
        crate::scan::scan(store, size, &q, None, |b| {
            let c = b.column_by_name("index").unwrap().as_any().downcast_ref::<arrow::array::UInt64Array>().unwrap().clone();
            out.extend(c.values().iter().copied());
            true
        })
        .unwrap();
        out
    }

    #[test]
    fn caller_resource_and_kind_filters_walk_their_index_and_an_old_ledger_is_indexed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let mut m = LedgerMachine::open(StoreCell::new(store.clone()), 1 << 20).unwrap();
        let mut events = Vec::new();
        let mut seqs: HashMap<&str, u64> = HashMap::new();
        for i in 0..30u64 {
            let who = ["alice", "bob", "carol"][(i % 3) as usize];
            let res = if i % 2 == 0 { "pg-prod" } else { "pg-dev" };
            let kind = if i % 5 == 0 { EventKind::Response } else { EventKind::Request };
            let seq = seqs.entry(who).or_default();
            events.push(ev(*seq, who, res, kind));
            *seq += 1;
        }
        let cmd = RaftCommand { command: Some(raft_command::Command::Append(AppendCommand { commit_time_ns: 1, groups: vec![AppendGroup { events }] })) };
        m.apply(1, 1, &cmd.encode_to_vec()).unwrap();
        let q = |f: fn(&mut TicketQuery)| {
            let mut q = TicketQuery { table: Table::Events, ..Default::default() };
            f(&mut q);
            q
        };
        let alice: Vec<u64> = (0..30).filter(|i| i % 3 == 0).collect();
        assert_eq!(indices(&store, q(|q| q.identity = Some("alice".into()))), alice);
        assert_eq!(indices(&store, q(|q| q.identity = Some("alice@example.com".into()))), alice, "by email too");
        assert_eq!(indices(&store, q(|q| q.resource = Some("pg-prod".into()))), (0..30).filter(|i| i % 2 == 0).collect::<Vec<_>>());
        assert_eq!(indices(&store, q(|q| q.kind = Some("response".into()))), vec![0, 5, 10, 15, 20, 25]);
        // Combined: the caller's index, the rest checked on the decoded events.
        assert_eq!(
            indices(&store, q(|q| {
                q.identity = Some("alice".into());
                q.resource = Some("pg-prod".into());
                q.from_index = Some(6);
            })),
            vec![6, 12, 18, 24]
        );
        assert!(indices(&store, q(|q| q.identity = Some("alic".into()))).is_empty(), "a prefix of a value is another value");

        // A ledger written before the index: its keys and marker gone, it is rebuilt on open.
        drop(m);
        let mut dels: Vec<Put> = store.keys_with_prefix(cf::BY_FIELD, b"").unwrap().map(|k| Put::delete(cf::BY_FIELD, k.unwrap().to_vec())).collect();
        dels.push(Put::delete(cf::META, b"by_field_complete".to_vec()));
        store.write(&dels, true).unwrap();
        assert!(indices(&store, q(|q| q.identity = Some("alice".into()))).is_empty());
        let _m = LedgerMachine::open(StoreCell::new(store.clone()), 1 << 20).unwrap();
        assert_eq!(indices(&store, q(|q| q.identity = Some("alice".into()))), alice);
    }
}
